//! In-memory conversations, their event logs and their subscribers.
//!
//! Every conversation is one `Mutex<ConvState>`; all mutations of a conversation (appending
//! an event, changing its status, adding a subscriber) happen under that lock, and an event
//! is handed to subscribers *while the lock is held*. That gives the two properties the
//! sockets need without any extra bookkeeping:
//!
//! * a subscriber registered under the lock together with a snapshot of the log (its length,
//!   `through_seq`) receives exactly the events appended after the snapshot — history and live
//!   never overlap or leave a gap (the real session socket gets the same guarantee with
//!   subscribe-then-buffer plus a dedupe by seq; the fake still dedupes by seq as a belt);
//! * per-conversation event order is total, and `seq` equals the index in the log, like the
//!   real `event-NNNNN-` file numbers.
//!
//! Subscribers are per-connection **bounded** mpsc queues filled with `try_send`: a
//! publisher never waits for a socket. A subscriber whose queue is full is dropped and its
//! socket closed with 1013 `slow_consumer`, the real session socket's back-pressure rule
//! (it reconnects with `after_seq` and loses nothing). Frames are serialized once per event
//! and shared by reference count between all subscribers, which is what makes 1,000+
//! sockets cheap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use time::{OffsetDateTime, PrimitiveDateTime};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::clock;
use super::shapes;
use super::{FakeConfig, TimestampMode};

/// `ConversationExecutionStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Idle,
    Running,
    Paused,
    WaitingForConfirmation,
    Finished,
    Error,
    Stuck,
    Deleting,
}

pub(crate) const STATUS_CHOICES: [&str; 8] = [
    "idle",
    "running",
    "paused",
    "waiting_for_confirmation",
    "finished",
    "error",
    "stuck",
    "deleting",
];

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Idle => "idle",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::WaitingForConfirmation => "waiting_for_confirmation",
            Status::Finished => "finished",
            Status::Error => "error",
            Status::Stuck => "stuck",
            Status::Deleting => "deleting",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "idle" => Status::Idle,
            "running" => Status::Running,
            "paused" => Status::Paused,
            "waiting_for_confirmation" => Status::WaitingForConfirmation,
            "finished" => Status::Finished,
            "error" => Status::Error,
            "stuck" => Status::Stuck,
            "deleting" => Status::Deleting,
            _ => return None,
        })
    }
}

/// One frame as every subscriber will get it, serialized once.
#[derive(Clone)]
pub(crate) struct Frame {
    /// `Some(seq)` for a persisted event, `None` for a transient one.
    pub seq: Option<u64>,
    /// The bare event JSON (what `/sockets/events` sends).
    pub event: Utf8Bytes,
    /// The `durable`/`transient` envelope (what `/sockets/session` sends).
    pub session: Utf8Bytes,
}

impl Frame {
    pub fn new(seq: Option<u64>, event_json: String) -> Self {
        let session = match seq {
            Some(s) => format!("{{\"type\":\"durable\",\"seq\":{s},\"event\":{event_json}}}"),
            None => format!("{{\"type\":\"transient\",\"event\":{event_json}}}"),
        };
        Frame {
            seq,
            event: Utf8Bytes::from(event_json),
            session: Utf8Bytes::from(session),
        }
    }
}

/// A persisted event.
pub(crate) struct StoredEvent {
    pub seq: u64,
    pub id: String,
    pub timestamp: String,
    pub kind: String,
    pub source: String,
    pub value: Value,
    pub frame: Frame,
    /// Lower-cased text for the `body` filter (message events only).
    pub search_text: Option<String>,
}

