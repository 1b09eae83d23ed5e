"""Capture tests/fixtures/agent_server_sequence.json from a real agent-server 1.58.2.

Start a fresh server (empty OH_PERSISTENCE_DIR, OH_SECRET_KEY set, SESSION_API_KEY=k) and run
    python3 tools/capture_fixtures.py http://127.0.0.1:93NN > tests/fixtures/agent_server_sequence.json
Each step records the request and the server's status and body; the Rust test replays the same
steps against nestor and compares after normalizing ids, timestamps and cipher text.
"""
import json, sys, urllib.request, urllib.error

BASE = sys.argv[1]
steps = []

def call(method, path, body=None, headers=None, raw=None, note=None):
    h = {"X-Session-API-Key": "k"}
    h.update(headers or {})
    data = None
    if raw is not None:
        data = raw.encode()
        h["Content-Type"] = "application/json"
    elif body is not None:
        data = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    req = urllib.request.Request(BASE + path, data=data, method=method, headers=h)
    try:
        resp = urllib.request.urlopen(req)
        status, text, ctype = resp.status, resp.read().decode(), resp.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, text, ctype = e.code, e.read().decode(), e.headers.get("content-type", "")
    try:
        parsed = json.loads(text) if "json" in ctype else None
    except ValueError:
        parsed = None
    step = {"method": method, "path": path, "status": status}
    if headers:
        step["headers"] = headers
    if raw is not None:
        step["raw_body"] = raw
    elif body is not None:
        step["body"] = body
    if parsed is not None:
        step["response"] = parsed
    else:
        step["text"] = text
    if note:
        step["note"] = note
    steps.append(step)
    return parsed

S = "/api/settings"
call("GET", S)
call("PATCH", S, {})
call("PATCH", S, {"agent_settings_diff": {"llm": {"model": "openai/gpt-4o", "api_key": "sk-live-123"}},
                  "conversation_settings_diff": {"max_iterations": 42},
                  "misc_settings_diff": {"ui": {"theme": "dark", "lang": "en"}, "list": [1, 2]}})
