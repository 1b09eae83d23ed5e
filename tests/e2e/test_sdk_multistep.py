"""One conversation with five sequential tool calls, observed three ways at once.

* the real SDK (``RemoteConversation`` callbacks: what ``/sockets/events`` delivered);
* a raw ``/sockets/session/{id}?after_seq=-1`` socket opened before the run;
* ``GET /api/conversations/{id}/events/search`` afterwards (the persisted log).

The persisted events the SDK received must equal the REST log (same ids, same order, none
twice); every non-persisted event it got must be a transient kind (``full_state`` snapshots,
token deltas). The session socket's durable seqs must be 0..N-1 with no gap or repeat and
match the log by index; a second session socket resuming from the middle (``after_seq=k``)
must replay exactly k+1..N-1.
"""

from __future__ import annotations

import pytest

from harness import rest as R
from harness.events import EventRecorder, assert_sdk_consistent
from harness.sdk import open_conversation, start_closing
from harness.session_ws import SessionSocket, check_against_log, check_continuity, is_run_finished_durable, summarize

STEPS = 5


def _task() -> str:
    lines = ["Run five steps, one at a time."]
    lines += [f"RUN: echo step-{i} >> steps.log && echo out-step-{i}" for i in range(1, STEPS + 1)]
    lines.append("FINISH: five steps done")
    return "\n".join(lines)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_multistep_events_match_rest(server_under_test, fake_llm, llm_url, rest, stream):
    from openhands.sdk.conversation.state import ConversationExecutionStatus

    rec = EventRecorder()
    tokens: list = []
    conv, _ws = open_conversation(
        server_under_test, llm_url, f"multistep-{'sse' if stream else 'json'}",
        callbacks=[rec], stream=stream, token_callbacks=[tokens.append] if stream else None,
    )
    cid = str(conv.id)
    try:
        base_url, api_key = server_under_test
        with SessionSocket(base_url, api_key, cid, after_seq=-1) as live:
            live.collect_until(lambda e: e.get("type") == "sync", timeout=15)
            conv.send_message(_task())
            conv.run(timeout=120)
            assert conv.state.execution_status == ConversationExecutionStatus.FINISHED
            live.collect_until(is_run_finished_durable, timeout=30)
            live.drain(quiet=0.5, max_time=10)

        rest_events = R.all_events(rest, cid)

        # the scripted LLM conversation really had 5 tool calls, in order, then finish
        cmds = [c["arguments"]["command"] for c in fake_llm.tool_calls("terminal")]
        assert cmds == [f"echo step-{i} >> steps.log && echo out-step-{i}" for i in range(1, STEPS + 1)]
        assert len(fake_llm.tool_calls("finish")) == 1
        assert all(bool(r.body.get("stream")) == stream for r in fake_llm.agent_requests())
        observations = [e for e in rest_events if e.get("kind") == "ObservationEvent" and e.get("tool_name") == "terminal"]
        assert len(observations) == STEPS
        for i, obs in enumerate(observations, start=1):
            assert f"out-step-{i}" in str(obs["observation"])
        r = R.download_workspace_file(rest, cid, "steps.log")
        assert r.status_code == 200 and r.text.split() == [f"step-{i}" for i in range(1, STEPS + 1)]

        # SDK callbacks == persisted log (+ only transient extras); the SDK's own event cache
        # (REST sync + socket; timestamp-sorted, keeps full_state snapshots) agrees too
        cmp = assert_sdk_consistent(rec.events, list(conv.state.events), rest_events, strict_order=True)
        assert cmp.transient_count >= 2  # connect-time and post-run full_state snapshots
        if stream:
            assert tokens, "stream=True but the SDK got no token callbacks"
            assert any(type(e).__name__ == "StreamingDeltaEvent" for e in rec.events)

        # raw session socket: continuous seqs 0..N-1 matching the log by index
        seqs = check_continuity(live.envelopes, after_seq=-1)
        check_against_log(live.envelopes, rest_events)
        assert seqs == list(range(len(rest_events))), summarize(live.envelopes)
        if stream:
            kinds = {e.get("type") for e in live.envelopes}
            assert {"item_started", "delta"} <= kinds, kinds

        # resume from the middle: exactly the rest, nothing twice
        k = len(rest_events) // 2
        last = len(rest_events) - 1
        with SessionSocket(base_url, api_key, cid, after_seq=k, auth="frame") as resumed:
            resumed.collect_until(lambda e: e.get("type") == "durable" and e["seq"] == last, timeout=15)
            resumed.drain(quiet=0.3, max_time=5)
        assert check_continuity(resumed.envelopes, after_seq=k) == list(range(k + 1, last + 1))
        check_against_log(resumed.envelopes, rest_events)
    finally:
        start_closing([conv])  # not joined: see start_closing
        R.delete_conversation(rest, cid)
