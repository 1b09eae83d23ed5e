//! Shared helpers for the fake agent-server tests: an HTTP client, a WebSocket client, and
//! a standard create body.
#![allow(dead_code)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use nestor_test_support::{FakeAgentServer, FakeConfig};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

pub const KEY: &str = "test-key";

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub fn fast_config() -> FakeConfig {
    FakeConfig {
        step_delay: Duration::from_millis(1),
        ..FakeConfig::with_key(KEY)
    }
}

pub async fn start() -> FakeAgentServer {
    FakeAgentServer::start(fast_config())
        .await
        .expect("fake starts")
}

pub fn create_body() -> Value {
    json!({
        "agent": {"kind": "Agent", "llm": {"usage_id": "agent", "model": "openai/fake", "base_url": "http://127.0.0.1:9/v1", "api_key": "x"}, "tools": [{"name": "terminal"}]},
        "workspace": {"working_dir": "/tmp/ws"},
        "max_iterations": 10,
        "autotitle": false
    })
}

pub struct Http {
    pub base: String,
    pub client: reqwest::Client,
    pub key: Option<String>,
}

pub fn http(srv: &FakeAgentServer) -> Http {
    Http {
        base: srv.url(),
        client: reqwest::Client::new(),
        key: Some(KEY.into()),
    }
}

impl Http {
    pub fn without_key(&self) -> Http {
        Http {
            base: self.base.clone(),
            client: self.client.clone(),
            key: None,
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> (u16, Value) {
        let rb = match &self.key {
            Some(k) => rb.header("X-Session-API-Key", k),
            None => rb,
        };
        let resp = rb.send().await.expect("request sent");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body read");
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.client.get(format!("{}{}", self.base, path)))
            .await
    }

    pub async fn get_with_body(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(self.client.get(format!("{}{}", self.base, path)).json(body))
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(
            self.client
                .post(format!("{}{}", self.base, path))
                .json(body),
        )
        .await
    }

    pub async fn post_empty(&self, path: &str) -> (u16, Value) {
        self.send(self.client.post(format!("{}{}", self.base, path)))
            .await
    }

    pub async fn post_raw(&self, path: &str, body: &'static str) -> (u16, Value) {
        self.send(
            self.client
                .post(format!("{}{}", self.base, path))
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(
            self.client
                .patch(format!("{}{}", self.base, path))
                .json(body),
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(self.client.delete(format!("{}{}", self.base, path)))
            .await
    }

    /// Create a conversation over REST; returns its id.
    pub async fn create(&self, body: &Value) -> Uuid {
        let (status, info) = self.post("/api/conversations", body).await;
        assert_eq!(status, 201, "{info}");
        Uuid::parse_str(info["id"].as_str().expect("id")).expect("uuid")
    }
}

/// Wait until `f` holds (polling), or panic.
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut f: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Wait until the conversation's status is `status`.
pub async fn wait_status(srv: &FakeAgentServer, id: Uuid, status: &str) {
    eventually(status, || {
        srv.execution_status(id).as_deref() == Some(status)
    })
    .await;
}

pub async fn ws_connect(url: &str, key_header: Option<&str>) -> Result<Ws, WsError> {
    let mut req = url.into_client_request().expect("ws url");
    if let Some(k) = key_header {
        req.headers_mut()
            .insert("X-Session-API-Key", k.parse().expect("header"));
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

/// Connect with the key in the query (the simplest accepted path).
pub async fn ws_open(srv: &FakeAgentServer, path_and_query: &str) -> Ws {
    let sep = if path_and_query.contains('?') {
        '&'
    } else {
        '?'
    };
    ws_connect(
        &format!(
            "{}{}{}session_api_key={}",
            srv.ws_url(),
            path_and_query,
            sep,
            KEY
        ),
        None,
    )
    .await
    .expect("ws connects")
}

pub fn http_status(e: &WsError) -> Option<u16> {
    match e {
        WsError::Http(resp) => Some(resp.status().as_u16()),
        _ => None,
    }
}

/// Next text frame as JSON (skipping pings); `None` on timeout.
pub async fn next_json(ws: &mut Ws, timeout: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next()).await.ok()??;
        match m {
            Ok(Message::Text(t)) => {
                return Some(serde_json::from_str(t.as_str()).expect("frame is JSON"))
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

pub async fn must_json(ws: &mut Ws) -> Value {
    next_json(ws, Duration::from_secs(5))
        .await
        .expect("a frame within 5 s")
}

pub async fn send_json(ws: &mut Ws, v: &Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

/// How a socket ended.
#[derive(Debug, PartialEq)]
pub enum End {
    Close(u16, String),
    /// TCP gone without a close frame.
    Abrupt,
}

/// Read until the socket ends (ignoring data frames), within 15 s.
pub async fn until_end(ws: &mut Ws) -> End {
    let r = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => {
                    return End::Close(u16::from(f.code), f.reason.to_string())
                }
                Some(Ok(Message::Close(None))) => {
                    return End::Close(u16::from(CloseCode::Status), String::new())
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return End::Abrupt,
            }
        }
    })
    .await;
    r.expect("socket ended within 15 s")
}

/// Collect frames until `pred` matches one (inclusive).
pub async fn frames_until<F: Fn(&Value) -> bool>(ws: &mut Ws, pred: F) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let f = must_json(ws).await;
        let stop = pred(&f);
        out.push(f);
        if stop {
            return out;
        }
    }
}

pub fn is_full_state(v: &Value) -> bool {
    v["kind"] == "ConversationStateUpdateEvent" && v["key"] == "full_state"
}
