//! `bridge` against hand-made downstreams and client transports, for faults the fake
//! agent-server cannot produce: a downstream that stops reading (nestor's write to it times
//! out), a client whose socket fails for writing while still open for reading.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{SinkExt, StreamExt};
use nestor_core::{ConversationId, Endpoint};
use nestor_ws_proxy::{bridge, ClientAuth, PairSpec, ProxyConfig, SocketKind, Upstream, UpstreamError};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpSocket};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

struct Fixed(Arc<Endpoint>);

#[async_trait]
impl Upstream for Fixed {
    async fn endpoint(&self, _timeout: Duration) -> Result<Arc<Endpoint>, UpstreamError> {
        Ok(self.0.clone())
    }
}

fn sync_frame(through: i64) -> Message {
    Message::Text(format!(r#"{{"type":"sync","through_seq":{through}}}"#).into())
}

/// The downstream listening on loopback `port`.
fn endpoint(port: u16) -> Arc<Endpoint> {
    Arc::new(Endpoint::parse(&format!("http://127.0.0.1:{port}"), None).unwrap())
}

/// A pair of `kind` bridged to `upstream`, with an in-memory client socket: the client's
/// end and the pair's task.
async fn bridged(kind: SocketKind, upstream: Arc<dyn Upstream>, cfg: Arc<ProxyConfig>) -> (WebSocketStream<DuplexStream>, tokio::task::JoinHandle<()>) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let proxy_side = WebSocketStream::from_raw_socket(b, Role::Server, Some(cfg.client_ws_config())).await;
    let client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
    let spec = PairSpec { kind, conversation: ConversationId::new_random(), query: vec![], auth: ClientAuth::Done };
    (client, tokio::spawn(bridge(proxy_side, spec, upstream, cfg)))
}

/// A WebSocket downstream on `listener`: every connection it accepts is upgraded and handed
/// to `on_socket` with its number (from 0), in a task of its own. Returns the port, the count
/// of connections accepted so far, and the accept loop (abort it at the end of the test).
fn ws_downstream<F, Fut>(listener: TcpListener, on_socket: F) -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>)
where
    F: Fn(usize, WebSocketStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let acc = accepted.clone();
    let on_socket = Arc::new(on_socket);
    let server = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let n = acc.fetch_add(1, Ordering::SeqCst);
            let on_socket = on_socket.clone();
            tokio::spawn(async move {
                if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                    on_socket(n, ws).await;
                }
            });
        }
    });
    (port, accepted, server)
}

/// A client frame that cannot be written to the downstream (it stopped reading, the write
/// times out) must not leave the pair without a downstream: nestor redials, delivers the
/// frame to the new connection, and the client goes on receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_times_out_leads_to_a_redial() {
    // The downstream: small receive buffer, so a stalled reader blocks nestor's writes soon.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(16).unwrap();
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (port, accepted, server) = ws_downstream(listener, move |n, mut ws| {
        let got_tx = got_tx.clone();
        async move {
            if ws.send(sync_frame(n as i64)).await.is_err() {
                return;
            }
            if n == 0 {
                // Stall: never read again (keep the socket open).
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Text(t) = m {
                    let _ = got_tx.send(t.to_string());
                    let _ = ws.send(Message::Text(r#"{"type":"transient","event":{"id":"after-redial"}}"#.into())).await;
                }
            }
        }
    });

    let cfg = Arc::new(ProxyConfig { dial_timeout: Duration::from_millis(300), ..ProxyConfig::default() });
    let (mut client, pair) = bridged(SocketKind::Session, Arc::new(Fixed(endpoint(port))), cfg).await;

    let first = tokio::time::timeout(Duration::from_secs(5), client.next()).await.unwrap().unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("sync"), "{first:?}");
    // Big user frames until one cannot be written to the stalled downstream (a send that
    // blocks: nestor stopped reading the client while its write waited). Then stop, so
    // what nestor holds for the next connection stays under its bound.
    let big = format!(r#"{{"role":"user","content":[{{"type":"text","text":"{}"}}]}}"#, "x".repeat(256 * 1024));
    for _ in 0..400 {
        let t = tokio::time::Instant::now();
        if client.send(Message::Text(big.clone().into())).await.is_err() {
            break; // the pair gave up on the client (held frames over their bound)
        }
        if accepted.load(Ordering::SeqCst) > 1 || t.elapsed() > Duration::from_millis(150) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // nestor redialed; the frame that failed reached the new connection...
    let redelivered = tokio::time::timeout(Duration::from_secs(10), got_rx.recv())
        .await
        .expect("no client frame reached a second downstream connection: the pair never redialed")
        .unwrap();
    assert!(redelivered.len() > 250_000);
    assert!(accepted.load(Ordering::SeqCst) >= 2);
    // ...and the client hears from it (its second sync is hidden).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = tokio::time::timeout_at(deadline, client.next()).await.expect("nothing after the redial").unwrap().unwrap();
        if let Message::Text(t) = m {
            assert!(!t.contains("\"sync\""), "a second sync reached the client: {t}");
            if t.contains("after-redial") {
                break;
            }
        }
    }
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(5), pair).await;
    server.abort();
}

