"""The docker provisioner's conversation life cycle under faults (target nestor-docker).

Each test drives the real SDK (or the REST API a client uses) through nestor while one
agent-server container per conversation runs the real agent-server image, and checks what a
client must never notice, or what must never be left behind:

* ``test_docker_kill_mid_run``: ``docker kill`` of a conversation's container while its run
  is parked in the fake LLM. nestor keeps the SDK's socket open (one connect, no reconnect
  logs), starts the container again from its volume, the agent-server recovers the run as
  ``error`` and a second ``run()`` finishes it; the SDK got every persisted event once.
* ``test_nestor_kill9_with_three_live_conversations``: ``kill -9`` of nestor while three runs
  are parked mid-step, restart on the same port: all three are reachable again at once,
  their containers were not restarted (same container, same ``StartedAt``, no restart), the
  SDK clients reconnect by themselves and the runs finish; every client's events equal its
  conversation's log, none twice.
* ``test_idle_stop_then_resume``: with ``[lifecycle] idle_stop_secs``, a conversation nobody
  uses is stopped (container exited, volume kept); attaching a new SDK client starts it again
  transparently; the log has the events of both runs, each once, and the SDK's view is the
  log.
* ``test_create_delete_cycles_with_nestor_killed``: 20 create/delete cycles (client-chosen
  ids, so a client that lost an answer still knows what to delete) with ``kill -9`` of nestor
  at random points (seeded; ``NESTOR_E2E_SEED`` replays); after a restart and the
  reconciliation sweep no conversation container or volume of this nestor is left.
* ``test_processes_are_isolated_between_conversations``: three conversations each start a
  marker process, then each lists processes (``ps -eo args``): a conversation sees its own
  marker and none of the others'.

Destructive tests run on private targets (their own nestor and instance id); every wait is
bounded and each test has its own timeout.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import random
import subprocess
import threading
import time
import uuid

import httpx
import pytest

from fake_llm import FakeLLM
from harness import rest as R
from harness.events import EventRecorder, assert_sdk_consistent, compare_events, event_kind
from harness.sdk import make_agent, make_workspace, open_conversation, start_closing
from harness.targets import (
    TARGETS,
    TargetContext,
    docker_bridge_gateway,
    docker_container_of,
    selected_target_name,
)
from test_ws_resume import SdkSocketWatch

pytestmark = pytest.mark.skipif(
    selected_target_name() != "nestor-docker",
    reason="kills containers and nestor: needs NESTOR_E2E_TARGET=nestor-docker",
)

log = logging.getLogger("e2e.docker")


# ----------------------------------------------------------------------------- helpers

def _docker(*args: str, timeout: float = 60) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout.strip()


def _wait(what: str, cond, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _steps_task(prefix: str, steps: int) -> str:
    lines = [f"Run {steps} steps, one at a time."]
    lines += [f"RUN: echo {prefix}-{i} >> {prefix}.log && echo out-{prefix}-{i}" for i in range(1, steps + 1)]
    lines.append(f"FINISH: {prefix} done")
    return "\n".join(lines)


def _terminal_observations(events) -> list:
    return [e for e in events if event_kind(e) == "ObservationEvent" and (e.get("tool_name") if isinstance(e, dict) else getattr(e, "tool_name", None)) == "terminal"]


def _container(target, cid: str) -> str:
    c = docker_container_of(target.extra["instance"], cid)
    assert c, f"no container for conversation {cid}"
    return c


def _container_state(container: str) -> dict:
    out = _docker("inspect", "--format",
                  "{{.Id}}|{{.State.Status}}|{{.State.StartedAt}}|{{.RestartCount}}", container)
    cid, status, started, restarts = out.split("|")
    return {"id": cid, "status": status, "started_at": started, "restarts": int(restarts)}


def _labelled(instance: str, kind: str) -> list[str]:
    """Conversation containers (``kind="ps"``) or volumes (``"volume"``) of nestor instance
    ``instance``; the home container (host-global routes) is not a conversation's."""
    if kind == "ps":
        out = _docker("ps", "-a", "--filter", f"label=org.nestor.instance={instance}",
                      "--format", '{{.Names}} {{.Label "org.nestor.conversation"}}')
    else:
        out = _docker("volume", "ls", "--filter", f"label=org.nestor.instance={instance}",
                      "--format", '{{.Name}} {{.Label "org.nestor.conversation"}}')
    return [line.split()[0] for line in out.splitlines() if line.strip() and not line.strip().endswith(" home")]


