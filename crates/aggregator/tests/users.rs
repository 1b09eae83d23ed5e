//! Two users through one nestor: neither sees, reads, opens a socket to or deletes the
//! other's conversations (one test per route family: per-conversation REST, the catalog,
//! create, sockets, delete, settings and secrets), and the per-user limit of running
//! conversations (429 with Retry-After, at create and at start).

mod support;
mod ws_common;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use uuid::Uuid;

const ALICE: &str = "alice-key-0123456789";
const BOB: &str = "bob-key-0123456789ab";
const T: Duration = Duration::from_secs(10);

const USERS: &str = "[[users]]\nid = \"alice\"\nsession_api_keys = [\"alice-key-0123456789\"]\n[[users]]\nid = \"bob\"\nsession_api_keys = [\"bob-key-0123456789ab\"]\n";

async fn two_users(fakes: &[&nestor_test_support::FakeAgentServer]) -> TestNestor {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "bind = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n{USERS}\n[provisioner]\nkind = \"existing\"\n[provisioner.existing]\nhealth_interval_secs = 0.2\n{}",
        dir.path().join("state").display(),
        existing_entries(fakes)
    );
    start_with_toml(dir, &toml).await
}

fn req(n: &TestNestor, m: reqwest::Method, path: &str, key: &str) -> reqwest::RequestBuilder {
    n.client().request(m, format!("{}{path}", n.url)).header("X-Session-API-Key", key)
}

