//! `nestor-node-agent`: a tiny kubelet + scheduler for tests, so nestor's kubernetes
//! provisioner runs real agent-server pods against a real kube-apiserver without a cluster.
//!
//! There is no scheduler and no kubelet in the test set-up (scripts/setup-kube.sh starts only
//! etcd and kube-apiserver), so this agent does both jobs for one namespace:
//! * **schedules**: a pod with no `spec.nodeName` is bound to this node (`pods/binding`, as the
//!   scheduler does);
//! * **runs** each pod bound to it as Docker containers, one per container of the pod:
//!   `initContainers` first, one at a time, in order, each to completion (a failure is
//!   reported as the kubelet does, `Init:Error`-style waiting/terminated init statuses, and
//!   the init container is restarted with back-off), then every container at once. Each gets
//!   env literals, `valueFrom.secretKeyRef` and `envFrom` Secrets (a missing Secret is
//!   `CreateContainerConfigError`, like the kubelet), `command`/`args`, the
//!   securityContext's user/group, `drop: [ALL]`, no-new-privileges, cpu/memory limits; the
//!   pod's volumes are shared by its containers: PVCs as named Docker volumes (kept until the
//!   PVC is deleted), emptyDirs as volumes removed with the pod; a new one starts empty with a
//!   root of mode 0777, as the kubelet makes an emptyDir (Docker's copy of the image's content
//!   into a new volume is turned off; the mode is set on this host, or from a one-shot root
//!   container when the engine's directory is out of reach; no fsGroup). Containers do not
//!   share a network namespace (the one difference from a pod that matters: they cannot
//!   reach each other on localhost).
//!   Every declared port is published on **127.0.0.1 only**, on a random host port: the
//!   first container's first port in the annotation `nestor.dev/host-port`, each named port
//!   in `nestor.dev/host-port-<name>`;
//! * **reports status** like a kubelet: `podIP` 127.0.0.1, phase, container statuses
//!   (`ErrImageNeverPull`/`ErrImagePull` for an image that is not present — there is no
//!   registry —, running, terminated, restarts with back-off), and the `Ready` condition from
//!   the pod's readinessProbe (`httpGet`, run against the published port);
//! * **deletes**: a pod marked for deletion has its containers stopped together (SIGTERM,
//!   grace period honoured, bounded to 30 s) and removed, then the pod is deleted for good (grace 0), as the
//!   kubelet confirms a deletion. Containers whose pod is gone are removed.
//!
//! nestor reaches such a pod only with `reach = "host-port-annotation"`; on a real cluster it
//! uses `podIP:8000`. [`NodeAgent::shutdown`] (and dropping the handle) removes every
//! container and volume the agent made.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, ListVolumesOptions, RemoveContainerOptions, RemoveVolumeOptions,
    StopContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions, WatchParams};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The annotation with the published loopback port.
pub const HOST_PORT_ANNOTATION: &str = "nestor.dev/host-port";
const LABEL_NODE: &str = "nestor.test/node";
const LABEL_POD_UID: &str = "nestor.test/pod-uid";
const LABEL_POD: &str = "nestor.test/pod";
const LABEL_PVC: &str = "nestor.test/pvc";
const API_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest termination grace honoured (tests must not wait minutes for a pod to go).
const MAX_GRACE_SECS: i64 = 30;
/// Published port of each named container port: `nestor.dev/host-port-<name>`.
pub const HOST_PORT_ANNOTATION_PREFIX: &str = "nestor.dev/host-port-";

#[derive(Debug, Clone)]
pub struct NodeAgentConfig {
    pub kubeconfig: PathBuf,
    pub namespace: String,
    pub node_name: String,
    /// `unix://…` (default: `$DOCKER_HOST`, else the local socket).
    pub docker_host: Option<String>,
}

/// A pod this node runs.
#[derive(Debug, Clone)]
struct Run {
    uid: String,
    name: String,
    /// Init containers completed so far (they run one at a time, in order).
    init_done: usize,
    /// The init container running now (or failed, waiting for its restart).
    init: Option<Ctr>,
    /// The main containers, in spec order (empty until every init container succeeded).
    containers: Vec<Ctr>,
    started_at: String,
    reported: Option<serde_json::Value>,
}

/// One Docker container of a pod.
#[derive(Debug, Clone)]
struct Ctr {
    /// The container's name in the pod spec.
    name: String,
    image: String,
    docker: String,
    /// `(port name, container port, published loopback port)`.
    ports: Vec<(Option<String>, u16, Option<u16>)>,
    probe: Option<(String, u16, Duration)>,
    last_probe: Option<Instant>,
    ready: bool,
    running: bool,
    restarts: i32,
    next_restart: Option<Instant>,
    last_exit: Option<i64>,
    started_at: String,
}

impl Ctr {
    fn host_port_of(&self, container_port: u16) -> Option<u16> {
        self.ports.iter().find(|(_, p, _)| *p == container_port).and_then(|(_, _, h)| *h)
    }
}

/// A running agent (a task); stop it with [`NodeAgent::shutdown`].
pub struct NodeAgent {
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    docker: Docker,
    node: String,
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = Result<T, kube::Error>>) -> anyhow::Result<T> {
    match tokio::time::timeout(API_TIMEOUT, f).await {
        Ok(r) => r.with_context(|| what.to_owned()),
        Err(_) => anyhow::bail!("{what}: timed out"),
    }
}

