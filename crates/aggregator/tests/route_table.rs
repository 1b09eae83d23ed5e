//! The route table, checked row by row against the agent-server 1.58.2 route list
//! (`tests/fixtures/routes-1.58.2.tsv`): every HTTP route is sent through nestor and must
//! end where docs/routing.md says — answered by nestor, forwarded to the conversation's
//! downstream (with its key), or forwarded to the home downstream.

mod support;

use serde_json::Value;
use support::*;

#[derive(Debug, PartialEq)]
enum Expect {
    /// nestor answers itself; no downstream sees the path.
    Nestor,
    /// The conversation's downstream gets it.
    Conversation,
    /// The home downstream gets it.
    Home,
}

fn expectation(method: &str, path: &str, class: &str) -> Expect {
    if class.starts_with("AGGREGATOR-SELF (health") || class.starts_with("GLOBAL-AGGREGATE") || class.starts_with("CREATE") {
        return Expect::Nestor;
    }
    if class.starts_with("PROCESS-LOCAL") {
        return Expect::Nestor; // 404: not for clients
    }
    if path.ends_with("/runtime") || path.ends_with("/runtime/reprovision") || path.ends_with("/runtime/credentials") {
        // The runtime is nestor's provisioning of the conversation (docs/routing.md).
        let _ = method;
        return Expect::Nestor;
    }
    if class.starts_with("PER-CONVERSATION") {
        return Expect::Conversation;
    }
    // Settings, secrets, profiles, provider connections, LLM catalogs and the workspace
    // cookie live on nestor (profile validation needs an LLM call: the home makes it).
    let nestor_owned = ["/api/settings", "/api/profiles", "/api/agent-profiles", "/api/meta-profiles", "/api/llm/provider-connections", "/api/llm/providers", "/api/llm/models", "/api/auth/workspace-session"];
    if nestor_owned.iter().any(|p| path == *p || path.starts_with(&format!("{p}/"))) && !path.ends_with("/validate") {
        return Expect::Nestor;
    }
    if class.starts_with("GLOBAL-WORKSPACE") {
        // Host-global workspace routes must name a conversation: 400 from nestor when
        // they don't (see `host_global_routes_follow_the_addressing_rules`).
        return Expect::Nestor;
    }
    Expect::Home
}

