//! Stop/restart (SIGKILL-like, state kept), fault injection, request counting, scale.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use nestor_test_support::{FakeAgentServer, FakeConfig, Fault};
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn restart_keeps_state_and_port_and_cuts_sockets_abruptly() {
    let srv = start().await;
    let h = http(&srv);
    let id = h.create(&create_body()).await;
    srv.send_user_message(id, "before", false);
    let before = srv.events(id);
    let port = srv.port();
    let mut events_ws = ws_open(&srv, &format!("/sockets/events/{id}")).await;
    let mut session_ws = ws_open(&srv, &format!("/sockets/session/{id}")).await;
    must_json(&mut events_ws).await;
    must_json(&mut session_ws).await;
    must_json(&mut session_ws).await;

    srv.stop().await;
    assert!(!srv.is_running());
    // No close frame: the TCP connection just goes away, like a killed process.
    assert_eq!(until_end(&mut events_ws).await, End::Abrupt);
    assert_eq!(until_end(&mut session_ws).await, End::Abrupt);
    assert!(
        reqwest::get(format!("{}/health", srv.url())).await.is_err(),
        "listener closed"
    );
    // State can be inspected and seeded while stopped.
    let seq = srv.append_event(id, json!({"source": "agent", "kind": "PauseEvent"}));
    assert_eq!(seq, before.len() as u64);

    srv.restart().await;
    assert!(srv.is_running());
    assert_eq!(srv.port(), port);
    let (s, info) = h.get(&format!("/api/conversations/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(info["id"], json!(id.to_string()));
    assert_eq!(srv.events(id)[..before.len()], before[..]);
    // Seqs continue; resume with after_seq works across the restart.
    let mut ws = ws_open(
        &srv,
        &format!("/sockets/session/{id}?after_seq={}", before.len() - 1),
    )
    .await;
    assert_eq!(
        must_json(&mut ws).await,
        json!({"type": "sync", "from_seq": before.len() - 1, "through_seq": before.len()})
    );
    let d = must_json(&mut ws).await;
    assert_eq!(
        (d["type"].clone(), d["seq"].clone()),
        (json!("durable"), json!(before.len()))
    );
    // stop/restart are idempotent-ish and repeatable.
    srv.stop().await;
    srv.stop().await;
    srv.restart().await;
    assert_eq!(http(&srv).get("/health").await.0, 200);
}

#[tokio::test]
async fn restart_recovers_running_conversations_as_error() {
    let srv = FakeAgentServer::start(FakeConfig {
        step_delay: Duration::from_millis(300),
        ..fast_config()
    })
    .await
    .unwrap();
    let h = http(&srv);
    let id = h.create(&create_body()).await;
    assert_eq!(
        h.post(
            &format!("/api/conversations/{id}/events"),
            &json!({"content": [{"type": "text", "text": "go"}], "run": true})
        )
        .await
        .0,
        200
    );
    // Wait until the first action is written (its observation is pending).
    eventually("an action", || {
        srv.events(id).iter().any(|e| e["kind"] == "ActionEvent")
    })
    .await;
    srv.stop().await;
    let n = srv.events(id).len();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(srv.events(id).len(), n, "a killed server runs nothing");
    assert_eq!(srv.execution_status(id).unwrap(), "running");
    srv.restart().await;
    assert_eq!(srv.execution_status(id).unwrap(), "error");
    let ev = srv.events(id);
    let action = ev
        .iter()
        .rev()
        .find(|e| e["kind"] == "ActionEvent")
        .unwrap()
        .clone();
    let last = ev.last().unwrap();
    assert_eq!(last["kind"], "AgentErrorEvent");
    assert_eq!(last["parent_id"], action["id"]);
    assert_eq!(last["tool_call_id"], action["tool_call_id"]);
    assert_eq!(ev[ev.len() - 2]["value"], "error");
    // It can run again.
    assert_eq!(
        h.post_empty(&format!("/api/conversations/{id}/run"))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn drop_sockets_after_frames() {
    let srv = start().await;
    let id = http(&srv).create(&create_body()).await;
    for _ in 0..5 {
        srv.append_event(id, json!({"source": "agent", "kind": "PauseEvent"}));
    }
    srv.set_fault(Fault::DropSocketsAfterFrames(3));
    let mut ws = ws_open(&srv, &format!("/sockets/events/{id}?resend_mode=all")).await;
    let mut frames = 0;
    let end = loop {
        match ws.next().await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_))) => frames += 1,
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => break "close frame",
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break "abrupt",
        }
    };
    assert_eq!((frames, end), (3, "abrupt"));
    // Zero: cut right after the upgrade.
    srv.set_fault(Fault::DropSocketsAfterFrames(0));
    let mut ws = ws_open(&srv, &format!("/sockets/session/{id}")).await;
    assert_eq!(until_end(&mut ws).await, End::Abrupt);
    srv.set_fault(Fault::None);
    let mut ws = ws_open(&srv, &format!("/sockets/session/{id}")).await;
    assert_eq!(must_json(&mut ws).await["type"], "sync");
}

