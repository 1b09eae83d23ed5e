"""The request sequence of the fidelity harness (harness/fidelity.py) and the route table.

``main_steps()`` is the scripted session both sides go through, in order: server details,
nestor's own settings store, the home-served catalogs, one conversation's whole life (with a
short scripted run on the fake LLM), the conversation-scoped and host-global workspace
routes, fork/children, the OpenAI gateway, unknown conversations, deletes. Every step names
the route of routes-1.58.2.tsv it exercises; ``auth_steps()`` adds, for every route, the same
request without a key and with a wrong one. Differences nestor makes on purpose are declared
where they happen (``Design``), with the reason that goes into docs/compatibility.md.

Per-side variables (``${name}``): ``root`` (the side's state root), ``ws`` (the
conversation's working directory, a git repository), ``llm`` (the fake LLM), ``cid`` /
``cid_del`` / ``cid_fork`` / ``unknown`` (conversation ids chosen here, the same on both
sides), and values captured from earlier answers (``event_id``, ``command_id``, ...).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fidelity import Design, Rec, Side, Step, nestor_answers, same_except, UNSET

REPO = Path(__file__).resolve().parents[3]
ROUTES_TSV = REPO / "tests" / "fixtures" / "routes-1.58.2.tsv"

# ---------------------------------------------------------------- the route table


@dataclass
class Route:
    index: int  # 1-based row of routes-1.58.2.tsv (header excluded)
    method: str
    path: str
    tag: str
    klass: str
    source: str
    params: str = ""

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"


def load_routes() -> list[Route]:
    with open(ROUTES_TSV, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    return [Route(i, r[0], r[1], r[2], r[3], r[7] if len(r) > 7 else "", r[4] if len(r) > 4 else "") for i, r in enumerate(rows[1:], 1)]


def concrete(path: str) -> str:
    """A request path for a route template (for the auth matrix)."""
    p = path.replace("[/{path}]", "/x")
    for k, v in {
        "{conversation_id}": "${cid}",
        "{runtime_conversation_id}": "${cid}",
        "{event_id}": "${event_id}",
        "{command_id}": "${command_id}",
        "{file_path}": "README.md",
        "{sha}": "${sha}",
        "{settings_key}": "mcp1",
        "{secret_name}": "S1",
        "{extension_name}": "ext1",
        "{profile_id}": "${unknown}",
        "{connection_id}": "c0ffee",
        "{job_id}": "job1",
    }.items():
        p = p.replace(k, v)
    for k in ("{name}", "{plugin_name}", "{skill_name}"):
        p = p.replace(k, "x")
    return p


# ---------------------------------------------------------------- workspace preparation


GIT_ENV = {
    "GIT_AUTHOR_NAME": "Fidelity",
    "GIT_AUTHOR_EMAIL": "fidelity@example.invalid",
    "GIT_COMMITTER_NAME": "Fidelity",
    "GIT_COMMITTER_EMAIL": "fidelity@example.invalid",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": "/nonexistent",
}


def prepare_workspace(ws: Path) -> str:
    """A git repository with one commit (fixed author and dates: the same sha on both
    sides), one modified and one untracked file, a page and a sub-directory. Returns the sha."""
    ws.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **GIT_ENV}

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ws, env=env, check=True, capture_output=True, text=True, timeout=30).stdout

    git("init", "-q", "-b", "main")
    (ws / "README.md").write_text("# fidelity\n\nfirst line\n")
    (ws / "docs").mkdir(exist_ok=True)
    (ws / "docs" / "index.html").write_text("<html><body>fidelity</body></html>\n")
    git("add", "-A")
    git("commit", "-q", "-m", "initial commit")
    sha = git("rev-parse", "HEAD").strip()
    (ws / "README.md").write_text("# fidelity\n\nfirst line\nsecond line\n")
    (ws / "notes.txt").write_text("untracked\n")
    return sha


# ---------------------------------------------------------------- shared bodies

LLM = {"usage_id": "agent", "model": "openai/fake", "base_url": "${llm}", "api_key": "fake-llm-key"}
AGENT = {"kind": "Agent", "llm": LLM, "tools": [{"name": "terminal"}]}


def create_body(cid: str, ws: str = "${ws}", **extra: Any) -> dict[str, Any]:
    return {
        "conversation_id": cid,
        "agent": AGENT,
        "workspace": {"kind": "LocalWorkspace", "working_dir": ws},
        "autotitle": False,
        "max_iterations": 20,
        **extra,
    }


def message(text: str, run: bool = False) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}], "run": run}


CONV_HEADER = {"X-OpenHands-ServerConversation-ID": "${cid}"}

# ---------------------------------------------------------------- declared differences

SERVER_INFO = Design(
    "nestor answers itself: the downstream fleet's `/server_info` (version, capabilities and "
    "tools every downstream has) plus `nestor_version`; `uptime`/`idle_time` are nestor's",
    same_except(drop_keys=("nestor_version",)),
    short="answered by nestor, plus `nestor_version`",
)

NEEDS_ADDRESS = Design(
    "host-global workspace route: behind nestor every conversation has its own host, so the "
    "request must name one (header `X-OpenHands-ServerConversation-ID`, a conversation key, or "
    "a path inside exactly one conversation's working directory); unaddressed: 400 with a "
    "detail saying how. Addressed, the answer is the agent-server's (checked with the header)",
    nestor_answers(400, lambda b: isinstance(b, dict) and "X-OpenHands-ServerConversation-ID" in str(b.get("detail"))),
    short="must name a conversation (else 400); addressed: identical",
)

PAGE_TOKEN = Design(
    "nestor pages the merged catalog with its own opaque cursors (`next_page_id`); the "
    "agent-server's is the next item's hex id. Following either gives the same next page",
    same_except(body=lambda d, n: [] if (
        isinstance(d, dict) and isinstance(n, dict) and d.get("items") == n.get("items")
        and bool(d.get("next_page_id")) == bool(n.get("next_page_id"))) else ["items or presence of next_page_id differ"]),
    short="nestor's own page tokens",
)

SANDBOX_PAUSE = Design(
    "`404`: a process-local operation of each agent-server (closes every live conversation "
    "before its sandbox is frozen); nestor's own concern, not a client's",
    nestor_answers(404, "Not Found", direct_status=204),
    kind="unsupported",
    short="404: process-local",
)

RUNTIME_DELETE = Design(
    "implemented: nestor serves the agent-server's docker-runtime-mode route (stop the "
    "conversation's runtime, keep its state; it restarts on demand): `204`. A local-mode "
    "agent-server does not have it (`405`)",
    nestor_answers(204, None, direct_status=405),
    short="implemented by nestor (204); local mode: 405",
)

RUNTIME_CREDENTIALS = Design(
    "implemented: nestor serves the docker-runtime-mode route and mints a key that opens this "
    "one conversation (its routes, sockets and the host-global workspace routes); a local-mode "
    "agent-server does not have it (`404`)",
    nestor_answers(200, lambda b: isinstance(b, dict) and isinstance(b.get("session_api_key"), str)),
    short="implemented by nestor (a conversation key); local mode: 404",
)


MATERIALIZE = Design(
    "nestor answers from its own profile store without a runtime to probe: default tools are "
    "not expanded (`resolved_settings.tools` stays null) and `unusable_tools` is empty; the "
    "agent-server fills both from its tool registry and browser availability",
    same_except(body=lambda d, n: [] if _without(d, ("resolved_settings", "tools"), ("unusable_tools",))
                == _without(n, ("resolved_settings", "tools"), ("unusable_tools",)) else ["more than tools/unusable_tools differ"]),
    short="no runtime probing (tools, unusable_tools)",
)

CORS_ON_500 = Design(
    "an unhandled error (here: the device login needs the network) is answered by the "
    "agent-server outside its CORS middleware (Starlette), so without CORS headers and `Vary`; "
    "nestor's CORS layer covers every answer, including that one",
    same_except(headers=("access-control-allow-origin", "access-control-allow-credentials", "vary")),
    short="CORS headers on an unhandled-error 500",
)

V1_MODELS = Design(
    "the OpenAI-compatible gateway runs on the home agent-server, whose LLM profile store is "
    "empty (profiles live in nestor's store), so `/v1/models` lists no profile models",
    same_except(body=lambda d, n: [] if isinstance(n, dict) and n.get("data") == [] and n.get("object") == d.get("object")
                else ["nestor's model list is not the empty list"]),
    short="no profile models on the home agent-server",
)

V1_ORDER = Design(
    "the gateway checks the model before it looks the conversation up; nestor must find the "
    "conversation's agent-server first, so an unknown conversation is a `404 Not Found` "
    "whatever the model",
    nestor_answers(404, "Not Found"),
    short="conversation looked up before the model",
)

OWN_ROUTE_AUTH = Design(
    "nestor serves this docker-runtime route (see above), so it authenticates it like every "
    "route (`401`); a local-mode agent-server has no such route and answers `405`/`404` first",
    nestor_answers(401, "Unauthorized"),
    short="nestor's route: 401 without a key",
)

APP_BACKEND_AUTH = Design(
    "nestor requires its session key on the canvas app-backend proxy; the agent-server's "
    "proxy checks only its own per-extension session cookie (and, with no app-backend "
    "ingress configured, answers `503`)",
    nestor_answers(401, "Unauthorized"),
    short="nestor's key required",
)

AUTH_DESIGNS = {
    "GET /": SERVER_INFO,
    "GET /server_info": SERVER_INFO,
    "DELETE /api/conversations/{conversation_id}/runtime": OWN_ROUTE_AUTH,
    "POST /api/conversations/{conversation_id}/runtime/credentials": OWN_ROUTE_AUTH,
    "ANY /app-backends/{extension_name}[/{path}]": APP_BACKEND_AUTH,
}


def _without(v: Any, *paths: tuple[str, ...]) -> Any:
    v = json.loads(json.dumps(v))
    for p in paths:
        cur = v
        for k in p[:-1]:
            cur = cur.get(k) if isinstance(cur, dict) else None
        if isinstance(cur, dict):
            cur.pop(p[-1], None)
    return v


# ---------------------------------------------------------------- captures


def cap(name: str, fn):
    def capture(rec: Rec, side: Side) -> None:
        side.vars[name] = fn(rec.json())

    return capture


def caps(**fns):
    def capture(rec: Rec, side: Side) -> None:
        v = rec.json()
        for name, fn in fns.items():
            side.vars[name] = fn(v)

    return capture


TERMINAL = ("finished", "error", "stuck", "paused")


def settle(side: Side, timeout: float = 90.0) -> None:
    """Wait until the main conversation is not running and its event log stopped growing:
    a run just started may not have flipped the status yet, and what the next steps see
    must not depend on timing."""
    import time

    c = side.client()
    h = {"X-Session-API-Key": side.api_key}
    cid = side.vars["cid"]
    deadline = time.monotonic() + timeout
    last = None
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        info = c.get(f"/api/conversations/{cid}", headers=h)
        count = c.get(f"/api/conversations/{cid}/events/count", headers=h)
        for r in (info, count):  # kept for the leak scan like every answer
            side.record(f"GET {r.request.url.path} (settle)", Rec(r.status_code, list(r.headers.multi_items()), r.content))
        if info.status_code != 200 or count.status_code != 200:
            return
        now = (info.json().get("execution_status"), count.json())
        if now != last:
            last, stable_since = now, time.monotonic()
        elif now[0] in TERMINAL and time.monotonic() - stable_since >= 1.0:
            return
        time.sleep(0.2)


def status_in(*statuses: str):
    def done(rec: Rec) -> bool:
        if rec.status != 200:
            return True  # nothing to wait for
        try:
            return rec.json().get("execution_status") in statuses
        except ValueError:
            return False

    return done


# ---------------------------------------------------------------- the session


def S(route: str | None, label: str, **kw: Any) -> Step:
    method, _, path = (route or "GET /").partition(" ")
    kw.setdefault("method", method)
    if "path" not in kw:
        kw["path"] = concrete(path)
    return Step(route=route, label=label, **kw)


def server_steps() -> list[Step]:
    ign = ("uptime", "idle_time")
    return [
        S("GET /alive", "liveness"),
        S("GET /health", "health"),
        S("GET /ready", "readiness"),
        S("GET /server_info", "server info", ignore=ign, design=SERVER_INFO),
        S("GET /", "root = server info", ignore=ign, design=SERVER_INFO),
        S(None, "unknown root path", path="/nope", expect=404),
        S(None, "unknown /api path", path="/api/nope", expect=404),
        S(None, "slash-less form of /api/tools/ (redirect)", path="/api/tools", expect=307),
        S(None, "wrong method on a known route", method="DELETE", path="/api/tools/", expect=405),
        S(None, "unknown /api path without a key", path="/api/nope", auth="none", expect=404),
        S(None, "unknown /api path with a wrong key", path="/api/nope", auth="wrong", expect=404),
        S(None, "slash-less form without a key (redirect)", path="/api/tools", params={"a": "1"}, auth="none", expect=307),
        S(None, "wrong method without a key", method="DELETE", path="/api/tools/", auth="none", expect=405),
        S(None, "wrong method on a settings route", method="PUT", path="/api/settings", expect=405),
        S(None, "wrong method on the conversation count", method="PUT", path="/api/conversations/count", auth="none", expect=405),
        S(None, "a socket path over plain HTTP", method="GET", path="/sockets/events/${unknown}", expect=404),
        S(None, "a socket path over plain HTTP, wrong method", method="POST", path="/sockets/session/${unknown}", expect=404),
        S(None, "CORS preflight", method="OPTIONS", path="/api/conversations",
          headers={"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-session-api-key,content-type"},
          auth="none", expect=200),
        S(None, "CORS preflight, foreign origin", method="OPTIONS", path="/api/conversations", origin=False,
          headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}, auth="none", expect=400),
        S(None, "CORS, foreign origin on a normal request", path="/api/settings", origin=False,
          headers={"Origin": "https://evil.example"}, expect=200),
    ]


def settings_steps() -> list[Step]:
    mcp = {"url": "http://127.0.0.1:9/mcp", "transport": "http"}
    secret_headers = {"X-Expose-Secrets": "plaintext"}
    return [
        S("GET /api/settings", "settings, fresh"),
        S("GET /api/settings/agent-schema", "agent settings schema"),
        S("GET /api/settings/conversation-schema", "conversation settings schema"),
        S("PATCH /api/settings", "patch conversation settings", json={"conversation_settings_diff": {"max_iterations": 42}}),
        S("PATCH /api/settings", "patch, invalid value", json={"conversation_settings_diff": {"max_iterations": "many"}}),
        S("PATCH /api/settings", "patch, empty body", json={}),
        S("GET /api/settings", "settings, plaintext secrets", headers=secret_headers),
        S("POST /api/settings/mcp/{settings_key}", "add an MCP server", json=mcp),
        S("POST /api/settings/mcp/{settings_key}", "add it again (conflict)", json=mcp),
        S("PATCH /api/settings/mcp/{settings_key}", "patch it", json={"description": "local"}),
        S("PATCH /api/settings/mcp/{settings_key}", "patch an unknown one", path="/api/settings/mcp/nope", json={"description": "x"}),
        S("DELETE /api/settings/mcp/{settings_key}", "delete it"),
        S("DELETE /api/settings/mcp/{settings_key}", "delete it again"),
        S("GET /api/settings/secrets", "secrets, none"),
        S("PUT /api/settings/secrets", "store a secret", json={"name": "S1", "value": "v1", "description": "first"}),
        S("PUT /api/settings/secrets", "bad secret name", json={"name": "1bad", "value": "v"}),
        S("PUT /api/settings/secrets", "redacted value refused", json={"name": "S2", "value": "**********"}),
        S("GET /api/settings/secrets", "secrets, one"),
        S("GET /api/settings/secrets/{name}", "read the secret", path="/api/settings/secrets/S1"),
        S("GET /api/settings/secrets/{name}", "read an unknown secret", path="/api/settings/secrets/NOPE"),
        S("GET /api/settings/secrets/{name}", "read a bad name", path="/api/settings/secrets/1bad"),
        S("DELETE /api/settings/secrets/{name}", "delete the secret", path="/api/settings/secrets/S1"),
        S("DELETE /api/settings/secrets/{name}", "delete it again", path="/api/settings/secrets/S1"),
        # LLM profiles
        S("GET /api/profiles", "profiles, none"),
        S("POST /api/profiles/{name}", "save profile p1", path="/api/profiles/p1", json={"llm": LLM}),
        S("POST /api/profiles/{name}", "save with a bad name", path="/api/profiles/bad%20name", json={"llm": LLM}),
        S("GET /api/profiles/{name}", "read p1", path="/api/profiles/p1"),
        S("GET /api/profiles/{name}", "read an unknown profile", path="/api/profiles/nope"),
        S("GET /api/profiles", "profiles, one"),
        S("POST /api/profiles/{name}/activate", "activate p1", path="/api/profiles/p1/activate"),
        S("POST /api/profiles/{name}/activate", "activate an unknown profile", path="/api/profiles/nope/activate"),
        S("POST /api/profiles/{name}/rename", "rename p1 to p2", path="/api/profiles/p1/rename", json={"new_name": "p2"}),
        S("POST /api/profiles/{name}/validate", "validate p2 against the fake LLM", path="/api/profiles/p2/validate", json={"llm": LLM},
          ignore=("latency_ms", "elapsed_ms", "duration_ms")),
        S("POST /api/profiles/{name}/validate", "validate, invalid body", path="/api/profiles/p2/validate", json={"nope": 1}),
        S("GET /api/settings", "settings after activation"),
        # provider connections
        S("GET /api/llm/provider-connections", "connections, none"),
        S("POST /api/llm/provider-connections", "create a connection",
          json={"display_name": "c1", "provider": "openai", "api_key": "sk-fidelity", "base_url": "http://127.0.0.1:9/v1"},
          capture=cap("connection_id", lambda v: v["id"]), ignore=("created_at", "updated_at")),
        S("POST /api/llm/provider-connections", "create, missing key", json={"display_name": "c2"}),
        S("GET /api/llm/provider-connections", "connections, one", ignore=("created_at", "updated_at")),
        S("PATCH /api/llm/provider-connections/{connection_id}", "rename the connection",
          path="/api/llm/provider-connections/${connection_id}", json={"display_name": "c1b"}, ignore=("created_at", "updated_at")),
        S("PATCH /api/llm/provider-connections/{connection_id}", "patch an unknown connection",
          path="/api/llm/provider-connections/c0ffee", json={"display_name": "x"}),
        S("DELETE /api/llm/provider-connections/{connection_id}", "delete the connection",
          path="/api/llm/provider-connections/${connection_id}"),
        S("DELETE /api/llm/provider-connections/{connection_id}", "delete an unknown connection",
          path="/api/llm/provider-connections/c0ffee"),
        # agent profiles
        S("GET /api/agent-profiles", "agent profiles (the default one)",
          capture=cap("default_agent_profile", lambda v: v["active_agent_profile_id"])),
        S("POST /api/agent-profiles/{name}", "save agent profile ap1", path="/api/agent-profiles/ap1", json={"llm_profile_ref": "p2"}),
        S("POST /api/agent-profiles/{name}", "save, invalid body", path="/api/agent-profiles/ap2", json={"model": "x"}),
        S("GET /api/agent-profiles/{name}", "read ap1", path="/api/agent-profiles/ap1",
          capture=cap("agent_profile_id", lambda v: v["profile"]["id"])),
        S("GET /api/agent-profiles/{name}", "read an unknown agent profile", path="/api/agent-profiles/nope"),
        S("POST /api/agent-profiles/{name}/materialize", "materialize ap1", path="/api/agent-profiles/ap1/materialize", json=None,
          design=MATERIALIZE),
        S("POST /api/agent-profiles/{name}/materialize", "materialize an unknown one", path="/api/agent-profiles/nope/materialize", json=None),
        S("POST /api/agent-profiles/{profile_id}/activate", "activate ap1 by id", path="/api/agent-profiles/${agent_profile_id}/activate"),
        S("POST /api/agent-profiles/{profile_id}/activate", "activate an unknown id", path="/api/agent-profiles/${unknown}/activate"),
        S("POST /api/agent-profiles/{name}/rename", "rename ap1 to ap3", path="/api/agent-profiles/ap1/rename", json={"new_name": "ap3"}),
        S("GET /api/agent-profiles", "agent profiles, two"),
        S("POST /api/agent-profiles/{profile_id}/activate", "activate the default again",
          path="/api/agent-profiles/${default_agent_profile}/activate"),
        S("DELETE /api/agent-profiles/{name}", "delete ap3", path="/api/agent-profiles/ap3"),
        S("DELETE /api/agent-profiles/{name}", "delete it again", path="/api/agent-profiles/ap3"),
        # meta-profiles
        S("GET /api/meta-profiles", "meta-profiles, none"),
        S("POST /api/meta-profiles/{name}", "save meta-profile m1", path="/api/meta-profiles/m1",
          json={"classifier_model": "p2", "prompt_template": "Pick a model for {{ task }}"}),
        S("POST /api/meta-profiles/{name}", "save, invalid", path="/api/meta-profiles/m2", json={"classifier_model": "p2"}),
        S("GET /api/meta-profiles/{name}", "read m1", path="/api/meta-profiles/m1"),
        S("GET /api/meta-profiles/{name}", "read an unknown meta-profile", path="/api/meta-profiles/nope"),
        S("POST /api/meta-profiles/{name}/activate", "activate m1", path="/api/meta-profiles/m1/activate"),
        S("GET /api/meta-profiles", "meta-profiles, one"),
        S("DELETE /api/meta-profiles/{name}", "delete m1", path="/api/meta-profiles/m1"),
        S("DELETE /api/meta-profiles/{name}", "delete it again", path="/api/meta-profiles/m1"),
        S("DELETE /api/profiles/{name}", "delete p2", path="/api/profiles/p2"),
        S("DELETE /api/profiles/{name}", "delete it again", path="/api/profiles/p2"),
        S("GET /api/settings", "settings at the end"),
        # static catalogs
        S("GET /api/llm/providers", "LLM providers"),
        S("GET /api/llm/models", "LLM models"),
        S("GET /api/llm/models", "LLM models of one provider", params={"provider": "anthropic"}),
        S("GET /api/llm/models/verified", "verified models"),
        # subscription login (no network: every outbound call fails the same way)
        S("GET /api/llm/subscription/openai/status", "subscription status"),
        S("GET /api/llm/subscription/openai/models", "subscription models"),
        S("POST /api/llm/subscription/openai/logout", "subscription logout"),
        S("POST /api/llm/subscription/openai/device/start", "device login start (no network)", design=CORS_ON_500),
        S("POST /api/llm/subscription/openai/device/poll", "device login poll, unknown code", json={"device_code": "nope"}),
        S("POST /api/llm/subscription/openai/device/poll", "device login poll, invalid body", json={}),
        S("POST /api/acp/models", "ACP model discovery, invalid body", json={}),
        S("POST /api/acp/models", "ACP model discovery, unknown CLI",
          json={"agent_settings": {"agent_kind": "acp", "acp_command": ["/nonexistent/acp-cli"]}}),
    ]


def home_steps() -> list[Step]:
    """Server-wide routes nestor sends to its home agent-server."""
    return [
        S("GET /api/tools/", "tool names"),
        S("GET /api/tools/catalog", "tool catalog"),
        S("GET /api/skills/catalog", "skills catalog"),
        S("GET /api/skills/marketplace", "skills marketplace"),
        S("GET /api/skills/installed", "installed skills"),
        S("POST /api/skills/install", "install a skill from a missing path", json={"source": "/nonexistent/skill"}),
        S("POST /api/skills/install", "install, invalid body", json={}),
        S("GET /api/skills/installed/{skill_name}", "an unknown skill", path="/api/skills/installed/nope"),
        S("PATCH /api/skills/installed/{skill_name}", "enable an unknown skill", path="/api/skills/installed/nope", json={"enabled": False}),
        S("DELETE /api/skills/installed/{skill_name}", "uninstall an unknown skill", path="/api/skills/installed/nope"),
        S("POST /api/skills/installed/{skill_name}/refresh", "refresh an unknown skill", path="/api/skills/installed/nope/refresh"),
        S("POST /api/skills/sync", "sync skills (no network)"),
        S("POST /api/skills", "load skills of the workspace", json={"load_public": False, "load_user": False, "load_project": True, "project_dir": "${ws}"}),
        S("GET /api/plugins/marketplace", "plugins marketplace"),
        S("GET /api/plugins/installed", "installed plugins"),
        S("POST /api/plugins/install", "install a plugin from a missing path", json={"source": "/nonexistent/plugin"}),
        S("POST /api/plugins/fetch", "fetch a plugin from a missing path", json={"source": "/nonexistent/plugin"}),
        S("POST /api/plugins/fetch", "fetch, invalid body", json={}),
        S("GET /api/plugins/installed/{plugin_name}", "an unknown plugin", path="/api/plugins/installed/nope"),
        S("PATCH /api/plugins/installed/{plugin_name}", "enable an unknown plugin", path="/api/plugins/installed/nope", json={"enabled": False}),
        S("DELETE /api/plugins/installed/{plugin_name}", "uninstall an unknown plugin", path="/api/plugins/installed/nope"),
        S("POST /api/plugins/installed/{plugin_name}/refresh", "refresh an unknown plugin", path="/api/plugins/installed/nope/refresh"),
        S("POST /api/plugins", "load plugins of the workspace", json={"load_user": False, "load_project": True, "project_dir": "${ws}"}),
        S("POST /api/hooks", "hooks of the workspace", json={"project_dir": "${ws}"}),
        S("POST /api/hooks", "hooks without a project", json={}),
        S("POST /api/sub-agents", "sub-agents", json={"load_builtin": True, "load_user": False, "load_project": True, "project_dir": "${ws}"}),
        S("POST /api/mcp/test", "test an unreachable MCP server",
          json={"server": {"url": "http://127.0.0.1:9/mcp", "transport": "http"}, "timeout": 5}, ignore=("elapsed_ms", "duration_ms")),
        S("POST /api/mcp/test", "test, invalid body", json={}),
        S("POST /api/mcp/oauth/start", "OAuth start for an unreachable server",
          json={"server": {"url": "http://127.0.0.1:9/mcp", "transport": "http"}, "timeout": 5}),
        S("GET /api/mcp/oauth/status/{job_id}", "OAuth status of an unknown job", path="/api/mcp/oauth/status/job1"),
        S("POST /api/mcp/oauth/callback/{job_id}", "OAuth callback of an unknown job", path="/api/mcp/oauth/callback/job1",
          json={"callback_url": "http://localhost/cb?code=x&state=y"}),
        S("GET /api/workspaces", "saved workspaces, none"),
        S("POST /api/workspaces", "save a workspace", json={"workspaces": ["${ws}"]}),
        S("POST /api/workspaces/parents", "save a workspace parent", json={"parents": ["${root}/ws"]}),
        S("GET /api/workspaces", "saved workspaces"),
        S("DELETE /api/workspaces/parents", "remove the parent", params={"path": "${root}/ws"}),
        S("DELETE /api/workspaces", "remove the workspace", params={"path": "${ws}"}),
        S("DELETE /api/workspaces", "remove, missing path", params=None),
        S("GET /api/file/home", "file picker: home"),
        S("GET /api/file/search_subdirs", "file picker: sub-directories", params={"path": "${root}/ws"}),
        S("GET /api/file/search_subdirs", "file picker: missing directory", params={"path": "${root}/nope"}),
        S("GET /api/git/repositories/search", "git provider search without a token", params={"provider": "github", "query": "x"}),
        S("GET /api/git/repositories/search", "git provider search, missing provider"),
        S("GET /api/canvas-extensions/installed", "installed canvas extensions"),
        S("POST /api/canvas-extensions/install", "install an extension from a missing path", json={"source": "/nonexistent/ext"}),
        S("POST /api/canvas-extensions/install", "install, invalid body", json={}),
        S("GET /api/canvas-extensions/installed/{extension_name}", "an unknown extension"),
        S("PATCH /api/canvas-extensions/installed/{extension_name}", "enable an unknown extension", json={"enabled": True}),
        S("DELETE /api/canvas-extensions/installed/{extension_name}", "uninstall an unknown extension"),
        S("GET /api/canvas-extensions/installed/{extension_name}/backend", "backend of an unknown extension"),
        S("DELETE /api/canvas-extensions/installed/{extension_name}/backend/data", "backend data of an unknown extension"),
        S("GET /api/canvas-extensions/installed/{extension_name}/backend/logs", "backend logs of an unknown extension"),
        S("POST /api/canvas-extensions/installed/{extension_name}/backend/prepare", "prepare an unknown backend", json={"revision": "r1"}),
        S("POST /api/canvas-extensions/installed/{extension_name}/backend/start", "start an unknown backend", json={"revision": "r1"}),
        S("POST /api/canvas-extensions/installed/{extension_name}/backend/stop", "stop an unknown backend"),
        S("GET /api/canvas-extensions/installed/{extension_name}/bundle", "bundle of an unknown extension"),
        S("GET /api/canvas-extensions/installed/{extension_name}/icon", "icon of an unknown extension"),
        S("POST /app-backends/{extension_name}/session", "app-backend session of an unknown extension"),
        S("DELETE /app-backends/{extension_name}/session", "end an app-backend session of an unknown extension"),
        S("ANY /app-backends/{extension_name}[/{path}]", "app-backend proxy, unknown extension", method="GET", path="/app-backends/ext1/x"),
        S("GET /api/init", "deferred init status (not deferred)"),
        S("POST /api/init", "deferred init (not deferred)", json={}),
    ]


def conversation_steps() -> list[Step]:
    """One conversation's life, its events, controls and workspace."""
    done = status_in("finished", "error", "stuck")
    return [
        S("GET /api/conversations/count", "count, none"),
        S("GET /api/conversations/search", "search, none"),
        S("POST /api/conversations", "create, invalid body", json={"agent": AGENT}),
        S("POST /api/conversations", "create, malformed JSON", content="{bad", headers={"Content-Type": "application/json"}),
        S("POST /api/conversations", "create, bad id", json=create_body("not-a-uuid")),
        S("POST /api/conversations", "create", json=create_body("${cid}"), expect=201),
        S("POST /api/conversations", "create again (idempotent)", json=create_body("${cid}"), expect=200),
        S("POST /api/conversations", "create a second one", json=create_body("${cid_del}", ws="${ws_other}", tags={"kind": "scratch"}), expect=201),
        S("GET /api/conversations/{conversation_id}", "read it"),
        S("GET /api/conversations/{conversation_id}", "read it with skills", params={"include_skills": "true"}),
        S("GET /api/conversations/{conversation_id}", "read a malformed id", path="/api/conversations/not-a-uuid"),
        S("GET /api/conversations/count", "count, two"),
        S("GET /api/conversations/count", "count of idle ones", params={"status": "idle"}),
        S("GET /api/conversations/count", "count, bad status", params={"status": "sleeping"}),
        S("GET /api/conversations/search", "search, both", params={"sort_order": "CREATED_AT"}),
        S("GET /api/conversations/search", "search, limit 1", params={"limit": 1, "sort_order": "CREATED_AT"},
          capture=cap("page2", lambda v: v["next_page_id"]), design=PAGE_TOKEN),
        S("GET /api/conversations/search", "search, second page", params={"limit": 1, "sort_order": "CREATED_AT", "page_id": "${page2}"}),
        S("GET /api/conversations/search", "search, bad limit", params={"limit": 0}),
        S("GET /api/conversations/search", "search, bad sort order", params={"sort_order": "SIDEWAYS"}),
        S("GET /api/conversations", "batch read", params=[("ids", "${cid}"), ("ids", "${unknown}"), ("ids", "${cid_del}")]),
        S("GET /api/conversations", "batch read, bad id", params=[("ids", "nope")]),
        S("GET /api/conversations", "batch read, no ids"),
        S("PATCH /api/conversations/{conversation_id}", "set title and tags", json={"title": "Fidelity", "tags": {"team": "nestor"}}),
        S("PATCH /api/conversations/{conversation_id}", "blank title", json={"title": "  "}),
        # events
        S("POST /api/conversations/{conversation_id}/events", "send a message (no run)", json=message("hello, no run")),
        S("POST /api/conversations/{conversation_id}/events", "send, invalid body", json={"content": "x", "role": "robot"}),
        S("GET /api/conversations/{conversation_id}/events/search", "events", ignore=("llm_response_id",)),
        S("POST /api/conversations/{conversation_id}/events", "send a message and run",
          json=message("RUN: echo fidelity\nFINISH: all done", run=True)),
        S("GET /api/conversations/{conversation_id}", "wait for the run to finish", poll=(done, 90),
          ignore=("metrics", "stats"), before=settle),
        S("GET /api/conversations/{conversation_id}/events/search", "events after the run",
          params={"limit": 100}, capture=caps(event_id=lambda v: v["items"][0]["id"], last_event_id=lambda v: v["items"][-1]["id"],
                                              since_ts=lambda v: next(e["timestamp"] for e in v["items"] if e.get("kind") == "MessageEvent"
                                                                      and "RUN:" in json.dumps(e))),
          ignore=STAT_KEYS, unordered=True),
        S("GET /api/conversations/{conversation_id}/events/search", "events, oldest 2", params={"limit": 2, "sort_order": "TIMESTAMP"},
          ignore=STAT_KEYS),
        S("GET /api/conversations/{conversation_id}/events/search", "events, by kind", params={"kind": "MessageEvent"}, ignore=STAT_KEYS),
        S("GET /api/conversations/{conversation_id}/events/search", "events, by text", params={"body": "FIDELITY"}, ignore=STAT_KEYS),
        S("GET /api/conversations/{conversation_id}/events/search", "events, bad limit", params={"limit": 1000}),
        S("GET /api/conversations/{conversation_id}/events/count", "event count"),
        S("GET /api/conversations/{conversation_id}/events/count", "event count by source", params={"source": "user"}),
        S("GET /api/conversations/{conversation_id}/events/{event_id}", "one event", ignore=STAT_KEYS),
        S("GET /api/conversations/{conversation_id}/events/{event_id}", "an unknown event", path="/api/conversations/${cid}/events/${unknown}"),
        S("GET /api/conversations/{conversation_id}/events", "events by id (GET with a body)",
          json=["${event_id}", "${unknown}"], ignore=STAT_KEYS),
        S("GET /api/conversations/{conversation_id}/agent_final_response", "final response"),
        S("POST /api/conversations/{conversation_id}/ask_agent", "side question", json={"question": "what happened?"}),
        S("POST /api/conversations/{conversation_id}/ask_agent", "side question, invalid body", json={}),
        S("POST /api/conversations/{conversation_id}/confirmation_policy", "confirmation policy", json={"policy": {"kind": "NeverConfirm"}}),
        S("POST /api/conversations/{conversation_id}/confirmation_policy", "confirmation policy, invalid", json={"policy": {"kind": "Sometimes"}}),
        S("POST /api/conversations/{conversation_id}/security_analyzer", "security analyzer off", json={"security_analyzer": None}),
        S("POST /api/conversations/{conversation_id}/events/respond_to_confirmation", "confirm (nothing pending)", json={"accept": True}),
        S("POST /api/conversations/{conversation_id}/switch_llm", "switch LLM", json={"llm": {**LLM, "usage_id": "agent"}}),
        S("POST /api/conversations/{conversation_id}/switch_profile", "switch to an unknown profile", json={"profile_name": "nope"}),
        S("POST /api/conversations/{conversation_id}/switch_acp_model", "switch ACP model (not an ACP agent)", json={"model": "x"}),
        S("POST /api/conversations/{conversation_id}/load_plugin", "load an unknown plugin", json={"plugin_ref": "nope"}),
        S("POST /api/conversations/{conversation_id}/condense", "condense"),
        S("POST /api/conversations/{conversation_id}/secrets", "conversation secrets", json={"secrets": {"TOKEN": "t0k3n"}}),
        S("POST /api/conversations/{conversation_id}/navigate", "navigate to the first event", json={"event_id": "${event_id}"},
          ignore=STAT_KEYS + ("leaf_event_id",)),
        S("POST /api/conversations/{conversation_id}/navigate", "navigate back to the latest", json={"event_id": None},
          ignore=STAT_KEYS + ("leaf_event_id",)),
        S("POST /api/conversations/{conversation_id}/goal", "start a goal", json={"objective": "FINISH: goal done", "max_iterations": 2}),
        S("GET /api/conversations/{conversation_id}", "wait for the goal", poll=(done, 90), ignore=STAT_KEYS, before=settle),
        S("POST /api/conversations/{conversation_id}/goal/stop", "stop the goal", before=settle),
        S("POST /api/conversations/{conversation_id}/goal/resume", "resume the goal"),
        S("GET /api/conversations/{conversation_id}", "wait after resuming", poll=(done, 90), ignore=STAT_KEYS, before=settle),
        S("POST /api/conversations/{conversation_id}/goal/stop", "stop it again"),
        S("POST /api/conversations/{conversation_id}/interrupt", "interrupt (idle)"),
        S("POST /api/conversations/{conversation_id}/pause", "pause (idle)"),
        S("POST /api/conversations/{conversation_id}/run", "run again", ),
        S("GET /api/conversations/{conversation_id}", "wait after the rerun", poll=(done, 90), ignore=STAT_KEYS, before=settle),
        S("GET /api/conversations/{conversation_id}/runtime", "runtime state"),
        S("POST /api/conversations/{conversation_id}/runtime/reprovision", "reprovision (running)"),
        S("PUT /api/conversations/{conversation_id}/credential-bindings/{secret_name}", "credential binding, invalid URL",
          json={"url": "not a url", "headers": {}}),
        S("PUT /api/conversations/{conversation_id}/credential-bindings/{secret_name}", "credential binding, missing body"),
        S("DELETE /api/conversations/{conversation_id}/runtime", "stop the runtime (docker-mode route)", design=RUNTIME_DELETE),
        S("POST /api/conversations/{conversation_id}/runtime/credentials", "a conversation key (docker-mode route)",
          design=RUNTIME_CREDENTIALS),
        S("POST /api/conversations/prepare-for-sandbox-pause", "prepare for sandbox pause", design=SANDBOX_PAUSE),
        # workspace files (header or cookie)
        S("GET /api/conversations/{conversation_id}/workspace", "workspace root"),
        S("GET /api/conversations/{conversation_id}/workspace/{file_path}", "a workspace file"),
        S("GET /api/conversations/{conversation_id}/workspace/{file_path}", "a directory's index.html", path="/api/conversations/${cid}/workspace/docs"),
        S("GET /api/conversations/{conversation_id}/workspace/{file_path}", "a missing file", path="/api/conversations/${cid}/workspace/nope.txt"),
        S("GET /api/conversations/{conversation_id}/workspace/{file_path}", "a path escaping the workspace",
          path="/api/conversations/${cid}/workspace/..%2F..%2Fetc%2Fpasswd"),
        S("POST /api/auth/workspace-session", "mint the workspace cookie"),
        S("GET /api/conversations/{conversation_id}/workspace/{file_path}", "a workspace file by cookie", auth="none",
          headers={"Cookie": "oh_workspace_session_key=${key}"}),
        S("GET /api/conversations/{conversation_id}/workspace/{file_path}", "a workspace file with a wrong cookie", auth="none",
          headers={"Cookie": "oh_workspace_session_key=wrong"}),
        S("DELETE /api/auth/workspace-session", "clear the workspace cookie"),
        S("POST /api/auth/workspace-session", "cookie over https (X-Forwarded-Proto)", headers={"X-Forwarded-Proto": "https"}),
        S("GET /api/file/download-trajectory/{conversation_id}", "trajectory zip"),
        S("GET /api/file/download-trajectory/{conversation_id}", "trajectory of an unknown conversation",
          path="/api/file/download-trajectory/${unknown}"),
    ]


