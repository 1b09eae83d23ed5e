//! A downstream agent-server: where it is, how to authenticate to it, and whether it is up.
//!
//! A [`Downstream`] is created by a provisioner and shared (`Arc`) by everything that talks to
//! it. Its [`Endpoint`] can change over its life (a restarted process or container gets a new
//! port), so it sits behind an `ArcSwap`: the request path reads it without locking. Its
//! [`DownstreamState`] is a `watch` channel, so anyone can wait, with a bound, for it to
//! become ready.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use http::uri::{Authority, Scheme};
use http::HeaderValue;
use tokio::sync::watch;

use crate::ids::{ConversationId, DownstreamId, UserId};
use crate::secret::SessionKey;

/// Where a downstream answers and with which key.
#[derive(Debug)]
pub struct Endpoint {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prefix before `/api/...` (empty, or e.g. `/agent` without a trailing slash).
    pub base_path: String,
    pub key: Option<SessionKey>,
    /// `key` as a ready-made, sensitive header value.
    key_header: Option<HeaderValue>,
    /// The last leak guard built for this endpoint, and the client origin it was built for
    /// (nearly every request comes with the same one): building one costs more than using it.
    redactor: ArcSwapOption<(Option<String>, crate::leak_guard::Redactor)>,
}

impl Clone for Endpoint {
    fn clone(&self) -> Self {
        Self::new(self.scheme.clone(), self.authority.clone(), self.base_path.clone(), self.key.clone())
    }
}

/// Why a URL cannot be a downstream endpoint.
#[derive(Debug, thiserror::Error)]
#[error("invalid downstream URL {url:?}: {reason}")]
pub struct EndpointError {
    pub url: String,
    pub reason: String,
}

impl Endpoint {
    /// Parse `http://host:port[/prefix]`.
    pub fn parse(url: &str, key: Option<SessionKey>) -> Result<Self, EndpointError> {
        let err = |reason: &str| EndpointError { url: url.to_owned(), reason: reason.to_owned() };
        let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| err(&e.to_string()))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| err("missing scheme (http:// or https://)"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(err("scheme must be http or https"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| err("missing host"))?;
        if uri.query().is_some() {
            return Err(err("must not have a query"));
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();
        Ok(Self::new(scheme, authority, base_path, key))
    }

    pub fn new(scheme: Scheme, authority: Authority, base_path: String, key: Option<SessionKey>) -> Self {
        let key_header = key.as_ref().filter(|k| !k.is_empty()).and_then(|k| {
            let mut v = HeaderValue::from_str(k.expose()).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        Self { scheme, authority, base_path, key, key_header, redactor: ArcSwapOption::empty() }
    }

    /// The leak guard for answers from this endpoint to a client that reached nestor at
    /// `origin` (cached for the last origin seen).
    pub fn redactor(&self, origin: Option<&str>) -> crate::leak_guard::Redactor {
        if let Some(c) = self.redactor.load().as_ref() {
            if c.0.as_deref() == origin {
                return c.1.clone();
            }
        }
        let r = crate::leak_guard::Redactor::for_endpoint(self, origin);
        self.redactor.store(Some(Arc::new((origin.map(str::to_owned), r.clone()))));
        r
    }

    /// `http://127.0.0.1:PORT` style loopback endpoint.
    pub fn loopback(port: u16, key: Option<SessionKey>) -> Self {
        let authority: Authority = format!("127.0.0.1:{port}").parse().expect("valid authority");
        Self::new(Scheme::HTTP, authority, String::new(), key)
    }

    /// The `X-Session-API-Key` value nestor sends to this downstream.
    pub fn key_header(&self) -> Option<&HeaderValue> {
        self.key_header.as_ref()
    }

    /// Absolute URI for `path_and_query` (which starts with `/`).
    pub fn uri(&self, path_and_query: &str) -> Result<http::Uri, http::Error> {
        let mut pq = String::with_capacity(self.base_path.len() + path_and_query.len());
        pq.push_str(&self.base_path);
        pq.push_str(path_and_query);
        http::Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }

    /// The origin as text (`http://127.0.0.1:9101`), for the leak guard and logs at debug.
    pub fn origin(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    /// The WebSocket origin (`ws://…` / `wss://…`).
    pub fn ws_origin(&self) -> String {
        let scheme = if self.scheme == Scheme::HTTPS { "wss" } else { "ws" };
        format!("{scheme}://{}{}", self.authority, self.base_path)
    }
}

/// Life-cycle of a downstream as nestor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownstreamState {
    /// Being started; requests wait (bounded) for `Ready`.
    Starting,
    /// Answering `/alive`.
    Ready,
    /// Deliberately stopped (idle policy, shutdown); its state is kept and it can be started again.
    Stopped,
    /// Could not start or died; the text says why (no addresses or keys in it).
    Failed(Arc<str>),
    /// Released for good (its conversations were deleted).
    Released,
}

impl DownstreamState {
    pub fn as_str(&self) -> &'static str {
        match self {
            DownstreamState::Starting => "starting",
            DownstreamState::Ready => "running",
            DownstreamState::Stopped => "stopped",
            DownstreamState::Failed(_) => "error",
            DownstreamState::Released => "released",
        }
    }
}

/// Why waiting for a downstream to be ready ended without it being ready.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NotReady {
    #[error("timed out after {0:?} waiting for the agent-server to become ready")]
    Timeout(Duration),
    #[error("the agent-server is stopped")]
    Stopped,
    #[error("the agent-server failed: {0}")]
    Failed(Arc<str>),
    #[error("the agent-server was released")]
    Released,
}

/// One downstream agent-server.
#[derive(Debug)]
pub struct Downstream {
    id: DownstreamId,
    kind: &'static str,
    /// The conversation it was started for (per-conversation provisioners), if any. Set at
    /// creation, or once later by [`Downstream::bind`] (a warm pool's server, started for no
    /// one, given to a conversation).
    primary: OnceLock<ConversationId>,
    owner: OnceLock<UserId>,
    endpoint: ArcSwapOption<Endpoint>,
    state: watch::Sender<DownstreamState>,
    /// `state` is `Ready` (read on every proxied request without the watch's lock).
    ready: AtomicBool,
    /// Conversations the catalog currently routes here.
    conversations: AtomicUsize,
    /// Client WebSockets currently attached (keeps it from idle stop).
    attached_sockets: AtomicUsize,
    /// Proxied requests in flight.
    in_flight: AtomicUsize,
    /// Unix millis of the last proxied request or socket activity.
    last_activity_ms: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Downstream {
    pub fn new(
        id: DownstreamId,
        kind: &'static str,
        primary: Option<ConversationId>,
        owner: Option<UserId>,
        endpoint: Option<Endpoint>,
        state: DownstreamState,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            kind,
            primary: primary.map(OnceLock::from).unwrap_or_default(),
            owner: owner.map(OnceLock::from).unwrap_or_default(),
            endpoint: ArcSwapOption::from(endpoint.map(Arc::new)),
            ready: AtomicBool::new(state == DownstreamState::Ready),
            state: watch::Sender::new(state),
            conversations: AtomicUsize::new(0),
            attached_sockets: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            last_activity_ms: AtomicU64::new(now_ms()),
        })
    }

    pub fn id(&self) -> &DownstreamId {
        &self.id
    }

    /// The provisioner kind that owns it (`process`, `existing`, …).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    pub fn primary(&self) -> Option<ConversationId> {
        self.primary.get().copied()
    }

