//! `nestor-bench create`: create -> first event with the REAL agent-server, for nestor's
//! `process`, `pool` (warm, process backend) and `docker` (cold) provisioners, and for the
//! agent-server's own docker mode (`OH_CONVERSATION_RUNTIME=docker`: the real agent-server
//! starts one container per conversation itself, api.md §8.2) — all in the same run.
//!
//! Why this shape: starting a conversation is dominated by the agent-server's own boot
//! (Python imports, 5–40 s depending on the machine), which nestor can only hide (pool) or
//! add to (its provisioning). Comparing against the agent-server's docker mode, the design
//! nestor replaces, on the same image, engine and machine minute tells what nestor costs or
//! saves; absolute numbers from another moment of a shared 2-core machine would not.
//!
//! One measurement: `POST /api/conversations` (a minimal body; the LLM is never called),
//! then `/sockets/events/{id}` until its first frame; the clock runs from before the POST
//! to that frame. The conversation is then deleted (its agent-server or container stops).
//! Rounds rotate which target goes first. Before every measurement the bench waits until
//! the pool has its `min_idle` warm servers and none booting (`nestor_pool_idle`,
//! `nestor_pool_booting` on its `/metrics`), so one target's background work never runs
//! during another's measurement, and a pool create is always a warm claim.
//!
//! Cleanup: every process is stopped (SIGTERM, then SIGKILL to its group); then containers
//! and volumes labelled with this run's nestor instance id, and containers of the
//! agent-server's docker mode that did not exist before the run, are force-removed.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use http::Method;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

pub mod plots;

use crate::harness::{self, Spawned};
use crate::{stats, sys};

const CLIENT_KEY: &str = "bench-client-key-0123456789";
pub(crate) const OH_KEY: &str = "bench-oh-docker-key-0123456789";
/// Bound on one create -> first event (a cold start on a loaded machine included).
const FIRST_EVENT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Args, Debug, Clone)]
pub struct CreateArgs {
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-create.json")]
    pub out: PathBuf,
    /// Scratch directory (configs, logs, pid files, state); default: a new temp dir, removed after.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[arg(long, default_value = "target/release/nestor")]
    pub nestor: PathBuf,
    /// The real agent-server (`<venv>/bin/agent-server`; `bash scripts/setup-agent-server.sh`
    /// prints the venv).
    #[arg(long, required_unless_present = "plot_from")]
    pub agent_server: Option<PathBuf>,
    /// The agent-server image (`bash scripts/build-agent-server-image.sh`); without it the
    /// two docker targets are left out.
    #[arg(long)]
    pub image: Option<String>,
    /// The Docker engine (`bash scripts/setup-docker.sh` prints it); default `$DOCKER_HOST`.
    #[arg(long)]
    pub docker_host: Option<String>,
    /// Targets, in the order of the first round: process, pool, docker, oh-docker.
    #[arg(long, value_delimiter = ',', default_value = "process,pool,docker,oh-docker")]
    pub targets: Vec<String>,
    /// Rounds (at least 1).
    #[arg(long, default_value_t = 3, value_parser = crate::stats::at_least_one)]
    pub rounds: usize,
    /// Warm servers of the pool target.
    #[arg(long, default_value_t = 2)]
    pub pool_min_idle: usize,
    /// One round, to check the harness.
    #[arg(long)]
    pub quick: bool,
    /// Also write `create.svg` into this directory.
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Do not measure: render the chart of this results file (into `--plots`, default
    /// docs/bench).
    #[arg(long)]
    pub plot_from: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize, Deserialize, Clone)]
