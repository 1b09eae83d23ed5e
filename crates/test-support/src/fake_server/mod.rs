//! A fast, in-process fake of the OpenHands **agent-server 1.58.2**.
//!
//! nestor sits in front of many agent-servers. Its unit, property, fault-injection and load
//! tests need a downstream that answers in microseconds, can be started by the hundred, can
//! be killed and restarted on demand, and can be told to misbehave — none of which the real
//! Python server (6 s to boot, ~325 MiB each) allows. This module is that downstream. It is
//! never a substitute for the real server in end-to-end tests, but everything nestor relies
//! on is reproduced from captures of a real 1.58.2: paths, status codes, JSON shapes and key
//! order, FastAPI's order of checks (404/405, then JSON decoding, then auth, then
//! validation), pydantic's 422 texts, the three WebSocket authentication paths and their
//! close codes, the frame sequences of `/sockets/events` and `/sockets/session`, naive-local
//! event timestamps compared as strings, idempotent create, page tokens, and crash recovery.
//!
//! ## Life cycle
//!
//! [`FakeAgentServer::stop`] behaves like `SIGKILL`: the listener is closed and every open
//! HTTP connection and WebSocket is dropped on the spot — no close frame, no response — and
//! in-flight scripted runs die. [`FakeAgentServer::restart`] then binds the **same port**
//! again with all state kept (conversations, logs, seqs), as a real server restarting on
//! its persistence directory would, including its startup recovery: conversations that were
//! `running` become `error`. State also lives on while the server is stopped, so tests can
//! seed or inspect it at any time.
//!
//! ## What is not faithful (on purpose)
//!
//! * No LLM, tools, workspace, files, bash, git, settings, profiles, secrets, skills or
//!   webhooks: only the conversation, event and socket API (see `rest.rs` for the routes).
//!   Other paths answer 404 like an unknown route.
//! * Runs are scripted (see `ops.rs`), stats are not accumulated, titles are not generated.
//! * On `/sockets/events` with `resend_mode=all` during a run, the real server can interleave
//!   and duplicate replayed and live events (and even push live events before the snapshot);
//!   the fake always sends snapshot, history, live, exactly once each. To exercise a
//!   client's dedupe, append events with repeated ids ([`FakeAgentServer::append_event`]) or
//!   use [`TimestampMode::Repeat`] with `resend_mode=since`.
//! * A lagging legacy-socket subscriber is dropped with 1013 `slow_consumer` (the real
//!   legacy socket just blocks); the session socket's rule is the real one.
//! * Bodies are parsed as JSON whatever their `Content-Type`; CORS is not implemented;
//!   Python `json` error messages for bad bodies are approximated.
//! * "Local time" is [`FakeConfig::utc_offset`] (UTC by default), not the machine's zone.

mod clock;
mod deferred;
mod ops;
mod rest;
mod shapes;
mod store;
mod validate;
mod ws;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use axum::body::Body;
use dashmap::DashMap;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use uuid::Uuid;

use self::store::Store;

/// How event timestamps are generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestampMode {
    /// Every generated timestamp is strictly greater than the previous one of the same
    /// conversation (at least +1 µs), so `resend_mode=since` is exact.
    #[default]
    StrictlyIncreasing,
    /// Each generated timestamp is used for `n` consecutive events — the real server can
    /// write equal timestamps, and `since` is inclusive, so clients must dedupe.
    Repeat(u32),
}

