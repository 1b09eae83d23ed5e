"""One backend (issue 6): settings, secrets, webhooks, host-global routes and the workspace
cookie live on nestor, end to end with the real agent-server and the real SDK.

| test | targets | proves |
| --- | --- | --- |
| ``test_stored_secret_reaches_container_bash_by_lookup`` | nestor-docker | a secret saved on nestor reaches the agent's bash in the conversation's container as a ``LookupSecret`` at nestor (never in the create body, the persisted state or the container's environment); its credential opens that lookup only, and is refused after delete |
| ``test_create_without_agent_uses_stored_settings`` | nestor-* | ``PATCH /api/settings`` then a REST create naming no agent runs with the stored LLM (the fake LLM gets the calls) |
| ``test_webhooks_from_two_downstreams`` | nestor-process, -existing, -docker | a receiver configured as nestor's ``[[webhooks]]`` gets conversation infos and event batches of conversations on two different downstreams, with the configured headers and nestor's key; search shows the finished runs without asking the downstreams |
| ``test_host_global_routes_reach_the_addressed_conversation`` | nestor-* | ``/api/bash/execute_bash_command`` and ``/api/file/download`` reach the conversation named by the header, a conversation key, or a working-dir path; an unroutable request gets the documented 400 |
| ``test_workspace_files_with_the_cookie`` | nestor-* | ``POST /api/auth/workspace-session`` cookie alone serves workspace files; no cookie is 401; ``..`` escapes get the agent-server's 400/404, never a file outside |
| ``test_bad_input`` | nestor-* | invalid secret names, empty and masked values are 422 (nothing stored, no value echoed); ``..`` in a routing path does not address a conversation; missing / wrong cookie is 401 |
"""

from __future__ import annotations

import http.client
import json
import re
import secrets as pysecrets
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest

from fake_llm import FakeLLM
from harness import rest as R
from harness.events import EventRecorder, describe, is_transient_shape
from harness.sdk import FAKE_MODEL, open_conversation, start_closing
from harness.targets import TARGETS, Target, TargetContext, docker_container_of, selected_target_name
from harness.webhooks import WebhookReceiver

TARGET = selected_target_name()
NESTOR_TARGETS = ("nestor-process", "nestor-existing", "nestor-docker")
RUN_TIMEOUT = 120.0
CONVERSATION_HEADER = "X-OpenHands-ServerConversation-ID"

needs_nestor = pytest.mark.skipif(
    TARGET not in NESTOR_TARGETS,
    reason=f"nestor's own settings/secrets/routing (targets {', '.join(NESTOR_TARGETS)}), not {TARGET}",
)


# ---------------------------------------------------------------------------- helpers

def store_llm_settings(rest: httpx.Client, llm_url: str) -> dict[str, Any]:
    """Save the fake LLM as the user's agent LLM on nestor (what the settings page does)."""
    r = rest.patch("/api/settings", json={"agent_settings_diff": {"llm": {
        "model": FAKE_MODEL, "base_url": llm_url, "api_key": "fake-llm-key", "num_retries": 0, "timeout": 60,
    }}})
    assert r.status_code == 200, (r.status_code, r.text)
    llm = r.json()["agent_settings"]["llm"]
    assert llm["model"] == FAKE_MODEL and llm["base_url"] == llm_url, llm
    assert llm["api_key"] == "**********", "the stored api key is answered masked"
    return r.json()


def create_without_agent(rest: httpx.Client, working_dir: str, text: str, **extra: Any) -> dict[str, Any]:
    """``POST /api/conversations`` with only a workspace and a first message (no agent):
    nestor fills in the stored settings."""
    body = {
        "workspace": {"kind": "LocalWorkspace", "working_dir": working_dir},
        "initial_message": {"role": "user", "content": [{"type": "text", "text": text}], "run": True},
        **extra,
    }
    r = rest.post("/api/conversations", json=body, timeout=RUN_TIMEOUT + 60)
    assert r.status_code in (200, 201), (r.status_code, r.text)
    return r.json()


def run_without_agent(rest: httpx.Client, target: Target, label: str, text: str) -> dict[str, Any]:
    info = create_without_agent(rest, target.working_dir_for(label), text)
    done = R.wait_for_status(rest, info["id"], ["finished", "error", "stuck"], timeout=RUN_TIMEOUT)
    assert done["execution_status"] == "finished", done["execution_status"]
    return done


