//! Workspace persistence end to end with the docker provisioner, the real agent-server image
//! and a real S3-compatible server: what a conversation wrote survives losing its container
//! AND this host's copy of its files.
//!
//! Why: the process-provisioner tests (workspace_persistence.rs) use the fake agent-server;
//! only the real image shows that the bind-mounted trees, the chown to the container's user
//! and the agent-server's own state layout restore into a working conversation. Files are
//! written the way clients write them, through nestor (the file upload route and bash over
//! REST); then the container is stopped and removed, nestor is restarted and the
//! conversation's data directory and the store's cache are deleted; the next request
//! restores and starts a new container, which must show every file (content, mode,
//! symlink) and the conversation's history.
//!
//! Needs the engine and the image like crates/provisioner/tests/docker.rs (`DOCKER_HOST` or
//! the local socket, `NESTOR_TEST_AGENT_SERVER_IMAGE`; skipped without them unless
//! `NESTOR_TEST_REQUIRE_DOCKER=1`) and an S3 server like workspace_persistence.rs
//! (`s3_or_skip!`, `NESTOR_TEST_REQUIRE_S3=1`). Everything labelled with the test's instance
//! id is removed afterwards, also when it fails.

#[path = "../../workspace-store/tests/common/mod.rs"]
mod common;
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bucket, noise, unique_prefix};
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::{json, Value};
use support::{create_body, start_with_toml, TestNestor, CLIENT_KEY};

const BUCKET: &str = "nestor-aggregator-tests";
const PROJECT: &str = "/workspace/project";
/// A cold container of the real image may take a while on a small, busy CI machine.
const READY_SECS: u64 = 240;

fn image() -> String {
    std::env::var("NESTOR_TEST_AGENT_SERVER_IMAGE").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "nestor/agent-server:1.58.2".into())
}

/// `docker <args>` (the CLI honours `DOCKER_HOST`), bounded; stdout, or why it failed.
fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("timeout")
        .arg("120")
        .arg("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run the docker CLI: {e}"))?;
    if !out.status.success() {
        return Err(format!("docker {}: {} {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The engine answers and has the image; else why not.
fn engine() -> Result<(), String> {
    docker(&["version", "--format", "{{.Server.Version}}"]).map_err(|e| format!("no Docker engine (scripts/setup-docker.sh): {e}"))?;
    let img = image();
    docker(&["image", "inspect", "--format", "{{.Id}}", &img])
        .map_err(|_| format!("image {img} is not present (scripts/build-agent-server-image.sh builds it)"))?;
    Ok(())
}

/// Skip (return) when there is no engine or image, unless CI requires them.
macro_rules! require_engine {
    () => {
        if let Err(why) = engine() {
            if std::env::var("NESTOR_TEST_REQUIRE_DOCKER").as_deref() == Ok("1") {
                panic!("NESTOR_TEST_REQUIRE_DOCKER=1 but: {why}");
            }
            eprintln!("SKIPPED (no docker engine): {why}");
            return;
        }
    };
}

/// Removes every container and volume labelled with `instance` when dropped.
struct Cleanup {
    instance: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let filter = format!("label=org.nestor.instance={}", self.instance);
        if let Ok(ids) = docker(&["ps", "-aq", "--filter", &filter]) {
            for id in ids.lines().filter(|l| !l.is_empty()) {
                let _ = docker(&["rm", "-f", id]);
            }
        }
        if let Ok(vols) = docker(&["volume", "ls", "-q", "--filter", &filter]) {
            for v in vols.lines().filter(|l| !l.is_empty()) {
                let _ = docker(&["volume", "rm", "-f", v]);
            }
        }
    }
}

struct Setup {
    endpoint: String,
    prefix: String,
    instance: String,
}

impl Setup {
    fn toml(&self, state: &Path) -> String {
        format!(
            "bind = \"127.0.0.1:0\"\nsession_api_keys = [\"{CLIENT_KEY}\"]\nstate_dir = \"{}\"\nready_timeout_secs = {READY_SECS}.0\n\
             [workspace_storage]\nbucket = \"{BUCKET}\"\nprefix = \"{}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n\
             access_key_id = \"test\"\nsecret_access_key = \"test\"\npush_interval_secs = 2\nrequest_timeout_secs = 20\nconnect_timeout_secs = 2\n\
             [workspace_storage.retry]\nmax_attempts = 3\ninitial_backoff_ms = 100\nmax_backoff_ms = 500\n\
             [provisioner]\nkind = \"docker\"\n[provisioner.docker]\nimage = \"{}\"\ninstance_id = \"{}\"\n\
             startup_timeout_secs = {READY_SECS}.0\nstop_timeout_secs = 5.0\n{}",
            state.display(),
            self.prefix,
            self.endpoint,
            image(),
            self.instance,
            container_user()
        )
    }

    async fn start(&self, dir: tempfile::TempDir) -> TestNestor {
        let toml = self.toml(&dir.path().join("state"));
        start_with_toml(dir, &toml).await
    }

    /// Leaves nothing of the test in the bucket.
    async fn purge(&self) {
        let raw = common::config(&self.endpoint, BUCKET, &self.prefix).build_object_store().unwrap();
        let p = object_store::path::Path::parse(&self.prefix).unwrap();
        let keys: Vec<_> = raw.list(Some(&p)).map_ok(|m| m.location).try_collect().await.unwrap_or_default();
        for k in keys {
            let _ = raw.delete(&k).await;
        }
    }
}

/// As root nestor hands restored files to the image's user; otherwise the containers must run
/// as this test's own user (see the docker provisioner's module docs).
fn container_user() -> String {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if uid == 0 {
        String::new()
    } else {
        format!("user = \"{uid}:{gid}\"\n")
    }
}

fn hex(id: &str) -> String {
    uuid::Uuid::parse_str(id).unwrap().simple().to_string()
}

fn container_name(instance: &str, id: &str) -> String {
    format!("nestor-{instance}-{}", hex(id))
}

/// A client whose requests may wait for a container to start (and be restored).
fn slow_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(READY_SECS + 60)).build().unwrap()
}

