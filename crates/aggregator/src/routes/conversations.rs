//! `/api/conversations…`: create, the merged catalog reads, delete, and everything
//! per-conversation (forwarded to the conversation's downstream).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use nestor_conversation_service::{present, BatchQuery, QueryParams, SearchQuery};
use nestor_core::client::full_body;
use nestor_core::error::ValidationItem;
use nestor_core::{ApiError, ConversationId, Downstream, DownstreamState, UserId};
use nestor_provisioner::ProvisionRequest;
use serde_json::{json, Map, Value};

use crate::app::AppState;
use crate::auth::{Principal, Scope};
use crate::errors::{provision_error, HttpError, HttpResult};
use crate::forward::{self, bounded_body, strip_key_from_query, ForwardOpts, Forwarded};

/// A JSON answer, compact like FastAPI's.
pub fn json_response(status: StatusCode, v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Parse a conversation id from a path, with the agent-server's 422.
pub fn path_id(raw: &str) -> Result<ConversationId, ApiError> {
    ConversationId::parse(raw).map_err(|e| {
        ApiError::Validation(vec![ValidationItem::uuid_parsing(
            vec![json!("path"), json!("conversation_id")],
            raw,
            &e.0,
        )])
    })
}

/// The 404 the agent-server gives for an unknown conversation on this sub-route.
pub fn unknown_conversation(id: &ConversationId, rest: &str) -> ApiError {
    let first = rest.split('/').next().unwrap_or("");
    match first {
        "events" | "workspace" | "bash" | "file" | "git" | "vscode" => {
            ApiError::NotFound(format!("Conversation not found: {id}"))
        }
        "fork" => ApiError::NotFound("Source conversation not found".into()),
        "children" => ApiError::NotFound("Parent conversation not found".into()),
        // `download-trajectory`: `GET /api/file/download-trajectory/{id}`.
        "ask_agent" | "condense" | "navigate" | "download-trajectory" => ApiError::NotFound("Conversation not found".into()),
        _ => ApiError::not_found(),
    }
}

/// The path and query to send downstream: as received, minus `session_api_key`.
fn downstream_target(uri: &http::Uri) -> String {
    let mut pq = uri.path().to_owned();
    if let Some(q) = uri.query().and_then(strip_key_from_query) {
        pq.push('?');
        pq.push_str(&q);
    }
    pq
}

/// Look up a conversation the caller may see. Another user's conversation answers exactly
/// like an unknown one.
pub fn route(state: &AppState, id: &ConversationId, who: &Principal, rest: &str) -> Result<Arc<Downstream>, ApiError> {
    match state.catalog.route(id) {
        Some((ds, owner)) if state.auth.is_open() || who.may_access(id, &owner) => Ok(ds),
        _ => Err(unknown_conversation(id, rest)),
    }
}

/// Make sure the catalog knows `id` if the provisioner can find it: on a catalog miss the
/// provisioner is asked ([`nestor_provisioner::Provisioner::find`]), so one nestor replica
/// serves conversations another created (kubernetes: routing rebuilt from labels). A found
/// conversation is adopted with its downstream's conversation list (or a stub while it is
/// not running). Bounded by the provisioner's own API timeout; a failure is only logged.
pub async fn locate(state: &AppState, id: &ConversationId) {
    if state.catalog.route(id).is_some() {
        return;
    }
    match state.provisioner.find(id).await {
        Ok(Some(ds)) => {
            let adopted = ds.state() == DownstreamState::Ready && state.catalog.refresh(&ds).await.is_ok();
            if !adopted || state.catalog.route(id).is_none() {
                let owner = ds.owner().cloned().unwrap_or_else(UserId::default_user);
                state.catalog.register(*id, &ds, owner, json!({"id": id.to_string()})).await;
            }
            tracing::info!(conversation = %id, downstream = %ds.id(), "conversation found by the provisioner");
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(conversation = %id, "provisioner lookup failed: {e}"),
    }
}

fn user_principal(user: &UserId) -> Principal {
    Principal { user: user.clone(), scope: Scope::User }
}

// ---------------------------------------------------------------- catalog reads

/// `GET /api/conversations/search`.
pub async fn search(State(state): State<AppState>, req: Request<Body>) -> HttpResult {
    let user = state.auth.check_user(req.headers())?;
    let q = SearchQuery::parse(&QueryParams::parse(req.uri().query())).map_err(ApiError::Validation)?;
    refresh_catalog(&state).await;
    let owner = scope(&state, &user);
    let page = state.catalog.search(owner.as_ref(), q.status.as_deref(), q.sort_order, q.page_id.as_deref(), q.limit);
    let mut live = if q.include_skills { live_infos(&state, page.items.iter().map(|i| i.id).collect(), true).await } else { HashMap::new() };
    let mut items: Vec<PageItem> = Vec::with_capacity(page.items.len());
    for it in &page.items {
        if let Some(v) = live.remove(&it.id) {
            items.push(PageItem::Live(v));
        } else if let Some(p) = state.catalog.presented(&it.id) {
            items.push(PageItem::Catalog(p));
        }
    }
    // Serialized straight from the catalog's shared infos (no copy of the page).
    let body = serde_json::to_vec(&SearchPage { items, next_page_id: page.next_page_id }).unwrap_or_default();
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(r)
}

/// A page of `GET /api/conversations/search`, in the agent-server's shape.
#[derive(serde::Serialize)]
struct SearchPage {
    items: Vec<PageItem>,
    next_page_id: Option<String>,
}

/// One search result: read live from its downstream (`include_skills`), or from the catalog.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum PageItem {
    Live(Value),
    Catalog(nestor_conversation_service::Presented),
}

/// Bring the catalog up to date before answering from it: each running downstream is
/// re-listed when its list is older than `catalog.max_staleness_ms`, or, if it reports
/// changes by webhook, `catalog.webhook_staleness_secs`.
async fn refresh_catalog(state: &AppState) {
    let quick = std::time::Duration::from_millis(state.cfg.catalog.max_staleness_ms);
    let slow = std::time::Duration::from_secs_f64(state.cfg.catalog.webhook_staleness_secs.max(0.0));
    state
        .catalog
        .refresh_stale_with(state.provisioner.list(), |ds| {
            if state.webhooks.last_heard(ds).is_some_and(|t| t.elapsed() < slow) {
                slow
            } else {
                quick
            }
        })
        .await;
}

/// Which user's conversations a caller sees (None: everyone's, on an open server).
fn scope(state: &AppState, user: &UserId) -> Option<UserId> {
    state.auth.listing_scope(user)
}

/// `GET /api/conversations/count`.
pub async fn count(State(state): State<AppState>, req: Request<Body>) -> HttpResult {
    let user = state.auth.check_user(req.headers())?;
    let status = nestor_conversation_service::query::parse_count(&QueryParams::parse(req.uri().query()))
        .map_err(ApiError::Validation)?;
    refresh_catalog(&state).await;
    let n = state.catalog.count(scope(&state, &user).as_ref(), status.as_deref());
    Ok(json_response(StatusCode::OK, &json!(n)))
}

/// Fetch infos live from their downstreams (running ones only), grouped per downstream.
async fn live_infos(state: &AppState, ids: Vec<ConversationId>, include_skills: bool) -> HashMap<ConversationId, Value> {
    let mut by_ds: HashMap<nestor_core::DownstreamId, (Arc<Downstream>, Vec<ConversationId>)> = HashMap::new();
    for id in ids {
        if let Some((ds, _)) = state.catalog.route(&id) {
            if ds.state() == DownstreamState::Ready {
                by_ds.entry(ds.id().clone()).or_insert_with(|| (ds.clone(), Vec::new())).1.push(id);
            }
        }
    }
    let fetches = by_ds.into_values().map(|(ds, ids)| async move {
        let r = state.catalog.fetch_live(&ds, &ids, include_skills, forward::INTERNAL_CALL_TIMEOUT).await;
        (ds, ids, r)
    });
    let mut out = HashMap::new();
    for (ds, ids, r) in futures::future::join_all(fetches).await {
        match r {
            Ok(infos) => {
                for (id, info) in ids.into_iter().zip(infos) {
                    if let Some(v) = info {
                        out.insert(id, v);
                    }
                }
            }
            Err(e) => tracing::warn!(downstream = %ds.id(), "batch read failed, answering from the catalog: {e}"),
        }
    }
    out
}

/// `GET /api/conversations?ids=…` (up to 99, answer in request order, null if unknown).
pub async fn batch(State(state): State<AppState>, req: Request<Body>) -> HttpResult {
    let user = state.auth.check_user(req.headers())?;
    let q = BatchQuery::parse(&QueryParams::parse(req.uri().query())).map_err(ApiError::Validation)?;
    let who = user_principal(&user);
    let visible: Vec<ConversationId> = q.ids.iter().copied().filter(|id| route(&state, id, &who, "").is_ok()).collect();
    let live = live_infos(&state, visible.clone(), q.include_skills).await;
    let out: Vec<Value> = q
        .ids
        .iter()
        .map(|id| {
            if !visible.contains(id) {
                return Value::Null;
            }
            live.get(id).cloned().or_else(|| state.catalog.presented_info(id)).unwrap_or(Value::Null)
        })
        .collect();
    Ok(json_response(StatusCode::OK, &Value::Array(out)))
}

// ---------------------------------------------------------------- create

/// `POST /api/conversations`: mint the id if absent, provision a downstream, forward.
/// Idempotent like upstream: an existing id goes to its downstream (200, nothing new).
pub async fn create(State(state): State<AppState>, req: Request<Body>) -> HttpResult {
    let user = state.auth.check_user(req.headers())?;
    let who = user_principal(&user);
    let (parts, body) = req.into_parts();
    let limit = state.cfg.max_body_bytes;
    let body = bounded_body(&parts, body, limit)?;
    let bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(ApiError::PayloadTooLarge { limit }.into()),
        Err(e) => return Err(ApiError::BadRequest(format!("could not read the request body: {e}")).into()),
    };
    let mut obj = parse_create_body(&bytes)?;
    let id = match obj.get("conversation_id") {
        None | Some(Value::Null) => ConversationId::new_random(),
        Some(Value::String(s)) => ConversationId::parse(s).map_err(|e| {
            ApiError::Validation(vec![ValidationItem::uuid_parsing(vec![json!("body"), json!("conversation_id")], s, &e.0)])
        })?,
        Some(other) => {
            return Err(ApiError::Validation(vec![ValidationItem {
                kind: "uuid_type".into(),
                loc: vec![json!("body"), json!("conversation_id")],
                msg: "UUID input should be a string, bytes or UUID object".into(),
                input: other.clone(),
                ctx: None,
            }])
            .into())
        }
    };
    obj.insert("conversation_id".into(), Value::String(id.to_string()));

    // Already known: the owning downstream answers (200 + existing info).
    locate(&state, &id).await;
    if let Ok(ds) = route(&state, &id, &who, "") {
        return forward_create(&state, &ds, id, &user, parts, obj, false).await;
    }
    if state.catalog.route(&id).is_some() {
        // Someone else's conversation: creating it again must not reveal it exists.
        return Err(ApiError::Conflict(format!("conversation {id} cannot be created")).into());
    }

    // One create per id at a time. The entry goes when its last holder is done, also when
    // this request is cancelled mid-way (the client went away).
    let creating = CreatingEntry::take(&state.creating, id);
    let _guard = creating.lock().await;
    let result = async {
        if let Ok(ds) = route(&state, &id, &who, "") {
            return forward_create(&state, &ds, id, &user, parts, obj, false).await;
        }
        crate::lifecycle::admit(&state, Some(&user))?;
        if let Some(p) = &state.persistence {
            p.check_create(&user).await?;
        }
        // Settings, profiles and secrets live on nestor: resolve them before a downstream
        // sees the body (errors here cost no downstream).
        let obj = resolve_create_body(&state, &user, id, obj).await?;
        let started = std::time::Instant::now();
        let ds = state
            .provisioner
            .provision(ProvisionRequest { conversation: id, owner: user.clone() })
            .await
            .map_err(|e| provision_error(e, &format!("conversation {id}'s agent-server")))?;
        let r = forward_create(&state, &ds, id, &user, parts, obj, true).await;
        metrics::histogram!("nestor_provision_seconds", "provisioner" => state.provisioner.kind())
            .record(started.elapsed().as_secs_f64());
        r
    }
    .await;
    result
}

