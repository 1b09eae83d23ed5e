//! REST routes of the fake (the conversation and event API of agent-server 1.58.2).
//!
//! | route | notes |
//! | --- | --- |
//! | `GET /alive`, `/health`, `/ready`, `/server_info`, `/` | public |
//! | `GET /api/conversations/search`, `/count`, `GET /api/conversations?ids=` | catalog |
//! | `POST /api/conversations` | 201 new / 200 existing id |
//! | `GET/PATCH/DELETE /api/conversations/{id}` | |
//! | `POST /api/conversations/{id}/run`, `/pause`, `/interrupt`, `/fork`, `/children` | |
//! | `GET /api/conversations/{id}/runtime`, `POST .../runtime/reprovision`, `GET .../agent_final_response` | |
//! | `POST /api/conversations/{id}/events`, `GET .../events` (ids in a JSON body) | |
//! | `GET /api/conversations/{id}/events/search`, `/count`, `/{event_id}` | |
//!
//! Large responses (conversation info, event pages) are assembled from JSON fragments
//! serialized once and cached, so the hot reads cost microseconds.
//!
//! The event routes resolve the conversation in a FastAPI *dependency* on the real server,
//! which runs before query/body validation: an unknown id there is a 404
//! `"Conversation not found: <id>"` even when the query is also invalid. The conversation
//! routes validate everything first and answer a bare `"Not Found"`.

// Handlers return early with a ready `Response`; boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use uuid::Uuid;

use super::clock;
use super::ops::{self, CreateSpec, ForkError};
use super::shapes;
use super::store::{Conv, Status, STATUS_CHOICES};
use super::validate::{self as v, BodyJson, Query};
use super::{ws, Inner};

type S = State<Arc<Inner>>;

pub(crate) fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/alive", get(alive))
        .route("/health", get(alive))
        .route("/ready", get(ready))
        .route("/server_info", get(server_info))
        .route("/", get(server_info))
        .route("/api/conversations/search", get(search_conversations))
        .route("/api/conversations/count", get(count_conversations))
        .route(
            "/api/conversations",
            get(batch_conversations).post(create_conversation),
        )
        .route(
            "/api/conversations/{id}",
            get(get_conversation)
                .patch(patch_conversation)
                .delete(delete_conversation),
        )
        .route("/api/conversations/{id}/run", post(run_conversation))
        .route("/api/conversations/{id}/pause", post(pause_conversation))
        .route(
            "/api/conversations/{id}/interrupt",
            post(interrupt_conversation),
        )
        .route("/api/conversations/{id}/fork", post(fork_conversation))
        .route("/api/conversations/{id}/children", post(start_child))
        .route("/api/conversations/{id}/runtime", get(runtime_info))
        .route(
            "/api/conversations/{id}/runtime/reprovision",
            post(runtime_info),
        )
        .route(
            "/api/conversations/{id}/agent_final_response",
            get(final_response),
        )
        .route(
            "/api/conversations/{id}/events",
            get(batch_events).post(send_message),
        )
        .route("/api/conversations/{id}/events/search", get(search_events))
        .route("/api/conversations/{id}/events/count", get(count_events))
        .route("/api/conversations/{id}/events/{event_id}", get(get_event))
        .route("/api/vscode/url", get(vscode_url))
        .route("/api/conversations/{id}/vscode/url", get(vscode_url))
        .route("/sockets/events/{id}", get(ws::events_socket))
        .route("/sockets/session/{id}", get(ws::session_socket))
        .fallback(|| async { v::not_found() })
        .method_not_allowed_fallback(|| async {
            v::detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
        })
        .with_state(inner)
}

fn authorize(inner: &Inner, headers: &HeaderMap) -> Result<(), Response> {
    let key = headers
        .get("x-session-api-key")
        .map(|h| h.to_str().unwrap_or("\u{0}"));
    if inner.key_valid(key) {
        Ok(())
    } else {
        Err(v::unauthorized())
    }
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(r) => return r,
        }
    };
}

fn fail_if(errors: Vec<Value>) -> Result<(), Response> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(v::validation(errors))
    }
}

fn conv_not_found_dep(id: Uuid) -> Response {
    v::detail(
        StatusCode::NOT_FOUND,
        &format!("Conversation not found: {id}"),
    )
}

// ---------------------------------------------------------------- health & info