/// Conversation metadata (`meta.json` + the parts of `base_state.json` that REST shows).
pub(crate) struct Meta {
    pub agent: Value,
    pub workspace: Value,
    pub persistence_dir: String,
    pub max_iterations: Value,
    pub stuck_detection: bool,
    pub confirmation_policy: Value,
    pub security_analyzer: Value,
    pub hook_config: Value,
    pub client_tools: Value,
    pub tool_module_qualnames: Value,
    pub title: Option<String>,
    pub tags: Value,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub forked_from_conversation_id: Option<Uuid>,
    pub forked_from_event_id: Option<String>,
    pub parent_conversation_id: Option<Uuid>,
    pub sub_conversation_ids: Vec<Uuid>,
}

pub(crate) struct RunHandle {
    pub id: u64,
    pub abort: Option<tokio::task::AbortHandle>,
}

struct Sub {
    id: u64,
    tx: mpsc::Sender<Frame>,
}

/// Where a generated event's `parent_id` points.
pub(crate) enum Parent {
    /// The current leaf, omitted when there is none (state updates, the system prompt).
    Leaf,
    /// The current leaf, `"__root__"` when there is none (pause, messages...).
    LeafOrRoot,
    Id(String),
}

pub(crate) struct ConvState {
    pub meta: Meta,
    pub status: Status,
    pub last_user_message_id: Option<String>,
    pub leaf_event_id: Option<String>,
    pub events: Vec<Arc<StoredEvent>>,
    pub index: HashMap<String, usize>,
    last_ts: Option<PrimitiveDateTime>,
    ts_uses: u32,
    pub has_system_prompt: bool,
    /// The last action without an observation: (action id, tool_name, tool_call_id).
    pub pending_action: Option<(String, String, String)>,
    pub final_response: String,
    pub run: Option<RunHandle>,
    pub rerun_requested: bool,
    subs: Vec<Sub>,
    info_cache: Option<Bytes>,
    pub deleted: bool,
    /// Where appended events are persisted (`FakeConfig::persist_dir`), once loaded.
    pub persist: Option<std::path::PathBuf>,
}

pub(crate) struct Conv {
    pub id: Uuid,
    /// Creation order, the tie-breaker of the (stable) conversation sorts.
    pub serial: u64,
    st: Mutex<ConvState>,
}

static SUB_IDS: AtomicU64 = AtomicU64::new(1);

impl Conv {
    pub fn new(id: Uuid, serial: u64, meta: Meta) -> Self {
        Conv {
            id,
            serial,
            st: Mutex::new(ConvState {
                meta,
                status: Status::Idle,
                last_user_message_id: None,
                leaf_event_id: None,
                events: Vec::new(),
                index: HashMap::new(),
                last_ts: None,
                ts_uses: 0,
                has_system_prompt: false,
                pending_action: None,
                final_response: String::new(),
                run: None,
                rerun_requested: false,
                subs: Vec::new(),
                info_cache: None,
                deleted: false,
                persist: None,
            }),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, ConvState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached `GET /api/conversations/{id}` body (with `runtime_info`).
    pub fn info_bytes(&self) -> Bytes {
        let mut st = self.lock();
        if let Some(b) = &st.info_cache {
            return b.clone();
        }
        let b = Bytes::from(serde_json::to_vec(&st.info(self.id, true)).unwrap_or_default());
        st.info_cache = Some(b.clone());
        b
    }
}

/// Subscriber handle: removes itself from the conversation when dropped.
pub(crate) struct Subscription {
    conv: Arc<Conv>,
    id: u64,
    pub rx: mpsc::Receiver<Frame>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let id = self.id;
        self.conv.lock().subs.retain(|s| s.id != id);
    }
}

pub(crate) struct TooManySubscribers;

impl ConvState {
    /// Register a subscriber; call with the lock held, together with taking the snapshot.
    pub fn subscribe(
        &mut self,
        conv: &Arc<Conv>,
        cfg: &FakeConfig,
    ) -> Result<Subscription, TooManySubscribers> {
        self.subs.retain(|s| !s.tx.is_closed());
        if self.subs.len() >= cfg.max_subscribers_per_conversation {
            return Err(TooManySubscribers);
        }
        let (tx, rx) = mpsc::channel(cfg.subscriber_queue.max(1));
        let id = SUB_IDS.fetch_add(1, Ordering::Relaxed);
        self.subs.push(Sub { id, tx });
        Ok(Subscription {
            conv: conv.clone(),
            id,
            rx,
        })
    }