/// Settings of one fake server.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// The key clients must present (`X-Session-API-Key`, `session_api_key` query, or the
    /// first-message auth frame). `None` = no authentication, like an empty key list.
    pub session_api_key: Option<String>,
    /// More valid keys (the real server accepts a list, for rotation).
    pub extra_session_api_keys: Vec<String>,
    /// Address to bind; loopback by default.
    pub host: IpAddr,
    /// Port to bind; 0 = any free port.
    pub port: u16,
    /// Reported by `/server_info` (`version`, `sdk_version`, ...).
    pub version: String,
    /// Action/observation pairs in a scripted run (the last one is the `finish` call).
    pub run_steps: usize,
    /// Pause before each event of a scripted run.
    pub step_delay: Duration,
    pub timestamps: TimestampMode,
    /// The fake's "local" time zone for naive event timestamps.
    pub utc_offset: time::UtcOffset,
    /// Prefix of `persistence_dir` (`<path>/<hex id>`); the real default is relative.
    pub conversations_path: String,
    /// How long a socket may take to send its first-message auth frame (real: 10 s).
    pub auth_timeout: Duration,
    /// Subscribers (both socket kinds together) per conversation before 1013 (real: 50).
    pub max_subscribers_per_conversation: usize,
    /// Frames queued per subscriber before it is dropped as a slow consumer.
    pub subscriber_queue: usize,
    /// Protocol pings on open sockets (uvicorn: every 20 s); `None` = never.
    pub ws_ping_interval: Option<Duration>,
    /// Write the (abbreviated) `SystemPromptEvent` before the first message/run, like the
    /// real server. Turn off to get logs that contain only what a test appended.
    pub system_prompt_event: bool,
    /// What `GET /api/vscode/url` and `/api/conversations/{id}/vscode/url` answer (`None`:
    /// `{"url": null}`, VS Code not running), e.g. a stand-in VS Code server in a test.
    pub vscode_url: Option<String>,
    /// Start dormant, like `OH_DEFERRED_INIT=true`: `/api/*` answers 503 and sockets are
    /// refused until `POST /api/init` (see `deferred.rs`).
    pub deferred_init: bool,
    /// The server's secret key (`OH_SECRET_KEY`): what `POST /api/init` must present as
    /// `X-Init-API-Key` (`None`: the init route is open, like the real server without one).
    pub secret_key: Option<String>,
    /// Keep conversations on disk here (`<dir>/<hex id>/meta.json` + `events.jsonl`) and
    /// load them at start, so a *process* that is killed and started again keeps them, like
    /// the real server on its `OH_CONVERSATIONS_PATH` (the binary honours that variable).
    /// `None`: memory only (state survives [`FakeAgentServer::restart`], not a new process).
    pub persist_dir: Option<std::path::PathBuf>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            session_api_key: None,
            extra_session_api_keys: Vec::new(),
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            version: "1.58.2".into(),
            run_steps: 2,
            step_delay: Duration::from_millis(5),
            timestamps: TimestampMode::StrictlyIncreasing,
            utc_offset: time::UtcOffset::UTC,
            conversations_path: "workspace/conversations".into(),
            auth_timeout: Duration::from_secs(10),
            max_subscribers_per_conversation: 50,
            subscriber_queue: 8192,
            ws_ping_interval: Some(Duration::from_secs(20)),
            system_prompt_event: true,
            vscode_url: None,
            deferred_init: false,
            secret_key: None,
            persist_dir: None,
        }
    }
}

impl FakeConfig {
    /// Default settings with a session key.
    pub fn with_key(key: impl Into<String>) -> Self {
        FakeConfig {
            session_api_key: Some(key.into()),
            ..Default::default()
        }
    }
}

/// Injected misbehaviour; set with [`FakeAgentServer::set_fault`], one at a time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Every HTTP request (REST and WebSocket upgrades) waits this long before being handled.
    Delay(Duration),
    /// Each WebSocket is cut (TCP dropped, no close frame) right after it has sent this many
    /// data frames; 0 cuts it right after the upgrade.
    DropSocketsAfterFrames(u64),
    /// Each WebSocket opened (or still open) is cut after its own number of data frames,
    /// drawn uniformly from `0..=max_frames` when the socket is opened (deterministic given
    /// `seed` and the order sockets are opened in): random cut positions, prelude included.
    DropSocketsRandomly { max_frames: u64, seed: u64 },
    /// WebSockets stop sending frames (they still accept the connection and read).
    StallSockets,
    /// Requests whose path starts with `path_prefix` get this status and
    /// `{"detail": "<reason phrase>"}` (e.g. 503 on `/api/`, or on `/sockets/` to refuse
    /// upgrades).
    Status { status: u16, path_prefix: String },
    /// Requests whose path starts with `path_prefix` get no response: the connection is
    /// closed (a crash in the middle of a request).
    CloseConnections { path_prefix: String },
}