async fn alive() -> Response {
    v::json_bytes(StatusCode::OK, br#"{"status":"ok"}"#.to_vec())
}

async fn ready() -> Response {
    v::json_bytes(StatusCode::OK, br#"{"status":"ready"}"#.to_vec())
}

async fn server_info(State(inner): S) -> Response {
    v::json_response(
        StatusCode::OK,
        &shapes::server_info(&inner.cfg.version, inner.uptime(), inner.idle_time()),
    )
}

// ---------------------------------------------------------------- catalog

fn parse_status(q: &Query, errors: &mut Vec<Value>) -> Option<Status> {
    let raw = q.get("status")?;
    match Status::parse(raw) {
        Some(s) => Some(s),
        None => {
            errors.push(v::enum_error(
                vec![json!("query"), json!("status")],
                raw,
                &STATUS_CHOICES,
            ));
            None
        }
    }
}

async fn search_conversations(
    State(inner): S,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    tri!(authorize(&inner, &headers));
    let q = Query::parse(q.as_deref());
    let mut errors = Vec::new();
    let page_id = q.get("page_id").map(str::to_owned);
    let limit = v::query_int(&q, "limit", 100, Some(0), Some(100), &mut errors) as usize;
    let status = parse_status(&q, &mut errors);
    const SORTS: [&str; 4] = [
        "CREATED_AT",
        "UPDATED_AT",
        "CREATED_AT_DESC",
        "UPDATED_AT_DESC",
    ];
    let sort = match q.get("sort_order") {
        None => "CREATED_AT_DESC",
        Some(s) if SORTS.contains(&s) => s,
        Some(s) => {
            errors.push(v::enum_error(
                vec![json!("query"), json!("sort_order")],
                s,
                &SORTS,
            ));
            "CREATED_AT_DESC"
        }
    };
    v::query_bool(&q, "include_skills", false, &mut errors);
    tri!(fail_if(errors));

    let by_created = sort.starts_with("CREATED_AT");
    let desc = sort.ends_with("_DESC");
    let mut recs: Vec<(Arc<Conv>, time::OffsetDateTime)> = inner
        .store
        .all()
        .into_iter()
        .filter_map(|c| {
            let (st, key) = {
                let st = c.lock();
                (
                    st.status,
                    if by_created {
                        st.meta.created_at
                    } else {
                        st.meta.updated_at
                    },
                )
            };
            (status.is_none() || status == Some(st)).then_some((c, key))
        })
        .collect();
    // Python's sort is stable (ties keep creation order), reverse=True included.
    recs.sort_by(|a, b| {
        let o = a.1.cmp(&b.1);
        let o = if desc { o.reverse() } else { o };
        o.then(a.0.serial.cmp(&b.0.serial))
    });
    let start = page_id
        .as_deref()
        .filter(|p| !p.is_empty())
        .and_then(|p| {
            recs.iter()
                .position(|(c, _)| c.id.simple().to_string() == p)
        })
        .unwrap_or(0);
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(b"{\"items\":[");
    let mut next: Option<String> = None;
    for (n, (c, _)) in recs[start..].iter().enumerate() {
        if n >= limit {
            next = Some(c.id.simple().to_string());
            break;
        }
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&c.info_bytes());
    }
    out.extend_from_slice(b"],\"next_page_id\":");
    out.extend_from_slice(serde_json::to_string(&next).unwrap_or_default().as_bytes());
    out.push(b'}');
    v::json_bytes(StatusCode::OK, out)
}

async fn count_conversations(
    State(inner): S,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    tri!(authorize(&inner, &headers));
    let q = Query::parse(q.as_deref());
    let mut errors = Vec::new();
    let status = parse_status(&q, &mut errors);
    tri!(fail_if(errors));
    let n = match status {
        None => inner.store.len(),
        Some(s) => inner
            .store
            .all()
            .iter()
            .filter(|c| c.lock().status == s)
            .count(),
    };
    v::json_bytes(StatusCode::OK, n.to_string().into_bytes())
}

async fn batch_conversations(
    State(inner): S,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    tri!(authorize(&inner, &headers));
    let q = Query::parse(q.as_deref());
    let mut errors = Vec::new();
    let raw = q.all("ids");
    let mut ids = Vec::new();
    if raw.is_empty() {
        errors.push(v::missing(vec![json!("query"), json!("ids")], Value::Null));
    } else {
        for (i, s) in raw.iter().enumerate() {
            match v::parse_uuid(s) {
                Ok(u) => ids.push(u),
                Err(e) => errors.push(v::uuid_error(
                    vec![json!("query"), json!("ids"), json!(i)],
                    s,
                    &e,
                )),
            }
        }
        if errors.is_empty() && raw.len() > 99 {
            errors.push(v::item(
                "too_long",
                vec![json!("query"), json!("ids")],
                format!(
                    "List should have at most 99 items after validation, not {}",
                    raw.len()
                ),
                json!(raw),
                Some(json!({"field_type": "List", "max_length": 99, "actual_length": raw.len()})),
            ));
        }
    }
    v::query_bool(&q, "include_skills", false, &mut errors);
    tri!(fail_if(errors));
    let mut out = Vec::with_capacity(4096 * ids.len().max(1));
    out.push(b'[');
    for (n, id) in ids.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        match inner.store.get(id) {
            Some(c) => out.extend_from_slice(&c.info_bytes()),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.push(b']');
    v::json_bytes(StatusCode::OK, out)
}

// ---------------------------------------------------------------- create

fn optional_uuid_field(obj: &serde_json::Map<String, Value>, name: &str, errors: &mut Vec<Value>) {
    match obj.get(name) {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            if let Err(e) = v::parse_uuid(s) {
                errors.push(v::uuid_error(vec![json!("body"), json!(name)], s, &e));
            }
        }
        Some(other) => errors.push(v::item(
            "uuid_type",
            vec![json!("body"), json!(name)],
            "UUID input should be a string, bytes or UUID object",
            other.clone(),
            None,
        )),
    }
}

fn tags_field(val: Option<&Value>, loc: Vec<Value>, errors: &mut Vec<Value>) -> Option<Value> {
    match val {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            for (k, x) in m {
                if !x.is_string() {
                    let mut l = loc.clone();
                    l.push(json!(k));
                    errors.push(v::item(
                        "string_type",
                        l,
                        "Input should be a valid string",
                        x.clone(),
                        None,
                    ));
                }
            }
            Some(Value::Object(m.clone()))
        }
        Some(other) => {
            errors.push(v::item(
                "dict_type",
                loc,
                "Input should be a valid dictionary",
                other.clone(),
                None,
            ));
            None
        }
    }
}

