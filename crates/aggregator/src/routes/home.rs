//! Routes with no conversation in their path.
//!
//! * `/v1/*` (the OpenAI-compatible gateway) is routed by the
//!   `X-OpenHands-ServerConversation-ID` header to that conversation's downstream. Without it
//!   the downstream creates a conversation: that happens on the home downstream, and nestor
//!   registers the new id from the answer's header so it is routable at once.
//! * Everything else under `/api/` (settings, secrets, profiles, skills, host-wide
//!   bash/file/git, …), `/app-backends/*` and the docs pages go to one **home** downstream
//!   until nestor implements them itself. The home is stable — the first healthy server of an
//!   `existing` fleet, or a dedicated agent-server process for the `process` provisioner — so
//!   what a client writes there (settings, secrets) is what it reads back.
//! * Process-local operations of a downstream (`/api/init`) are not for clients: 404, as on
//!   an agent-server that is not in deferred-init mode.

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use http::{HeaderValue, Request};
use nestor_core::{ApiError, ConversationId};

use crate::app::AppState;
use crate::errors::{provision_error, HttpResult};
use crate::routes::conversations::{forward_streaming, unknown_conversation};

const CONVERSATION_HEADER: &str = "x-openhands-serverconversation-id";

/// Fallback for everything not routed elsewhere.
pub async fn fallback(State(state): State<AppState>, req: Request<Body>) -> HttpResult {
    let path = req.uri().path();
    if path == "/api/init" {
        return Err(ApiError::not_found().into());
    }
    if path.starts_with("/v1/") {
        return openai_gateway(state, req).await;
    }
    let public = matches!(path, "/docs" | "/redoc" | "/docs/oauth2-redirect");
    if !(path.starts_with("/api/") || path.starts_with("/app-backends/") || public) {
        return Err(ApiError::not_found().into());
    }
    if !public {
        state.auth.check_headers(req.headers())?;
    }
    let ds = state.provisioner.home().await.map_err(|e| provision_error(e, "the home agent-server"))?;
    forward_streaming(&state, &ds, None, req).await
}

/// `/v1/*`: the session key may also come as `Authorization: Bearer <key>`.
async fn openai_gateway(state: AppState, req: Request<Body>) -> HttpResult {
    let bearer_ok = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| state.auth.user_for_key(k.trim().as_bytes()).is_some());
    let user = if bearer_ok { nestor_core::UserId::default_user() } else { state.auth.check_headers(req.headers())? };
    let header_id = req.headers().get(CONVERSATION_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Some(raw) = header_id {
        let id = ConversationId::parse(&raw).map_err(|_| ApiError::not_found())?;
        let ds = match state.catalog.route(&id) {
            Some((ds, _)) => ds,
            None => return Err(unknown_conversation(&id, "").into()),
        };
        return forward_streaming(&state, &ds, Some(id), req).await;
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
            state.catalog.register(id, &ds, user, serde_json::json!({"id": id.to_string()})).await;
            let st = state.clone();
            tokio::spawn(async move {
                let _ = st.catalog.fetch_live(&ds, &[id], false, crate::forward::INTERNAL_CALL_TIMEOUT).await;
            });
        }
    }
    Ok(resp)
}
