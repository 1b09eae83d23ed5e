//! `pool`: warm agent-servers, started ahead of time and handed to conversations on create.
//!
//! An agent-server takes seconds to boot (Python imports: ~6 s on an idle machine, more
//! under load); creating a conversation on a running one takes about a hundred milliseconds.
//! The pool keeps `min_idle` servers booted in the agent-server's **deferred-init** mode
//! (`OH_DEFERRED_INIT=true`): up and answering `/alive`, but *dormant* — every `/api/*` route
//! answers 503 and every socket is refused until `POST /api/init` delivers the runtime
//! configuration. A create takes one of them and binds it to the conversation in one request
//! of a few milliseconds; no start-up is left in the create path.
//!
//! ## What is bound when
//!
//! A warm server is started with **nothing of any conversation**: a random *init key* of its
//! own (its `OH_SECRET_KEY`, which is what the agent-server checks `X-Init-API-Key` against),
//! a random boot session key that is never handed out (so no `/api/*` route is ever open,
//! even past the dormant gate), its own state directory or volume, and the configured
//! environment minus what is per-claim (the webhook settings, `OH_WEBHOOKS_*`). When a
//! conversation claims it, `POST /api/init` (authenticated with the init key) binds:
//!
//! * `session_api_keys`: a fresh random key of the conversation's server (nestor's only; the
//!   boot key stops working), also exported as `SESSION_API_KEY` like a cold start's;
//! * `secret_key`: a fresh random `OH_SECRET_KEY` (the init key stops working);
//! * `webhooks`: nestor's receiver (`<internal_url>/nestor/webhooks`), built from the
//!   withheld `OH_WEBHOOKS_*` settings, so a warm server re-adopted after a restart of nestor
//!   reports to the *current* internal URL;
//! * `conversations_path`, `bash_events_dir`: the server's own directories (as a cold start).
//!
//! What the agent-server 1.58.2 can bind late is exactly its `InitRequest` (checked against
//! its `init_router.py`): keys, secret keys, conversation and bash-event paths, worktree root,
//! webhooks, web URL, CORS origins, run concurrency, process environment and telemetry. The
//! workspace path, persistence directory and tool set are boot-time; they are per *server*
//! here (its own directory or volume), never per conversation, so nothing is lost.
//!
//! ## Life of a pool server
//!
//! ```text
//! start_dormant ──► booting ──/alive + GET /api/init = dormant──► idle ──claim──► the conversation's
//!                      │                                           │                downstream, for good
//!                      └── fails: discarded, refill backs off      └── older than max_age,
//!                                                                      or died: discarded, replaced
//! ```
//!
//! A claim (`provision`) takes the oldest idle server, records the conversation and owner
//! with the backend ([`WarmBackend::adopt`]: manifest, labels/annotations where the backend
//! can change them) *before* binding it, then posts `/api/init`. From then on the server is
//! an ordinary downstream of the wrapped backend: listed, routed, idle-stopped and restarted
//! (a restart boots it normally, with its conversation's keys, like any cold-started server),
//! released with its conversation. It is never given to another conversation
//! ([`Downstream::bind`] binds once). A claim that fails (the server died, init refused)
//! releases that server and tries the next idle one.
//!
//! **No idle server** (burst, or the pool still filling): the create falls back to a cold
//! start through the wrapped backend — never slower than without a pool, and counted
//! ([`PoolStats::cold_starts`]). Waiting for a booting warm server instead would save nothing
//! (it boots as slowly) and would tie the create to the refill's pace.
//!
//! **Refill** runs in the background: after every claim, release and failure, and every
//! second, the pool starts servers until `min_idle` are idle or booting, as long as idle +
//! booting + running conversation servers stay within `max_size`. Consecutive start failures
//! back off exponentially (to 60 s), so a broken binary or image costs nothing in a loop; an
//! agent-server without deferred init (`/api/init` 404) turns the pool off with one error log
//! (every create is then a cold start).
//!
//! ## Restart safety
//!
//! A claimed server is recorded as its conversation's before it is bound, so a restarted
//! nestor's [`Provisioner::recover`] re-adopts it like any downstream of the backend (and
//! removes it as half-created if the create never reached it). Warm servers found running
//! ([`WarmBackend::recover_warm`]) are re-adopted into the idle set when they are still
//! dormant and younger than `max_age`; the others are removed. On a graceful shutdown idle
//! servers are removed unless the backend keeps its servers running (`on_shutdown = "keep"`),
//! in which case the next nestor re-adopts them.
//!
//! ## Backends
//!
//! A backend joins the pool by implementing [`WarmBackend`] on top of [`Provisioner`]:
//! `process`, `docker` and `kubernetes` do. The `kubernetes` backend starts dormant pods
//! labelled as pool members and, in `adopt`, claims one by patching its Secret with a
//! `resourceVersion` precondition (atomic across nestor replicas, which share the cluster and
//! nothing else); pod and PVC are relabelled to the conversation in the background, the
//! Secret being the record of ownership meanwhile (kubernetes/warm.rs). Docker's
//! labels are immutable, so the `docker` backend records the claim in its manifest and keeps
//! the container's `warm-…` slot label.