/// One listening period of the server: cancelling the token kills everything it spawned.
#[derive(Clone)]
pub(crate) struct Generation {
    pub token: CancellationToken,
    pub tracker: TaskTracker,
}

struct Running {
    gen: Generation,
    accept: JoinHandle<()>,
}

pub(crate) struct Inner {
    pub cfg: FakeConfig,
    pub store: Store,
    fault: ArcSwap<Fault>,
    requests: AtomicU64,
    per_path: DashMap<String, u64>,
    /// Bodies of `POST /api/conversations` as received (last 1,000), for tests that check
    /// what a proxy sent.
    pub(crate) create_bodies: Mutex<std::collections::VecDeque<Value>>,
    started: Instant,
    last_request_ms: AtomicU64,
    addr: SocketAddr,
    gen: Mutex<Option<Generation>>,
    running: tokio::sync::Mutex<Option<Running>>,
    run_ids: AtomicU64,
    /// What clients presented on socket upgrades, and the text frames they sent.
    pub(crate) socket_log: Mutex<SocketLog>,
    /// Deferred init (dormant until `POST /api/init`).
    pub(crate) init: deferred::InitState,
}

/// One WebSocket upgrade request as the fake saw it (before any validation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketRequest {
    /// `/sockets/events/<id>` or `/sockets/session/<id>`.
    pub path: String,
    /// The decoded query pairs, in order.
    pub query: Vec<(String, String)>,
    /// The `X-Session-API-Key` header, if any.
    pub header_key: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct SocketLog {
    pub requests: std::collections::VecDeque<SocketRequest>,
    /// Every text frame received on a socket (auth frames included), in arrival order.
    pub inbound: std::collections::VecDeque<String>,
}

/// At most this many entries of each kind are kept (oldest dropped first).
const SOCKET_LOG_MAX: usize = 100_000;

impl SocketLog {
    pub(crate) fn request(&mut self, r: SocketRequest) {
        if self.requests.len() >= SOCKET_LOG_MAX {
            self.requests.pop_front();
        }
        self.requests.push_back(r);
    }
    pub(crate) fn inbound(&mut self, text: &str) {
        if self.inbound.len() >= SOCKET_LOG_MAX {
            self.inbound.pop_front();
        }
        self.inbound.push_back(text.to_owned());
    }
}

impl Inner {
    pub fn generation(&self) -> Option<Generation> {
        self.gen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn fault(&self) -> Arc<Fault> {
        self.fault.load_full()
    }

    pub fn next_run_id(&self) -> u64 {
        self.run_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether any session key is configured.
    pub fn auth_enabled(&self) -> bool {
        if let Some(keys) = self.init.keys() {
            return !keys.is_empty(); // delivered by POST /api/init: they replace the others
        }
        self.cfg.session_api_key.is_some() || !self.cfg.extra_session_api_keys.is_empty()
    }

    /// Whether `key` is one of the configured keys (always true without keys).
    pub fn key_valid(&self, key: Option<&str>) -> bool {
        if !self.auth_enabled() {
            return true;
        }
        let Some(k) = key.filter(|k| !k.is_empty()) else {
            return false;
        };
        if let Some(keys) = self.init.keys() {
            return keys.iter().any(|e| e == k);
        }
        self.cfg.session_api_key.as_deref() == Some(k)
            || self.cfg.extra_session_api_keys.iter().any(|e| e == k)
    }

    pub fn uptime(&self) -> f64 {
        self.started.elapsed().as_secs() as f64
    }

    pub fn idle_time(&self) -> f64 {
        let now = self.started.elapsed().as_millis() as u64;
        (now.saturating_sub(self.last_request_ms.load(Ordering::Relaxed)) / 1000) as f64
    }

    fn count(&self, path: &str) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.last_request_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        if let Some(mut c) = self.per_path.get_mut(path) {
            *c += 1;
            return;
        }
        *self.per_path.entry(path.to_owned()).or_insert(0) += 1;
    }
}

/// Handle to a running (or stopped) fake agent-server. Cheap to clone; all clones control
/// the same server.
#[derive(Clone)]
pub struct FakeAgentServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FakeAgentServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeAgentServer")
            .field("addr", &self.inner.addr)
            .finish()
    }
}

