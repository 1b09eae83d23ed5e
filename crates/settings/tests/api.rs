//! nestor's settings routes against answers captured from a real agent-server 1.58.2
//! (`tools/capture_fixtures.py`), plus the properties the agent-server does not have:
//! encryption at rest without exception, refusal to start without the key, per-user
//! isolation, crash-safe writes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use nestor_core::UserId;
use nestor_settings::{router, SecretKeys, SettingsService, SettingsUser, StartupError};
use serde_json::{json, Value};
use tower::ServiceExt;

fn open(dir: &std::path::Path, key: Option<&str>) -> Arc<SettingsService> {
    SettingsService::open(dir, key.map(SecretKeys::new)).unwrap()
}

struct Client {
    app: axum::Router,
}

impl Client {
    fn new(svc: Arc<SettingsService>) -> Self {
        Self { app: router(svc) }
    }

    async fn call(&self, user: &str, method: &str, path: &str, headers: &[(&str, &str)], body: Option<Vec<u8>>) -> (StatusCode, Option<Value>, String) {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut req = b.body(body.map(Body::from).unwrap_or_else(Body::empty)).unwrap();
        req.extensions_mut().insert(SettingsUser(UserId::new(user)));
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = if ct.contains("json") { serde_json::from_slice(&bytes).ok() } else { None };
        (status, json, text)
    }

    async fn json(&self, user: &str, method: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let (s, j, _) = self.call(user, method, path, &[("content-type", "application/json")], Some(serde_json::to_vec(&body).unwrap())).await;
        (s, j.unwrap_or(Value::Null))
    }

    async fn get(&self, user: &str, path: &str) -> (StatusCode, Value) {
        let (s, j, _) = self.call(user, "GET", path, &[], None).await;
        (s, j.unwrap_or(Value::Null))
    }
}

