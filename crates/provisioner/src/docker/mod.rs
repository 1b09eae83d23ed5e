//! `docker`: one agent-server container per conversation.
//!
//! Each conversation gets its own container of the configured agent-server image, its own
//! named volume and its own keys:
//!
//! ```text
//! container  nestor-<instance>-<id-hex>   the agent-server, port 8000
//! volume     nestor-<instance>-<id-hex>   mounted at /workspace:
//!              conversations/   OH_CONVERSATIONS_PATH
//!              bash_events/     OH_BASH_EVENTS_DIR
//!              .openhands/      OH_PERSISTENCE_DIR (and HOME=/workspace)
//!              project/         OH_WORKSPACE_PATH, the conversation's working_dir
//! manifest   <state_dir>/docker/<id-hex>.json (0600): session key, OH_SECRET_KEY, phase
//! ```
//!
//! Host-global routes (settings, skills, host-wide bash) go to a "home" container built the
//! same way (`nestor-<instance>-home`).
//!
//! **Labels are the source of truth** for what exists: every container and volume carries
//! `org.nestor.instance` (this nestor: `instance_id`, default a stable hash of its state
//! directory), `org.nestor.conversation` and `org.nestor.owner`. nestor never keeps
//! container ids; it finds containers by name and label.
//!
//! **Keys live in the manifest, not in labels.** Each container gets a random session key
//! (`OH_SESSION_API_KEYS_0`, so only nestor can call it) and a random `OH_SECRET_KEY`. Labels
//! are readable by anyone with access to the engine and are immutable; a 0600 file under
//! nestor's state directory is readable only by nestor's user. Because the keys outlive the
//! container, a container that is re-created (removed by hand, image or settings changed)
//! still decrypts the secrets stored in its volume. (The engine necessarily also holds them
//! in the container's environment; whoever can inspect containers controls the host anyway.)
//! The manifest is written before a container exists and removed before it is, so a labelled
//! container or volume without a manifest is an orphan, removed by the sweep.
//!
//! **Reaching a container.** By default containers sit on the default bridge with port 8000
//! published on `127.0.0.1` only, on a random host port read back from `inspect` (after every
//! start: a restarted container gets a new port). With `network = "<user network>"` nothing
//! is published and nestor uses the container's address on that network. Host networking is
//! refused (every container would share port 8000 and every loopback service of the host).
//! `host.docker.internal` resolves to the host (`extra_hosts`), for a local LLM.
//!
//! **Hardening, by default** (each can only be loosened deliberately):
//! * non-root: user `10001:10001` (the image's `openhands`); root is refused;
//! * `--cap-drop ALL`, nothing added back: found empirically, the agent-server, its terminal
//!   tool (tmux + bash) and file tools need no capability as a non-root user (`cap_add`
//!   exists for images that do; dangerous ones such as SYS_ADMIN are refused);
//! * `--security-opt no-new-privileges` (no setuid escalation), `--init` (reaps the tools'
//!   zombies, forwards SIGTERM);
//! * limits like upstream's docker runtime: `--memory 4g --cpus 2 --pids-limit 512`,
//!   `--ulimit core=0` (no core dumps with secrets in them);
//! * no Docker socket and no host path inside: the only mount is the conversation's volume;
//! * logs capped (json-file, 3 × 10 MB); an OCI `runtime` such as runsc or kata can be set.
//!
//! **Life-cycle.** `provision` writes the manifest, creates volume and container, starts it
//! and returns it `Starting`; a monitor polls `/alive` (and the container's state, so a
//! container that exits during start-up fails at once with its last log lines).
//! `stop` (idle policy) stops the container and keeps it and its volume; `ensure_ready`
//! starts it again, or re-creates it from the volume when it is gone or was created with
//! other settings (one start however many callers wait). `release` (last conversation gone)
//! removes container, volume and manifest. A container that dies while ready is noticed
//! through the engine's event stream (and by the sweep, should an event be missed).
//!
//! **Restarts of nestor.** `shutdown` leaves containers running by default
//! (`on_shutdown = "keep"`): a nestor upgrade or crash costs the conversations nothing, and
//! `recover` re-adopts them without restarting them — one container list call, then
//! concurrent `/alive` probes. A stopped container stays stopped until it is needed.
//! `on_shutdown = "stop"` stops them instead (volumes are kept either way).
//!
//! **Reconciliation.** [`DockerProvisioner::spawn_sweeper`] runs [`DockerProvisioner::sweep`]
//! every `sweep_interval_secs`: it removes labelled containers and volumes without a manifest,
//! conversations whose create never succeeded (manifest phase `provisioning`, older than
//! `provisioning_grace_secs`, unknown to the catalog), and notices containers that stopped
//! behind nestor's back.
//!
//! **Workspace persistence** (`[workspace_storage]`, [`crate::sync`]). A named volume can
//! only be filled through the engine, so with persistence on, new conversations get a host
//! directory instead, `<state_dir>/docker/data/<hex>/`, bind-mounted at `/workspace` (the
//! manifest records which kind a conversation has, for life; older conversations keep their
//! volumes and are not persisted):
//!
//! ```text
//! <state_dir>/docker/data/<hex>/    /workspace (HOME): this host's, not persisted
//!   state/                          the agent-server's state (persisted tree):
//!     conversations/ bash_events/ persistence/     OH_CONVERSATIONS_PATH, ... under it
//!   project/                        OH_WORKSPACE_PATH, the working_dir (persisted tree)
//! ```
//!
//! Before a container is created or started, `state/` and `project/` are restored when they
//! are missing (a fresh host, or the conversation's local data removed) — into the host
//! directory, before the agent-server runs, so it never sees a half-restored tree — and
//! handed to the container's user: nestor, running as root, chowns what it restored to the
//! configured `user` (10001:10001 by default); a nestor that is not root must run the
//! containers as its own uid:gid (`user`). Bind mounts need the engine on nestor's host, so
//! persistence requires a local (`unix://`) engine. Pushes read the same directories while
//! the container runs; `stop` pushes once more after the container stopped, `release` pushes
//! and keeps or purges, then removes the directory (kept under `data/.kept/` when a final push
//! failed). The sweep removes data directories no manifest claims.
//!
//! **Warm pool** ([`crate::pool`]): a dormant container is slot `warm-<id>` (container,
//! volume or data directory `nestor-<instance>-warm-<id>`, label `org.nestor.role=pool`,
//! manifest `warm-<id>.json` in phase `warm`), created with `OH_DEFERRED_INIT=true`, its init
//! key as `OH_SECRET_KEY`, a boot key nobody gets and the configured environment minus the
//! webhook settings. Docker labels cannot change, so a claim is recorded in the manifest
//! (conversation, owner, fresh keys, phase `provisioning`); the container keeps its slot for
//! life. Its dormant container is never started again as such: once stopped, the next start
//! re-creates it (its spec label differs) as an ordinary container with its conversation's
//! keys, on the same volume.
//!
//! Every engine call is bounded (`api_timeout_secs`); the engine's event stream is the one
//! long-lived request, ended on shutdown.

mod config;
mod engine;
mod labels;
mod manifest;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, HostConfig, HostConfigLogConfig, Mount, MountType, PortBinding,
    ResourcesUlimits,
};
use dashmap::DashMap;
use futures::StreamExt;
use nestor_core::downstream::{Endpoint, NotReady};
use nestor_core::{ConversationId, Downstream, DownstreamClient, DownstreamId, DownstreamState, SessionKey, UserId};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

pub use config::{ByteSize, DockerConfig, OnShutdown, Settings};
use engine::{Engine, EngineError};
pub use labels::Slot;
use labels::{CONVERSATION, SPEC};
use manifest::{Manifest, Mount as DataMount, Phase};

use crate::sync::{SyncTrees, WorkspaceSync};
use crate::util::stable_hash;
use crate::{ProvisionError, ProvisionRequest, Provisioner};

/// The conversation's working directory inside its container (what `prepare_create` forces).
pub use crate::container_env::WORKSPACE_DIR;
/// Where the conversation's volume is mounted.
pub const VOLUME_TARGET: &str = "/workspace";

use crate::container_env::BASE_ENV;

/// Where the agent-server keeps its state in a bind-mounted (persisted) conversation: one
/// tree, `state/`, beside the project.
use crate::container_env::PERSISTED_STATE_ENV as BIND_STATE_ENV;
/// In a conversation's data directory: the two persisted trees.
use crate::container_env::{
    PERSISTED_PROJECT_DIR as DATA_PROJECT, PERSISTED_STATE_DIR as DATA_STATE, PERSISTED_STATE_SUBDIRS as STATE_SUBDIRS,
};

/// One container and its bookkeeping.
struct Ctr {
    ds: Arc<Downstream>,
    slot: Slot,
    /// Container and volume name.
    name: String,
    manifest_path: PathBuf,
    manifest: std::sync::Mutex<Manifest>,
    /// Serialises start/stop/remove of this container.
    lifecycle: Mutex<()>,
    /// Bumped on every start/stop; a monitor of an older start must not touch the state.
    generation: AtomicU64,
    /// Set while nestor itself stops or removes the container (its exit is expected).
    expect_exit: AtomicBool,
    /// An unclaimed warm pool member (not listed).
    warm: AtomicBool,
}

