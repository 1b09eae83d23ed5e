//! `/sockets/events/{id}` and `/sockets/session/{id}`, per api.md §2.3, §4.1, §4.2.
//!
//! Handshake, in the real server's order:
//! 1. query/path validation (bad UUID, bad `resend_mode`, `after_timestamp`, `after_seq`...)
//!    → HTTP 403 before the upgrade (FastAPI closes an unaccepted socket);
//! 2. auth: a key in the `session_api_key` query (first) or `X-Session-API-Key` header that is
//!    wrong → HTTP 403; no key → accept and wait for `{"type":"auth","session_api_key":..}`
//!    for [`FakeConfig::auth_timeout`](super::FakeConfig::auth_timeout), anything else →
//!    close 4001 "Authentication failed". Without configured keys everything is accepted;
//! 3. unknown conversation → close 4004 "Conversation not found"; too many subscribers →
//!    close 1013 "Too many connections for this conversation".
//!
//! Then the events socket sends the synthesized `full_state` snapshot, the requested history
//! (`resend_mode=all` / `resend_all=true`, or `since` with `timestamp >= after_timestamp`
//! compared as strings), then live events. The session socket sends `sync`, the `durable`
//! frames with `seq > after_seq`, the connect-time `transient` `full_state`, then live
//! frames, deduplicated by seq. Inbound text frames: a redundant auth frame is ignored, any
//! other JSON object is a user `Message` that is appended and run; errors come back as a
//! `ServerErrorEvent` (events socket) or an `error` envelope (session socket) and the socket
//! stays open.
//!
//! Back-pressure as on the real session socket: a subscriber whose queue overflows is closed
//! with 1013 `slow_consumer`, a session frame over 4 MiB with 1013 `frame_too_large`.
//!
//! Every socket task is tied to the server generation's cancellation token: `stop()` drops
//! the TCP stream without a close frame, which is what a killed process looks like.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::time::Instant;
use uuid::Uuid;

use super::clock;
use super::ops;
use super::store::{Conv, Subscription};
use super::validate::{self as v, Query};
use super::{Fault, Inner, SocketRequest};

/// Note an upgrade request in the server's socket log.
fn record_request(inner: &Inner, kind: &str, id: &str, q: &Query, headers: &HeaderMap) {
    let r = SocketRequest {
        path: format!("/sockets/{kind}/{id}"),
        query: q.pairs().to_vec(),
        header_key: headers
            .get("x-session-api-key")
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned()),
    };
    inner
        .socket_log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .request(r);
}

fn record_inbound(inner: &Inner, text: &str) {
    inner
        .socket_log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .inbound(text);
}

fn forbidden() -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::FORBIDDEN;
    r
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AuthPlan {
    Accepted,
    FirstMessage,
}

/// Auth by query key, then header key; `Err` = wrong key (HTTP 403).
fn plan_auth(inner: &Inner, q: &Query, headers: &HeaderMap) -> Result<AuthPlan, ()> {
    if !inner.auth_enabled() {
        return Ok(AuthPlan::Accepted);
    }
    let key = q.get("session_api_key").map(str::to_owned).or_else(|| {
        headers
            .get("x-session-api-key")
            .map(|h| h.to_str().unwrap_or("\u{0}").to_owned())
    });
    match key {
        Some(k) if inner.key_valid(Some(&k)) => Ok(AuthPlan::Accepted),
        Some(_) => Err(()),
        None => Ok(AuthPlan::FirstMessage),
    }
}

