//! `nestor-bench dockermode`: nestor in front of containerised agent-servers vs the
//! agent-server's **own docker mode** (`OH_CONVERSATION_RUNTIME=docker`, api.md §8.2), the
//! design nestor is the alternative to. Both put one real agent-server container (the same
//! image) behind one front process; this measures what each front costs, side by side in one
//! run, against the same containers reached directly and through nginx:
//!
//! ```text
//! direct       ──────────────────────────► nestor's container      (its own key)
//! nginx        ──► nginx ────────────────► nestor's container      (its own key)
//! nestor       ──► nestor (docker prov.) ─► nestor's container     (nestor's client key)
//! oh-direct    ──────────────────────────► docker mode's container (its own key)
//! oh-docker    ──► agent-server (docker mode) ─► its container     (the outer key)
//! ```
//!
//! Workloads (rounds interleaved, target order rotated per round):
//! * REST, `GET /api/conversations/{id}` (the SDK's probe; docker mode answers it from the
//!   bind-mounted conversation directory, nestor forwards it) and
//!   `GET /api/conversations/{id}/agent_final_response` (forwarded by both): sequential over
//!   one connection, and a closed loop over `--conns` connections;
//! * WebSocket events socket: a message posted over REST (`POST …/events`, `run: false`) until
//!   its `MessageEvent` frame arrives on the socket (per-frame latency), and bursts of posts
//!   (frames per second; the Python agent-server, not a proxy, bounds this one);
//! * memory: the front process's RSS with one conversation, and per idle proxied socket.
//!
//! Everything is bounded; containers and volumes of the run are removed at the end (also on
//! Ctrl-C) by the same clean-up as `nestor-bench create`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use http::Method;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::create::{self, create_body, docker, docker_cleanup, oh_containers, start_oh_docker, OH_KEY};
use crate::harness::{self, Http};
use crate::procs;
use crate::rest::{self, HttpTarget, LoadRound, SequentialRound};
use crate::stats::{self, Latency};
use crate::sys;
use crate::ws::{self, IdleResult, WsTarget};

const CLIENT_KEY: &str = "bench-client-key-0123456789";
/// Bound on waiting for one posted message's frame.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args, Debug, Clone)]
pub struct DockerModeArgs {
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-dockermode.json")]
    pub out: PathBuf,
    /// Scratch directory; default: a new temp dir, removed after.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[arg(long, default_value = "target/release/nestor")]
    pub nestor: PathBuf,
    /// The real agent-server (`<venv>/bin/agent-server`), run in its docker mode.
    #[arg(long, required_unless_present = "plot_from")]
    pub agent_server: Option<PathBuf>,
    /// The agent-server image (`bash scripts/build-agent-server-image.sh`).
    #[arg(long, required_unless_present = "plot_from")]
    pub image: Option<String>,
    /// Also write `dockermode.svg` into this directory.
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Do not measure: render the chart of this results file (into `--plots`, default
    /// docs/bench).
    #[arg(long)]
    pub plot_from: Option<PathBuf>,
    /// The Docker engine; default `$DOCKER_HOST`.
    #[arg(long)]
    pub docker_host: Option<String>,
    /// nginx binary (default: found on PATH or /usr/sbin); without it the nginx target is left out.
    #[arg(long)]
    pub nginx: Option<PathBuf>,
    /// Rounds (at least 1).
    #[arg(long, default_value_t = 3, value_parser = crate::stats::at_least_one)]
    pub rounds: usize,
    /// Sequential requests per round and target (docker mode's forwarded route takes ~0.1 s
    /// a request here).
    #[arg(long, default_value_t = 300)]
    pub requests: usize,
    /// Connections of the closed loop.
    #[arg(long, default_value_t = 64)]
    pub conns: usize,
    /// Measured seconds of each closed loop.
    #[arg(long, default_value_t = 3.0)]
    pub secs: f64,
    /// Posted messages per round and target for the per-frame latency.
    #[arg(long, default_value_t = 60)]
    pub frames: usize,
    /// Messages of one burst (frames per second).
    #[arg(long, default_value_t = 150)]
    pub burst: usize,
    /// Idle sockets opened through each front for the memory figure, all on its one
    /// conversation: the agent-server refuses more than ~48 sockets per conversation
    /// ("Too many connections for this conversation"), and more conversations would mean a
    /// ~300 MiB container each.
    #[arg(long, default_value_t = 45)]
    pub idle_sockets: usize,
    /// One short round, to check the harness.
    #[arg(long)]
    pub quick: bool,
}

/// One target's figures (medians over rounds where a round gives one figure).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct TargetFigures {
    pub name: String,
    pub what: String,
    /// Per REST path name ("info", "forwarded"): rounds.
    pub rest_seq: Vec<(String, Vec<SequentialRound>)>,
    pub rest_load: Vec<(String, Vec<LoadRound>)>,
    /// POST → its frame, all rounds merged.
    pub frame_latency: Option<Latency>,
    /// Burst frames per second, per round.
    pub frames_per_sec: Vec<f64>,
    pub idle: Option<IdleResult>,
    /// RSS of the front process(es) with one conversation, before any load.
    pub front_rss_kib: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DockerModeResults {
    pub date: String,
    pub git_commit: Option<String>,
    pub machine: serde_json::Value,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub wall_secs: f64,
    pub settings: serde_json::Value,
    pub targets: Vec<TargetFigures>,
    pub notes: Vec<String>,
}

/// One way in, with what serves it.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    key: String,
    conv: Uuid,
    /// Pids of the front (for CPU and RSS); empty for direct.
    front_pids: Vec<u32>,
    /// POST → frame, all rounds so far.
    frame_hist: hdrhistogram::Histogram<u64>,
    figures: TargetFigures,
}