impl Ctr {
    fn key(&self) -> SessionKey {
        self.manifest.lock().unwrap().key.clone()
    }
    fn bump(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn is_current(&self, generation: u64) -> bool {
        self.generation.load(Ordering::SeqCst) == generation
    }
    fn is_bind(&self) -> bool {
        self.manifest.lock().unwrap().mount == DataMount::Bind
    }
    fn is_warm(&self) -> bool {
        self.warm.load(Ordering::SeqCst)
    }
}

/// What one [`DockerProvisioner::sweep`] did.
#[derive(Debug, Default, Clone)]
pub struct SweepReport {
    /// Containers removed because no manifest claims them.
    pub orphan_containers: Vec<String>,
    /// Volumes removed because no manifest claims them.
    pub orphan_volumes: Vec<String>,
    /// Conversations whose create never succeeded, removed after the grace period.
    pub half_created: Vec<ConversationId>,
    /// Ready downstreams found without a running container.
    pub lost: Vec<DownstreamId>,
    /// Data directories (bind-mounted conversations) no manifest claims, removed.
    pub orphan_data: Vec<PathBuf>,
}

/// The `docker` backend. Cheap to clone (all state is shared).
#[derive(Clone)]
pub struct DockerProvisioner(Arc<Inner>);

struct Inner {
    root: PathBuf,
    s: Settings,
    instance: String,
    /// Hash of the container settings (label `org.nestor.spec`).
    spec: String,
    engine: Engine,
    client: DownstreamClient,
    ctrs: DashMap<DownstreamId, Arc<Ctr>>,
    cancel: CancellationToken,
    watching: AtomicBool,
    /// Workspace persistence (new conversations are bind-mounted when set).
    sync: Option<Arc<dyn WorkspaceSync>>,
    /// Where bind-mounted conversations live on the host (absolute).
    data_root: PathBuf,
    /// Who restored files are handed to (nestor runs as root), if anyone.
    chown_to: Option<(u32, u32)>,
    /// Data directories being released (the sweep leaves them alone).
    releasing: DashMap<String, ()>,
}

impl DockerProvisioner {
    /// `root` is `<state_dir>/docker` (manifests). No engine call happens here; `recover`
    /// connects (and fails clearly when the engine is unreachable).
    pub fn new(cfg: &DockerConfig, root: PathBuf, client: DownstreamClient) -> Result<Self, ProvisionError> {
        let s = cfg.validate(std::env::var("DOCKER_HOST").ok())?;
        std::fs::create_dir_all(&root)
            .map_err(|e| ProvisionError::Config(format!("cannot create {}: {e}", root.display())))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700));
        }
        let instance = s.instance_id.clone().unwrap_or_else(|| labels::derive_instance_id(&root));
        let engine = Engine::new(&s.docker_host, s.api_timeout).map_err(ProvisionError::Config)?;
        let spec = spec_hash(&s);
        let data_root = std::path::absolute(root.join("data")).unwrap_or_else(|_| root.join("data"));
        // As root, directories made for a container are handed to its user.
        let chown_to = if nix::unistd::geteuid().is_root() { parse_user(&s.user) } else { None };
        Ok(Self(Arc::new(Inner {
            data_root,
            sync: None,
            chown_to,
            releasing: DashMap::new(),
            root,
            s,
            instance,
            spec,
            engine,
            client,
            ctrs: DashMap::new(),
            cancel: CancellationToken::new(),
            watching: AtomicBool::new(false),
        })))
    }

    /// Persist new conversations through `sync` (see the module docs): they get a host
    /// directory bind-mounted at /workspace instead of a volume. Needs a local engine, and
    /// either root (restored files are chowned to `user`) or containers running as nestor's
    /// own uid:gid. Call before the provisioner is used (recover included).
    pub fn with_workspace_sync(mut self, sync: Arc<dyn WorkspaceSync>) -> Result<Self, ProvisionError> {
        let inner = Arc::get_mut(&mut self.0).expect("with_workspace_sync before the provisioner is shared");
        if !inner.s.docker_host.starts_with("unix://") {
            return Err(ProvisionError::Config(format!(
                "workspace_storage with the docker provisioner needs the Docker engine on nestor's host (a unix:// docker_host, not {:?}): conversations' files are restored into and pushed from host directories bind-mounted into their containers",
                inner.s.docker_host
            )));
        }
        let (uid, _) = parse_user(&inner.s.user).ok_or_else(|| {
            ProvisionError::Config(format!(
                "workspace_storage with the docker provisioner needs a numeric provisioner.docker.user (\"uid:gid\"), not {:?}",
                inner.s.user
            ))
        })?;
        let me = nix::unistd::geteuid().as_raw();
        if me != 0 && me != uid {
            return Err(ProvisionError::Config(format!(
                "workspace_storage with the docker provisioner: nestor runs as uid {me} and cannot hand restored files to the containers' user {uid}; run nestor as root or set provisioner.docker.user = \"{me}:{}\"",
                nix::unistd::getegid().as_raw()
            )));
        }
        std::fs::create_dir_all(&inner.data_root)
            .map_err(|e| ProvisionError::Config(format!("cannot create {}: {e}", inner.data_root.display())))?;
        inner.sync = Some(sync);
        Ok(self)
    }

    /// A conversation's data directory (bind-mounted at /workspace when persisted).
    pub fn data_dir(&self, conversation: &ConversationId) -> PathBuf {
        self.0.data_root.join(conversation.hex())
    }

    /// The label value that marks this nestor's containers and volumes.
    pub fn instance_id(&self) -> &str {
        &self.0.instance
    }

    /// The container (and volume) name of `conversation`.
    pub fn container_name(&self, conversation: &ConversationId) -> String {
        labels::object_name(&self.0.instance, &Slot::Conversation(*conversation))
    }

    /// Mark a conversation's create as done: it is no longer removable as half-created.
    pub fn mark_active(&self, ds: &Downstream) {
        self.0.mark_active(ds)
    }

    /// One reconciliation pass (see the module docs). `known` says whether the catalog knows
    /// a conversation (a half-created one it knows is kept and marked active).
    pub async fn sweep(&self, known: &(dyn Fn(&ConversationId) -> bool + Send + Sync)) -> Result<SweepReport, ProvisionError> {
        self.0.sweep(known).await
    }

    /// Run [`Self::sweep`] now and then every `sweep_interval_secs`, until shutdown.
    pub fn spawn_sweeper<F>(&self, known: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(&ConversationId) -> bool + Send + Sync + 'static,
    {
        let me = self.0.clone();
        tokio::spawn(async move {
            loop {
                match me.sweep(&known).await {
                    Ok(r) => {
                        let n = r.orphan_containers.len() + r.orphan_volumes.len() + r.half_created.len() + r.lost.len();
                        if n > 0 {
                            tracing::info!(
                                orphan_containers = r.orphan_containers.len(),
                                orphan_volumes = r.orphan_volumes.len(),
                                half_created = r.half_created.len(),
                                lost = r.lost.len(),
                                "docker sweep reconciled"
                            );
                        }
                    }
                    Err(e) => tracing::warn!("docker sweep failed: {e}"),
                }
                tokio::select! {
                    _ = me.cancel.cancelled() => return,
                    _ = tokio::time::sleep(me.s.sweep_interval) => {}
                }
            }
        })
    }
}

/// A stable hash of everything a container is created with (secrets excluded).
fn spec_hash(s: &Settings) -> String {
    let mut env: Vec<String> = BASE_ENV.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.extend(labels::env_list(&s.env));
    let text = format!(
        "v1|{}|{}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
        s.image,
        s.user,
        env,
        s.labels,
        s.network,
        s.memory,
        s.nano_cpus,
        s.pids_limit,
        s.runtime,
        s.cap_add,
        s.extra_hosts,
        s.entrypoint,
        s.command
    );
    format!("{:016x}", stable_hash(&text))
}

/// `"uid[:gid]"` as numbers (gid defaults to uid).
fn parse_user(u: &str) -> Option<(u32, u32)> {
    let (uid, gid) = u.split_once(':').unwrap_or((u, u));
    Some((uid.parse().ok()?, gid.parse().ok()?))
}

/// Hand `path` (and everything below it when `recursive`) to `uid:gid`, symlinks themselves
/// (never what they point to).
fn chown_tree(path: &std::path::Path, uid: u32, gid: u32, recursive: bool) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if !recursive {
        return Ok(());
    }
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            std::os::unix::fs::lchown(e.path(), Some(uid), Some(gid))?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(())
}

fn is_running(i: &ContainerInspectResponse) -> bool {
    i.state.as_ref().and_then(|s| s.running).unwrap_or(false)
}

fn labels_of(i: &ContainerInspectResponse) -> Option<&HashMap<String, String>> {
    i.config.as_ref()?.labels.as_ref()
}

impl Inner {
    fn downstream_id(slot: &Slot) -> DownstreamId {
        match slot {
            Slot::Conversation(c) => DownstreamId::new(format!("docker-{}", c.hex())),
            Slot::Home => DownstreamId::new("docker-home"),
            Slot::Warm(w) => DownstreamId::new(format!("docker-warm-{w:016x}")),
        }
    }