STAT_KEYS = ("metrics", "stats", "llm_response_id", "response_latency", "latency", "latencies", "accumulated_cost",
             "token_usages", "response_latencies", "costs")


def scoped_workspace_steps() -> list[Step]:
    """``/api/conversations/{id}/bash|file|git|vscode`` (1.58 conversation-scoped routes)."""
    p = "/api/conversations/${cid}"
    return [
        S("POST /api/conversations/{runtime_conversation_id}/bash/execute_bash_command", "scoped: run a command",
          json={"command": "echo scoped && pwd", "cwd": "${ws}"}, ignore=BASH_VOLATILE),
        S("POST /api/conversations/{runtime_conversation_id}/bash/execute_bash_command", "scoped: cwd outside the workspace",
          json={"command": "pwd", "cwd": "/"}),
        S("POST /api/conversations/{runtime_conversation_id}/bash/start_bash_command", "scoped: start a command",
          json={"command": "sleep 30", "cwd": "${ws}"}, capture=cap("scoped_command_id", lambda v: v["id"]), ignore=BASH_VOLATILE),
        S("POST /api/conversations/{runtime_conversation_id}/bash/bash_commands/{command_id}/stop", "scoped: stop it",
          path=p + "/bash/bash_commands/${scoped_command_id}/stop"),
        S("POST /api/conversations/{runtime_conversation_id}/bash/bash_commands/{command_id}/stop", "scoped: stop an unknown command",
          path=p + "/bash/bash_commands/${unknown_hex}/stop"),
        S("GET /api/conversations/{runtime_conversation_id}/bash/bash_events/search", "scoped: bash events",
          params={"kind__eq": "BashCommand"}, capture=cap("scoped_event_id", lambda v: v["items"][0]["id"]), ignore=BASH_VOLATILE),
        S("GET /api/conversations/{runtime_conversation_id}/bash/bash_events/{event_id}", "scoped: one bash event",
          path=p + "/bash/bash_events/${scoped_event_id}", ignore=BASH_VOLATILE),
        S("GET /api/conversations/{runtime_conversation_id}/bash/bash_events/{event_id}", "scoped: an unknown bash event",
          path=p + "/bash/bash_events/${unknown_hex}"),
        S("GET /api/conversations/{runtime_conversation_id}/bash/bash_events/", "scoped: bash events by id (GET with a body)",
          path=p + "/bash/bash_events/", json=["${scoped_event_id}", "${unknown_hex}"], ignore=BASH_VOLATILE),
        S("DELETE /api/conversations/{runtime_conversation_id}/bash/bash_events", "scoped: clear bash events"),
        S("POST /api/conversations/{runtime_conversation_id}/file/upload", "scoped: upload", params={"path": "${ws}/uploaded.txt"},
          files={"file": ("uploaded.txt", b"uploaded content\n")}),
        S("POST /api/conversations/{runtime_conversation_id}/file/upload", "scoped: upload outside the workspace",
          params={"path": "/tmp/fidelity-outside.txt"}, files={"file": ("x.txt", b"x")}),
        S("GET /api/conversations/{runtime_conversation_id}/file/download", "scoped: download", params={"path": "${ws}/uploaded.txt"}),
        S("GET /api/conversations/{runtime_conversation_id}/file/download", "scoped: download a missing file", params={"path": "${ws}/nope"}),
        S("POST /api/conversations/{runtime_conversation_id}/file/create_directory", "scoped: create a directory",
          params={"path": "${ws}/newdir"}),
        S("GET /api/conversations/{runtime_conversation_id}/file/archive", "scoped: archive (git delta)", params={"path": "${ws}"}),
        S("GET /api/conversations/{runtime_conversation_id}/file/archive", "scoped: archive (tar.gz)",
          params={"path": "${ws}", "format": "tar.gz"}),
        S("GET /api/conversations/{runtime_conversation_id}/file/download-trajectory/{conversation_id}", "scoped: trajectory",
          path=p + "/file/download-trajectory/${cid}"),
        S("GET /api/conversations/{runtime_conversation_id}/file/download-trajectory/{conversation_id}", "scoped: another conversation's trajectory",
          path=p + "/file/download-trajectory/${cid_del}"),
        S("GET /api/conversations/{runtime_conversation_id}/git/changes", "scoped: git changes", params={"path": "${ws}"}),
        S("GET /api/conversations/{runtime_conversation_id}/git/diff", "scoped: git diff", params={"path": "${ws}/README.md"}),
        S("GET /api/conversations/{runtime_conversation_id}/git/commits", "scoped: git commits", params={"path": "${ws}"}),
        S("GET /api/conversations/{runtime_conversation_id}/git/commits/{sha}/changes", "scoped: changes of a commit",
          path=p + "/git/commits/${sha}/changes", params={"path": "${ws}"}),
        S("GET /api/conversations/{runtime_conversation_id}/git/changes", "scoped: git changes outside the workspace", params={"path": "/"}),
        S("GET /api/conversations/{runtime_conversation_id}/vscode/status", "scoped: VS Code status (disabled)"),
        S("GET /api/conversations/{runtime_conversation_id}/vscode/url", "scoped: VS Code URL (disabled)"),
    ]