pub struct Sample {
    pub round: usize,
    /// POST answered, ms after the start.
    pub create_ms: f64,
    /// First frame on the events socket, ms after the start.
    pub first_event_ms: f64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct TargetResult {
    pub name: String,
    pub what: String,
    pub samples: Vec<Sample>,
    pub first_event_median_ms: f64,
    pub first_event_max_ms: f64,
    pub create_median_ms: f64,
    /// Median first event / the agent-server docker mode's median (same run).
    pub ratio_to_oh_docker: Option<f64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CreateResults {
    pub date: String,
    pub git_commit: Option<String>,
    pub machine: serde_json::Value,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub wall_secs: f64,
    pub settings: serde_json::Value,
    pub targets: Vec<TargetResult>,
    pub notes: Vec<String>,
}

struct Target {
    name: &'static str,
    what: &'static str,
    addr: SocketAddr,
    key: &'static str,
    /// The process serving it (nestor or the agent-server).
    proc_: Spawned,
    samples: Vec<Sample>,
}

pub fn run_cmd(mut args: CreateArgs) -> anyhow::Result<()> {
    if let Some(f) = &args.plot_from {
        let r: CreateResults = serde_json::from_str(&std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?)?;
        let p = plots::create_svg(&r, args.plots.as_deref().unwrap_or(Path::new("docs/bench")))?;
        tracing::info!(file = %p.display(), "chart written");
        return Ok(());
    }
    if args.quick {
        args.rounds = 1;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("bench-create").enable_all().build()?;
    let (work, _guard) = work_dir(&args.work_dir, "create")?;
    let instance = format!("bench{}", std::process::id());
    let docker_host = args.docker_host.clone().or_else(|| std::env::var("DOCKER_HOST").ok()).unwrap_or_else(|| "unix:///var/run/docker.sock".into());
    let before = oh_containers(&docker_host);
    let res = rt.block_on(async {
        tokio::select! {
            r = run(&args, &work, &instance, &docker_host) => r,
            _ = shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    // Processes are stopped by now (their guards dropped); remove what outlived them.
    if args.image.is_some() {
        docker_cleanup(&docker_host, &instance, &before);
    }
    let res = res?;
    crate::report::write_results(&args.out, &res)?;
    if let Some(dir) = &args.plots {
        let p = plots::create_svg(&res, dir)?;
        tracing::info!(file = %p.display(), "chart written");
    }
    #[allow(clippy::print_stdout)]
    {
        print!("{}", table(&res));
    }
    Ok(())
}

async fn run(args: &CreateArgs, work: &Path, instance: &str, docker_host: &str) -> anyhow::Result<CreateResults> {
    let started = Instant::now();
    let loadavg_start = sys::loadavg();
    anyhow::ensure!(args.nestor.is_file(), "{} not found: build it first", args.nestor.display());
    let agent_server = args.agent_server.clone().context("--agent-server is required")?;
    anyhow::ensure!(agent_server.is_file(), "{} not found: run scripts/setup-agent-server.sh", agent_server.display());
    let mut notes = Vec::new();
    let agent = agent_server.display().to_string();
    let boot = Duration::from_secs(240);
    let mut targets: Vec<Target> = Vec::new();
    for t in &args.targets {
        let needs_image = matches!(t.as_str(), "docker" | "oh-docker");
        if needs_image && args.image.is_none() {
            notes.push(format!("{t} left out: no --image"));
            continue;
        }
        let image = args.image.clone().unwrap_or_default();
        let common = "ready_timeout_secs = 240.0\n";
        match t.as_str() {
            "process" => {
                let toml = format!("{common}[provisioner]\nkind = \"process\"\n[provisioner.process]\nagent_server = \"{agent}\"\nstartup_timeout_secs = 240.0\non_shutdown = \"stop\"\n");
                let (p, addr) = harness::start_nestor(&args.nestor, work, "nestor-process", CLIENT_KEY, &toml, &[], boot).await?;
                targets.push(Target { name: "process", what: "nestor, process provisioner (a new agent-server subprocess)", addr, key: CLIENT_KEY, proc_: p, samples: vec![] });
            }
            "pool" => {
                let toml = format!(
                    "{common}[provisioner]\nkind = \"pool\"\n[provisioner.pool]\nbackend = \"process\"\nmin_idle = {}\n[provisioner.process]\nagent_server = \"{agent}\"\nstartup_timeout_secs = 240.0\non_shutdown = \"stop\"\n",
                    args.pool_min_idle
                );
                let (p, addr) = harness::start_nestor(&args.nestor, work, "nestor-pool", CLIENT_KEY, &toml, &[], boot).await?;
                targets.push(Target { name: "pool", what: "nestor, pool provisioner (process backend, warm claim)", addr, key: CLIENT_KEY, proc_: p, samples: vec![] });
            }
            "docker" => {
                let toml = format!(
                    "{common}[provisioner]\nkind = \"docker\"\n[provisioner.docker]\nimage = \"{image}\"\ninstance_id = \"{instance}\"\ndocker_host = \"{docker_host}\"\nstartup_timeout_secs = 240.0\nstop_timeout_secs = 5.0\non_shutdown = \"stop\"\n"
                );
                let (p, addr) = harness::start_nestor(&args.nestor, work, "nestor-docker", CLIENT_KEY, &toml, &[("DOCKER_HOST", docker_host)], boot).await?;
                targets.push(Target { name: "docker", what: "nestor, docker provisioner (cold: a new container)", addr, key: CLIENT_KEY, proc_: p, samples: vec![] });
            }
            "oh-docker" => {
                let (p, addr) = start_oh_docker(&agent_server, work, &image, docker_host, boot).await?;
                targets.push(Target { name: "oh-docker", what: "agent-server's own docker mode (OH_CONVERSATION_RUNTIME=docker)", addr, key: OH_KEY, proc_: p, samples: vec![] });
            }
            other => bail!("unknown target {other:?} (process, pool, docker, oh-docker)"),
        }
    }
    anyhow::ensure!(!targets.is_empty(), "no targets");
    let pool_addr = targets.iter().find(|t| t.name == "pool").map(|t| t.addr);

    for round in 0..args.rounds {
        let n = targets.len();
        for k in 0..n {
            let i = (k + round) % n;
            settle(&mut targets, pool_addr, args.pool_min_idle).await?;
            let t = &mut targets[i];
            let s = once(t.addr, t.key, round).await.with_context(|| format!("create -> first event via {}", t.name))?;
            tracing::info!(round, target = t.name, create_ms = s.create_ms, first_event_ms = s.first_event_ms, "create -> first event");
            t.samples.push(s);
            t.proc_.check_alive()?;
        }
    }
    // The pool refills after the last claim; let it finish before everything stops.
    let _ = settle(&mut targets, pool_addr, args.pool_min_idle).await;

    let median_of = |v: &[f64]| stats::median(v);
    let oh_median = targets.iter().find(|t| t.name == "oh-docker").map(|t| median_of(&t.samples.iter().map(|s| s.first_event_ms).collect::<Vec<_>>()));
    let mut out = Vec::new();
    for t in targets.drain(..) {
        let fe: Vec<f64> = t.samples.iter().map(|s| s.first_event_ms).collect();
        let cr: Vec<f64> = t.samples.iter().map(|s| s.create_ms).collect();
        let med = median_of(&fe);
        out.push(TargetResult {
            name: t.name.into(),
            what: t.what.into(),
            first_event_median_ms: med,
            first_event_max_ms: fe.iter().copied().fold(0.0, f64::max),
            create_median_ms: median_of(&cr),
            ratio_to_oh_docker: oh_median.filter(|m| *m > 0.0).map(|m| (med / m * 100.0).round() / 100.0),
            samples: t.samples,
        });
        drop(t.proc_);
    }
    Ok(CreateResults {
        date: today(),
        git_commit: git_commit(),
        machine: sys::machine(),
        loadavg_start,
        loadavg_end: sys::loadavg(),
        wall_secs: started.elapsed().as_secs_f64(),
        settings: serde_json::json!({
            "rounds": args.rounds, "pool_min_idle": args.pool_min_idle, "image": args.image,
            "agent_server": agent, "docker_host": docker_host, "targets": args.targets,
            "create_body": create_body(),
        }),
        targets: out,
        notes,
    })
}

/// The minimal create body of the aggregator tests (`create_body` in
/// crates/aggregator/tests/support): the LLM is never called.
pub fn create_body() -> serde_json::Value {
    serde_json::json!({
        "agent": {"kind": "Agent", "llm": {"usage_id": "agent", "model": "openai/fake", "base_url": "http://127.0.0.1:9/v1", "api_key": "x"}, "tools": [{"name": "terminal"}]},
        "workspace": {"kind": "LocalWorkspace", "working_dir": "/workspace"},
        "autotitle": false
    })
}

/// One create -> first event, then the conversation is deleted (not timed).
async fn once(addr: SocketAddr, key: &str, round: usize) -> anyhow::Result<Sample> {
    let t0 = Instant::now();
    let (st, body) = harness::once(addr, Method::POST, "/api/conversations", Some(key), Some(&create_body())).await?;
    let create_ms = t0.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!((200..300).contains(&st), "create: HTTP {st}: {}", String::from_utf8_lossy(&body[..body.len().min(500)]));
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    let id = v["id"].as_str().context("create answer has no id")?.to_owned();
    let first = async {
        let stream = sys::connect_from(sys::source_addr(0), addr).await?;
        let mut req = format!("ws://{addr}/sockets/events/{id}").into_client_request()?;
        req.headers_mut().insert("x-session-api-key", key.parse()?);
        let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(_))) => break,
                Some(Ok(Message::Close(f))) => bail!("socket closed before the first event: {f:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => bail!("socket ended before the first event"),
            }
        }
        let _ = ws.close(None).await;
        anyhow::Ok(())
    };
    tokio::time::timeout(FIRST_EVENT_TIMEOUT, first).await.context("no first event in time")??;
    let first_event_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let td = Instant::now();
    match harness::once(addr, Method::DELETE, &format!("/api/conversations/{id}"), Some(key), None).await {
        Ok((st, _)) => tracing::info!(status = st, ms = td.elapsed().as_millis() as u64, "conversation deleted"),
        Err(e) => tracing::warn!("delete: {e:#}"),
    }
    Ok(Sample { round, create_ms, first_event_ms })
}

/// Wait (bounded) until the pool is full and idle, so no target's background boots run
/// during a measurement.
async fn settle(targets: &mut [Target], pool: Option<SocketAddr>, min_idle: usize) -> anyhow::Result<()> {
    let Some(addr) = pool else { return Ok(()) };
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        for t in targets.iter_mut() {
            t.proc_.check_alive()?;
        }
        if let Ok(m) = harness::scrape(addr).await {
            let idle = harness::metric_sum(&m, "nestor_pool_idle").unwrap_or(0.0);
            let booting = harness::metric_sum(&m, "nestor_pool_booting").unwrap_or(0.0);
            if idle >= min_idle as f64 && booting == 0.0 {
                // A little quiet after the last boot (its first requests, GC).
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            tracing::warn!("the pool did not settle within 240 s; measuring anyway");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The real agent-server in its docker mode: it keeps the public API and starts one
/// container of `image` per conversation (api.md §8.2).
pub(crate) async fn start_oh_docker(bin: &Path, work: &Path, image: &str, docker_host: &str, within: Duration) -> anyhow::Result<(Spawned, SocketAddr)> {
    let dir = work.join("oh-docker");
    std::fs::create_dir_all(&dir)?;
    let addr: SocketAddr = ([127, 0, 0, 1], sys::free_port()?).into();
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str() {
            if k.starts_with("OH_") || k.starts_with("NESTOR_") || k == "SESSION_API_KEY" {
                cmd.env_remove(k);
            }
        }
    }
    cmd.args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
        .current_dir(&dir)
        .env("OH_CONVERSATION_RUNTIME", "docker")
        .env("OH_CONVERSATION_IMAGE", image)
        .env("OH_SECRET_KEY", "bench-oh-docker-secret-0123456789")
        .env("SESSION_API_KEY", OH_KEY)
        .env("OH_PERSISTENCE_DIR", dir.join("persistence"))
        .env("OH_CONVERSATIONS_PATH", dir.join("conversations"))
        .env("OH_BASH_EVENTS_DIR", dir.join("bash_events"))
        .env("OH_WORKSPACE_PATH", dir.join("workspace"))
        .env("HOME", &dir)
        .env("DOCKER_HOST", docker_host)
        // As the process provisioner starts its children (running.md): no preloads, the
        // local LiteLLM cost map, UTC.
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("OH_PRELOAD_TOOLS", "false")
        .env("OH_ENABLE_VSCODE", "false")
        .env("OH_ENABLE_VNC", "false")
        .env("OH_ENABLE_BROWSER", "false")
        .env("OPENHANDS_SUPPRESS_BANNER", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env("TZ", "UTC")
        .stdout(std::fs::File::create(dir.join("stdout.log"))?)
        .stderr(std::fs::File::create(dir.join("stderr.log"))?);
    let mut p = Spawned::spawn(cmd, "oh-docker", work, Duration::from_secs(30))?;
    harness::wait_ok(&mut p, addr, "/alive", None, within).await?;
    Ok((p, addr))
}

pub(crate) fn docker(host: &str, args: &[&str]) -> Option<String> {
    let out = Command::new("docker").args(args).env("DOCKER_HOST", host).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Containers of the agent-server's docker mode (any owner) that exist now.
pub(crate) fn oh_containers(host: &str) -> HashSet<String> {
    docker(host, &["ps", "-aq", "--no-trunc", "--filter", "label=ai.openhands.runtime-owner"]).unwrap_or_default().lines().map(str::to_owned).collect()
}

/// Force-remove this run's leftovers: nestor's containers and volumes of `instance`, and
/// docker-mode containers that did not exist before the run.
pub(crate) fn docker_cleanup(host: &str, instance: &str, before: &HashSet<String>) {
    let label = format!("label=org.nestor.instance={instance}");
    let mut ids: Vec<String> = docker(host, &["ps", "-aq", "--no-trunc", "--filter", &label]).unwrap_or_default().lines().map(str::to_owned).collect();
    ids.extend(oh_containers(host).into_iter().filter(|c| !before.contains(c)));
    if !ids.is_empty() {
        let mut a = vec!["rm", "-f", "-v"];
        a.extend(ids.iter().map(String::as_str));
        let _ = docker(host, &a);
        tracing::info!(containers = ids.len(), "leftover containers removed");
    }
    let vols: Vec<String> = docker(host, &["volume", "ls", "-q", "--filter", &label]).unwrap_or_default().lines().map(str::to_owned).collect();
    if !vols.is_empty() {
        let mut a = vec!["volume", "rm", "-f"];
        a.extend(vols.iter().map(String::as_str));
        let _ = docker(host, &a);
        tracing::info!(volumes = vols.len(), "leftover volumes removed");
    }
}

fn table(r: &CreateResults) -> String {
    let mut s = String::from("\nCreate -> first event (real agent-server 1.58.2), ms\n| target | median | max | POST answered (median) | median / agent-server docker mode | rounds |\n|---|---|---|---|---|---|\n");
    for t in &r.targets {
        s += &format!(
            "| {} | {:.0} | {:.0} | {:.0} | {} | {} |\n",
            t.what,
            t.first_event_median_ms,
            t.first_event_max_ms,
            t.create_median_ms,
            t.ratio_to_oh_docker.map_or("-".into(), |v| format!("{v:.2}")),
            t.samples.len()
        );
    }
    for n in &r.notes {
        s += &format!("note: {n}\n");
    }
    s
}

// ----------------------------------------------------------------- small shared helpers

/// A scratch directory: the given one, or a new temp dir removed when the guard drops.
pub fn work_dir(given: &Option<PathBuf>, what: &str) -> anyhow::Result<(PathBuf, Option<RemoveOnDrop>)> {
    match given {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            Ok((d.clone(), None))
        }
        None => {
            let d = std::env::temp_dir().join(format!("nestor-bench-{what}-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&d)?;
            Ok((d.clone(), Some(RemoveOnDrop(d))))
        }
    }
}

pub struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn shutdown_signal() {
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

pub fn today() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!("{:04}-{:02}-{:02}", now.year(), now.month() as u8, now.day())
}

/// `BENCH_COMMIT`, else `git rev-parse --short HEAD` (`-dirty` when tracked files differ).
pub fn git_commit() -> Option<String> {
    if let Ok(c) = std::env::var("BENCH_COMMIT") {
        return Some(c);
    }
    let out = Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let mut c = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let st = Command::new("git").args(["status", "--porcelain", "--untracked-files=no"]).output().ok()?;
    if !st.stdout.is_empty() {
        c.push_str("-dirty");
    }
    Some(c)
}
