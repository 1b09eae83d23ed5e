//! A real S3-compatible server for the integration tests.
//!
//! `NESTOR_TEST_S3_ENDPOINT` (e.g. from `scripts/setup-s3.sh`) names one to use; otherwise each
//! test binary starts its own `moto_server` (installed by `scripts/setup-s3.sh --install-only`
//! into a cached venv) on a free loopback port, killed when the binary exits. When moto cannot
//! be installed the tests say so and skip — unless `NESTOR_TEST_REQUIRE_S3=1` (CI, set by
//! `scripts/test.sh` once its server is up), which makes a missing server a failure, so a
//! broken set-up cannot pass as a row of skipped tests. Buckets are created with an unsigned `PUT /bucket`,
//! which moto accepts; against a server that does not, set `NESTOR_TEST_S3_BUCKET` to an
//! existing bucket (every test uses its own key prefix). Credentials: `NESTOR_TEST_S3_ACCESS_KEY`
//! / `NESTOR_TEST_S3_SECRET_KEY`, default `test` / `test`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nestor_workspace_store::{RetrySettings, Secret, WorkspaceStorageConfig};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// `moto_server` from the cached venv (installing it if needed), or why not.
pub fn moto_bin() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = repo_root().join("scripts/setup-s3.sh");
        let out = Command::new("timeout")
            .arg("1200")
            .arg("bash")
            .arg(&script)
            .arg("--install-only")
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("could not run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!("{} --install-only failed ({})", script.display(), out.status));
        }
        let venv = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_owned();
        let bin = Path::new(&venv).join("bin/moto_server");
        if bin.exists() {
            Ok(bin)
        } else {
            Err(format!("{} is missing after the install", bin.display()))
        }
    })
    .clone()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Whether `GET /` on the port answers 200 (moto's ListBuckets).
pub fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200")
}

/// A moto_server this process started (killed on drop, and by the kernel if the thread that
/// started it exits).
pub struct Moto {
    pub port: u16,
    bin: PathBuf,
    child: Option<Child>,
}