BASH_VOLATILE = ("timestamp", "duration", "pid")


def global_workspace_steps() -> list[Step]:
    """Host-global bash/file/git/vscode routes, addressed with the conversation header (the
    agent-server ignores it); plus one unaddressed request per route (nestor: 400)."""
    h = CONV_HEADER
    out = [
        S("POST /api/bash/execute_bash_command", "run a command", headers=h, json={"command": "echo global", "cwd": "${ws}"},
          ignore=BASH_VOLATILE),
        S("POST /api/bash/start_bash_command", "start a command", headers=h, json={"command": "sleep 30", "cwd": "${ws}"},
          capture=cap("command_id", lambda v: v["id"]), ignore=BASH_VOLATILE),
        S("POST /api/bash/bash_commands/{command_id}/stop", "stop it", headers=h),
        S("POST /api/bash/bash_commands/{command_id}/stop", "stop an unknown command", headers=h,
          path="/api/bash/bash_commands/${unknown_hex}/stop"),
        S("GET /api/bash/bash_events/search", "bash events", headers=h, params={"kind__eq": "BashCommand", "sort_order": "TIMESTAMP"},
          capture=cap("event_id", lambda v: v["items"][0]["id"]), ignore=BASH_VOLATILE),
        S("GET /api/bash/bash_events/{event_id}", "one bash event", headers=h, ignore=BASH_VOLATILE),
        S("GET /api/bash/bash_events/{event_id}", "an unknown bash event", headers=h, path="/api/bash/bash_events/${unknown_hex}"),
        S("GET /api/bash/bash_events/", "bash events by id (GET with a body)", headers=h, json=["${event_id}", "${unknown_hex}"],
          ignore=BASH_VOLATILE),
        S("POST /api/file/upload", "upload", headers=h, params={"path": "${ws}/global.txt"}, files={"file": ("global.txt", b"global\n")}),
        S("POST /api/file/upload", "upload to a relative path", headers=h, params={"path": "relative.txt"}, files={"file": ("r.txt", b"r")}),
        S("GET /api/file/download", "download", headers=h, params={"path": "${ws}/global.txt"}),
        S("GET /api/file/download", "download a directory", headers=h, params={"path": "${ws}"}),
        S("POST /api/file/create_directory", "create a directory", headers=h, params={"path": "${ws}/globaldir"}),
        S("GET /api/file/archive", "archive (git delta)", headers=h, params={"path": "${ws}"}),
        S("GET /api/git/changes", "git changes", headers=h, params={"path": "${ws}"}),
        S("GET /api/git/diff", "git diff", headers=h, params={"path": "${ws}/README.md"}),
        S("GET /api/git/commits", "git commits", headers=h, params={"path": "${ws}", "limit": 5}),
        S("GET /api/git/commits/{sha}/changes", "changes of a commit", headers=h, params={"path": "${ws}"}),
        S("GET /api/git/changes", "git changes of a non-repository", headers=h, params={"path": "${root}"}),
        S("GET /api/vscode/status", "VS Code status (disabled)", headers=h),
        S("GET /api/vscode/url", "VS Code URL (disabled)", headers=h),
        S("DELETE /api/bash/bash_events", "clear bash events", headers=h),
    ]
    # Unaddressed: the agent-server acts on its host; nestor asks which conversation.
    unaddressed = {
        "POST /api/bash/execute_bash_command": {"json": {"command": "echo x"}},
        "POST /api/bash/start_bash_command": {"json": {"command": "echo x"}},
        "POST /api/bash/bash_commands/{command_id}/stop": {},
        "GET /api/bash/bash_events/search": {},
        "GET /api/bash/bash_events/{event_id}": {},
        "GET /api/bash/bash_events/": {"json": []},
        "DELETE /api/bash/bash_events": {},
        "POST /api/file/upload": {"params": {"path": "/tmp/fidelity-unaddressed.txt"}, "files": {"file": ("u.txt", b"u")}},
        "GET /api/file/download": {"params": {"path": "/etc/hostname"}},
        "POST /api/file/create_directory": {"params": {"path": "/tmp/fidelity-unaddressed-dir"}},
        "GET /api/file/archive": {"params": {"path": "/tmp"}},
        "GET /api/git/changes": {"params": {"path": "/tmp"}},
        "GET /api/git/diff": {"params": {"path": "/tmp/x"}},
        "GET /api/git/commits": {"params": {"path": "/tmp"}},
        "GET /api/git/commits/{sha}/changes": {"params": {"path": "/tmp"}},
        "GET /api/vscode/status": {},
        "GET /api/vscode/url": {},
    }
    for route, kw in unaddressed.items():
        out.append(S(route, "unaddressed", design=NEEDS_ADDRESS, **kw))
    return out