mod config;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use http::{HeaderName, HeaderValue, Method};
use nestor_core::downstream::Endpoint;
use nestor_core::{ConversationId, Downstream, DownstreamClient, DownstreamId, DownstreamState, SessionKey};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{PoolBackend, PoolConfig, Settings};

use crate::{ProvisionError, ProvisionRequest, Provisioner};

/// The agent-server's header for `POST /api/init`.
pub const INIT_KEY_HEADER: &str = "X-Init-API-Key";

/// One warm (dormant, unclaimed) agent-server.
#[derive(Clone)]
pub struct WarmServer {
    /// Its downstream: not bound to any conversation, not in the backend's `list()`.
    pub ds: Arc<Downstream>,
    /// What `POST /api/init` must present (the dormant server's `OH_SECRET_KEY`).
    pub init_key: SessionKey,
    /// When it was started.
    pub born: SystemTime,
}

impl WarmServer {
    fn age(&self) -> Duration {
        self.born.elapsed().unwrap_or_default()
    }
}

/// The keys a claimed server is bound to (fresh, random, per conversation).
#[derive(Clone)]
pub struct ClaimKeys {
    /// Its new session key: what nestor authenticates with from now on.
    pub session: SessionKey,
    /// Its new `OH_SECRET_KEY`.
    pub secret: SessionKey,
}

impl ClaimKeys {
    pub fn random() -> Self {
        Self { session: SessionKey::random(), secret: SessionKey::random() }
    }
}

/// What a backend wants in a claimed server's `POST /api/init` besides its keys.
#[derive(Debug, Clone, Default)]
pub struct InitTemplate {
    /// `conversations_path` as the server sees it.
    pub conversations_path: Option<String>,
    /// `bash_events_dir` as the server sees it.
    pub bash_events_dir: Option<String>,
    /// Configured environment a cold start gets at spawn but a dormant server does not
    /// (see [`is_late_bound_env`]), to be delivered now.
    pub withheld_env: Vec<(String, String)>,
}

/// Environment a warm server must not boot with because it is bound at claim: the webhook
/// settings (`OH_WEBHOOKS_<n>_<FIELD>`), delivered as `webhooks` in `POST /api/init`.
pub fn is_late_bound_env(name: &str) -> bool {
    name.starts_with("OH_WEBHOOKS_")
}

/// A backend that can start agent-servers dormant and hand one to a conversation later.
///
/// Contract:
/// * [`WarmBackend::start_dormant`] starts a server in deferred-init mode with nothing of
///   any conversation in it (see the module docs) and returns it, possibly still
///   `Starting`; it is owned by the backend (stopped on its shutdown per its policy) but not
///   listed by [`Provisioner::list`] / [`Provisioner::get`] until adopted. On error nothing
///   is left behind.
/// * [`WarmBackend::adopt`] records, durably, that the server now belongs to the request's
///   conversation and owner, with the new keys (so restart recovery finds it as that
///   conversation's downstream, half-created until `mark_active`), binds its downstream
///   ([`Downstream::bind`]) and points its endpoint at the new session key. It does not talk
///   to the server; the pool posts `/api/init` next, and releases it on failure.
/// * [`WarmBackend::discard`] stops and removes a warm server for good (bounded).
/// * [`WarmBackend::recover_warm`] runs before [`Provisioner::recover`]: it re-adopts the warm
///   servers a previous nestor left running (still unclaimed) and removes the dead ones.
///   `recover` then skips those and removes any other warm leftovers, so a nestor started
///   without a pool cleans up after one.
#[async_trait]
pub trait WarmBackend: Provisioner {
    async fn start_dormant(&self) -> Result<WarmServer, ProvisionError>;

