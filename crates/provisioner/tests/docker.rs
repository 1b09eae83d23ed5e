//! The docker provisioner against the real Docker engine and the real agent-server image.
//!
//! Needs a reachable engine (`DOCKER_HOST` or the local socket; `scripts/setup-docker.sh`)
//! and the image `NESTOR_TEST_AGENT_SERVER_IMAGE` (default `nestor/agent-server:1.58.2`;
//! `scripts/build-agent-server-image.sh` builds it and prints the tag). Without them the
//! engine tests print why and pass as skipped, unless `NESTOR_TEST_REQUIRE_DOCKER=1` (CI),
//! which makes a missing engine or image a failure.
//!
//! Every test labels what it creates with its own instance id and removes everything with
//! that label afterwards, also when it fails.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::query_parameters::{
    InspectContainerOptions, ListContainersOptions, ListVolumesOptions, RemoveContainerOptions, RemoveVolumeOptions,
};
use bollard::Docker;
use bytes::Bytes;
use futures::StreamExt;
use http::Method;
use nestor_core::{ConversationId, Downstream, DownstreamClient, DownstreamState, UserId};
use nestor_provisioner::docker::{DockerConfig, DockerProvisioner};
use nestor_provisioner::{ProvisionError, ProvisionRequest, Provisioner};

const INSTANCE_LABEL: &str = "org.nestor.instance";

fn image() -> String {
    std::env::var("NESTOR_TEST_AGENT_SERVER_IMAGE")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "nestor/agent-server:1.58.2".into())
}

fn docker() -> Option<Docker> {
    let host = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
    let d = if host.starts_with("unix://") {
        Docker::connect_with_unix(&host, 30, bollard::API_DEFAULT_VERSION).ok()?
    } else {
        Docker::connect_with_http(&host, 30, bollard::API_DEFAULT_VERSION).ok()?
    };
    Some(d)
}

/// The engine, negotiated, if it is reachable and has the image; else why not.
async fn engine() -> Result<Docker, String> {
    let d = docker().ok_or("no Docker socket (set DOCKER_HOST or run scripts/setup-docker.sh)")?;
    let d = tokio::time::timeout(Duration::from_secs(5), d.negotiate_version())
        .await
        .map_err(|_| "the Docker engine does not answer".to_owned())?
        .map_err(|e| format!("no Docker engine reachable: {e}"))?;
    let img = image();
    if d.inspect_image(&img).await.is_err() {
        return Err(format!("image {img} is not present (scripts/build-agent-server-image.sh builds it)"));
    }
    Ok(d)
}

/// Skip (return) when there is no engine, unless CI requires one.
macro_rules! require_engine {
    () => {
        match engine().await {
            Ok(d) => d,
            Err(why) => {
                if std::env::var("NESTOR_TEST_REQUIRE_DOCKER").as_deref() == Ok("1") {
                    panic!("NESTOR_TEST_REQUIRE_DOCKER=1 but: {why}");
                }
                eprintln!("SKIPPED (no docker engine): {why}");
                return;
            }
        }
    };
}

struct Ctx {
    dir: tempfile::TempDir,
    instance: String,
    docker: Docker,
}

impl Ctx {
    fn root(&self) -> PathBuf {
        self.dir.path().join("docker")
    }

    fn cfg(&self) -> DockerConfig {
        DockerConfig {
            image: Some(image()),
            instance_id: Some(self.instance.clone()),
            // Several agent-servers start at once on small CI machines.
            startup_timeout_secs: Some(240.0),
            stop_timeout_secs: Some(5.0),
            ..Default::default()
        }
    }

    /// A cheap stand-in for the agent-server (same image, a tiny HTTP server answering
    /// /alive), for tests about many containers or about the provisioner's own bookkeeping.
    fn cheap_cfg(&self) -> DockerConfig {
        DockerConfig {
            entrypoint: Some(vec![
                "sh".into(),
                "-c".into(),
                "mkdir -p /tmp/www && echo ok > /tmp/www/alive && cd /tmp/www && exec python3 -m http.server 8000 >/dev/null 2>&1"
                    .into(),
            ]),
            memory: Some(nestor_provisioner::docker::ByteSize::Text("128m".into())),
            cpus: Some(0.5),
            ..self.cfg()
        }
    }