fn not_an_object(loc: Vec<Value>, input: &Value) -> Value {
    v::item(
        "model_attributes_type",
        loc,
        "Input should be a valid dictionary or object to extract fields from",
        input.clone(),
        None,
    )
}

/// `SendMessageRequest` (body of `POST /events`, `initial_message`): role, content, run.
pub(crate) fn validate_message(
    val: &Value,
    loc: &[Value],
    errors: &mut Vec<Value>,
) -> Option<(String, Vec<Value>, bool)> {
    let at = |extra: &[Value]| -> Vec<Value> { loc.iter().chain(extra.iter()).cloned().collect() };
    let Value::Object(m) = val else {
        errors.push(not_an_object(loc.to_vec(), val));
        return None;
    };
    let before = errors.len();
    const ROLES: [&str; 4] = ["user", "system", "assistant", "tool"];
    let role = match m.get("role") {
        None => "user".to_owned(),
        Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
        Some(other) => {
            errors.push(v::literal_error(
                at(&[json!("role")]),
                other.clone(),
                &ROLES,
            ));
            String::new()
        }
    };
    let mut content = Vec::new();
    match m.get("content") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, it) in items.iter().enumerate() {
                content_item(it, at(&[json!("content"), json!(i)]), errors);
                content.push(it.clone());
            }
        }
        Some(other) => errors.push(v::item(
            "list_type",
            at(&[json!("content")]),
            "Input should be a valid list",
            other.clone(),
            None,
        )),
    }
    let run = match m.get("run") {
        None => false,
        Some(r) => v::body_bool(r, at(&[json!("run")]), errors),
    };
    (errors.len() == before).then_some((role, content, run))
}

/// `TextContent | ImageContent`, a union without discriminator: valid if either member is,
/// otherwise both members' errors.
fn content_item(it: &Value, loc: Vec<Value>, errors: &mut Vec<Value>) {
    let at = |member: &str, field: Option<&str>| -> Vec<Value> {
        let mut l = loc.clone();
        l.push(json!(member));
        if let Some(f) = field {
            l.push(json!(f));
        }
        l
    };
    let Value::Object(m) = it else {
        errors.push(not_an_object(at("TextContent", None), it));
        errors.push(not_an_object(at("ImageContent", None), it));
        return;
    };
    let mut text_errs = Vec::new();
    if let Some(t) = m.get("type") {
        if t != "text" {
            text_errs.push(v::literal_error(
                at("TextContent", Some("type")),
                t.clone(),
                &["text"],
            ));
        }
    }
    match m.get("text") {
        None => text_errs.push(v::missing(at("TextContent", Some("text")), it.clone())),
        Some(Value::String(_)) => {}
        Some(other) => text_errs.push(v::item(
            "string_type",
            at("TextContent", Some("text")),
            "Input should be a valid string",
            other.clone(),
            None,
        )),
    }
    let mut img_errs = Vec::new();
    if let Some(t) = m.get("type") {
        if t != "image" {
            img_errs.push(v::literal_error(
                at("ImageContent", Some("type")),
                t.clone(),
                &["image"],
            ));
        }
    }
    match m.get("image_urls") {
        None => img_errs.push(v::missing(
            at("ImageContent", Some("image_urls")),
            it.clone(),
        )),
        Some(Value::Array(_)) => {}
        Some(other) => img_errs.push(v::item(
            "list_type",
            at("ImageContent", Some("image_urls")),
            "Input should be a valid list",
            other.clone(),
            None,
        )),
    }
    if !text_errs.is_empty() && !img_errs.is_empty() {
        errors.extend(text_errs);
        errors.extend(img_errs);
    }
}