    async fn recover_warm(&self) -> Result<Vec<WarmServer>, ProvisionError>;

    async fn adopt(&self, warm: &WarmServer, req: &ProvisionRequest, keys: &ClaimKeys)
        -> Result<Arc<Downstream>, ProvisionError>;

    async fn discard(&self, warm: &WarmServer);

    fn init_template(&self, warm: &WarmServer) -> InitTemplate;

    /// Whether the backend leaves its servers running when nestor exits (then idle warm
    /// servers are left for the next nestor too).
    fn keeps_on_shutdown(&self) -> bool;

    /// How long a start may take before the backend itself calls it failed.
    fn startup_timeout(&self) -> Duration;
}

/// Counters of one pool since it was created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Warm servers ready to be claimed now.
    pub idle: usize,
    /// Warm servers starting.
    pub booting: usize,
    /// Warm servers started (re-adopted ones not included).
    pub started: u64,
    /// Creates served by a warm server.
    pub claims: u64,
    /// Creates that found no idle server and started one cold.
    pub cold_starts: u64,
    /// Warm starts that failed.
    pub failed_starts: u64,
    /// Claims that failed (the next idle server, or a cold start, served the create).
    pub failed_claims: u64,
    /// Idle servers replaced for age or because they died.
    pub recycled: u64,
    /// Time successful claims spent recording the conversation with the backend
    /// ([`WarmBackend::adopt`]: nestor's own part), in total, µs.
    pub adopt_us_total: u64,
    /// Time successful claims spent in the server's `POST /api/init` (the agent-server's
    /// part), in total, µs.
    pub init_us_total: u64,
}

#[derive(Default)]
struct Counters {
    adopt_us: AtomicU64,
    init_us: AtomicU64,
    started: AtomicU64,
    claims: AtomicU64,
    cold_starts: AtomicU64,
    failed_starts: AtomicU64,
    failed_claims: AtomicU64,
    recycled: AtomicU64,
}

/// The `pool` provisioner. Cheap to clone.
#[derive(Clone)]
pub struct PoolProvisioner(Arc<Inner>);

struct Inner {
    backend: Arc<dyn WarmBackend>,
    s: Settings,
    client: DownstreamClient,
    /// Oldest first.
    idle: Mutex<VecDeque<WarmServer>>,
    booting: AtomicUsize,
    /// Servers taken from `idle` whose claim is under way (they count against `max_size`
    /// until they are listed as running, or released).
    claiming: AtomicUsize,
    /// Wakes the refill loop (a claim, a release, a failure).
    wake: Notify,
    cancel: CancellationToken,
    tasks: TaskTracker,
    refilling: AtomicBool,
    /// The agent-server has no deferred init: the pool stays empty.
    unsupported: AtomicBool,
    /// Consecutive failed warm starts, and when the refill may try again.
    failures: AtomicU64,
    retry_at: Mutex<Option<tokio::time::Instant>>,
    n: Counters,
}

/// How often the refill loop looks at the pool without being woken.
const TICK: Duration = Duration::from_secs(1);
/// Claim attempts (idle servers tried) before a create falls back to a cold start.
const CLAIM_ATTEMPTS: usize = 3;

impl PoolProvisioner {
    pub fn new(cfg: &PoolConfig, backend: Arc<dyn WarmBackend>, client: DownstreamClient) -> Result<Self, ProvisionError> {
        let s = cfg.validate()?;
        Ok(Self(Arc::new(Inner {
            backend,
            s,
            client,
            idle: Mutex::new(VecDeque::new()),
            booting: AtomicUsize::new(0),
            claiming: AtomicUsize::new(0),
            wake: Notify::new(),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            refilling: AtomicBool::new(false),
            unsupported: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            retry_at: Mutex::new(None),
            n: Counters::default(),
        })))
    }

    /// The wrapped backend.
    pub fn backend(&self) -> &Arc<dyn WarmBackend> {
        &self.0.backend
    }

