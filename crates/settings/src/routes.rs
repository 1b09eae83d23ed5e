//! The HTTP surface: the agent-server's routes, shapes and status codes.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::schema::{self, FieldError, Opts};
use crate::service::{canonical, valid_secret_name, ExposeMode, SettingsService, PROFILE_NAME_PATTERN, SECRET_NAME_ERROR};
use crate::{catalog, SettingsUser};

type Svc = Arc<SettingsService>;

/// All implemented routes, with paths relative to the server root (`/api/...`).
pub fn router<S: Clone + Send + Sync + 'static>(svc: Svc) -> Router<S> {
    Router::new()
        .route("/api/settings", get(get_settings).patch(patch_settings))
        .route("/api/settings/agent-schema", get(|| async { json_asset(catalog::AGENT_SCHEMA) }))
        .route("/api/settings/conversation-schema", get(|| async { json_asset(catalog::CONVERSATION_SCHEMA) }))
        .route("/api/settings/mcp/{settings_key}", post(create_mcp).patch(patch_mcp).delete(delete_mcp))
        .route("/api/settings/secrets", get(list_secrets).put(put_secret))
        .route("/api/settings/secrets/{name}", get(get_secret).delete(delete_secret))
        .route("/api/profiles", get(list_profiles))
        .route("/api/profiles/{name}", get(get_profile).post(save_profile).delete(delete_profile))
        .route("/api/profiles/{name}/activate", post(activate_profile))
        .route("/api/profiles/{name}/rename", post(rename_profile))
        .route("/api/agent-profiles", get(crate::profiles::list_agent_profiles))
        .route(
            "/api/agent-profiles/{name}",
            get(crate::profiles::get_agent_profile).post(crate::profiles::save_agent_profile).delete(crate::profiles::delete_agent_profile),
        )
        .route("/api/agent-profiles/{name}/rename", post(crate::profiles::rename_agent_profile))
        .route("/api/agent-profiles/{name}/activate", post(crate::profiles::activate_agent_profile))
        .route("/api/agent-profiles/{name}/materialize", post(crate::profiles::materialize_agent_profile))
        .route("/api/meta-profiles", get(crate::profiles::list_meta_profiles))
        .route(
            "/api/meta-profiles/{name}",
            get(crate::profiles::get_meta_profile).post(crate::profiles::save_meta_profile).delete(crate::profiles::delete_meta_profile),
        )
        .route("/api/meta-profiles/{name}/activate", post(crate::profiles::activate_meta_profile))
        .route("/api/llm/provider-connections", get(crate::profiles::list_connections).post(crate::profiles::create_connection))
        .route(
            "/api/llm/provider-connections/{connection_id}",
            axum::routing::patch(crate::profiles::patch_connection).delete(crate::profiles::delete_connection),
        )
        .route("/api/llm/providers", get(|| async { json_asset(catalog::PROVIDERS) }))
        .route("/api/llm/models", get(catalog::models))
        .route("/api/llm/models/verified", get(|| async { json_asset(catalog::VERIFIED) }))
        .with_state(svc)
}

fn json_asset(s: &'static str) -> Response {
    ([(http::header::CONTENT_TYPE, "application/json")], s).into_response()
}

/// Run a store operation on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::internal(format!("settings task failed: {e}")))?
}

/// Parse a JSON body like FastAPI: bad JSON → `json_invalid`, absent → `missing`.
pub(crate) fn parse_body(bytes: &Bytes, required: bool) -> Result<Option<Value>> {
    if bytes.is_empty() {
        if required {
            return Err(Error::validation(&[FieldError::new("missing", &[json!("body")], "Field required", &Value::Null)]));
        }
        return Ok(None);
    }
    serde_json::from_slice(bytes).map(Some).map_err(|e| {
        let (pos, reason) = json_decode_error(bytes, &e);
        Error::validation(&[FieldError::new("json_invalid", &[json!("body"), json!(pos)], "JSON decode error", &json!({})).with_ctx(json!({"error": reason}))])
    })
}