def lifecycle_steps() -> list[Step]:
    """Fork, children, the OpenAI gateway, unknown conversations, deletes."""
    return [
        S("POST /api/conversations/{conversation_id}/fork", "fork with a chosen id",
          json={"id": "${cid_fork}", "title": "Forked", "tags": {"kind": "fork"}}, ignore=STAT_KEYS, expect=201),
        S("POST /api/conversations/{conversation_id}/fork", "fork onto a taken id", json={"id": "${cid_fork}"}),
        S("GET /api/conversations/{conversation_id}", "read the fork", path="/api/conversations/${cid_fork}", ignore=STAT_KEYS),
        S("POST /api/conversations/{conversation_id}/children", "start a child",
          json={"task": "FINISH: child done", "title": "Child", "isolation": "shared"},
          capture=cap("child_id", lambda v: v["conversation_id"]), expect=201),
        S("POST /api/conversations/{conversation_id}/children", "child, invalid body", json={"isolation": "nope"}),
        S("GET /api/conversations/{conversation_id}", "wait for the child", path="/api/conversations/${child_id}",
          poll=(status_in("finished", "error", "stuck"), 90), ignore=STAT_KEYS),
        S("GET /api/conversations/count", "count with fork and child"),
        S("GET /api/conversations/search", "search with fork and child", params={"sort_order": "CREATED_AT"}, ignore=STAT_KEYS),
        S("GET /v1/models", "OpenAI gateway: models", design=V1_MODELS),
        S("POST /v1/chat/completions", "OpenAI gateway: chat, invalid body", json={"messages": []}),
        S("POST /v1/chat/completions", "OpenAI gateway: chat in an unknown conversation",
          headers={"X-OpenHands-ServerConversation-ID": "${unknown}"},
          json={"model": "openhands", "messages": [{"role": "user", "content": "hi"}]}, design=V1_ORDER),
        S("POST /v1/responses", "OpenAI gateway: responses, invalid body", json={"model": "openhands"}),
        S("POST /v1/chat/completions", "OpenAI gateway: chat, bearer auth", auth="none",
          headers={"Authorization": "Bearer ${key}"}, json={"messages": []}),
        S("DELETE /api/conversations/{conversation_id}", "delete the second conversation", path="/api/conversations/${cid_del}"),
        S("GET /api/conversations/{conversation_id}", "read the deleted one", path="/api/conversations/${cid_del}"),
        S("DELETE /api/conversations/{conversation_id}", "delete it again", path="/api/conversations/${cid_del}"),
        S("DELETE /api/conversations/{conversation_id}", "delete the fork", path="/api/conversations/${cid_fork}"),
        S("GET /api/conversations/count", "count after deletes"),
    ]