fn is_id(s: &str) -> bool {
    (s.len() == 36 && uuid::Uuid::parse_str(s).is_ok()) || (s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Replace what legitimately differs between two servers (ids, times, cipher text).
fn normalize(v: &Value, key: Option<&str>) -> Value {
    match v {
        Value::String(s) if s.starts_with("gAAAAA") => json!("<fernet>"),
        Value::String(s) if is_id(s) => json!("<id>"),
        Value::String(_) if key == Some("current_datetime") => json!("<now>"),
        Value::String(s) if s.contains('-') => {
            let re = regex::Regex::new("[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").unwrap();
            json!(re.replace_all(s, "<id>"))
        }
        Value::Number(_) if matches!(key, Some("created_at" | "updated_at")) => json!(0),
        Value::Number(n) => json!(n.as_f64()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, x)| (k.clone(), normalize(x, Some(k)))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(|x| normalize(x, key)).collect()),
        other => other.clone(),
    }
}

/// Learn which of nestor's ids stand for the fixture's ids (same position in both answers).
fn learn_ids(expected: &Value, actual: &Value, map: &mut HashMap<String, String>) {
    match (expected, actual) {
        (Value::String(e), Value::String(a)) if is_id(e) && is_id(a) => {
            map.entry(e.clone()).or_insert_with(|| a.clone());
        }
        (Value::Object(e), Value::Object(a)) => {
            for (k, x) in e {
                if let Some(y) = a.get(k) {
                    learn_ids(x, y, map);
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => e.iter().zip(a).for_each(|(x, y)| learn_ids(x, y, map)),
        _ => {}
    }
}

fn substitute(s: &str, map: &HashMap<String, String>) -> String {
    map.iter().fold(s.to_owned(), |acc, (k, v)| acc.replace(k, v))
}

/// Fields nestor cannot reproduce in `materialize` (tool probing, skill catalog): dropped
/// from both sides, see `resolve` module docs.
fn drop_runtime_fields(v: &mut Value) {
    if let Some(m) = v.as_object_mut() {
        if m.contains_key("unusable_tools") {
            m.remove("unusable_tools");
            m.remove("resolved_settings");
        }
    }
}

#[tokio::test]
async fn replays_the_agent_servers_answers() {
    let steps: Vec<Value> = serde_json::from_str(include_str!("fixtures/agent_server_sequence.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = Client::new(open(dir.path(), Some("testsecret")));
    let mut ids = HashMap::new();
    let mut failures = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let method = step["method"].as_str().unwrap();
        let path = substitute(step["path"].as_str().unwrap(), &ids);
        let mut headers: Vec<(String, String)> = step["headers"].as_object().map(|h| h.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())).collect()).unwrap_or_default();
        let body = if let Some(raw) = step["raw_body"].as_str() {
            Some(raw.as_bytes().to_vec())
        } else {
            step.get("body").map(|b| substitute(&b.to_string(), &ids).into_bytes())
        };
        if body.is_some() {
            headers.push(("content-type".into(), "application/json".into()));
        }
        let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (status, json, text) = c.call("default", method, &path, &hs, body).await;
        let want_status = step["status"].as_u64().unwrap() as u16;
        if status.as_u16() != want_status {
            failures.push(format!("step {i} {method} {path}: status {} want {want_status}: {text}", status.as_u16()));
            continue;
        }
        match (step.get("response"), json) {
            (Some(want), Some(got)) => {
                learn_ids(want, &got, &mut ids);
                let (mut w, mut g) = (normalize(want, None), normalize(&got, None));
                drop_runtime_fields(&mut w);
                drop_runtime_fields(&mut g);
                if w != g {
                    failures.push(format!("step {i} {method} {path}:\n  want {w}\n  got  {g}"));
                }
            }
            (None, _) => {
                let want = step["text"].as_str().unwrap_or_default();
                if want != text {
                    failures.push(format!("step {i} {method} {path}: text {text:?} want {want:?}"));
                }
            }
            (Some(_), None) => failures.push(format!("step {i} {method} {path}: not JSON: {text}")),
        }
    }
    assert!(failures.is_empty(), "{} of {} steps differ:\n{}", failures.len(), steps.len(), failures.join("\n"));
}

#[tokio::test]
async fn validation_errors_for_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let c = Client::new(open(dir.path(), Some("k")));
    for name in ["1abc", "a-b", "", "x".repeat(65).as_str(), "ä"] {
        let (s, b) = c.json("u", "PUT", "/api/settings/secrets", json!({"name": name, "value": "v"})).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {b}");
    }
    for value in ["", "  ", "**********"] {
        let (s, b) = c.json("u", "PUT", "/api/settings/secrets", json!({"name": "OK", "value": value})).await;
        assert_eq!((s, b), (StatusCode::UNPROCESSABLE_ENTITY, json!({"detail": "Secret value must not be empty or redacted"})));
    }
    let (s, b) = c.json("u", "PUT", "/api/settings/secrets", json!({"name": "OK", "value": 5})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(b["detail"][0]["type"], "string_type");
    assert!(!b.to_string().contains("\"input\":5"), "a non-string secret value is not echoed: {b}");
    let (s, _, _) = c.call("u", "PUT", "/api/settings/secrets", &[("content-type", "application/json")], Some(b"{\"name\":".to_vec())).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, b) = c.get("u", "/api/settings/secrets/OK").await;
    assert_eq!((s, b), (StatusCode::NOT_FOUND, json!({"detail": "Secret not found"})));
}

#[tokio::test]
async fn expose_modes_and_deep_merge() {
    let dir = tempfile::tempdir().unwrap();
    let c = Client::new(open(dir.path(), Some("k")));
    let (s, _) = c
        .json("u", "PATCH", "/api/settings", json!({"agent_settings_diff": {"llm": {"api_key": "sk-1"}, "mcp_config": {"m": {"command": "x", "env": {"A": "1", "B": "2"}}}}, "misc_settings_diff": {"a": {"b": 1, "c": 2}}}))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, red) = c.get("u", "/api/settings").await;
    assert_eq!(red["agent_settings"]["llm"]["api_key"], "**********");
    assert_eq!(red["agent_settings"]["mcp_config"]["m"]["env"]["A"], "**********");
    let (_, j, _) = c.call("u", "GET", "/api/settings", &[("x-expose-secrets", "plaintext")], None).await;
    assert_eq!(j.unwrap()["agent_settings"]["llm"]["api_key"], "sk-1");
    let (_, j, _) = c.call("u", "GET", "/api/settings", &[("x-expose-secrets", "encrypted")], None).await;
    let token = j.unwrap()["agent_settings"]["llm"]["api_key"].as_str().unwrap().to_owned();
    assert!(token.starts_with("gAAAAA"));
    // The encrypted value round-trips: sent back, it is decrypted, not stored as cipher text.
    c.json("u", "PATCH", "/api/settings", json!({"agent_settings_diff": {"llm": {"api_key": token}}})).await;
    let (_, j, _) = c.call("u", "GET", "/api/settings", &[("x-expose-secrets", "plaintext")], None).await;
    assert_eq!(j.unwrap()["agent_settings"]["llm"]["api_key"], "sk-1");
    // null inside a nested map deletes; a top-level null on a required field is a 422.
    let (_, b) = c.json("u", "PATCH", "/api/settings", json!({"misc_settings_diff": {"a": {"b": null}}, "agent_settings_diff": {"mcp_config": {"m": {"env": {"A": null}}}}})).await;
    assert_eq!(b["misc_settings"], json!({"a": {"c": 2}}));
    assert_eq!(b["agent_settings"]["mcp_config"]["m"]["env"], json!({"B": "**********"}));
    let (s, b) = c.json("u", "PATCH", "/api/settings", json!({"conversation_settings_diff": {"max_iterations": null}})).await;
    assert_eq!((s, b), (StatusCode::UNPROCESSABLE_ENTITY, json!({"detail": "Settings validation failed"})));
    let (s, _, _) = c.call("u", "GET", "/api/settings", &[("x-expose-secrets", "nope")], None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

fn all_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(all_files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[tokio::test]
async fn secrets_are_encrypted_at_rest_and_need_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let c = Client::new(open(dir.path(), Some("key-1")));
    c.json("u", "PUT", "/api/settings/secrets", json!({"name": "TOKEN", "value": "PLAINTEXT-SECRET-1"})).await;
    c.json("u", "PATCH", "/api/settings", json!({"agent_settings_diff": {"llm": {"api_key": "PLAINTEXT-SECRET-2"}}})).await;
    c.json("u", "POST", "/api/profiles/p", json!({"llm": {"model": "m", "api_key": "PLAINTEXT-SECRET-3"}})).await;
    c.json("u", "POST", "/api/llm/provider-connections", json!({"display_name": "d", "api_key": "PLAINTEXT-SECRET-4"})).await;
    for f in all_files(dir.path()) {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        assert!(!text.contains("PLAINTEXT-SECRET"), "{} holds a plaintext secret", f.display());
    }
    let (_, _, text) = c.call("u", "GET", "/api/settings/secrets/TOKEN", &[], None).await;
    assert_eq!(text, "PLAINTEXT-SECRET-1");
    drop(c);
    // Without the key, or with another one: refuse to start.
    assert!(matches!(SettingsService::open(dir.path(), None), Err(StartupError::MissingKey { .. })));
    assert!(matches!(SettingsService::open(dir.path(), Some(SecretKeys::new("other"))), Err(StartupError::WrongKey { .. })));
    // Rotation: the old key as a previous key opens it and re-encrypts under the new key.
    let svc = SettingsService::open(dir.path(), Some(SecretKeys::new("key-2").with_previous(vec!["key-1".into()]))).unwrap();
    assert_eq!(svc.secret(&UserId::new("u"), "TOKEN").await.as_deref(), Some("PLAINTEXT-SECRET-1"));
    drop(svc);
    let svc = SettingsService::open(dir.path(), Some(SecretKeys::new("key-2"))).unwrap();
    assert_eq!(svc.secret(&UserId::new("u"), "TOKEN").await.as_deref(), Some("PLAINTEXT-SECRET-1"));
}

#[tokio::test]
async fn without_a_key_secrets_are_refused_not_stored_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let c = Client::new(open(dir.path(), None));
    let (s, _) = c.json("u", "PUT", "/api/settings/secrets", json!({"name": "T", "value": "v"})).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let (s, _) = c.json("u", "PATCH", "/api/settings", json!({"misc_settings_diff": {"x": 1}})).await;
    assert_eq!(s, StatusCode::OK, "settings without secrets still work");
    assert!(!dir.path().join("users/u/secrets.json").exists());
}

#[tokio::test]
async fn users_are_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), Some("k"));
    let c = Client::new(svc.clone());
    c.json("alice", "PUT", "/api/settings/secrets", json!({"name": "S", "value": "alice-value"})).await;
    c.json("alice", "PATCH", "/api/settings", json!({"misc_settings_diff": {"who": "alice"}})).await;
    let (s, _) = c.get("bob", "/api/settings/secrets/S").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, b) = c.get("bob", "/api/settings").await;
    assert_eq!(b["misc_settings"], json!({}));
    assert_eq!(svc.secret(&UserId::new("bob"), "S").await, None);
    assert_eq!(svc.secret(&UserId::new("alice"), "S").await.as_deref(), Some("alice-value"));
    let (_, b) = c.get("../alice", "/api/settings").await;
    assert_eq!(b["misc_settings"], json!({}), "a user id cannot reach another user's directory");
}

