"""Fixtures for nestor's end-to-end tests.

* ``server_under_test`` (session): the ``Target`` chosen by ``NESTOR_E2E_TARGET``
  (``direct`` = a real agent-server; see harness/targets.py). Unpacks as
  ``base_url, api_key``; also has ``working_dir_for(label)`` and ``llm_url_for(url)``.
* ``fresh_server_under_test`` (function): a private target for destructive tests.
* ``fake_llm`` (function): a fresh scripted fake LLM on 127.0.0.1 (and on the target's
  ``llm_listen_hosts``, e.g. the Docker bridge gateway; see fake_llm.py).
* ``agent_server_factory`` (function): start extra real agent-servers (stopped at teardown).
* ``rest`` (function): an ``httpx.Client`` for the target with the session key.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("OPENHANDS_SUPPRESS_BANNER", "1")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("no_proxy", "127.0.0.1,localhost")

import logging  # noqa: E402
import secrets  # noqa: E402
from typing import Iterator  # noqa: E402

import pytest  # noqa: E402

from fake_llm import FakeLLM  # noqa: E402
from harness import rest as rest_helpers  # noqa: E402
from harness.agent_server import AgentServer  # noqa: E402
from harness.targets import TARGETS, Target, TargetContext, selected_target_name  # noqa: E402

log = logging.getLogger("e2e")


@pytest.fixture(scope="session")
def server_under_test(tmp_path_factory) -> Iterator[Target]:
    name = selected_target_name()
    factory = TARGETS.get(name)
    if factory is None:
        raise pytest.UsageError(f"unknown NESTOR_E2E_TARGET={name!r}; known: {sorted(TARGETS)}")
    ctx = TargetContext(tmp_dir=tmp_path_factory.mktemp(f"target-{name}"))
    with factory(ctx) as target:
        log.info("target %s at %s (%s)", target.name, target.base_url, target.extra)
        yield target
        for s in target.agent_servers:
            if not s.alive():
                log.warning("agent-server died during the session; log tail:\n%s", s.log_tail())


@pytest.fixture
def fresh_server_under_test(tmp_path_factory) -> Iterator[Target]:
    """Like ``server_under_test`` but private to one test: for destructive tests (killing a
    downstream) that must not break the shared session target."""
    name = selected_target_name()
    ctx = TargetContext(tmp_dir=tmp_path_factory.mktemp(f"fresh-target-{name}"))
    with TARGETS[name](ctx) as target:
        yield target


@pytest.fixture
def fake_llm(request) -> Iterator[FakeLLM]:
    # Also listen where the target's agent-servers reach the host (containers: the bridge).
    extra: list[str] = []
    for name in ("server_under_test", "fresh_server_under_test"):
        if name in request.fixturenames:
            extra = list(request.getfixturevalue(name).llm_listen_hosts)
    fake = FakeLLM(extra_hosts=extra).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def llm_url(server_under_test: Target, fake_llm: FakeLLM) -> str:
    """The fake LLM's base URL as the target's agent-servers must use it."""
    return server_under_test.llm_url_for(fake_llm.base_url)


@pytest.fixture
def rest(server_under_test: Target):
    with rest_helpers.client(server_under_test.base_url, server_under_test.api_key) as c:
        yield c


@pytest.fixture
def agent_server_factory(tmp_path) -> Iterator:
    """``start(**extra_env) -> AgentServer``: extra real agent-servers for a test."""
    started: list[AgentServer] = []

    def start(name: str = "extra", api_key: str | None = None, **extra_env: str) -> AgentServer:
        s = AgentServer(tmp_path / f"agent-server-{name}-{len(started)}", api_key=api_key or "e2e-" + secrets.token_hex(8),
                        extra_env=dict(extra_env))
        started.append(s)
        return s.start()

    try:
        yield start
    finally:
        for s in started:
            s.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        target = item.funcargs.get("server_under_test") if hasattr(item, "funcargs") else None
        for s in getattr(target, "agent_servers", []) or []:
            rep.sections.append((f"agent-server log tail ({s.base_url})", s.log_tail(8000)))
