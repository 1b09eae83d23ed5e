//! Pool figures for docs/performance.md (ignored: run by hand, bounded): per backend
//! (`process`, `docker`, `kubernetes`) with the real agent-server,
//!
//! * **refill rate**: warm servers made ready per minute after the pool was drained (every
//!   idle server claimed at once), and the first fill from empty;
//! * **idle cost**: memory of one idle (dormant) warm server: the process tree's RSS
//!   (`process`), the container's memory from `docker stats` (`docker`, and `kubernetes`,
//!   whose pods the test node agent runs as Docker containers);
//! * **create -> first 200**: `provision` (+ `ensure_ready`) and the agent-server's
//!   `POST /api/conversations` answered, from a warm pool vs the same backend cold, in the
//!   same run. This is the provisioner's part of a create through nestor (nestor's own proxy
//!   overhead is ~0.1 ms, see "REST" in docs/performance.md).
//!
//! ```sh
//! NESTOR_BENCH_BACKENDS=process,docker,kubernetes NESTOR_BENCH_WARM=3 NESTOR_BENCH_COLD=3 \
//! NESTOR_BENCH_AGENT_SERVER=$(bash scripts/setup-agent-server.sh)/bin/agent-server \
//! cargo test -p nestor-provisioner --test pool_bench -- --ignored --nocapture
//! ```
//!
//! Each backend: fill (`min_idle` = WARM), drain (WARM warm creates at once), time the refill,
//! a second drain + refill, then COLD sequential cold creates through the wrapped backend
//! while the pool stays full (so no refill overlaps them), then release everything.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use nestor_core::{ConversationId, Downstream, DownstreamClient, UserId};
use nestor_provisioner::docker::{DockerConfig, DockerProvisioner, OnShutdown};
use nestor_provisioner::kubernetes::{KubernetesConfig, KubernetesProvisioner, Reach};
use nestor_provisioner::pool::{PoolConfig, PoolProvisioner, WarmBackend};
use nestor_provisioner::process::{ProcessConfig, ProcessProvisioner};
use nestor_provisioner::{ProvisionRequest, Provisioner};
use nestor_test_support::kube_env::KubeEnv;
use nestor_test_support::node_agent::TestNode;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn image() -> String {
    std::env::var("NESTOR_TEST_AGENT_SERVER_IMAGE").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "nestor/agent-server:1.58.2".into())
}

fn req() -> ProvisionRequest {
    ProvisionRequest { conversation: ConversationId::new_random(), owner: UserId::new("bench") }
}

/// Claim/start, then the agent-server's create answered: ms.
/// One create: (its server, ms until the agent-server answered the create, ms of the
/// provisioner's own part: claim or start, and ready).
async fn create(p: &dyn Provisioner, r: ProvisionRequest) -> (Arc<Downstream>, f64, f64) {
    let t = Instant::now();
    let ds = p.provision(r.clone()).await.expect("provision");
    p.ensure_ready(&ds, Duration::from_secs(300)).await.expect("ready");
    let provisioned_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut body = serde_json::json!({
        "conversation_id": r.conversation.to_string(),
        "agent": {"kind": "Agent", "llm": {"usage_id": "agent", "model": "openai/fake", "base_url": "http://127.0.0.1:9/v1", "api_key": "x"}, "tools": []},
        "autotitle": false
    })
    .as_object()
    .unwrap()
    .clone();
    p.prepare_create(&ds, &mut body);
    let ep = ds.endpoint().expect("endpoint");
    let bytes = serde_json::to_vec(&serde_json::Value::Object(body)).unwrap();
    let (status, _) = DownstreamClient::default()
        .call_bytes(&ep, Method::POST, "/api/conversations", Some(bytes.into()), Duration::from_secs(120), 1 << 20)
        .await
        .expect("create answered");
    assert!(status.is_success(), "{status}");
    p.mark_active(&ds);
    (ds, t.elapsed().as_secs_f64() * 1000.0, provisioned_ms)
}

fn summary(v: &mut [f64]) -> String {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    format!("n={} p50={:.0} ms max(=p99)={:.0} ms all={:?}", v.len(), p(0.5), p(1.0), v.iter().map(|x| x.round() as i64).collect::<Vec<_>>())
}

/// Memory of one idle warm server, MiB (median over the idle ones).
type IdleCost = Box<dyn Fn(&PoolProvisioner) -> Vec<f64> + Send + Sync>;