async fn dbounded<T>(what: &str, f: impl std::future::Future<Output = Result<T, bollard::errors::Error>>) -> anyhow::Result<T> {
    match tokio::time::timeout(Duration::from_secs(60), f).await {
        Ok(r) => r.with_context(|| what.to_owned()),
        Err(_) => anyhow::bail!("{what}: timed out"),
    }
}

fn is_docker_404(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<bollard::errors::Error>(),
        Some(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })
    )
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

pub async fn connect_docker(host: Option<&str>) -> anyhow::Result<Docker> {
    let host = host.map(str::to_owned).or_else(|| std::env::var("DOCKER_HOST").ok()).unwrap_or_else(|| "unix:///var/run/docker.sock".into());
    let d = if host.starts_with("unix://") {
        Docker::connect_with_unix(&host, 60, bollard::API_DEFAULT_VERSION)?
    } else {
        Docker::connect_with_http(&host, 60, bollard::API_DEFAULT_VERSION)?
    };
    let d = tokio::time::timeout(Duration::from_secs(10), d.negotiate_version()).await.context("docker: no answer")??;
    Ok(d)
}

pub async fn kube_client(kubeconfig: &std::path::Path) -> anyhow::Result<kube::Client> {
    // With two rustls providers compiled in, rustls refuses to guess: choose ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    cfg.connect_timeout = Some(Duration::from_secs(5));
    cfg.read_timeout = None;
    Ok(kube::Client::try_from(cfg)?)
}

impl NodeAgent {
    /// Start the agent for one namespace.
    pub async fn start(cfg: NodeAgentConfig) -> anyhow::Result<Self> {
        let client = kube_client(&cfg.kubeconfig).await?;
        let docker = connect_docker(cfg.docker_host.as_deref()).await?;
        let cancel = CancellationToken::new();
        let agent = Agent {
            pods: Api::namespaced(client.clone(), &cfg.namespace),
            secrets: Api::namespaced(client.clone(), &cfg.namespace),
            pvcs: Api::namespaced(client, &cfg.namespace),
            docker: docker.clone(),
            node: cfg.node_name.clone(),
            ns: cfg.namespace.clone(),
            runs: HashMap::new(),
            http: reqwest::Client::builder().no_proxy().build()?,
        };
        let c2 = cancel.clone();
        let task = tokio::spawn(agent.run(c2));
        Ok(Self { cancel, task: Some(task), docker, node: cfg.node_name })
    }

    /// Stop the agent and remove every container and volume it made.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        cleanup(&self.docker, &self.node).await;
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.cancel.cancel();
        if self.task.is_none() {
            return;
        }
        // Dropped without shutdown (a failing test): clean up on a runtime of our own.
        let docker = self.docker.clone();
        let node = self.node.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(async move {
                    // The client was made on another runtime: connect again.
                    let d = connect_docker(None).await.unwrap_or(docker);
                    cleanup(&d, &node).await;
                });
            }
        })
        .join();
    }
}

/// Remove every container and volume labelled with this node.
pub async fn cleanup(docker: &Docker, node: &str) {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_NODE}={node}")])]);
    if let Ok(Ok(cs)) = tokio::time::timeout(
        Duration::from_secs(30),
        docker.list_containers(Some(ListContainersOptions { all: true, filters: Some(filters.clone()), ..Default::default() })),
    )
    .await
    {
        for c in cs {
            if let Some(id) = c.id {
                let _ = tokio::time::timeout(
                    Duration::from_secs(30),
                    docker.remove_container(&id, Some(RemoveContainerOptions { force: true, v: true, link: false })),
                )
                .await;
            }
        }
    }
    if let Ok(Ok(vs)) =
        tokio::time::timeout(Duration::from_secs(30), docker.list_volumes(Some(ListVolumesOptions { filters: Some(filters) }))).await
    {
        for v in vs.volumes.unwrap_or_default() {
            let _ = tokio::time::timeout(Duration::from_secs(30), docker.remove_volume(&v.name, Some(RemoveVolumeOptions { force: true })))
                .await;
        }
    }
}

struct Agent {
    pods: Api<Pod>,
    secrets: Api<Secret>,
    pvcs: Api<PersistentVolumeClaim>,
    docker: Docker,
    node: String,
    ns: String,
    runs: HashMap<String, Run>,
    http: reqwest::Client,
}

