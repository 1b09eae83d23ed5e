//! `nestor-bench catalog`: conversation search over 1,000 conversations spread on 10
//! downstreams, through nestor, against the same search answered by one fake agent-server
//! holding all 1,000 itself; then nestor's upstream connection reuse after REST traffic.
//!
//! Why this shape: nestor answers search/count from its own catalog (merged across
//! downstreams, refreshed from each downstream's own search at most once per
//! `catalog.max_staleness_ms`), so what a client pays is nestor's catalog plus those
//! refreshes. The yardstick is the agent-server answering from its own store, the fastest
//! a single server can be: the fake, which keeps everything in memory. Both sides take
//! turns round by round (the machine is small and shared; only ratios measured together
//! are meaningful).
//!
//! Workloads, per round and side, each on one keep-alive connection:
//! * `GET /api/conversations/search` (first page, default page size);
//! * `GET /api/conversations/count`;
//! * paging through everything with `limit=100` (`page_id` = the previous `next_page_id`),
//!   timed per walk and per page; every walk must see all conversations exactly once.
//!
//! Reuse: `nestor_upstream_requests_total` / `nestor_upstream_connections_opened_total`
//! from nestor's `/metrics`, before and after the search phase and after a REST phase
//! (`GET /api/conversations/{id}` over all 1,000 conversations sequentially, then a
//! closed loop on 64 connections), reported as requests per opened connection.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::harness::{self, Http};
use crate::stats::{new_hist, record, Latency};
use crate::{procs, rest, sys};

const DOWNSTREAM_KEY: &str = "bench-downstream-key-0123456789";
const CLIENT_KEY: &str = "bench-client-key-0123456789";