/// A client transport whose writes fail after `budget` bytes while reads go on (a peer that
/// vanished mid-stream, as the proxy's writer task sees it first).
struct FailingWrites {
    inner: DuplexStream,
    budget: usize,
}

impl AsyncRead for FailingWrites {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for FailingWrites {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if self.budget < buf.len() {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.budget -= n;
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// When the client's socket fails under the writer task, the pair ends cleanly: no panic
/// (polling the writer's finished JoinHandle again used to panic the socket's task), the
/// downstream socket is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_socket_failing_under_the_writer_ends_the_pair_without_a_panic() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        ws.send(sync_frame(-1)).await.unwrap();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let frame = Message::Text(r#"{"type":"transient","event":{"id":"x"}}"#.into());
                    if ws.send(frame).await.is_err() { break; }
                }
                m = ws.next() => match m {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    _ => {}
                },
            }
        }
        let _ = closed_tx.send(());
    });
    let cfg = Arc::new(ProxyConfig::default());
    let (a, b) = tokio::io::duplex(1 << 20);
    let proxy_side = WebSocketStream::from_raw_socket(FailingWrites { inner: b, budget: 2_000 }, Role::Server, Some(cfg.client_ws_config())).await;
    let _client = WebSocketStream::from_raw_socket(a, Role::Client, None).await; // never reads, never closes
    let spec = PairSpec { kind: SocketKind::Session, conversation: ConversationId::new_random(), query: vec![], auth: ClientAuth::Done };
    let pair = tokio::spawn(bridge(proxy_side, spec, Arc::new(Fixed(endpoint(port))), cfg));
    let ended = tokio::time::timeout(Duration::from_secs(10), pair).await.expect("the pair did not end");
    assert!(ended.is_ok(), "the pair's task panicked: {:?}", ended.err());
    tokio::time::timeout(Duration::from_secs(5), closed_rx).await.expect("downstream not closed").unwrap();
    server.abort();
}

/// An Upstream that answers once, then says "not available" forever (a downstream that went
/// away and is not coming back).
struct OnceThenGone {
    ep: Arc<Endpoint>,
    calls: AtomicUsize,
}

#[async_trait]
impl Upstream for OnceThenGone {
    async fn endpoint(&self, _timeout: Duration) -> Result<Arc<Endpoint>, UpstreamError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            Ok(self.ep.clone())
        } else {
            Err(UpstreamError::Unavailable("agent-server stopped".into()))
        }
    }
}

/// The downstream is lost and does not come back within `resume_deadline`: the client is
/// closed with 1012 (retryable for the SDK and the frontend), never 4001/4004, and within a
/// bounded time after the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_gone_past_the_resume_deadline_closes_the_client_with_1012() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        drop(listener); // nothing listens any more: every redial is refused
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        ws.send(sync_frame(-1)).await.unwrap();
        let durable = r#"{"type":"durable","seq":0,"event":{"id":"e0","kind":"MessageEvent","timestamp":"2026-01-01T00:00:00"}}"#;
        ws.send(Message::Text(durable.into())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(ws); // lost without a close frame
    });
    let cfg = Arc::new(ProxyConfig { resume_deadline: Duration::from_millis(800), ..ProxyConfig::default() });
    let (mut client, pair) = bridged(SocketKind::Session, Arc::new(OnceThenGone { ep: endpoint(port), calls: AtomicUsize::new(0) }), cfg).await;
    let t0 = tokio::time::Instant::now();
    let code = close_code_within(&mut client, Duration::from_secs(10)).await;
    assert_eq!(code, Some(1012), "a retryable close once the resume deadline passed");
    assert!(t0.elapsed() < Duration::from_secs(5), "closed {:?} after the loss", t0.elapsed());
    let _ = tokio::time::timeout(Duration::from_secs(5), pair).await.expect("the pair ended");
    server.abort();
}