    fn provisioner(&self, cfg: &DockerConfig) -> DockerProvisioner {
        DockerProvisioner::new(cfg, self.root(), DownstreamClient::default()).unwrap()
    }

    async fn containers(&self) -> Vec<bollard::models::ContainerSummary> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{INSTANCE_LABEL}={}", self.instance)])]);
        self.docker
            .list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() }))
            .await
            .unwrap()
    }

    async fn volumes(&self) -> Vec<String> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{INSTANCE_LABEL}={}", self.instance)])]);
        let v = self.docker.list_volumes(Some(ListVolumesOptions { filters: Some(filters) })).await.unwrap();
        v.volumes.unwrap_or_default().into_iter().map(|v| v.name).collect()
    }

    async fn inspect(&self, name: &str) -> Option<bollard::models::ContainerInspectResponse> {
        self.docker.inspect_container(name, None::<InspectContainerOptions>).await.ok()
    }

    async fn started_at(&self, name: &str) -> String {
        self.inspect(name).await.unwrap().state.unwrap().started_at.unwrap()
    }
}

/// Remove every container and volume labelled with `instance`.
async fn cleanup(docker: &Docker, instance: &str) {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{INSTANCE_LABEL}={instance}")])]);
    if let Ok(list) = docker
        .list_containers(Some(ListContainersOptions { all: true, filters: Some(filters.clone()), ..Default::default() }))
        .await
    {
        let removals = list.into_iter().filter_map(|c| c.id).map(|id| {
            let d = docker.clone();
            async move {
                let opts = RemoveContainerOptions { force: true, ..Default::default() };
                let _ = tokio::time::timeout(Duration::from_secs(30), d.remove_container(&id, Some(opts))).await;
            }
        });
        futures::future::join_all(removals).await;
    }
    if let Ok(nets) = docker
        .list_networks(Some(bollard::query_parameters::ListNetworksOptions { filters: Some(filters.clone()) }))
        .await
    {
        for n in nets.into_iter().filter_map(|n| n.id) {
            let _ = tokio::time::timeout(Duration::from_secs(30), docker.remove_network(&n)).await;
        }
    }
    if let Ok(v) = docker.list_volumes(Some(ListVolumesOptions { filters: Some(filters) })).await {
        for v in v.volumes.unwrap_or_default() {
            let _ = tokio::time::timeout(
                Duration::from_secs(30),
                docker.remove_volume(&v.name, Some(RemoveVolumeOptions { force: true })),
            )
            .await;
        }
    }
}

/// Run `f` with a fresh instance; remove what it created afterwards, also on panic.
async fn with_instance<F, Fut>(docker: Docker, f: F)
where
    F: FnOnce(Arc<Ctx>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let instance = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let ctx = Arc::new(Ctx { dir: tempfile::tempdir().unwrap(), instance: instance.clone(), docker: docker.clone() });
    let r = tokio::spawn(f(ctx.clone())).await;
    cleanup(&docker, &instance).await;
    if let Err(e) = r {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
        panic!("test task failed: {e}");
    }
}

fn req(conv: ConversationId) -> ProvisionRequest {
    ProvisionRequest { conversation: conv, owner: UserId::new("alice") }
}

async fn call(ds: &Downstream, method: Method, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    let ep = ds.endpoint().expect("endpoint");
    let client = DownstreamClient::default();
    let body = body.map(|b| Bytes::from(serde_json::to_vec(&b).unwrap()));
    match client.call_bytes(&ep, method, path, body, Duration::from_secs(60), 16 << 20).await {
        Ok((s, b)) => (s.as_u16(), serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null)),
        Err(nestor_core::client::ClientError::Status { status, body }) => {
            (status.as_u16(), serde_json::Value::String(body))
        }
        Err(e) => panic!("{path}: {e}"),
    }
}

