//! `nestor-bench soak`: nestor under steady, moderate traffic for a long time, sampled once
//! a minute, to show that nothing accumulates — resident memory, open file descriptors,
//! latency. A leak that costs a few bytes per request or a descriptor per socket is
//! invisible in a 5-second benchmark and fatal after a week; ten minutes of ~200 requests/s
//! plus socket churn makes it visible as a slope.
//!
//! Setup: `--downstreams` fake agent-server processes (`nestor-fake-agent-server`), the
//! `--conversations` seeded across them, one nestor (release build, `existing` provisioner
//! over all of them) that must catalog every conversation before traffic starts. Traffic,
//! all on loopback, all through nestor:
//!
//! * REST, open loop at `--rest-rps` over `--rest-conns` keep-alive connections, a fixed
//!   mix: 60 % `GET /api/conversations/{id}`, 20 % `GET …/events/search?limit=5`, 10 %
//!   `GET /api/conversations/search?limit=20` (nestor's merged catalog), 5 %
//!   `GET /api/conversations/count`, 5 % `POST …/events` (a user message with `run: true`,
//!   so the fake appends a message and a scripted run's events, which the sockets below
//!   receive).
//! * WebSockets: `--ws-sockets` long-lived `/sockets/events/{id}` sockets reading every
//!   frame (reopened if one ends: counted as a drop), and `--ws-churn-per-sec` short-lived
//!   ones (open, wait for the first frame, close) — the path where a leaked pair or
//!   descriptor would show.
//!
//! Every `--sample-secs` the sampler reads nestor's `VmRSS` and `/proc/<pid>/fd` count and
//! takes the interval's REST latency histogram (p50/p99) and socket counters. Verdict
//! ("flat"), comparing the first full interval (allocator pools and connection pools warm by
//! then) with the end:
//!
//! * RSS: end − first ≤ max(10 % of first, 8 MiB);
//! * fds: end − first ≤ 16 (the churn sockets in flight at a sample vary by a few);
//! * p99: median of the last 3 intervals ≤ 1.5 × median of the first 3 (medians, because a
//!   shared 2-core machine has multi-millisecond stalls in any one minute);
//! * no failed request and no dropped long-lived socket.
//!
//! A failed verdict is reported (exit status 2), not hidden; a harness failure (a process
//! that does not start) is exit status 1 like the other subcommands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use http::{header, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::procs;
use crate::stats::{self, Latency};
use crate::sys;
use crate::ws;

const DOWNSTREAM_KEY: &str = "soak-downstream-key-0123456789";
const CLIENT_KEY: &str = "soak-client-key-0123456789";
/// A request slower than this counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args, Debug, Clone)]
pub struct SoakArgs {
    /// Where to write the JSON results.
    #[arg(long, default_value = "soak-results.json")]
    pub out: PathBuf,
    /// Scratch directory (configs, logs, pid files); default: a new temp dir, removed after.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// The nestor binary (release build).
    #[arg(long, default_value = "target/release/nestor")]
    pub nestor: PathBuf,
    /// The fake agent-server binary.
    #[arg(long, default_value = "target/release/nestor-fake-agent-server")]
    pub fake: PathBuf,
    /// Conversations, seeded evenly across the downstreams.
    #[arg(long, default_value_t = 1000)]
    pub conversations: usize,
    /// Fake agent-server processes.
    #[arg(long, default_value_t = 4)]
    pub downstreams: usize,
    /// Seeded events per conversation.
    #[arg(long, default_value_t = 4)]
    pub events_per_conversation: usize,
    /// How long the traffic runs, seconds.
    #[arg(long, default_value_t = 600)]
    pub duration_secs: u64,
    /// Sampling interval, seconds.
    #[arg(long, default_value_t = 60)]
    pub sample_secs: u64,
    /// REST requests per second (open loop).
    #[arg(long, default_value_t = 200)]
    pub rest_rps: u32,
    /// Keep-alive connections carrying the REST traffic.
    #[arg(long, default_value_t = 16)]
    pub rest_conns: usize,
    /// Long-lived event sockets.
    #[arg(long, default_value_t = 200)]
    pub ws_sockets: usize,
    /// Short-lived event sockets opened (and closed) per second.
    #[arg(long, default_value_t = 5)]
    pub ws_churn_per_sec: u32,
}