impl Moto {
    pub fn start(port: Option<u16>) -> Result<Moto, String> {
        let bin = moto_bin()?;
        let mut m = Moto { port: port.unwrap_or_else(free_port), bin, child: None };
        m.restart()?;
        Ok(m)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port; moto starts empty.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc_prctl_pdeathsig();
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("could not start {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if answers(self.port) {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(format!("moto_server exited at start ({st})"));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err("moto_server did not answer within 60 s".into())
    }

    /// Kills it (storage down).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn libc_prctl_pdeathsig() {
    // PR_SET_PDEATHSIG = 1, SIGKILL = 9: no stray servers if the test process dies.
    extern "C" {
        fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
    }
    unsafe {
        prctl(1, 9, 0, 0, 0);
    }
}

/// The endpoint shared by the tests of this binary, or why there is none.
pub fn shared_endpoint() -> Result<String, String> {
    static EP: OnceLock<Result<String, String>> = OnceLock::new();
    EP.get_or_init(|| {
        if let Ok(ep) = std::env::var("NESTOR_TEST_S3_ENDPOINT") {
            if !ep.is_empty() {
                return Ok(ep.trim_end_matches('/').to_owned());
            }
        }
        // Started from a thread that lives as long as the process, so the parent-death signal
        // fires only when the process exits.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = Moto::start(None);
            match r {
                Ok(m) => {
                    let _ = tx.send(Ok(m.endpoint()));
                    let _keep = m;
                    loop {
                        std::thread::park();
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        rx.recv().unwrap_or_else(|_| Err("moto thread died".into()))
    })
    .clone()
}

/// Whether CI requires a real S3 server (`NESTOR_TEST_REQUIRE_S3=1`): then a missing one fails
/// the test instead of skipping it.
pub fn s3_required() -> bool {
    std::env::var("NESTOR_TEST_REQUIRE_S3").as_deref() == Ok("1")
}

/// The message for a test that has no S3 server: panics when one is required, else prints
/// `SKIPPED: …` (the caller then returns).
pub fn skip_without_s3(why: &str) {
    let hint = "run scripts/setup-s3.sh and set NESTOR_TEST_S3_ENDPOINT";
    if s3_required() {
        panic!("NESTOR_TEST_REQUIRE_S3=1 but there is no S3-compatible server for this test: {why} ({hint})");
    }
    eprintln!("SKIPPED: no S3-compatible server for the workspace-store tests: {why} ({hint})");
}

/// The shared endpoint; when there is none, skips the test (returns) with a clear message,
/// or fails it when `NESTOR_TEST_REQUIRE_S3=1`.
#[macro_export]
macro_rules! s3_or_skip {
    () => {
        match common::shared_endpoint() {
            Ok(ep) => ep,
            Err(why) => {
                common::skip_without_s3(&why);
                return;
            }
        }
    };
}

/// Creates `bucket` (unsigned PUT; fine if it exists), or returns `NESTOR_TEST_S3_BUCKET`.
pub fn bucket(endpoint: &str, name: &str) -> String {
    if let Ok(b) = std::env::var("NESTOR_TEST_S3_BUCKET") {
        if !b.is_empty() {
            return b;
        }
    }
    let code = http_put(&format!("{endpoint}/{name}"));
    assert!(code == 200 || code == 409, "creating bucket {name} at {endpoint}: HTTP {code}");
    name.to_owned()
}

/// A bare `PUT url` with an empty body; the HTTP status (0 if none).
pub fn http_put(url: &str) -> u16 {
    let rest = url.strip_prefix("http://").expect("http endpoint");
    let (hostport, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let Ok(mut s) = TcpStream::connect(hostport) else { return 0 };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if write!(s, "PUT {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").is_err() {
        return 0;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// A config for the test server: fast retries, small parts.
pub fn config(endpoint: &str, bucket: &str, prefix: &str) -> WorkspaceStorageConfig {
    let mut c = WorkspaceStorageConfig::new(bucket);
    c.prefix = prefix.to_owned();
    c.endpoint = Some(endpoint.to_owned());
    c.region = Some("us-east-1".into());
    c.access_key_id = Some(std::env::var("NESTOR_TEST_S3_ACCESS_KEY").unwrap_or_else(|_| "test".into()));
    c.secret_access_key = Some(Secret(std::env::var("NESTOR_TEST_S3_SECRET_KEY").unwrap_or_else(|_| "test".into())));
    c.request_timeout_secs = 30;
    c.connect_timeout_secs = 2;
    c.retry = RetrySettings { max_attempts: 3, initial_backoff_ms: 100, max_backoff_ms: 500 };
    c
}

/// A unique key prefix per test.
pub fn unique_prefix(test: &str) -> String {
    format!("t-{test}-{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    (t.subsec_nanos() ^ std::process::id().rotate_left(16)) ^ (t.as_secs() as u32)
}

/// One path of a tree, as compared by the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File { content: Vec<u8>, mode: u32, mtime: i64 },
    Dir { mode: u32 },
    Symlink(PathBuf),
    Special,
}

/// Everything under `root` (not following symlinks).
pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(String::new(), root.to_owned())];
    while let Some((rel, abs)) = stack.pop() {
        for d in std::fs::read_dir(&abs).unwrap() {
            let d = d.unwrap();
            let name = d.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let m = std::fs::symlink_metadata(d.path()).unwrap();
            let node = if m.is_dir() {
                stack.push((r.clone(), d.path()));
                Node::Dir { mode: m.permissions().mode() & 0o777 }
            } else if m.is_file() {
                Node::File { content: std::fs::read(d.path()).unwrap(), mode: m.permissions().mode() & 0o777, mtime: m.mtime() }
            } else if m.file_type().is_symlink() {
                Node::Symlink(std::fs::read_link(d.path()).unwrap())
            } else {
                Node::Special
            };
            out.insert(r, node);
        }
    }
    out
}

pub fn write(root: &Path, rel: &str, content: impl AsRef<[u8]>) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

pub fn chmod(root: &Path, rel: &str, mode: u32) {
    std::fs::set_permissions(root.join(rel), std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Peak resident set size of this process (VmHWM), bytes.
pub fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

pub fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Resets the peak RSS to the current RSS (Linux ≥ 4.0: `echo 5 > /proc/self/clear_refs`).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
