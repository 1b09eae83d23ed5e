"""The session socket contract a proxy must keep: auth variants and close codes, live-only vs
resumed subscriptions. Conversations are created by plain REST (no SDK)."""

from __future__ import annotations

import uuid

import pytest
from websockets.exceptions import InvalidStatus

from harness import rest as R
from harness.session_ws import SessionSocket, check_against_log, check_continuity, is_run_finished_durable


def _create(rest, target, llm_url, label, text=None):
    body = {
        "agent": {"kind": "Agent", "llm": {"usage_id": "agent", "model": "openai/fake", "base_url": llm_url, "api_key": "x"},
                  "tools": [{"name": "terminal"}]},
        "workspace": {"kind": "LocalWorkspace", "working_dir": target.working_dir_for(label)},
        "autotitle": False,
        "max_iterations": 20,
    }
    if text:
        body["initial_message"] = {"role": "user", "content": [{"type": "text", "text": text}], "run": True}
    r = rest.post("/api/conversations", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_session_socket_auth_and_close_codes(server_under_test, fake_llm, llm_url, rest):
    base_url, api_key = server_under_test
    cid = _create(rest, server_under_test, llm_url, "socket-auth")
    try:
        for auth in ("header", "query", "frame"):
            with SessionSocket(base_url, api_key, cid, after_seq=-1, auth=auth) as s:
                sync = s.collect_until(lambda e: e.get("type") == "sync", timeout=10)
                assert sync["from_seq"] == -1
        # a wrong key in the header or query is refused before the upgrade (HTTP 403)
        for auth in ("header", "query"):
            with pytest.raises(InvalidStatus) as ei:
                SessionSocket(base_url, "wrong-key", cid, auth=auth).connect()
            assert ei.value.response.status_code == 403
        # a wrong first-frame key: accepted, then closed with 4001
        s = SessionSocket(base_url, "wrong-key", cid, auth="frame").connect()
        assert s.wait_until_closed(timeout=15) == 4001
        # unknown conversation: 4004
        s = SessionSocket(base_url, api_key, str(uuid.uuid4())).connect()
        assert s.wait_until_closed(timeout=15) == 4004
    finally:
        R.delete_conversation(rest, cid)


def test_session_socket_live_and_resume(server_under_test, fake_llm, llm_url, rest):
    base_url, api_key = server_under_test
    cid = _create(rest, server_under_test, llm_url, "socket-resume", text="RUN: echo one\nRUN: echo two")
    try:
        R.wait_for_status(rest, cid, {"finished"}, timeout=60)
        events = R.all_events(rest, cid)
        # live-only (no after_seq): sync{from_seq: null, through_seq: last}, no replay
        with SessionSocket(base_url, api_key, cid) as live:
            # The sync envelope first (however long the path to the downstream takes on a
            # loaded machine), then whatever else comes until a quiet half second.
            live.collect_until(lambda e: e.get("type") == "sync", timeout=20)
            live.drain(quiet=0.5, max_time=5)
        sync = live.envelopes[0]
        assert sync.get("type") == "sync" and sync.get("from_seq") is None, sync
        assert sync.get("through_seq") == len(events) - 1, sync
        assert not live.durable()
        check_continuity(live.envelopes, after_seq=None)
        # a second run, observed live while resumed from the end of the first
        mark = len(events) - 1
        with SessionSocket(base_url, api_key, cid, after_seq=mark) as s:
            s.collect_until(lambda e: e.get("type") == "sync", timeout=10)
            s.send_message("RUN: echo three")  # a client text frame is a user message + run
            s.collect_until(is_run_finished_durable, timeout=60)
            s.drain(quiet=0.5, max_time=10)
        events = R.all_events(rest, cid)
        seqs = check_continuity(s.envelopes, after_seq=mark)
        assert seqs == list(range(mark + 1, len(events)))
        check_against_log(s.envelopes, events)
        assert fake_llm.tool_calls("terminal")[-1]["arguments"]["command"] == "echo three"
    finally:
        R.delete_conversation(rest, cid)