    pub fn subscriber_count(&self) -> usize {
        self.subs.iter().filter(|s| !s.tx.is_closed()).count()
    }

    fn publish(&mut self, f: &Frame) {
        if self.subs.is_empty() {
            return;
        }
        self.subs.retain(|s| match s.tx.try_send(f.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::info!("fake agent-server: dropping a slow subscriber");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    pub fn invalidate(&mut self) {
        self.info_cache = None;
    }

    /// The next event timestamp: naive local, strictly increasing (or repeated on purpose).
    pub fn next_timestamp(&mut self, cfg: &FakeConfig) -> String {
        let now = clock::now_local(cfg.utc_offset);
        let ts = match (self.last_ts, cfg.timestamps) {
            (Some(last), TimestampMode::Repeat(n)) if self.ts_uses < n.max(1) => {
                self.ts_uses += 1;
                last
            }
            (Some(last), _) if now <= last => {
                self.ts_uses = 1;
                last + time::Duration::microseconds(1)
            }
            _ => {
                self.ts_uses = 1;
                now
            }
        };
        self.last_ts = Some(ts);
        clock::naive_iso(ts)
    }

    /// Build an event in the real key order: `id, timestamp, source, [parent_id], ..., kind`.
    pub fn build(
        &mut self,
        cfg: &FakeConfig,
        kind: &str,
        source: &str,
        parent: Parent,
        fields: Vec<(&str, Value)>,
    ) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), json!(Uuid::new_v4().to_string()));
        m.insert("timestamp".into(), json!(self.next_timestamp(cfg)));
        m.insert("source".into(), json!(source));
        let parent = match parent {
            Parent::Leaf => self.leaf_event_id.clone(),
            Parent::LeafOrRoot => Some(
                self.leaf_event_id
                    .clone()
                    .unwrap_or_else(|| "__root__".into()),
            ),
            Parent::Id(id) => Some(id),
        };
        if let Some(p) = parent {
            m.insert("parent_id".into(), json!(p));
        }
        for (k, v) in fields {
            m.insert(k.into(), v);
        }
        m.insert("kind".into(), json!(kind));
        m
    }

    /// A `ConversationStateUpdateEvent` for one field, appended (they are persisted).
    pub fn state_update(&mut self, cfg: &FakeConfig, key: &str, value: Value) -> Arc<StoredEvent> {
        let ev = self.build(
            cfg,
            "ConversationStateUpdateEvent",
            "environment",
            Parent::Leaf,
            vec![("key", json!(key)), ("value", value)],
        );
        self.append(cfg, ev)
    }

    pub fn set_status(&mut self, cfg: &FakeConfig, s: Status) {
        self.status = s;
        self.state_update(cfg, "execution_status", json!(s.as_str()));
    }

    /// Persist an event and publish it. Missing `id`/`timestamp` are filled in (and put first).
    pub fn append(&mut self, cfg: &FakeConfig, ev: Map<String, Value>) -> Arc<StoredEvent> {
        let mut ev = self.complete(cfg, ev);
        shapes::strip_top_nulls(&mut ev);
        let seq = self.events.len() as u64;
        let id = ev.get("id").map(value_str).unwrap_or_default();
        let timestamp = ev.get("timestamp").map(value_str).unwrap_or_default();
        let kind = ev
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let source = ev
            .get("source")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let search_text = shapes::message_search_text(&ev);
        self.observe(&kind, &id, &ev);
        let value = Value::Object(ev);
        let json = serde_json::to_string(&value).unwrap_or_default();
        let stored = Arc::new(StoredEvent {
            seq,
            id: id.clone(),
            timestamp,
            kind,
            source,
            value,
            frame: Frame::new(Some(seq), json),
            search_text,
        });
        if let Some(dir) = &self.persist {
            // One line per event; a torn last line (killed mid-write) is skipped on load.
            use std::io::Write as _;
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("events.jsonl")) {
                let mut line = stored.frame.event.as_str().as_bytes().to_vec();
                line.push(b'\n');
                let _ = f.write_all(&line);
            }
        }
        self.index.insert(id, self.events.len());
        self.events.push(stored.clone());
        self.info_cache = None;
        let frame = stored.frame.clone();
        self.publish(&frame);
        stored
    }

