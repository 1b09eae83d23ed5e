//! Webhooks, both ways.
//!
//! **In**: every downstream nestor starts is configured (`OH_WEBHOOKS_0_*`) to post its
//! webhooks to nestor: `POST <internal_url>/nestor/webhooks/conversations` (one
//! `ConversationInfo`, on create/pause/update/delete) and
//! `POST <internal_url>/nestor/webhooks/events/{id-hex}` (a batch of events). A downstream
//! authenticates with its own key (`X-Session-API-Key`, which the agent-server puts on every
//! webhook post), so nestor knows which downstream spoke. `existing` servers can be pointed
//! here the same way by their operator. What arrives keeps the catalog current — status,
//! title, stats, `updated_at` — so a search does not have to ask every downstream on every
//! call: a downstream heard from recently is only re-listed after
//! `catalog.webhook_staleness_secs`.
//!
//! **Out**: the same payloads are re-emitted to the webhooks configured on nestor itself, in
//! the agent-server's `webhooks` shape (`base_url`, `headers`, `event_buffer_size`,
//! `flush_delay`, `num_retries`, `retry_delay`, queue caps): conversation infos at once,
//! events batched per conversation, each post retried, with nestor's first session key in
//! `X-Session-API-Key` like an agent-server. Payloads pass the leak guard first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;
use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use nestor_core::{ApiError, ConversationId, Downstream, DownstreamId, Endpoint};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::app::AppState;
use crate::errors::HttpResult;

/// One webhook target (the agent-server's `WebhookSpec`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    pub base_url: String,
    #[serde(default)]
    pub headers: HashMap<String, String>,
    #[serde(default = "d_buffer")]
    pub event_buffer_size: usize,
    /// Seconds after the first queued event before a batch is sent anyway.
    #[serde(default = "d_flush")]
    pub flush_delay: f64,
    #[serde(default = "d_retries")]
    pub num_retries: u32,
    /// Seconds between attempts.
    #[serde(default = "d_retry_delay")]
    pub retry_delay: f64,
    #[serde(default = "d_queue")]
    pub max_queue_size: usize,
    #[serde(default = "d_batch_bytes")]
    pub max_batch_bytes: usize,
    #[serde(default = "d_queue_bytes")]
    pub max_queue_bytes: usize,
}

fn d_buffer() -> usize {
    5
}
fn d_flush() -> f64 {
    30.0
}
fn d_retries() -> u32 {
    3
}
fn d_retry_delay() -> f64 {
    5.0
}
fn d_queue() -> usize {
    1000
}
fn d_batch_bytes() -> usize {
    5 << 20
}
fn d_queue_bytes() -> usize {
    50 << 20
}

/// The path of the receiver, under nestor's internal URL.
pub const RECEIVER_PATH: &str = "/nestor/webhooks";

/// How nestor's own downstreams are told to post here: environment for an agent-server.
/// Short flush delay: the catalog should learn of a finished run within a second.
pub fn downstream_env(internal_url: &str) -> Vec<(String, String)> {
    vec![
        ("OH_WEBHOOKS_0_BASE_URL".into(), format!("{internal_url}{RECEIVER_PATH}")),
        ("OH_WEBHOOKS_0_FLUSH_DELAY".into(), "0.5".into()),
        ("OH_WEBHOOKS_0_EVENT_BUFFER_SIZE".into(), "20".into()),
        ("OH_WEBHOOKS_0_NUM_RETRIES".into(), "5".into()),
        ("OH_WEBHOOKS_0_RETRY_DELAY".into(), "1".into()),
    ]
}

/// Which downstream a webhook post comes from (by the key it presents).
fn sender(state: &AppState, headers: &HeaderMap) -> Option<Arc<Downstream>> {
    let presented = headers.get(nestor_core::SESSION_KEY_HEADER)?.as_bytes();
    state.provisioner.list().into_iter().find(|ds| {
        ds.endpoint().is_some_and(|ep| ep.key.as_ref().is_some_and(|k| k.matches(presented)))
    })
}

async fn read_json(req: Request<Body>, limit: usize) -> Result<(HeaderMap, Value), ApiError> {
    let (parts, body) = req.into_parts();
    let bytes = http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| ApiError::BadRequest(format!("could not read the webhook body: {e}")))?
        .to_bytes();
    let v = serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("webhook body is not JSON: {e}")))?;
    Ok((parts.headers, v))
}

fn ok() -> Response {
    let mut r = Response::new(Body::from("{}"));
    *r.status_mut() = StatusCode::OK;
    r
}