async fn create_as(n: &TestNestor, key: &str) -> String {
    let r = req(n, reqwest::Method::POST, "/api/conversations", key).json(&create_body(None)).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

/// Status and body of a request.
async fn answer(r: reqwest::RequestBuilder) -> (u16, String) {
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn per_conversation_routes_answer_another_users_conversation_like_an_unknown_one() {
    let f = fake(0).await;
    let n = two_users(&[&f]).await;
    let mine = create_as(&n, ALICE).await;
    let unknown = Uuid::new_v4().to_string();
    use reqwest::Method as M;
    let routes: &[(M, &str, Option<Value>)] = &[
        (M::GET, "", None),
        (M::PATCH, "", Some(json!({"title": "stolen"}))),
        (M::GET, "/events/search", None),
        (M::GET, "/events/count", None),
        (M::POST, "/events", Some(json!({"role": "user", "content": [{"type": "text", "text": "hi"}], "run": false}))),
        (M::POST, "/run", None),
        (M::POST, "/pause", None),
        (M::GET, "/runtime", None),
        (M::POST, "/runtime/reprovision", None),
        (M::DELETE, "/runtime", None),
        (M::POST, "/runtime/credentials", None),
        (M::POST, "/fork", Some(json!({}))),
        (M::GET, "/workspace", None),
        (M::GET, "/vscode/url", None),
    ];
    for (m, rest, body) in routes {
        let build = |id: &str, key: &str| {
            let r = req(&n, m.clone(), &format!("/api/conversations/{id}{rest}"), key);
            match body {
                Some(b) => r.json(b),
                None => r,
            }
        };
        let theirs = answer(build(&mine, BOB)).await;
        let nobodys = answer(build(&unknown, BOB)).await;
        // (Some answers name the conversation asked for, like the agent-server's.)
        let theirs = (theirs.0, theirs.1.replace(&mine, "ID"));
        let nobodys = (nobodys.0, nobodys.1.replace(&unknown, "ID"));
        assert_eq!(theirs.0, 404, "{m} {rest}: {theirs:?}");
        assert_eq!(theirs, nobodys, "{m} {rest}: another user's conversation must look unknown");
    }
    let (s, _) = answer(req(&n, M::GET, &format!("/api/file/download-trajectory/{mine}"), BOB)).await;
    assert_eq!(s, 404);
    // Nothing of Bob's attempts reached Alice's conversation.
    let info: Value = req(&n, M::GET, &format!("/api/conversations/{mine}"), ALICE).send().await.unwrap().json().await.unwrap();
    assert_ne!(info["title"], "stolen");
    assert_eq!(req(&n, M::GET, &format!("/api/conversations/{mine}/runtime"), ALICE).send().await.unwrap().status(), 200);
    n.stop().await;
}

#[tokio::test]
async fn the_catalog_lists_and_counts_only_the_callers_conversations() {
    let a = fake(0).await;
    let b = fake(1).await;
    let n = two_users(&[&a, &b]).await;
    let alices: Vec<String> = futures::future::join_all((0..3).map(|_| create_as(&n, ALICE))).await;
    let bobs: Vec<String> = futures::future::join_all((0..2).map(|_| create_as(&n, BOB))).await;
    for (key, mine, theirs) in [(ALICE, &alices, &bobs), (BOB, &bobs, &alices)] {
        let v: Value = req(&n, reqwest::Method::GET, "/api/conversations/search?limit=100", key).send().await.unwrap().json().await.unwrap();
        let mut ids: Vec<String> = v["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_owned()).collect();
        ids.sort();
        let mut want = mine.clone();
        want.sort();
        assert_eq!(ids, want);
        let c: Value = req(&n, reqwest::Method::GET, "/api/conversations/count", key).send().await.unwrap().json().await.unwrap();
        assert_eq!(c, json!(mine.len()));
        // Paging with a small limit never leaks the other user's items either.
        let mut seen = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let q = match &page {
                Some(p) => format!("/api/conversations/search?limit=1&page_id={p}"),
                None => "/api/conversations/search?limit=1".into(),
            };
            let v: Value = req(&n, reqwest::Method::GET, &q, key).send().await.unwrap().json().await.unwrap();
            seen.extend(v["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_owned()));
            match v["next_page_id"].as_str() {
                Some(p) => page = Some(p.to_owned()),
                None => break,
            }
        }
        seen.sort();
        assert_eq!(seen, want);
        // Batch: the other user's ids are null, exactly like unknown ones.
        let ids = format!("{}&ids={}&ids={}", mine[0], theirs[0], Uuid::new_v4());
        let v: Value = req(&n, reqwest::Method::GET, &format!("/api/conversations?ids={ids}"), key).send().await.unwrap().json().await.unwrap();
        let arr = v.as_array().unwrap();
        assert_eq!(arr[0]["id"], mine[0].as_str());
        assert_eq!(arr[1], Value::Null);
        assert_eq!(arr[2], Value::Null);
    }
    n.stop().await;
}

#[tokio::test]
async fn creating_with_another_users_id_neither_takes_nor_reveals_it() {
    let f = fake(0).await;
    let n = two_users(&[&f]).await;
    let mine = create_as(&n, ALICE).await;
    let mut body = create_body(Some(&mine));
    body["tags"] = json!({"by": "bob"});
    let r = req(&n, reqwest::Method::POST, "/api/conversations", BOB).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 409);
    let detail = r.json::<Value>().await.unwrap()["detail"].as_str().unwrap().to_owned();
    assert!(!detail.contains("alice"), "{detail}");
    // Still Alice's, untouched, and invisible to Bob.
    let info: Value = req(&n, reqwest::Method::GET, &format!("/api/conversations/{mine}"), ALICE).send().await.unwrap().json().await.unwrap();
    assert_ne!(info["tags"]["by"], "bob");
    assert_eq!(req(&n, reqwest::Method::GET, &format!("/api/conversations/{mine}"), BOB).send().await.unwrap().status(), 404);
    let c: Value = req(&n, reqwest::Method::GET, "/api/conversations/count", BOB).send().await.unwrap().json().await.unwrap();
    assert_eq!(c, json!(0));
    // Alice creating it again is the idempotent 200 it always was.
    let r = req(&n, reqwest::Method::POST, "/api/conversations", ALICE).json(&create_body(Some(&mine))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_to_another_users_conversation_close_like_an_unknown_one() {
    use ws_common::*;
    let f = fake(0).await;
    let n = two_users(&[&f]).await;
    let mine = create_as(&n, ALICE).await;
    let unknown = Uuid::new_v4().to_string();
    for kind in ["events", "session"] {
        for id in [&mine, &unknown] {
            // Header key, query key and first-frame auth: Bob is authenticated, then 4004.
            let path = format!("/sockets/{kind}/{id}");
            let mut ws = connect(&ws_url(&n, &path), Some(BOB)).await.unwrap();
            assert_eq!(close_code(&mut ws, T).await, Some(4004), "{kind} {id}");
            let mut ws = connect(&ws_url(&n, &format!("{path}?session_api_key={BOB}")), None).await.unwrap();
            assert_eq!(close_code(&mut ws, T).await, Some(4004), "{kind} {id}");
            let mut ws = connect(&ws_url(&n, &path), None).await.unwrap();
            send_text(&mut ws, &auth_frame(BOB)).await;
            assert_eq!(close_code(&mut ws, T).await, Some(4004), "{kind} {id}");
        }
    }
    // The alias path too; Alice's own socket works.
    let mut ws = connect(&ws_url(&n, &format!("/sockets/conversation/{mine}/events")), Some(BOB)).await.unwrap();
    assert_eq!(close_code(&mut ws, T).await, Some(4004));
    let mut ws = connect(&ws_url(&n, &format!("/sockets/events/{mine}?resend_mode=all")), Some(ALICE)).await.unwrap();
    assert_eq!(must_json(&mut ws).await["key"], "full_state");
    // The downstream never saw a socket for Bob.
    assert_eq!(f.socket_requests().len(), 1);
    n.stop().await;
}

#[tokio::test]
async fn delete_of_another_users_conversation_is_404_and_changes_nothing() {
    let f = fake(0).await;
    let n = two_users(&[&f]).await;
    let mine = create_as(&n, ALICE).await;
    let (s, body) = answer(req(&n, reqwest::Method::DELETE, &format!("/api/conversations/{mine}"), BOB)).await;
    let other = Uuid::new_v4().to_string();
    let unknown = answer(req(&n, reqwest::Method::DELETE, &format!("/api/conversations/{other}"), BOB)).await;
    assert_eq!((s, body.replace(&mine, "ID")), (unknown.0, unknown.1.replace(&other, "ID")));
    assert_eq!(s, 404);
    assert_eq!(req(&n, reqwest::Method::GET, &format!("/api/conversations/{mine}"), ALICE).send().await.unwrap().status(), 200);
    assert_eq!(f.request_count_for(&format!("/api/conversations/{mine}")), 1, "only Alice's GET reached it");
    let r = req(&n, reqwest::Method::DELETE, &format!("/api/conversations/{mine}"), ALICE).send().await.unwrap();
    assert_eq!(r.status(), 200);
    n.stop().await;
}

#[tokio::test]
async fn settings_and_secrets_are_per_user() {
    let f = fake(0).await;
    let n = two_users(&[&f]).await;
    let r = req(&n, reqwest::Method::PUT, "/api/settings/secrets", ALICE)
        .json(&json!({"name": "ALICE_TOKEN", "value": "alice-secret-value", "description": "d"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = req(&n, reqwest::Method::PATCH, "/api/settings", ALICE)
        .json(&json!({"agent_settings_diff": {"llm": {"model": "openai/alice-model"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let (s, _) = answer(req(&n, reqwest::Method::GET, "/api/settings/secrets/ALICE_TOKEN", BOB)).await;
    assert_eq!(s, 404);
    let list = answer(req(&n, reqwest::Method::GET, "/api/settings/secrets", BOB)).await;
    assert!(!list.1.contains("ALICE_TOKEN"), "{list:?}");
    let settings = answer(req(&n, reqwest::Method::GET, "/api/settings", BOB)).await;
    assert_eq!(settings.0, 200);
    assert!(!settings.1.contains("alice-model"), "{settings:?}");
    // Bob's conversations get neither Alice's secrets nor her defaults.
    let body = json!({"workspace": {"kind": "LocalWorkspace", "working_dir": "/tmp/w"}, "autotitle": false, "agent": create_body(None)["agent"].clone()});
    let r = req(&n, reqwest::Method::POST, "/api/conversations", BOB).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let sent = f.create_bodies().pop().unwrap();
    assert!(!sent.to_string().contains("ALICE_TOKEN"), "{sent}");
    // Alice's own still there.
    let list = answer(req(&n, reqwest::Method::GET, "/api/settings/secrets", ALICE)).await;
    assert!(list.1.contains("ALICE_TOKEN"), "{list:?}");
    n.stop().await;
}

fn process_config(dir: &tempfile::TempDir, extra: &str) -> String {
    format!(
        "bind = \"127.0.0.1:0\"\nstate_dir = \"{}\"\nready_timeout_secs = 20.0\n{USERS}\n{extra}\n[provisioner]\nkind = \"process\"\n[provisioner.process]\nagent_server = \"{}\"\nstartup_timeout_secs = 20.0\nstop_timeout_secs = 3.0\n",
        dir.path().join("state").display(),
        support::fake_bin().display()
    )
}

#[tokio::test]
async fn running_conversations_per_user_are_limited_with_429_and_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let toml = process_config(&dir, "[admission]\nmax_running_per_user = 1\n");
    let n = start_with_toml(dir, &toml).await;
    let first = create_as(&n, ALICE).await;
    let r = req(&n, reqwest::Method::POST, "/api/conversations", ALICE).json(&create_body(None)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry > 0);
    let detail = r.json::<Value>().await.unwrap()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("user alice") && detail.contains("limit 1"), "{detail}");
    // Bob has his own allowance.
    create_as(&n, BOB).await;
    // Alice stops hers: she may create another, and then may not start the first again.
    let r = req(&n, reqwest::Method::DELETE, &format!("/api/conversations/{first}/runtime"), ALICE).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let second = create_as(&n, ALICE).await;
    let r = req(&n, reqwest::Method::GET, &format!("/api/conversations/{first}/events/search"), ALICE).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let r = req(&n, reqwest::Method::DELETE, &format!("/api/conversations/{second}"), ALICE).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = req(&n, reqwest::Method::POST, &format!("/api/conversations/{first}/runtime/reprovision"), ALICE).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let metrics = n.client().get(format!("{}/metrics", n.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("reason=\"max_running_per_user\""), "{metrics}");
    n.stop().await;
}