/// `StartConversationRequest` validation; returns the body when valid.
fn validate_create(body: &BodyJson, errors: &mut Vec<Value>) -> Option<Value> {
    let BodyJson::Value(body) = body else {
        errors.push(v::missing(vec![json!("body")], Value::Null));
        return None;
    };
    let Value::Object(obj) = body else {
        errors.push(not_an_object(vec![json!("body")], body));
        return None;
    };
    let before = errors.len();
    match obj.get("workspace") {
        None => {
            // The model's before-validator adds `agent_settings: null` next to an `agent`.
            let mut input = obj.clone();
            if input.contains_key("agent") && !input.contains_key("agent_settings") {
                input.insert("agent_settings".into(), Value::Null);
            }
            errors.push(v::missing(
                vec![json!("body"), json!("workspace")],
                v::redact(&Value::Object(input)),
            ));
        }
        Some(Value::Object(w)) => {
            if !w.contains_key("working_dir") {
                errors.push(v::missing(
                    vec![json!("body"), json!("workspace"), json!("working_dir")],
                    v::redact(&Value::Object(w.clone())),
                ));
            }
        }
        Some(other) => errors.push(not_an_object(
            vec![json!("body"), json!("workspace")],
            other,
        )),
    }
    optional_uuid_field(obj, "conversation_id", errors);
    optional_uuid_field(obj, "parent_conversation_id", errors);
    optional_uuid_field(obj, "agent_profile_id", errors);
    if let Some(mi) = obj.get("max_iterations") {
        match mi.as_i64() {
            Some(n) if n >= 1 => {}
            Some(_) => errors.push(v::item(
                "greater_than_equal",
                vec![json!("body"), json!("max_iterations")],
                "Input should be greater than or equal to 1",
                mi.clone(),
                Some(json!({"ge": 1})),
            )),
            None => errors.push(v::item(
                "int_type",
                vec![json!("body"), json!("max_iterations")],
                "Input should be a valid integer",
                mi.clone(),
                None,
            )),
        }
    }
    tags_field(obj.get("tags"), vec![json!("body"), json!("tags")], errors);
    if let Some(m) = obj.get("initial_message").filter(|m| !m.is_null()) {
        validate_message(m, &[json!("body"), json!("initial_message")], errors);
    }
    if let Some(rt) = obj.get("conversation_runtime").filter(|r| !r.is_null()) {
        if rt != "local" && rt != "docker" {
            errors.push(v::literal_error(
                vec![json!("body"), json!("conversation_runtime")],
                rt.clone(),
                &["local", "docker"],
            ));
        }
    }
    if let Some(agent) = obj.get("agent") {
        match agent {
            Value::Object(a) => {
                let kind = a.get("kind").and_then(Value::as_str).unwrap_or("");
                if kind != "Agent" && kind != "ACPAgent" {
                    let e = format!("Unknown kind '{kind}' for openhands.sdk.agent.base.AgentBase; Expected one of: ['ACPAgent', 'Agent']");
                    errors.push(v::item(
                        "value_error",
                        vec![json!("body"), json!("agent")],
                        format!("Value error, {e}"),
                        v::redact(agent),
                        Some(json!({"error": e})),
                    ));
                }
            }
            other => errors.push(not_an_object(vec![json!("body"), json!("agent")], other)),
        }
    }
    if errors.len() != before {
        return None;
    }
    let present = |k: &str| obj.get(k).is_some_and(|x| !x.is_null());
    if !present("agent") && !present("agent_settings") && !present("agent_profile_id") {
        let e = "One of `agent`, `agent_settings`, or `agent_profile_id` must be provided";
        errors.push(v::item(
            "value_error",
            vec![json!("body")],
            format!("Value error, {e}"),
            v::redact(body),
            Some(json!({"error": e})),
        ));
        return None;
    }
    Some(body.clone())
}

