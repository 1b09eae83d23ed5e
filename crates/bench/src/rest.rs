//! REST workload: `GET /api/conversations/{id}` over keep-alive HTTP/1.1 connections,
//! sequential (one connection) and closed-loop (N connections for a fixed time).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{header, Request};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::stats::{self, Latency};
use crate::sys;

/// Per-request bound: a request slower than this is a harness error, not a sample.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to send the requests of one target.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    pub addr: SocketAddr,
    /// `X-Session-API-Key` to present.
    pub key: String,
    pub path: String,
}

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    sender: SendRequest<Empty<Bytes>>,
    host: http::HeaderValue,
}

impl Conn {
    pub async fn open(addr: SocketAddr, from: SocketAddr) -> anyhow::Result<Conn> {
        let stream = sys::connect_from(from, addr).await.with_context(|| format!("connecting to {addr}"))?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { sender, host: http::HeaderValue::from_str(&addr.to_string())? })
    }

    /// `GET path`; returns (status, body length).
    pub async fn get(&mut self, path: &str, key: Option<&str>) -> anyhow::Result<(u16, usize)> {
        let mut b = Request::get(path).header(header::HOST, self.host.clone());
        if let Some(k) = key {
            b = b.header("x-session-api-key", k);
        }
        let req = b.body(Empty::new())?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body.len()))
    }
}

/// Status of one `GET` on a fresh connection (for readiness checks).
pub async fn get_status(addr: SocketAddr, path: &str, key: Option<&str>) -> anyhow::Result<u16> {
    let mut c = Conn::open(addr, sys::source_addr(0)).await?;
    Ok(c.get(path, key).await?.0)
}

/// `GET` a JSON document.
pub async fn get_json(addr: SocketAddr, path: &str, key: &str) -> anyhow::Result<serde_json::Value> {
    let stream = sys::connect_from(sys::source_addr(0), addr).await?;
    let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(path).header(header::HOST, addr.to_string()).header("x-session-api-key", key).body(Empty::new())?;
    let resp = tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(req)).await??;
    if resp.status() != 200 {
        bail!("GET {path}: HTTP {}", resp.status());
    }
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

/// What one sequential run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SequentialRound {
    pub latency: Latency,
    pub rps: f64,
    pub body_bytes: usize,
}

/// `n` sequential requests over one connection after `warmup` unmeasured ones.
///
/// The client is single-threaded, as wrk's is: the loop and its connection's task run on a
/// `current_thread` runtime on a thread of their own. On the shared 2-worker runtime each
/// answer could cross threads once or twice (the worker whose event loop saw it, the one
/// running the connection's task, the one running the loop), and on this virtual machine
/// each such hand-off is a wake-up through the hypervisor: first run on the `block_on`
/// thread, the same loop measured direct at 64 µs instead of 41, and the differences taken
/// from those round trips moved with the client's own scheduling, not only the proxy's.
pub async fn sequential(t: &HttpTarget, warmup: usize, n: usize, hist: &mut Histogram<u64>) -> anyhow::Result<SequentialRound> {
    let t = t.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("bench-sequential".into()).spawn(move || {
        let r = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from).and_then(|rt| {
            rt.block_on(async {
                let c = tokio::time::timeout(REQUEST_TIMEOUT, Conn::open(t.addr, sys::source_addr(0))).await.context("connecting took too long")??;
                sequential_loop(c, &t, warmup, n).await
            })
        });
        let _ = tx.send(r);
    })?;
    // Bounded: the connection and every request of the loop have their own timeouts.
    let (round, secs, body_bytes) = rx.await.context("the sequential client's thread ended without an answer")??;
    hist.add(&round).ok();
    Ok(SequentialRound { latency: Latency::from_hist(&round), rps: n as f64 / secs, body_bytes })
}

/// [`sequential`]'s loop: the round's histogram, its seconds and the answer's body size.
async fn sequential_loop(mut c: Conn, t: &HttpTarget, warmup: usize, n: usize) -> anyhow::Result<(Histogram<u64>, f64, usize)> {
    let mut body_bytes = 0;
    for _ in 0..warmup {
        let (st, len) = tokio::time::timeout(REQUEST_TIMEOUT, c.get(&t.path, Some(&t.key))).await??;
        if st != 200 {
            bail!("GET {} answered HTTP {st}", t.path);
        }
        body_bytes = len;
    }
    let mut round = stats::new_hist();
    let start = Instant::now();
    for _ in 0..n {
        let t0 = Instant::now();
        let (st, _) = tokio::time::timeout(REQUEST_TIMEOUT, c.get(&t.path, Some(&t.key))).await??;
        let dt = t0.elapsed().as_nanos() as u64;
        if st != 200 {
            bail!("GET {} answered HTTP {st}", t.path);
        }
        stats::record(&mut round, dt);
    }
    Ok((round, start.elapsed().as_secs_f64(), body_bytes))
}

