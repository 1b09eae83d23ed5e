//! The fast path: the common conversation request forwarded with the least work a proxy can
//! do, and everything else handed to the router.
//!
//! Why it exists: every client request to a conversation (`GET /api/conversations/{id}`,
//! `…/events/search`, `POST …/events`, …) pays for nestor's hop. Through the general router
//! that hop costs two HTTP codecs, axum's routing and middleware, and the pooled client's
//! hand-off to a separate connection task: ~50 µs of CPU per request against ~20 µs for a
//! plain byte relay (docs/performance.md, "Where nestor's REST time goes"). The fast path
//! reads the request head itself (httparse), and when the request is one the router would
//! only forward, it writes it to a pooled downstream connection from the same task, reads
//! the answer, passes it through the leak guard and writes it back. No request or response
//! objects, no routing tree, no task hand-off.
//!
//! What it takes (all must hold; see [`request::parse`]): HTTP/1.1; a canonical conversation
//! id under `/api/conversations/`; a sub-route the router only forwards (not delete, fork,
//! secrets, runtime, VS Code URL, workspace files, nor agent work when persistence quotas
//! apply); a body of known length up to 64 KiB (and within `max_body_bytes`); no upgrade,
//! no `Expect`, no key in the query; an `X-Session-API-Key` that opens the conversation; a
//! downstream that is running now. Anything else — including a request
//! whose conversation is unknown, whose key is wrong or whose downstream is starting — is
//! **handed off**: the bytes read so far and the connection go to the router (hyper + axum),
//! which answers it and everything after it on that connection exactly as before. The
//! decision is taken before anything is sent, so a hand-off never changes an answer.
//!
//! What it keeps from the router's forward (crate::forward): the downstream's own key
//! replaces the client's; hop-by-hop headers are dropped both ways; the client's `Host` is
//! kept; the answer passes the leak guard (small answers whole with an exact
//! `Content-Length`, larger or unsized ones as they stream, re-chunked); CORS is decided as
//! the router decides it (crate::cors; preflights go to the router); `Vary: Origin` and
//! `Date` are added when the downstream gave none; the request and upstream counters and the
//! latency histogram are the same series; the downstream's activity is counted (idle
//! reaping); upstream errors are the same 502/504 answers.
//!
//! Turn it off with `[http] fast_path = false` (`NESTOR_HTTP__FAST_PATH=false`): every
//! request then goes to the router.

