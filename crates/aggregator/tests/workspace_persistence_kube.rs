//! Workspace persistence end to end with the kubernetes provisioner: a real kube-apiserver +
//! etcd, pods run by the test node agent as Docker containers of the real agent-server image
//! and of nestor's own binary (the init container and the sync sidecar), and a real
//! S3-compatible server (moto).
//!
//! Why: with kubernetes nestor is not on the node; the pod restores and pushes its own files
//! (`nestor_provisioner::kubernetes::persistence`). Only this shows the whole chain works:
//! the init container restores before the agent-server starts, the sidecar pushes while it
//! runs and on SIGTERM, nestor shows the sidecar's status, and with `storage = "emptydir"` a
//! stopped conversation comes back in a fresh pod with every file and its history — the data
//! can only have come from the bucket.
//!
//! The sync image is nestor's runtime base (`nestor/runtime-base:*`, scripts/build-nestor-
//! image.sh; the agent-server image when that was not built, as in CI) plus the `nestor`
//! binary this test run built, made in seconds and tagged by the binary's hash, so CI never
//! needs a release image build for it.
//!
//! The pods' containers run on Docker's bridge and cannot reach the host's loopback, where
//! moto listens: a forwarding proxy on the bridge's gateway address stands in for the
//! storage endpoint (for nestor and the pods alike), and also cuts it for the outage step.
//!
//! Needs what crates/aggregator/tests/kubernetes.rs needs (`NESTOR_TEST_REQUIRE_KUBE=1` makes
//! a missing cluster fail) and an S3 server (`NESTOR_TEST_REQUIRE_S3=1`).

#[path = "../../workspace-store/tests/common/mod.rs"]
mod common;
mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bucket, noise, unique_prefix};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use nestor_test_support::kube_env::{self, agent_server_image, KubeEnv, TestNamespace};
use nestor_test_support::node_agent::{self, NodeAgent, NodeAgentConfig};
use nestor_test_support::ChaosProxy;
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::{json, Value};
use support::{create_body, start_with_toml, TestNestor, CLIENT_KEY};

const BUCKET: &str = "nestor-aggregator-tests";
const PROJECT: &str = "/workspace/project";
const READY_SECS: u64 = 240;

