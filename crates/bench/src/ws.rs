//! WebSocket workloads on `/sockets/events/{id}`.
//!
//! The downstream is the fake agent-server running in this process (on its own runtime):
//! frames are pushed with its public `publish_transient` API, each a ~1 KiB `MessageEvent`
//! carrying the publish time (`bench_t`, ns on this process's clock) so the client measures
//! one-way latency. Publishing is credit-based (at most `window` frames in flight per pair)
//! so no queue on the path — the fake's per-subscriber queue, nestor's per-client queue —
//! ever overflows and the measured rate is what the path sustains.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use nestor_test_support::FakeAgentServer;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use nestor_ws_proxy::deflate::negotiate::CLIENT_OFFER;
use nestor_ws_proxy::deflate::DeflateStream;
use uuid::Uuid;

use crate::stats::{self, Latency};
use crate::sys::{self, now_ns};

/// A client socket; with [`WsTarget::deflate`] it offers permessage-deflate, through
/// nestor's own adapter (nestor accepts; the fake and nginx decline, so they run plain).
pub type Ws = WebSocketStream<DeflateStream<TcpStream>>;

/// Bound on one connection (TCP + handshake + first frame).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Where to open sockets for one target.
#[derive(Debug, Clone)]
pub struct WsTarget {
    pub addr: SocketAddr,
    pub key: String,
    /// Offer permessage-deflate.
    pub deflate: bool,
}

/// A small-buffer client configuration (thousands of idle sockets stay cheap in the bench).
pub fn lean_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
}

/// Open `/sockets/events/{conv}` from source address `from` and wait for its first frame
/// (the `full_state` snapshot: the pair is established end to end).
pub async fn open(t: &WsTarget, from: SocketAddr, conv: Uuid, cfg: Option<WebSocketConfig>) -> anyhow::Result<Ws> {
    let fut = async {
        let stream = sys::connect_from(from, t.addr).await.with_context(|| format!("connecting to {}", t.addr))?;
        let mut req = format!("ws://{}/sockets/events/{conv}", t.addr).into_client_request()?;
        req.headers_mut().insert("x-session-api-key", t.key.parse()?);
        let stream = if t.deflate {
            req.headers_mut().insert("sec-websocket-extensions", CLIENT_OFFER.parse()?);
            DeflateStream::client_sniffing(stream, 64 << 20)
        } else {
            DeflateStream::plain(stream)
        };
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, stream, cfg).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(_))) => return Ok(ws),
                Some(Ok(Message::Close(f))) => bail!("closed before the first frame: {f:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => bail!("closed before the first frame"),
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, fut).await.context("socket did not open in time")?
}

/// Open `n` sockets with at most `concurrency` handshakes in flight, spread over `convs`
/// and over several loopback source addresses. Bounded by `within`.
pub async fn open_many(
    t: &WsTarget,
    convs: &[Uuid],
    n: usize,
    concurrency: usize,
    cfg: Option<WebSocketConfig>,
    within: Duration,
) -> anyhow::Result<Vec<Ws>> {
    let sem = Arc::new(Semaphore::new(concurrency));
    let deadline = Instant::now() + within;
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (t, sem, conv) = (t.clone(), sem.clone(), convs[i % convs.len()]);
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            if Instant::now() > deadline {
                bail!("out of time opening sockets");
            }
            open(&t, sys::source_addr(i), conv, cfg).await
        }));
    }
    let mut out = Vec::with_capacity(n);
    let mut first_err = None;
    for task in tasks {
        match task.await? {
            Ok(ws) => out.push(ws),
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
    }
    if let Some(e) = first_err {
        let opened = out.len();
        close_all(out).await;
        return Err(e.context(format!("opened only {opened} of {n} sockets")));
    }
    Ok(out)
}

