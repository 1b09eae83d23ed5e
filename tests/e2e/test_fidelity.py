"""Fidelity: nestor answers like the agent-server it fronts (see harness/fidelity.py).

Two fresh agent-servers 1.58.2 with identical configuration: one used directly, one behind
nestor (``existing`` provisioner). The same request sequence (harness/fidelity_steps.py)
goes to both and the answers are compared; every route of tests/fixtures/routes-1.58.2.tsv
is exercised, both WebSockets are compared exchange by exchange, every route is called
without a key and with a wrong one, and every answer nestor sent is scanned for the
downstream's key and address.

Runs in the ``e2e-existing`` stage (``NESTOR_E2E_TARGET=nestor-existing``) or when
``NESTOR_FIDELITY=1``; it starts its own servers (the session target is not used).
``NESTOR_FIDELITY_WRITE_DOCS=1`` (re)writes docs/compatibility.md from the run.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from fake_llm import FakeLLM
from harness import fidelity_steps as FS
from harness.agent_server import AgentServer
from harness.fidelity import Leak, Normaliser, Outcome, Run, Side, run_ws, scan_for_leaks
from harness.fidelity_report import render, route_verdicts
from harness.nestor import Nestor

log = logging.getLogger("e2e.fidelity")
logging.getLogger("httpx").setLevel(logging.WARNING)

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("NESTOR_E2E_TARGET") != "nestor-existing" and os.environ.get("NESTOR_FIDELITY") != "1",
        reason="the fidelity run belongs to the nestor-existing stage (or set NESTOR_FIDELITY=1)",
    ),
    pytest.mark.timeout(480),
]

DOC = FS.REPO / "docs" / "compatibility.md"

# Both agent-servers get no outbound network (every proxied call fails at once, the same way
# on both sides) while loopback stays direct.
NO_NETWORK = {k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")}
# JSON logs: an agent-server renders an unhandled exception's traceback with rich otherwise,
# which blocks its event loop for seconds on a busy machine (and fails nestor's health probe).
SERVER_ENV = {**NO_NETWORK, "LOG_JSON": "true"}


@dataclass
class FidelityResult:
    routes: list[FS.Route]
    outcomes: list[Outcome]
    ws_outcomes: list[Outcome]
    leaks: list[Leak]
    scanned: int
    seconds: float
    doc: str
    control: set[str]  # what the scan found in the direct side's answers (positive control)


def _side_vars(root: Path, llm: str, ids: dict[str, str], key: str, sha: str) -> dict[str, str]:
    return {
        "root": str(root),
        "ws": str(root / "ws" / "main"),
        "ws_other": str(root / "ws" / "other"),
        "llm": llm,
        "key": key,
        "sha": sha,
        **ids,
    }


@pytest.fixture(scope="module")
def fidelity(tmp_path_factory) -> FidelityResult:
    t0 = time.monotonic()
    base = tmp_path_factory.mktemp("fidelity")
    client_key = "fid-" + secrets.token_hex(12)
    downstream_key = "down-" + secrets.token_hex(12)
    roots = {"direct": base / "direct", "nestor": base / "nestor"}
    shas = set()
    for root in roots.values():
        shas.add(FS.prepare_workspace(root / "ws" / "main"))
        (root / "ws" / "other").mkdir(parents=True, exist_ok=True)
    assert len(shas) == 1, f"the two workspaces' commits differ: {shas}"
    sha = shas.pop()
    ids = {
        "cid": str(uuid.uuid4()),
        "cid_del": str(uuid.uuid4()),
        "cid_fork": str(uuid.uuid4()),
        "unknown": str(uuid.uuid4()),
        "unknown_hex": uuid.uuid4().hex,
    }
    fixed = {ids["cid"]: "<cid>", ids["cid_del"]: "<cid-del>", ids["cid_fork"]: "<cid-fork>",
             ids["unknown"]: "<unknown>", ids["unknown_hex"]: "<unknown-hex>"}
    fake = FakeLLM().start()
    # The direct server is configured with the key clients use, the one behind nestor with a
    # key of its own (which must never reach a client).
    direct_server = AgentServer(roots["direct"] / "server", api_key=client_key, extra_env=dict(SERVER_ENV))
    hidden_server = AgentServer(roots["nestor"] / "server", api_key=downstream_key, extra_env=dict(SERVER_ENV))
    nestor = None
    try:
        AgentServer.start_many([direct_server, hidden_server])
        config = f"""
