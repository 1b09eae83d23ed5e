//! Benchmark (ignored; run by hand): what the docker provisioner adds to a conversation's
//! start, against the same image started the plainest way, in the same run.
//!
//! ```text
//! DOCKER_HOST=$(bash scripts/setup-docker.sh) \
//! NESTOR_TEST_AGENT_SERVER_IMAGE=$(bash scripts/build-agent-server-image.sh) \
//! cargo test --release -p nestor-aggregator --test docker_bench -- --ignored --nocapture
//! ```
//!
//! Per round (`NESTOR_BENCH_ROUNDS`, default 5), alternating which goes first:
//! * **raw**: bollard `create` + `start` of the image with the provisioner's environment and a
//!   loopback port, then `GET /alive` every 10 ms until 200: the agent-server's boot time.
//! * **nestor**: `POST /api/conversations` through an in-process nestor on the docker
//!   provisioner, then `/sockets/events/{id}` until its first frame: create -> first event.
//!
//! Also: the memory of an idle agent-server container (`docker stats`, no stream), and nestor's
//! re-adoption of the containers it created (a second nestor on the same state).
//! Everything it creates carries its own instance label and is removed at the end.

mod support;
mod ws_common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder};
use bollard::Docker;
use support::{create_body, start_with_toml, CLIENT_KEY};

fn image() -> String {
    std::env::var("NESTOR_TEST_AGENT_SERVER_IMAGE").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "nestor/agent-server:1.58.2".into())
}

fn docker() -> Docker {
    let host = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
    if host.starts_with("unix://") {
        Docker::connect_with_unix(&host, 120, bollard::API_DEFAULT_VERSION).expect("docker socket")
    } else {
        Docker::connect_with_http(&host, 120, bollard::API_DEFAULT_VERSION).expect("docker host")
    }
}

/// The provisioner's container environment and a key.
fn env() -> Vec<String> {
    nestor_provisioner::container_env::BASE_ENV
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain(["SESSION_API_KEY=bench-key".to_owned(), "OH_SECRET_KEY=bench-secret".to_owned()])
        .collect()
}

