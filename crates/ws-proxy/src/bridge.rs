//! One proxied pair: a client socket and the downstream socket behind it.
//!
//! Life of a pair:
//! 1. **Client auth.** Query/header keys were checked before the upgrade (bad: HTTP 403).
//!    Otherwise the first frame must be `{"type":"auth","session_api_key":…}` within 10 s
//!    (bad or late: close 4001).
//! 2. **Dial.** Wait (bounded) for the conversation's downstream to be ready, then connect
//!    with the downstream's own key in `X-Session-API-Key` and the client's query minus its
//!    key. Unknown conversation: close 4004.
//! 3. **Pump.** Downstream frames go to a per-client writer task through a queue whose
//!    bytes are counted: past 16 MiB pending the client is a slow consumer and is dropped
//!    (nestor's memory stays bounded). Client frames go to the downstream (auth frames are
//!    swallowed). Pings keep both legs alive and detect dead peers.
//! 4. **Loss.** If the downstream socket fails or closes with a "going away" code, the client
//!    stays connected: nestor redials with backoff until `resume_deadline`, asking for the
//!    resume position its cursor computed, drops what the client already has, and goes on.
//!    Client frames sent meanwhile are buffered (bounded) and delivered after. Past the
//!    deadline the client is closed with 1012 (retryable for the SDK and the frontend).
//!    Deliberate downstream closes (4xxx, 1000, policy) are passed to the client as is.
//! 5. **Shutdown.** When the proxy shuts down ([`bridge_until`]'s `shutdown` completes),
//!    the client is closed with 1012 "service restart" (retryable: the SDK and the
//!    frontend reconnect, to this nestor's successor) and the downstream socket is closed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::future::FusedFuture;
use futures::{FutureExt, SinkExt, StreamExt};
use nestor_core::{ConversationId, Endpoint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::classify::{self, SessionFrame, STATE_UPDATE_KIND};
use crate::config::ProxyConfig;
use crate::deflate::{self, CodecError, DeflateStream};
use crate::outbox::{outbox, Inbox, Outbox};
use crate::resume::{EventsCursor, History, SessionCursor, Verdict};

/// Which agent-server socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// `/sockets/events/{id}` (alias `/sockets/conversation/{id}/events`).
    Events,
    /// `/sockets/session/{id}`.
    Session,
    /// `/sockets/bash-events` (host-global): proxied as is, no resume position exists for it,
    /// so a lost downstream closes the client with a retryable code.
    BashEvents,
}

impl SocketKind {
    fn path(&self, id: &ConversationId) -> String {
        match self {
            SocketKind::Events => format!("/sockets/events/{id}"),
            SocketKind::Session => format!("/sockets/session/{id}"),
            SocketKind::BashEvents => "/sockets/bash-events".to_owned(),
        }
    }
}

/// How the client still has to authenticate after the upgrade.
#[derive(Clone)]
pub enum ClientAuth {
    /// Already authenticated (query or header key), or no keys configured.
    Done,
    /// First-message auth: the validator says whether a presented key is good.
    FirstFrame(Arc<dyn Fn(&str) -> bool + Send + Sync>),
}

/// What the proxy needs to know of one pair.
#[derive(Clone)]
pub struct PairSpec {
    pub kind: SocketKind,
    pub conversation: ConversationId,
    /// The client's query pairs, its `session_api_key` removed.
    pub query: Vec<(String, String)>,
    pub auth: ClientAuth,
}

/// Why no downstream endpoint can be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The conversation does not exist (close 4004).
    #[error("Conversation not found")]
    NotFound,
    /// Not available now (retry).
    #[error("{0}")]
    Unavailable(String),
}

/// Where the conversation's downstream is. Implemented by the aggregator over its catalog
/// and provisioner.
#[async_trait]
pub trait Upstream: Send + Sync + 'static {
    /// The downstream's endpoint once it is ready, waiting at most `timeout` (and starting it
    /// if its provisioner can).
    async fn endpoint(&self, timeout: Duration) -> Result<Arc<Endpoint>, UpstreamError>;

    /// Called after a downstream socket was lost (for metrics / health checks).
    fn on_lost(&self) {}

    /// Called when a lost downstream socket was re-established, `after` the loss.
    fn on_resumed(&self, _after: Duration) {}

    /// Called when the client is dropped as a slow consumer (its pending bytes passed
    /// `max_pending_bytes`).
    fn on_slow_consumer(&self) {}

    /// Called with each `ConversationStateUpdateEvent` the downstream sends (execution
    /// status, title, stats, …), just before the client gets it: whoever keeps a catalog of
    /// conversations learns a run finished no later than the client does.
    fn on_state_update(&self, _event: &serde_json::Value) {}
}

