//! The fast path (crate::fastpath) over real TCP: what a client sees must not differ from
//! the router's answers, on one keep-alive connection that mixes fast-path and router
//! requests, pipelined requests, HEAD, large streamed answers through the leak guard, a
//! pooled downstream connection the downstream closed, and with the fast path turned off;
//! with connections on I/O threads (the default) and on the shared runtime.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

/// One keep-alive HTTP/1.1 connection to nestor.
struct Conn {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(url: &str) -> Conn {
        let addr = url.trim_start_matches("http://");
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        Conn { send }
    }

    async fn call(&mut self, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, http::HeaderMap, Bytes) {
        self.call_from(None, method, path, key, body).await
    }

    /// [`Conn::call`] from a browser page at `origin`.
    async fn call_from(&mut self, origin: Option<&str>, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, http::HeaderMap, Bytes) {
        self.send.ready().await.expect("the connection is still open");
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let mut req = http::Request::builder().method(method).uri(path).header("host", "nestor.test").header("x-session-api-key", key);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let resp = tokio::time::timeout(Duration::from_secs(10), self.send.send_request(req.body(Full::new(body)).unwrap()))
            .await
            .expect("answered in time")
            .expect("answered");
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status.as_u16(), parts.headers, bytes)
    }
}

fn conversation(a: &nestor_test_support::FakeAgentServer) -> Uuid {
    let id = a.create_conversation(None, create_body(None))["id"].as_str().unwrap().to_owned();
    id.parse().unwrap()
}

/// On an I/O thread (the default): the connection moves to the router's runtime at its first
/// request the fast path does not take.
#[tokio::test]
async fn one_connection_mixes_fast_and_router_requests() {
    mixes_fast_and_router_requests("").await;
}

/// The same on the shared runtime (`io_threads = 0`), and with I/O threads that never poll.
#[tokio::test]
async fn one_connection_mixes_fast_and_router_requests_without_io_threads_or_polling() {
    mixes_fast_and_router_requests("[http]\nio_threads = 0").await;
    mixes_fast_and_router_requests("[http]\nio_threads = 1\nbusy_poll_us = 0").await;
}

