//! VS Code through nestor's one origin.
//!
//! An agent-server answers `GET /api/vscode/url` with its own VS Code address and its
//! session key as the connection token (`http://localhost:8001/?tkn=<key>&folder=…`): a
//! browser would need a downstream port, and would learn a downstream key. nestor instead
//! answers `<nestor>/nestor/vscode/<conversation>/?tkn=<token>&folder=…`, where the token is
//! a nestor credential for that conversation's VS Code only, and proxies everything under
//! that prefix — HTTP and WebSocket — to the downstream's VS Code, adding the real token
//! on the way. The browser keeps the nestor token in a cookie scoped to the prefix, so the
//! page's later requests (assets, sockets) authenticate too.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use nestor_conversation_service::QueryParams;
use nestor_core::{ApiError, ConversationId, Downstream, Endpoint};
use serde_json::Value;

use crate::app::AppState;
use crate::auth::Scope;
use crate::errors::HttpResult;
use crate::forward::{self, public_origin};

/// Cookie carrying the nestor VS Code token for one conversation.
fn cookie_name(id: &ConversationId) -> String {
    format!("nestor_vscode_{}", id.hex())
}

/// Where a conversation's VS Code answers, learned from its downstream's `/vscode/url`.
#[derive(Debug, Clone)]
pub struct VscodeTarget {
    port: u16,
    /// Path prefix VS Code serves under (its `server_base_path`), no trailing slash.
    base_path: String,
    /// The downstream's connection token.
    token: String,
}

/// Parse a downstream's VS Code URL.
fn parse_target(url: &str) -> Option<(VscodeTarget, Option<String>)> {
    let uri: http::Uri = url.parse().ok()?;
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
    let q = QueryParams::parse(uri.query());
    let token = q.last("tkn")?.to_owned();
    let folder = q.last("folder").map(str::to_owned);
    Some((VscodeTarget { port, base_path: uri.path().trim_end_matches('/').to_owned(), token }, folder))
}

/// Rewrite a downstream's `{"url": …}` answer into nestor's (minting the token).
pub async fn rewrite_url_answer(state: &AppState, id: ConversationId, user: &nestor_core::UserId, headers: &http::HeaderMap, body: &[u8]) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let url = v.get("url")?.as_str()?.to_owned();
    let (target, folder) = parse_target(&url)?;
    state.vscode.insert(id, target);
    let token = state.auth.mint_vscode_token(id, user.clone());
    let origin = public_origin(headers).unwrap_or_else(|| state.internal_url.clone());
    let mut out = format!("{origin}/nestor/vscode/{id}/?tkn={}", token.expose());
    if let Some(f) = folder {
        out.push_str("&folder=");
        out.extend(form_urlencoded::byte_serialize(f.as_bytes()));
    }
    v["url"] = Value::String(out);
    serde_json::to_vec(&v).ok()
}

/// Learn the target by asking the downstream (after a nestor restart, or before any
/// `/vscode/url` call went through nestor).
async fn learn_target(state: &AppState, id: ConversationId, ds: &Arc<Downstream>) -> Result<VscodeTarget, ApiError> {
    let ep = forward::ensure_ready(state, ds, Some(id)).await?;
    let v: Value = state
        .client
        .get_json(&ep, &format!("/api/conversations/{id}/vscode/url"), forward::INTERNAL_CALL_TIMEOUT)
        .await
        .map_err(|e| ApiError::BadGateway(format!("conversation {id}'s VS Code is not available: {e}")))?;
    let url = v.get("url").and_then(Value::as_str).ok_or_else(|| ApiError::Unavailable {
        detail: format!("conversation {id}'s VS Code is not running"),
        retry_after: Some(std::time::Duration::from_secs(5)),
    })?;
    let (t, _) = parse_target(url).ok_or_else(|| ApiError::BadGateway("the agent-server's VS Code URL is not understood".into()))?;
    state.vscode.insert(id, t.clone());
    Ok(t)
}