impl FakeAgentServer {
    /// Bind and start serving.
    pub async fn start(cfg: FakeConfig) -> anyhow::Result<Self> {
        let listener = bind_listener(SocketAddr::new(cfg.host, cfg.port))
            .with_context(|| format!("binding {}:{}", cfg.host, cfg.port))?;
        let addr = listener.local_addr()?;
        let init = deferred::InitState::new(cfg.deferred_init, cfg.secret_key.clone());
        let inner = Arc::new(Inner {
            cfg,
            store: Store::default(),
            fault: ArcSwap::from_pointee(Fault::None),
            requests: AtomicU64::new(0),
            per_path: DashMap::new(),
            create_bodies: Mutex::new(std::collections::VecDeque::new()),
            started: Instant::now(),
            last_request_ms: AtomicU64::new(0),
            addr,
            gen: Mutex::new(None),
            running: tokio::sync::Mutex::new(None),
            run_ids: AtomicU64::new(1),
            socket_log: Mutex::new(SocketLog::default()),
            init,
        });
        if let Some(dir) = inner.cfg.persist_dir.clone() {
            ops::load_persisted(&inner, &dir);
            // Like a real server starting on its state: what was running is now an error.
            ops::recover_after_restart(&inner);
        }
        let running = spawn_generation(&inner, listener);
        *inner.running.lock().await = Some(running);
        tracing::debug!(%addr, "fake agent-server started");
        Ok(FakeAgentServer { inner })
    }

