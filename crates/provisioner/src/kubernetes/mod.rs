//! `kubernetes`: one agent-server pod per conversation.
//!
//! Per conversation, in the configured namespace (names `<instance>-<32 hex>`):
//!
//! ```text
//! Secret  session-api-key, secret-key          the conversation's record (exists from
//!                                              provisioning to release, also while no pod runs)
//! PVC     mounted at /workspace                state (or an emptyDir with storage = "emptydir")
//! Pod     the agent-server, port 8000          keys via env valueFrom.secretKeyRef
//! ```
//!
//! Host-global routes go to a shared `<instance>-home` pod built the same way.
//!
//! **Labels are the source of truth**: everything carries `app.kubernetes.io/managed-by=nestor`,
//! `nestor.dev/instance=<instance>` and `nestor.dev/conversation=<hex|home>`; the owner and the
//! create phase are annotations. nestor keeps no state of its own about pods: routing is
//! rebuilt from a label-selected list + watch of pods, and each pod's session key is read
//! back from its Secret. Two nestor replicas with the same `instance` therefore serve the
//! same conversations with no shared memory, and either may die at any time:
//! * a replica learns of pods the other creates through its pod watch;
//! * a request for a conversation it has not seen yet (the watch lags, or the pod is stopped)
//!   is resolved by [`Provisioner::find`]: one GET of the conversation's Secret (and pod);
//! * creates race safely: every create that answers 409 AlreadyExists adopts what exists.
//!
//! One exception, the warm pool (`kind = "pool"`, [`warm`]): a claimed warm pod and its PVC
//! are relabelled to their conversation in the background after the claim, so for a moment
//! (or, if the claiming replica died, until the next sweep) their labels still say warm. Its
//! **Secret is then the source of truth** (it is relabelled by the claim itself): a pod whose
//! name is a claimed Secret's is that conversation's, whatever its own labels say.
//!
//! **Reaching a pod**: `http://<podIP>:8000` (`reach = "pod-ip"`, the default; nestor runs in
//! the cluster). No Service per pod: pod IPs are what kube-proxy would route to anyway, the
//! watch tells nestor the new IP whenever a pod is re-created, and it saves an object, two
//! verbs and cluster DNS. `reach = "host-port-annotation"` is for the test node agent only.
//!
//! **Readiness is watched, not polled**: the pod's readinessProbe (`GET /alive`) is run by
//! the kubelet; nestor sees the Ready condition through its pod watch and only then routes.
//! A start that is not Ready within `startup_timeout_secs` fails with the pod's own reason
//! (`ErrImagePull: …`, `CrashLoopBackOff`) and its pod is deleted (Secret and PVC are kept,
//! so the next request starts it again).
//!
//! **Life-cycle**: `provision` creates Secret, PVC and Pod and returns `Starting`; `stop`
//! (idle policy) deletes the pod and keeps Secret and PVC; `ensure_ready` re-creates the pod;
//! `release` deletes pod, Secret and PVC. The watch is a list + watch loop of its own: on
//! `410 Gone` (expired resourceVersion) it lists again and diffs, on errors it backs off
//! (bounded) and retries; every other call is bounded by `api_timeout_secs`.
//!
//! **Workspace persistence** (`[workspace_storage]`): each pod restores and pushes its own
//! files, with nestor's binary in an init container and a sidecar ([`persistence`]); `stop`
//! then also works with `storage = "emptydir"` (the next pod restores from the bucket), and
//! `stop`/`release` ask the sidecar for a final push before deleting the pod.

mod api;
pub mod config;
pub mod objects;
pub mod persistence;
mod warm;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use futures::StreamExt;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use nestor_core::downstream::{Endpoint, NotReady};
use nestor_core::{ConversationId, Downstream, DownstreamClient, DownstreamId, DownstreamState, SessionKey, UserId};
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

pub use api::KubeError;
use api::Kube;
pub use config::{KubernetesConfig, PullPolicy, Reach, Settings, StorageMode};
pub use objects::Slot;
use objects::{CONVERSATION, HOST_PORT, OWNER, PHASE, PHASE_ACTIVE, PHASE_PROVISIONING};

use crate::sync::WorkspaceSync;
use crate::{ProvisionError, ProvisionRequest, Provisioner};
use persistence::{PodSync, SYNC_HOST_PORT};

/// Every (verb, resource) nestor uses; the start-up access check and deploy/kubernetes/rbac.yaml
/// list exactly these.
pub fn required_permissions(storage: StorageMode) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("get", "pods"),
        ("list", "pods"),
        ("watch", "pods"),
        ("create", "pods"),
        ("patch", "pods"),
        ("delete", "pods"),
        ("get", "secrets"),
        ("list", "secrets"),
        ("create", "secrets"),
        ("patch", "secrets"),
        ("delete", "secrets"),
    ];
    if storage == StorageMode::Pvc {
        v.extend([
            ("list", "persistentvolumeclaims"),
            ("create", "persistentvolumeclaims"),
            ("patch", "persistentvolumeclaims"),
            ("delete", "persistentvolumeclaims"),
        ]);
    }
    v
}

/// What nestor last saw of a pod (from the list or the watch).
#[derive(Debug, Clone, PartialEq)]
struct PodView {
    uid: String,
    slot: Option<Slot>,
    ready: bool,
    ip: Option<String>,
    host_port: Option<u16>,
    /// The sync sidecar's published port (test node agent, `reach = "host-port-annotation"`).
    sync_port: Option<u16>,
    deleting: bool,
    /// `Failed` / `Succeeded`: the pod is over and must be re-created.
    terminal: bool,
    /// Why it is not ready, in the kubelet's words (`ErrImagePull: …`).
    problem: Option<String>,
    created: Option<Instant>,
}

impl PodView {
    fn of(p: &Pod) -> Self {
        let meta = &p.metadata;
        let status = p.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let phase = status.and_then(|s| s.phase.clone()).unwrap_or_default();
        let mut problem = None;
        // An init container that failed (the restore) explains why nothing else runs.
        for cs in status.and_then(|s| s.init_container_statuses.as_ref()).into_iter().flatten() {
            let st = cs.state.as_ref();
            if let Some(t) = st.and_then(|s| s.terminated.as_ref()).filter(|t| t.exit_code != 0) {
                problem = Some(format!("init container {} exited with code {}: {}", cs.name, t.exit_code, t.message.clone().unwrap_or_default()));
            } else if let Some(w) = st.and_then(|s| s.waiting.as_ref()) {
                let last = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref());
                if let Some(t) = last.filter(|t| t.exit_code != 0) {
                    problem = Some(format!(
                        "init container {} failed (exit code {}, {}): {}",
                        cs.name,
                        t.exit_code,
                        w.reason.clone().unwrap_or_default(),
                        t.message.clone().unwrap_or_default()
                    ));
                }
            }
        }
        for cs in status.and_then(|s| s.container_statuses.as_ref()).into_iter().flatten() {
            if problem.is_some() {
                break;
            }
            let st = cs.state.as_ref();
            if let Some(w) = st.and_then(|s| s.waiting.as_ref()) {
                let reason = w.reason.clone().unwrap_or_default();
                if !reason.is_empty() && reason != "ContainerCreating" && reason != "PodInitializing" {
                    problem = Some(format!("{reason}: {}", w.message.clone().unwrap_or_default()).trim_end_matches(": ").to_owned());
                }
            } else if let Some(t) = st.and_then(|s| s.terminated.as_ref()) {
                problem = Some(format!(
                    "container exited with code {}{}",
                    t.exit_code,
                    t.reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()
                ));
            } else if let Some(t) = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
                if cs.restart_count > 0 {
                    problem = Some(format!("container restarted {} times, last exit code {}", cs.restart_count, t.exit_code));
                }
            }
        }
        if problem.is_none() {
            if let Some(c) = status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled" && c.status == "False"))
            {
                problem = Some(format!("unschedulable: {}", c.message.clone().unwrap_or_default()));
            }
        }
        PodView {
            uid: meta.uid.clone().unwrap_or_default(),
            slot: meta.labels.as_ref().and_then(|l| l.get(CONVERSATION)).and_then(|v| Slot::from_label(v)),
            ready,
            ip: status.and_then(|s| s.pod_ip.clone()).filter(|s| !s.is_empty()),
            host_port: meta.annotations.as_ref().and_then(|a| a.get(HOST_PORT)).and_then(|v| v.parse().ok()),
            sync_port: meta.annotations.as_ref().and_then(|a| a.get(SYNC_HOST_PORT)).and_then(|v| v.parse().ok()),
            deleting: meta.deletion_timestamp.is_some(),
            terminal: phase == "Failed" || phase == "Succeeded",
            problem,
            created: Some(Instant::now()),
        }
    }
}

