//! Small Linux helpers: one process-wide clock, fd limits, and what `/proc` says about a
//! process (RSS, CPU time, open fds, children).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::OnceLock;
use std::time::Instant;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds on one monotonic clock shared by every task of this process (the in-process
/// fake stamps frames with it, clients read it back).
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Raise the soft `RLIMIT_NOFILE` to the hard one; returns the (new soft, hard) limits.
/// Children inherit the raised limit.
pub fn raise_nofile() -> (u64, u64) {
    // SAFETY: plain getrlimit/setrlimit on a stack struct.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return (1024, 1024);
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
        (r.rlim_cur, r.rlim_max)
    }
}

/// Resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Sum of the RSS of several processes, in KiB.
pub fn rss_kib_sum(pids: &[u32]) -> Option<u64> {
    let mut total = 0;
    for p in pids {
        total += rss_kib(*p)?;
    }
    Some(total)
}

/// (user, system) CPU time of several processes, in microseconds.
pub fn cpu_split_us(pids: &[u32]) -> Option<(f64, f64)> {
    let tck = clock_ticks_per_sec() as f64;
    let (mut u, mut s) = (0u64, 0u64);
    for p in pids {
        let (a, b) = cpu_ticks_split(*p)?;
        u += a;
        s += b;
    }
    Some((u as f64 * 1e6 / tck, s as f64 * 1e6 / tck))
}

fn cpu_ticks_split(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// user + system CPU time of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time of several processes, in microseconds.
pub fn cpu_us_sum(pids: &[u32]) -> Option<f64> {
    let tck = clock_ticks_per_sec() as f64;
    let mut ticks = 0;
    for p in pids {
        ticks += cpu_ticks(*p)?;
    }
    Some(ticks as f64 * 1e6 / tck)
}

pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// CPU time of this whole process (load generator and in-process fake), in microseconds.
pub fn self_cpu_us() -> Option<f64> {
    cpu_us_sum(&[std::process::id()])
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Direct children of `pid` (from `/proc/*/stat`).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(s) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        let Some(close) = s.rfind(')') else { continue };
        let ppid = s[close + 2..].split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out.sort_unstable();
    out
}

/// A free TCP port on 127.0.0.1 (free when asked; good enough on a quiet loopback).
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// Loopback source addresses used round-robin by clients that open many connections, so
/// ephemeral ports never run out (each source address has its own port range).
pub fn source_addr(i: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1 + (i % 8) as u8), 0))
}

/// Connect to `to` from `from` (port 0), with `TCP_NODELAY`. `IP_BIND_ADDRESS_NO_PORT`
/// lets the kernel pick the source port at connect time (per destination), so binding a
/// source address does not exhaust ports early.
pub async fn connect_from(from: SocketAddr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    {
        use std::os::fd::AsRawFd;
        let one: libc::c_int = 1;
        // SAFETY: valid fd and a pointer to a c_int of the right size. Best effort.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    sock.bind(from)?;
    let s = sock.connect(to).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A short description of this machine.
pub fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "mem_gib": (mem_kib as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0,
        "kernel": kernel,
    })
}

/// The first three fields of `/proc/loadavg`.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
