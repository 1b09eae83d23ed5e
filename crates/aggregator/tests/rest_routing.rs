//! REST routing through nestor over two fake agent-servers (`existing` provisioner):
//! create and idempotency, placement, the merged catalog, per-conversation forwarding,
//! fork, delete, restart safety, and the leak guard.

mod support;

use std::collections::HashSet;

use serde_json::{json, Value};
use support::*;

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn create_is_idempotent_and_placed_on_the_least_loaded_server() {
    let (a, b) = (fake(0).await, fake(1).await);
    let n = nestor_existing(&[&a, &b], "").await;

    let r = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let first: Value = r.json().await.unwrap();
    let id = id_of(&first);
    uuid::Uuid::parse_str(&id).expect("nestor minted a UUID");
    assert_eq!(first["runtime_info"], Value::Null, "create answers like upstream");

    // Same id again: 200 with the existing conversation, no second downstream conversation.
    let r = n.post("/api/conversations").json(&create_body(Some(&id))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(a.conversation_count() + b.conversation_count(), 1);

    // Three more: placement evens out (least conversations first).
    for _ in 0..3 {
        let r = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap();
        assert_eq!(r.status(), 201);
    }
    assert_eq!((a.conversation_count(), b.conversation_count()), (2, 2));

    // Every conversation is reachable through nestor, on the server that holds it.
    for f in [&a, &b] {
        for cid in f.conversation_ids() {
            let before = f.request_count_for(&format!("/api/conversations/{cid}"));
            let r = n.get(&format!("/api/conversations/{cid}")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(f.request_count_for(&format!("/api/conversations/{cid}")), before + 1);
        }
    }
    n.stop().await;
}

#[tokio::test]
async fn concurrent_creates_of_one_id_provision_once() {
    let (a, b) = (fake(0).await, fake(1).await);
    let n = nestor_existing(&[&a, &b], "").await;
    let id = uuid::Uuid::new_v4().to_string();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let req = n.post("/api/conversations").json(&create_body(Some(&id)));
        tasks.push(tokio::spawn(async move { req.send().await.unwrap().status().as_u16() }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 15, "{statuses:?}");
    assert_eq!(a.conversation_count() + b.conversation_count(), 1);
    // The per-id create lock is gone once no create of the id is in progress (it was kept
    // for every id ever created).
    assert!(n.state.creating.is_empty(), "{} create locks left", n.state.creating.len());
    n.stop().await;
}

#[tokio::test]
async fn merged_search_count_and_batch_across_servers() {
    let (a, b) = (fake(0).await, fake(1).await);
    // Conversations that were there before nestor started are adopted.
    for _ in 0..3 {
        a.create_conversation(None, create_body(None));
    }
    b.create_conversation(None, create_body(None));
    let n = nestor_existing(&[&a, &b], "").await;
    for _ in 0..2 {
        n.post("/api/conversations").json(&create_body(None)).send().await.unwrap();
    }
    let all: HashSet<String> =
        a.conversation_ids().into_iter().chain(b.conversation_ids()).map(|u| u.to_string()).collect();
    assert_eq!(all.len(), 6);

    for order in ["CREATED_AT", "CREATED_AT_DESC", "UPDATED_AT", "UPDATED_AT_DESC"] {
        let mut seen = Vec::new();
        let mut page: Option<String> = None;
        let mut stamps = Vec::new();
        for _ in 0..20 {
            let mut q = format!("/api/conversations/search?limit=1&sort_order={order}");
            if let Some(p) = &page {
                q.push_str(&format!("&page_id={p}"));
            }
            let v: Value = n.get(&q).send().await.unwrap().json().await.unwrap();
            let items = v["items"].as_array().unwrap();
            assert!(items.len() <= 1);
            for it in items {
                seen.push(id_of(it));
                let key = if order.starts_with("UPDATED") { "updated_at" } else { "created_at" };
                stamps.push(it[key].as_str().unwrap().to_owned());
                assert_eq!(it["runtime_info"]["runtime_status"], "available");
            }
            page = v["next_page_id"].as_str().map(str::to_owned);
            if page.is_none() {
                break;
            }
        }
        assert_eq!(seen.len(), 6, "{order}: {seen:?}");
        assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), all, "{order}");
        let mut sorted = stamps.clone();
        sorted.sort();
        if order.ends_with("DESC") {
            sorted.reverse();
        }
        assert_eq!(stamps, sorted, "{order} is sorted");
    }

    let count: Value = n.get("/api/conversations/count").send().await.unwrap().json().await.unwrap();
    assert_eq!(count, json!(6));
    let count: Value = n.get("/api/conversations/count?status=running").send().await.unwrap().json().await.unwrap();
    assert_eq!(count, json!(0));
    let v: Value = n.get("/api/conversations/search?status=idle").send().await.unwrap().json().await.unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 6);

    // Batch: request order kept, null for unknown ids.
    let ids: Vec<String> = all.iter().cloned().collect();
    let unknown = uuid::Uuid::new_v4().to_string();
    let q = format!("/api/conversations?ids={}&ids={unknown}&ids={}", ids[0], ids[1]);
    let v: Vec<Value> = n.get(&q).send().await.unwrap().json().await.unwrap();
    assert_eq!(v.len(), 3);
    assert_eq!(id_of(&v[0]), ids[0]);
    assert_eq!(v[1], Value::Null);
    assert_eq!(id_of(&v[2]), ids[1]);
    n.stop().await;
}

