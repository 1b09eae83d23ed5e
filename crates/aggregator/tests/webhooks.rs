//! Webhooks: what downstreams post keeps nestor's catalog current (no fan-out on search),
//! and is re-emitted to the webhooks configured on nestor.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Path;
use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::{json, Value};
use support::*;

type Log = Arc<Mutex<Vec<(String, HeaderMap, Value)>>>;

/// A webhook receiver on loopback recording what it gets.
async fn receiver() -> (String, Log) {
    let log: Log = Arc::default();
    let l1 = log.clone();
    let l2 = log.clone();
    let app = axum::Router::new()
        .route(
            "/hook/conversations",
            post(move |h: HeaderMap, b: axum::Json<Value>| {
                let l = l1.clone();
                async move {
                    l.lock().unwrap().push(("conversations".into(), h, b.0));
                    "{}"
                }
            }),
        )
        .route(
            "/hook/events/{hex}",
            post(move |Path(hex): Path<String>, h: HeaderMap, b: axum::Json<Value>| {
                let l = l2.clone();
                async move {
                    l.lock().unwrap().push((format!("events/{hex}"), h, b.0));
                    "{}"
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, log)
}

#[tokio::test]
async fn downstream_webhooks_update_the_catalog_and_are_re_emitted() {
    let a = fake(0).await;
    let (hook, log) = receiver().await;
    let extra = format!(
        "[[webhooks]]\nbase_url = \"{hook}\"\nheaders = {{ X-Test = \"yes\" }}\nflush_delay = 0.2\n[catalog]\nmax_staleness_ms = 0\nwebhook_staleness_secs = 600.0\n"
    );
    let n = nestor_existing(&[&a], &extra).await;
    let v: Value = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap().json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    let hex = uuid::Uuid::parse_str(&id).unwrap().simple().to_string();
    let downstream_key = a.config().session_api_key.clone().unwrap();
    let c = n.client();

    // A stranger cannot post webhooks.
    let r = c.post(format!("{}/nestor/webhooks/events/{hex}", n.url)).header("X-Session-API-Key", CLIENT_KEY).json(&json!([])).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // The run finishes on the downstream ...
    let uuid = uuid::Uuid::parse_str(&id).unwrap();
    a.send_user_message(uuid, "go", true);
    for _ in 0..100 {
        if a.execution_status(uuid).as_deref() == Some("finished") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.execution_status(uuid).as_deref(), Some("finished"));
    // (titled, as the agent-server's auto-title does; an untitled one is read again later)
    let r = n.patch(&format!("/api/conversations/{id}")).json(&json!({"title": "Auto title"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let reads_before = a.request_count_for("/api/conversations");

    // ... and the downstream reports it (as an agent-server does, with its own key).
    let events = json!([
        {"id": "11111111-1111-4111-8111-111111111111", "timestamp": "2026-01-01T00:00:01", "source": "environment", "kind": "ConversationStateUpdateEvent", "key": "execution_status", "value": "finished"},
        {"id": "22222222-2222-4222-8222-222222222222", "timestamp": "2026-01-01T00:00:02", "source": "environment", "kind": "ConversationStateUpdateEvent", "key": "full_state", "value": {"execution_status": "finished", "stats": {"usage_to_metrics": {"agent": {}}}}}
    ]);
    let r = c.post(format!("{}/nestor/webhooks/events/{hex}", n.url)).header("X-Session-API-Key", &downstream_key).json(&events).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // A run that ended: nestor reads the conversation's info once (the agent-server
    // announces its auto-title by no webhook), by id, not by listing.
    for _ in 0..100 {
        if a.request_count_for("/api/conversations") > reads_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.request_count_for("/api/conversations") - reads_before, 1, "one info read after the run");

    // Search reflects it without asking the downstream.
    a.reset_request_counts();
    let v: Value = n.get("/api/conversations/search").send().await.unwrap().json().await.unwrap();
    assert_eq!(v["items"][0]["execution_status"], "finished", "{v}");
    let count: Value = n.get("/api/conversations/count?status=finished").send().await.unwrap().json().await.unwrap();
    assert_eq!(count, json!(1));
    assert_eq!(a.request_count_for("/api/conversations/search"), 0, "no fan-out while webhooks flow");

    // A conversation info webhook (e.g. a title change) updates the catalog too.
    let mut info = a.conversation(uuid::Uuid::parse_str(&id).unwrap()).unwrap();
    info["title"] = json!("From the webhook");
    c.post(format!("{}/nestor/webhooks/conversations", n.url)).header("X-Session-API-Key", &downstream_key).json(&info).send().await.unwrap();
    let v: Value = n.get("/api/conversations/search").send().await.unwrap().json().await.unwrap();
    assert_eq!(v["items"][0]["title"], "From the webhook");

    // Re-emitted to nestor's own webhook, with its headers and nestor's key.
    let mut got = Vec::new();
    for _ in 0..50 {
        got = log.lock().unwrap().clone();
        if got.iter().any(|(k, ..)| k.starts_with("events/")) && got.iter().any(|(k, ..)| k == "conversations") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, h, batch) = got.iter().find(|(k, ..)| k == &format!("events/{hex}")).expect("event batch re-emitted");
    assert_eq!(batch.as_array().unwrap().len(), 2);
    assert_eq!(h["x-test"], "yes");
    assert_eq!(h["x-session-api-key"], CLIENT_KEY, "nestor's own key, like an agent-server's first key");
    let (_, _, conv) = got.iter().find(|(k, ..)| k == "conversations").unwrap();
    assert_eq!(conv["title"], "From the webhook");
    assert!(!serde_json::to_string(&got.iter().map(|(_, _, b)| b).collect::<Vec<_>>()).unwrap().contains(&downstream_key));

    // A deleting webhook (deleted behind nestor's back) removes the conversation.
    info["execution_status"] = json!("deleting");
    c.post(format!("{}/nestor/webhooks/conversations", n.url)).header("X-Session-API-Key", &downstream_key).json(&info).send().await.unwrap();
    let count: Value = n.get("/api/conversations/count").send().await.unwrap().json().await.unwrap();
    assert_eq!(count, json!(0));
    n.stop().await;
}

/// A webhook receiver that fails: nestor retries each post (`num_retries`, `retry_delay`)
/// and the payload arrives once the receiver recovers; a receiver that never recovers is
/// given up on after `num_retries + 1` attempts (bounded), and nestor keeps serving.
#[tokio::test]
async fn re_emitted_webhooks_are_retried_until_the_receiver_recovers() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let a = fake(0).await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let got: Log = Arc::default();
    let (at, g) = (attempts.clone(), got.clone());
    let app = axum::Router::new().route(
        "/hook/conversations",
        post(move |h: HeaderMap, b: axum::Json<Value>| {
            let (at, g) = (at.clone(), g.clone());
            async move {
                // The first two attempts fail (503), the third is accepted.
                if at.fetch_add(1, Ordering::SeqCst) < 2 {
                    return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down");
                }
                g.lock().unwrap().push(("conversations".into(), h, b.0));
                (axum::http::StatusCode::OK, "{}")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let extra = format!("[[webhooks]]\nbase_url = \"{hook}\"\nflush_delay = 0.1\nnum_retries = 3\nretry_delay = 0.2\n");
    let n = nestor_existing(&[&a], &extra).await;
    let v: Value = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap().json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    let downstream_key = a.config().session_api_key.clone().unwrap();
    let mut info = a.conversation(uuid::Uuid::parse_str(&id).unwrap()).unwrap();
    info["title"] = json!("retried");
    let r = n.client().post(format!("{}/nestor/webhooks/conversations", n.url)).header("X-Session-API-Key", &downstream_key).json(&info).send().await.unwrap();
    assert_eq!(r.status(), 200, "the downstream's post is accepted at once, whatever the receivers do");
    let mut delivered = false;
    for _ in 0..100 {
        if got.lock().unwrap().iter().any(|(_, _, b)| b["title"] == "retried") {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(delivered, "delivered after the receiver recovered ({} attempts)", attempts.load(Ordering::SeqCst));
    assert!(attempts.load(Ordering::SeqCst) >= 3, "two failures, then the success");
    let r = n.get("/api/conversations/search").send().await.unwrap();
    assert_eq!(r.status(), 200, "nestor serves while it retries");
    n.stop().await;
}

/// A status change seen on a proxied events socket updates the catalog before the client
/// gets it: a search right after the client saw `finished` says `finished`, with no
/// webhook yet and no fan-out to the downstream.
#[tokio::test]
async fn the_catalog_learns_a_finished_run_from_the_socket_before_the_client() {
    let a = fake(0).await;
    let n = nestor_existing(&[&a], "[catalog]\nmax_staleness_ms = 600000\nwebhook_staleness_secs = 600.0\n").await;
    let v: Value = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap().json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    let uuid = uuid::Uuid::parse_str(&id).unwrap();
    let url = format!("{}/sockets/events/{id}", n.url.replacen("http://", "ws://", 1));
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    req.headers_mut().insert("X-Session-API-Key", CLIENT_KEY.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    use futures::StreamExt;
    let _snapshot = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap();
    a.reset_request_counts();
    a.send_user_message(uuid, "go", true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next()).await.expect("no finished status on the socket").unwrap().unwrap();
        let Ok(t) = m.into_text() else { continue };
        let Ok(ev) = serde_json::from_str::<Value>(&t) else { continue };
        if ev["kind"] == "ConversationStateUpdateEvent" && ev["key"] == "execution_status" && ev["value"] == "finished" {
            break;
        }
    }
    let v: Value = n.get("/api/conversations/search").send().await.unwrap().json().await.unwrap();
    assert_eq!(v["items"][0]["execution_status"], "finished", "{v}");
    assert_eq!(a.request_count_for("/api/conversations/search"), 0, "answered from the catalog");
    n.stop().await;
}
