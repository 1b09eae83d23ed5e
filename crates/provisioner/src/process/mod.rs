//! `process`: one local agent-server subprocess per conversation (the laptop default).
//!
//! Each conversation gets its own agent-server process with its own loopback port, its own
//! random session key and its own state directory under `<state_dir>/process/<id-hex>/`:
//!
//! ```text
//! nestor-process.json   manifest: port, pid (+ start time), key, secret key, phase
//! state/                the agent-server's state for the conversation (one tree, persisted)
//!   conversations/      OH_CONVERSATIONS_PATH
//!   bash_events/        OH_BASH_EVENTS_DIR
//!   persistence/        OH_PERSISTENCE_DIR (settings/secrets of that server)
//! workspace/            the conversation's workspace (workspace = "isolated"; persisted)
//! home/  tmux/          HOME (isolated mode) and TMUX_TMPDIR: this host's, not persisted
//! agent-server.log      its stdout/stderr
//! ```
//!
//! Directories made by an older nestor kept `conversations/`, `bash_events/` and
//! `persistence/` directly in the conversation's directory; they are moved under `state/` the
//! next time the child starts (a re-adopted running child keeps its paths until then).
//!
//! With workspace persistence ([`crate::sync`], `[workspace_storage]`), `workspace/` and
//! `state/` are restored before the child starts when they are missing (a fresh host, or
//! local data removed), pushed while it runs, and pushed one last time when it is stopped
//! or its conversation deleted. The home downstream is not persisted.
//!
//! The manifest is what makes restarts safe: a nestor that was killed finds its children
//! still running and re-adopts them (same pid and start time, `/alive` answers with the
//! recorded key); a child that is gone leaves a `Stopped` downstream that is started again
//! on the next request, on the same state directory, with the same keys. A directory whose
//! create never finished is removed.
//!
//! Children run in their own process group, so a Ctrl-C aimed at nestor's terminal does not
//! kill them mid-write: nestor stops them itself (SIGTERM, then SIGKILL after a grace).
//!
//! **Warm pool** ([`crate::pool`]): a dormant child lives in `<state_dir>/process/pool-<id>/`
//! (manifest phase `warm`, downstream `process-pool-<id>`), started with
//! `OH_DEFERRED_INIT=true`, its init key as `OH_SECRET_KEY`, a boot key nobody gets, and the
//! configured environment minus the webhook settings. A claim rewrites its manifest for the
//! conversation (owner, fresh keys, phase `provisioning`) before the pool binds it; from
//! then on it is that conversation's directory like any other (the directory keeps its
//! name), and a restart of its child is an ordinary one with the conversation's keys.

mod manifest;
mod proc_info;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use nestor_core::downstream::{Endpoint, NotReady};
use nestor_core::{ConversationId, Downstream, DownstreamClient, DownstreamId, DownstreamState};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::sync::{SyncTrees, WorkspaceSync};
use crate::util::free_loopback_port;
use crate::{ProvisionError, ProvisionRequest, Provisioner, SHUTDOWN_GRACE};
use manifest::{Manifest, Phase};

/// Where a conversation's workspace is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WorkspaceMode {
    /// Each conversation works in its own `workspace/` directory, whatever the client asked:
    /// conversations cannot see each other's files.
    #[default]
    Isolated,
    /// The client's `workspace.working_dir` is used as is (an agent working on your checkout).
    Passthrough,
}

/// What to do with running children when nestor exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnShutdown {
    /// Stop them (SIGTERM, then SIGKILL after the grace).
    #[default]
    Stop,
    /// Leave them running; the next nestor re-adopts them.
    Keep,
}

/// `[provisioner.process]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// The `agent-server` executable. Default: the one `scripts/setup-agent-server.sh` installs.
    #[serde(default)]
    pub agent_server: Option<PathBuf>,
    #[serde(default)]
    pub workspace: WorkspaceMode,
    /// Seconds a child may take from spawn to its first `/alive`.
    #[serde(default)]
    pub startup_timeout_secs: Option<f64>,
    /// Seconds between SIGTERM and SIGKILL when stopping a child.
    #[serde(default)]
    pub stop_timeout_secs: Option<f64>,
    #[serde(default)]
    pub on_shutdown: OnShutdown,
    /// Extra environment for every child (e.g. LLM settings).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Remove a conversation's directory (workspace included) when it is deleted.
    #[serde(default = "yes")]
    pub delete_state_on_release: bool,
}

fn yes() -> bool {
    true
}

/// The environment every child gets (running.md): no browser or VS Code preload, the local
/// LiteLLM cost map (else +7-10 s offline), UTC timestamps (resume compares them as text).
const BASE_ENV: &[(&str, &str)] = &[
    ("LITELLM_LOCAL_MODEL_COST_MAP", "True"),
    ("OH_PRELOAD_TOOLS", "false"),
    ("OH_ENABLE_BROWSER", "false"),
    ("OH_ENABLE_VSCODE", "false"),
    ("OPENHANDS_SUPPRESS_BANNER", "1"),
    ("PYTHONUNBUFFERED", "1"),
    ("TZ", "UTC"),
];