/// A holder of the per-id create lock (`AppState::creating`); dropping the last holder
/// removes the id's entry, so the map holds only creates in progress.
struct CreatingEntry<'a> {
    map: &'a dashmap::DashMap<ConversationId, Arc<tokio::sync::Mutex<()>>>,
    id: ConversationId,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> CreatingEntry<'a> {
    fn take(map: &'a dashmap::DashMap<ConversationId, Arc<tokio::sync::Mutex<()>>>, id: ConversationId) -> Self {
        let lock = map.entry(id).or_default().clone();
        CreatingEntry { map, id, lock }
    }

    /// Wait for the id's create lock (held until the guard drops; drop the guard first).
    async fn lock(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.lock.clone().lock_owned().await
    }
}

impl Drop for CreatingEntry<'_> {
    fn drop(&mut self) {
        // Only the map's handle and ours left: no one else is creating this id. The check
        // and removal run under the map's shard lock, as `take`'s insert does.
        self.map.remove_if(&self.id, |_, l| Arc::ptr_eq(l, &self.lock) && Arc::strong_count(l) <= 2);
    }
}

/// Resolve a new conversation's body against nestor's store: a body naming no agent gets
/// the user's defaults (active agent profile, else stored agent settings); profiles and
/// nestor cipher text are resolved; secrets become lookups at nestor (crate::secrets).
async fn resolve_create_body(
    state: &AppState,
    user: &UserId,
    id: ConversationId,
    mut obj: Map<String, Value>,
) -> Result<Map<String, Value>, HttpError> {
    if let Some(Value::Object(m)) = obj.get_mut("secrets") {
        crate::secrets::rewrite(state, id, user, m);
    }
    let named = ["agent", "agent_settings", "agent_profile_id"].iter().any(|k| obj.get(*k).is_some_and(|v| !v.is_null()));
    if !named {
        let (k, v) = state.settings.default_agent_source(user).await.map_err(crate::routes::settings::map_settings_error)?;
        obj.insert(k, v);
    }
    let resolved = state
        .settings
        .resolve_create(user, Value::Object(obj))
        .await
        .map_err(crate::routes::settings::map_settings_error)?;
    let Value::Object(mut obj) = resolved.body else {
        return Err(ApiError::Internal("settings resolution did not return an object".into()).into());
    };
    let allowed: Option<Vec<String>> = resolved.launched_agent_profile.as_ref().and_then(|p| {
        p.get("secret_refs").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
    });
    if state.cfg.inject_stored_secrets {
        let secrets = obj.entry("secrets").or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = secrets {
            crate::secrets::inject(state, id, user, m, allowed.as_deref()).await;
            if m.is_empty() {
                obj.remove("secrets");
            }
        }
    }
    Ok(obj)
}