/// One conversation's objects and bookkeeping.
struct Conv {
    ds: Arc<Downstream>,
    slot: Slot,
    name: String,
    key: SessionKey,
    /// Serialises start/stop/release of this conversation in this replica.
    lifecycle: Mutex<()>,
    /// Bumped on every start; a start monitor of an older start does nothing.
    generation: AtomicU64,
    /// Set when a start of ours failed (cleared by the next start).
    failed: std::sync::Mutex<Option<Arc<str>>>,
    released: AtomicBool,
    /// The pod as last seen (None: no pod). Waiters use it to see a pod go away.
    pod: watch::Sender<Option<PodView>>,
    /// The sync sidecar's last answer (workspace persistence), shown while no pod runs.
    sync_status: std::sync::Mutex<Option<serde_json::Value>>,
    /// Its pods persist their files (its Secret says `nestor.dev/persisted`, set when it was
    /// created with persistence on). A conversation created before keeps its layout and its
    /// PVC for life: turning persistence on must not hide its state.
    persisted: AtomicBool,
}

/// The `kubernetes` backend. Cheap to clone (all state is shared).
#[derive(Clone)]
pub struct KubernetesProvisioner(Arc<Inner>);

struct Inner {
    s: Settings,
    kube: Kube,
    pods: Api<Pod>,
    secrets: Api<Secret>,
    pvcs: Api<PersistentVolumeClaim>,
    convs: DashMap<DownstreamId, Arc<Conv>>,
    /// Names released by this replica recently: late watch events must not adopt them again.
    tombstones: DashMap<String, Instant>,
    /// Pod names being adopted (their Secret is being read).
    adopting: DashMap<String, ()>,
    cancel: CancellationToken,
    watching: AtomicBool,
    /// Whether the pod watch currently works (for status and tests).
    watch_ok: AtomicBool,
    /// Lists done by the watch loop (initial + after 410/errors); for tests.
    relists: AtomicU64,
    /// Workspace persistence (set once, before the first pod is made).
    sync: std::sync::OnceLock<Arc<KubeSync>>,
    /// Warm (dormant, unclaimed) pods this replica knows, by name (kind = "pool"; warm.rs).
    warm: DashMap<String, Arc<warm::WarmPod>>,
    /// Wrapped by a pool: warm objects are the pool's, not leftovers to remove.
    warm_mode: AtomicBool,
    /// Conversations claimed from the warm pool, by their objects' (warm) name: their pod may
    /// still carry the warm labels (relabelled in the background; warm.rs), so the watch
    /// routes such a pod by name, from what the Secret (the claim) says.
    claimed_names: DashMap<String, Slot>,
    /// Tests only: claims leave pod and PVC labels as they were (a replica that died between
    /// the claim and the relabel).
    relabel_paused: AtomicBool,
}

/// Workspace persistence of this backend: the pods' sync containers, and nestor's side.
struct KubeSync {
    pod: PodSync,
    hooks: Arc<dyn WorkspaceSync>,
    client: DownstreamClient,
}

impl KubernetesProvisioner {
    /// Connect (no API call yet: [`Provisioner::recover`] makes the first, and fails clearly
    /// when the API server is unreachable).
    pub async fn new(cfg: &KubernetesConfig) -> Result<Self, ProvisionError> {
        let s = cfg.validate()?;
        let kc = match &s.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    ProvisionError::Config(format!("cannot read provisioner.kubernetes.kubeconfig {}: {e}", path.display()))
                })?;
                let opts = kube::config::KubeConfigOptions { context: s.context.clone(), ..Default::default() };
                kube::Config::from_custom_kubeconfig(kc, &opts)
                    .await
                    .map_err(|e| ProvisionError::Config(format!("kubeconfig {}: {e}", path.display())))?
            }
            None if s.context.is_some() => {
                let opts = kube::config::KubeConfigOptions { context: s.context.clone(), ..Default::default() };
                kube::Config::from_kubeconfig(&opts).await.map_err(|e| ProvisionError::Config(format!("kubeconfig: {e}")))?
            }
            None => kube::Config::infer().await.map_err(|e| {
                ProvisionError::Config(format!(
                    "no Kubernetes configuration found ({e}); set provisioner.kubernetes.kubeconfig or run nestor in a pod with a service account"
                ))
            })?,
        };
        Self::with_config(s, kc)
    }

    /// Build from an explicit client configuration (tests).
    pub fn with_config(s: Settings, mut kc: kube::Config) -> Result<Self, ProvisionError> {
        install_crypto_provider();
        kc.connect_timeout = Some(s.api_timeout);
        // Calls are bounded one by one (and the watch by its own idle bound).
        kc.read_timeout = None;
        let ns = s.namespace.clone().unwrap_or_else(|| kc.default_namespace.clone());
        let server = kc.cluster_url.to_string();
        let client = kube::Client::try_from(kc).map_err(|e| ProvisionError::Config(format!("Kubernetes client: {e}")))?;
        Ok(Self::with_client(s, client, ns, server))
    }

    /// Build over any client (tests use a mock service).
    pub fn with_client(s: Settings, client: kube::Client, ns: String, server: String) -> Self {
        let kube = Kube { client: client.clone(), ns: ns.clone(), server, timeout: s.api_timeout };
        Self(Arc::new(Inner {
            pods: Api::namespaced(client.clone(), &ns),
            secrets: Api::namespaced(client.clone(), &ns),
            pvcs: Api::namespaced(client, &ns),
            s,
            kube,
            convs: DashMap::new(),
            tombstones: DashMap::new(),
            adopting: DashMap::new(),
            cancel: CancellationToken::new(),
            watching: AtomicBool::new(false),
            watch_ok: AtomicBool::new(false),
            relists: AtomicU64::new(0),
            sync: std::sync::OnceLock::new(),
            warm: DashMap::new(),
            warm_mode: AtomicBool::new(false),
            claimed_names: DashMap::new(),
            relabel_paused: AtomicBool::new(false),
        }))
    }

    /// Workspace persistence (`[workspace_storage]`): every pod made from now on restores and
    /// pushes its files itself ([`persistence`]); `hooks` purges stored copies on delete.
    pub fn with_workspace_sync(
        self,
        storage: &nestor_workspace_store::WorkspaceStorageConfig,
        hooks: Arc<dyn WorkspaceSync>,
    ) -> Result<Self, ProvisionError> {
        let pod = self.0.s.workspace_sync.validate(&self.0.s, storage)?;
        if pod.credentials.is_empty() && pod.credentials_secret.is_none() {
            tracing::info!("workspace sync: no storage credentials of nestor's own and no credentials_secret; the sync containers use the pods' identity (service_account_name)");
        }
        let ks = KubeSync { pod, hooks, client: DownstreamClient::new(Duration::from_secs(5)) };
        if self.0.sync.set(Arc::new(ks)).is_err() {
            return Err(ProvisionError::Config("workspace sync configured twice".into()));
        }
        Ok(self)
    }

    /// Whether the pods persist their files (`[workspace_storage]`).
    pub fn persists(&self) -> bool {
        self.0.sync.get().is_some()
    }

    pub fn namespace(&self) -> &str {
        &self.0.kube.ns
    }

    pub fn settings(&self) -> &Settings {
        &self.0.s
    }

    /// Pod/Secret/PVC name of a conversation.
    pub fn object_name(&self, conversation: &ConversationId) -> String {
        Slot::Conversation(*conversation).object_name(&self.0.s.instance)
    }

    /// Tests only: `true` makes warm claims skip the background relabel of pod and PVC (as if
    /// the replica died right after the claim), `false` restores it for later claims.
    #[doc(hidden)]
    pub fn pause_relabel_for_tests(&self, paused: bool) {
        self.0.relabel_paused.store(paused, Ordering::SeqCst);
    }

    /// Whether the pod watch is currently established.
    pub fn watch_healthy(&self) -> bool {
        self.0.watch_ok.load(Ordering::SeqCst)
    }

    /// How many times the watch loop listed pods (1 after start; +1 per 410 or error).
    pub fn relists(&self) -> u64 {
        self.0.relists.load(Ordering::SeqCst)
    }

    /// Check, with SelfSubjectAccessReviews, that nestor may do everything it does. Returns
    /// the missing `(verb, resource)` pairs.
    pub async fn missing_permissions(&self) -> Result<Vec<(&'static str, &'static str)>, ProvisionError> {
        let inner = &self.0;
        let api: Api<SelfSubjectAccessReview> = Api::all(inner.kube.client.clone());
        let checks = required_permissions(inner.s.storage).into_iter().map(|(verb, resource)| {
            let api = api.clone();
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        namespace: Some(inner.kube.ns.clone()),
                        verb: Some(verb.into()),
                        resource: Some(resource.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            async move {
                let r = inner
                    .kube
                    .call("create", "selfsubjectaccessreviews", async move { api.create(&PostParams::default(), &review).await })
                    .await?;
                Ok::<_, KubeError>((verb, resource, r.status.map(|s| s.allowed).unwrap_or(false)))
            }
        });
        let mut missing = Vec::new();
        for r in futures::future::join_all(checks).await {
            let (verb, resource, allowed) = r?;
            if !allowed {
                missing.push((verb, resource));
            }
        }
        Ok(missing)
    }
}