#[tokio::test]
async fn http_faults() {
    let srv = start().await;
    let h = http(&srv);
    let id = h.create(&create_body()).await;
    srv.set_fault(Fault::Delay(Duration::from_millis(150)));
    let t = Instant::now();
    assert_eq!(h.get(&format!("/api/conversations/{id}")).await.0, 200);
    assert!(t.elapsed() >= Duration::from_millis(150));

    srv.set_fault(Fault::Status {
        status: 503,
        path_prefix: "/api/".into(),
    });
    assert_eq!(
        h.get(&format!("/api/conversations/{id}")).await,
        (503, json!({"detail": "Service Unavailable"}))
    );
    assert_eq!(h.get("/health").await.0, 200, "prefix-scoped");
    srv.set_fault(Fault::Status {
        status: 502,
        path_prefix: "/sockets/".into(),
    });
    let e = ws_connect(
        &format!("{}/sockets/events/{id}?session_api_key={KEY}", srv.ws_url()),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(http_status(&e), Some(502));

    srv.set_fault(Fault::CloseConnections {
        path_prefix: "/api/".into(),
    });
    let r = reqwest::Client::new()
        .get(format!("{}/api/conversations/{id}", srv.url()))
        .header("X-Session-API-Key", KEY)
        .send()
        .await;
    assert!(r.is_err(), "connection closed without a response");
    assert_eq!(h.get("/alive").await.0, 200);

    srv.set_fault(Fault::StallSockets);
    let mut ws = ws_open(&srv, &format!("/sockets/events/{id}")).await;
    assert!(
        next_json(&mut ws, Duration::from_millis(200))
            .await
            .is_none(),
        "stalled"
    );
    srv.set_fault(Fault::None);
    assert!(
        is_full_state(&must_json(&mut ws).await),
        "resumes once the fault is lifted"
    );
    assert_eq!(srv.fault(), Fault::None);
}

#[tokio::test]
async fn request_counting() {
    let srv = start().await;
    let h = http(&srv);
    let id = h.create(&create_body()).await;
    for _ in 0..3 {
        h.get(&format!("/api/conversations/{id}")).await;
    }
    h.get("/health").await;
    let _ws = ws_open(&srv, &format!("/sockets/events/{id}")).await;
    assert_eq!(srv.request_count(), 6);
    assert_eq!(srv.request_count_for("/api/conversations"), 4);
    assert_eq!(
        srv.request_count_for(&format!("/api/conversations/{id}")),
        3
    );
    assert_eq!(srv.request_count_for("/sockets/"), 1);
    assert_eq!(srv.request_count_for("/health"), 1);
    srv.reset_request_counts();
    assert_eq!(srv.request_count(), 0);
}

/// 1,000 sockets are 2,000 descriptors in this process (both ends): lift the soft limit.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a properly initialized struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_websockets() {
    raise_fd_limit();
    let srv = FakeAgentServer::start(FakeConfig {
        ws_ping_interval: None,
        ..fast_config()
    })
    .await
    .unwrap();
    let h = http(&srv);
    // 50 subscribers per conversation is the real limit: spread over 25 conversations.
    let mut convs = Vec::new();
    for _ in 0..25 {
        convs.push(h.create(&create_body()).await);
    }
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let (srv, id) = (srv.clone(), convs[i % convs.len()]);
        tasks.push(tokio::spawn(async move {
            let kind = if i % 2 == 0 { "events" } else { "session" };
            let mut ws = ws_open(&srv, &format!("/sockets/{kind}/{id}")).await;
            must_json(&mut ws).await;
            if kind == "session" {
                must_json(&mut ws).await;
            }
            ws
        }));
    }
    let mut sockets = Vec::new();
    for t in tasks {
        sockets.push(t.await.unwrap());
    }
    let total: usize = convs.iter().map(|c| srv.subscriber_count(*c)).sum();
    assert_eq!(total, 1000);
    // One event per conversation reaches all 1000 sockets.
    for c in &convs {
        srv.append_event(*c, json!({"source": "agent", "kind": "PauseEvent"}));
    }
    let mut readers = Vec::new();
    for mut ws in sockets {
        readers.push(tokio::spawn(async move { must_json(&mut ws).await }));
    }
    for r in readers {
        let f = r.await.unwrap();
        assert!(
            f["kind"] == "PauseEvent" || f["event"]["kind"] == "PauseEvent",
            "{f}"
        );
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_conversation_is_fast() {
    let srv = start().await;
    let h = http(&srv);
    let ids: Vec<Uuid> = {
        let mut v = Vec::new();
        for _ in 0..100 {
            v.push(h.create(&create_body()).await);
        }
        v
    };
    let client = reqwest::Client::new();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (client, url, ids) = (client.clone(), srv.url(), ids.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..250 {
                let id = ids[(w * 250 + i) % ids.len()];
                let r = client
                    .get(format!("{url}/api/conversations/{id}"))
                    .header("X-Session-API-Key", KEY)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
                r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let per_sec = 2000.0 / t.elapsed().as_secs_f64();
    // Debug build, loopback, a loaded 2-core CI box, and a debug reqwest on the same cores:
    // only a floor that catches pathological regressions (a sleep or a lock held across I/O
    // per request). Real numbers come from the benchmarks (release build).
    assert!(per_sec > 200.0, "{per_sec:.0} requests/s");
}