async fn mixes_fast_and_router_requests(config: &str) {
    let a = fake(0).await;
    let id = conversation(&a);
    let n = nestor_existing(&[&a], config).await;
    let mut c = Conn::open(&n.url).await;

    let (s, h, body) = c.call("GET", &format!("/api/conversations/{id}"), CLIENT_KEY, None).await;
    assert_eq!(s, 200, "{body:?}");
    let info: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(info["id"], id.to_string());
    assert_eq!(h["content-length"], body.len().to_string().as_str());
    assert!(h.contains_key("date") && h.contains_key("vary"), "{h:?}");

    // A message (body) on the fast path reaches the downstream.
    let before = a.events(id).len();
    let msg = json!({"role": "user", "content": [{"type": "text", "text": "hi"}], "run": false});
    let (s, _, body) = c.call("POST", &format!("/api/conversations/{id}/events"), CLIENT_KEY, Some(msg)).await;
    assert_eq!(s, 200, "{body:?}");
    let events = a.events(id);
    assert!(events.len() > before && events.iter().any(|e| e.to_string().contains("\"hi\"")), "{events:?}");

    // A wrong key is the router's 401 (handed off), and the connection goes on.
    let (s, _, body) = c.call("GET", &format!("/api/conversations/{id}"), "wrong", None).await;
    assert_eq!((s, &body[..]), (401, &br#"{"detail":"Unauthorized"}"#[..]));
    let (s, _, body) = c.call("GET", "/api/conversations/search?limit=5", CLIENT_KEY, None).await;
    assert_eq!(s, 200);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["items"][0]["id"], id.to_string());
    let (s, _, _) = c.call("GET", &format!("/api/conversations/{id}/events/search"), CLIENT_KEY, None).await;
    assert_eq!(s, 200);

    // An unknown conversation: the router's 404 shape.
    let (s, _, body) = c.call("GET", &format!("/api/conversations/{}", Uuid::new_v4()), CLIENT_KEY, None).await;
    assert_eq!((s, &body[..]), (404, &br#"{"detail":"Not Found"}"#[..]));
    n.stop().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_head_has_no_body() {
    let a = fake(0).await;
    let id = conversation(&a);
    let n = nestor_existing(&[&a], "").await;
    let mut tcp = tokio::net::TcpStream::connect(n.url.trim_start_matches("http://")).await.unwrap();
    let get = |path: String| format!("GET {path} HTTP/1.1\r\nHost: h\r\nX-Session-API-Key: {CLIENT_KEY}\r\n\r\n");
    let head = format!("HEAD /api/conversations/{id} HTTP/1.1\r\nHost: h\r\nX-Session-API-Key: {CLIENT_KEY}\r\n\r\n");
    let last = format!("GET /api/conversations/{id}/events/count HTTP/1.1\r\nHost: h\r\nX-Session-API-Key: {CLIENT_KEY}\r\nConnection: close\r\n\r\n");
    let all = format!("{}{head}{last}", get(format!("/api/conversations/{id}")));
    tcp.write_all(all.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out)).await.expect("closed after the last answer").unwrap();
    // Three answers, in order: the HEAD one has the GET's length and no body.
    let mut rest = &out[..];
    let mut lengths = Vec::new();
    for (i, has_body) in [true, false, true].into_iter().enumerate() {
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Response::new(&mut slots);
        let head_len = match r.parse(rest).unwrap() {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => panic!("answer {i} incomplete: {:?}", String::from_utf8_lossy(rest)),
        };
        assert_eq!(r.code, Some(200), "answer {i}");
        let len: usize = r
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
            .expect("a length");
        lengths.push(len);
        rest = &rest[head_len + if has_body { len } else { 0 }..];
    }
    assert_eq!(lengths[0], lengths[1], "HEAD carries the GET's length");
    assert!(rest.is_empty(), "nothing after the last answer: {:?}", String::from_utf8_lossy(rest));
    n.stop().await;
}

#[tokio::test]
async fn large_answers_stream_through_the_leak_guard() {
    let a = fake(0).await;
    let id = conversation(&a);
    let downstream = a.url();
    // ~600 KiB of events, each naming the downstream's address and key.
    let key = a.config().session_api_key.clone().unwrap();
    for i in 0..40 {
        let text = format!("{i} see {downstream}/api and {key} ") + &"x".repeat(15_000);
        a.append_event(id, json!({"kind": "MessageEvent", "source": "agent", "llm_message": {"role": "assistant", "content": [{"type": "text", "text": text}]}}));
    }
    let n = nestor_existing(&[&a], "").await;
    let mut c = Conn::open(&n.url).await;
    let (s, h, body) = c.call("GET", &format!("/api/conversations/{id}/events/search?limit=100"), CLIENT_KEY, None).await;
    assert_eq!(s, 200);
    assert!(body.len() > 256 * 1024, "a streamed (not buffered) answer: {} bytes", body.len());
    assert!(!h.contains_key("content-length") || h["content-length"] == body.len().to_string().as_str());
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains(&downstream) && !text.contains(&key), "the downstream's address or key leaked");
    assert_eq!(text.matches("see http://nestor.test/api").count(), 40);
    let v: Value = serde_json::from_slice(&body).expect("whole JSON");
    assert_eq!(v["items"].as_array().unwrap().len(), 40);
    // And the connection still serves the next request.
    let (s, _, _) = c.call("GET", &format!("/api/conversations/{id}"), CLIENT_KEY, None).await;
    assert_eq!(s, 200);
    n.stop().await;
}

#[tokio::test]
async fn a_pooled_connection_the_downstream_closed_is_replaced() {
    let a = fake(0).await;
    let id = conversation(&a);
    let n = nestor_existing(&[&a], "").await;
    let mut c = Conn::open(&n.url).await;
    for round in 0..3 {
        let (s, _, body) = c.call("GET", &format!("/api/conversations/{id}"), CLIENT_KEY, None).await;
        assert_eq!(s, 200, "round {round}: {body:?}");
        // Every connection nestor had to the downstream is cut.
        a.restart().await;
    }
    // The downstream down: the agent-server-shaped 502 (fast path) or 503 (router).
    a.stop().await;
    let (s, _, body) = c.call("GET", &format!("/api/conversations/{id}"), CLIENT_KEY, None).await;
    assert!(s == 502 || s == 503, "{s} {body:?}");
    assert!(serde_json::from_slice::<Value>(&body).unwrap()["detail"].is_string());
    n.stop().await;
}

/// A downstream slower than `upstream_timeout_secs`: the agent-server-shaped 504, well before
/// the downstream would have answered, and the same connection goes on serving (the
/// connection's one deadline timer is re-armed for each request).
#[tokio::test]
async fn a_slow_downstream_gets_a_504_and_the_connection_goes_on() {
    let a = fake(0).await;
    let id = conversation(&a);
    let n = nestor_existing(&[&a], "upstream_timeout_secs = 0.3").await;
    let mut c = Conn::open(&n.url).await;
    let path = format!("/api/conversations/{id}");
    let (s, _, _) = c.call("GET", &path, CLIENT_KEY, None).await;
    assert_eq!(s, 200);
    // Slower than the timeout, well within the health probes' 2 s (the downstream stays up).
    a.set_fault(nestor_test_support::Fault::Delay(Duration::from_millis(800)));
    let t0 = std::time::Instant::now();
    let (s, _, body) = c.call("GET", &path, CLIENT_KEY, None).await;
    let waited = t0.elapsed();
    assert_eq!(s, 504, "{body:?}");
    let detail = serde_json::from_slice::<Value>(&body).unwrap()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("did not answer within"), "{detail}");
    assert!(waited >= Duration::from_millis(300), "gave up early: {waited:?}");
    a.set_fault(nestor_test_support::Fault::None);
    for _ in 0..3 {
        let (s, _, body) = c.call("GET", &path, CLIENT_KEY, None).await;
        assert_eq!(s, 200, "{body:?}");
    }
    n.stop().await;
}

/// One whole HTTP/1.1 answer with a `Content-Length` (lower-cased, as text), read within 10 s.
async fn read_answer(tcp: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let mut chunk = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| l.strip_prefix("content-length: ")).map(|l| l.trim().parse::<usize>().unwrap());
            if length.is_some_and(|l| body.len() >= l) {
                return text;
            }
        }
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await.expect("an answer within 10 s").unwrap();
        assert!(n > 0, "closed before a whole answer: {text:?}");
        got.extend_from_slice(&chunk[..n]);
    }
}