/// Validate what nestor must read of a create body before spending a downstream on it.
fn parse_create_body(bytes: &Bytes) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        let (pos, reason) = nestor_settings::json_decode_error(bytes, &e);
        ApiError::Validation(vec![ValidationItem::json_invalid(pos, reason)])
    })?;
    let Value::Object(obj) = v else {
        return Err(ApiError::Validation(vec![ValidationItem {
            kind: "model_attributes_type".into(),
            loc: vec![json!("body")],
            msg: "Input should be a valid dictionary or object to extract fields from".into(),
            input: v,
            ctx: None,
        }]));
    };
    if !obj.contains_key("workspace") {
        return Err(ApiError::Validation(vec![ValidationItem::missing(
            vec![json!("body"), json!("workspace")],
            validated_input(&obj),
        )]));
    }
    Ok(obj)
}

/// The `input` the agent-server's 422 shows for a create body: the body as its model's
/// before-validator leaves it (`StartConversationRequest._normalize_agent_source`: null
/// agent sources dropped, `agent_settings: null` next to an `agent`, `kind: "Agent"` for an
/// agent with an `llm` and no kind), with secret-looking values redacted like its
/// `sanitize_dict` (an error answer never echoes an API key back).
fn validated_input(obj: &Map<String, Value>) -> Value {
    let mut p: Map<String, Value> =
        obj.iter().filter(|(k, v)| !(v.is_null() && (*k == "agent" || *k == "agent_settings"))).map(|(k, v)| (k.clone(), v.clone())).collect();
    if p.get("agent").is_some_and(|a| !a.is_null()) {
        p.insert("agent_settings".into(), Value::Null);
        if let Some(Value::Object(a)) = p.get_mut("agent") {
            if !a.contains_key("kind") && a.contains_key("llm") {
                a.insert("kind".into(), json!("Agent"));
            }
        }
    }
    sanitize(Value::Object(p))
}

