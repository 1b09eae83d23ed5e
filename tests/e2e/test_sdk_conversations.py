"""Three conversations created and run concurrently through the real SDK.

Scenario: 3 ``RemoteConversation``s (real SDK, ``RemoteWorkspace``) each run one bash command
writing a distinct marker file in its own working dir; all three runs are provably in flight
at the same time (the fake LLM parks their first agent step until all three arrived); each
reaches ``finished``; the conversation search (``limit=1``, following ``next_page_id``) lists
all three; each marker exists only in its own conversation's workspace (checked through the
conversation-scoped file route, so it holds wherever conversations run); each conversation
is deleted and is 404 afterwards.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time


from harness import rest as R
from harness.events import EventRecorder, compare_events
from harness.sdk import close_all, open_conversation, start_closing

N = 3
RUN_TIMEOUT = 120.0


def _task(n: int) -> str:
    return (
        f"Please write marker {n}.\n"
        f"RUN: echo conv-{n} > marker-{n}.txt && cat marker-{n}.txt\n"
        f"FINISH: wrote marker {n}\n"
    )


def test_three_concurrent_sdk_conversations(server_under_test, fake_llm, llm_url, rest):
    from openhands.sdk.conversation.state import ConversationExecutionStatus

    recorders = {n: EventRecorder() for n in range(1, N + 1)}
    convs: dict[int, object] = {}
    created = threading.Barrier(N + 1, timeout=90)

    def create_and_run(n: int) -> None:
        try:
            conv, _ws = open_conversation(server_under_test, llm_url, f"conv-{n}", callbacks=[recorders[n]])
        except BaseException:
            created.abort()
            raise
        convs[n] = conv
        created.wait()  # all three exist before any run starts
        conv.send_message(_task(n))
        conv.run(timeout=RUN_TIMEOUT)

    t_start = time.monotonic()
    fake_llm.hold()  # park agent steps so all three runs must be in flight at once
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=N, thread_name_prefix="conv")
    futures = [pool.submit(create_and_run, n) for n in range(1, N + 1)]
    try:
        created.wait()
        t_created = time.monotonic()
        fake_llm.wait_held(N, timeout=60)  # every conversation is mid-run concurrently
        fake_llm.release()
        for f in futures:
            f.result(timeout=RUN_TIMEOUT + 30)
        t_done = time.monotonic()
        print(f"\ncreate x{N}: {t_created - t_start:.2f}s, concurrent runs: {t_done - t_created:.2f}s")

        ids = {n: str(convs[n].id) for n in convs}
        assert len(set(ids.values())) == N

        # 1. every conversation finished: SDK state and REST agree
        for n, conv in convs.items():
            assert conv.state.execution_status == ConversationExecutionStatus.FINISHED
            info = R.conversation_info(rest, ids[n])
            assert info["execution_status"] == "finished", info["execution_status"]
            if server_under_test.keeps_working_dir:
                assert info["workspace"]["working_dir"] == server_under_test.working_dir_for(f"conv-{n}")

        # each conversation's LLM traffic was its own: one terminal call + finish per conversation
        cmds = sorted(c["arguments"]["command"] for c in fake_llm.tool_calls("terminal"))
        assert cmds == sorted(f"echo conv-{n} > marker-{n}.txt && cat marker-{n}.txt" for n in convs)
        assert len(fake_llm.tool_calls("finish")) == N

        # SDK callbacks of each conversation carried exactly that conversation's persisted log
        for n, conv in convs.items():
            events = R.all_events(rest, ids[n])
            compare_events(recorders[n].events, events).assert_ok()
            outputs = [
                e for e in events
                if e.get("kind") == "ObservationEvent" and e.get("tool_name") == "terminal"
            ]
            assert len(outputs) == 1
            assert f"conv-{n}" in str(outputs[0]["observation"]), outputs[0]["observation"]

        # 2. search, one item per page, following next_page_id, lists all three exactly once
        items, sizes = R.search_conversations_all_pages(rest, limit=1)
        listed = [i["id"] for i in items]
        assert set(ids.values()) <= set(listed), (ids, listed)
        assert all(s == 1 for s in sizes[:-1]) and sizes[-1] <= 1, sizes
        assert len(listed) == R.count_conversations(rest)
        for i in items:
            if i["id"] in ids.values():
                assert i["execution_status"] == "finished"

        # 3. each marker is in its own workspace only (read through the conversation-scoped API)
        for n in convs:
            r = R.download_workspace_file(rest, ids[n], f"marker-{n}.txt")
            assert r.status_code == 200, (r.status_code, r.text)
            assert r.content.decode().strip() == f"conv-{n}"
            for m in convs:
                if m != n:
                    r = R.download_workspace_file(rest, ids[n], f"marker-{m}.txt")
                    assert r.status_code == 404, f"marker-{m} visible in conversation {n}'s workspace: {r.status_code}"
    except BaseException as e:
        fake_llm.release()
        pool.shutdown(wait=True, cancel_futures=True)
        close_all(convs.values())
        worker_errors = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception()]
        if isinstance(e, (threading.BrokenBarrierError, TimeoutError)) and worker_errors:
            raise worker_errors[0] from e  # the root cause, not the barrier/wait symptom
        raise
    pool.shutdown(wait=True)

    # stop the SDK clients (their websocket threads), as RemoteConversation.close() does
    t_del = time.monotonic()
    start_closing(convs.values())  # not joined: see start_closing

    # 4. delete each; afterwards GET is 404, a second DELETE is 404, search no longer lists it
    own_running = server_under_test.own_downstream_running
    for n in convs:
        if own_running is not None:
            # process / docker provisioner: the conversation has its own agent-server
            assert own_running(ids[n]), f"no agent-server of its own for {ids[n]}"
        r = R.delete_conversation(rest, ids[n])
        assert r.status_code == 200, (r.status_code, r.text)
        assert r.json().get("success") is True
        assert R.get_conversation(rest, ids[n]).status_code == 404
        assert R.delete_conversation(rest, ids[n]).status_code == 404
        assert rest.get(f"/api/conversations/{ids[n]}/events/search").status_code == 404
        if own_running is not None:
            assert not own_running(ids[n]), f"agent-server of {ids[n]} still running after delete"
    items, _ = R.search_conversations_all_pages(rest, limit=1)
    assert not (set(ids.values()) & {i["id"] for i in items})
    batch = rest.get("/api/conversations", params=[("ids", i) for i in ids.values()])
    assert batch.status_code == 200 and batch.json() == [None] * N
    print(f"close+delete: {time.monotonic() - t_del:.2f}s")