/// Close sockets politely (bounded), in parallel.
pub async fn close_all(socks: Vec<Ws>) {
    let tasks: Vec<_> = socks
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

/// `bench_t` of a frame, if it is one of ours.
pub fn bench_t(text: &str) -> Option<u64> {
    let pat = b"\"bench_t\":";
    let b = text.as_bytes();
    let at = memchr::memmem::find(b, pat)? + pat.len();
    let digits = b[at..].iter().take_while(|c| c.is_ascii_digit()).count();
    std::str::from_utf8(&b[at..at + digits]).ok()?.parse().ok()
}

/// The in-process downstream and how frames are made.
#[derive(Clone)]
pub struct Pusher {
    pub fake: FakeAgentServer,
    pub rt: tokio::runtime::Handle,
    pad: Arc<str>,
}

impl Pusher {
    /// Frames of about `frame_bytes` bytes on the wire.
    pub fn new(fake: FakeAgentServer, rt: tokio::runtime::Handle, frame_bytes: usize) -> Self {
        // What the fake adds (`id`, `timestamp`) and our fields, at their widest.
        let sample = json!({
            "id": Uuid::nil().to_string(),
            "timestamp": "2026-01-01T00:00:00.000000",
            "kind": "MessageEvent",
            "source": "agent",
            "bench_t": 10_000_000_000_000u64,
            "bench_seq": 10_000_000u64,
            "pad": "",
        });
        let base = serde_json::to_string(&sample).map(|s| s.len()).unwrap_or(200);
        let pad: String = "x".repeat(frame_bytes.saturating_sub(base));
        Self { fake, rt, pad: pad.into() }
    }

    fn event(&self, seq: u64) -> Value {
        json!({
            "kind": "MessageEvent",
            "source": "agent",
            "bench_t": now_ns(),
            "bench_seq": seq,
            "pad": &*self.pad,
        })
    }

    pub fn push(&self, conv: Uuid, seq: u64) {
        self.fake.publish_transient(conv, self.event(seq));
    }
}

/// Credit between one pair's client reader and its publisher.
struct Credit {
    received: AtomicU64,
    /// The publisher wants a wake-up once `received` reaches this.
    wake_at: AtomicU64,
    notify: Notify,
    stop: AtomicBool,
}

/// Publish to `conv` as fast as credit allows (on the fake's runtime).
async fn publisher(p: Pusher, conv: Uuid, credit: Arc<Credit>, window: u64) {
    let low = window / 2;
    let mut published = 0u64;
    while !credit.stop.load(Ordering::Relaxed) {
        credit.wake_at.store(u64::MAX, Ordering::SeqCst);
        let mut burst = 0;
        while published - credit.received.load(Ordering::Acquire) < window && burst < 64 {
            p.push(conv, published);
            published += 1;
            burst += 1;
        }
        if burst == 64 {
            tokio::task::yield_now().await;
            continue;
        }
        credit.wake_at.store(published - low, Ordering::SeqCst);
        if published - credit.received.load(Ordering::SeqCst) <= low {
            continue;
        }
        tokio::select! {
            _ = credit.notify.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// Measurement window on publish times, shared with the readers.
struct Window {
    start_ns: AtomicU64,
    end_ns: AtomicU64,
}

/// Read one pair's frames: count them, give credit back, record latencies of frames
/// published inside the window. Ends on `quit` (closing politely) or when the socket ends.
async fn reader(mut ws: Ws, credit: Arc<Credit>, total: Arc<AtomicU64>, win: Arc<Window>, mut quit: watch::Receiver<bool>) -> (Histogram<u64>, bool) {
    let mut h = stats::new_hist();
    let mut healthy = true;
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let now = now_ns();
                    if let Some(sent) = bench_t(t.as_str()) {
                        let r = credit.received.fetch_add(1, Ordering::AcqRel) + 1;
                        total.fetch_add(1, Ordering::Relaxed);
                        if r >= credit.wake_at.load(Ordering::SeqCst) {
                            credit.notify.notify_one();
                        }
                        if sent >= win.start_ns.load(Ordering::Relaxed) && sent < win.end_ns.load(Ordering::Relaxed) {
                            stats::record(&mut h, now.saturating_sub(sent));
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => { healthy = false; break; }
            },
            _ = quit.changed() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                break;
            }
        }
    }
    (h, healthy)
}

/// How long a streaming run lasts.
#[derive(Debug, Clone, Copy)]
pub enum Span {
    /// Warm up, then measure for a fixed time.
    Time { warmup: Duration, measure: Duration },
    /// Warm up with `warmup` frames, then measure `frames` frames (bounded by `limit`).
    Frames { warmup: u64, frames: u64, limit: Duration },
}

/// What one streaming run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamResult {
    pub pairs: usize,
    pub window: u64,
    pub frame_bytes: usize,
    pub frames: u64,
    pub frames_per_sec: f64,
    /// MiB/s of frame payload.
    pub payload_mib_per_sec: f64,
    pub latency: Latency,
    /// CPU time of the proxy per frame, in µs (None: direct).
    pub proxy_cpu_us_per_frame: Option<f64>,
    /// Proxy RSS with all pairs open and streaming, KiB.
    pub proxy_rss_kib: Option<u64>,
    /// Pairs that ended before the run did (should be 0).
    pub broken_pairs: usize,
}

/// Stream frames through `pairs` sockets (one conversation each from `convs`), `window`
/// frames in flight per pair.
#[allow(clippy::too_many_arguments)]
pub async fn stream(
    p: &Pusher,
    t: &WsTarget,
    convs: &[Uuid],
    pairs: usize,
    window: u64,
    span: Span,
    proxy_pids: &[u32],
    hist: &mut Histogram<u64>,
) -> anyhow::Result<StreamResult> {
    let socks = open_many(t, convs, pairs, 64, None, Duration::from_secs(120)).await?;
    let frame_bytes = {
        let probe = p.event(0);
        serde_json::to_string(&probe).map(|s| s.len()).unwrap_or(0) + 70 // + id and timestamp
    };
    let total = Arc::new(AtomicU64::new(0));
    let win = Arc::new(Window { start_ns: AtomicU64::new(u64::MAX), end_ns: AtomicU64::new(u64::MAX) });
    let (quit_tx, quit_rx) = watch::channel(false);
    let mut readers = Vec::with_capacity(pairs);
    let mut credits = Vec::with_capacity(pairs);
    let mut pubs = Vec::with_capacity(pairs);
    for (i, ws) in socks.into_iter().enumerate() {
        let credit = Arc::new(Credit {
            received: AtomicU64::new(0),
            wake_at: AtomicU64::new(u64::MAX),
            notify: Notify::new(),
            stop: AtomicBool::new(false),
        });
        readers.push(tokio::spawn(reader(ws, credit.clone(), total.clone(), win.clone(), quit_rx.clone())));
        let conv = convs[i % convs.len()];
        pubs.push(p.rt.spawn(publisher(p.clone(), conv, credit.clone(), window)));
        credits.push(credit);
    }
    let outcome = async {
        let (c0, t0, cpu0, c1, t1, cpu1);
        match span {
            Span::Time { warmup, measure } => {
                tokio::time::sleep(warmup).await;
                c0 = total.load(Ordering::Relaxed);
                t0 = now_ns();
                cpu0 = sys::cpu_us_sum(proxy_pids);
                win.start_ns.store(t0, Ordering::Relaxed);
                tokio::time::sleep(measure).await;
                t1 = now_ns();
                win.end_ns.store(t1, Ordering::Relaxed);
                c1 = total.load(Ordering::Relaxed);
                cpu1 = sys::cpu_us_sum(proxy_pids);
            }
            Span::Frames { warmup, frames, limit } => {
                let deadline = Instant::now() + limit;
                while total.load(Ordering::Relaxed) < warmup {
                    if Instant::now() > deadline {
                        bail!("warm-up frames did not arrive within {limit:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                c0 = total.load(Ordering::Relaxed);
                t0 = now_ns();
                cpu0 = sys::cpu_us_sum(proxy_pids);
                win.start_ns.store(t0, Ordering::Relaxed);
                while total.load(Ordering::Relaxed) < c0 + frames {
                    if Instant::now() > deadline {
                        bail!("{frames} frames did not arrive within {limit:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                t1 = now_ns();
                win.end_ns.store(t1, Ordering::Relaxed);
                c1 = total.load(Ordering::Relaxed);
                cpu1 = sys::cpu_us_sum(proxy_pids);
            }
        }
        let rss = if proxy_pids.is_empty() { None } else { sys::rss_kib_sum(proxy_pids) };
        Ok((c1 - c0, (t1 - t0) as f64 / 1e9, cpu0, cpu1, rss))
    }
    .await;
    for c in &credits {
        c.stop.store(true, Ordering::Relaxed);
        c.notify.notify_one();
    }
    for pb in pubs {
        let _ = tokio::time::timeout(Duration::from_secs(5), pb).await;
    }
    let _ = quit_tx.send(true);
    let mut round = stats::new_hist();
    let mut broken = 0;
    for r in readers {
        match tokio::time::timeout(Duration::from_secs(10), r).await {
            Ok(Ok((h, healthy))) => {
                round.add(&h).ok();
                if !healthy {
                    broken += 1;
                }
            }
            _ => broken += 1,
        }
    }
    let (frames, secs, cpu0, cpu1, rss) = outcome?;
    if frames == 0 {
        bail!("no frame arrived through {}", t.addr);
    }
    hist.add(&round).ok();
    let fps = frames as f64 / secs;
    Ok(StreamResult {
        pairs,
        window,
        frame_bytes,
        frames,
        frames_per_sec: fps,
        payload_mib_per_sec: fps * frame_bytes as f64 / (1024.0 * 1024.0),
        latency: Latency::from_hist(&round),
        proxy_cpu_us_per_frame: match (cpu0, cpu1) {
            (Some(a), Some(b)) if !proxy_pids.is_empty() => Some((b - a) / frames as f64),
            _ => None,
        },
        proxy_rss_kib: rss,
        broken_pairs: broken,
    })
}

/// What idle pairs cost the proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleResult {
    pub pairs: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// (after − before) / pairs.
    pub rss_per_pair_kib: f64,
    pub fds_before: usize,
    pub fds_after: usize,
    pub open_secs: f64,
}

/// Open `n` idle pairs, measure the RSS of `pids` before and after (settled), close them.
pub async fn idle(t: &WsTarget, convs: &[Uuid], n: usize, pids: &[u32], fd_pids: &[u32]) -> anyhow::Result<IdleResult> {
    let fds = || fd_pids.iter().filter_map(|p| sys::fd_count(*p)).sum::<usize>();
    let rss_before = sys::rss_kib_sum(pids).context("reading RSS")?;
    let fds_before = fds();
    let start = Instant::now();
    let socks = open_many(t, convs, n, 128, Some(lean_config()), Duration::from_secs(240)).await?;
    let open_secs = start.elapsed().as_secs_f64();
    // Let the proxy finish whatever follows a handshake (timers, buffers) before sampling.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss_after = sys::rss_kib_sum(pids).context("reading RSS")?;
    let fds_after = fds();
    close_all(socks).await;
    // Wait (bounded) for the proxy to let go of the pairs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while fds() > fds_before + 16 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(IdleResult {
        pairs: n,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_per_pair_kib: (rss_after as f64 - rss_before as f64) / n as f64,
        fds_before,
        fds_after,
        open_secs,
    })
}

/// What a downstream restart did to a client's stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumeResult {
    pub trials: usize,
    /// Did the client's socket survive every restart and get frames again?
    pub resumed: bool,
    /// From the downstream listening again to the first frame (any) at the client, ms.
    pub first_frame_ms: Vec<f64>,
    /// From the downstream listening again to the first frame published after that moment, ms.
    pub first_live_frame_ms: Vec<f64>,
    /// How long the fake took to stop and rebind (downtime), ms.
    pub downtime_ms: Vec<f64>,
    /// When the client's socket was closed instead, after how long (ms from the restart).
    pub client_closed_after_ms: Option<f64>,
    /// Publish period during the test, ms (the resolution of `first_live_frame_ms`).
    pub publish_period_ms: f64,
}

enum Seen {
    Frame { at: u64, sent: Option<u64> },
    Closed { at: u64 },
}

/// Restart the downstream `trials` times while a client streams through `t`.
pub async fn resume(p: &Pusher, t: &WsTarget, conv: Uuid, trials: usize) -> anyhow::Result<ResumeResult> {
    let period = Duration::from_millis(1);
    let mut ws = open(t, sys::source_addr(0), conv, None).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (quit_tx, mut quit_rx) = watch::channel(false);
    let reader = tokio::spawn(async move {
        loop {
            tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(Message::Text(txt))) => { let _ = tx.send(Seen::Frame { at: now_ns(), sent: bench_t(txt.as_str()) }); }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => { let _ = tx.send(Seen::Closed { at: now_ns() }); break; }
                    Some(Ok(_)) => {}
                },
                _ = quit_rx.changed() => { let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await; break; }
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (p2, stop) = (p.clone(), stop.clone());
        p.rt.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                p2.push(conv, seq);
                seq += 1;
            }
        })
    };
    let mut out = ResumeResult {
        trials,
        resumed: true,
        first_frame_ms: vec![],
        first_live_frame_ms: vec![],
        downtime_ms: vec![],
        client_closed_after_ms: None,
        publish_period_ms: period.as_secs_f64() * 1e3,
    };
    let result = async {
        for trial in 0..trials {
            // Streaming before the restart?
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut live = 0;
            while live < 20 {
                match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                    Ok(Some(Seen::Frame { sent: Some(_), .. })) => live += 1,
                    Ok(Some(Seen::Frame { .. })) => {}
                    Ok(Some(Seen::Closed { .. })) | Ok(None) => bail!("the client socket closed before trial {trial}"),
                    Err(_) => bail!("no frames before trial {trial}"),
                }
            }
            let t_down = now_ns();
            let fake = p.fake.clone();
            p.rt.spawn(async move { fake.restart().await }).await.context("restarting the fake")?;
            let t_up = now_ns();
            out.downtime_ms.push((t_up - t_down) as f64 / 1e6);
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut first_any = None;
            loop {
                match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                    Ok(Some(Seen::Frame { at, sent })) => {
                        if at >= t_up && first_any.is_none() {
                            first_any = Some(at);
                        }
                        if sent.is_some_and(|s| s >= t_up) {
                            out.first_frame_ms.push((first_any.unwrap_or(at) - t_up) as f64 / 1e6);
                            out.first_live_frame_ms.push((at - t_up) as f64 / 1e6);
                            break;
                        }
                    }
                    Ok(Some(Seen::Closed { at })) => {
                        out.resumed = false;
                        out.client_closed_after_ms = Some(at.saturating_sub(t_down) as f64 / 1e6);
                        return Ok(());
                    }
                    Ok(None) => {
                        out.resumed = false;
                        out.client_closed_after_ms = Some(now_ns().saturating_sub(t_down) as f64 / 1e6);
                        return Ok(());
                    }
                    Err(_) => {
                        out.resumed = false;
                        return Ok(());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(5), publisher).await;
    let _ = quit_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
    result?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_publish_time_back() {
        let frame = r#"{"id":"x","timestamp":"2026-01-01T00:00:00.000000","kind":"MessageEvent","source":"agent","bench_t":123456789,"bench_seq":3,"pad":"xx"}"#;
        assert_eq!(bench_t(frame), Some(123456789));
        assert_eq!(bench_t(r#"{"kind":"ConversationStateUpdateEvent"}"#), None);
    }
}