    pub fn stats(&self) -> PoolStats {
        let n = &self.0.n;
        PoolStats {
            idle: self.0.idle.lock().unwrap().len(),
            booting: self.0.booting.load(Ordering::SeqCst),
            started: n.started.load(Ordering::Relaxed),
            claims: n.claims.load(Ordering::Relaxed),
            cold_starts: n.cold_starts.load(Ordering::Relaxed),
            failed_starts: n.failed_starts.load(Ordering::Relaxed),
            failed_claims: n.failed_claims.load(Ordering::Relaxed),
            recycled: n.recycled.load(Ordering::Relaxed),
            adopt_us_total: n.adopt_us.load(Ordering::Relaxed),
            init_us_total: n.init_us.load(Ordering::Relaxed),
        }
    }

    /// The downstreams of the idle warm servers (for tests and tools: they are in no
    /// `list()`).
    pub fn idle_downstreams(&self) -> Vec<Arc<Downstream>> {
        self.0.idle.lock().unwrap().iter().map(|w| w.ds.clone()).collect()
    }

    /// Wait until `n` warm servers are idle, at most `timeout`. True when they are.
    pub async fn wait_idle(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.0.idle.lock().unwrap().len() >= n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop the background refill and forget the idle servers without touching any of them:
    /// what a crash of nestor leaves behind (for restart tests).
    #[doc(hidden)]
    pub fn abandon(&self) {
        self.0.cancel.cancel();
        self.0.idle.lock().unwrap().clear();
    }

    /// Start the background refill (idempotent; `recover` does it).
    pub fn start_refill(&self) {
        if self.0.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.0.clone();
        self.0.tasks.spawn(async move { me.refill_loop().await });
    }
}

impl Inner {
    fn publish(&self) {
        metrics::gauge!("nestor_pool_idle").set(self.idle.lock().unwrap().len() as f64);
        metrics::gauge!("nestor_pool_booting").set(self.booting.load(Ordering::SeqCst) as f64);
    }

    /// Conversation servers of the backend that are running or starting.
    fn running(&self) -> usize {
        self.backend
            .list()
            .iter()
            .filter(|d| d.primary().is_some() && matches!(d.state(), DownstreamState::Ready | DownstreamState::Starting))
            .count()
    }

    /// How many warm servers to start now.
    fn deficit(&self) -> usize {
        if self.unsupported.load(Ordering::SeqCst) || self.cancel.is_cancelled() {
            return 0;
        }
        if let Some(t) = *self.retry_at.lock().unwrap() {
            if tokio::time::Instant::now() < t {
                return 0;
            }
        }
        let (warm, claiming) = self.counts();
        let want = self.s.min_idle.saturating_sub(warm);
        let room = self.s.max_size.saturating_sub(warm + claiming + self.running());
        want.min(room)
    }

    /// (idle + booting warm servers, claims under way), read under the idle lock so a server
    /// moving from one to the other is counted once.
    fn counts(&self) -> (usize, usize) {
        let q = self.idle.lock().unwrap();
        (q.len() + self.booting.load(Ordering::SeqCst), self.claiming.load(Ordering::SeqCst))
    }

