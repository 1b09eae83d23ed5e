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
use nestor_core::{ConversationId, DownstreamId, DownstreamState, Endpoint};
use nestor_ws_proxy::{upgrade, ClientAuth, PairSpec, SocketKind, Upstream, UpstreamError};
use nestor_conversation_service::QueryParams;

use std::sync::Mutex;

use crate::app::AppState;
use crate::auth::Principal;
use crate::routes::home;
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
    if !query_is_valid(kind, &query) {
        // FastAPI validates a socket's query before its handler runs: refused (403).
        return forbidden();
    }
    // Who is calling, once known (before the upgrade for query/header keys, after the first
    // frame otherwise).
    let who: Arc<Mutex<Option<Principal>>> = Arc::new(Mutex::new(None));
    // Client auth, in the agent-server's order: query key, header key, first frame.
    let presented = query
        .last("session_api_key")
        .map(|k| k.as_bytes().to_vec())
        .or_else(|| req.headers().get(nestor_core::SESSION_KEY_HEADER).map(|k| k.as_bytes().to_vec()));
    let auth = if state.auth.is_open() {
        *who.lock().unwrap() = state.auth.principal_for_key(b"");
        ClientAuth::Done
    } else if let Some(k) = presented {
        match state.auth.principal_for_key(&k) {
            Some(p) => *who.lock().unwrap() = Some(p),
            None => return forbidden(),
        }
        ClientAuth::Done
    } else {
        let auth = state.auth.clone();
        let slot = who.clone();
        ClientAuth::FirstFrame(Arc::new(move |k: &str| match auth.principal_for_key(k.as_bytes()) {
            Some(p) => {
                *slot.lock().unwrap() = Some(p);
                true
            }
            None => false,
        }))
    };
    // The host-global bash socket must name its conversation (docs/routing.md).
    let header_target = req.headers().get(home::CONVERSATION_HEADER).and_then(|v| v.to_str().ok()).and_then(|s| ConversationId::parse(s.trim()).ok());
    if kind == SocketKind::BashEvents {
        if let Some(p) = who.lock().unwrap().as_ref() {
            if header_target.is_none() && p.conversation().is_none() {
                return json_response(StatusCode::BAD_REQUEST, &serde_json::json!({"detail": home::HOW_TO_ADDRESS}));
            }
        }
    }
    let accepted = match upgrade::accept(&req, state.ws.permessage_deflate) {
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
    let (resp, deflate) = (accepted.response, accepted.deflate);
    // Tracked, and closed with 1012 on shutdown (crate::server).
    let tracker = state.sockets.clone();
    tracker.spawn(async move {
        let client = match upgrade::finish(on_upgrade, deflate, &cfg).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(conversation = %id, "upgrade failed: {e}");
                return;
            }
        };
        // Live from the upgrade to the end of the bridge, however it ends.
        let _pair = crate::observability::ws_pair(match kind {
            SocketKind::Events => "events",
            SocketKind::Session => "session",
            SocketKind::BashEvents => "bash_events",
        });
        let target = if kind == SocketKind::BashEvents { header_target } else { Some(id) };
        // Attached sockets keep a downstream from idle stop.
        let _attached = target.and_then(|t| state.catalog.route(&t)).map(|(ds, _)| ds.attach_socket());
        let upstream: Arc<dyn Upstream> = Arc::new(ConversationUpstream { state: state.clone(), target, who });
        let span = tracing::info_span!("socket", conversation = %id, kind = ?kind);
        let shutdown = Box::pin(state.shutdown.clone().cancelled_owned());
        nestor_ws_proxy::bridge_until(client, spec, upstream, cfg, shutdown).instrument(span).await;
    });
    resp.map(|()| Body::empty())
}

/// The agent-server's socket query types (pydantic, lax mode): events `resend_mode`
/// (`all`|`since`), `after_timestamp` (a datetime), `resend_all` (a bool); session
/// `after_seq` (an int); bash-events `resend_mode` (`all`), `resend_all`.
fn query_is_valid(kind: SocketKind, q: &QueryParams) -> bool {
    fn is_bool(v: &str) -> bool {
        matches!(v.to_ascii_lowercase().as_str(), "0" | "off" | "f" | "false" | "n" | "no" | "1" | "on" | "t" | "true" | "y" | "yes")
    }
    fn is_int(v: &str) -> bool {
        let v = v.trim();
        let digits = v.strip_prefix(['+', '-']).unwrap_or(v);
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
    }
    fn is_datetime(v: &str) -> bool {
        static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
        let re = RE.get_or_init(|| {
            regex::Regex::new(r"^(\d{4}-\d{2}-\d{2}([Tt _]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}(:?\d{2})?)?)?|[+-]?\d+(\.\d+)?)$")
                .expect("valid regex")
        });
        re.is_match(v.trim())
    }
    let ok = |name: &str, f: &dyn Fn(&str) -> bool| q.last(name).is_none_or(f);
    match kind {
        SocketKind::Events => {
            ok("resend_mode", &|v| v == "all" || v == "since") && ok("after_timestamp", &is_datetime) && ok("resend_all", &is_bool)
        }
        SocketKind::Session => ok("after_seq", &is_int),
        SocketKind::BashEvents => ok("resend_mode", &|v| v == "all") && ok("resend_all", &is_bool),
    }
}