#[derive(Clone)]
enum Resend {
    None,
    All,
    Since(String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Events,
    Session,
}

pub(crate) async fn events_socket(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(ws) = ws else { return v::not_found() };
    let q = Query::parse(q.as_deref());
    record_request(&inner, "events", &id, &q, &headers);
    let Ok(conv_id) = v::parse_uuid(&id) else {
        return forbidden();
    };
    let mode = match q.get("resend_mode") {
        None => None,
        Some("all") => Some("all"),
        Some("since") => Some("since"),
        Some(_) => return forbidden(),
    };
    let after = match q.get("after_timestamp") {
        None => None,
        Some(raw) => match clock::parse_query_datetime(raw, inner.cfg.utc_offset) {
            Ok(s) => Some(s),
            Err(_) => return forbidden(),
        },
    };
    let resend_all = match q.get("resend_all") {
        None => false,
        Some(raw) => match v::parse_py_bool(raw) {
            Some(b) => b,
            None => return forbidden(),
        },
    };
    let resend = match (mode, after) {
        (Some("all"), _) => Resend::All,
        (Some("since"), Some(t)) => Resend::Since(t),
        (Some(_), None) => Resend::None, // `since` without a timestamp: nothing resent
        (None, _) if resend_all => Resend::All,
        _ => Resend::None,
    };
    let Ok(plan) = plan_auth(&inner, &q, &headers) else {
        return forbidden();
    };
    upgrade(inner, ws, conv_id, plan, Kind::Events, resend, None)
}

pub(crate) async fn session_socket(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(ws) = ws else { return v::not_found() };
    let q = Query::parse(q.as_deref());
    record_request(&inner, "session", &id, &q, &headers);
    let Ok(conv_id) = v::parse_uuid(&id) else {
        return forbidden();
    };
    let after_seq = match q.get("after_seq") {
        None => None,
        Some(raw) => match v::parse_py_int(raw) {
            Some(n) => Some(n),
            None => return forbidden(),
        },
    };
    let Ok(plan) = plan_auth(&inner, &q, &headers) else {
        return forbidden();
    };
    upgrade(
        inner,
        ws,
        conv_id,
        plan,
        Kind::Session,
        Resend::None,
        after_seq,
    )
}

fn upgrade(
    inner: Arc<Inner>,
    ws: WebSocketUpgrade,
    conv_id: Uuid,
    plan: AuthPlan,
    kind: Kind,
    resend: Resend,
    after_seq: Option<i64>,
) -> Response {
    let Some(gen) = inner.generation() else {
        return v::detail(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable");
    };
    ws.on_upgrade(move |socket| {
        let token = gen.token.clone();
        gen.tracker.track_future(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = connection(inner, socket, conv_id, plan, kind, resend, after_seq) => {}
            }
        })
    })
}

/// A socket that obeys the injected faults and counts the data frames it sends.
struct Sock {
    ws: WebSocket,
    inner: Arc<Inner>,
    kind: Kind,
    sent: u64,
    /// This socket's number (in opening order), for [`Fault::DropSocketsRandomly`].
    nth: u64,
}

/// Sockets opened so far, by any fake server in this process.
static SOCKETS_OPENED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// SplitMix64: a well-mixed 64-bit value for `x`.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The session socket's frame budget (`MAX_FRAME_BYTES`): a bigger frame drops the client
/// with 1013 `frame_too_large` (it reconnects with `after_seq`).
const MAX_SESSION_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// The socket must be dropped now (fault or peer gone).
struct Cut;

impl Sock {
    fn cut_after(&self) -> Option<u64> {
        match &*self.inner.fault() {
            Fault::DropSocketsAfterFrames(n) => Some(*n),
            Fault::DropSocketsRandomly { max_frames, seed } => {
                Some(splitmix64(seed ^ splitmix64(self.nth)) % max_frames.saturating_add(1).max(1))
            }
            _ => None,
        }
    }

    async fn send(&mut self, text: Utf8Bytes) -> Result<(), Cut> {
        while matches!(&*self.inner.fault(), Fault::StallSockets) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if self.cut_after().is_some_and(|n| self.sent >= n) {
            return Err(Cut);
        }
        if self.kind == Kind::Session && text.len() > MAX_SESSION_FRAME_BYTES {
            self.close(1013, "frame_too_large").await;
            return Err(Cut);
        }
        self.ws.send(Message::Text(text)).await.map_err(|_| Cut)?;
        self.sent += 1;
        if self.cut_after().is_some_and(|n| self.sent >= n) {
            return Err(Cut);
        }
        Ok(())
    }

    /// A proper close: send the frame, then give the peer a moment to answer it.
    async fn close(&mut self, code: u16, reason: &str) {
        if self
            .ws
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })))
            .await
            .is_err()
        {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(m)) = self.ws.recv().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