type DownSocket = WebSocketStream<DeflateStream<TcpStream>>;

/// Why a dial failed.
#[derive(Debug)]
enum DialError {
    NotFound,
    Retry(String),
}

/// The cursor of a socket kind that can resume.
enum Cursor {
    Events(EventsCursor),
    Session(SessionCursor),
    /// No resume position: a loss ends the pair.
    None,
}

fn close_msg(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.to_owned().into() }))
}

/// Payload bytes of a message (for the pending-bytes bound).
fn msg_len(m: &Message) -> usize {
    match m {
        Message::Text(t) => t.len(),
        Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
        Message::Close(_) | Message::Frame(_) => 16,
    }
}

/// Is a downstream close a loss (reconnect) or deliberate (pass it on)?
fn is_loss(frame: &Option<CloseFrame>) -> bool {
    let Some(f) = frame else { return true };
    let code: u16 = f.code.into();
    match code {
        1001 | 1006 | 1011 | 1012 | 1014 => true,
        // The agent-server drops a lagging subscriber with 1013 "slow_consumer" and expects
        // it to resume with after_seq.
        1013 => f.reason.as_str() == "slow_consumer",
        _ => false,
    }
}

/// Most downstream frames handled per wake-up of the pair before its other events are
/// looked at again.
const DRAIN_BATCH: usize = 32;

/// Data frames after which a downstream connection counts as streaming: more than the
/// first, which every subscription starts with (the `full_state` snapshot, or `sync`).
const STREAMING_AFTER_FRAMES: u32 = 2;

/// A downstream connection up this long ended the outage before it even if it streamed
/// nothing (an idle conversation sends only its first frame): its loss starts a new one,
/// with a new resume deadline. Shorter-lived connections do not: a downstream that accepts
/// and drops every connection is given up on at the deadline of the first loss.
const STABLE_AFTER: Duration = Duration::from_secs(5);

/// Queue towards the client with a byte count ([`crate::outbox`]: holds no buffer while idle).
struct ClientTx(Outbox<Message>);

impl ClientTx {
    fn send(&self, m: Message) -> bool {
        let n = msg_len(&m);
        self.0.send(m, n)
    }
    /// More than `limit` bytes wait behind the message being written: a slow consumer.
    /// (One message larger than the limit alone is not: a fast client reads it.)
    fn over(&self, limit: usize) -> bool {
        self.0.pending() > limit && self.0.backlog() > limit
    }
    fn backlog(&self) -> usize {
        self.0.backlog()
    }
}

/// Drain the queue into the client socket, batching writes before each flush.
async fn client_writer<S>(mut sink: S, mut rx: Inbox<Message>)
where
    S: futures::Sink<Message, Error = WsError> + Unpin,
{
    while let Some(m) = rx.recv().await {
        let mut closing = matches!(m, Message::Close(_));
        let n = msg_len(&m);
        if sink.feed(m).await.is_err() {
            return;
        }
        rx.done(n);
        while !closing {
            let Some(m) = rx.try_recv() else { break };
            closing = matches!(m, Message::Close(_));
            let n = msg_len(&m);
            if sink.feed(m).await.is_err() {
                return;
            }
            rx.done(n);
        }
        if sink.flush().await.is_err() || closing {
            let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
            return;
        }
    }
    // The pair ended without a close of its own: the client closed. Its close frame was
    // read, and the reply tungstenite queued goes out with this (bounded).
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}

/// The close code a client gets when the proxy shuts down: 1012 "service restart", which
/// the SDK and the frontend treat as retryable.
pub const SHUTDOWN_CLOSE: u16 = 1012;

/// A future that completes when the proxy shuts down.
pub type Shutdown = futures::future::BoxFuture<'static, ()>;

/// Run one pair to its end. Never panics; every wait is bounded.
pub async fn bridge<C>(client: WebSocketStream<C>, spec: PairSpec, upstream: Arc<dyn Upstream>, cfg: Arc<ProxyConfig>)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    bridge_until(client, spec, upstream, cfg, std::future::pending().boxed()).await
}

