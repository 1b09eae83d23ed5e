//! The `pool` provisioner over the `process` backend, with the fake agent-server binary as
//! the child (it has the real server's deferred-init mode: `OH_DEFERRED_INIT`, `/api/init`
//! with `X-Init-API-Key` = `OH_SECRET_KEY`). Fast: a fake child starts in milliseconds. The
//! real agent-server is exercised by `crates/aggregator/tests/pool_real.rs`.
//!
//! "From the pool" is asserted with the pool's counters (claims vs cold starts), never with
//! timings.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use nestor_core::downstream::Endpoint;
use nestor_core::{ConversationId, Downstream, DownstreamClient, DownstreamState, SessionKey, UserId};
use nestor_provisioner::pool::{PoolConfig, PoolProvisioner};
use nestor_provisioner::process::{OnShutdown, ProcessConfig, ProcessProvisioner};
use nestor_provisioner::{ProvisionError, ProvisionRequest, Provisioner};

/// The fake agent-server binary (built once if this crate's tests run alone).
fn fake_bin() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join("nestor-fake-agent-server");
    if !p.exists() {
        BUILD.call_once(|| {
            let status = std::process::Command::new(env!("CARGO"))
                .args(["build", "-q", "-p", "nestor-test-support", "--bin", "nestor-fake-agent-server"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("cargo runs");
            assert!(status.success(), "building nestor-fake-agent-server failed");
        });
    }
    assert!(p.exists(), "{} not built", p.display());
    p
}

/// A wrapper script around the fake binary (to break it in one way or another).
fn wrapper(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\nexec '{}' \"$@\"\n", fake_bin().display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn process_cfg(agent_server: PathBuf, on_shutdown: OnShutdown) -> ProcessConfig {
    ProcessConfig {
        agent_server: Some(agent_server),
        startup_timeout_secs: Some(20.0),
        stop_timeout_secs: Some(3.0),
        on_shutdown,
        env: [("OH_WEBHOOKS_0_BASE_URL".to_owned(), "http://127.0.0.1:9/nestor/webhooks".to_owned())].into(),
        ..Default::default()
    }
}

struct Pool {
    pool: PoolProvisioner,
    root: PathBuf,
}

fn pool_in(root: &Path, agent_server: PathBuf, min_idle: usize, max_size: usize, on_shutdown: OnShutdown) -> Pool {
    let client = DownstreamClient::default();
    let backend =
        ProcessProvisioner::new(&process_cfg(agent_server, on_shutdown), root.to_path_buf(), PathBuf::from("/nonexistent"), client.clone())
            .unwrap();
    let cfg = PoolConfig { min_idle, max_size, ..Default::default() };
    Pool { pool: PoolProvisioner::new(&cfg, Arc::new(backend), client).unwrap(), root: root.to_path_buf() }
}

fn req() -> ProvisionRequest {
    ProvisionRequest { conversation: ConversationId::new_random(), owner: UserId::new("alice") }
}

/// Processes whose working directory is under `dir`.
fn pids_under(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) {
            if cwd.starts_with(dir) {
                out.push(pid);
            }
        }
    }
    out
}