/// Pick rustls' ring provider for kube's TLS unless the process already chose one (with two
/// providers compiled in, rustls would otherwise refuse to guess and panic).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Secret annotation: the conversation was created with workspace persistence on.
const PERSISTED: &str = "nestor.dev/persisted";

fn persisted(secret: &Secret) -> bool {
    secret.metadata.annotations.as_ref().and_then(|a| a.get(PERSISTED)).is_some_and(|v| v == "true")
}

fn downstream_id(slot: &Slot) -> DownstreamId {
    match slot {
        Slot::Conversation(c) => DownstreamId::new(format!("kubernetes-{}", c.hex())),
        Slot::Home => DownstreamId::new("kubernetes-home"),
    }
}

impl Inner {
    fn conv_of(&self, ds: &Downstream) -> Result<Arc<Conv>, ProvisionError> {
        self.convs.get(ds.id()).map(|c| c.clone()).ok_or_else(|| ProvisionError::UnknownDownstream(ds.id().clone()))
    }

    fn name(&self, slot: &Slot) -> String {
        slot.object_name(&self.s.instance)
    }

    /// Insert (or return the existing) bookkeeping for `slot`, whose objects are called
    /// `name` (the slot's own name, or the warm server's it was claimed from).
    fn insert_conv(&self, slot: Slot, key: SessionKey, owner: UserId, pod: Option<PodView>, name: String) -> Arc<Conv> {
        let id = downstream_id(&slot);
        let c = self
            .convs
            .entry(id.clone())
            .or_insert_with(|| {
                let ds = Downstream::new(id, "kubernetes", slot.conversation(), Some(owner), None, DownstreamState::Stopped);
                Arc::new(Conv {
                    ds,
                    slot,
                    name,
                    key,
                    lifecycle: Mutex::new(()),
                    generation: AtomicU64::new(0),
                    failed: std::sync::Mutex::new(None),
                    released: AtomicBool::new(false),
                    pod: watch::Sender::new(None),
                    sync_status: std::sync::Mutex::new(None),
                    persisted: AtomicBool::new(false),
                })
            })
            .clone();
        if c.name != self.name(&c.slot) {
            // Claimed from the warm pool: its pod may still be labelled warm.
            self.claimed_names.insert(c.name.clone(), c.slot);
            self.warm_taken(&c.name);
        }
        if pod.is_some() {
            c.pod.send_replace(pod);
        }
        self.sync_state(&c);
        c
    }

    /// The conversation a pod serves: its label, else (a claimed warm pod whose labels lag)
    /// the claim recorded in its Secret, known here by name.
    fn slot_of(&self, p: &Pod) -> Option<Slot> {
        let by_label = p.metadata.labels.as_ref().and_then(|l| l.get(CONVERSATION)).and_then(|v| Slot::from_label(v));
        by_label.or_else(|| self.claimed_names.get(p.metadata.name.as_deref()?).map(|s| *s))
    }

    /// Where nestor reaches a pod (None until it has an address).
    fn endpoint_of(&self, c: &Conv, v: &PodView) -> Option<Endpoint> {
        self.pod_endpoint(v, Some(c.key.clone()))
    }