/// Variables of nestor's own environment a child must not inherit (they would configure it
/// with nestor's key or another server's settings).
fn must_not_inherit(name: &str) -> bool {
    name == "SESSION_API_KEY"
        || name.starts_with("OH_")
        || name.starts_with("NESTOR_")
        || name == "OPENHANDS_AGENT_SERVER_CONFIG_PATH"
}

const MANIFEST: &str = "nestor-process.json";
const LOG: &str = "agent-server.log";
/// The agent-server's state tree, and what it holds.
const STATE_DIR: &str = "state";
const STATE_SUBDIRS: [&str; 3] = ["conversations", "bash_events", "persistence"];
const WORKSPACE_DIR: &str = "workspace";
/// Directory of the home downstream (host-global routes), beside the conversations'.
const HOME_DIR: &str = "home";

/// One child and its bookkeeping.
struct Proc {
    ds: Arc<Downstream>,
    dir: PathBuf,
    manifest: std::sync::Mutex<Manifest>,
    /// Serialises start/stop of this child.
    lifecycle: Mutex<()>,
    /// Bumped on every start; a monitor of an older start must not touch the state.
    generation: std::sync::atomic::AtomicU64,
    /// An unclaimed warm pool member (not listed).
    warm: std::sync::atomic::AtomicBool,
}

impl Proc {
    fn is_warm(&self) -> bool {
        self.warm.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Proc {
    /// The conversation's trees (None for the home downstream and warm pool members).
    fn trees(&self) -> Option<SyncTrees> {
        let m = self.manifest.lock().unwrap();
        (!m.conversation_id.as_uuid().is_nil()).then(|| SyncTrees {
            conversation: m.conversation_id,
            owner: m.owner.clone(),
            workspace: self.dir.join(WORKSPACE_DIR),
            state: self.dir.join(STATE_DIR),
        })
    }

    /// A directory laid out by an older nestor (state subdirectories at the top).
    fn is_legacy_layout(&self) -> bool {
        !self.dir.join(STATE_DIR).exists() && STATE_SUBDIRS.iter().any(|d| self.dir.join(d).is_dir())
    }

    /// Move an older layout's state under `state/` (the child must not be running).
    fn migrate_layout(&self) -> Result<(), ProvisionError> {
        if !self.is_legacy_layout() {
            return Ok(());
        }
        let io = |e: std::io::Error| ProvisionError::Start(format!("cannot move {} to the state/ layout: {e}", self.dir.display()));
        let tmp = self.dir.join(".state-migrating");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io)?;
        for d in STATE_SUBDIRS {
            let from = self.dir.join(d);
            if from.exists() {
                std::fs::rename(&from, tmp.join(d)).map_err(io)?;
            }
        }
        std::fs::rename(&tmp, self.dir.join(STATE_DIR)).map_err(io)?;
        tracing::info!(dir = %self.dir.display(), "moved the agent-server state under state/");
        Ok(())
    }
}

/// The `process` backend. Cheap to clone (all state is shared).
#[derive(Clone)]
pub struct ProcessProvisioner(Arc<Inner>);

struct Inner {
    root: PathBuf,
    agent_server: PathBuf,
    cfg: ProcessConfig,
    startup_timeout: Duration,
    stop_timeout: Duration,
    client: DownstreamClient,
    procs: DashMap<DownstreamId, Arc<Proc>>,
    sync: Option<Arc<dyn WorkspaceSync>>,
}

impl ProcessProvisioner {
    /// `root` is `<state_dir>/process`; `default_agent_server` is used when the config names none.
    pub fn new(
        cfg: &ProcessConfig,
        root: PathBuf,
        default_agent_server: PathBuf,
        client: DownstreamClient,
    ) -> Result<Self, ProvisionError> {
        let agent_server = cfg.agent_server.clone().unwrap_or(default_agent_server);
        if !is_executable(&agent_server) {
            return Err(ProvisionError::Config(format!(
                "agent-server executable not found at {} (run scripts/setup-agent-server.sh, or set provisioner.process.agent_server)",
                agent_server.display()
            )));
        }
        std::fs::create_dir_all(&root)
            .map_err(|e| ProvisionError::Config(format!("cannot create {}: {e}", root.display())))?;
        let secs = |v: Option<f64>, def: f64, what: &str| -> Result<Duration, ProvisionError> {
            let v = v.unwrap_or(def);
            // Bounded: `Duration::from_secs_f64` panics past ~1.8e19 s (found while fuzzing the config).
            if v.is_finite() && v > 0.0 && v <= 1e9 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(ProvisionError::Config(format!("provisioner.process.{what} must be a positive number")))
            }
        };
        Ok(Self(Arc::new(Inner {
            startup_timeout: secs(cfg.startup_timeout_secs, 120.0, "startup_timeout_secs")?,
            stop_timeout: secs(cfg.stop_timeout_secs, SHUTDOWN_GRACE.as_secs_f64(), "stop_timeout_secs")?,
            root,
            agent_server,
            cfg: cfg.clone(),
            client,
            procs: DashMap::new(),
            sync: None,
        })))
    }

    /// Persist every conversation's `workspace/` and `state/` through `sync` (see
    /// [`crate::sync`]). Call before the provisioner is used (recover included).
    pub fn with_workspace_sync(mut self, sync: Arc<dyn WorkspaceSync>) -> Self {
        Arc::get_mut(&mut self.0).expect("with_workspace_sync before the provisioner is shared").sync = Some(sync);
        self
    }

