"""permessage-deflate on both legs of a proxied socket, against real agent-servers (target
nestor-existing).

nestor is configured with ``downstream_permessage_deflate = true``; the client is Python's
``websockets`` (what the SDK uses), which offers ``permessage-deflate`` by default. A real
run finishes; then an events socket with ``resend_mode=all`` must:

* have deflate accepted on the client leg (nestor's answer header),
* have deflate negotiated on the downstream leg with the agent-server (uvicorn + websockets;
  nestor logs the outcome of each downstream negotiation at debug),
* deliver exactly the conversation's event log, in order (compression on both legs changes
  no byte of what the client gets).
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from fake_llm import FakeLLM
from harness import rest as R
from harness.sdk import FAKE_MODEL
from harness.targets import TARGETS, TargetContext, selected_target_name

TARGET = selected_target_name()
RUN_TIMEOUT = 120.0

pytestmark = pytest.mark.skipif(
    TARGET != "nestor-existing",
    reason="starts its own nestor with downstream deflate: runs once, on NESTOR_E2E_TARGET=nestor-existing",
)


def store_llm_settings(rest: httpx.Client, llm_url: str) -> None:
    r = rest.patch("/api/settings", json={"agent_settings_diff": {"llm": {
        "model": FAKE_MODEL, "base_url": llm_url, "api_key": "fake-llm-key", "num_retries": 0, "timeout": 60,
    }}})
    assert r.status_code == 200, (r.status_code, r.text)


def create_run(rest: httpx.Client, working_dir: str, text: str) -> dict[str, Any]:
    body = {
        "workspace": {"kind": "LocalWorkspace", "working_dir": working_dir},
        "initial_message": {"role": "user", "content": [{"type": "text", "text": text}], "run": True},
    }
    r = rest.post("/api/conversations", json=body, timeout=RUN_TIMEOUT + 60)
    assert r.status_code in (200, 201), (r.status_code, r.text)
    return r.json()


def test_deflate_on_both_legs_delivers_the_log(tmp_path):
    ctx = TargetContext(tmp_dir=tmp_path / "target", nestor_config="\n[websocket]\ndownstream_permessage_deflate = true\n")
    (tmp_path / "target").mkdir()
    with TARGETS[TARGET](ctx) as target:
        fake = FakeLLM(extra_hosts=target.llm_listen_hosts).start()
        rest = R.client(target.base_url, target.api_key)
        cid = None
        try:
            store_llm_settings(rest, target.llm_url_for(fake.base_url))
            cid = create_run(rest, target.working_dir_for("deflate"), "RUN: echo deflate-ok\nFINISH: deflate done")["id"]
            done = R.wait_for_status(rest, cid, ["finished", "error", "stuck"], timeout=RUN_TIMEOUT)
            assert done["execution_status"] == "finished", done["execution_status"]

            url = target.base_url.replace("http://", "ws://", 1) + f"/sockets/events/{cid}?resend_mode=all"
            got: list[str] = []
            with connect(url, additional_headers={"X-Session-API-Key": target.api_key}, open_timeout=20,
                         close_timeout=5, max_size=None) as ws:
                answer = ws.response.headers.get("Sec-WebSocket-Extensions", "")
                assert answer.startswith("permessage-deflate"), answer
                assert "server_no_context_takeover" in answer, answer
                log_ids = [e["id"] for e in R.all_events(rest, cid)]
                deadline = time.monotonic() + 30
                while set(log_ids) - set(got) and time.monotonic() < deadline:
                    try:
                        frame = json.loads(ws.recv(timeout=5))
                    except TimeoutError:
                        break
                    if "id" in frame and "kind" in frame:
                        got.append(frame["id"])
            # Every logged event arrives once, in log order (nestor passes what the
            # downstream replays; deflate on both legs changes no byte of it).
            persisted = [i for i in got if i in set(log_ids)]
            assert persisted == log_ids, (len(persisted), len(log_ids))
            log = target.nestor.log_tail()
            assert "permessage-deflate negotiated" in log, log[-3000:]
            assert "declined by the downstream" not in log
            assert "Sec-WebSocket-Extensions answer is refused" not in log
        finally:
            if cid:
                try:
                    rest.delete(f"/api/conversations/{cid}", timeout=60)
                except httpx.HTTPError:
                    pass
            fake.stop()
