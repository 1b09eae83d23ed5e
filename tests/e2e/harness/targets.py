"""What the end-to-end tests talk to ("the server under test").

Chosen by ``NESTOR_E2E_TARGET`` (default ``direct``). A target is a context manager
(generator function) taking a ``TargetContext`` and yielding a ``Target``; register it in
``TARGETS``. Adding a target = writing one such function.

* ``direct``: one real agent-server subprocess; the tests talk to it directly. Validates the
  harness itself (no nestor).
* ``nestor-process``: nestor (``$NESTOR_BIN``, else the workspace's ``target/debug/nestor``)
  on the ``process`` provisioner: every conversation gets its own agent-server subprocess.
* ``nestor-existing``: two real agent-servers started here, and nestor on the ``existing``
  provisioner in front of them.
* ``nestor-docker``: nestor on the ``docker`` provisioner: every conversation gets its own
  agent-server container (image ``$NESTOR_TEST_AGENT_SERVER_IMAGE``); the fake LLM is reached
  through the Docker bridge (``host.docker.internal``).
* ``nestor-kubernetes``: nestor on the ``kubernetes`` provisioner, a pod per conversation on
  the test cluster (scripts/setup-kube.sh) run by ``nestor-node-agent``; see kube_target.py.
* ``nestor-url``: an already running nestor at ``NESTOR_E2E_URL`` with key
  ``NESTOR_E2E_API_KEY``; working dirs from ``NESTOR_E2E_WORKING_DIR`` (a template with
  ``{label}``, default ``/workspace/e2e-{label}``).

A test that needs nestor configured differently (``[[webhooks]]``, other downstream env)
builds its own target with ``TargetContext(nestor_config=..., downstream_env=...)``; see
``TargetContext``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .agent_server import AgentServer, agent_server_bin
from .kube_target import nestor_kubernetes_target
from .nestor import Nestor
from .procs import free_port, wait_http_ok


@dataclass
class Target:
    name: str
    base_url: str
    api_key: str | None
    # working_dir to give RemoteWorkspace for a conversation labelled ``label``. Distinct
    # per conversation when conversations share one filesystem (direct target); may be the
    # same path (e.g. "/workspace") when each conversation runs in its own container.
    working_dir_for: Callable[[str], str]
    # How a downstream agent-server reaches a loopback fake LLM URL (identity when the
    # downstreams run on this host; a container target would rewrite the host part).
    llm_url_for: Callable[[str], str] = lambda url: url
    # The agent-servers behind the target that the harness controls (direct: the one server;
    # nestor-process: whatever nestor exposes), for fault-injection tests.
    agent_servers: list[AgentServer] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # False when the server places each conversation in a workspace of its own choosing
    # (nestor's process provisioner in "isolated" mode): the reported working_dir differs.
    keeps_working_dir: bool = True
    # The nestor process behind the target, if any (for restart tests).
    nestor: Any = None
    # Local addresses (besides 127.0.0.1) the fake LLM must listen on for the downstreams to
    # reach it (containers: the Docker bridge gateway).
    llm_listen_hosts: list[str] = field(default_factory=list)
    # For targets that give each conversation its own agent-server: is the one of this
    # conversation id running? (None: conversations share servers.)
    own_downstream_running: Callable[[str], bool] | None = None
    # The log of the agent-server hosting a conversation (its uvicorn access lines count the
    # requests nestor made to it); None where the harness cannot read it.
    downstream_log: Callable[[str], str] | None = None

    def __iter__(self):  # allows ``base_url, api_key = server_under_test``
        yield self.base_url
        yield self.api_key


@dataclass
class TargetContext:
    tmp_dir: Path  # a fresh directory for this target's state
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    # Extra nestor configuration (TOML tables only, e.g. ``[[webhooks]]`` or ``[catalog]``),
    # appended to the target's own.
    nestor_config: str = ""
    # Extra environment for every agent-server behind the target (process/docker: the
    # provisioner's ``env``; existing: the servers the harness starts).
    downstream_env: dict[str, str] = field(default_factory=dict)
    # existing: start the servers with OH_WEBHOOKS_0_* pointing at nestor, as an operator
    # would (nestor's own downstreams always are).
    existing_webhooks_to_nestor: bool = False


def _env_table(section: str, env: dict[str, str]) -> str:
    """``[section]`` with ``env`` as TOML (JSON strings are valid TOML basic strings)."""
    if not env:
        return ""
    return f"\n[{section}]\n" + "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in env.items())


@contextlib.contextmanager
def direct_target(ctx: TargetContext) -> Iterator[Target]:
    api_key = "e2e-" + secrets.token_hex(8)
    server = AgentServer(ctx.tmp_dir / "agent-server", api_key=api_key)
    workspaces = ctx.tmp_dir / "workspaces"
    try:
        server.start()
        yield Target(
            name="direct",
            base_url=server.base_url,
            api_key=api_key,
            working_dir_for=lambda label: str(workspaces / label),
            agent_servers=[server],
            extra={"startup_seconds": server.startup_seconds},
        )
    finally:
        server.cleanup()


@contextlib.contextmanager
def nestor_url_target(ctx: TargetContext) -> Iterator[Target]:
    url = os.environ.get("NESTOR_E2E_URL")
    if not url:
        raise RuntimeError("NESTOR_E2E_TARGET=nestor-url needs NESTOR_E2E_URL (and NESTOR_E2E_API_KEY)")
    wait_http_ok(url.rstrip("/") + "/alive", timeout=30)
    template = os.environ.get("NESTOR_E2E_WORKING_DIR", "/workspace/e2e-{label}")
    yield Target(
        name="nestor-url",
        base_url=url.rstrip("/"),
        api_key=os.environ.get("NESTOR_E2E_API_KEY"),
        working_dir_for=lambda label: template.format(label=f"{ctx.run_id}-{label}"),
    )


@contextlib.contextmanager
def nestor_process_target(ctx: TargetContext) -> Iterator[Target]:
    """nestor on the process provisioner: one agent-server subprocess per conversation."""
    api_key = "e2e-" + secrets.token_hex(8)
    config = f"""