/// Where a JSON body is malformed (a character offset) and why, in the words of Python's
/// `json` module: FastAPI's `json_invalid` 422 carries both.
pub fn json_decode_error(bytes: &[u8], e: &serde_json::Error) -> (usize, &'static str) {
    let text = String::from_utf8_lossy(bytes);
    let pos = if e.is_eof() { text.chars().count() } else { char_offset(&text, e.line(), e.column()) };
    (pos, python_json_reason(&text, pos))
}

fn char_offset(text: &str, line: usize, column: usize) -> usize {
    let mut off = 0;
    for (i, l) in text.split('\n').enumerate() {
        if i + 1 == line {
            return off + column.saturating_sub(1);
        }
        off += l.chars().count() + 1;
    }
    off
}

/// Python's `json` wording for the usual mistakes.
fn python_json_reason(text: &str, pos: usize) -> &'static str {
    let before = text.chars().take(pos).filter(|c| !c.is_whitespace()).last();
    let at = text.chars().nth(pos);
    match (before, at) {
        (Some('{') | Some(','), Some(c)) if c != '"' && c != '}' => "Expecting property name enclosed in double quotes",
        _ => "Expecting value",
    }
}

pub(crate) fn body_object(v: &Value) -> Result<&Map<String, Value>> {
    v.as_object().ok_or_else(|| {
        Error::validation(&[FieldError::new("model_attributes_type", &[json!("body")], "Input should be a valid dictionary or object to extract fields from", v)])
    })
}

pub(crate) fn expose_mode(h: &HeaderMap) -> Result<ExposeMode> {
    ExposeMode::parse(h.get("x-expose-secrets").and_then(|v| v.to_str().ok()))
}

/// Validate a path name against the profile-name constraints (422 like FastAPI's `Path`).
pub(crate) fn check_profile_name(name: &str) -> Result<()> {
    let loc = [json!("path"), json!("name")];
    let n = name.chars().count();
    let input = json!(name);
    if n < 1 {
        return Err(Error::validation(&[FieldError::new("string_too_short", &loc, "String should have at least 1 character", &input).with_ctx(json!({"min_length": 1}))]));
    }
    if n > 64 {
        return Err(Error::validation(&[FieldError::new("string_too_long", &loc, "String should have at most 64 characters", &input).with_ctx(json!({"max_length": 64}))]));
    }
    if !crate::service::valid_profile_name(name) {
        return Err(Error::validation(&[FieldError::new("string_pattern_mismatch", &loc, format!("String should match pattern '{PROFILE_NAME_PATTERN}'"), &input)
            .with_ctx(json!({"pattern": PROFILE_NAME_PATTERN}))]));
    }
    Ok(())
}

// ── settings ──────────────────────────────────────────────────────────────

async fn get_settings(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, headers: HeaderMap) -> Result<Json<Value>> {
    let mode = expose_mode(&headers)?;
    if mode == ExposeMode::Plaintext {
        tracing::warn!(user = %user.0, "settings accessed with PLAINTEXT secrets");
    }
    blocking(move || {
        let s = svc.load_settings(user.0.as_str())?;
        svc.settings_response(&s, mode).map(Json)
    })
    .await
}