    /// Mark a conversation's create as done: its directory is no longer removable as
    /// half-created.
    pub fn mark_active(&self, ds: &Downstream) {
        self.0.mark_active(ds)
    }
}

impl Inner {

    fn downstream_id(conv: &ConversationId) -> DownstreamId {
        DownstreamId::new(format!("process-{}", conv.hex()))
    }

    fn home_id() -> DownstreamId {
        DownstreamId::new("process-home")
    }

    fn pool_id(warm_id: &str) -> DownstreamId {
        DownstreamId::new(format!("process-pool-{warm_id}"))
    }

    /// The downstream id a manifest's directory is known by.
    fn id_of(m: &Manifest) -> DownstreamId {
        match &m.warm_id {
            Some(w) => Self::pool_id(w),
            None if m.conversation_id.as_uuid().is_nil() => Self::home_id(),
            None => Self::downstream_id(&m.conversation_id),
        }
    }

    /// Create the bookkeeping for a new child and spawn it (or return the existing one).
    async fn start_new(self: &Arc<Self>, id: DownstreamId, dir: PathBuf, m: Manifest) -> Result<Arc<Downstream>, ProvisionError> {
        if let Some(p) = self.procs.get(&id) {
            return Ok(p.ds.clone());
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| ProvisionError::Start(format!("cannot create {}: {e}", dir.display())))?;
        let warm = m.phase == Phase::Warm;
        let primary = (!m.conversation_id.as_uuid().is_nil()).then_some(m.conversation_id);
        let owner = (!warm).then(|| m.owner.clone());
        let ds = Downstream::new(id.clone(), "process", primary, owner, None, DownstreamState::Starting);
        let p = Arc::new(Proc {
            ds,
            dir,
            manifest: std::sync::Mutex::new(m.clone()),
            lifecycle: Mutex::new(()),
            generation: std::sync::atomic::AtomicU64::new(0),
            warm: std::sync::atomic::AtomicBool::new(warm),
        });
        self.save_manifest(&p, &m)?;
        let p = self.procs.entry(id).or_insert(p).clone();
        let _g = p.lifecycle.lock().await;
        if p.ds.endpoint().is_none() {
            if let Err(e) = self.spawn_child(&p).await {
                p.ds.set_state(DownstreamState::Failed(e.to_string().into()));
                return Err(e);
            }
        }
        Ok(p.ds.clone())
    }

    fn proc_of(&self, ds: &Downstream) -> Result<Arc<Proc>, ProvisionError> {
        self.procs
            .get(ds.id())
            .map(|p| p.clone())
            .ok_or_else(|| ProvisionError::UnknownDownstream(ds.id().clone()))
    }

    /// Spawn the child for `p` (caller holds `p.lifecycle`). Sets state `Starting` and starts
    /// a monitor that turns it `Ready` (or `Failed`).
    async fn spawn_child(self: &Arc<Self>, p: &Arc<Proc>) -> Result<(), ProvisionError> {
        p.migrate_layout()?;
        let trees = p.trees();
        if let (Some(sync), Some(t)) = (&self.sync, &trees) {
            // Missing trees come back from storage before the agent can see them.
            sync.restore(t).await?;
        }
        let state = p.dir.join(STATE_DIR);
        for dir in STATE_SUBDIRS.iter().map(|d| state.join(d)).chain([p.dir.join(WORKSPACE_DIR)]) {
            std::fs::create_dir_all(&dir)
                .map_err(|e| ProvisionError::Start(format!("cannot create {}: {e}", dir.display())))?;
        }
        let port = free_loopback_port().map_err(|e| ProvisionError::Start(format!("no free port: {e}")))?;
        let (key, secret, dormant) = {
            let m = p.manifest.lock().unwrap();
            (m.key.clone(), m.secret_key.clone(), m.phase == Phase::Warm)
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p.dir.join(LOG))
            .map_err(|e| ProvisionError::Start(format!("cannot open log: {e}")))?;
        let log2 = log.try_clone().map_err(|e| ProvisionError::Start(e.to_string()))?;

        let mut cmd = tokio::process::Command::new(&self.agent_server);
        cmd.arg("--host").arg("127.0.0.1").arg("--port").arg(port.to_string());
        cmd.current_dir(&p.dir);
        for (k, _) in std::env::vars_os() {
            if let Some(k) = k.to_str() {
                if must_not_inherit(k) {
                    cmd.env_remove(k);
                }
            }
        }
        for (k, v) in BASE_ENV {
            cmd.env(k, v);
        }
        if dormant {
            // Deferred init: the secret key is the init key; the boot key is never handed out.
            cmd.env("OH_DEFERRED_INIT", "true").env("OH_SESSION_API_KEYS_0", key.expose());
        } else {
            cmd.env("SESSION_API_KEY", key.expose()).env("OH_SESSION_API_KEYS_0", key.expose());
        }
        cmd.env("OH_SECRET_KEY", secret.expose())
            .env("OH_CONVERSATIONS_PATH", state.join("conversations"))
            .env("OH_BASH_EVENTS_DIR", state.join("bash_events"))
            .env("OH_PERSISTENCE_DIR", state.join("persistence"))
            .env("OH_WORKSPACE_PATH", p.dir.join(WORKSPACE_DIR))
            .env("OPENHANDS_AGENT_SERVER_CONFIG_PATH", p.dir.join("agent_server_config.json"));
        let tmux_dir = tmux_dir_for(&p.dir);
        let _ = std::fs::create_dir_all(&tmux_dir);
        cmd.env("TMUX_TMPDIR", &tmux_dir);
        if self.cfg.workspace == WorkspaceMode::Isolated {
            // Its own home: git config, shell history and ~/.cache stay per conversation.
            let home = p.dir.join("home");
            let _ = std::fs::create_dir_all(&home);
            cmd.env("HOME", home);
        }
        // Loopback never goes through a proxy (a local LLM, nestor's own secret lookups).
        let no_proxy = std::env::var("NO_PROXY").or_else(|_| std::env::var("no_proxy")).unwrap_or_default();
        let no_proxy = if no_proxy.is_empty() {
            "127.0.0.1,localhost,::1".to_owned()
        } else {
            format!("{no_proxy},127.0.0.1,localhost,::1")
        };
        cmd.env("NO_PROXY", &no_proxy).env("no_proxy", &no_proxy);
        for (k, v) in &self.cfg.env {
            if dormant && crate::pool::is_late_bound_env(k) {
                continue; // bound at claim (POST /api/init)
            }
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::from(log)).stderr(Stdio::from(log2));
        cmd.process_group(0);
        cmd.kill_on_drop(false);
        let child = cmd.spawn().map_err(|e| {
            ProvisionError::Start(format!("cannot run {}: {e}", self.agent_server.display()))
        })?;
        let pid = child.id().map(|x| x as i32);
        {
            let mut m = p.manifest.lock().unwrap();
            m.port = Some(port);
            m.pid = pid;
            m.pid_start = pid.and_then(proc_info::start_time);
            self.save_manifest(p, &m)?;
        }
        p.ds.set_endpoint(Some(Endpoint::loopback(port, Some(key))));
        p.ds.set_state(DownstreamState::Starting);
        let generation = p.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        tracing::info!(downstream = %p.ds.id(), pid = ?pid, "agent-server process started");
        let me = self.clone();
        let p2 = p.clone();
        tokio::spawn(async move { me.monitor_child(p2, child, generation).await });
        if let (Some(sync), Some(t)) = (&self.sync, &trees) {
            sync.started(t);
        }
        Ok(())
    }

