//! `nestor-bench`: the same REST and WebSocket workloads against the fake agent-server
//! directly, through nestor, and through nginx — side by side in one run on one machine,
//! so what is reported are differences and ratios measured together, never absolute
//! numbers from different moments (machines here are small and noisy).
//!
//! `nestor-bench run` prints a table on stdout and writes a JSON results file;
//! `nestor-bench plot` turns a results file into SVG charts. `scripts/bench.sh` builds
//! everything, installs nginx if needed, raises limits and runs both.
//!
//! Exit status: non-zero only when the harness itself fails (a process does not start, a
//! socket does not open...), never because something is slow.

mod catalog;
mod create;
mod dockermode;
mod harness;
mod plot;
mod procs;
mod relay;
mod report;
mod rest;
mod soak;
mod stats;
mod sys;
mod wrk;
mod ws;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use nestor_test_support::{FakeAgentServer, FakeConfig};
use serde_json::json;
use uuid::Uuid;

use crate::report::{Memory, Rest, RestLoad, RestSeq, Results, Stream, WsResults};
use crate::stats::{median, new_hist, spread_pct, Latency, Target};

#[derive(Parser)]
#[command(name = "nestor-bench", about = "nestor vs direct vs nginx, side by side")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the suite; print the table, write the results file (and charts with --plots).
    Run(RunArgs),
    /// A byte relay from `--listen` to `--target` (the suite's floor target; crate::relay).
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        target: std::net::SocketAddr,
    },
    /// Only the closed-loop REST load against one address (for profiling a proxy by hand:
    /// run it while `perf record -p <pid>` samples the proxy). Prints the round as JSON.
    Load {
        /// host:port to send to.
        #[arg(long)]
        addr: std::net::SocketAddr,
        /// `X-Session-API-Key` to present.
        #[arg(long)]
        key: String,
        /// Path to GET.
        #[arg(long)]
        path: String,
        #[arg(long, default_value_t = 64)]
        conns: usize,
        /// Measured seconds (after 1 s of warm-up).
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Pids whose CPU time to account per request.
        #[arg(long, value_delimiter = ',')]
        pids: Vec<u32>,
    },
    /// Long run under steady REST + WebSocket traffic (1,000 conversations on fake
    /// downstreams by default, 10 minutes): samples nestor's RSS, open fds and p99 every
    /// minute and judges whether they stay flat. Exit status 2 when they do not.
    Soak(soak::SoakArgs),
    /// Catalog search/count/paging over 1,000 conversations on 10 fake downstreams through
    /// nestor vs one fake holding all of them; then nestor's upstream connection reuse.
    Catalog(catalog::CatalogArgs),
    /// Create -> first event with the real agent-server: nestor's process, pool and docker
    /// provisioners vs the agent-server's own docker mode, in one run.
    Create(create::CreateArgs),
    /// REST, events-socket latency and memory: nestor's docker provisioner vs the
    /// agent-server's own docker mode, with their containers direct and nginx alongside.
    Dockermode(dockermode::DockerModeArgs),
    /// Render the SVG charts of a results file.
    Plot {
        /// The results file (JSON) of a run.
        #[arg(long)]
        results: PathBuf,
        /// Directory for the SVG files.
        #[arg(long, default_value = "docs/bench")]
        out: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results.json")]
    out: PathBuf,
    /// Also render the charts into this directory.
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Scratch directory (configs, logs, pid files); default: a new temp dir, removed after.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The nestor binary (release build).
    #[arg(long, default_value = "target/release/nestor")]
    nestor: PathBuf,
    /// The fake agent-server binary.
    #[arg(long, default_value = "target/release/nestor-fake-agent-server")]
    fake: PathBuf,
    /// The nginx binary (default: from PATH / sbin).
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// Leave nginx out.
    #[arg(long)]
    no_nginx: bool,
    /// Leave out the byte relay (the floor: what any proxy adds on this machine).
    #[arg(long)]
    no_relay: bool,
    /// The wrk binary, the second client of the 1-connection REST latency (default: from
    /// PATH; not installed: that measurement is left out with a note).
    #[arg(long)]
    wrk: Option<PathBuf>,
    /// Leave wrk's measurement out.
    #[arg(long)]
    no_wrk: bool,
    /// Seconds of each wrk round (per target).
    #[arg(long, default_value_t = 3)]
    wrk_secs: u64,
    /// Rounds of each comparison (at least 1) but the closed-loop REST one (`--load-rounds`);
    /// targets take turns within a round.
    #[arg(long, default_value_t = 3, value_parser = crate::stats::at_least_one)]
    rounds: usize,
    /// Sequential REST requests per round (after `--rest-warmup`).
    #[arg(long, default_value_t = 5000)]
    rest_requests: usize,
    #[arg(long, default_value_t = 1000)]
    rest_warmup: usize,
    /// Connections of the closed-loop REST run.
    #[arg(long, default_value_t = 64)]
    rest_conns: usize,
    /// Rounds of the closed-loop REST comparison (at least 1). More and shorter than the
    /// other phases' rounds: throughput is compared round by round (crate::stats::Paired),
    /// and more pairs average out more of the machine's drift.
    #[arg(long, default_value_t = 8, value_parser = crate::stats::at_least_one)]
    load_rounds: usize,
    /// Measured seconds of each closed-loop REST round (after 1 s of warm-up).
    #[arg(long, default_value_t = 2.0)]
    rest_secs: f64,
    /// Measured seconds of each WebSocket throughput round (after 1 s of warm-up).
    #[arg(long, default_value_t = 4.0)]
    ws_secs: f64,
    /// Pairs of the aggregate WebSocket run.
    #[arg(long, default_value_t = 1000)]
    ws_pairs: usize,
    /// Frames per round of the per-frame latency run.
    #[arg(long, default_value_t = 5000)]
    ws_latency_frames: u64,
    /// Frame size, bytes.
    #[arg(long, default_value_t = 1024)]
    frame_bytes: usize,
    /// Idle pairs for the memory measurement (clamped to what the fd limit allows).
    #[arg(long, default_value_t = 10_000)]
    idle_pairs: usize,
    /// Downstream restarts in the resume measurement.
    #[arg(long, default_value_t = 5)]
    resume_trials: usize,
    /// Conversations seeded in the REST / idle phase.
    #[arg(long, default_value_t = 100)]
    rest_conversations: usize,
    /// A much shorter run, to check the harness.
    #[arg(long)]
    quick: bool,
    /// Extra environment for nestor only, KEY=VALUE (repeatable), e.g.
    /// `TOKIO_WORKER_THREADS=1` to test a hypothesis without touching its code.
    #[arg(long = "nestor-env", value_parser = parse_kv)]
    nestor_env: Vec<(String, String)>,
    /// Leave out the idle-pairs memory measurement.
    #[arg(long)]
    skip_idle: bool,
    /// Leave out the WebSocket phase.
    #[arg(long)]
    skip_ws: bool,
    /// WebSocket clients offer permessage-deflate (nestor accepts it on the client leg; the
    /// fake and nginx decline it, so only nestor's client leg is compressed).
    #[arg(long)]
    ws_deflate: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

impl RunArgs {
    fn apply_quick(&mut self) {
        if self.quick {
            self.rounds = self.rounds.min(1);
            self.load_rounds = self.load_rounds.min(2);
            self.rest_requests = 500;
            self.rest_warmup = 100;
            self.rest_secs = 1.0;
            self.wrk_secs = 1;
            self.ws_secs = 1.0;
            self.ws_pairs = self.ws_pairs.min(100);
            self.ws_latency_frames = 500;
            self.idle_pairs = self.idle_pairs.min(500);
            self.resume_trials = self.resume_trials.min(2);
        }
    }
}

const DOWNSTREAM_KEY: &str = "bench-downstream-key-0123456789";
const CLIENT_KEY: &str = "bench-client-key-0123456789";

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NESTOR_BENCH_LOG").unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Plot { results, out } => match plot_cmd(&results, &out) {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!("{e:#}");
                1
            }
        },
        Command::Relay { listen, target } => match relay::run(listen, target) {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!("relay: {e:#}");
                1
            }
        },
        Command::Load { addr, key, path, conns, secs, pids } => match load_cmd(addr, key, path, conns, secs, pids) {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!("{e:#}");
                1
            }
        },
        Command::Soak(args) => match soak::run_cmd(args) {
            Ok(true) => 0,
            Ok(false) => 2,
            Err(e) => {
                tracing::error!("harness error: {e:#}");
                1
            }
        },
        Command::Catalog(args) => report_err(catalog::run_cmd(args)),
        Command::Create(args) => report_err(create::run_cmd(args)),
        Command::Dockermode(args) => report_err(dockermode::run_cmd(args)),
        Command::Run(args) => match run_cmd(args) {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!("harness error: {e:#}");
                1
            }
        },
    };
    std::process::exit(code);
}

