//! REST behaviour of the fake, checked against what a real agent-server 1.58.2 answered.

mod common;

use common::*;
use nestor_test_support::{FakeAgentServer, FakeConfig};
use serde_json::{json, Value};
use uuid::Uuid;

fn keys(v: &Value) -> Vec<String> {
    v.as_object().expect("object").keys().cloned().collect()
}

#[tokio::test]
async fn health_routes_are_public() {
    let srv = start().await;
    let h = http(&srv).without_key();
    assert_eq!(h.get("/alive").await, (200, json!({"status": "ok"})));
    assert_eq!(h.get("/health").await, (200, json!({"status": "ok"})));
    assert_eq!(h.get("/ready").await, (200, json!({"status": "ready"})));
    let (s, info) = h.get("/server_info").await;
    assert_eq!(s, 200);
    assert_eq!(info["version"], "1.58.2");
    assert_eq!(info["title"], "OpenHands Agent Server");
    let caps: Vec<&str> = info["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(caps.contains(&"conversation_runtime_routes_v1"));
    assert!(caps.contains(&"idempotent_conversation_create_v1"));
    assert!(info["uptime"].is_f64());
    let (s, root) = h.get("/").await;
    assert_eq!((s, root["version"].clone()), (200, json!("1.58.2")));
}

#[tokio::test]
async fn auth_404_405_and_check_order() {
    let srv = start().await;
    let h = http(&srv);
    let anon = h.without_key();
    let bad = Http {
        key: Some("wrong".into()),
        ..http(&srv)
    };
    let id = h.create(&create_body()).await;
    assert_eq!(
        anon.get(&format!("/api/conversations/{id}")).await,
        (401, json!({"detail": "Unauthorized"}))
    );
    assert_eq!(
        bad.get(&format!("/api/conversations/{id}")).await,
        (401, json!({"detail": "Unauthorized"}))
    );
    // Auth comes before path validation...
    assert_eq!(bad.get("/api/conversations/xyz").await.0, 401);
    // ...but after route matching and JSON decoding (FastAPI order).
    assert_eq!(
        bad.get("/api/nope").await,
        (404, json!({"detail": "Not Found"}))
    );
    let (s, body) = bad.post_raw("/api/conversations", "{x").await;
    assert_eq!(s, 422);
    assert_eq!(
        body,
        json!({"detail": [{"type": "json_invalid", "loc": ["body", 1], "msg": "JSON decode error", "input": {}, "ctx": {"error": "Expecting property name enclosed in double quotes"}}]})
    );
    let client = reqwest::Client::new();
    let r = client
        .put(format!("{}/api/conversations/search", srv.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"detail": "Method Not Allowed"})
    );
    // No key configured: no auth at all.
    let open = FakeAgentServer::start(FakeConfig::default()).await.unwrap();
    assert_eq!(
        http(&open)
            .without_key()
            .get("/api/conversations/count")
            .await,
        (200, json!(0))
    );
    // Extra keys are accepted too (rotation).
    let rot = FakeAgentServer::start(FakeConfig {
        extra_session_api_keys: vec!["second".into()],
        ..fast_config()
    })
    .await
    .unwrap();
    let second = Http {
        key: Some("second".into()),
        ..http(&rot)
    };
    assert_eq!(second.get("/api/conversations/count").await.0, 200);
}

