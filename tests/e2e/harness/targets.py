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
* ``nestor-url``: an already running nestor at ``NESTOR_E2E_URL`` with key
  ``NESTOR_E2E_API_KEY``; working dirs from ``NESTOR_E2E_WORKING_DIR`` (a template with
  ``{label}``, default ``/workspace/e2e-{label}``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .agent_server import AgentServer, agent_server_bin
from .nestor import Nestor
from .procs import wait_http_ok


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

    def __iter__(self):  # allows ``base_url, api_key = server_under_test``
        yield self.base_url
        yield self.api_key


@dataclass
class TargetContext:
    tmp_dir: Path  # a fresh directory for this target's state
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])


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
"""
    n = Nestor(ctx.tmp_dir / "nestor", config)
    try:
        n.start()
        yield Target(
            name="nestor-process",
            base_url=n.base_url,
            api_key=api_key,
            working_dir_for=lambda label: f"/workspace/e2e-{ctx.run_id}-{label}",
            keeps_working_dir=False,
            nestor=n,
        )
    finally:
        n.stop()
        leftovers = n.leftover_agent_servers()
        if leftovers:
            raise AssertionError(f"agent-server processes left after nestor stopped: {leftovers}")


@contextlib.contextmanager
def nestor_existing_target(ctx: TargetContext) -> Iterator[Target]:
    """nestor on the existing provisioner over two real agent-servers started here."""
    servers = [
        AgentServer(ctx.tmp_dir / f"agent-server-{i}", api_key=f"downstream-{i}-" + secrets.token_hex(8))
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
{entries}"""
        n = Nestor(ctx.tmp_dir / "nestor", config)
        n.start()
        yield Target(
            name="nestor-existing",
            base_url=n.base_url,
            api_key=api_key,
            working_dir_for=lambda label: str(workspaces / label),
            agent_servers=servers,
            nestor=n,
        )
    finally:
        if n is not None:
            n.stop()
        for s in servers:
            s.cleanup()


TARGETS: dict[str, Callable[[TargetContext], contextlib.AbstractContextManager[Target]]] = {
    "direct": direct_target,
    "nestor-existing": nestor_existing_target,
    "nestor-process": nestor_process_target,
    "nestor-url": nestor_url_target,
}


def selected_target_name() -> str:
    return os.environ.get("NESTOR_E2E_TARGET", "direct")