    /// Watch a child we spawned: ready when `/alive` answers, failed when it exits early or
    /// not in time; reaps it when it exits.
    async fn monitor_child(self: Arc<Self>, p: Arc<Proc>, mut child: tokio::process::Child, generation: u64) {
        let current = || p.generation.load(std::sync::atomic::Ordering::SeqCst) == generation;
        let ep = p.ds.endpoint();
        let deadline = tokio::time::Instant::now() + self.startup_timeout;
        let mut ready = false;
        while !ready {
            tokio::select! {
                status = child.wait() => {
                    if current() && p.ds.state() == DownstreamState::Starting {
                        let why = format!(
                            "the agent-server exited during start-up ({}){}",
                            status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                            self.log_tail(&p)
                        );
                        tracing::warn!(downstream = %p.ds.id(), "{why}");
                        p.ds.set_state(DownstreamState::Failed(why.into()));
                    }
                    return;
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if !current() { break; }
                    if let Some(ep) = &ep {
                        if self.client.is_alive(ep, Duration::from_secs(2)).await {
                            ready = true;
                        }
                    }
                    if !ready && tokio::time::Instant::now() >= deadline {
                        let why = format!(
                            "the agent-server did not answer /alive within {:?}{}",
                            self.startup_timeout,
                            self.log_tail(&p)
                        );
                        tracing::warn!(downstream = %p.ds.id(), "{why}");
                        p.ds.set_state(DownstreamState::Failed(why.into()));
                        kill_group(child.id().map(|x| x as i32), nix::sys::signal::Signal::SIGKILL);
                        let _ = child.wait().await;
                        return;
                    }
                }
            }
        }
        if ready && current() {
            p.ds.set_state(DownstreamState::Ready);
            tracing::info!(downstream = %p.ds.id(), "agent-server process ready");
        }
        let status = child.wait().await;
        if current() && p.ds.state() == DownstreamState::Ready {
            let why = format!(
                "the agent-server process exited unexpectedly ({})",
                status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
            );
            tracing::warn!(downstream = %p.ds.id(), "{why}");
            p.ds.set_state(DownstreamState::Failed(why.into()));
        }
    }

