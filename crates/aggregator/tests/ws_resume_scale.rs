//! nestor's WebSocket resume under fault injection, at scale and in targeted cases, against
//! its in-process server over the fake agent-server.
//!
//! The scale test: 1,000 client sockets through nestor (both socket kinds, with and without
//! history, all three auth ways), while events are appended and the downstream connections
//! are cut at random frame positions (each downstream socket gets its own cut point, the
//! prelude included) and the downstream is restarted on the same port. Every client must
//! receive exactly the persisted events its own request asked for: none lost, none twice,
//! in log order; the session socket's seqs consecutive with a single `sync`. nestor never
//! closes a client.

mod support;
mod ws_common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nestor_test_support::{FakeAgentServer, FakeConfig, Fault};
use serde_json::{json, Value};
use support::{nestor_existing, TestNestor, CLIENT_KEY};
use uuid::Uuid;
use ws_common::*;

/// A small deterministic PRNG (xorshift64*), seeded per test (printed, overridable with
/// `NESTOR_TEST_SEED`).
struct Rng(u64);

impl Rng {
    fn new(default: u64) -> Self {
        let seed = std::env::var("NESTOR_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
        eprintln!("seed {seed} (set NESTOR_TEST_SEED to replay)");
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The fake's naive "local" (UTC) time, `secs_ago` seconds back.
fn naive_ts(secs_ago: i64) -> String {
    let t = time::OffsetDateTime::now_utc() - time::Duration::seconds(secs_ago);
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]");
    t.format(&f).unwrap()
}

fn fake_config() -> FakeConfig {
    FakeConfig {
        max_subscribers_per_conversation: 100_000,
        subscriber_queue: 100_000,
        ws_ping_interval: None,
        system_prompt_event: false,
        ..FakeConfig::with_key("downstream-key-scale-0123")
    }
}

fn is_persisted_event(v: &Value) -> bool {
    let kind = v["kind"].as_str().unwrap_or("");
    !(kind == "StreamingDeltaEvent" || kind == "LLMCompletionLogEvent" || (kind == "ConversationStateUpdateEvent" && v["key"] == "full_state"))
}

/// One persisted event for the generator (kinds the fake does not act on).
fn event(i: usize) -> Value {
    match i % 3 {
        0 => json!({"source": "agent", "kind": "PauseEvent"}),
        1 => json!({"source": "environment", "key": "stats", "value": {"round": i}, "kind": "ConversationStateUpdateEvent"}),
        _ => json!({"source": "agent", "llm_message": {"role": "assistant", "content": [{"type": "text", "text": format!("m{i}")}]}, "kind": "MessageEvent"}),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    EventsLive,
    EventsAll,
    SessionLive,
    SessionAll,
}

impl Variant {
    fn of(i: usize) -> Self {
        [Variant::EventsLive, Variant::EventsAll, Variant::SessionLive, Variant::SessionAll][i % 4]
    }
    fn path(&self, id: Uuid) -> String {
        match self {
            Variant::EventsLive => format!("/sockets/events/{id}"),
            Variant::EventsAll => format!("/sockets/events/{id}?resend_mode=all"),
            Variant::SessionLive => format!("/sockets/session/{id}"),
            Variant::SessionAll => format!("/sockets/session/{id}?after_seq=-1"),
        }
    }
    fn is_session(&self) -> bool {
        matches!(self, Variant::SessionLive | Variant::SessionAll)
    }
}

/// Connect with auth way `i % 3` (header, query, first frame).
async fn open_client(n: &TestNestor, path: &str, i: usize) -> Ws {
    match i % 3 {
        0 => connect(&ws_url(n, path), Some(CLIENT_KEY)).await.unwrap(),
        1 => {
            let sep = if path.contains('?') { '&' } else { '?' };
            connect(&ws_url(n, &format!("{path}{sep}session_api_key={CLIENT_KEY}")), None).await.unwrap()
        }
        _ => {
            let mut ws = connect(&ws_url(n, path), None).await.unwrap();
            send_text(&mut ws, &auth_frame(CLIENT_KEY)).await;
            ws
        }
    }
}

/// What one client received, up to the end marker.
struct Received {
    variant: Variant,
    conv: Uuid,
    frames: Vec<Value>,
    closed: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_sockets_resume_exactly_through_random_drops_and_restarts() {
    const CLIENTS: usize = 1000;
    const CONVS: usize = 20;
    const PRE: usize = 5; // history before the clients subscribe (stamped a minute ago)
    const ROUNDS: usize = 40; // events appended per conversation under faults (~3 s)
    raise_fd_limit();
    // RUST_LOG=nestor_ws_proxy=debug shows every loss, dial failure and resume.
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).try_init();
    let t0 = Instant::now();
    let mut rng = Rng::new(0x5eed_1234);
    let f = FakeAgentServer::start(fake_config()).await.unwrap();
    let n = Arc::new(nestor_existing(&[&f], "[websocket]\nresume_deadline_secs = 60").await);
    let mut convs = Vec::new();
    for _ in 0..CONVS {
        convs.push(create_conversation(&n).await);
    }
    for c in &convs {
        for i in 0..PRE {
            let mut e = event(i);
            e["id"] = json!(Uuid::new_v4().to_string());
            e["timestamp"] = json!(naive_ts(60 - i as i64));
            f.append_event(*c, e);
        }
    }
    // The end marker of each conversation: its id is known up front.
    let end_ids: Arc<HashMap<Uuid, String>> = Arc::new(convs.iter().map(|c| (*c, Uuid::new_v4().to_string())).collect());

    // Clients: connect, signal once subscribed (first frame), read until the end marker.
    let ready = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        if i % 100 == 99 {
            // Connect in waves: nestor's test listener has the standard backlog of 128.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (n, ready, end_ids) = (n.clone(), ready.clone(), end_ids.clone());
        let conv = convs[i % CONVS];
        let variant = Variant::of(i / CONVS);
        tasks.push(tokio::spawn(async move {
            let mut ws = open_client(&n, &variant.path(conv), i).await;
            let end = end_ids[&conv].clone();
            let mut rec = Received { variant, conv, frames: Vec::new(), closed: None };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match next(&mut ws, left).await {
                    Next::Text(t) => {
                        let v: Value = serde_json::from_str(&t).expect("json frame");
                        if rec.frames.is_empty() {
                            ready.fetch_add(1, Ordering::SeqCst);
                        }
                        let ev = if variant.is_session() { &v["event"] } else { &v };
                        let done = ev["id"].as_str() == Some(end.as_str()) && (!variant.is_session() || v["type"] == "durable");
                        rec.frames.push(v);
                        if done {
                            break;
                        }
                    }
                    Next::Closed(code, reason) => {
                        rec.closed = Some(format!("closed {code:?} {reason}"));
                        break;
                    }
                    Next::Timeout => {
                        rec.closed = Some("timed out waiting for the end marker".into());
                        break;
                    }
                }
            }
            rec
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready.load(Ordering::SeqCst) < CLIENTS {
        assert!(Instant::now() < deadline, "only {} of {CLIENTS} clients subscribed", ready.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let subscribed_at = t0.elapsed();
    let upgrades_before = f.socket_requests().len();
    assert_eq!(upgrades_before, CLIENTS, "one downstream socket per client before the faults");

    // Faults and events, concurrently.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let chaos = {
        let (f, stop) = (f.clone(), stop.clone());
        let mut rng = Rng(rng.next() | 1);
        tokio::spawn(async move {
            let (mut restarts, mut windows) = (0u32, 0u32);
            while !stop.load(Ordering::SeqCst) {
                if rng.below(6) == 0 {
                    f.restart().await;
                    restarts += 1;
                } else {
                    f.set_fault(Fault::DropSocketsRandomly { max_frames: 40, seed: rng.next() });
                    windows += 1;
                    tokio::time::sleep(Duration::from_millis(10 + rng.below(40))).await;
                    f.set_fault(Fault::None);
                }
                tokio::time::sleep(Duration::from_millis(20 + rng.below(60))).await;
            }
            f.set_fault(Fault::None);
            (restarts, windows)
        })
    };
    for round in 0..ROUNDS {
        for c in &convs {
            f.append_event(*c, event(PRE + round));
            if round % 7 == 0 {
                // transient frames go through too (not part of the comparison)
                f.publish_transient(*c, json!({"source": "agent", "content": "tok", "kind": "StreamingDeltaEvent"}));
            }
        }
        tokio::time::sleep(Duration::from_millis(40 + rng.below(80))).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (restarts, windows) = chaos.await.unwrap();
    assert!(f.is_running());
    for c in &convs {
        let mut e = event(0);
        e["id"] = json!(end_ids[c].clone());
        f.append_event(*c, e);
    }

    let faults_done = t0.elapsed();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let elapsed = t0.elapsed();

    // Verify every client against the downstream's log.
    let logs: HashMap<Uuid, Vec<Value>> = convs.iter().map(|c| (*c, f.events(*c))).collect();
    let mut problems = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let log = &logs[&r.conv];
        assert_eq!(log.len(), PRE + ROUNDS + 1);
        if let Some(c) = &r.closed {
            problems.push(format!("client {i} ({:?}): {c} after {} frames", r.variant, r.frames.len()));
            continue;
        }
        let from = match r.variant {
            Variant::EventsLive | Variant::SessionLive => PRE,
            Variant::EventsAll | Variant::SessionAll => 0,
        };
        let want: Vec<&str> = log[from..].iter().map(|e| e["id"].as_str().unwrap()).collect();
        if r.variant.is_session() {
            let syncs: Vec<&Value> = r.frames.iter().filter(|v| v["type"] == "sync").collect();
            if syncs.len() != 1 || r.frames[0]["type"] != "sync" {
                problems.push(format!("client {i} ({:?}): {} sync frames", r.variant, syncs.len()));
            }
            let durable: Vec<&Value> = r.frames.iter().filter(|v| v["type"] == "durable").collect();
            let seqs: Vec<u64> = durable.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
            let want_seqs: Vec<u64> = (from as u64..log.len() as u64).collect();
            let ids: Vec<&str> = durable.iter().map(|v| v["event"]["id"].as_str().unwrap()).collect();
            if seqs != want_seqs || ids != want {
                problems.push(format!("client {i} ({:?}): seqs {seqs:?}, want {want_seqs:?}", r.variant));
            }
        } else {
            if r.frames[0]["key"] != "full_state" {
                problems.push(format!("client {i} ({:?}): first frame {}", r.variant, r.frames[0]));
            }
            let ids: Vec<&str> = r.frames.iter().filter(|v| is_persisted_event(v)).map(|v| v["id"].as_str().unwrap()).collect();
            if ids != want {
                let pos = |id: &str| log.iter().position(|e| e["id"] == id).map(|p| p as i64).unwrap_or(-1);
                let got: Vec<i64> = ids.iter().map(|id| pos(id)).collect();
                problems.push(format!("client {i} ({:?}): log positions {got:?}, want {from}..{}", r.variant, log.len()));
            }
        }
    }
    let reqs = f.socket_requests();
    let resumes = reqs
        .iter()
        .filter(|r| r.query.iter().any(|(k, v)| (k == "resend_mode" && v == "since") || (k == "after_seq" && v != "-1")))
        .count();
    eprintln!(
        "{CLIENTS} clients subscribed in {subscribed_at:?}; {windows} random-drop windows, {restarts} restarts; \
         {} downstream socket upgrades ({resumes} resumes); faults over at {faults_done:?}, all done in {elapsed:?}",
        reqs.len()
    );
    assert!(problems.is_empty(), "{} of {CLIENTS} clients wrong:\n{}", problems.len(), problems.iter().take(20).cloned().collect::<Vec<_>>().join("\n"));
    assert!(restarts > 0 && windows > 0, "no faults were injected");
    assert!(reqs.len() > 2 * CLIENTS, "too few reconnections to mean anything: {}", reqs.len());
    // Every downstream socket carried nestor's key, never the client's.
    let down_key = f.config().session_api_key.clone().unwrap();
    assert!(reqs.iter().all(|r| r.header_key.as_deref() == Some(down_key.as_str()) && r.query.iter().all(|(k, _)| k != "session_api_key")));
    drop(results);
    Arc::try_unwrap(n).ok().expect("no other handle").stop().await;
}

/// A downstream socket that dies before its first frame left the client with nothing: the
/// redial must repeat the client's own request (a live-only client must not get history).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_before_its_first_frame_is_redialed_with_the_clients_own_request() {
    let f = FakeAgentServer::start(fake_config()).await.unwrap();
    let n = nestor_existing(&[&f], "").await;
    let id = create_conversation(&n).await;
    for i in 0..3 {
        f.append_event(id, event(i));
    }
    f.set_fault(Fault::DropSocketsAfterFrames(0));
    let mut ev = open(&n, &format!("/sockets/events/{id}")).await;
    let mut se = open(&n, &format!("/sockets/session/{id}")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.socket_requests().len() < 6 {
        assert!(Instant::now() < deadline, "nestor did not redial");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f.set_fault(Fault::None);
    assert_eq!(must_json(&mut ev).await["key"], "full_state");
    let sync = must_json(&mut se).await;
    assert_eq!(sync["type"], "sync");
    assert!(sync.get("from_seq").is_none(), "a live-only client got a history request: {sync}");
    assert_eq!(sync["through_seq"], 2);
    let seq = f.append_event(id, event(9));
    let live_id = f.events(id)[seq as usize]["id"].as_str().unwrap().to_owned();
    // events socket: next persisted event is the new one (no history)
    loop {
        let v = must_json(&mut ev).await;
        if is_persisted_event(&v) {
            assert_eq!(v["id"], live_id, "history leaked to a live-only client: {v}");
            break;
        }
    }
    loop {
        let v = must_json(&mut se).await;
        if v["type"] == "durable" {
            assert_eq!(v["seq"], seq, "history leaked to a live-only client: {v}");
            break;
        }
    }
    for r in f.socket_requests() {
        assert!(r.query.iter().all(|(k, _)| k != "resend_mode" && k != "after_seq"), "redial asked for history: {r:?}");
    }
    n.stop().await;
}

/// Events persisted just before a live-only client subscribed are inside the resume's
/// look-back window; they must still not reach it after the downstream restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_only_client_gets_nothing_from_before_it_subscribed_after_a_resume() {
    let f = FakeAgentServer::start(fake_config()).await.unwrap();
    let n = nestor_existing(&[&f], "").await;
    let id = create_conversation(&n).await;
    for i in 0..4 {
        f.append_event(id, event(i));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut ws = open(&n, &format!("/sockets/events/{id}")).await;
    assert_eq!(must_json(&mut ws).await["key"], "full_state");
    let mut want = Vec::new();
    let mut got = Vec::new();
    let read_until = |v: Value, got: &mut Vec<String>| {
        if is_persisted_event(&v) {
            got.push(v["id"].as_str().unwrap().to_owned());
        }
    };
    for step in 0..3 {
        let seq = f.append_event(id, event(10 + step));
        want.push(f.events(id)[seq as usize]["id"].as_str().unwrap().to_owned());
        while got.len() < want.len() {
            let v = must_json(&mut ws).await;
            read_until(v, &mut got);
        }
        f.restart().await;
        // one more while it is down
        let seq = f.append_event(id, event(20 + step));
        want.push(f.events(id)[seq as usize]["id"].as_str().unwrap().to_owned());
    }
    while got.len() < want.len() {
        let v = must_json(&mut ws).await;
        read_until(v, &mut got);
    }
    // nothing more is pending
    loop {
        match next(&mut ws, Duration::from_millis(300)).await {
            Next::Text(t) => read_until(serde_json::from_str(&t).unwrap(), &mut got),
            Next::Timeout => break,
            other => panic!("{other:?}"),
        }
    }
    let log: Vec<String> = f.events(id).iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
    let pos: Vec<usize> = got.iter().map(|g| log.iter().position(|l| l == g).unwrap()).collect();
    assert_eq!(got, want, "log positions received: {pos:?} (the first 4 predate the subscription)");
    assert!(f.socket_requests().iter().filter(|r| r.query.iter().any(|(k, v)| k == "resend_mode" && v == "since")).count() >= 3);
    // The proxy's metrics saw the pair, its three losses and three resumes (at least: the
    // recorder is shared with the tests running alongside).
    assert!(metric(&n, "nestor_ws_pairs{kind=\"events\"}").await.unwrap() >= 1.0);
    assert!(metric(&n, "nestor_ws_downstream_lost_total").await.unwrap() >= 3.0);
    assert!(metric(&n, "nestor_ws_resumed_total").await.unwrap() >= 3.0);
    assert!(metric(&n, "nestor_ws_resume_seconds_count").await.unwrap() >= 3.0);
    n.stop().await;
}
