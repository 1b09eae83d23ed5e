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
/// The client is as thin as a client can be, so that what it measures is the target's
/// round trip and not its own work: one thread of its own, blocking `write` and `read`
/// calls on one keep-alive socket, the request's bytes built once, the answer's head parsed
/// with httparse ([`BlockingConn`]). Each answer wakes the one thread blocked on it; nothing
/// else runs in between. Its history: the loop first ran on the thread that drives
/// `block_on` (every answer crossed threads, each hand-off a wake-up through the
/// hypervisor: direct measured 64 µs instead of 41), then on a `current_thread` runtime with
/// a hyper connection (f546fdd, direct ~41 µs, ~46 when the machine placed the client and
/// the downstream apart). A client's own cost does not cancel out of "target − direct": the
/// longer it takes per request, the longer the other virtual CPU halts between requests,
/// and each of a proxy's extra hops pays to wake it. wrk (crate::wrk) runs beside it as an
/// independent check.
pub async fn sequential(t: &HttpTarget, warmup: usize, n: usize, hist: &mut Histogram<u64>) -> anyhow::Result<SequentialRound> {
    let t = t.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("bench-sequential".into()).spawn(move || {
        let _ = tx.send(BlockingConn::open(&t).and_then(|c| sequential_loop(c, &t, warmup, n)));
    })?;
    // Bounded: the connect and every read and write of the loop have their own timeouts.
    let (round, secs, body_bytes) = rx.await.context("the sequential client's thread ended without an answer")??;
    hist.add(&round).ok();
    Ok(SequentialRound { latency: Latency::from_hist(&round), rps: n as f64 / secs, body_bytes })
}

/// [`sequential`]'s loop: the round's histogram, its seconds and the answer's body size.
fn sequential_loop(mut c: BlockingConn, t: &HttpTarget, warmup: usize, n: usize) -> anyhow::Result<(Histogram<u64>, f64, usize)> {
    let mut body_bytes = 0;
    let get = |c: &mut BlockingConn| -> anyhow::Result<usize> {
        let (st, len) = c.get()?;
        if st != 200 {
            bail!("GET {} answered HTTP {st}", t.path);
        }
        Ok(len)
    };
    for _ in 0..warmup {
        body_bytes = get(&mut c)?;
    }
    let mut round = stats::new_hist();
    let start = Instant::now();
    for _ in 0..n {
        let t0 = Instant::now();
        get(&mut c)?;
        stats::record(&mut round, t0.elapsed().as_nanos() as u64);
    }
    Ok((round, start.elapsed().as_secs_f64(), body_bytes))
}

/// Largest answer [`BlockingConn`] reads (the measured one is ~3 KB).
const MAX_ANSWER: usize = 64 << 20;

/// One keep-alive connection sending the same `GET` with blocking socket calls: the
/// sequential client ([`sequential`]). It reads answers framed by `Content-Length` (what
/// every target gives for this request) and refuses anything else with an error.
pub struct BlockingConn {
    stream: std::net::TcpStream,
    request: Vec<u8>,
    buf: Vec<u8>,
}