#[tokio::test]
async fn fork_lands_on_the_parents_server_and_delete_releases() {
    let (a, b) = (fake(0).await, fake(1).await);
    let n = nestor_existing(&[&a, &b], "").await;
    let parent: Value = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap().json().await.unwrap();
    let pid = id_of(&parent);
    let host = if a.conversation_ids().iter().any(|u| u.to_string() == pid) { &a } else { &b };

    let r = n.post(&format!("/api/conversations/{pid}/fork")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let fork: Value = r.json().await.unwrap();
    let fid = id_of(&fork);
    assert!(host.conversation_ids().iter().any(|u| u.to_string() == fid), "fork is on the parent's server");
    let r = n.get(&format!("/api/conversations/{fid}")).send().await.unwrap();
    assert_eq!(r.status(), 200, "nestor routes the fork");

    let r = n.delete(&format!("/api/conversations/{fid}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"success": true}));
    assert!(!host.conversation_ids().iter().any(|u| u.to_string() == fid));
    let r = n.get(&format!("/api/conversations/{fid}")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"detail": "Not Found"}));
    let v: Value = n.get("/api/conversations/search").send().await.unwrap().json().await.unwrap();
    let listed: Vec<String> = v["items"].as_array().unwrap().iter().map(id_of).collect();
    assert_eq!(listed, vec![pid]);
    n.stop().await;
}

#[tokio::test]
async fn routes_survive_a_nestor_restart() {
    let (a, b) = (fake(0).await, fake(1).await);
    let n = nestor_existing(&[&a, &b], "").await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let v: Value = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap().json().await.unwrap();
        ids.push(id_of(&v));
    }
    let dir = n.stop().await;
    let n = start_in(dir, &[&a, &b], "").await;
    for id in &ids {
        assert_eq!(n.get(&format!("/api/conversations/{id}")).send().await.unwrap().status(), 200);
    }
    let count: Value = n.get("/api/conversations/count").send().await.unwrap().json().await.unwrap();
    assert_eq!(count, json!(4));
    n.stop().await;
}

