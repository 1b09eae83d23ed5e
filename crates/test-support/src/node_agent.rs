//! `nestor-node-agent`: a tiny kubelet + scheduler for tests, so nestor's kubernetes
//! provisioner runs real agent-server pods against a real kube-apiserver without a cluster.
//!
//! There is no scheduler and no kubelet in the test set-up (scripts/setup-kube.sh starts only
//! etcd and kube-apiserver), so this agent does both jobs for one namespace:
//! * **schedules**: a pod with no `spec.nodeName` is bound to this node (`pods/binding`, as the
//!   scheduler does);
//! * **runs** each pod bound to it as a Docker container of the pod's image (first container
//!   only): env literals and `valueFrom.secretKeyRef` (read from the Secret; a missing Secret
//!   is `CreateContainerConfigError`, like the kubelet), `command`/`args`, the
//!   securityContext's user/group, `drop: [ALL]`, no-new-privileges, cpu/memory limits, PVC
//!   volumes as named Docker volumes (kept until the PVC is deleted) and emptyDirs as
//!   volumes removed with the pod. The container port is published on **127.0.0.1 only**,
//!   on a random host port, written into the pod annotation `nestor.dev/host-port`;
//! * **reports status** like a kubelet: `podIP` 127.0.0.1, phase, container statuses
//!   (`ErrImageNeverPull`/`ErrImagePull` for an image that is not present — there is no
//!   registry —, running, terminated, restarts with back-off), and the `Ready` condition from
//!   the pod's readinessProbe (`httpGet`, run against the published port);
//! * **deletes**: a pod marked for deletion has its container stopped (grace period
//!   honoured, bounded) and removed, then the pod is deleted for good (grace 0), as the
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
    container: String,
    host_port: Option<u16>,
    probe: Option<(String, u16, Duration)>,
    last_probe: Option<Instant>,
    ready: bool,
    restarts: i32,
    next_restart: Option<Instant>,
    last_exit: Option<i64>,
    started_at: String,
    reported: Option<serde_json::Value>,
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
            if let Some(r) = self.runs.remove(&uid) {
                self.remove_container(&r.container, Duration::from_secs(1)).await;
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

    /// Stop and remove the pod's container, then confirm the deletion (grace 0).
    async fn finish_delete(&mut self, p: &Pod) {
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let grace = p.metadata.deletion_grace_period_seconds.unwrap_or(0).clamp(0, 10) as u64;
        if let Some(r) = self.runs.remove(&uid) {
            self.remove_container(&r.container, Duration::from_secs(grace)).await;
        } else {
            self.remove_container(&container_name(&self.ns, &name, &uid), Duration::from_secs(1)).await;
        }
        self.remove_pod_volumes(&uid).await;
        let dp = DeleteParams { grace_period_seconds: Some(0), preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }), ..Default::default() };
        let _ = bounded("delete pod", self.pods.delete(&name, &dp)).await;
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

    /// Report a container that cannot start (waiting with a reason), once per change.
    async fn report_waiting(&mut self, p: &Pod, reason: &str, message: &str) -> anyhow::Result<()> {
        let name = p.metadata.name.clone().unwrap_or_default();
        let cname = p.spec.as_ref().map(|s| s.containers[0].name.clone()).unwrap_or_default();
        let image = p.spec.as_ref().and_then(|s| s.containers[0].image.clone()).unwrap_or_default();
        let already = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.waiting.as_ref())
            .is_some_and(|w| w.reason.as_deref() == Some(reason));
        if already {
            return Ok(());
        }
        self.patch_status(
            &name,
            json!({
                "phase": "Pending",
                "hostIP": "127.0.0.1",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
                ],
                "containerStatuses": [{
                    "name": cname, "image": image, "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": reason, "message": message}},
                }],
            }),
        )
        .await
    }

    async fn sync_pod(&mut self, p: &Pod) -> anyhow::Result<()> {
        let uid = p.metadata.uid.clone().unwrap_or_default();
        if !self.runs.contains_key(&uid) {
            return self.start_pod(p).await;
        }
        let name = p.metadata.name.clone().unwrap_or_default();
        let mut run = self.runs.get(&uid).cloned().expect("present");
        // Exited? Restart (restartPolicy Always) with back-off.
        let info = dbounded("inspect container", self.docker.inspect_container(&run.container, None)).await;
        let running = match &info {
            Ok(i) => i.state.as_ref().and_then(|s| s.running).unwrap_or(false),
            Err(e) if is_docker_404(e) => false,
            Err(_) => return Ok(()),
        };
        if !running {
            run.ready = false;
            if run.next_restart.is_none() {
                run.last_exit = info.as_ref().ok().and_then(|i| i.state.as_ref()).and_then(|s| s.exit_code);
                let backoff = Duration::from_secs(1 << run.restarts.clamp(0, 4));
                run.next_restart = Some(Instant::now() + backoff);
            }
            if run.next_restart.is_some_and(|t| Instant::now() >= t)
                && info.is_ok()
                && dbounded("start container", self.docker.start_container(&run.container, None)).await.is_ok()
            {
                run.restarts += 1;
                run.next_restart = None;
                run.started_at = now_rfc3339();
                run.host_port = self.host_port(&run.container).await;
                if let Some(port) = run.host_port {
                    self.annotate_port(&name, port).await?;
                }
            }
        } else if let (Some((path, _, period)), Some(port)) = (run.probe.clone(), run.host_port) {
            if run.last_probe.is_none_or(|t| t.elapsed() >= period) {
                run.last_probe = Some(Instant::now());
                let url = format!("http://127.0.0.1:{port}{path}");
                run.ready = matches!(
                    tokio::time::timeout(Duration::from_secs(2), self.http.get(&url).send()).await,
                    Ok(Ok(r)) if r.status().is_success()
                );
            }
        } else if run.probe.is_none() {
            run.ready = true;
        }
        let status = self.status_of(p, &run, running);
        if run.reported.as_ref() != Some(&status) {
            self.patch_status(&name, status.clone()).await?;
            run.reported = Some(status);
        }
        self.runs.insert(uid, run);
        Ok(())
    }

    fn status_of(&self, p: &Pod, run: &Run, running: bool) -> serde_json::Value {
        let c = &p.spec.as_ref().expect("spec").containers[0];
        let ready = running && run.ready;
        let state = if running {
            json!({"running": {"startedAt": run.started_at}})
        } else {
            json!({"waiting": {"reason": "CrashLoopBackOff", "message": format!("back-off restarting failed container (exit code {})", run.last_exit.unwrap_or(-1))}})
        };
        let mut cs = json!({
            "name": c.name, "image": c.image, "imageID": "", "containerID": format!("docker://{}", run.container),
            "ready": ready, "started": running, "restartCount": run.restarts, "state": state,
        });
        if let Some(code) = run.last_exit.filter(|_| run.restarts > 0 || !running) {
            cs["lastState"] = json!({"terminated": {"exitCode": code, "reason": "Error"}});
        }
        let cond = |t: &str, ok: bool| json!({"type": t, "status": if ok { "True" } else { "False" }});
        json!({
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": run.started_at,
            "conditions": [cond("PodScheduled", true), cond("Initialized", true), cond("ContainersReady", ready), cond("Ready", ready)],
            "containerStatuses": [cs],
        })
    }

    async fn host_port(&self, container: &str) -> Option<u16> {
        let i = dbounded("inspect container", self.docker.inspect_container(container, None)).await.ok()?;
        let ports = i.network_settings?.ports?;
        for (_, bindings) in ports {
            for b in bindings.unwrap_or_default() {
                if let Some(p) = b.host_port.and_then(|p| p.parse().ok()) {
                    return Some(p);
                }
            }
        }
        None
    }

    async fn annotate_port(&self, name: &str, port: u16) -> anyhow::Result<()> {
        let patch = json!({"metadata": {"annotations": {HOST_PORT_ANNOTATION: port.to_string()}}});
        bounded("annotate pod", self.pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))).await?;
        Ok(())
    }

    async fn start_pod(&mut self, p: &Pod) -> anyhow::Result<()> {
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let spec = p.spec.as_ref().context("pod without spec")?;
        let c = spec.containers.first().context("pod without containers")?;
        let image = c.image.clone().unwrap_or_default();
        // The image: there is no registry, so it must be present.
        if dbounded("inspect image", self.docker.inspect_image(&image)).await.is_err() {
            let never = c.image_pull_policy.as_deref() == Some("Never");
            let (reason, msg) = if never {
                ("ErrImageNeverPull", format!("Container image \"{image}\" is not present with pull policy of Never"))
            } else {
                ("ErrImagePull", format!("image \"{image}\" is not present on the node and no registry is reachable"))
            };
            return self.report_waiting(p, reason, &msg).await;
        }
        // Environment, with Secret references resolved.
        let mut env = Vec::new();
        let mut secrets: HashMap<String, Secret> = HashMap::new();
        for e in c.env.iter().flatten() {
            if let Some(v) = &e.value {
                env.push(format!("{}={v}", e.name));
            } else if let Some(r) = e.value_from.as_ref().and_then(|f| f.secret_key_ref.as_ref()) {
                if !secrets.contains_key(&r.name) {
                    match bounded("get secret", self.secrets.get_opt(&r.name)).await? {
                        Some(s) => {
                            secrets.insert(r.name.clone(), s);
                        }
                        None => {
                            return self
                                .report_waiting(p, "CreateContainerConfigError", &format!("secret \"{}\" not found", r.name))
                                .await
                        }
                    }
                }
                let val = secrets[&r.name]
                    .data
                    .as_ref()
                    .and_then(|d| d.get(&r.key))
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned());
                match val {
                    Some(v) => env.push(format!("{}={v}", e.name)),
                    None => {
                        return self
                            .report_waiting(
                                p,
                                "CreateContainerConfigError",
                                &format!("couldn't find key {} in Secret {}/{}", r.key, self.ns, r.name),
                            )
                            .await
                    }
                }
            }
        }
        // Volumes.
        let mut mounts = Vec::new();
        for vm in c.volume_mounts.iter().flatten() {
            let Some(v) = spec.volumes.iter().flatten().find(|v| v.name == vm.name) else { continue };
            let (vol, labels) = if let Some(claim) = &v.persistent_volume_claim {
                if bounded("get pvc", self.pvcs.get_opt(&claim.claim_name)).await?.is_none() {
                    return self
                        .report_waiting(p, "ContainerCreating", &format!("persistentvolumeclaim \"{}\" not found", claim.claim_name))
                        .await;
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
            let req = bollard::models::VolumeCreateRequest { name: Some(vol.clone()), labels: Some(labels), ..Default::default() };
            dbounded("create volume", self.docker.create_volume(req)).await?;
            mounts.push(Mount {
                typ: Some(MountType::VOLUME),
                source: Some(vol),
                target: Some(vm.mount_path.clone()),
                read_only: vm.read_only,
                ..Default::default()
            });
        }
        let port = c.ports.iter().flatten().next().map(|p| p.container_port).unwrap_or(8000);
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
        let probe = c.readiness_probe.as_ref().and_then(|pr| {
            let h = pr.http_get.as_ref()?;
            let pport = match &h.port {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => *i as u16,
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(_) => port as u16,
            };
            Some((h.path.clone().unwrap_or_else(|| "/".into()), pport, Duration::from_secs(pr.period_seconds.unwrap_or(10).max(1) as u64)))
        });
        let cname = container_name(&self.ns, &name, &uid);
        let key = format!("{port}/tcp");
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
            exposed_ports: Some(vec![key.clone()]),
            host_config: Some(HostConfig {
                mounts: Some(mounts),
                port_bindings: Some(HashMap::from([(
                    key,
                    Some(vec![PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) }]),
                )])),
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
            self.docker.remove_container(&cname, Some(RemoveContainerOptions { force: true, v: false, link: false })),
        )
        .await;
        dbounded(
            "create container",
            self.docker.create_container(Some(CreateContainerOptions { name: Some(cname.clone()), ..Default::default() }), body),
        )
        .await?;
        dbounded("start container", self.docker.start_container(&cname, None)).await?;
        let host_port = self.host_port(&cname).await;
        if let Some(hp) = host_port {
            self.annotate_port(&name, hp).await?;
        }
        let run = Run {
            uid: uid.clone(),
            name: name.clone(),
            container: cname,
            host_port,
            probe: probe.map(|(path, _, period)| (path, port as u16, period)),
            last_probe: None,
            ready: false,
            restarts: 0,
            next_restart: None,
            last_exit: None,
            started_at: now_rfc3339(),
            reported: None,
        };
        tracing::debug!(pod = %run.name, uid = %run.uid, port = ?host_port, "pod container started");
        let status = self.status_of(p, &run, true);
        self.patch_status(&name, status.clone()).await?;
        self.runs.insert(uid, Run { reported: Some(status), ..run });
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
