//! Storage going down under a running pusher: retried, reported, nothing lost. Uses a
//! moto_server of its own (it is stopped and restarted), whatever NESTOR_TEST_S3_ENDPOINT says.

mod common;

use std::time::Duration;

use common::{bucket, config, noise, snapshot, write, Moto};
use nestor_core::{ConversationId, UserId};
use nestor_workspace_store::{Area, RetrySettings, TreeSpec, WorkspaceStore};
use time::OffsetDateTime;

async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_down_during_periodic_pushes_is_retried_reported_and_loses_nothing() {
    let mut moto = match Moto::start(None) {
        Ok(m) => m,
        Err(why) => {
            common::skip_without_s3(&format!("cannot start a moto_server of its own: {why}"));
            return;
        }
    };
    let ep = moto.endpoint();
    let b = bucket(&ep, "outage");
    let mut cfg = config(&ep, &b, "nestor");
    cfg.retry = RetrySettings { max_attempts: 3, initial_backoff_ms: 50, max_backoff_ms: 200 };
    cfg.request_timeout_secs = 5;
    cfg.connect_timeout_secs = 1;
    let tmp = tempfile::tempdir().unwrap();
    let store = WorkspaceStore::connect(&cfg, tmp.path().join("cache")).unwrap();
    let c = store.conversation(&UserId::new("alice"), ConversationId::new_random()).unwrap();
    let ws = tmp.path().join("ws");
    let state = tmp.path().join("state");
    write(&ws, "stable.txt", "pushed before the outage");
    write(&ws, "changed.txt", "v1");
    write(&ws, "deleted.txt", "bye");
    write(&state, "events/0001.json", "{}");
    let pusher = c.spawn_pusher(
        vec![TreeSpec::new(Area::Workspace, &ws), TreeSpec::new(Area::State, &state)],
        Duration::from_millis(300),
    );
    wait_for("the first periodic push", 30, || c.status().workspace.generation >= 1 && c.status().state.generation >= 1).await;

    // Storage goes down; the agent goes on working.
    moto.stop();
    let down_at = OffsetDateTime::now_utc();
    write(&ws, "changed.txt", "v2 written while storage was down");
    write(&ws, "new.bin", noise(9, 100_000));
    std::fs::remove_file(ws.join("deleted.txt")).unwrap();
    write(&state, "events/0002.json", "{\"during\": \"outage\"}");
    let local = snapshot(&ws);

    wait_for("failed pushes to be reported", 30, || {
        let s = c.status().workspace;
        s.consecutive_failures >= 3 && s.last_error_at.is_some_and(|t| t > down_at)
    })
    .await;
    let s = c.status();
    let w = &s.workspace;
    assert!(!s.healthy());
    assert!(w.last_error.as_deref().unwrap().contains("object storage"), "{w:?}");
    assert!(w.last_success_at.unwrap() < w.last_error_at.unwrap());
    assert_eq!(w.pending_bytes, 100_000 + 33, "new.bin + changed.txt are pending: {w:?}");
    assert_eq!(w.pending_entries, 3, "{w:?}");
    assert_eq!(w.generation, 1, "the stored copy stays at its last generation");
    assert_eq!(snapshot(&ws), local, "the local tree (the only up-to-date copy) is left alone");
    let json = serde_json::to_value(&s).unwrap();
    assert!(json["workspace"]["last_error"].is_string());

    // It comes back empty (moto keeps everything in memory): the next push notices the stored
    // manifest is gone and stores everything the local tree has.
    moto.restart().unwrap();
    bucket(&ep, "outage");
    let back_at = OffsetDateTime::now_utc();
    wait_for("a successful push after the outage", 30, || {
        let s = c.status();
        s.healthy()
            && s.workspace.last_success_at.is_some_and(|t| t > back_at)
            && s.state.last_success_at.is_some_and(|t| t > back_at)
    })
    .await;
    assert_eq!(c.status().workspace.pending_bytes, 0);
    pusher.finish(Duration::from_secs(30)).await.unwrap();

    // A fresh host restores exactly what the local tree had.
    let other = WorkspaceStore::connect(&cfg, tmp.path().join("cache-b")).unwrap();
    let c2 = other.conversation(c.user(), c.conversation()).unwrap();
    let restored = tmp.path().join("restored/ws");
    c2.pull(Area::Workspace, &restored).await.unwrap();
    assert_eq!(snapshot(&restored), local);
    let restored_state = tmp.path().join("restored/state");
    c2.pull(Area::State, &restored_state).await.unwrap();
    assert_eq!(snapshot(&restored_state), snapshot(&state));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_with_storage_down_fails_after_bounded_retries() {
    // Nothing listens there: every request is refused.
    let port = common::free_port();
    let ep = format!("http://127.0.0.1:{port}");
    let mut cfg = config(&ep, "nowhere", "nestor");
    cfg.retry = RetrySettings { max_attempts: 4, initial_backoff_ms: 100, max_backoff_ms: 200 };
    cfg.connect_timeout_secs = 1;
    let tmp = tempfile::tempdir().unwrap();
    let store = WorkspaceStore::connect(&cfg, tmp.path().join("cache")).unwrap();
    let c = store.conversation(&UserId::new("alice"), ConversationId::new_random()).unwrap();
    write(tmp.path(), "ws/f", "x");
    let started = std::time::Instant::now();
    let err = c.push_with_retry(Area::Workspace, &tmp.path().join("ws")).await.unwrap_err();
    let took = started.elapsed();
    assert!(err.is_retriable(), "{err:?}");
    assert_eq!(c.status().workspace.consecutive_failures, 4);
    // Three pauses of 100, 200, 200 ms (+ up to 25% jitter) and four quick failures.
    assert!(took >= Duration::from_millis(500) && took < Duration::from_secs(20), "{took:?}");
}
