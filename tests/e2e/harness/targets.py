"""What the end-to-end tests talk to ("the server under test").

Chosen by ``NESTOR_E2E_TARGET`` (default ``direct``). A target is a context manager
(generator function) taking a ``TargetContext`` and yielding a ``Target``; register it in
``TARGETS``. Adding a target = writing one such function.

* ``direct``: one real agent-server subprocess; the tests talk to it directly. Validates the
  harness itself (no nestor).
* ``nestor-existing``: an already running nestor at ``NESTOR_E2E_URL`` with key
  ``NESTOR_E2E_API_KEY``; working dirs from ``NESTOR_E2E_WORKING_DIR`` (a template with
  ``{label}``, default ``/workspace/e2e-{label}``).
* ``nestor-process``: start ``$NESTOR_BIN`` ourselves. NOT IMPLEMENTED HERE (nestor's CLI is
  being written); see ``nestor_process_target`` for the contract to fill in.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .agent_server import AgentServer
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
def nestor_existing_target(ctx: TargetContext) -> Iterator[Target]:
    url = os.environ.get("NESTOR_E2E_URL")
    if not url:
        raise RuntimeError("NESTOR_E2E_TARGET=nestor-existing needs NESTOR_E2E_URL (and NESTOR_E2E_API_KEY)")
    wait_http_ok(url.rstrip("/") + "/alive", timeout=30)
    template = os.environ.get("NESTOR_E2E_WORKING_DIR", "/workspace/e2e-{label}")
    yield Target(
        name="nestor-existing",
        base_url=url.rstrip("/"),
        api_key=os.environ.get("NESTOR_E2E_API_KEY"),
        working_dir_for=lambda label: template.format(label=f"{ctx.run_id}-{label}"),
    )


@contextlib.contextmanager
def nestor_process_target(ctx: TargetContext) -> Iterator[Target]:
    """To implement: start ``$NESTOR_BIN`` on a free loopback port with its state under
    ``ctx.tmp_dir``, configured to spawn agent-servers from this venv (``agent_server_bin()``)
    with the env of ``agent_server_env()``; wait for ``/alive`` (bounded); yield a Target;
    stop it (process group) in ``finally`` and check no downstream is left running."""
    raise NotImplementedError(
        "NESTOR_E2E_TARGET=nestor-process is not implemented yet (see harness/targets.py)"
    )


TARGETS: dict[str, Callable[[TargetContext], contextlib.AbstractContextManager[Target]]] = {
    "direct": direct_target,
    "nestor-existing": nestor_existing_target,
    "nestor-process": nestor_process_target,
}


def selected_target_name() -> str:
    return os.environ.get("NESTOR_E2E_TARGET", "direct")