#[tokio::test]
async fn a_crash_leftover_temp_file_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let c = Client::new(open(dir.path(), Some("k")));
    c.json("u", "PATCH", "/api/settings", json!({"misc_settings_diff": {"v": 1}})).await;
    c.json("u", "POST", "/api/profiles/p", json!({"llm": {"model": "m"}})).await;
    let udir = dir.path().join("users/u");
    // What a crash between write and rename leaves behind: half-written temp files.
    std::fs::write(udir.join(".settings.json.tmp-999"), b"{\"misc_settings\": {\"v\": 2").unwrap();
    std::fs::write(udir.join("profiles/.p2.json.tmp-999"), b"{\"model\":").unwrap();
    let c = Client::new(open(dir.path(), Some("k")));
    let (_, b) = c.get("u", "/api/settings").await;
    assert_eq!(b["misc_settings"], json!({"v": 1}));
    let (_, b) = c.get("u", "/api/profiles").await;
    assert_eq!(b["profiles"].as_array().unwrap().len(), 1);
    // A corrupt settings file is never overwritten with defaults.
    std::fs::write(udir.join("settings.json"), b"{broken").unwrap();
    let (s, _) = c.json("u", "PATCH", "/api/settings", json!({"misc_settings_diff": {"v": 3}})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(std::fs::read(udir.join("settings.json")).unwrap(), b"{broken");
}

