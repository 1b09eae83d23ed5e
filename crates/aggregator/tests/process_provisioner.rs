//! The `process` provisioner end to end inside nestor, with the fake agent-server binary as
//! the child executable (it takes the same `--host/--port` flags and `SESSION_API_KEY`).
//! The real agent-server is exercised by the Python end-to-end suite; these tests cover the
//! life cycle quickly: spawn, on-demand restart, re-adoption, delete, failures.

mod support;
mod ws_common;

use std::time::Duration;

use serde_json::Value;
use support::*;


fn config(dir: &tempfile::TempDir, agent_server: &std::path::Path, extra: &str) -> String {
    format!(
        "bind = \"127.0.0.1:0\"\nsession_api_keys = [\"{CLIENT_KEY}\"]\nstate_dir = \"{}\"\nready_timeout_secs = 20.0\n[provisioner]\nkind = \"process\"\n[provisioner.process]\nagent_server = \"{}\"\nstartup_timeout_secs = 20.0\nstop_timeout_secs = 3.0\n{extra}",
        dir.path().join("state").display(),
        agent_server.display()
    )
}


async fn create(n: &TestNestor) -> String {
    let r = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    v["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn one_process_per_conversation_with_its_own_workspace_and_delete_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config(&dir, &fake_bin(), "");
    let state = dir.path().join("state");
    let n = start_with_toml(dir, &toml).await;
    let a = create(&n).await;
    let b = create(&n).await;
    assert_eq!(pids_under(&state.join("process")).len(), 2, "two children");

    // Each got its own workspace directory (isolated mode), whatever the client asked.
    let info: Value = n.get(&format!("/api/conversations/{a}")).send().await.unwrap().json().await.unwrap();
    let wd = info["workspace"]["working_dir"].as_str().unwrap().to_owned();
    assert!(wd.contains(&uuid::Uuid::parse_str(&a).unwrap().simple().to_string()), "{wd}");

    let r = n.delete(&format!("/api/conversations/{a}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let hex_a = uuid::Uuid::parse_str(&a).unwrap().simple().to_string();
    assert!(!state.join("process").join(&hex_a).exists(), "its directory is removed");
    assert_eq!(pids_under(&state.join("process")).len(), 1, "its process is stopped");
    assert_eq!(n.get(&format!("/api/conversations/{b}")).send().await.unwrap().status(), 200);
    let dir = n.stop().await;
    assert!(pids_under(&state).is_empty(), "graceful shutdown stops every child");
    drop(dir);
}

#[tokio::test]
async fn stopped_children_restart_on_demand_and_running_ones_are_readopted() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config(&dir, &fake_bin(), "");
    let state = dir.path().join("state");
    let n = start_with_toml(dir, &toml).await;
    let id = create(&n).await;
    let pid_before = pids_under(&state.join("process"));
    assert_eq!(pid_before.len(), 1);

    // A nestor that dies without shutting down (kill -9) leaves its child running; the next
    // one re-adopts it without restarting it.
    let dir = n.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n = start_with_toml(dir, &toml).await;
    assert_eq!(pids_under(&state.join("process")), pid_before, "same process, not restarted");
    let info: Value = n.get(&format!("/api/conversations/{id}/runtime")).send().await.unwrap().json().await.unwrap();
    assert_eq!(info["runtime_status"], "available");

    // Graceful stop: the child is stopped; after a restart the conversation is still listed
    // (from nestor's catalog) and its child starts again on the first request.
    let dir = n.stop().await;
    assert!(pids_under(&state).is_empty());
    let n = start_with_toml(dir, &toml).await;
    let v: Value = n.get("/api/conversations/search").send().await.unwrap().json().await.unwrap();
    assert_eq!(v["items"][0]["id"], id.as_str());
    assert_eq!(v["items"][0]["runtime_info"]["runtime_status"], "missing");
    let r = n.post(&format!("/api/conversations/{id}/runtime/reprovision")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["runtime_status"], "available");
    assert_eq!(pids_under(&state.join("process")).len(), 1, "started on demand");
    n.stop().await;
}

#[tokio::test]
async fn a_child_that_dies_at_start_gives_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("broken-agent-server");
    std::fs::write(&script, "#!/bin/sh\necho 'ImportError: no module named openhands' >&2\nexit 3\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let toml = config(&dir, &script, "");
    let state = dir.path().join("state");
    let n = start_with_toml(dir, &toml).await;
    let t = std::time::Instant::now();
    let r = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(15), "fails fast, not at the start-up timeout");
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.contains("exited during start-up") && detail.contains("ImportError"), "{detail}");
    // Nothing is left behind for the failed create.
    let leftovers: Vec<_> = std::fs::read_dir(state.join("process")).unwrap().flatten().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    n.stop().await;
}

#[tokio::test]
async fn a_missing_agent_server_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config(&dir, std::path::Path::new("/nonexistent/agent-server"), "");
    let path = dir.path().join("nestor.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = nestor_aggregator::Config::load(Some(&path), &Default::default()).unwrap();
    let err = nestor_aggregator::AppState::start(cfg, vec![]).await.err().expect("refuses to start").to_string();
    assert!(err.contains("/nonexistent/agent-server") && err.contains("setup-agent-server.sh"), "{err}");
}