async fn create_conversation(
    State(inner): S,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = tri!(v::parse_body(&body));
    tri!(authorize(&inner, &headers));
    {
        let mut log = inner.create_bodies.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() >= 1000 {
            log.pop_front();
        }
        if let v::BodyJson::Value(b) = &body {
            log.push_back(b.clone());
        }
    }
    let q = Query::parse(q.as_deref());
    let mut errors = Vec::new();
    v::query_bool(&q, "include_skills", false, &mut errors);
    let valid = validate_create(&body, &mut errors);
    tri!(fail_if(errors));
    let Some(body) = valid else {
        return v::internal_error("unreachable");
    };
    if body.get("conversation_runtime").and_then(Value::as_str) == Some("docker") {
        return v::detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            "This server only runs local conversations",
        );
    }
    let (conv, is_new) = ops::create(&inner, CreateSpec::from_body(None, &body));
    let info = conv.lock().info(conv.id, false);
    v::json_response(
        if is_new {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        &info,
    )
}

// ---------------------------------------------------------------- one conversation

async fn get_conversation(
    State(inner): S,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    tri!(authorize(&inner, &headers));
    let mut errors = Vec::new();
    let id = v::path_uuid(&id, "conversation_id", &mut errors);
    v::query_bool(
        &Query::parse(q.as_deref()),
        "include_skills",
        false,
        &mut errors,
    );
    tri!(fail_if(errors));
    match id.and_then(|id| inner.store.get(&id)) {
        Some(c) => v::json_bytes(StatusCode::OK, c.info_bytes().to_vec()),
        None => v::not_found(),
    }
}

fn title_field(
    val: Option<&Value>,
    max: usize,
    check_blank: bool,
    errors: &mut Vec<Value>,
) -> Option<String> {
    let loc = vec![json!("body"), json!("title")];
    match val {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let n = s.chars().count();
            if n < 1 && check_blank {
                errors.push(v::item(
                    "string_too_short",
                    loc,
                    "String should have at least 1 character",
                    json!(s),
                    Some(json!({"min_length": 1})),
                ));
                None
            } else if n > max {
                errors.push(v::item(
                    "string_too_long",
                    loc,
                    format!("String should have at most {max} characters"),
                    json!(s),
                    Some(json!({"max_length": max})),
                ));
                None
            } else if check_blank && s.trim().is_empty() {
                let e = "title must not be blank";
                errors.push(v::item(
                    "value_error",
                    loc,
                    format!("Value error, {e}"),
                    json!(s),
                    Some(json!({"error": e})),
                ));
                None
            } else {
                Some(s.clone())
            }
        }
        Some(other) => {
            errors.push(v::item(
                "string_type",
                loc,
                "Input should be a valid string",
                other.clone(),
                None,
            ));
            None
        }
    }
}

async fn patch_conversation(
    State(inner): S,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = tri!(v::parse_body(&body));
    tri!(authorize(&inner, &headers));
    let mut errors = Vec::new();
    let id = v::path_uuid(&id, "conversation_id", &mut errors);
    let mut title = None;
    let mut tags = None;
    match &body {
        BodyJson::Empty => errors.push(v::missing(vec![json!("body")], Value::Null)),
        BodyJson::Value(Value::Object(m)) => {
            title = title_field(m.get("title"), 200, true, &mut errors);
            tags = tags_field(
                m.get("tags"),
                vec![json!("body"), json!("tags")],
                &mut errors,
            );
        }
        BodyJson::Value(other) => errors.push(not_an_object(vec![json!("body")], other)),
    }
    tri!(fail_if(errors));
    let Some(conv) = id.and_then(|id| inner.store.get(&id)) else {
        return v::not_found();
    };
    let mut st = conv.lock();
    st.meta.updated_at = clock::now_utc();
    if let Some(t) = title {
        st.meta.title = Some(t.trim().to_owned());
    }
    if let Some(t) = tags {
        st.meta.tags = t.clone();
        st.state_update(&inner.cfg, "tags", t);
    }
    st.invalidate();
    v::success()
}

async fn delete_conversation(
    State(inner): S,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    tri!(authorize(&inner, &headers));
    let mut errors = Vec::new();
    let id = v::path_uuid(&id, "conversation_id", &mut errors);
    tri!(fail_if(errors));
    match id {
        Some(id) if ops::delete(&inner, &id) => v::success(),
        _ => v::not_found(),
    }
}

