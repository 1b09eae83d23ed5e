//! The processes a run starts — the fake agent-server, nestor, nginx — and how each is
//! configured, awaited and always killed (on drop, so also on errors and panics; and via
//! `PR_SET_PDEATHSIG` if the bench itself is killed). Each child's pid is also written to
//! `<work_dir>/pids/<name>.pid` so `scripts/bench.sh` can clean up after a `SIGKILL`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::sys;

/// A child process, killed when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pidfile: PathBuf,
    /// Kill the whole process group (nginx: master and workers).
    group: bool,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The process and its direct children (nginx workers).
    pub fn pids(&self) -> Vec<u32> {
        let p = self.pid();
        let mut v = vec![p];
        v.extend(sys::children_of(p));
        v
    }

    /// Fail if the process has already exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!("{} exited early: {st}", self.name);
            }
        }
        Ok(())
    }

    /// Stop now: SIGTERM, up to 3 s, then SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let pid = c.id() as i32;
        let target = if self.group { -pid } else { pid };
        // SAFETY: signalling a process (group) we started and have not reaped yet.
        unsafe {
            libc::kill(target, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match c.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    tracing::warn!(name = %self.name, "did not stop on SIGTERM; killing");
                    // SAFETY: as above.
                    unsafe {
                        libc::kill(target, libc::SIGKILL);
                    }
                    let _ = c.wait();
                    break;
                }
            }
        }
        if self.group {
            // Workers that outlived their master (they should not).
            // SAFETY: the group id is our child's pid; nothing else joins that group.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = std::fs::remove_file(&self.pidfile);
        tracing::debug!(name = %self.name, "stopped");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Spawn `cmd` with a death signal and a pid file; `group`: in its own process group.
fn spawn(mut cmd: Command, name: &str, work: &Path, group: bool, as_nobody: bool) -> anyhow::Result<Proc> {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    if group {
        cmd.process_group(0);
    }
    if as_nobody {
        cmd.uid(65534).gid(65534);
    }
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let piddir = work.join("pids");
    std::fs::create_dir_all(&piddir)?;
    let pidfile = piddir.join(format!("{name}.pid"));
    std::fs::write(&pidfile, format!("{}\n", child.id()))?;
    tracing::info!(name, pid = child.id(), "started");
    Ok(Proc { name: name.to_owned(), child: Some(child), pidfile, group })
}

/// The byte relay (crate::relay, this binary's `relay` subcommand) on a free loopback port
/// in front of `upstream`.
pub async fn start_relay(work: &Path, name: &str, upstream: SocketAddr) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr: SocketAddr = ([127, 0, 0, 1], sys::free_port()?).into();
    let mut cmd = Command::new(std::env::current_exe().context("this executable")?);
    cmd.arg("relay")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--target")
        .arg(upstream.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join(format!("{name}.log")))?);
    let mut p = spawn(cmd, name, work, false, false)?;
    wait_listening(&mut p, addr, Duration::from_secs(10)).await?;
    Ok((p, addr))
}

/// Environment a child must not inherit (it would change what is measured).
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str() {
            if (k.starts_with("NESTOR_") && k != "NESTOR_LOG") || k == "SESSION_API_KEY" || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
    }
}

/// Wait until `addr` accepts TCP connections (bounded), checking the process is alive.
pub async fn wait_listening(p: &mut Proc, addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        p.check_alive()?;
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} did not listen on {addr} within {within:?}", p.name);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until `GET path` answers 200 (bounded).
pub async fn wait_http_ok(p: &mut Proc, addr: SocketAddr, path: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        p.check_alive()?;
        if let Ok(Ok(200)) = tokio::time::timeout(Duration::from_secs(2), crate::rest::get_status(addr, path, None)).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} did not answer GET {path} on {addr} within {within:?}", p.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The fake agent-server as its own process (`nestor-fake-agent-server`).
pub async fn start_fake(
    bin: &Path,
    work: &Path,
    name: &str,
    key: &str,
    seed_conversations: usize,
    events_per_conversation: usize,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let mut cmd = Command::new(bin);
    clean_env(&mut cmd);
    cmd.args([
        "--port",
        "0",
        "--session-api-key",
        key,
        "--seed-conversations",
        &seed_conversations.to_string(),
        "--events-per-conversation",
        &events_per_conversation.to_string(),
        "--max-subscribers-per-conversation",
        "1000000",
    ])
    .env("RUST_LOG", "warn")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(work.join(format!("{name}.log")))?);
    let mut p = spawn(cmd, name, work, false, false)?;
    let stdout = p.child.as_mut().and_then(|c| c.stdout.take()).context("fake stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).context("the fake agent-server did not print its address")?;
    let url = line.trim().strip_prefix("listening on http://").with_context(|| format!("unexpected fake output {line:?}"))?;
    let addr: SocketAddr = url.trim_end_matches('/').parse()?;
    wait_listening(&mut p, addr, Duration::from_secs(10)).await?;
    Ok((p, addr))
}