    async fn refill_loop(self: Arc<Self>) {
        loop {
            self.reap();
            let n = self.deficit();
            for _ in 0..n {
                self.booting.fetch_add(1, Ordering::SeqCst);
                let me = self.clone();
                self.tasks.spawn(async move { me.start_one().await });
            }
            self.publish();
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// Take out idle servers that died or aged; they are discarded in the background.
    fn reap(self: &Arc<Self>) {
        let gone: Vec<WarmServer> = {
            let mut q = self.idle.lock().unwrap();
            let (keep, gone): (VecDeque<_>, VecDeque<_>) = q.drain(..).partition(|w| self.usable(w));
            *q = keep;
            gone.into()
        };
        for w in gone {
            self.recycle(w);
        }
    }

    fn usable(&self, w: &WarmServer) -> bool {
        w.ds.state() == DownstreamState::Ready && w.age() < self.s.max_age
    }

    fn recycle(self: &Arc<Self>, w: WarmServer) {
        let why = if w.ds.state() == DownstreamState::Ready { "max_age" } else { "died" };
        tracing::info!(downstream = %w.ds.id(), age = ?w.age(), why, "recycling a warm agent-server");
        self.n.recycled.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("nestor_pool_recycled_total", "reason" => why).increment(1);
        let me = self.clone();
        self.tasks.spawn(async move {
            me.backend.discard(&w).await;
            me.wake.notify_one();
        });
    }

    /// Start one warm server and put it in the idle set (or discard it).
    async fn start_one(self: Arc<Self>) {
        let started = std::time::Instant::now();
        let res = self.boot().await;
        match res {
            Ok(w) => {
                self.failures.store(0, Ordering::SeqCst);
                *self.retry_at.lock().unwrap() = None;
                metrics::histogram!("nestor_pool_boot_seconds").record(started.elapsed().as_secs_f64());
                tracing::debug!(downstream = %w.ds.id(), took = ?started.elapsed(), "warm agent-server idle");
                self.idle.lock().unwrap().push_back(w);
            }
            Err(e) => {
                if !self.cancel.is_cancelled() {
                    self.n.failed_starts.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("nestor_pool_failed_starts_total").increment(1);
                    let f = self.failures.fetch_add(1, Ordering::SeqCst) + 1;
                    let wait = Duration::from_secs(1u64 << f.min(6)).min(Duration::from_secs(60));
                    *self.retry_at.lock().unwrap() = Some(tokio::time::Instant::now() + wait);
                    tracing::warn!(failures = f, retry_in = ?wait, "could not start a warm agent-server: {e}");
                }
            }
        }
        self.booting.fetch_sub(1, Ordering::SeqCst);
        self.publish();
        self.wake.notify_one();
    }

    async fn boot(&self) -> Result<WarmServer, ProvisionError> {
        let w = self.backend.start_dormant().await?;
        self.n.started.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("nestor_pool_started_total").increment(1);
        let bound = self.backend.startup_timeout() + Duration::from_secs(5);
        let ready = tokio::select! {
            _ = self.cancel.cancelled() => Err(ProvisionError::Other("nestor is shutting down".into())),
            r = w.ds.wait_ready(bound) => r.map_err(ProvisionError::from),
        };
        let checked = match ready {
            Ok(()) => self.check_dormant(&w).await,
            Err(e) => Err(e),
        };
        match checked {
            Ok(()) if !self.cancel.is_cancelled() => Ok(w),
            Ok(()) => {
                self.backend.discard(&w).await;
                Err(ProvisionError::Other("nestor is shutting down".into()))
            }
            Err(e) => {
                self.backend.discard(&w).await;
                Err(e)
            }
        }
    }

    /// Is `w` a dormant agent-server? A 404 on `/api/init` means it has no deferred init
    /// at all: the pool turns itself off.
    async fn check_dormant(&self, w: &WarmServer) -> Result<(), ProvisionError> {
        match init_state(&self.client, &w.ds).await {
            Ok(s) if s == "dormant" => Ok(()),
            Ok(s) => Err(ProvisionError::Start(format!("a warm agent-server is {s:?}, not dormant"))),
            Err(InitProbe::Unsupported) => {
                if !self.unsupported.swap(true, Ordering::SeqCst) {
                    tracing::error!("the agent-server has no deferred init (GET /api/init: 404); the warm pool stays empty and every create starts a server cold");
                }
                Err(ProvisionError::Config("the agent-server does not support deferred init".into()))
            }
            Err(InitProbe::Failed(m)) => Err(ProvisionError::Start(format!("GET /api/init: {m}"))),
        }
    }

    /// The oldest usable idle server, if any, counted as being claimed while the guard lives.
    fn take_idle(self: &Arc<Self>) -> Option<(WarmServer, Claiming)> {
        let mut gone = Vec::new();
        let got = {
            let mut q = self.idle.lock().unwrap();
            let mut got = None;
            while let Some(w) = q.pop_front() {
                if self.usable(&w) {
                    self.claiming.fetch_add(1, Ordering::SeqCst);
                    got = Some((w, Claiming(self.clone())));
                    break;
                }
                gone.push(w);
            }
            got
        };
        for w in gone {
            self.recycle(w);
        }
        self.publish();
        self.wake.notify_one();
        got
    }

    /// Give `w` to `req`'s conversation: record it, then bind it with `POST /api/init`.
    async fn claim(&self, w: WarmServer, req: &ProvisionRequest) -> Result<Arc<Downstream>, ProvisionError> {
        let started = std::time::Instant::now();
        let keys = ClaimKeys::random();
        let ds = match self.backend.adopt(&w, req, &keys).await {
            Ok(ds) => ds,
            Err(e) => {
                self.backend.discard(&w).await;
                return Err(e);
            }
        };
        let adopted = started.elapsed();
        if let Err(e) = self.init(&w, &keys).await {
            if let Err(e2) = self.backend.release(&ds, req.conversation, 0).await {
                tracing::warn!(conversation = %req.conversation, "releasing a server whose init failed: {e2}");
            }
            return Err(e);
        }
        let took = started.elapsed();
        self.n.adopt_us.fetch_add(adopted.as_micros() as u64, Ordering::Relaxed);
        self.n.init_us.fetch_add((took - adopted).as_micros() as u64, Ordering::Relaxed);
        metrics::histogram!("nestor_pool_claim_seconds").record(took.as_secs_f64());
        tracing::info!(conversation = %req.conversation, downstream = %ds.id(), ?took, adopt = ?adopted, init = ?(took - adopted), "claimed a warm agent-server");
        Ok(ds)
    }

    /// `POST /api/init` with the conversation's keys and the backend's template.
    async fn init(&self, w: &WarmServer, keys: &ClaimKeys) -> Result<(), ProvisionError> {
        let ep = w.ds.endpoint().ok_or_else(|| ProvisionError::Start("the warm agent-server has no address".into()))?;
        let t = self.backend.init_template(w);
        let body = init_body(keys, &t);
        let bare = Endpoint::new(ep.scheme.clone(), ep.authority.clone(), ep.base_path.clone(), None);
        let mut key = HeaderValue::from_str(w.init_key.expose())
            .map_err(|_| ProvisionError::Other("the init key is not a valid header value".into()))?;
        key.set_sensitive(true);
        let headers = [(HeaderName::from_static("x-init-api-key"), key)];
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let (_, answer) = self
            .client
            .call_bytes_with(&bare, Method::POST, "/api/init", Some(bytes.into()), &headers, self.s.init_timeout, 64 << 10)
            .await
            .map_err(|e| ProvisionError::Start(format!("POST /api/init: {e}")))?;
        let state: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
        match state.get("state").and_then(Value::as_str) {
            Some("ready") => Ok(()),
            other => Err(ProvisionError::Start(format!("POST /api/init answered state {other:?}"))),
        }
    }

    async fn recover_warm(self: &Arc<Self>) -> Result<(), ProvisionError> {
        let found = self.backend.recover_warm().await?;
        let checks = found.into_iter().map(|w| async move {
            let ok = w.ds.state() == DownstreamState::Ready && w.age() < self.s.max_age && self.check_dormant(&w).await.is_ok();
            (w, ok)
        });
        let mut kept = 0;
        for (w, ok) in futures::future::join_all(checks).await {
            if ok {
                kept += 1;
                self.idle.lock().unwrap().push_back(w);
            } else {
                tracing::info!(downstream = %w.ds.id(), "removing a warm agent-server left behind (not dormant, too old or not answering)");
                self.backend.discard(&w).await;
            }
        }
        if kept > 0 {
            // Oldest first, so they are claimed before they age out.
            self.idle.lock().unwrap().make_contiguous().sort_by_key(|w| w.born);
            tracing::info!(kept, "re-adopted warm agent-servers");
        }
        Ok(())
    }
}

/// One claim under way (decrements the count when dropped, also if the create is dropped).
struct Claiming(Arc<Inner>);

impl Drop for Claiming {
    fn drop(&mut self) {
        self.0.claiming.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The `POST /api/init` body for a claim.
fn init_body(keys: &ClaimKeys, t: &InitTemplate) -> Value {
    let mut b = Map::new();
    b.insert("session_api_keys".into(), json!([keys.session.expose()]));
    b.insert("secret_key".into(), json!(keys.secret.expose()));
    if let Some(p) = &t.conversations_path {
        b.insert("conversations_path".into(), json!(p));
    }
    if let Some(p) = &t.bash_events_dir {
        b.insert("bash_events_dir".into(), json!(p));
    }
    let hooks = webhooks_from_env(&t.withheld_env);
    if !hooks.is_empty() {
        b.insert("webhooks".into(), Value::Array(hooks));
    }
    // Like a cold start's environment (tools may read it).
    b.insert("env".into(), json!({ "SESSION_API_KEY": keys.session.expose() }));
    Value::Object(b)
}

/// `OH_WEBHOOKS_<n>_<FIELD>=value` as the agent-server's `webhooks` list, in index order
/// (values stay strings: the agent-server coerces them as it does its environment).
pub fn webhooks_from_env(env: &[(String, String)]) -> Vec<Value> {
    let mut by_index: std::collections::BTreeMap<u32, Map<String, Value>> = Default::default();
    for (k, v) in env {
        let Some(rest) = k.strip_prefix("OH_WEBHOOKS_") else { continue };
        let Some((idx, field)) = rest.split_once('_') else { continue };
        let Ok(idx) = idx.parse::<u32>() else { continue };
        if field.is_empty() {
            continue;
        }
        by_index.entry(idx).or_default().insert(field.to_ascii_lowercase(), Value::String(v.clone()));
    }
    by_index.into_values().filter(|m| m.contains_key("base_url")).map(Value::Object).collect()
}

enum InitProbe {
    Unsupported,
    Failed(String),
}

/// `GET /api/init` → `state` (`dormant`, `initializing`, `ready`).
async fn init_state(client: &DownstreamClient, ds: &Downstream) -> Result<String, InitProbe> {
    let Some(ep) = ds.endpoint() else { return Err(InitProbe::Failed("no address".into())) };
    match client.call_bytes(&ep, Method::GET, "/api/init", None, Duration::from_secs(5), 64 << 10).await {
        Ok((_, b)) => {
            let v: Value = serde_json::from_slice(&b).map_err(|e| InitProbe::Failed(e.to_string()))?;
            v.get("state").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| InitProbe::Failed("no state".into()))
        }
        Err(nestor_core::client::ClientError::Status { status, .. }) if status == http::StatusCode::NOT_FOUND => {
            Err(InitProbe::Unsupported)
        }
        Err(e) => Err(InitProbe::Failed(e.to_string())),
    }
}

#[async_trait]
impl Provisioner for PoolProvisioner {
    fn kind(&self) -> &'static str {
        "pool"
    }

    async fn recover(&self) -> Result<Vec<Arc<Downstream>>, ProvisionError> {
        self.0.recover_warm().await?;
        let owned = self.0.backend.recover().await?;
        self.start_refill();
        Ok(owned)
    }

    async fn provision(&self, req: ProvisionRequest) -> Result<Arc<Downstream>, ProvisionError> {
        let inner = &self.0;
        self.start_refill();
        for _ in 0..CLAIM_ATTEMPTS {
            let Some((w, claiming)) = inner.take_idle() else { break };
            let claimed = inner.claim(w, &req).await;
            drop(claiming);
            match claimed {
                Ok(ds) => {
                    inner.n.claims.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("nestor_pool_claims_total").increment(1);
                    return Ok(ds);
                }
                Err(e) => {
                    inner.n.failed_claims.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("nestor_pool_failed_claims_total").increment(1);
                    tracing::warn!(conversation = %req.conversation, "could not claim a warm agent-server, trying another way: {e}");
                }
            }
        }
        let (warm, claiming) = inner.counts();
        if warm + claiming + inner.running() >= inner.s.max_size {
            return Err(ProvisionError::Unavailable {
                detail: format!("{} agent-servers are running or warm (provisioner.pool.max_size)", inner.s.max_size),
                retry_after: Some(Duration::from_secs(10)),
            });
        }
        inner.n.cold_starts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("nestor_pool_cold_starts_total").increment(1);
        tracing::info!(conversation = %req.conversation, "no idle warm agent-server: starting one cold");
        inner.backend.provision(req).await
    }

    async fn find(&self, conversation: &ConversationId) -> Result<Option<Arc<Downstream>>, ProvisionError> {
        // Another replica's conversation (kubernetes).
        self.0.backend.find(conversation).await
    }

    fn get(&self, id: &DownstreamId) -> Option<Arc<Downstream>> {
        self.0.backend.get(id)
    }

    fn list(&self) -> Vec<Arc<Downstream>> {
        self.0.backend.list()
    }

    async fn ensure_ready(&self, ds: &Arc<Downstream>, timeout: Duration) -> Result<(), ProvisionError> {
        self.0.backend.ensure_ready(ds, timeout).await
    }

    async fn stop(&self, ds: &Arc<Downstream>) -> Result<(), ProvisionError> {
        let r = self.0.backend.stop(ds).await;
        self.0.wake.notify_one();
        r
    }

    async fn release(&self, ds: &Arc<Downstream>, conversation: ConversationId, remaining: usize) -> Result<(), ProvisionError> {
        let r = self.0.backend.release(ds, conversation, remaining).await;
        self.0.wake.notify_one();
        r
    }

    async fn home(&self) -> Result<Arc<Downstream>, ProvisionError> {
        self.0.backend.home().await
    }

    fn mark_active(&self, ds: &Downstream) {
        self.0.backend.mark_active(ds)
    }

    fn prepare_create(&self, ds: &Downstream, body: &mut serde_json::Map<String, serde_json::Value>) {
        self.0.backend.prepare_create(ds, body)
    }

    async fn shutdown(&self) {
        let inner = &self.0;
        inner.cancel.cancel();
        inner.tasks.close();
        // Booting servers see the cancellation and discard themselves.
        let bound = inner.backend.startup_timeout().min(Duration::from_secs(30)) + Duration::from_secs(10);
        if tokio::time::timeout(bound, inner.tasks.wait()).await.is_err() {
            tracing::warn!("warm agent-servers still starting after {bound:?}");
        }
        let idle: Vec<WarmServer> = inner.idle.lock().unwrap().drain(..).collect();
        if !inner.backend.keeps_on_shutdown() && !idle.is_empty() {
            tracing::info!(n = idle.len(), "removing idle warm agent-servers");
            let stops = idle.iter().map(|w| inner.backend.discard(w));
            if tokio::time::timeout(bound, futures::future::join_all(stops)).await.is_err() {
                tracing::warn!("some warm agent-servers were not removed within {bound:?}");
            }
        }
        inner.publish();
        inner.backend.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_come_from_the_withheld_environment() {
        let env = vec![
            ("OH_WEBHOOKS_0_BASE_URL".to_owned(), "http://127.0.0.1:8000/nestor/webhooks".to_owned()),
            ("OH_WEBHOOKS_0_FLUSH_DELAY".to_owned(), "0.5".to_owned()),
            ("OH_WEBHOOKS_1_BASE_URL".to_owned(), "http://hooks.example/x".to_owned()),
            ("OH_WEBHOOKS_2_NUM_RETRIES".to_owned(), "3".to_owned()), // no base_url: dropped
            ("OH_WEBHOOKS_X_BASE_URL".to_owned(), "nope".to_owned()),
            ("LLM_MODEL".to_owned(), "x".to_owned()),
        ];
        let h = webhooks_from_env(&env);
        assert_eq!(
            h,
            vec![
                json!({"base_url": "http://127.0.0.1:8000/nestor/webhooks", "flush_delay": "0.5"}),
                json!({"base_url": "http://hooks.example/x"}),
            ]
        );
        assert!(is_late_bound_env("OH_WEBHOOKS_0_BASE_URL"));
        assert!(!is_late_bound_env("OH_SECRET_KEY"));
    }

    #[test]
    fn init_body_binds_fresh_keys_and_nothing_else_of_the_boot() {
        let keys = ClaimKeys::random();
        let t = InitTemplate {
            conversations_path: Some("/w/conversations".into()),
            bash_events_dir: None,
            withheld_env: vec![("OH_WEBHOOKS_0_BASE_URL".into(), "http://n/nestor/webhooks".into())],
        };
        let b = init_body(&keys, &t);
        assert_eq!(b["session_api_keys"], json!([keys.session.expose()]));
        assert_eq!(b["secret_key"], keys.secret.expose());
        assert_ne!(keys.session, keys.secret);
        assert_eq!(b["conversations_path"], "/w/conversations");
        assert!(b.get("bash_events_dir").is_none());
        assert_eq!(b["webhooks"][0]["base_url"], "http://n/nestor/webhooks");
        assert_eq!(b["env"]["SESSION_API_KEY"], keys.session.expose());
    }
}