fn report_err(r: anyhow::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("harness error: {e:#}");
            1
        }
    }
}

fn plot_cmd(results: &Path, out: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(results).with_context(|| format!("reading {}", results.display()))?;
    let r: Results = serde_json::from_str(&text).context("parsing the results file")?;
    for p in plot::render(&r, out)? {
        tracing::info!(file = %p.display(), "chart written");
    }
    Ok(())
}

fn load_cmd(addr: std::net::SocketAddr, key: String, path: String, conns: usize, secs: f64, pids: Vec<u32>) -> anyhow::Result<()> {
    sys::raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let t = rest::HttpTarget { addr, key, path };
    let mut h = new_hist();
    let r = rt.block_on(rest::closed_loop(&t, conns, Duration::from_secs(1), Duration::from_secs_f64(secs), &pids, &[], &mut h))?;
    #[allow(clippy::print_stdout)]
    {
        println!("{}", serde_json::to_string_pretty(&r)?);
    }
    Ok(())
}

fn run_cmd(mut args: RunArgs) -> anyhow::Result<()> {
    args.apply_quick();
    sys::now_ns();
    let (soft, hard) = sys::raise_nofile();
    tracing::info!(soft, hard, "open files limit");
    // The load generator (and the orchestration) and the in-process fake downstream run on
    // separate runtimes, so one never starves the other's scheduler.
    let client_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("bench-client").enable_all().build()?;
    let fake_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("bench-fake").enable_all().build()?;
    let (work, _tmp_guard) = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile_dir()?;
            (t.clone(), Some(RemoveOnDrop(t)))
        }
    };
    let fake_handle = fake_rt.handle().clone();
    let result = client_rt.block_on(async {
        tokio::select! {
            r = run(&args, &work, hard, fake_handle) => r,
            _ = shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    // Everything the run started is dropped (and killed) by now.
    fake_rt.shutdown_timeout(Duration::from_secs(5));
    client_rt.shutdown_timeout(Duration::from_secs(5));
    let results = result?;
    crate::report::write_results(&args.out, &results)?;
    if let Some(dir) = &args.plots {
        for p in plot::render(&results, dir)? {
            tracing::info!(file = %p.display(), "chart written");
        }
    }
    #[allow(clippy::print_stdout)]
    {
        print!("{}", results.table());
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("nestor-bench-{}-{}", std::process::id(), Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// The commit measured: `BENCH_COMMIT` if set (a build from an exported tree), else
/// `git rev-parse`, marked `-dirty` when tracked files differ from it.
fn git_commit() -> Option<String> {
    if let Ok(c) = std::env::var("BENCH_COMMIT") {
        return Some(c);
    }
    let out = std::process::Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let mut c = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let st = std::process::Command::new("git").args(["status", "--porcelain", "--untracked-files=no"]).output().ok()?;
    if !st.stdout.is_empty() {
        c.push_str("-dirty");
    }
    Some(c)
}

fn today() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!("{:04}-{:02}-{:02}", now.year(), now.month() as u8, now.day())
}

/// wrk's rounds against every target, the targets taking turns within a round.
async fn wrk_rounds(
    wrk: &wrk::Wrk,
    targets: &[Target],
    args: &RunArgs,
    path: &str,
    at: impl Fn(Target) -> (std::net::SocketAddr, &'static str),
) -> anyhow::Result<Vec<(Target, Vec<wrk::WrkRound>)>> {
    let mut per_target: Vec<(Target, Vec<wrk::WrkRound>)> = targets.iter().map(|&t| (t, Vec::new())).collect();
    for round in 0..args.rounds {
        for (t, rounds) in per_target.iter_mut() {
            let (addr, key) = at(*t);
            let r = wrk.one_connection(addr, key, path, args.wrk_secs).await.with_context(|| format!("wrk via {}", t.name()))?;
            tracing::info!(round, target = t.name(), p50_us = r.p50_us, p99_us = r.p99_us, "REST, 1 connection, wrk");
            rounds.push(r);
        }
    }
    Ok(per_target)
}

/// The whole suite. Every process it starts lives in a `Proc` that kills it when dropped.
async fn run(args: &RunArgs, work: &Path, nofile_hard: u64, fake_rt: tokio::runtime::Handle) -> anyhow::Result<Results> {
    let started = Instant::now();
    let loadavg_start = sys::loadavg();
    let nginx_bin = if args.no_nginx {
        None
    } else {
        Some(
            args.nginx
                .clone()
                .or_else(|| procs::which("nginx"))
                .context("nginx not found (run scripts/setup-system.sh nginx, or pass --no-nginx)")?,
        )
    };
    for b in [&args.nestor, &args.fake] {
        anyhow::ensure!(b.is_file(), "{} not found: build it first (cargo build --release)", b.display());
    }
    let mut targets: Vec<Target> = vec![Target::Direct, Target::Nestor];
    if nginx_bin.is_some() {
        targets.push(Target::Nginx);
    }
    if !args.no_relay {
        targets.push(Target::Relay);
    }
    let mut notes = Vec::new();

    // nestor needs two descriptors per pair (client + downstream) in one process.
    let max_pairs = (nofile_hard.saturating_sub(1000) / 2) as usize;
    let idle_pairs = args.idle_pairs.min(max_pairs);
    if idle_pairs < args.idle_pairs {
        notes.push(format!(
            "idle pairs clamped from {} to {idle_pairs}: the hard open-files limit here is {nofile_hard} and cannot be raised (no CAP_SYS_RESOURCE); nestor and nginx need 2 descriptors per pair in one process",
            args.idle_pairs
        ));
    }

    let mut memory = Memory { idle_pairs_requested: args.idle_pairs, ..Default::default() };
    let mut rest = Rest::default();

    // ------------------------------------------------------------ phase 1: REST + idle
    {
        tracing::info!("phase 1: fake downstream process, nestor, nginx");
        let (mut fake, fake_addr) = procs::start_fake(&args.fake, work, "fake-rest", DOWNSTREAM_KEY, args.rest_conversations, 10).await?;
        let (mut nestor, nestor_addr) = procs::start_nestor(&args.nestor, work, "nestor-rest", fake_addr, DOWNSTREAM_KEY, CLIENT_KEY, &args.nestor_env).await?;
        let mut nginx = match &nginx_bin {
            Some(b) => Some(procs::start_nginx(b, work, "nginx-rest", fake_addr, nofile_hard).await?),
            None => None,
        };
        let relay = if args.no_relay { None } else { Some(procs::start_relay(work, "relay-rest", fake_addr).await?) };
        let relay_addr = relay.as_ref().map(|(_, a)| *a).unwrap_or(fake_addr);
        let relay_pids: Vec<u32> = relay.as_ref().map(|(p, _)| vec![p.pid()]).unwrap_or_default();
        let search = rest::get_json(fake_addr, &format!("/api/conversations/search?limit={}", args.rest_conversations.clamp(1, 100)), DOWNSTREAM_KEY).await?;
        let convs: Vec<Uuid> = search["items"]
            .as_array()
            .context("search answer has no items")?
            .iter()
            .filter_map(|i| i["id"].as_str().and_then(|s| Uuid::parse_str(s).ok()))
            .collect();
        anyhow::ensure!(!convs.is_empty(), "the fake has no conversations");
        // nestor must know them all (its catalog was loaded at start).
        let (st, _) = rest::Conn::open(nestor_addr, sys::source_addr(0)).await?.get(&format!("/api/conversations/{}", convs[0]), Some(CLIENT_KEY)).await?;
        anyhow::ensure!(st == 200, "nestor does not route the seeded conversation (HTTP {st})");

        tokio::time::sleep(Duration::from_millis(1000)).await;
        memory.nestor_idle_rss_kib = sys::rss_kib(nestor.pid());
        memory.nginx_idle_rss_kib = nginx.as_ref().and_then(|(p, _)| sys::rss_kib_sum(&p.pids()));

        let nginx_addr = nginx.as_ref().map(|(_, a)| *a).unwrap_or(fake_addr);
        let nginx_pids = nginx.as_ref().map(|(p, _)| p.pids()).unwrap_or_default();
        let (nestor_pid, fake_pid) = (nestor.pid(), fake.pid());
        let addr_of = |t: Target| match t {
            Target::Direct => fake_addr,
            Target::Nestor => nestor_addr,
            Target::Nginx => nginx_addr,
            Target::Relay => relay_addr,
        };
        let key_of = |t: Target| if t == Target::Nestor { CLIENT_KEY } else { DOWNSTREAM_KEY };
        let proxy_pids = |t: Target| -> Vec<u32> {
            match t {
                Target::Direct => vec![],
                Target::Nestor => vec![nestor_pid],
                Target::Nginx => nginx_pids.clone(),
                Target::Relay => relay_pids.clone(),
            }
        };

        // Idle pairs first, while nestor is fresh.
        if idle_pairs > 0 && !args.skip_idle {
            for &t in &targets {
                let wt = ws::WsTarget { addr: addr_of(t), key: key_of(t).to_owned(), deflate: args.ws_deflate };
                let pids = if t == Target::Direct { vec![fake_pid] } else { proxy_pids(t) };
                tracing::info!(target = t.name(), pairs = idle_pairs, "idle pairs");
                let r = ws::idle(&wt, &convs, idle_pairs, &pids, &pids).await.with_context(|| format!("idle pairs via {}", t.name()))?;
                tracing::info!(target = t.name(), per_pair_kib = r.rss_per_pair_kib, "idle pairs measured");
                *memory.idle_pairs.get_mut(t) = Some(r);
                check_alive(&mut fake, &mut nestor, &mut nginx)?;
            }
        }

        let path = format!("/api/conversations/{}", convs[0]);
        rest.path = "/api/conversations/{id}".into();
        // Sequential.
        let mut hists: Vec<_> = targets.iter().map(|_| new_hist()).collect();
        let mut rounds: Vec<Vec<rest::SequentialRound>> = targets.iter().map(|_| Vec::new()).collect();
        for round in 0..args.rounds {
            for (i, &t) in targets.iter().enumerate() {
                let ht = rest::HttpTarget { addr: addr_of(t), key: key_of(t).to_owned(), path: path.clone() };
                let r = rest::sequential(&ht, args.rest_warmup, args.rest_requests, &mut hists[i]).await.with_context(|| format!("sequential REST via {}", t.name()))?;
                tracing::info!(round, target = t.name(), p50_us = r.latency.p50_us, p99_us = r.latency.p99_us, "REST, 1 connection");
                rest.body_bytes = r.body_bytes;
                rounds[i].push(r);
            }
        }
        for (i, &t) in targets.iter().enumerate() {
            *rest.sequential.get_mut(t) = Some(RestSeq { latency: Latency::from_hist(&hists[i]), rounds: std::mem::take(&mut rounds[i]) });
        }
        // The same, with wrk as the client (crate::wrk says why). An optional second
        // instrument: if it fails, the run goes on with a note.
        let wrk_bin = if args.no_wrk { None } else { args.wrk.clone().or_else(|| procs::which("wrk")) };
        match wrk_bin {
            Some(bin) => match wrk_rounds(&wrk::Wrk::new(bin, work)?, &targets, args, &path, |t| (addr_of(t), key_of(t))).await {
                Ok(per_target) => {
                    for (t, rounds) in per_target {
                        *rest.wrk.get_mut(t) = Some(report::WrkSeq::of(rounds));
                    }
                }
                Err(e) => {
                    tracing::warn!("wrk's measurement left out: {e:#}");
                    notes.push(format!("wrk's 1-connection measurement failed and was left out: {e:#}"));
                }
            },
            None if !args.no_wrk => notes.push("wrk not found: the 1-connection latency was measured by nestor-bench's own client only (scripts/setup-system.sh wrk installs it)".into()),
            None => {}
        }
        // Closed loop.
        let mut hists: Vec<_> = targets.iter().map(|_| new_hist()).collect();
        let mut rounds: Vec<Vec<rest::LoadRound>> = targets.iter().map(|_| Vec::new()).collect();
        for round in 0..args.load_rounds {
            for i in crate::stats::round_order(targets.len(), round) {
                let t = targets[i];
                let ht = rest::HttpTarget { addr: addr_of(t), key: key_of(t).to_owned(), path: path.clone() };
                let r = rest::closed_loop(
                    &ht,
                    args.rest_conns,
                    Duration::from_secs(1),
                    Duration::from_secs_f64(args.rest_secs),
                    &proxy_pids(t),
                    &[fake_pid],
                    &mut hists[i],
                )
                .await
                .with_context(|| format!("closed-loop REST via {}", t.name()))?;
                tracing::info!(round, target = t.name(), rps = r.rps as u64, p50_us = r.latency.p50_us, p99_us = r.latency.p99_us, "REST, closed loop");
                rounds[i].push(r);
                check_alive(&mut fake, &mut nestor, &mut nginx)?;
            }
        }
        for (i, &t) in targets.iter().enumerate() {
            let rs = std::mem::take(&mut rounds[i]);
            let rps: Vec<f64> = rs.iter().map(|r| r.rps).collect();
            let cpu: Vec<f64> = rs.iter().filter_map(|r| r.proxy_cpu_us_per_req).collect();
            let user: Vec<f64> = rs.iter().filter_map(|r| r.proxy_user_us_per_req).collect();
            let sys_: Vec<f64> = rs.iter().filter_map(|r| r.proxy_sys_us_per_req).collect();
            *rest.loaded.get_mut(t) = Some(RestLoad {
                connections: args.rest_conns,
                latency: Latency::from_hist(&hists[i]),
                rps_median: median(&rps),
                rps_spread_pct: spread_pct(&rps),
                proxy_cpu_us_per_req_median: (!cpu.is_empty()).then(|| median(&cpu)),
                proxy_user_us_per_req_median: (!user.is_empty()).then(|| median(&user)),
                proxy_sys_us_per_req_median: (!sys_.is_empty()).then(|| median(&sys_)),
                rounds: rs,
            });
        }
        drop(relay);
        drop(nginx);
        drop(nestor);
        drop(fake);
    }

    // ------------------------------------------------------------ phase 2: WebSockets
    let mut wsr = WsResults::default();
    if !args.skip_ws {
        tracing::info!("phase 2: in-process fake downstream, nestor, nginx");
        let cfg = FakeConfig {
            session_api_key: Some(DOWNSTREAM_KEY.into()),
            max_subscribers_per_conversation: 1_000_000,
            ..FakeConfig::default()
        };
        let fake = {
            let cfg = cfg.clone();
            fake_rt.spawn(async move { FakeAgentServer::start(cfg).await }).await??
        };
        let _stop_fake = StopFake(fake.clone(), fake_rt.clone());
        let n_convs = args.ws_pairs.max(1) + 1;
        let mut convs = Vec::with_capacity(n_convs);
        for i in 0..n_convs {
            let info = fake.create_conversation(
                None,
                json!({
                    "agent": {"kind": "Agent", "llm": {"model": "openai/fake", "usage_id": "agent"}, "tools": [{"name": "terminal"}]},
                    "workspace": {"working_dir": "/workspace"},
                    "tags": {"bench": i.to_string()},
                }),
            );
            convs.push(info["id"].as_str().and_then(|s| Uuid::parse_str(s).ok()).context("created conversation has no id")?);
        }
        let resume_conv = convs.pop().context("no conversation")?;
        let fake_addr = fake.addr();
        let (mut nestor, nestor_addr) = procs::start_nestor(&args.nestor, work, "nestor-ws", fake_addr, DOWNSTREAM_KEY, CLIENT_KEY, &args.nestor_env).await?;
        let nginx = match &nginx_bin {
            Some(b) => Some(procs::start_nginx(b, work, "nginx-ws", fake_addr, nofile_hard).await?),
            None => None,
        };
        let relay = if args.no_relay { None } else { Some(procs::start_relay(work, "relay-ws", fake_addr).await?) };
        let relay_addr = relay.as_ref().map(|(_, a)| *a).unwrap_or(fake_addr);
        let relay_pids: Vec<u32> = relay.as_ref().map(|(p, _)| vec![p.pid()]).unwrap_or_default();
        tokio::time::sleep(Duration::from_millis(500)).await;
        memory.nestor_idle_rss_kib_ws_phase = sys::rss_kib(nestor.pid());
        let pusher = ws::Pusher::new(fake.clone(), fake_rt.clone(), args.frame_bytes);
        let nginx_addr = nginx.as_ref().map(|(_, a)| *a).unwrap_or(fake_addr);
        let nginx_pids = nginx.as_ref().map(|(p, _)| p.pids()).unwrap_or_default();
        let nestor_pid = nestor.pid();
        let wt = |t: Target| ws::WsTarget {
            addr: match t {
                Target::Direct => fake_addr,
                Target::Nestor => nestor_addr,
                Target::Nginx => nginx_addr,
                Target::Relay => relay_addr,
            },
            key: if t == Target::Nestor { CLIENT_KEY.into() } else { DOWNSTREAM_KEY.into() },
            deflate: args.ws_deflate,
        };
        let proxy_pids = |t: Target| -> Vec<u32> {
            match t {
                Target::Direct => vec![],
                Target::Nestor => vec![nestor_pid],
                Target::Nginx => nginx_pids.clone(),
                Target::Relay => relay_pids.clone(),
            }
        };

        type Runs = Vec<(&'static str, usize, u64, ws::Span)>;
        let runs: Runs = vec![
            ("latency", 1, 1, ws::Span::Frames { warmup: 500, frames: args.ws_latency_frames, limit: Duration::from_secs(60) }),
            ("single", 1, 256, ws::Span::Time { warmup: Duration::from_secs(1), measure: Duration::from_secs_f64(args.ws_secs) }),
            ("many", args.ws_pairs, 32, ws::Span::Time { warmup: Duration::from_secs(1), measure: Duration::from_secs_f64(args.ws_secs) }),
        ];
        for (name, pairs, window, span) in runs {
            let mut hists: Vec<_> = targets.iter().map(|_| new_hist()).collect();
            let mut rounds: Vec<Vec<ws::StreamResult>> = targets.iter().map(|_| Vec::new()).collect();
            for round in 0..args.rounds {
                for (i, &t) in targets.iter().enumerate() {
                    let r = ws::stream(&pusher, &wt(t), &convs, pairs, window, span, &proxy_pids(t), &mut hists[i])
                        .await
                        .with_context(|| format!("WebSocket {name} via {}", t.name()))?;
                    tracing::info!(round, run = name, target = t.name(), fps = r.frames_per_sec as u64, p50_us = r.latency.p50_us, p99_us = r.latency.p99_us, broken = r.broken_pairs, "WebSocket");
                    if r.broken_pairs > 0 {
                        notes.push(format!("WebSocket {name} via {}: {} pairs ended early in round {round}", t.name(), r.broken_pairs));
                    }
                    rounds[i].push(r);
                    nestor.check_alive()?;
                }
            }
            for (i, &t) in targets.iter().enumerate() {
                let s = Stream::from_rounds(std::mem::take(&mut rounds[i]), Latency::from_hist(&hists[i]));
                let slot = match name {
                    "latency" => &mut wsr.latency,
                    "single" => &mut wsr.single,
                    _ => &mut wsr.many,
                };
                *slot.get_mut(t) = Some(s);
            }
        }

        // Resume: nestor keeps the client; the others cannot (the relay is left out: it
        // behaves as nginx does, and is here only as the floor of the other figures).
        for &t in targets.iter().filter(|t| **t != Target::Relay) {
            let trials = if t == Target::Nestor { args.resume_trials } else { 1 };
            let r = ws::resume(&pusher, &wt(t), resume_conv, trials).await.with_context(|| format!("resume via {}", t.name()))?;
            tracing::info!(target = t.name(), resumed = r.resumed, first_live_ms = ?r.first_live_frame_ms, closed_after_ms = ?r.client_closed_after_ms, "downstream restart");
            *wsr.resume.get_mut(t) = Some(r);
            // Let nestor's own probes settle after the restarts.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        nestor.check_alive()?;
        drop(relay);
        drop(nginx);
        drop(nestor);
    }

    let settings = json!({
        "rounds": args.rounds,
        "load_rounds": args.load_rounds,
        "rest_requests": args.rest_requests,
        "rest_warmup": args.rest_warmup,
        "rest_conns": args.rest_conns,
        "rest_secs": args.rest_secs,
        "ws_secs": args.ws_secs,
        "ws_pairs": args.ws_pairs,
        "ws_latency_frames": args.ws_latency_frames,
        "frame_bytes": args.frame_bytes,
        "idle_pairs": idle_pairs,
        "resume_trials": args.resume_trials,
        "rest_conversations": args.rest_conversations,
        "quick": args.quick,
        "nestor_env": args.nestor_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "skip_idle": args.skip_idle,
        "wrk_secs": args.wrk_secs,
        "skip_ws": args.skip_ws,
        "ws_deflate": args.ws_deflate,
        "client_runtime_threads": 2,
        "in_process_fake_runtime_threads": 2,
    });
    let mut results = Results {
        meta: report::Meta {
            date: today(),
            wall_secs: started.elapsed().as_secs_f64(),
            machine: sys::machine(),
            git_commit: git_commit(),
            nginx_version: nginx_bin.as_deref().and_then(procs::nginx_version),
            nofile_limit: nofile_hard,
            loadavg_start,
            loadavg_end: sys::loadavg(),
            settings,
            notes,
        },
        memory,
        rest,
        ws: wsr,
        ratios: Default::default(),
        checks: vec![],
    };
    results.derive();
    Ok(results)
}

fn check_alive(fake: &mut procs::Proc, nestor: &mut procs::Proc, nginx: &mut Option<(procs::Proc, std::net::SocketAddr)>) -> anyhow::Result<()> {
    fake.check_alive()?;
    nestor.check_alive()?;
    if let Some((n, _)) = nginx.as_mut() {
        n.check_alive()?;
    }
    Ok(())
}

/// Stops the in-process fake (closing its sockets) when the phase ends, however it ends.
struct StopFake(FakeAgentServer, tokio::runtime::Handle);

impl Drop for StopFake {
    fn drop(&mut self) {
        let f = self.0.clone();
        self.1.spawn(async move { f.stop().await });
    }
}