/// Wait (bounded) until no process runs under `dir`.
async fn no_pids_under(dir: &Path) -> bool {
    for _ in 0..100 {
        if pids_under(dir).is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn status(ep: &Endpoint, path: &str) -> u16 {
    match DownstreamClient::default().call_bytes(ep, Method::GET, path, None, Duration::from_secs(5), 1 << 20).await {
        Ok((s, _)) => s.as_u16(),
        Err(nestor_core::client::ClientError::Status { status, .. }) => status.as_u16(),
        Err(e) => panic!("{path}: {e}"),
    }
}

fn with_key(ds: &Downstream, key: Option<SessionKey>) -> Endpoint {
    let ep = ds.endpoint().expect("has an address");
    Endpoint::new(ep.scheme.clone(), ep.authority.clone(), ep.base_path.clone(), key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_come_from_the_pool_and_the_pool_refills() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool_in(dir.path(), fake_bin(), 3, 20, OnShutdown::Stop);
    assert!(p.pool.recover().await.unwrap().is_empty());
    assert!(p.pool.wait_idle(3, Duration::from_secs(30)).await, "{:?}", p.pool.stats());
    // Warm servers are nobody's: not listed, not routable.
    assert!(p.pool.list().is_empty());
    let warm: Vec<_> = p.pool.idle_downstreams();
    assert!(warm.iter().all(|d| d.primary().is_none() && d.owner().is_none()));

    let mut ids = HashSet::new();
    for _ in 0..3 {
        let r = req();
        let ds = p.pool.provision(r.clone()).await.unwrap();
        assert_eq!(ds.state(), DownstreamState::Ready, "claimed servers are ready at once");
        assert_eq!(ds.primary(), Some(r.conversation));
        assert_eq!(ds.owner(), Some(&r.owner));
        assert!(ids.insert(ds.id().clone()));
        assert_eq!(status(&ds.endpoint().unwrap(), "/api/conversations/count").await, 200, "bound: the API answers");
    }
    let s = p.pool.stats();
    assert_eq!((s.claims, s.cold_starts), (3, 0), "{s:?}");
    assert_eq!(p.pool.list().len(), 3, "claimed servers are ordinary downstreams now");

    // The pool refills behind the claims.
    assert!(p.pool.wait_idle(3, Duration::from_secs(30)).await, "{:?}", p.pool.stats());
    assert_eq!(p.pool.stats().started, 6);
    assert!(p.pool.idle_downstreams().iter().all(|d| !ids.contains(d.id())), "never handed out twice");

    p.pool.shutdown().await;
    assert!(no_pids_under(&p.root).await, "shutdown stops claimed and warm servers");
    let left: Vec<_> = std::fs::read_dir(&p.root).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 3, "warm directories removed, the conversations' kept: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_never_share_a_server_and_each_carries_only_its_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool_in(dir.path(), fake_bin(), 20, 40, OnShutdown::Stop);
    p.pool.recover().await.unwrap();
    assert!(p.pool.wait_idle(20, Duration::from_secs(60)).await, "{:?}", p.pool.stats());

    let claims = (0..20).map(|_| {
        let pool = p.pool.clone();
        tokio::spawn(async move {
            let r = req();
            let ds = pool.provision(r.clone()).await.unwrap();
            (r, ds)
        })
    });
    let got: Vec<(ProvisionRequest, Arc<Downstream>)> =
        futures::future::join_all(claims).await.into_iter().map(|r| r.unwrap()).collect();
    let s = p.pool.stats();
    assert_eq!((s.claims, s.cold_starts), (20, 0), "{s:?}");
    let servers: HashSet<_> = got.iter().map(|(_, d)| d.id().clone()).collect();
    assert_eq!(servers.len(), 20, "20 creates, 20 different servers");
    let ports: HashSet<_> = got.iter().map(|(_, d)| d.endpoint().unwrap().authority.to_string()).collect();
    assert_eq!(ports.len(), 20);
    let keys: Vec<SessionKey> = got.iter().map(|(_, d)| d.endpoint().unwrap().key.clone().unwrap()).collect();
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 20, "one key per conversation");

    for (i, (r, ds)) in got.iter().enumerate() {
        assert_eq!(ds.primary(), Some(r.conversation));
        // Its own key opens it; no other conversation's key does, nor none.
        assert_eq!(status(&with_key(ds, Some(keys[i].clone())), "/api/conversations/count").await, 200);
        let other = &keys[(i + 1) % keys.len()];
        assert_eq!(status(&with_key(ds, Some(other.clone())), "/api/conversations/count").await, 401);
        assert_eq!(status(&with_key(ds, None), "/api/conversations/count").await, 401);
        // It is initialized for good: a second init would be refused.
        assert_eq!(status(&with_key(ds, None), "/api/init").await, 200);
        assert!(!p.pool.idle_downstreams().iter().any(|w| w.id() == ds.id()));
    }
    p.pool.shutdown().await;
    assert!(no_pids_under(&p.root).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_pool_falls_back_to_a_cold_start_within_max_size() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool_in(dir.path(), fake_bin(), 0, 2, OnShutdown::Stop);
    p.pool.recover().await.unwrap();
    let a = p.pool.provision(req()).await.unwrap();
    p.pool.ensure_ready(&a, Duration::from_secs(20)).await.unwrap();
    let b = p.pool.provision(req()).await.unwrap();
    p.pool.ensure_ready(&b, Duration::from_secs(20)).await.unwrap();
    let s = p.pool.stats();
    assert_eq!((s.claims, s.cold_starts, s.started), (0, 2, 0), "{s:?}");
    match p.pool.provision(req()).await {
        Err(ProvisionError::Unavailable { retry_after, .. }) => assert!(retry_after.is_some()),
        other => panic!("max_size reached: {:?}", other.map(|d| d.id().clone())),
    }
    // Releasing one makes room again.
    p.pool.release(&a, a.primary().unwrap(), 0).await.unwrap();
    let c = p.pool.provision(req()).await.unwrap();
    p.pool.ensure_ready(&c, Duration::from_secs(20)).await.unwrap();
    p.pool.shutdown().await;
    assert!(no_pids_under(&p.root).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refill_respects_max_size_counting_running_conversations() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool_in(dir.path(), fake_bin(), 2, 3, OnShutdown::Stop);
    p.pool.recover().await.unwrap();
    assert!(p.pool.wait_idle(2, Duration::from_secs(30)).await);
    let _a = p.pool.provision(req()).await.unwrap();
    let _b = p.pool.provision(req()).await.unwrap();
    // Two running conversations + at most one warm server = 3.
    assert!(p.pool.wait_idle(1, Duration::from_secs(30)).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = p.pool.stats();
    assert_eq!((s.idle, s.booting, s.started), (1, 0, 3), "{s:?}");
    p.pool.shutdown().await;
    assert!(no_pids_under(&p.root).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_nestor_readopts_claimed_servers_and_warm_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("process");
    let p = pool_in(&root, fake_bin(), 2, 10, OnShutdown::Keep);
    p.pool.recover().await.unwrap();
    assert!(p.pool.wait_idle(2, Duration::from_secs(30)).await);
    let r = req();
    let claimed = p.pool.provision(r.clone()).await.unwrap();
    // A conversation on it (what makes it more than half-created), then marked active.
    let body = serde_json::json!({
        "conversation_id": r.conversation.to_string(),
        "agent": {"kind": "Agent", "llm": {"usage_id": "agent", "model": "openai/fake"}, "tools": []},
        "workspace": {"kind": "LocalWorkspace", "working_dir": "/tmp"},
    });
    let (st, _) = DownstreamClient::default()
        .call_bytes(&claimed.endpoint().unwrap(), Method::POST, "/api/conversations", Some(serde_json::to_vec(&body).unwrap().into()), Duration::from_secs(5), 1 << 20)
        .await
        .unwrap();
    assert!(st.is_success());
    p.pool.mark_active(&claimed);
    assert!(p.pool.wait_idle(2, Duration::from_secs(30)).await);
    let warm_ids: HashSet<_> = p.pool.idle_downstreams().iter().map(|d| d.id().clone()).collect();
    let pids_before: HashSet<_> = pids_under(&root).into_iter().collect();
    assert_eq!(pids_before.len(), 3);

    // nestor dies (no shutdown), a new one starts on the same state.
    p.pool.abandon();
    drop(p);
    let p = pool_in(&root, fake_bin(), 2, 10, OnShutdown::Keep);
    let owned = p.pool.recover().await.unwrap();
    assert_eq!(owned.len(), 1);
    assert_eq!(owned[0].id(), claimed.id());
    assert_eq!(owned[0].primary(), Some(r.conversation));
    assert_eq!(owned[0].owner(), Some(&r.owner));
    assert_eq!(owned[0].state(), DownstreamState::Ready);
    assert_eq!(status(&owned[0].endpoint().unwrap(), "/api/conversations/count").await, 200, "its conversation key was kept");
    let again: HashSet<_> = p.pool.idle_downstreams().iter().map(|d| d.id().clone()).collect();
    assert_eq!(again, warm_ids, "the warm servers were re-adopted, not restarted");
    assert_eq!(p.pool.stats().started, 0);
    assert_eq!(pids_under(&root).into_iter().collect::<HashSet<_>>(), pids_before);

    // A plain process provisioner (pool removed from the config) cleans the warm ones up and
    // keeps the conversation.
    p.pool.shutdown().await; // keep: everything stays running
    let plain = ProcessProvisioner::new(&process_cfg(fake_bin(), OnShutdown::Stop), root.clone(), PathBuf::from("/x"), DownstreamClient::default()).unwrap();
    let owned = plain.recover().await.unwrap();
    assert_eq!(owned.len(), 1);
    assert_eq!(owned[0].primary(), Some(r.conversation));
    let dirs: Vec<String> = std::fs::read_dir(&root).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(dirs.len(), 1, "only the claimed server's directory is left: {dirs:?}");
    plain.shutdown().await;
    assert!(no_pids_under(&root).await, "the warm processes were killed too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_half_created_claim_is_removed_at_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("process");
    let p = pool_in(&root, fake_bin(), 1, 10, OnShutdown::Keep);
    p.pool.recover().await.unwrap();
    assert!(p.pool.wait_idle(1, Duration::from_secs(30)).await);
    let ds = p.pool.provision(req()).await.unwrap();
    // nestor dies before the create reached the claimed server.
    p.pool.abandon();
    drop(p);
    let p = pool_in(&root, fake_bin(), 0, 10, OnShutdown::Stop);
    assert!(p.pool.recover().await.unwrap().is_empty());
    assert!(p.pool.get(ds.id()).is_none());
    p.pool.shutdown().await;
    assert!(no_pids_under(&root).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_that_fail_fall_back_to_a_cold_start() {
    let dir = tempfile::tempdir().unwrap();
    // Warm servers that boot dormant but with another init key than nestor's: every claim
    // is refused (401), and the create still gets a (cold) server.
    let bin = wrapper(dir.path(), "wrong-init-key", "[ -n \"$OH_DEFERRED_INIT\" ] && export OH_SECRET_KEY=not-the-init-key");
    let p = pool_in(&dir.path().join("process"), bin, 1, 10, OnShutdown::Stop);
    p.pool.recover().await.unwrap();
    assert!(p.pool.wait_idle(1, Duration::from_secs(30)).await);
    let r = req();
    let ds = p.pool.provision(r.clone()).await.unwrap();
    p.pool.ensure_ready(&ds, Duration::from_secs(20)).await.unwrap();
    let s = p.pool.stats();
    assert!(s.failed_claims >= 1 && s.cold_starts == 1 && s.claims == 0, "{s:?}");
    assert_eq!(ds.primary(), Some(r.conversation));
    assert_eq!(status(&ds.endpoint().unwrap(), "/api/conversations/count").await, 200);
    assert_eq!(p.pool.list().len(), 1, "the server whose init failed was released");
    p.pool.shutdown().await;
    assert!(no_pids_under(dir.path()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_server_without_deferred_init_turns_the_pool_off() {
    let dir = tempfile::tempdir().unwrap();
    let bin = wrapper(dir.path(), "no-deferred-init", "unset OH_DEFERRED_INIT");
    let p = pool_in(&dir.path().join("process"), bin, 2, 10, OnShutdown::Stop);
    p.pool.recover().await.unwrap();
    for _ in 0..100 {
        if p.pool.stats().failed_starts >= 1 && p.pool.stats().booting == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = p.pool.stats();
    assert_eq!((s.idle, s.booting), (0, 0), "{s:?}");
    assert!(s.started <= 2, "no start loop: {s:?}");
    let ds = p.pool.provision(req()).await.unwrap();
    p.pool.ensure_ready(&ds, Duration::from_secs(20)).await.unwrap();
    assert_eq!(p.pool.stats().cold_starts, 1);
    p.pool.shutdown().await;
    assert!(no_pids_under(dir.path()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_warm_servers_are_recycled() {
    let dir = tempfile::tempdir().unwrap();
    let client = DownstreamClient::default();
    let root = dir.path().join("process");
    let backend = ProcessProvisioner::new(&process_cfg(fake_bin(), OnShutdown::Stop), root.clone(), PathBuf::from("/x"), client.clone()).unwrap();
    let cfg = PoolConfig { min_idle: 1, max_size: 4, max_age_secs: 1.0, ..Default::default() };
    let pool = PoolProvisioner::new(&cfg, Arc::new(backend), client).unwrap();
    pool.recover().await.unwrap();
    assert!(pool.wait_idle(1, Duration::from_secs(30)).await);
    let first = pool.idle_downstreams()[0].id().clone();
    let mut recycled = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if pool.stats().recycled >= 1 && pool.idle_downstreams().iter().any(|d| d.id() != &first) {
            recycled = true;
            break;
        }
    }
    assert!(recycled, "{:?}", pool.stats());
    pool.shutdown().await;
    assert!(no_pids_under(&root).await);
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0, "recycled directories are removed");
}