pub fn run_cmd(mut args: DockerModeArgs) -> anyhow::Result<()> {
    if let Some(f) = &args.plot_from {
        let r: DockerModeResults = serde_json::from_str(&std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?)?;
        let p = crate::create::plots::dockermode_svg(&r, args.plots.as_deref().unwrap_or(Path::new("docs/bench")))?;
        tracing::info!(file = %p.display(), "chart written");
        return Ok(());
    }
    if args.quick {
        args.rounds = 1;
        args.requests = 200;
        args.secs = 2.0;
        args.frames = 20;
        args.burst = 50;
        args.idle_sockets = 20;
    }
    sys::raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("bench-dockermode").enable_all().build()?;
    let (work, _guard) = create::work_dir(&args.work_dir, "dockermode")?;
    let instance = format!("benchdm{}", std::process::id());
    let docker_host = args.docker_host.clone().or_else(|| std::env::var("DOCKER_HOST").ok()).unwrap_or_else(|| "unix:///var/run/docker.sock".into());
    let before = oh_containers(&docker_host);
    let res = rt.block_on(async {
        tokio::select! {
            r = run(&args, &work, &instance, &docker_host, &before) => r,
            _ = create::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    docker_cleanup(&docker_host, &instance, &before);
    let res = res?;
    crate::report::write_results(&args.out, &res)?;
    if let Some(dir) = &args.plots {
        let p = crate::create::plots::dockermode_svg(&res, dir)?;
        tracing::info!(file = %p.display(), "chart written");
    }
    #[allow(clippy::print_stdout)]
    {
        print!("{}", table(&res));
    }
    Ok(())
}

async fn run(args: &DockerModeArgs, work: &Path, instance: &str, docker_host: &str, before: &HashSet<String>) -> anyhow::Result<DockerModeResults> {
    let started = Instant::now();
    let loadavg_start = sys::loadavg();
    anyhow::ensure!(args.nestor.is_file(), "{} not found: build it first", args.nestor.display());
    let agent_server = args.agent_server.clone().context("--agent-server is required")?;
    let image = args.image.clone().context("--image is required")?;
    anyhow::ensure!(agent_server.is_file(), "{} not found: run scripts/setup-agent-server.sh", agent_server.display());
    let mut notes = Vec::new();
    let boot = Duration::from_secs(240);

    // The two fronts, each with one conversation in its own container.
    let toml = format!(
        "ready_timeout_secs = 240.0\n[provisioner]\nkind = \"docker\"\n[provisioner.docker]\nimage = \"{}\"\ninstance_id = \"{instance}\"\ndocker_host = \"{docker_host}\"\nstartup_timeout_secs = 240.0\nstop_timeout_secs = 5.0\non_shutdown = \"stop\"\n",
        image
    );
    let (nestor, nestor_addr) = harness::start_nestor(&args.nestor, work, "nestor-docker", CLIENT_KEY, &toml, &[("DOCKER_HOST", docker_host)], boot).await?;
    let (oh, oh_addr) = start_oh_docker(&agent_server, work, &image, docker_host, boot).await?;
    let nestor_conv = create_conversation(nestor_addr, CLIENT_KEY).await.context("create through nestor")?;
    let oh_conv = create_conversation(oh_addr, OH_KEY).await.context("create through the agent-server's docker mode")?;

    let label = format!("label=org.nestor.instance={instance}");
    let nestor_ctr = container(docker_host, &["ps", "-q", "--no-trunc", "--filter", &label, "--filter", "label=org.nestor.role=conversation"], &HashSet::new())?;
    let oh_ctr = container(docker_host, &["ps", "-q", "--no-trunc", "--filter", "label=ai.openhands.runtime-owner"], before)?;
    let (nestor_ctr_addr, nestor_ctr_key) = inspect(docker_host, &nestor_ctr)?;
    let (oh_ctr_addr, oh_ctr_key) = inspect(docker_host, &oh_ctr)?;

    let mut targets = vec![
        Target::new("direct", "nestor's container, directly", nestor_ctr_addr, &nestor_ctr_key, nestor_conv, vec![]),
        Target::new("nestor", "nestor, docker provisioner", nestor_addr, CLIENT_KEY, nestor_conv, vec![nestor.pid()]),
        Target::new("oh-direct", "docker mode's container, directly", oh_ctr_addr, &oh_ctr_key, oh_conv, vec![]),
        Target::new("oh-docker", "agent-server docker mode (OH_CONVERSATION_RUNTIME=docker)", oh_addr, OH_KEY, oh_conv, vec![oh.pid()]),
    ];
    let _nginx = match args.nginx.clone().or_else(|| procs::which("nginx")) {
        Some(bin) => {
            let (p, addr) = procs::start_nginx(&bin, work, "nginx", nestor_ctr_addr, 65536).await?;
            let mut pids = vec![p.pid()];
            pids.extend(sys::children_of(p.pid()));
            targets.insert(1, Target::new("nginx", "nginx reverse proxy to nestor's container", addr, &nestor_ctr_key, nestor_conv, pids));
            Some(p)
        }
        None => {
            notes.push("nginx left out: not installed (apt-get install nginx-light)".into());
            None
        }
    };
    for t in &mut targets {
        t.figures.front_rss_kib = (!t.front_pids.is_empty()).then(|| sys::rss_kib_sum(&t.front_pids)).flatten();
    }

    let paths = [("info", ""), ("forwarded", "/agent_final_response")];
    for round in 0..args.rounds {
        let n = targets.len();
        for k in 0..n {
            let t = &mut targets[(k + round) % n];
            for (pname, suffix) in paths {
                let ht = HttpTarget { addr: t.addr, key: t.key.clone(), path: format!("/api/conversations/{}{suffix}", t.conv) };
                let mut h = stats::new_hist();
                let seq = rest::sequential(&ht, 50, args.requests, &mut h).await.with_context(|| format!("{} GET {}", t.name, ht.path))?;
                push_round(&mut t.figures.rest_seq, pname, seq);
                let load = rest::closed_loop(&ht, args.conns, Duration::from_secs(1), Duration::from_secs_f64(args.secs), &t.front_pids, &[], &mut h)
                    .await
                    .with_context(|| format!("{} closed loop on {}", t.name, ht.path))?;
                push_round(&mut t.figures.rest_load, pname, load);
            }
            let (lat, fps) = frames(t, args.frames, args.burst, round).await.with_context(|| format!("{} events socket", t.name))?;
            t.frame_hist.add(&lat).ok();
            t.figures.frame_latency = Some(Latency::from_hist(&t.frame_hist));
            t.figures.frames_per_sec.push(fps);
            tracing::info!(round, target = t.name, fps, "round done");
        }
    }
    for t in targets.iter_mut().filter(|t| !t.front_pids.is_empty()) {
        let wt = WsTarget { addr: t.addr, key: t.key.clone(), deflate: false };
        match ws::idle(&wt, &[t.conv], args.idle_sockets, &t.front_pids, &t.front_pids).await {
            Ok(r) => t.figures.idle = Some(r),
            Err(e) => notes.push(format!("{}: idle sockets not measured: {e:#}", t.name)),
        }
    }
    drop(nestor);
    drop(oh);
    Ok(DockerModeResults {
        date: create::today(),
        git_commit: create::git_commit(),
        machine: sys::machine(),
        loadavg_start,
        loadavg_end: sys::loadavg(),
        wall_secs: started.elapsed().as_secs_f64(),
        settings: serde_json::json!({
            "rounds": args.rounds, "requests": args.requests, "conns": args.conns, "secs": args.secs,
            "frames": args.frames, "burst": args.burst, "idle_sockets": args.idle_sockets, "image": image,
        }),
        targets: targets.into_iter().map(|t| t.figures).collect(),
        notes,
    })
}

impl Target {
    fn new(name: &'static str, what: &'static str, addr: SocketAddr, key: &str, conv: Uuid, front_pids: Vec<u32>) -> Target {
        Target { name, addr, key: key.to_owned(), conv, front_pids, frame_hist: stats::new_hist(), figures: TargetFigures { name: name.into(), what: what.into(), ..Default::default() } }
    }
}

fn push_round<T>(v: &mut Vec<(String, Vec<T>)>, name: &str, r: T) {
    match v.iter_mut().find(|(n, _)| n == name) {
        Some((_, rs)) => rs.push(r),
        None => v.push((name.to_owned(), vec![r])),
    }
}

/// Create a conversation and wait until its events socket gives the first frame.
async fn create_conversation(addr: SocketAddr, key: &str) -> anyhow::Result<Uuid> {
    let (st, body) = harness::once(addr, Method::POST, "/api/conversations", Some(key), Some(&create_body())).await?;
    anyhow::ensure!((200..300).contains(&st), "create: HTTP {st}: {}", String::from_utf8_lossy(&body[..body.len().min(500)]));
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    let id: Uuid = v["id"].as_str().context("create answer has no id")?.parse()?;
    let ws = ws::open(&WsTarget { addr, key: key.to_owned(), deflate: false }, sys::source_addr(0), id, None).await?;
    ws::close_all(vec![ws]).await;
    Ok(id)
}

/// The one container a `docker ps` filter finds (not in `exclude`).
fn container(host: &str, ps: &[&str], exclude: &HashSet<String>) -> anyhow::Result<String> {
    let out = docker(host, ps).context("docker ps failed")?;
    let found: Vec<&str> = out.lines().filter(|c| !exclude.contains(*c)).collect();
    match found.as_slice() {
        [one] => Ok((*one).to_owned()),
        other => bail!("expected one container for {ps:?}, found {}", other.len()),
    }
}

/// A container's published loopback address of port 8000 and its session key.
fn inspect(host: &str, id: &str) -> anyhow::Result<(SocketAddr, String)> {
    let out = docker(host, &["inspect", id]).context("docker inspect failed")?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let c = &v[0];
    let port: u16 = c["NetworkSettings"]["Ports"]["8000/tcp"][0]["HostPort"].as_str().context("port 8000 not published")?.parse()?;
    let key = c["Config"]["Env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str())
        .find_map(|e| e.strip_prefix("OH_SESSION_API_KEYS_0="))
        .context("no OH_SESSION_API_KEYS_0 in the container's environment")?;
    Ok((([127, 0, 0, 1], port).into(), key.to_owned()))
}

/// Per-frame latency (POST a message → its frame on the socket), then one burst of
/// `burst` posts (4 in flight) timed until all their frames arrived.
async fn frames(t: &Target, n: usize, burst: usize, round: usize) -> anyhow::Result<(hdrhistogram::Histogram<u64>, f64)> {
    let wt = WsTarget { addr: t.addr, key: t.key.clone(), deflate: false };
    let mut sock = ws::open(&wt, sys::source_addr(1), t.conv, None).await?;
    let mut http = Http::open(t.addr).await?;
    let path = format!("/api/conversations/{}/events", t.conv);
    let mut h = stats::new_hist();
    let tag = format!("nb-{}-{round}", t.name);
    for i in 0..n {
        let marker = format!("{tag}-lat-{i}");
        let t0 = Instant::now();
        let (st, body) = http.send(Method::POST, &path, Some(&t.key), Some(&message(&marker))).await?;
        anyhow::ensure!(st == 200, "POST events: HTTP {st}: {}", String::from_utf8_lossy(&body));
        wait_frame(&mut sock, &marker).await?;
        stats::record(&mut h, t0.elapsed().as_nanos() as u64);
    }
    // Burst: 4 posters, one reader.
    let prefix = format!("{tag}-burst-");
    let t0 = Instant::now();
    let mut posters = Vec::new();
    for p in 0..4 {
        let (addr, key, path, prefix) = (t.addr, t.key.clone(), path.clone(), prefix.clone());
        posters.push(tokio::spawn(async move {
            let mut http = Http::open(addr).await?;
            for i in (p..burst).step_by(4) {
                let (st, _) = http.send(Method::POST, &path, Some(&key), Some(&message(&format!("{prefix}{i}")))).await?;
                anyhow::ensure!(st == 200, "POST events: HTTP {st}");
            }
            anyhow::Ok(())
        }));
    }
    let mut seen = 0;
    let deadline = Instant::now() + FRAME_TIMEOUT * 4;
    while seen < burst {
        let left = deadline.checked_duration_since(Instant::now()).context("burst frames did not all arrive in time")?;
        match tokio::time::timeout(left, sock.next()).await {
            Ok(Some(Ok(Message::Text(txt)))) if txt.contains(&prefix) && txt.contains("MessageEvent") => seen += 1,
            Ok(Some(Ok(Message::Close(f)))) => bail!("socket closed during the burst: {f:?}"),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => bail!("socket ended during the burst"),
            Err(_) => bail!("burst: {seen} of {burst} frames within the bound"),
        }
    }
    let fps = burst as f64 / t0.elapsed().as_secs_f64();
    for p in posters {
        p.await??;
    }
    ws::close_all(vec![sock]).await;
    Ok((h, fps))
}

fn message(text: &str) -> serde_json::Value {
    serde_json::json!({"role": "user", "content": [{"type": "text", "text": text}], "run": false})
}

async fn wait_frame(sock: &mut ws::Ws, marker: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + FRAME_TIMEOUT;
    loop {
        let left = deadline.checked_duration_since(Instant::now()).context("frame did not arrive in time")?;
        match tokio::time::timeout(left, sock.next()).await {
            Ok(Some(Ok(Message::Text(txt)))) if txt.contains(marker) && txt.contains("MessageEvent") => return Ok(()),
            Ok(Some(Ok(Message::Close(f)))) => bail!("socket closed: {f:?}"),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => bail!("socket ended"),
            Err(_) => bail!("no frame for {marker} within {FRAME_TIMEOUT:?}"),
        }
    }
}

fn med(v: impl Iterator<Item = f64>) -> f64 {
    stats::median(&v.collect::<Vec<_>>())
}

/// Markdown tables: absolute figures and the added cost over each front's own container.
pub fn table(r: &DockerModeResults) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let base = |name: &str| if name.starts_with("oh-") { "oh-direct" } else { "direct" };
    let find = |name: &str| r.targets.iter().find(|t| t.name == name);
    for (pname, label) in [("info", "GET /api/conversations/{id}"), ("forwarded", "GET /api/conversations/{id}/agent_final_response")] {
        let _ = writeln!(s, "\n{label}\n| target | 1 conn p50 µs | p99 µs | added p50 µs | added p99 µs | {} conns req/s | p99 µs | front CPU µs/req |\n|---|---|---|---|---|---|---|---|", r.settings["conns"]);
        for t in &r.targets {
            let seq = |t: &TargetFigures, f: fn(&SequentialRound) -> f64| {
                t.rest_seq.iter().find(|(n, _)| n == pname).map(|(_, rs)| med(rs.iter().map(f))).unwrap_or(f64::NAN)
            };
            let load = |t: &TargetFigures, f: fn(&LoadRound) -> f64| {
                t.rest_load.iter().find(|(n, _)| n == pname).map(|(_, rs)| med(rs.iter().map(f))).unwrap_or(f64::NAN)
            };
            let (p50, p99) = (seq(t, |r| r.latency.p50_us), seq(t, |r| r.latency.p99_us));
            let (b50, b99) = find(base(&t.name)).map(|b| (seq(b, |r| r.latency.p50_us), seq(b, |r| r.latency.p99_us))).unwrap_or((f64::NAN, f64::NAN));
            let cpu = load(t, |r| r.proxy_cpu_us_per_req.unwrap_or(f64::NAN));
            let _ = writeln!(
                s,
                "| {} | {p50:.0} | {p99:.0} | {:+.0} | {:+.0} | {:.0} | {:.0} | {} |",
                t.name,
                p50 - b50,
                p99 - b99,
                load(t, |r| r.rps),
                load(t, |r| r.latency.p99_us),
                if cpu.is_nan() { "-".into() } else { format!("{cpu:.0}") }
            );
        }
    }
    let _ = writeln!(s, "\nEvents socket: POST a message -> its frame; bursts of posts\n| target | p50 µs | p99 µs | added p50 µs | frames/s (burst) | front RSS MiB | idle socket KiB |\n|---|---|---|---|---|---|---|");
    for t in &r.targets {
        let l = t.frame_latency.as_ref();
        let b = find(base(&t.name)).and_then(|b| b.frame_latency.as_ref()).map(|l| l.p50_us).unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:+.0} | {:.0} | {} | {} |",
            t.name,
            l.map_or(f64::NAN, |l| l.p50_us),
            l.map_or(f64::NAN, |l| l.p99_us),
            l.map_or(f64::NAN, |l| l.p50_us) - b,
            med(t.frames_per_sec.iter().copied()),
            t.front_rss_kib.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
            t.idle.as_ref().map_or("-".into(), |i| format!("{:.1}", i.rss_per_pair_kib)),
        );
    }
    for n in &r.notes {
        let _ = writeln!(s, "\nnote: {n}");
    }
    s
}