    fn manifest_path(&self, slot: &Slot) -> PathBuf {
        self.root.join(format!("{}.json", slot.key()))
    }

    fn name(&self, slot: &Slot) -> String {
        labels::object_name(&self.instance, slot)
    }

    fn data_dir(&self, slot: &Slot) -> PathBuf {
        self.data_root.join(slot.key())
    }

    /// The persisted trees of a bind-mounted conversation.
    fn trees(&self, c: &Ctr) -> Option<SyncTrees> {
        let m = c.manifest.lock().unwrap();
        let conversation = m.conversation_id?;
        (m.mount == DataMount::Bind).then(|| {
            let d = self.data_dir(&c.slot);
            SyncTrees { conversation, owner: m.owner.clone(), workspace: d.join(DATA_PROJECT), state: d.join(DATA_STATE) }
        })
    }

    /// Before a bind-mounted container is created or started: its data directory exists,
    /// missing trees are restored (persistence on) and everything is its user's.
    async fn prepare_data(&self, c: &Ctr) -> Result<(), ProvisionError> {
        let dir = self.data_dir(&c.slot);
        let start_err = |e: std::io::Error, p: &std::path::Path| ProvisionError::Start(format!("cannot prepare {}: {e}", p.display()));
        std::fs::create_dir_all(&dir).map_err(|e| start_err(e, &dir))?;
        let mut restored = crate::sync::Restored::default();
        if let (Some(sync), Some(t)) = (&self.sync, self.trees(c)) {
            restored = sync.restore(&t).await?;
        }
        let state = dir.join(DATA_STATE);
        let mut fresh: Vec<PathBuf> = vec![dir.clone()];
        for d in STATE_SUBDIRS.iter().map(|s| state.join(s)).chain([dir.join(DATA_PROJECT)]) {
            if !d.exists() {
                std::fs::create_dir_all(&d).map_err(|e| start_err(e, &d))?;
            }
            fresh.push(d);
        }
        fresh.push(state.clone());
        if let Some((uid, gid)) = self.chown_to {
            let (project, state_tree) = (dir.join(DATA_PROJECT), state);
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                for d in &fresh {
                    chown_tree(d, uid, gid, false)?;
                }
                if restored.workspace {
                    chown_tree(&project, uid, gid, true)?;
                }
                if restored.state {
                    chown_tree(&state_tree, uid, gid, true)?;
                }
                Ok(())
            })
            .await
            .map_err(|e| ProvisionError::Start(e.to_string()))?
            .map_err(|e| start_err(e, &dir))?;
        }
        Ok(())
    }

    fn ctr_of(&self, ds: &Downstream) -> Result<Arc<Ctr>, ProvisionError> {
        self.ctrs.get(ds.id()).map(|c| c.clone()).ok_or_else(|| ProvisionError::UnknownDownstream(ds.id().clone()))
    }

    fn new_ctr(&self, slot: Slot, m: Manifest, state: DownstreamState) -> Arc<Ctr> {
        let warm = m.phase == Phase::Warm;
        // A warm slot's conversation (once claimed) is in its manifest.
        let primary = slot.conversation().or(if matches!(slot, Slot::Warm(_)) { m.conversation_id } else { None });
        let ds = Downstream::new(
            Self::downstream_id(&slot),
            "docker",
            primary,
            (!warm).then(|| m.owner.clone()),
            None,
            state,
        );
        Arc::new(Ctr {
            ds,
            slot,
            name: self.name(&slot),
            manifest_path: self.manifest_path(&slot),
            manifest: std::sync::Mutex::new(m),
            lifecycle: Mutex::new(()),
            generation: AtomicU64::new(0),
            expect_exit: AtomicBool::new(false),
            warm: AtomicBool::new(warm),
        })
    }

    /// An engine error as a provision error naming the engine.
    fn engine_err(&self, e: EngineError) -> ProvisionError {
        match e {
            e @ (EngineError::Unreachable { .. } | EngineError::Timeout { .. }) => ProvisionError::Unavailable {
                detail: format!("{e} (set provisioner.docker.docker_host or DOCKER_HOST)"),
                retry_after: Some(Duration::from_secs(5)),
            },
            e => ProvisionError::Start(e.to_string()),
        }
    }

    fn image_missing(&self) -> ProvisionError {
        ProvisionError::Config(format!(
            "the agent-server image {} is not present on the Docker engine at {} (build it with scripts/build-agent-server-image.sh or docker pull it, or set provisioner.docker.image)",
            self.s.image,
            self.engine.host()
        ))
    }

    /// What a container of `c` is created with.
    fn container_body(&self, c: &Ctr) -> ContainerCreateBody {
        let (key, secret, owner, bind, dormant) = {
            let m = c.manifest.lock().unwrap();
            (m.key.clone(), m.secret_key.clone(), m.owner.clone(), m.mount == DataMount::Bind, m.phase == Phase::Warm)
        };
        let mut env: Vec<String> = BASE_ENV
            .iter()
            .map(|(k, v)| {
                let v = if bind { BIND_STATE_ENV.iter().find(|(b, _)| b == k).map_or(*v, |(_, bv)| *bv) } else { *v };
                format!("{k}={v}")
            })
            .collect();
        if dormant {
            // A warm pool member: deferred init, the init key as its secret key, a boot key
            // nobody gets, and none of what is bound at claim (crate::pool).
            env.extend(
                labels::env_list(&self.s.env).into_iter().filter(|e| !crate::pool::is_late_bound_env(e.split('=').next().unwrap_or(""))),
            );
            env.push("OH_DEFERRED_INIT=true".into());
            env.push(format!("OH_SESSION_API_KEYS_0={}", key.expose()));
        } else {
            env.extend(labels::env_list(&self.s.env));
            env.push(format!("OH_SESSION_API_KEYS_0={}", key.expose()));
            env.push(format!("SESSION_API_KEY={}", key.expose()));
        }
        env.push(format!("OH_SECRET_KEY={}", secret.expose()));
        let owner_label = if dormant { "" } else { owner.as_str() };
        let mut lbl = labels::labels_for(&self.instance, &c.slot, owner_label, &self.s.labels);
        // A dormant container never runs again as itself: once claimed and stopped, its next
        // start re-creates it (the spec differs) with its conversation's keys.
        lbl.insert(SPEC.into(), if dormant { format!("{}-dormant", self.spec) } else { self.spec.clone() });
        let port_bindings = self.s.network.is_none().then(|| {
            HashMap::from([(
                labels::CONTAINER_PORT_KEY.to_owned(),
                Some(vec![PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) }]),
            )])
        });
        let host_config = HostConfig {
            mounts: Some(vec![if bind {
                Mount {
                    typ: Some(MountType::BIND),
                    source: Some(self.data_dir(&c.slot).to_string_lossy().into_owned()),
                    target: Some(VOLUME_TARGET.into()),
                    ..Default::default()
                }
            } else {
                Mount {
                    typ: Some(MountType::VOLUME),
                    source: Some(c.name.clone()),
                    target: Some(VOLUME_TARGET.into()),
                    ..Default::default()
                }
            }]),
            port_bindings,
            network_mode: self.s.network.clone(),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: (!self.s.cap_add.is_empty()).then(|| self.s.cap_add.clone()),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            memory: self.s.memory,
            nano_cpus: self.s.nano_cpus,
            pids_limit: self.s.pids_limit,
            ulimits: Some(vec![ResourcesUlimits { name: Some("core".into()), soft: Some(0), hard: Some(0) }]),
            init: Some(true),
            runtime: self.s.runtime.clone(),
            extra_hosts: (!self.s.extra_hosts.is_empty()).then(|| self.s.extra_hosts.clone()),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([("max-size".into(), "10m".into()), ("max-file".into(), "3".into())])),
            }),
            privileged: Some(false),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(self.s.image.clone()),
            user: Some(self.s.user.clone()),
            entrypoint: self.s.entrypoint.clone(),
            cmd: self.s.command.clone(),
            env: Some(env),
            labels: Some(lbl),
            exposed_ports: Some(vec![labels::CONTAINER_PORT_KEY.to_owned()]),
            stop_timeout: Some(self.s.stop_timeout.as_secs().max(1) as i64),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    /// Where nestor reaches a running container.
    fn endpoint_from_inspect(&self, i: &ContainerInspectResponse, key: SessionKey) -> Option<Endpoint> {
        let ns = i.network_settings.as_ref()?;
        match &self.s.network {
            None => labels::host_port_from_inspect(ns.ports.as_ref()).map(|p| Endpoint::loopback(p, Some(key))),
            Some(net) => {
                let ip = ns.networks.as_ref()?.get(net)?.ip_address.clone().filter(|ip| !ip.is_empty())?;
                network_endpoint(&ip, key)
            }
        }
    }

    fn endpoint_from_summary(&self, c: &bollard::models::ContainerSummary, key: SessionKey) -> Option<Endpoint> {
        match &self.s.network {
            None => labels::host_port_from_summary(c.ports.as_ref()).map(|p| Endpoint::loopback(p, Some(key))),
            Some(net) => network_endpoint(&labels::address_from_summary(c, net)?, key),
        }
    }

    /// Bring `c`'s container up (caller holds `c.lifecycle`): use it if it runs, start it if
    /// stopped, (re-)create it on its volume if it is gone or has stale settings. Leaves the
    /// downstream `Starting` with a monitor that makes it `Ready` or `Failed`.
    async fn launch(self: &Arc<Self>, c: &Arc<Ctr>) -> Result<(), ProvisionError> {
        let eng = &self.engine;
        let mut found = match eng.inspect_container(&c.name).await {
            Ok(i) => Some(i),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(self.engine_err(e)),
        };
        if let Some(i) = &found {
            let spec = labels_of(i).and_then(|l| l.get(SPEC)).map(String::as_str);
            if !is_running(i) && spec != Some(self.spec.as_str()) {
                tracing::info!(downstream = %c.ds.id(), "re-creating the agent-server container with the current settings (state is kept in its volume)");
                eng.remove_container(&c.name).await.map_err(|e| self.engine_err(e))?;
                found = None;
            }
        }
        let bind = c.is_bind();
        let info = match found {
            Some(i) if is_running(&i) => i,
            Some(_) => {
                if bind {
                    self.prepare_data(c).await?;
                }
                eng.start_container(&c.name).await.map_err(|e| self.engine_err(e))?;
                eng.inspect_container(&c.name).await.map_err(|e| self.engine_err(e))?
            }
            None => {
                if bind {
                    self.prepare_data(c).await?;
                } else {
                    let owner = c.manifest.lock().unwrap().owner.clone();
                    let vol_labels = labels::labels_for(&self.instance, &c.slot, owner.as_str(), &self.s.labels);
                    eng.create_volume(&c.name, vol_labels).await.map_err(|e| self.engine_err(e))?;
                }
                match eng.create_container(&c.name, self.container_body(c)).await {
                    Ok(_) => {}
                    Err(EngineError::NotFound(msg)) if msg.to_ascii_lowercase().contains("image") => {
                        return Err(self.image_missing())
                    }
                    Err(EngineError::NotFound(msg)) => {
                        // e.g. the configured network does not exist
                        return Err(ProvisionError::Config(format!(
                            "cannot create the agent-server container: {msg} (check [provisioner.docker])"
                        )));
                    }
                    // Created meanwhile by someone else with our name: use it.
                    Err(EngineError::Conflict(_)) => {}
                    Err(e) => return Err(self.engine_err(e)),
                }
                eng.start_container(&c.name).await.map_err(|e| self.engine_err(e))?;
                eng.inspect_container(&c.name).await.map_err(|e| self.engine_err(e))?
            }
        };
        let ep = self.endpoint_from_inspect(&info, c.key());
        c.expect_exit.store(false, Ordering::SeqCst);
        c.ds.set_endpoint(ep);
        c.ds.set_state(DownstreamState::Starting);
        let generation = c.bump();
        tracing::info!(downstream = %c.ds.id(), container = %c.name, "agent-server container started");
        let me = self.clone();
        let c2 = c.clone();
        tokio::spawn(async move { me.monitor_start(c2, generation).await });
        if let (Some(sync), Some(t)) = (&self.sync, self.trees(c)) {
            sync.started(&t);
        }
        Ok(())
    }

    /// Watch a starting container: `Ready` when `/alive` answers; `Failed` (with its last
    /// log lines) when it exits, disappears or does not answer within the startup timeout.
    async fn monitor_start(self: Arc<Self>, c: Arc<Ctr>, generation: u64) {
        let deadline = tokio::time::Instant::now() + self.s.startup_timeout;
        let mut round: u64 = 0;
        loop {
            if !c.is_current(generation) || c.ds.state() != DownstreamState::Starting {
                return;
            }
            if let Some(ep) = c.ds.endpoint() {
                if self.client.is_alive(&ep, Duration::from_secs(1)).await {
                    if c.is_current(generation) && c.ds.state() == DownstreamState::Starting {
                        c.ds.set_state(DownstreamState::Ready);
                        tracing::info!(downstream = %c.ds.id(), "agent-server container ready");
                    }
                    return;
                }
            }
            // Every ~0.5 s (and while it has no address yet): is it still running?
            if round.checked_rem(5) == Some(0) || c.ds.endpoint().is_none() {
                match self.engine.inspect_container(&c.name).await {
                    Ok(i) if !is_running(&i) => {
                        let st = i.state.as_ref();
                        let code = st.and_then(|s| s.exit_code).unwrap_or(-1);
                        let oom = st.and_then(|s| s.oom_killed).unwrap_or(false);
                        let why = format!(
                            "the agent-server container exited during start-up (exit code {code}{}){}",
                            if oom { ", out of memory" } else { "" },
                            self.log_tail(&c).await
                        );
                        self.fail(&c, generation, why);
                        return;
                    }
                    Ok(i) => {
                        if c.ds.endpoint().is_none() {
                            c.ds.set_endpoint(self.endpoint_from_inspect(&i, c.key()));
                        }
                    }
                    Err(e) if e.is_not_found() => {
                        self.fail(&c, generation, "the agent-server container disappeared during start-up".into());
                        return;
                    }
                    Err(e) => tracing::debug!(downstream = %c.ds.id(), "inspect during start-up failed: {e}"),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let why = format!(
                    "the agent-server did not answer /alive within {:?}{}",
                    self.s.startup_timeout,
                    self.log_tail(&c).await
                );
                self.fail(&c, generation, why);
                if c.is_current(generation) {
                    c.expect_exit.store(true, Ordering::SeqCst);
                    let _ = self.engine.stop_container(&c.name, Duration::from_secs(1)).await;
                }
                return;
            }
            round += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn fail(&self, c: &Ctr, generation: u64, why: String) {
        if c.is_current(generation) && c.ds.state() == DownstreamState::Starting {
            tracing::warn!(downstream = %c.ds.id(), "{why}");
            c.ds.set_state(DownstreamState::Failed(why.into()));
        }
    }

    /// `; last log lines: …` of the container, keys masked (empty when there are none).
    async fn log_tail(&self, c: &Ctr) -> String {
        let text = self.engine.log_tail(&c.name, 12).await;
        let (key, secret) = {
            let m = c.manifest.lock().unwrap();
            (m.key.clone(), m.secret_key.clone())
        };
        let text = text
            .replace(key.expose(), nestor_core::leak_guard::MASK)
            .replace(secret.expose(), nestor_core::leak_guard::MASK);
        let lines: Vec<&str> = text.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(6)..].join(" | ");
        if tail.is_empty() {
            String::new()
        } else {
            let cut = tail.len().saturating_sub(1500);
            let cut = (cut..tail.len()).find(|i| tail.is_char_boundary(*i)).unwrap_or(tail.len());
            format!("; last log lines: {}", &tail[cut..])
        }
    }

    /// Stop `c`'s container, keeping it and its volume (caller holds lifecycle).
    async fn stop_ctr(&self, c: &Ctr) -> Result<(), ProvisionError> {
        c.expect_exit.store(true, Ordering::SeqCst);
        c.bump();
        // Stopped first: a request arriving now waits (on the lifecycle lock) for a restart
        // instead of reaching a server that is going away. Should the engine fail to stop
        // it, the next start finds it running and simply uses it.
        c.ds.set_endpoint(None);
        c.ds.set_state(DownstreamState::Stopped);
        if let Err(e) = self.engine.stop_container(&c.name, self.s.stop_timeout).await {
            return Err(self.engine_err(e));
        }
        tracing::info!(downstream = %c.ds.id(), "agent-server container stopped");
        Ok(())
    }

    /// Remove everything of `c`: manifest first (so a crash half-way leaves only orphans the
    /// sweep removes), then container and volume or data directory. Caller holds lifecycle.
    async fn remove_ctr(&self, c: &Ctr) -> Result<(), ProvisionError> {
        self.remove_ctr_keeping(c, false).await
    }

    /// [`Self::remove_ctr`], leaving a bind-mounted conversation's data directory in place
    /// when `keep_data` (the caller pushes it first); the sweep leaves it alone meanwhile.
    async fn remove_ctr_keeping(&self, c: &Ctr, keep_data: bool) -> Result<(), ProvisionError> {
        let bind = c.is_bind();
        if bind && keep_data {
            self.releasing.insert(c.slot.key(), ());
        }
        c.expect_exit.store(true, Ordering::SeqCst);
        c.bump();
        if let Err(e) = std::fs::remove_file(&c.manifest_path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(downstream = %c.ds.id(), "cannot remove {}: {e}", c.manifest_path.display());
            }
        }
        c.ds.set_endpoint(None);
        c.ds.set_state(DownstreamState::Released);
        self.ctrs.remove(c.ds.id());
        let mut err = None;
        if let Err(e) = self.engine.remove_container(&c.name).await {
            err = Some(e);
        } else if bind {
            if !keep_data {
                self.remove_data(&c.slot);
            }
        } else if let Err(e) = self.remove_volume_retrying(&c.name).await {
            err = Some(e);
        }
        match err {
            None => Ok(()),
            Some(e) => Err(ProvisionError::Other(format!(
                "{} (container/volume {} will be removed by the next sweep)",
                e, c.name
            ))),
        }
    }

    /// Remove a bind-mounted conversation's data directory.
    fn remove_data(&self, slot: &Slot) {
        let dir = self.data_dir(slot);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), "cannot remove a conversation's data directory: {e}");
            }
        }
        self.releasing.remove(&slot.key());
    }

    /// Keep a deleted conversation's data directory whose final push failed (the only
    /// up-to-date copy) under `data/.kept/`, out of the sweep's way.
    fn keep_data(&self, slot: &Slot, why: &str) {
        let dir = self.data_dir(slot);
        let kept = self.data_root.join(".kept").join(slot.key());
        let moved = std::fs::create_dir_all(self.data_root.join(".kept")).and_then(|_| std::fs::rename(&dir, &kept));
        match moved {
            Ok(()) => tracing::warn!(dir = %kept.display(), "keeping the deleted conversation's files here: {why}"),
            Err(e) => tracing::warn!(dir = %dir.display(), "keeping the deleted conversation's files ({why}); could not move them aside: {e}"),
        }
        self.releasing.remove(&slot.key());
    }

    /// A volume can stay "in use" for a moment after its container is removed.
    async fn remove_volume_retrying(&self, name: &str) -> Result<(), EngineError> {
        let mut tries = 0;
        loop {
            match self.engine.remove_volume(name).await {
                Err(EngineError::Conflict(_)) if tries < 10 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                r => return r,
            }
        }
    }

    fn mark_active(&self, ds: &Downstream) {
        if let Ok(c) = self.ctr_of(ds) {
            let mut m = c.manifest.lock().unwrap();
            if m.phase != Phase::Active {
                m.phase = Phase::Active;
                if let Err(e) = m.save(&c.manifest_path) {
                    tracing::warn!(downstream = %ds.id(), "cannot update {}: {e}", c.manifest_path.display());
                }
            }
        }
    }

    /// Create the bookkeeping for a new slot and start its container (or return the existing one).
    async fn start_new(self: &Arc<Self>, slot: Slot, owner: UserId, phase: Phase) -> Result<Arc<Downstream>, ProvisionError> {
        let id = Self::downstream_id(&slot);
        if let Some(c) = self.ctrs.get(&id) {
            return Ok(c.ds.clone());
        }
        self.engine.connect().await.map_err(|e| self.engine_err(e))?;
        self.spawn_watcher();
        let mut m = Manifest::new(slot.conversation(), owner, phase);
        if self.sync.is_some() && slot.conversation().is_some() {
            m.mount = DataMount::Bind;
        }
        self.start_slot(slot, m).await
    }

    /// Bookkeeping for `slot` with manifest `m`, written, then its container started.
    async fn start_slot(self: &Arc<Self>, slot: Slot, m: Manifest) -> Result<Arc<Downstream>, ProvisionError> {
        let id = Self::downstream_id(&slot);
        let c = self.new_ctr(slot, m, DownstreamState::Starting);
        // Claim the slot before writing its manifest: a concurrent caller must never
        // overwrite the keys the container is created with.
        let c = match self.ctrs.entry(id.clone()) {
            dashmap::mapref::entry::Entry::Occupied(o) => return Ok(o.get().ds.clone()),
            dashmap::mapref::entry::Entry::Vacant(v) => v.insert(c).clone(),
        };
        let _g = c.lifecycle.lock().await;
        let saved = c.manifest.lock().unwrap().save(&c.manifest_path);
        if let Err(e) = saved {
            self.ctrs.remove(&id);
            c.ds.set_state(DownstreamState::Released);
            return Err(ProvisionError::Start(format!("cannot write {}: {e}", c.manifest_path.display())));
        }
        if let Err(e) = self.launch(&c).await {
            tracing::warn!(downstream = %c.ds.id(), "could not start an agent-server container: {e}");
            if let Err(e2) = self.remove_ctr(&c).await {
                tracing::warn!(downstream = %c.ds.id(), "cleanup after a failed start: {e2}");
            }
            return Err(e);
        }
        Ok(c.ds.clone())
    }

    /// Adopt what a previous nestor left: one list call, concurrent `/alive` probes.
    async fn recover(self: &Arc<Self>) -> Result<Vec<Arc<Downstream>>, ProvisionError> {
        let version = self.engine.connect().await.map_err(|e| {
            ProvisionError::Config(format!(
                "{e} (is dockerd running? set provisioner.docker.docker_host or DOCKER_HOST)"
            ))
        })?;
        tracing::info!(engine = %self.engine.host(), version = %version, instance = %self.instance, "docker provisioner connected");
        match self.engine.image_exists(&self.s.image).await {
            Ok(true) => {}
            Ok(false) => tracing::error!("{}", self.image_missing()),
            Err(e) => tracing::warn!("cannot check the image {}: {e}", self.s.image),
        }
        let listed = self
            .engine
            .list_containers(labels::instance_filter(&self.instance))
            .await
            .map_err(|e| self.engine_err(e))?;
        let by_slot: HashMap<Slot, &bollard::models::ContainerSummary> =
            listed.iter().filter_map(|c| Some((labels::slot_of(c.labels.as_ref())?, c))).collect();
        let entries = std::fs::read_dir(&self.root)
            .map_err(|e| ProvisionError::Config(format!("cannot read {}: {e}", self.root.display())))?;
        let mut probes = Vec::new();
        let mut owned = Vec::new();
        let mut stale_warm = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            let fname = e.file_name().to_string_lossy().into_owned();
            if fname.starts_with('.') || !fname.ends_with(".json") {
                continue;
            }
            let m = match Manifest::load(&path) {
                Ok(m) => m,
                Err(err) => {
                    tracing::warn!(file = %path.display(), "skipping unreadable docker manifest: {err}");
                    continue;
                }
            };
            let slot = m.warm.map(Slot::Warm).or(m.conversation_id.map(Slot::Conversation)).unwrap_or(Slot::Home);
            if path != self.manifest_path(&slot) {
                tracing::warn!(file = %path.display(), "skipping docker manifest with a foreign name");
                continue;
            }
            let id = Self::downstream_id(&slot);
            if self.ctrs.contains_key(&id) {
                continue;
            }
            if m.phase == Phase::Warm {
                // A warm pool member no pool re-adopted (recover_warm runs first).
                stale_warm.push(self.new_ctr(slot, m, DownstreamState::Stopped));
                continue;
            }
            let c = self.new_ctr(slot, m, DownstreamState::Stopped);
            if let Some(s) = by_slot.get(&slot) {
                let running = matches!(s.state, Some(bollard::models::ContainerSummaryStateEnum::RUNNING));
                if running {
                    c.ds.set_endpoint(self.endpoint_from_summary(s, c.key()));
                    probes.push(c.clone());
                }
            }
            owned.push(c.ds.clone());
            self.ctrs.insert(id, c);
        }
        for c in &stale_warm {
            tracing::info!(container = %c.name, "removing an unclaimed warm agent-server container");
            if let Err(e) = self.remove_ctr(c).await {
                tracing::warn!(container = %c.name, "{e}");
            }
        }
        let orphans = by_slot.keys().filter(|s| !self.ctrs.contains_key(&Self::downstream_id(s))).count();
        let results = futures::future::join_all(probes.iter().map(|c| async move {
            match c.ds.endpoint() {
                Some(ep) => self.client.is_alive(&ep, Duration::from_secs(2)).await,
                None => false,
            }
        }))
        .await;
        for (c, alive) in probes.iter().zip(results) {
            if let (Some(sync), Some(t)) = (&self.sync, self.trees(c)) {
                sync.started(&t);
            }
            if alive {
                c.ds.set_state(DownstreamState::Ready);
            } else {
                // Still starting (or wedged): watch it like a fresh start.
                c.ds.set_state(DownstreamState::Starting);
                let generation = c.bump();
                let me = self.clone();
                let c2 = c.clone();
                tokio::spawn(async move { me.monitor_start(c2, generation).await });
            }
        }
        self.spawn_watcher();
        let ready = owned.iter().filter(|d| d.state() == DownstreamState::Ready).count();
        tracing::info!(total = owned.len(), ready, orphans, "docker provisioner recovered its containers");
        Ok(owned)
    }

    /// Follow the engine's `die` events of this nestor's containers: a ready downstream
    /// whose container exits is marked failed at once (the next request starts it again).
    fn spawn_watcher(self: &Arc<Self>) {
        if self.watching.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                let mut filters = labels::instance_filter(&me.instance);
                filters.insert("type".into(), vec!["container".into()]);
                filters.insert("event".into(), vec!["die".into()]);
                if let Ok(stream) = me.engine.events(filters).await {
                    futures::pin_mut!(stream);
                    loop {
                        tokio::select! {
                            _ = me.cancel.cancelled() => return,
                            ev = stream.next() => match ev {
                                Some(Ok(ev)) => {
                                    backoff = Duration::from_secs(1);
                                    me.on_die(&ev);
                                }
                                Some(Err(e)) => {
                                    tracing::debug!("docker event stream ended: {e}");
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                }
                tokio::select! {
                    _ = me.cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        });
    }

    fn on_die(&self, ev: &bollard::models::EventMessage) {
        let Some(attrs) = ev.actor.as_ref().and_then(|a| a.attributes.as_ref()) else { return };
        let Some(slot) = attrs.get(CONVERSATION).and_then(|v| Slot::parse(v)) else { return };
        let Some(c) = self.ctrs.get(&Self::downstream_id(&slot)).map(|c| c.clone()) else { return };
        if c.expect_exit.load(Ordering::SeqCst) || c.ds.state() != DownstreamState::Ready {
            return;
        }
        let code = attrs.get("exitCode").map(String::as_str).unwrap_or("?");
        let why = format!("the agent-server container exited unexpectedly (exit code {code})");
        tracing::warn!(downstream = %c.ds.id(), "{why}");
        c.ds.set_endpoint(None);
        c.ds.set_state(DownstreamState::Failed(why.into()));
    }

    async fn sweep(&self, known: &(dyn Fn(&ConversationId) -> bool + Send + Sync)) -> Result<SweepReport, ProvisionError> {
        let mut report = SweepReport::default();
        let generations: HashMap<DownstreamId, u64> =
            self.ctrs.iter().map(|c| (c.ds.id().clone(), c.generation.load(Ordering::SeqCst))).collect();
        let filter = labels::instance_filter(&self.instance);
        let containers = self.engine.list_containers(filter.clone()).await.map_err(|e| self.engine_err(e))?;
        let claimed = |slot: &Slot| {
            self.ctrs.contains_key(&Self::downstream_id(slot)) || self.manifest_path(slot).exists()
        };
        // 1. Containers and volumes no manifest claims.
        let mut running: HashSet<Slot> = HashSet::new();
        for c in &containers {
            let slot = labels::slot_of(c.labels.as_ref());
            if let Some(s) = slot {
                if matches!(c.state, Some(bollard::models::ContainerSummaryStateEnum::RUNNING)) {
                    running.insert(s);
                }
                if claimed(&s) {
                    continue;
                }
            }
            let name = c
                .names
                .as_ref()
                .and_then(|n| n.first())
                .map(|n| n.trim_start_matches('/').to_owned())
                .or_else(|| c.id.clone());
            let Some(name) = name else { continue };
            match self.engine.remove_container(&name).await {
                Ok(()) => {
                    tracing::info!(container = %name, "removed orphan agent-server container");
                    report.orphan_containers.push(name);
                }
                Err(e) => tracing::warn!(container = %name, "cannot remove orphan container: {e}"),
            }
        }
        let volumes = self.engine.list_volumes(filter).await.map_err(|e| self.engine_err(e))?;
        for v in volumes {
            if labels::slot_of(Some(&v.labels)).is_some_and(|s| claimed(&s)) {
                continue;
            }
            match self.remove_volume_retrying(&v.name).await {
                Ok(()) => {
                    tracing::info!(volume = %v.name, "removed orphan agent-server volume");
                    report.orphan_volumes.push(v.name);
                }
                Err(e) => tracing::warn!(volume = %v.name, "cannot remove orphan volume: {e}"),
            }
        }
        // 2. Conversations whose create never succeeded.
        let ctrs: Vec<Arc<Ctr>> = self.ctrs.iter().map(|c| c.clone()).collect();
        for c in &ctrs {
            let Some(conv) = c.manifest.lock().unwrap().conversation_id else { continue };
            let (phase, age) = {
                let m = c.manifest.lock().unwrap();
                (m.phase, m.age_secs())
            };
            if phase != Phase::Provisioning {
                continue;
            }
            if known(&conv) {
                self.mark_active(&c.ds);
                continue;
            }
            if Duration::from_secs(age) < self.s.provisioning_grace {
                continue;
            }
            let Ok(_g) = c.lifecycle.try_lock() else { continue };
            if c.manifest.lock().unwrap().phase != Phase::Provisioning {
                continue;
            }
            tracing::info!(conversation = %conv, "removing a half-created agent-server container");
            if let Err(e) = self.remove_ctr(c).await {
                tracing::warn!(conversation = %conv, "{e}");
            }
            report.half_created.push(conv);
        }
        // 2b. Data directories no manifest claims (and none being released).
        if let Ok(entries) = std::fs::read_dir(&self.data_root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || self.releasing.contains_key(&name) {
                    continue;
                }
                let slot = match ConversationId::parse(&name) {
                    Ok(c) => Slot::Conversation(c),
                    Err(_) => match Slot::parse(&name) {
                        Some(w @ Slot::Warm(_)) => w,
                        _ => continue,
                    },
                };
                if claimed(&slot) {
                    continue;
                }
                if let Err(err) = std::fs::remove_dir_all(e.path()) {
                    tracing::warn!(dir = %e.path().display(), "cannot remove orphan data directory: {err}");
                } else {
                    tracing::info!(dir = %e.path().display(), "removed orphan conversation data directory");
                    report.orphan_data.push(e.path());
                }
            }
        }
        // 3. Ready downstreams whose container stopped behind our back (a missed event).
        for c in &ctrs {
            if c.ds.state() != DownstreamState::Ready || c.expect_exit.load(Ordering::SeqCst) {
                continue;
            }
            if generations.get(c.ds.id()) != Some(&c.generation.load(Ordering::SeqCst)) {
                continue; // (re)started since the list was taken
            }
            if !running.contains(&c.slot) {
                c.ds.set_endpoint(None);
                c.ds.set_state(DownstreamState::Failed("the agent-server container is no longer running".into()));
                report.lost.push(c.ds.id().clone());
            }
        }
        Ok(report)
    }
}

fn network_endpoint(ip: &str, key: SessionKey) -> Option<Endpoint> {
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_owned() };
    Endpoint::parse(&format!("http://{host}:{}", labels::CONTAINER_PORT), Some(key)).ok()
}