/// RSS of every process whose working directory is under `dir` (the warm servers and
/// anything they started), split evenly over the `n` idle servers.
fn rss_mib_under(dir: &Path, n: usize) -> Vec<f64> {
    let mut total = 0.0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) else { continue };
        if !cwd.starts_with(dir) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        total += kb / 1024.0;
    }
    if n == 0 || total == 0.0 {
        return vec![];
    }
    vec![total / n as f64; n]
}

fn docker_mem_mib(name_filter: &str) -> Vec<f64> {
    let ids = std::process::Command::new("docker").args(["ps", "-q", "--filter", name_filter]).output().unwrap();
    let ids: Vec<String> = String::from_utf8_lossy(&ids.stdout).lines().map(str::to_owned).collect();
    if ids.is_empty() {
        return vec![];
    }
    let out = std::process::Command::new("docker")
        .args(["stats", "--no-stream", "--format", "{{.MemUsage}}"])
        .args(&ids)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let used = l.split('/').next()?.trim();
            let (num, unit) = used.split_at(used.find(|c: char| c.is_ascii_alphabetic())?);
            let n: f64 = num.parse().ok()?;
            Some(match unit {
                "GiB" => n * 1024.0,
                "MiB" => n,
                "KiB" => n / 1024.0,
                _ => n / (1024.0 * 1024.0),
            })
        })
        .collect()
}