# Per-conversation routes: (route, valid body or UNSET, query) for requests that reach the
# existence check (the agent-server validates the body first).
UNKNOWN_ROUTES: list[tuple[str, Any, Any]] = [
    ("GET /api/conversations/{conversation_id}", UNSET, None),
    ("PATCH /api/conversations/{conversation_id}", {"title": "x"}, None),
    ("DELETE /api/conversations/{conversation_id}", UNSET, None),
    ("GET /api/conversations/{conversation_id}/agent_final_response", UNSET, None),
    ("POST /api/conversations/{conversation_id}/ask_agent", {"question": "q"}, None),
    ("POST /api/conversations/{conversation_id}/children", {"task": "t"}, None),
    ("POST /api/conversations/{conversation_id}/condense", UNSET, None),
    ("POST /api/conversations/{conversation_id}/confirmation_policy", {"policy": {"kind": "NeverConfirm"}}, None),
    ("GET /api/conversations/{conversation_id}/events", [], None),
    ("POST /api/conversations/{conversation_id}/events", message("x"), None),
    ("GET /api/conversations/{conversation_id}/events/count", UNSET, None),
    ("POST /api/conversations/{conversation_id}/events/respond_to_confirmation", {"accept": True}, None),
    ("GET /api/conversations/{conversation_id}/events/search", UNSET, None),
    ("GET /api/conversations/{conversation_id}/events/{event_id}", UNSET, None),
    ("POST /api/conversations/{conversation_id}/fork", {}, None),
    ("POST /api/conversations/{conversation_id}/goal", {"objective": "o"}, None),
    ("POST /api/conversations/{conversation_id}/goal/resume", UNSET, None),
    ("POST /api/conversations/{conversation_id}/goal/stop", UNSET, None),
    ("POST /api/conversations/{conversation_id}/interrupt", UNSET, None),
    ("POST /api/conversations/{conversation_id}/load_plugin", {"plugin_ref": "p"}, None),
    ("POST /api/conversations/{conversation_id}/navigate", {"event_id": None}, None),
    ("POST /api/conversations/{conversation_id}/pause", UNSET, None),
    ("POST /api/conversations/{conversation_id}/run", UNSET, None),
    ("GET /api/conversations/{conversation_id}/runtime", UNSET, None),
    ("POST /api/conversations/{conversation_id}/runtime/reprovision", UNSET, None),
    ("POST /api/conversations/{conversation_id}/secrets", {"secrets": {}}, None),
    ("POST /api/conversations/{conversation_id}/security_analyzer", {"security_analyzer": None}, None),
    ("POST /api/conversations/{conversation_id}/switch_acp_model", {"model": "m"}, None),
    ("POST /api/conversations/{conversation_id}/switch_llm", {"llm": LLM}, None),
    ("POST /api/conversations/{conversation_id}/switch_profile", {"profile_name": "p"}, None),
    ("GET /api/conversations/{conversation_id}/workspace", UNSET, None),
    ("GET /api/conversations/{conversation_id}/workspace/{file_path}", UNSET, None),
    ("PUT /api/conversations/{conversation_id}/credential-bindings/{secret_name}", {"url": "http://127.0.0.1:9/c", "headers": {}}, None),
    ("POST /api/conversations/{runtime_conversation_id}/bash/bash_commands/{command_id}/stop", UNSET, None),
    ("DELETE /api/conversations/{runtime_conversation_id}/bash/bash_events", UNSET, None),
    ("GET /api/conversations/{runtime_conversation_id}/bash/bash_events/", [], None),
    ("GET /api/conversations/{runtime_conversation_id}/bash/bash_events/search", UNSET, None),
    ("GET /api/conversations/{runtime_conversation_id}/bash/bash_events/{event_id}", UNSET, None),
    ("POST /api/conversations/{runtime_conversation_id}/bash/execute_bash_command", {"command": "true"}, None),
    ("POST /api/conversations/{runtime_conversation_id}/bash/start_bash_command", {"command": "true"}, None),
    ("GET /api/conversations/{runtime_conversation_id}/file/archive", UNSET, {"path": "/tmp"}),
    ("POST /api/conversations/{runtime_conversation_id}/file/create_directory", UNSET, {"path": "/tmp/x"}),
    ("GET /api/conversations/{runtime_conversation_id}/file/download", UNSET, {"path": "/tmp/x"}),
    ("GET /api/conversations/{runtime_conversation_id}/file/download-trajectory/{conversation_id}", UNSET, None),
    ("POST /api/conversations/{runtime_conversation_id}/file/upload", UNSET, {"path": "/tmp/x"}),
    ("GET /api/conversations/{runtime_conversation_id}/git/changes", UNSET, {"path": "/tmp"}),
    ("GET /api/conversations/{runtime_conversation_id}/git/commits", UNSET, {"path": "/tmp"}),
    ("GET /api/conversations/{runtime_conversation_id}/git/commits/{sha}/changes", UNSET, {"path": "/tmp"}),
    ("GET /api/conversations/{runtime_conversation_id}/git/diff", UNSET, {"path": "/tmp/x"}),
    ("GET /api/conversations/{runtime_conversation_id}/vscode/status", UNSET, None),
    ("GET /api/conversations/{runtime_conversation_id}/vscode/url", UNSET, None),
    ("POST /api/conversations/{conversation_id}/runtime/credentials", UNSET, None),
]


