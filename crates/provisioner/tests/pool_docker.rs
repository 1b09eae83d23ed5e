//! The `pool` provisioner over the `docker` backend, against the real Docker engine and the
//! real agent-server image (its deferred-init mode is the real server's).
//!
//! Needs what `tests/docker.rs` needs (an engine, the image `NESTOR_TEST_AGENT_SERVER_IMAGE`);
//! without them it prints why and passes as skipped, unless `NESTOR_TEST_REQUIRE_DOCKER=1`.
//! Everything it creates carries its own instance label and is removed afterwards, also when
//! it fails.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions, ListVolumesOptions, RemoveContainerOptions, RemoveVolumeOptions};
use bollard::Docker;
use http::Method;
use nestor_core::{ConversationId, Downstream, DownstreamClient, DownstreamState, UserId};
use nestor_provisioner::docker::{DockerConfig, DockerProvisioner};
use nestor_provisioner::pool::{PoolConfig, PoolProvisioner};
use nestor_provisioner::{ProvisionRequest, Provisioner};

const INSTANCE_LABEL: &str = "org.nestor.instance";

fn image() -> String {
    std::env::var("NESTOR_TEST_AGENT_SERVER_IMAGE").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "nestor/agent-server:1.58.2".into())
}

async fn engine() -> Result<Docker, String> {
    let host = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
    let d = if host.starts_with("unix://") {
        Docker::connect_with_unix(&host, 30, bollard::API_DEFAULT_VERSION)
    } else {
        Docker::connect_with_http(&host, 30, bollard::API_DEFAULT_VERSION)
    }
    .map_err(|e| format!("no Docker client: {e}"))?;
    let d = tokio::time::timeout(Duration::from_secs(5), d.negotiate_version())
        .await
        .map_err(|_| "the Docker engine does not answer".to_owned())?
        .map_err(|e| format!("no Docker engine reachable: {e}"))?;
    if d.inspect_image(&image()).await.is_err() {
        return Err(format!("image {} is not present (scripts/build-agent-server-image.sh builds it)", image()));
    }
    Ok(d)
}

async fn cleanup(docker: &Docker, instance: &str) {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{INSTANCE_LABEL}={instance}")])]);
    if let Ok(list) = docker
        .list_containers(Some(ListContainersOptions { all: true, filters: Some(filters.clone()), ..Default::default() }))
        .await
    {
        for id in list.into_iter().filter_map(|c| c.id) {
            let opts = RemoveContainerOptions { force: true, ..Default::default() };
            let _ = tokio::time::timeout(Duration::from_secs(30), docker.remove_container(&id, Some(opts))).await;
        }
    }
    if let Ok(v) = docker.list_volumes(Some(ListVolumesOptions { filters: Some(filters) })).await {
        for v in v.volumes.unwrap_or_default() {
            let _ = tokio::time::timeout(Duration::from_secs(30), docker.remove_volume(&v.name, Some(RemoveVolumeOptions { force: true })))
                .await;
        }
    }
}

async fn call(ds: &Downstream, method: Method, path: &str, body: Option<serde_json::Value>) -> u16 {
    let ep = ds.endpoint().expect("endpoint");
    let body = body.map(|b| serde_json::to_vec(&b).unwrap().into());
    match DownstreamClient::default().call_bytes(&ep, method, path, body, Duration::from_secs(60), 16 << 20).await {
        Ok((s, _)) => s.as_u16(),
        Err(nestor_core::client::ClientError::Status { status, .. }) => status.as_u16(),
        Err(e) => panic!("{path}: {e}"),
    }
}