session_api_keys = ["{api_key}"]
state_dir = "{ctx.tmp_dir / 'nestor-state'}"
[provisioner]
kind = "process"
[provisioner.process]
agent_server = "{agent_server_bin()}"
{_env_table("provisioner.process.env", ctx.downstream_env)}
{ctx.nestor_config}
"""
    n = Nestor(ctx.tmp_dir / "nestor", config)
    state = ctx.tmp_dir / "nestor-state"

    def downstream_log(cid: str) -> str:
        p = state / "process" / cid.replace("-", "") / "agent-server.log"
        return p.read_text(errors="replace") if p.exists() else ""

    try:
        n.start()
        yield Target(
            name="nestor-process",
            base_url=n.base_url,
            api_key=api_key,
            working_dir_for=lambda label: f"/workspace/e2e-{ctx.run_id}-{label}",
            keeps_working_dir=False,
            nestor=n,
            own_downstream_running=lambda cid: bool(n.agent_server_pids(cid)),
            downstream_log=downstream_log,
        )
    finally:
        n.stop()
        leftovers = n.leftover_agent_servers()
        if leftovers:
            raise AssertionError(f"agent-server processes left after nestor stopped: {leftovers}")


@contextlib.contextmanager
def nestor_existing_target(ctx: TargetContext) -> Iterator[Target]:
    """nestor on the existing provisioner over two real agent-servers started here."""
    nestor_port = free_port()
    env = dict(ctx.downstream_env)
    if ctx.existing_webhooks_to_nestor:
        # What nestor gives the downstreams it starts (crates/aggregator/src/webhooks.rs).
        env.update({
            "OH_WEBHOOKS_0_BASE_URL": f"http://127.0.0.1:{nestor_port}/nestor/webhooks",
            "OH_WEBHOOKS_0_FLUSH_DELAY": "0.5",
            "OH_WEBHOOKS_0_EVENT_BUFFER_SIZE": "20",
            "OH_WEBHOOKS_0_NUM_RETRIES": "5",
            "OH_WEBHOOKS_0_RETRY_DELAY": "1",
        })
    servers = [
        AgentServer(ctx.tmp_dir / f"agent-server-{i}", api_key=f"downstream-{i}-" + secrets.token_hex(8),
                    extra_env=dict(env))
        for i in range(2)
    ]
    api_key = "e2e-" + secrets.token_hex(8)
    workspaces = ctx.tmp_dir / "workspaces"
    n = None
    try:
        # Started from this thread: their parent-death signal is tied to the spawning thread.
        for s in servers:
            s.start()
        entries = "".join(
            f"""