fn call(n: &TestNestor, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    slow_client().request(method, format!("{}{path}", n.url)).header("X-Session-API-Key", CLIENT_KEY)
}

async fn create(n: &TestNestor) -> String {
    let r = call(n, reqwest::Method::POST, "/api/conversations").json(&create_body(None)).send().await.unwrap();
    assert_eq!(r.status(), 201, "create: {}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["workspace"]["working_dir"], PROJECT, "{v}");
    v["id"].as_str().unwrap().to_owned()
}

/// Runs `command` in the project directory of conversation `id` (bash over REST, through
/// nestor); its stdout. Fails the test on a non-zero exit.
async fn bash(n: &TestNestor, id: &str, command: &str) -> String {
    let body = json!({"command": command, "cwd": PROJECT, "timeout": 60});
    let r = call(n, reqwest::Method::POST, &format!("/api/conversations/{id}/bash/execute_bash_command")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "bash {command:?}: {}", r.text().await.unwrap());
    let out: Value = r.json().await.unwrap();
    assert_eq!(out["exit_code"], 0, "bash {command:?}: {out}");
    out["stdout"].as_str().unwrap_or_default().to_owned()
}

/// Uploads `content` to `path` through the agent-server's file upload route (multipart).
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
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["file_size"], content.len(), "{v}");
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

