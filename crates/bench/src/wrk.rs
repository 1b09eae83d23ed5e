//! A second, independent client for the 1-connection REST latency: `wrk` (Debian package),
//! one thread and one keep-alive connection, against every target in turn.
//!
//! Why: the added latency is a difference of two round trips measured by one client, and a
//! client's own cost per request moves both, not always by the same amount (on a virtual
//! machine a client that is slower to react lets the proxy's thread sleep, and waking it
//! costs the hypervisor's wake-up). nestor-bench's own client ([`crate::rest::sequential`])
//! is written for this suite; wrk is a widely used C load generator with a single-threaded
//! epoll loop, written by someone else. The same figure from both says the number belongs
//! to the proxy, not to the instrument.
//!
//! wrk keeps its latencies in whole microseconds; a small Lua `done` hook prints its
//! percentiles as one JSON line, which is all this module reads of its output.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Marks the line the Lua hook prints.
const MARK: &str = "NESTOR-BENCH-WRK ";

/// The hook: percentiles in µs, request and error counts. `non_2xx` is wrk's
/// `errors.status`: answers with a status of 400 or more. Counting every answer but 200
/// would take a `response` hook, a Lua call per request inside the loop being timed; the
/// bench's own client ([`crate::rest::sequential`]) fails on anything but 200.
const SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'NESTOR-BENCH-WRK {"requests":%d,"errors":%d,"non_2xx":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"#;

/// One wrk run against one target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WrkRound {
    pub requests: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// wrk, ready to run: its binary and the hook script written once into the work directory.
pub struct Wrk {
    bin: PathBuf,
    script: PathBuf,
}

impl Wrk {
    /// `bin`: the wrk binary; the hook goes to `work/wrk-done.lua`.
    pub fn new(bin: PathBuf, work: &Path) -> anyhow::Result<Self> {
        let script = work.join("wrk-done.lua");
        std::fs::write(&script, SCRIPT).with_context(|| format!("writing {}", script.display()))?;
        Ok(Self { bin, script })
    }

    /// `GET path` with `key` over one connection for `secs` seconds. Bounded: wrk is killed
    /// if it has not finished 30 s after that.
    pub async fn one_connection(
        &self,
        addr: SocketAddr,
        key: &str,
        path: &str,
        secs: u64,
    ) -> anyhow::Result<WrkRound> {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(["-t1", "-c1", &format!("-d{secs}s"), "-s"])
            .arg(&self.script)
            .args(["-H", &format!("X-Session-API-Key: {key}")])
            .arg(format!("http://{addr}{path}"))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(secs + 30), cmd.output())
            .await
            .context("wrk did not finish in time")?
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "wrk failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        parse(&String::from_utf8_lossy(&out.stdout))
    }
}

/// The hook's line in wrk's output.
fn parse(stdout: &str) -> anyhow::Result<WrkRound> {
    #[derive(Deserialize)]
    struct Line {
        requests: u64,
        errors: u64,
        non_2xx: u64,
        p50_us: u64,
        p90_us: u64,
        p99_us: u64,
        max_us: u64,
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(MARK))
        .with_context(|| format!("no results line in wrk's output: {stdout:?}"))?;
    let l: Line =
        serde_json::from_str(line).with_context(|| format!("wrk's results line {line:?}"))?;
    if l.errors > 0 || l.non_2xx > 0 {
        bail!(
            "wrk saw {} socket errors and {} non-2xx answers",
            l.errors,
            l.non_2xx
        );
    }
    if l.requests == 0 {
        bail!("wrk sent no requests");
    }
    Ok(WrkRound {
        requests: l.requests,
        p50_us: l.p50_us as f64,
        p90_us: l.p90_us as f64,
        p99_us: l.p99_us as f64,
        max_us: l.max_us as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_hook_line_among_wrks_own_output() {
        let out = "Running 5s test @ http://127.0.0.1:1/x\n  1 threads and 1 connections\n\
                   NESTOR-BENCH-WRK {\"requests\":120000,\"errors\":0,\"non_2xx\":0,\"p50_us\":34,\"p90_us\":38,\"p99_us\":51,\"max_us\":900}\n";
        let r = parse(out).unwrap();
        assert_eq!(
            (r.requests, r.p50_us, r.p99_us, r.max_us),
            (120000, 34.0, 51.0, 900.0)
        );
    }

    #[test]
    fn errors_and_missing_output_are_reported() {
        let bad = "NESTOR-BENCH-WRK {\"requests\":10,\"errors\":0,\"non_2xx\":10,\"p50_us\":1,\"p90_us\":1,\"p99_us\":1,\"max_us\":1}";
        assert!(parse(bad).unwrap_err().to_string().contains("non-2xx"));
        assert!(parse("Running 5s test\n").is_err());
    }
}