    /// Watch a re-adopted child (not ours to `wait` on): poll its pid.
    async fn monitor_adopted(self: Arc<Self>, p: Arc<Proc>, pid: i32, generation: u64) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if p.generation.load(std::sync::atomic::Ordering::SeqCst) != generation {
                return;
            }
            let start = p.manifest.lock().unwrap().pid_start;
            if !proc_info::is_same_process(pid, start) {
                if p.ds.state() == DownstreamState::Ready {
                    tracing::warn!(downstream = %p.ds.id(), "re-adopted agent-server process exited");
                    p.ds.set_state(DownstreamState::Failed("the agent-server process exited unexpectedly".into()));
                }
                return;
            }
        }
    }

    /// Last lines of the child's log, key masked, for error messages.
    fn log_tail(&self, p: &Proc) -> String {
        let Ok(text) = std::fs::read(p.dir.join(LOG)) else { return String::new() };
        let tail = &text[text.len().saturating_sub(1500)..];
        let tail = String::from_utf8_lossy(tail);
        let key = p.manifest.lock().unwrap().key.clone();
        let tail = tail.replace(key.expose(), nestor_core::leak_guard::MASK);
        let lines: Vec<&str> = tail.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect();
        if lines.is_empty() {
            String::new()
        } else {
            format!("; last log lines: {}", lines.join(" | "))
        }
    }

    fn save_manifest(&self, p: &Proc, m: &Manifest) -> Result<(), ProvisionError> {
        let bytes = serde_json::to_vec_pretty(m).expect("manifest serialises");
        nestor_core::fs::write_atomic(&p.dir.join(MANIFEST), &bytes)
            .map_err(|e| ProvisionError::Start(format!("cannot write manifest in {}: {e}", p.dir.display())))
    }

    /// Stop `p`'s child: SIGTERM to its group, SIGKILL after the grace. Caller holds lifecycle.
    async fn stop_child(&self, p: &Proc) {
        let (pid, start) = {
            let m = p.manifest.lock().unwrap();
            (m.pid, m.pid_start)
        };
        p.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Stopped first: a request arriving now waits for a restart instead of reaching a
        // process that is going away.
        if p.ds.state() == DownstreamState::Ready {
            p.ds.set_state(DownstreamState::Stopped);
        }
        if let Some(pid) = pid {
            if proc_info::is_same_process(pid, start) {
                kill_group(Some(pid), nix::sys::signal::Signal::SIGTERM);
                let deadline = tokio::time::Instant::now() + self.stop_timeout;
                while proc_info::is_same_process(pid, start) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if proc_info::is_same_process(pid, start) {
                    tracing::warn!(downstream = %p.ds.id(), "agent-server ignored SIGTERM; killing it");
                    kill_group(Some(pid), nix::sys::signal::Signal::SIGKILL);
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                    while proc_info::is_same_process(pid, start) && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
        kill_tmux_servers(&tmux_dir_for(&p.dir)).await;
        {
            let mut m = p.manifest.lock().unwrap();
            m.pid = None;
            m.pid_start = None;
            m.port = None;
            let _ = self.save_manifest(p, &m);
        }
        p.ds.set_endpoint(None);
        p.ds.set_state(DownstreamState::Stopped);
        tracing::info!(downstream = %p.ds.id(), "agent-server process stopped");
    }

    fn mark_active(&self, ds: &Downstream) {
        if let Ok(p) = self.proc_of(ds) {
            let mut m = p.manifest.lock().unwrap();
            if m.phase != Phase::Active {
                m.phase = Phase::Active;
                let _ = self.save_manifest(&p, &m);
            }
        }
    }

    /// Adopt one directory found at start.
    async fn recover_dir(self: &Arc<Self>, dir: &Path) -> Option<Arc<Downstream>> {
        let m = match Manifest::load(&dir.join(MANIFEST)) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "skipping process directory with unreadable manifest: {e}");
                return None;
            }
        };
        let conv = m.conversation_id;
        let is_home = conv.as_uuid().is_nil();
        let id = Self::id_of(&m);
        let alive = m.pid.filter(|pid| proc_info::is_same_process(*pid, m.pid_start));
        if m.phase == Phase::Warm {
            if !self.procs.contains_key(&id) {
                // A warm pool member no pool re-adopted (recover_warm runs first): remove it.
                if let Some(pid) = alive {
                    kill_group(Some(pid), nix::sys::signal::Signal::SIGKILL);
                }
                kill_tmux_servers(&tmux_dir_for(dir)).await;
                tracing::info!(dir = %dir.display(), "removing an unclaimed warm agent-server directory");
                let _ = std::fs::remove_dir_all(dir);
            }
            return None;
        }
        let has_conversation = [dir.join(STATE_DIR).join("conversations"), dir.join("conversations")]
            .iter()
            .any(|c| c.join(conv.hex()).join("meta.json").exists());
        if m.phase == Phase::Provisioning && !has_conversation {
            // nestor died between starting the child and the create reaching it.
            if let Some(pid) = alive {
                kill_group(Some(pid), nix::sys::signal::Signal::SIGKILL);
            }
            tracing::info!(conversation = %conv, "removing half-created process directory");
            let _ = std::fs::remove_dir_all(dir);
            return None;
        }
        let primary = (!is_home).then_some(conv);
        let ds = Downstream::new(id.clone(), "process", primary, Some(m.owner.clone()), None, DownstreamState::Stopped);
        let p = Arc::new(Proc {
            ds: ds.clone(),
            dir: dir.to_path_buf(),
            manifest: std::sync::Mutex::new(m.clone()),
            lifecycle: Mutex::new(()),
            generation: std::sync::atomic::AtomicU64::new(0),
            warm: std::sync::atomic::AtomicBool::new(false),
        });
        if let (Some(pid), Some(port)) = (alive, m.port) {
            let ep = Endpoint::loopback(port, Some(m.key.clone()));
            if self.client.is_alive(&ep, Duration::from_secs(2)).await {
                ds.set_endpoint(Some(ep));
                ds.set_state(DownstreamState::Ready);
                tracing::info!(conversation = %conv, pid, "re-adopted running agent-server process");
                if let (Some(sync), Some(t)) = (&self.sync, p.trees()) {
                    if p.is_legacy_layout() {
                        tracing::info!(conversation = %conv, "persisting it from its next start (its state predates the state/ layout)");
                    } else {
                        sync.started(&t);
                    }
                }
                let me = self.clone();
                let p2 = p.clone();
                tokio::spawn(async move { me.monitor_adopted(p2, pid, 0).await });
            } else {
                tracing::info!(conversation = %conv, pid, "agent-server process left behind is not answering; stopping it");
                self.stop_child(&p).await;
            }
        } else if m.pid.is_some() {
            let mut m2 = p.manifest.lock().unwrap();
            m2.pid = None;
            m2.pid_start = None;
            m2.port = None;
            let _ = self.save_manifest(&p, &m2);
        }
        self.procs.insert(id, p);
        Some(ds)
    }
}