def _private_target(tmp_path, *, docker: str = "", extra: str = ""):
    """A nestor-docker target of one test, with ``docker`` lines added to its
    ``[provisioner.docker]`` table and ``extra`` TOML tables. (The target appends
    ``nestor_config`` right after that table's own keys when no downstream env is set, so
    leading bare keys land in it.)"""
    return TARGETS["nestor-docker"](TargetContext(tmp_dir=tmp_path, nestor_config=docker + "\n" + extra))


# ------------------------------------------------------------------- a. docker kill

@pytest.mark.timeout(200)
def test_docker_kill_mid_run(fresh_server_under_test, fake_llm, monkeypatch):
    from openhands.sdk.conversation.state import ConversationExecutionStatus

    target = fresh_server_under_test
    steps = 5
    watch = SdkSocketWatch(monkeypatch)
    rec = EventRecorder()
    conv, _ws = open_conversation(target, target.llm_url_for(fake_llm.base_url), "docker-kill", callbacks=[rec])
    cid = str(conv.id)
    rest = R.client(target.base_url, target.api_key)
    try:
        before = _container_state(_container(target, cid))
        conv.send_message(_steps_task("k", steps))
        conv.run(blocking=False)
        _wait("2 observations", lambda: len(_terminal_observations(rec.events)) >= 2, timeout=90)
        fake_llm.hold()
        fake_llm.wait_held(1, timeout=60)
        _docker("kill", before["id"])
        fake_llm.release()  # the parked step answers into a dead container
        t_kill = time.monotonic()

        # nestor starts it again (from its volume) when the socket redials; the agent-server
        # recovers the interrupted run as `error`.
        try:
            R.wait_for_status(rest, cid, {"error"}, timeout=90)
        except TimeoutError as e:
            lines = [ln for ln in target.downstream_log(cid).splitlines() if "HTTP/1.1" not in ln and "h11_impl" not in ln and ln.strip()]
            raise AssertionError(f"{e}\n--- agent-server log (no access lines) ---\n" + "\n".join(lines[-80:])) from e
        recovered = time.monotonic() - t_kill
        after = _container_state(_container(target, cid))
        assert after["status"] == "running" and after["started_at"] != before["started_at"], (before, after)
        _wait("the SDK to receive every persisted event through its (same) socket",
              lambda: {e["id"] for e in R.all_events(rest, cid)} <= {str(e.id) for e in rec.events},
              timeout=60, interval=0.5)

        conv.run(timeout=120)
        assert conv.state.execution_status == ConversationExecutionStatus.FINISHED
        rest_events = R.all_events(rest, cid)
        statuses = [e["value"] for e in rest_events if e.get("kind") == "ConversationStateUpdateEvent" and e.get("key") == "execution_status"]
        assert "error" in statuses and statuses[-1] == "finished", statuses
        assert len(_terminal_observations(rest_events)) == steps
        r = R.download_workspace_file(rest, cid, "k.log")
        assert r.status_code == 200 and r.text.split() == [f"k-{i}" for i in range(1, steps + 1)], r.text

        # the client's socket survived: one connect, no reconnect
        assert len(watch.connects) == 1, watch.connects
        assert not watch.reconnects(), watch.reconnects()
        _wait("the last events to reach the SDK",
              lambda: {e["id"] for e in rest_events} <= {str(e.id) for e in rec.events}, timeout=30)
        assert_sdk_consistent(rec.events, list(conv.state.events), rest_events, strict_order=True)
        assert "downstream socket resumed" in target.nestor.log_tail(200_000)
        metrics = httpx.get(f"{target.base_url}/metrics", timeout=10).text
        assert "nestor_ws_resumed_total" in metrics
        log.info("container killed; run recovered in %.1fs; %d events", recovered, len(rest_events))
    finally:
        watch.detach()
        start_closing([conv])
        R.delete_conversation(rest, cid)
        rest.close()