#[async_trait]
impl Provisioner for DockerProvisioner {
    fn kind(&self) -> &'static str {
        "docker"
    }

    async fn recover(&self) -> Result<Vec<Arc<Downstream>>, ProvisionError> {
        self.0.recover().await
    }

    async fn provision(&self, req: ProvisionRequest) -> Result<Arc<Downstream>, ProvisionError> {
        self.0.start_new(Slot::Conversation(req.conversation), req.owner, Phase::Provisioning).await
    }

    fn get(&self, id: &DownstreamId) -> Option<Arc<Downstream>> {
        self.0.ctrs.get(id).filter(|c| !c.is_warm()).map(|c| c.ds.clone())
    }

    fn list(&self) -> Vec<Arc<Downstream>> {
        self.0.ctrs.iter().filter(|c| !c.is_warm()).map(|c| c.ds.clone()).collect()
    }

    async fn ensure_ready(&self, ds: &Arc<Downstream>, timeout: Duration) -> Result<(), ProvisionError> {
        let inner = &self.0;
        let deadline = tokio::time::Instant::now() + timeout;
        // A failed start is not retried in a loop: one (re)start per call, then report.
        let mut restarted = false;
        loop {
            match ds.state() {
                DownstreamState::Ready => return Ok(()),
                DownstreamState::Released => return Err(NotReady::Released.into()),
                DownstreamState::Starting => {}
                DownstreamState::Failed(m) if restarted => return Err(NotReady::Failed(m).into()),
                DownstreamState::Stopped | DownstreamState::Failed(_) => {
                    let c = inner.ctr_of(ds)?;
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let Ok(_g) = tokio::time::timeout(left, c.lifecycle.lock()).await else {
                        return Err(NotReady::Timeout(timeout).into());
                    };
                    let s = ds.state();
                    if matches!(s, DownstreamState::Stopped | DownstreamState::Failed(_)) {
                        if matches!(s, DownstreamState::Failed(_)) {
                            // Start over from the volume: nothing of the failed container lingers.
                            c.expect_exit.store(true, Ordering::SeqCst);
                            c.bump();
                            inner.engine.remove_container(&c.name).await.map_err(|e| inner.engine_err(e))?;
                        }
                        tracing::info!(downstream = %ds.id(), "starting agent-server container on demand");
                        if let Err(e) = inner.launch(&c).await {
                            ds.set_state(DownstreamState::Failed(e.to_string().into()));
                            return Err(e);
                        }
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
        let c = self.0.ctr_of(ds)?;
        let _g = c.lifecycle.lock().await;
        if ds.state() == DownstreamState::Released {
            return Ok(());
        }
        self.0.stop_ctr(&c).await?;
        if let (Some(sync), Some(t)) = (&self.0.sync, self.0.trees(&c)) {
            sync.stopped(&t).await;
        }
        Ok(())
    }

    async fn release(&self, ds: &Arc<Downstream>, conversation: ConversationId, remaining: usize) -> Result<(), ProvisionError> {
        if remaining > 0 {
            return Ok(());
        }
        let c = match self.0.ctr_of(ds) {
            Ok(c) => c,
            Err(_) if ds.state() == DownstreamState::Released => return Ok(()),
            Err(e) => return Err(e),
        };
        let _g = c.lifecycle.lock().await;
        let trees = self.0.trees(&c);
        let removed = self.0.remove_ctr_keeping(&c, trees.is_some()).await;
        if let Some(t) = trees {
            // The container is gone: the trees are final.
            let pushed = match &self.0.sync {
                Some(sync) => sync.released(&t).await,
                None => Ok(()),
            };
            match pushed {
                Ok(()) => self.0.remove_data(&c.slot),
                Err(e) => self.0.keep_data(&c.slot, &e),
            }
        }
        removed?;
        tracing::info!(conversation = %conversation, "released agent-server container and its storage");
        Ok(())
    }

    async fn home(&self) -> Result<Arc<Downstream>, ProvisionError> {
        let ds = match self.0.ctrs.get(&Inner::downstream_id(&Slot::Home)) {
            Some(c) => c.ds.clone(),
            None => self.0.start_new(Slot::Home, UserId::default_user(), Phase::Active).await?,
        };
        self.ensure_ready(&ds, self.0.s.startup_timeout).await?;
        Ok(ds)
    }

    fn mark_active(&self, ds: &Downstream) {
        self.0.mark_active(ds)
    }

    fn prepare_create(&self, _ds: &Downstream, body: &mut serde_json::Map<String, serde_json::Value>) {
        let ws = body.entry("workspace").or_insert_with(|| serde_json::json!({"kind": "LocalWorkspace"}));
        if let Some(obj) = ws.as_object_mut() {
            obj.insert("working_dir".into(), serde_json::Value::String(WORKSPACE_DIR.into()));
        }
    }

    async fn shutdown(&self) {
        let inner = &self.0;
        inner.cancel.cancel();
        if inner.s.on_shutdown == OnShutdown::Keep {
            tracing::info!("leaving agent-server containers running (on_shutdown = keep); the next nestor re-adopts them");
            return;
        }
        let ctrs: Vec<Arc<Ctr>> = inner.ctrs.iter().map(|c| c.clone()).collect();
        let stops = ctrs.iter().map(|c| async move {
            let _g = c.lifecycle.lock().await;
            if matches!(c.ds.state(), DownstreamState::Ready | DownstreamState::Starting | DownstreamState::Failed(_)) {
                if let Err(e) = inner.stop_ctr(c).await {
                    tracing::warn!(downstream = %c.ds.id(), "could not stop: {e}");
                }
            }
        });
        let bound = inner.s.stop_timeout + inner.s.api_timeout + Duration::from_secs(5);
        if tokio::time::timeout(bound, futures::future::join_all(stops)).await.is_err() {
            tracing::warn!("some agent-server containers did not stop within {bound:?}");
        }
    }
}

fn env_value(name: &str, bind: bool) -> Option<String> {
    let base = BASE_ENV.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let over = if bind { BIND_STATE_ENV.iter().find(|(k, _)| *k == name).map(|(_, v)| *v) } else { None };
    over.or(base).map(str::to_owned)
}

#[async_trait]
impl crate::pool::WarmBackend for DockerProvisioner {
    async fn start_dormant(&self) -> Result<crate::pool::WarmServer, ProvisionError> {
        let inner = &self.0;
        inner.engine.connect().await.map_err(|e| inner.engine_err(e))?;
        inner.spawn_watcher();
        let wid: u64 = rand::random();
        let mut m = Manifest::new(None, UserId::default_user(), Phase::Warm);
        m.warm = Some(wid);
        if inner.sync.is_some() {
            // Claimed, it is a persisted conversation like any other: same kind of storage.
            m.mount = DataMount::Bind;
        }
        let init_key = m.secret_key.clone();
        let ds = inner.start_slot(Slot::Warm(wid), m).await?;
        Ok(crate::pool::WarmServer { ds, init_key, born: std::time::SystemTime::now() })
    }

    async fn recover_warm(&self) -> Result<Vec<crate::pool::WarmServer>, ProvisionError> {
        let inner = &self.0;
        inner.engine.connect().await.map_err(|e| {
            ProvisionError::Config(format!("{e} (is dockerd running? set provisioner.docker.docker_host or DOCKER_HOST)"))
        })?;
        let listed = inner
            .engine
            .list_containers(labels::instance_filter(&inner.instance))
            .await
            .map_err(|e| inner.engine_err(e))?;
        let by_slot: HashMap<Slot, &bollard::models::ContainerSummary> =
            listed.iter().filter_map(|c| Some((labels::slot_of(c.labels.as_ref())?, c))).collect();
        let entries = std::fs::read_dir(&inner.root)
            .map_err(|e| ProvisionError::Config(format!("cannot read {}: {e}", inner.root.display())))?;
        let mut found = Vec::new();
        for e in entries.flatten() {
            let Ok(m) = Manifest::load(&e.path()) else { continue };
            let (Phase::Warm, Some(wid)) = (m.phase, m.warm) else { continue };
            let slot = Slot::Warm(wid);
            if e.path() != inner.manifest_path(&slot) {
                continue;
            }
            let Some(summary) = by_slot.get(&slot).filter(|s| matches!(s.state, Some(bollard::models::ContainerSummaryStateEnum::RUNNING)))
            else {
                continue; // not running: recover() removes it
            };
            let (born, init_key) = (std::time::UNIX_EPOCH + Duration::from_secs(m.created_unix), m.secret_key.clone());
            let c = inner.new_ctr(slot, m, DownstreamState::Stopped);
            let Some(ep) = inner.endpoint_from_summary(summary, c.key()) else { continue };
            if !inner.client.is_alive(&ep, Duration::from_secs(2)).await {
                continue;
            }
            c.ds.set_endpoint(Some(ep));
            c.ds.set_state(DownstreamState::Ready);
            inner.ctrs.insert(c.ds.id().clone(), c.clone());
            found.push(crate::pool::WarmServer { ds: c.ds.clone(), init_key, born });
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
        let c = inner.ctr_of(&warm.ds)?;
        let _g = c.lifecycle.lock().await;
        if !c.is_warm() || c.ds.state() != DownstreamState::Ready {
            return Err(ProvisionError::Start("the warm agent-server container is no longer available".into()));
        }
        let ep = c.ds.endpoint().ok_or_else(|| ProvisionError::Start("the warm agent-server container has no address".into()))?;
        {
            let mut m = c.manifest.lock().unwrap();
            let mut claimed = m.clone();
            claimed.conversation_id = Some(req.conversation);
            claimed.owner = req.owner.clone();
            claimed.phase = Phase::Provisioning;
            claimed.key = keys.session.clone();
            claimed.secret_key = keys.secret.clone();
            // The half-created grace period counts from the claim.
            claimed.created_unix = Manifest::new(None, UserId::default_user(), Phase::Provisioning).created_unix;
            claimed
                .save(&c.manifest_path)
                .map_err(|e| ProvisionError::Start(format!("cannot write {}: {e}", c.manifest_path.display())))?;
            *m = claimed;
        }
        if !c.ds.bind(req.conversation, req.owner.clone()) {
            return Err(ProvisionError::Other("a warm agent-server container was already bound".into()));
        }
        c.ds.set_endpoint(Some(Endpoint::new(ep.scheme.clone(), ep.authority.clone(), ep.base_path.clone(), Some(keys.session.clone()))));
        c.warm.store(false, Ordering::SeqCst);
        if let (Some(sync), Some(t)) = (&inner.sync, inner.trees(&c)) {
            sync.started(&t);
        }
        Ok(c.ds.clone())
    }

    async fn discard(&self, warm: &crate::pool::WarmServer) {
        let inner = &self.0;
        let Ok(c) = inner.ctr_of(&warm.ds) else { return };
        if !c.is_warm() {
            return;
        }
        let _g = c.lifecycle.lock().await;
        if let Err(e) = inner.remove_ctr(&c).await {
            tracing::warn!(container = %c.name, "could not remove a warm agent-server container: {e}");
        }
    }

    fn init_template(&self, warm: &crate::pool::WarmServer) -> crate::pool::InitTemplate {
        let inner = &self.0;
        let bind = inner.ctr_of(&warm.ds).map(|c| c.is_bind()).unwrap_or(false);
        crate::pool::InitTemplate {
            conversations_path: env_value("OH_CONVERSATIONS_PATH", bind),
            bash_events_dir: env_value("OH_BASH_EVENTS_DIR", bind),
            withheld_env: inner
                .s
                .env
                .iter()
                .filter(|(k, _)| crate::pool::is_late_bound_env(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    fn keeps_on_shutdown(&self) -> bool {
        self.0.s.on_shutdown == OnShutdown::Keep
    }

    fn startup_timeout(&self) -> Duration {
        self.0.s.startup_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prov(cfg: DockerConfig) -> DockerProvisioner {
        let d = tempfile::tempdir().unwrap();
        DockerProvisioner::new(&cfg, d.path().join("docker"), DownstreamClient::default()).unwrap()
    }

    #[test]
    fn container_body_is_hardened() {
        let p = prov(DockerConfig {
            image: Some("img:1".into()),
            docker_host: Some("unix:///nonexistent.sock".into()),
            ..Default::default()
        });
        let conv = ConversationId::new_random();
        let m = Manifest::new(Some(conv), UserId::new("alice"), Phase::Provisioning);
        let key = m.key.clone();
        let c = p.0.new_ctr(Slot::Conversation(conv), m, DownstreamState::Starting);
        let b = p.0.container_body(&c);
        let h = b.host_config.as_ref().unwrap();
        assert_eq!(h.cap_drop.as_deref(), Some(&["ALL".to_owned()][..]));
        assert_eq!(h.cap_add, None);
        assert_eq!(h.security_opt.as_deref(), Some(&["no-new-privileges:true".to_owned()][..]));
        assert_eq!(h.memory, Some(4 << 30));
        assert_eq!(h.nano_cpus, Some(2_000_000_000));
        assert_eq!(h.pids_limit, Some(512));
        assert_eq!(h.ulimits.as_ref().unwrap()[0].name.as_deref(), Some("core"));
        assert_eq!(h.privileged, Some(false));
        assert_eq!(h.init, Some(true));
        let mounts = h.mounts.as_ref().unwrap();
        assert_eq!(mounts.len(), 1, "only the conversation's volume, never the docker socket");
        assert_eq!(mounts[0].typ, Some(MountType::VOLUME));
        assert_eq!(mounts[0].source.as_deref(), Some(c.name.as_str()));
        assert!(h.binds.is_none());
        let pb = h.port_bindings.as_ref().unwrap()["8000/tcp"].as_ref().unwrap();
        assert_eq!(pb[0].host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(b.user.as_deref(), Some("10001:10001"));
        let env = b.env.as_ref().unwrap();
        assert!(env.contains(&format!("OH_SESSION_API_KEYS_0={}", key.expose())));
        assert!(env.iter().any(|e| e.starts_with("OH_SECRET_KEY=")));
        assert!(env.contains(&"OH_WORKSPACE_PATH=/workspace/project".to_owned()));
        let l = b.labels.as_ref().unwrap();
        assert_eq!(l[labels::INSTANCE], p.instance_id());
        assert_eq!(l[labels::CONVERSATION], conv.to_string());
        assert_eq!(l[labels::OWNER], "alice");
        assert!(l.values().all(|v| !v.contains(key.expose())), "no key in a label");
        assert_eq!(l[SPEC], p.0.spec);
    }

    #[test]
    fn persisted_conversations_are_bind_mounted_with_their_state_in_one_tree() {
        let d = tempfile::tempdir().unwrap();
        let cfg = DockerConfig {
            image: Some("img:1".into()),
            docker_host: Some("unix:///nonexistent.sock".into()),
            ..Default::default()
        };
        let p = DockerProvisioner::new(&cfg, d.path().join("docker"), DownstreamClient::default())
            .unwrap()
            .with_workspace_sync(Arc::new(crate::sync::RecordingSync::default()))
            .unwrap();
        let conv = ConversationId::new_random();
        let mut m = Manifest::new(Some(conv), UserId::new("alice"), Phase::Provisioning);
        m.mount = DataMount::Bind;
        let c = p.0.new_ctr(Slot::Conversation(conv), m, DownstreamState::Starting);
        let b = p.0.container_body(&c);
        let h = b.host_config.as_ref().unwrap();
        let mounts = h.mounts.as_ref().unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].typ, Some(MountType::BIND));
        assert_eq!(mounts[0].target.as_deref(), Some("/workspace"));
        let src = PathBuf::from(mounts[0].source.as_deref().unwrap());
        assert!(src.is_absolute() && src.ends_with(format!("docker/data/{}", conv.hex())), "{src:?}");
        assert_eq!(src, p.data_dir(&conv));
        let env = b.env.as_ref().unwrap();
        assert!(env.contains(&"OH_CONVERSATIONS_PATH=/workspace/state/conversations".to_owned()), "{env:?}");
        assert!(env.contains(&"OH_PERSISTENCE_DIR=/workspace/state/persistence".to_owned()));
        assert!(env.contains(&"OH_WORKSPACE_PATH=/workspace/project".to_owned()));
        let t = p.0.trees(&c).unwrap();
        assert_eq!((t.workspace.clone(), t.state.clone()), (src.join("project"), src.join("state")));
        assert_eq!(t.owner, UserId::new("alice"));
        // A remote engine cannot bind-mount nestor's directories.
        let remote = DockerConfig { docker_host: Some("tcp://10.0.0.1:2375".into()), ..cfg };
        let e = DockerProvisioner::new(&remote, d.path().join("docker2"), DownstreamClient::default())
            .unwrap()
            .with_workspace_sync(Arc::new(crate::sync::RecordingSync::default()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("unix://"), "{e}");
        assert_eq!(parse_user("10001:10002"), Some((10001, 10002)));
        assert_eq!(parse_user("10001"), Some((10001, 10001)));
        assert_eq!(parse_user("openhands"), None);
    }

    #[test]
    fn a_warm_container_boots_dormant_with_nothing_of_a_conversation() {
        let mut env = std::collections::BTreeMap::new();
        env.insert("OH_WEBHOOKS_0_BASE_URL".to_owned(), "http://host.docker.internal:8000/nestor/webhooks".to_owned());
        env.insert("LLM_MODEL".to_owned(), "x".to_owned());
        let p = prov(DockerConfig {
            image: Some("img:1".into()),
            docker_host: Some("unix:///nonexistent.sock".into()),
            env,
            ..Default::default()
        });
        let mut m = Manifest::new(None, UserId::default_user(), Phase::Warm);
        m.warm = Some(7);
        let (boot, init) = (m.key.clone(), m.secret_key.clone());
        let c = p.0.new_ctr(Slot::Warm(7), m, DownstreamState::Starting);
        assert_eq!((c.ds.primary(), c.ds.owner()), (None, None));
        assert_eq!(c.name, format!("nestor-{}-warm-0000000000000007", p.instance_id()));
        let b = p.0.container_body(&c);
        let env = b.env.as_ref().unwrap();
        assert!(env.contains(&"OH_DEFERRED_INIT=true".to_owned()));
        assert!(env.contains(&format!("OH_SECRET_KEY={}", init.expose())), "the init key is its secret key");
        assert!(env.contains(&format!("OH_SESSION_API_KEYS_0={}", boot.expose())));
        assert!(!env.iter().any(|e| e.starts_with("SESSION_API_KEY=")));
        assert!(!env.iter().any(|e| e.starts_with("OH_WEBHOOKS_")), "webhooks are bound at claim");
        assert!(env.contains(&"LLM_MODEL=x".to_owned()));
        let l = b.labels.as_ref().unwrap();
        assert_eq!((l[labels::ROLE].as_str(), l[labels::OWNER].as_str()), (labels::ROLE_POOL, ""));
        assert_ne!(l[SPEC], p.0.spec, "a stopped dormant container is re-created, never restarted");
        // Claimed (as adopt records it), its next container is an ordinary one.
        {
            let mut m = c.manifest.lock().unwrap();
            m.phase = Phase::Active;
            m.conversation_id = Some(ConversationId::new_random());
            m.owner = UserId::new("alice");
        }
        let b = p.0.container_body(&c);
        let env = b.env.as_ref().unwrap();
        assert!(!env.contains(&"OH_DEFERRED_INIT=true".to_owned()));
        assert!(env.iter().any(|e| e.starts_with("OH_WEBHOOKS_0_BASE_URL=")));
        let l = b.labels.as_ref().unwrap();
        assert_eq!((l[labels::OWNER].as_str(), l[labels::CONVERSATION].as_str()), ("alice", "warm-0000000000000007"));
        assert_eq!(l[SPEC], p.0.spec);
    }

    #[test]
    fn user_network_publishes_nothing() {
        let p = prov(DockerConfig {
            image: Some("img:1".into()),
            network: Some("nestor-net".into()),
            docker_host: Some("unix:///nonexistent.sock".into()),
            ..Default::default()
        });
        let c = p.0.new_ctr(Slot::Home, Manifest::new(None, UserId::default_user(), Phase::Active), DownstreamState::Stopped);
        let b = p.0.container_body(&c);
        let h = b.host_config.unwrap();
        assert!(h.port_bindings.is_none());
        assert_eq!(h.network_mode.as_deref(), Some("nestor-net"));
        let ep = network_endpoint("172.20.0.3", SessionKey::new("k")).unwrap();
        assert_eq!(ep.origin(), "http://172.20.0.3:8000");
    }

    #[test]
    fn spec_changes_with_settings_but_not_with_keys() {
        let base = DockerConfig { image: Some("img:1".into()), ..Default::default() };
        let a = spec_hash(&base.validate(None).unwrap());
        assert_eq!(a, spec_hash(&base.validate(None).unwrap()));
        let mut other = base.clone();
        other.image = Some("img:2".into());
        assert_ne!(a, spec_hash(&other.validate(None).unwrap()));
        let mut other = base.clone();
        other.env.insert("X".into(), "1".into());
        assert_ne!(a, spec_hash(&other.validate(None).unwrap()));
        // Timeouts and the docker host are not container settings.
        let mut other = base;
        other.startup_timeout_secs = Some(5.0);
        other.docker_host = Some("tcp://h:1".into());
        assert_eq!(a, spec_hash(&other.validate(None).unwrap()));
    }

    #[test]
    fn prepare_create_forces_the_container_workspace() {
        let p = prov(DockerConfig { image: Some("img:1".into()), ..Default::default() });
        let ds = Downstream::new(DownstreamId::new("docker-x"), "docker", None, None, None, DownstreamState::Ready);
        let mut body = serde_json::json!({"workspace": {"kind": "LocalWorkspace", "working_dir": "/home/me/src"}})
            .as_object()
            .unwrap()
            .clone();
        p.prepare_create(&ds, &mut body);
        assert_eq!(body["workspace"]["working_dir"], "/workspace/project");
        let mut body = serde_json::Map::new();
        p.prepare_create(&ds, &mut body);
        assert_eq!(body["workspace"]["working_dir"], "/workspace/project");
    }
}