/// The agent-server's `sanitize_dict`: values of keys naming a secret become `<redacted>`;
/// every value under `env`, `environment` and `headers` too.
fn sanitize(v: Value) -> Value {
    fn all(v: Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(m.into_iter().map(|(k, v)| (k, all(v))).collect()),
            Value::Array(a) => Value::Array(a.into_iter().map(all).collect()),
            _ => json!("<redacted>"),
        }
    }
    const SECRET: [&str; 8] = ["AUTHORIZATION", "COOKIE", "CREDENTIAL", "KEY", "PASSWORD", "SECRET", "SESSION", "TOKEN"];
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let lower = k.to_lowercase();
                    let upper = k.to_uppercase();
                    let v = if matches!(lower.as_str(), "environment" | "env" | "headers") {
                        all(v)
                    } else if SECRET.iter().any(|s| upper.contains(s)) {
                        json!("<redacted>")
                    } else {
                        sanitize(v)
                    };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(sanitize).collect()),
        other => other,
    }
}

async fn forward_create(
    state: &AppState,
    ds: &Arc<Downstream>,
    id: ConversationId,
    user: &UserId,
    mut parts: http::request::Parts,
    mut obj: Map<String, Value>,
    fresh: bool,
) -> HttpResult {
    if fresh {
        if let Err(e) = forward::ensure_ready(state, ds, Some(id)).await {
            release_if_empty(state, ds, id).await;
            return Err(e.into());
        }
        state.provisioner.prepare_create(ds, &mut obj);
    }
    let body = Bytes::from(serde_json::to_vec(&Value::Object(obj)).unwrap_or_default());
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let target = downstream_target(&parts.uri);
    let res = forward::forward(state, ds, Some(id), parts, full_body(body), &target, ForwardOpts { buffer_answer: true }).await;
    let (status, headers, body) = match res {
        Ok(Forwarded::Buffered { status, headers, body }) => (status, headers, body),
        Ok(Forwarded::Response(r)) => return Ok(r),
        Err(e) => {
            if fresh {
                release_if_empty(state, ds, id).await;
            }
            return Err(e.into());
        }
    };
    if status.is_success() {
        match serde_json::from_slice::<Value>(&body) {
            Ok(info) => {
                state.catalog.register(id, ds, user.clone(), info).await;
                if fresh && ds.primary() == Some(id) && state.catalog.count_on(ds.id()) == 1 {
                    // Its own new downstream: the catalog holds all of it (the first search
                    // need not list it; webhooks keep it current from here).
                    state.catalog.mark_listed(ds.id());
                }
                state.provisioner.mark_active(ds);
                if !state.fleet.knows(ds.id()) {
                    state.fleet.learn(&state.client, ds).await;
                }
            }
            Err(e) => tracing::warn!(conversation = %id, "create answer is not JSON: {e}"),
        }
    } else if fresh {
        release_if_empty(state, ds, id).await;
    }
    Ok(Forwarded::Buffered { status, headers, body }.into_response())
}