# ------------------------------------------------------------ b. kill -9 of nestor

@pytest.mark.timeout(240)
def test_nestor_kill9_with_three_live_conversations(fresh_server_under_test, fake_llm, monkeypatch):
    target = fresh_server_under_test
    n = target.nestor
    llm_url = target.llm_url_for(fake_llm.base_url)
    steps = 3
    watch = SdkSocketWatch(monkeypatch)
    recs = [EventRecorder() for _ in range(3)]
    convs = []
    rest = R.client(target.base_url, target.api_key)
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            convs = list(pool.map(lambda i: open_conversation(target, llm_url, f"k9-{i}", callbacks=[recs[i]])[0], range(3)))
        ids = [str(c.id) for c in convs]
        fake_llm.hold()
        for i, c in enumerate(convs):
            c.send_message(_steps_task(f"c{i}", steps))
            c.run(blocking=False)
        fake_llm.wait_held(3, timeout=90)  # all three mid-run
        before = {cid: _container_state(_container(target, cid)) for cid in ids}

        n.kill()
        t0 = time.monotonic()
        n.start()
        started = time.monotonic() - t0
        # reachable again at once: re-adopted, not restarted
        for cid in ids:
            r = rest.get(f"/api/conversations/{cid}")
            assert r.status_code == 200, (cid, r.status_code, r.text)
            assert r.json()["execution_status"] == "running", r.json()["execution_status"]
        reachable = time.monotonic() - t0
        fake_llm.release()

        for cid in ids:
            R.wait_for_status(rest, cid, {"finished"}, timeout=120)
        for cid in ids:
            after = _container_state(_container(target, cid))
            b = before[cid]
            assert (after["id"], after["started_at"], after["restarts"]) == (b["id"], b["started_at"], b["restarts"]), (b, after)
            assert after["status"] == "running"

        # the SDK clients reconnected by themselves and got every event once
        for i, cid in enumerate(ids):
            rest_events = R.all_events(rest, cid)
            _wait(f"SDK client {i} to catch up after reconnecting",
                  lambda: {e["id"] for e in rest_events} <= {str(e.id) for e in recs[i].events}, timeout=60, interval=0.5)
            assert_sdk_consistent(recs[i].events, list(convs[i].state.events), rest_events, strict_order=False)
            assert len(_terminal_observations(rest_events)) == steps
            assert convs[i].state.execution_status.value == "finished"
        assert len(watch.connects) >= 6, f"the SDK clients did not reconnect: {watch.connects}"
        log.info("nestor restarted in %.2fs; 3 conversations reachable %.2fs after the kill", started, reachable)
    finally:
        fake_llm.release()
        watch.detach()
        start_closing(convs)
        for c in convs:
            R.delete_conversation(rest, str(c.id))
        rest.close()


# -------------------------------------------------------- c. idle stop, then resume

