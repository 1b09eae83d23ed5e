//! Shared plumbing of the `catalog` and `create` subcommands: child processes started
//! from any command line (nestor on a generated TOML, the real agent-server), a keep-alive
//! HTTP/1.1 client that returns bodies and sends any method, and reading counters from
//! nestor's Prometheus text.
//!
//! Why not `procs`: those helpers start the three fixed targets of `nestor-bench run` (one
//! fake, nestor on one `existing` server, nginx); these subcommands need nestor on other
//! provisioners and other programs, with the same guarantees: every child is killed when
//! its guard drops (errors and panics included), gets `PR_SET_PDEATHSIG` if the bench
//! itself dies, and leaves a pid file under `<work>/pids/` for `scripts/bench*.sh`.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use crate::sys;

/// Bound on one request (a create through a cold docker start included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// A child process in its own process group, stopped (SIGTERM to the group, then SIGKILL
/// after `grace`) when dropped.
pub struct Spawned {
    pub name: String,
    child: Option<Child>,
    pidfile: PathBuf,
    grace: Duration,
}

impl Spawned {
    pub fn spawn(mut cmd: Command, name: &str, work: &Path, grace: Duration) -> anyhow::Result<Spawned> {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.process_group(0).stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let piddir = work.join("pids");
        std::fs::create_dir_all(&piddir)?;
        let pidfile = piddir.join(format!("{name}.pid"));
        std::fs::write(&pidfile, format!("{}\n", child.id()))?;
        tracing::info!(name, pid = child.id(), "started");
        Ok(Spawned { name: name.to_owned(), child: Some(child), pidfile, grace })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!("{} exited early: {st}", self.name);
            }
        }
        Ok(())
    }

    /// SIGTERM to the process (it stops what it started: nestor's children, containers),
    /// up to `grace`, then SIGKILL to its whole group.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let pid = c.id() as i32;
        // SAFETY: signalling a process we started and have not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + self.grace;
        loop {
            match c.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    tracing::warn!(name = %self.name, "did not stop on SIGTERM in time; killing its group");
                    // SAFETY: as above; the group id is our child's pid.
                    unsafe {
                        libc::kill(-pid, libc::SIGKILL);
                    }
                    let _ = c.wait();
                    break;
                }
            }
        }
        // SAFETY: as above (whatever stayed in the group: helpers it did not reap).
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = std::fs::remove_file(&self.pidfile);
        tracing::info!(name = %self.name, "stopped");
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One keep-alive HTTP/1.1 connection that sends any method and returns the whole body.
pub struct Http {
    sender: SendRequest<Full<Bytes>>,
    host: http::HeaderValue,
}

impl Http {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Http> {
        let stream = tokio::time::timeout(Duration::from_secs(10), sys::connect_from(sys::source_addr(0), addr))
            .await
            .context("connect timed out")?
            .with_context(|| format!("connecting to {addr}"))?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Http { sender, host: http::HeaderValue::from_str(&addr.to_string())? })
    }

    pub async fn send(&mut self, method: Method, path: &str, key: Option<&str>, json: Option<&serde_json::Value>) -> anyhow::Result<(u16, Bytes)> {
        let mut b = Request::builder().method(method).uri(path).header(header::HOST, self.host.clone());
        if let Some(k) = key {
            b = b.header("x-session-api-key", k);
        }
        let body = match json {
            Some(v) => {
                b = b.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(v)?)
            }
            None => Bytes::new(),
        };
        let req = b.body(Full::new(body))?;
        let fut = async {
            self.sender.ready().await?;
            let resp = self.sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut).await.with_context(|| format!("{path}: no answer within {REQUEST_TIMEOUT:?}"))?
    }

    pub async fn get(&mut self, path: &str, key: Option<&str>) -> anyhow::Result<(u16, Bytes)> {
        self.send(Method::GET, path, key, None).await
    }

    /// `GET` expecting 200 and JSON.
    pub async fn get_json(&mut self, path: &str, key: Option<&str>) -> anyhow::Result<serde_json::Value> {
        let (st, body) = self.get(path, key).await?;
        if st != 200 {
            bail!("GET {path}: HTTP {st}: {}", String::from_utf8_lossy(&body[..body.len().min(300)]));
        }
        Ok(serde_json::from_slice(&body)?)
    }
}

/// One request on a fresh connection.
pub async fn once(addr: SocketAddr, method: Method, path: &str, key: Option<&str>, json: Option<&serde_json::Value>) -> anyhow::Result<(u16, Bytes)> {
    Http::open(addr).await?.send(method, path, key, json).await
}

/// Sum of every series of `name` (any labels) in Prometheus text; `None` when absent.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// nestor's `/metrics` (public by default).
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let (st, body) = once(addr, Method::GET, "/metrics", None, None).await?;
    anyhow::ensure!(st == 200, "GET /metrics: HTTP {st}");
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Wait until `GET path` answers 200 (bounded), checking the process is alive.
pub async fn wait_ok(p: &mut Spawned, addr: SocketAddr, path: &str, key: Option<&str>, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        p.check_alive()?;
        if let Ok(Ok((200, _))) = tokio::time::timeout(Duration::from_secs(2), once(addr, Method::GET, path, key, None)).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} did not answer GET {path} on {addr} within {within:?}", p.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// nestor on a free loopback port with `client_key`, its state under `<work>/<name>/`, and
/// `rest` appended to the generated TOML (the provisioner sections). Waits for `/alive`.
pub async fn start_nestor(bin: &Path, work: &Path, name: &str, client_key: &str, rest: &str, env: &[(&str, &str)], within: Duration) -> anyhow::Result<(Spawned, SocketAddr)> {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir)?;
    let addr: SocketAddr = ([127, 0, 0, 1], sys::free_port()?).into();
    let cfg = format!(
        "# Generated by nestor-bench.\nbind = \"{addr}\"\nsession_api_keys = [\"{client_key}\"]\nstate_dir = \"{}\"\n{rest}",
        dir.join("state").display()
    );
    let cfg_path = dir.join("nestor.toml");
    std::fs::write(&cfg_path, cfg)?;
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str() {
            if (k.starts_with("NESTOR_") && k != "NESTOR_LOG") || k == "SESSION_API_KEY" || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
    }
    cmd.arg("serve")
        .arg("-c")
        .arg(&cfg_path)
        .env("NESTOR_LOG", std::env::var("NESTOR_LOG").unwrap_or_else(|_| "info".into()))
        .envs(env.iter().copied())
        .stdout(std::fs::File::create(dir.join("stdout.log"))?)
        .stderr(std::fs::File::create(dir.join("stderr.log"))?);
    // nestor stops its children / containers on SIGTERM; give it time to.
    let mut p = Spawned::spawn(cmd, name, work, Duration::from_secs(30))?;
    wait_ok(&mut p, addr, "/alive", None, within).await?;
    Ok((p, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_adds_series_and_ignores_prefixes() {
        let t = "# TYPE a_total counter\na_total 3\na_total_x 5\nb{x=\"1\"} 2\nb{x=\"2\"} 4.5\n";
        assert_eq!(metric_sum(t, "a_total"), Some(3.0));
        assert_eq!(metric_sum(t, "b"), Some(6.5));
        assert_eq!(metric_sum(t, "c"), None);
    }
}