/// nestor with the `existing` provisioner in front of `downstream`.
pub async fn start_nestor(
    bin: &Path,
    work: &Path,
    name: &str,
    downstream: SocketAddr,
    downstream_key: &str,
    client_key: &str,
    extra_env: &[(String, String)],
) -> anyhow::Result<(Proc, SocketAddr)> {
    start_nestor_multi(bin, work, name, &[downstream], downstream_key, client_key, extra_env).await
}

/// nestor with the `existing` provisioner in front of several downstreams (same key).
pub async fn start_nestor_multi(
    bin: &Path,
    work: &Path,
    name: &str,
    downstreams: &[SocketAddr],
    downstream_key: &str,
    client_key: &str,
    extra_env: &[(String, String)],
) -> anyhow::Result<(Proc, SocketAddr)> {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir)?;
    let port = sys::free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut cfg = format!(
        r#"bind = "{addr}"
session_api_keys = ["{client_key}"]
state_dir = "{state}"

[provisioner]
kind = "existing"
"#,
        state = dir.join("state").display()
    );
    for downstream in downstreams {
        cfg.push_str(&format!(
            r#"
[[provisioner.existing.servers]]
url = "http://{downstream}"
api_key = "{downstream_key}"
"#
        ));
    }
    let cfg_path = dir.join("nestor.toml");
    std::fs::write(&cfg_path, cfg)?;
    let mut cmd = Command::new(bin);
    clean_env(&mut cmd);
    cmd.arg("serve")
        .arg("-c")
        .arg(&cfg_path)
        .env("NESTOR_LOG", std::env::var("NESTOR_LOG").unwrap_or_else(|_| "info".into()))
        .envs(extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("stdout.log"))?)
        .stderr(std::fs::File::create(dir.join("stderr.log"))?);
    let mut p = spawn(cmd, name, work, false, false)?;
    wait_http_ok(&mut p, addr, "/alive", Duration::from_secs(60)).await?;
    Ok((p, addr))
}

/// nginx as a foreground, unprivileged reverse proxy in front of `upstream`.
pub async fn start_nginx(bin: &Path, work: &Path, name: &str, upstream: SocketAddr, nofile: u64) -> anyhow::Result<(Proc, SocketAddr)> {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir)?;
    let port = sys::free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let conf = nginx_conf(&dir, addr, upstream, nofile);
    std::fs::write(dir.join("nginx.conf"), conf)?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        // Run it as `nobody`: its files must be writable by that user.
        chown_nobody(&dir)?;
        chown_nobody(work)?;
    }
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("stdout.log"))?)
        .stderr(std::fs::File::create(dir.join("stderr.log"))?);
    let mut p = spawn(cmd, name, work, true, root)?;
    wait_listening(&mut p, addr, Duration::from_secs(20)).await?;
    // Workers are up once the master has forked them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sys::children_of(p.pid()).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((p, addr))
}

fn chown_nobody(p: &Path) -> anyhow::Result<()> {
    std::os::unix::fs::chown(p, Some(65534), Some(65534)).with_context(|| format!("chown {}", p.display()))
}

/// The generated configuration: a plain, fair reverse proxy (keep-alive upstream, HTTP/1.1,
/// no buffering, no access log, WebSocket upgrade on `/sockets/`).
pub fn nginx_conf(dir: &Path, listen: SocketAddr, upstream: SocketAddr, nofile: u64) -> String {
    let d = dir.display();
    let conns = nofile.saturating_sub(100).max(1024);
    format!(
        r#"# Generated by nestor-bench.
daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;

events {{
    worker_connections {conns};
}}

http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 10000000;

    upstream fake {{
        server {upstream};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}

    server {{
        listen {listen};

        location /sockets/ {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
        }}

        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"#
    )
}

/// `nginx -v` (it prints to stderr).
pub fn nginx_version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("-v").output().ok()?;
    let s = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    Some(s.strip_prefix("nginx version: ").unwrap_or(&s).to_owned())
}

/// Find an executable on `PATH` (and in the sbin directories, where Debian puts nginx).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_config_is_a_fair_plain_proxy() {
        let c = nginx_conf(Path::new("/tmp/x"), ([127, 0, 0, 1], 8080).into(), ([127, 0, 0, 1], 9090).into(), 20000);
        for needle in [
            "daemon off;",
            "master_process on;",
            "worker_processes auto;",
            "access_log off;",
            "keepalive 64;",
            "proxy_http_version 1.1;",
            "proxy_set_header Connection \"\";",
            "proxy_set_header Upgrade $http_upgrade;",
            "proxy_buffering off;",
            "listen 127.0.0.1:8080;",
            "server 127.0.0.1:9090;",
            "pid /tmp/x/nginx.pid;",
        ] {
            assert!(c.contains(needle), "missing {needle:?} in\n{c}");
        }
    }
}
