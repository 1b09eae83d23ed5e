//! The results file and the table printed at the end of a run.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::rest::{LoadRound, SequentialRound};
use crate::stats::{median, paired, spread_pct, Latency, Paired, PerTarget, Target};
use crate::wrk::WrkRound;
use crate::ws::{IdleResult, ResumeResult, StreamResult};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub memory: Memory,
    pub rest: Rest,
    pub ws: WsResults,
    pub ratios: Ratios,
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub date: String,
    pub wall_secs: f64,
    pub machine: serde_json::Value,
    pub git_commit: Option<String>,
    pub nginx_version: Option<String>,
    pub nofile_limit: u64,
    /// `/proc/loadavg` when the run started and ended (other work on the machine).
    #[serde(default)]
    pub loadavg_start: String,
    #[serde(default)]
    pub loadavg_end: String,
    pub settings: serde_json::Value,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Memory {
    /// nestor just started, catalog loaded (REST phase: fake with `rest_conversations`).
    pub nestor_idle_rss_kib: Option<u64>,
    /// nestor just started in the WebSocket phase (more conversations cataloged).
    pub nestor_idle_rss_kib_ws_phase: Option<u64>,
    /// nginx master + workers just started.
    pub nginx_idle_rss_kib: Option<u64>,
    pub idle_pairs_requested: usize,
    /// Per target: the proxy's RSS growth (direct: the fake's own growth).
    pub idle_pairs: PerTarget<IdleResult>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rest {
    pub path: String,
    pub body_bytes: usize,
    pub sequential: PerTarget<RestSeq>,
    pub loaded: PerTarget<RestLoad>,
    /// The same 1-connection latency measured by wrk (crate::wrk), when it is installed.
    #[serde(default)]
    pub wrk: PerTarget<WrkSeq>,
}

/// wrk's 1-connection rounds against one target, and the medians of their percentiles.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WrkSeq {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub rounds: Vec<WrkRound>,
}