/// Fill in path parameters: the conversation id, and plausible values for the rest.
fn concrete(path: &str, conv: &str) -> String {
    let path = path.replace("[/{path}]", "");
    let mut out = String::new();
    let mut rest = path.as_str();
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').unwrap() + start;
        let name = &rest[start + 1..end];
        out.push_str(match name {
            "conversation_id" | "runtime_conversation_id" => conv,
            "event_id" | "command_id" | "job_id" | "profile_id" => "0b8e5f3a-5d1e-4a0e-9a7e-3c2f1d0e9b8a",
            "file_path" => "README.md",
            _ => "x",
        });
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

#[tokio::test]
async fn every_http_route_goes_where_the_routing_rules_say() {
    let (home, other) = (fake(0).await, fake(1).await);
    let conv = other.create_conversation(None, create_body(None))["id"].as_str().unwrap().to_owned();
    let n = nestor_existing(&[&home, &other], "").await;
    let table = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/routes-1.58.2.tsv")).unwrap();
    let mut checked = 0;
    let mut failures = Vec::new();
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        let (method, path, class) = (cols[0], cols[1], cols[3]);
        if method == "WS" || method == "ANY" {
            continue; // sockets have their own tests
        }
        if method == "DELETE" && path == "/api/conversations/{conversation_id}" {
            continue; // checked last
        }
        let p = concrete(path, &conv);
        let expect = expectation(method, path, class);
        let path_only = p.split('?').next().unwrap().to_owned();
        let (home_before, other_before) = (home.request_count_for(&path_only), other.request_count_for(&path_only));
        let mut rb = n.client().request(method.parse().unwrap(), format!("{}{p}", n.url)).header("X-Session-API-Key", CLIENT_KEY);
        if matches!(method, "POST" | "PUT" | "PATCH") {
            rb = rb.header("content-type", "application/json").body("{}");
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let (home_after, other_after) = (home.request_count_for(&path_only), other.request_count_for(&path_only));
        if class.starts_with("GLOBAL-AGGREGATE") {
            // Answered from nestor's catalog, which may refresh from every downstream
            // (the batch read without `ids` is a 422, like upstream).
            if status != 200 && !(path == "/api/conversations" && status == 422) {
                failures.push(format!("{method} {path}: catalog answered {status}"));
            }
            checked += 1;
            continue;
        }
        let went = match (home_after > home_before, other_after > other_before) {
            (false, false) => Expect::Nestor,
            (true, false) => Expect::Home,
            (false, true) => Expect::Conversation,
            (true, true) => {
                failures.push(format!("{method} {path}: reached both downstreams"));
                continue;
            }
        };
        if went != expect {
            failures.push(format!("{method} {path} ({class}): expected {expect:?}, went {went:?} (status {status})"));
        }
        // `POST /api/init` takes the init key (X-Init-API-Key), not a client key: the
        // agent-server answers 401 to a session key, and so does nestor (routes::home).
        if status == 401 && path != "/api/init" {
            failures.push(format!("{method} {path}: 401 with a valid key"));
        }
        if class.starts_with("GLOBAL-WORKSPACE") && status != 400 {
            failures.push(format!("{method} {path}: unaddressed host-global route answered {status}, not 400"));
        }
        checked += 1;
    }
    assert!(failures.is_empty(), "{} of {checked} routes misrouted:\n{}", failures.len(), failures.join("\n"));
    assert!(checked > 170, "only {checked} routes checked");

    // The conversation's delete reaches its downstream and removes it there.
    let r = n.delete(&format!("/api/conversations/{conv}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(!other.conversation_ids().iter().any(|u| u.to_string() == conv));
    // What the routes above created there (a fork) is what nestor lists.
    let v: Value = n.get("/api/conversations/count").send().await.unwrap().json().await.unwrap();
    assert_eq!(v, serde_json::json!(other.conversation_count() + home.conversation_count()));
    n.stop().await;
}

#[tokio::test]
async fn openai_gateway_routes_by_conversation_header() {
    let (home, other) = (fake(0).await, fake(1).await);
    let conv = other.create_conversation(None, create_body(None))["id"].as_str().unwrap().to_owned();
    let n = nestor_existing(&[&home, &other], "").await;
    let before = other.request_count_for("/v1/chat/completions");
    // Bearer auth is accepted on /v1, like the agent-server.
    let r = n
        .client()
        .post(format!("{}/v1/chat/completions", n.url))
        .header("Authorization", format!("Bearer {CLIENT_KEY}"))
        .header("X-OpenHands-ServerConversation-ID", &conv)
        .json(&serde_json::json!({"model": "x", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 401);
    assert_eq!(other.request_count_for("/v1/chat/completions"), before + 1);
    let r = n
        .client()
        .post(format!("{}/v1/chat/completions", n.url))
        .header("Authorization", "Bearer wrong")
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    n.stop().await;
}

#[tokio::test]
async fn host_global_routes_follow_the_addressing_rules() {
    let (home, other) = (fake(0).await, fake(1).await);
    let conv = other.create_conversation(None, create_body(None))["id"].as_str().unwrap().to_owned();
    let n = nestor_existing(&[&home, &other], "").await;
    let path = "/api/git/changes?path=/somewhere";
    // Unaddressed: a 400 that says how, nothing forwarded.
    let r = n.get(path).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["detail"].as_str().unwrap().contains("X-OpenHands-ServerConversation-ID"), "{v}");
    assert_eq!(home.request_count_for("/api/git/changes") + other.request_count_for("/api/git/changes"), 0);
    // 1. the header
    n.get(path).header("X-OpenHands-ServerConversation-ID", &conv).send().await.unwrap();
    assert_eq!(other.request_count_for("/api/git/changes"), 1);
    // A conversation that is not the caller's (unknown): 404 like an unknown conversation.
    let r = n.get(path).header("X-OpenHands-ServerConversation-ID", uuid::Uuid::new_v4().to_string()).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // 2. a conversation key
    let key: Value = n.post(&format!("/api/conversations/{conv}/runtime/credentials")).send().await.unwrap().json().await.unwrap();
    let key = key["session_api_key"].as_str().unwrap().to_owned();
    let r = n.client().get(format!("{}{path}", n.url)).header("X-Session-API-Key", &key).send().await.unwrap();
    assert_ne!(r.status(), 401);
    assert_eq!(other.request_count_for("/api/git/changes"), 2);
    // ... which opens only its conversation: not the catalog, not the settings.
    let r = n.client().get(format!("{}/api/conversations/search", n.url)).header("X-Session-API-Key", &key).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = n.client().get(format!("{}/api/settings", n.url)).header("X-Session-API-Key", &key).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = n.client().get(format!("{}/api/conversations/{conv}", n.url)).header("X-Session-API-Key", &key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // 3. a path inside the conversation's working directory
    let wd = other.conversation(uuid::Uuid::parse_str(&conv).unwrap()).unwrap()["workspace"]["working_dir"].as_str().unwrap().to_owned();
    n.get(&format!("/api/git/changes?path={wd}/src")).send().await.unwrap();
    assert_eq!(other.request_count_for("/api/git/changes"), 3);
    // Deleting the conversation revokes its key.
    n.delete(&format!("/api/conversations/{conv}")).send().await.unwrap();
    let r = n.client().get(format!("{}{path}", n.url)).header("X-Session-API-Key", &key).send().await.unwrap();
    assert_eq!(r.status(), 401);
    n.stop().await;
}