/// A downstream that sends its first frames in the same write as its handshake answer.
/// nestor rebuilds the downstream socket right after the handshake (dropping the buffer
/// tungstenite's handshake leaves behind, issue 4's idle memory): the frames glued to the
/// answer must still reach the client, in order, and the socket must go on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_glued_to_the_downstream_answer_are_not_lost() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        let mut b = [0u8; 2048];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut b).await.unwrap();
            assert!(n > 0, "the request ended early");
            req.extend_from_slice(&b[..n]);
        }
        let text = String::from_utf8_lossy(&req).to_string();
        let key = text
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-key")).map(|(_, v)| v.trim().to_owned()))
            .expect("a Sec-WebSocket-Key");
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut out = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes();
        for t in [r#"{"n":1}"#, r#"{"n":2}"#] {
            out.extend_from_slice(&[0x81, t.len() as u8]);
            out.extend_from_slice(t.as_bytes());
        }
        // The answer and both frames in one write (one segment on loopback).
        s.write_all(&out).await.unwrap();
        // Then a tungstenite server on what is left of the connection.
        let mut ws = WebSocketStream::from_raw_socket(s, Role::Server, None).await;
        ws.send(Message::Text(r#"{"n":3}"#.into())).await.unwrap();
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                ws.send(Message::Text(format!("echo {t}").into())).await.unwrap();
            }
        }
    });

    let cfg = Arc::new(ProxyConfig::default());
    let (mut client, pair) = bridged(SocketKind::BashEvents, Arc::new(Fixed(endpoint(port))), cfg).await;

    let mut got = Vec::new();
    while got.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(5), client.next()).await.expect("a frame in time").unwrap().unwrap();
        if let Message::Text(t) = m {
            got.push(t.to_string());
        }
    }
    assert_eq!(got, vec![r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#]);
    client.send(Message::Text("hi".into())).await.unwrap();
    let echo = loop {
        let m = tokio::time::timeout(Duration::from_secs(5), client.next()).await.expect("the echo in time").unwrap().unwrap();
        if let Message::Text(t) = m {
            break t.to_string();
        }
    };
    assert_eq!(echo, "echo hi");
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(10), pair).await.expect("the pair ended");
    server.abort();
}

/// A downstream that completes the handshake and drops every connection, before sending
/// anything or right after its first frame (a subscription's `sync`): nestor keeps
/// redialing (the client stays open), but with growing delays, never in a tight loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_that_drops_every_connection_is_redialed_with_backoff() {
    for send_first in [false, true] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (port, accepted, server) = ws_downstream(listener, move |n, mut ws| async move {
            if send_first {
                let _ = ws.send(sync_frame(n as i64)).await;
            }
            let _ = ws.close(None).await;
        });
        let cfg = Arc::new(ProxyConfig { resume_deadline: Duration::from_secs(30), ..ProxyConfig::default() });
        let (mut client, pair) = bridged(SocketKind::Session, Arc::new(Fixed(endpoint(port))), cfg).await;

        tokio::time::sleep(Duration::from_millis(1000)).await;
        let n = accepted.load(Ordering::SeqCst);
        // Delays 0, 20, 40, 80, 80, … ms: about 13 connections in a second. A tight loop
        // makes thousands (2,252 before the fix).
        assert!((3..=20).contains(&n), "{n} connections in 1 s (first frame sent: {send_first})");
        // The client stays open: at most the first connection's sync reached it.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, client.next()).await {
            let m = m.unwrap();
            assert!(m.to_text().unwrap_or_default().contains("sync"), "{m:?}");
        }
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(5), pair).await;
        server.abort();
    }
}

/// Read until the client gets its close frame, within `within`: the frame's code (None: a
/// close frame without one). Panics if the socket ends without a close frame.
async fn close_code_within<S>(client: &mut WebSocketStream<S>, within: Duration) -> Option<u16>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, client.next()).await.expect("the client was never closed") {
            Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("the client socket ended without a close frame: {other:?}"),
        }
    }
}