/// The child's TMUX_TMPDIR. The agent-server's terminal tool starts tmux servers, which
/// daemonize out of the child's process group; a private directory per child keeps them
/// apart (a shared default socket would mix conversations) and lets nestor stop exactly
/// them. Unix socket paths are limited to ~107 bytes, so a long state_dir falls back to a
/// short per-user directory under /tmp.
fn tmux_dir_for(dir: &Path) -> PathBuf {
    let preferred = dir.join("tmux");
    // tmux puts its socket at $TMUX_TMPDIR/tmux-<uid>/default.
    if preferred.as_os_str().len() + "/tmux-4294967295/default".len() < 100 {
        return preferred;
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let short: String = name.chars().take(16).collect();
    PathBuf::from(format!("/tmp/nestor-{}-tmux", nix::unistd::getuid())).join(short)
}

/// Stop the tmux servers whose sockets live in `dir` (bounded; tmux absent is fine).
async fn kill_tmux_servers(dir: &Path) {
    let Ok(subdirs) = std::fs::read_dir(dir) else { return };
    for sub in subdirs.flatten() {
        let Ok(socks) = std::fs::read_dir(sub.path()) else { continue };
        for sock in socks.flatten() {
            use std::os::unix::fs::FileTypeExt;
            if !sock.file_type().map(|t| t.is_socket()).unwrap_or(false) {
                continue;
            }
            let run = tokio::process::Command::new("tmux")
                .arg("-S")
                .arg(sock.path())
                .arg("kill-server")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status();
            let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
        }
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Signal a child's whole process group (its tools' subprocesses too).
fn kill_group(pid: Option<i32>, sig: nix::sys::signal::Signal) {
    if let Some(pid) = pid {
        if pid > 1 {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig);
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }
}

#[async_trait]
impl Provisioner for ProcessProvisioner {
    fn kind(&self) -> &'static str {
        "process"
    }

    async fn recover(&self) -> Result<Vec<Arc<Downstream>>, ProvisionError> {
        let inner = &self.0;
        let entries = std::fs::read_dir(&inner.root)
            .map_err(|e| ProvisionError::Config(format!("cannot read {}: {e}", inner.root.display())))?;
        let dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join(MANIFEST).is_file())
            .collect();
        let found = futures::future::join_all(dirs.iter().map(|d| inner.recover_dir(d))).await;
        let owned: Vec<_> = found.into_iter().flatten().collect();
        let running = owned.iter().filter(|d| d.state() == DownstreamState::Ready).count();
        tracing::info!(total = owned.len(), running, "process provisioner recovered its downstreams");
        Ok(owned)
    }

    async fn provision(&self, req: ProvisionRequest) -> Result<Arc<Downstream>, ProvisionError> {
        let dir = self.0.root.join(req.conversation.hex());
        let m = Manifest::new(req.conversation, req.owner);
        self.0.start_new(Inner::downstream_id(&req.conversation), dir, m).await
    }

    async fn home(&self) -> Result<Arc<Downstream>, ProvisionError> {
        let ds = match self.0.procs.get(&Inner::home_id()) {
            Some(p) => p.ds.clone(),
            None => {
                let mut m = Manifest::new(ConversationId::from_uuid(uuid::Uuid::nil()), nestor_core::UserId::default_user());
                m.phase = Phase::Active;
                self.0.start_new(Inner::home_id(), self.0.root.join(HOME_DIR), m).await?
            }
        };
        self.ensure_ready(&ds, self.0.startup_timeout).await?;
        Ok(ds)
    }

    fn get(&self, id: &DownstreamId) -> Option<Arc<Downstream>> {
        self.0.procs.get(id).filter(|p| !p.is_warm()).map(|p| p.ds.clone())
    }

    fn list(&self) -> Vec<Arc<Downstream>> {
        self.0.procs.iter().filter(|p| !p.is_warm()).map(|p| p.ds.clone()).collect()
    }

    async fn ensure_ready(&self, ds: &Arc<Downstream>, timeout: Duration) -> Result<(), ProvisionError> {
        let inner = &self.0;
        let deadline = tokio::time::Instant::now() + timeout;
        // A failed start is not retried in a loop: one restart per call, then report.
        let mut restarted = false;
        loop {
            match ds.state() {
                DownstreamState::Ready => return Ok(()),
                DownstreamState::Released => return Err(NotReady::Released.into()),
                DownstreamState::Starting => {}
                DownstreamState::Failed(m) if restarted => return Err(NotReady::Failed(m).into()),
                DownstreamState::Stopped | DownstreamState::Failed(_) => {
                    let p = inner.proc_of(ds)?;
                    let _g = p.lifecycle.lock().await;
                    let s = ds.state();
                    if matches!(s, DownstreamState::Stopped | DownstreamState::Failed(_)) {
                        if matches!(s, DownstreamState::Failed(_)) {
                            // Make sure nothing of the failed child lingers on its port.
                            inner.stop_child(&p).await;
                        }
                        tracing::info!(downstream = %ds.id(), "starting agent-server process on demand");
                        inner.spawn_child(&p).await?;
                    }
                    restarted = true;
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(NotReady::Timeout(timeout).into());
            }
            match ds.wait_ready(left).await {
                Ok(()) => return Ok(()),
                Err(NotReady::Timeout(_)) => return Err(NotReady::Timeout(timeout).into()),
                Err(NotReady::Failed(m)) if restarted => return Err(NotReady::Failed(m).into()),
                Err(_) => continue,
            }
        }
    }

    async fn stop(&self, ds: &Arc<Downstream>) -> Result<(), ProvisionError> {
        let p = self.0.proc_of(ds)?;
        let _g = p.lifecycle.lock().await;
        self.0.stop_child(&p).await;
        if let (Some(sync), Some(t)) = (&self.0.sync, p.trees()) {
            sync.stopped(&t).await;
        }
        Ok(())
    }

    async fn release(&self, ds: &Arc<Downstream>, conversation: ConversationId, remaining: usize) -> Result<(), ProvisionError> {
        let inner = &self.0;
        if remaining > 0 {
            return Ok(());
        }
        let p = inner.proc_of(ds)?;
        {
            let _g = p.lifecycle.lock().await;
            inner.stop_child(&p).await;
            ds.set_state(DownstreamState::Released);
            let mut delete = inner.cfg.delete_state_on_release;
            if let (Some(sync), Some(t)) = (&inner.sync, p.trees()) {
                if let Err(e) = sync.released(&t).await {
                    if delete {
                        tracing::warn!(conversation = %conversation, dir = %p.dir.display(), "keeping the deleted conversation's files here: {e}");
                    }
                    delete = false;
                }
            }
            if delete {
                if let Err(e) = std::fs::remove_dir_all(&p.dir) {
                    tracing::warn!(conversation = %conversation, "could not remove {}: {e}", p.dir.display());
                }
            } else {
                let mut m = p.manifest.lock().unwrap();
                m.phase = Phase::Released;
                let _ = inner.save_manifest(&p, &m);
            }
        }
        inner.procs.remove(ds.id());
        tracing::info!(conversation = %conversation, "released agent-server process");
        Ok(())
    }

    fn mark_active(&self, ds: &Downstream) {
        self.0.mark_active(ds)
    }

    fn prepare_create(&self, ds: &Downstream, body: &mut serde_json::Map<String, serde_json::Value>) {
        if self.0.cfg.workspace != WorkspaceMode::Isolated {
            return;
        }
        let Ok(p) = self.0.proc_of(ds) else { return };
        let dir = p.dir.join("workspace").to_string_lossy().into_owned();
        let ws = body
            .entry("workspace")
            .or_insert_with(|| serde_json::json!({"kind": "LocalWorkspace"}));
        if let Some(obj) = ws.as_object_mut() {
            obj.insert("working_dir".into(), serde_json::Value::String(dir));
        }
    }

    async fn shutdown(&self) {
        let inner = &self.0;
        if inner.cfg.on_shutdown == OnShutdown::Keep {
            tracing::info!("leaving agent-server processes running (on_shutdown = keep)");
            return;
        }
        let procs: Vec<Arc<Proc>> = inner.procs.iter().map(|p| p.clone()).collect();
        let stops = procs.iter().map(|p| async move {
            let _g = p.lifecycle.lock().await;
            if p.manifest.lock().unwrap().pid.is_some() {
                inner.stop_child(p).await;
            }
        });
        let bound = inner.stop_timeout + Duration::from_secs(6);
        if tokio::time::timeout(bound, futures::future::join_all(stops)).await.is_err() {
            tracing::warn!("some agent-server processes did not stop within {bound:?}");
        }
    }
}

impl Inner {
    /// Stop a warm child for good and remove its directory (caller does not hold lifecycle).
    async fn remove_warm(&self, p: &Arc<Proc>) {
        {
            let _g = p.lifecycle.lock().await;
            self.stop_child(p).await;
            p.ds.set_state(DownstreamState::Released);
            if let Err(e) = std::fs::remove_dir_all(&p.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %p.dir.display(), "could not remove a warm agent-server directory: {e}");
                }
            }
        }
        self.procs.remove(p.ds.id());
    }
}