async fn first_message_auth(s: &mut Sock) -> bool {
    let deadline = Instant::now() + s.inner.cfg.auth_timeout;
    loop {
        match tokio::time::timeout_at(deadline, s.ws.recv()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                record_inbound(&s.inner, t.as_str());
                let Ok(Value::Object(m)) = serde_json::from_str::<Value>(t.as_str()) else {
                    return false;
                };
                if m.get("type").and_then(Value::as_str) != Some("auth") {
                    return false;
                }
                let key = m.get("session_api_key").and_then(Value::as_str);
                return key.is_some_and(|k| !k.is_empty()) && s.inner.key_valid(key);
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            _ => return false,
        }
    }
}

fn error_frame(inner: &Inner, kind: Kind, code: &str, detail: &str) -> Utf8Bytes {
    let mut m = Map::new();
    match kind {
        Kind::Events => {
            m.insert("id".into(), json!(Uuid::new_v4().to_string()));
            m.insert(
                "timestamp".into(),
                json!(clock::naive_iso(clock::now_local(inner.cfg.utc_offset))),
            );
            m.insert("source".into(), json!("environment"));
            m.insert("code".into(), json!(code));
            m.insert("detail".into(), json!(detail));
            m.insert("kind".into(), json!("ServerErrorEvent"));
        }
        Kind::Session => {
            m.insert("type".into(), json!("error"));
            m.insert("code".into(), json!(code));
            m.insert("detail".into(), json!(detail));
        }
    }
    Utf8Bytes::from(serde_json::to_string(&Value::Object(m)).unwrap_or_default())
}

async fn connection(
    inner: Arc<Inner>,
    socket: WebSocket,
    conv_id: Uuid,
    plan: AuthPlan,
    kind: Kind,
    resend: Resend,
    after_seq: Option<i64>,
) {
    let mut s = Sock {
        ws: socket,
        inner: inner.clone(),
        kind,
        sent: 0,
        nth: SOCKETS_OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    };
    if s.cut_after() == Some(0) {
        return;
    }
    if plan == AuthPlan::FirstMessage && !first_message_auth(&mut s).await {
        s.close(4001, "Authentication failed").await;
        return;
    }
    let Some(conv) = inner.store.get(&conv_id) else {
        s.close(4004, "Conversation not found").await;
        return;
    };
    let cfg = &inner.cfg;
    // Subscribe and snapshot under the conversation lock: an exact cut between history and live.
    let subscribed = {
        let mut st = conv.lock();
        match st.subscribe(&conv, cfg) {
            Err(_) => None,
            Ok(sub) => {
                let snapshot = st.full_state_frame(cfg, conv_id);
                let through = st.events.len().checked_sub(1).map(|t| t as u64);
                let mut prelude: Vec<Utf8Bytes> = Vec::new();
                match kind {
                    Kind::Events => {
                        prelude.push(snapshot.event);
                        match &resend {
                            Resend::None => {}
                            Resend::All => {
                                prelude.extend(st.events.iter().map(|e| e.frame.event.clone()))
                            }
                            Resend::Since(t) => prelude.extend(
                                st.events
                                    .iter()
                                    .filter(|e| e.timestamp.as_str() >= t.as_str())
                                    .map(|e| e.frame.event.clone()),
                            ),
                        }
                    }
                    Kind::Session => {
                        let mut sync = Map::new();
                        sync.insert("type".into(), json!("sync"));
                        if let Some(a) = after_seq {
                            sync.insert("from_seq".into(), json!(a));
                        }
                        if let Some(t) = through {
                            sync.insert("through_seq".into(), json!(t));
                        }
                        prelude.push(Utf8Bytes::from(
                            serde_json::to_string(&Value::Object(sync)).unwrap_or_default(),
                        ));
                        if let (Some(a), Some(t)) = (after_seq, through) {
                            let start = a.saturating_add(1).max(0) as u64;
                            if start <= t {
                                prelude.extend(
                                    st.events[start as usize..=t as usize]
                                        .iter()
                                        .map(|e| e.frame.session.clone()),
                                );
                            }
                        }
                        prelude.push(snapshot.session);
                    }
                }
                Some((sub, prelude, through))
            }
        }
    };
    let Some((mut sub, prelude, through)) = subscribed else {
        return s
            .close(1013, "Too many connections for this conversation")
            .await;
    };
    for f in prelude {
        if s.send(f).await.is_err() {
            return;
        }
    }
    pump(&mut s, &mut sub, &conv, kind, through).await;
}