impl WrkSeq {
    pub fn of(rounds: Vec<WrkRound>) -> Self {
        let m = |f: fn(&WrkRound) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        Self { p50_us: m(|r| r.p50_us), p90_us: m(|r| r.p90_us), p99_us: m(|r| r.p99_us), max_us: m(|r| r.max_us), rounds }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestSeq {
    /// All rounds merged.
    pub latency: Latency,
    pub rounds: Vec<SequentialRound>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestLoad {
    pub connections: usize,
    /// All rounds merged.
    pub latency: Latency,
    pub rps_median: f64,
    pub rps_spread_pct: f64,
    pub proxy_cpu_us_per_req_median: Option<f64>,
    /// Medians of the user / kernel split of the proxy's CPU per request.
    #[serde(default)]
    pub proxy_user_us_per_req_median: Option<f64>,
    #[serde(default)]
    pub proxy_sys_us_per_req_median: Option<f64>,
    pub rounds: Vec<LoadRound>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WsResults {
    /// One pair, one frame in flight: per-frame latency.
    pub latency: PerTarget<Stream>,
    /// One pair, saturated.
    pub single: PerTarget<Stream>,
    /// Many pairs, saturated.
    pub many: PerTarget<Stream>,
    pub resume: PerTarget<ResumeResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stream {
    pub pairs: usize,
    pub window: u64,
    pub frame_bytes: usize,
    /// All rounds merged.
    pub latency: Latency,
    pub fps_median: f64,
    pub fps_spread_pct: f64,
    pub proxy_cpu_us_per_frame_median: Option<f64>,
    pub rounds: Vec<StreamResult>,
}

impl Stream {
    pub fn from_rounds(rounds: Vec<StreamResult>, latency: Latency) -> Self {
        let fps: Vec<f64> = rounds.iter().map(|r| r.frames_per_sec).collect();
        let cpu: Vec<f64> = rounds.iter().filter_map(|r| r.proxy_cpu_us_per_frame).collect();
        Stream {
            pairs: rounds.first().map(|r| r.pairs).unwrap_or(0),
            window: rounds.first().map(|r| r.window).unwrap_or(0),
            frame_bytes: rounds.first().map(|r| r.frame_bytes).unwrap_or(0),
            latency,
            fps_median: median(&fps),
            fps_spread_pct: spread_pct(&fps),
            proxy_cpu_us_per_frame_median: (!cpu.is_empty()).then(|| median(&cpu)),
            rounds,
        }
    }
}

/// Side-by-side comparisons (differences in µs, ratios as plain factors).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ratios {
    pub rest_seq_added_us_nestor: Option<Added>,
    pub rest_seq_added_us_nginx: Option<Added>,
    pub rest_loaded_added_us_nestor: Option<Added>,
    pub rest_loaded_added_us_nginx: Option<Added>,
    /// The byte relay: what any proxy adds on this machine.
    #[serde(default)]
    pub rest_seq_added_us_relay: Option<Added>,
    #[serde(default)]
    pub rest_loaded_added_us_relay: Option<Added>,
    #[serde(default)]
    pub rest_cpu_per_req_nestor_over_relay: Option<f64>,
    #[serde(default)]
    pub ws_latency_added_us_relay: Option<Added>,
    pub rest_rps_nestor_over_direct: Option<f64>,
    pub rest_rps_nestor_over_nginx: Option<f64>,
    /// The same, round by round (crate::stats::Paired): what the throughput check judges.
    #[serde(default)]
    pub rest_rps_nestor_over_nginx_paired: Option<Paired>,
    pub rest_rps_nginx_over_direct: Option<f64>,
    pub rest_cpu_per_req_nestor_over_nginx: Option<f64>,
    pub ws_latency_added_us_nestor: Option<Added>,
    pub ws_latency_added_us_nginx: Option<Added>,
    pub ws_single_fps_nestor_over_direct: Option<f64>,
    pub ws_single_fps_nestor_over_nginx: Option<f64>,
    pub ws_many_fps_nestor_over_direct: Option<f64>,
    pub ws_many_fps_nestor_over_nginx: Option<f64>,
    pub ws_cpu_per_frame_nestor_over_nginx: Option<f64>,
    /// The 1-connection REST latency added, as wrk measured it (medians over its rounds).
    #[serde(default)]
    pub rest_seq_added_us_nestor_wrk: Option<Added>,
    #[serde(default)]
    pub rest_seq_added_us_nginx_wrk: Option<Added>,
    #[serde(default)]
    pub rest_seq_added_us_relay_wrk: Option<Added>,
}

/// Latency a proxy adds over direct, per percentile, in µs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Added {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Added {
    fn of(proxy: &Latency, direct: &Latency) -> Self {
        Added {
            p50: proxy.p50_us - direct.p50_us,
            p90: proxy.p90_us - direct.p90_us,
            p99: proxy.p99_us - direct.p99_us,
            max: proxy.max_us - direct.max_us,
        }
    }

    fn of_wrk(proxy: &WrkSeq, direct: &WrkSeq) -> Self {
        Added { p50: proxy.p50_us - direct.p50_us, p90: proxy.p90_us - direct.p90_us, p99: proxy.p99_us - direct.p99_us, max: proxy.max_us - direct.max_us }
    }
}

/// One of the targets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub what: String,
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

impl Results {
    /// Fill `ratios` and `checks` from the measurements.
    pub fn derive(&mut self) {
        let r = &mut self.ratios;
        let seq = &self.rest.sequential;
        let lo = &self.rest.loaded;
        let added = |p: Option<&Latency>, d: Option<&Latency>| match (p, d) {
            (Some(p), Some(d)) => Some(Added::of(p, d)),
            _ => None,
        };
        r.rest_seq_added_us_nestor = added(seq.nestor.as_ref().map(|s| &s.latency), seq.direct.as_ref().map(|s| &s.latency));
        r.rest_seq_added_us_nginx = added(seq.nginx.as_ref().map(|s| &s.latency), seq.direct.as_ref().map(|s| &s.latency));
        r.rest_loaded_added_us_nestor = added(lo.nestor.as_ref().map(|s| &s.latency), lo.direct.as_ref().map(|s| &s.latency));
        r.rest_loaded_added_us_nginx = added(lo.nginx.as_ref().map(|s| &s.latency), lo.direct.as_ref().map(|s| &s.latency));
        r.rest_seq_added_us_relay = added(seq.relay.as_ref().map(|s| &s.latency), seq.direct.as_ref().map(|s| &s.latency));
        r.rest_loaded_added_us_relay = added(lo.relay.as_ref().map(|s| &s.latency), lo.direct.as_ref().map(|s| &s.latency));
        let wrk = &self.rest.wrk;
        let added_wrk = |t: Target| match (wrk.get(t), wrk.direct.as_ref()) {
            (Some(p), Some(d)) => Some(Added::of_wrk(p, d)),
            _ => None,
        };
        r.rest_seq_added_us_nestor_wrk = added_wrk(Target::Nestor);
        r.rest_seq_added_us_nginx_wrk = added_wrk(Target::Nginx);
        r.rest_seq_added_us_relay_wrk = added_wrk(Target::Relay);
        r.rest_cpu_per_req_nestor_over_relay = ratio(
            lo.nestor.as_ref().and_then(|l| l.proxy_cpu_us_per_req_median),
            lo.relay.as_ref().and_then(|l| l.proxy_cpu_us_per_req_median),
        );
        let rps = |t: Target| lo.get(t).map(|l| l.rps_median);
        r.rest_rps_nestor_over_direct = ratio(rps(Target::Nestor), rps(Target::Direct));
        r.rest_rps_nestor_over_nginx = ratio(rps(Target::Nestor), rps(Target::Nginx));
        r.rest_rps_nginx_over_direct = ratio(rps(Target::Nginx), rps(Target::Direct));
        let round_rps = |t: Target| lo.get(t).map(|l| l.rounds.iter().map(|r| r.rps).collect::<Vec<_>>());
        r.rest_rps_nestor_over_nginx_paired = match (round_rps(Target::Nestor), round_rps(Target::Nginx)) {
            (Some(a), Some(b)) => paired(&a, &b),
            _ => None,
        };
        r.rest_cpu_per_req_nestor_over_nginx = ratio(
            lo.nestor.as_ref().and_then(|l| l.proxy_cpu_us_per_req_median),
            lo.nginx.as_ref().and_then(|l| l.proxy_cpu_us_per_req_median),
        );
        let w = &self.ws;
        r.ws_latency_added_us_nestor = added(w.latency.nestor.as_ref().map(|s| &s.latency), w.latency.direct.as_ref().map(|s| &s.latency));
        r.ws_latency_added_us_nginx = added(w.latency.nginx.as_ref().map(|s| &s.latency), w.latency.direct.as_ref().map(|s| &s.latency));
        r.ws_latency_added_us_relay = added(w.latency.relay.as_ref().map(|s| &s.latency), w.latency.direct.as_ref().map(|s| &s.latency));
        let fps = |p: &PerTarget<Stream>, t: Target| p.get(t).map(|s| s.fps_median);
        r.ws_single_fps_nestor_over_direct = ratio(fps(&w.single, Target::Nestor), fps(&w.single, Target::Direct));
        r.ws_single_fps_nestor_over_nginx = ratio(fps(&w.single, Target::Nestor), fps(&w.single, Target::Nginx));
        r.ws_many_fps_nestor_over_direct = ratio(fps(&w.many, Target::Nestor), fps(&w.many, Target::Direct));
        r.ws_many_fps_nestor_over_nginx = ratio(fps(&w.many, Target::Nestor), fps(&w.many, Target::Nginx));
        r.ws_cpu_per_frame_nestor_over_nginx = ratio(
            w.many.nestor.as_ref().and_then(|s| s.proxy_cpu_us_per_frame_median),
            w.many.nginx.as_ref().and_then(|s| s.proxy_cpu_us_per_frame_median),
        );

        let mut checks = Vec::new();
        let a = r.rest_seq_added_us_nestor.as_ref();
        checks.push(Check {
            what: "REST added latency p50 (nestor − direct, 1 connection)".into(),
            target: "≤ +30 µs".into(),
            measured: a.map(|a| format!("{:+.1} µs", a.p50)).unwrap_or_else(|| "n/a".into()),
            met: a.map(|a| a.p50 <= 30.0),
        });
        checks.push(Check {
            what: "REST added latency p99 (nestor − direct, 1 connection)".into(),
            target: "≤ +150 µs".into(),
            measured: a.map(|a| format!("{:+.1} µs", a.p99)).unwrap_or_else(|| "n/a".into()),
            met: a.map(|a| a.p99 <= 150.0),
        });
        // Saturated, latency is connections / throughput for any proxy (Little's law): with
        // the client, the proxy and the downstream sharing the machine's cores, a proxy halves
        // throughput and so doubles latency, and no proxy adds +30 µs there. The issue's
        // latency targets are the 1-connection rows above; here nestor is held to nginx's.
        let (a, n) = (r.rest_loaded_added_us_nestor.as_ref(), r.rest_loaded_added_us_nginx.as_ref());
        let conns = lo.nestor.as_ref().map(|l| l.connections).unwrap_or(0);
        for (name, pick) in [("p50", (|a: &Added| a.p50) as fn(&Added) -> f64), ("p99", |a: &Added| a.p99)] {
            checks.push(Check {
                what: format!("REST added latency {name} at {conns} connections (saturated), nestor vs nginx"),
                target: "≤ nginx's".into(),
                measured: match (a, n) {
                    (Some(a), Some(n)) => format!("{:+.1} vs {:+.1} µs", pick(a), pick(n)),
                    _ => "n/a".into(),
                },
                met: a.zip(n).map(|(a, n)| pick(a) <= pick(n)),
            });
        }
        // Judged round by round when both have rounds (drift cancels), else by the medians.
        let throughput = match &r.rest_rps_nestor_over_nginx_paired {
            Some(p) => Some((p.median, format!("{:.3} (median of {} rounds, {:.3}–{:.3}, ahead in {})", p.median, p.rounds, p.min, p.max, p.ahead))),
            None => r.rest_rps_nestor_over_nginx.map(|x| (x, format!("{x:.2}"))),
        };
        checks.push(Check {
            what: format!("REST throughput nestor / nginx ({conns} connections)"),
            target: "≥ 1.00".into(),
            measured: throughput.as_ref().map(|(_, m)| m.clone()).unwrap_or_else(|| "n/a".into()),
            met: throughput.map(|(x, _)| x >= 1.0),
        });
        if let Some(a) = r.rest_seq_added_us_nestor_wrk.as_ref() {
            checks.push(Check {
                what: "REST added latency p50 (nestor − direct, 1 connection), wrk as the client".into(),
                target: "≤ +30 µs".into(),
                measured: format!("{:+.1} µs", a.p50),
                met: Some(a.p50 <= 30.0),
            });
        }
        self.checks = checks;
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let m = &self.meta;
        let _ = writeln!(s, "nestor-bench {}  ({} s wall)", m.date, m.wall_secs.round());
        let _ = writeln!(
            s,
            "machine: {} CPUs {}, {} GiB, kernel {}; nginx {}; commit {}",
            m.machine["cpus"],
            m.machine["cpu_model"].as_str().unwrap_or(""),
            m.machine["mem_gib"],
            m.machine["kernel"].as_str().unwrap_or(""),
            m.nginx_version.as_deref().unwrap_or("n/a"),
            m.git_commit.as_deref().unwrap_or("?"),
        );
        let _ = writeln!(s, "load average at start: {}; at end: {}", m.loadavg_start, m.loadavg_end);
        let fmt = |v: Option<f64>, d: usize| v.map(|v| format!("{v:.d$}")).unwrap_or_else(|| "-".into());

        let _ = writeln!(s, "\nREST  GET {}  ({} B answer)", self.rest.path, self.rest.body_bytes);
        let _ = writeln!(s, "  1 connection, sequential           p50 µs    p90 µs    p99 µs    max µs     req/s   rounds p50 µs");
        for t in Target::ALL {
            if let Some(q) = self.rest.sequential.get(t) {
                let l = &q.latency;
                let rps = median(&q.rounds.iter().map(|r| r.rps).collect::<Vec<_>>());
                let per: Vec<String> = q.rounds.iter().map(|r| format!("{:.1}", r.latency.p50_us)).collect();
                let _ = writeln!(s, "  {:<34} {:>8.1}  {:>8.1}  {:>8.1}  {:>8.1}  {:>8.0}   {}", t.name(), l.p50_us, l.p90_us, l.p99_us, l.max_us, rps, per.join(" "));
            }
        }
        let conns = self.rest.loaded.direct.as_ref().or(self.rest.loaded.nestor.as_ref()).map(|l| l.connections).unwrap_or(0);
        let _ = writeln!(s, "  {conns} connections, closed loop         p50 µs    p90 µs    p99 µs    max µs     req/s  (spread)  proxy CPU µs/req (user+sys)");
        for t in Target::ALL {
            if let Some(q) = self.rest.loaded.get(t) {
                let l = &q.latency;
                let _ = writeln!(
                    s,
                    "  {:<34} {:>8.1}  {:>8.1}  {:>8.1}  {:>8.1}  {:>8.0}  ({:>4.1}%)  {} ({}+{})",
                    t.name(),
                    l.p50_us,
                    l.p90_us,
                    l.p99_us,
                    l.max_us,
                    q.rps_median,
                    q.rps_spread_pct,
                    fmt(q.proxy_cpu_us_per_req_median, 1),
                    fmt(q.proxy_user_us_per_req_median, 1),
                    fmt(q.proxy_sys_us_per_req_median, 1)
                );
            }
        }
        if let Some(p) = &self.ratios.rest_rps_nestor_over_nginx_paired {
            let _ = writeln!(
                s,
                "  nestor / nginx req/s, round by round: median {:.3} (min {:.3}, max {:.3}), nestor ahead in {} of {} rounds",
                p.median, p.min, p.max, p.ahead, p.rounds
            );
        }

        let w = &self.ws;
        let _ = writeln!(s, "\nWebSocket /sockets/events/{{id}}, frames pushed by the downstream");
        if let Some(x) = w.latency.direct.as_ref().or(w.latency.nestor.as_ref()) {
            let _ = writeln!(s, "  per-frame latency, 1 pair, 1 frame in flight ({} B)   p50 µs    p90 µs    p99 µs    max µs", x.frame_bytes);
        }
        for t in Target::ALL {
            if let Some(q) = w.latency.get(t) {
                let l = &q.latency;
                let _ = writeln!(s, "  {:<52} {:>8.1}  {:>8.1}  {:>8.1}  {:>8.1}", t.name(), l.p50_us, l.p90_us, l.p99_us, l.max_us);
            }
        }
        for (title, p) in [("throughput, 1 pair", &w.single), ("throughput, many pairs", &w.many)] {
            if let Some(x) = p.direct.as_ref().or(p.nestor.as_ref()) {
                let _ = writeln!(
                    s,
                    "  {title} ({} pairs, {} in flight each)  frames/s  (spread)   MiB/s   p50 µs   p99 µs  proxy CPU µs/frame",
                    x.pairs, x.window
                );
            }
            for t in Target::ALL {
                if let Some(q) = p.get(t) {
                    let mib = q.fps_median * q.frame_bytes as f64 / (1024.0 * 1024.0);
                    let _ = writeln!(
                        s,
                        "  {:<44} {:>9.0}  ({:>4.1}%)  {:>6.1}  {:>7.0}  {:>7.0}  {}",
                        t.name(),
                        q.fps_median,
                        q.fps_spread_pct,
                        mib,
                        q.latency.p50_us,
                        q.latency.p99_us,
                        fmt(q.proxy_cpu_us_per_frame_median, 2)
                    );
                }
            }
        }
        let _ = writeln!(s, "  downstream restart while a client is connected");
        for t in Target::ALL {
            if let Some(r) = w.resume.get(t) {
                if r.resumed {
                    let _ = writeln!(
                        s,
                        "  {:<10} resumed {}/{}: first frame after listening again, ms: median {:.1}, max {:.1}; first live event: median {:.1}, max {:.1} (publish period {} ms)",
                        t.name(),
                        r.first_live_frame_ms.len(),
                        r.trials,
                        median(&r.first_frame_ms),
                        r.first_frame_ms.iter().cloned().fold(0.0, f64::max),
                        median(&r.first_live_frame_ms),
                        r.first_live_frame_ms.iter().cloned().fold(0.0, f64::max),
                        r.publish_period_ms
                    );
                } else {
                    let _ = writeln!(
                        s,
                        "  {:<10} no resume: the client's socket was closed {} after the restart began",
                        t.name(),
                        r.client_closed_after_ms.map(|x| format!("{x:.1} ms")).unwrap_or_else(|| "(never, but no frame came back)".into())
                    );
                }
            }
        }

        let mem = &self.memory;
        let _ = writeln!(s, "\nMemory");
        let _ = writeln!(
            s,
            "  nestor idle RSS: {} KiB (WS phase: {} KiB); nginx idle RSS (master + workers): {} KiB",
            fmt(mem.nestor_idle_rss_kib.map(|x| x as f64), 0),
            fmt(mem.nestor_idle_rss_kib_ws_phase.map(|x| x as f64), 0),
            fmt(mem.nginx_idle_rss_kib.map(|x| x as f64), 0)
        );
        for t in Target::ALL {
            if let Some(i) = mem.idle_pairs.get(t) {
                let who = if t == Target::Direct { "fake downstream itself" } else { t.name() };
                let _ = writeln!(
                    s,
                    "  {:<24} {} idle pairs: RSS {} → {} KiB = {:.1} KiB per pair (opened in {:.1} s)",
                    who, i.pairs, i.rss_before_kib, i.rss_after_kib, i.rss_per_pair_kib, i.open_secs
                );
            }
        }

        let r = &self.ratios;
        let _ = writeln!(s, "\nRatios (side by side, same run)");
        let add = |a: &Option<Added>| a.as_ref().map(|a| format!("p50 {:+.1}  p90 {:+.1}  p99 {:+.1}  max {:+.1} µs", a.p50, a.p90, a.p99, a.max)).unwrap_or_else(|| "-".into());
        let _ = writeln!(s, "  REST added, 1 conn:     nestor {}", add(&r.rest_seq_added_us_nestor));
        let _ = writeln!(s, "                          nginx  {}", add(&r.rest_seq_added_us_nginx));
        let _ = writeln!(s, "                          relay  {}   (byte relay: the floor)", add(&r.rest_seq_added_us_relay));
        if r.rest_seq_added_us_nestor_wrk.is_some() {
            let _ = writeln!(s, "  REST added, 1 conn, wrk: nestor {}", add(&r.rest_seq_added_us_nestor_wrk));
            let _ = writeln!(s, "                          nginx  {}", add(&r.rest_seq_added_us_nginx_wrk));
            let _ = writeln!(s, "                          relay  {}", add(&r.rest_seq_added_us_relay_wrk));
        }
        let _ = writeln!(s, "  REST added, loaded:     nestor {}", add(&r.rest_loaded_added_us_nestor));
        let _ = writeln!(s, "                          nginx  {}", add(&r.rest_loaded_added_us_nginx));
        let _ = writeln!(s, "                          relay  {}", add(&r.rest_loaded_added_us_relay));
        let _ = writeln!(
            s,
            "  REST req/s (ratios of medians): nestor/direct {}  nestor/nginx {}  nginx/direct {}; proxy CPU per request nestor/nginx {}",
            fmt(r.rest_rps_nestor_over_direct, 2),
            fmt(r.rest_rps_nestor_over_nginx, 2),
            fmt(r.rest_rps_nginx_over_direct, 2),
            fmt(r.rest_cpu_per_req_nestor_over_nginx, 2)
        );
        let _ = writeln!(s, "  WS added latency:       nestor {}", add(&r.ws_latency_added_us_nestor));
        let _ = writeln!(s, "                          nginx  {}", add(&r.ws_latency_added_us_nginx));
        let _ = writeln!(s, "                          relay  {}", add(&r.ws_latency_added_us_relay));
        let _ = writeln!(
            s,
            "  WS frames/s: 1 pair nestor/direct {}  nestor/nginx {};  many pairs nestor/direct {}  nestor/nginx {}; proxy CPU per frame nestor/nginx {}",
            fmt(r.ws_single_fps_nestor_over_direct, 2),
            fmt(r.ws_single_fps_nestor_over_nginx, 2),
            fmt(r.ws_many_fps_nestor_over_direct, 2),
            fmt(r.ws_many_fps_nestor_over_nginx, 2),
            fmt(r.ws_cpu_per_frame_nestor_over_nginx, 2)
        );
        let _ = writeln!(s, "\nTargets (from the issue)");
        for c in &self.checks {
            let v = match c.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "n/a",
            };
            let _ = writeln!(s, "  {:<70} target {:<10} measured {:<12} {}", c.what, c.target, c.measured, v);
        }
        for n in &m.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}

/// Write a run's results as pretty JSON to `out` (its directory created), and log it.
pub fn write_results<T: serde::Serialize>(out: &std::path::Path, results: &T) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(results)? + "\n").with_context(|| format!("writing {}", out.display()))?;
    tracing::info!(file = %out.display(), "results written");
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rest::SequentialRound;

    fn lat(p50: f64, p99: f64) -> Latency {
        Latency { count: 10, mean_us: p50, p50_us: p50, p90_us: p50, p99_us: p99, p999_us: p99, max_us: p99 }
    }

    pub fn sample() -> Results {
        let seq = |p50, p99| RestSeq {
            latency: lat(p50, p99),
            rounds: vec![SequentialRound { latency: lat(p50, p99), rps: 1000.0, body_bytes: 3000 }],
        };
        let load = |rps: f64, cpu: Option<f64>| RestLoad {
            connections: 64,
            latency: lat(1000.0, 5000.0),
            rps_median: rps,
            rps_spread_pct: 1.0,
            proxy_cpu_us_per_req_median: cpu,
            proxy_user_us_per_req_median: None,
            proxy_sys_us_per_req_median: None,
            rounds: vec![],
        };
        // Three wrk rounds around `p50`: the median is kept.
        let wrk = |p50: f64| {
            WrkSeq::of([p50 + 5.0, p50, p50 - 1.0].map(|p| WrkRound { requests: 1000, p50_us: p, p90_us: p, p99_us: p, max_us: p }).to_vec())
        };
        let mut r = Results {
            meta: Meta {
                date: "2026-01-01".into(),
                wall_secs: 1.0,
                machine: serde_json::json!({"cpus": 2, "cpu_model": "x", "mem_gib": 1, "kernel": "k"}),
                git_commit: None,
                nginx_version: None,
                nofile_limit: 1024,
                loadavg_start: String::new(),
                loadavg_end: String::new(),
                settings: serde_json::json!({}),
                notes: vec![],
            },
            memory: Memory::default(),
            rest: Rest {
                path: "/p".into(),
                body_bytes: 3000,
                sequential: PerTarget { direct: Some(seq(80.0, 100.0)), nestor: Some(seq(100.0, 300.0)), nginx: Some(seq(90.0, 150.0)), relay: None },
                loaded: PerTarget {
                    direct: Some(load(20000.0, None)),
                    nestor: Some(load(12000.0, Some(40.0))),
                    nginx: Some(load(10000.0, Some(30.0))),
                    relay: None,
                },
                wrk: PerTarget { direct: Some(wrk(35.0)), nestor: Some(wrk(56.0)), nginx: Some(wrk(74.0)), relay: None },
            },
            ws: WsResults::default(),
            ratios: Ratios::default(),
            checks: vec![],
        };
        r.derive();
        r
    }

    #[test]
    fn ratios_and_checks_follow_the_measurements() {
        let r = sample();
        let a = r.ratios.rest_seq_added_us_nestor.as_ref().unwrap();
        assert_eq!(a.p50, 20.0);
        assert_eq!(a.p99, 200.0);
        assert_eq!(r.ratios.rest_rps_nestor_over_nginx, Some(1.2));
        assert_eq!(r.checks[0].met, Some(true), "p50 +20 µs meets ≤ +30");
        assert_eq!(r.checks[1].met, Some(false), "p99 +200 µs misses ≤ +150");
        assert_eq!(r.checks[2].met, Some(true), "saturated: nestor's added p50 is nginx's");
        assert_eq!(r.checks[4].met, Some(true), "1.2× nginx meets ≥ 1");
        assert_eq!(r.ratios.rest_seq_added_us_nestor_wrk.as_ref().map(|a| a.p50), Some(21.0), "medians of wrk's rounds");
        assert_eq!(r.ratios.rest_seq_added_us_nginx_wrk.as_ref().map(|a| a.p50), Some(39.0));
        assert_eq!(r.checks[5].met, Some(true), "wrk's +21 µs meets ≤ +30");
        let t = r.table();
        assert!(t.contains("MISSED") && t.contains("met"), "{t}");
        // The results file round-trips (the plot command reads it back).
        let back: Results = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.rest.body_bytes, 3000);
    }

