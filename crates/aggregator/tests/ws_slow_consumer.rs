//! A client that stops reading is dropped once nestor has queued `[websocket]
//! max_pending_bytes` for it (16 MiB by default, the agent-server's rule; 1 MiB here), so
//! nestor's memory stays bounded whatever the downstream sends; clients that read, or that
//! pause below the limit, are not affected.

mod support;
mod ws_common;

use std::time::{Duration, Instant};

use nestor_test_support::{FakeAgentServer, FakeConfig};
use serde_json::json;
use support::{nestor_existing, CLIENT_KEY};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use ws_common::*;

const LIMIT: usize = 1 << 20;
const FRAME: usize = 256 << 10;

fn fake_config() -> FakeConfig {
    FakeConfig { ws_ping_interval: None, system_prompt_event: false, ..FakeConfig::with_key("downstream-key-slow-0123") }
}

/// A client socket with a small kernel receive buffer (so what it does not read piles up
/// in nestor, not in the kernel).
async fn tight_client(url: &str) -> Ws {
    let addr: std::net::SocketAddr = url.trim_start_matches("ws://").split('/').next().unwrap().parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 << 10).unwrap();
    let tcp = sock.connect(addr).await.unwrap();
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("X-Session-API-Key", CLIENT_KEY.parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(tcp)).await.unwrap();
    ws
}