def delete_quietly(rest: httpx.Client, cids) -> None:
    for cid in cids:
        try:
            rest.delete(f"/api/conversations/{cid}", timeout=60)
        except httpx.HTTPError:
            pass


_RICH_SOURCE = re.compile(r"[\w.-]+\.py:\d+")


def count_requests(log: str, method: str | None, path_prefix: str) -> int:
    """Requests ``method path_prefix…`` (any method if None) in an agent-server log: uvicorn
    access lines, either JSON (``LOG_JSON=true``) or rich text, which wraps long lines (the
    pieces are joined again by dropping whitespace and the ``file.py:NNN`` column)."""
    methods = [method] if method else ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    n = 0
    plain: list[str] = []
    for line in log.splitlines():
        s = line.strip()
        if s.startswith("{") and '"http.method"' in s:
            try:
                rec = json.loads(s)
            except ValueError:
                continue
            if rec.get("http.method") in methods and str(rec.get("http.url", "")).startswith(path_prefix):
                n += 1
        elif not s.startswith("{"):
            plain.append(line)
    squashed = re.sub(r"\s+", "", _RICH_SOURCE.sub("", "\n".join(plain)))
    return n + sum(squashed.count(f'"{m}{path_prefix}') for m in methods)


def key_header(key: str) -> dict[str, str]:
    return {"X-Session-API-Key": key}