/// Raw start: create + start + first `/alive` 200. Returns (elapsed, container id).
async fn raw_start(d: &Docker, instance: &str, n: usize) -> (Duration, String) {
    let t0 = Instant::now();
    let body = ContainerCreateBody {
        image: Some(image()),
        env: Some(env()),
        labels: Some(HashMap::from([("org.nestor.instance".to_owned(), instance.to_owned())])),
        exposed_ports: Some(vec!["8000/tcp".into()]),
        host_config: Some(HostConfig {
            port_bindings: Some(HashMap::from([(
                "8000/tcp".to_owned(),
                Some(vec![PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) }]),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    };
    let name = format!("nestor-bench-raw-{instance}-{n}");
    let id = d.create_container(Some(CreateContainerOptionsBuilder::default().name(&name).build()), body).await.expect("create").id;
    d.start_container(&id, None::<bollard::query_parameters::StartContainerOptions>).await.expect("start");
    let info = d.inspect_container(&id, None::<bollard::query_parameters::InspectContainerOptions>).await.expect("inspect");
    let port = info.network_settings.and_then(|n| n.ports).and_then(|p| p.get("8000/tcp").cloned().flatten()).and_then(|b| b.first().and_then(|b| b.host_port.clone())).expect("published port");
    let url = format!("http://127.0.0.1:{port}/alive");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if let Ok(r) = http.get(&url).timeout(Duration::from_secs(2)).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "raw container never answered /alive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (t0.elapsed(), id)
}

/// Through nestor: create, then the events socket's first frame.
async fn nestor_start(n: &support::TestNestor) -> (Duration, String) {
    let t0 = Instant::now();
    let r = n.post("/api/conversations").json(&create_body(None)).send().await.expect("create sent");
    assert!(r.status().is_success(), "create: {}", r.status());
    let v: serde_json::Value = r.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    let mut ws = ws_common::connect(&ws_common::ws_url(n, &format!("/sockets/events/{id}")), Some(CLIENT_KEY)).await.expect("socket");
    match ws_common::next(&mut ws, Duration::from_secs(60)).await {
        ws_common::Next::Text(_) => {}
        other => panic!("no first event: {other:?}"),
    }
    (t0.elapsed(), id)
}

async fn remove_labelled(d: &Docker, instance: &str) {
    let filters = HashMap::from([("label".to_owned(), vec![format!("org.nestor.instance={instance}")])]);
    let list = d.list_containers(Some(ListContainersOptionsBuilder::default().all(true).filters(&filters).build())).await.unwrap_or_default();
    for c in list {
        if let Some(id) = c.id {
            let _ = d.remove_container(&id, Some(RemoveContainerOptionsBuilder::default().force(true).v(true).build())).await;
        }
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: needs the Docker engine and the agent-server image; run with --ignored"]
async fn docker_create_to_first_event_vs_raw_bollard() {
    let rounds: usize = std::env::var("NESTOR_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let d = docker();
    let instance = format!("bench{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "bind = \"127.0.0.1:0\"\nsession_api_keys = [\"{CLIENT_KEY}\"]\nstate_dir = \"{}\"\nready_timeout_secs = 240.0\n[provisioner]\nkind = \"docker\"\n[provisioner.docker]\nimage = \"{}\"\ninstance_id = \"{instance}\"\nstartup_timeout_secs = 240.0\nstop_timeout_secs = 5.0\n",
        dir.path().join("state").display(),
        image()
    );
    let n = start_with_toml(dir, &toml).await;
    let (mut raw, mut through) = (Vec::new(), Vec::new());
    let mut ids = Vec::new();
    for r in 0..rounds {
        let order = if r % 2 == 0 { [true, false] } else { [false, true] };
        for raw_first in order {
            if raw_first {
                let (t, id) = raw_start(&d, &instance, r).await;
                raw.push(t);
                let _ = d.remove_container(&id, Some(RemoveContainerOptionsBuilder::default().force(true).v(true).build())).await;
            } else {
                let (t, id) = nestor_start(&n).await;
                through.push(t);
                ids.push(id);
            }
        }
        eprintln!("round {r}: raw {:?}, nestor {:?}", raw.last().unwrap(), through.last().unwrap());
    }
    // Idle memory of one conversation's container (the last one, idle now).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let filters = HashMap::from([("label".to_owned(), vec![format!("org.nestor.instance={instance}")])]);
    let running = d.list_containers(Some(ListContainersOptionsBuilder::default().filters(&filters).build())).await.unwrap();
    let mut mem = Vec::new();
    for c in running.iter().take(3) {
        let id = c.id.clone().unwrap();
        let mut s = d.stats(&id, Some(bollard::query_parameters::StatsOptionsBuilder::default().stream(false).one_shot(true).build()));
        use futures::StreamExt;
        if let Some(Ok(st)) = s.next().await {
            if let Some(m) = st.memory_stats.and_then(|m| m.usage) {
                mem.push(m);
            }
        }
    }
    // Re-adoption: a second nestor on the same state finds every container running.
    let dir2 = n.kill();
    let t = Instant::now();
    let n2 = start_with_toml(dir2, &toml).await;
    let readopt = t.elapsed();
    let listed: serde_json::Value = n2.get("/api/conversations/count").send().await.unwrap().json().await.unwrap();
    let (raw_m, thr_m) = (median(&mut raw.clone()), median(&mut through.clone()));
    eprintln!("RESULT rounds={rounds}");
    eprintln!("RESULT raw create+start+/alive: median {raw_m:?}, all {raw:?}");
    eprintln!("RESULT nestor create->first event: median {thr_m:?}, all {through:?}");
    eprintln!("RESULT added by nestor (median - median): {:?}", thr_m.saturating_sub(raw_m));
    eprintln!("RESULT idle container memory (bytes): {mem:?}");
    eprintln!("RESULT re-adopt of {} containers (nestor start to ready): {readopt:?}; count answers {listed}", ids.len());
    n2.stop().await;
    remove_labelled(&d, &instance).await;
}