def unknown_conversation_steps() -> list[Step]:
    out = []
    for route, body, params in UNKNOWN_ROUTES:
        path = concrete(route.split(" ", 1)[1]).replace("${cid}", "${unknown}")
        kw: dict[str, Any] = {"path": path, "params": params}
        if body is not UNSET:
            kw["json"] = body
        if route.endswith("/file/upload"):
            kw["files"] = {"file": ("x.txt", b"x")}
        out.append(S(route, "unknown conversation", **kw))
    out.append(S("DELETE /api/conversations/{conversation_id}/runtime", "unknown conversation",
                 path="/api/conversations/${unknown}/runtime", design=Design(
                     RUNTIME_DELETE.reason, nestor_answers(404, "Not Found", direct_status=405))))
    # The agent-server validates a body before it looks the conversation up; nestor looks it
    # up first (it must know where to send the request).
    order = Design(VALIDATION_ORDER, nestor_answers(404, "Not Found", direct_status=422), short="body validated after the lookup")
    out.append(S("PATCH /api/conversations/{conversation_id}", "unknown conversation, invalid body",
                 path="/api/conversations/${unknown}", json={"title": ""}, cross="validation-order", design=order))
    out.append(S("POST /api/conversations/{conversation_id}/goal", "unknown conversation, invalid body",
                 path="/api/conversations/${unknown}/goal", json={}, cross="validation-order", design=order))
    # Routes whose handler looks the conversation up first (the event routes) agree.
    out.append(S("POST /api/conversations/{conversation_id}/events", "unknown conversation, invalid body",
                 path="/api/conversations/${unknown}/events", json={"role": "robot"}, cross="validation-order"))
    return out