async fn bench(name: &str, pool: PoolProvisioner, idle_cost: IdleCost) {
    let warm = env_usize("NESTOR_BENCH_WARM", 3);
    let cold = env_usize("NESTOR_BENCH_COLD", 3);
    let t = Instant::now();
    pool.recover().await.unwrap();
    assert!(pool.wait_idle(warm, Duration::from_secs(600)).await, "{:?}", pool.stats());
    let fill = t.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await; // settle after boot
    let mut mem = idle_cost(&pool);
    let mem_s = if mem.is_empty() { "n/a".to_owned() } else { summary(&mut mem).replace(" ms", " MiB") };
    let mut warm_ms = Vec::new();
    let mut refills = Vec::new();
    let mut owned = Vec::new();
    for _ in 0..2 {
        let claims = futures::future::join_all((0..warm).map(|_| create(&pool, req()))).await;
        let t = Instant::now();
        for (ds, ms, _) in claims {
            warm_ms.push(ms);
            owned.push(ds);
        }
        assert!(pool.wait_idle(warm, Duration::from_secs(600)).await, "{:?}", pool.stats());
        refills.push(t.elapsed().as_secs_f64());
    }
    // One claim at a time (nothing else running): the provisioner's part of a warm create
    // (claim: the backend's records, then `POST /api/init`) apart from the agent-server's
    // own create, which any create pays.
    let mut claim_ms = Vec::new();
    let mut seq_ms = Vec::new();
    let mut adopt_ms = Vec::new();
    let mut init_ms = Vec::new();
    for _ in 0..warm {
        let before = pool.stats();
        let (ds, ms, claim) = create(&pool, req()).await;
        let after = pool.stats();
        seq_ms.push(ms);
        claim_ms.push(claim);
        adopt_ms.push((after.adopt_us_total - before.adopt_us_total) as f64 / 1000.0);
        init_ms.push((after.init_us_total - before.init_us_total) as f64 / 1000.0);
        owned.push(ds);
    }
    assert!(pool.wait_idle(warm, Duration::from_secs(600)).await, "{:?}", pool.stats());
    let s = pool.stats();
    assert_eq!(s.cold_starts, 0, "{s:?}");
    let backend: Arc<dyn WarmBackend> = pool.backend().clone();
    let mut cold_ms = Vec::new();
    for _ in 0..cold {
        let (ds, ms, _) = create(backend.as_ref(), req()).await;
        cold_ms.push(ms);
        owned.push(ds);
    }
    let rates: Vec<String> = refills.iter().map(|s| format!("{:.1}/min ({warm} in {s:.1} s)", warm as f64 * 60.0 / s)).collect();
    println!("POOL-BENCH {name}: first fill {warm} in {:.1} s ({:.1}/min)", fill.as_secs_f64(), warm as f64 * 60.0 / fill.as_secs_f64());
    println!("POOL-BENCH {name}: refill after draining: {}", rates.join(", "));
    println!("POOL-BENCH {name}: idle warm server memory: {mem_s}");
    println!("POOL-BENCH {name}: create -> first 200, warm: {}", summary(&mut warm_ms));
    println!("POOL-BENCH {name}: create -> first 200, cold: {}", summary(&mut cold_ms));
    println!("POOL-BENCH {name}: one at a time, warm: claim (provisioner's part) {}; whole create {}", summary(&mut claim_ms), summary(&mut seq_ms));
    println!("POOL-BENCH {name}: one at a time, warm claim split: nestor's records (adopt) {}; the agent-server's POST /api/init {}", summary(&mut adopt_ms), summary(&mut init_ms));
    println!("POOL-BENCH {name}: {:?}; load {}", pool.stats(), std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    for ds in owned {
        let conv = ds.primary().unwrap();
        let _ = pool.release(&ds, conv, 0).await;
    }
    pool.shutdown().await;
}

fn pool_cfg(warm: usize) -> PoolConfig {
    PoolConfig { min_idle: warm, max_size: 4 * warm + env_usize("NESTOR_BENCH_COLD", 3) + 2, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run by hand (see the module docs)"]
async fn pool_figures() {
    let warm = env_usize("NESTOR_BENCH_WARM", 3);
    let backends = std::env::var("NESTOR_BENCH_BACKENDS").unwrap_or_else(|_| "process,docker,kubernetes".into());
    let client = DownstreamClient::default();
    for b in backends.split(',') {
        match b {
            "process" => {
                let bin = PathBuf::from(std::env::var("NESTOR_BENCH_AGENT_SERVER").expect("NESTOR_BENCH_AGENT_SERVER=<venv>/bin/agent-server"));
                let dir = tempfile::tempdir().unwrap();
                let cfg = ProcessConfig { agent_server: Some(bin.clone()), startup_timeout_secs: Some(300.0), stop_timeout_secs: Some(5.0), ..Default::default() };
                let backend = ProcessProvisioner::new(&cfg, dir.path().join("process"), bin, client.clone()).unwrap();
                let root = dir.path().join("process");
                let pool = PoolProvisioner::new(&pool_cfg(warm), Arc::new(backend), client.clone()).unwrap();
                bench("process", pool, Box::new(move |p| rss_mib_under(&root, p.stats().idle))).await;
            }
            "docker" => {
                let dir = tempfile::tempdir().unwrap();
                let instance = format!("b-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
                let cfg = DockerConfig {
                    image: Some(image()),
                    instance_id: Some(instance.clone()),
                    startup_timeout_secs: Some(300.0),
                    stop_timeout_secs: Some(5.0),
                    // Idle warm containers are removed when the pool shuts down.
                    on_shutdown: OnShutdown::Stop,
                    ..Default::default()
                };
                let backend = DockerProvisioner::new(&cfg, dir.path().join("docker"), client.clone()).unwrap();
                let pool = PoolProvisioner::new(&pool_cfg(warm), Arc::new(backend), client.clone()).unwrap();
                // Before any claim, this instance's containers are the warm ones.
                let filter = format!("label=org.nestor.instance={instance}");
                bench("docker", pool, Box::new(move |_| docker_mem_mib(&filter))).await;
            }
            "kubernetes" => {
                let env = KubeEnv::get().expect("test cluster (scripts/setup-kube.sh)");
                let node = TestNode::start(&env, "k-bench").await;
                let ns = &node.ns;
                let cfg = KubernetesConfig {
                    kubeconfig: Some(env.nestor.clone()),
                    namespace: Some(ns.name.clone()),
                    image: Some(image()),
                    reach: Reach::HostPortAnnotation,
                    startup_timeout_secs: Some(300.0),
                    api_timeout_secs: Some(10.0),
                    termination_grace_secs: Some(2),
                    ..Default::default()
                };
                let backend = KubernetesProvisioner::new(&cfg).await.unwrap();
                let pool = PoolProvisioner::new(&pool_cfg(warm), Arc::new(backend), client.clone()).unwrap();
                // The node agent names containers after namespace and pod: the warm ones.
                let filter = format!("name=k8s_{}_nestor-warm-", ns.name);
                bench("kubernetes", pool, Box::new(move |_| docker_mem_mib(&filter))).await;
                node.finish().await;
            }
            other => panic!("unknown backend {other:?}"),
        }
    }
}
