//! Routes with no conversation in their path.
//!
//! * **Host-global workspace routes** (`/api/bash/*`, `/api/file/*` except the workspace
//!   picker, `/api/git/*` except provider search, `/api/vscode/*`): on an agent-server they
//!   act on "the" host; behind nestor every conversation has its own host, so the request
//!   must say which. The rule, in order (docs/routing.md):
//!   1. the `X-OpenHands-ServerConversation-ID` header names the conversation;
//!   2. the caller authenticated with a conversation key
//!      (`POST /api/conversations/{id}/runtime/credentials`);
//!   3. a path the request carries (`path`, `cwd`, `workspace_dir`, `project_dir`, in the
//!      query or a small JSON body) lies inside exactly one of the caller's conversations'
//!      working directories;
//!   4. otherwise `400` with a detail that says how to address a conversation — never a
//!      guess.
//! * **project_dir routes** (`POST /api/skills`, `/api/plugins`, `/api/hooks`,
//!   `/api/sub-agents`): to the addressed conversation when rules 1-3 find one, else the home.
//! * `/v1/*` (the OpenAI-compatible gateway) is routed by the same header; without it the
//!   downstream creates a conversation: on the home downstream, registered at once.
//! * Everything else under `/api/` (settings, secrets, profiles, skills, …), `/app-backends/*`
//!   and the docs pages go to one stable **home** downstream.
//! * Process-local operations of a downstream (`/api/init`) are not for clients: 404.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use nestor_conversation_service::QueryParams;
use nestor_core::{ApiError, ConversationId, Downstream};
use serde_json::Value;

use crate::app::AppState;
use crate::auth::Principal;
use crate::errors::{provision_error, HttpResult};
use crate::routes::conversations::{forward_streaming, route, unknown_conversation};

/// The header naming a conversation on host-global and `/v1` routes.
pub const CONVERSATION_HEADER: &str = "x-openhands-serverconversation-id";

/// What a request without a conversation in its path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// Acts on a conversation's host: must be addressed.
    Workspace,
    /// May read a conversation's project dir: addressed if it can be, else home.
    ProjectDir,
    /// Server-wide (settings, catalogs, …): home.
    Local,
}

/// Classify a path without a conversation id.
pub fn classify(method: &Method, path: &str) -> Global {
    let picker = matches!(path, "/api/file/home" | "/api/file/search_subdirs");
    if path.starts_with("/api/bash/")
        || (path.starts_with("/api/file/") && !picker)
        || (path.starts_with("/api/git/") && !path.starts_with("/api/git/repositories"))
        || path.starts_with("/api/vscode/")
    {
        return Global::Workspace;
    }
    if method == Method::POST && matches!(path, "/api/skills" | "/api/plugins" | "/api/hooks" | "/api/sub-agents") {
        return Global::ProjectDir;
    }
    Global::Local
}

/// How to address a conversation, for the 400 and for close reasons.
pub const HOW_TO_ADDRESS: &str = "this server runs each conversation on its own agent-server, so host-wide workspace routes must name a conversation: send the header X-OpenHands-ServerConversation-ID: <conversation id>, or use the conversation-scoped route /api/conversations/<conversation id>/... (SDK: RemoteWorkspace(runtime_conversation_id=...)), or authenticate with a conversation key from POST /api/conversations/<conversation id>/runtime/credentials";

