//! WebSocket client helpers for nestor's socket tests (auth, resume at scale, slow
//! consumers). Every wait is bounded.
#![allow(dead_code)]

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::support::{create_body, TestNestor, CLIENT_KEY};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// 1,000 proxied sockets are ~4,000 descriptors in one test process: lift the soft limit.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a properly initialized struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// `ws://…` for a path (and query) on nestor.
pub fn ws_url(n: &TestNestor, path_and_query: &str) -> String {
    format!("{}{}", n.url.replacen("http://", "ws://", 1), path_and_query)
}

/// Connect, optionally with an `X-Session-API-Key` header.
pub async fn connect(url: &str, header_key: Option<&str>) -> Result<Ws, WsError> {
    connect_with(url, header_key, None).await
}

pub async fn connect_with(url: &str, header_key: Option<&str>, cfg: Option<WebSocketConfig>) -> Result<Ws, WsError> {
    let mut req = url.into_client_request().expect("ws url");
    if let Some(k) = header_key {
        req.headers_mut().insert("X-Session-API-Key", k.parse().expect("header value"));
    }
    let fut = tokio_tungstenite::connect_async_with_config(req, cfg, true);
    match tokio::time::timeout(Duration::from_secs(20), fut).await {
        Ok(r) => r.map(|(ws, _)| ws),
        Err(_) => panic!("connecting {url} took more than 20 s"),
    }
}

/// The HTTP status of a refused upgrade.
pub fn http_status(e: &WsError) -> Option<u16> {
    match e {
        WsError::Http(r) => Some(r.status().as_u16()),
        _ => None,
    }
}

/// What the next read gave.
#[derive(Debug)]
pub enum Next {
    Text(String),
    /// Closed by the peer with this code (None: no close frame / reset).
    Closed(Option<u16>, String),
    Timeout,
}

/// Next text frame, close, or timeout (pings and pongs skipped).
pub async fn next(ws: &mut Ws, timeout: Duration) -> Next {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Next::Timeout,
            Ok(None) => return Next::Closed(None, String::new()),
            Ok(Some(Err(_))) => return Next::Closed(None, String::new()),
            Ok(Some(Ok(Message::Text(t)))) => return Next::Text(t.to_string()),
            Ok(Some(Ok(Message::Close(f)))) => {
                return Next::Closed(f.as_ref().map(|f| u16::from(f.code)), f.map(|f| f.reason.to_string()).unwrap_or_default())
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Next frame as JSON; panics on close or timeout.
pub async fn must_json(ws: &mut Ws) -> Value {
    match next(ws, Duration::from_secs(15)).await {
        Next::Text(t) => serde_json::from_str(&t).expect("json frame"),
        other => panic!("expected a frame, got {other:?}"),
    }
}

/// The close code the peer sends next (skipping data frames), within `timeout`.
pub async fn close_code(ws: &mut Ws, timeout: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next(ws, left).await {
            Next::Text(_) => continue,
            Next::Closed(code, _) => return code,
            Next::Timeout => panic!("socket still open after {timeout:?}"),
        }
    }
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.to_owned().into())).await.expect("send");
}

pub fn auth_frame(key: &str) -> String {
    serde_json::json!({"type": "auth", "session_api_key": key}).to_string()
}

/// Create a conversation through nestor; returns its id.
pub async fn create_conversation(n: &TestNestor) -> Uuid {
    let r = n.post("/api/conversations").json(&create_body(None)).send().await.expect("create sent");
    let status = r.status().as_u16();
    let v: Value = r.json().await.expect("create body");
    assert!(status == 200 || status == 201, "create: {status} {v}");
    Uuid::parse_str(v["id"].as_str().expect("id")).expect("uuid")
}

/// Connect to nestor with the client key in the header (the simplest accepted path).
pub async fn open(n: &TestNestor, path_and_query: &str) -> Ws {
    connect(&ws_url(n, path_and_query), Some(CLIENT_KEY)).await.expect("socket through nestor")
}

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The value of one series (`name` with its labels exactly as rendered, e.g.
/// `nestor_ws_pairs{kind="events"}`) in nestor's `GET /metrics`; None if absent. The
/// recorder is process-wide: tests running alongside in the same binary add to it.
pub async fn metric(n: &TestNestor, series: &str) -> Option<f64> {
    let text = n.client().get(format!("{}/metrics", n.url)).send().await.expect("metrics").text().await.expect("metrics body");
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}