mod body;
mod deadline;
mod request;
mod upstream;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nestor_core::{ApiError, Downstream, Endpoint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::app::AppState;
use crate::auth::Scope;

pub use request::{parse, FastRequest, Parsed, Rules};
pub use upstream::Pool;

pub(crate) use crate::routes::conversations::WORKSPACE_COOKIE;

use body::BodyReader;
use deadline::Deadline;
use upstream::{ExchangeError, Framing, ResponseHead};

/// Answers up to this size are read whole and redacted with an exact `Content-Length`
/// (as crate::forward does).
const BUFFER_LIMIT: u64 = 256 * 1024;

/// Longest a client may take to send the rest of a request it started.
const CLIENT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest one write to the client may block (a client that stops reading).
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Connect timeout of new downstream connections.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What became of one request.
enum Outcome {
    /// Answered; the connection may carry the next request.
    Answered,
    /// Not taken after all (nothing was sent): the router answers it.
    HandOff,
    /// The connection is finished (client gone, `Connection: close`, or an answer cut).
    Close,
}

/// What a connection is served with.
pub struct Serving {
    /// Answers what the fast path does not take.
    pub router: axum::Router,
    /// Idle downstream connections of the event loop this connection is served on.
    pub pool: Arc<Pool>,
    /// Cancelled at shutdown: the connection closes between requests. (On an I/O thread, a
    /// child of `AppState::shutdown` of that thread's own, so waiting for it between requests
    /// shares no lock with other threads.)
    pub stop: tokio_util::sync::CancellationToken,
    /// The I/O thread's activity (crate::io_threads::BusyPoll), when on one.
    pub busy: Option<Arc<crate::io_threads::BusyPoll>>,
    /// When this connection is on an I/O thread (crate::io_threads): the main runtime, where
    /// a hand-off moves it (tracked by `tracker`, so shutdown waits for it there too).
    pub main: Option<(tokio::runtime::Handle, tokio_util::task::TaskTracker)>,
}

/// Serve one client connection: fast-path requests here, the rest (from the first request
/// the fast path does not take) by the router.
pub async fn serve_connection(state: AppState, serving: Serving, mut tcp: TcpStream) {
    let Serving { router, pool, stop, busy, main } = serving;
    let touch = || {
        if let Some(b) = &busy {
            b.touch();
        }
    };
    let mut buf = BytesMut::with_capacity(4096);
    let mut deadline = Deadline::new(state.upstream_timeout);
    if state.cfg.http.fast_path {
        let rules = request::Rules { persistence: state.persistence.is_some(), max_body: state.cfg.max_body_bytes };
        loop {
            // Read until the head at the front of `buf` can be decided.
            let parsed = loop {
                match request::parse(&buf, rules) {
                    Parsed::Partial => {}
                    decided => break decided,
                }
                match read_more(&stop, &mut tcp, &mut buf).await {
                    Some(()) => continue,
                    None => return,
                }
            };
            let mut req = match parsed {
                Parsed::Fast(req) => req,
                _ => break,
            };
            // Shutting down: this one is answered, with `Connection: close`, and no other.
            if stop.is_cancelled() {
                req.keep_alive = false;
            }
            touch();
            let outcome = answer(&state, &pool, &stop, &mut deadline, &mut tcp, &mut buf, req).await;
            touch();
            match outcome {
                Outcome::Answered => continue,
                Outcome::HandOff => break,
                Outcome::Close => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.shutdown()).await;
                    return;
                }
            }
        }
    }
    // The router has its own timeouts: no timer of this connection's stays armed.
    drop(deadline);
    let prefix = buf.freeze();
    let Some((main, tracker)) = main else {
        return hand_off(router, tcp, prefix, stop).await;
    };
    // On the main runtime, wait on the shared token: this thread's child token is for
    // this thread's own connections.
    let stop = state.shutdown.clone();
    // The router, its upgrades and its background work live on the main runtime.
    match tcp.into_std() {
        Ok(tcp) => {
            main.spawn(tracker.track_future(async move {
                match TcpStream::from_std(tcp) {
                    Ok(tcp) => hand_off(router, tcp, prefix, stop).await,
                    Err(e) => tracing::debug!("cannot move a connection to the router: {e}"),
                }
            }));
        }
        Err(e) => tracing::debug!("cannot move a connection to the router: {e}"),
    }
}

/// Read more of a request. `None`: the connection is done (closed by the client, failed,
/// too slow mid-request, or idle at shutdown).
async fn read_more(stop: &tokio_util::sync::CancellationToken, tcp: &mut TcpStream, buf: &mut BytesMut) -> Option<()> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(4096);
    }
    let read = if buf.is_empty() {
        // Between requests: wait as long as the client likes, but not past shutdown. Bytes
        // already there when shutdown comes are read first (a request crossing the signal
        // is answered, with `Connection: close`).
        tokio::select! {
            biased;
            r = tcp.read_buf(buf) => r,
            _ = stop.cancelled() => return None,
        }
    } else {
        tokio::time::timeout(CLIENT_READ_TIMEOUT, tcp.read_buf(buf)).await.ok()?
    };
    match read {
        Ok(n) if n > 0 => Some(()),
        _ => None,
    }
}

/// Give the connection, with the bytes already read from it, to the router, which serves it
/// until the client closes it or nestor shuts down (`stop`).
///
/// Shutdown is hyper's graceful one (in-flight requests finish, then the connection
/// closes), with one difference from hyper-util's `GracefulShutdown`: that one, signalled
/// before the connection was first polled, closes it while it is still reading its first
/// request, and the request already read into `prefix` would go unanswered. Here the
/// connection is polled once first, which reads that request, so shutdown finds it in
/// flight: it is answered, with `Connection: close`.
async fn hand_off(router: axum::Router, tcp: TcpStream, prefix: Bytes, stop: tokio_util::sync::CancellationToken) {
    let io = hyper_util::rt::TokioIo::new(Prefixed { prefix, inner: tcp });
    let service = hyper_util::service::TowerToHyperService::new(router);
    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let ended = match futures::poll!(conn.as_mut()) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => tokio::select! {
            r = conn.as_mut() => r,
            () = stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        },
    };
    if let Err(e) = ended {
        tracing::trace!("client connection ended: {e}");
    }
}

/// The conversation's downstream, when the fast path can use it right now.
fn ready_downstream(state: &AppState, req: &FastRequest) -> Option<(Arc<Downstream>, Arc<Endpoint>)> {
    let who = state.auth.principal_for_key(&req.client_key)?;
    if matches!(who.scope, Scope::Secrets(_) | Scope::Vscode(_)) {
        return None;
    }
    let open = state.auth.is_open();
    let ds = state.catalog.route_if(&req.conversation, |owner| open || who.may_access(&req.conversation, owner))?;
    if !ds.is_ready() {
        return None;
    }
    let ep = ds.endpoint()?;
    (ep.scheme == http::uri::Scheme::HTTP).then_some((ds, ep))
}