/// `/nestor/vscode/{conversation}/{*rest}`: HTTP and WebSocket.
pub async fn proxy(State(state): State<AppState>, Path(params): Path<Vec<(String, String)>>, req: Request<Body>) -> HttpResult {
    let raw = params.iter().find(|(k, _)| k == "conversation").map(|(_, v)| v.as_str()).unwrap_or("");
    let rest = params.iter().find(|(k, _)| k == "rest").map(|(_, v)| v.as_str()).unwrap_or("");
    let id = ConversationId::parse(raw).map_err(|_| ApiError::not_found())?;
    let query = QueryParams::parse(req.uri().query());
    // The nestor token: in the query (first load) or the cookie (everything after).
    let cookie = crate::routes::conversations::cookie_value(req.headers(), &cookie_name(&id));
    let presented = query.last("tkn").map(str::to_owned).or(cookie);
    let who = presented
        .as_deref()
        .and_then(|k| state.auth.principal_for_key(k.as_bytes()))
        .or_else(|| state.auth.check_client(req.headers()).ok())
        .ok_or(ApiError::Unauthorized)?;
    let allowed = match &who.scope {
        Scope::Vscode(c) => *c == id,
        _ => state.catalog.route(&id).is_some_and(|(_, owner)| who.may_access(&id, &owner)),
    };
    let Some((ds, _)) = state.catalog.route(&id).filter(|_| allowed) else {
        return Err(ApiError::not_found().into());
    };
    let target = match state.vscode.get(&id).map(|t| t.clone()) {
        Some(t) => t,
        None => learn_target(&state, id, &ds).await?,
    };
    let ep = forward::ensure_ready(&state, &ds, Some(id)).await?;
    let vs = Endpoint::new(ep.scheme.clone(), format!("{}:{}", ep.authority.host(), target.port).parse().map_err(|_| ApiError::Internal("bad VS Code authority".into()))?, String::new(), None);
    // Path and query for VS Code: its base path + the rest; the nestor token becomes its own.
    let mut pq = format!("{}/{}", target.base_path, rest);
    let mut pairs: Vec<(String, String)> = query.pairs().iter().filter(|(k, _)| k != "tkn").cloned().collect();
    if query.last("tkn").is_some() {
        pairs.push(("tkn".into(), target.token.clone()));
    }
    if !pairs.is_empty() {
        pq.push('?');
        pq.push_str(&form_urlencoded::Serializer::new(String::new()).extend_pairs(&pairs).finish());
    }
    let set_cookie = query.last("tkn").map(|t| {
        HeaderValue::from_str(&format!("{}={t}; Path=/nestor/vscode/{id}/; HttpOnly; SameSite=Lax", cookie_name(&id))).ok()
    });
    let (mut parts, body) = req.into_parts();
    // VS Code's own cookie carries its token: always the real one, never the browser's.
    let others: Vec<String> = parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.starts_with("vscode-tkn=") && !c.starts_with(&format!("{}=", cookie_name(&id))))
        .map(str::to_owned)
        .collect();
    parts.headers.remove(header::COOKIE);
    let mut cookie_line = format!("vscode-tkn={}", target.token);
    for c in others {
        cookie_line.push_str("; ");
        cookie_line.push_str(&c);
    }
    parts.headers.insert(header::COOKIE, HeaderValue::from_str(&cookie_line).map_err(|_| ApiError::BadRequest("bad cookie".into()))?);
    parts.headers.remove(nestor_core::SESSION_KEY_HEADER);
    let mut resp = if nestor_ws_proxy::upgrade::is_upgrade(&Request::from_parts(parts.clone(), ())) {
        forward::forward_upgrade(&state, &vs, parts, body, &pq).await?
    } else {
        let body = forward::bounded_body(&parts, body, state.cfg.max_body_bytes)?;
        let vs_ds = Downstream::new(ds.id().clone(), ds.kind(), None, None, Some(vs.clone()), nestor_core::DownstreamState::Ready);
        forward::forward(&state, &vs_ds, Some(id), parts, body, &pq, forward::ForwardOpts { buffer_answer: false }).await?.into_response()
    };
    // Never hand the browser VS Code's real token cookie.
    let kept: Vec<HeaderValue> = resp
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| !v.to_str().unwrap_or("").contains(&target.token) && !v.to_str().unwrap_or("").starts_with("vscode-tkn="))
        .cloned()
        .collect();
    resp.headers_mut().remove(header::SET_COOKIE);
    for v in kept {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    if let Some(Some(c)) = set_cookie {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    Ok(resp)
}

/// Intercept a downstream `/vscode/url` answer on its way to the client.
pub async fn rewrite_response(state: &AppState, id: ConversationId, user: &nestor_core::UserId, req_headers: &http::HeaderMap, resp: Response) -> Response {
    if resp.status() != StatusCode::OK {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = http_body_util::Limited::new(body, 1 << 20).collect().await.map(|c| c.to_bytes()) else {
        return ApiError::BadGateway("the agent-server's VS Code answer could not be read".into()).to_http();
    };
    match rewrite_url_answer(state, id, user, req_headers, &bytes).await {
        Some(new) => {
            parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(new.len()));
            Response::from_parts(parts, Body::from(new))
        }
        None => Response::from_parts(parts, Body::from(bytes)),
    }
}