/// A create body the server accepts without talking to any LLM.
fn create_body(p: &DockerProvisioner, ds: &Downstream, conv: ConversationId) -> serde_json::Value {
    let mut body = serde_json::json!({
        "conversation_id": conv.to_string(),
        "agent": {"kind": "Agent", "llm": {"usage_id": "agent", "model": "openai/fake",
                  "base_url": "http://127.0.0.1:9/v1", "api_key": "x"}, "tools": [{"name": "terminal"}]},
        "workspace": {"kind": "LocalWorkspace", "working_dir": "/home/somebody/elsewhere"},
        "autotitle": false
    })
    .as_object()
    .unwrap()
    .clone();
    p.prepare_create(ds, &mut body);
    serde_json::Value::Object(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provision_stop_restart_recreate_release() {
    let docker = require_engine!();
    with_instance(docker, |ctx| async move {
        let p = ctx.provisioner(&ctx.cfg());
        p.recover().await.unwrap();
        let conv = ConversationId::new_random();
        let t0 = Instant::now();
        let ds = p.provision(req(conv)).await.unwrap();
        let provisioned = t0.elapsed();
        p.ensure_ready(&ds, Duration::from_secs(240)).await.unwrap();
        eprintln!("TIMING create->ready: {:?} (provision call {:?})", t0.elapsed(), provisioned);
        assert_eq!(ds.kind(), "docker");
        assert_eq!(ds.primary(), Some(conv));
        let name = p.container_name(&conv);

        // The key is required, and nestor's endpoint carries it.
        let ep = ds.endpoint().unwrap();
        assert_eq!(ep.authority.host(), "127.0.0.1");
        assert!(DownstreamClient::default().is_alive(&ep, Duration::from_secs(5)).await);
        let mut no_key = (*ep).clone();
        no_key.key = None;
        let no_key = nestor_core::Endpoint::new(no_key.scheme, no_key.authority, no_key.base_path, None);
        let r = DownstreamClient::default()
            .call_bytes(&no_key, Method::GET, "/api/conversations/search", None, Duration::from_secs(10), 1 << 20)
            .await;
        assert!(matches!(r, Err(nestor_core::client::ClientError::Status { status, .. }) if status.as_u16() == 401), "{r:?}");

        // Hardened as documented.
        let info = ctx.inspect(&name).await.unwrap();
        let h = info.host_config.clone().unwrap();
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_owned()]));
        assert!(h.security_opt.unwrap().iter().any(|s| s.starts_with("no-new-privileges")));
        assert_eq!(h.pids_limit, Some(512));
        assert_eq!(h.memory, Some(4 << 30));
        assert_eq!(info.config.as_ref().unwrap().user.as_deref(), Some("10001:10001"));
        let ports = info.network_settings.unwrap().ports.unwrap();
        for b in ports["8000/tcp"].as_ref().unwrap() {
            assert_eq!(b.host_ip.as_deref(), Some("127.0.0.1"), "published on loopback only");
        }
        let mounts = info.mounts.unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].destination.as_deref(), Some("/workspace"));

        // A conversation, created in the container's workspace.
        let (status, created) = call(&ds, Method::POST, "/api/conversations", Some(create_body(&p, &ds, conv))).await;
        assert!((200..300).contains(&status), "{status}: {created}");
        assert_eq!(created["workspace"]["working_dir"], "/workspace/project");
        p.mark_active(&ds);

        // Idle stop keeps the container and its volume; ensure_ready starts it again.
        p.stop(&ds).await.unwrap();
        assert_eq!(ds.state(), DownstreamState::Stopped);
        assert!(ds.endpoint().is_none());
        assert_eq!(ctx.inspect(&name).await.unwrap().state.unwrap().running, Some(false));
        let t1 = Instant::now();
        p.ensure_ready(&ds, Duration::from_secs(240)).await.unwrap();
        eprintln!("TIMING stopped->ready: {:?}", t1.elapsed());
        let (status, got) = call(&ds, Method::GET, &format!("/api/conversations/{conv}"), None).await;
        assert_eq!(status, 200, "conversation survives a stop/start: {got}");

        // A container removed behind nestor's back is re-created from its volume, same keys.
        p.stop(&ds).await.unwrap();
        ctx.docker
            .remove_container(&name, Some(RemoveContainerOptions { force: true, ..Default::default() }))
            .await
            .unwrap();
        let t2 = Instant::now();
        p.ensure_ready(&ds, Duration::from_secs(240)).await.unwrap();
        eprintln!("TIMING re-created->ready: {:?}", t2.elapsed());
        let (status, got) = call(&ds, Method::GET, &format!("/api/conversations/{conv}"), None).await;
        assert_eq!(status, 200, "conversation survives a container re-creation: {got}");

        // Release removes container, volume and manifest.
        p.release(&ds, conv, 0).await.unwrap();
        assert_eq!(ds.state(), DownstreamState::Released);
        assert!(ctx.containers().await.is_empty());
        assert!(ctx.volumes().await.is_empty());
        assert!(!ctx.root().join(format!("{}.json", conv.hex())).exists());
        assert!(p.list().is_empty());
        p.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recover_readopts_running_containers_without_restarting_them() {
    let docker = require_engine!();
    with_instance(docker, |ctx| async move {
        let a = ctx.provisioner(&ctx.cfg());
        a.recover().await.unwrap();
        let conv = ConversationId::new_random();
        let ds = a.provision(req(conv)).await.unwrap();
        a.ensure_ready(&ds, Duration::from_secs(240)).await.unwrap();
        a.mark_active(&ds);
        let home = a.home().await.unwrap();
        let name = a.container_name(&conv);
        let started = ctx.started_at(&name).await;
        a.shutdown().await; // on_shutdown = keep (default)
        drop(a);
        assert_eq!(ctx.inspect(&name).await.unwrap().state.unwrap().running, Some(true));

        let b = ctx.provisioner(&ctx.cfg());
        let t = Instant::now();
        let owned = b.recover().await.unwrap();
        let took = t.elapsed();
        eprintln!("TIMING re-adopt of 2 real containers: {took:?}");
        assert_eq!(owned.len(), 2);
        let ds2 = b.get(ds.id()).unwrap();
        assert_eq!(ds2.state(), DownstreamState::Ready, "routable right after recover");
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert_eq!(ctx.started_at(&name).await, started, "not restarted");
        assert_eq!(ds2.owner().map(|o| o.as_str()), Some("alice"));
        let (status, _) = call(&ds2, Method::GET, "/api/conversations/search", None).await;
        assert_eq!(status, 200, "the recorded key still works");
        assert!(b.get(home.id()).is_some());
        let home2 = b.home().await.unwrap();
        assert_eq!(home2.id(), home.id());
        b.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_ensure_ready_starts_once() {
    let docker = require_engine!();
    with_instance(docker, |ctx| async move {
        let p = ctx.provisioner(&ctx.cheap_cfg());
        p.recover().await.unwrap();
        let conv = ConversationId::new_random();
        let ds = p.provision(req(conv)).await.unwrap();
        p.ensure_ready(&ds, Duration::from_secs(60)).await.unwrap();
        p.stop(&ds).await.unwrap();

        let filters = HashMap::from([
            ("label".to_owned(), vec![format!("{INSTANCE_LABEL}={}", ctx.instance)]),
            ("type".to_owned(), vec!["container".to_owned()]),
            ("event".to_owned(), vec!["start".to_owned(), "create".to_owned()]),
        ]);
        let now = || {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            format!("{}.{:09}", t.as_secs(), t.subsec_nanos())
        };
        let since = now();
        let waits = (0..8).map(|_| {
            let p = p.clone();
            let ds = ds.clone();
            async move { p.ensure_ready(&ds, Duration::from_secs(60)).await }
        });
        for r in futures::future::join_all(waits).await {
            r.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let until = now();
        let opts = bollard::query_parameters::EventsOptions { since: Some(since), until: Some(until), filters: Some(filters) };
        let events: Vec<_> = ctx.docker.events(Some(opts)).collect().await;
        let starts = events.iter().filter(|e| e.as_ref().unwrap().action.as_deref() == Some("start")).count();
        assert_eq!(starts, 1, "8 concurrent callers, one start: {events:?}");

        // A container that dies while ready is noticed (engine event), and started again.
        ctx.docker.kill_container(&p.container_name(&conv), None::<bollard::query_parameters::KillContainerOptions>).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(ds.state(), DownstreamState::Failed(_)) {
            assert!(Instant::now() < deadline, "death not noticed: {:?}", ds.state());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p.ensure_ready(&ds, Duration::from_secs(60)).await.unwrap();
        p.release(&ds, conv, 0).await.unwrap();
        p.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sweep_removes_orphans_and_half_created() {
    let docker = require_engine!();
    with_instance(docker, |ctx| async move {
        let mut cfg = ctx.cheap_cfg();
        cfg.provisioning_grace_secs = Some(1.0);
        let p = ctx.provisioner(&cfg);
        p.recover().await.unwrap();
        let orphan = ConversationId::new_random();
        let half = ConversationId::new_random();
        let known_half = ConversationId::new_random();
        let active = ConversationId::new_random();
        let mut dss = HashMap::new();
        for c in [orphan, half, known_half, active] {
            let ds = p.provision(req(c)).await.unwrap();
            p.ensure_ready(&ds, Duration::from_secs(60)).await.unwrap();
            dss.insert(c, ds);
        }
        p.mark_active(&dss[&active]);
        // A labelled volume alone, as a crash between volume and container creation leaves.
        ctx.docker
            .create_volume(bollard::models::VolumeCreateRequest {
                name: Some(format!("nestor-{}-stray", ctx.instance)),
                labels: Some(HashMap::from([
                    (INSTANCE_LABEL.to_owned(), ctx.instance.clone()),
                    ("org.nestor.conversation".to_owned(), ConversationId::new_random().to_string()),
                ])),
                ..Default::default()
            })
            .await
            .unwrap();
        // The orphan: a previous nestor's container whose manifest is gone.
        drop(p);
        std::fs::remove_file(ctx.root().join(format!("{}.json", orphan.hex()))).unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;

        let p = ctx.provisioner(&cfg);
        let owned = p.recover().await.unwrap();
        assert_eq!(owned.len(), 3, "the orphan has no manifest");
        let known = move |c: &ConversationId| *c == known_half || *c == active;
        let r = p.sweep(&known).await.unwrap();
        assert_eq!(r.orphan_containers, vec![p.container_name(&orphan)]);
        assert_eq!(r.orphan_volumes.len(), 2, "{:?}", r.orphan_volumes);
        assert_eq!(r.half_created, vec![half]);
        let names: Vec<String> = ctx
            .containers()
            .await
            .into_iter()
            .map(|c| c.names.unwrap()[0].trim_start_matches('/').to_owned())
            .collect();
        let mut expected = vec![p.container_name(&known_half), p.container_name(&active)];
        expected.sort();
        let mut names_sorted = names.clone();
        names_sorted.sort();
        assert_eq!(names_sorted, expected);
        let mut vols = ctx.volumes().await;
        vols.sort();
        assert_eq!(vols, expected);
        assert!(!ctx.root().join(format!("{}.json", half.hex())).exists());

        // Nothing more on a second pass; a container stopped behind nestor's back is noticed.
        let ds = p.get(dss[&active].id()).unwrap();
        assert_eq!(ds.state(), DownstreamState::Ready);
        let r = p.sweep(&known).await.unwrap();
        assert!(r.orphan_containers.is_empty() && r.orphan_volumes.is_empty() && r.half_created.is_empty());
        p.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_image_is_a_clear_error_and_leaves_nothing() {
    let docker = require_engine!();
    with_instance(docker, |ctx| async move {
        let mut cfg = ctx.cfg();
        cfg.image = Some("nestor/no-such-image:0.0.0".into());
        let p = ctx.provisioner(&cfg);
        p.recover().await.unwrap(); // warns, does not fail: running containers could still be served
        let conv = ConversationId::new_random();
        let t = Instant::now();
        let e = p.provision(req(conv)).await.unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(matches!(e, ProvisionError::Config(_)), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("nestor/no-such-image:0.0.0"), "{msg}");
        assert!(ctx.containers().await.is_empty());
        assert!(ctx.volumes().await.is_empty());
        assert!(std::fs::read_dir(ctx.root()).unwrap().next().is_none(), "no manifest left");
        assert!(p.list().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn container_exiting_at_start_fails_with_its_log_tail() {
    let docker = require_engine!();
    with_instance(docker, |ctx| async move {
        let mut cfg = ctx.cfg();
        cfg.entrypoint = Some(vec![
            "sh".into(),
            "-c".into(),
            "echo starting up; echo 'fatal: marker-7f3a broken config' >&2; exit 3".into(),
        ]);
        let p = ctx.provisioner(&cfg);
        p.recover().await.unwrap();
        let conv = ConversationId::new_random();
        let ds = p.provision(req(conv)).await.unwrap();
        let t = Instant::now();
        let e = p.ensure_ready(&ds, Duration::from_secs(60)).await.unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10), "fails fast, not at the timeout: {:?}", t.elapsed());
        let msg = e.to_string();
        assert!(msg.contains("exit code 3"), "{msg}");
        assert!(msg.contains("marker-7f3a"), "{msg}");
        assert!(matches!(ds.state(), DownstreamState::Failed(_)));
        p.release(&ds, conv, 0).await.unwrap();
        assert!(ctx.containers().await.is_empty());
        assert!(ctx.volumes().await.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_network_is_reached_by_address_and_bad_runtime_is_clear() {
    let docker = require_engine!();
    with_instance(docker, |ctx| async move {
        let net = format!("nestor-{}-net", ctx.instance);
        ctx.docker
            .create_network(bollard::models::NetworkCreateRequest {
                name: net.clone(),
                labels: Some(HashMap::from([(INSTANCE_LABEL.to_owned(), ctx.instance.clone())])),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut cfg = ctx.cheap_cfg();
        cfg.network = Some(net.clone());
        let p = ctx.provisioner(&cfg);
        p.recover().await.unwrap();
        let conv = ConversationId::new_random();
        let ds = p.provision(req(conv)).await.unwrap();
        p.ensure_ready(&ds, Duration::from_secs(60)).await.unwrap();
        let ep = ds.endpoint().unwrap();
        assert_ne!(ep.authority.host(), "127.0.0.1", "reached at its address on {net}");
        assert_eq!(ep.authority.port_u16(), Some(8000));
        let info = ctx.inspect(&p.container_name(&conv)).await.unwrap();
        let ports = info.host_config.unwrap().port_bindings.unwrap_or_default();
        assert!(ports.is_empty(), "nothing published on the host: {ports:?}");
        // Recover finds it at the same address.
        p.shutdown().await;
        let p2 = ctx.provisioner(&cfg);
        p2.recover().await.unwrap();
        let ds2 = p2.get(ds.id()).unwrap();
        assert_eq!(ds2.state(), DownstreamState::Ready);
        assert_eq!(ds2.endpoint().unwrap().origin(), ep.origin());
        p2.release(&ds2, conv, 0).await.unwrap();

        let mut cfg = ctx.cheap_cfg();
        cfg.network = Some(format!("nestor-{}-no-such-net", ctx.instance));
        let e = ctx.provisioner(&cfg).provision(req(ConversationId::new_random())).await.unwrap_err();
        assert!(e.to_string().contains("no-such-net"), "{e}");
        assert!(!e.to_string().contains("image"), "not mistaken for a missing image: {e}");

        let mut cfg = ctx.cheap_cfg();
        cfg.runtime = Some("no-such-runtime".into());
        let p3 = ctx.provisioner(&cfg);
        let e = p3.provision(req(ConversationId::new_random())).await.unwrap_err();
        assert!(e.to_string().contains("no-such-runtime"), "{e}");
        assert!(ctx.containers().await.is_empty());
        assert!(ctx.volumes().await.is_empty());
    })
    .await;
}

/// Re-adopting many containers is one list call plus concurrent probes. Uses a cheap HTTP
/// server in the agent-server image (N real agent-servers would need N × 330 MiB).
/// `NESTOR_TEST_READOPT_N` (default 20; the measured figure in the docs used 100).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readopting_many_containers_is_fast() {
    let docker = require_engine!();
    let n: usize = std::env::var("NESTOR_TEST_READOPT_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    with_instance(docker, move |ctx| async move {
        let cfg = ctx.cheap_cfg();
        let a = ctx.provisioner(&cfg);
        a.recover().await.unwrap();
        let convs: Vec<ConversationId> = (0..n).map(|_| ConversationId::new_random()).collect();
        let t = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(8));
        let starts = convs.iter().map(|c| {
            let a = a.clone();
            let sem = sem.clone();
            let c = *c;
            async move {
                let _permit = sem.acquire().await.unwrap();
                let ds = a.provision(req(c)).await.unwrap();
                a.ensure_ready(&ds, Duration::from_secs(120)).await.unwrap();
                a.mark_active(&ds);
            }
        });
        futures::future::join_all(starts).await;
        eprintln!("TIMING {n} cheap containers provisioned and ready in {:?}", t.elapsed());
        a.shutdown().await;
        drop(a);

        let b = ctx.provisioner(&cfg);
        let t = Instant::now();
        let owned = b.recover().await.unwrap();
        let took = t.elapsed();
        eprintln!("TIMING re-adopt of {n} running containers: {took:?}");
        assert_eq!(owned.len(), n);
        assert!(owned.iter().all(|d| d.state() == DownstreamState::Ready));
        assert!(took < Duration::from_secs(1), "{n} containers re-adopted in {took:?}");
        b.shutdown().await;
    })
    .await;
}

// ---- no engine needed: an unreachable engine fails quickly and names its address

#[tokio::test]
async fn unreachable_engine_fails_quickly_naming_the_host() {
    for host in ["tcp://127.0.0.1:1", "unix:///nonexistent/docker.sock"] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DockerConfig {
            image: Some("nestor/agent-server:1.58.2".into()),
            docker_host: Some(host.into()),
            api_timeout_secs: Some(3.0),
            ..Default::default()
        };
        let p = DockerProvisioner::new(&cfg, dir.path().join("docker"), DownstreamClient::default()).unwrap();
        let t = Instant::now();
        let e = p.recover().await.unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{host}: {:?}", t.elapsed());
        let msg = e.to_string();
        assert!(msg.contains(host), "{msg}");
        assert!(msg.contains("DOCKER_HOST"), "{msg}");
        let t = Instant::now();
        let e = p.provision(req(ConversationId::new_random())).await.unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(e.to_string().contains(host), "{e}");
        assert!(p.list().is_empty());
    }
}

#[tokio::test]
async fn silent_engine_is_bounded_by_the_api_timeout() {
    // A listener that accepts and never answers: the call must end at api_timeout_secs.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            conns.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = DockerConfig {
        image: Some("img".into()),
        docker_host: Some(format!("tcp://127.0.0.1:{port}")),
        api_timeout_secs: Some(1.0),
        ..Default::default()
    };
    let p = DockerProvisioner::new(&cfg, dir.path().join("docker"), DownstreamClient::default()).unwrap();
    let t = Instant::now();
    let e = p.recover().await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    hold.abort();
}