/// Auth + path id + existence, for the simple POST actions.
fn existing(inner: &Arc<Inner>, headers: &HeaderMap, id: &str) -> Result<Arc<Conv>, Response> {
    authorize(inner, headers)?;
    let mut errors = Vec::new();
    let id = v::path_uuid(id, "conversation_id", &mut errors);
    fail_if(errors)?;
    id.and_then(|id| inner.store.get(&id))
        .ok_or_else(v::not_found)
}

async fn run_conversation(State(inner): S, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let conv = tri!(existing(&inner, &headers, &id));
    match ops::start_run(&inner, &conv) {
        Ok(()) => v::success(),
        Err(ops::AlreadyRunning) => v::detail(
            StatusCode::CONFLICT,
            "Conversation already running. Wait for completion or pause first.",
        ),
    }
}

async fn pause_conversation(
    State(inner): S,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let conv = tri!(existing(&inner, &headers, &id));
    ops::pause_conversation(&inner, &conv);
    v::success()
}

async fn interrupt_conversation(
    State(inner): S,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let conv = tri!(existing(&inner, &headers, &id));
    ops::interrupt_conversation(&inner, &conv);
    v::success()
}

async fn runtime_info(State(inner): S, Path(id): Path<String>, headers: HeaderMap) -> Response {
    tri!(existing(&inner, &headers, &id));
    v::json_bytes(
        StatusCode::OK,
        br#"{"runtime_status":"available","can_resume":true,"runtime_error":null}"#.to_vec(),
    )
}

async fn final_response(State(inner): S, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let conv = tri!(existing(&inner, &headers, &id));
    let r = conv.lock().final_response.clone();
    v::json_response(StatusCode::OK, &json!({ "response": r }))
}

async fn fork_conversation(
    State(inner): S,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = tri!(v::parse_body(&body));
    tri!(authorize(&inner, &headers));
    let mut errors = Vec::new();
    let id = v::path_uuid(&id, "conversation_id", &mut errors);
    v::query_bool(
        &Query::parse(q.as_deref()),
        "include_skills",
        false,
        &mut errors,
    );
    let (mut fork_id, mut title, mut tags, mut from_event_id) = (None, None, None, None);
    match &body {
        BodyJson::Empty | BodyJson::Value(Value::Null) => {}
        BodyJson::Value(Value::Object(m)) => {
            optional_uuid_field(m, "id", &mut errors);
            fork_id = m
                .get("id")
                .and_then(Value::as_str)
                .and_then(|s| Uuid::parse_str(s).ok());
            title = title_field(m.get("title"), 200, false, &mut errors);
            tags = tags_field(
                m.get("tags"),
                vec![json!("body"), json!("tags")],
                &mut errors,
            );
            if let Some(r) = m.get("reset_metrics") {
                v::body_bool(r, vec![json!("body"), json!("reset_metrics")], &mut errors);
            }
            match m.get("from_event_id") {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => from_event_id = Some(s.clone()),
                Some(other) => errors.push(v::item(
                    "string_type",
                    vec![json!("body"), json!("from_event_id")],
                    "Input should be a valid string",
                    other.clone(),
                    None,
                )),
            }
        }
        BodyJson::Value(other) => errors.push(not_an_object(vec![json!("body")], other)),
    }
    tri!(fail_if(errors));
    let Some(src) = id.and_then(|id| inner.store.get(&id)) else {
        return v::detail(StatusCode::NOT_FOUND, "Source conversation not found");
    };
    match ops::fork(&inner, &src, fork_id, title, tags, from_event_id) {
        Ok(info) => v::json_response(StatusCode::CREATED, &info),
        Err(ForkError::Conflict(d)) => v::detail(StatusCode::CONFLICT, &d),
        Err(ForkError::UnknownEvent(d)) => v::detail(StatusCode::NOT_FOUND, &d),
    }
}