#[tokio::test]
async fn downstream_keys_and_addresses_never_reach_the_client() {
    let a = fake(0).await;
    let n = nestor_existing(&[&a], "").await;
    let v: Value = n.post("/api/conversations").json(&create_body(None)).send().await.unwrap().json().await.unwrap();
    let id = id_of(&v);
    let key = a.config().session_api_key.clone().unwrap();
    // Make the downstream echo its own key and address back in a field.
    let title = format!("see {}/x?tkn={key}", a.url());
    let r = n.patch(&format!("/api/conversations/{id}")).json(&json!({"title": title})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = n.get(&format!("/api/conversations/{id}")).send().await.unwrap();
    let headers = format!("{:?}", r.headers());
    let text = r.text().await.unwrap();
    let nestor_host = n.url.trim_start_matches("http://");
    assert!(!text.contains(&key) && !headers.contains(&key), "key leaked");
    assert!(!text.contains(&a.url()), "address leaked");
    assert!(text.contains(&format!("see http://{nestor_host}/x?tkn=**********")), "{text}");
    // Search answers too (served from nestor's catalog).
    let text = n.get("/api/conversations/search").send().await.unwrap().text().await.unwrap();
    assert!(!text.contains(&key), "key leaked through search");
    n.stop().await;
}

#[tokio::test]
async fn health_and_server_info_are_public() {
    let a = fake(0).await;
    let n = nestor_existing(&[&a], "").await;
    let c = n.client();
    for p in ["/alive", "/health"] {
        let r = c.get(format!("{}{p}", n.url)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "ok"}));
    }
    let r = c.get(format!("{}/ready", n.url)).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "ready"}));
    let info: Value = c.get(format!("{}/server_info", n.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(info["version"], "1.58.2");
    assert!(info["nestor_version"].is_string());
    assert!(info["capabilities"].as_array().unwrap().iter().any(|c| c == "conversation_runtime_routes_v1"));
    let r = c.get(format!("{}/openapi.json", n.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert!(doc["paths"]["/api/conversations/search"].is_object());
    n.stop().await;
}

/// A listing re-reads only infos whose text changed: a title changed behind nestor's back
/// shows in search once the catalog's view is stale, the others stay as they were, and the
/// changed info reaches the catalog on disk (background writer) for the next nestor.
#[tokio::test]
async fn changes_behind_nestors_back_are_listed_and_persisted() {
    let a = fake(0).await;
    let ids: Vec<uuid::Uuid> = (0..3).map(|_| a.create_conversation(None, create_body(None))["id"].as_str().unwrap().parse().unwrap()).collect();
    let n = nestor_existing(&[&a], "[catalog]\nmax_staleness_ms = 50\n").await;
    let title_of = |v: &Value, id: &uuid::Uuid| {
        v["items"].as_array().unwrap().iter().find(|it| it["id"] == id.to_string()).map(|it| it["title"].clone())
    };
    let before: Value = n.get("/api/conversations/search").send().await.unwrap().json().await.unwrap();
    assert_eq!(before["items"].as_array().unwrap().len(), 3);

    let r = reqwest::Client::new()
        .patch(format!("{}/api/conversations/{}", a.url(), ids[1]))
        .header("X-Session-API-Key", "downstream-key-0-abcdefgh")
        .json(&json!({"title": "renamed behind nestor"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    tokio::time::sleep(std::time::Duration::from_millis(120)).await;
    let after: Value = n.get("/api/conversations/search").send().await.unwrap().json().await.unwrap();
    assert_eq!(title_of(&after, &ids[1]), Some(json!("renamed behind nestor")));
    for id in [&ids[0], &ids[2]] {
        assert_eq!(title_of(&after, id), title_of(&before, id), "unchanged conversation {id}");
    }

    // The new title was written to the catalog (graceful stop flushes the writer): a
    // nestor started on the same state, with the downstream gone, still lists it.
    let dir = n.stop().await;
    a.stop().await;
    let n = start_in(dir, &[&a], "[catalog]\nmax_staleness_ms = 600000\n").await;
    let v: Value = n.get("/api/conversations/search").send().await.unwrap().json().await.unwrap();
    assert_eq!(title_of(&v, &ids[1]), Some(json!("renamed behind nestor")));
    n.stop().await;
}