/// `docker <args>` (the CLI honours `DOCKER_HOST`), bounded; stdout, or why it failed.
fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("timeout")
        .arg("300")
        .arg("docker")
        .args(args)
        .env("DOCKER_BUILDKIT", "0")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run the docker CLI: {e}"))?;
    if !out.status.success() {
        return Err(format!("docker {}: {} {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The sync containers' image: nestor's runtime base + this run's `nestor` binary (stripped
/// of debug info), `/workspace` and the sync cache owned by the pods' uid (the node agent has
/// no fsGroup). Reused while the binary is unchanged.
fn sync_image() -> Result<String, String> {
    // Once per test binary (its tests run concurrently).
    static IMG: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    IMG.get_or_init(build_sync_image).clone()
}

fn build_sync_image() -> Result<String, String> {
    let bin = env!("CARGO_BIN_EXE_nestor");
    // nestor's own runtime base when it was built (scripts/build-nestor-image.sh); else the
    // agent-server image, which CI always has (Debian trixie too, with user 10001).
    let base = docker(&["images", "nestor/runtime-base", "--format", "{{.Repository}}:{{.Tag}}"])?
        .lines()
        .find(|l| !l.ends_with(":<none>"))
        .map(str::to_owned)
        .unwrap_or_else(agent_server_image);
    let out = Command::new("sha256sum").arg(bin).output().map_err(|e| format!("sha256sum: {e}"))?;
    let hash = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    let base_id = docker(&["image", "inspect", "--format", "{{.Id}}", &base])?;
    let tag = format!("nestor-sync-test:{}-{}", &hash[..12], &base_id.trim_start_matches("sha256:")[..8]);
    if docker(&["image", "inspect", "--format", "{{.Id}}", &tag]).is_ok() {
        return Ok(tag);
    }
    let t0 = Instant::now();
    let ctx = tempfile::tempdir().map_err(|e| e.to_string())?;
    std::fs::copy(bin, ctx.path().join("nestor")).map_err(|e| format!("copy {bin}: {e}"))?;
    let _ = Command::new("strip").arg("--strip-debug").arg(ctx.path().join("nestor")).status();
    std::fs::create_dir(ctx.path().join("empty")).map_err(|e| e.to_string())?;
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM {base}\nCOPY --chown=0:0 nestor /usr/local/bin/nestor\nCOPY --chown=10001:10001 empty /workspace\n\
             COPY --chown=10001:10001 empty /var/lib/nestor/sync-cache\nUSER 10001:10001\nENTRYPOINT [\"/usr/local/bin/nestor\"]\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    docker(&["build", "-q", "-t", &tag, &ctx.path().to_string_lossy()])?;
    // A glibc mismatch between the build host and the base would show here.
    let v = docker(&["run", "--rm", &tag, "--version"])?;
    eprintln!("built {tag} ({v}) from {base} in {:?}", t0.elapsed());
    Ok(tag)
}

async fn prerequisites() -> Result<(KubeEnv, String), String> {
    let env = kube_env::prerequisites().await?;
    let img = tokio::task::spawn_blocking(sync_image).await.map_err(|e| e.to_string())??;
    Ok((env, img))
}

/// The Docker bridge's gateway: a local address the pods' containers reach. Some Docker
/// versions (Debian's 20.10 on a fresh install) list the bridge's subnet without its gateway:
/// then the bridge interface's own address, as the host has it, and failing that the subnet's
/// first address (the one Docker gives the bridge unless configured otherwise).
fn bridge_gateway() -> Result<std::net::Ipv4Addr, String> {
    let ipam = docker(&["network", "inspect", "bridge", "--format", "{{range .IPAM.Config}}{{.Gateway}} {{.Subnet}};{{end}}"])?;
    if let Some(gw) = listed_gateway(&ipam) {
        return Ok(gw);
    }
    let iface = docker(&["network", "inspect", "bridge", "--format", "{{index .Options \"com.docker.network.bridge.name\"}}"]).unwrap_or_default();
    let iface = if iface.is_empty() || iface == "<no value>" { "docker0".to_owned() } else { iface };
    let shown = Command::new("timeout").args(["30", "ip", "-4", "-o", "addr", "show", "dev", &iface]).output();
    if let Some(a) = shown.ok().filter(|o| o.status.success()).and_then(|o| interface_address(&String::from_utf8_lossy(&o.stdout))) {
        return Ok(a);
    }
    subnet_first_address(&ipam).ok_or_else(|| format!("no IPv4 gateway for the bridge network (IPAM config {ipam:?}, interface {iface})"))
}

/// The first IPv4 gateway listed in an IPAM config printed as `GATEWAY SUBNET;` entries
/// (an entry without a gateway is just ` SUBNET`).
fn listed_gateway(ipam: &str) -> Option<std::net::Ipv4Addr> {
    ipam.split(';').flat_map(str::split_whitespace).find_map(|w| w.parse().ok())
}

/// The first address of the first IPv4 subnet in such a config.
fn subnet_first_address(ipam: &str) -> Option<std::net::Ipv4Addr> {
    ipam.split(';').flat_map(str::split_whitespace).find_map(|w| {
        let (net, bits) = w.split_once('/')?;
        let (net, bits): (std::net::Ipv4Addr, u32) = (net.parse().ok()?, bits.parse().ok()?);
        // Host bits set in the listing are masked off.
        let mask = (!0u32).checked_shl(32 - bits).unwrap_or(0);
        (bits < 31).then(|| std::net::Ipv4Addr::from((u32::from(net) & mask) + 1))
    })
}

/// The address in `ip -4 -o addr show` output (`N: IFACE    inet A.B.C.D/NN brd …`).
fn interface_address(shown: &str) -> Option<std::net::Ipv4Addr> {
    let mut words = shown.split_whitespace();
    words.find(|w| *w == "inet")?;
    words.next()?.split('/').next()?.parse().ok()
}

#[test]
fn the_bridges_gateway_is_read_from_the_listing_the_interface_or_the_subnet() {
    assert_eq!(listed_gateway("172.17.0.1 172.17.0.0/16;"), Some([172, 17, 0, 1].into()));
    assert_eq!(listed_gateway("172.18.0.0/16;"), None, "as the trimmed CLI output gives it, no gateway");
    assert_eq!(listed_gateway(" fd00::/64; 172.19.0.0/16;"), None);
    assert_eq!(subnet_first_address("172.18.0.0/16;"), Some([172, 18, 0, 1].into()));
    assert_eq!(subnet_first_address(" fd00::/64; 172.19.0.0/16;"), Some([172, 19, 0, 1].into()));
    assert_eq!(subnet_first_address("172.17.5.0/16;"), Some([172, 17, 0, 1].into()), "host bits masked");
    assert_eq!(subnet_first_address("255.255.255.255/24;"), Some([255, 255, 255, 1].into()));
    assert_eq!(subnet_first_address(" 10.0.0.0/32;"), None);
    assert_eq!(subnet_first_address("10.1.2.3/0;"), Some([0, 0, 0, 1].into()));
    assert_eq!(subnet_first_address(""), None);
    let shown = "5: docker0    inet 172.17.0.1/16 brd 172.17.255.255 scope global docker0\\       valid_lft forever preferred_lft forever\n";
    assert_eq!(interface_address(shown), Some([172, 17, 0, 1].into()));
    assert_eq!(interface_address(""), None);
}

struct Fixture {
    ns: TestNamespace,
    agent: Option<NodeAgent>,
    node: String,
    /// Storage as nestor and the pods see it (forwarded to moto); cut on command.
    proxy: ChaosProxy,
    s3: String,
    prefix: String,
    sync_image: String,
}

impl Fixture {
    fn toml(&self, state: &std::path::Path, env: &KubeEnv) -> String {
        format!(
            r#"bind = "127.0.0.1:0"
session_api_keys = ["{CLIENT_KEY}"]
state_dir = "{state}"
ready_timeout_secs = {READY_SECS}.0
[workspace_storage]
bucket = "{BUCKET}"
prefix = "{prefix}"
endpoint = "{endpoint}"
region = "us-east-1"
access_key_id = "test"
secret_access_key = "test"
push_interval_secs = 2
request_timeout_secs = 10
connect_timeout_secs = 2
on_delete = "purge"
[workspace_storage.retry]
max_attempts = 2
initial_backoff_ms = 100
max_backoff_ms = 300
[provisioner]
kind = "kubernetes"
[provisioner.kubernetes]
kubeconfig = "{kc}"
namespace = "{ns}"
image = "{image}"
image_pull_policy = "Never"
reach = "host-port-annotation"
storage = "emptydir"
startup_timeout_secs = {READY_SECS}.0
termination_grace_secs = 2
api_timeout_secs = 10.0
[provisioner.kubernetes.workspace_sync]
image = "{sync}"
final_push_secs = 20
"#,
            state = state.display(),
            prefix = self.prefix,
            endpoint = self.proxy.url(),
            kc = env.nestor.display(),
            ns = self.ns.name,
            image = agent_server_image(),
            sync = self.sync_image,
        )
    }

    /// Objects of the test in the bucket.
    async fn stored_keys(&self) -> Vec<String> {
        let raw = common::config(&self.s3, BUCKET, &self.prefix).build_object_store().unwrap();
        let p = object_store::path::Path::parse(&self.prefix).unwrap();
        raw.list(Some(&p)).map_ok(|m| m.location.to_string()).try_collect().await.unwrap_or_default()
    }

    async fn finish(mut self) {
        self.ns.shutdown().await;
        if let Some(a) = self.agent.take() {
            a.shutdown().await;
        }
        self.proxy.stop();
        let d = node_agent::connect_docker(None).await.unwrap();
        let (cs, vs) = node_agent::leftovers(&d, &self.node).await;
        assert!(cs.is_empty() && vs.is_empty(), "node agent left {cs:?} {vs:?}");
    }
}

fn slow_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(READY_SECS + 60)).build().unwrap()
}

fn call(n: &TestNestor, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    slow_client().request(method, format!("{}{path}", n.url)).header("X-Session-API-Key", CLIENT_KEY)
}

async fn bash(n: &TestNestor, id: &str, command: &str) -> String {
    let body = json!({"command": command, "cwd": PROJECT, "timeout": 60});
    let r = call(n, reqwest::Method::POST, &format!("/api/conversations/{id}/bash/execute_bash_command")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "bash {command:?}: {}", r.text().await.unwrap());
    let out: Value = r.json().await.unwrap();
    assert_eq!(out["exit_code"], 0, "bash {command:?}: {out}");
    out["stdout"].as_str().unwrap_or_default().to_owned()
}

async fn upload(n: &TestNestor, id: &str, path: &str, content: &[u8]) {
    let boundary = "nestor-test-boundary-7d3f0c2a";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"upload.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let r = call(n, reqwest::Method::POST, &format!("/api/conversations/{id}/file/upload"))
        .query(&[("path", path)])
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "upload {path}: {}", r.text().await.unwrap());
}

async fn download(n: &TestNestor, id: &str, path: &str) -> Vec<u8> {
    let r = call(n, reqwest::Method::GET, &format!("/api/conversations/{id}/file/download")).query(&[("path", path)]).send().await.unwrap();
    assert_eq!(r.status(), 200, "download {path}");
    r.bytes().await.unwrap().to_vec()
}

async fn send_message(n: &TestNestor, id: &str, text: &str) {
    let body = json!({"role": "user", "content": [{"type": "text", "text": text}], "run": false});
    let r = call(n, reqwest::Method::POST, &format!("/api/conversations/{id}/events")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "send message: {}", r.text().await.unwrap());
}

async fn history(n: &TestNestor, id: &str) -> Vec<(String, String)> {
    let r = call(n, reqwest::Method::GET, &format!("/api/conversations/{id}/events/search?limit=100")).send().await.unwrap();
    assert_eq!(r.status(), 200, "events: {}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    v["items"].as_array().unwrap().iter().map(|e| (e["id"].as_str().unwrap_or_default().to_owned(), e["kind"].as_str().unwrap_or_default().to_owned())).collect()
}

async fn inventory(n: &TestNestor, id: &str) -> String {
    bash(n, id, "find . -mindepth 1 -printf '%y %m %p -> %l\\n' | sort && find . -type f -print0 | sort -z | xargs -0 sha256sum").await
}

async fn storage_status(n: &TestNestor, id: &str) -> Value {
    let r = call(n, reqwest::Method::GET, &format!("/api/conversations/{id}/runtime")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["nestor"]["workspace_storage"].clone()
}

/// Polls the runtime's storage status until `ok` holds (bounded); the last status.
async fn wait_status(n: &TestNestor, id: &str, what: &str, within: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let s = storage_status(n, id).await;
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {s}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn pod_names(ns: &TestNamespace) -> Vec<String> {
    ns.objects().await.unwrap().0
}

/// Namespace, node agent, storage proxy and nestor (in this process); None: skipped.
/// `storage_extra`: more `[workspace_storage]` TOML (e.g. a quota table).
async fn start(test: &str, on_delete: &str, storage_extra: &str) -> Option<(Fixture, TestNestor)> {
    let (env, sync_image) = match prerequisites().await {
        Ok(v) => v,
        Err(why) => {
            if kube_env::kube_required() {
                panic!("NESTOR_TEST_REQUIRE_KUBE=1 but: {why}");
            }
            eprintln!("SKIPPED (no test cluster): {why}");
            return None;
        }
    };
    let s3 = match common::shared_endpoint() {
        Ok(ep) => ep,
        Err(why) => {
            common::skip_without_s3(&why);
            return None;
        }
    };
    let _ = bucket(&s3, BUCKET);
    let target: SocketAddr = s3.trim_start_matches("http://").parse().expect("the S3 endpoint is host:port");
    let proxy = ChaosProxy::start_on(SocketAddr::from((bridge_gateway().unwrap(), 0)), target).await.unwrap();
    let ns = TestNamespace::create(&env, test).await.expect("test namespace");
    let node = format!("node-{}", ns.name);
    let agent = NodeAgent::start(NodeAgentConfig { kubeconfig: env.admin.clone(), namespace: ns.name.clone(), node_name: node.clone(), docker_host: None })
        .await
        .expect("node agent");
    let fx = Fixture { ns, agent: Some(agent), node, proxy, s3, prefix: unique_prefix(test), sync_image };
    let dir = tempfile::tempdir().unwrap();
    let toml = fx
        .toml(&dir.path().join("state"), &env)
        .replace("on_delete = \"purge\"", &format!("on_delete = \"{on_delete}\""))
        .replace("[workspace_storage.retry]", &format!("{storage_extra}\n[workspace_storage.retry]"));
    let n = start_with_toml(dir, &toml).await;
    Some((fx, n))
}

async fn create(n: &TestNestor) -> String {
    let r = call(n, reqwest::Method::POST, "/api/conversations").json(&create_body(None)).send().await.unwrap();
    assert_eq!(r.status(), 201, "create: {}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["workspace"]["working_dir"], PROJECT, "{v}");
    v["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_and_history_come_back_in_a_fresh_pod_from_the_bucket() {
    let Some((fx, n)) = start("n-wsp", "purge", "").await else { return };

    // A conversation in its pod: the restore ran first, the sidecar beside the agent-server.
    let t0 = Instant::now();
    let id = create(&n).await;
    eprintln!("TIMING create (init restore + agent-server + sidecar): {:?}", t0.elapsed());
    let pods = pod_names(&fx.ns).await;
    assert_eq!(pods.len(), 1, "{pods:?}");
    let api: kube::Api<Pod> = kube::Api::namespaced(fx.ns.client(), &fx.ns.name);
    let pod = api.get(&pods[0]).await.unwrap();
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.init_containers.as_ref().unwrap()[0].name, "workspace-sync-pull");
    let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["agent-server", "workspace-sync"]);
    let st = pod.status.as_ref().unwrap();
    let init = &st.init_container_statuses.as_ref().unwrap()[0];
    assert_eq!(init.state.as_ref().unwrap().terminated.as_ref().map(|t| t.exit_code), Some(0), "{init:?}");

    // Written like clients write: an upload, the agent's shell, a message.
    let uploaded = noise(7, 300_000);
    upload(&n, &id, &format!("{PROJECT}/uploaded.bin"), &uploaded).await;
    bash(
        &n,
        &id,
        "mkdir -p src/deep empty/dir && printf 'fn main() {}\\n' > src/deep/main.rs && seq 1 20000 > numbers.txt \
         && chmod 600 numbers.txt && ln -s numbers.txt link && echo bye > doomed.txt",
    )
    .await;
    send_message(&n, &id, "remember this across pods").await;

    // The sidecar pushes on its own, and nestor shows its status.
    let s = wait_status(&n, &id, "a periodic push of everything", Duration::from_secs(60), |s| {
        s["healthy"] == true && s["pending_bytes"] == 0 && s["workspace"]["stored_bytes"].as_u64().unwrap_or(0) >= 300_000
    })
    .await;
    assert_eq!(s["pushed_by"], "pod", "{s}");
    assert_eq!(s["sidecar"]["reachable"], true, "{s}");
    assert_eq!(s["push_interval_secs"], 2, "{s}");
    let stored_files = s["workspace"]["stored_files"].as_u64().unwrap();

    // A deleted file is deleted from the stored copy too.
    bash(&n, &id, "rm doomed.txt").await;
    wait_status(&n, &id, "the deletion pushed", Duration::from_secs(60), |s| {
        s["healthy"] == true && s["workspace"]["stored_files"].as_u64() == Some(stored_files - 1)
    })
    .await;

    // Storage down during periodic pushes: reported, then recovered.
    fx.proxy.set_refusing(true);
    fx.proxy.reset_all();
    bash(&n, &id, "echo during-outage > outage.txt").await;
    let s = wait_status(&n, &id, "the failed pushes reported", Duration::from_secs(60), |s| {
        s["healthy"] == false && s["consecutive_failures"].as_u64().unwrap_or(0) > 0
    })
    .await;
    assert!(s["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{s}");
    fx.proxy.set_refusing(false);
    wait_status(&n, &id, "recovery after the outage", Duration::from_secs(90), |s| s["healthy"] == true && s["pending_bytes"] == 0).await;

    let files = inventory(&n, &id).await;
    for p in ["./uploaded.bin", "./src/deep/main.rs", "./numbers.txt", "./link -> numbers.txt", "./empty/dir", "./outage.txt"] {
        assert!(files.contains(p), "{p} in {files}");
    }
    assert!(!files.contains("doomed.txt"), "{files}");
    let events = history(&n, &id).await;
    assert!(events.iter().any(|(_, k)| k == "MessageEvent"), "{events:?}");

    // Idle stop: the pod (and its emptyDir) goes; the Secret stays.
    let t0 = Instant::now();
    let r = call(&n, reqwest::Method::DELETE, &format!("/api/conversations/{id}/runtime")).send().await.unwrap();
    assert_eq!(r.status(), 204, "stop: {}", r.text().await.unwrap_or_default());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pod_names(&fx.ns).await.is_empty() {
        assert!(Instant::now() < deadline, "the pod is not gone");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("TIMING stop (final push + pod deletion): {:?}", t0.elapsed());
    let s = storage_status(&n, &id).await;
    assert_eq!(s["sidecar"]["reachable"], false, "{s}");
    assert_eq!(s["healthy"], true, "the last status stays visible: {s}");

    // The next request starts a fresh pod, restored from the bucket before the agent starts.
    let t0 = Instant::now();
    assert_eq!(history(&n, &id).await, events, "the history after the restore");
    eprintln!("TIMING resume (new pod, restore, agent-server ready): {:?}", t0.elapsed());
    let pods = pod_names(&fx.ns).await;
    assert_eq!(pods.len(), 1);
    assert_ne!(api.get(&pods[0]).await.unwrap().metadata.uid, pod.metadata.uid, "a new pod");
    assert_eq!(inventory(&n, &id).await, files, "the files after the restore");
    assert_eq!(download(&n, &id, &format!("{PROJECT}/uploaded.bin")).await, uploaded);
    send_message(&n, &id, "after the move").await;
    wait_status(&n, &id, "pushing again", Duration::from_secs(60), |s| s["healthy"] == true && s["sidecar"]["reachable"] == true).await;

    // Delete with on_delete = "purge": no objects, no pods, Secrets or PVCs.
    assert!(!fx.stored_keys().await.is_empty());
    let r = call(&n, reqwest::Method::DELETE, &format!("/api/conversations/{id}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = fx.ns.objects().await.unwrap();
        let keys = fx.stored_keys().await;
        if (o.0.len(), o.1.len(), o.2.len()) == (0, 0, 0) && keys.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left after delete: {o:?} {keys:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    n.stop().await;
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_whose_final_push_fails_keeps_the_pod_and_delete_keeps_the_stored_copy() {
    let Some((fx, n)) = start("n-wsk", "keep", "").await else { return };
    let id = create(&n).await;
    bash(&n, &id, "seq 1 5000 > kept.txt").await;
    wait_status(&n, &id, "a periodic push", Duration::from_secs(60), |s| s["healthy"] == true && s["pending_bytes"] == 0).await;
    let pods = pod_names(&fx.ns).await;
    assert_eq!(pods.len(), 1);

    // Storage down: the stop's final push fails, so the pod (the only up-to-date copy of
    // what was written since) is not deleted, and the caller is told why.
    bash(&n, &id, "echo late > late.txt").await;
    fx.proxy.set_refusing(true);
    fx.proxy.reset_all();
    let r = call(&n, reqwest::Method::DELETE, &format!("/api/conversations/{id}/runtime")).send().await.unwrap();
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("could not be pushed"), "{body}");
    assert_eq!(pod_names(&fx.ns).await, pods, "the pod is kept");
    let s = storage_status(&n, &id).await;
    assert_eq!(s["healthy"], false, "{s}");

    // Storage back: the stop succeeds, and the file written during the outage is stored.
    fx.proxy.set_refusing(false);
    let r = call(&n, reqwest::Method::DELETE, &format!("/api/conversations/{id}/runtime")).send().await.unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap_or_default());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pod_names(&fx.ns).await.is_empty() {
        assert!(Instant::now() < deadline, "the pod is not gone");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(bash(&n, &id, "cat late.txt").await.trim(), "late", "restored in a fresh pod");

    // Delete with on_delete = "keep": the cluster objects go, the stored copy stays.
    let r = call(&n, reqwest::Method::DELETE, &format!("/api/conversations/{id}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = fx.ns.objects().await.unwrap();
        if (o.0.len(), o.1.len(), o.2.len()) == (0, 0, 0) {
            break;
        }
        assert!(Instant::now() < deadline, "left after delete: {o:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let keys = fx.stored_keys().await;
    assert!(keys.iter().any(|k| k.ends_with("/workspace/manifest.json")), "{keys:?}");
    assert!(keys.iter().any(|k| k.ends_with("/state/manifest.json")), "{keys:?}");
    n.stop().await;
    purge_prefix(&fx).await;
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quota_refusal_in_the_pod_is_reported_and_refuses_new_work() {
    let Some((fx, n)) = start("n-wsq", "purge", "[workspace_storage.quota]\nmax_bytes = 2000000").await else { return };
    let id = create(&n).await;
    bash(&n, &id, "seq 1 1000 > small.txt").await;
    let s = wait_status(&n, &id, "a periodic push", Duration::from_secs(60), |s| s["healthy"] == true && s["pending_bytes"] == 0).await;
    let stored = s["workspace"]["stored_bytes"].as_u64().unwrap();

    // Over the conversation's quota: the sidecar's push is refused, the stored copy is left
    // as it was, the status says why, and new agent work gets 413.
    bash(&n, &id, "head -c 3000000 /dev/urandom > big.bin").await;
    let s = wait_status(&n, &id, "the quota refusal", Duration::from_secs(60), |s| s["over_quota"] == true).await;
    assert!(s["last_error"].as_str().is_some_and(|e| e.contains("quota")), "{s}");
    assert_eq!(s["workspace"]["stored_bytes"].as_u64(), Some(stored), "the stored copy is untouched: {s}");
    let body = json!({"role": "user", "content": [{"type": "text", "text": "more"}], "run": false});
    let r = call(&n, reqwest::Method::POST, &format!("/api/conversations/{id}/events")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.text().await.unwrap().contains("quota"));

    // Cleaning up brings it back.
    bash(&n, &id, "rm big.bin").await;
    wait_status(&n, &id, "healthy again", Duration::from_secs(60), |s| s["healthy"] == true && s["over_quota"] == false).await;
    send_message(&n, &id, "more, now").await;

    let r = call(&n, reqwest::Method::DELETE, &format!("/api/conversations/{id}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    n.stop().await;
    purge_prefix(&fx).await;
    fx.finish().await;
}

/// Leaves nothing of a test in the bucket.
async fn purge_prefix(fx: &Fixture) {
    let raw = common::config(&fx.s3, BUCKET, &fx.prefix).build_object_store().unwrap();
    for k in fx.stored_keys().await {
        let _ = raw.delete(&object_store::path::Path::from(k)).await;
    }
}