/// One sampling interval.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since traffic started, at the end of the interval.
    pub t_secs: f64,
    pub rss_kib: u64,
    pub fds: usize,
    /// REST requests answered in the interval (all kinds).
    pub rest: Latency,
    pub rest_errors: u64,
    /// Open (TCP + upgrade + first frame) of the short-lived sockets.
    pub ws_open: Latency,
    pub ws_open_errors: u64,
    /// Frames received on the long-lived sockets in the interval.
    pub ws_frames: u64,
    pub ws_drops: u64,
    /// REST latency of each request kind in the interval (`get`, `events`, `search`,
    /// `count`, `post`).
    #[serde(default)]
    pub by_kind: std::collections::BTreeMap<String, Latency>,
    /// CPU time (user + system) nestor and the fake downstreams spent in the interval, per
    /// REST request answered: tells a slower nestor from a busier machine.
    #[serde(default)]
    pub nestor_cpu_us_per_req: Option<f64>,
    #[serde(default)]
    pub downstreams_cpu_us_per_req: Option<f64>,
    /// `/proc/loadavg` at the sample (the machine is shared).
    #[serde(default)]
    pub loadavg: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub what: String,
    pub pass: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SoakResults {
    pub date: String,
    pub git_commit: Option<String>,
    pub machine: serde_json::Value,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub settings: serde_json::Value,
    /// nestor once every conversation is cataloged and the long-lived sockets are open,
    /// before the REST traffic starts.
    pub before_traffic: Sample,
    pub samples: Vec<Sample>,
    /// nestor 3 s after all traffic stopped and every socket was closed.
    pub after_traffic: Sample,
    pub rest_total: Latency,
    pub rss_slope_kib_per_min: f64,
    pub checks: Vec<Check>,
    pub pass: bool,
}

/// Everything the traffic tasks count, shared with the sampler.
/// The REST request kinds of the mix, in `Counters::by_kind` order.
const KINDS: [&str; 5] = ["get", "events", "search", "count", "post"];

#[derive(Default)]
struct Counters {
    rest_hist: Mutex<Option<Histogram<u64>>>,
    by_kind: [Mutex<Option<Histogram<u64>>>; 5],
    rest_total: Mutex<Option<Histogram<u64>>>,
    rest_errors: AtomicU64,
    ws_open_hist: Mutex<Option<Histogram<u64>>>,
    ws_open_errors: AtomicU64,
    ws_frames: AtomicU64,
    ws_drops: AtomicU64,
    stop: AtomicBool,
}

impl Counters {
    fn new() -> Arc<Self> {
        let c = Counters::default();
        *c.rest_hist.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats::new_hist());
        *c.rest_total.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats::new_hist());
        *c.ws_open_hist.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats::new_hist());
        for k in &c.by_kind {
            *k.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats::new_hist());
        }
        Arc::new(c)
    }

    fn record(slot: &Mutex<Option<Histogram<u64>>>, ns: u64) {
        if let Some(h) = slot.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            stats::record(h, ns);
        }
    }

    /// Take the interval's histogram, leaving a fresh one.
    fn take(slot: &Mutex<Option<Histogram<u64>>>) -> Latency {
        let mut g = slot.lock().unwrap_or_else(|e| e.into_inner());
        let h = g.replace(stats::new_hist());
        h.map(|h| Latency::from_hist(&h)).unwrap_or_default()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// A tiny deterministic generator (xorshift64*): which conversation a request goes to.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

/// One keep-alive HTTP/1.1 connection that can also `POST` a JSON body.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    from: SocketAddr,
}

impl Conn {
    async fn open(addr: SocketAddr, from: SocketAddr) -> anyhow::Result<Conn> {
        let stream = sys::connect_from(from, addr).await.with_context(|| format!("connecting to {addr}"))?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { sender, addr, from })
    }

    /// Send one request; returns (status, body).
    async fn send(&mut self, method: http::Method, path: &str, body: Option<&str>) -> anyhow::Result<(u16, Bytes)> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.to_string())
            .header("x-session-api-key", CLIENT_KEY);
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        let req = b.body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