impl Agent {
    async fn run(mut self, cancel: CancellationToken) {
        // A watch pokes the loop; a 500 ms tick covers probes and anything the watch missed.
        let poke = Arc::new(Notify::new());
        let p2 = poke.clone();
        let pods = self.pods.clone();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            while !c2.is_cancelled() {
                let wp = WatchParams::default().timeout(60);
                match tokio::time::timeout(API_TIMEOUT, pods.watch(&wp, "0")).await {
                    Ok(Ok(s)) => {
                        let mut s = std::pin::pin!(s);
                        loop {
                            tokio::select! {
                                _ = c2.cancelled() => return,
                                ev = s.next() => match ev { Some(Ok(_)) => p2.notify_one(), _ => break },
                            }
                        }
                    }
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        });
        let mut errors = 0u32;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = poke.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            if let Err(e) = self.reconcile().await {
                errors += 1;
                if errors % 20 == 1 {
                    tracing::warn!(node = %self.node, "node agent reconcile failed: {e:#}");
                }
            }
        }
    }

    async fn reconcile(&mut self) -> anyhow::Result<()> {
        let list = bounded("list pods", self.pods.list(&ListParams::default())).await?;
        let mut live: HashSet<String> = HashSet::new();
        for p in &list.items {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            let name = p.metadata.name.clone().unwrap_or_default();
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
            if p.metadata.deletion_timestamp.is_some() {
                if node.is_none() || node.as_deref() == Some(&self.node) {
                    self.finish_delete(p).await;
                }
                continue;
            }
            match node.as_deref() {
                None => {
                    if let Err(e) = self.bind(&name).await {
                        tracing::debug!(pod = %name, "bind failed: {e:#}");
                    }
                }
                Some(n) if n == self.node => {
                    live.insert(uid.clone());
                    if let Err(e) = self.sync_pod(p).await {
                        tracing::debug!(pod = %name, "sync failed: {e:#}");
                    }
                }
                Some(_) => {}
            }
        }
        // Containers whose pod is gone.
        let gone: Vec<String> = self.runs.keys().filter(|u| !live.contains(*u)).cloned().collect();
        for uid in gone {
            if self.runs.remove(&uid).is_some() {
                self.remove_pod_containers(&uid, Duration::from_secs(1)).await;
                self.remove_pod_volumes(&uid).await;
            }
        }
        self.gc_pvc_volumes().await;
        Ok(())
    }

    async fn bind(&self, name: &str) -> anyhow::Result<()> {
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
        });
        bounded(
            "bind pod",
            self.pods.create_subresource::<serde_json::Value, serde_json::Value>("binding", name, &PostParams::default(), &binding),
        )
        .await?;
        tracing::debug!(pod = %name, node = %self.node, "pod bound");
        Ok(())
    }

    /// Stop and remove the pod's containers (all at once, each with the grace period, as the
    /// kubelet sends SIGTERM to every container), then confirm the deletion (grace 0).
    async fn finish_delete(&mut self, p: &Pod) {
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let grace = p.metadata.deletion_grace_period_seconds.unwrap_or(0).clamp(0, MAX_GRACE_SECS) as u64;
        self.runs.remove(&uid);
        self.remove_pod_containers(&uid, Duration::from_secs(grace)).await;
        self.remove_pod_volumes(&uid).await;
        let dp = DeleteParams { grace_period_seconds: Some(0), preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }), ..Default::default() };
        let _ = bounded("delete pod", self.pods.delete(&name, &dp)).await;
    }

    /// Every Docker container of pod `uid` (init containers included), stopped concurrently.
    async fn remove_pod_containers(&self, uid: &str, grace: Duration) {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_POD_UID}={uid}")])]);
        let names: Vec<String> = match dbounded(
            "list containers",
            self.docker.list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() })),
        )
        .await
        {
            Ok(cs) => cs.into_iter().filter_map(|c| c.id).collect(),
            Err(_) => return,
        };
        futures_util::future::join_all(names.iter().map(|n| self.remove_container(n, grace))).await;
    }

    async fn remove_container(&self, name: &str, grace: Duration) {
        let _ = tokio::time::timeout(
            grace + Duration::from_secs(15),
            self.docker.stop_container(name, Some(StopContainerOptions { t: Some(grace.as_secs() as i32), signal: None })),
        )
        .await;
        let _ = dbounded(
            "remove container",
            self.docker.remove_container(name, Some(RemoveContainerOptions { force: true, v: false, link: false })),
        )
        .await;
    }

    async fn remove_pod_volumes(&self, uid: &str) {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_POD_UID}={uid}")])]);
        if let Ok(vs) = dbounded("list volumes", self.docker.list_volumes(Some(ListVolumesOptions { filters: Some(filters) }))).await {
            for v in vs.volumes.unwrap_or_default() {
                let _ = dbounded("remove volume", self.docker.remove_volume(&v.name, Some(RemoveVolumeOptions { force: true }))).await;
            }
        }
    }

    /// Remove PVC volumes whose claim is gone (and that no container uses).
    async fn gc_pvc_volumes(&self) {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_NODE}={}", self.node), LABEL_PVC.to_owned()])]);
        let Ok(vs) = dbounded("list volumes", self.docker.list_volumes(Some(ListVolumesOptions { filters: Some(filters) }))).await else {
            return;
        };
        let vols = vs.volumes.unwrap_or_default();
        if vols.is_empty() {
            return;
        }
        let Ok(claims) = bounded("list pvcs", self.pvcs.list(&ListParams::default())).await else { return };
        let names: HashSet<String> = claims.items.iter().filter_map(|c| c.metadata.name.clone()).collect();
        for v in vols {
            let claim = v.labels.get(LABEL_PVC).cloned().unwrap_or_default();
            if !names.contains(&claim) {
                // Fails (in use) while a container still mounts it; retried next round.
                let _ = dbounded("remove volume", self.docker.remove_volume(&v.name, Some(RemoveVolumeOptions { force: false }))).await;
            }
        }
    }

    async fn patch_status(&self, name: &str, status: serde_json::Value) -> anyhow::Result<()> {
        let patch = json!({"status": status});
        bounded("patch pod status", self.pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))).await?;
        Ok(())
    }

    /// Report a pod that cannot start (a container waiting with a reason), once per change.
    async fn report_waiting(&mut self, p: &Pod, container: &str, reason: &str, message: &str) -> anyhow::Result<()> {
        let name = p.metadata.name.clone().unwrap_or_default();
        let spec = p.spec.as_ref();
        let all = spec.map(|s| s.init_containers.iter().flatten().chain(s.containers.iter()).collect::<Vec<_>>()).unwrap_or_default();
        let image = all.iter().find(|c| c.name == container).and_then(|c| c.image.clone()).unwrap_or_default();
        let status = p.status.as_ref();
        let already = status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .chain(status.and_then(|s| s.init_container_statuses.as_ref()))
            .flatten()
            .filter(|c| c.name == container)
            .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
            .any(|w| w.reason.as_deref() == Some(reason));
        if already {
            return Ok(());
        }
        let waiting = json!({
            "name": container, "image": image, "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": reason, "message": message}},
        });
        let is_init = spec.is_some_and(|s| s.init_containers.iter().flatten().any(|c| c.name == container));
        let mut st = json!({
            "phase": "Pending",
            "hostIP": "127.0.0.1",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": if is_init { "False" } else { "True" }},
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
            ],
            "containerStatuses": [waiting.clone()],
        });
        if is_init {
            st["initContainerStatuses"] = json!([waiting]);
            let first = spec.map(|s| s.containers[0].clone()).unwrap_or_default();
            st["containerStatuses"] = json!([{
                "name": first.name, "image": first.image, "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "PodInitializing"}},
            }]);
        }
        self.patch_status(&name, st).await
    }

    async fn sync_pod(&mut self, p: &Pod) -> anyhow::Result<()> {
        let uid = p.metadata.uid.clone().unwrap_or_default();
        if !self.runs.contains_key(&uid) {
            return self.start_pod(p).await;
        }
        let name = p.metadata.name.clone().unwrap_or_default();
        let mut run = self.runs.get(&uid).cloned().expect("present");
        let spec = p.spec.as_ref().context("pod without spec")?;
        let inits = spec.init_containers.clone().unwrap_or_default();
        if run.init_done < inits.len() {
            self.step_init(p, &mut run, &inits).await?;
            if run.init.is_none() && run.init_done < inits.len() {
                // The next init container is made next round (or could not be: reported).
                self.runs.insert(uid, run);
                return Ok(());
            }
        } else if run.containers.is_empty() {
            if !self.start_main(p, &mut run).await? {
                self.runs.insert(uid, run);
                return Ok(());
            }
        } else {
            let mut moved = false;
            for c in run.containers.iter_mut() {
                moved |= self.tend(c).await;
            }
            if moved {
                self.annotate_ports(&name, &run.containers).await?;
            }
        }
        let status = self.status_of(p, &run, &inits);
        if run.reported.as_ref() != Some(&status) {
            self.patch_status(&name, status.clone()).await?;
            run.reported = Some(status);
        }
        self.runs.insert(uid, run);
        Ok(())
    }

    /// The init container running now: done → the next one (or the main containers next
    /// round); failed → restarted with back-off (restartPolicy Always), `Init:Error` meanwhile.
    async fn step_init(&mut self, p: &Pod, run: &mut Run, inits: &[k8s_openapi::api::core::v1::Container]) -> anyhow::Result<()> {
        let Some(mut c) = run.init.clone() else {
            let spec = &inits[run.init_done];
            match self.create_ctr(p, spec, &format!("{}_init{}", container_name(&self.ns, &run.name, &run.uid), run.init_done), false).await? {
                Ok(c) => run.init = Some(c),
                Err((reason, msg)) => self.report_waiting(p, &spec.name, &reason, &msg).await?,
            }
            return Ok(());
        };
        let info = dbounded("inspect container", self.docker.inspect_container(&c.docker, None)).await;
        let state = info.as_ref().ok().and_then(|i| i.state.clone());
        if state.as_ref().and_then(|s| s.running).unwrap_or(false) {
            return Ok(());
        }
        let code = state.as_ref().and_then(|s| s.exit_code).unwrap_or(-1);
        if code == 0 && info.is_ok() {
            tracing::debug!(pod = %run.name, container = %c.name, "init container completed");
            run.init_done += 1;
            run.init = None;
            return Ok(());
        }
        c.running = false;
        if c.next_restart.is_none() {
            c.last_exit = Some(code);
            c.next_restart = Some(Instant::now() + Duration::from_secs(1 << c.restarts.clamp(0, 4)));
        }
        if c.next_restart.is_some_and(|t| Instant::now() >= t)
            && info.is_ok()
            && dbounded("start container", self.docker.start_container(&c.docker, None)).await.is_ok()
        {
            c.restarts += 1;
            c.next_restart = None;
            c.running = true;
            c.started_at = now_rfc3339();
        }
        run.init = Some(c);
        Ok(())
    }

    /// Every main container, in order. False when one cannot be made yet (reported).
    async fn start_main(&mut self, p: &Pod, run: &mut Run) -> anyhow::Result<bool> {
        let spec = p.spec.as_ref().context("pod without spec")?;
        let base = container_name(&self.ns, &run.name, &run.uid);
        let mut made = Vec::new();
        for (i, c) in spec.containers.iter().enumerate() {
            // The first keeps the historical name (what `leftovers` and older tests know).
            let dname = if i == 0 { base.clone() } else { format!("{base}_{}", c.name) };
            match self.create_ctr(p, c, &dname, true).await? {
                Ok(ctr) => made.push(ctr),
                Err((reason, msg)) => {
                    for m in &made {
                        self.remove_container(&m.docker, Duration::from_secs(1)).await;
                    }
                    self.report_waiting(p, &c.name, &reason, &msg).await?;
                    return Ok(false);
                }
            }
        }
        self.annotate_ports(&run.name, &made).await?;
        run.started_at = now_rfc3339();
        run.containers = made;
        tracing::debug!(pod = %run.name, uid = %run.uid, "pod containers started");
        Ok(true)
    }

    /// A main container: restarted with back-off when it exited (restartPolicy Always),
    /// probed when running. True when its published ports changed (restart).
    async fn tend(&self, c: &mut Ctr) -> bool {
        let info = dbounded("inspect container", self.docker.inspect_container(&c.docker, None)).await;
        let running = match &info {
            Ok(i) => i.state.as_ref().and_then(|s| s.running).unwrap_or(false),
            Err(e) if is_docker_404(e) => false,
            Err(_) => return false,
        };
        c.running = running;
        let mut moved = false;
        if !running {
            c.ready = false;
            if c.next_restart.is_none() {
                c.last_exit = info.as_ref().ok().and_then(|i| i.state.as_ref()).and_then(|s| s.exit_code);
                c.next_restart = Some(Instant::now() + Duration::from_secs(1 << c.restarts.clamp(0, 4)));
            }
            if c.next_restart.is_some_and(|t| Instant::now() >= t)
                && info.is_ok()
                && dbounded("start container", self.docker.start_container(&c.docker, None)).await.is_ok()
            {
                c.restarts += 1;
                c.next_restart = None;
                c.running = true;
                c.started_at = now_rfc3339();
                let before = c.ports.clone();
                self.publish(c).await;
                moved = before != c.ports;
            }
        } else if let Some((path, port, period)) = c.probe.clone() {
            if c.last_probe.is_none_or(|t| t.elapsed() >= period) {
                c.last_probe = Some(Instant::now());
                c.ready = match c.host_port_of(port) {
                    Some(hp) => matches!(
                        tokio::time::timeout(Duration::from_secs(2), self.http.get(format!("http://127.0.0.1:{hp}{path}")).send()).await,
                        Ok(Ok(r)) if r.status().is_success()
                    ),
                    None => false,
                };
            }
        } else {
            c.ready = true;
        }
        moved
    }

    fn status_of(&self, p: &Pod, run: &Run, inits: &[k8s_openapi::api::core::v1::Container]) -> serde_json::Value {
        let spec = p.spec.as_ref().expect("spec");
        let initialized = run.init_done >= inits.len();
        let ctr_status = |c: &Ctr, main: bool| {
            let state = if c.running {
                json!({"running": {"startedAt": c.started_at}})
            } else if main {
                json!({"waiting": {"reason": "CrashLoopBackOff", "message": format!("back-off restarting failed container (exit code {})", c.last_exit.unwrap_or(-1))}})
            } else {
                json!({"waiting": {"reason": "CrashLoopBackOff", "message": format!("back-off restarting failed init container (exit code {})", c.last_exit.unwrap_or(-1))}})
            };
            let mut cs = json!({
                "name": c.name, "image": c.image, "imageID": "", "containerID": format!("docker://{}", c.docker),
                "ready": main && c.running && c.ready, "started": c.running, "restartCount": c.restarts, "state": state,
            });
            if let Some(code) = c.last_exit.filter(|_| c.restarts > 0 || !c.running) {
                cs["lastState"] = json!({"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" }}});
            }
            cs
        };
        let init_statuses: Vec<serde_json::Value> = inits
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i < run.init_done {
                    json!({"name": c.name, "image": c.image, "imageID": "", "ready": true, "restartCount": 0,
                           "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}})
                } else if let Some(r) = run.init.as_ref().filter(|_| i == run.init_done) {
                    ctr_status(r, false)
                } else {
                    json!({"name": c.name, "image": c.image, "imageID": "", "ready": false, "restartCount": 0,
                           "state": {"waiting": {"reason": "PodInitializing"}}})
                }
            })
            .collect();
        let statuses: Vec<serde_json::Value> = if run.containers.is_empty() {
            spec.containers
                .iter()
                .map(|c| json!({"name": c.name, "image": c.image, "imageID": "", "ready": false, "restartCount": 0,
                                "state": {"waiting": {"reason": "PodInitializing"}}}))
                .collect()
        } else {
            run.containers.iter().map(|c| ctr_status(c, true)).collect()
        };
        let ready = !run.containers.is_empty() && run.containers.iter().all(|c| c.running && c.ready);
        let cond = |t: &str, ok: bool| json!({"type": t, "status": if ok { "True" } else { "False" }});
        let mut st = json!({
            "phase": if run.containers.is_empty() { "Pending" } else { "Running" },
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": run.started_at,
            "conditions": [cond("PodScheduled", true), cond("Initialized", initialized), cond("ContainersReady", ready), cond("Ready", ready)],
            "containerStatuses": statuses,
        });
        if !inits.is_empty() {
            st["initContainerStatuses"] = json!(init_statuses);
        }
        st
    }

    /// Reads the container's published loopback ports.
    async fn publish(&self, c: &mut Ctr) {
        let Ok(i) = dbounded("inspect container", self.docker.inspect_container(&c.docker, None)).await else { return };
        let ports = i.network_settings.and_then(|n| n.ports).unwrap_or_default();
        for (_, port, host) in c.ports.iter_mut() {
            *host = ports
                .get(&format!("{port}/tcp"))
                .cloned()
                .flatten()
                .unwrap_or_default()
                .into_iter()
                .find_map(|b| b.host_port.and_then(|p| p.parse().ok()));
        }
    }

    /// `nestor.dev/host-port` (the first container's first port) and
    /// `nestor.dev/host-port-<name>` for every named port.
    async fn annotate_ports(&self, name: &str, containers: &[Ctr]) -> anyhow::Result<()> {
        let mut ann = serde_json::Map::new();
        if let Some((_, _, Some(hp))) = containers.first().and_then(|c| c.ports.first()) {
            ann.insert(HOST_PORT_ANNOTATION.into(), json!(hp.to_string()));
        }
        for c in containers {
            for (pname, _, hp) in &c.ports {
                if let (Some(n), Some(hp)) = (pname, hp) {
                    ann.insert(format!("{HOST_PORT_ANNOTATION_PREFIX}{n}"), json!(hp.to_string()));
                }
            }
        }
        if ann.is_empty() {
            return Ok(());
        }
        let patch = json!({"metadata": {"annotations": ann}});
        bounded("annotate pod", self.pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))).await?;
        Ok(())
    }

    /// Environment of `c`: literals, `secretKeyRef`s and `envFrom` Secrets resolved. Err:
    /// the kubelet's waiting reason and message.
    async fn resolve_env(&self, c: &k8s_openapi::api::core::v1::Container) -> anyhow::Result<Result<Vec<String>, (String, String)>> {
        let mut env = Vec::new();
        let mut secrets: HashMap<String, Secret> = HashMap::new();
        let missing = |n: &str| Ok(Err(("CreateContainerConfigError".to_owned(), format!("secret \"{n}\" not found"))));
        for from in c.env_from.iter().flatten() {
            let Some(r) = from.secret_ref.as_ref() else { continue };
            let Some(s) = bounded("get secret", self.secrets.get_opt(&r.name)).await? else {
                if r.optional == Some(true) {
                    continue;
                }
                return missing(&r.name);
            };
            for (k, v) in s.data.iter().flatten() {
                env.push(format!("{}{k}={}", from.prefix.clone().unwrap_or_default(), String::from_utf8_lossy(&v.0)));
            }
        }
        for e in c.env.iter().flatten() {
            if let Some(v) = &e.value {
                env.push(format!("{}={v}", e.name));
            } else if let Some(r) = e.value_from.as_ref().and_then(|f| f.secret_key_ref.as_ref()) {
                if !secrets.contains_key(&r.name) {
                    match bounded("get secret", self.secrets.get_opt(&r.name)).await? {
                        Some(s) => {
                            secrets.insert(r.name.clone(), s);
                        }
                        None => return missing(&r.name),
                    }
                }
                let val = secrets[&r.name].data.as_ref().and_then(|d| d.get(&r.key)).map(|b| String::from_utf8_lossy(&b.0).into_owned());
                match val {
                    Some(v) => env.push(format!("{}={v}", e.name)),
                    None if r.optional == Some(true) => {}
                    None => {
                        return Ok(Err((
                            "CreateContainerConfigError".to_owned(),
                            format!("couldn't find key {} in Secret {}/{}", r.key, self.ns, r.name),
                        )))
                    }
                }
            }
        }
        Ok(Ok(env))
    }

    /// Open a volume Docker just made to all users (mode 0777), as the kubelet makes an
    /// emptyDir: on this host when the engine's directory is reachable (a local engine, run as
    /// root), else from a one-shot root container of `image` (present on the node: it is the
    /// pod's). Fails when neither can, rather than give the pod a volume it cannot write.
    async fn open_new_volume(&self, vol: &str, mountpoint: &str, image: &str) -> anyhow::Result<()> {
        if open_to_all(mountpoint) {
            return Ok(());
        }
        let name = format!("{vol}-chmod");
        let remove = || self.docker.remove_container(&name, Some(RemoveContainerOptions { force: true, v: false, link: false }));
        let _ = dbounded("remove stale chmod container", remove()).await;
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            user: Some("0:0".into()),
            entrypoint: Some(vec!["chmod".into()]),
            cmd: Some(vec!["0777".into(), "/v".into()]),
            labels: Some(HashMap::from([(LABEL_NODE.to_owned(), self.node.clone())])),
            host_config: Some(HostConfig { mounts: Some(vec![volume_mount(vol.to_owned(), "/v".into(), None)]), ..Default::default() }),
            ..Default::default()
        };
        let create = CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
        let ran = async {
            dbounded("create chmod container", self.docker.create_container(Some(create), body)).await?;
            dbounded("start chmod container", self.docker.start_container(&name, None)).await?;
            let mut wait = self.docker.wait_container(&name, None);
            match tokio::time::timeout(Duration::from_secs(60), wait.next()).await {
                Ok(Some(Ok(_))) => Ok(()),
                Ok(Some(Err(e))) => Err(anyhow::Error::new(e).context("chmod container")),
                Ok(None) => anyhow::bail!("chmod container: no exit status"),
                Err(_) => anyhow::bail!("chmod container: timed out"),
            }
        }
        .await;
        let _ = dbounded("remove chmod container", remove()).await;
        ran.with_context(|| format!("cannot open volume {vol} to all users (neither at {mountpoint} nor from a container of {image})"))
    }

    /// Creates and starts one container of pod `p` (its volumes shared with the pod's other
    /// containers: one Docker volume per pod volume). `publish`: publish its ports on
    /// loopback (main containers). Err: the kubelet's waiting reason and message.
    async fn create_ctr(
        &self,
        p: &Pod,
        c: &k8s_openapi::api::core::v1::Container,
        dname: &str,
        publish: bool,
    ) -> anyhow::Result<Result<Ctr, (String, String)>> {
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let spec = p.spec.as_ref().context("pod without spec")?;
        let image = c.image.clone().unwrap_or_default();
        // The image: there is no registry, so it must be present.
        if dbounded("inspect image", self.docker.inspect_image(&image)).await.is_err() {
            let never = c.image_pull_policy.as_deref() == Some("Never");
            return Ok(Err(if never {
                ("ErrImageNeverPull".into(), format!("Container image \"{image}\" is not present with pull policy of Never"))
            } else {
                ("ErrImagePull".into(), format!("image \"{image}\" is not present on the node and no registry is reachable"))
            }));
        }
        let env = match self.resolve_env(c).await? {
            Ok(e) => e,
            Err(w) => return Ok(Err(w)),
        };
        let mut mounts = Vec::new();
        for vm in c.volume_mounts.iter().flatten() {
            let Some(v) = spec.volumes.iter().flatten().find(|v| v.name == vm.name) else { continue };
            let (vol, labels) = if let Some(claim) = &v.persistent_volume_claim {
                if bounded("get pvc", self.pvcs.get_opt(&claim.claim_name)).await?.is_none() {
                    return Ok(Err(("ContainerCreating".into(), format!("persistentvolumeclaim \"{}\" not found", claim.claim_name))));
                }
                (
                    format!("nna-{}-{}-pvc-{}", self.node, self.ns, claim.claim_name),
                    HashMap::from([(LABEL_NODE.to_owned(), self.node.clone()), (LABEL_PVC.to_owned(), claim.claim_name.clone())]),
                )
            } else {
                (
                    format!("nna-{}-{uid}-{}", self.node, v.name),
                    HashMap::from([(LABEL_NODE.to_owned(), self.node.clone()), (LABEL_POD_UID.to_owned(), uid.clone())]),
                )
            };
            // Volumes start empty and writable by anyone, as the kubelet makes an emptyDir
            // (mode 0777) and a provisioner a fresh PVC; a volume that exists (a PVC's, or
            // one another container of the pod made) is left as it is. Docker's copy of the
            // image's content into a new volume is off: an image's empty /workspace/project
            // would look like a tree already on the volume.
            let is_new = dbounded("inspect volume", self.docker.inspect_volume(&vol)).await.is_err();
            let req = bollard::models::VolumeCreateRequest { name: Some(vol.clone()), labels: Some(labels), ..Default::default() };
            let created = dbounded("create volume", self.docker.create_volume(req)).await?;
            if is_new {
                self.open_new_volume(&vol, &created.mountpoint, &image).await?;
            }
            mounts.push(volume_mount(vol, vm.mount_path.clone(), vm.read_only));
        }
        let ports: Vec<(Option<String>, u16, Option<u16>)> = if publish {
            let declared: Vec<_> = c.ports.iter().flatten().map(|p| (p.name.clone(), p.container_port as u16, None)).collect();
            declared
        } else {
            Vec::new()
        };
        let psc = spec.security_context.as_ref();
        let sc = c.security_context.as_ref();
        let user = sc.and_then(|s| s.run_as_user).or_else(|| psc.and_then(|s| s.run_as_user));
        let group = sc.and_then(|s| s.run_as_group).or_else(|| psc.and_then(|s| s.run_as_group));
        let user = user.map(|u| match group {
            Some(g) => format!("{u}:{g}"),
            None => u.to_string(),
        });
        let drop_caps = sc.and_then(|s| s.capabilities.as_ref()).and_then(|c| c.drop.clone());
        let no_new_privs = sc.and_then(|s| s.allow_privilege_escalation) == Some(false);
        let limits = c.resources.as_ref().and_then(|r| r.limits.clone()).unwrap_or_default();
        let memory = limits.get("memory").and_then(|q| parse_bytes(&q.0));
        let nano_cpus = limits.get("cpu").and_then(|q| parse_cpu(&q.0));
        let first_port = ports.first().map(|p| p.1).unwrap_or(8000);
        let probe = c.readiness_probe.as_ref().and_then(|pr| {
            let h = pr.http_get.as_ref()?;
            let pport = match &h.port {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => *i as u16,
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(_) => first_port,
            };
            Some((h.path.clone().unwrap_or_else(|| "/".into()), pport, Duration::from_secs(pr.period_seconds.unwrap_or(10).max(1) as u64)))
        });
        let keys: Vec<String> = ports.iter().map(|(_, p, _)| format!("{p}/tcp")).collect();
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            entrypoint: c.command.clone(),
            cmd: c.args.clone(),
            env: Some(env),
            user,
            labels: Some(HashMap::from([
                (LABEL_NODE.to_owned(), self.node.clone()),
                (LABEL_POD_UID.to_owned(), uid.clone()),
                (LABEL_POD.to_owned(), format!("{}/{name}", self.ns)),
            ])),
            exposed_ports: Some(keys.clone()),
            host_config: Some(HostConfig {
                mounts: Some(mounts),
                port_bindings: Some(
                    keys.into_iter()
                        .map(|k| (k, Some(vec![PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) }])))
                        .collect(),
                ),
                cap_drop: drop_caps,
                security_opt: no_new_privs.then(|| vec!["no-new-privileges:true".into()]),
                memory,
                nano_cpus,
                init: Some(true),
                privileged: Some(false),
                // Like a cluster's DNS for host services: a fake LLM on the host, nestor's
                // internal listener on the bridge gateway.
                extra_hosts: Some(vec!["host.docker.internal:host-gateway".into()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let _ = dbounded(
            "remove stale container",
            self.docker.remove_container(dname, Some(RemoveContainerOptions { force: true, v: false, link: false })),
        )
        .await;
        dbounded(
            "create container",
            self.docker.create_container(Some(CreateContainerOptions { name: Some(dname.to_owned()), ..Default::default() }), body),
        )
        .await?;
        dbounded("start container", self.docker.start_container(dname, None)).await?;
        let mut ctr = Ctr {
            name: c.name.clone(),
            image,
            docker: dname.to_owned(),
            ports,
            probe,
            last_probe: None,
            ready: false,
            running: true,
            restarts: 0,
            next_restart: None,
            last_exit: None,
            started_at: now_rfc3339(),
        };
        self.publish(&mut ctr).await;
        Ok(Ok(ctr))
    }

    async fn start_pod(&mut self, p: &Pod) -> anyhow::Result<()> {
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let spec = p.spec.as_ref().context("pod without spec")?;
        spec.containers.first().context("pod without containers")?;
        let mut run = Run { uid: uid.clone(), name, init_done: 0, init: None, containers: Vec::new(), started_at: now_rfc3339(), reported: None };
        let inits = spec.init_containers.clone().unwrap_or_default();
        if inits.is_empty() {
            if !self.start_main(p, &mut run).await? {
                return Ok(()); // reported; tried again next round
            }
        } else {
            self.step_init(p, &mut run, &inits).await?;
            if run.init.is_none() {
                return Ok(()); // could not be made (reported)
            }
        }
        let status = self.status_of(p, &run, &inits);
        self.patch_status(&run.name.clone(), status.clone()).await?;
        run.reported = Some(status);
        self.runs.insert(uid, run);
        Ok(())
    }
}

fn container_name(ns: &str, name: &str, uid: &str) -> String {
    format!("k8s_{ns}_{name}_{}", &uid[..uid.len().min(8)])
}

/// `4Gi`, `512Mi`, `1G`, `1000` -> bytes.
fn parse_bytes(q: &str) -> Option<i64> {
    let units: &[(&str, i64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (u, m) in units {
        if let Some(n) = q.strip_suffix(u) {
            return n.parse::<f64>().ok().map(|v| (v * *m as f64) as i64);
        }
    }
    q.parse().ok()
}

/// `250m`, `2`, `0.5` -> nano CPUs.
fn parse_cpu(q: &str) -> Option<i64> {
    if let Some(m) = q.strip_suffix('m') {
        return m.parse::<i64>().ok().map(|v| v * 1_000_000);
    }
    q.parse::<f64>().ok().map(|v| (v * 1e9) as i64)
}

/// What every Kubernetes test starts with: a namespace of its own and a node agent running
/// that namespace's pods. [`TestNode::finish`] removes both and checks that the agent left
/// no container or volume behind.
pub struct TestNode {
    pub ns: crate::kube_env::TestNamespace,
    agent: Option<NodeAgent>,
}

impl TestNode {
    /// A namespace named `prefix-<random>` and its node agent (panics on failure: tests only).
    pub async fn start(env: &crate::kube_env::KubeEnv, prefix: &str) -> TestNode {
        let ns = crate::kube_env::TestNamespace::create(env, prefix).await.expect("test namespace");
        let agent = NodeAgent::start(NodeAgentConfig {
            kubeconfig: env.admin.clone(),
            namespace: ns.name.clone(),
            node_name: format!("node-{}", ns.name),
            docker_host: None,
        })
        .await
        .expect("node agent");
        TestNode { ns, agent: Some(agent) }
    }

    /// Delete the namespace, stop the agent, and assert nothing of the node is left.
    pub async fn finish(mut self) {
        let node = format!("node-{}", self.ns.name);
        self.ns.shutdown().await;
        if let Some(a) = self.agent.take() {
            a.shutdown().await;
        }
        let docker = connect_docker(None).await.expect("docker");
        let (cs, vs) = leftovers(&docker, &node).await;
        assert!(cs.is_empty() && vs.is_empty(), "node agent left {cs:?} {vs:?}");
    }
}

/// Everything the agent made for `node`, for tests that check cleanup.
pub async fn leftovers(docker: &Docker, node: &str) -> (Vec<String>, Vec<String>) {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_NODE}={node}")])]);
    let cs = docker
        .list_containers(Some(ListContainersOptions { all: true, filters: Some(filters.clone()), ..Default::default() }))
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| c.names.and_then(|n| n.into_iter().next()))
        .collect();
    let vs = docker
        .list_volumes(Some(ListVolumesOptions { filters: Some(filters) }))
        .await
        .ok()
        .and_then(|v| v.volumes)
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.name)
        .collect();
    (cs, vs)
}

/// A pod volume's mount: Docker's copy of the image's content into a new volume off.
fn volume_mount(vol: String, target: String, read_only: Option<bool>) -> Mount {
    Mount {
        typ: Some(MountType::VOLUME),
        source: Some(vol),
        target: Some(target),
        read_only,
        volume_options: Some(bollard::models::MountVolumeOptions { no_copy: Some(true), ..Default::default() }),
        ..Default::default()
    }
}

/// Make a volume's root directory mode 0777 on this host. False when this process cannot
/// reach or change it (an engine whose directory is root's and this process is not, or a
/// remote engine).
fn open_to_all(mountpoint: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    !mountpoint.is_empty() && std::fs::set_permissions(mountpoint, std::fs::Permissions::from_mode(0o777)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_bytes("4Gi"), Some(4 << 30));
        assert_eq!(parse_bytes("512Mi"), Some(512 << 20));
        assert_eq!(parse_bytes("1000"), Some(1000));
        assert_eq!(parse_cpu("250m"), Some(250_000_000));
        assert_eq!(parse_cpu("2"), Some(2_000_000_000));
    }
}