fn pointer_pattern_errors(m: &Map<String, Value>) -> Vec<FieldError> {
    let uuid_pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";
    let mut errs = Vec::new();
    for (k, pat) in [("active_profile", PROFILE_NAME_PATTERN), ("active_agent_profile_id", uuid_pattern), ("active_meta_profile", PROFILE_NAME_PATTERN)] {
        let loc = [json!("body"), json!(k)];
        match m.get(k) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                let ok = regex::Regex::new(pat).map(|r| r.is_match(s)).unwrap_or(false);
                if !ok {
                    errs.push(FieldError::new("string_pattern_mismatch", &loc, format!("String should match pattern '{pat}'"), &json!(s)).with_ctx(json!({"pattern": pat})));
                }
            }
            Some(other) => errs.push(FieldError::new("string_type", &loc, "Input should be a valid string", other)),
        }
    }
    for k in ["agent_settings_diff", "conversation_settings_diff", "misc_settings_diff"] {
        if let Some(v) = m.get(k).filter(|v| !v.is_null() && !v.is_object()) {
            errs.push(FieldError::new("dict_type", &[json!("body"), json!(k)], "Input should be a valid dictionary", v));
        }
    }
    errs
}

async fn patch_settings(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, body: Bytes) -> Result<Json<Value>> {
    let v = parse_body(&body, true)?.unwrap_or(Value::Null);
    let m = body_object(&v)?.clone();
    let errs = pointer_pattern_errors(&m);
    if !errs.is_empty() {
        return Err(Error::validation(&errs));
    }
    // Unknown keys are ignored, like pydantic's default.
    let known: Map<String, Value> = m
        .into_iter()
        .filter(|(k, _)| {
            matches!(
                k.as_str(),
                "agent_settings_diff" | "conversation_settings_diff" | "misc_settings_diff" | "active_profile" | "active_agent_profile_id" | "active_meta_profile"
            )
        })
        .collect();
    blocking(move || {
        let s = svc.patch_settings(user.0.as_str(), known)?;
        svc.settings_response(&s, ExposeMode::Redacted).map(Json)
    })
    .await
}

async fn mcp_update(svc: Svc, user: SettingsUser, key: String, server: Value, need: Option<bool>) -> Result<Value> {
    blocking(move || {
        let update = json!({"agent_settings_diff": {"mcp_config": {key.clone(): server}}});
        let (s, _) = svc.apply_settings_update(user.0.as_str(), update, |s| {
            let exists = s["agent_settings"]["mcp_config"].get(&key).is_some();
            match need {
                Some(false) if exists => Err(Error::conflict(format!("MCP server '{key}' already exists"))),
                Some(true) if !exists => Err(Error::not_found(format!("MCP server '{key}' was not found"))),
                _ => Ok(()),
            }
        })?;
        svc.settings_response(&s, ExposeMode::Redacted)
    })
    .await
}

