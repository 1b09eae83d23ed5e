//! nestor as a real process (the `nestor` binary this package builds), for tests that
//! signal it: SIGKILL (a crash), SIGTERM (graceful shutdown). Every wait is bounded; the
//! process is killed when the handle is dropped.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CLIENT_KEY: &str = "client-key-0123456789";

/// The fake agent-server binary (built next to the test binaries by `cargo test
/// --workspace`; built here, once, when this crate's tests run alone).
pub fn fake_bin() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join("nestor-fake-agent-server");
    if p.exists() {
        return p;
    }
    BUILD.call_once(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "nestor-test-support", "--bin", "nestor-fake-agent-server"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building nestor-fake-agent-server failed");
    });
    assert!(p.exists(), "{} not built", p.display());
    p
}

/// A free loopback port below the ephemeral range (so that, once nestor is killed, an
/// outgoing connection of another test cannot take it before nestor restarts on it).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(0, 20_000 + (std::process::id() % 10_000) as u16, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let p = NEXT.fetch_add(1, Ordering::SeqCst);
        let p = 20_000 + (p - 20_000) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// One nestor process on a fixed port and state directory, restartable on both.
pub struct NestorProc {
    pub port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    pub starts: u32,
}

impl NestorProc {
    /// Write `toml` (its `bind` is set here) to `dir/nestor.toml` and start nestor on it.
    pub async fn start(dir: &Path, toml: &str) -> NestorProc {
        let port = free_port();
        let config = dir.join("nestor.toml");
        std::fs::write(&config, format!("bind = \"127.0.0.1:{port}\"\n{toml}")).unwrap();
        let mut n = NestorProc { port, config, log: dir.join("nestor.log"), child: None, starts: 0 };
        n.spawn().await;
        n
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn ws(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Start (again) and wait until it answers `/alive` (bounded: 30 s).
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nestor"));
        cmd.arg("serve").arg("--config").arg(&self.config);
        for (k, _) in std::env::vars_os() {
            if let Some(k) = k.to_str() {
                if (k.starts_with("NESTOR_") && k != "NESTOR_LOG") || k == "SESSION_API_KEY" {
                    cmd.env_remove(k);
                }
            }
        }
        cmd.env("NESTOR_LOG", std::env::var("NESTOR_LOG").unwrap_or_else(|_| "info".into()));
        cmd.stdin(Stdio::null()).stdout(Stdio::from(log.try_clone().unwrap())).stderr(Stdio::from(log));
        self.child = Some(cmd.spawn().expect("nestor starts"));
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build().unwrap();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nestor exited at start ({st}); log:\n{}", self.log_tail(40));
            }
            if let Ok(r) = client.get(format!("{}/alive", self.url())).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "nestor did not answer /alive within 30 s; log:\n{}", self.log_tail(40));
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns once it exited (None if not within `within`, then it is killed).
    pub async fn sigterm(&mut self, within: Duration) -> Option<(std::process::ExitStatus, Duration)> {
        let mut c = self.child.take()?;
        let t = Instant::now();
        // SAFETY: signalling our own, not yet reaped, child.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return Some((st, t.elapsed()));
            }
            if t.elapsed() > within {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(15)).build().unwrap()
    }
}

impl Drop for NestorProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Processes whose working directory is under `dir` (the process provisioner runs each
/// child in its conversation's directory).
pub fn pids_under(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) {
            if cwd.starts_with(dir) {
                // Zombies (exited, not yet reaped by whoever adopted them) hold nothing.
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next().unwrap_or('?')).unwrap_or('?');
                if state != 'Z' {
                    out.push(pid);
                }
            }
        }
    }
    out.sort();
    out
}

/// Kill (SIGKILL) whatever is left under `dir`, so a failed test leaves no processes.
pub fn kill_all_under(dir: &Path) {
    for pid in pids_under(dir) {
        // SAFETY: processes this test's nestor started, found by their working directory.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