@pytest.mark.timeout(240)
def test_idle_stop_then_resume(tmp_path):
    gateway = docker_bridge_gateway()
    with FakeLLM(extra_hosts=[gateway]) as fake, \
            _private_target(tmp_path, extra="[lifecycle]\nidle_stop_secs = 3.0\n") as target:
        llm_url = target.llm_url_for(fake.base_url)
        rest = R.client(target.base_url, target.api_key)
        rec1, rec2 = EventRecorder(), EventRecorder()
        conv1, ws = open_conversation(target, llm_url, "idle", callbacks=[rec1])
        cid = str(conv1.id)
        conv2 = None
        try:
            conv1.send_message(_steps_task("first", 2))
            conv1.run(timeout=120)
            first = _container_state(_container(target, cid))
            # The client goes away. (SDK quirk, see harness/sdk.py start_closing: close() leaves
            # the socket open until the next frame arrives; a message without a run is one.)
            closing = start_closing([conv1])
            r = rest.post(f"/api/conversations/{cid}/events",
                          json={"role": "user", "content": [{"type": "text", "text": "bye for now"}], "run": False})
            assert r.status_code == 200, r.text
            closing(timeout=10)

            _wait("the idle container to be stopped",
                  lambda: _container_state(_container(target, cid))["status"] == "exited", timeout=60, interval=0.5)
            stopped = R.search_conversations_all_pages(rest, limit=10)[0]
            assert any(i["id"] == cid for i in stopped), "a stopped conversation is still listed"

            # A new client attaches: the container starts again, the client just waits.
            t0 = time.monotonic()
            conv2 = type(conv1)(agent=make_agent(llm_url), workspace=make_workspace(target.base_url, target.api_key, ws.working_dir),
                                conversation_id=uuid.UUID(cid), callbacks=[rec2], visualizer=None, delete_on_close=False)
            resumed = time.monotonic() - t0
            second = _container_state(_container(target, cid))
            assert second["status"] == "running" and second["started_at"] != first["started_at"], (first, second)
            conv2.send_message(_steps_task("second", 2))
            conv2.run(timeout=120)
            assert conv2.state.execution_status.value == "finished"

            rest_events = R.all_events(rest, cid)
            ids = [e["id"] for e in rest_events]
            assert len(ids) == len(set(ids)), "an event is in the log twice"
            outs = [str(e["observation"]) for e in _terminal_observations(rest_events)]
            assert len(outs) == 4 and sum("out-first-" in o for o in outs) == 2 and sum("out-second-" in o for o in outs) == 2, outs
            r = R.download_workspace_file(rest, cid, "first.log")
            assert r.status_code == 200 and r.text.split() == ["first-1", "first-2"], r.text
            # Both clients together: nothing twice; the resumed client's view is the whole log.
            _wait("the last events to reach the SDK", lambda: set(ids[-3:]) <= {str(e.id) for e in rec2.events}, timeout=30)
            compare_events(rec1.events + rec2.events, rest_events).assert_ok(strict_order=False, require_complete=False)
            compare_events(list(conv2.state.events), rest_events).assert_ok(strict_order=False)
            log.info("idle container resumed in %.1fs", resumed)
        finally:
            start_closing([c for c in (conv1, conv2) if c is not None])
            R.delete_conversation(rest, cid)
            rest.close()


# ------------------------------------------- d. create/delete cycles, nestor killed

def _create_body(cid: str, target, llm_url: str) -> dict:
    return {
        "conversation_id": cid,
        "agent": {"kind": "Agent", "llm": {"usage_id": "agent", "model": "openai/fake", "base_url": llm_url, "api_key": "x"},
                  "tools": [{"name": "terminal"}]},
        "workspace": {"kind": "LocalWorkspace", "working_dir": target.working_dir_for("cycle")},
        "autotitle": False,
    }


