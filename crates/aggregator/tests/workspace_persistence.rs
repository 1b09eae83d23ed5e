//! Workspace persistence through nestor (`[workspace_storage]`) on the process provisioner,
//! with the fake agent-server binary as the child (it keeps its conversations and events in
//! `OH_CONVERSATIONS_PATH`, like the real one) and a real S3-compatible server (moto_server,
//! see crates/workspace-store/tests/common): resume on a fresh host with every file and the
//! history, deletions, per-user prefixes, quotas, and storage going down mid-run.

#[path = "../../workspace-store/tests/common/mod.rs"]
mod common;
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{bucket, noise, snapshot, unique_prefix, write};
use futures::TryStreamExt;
use nestor_test_support::chaos_proxy::ChaosProxy;
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::{json, Value};
use support::*;

const BUCKET: &str = "nestor-aggregator-tests";
const ALICE: &str = "alice-key-0123456789";
const BOB: &str = "bob-key-0123456789ab";
const USERS: &str = "[[users]]\nid = \"alice\"\nsession_api_keys = [\"alice-key-0123456789\"]\n[[users]]\nid = \"bob\"\nsession_api_keys = [\"bob-key-0123456789ab\"]\n";

/// A nestor on the process provisioner with workspace storage at `endpoint` under `prefix`.
struct Setup {
    endpoint: String,
    prefix: String,
    /// `[workspace_storage]` lines beyond the connection (quotas, intervals…).
    storage_extra: String,
    /// Top-level TOML (users, admission…).
    top_extra: String,
}

impl Setup {
    fn new(endpoint: &str, test: &str) -> Setup {
        let _ = bucket(endpoint, BUCKET);
        Setup { endpoint: endpoint.to_owned(), prefix: unique_prefix(test), storage_extra: String::new(), top_extra: String::new() }
    }

    fn toml(&self, state: &Path) -> String {
        let keys = if self.top_extra.contains("[[users]]") { String::new() } else { format!("session_api_keys = [\"{CLIENT_KEY}\"]\n") };
        format!(
            "bind = \"127.0.0.1:0\"\n{keys}state_dir = \"{}\"\nready_timeout_secs = 30.0\n{}\n\
             [workspace_storage]\nbucket = \"{BUCKET}\"\nprefix = \"{}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n\
             access_key_id = \"test\"\nsecret_access_key = \"test\"\npush_interval_secs = 1\nrequest_timeout_secs = 10\nconnect_timeout_secs = 2\n{}\n\
             [workspace_storage.retry]\nmax_attempts = 2\ninitial_backoff_ms = 100\nmax_backoff_ms = 200\n\
             [provisioner]\nkind = \"process\"\n[provisioner.process]\nagent_server = \"{}\"\nstartup_timeout_secs = 20.0\nstop_timeout_secs = 3.0\n",
            state.display(),
            self.top_extra,
            self.prefix,
            self.endpoint,
            self.storage_extra,
            fake_bin().display()
        )
    }

    async fn start(&self, dir: tempfile::TempDir) -> TestNestor {
        let toml = self.toml(&dir.path().join("state"));
        start_with_toml(dir, &toml).await
    }

    /// The bucket, raw.
    fn raw(&self) -> std::sync::Arc<dyn ObjectStore> {
        common::config(&self.endpoint, BUCKET, &self.prefix).build_object_store().unwrap()
    }

    async fn keys(&self) -> Vec<String> {
        let p = object_store::path::Path::parse(&self.prefix).unwrap();
        let mut keys: Vec<String> = self.raw().list(Some(&p)).map_ok(|m| m.location.to_string()).try_collect().await.unwrap();
        keys.sort();
        keys
    }
}

fn hex(id: &str) -> String {
    uuid::Uuid::parse_str(id).unwrap().simple().to_string()
}

fn conv_dir(n: &TestNestor, id: &str) -> PathBuf {
    n.dir.path().join("state/process").join(hex(id))
}

fn with_key(r: reqwest::RequestBuilder, key: &str) -> reqwest::RequestBuilder {
    r.header("X-Session-API-Key", key)
}