async fn start_child(
    State(inner): S,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = tri!(v::parse_body(&body));
    tri!(authorize(&inner, &headers));
    let mut errors = Vec::new();
    let id = v::path_uuid(&id, "conversation_id", &mut errors);
    let (mut task, mut title, mut isolation) = (String::new(), None, "worktree".to_owned());
    match &body {
        BodyJson::Empty => errors.push(v::missing(vec![json!("body")], Value::Null)),
        BodyJson::Value(Value::Object(m)) => {
            match m.get("task") {
                None => errors.push(v::missing(
                    vec![json!("body"), json!("task")],
                    body_value(&body),
                )),
                Some(Value::String(s)) if s.is_empty() => errors.push(v::item(
                    "string_too_short",
                    vec![json!("body"), json!("task")],
                    "String should have at least 1 character",
                    json!(s),
                    Some(json!({"min_length": 1})),
                )),
                Some(Value::String(s)) => task = s.clone(),
                Some(other) => errors.push(v::item(
                    "string_type",
                    vec![json!("body"), json!("task")],
                    "Input should be a valid string",
                    other.clone(),
                    None,
                )),
            }
            title = title_field(m.get("title"), usize::MAX, false, &mut errors);
            match m.get("isolation") {
                None => {}
                Some(Value::String(s)) if s == "worktree" || s == "shared" => isolation = s.clone(),
                Some(other) => errors.push(v::literal_error(
                    vec![json!("body"), json!("isolation")],
                    other.clone(),
                    &["worktree", "shared"],
                )),
            }
        }
        BodyJson::Value(other) => errors.push(not_an_object(vec![json!("body")], other)),
    }
    tri!(fail_if(errors));
    let Some(parent) = id.and_then(|id| inner.store.get(&id)) else {
        return v::detail(StatusCode::NOT_FOUND, "Parent conversation not found");
    };
    let resp = ops::start_child(&inner, &parent, &task, title, &isolation);
    v::json_response(StatusCode::CREATED, &resp)
}

fn body_value(b: &BodyJson) -> Value {
    match b {
        BodyJson::Empty => Value::Null,
        BodyJson::Value(v) => v.clone(),
    }
}

// ---------------------------------------------------------------- events

/// Auth, path id, then the `get_event_service` dependency (404 with the id).
fn event_service(inner: &Arc<Inner>, headers: &HeaderMap, id: &str) -> Result<Arc<Conv>, Response> {
    authorize(inner, headers)?;
    let mut errors = Vec::new();
    let uid = v::path_uuid(id, "conversation_id", &mut errors);
    fail_if(errors)?;
    let uid = uid.unwrap_or_default();
    inner.store.get(&uid).ok_or_else(|| conv_not_found_dep(uid))
}

async fn send_message(
    State(inner): S,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = tri!(v::parse_body(&body));
    let conv = tri!(event_service(&inner, &headers, &id));
    let mut errors = Vec::new();
    let msg = match &body {
        BodyJson::Empty => {
            errors.push(v::missing(vec![json!("body")], Value::Null));
            None
        }
        BodyJson::Value(b) => validate_message(b, &[json!("body")], &mut errors),
    };
    tri!(fail_if(errors));
    let Some((role, content, run)) = msg else {
        return v::internal_error("unreachable");
    };
    if role != "user" {
        return v::internal_error("Only user messages are allowed to be sent to the agent.");
    }
    ops::send_message(&inner, &conv, &content, run);
    v::success()
}

struct EventFilter {
    kind: Option<String>,
    source: Option<String>,
    body: Option<String>,
    gte: Option<String>,
    lt: Option<String>,
}

impl EventFilter {
    fn parse(inner: &Inner, q: &Query, errors: &mut Vec<Value>) -> Self {
        let mut dt = |name: &str| -> Option<String> {
            let raw = q.get(name)?;
            match clock::parse_query_datetime(raw, inner.cfg.utc_offset) {
                Ok(s) => Some(s),
                Err(e) => {
                    errors.push(v::item(
                        e.kind,
                        vec![json!("query"), json!(name)],
                        e.msg(),
                        json!(raw),
                        Some(json!({"error": e.error})),
                    ));
                    None
                }
            }
        };
        let gte = dt("timestamp__gte");
        let lt = dt("timestamp__lt");
        EventFilter {
            kind: q.get("kind").map(str::to_owned),
            source: q.get("source").map(str::to_owned),
            body: q.get("body").map(str::to_lowercase),
            gte,
            lt,
        }
    }

    fn matches(&self, e: &super::store::StoredEvent) -> bool {
        if let Some(k) = &self.kind {
            let qualified_ok =
                k.rsplit('.').next() == Some(e.kind.as_str()) && k.starts_with("openhands.");
            if *k != e.kind && !qualified_ok {
                return false;
            }
        }
        if self.source.as_ref().is_some_and(|s| *s != e.source) {
            return false;
        }
        if self
            .gte
            .as_ref()
            .is_some_and(|g| e.timestamp.as_str() < g.as_str())
        {
            return false;
        }
        if self
            .lt
            .as_ref()
            .is_some_and(|l| e.timestamp.as_str() >= l.as_str())
        {
            return false;
        }
        if let Some(b) = &self.body {
            match &e.search_text {
                Some(t) if t.contains(b.as_str()) => {}
                _ => return false,
            }
        }
        true
    }
}

