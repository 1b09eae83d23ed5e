//! permessage-deflate on the client leg through nestor (over a fake agent-server), with two
//! clients: a Rust one built on nestor's own adapter, and Python's `websockets` (an
//! independent implementation; the one the SDK uses) from the agent-server venv.
//!
//! * The offer is accepted (`server_no_context_takeover` added), frames flow both ways
//!   compressed, and what reaches the downstream is the plain message.
//! * A deflate bomb (a message inflating past the 4 MiB client limit) is closed with 1009.
//! * `permessage_deflate = false` declines the offer.
//! * `downstream_permessage_deflate = true` against a downstream that declines (the fake,
//!   on axum) runs that leg uncompressed.

mod support;
mod ws_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use nestor_ws_proxy::deflate::negotiate::CLIENT_OFFER;
use nestor_ws_proxy::deflate::DeflateStream;
use support::{fake, nestor_existing, CLIENT_KEY};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use ws_common::*;

const T: Duration = Duration::from_secs(10);

type DeflateWs = WebSocketStream<DeflateStream<TcpStream>>;

/// Connect through nestor offering deflate (Rust client on nestor's adapter); the answer's
/// `Sec-WebSocket-Extensions`.
async fn connect_deflate(url: &str) -> (DeflateWs, Option<String>) {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Extensions", CLIENT_OFFER.parse().unwrap());
    let host = req.uri().authority().unwrap().to_string();
    let tcp = TcpStream::connect(host).await.unwrap();
    let io = DeflateStream::client_sniffing(tcp, 64 << 20);
    let cfg = WebSocketConfig::default().max_message_size(Some(64 << 20));
    let (ws, resp) = tokio::time::timeout(T, tokio_tungstenite::client_async_with_config(req, io, Some(cfg))).await.unwrap().unwrap();
    let ext = resp.headers().get("Sec-WebSocket-Extensions").map(|v| v.to_str().unwrap().to_owned());
    (ws, ext)
}

async fn next_text(ws: &mut DeflateWs) -> String {
    loop {
        match tokio::time::timeout(T, ws.next()).await.expect("a frame in time") {
            Some(Ok(Message::Text(t))) => return t.to_string(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

async fn close_code(ws: &mut DeflateWs) -> Option<u16> {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        match tokio::time::timeout(T, ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_with_deflate_and_a_bomb() {
    let f = fake(0).await;
    // The downstream leg offers too; the fake (axum) declines: that leg runs plain.
    let n = nestor_existing(&[&f], "[websocket]\ndownstream_permessage_deflate = true\n").await;
    let id = create_conversation(&n).await;
    let url = ws_url(&n, &format!("/sockets/events/{id}?resend_mode=all&session_api_key={CLIENT_KEY}"));

    let (mut ws, ext) = connect_deflate(&url).await;
    assert_eq!(ext.as_deref(), Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover"));
    assert!(ws.get_ref().is_active());
    let v: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    assert_eq!(v["key"], "full_state", "{v}");
    let text = r#"{"role":"user","content":[{"type":"text","text":"compressed hello compressed hello compressed hello"}]}"#;
    ws.send(Message::Text(text.into())).await.unwrap();
    let deadline = Instant::now() + T;
    while !f.socket_inbound_frames().iter().any(|fr| fr.contains("compressed hello compressed hello")) {
        assert!(Instant::now() < deadline, "the message never reached the downstream: {:?}", f.socket_inbound_frames());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 8 MiB of one letter compresses to a few KiB; inflated it passes the 4 MiB limit.
    ws.send(Message::Text("a".repeat(8 << 20).into())).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1009));
    assert!(!f.socket_inbound_frames().iter().any(|fr| fr.len() > 1 << 20), "the bomb reached the downstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offer_declined_when_turned_off() {
    let f = fake(0).await;
    let n = nestor_existing(&[&f], "[websocket]\npermessage_deflate = false\n").await;
    let id = create_conversation(&n).await;
    let (mut ws, ext) = connect_deflate(&ws_url(&n, &format!("/sockets/events/{id}?resend_mode=all&session_api_key={CLIENT_KEY}"))).await;
    assert_eq!(ext, None);
    assert!(!ws.get_ref().is_active());
    let v: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    assert_eq!(v["key"], "full_state");
}

/// The agent-server venv's python (scripts/setup-agent-server.sh: cached, prints the venv).
fn venv_python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("timeout")
        .arg("1200")
        .arg("bash")
        .arg(root.join("scripts/setup-agent-server.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/setup-agent-server.sh");
    assert!(out.status.success(), "scripts/setup-agent-server.sh failed: {}", out.status);
    let venv = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_owned();
    Path::new(&venv).join("bin/python")
}

const PY_CLIENT: &str = r#"
import asyncio, json, sys
from websockets.asyncio.client import connect

async def main(url):
    async with connect(url, max_size=None, open_timeout=10) as ws:
        ext = ws.response.headers.get("Sec-WebSocket-Extensions")
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        msg = {"role": "user", "content": [{"type": "text", "text": "python deflate hello " * 20}]}
        await ws.send(json.dumps(msg))
        await asyncio.sleep(0.3)
        await ws.send("b" * (8 << 20))
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        except Exception:
            pass
        print(json.dumps({"ext": ext, "first_key": first.get("key"), "rcvd": ws.close_code}))

asyncio.run(main(sys.argv[1]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_client_through_nestor() {
    let python = tokio::task::spawn_blocking(venv_python).await.unwrap();
    let f = fake(0).await;
    let n = nestor_existing(&[&f], "").await;
    let id = create_conversation(&n).await;
    let url = ws_url(&n, &format!("/sockets/events/{id}?resend_mode=all&session_api_key={CLIENT_KEY}"));
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&python).arg("-c").arg(PY_CLIENT).arg(&url).stdin(Stdio::null()).output(),
    )
    .await
    .expect("python client finished in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python client failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    // websockets offers `permessage-deflate; client_max_window_bits`.
    assert_eq!(v["ext"], "permessage-deflate; server_no_context_takeover", "{v}");
    assert_eq!(v["first_key"], "full_state", "{v}");
    assert_eq!(v["rcvd"], 1009, "{v}");
    assert!(f.socket_inbound_frames().iter().any(|fr| fr.contains("python deflate hello python deflate hello")), "{:?}", f.socket_inbound_frames());
}