async fn create_as(n: &TestNestor, key: &str) -> String {
    let r = with_key(n.client().post(format!("{}/api/conversations", n.url)), key).json(&create_body(None)).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

async fn runtime_as(n: &TestNestor, id: &str, key: &str) -> Value {
    let r = with_key(n.client().get(format!("{}/api/conversations/{id}/runtime", n.url)), key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn storage_as(n: &TestNestor, id: &str, key: &str) -> Value {
    runtime_as(n, id, key).await["nestor"]["workspace_storage"].clone()
}

async fn send_message_as(n: &TestNestor, id: &str, key: &str, text: &str) -> reqwest::Response {
    with_key(n.client().post(format!("{}/api/conversations/{id}/events", n.url)), key)
        .json(&json!({"role": "user", "content": [{"type": "text", "text": text}], "run": false}))
        .send()
        .await
        .unwrap()
}

async fn event_texts(n: &TestNestor, id: &str, key: &str) -> Vec<String> {
    let r = with_key(n.client().get(format!("{}/api/conversations/{id}/events/search?limit=100", n.url)), key).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["llm_message"]["content"][0]["text"].as_str().map(str::to_owned))
        .collect()
}

/// Polls `f` every 100 ms until it is true; fails after `secs`.
async fn wait_for<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Everything of the workspace written so far is stored (a push after `since` succeeded
/// with nothing pending).
async fn wait_stored(n: &TestNestor, id: &str, key: &str, since: time::OffsetDateTime) {
    wait_for("a complete push", 30, || async {
        let s = storage_as(n, id, key).await;
        let after = |v: &Value| parse_time(v).is_some_and(|t| t > since);
        after(&s["workspace"]["last_success_at"]) && after(&s["state"]["last_success_at"]) && s["pending_bytes"] == 0 && s["healthy"] == true
    })
    .await;
}

fn parse_time(v: &Value) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339).ok()
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Another host: this nestor's copies of the conversation's trees (and its manifest cache)
/// are gone; its catalog and keys (nestor's own state) remain.
fn lose_local_trees(n: &TestNestor, id: &str) {
    let d = conv_dir(n, id);
    std::fs::remove_dir_all(d.join("workspace")).unwrap();
    std::fs::remove_dir_all(d.join("state")).unwrap();
    let _ = std::fs::remove_dir_all(n.dir.path().join("state/workspace-store"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_conversation_resumes_on_a_fresh_host_with_every_file_and_its_history() {
    let ep = s3_or_skip!();
    let setup = Setup::new(&ep, "resume");
    let n = setup.start(tempfile::tempdir().unwrap()).await;
    let id = create_as(&n, CLIENT_KEY).await;
    let d = conv_dir(&n, &id);
    assert!(d.join("state/conversations").join(hex(&id)).join("meta.json").exists(), "state lives under state/");
    for i in 0..3 {
        assert_eq!(send_message_as(&n, &id, CLIENT_KEY, &format!("message {i}")).await.status(), 200);
    }
    let ws = d.join("workspace");
    write(&ws, "README.md", "# project\n");
    write(&ws, "src/lib.rs", "pub fn f() {}\n");
    write(&ws, "data/blob.bin", noise(7, 300_000));
    std::os::unix::fs::symlink("src/lib.rs", ws.join("link")).unwrap();
    std::fs::create_dir_all(ws.join("empty/dir")).unwrap();
    common::chmod(&ws, "README.md", 0o600);
    let files = snapshot(&ws);
    let history = event_texts(&n, &id, CLIENT_KEY).await;
    assert!(history.iter().any(|t| t == "message 2"), "{history:?}");

    // Stopped (as the idle policy does): the final push stores everything.
    let r = n.delete(&format!("/api/conversations/{id}/runtime")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let s = storage_as(&n, &id, CLIENT_KEY).await;
    assert_eq!(s["healthy"], true, "{s}");
    assert_eq!(s["pending_bytes"], 0, "{s}");
    assert!(s["last_success_at"].is_string(), "{s}");
    assert!(s["workspace"]["stored_bytes"].as_u64().unwrap() >= 300_000, "{s}");
    let rt = runtime_as(&n, &id, CLIENT_KEY).await;
    assert_eq!(rt["runtime_status"], "missing", "the 1.58 fields are kept: {rt}");
    assert_eq!(rt["can_resume"], true);

    // nestor goes away; the conversation's files are gone from this host.
    let dir = n.stop().await;
    let base = format!("{}/default/{}", setup.prefix, hex(&id));
    let keys = setup.keys().await;
    assert!(keys.contains(&format!("{base}/workspace/manifest.json")), "{keys:?}");
    assert!(keys.contains(&format!("{base}/state/manifest.json")), "{keys:?}");
    assert!(keys.iter().all(|k| k.starts_with(&format!("{base}/"))), "{keys:?}");
    let n = setup.start(dir).await;
    lose_local_trees(&n, &id);

    // The next request restores before the child starts: history and files are all there.
    assert_eq!(event_texts(&n, &id, CLIENT_KEY).await, history);
    assert_eq!(snapshot(&conv_dir(&n, &id).join("workspace")), files);
    // And it goes on from there.
    let t = now();
    assert_eq!(send_message_as(&n, &id, CLIENT_KEY, "after the move").await.status(), 200);
    write(&conv_dir(&n, &id).join("workspace"), "new.txt", "written on the new host");
    wait_stored(&n, &id, CLIENT_KEY, t).await;

    // Delete with the default on_delete = "keep": pushed once more, objects kept.
    assert_eq!(n.delete(&format!("/api/conversations/{id}")).send().await.unwrap().status(), 200);
    assert!(!conv_dir(&n, &id).exists());
    assert!(setup.keys().await.contains(&format!("{base}/workspace/manifest.json")));
    n.stop().await;
    purge_prefix(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_file_stays_deleted_after_a_push_and_purge_on_delete_removes_everything() {
    let ep = s3_or_skip!();
    let mut setup = Setup::new(&ep, "deletions");
    setup.storage_extra = "on_delete = \"purge\"\n".into();
    let n = setup.start(tempfile::tempdir().unwrap()).await;
    let id = create_as(&n, CLIENT_KEY).await;
    let ws = conv_dir(&n, &id).join("workspace");
    write(&ws, "keep.txt", "keep");
    write(&ws, "gone.txt", "to be deleted");
    write(&ws, "old/dir/file", "also deleted");
    let t = now();
    wait_stored(&n, &id, CLIENT_KEY, t).await;
    std::fs::remove_file(ws.join("gone.txt")).unwrap();
    std::fs::remove_dir_all(ws.join("old")).unwrap();
    let t = now();
    wait_stored(&n, &id, CLIENT_KEY, t).await;
    let generation = storage_as(&n, &id, CLIENT_KEY).await["workspace"]["generation"].as_u64().unwrap();
    assert!(generation >= 2, "the deletion is a new generation");

    // On a fresh host the deleted paths do not come back.
    let r = n.delete(&format!("/api/conversations/{id}/runtime")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    lose_local_trees(&n, &id);
    let r = n.post(&format!("/api/conversations/{id}/runtime/reprovision")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ws = conv_dir(&n, &id).join("workspace");
    assert!(ws.join("keep.txt").exists());
    assert!(!ws.join("gone.txt").exists() && !ws.join("old").exists());

    // on_delete = "purge": nothing of it stays in the bucket.
    assert!(!setup.keys().await.is_empty());
    assert_eq!(n.delete(&format!("/api/conversations/{id}")).send().await.unwrap().status(), 200);
    assert_eq!(setup.keys().await, Vec::<String>::new());
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_users_objects_live_under_their_own_prefix_and_stay_theirs() {
    let ep = s3_or_skip!();
    let mut setup = Setup::new(&ep, "twousers");
    setup.top_extra = USERS.into();
    let n = setup.start(tempfile::tempdir().unwrap()).await;
    let a = create_as(&n, ALICE).await;
    let b = create_as(&n, BOB).await;
    write(&conv_dir(&n, &a).join("workspace"), "alice.txt", "alice's");
    write(&conv_dir(&n, &b).join("workspace"), "bob.txt", "bob's");
    let t = now();
    wait_stored(&n, &a, ALICE, t).await;
    wait_stored(&n, &b, BOB, t).await;
    let keys = setup.keys().await;
    let (pa, pb) = (format!("{}/alice/{}/", setup.prefix, hex(&a)), format!("{}/bob/{}/", setup.prefix, hex(&b)));
    assert!(keys.iter().any(|k| k.starts_with(&pa)) && keys.iter().any(|k| k.starts_with(&pb)), "{keys:?}");
    assert!(keys.iter().all(|k| k.starts_with(&pa) || k.starts_with(&pb)), "{keys:?}");
    // Neither reads the other's status.
    let r = with_key(n.client().get(format!("{}/api/conversations/{a}/runtime", n.url)), BOB).send().await.unwrap();
    assert_eq!(r.status(), 404);
    for (id, key) in [(&a, ALICE), (&b, BOB)] {
        let r = with_key(n.client().delete(format!("{}/api/conversations/{id}", n.url)), key).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    n.stop().await;
    purge_prefix(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_conversation_over_its_quota_gets_a_clear_error_and_keeps_what_was_stored() {
    let ep = s3_or_skip!();
    let mut setup = Setup::new(&ep, "convquota");
    setup.storage_extra = "[workspace_storage.quota]\nmax_bytes = 200000\n".into();
    let n = setup.start(tempfile::tempdir().unwrap()).await;
    let id = create_as(&n, CLIENT_KEY).await;
    let ws = conv_dir(&n, &id).join("workspace");
    write(&ws, "small.txt", noise(1, 10_000));
    let t = now();
    wait_stored(&n, &id, CLIENT_KEY, t).await;
    let stored = snapshot(&ws);

    write(&ws, "huge.bin", noise(2, 400_000));
    wait_for("the quota refusal", 30, || async { storage_as(&n, &id, CLIENT_KEY).await["over_quota"] == true }).await;
    let s = storage_as(&n, &id, CLIENT_KEY).await;
    let err = s["last_error"].as_str().unwrap();
    assert!(err.contains("quota exceeded") && err.contains("limit 200000") && err.contains("unchanged"), "{s}");
    assert!(s["pending_bytes"].as_u64().unwrap() >= 400_000, "{s}");
    assert_eq!(s["healthy"], false);
    // New agent work is refused with the reason; reading is not.
    let r = send_message_as(&n, &id, CLIENT_KEY, "more work").await;
    assert_eq!(r.status(), 413);
    let detail = r.json::<Value>().await.unwrap()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("quota exceeded") && detail.contains("Free space"), "{detail}");
    assert_eq!(n.get(&format!("/api/conversations/{id}/events/search")).send().await.unwrap().status(), 200);

    // The stored copy is the last one within the quota: a fresh host gets exactly it.
    assert_eq!(n.delete(&format!("/api/conversations/{id}/runtime")).send().await.unwrap().status(), 204);
    let elsewhere = tempfile::tempdir().unwrap();
    let store = nestor_workspace_store::WorkspaceStore::connect(&common::config(&ep, BUCKET, &setup.prefix), elsewhere.path().join("cache")).unwrap();
    let c = store.conversation(&nestor_core::UserId::default_user(), nestor_core::ConversationId::parse(&id).unwrap()).unwrap();
    c.pull(nestor_workspace_store::Area::Workspace, &elsewhere.path().join("ws")).await.unwrap();
    assert_eq!(snapshot(&elsewhere.path().join("ws")), stored);

    // Cleaning up brings it back (the background retries of the stopped conversation store it).
    std::fs::remove_file(ws.join("huge.bin")).unwrap();
    write(&ws, "after.txt", "fits");
    wait_for("the retried push", 30, || async {
        let s = storage_as(&n, &id, CLIENT_KEY).await;
        s["over_quota"] == false && s["healthy"] == true && s["pending_bytes"] == 0
    })
    .await;
    assert_eq!(send_message_as(&n, &id, CLIENT_KEY, "more work").await.status(), 200);
    assert_eq!(n.delete(&format!("/api/conversations/{id}")).send().await.unwrap().status(), 200);
    n.stop().await;
    purge_prefix(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_over_their_quota_cannot_store_more_nor_create_and_keeps_what_was_stored() {
    let ep = s3_or_skip!();
    let mut setup = Setup::new(&ep, "userquota");
    setup.top_extra = USERS.into();
    setup.storage_extra = "[workspace_storage.user_quota]\nmax_bytes = 300000\n".into();
    let n = setup.start(tempfile::tempdir().unwrap()).await;
    let a1 = create_as(&n, ALICE).await;
    write(&conv_dir(&n, &a1).join("workspace"), "one.bin", noise(1, 200_000));
    let t = now();
    wait_stored(&n, &a1, ALICE, t).await;
    // A second conversation of Alice's would take her over: refused, reported.
    let a2 = create_as(&n, ALICE).await;
    write(&conv_dir(&n, &a2).join("workspace"), "two.bin", noise(2, 200_000));
    wait_for("the user quota refusal", 30, || async { storage_as(&n, &a2, ALICE).await["over_quota"] == true }).await;
    let s = storage_as(&n, &a2, ALICE).await;
    assert!(s["last_error"].as_str().unwrap().contains("for user alice"), "{s}");
    assert_eq!(send_message_as(&n, &a2, ALICE, "work").await.status(), 413);
    // Bob is not affected.
    let b = create_as(&n, BOB).await;
    write(&conv_dir(&n, &b).join("workspace"), "b.bin", noise(3, 200_000));
    let t = now();
    wait_stored(&n, &b, BOB, t).await;
    // Alice's first conversation is intact in the bucket.
    assert_eq!(storage_as(&n, &a1, ALICE).await["workspace"]["stored_bytes"], 200_000);

    // The operator lowers the limit below what Alice stores: her creates are refused (413).
    let dir = n.stop().await;
    setup.storage_extra = "[workspace_storage.user_quota]\nmax_bytes = 100000\n".into();
    let n = setup.start(dir).await;
    let r = with_key(n.client().post(format!("{}/api/conversations", n.url)), ALICE).json(&create_body(None)).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let detail = r.json::<Value>().await.unwrap()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("user alice") && detail.contains("limit 100000"), "{detail}");
    let r = with_key(n.client().post(format!("{}/api/conversations", n.url)), BOB).json(&create_body(None)).send().await.unwrap();
    assert_eq!(r.status(), 413, "Bob stores 200 kB too");
    for (id, key) in [(&a1, ALICE), (&a2, ALICE), (&b, BOB)] {
        let r = with_key(n.client().delete(format!("{}/api/conversations/{id}", n.url)), key).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    n.stop().await;
    purge_prefix(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_down_during_periodic_pushes_is_retried_reported_and_loses_nothing() {
    let ep = s3_or_skip!();
    let target: std::net::SocketAddr = ep.trim_start_matches("http://").parse().unwrap();
    let proxy = ChaosProxy::start(target).await.unwrap();
    let mut setup = Setup::new(&ep, "outage");
    setup.endpoint = proxy.url();
    let n = setup.start(tempfile::tempdir().unwrap()).await;
    let id = create_as(&n, CLIENT_KEY).await;
    let ws = conv_dir(&n, &id).join("workspace");
    write(&ws, "before.txt", "stored before the outage");
    let t = now();
    wait_stored(&n, &id, CLIENT_KEY, t).await;

    // Storage goes away while the conversation runs and writes.
    proxy.set_refusing(true);
    proxy.reset_all();
    write(&ws, "during.bin", noise(9, 150_000));
    assert_eq!(send_message_as(&n, &id, CLIENT_KEY, "during the outage").await.status(), 200);
    wait_for("failed pushes to be reported", 30, || async {
        let s = storage_as(&n, &id, CLIENT_KEY).await;
        s["consecutive_failures"].as_u64().unwrap_or(0) >= 2 && s["healthy"] == false
    })
    .await;
    let s = storage_as(&n, &id, CLIENT_KEY).await;
    assert!(s["last_error"].as_str().unwrap().contains("object storage"), "{s}");
    assert!(s["pending_bytes"].as_u64().unwrap() >= 150_000, "{s}");
    assert!(parse_time(&s["last_error_at"]).unwrap() > parse_time(&s["last_success_at"]).unwrap(), "{s}");

    // It comes back: the next pushes store everything, nothing is lost.
    proxy.set_refusing(false);
    let t = now();
    wait_stored(&n, &id, CLIENT_KEY, t).await;
    let files = snapshot(&ws);
    let history = event_texts(&n, &id, CLIENT_KEY).await;
    assert!(history.iter().any(|h| h == "during the outage"));
    assert_eq!(n.delete(&format!("/api/conversations/{id}/runtime")).send().await.unwrap().status(), 204);
    lose_local_trees(&n, &id);
    assert_eq!(event_texts(&n, &id, CLIENT_KEY).await, history);
    assert_eq!(snapshot(&conv_dir(&n, &id).join("workspace")), files);

    // Storage down when a conversation must be restored: a clear 503 with Retry-After, and
    // nothing half-restored is left for the agent to see.
    assert_eq!(n.delete(&format!("/api/conversations/{id}/runtime")).send().await.unwrap().status(), 204);
    lose_local_trees(&n, &id);
    proxy.set_refusing(true);
    proxy.reset_all();
    let r = n.get(&format!("/api/conversations/{id}/events/search")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert!(r.json::<Value>().await.unwrap()["detail"].as_str().unwrap().contains("cannot be restored now"));
    assert!(!conv_dir(&n, &id).join("workspace").exists());
    proxy.set_refusing(false);
    assert_eq!(event_texts(&n, &id, CLIENT_KEY).await, history);
    assert_eq!(n.delete(&format!("/api/conversations/{id}")).send().await.unwrap().status(), 200);
    n.stop().await;
    purge_prefix(&setup).await;
}

#[tokio::test]
async fn a_misconfigured_bucket_stops_nestor_at_start_with_a_clear_error() {
    let ep = s3_or_skip!();
    let setup = Setup::new(&ep, "probe");
    let dir = tempfile::tempdir().unwrap();
    let toml = setup.toml(&dir.path().join("state")).replace(&format!("bucket = \"{BUCKET}\""), "bucket = \"no-such-bucket-here\"");
    let path = dir.path().join("nestor.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = nestor_aggregator::Config::load(Some(&path), &Default::default()).unwrap();
    let err = nestor_aggregator::AppState::start(cfg, vec![]).await.err().expect("refuses to start").to_string();
    assert!(err.contains("no-such-bucket-here") && err.contains("does not exist"), "{err}");
}

/// Leaves nothing of a test in the bucket.
async fn purge_prefix(setup: &Setup) {
    let raw = setup.raw();
    let keys = setup.keys().await;
    for k in keys {
        let _ = raw.delete(&object_store::path::Path::parse(&k).unwrap()).await;
    }
}

#[tokio::test]
async fn a_conversation_directory_of_an_older_nestor_is_moved_to_the_state_layout() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("state/process");
    let id = uuid::Uuid::new_v4();
    let d = root.join(id.simple().to_string());
    // What an older nestor left: the agent-server's state at the top of the directory.
    for sub in ["conversations", "bash_events", "persistence", "workspace"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    std::fs::write(d.join("workspace/kept.txt"), "kept").unwrap();
    std::fs::write(d.join("bash_events/e1"), "event").unwrap();
    std::fs::write(
        d.join("nestor-process.json"),
        format!(r#"{{"version":1,"conversation_id":"{id}","owner":"default","phase":"active","key":"k","secret_key":"s","port":null,"pid":null,"pid_start":null,"created_at":"2026-01-01T00:00:00Z"}}"#),
    )
    .unwrap();
    let toml = format!(
        "bind = \"127.0.0.1:0\"\nsession_api_keys = [\"{CLIENT_KEY}\"]\nstate_dir = \"{}\"\nready_timeout_secs = 20.0\n[provisioner]\nkind = \"process\"\n[provisioner.process]\nagent_server = \"{}\"\nstartup_timeout_secs = 20.0\nstop_timeout_secs = 3.0\n",
        dir.path().join("state").display(),
        fake_bin().display()
    );
    let n = start_with_toml(dir, &toml).await;
    let ds = n.state.provisioner.list().into_iter().find(|d| d.primary() == Some(nestor_core::ConversationId::from_uuid(id))).unwrap();
    n.state.provisioner.ensure_ready(&ds, Duration::from_secs(20)).await.unwrap();
    assert!(!d.join("conversations").exists() && !d.join("bash_events").exists() && !d.join("persistence").exists());
    assert_eq!(std::fs::read_to_string(d.join("state/bash_events/e1")).unwrap(), "event");
    assert!(d.join("state/conversations").is_dir() && d.join("state/persistence").is_dir());
    assert_eq!(std::fs::read_to_string(d.join("workspace/kept.txt")).unwrap(), "kept");
    n.stop().await;
}