#[tokio::test]
async fn create_shapes_and_idempotence() {
    let srv = start().await;
    let h = http(&srv);
    let cid = Uuid::new_v4();
    let mut body = create_body();
    body["conversation_id"] = json!(cid.to_string());
    body["tags"] = json!({"a": "b"});
    let (s, info) = h.post("/api/conversations", &body).await;
    assert_eq!(s, 201);
    // Field names and order of a real 1.58.2 ConversationInfo.
    let real: Value =
        serde_json::from_str(include_str!("fixtures/real_conversation_info.json")).unwrap();
    assert_eq!(keys(&info), keys(&real));
    assert_eq!(keys(&info["agent"]), keys(&real["agent"]));
    assert_eq!(keys(&info["agent"]["llm"]), keys(&real["agent"]["llm"]));
    assert_eq!(info["id"], json!(cid.to_string()));
    assert_eq!(
        info["workspace"],
        json!({"working_dir": "/tmp/ws", "kind": "LocalWorkspace"})
    );
    assert_eq!(
        info["persistence_dir"],
        json!(format!("workspace/conversations/{}", cid.simple()))
    );
    assert_eq!(info["execution_status"], "idle");
    assert_eq!(info["runtime_info"], Value::Null);
    assert_eq!(
        info["agent"]["llm"]["api_key"],
        Value::Null,
        "secrets are not echoed"
    );
    assert_eq!(info["agent"]["llm"]["num_retries"], 5);
    assert_eq!(
        info["tool_module_qualnames"],
        json!({"terminal": "openhands.tools.terminal.definition"})
    );
    assert_eq!(info["tags"], json!({"a": "b"}));
    let created = info["created_at"].as_str().unwrap();
    assert!(created.ends_with('Z') && created.len() >= 20, "{created}");
    // Same id again: 200, existing conversation, new body ignored.
    body["tags"] = json!({"c": "d"});
    let (s, again) = h.post("/api/conversations", &body).await;
    assert_eq!(s, 200);
    assert_eq!(again["tags"], json!({"a": "b"}));
    // GET adds runtime_info.
    let (s, got) = h.get(&format!("/api/conversations/{cid}")).await;
    assert_eq!(s, 200);
    assert_eq!(
        got["runtime_info"],
        json!({"runtime_status": "available", "can_resume": true, "runtime_error": null})
    );
    assert_eq!(keys(&got), keys(&real));
    // Without an id one is minted.
    let (s, minted) = h.post("/api/conversations", &create_body()).await;
    assert_eq!(s, 201);
    assert_ne!(minted["id"], json!(cid.to_string()));
    assert_eq!(srv.conversation_count(), 2);
}