#[async_trait]
impl crate::pool::WarmBackend for ProcessProvisioner {
    async fn start_dormant(&self) -> Result<crate::pool::WarmServer, ProvisionError> {
        let inner = &self.0;
        let wid = format!("{:016x}", rand::random::<u64>());
        let m = Manifest::warm(wid.clone());
        let init_key = m.secret_key.clone();
        let id = Inner::pool_id(&wid);
        match inner.start_new(id.clone(), inner.root.join(format!("pool-{wid}")), m).await {
            Ok(ds) => Ok(crate::pool::WarmServer { ds, init_key, born: std::time::SystemTime::now() }),
            Err(e) => {
                if let Some(p) = inner.procs.get(&id).map(|p| p.clone()) {
                    inner.remove_warm(&p).await;
                }
                Err(e)
            }
        }
    }

    async fn recover_warm(&self) -> Result<Vec<crate::pool::WarmServer>, ProvisionError> {
        let inner = &self.0;
        let entries = std::fs::read_dir(&inner.root)
            .map_err(|e| ProvisionError::Config(format!("cannot read {}: {e}", inner.root.display())))?;
        let mut found = Vec::new();
        for dir in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            let Ok(m) = Manifest::load(&dir.join(MANIFEST)) else { continue };
            if m.phase != Phase::Warm {
                continue;
            }
            let id = Inner::id_of(&m);
            let alive = m.pid.filter(|pid| proc_info::is_same_process(*pid, m.pid_start));
            let ep = m.port.map(|port| Endpoint::loopback(port, Some(m.key.clone())));
            let answering = match (&alive, &ep) {
                (Some(_), Some(ep)) => inner.client.is_alive(ep, Duration::from_secs(2)).await,
                _ => false,
            };
            if !answering {
                // Dead or wedged: recover() removes the directory (it is not adopted here).
                continue;
            }
            let ds = Downstream::new(id.clone(), "process", None, None, ep, DownstreamState::Ready);
            let p = Arc::new(Proc {
                ds: ds.clone(),
                dir: dir.clone(),
                manifest: std::sync::Mutex::new(m.clone()),
                lifecycle: Mutex::new(()),
                generation: std::sync::atomic::AtomicU64::new(0),
                warm: std::sync::atomic::AtomicBool::new(true),
            });
            inner.procs.insert(id, p.clone());
            let me = inner.clone();
            let pid = alive.unwrap_or_default();
            tokio::spawn(async move { me.monitor_adopted(p, pid, 0).await });
            found.push(crate::pool::WarmServer { ds, init_key: m.secret_key.clone(), born: m.created() });
        }
        Ok(found)
    }

    async fn adopt(
        &self,
        warm: &crate::pool::WarmServer,
        req: &ProvisionRequest,
        keys: &crate::pool::ClaimKeys,
    ) -> Result<Arc<Downstream>, ProvisionError> {
        let inner = &self.0;
        let p = inner.procs.get(warm.ds.id()).map(|p| p.clone()).ok_or_else(|| ProvisionError::UnknownDownstream(warm.ds.id().clone()))?;
        let _g = p.lifecycle.lock().await;
        if !p.is_warm() || p.ds.state() != DownstreamState::Ready {
            return Err(ProvisionError::Start("the warm agent-server is no longer available".into()));
        }
        let port = {
            let mut m = p.manifest.lock().unwrap();
            let port = m.port.ok_or_else(|| ProvisionError::Start("the warm agent-server has no port".into()))?;
            m.conversation_id = req.conversation;
            m.owner = req.owner.clone();
            m.phase = Phase::Provisioning;
            m.key = keys.session.clone();
            m.secret_key = keys.secret.clone();
            m.created_at = Manifest::new(req.conversation, req.owner.clone()).created_at;
            inner.save_manifest(&p, &m)?;
            port
        };
        if !p.ds.bind(req.conversation, req.owner.clone()) {
            return Err(ProvisionError::Other("a warm agent-server was already bound".into()));
        }
        p.ds.set_endpoint(Some(Endpoint::loopback(port, Some(keys.session.clone()))));
        p.warm.store(false, std::sync::atomic::Ordering::SeqCst);
        if let (Some(sync), Some(t)) = (&inner.sync, p.trees()) {
            // Its trees exist from now on: persisted like a cold start's (nothing to restore).
            sync.started(&t);
        }
        Ok(p.ds.clone())
    }

    async fn discard(&self, warm: &crate::pool::WarmServer) {
        let inner = &self.0;
        let Some(p) = inner.procs.get(warm.ds.id()).map(|p| p.clone()) else { return };
        if p.is_warm() {
            inner.remove_warm(&p).await;
        }
    }

    fn init_template(&self, warm: &crate::pool::WarmServer) -> crate::pool::InitTemplate {
        let inner = &self.0;
        let dir = inner.procs.get(warm.ds.id()).map(|p| p.dir.clone());
        crate::pool::InitTemplate {
            conversations_path: dir.as_ref().map(|d| d.join(STATE_DIR).join("conversations").to_string_lossy().into_owned()),
            bash_events_dir: dir.as_ref().map(|d| d.join(STATE_DIR).join("bash_events").to_string_lossy().into_owned()),
            withheld_env: inner
                .cfg
                .env
                .iter()
                .filter(|(k, _)| crate::pool::is_late_bound_env(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    fn keeps_on_shutdown(&self) -> bool {
        self.0.cfg.on_shutdown == OnShutdown::Keep
    }

    fn startup_timeout(&self) -> Duration {
        self.0.startup_timeout
    }
}