/// `POST /nestor/webhooks/conversations`.
pub async fn receive_conversation(State(state): State<AppState>, req: Request<Body>) -> HttpResult {
    let Some(ds) = sender(&state, req.headers()) else { return Err(ApiError::Unauthorized.into()) };
    let (_, info) = read_json(req, 16 << 20).await?;
    let Some(id) = info.get("id").and_then(Value::as_str).and_then(|s| ConversationId::parse(s).ok()) else {
        return Err(ApiError::BadRequest("conversation webhook without an id".into()).into());
    };
    state.webhooks.heard_from(ds.id());
    metrics::counter!("nestor_webhooks_received_total", "kind" => "conversation").increment(1);
    if info.get("execution_status").and_then(Value::as_str) == Some("deleting") {
        // Deleted on the downstream (by nestor's own DELETE, or behind its back).
        if state.catalog.route(&id).is_some_and(|(d, _)| d.id() == ds.id()) {
            state.catalog.remove(&id).await;
            state.auth.revoke_conversation(&id);
        }
    } else {
        let owner = state.catalog.route(&id).map(|(_, o)| o).or_else(|| ds.owner().cloned()).unwrap_or_else(nestor_core::UserId::default_user);
        // Not `register`: a report sent before nestor's own delete of it must not bring the
        // conversation back.
        state.catalog.report(id, &ds, owner, info.clone()).await;
    }
    if let Some(ep) = ds.endpoint() {
        state.webhooks.emit_conversation(redact(&ep, &info));
    }
    Ok(ok())
}

/// `POST /nestor/webhooks/events/{id-hex}`.
pub async fn receive_events(State(state): State<AppState>, Path(hex): Path<String>, req: Request<Body>) -> HttpResult {
    let Some(ds) = sender(&state, req.headers()) else { return Err(ApiError::Unauthorized.into()) };
    let id = ConversationId::parse(&hex).map_err(|_| ApiError::BadRequest(format!("not a conversation id: {hex:?}")))?;
    let (_, events) = read_json(req, 64 << 20).await?;
    let Value::Array(events) = events else {
        return Err(ApiError::BadRequest("an events webhook body is a JSON array".into()).into());
    };
    state.webhooks.heard_from(ds.id());
    metrics::counter!("nestor_webhooks_received_total", "kind" => "events").increment(1);
    state.catalog.apply_events(&id, ds.id(), &events);
    if run_ended(&events) && state.catalog.route(&id).is_some_and(|(d, _)| d.id() == ds.id()) {
        // The agent-server announces neither its auto-title nor other metadata-only updates
        // (`meta.json`) by webhook: read the conversation's info when a run ends, so the
        // catalog (and search) shows its title without listing the downstream. The title is
        // generated concurrently with the first run and may land after it: while it is
        // missing, read again a few times (bounded, ~7 s).
        let (st, ds) = (state.clone(), ds.clone());
        tokio::spawn(async move {
            for delay_ms in [0u64, 500, 1000, 2000, 4000] {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                match st.catalog.fetch_live(&ds, &[id], false, crate::forward::INTERNAL_CALL_TIMEOUT).await {
                    Ok(infos) => match infos.first() {
                        Some(Some(info)) if info.get("title").is_some_and(|t| !t.is_null()) => break,
                        Some(Some(_)) => {}
                        _ => break, // gone
                    },
                    Err(e) => {
                        tracing::debug!(conversation = %id, "could not read the info after a run: {e}");
                        break;
                    }
                }
            }
        });
    }
    if let Some(ep) = ds.endpoint() {
        for e in &events {
            state.webhooks.emit_event(id, redact(&ep, e));
        }
    }
    Ok(ok())
}

/// A batch that says a run stopped (`execution_status` left `running`).
fn run_ended(events: &[Value]) -> bool {
    events.iter().any(|e| {
        e.get("kind").and_then(Value::as_str) == Some("ConversationStateUpdateEvent")
            && e.get("key").and_then(Value::as_str) == Some("execution_status")
            && matches!(e.get("value").and_then(Value::as_str), Some("finished" | "error" | "stuck" | "paused"))
    })
}

fn redact(ep: &Endpoint, v: &Value) -> Value {
    let r = crate::forward::redactor_for(ep, None);
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    match r.apply(&bytes) {
        std::borrow::Cow::Borrowed(_) => v.clone(),
        std::borrow::Cow::Owned(b) => serde_json::from_slice(&b).unwrap_or_else(|_| v.clone()),
    }
}

/// What one outgoing webhook worker is told.
enum Outgoing {
    Conversation(Value),
    Event(ConversationId, Value),
}

/// Receiver bookkeeping and the outgoing dispatchers.
pub struct Webhooks {
    heard: DashMap<DownstreamId, Instant>,
    workers: Vec<mpsc::Sender<Outgoing>>,
}

impl Webhooks {
    /// Start one worker per configured webhook; `key` goes in `X-Session-API-Key`.
    pub fn start(specs: &[WebhookSpec], key: Option<String>, client: reqwest::Client) -> Self {
        let workers = specs
            .iter()
            .map(|spec| {
                let (tx, rx) = mpsc::channel(spec.max_queue_size.max(1));
                tokio::spawn(worker(spec.clone(), key.clone(), client.clone(), rx));
                tx
            })
            .collect();
        Self { heard: DashMap::new(), workers }
    }