async fn create_mcp(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(key): Path<String>, body: Bytes) -> Result<Response> {
    let v = parse_body(&body, true)?.unwrap_or(Value::Null);
    let server = schema::validate(schema::model("MCPServer"), &v, &[json!("body")], Opts { cipher: svc.cipher.as_ref(), strict_decrypt: false })
        .map_err(|e| Error::validation(&e))?;
    // exclude_defaults: drop `enabled: true`
    let mut server = server;
    if server.get("enabled") == Some(&json!(true)) {
        server.as_object_mut().map(|m| m.remove("enabled"));
    }
    let out = mcp_update(svc, user, key, server, Some(false)).await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn patch_mcp(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(key): Path<String>, body: Bytes) -> Result<Json<Value>> {
    let v = parse_body(&body, true)?.unwrap_or(Value::Null);
    let m = body_object(&v)?;
    let validated = schema::validate(schema::model("MCPServerPatch"), &v, &[json!("body")], Opts { cipher: svc.cipher.as_ref(), strict_decrypt: false })
        .map_err(|e| Error::validation(&e))?;
    // exclude_unset: only the keys the client sent.
    let patch: Map<String, Value> = validated.as_object().cloned().unwrap_or_default().into_iter().filter(|(k, _)| m.contains_key(k)).collect();
    mcp_update(svc, user, key, Value::Object(patch), Some(true)).await.map(Json)
}

async fn delete_mcp(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(key): Path<String>) -> Result<Json<Value>> {
    mcp_update(svc, user, key, Value::Null, Some(true)).await.map(Json)
}

// ── secrets ───────────────────────────────────────────────────────────────

#[derive(serde::Deserialize)]
struct SecretsQuery {
    agent_profile_id: Option<String>,
}

async fn list_secrets(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Query(q): Query<SecretsQuery>) -> Result<Json<Value>> {
    blocking(move || svc.list_secrets(user.0.as_str(), q.agent_profile_id.as_deref()).map(Json)).await
}

fn check_secret_name(name: &str) -> Result<()> {
    if valid_secret_name(name) {
        Ok(())
    } else {
        Err(Error::unprocessable(SECRET_NAME_ERROR))
    }
}

async fn get_secret(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>) -> Result<Response> {
    check_secret_name(&name)?;
    let n = name.clone();
    let value = blocking(move || Ok(svc.secret_value(user.0.as_str(), &n))).await?;
    match value {
        Some(v) => Ok(([(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], v).into_response()),
        None => {
            tracing::warn!(secret = %name, "secret access failed - not found");
            Err(Error::not_found("Secret not found"))
        }
    }
}

async fn put_secret(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, body: Bytes) -> Result<Json<Value>> {
    let v = parse_body(&body, true)?.unwrap_or(Value::Null);
    let m = body_object(&v)?;
    let mut errs = Vec::new();
    for k in ["name", "value"] {
        match m.get(k) {
            None => errs.push(FieldError::new("missing", &[json!("body"), json!(k)], "Field required", &redact_input(&v))),
            Some(Value::String(_)) => {}
            Some(other) => errs.push(FieldError::new("string_type", &[json!("body"), json!(k)], "Input should be a valid string", if k == "value" { &Value::Null } else { other })),
        }
    }
    match m.get("description") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(other) => errs.push(FieldError::new("string_type", &[json!("body"), json!("description")], "Input should be a valid string", other)),
    }
    if !errs.is_empty() {
        return Err(Error::validation(&errs));
    }
    let name = m["name"].as_str().unwrap_or_default().to_owned();
    let value = m["value"].as_str().unwrap_or_default().to_owned();
    let description = m.get("description").and_then(Value::as_str).map(str::to_owned);
    check_secret_name(&name)?;
    if value.trim().is_empty() || value == schema::REDACTED {
        return Err(Error::unprocessable("Secret value must not be empty or redacted"));
    }
    let (n, d) = (name.clone(), description.clone());
    blocking(move || svc.set_secret(user.0.as_str(), &n, &value, d.as_deref())).await?;
    Ok(Json(json!({"name": name, "description": description})))
}

/// 422 inputs never echo a secret value.
fn redact_input(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        if m.contains_key("value") {
            m.insert("value".into(), json!(schema::REDACTED));
        }
    }
    v
}

async fn delete_secret(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>) -> Result<Json<Value>> {
    check_secret_name(&name)?;
    if blocking(move || svc.delete_secret(user.0.as_str(), &name)).await? {
        Ok(Json(json!({"deleted": true})))
    } else {
        Err(Error::not_found("Secret not found"))
    }
}

// ── LLM profiles ──────────────────────────────────────────────────────────

async fn list_profiles(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>) -> Result<Json<Value>> {
    blocking(move || {
        let s = svc.load_settings(user.0.as_str())?;
        Ok(Json(json!({"profiles": svc.llm_profile_summaries(user.0.as_str()), "active_profile": s["active_profile"]})))
    })
    .await
}

async fn get_profile(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>, headers: HeaderMap) -> Result<Json<Value>> {
    check_profile_name(&name)?;
    let mode = expose_mode(&headers)?;
    blocking(move || {
        let u = user.0.as_str();
        let llm = svc.load_llm_profile(u, &name, mode == ExposeMode::Plaintext).map_err(|e| match e {
            crate::service::ProfileLoadError::NotFound => Error::not_found(format!("Profile '{name}' not found")),
            crate::service::ProfileLoadError::Other(e) => e,
        })?;
        let mut config = svc.llm_expose(&llm, mode)?;
        if mode == ExposeMode::Redacted {
            config["api_key"] = Value::Null;
        }
        let api_key_set = svc.profile_api_key_set(u, &llm)?;
        Ok(Json(json!({"name": name, "config": config, "api_key_set": api_key_set})))
    })
    .await
}