/// A create that failed leaves nothing behind.
async fn release_if_empty(state: &AppState, ds: &Arc<Downstream>, id: ConversationId) {
    state.auth.revoke_conversation(&id);
    let remaining = state.catalog.count_on(ds.id());
    if remaining == 0 && ds.primary() == Some(id) {
        if let Err(e) = state.provisioner.release(ds, id, 0).await {
            tracing::warn!(conversation = %id, "could not release after a failed create: {e}");
        }
    }
}

// ---------------------------------------------------------------- per conversation

/// `/api/conversations/{id}` and everything below it.
pub async fn per_conversation(State(state): State<AppState>, req: Request<Body>) -> HttpResult {
    // The id and the rest straight from the path (no extractor allocations on the hot path);
    // the id segment is percent-decoded like FastAPI does before validating it.
    let path = req.uri().path();
    let tail = path.strip_prefix("/api/conversations/").unwrap_or("");
    let (raw_seg, rest) = tail.split_once('/').unwrap_or((tail, ""));
    let decoded;
    let raw_id: &str = if raw_seg.contains('%') {
        decoded = percent_encoding::percent_decode_str(raw_seg).decode_utf8_lossy().into_owned();
        &decoded
    } else {
        raw_seg
    };
    let rest = rest.to_owned();
    let rest = rest.as_str();
    let is_workspace_file = req.method() == Method::GET && (rest == "workspace" || rest.starts_with("workspace/"));
    let who = if is_workspace_file {
        // Workspace files: header or the workspace cookie (browsers cannot set headers on
        // iframe/img loads).
        match state.auth.check_client(req.headers()) {
            Ok(p) => p,
            Err(e) => workspace_cookie(req.headers()).and_then(|k| state.auth.principal_for_key(k.as_bytes())).ok_or(e)?,
        }
    } else {
        state.auth.check_client(req.headers())?
    };
    let user = who.user.clone();
    if raw_id == "prepare-for-sandbox-pause" && rest.is_empty() {
        // Process-local upstream; nestor's own concern, not a client's.
        return Err(ApiError::not_found().into());
    }
    let id = path_id(raw_id)?;
    locate(&state, &id).await;
    let ds = route(&state, &id, &who, rest)?;
    let method = req.method().clone();
    match (method, rest) {
        (Method::DELETE, "") => delete(&state, &ds, id, req).await,
        (Method::POST, "runtime/credentials") => {
            let key = state.auth.mint_conversation_key(id, user.clone());
            Ok(json_response(StatusCode::OK, &json!({ "session_api_key": key.expose() })))
        }
        (Method::DELETE, "runtime") => {
            // Stop the conversation's runtime, keep its state (it starts again on demand).
            if ds.primary() == Some(id) {
                state.provisioner.stop(&ds).await.map_err(|e| provision_error(e, &format!("conversation {id}'s agent-server")))?;
            }
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            Ok(r)
        }
        (Method::GET, "runtime") => Ok(json_response(StatusCode::OK, &runtime_answer(&state, &ds, id).await)),
        (Method::POST, "runtime/reprovision") => {
            forward::ensure_ready(&state, &ds, Some(id)).await?;
            Ok(json_response(StatusCode::OK, &runtime_answer(&state, &ds, id).await))
        }
        (Method::POST, "events" | "run") if state.persistence.is_some() => {
            if let (Some(p), Some((_, owner))) = (&state.persistence, state.catalog.route(&id)) {
                // Pushed by the pod (kubernetes): its sidecar's status says; else nestor's own.
                match state.provisioner.workspace_status(&ds).await {
                    Some(remote) => p.check_work_status(&owner, id, &remote)?,
                    None => p.check_work(&owner, id)?,
                }
            }
            forward_streaming(&state, &ds, Some(id), req).await
        }
        (Method::POST, "fork") | (Method::POST, "children") => spawn_on_same(&state, &ds, id, &user, req).await,
        (Method::POST, "secrets") => update_secrets(&state, &ds, id, &user, req).await,
        (Method::GET, "vscode/url") => {
            let headers = req.headers().clone();
            let resp = forward_streaming(&state, &ds, Some(id), req).await?;
            Ok(crate::routes::vscode::rewrite_response(&state, id, &user, &headers, resp).await)
        }
        _ => forward_streaming(&state, &ds, Some(id), req).await,
    }
}

