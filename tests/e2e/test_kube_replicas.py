"""The kubernetes provisioner end to end with the real SDK and two nestor replicas
(``NESTOR_E2E_TARGET=nestor-kubernetes`` only; scripts/test.sh stage ``e2e-kube``).

``test_three_conversations_two_replicas_kill9_and_delete``, on a private target:

* 3 conversations are created and run concurrently through replica A with the real SDK; each
  is in a pod of its own (the pods' ``nestor.dev/conversation`` labels, read from the API
  server);
* replica B (same cluster, namespace and instance; own state, no shared memory) is started and
  replica A is killed with ``kill -9`` while all three runs are parked mid-step. The runs
  finish; B serves all three conversations created through A (status, events, files) and
  runs a second message on one of them;
* A restarts on the same port: the SDK clients reconnect by themselves and hold every event of
  the log exactly once (nothing lost by the kill);
* each conversation is deleted through B: afterwards the namespace holds no pod, Secret or
  PVC of the instance.

With ``NESTOR_E2E_KUBE_POOL_MIN_IDLE`` set the target runs ``kind = "pool"`` over kubernetes:
the same test then also runs conversations on warm pods claimed through A, served by B.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import subprocess
import time

import pytest

from harness import rest as R
from harness.events import EventRecorder, assert_sdk_consistent, event_kind
from harness.sdk import open_conversation, start_closing
from harness.targets import selected_target_name

pytestmark = pytest.mark.skipif(
    selected_target_name() != "nestor-kubernetes",
    reason="pods and replicas: needs NESTOR_E2E_TARGET=nestor-kubernetes",
)

log = logging.getLogger("e2e.kube")
N = 3
STEPS = 2


def _kubectl(target, *args: str, timeout: float = 60) -> dict:
    r = subprocess.run(["kubectl", "--kubeconfig", target.extra["admin_kubeconfig"], "-n", target.extra["namespace"],
                        *args, "-o", "json"], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {r.stderr.strip()}")
    return json.loads(r.stdout)


def _objects(target) -> dict[str, list[dict]]:
    """The instance's pods, Secrets and PVCs (not being deleted)."""
    sel = "app.kubernetes.io/managed-by=nestor"
    out = {}
    for kind in ("pods", "secrets", "persistentvolumeclaims"):
        items = _kubectl(target, "get", kind, "-l", sel)["items"]
        out[kind] = [i for i in items if not i["metadata"].get("deletionTimestamp")]
    return out