#[derive(Args, Debug, Clone)]
pub struct CatalogArgs {
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-catalog.json")]
    pub out: PathBuf,
    /// Scratch directory (configs, logs, pid files); default: a new temp dir, removed after.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[arg(long, default_value = "target/release/nestor")]
    pub nestor: PathBuf,
    #[arg(long, default_value = "target/release/nestor-fake-agent-server")]
    pub fake: PathBuf,
    /// Downstreams behind nestor.
    #[arg(long, default_value_t = 10)]
    pub downstreams: usize,
    /// Conversations in all (split evenly over the downstreams).
    #[arg(long, default_value_t = 1000)]
    pub conversations: usize,
    /// Events seeded per conversation.
    #[arg(long, default_value_t = 2)]
    pub events: usize,
    /// Rounds (at least 1).
    #[arg(long, default_value_t = 3, value_parser = crate::stats::at_least_one)]
    pub rounds: usize,
    /// First-page searches and counts per round and side (after 20 warm-up requests).
    #[arg(long, default_value_t = 300)]
    pub requests: usize,
    /// Full walks (limit=100) per round and side.
    #[arg(long, default_value_t = 10)]
    pub walks: usize,
    /// Sequential `GET /api/conversations/{id}` of the reuse phase.
    #[arg(long, default_value_t = 2000)]
    pub rest_requests: usize,
    /// Seconds of the 64-connection closed loop of the reuse phase.
    #[arg(long, default_value_t = 3.0)]
    pub rest_secs: f64,
    /// A much shorter run, to check the harness.
    #[arg(long)]
    pub quick: bool,
    /// Also write `catalog.svg` into this directory.
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Do not measure: render the chart of this results file (into `--plots`, default
    /// docs/bench).
    #[arg(long)]
    pub plot_from: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Side {
    pub first_page: Latency,
    pub count: Latency,
    /// One whole walk (all pages), µs.
    pub walk: Latency,
    /// One page of a walk, µs.
    pub walk_page: Latency,
    pub pages_per_walk: usize,
    pub first_page_items: usize,
    pub first_page_bytes: usize,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ReuseStep {
    pub phase: String,
    pub upstream_requests: f64,
    pub connections_opened: f64,
    pub requests_per_connection: Option<f64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CatalogResults {
    pub date: String,
    pub git_commit: Option<String>,
    pub machine: serde_json::Value,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub wall_secs: f64,
    pub settings: serde_json::Value,
    pub direct: Side,
    pub nestor: Side,
    /// nestor / direct, for p50 and p99 of each workload.
    pub ratios: serde_json::Value,
    pub nestor_rss_kib: Option<u64>,
    /// Cumulative counters at the end of each phase (since nestor started), and per phase.
    pub reuse: Vec<ReuseStep>,
    pub reuse_per_phase: Vec<ReuseStep>,
}

pub fn run_cmd(mut args: CatalogArgs) -> anyhow::Result<()> {
    if args.quick {
        args.rounds = 1;
        args.requests = 50;
        args.walks = 2;
        args.rest_requests = 300;
        args.rest_secs = 1.0;
    }
    if let Some(f) = &args.plot_from {
        let r: CatalogResults = serde_json::from_str(&std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?)?;
        let p = crate::create::plots::catalog_svg(&r, args.plots.as_deref().unwrap_or(std::path::Path::new("docs/bench")))?;
        tracing::info!(file = %p.display(), "chart written");
        return Ok(());
    }
    sys::raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("bench-catalog").enable_all().build()?;
    let (work, _guard) = crate::create::work_dir(&args.work_dir, "catalog")?;
    let res = rt.block_on(async {
        tokio::select! {
            r = run(&args, &work) => r,
            _ = crate::create::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
        }
    })?;
    rt.shutdown_timeout(Duration::from_secs(5));
    crate::report::write_results(&args.out, &res)?;
    if let Some(dir) = &args.plots {
        let p = crate::create::plots::catalog_svg(&res, dir)?;
        tracing::info!(file = %p.display(), "chart written");
    }
    #[allow(clippy::print_stdout)]
    {
        print!("{}", table(&res));
    }
    Ok(())
}

async fn run(args: &CatalogArgs, work: &std::path::Path) -> anyhow::Result<CatalogResults> {
    let started = Instant::now();
    let loadavg_start = sys::loadavg();
    anyhow::ensure!(args.downstreams > 0 && args.conversations >= args.downstreams, "need at least one conversation per downstream");
    for b in [&args.nestor, &args.fake] {
        anyhow::ensure!(b.is_file(), "{} not found: build it first (cargo build --release)", b.display());
    }
    let per = args.conversations / args.downstreams;
    let total = per * args.downstreams;
    tracing::info!(downstreams = args.downstreams, per, "starting fakes");
    let mut fakes = Vec::new();
    for i in 0..args.downstreams {
        fakes.push(procs::start_fake(&args.fake, work, &format!("fake-cat-{i}"), DOWNSTREAM_KEY, per, args.events).await?);
    }
    let (_direct_proc, direct) = procs::start_fake(&args.fake, work, "fake-cat-all", DOWNSTREAM_KEY, total, args.events).await?;
    let mut servers = String::from("[provisioner]\nkind = \"existing\"\n");
    for (_, a) in &fakes {
        servers.push_str(&format!("[[provisioner.existing.servers]]\nurl = \"http://{a}\"\napi_key = \"{DOWNSTREAM_KEY}\"\n"));
    }
    let (mut nestor_proc, nestor) = harness::start_nestor(&args.nestor, work, "nestor-catalog", CLIENT_KEY, &servers, &[], Duration::from_secs(60)).await?;
    let m0 = harness::scrape(nestor).await?;

    // nestor adopts the downstreams' conversations on its first refreshes.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut c = Http::open(nestor).await?;
        let n = c.get_json("/api/conversations/count", Some(CLIENT_KEY)).await?;
        if n.as_u64() == Some(total as u64) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "nestor counts {n} conversations, expected {total}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut c = Http::open(direct).await?;
    let n = c.get_json("/api/conversations/count", Some(DOWNSTREAM_KEY)).await?;
    anyhow::ensure!(n.as_u64() == Some(total as u64), "the direct fake counts {n}, expected {total}");

    let sides = [("direct", direct, DOWNSTREAM_KEY), ("nestor", nestor, CLIENT_KEY)];
    let mut h: Vec<[Histogram<u64>; 4]> = (0..2).map(|_| [new_hist(), new_hist(), new_hist(), new_hist()]).collect();
    let mut out = [Side::default(), Side::default()];
    for round in 0..args.rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (name, addr, key) = sides[i];
            let mut conn = Http::open(addr).await?;
            // First page, default page size.
            for j in 0..(20 + args.requests) {
                let t = Instant::now();
                let (st, body) = conn.get("/api/conversations/search", Some(key)).await?;
                let ns = t.elapsed().as_nanos() as u64;
                anyhow::ensure!(st == 200, "{name}: search HTTP {st}");
                if j >= 20 {
                    record(&mut h[i][0], ns);
                } else if j == 0 {
                    let v: serde_json::Value = serde_json::from_slice(&body)?;
                    out[i].first_page_items = v["items"].as_array().map_or(0, |a| a.len());
                    out[i].first_page_bytes = body.len();
                }
            }
            for j in 0..(20 + args.requests) {
                let t = Instant::now();
                let (st, _) = conn.get("/api/conversations/count", Some(key)).await?;
                let ns = t.elapsed().as_nanos() as u64;
                anyhow::ensure!(st == 200, "{name}: count HTTP {st}");
                if j >= 20 {
                    record(&mut h[i][1], ns);
                }
            }
            for _ in 0..args.walks {
                let t = Instant::now();
                let mut seen = HashSet::with_capacity(total);
                let mut page: Option<String> = None;
                let mut pages = 0;
                loop {
                    pages += 1;
                    anyhow::ensure!(pages <= total / 100 + 5, "{name}: paging does not end");
                    let path = match &page {
                        Some(p) => format!("/api/conversations/search?limit=100&page_id={p}"),
                        None => "/api/conversations/search?limit=100".to_owned(),
                    };
                    let tp = Instant::now();
                    let (st, body) = conn.get(&path, Some(key)).await?;
                    record(&mut h[i][3], tp.elapsed().as_nanos() as u64);
                    anyhow::ensure!(st == 200, "{name}: {path}: HTTP {st}");
                    let v: serde_json::Value = serde_json::from_slice(&body)?;
                    for it in v["items"].as_array().context("no items")? {
                        let id = it["id"].as_str().context("item without id")?.to_owned();
                        anyhow::ensure!(seen.insert(id), "{name}: a walk saw a conversation twice");
                    }
                    match v["next_page_id"].as_str() {
                        Some(p) => page = Some(p.to_owned()),
                        None => break,
                    }
                }
                record(&mut h[i][2], t.elapsed().as_nanos() as u64);
                anyhow::ensure!(seen.len() == total, "{name}: a walk saw {} of {total} conversations", seen.len());
                out[i].pages_per_walk = pages;
            }
            let l = Latency::from_hist(&h[i][0]);
            tracing::info!(round, target = name, first_page_p50_us = l.p50_us, walk_p50_ms = Latency::from_hist(&h[i][2]).p50_us / 1000.0, "catalog");
            nestor_proc.check_alive()?;
        }
    }
    for i in 0..2 {
        out[i].first_page = Latency::from_hist(&h[i][0]);
        out[i].count = Latency::from_hist(&h[i][1]);
        out[i].walk = Latency::from_hist(&h[i][2]);
        out[i].walk_page = Latency::from_hist(&h[i][3]);
    }
    let m1 = harness::scrape(nestor).await?;

    // REST phase through nestor, over every downstream.
    tracing::info!("reuse: REST through nestor");
    let mut ids = Vec::with_capacity(total);
    {
        let mut conn = Http::open(nestor).await?;
        let mut page: Option<String> = None;
        for _ in 0..(total / 100 + 5) {
            let path = match &page {
                Some(p) => format!("/api/conversations/search?limit=100&page_id={p}"),
                None => "/api/conversations/search?limit=100".to_owned(),
            };
            let v = conn.get_json(&path, Some(CLIENT_KEY)).await?;
            ids.extend(v["items"].as_array().context("no items")?.iter().filter_map(|i| i["id"].as_str().map(str::to_owned)));
            match v["next_page_id"].as_str() {
                Some(p) => page = Some(p.to_owned()),
                None => break,
            }
        }
        for j in 0..args.rest_requests {
            let id = &ids[j % ids.len()];
            let (st, _) = conn.get(&format!("/api/conversations/{id}"), Some(CLIENT_KEY)).await?;
            anyhow::ensure!(st == 200, "GET conversation through nestor: HTTP {st}");
        }
    }
    let m2 = harness::scrape(nestor).await?;
    let ht = rest::HttpTarget { addr: nestor, key: CLIENT_KEY.into(), path: format!("/api/conversations/{}", ids[0]) };
    let mut hist = new_hist();
    let lr = rest::closed_loop(&ht, 64, Duration::from_secs(1), Duration::from_secs_f64(args.rest_secs), &[nestor_proc.pid()], &[], &mut hist).await?;
    tracing::info!(rps = lr.rps as u64, "reuse: closed loop done");
    let m3 = harness::scrape(nestor).await?;
    let nestor_rss_kib = sys::rss_kib(nestor_proc.pid());
    nestor_proc.check_alive()?;

    let snap = |phase: &str, text: &str| ReuseStep::new(phase, harness::metric_sum(text, "nestor_upstream_requests_total").unwrap_or(0.0), harness::metric_sum(text, "nestor_upstream_connections_opened_total").unwrap_or(0.0));
    let steps = vec![snap("nestor started, catalog loaded", &m0), snap("after search/count/paging", &m1), snap("after 1-connection GETs", &m2), snap("after 64-connection closed loop", &m3)];
    let mut per_phase = Vec::new();
    let names = ["start (initial refreshes, probes)", "search/count/paging", "GET /api/conversations/{id}, 1 connection", "GET /api/conversations/{id}, 64 connections"];
    for (k, s) in steps.iter().enumerate() {
        let (pr, po) = if k == 0 { (0.0, 0.0) } else { (steps[k - 1].upstream_requests, steps[k - 1].connections_opened) };
        per_phase.push(ReuseStep::new(names[k], s.upstream_requests - pr, s.connections_opened - po));
    }

    let r = |a: f64, b: f64| if b > 0.0 { serde_json::json!((a / b * 100.0).round() / 100.0) } else { serde_json::Value::Null };
    let (d, n) = (&out[0], &out[1]);
    let ratios = serde_json::json!({
        "first_page_p50": r(n.first_page.p50_us, d.first_page.p50_us),
        "first_page_p99": r(n.first_page.p99_us, d.first_page.p99_us),
        "count_p50": r(n.count.p50_us, d.count.p50_us),
        "count_p99": r(n.count.p99_us, d.count.p99_us),
        "walk_p50": r(n.walk.p50_us, d.walk.p50_us),
        "walk_p99": r(n.walk.p99_us, d.walk.p99_us),
        "walk_page_p50": r(n.walk_page.p50_us, d.walk_page.p50_us),
        "walk_page_p99": r(n.walk_page.p99_us, d.walk_page.p99_us),
    });
    let [direct_side, nestor_side] = out;
    drop(nestor_proc);
    drop(fakes);
    Ok(CatalogResults {
        date: crate::create::today(),
        git_commit: crate::create::git_commit(),
        machine: sys::machine(),
        loadavg_start,
        loadavg_end: sys::loadavg(),
        wall_secs: started.elapsed().as_secs_f64(),
        settings: serde_json::json!({
            "downstreams": args.downstreams, "conversations": total, "events_per_conversation": args.events,
            "rounds": args.rounds, "requests": args.requests, "walks": args.walks,
            "rest_requests": args.rest_requests, "rest_secs": args.rest_secs, "rest_conns": 64, "quick": args.quick,
            "catalog_max_staleness_ms": "default (1000)",
        }),
        direct: direct_side,
        nestor: nestor_side,
        ratios,
        nestor_rss_kib,
        reuse: steps,
        reuse_per_phase: per_phase,
    })
}

impl ReuseStep {
    fn new(phase: &str, req: f64, opened: f64) -> ReuseStep {
        ReuseStep { phase: phase.into(), upstream_requests: req, connections_opened: opened, requests_per_connection: (opened > 0.0).then(|| (req / opened * 10.0).round() / 10.0) }
    }
}

fn table(r: &CatalogResults) -> String {
    let mut s = format!(
        "\nCatalog: {} conversations, {} downstreams behind nestor vs one fake holding all (µs)\n",
        r.settings["conversations"], r.settings["downstreams"]
    );
    s += "| workload | direct p50 | direct p99 | nestor p50 | nestor p99 | ratio p50 | ratio p99 |\n|---|---|---|---|---|---|---|\n";
    let row = |name: &str, d: &Latency, n: &Latency| format!("| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |\n", d.p50_us, d.p99_us, n.p50_us, n.p99_us, n.p50_us / d.p50_us, n.p99_us / d.p99_us);
    s += &row("search, first page", &r.direct.first_page, &r.nestor.first_page);
    s += &row("count", &r.direct.count, &r.nestor.count);
    s += &row("one page of limit=100", &r.direct.walk_page, &r.nestor.walk_page);
    s += &row(&format!("whole walk ({} pages)", r.nestor.pages_per_walk), &r.direct.walk, &r.nestor.walk);
    s += "\nUpstream connection reuse (nestor /metrics)\n| phase | upstream requests | connections opened | requests per connection |\n|---|---|---|---|\n";
    for p in &r.reuse_per_phase {
        s += &format!("| {} | {} | {} | {} |\n", p.phase, p.upstream_requests, p.connections_opened, p.requests_per_connection.map_or("-".into(), |v| v.to_string()));
    }
    if let Some(t) = r.reuse.last() {
        s += &format!("| **total** | {} | {} | {} |\n", t.upstream_requests, t.connections_opened, t.requests_per_connection.map_or("-".into(), |v| v.to_string()));
    }
    s
}