    /// Where nestor reaches a pod, with `key` as its session key.
    fn pod_endpoint(&self, v: &PodView, key: Option<SessionKey>) -> Option<Endpoint> {
        let ip = v.ip.as_deref()?;
        let port = match self.s.reach {
            Reach::PodIp => self.s.port,
            Reach::HostPortAnnotation => v.host_port?,
        };
        let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_owned() };
        Endpoint::parse(&format!("http://{host}:{port}"), key).ok()
    }

    /// Derive the downstream's state from what was observed.
    fn sync_state(&self, c: &Conv) {
        if c.released.load(Ordering::SeqCst) {
            c.ds.set_endpoint(None);
            c.ds.set_state(DownstreamState::Released);
            return;
        }
        let failed = c.failed.lock().unwrap().clone();
        let view = c.pod.borrow().clone();
        let (state, ep) = match view {
            None => (failed.map(DownstreamState::Failed).unwrap_or(DownstreamState::Stopped), None),
            Some(v) if v.deleting => (failed.map(DownstreamState::Failed).unwrap_or(DownstreamState::Stopped), None),
            Some(v) if v.terminal => {
                let why = failed.unwrap_or_else(|| {
                    format!("the agent-server pod ended{}", v.problem.as_ref().map(|p| format!(": {p}")).unwrap_or_default()).into()
                });
                (DownstreamState::Failed(why), None)
            }
            Some(v) => match (v.ready, self.endpoint_of(c, &v)) {
                (true, Some(ep)) => {
                    *c.failed.lock().unwrap() = None;
                    (DownstreamState::Ready, Some(ep))
                }
                _ => (failed.map(DownstreamState::Failed).unwrap_or(DownstreamState::Starting), None),
            },
        };
        if state == DownstreamState::Ready {
            c.ds.set_endpoint(ep);
        } else {
            c.ds.set_endpoint(None);
        }
        if c.ds.state() != state {
            tracing::info!(downstream = %c.ds.id(), pod = %c.name, state = state.as_str(), "agent-server pod state");
        }
        c.ds.set_state(state);
    }

    // ------------------------------------------------------------------ watch

    /// Record a pod seen by the list or the watch.
    fn observe(self: &Arc<Self>, p: &Pod) {
        let Some(name) = p.metadata.name.clone() else { return };
        let mut v = PodView::of(p);
        if warm::is_warm(&p.metadata) {
            match self.claimed_names.get(&name).map(|s| *s) {
                // Claimed (its Secret says so), relabel pending: the conversation's pod.
                Some(slot) => v.slot = Some(slot),
                None => {
                    self.observe_warm(&name, Some(v));
                    return;
                }
            }
        } else if self.warm.contains_key(&name) {
            // Relabelled by the replica that claimed it.
            self.warm_taken(&name);
        }
        let Some(slot) = v.slot else { return };
        match self.convs.get(&downstream_id(&slot)).map(|c| c.clone()) {
            Some(c) => {
                let prev = c.pod.borrow().clone();
                // Keep the first-seen instant across updates of the same pod.
                let mut v = v;
                if let Some(p) = prev.as_ref().filter(|p| p.uid == v.uid) {
                    v.created = p.created;
                }
                c.pod.send_replace(Some(v));
                self.sync_state(&c);
            }
            None => {
                if v.deleting || self.tombstones.contains_key(&name) {
                    return;
                }
                self.spawn_adopt(slot);
            }
        }
    }

    /// A pod is gone (deleted event, or missing from a re-list).
    fn observe_gone(self: &Arc<Self>, slot: Slot, uid: Option<&str>) {
        let Some(c) = self.convs.get(&downstream_id(&slot)).map(|c| c.clone()) else { return };
        let same = c.pod.borrow().as_ref().is_some_and(|v| uid.is_none_or(|u| u == v.uid));
        if !same {
            return;
        }
        c.pod.send_replace(None);
        self.sync_state(&c);
        if c.released.load(Ordering::SeqCst) {
            return;
        }
        // Deleted by another replica's release? Then its Secret is gone too.
        let me = self.clone();
        tokio::spawn(async move {
            let secrets = me.secrets.clone();
            let name = c.name.clone();
            match me.kube.call("get", "secrets", async move { secrets.get_opt(&name).await }).await {
                Ok(None) => me.forget(&c, "its objects were deleted"),
                Ok(Some(s)) if s.metadata.deletion_timestamp.is_some() => me.forget(&c, "its objects were deleted"),
                _ => {}
            }
        });
    }

    /// This conversation no longer exists (another replica released it).
    fn forget(&self, c: &Conv, why: &str) {
        if c.pod.borrow().is_some() {
            return;
        }
        tracing::info!(downstream = %c.ds.id(), "forgetting agent-server pod: {why}");
        c.released.store(true, Ordering::SeqCst);
        self.sync_state(c);
        self.convs.remove(c.ds.id());
        self.claimed_names.remove(&c.name);
    }

    /// A pod of a conversation this replica does not know: read its Secret, then route it.
    fn spawn_adopt(self: &Arc<Self>, slot: Slot) {
        let name = self.name(&slot);
        if self.adopting.insert(name.clone(), ()).is_some() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.adopt(slot).await {
                tracing::warn!(pod = %name, "could not adopt agent-server pod: {e}");
            }
            me.adopting.remove(&name);
        });
    }

    /// Load a conversation from its Secret (and pod). None if it has no Secret.
    async fn adopt(self: &Arc<Self>, slot: Slot) -> Result<Option<Arc<Conv>>, KubeError> {
        if let Some(c) = self.convs.get(&downstream_id(&slot)) {
            return Ok(Some(c.clone()));
        }
        let Some(secret) = self.find_secret(&slot).await? else {
            return Ok(None);
        };
        let name = secret.metadata.name.clone().unwrap_or_else(|| self.name(&slot));
        if secret.metadata.deletion_timestamp.is_some() {
            return Ok(None);
        }
        let Some((key, _)) = objects::keys_of(&secret) else {
            tracing::warn!(secret = %name, "labelled Secret without nestor's keys; ignoring it");
            return Ok(None);
        };
        let owner = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(OWNER))
            .map(|o| UserId::new(o.as_str()))
            .unwrap_or_else(UserId::default_user);
        let pods = self.pods.clone();
        let n = name.clone();
        let pod = self.kube.call("get", "pods", async move { pods.get_opt(&n).await }).await?;
        let c = self.insert_conv(slot, key, owner, pod.as_ref().map(PodView::of), name);
        c.persisted.store(persisted(&secret), Ordering::SeqCst);
        tracing::info!(downstream = %c.ds.id(), state = c.ds.state().as_str(), "adopted agent-server pod");
        Ok(Some(c))
    }

    /// List pods by label and reconcile: returns the list's resourceVersion.
    async fn relist(self: &Arc<Self>) -> Result<String, KubeError> {
        self.relists.fetch_add(1, Ordering::SeqCst);
        let pods = self.pods.clone();
        let lp = ListParams::default().labels(&objects::selector(&self.s.instance));
        let list = self.kube.call("list", "pods", async move { pods.list(&lp).await }).await?;
        let mut present: HashSet<Slot> = HashSet::new();
        self.relisted_warm(&list.items);
        for p in &list.items {
            if let Some(slot) = self.slot_of(p) {
                present.insert(slot);
            }
            self.observe(p);
        }
        let gone: Vec<Slot> = self
            .convs
            .iter()
            .filter(|c| c.pod.borrow().is_some() && !present.contains(&c.slot))
            .map(|c| c.slot)
            .collect();
        for slot in gone {
            self.observe_gone(slot, None);
        }
        Ok(list.metadata.resource_version.unwrap_or_default())
    }

    /// The pod watch: list, then watch from the list's version; 410 Gone -> list again;
    /// other failures -> back off (1 s doubling to 30 s) and list again. Ends on shutdown.
    async fn watch_loop(self: Arc<Self>, mut rv: Option<String>) {
        let mut backoff = Duration::from_secs(1);
        let mut last_sweep = Instant::now();
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let version = match rv.take() {
                Some(v) => v,
                None => match self.relist().await {
                    Ok(v) => v,
                    Err(e) => {
                        self.watch_ok.store(false, Ordering::SeqCst);
                        tracing::warn!("listing agent-server pods failed (retrying in {backoff:?}): {e}");
                        tokio::select! {
                            _ = self.cancel.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                },
            };
            match self.watch_from(&version).await {
                WatchEnd::Expired(v) => {
                    // The server closed the watch normally: continue from the last version.
                    rv = v;
                    backoff = Duration::from_secs(1);
                }
                WatchEnd::Gone => {
                    tracing::info!("pod watch expired (410 Gone); listing again");
                    backoff = Duration::from_secs(1);
                }
                WatchEnd::Failed(e) => {
                    self.watch_ok.store(false, Ordering::SeqCst);
                    tracing::warn!("pod watch failed (listing again in {backoff:?}): {e}");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                WatchEnd::Cancelled => return,
            }
            if last_sweep.elapsed() >= Duration::from_secs(300) {
                last_sweep = Instant::now();
                if let Err(e) = self.sweep().await {
                    tracing::warn!("kubernetes sweep failed: {e}");
                }
            }
            self.tombstones.retain(|_, t| t.elapsed() < Duration::from_secs(600));
            self.claimed_names.retain(|_, slot| self.convs.contains_key(&downstream_id(slot)));
        }
    }

    async fn watch_from(self: &Arc<Self>, version: &str) -> WatchEnd {
        const WATCH_SECS: u32 = 290;
        let wp = WatchParams::default().labels(&objects::selector(&self.s.instance)).timeout(WATCH_SECS);
        let pods = self.pods.clone();
        let v = version.to_owned();
        let stream = match self.kube.call("watch", "pods", async move { pods.watch(&wp, &v).await }).await {
            Ok(s) => s,
            Err(e) if e.is_gone() => return WatchEnd::Gone,
            Err(e) => return WatchEnd::Failed(e.to_string()),
        };
        self.watch_ok.store(true, Ordering::SeqCst);
        let mut stream = std::pin::pin!(stream);
        let mut last = Some(version.to_owned());
        // The server ends the watch after WATCH_SECS; no event at all for longer is a dead
        // connection.
        let idle = Duration::from_secs(WATCH_SECS as u64 + 30);
        loop {
            let next = tokio::select! {
                _ = self.cancel.cancelled() => return WatchEnd::Cancelled,
                n = tokio::time::timeout(idle, stream.next()) => n,
            };
            let ev = match next {
                Err(_) => return WatchEnd::Failed("no event within the watch's own timeout".into()),
                Ok(None) => return WatchEnd::Expired(last),
                Ok(Some(Err(e))) => {
                    let e = self.kube.classify("watch", "pods", e);
                    return if e.is_gone() { WatchEnd::Gone } else { WatchEnd::Failed(e.to_string()) };
                }
                Ok(Some(Ok(ev))) => ev,
            };
            match ev {
                WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                    last = p.metadata.resource_version.clone().or(last);
                    self.observe(&p);
                }
                WatchEvent::Deleted(p) => {
                    last = p.metadata.resource_version.clone().or(last);
                    if let Some(slot) = self.slot_of(&p) {
                        self.observe_gone(slot, p.metadata.uid.as_deref());
                    } else if let Some(name) = p.metadata.name.as_deref().filter(|_| warm::is_warm(&p.metadata)) {
                        self.observe_warm(name, None);
                    }
                }
                WatchEvent::Bookmark(b) => last = Some(b.metadata.resource_version),
                WatchEvent::Error(s) if s.code == 410 => return WatchEnd::Gone,
                WatchEvent::Error(s) => return WatchEnd::Failed(format!("{} {}: {}", s.code, s.reason, s.message)),
            }
        }
    }

    fn spawn_watch(self: &Arc<Self>, rv: Option<String>) {
        if self.watching.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        tokio::spawn(me.watch_loop(rv));
    }

    // ------------------------------------------------------------------ objects

    /// Create the Secret (or read back the existing one's keys). Also whether the
    /// conversation's pods persist their files.
    async fn ensure_secret(&self, slot: &Slot, owner: &UserId) -> Result<(SessionKey, bool), KubeError> {
        let mut secret = objects::secret(&self.s, slot, &self.kube.ns, owner, &SessionKey::random(), &SessionKey::random());
        let persist = self.sync.get().is_some() && matches!(slot, Slot::Conversation(_));
        if persist {
            secret.metadata.annotations.get_or_insert_with(Default::default).insert(PERSISTED.into(), "true".into());
        }
        let api = self.secrets.clone();
        let body = secret.clone();
        match self.kube.call("create", "secrets", async move { api.create(&PostParams::default(), &body).await }).await {
            Ok(_) => Ok((objects::keys_of(&secret).expect("fresh secret has keys").0, persist)),
            Err(e) if e.is_conflict() => {
                // Another replica (or an earlier try) made it: use its keys.
                let api = self.secrets.clone();
                let name = self.name(slot);
                let existing = self.kube.call("get", "secrets", async move { api.get(&name).await }).await?;
                objects::keys_of(&existing).map(|k| (k.0, persisted(&existing))).ok_or_else(|| KubeError::Other {
                    verb: "read",
                    resource: "secrets",
                    detail: format!("Secret {} exists but lacks nestor's keys", self.name(slot)),
                })
            }
            Err(e) => Err(e),
        }
    }

    async fn ensure_pvc(&self, slot: &Slot, owner: &UserId) -> Result<(), KubeError> {
        if self.s.storage != StorageMode::Pvc {
            return Ok(());
        }
        let api = self.pvcs.clone();
        let body = objects::pvc(&self.s, slot, &self.kube.ns, owner);
        match self.kube.call("create", "persistentvolumeclaims", async move { api.create(&PostParams::default(), &body).await }).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_conflict() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Create the pod (409: it exists, someone else started it). Caller holds lifecycle.
    async fn create_pod(self: &Arc<Self>, c: &Arc<Conv>) -> Result<(), ProvisionError> {
        let owner = c.ds.owner().cloned().unwrap_or_else(UserId::default_user);
        let mut body = objects::pod(&self.s, &c.slot, &self.kube.ns, &owner);
        // A conversation claimed from the warm pool keeps its warm server's object names.
        warm::retarget(&mut body, &self.name(&c.slot), &c.name);
        if let (Some(sync), Slot::Conversation(conversation), true) = (self.sync.get(), c.slot, c.persisted.load(Ordering::SeqCst)) {
            self.store_sync_credentials(&c.name, &sync.pod).await?;
            sync.pod.decorate(&self.s, &mut body, &c.name, conversation, &owner);
        } else if c.persisted.load(Ordering::SeqCst) {
            tracing::warn!(pod = %c.name, "workspace persistence is off now; this conversation's files are no longer pushed");
            persistence::state_layout(&mut body);
        }
        let api = self.pods.clone();
        match self.kube.call("create", "pods", async move { api.create(&PostParams::default(), &body).await }).await {
            Ok(p) => {
                // Seen now, not only when the watch delivers it.
                if c.pod.borrow().as_ref().is_none_or(|v| v.uid != p.metadata.uid.clone().unwrap_or_default()) {
                    c.pod.send_replace(Some(PodView::of(&p)));
                }
                tracing::info!(downstream = %c.ds.id(), pod = %c.name, "agent-server pod created");
            }
            Err(e) if e.is_conflict() => {
                tracing::info!(downstream = %c.ds.id(), pod = %c.name, "agent-server pod exists already; using it");
            }
            Err(e) => return Err(e.into()),
        }
        *c.failed.lock().unwrap() = None;
        self.sync_state(c);
        let generation = c.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let me = self.clone();
        let c2 = c.clone();
        tokio::spawn(async move { me.monitor_start(c2, generation).await });
        Ok(())
    }

    /// Copy nestor's storage credentials into the conversation's Secret (the sync containers
    /// reference them), before each pod is made: a Secret made before persistence was on, or
    /// by a replica with other credentials, gets the current ones.
    async fn store_sync_credentials(&self, name: &str, sync: &PodSync) -> Result<(), KubeError> {
        let data = sync.secret_data();
        if data.is_empty() {
            return Ok(());
        }
        let api = self.secrets.clone();
        let n = name.to_owned();
        let patch = serde_json::json!({ "data": data });
        self.kube
            .call("patch", "secrets", async move { api.patch(&n, &PatchParams::default(), &Patch::Merge(&patch)).await })
            .await
            .map(|_| ())
    }

    /// Workspace persistence of `c`'s pods (None: off, or `c` predates it).
    fn sync_of(&self, c: &Conv) -> Option<Arc<KubeSync>> {
        self.sync.get().filter(|_| c.persisted.load(Ordering::SeqCst)).cloned()
    }

    /// The pod's sync sidecar (None: no persistence, or no pod with an address).
    fn sync_endpoint(&self, c: &Conv) -> Option<(Arc<KubeSync>, Endpoint)> {
        let sync = self.sync_of(c)?;
        let v = c.pod.borrow().clone()?;
        if v.deleting || v.terminal {
            return None;
        }
        let ip = v.ip.as_deref()?;
        let port = match self.s.reach {
            Reach::PodIp => sync.pod.port,
            Reach::HostPortAnnotation => v.sync_port?,
        };
        let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_owned() };
        let ep = Endpoint::parse(&format!("http://{host}:{port}"), Some(c.key.clone())).ok()?;
        Some((sync, ep))
    }

    /// The final push before a pod is deleted (stop, delete with keep): the sidecar pushes
    /// now, bounded by `final_push_secs`. A pod that is not running has nothing newer than
    /// what its sidecar pushed when it ended. Err: the pod must stay (it holds the only
    /// up-to-date copy).
    async fn final_push(&self, c: &Conv) -> Result<(), ProvisionError> {
        let Some(sync) = self.sync_of(c) else { return Ok(()) };
        let running = c.pod.borrow().as_ref().is_some_and(|v| v.ready && !v.deleting && !v.terminal);
        if !running {
            return Ok(());
        }
        let Some((_, ep)) = self.sync_endpoint(c) else {
            return Err(ProvisionError::Unavailable {
                detail: format!("the workspace sync sidecar of pod {} has no address yet; its files cannot be pushed", c.name),
                retry_after: Some(Duration::from_secs(5)),
            });
        };
        let started = Instant::now();
        let r = sync
            .client
            .call_bytes(&ep, http::Method::POST, "/push", None, sync.pod.final_push + Duration::from_secs(2), 1 << 20)
            .await;
        match r {
            Ok((_, body)) => {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                    *c.sync_status.lock().unwrap() = Some(v);
                }
                tracing::info!(downstream = %c.ds.id(), took = ?started.elapsed(), "workspace sync: final push done");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(downstream = %c.ds.id(), pod = %c.name, error = %e, "workspace sync: final push failed; the pod is kept");
                Err(ProvisionError::Unavailable {
                    detail: format!(
                        "the files of pod {} could not be pushed to workspace storage ({e}); the pod keeps running and pushing, try again later",
                        c.name
                    ),
                    retry_after: Some(Duration::from_secs(30)),
                })
            }
        }
    }

    /// Delete with purge: the sidecar stops pushing (what it would push is about to be
    /// deleted). Best effort: a sidecar that does not answer is not running a pusher that
    /// matters, or is stopped with its pod (nestor purges only once the pod is gone).
    async fn discard_pushes(&self, c: &Conv) {
        let Some((sync, ep)) = self.sync_endpoint(c) else { return };
        if let Err(e) = sync.client.call_bytes(&ep, http::Method::POST, "/discard", None, Duration::from_secs(10), 1 << 16).await {
            tracing::info!(pod = %c.name, "workspace sync: the sidecar did not stop pushing ({e}); purging after the pod is gone");
        }
    }

    /// Fail a start that is not Ready within the startup timeout, with the pod's reason, and
    /// delete its pod (Secret and PVC stay: the next request starts it again).
    async fn monitor_start(self: Arc<Self>, c: Arc<Conv>, generation: u64) {
        let started = Instant::now();
        match c.ds.wait_ready(self.s.startup_timeout).await {
            Ok(()) => {
                tracing::info!(downstream = %c.ds.id(), took = ?started.elapsed(), "agent-server pod ready");
                return;
            }
            Err(NotReady::Timeout(_)) => {}
            Err(_) => return,
        }
        let _g = c.lifecycle.lock().await;
        if c.generation.load(Ordering::SeqCst) != generation || c.released.load(Ordering::SeqCst) {
            return;
        }
        if c.ds.state() == DownstreamState::Ready {
            return;
        }
        let problem = c.pod.borrow().as_ref().and_then(|v| v.problem.clone());
        let why = format!(
            "the agent-server pod {} did not become ready within {:?}{}",
            c.name,
            self.s.startup_timeout,
            problem.map(|p| format!(" ({p})")).unwrap_or_default()
        );
        tracing::warn!(downstream = %c.ds.id(), "{why}");
        *c.failed.lock().unwrap() = Some(why.into());
        self.sync_state(&c);
        if let Err(e) = self.delete_pod(&c.name, true).await {
            tracing::warn!(downstream = %c.ds.id(), "could not delete the pod that failed to start: {e}");
        }
    }

    async fn delete_pod(&self, name: &str, now: bool) -> Result<(), KubeError> {
        let api = self.pods.clone();
        let n = name.to_owned();
        let dp = if now { DeleteParams::default().grace_period(0) } else { DeleteParams::default() };
        match self.kube.call("delete", "pods", async move { api.delete(&n, &dp).await }).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Delete Secret and PVC of `name` (404 is success).
    async fn delete_state(&self, name: &str) -> Result<(), KubeError> {
        let api = self.secrets.clone();
        let n = name.to_owned();
        let r1 = match self.kube.call("delete", "secrets", async move { api.delete(&n, &DeleteParams::background()).await }).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        };
        let r2 = if self.s.storage == StorageMode::Pvc {
            let api = self.pvcs.clone();
            let n = name.to_owned();
            match self.kube.call("delete", "persistentvolumeclaims", async move { api.delete(&n, &DeleteParams::background()).await }).await {
                Ok(_) => Ok(()),
                Err(e) if e.is_not_found() => Ok(()),
                Err(e) => Err(e),
            }
        } else {
            Ok(())
        };
        r1.and(r2)
    }

    /// Wait (bounded) until `c` has no pod, or only one that is not being deleted.
    async fn wait_pod_gone(&self, c: &Conv, deadline: tokio::time::Instant) -> bool {
        let mut rx = c.pod.subscribe();
        loop {
            if rx.borrow_and_update().as_ref().is_none_or(|v| !v.deleting) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
    }

    /// Wait (bounded) until `c`'s pod is gone from the API (not only marked for deletion).
    async fn pod_gone(&self, c: &Conv, deadline: tokio::time::Instant) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            let api = self.pods.clone();
            let n = c.name.clone();
            if let Ok(None) = self.kube.call("get", "pods", async move { api.get_opt(&n).await }).await {
                return true;
            }
            if tokio::time::Instant::now() + backoff > deadline {
                return false;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Set a Secret's phase annotation (best effort, bounded).
    async fn set_phase(&self, name: &str, phase: &str) {
        let api = self.secrets.clone();
        let n = name.to_owned();
        let patch = serde_json::json!({"metadata": {"annotations": {PHASE: phase}}});
        let r = self
            .kube
            .call("patch", "secrets", async move { api.patch(&n, &PatchParams::default(), &Patch::Merge(&patch)).await })
            .await;
        if let Err(e) = r {
            tracing::warn!(secret = %name, "could not mark the conversation {phase}: {e}");
        }
    }

    /// Remove what a crash left half-made: conversations whose create never completed
    /// (phase `provisioning` older than the grace), and PVCs/pods without a Secret; without
    /// a pool, also warm pods (warm.rs). Finish the relabel of claimed warm pods and PVCs
    /// whose labels still say warm (the claiming replica died, or its relabel failed).
    /// Returns the names removed.
    async fn sweep(self: &Arc<Self>) -> Result<Vec<String>, KubeError> {
        let sel = objects::selector(&self.s.instance);
        let grace = self.s.provisioning_grace;
        let old = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            // A conversation claimed from the warm pool is being created since its claim.
            let since = warm::claimed_at(m).or_else(|| m.creation_timestamp.as_ref().map(|t| t.0));
            since.is_some_and(|t| {
                let age = k8s_openapi::jiff::Timestamp::now().duration_since(t);
                age.as_secs_f64() > grace.as_secs_f64()
            })
        };
        let api = self.secrets.clone();
        let lp = ListParams::default().labels(&sel);
        let secrets = self.kube.call("list", "secrets", async move { api.list(&lp).await }).await?;
        let mut with_secret = HashSet::new();
        let mut doomed = Vec::new();
        // Claimed warm servers (the Secret is the claim), by name: pod and PVC follow it.
        let mut claims = std::collections::HashMap::new();
        let mut relabel: Vec<(String, bool)> = Vec::new();
        for s in &secrets.items {
            let Some(name) = s.metadata.name.clone() else { continue };
            with_secret.insert(name.clone());
            if let Some(claim) = warm::claim_of(s) {
                claims.insert(name.clone(), claim);
            }
            let phase = s.metadata.annotations.as_ref().and_then(|a| a.get(PHASE)).map(String::as_str);
            if phase == Some(PHASE_PROVISIONING) && old(&s.metadata) {
                doomed.push(name);
            } else if warm::is_warm(&s.metadata) && !self.warm_mode.load(Ordering::SeqCst) {
                // No pool wraps this provisioner: a warm pod a pooled nestor left is a leftover.
                doomed.push(name);
            }
        }
        let api = self.pods.clone();
        let lp = ListParams::default().labels(&sel);
        let pods = self.kube.call("list", "pods", async move { api.list(&lp).await }).await?;
        for p in &pods.items {
            if let Some(name) = &p.metadata.name {
                if !with_secret.contains(name) && old(&p.metadata) && p.metadata.deletion_timestamp.is_none() {
                    doomed.push(name.clone());
                } else if warm::is_warm(&p.metadata) && claims.contains_key(name) && p.metadata.deletion_timestamp.is_none() {
                    relabel.push((name.clone(), true));
                }
            }
        }
        if self.s.storage == StorageMode::Pvc {
            let api = self.pvcs.clone();
            let lp = ListParams::default().labels(&sel);
            let pvcs = self.kube.call("list", "persistentvolumeclaims", async move { api.list(&lp).await }).await?;
            for p in &pvcs.items {
                if let Some(name) = &p.metadata.name {
                    if !with_secret.contains(name) && old(&p.metadata) {
                        doomed.push(name.clone());
                    } else if warm::is_warm(&p.metadata) && claims.contains_key(name) {
                        relabel.push((name.clone(), false));
                    }
                }
            }
        }
        doomed.sort();
        doomed.dedup();
        for name in &doomed {
            tracing::info!(name = %name, "removing a half-created agent-server (its create never completed)");
            self.tombstones.insert(name.clone(), Instant::now());
            if let Some(c) = self.convs.iter().find(|c| &c.name == name).map(|c| c.clone()) {
                c.released.store(true, Ordering::SeqCst);
                self.sync_state(&c);
                self.convs.remove(c.ds.id());
            }
            self.delete_pod(name, true).await?;
            self.delete_state(name).await?;
        }
        for (name, pod) in relabel.iter().filter(|(n, _)| !doomed.contains(n)) {
            let (slot, owner) = &claims[name];
            tracing::info!(name = %name, conversation = %slot.label(), "finishing the relabel of a claimed warm agent-server");
            let r = if *pod { self.relabel_pod(name, *slot, owner).await } else { self.relabel_pvc(name, *slot, owner).await };
            if let Err(e) = r {
                tracing::warn!(name = %name, "could not relabel a claimed warm agent-server (its Secret is the record; next sweep retries): {e}");
            }
        }
        Ok(doomed)
    }

    /// The bookkeeping of `slot`, created from the cluster if need be (provision path).
    async fn provision_slot(self: &Arc<Self>, slot: Slot, owner: UserId) -> Result<Arc<Conv>, ProvisionError> {
        if let Some(c) = self.convs.get(&downstream_id(&slot)) {
            return Ok(c.clone());
        }
        let name = self.name(&slot);
        self.tombstones.remove(&name);
        let (key, persist) = self.ensure_secret(&slot, &owner).await?;
        if let Err(e) = self.ensure_pvc(&slot, &owner).await {
            if matches!(slot, Slot::Conversation(_)) {
                let _ = self.delete_state(&name).await;
            }
            return Err(e.into());
        }
        let c = self.insert_conv(slot, key, owner, None, name.clone());
        c.persisted.store(persist, Ordering::SeqCst);
        let _g = c.lifecycle.lock().await;
        let has_pod = c.pod.borrow().as_ref().is_some_and(|v| !v.deleting && !v.terminal);
        if !has_pod {
            if let Err(e) = self.create_pod(&c).await {
                if matches!(slot, Slot::Conversation(_)) {
                    // Nothing half-made stays behind a failed provision.
                    c.released.store(true, Ordering::SeqCst);
                    self.sync_state(&c);
                    self.convs.remove(c.ds.id());
                    let _ = self.delete_state(&name).await;
                }
                return Err(e);
            }
        }
        Ok(c.clone())
    }
}