#[tokio::test]
async fn concurrent_writers_do_not_lose_updates() {
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(Client::new(open(dir.path(), Some("k"))));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.json("u", "PUT", "/api/settings/secrets", json!({"name": format!("S{i}"), "value": format!("v{i}")})).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let (_, b) = c.get("u", "/api/settings/secrets").await;
    assert_eq!(b["secrets"].as_array().unwrap().len(), 20);
}

#[tokio::test]
async fn create_bodies_are_resolved_for_a_downstream() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), Some("k"));
    let c = Client::new(svc.clone());
    c.json("u", "POST", "/api/profiles/fast", json!({"llm": {"model": "openai/gpt-4o", "api_key": "sk-fast"}})).await;
    c.json("u", "POST", "/api/settings/mcp/web", json!({"url": "https://x/mcp"})).await;
    c.json("u", "PUT", "/api/settings/secrets", json!({"name": "GH", "value": "gh-token"})).await;
    c.json("u", "POST", "/api/agent-profiles/coder", json!({"llm_profile_ref": "fast", "secret_refs": ["GH"]})).await;
    let (_, list) = c.get("u", "/api/agent-profiles").await;
    let id = list["profiles"].as_array().unwrap().iter().find(|p| p["name"] == "coder").unwrap()["id"].as_str().unwrap().to_owned();
    let user = UserId::new("u");
    let body = json!({
        "agent_profile_id": id,
        "workspace": {"kind": "LocalWorkspace", "working_dir": "/w"},
        "secrets": {"GH": {"kind": "LookupSecret", "url": "/api/settings/secrets/GH"}, "OTHER": "x"},
    });
    let r = svc.resolve_create(&user, body).await.unwrap();
    assert!(r.body.get("agent_profile_id").is_none());
    assert_eq!(r.body["agent_settings"]["llm"]["api_key"], "sk-fast");
    assert_eq!(r.body["agent_settings"]["llm"]["stream"], true);
    assert_eq!(r.body["agent_settings"]["mcp_config"]["web"]["url"], "https://x/mcp");
    assert_eq!(r.body["secrets"], json!({"GH": {"kind": "StaticSecret", "value": "gh-token", "description": null}}));
    assert_eq!(r.launched_agent_profile.unwrap()["agent_profile_id"], json!(id));
    let e = svc.resolve_create(&user, json!({"agent_profile_id": "0a8b12be-0792-4413-8dd9-066610cb0473"})).await.unwrap_err();
    assert_eq!(e.status, StatusCode::NOT_FOUND);
    // secrets_encrypted: nestor's tokens are decrypted for the downstream.
    let (_, j, _) = c.call("u", "GET", "/api/settings", &[("x-expose-secrets", "encrypted")], None).await;
    let mut agent = j.unwrap()["agent_settings"].clone();
    agent["llm"]["api_key"] = json!(svc_token(&c).await);
    let r = svc.resolve_create(&user, json!({"agent_settings": agent, "secrets_encrypted": true})).await.unwrap();
    assert_eq!(r.body["agent_settings"]["llm"]["api_key"], "sk-fast");
    assert_eq!(r.body["secrets_encrypted"], false);
}

async fn svc_token(c: &Client) -> String {
    let (_, j, _) = c.call("u", "GET", "/api/profiles/fast", &[("x-expose-secrets", "encrypted")], None).await;
    j.unwrap()["config"]["api_key"].as_str().unwrap().to_owned()
}
