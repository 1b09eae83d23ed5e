"""``nestor-kubernetes``: nestor on the ``kubernetes`` provisioner, one agent-server pod per
conversation, against the test cluster of scripts/setup-kube.sh (a real kube-apiserver 1.20 +
etcd on loopback). Pods run as Docker containers of ``$NESTOR_TEST_AGENT_SERVER_IMAGE`` under
the test node agent (``nestor-node-agent``, crates/test-support), which also creates this
run's namespace with the shipped RBAC Role (deploy/kubernetes/rbac.yaml) bound to the test
user ``nestor`` — whose token nestor uses — and removes the namespace's contents and every
container it ran when it stops.

nestor reaches the pods at the loopback port the node agent publishes
(``reach = "host-port-annotation"``); the pods reach the fake LLM and nestor's internal
listener through the Docker bridge, as ``host.docker.internal``, like the docker target.

``NESTOR_E2E_KUBE_POOL_MIN_IDLE=<n>`` (n > 0) runs nestor on ``kind = "pool"`` over the
kubernetes backend instead, with ``n`` warm pods. ``target.extra["start_replica"](work_dir)``
starts a second nestor replica on the same cluster, namespace and instance (its own state
directory and internal listener; no shared memory), as a deployment with two replicas has.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Iterator

from .nestor import Nestor


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def node_agent_bin() -> str:
    explicit = os.environ.get("NESTOR_NODE_AGENT_BIN")
    if explicit:
        return explicit
    for profile in ("debug", "release"):
        p = _repo_root() / "target" / profile / "nestor-node-agent"
        if p.exists():
            return str(p)
    raise RuntimeError("nestor-node-agent not found: cargo build -p nestor-test-support --bin nestor-node-agent")


def setup_kube() -> Path:
    """Start (or find) the test cluster; the admin kubeconfig."""
    r = subprocess.run(["bash", str(_repo_root() / "scripts/setup-kube.sh"), "--no-build"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"scripts/setup-kube.sh failed: {r.stderr.strip()[-2000:]}")
    return Path(r.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def nestor_kubernetes_target(ctx) -> Iterator:
    from .targets import Target, _docker, _env_table, docker_bridge_gateway, free_port_on

    image = os.environ.get("NESTOR_TEST_AGENT_SERVER_IMAGE") or "nestor/agent-server:1.58.2"
    _docker("image", "inspect", "--format", "{{.Id}}", image)  # fails clearly when absent
    admin = setup_kube()
    nestor_kubeconfig = admin.parent / "nestor.kubeconfig"
    gateway = docker_bridge_gateway()
    namespace = f"e2e-{ctx.run_id}"
    api_key = "e2e-" + secrets.token_hex(8)
    internal_bind = f"{gateway}:{free_port_on(gateway)}"
    log = open(ctx.tmp_dir / "node-agent.log", "w")
    agent = subprocess.Popen(
        [node_agent_bin(), "--kubeconfig", str(admin), "--namespace", namespace,
         "--node-name", f"node-{namespace}", "--create-namespace"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = agent.stdout.readline() if agent.stdout else ""
        if line.strip() != "ready":
            raise RuntimeError(f"nestor-node-agent did not start (see {ctx.tmp_dir / 'node-agent.log'})")
        min_idle = int(os.environ.get("NESTOR_E2E_KUBE_POOL_MIN_IDLE") or "0")
        kind = f'kind = "pool"\n[provisioner.pool]\nbackend = "kubernetes"\nmin_idle = {min_idle}' if min_idle > 0 else 'kind = "kubernetes"'

        def config_for(state_dir: Path, internal_bind: str) -> str:
            return f"""
session_api_keys = ["{api_key}"]
state_dir = "{state_dir}"
internal_bind = "{internal_bind}"
internal_url = "http://host.docker.internal:{internal_bind.rsplit(':', 1)[1]}"
ready_timeout_secs = 240
[provisioner]
{kind}
[provisioner.kubernetes]
kubeconfig = "{nestor_kubeconfig}"
namespace = "{namespace}"
image = "{image}"
reach = "host-port-annotation"
startup_timeout_secs = 240
termination_grace_secs = 2
{_env_table("provisioner.kubernetes.env", ctx.downstream_env)}
{ctx.nestor_config}
"""

        replicas: list[Nestor] = []

        def start_replica(work_dir: Path) -> Nestor:
            r = Nestor(work_dir, config_for(Path(work_dir) / "nestor-state", f"{gateway}:{free_port_on(gateway)}"))
            replicas.append(r)
            return r.start()

        n = Nestor(ctx.tmp_dir / "nestor", config_for(ctx.tmp_dir / "nestor-state", internal_bind))
        try:
            n.start()
            yield Target(
                name="nestor-kubernetes",
                base_url=n.base_url,
                api_key=api_key,
                working_dir_for=lambda label: f"/workspace/e2e-{ctx.run_id}-{label}",
                llm_url_for=lambda url: url.replace("//127.0.0.1:", "//host.docker.internal:").replace(
                    "//localhost:", "//host.docker.internal:"),
                llm_listen_hosts=[gateway],
                keeps_working_dir=False,
                nestor=n,
                extra={"namespace": namespace, "image": image, "internal_bind": internal_bind, "admin_kubeconfig": str(admin),
                       "start_replica": start_replica, "pool_min_idle": min_idle},
            )
        finally:
            for r in replicas:
                r.stop()
            n.stop()
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=120)
        except subprocess.TimeoutExpired:
            agent.kill()
        log.close()