/// Which conversation a host-global request addresses (rules 1-3), if any. `Err` only when
/// the request names a conversation the caller cannot see.
pub fn addressed(
    state: &AppState,
    who: &Principal,
    headers: &http::HeaderMap,
    query: &QueryParams,
    body: Option<&Value>,
) -> Result<Option<(ConversationId, Arc<Downstream>)>, ApiError> {
    if let Some(raw) = headers.get(CONVERSATION_HEADER).and_then(|v| v.to_str().ok()) {
        let id = ConversationId::parse(raw.trim()).map_err(|_| {
            ApiError::BadRequest(format!("{CONVERSATION_HEADER} is not a conversation id: {raw:?}"))
        })?;
        let ds = route(state, &id, who, "")?;
        return Ok(Some((id, ds)));
    }
    if let Some(id) = who.conversation() {
        let ds = route(state, &id, who, "")?;
        return Ok(Some((id, ds)));
    }
    // A path inside exactly one conversation's working directory.
    let mut paths: Vec<String> = ["path", "cwd", "workspace_dir", "project_dir"]
        .iter()
        .filter_map(|k| query.last(k).map(str::to_owned))
        .collect();
    if let Some(Value::Object(o)) = body {
        for k in ["cwd", "project_dir", "path"] {
            if let Some(Value::String(s)) = o.get(k) {
                paths.push(s.clone());
            }
        }
    }
    // Compared after resolving `.` and `..`: `<working dir>/../x` is outside it, whatever
    // its text starts with.
    let paths: Vec<String> = paths.iter().filter_map(|p| normalize_path(p)).collect();
    if paths.is_empty() {
        return Ok(None);
    }
    let mut best: Option<(usize, ConversationId)> = None;
    let mut ambiguous = false;
    for id in state.catalog.visible_ids(state.auth.listing_scope(&who.user).as_ref()) {
        let Some(wd) = state.catalog.working_dir(&id).as_deref().and_then(normalize_path) else { continue };
        if wd == "/" {
            continue;
        }
        let wd = wd.as_str();
        let inside = paths.iter().any(|p| p == wd || p.starts_with(&format!("{wd}/")));
        if !inside {
            continue;
        }
        match best {
            Some((len, _)) if len > wd.len() => {}
            Some((len, _)) if len == wd.len() => ambiguous = true,
            _ => {
                best = Some((wd.len(), id));
                ambiguous = false;
            }
        }
    }
    match best {
        Some((_, id)) if !ambiguous => {
            let ds = route(state, &id, who, "")?;
            Ok(Some((id, ds)))
        }
        _ => Ok(None),
    }
}