pub fn run_cmd(args: SoakArgs) -> anyhow::Result<bool> {
    let (soft, hard) = sys::raise_nofile();
    tracing::info!(soft, hard, "open files limit");
    anyhow::ensure!(args.downstreams >= 1 && args.conversations >= args.downstreams, "need at least one conversation per downstream");
    anyhow::ensure!(args.sample_secs >= 1 && args.duration_secs >= args.sample_secs, "duration must cover at least one sample");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("soak-client").enable_all().build()?;
    let (work, _guard) = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.clone(), None)
        }
        None => {
            let d = std::env::temp_dir().join(format!("nestor-soak-{}-{}", std::process::id(), Uuid::new_v4().simple()));
            std::fs::create_dir_all(&d)?;
            (d.clone(), Some(crate::RemoveOnDrop(d)))
        }
    };
    let result = rt.block_on(async {
        tokio::select! {
            r = soak(&args, &work) => r,
            _ = crate::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    let results = result?;
    crate::report::write_results(&args.out, &results)?;
    #[allow(clippy::print_stdout)]
    {
        print!("{}", table(&results));
    }
    Ok(results.pass)
}

async fn soak(args: &SoakArgs, work: &Path) -> anyhow::Result<SoakResults> {
    let loadavg_start = sys::loadavg();
    for b in [&args.nestor, &args.fake] {
        anyhow::ensure!(b.is_file(), "{} not found: build it first (cargo build --release)", b.display());
    }
    // Downstreams, conversations spread evenly.
    let mut fakes = Vec::new();
    let mut fake_addrs = Vec::new();
    for i in 0..args.downstreams {
        let n = args.conversations / args.downstreams + usize::from(i < args.conversations % args.downstreams);
        let (p, a) = procs::start_fake(&args.fake, work, &format!("fake-{i}"), DOWNSTREAM_KEY, n, args.events_per_conversation).await?;
        fakes.push(p);
        fake_addrs.push(a);
    }
    let (mut nestor, addr) = procs::start_nestor_multi(&args.nestor, work, "nestor-soak", &fake_addrs, DOWNSTREAM_KEY, CLIENT_KEY, &[]).await?;
    let pid = nestor.pid();

    // Every conversation cataloged (bounded), then their ids in nestor's order.
    let mut conn = Conn::open(addr, sys::source_addr(0)).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (st, body) = conn.send(http::Method::GET, "/api/conversations/count", None).await?;
        let n: usize = std::str::from_utf8(&body).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        if st == 200 && n >= args.conversations {
            break;
        }
        if Instant::now() > deadline {
            bail!("nestor cataloged {n} of {} conversations within 120 s (HTTP {st})", args.conversations);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let convs = all_ids(&mut conn).await?;
    anyhow::ensure!(convs.len() >= args.conversations, "nestor lists {} of {} conversations", convs.len(), args.conversations);
    tracing::info!(conversations = convs.len(), downstreams = args.downstreams, "cataloged");

    let counters = Counters::new();
    let target = ws::WsTarget { addr, key: CLIENT_KEY.to_owned(), deflate: false };
    let socket_convs: Vec<Uuid> = convs.iter().take(args.ws_sockets.max(1)).copied().collect();

    // Long-lived sockets, opened before the clock starts.
    let socks = ws::open_many(&target, &socket_convs, args.ws_sockets, 64, Some(ws::lean_config()), Duration::from_secs(120)).await?;
    let mut tasks = Vec::new();
    for (i, s) in socks.into_iter().enumerate() {
        let (t, c, conv) = (target.clone(), counters.clone(), socket_convs[i % socket_convs.len()]);
        tasks.push(tokio::spawn(long_lived(t, c, conv, i, s)));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_traffic = Sample { rss_kib: sys::rss_kib(pid).unwrap_or(0), fds: sys::fd_count(pid).unwrap_or(0), ..Default::default() };
    tracing::info!(rss_kib = before_traffic.rss_kib, fds = before_traffic.fds, sockets = args.ws_sockets, "traffic starts");

    // REST workers: each its own connection and share of the rate.
    let conns = args.rest_conns.max(1);
    let period = Duration::from_secs_f64(conns as f64 / f64::from(args.rest_rps.max(1)));
    for w in 0..conns {
        let (c, convs, socket_convs) = (counters.clone(), convs.clone(), socket_convs.clone());
        tasks.push(tokio::spawn(rest_worker(addr, w, period, c, convs, socket_convs)));
    }
    if args.ws_churn_per_sec > 0 {
        let (c, t, convs) = (counters.clone(), target.clone(), convs.clone());
        tasks.push(tokio::spawn(churn(t, c, convs, Duration::from_secs_f64(1.0 / f64::from(args.ws_churn_per_sec)))));
    }

    // Sampler.
    let started = Instant::now();
    let end = started + Duration::from_secs(args.duration_secs);
    let mut samples = Vec::new();
    let mut next = started + Duration::from_secs(args.sample_secs);
    let fake_pids: Vec<u32> = fakes.iter().map(|f| f.pid()).collect();
    let mut cpu_prev = (sys::cpu_us_sum(&[pid]), sys::cpu_us_sum(&fake_pids));
    while next <= end + Duration::from_millis(10) {
        tokio::time::sleep_until(next.into()).await;
        nestor.check_alive()?;
        for f in fakes.iter_mut() {
            f.check_alive()?;
        }
        let cpu = (sys::cpu_us_sum(&[pid]), sys::cpu_us_sum(&fake_pids));
        let by_kind: std::collections::BTreeMap<String, Latency> =
            KINDS.iter().zip(&counters.by_kind).map(|(k, h)| ((*k).to_owned(), Counters::take(h))).collect();
        let rest = Counters::take(&counters.rest_hist);
        let per_req = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if rest.count > 0 => Some((b - a) / rest.count as f64),
            _ => None,
        };
        let (nestor_cpu, fakes_cpu) = (per_req(cpu_prev.0, cpu.0), per_req(cpu_prev.1, cpu.1));
        cpu_prev = cpu;
        let s = Sample {
            t_secs: started.elapsed().as_secs_f64(),
            by_kind,
            nestor_cpu_us_per_req: nestor_cpu,
            downstreams_cpu_us_per_req: fakes_cpu,
            loadavg: sys::loadavg(),
            rss_kib: sys::rss_kib(pid).unwrap_or(0),
            fds: sys::fd_count(pid).unwrap_or(0),
            rest,
            rest_errors: counters.rest_errors.swap(0, Ordering::Relaxed),
            ws_open: Counters::take(&counters.ws_open_hist),
            ws_open_errors: counters.ws_open_errors.swap(0, Ordering::Relaxed),
            ws_frames: counters.ws_frames.swap(0, Ordering::Relaxed),
            ws_drops: counters.ws_drops.swap(0, Ordering::Relaxed),
        };
        tracing::info!(
            t = s.t_secs as u64,
            rss_kib = s.rss_kib,
            fds = s.fds,
            requests = s.rest.count,
            p50_us = s.rest.p50_us,
            p99_us = s.rest.p99_us,
            errors = s.rest_errors,
            ws_opens = s.ws_open.count,
            ws_frames = s.ws_frames,
            ws_drops = s.ws_drops,
            nestor_cpu_us_per_req = s.nestor_cpu_us_per_req.map(|v| v as u64),
            loadavg = %s.loadavg,
            "sample"
        );
        samples.push(s);
        next += Duration::from_secs(args.sample_secs);
    }

    // Stop everything, then see what nestor lets go of.
    counters.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    nestor.check_alive()?;
    let after_traffic = Sample { t_secs: started.elapsed().as_secs_f64(), rss_kib: sys::rss_kib(pid).unwrap_or(0), fds: sys::fd_count(pid).unwrap_or(0), ..Default::default() };
    let rest_total = Counters::take(&counters.rest_total);
    drop(nestor);
    drop(fakes);

    let (checks, slope) = verdict(&samples);
    let pass = checks.iter().all(|c| c.pass);
    Ok(SoakResults {
        date: crate::today(),
        git_commit: crate::git_commit(),
        machine: sys::machine(),
        loadavg_start,
        loadavg_end: sys::loadavg(),
        settings: serde_json::json!({
            "conversations": args.conversations,
            "downstreams": args.downstreams,
            "events_per_conversation": args.events_per_conversation,
            "duration_secs": args.duration_secs,
            "sample_secs": args.sample_secs,
            "rest_rps": args.rest_rps,
            "rest_conns": args.rest_conns,
            "ws_sockets": args.ws_sockets,
            "ws_churn_per_sec": args.ws_churn_per_sec,
        }),
        before_traffic,
        samples,
        after_traffic,
        rest_total,
        rss_slope_kib_per_min: slope,
        checks,
        pass,
    })
}

/// Every conversation id nestor lists (paged search, bounded).
async fn all_ids(conn: &mut Conn) -> anyhow::Result<Vec<Uuid>> {
    let mut out = Vec::new();
    let mut page: Option<String> = None;
    for _ in 0..1000 {
        let path = match &page {
            Some(p) => format!("/api/conversations/search?limit=100&page_id={p}"),
            None => "/api/conversations/search?limit=100".to_owned(),
        };
        let (st, body) = conn.send(http::Method::GET, &path, None).await?;
        anyhow::ensure!(st == 200, "GET {path}: HTTP {st}");
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        out.extend(v["items"].as_array().into_iter().flatten().filter_map(|i| i["id"].as_str().and_then(|s| Uuid::parse_str(s).ok())));
        match v["next_page_id"].as_str() {
            Some(p) if !p.is_empty() => page = Some(percent_encode(p)),
            _ => return Ok(out),
        }
    }
    bail!("more than 1000 pages of conversations")
}

/// Percent-encode a cursor for a query string (cursors are opaque; encode all but unreserved).
fn percent_encode(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// One REST connection at a fixed rate (open loop: a slow answer delays only this worker's
/// next tick; missed ticks are not burst-replayed).
async fn rest_worker(addr: SocketAddr, w: usize, period: Duration, c: Arc<Counters>, convs: Vec<Uuid>, socket_convs: Vec<Uuid>) {
    let mut rng = Rng::new(w as u64 + 1);
    let mut conn: Option<Conn> = None;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period.mul_f64(w as f64 / 16.0), period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut i: u64 = w as u64;
    while !c.stopped() {
        tick.tick().await;
        if c.stopped() {
            break;
        }
        i += 1;
        let conv = convs[rng.below(convs.len())];
        let (kind, method, path, body) = match i % 20 {
            0..=11 => (0, http::Method::GET, format!("/api/conversations/{conv}"), None),
            12..=15 => (1, http::Method::GET, format!("/api/conversations/{conv}/events/search?limit=5"), None),
            16 | 17 => (2, http::Method::GET, "/api/conversations/search?limit=20".to_owned(), None),
            18 => (3, http::Method::GET, "/api/conversations/count".to_owned(), None),
            _ => {
                // Messages go to conversations with a long-lived socket, so frames flow.
                let conv = socket_convs[rng.below(socket_convs.len())];
                let body = format!(r#"{{"role":"user","content":[{{"type":"text","text":"soak {i}"}}],"run":true}}"#);
                (4, http::Method::POST, format!("/api/conversations/{conv}/events"), Some(body))
            }
        };
        if conn.is_none() {
            match Conn::open(addr, sys::source_addr(w)).await {
                Ok(n) => conn = Some(n),
                Err(e) => {
                    tracing::warn!(error = %e, "REST connect failed");
                    c.rest_errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        }
        let Some(cn) = conn.as_mut() else { continue };
        let t0 = Instant::now();
        match tokio::time::timeout(REQUEST_TIMEOUT, cn.send(method.clone(), &path, body.as_deref())).await {
            Ok(Ok((st, _))) if (200..300).contains(&st) => {
                let ns = t0.elapsed().as_nanos() as u64;
                Counters::record(&c.rest_hist, ns);
                Counters::record(&c.rest_total, ns);
                Counters::record(&c.by_kind[kind], ns);
            }
            other => {
                let what = match other {
                    Ok(Ok((st, b))) => format!("HTTP {st}: {}", String::from_utf8_lossy(&b[..b.len().min(200)])),
                    Ok(Err(e)) => format!("{e:#}"),
                    Err(_) => "timed out".to_owned(),
                };
                tracing::warn!(%method, %path, error = %what, from = %cn.from, "REST request failed");
                c.rest_errors.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
    }
}

/// A long-lived socket: count frames; if it ends, count a drop and reopen (bounded pace).
async fn long_lived(t: ws::WsTarget, c: Arc<Counters>, conv: Uuid, i: usize, mut s: ws::Ws) {
    loop {
        loop {
            if c.stopped() {
                let _ = tokio::time::timeout(Duration::from_secs(2), s.close(None)).await;
                return;
            }
            match tokio::time::timeout(Duration::from_millis(500), s.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(Message::Text(_) | Message::Binary(_)))) => {
                    c.ws_frames.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => {
                    tracing::warn!(%conv, error = %e, "long-lived socket failed");
                    break;
                }
                Ok(None) => {
                    tracing::warn!(%conv, "long-lived socket closed");
                    break;
                }
            }
        }
        c.ws_drops.fetch_add(1, Ordering::Relaxed);
        loop {
            if c.stopped() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            match ws::open(&t, sys::source_addr(i), conv, Some(ws::lean_config())).await {
                Ok(n) => {
                    s = n;
                    break;
                }
                Err(e) => tracing::warn!(%conv, error = %e, "reopening a long-lived socket failed"),
            }
        }
    }
}

/// Short-lived sockets at a fixed pace: open (to the first frame), close.
async fn churn(t: ws::WsTarget, c: Arc<Counters>, convs: Vec<Uuid>, period: Duration) {
    let mut rng = Rng::new(0xC0FFEE);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0usize;
    while !c.stopped() {
        tick.tick().await;
        let conv = convs[rng.below(convs.len())];
        let (t, c) = (t.clone(), c.clone());
        n += 1;
        let from = sys::source_addr(n);
        // Each in its own task, so a slow open does not slow the pace.
        tokio::spawn(async move {
            let t0 = Instant::now();
            match ws::open(&t, from, conv, Some(ws::lean_config())).await {
                Ok(mut s) => {
                    Counters::record(&c.ws_open_hist, t0.elapsed().as_nanos() as u64);
                    let _ = tokio::time::timeout(Duration::from_secs(2), s.close(None)).await;
                }
                Err(e) => {
                    tracing::warn!(%conv, error = %e, "short-lived socket failed");
                    c.ws_open_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The flatness checks over the samples, and the RSS slope (least squares, KiB/min).
pub fn verdict(samples: &[Sample]) -> (Vec<Check>, f64) {
    let mut checks = Vec::new();
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return (vec![Check { what: "samples".into(), pass: false, detail: "no samples".into() }], 0.0);
    };
    let growth = last.rss_kib as i64 - first.rss_kib as i64;
    let allowed = ((first.rss_kib / 10).max(8 * 1024)) as i64;
    checks.push(Check {
        what: "RSS flat".into(),
        pass: growth <= allowed,
        detail: format!("{} → {} KiB ({growth:+} KiB; allowed +{allowed})", first.rss_kib, last.rss_kib),
    });
    let fd_growth = last.fds as i64 - first.fds as i64;
    checks.push(Check {
        what: "no fd growth".into(),
        pass: fd_growth <= 16,
        detail: format!("{} → {} ({fd_growth:+}; allowed +16)", first.fds, last.fds),
    });
    let k = samples.len().min(3);
    let head = median(samples[..k].iter().map(|s| s.rest.p99_us).collect());
    let tail = median(samples[samples.len() - k..].iter().map(|s| s.rest.p99_us).collect());
    checks.push(Check {
        what: "p99 stable".into(),
        pass: tail <= 1.5 * head.max(1.0),
        detail: format!("median p99 of the first {k} intervals {head:.0} µs, of the last {k} {tail:.0} µs (allowed ≤ 1.5×)"),
    });
    let errors: u64 = samples.iter().map(|s| s.rest_errors + s.ws_open_errors).sum();
    let drops: u64 = samples.iter().map(|s| s.ws_drops).sum();
    checks.push(Check {
        what: "no errors".into(),
        pass: errors == 0 && drops == 0,
        detail: format!("{errors} failed requests/socket opens, {drops} long-lived sockets dropped"),
    });
    // Least squares slope of RSS against minutes.
    let n = samples.len() as f64;
    let xs: Vec<f64> = samples.iter().map(|s| s.t_secs / 60.0).collect();
    let ys: Vec<f64> = samples.iter().map(|s| s.rss_kib as f64).collect();
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (checks, slope)
}

pub fn table(r: &SoakResults) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "\nsoak: {} conversations on {} downstreams, {} s", r.settings["conversations"], r.settings["downstreams"], r.settings["duration_secs"]);
    let _ = writeln!(
        o,
        "{:>7} {:>10} {:>6} {:>9} {:>9} {:>9} {:>7} {:>8} {:>10} {:>9} {:>6} {:>10} {:>10}  p99 µs by kind (get/events/search/count/post), loadavg",
        "t s", "RSS KiB", "fds", "requests", "p50 µs", "p99 µs", "errors", "ws opens", "open p99", "frames", "drops", "nestor µs", "fakes µs"
    );
    let b = &r.before_traffic;
    let _ = writeln!(o, "{:>7} {:>10} {:>6}   (before traffic)", 0, b.rss_kib, b.fds);
    for s in &r.samples {
        let _ = writeln!(
            o,
            "{:>7.0} {:>10} {:>6} {:>9} {:>9.0} {:>9.0} {:>7} {:>8} {:>10.0} {:>9} {:>6} {:>10.1} {:>10.1}  {} | {}",
            s.t_secs,
            s.rss_kib,
            s.fds,
            s.rest.count,
            s.rest.p50_us,
            s.rest.p99_us,
            s.rest_errors + s.ws_open_errors,
            s.ws_open.count,
            s.ws_open.p99_us,
            s.ws_frames,
            s.ws_drops,
            s.nestor_cpu_us_per_req.unwrap_or(f64::NAN),
            s.downstreams_cpu_us_per_req.unwrap_or(f64::NAN),
            KINDS.iter().map(|k| s.by_kind.get(*k).map(|l| format!("{:.0}", l.p99_us)).unwrap_or_default()).collect::<Vec<_>>().join("/"),
            s.loadavg
        );
    }
    let a = &r.after_traffic;
    let _ = writeln!(o, "{:>7.0} {:>10} {:>6}   (3 s after traffic stopped)", a.t_secs, a.rss_kib, a.fds);
    let _ = writeln!(o, "REST overall: {} requests, p50 {:.0} µs, p99 {:.0} µs; RSS slope {:+.1} KiB/min", r.rest_total.count, r.rest_total.p50_us, r.rest_total.p99_us, r.rss_slope_kib_per_min);
    for c in &r.checks {
        let _ = writeln!(o, "  [{}] {}: {}", if c.pass { "pass" } else { "FAIL" }, c.what, c.detail);
    }
    let _ = writeln!(o, "verdict: {}", if r.pass { "PASS (flat)" } else { "FAIL" });
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: f64, rss: u64, fds: usize, p99: f64) -> Sample {
        Sample { t_secs: t, rss_kib: rss, fds, rest: Latency { p99_us: p99, count: 10, ..Default::default() }, ..Default::default() }
    }

    #[test]
    fn flat_run_passes_and_a_leak_fails() {
        let flat: Vec<_> = (1..=10).map(|m| s(m as f64 * 60.0, 60_000 + (m % 2) * 300, 250 + (m as usize % 3), 2000.0)).collect();
        let (checks, slope) = verdict(&flat);
        assert!(checks.iter().all(|c| c.pass), "{checks:?}");
        assert!(slope.abs() < 100.0, "{slope}");

        let leak: Vec<_> = (1..=10).map(|m| s(m as f64 * 60.0, 60_000 + m * 2_000, 250 + m as usize * 10, 2000.0 + m as f64 * 500.0)).collect();
        let (checks, slope) = verdict(&leak);
        assert!(checks.iter().filter(|c| !c.pass).count() >= 3, "{checks:?}");
        assert!((slope - 2_000.0).abs() < 1.0, "{slope}");
    }

    #[test]
    fn rng_stays_in_range() {
        let mut r = Rng::new(7);
        for n in 1..200 {
            assert!(r.below(n) < n);
        }
    }
}