/// [`bridge`], ended when `shutdown` completes: the client is closed with
/// [`SHUTDOWN_CLOSE`] (whatever the pair was doing: authenticating, dialing, resuming or
/// pumping) and the downstream socket with a normal close.
pub async fn bridge_until<C>(
    mut client: WebSocketStream<C>,
    spec: PairSpec,
    upstream: Arc<dyn Upstream>,
    cfg: Arc<ProxyConfig>,
    shutdown: Shutdown,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut shutdown = shutdown.fuse();
    // 1. First-message auth.
    if let ClientAuth::FirstFrame(check) = &spec.auth {
        let auth = tokio::time::timeout(cfg.auth_timeout, async {
            loop {
                match client.next().await {
                    Some(Ok(Message::Text(t))) => {
                        return classify::first_frame_auth_key(&t).is_some_and(|k| check(&k));
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    _ => return false,
                }
            }
        });
        let ok = tokio::select! {
            r = auth => r.unwrap_or(false),
            _ = &mut shutdown => {
                let _ = tokio::time::timeout(Duration::from_secs(1), client.send(close_msg(SHUTDOWN_CLOSE, "service restart"))).await;
                return;
            }
        };
        if !ok {
            tracing::debug!(conversation = %spec.conversation, "client failed first-message auth");
            let _ = tokio::time::timeout(Duration::from_secs(1), client.send(close_msg(4001, "Authentication failed"))).await;
            return;
        }
    }

    let (sink, mut client_rx) = client.split();
    let (tx, rx) = outbox();
    let to_client = ClientTx(tx);
    let writer = tokio::spawn(client_writer(sink, rx));
    let writer_abort = writer.abort_handle();
    // Fused: once the pair saw the writer end, polling it again must not panic
    // ("JoinHandle polled after completion").
    let mut writer = writer.fuse();

    let mut pair = Pair::new(spec, upstream, cfg, to_client);
    pair.run(&mut client_rx, &mut writer, &writer_abort, &mut shutdown).await;
    // The queue's sender goes with the pair: the writer sees the end of the queue.
    drop(pair);
    drop(client_rx);
    // Let the writer flush what is queued (a close frame at least), bounded.
    if !writer.is_terminated() && tokio::time::timeout(Duration::from_secs(2), &mut writer).await.is_err() {
        writer_abort.abort();
    }
}

struct Pair {
    spec: PairSpec,
    upstream: Arc<dyn Upstream>,
    cfg: Arc<ProxyConfig>,
    to_client: ClientTx,
    cursor: Cursor,
    /// Client frames waiting for a downstream.
    held: VecDeque<Message>,
    held_bytes: usize,
    /// Set while reconnecting, and until a new connection proved itself (it streamed, or
    /// stayed up [`STABLE_AFTER`]): when the loss happened. The resume deadline counts from it.
    lost_at: Option<Instant>,
    /// The outage's first reconnection was reported (log, `on_resumed`).
    resume_reported: bool,
    /// When the current downstream connection was made.
    connected_at: Option<Instant>,
    connected_once: bool,
    /// Data frames the current downstream connection delivered. One that streamed
    /// ([`STREAMING_AFTER_FRAMES`]) starts the backoff over, and losing it redials at once. Any other loss backs off, so a
    /// downstream that accepts and drops at once (or right after the first frame) is never
    /// redialed in a tight loop.
    data_frames: u32,
}

enum Step {
    Continue,
    End,
}

impl Pair {
    fn new(spec: PairSpec, upstream: Arc<dyn Upstream>, cfg: Arc<ProxyConfig>, to_client: ClientTx) -> Self {
        let q = |k: &str| spec.query.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let cursor = match spec.kind {
            SocketKind::Events => {
                let history = match (q("resend_mode").as_deref(), q("resend_all").as_deref()) {
                    (Some("all"), _) => History::All,
                    (Some("since"), _) => q("after_timestamp").map(History::Since).unwrap_or(History::None),
                    (_, Some(v)) if v.eq_ignore_ascii_case("true") || v == "1" => History::All,
                    _ => History::None,
                };
                Cursor::Events(EventsCursor::new(history))
            }
            SocketKind::Session => Cursor::Session(SessionCursor::new(q("after_seq").and_then(|s| s.parse().ok()))),
            SocketKind::BashEvents => Cursor::None,
        };
        Self { spec, upstream, cfg, to_client, cursor, held: VecDeque::new(), held_bytes: 0, lost_at: None, resume_reported: false, connected_at: None, connected_once: false, data_frames: 0 }
    }

    /// The query for the next dial: the client's own until anything was forwarded to the
    /// client (a connection lost before its first frame left the client with nothing, so
    /// its own request is still exact); the resume position after.
    fn dial_query(&self) -> Vec<(String, String)> {
        let forwarded = match &self.cursor {
            Cursor::Events(c) => c.forwarded(),
            Cursor::Session(c) => c.forwarded(),
            Cursor::None => false,
        };
        if !self.connected_once || !forwarded {
            return self.spec.query.clone();
        }
        let drop_keys: &[&str] = match self.spec.kind {
            SocketKind::Events => &["resend_mode", "resend_all", "after_timestamp"],
            SocketKind::Session => &["after_seq"],
            SocketKind::BashEvents => &[],
        };
        let mut q: Vec<(String, String)> =
            self.spec.query.iter().filter(|(k, _)| !drop_keys.contains(&k.as_str())).cloned().collect();
        match &self.cursor {
            Cursor::Events(c) => match c.resume_history() {
                History::All => q.push(("resend_mode".into(), "all".into())),
                History::Since(t) => {
                    q.push(("resend_mode".into(), "since".into()));
                    q.push(("after_timestamp".into(), t));
                }
                History::None => {}
            },
            Cursor::Session(c) => q.push(("after_seq".into(), c.resume_after_seq().to_string())),
            Cursor::None => {}
        }
        q
    }

    /// A dial attempt: wait for the endpoint (bounded), then connect (bounded).
    fn dial(&self, wait: Duration, delay: Duration) -> BoxFuture<'static, Result<DownSocket, DialError>> {
        let upstream = self.upstream.clone();
        let path = self.spec.kind.path(&self.spec.conversation);
        let query = self.dial_query();
        let cfg = self.cfg.clone();
        let conv = self.spec.conversation;
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let ep = match upstream.endpoint(wait).await {
                Ok(ep) => ep,
                Err(UpstreamError::NotFound) => return Err(DialError::NotFound),
                Err(UpstreamError::Unavailable(m)) => return Err(DialError::Retry(m)),
            };
            let mut url = format!("{}{}", ep.ws_origin(), path);
            if !query.is_empty() {
                url.push('?');
                url.push_str(&form_urlencoded::Serializer::new(String::new()).extend_pairs(&query).finish());
            }
            let mut req = url.into_client_request().map_err(|e| DialError::Retry(format!("bad downstream URL: {e}")))?;
            if let Some(k) = ep.key_header() {
                req.headers_mut().insert(nestor_core::SESSION_KEY_HEADER, k.clone());
            }
            let offer = cfg.downstream_permessage_deflate;
            if offer {
                req.headers_mut().insert(http::header::SEC_WEBSOCKET_EXTENSIONS, http::HeaderValue::from_static(deflate::negotiate::CLIENT_OFFER));
            }
            let host = req.uri().host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = req.uri().port_u16().unwrap_or(80);
            let connect = async {
                let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(WsError::Io)?;
                let _ = tcp.set_nodelay(true);
                let io = if offer { DeflateStream::client_sniffing(tcp, cfg.max_downstream_frame) } else { DeflateStream::client_declining(tcp) };
                tokio_tungstenite::client_async_with_config(req, io, Some(cfg.downstream_ws_config())).await
            };
            match tokio::time::timeout(cfg.dial_timeout, connect).await {
                Ok(Ok((ws, resp))) => {
                    let answer = resp.headers().get_all(http::header::SEC_WEBSOCKET_EXTENSIONS).iter().map(|v| v.to_str().unwrap_or("\u{fffd}")).collect::<Vec<_>>();
                    // RFC 6455 §4.1: an extension the client did not offer, or an answer
                    // outside RFC 7692, fails the connection.
                    let verdict = if offer {
                        deflate::negotiate::parse_answer(answer.iter().copied())
                    } else if answer.iter().any(|v| !v.trim().is_empty()) {
                        Err(deflate::negotiate::NegotiateError::NotOffered(answer.join(", ")))
                    } else {
                        Ok(None)
                    };
                    match verdict {
                        Ok(params) if params.is_some() == ws.get_ref().is_active() => {
                            match params {
                                Some(p) => tracing::debug!(conversation = %conv, answer = %answer.join(", "), "downstream socket: permessage-deflate negotiated ({p:?})"),
                                None if offer => tracing::debug!(conversation = %conv, "downstream socket: permessage-deflate declined by the downstream"),
                                None => {}
                            }
                            Ok(without_handshake_buffer(ws, &cfg).await)
                        }
                        Ok(_) => Err(DialError::Retry("the downstream's permessage-deflate answer could not be applied".into())),
                        Err(e) => Err(DialError::Retry(format!("the downstream's Sec-WebSocket-Extensions answer is refused: {e}"))),
                    }
                }
                Ok(Err(WsError::Http(resp))) if resp.status() == http::StatusCode::NOT_FOUND => Err(DialError::NotFound),
                Ok(Err(e)) => Err(DialError::Retry(describe_ws_error(&e))),
                Err(_) => Err(DialError::Retry("the agent-server's socket did not answer in time".into())),
            }
        }
        .boxed()
    }

    /// Close the client with `code`.
    fn close_client(&self, code: u16, reason: &str) {
        self.to_client.send(close_msg(code, reason));
    }

    async fn run<R>(
        &mut self,
        client_rx: &mut R,
        writer: &mut futures::future::Fuse<tokio::task::JoinHandle<()>>,
        writer_abort: &tokio::task::AbortHandle,
        shutdown: &mut futures::future::Fuse<Shutdown>,
    )
    where
        R: futures::Stream<Item = Result<Message, WsError>> + Unpin,
    {
        let conv = self.spec.conversation;
        let mut down: Option<DownSocket> = None;
        let mut dialing: Option<BoxFuture<'static, Result<DownSocket, DialError>>> = Some(self.dial(self.cfg.ready_timeout, Duration::ZERO));
        let mut dial_deadline = Instant::now() + self.cfg.ready_timeout;
        let mut backoff = self.cfg.initial_backoff;
        let mut ping = tokio::time::interval_at(Instant::now() + self.cfg.ping_interval, self.cfg.ping_interval);
        let mut client_seen = Instant::now();
        let mut down_seen = Instant::now();

        loop {
            let step = tokio::select! {
                biased;
                _ = &mut *writer => {
                    // The client's socket failed under the writer.
                    Step::End
                }
                _ = &mut *shutdown => {
                    tracing::debug!(conversation = %conv, "shutting down; closing the client with {SHUTDOWN_CLOSE}");
                    self.close_client(SHUTDOWN_CLOSE, "service restart");
                    Step::End
                }
                m = client_rx.next() => {
                    client_seen = Instant::now();
                    self.on_client(m, &mut down).await
                }
                m = next_frame(&mut down), if down.is_some() => {
                    down_seen = Instant::now();
                    let mut step = self.after_downstream_frame(m, &mut down, &mut dialing, &mut dial_deadline, &mut backoff);
                    // Frames already read need no trip through the select (fewer polls of
                    // the other branches per frame on a busy stream); a bounded batch, and
                    // never past the slow-consumer limit (checked below).
                    for _ in 1..DRAIN_BATCH {
                        if !matches!(step, Step::Continue) || self.to_client.over(self.cfg.max_pending_bytes) {
                            break;
                        }
                        let Some(d) = down.as_mut() else { break };
                        let Poll::Ready(m) = std::future::poll_fn(|cx| Poll::Ready(d.poll_next_unpin(cx))).await else { break };
                        step = self.after_downstream_frame(m, &mut down, &mut dialing, &mut dial_deadline, &mut backoff);
                    }
                    step
                }
                r = poll_opt(&mut dialing), if dialing.is_some() => {
                    dialing = None;
                    match r {
                        Ok(ws) => {
                            down = Some(ws);
                            down_seen = Instant::now();
                            // The backoff starts over once this connection streams, not
                            // before (`data_frames`).
                            self.data_frames = 0;
                            self.connected_at = Some(Instant::now());
                            match self.lost_at {
                                Some(t) if !self.resume_reported => {
                                    self.resume_reported = true;
                                    tracing::info!(conversation = %conv, after_ms = t.elapsed().as_millis() as u64, "downstream socket resumed");
                                    self.upstream.on_resumed(t.elapsed());
                                }
                                Some(t) => tracing::debug!(conversation = %conv, after_ms = t.elapsed().as_millis() as u64, "downstream socket reconnected"),
                                None => {}
                            }
                            self.connected_once = true;
                            if let Cursor::Events(c) = &mut self.cursor {
                                c.on_connected();
                            }
                            if self.flush_held(&mut down).await { Step::Continue } else {
                                self.lost("downstream socket lost (held client frames could not be sent)", &mut down, &mut dialing, &mut dial_deadline, &mut backoff)
                            }
                        }
                        Err(DialError::NotFound) => {
                            self.close_client(4004, "Conversation not found");
                            Step::End
                        }
                        Err(DialError::Retry(why)) => {
                            if Instant::now() >= dial_deadline {
                                tracing::warn!(conversation = %conv, "giving up on the downstream socket: {why}");
                                if self.connected_once {
                                    self.close_client(1012, "downstream unavailable");
                                } else {
                                    self.close_client(1013, "downstream unavailable");
                                }
                                Step::End
                            } else {
                                tracing::debug!(conversation = %conv, "dial failed ({why}); retrying in {backoff:?}");
                                let left = dial_deadline.saturating_duration_since(Instant::now());
                                dialing = Some(self.dial(left.min(Duration::from_secs(5)), backoff.min(left)));
                                backoff = (backoff * 2).min(self.cfg.max_backoff);
                                Step::Continue
                            }
                        }
                    }
                }
                _ = ping.tick() => {
                    let silent = self.cfg.ping_interval * 2;
                    if client_seen.elapsed() > silent {
                        tracing::info!(conversation = %conv, "client silent for {silent:?}; closing");
                        Step::End
                    } else {
                        self.to_client.send(Message::Ping(Default::default()));
                        let gone = match down.as_mut() {
                            Some(_) if down_seen.elapsed() > silent + self.cfg.ping_interval => Some("downstream silent"),
                            Some(d) => tokio::time::timeout(Duration::from_secs(5), d.send(Message::Ping(Default::default())))
                                .await
                                .is_err()
                                .then_some("downstream ping not sent in time"),
                            None => None,
                        };
                        match gone {
                            Some(why) => self.lost(why, &mut down, &mut dialing, &mut dial_deadline, &mut backoff),
                            None => Step::Continue,
                        }
                    }
                }
            };
            if self.to_client.over(self.cfg.max_pending_bytes) {
                tracing::warn!(conversation = %conv, waiting = self.to_client.backlog(), "client is a slow consumer; dropping it");
                self.upstream.on_slow_consumer();
                writer_abort.abort();
                if let Some(mut d) = down.take() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), d.close(None)).await;
                }
                return;
            }
            let step = match step {
                // The downstream was dropped where no loss handling ran (a client frame
                // could not be written to it): without this the pair would wait forever with
                // no downstream and no dial.
                Step::Continue if down.is_none() && dialing.is_none() => {
                    self.lost("downstream socket lost (write failed)", &mut down, &mut dialing, &mut dial_deadline, &mut backoff)
                }
                other => other,
            };
            if let Step::End = step {
                if let Some(mut d) = down.take() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), d.close(None)).await;
                }
                return;
            }
        }
    }

    /// Handle one downstream frame (or its loss): forward it, end the pair, or start
    /// resuming.
    fn after_downstream_frame(
        &mut self,
        m: Option<Result<Message, WsError>>,
        down: &mut Option<DownSocket>,
        dialing: &mut Option<BoxFuture<'static, Result<DownSocket, DialError>>>,
        deadline: &mut Instant,
        backoff: &mut Duration,
    ) -> Step {
        if matches!(m, Some(Ok(Message::Text(_) | Message::Binary(_)))) {
            self.data_frames = self.data_frames.saturating_add(1);
            if self.data_frames == STREAMING_AFTER_FRAMES {
                *backoff = self.cfg.initial_backoff;
                // Streaming again: the outage is over.
                self.lost_at = None;
            }
        }
        match self.on_downstream(m) {
            DownStep::Continue => Step::Continue,
            DownStep::End => Step::End,
            DownStep::Lost(why) => self.lost(&format!("downstream socket lost ({why})"), down, dialing, deadline, backoff),
        }
    }

    /// The downstream connection is gone (`why`, for the log): every loss comes here. The
    /// pair reconnects; or, `End`, the client is closed with 1012 when the socket cannot
    /// resume (it has no position: bash-events) or the outage is past its resume deadline.
    fn lost(
        &mut self,
        why: &str,
        down: &mut Option<DownSocket>,
        dialing: &mut Option<BoxFuture<'static, Result<DownSocket, DialError>>>,
        deadline: &mut Instant,
        backoff: &mut Duration,
    ) -> Step {
        *down = None;
        let conv = self.spec.conversation;
        if matches!(self.cursor, Cursor::None) {
            tracing::info!(conversation = %conv, "{why}; this socket cannot resume");
            self.close_client(1012, "downstream unavailable");
            return Step::End;
        }
        tracing::info!(conversation = %conv, "{why}; resuming");
        self.upstream.on_lost();
        let now = Instant::now();
        let proved = self.connected_at.take().is_some_and(|t| now.duration_since(t) >= STABLE_AFTER);
        if self.lost_at.is_none() || proved {
            self.lost_at = Some(now);
            self.resume_reported = false;
            *deadline = now + self.cfg.resume_deadline;
        } else if now >= *deadline {
            // Every connection since the loss was dropped at once (e.g. closed with 1011
            // right after the handshake): as unreachable as a refused one.
            tracing::warn!(conversation = %conv, "giving up on the downstream socket: no connection held since the loss");
            self.close_client(1012, "downstream unavailable");
            return Step::End;
        }
        if let Cursor::Session(c) = &mut self.cursor {
            for f in c.abort_open_items() {
                self.to_client.send(Message::Text(f.into()));
            }
        }
        if dialing.is_none() {
            // After losing a connection that streamed, the first redial goes at once (a
            // restarted downstream is often back within a millisecond) and the retry after it
            // waits `initial_backoff`; later ones back off.
            if std::mem::replace(&mut self.data_frames, 0) >= STREAMING_AFTER_FRAMES {
                *dialing = Some(self.dial(Duration::from_secs(5), Duration::ZERO));
            } else {
                *dialing = Some(self.dial(Duration::from_secs(5), *backoff));
                *backoff = (*backoff * 2).min(self.cfg.max_backoff);
            }
        }
        Step::Continue
    }

    /// Send held client frames to a fresh downstream. False if the downstream failed.
    async fn flush_held(&mut self, down: &mut Option<DownSocket>) -> bool {
        let Some(d) = down.as_mut() else { return false };
        while let Some(m) = self.held.pop_front() {
            self.held_bytes -= msg_len(&m);
            if tokio::time::timeout(self.cfg.dial_timeout, d.send(m.clone())).await.map(|r| r.is_err()).unwrap_or(true) {
                self.held.push_front(m.clone());
                self.held_bytes += msg_len(&m);
                return false;
            }
        }
        true
    }

    async fn on_client(&mut self, m: Option<Result<Message, WsError>>, down: &mut Option<DownSocket>) -> Step {
        let conv = self.spec.conversation;
        let m = match m {
            Some(Ok(m)) => m,
            Some(Err(WsError::Capacity(_))) => {
                self.close_client(1013, "frame_too_large");
                return Step::End;
            }
            // A compressed message refused by the deflate adapter (crate::deflate).
            Some(Err(WsError::Io(e))) if deflate::codec_error(&e).is_some() => {
                let (code, reason) = match deflate::codec_error(&e) {
                    Some(CodecError::TooBig { .. }) => (1009, "message too big"),
                    _ => (1007, "invalid compressed data"),
                };
                tracing::debug!(conversation = %conv, "client socket: {e}");
                self.close_client(code, reason);
                return Step::End;
            }
            Some(Err(e)) => {
                tracing::debug!(conversation = %conv, "client socket error: {e}");
                return Step::End;
            }
            None => return Step::End,
        };
        match m {
            Message::Text(ref t) if classify::client_auth_frame(t).is_some() => Step::Continue,
            Message::Text(_) | Message::Binary(_) => {
                if let Some(d) = down.as_mut() {
                    match tokio::time::timeout(self.cfg.dial_timeout, d.send(m.clone())).await {
                        Ok(Ok(())) => return Step::Continue,
                        _ => {
                            // Keep it for the next connection.
                            *down = None;
                        }
                    }
                }
                if self.held.len() >= self.cfg.max_buffered_client_frames
                    || self.held_bytes + msg_len(&m) > self.cfg.max_buffered_client_bytes
                {
                    tracing::warn!(conversation = %conv, "too many client frames while the downstream is away");
                    self.close_client(1013, "downstream unavailable");
                    return Step::End;
                }
                self.held_bytes += msg_len(&m);
                self.held.push_back(m);
                Step::Continue
            }
            Message::Close(frame) => {
                if let Some(d) = down.as_mut() {
                    let frame = frame.map(|f| {
                        let code: u16 = f.code.into();
                        if matches!(code, 1005 | 1006 | 1015) {
                            CloseFrame { code: CloseCode::Normal, reason: f.reason }
                        } else {
                            f
                        }
                    });
                    let _ = tokio::time::timeout(Duration::from_secs(1), d.close(frame)).await;
                }
                *down = None;
                Step::End
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Step::Continue,
        }
    }

    /// Hand a state-update event (the frame itself on the events socket, its `event` on the
    /// session socket) to the upstream's hook. Only frames that mention the kind get here.
    fn report_state_update(&self, text: &str) {
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(text) else { return };
        if self.spec.kind == SocketKind::Session {
            v = v.get_mut("event").map(serde_json::Value::take).unwrap_or_default();
        }
        if v.get("kind").and_then(serde_json::Value::as_str) == Some(STATE_UPDATE_KIND) {
            self.upstream.on_state_update(&v);
        }
    }

    fn on_downstream(&mut self, m: Option<Result<Message, WsError>>) -> DownStep {
        let m = match m {
            Some(Ok(m)) => m,
            Some(Err(e)) => return DownStep::Lost(describe_ws_error(&e)),
            None => return DownStep::Lost("connection closed".into()),
        };
        match m {
            Message::Text(t) => {
                // State updates go to the upstream's hook, but not the `full_state` snapshot
                // each subscription starts with (large, and nothing new). The events socket's
                // peek already read the kind; other sockets nest it, so look for the text.
                let (verdict, state_update) = match &mut self.cursor {
                    Cursor::Events(c) => {
                        let head = classify::event_head(&t);
                        (c.on_frame(head.as_ref()), head.is_some_and(|h| h.state_update))
                    }
                    Cursor::Session(c) => {
                        let f = classify::session_frame(&t);
                        let id = if matches!(f, SessionFrame::Durable { .. }) { classify::durable_event_id(&t) } else { None };
                        (c.on_frame(&f, id.as_deref()), mentions_state_update(&t))
                    }
                    Cursor::None => (Verdict::Forward, mentions_state_update(&t)),
                };
                if verdict == Verdict::Forward && state_update {
                    self.report_state_update(&t);
                }
                if verdict == Verdict::Forward && !self.to_client.send(Message::Text(t)) {
                    return DownStep::End;
                }
                DownStep::Continue
            }
            Message::Binary(b) => {
                if !self.to_client.send(Message::Binary(b)) {
                    return DownStep::End;
                }
                DownStep::Continue
            }
            Message::Close(frame) => {
                if is_loss(&frame) {
                    let why = frame.map(|f| format!("closed {} {}", u16::from(f.code), f.reason)).unwrap_or_else(|| "closed".into());
                    return DownStep::Lost(why);
                }
                let (code, reason) = frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1000, String::new()));
                self.close_client(code, &reason);
                DownStep::End
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => DownStep::Continue,
        }
    }
}