    /// Publish an event that is not persisted (no seq).
    pub fn publish_transient(&mut self, cfg: &FakeConfig, ev: Map<String, Value>) {
        let mut ev = ev;
        if !ev.contains_key("id") || !ev.contains_key("timestamp") {
            let mut m = Map::new();
            m.insert(
                "id".into(),
                ev.remove("id")
                    .unwrap_or_else(|| json!(Uuid::new_v4().to_string())),
            );
            m.insert(
                "timestamp".into(),
                ev.remove("timestamp")
                    .unwrap_or_else(|| json!(clock::naive_iso(clock::now_local(cfg.utc_offset)))),
            );
            m.extend(ev);
            ev = m;
        }
        shapes::strip_top_nulls(&mut ev);
        let json = serde_json::to_string(&ev).unwrap_or_default();
        self.publish(&Frame::new(None, json));
    }

    /// Fill in `id` and `timestamp` for events handed in from outside.
    fn complete(&mut self, cfg: &FakeConfig, mut ev: Map<String, Value>) -> Map<String, Value> {
        if ev.contains_key("id") && ev.contains_key("timestamp") {
            if let Some(ts) = ev
                .get("timestamp")
                .and_then(Value::as_str)
                .and_then(clock::parse_naive_iso)
            {
                if self.last_ts.is_none_or(|l| ts > l) {
                    self.last_ts = Some(ts);
                    self.ts_uses = 1;
                }
            }
            return ev;
        }
        let mut m = Map::new();
        m.insert(
            "id".into(),
            ev.remove("id")
                .unwrap_or_else(|| json!(Uuid::new_v4().to_string())),
        );
        let ts = match ev.remove("timestamp") {
            Some(t) => t,
            None => json!(self.next_timestamp(cfg)),
        };
        m.insert("timestamp".into(), ts);
        m.extend(ev);
        m
    }

