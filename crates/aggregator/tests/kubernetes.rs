//! nestor on the kubernetes provisioner, end to end over REST: real `nestor` processes
//! (replicas), a real kube-apiserver 1.20 + etcd (scripts/setup-kube.sh), pods run by the test
//! node agent as Docker containers of the real agent-server image.
//!
//! Needs the cached kube-apiserver (`scripts/setup-kube.sh build`), a Docker engine and the
//! image `NESTOR_TEST_AGENT_SERVER_IMAGE` (default `nestor/agent-server:1.58.2`); without them
//! the tests print why and pass as skipped, unless `NESTOR_TEST_REQUIRE_KUBE=1` (CI).
//! Every test has its own namespace and node agent, removed afterwards (also on failure);
//! nestor processes are killed when their handle drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nestor_test_support::kube_env::{agent_server_image, KubeEnv};
use nestor_test_support::node_agent::TestNode;
use serde_json::{json, Value};

const KEY: &str = "client-key-kubernetes-0123456789";

/// One `nestor serve` process; SIGKILLed when dropped.
struct Replica {
    name: &'static str,
    child: Child,
    url: String,
    log: PathBuf,
}

impl Replica {
    fn config(dir: &Path, name: &str, port: u16, kubeconfig: &Path, ns: &str, image: &str, extra: &str) -> PathBuf {
        let toml = format!(
            r#"bind = "127.0.0.1:{port}"
session_api_keys = ["{KEY}"]
state_dir = "{state}"
ready_timeout_secs = 240.0
[provisioner]
kind = "kubernetes"
[provisioner.kubernetes]
kubeconfig = "{kc}"
namespace = "{ns}"
image = "{image}"
reach = "host-port-annotation"
startup_timeout_secs = 240.0
termination_grace_secs = 2
api_timeout_secs = 10.0
{extra}
"#,
            state = dir.join(format!("state-{name}")).display(),
            kc = kubeconfig.display(),
        );
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        path
    }