enum WatchEnd {
    /// The server closed the watch (its timeout); resume from this version.
    Expired(Option<String>),
    /// 410 Gone: the version is too old; list again.
    Gone,
    Failed(String),
    Cancelled,
}

#[async_trait]
impl Provisioner for KubernetesProvisioner {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    async fn recover(&self) -> Result<Vec<Arc<Downstream>>, ProvisionError> {
        let inner = &self.0;
        let started = Instant::now();
        if inner.s.check_permissions {
            let missing = self.missing_permissions().await?;
            if !missing.is_empty() {
                let list: Vec<String> = missing.iter().map(|(v, r)| format!("{v} {r}")).collect();
                return Err(ProvisionError::Config(format!(
                    "nestor's Kubernetes identity lacks permissions in namespace {:?}: {} (apply deploy/kubernetes/rbac.yaml, or grant these verbs to its service account)",
                    inner.kube.ns,
                    list.join(", ")
                )));
            }
        }
        // Conversations are their Secrets (also those without a running pod).
        let api = inner.secrets.clone();
        let lp = ListParams::default().labels(&objects::selector(&inner.s.instance));
        let secrets = inner.kube.call("list", "secrets", async move { api.list(&lp).await }).await?;
        for s in &secrets.items {
            let Some(slot) = s.metadata.labels.as_ref().and_then(|l| l.get(CONVERSATION)).and_then(|v| Slot::from_label(v)) else {
                continue;
            };
            if s.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let Some((key, _)) = objects::keys_of(s) else { continue };
            let owner = s
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(OWNER))
                .map(|o| UserId::new(o.as_str()))
                .unwrap_or_else(UserId::default_user);
            let name = s.metadata.name.clone().unwrap_or_else(|| inner.name(&slot));
            let c = inner.insert_conv(slot, key, owner, None, name);
            c.persisted.store(persisted(s), Ordering::SeqCst);
        }
        let rv = inner.relist().await?;
        match inner.sweep().await {
            Ok(removed) if !removed.is_empty() => tracing::info!(removed = removed.len(), "removed half-created agent-servers"),
            Ok(_) => {}
            Err(e) => tracing::warn!("kubernetes sweep failed: {e}"),
        }