/// The conversation's events as (id, kind), in order.
async fn history(n: &TestNestor, id: &str) -> Vec<(String, String)> {
    let r = call(n, reqwest::Method::GET, &format!("/api/conversations/{id}/events/search?limit=100")).send().await.unwrap();
    assert_eq!(r.status(), 200, "events: {}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    v["items"].as_array().unwrap().iter().map(|e| (e["id"].as_str().unwrap_or_default().to_owned(), e["kind"].as_str().unwrap_or_default().to_owned())).collect()
}

/// Every path of the project as the container sees it: type, mode, symlink target, and a
/// checksum of each file.
async fn inventory(n: &TestNestor, id: &str) -> String {
    bash(n, id, "find . -mindepth 1 -printf '%y %m %p -> %l\\n' | sort && find . -type f -print0 | sort -z | xargs -0 sha256sum").await
}

/// The runtime's storage status says everything is stored.
async fn assert_stored(n: &TestNestor, id: &str) {
    let r = call(n, reqwest::Method::GET, &format!("/api/conversations/{id}/runtime")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let s = r.json::<Value>().await.unwrap()["nestor"]["workspace_storage"].clone();
    assert_eq!(s["healthy"], true, "{s}");
    assert_eq!(s["pending_bytes"], 0, "{s}");
    assert!(s["workspace"]["stored_bytes"].as_u64().unwrap_or(0) >= 100_000, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_and_history_survive_losing_the_container_and_the_local_data() {
    require_engine!();
    let ep = s3_or_skip!();
    let _ = bucket(&ep, BUCKET);
    let setup = Setup { endpoint: ep, prefix: unique_prefix("docker"), instance: format!("t-wsp-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]) };
    let _cleanup = Cleanup { instance: setup.instance.clone() };
    let n = setup.start(tempfile::tempdir().unwrap()).await;
    let id = create(&n).await;

    // Written like clients write: an upload, the agent's shell, a message.
    let uploaded = noise(11, 100_000);
    upload(&n, &id, &format!("{PROJECT}/uploaded.bin"), &uploaded).await;
    bash(
        &n,
        &id,
        "mkdir -p src/deep empty/dir && printf 'fn main() {}\\n' > src/deep/main.rs && seq 1 20000 > numbers.txt \
         && chmod 600 numbers.txt && chmod 755 src/deep/main.rs && ln -s numbers.txt link",
    )
    .await;
    send_message(&n, &id, "remember this across containers").await;
    let files = inventory(&n, &id).await;
    for p in ["./uploaded.bin", "./src/deep/main.rs", "./numbers.txt", "./link -> numbers.txt", "./empty/dir"] {
        assert!(files.contains(p), "{p} in {files}");
    }
    let events = history(&n, &id).await;
    assert!(events.iter().any(|(_, k)| k == "MessageEvent"), "{events:?}");

    // Stopped: the final push stores it all.
    let r = call(&n, reqwest::Method::DELETE, &format!("/api/conversations/{id}/runtime")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_stored(&n, &id).await;
    let name = container_name(&setup.instance, &id);
    let old_container = docker(&["inspect", "--format", "{{.Id}}", &name]).expect("the stopped container is kept");

    // nestor restarts; the container and this host's copy of the files are gone.
    let dir = n.stop().await;
    docker(&["rm", "-f", &name]).unwrap();
    let data = dir.path().join("state/docker/data").join(hex(&id));
    assert!(data.join("project/uploaded.bin").exists(), "the data directory is where the docs say");
    std::fs::remove_dir_all(&data).unwrap();
    let _ = std::fs::remove_dir_all(dir.path().join("state/workspace-store"));
    assert!(docker(&["inspect", &name]).is_err(), "the container is gone");
    let n = setup.start(dir).await;

    // The next request restores, then starts a new container: everything is there.
    assert_eq!(history(&n, &id).await, events, "the history after the restore");
    let new_container = docker(&["inspect", "--format", "{{.Id}}", &name]).expect("a new container");
    assert_ne!(new_container, old_container);
    assert_eq!(inventory(&n, &id).await, files, "the files after the restore");
    assert_eq!(download(&n, &id, &format!("{PROJECT}/uploaded.bin")).await, uploaded);
    assert!(data.join("project/uploaded.bin").exists(), "restored into a new data directory");
    eprintln!("restored into a new container: {} events, {} inventory lines", events.len(), files.lines().count());
    // And the conversation goes on in it.
    send_message(&n, &id, "after the move").await;
    bash(&n, &id, "echo more >> numbers.txt").await;

    let r = call(&n, reqwest::Method::DELETE, &format!("/api/conversations/{id}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    n.stop().await;
    setup.purge().await;
}
