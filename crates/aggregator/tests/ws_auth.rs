//! WebSocket authentication through nestor, against its in-process server over a fake
//! agent-server: the agent-server's three ways (query key, header key, first frame) and its
//! outcomes (bad query/header key: HTTP 403 before the upgrade; bad, late or non-JSON first
//! frame: close 4001; unknown conversation: 4004 after auth; malformed id: 403; plain GET:
//! 404 JSON). Whatever the client presents, the downstream only ever sees nestor's own
//! downstream key (checked at the fake server, which records every upgrade and frame).

mod support;
mod ws_common;

use std::time::{Duration, Instant};

use support::{fake, nestor_existing, CLIENT_KEY};
use uuid::Uuid;
use ws_common::*;

const T: Duration = Duration::from_secs(10);

/// The downstream saw only nestor's key: in the header of every upgrade, never in a query,
/// and no client credential in any frame.
fn assert_downstream_saw_only_its_key(f: &nestor_test_support::FakeAgentServer) {
    let down_key = f.config().session_api_key.clone().unwrap();
    let reqs = f.socket_requests();
    assert!(!reqs.is_empty(), "no socket reached the downstream");
    for r in &reqs {
        assert_eq!(r.header_key.as_deref(), Some(down_key.as_str()), "{r:?}");
        assert!(r.query.iter().all(|(k, v)| k != "session_api_key" && !v.contains(CLIENT_KEY)), "{r:?}");
    }
    for fr in f.socket_inbound_frames() {
        assert!(!fr.contains(CLIENT_KEY) && !fr.contains("\"auth\""), "client credential forwarded: {fr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_ways_are_accepted_and_the_downstream_gets_nestors_key() {
    let f = fake(0).await;
    let n = nestor_existing(&[&f], "").await;
    let id = create_conversation(&n).await;

    // 1. query key (kept out of what is forwarded; other query params go through)
    let mut ws = connect(&ws_url(&n, &format!("/sockets/events/{id}?resend_mode=all&session_api_key={CLIENT_KEY}")), None).await.unwrap();
    let v = must_json(&mut ws).await;
    assert_eq!(v["key"], "full_state", "{v}");
    drop(ws);

    // 2. header key
    let mut ws = connect(&ws_url(&n, &format!("/sockets/session/{id}?after_seq=-1")), Some(CLIENT_KEY)).await.unwrap();
    assert_eq!(must_json(&mut ws).await["type"], "sync");
    // a redundant auth frame after auth is swallowed (never forwarded)
    send_text(&mut ws, &auth_frame(CLIENT_KEY)).await;
    drop(ws);

    // 3. first frame, on the alias path; extra fields in it are fine (the agent-server only
    // looks at `type` and `session_api_key`)
    let mut ws = connect(&ws_url(&n, &format!("/sockets/conversation/{id}/events")), None).await.unwrap();
    send_text(&mut ws, &serde_json::json!({"type": "auth", "session_api_key": CLIENT_KEY, "client": "test"}).to_string()).await;
    assert_eq!(must_json(&mut ws).await["key"], "full_state");
    // a user message goes through to the downstream and starts a run there
    send_text(&mut ws, r#"{"role":"user","content":[{"type":"text","text":"hello through nestor"}]}"#).await;
    let deadline = Instant::now() + T;
    while !f.socket_inbound_frames().iter().any(|t| t.contains("hello through nestor")) {
        assert!(Instant::now() < deadline, "the user message never reached the downstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(ws);

    // query key wins over the header, as on the agent-server
    let mut ws = connect(&ws_url(&n, &format!("/sockets/events/{id}?session_api_key={CLIENT_KEY}")), Some("wrong")).await.unwrap();
    assert_eq!(must_json(&mut ws).await["key"], "full_state");
    drop(ws);

    tokio::time::sleep(Duration::from_millis(100)).await;
    let reqs = f.socket_requests();
    assert_eq!(reqs.len(), 4, "{reqs:?}");
    assert!(reqs[0].query.contains(&("resend_mode".into(), "all".into())), "{:?}", reqs[0]);
    assert!(reqs[1].query.contains(&("after_seq".into(), "-1".into())), "{:?}", reqs[1]);
    assert_eq!(reqs[2].path, format!("/sockets/events/{id}"));
    assert_downstream_saw_only_its_key(&f);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_are_refused_before_the_upgrade_and_bad_first_frames_close_4001() {
    let f = fake(0).await;
    let n = nestor_existing(&[&f], "").await;
    let id = create_conversation(&n).await;
    for kind in ["events", "session"] {
        let path = format!("/sockets/{kind}/{id}");
        // bad query key: 403 even with a good header
        let e = connect(&ws_url(&n, &format!("{path}?session_api_key=nope")), Some(CLIENT_KEY)).await.unwrap_err();
        assert_eq!(http_status(&e), Some(403), "{e}");
        // empty query key is a (bad) key too
        let e = connect(&ws_url(&n, &format!("{path}?session_api_key=")), None).await.unwrap_err();
        assert_eq!(http_status(&e), Some(403), "{e}");
        // bad header key
        let e = connect(&ws_url(&n, &path), Some("nope")).await.unwrap_err();
        assert_eq!(http_status(&e), Some(403), "{e}");
        // bad first frames
        for first in [
            auth_frame("nope"),
            auth_frame(""),
            "not json".to_owned(),
            r#"["auth"]"#.to_owned(),
            serde_json::json!({"type": "authenticate", "session_api_key": CLIENT_KEY}).to_string(),
            r#"{"role":"user","content":[{"type":"text","text":"sneaky"}]}"#.to_owned(),
        ] {
            let mut ws = connect(&ws_url(&n, &path), None).await.unwrap();
            send_text(&mut ws, &first).await;
            assert_eq!(close_code(&mut ws, T).await, Some(4001), "first frame {first}");
        }
        // a binary first frame
        let mut ws = connect(&ws_url(&n, &path), None).await.unwrap();
        futures::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::Binary(auth_frame(CLIENT_KEY).into_bytes().into())).await.unwrap();
        assert_eq!(close_code(&mut ws, T).await, Some(4001));
    }
    // none of that reached the downstream
    assert!(f.socket_requests().is_empty(), "{:?}", f.socket_requests());
    assert!(f.socket_inbound_frames().is_empty());
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_first_frame_closes_4001_after_10_seconds() {
    let f = fake(0).await;
    let n = nestor_existing(&[&f], "").await;
    let id = create_conversation(&n).await;
    let t0 = Instant::now();
    let mut ws = connect(&ws_url(&n, &format!("/sockets/session/{id}")), None).await.unwrap();
    assert_eq!(close_code(&mut ws, Duration::from_secs(15)).await, Some(4001));
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(9_500) && waited < Duration::from_secs(13), "{waited:?}");
    assert!(f.socket_requests().is_empty());
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_conversation_is_4004_after_auth_and_malformed_id_is_403() {
    let f = fake(0).await;
    let n = nestor_existing(&[&f], "").await;
    let _known = create_conversation(&n).await;
    let unknown = Uuid::new_v4();
    for kind in ["events", "session"] {
        let path = format!("/sockets/{kind}/{unknown}");
        // header and query auth: accepted, then 4004
        let mut ws = connect(&ws_url(&n, &path), Some(CLIENT_KEY)).await.unwrap();
        assert_eq!(close_code(&mut ws, T).await, Some(4004));
        let mut ws = connect(&ws_url(&n, &format!("{path}?session_api_key={CLIENT_KEY}")), None).await.unwrap();
        assert_eq!(close_code(&mut ws, T).await, Some(4004));
        // first frame: auth first (a bad one is 4001, not 4004), then 4004
        let mut ws = connect(&ws_url(&n, &path), None).await.unwrap();
        send_text(&mut ws, &auth_frame("nope")).await;
        assert_eq!(close_code(&mut ws, T).await, Some(4001));
        let mut ws = connect(&ws_url(&n, &path), None).await.unwrap();
        send_text(&mut ws, &auth_frame(CLIENT_KEY)).await;
        assert_eq!(close_code(&mut ws, T).await, Some(4004));
        // a bad key on an unknown conversation is still a 403
        let e = connect(&ws_url(&n, &path), Some("nope")).await.unwrap_err();
        assert_eq!(http_status(&e), Some(403));
        // malformed ids: 403 before the upgrade, with or without a key
        for bad in ["not-a-uuid", "1234", "00000000-0000-0000-0000-00000000000g"] {
            let e = connect(&ws_url(&n, &format!("/sockets/{kind}/{bad}")), Some(CLIENT_KEY)).await.unwrap_err();
            assert_eq!(http_status(&e), Some(403), "{bad}: {e}");
            let e = connect(&ws_url(&n, &format!("/sockets/{kind}/{bad}")), None).await.unwrap_err();
            assert_eq!(http_status(&e), Some(403), "{bad}: {e}");
        }
    }
    assert!(f.socket_requests().iter().all(|r| !r.path.contains(&unknown.to_string())), "{:?}", f.socket_requests());
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_get_on_a_socket_path_is_404_json() {
    let f = fake(0).await;
    let n = nestor_existing(&[&f], "").await;
    let id = create_conversation(&n).await;
    for path in [format!("/sockets/events/{id}"), format!("/sockets/conversation/{id}/events"), format!("/sockets/session/{id}")] {
        for with_key in [true, false] {
            let rb = n.client().get(format!("{}{path}", n.url));
            let rb = if with_key { rb.header("X-Session-API-Key", CLIENT_KEY) } else { rb };
            let r = rb.send().await.unwrap();
            assert_eq!(r.status().as_u16(), 404, "{path}");
            assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(v, serde_json::json!({"detail": "Not Found"}), "{path}");
        }
    }
    assert!(f.socket_requests().is_empty());
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redial_after_a_downstream_loss_also_uses_nestors_key() {
    // The resumed connection is authenticated like the first one: nestor's key in the header,
    // the client's credentials nowhere, and no auth frame replayed downstream.
    let f = fake(0).await;
    let n = nestor_existing(&[&f], "").await;
    let id = create_conversation(&n).await;
    let mut a = connect(&ws_url(&n, &format!("/sockets/events/{id}")), None).await.unwrap();
    send_text(&mut a, &auth_frame(CLIENT_KEY)).await;
    assert_eq!(must_json(&mut a).await["key"], "full_state");
    let mut b = connect(&ws_url(&n, &format!("/sockets/session/{id}?session_api_key={CLIENT_KEY}")), None).await.unwrap();
    assert_eq!(must_json(&mut b).await["type"], "sync");
    f.restart().await;
    let seq = f.append_event(id, serde_json::json!({"source": "agent", "kind": "PauseEvent"}));
    let deadline = Instant::now() + T;
    let mut got = (false, false);
    while !(got.0 && got.1) {
        assert!(Instant::now() < deadline, "no event after the downstream restart");
        if !got.0 {
            if let Next::Text(t) = next(&mut a, Duration::from_millis(50)).await {
                got.0 |= t.contains("PauseEvent");
            }
        }
        if !got.1 {
            if let Next::Text(t) = next(&mut b, Duration::from_millis(50)).await {
                got.1 |= t.contains("PauseEvent") && t.contains(&format!("\"seq\":{seq}"));
            }
        }
    }
    assert!(f.socket_requests().len() >= 4, "{:?}", f.socket_requests());
    assert_downstream_saw_only_its_key(&f);
    n.stop().await;
}