call("GET", S)
call("GET", S, headers={"X-Expose-Secrets": "plaintext"})
call("GET", S, headers={"X-Expose-Secrets": "encrypted"})
call("GET", S, headers={"X-Expose-Secrets": "bogus"})
call("PATCH", S, {"misc_settings_diff": {"ui": {"lang": None}, "list": [3]}})
call("PATCH", S, {"conversation_settings_diff": {"max_iterations": "abc"}})
call("PATCH", S, {"conversation_settings_diff": {"max_iterations": "77", "confirmation_mode": True}})
call("PATCH", S, {"agent_settings_diff": {"llm": {"num_retries": "many"}}})
call("PATCH", S, {"agent_settings_diff": {"tool_concurrency_limit": 0}})
call("PATCH", S, {"agent_settings_diff": {"llm": {"api_key": "**********", "temperature": 0.5}}})
call("GET", S, headers={"X-Expose-Secrets": "plaintext"})
call("PATCH", S, {"active_profile": "nope"})
call("PATCH", S, {"active_profile": "bad name!"})
call("PATCH", S, raw="{not json")
call("PATCH", S, {"active_agent_profile_id": "0a8b12be-0792-4413-8dd9-066610cb0473"})
call("PATCH", S, {"active_meta_profile": "nope"})
# MCP servers
M = S + "/mcp"
call("POST", M + "/svc", {"command": "npx", "args": ["-y", "srv"], "env": {"TOKEN": "abc", "KEEP": "k1"}})
call("POST", M + "/svc", {"command": "npx"})
call("PATCH", M + "/svc", {"env": {"TOKEN": None, "NEW": "n1"}, "timeout": 12})
call("GET", S, headers={"X-Expose-Secrets": "plaintext"})
call("GET", S)
call("PATCH", M + "/nope", {"timeout": 1})
call("POST", M + "/web", {"url": "https://example.com/mcp", "headers": {"Authorization": "Bearer t"}})
call("PATCH", S, {"agent_settings_diff": {"mcp_config": {"web": {"headers": {"Authorization": None}}}}})
call("DELETE", M + "/svc")
call("DELETE", M + "/svc")
call("POST", M + "/bad", {"command": "x", "bogus": 1})
call("GET", S)
# Secrets
Z = S + "/secrets"
call("GET", Z)
call("PUT", Z, {"name": "MY_TOKEN", "value": "s3cret-value", "description": "a token"})
call("PUT", Z, {"name": "OTHER", "value": "v2"})
call("PUT", Z, {"name": "1abc", "value": "x"})
call("PUT", Z, {"name": "EMPTY", "value": ""})
call("PUT", Z, {"name": "BLANK", "value": "   "})
call("PUT", Z, {"name": "MASKED", "value": "**********"})
call("PUT", Z, {"name": "NOVALUE"})
call("PUT", Z, raw="[1,")
call("GET", Z)
call("GET", Z + "/MY_TOKEN")
call("GET", Z + "/NOPE")
call("GET", Z + "/1bad")
call("DELETE", Z + "/OTHER")
call("DELETE", Z + "/OTHER")
call("DELETE", Z + "/bad-name")
# Provider connections
PC = "/api/llm/provider-connections"
call("GET", PC)
pc = call("POST", PC, {"display_name": "My OpenAI", "provider": "openai", "api_key": "sk-conn-1"})
call("POST", PC, {"display_name": "x", "api_key": "**********"})
call("POST", PC, {"display_name": "x"})
call("POST", PC, {"display_name": "x", "api_key": "k", "extra": 1})
cid = pc["id"]
call("PATCH", PC + "/" + cid, {"base_url": "https://proxy.example.com/v1"})
call("PATCH", PC + "/" + cid, {})
call("PATCH", PC + "/" + cid, {"api_key": None})
call("PATCH", PC + "/" + cid, {"display_name": None})
call("PATCH", PC + "/nope", {"display_name": "y"})
call("GET", PC)
# LLM profiles
P = "/api/profiles"
call("GET", P)
call("POST", P + "/p1", {"llm": {"model": "anthropic/claude-x", "api_key": "sk-p1", "temperature": 0.2}})
call("POST", P + "/linked", {"llm": {"model": "openai/gpt-4o", "provider_connection_id": cid, "api_key": "ignored"}})
call("POST", P + "/nokey", {"llm": {"model": "m", "api_key": "sk-x"}, "include_secrets": False})
call("POST", P + "/bad%20name", {"llm": {"model": "m"}})
call("POST", P + "/p9", {"llm": {"model": "m", "num_retries": "x"}})
call("POST", P + "/p9", {})
call("GET", P)
call("GET", P + "/p1")
call("GET", P + "/p1", headers={"X-Expose-Secrets": "plaintext"})
call("GET", P + "/linked")
call("GET", P + "/linked", headers={"X-Expose-Secrets": "plaintext"})
call("GET", P + "/missing")
call("DELETE", PC + "/" + cid)
call("POST", P + "/p1/activate")
call("GET", S)
call("POST", P + "/missing/activate")
call("POST", P + "/p1/rename", {"new_name": "p2"})
call("POST", P + "/p2/rename", {"new_name": "linked"})
call("POST", P + "/p2/rename", {"new_name": "p2"})
call("POST", P + "/missing/rename", {"new_name": "zz"})
call("GET", P)
call("DELETE", P + "/nokey")
call("DELETE", P + "/nokey")
# Meta-profiles
MP = "/api/meta-profiles"
call("GET", MP)
call("POST", MP + "/m1", {"classifier_model": "p2", "classes": [{"description": "ui work", "model": "p2"}]})
call("POST", MP + "/empty", {"classifier_model": "p2"})
call("POST", MP + "/tpl", {"classifier_model": "p2", "prompt_template": "no placeholder"})
call("GET", MP)
call("GET", MP + "/m1")
call("GET", MP + "/nope")
call("POST", MP + "/m1/activate")
call("GET", S)
call("POST", MP + "/nope/activate")
call("DELETE", MP + "/m1")
call("GET", S)
# Agent profiles
AP = "/api/agent-profiles"
call("GET", AP, note="seeds 'default' from the current settings and activates it")
call("GET", AP + "/default")
call("POST", AP + "/ap1", {"llm_profile_ref": "p2", "mcp_server_refs": ["web"], "secret_refs": ["MY_TOKEN"]})
call("POST", AP + "/ap1", {"llm_profile_ref": "p2", "mcp_server_refs": ["web"], "secret_refs": ["MY_TOKEN"], "persona": "Be brief."})
call("POST", AP + "/acp1", {"agent_kind": "acp", "acp_server": "claude-code"})
call("POST", AP + "/bad", {"llm_profile_ref": "p2", "acp_server": "claude-code"})
call("POST", AP + "/bad2", {"agent_kind": "acp", "acp_server": "nope"})
lst = call("GET", AP)
ap1 = [p for p in lst["profiles"] if p["name"] == "ap1"][0]["id"]
call("GET", AP + "/ap1")
call("GET", Z + "?agent_profile_id=" + ap1)
call("GET", Z + "?agent_profile_id=0a8b12be-0792-4413-8dd9-066610cb0473")
call("POST", AP + "/" + ap1 + "/activate")
call("POST", AP + "/0a8b12be-0792-4413-8dd9-066610cb0473/activate")
call("PATCH", S, {"active_agent_profile_id": ap1})
call("POST", AP + "/ap1/rename", {"new_name": "ap2"})
call("POST", P + "/p2/rename", {"new_name": "p3"}, note="cascades llm_profile_ref")
call("GET", AP + "/ap2")
call("DELETE", P + "/p3", note="409: referenced")
call("POST", AP + "/ap2/materialize")
call("POST", AP + "/ap2/materialize", {"profile": {"llm_profile_ref": "missing", "mcp_server_refs": ["nope"]}})
call("DELETE", AP + "/ap2")
call("GET", AP)
call("GET", S)
print(json.dumps(steps, indent=1))
