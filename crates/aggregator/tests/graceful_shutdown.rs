//! Graceful shutdown of a real nestor process (SIGTERM): in-flight requests complete, every
//! open WebSocket (authenticated or still waiting for its first-frame auth) is closed with
//! 1012 "service restart" (retryable), nestor exits within a bounded time, and downstreams
//! are left as configured (`on_shutdown = "stop" | "keep"`; `existing` servers are never
//! touched).

mod real_nestor;

use std::time::{Duration, Instant};

use futures::StreamExt;
use nestor_test_support::{FakeAgentServer, FakeConfig, Fault};
use real_nestor::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Longest a SIGTERM may take to end nestor in these tests (in-flight requests of ~1.5 s,
/// sockets, downstream stops with a 3 s grace).
const BOUND: Duration = Duration::from_secs(12);

fn create_body() -> Value {
    json!({
        "agent": {"kind": "Agent", "llm": {"usage_id": "agent", "model": "openai/fake", "api_key": "x"}, "tools": [{"name": "terminal"}]},
        "workspace": {"kind": "LocalWorkspace", "working_dir": "/tmp/w"},
    })
}

async fn create(n: &NestorProc) -> String {
    let r = NestorProc::client()
        .post(format!("{}/api/conversations", n.url()))
        .header("X-Session-API-Key", CLIENT_KEY)
        .json(&create_body())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "create: {}", r.status());
    r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

async fn open(n: &NestorProc, path: &str, header_key: bool) -> Ws {
    let mut req = n.ws(path).into_client_request().unwrap();
    if header_key {
        req.headers_mut().insert("X-Session-API-Key", CLIENT_KEY.parse().unwrap());
    }
    tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(req)).await.unwrap().unwrap().0
}

/// Read until the close frame; its code (None: the connection just ended).
async fn close_code(ws: &mut Ws, within: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("socket still open after {within:?}"),
            Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) => return None,
        }
    }
}

async fn first_text(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_closes_sockets_with_1012_and_exits_in_bounded_time() {
    let fake = FakeAgentServer::start(FakeConfig::with_key("downstream-key-graceful")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "session_api_keys = [\"{CLIENT_KEY}\"]\nstate_dir = \"{}\"\n[provisioner]\nkind = \"existing\"\n[[provisioner.existing.servers]]\nurl = \"{}\"\napi_key = \"downstream-key-graceful\"\n",
        dir.path().join("state").display(),
        fake.url()
    );
    let mut n = NestorProc::start(dir.path(), &toml).await;
    let id = create(&n).await;

    // Three sockets: events and session (authenticated by header), and one that has not sent
    // its first-frame auth yet.
    let mut events = open(&n, &format!("/sockets/events/{id}"), true).await;
    assert_eq!(first_text(&mut events).await["key"], "full_state");
    let mut session = open(&n, &format!("/sockets/session/{id}?after_seq=-1"), true).await;
    assert_eq!(first_text(&mut session).await["type"], "sync");
    let mut unauthenticated = open(&n, &format!("/sockets/events/{id}"), false).await;

    // A slow request in flight when the signal comes.
    fake.set_fault(Fault::Delay(Duration::from_millis(1500)));
    let url = format!("{}/api/conversations/{id}", n.url());
    let slow = tokio::spawn(async move {
        let t = Instant::now();
        let r = NestorProc::client().get(url).header("X-Session-API-Key", CLIENT_KEY).send().await;
        (r.map(|r| r.status().as_u16()).map_err(|e| e.to_string()), t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let t = Instant::now();
    let pid = n.pid().unwrap();
    let term = tokio::spawn(async move {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    });
    term.await.unwrap();
    let (a, b, c) = tokio::join!(
        close_code(&mut events, Duration::from_secs(5)),
        close_code(&mut session, Duration::from_secs(5)),
        close_code(&mut unauthenticated, Duration::from_secs(5))
    );
    let sockets_closed = t.elapsed();
    assert_eq!((a, b, c), (Some(1012), Some(1012), Some(1012)), "every client socket is closed with 1012");
    assert!(sockets_closed < Duration::from_secs(3), "sockets closed only after {sockets_closed:?}");

    let (status, took) = slow.await.unwrap();
    assert_eq!(status, Ok(200), "the in-flight request completes");
    assert!(took >= Duration::from_millis(1400), "{took:?}");

    let (st, exited) = n.sigterm(BOUND).await.expect("nestor exits after SIGTERM within the bound");
    assert!(st.success(), "exit status {st}; log:\n{}", n.log_tail(30));
    eprintln!("sockets closed (1012) {sockets_closed:?} after SIGTERM; slow request took {took:?}; nestor exited {exited:?} after being waited for");
    // Gone: new connections are refused.
    assert!(NestorProc::client().get(format!("{}/alive", n.url())).send().await.is_err());
    // The existing server is not nestor's to stop.
    fake.set_fault(Fault::None);
    assert!(reqwest::get(format!("{}/alive", fake.url())).await.unwrap().status().is_success());
    let log = std::fs::read_to_string(&n.log).unwrap();
    assert!(log.contains("in-flight requests drained") && log.contains("WebSockets closed (1012)"), "{log}");
}

fn process_toml(dir: &std::path::Path, on_shutdown: &str) -> String {
    format!(
        "session_api_keys = [\"{CLIENT_KEY}\"]\nstate_dir = \"{}\"\nready_timeout_secs = 20.0\n[provisioner]\nkind = \"process\"\n[provisioner.process]\nagent_server = \"{}\"\nstartup_timeout_secs = 20.0\nstop_timeout_secs = 3.0\non_shutdown = \"{on_shutdown}\"\n",
        dir.join("state").display(),
        fake_bin().display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_downstreams_are_stopped_or_kept_per_on_shutdown() {
    for policy in ["stop", "keep"] {
        let dir = tempfile::tempdir().unwrap();
        let procs = dir.path().join("state");
        let mut n = NestorProc::start(dir.path(), &process_toml(dir.path(), policy)).await;
        let a = create(&n).await;
        let _b = create(&n).await;
        let before = pids_under(&procs);
        assert_eq!(before.len(), 2, "{policy}: one child per conversation");
        let mut ws = open(&n, &format!("/sockets/events/{a}"), true).await;
        assert_eq!(first_text(&mut ws).await["key"], "full_state");

        let pid = n.pid().unwrap() as i32;
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        assert_eq!(close_code(&mut ws, Duration::from_secs(5)).await, Some(1012), "{policy}");
        let (st, took) = n.sigterm(BOUND).await.expect("exits within the bound");
        assert!(st.success(), "{policy}: {st}");
        let after = pids_under(&procs);
        eprintln!("on_shutdown = {policy}: exited in {took:?}, children before {before:?}, after {after:?}");
        if policy == "stop" {
            assert!(after.is_empty(), "on_shutdown = stop leaves no child: {after:?}");
        } else {
            assert_eq!(after, before, "on_shutdown = keep leaves the children running");
            // The next nestor re-adopts them: same processes, the conversation answers.
            n.spawn().await;
            let r = NestorProc::client()
                .get(format!("{}/api/conversations/{a}", n.url()))
                .header("X-Session-API-Key", CLIENT_KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(pids_under(&procs), before, "re-adopted, not restarted");
            n.kill9();
            kill_all_under(&procs);
        }
    }
}