def _wait(what: str, cond, timeout: float, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _task(prefix: str) -> str:
    lines = [f"Run {STEPS} steps, one at a time."]
    lines += [f"RUN: echo {prefix}-{i} >> {prefix}.log && echo out-{prefix}-{i}" for i in range(1, STEPS + 1)]
    lines.append(f"FINISH: {prefix} done")
    return "\n".join(lines)


def _terminal(events) -> list:
    return [e for e in events if event_kind(e) == "ObservationEvent" and e.get("tool_name") == "terminal"]


@pytest.mark.timeout(420)
def test_three_conversations_two_replicas_kill9_and_delete(fresh_server_under_test, fake_llm, tmp_path):
    target = fresh_server_under_test
    a = target.nestor
    llm_url = target.llm_url_for(fake_llm.base_url)
    rest_a = R.client(target.base_url, target.api_key)
    recs = [EventRecorder() for _ in range(N)]
    convs = []
    b = None
    warm = target.extra.get("pool_min_idle", 0)
    try:
        if warm:
            # Creates claim warm pods once the pool is filled.
            def ready_warm():
                pods = [p for p in _objects(target)["pods"] if "nestor.dev/warm" in p["metadata"]["labels"]]
                return sum(1 for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                                  for c in p.get("status", {}).get("conditions", []))) >= min(warm, N)
            t_fill = time.monotonic()
            _wait("the warm pool to fill", ready_warm, timeout=240, interval=1)
            time.sleep(2)  # the replica's watch sees them Ready too
            log.info("warm pool filled in %.1fs", time.monotonic() - t_fill)
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(N) as pool:
            convs = list(pool.map(lambda i: open_conversation(target, llm_url, f"kr-{i}", callbacks=[recs[i]])[0], range(N)))
        ids = [str(c.id) for c in convs]
        log.info("3 conversations created through replica A in %.1fs", time.monotonic() - t0)

        # Each in a pod of its own. A claimed warm pod is relabelled to its conversation in the
        # background right after the claim (its Secret is the record meanwhile): wait for it.
        def labelled():
            by_conv = {}
            for p in _objects(target)["pods"]:
                c = p["metadata"]["labels"].get("nestor.dev/conversation")
                if c:
                    by_conv.setdefault(c, []).append(p["metadata"]["name"])
            return by_conv if all(cid.replace("-", "") in by_conv for cid in ids) else None

        by_conv = _wait("every conversation's pod labelled", labelled, timeout=30)
        for cid in ids:
            hexid = cid.replace("-", "")
            assert len(by_conv.get(hexid, [])) == 1, (cid, by_conv)
        assert len({by_conv[cid.replace("-", "")][0] for cid in ids}) == N
        if warm >= N:
            assert all("-warm-" in by_conv[cid.replace("-", "")][0] for cid in ids), f"not all claimed warm: {by_conv}"

        # Replica B joins; A dies with every run parked mid-step.
        b = target.extra["start_replica"](tmp_path / "replica-b")
        rest_b = R.client(b.base_url, target.api_key)
        fake_llm.hold()
        for i, c in enumerate(convs):
            c.send_message(_task(f"c{i}"))
            c.run(blocking=False)
        fake_llm.wait_held(N, timeout=90)
        a.kill()
        t_kill = time.monotonic()
        fake_llm.release()

        # B serves every conversation created through A; the runs finish.
        for cid in ids:
            R.wait_for_status(rest_b, cid, {"finished"}, timeout=120)
        log.info("runs finished, observed through replica B, %.1fs after the kill", time.monotonic() - t_kill)
        for i, cid in enumerate(ids):
            events = R.all_events(rest_b, cid)
            assert len(_terminal(events)) == STEPS, [event_kind(e) for e in events]
            r = R.download_workspace_file(rest_b, cid, f"c{i}.log")
            assert r.status_code == 200, (r.status_code, r.text)
            assert r.text.split() == [f"c{i}-{k}" for k in range(1, STEPS + 1)]
        # A second message on conversation 0 through B.
        r = rest_b.post(f"/api/conversations/{ids[0]}/events",
                        json={"role": "user", "content": [{"type": "text", "text": _task("again")}], "run": True})
        assert r.status_code == 200, (r.status_code, r.text)
        _wait("the second run through replica B", lambda: len(_terminal(R.all_events(rest_b, ids[0]))) == 2 * STEPS, 120)
        R.wait_for_status(rest_b, ids[0], {"finished"}, timeout=60)

        # A comes back on its port: the SDK clients reconnect and hold every event once.
        a.start()
        for i, cid in enumerate(ids):
            log_events = R.all_events(rest_a, cid)
            assert {e["id"] for e in log_events} == {e["id"] for e in R.all_events(rest_b, cid)}
            _wait(f"SDK client {i} to catch up after replica A came back",
                  lambda: {e["id"] for e in log_events} <= {str(e.id) for e in recs[i].events}, timeout=60, interval=0.5)
            assert_sdk_consistent(recs[i].events, list(convs[i].state.events), log_events, strict_order=False)

        # Delete through B: no pod, Secret or PVC of theirs is left.
        start_closing(convs)
        for cid in ids:
            r = R.delete_conversation(rest_b, cid)
            assert r.status_code == 200, (r.status_code, r.text)
            assert R.get_conversation(rest_a, cid).status_code == 404

        def clean():
            o = _objects(target)
            left = {k: [i["metadata"]["name"] for i in v if "nestor.dev/warm" not in i["metadata"].get("labels", {})
                        and i["metadata"]["labels"].get("nestor.dev/conversation") != "home"]
                    for k, v in o.items()}
            return left if not any(left.values()) else None

        _wait("no pod, Secret or PVC of a deleted conversation", clean, timeout=90)
        if warm:
            log.info("warm pods left for the next creates: %d", len(_objects(target)["pods"]))
    finally:
        fake_llm.release()
        start_closing(convs)
        if b is not None:
            b.stop()
        rest_a.close()