    /// Keep the derived state (status, leaf, last user message...) in step with the log.
    fn observe(&mut self, kind: &str, id: &str, ev: &Map<String, Value>) {
        match kind {
            "ConversationStateUpdateEvent" => {
                let value = ev.get("value");
                match ev.get("key").and_then(Value::as_str) {
                    Some("execution_status") => {
                        if let Some(s) = value.and_then(Value::as_str).and_then(Status::parse) {
                            self.status = s;
                        }
                    }
                    Some("last_user_message_id") => {
                        self.last_user_message_id =
                            value.and_then(Value::as_str).map(str::to_owned);
                    }
                    Some("tags") => {
                        if let Some(t @ Value::Object(_)) = value {
                            self.meta.tags = t.clone();
                        }
                    }
                    _ => {}
                }
                return;
            }
            "SystemPromptEvent" => self.has_system_prompt = true,
            "ActionEvent" => {
                let tool = ev.get("tool_name").map(value_str).unwrap_or_default();
                let call = ev.get("tool_call_id").map(value_str).unwrap_or_default();
                self.pending_action = Some((id.to_owned(), tool, call));
                if let Some(action) = ev.get("action") {
                    if action.get("kind").and_then(Value::as_str) == Some("FinishAction") {
                        self.final_response =
                            action.get("message").map(value_str).unwrap_or_default();
                    }
                }
            }
            "ObservationEvent" | "AgentErrorEvent" | "UserRejectObservation" => {
                let call = ev.get("tool_call_id").map(value_str).unwrap_or_default();
                if self.pending_action.as_ref().is_some_and(|p| p.2 == call) {
                    self.pending_action = None;
                }
            }
            "MessageEvent" if ev.get("source").and_then(Value::as_str) == Some("agent") => {
                if let Some(Value::Array(c)) = ev.get("llm_message").and_then(|m| m.get("content"))
                {
                    self.final_response = c
                        .iter()
                        .filter_map(|i| i.get("text").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join("");
                }
            }
            _ => {}
        }
        self.leaf_event_id = Some(id.to_owned());
        self.meta.updated_at = clock::now_utc();
    }

    /// The `full_state` value (the persisted `ConversationState`, `exclude_none`).
    pub fn full_state_value(&self, id: Uuid) -> Value {
        let m = &self.meta;
        let mut s = Map::new();
        s.insert("id".into(), json!(id.to_string()));
        s.insert("agent".into(), shapes::strip_nulls(&m.agent));
        s.insert("workspace".into(), m.workspace.clone());
        s.insert("persistence_dir".into(), json!(m.persistence_dir));
        s.insert("max_iterations".into(), m.max_iterations.clone());
        s.insert("stuck_detection".into(), json!(m.stuck_detection));
        s.insert("execution_status".into(), json!(self.status.as_str()));
        s.insert("confirmation_policy".into(), m.confirmation_policy.clone());
        if !m.security_analyzer.is_null() {
            s.insert("security_analyzer".into(), m.security_analyzer.clone());
        }
        s.insert("activated_knowledge_skills".into(), json!([]));
        s.insert("activated_path_rules".into(), json!([]));
        s.insert("invoked_skills".into(), json!([]));
        s.insert("blocked_actions".into(), json!({}));
        s.insert("blocked_messages".into(), json!({}));
        if let Some(l) = &self.last_user_message_id {
            s.insert("last_user_message_id".into(), json!(l));
        }
        if let Some(l) = &self.leaf_event_id {
            s.insert("leaf_event_id".into(), json!(l));
        }
        s.insert("head_is_empty".into(), json!(false));
        s.insert("stats".into(), json!({"usage_to_metrics": {}}));
        s.insert("secret_registry".into(), json!({"secret_sources": {}}));
        s.insert("tags".into(), m.tags.clone());
        s.insert("agent_state".into(), json!({}));
        Value::Object(s)
    }

    /// A synthesized (never persisted) `full_state` snapshot event.
    pub fn full_state_frame(&self, cfg: &FakeConfig, id: Uuid) -> Frame {
        let mut m = Map::new();
        m.insert("id".into(), json!(Uuid::new_v4().to_string()));
        m.insert(
            "timestamp".into(),
            json!(clock::naive_iso(clock::now_local(cfg.utc_offset))),
        );
        m.insert("source".into(), json!("environment"));
        m.insert("key".into(), json!("full_state"));
        m.insert("value".into(), self.full_state_value(id));
        m.insert("kind".into(), json!("ConversationStateUpdateEvent"));
        Frame::new(
            None,
            serde_json::to_string(&Value::Object(m)).unwrap_or_default(),
        )
    }

    /// Publish a fresh `full_state` snapshot to every subscriber.
    pub fn publish_full_state(&mut self, cfg: &FakeConfig, id: Uuid) {
        if self.subs.is_empty() {
            return;
        }
        let f = self.full_state_frame(cfg, id);
        self.publish(&f);
    }

    /// `ConversationInfo`, in the real field order.
    pub fn info(&self, id: Uuid, with_runtime: bool) -> Value {
        let m = &self.meta;
        let opt = |o: &Option<Uuid>| o.map(|u| json!(u.to_string())).unwrap_or(Value::Null);
        let mut s = Map::new();
        s.insert("id".into(), json!(id.to_string()));
        s.insert("workspace".into(), m.workspace.clone());
        s.insert("persistence_dir".into(), json!(m.persistence_dir));
        s.insert("max_iterations".into(), m.max_iterations.clone());
        s.insert("stuck_detection".into(), json!(m.stuck_detection));
        s.insert("execution_status".into(), json!(self.status.as_str()));
        s.insert("confirmation_policy".into(), m.confirmation_policy.clone());
        s.insert("security_analyzer".into(), m.security_analyzer.clone());
        s.insert("activated_knowledge_skills".into(), json!([]));
        s.insert("invoked_skills".into(), json!([]));
        s.insert("blocked_actions".into(), json!({}));
        s.insert("blocked_messages".into(), json!({}));
        s.insert(
            "last_user_message_id".into(),
            self.last_user_message_id
                .clone()
                .map(Value::String)
                .unwrap_or(Value::Null),
        );
        s.insert(
            "leaf_event_id".into(),
            self.leaf_event_id
                .clone()
                .map(Value::String)
                .unwrap_or(Value::Null),
        );
        s.insert("stats".into(), json!({"usage_to_metrics": {}}));
        s.insert("secret_registry".into(), json!({"secret_sources": {}}));
        s.insert("agent_state".into(), json!({}));
        s.insert("hook_config".into(), m.hook_config.clone());
        s.insert(
            "title".into(),
            m.title.clone().map(Value::String).unwrap_or(Value::Null),
        );
        s.insert("metrics".into(), Value::Null);
        s.insert("created_at".into(), json!(clock::utc_iso_z(m.created_at)));
        s.insert("updated_at".into(), json!(clock::utc_iso_z(m.updated_at)));
        s.insert(
            "forked_from_conversation_id".into(),
            opt(&m.forked_from_conversation_id),
        );
        s.insert(
            "forked_from_event_id".into(),
            m.forked_from_event_id
                .clone()
                .map(Value::String)
                .unwrap_or(Value::Null),
        );
        s.insert(
            "parent_conversation_id".into(),
            opt(&m.parent_conversation_id),
        );
        s.insert(
            "sub_conversation_ids".into(),
            Value::Array(
                m.sub_conversation_ids
                    .iter()
                    .map(|u| json!(u.to_string()))
                    .collect(),
            ),
        );
        s.insert("tags".into(), m.tags.clone());
        s.insert("current_model_id".into(), Value::Null);
        s.insert("available_models".into(), json!([]));
        s.insert("supports_runtime_model_switch".into(), json!(false));
        s.insert("launched_agent_profile".into(), Value::Null);
        s.insert("agent".into(), shapes::agent_rest(&m.agent));
        s.insert("client_tools".into(), m.client_tools.clone());
        s.insert(
            "tool_module_qualnames".into(),
            m.tool_module_qualnames.clone(),
        );
        s.insert(
            "runtime_info".into(),
            if with_runtime {
                json!({"runtime_status": "available", "can_resume": true, "runtime_error": null})
            } else {
                Value::Null
            },
        );
        Value::Object(s)
    }
}

fn value_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// All conversations of one fake server (survives `restart`).
#[derive(Default)]
pub(crate) struct Store {
    convs: RwLock<HashMap<Uuid, Arc<Conv>>>,
    serial: AtomicU64,
}

impl Store {
    pub fn get(&self, id: &Uuid) -> Option<Arc<Conv>> {
        self.convs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    pub fn next_serial(&self) -> u64 {
        self.serial.fetch_add(1, Ordering::Relaxed)
    }

    /// Insert unless the id exists; returns the conversation that is now stored and whether
    /// it is the new one.
    pub fn insert_new(&self, conv: Conv) -> (Arc<Conv>, bool) {
        let mut map = self.convs.write().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = map.get(&conv.id) {
            return (existing.clone(), false);
        }
        let c = Arc::new(conv);
        map.insert(c.id, c.clone());
        (c, true)
    }

    pub fn remove(&self, id: &Uuid) -> Option<Arc<Conv>> {
        self.convs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    pub fn all(&self) -> Vec<Arc<Conv>> {
        self.convs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.convs.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}