/// `GET …/runtime`: the agent-server's `ConversationRuntimeInfo` fields, plus nestor's own
/// under `nestor` (the persistence status of the conversation's files, when configured).
/// With the kubernetes backend the pod's sync sidecar pushes, and its status is asked for.
async fn runtime_answer(state: &AppState, ds: &Downstream, id: ConversationId) -> Value {
    let mut v = nestor_conversation_service::runtime_info(ds);
    if let (Some(p), Some((_, owner))) = (&state.persistence, state.catalog.route(&id)) {
        let storage = match state.provisioner.workspace_status(ds).await {
            Some(remote) => remote,
            None => p.status_json(&owner, id),
        };
        if let Some(o) = v.as_object_mut() {
            o.insert("nestor".into(), json!({ "workspace_storage": storage }));
        }
    }
    v
}

/// The raw key in the `oh_workspace_session_key` cookie, if any.
pub fn workspace_cookie(headers: &http::HeaderMap) -> Option<String> {
    cookie_value(headers, WORKSPACE_COOKIE)
}

/// The value of cookie `name`, if the request has it.
pub fn cookie_value(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// The workspace cookie's name (the agent-server's).
pub const WORKSPACE_COOKIE: &str = "oh_workspace_session_key";

/// Forward with streaming bodies both ways.
pub async fn forward_streaming(state: &AppState, ds: &Arc<Downstream>, id: Option<ConversationId>, req: Request<Body>) -> HttpResult {
    let (parts, body) = req.into_parts();
    let body = bounded_body(&parts, body, state.cfg.max_body_bytes)?;
    let target = downstream_target(&parts.uri);
    let r = forward::forward(state, ds, id, parts, body, &target, ForwardOpts { buffer_answer: false }).await?;
    Ok(r.into_response())
}

/// `POST /{id}/secrets`: settings-secret lookups are rewritten to point at nestor (the
/// downstream would resolve a relative URL against itself).
async fn update_secrets(state: &AppState, ds: &Arc<Downstream>, id: ConversationId, user: &UserId, req: Request<Body>) -> HttpResult {
    let (mut parts, body) = req.into_parts();
    let limit = state.cfg.max_body_bytes;
    let bytes = bounded_body(&parts, body, limit)?
        .collect()
        .await
        .map_err(|e| ApiError::BadRequest(format!("could not read the request body: {e}")))?
        .to_bytes();
    let bytes = match serde_json::from_slice::<Value>(&bytes) {
        Ok(mut v) => {
            if let Some(Value::Object(m)) = v.get_mut("secrets") {
                crate::secrets::rewrite(state, id, user, m);
            }
            Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
        }
        Err(_) => bytes, // let the downstream answer its own 422
    };
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    let target = downstream_target(&parts.uri);
    let r = forward::forward(state, ds, Some(id), parts, full_body(bytes), &target, ForwardOpts { buffer_answer: false }).await?;
    Ok(r.into_response())
}

/// Fork / child: created by the downstream that owns the parent; register the new id there.
async fn spawn_on_same(state: &AppState, ds: &Arc<Downstream>, id: ConversationId, user: &UserId, req: Request<Body>) -> HttpResult {
    let (parts, body) = req.into_parts();
    let body = bounded_body(&parts, body, state.cfg.max_body_bytes)?;
    let target = downstream_target(&parts.uri);
    let r = forward::forward(state, ds, Some(id), parts, body, &target, ForwardOpts { buffer_answer: true }).await?;
    let Forwarded::Buffered { status, headers, body } = r else { return Ok(r.into_response()) };
    if status.is_success() {
        if let Ok(v) = serde_json::from_slice::<Value>(&body) {
            // Fork answers a ConversationInfo (`id`); children a `conversation_id`.
            let new_id = v
                .get("id")
                .or_else(|| v.get("conversation_id"))
                .and_then(Value::as_str)
                .and_then(|s| ConversationId::parse(s).ok());
            if let Some(new_id) = new_id {
                let info = if v.get("created_at").is_some() { v.clone() } else { json!({"id": new_id.to_string()}) };
                state.catalog.register(new_id, ds, user.clone(), info).await;
                if v.get("created_at").is_none() {
                    // Fill in the full info in the background.
                    let st = state.clone();
                    let ds2 = ds.clone();
                    tokio::spawn(async move {
                        let _ = st.catalog.fetch_live(&ds2, &[new_id], false, forward::INTERNAL_CALL_TIMEOUT).await;
                    });
                }
            }
        }
    }
    Ok(Forwarded::Buffered { status, headers, body }.into_response())
}

/// `DELETE /api/conversations/{id}`: delete downstream-side, then release the downstream.
async fn delete(state: &AppState, ds: &Arc<Downstream>, id: ConversationId, req: Request<Body>) -> HttpResult {
    let alone = ds.primary() == Some(id) && state.catalog.count_on(ds.id()) <= 1;
    let answer = if ds.state() != DownstreamState::Ready && alone {
        // Its own downstream is not running and hosts nothing else: removing the
        // downstream removes the conversation; no need to start it just to delete.
        None
    } else {
        let (parts, body) = req.into_parts();
        let body = bounded_body(&parts, body, state.cfg.max_body_bytes)?;
        let target = downstream_target(&parts.uri);
        match forward::forward(state, ds, Some(id), parts, body, &target, ForwardOpts { buffer_answer: true }).await? {
            Forwarded::Buffered { status, headers, body } => {
                if !status.is_success() && status != StatusCode::NOT_FOUND {
                    return Ok(Forwarded::Buffered { status, headers, body }.into_response());
                }
                Some((status, headers, body))
            }
            Forwarded::Response(r) => return Ok(r),
        }
    };
    state.catalog.remove(&id).await;
    state.auth.revoke_conversation(&id);
    let remaining = state.catalog.count_on(ds.id());
    if let Err(e) = state.provisioner.release(ds, id, remaining).await {
        tracing::warn!(conversation = %id, "deleted, but releasing its agent-server failed: {e}");
    }
    if remaining == 0 && ds.primary().is_some() {
        state.fleet.forget(ds.id());
    }
    match answer {
        Some((status, headers, body)) if status.is_success() => Ok(Forwarded::Buffered { status, headers, body }.into_response()),
        _ => Ok(json_response(StatusCode::OK, &json!({"success": true}))),
    }
}

/// `GET /api/file/download-trajectory/{id}`: forwarded by id.
pub async fn trajectory(State(state): State<AppState>, Path(raw): Path<String>, req: Request<Body>) -> HttpResult {
    let who = state.auth.check_client(req.headers())?;
    let id = path_id(&raw)?;
    locate(&state, &id).await;
    let ds = route(&state, &id, &who, "download-trajectory")?;
    forward_streaming(&state, &ds, Some(id), req).await
}

impl IntoResponse for Forwarded {
    fn into_response(self) -> Response {
        Forwarded::into_response(self)
    }
}

#[allow(dead_code)]
fn _assert_send(e: HttpError) -> impl Send {
    e
}

/// Present a cached info (for tests and the status CLI).
pub fn presented(state: &AppState, id: &ConversationId) -> Option<Value> {
    let e = state.catalog.get(id)?;
    Some(present(&e.item.info, &e.downstream))
}