async fn save_profile(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>, body: Bytes) -> Result<Response> {
    check_profile_name(&name)?;
    let v = parse_body(&body, true)?.unwrap_or(Value::Null);
    let m = body_object(&v)?;
    let Some(llm_in) = m.get("llm") else {
        return Err(Error::validation(&[FieldError::new("missing", &[json!("body"), json!("llm")], "Field required", &v)]));
    };
    let include_secrets = match m.get("include_secrets") {
        None => true,
        Some(x) => schema::validate(&json!({"type": "boolean"}), x, &[json!("body"), json!("include_secrets")], Opts::default())
            .map_err(|e| Error::validation(&e))?
            .as_bool()
            .unwrap_or(true),
    };
    // Tokens the client got with X-Expose-Secrets: encrypted are decrypted here.
    let llm = schema::validate(schema::model("LLM"), llm_in, &[json!("body"), json!("llm")], Opts { cipher: svc.cipher.as_ref(), strict_decrypt: false })
        .map_err(|e| Error::validation(&e))?;
    let n = name.clone();
    blocking(move || svc.save_llm_profile(user.0.as_str(), &n, llm, include_secrets)).await?;
    Ok((StatusCode::CREATED, Json(json!({"name": name, "message": format!("Profile '{name}' saved")}))).into_response())
}

async fn delete_profile(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>) -> Result<Json<Value>> {
    check_profile_name(&name)?;
    let n = name.clone();
    blocking(move || svc.delete_llm_profile(user.0.as_str(), &n)).await?;
    Ok(Json(json!({"name": name, "message": format!("Profile '{name}' deleted")})))
}

pub(crate) fn new_name_of(v: &Value) -> Result<String> {
    let m = body_object(v)?;
    let loc = [json!("body"), json!("new_name")];
    match m.get("new_name") {
        None => Err(Error::validation(&[FieldError::new("missing", &loc, "Field required", v)])),
        Some(Value::String(s)) => {
            let r = check_profile_name(s).map_err(|mut e| {
                if let Some(items) = e.body["detail"].as_array_mut() {
                    for it in items {
                        it["loc"] = json!(loc);
                    }
                }
                e
            });
            r.map(|_| s.clone())
        }
        Some(other) => Err(Error::validation(&[FieldError::new("string_type", &loc, "Input should be a valid string", other)])),
    }
}

async fn rename_profile(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>, body: Bytes) -> Result<Json<Value>> {
    check_profile_name(&name)?;
    let v = parse_body(&body, true)?.unwrap_or(Value::Null);
    let new_name = new_name_of(&v)?;
    let (o, n) = (name.clone(), new_name.clone());
    blocking(move || svc.rename_llm_profile(user.0.as_str(), &o, &n)).await?;
    let message = if name == new_name { format!("Profile '{name}' unchanged (same name)") } else { format!("Profile '{name}' renamed to '{new_name}'") };
    Ok(Json(json!({"name": new_name, "message": message})))
}

async fn activate_profile(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>) -> Result<Json<Value>> {
    check_profile_name(&name)?;
    let n = name.clone();
    let applied = blocking(move || svc.activate_llm_profile(user.0.as_str(), &n)).await?;
    let message = if applied { format!("Profile '{name}' activated and applied to current settings") } else { format!("Profile '{name}' activated") };
    Ok(Json(json!({"name": name, "message": message, "llm_applied": applied})))
}

#[allow(dead_code)]
fn _canonical_used(n: &str) -> &str {
    canonical(n)
}