    pub fn owner(&self) -> Option<&UserId> {
        self.owner.get()
    }

    /// Give a downstream that was started for no one (a warm pool's) to `conversation` of
    /// `owner`, for good. False (and nothing changes) when it already belongs to someone.
    pub fn bind(&self, conversation: ConversationId, owner: UserId) -> bool {
        if self.primary.set(conversation).is_err() {
            return false;
        }
        let _ = self.owner.set(owner);
        true
    }

    /// Current endpoint (None while it has none, e.g. stopped).
    pub fn endpoint(&self) -> Option<Arc<Endpoint>> {
        self.endpoint.load_full()
    }

    pub fn set_endpoint(&self, ep: Option<Endpoint>) {
        self.endpoint.store(ep.map(Arc::new));
    }

    pub fn state(&self) -> DownstreamState {
        self.state.borrow().clone()
    }

    /// Whether the state is `Ready`, without taking the state's lock.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_state(&self, s: DownstreamState) {
        self.state.send_if_modified(|cur| {
            if *cur == s {
                false
            } else {
                tracing::debug!(downstream = %self.id, from = cur.as_str(), to = s.as_str(), "downstream state");
                self.ready.store(s == DownstreamState::Ready, Ordering::Release);
                *cur = s;
                true
            }
        });
    }

    pub fn subscribe_state(&self) -> watch::Receiver<DownstreamState> {
        self.state.subscribe()
    }

    /// Wait until `Ready`, at most `timeout`. Returns early with the reason if it is stopped,
    /// failed or released (the caller decides whether to start it).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), NotReady> {
        let mut rx = self.state.subscribe();
        let res = tokio::time::timeout(timeout, async {
            loop {
                let s = rx.borrow_and_update().clone();
                match s {
                    DownstreamState::Ready => return Ok(()),
                    DownstreamState::Stopped => return Err(NotReady::Stopped),
                    DownstreamState::Failed(m) => return Err(NotReady::Failed(m)),
                    DownstreamState::Released => return Err(NotReady::Released),
                    DownstreamState::Starting => {}
                }
                if rx.changed().await.is_err() {
                    return Err(NotReady::Released);
                }
            }
        })
        .await;
        res.unwrap_or(Err(NotReady::Timeout(timeout)))
    }

    pub fn conversation_count(&self) -> usize {
        self.conversations.load(Ordering::Relaxed)
    }

    pub fn add_conversations(&self, n: isize) {
        if n >= 0 {
            self.conversations.fetch_add(n as usize, Ordering::Relaxed);
        } else {
            let _ = self.conversations.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_sub(n.unsigned_abs()))
            });
        }
    }

    pub fn set_conversation_count(&self, n: usize) {
        self.conversations.store(n, Ordering::Relaxed);
    }

    /// Record activity (a request or socket frame) now.
    pub fn touch(&self) {
        // Written once per millisecond at most: requests on several threads then share the
        // value's cache line instead of passing it between them on every request.
        let now = now_ms();
        if self.last_activity_ms.load(Ordering::Relaxed) != now {
            self.last_activity_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Time since the last activity.
    pub fn idle_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_activity_ms.load(Ordering::Relaxed)))
    }

    /// A guard counting one attached client socket while it lives.
    pub fn attach_socket(self: &Arc<Self>) -> ActivityGuard {
        self.attached_sockets.fetch_add(1, Ordering::Relaxed);
        self.touch();
        ActivityGuard { ds: self.clone(), socket: true }
    }

    /// A guard counting one in-flight request while it lives.
    pub fn begin_request(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        ActivityGuard { ds: self.clone(), socket: false }
    }

    pub fn attached_sockets(&self) -> usize {
        self.attached_sockets.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Decrements the socket or request count of a downstream when dropped.
#[derive(Debug)]
pub struct ActivityGuard {
    ds: Arc<Downstream>,
    socket: bool,
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let counter = if self.socket { &self.ds.attached_sockets } else { &self.ds.in_flight };
        counter.fetch_sub(1, Ordering::Relaxed);
        self.ds.touch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_with_prefix() {
        let ep = Endpoint::parse("http://127.0.0.1:9101/agent/", Some(SessionKey::new("k1"))).unwrap();
        assert_eq!(ep.base_path, "/agent");
        assert_eq!(ep.uri("/api/x?y=1").unwrap().to_string(), "http://127.0.0.1:9101/agent/api/x?y=1");
        assert!(ep.key_header().unwrap().is_sensitive());
        assert!(Endpoint::parse("127.0.0.1:9101", None).is_err());
        assert!(Endpoint::parse("ftp://x", None).is_err());
    }

    #[tokio::test]
    async fn wait_ready_is_bounded_and_wakes() {
        let ds = Downstream::new(DownstreamId::new("t-1"), "test", None, None, None, DownstreamState::Starting);
        assert_eq!(
            ds.wait_ready(Duration::from_millis(20)).await,
            Err(NotReady::Timeout(Duration::from_millis(20)))
        );
        let ds2 = ds.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            ds2.set_state(DownstreamState::Ready);
        });
        assert_eq!(ds.wait_ready(Duration::from_secs(5)).await, Ok(()));
        ds.set_state(DownstreamState::Failed("boom".into()));
        assert!(matches!(ds.wait_ready(Duration::from_secs(5)).await, Err(NotReady::Failed(_))));
    }

    #[test]
    fn binds_once() {
        let ds = Downstream::new(DownstreamId::new("t-1"), "test", None, None, None, DownstreamState::Ready);
        assert_eq!((ds.primary(), ds.owner()), (None, None));
        let (a, b) = (ConversationId::new_random(), ConversationId::new_random());
        assert!(ds.bind(a, UserId::new("alice")));
        assert!(!ds.bind(b, UserId::new("bob")), "never given to a second conversation");
        assert_eq!(ds.primary(), Some(a));
        assert_eq!(ds.owner().map(|u| u.as_str()), Some("alice"));
        let owned = Downstream::new(DownstreamId::new("t-2"), "test", Some(a), Some(UserId::new("x")), None, DownstreamState::Ready);
        assert!(!owned.bind(b, UserId::new("y")));
    }

    #[test]
    fn activity_guards_count() {
        let ds = Downstream::new(DownstreamId::new("t-1"), "test", None, None, None, DownstreamState::Ready);
        {
            let _a = ds.attach_socket();
            let _b = ds.begin_request();
            assert_eq!((ds.attached_sockets(), ds.in_flight()), (1, 1));
        }
        assert_eq!((ds.attached_sockets(), ds.in_flight()), (0, 0));
    }
}