    /// `http://host:port` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// `ws://host:port` (no trailing slash).
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.inner.addr)
    }

    pub fn port(&self) -> u16 {
        self.inner.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn config(&self) -> &FakeConfig {
        &self.inner.cfg
    }

    /// Whether it is dormant (deferred init, no `POST /api/init` accepted yet).
    pub fn is_dormant(&self) -> bool {
        self.inner.init.is_dormant()
    }

    /// The body of the `POST /api/init` it accepted, if any.
    pub fn init_request(&self) -> Option<Value> {
        self.inner.init.request.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the server is currently listening.
    pub fn is_running(&self) -> bool {
        self.inner.generation().is_some()
    }

    /// Close the listener and cut every open connection and WebSocket abruptly (no close
    /// frame, no response), and kill in-flight scripted runs — like `SIGKILL`. State is kept.
    /// Returns once everything is gone.
    pub async fn stop(&self) {
        let mut running = self.inner.running.lock().await;
        let Some(r) = running.take() else { return };
        *self.inner.gen.lock().unwrap_or_else(|p| p.into_inner()) = None;
        r.gen.token.cancel();
        r.gen.tracker.close();
        let _ = r.accept.await;
        r.gen.tracker.wait().await;
        tracing::debug!(addr = %self.inner.addr, "fake agent-server stopped");
    }

    /// [`stop`](Self::stop), then listen on the same port again with all state kept;
    /// conversations that were running are recovered as `error` (real startup behaviour).
    ///
    /// # Panics
    /// If the port cannot be bound again within ~2 s (someone else took it).
    pub async fn restart(&self) {
        self.stop().await;
        let mut running = self.inner.running.lock().await;
        let mut attempt = 0u32;
        let listener = loop {
            match bind_listener(self.inner.addr) {
                Ok(l) => break l,
                Err(e) if attempt < 200 => {
                    attempt += 1;
                    tracing::debug!(error = %e, "rebinding fake agent-server");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("fake agent-server cannot rebind {}: {e}", self.inner.addr),
            }
        };
        ops::recover_after_restart(&self.inner);
        *running = Some(spawn_generation(&self.inner, listener));
        tracing::debug!(addr = %self.inner.addr, "fake agent-server restarted");
    }

    /// Create a conversation directly (no HTTP, no validation, no auth), from a
    /// `StartConversationRequest`-like body; missing fields get defaults. An existing id
    /// returns the existing conversation. Returns the `ConversationInfo` (`runtime_info`
    /// null, like the create response). An `initial_message` is appended and run.
    pub fn create_conversation(&self, id: Option<Uuid>, body: Value) -> Value {
        let spec = ops::CreateSpec::from_body(id, &body);
        let (conv, _) = ops::create(&self.inner, spec);
        let info = conv.lock().info(conv.id, false);
        info
    }

    /// Persist an event and publish it to the conversation's sockets; returns its seq.
    /// `id` and `timestamp` are generated when absent (timestamps per [`FakeConfig::timestamps`]);
    /// `ConversationStateUpdateEvent`s for `execution_status`, `last_user_message_id` and
    /// `tags` update the conversation like the real state would.
    ///
    /// # Panics
    /// If the conversation does not exist or `event` is not a JSON object.
    pub fn append_event(&self, conv: Uuid, event: Value) -> u64 {
        let c = self
            .inner
            .store
            .get(&conv)
            .unwrap_or_else(|| panic!("fake agent-server: no conversation {conv}"));
        let Value::Object(m) = event else {
            panic!("fake agent-server: an event must be a JSON object")
        };
        let mut st = c.lock();
        st.append(&self.inner.cfg, m).seq
    }

    /// Publish an event to the conversation's sockets without persisting it (no seq; the
    /// session socket wraps it in a `transient` envelope).
    ///
    /// # Panics
    /// If the conversation does not exist or `event` is not a JSON object.
    pub fn publish_transient(&self, conv: Uuid, event: Value) {
        let c = self
            .inner
            .store
            .get(&conv)
            .unwrap_or_else(|| panic!("fake agent-server: no conversation {conv}"));
        let Value::Object(m) = event else {
            panic!("fake agent-server: an event must be a JSON object")
        };
        c.lock().publish_transient(&self.inner.cfg, m);
    }

    /// Publish a fresh `full_state` snapshot to the conversation's sockets.
    pub fn publish_full_state(&self, conv: Uuid) {
        if let Some(c) = self.inner.store.get(&conv) {
            c.lock().publish_full_state(&self.inner.cfg, conv);
        }
    }

    /// Append a user message as `POST /events` would; returns the message event id.
    ///
    /// # Panics
    /// If the conversation does not exist.
    pub fn send_user_message(&self, conv: Uuid, text: &str, run: bool) -> String {
        let c = self
            .inner
            .store
            .get(&conv)
            .unwrap_or_else(|| panic!("fake agent-server: no conversation {conv}"));
        ops::send_message(
            &self.inner,
            &c,
            &[serde_json::json!({"type": "text", "text": text})],
            run,
        )
    }

    /// The persisted log, in seq order.
    pub fn events(&self, conv: Uuid) -> Vec<Value> {
        self.inner
            .store
            .get(&conv)
            .map(|c| c.lock().events.iter().map(|e| e.value.clone()).collect())
            .unwrap_or_default()
    }

    /// `GET /api/conversations/{id}` as the server would answer it.
    pub fn conversation(&self, conv: Uuid) -> Option<Value> {
        self.inner
            .store
            .get(&conv)
            .map(|c| c.lock().info(conv, true))
    }

    /// `execution_status` of a conversation.
    pub fn execution_status(&self, conv: Uuid) -> Option<String> {
        self.inner
            .store
            .get(&conv)
            .map(|c| c.lock().status.as_str().to_owned())
    }

    /// Ids of all conversations (unordered).
    pub fn conversation_ids(&self) -> Vec<Uuid> {
        self.inner.store.all().iter().map(|c| c.id).collect()
    }

    pub fn conversation_count(&self) -> usize {
        self.inner.store.len()
    }

    /// Open socket subscriptions (both kinds) on a conversation.
    pub fn subscriber_count(&self, conv: Uuid) -> usize {
        self.inner
            .store
            .get(&conv)
            .map(|c| c.lock().subscriber_count())
            .unwrap_or(0)
    }

    /// All HTTP requests received (WebSocket upgrades included), since start.
    pub fn request_count(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Requests whose path starts with `path_prefix` (query excluded).
    pub fn request_count_for(&self, path_prefix: &str) -> u64 {
        self.inner
            .per_path
            .iter()
            .filter(|e| e.key().starts_with(path_prefix))
            .map(|e| *e.value())
            .sum()
    }

    /// The bodies of the creates this server received, oldest first (at most 1,000).
    pub fn create_bodies(&self) -> Vec<Value> {
        self.inner.create_bodies.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    pub fn reset_request_counts(&self) {
        self.inner.requests.store(0, Ordering::Relaxed);
        self.inner.per_path.clear();
    }

    /// Every WebSocket upgrade request received so far (both socket kinds, any outcome),
    /// with the query and `X-Session-API-Key` header the client presented: lets a test
    /// check which credentials a proxy sends downstream.
    pub fn socket_requests(&self) -> Vec<SocketRequest> {
        self.inner.socket_log.lock().unwrap_or_else(|p| p.into_inner()).requests.iter().cloned().collect()
    }

    /// Every text frame clients sent on sockets (first-message auth frames included), in
    /// arrival order.
    pub fn socket_inbound_frames(&self) -> Vec<String> {
        self.inner.socket_log.lock().unwrap_or_else(|p| p.into_inner()).inbound.iter().cloned().collect()
    }

    pub fn set_fault(&self, f: Fault) {
        self.inner.fault.store(Arc::new(f));
    }

    pub fn fault(&self) -> Fault {
        (*self.inner.fault()).clone()
    }
}

/// Listen with a deep accept queue: `TcpListener::bind` uses 128 (the standard library's
/// value), which a burst of a thousand (re)connections overflows; the kernel then drops
/// SYNs and clients retry after 1 s, 3 s, 7 s. uvicorn listens with 2048.
fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(2048)
}

/// Accept loop + per-connection tasks, all tied to one cancellation token.
fn spawn_generation(inner: &Arc<Inner>, listener: TcpListener) -> Running {
    let gen = Generation {
        token: CancellationToken::new(),
        tracker: TaskTracker::new(),
    };
    *inner.gen.lock().unwrap_or_else(|p| p.into_inner()) = Some(gen.clone());
    let router = rest::router(inner.clone());
    let (inner2, gen2) = (inner.clone(), gen.clone());
    let accept = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = gen2.token.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        let (inner3, router3, token) = (inner2.clone(), router.clone(), gen2.token.clone());
                        gen2.tracker.spawn(async move {
                            tokio::select! {
                                _ = token.cancelled() => {}
                                _ = serve_connection(inner3, router3, stream) => {}
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "fake agent-server accept failed");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
        drop(listener);
    });
    Running { gen, accept }
}

async fn serve_connection(inner: Arc<Inner>, router: axum::Router, stream: tokio::net::TcpStream) {
    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let (inner, router) = (inner.clone(), router.clone());
        async move { handle(inner, router, req).await }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .await
    {
        tracing::trace!(error = %e, "fake agent-server connection ended");
    }
}

/// Counting and fault injection in front of the router.
async fn handle(
    inner: Arc<Inner>,
    router: axum::Router,
    req: http::Request<Incoming>,
) -> Result<http::Response<Body>, std::io::Error> {
    let path = req.uri().path().to_owned();
    inner.count(&path);
    let fault = inner.fault();
    match &*fault {
        Fault::Delay(d) => tokio::time::sleep(*d).await,
        Fault::Status {
            status,
            path_prefix,
        } if path.starts_with(path_prefix.as_str()) => {
            let code = http::StatusCode::from_u16(*status)
                .unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
            let mut m = Map::new();
            m.insert(
                "detail".into(),
                Value::String(code.canonical_reason().unwrap_or("Injected fault").into()),
            );
            return Ok(validate::json_response(code, &Value::Object(m)));
        }
        Fault::CloseConnections { path_prefix } if path.starts_with(path_prefix.as_str()) => {
            return Err(std::io::Error::other("injected fault: connection closed"));
        }
        _ => {}
    }
    let req = match deferred::gate(&inner, req).await {
        Ok(r) => return Ok(r),
        Err(req) => req,
    };
    let resp: Result<_, Infallible> = router.oneshot(req).await;
    Ok(match resp {
        Ok(r) => r,
        Err(e) => match e {},
    })
}