session_api_keys = ["{client_key}"]
state_dir = "{roots['nestor'] / 'nestor-state'}"
[provisioner]
kind = "existing"
[provisioner.existing]
health_interval_secs = 1.0
health_timeout_secs = 10.0
[[provisioner.existing.servers]]
url = "{hidden_server.base_url}"
api_key = "{downstream_key}"
"""
        nestor = Nestor(roots["nestor"] / "nestor", config)
        nestor.start()
        log.info("fidelity: direct %s, nestor %s over %s (servers up in %.1f s)", direct_server.base_url, nestor.base_url,
                 hidden_server.base_url, time.monotonic() - t0)
        direct = Side("direct", direct_server.base_url, client_key, str(roots["direct"]))
        behind = Side("nestor", nestor.base_url, client_key, str(roots["nestor"]))
        for side, root in ((direct, roots["direct"]), (behind, roots["nestor"])):
            side.vars.update(_side_vars(root, fake.base_url, ids, client_key, sha))
        run = Run(direct, behind, Normaliser(direct, fixed), Normaliser(behind, fixed), log=log.warning)
        routes = FS.load_routes()
        for step in FS.server_steps() + FS.settings_steps() + FS.home_steps() + FS.conversation_steps() \
                + FS.scoped_workspace_steps() + FS.global_workspace_steps():
            run.step(step)
        # WebSockets (the conversation has a finished run and a log by now).
        ws_outcomes: list[Outcome] = []
        slow: list[Outcome] = []
        timeout_thread = threading.Thread(target=lambda: slow.append(run_ws(run, FS.ws_timeout_scenario())), daemon=True)
        timeout_thread.start()
        for sc in FS.ws_scenarios():
            ws_outcomes.append(run_ws(run, sc))
        timeout_thread.join(timeout=30)
        ws_outcomes += slow
        ws_ids = {id(o) for o in ws_outcomes}
        run.outcomes = [o for o in run.outcomes if id(o) not in ws_ids]
        for step in FS.lifecycle_steps() + FS.unknown_conversation_steps() + FS.auth_steps(routes):
            run.step(step)
        _dump(base / "outcomes.jsonl", run.outcomes + ws_outcomes)
        scanned, leaks = scan_for_leaks(behind, downstream_key, hidden_server.port)
        # The scanner's positive control: the direct side's answers do contain its own key
        # (the workspace cookie) and address (redirect locations).
        _, control = scan_for_leaks(direct, client_key, direct_server.port)
        control_found = {l.what for l in control}
        seconds = time.monotonic() - t0
        doc = render(routes, run.outcomes, ws_outcomes, leaks, scanned, seconds)
        if os.environ.get("NESTOR_FIDELITY_WRITE_DOCS") == "1":
            DOC.write_text(doc)
            log.warning("fidelity: wrote %s", DOC)
        else:
            out = base / "compatibility.md"
            out.write_text(doc)
            log.info("fidelity: report at %s", out)
        for side in (direct, behind):
            side.close()
        return FidelityResult(routes, run.outcomes, ws_outcomes, leaks, scanned, seconds, doc, control_found)
    finally:
        if nestor is not None:
            nestor.stop()
        for s in (direct_server, hidden_server):
            s.cleanup()
        fake.stop()


def _dump(path: Path, outcomes: list[Outcome]) -> None:
    """Every comparison, for looking into a run (not part of the docs)."""
    import json

    with open(path, "w") as f:
        for o in outcomes:
            f.write(json.dumps({"route": o.route, "label": o.step.label, "verdict": o.verdict, "seconds": o.seconds,
                                "problems": o.problems, "direct": o.direct.as_dict() if o.direct else None,
                                "nestor": o.nestor.as_dict() if o.nestor else None}, default=str) + "\n")


def _fmt(outcomes: list[Outcome]) -> str:
    return "\n".join(f"  {o.route} [{o.step.label}] {o.verdict}: " + "; ".join(p for p in o.problems if p)[:800] for o in outcomes)


def test_every_route_is_exercised(fidelity):
    missing = [v.route.key for v in route_verdicts(fidelity.routes, fidelity.outcomes + fidelity.ws_outcomes) if v.verdict == "missing"]
    assert not missing, f"routes of routes-1.58.2.tsv without a compared request: {missing}"
    rest_only_auth = {o.route for o in fidelity.outcomes if not o.step.label.startswith("auth:")}
    untested = [r.key for r in fidelity.routes if r.method != "WS" and r.key not in rest_only_auth]
    assert not untested, f"routes exercised only by the auth matrix: {untested}"


def test_no_unexplained_differences(fidelity):
    bad = [o for o in fidelity.outcomes if o.verdict in ("unexplained", "error") and not o.step.label.startswith("auth:")]
    assert not bad, "differences nestor does not explain:\n" + _fmt(bad)


def test_auth_matrix(fidelity):
    auth = [o for o in fidelity.outcomes if o.step.label.startswith("auth:")]
    assert len(auth) >= 2 * (len({r.key for r in fidelity.routes if r.method != "WS"})), "auth matrix incomplete"
    bad = [o for o in auth if o.verdict in ("unexplained", "error")]
    assert not bad, "routes whose answer without a key / with a wrong key differs:\n" + _fmt(bad)


def test_websockets(fidelity):
    assert fidelity.ws_outcomes, "no WebSocket exchange compared"
    bad = [o for o in fidelity.ws_outcomes if o.verdict in ("unexplained", "error")]
    assert not bad, "WebSocket exchanges that differ:\n" + _fmt(bad)


def test_no_downstream_key_or_address_in_any_answer(fidelity):
    assert fidelity.scanned > 300, f"only {fidelity.scanned} answers recorded"
    assert any(w.startswith("fid-") for w in fidelity.control) and any(w.startswith("127.0.0.1:") for w in fidelity.control), (
        f"the scanner did not find the direct server's own key and address in its answers: {fidelity.control}")
    assert not fidelity.leaks, "downstream key/address in answers:\n" + "\n".join(
        f"  {l.where}: {l.what}: ...{l.excerpt}..." for l in fidelity.leaks[:20])


def test_compatibility_doc_is_current(fidelity):
    """docs/compatibility.md states the same verdicts as this run (regenerate it with
    NESTOR_FIDELITY_WRITE_DOCS=1 when a route's verdict changes)."""
    if not DOC.exists():
        pytest.fail(f"{DOC} is missing: run with NESTOR_FIDELITY_WRITE_DOCS=1")
    current = DOC.read_text()
    first = next((l for l in fidelity.doc.splitlines() if l.startswith("**")), "")
    assert first.split(",")[0] in current, f"docs/compatibility.md is stale: this run says {first!r}"