@pytest.mark.timeout(420)
def test_create_delete_cycles_with_nestor_killed(tmp_path):
    cycles = int(os.environ.get("NESTOR_E2E_CYCLES", "20"))
    seed = int(os.environ.get("NESTOR_E2E_SEED", str(random.randrange(1, 1 << 30))))
    rng = random.Random(seed)
    print(f"\nseed {seed} (NESTOR_E2E_SEED replays)")
    docker_cfg = "sweep_interval_secs = 2.0\nprovisioning_grace_secs = 5.0\n"
    with _private_target(tmp_path, docker=docker_cfg) as target:
        n = target.nestor
        instance = target.extra["instance"]
        llm_url = target.llm_url_for("http://127.0.0.1:9/v1")  # never called: no run starts
        created: list[str] = []
        kills = 0
        t_start = time.monotonic()
        for i in range(cycles):
            cid = str(uuid.uuid4())
            created.append(cid)
            done = threading.Event()

            def cycle() -> None:
                try:
                    with R.client(target.base_url, target.api_key, timeout=60) as c:
                        r = c.post("/api/conversations", json=_create_body(cid, target, llm_url))
                        if r.status_code not in (200, 201):
                            return
                        c.delete(f"/api/conversations/{cid}")
                except httpx.HTTPError:
                    pass  # nestor was killed under the request
                finally:
                    done.set()

            t = threading.Thread(target=cycle, daemon=True, name=f"cycle-{i}")
            t.start()
            if rng.random() < 0.5:
                # anywhere in the cycle: before the container exists, while it boots, during
                # the forwarded create, during the delete
                done.wait(timeout=rng.uniform(0.0, 6.0))
                n.kill()
                kills += 1
                t.join(timeout=70)
                n.start()
            else:
                t.join(timeout=70)
            assert not t.is_alive(), f"cycle {i} did not end"
        # A client that lost an answer deletes again what it asked for (404: never created).
        with R.client(target.base_url, target.api_key, timeout=60) as c:
            for cid in created:
                r = c.delete(f"/api/conversations/{cid}")
                assert r.status_code in (200, 404), (cid, r.status_code, r.text)
        # One more crash and restart, then the sweep removes whatever is half-created.
        n.kill()
        n.start()
        t_sweep = time.monotonic()
        left = (_labelled(instance, "ps"), _labelled(instance, "volume"))
        try:
            _wait("no conversation container or volume left",
                  lambda: not _labelled(instance, "ps") and not _labelled(instance, "volume"), timeout=60, interval=1.0)
        except TimeoutError:
            raise AssertionError(f"left after the sweep: containers {_labelled(instance, 'ps')}, "
                                 f"volumes {_labelled(instance, 'volume')}\n--- nestor log ---\n{n.log_tail(6000)}")
        print(f"{cycles} cycles with {kills} kills in {t_sweep - t_start:.0f}s; {len(left[0])} containers and "
              f"{len(left[1])} volumes left at the last restart, swept in {time.monotonic() - t_sweep:.1f}s")


# ------------------------------------------------------------ e. process isolation

# `ps -eo args`; the agent-server image (debootstrap minbase) has no procps, so the same
# listing from /proc where `ps` is missing.
PS = ("if command -v ps >/dev/null; then ps -eo args; "
      "else for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done; fi")


@pytest.mark.timeout(200)
def test_processes_are_isolated_between_conversations(server_under_test, fake_llm, llm_url, rest):
    """Each conversation starts a marker process (``sleep 300N``), and only once all three
    run, each lists the processes it can see."""
    n = 3
    recs = [EventRecorder() for _ in range(n)]
    convs = []
    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            convs = list(pool.map(lambda i: open_conversation(server_under_test, llm_url, f"iso-{i}", callbacks=[recs[i]])[0], range(n)))
        fake_llm.hold()
        for i, c in enumerate(convs):
            c.send_message(f"Isolation {i}.\nRUN: (sleep 300{i} >/dev/null 2>&1 &) ; echo started-{i}\nRUN: {PS}\nFINISH: listed\n")
            c.run(blocking=False)
        fake_llm.wait_held(n, timeout=90)  # every first step (the marker) is parked
        fake_llm.release()
        fake_llm.hold()
        fake_llm.wait_held(n, timeout=60)  # every marker runs; every `ps` is parked
        fake_llm.release()
        ids = [str(c.id) for c in convs]
        for cid in ids:
            R.wait_for_status(rest, cid, {"finished"}, timeout=90)
        for i, cid in enumerate(ids):
            outs = [str(e["observation"]) for e in _terminal_observations(R.all_events(rest, cid))]
            assert len(outs) == 2, outs
            ps = outs[1]
            assert f"sleep 300{i}" in ps, f"conversation {i} does not see its own marker: {ps}"
            others = [j for j in range(n) if j != i and f"sleep 300{j}" in ps]
            assert not others, f"conversation {i} sees the processes of conversations {others}: {ps}"
    finally:
        fake_llm.release()
        start_closing(convs)
        for c in convs:
            R.delete_conversation(rest, str(c.id))