#[tokio::test]
async fn half_created_directories_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config(&dir, &fake_bin(), "");
    let state = dir.path().join("state");
    // What a nestor killed between spawning a child and forwarding the create leaves.
    let hex = uuid::Uuid::new_v4().simple().to_string();
    let d = state.join("process").join(&hex);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("nestor-process.json"),
        format!(
            r#"{{"version":1,"conversation_id":"{}","owner":"default","phase":"provisioning","key":"k","secret_key":"s","port":null,"pid":null,"pid_start":null,"created_at":"2026-01-01T00:00:00Z"}}"#,
            uuid::Uuid::parse_str(&hex).unwrap()
        ),
    )
    .unwrap();
    let n = start_with_toml(dir, &toml).await;
    assert!(!d.exists(), "half-created directory removed");
    n.stop().await;
}

#[tokio::test]
async fn admission_limits_answer_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config(&dir, &fake_bin(), "").replace("[provisioner]", "[admission]\nmax_running = 2\n[provisioner]");
    let n = start_with_toml(dir, &toml).await;
    let first = create(&n).await;
    create(&n).await;
    let r = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert!(v["detail"].as_str().unwrap().contains("limit 2"), "{v}");
    let metrics = n.client().get(format!("{}/metrics", n.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("nestor_admission_rejections_total{reason=\"max_running\"}"), "{metrics}");
    // The WebSocket series exist before any socket dropped (registered at zero) …
    for series in ["nestor_ws_pairs{kind=\"session\"}", "nestor_ws_downstream_lost_total", "nestor_ws_resumed_total", "nestor_ws_slow_consumers_total"] {
        assert!(metrics.lines().any(|l| l.starts_with(series)), "{series} missing: {metrics}");
    }
    // … and a live pair is counted while it lives (no other test in this binary opens
    // sockets, so the gauge is exact).
    let pairs = "nestor_ws_pairs{kind=\"events\"}";
    let mut ws = ws_common::open(&n, &format!("/sockets/events/{first}")).await;
    ws_common::must_json(&mut ws).await;
    assert_eq!(ws_common::metric(&n, pairs).await, Some(1.0));
    drop(ws);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ws_common::metric(&n, pairs).await != Some(0.0) {
        assert!(std::time::Instant::now() < deadline, "the pair was not counted out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    n.stop().await;
}

#[tokio::test]
async fn idle_downstreams_are_stopped_and_resume_on_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config(&dir, &fake_bin(), "").replace("[provisioner]", "[lifecycle]\nidle_stop_secs = 1.0\n[provisioner]");
    let state = dir.path().join("state");
    let n = start_with_toml(dir, &toml).await;
    let id = create(&n).await;
    assert_eq!(pids_under(&state.join("process")).len(), 1);
    // Nothing attached, nothing in flight, not running: stopped within a few reaper ticks.
    let mut stopped = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if pids_under(&state.join("process")).is_empty() {
            stopped = true;
            break;
        }
    }
    assert!(stopped, "idle downstream stopped");
    let rt: Value = n.get(&format!("/api/conversations/{id}/runtime")).send().await.unwrap().json().await.unwrap();
    assert_eq!(rt["runtime_status"], "missing");
    // The next request waits for it to start again and succeeds (the fake keeps no state
    // across processes, so the conversation itself is gone: 404 from the downstream).
    let r = n.get(&format!("/api/conversations/{id}/events/search")).send().await.unwrap();
    assert!(r.status() == 200 || r.status() == 404, "{}", r.status());
    assert_eq!(pids_under(&state.join("process")).len(), 1, "started again on demand");
    n.stop().await;
}

/// A socket opened to a conversation whose downstream the idle policy stopped: nestor
/// accepts the client, starts the downstream (bounded wait), then connects; the client sees
/// its first frame, never an error close.
#[tokio::test]
async fn a_socket_to_a_stopped_downstream_waits_for_it_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config(&dir, &fake_bin(), "").replace("[provisioner]", "[lifecycle]\nidle_stop_secs = 1.0\n[provisioner]");
    let state = dir.path().join("state");
    let n = start_with_toml(dir, &toml).await;
    let id = create(&n).await;
    let mut stopped = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if pids_under(&state.join("process")).is_empty() {
            stopped = true;
            break;
        }
    }
    assert!(stopped, "idle downstream stopped");
    for path in [format!("/sockets/events/{id}"), format!("/sockets/session/{id}")] {
        let mut ws = ws_common::open(&n, &path).await;
        match ws_common::next(&mut ws, Duration::from_secs(30)).await {
            ws_common::Next::Text(t) => assert!(t.starts_with('{'), "{path}: {t}"),
            other => panic!("{path}: expected the downstream's first frame after it started, got {other:?}"),
        }
        assert_eq!(pids_under(&state.join("process")).len(), 1, "{path}: started once, on demand");
        drop(ws);
    }
    n.stop().await;
}
