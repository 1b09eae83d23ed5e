//! The final push at nestor's graceful shutdown, with a real nestor process (SIGTERM), the
//! process provisioner running the fake agent-server binary, and a real S3-compatible server
//! (moto_server, see crates/workspace-store/tests/common).
//!
//! Why its own test: the periodic pusher runs only every `push_interval_secs`, so whatever a
//! conversation wrote since its last push exists only on this host until the final push at
//! exit stores it. The interval here is an hour, so nothing reaches the bucket before the
//! SIGTERM; afterwards the file and the conversation's history must be there, read back
//! through the store from another directory (another host). Both `on_shutdown` policies:
//! `"stop"` (the downstream's stop does the final push) and `"keep"` (the children keep
//! running; nestor's own shutdown pushes every conversation it still pushes).

#[path = "../../workspace-store/tests/common/mod.rs"]
mod common;
mod real_nestor;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{bucket, noise, snapshot, unique_prefix, write};
use futures::TryStreamExt;
use nestor_core::{ConversationId, UserId};
use nestor_workspace_store::{Area, WorkspaceStore};
use object_store::{ObjectStore, ObjectStoreExt};
use real_nestor::{kill_all_under, NestorProc, CLIENT_KEY};
use serde_json::{json, Value};

const BUCKET: &str = "nestor-aggregator-tests";
/// Longest a SIGTERM may take to end nestor here (downstream stops, final pushes).
const BOUND: Duration = Duration::from_secs(60);

fn toml(state: &Path, endpoint: &str, prefix: &str, on_shutdown: &str) -> String {
    format!(
        "session_api_keys = [\"{CLIENT_KEY}\"]\nstate_dir = \"{}\"\nready_timeout_secs = 30.0\n\
         [workspace_storage]\nbucket = \"{BUCKET}\"\nprefix = \"{prefix}\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\n\
         access_key_id = \"test\"\nsecret_access_key = \"test\"\npush_interval_secs = 3600\nrequest_timeout_secs = 10\nconnect_timeout_secs = 2\n\
         [workspace_storage.retry]\nmax_attempts = 3\ninitial_backoff_ms = 100\nmax_backoff_ms = 300\n\
         [provisioner]\nkind = \"process\"\n[provisioner.process]\nagent_server = \"{}\"\nstartup_timeout_secs = 20.0\nstop_timeout_secs = 3.0\non_shutdown = \"{on_shutdown}\"\n",
        state.display(),
        real_nestor::fake_bin().display()
    )
}

fn request(method: reqwest::Method, n: &NestorProc, path: &str) -> reqwest::RequestBuilder {
    NestorProc::client().request(method, format!("{}{path}", n.url())).header("X-Session-API-Key", CLIENT_KEY)
}

fn create_body() -> Value {
    json!({
        "agent": {"kind": "Agent", "llm": {"usage_id": "agent", "model": "openai/fake", "base_url": "http://127.0.0.1:9/v1", "api_key": "x"}, "tools": [{"name": "terminal"}]},
        "workspace": {"kind": "LocalWorkspace", "working_dir": "/tmp/w"},
        "autotitle": false
    })
}

async fn create(n: &NestorProc) -> String {
    let r = request(reqwest::Method::POST, n, "/api/conversations").json(&create_body()).send().await.unwrap();
    assert_eq!(r.status(), 201, "create");
    r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

async fn send_message(n: &NestorProc, id: &str, text: &str) {
    let body = json!({"role": "user", "content": [{"type": "text", "text": text}], "run": false});
    let r = request(reqwest::Method::POST, n, &format!("/api/conversations/{id}/events")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "send message");
}

fn conv_dir(state: &Path, id: &str) -> PathBuf {
    state.join("process").join(uuid::Uuid::parse_str(id).unwrap().simple().to_string())
}

/// Every key stored under `prefix`.
async fn stored_keys(endpoint: &str, prefix: &str) -> Vec<String> {
    let raw = common::config(endpoint, BUCKET, prefix).build_object_store().unwrap();
    let p = object_store::path::Path::parse(prefix).unwrap();
    raw.list(Some(&p)).map_ok(|m| m.location.to_string()).try_collect().await.unwrap()
}

/// Leaves nothing of a test in the bucket.
async fn purge(endpoint: &str, prefix: &str) {
    let raw = common::config(endpoint, BUCKET, prefix).build_object_store().unwrap();
    for k in stored_keys(endpoint, prefix).await {
        let _ = raw.delete(&object_store::path::Path::parse(&k).unwrap()).await;
    }
}

/// Whether any file under `dir` contains `needle`.
fn tree_contains(dir: &Path, needle: &[u8]) -> bool {
    snapshot(dir).values().any(|n| matches!(n, common::Node::File { content, .. } if content.windows(needle.len()).any(|w| w == needle)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_pushes_what_a_conversation_wrote_since_its_last_push() {
    let ep = s3_or_skip!();
    let _ = bucket(&ep, BUCKET);
    for policy in ["stop", "keep"] {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let prefix = unique_prefix(&format!("shutdown-{policy}"));
        let mut n = NestorProc::start(dir.path(), &toml(&state, &ep, &prefix, policy)).await;
        let id = create(&n).await;
        let ws = conv_dir(&state, &id).join("workspace");
        write(&ws, "notes/written-before-sigterm.txt", format!("written by the conversation ({policy})"));
        write(&ws, "data.bin", noise(3, 200_000));
        let message = format!("last words before SIGTERM ({policy})");
        send_message(&n, &id, &message).await;
        let files = snapshot(&ws);
        assert!(stored_keys(&ep, &prefix).await.is_empty(), "{policy}: nothing is pushed before the first interval");

        let (st, took) = n.sigterm(BOUND).await.unwrap_or_else(|| panic!("{policy}: nestor exits within {BOUND:?}"));
        let log = std::fs::read_to_string(&n.log).unwrap_or_default();
        assert!(st.success(), "{policy}: {st}; log:\n{log}");
        eprintln!("on_shutdown = {policy}: exited {took:?} after SIGTERM");
        kill_all_under(&state);
        if policy == "keep" {
            // The downstream kept running: nestor's own shutdown did the final push.
            assert!(log.contains("workspace store: final pushes done"), "keep: {log}");
        }

        // Another host reads it back through the store: the files and the history.
        let elsewhere = tempfile::tempdir().unwrap();
        let store = WorkspaceStore::connect(&common::config(&ep, BUCKET, &prefix), elsewhere.path().join("cache")).unwrap();
        let c = store.conversation(&UserId::default_user(), ConversationId::parse(&id).unwrap()).unwrap();
        c.pull(Area::Workspace, &elsewhere.path().join("ws")).await.unwrap();
        c.pull(Area::State, &elsewhere.path().join("state")).await.unwrap();
        assert_eq!(snapshot(&elsewhere.path().join("ws")), files, "{policy}: the workspace as it was at SIGTERM; log:\n{log}");
        assert!(tree_contains(&elsewhere.path().join("state"), message.as_bytes()), "{policy}: the history has the last message");
        purge(&ep, &prefix).await;
    }
}