        inner.spawn_watch(Some(rv));
        let owned = self.list();
        let running = owned.iter().filter(|d| d.state() == DownstreamState::Ready).count();
        tracing::info!(
            namespace = %inner.kube.ns,
            total = owned.len(),
            running,
            took = ?started.elapsed(),
            "kubernetes provisioner recovered its agent-server pods"
        );
        Ok(owned)
    }

    async fn provision(&self, req: ProvisionRequest) -> Result<Arc<Downstream>, ProvisionError> {
        let inner = &self.0;
        inner.spawn_watch(None);
        let c = inner.provision_slot(Slot::Conversation(req.conversation), req.owner).await?;
        Ok(c.ds.clone())
    }

    async fn find(&self, conversation: &ConversationId) -> Result<Option<Arc<Downstream>>, ProvisionError> {
        let slot = Slot::Conversation(*conversation);
        if let Some(c) = self.0.convs.get(&downstream_id(&slot)) {
            return Ok(Some(c.ds.clone()));
        }
        Ok(self.0.adopt(slot).await?.map(|c| c.ds.clone()))
    }

    async fn home(&self) -> Result<Arc<Downstream>, ProvisionError> {
        let inner = &self.0;
        let c = match inner.convs.get(&downstream_id(&Slot::Home)).map(|c| c.clone()) {
            Some(c) => c,
            None => inner.provision_slot(Slot::Home, UserId::default_user()).await?,
        };
        let ds = c.ds.clone();
        self.ensure_ready(&ds, inner.s.startup_timeout).await?;
        Ok(ds)
    }

    fn get(&self, id: &DownstreamId) -> Option<Arc<Downstream>> {
        self.0.convs.get(id).map(|c| c.ds.clone())
    }

    fn list(&self) -> Vec<Arc<Downstream>> {
        self.0.convs.iter().map(|c| c.ds.clone()).collect()
    }

    async fn ensure_ready(&self, ds: &Arc<Downstream>, timeout: Duration) -> Result<(), ProvisionError> {
        let inner = &self.0;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut started = false;
        loop {
            match ds.state() {
                DownstreamState::Ready => return Ok(()),
                DownstreamState::Released => return Err(NotReady::Released.into()),
                DownstreamState::Failed(m) if started => return Err(NotReady::Failed(m).into()),
                DownstreamState::Starting => {}
                DownstreamState::Stopped | DownstreamState::Failed(_) => {
                    let c = inner.conv_of(ds)?;
                    let _g = c.lifecycle.lock().await;
                    if matches!(ds.state(), DownstreamState::Stopped | DownstreamState::Failed(_)) {
                        // Released by another replica meanwhile? Its Secret says.
                        let api = inner.secrets.clone();
                        let name = c.name.clone();
                        let exists = inner.kube.call("get", "secrets", async move { api.get_opt(&name).await }).await?;
                        if exists.is_none_or(|s| s.metadata.deletion_timestamp.is_some()) {
                            drop(_g);
                            inner.forget(&c, "its Secret is gone");
                            return Err(NotReady::Released.into());
                        }
                        // A failed or ending pod goes first; a pod still terminating (stopped
                        // a moment ago) must be gone before one of the same name is created.
                        let (exists, deleting) = c.pod.borrow().as_ref().map(|v| (true, v.deleting)).unwrap_or((false, false));
                        if exists && !deleting {
                            inner.delete_pod(&c.name, true).await?;
                        }
                        if exists && !inner.wait_pod_gone(&c, deadline).await {
                            return Err(NotReady::Timeout(timeout).into());
                        }
                        tracing::info!(downstream = %ds.id(), "starting agent-server pod on demand");
                        inner.create_pod(&c).await?;
                    }
                    started = true;
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(NotReady::Timeout(timeout).into());
            }
            match ds.wait_ready(left).await {
                Ok(()) => return Ok(()),
                Err(NotReady::Timeout(_)) => return Err(NotReady::Timeout(timeout).into()),
                Err(NotReady::Failed(m)) if started => return Err(NotReady::Failed(m).into()),
                Err(NotReady::Released) => return Err(NotReady::Released.into()),
                Err(_) => {
                    // Stopped/Failed before we started it: start it (once) on the next turn.
                    if started {
                        // Stopped behind our back after we started it: wait for the next
                        // state change rather than spin.
                        let mut rx = ds.subscribe_state();
                        let _ = tokio::time::timeout(left, rx.changed()).await;
                    }
                }
            }
        }
    }

    async fn stop(&self, ds: &Arc<Downstream>) -> Result<(), ProvisionError> {
        let inner = &self.0;
        let c = inner.conv_of(ds)?;
        if inner.s.storage == StorageMode::EmptyDir && inner.sync_of(&c).is_none() {
            // Its state dies with the pod: stopping would lose the conversation (with
            // workspace persistence the next pod restores it from the bucket).
            return Ok(());
        }
        let _g = c.lifecycle.lock().await;
        // The pod holds the only up-to-date copy until this push succeeds.
        inner.final_push(&c).await?;
        c.generation.fetch_add(1, Ordering::SeqCst);
        // Stopped first: a request arriving now waits for a restart instead of reaching a
        // server that is going away.
        let seen = c.pod.borrow().clone();
        if let Some(mut v) = seen {
            v.deleting = true;
            c.pod.send_replace(Some(v));
        }
        inner.sync_state(&c);
        inner.delete_pod(&c.name, false).await?;
        tracing::info!(downstream = %ds.id(), "agent-server pod stopped (its Secret and PVC are kept)");
        Ok(())
    }

    async fn release(&self, ds: &Arc<Downstream>, conversation: ConversationId, remaining: usize) -> Result<(), ProvisionError> {
        let inner = &self.0;
        if remaining > 0 {
            return Ok(());
        }
        let c = inner.conv_of(ds)?;
        {
            let _g = c.lifecycle.lock().await;
            let sync = inner.sync_of(&c);
            let purge = sync.clone().filter(|s| s.pod.on_delete_purge);
            if sync.is_some() && purge.is_none() {
                // on_delete = "keep": what the pod holds is stored first, or nothing is
                // deleted (the pod keeps pushing; its objects stay, with the reason logged).
                if let Err(e) = inner.final_push(&c).await {
                    tracing::error!(
                        conversation = %conversation,
                        pod = %c.name,
                        "deleted conversation: its files could not be stored, so its pod, Secret and volume are kept and go on pushing; \
                         remove them once its sidecar reports a successful push (GET :8001/status; then kubectl delete pod,secret,pvc -l {CONVERSATION}={}): {e}",
                        c.slot.label()
                    );
                    return Err(e);
                }
            }
            c.generation.fetch_add(1, Ordering::SeqCst);
            c.released.store(true, Ordering::SeqCst);
            inner.tombstones.insert(c.name.clone(), Instant::now());
            inner.sync_state(&c);
            // Pod first (a pod never outlives its Secret), then Secret and PVC. With purge,
            // the sidecar stops pushing first (no final push on SIGTERM), and the stored copy
            // goes once the pod is gone: a pod object disappears only after the kubelet
            // stopped its containers (not force-deleted: with grace 0 the object goes at
            // once while a sidecar could still be pushing).
            if purge.is_some() {
                inner.discard_pushes(&c).await;
            }
            let r1 = inner.delete_pod(&c.name, false).await;
            if let (Some(sync), Some(conversation)) = (&purge, c.slot.conversation()) {
                let grace = Duration::from_secs(sync.pod.grace_secs(inner.s.termination_grace_secs).max(0) as u64);
                let deadline = tokio::time::Instant::now() + grace + inner.s.api_timeout * 2;
                let seen_gone = inner.pod_gone(&c, deadline).await;
                if !seen_gone {
                    tracing::warn!(pod = %c.name, "workspace sync: the pod is not gone yet; purging its stored files anyway");
                }
                let owner = c.ds.owner().cloned().unwrap_or_else(UserId::default_user);
                if let Err(e) = sync.hooks.purge(conversation, &owner).await {
                    tracing::warn!(conversation = %conversation, "workspace sync: purging the stored files failed: {e}");
                }
            }
            let r2 = inner.delete_state(&c.name).await;
            inner.convs.remove(ds.id());
            inner.claimed_names.remove(&c.name);
            r1.and(r2)?;
        }
        tracing::info!(conversation = %conversation, pod = %c.name, "released agent-server pod, secret and volume");
        Ok(())
    }

    fn mark_active(&self, ds: &Downstream) {
        let Ok(c) = self.0.conv_of(ds) else { return };
        if matches!(c.slot, Slot::Home) {
            return;
        }
        let me = self.0.clone();
        tokio::spawn(async move { me.set_phase(&c.name, PHASE_ACTIVE).await });
    }

    fn prepare_create(&self, _ds: &Downstream, body: &mut serde_json::Map<String, serde_json::Value>) {
        let ws = body.entry("workspace").or_insert_with(|| serde_json::json!({"kind": "LocalWorkspace"}));
        if let Some(obj) = ws.as_object_mut() {
            obj.insert("working_dir".into(), serde_json::Value::String(objects::WORKSPACE_DIR.into()));
        }
    }

    async fn shutdown(&self) {
        // Pods belong to the deployment, not to this replica: they keep running (and, with
        // workspace persistence, pushing) for the other replicas and for the next start.
        // Only the watch ends.
        self.0.cancel.cancel();
    }

    async fn workspace_status(&self, ds: &Downstream) -> Option<serde_json::Value> {
        let inner = &self.0;
        let c = inner.conv_of(ds).ok()?;
        let sync = inner.sync_of(&c)?;
        let mut v = match inner.sync_endpoint(&c).filter(|_| ds.state() == DownstreamState::Ready) {
            Some((_, ep)) => match sync.client.get_json::<serde_json::Value>(&ep, "/status", Duration::from_secs(3)).await {
                Ok(v) => {
                    *c.sync_status.lock().unwrap() = Some(v.clone());
                    let mut v = v;
                    if let Some(o) = v.as_object_mut() {
                        o.insert("sidecar".into(), serde_json::json!({ "reachable": true }));
                    }
                    v
                }
                Err(e) => {
                    let mut v = c.sync_status.lock().unwrap().clone().unwrap_or_else(|| serde_json::json!({}));
                    if let Some(o) = v.as_object_mut() {
                        o.insert("sidecar".into(), serde_json::json!({ "reachable": false, "error": e.to_string() }));
                    }
                    v
                }
            },
            None => {
                let mut v = c.sync_status.lock().unwrap().clone().unwrap_or_else(|| serde_json::json!({}));
                if let Some(o) = v.as_object_mut() {
                    o.insert("sidecar".into(), serde_json::json!({ "reachable": false, "error": "no pod runs" }));
                }
                v
            }
        };
        if let Some(o) = v.as_object_mut() {
            o.insert("pushed_by".into(), "pod".into());
        }
        Some(v)
    }
}

#[cfg(test)]
mod tests;
