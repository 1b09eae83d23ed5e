//! Both sockets: authentication paths and close codes, first frames, resend modes, the
//! session socket's envelopes, inbound messages — per api.md §2.3/§4.1/§4.2 and the captured
//! frames of a real 1.58.2.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use nestor_test_support::{FakeAgentServer, FakeConfig, TimestampMode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

fn keys(v: &Value) -> Vec<String> {
    v.as_object().expect("object").keys().cloned().collect()
}

async fn conv(srv: &FakeAgentServer) -> Uuid {
    http(srv).create(&create_body()).await
}

#[tokio::test]
async fn auth_paths_and_close_codes() {
    let srv = FakeAgentServer::start(FakeConfig {
        auth_timeout: Duration::from_millis(300),
        ..fast_config()
    })
    .await
    .unwrap();
    let id = conv(&srv).await;
    let base = format!("{}/sockets/events/{id}", srv.ws_url());

    // Query key: good → first frame; bad or empty → HTTP 403 before the upgrade.
    let mut ws = ws_connect(&format!("{base}?session_api_key={KEY}"), None)
        .await
        .unwrap();
    assert!(is_full_state(&must_json(&mut ws).await));
    for q in ["?session_api_key=bad", "?session_api_key="] {
        let e = ws_connect(&format!("{base}{q}"), None).await.unwrap_err();
        assert_eq!(http_status(&e), Some(403), "{q}");
    }
    // Header key.
    let mut ws = ws_connect(&base, Some(KEY)).await.unwrap();
    assert!(is_full_state(&must_json(&mut ws).await));
    assert_eq!(
        http_status(&ws_connect(&base, Some("bad")).await.unwrap_err()),
        Some(403)
    );
    // First-message auth.
    let mut ws = ws_connect(&base, None).await.unwrap();
    send_json(&mut ws, &json!({"type": "auth", "session_api_key": KEY})).await;
    assert!(is_full_state(&must_json(&mut ws).await));
    for bad in [
        json!({"type": "auth", "session_api_key": "x"}),
        json!({"type": "other", "session_api_key": KEY}),
        json!([1]),
        json!("hello"),
    ] {
        let mut ws = ws_connect(&base, None).await.unwrap();
        send_json(&mut ws, &bad).await;
        assert_eq!(
            until_end(&mut ws).await,
            End::Close(4001, "Authentication failed".into()),
            "{bad}"
        );
    }
    let mut ws = ws_connect(&base, None).await.unwrap();
    ws.send(Message::Text("not json".into())).await.unwrap();
    assert_eq!(
        until_end(&mut ws).await,
        End::Close(4001, "Authentication failed".into())
    );
    // Silence → 4001 after the auth timeout.
    let mut ws = ws_connect(&base, None).await.unwrap();
    assert_eq!(
        until_end(&mut ws).await,
        End::Close(4001, "Authentication failed".into())
    );
    // Unknown conversation → 4004 (after auth), for both sockets and both auth styles.
    for path in ["events", "session"] {
        let url = format!("{}/sockets/{path}/{}", srv.ws_url(), Uuid::new_v4());
        let mut ws = ws_connect(&format!("{url}?session_api_key={KEY}"), None)
            .await
            .unwrap();
        assert_eq!(
            until_end(&mut ws).await,
            End::Close(4004, "Conversation not found".into())
        );
        let mut ws = ws_connect(&url, None).await.unwrap();
        send_json(&mut ws, &json!({"type": "auth", "session_api_key": KEY})).await;
        assert_eq!(
            until_end(&mut ws).await,
            End::Close(4004, "Conversation not found".into())
        );
    }
    // Invalid parameters → 403 before anything else.
    for q in [
        "/sockets/events/xyz",
        "/sockets/events/{id}?resend_mode=bogus",
        "/sockets/events/{id}?resend_mode=since&after_timestamp=zzz",
        "/sockets/session/{id}?after_seq=abc",
    ] {
        let url = format!("{}{}", srv.ws_url(), q.replace("{id}", &id.to_string()));
        let sep = if url.contains('?') { '&' } else { '?' };
        let e = ws_connect(&format!("{url}{sep}session_api_key={KEY}"), None)
            .await
            .unwrap_err();
        assert_eq!(http_status(&e), Some(403), "{q}");
    }
    // A plain GET on a socket path is a 404, like Starlette.
    let r = reqwest::get(format!("{}/sockets/events/{id}", srv.url()))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[tokio::test]
async fn no_keys_configured_accepts_everything() {
    let srv = FakeAgentServer::start(FakeConfig::default()).await.unwrap();
    let id = http(&srv).without_key().create(&create_body()).await;
    let mut ws = ws_connect(
        &format!(
            "{}/sockets/events/{id}?session_api_key=whatever",
            srv.ws_url()
        ),
        None,
    )
    .await
    .unwrap();
    assert!(is_full_state(&must_json(&mut ws).await));
    // A later auth frame is silently ignored.
    send_json(&mut ws, &json!({"type": "auth", "session_api_key": "x"})).await;
    assert!(next_json(&mut ws, Duration::from_millis(200))
        .await
        .is_none());
}

#[tokio::test]
async fn events_socket_snapshot_history_and_live() {
    let srv = start().await;
    let id = conv(&srv).await;
    srv.send_user_message(id, "one", false);
    let history = srv.events(id);
    assert_eq!(history.len(), 3);

    // Live only: the snapshot, nothing else.
    let mut live = ws_open(&srv, &format!("/sockets/events/{id}")).await;
    let snap = must_json(&mut live).await;
    assert!(is_full_state(&snap));
    let real: Vec<Value> =
        serde_json::from_str(include_str!("fixtures/real_events_socket_plain.json")).unwrap();
    assert_eq!(keys(&snap), keys(&real[0]), "full_state event keys");
    let snap_keys = keys(&snap["value"]);
    for k in [
        "id",
        "agent",
        "workspace",
        "persistence_dir",
        "execution_status",
        "stats",
        "secret_registry",
        "tags",
        "agent_state",
    ] {
        assert!(snap_keys.contains(&k.to_owned()), "{k}");
    }
    assert_eq!(snap["value"]["agent"]["llm"]["api_key"], "**********");
    assert!(
        snap["value"]["agent"]["llm"].get("temperature").is_none(),
        "exclude_none"
    );
    assert_eq!(snap["value"]["last_user_message_id"], history[1]["id"]);
    assert!(next_json(&mut live, Duration::from_millis(100))
        .await
        .is_none());

    // resend_mode=all and the deprecated resend_all=true: snapshot, then the whole log.
    for q in ["resend_mode=all", "resend_all=true"] {
        let mut ws = ws_open(&srv, &format!("/sockets/events/{id}?{q}")).await;
        assert!(is_full_state(&must_json(&mut ws).await));
        for h in &history {
            assert_eq!(&must_json(&mut ws).await, h, "{q}");
        }
    }
    // since: timestamp >= after_timestamp, inclusive.
    let ts = history[1]["timestamp"].as_str().unwrap();
    let mut ws = ws_open(
        &srv,
        &format!("/sockets/events/{id}?resend_mode=since&after_timestamp={ts}"),
    )
    .await;
    assert!(is_full_state(&must_json(&mut ws).await));
    assert_eq!(must_json(&mut ws).await, history[1]);
    assert_eq!(must_json(&mut ws).await, history[2]);
    // since without a timestamp resends nothing.
    let mut ws = ws_open(&srv, &format!("/sockets/events/{id}?resend_mode=since")).await;
    assert!(is_full_state(&must_json(&mut ws).await));
    assert!(next_json(&mut ws, Duration::from_millis(100))
        .await
        .is_none());

    // Live: an appended event arrives as the bare event JSON; a transient too.
    srv.append_event(id, json!({"source": "agent", "kind": "PauseEvent"}));
    let appended = srv.events(id).pop().unwrap();
    assert_eq!(must_json(&mut live).await, appended);
    srv.publish_transient(
        id,
        json!({"source": "agent", "content": "tok", "kind": "StreamingDeltaEvent"}),
    );
    let t = must_json(&mut live).await;
    assert_eq!(
        (t["kind"].clone(), t["content"].clone()),
        (json!("StreamingDeltaEvent"), json!("tok"))
    );
    assert_eq!(
        srv.events(id).len(),
        4,
        "transient events are not persisted"
    );
}

#[tokio::test]
async fn since_is_inclusive_with_equal_timestamps() {
    let srv = FakeAgentServer::start(FakeConfig {
        timestamps: TimestampMode::Repeat(3),
        system_prompt_event: false,
        ..fast_config()
    })
    .await
    .unwrap();
    let id = conv(&srv).await;
    for _ in 0..6 {
        srv.append_event(id, json!({"source": "agent", "kind": "PauseEvent"}));
    }
    let ev = srv.events(id);
    assert_eq!(ev[0]["timestamp"], ev[2]["timestamp"]);
    assert_ne!(ev[2]["timestamp"], ev[3]["timestamp"]);
    assert_eq!(ev[3]["timestamp"], ev[5]["timestamp"]);
    // Anchored on event 4's timestamp, the replay starts at event 3 (same timestamp).
    let ts = ev[4]["timestamp"].as_str().unwrap();
    let mut ws = ws_open(
        &srv,
        &format!("/sockets/events/{id}?resend_mode=since&after_timestamp={ts}"),
    )
    .await;
    assert!(is_full_state(&must_json(&mut ws).await));
    let replay: Vec<Value> = vec![
        must_json(&mut ws).await,
        must_json(&mut ws).await,
        must_json(&mut ws).await,
    ];
    assert_eq!(replay, ev[3..6].to_vec());
    assert!(next_json(&mut ws, Duration::from_millis(100))
        .await
        .is_none());
}

#[tokio::test]
async fn inbound_messages_start_runs_and_errors_are_reported() {
    let srv = start().await;
    let id = conv(&srv).await;
    let mut ws = ws_open(&srv, &format!("/sockets/events/{id}")).await;
    assert!(is_full_state(&must_json(&mut ws).await));
    // Garbage: a ServerErrorEvent, socket stays open.
    ws.send(Message::Text("notjson".into())).await.unwrap();
    let e = must_json(&mut ws).await;
    assert_eq!(
        keys(&e),
        ["id", "timestamp", "source", "code", "detail", "kind"]
    );
    assert_eq!(
        (e["kind"].clone(), e["code"].clone()),
        (json!("ServerErrorEvent"), json!("JSONDecodeError"))
    );
    assert_eq!(e["detail"], "Expecting value: line 1 column 1 (char 0)");
    send_json(&mut ws, &json!([1, 2])).await;
    let e = must_json(&mut ws).await;
    assert_eq!(e["code"], "ValidationError");
    assert!(e["detail"].as_str().unwrap().starts_with("1 validation error for Message\n  Input should be a valid dictionary or instance of Message [type=model_type, input_value=[1, 2], input_type=list]"));
    send_json(&mut ws, &json!({"role": "nope"})).await;
    assert_eq!(must_json(&mut ws).await["code"], "ValidationError");
    // The auth frame is ignored after auth.
    send_json(&mut ws, &json!({"type": "auth", "session_api_key": KEY})).await;
    // A Message is appended and run: the whole run streams by, ending with full_state.
    send_json(
        &mut ws,
        &json!({"role": "user", "content": [{"type": "text", "text": "go"}]}),
    )
    .await;
    let frames = frames_until(&mut ws, is_full_state).await;
    let sig: Vec<String> = frames
        .iter()
        .map(|f| {
            format!(
                "{}{}",
                f["kind"].as_str().unwrap(),
                f.get("key")
                    .map(|k| format!(":{}", k.as_str().unwrap()))
                    .unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        sig,
        [
            "SystemPromptEvent",
            "MessageEvent",
            "ConversationStateUpdateEvent:last_user_message_id",
            "ConversationStateUpdateEvent:execution_status",
            "ActionEvent",
            "ObservationEvent",
            "ActionEvent",
            "ObservationEvent",
            "ConversationStateUpdateEvent:execution_status",
            "ConversationStateUpdateEvent:full_state",
        ]
    );
    assert_eq!(frames[8]["value"], "finished");
    assert_eq!(frames[9]["value"]["execution_status"], "finished");
    assert_eq!(
        srv.events(id),
        frames[..9].to_vec(),
        "everything but the snapshot is persisted"
    );
    // Shapes follow the captured real run.
    let real: Vec<Value> =
        serde_json::from_str(include_str!("fixtures/real_events_socket_plain.json")).unwrap();
    let find = |kind: &str| real.iter().find(|f| f["kind"] == kind).unwrap().clone();
    assert_eq!(keys(&frames[1]), keys(&find("MessageEvent")));
    assert_eq!(keys(&frames[4]), keys(&find("ActionEvent")));
    assert_eq!(keys(&frames[5]), keys(&find("ObservationEvent")));
    assert_eq!(
        keys(&frames[4]["action"]),
        keys(&find("ActionEvent")["action"])
    );
    assert_eq!(
        keys(&frames[5]["observation"]),
        keys(&find("ObservationEvent")["observation"])
    );
    // Assistant messages are refused like the real server's assertion.
    send_json(&mut ws, &json!({"role": "assistant", "content": []})).await;
    let e = must_json(&mut ws).await;
    assert_eq!(
        (e["code"].clone(), e["detail"].clone()),
        (
            json!("AssertionError"),
            json!("Only user messages are allowed to be sent to the agent.")
        )
    );
}

#[tokio::test]
async fn session_socket_envelopes_and_resume() {
    let srv = start().await;
    let id = conv(&srv).await;
    let path = format!("/sockets/session/{id}");
    // Empty log, full history requested: sync without through_seq, then the snapshot.
    let mut ws = ws_open(&srv, &format!("{path}?after_seq=-1")).await;
    assert_eq!(
        must_json(&mut ws).await,
        json!({"type": "sync", "from_seq": -1})
    );
    let t = must_json(&mut ws).await;
    assert_eq!(t["type"], "transient");
    assert!(is_full_state(&t["event"]));
    drop(ws);

    srv.send_user_message(id, "hello", false);
    let log = srv.events(id);
    // Live only: sync without from_seq.
    let mut live = ws_open(&srv, &path).await;
    assert_eq!(
        must_json(&mut live).await,
        json!({"type": "sync", "through_seq": 2})
    );
    assert_eq!(must_json(&mut live).await["type"], "transient");
    // Full history.
    let mut all = ws_open(&srv, &format!("{path}?after_seq=-1")).await;
    assert_eq!(
        must_json(&mut all).await,
        json!({"type": "sync", "from_seq": -1, "through_seq": 2})
    );
    for (seq, ev) in log.iter().enumerate() {
        assert_eq!(
            must_json(&mut all).await,
            json!({"type": "durable", "seq": seq, "event": ev})
        );
    }
    assert_eq!(must_json(&mut all).await["type"], "transient");
    // Resume after seq 1; and a cursor beyond the end.
    let mut resumed = ws_open(&srv, &format!("{path}?after_seq=1")).await;
    assert_eq!(
        must_json(&mut resumed).await,
        json!({"type": "sync", "from_seq": 1, "through_seq": 2})
    );
    assert_eq!(
        must_json(&mut resumed).await,
        json!({"type": "durable", "seq": 2, "event": log[2]})
    );
    assert_eq!(must_json(&mut resumed).await["type"], "transient");
    let mut beyond = ws_open(&srv, &format!("{path}?after_seq=100")).await;
    assert_eq!(
        must_json(&mut beyond).await,
        json!({"type": "sync", "from_seq": 100, "through_seq": 2})
    );
    assert_eq!(must_json(&mut beyond).await["type"], "transient");

    // Live durable and transient envelopes.
    let seq = srv.append_event(id, json!({"source": "agent", "kind": "PauseEvent"}));
    assert_eq!(seq, 3);
    let ev = srv.events(id).pop().unwrap();
    for ws in [&mut live, &mut all, &mut resumed, &mut beyond] {
        assert_eq!(
            must_json(ws).await,
            json!({"type": "durable", "seq": 3, "event": ev})
        );
    }
    srv.publish_transient(
        id,
        json!({"source": "agent", "content": "x", "kind": "StreamingDeltaEvent"}),
    );
    let t = must_json(&mut live).await;
    assert_eq!(
        (t["type"].clone(), t["event"]["kind"].clone()),
        (json!("transient"), json!("StreamingDeltaEvent"))
    );

    // Inbound errors are `error` envelopes.
    live.send(Message::Text("notjson".into())).await.unwrap();
    assert_eq!(
        must_json(&mut live).await,
        json!({"type": "error", "code": "JSONDecodeError", "detail": "Expecting value: line 1 column 1 (char 0)"})
    );
    // Inbound message → run, seen as durable frames then the post-run transient snapshot.
    send_json(
        &mut live,
        &json!({"role": "user", "content": [{"type": "text", "text": "go"}]}),
    )
    .await;
    let frames = frames_until(&mut live, |f| {
        f["type"] == "transient" && is_full_state(&f["event"])
    })
    .await;
    let seqs: Vec<u64> = frames.iter().filter_map(|f| f["seq"].as_u64()).collect();
    assert_eq!(seqs, (4..4 + seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(frames.len(), seqs.len() + 1);

    // Shapes of the real envelopes.
    let real: Vec<Value> =
        serde_json::from_str(include_str!("fixtures/real_session_socket.json")).unwrap();
    let durable = real.iter().find(|f| f["type"] == "durable").unwrap();
    assert_eq!(keys(&frames[0]), keys(durable));
}

#[tokio::test]
async fn session_history_and_live_never_interleave() {
    // Appends race with connects; every socket must see seqs 0..N exactly once, in order.
    let srv = FakeAgentServer::start(FakeConfig {
        system_prompt_event: false,
        max_subscribers_per_conversation: 100,
        ..fast_config()
    })
    .await
    .unwrap();
    let id = conv(&srv).await;
    let writer = {
        let srv = srv.clone();
        tokio::spawn(async move {
            for i in 0..400 {
                srv.append_event(id, json!({"source": "agent", "kind": "PauseEvent", "n": i}));
                if i % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut sockets = Vec::new();
    for k in 0..20 {
        let after = if k % 2 == 0 {
            "-1".to_owned()
        } else {
            format!("{}", k * 7)
        };
        sockets.push((
            ws_open(&srv, &format!("/sockets/session/{id}?after_seq={after}")).await,
            after.parse::<i64>().unwrap(),
        ));
    }
    writer.await.unwrap();
    for (mut ws, after) in sockets {
        let sync = must_json(&mut ws).await;
        assert_eq!(sync["type"], "sync");
        let mut expected = (after + 1).max(0) as u64;
        let through = sync["through_seq"].as_u64();
        let mut snapshot_seen = false;
        while expected < 400 {
            let f = must_json(&mut ws).await;
            match f["type"].as_str().unwrap() {
                "durable" => {
                    assert_eq!(f["seq"].as_u64().unwrap(), expected);
                    assert_eq!(f["event"]["n"].as_u64().unwrap(), expected);
                    if through.is_some_and(|t| expected <= t) {
                        assert!(
                            !snapshot_seen,
                            "replay comes before the connect-time snapshot"
                        );
                    }
                    expected += 1;
                }
                "transient" => snapshot_seen = true,
                other => panic!("unexpected {other}"),
            }
        }
        assert!(snapshot_seen || through.is_none());
    }
}

#[tokio::test]
async fn subscriber_limit_is_1013() {
    let srv = FakeAgentServer::start(FakeConfig {
        max_subscribers_per_conversation: 2,
        ..fast_config()
    })
    .await
    .unwrap();
    let id = conv(&srv).await;
    let _a = ws_open(&srv, &format!("/sockets/events/{id}")).await;
    let _b = ws_open(&srv, &format!("/sockets/session/{id}")).await;
    eventually("two subscribers", || srv.subscriber_count(id) == 2).await;
    let mut c = ws_open(&srv, &format!("/sockets/events/{id}")).await;
    assert_eq!(
        until_end(&mut c).await,
        End::Close(1013, "Too many connections for this conversation".into())
    );
    drop(_a);
    eventually("one subscriber left", || srv.subscriber_count(id) == 1).await;
    let mut d = ws_open(&srv, &format!("/sockets/events/{id}")).await;
    assert!(is_full_state(&must_json(&mut d).await));
}

#[tokio::test]
async fn slow_consumer_is_dropped_with_1013() {
    let srv = FakeAgentServer::start(FakeConfig {
        subscriber_queue: 4,
        system_prompt_event: false,
        ..fast_config()
    })
    .await
    .unwrap();
    let id = conv(&srv).await;
    let mut ws = ws_open(&srv, &format!("/sockets/session/{id}")).await;
    must_json(&mut ws).await;
    must_json(&mut ws).await;
    // Large frames, published faster than a socket that is not being read can take them.
    let blob = "x".repeat(256 * 1024);
    for _ in 0..64 {
        srv.append_event(
            id,
            json!({"source": "agent", "kind": "PauseEvent", "blob": blob}),
        );
    }
    assert_eq!(
        until_end(&mut ws).await,
        End::Close(1013, "slow_consumer".into())
    );
}

#[tokio::test]
async fn server_pings_open_sockets() {
    let srv = FakeAgentServer::start(FakeConfig {
        ws_ping_interval: Some(Duration::from_millis(50)),
        ..fast_config()
    })
    .await
    .unwrap();
    let id = conv(&srv).await;
    let mut ws = ws_open(&srv, &format!("/sockets/events/{id}")).await;
    must_json(&mut ws).await;
    let got_ping = tokio::time::timeout(Duration::from_secs(2), async {
        use futures_util::StreamExt;
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Ping(_)) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(got_ping);
}

#[tokio::test]
async fn oversized_session_frame_is_1013() {
    let srv = start().await;
    let id = conv(&srv).await;
    let mut session = ws_open(&srv, &format!("/sockets/session/{id}")).await;
    let mut events = ws_open(&srv, &format!("/sockets/events/{id}")).await;
    must_json(&mut session).await;
    must_json(&mut session).await;
    must_json(&mut events).await;
    let blob = "x".repeat(5 * 1024 * 1024);
    srv.append_event(
        id,
        json!({"source": "agent", "kind": "PauseEvent", "blob": blob}),
    );
    assert_eq!(
        until_end(&mut session).await,
        End::Close(1013, "frame_too_large".into())
    );
    // The legacy socket has no such budget.
    assert_eq!(
        must_json(&mut events).await["blob"].as_str().unwrap().len(),
        blob.len()
    );
}