    pub fn heard_from(&self, ds: &DownstreamId) {
        self.heard.insert(ds.clone(), Instant::now());
    }

    /// When this downstream last posted a webhook.
    pub fn last_heard(&self, ds: &DownstreamId) -> Option<Instant> {
        self.heard.get(ds).map(|t| *t)
    }

    fn emit_conversation(&self, info: Value) {
        for w in &self.workers {
            if w.try_send(Outgoing::Conversation(info.clone())).is_err() {
                metrics::counter!("nestor_webhooks_dropped_total").increment(1);
            }
        }
    }

    fn emit_event(&self, id: ConversationId, event: Value) {
        for w in &self.workers {
            if w.try_send(Outgoing::Event(id, event.clone())).is_err() {
                metrics::counter!("nestor_webhooks_dropped_total").increment(1);
            }
        }
    }
}

/// A per-conversation event buffer of one worker.
struct Buffer {
    events: Vec<Value>,
    bytes: usize,
    first_at: Instant,
}

/// One outgoing webhook: conversation infos sent at once, events batched per conversation
/// (flushed at `event_buffer_size` events, `max_batch_bytes`, or `flush_delay` after the
/// first), each post tried `num_retries + 1` times. Bounded: past `max_queue_bytes` of
/// buffered events the oldest are dropped (and counted).
async fn worker(spec: WebhookSpec, key: Option<String>, client: reqwest::Client, mut rx: mpsc::Receiver<Outgoing>) {
    let base = spec.base_url.trim_end_matches('/').to_owned();
    let flush_delay = Duration::from_secs_f64(spec.flush_delay.max(0.0));
    let mut buffers: HashMap<ConversationId, Buffer> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100).min(flush_delay.max(Duration::from_millis(10))));
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                None => break,
                Some(Outgoing::Conversation(info)) => {
                    post(&client, &spec, key.as_deref(), &format!("{base}/conversations"), &info).await;
                }
                Some(Outgoing::Event(id, e)) => {
                    let size = serde_json::to_vec(&e).map(|b| b.len()).unwrap_or(0);
                    let total: usize = buffers.values().map(|b| b.bytes).sum();
                    if total + size > spec.max_queue_bytes {
                        metrics::counter!("nestor_webhooks_dropped_total").increment(1);
                        continue;
                    }
                    let b = buffers.entry(id).or_insert_with(|| Buffer { events: Vec::new(), bytes: 0, first_at: Instant::now() });
                    b.events.push(e);
                    b.bytes += size;
                    if b.events.len() >= spec.event_buffer_size.max(1) || b.bytes >= spec.max_batch_bytes {
                        let b = buffers.remove(&id).expect("just inserted");
                        send_batch(&client, &spec, key.as_deref(), &base, id, b.events).await;
                    }
                }
            },
            _ = tick.tick() => {
                let due: Vec<ConversationId> = buffers.iter().filter(|(_, b)| b.first_at.elapsed() >= flush_delay).map(|(k, _)| *k).collect();
                for id in due {
                    if let Some(b) = buffers.remove(&id) {
                        send_batch(&client, &spec, key.as_deref(), &base, id, b.events).await;
                    }
                }
            }
        }
    }
    // Shutting down: flush what is buffered (bounded by the retries of each post).
    for (id, b) in buffers.drain() {
        send_batch(&client, &spec, key.as_deref(), &base, id, b.events).await;
    }
}

async fn send_batch(client: &reqwest::Client, spec: &WebhookSpec, key: Option<&str>, base: &str, id: ConversationId, events: Vec<Value>) {
    post(client, spec, key, &format!("{base}/events/{}", id.hex()), &Value::Array(events)).await;
}

/// POST with retries (`num_retries + 1` attempts, `retry_delay` apart, 30 s each).
async fn post(client: &reqwest::Client, spec: &WebhookSpec, key: Option<&str>, url: &str, body: &Value) -> bool {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    for attempt in 0..=spec.num_retries {
        let mut rb = client.request(Method::POST, url).timeout(Duration::from_secs(30)).header("content-type", "application/json");
        for (k, v) in &spec.headers {
            rb = rb.header(k, v);
        }
        if let Some(k) = key {
            rb = rb.header("X-Session-API-Key", k);
        }
        match rb.body(bytes.clone()).send().await {
            Ok(r) if r.status().is_success() => {
                metrics::counter!("nestor_webhooks_sent_total", "result" => "ok").increment(1);
                return true;
            }
            Ok(r) => tracing::warn!(url, status = %r.status(), attempt, "webhook post refused"),
            Err(e) => tracing::warn!(url, attempt, "webhook post failed: {e}"),
        }
        if attempt < spec.num_retries {
            tokio::time::sleep(Duration::from_secs_f64(spec.retry_delay.max(0.0))).await;
        }
    }
    metrics::counter!("nestor_webhooks_sent_total", "result" => "failed").increment(1);
    false
}