/// Answer one fast-path request at the front of `buf`.
async fn answer(
    state: &AppState,
    pool: &Pool,
    stop: &tokio_util::sync::CancellationToken,
    deadline: &mut Deadline,
    tcp: &mut TcpStream,
    buf: &mut BytesMut,
    req: FastRequest,
) -> Outcome {
    let Some((ds, ep)) = ready_downstream(state, &req) else { return Outcome::HandOff };
    // When the request started (metrics), and when the downstream's time starts (the
    // deadline): the same reading unless the body was still arriving.
    let mut clock = tokio::time::Instant::now();
    let started = clock.into_std();
    // The whole body first (it is small): then the request can be sent twice if needed.
    let total = req.head_len + req.body_len;
    if buf.len() < total {
        while buf.len() < total {
            if read_more(stop, tcp, buf).await.is_none() {
                return Outcome::Close;
            }
        }
        clock = tokio::time::Instant::now();
    }
    let raw = buf.split_to(total);
    let _activity = ds.begin_request();
    crate::observability::count_upstream_request();

    // Per request, not per connection: an idle keep-alive connection holds no request
    // buffers (as nginx frees its per-request memory).
    let mut out = Vec::with_capacity(total + 128);
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(ep.base_path.as_bytes());
    out.extend_from_slice(req.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    out.extend_from_slice(&req.headers);
    if let Some(k) = &ep.key {
        out.extend_from_slice(b"x-session-api-key: ");
        out.extend_from_slice(k.expose().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&raw[req.head_len..]);

    let authority = ep.authority.as_str();
    let head_request = req.method == request::Method::Head;
    let mut rbuf = BytesMut::with_capacity(8192);
    let exchange = async {
        let mut conn = pool.get(authority, CONNECT_TIMEOUT).await.map_err(ExchangeError::Io)?;
        match upstream::exchange(&mut conn.stream, &out, &mut rbuf, head_request).await {
            Err(ExchangeError::ClosedBeforeAnswer) if conn.reused => {
                // A pooled connection the downstream had closed: once more on a new one.
                tracing::debug!(downstream = %ds.id(), "pooled connection was closed; sending again");
                let mut stream = upstream::connect(authority, CONNECT_TIMEOUT).await.map_err(ExchangeError::Io)?;
                let head = upstream::exchange(&mut stream, &out, &mut rbuf, head_request).await?;
                Ok((stream, head))
            }
            r => r.map(|head| (conn.stream, head)),
        }
    };
    let exchanged = tokio::select! {
        biased;
        r = exchange => Ok(r),
        () = deadline.arm(clock) => Err(()),
    };
    let who = || format!("conversation {}'s agent-server", req.conversation);
    let (mut up, head) = match exchanged {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            let why = match e {
                ExchangeError::ClosedBeforeAnswer => "connection closed before a complete answer".to_owned(),
                ExchangeError::Io(e) => nestor_core::client::describe_io(&e),
                ExchangeError::Protocol(p) => p.to_owned(),
            };
            tracing::warn!(downstream = %ds.id(), conversation = %req.conversation, "upstream error: {why}");
            let e = ApiError::BadGateway(format!("{} is unreachable: {why}", who()));
            return respond_error(tcp, &req, cors_of(state, &req).as_ref(), e, started).await;
        }
        Err(_) => {
            let e = ApiError::GatewayTimeout(format!("the agent-server did not answer within {:?}", state.upstream_timeout));
            return respond_error(tcp, &req, cors_of(state, &req).as_ref(), e, started).await;
        }
    };
    let redactor = ep.redactor(req.origin.as_deref());
    let status = head.status;
    let cors = cors_of(state, &req);
    let mut reader = BodyReader::new(head.framing, state.upstream_timeout);
    let small = matches!(head.framing, Framing::None) || matches!(head.framing, Framing::Length(n) if n <= BUFFER_LIMIT);
    let outcome = if small {
        // Whole, redacted, with its exact length. (Usually one piece, taken as it is.)
        let mut first: Option<Bytes> = None;
        let mut more = BytesMut::new();
        loop {
            match reader.next(&mut up, &mut rbuf).await {
                Ok(Some(piece)) if first.is_none() => first = Some(piece),
                Ok(Some(piece)) => {
                    if more.is_empty() {
                        more.extend_from_slice(first.as_deref().unwrap_or_default());
                    }
                    more.extend_from_slice(&piece);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(downstream = %ds.id(), conversation = %req.conversation, "{e}");
                    let e = ApiError::BadGateway(format!("the agent-server's answer could not be read: {e}"));
                    return respond_error(tcp, &req, cors_of(state, &req).as_ref(), e, started).await;
                }
            }
        }
        let whole = if more.is_empty() { first.unwrap_or_default() } else { more.freeze() };
        let body = redactor.apply(&whole);
        let wire = response_head(&head, &redactor, &req, cors.as_ref(), Some(body.len()));
        if write_client_parts(tcp, &wire, &body).await.is_err() {
            Outcome::Close
        } else if req.keep_alive {
            Outcome::Answered
        } else {
            Outcome::Close
        }
    } else {
        stream_body(tcp, &mut up, &mut rbuf, &mut reader, response_head(&head, &redactor, &req, cors.as_ref(), None), &redactor, &req).await
    };
    record(&req, status, started);
    // The downstream connection serves the next request only if this answer ended cleanly.
    if head.keep_alive && reader.is_done() && rbuf.is_empty() {
        pool.put(authority, up);
    }
    outcome
}

/// 1xx, 204 and 304 answers carry no body and no length.
fn has_no_body(status: u16) -> bool {
    (100..200).contains(&status) || status == 204 || status == 304
}

/// Stream a large or unsized answer to the client, chunked, through the leak guard, after
/// its head `wire` (built by [`response_head`] without a length).
async fn stream_body(
    tcp: &mut TcpStream,
    up: &mut TcpStream,
    rbuf: &mut BytesMut,
    reader: &mut BodyReader,
    wire: Vec<u8>,
    redactor: &nestor_core::leak_guard::Redactor,
    req: &FastRequest,
) -> Outcome {
    if write_client(tcp, &wire).await.is_err() {
        return Outcome::Close;
    }
    let mut carry = BytesMut::new();
    loop {
        let (piece, last) = match reader.next(up, rbuf).await {
            Ok(Some(p)) => (p, false),
            Ok(None) => (Bytes::new(), true),
            Err(e) => {
                // The head is out: all that can be done is to cut the answer.
                tracing::warn!(conversation = %req.conversation, "{e}; cutting the answer");
                return Outcome::Close;
            }
        };
        let data = redactor.process_chunk(&mut carry, piece, last);
        let mut frame = Vec::with_capacity(data.len() + 16);
        if !data.is_empty() {
            frame.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            frame.extend_from_slice(&data);
            frame.extend_from_slice(b"\r\n");
        }
        if last {
            frame.extend_from_slice(b"0\r\n\r\n");
        }
        if !frame.is_empty() && write_client(tcp, &frame).await.is_err() {
            return Outcome::Close;
        }
        if last {
            return if req.keep_alive { Outcome::Answered } else { Outcome::Close };
        }
    }
}

/// The CORS decision for a request with an `Origin` (crate::cors, as the router decides).
struct Cors {
    origin: String,
    allowed: bool,
}

fn cors_of(state: &AppState, req: &FastRequest) -> Option<Cors> {
    let origin = req.cors_origin.clone()?;
    let allowed = crate::cors::allowed_for(&state.cors, &req.target[..req.path_len], &origin);
    Some(Cors { origin, allowed })
}

/// What the router's edge adds to every answer: the CORS headers when the request had an
/// `Origin` (nestor's decision replaces the downstream's), and `Vary: Origin` (crate::cors,
/// routes::compat). `vary`: the answer has a `Vary`; `vary_origin`: one naming `Origin`.
fn edge_headers(w: &mut Vec<u8>, cors: Option<&Cors>, vary: bool, vary_origin: bool) {
    match cors {
        Some(c) => {
            w.extend_from_slice(b"access-control-allow-credentials: true\r\n");
            if c.allowed {
                w.extend_from_slice(b"access-control-allow-origin: ");
                w.extend_from_slice(c.origin.as_bytes());
                w.extend_from_slice(b"\r\n");
            }
            if !vary_origin {
                w.extend_from_slice(b"vary: Origin\r\n");
            }
        }
        None if !vary => w.extend_from_slice(b"vary: Origin\r\n"),
        None => {}
    }
}

/// The client's answer head. `length`: the exact body length (else chunked). Answers to
/// `HEAD` keep the downstream's length; 1xx/204/304 have none.
fn response_head(head: &ResponseHead, redactor: &nestor_core::leak_guard::Redactor, req: &FastRequest, cors: Option<&Cors>, length: Option<usize>) -> Vec<u8> {
    let mut w = Vec::with_capacity(512);
    w.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(&mut w, head.status as usize);
    w.push(b' ');
    w.extend_from_slice(head.reason());
    w.extend_from_slice(b"\r\n");
    let (mut vary, mut vary_origin, mut date) = (false, false, false);
    let head_request = req.method == request::Method::Head;
    for (name, value) in head.headers() {
        if cors.is_some() && (name.eq_ignore_ascii_case(b"access-control-allow-origin") || name.eq_ignore_ascii_case(b"access-control-allow-credentials")) {
            continue;
        }
        if name.eq_ignore_ascii_case(b"vary") {
            vary = true;
            vary_origin |= memchr::memmem::find(value, b"Origin").is_some();
        }
        date |= name.eq_ignore_ascii_case(b"date");
        w.extend_from_slice(name);
        w.extend_from_slice(b": ");
        w.extend_from_slice(&redactor.apply(value));
        w.extend_from_slice(b"\r\n");
    }
    edge_headers(&mut w, cors, vary, vary_origin);
    if !date {
        w.extend_from_slice(b"date: ");
        w.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
        w.extend_from_slice(b"\r\n");
    }
    if !(head_request || has_no_body(head.status)) {
        match length {
            Some(n) => {
                w.extend_from_slice(b"content-length: ");
                push_decimal(&mut w, n);
                w.extend_from_slice(b"\r\n");
            }
            None => w.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
    }
    if !req.keep_alive {
        w.extend_from_slice(b"connection: close\r\n");
    }
    w.extend_from_slice(b"\r\n");
    w
}

/// Append `n` in decimal (no formatting machinery, no allocation).
fn push_decimal(w: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    w.extend_from_slice(&digits[i..]);
}

/// Answer with an error in the agent-server's shape.
async fn respond_error(tcp: &mut TcpStream, req: &FastRequest, cors: Option<&Cors>, e: ApiError, started: Instant) -> Outcome {
    let resp = e.to_http::<Bytes>();
    let body = resp.body();
    let mut w = Vec::with_capacity(256 + body.len());
    w.extend_from_slice(format!("HTTP/1.1 {}\r\n", resp.status()).as_bytes());
    for (name, value) in resp.headers() {
        w.extend_from_slice(name.as_str().as_bytes());
        w.extend_from_slice(b": ");
        w.extend_from_slice(value.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
    w.extend_from_slice(format!("content-length: {}\r\ndate: {}\r\n", body.len(), httpdate::fmt_http_date(std::time::SystemTime::now())).as_bytes());
    edge_headers(&mut w, cors, false, false);
    if !req.keep_alive {
        w.extend_from_slice(b"connection: close\r\n");
    }
    w.extend_from_slice(b"\r\n");
    w.extend_from_slice(body);
    record(req, resp.status().as_u16(), started);
    match write_client(tcp, &w).await {
        Ok(()) if req.keep_alive => Outcome::Answered,
        _ => Outcome::Close,
    }
}

async fn write_client(tcp: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    write_client_parts(tcp, data, &[]).await
}

/// Write `head` then `body` to the client, in one system call when the socket takes both
/// (a gathered write: no copy of the body behind the head).
async fn write_client_parts(tcp: &mut TcpStream, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let write = async {
        let (mut head, mut body) = (head, body);
        while !(head.is_empty() && body.is_empty()) {
            let n = tcp.write_vectored(&[std::io::IoSlice::new(head), std::io::IoSlice::new(body)]).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
            }
            let from_head = n.min(head.len());
            head = &head[from_head..];
            body = &body[n - from_head..];
        }
        Ok(())
    };
    match tokio::time::timeout(CLIENT_WRITE_TIMEOUT, write).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "client stopped reading")),
    }
}

/// The request counter and latency histogram (the router's series, class `conversation`).
fn record(req: &FastRequest, status: u16, started: Instant) {
    crate::observability::count_request("conversation", req.method.as_str(), status, started);
}

/// A connection whose first bytes were already read: they are read again first.
struct Prefixed {
    prefix: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            let head = self.prefix.split_to(n);
            out.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::push_decimal;

    #[test]
    fn writes_decimals() {
        for n in [0usize, 7, 10, 200, 404, 2954, usize::MAX] {
            let mut w = b"x".to_vec();
            push_decimal(&mut w, n);
            assert_eq!(w, format!("x{n}").into_bytes());
        }
    }
}