/// A conversation's downstream as the WebSocket proxy sees it. Resolved when the proxy
/// dials (after client auth), so the caller's right to the conversation is checked with
/// the principal the first frame may only now have revealed.
struct ConversationUpstream {
    state: AppState,
    /// The conversation (for bash-events: the one the header named, if any).
    target: Option<ConversationId>,
    who: Arc<Mutex<Option<Principal>>>,
}

#[async_trait]
impl Upstream for ConversationUpstream {
    async fn endpoint(&self, timeout: Duration) -> Result<Arc<Endpoint>, UpstreamError> {
        let Some(who) = self.who.lock().unwrap().clone() else { return Err(UpstreamError::NotFound) };
        // bash-events with first-frame auth: a conversation key names its conversation.
        let Some(id) = self.target.or(who.conversation()) else { return Err(UpstreamError::NotFound) };
        crate::routes::conversations::locate(&self.state, &id).await;
        let ds = crate::routes::conversations::route(&self.state, &id, &who, "").map_err(|_| UpstreamError::NotFound)?;
        if ds.state() == DownstreamState::Ready {
            if let Some(ep) = ds.endpoint() {
                return Ok(ep);
            }
        }
        // One socket at a time waits for this downstream (see `ready_gate`); the others find
        // it ready when their turn comes.
        let deadline = tokio::time::Instant::now() + timeout;
        let gate = ready_gate(ds.id());
        let Ok(_turn) = tokio::time::timeout_at(deadline, gate.lock()).await else {
            return Err(UpstreamError::Unavailable("the conversation's agent-server is not ready yet".into()));
        };
        if ds.state() == DownstreamState::Ready {
            if let Some(ep) = ds.endpoint() {
                return Ok(ep);
            }
        }
        if matches!(ds.state(), DownstreamState::Stopped | DownstreamState::Failed(_)) && ds.primary().is_some() {
            // Starting it again counts against the admission limits, as for a request.
            crate::lifecycle::admit(&self.state, ds.owner()).map_err(|e| UpstreamError::Unavailable(e.to_string()))?;
        }
        let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
        match self.state.provisioner.ensure_ready(&ds, timeout).await {
            Ok(()) => ds.endpoint().ok_or_else(|| UpstreamError::Unavailable("no endpoint".into())),
            Err(nestor_provisioner::ProvisionError::NotReady(nestor_core::downstream::NotReady::Released)) => {
                Err(UpstreamError::NotFound)
            }
            Err(e) => Err(UpstreamError::Unavailable(e.to_string())),
        }
    }

    fn on_lost(&self) {
        crate::observability::ws_downstream_lost();
    }

    fn on_resumed(&self, after: Duration) {
        crate::observability::ws_resumed(after);
    }

    fn on_slow_consumer(&self) {
        crate::observability::ws_slow_consumer();
    }

    fn on_state_update(&self, event: &serde_json::Value) {
        // The catalog learns a status change (e.g. `finished`) before the client does, so a
        // search right after the client saw it agrees; webhooks come later (flush delay).
        // Only changes: a value the catalog already has (a replay, another client's socket
        // on the same conversation) writes nothing and leaves `updated_at` alone.
        let Some(id) = self.target else { return };
        let (Some(key), Some(value)) = (event.get("key").and_then(serde_json::Value::as_str), event.get("value")) else { return };
        if key == "full_state" {
            return; // the snapshot every subscription starts with: nothing new
        }
        let Some(entry) = self.state.catalog.get(&id) else { return };
        if entry.item.info.get(key) == Some(value) {
            return;
        }
        self.state.catalog.apply_events(&id, entry.downstream.id(), std::slice::from_ref(event));
    }
}

/// The socket proxy's readiness gate for one downstream. When a downstream restarts, every
/// socket on it loses its connection and redials at once; each one waiting for readiness on
/// its own (`ensure_ready` probes `/alive` every 250 ms) floods the starting server with
/// probes, and a probe that times out under that load marks the server unhealthy again
/// for everyone. Measured with 1,000 proxied sockets on one (fake) downstream: resumes took
/// 18 s (median) after a restart; with the gate, about a second. Entries are weak: the map
/// only holds gates someone is waiting on.
fn ready_gate(id: &DownstreamId) -> Arc<tokio::sync::Mutex<()>> {
    type Gates = std::collections::HashMap<DownstreamId, std::sync::Weak<tokio::sync::Mutex<()>>>;
    static GATES: std::sync::OnceLock<Mutex<Gates>> = std::sync::OnceLock::new();
    let mut gates = GATES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(g) = gates.get(id).and_then(std::sync::Weak::upgrade) {
        return g;
    }
    if gates.len() >= 256 {
        gates.retain(|_, w| w.strong_count() > 0);
    }
    let g = Arc::new(tokio::sync::Mutex::new(()));
    gates.insert(id.clone(), Arc::downgrade(&g));
    g
}