impl BlockingConn {
    /// Connect to `t` (within [`REQUEST_TIMEOUT`]); reads and writes time out alike.
    pub fn open(t: &HttpTarget) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let stream = rt
            .block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, sys::connect_from(sys::source_addr(0), t.addr)).await })
            .context("connecting took too long")?
            .with_context(|| format!("connecting to {}", t.addr))?
            .into_std()?;
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let request = format!("GET {} HTTP/1.1\r\nhost: {}\r\nx-session-api-key: {}\r\n\r\n", t.path, t.addr, t.key).into_bytes();
        Ok(Self { stream, request, buf: vec![0; 16 * 1024] })
    }

    /// Send the request and read its answer: (status, body length).
    pub fn get(&mut self) -> anyhow::Result<(u16, usize)> {
        use std::io::{Read, Write};
        self.stream.write_all(&self.request).context("sending the request")?;
        // `buf` only grows (zeroed once, not per request); `filled` is what this answer used.
        let mut filled = 0;
        // The answer's framing, once its head is in (parsed once, however many reads the
        // body takes).
        let mut framing: Option<Answer> = None;
        loop {
            if self.buf.len() - filled < 4096 {
                self.buf.resize(filled + 16 * 1024, 0);
            }
            let n = match self.stream.read(&mut self.buf[filled..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(anyhow::Error::from(e).context("reading the answer")),
            };
            if n == 0 {
                bail!("the connection closed before a whole answer ({filled} bytes read)");
            }
            filled += n;
            if framing.is_none() {
                framing = parse_answer(&self.buf[..filled])?;
            }
            if let Some(answer) = &framing {
                if answer.len > MAX_ANSWER {
                    bail!("an answer of {} bytes (this client reads at most {MAX_ANSWER})", answer.len);
                }
                if filled > answer.len {
                    bail!("{} bytes after the answer to a single request", filled - answer.len);
                }
                if filled == answer.len {
                    return Ok((answer.status, answer.body));
                }
            }
        }
    }
}

/// The framing of an answer whose head has arrived.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    /// Body bytes.
    body: usize,
    /// Head and body bytes.
    len: usize,
}

/// Parse the answer at the front of `buf`: None until its head is complete. (A `1xx`
/// answer is refused as having no `Content-Length`: the client sends no `Expect` and asks
/// for no upgrade, so none should come.)
fn parse_answer(buf: &[u8]) -> anyhow::Result<Option<Answer>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf).context("an invalid answer head")? {
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(n) => n,
    };
    let status = resp.code.context("an answer without a status")?;
    let mut body = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<usize>().ok());
            if body.replace(v.context("an invalid Content-Length")?).is_some() {
                bail!("an answer with two Content-Length headers");
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("connection") && String::from_utf8_lossy(h.value).split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
        {
            bail!("an answer this client does not read ({}: {})", h.name, String::from_utf8_lossy(h.value));
        }
    }
    let body = body.context("an answer without Content-Length")?;
    let len = head.checked_add(body).context("a Content-Length past any buffer")?;
    Ok(Some(Answer { status, body, len }))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_framed_by_its_content_length_once_its_head_is_in() {
        let a = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: application/json\r\n\r\nhello";
        assert_eq!(parse_answer(&a[..20]).unwrap(), None);
        let head = a.len() - 5;
        assert_eq!(parse_answer(&a[..head]).unwrap(), Some(Answer { status: 200, body: 5, len: a.len() }));
        assert_eq!(parse_answer(a).unwrap(), Some(Answer { status: 200, body: 5, len: a.len() }));
    }

    #[test]
    fn answers_it_cannot_frame_are_errors() {
        for a in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: keep-alive, Close\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            assert!(parse_answer(a).is_err(), "{}", String::from_utf8_lossy(a));
        }
    }

    /// The blocking client against a real socket: keep-alive answers, one after another.
    #[tokio::test]
    async fn the_blocking_client_reads_answers_back_to_back() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            for _ in 0..3 {
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    assert!(n > 0);
                    got.extend_from_slice(&buf[..n]);
                }
                assert!(got.starts_with(b"GET /api/conversations/x HTTP/1.1\r\n"));
                assert!(String::from_utf8_lossy(&got).contains("x-session-api-key: k\r\n"));
                // The head and the body in separate writes: the client reads until both.
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3000\r\n\r\n").await.unwrap();
                s.write_all(&[b'a'; 3000]).await.unwrap();
            }
        });
        let t = HttpTarget { addr, key: "k".into(), path: "/api/conversations/x".into() };
        let answers = tokio::task::spawn_blocking(move || {
            let mut c = BlockingConn::open(&t)?;
            (0..3).map(|_| c.get()).collect::<anyhow::Result<Vec<_>>>()
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(answers, vec![(200, 3000); 3]);
        server.await.unwrap();
    }
}
