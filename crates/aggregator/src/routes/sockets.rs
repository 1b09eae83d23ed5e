//! The conversation WebSockets: `/sockets/events/{id}` (and its alias
//! `/sockets/conversation/{id}/events`) and `/sockets/session/{id}`.
//!
//! Auth exactly like the agent-server, before anything else: a key in the query or the
//! `X-Session-API-Key` header is checked before the upgrade (bad: HTTP 403); without one the
//! socket is accepted and the first frame must authenticate (the proxy closes 4001 if not).
//! A malformed id is refused before the upgrade (403, as FastAPI does); an unknown
//! conversation is closed with 4004 after auth. Then `nestor_ws_proxy::bridge` runs the pair.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::Instrument;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{Request, StatusCode};
use nestor_core::{ConversationId, Downstream, DownstreamState, Endpoint};
use nestor_ws_proxy::{upgrade, ClientAuth, PairSpec, SocketKind, Upstream, UpstreamError};
use nestor_conversation_service::QueryParams;

use crate::app::AppState;
use crate::routes::conversations::json_response;

fn forbidden() -> Response {
    // What uvicorn answers when a socket is closed before it was accepted.
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::FORBIDDEN;
    r
}

/// `/sockets/events/{id}` and `/sockets/conversation/{id}/events`.
pub async fn events(State(state): State<AppState>, Path(raw): Path<String>, req: Request<Body>) -> Response {
    socket(state, raw, SocketKind::Events, req).await
}

/// `/sockets/session/{id}`.
pub async fn session(State(state): State<AppState>, Path(raw): Path<String>, req: Request<Body>) -> Response {
    socket(state, raw, SocketKind::Session, req).await
}

/// `/sockets/bash-events`: host-global, proxied to the home downstream (no resume).
pub async fn bash_events(State(state): State<AppState>, req: Request<Body>) -> Response {
    socket(state, uuid::Uuid::nil().to_string(), SocketKind::BashEvents, req).await
}

async fn socket(state: AppState, raw: String, kind: SocketKind, mut req: Request<Body>) -> Response {
    if !upgrade::is_upgrade(&req) {
        return json_response(StatusCode::NOT_FOUND, &serde_json::json!({"detail": "Not Found"}));
    }
    let Ok(id) = ConversationId::parse(&raw) else { return forbidden() };
    let query = QueryParams::parse(req.uri().query());
    // Client auth, in the agent-server's order: query key, header key, first frame.
    let auth = if state.auth.is_open() {
        ClientAuth::Done
    } else if let Some(k) = query.last("session_api_key") {
        if state.auth.user_for_key(k.as_bytes()).is_none() {
            return forbidden();
        }
        ClientAuth::Done
    } else if let Some(k) = req.headers().get(nestor_core::SESSION_KEY_HEADER) {
        if state.auth.user_for_key(k.as_bytes()).is_none() {
            return forbidden();
        }
        ClientAuth::Done
    } else {
        let auth = state.auth.clone();
        ClientAuth::FirstFrame(Arc::new(move |k: &str| auth.user_for_key(k.as_bytes()).is_some()))
    };
    let resp = match upgrade::accept(&req) {
        Ok(r) => r,
        Err(e) => return (e.status(), e.to_string()).into_response(),
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "connection cannot be upgraded").into_response();
    };
    let spec = PairSpec {
        kind,
        conversation: id,
        query: query.pairs().iter().filter(|(k, _)| k != "session_api_key").cloned().collect(),
        auth,
    };
    let cfg = state.ws.clone();
    tokio::spawn(async move {
        let client = match upgrade::finish(on_upgrade, cfg.client_ws_config()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(conversation = %id, "upgrade failed: {e}");
                return;
            }
        };
        let upstream: Arc<dyn Upstream> = if kind == SocketKind::BashEvents {
            Arc::new(HomeUpstream { state: state.clone() })
        } else {
            let route = state.catalog.route(&id);
            Arc::new(ConversationUpstream { state: state.clone(), id, ds: route.map(|(ds, _)| ds) })
        };
        // Attached sockets keep a downstream from idle stop.
        let _attached = state.catalog.route(&id).map(|(ds, _)| ds.attach_socket());
        let span = tracing::info_span!("socket", conversation = %id, kind = ?kind);
        nestor_ws_proxy::bridge(client, spec, upstream, cfg).instrument(span).await;
    });
    resp.map(|()| Body::empty())
}

/// A conversation's downstream as the WebSocket proxy sees it.
struct ConversationUpstream {
    state: AppState,
    id: ConversationId,
    ds: Option<Arc<Downstream>>,
}

#[async_trait]
impl Upstream for ConversationUpstream {
    async fn endpoint(&self, timeout: Duration) -> Result<Arc<Endpoint>, UpstreamError> {
        let Some(ds) = &self.ds else { return Err(UpstreamError::NotFound) };
        if self.state.catalog.route(&self.id).is_none() {
            return Err(UpstreamError::NotFound);
        }
        if ds.state() == DownstreamState::Ready {
            if let Some(ep) = ds.endpoint() {
                return Ok(ep);
            }
        }
        match self.state.provisioner.ensure_ready(ds, timeout).await {
            Ok(()) => ds.endpoint().ok_or_else(|| UpstreamError::Unavailable("no endpoint".into())),
            Err(nestor_provisioner::ProvisionError::NotReady(nestor_core::downstream::NotReady::Released)) => {
                Err(UpstreamError::NotFound)
            }
            Err(e) => Err(UpstreamError::Unavailable(e.to_string())),
        }
    }

    fn on_lost(&self) {
        if let Some(ds) = &self.ds {
            // The socket dropping is a strong hint the downstream went away: a provisioner
            // whose health state still says "ready" will find out on the next probe.
            tracing::debug!(downstream = %ds.id(), "socket to downstream lost");
        }
    }
}

/// The home downstream, for host-global sockets.
struct HomeUpstream {
    state: AppState,
}

#[async_trait]
impl Upstream for HomeUpstream {
    async fn endpoint(&self, _timeout: Duration) -> Result<Arc<Endpoint>, UpstreamError> {
        let ds = self.state.provisioner.home().await.map_err(|e| UpstreamError::Unavailable(e.to_string()))?;
        ds.endpoint().ok_or_else(|| UpstreamError::Unavailable("no endpoint".into()))
    }
}