/// A downstream that accepts every connection and drops it at once (as the agent-server
/// does with 1011 when a conversation cannot be loaded): each dial succeeds, so this used
/// to start the resume deadline over forever (a redial every 80 ms, the client open and
/// told nothing). Now the outage keeps its first deadline, and the client gets 1012.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_that_drops_every_connection_is_given_up_at_the_resume_deadline() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (port, accepted, server) = ws_downstream(listener, |n, mut ws| async move {
        if n == 0 {
            // The first connection works for a moment.
            let _ = ws.send(sync_frame(-1)).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Error,
                reason: "".into(),
            }))
            .await;
    });
    let cfg = Arc::new(ProxyConfig { resume_deadline: Duration::from_millis(800), ..ProxyConfig::default() });
    let (mut client, pair) = bridged(SocketKind::Session, Arc::new(Fixed(endpoint(port))), cfg).await;
    let t0 = tokio::time::Instant::now();
    assert_eq!(close_code_within(&mut client, Duration::from_secs(10)).await, Some(1012));
    assert!(t0.elapsed() < Duration::from_secs(5), "closed {:?} after the loss", t0.elapsed());
    assert!(accepted.load(Ordering::SeqCst) >= 3, "it did redial meanwhile");
    let _ = tokio::time::timeout(Duration::from_secs(5), pair).await.expect("the pair ended");
    server.abort();
}

/// A bash-events socket cannot resume (it has no position): a downstream that goes silent
/// closes the client with 1012 instead of being redialed with the client's original query
/// (which would replay or skip events without telling the client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_bash_events_downstream_closes_the_client_instead_of_redialing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (port, accepted, server) = ws_downstream(listener, |_, ws| async move {
        // Silent: never reads (so never answers a ping), never writes.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(ws);
    });
    let cfg = Arc::new(ProxyConfig { ping_interval: Duration::from_millis(500), ..ProxyConfig::default() });
    // The client over real TCP, not an in-memory pipe: the proxy answers pings and closes
    // right after its close frame, and a pipe's write to a dropped end fails at once, so a
    // client's pending pong would fail the read before it reaches the close frame.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client_tcp = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (proxy_tcp, _) = l.accept().await.unwrap();
    let proxy_side = WebSocketStream::from_raw_socket(proxy_tcp, Role::Server, Some(cfg.client_ws_config())).await;
    let mut client = WebSocketStream::from_raw_socket(client_tcp, Role::Client, None).await;
    let spec = PairSpec { kind: SocketKind::BashEvents, conversation: ConversationId::new_random(), query: vec![], auth: ClientAuth::Done };
    let pair = tokio::spawn(bridge(proxy_side, spec, Arc::new(Fixed(endpoint(port))), cfg));
    // Silent for 3 ping intervals: closed within a few more.
    assert_eq!(close_code_within(&mut client, Duration::from_secs(10)).await, Some(1012));
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "no redial");
    let _ = tokio::time::timeout(Duration::from_secs(5), pair).await.expect("the pair ended");
    server.abort();
}

/// A client that closes gets the close handshake answered (RFC 6455 §5.5.1), not a
/// connection dropped after a timeout (1006, `wasClean = false` in a browser).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_from_the_client_is_answered() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        ws.send(sync_frame(-1)).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    });
    let (mut client, pair) = bridged(SocketKind::Session, Arc::new(Fixed(endpoint(port))), Arc::new(ProxyConfig::default())).await;
    let first = tokio::time::timeout(Duration::from_secs(5), client.next()).await.unwrap().unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("sync"), "{first:?}");
    let t0 = tokio::time::Instant::now();
    client.close(None).await.unwrap();
    // The reply arrives, and the stream then ends cleanly.
    let reply = tokio::time::timeout(Duration::from_secs(5), client.next()).await.expect("no reply to the close");
    assert!(matches!(reply, Some(Ok(Message::Close(_))) | None), "{reply:?}");
    assert!(t0.elapsed() < Duration::from_millis(1500), "answered after {:?}", t0.elapsed());
    let _ = tokio::time::timeout(Duration::from_secs(5), pair).await.expect("the pair ended");
    server.abort();
}