VALIDATION_ORDER = (
    "an unknown conversation with an invalid body: most conversation routes of the agent-server "
    "validate the body first (`422`); nestor must find the conversation's agent-server before "
    "anything reads the body, so it answers that route's `404` (the event routes look the "
    "conversation up first on the agent-server too, and agree)"
)


def auth_steps(routes: list[Route]) -> list[Step]:
    """Every route without a key and with a wrong key (no body: auth comes first)."""
    out = []
    seen = set()
    for r in routes:
        if r.method in ("WS",) or r.key in seen:
            continue
        seen.add(r.key)
        method = "GET" if r.method == "ANY" else r.method
        for mode in ("none", "wrong"):
            out.append(S(r.key, f"auth: {'no key' if mode == 'none' else 'wrong key'}", method=method, path=concrete(r.path),
                         auth=mode, origin=False, ignore=("uptime", "idle_time"), design=AUTH_DESIGNS.get(r.key)))
    return out


# ---------------------------------------------------------------- WebSockets

from .fidelity import WsScenario  # noqa: E402

EVENTS = "WS /sockets/events/{conversation_id}"
SESSION = "WS /sockets/session/{conversation_id}"
BASH = "WS /sockets/bash-events"
APP_WS = "WS /app-backends/{extension_name}[/{path}]"