/// Requests whose heads are still arriving when shutdown begins are answered, and then
/// their connections close: one the fast path takes, one it
/// hands to the router after the signal (once closed unanswered: the router's graceful
/// shutdown dropped a connection still reading its first request), with I/O threads and
/// on the shared runtime.
#[tokio::test]
async fn requests_crossing_the_shutdown_signal_are_answered_then_closed() {
    for config in ["", "[http]\nio_threads = 0"] {
        let a = fake(0).await;
        let id = conversation(&a);
        let n = nestor_existing(&[&a], config).await;
        let addr = n.url.trim_start_matches("http://").to_owned();
        let head = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: nestor.test\r\nx-session-api-key: {CLIENT_KEY}\r\n\r\n");
        let mut conns = Vec::new();
        for path in [format!("/api/conversations/{id}"), "/api/conversations/search?limit=1".to_owned()] {
            let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            // One whole request first: the connection is accepted and served (on the fast path).
            tcp.write_all(head(&format!("/api/conversations/{id}")).as_bytes()).await.unwrap();
            let answer = read_answer(&mut tcp).await;
            assert!(answer.starts_with("http/1.1 200 "), "{config:?}: {answer:?}");
            let second = head(&path);
            let (first, rest) = second.split_at(second.len() / 2);
            tcp.write_all(first.as_bytes()).await.unwrap();
            conns.push((path, tcp, rest.to_owned()));
        }
        // Let both halves be read, then shut down, then let the router's drain begin.
        tokio::time::sleep(Duration::from_millis(200)).await;
        n.state.shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (path, tcp, rest) in &mut conns {
            tcp.write_all(rest.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            // The whole answer, then the end of the connection.
            tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
                .await
                .unwrap_or_else(|_| panic!("{config:?} {path}: the connection stayed open"))
                .unwrap();
            let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
            assert!(text.starts_with("http/1.1 200 "), "{config:?} {path}: {text:?}");
            // Whole: the body is as long as its head says.
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let length = head.lines().find_map(|l| l.strip_prefix("content-length: ")).expect("a length");
            assert_eq!(body.len(), length.trim().parse::<usize>().unwrap(), "{config:?} {path}");
            // The fast path says so; hyper (the router) just closes after the answer.
            if !path.contains("search") {
                assert!(head.contains("\r\nconnection: close"), "{config:?} {path}: {head:?}");
            }
        }
        n.stop().await;
    }
}

/// A large answer streamed by the router keeps its downstream counted in flight until the
/// client has it all: the idle reaper (`lifecycle.idle_stop_secs`) must not stop an
/// agent-server in the middle of a slow download (it was counted only until the head).
#[tokio::test]
async fn a_streamed_router_answer_counts_in_flight_until_it_is_sent() {
    let a = fake(0).await;
    let id = conversation(&a);
    // ~8 MiB: more than the socket buffers between nestor and a client that stops reading.
    for i in 0..160 {
        let text = format!("{i} ") + &"x".repeat(50_000);
        a.append_event(id, json!({"kind": "MessageEvent", "source": "agent", "llm_message": {"role": "assistant", "content": [{"type": "text", "text": text}]}}));
    }
    let n = nestor_existing(&[&a], "[http]\nfast_path = false").await;
    let (ds, _) = n.state.catalog.route(&nestor_core::ConversationId::parse(&id.to_string()).unwrap()).expect("routed");
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    let mut tcp = sock.connect(n.url.trim_start_matches("http://").parse().unwrap()).await.unwrap();
    let head = format!("GET /api/conversations/{id}/events/search?limit=100 HTTP/1.1\r\nhost: nestor.test\r\nx-session-api-key: {CLIENT_KEY}\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 1024];
    let got = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut first)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first[..got]).starts_with("HTTP/1.1 200"));
    // The client reads no more for a while: the answer is still being sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ds.in_flight(), 1, "the downstream is counted while its answer streams");
    // Read it all; then the count goes back to zero.
    let mut rest = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !rest.ends_with(b"0\r\n\r\n") {
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await.expect("the whole answer in time").unwrap();
        assert!(n > 0, "closed mid-answer after {} bytes", rest.len());
        rest.extend_from_slice(&buf[..n]);
    }
    assert!(rest.len() > 4 << 20, "{} bytes", rest.len());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while ds.in_flight() != 0 {
        assert!(tokio::time::Instant::now() < deadline, "still counted in flight after the answer ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    n.stop().await;
}

#[tokio::test]
async fn the_fast_path_can_be_turned_off() {
    let a = fake(0).await;
    let id = conversation(&a);
    let n = nestor_existing(&[&a], "[http]\nfast_path = false").await;
    assert!(!n.state.cfg.http.fast_path);
    let mut c = Conn::open(&n.url).await;
    let (s, _, _) = c.call("GET", &format!("/api/conversations/{id}"), CLIENT_KEY, None).await;
    assert_eq!(s, 200);
    n.stop().await;
}

/// The same requests through a nestor with the fast path and one without give the same
/// answers (status, content type, body), on the same downstream.
#[tokio::test]
async fn answers_are_the_routers_answers() {
    let a = fake(0).await;
    let id = conversation(&a);
    a.send_user_message(id, "hello", false);
    let fast = nestor_existing(&[&a], "").await;
    let slow = nestor_existing(&[&a], "[http]\nfast_path = false").await;
    let mut f = Conn::open(&fast.url).await;
    let mut s = Conn::open(&slow.url).await;
    let requests: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", format!("/api/conversations/{id}"), None),
        ("HEAD", format!("/api/conversations/{id}"), None),
        ("GET", format!("/api/conversations/{id}/events/search?limit=2"), None),
        ("GET", format!("/api/conversations/{id}/events/count"), None),
        ("GET", format!("/api/conversations/{id}/no-such-route"), None),
        ("GET", format!("/api/conversations/{id}/events/not-an-event"), None),
        ("POST", format!("/api/conversations/{id}/events"), Some(json!({"not": "a message"}))),
        ("PATCH", format!("/api/conversations/{id}"), Some(json!({"title": "t"}))),
    ];
    // Without an Origin, from an allowed one (localhost) and from a refused one.
    for origin in [None, Some("http://localhost:3000"), Some("http://evil.example")] {
        for (method, path, body) in &requests {
            let (fs, fh, fb) = f.call_from(origin, method, path, CLIENT_KEY, body.clone()).await;
            let (ss, sh, sb) = s.call_from(origin, method, path, CLIENT_KEY, body.clone()).await;
            let what = format!("{method} {path} from {origin:?}");
            assert_eq!(fs, ss, "{what}: status");
            for h in ["content-type", "content-length", "access-control-allow-origin", "access-control-allow-credentials"] {
                assert_eq!(fh.get(h), sh.get(h), "{what}: {h}");
            }
            let vary = |m: &http::HeaderMap| m.get_all("vary").iter().map(|v| v.to_str().unwrap().to_owned()).collect::<Vec<_>>();
            assert_eq!(vary(&fh), vary(&sh), "{what}: vary");
            assert_eq!(fb, sb, "{what}: body");
        }
    }
    fast.stop().await;
    slow.stop().await;
}