/// What one closed-loop run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadRound {
    pub latency: Latency,
    pub rps: f64,
    pub requests: u64,
    pub errors: u64,
    /// CPU time the proxy process(es) spent per request, in µs (None: direct).
    pub proxy_cpu_us_per_req: Option<f64>,
    /// The proxy's CPU per request split into user and kernel (system) time, in µs.
    #[serde(default)]
    pub proxy_user_us_per_req: Option<f64>,
    #[serde(default)]
    pub proxy_sys_us_per_req: Option<f64>,
    /// CPU time the downstream (fake) spent per request, in µs.
    pub downstream_cpu_us_per_req: Option<f64>,
    /// CPU time of the bench process (the load generator) per request, in µs.
    pub client_cpu_us_per_req: Option<f64>,
}

/// Closed loop: `conns` connections, each sending its next request as soon as the last one
/// is answered, `warmup` unmeasured then `duration` measured. Only requests started and
/// finished inside the measured window count.
pub async fn closed_loop(
    t: &HttpTarget,
    conns: usize,
    warmup: Duration,
    duration: Duration,
    proxy_pids: &[u32],
    downstream_pids: &[u32],
    hist: &mut Histogram<u64>,
) -> anyhow::Result<LoadRound> {
    let mut cs = Vec::with_capacity(conns);
    for i in 0..conns {
        cs.push(Conn::open(t.addr, sys::source_addr(i)).await?);
    }
    let t_start = Instant::now() + warmup;
    let t_end = t_start + duration;
    let errors = Arc::new(AtomicU64::new(0));
    let fatal = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(conns);
    for mut c in cs {
        let (t, errors, fatal) = (t.clone(), errors.clone(), fatal.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = stats::new_hist();
            let mut done = 0u64;
            while !fatal.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                if t0 >= t_end {
                    break;
                }
                match tokio::time::timeout(REQUEST_TIMEOUT, c.get(&t.path, Some(&t.key))).await {
                    Ok(Ok((200, _))) => {
                        let t1 = Instant::now();
                        if t0 >= t_start && t1 <= t_end {
                            stats::record(&mut h, (t1 - t0).as_nanos() as u64);
                            done += 1;
                        }
                    }
                    other => {
                        tracing::warn!(?other, "request failed");
                        if errors.fetch_add(1, Ordering::Relaxed) > 100 {
                            fatal.store(true, Ordering::Relaxed);
                        }
                        // A fresh connection after an error.
                        match Conn::open(t.addr, sys::source_addr(0)).await {
                            Ok(n) => c = n,
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                }
            }
            (h, done)
        }));
    }
    // CPU accounting over the measured window.
    tokio::time::sleep_until(t_start.into()).await;
    let cpu0 = (sys::cpu_us_sum(proxy_pids), sys::cpu_us_sum(downstream_pids), sys::self_cpu_us());
    let split0 = sys::cpu_split_us(proxy_pids);
    tokio::time::sleep_until(t_end.into()).await;
    let cpu1 = (sys::cpu_us_sum(proxy_pids), sys::cpu_us_sum(downstream_pids), sys::self_cpu_us());
    let split1 = sys::cpu_split_us(proxy_pids);
    let mut round = stats::new_hist();
    let mut requests = 0;
    for task in tasks {
        let (h, done) = tokio::time::timeout(REQUEST_TIMEOUT * 2, task).await.context("a load task hung")??;
        round.add(&h).ok();
        requests += done;
    }
    if fatal.load(Ordering::Relaxed) {
        bail!("more than 100 failed requests against {}", t.addr);
    }
    hist.add(&round).ok();
    let per_req = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if requests > 0 => Some((b - a) / requests as f64),
        _ => None,
    };
    Ok(LoadRound {
        latency: Latency::from_hist(&round),
        rps: requests as f64 / duration.as_secs_f64(),
        requests,
        errors: errors.load(Ordering::Relaxed),
        proxy_cpu_us_per_req: if proxy_pids.is_empty() { None } else { per_req(cpu0.0, cpu1.0) },
        proxy_user_us_per_req: if proxy_pids.is_empty() { None } else { per_req(split0.map(|s| s.0), split1.map(|s| s.0)) },
        proxy_sys_us_per_req: if proxy_pids.is_empty() { None } else { per_req(split0.map(|s| s.1), split1.map(|s| s.1)) },
        downstream_cpu_us_per_req: per_req(cpu0.1, cpu1.1),
        client_cpu_us_per_req: per_req(cpu0.2, cpu1.2),
    })
}