async fn search_events(
    State(inner): S,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let conv = tri!(event_service(&inner, &headers, &id));
    let q = Query::parse(q.as_deref());
    let mut errors = Vec::new();
    let page_id = q.get("page_id").map(str::to_owned);
    let limit = v::query_int(&q, "limit", 100, Some(0), Some(100), &mut errors) as usize;
    let filter = EventFilter::parse(&inner, &q, &mut errors);
    const SORTS: [&str; 2] = ["TIMESTAMP", "TIMESTAMP_DESC"];
    let desc = match q.get("sort_order") {
        None | Some("TIMESTAMP") => false,
        Some("TIMESTAMP_DESC") => true,
        Some(s) => {
            errors.push(v::enum_error(
                vec![json!("query"), json!("sort_order")],
                s,
                &SORTS,
            ));
            false
        }
    };
    tri!(fail_if(errors));
    let st = conv.lock();
    let total = st.events.len();
    let start = page_id
        .as_deref()
        .filter(|p| !p.is_empty())
        .and_then(|p| st.index.get(p).copied());
    let indices: Box<dyn Iterator<Item = usize>> = if desc {
        match start.or(total.checked_sub(1)) {
            Some(s) => Box::new((0..=s).rev()),
            None => Box::new(std::iter::empty()),
        }
    } else {
        Box::new(start.unwrap_or(0)..total)
    };
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(b"{\"items\":[");
    let mut n = 0usize;
    let mut next: Option<String> = None;
    for i in indices {
        let e = &st.events[i];
        if !filter.matches(e) {
            continue;
        }
        if n >= limit {
            next = Some(e.id.clone());
            break;
        }
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(e.frame.event.as_bytes());
        n += 1;
    }
    drop(st);
    out.extend_from_slice(b"],\"next_page_id\":");
    out.extend_from_slice(serde_json::to_string(&next).unwrap_or_default().as_bytes());
    out.push(b'}');
    v::json_bytes(StatusCode::OK, out)
}

async fn count_events(
    State(inner): S,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let conv = tri!(event_service(&inner, &headers, &id));
    let q = Query::parse(q.as_deref());
    let mut errors = Vec::new();
    let filter = EventFilter::parse(&inner, &q, &mut errors);
    tri!(fail_if(errors));
    let n = conv
        .lock()
        .events
        .iter()
        .filter(|e| filter.matches(e))
        .count();
    v::json_bytes(StatusCode::OK, n.to_string().into_bytes())
}

async fn get_event(
    State(inner): S,
    Path((id, event_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let conv = tri!(event_service(&inner, &headers, &id));
    let st = conv.lock();
    match st.index.get(&event_id) {
        Some(&i) => v::json_bytes(StatusCode::OK, st.events[i].frame.event.as_bytes().to_vec()),
        None => v::not_found(),
    }
}

async fn batch_events(
    State(inner): S,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = tri!(v::parse_body(&body));
    let conv = tri!(event_service(&inner, &headers, &id));
    let mut errors = Vec::new();
    let mut ids = Vec::new();
    match &body {
        BodyJson::Empty => errors.push(v::missing(vec![json!("body")], Value::Null)),
        BodyJson::Value(Value::Array(a)) => {
            for (i, x) in a.iter().enumerate() {
                match x {
                    Value::String(s) => ids.push(s.clone()),
                    other => errors.push(v::item(
                        "string_type",
                        vec![json!("body"), json!(i)],
                        "Input should be a valid string",
                        other.clone(),
                        None,
                    )),
                }
            }
        }
        BodyJson::Value(other) => errors.push(v::item(
            "list_type",
            vec![json!("body")],
            "Input should be a valid list",
            other.clone(),
            None,
        )),
    }
    tri!(fail_if(errors));
    let st = conv.lock();
    let mut out = Vec::with_capacity(1024);
    out.push(b'[');
    for (n, eid) in ids.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        match st.index.get(eid) {
            Some(&i) => out.extend_from_slice(st.events[i].frame.event.as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.push(b']');
    v::json_bytes(StatusCode::OK, out)
}

/// `{"url": …}` from the configured stand-in (the real server answers its VS Code address
/// with the session key as `tkn`).
async fn vscode_url(State(inner): S, headers: HeaderMap) -> Response {
    tri!(authorize(&inner, &headers));
    v::json_response(StatusCode::OK, &json!({ "url": inner.cfg.vscode_url }))
}
