"""nestor hides a downstream agent-server crash from WebSocket clients (target nestor-existing).

A real SDK ``RemoteConversation`` runs a multi-step task through nestor while a raw
``/sockets/session/{id}?after_seq=-1`` client watches the same conversation. Mid-run, with
an LLM step parked in the fake LLM, the agent-server hosting the conversation is killed
(SIGKILL of its process group) and restarted on the same port and state dir. Then:

* nestor does not close either client socket: the SDK opens exactly one WebSocket and logs
  no reconnect (``ws_connect_retry`` / ``ws_connection_closed_retry``); the session socket
  never sees a close and gets exactly one ``sync``;
* what happens to the run (agent-server 1.58.2, observed): the restarted server recovers
  the conversation that was RUNNING as ``execution_status=error`` (persisted as a state
  update event) and does not run it again; the LLM call that was in flight is lost, no
  tool ran twice. nestor replays the gap to both clients through their same sockets, the
  test calls ``run()`` again, and the agent finishes the remaining steps;
* the events the SDK handed to its callbacks equal ``/events/search`` exactly: same ids,
  none twice, none missing, and in log order (``strict_order=True``: nestor resumes from
  the downstream's log order and drops what the client already has, so even across the
  kill nothing arrives late); the session socket's durable seqs are 0..N-1, matching the
  log by index.
"""

from __future__ import annotations

import logging
import time

import httpx
import pytest

from harness import rest as R
from harness.events import EventRecorder, assert_sdk_consistent, event_kind
from harness.sdk import open_conversation, start_closing
from harness.session_ws import SessionSocket, check_against_log, check_continuity, is_run_finished_durable, summarize
from harness.targets import selected_target_name

pytestmark = pytest.mark.skipif(
    selected_target_name() != "nestor-existing",
    reason="kills and restarts a downstream agent-server: needs NESTOR_E2E_TARGET=nestor-existing",
)

STEPS = 6
KILL_AFTER_STEPS = 2
SDK_LOGGER = "openhands.sdk.conversation.impl.remote_conversation"


def _task() -> str:
    lines = [f"Run {STEPS} steps, one at a time."]
    lines += [f"RUN: echo step-{i} >> steps.log && echo out-step-{i}" for i in range(1, STEPS + 1)]
    lines.append("FINISH: all steps done")
    return "\n".join(lines)


class SdkSocketWatch(logging.Handler):
    """Counts the SDK's WebSocket connects (wrapping ``websockets.connect``) and collects its
    reconnect log records."""

    def __init__(self, monkeypatch) -> None:
        super().__init__(level=logging.DEBUG)
        import websockets

        self.connects: list[str] = []
        self.records: list[str] = []
        orig = websockets.connect

        def counting_connect(uri, *args, **kwargs):
            self.connects.append(str(uri))
            return orig(uri, *args, **kwargs)

        monkeypatch.setattr(websockets, "connect", counting_connect)
        logger = logging.getLogger(SDK_LOGGER)
        monkeypatch.setattr(logger, "level", logging.DEBUG)
        logger.addHandler(self)
        self._logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())

    def reconnects(self) -> list[str]:
        return [m for m in self.records if m.startswith(("ws_connect_retry", "ws_connection_closed"))]

    def detach(self) -> None:
        self._logger.removeHandler(self)


def _host_of(target, cid: str):
    """The agent-server (of the target's two) that holds the conversation."""
    for s in target.agent_servers:
        r = httpx.get(f"{s.base_url}/api/conversations/{cid}", headers={"X-Session-API-Key": s.api_key}, timeout=10)
        if r.status_code == 200:
            return s
    raise AssertionError(f"no agent-server of the target holds {cid}")