    /// Start and wait (bounded) until it answers `/alive`.
    async fn start(dir: &Path, name: &'static str, kubeconfig: &Path, ns: &str, image: &str, extra: &str) -> Replica {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cfg = Self::config(dir, name, port, kubeconfig, ns, image, extra);
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nestor"))
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .env("NESTOR_LOG", "info,nestor_provisioner=debug")
            .env_remove("SESSION_API_KEY")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut r = Replica { name, child, url: format!("http://127.0.0.1:{port}"), log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(resp) = http().get(format!("{}/alive", r.url)).send().await {
                if resp.status().is_success() {
                    return r;
                }
            }
            if let Ok(Some(st)) = r.child.try_wait() {
                panic!("nestor {name} exited at start ({st}): {}", r.log_text());
            }
            assert!(Instant::now() < deadline, "nestor {name} did not answer within 60 s: {}", r.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(mut self) {
        let _ = self.child.kill(); // SIGKILL: no shutdown step runs
        let _ = self.child.wait();
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = http().get(format!("{}{path}", self.url)).header("X-Session-API-Key", KEY).send().await.unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = http()
            .post(format!("{}{path}", self.url))
            .header("X-Session-API-Key", KEY)
            .json(body)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    async fn delete(&self, path: &str) -> u16 {
        http().delete(format!("{}{path}", self.url)).header("X-Session-API-Key", KEY).send().await.unwrap().status().as_u16()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- nestor {} log ---\n{}", self.name, self.log_text());
        }
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(300)).build().unwrap()
}

fn create_body() -> Value {
    json!({
        "agent": {"kind": "Agent", "llm": {"usage_id": "agent", "model": "openai/fake",
                  "base_url": "http://127.0.0.1:9/v1", "api_key": "x"}, "tools": [{"name": "terminal"}]},
        "workspace": {"kind": "LocalWorkspace", "working_dir": "/tmp/w"},
        "autotitle": false
    })
}

struct Ctx {
    env: KubeEnv,
    node: TestNode,
    dir: tempfile::TempDir,
}

impl Ctx {
    async fn new(env: KubeEnv, prefix: &str) -> Ctx {
        let node = TestNode::start(&env, prefix).await;
        Ctx { env, node, dir: tempfile::tempdir().unwrap() }
    }

    async fn replica(&self, name: &'static str) -> Replica {
        Replica::start(self.dir.path(), name, &self.env.nestor, &self.node.ns.name, &agent_server_image(), "").await
    }

    /// Wait (bounded) until the namespace holds exactly `want` (pods, secrets, pvcs).
    async fn wait_objects(&self, want: (usize, usize, usize), within: Duration) -> (Vec<String>, Vec<String>, Vec<String>) {
        let deadline = Instant::now() + within;
        loop {
            let o = self.node.ns.objects().await.unwrap();
            if (o.0.len(), o.1.len(), o.2.len()) == want || Instant::now() > deadline {
                return o;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn finish(self) {
        self.node.finish().await;
    }
}

/// Poll `f` until it returns true (bounded).
async fn eventually<F, Fut>(what: &str, within: Duration, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conversations_in_their_own_pods_served_by_any_replica_and_deleted_without_leftovers() {
    let env = nestor_test_support::require_kube!();
    let ctx = Ctx::new(env, "n-repl").await;
    let a = ctx.replica("a").await;
    let b = ctx.replica("b").await;

    // Three conversations through A, concurrently: three pods.
    let t0 = Instant::now();
    let body = create_body();
    let creates = (0..3).map(|_| a.post("/api/conversations", &body));
    let mut ids = Vec::new();
    for (status, info) in futures::future::join_all(creates).await {
        assert!((200..300).contains(&status), "{status}: {info}");
        assert_eq!(info["workspace"]["working_dir"], "/workspace/project");
        ids.push(info["id"].as_str().unwrap().to_owned());
    }
    eprintln!("TIMING 3 creates through nestor (pods created -> ready -> conversation created): {:?}", t0.elapsed());
    let (pods, secrets, pvcs) = ctx.node.ns.objects().await.unwrap();
    assert_eq!((pods.len(), secrets.len(), pvcs.len()), (3, 3, 3), "{pods:?} {secrets:?} {pvcs:?}");
    for id in &ids {
        let hex = id.replace('-', "");
        assert!(pods.iter().any(|p| p.ends_with(&hex)), "conversation {id} has its own pod: {pods:?}");
    }

    // B never saw the creates: it serves them (watch, or a lookup on its catalog miss).
    for id in &ids {
        let (s, v) = b.get(&format!("/api/conversations/{id}")).await;
        assert_eq!(s, 200, "B serves {id}: {v}");
        assert_eq!(v["id"], json!(id));
        let (s, _) = b.get(&format!("/api/conversations/{id}/events/search")).await;
        assert_eq!(s, 200);
    }

    // kill -9 of A loses nothing: B still serves all, and a new replica (empty state
    // directory) rebuilds everything from the cluster.
    a.kill9();
    for id in &ids {
        assert_eq!(b.get(&format!("/api/conversations/{id}")).await.0, 200);
    }
    let c = ctx.replica("c").await;
    let (s, page) = c.get("/api/conversations/search?limit=100").await;
    assert_eq!(s, 200);
    let listed: Vec<&str> = page["items"].as_array().unwrap().iter().filter_map(|i| i["id"].as_str()).collect();
    for id in &ids {
        assert!(listed.contains(&id.as_str()), "a fresh replica lists {id}: {listed:?}");
        assert_eq!(c.get(&format!("/api/conversations/{id}")).await.0, 200);
    }

    // Delete through B what A created: its pod, Secret and PVC go; C stops routing it.
    assert_eq!(b.delete(&format!("/api/conversations/{}", ids[0])).await, 200);
    let o = ctx.wait_objects((2, 2, 2), Duration::from_secs(60)).await;
    assert_eq!((o.0.len(), o.1.len(), o.2.len()), (2, 2, 2), "{o:?}");
    let gone = ids[0].clone();
    eventually("C answers 404 for the deleted conversation", Duration::from_secs(30), || {
        let c = &c;
        let gone = gone.clone();
        async move { c.get(&format!("/api/conversations/{gone}")).await.0 == 404 }
    })
    .await;
    for id in &ids[1..] {
        assert_eq!(c.delete(&format!("/api/conversations/{id}")).await, 200);
    }
    let o = ctx.wait_objects((0, 0, 0), Duration::from_secs(60)).await;
    assert_eq!((o.0.len(), o.1.len(), o.2.len()), (0, 0, 0), "nothing left: {o:?}");
    drop((b, c));
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_fails_clearly_and_in_bounded_time() {
    let env = nestor_test_support::require_kube!();
    let ctx = Ctx::new(env, "n-bad").await;
    let dir = ctx.dir.path();

    // A namespace nestor may not write to: it refuses to start, naming the missing verbs.
    let cfg = Replica::config(dir, "ro", 1, &ctx.env.readonly, &ctx.node.ns.name, &agent_server_image(), "");
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_nestor")).arg("serve").arg("--config").arg(&cfg).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    assert!(text.contains("lacks permissions") && text.contains("create pods") && text.contains("create secrets"), "{text}");

    // The API server down at start: a clear error, bounded.
    let kc = std::fs::read_to_string(&ctx.env.nestor).unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let api_port = std::env::var("NESTOR_KUBE_API_PORT").unwrap_or_else(|_| "26443".into());
    let down = dir.join("down.kubeconfig");
    std::fs::write(&down, kc.replace(&format!("127.0.0.1:{api_port}"), &format!("127.0.0.1:{dead}"))).unwrap();
    let cfg = Replica::config(dir, "down", 1, &down, &ctx.node.ns.name, &agent_server_image(), "");
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_nestor")).arg("serve").arg("--config").arg(&cfg).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    assert!(text.contains("unreachable") && text.contains(&format!("127.0.0.1:{dead}")), "{text}");

    // An image that never becomes ready: the create fails within the startup bound, says
    // why, and leaves nothing behind.
    // (A short startup bound for this replica.)
    let cfg = Replica::config(dir, "badimg2", 1, &ctx.env.nestor, &ctx.node.ns.name, "nestor/does-not-exist:0", "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("startup_timeout_secs = 240.0", "startup_timeout_secs = 8.0");
    std::fs::write(&cfg, &text).unwrap();
    let n = Replica::start_with_config(dir, "badimg2", &cfg).await;
    let t0 = Instant::now();
    let (status, body) = n.post("/api/conversations", &create_body()).await;
    let took = t0.elapsed();
    assert!(status == 502 || status == 503, "{status}: {body}");
    let detail = body.to_string();
    assert!(detail.contains("ErrImagePull") && detail.contains("did not become ready"), "{detail}");
    assert!(took < Duration::from_secs(40), "bounded: {took:?}");
    let o = ctx.wait_objects((0, 0, 0), Duration::from_secs(30)).await;
    assert_eq!((o.0.len(), o.1.len(), o.2.len()), (0, 0, 0), "a failed create leaves nothing: {o:?}");
    let (s, page) = n.get("/api/conversations/search").await;
    assert_eq!(s, 200);
    assert_eq!(page["items"].as_array().map(|a| a.len()), Some(0), "{page}");
    drop(n);
    ctx.finish().await;
}

impl Replica {
    async fn start_with_config(dir: &Path, name: &'static str, cfg: &Path) -> Replica {
        let text = std::fs::read_to_string(cfg).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let text = text
            .lines()
            .map(|l| if l.starts_with("bind = ") { format!("bind = \"127.0.0.1:{port}\"") } else { l.to_owned() })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(cfg, text).unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nestor"))
            .arg("serve")
            .arg("--config")
            .arg(cfg)
            .env_remove("SESSION_API_KEY")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let r = Replica { name, child, url: format!("http://127.0.0.1:{port}"), log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(resp) = http().get(format!("{}/alive", r.url)).send().await {
                if resp.status().is_success() {
                    return r;
                }
            }
            assert!(Instant::now() < deadline, "nestor {name} did not answer: {}", r.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The configuration shipped in deploy/kubernetes/configmap.yaml loads and validates.
#[test]
fn shipped_configmap_is_a_valid_configuration() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join("deploy/kubernetes/configmap.yaml")).unwrap();
    let cm: Value = serde_yaml::from_str(&text).unwrap();
    let toml = cm["data"]["nestor.toml"].as_str().expect("data.nestor.toml");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nestor.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = nestor_aggregator::config::Config::load(Some(&path), &Default::default()).expect("loads");
    assert_eq!(cfg.provisioner.kind, nestor_aggregator::config::ProvisionerKind::Kubernetes);
    let s = cfg.provisioner.kubernetes.validate().expect("valid kubernetes settings");
    assert_eq!(s.namespace.as_deref(), Some("nestor-agents"));
    assert_eq!(s.reach, nestor_provisioner::kubernetes::Reach::PodIp, "real clusters reach pods at their IP");
    // The Role in rbac.yaml is for the same namespace.
    let role = nestor_test_support::kube_env::shipped_role().unwrap();
    assert_eq!(role.metadata.namespace.as_deref(), Some("nestor-agents"));
}