def raw_get(base_url: str, raw_path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """GET with the path sent byte for byte (httpx would resolve ``..`` segments itself)."""
    u = urllib.parse.urlsplit(base_url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        c.putrequest("GET", raw_path, skip_accept_encoding=True)
        for k, v in headers.items():
            c.putheader(k, v)
        c.endheaders()
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


# ---------------------------------------------------------------------------- 1. secrets in a container

def _docker(*args: str, timeout: float = 60) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"docker {' '.join(args)}: {r.stderr}"
    return r.stdout


@pytest.mark.skipif(TARGET != "nestor-docker", reason="a containerised conversation: needs NESTOR_E2E_TARGET=nestor-docker")
def test_stored_secret_reaches_container_bash_by_lookup(server_under_test, fake_llm, llm_url, rest):
    from openhands.sdk.utils.cipher import Cipher

    target = server_under_test
    name = f"E2E_SECRET_{pysecrets.token_hex(4).upper()}"
    value = f"v{pysecrets.token_hex(16)}"
    r = rest.put("/api/settings/secrets", json={"name": name, "value": value, "description": "e2e"})
    assert r.status_code == 200, r.text
    assert r.json() == {"name": name, "description": "e2e"}
    listed = rest.get("/api/settings/secrets").json()["secrets"]
    assert any(s["name"] == name for s in listed) and value not in json.dumps(listed)

    rec = EventRecorder()
    conv, _ = open_conversation(target, llm_url, "secret", callbacks=[rec])
    cid = str(conv.id)
    join = None
    try:
        conv.send_message(f"Store the secret.\nRUN: echo ${name} > secret.txt\nFINISH: stored")
        conv.run(timeout=RUN_TIMEOUT)

        # the agent's bash had the value: it wrote it into the workspace
        f = R.download_workspace_file(rest, cid, "secret.txt")
        assert f.status_code == 200, (f.status_code, f.text)
        assert f.text.strip() == value

        # what the downstream holds is a lookup at nestor, not the value
        info = R.conversation_info(rest, cid)
        src = info["secret_registry"]["secret_sources"][name]
        internal_port = target.extra["internal_bind"].rsplit(":", 1)[1]
        lookup_url = f"http://host.docker.internal:{internal_port}/nestor/secrets/{cid}/{name}"
        assert src["kind"] == "LookupSecret" and src["url"] == lookup_url, src
        assert value not in json.dumps(info)
        events = R.all_events(rest, cid)
        assert events and value not in json.dumps(events), "the value is in the event log"

        # ... in the container: not in its environment, not in anything persisted
        container = docker_container_of(target.extra["instance"], cid)
        assert container, "no container for the conversation"
        inspected = json.loads(_docker("inspect", container))[0]
        assert value not in json.dumps(inspected), "the value is in the container's configuration"
        env = dict(e.split("=", 1) for e in inspected["Config"]["Env"])
        assert name not in env
        # (everything in the volume but the working dir, where the agent wrote it on purpose)
        found = subprocess.run(["docker", "exec", container, "grep", "-rlF", "--exclude-dir=project", value, "/workspace"],
                               capture_output=True, text=True, timeout=60)
        assert found.returncode == 1 and not found.stdout, f"value persisted in {found.stdout!r} {found.stderr!r}"
        hexid = cid.replace("-", "")
        state = json.loads(_docker("exec", container, "cat", f"/workspace/conversations/{hexid}/base_state.json"))
        stored = state["secret_registry"]["secret_sources"][name]
        assert stored["kind"] == "LookupSecret" and stored["url"] == lookup_url, stored
        # the credential is stored encrypted with the container's OH_SECRET_KEY
        token = stored["headers"]["X-Session-API-Key"]
        credential = Cipher(env["OH_SECRET_KEY"]).decrypt(token).get_secret_value()
        assert credential and credential not in (target.api_key, env["SESSION_API_KEY"])

        # the credential opens this lookup (downstream-only listener and main listener) ...
        internal = f"http://{target.extra['internal_bind']}"
        for base in (internal, target.base_url):
            r = httpx.get(f"{base}/nestor/secrets/{cid}/{name}", headers=key_header(credential), timeout=10)
            assert r.status_code == 200 and r.text == value, (base, r.status_code, r.text)
        # ... and nothing else: no key, the client's API, the internal listener's other paths
        assert httpx.get(f"{internal}/nestor/secrets/{cid}/{name}", timeout=10).status_code == 401
        assert httpx.get(f"{target.base_url}/api/conversations/{cid}", headers=key_header(credential), timeout=10).status_code == 401
        assert httpx.get(f"{target.base_url}/api/settings/secrets/{name}", headers=key_header(credential), timeout=10).status_code == 401
        assert httpx.get(f"{internal}/api/conversations/search", headers=key_header(target.api_key), timeout=10).status_code == 404

        # delete: the credential is refused from then on
        join = start_closing([conv])
        r = rest.delete(f"/api/conversations/{cid}", timeout=60)
        assert r.status_code == 200, r.text
        for base in (internal, target.base_url):
            r = httpx.get(f"{base}/nestor/secrets/{cid}/{name}", headers=key_header(credential), timeout=10)
            assert r.status_code == 401, (base, r.status_code, r.text)
        assert not target.own_downstream_running(cid)
    finally:
        if join is None:
            join = start_closing([conv])
            delete_quietly(rest, [cid])
        join()
        rest.delete(f"/api/settings/secrets/{name}")


# ---------------------------------------------------------------------------- 2. stored settings

@needs_nestor
def test_create_without_agent_uses_stored_settings(server_under_test, fake_llm, llm_url, rest):
    store_llm_settings(rest, llm_url)
    marker = f"settings-{pysecrets.token_hex(4)}"
    info = create_without_agent(rest, server_under_test.working_dir_for("settings"),
                                f"RUN: echo {marker} > marker.txt\nFINISH: {marker}")
    cid = info["id"]
    try:
        assert info["agent"]["llm"]["model"] == FAKE_MODEL and info["agent"]["llm"]["base_url"] == llm_url
        done = R.wait_for_status(rest, cid, ["finished", "error", "stuck"], timeout=RUN_TIMEOUT)
        assert done["execution_status"] == "finished", done["execution_status"]
        # the stored LLM is the one that ran the agent: the fake LLM got its steps
        cmds = [c["arguments"]["command"] for c in fake_llm.tool_calls("terminal")]
        assert cmds == [f"echo {marker} > marker.txt"], cmds
        assert fake_llm.tool_calls("finish"), "no finish step reached the fake LLM"
        assert all(r.body.get("model") == FAKE_MODEL.split("/", 1)[1] for r in fake_llm.requests)
        f = R.download_workspace_file(rest, cid, "marker.txt")
        assert f.status_code == 200 and f.text.strip() == marker, (f.status_code, f.text)
        # the api key nestor stored reached the agent (the stored settings never answer it)
        assert "fake-llm-key" not in json.dumps(R.conversation_info(rest, cid))
    finally:
        delete_quietly(rest, [cid])


# ---------------------------------------------------------------------------- 3. webhooks

@pytest.mark.skipif(TARGET not in NESTOR_TARGETS, reason="nestor's webhooks")
def test_webhooks_from_two_downstreams(tmp_path):
    receiver = WebhookReceiver().start()
    header_value = "e2e-" + pysecrets.token_hex(6)
    ctx = TargetContext(
        tmp_dir=tmp_path / "target",
        nestor_config=f"""
[catalog]
webhook_staleness_secs = 300
[[webhooks]]
base_url = "{receiver.base_url}/hooks"
headers = {{ X-E2E-Hook = "{header_value}" }}
flush_delay = 0.5
event_buffer_size = 3
num_retries = 2
retry_delay = 0.5
""",
        # JSON access lines: each request to a downstream is one countable log line
        downstream_env={"LOG_JSON": "true"},
        existing_webhooks_to_nestor=True,
    )
    (tmp_path / "target").mkdir()
    try:
        with TARGETS[TARGET](ctx) as target:
            fake = FakeLLM(extra_hosts=target.llm_listen_hosts).start()
            rest = R.client(target.base_url, target.api_key)
            cids: list[str] = []
            try:
                store_llm_settings(rest, target.llm_url_for(fake.base_url))
                for label in ("hook-a", "hook-b"):
                    cids.append(create_without_agent(rest, target.working_dir_for(label),
                                                     f"RUN: echo {label}\nFINISH: {label} done")["id"])
                for cid in cids:
                    done = R.wait_for_status(rest, cid, ["finished", "error", "stuck"], timeout=RUN_TIMEOUT)
                    assert done["execution_status"] == "finished"
                logs = {cid: target.downstream_log(cid) for cid in cids}
                assert all(logs.values()), "no downstream log"
                assert logs[cids[0]] != logs[cids[1]], "both conversations on one downstream"

                def finished_everywhere(rcv: WebhookReceiver) -> bool:
                    return all(
                        any(e.get("kind") == "ConversationStateUpdateEvent" and e.get("key") == "execution_status"
                            and e.get("value") == "finished" for e in rcv.events(cid))
                        for cid in cids)

                receiver.wait_until(finished_everywhere, timeout=30, what="a finished status for both conversations")
                for cid in cids:
                    posts = receiver.event_posts(cid) + receiver.conversation_posts(cid)
                    assert receiver.event_posts(cid), f"no event batch for {cid}"
                    assert receiver.conversation_posts(cid), f"no conversation info for {cid}"
                    for p in posts:
                        assert p.headers.get("x-e2e-hook") == header_value, p.headers
                        assert p.headers.get("x-session-api-key") == target.api_key, p.headers
                        assert p.headers.get("content-type", "").startswith("application/json")
                    evs = receiver.events(cid)
                    ids = [e["id"] for e in evs]
                    assert len(ids) == len(set(ids)), "an event was posted twice"
                    logged = {e["id"] for e in R.all_events(rest, cid)}
                    unlogged = [describe(e) for e in evs if e["id"] not in logged and not is_transient_shape(e)]
                    assert not unlogged, f"posted, not in the conversation's log, not transient: {unlogged}"
                    kinds = {e.get("kind") for e in evs}
                    assert {"MessageEvent", "ActionEvent", "ObservationEvent"} <= kinds, kinds
                    # batched: event_buffer_size = 3 events per post at most
                    assert all(len(p.body) <= 3 for p in receiver.event_posts(cid))
                    info = receiver.conversation_posts(cid)[-1].body
                    assert info["id"] == cid
                # downstream keys never reach the receiver (payloads pass nestor's leak guard)
                dump = json.dumps([p.body for p in receiver.posts]) + json.dumps([p.headers for p in receiver.posts])
                for s in target.agent_servers:
                    assert s.api_key not in dump

                # search answers the finished runs from what the webhooks said: status and
                # stats at once, the auto-title (which the agent-server announces by no
                # webhook) from the one info read nestor makes when a run ends
                def searched() -> dict[str, dict]:
                    items, _ = R.search_conversations_all_pages(rest, limit=100)
                    return {i["id"]: i for i in items}

                def api_requests() -> dict[str, int]:
                    return {cid: count_requests(target.downstream_log(cid), None, "/api/") for cid in cids}

                lists_before = {cid: count_requests(target.downstream_log(cid), "GET", "/api/conversations/search")
                                for cid in cids}
                deadline = time.monotonic() + 15
                while True:
                    by_id = searched()
                    if all(by_id[c]["execution_status"] == "finished" and by_id[c]["title"] for c in cids):
                        break
                    assert time.monotonic() < deadline, (
                        "search: " + repr([(by_id[c]["execution_status"], by_id[c]["title"]) for c in cids])
                        + " live: " + repr([R.conversation_info(rest, c)["title"] for c in cids]))
                    time.sleep(0.3)
                assert all(by_id[c]["title"] == "Fake conversation title" for c in cids)
                assert all(by_id[c]["stats"]["usage_to_metrics"]["default"]["accumulated_token_usage"]["prompt_tokens"] > 0
                           for c in cids)
                before = api_requests()
                by_id = searched()
                assert all(by_id[c]["execution_status"] == "finished" for c in cids)
                assert R.count_conversations(rest, execution_status="finished") >= 2
                time.sleep(0.5)  # an access line is written after the answer
                after = api_requests()
                assert after == before, f"search/count made requests to the downstreams: {before} -> {after}"
                lists_after = {cid: count_requests(target.downstream_log(cid), "GET", "/api/conversations/search")
                               for cid in cids}
                assert lists_after == lists_before, f"search listed the downstreams: {lists_before} -> {lists_after}"
                # (and the count works: the log does show the requests nestor made)
                assert all(count_requests(logs[cid], "POST", "/api/conversations") > 0 for cid in cids)

                # delete reaches the receiver as a conversation info too
                for cid in cids:
                    assert rest.delete(f"/api/conversations/{cid}", timeout=60).status_code == 200
                receiver.wait_until(
                    lambda rcv: all(any(p.body.get("execution_status") == "deleting" for p in rcv.conversation_posts(c))
                                    for c in cids) or target.name != "nestor-existing",
                    timeout=20, what="delete notices")
                cids = []
            finally:
                delete_quietly(rest, cids)
                rest.close()
                fake.stop()
    finally:
        receiver.stop()


# ---------------------------------------------------------------------------- 4. host-global routes

@needs_nestor
def test_host_global_routes_reach_the_addressed_conversation(server_under_test, fake_llm, llm_url, rest):
    target = server_under_test
    store_llm_settings(rest, llm_url)
    tag = pysecrets.token_hex(4)
    convs = {}
    try:
        for label in ("a", "b"):
            info = run_without_agent(rest, target, f"global-{label}",
                                     f"RUN: echo marker-{label}-{tag} > marker.txt\nFINISH: ok")
            convs[label] = info
        ids = {k: v["id"] for k, v in convs.items()}
        wds = {k: v["workspace"]["working_dir"] for k, v in convs.items()}

        def bash(headers: dict[str, str], **body) -> httpx.Response:
            return rest.post("/api/bash/execute_bash_command", json=body, headers=headers, timeout=60)

        def hosted_by(out: str, label: str) -> None:
            # the downstream that ran it holds that conversation (its conversations dir)
            assert ids[label].replace("-", "") in out, out
            other = "b" if label == "a" else "a"
            if target.name != "nestor-existing":  # existing: both may share one server
                assert ids[other].replace("-", "") not in out, out

        cmd = 'cat marker.txt; ls "$OH_CONVERSATIONS_PATH"'
        # 1. the header
        for label in ("a", "b"):
            r = bash({CONVERSATION_HEADER: ids[label]}, command=cmd, cwd=wds[label])
            assert r.status_code == 200, (r.status_code, r.text)
            out = r.json()
            assert out["exit_code"] == 0, out
            assert out["stdout"].startswith(f"marker-{label}-{tag}"), out
            hosted_by(out["stdout"], label)
        # 2. a conversation key, nothing else
        key_b = rest.post(f"/api/conversations/{ids['b']}/runtime/credentials").json()["session_api_key"]
        assert key_b != target.api_key
        with R.client(target.base_url, key_b) as kc:
            r = kc.post("/api/bash/execute_bash_command", json={"command": cmd, "cwd": wds["b"]}, timeout=60)
            assert r.status_code == 200, (r.status_code, r.text)
            hosted_by(r.json()["stdout"], "b")
            f = kc.get("/api/file/download", params={"path": f"{wds['b']}/marker.txt"})
            assert f.status_code == 200 and f.text.strip() == f"marker-b-{tag}", (f.status_code, f.text)
            # the key opens its own conversation only
            assert kc.get(f"/api/conversations/{ids['a']}").status_code == 404
            assert kc.get("/api/settings").status_code == 401
            assert kc.post("/api/bash/execute_bash_command", json={"command": "true"},
                           headers={CONVERSATION_HEADER: ids["a"]}).status_code in (400, 404)
        # 3. file download by header, each file from its own conversation's downstream
        for label in ("a", "b"):
            log_before = count_requests(target.downstream_log(ids[label]), "GET", "/api/file/download")
            f = rest.get("/api/file/download", params={"path": f"{wds[label]}/marker.txt"},
                         headers={CONVERSATION_HEADER: ids[label]})
            assert f.status_code == 200 and f.text.strip() == f"marker-{label}-{tag}", (f.status_code, f.text)
            deadline = time.monotonic() + 10
            while count_requests(target.downstream_log(ids[label]), "GET", "/api/file/download") <= log_before:
                assert time.monotonic() < deadline, f"the download did not reach conversation {label}'s downstream"
                time.sleep(0.2)
        # 4. by working dir (distinct working dirs only: docker gives every conversation /workspace/project)
        if wds["a"] != wds["b"]:
            for label in ("a", "b"):
                f = rest.get("/api/file/download", params={"path": f"{wds[label]}/marker.txt"})
                assert f.status_code == 200 and f.text.strip() == f"marker-{label}-{tag}", (f.status_code, f.text)
                r = bash({}, command=cmd, cwd=wds[label])
                assert r.status_code == 200, r.text
                hosted_by(r.json()["stdout"], label)
        else:
            f = rest.get("/api/file/download", params={"path": f"{wds['a']}/marker.txt"})
            assert f.status_code == 400, "a working dir shared by two conversations must not pick one"
        # 5. unroutable: no header, no key, no path inside a working dir -> the documented 400
        for resp in (
            bash({}, command="echo nowhere"),
            bash({}, command="echo nowhere", cwd="/nonexistent-e2e"),
            rest.get("/api/file/download", params={"path": "/etc/hostname"}),
            rest.get("/api/git/changes", params={"path": "/nonexistent-e2e"}),
        ):
            assert resp.status_code == 400, (resp.status_code, resp.text)
            detail = resp.json()["detail"]
            assert CONVERSATION_HEADER in detail and "runtime/credentials" in detail, detail
        # an unknown conversation in the header is the agent-server's 404, not another one's host
        r = bash({CONVERSATION_HEADER: "00000000-0000-4000-8000-000000000000"}, command="true")
        assert r.status_code == 404, (r.status_code, r.text)
        r = bash({CONVERSATION_HEADER: "not-a-uuid"}, command="true")
        assert r.status_code == 400, (r.status_code, r.text)
    finally:
        delete_quietly(rest, [v["id"] for v in convs.values()])


# ---------------------------------------------------------------------------- 5. workspace cookie

@needs_nestor
def test_workspace_files_with_the_cookie(server_under_test, fake_llm, llm_url, rest):
    target = server_under_test
    store_llm_settings(rest, llm_url)
    tag = pysecrets.token_hex(4)
    info = run_without_agent(rest, target, "cookie",
                             f"RUN: mkdir -p site && echo page-{tag} > site/page.txt && echo '<p>{tag}</p>' > site/index.html"
                             f" && echo outside-{tag} > ../outside-{tag}.txt\nFINISH: ok")
    cid = info["id"]
    try:
        # the file outside the working dir exists (the agent wrote it), so an escape would find it
        wd = info["workspace"]["working_dir"]
        parent = wd.rstrip("/").rsplit("/", 1)[0]
        r = rest.get("/api/file/download", params={"path": f"{parent}/outside-{tag}.txt"},
                     headers={CONVERSATION_HEADER: cid})
        assert r.status_code == 200 and r.text.strip() == f"outside-{tag}", (r.status_code, r.text)

        # mint the cookie (nestor's: the client's key, never the downstream's)
        r = rest.post("/api/auth/workspace-session")
        assert r.status_code == 204, (r.status_code, r.text)
        set_cookie = r.headers["set-cookie"]
        assert set_cookie.startswith(f"oh_workspace_session_key={target.api_key};"), set_cookie
        assert "HttpOnly" in set_cookie and "Path=/api/conversations" in set_cookie, set_cookie
        cookie = {"Cookie": f"oh_workspace_session_key={target.api_key}"}

        with httpx.Client(base_url=target.base_url, timeout=30) as anon:
            # only the cookie
            r = anon.get(f"/api/conversations/{cid}/workspace/site/page.txt", headers=cookie)
            assert r.status_code == 200 and r.text.strip() == f"page-{tag}", (r.status_code, r.text)
            r = anon.get(f"/api/conversations/{cid}/workspace/site/", headers=cookie)
            assert r.status_code == 200 and tag in r.text, (r.status_code, r.text)
            # the header alone works too
            r = anon.get(f"/api/conversations/{cid}/workspace/site/page.txt", headers=key_header(target.api_key))
            assert r.status_code == 200, r.status_code
            # no cookie, a wrong cookie: 401
            assert anon.get(f"/api/conversations/{cid}/workspace/site/page.txt").status_code == 401
            r = anon.get(f"/api/conversations/{cid}/workspace/site/page.txt",
                         headers={"Cookie": "oh_workspace_session_key=wrong"})
            assert r.status_code == 401
            # the cookie opens workspace files only
            assert anon.get(f"/api/conversations/{cid}", headers=cookie).status_code == 401
            assert anon.get(f"/api/conversations/{cid}/events/search", headers=cookie).status_code == 401
            # a missing file is the agent-server's 404
            r = anon.get(f"/api/conversations/{cid}/workspace/site/missing.txt", headers=cookie)
            assert r.status_code == 404, r.status_code

        # escapes: whatever the encoding, never the file outside
        for raw in (
            f"/api/conversations/{cid}/workspace/../outside-{tag}.txt",
            f"/api/conversations/{cid}/workspace/site/../../outside-{tag}.txt",
            f"/api/conversations/{cid}/workspace/%2e%2e/outside-{tag}.txt",
            f"/api/conversations/{cid}/workspace/..%2foutside-{tag}.txt",
            f"/api/conversations/{cid}/workspace/site/%2e%2e%2f%2e%2e%2foutside-{tag}.txt",
        ):
            for headers in (cookie, key_header(target.api_key)):
                status, body = raw_get(target.base_url, raw, headers)
                assert status in (400, 404), (raw, status, body[:200])
                assert f"outside-{tag}".encode() not in body, (raw, body[:200])
        # the agent-server's own answer passes through
        status, body = raw_get(target.base_url, f"/api/conversations/{cid}/workspace/%2e%2e/outside-{tag}.txt", cookie)
        assert status == 400 and json.loads(body)["detail"] == "Path is outside the workspace", (status, body)

        # logout clears the cookie
        r = rest.delete("/api/auth/workspace-session")
        assert r.status_code == 204 and "Max-Age=0" in r.headers["set-cookie"], r.headers.get("set-cookie")
    finally:
        delete_quietly(rest, [cid])


# ---------------------------------------------------------------------------- 6. bad input

@needs_nestor
def test_bad_input(server_under_test, fake_llm, llm_url, rest):
    target = server_under_test
    before = {s["name"] for s in rest.get("/api/settings/secrets").json()["secrets"]}
    masked = "**********"
    bad = [
        ({"name": "", "value": "x"}, "Invalid secret name"),
        ({"name": "1ABC", "value": "x"}, "Invalid secret name"),
        ({"name": "has space", "value": "x"}, "Invalid secret name"),
        ({"name": "dash-ed", "value": "x"}, "Invalid secret name"),
        ({"name": "../etc", "value": "x"}, "Invalid secret name"),
        ({"name": "X" * 65, "value": "x"}, "Invalid secret name"),
        ({"name": "GOOD_NAME", "value": ""}, "must not be empty"),
        ({"name": "GOOD_NAME", "value": "   "}, "must not be empty"),
        ({"name": "GOOD_NAME", "value": masked}, "redacted"),
        ({"name": "GOOD_NAME"}, "Field required"),
        ({"name": "GOOD_NAME", "value": 5}, "valid string"),
        ({"value": "secret-value-not-echoed"}, "Field required"),
    ]
    for body, words in bad:
        r = rest.put("/api/settings/secrets", json=body)
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert words in r.text, (body, r.text)
        assert "secret-value-not-echoed" not in r.text
    for raw in ("not json", "[1, 2]"):
        r = rest.put("/api/settings/secrets", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (raw, r.status_code, r.text)
    for name in ("1ABC", "dash-ed", "%2e%2e"):
        assert rest.get(f"/api/settings/secrets/{name}").status_code == 422, name
        assert rest.delete(f"/api/settings/secrets/{name}").status_code == 422, name
    status, _ = raw_get(target.base_url, "/api/settings/secrets/../settings", key_header(target.api_key))
    assert status in (404, 422), status
    after = {s["name"] for s in rest.get("/api/settings/secrets").json()["secrets"]}
    assert after == before, "a rejected secret was stored"
    # a masked api key sent back in settings is never stored as the key (the agent-server
    # treats it as "no key", and so does nestor)
    store_llm_settings(rest, llm_url)
    r = rest.patch("/api/settings", json={"agent_settings_diff": {"llm": {"api_key": masked}}})
    assert r.status_code == 200, r.text
    r = rest.get("/api/settings", headers={"X-Expose-Secrets": "plaintext"})
    assert r.status_code == 200 and r.json()["agent_settings"]["llm"]["api_key"] in (None, "fake-llm-key"), r.text
    store_llm_settings(rest, llm_url)
    # settings with malformed diffs
    for body in ({"agent_settings_diff": "nope"}, {"active_agent_profile_id": "not-a-uuid"}):
        assert rest.patch("/api/settings", json=body).status_code == 422, body

    # '..' in a routing path: textually under a working dir, really outside it -> not routed
    info = run_without_agent(rest, target, "bad-input", "RUN: echo inside > inside.txt\nFINISH: ok")
    cid = info["id"]
    try:
        wd = info["workspace"]["working_dir"].rstrip("/")
        r = rest.get("/api/file/download", params={"path": f"{wd}/inside.txt"},
                     headers={CONVERSATION_HEADER: cid})
        assert r.status_code == 200 and r.text.strip() == "inside"
        distinct_dirs = target.name != "nestor-docker"
        if distinct_dirs:
            # routed by working dir: inside is fine, a '..' escape is not "inside"
            assert rest.get("/api/file/download", params={"path": f"{wd}/./inside.txt"}).status_code == 200
            for p in (f"{wd}/../../../../../../etc/hostname", f"{wd}/..", f"{wd}/sub/../../x"):
                r = rest.get("/api/file/download", params={"path": p})
                assert r.status_code == 400 and CONVERSATION_HEADER in r.json()["detail"], (p, r.status_code, r.text)
                r = rest.post("/api/bash/execute_bash_command", json={"command": "pwd", "cwd": p})
                assert r.status_code == 400, (p, r.status_code, r.text)
        # the workspace cookie: missing -> 401, for an unknown conversation -> 401 before 404
        with httpx.Client(base_url=target.base_url, timeout=30) as anon:
            assert anon.get(f"/api/conversations/{cid}/workspace/inside.txt").status_code == 401
            assert anon.get(f"/api/conversations/{cid}/workspace/inside.txt",
                            headers={"Cookie": "other=1; oh_workspace_session_key="}).status_code == 401
            r = anon.get(f"/api/conversations/{cid}/workspace/inside.txt",
                         headers={"Cookie": f"a=b; oh_workspace_session_key={target.api_key}; c=d"})
            assert r.status_code == 200 and r.text.strip() == "inside", (r.status_code, r.text)
            r = anon.post("/api/auth/workspace-session")
            assert r.status_code == 401 and "set-cookie" not in r.headers
    finally:
        delete_quietly(rest, [cid])