/// Publish `count` transient frames of `FRAME` bytes.
fn publish(f: &FakeAgentServer, id: uuid::Uuid, count: usize, tag: &str) {
    for i in 0..count {
        f.publish_transient(id, json!({"source": "agent", "content": format!("{tag}{i}:{}", "x".repeat(FRAME)), "kind": "StreamingDeltaEvent"}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped_at_the_limit_and_memory_stays_bounded() {
    const SLOW: usize = 6;
    const FRAMES: usize = 160; // 40 MiB to every socket
    let f = FakeAgentServer::start(fake_config()).await.unwrap();
    let n = nestor_existing(&[&f], &format!("[websocket]\nmax_pending_bytes = {LIMIT}")).await;
    let id = create_conversation(&n).await;

    // One reader that keeps up, and slow clients on both socket kinds that read their first
    // frame and then nothing.
    let mut fast = open(&n, &format!("/sockets/events/{id}")).await;
    assert_eq!(must_json(&mut fast).await["key"], "full_state");
    let mut slow = Vec::new();
    for i in 0..SLOW {
        let path = if i % 2 == 0 { format!("/sockets/events/{id}") } else { format!("/sockets/session/{id}") };
        let mut ws = tight_client(&ws_url(&n, &path)).await;
        must_json(&mut ws).await;
        slow.push(ws);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.subscriber_count(id) < SLOW + 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reader = tokio::spawn(async move {
        let mut frames = 0usize;
        let mut bytes = 0usize;
        while frames < FRAMES {
            match next(&mut fast, Duration::from_secs(30)).await {
                Next::Text(t) => {
                    if t.contains("StreamingDeltaEvent") {
                        frames += 1;
                        bytes += t.len();
                    }
                }
                other => panic!("the reading client lost its socket: {other:?}"),
            }
        }
        (fast, bytes)
    });

    let rss0 = rss_bytes();
    let t0 = Instant::now();
    let mut peak = rss0;
    // One frame (a quarter of the limit) every 10 ms: a reader that keeps up never has the
    // limit queued. (A burst larger than the limit can drop even a reading client, as on
    // the agent-server: nestor reads the downstream as fast as it sends.)
    for chunk in 0..FRAMES {
        publish(&f, id, 1, &format!("c{chunk}-"));
        tokio::time::sleep(Duration::from_millis(10)).await;
        peak = peak.max(rss_bytes());
    }
    let (mut fast, bytes) = tokio::time::timeout(Duration::from_secs(60), reader).await.expect("the reader got everything").unwrap();
    assert!(bytes >= FRAMES * FRAME);
    let published = t0.elapsed();
    // The slow clients' downstream subscriptions are gone: only the reader's is left.
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.subscriber_count(id) > 1 {
        assert!(Instant::now() < deadline, "slow consumers still subscribed downstream: {}", f.subscriber_count(id));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Each slow client finds its socket ended after what little was buffered for it.
    for (i, mut ws) in slow.into_iter().enumerate() {
        let mut got = 0usize;
        loop {
            match next(&mut ws, Duration::from_secs(10)).await {
                Next::Text(t) => got += t.len(),
                Next::Closed(..) => break,
                Next::Timeout => panic!("slow client {i} still open after reading {got} bytes"),
            }
        }
        assert!(got < 8 * LIMIT, "slow client {i} was sent {got} bytes before being dropped");
    }
    // The reader is untouched and still live.
    f.publish_transient(id, json!({"source": "agent", "content": "after", "kind": "StreamingDeltaEvent"}));
    loop {
        match next(&mut fast, Duration::from_secs(10)).await {
            Next::Text(t) if t.contains("\"after\"") => break,
            Next::Text(_) => continue,
            other => panic!("{other:?}"),
        }
    }
    let grew = peak.saturating_sub(rss0);
    eprintln!(
        "{} MiB to {SLOW} non-reading clients + 1 reader in {published:?}; RSS {} MiB -> peak {} MiB (+{} MiB)",
        (FRAMES * FRAME * (SLOW + 1)) >> 20,
        rss0 >> 20,
        peak >> 20,
        grew >> 20
    );
    // Unbounded queues would hold ~40 MiB per slow client (240 MiB); the bound is 1 MiB each
    // plus frames in flight through the fake, nestor and the reader.
    assert!(grew < 96 << 20, "RSS grew by {} MiB", grew >> 20);
    // Each drop was counted (at least: the recorder is shared with the other test here).
    assert!(metric(&n, "nestor_ws_slow_consumers_total").await.unwrap() >= SLOW as f64);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_pauses_below_the_limit_is_kept() {
    let f = FakeAgentServer::start(fake_config()).await.unwrap();
    let n = nestor_existing(&[&f], &format!("[websocket]\nmax_pending_bytes = {LIMIT}")).await;
    let id = create_conversation(&n).await;
    let mut ws = tight_client(&ws_url(&n, &format!("/sockets/session/{id}"))).await;
    assert_eq!(must_json(&mut ws).await["type"], "sync");
    assert_eq!(must_json(&mut ws).await["type"], "transient");
    // Pause while ~half the limit is published (a little more is in kernel buffers).
    publish(&f, id, LIMIT / FRAME / 2, "p");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seq = f.append_event(id, json!({"source": "agent", "kind": "PauseEvent"}));
    let mut frames = 0;
    loop {
        let v = must_json(&mut ws).await;
        if v["type"] == "durable" {
            assert_eq!(v["seq"], seq);
            break;
        }
        frames += 1;
    }
    assert_eq!(frames, LIMIT / FRAME / 2);
    n.stop().await;
}

/// One frame larger than the whole limit (under the 64 MiB frame limit) reaches a client
/// that reads: the limit counts what waits behind the frame being written, not the frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_frame_larger_than_the_limit_reaches_a_reading_client() {
    let f = FakeAgentServer::start(fake_config()).await.unwrap();
    let n = nestor_existing(&[&f], &format!("[websocket]\nmax_pending_bytes = {LIMIT}")).await;
    let id = create_conversation(&n).await;
    for path in [
        format!("/sockets/events/{id}"),
        format!("/sockets/session/{id}"),
    ] {
        let mut ws = open(&n, &path).await;
        must_json(&mut ws).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while f.subscriber_count(id) < 1 {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let big = "y".repeat(3 * LIMIT);
        f.publish_transient(id, json!({"source": "agent", "content": format!("big:{big}"), "kind": "StreamingDeltaEvent"}));
        f.publish_transient(
            id,
            json!({"source": "agent", "content": "after-big", "kind": "StreamingDeltaEvent"}),
        );
        let (mut got_big, mut got_after) = (false, false);
        while !got_after {
            match next(&mut ws, Duration::from_secs(20)).await {
                Next::Text(t) if t.contains("big:") => {
                    assert!(t.len() > 3 * LIMIT);
                    got_big = true;
                }
                Next::Text(t) if t.contains("after-big") => got_after = true,
                Next::Text(_) => {}
                other => panic!("{path}: the reading client lost its socket: {other:?}"),
            }
        }
        assert!(got_big, "{path}: the large frame came before the next one");
        drop(ws);
        let deadline = Instant::now() + Duration::from_secs(10);
        while f.subscriber_count(id) > 0 {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    n.stop().await;
}