async fn pump(
    s: &mut Sock,
    sub: &mut Subscription,
    conv: &Arc<Conv>,
    kind: Kind,
    mut last_seq: Option<u64>,
) {
    let inner = s.inner.clone();
    let mut ping = inner
        .cfg
        .ws_ping_interval
        .map(|d| tokio::time::interval_at(Instant::now() + d, d));
    loop {
        tokio::select! {
            f = sub.rx.recv() => match f {
                Some(f) => {
                    let text = match kind {
                        Kind::Events => f.event,
                        Kind::Session => {
                            if let Some(seq) = f.seq {
                                if last_seq.is_some_and(|l| seq <= l) {
                                    continue;
                                }
                                last_seq = Some(seq);
                            }
                            f.session
                        }
                    };
                    if s.send(text).await.is_err() {
                        return;
                    }
                }
                None => {
                    // Dropped by the publisher: the queue overflowed.
                    s.close(1013, "slow_consumer").await;
                    return;
                }
            },
            m = s.ws.recv() => match m {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(Message::Text(t))) => {
                    record_inbound(&inner, t.as_str());
                    if let Some((code, detail)) = inbound(&inner, conv, t.as_str()) {
                        let frame = error_frame(&inner, kind, &code, &detail);
                        if s.send(frame).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    let frame = error_frame(&inner, kind, "KeyError", "'text'");
                    if s.send(frame).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
            },
            _ = async {
                match ping.as_mut() {
                    Some(i) => { i.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {
                if s.ws.send(Message::Ping(Bytes::new())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Handle one inbound text frame; `Some((code, detail))` is an error to report.
fn inbound(inner: &Arc<Inner>, conv: &Arc<Conv>, text: &str) -> Option<(String, String)> {
    let data: Value = match serde_json::from_str(text) {
        Ok(d) => d,
        Err(e) => {
            let (pos, msg) = v::python_json_error(text.as_bytes(), &e);
            let before: String = text.chars().take(pos).collect();
            let line = before.matches('\n').count() + 1;
            let col = pos
                - before
                    .rfind('\n')
                    .map(|i| before[..i].chars().count() + 1)
                    .unwrap_or(0)
                + 1;
            return Some((
                "JSONDecodeError".into(),
                format!("{msg}: line {line} column {col} (char {pos})"),
            ));
        }
    };
    if let Value::Object(m) = &data {
        if m.get("type").and_then(Value::as_str) == Some("auth")
            && m.keys().all(|k| k == "type" || k == "session_api_key")
        {
            return None;
        }
    }
    let pyd = |loc: &str, msg: &str, kind: &str, input: &Value| -> (String, String) {
        let loc_line = if loc.is_empty() {
            String::new()
        } else {
            format!("{loc}\n")
        };
        (
            "ValidationError".into(),
            format!(
                "1 validation error for Message\n{loc_line}  {msg} [type={kind}, input_value={}, input_type={}]\n    For further information visit https://errors.pydantic.dev/2.14/v/{kind}",
                v::py_repr(input),
                v::py_type(input)
            ),
        )
    };
    let Value::Object(m) = &data else {
        return Some(pyd(
            "",
            "Input should be a valid dictionary or instance of Message",
            "model_type",
            &data,
        ));
    };
    const ROLES: [&str; 4] = ["user", "system", "assistant", "tool"];
    let role = match m.get("role") {
        None => return Some(pyd("role", "Field required", "missing", &data)),
        Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
        Some(other) => {
            return Some(pyd(
                "role",
                "Input should be 'user', 'system', 'assistant' or 'tool'",
                "literal_error",
                other,
            ))
        }
    };
    let content = match m.get("content") {
        None => Vec::new(),
        Some(Value::Array(a)) => {
            let mut errors = Vec::new();
            let _ = super::rest::validate_message(&json!({"content": a}), &[], &mut errors);
            if !errors.is_empty() {
                return Some(pyd(
                    "content",
                    "Input should be a valid list of TextContent or ImageContent",
                    "list_type",
                    &Value::Array(a.clone()),
                ));
            }
            a.clone()
        }
        Some(other) => {
            return Some(pyd(
                "content",
                "Input should be a valid list",
                "list_type",
                other,
            ))
        }
    };
    if role != "user" {
        return Some((
            "AssertionError".into(),
            "Only user messages are allowed to be sent to the agent.".into(),
        ));
    }
    ops::send_message(inner, conv, &content, true);
    None
}
