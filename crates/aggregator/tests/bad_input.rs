//! Bad input gets the agent-server's own status codes and error shapes, never a panic or a
//! hang: malformed and unknown ids, missing and wrong keys, invalid JSON, oversized bodies,
//! a downstream that is down.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

#[tokio::test]
async fn malformed_ids_get_the_agent_servers_422() {
    let a = fake(0).await;
    let n = nestor_existing(&[&a], "").await;
    let r = n.get("/api/conversations/xyz").send().await.unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"detail":[{"type":"uuid_parsing","loc":["path","conversation_id"],"msg":"Input should be a valid UUID, invalid character: found `x` at 0","input":"xyz","ctx":{"error":"invalid character: found `x` at 0"}}]}"#
    );
    let r = n.get("/api/conversations/00000000-0000-0000-0000-00000000000/events/search").send().await.unwrap();
    assert_eq!(r.status(), 422);
    let r = n.get("/api/file/download-trajectory/nope").send().await.unwrap();
    assert_eq!(r.status(), 422);
    let r = n.get("/api/conversations?ids=abc").send().await.unwrap();
    assert_eq!(r.status(), 422);
    let r = n.get("/api/conversations/search?limit=0&sort_order=SIDEWAYS").send().await.unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["detail"].as_array().unwrap().len(), 2);
    n.stop().await;
}

#[tokio::test]
async fn unknown_ids_get_the_agent_servers_404() {
    let a = fake(0).await;
    let n = nestor_existing(&[&a], "").await;
    let id = uuid::Uuid::new_v4();
    for (path, detail) in [
        (format!("/api/conversations/{id}"), "Not Found".to_owned()),
        (format!("/api/conversations/{id}/events/search"), format!("Conversation not found: {id}")),
        (format!("/api/conversations/{}", id.simple()), "Not Found".to_owned()),
    ] {
        let r = n.get(&path).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.json::<Value>().await.unwrap(), json!({ "detail": detail }), "{path}");
    }
    let r = n.delete(&format!("/api/conversations/{id}")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    n.stop().await;
}

#[tokio::test]
async fn missing_and_wrong_keys_get_401() {
    let a = fake(0).await;
    let n = nestor_existing(&[&a], "").await;
    let c = n.client();
    for key in [None, Some("wrong"), Some("")] {
        for (method, path) in [
            ("GET", "/api/conversations/search".to_owned()),
            ("GET", "/api/conversations/count".to_owned()),
            ("POST", "/api/conversations".to_owned()),
            ("GET", format!("/api/conversations/{}", uuid::Uuid::new_v4())),
            ("GET", "/api/conversations/xyz".to_owned()),
            ("GET", "/api/settings".to_owned()),
        ] {
            let mut rb = c.request(method.parse().unwrap(), format!("{}{path}", n.url));
            if let Some(k) = key {
                rb = rb.header("X-Session-API-Key", k);
            }
            let r = rb.send().await.unwrap();
            assert_eq!(r.status(), 401, "{method} {path} with {key:?}");
            assert_eq!(r.json::<Value>().await.unwrap(), json!({"detail": "Unauthorized"}));
        }
    }
    assert_eq!(a.request_count_for("/api/settings"), 0, "unauthenticated requests never reach a downstream");
    n.stop().await;
}

#[tokio::test]
async fn invalid_create_bodies_get_422_without_provisioning() {
    let a = fake(0).await;
    let n = nestor_existing(&[&a], "").await;
    // Creates, not all requests: nestor's health checks and catalog refreshes reach the
    // downstream on their own schedule (a slow machine can fit one into this test).
    let before = a.create_bodies().len();
    for (body, kind) in [
        ("{bad", "json_invalid"),
        ("[1,2]", "model_attributes_type"),
        ("{}", "missing"),
        (r#"{"workspace":{},"conversation_id":"nope"}"#, "uuid_parsing"),
    ] {
        let r = n
            .post("/api/conversations")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["detail"][0]["type"], kind, "{body}: {v}");
    }
    assert_eq!(a.create_bodies().len(), before, "no create reached the downstream");
    n.stop().await;
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let a = fake(0).await;
    let n = nestor_existing(&[&a], "max_body_bytes = 1024").await;
    let big = format!(r#"{{"workspace":{{}},"pad":"{}"}}"#, "x".repeat(4096));
    let r = n.post("/api/conversations").header("content-type", "application/json").body(big.clone()).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert!(v["detail"].as_str().unwrap().contains("1024"), "{v}");

    // Same for a per-conversation route, and for a chunked body with no length announced.
    let id = a.create_conversation(None, create_body(None))["id"].as_str().unwrap().to_owned();
    let n = {
        let dir = n.stop().await;
        start_in(dir, &[&a], "max_body_bytes = 1024").await
    };
    let r = n.post(&format!("/api/conversations/{id}/events")).header("content-type", "application/json").body(big.clone()).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let stream = futures::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 512]))));
    let r = n
        .post(&format!("/api/conversations/{id}/events"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    // Past the limit the stream is cut: either a 413/4xx/5xx answer or a reset connection,
    // never a hang and never the whole body at the downstream.
    match r {
        Ok(r) => assert!(r.status().is_client_error() || r.status().is_server_error(), "{}", r.status()),
        Err(e) => assert!(!e.is_timeout(), "{e}"),
    }
    n.stop().await;
}

#[tokio::test]
async fn a_downstream_that_is_down_gets_a_clear_502_or_503() {
    let a = fake(0).await;
    let n = nestor_existing(&[&a], "ready_timeout_secs = 1.0").await;
    let id = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap().json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    a.stop().await;
    let t = std::time::Instant::now();
    let r = n.get(&format!("/api/conversations/{id}/events/search")).send().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "bounded");
    assert!(r.status() == 502 || r.status() == 503, "{}", r.status());
    let text = r.text().await.unwrap();
    assert!(text.contains(&id), "names the conversation: {text}");
    assert!(!text.contains(&a.port().to_string()), "no address: {text}");
    // Creating a new conversation while the only server is down: 503 with Retry-After.
    tokio::time::sleep(Duration::from_millis(600)).await; // let the health loop see it
    let r = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    // Back up: requests work again without restarting nestor.
    a.restart().await;
    let mut ok = false;
    for _ in 0..50 {
        if n.get(&format!("/api/conversations/{id}")).send().await.unwrap().status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "recovers when the downstream is back");
    n.stop().await;
}

#[tokio::test]
async fn unknown_root_paths_are_404_and_not_forwarded() {
    let a = fake(0).await;
    let n = nestor_existing(&[&a], "").await;
    let r = n.client().get(format!("{}/nothing-here", n.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"detail": "Not Found"}));
    // Counted by path: nestor's own health checks reach the downstream on their schedule.
    assert_eq!(a.request_count_for("/nothing-here"), 0);
    n.stop().await;
}