BASH_NEEDS_ADDRESS = Design(
    "host-global socket: behind nestor it must name its conversation (header "
    "`X-OpenHands-ServerConversation-ID` or a conversation key); unaddressed, the upgrade is "
    "refused with 400 and a detail saying how. Addressed, the frames are the agent-server's",
    nestor_answers(400, lambda b: "X-OpenHands-ServerConversation-ID" in str(b)),
    short="must name a conversation (else 400); addressed: identical",
)


def ws_scenarios() -> list[WsScenario]:
    ev = "/sockets/events/${cid}"
    se = "/sockets/session/${cid}"
    ign = STAT_KEYS
    out = [
        WsScenario(EVENTS, "header key: first frame", ev, ignore=ign),
        WsScenario(EVENTS, "query key: first frame", ev, auth="query", ignore=ign),
        WsScenario(EVENTS, "first-frame auth: first frame", ev, auth="frame", ignore=ign),
        WsScenario(EVENTS, "no key configured in the request: open until the auth frame", ev, auth="none",
                   kwargs={"quiet": 0.6, "max_time": 2.0}, ignore=ign),
        WsScenario(EVENTS, "wrong header key", ev, key="wrong"),
        WsScenario(EVENTS, "wrong query key", ev, key="wrong", auth="query"),
        WsScenario(EVENTS, "wrong first-frame key", ev, key="wrong", auth="frame"),
        WsScenario(EVENTS, "first frame not JSON", ev, auth="none", kwargs={"first_frame": "hello"}),
        WsScenario(EVENTS, "first frame of the wrong type", ev, auth="none",
                   kwargs={"first_frame": json.dumps({"type": "message", "session_api_key": "${key}"})}),
        WsScenario(EVENTS, "unknown conversation", "/sockets/events/${unknown}"),
        WsScenario(EVENTS, "unknown conversation, first-frame auth", "/sockets/events/${unknown}", auth="frame"),
        WsScenario(EVENTS, "malformed conversation id", "/sockets/events/not-a-uuid"),
        WsScenario(EVENTS, "resend_mode=all", ev, kwargs={"query": {"resend_mode": "all"}}, ignore=ign, unordered=True),
        WsScenario(EVENTS, "resend_mode=since", ev, kwargs={"query": {"resend_mode": "since", "after_timestamp": "${since_ts}"}},
                   ignore=ign, unordered=True),
        WsScenario(EVENTS, "resend_all=true (deprecated)", ev, kwargs={"query": {"resend_all": "true"}}, ignore=ign, unordered=True),
        WsScenario(EVENTS, "resend_mode not all/since", ev, kwargs={"query": {"resend_mode": "everything"}}),
        WsScenario(EVENTS, "after_timestamp not a date", ev, kwargs={"query": {"resend_mode": "since", "after_timestamp": "yesterday"}}),
        WsScenario(EVENTS, "resend_all not a boolean", ev, kwargs={"query": {"resend_all": "maybe"}}),
        WsScenario(EVENTS, "resend_mode=since without a timestamp", ev, kwargs={"query": {"resend_mode": "since"}}, ignore=ign),
        WsScenario(EVENTS, "auth frame after header auth is ignored", ev,
                   kwargs={"send_after": [json.dumps({"type": "auth", "session_api_key": "${key}"})]}, ignore=ign),
        WsScenario(EVENTS, "a bad inbound frame", ev, kwargs={"send_after": [json.dumps({"role": "robot"})]}, ignore=ign),
        WsScenario(SESSION, "header key, live only", se, ignore=ign),
        WsScenario(SESSION, "query key, live only", se, auth="query", ignore=ign),
        WsScenario(SESSION, "first-frame auth, live only", se, auth="frame", ignore=ign),
        WsScenario(SESSION, "after_seq=-1 (whole log)", se, kwargs={"query": {"after_seq": -1}}, ignore=ign, unordered=True,
                   frame_view=_no_seq),
        WsScenario(SESSION, "after_seq=3", se, kwargs={"query": {"after_seq": 3}}, ignore=ign, unordered=True, frame_view=_no_seq),
        WsScenario(SESSION, "after_seq past the end", se, kwargs={"query": {"after_seq": 100000}}, ignore=ign),
        WsScenario(SESSION, "after_seq not a number", se, kwargs={"query": {"after_seq": "x"}}, ignore=ign),
        WsScenario(SESSION, "wrong header key", se, key="wrong"),
        WsScenario(SESSION, "wrong query key", se, key="wrong", auth="query"),
        WsScenario(SESSION, "wrong first-frame key", se, key="wrong", auth="frame"),
        WsScenario(SESSION, "unknown conversation", "/sockets/session/${unknown}"),
        WsScenario(SESSION, "malformed conversation id", "/sockets/session/not-a-uuid"),
        WsScenario(SESSION, "a bad inbound frame", se, kwargs={"send_after": ["not json"]}, ignore=ign),
        WsScenario(BASH, "addressed, resend_mode=all", "/sockets/bash-events",
                   kwargs={"query": {"resend_mode": "all"}, "extra_headers": CONV_HEADER}, ignore=BASH_VOLATILE),
        WsScenario(BASH, "addressed, live", "/sockets/bash-events", kwargs={"extra_headers": CONV_HEADER}),
        WsScenario(BASH, "wrong key", "/sockets/bash-events", key="wrong", kwargs={"extra_headers": CONV_HEADER}),
        WsScenario(BASH, "wrong first-frame key", "/sockets/bash-events", key="wrong", auth="frame",
                   kwargs={"extra_headers": CONV_HEADER}),
        WsScenario(BASH, "unaddressed", "/sockets/bash-events", kwargs={"query": {"resend_mode": "all"}}, design=BASH_NEEDS_ADDRESS),
        WsScenario(APP_WS, "unknown extension", "/app-backends/ext1/ws"),
    ]
    return out


def _no_seq(frame: Any) -> Any:
    """Durable frames without their ``seq`` (the multiset comparison of a log whose
    simultaneous events two runs may have persisted in either order)."""
    if isinstance(frame, dict) and frame.get("type") == "durable":
        return {k: v for k, v in frame.items() if k != "seq"}
    return frame


def ws_timeout_scenario() -> WsScenario:
    """No auth frame within the agent-server's 10 s: closed 4001 (runs alongside the others)."""
    return WsScenario(EVENTS, "no auth frame within 10 s", "/sockets/events/${cid}", auth="none",
                      kwargs={"quiet": 14.0, "max_time": 14.0})