    /// With rounds, throughput is judged round by round: here the medians are equal (1.00),
    /// but nestor was behind in two rounds of three.
    #[test]
    fn throughput_is_judged_round_by_round() {
        let mut r = sample();
        let rounds = |rps: &[f64]| {
            rps.iter()
                .map(|&rps| LoadRound {
                    latency: Latency::default(),
                    rps,
                    requests: 1,
                    errors: 0,
                    proxy_cpu_us_per_req: None,
                    proxy_user_us_per_req: None,
                    proxy_sys_us_per_req: None,
                    downstream_cpu_us_per_req: None,
                    client_cpu_us_per_req: None,
                })
                .collect::<Vec<_>>()
        };
        r.rest.loaded.nestor.as_mut().unwrap().rounds = rounds(&[100.0, 200.0, 90.0]);
        r.rest.loaded.nginx.as_mut().unwrap().rounds = rounds(&[95.0, 210.0, 100.0]);
        r.derive();
        let p = r.ratios.rest_rps_nestor_over_nginx_paired.clone().unwrap();
        assert_eq!((p.rounds, p.ahead, p.min, p.max), (3, 1, 0.9, 100.0 / 95.0));
        assert_eq!(p.median, 200.0 / 210.0);
        let check = r.checks.iter().find(|c| c.what.starts_with("REST throughput")).unwrap();
        assert_eq!(check.met, Some(false), "{check:?}");
        assert!(r.table().contains("nestor ahead in 1 of 3 rounds"));
    }
}