/// Might this (session or bash socket) frame carry a state update other than the snapshot?
fn mentions_state_update(text: &str) -> bool {
    text.contains(STATE_UPDATE_KIND) && !text.contains("\"full_state\"")
}

enum DownStep {
    Continue,
    End,
    Lost(String),
}

async fn next_frame(down: &mut Option<DownSocket>) -> Option<Result<Message, WsError>> {
    match down {
        Some(d) => d.next().await,
        None => std::future::pending().await,
    }
}

async fn poll_opt<T>(f: &mut Option<BoxFuture<'static, T>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// The downstream socket rebuilt around its connection, when that loses nothing.
///
/// tungstenite's client handshake reads the answer through a 4 KiB buffer and hands that
/// buffer (whatever it holds) to the socket as its read buffer, so every downstream leg kept
/// 4 KiB for its life instead of the configured `read_buffer_size` (issue 4: 16 KiB per idle
/// pair). The deflate adapter hands tungstenite the answer alone
/// ([`DeflateStream::handed_answer_alone`]; frames after it stay in the adapter), so right
/// after the handshake that buffer holds nothing and a fresh socket (same role and config;
/// no frame was read or written yet) is the same socket with a right-sized buffer.
async fn without_handshake_buffer(ws: DownSocket, cfg: &ProxyConfig) -> DownSocket {
    if !ws.get_ref().handed_answer_alone() {
        return ws;
    }
    WebSocketStream::from_raw_socket(ws.into_inner(), tokio_tungstenite::tungstenite::protocol::Role::Client, Some(cfg.downstream_ws_config())).await
}

/// A WebSocket error in words that name no address or key.
fn describe_ws_error(e: &WsError) -> String {
    match e {
        WsError::Io(io) => match deflate::codec_error(io) {
            Some(c) => c.to_string(),
            None => format!("{}", io.kind()),
        },
        WsError::Http(r) => format!("handshake refused with HTTP {}", r.status()),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "connection closed".into(),
        WsError::Protocol(p) => format!("protocol error: {p}"),
        WsError::Capacity(c) => format!("frame too large: {c}"),
        other => other.to_string().chars().take(120).collect(),
    }
}