#[tokio::test]
async fn create_validation_errors_match_fastapi() {
    let srv = start().await;
    let h = http(&srv);
    assert_eq!(
        h.post("/api/conversations", &json!({})).await,
        (
            422,
            json!({"detail": [{"type": "missing", "loc": ["body", "workspace"], "msg": "Field required", "input": {}}]})
        )
    );
    let (s, b) = h
        .post(
            "/api/conversations",
            &json!({"agent": {"kind": "Agent", "llm": {"model": "m", "api_key": "secret"}}}),
        )
        .await;
    assert_eq!(s, 422);
    assert_eq!(
        b,
        json!({"detail": [{"type": "missing", "loc": ["body", "workspace"], "msg": "Field required",
            "input": {"agent": {"kind": "Agent", "llm": {"model": "m", "api_key": "<redacted>"}}, "agent_settings": null}}]})
    );
    let (s, b) = h.post("/api/conversations", &json!({"agent": {}})).await;
    assert_eq!(s, 422);
    assert_eq!(b["detail"][1]["type"], "value_error");
    assert_eq!(b["detail"][1]["loc"], json!(["body", "agent"]));
    assert_eq!(
        b["detail"][1]["msg"],
        "Value error, Unknown kind '' for openhands.sdk.agent.base.AgentBase; Expected one of: ['ACPAgent', 'Agent']"
    );
    let (s, b) = h
        .post(
            "/api/conversations",
            &json!({"workspace": {"working_dir": "/w"}}),
        )
        .await;
    assert_eq!(s, 422);
    assert_eq!(
        b["detail"][0]["msg"],
        "Value error, One of `agent`, `agent_settings`, or `agent_profile_id` must be provided"
    );
    assert_eq!(
        h.post("/api/conversations", &json!([])).await,
        (
            422,
            json!({"detail": [{"type": "model_attributes_type", "loc": ["body"], "msg": "Input should be a valid dictionary or object to extract fields from", "input": []}]})
        )
    );
    assert_eq!(
        h.post_empty("/api/conversations").await,
        (
            422,
            json!({"detail": [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": null}]})
        )
    );
    let mut bad_id = create_body();
    bad_id["conversation_id"] = json!("nope");
    let (s, b) = h.post("/api/conversations", &bad_id).await;
    assert_eq!(
        (
            s,
            b["detail"][0]["type"].clone(),
            b["detail"][0]["loc"].clone()
        ),
        (
            422,
            json!("uuid_parsing"),
            json!(["body", "conversation_id"])
        )
    );
    let mut docker = create_body();
    docker["conversation_runtime"] = json!("docker");
    assert_eq!(
        h.post("/api/conversations", &docker).await,
        (
            422,
            json!({"detail": "This server only runs local conversations"})
        )
    );
    assert_eq!(srv.conversation_count(), 0);
}

#[tokio::test]
async fn get_patch_delete() {
    let srv = start().await;
    let h = http(&srv);
    assert_eq!(
        h.get("/api/conversations/xyz").await,
        (
            422,
            json!({"detail": [{"type": "uuid_parsing", "loc": ["path", "conversation_id"], "msg": "Input should be a valid UUID, invalid character: found `x` at 0", "input": "xyz", "ctx": {"error": "invalid character: found `x` at 0"}}]})
        )
    );
    let unknown = Uuid::new_v4();
    assert_eq!(
        h.get(&format!("/api/conversations/{unknown}")).await,
        (404, json!({"detail": "Not Found"}))
    );
    // Every form pydantic accepts.
    let id = h.create(&create_body()).await;
    assert_eq!(
        h.get(&format!("/api/conversations/{}", id.simple()))
            .await
            .0,
        200
    );

    let path = format!("/api/conversations/{id}");
    assert_eq!(
        h.patch(&path, &json!({"title": "  hello  "})).await,
        (200, json!({"success": true}))
    );
    assert_eq!(h.get(&path).await.1["title"], "hello");
    let (s, b) = h.patch(&path, &json!({"title": ""})).await;
    assert_eq!(
        (s, b),
        (
            422,
            json!({"detail": [{"type": "string_too_short", "loc": ["body", "title"], "msg": "String should have at least 1 character", "input": "", "ctx": {"min_length": 1}}]})
        )
    );
    let (s, b) = h.patch(&path, &json!({"title": "   "})).await;
    assert_eq!(
        (s, b),
        (
            422,
            json!({"detail": [{"type": "value_error", "loc": ["body", "title"], "msg": "Value error, title must not be blank", "input": "   ", "ctx": {"error": "title must not be blank"}}]})
        )
    );
    let before = h.get(&path).await.1["updated_at"].clone();
    assert_eq!(h.patch(&path, &json!({"tags": {"x": "y"}})).await.0, 200);
    let after = h.get(&path).await.1;
    assert_eq!(after["tags"], json!({"x": "y"}));
    assert!(after["updated_at"].as_str() > before.as_str());
    // A tags change is also a persisted state update, like on the real server.
    let last = srv.events(id).pop().unwrap();
    assert_eq!(
        (last["key"].clone(), last["value"].clone()),
        (json!("tags"), json!({"x": "y"}))
    );
    assert_eq!(
        h.patch(
            &format!("/api/conversations/{unknown}"),
            &json!({"title": "q"})
        )
        .await,
        (404, json!({"detail": "Not Found"}))
    );

    assert_eq!(h.delete(&path).await, (200, json!({"success": true})));
    assert_eq!(h.get(&path).await.0, 404);
    assert_eq!(h.delete(&path).await, (404, json!({"detail": "Not Found"})));
}

#[tokio::test]
async fn search_paging_sorting_and_errors() {
    let srv = start().await;
    let h = http(&srv);
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(h.create(&create_body()).await);
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    // Default: CREATED_AT_DESC, pages of `limit`, next_page_id = hex of the next page's first item.
    let (s, p1) = h.get("/api/conversations/search?limit=2").await;
    assert_eq!(s, 200);
    let got: Vec<&str> = p1["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[4].to_string(), ids[3].to_string()]);
    assert_eq!(p1["next_page_id"], json!(ids[2].simple().to_string()));
    assert_eq!(
        p1["items"][0]["runtime_info"]["runtime_status"],
        "available"
    );
    let (_, p2) = h
        .get(&format!(
            "/api/conversations/search?limit=2&page_id={}",
            p1["next_page_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(p2["items"][0]["id"], json!(ids[2].to_string()));
    let (_, p3) = h
        .get(&format!(
            "/api/conversations/search?limit=2&page_id={}",
            p2["next_page_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(p3["items"].as_array().unwrap().len(), 1);
    assert_eq!(p3["next_page_id"], Value::Null);
    // Ascending.
    let (_, asc) = h
        .get("/api/conversations/search?sort_order=CREATED_AT&limit=1")
        .await;
    assert_eq!(asc["items"][0]["id"], json!(ids[0].to_string()));
    // UPDATED_AT_DESC follows activity.
    assert_eq!(
        h.patch(
            &format!("/api/conversations/{}", ids[1]),
            &json!({"title": "t"})
        )
        .await
        .0,
        200
    );
    let (_, upd) = h
        .get("/api/conversations/search?sort_order=UPDATED_AT_DESC&limit=1")
        .await;
    assert_eq!(upd["items"][0]["id"], json!(ids[1].to_string()));
    // Unknown page ids restart from the top.
    let (_, top) = h
        .get("/api/conversations/search?limit=1&page_id=garbage")
        .await;
    assert_eq!(top["items"][0]["id"], json!(ids[4].to_string()));
    // Status filter and count.
    srv.append_event(ids[0], json!({"source": "environment", "key": "execution_status", "value": "finished", "kind": "ConversationStateUpdateEvent"}));
    let (_, fin) = h.get("/api/conversations/search?status=finished").await;
    assert_eq!(fin["items"].as_array().unwrap().len(), 1);
    assert_eq!(h.get("/api/conversations/count").await, (200, json!(5)));
    assert_eq!(
        h.get("/api/conversations/count?status=idle").await,
        (200, json!(4))
    );
    // Errors, word for word.
    assert_eq!(
        h.get("/api/conversations/search?limit=0").await,
        (
            422,
            json!({"detail": [{"type": "greater_than", "loc": ["query", "limit"], "msg": "Input should be greater than 0", "input": "0", "ctx": {"gt": 0}}]})
        )
    );
    assert_eq!(
        h.get("/api/conversations/search?limit=101").await,
        (
            422,
            json!({"detail": [{"type": "less_than_equal", "loc": ["query", "limit"], "msg": "Input should be less than or equal to 100", "input": "101", "ctx": {"le": 100}}]})
        )
    );
    assert_eq!(
        h.get("/api/conversations/search?limit=abc").await,
        (
            422,
            json!({"detail": [{"type": "int_parsing", "loc": ["query", "limit"], "msg": "Input should be a valid integer, unable to parse string as an integer", "input": "abc"}]})
        )
    );
    assert_eq!(
        h.get("/api/conversations/search?sort_order=BAD").await,
        (
            422,
            json!({"detail": [{"type": "enum", "loc": ["query", "sort_order"], "msg": "Input should be 'CREATED_AT', 'UPDATED_AT', 'CREATED_AT_DESC' or 'UPDATED_AT_DESC'", "input": "BAD", "ctx": {"expected": "'CREATED_AT', 'UPDATED_AT', 'CREATED_AT_DESC' or 'UPDATED_AT_DESC'"}}]})
        )
    );
    assert_eq!(
        h.get("/api/conversations/count?status=BAD").await,
        (
            422,
            json!({"detail": [{"type": "enum", "loc": ["query", "status"], "msg": "Input should be 'idle', 'running', 'paused', 'waiting_for_confirmation', 'finished', 'error', 'stuck' or 'deleting'", "input": "BAD", "ctx": {"expected": "'idle', 'running', 'paused', 'waiting_for_confirmation', 'finished', 'error', 'stuck' or 'deleting'"}}]})
        )
    );
}

#[tokio::test]
async fn batch_get_by_ids() {
    let srv = start().await;
    let h = http(&srv);
    let a = h.create(&create_body()).await;
    let b = h.create(&create_body()).await;
    let unknown = Uuid::new_v4();
    let (s, list) = h
        .get(&format!("/api/conversations?ids={b}&ids={unknown}&ids={a}"))
        .await;
    assert_eq!(s, 200);
    assert_eq!(list[0]["id"], json!(b.to_string()));
    assert_eq!(list[1], Value::Null);
    assert_eq!(list[2]["id"], json!(a.to_string()));
    assert_eq!(
        h.get("/api/conversations").await,
        (
            422,
            json!({"detail": [{"type": "missing", "loc": ["query", "ids"], "msg": "Field required", "input": null}]})
        )
    );
    let (s, e) = h.get("/api/conversations?ids=xyz").await;
    assert_eq!(
        (s, e["detail"][0]["loc"].clone()),
        (422, json!(["query", "ids", 0]))
    );
    let many: Vec<String> = (0..100)
        .map(|_| format!("ids={}", Uuid::new_v4()))
        .collect();
    let (s, e) = h
        .get(&format!("/api/conversations?{}", many.join("&")))
        .await;
    assert_eq!(s, 422);
    assert_eq!(e["detail"][0]["type"], "too_long");
    assert_eq!(
        e["detail"][0]["msg"],
        "List should have at most 99 items after validation, not 100"
    );
    assert_eq!(
        e["detail"][0]["ctx"],
        json!({"field_type": "List", "max_length": 99, "actual_length": 100})
    );
    let ok: Vec<String> = (0..99).map(|_| format!("ids={}", Uuid::new_v4())).collect();
    assert_eq!(
        h.get(&format!("/api/conversations?{}", ok.join("&")))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn message_and_scripted_run() {
    let srv = start().await;
    let h = http(&srv);
    let id = h.create(&create_body()).await;
    let base = format!("/api/conversations/{id}");
    let msg = json!({"role": "user", "content": [{"type": "text", "text": "hello\nRUN: echo hi"}], "run": false});
    assert_eq!(
        h.post(&format!("{base}/events"), &msg).await,
        (200, json!({"success": true}))
    );
    let kinds: Vec<String> = srv
        .events(id)
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        [
            "SystemPromptEvent",
            "MessageEvent",
            "ConversationStateUpdateEvent"
        ]
    );
    let ev = srv.events(id);
    assert_eq!(ev[1]["parent_id"], ev[0]["id"]);
    assert_eq!(
        ev[1]["llm_message"]["content"][0],
        json!({"cache_prompt": false, "type": "text", "text": "hello\nRUN: echo hi"})
    );
    assert_eq!(ev[2]["key"], "last_user_message_id");
    assert_eq!(ev[2]["value"], ev[1]["id"]);
    assert_eq!(h.get(&base).await.1["last_user_message_id"], ev[1]["id"]);

    assert_eq!(
        h.post_empty(&format!("{base}/run")).await,
        (200, json!({"success": true}))
    );
    assert_eq!(
        h.post_empty(&format!("{base}/run")).await,
        (
            409,
            json!({"detail": "Conversation already running. Wait for completion or pause first."})
        )
    );
    wait_status(&srv, id, "finished").await;
    let ev = srv.events(id);
    let tail: Vec<(String, Value)> = ev[3..]
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e.get("key").cloned().unwrap_or(Value::Null),
            )
        })
        .collect();
    assert_eq!(
        tail,
        vec![
            (
                "ConversationStateUpdateEvent".into(),
                json!("execution_status")
            ),
            ("ActionEvent".into(), Value::Null),
            ("ObservationEvent".into(), Value::Null),
            ("ActionEvent".into(), Value::Null),
            ("ObservationEvent".into(), Value::Null),
            (
                "ConversationStateUpdateEvent".into(),
                json!("execution_status")
            ),
        ]
    );
    assert_eq!(
        ev[4]["action"]["command"], "echo hi",
        "RUN: line drives the terminal action"
    );
    assert_eq!(ev[5]["observation"]["content"][0]["text"], "hi\n");
    assert_eq!(ev[5]["parent_id"], ev[4]["id"]);
    assert_eq!(ev[6]["action"]["kind"], "FinishAction");
    let (_, fr) = h.get(&format!("{base}/agent_final_response")).await;
    assert_eq!(fr["response"], "Done. The command printed: hi");
    // Timestamps strictly increase, seqs are indexes.
    for w in ev.windows(2) {
        assert!(w[0]["timestamp"].as_str() < w[1]["timestamp"].as_str());
    }
    // run:true on a finished conversation: back to idle, message, run again.
    let msg = json!({"content": [{"type": "text", "text": "again"}], "run": true});
    assert_eq!(h.post(&format!("{base}/events"), &msg).await.0, 200);
    wait_status(&srv, id, "finished").await;
    let n_running = srv
        .events(id)
        .iter()
        .filter(|e| e["key"] == "execution_status" && e["value"] == "running")
        .count();
    assert_eq!(n_running, 2);
    assert!(srv
        .events(id)
        .iter()
        .any(|e| e["key"] == "execution_status" && e["value"] == "idle"));
}

#[tokio::test]
async fn message_validation_and_pause() {
    let srv = start().await;
    let h = http(&srv);
    let id = h.create(&create_body()).await;
    let base = format!("/api/conversations/{id}");
    let (s, b) = h
        .post(
            &format!("{base}/events"),
            &json!({"role": "bogus", "content": []}),
        )
        .await;
    assert_eq!(
        (s, b),
        (
            422,
            json!({"detail": [{"type": "literal_error", "loc": ["body", "role"], "msg": "Input should be 'user', 'system', 'assistant' or 'tool'", "input": "bogus", "ctx": {"expected": "'user', 'system', 'assistant' or 'tool'"}}]})
        )
    );
    let (s, b) = h
        .post(
            &format!("{base}/events"),
            &json!({"content": [{"type": "text"}]}),
        )
        .await;
    assert_eq!(
        (s, b),
        (
            422,
            json!({"detail": [
                {"type": "missing", "loc": ["body", "content", 0, "TextContent", "text"], "msg": "Field required", "input": {"type": "text"}},
                {"type": "literal_error", "loc": ["body", "content", 0, "ImageContent", "type"], "msg": "Input should be 'image'", "input": "text", "ctx": {"expected": "'image'"}},
                {"type": "missing", "loc": ["body", "content", 0, "ImageContent", "image_urls"], "msg": "Field required", "input": {"type": "text"}}
            ]})
        )
    );
    let (s, b) = h
        .post(
            &format!("{base}/events"),
            &json!({"role": "assistant", "content": []}),
        )
        .await;
    assert_eq!(
        (s, b["exception"].clone()),
        (
            500,
            json!("Only user messages are allowed to be sent to the agent.")
        )
    );
    let unknown = Uuid::new_v4();
    assert_eq!(
        h.post(
            &format!("/api/conversations/{unknown}/events"),
            &json!({"content": []})
        )
        .await,
        (
            404,
            json!({"detail": format!("Conversation not found: {unknown}")})
        )
    );
    assert_eq!(
        h.post_empty(&format!("/api/conversations/{unknown}/run"))
            .await,
        (404, json!({"detail": "Not Found"}))
    );
    // Pausing an idle conversation still records it (observed on 1.58.2).
    assert_eq!(
        h.post_empty(&format!("{base}/pause")).await,
        (200, json!({"success": true}))
    );
    let ev = srv.events(id);
    let last2: Vec<&str> = ev[ev.len() - 2..]
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(last2, ["ConversationStateUpdateEvent", "PauseEvent"]);
    assert_eq!(ev.last().unwrap()["parent_id"], "__root__");
    assert_eq!(h.get(&base).await.1["execution_status"], "paused");
    // Pausing a running conversation stops the script.
    let slow = FakeAgentServer::start(FakeConfig {
        step_delay: std::time::Duration::from_millis(200),
        ..fast_config()
    })
    .await
    .unwrap();
    let hs = http(&slow);
    let id = hs.create(&create_body()).await;
    assert_eq!(
        hs.post_empty(&format!("/api/conversations/{id}/run"))
            .await
            .0,
        200
    );
    assert_eq!(slow.execution_status(id).unwrap(), "running");
    assert_eq!(
        hs.post_empty(&format!("/api/conversations/{id}/pause"))
            .await
            .0,
        200
    );
    let n = slow.events(id).len();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(slow.events(id).len(), n, "no events after pause");
    assert_eq!(slow.execution_status(id).unwrap(), "paused");
}

#[tokio::test]
async fn event_search_count_and_get() {
    let srv = FakeAgentServer::start(FakeConfig {
        system_prompt_event: false,
        ..fast_config()
    })
    .await
    .unwrap();
    let h = http(&srv);
    let id = h.create(&create_body()).await;
    for i in 0..7 {
        srv.send_user_message(id, &format!("Message number {i}"), false);
    }
    let base = format!("/api/conversations/{id}/events");
    let all = srv.events(id);
    assert_eq!(all.len(), 14);
    // Paging: page_id is the id of the first item of the next page (inclusive).
    let (s, p1) = h.get(&format!("{base}/search?limit=5")).await;
    assert_eq!(s, 200);
    assert_eq!(p1["items"].as_array().unwrap().len(), 5);
    assert_eq!(p1["next_page_id"], all[5]["id"]);
    let (_, p2) = h
        .get(&format!(
            "{base}/search?limit=5&page_id={}",
            all[5]["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(p2["items"][0], all[5]);
    // Descending.
    let (_, d) = h
        .get(&format!("{base}/search?limit=3&sort_order=TIMESTAMP_DESC"))
        .await;
    assert_eq!(d["items"][0], all[13]);
    assert_eq!(d["next_page_id"], all[10]["id"]);
    // Filters.
    assert_eq!(h.get(&format!("{base}/count")).await, (200, json!(14)));
    assert_eq!(
        h.get(&format!("{base}/count?kind=MessageEvent")).await,
        (200, json!(7))
    );
    assert_eq!(
        h.get(&format!("{base}/count?source=environment")).await,
        (200, json!(7))
    );
    assert_eq!(
        h.get(&format!("{base}/count?body=NUMBER%203")).await,
        (200, json!(1))
    );
    let ts = all[4]["timestamp"].as_str().unwrap();
    assert_eq!(
        h.get(&format!("{base}/count?timestamp__gte={ts}")).await,
        (200, json!(10))
    );
    assert_eq!(
        h.get(&format!("{base}/count?timestamp__lt={ts}")).await,
        (200, json!(4))
    );
    assert_eq!(
        h.get(&format!("{base}/count?timestamp__gte={ts}Z")).await,
        (200, json!(10)),
        "aware values are converted to local"
    );
    let (_, f) = h
        .get(&format!("{base}/search?kind=MessageEvent&limit=2"))
        .await;
    assert_eq!(f["next_page_id"], all[4]["id"]);
    // Single event, batch by ids.
    let eid = all[3]["id"].as_str().unwrap();
    assert_eq!(h.get(&format!("{base}/{eid}")).await, (200, all[3].clone()));
    assert_eq!(
        h.get(&format!("{base}/nope")).await,
        (404, json!({"detail": "Not Found"}))
    );
    assert_eq!(
        h.get_with_body(&base, &json!([eid, "nope"])).await,
        (200, json!([all[3].clone(), null]))
    );
    // Errors.
    assert_eq!(
        h.get(&format!("{base}/search?sort_order=X")).await,
        (
            422,
            json!({"detail": [{"type": "enum", "loc": ["query", "sort_order"], "msg": "Input should be 'TIMESTAMP' or 'TIMESTAMP_DESC'", "input": "X", "ctx": {"expected": "'TIMESTAMP' or 'TIMESTAMP_DESC'"}}]})
        )
    );
    assert_eq!(
        h.get(&format!("{base}/search?timestamp__gte=yesterday"))
            .await,
        (
            422,
            json!({"detail": [{"type": "datetime_from_date_parsing", "loc": ["query", "timestamp__gte"], "msg": "Input should be a valid datetime or date, input is too short", "input": "yesterday", "ctx": {"error": "input is too short"}}]})
        )
    );
    let unknown = Uuid::new_v4();
    assert_eq!(
        h.get(&format!(
            "/api/conversations/{unknown}/events/search?limit=0"
        ))
        .await,
        (
            404,
            json!({"detail": format!("Conversation not found: {unknown}")})
        ),
        "the conversation dependency runs before query validation"
    );
}

#[tokio::test]
async fn initial_message_fork_and_children() {
    let srv = start().await;
    let h = http(&srv);
    let mut body = create_body();
    body["initial_message"] =
        json!({"role": "user", "content": [{"type": "text", "text": "hi there"}]});
    let (s, info) = h.post("/api/conversations", &body).await;
    assert_eq!(s, 201);
    let id = Uuid::parse_str(info["id"].as_str().unwrap()).unwrap();
    // The real server runs the initial message even without `run: true`.
    wait_status(&srv, id, "finished").await;
    let src_events = srv.events(id);

    let (s, fork) = h
        .post(
            &format!("/api/conversations/{id}/fork"),
            &json!({"title": "T", "tags": {"k": "v"}}),
        )
        .await;
    assert_eq!(s, 201);
    let fid = Uuid::parse_str(fork["id"].as_str().unwrap()).unwrap();
    assert_eq!(fork["forked_from_conversation_id"], json!(id.to_string()));
    assert_eq!(fork["execution_status"], "idle");
    assert_eq!(fork["title"], "T");
    assert_eq!(fork["tags"], json!({"k": "v"}));
    assert_eq!(fork["runtime_info"], Value::Null);
    assert_eq!(srv.events(fid), src_events, "same ids and timestamps");
    assert_eq!(
        h.post(
            &format!("/api/conversations/{id}/fork"),
            &json!({"id": fid.to_string()})
        )
        .await,
        (
            409,
            json!({"detail": format!("Conversation with id {fid} already exists")})
        )
    );
    assert_eq!(
        h.post(
            &format!("/api/conversations/{id}/fork"),
            &json!({"from_event_id": "nope"})
        )
        .await,
        (404, json!({"detail": "Unknown from_event_id: nope"}))
    );
    assert_eq!(
        h.post(
            &format!("/api/conversations/{}/fork", Uuid::new_v4()),
            &json!({})
        )
        .await,
        (404, json!({"detail": "Source conversation not found"}))
    );
    let cut = src_events[1]["id"].as_str().unwrap();
    let (s, partial) = h.post_empty(&format!("/api/conversations/{id}/fork")).await;
    assert_eq!(s, 201, "no body is fine");
    let _ = partial;
    let (_, partial) = h
        .post(
            &format!("/api/conversations/{id}/fork"),
            &json!({"from_event_id": cut}),
        )
        .await;
    let pid = Uuid::parse_str(partial["id"].as_str().unwrap()).unwrap();
    assert_eq!(srv.events(pid).len(), 2);
    assert_eq!(partial["forked_from_event_id"], json!(cut));

    let (s, child) = h
        .post(
            &format!("/api/conversations/{id}/children"),
            &json!({"task": "do x", "isolation": "shared"}),
        )
        .await;
    assert_eq!(s, 201);
    assert_eq!(
        keys(&child),
        [
            "conversation_id",
            "parent_conversation_id",
            "status",
            "title",
            "url",
            "workspace",
            "isolation"
        ]
    );
    assert_eq!(child["status"], "idle");
    assert_eq!(child["workspace"], "/tmp/ws");
    let cid = Uuid::parse_str(child["conversation_id"].as_str().unwrap()).unwrap();
    assert_eq!(
        h.get(&format!("/api/conversations/{id}")).await.1["sub_conversation_ids"],
        json!([cid.to_string()])
    );
    assert_eq!(
        h.get(&format!("/api/conversations/{cid}")).await.1["parent_conversation_id"],
        json!(id.to_string())
    );
    wait_status(&srv, cid, "finished").await;
    assert_eq!(
        h.post(&format!("/api/conversations/{id}/children"), &json!({}))
            .await,
        (
            422,
            json!({"detail": [{"type": "missing", "loc": ["body", "task"], "msg": "Field required", "input": {}}]})
        )
    );
    assert_eq!(
        h.post(
            &format!("/api/conversations/{}/children", Uuid::new_v4()),
            &json!({"task": "x"})
        )
        .await,
        (404, json!({"detail": "Parent conversation not found"}))
    );
    assert_eq!(
        h.get(&format!("/api/conversations/{id}/runtime")).await,
        (
            200,
            json!({"runtime_status": "available", "can_resume": true, "runtime_error": null})
        )
    );
}

#[tokio::test]
async fn direct_seeding_api() {
    let srv = start().await;
    let id = Uuid::new_v4();
    let info = srv.create_conversation(Some(id), json!({"tags": {"seed": "1"}}));
    assert_eq!(info["id"], json!(id.to_string()));
    assert_eq!(info["workspace"]["kind"], "LocalWorkspace");
    let s0 = srv.append_event(id, json!({"source": "user", "kind": "MessageEvent", "llm_message": {"role": "user", "content": []}}));
    let s1 = srv.append_event(id, json!({"id": "custom-id", "timestamp": "2030-01-01T00:00:00.000001", "source": "agent", "kind": "PauseEvent"}));
    assert_eq!((s0, s1), (0, 1));
    let ev = srv.events(id);
    assert_eq!(keys(&ev[0])[..3], ["id", "timestamp", "source"]);
    assert_eq!(ev[1]["id"], "custom-id");
    // Generated timestamps stay after the last one, even an explicit future one.
    srv.append_event(id, json!({"source": "user", "kind": "PauseEvent"}));
    assert!(srv.events(id)[2]["timestamp"].as_str().unwrap() > "2030-01-01T00:00:00.000001");
    let h = http(&srv);
    assert_eq!(
        h.get(&format!("/api/conversations/{id}/events/custom-id"))
            .await
            .0,
        200
    );
    assert_eq!(
        h.get(&format!("/api/conversations/{id}")).await.1["leaf_event_id"],
        json!(srv.events(id)[2]["id"])
    );
}