fn pool(dir: &std::path::Path, instance: &str, min_idle: usize) -> PoolProvisioner {
    let mut env = std::collections::BTreeMap::new();
    env.insert("OH_WEBHOOKS_0_BASE_URL".to_owned(), "http://host.docker.internal:9/nestor/webhooks".to_owned());
    let cfg = DockerConfig {
        image: Some(image()),
        instance_id: Some(instance.to_owned()),
        startup_timeout_secs: Some(240.0),
        stop_timeout_secs: Some(5.0),
        env,
        ..Default::default()
    };
    let client = DownstreamClient::default();
    let backend = DockerProvisioner::new(&cfg, dir.join("docker"), client.clone()).unwrap();
    PoolProvisioner::new(&PoolConfig { min_idle, max_size: 4, ..Default::default() }, Arc::new(backend), client).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_containers_are_claimed_readopted_and_restart_as_their_conversation() {
    let docker = match engine().await {
        Ok(d) => d,
        Err(why) => {
            if std::env::var("NESTOR_TEST_REQUIRE_DOCKER").as_deref() == Ok("1") {
                panic!("NESTOR_TEST_REQUIRE_DOCKER=1 but: {why}");
            }
            eprintln!("SKIPPED (no docker engine): {why}");
            return;
        }
    };
    let instance = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let dir = tempfile::tempdir().unwrap();
    let (d2, inst2, path) = (docker.clone(), instance.clone(), dir.path().to_path_buf());
    let r = tokio::spawn(async move {
        let (docker, instance, dir) = (d2, inst2, path);
        let p = pool(&dir, &instance, 1);
        p.recover().await.unwrap();
        assert!(p.wait_idle(1, Duration::from_secs(300)).await, "{:?}", p.stats());
        // The warm container: a pool member with nothing of a conversation.
        let warm = p.idle_downstreams()[0].clone();
        let name = format!("nestor-{instance}-{}", warm.id().as_str().trim_start_matches("docker-"));
        let info = docker.inspect_container(&name, None::<InspectContainerOptions>).await.unwrap();
        let cfg = info.config.unwrap();
        let labels = cfg.labels.unwrap();
        assert_eq!(labels["org.nestor.role"], "pool");
        let env = cfg.env.unwrap();
        assert!(env.contains(&"OH_DEFERRED_INIT=true".to_owned()));
        assert!(!env.iter().any(|e| e.starts_with("OH_WEBHOOKS_") || e.starts_with("SESSION_API_KEY=")), "{env:?}");
        assert_eq!(call(&warm, Method::GET, "/api/conversations/count", None).await, 503, "dormant");

        let conv = ConversationId::new_random();
        let req = ProvisionRequest { conversation: conv, owner: UserId::new("alice") };
        let ds = p.provision(req).await.unwrap();
        assert_eq!(ds.id(), warm.id());
        assert_eq!((p.stats().claims, p.stats().cold_starts), (1, 0));
        assert_eq!(ds.state(), DownstreamState::Ready);
        let mut body = serde_json::json!({
            "conversation_id": conv.to_string(),
            "agent": {"kind": "Agent", "llm": {"usage_id": "agent", "model": "openai/fake", "base_url": "http://127.0.0.1:9/v1", "api_key": "x"}, "tools": []},
            "workspace": {"kind": "LocalWorkspace", "working_dir": "/elsewhere"},
            "autotitle": false
        })
        .as_object()
        .unwrap()
        .clone();
        p.prepare_create(&ds, &mut body);
        assert_eq!(call(&ds, Method::POST, "/api/conversations", Some(serde_json::Value::Object(body))).await, 201);
        p.mark_active(&ds);
        assert!(p.wait_idle(1, Duration::from_secs(300)).await, "refilled: {:?}", p.stats());

        // nestor dies; the next one re-adopts both, starting nothing.
        p.abandon();
        drop(p);
        let p = pool(&dir, &instance, 1);
        let owned = p.recover().await.unwrap();
        assert_eq!(owned.len(), 1);
        let ds = owned[0].clone();
        assert_eq!((ds.primary(), ds.state()), (Some(conv), DownstreamState::Ready));
        assert_eq!(ds.owner().map(|u| u.as_str()), Some("alice"));
        assert_eq!(call(&ds, Method::GET, &format!("/api/conversations/{conv}"), None).await, 200);
        assert_eq!(p.stats().idle, 1);
        assert_eq!(p.stats().started, 0);

        // Stopped (idle policy) and started again: an ordinary container with its
        // conversation's keys, no longer dormant.
        p.stop(&ds).await.unwrap();
        p.ensure_ready(&ds, Duration::from_secs(240)).await.unwrap();
        assert_eq!(call(&ds, Method::GET, &format!("/api/conversations/{conv}"), None).await, 200);
        let info = docker.inspect_container(&name, None::<InspectContainerOptions>).await.unwrap();
        let env = info.config.unwrap().env.unwrap();
        assert!(!env.contains(&"OH_DEFERRED_INIT=true".to_owned()));
        assert!(env.iter().any(|e| e.starts_with("OH_WEBHOOKS_0_BASE_URL=")));

        p.release(&ds, conv, 0).await.unwrap();
        assert!(docker.inspect_container(&name, None::<InspectContainerOptions>).await.is_err(), "released with its conversation");
        p.shutdown().await;
    })
    .await;
    cleanup(&docker, &instance).await;
    if let Err(e) = r {
        std::panic::resume_unwind(e.into_panic());
    }
}