[[provisioner.existing.servers]]
url = "{s.base_url}"
api_key = "{s.api_key}"
"""
            for s in servers
        )
        config = f"""
session_api_keys = ["{api_key}"]
state_dir = "{ctx.tmp_dir / 'nestor-state'}"
[provisioner]
kind = "existing"
[provisioner.existing]
health_interval_secs = 1.0
{entries}
{ctx.nestor_config}
"""
        n = Nestor(ctx.tmp_dir / "nestor", config, port=nestor_port)
        n.start()

        def downstream_log(cid: str) -> str:
            # The server holding the conversation: the one whose state has it.
            for s in servers:
                if (s.state_dir / "conversations" / cid.replace("-", "")).exists():
                    return s.log_path.read_text(errors="replace")
            return ""

        yield Target(
            name="nestor-existing",
            base_url=n.base_url,
            api_key=api_key,
            working_dir_for=lambda label: str(workspaces / label),
            agent_servers=servers,
            nestor=n,
            downstream_log=downstream_log,
        )
    finally:
        if n is not None:
            n.stop()
        for s in servers:
            s.cleanup()


def _docker(*args: str, timeout: float = 60) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout.strip()


def docker_bridge_gateway() -> str:
    """The default bridge's gateway: the host as containers see it (host.docker.internal).

    Some Docker versions (Debian's 20.10 on a fresh install) list the bridge's subnet without
    its gateway: then the bridge interface's own address, as the host has it, and failing that
    the subnet's first address (the one Docker gives the bridge unless configured otherwise)."""
    ipam = _docker("network", "inspect", "bridge", "--format", "{{range .IPAM.Config}}{{.Gateway}} {{.Subnet}};{{end}}")
    gw = listed_gateway(ipam)
    if gw is not None:
        return gw
    iface = _docker("network", "inspect", "bridge", "--format", '{{index .Options "com.docker.network.bridge.name"}}')
    if not iface or iface == "<no value>":
        iface = "docker0"
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", iface], capture_output=True, text=True, timeout=30)
    if shown.returncode == 0:
        words = shown.stdout.split()
        if "inet" in words and words.index("inet") + 1 < len(words):
            return words[words.index("inet") + 1].split("/")[0]
    gw = subnet_first_address(ipam)
    if gw is None:
        raise RuntimeError(f"the Docker default bridge has no IPv4 gateway address (IPAM config {ipam!r}, interface {iface})")
    return gw


def listed_gateway(ipam: str) -> str | None:
    """The first IPv4 gateway listed in an IPAM config printed as ``GATEWAY SUBNET;`` entries
    (an entry without a gateway is just `` SUBNET``)."""
    for w in ipam.replace(";", " ").split():
        try:
            if isinstance(ipaddress.ip_address(w), ipaddress.IPv4Address):
                return w
        except ValueError:
            pass
    return None


def subnet_first_address(ipam: str) -> str | None:
    """The first address of the first IPv4 subnet in such a config."""
    for w in ipam.replace(";", " ").split():
        try:
            net = ipaddress.ip_network(w, strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv4Network) and net.prefixlen < 31:
            return str(net.network_address + 1)
    return None


def free_port_on(host: str) -> int:
    """A currently free TCP port on ``host`` (racy by nature, like ``free_port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def docker_container_of(instance: str, cid: str) -> str | None:
    """The id of conversation ``cid``'s container (running or not), if any."""
    out = _docker("ps", "-aq", "--filter", f"label=org.nestor.instance={instance}",
                  "--filter", f"label=org.nestor.conversation={cid}").split()
    return out[0] if out else None


def docker_cleanup(instance: str) -> None:
    """Remove every container and volume labelled with nestor instance ``instance``."""
    label = f"label=org.nestor.instance={instance}"
    ids = _docker("ps", "-aq", "--filter", label).split()
    if ids:
        _docker("rm", "-f", *ids, timeout=120)
    vols = _docker("volume", "ls", "-q", "--filter", label).split()
    if vols:
        _docker("volume", "rm", "-f", *vols, timeout=120)


@contextlib.contextmanager
def nestor_docker_target(ctx: TargetContext) -> Iterator[Target]:
    """nestor on the docker provisioner: one agent-server container per conversation, from
    ``$NESTOR_TEST_AGENT_SERVER_IMAGE`` (default ``nestor/agent-server:1.58.2``; built by
    scripts/build-agent-server-image.sh). The fake LLM listens on the bridge gateway too and
    containers reach it as ``host.docker.internal``; so does nestor's downstream-only
    listener (``internal_bind`` on the gateway: secret lookups and webhooks from the
    containers). Everything labelled with this run's instance id is removed afterwards."""
    image = os.environ.get("NESTOR_TEST_AGENT_SERVER_IMAGE") or "nestor/agent-server:1.58.2"
    _docker("image", "inspect", "--format", "{{.Id}}", image)  # fails clearly when absent
    gateway = docker_bridge_gateway()
    instance = f"e2e-{ctx.run_id}"
    api_key = "e2e-" + secrets.token_hex(8)
    internal_bind = f"{gateway}:{free_port_on(gateway)}"
    config = f"""
session_api_keys = ["{api_key}"]
state_dir = "{ctx.tmp_dir / 'nestor-state'}"
internal_bind = "{internal_bind}"
[provisioner]
kind = "docker"
[provisioner.docker]
image = "{image}"
instance_id = "{instance}"
{_env_table("provisioner.docker.env", ctx.downstream_env)}
{ctx.nestor_config}
"""
    n = Nestor(ctx.tmp_dir / "nestor", config)

    def running(cid: str) -> bool:
        out = _docker("ps", "-q", "--filter", f"label=org.nestor.instance={instance}",
                      "--filter", f"label=org.nestor.conversation={cid}")
        return bool(out)

    def downstream_log(cid: str) -> str:
        c = docker_container_of(instance, cid)
        if not c:
            return ""
        r = subprocess.run(["docker", "logs", c], capture_output=True, text=True, timeout=60)
        return r.stdout + r.stderr

    try:
        n.start()
        yield Target(
            name="nestor-docker",
            base_url=n.base_url,
            api_key=api_key,
            working_dir_for=lambda label: f"/workspace/e2e-{ctx.run_id}-{label}",
            llm_url_for=lambda url: url.replace("//127.0.0.1:", "//host.docker.internal:").replace(
                "//localhost:", "//host.docker.internal:"),
            llm_listen_hosts=[gateway],
            keeps_working_dir=False,
            nestor=n,
            own_downstream_running=running,
            downstream_log=downstream_log,
            extra={"instance": instance, "image": image, "internal_bind": internal_bind, "gateway": gateway},
        )
    finally:
        try:
            n.stop()
        finally:
            docker_cleanup(instance)


TARGETS: dict[str, Callable[[TargetContext], contextlib.AbstractContextManager[Target]]] = {
    "direct": direct_target,
    "nestor-docker": nestor_docker_target,
    "nestor-existing": nestor_existing_target,
    "nestor-kubernetes": nestor_kubernetes_target,
    "nestor-process": nestor_process_target,
    "nestor-url": nestor_url_target,
}


def selected_target_name() -> str:
    return os.environ.get("NESTOR_E2E_TARGET", "direct")
