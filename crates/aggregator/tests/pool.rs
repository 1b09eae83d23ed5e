//! nestor on the `pool` provisioner (process backend), with the fake agent-server binary as
//! the child: it has the real server's deferred-init mode, and starts in milliseconds. Creates
//! go through nestor's HTTP API; "served from the pool" is asserted with the pool's counters
//! (claims vs cold starts), never with timings. The real agent-server: `pool_real.rs`.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use http::Method;
use nestor_core::downstream::Endpoint;
use nestor_core::{ConversationId, DownstreamClient};
use serde_json::Value;
use support::*;


fn config(dir: &tempfile::TempDir, min_idle: usize, max_size: usize) -> String {
    format!(
        "bind = \"127.0.0.1:0\"\nsession_api_keys = [\"{CLIENT_KEY}\"]\nstate_dir = \"{}\"\nready_timeout_secs = 20.0\n[provisioner]\nkind = \"pool\"\n[provisioner.pool]\nbackend = \"process\"\nmin_idle = {min_idle}\nmax_size = {max_size}\n[provisioner.process]\nagent_server = \"{}\"\nstartup_timeout_secs = 20.0\nstop_timeout_secs = 3.0\n",
        dir.path().join("state").display(),
        fake_bin().display()
    )
}


async fn no_pids_under(dir: &std::path::Path) -> bool {
    for _ in 0..100 {
        if pids_under(dir).is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn create(n: &TestNestor) -> ConversationId {
    let r = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    ConversationId::parse(v["id"].as_str().unwrap()).unwrap()
}

/// The status of `GET path` on a downstream endpoint presenting `key`.
async fn downstream_status(ep: &Endpoint, key: Option<&nestor_core::SessionKey>, path: &str) -> (u16, Value) {
    let ep = Endpoint::new(ep.scheme.clone(), ep.authority.clone(), ep.base_path.clone(), key.cloned());
    match DownstreamClient::default().call_bytes(&ep, Method::GET, path, None, Duration::from_secs(5), 1 << 20).await {
        Ok((s, b)) => (s.as_u16(), serde_json::from_slice(&b).unwrap_or(Value::Null)),
        Err(nestor_core::client::ClientError::Status { status, .. }) => (status.as_u16(), Value::Null),
        Err(e) => panic!("{path}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_creates_are_served_from_the_pool_which_refills() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config(&dir, 10, 40);
    let state = dir.path().join("state");
    let n = start_with_toml(dir, &toml).await;
    let pool = n.state.pool.clone().expect("a pool");
    assert!(pool.wait_idle(10, Duration::from_secs(60)).await, "{:?}", pool.stats());

    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(create(&n).await);
    }
    let s = pool.stats();
    assert_eq!((s.claims, s.cold_starts), (10, 0), "no cold start in the create path: {s:?}");
    let mut servers = HashSet::new();
    for id in &ids {
        // Proxied by its claimed server.
        let r = n.get(&format!("/api/conversations/{id}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let (ds, owner) = n.state.catalog.route(id).unwrap();
        assert_eq!(owner.as_str(), "default");
        assert_eq!(ds.primary(), Some(*id));
        assert!(ds.id().as_str().starts_with("process-pool-"), "{}", ds.id());
        assert!(servers.insert(ds.id().clone()));
    }
    // The pool refills to min_idle behind the claims.
    assert!(pool.wait_idle(10, Duration::from_secs(60)).await, "{:?}", pool.stats());
    assert_eq!(pool.stats().started, 20);
    assert_eq!(pool.stats().cold_starts, 0);

    // Deleting a conversation releases its server for good (never back to the pool).
    let gone = ids[0];
    let (ds, _) = n.state.catalog.route(&gone).unwrap();
    assert_eq!(n.delete(&format!("/api/conversations/{gone}")).send().await.unwrap().status(), 200);
    assert_eq!(ds.state(), nestor_core::DownstreamState::Released);
    assert!(!pool.idle_downstreams().iter().any(|w| w.id() == ds.id()));

    let dir = n.stop().await;
    assert!(no_pids_under(&state).await, "claimed and warm servers stopped at shutdown");
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claimed_server_carries_only_its_own_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config(&dir, 3, 20);
    let n = start_with_toml(dir, &toml).await;
    let pool = n.state.pool.clone().unwrap();
    assert!(pool.wait_idle(3, Duration::from_secs(60)).await);
    let a = create(&n).await;
    let b = create(&n).await;
    assert_eq!(pool.stats().cold_starts, 0);
    let (da, _) = n.state.catalog.route(&a).unwrap();
    let (db, _) = n.state.catalog.route(&b).unwrap();
    assert_ne!(da.id(), db.id());
    let (ea, eb) = (da.endpoint().unwrap(), db.endpoint().unwrap());
    let (ka, kb) = (ea.key.clone().unwrap(), eb.key.clone().unwrap());
    assert_ne!(ka, kb, "each conversation's server has its own key");
    assert!(!ka.matches(CLIENT_KEY.as_bytes()), "never the client's key");
    // Its own key opens it and it holds exactly its conversation.
    let (st, v) = downstream_status(&ea, Some(&ka), "/api/conversations/search").await;
    assert_eq!(st, 200);
    let listed: Vec<&str> = v["items"].as_array().unwrap().iter().filter_map(|i| i["id"].as_str()).collect();
    assert_eq!(listed, vec![a.to_string().as_str()]);
    // The other conversation's key, the client's key and no key all fail on it.
    assert_eq!(downstream_status(&ea, Some(&kb), "/api/conversations/search").await.0, 401);
    assert_eq!(downstream_status(&eb, Some(&ka), "/api/conversations/search").await.0, 401);
    let client = nestor_core::SessionKey::new(CLIENT_KEY);
    assert_eq!(downstream_status(&ea, Some(&client), "/api/conversations/search").await.0, 401);
    assert_eq!(downstream_status(&ea, None, "/api/conversations/search").await.0, 401);
    // Idle warm servers are still dormant: nothing answers on them.
    for w in pool.idle_downstreams() {
        let ep = w.endpoint().unwrap();
        assert_eq!(downstream_status(&ep, Some(&ka), "/api/conversations/search").await.0, 503);
        assert_eq!(downstream_status(&ep, None, "/api/init").await.1["state"], "dormant");
    }
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_creates_never_share_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config(&dir, 20, 60);
    let state = dir.path().join("state");
    let n = start_with_toml(dir, &toml).await;
    let pool = n.state.pool.clone().unwrap();
    assert!(pool.wait_idle(20, Duration::from_secs(90)).await, "{:?}", pool.stats());
    let creates = (0..20).map(|_| {
        let req = n.post("/api/conversations").json(&create_body(None)).send();
        async move {
            let r = req.await.unwrap();
            assert_eq!(r.status(), 201);
            let v: Value = r.json().await.unwrap();
            ConversationId::parse(v["id"].as_str().unwrap()).unwrap()
        }
    });
    let ids: Vec<ConversationId> = futures::future::join_all(creates).await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 20);
    let s = pool.stats();
    assert_eq!((s.claims, s.cold_starts), (20, 0), "{s:?}");
    let mut servers = HashSet::new();
    let mut ports = HashSet::new();
    for id in &ids {
        let (ds, _) = n.state.catalog.route(id).unwrap();
        assert_eq!(ds.primary(), Some(*id));
        servers.insert(ds.id().clone());
        ports.insert(ds.endpoint().unwrap().authority.to_string());
        assert_eq!(ds.conversation_count(), 1);
    }
    assert_eq!((servers.len(), ports.len()), (20, 20), "20 creates, 20 servers");
    n.stop().await;
    assert!(no_pids_under(&state).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_pool_serves_creates_cold_and_a_restart_readopts_everything() {
    let dir = tempfile::tempdir().unwrap();
    // min_idle 0: every create is a cold start (the same as the process provisioner).
    let toml = config(&dir, 0, 10);
    let n = start_with_toml(dir, &toml).await;
    let a = create(&n).await;
    let pool = n.state.pool.clone().unwrap();
    assert_eq!((pool.stats().claims, pool.stats().cold_starts), (0, 1));
    let dir = n.stop().await;

    // Same state, now with a pool: the cold-started conversation is recovered (its child
    // starts on demand), new creates are claimed.
    let toml = config(&dir, 2, 10);
    let n = start_with_toml(dir, &toml).await;
    let pool = n.state.pool.clone().unwrap();
    assert!(pool.wait_idle(2, Duration::from_secs(60)).await);
    let b = create(&n).await;
    assert_eq!((pool.stats().claims, pool.stats().cold_starts), (1, 0));
    assert_eq!(n.get(&format!("/api/conversations/{a}")).send().await.unwrap().status(), 200);
    // nestor dies; the next one finds the claimed server running (re-adopted, not restarted)
    // and the warm ones too.
    assert!(pool.wait_idle(2, Duration::from_secs(60)).await);
    let warm: HashSet<_> = pool.idle_downstreams().iter().map(|d| d.id().clone()).collect();
    let (db, _) = n.state.catalog.route(&b).unwrap();
    let db_port = db.endpoint().unwrap().authority.to_string();
    pool.abandon();
    let dir = n.kill();
    let n = start_with_toml(dir, &toml).await;
    let pool = n.state.pool.clone().unwrap();
    let again: HashSet<_> = pool.idle_downstreams().iter().map(|d| d.id().clone()).collect();
    assert_eq!(again, warm);
    assert_eq!(pool.stats().started, 0);
    let (db, _) = n.state.catalog.route(&b).unwrap();
    assert_eq!(db.endpoint().unwrap().authority.to_string(), db_port, "same process");
    assert_eq!(n.get(&format!("/api/conversations/{b}")).send().await.unwrap().status(), 200);
    n.stop().await;
}