/// An absolute path with `.`, `..` and repeated or trailing `/` resolved lexically (as the
/// downstream's `Path(...).resolve()` would, symlinks aside); `None` if not absolute.
/// Public for the fuzz tests (`tests/fuzz.rs`).
pub fn normalize_path(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// Fallback for everything not routed elsewhere.
pub async fn fallback(State(state): State<AppState>, req: Request<Body>) -> HttpResult {
    let path = req.uri().path().to_owned();
    if path == "/api/init" {
        // Process-local (a dormant agent-server's deferred init): answered like an
        // agent-server that is not in deferred-init mode and whose init key the client
        // does not have.
        return Err(match *req.method() {
            Method::GET => ApiError::NotFound(
                "server is not running with deferred_init=True; the /api/init endpoint is not available".into(),
            ),
            Method::POST => ApiError::Unauthorized,
            // An empty 405: routes::compat gives it FastAPI's body and `allow`.
            _ => return Ok(Response::builder().status(http::StatusCode::METHOD_NOT_ALLOWED).body(Body::empty()).unwrap_or_default()),
        }
        .into());
    }
    if path.starts_with("/v1/") {
        return openai_gateway(state, req).await;
    }
    let public = matches!(path.as_str(), "/docs" | "/redoc" | "/docs/oauth2-redirect");
    if !(path.starts_with("/api/") || path.starts_with("/app-backends/") || public) {
        return Err(ApiError::not_found().into());
    }
    if public {
        let ds = state.provisioner.home().await.map_err(|e| provision_error(e, "the home agent-server"))?;
        return forward_streaming(&state, &ds, None, req).await;
    }
    let who = state.auth.check_client(req.headers())?;
    if path.starts_with("/app-backends/") && nestor_ws_proxy::upgrade::is_upgrade(&req) {
        // The canvas app-backend socket proxy of the home agent-server: spliced, so its own
        // answer to the upgrade (e.g. 403) reaches the client.
        let ds = state.provisioner.home().await.map_err(|e| provision_error(e, "the home agent-server"))?;
        let ep = crate::forward::ensure_ready(&state, &ds, None).await?;
        let (parts, body) = req.into_parts();
        let target = match parts.uri.query().and_then(crate::forward::strip_key_from_query) {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        return Ok(crate::forward::forward_upgrade(&state, &ep, parts, body, &target).await?);
    }
    let kind = classify(req.method(), &path);
    if kind == Global::Local && who.conversation().is_some() {
        // A conversation key opens its conversation, not the server's settings.
        return Err(ApiError::Unauthorized.into());
    }
    if kind == Global::Local {
        let ds = state.provisioner.home().await.map_err(|e| provision_error(e, "the home agent-server"))?;
        return forward_streaming(&state, &ds, None, req).await;
    }
    // Workspace or project_dir: find the conversation it addresses.
    let (req, body) = peek_json_body(req).await?;
    let query = QueryParams::parse(req.uri().query());
    match addressed(&state, &who, req.headers(), &query, body.as_ref())? {
        Some((id, ds)) if path == "/api/vscode/url" => {
            let headers = req.headers().clone();
            let resp = forward_streaming(&state, &ds, Some(id), req).await?;
            Ok(crate::routes::vscode::rewrite_response(&state, id, &who.user, &headers, resp).await)
        }
        Some((id, ds)) => forward_streaming(&state, &ds, Some(id), req).await,
        None if kind == Global::ProjectDir => {
            let ds = state.provisioner.home().await.map_err(|e| provision_error(e, "the home agent-server"))?;
            forward_streaming(&state, &ds, None, req).await
        }
        None => Err(ApiError::BadRequest(HOW_TO_ADDRESS.into()).into()),
    }
}

/// Read a small JSON body (to look for `cwd`/`project_dir`) and put it back; anything else
/// (multipart uploads, large bodies) streams untouched.
async fn peek_json_body(req: Request<Body>) -> Result<(Request<Body>, Option<Value>), ApiError> {
    const PEEK_LIMIT: u64 = 64 * 1024;
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let small = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n <= PEEK_LIMIT);
    if !(is_json && small) {
        return Ok((req, None));
    }
    let (parts, body) = req.into_parts();
    let bytes: Bytes = http_body_util::Limited::new(body, PEEK_LIMIT as usize)
        .collect()
        .await
        .map_err(|e| ApiError::BadRequest(format!("could not read the request body: {e}")))?
        .to_bytes();
    let v = serde_json::from_slice(&bytes).ok();
    Ok((Request::from_parts(parts, Body::from(bytes)), v))
}

/// `/v1/*`: the session key may also come as `Authorization: Bearer <key>`.
async fn openai_gateway(state: AppState, req: Request<Body>) -> HttpResult {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|k| state.auth.principal_for_key(k.trim().as_bytes()));
    let who = match bearer {
        Some(p) => p,
        None => state.auth.check_client(req.headers())?,
    };
    let header_id = req.headers().get(CONVERSATION_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Some(raw) = header_id {
        let id = ConversationId::parse(&raw).map_err(|_| ApiError::not_found())?;
        let ds = route(&state, &id, &who, "").map_err(|_| unknown_conversation(&id, ""))?;
        return forward_streaming(&state, &ds, Some(id), req).await;
    }
    if who.conversation().is_some() {
        return Err(ApiError::Unauthorized.into());
    }
    let ds = state.provisioner.home().await.map_err(|e| provision_error(e, "the home agent-server"))?;
    let resp: Response = forward_streaming(&state, &ds, None, req).await?;
    // A conversation the downstream just created: make it routable now.
    if let Some(id) = resp
        .headers()
        .get(CONVERSATION_HEADER)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .and_then(|s| ConversationId::parse(s).ok())
    {
        if state.catalog.route(&id).is_none() {
            state.catalog.register(id, &ds, who.user.clone(), serde_json::json!({"id": id.to_string()})).await;
            let st = state.clone();
            tokio::spawn(async move {
                let _ = st.catalog.fetch_live(&ds, &[id], false, crate::forward::INTERNAL_CALL_TIMEOUT).await;
            });
        }
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_resolved_before_matching_working_dirs() {
        assert_eq!(normalize_path("/w/a/./b//c/").as_deref(), Some("/w/a/b/c"));
        assert_eq!(normalize_path("/w/a/../../../etc/passwd").as_deref(), Some("/etc/passwd"));
        assert_eq!(normalize_path("/w/a/..").as_deref(), Some("/w"));
        assert_eq!(normalize_path("/").as_deref(), Some("/"));
        assert_eq!(normalize_path("w/a"), None);
    }

    #[test]
    fn classes() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(classify(&post, "/api/bash/execute_bash_command"), Global::Workspace);
        assert_eq!(classify(&get, "/api/file/download"), Global::Workspace);
        assert_eq!(classify(&get, "/api/file/home"), Global::Local);
        assert_eq!(classify(&get, "/api/git/changes"), Global::Workspace);
        assert_eq!(classify(&get, "/api/git/repositories/search"), Global::Local);
        assert_eq!(classify(&get, "/api/vscode/url"), Global::Workspace);
        assert_eq!(classify(&post, "/api/skills"), Global::ProjectDir);
        assert_eq!(classify(&get, "/api/skills/catalog"), Global::Local);
        assert_eq!(classify(&get, "/api/settings"), Global::Local);
    }
}