def _wait(what: str, cond, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _observations(events) -> int:
    return sum(1 for e in events if event_kind(e) == "ObservationEvent")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_downstream_killed_mid_run_is_invisible_to_clients(fresh_server_under_test, fake_llm, monkeypatch, stream):
    from openhands.sdk.conversation.state import ConversationExecutionStatus

    target = fresh_server_under_test
    llm_url = target.llm_url_for(fake_llm.base_url)
    watch = SdkSocketWatch(monkeypatch)
    rec = EventRecorder()
    conv, _ws = open_conversation(target, llm_url, f"ws-resume-{'sse' if stream else 'json'}", callbacks=[rec], stream=stream)
    cid = str(conv.id)
    rest = R.client(target.base_url, target.api_key)
    try:
        host = _host_of(target, cid)
        with SessionSocket(target.base_url, target.api_key, cid, after_seq=-1) as live:
            live.collect_until(lambda e: e.get("type") == "sync", timeout=15)
            conv.send_message(_task())
            conv.run(blocking=False)

            # Let some tool calls complete, then park the next LLM step and kill the host.
            _wait(f"{KILL_AFTER_STEPS} observations", lambda: _observations(rec.events) >= KILL_AFTER_STEPS, timeout=120)
            fake_llm.hold()
            fake_llm.wait_held(1, timeout=60)
            received_before_kill = len(rec.events)
            host.kill()
            fake_llm.release()  # the parked request answers into a dead socket
            t_kill = time.monotonic()
            host.restart_same_port()
            restart_seconds = time.monotonic() - t_kill

            # The restarted server recovered the interrupted run as `error`; nestor resumed
            # both sockets and replays what they missed.
            info = R.wait_for_status(rest, cid, {"error"}, timeout=60)
            assert info["execution_status"] == "error"
            _wait(
                "the SDK to receive every persisted event through its (same) socket",
                lambda: {e["id"] for e in R.all_events(rest, cid)} <= {str(e.id) for e in rec.events},
                timeout=60,
                interval=0.5,
            )
            assert len(rec.events) > received_before_kill

            # Run again: the agent goes on with the remaining steps.
            conv.run(timeout=180)
            assert conv.state.execution_status == ConversationExecutionStatus.FINISHED
            live.collect_until(lambda e: is_run_finished_durable(e, ("finished",)), timeout=60)
            live.drain(quiet=0.5, max_time=10)
            assert live.close_code is None

        rest_events = R.all_events(rest, cid)
        kinds = [f"{e['kind']}[{e.get('key') or ''}]" for e in rest_events]
        statuses = [e["value"] for e in rest_events if e.get("kind") == "ConversationStateUpdateEvent" and e.get("key") == "execution_status"]
        assert "error" in statuses and statuses[-1] == "finished", statuses

        # every step ran exactly once, across the two runs
        observations = [e for e in rest_events if e.get("kind") == "ObservationEvent" and e.get("tool_name") == "terminal"]
        assert len(observations) == STEPS, kinds
        r = R.download_workspace_file(rest, cid, "steps.log")
        assert r.status_code == 200 and r.text.split() == [f"step-{i}" for i in range(1, STEPS + 1)], r.text

        # nestor never closed the SDK's socket
        assert len(watch.connects) == 1, watch.connects
        assert not watch.reconnects(), watch.reconnects()

        # SDK callbacks == persisted log: same ids, in order, none twice, none missing
        assert_sdk_consistent(rec.events, list(conv.state.events), rest_events, strict_order=True)

        # raw session socket: one sync, seqs 0..N-1 across the kill, matching the log
        seqs = check_continuity(live.envelopes, after_seq=-1)
        check_against_log(live.envelopes, rest_events)
        assert seqs == list(range(len(rest_events))), summarize(live.envelopes)
        if stream:
            aborted = [e for e in live.envelopes if e.get("type") == "item_aborted"]
            started = {e["item_id"] for e in live.envelopes if e.get("type") == "item_started"}
            assert {e["item_id"] for e in aborted} <= started

        nestor_log = target.nestor.log_tail(200_000)
        assert "downstream socket resumed" in nestor_log
        logging.getLogger("e2e").info(
            "downstream restarted in %.1fs; %d events, %d session frames; SDK connects=%d",
            restart_seconds, len(rest_events), len(live.envelopes), len(watch.connects),
        )
    finally:
        watch.detach()
        start_closing([conv])
        R.delete_conversation(rest, cid)
        rest.close()
