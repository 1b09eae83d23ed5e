//! Unit tests of the kubernetes backend against a scripted mock API server (tower-test):
//! the error paths a real cluster rarely shows on demand — 409 conflicts on every create,
//! watch expiry (410 Gone, as an event and as an answer), a failing watch, an API server
//! that does not answer, 403/503 answers.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle};

use super::*;

type MockHandle = Handle<Request<Body>, Response<Body>>;

fn settings() -> Settings {
    KubernetesConfig {
        image: Some("img:1".into()),
        namespace: Some("agents".into()),
        reach: Reach::HostPortAnnotation,
        check_permissions: Some(false),
        api_timeout_secs: Some(2.0),
        startup_timeout_secs: Some(30.0),
        ..Default::default()
    }
    .validate()
    .unwrap()
}

fn mock_provisioner() -> (KubernetesProvisioner, MockHandle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "agents");
    (KubernetesProvisioner::with_client(settings(), client, "agents".into(), "https://mock:6443".into()), handle)
}

fn ok(v: Value) -> Response<Body> {
    Response::builder().status(200).body(Body::from(serde_json::to_vec(&v).unwrap())).unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let v = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": message, "reason": reason, "code": code});
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .body(Body::from(serde_json::to_vec(&v).unwrap()))
        .unwrap()
}

fn list(kind: &str, items: Vec<Value>, rv: &str) -> Response<Body> {
    ok(json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items}))
}

fn events(evs: &[Value]) -> Response<Body> {
    let mut body = Vec::new();
    for e in evs {
        body.extend(serde_json::to_vec(e).unwrap());
        body.push(b'\n');
    }
    Response::builder().status(200).body(Body::from(body)).unwrap()
}

fn secret_json(conv: &ConversationId, key: &str) -> Value {
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    json!({
        "kind": "Secret", "apiVersion": "v1",
        "metadata": {"name": format!("nestor-{}", conv.hex()), "namespace": "agents", "uid": "s1",
                     "labels": {"app.kubernetes.io/managed-by": "nestor", "nestor.dev/instance": "nestor",
                                "nestor.dev/conversation": conv.hex()},
                     "annotations": {"nestor.dev/owner": "bob", "nestor.dev/phase": "active"},
                     "creationTimestamp": "2099-01-01T00:00:00Z"},
        "data": {"session-api-key": b64(key), "secret-key": b64("sk")},
    })
}

fn pod_json(conv: &ConversationId, uid: &str, ready: bool, rv: &str) -> Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": format!("nestor-{}", conv.hex()), "namespace": "agents", "uid": uid, "resourceVersion": rv,
                     "labels": {"app.kubernetes.io/managed-by": "nestor", "nestor.dev/instance": "nestor",
                                "nestor.dev/conversation": conv.hex()},
                     "annotations": {"nestor.dev/host-port": "40123"},
                     "creationTimestamp": "2099-01-01T00:00:00Z"},
        "spec": {"containers": [{"name": "agent-server", "image": "img:1"}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1",
                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
    })
}

/// The next request, which must be `method` on a path starting with `path` (and whose query
/// contains `query`, if given).
async fn expect(
    h: &mut MockHandle,
    method: &str,
    path: &str,
    query: Option<&str>,
) -> (Request<Body>, tower_test::mock::SendResponse<Response<Body>>) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), h.next_request())
        .await
        .unwrap_or_else(|_| panic!("no {method} {path} within 10 s"))
        .expect("client dropped");
    assert_eq!(req.method().as_str(), method, "{}", req.uri());
    assert!(req.uri().path().starts_with(path), "expected {path}, got {}", req.uri());
    if let Some(q) = query {
        assert!(req.uri().query().unwrap_or("").contains(q), "expected query {q} in {}", req.uri());
    }
    (req, send)
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const PODS: &str = "/api/v1/namespaces/agents/pods";
const SECRETS: &str = "/api/v1/namespaces/agents/secrets";
const PVCS: &str = "/api/v1/namespaces/agents/persistentvolumeclaims";

/// Answer recover's calls: secrets list, pods list (the watch's first list), the sweep's lists.
async fn serve_recover(h: &mut MockHandle, conv: &ConversationId, pod: Value, rv: &str) {
    let (_, s) = expect(h, "GET", SECRETS, Some("labelSelector")).await;
    s.send_response(list("SecretList", vec![secret_json(conv, "k-1")], "5"));
    let (_, s) = expect(h, "GET", PODS, Some("labelSelector")).await;
    s.send_response(list("PodList", vec![pod], rv));
    // sweep
    let (_, s) = expect(h, "GET", SECRETS, None).await;
    s.send_response(list("SecretList", vec![secret_json(conv, "k-1")], "5"));
    let (_, s) = expect(h, "GET", PODS, None).await;
    s.send_response(list("PodList", vec![], rv));
    let (_, s) = expect(h, "GET", PVCS, None).await;
    s.send_response(list("PersistentVolumeClaimList", vec![], rv));
}

#[tokio::test]
async fn watch_expiry_relists_and_rewatches() {
    let (p, mut h) = mock_provisioner();
    let conv = ConversationId::new_random();
    let server = tokio::spawn(async move {
        serve_recover(&mut h, &conv, pod_json(&conv, "u1", false, "10"), "10").await;
        // Watch from the list's version: the pod becomes ready, then the version expires.
        let (_, s) = expect(&mut h, "GET", PODS, Some("watch=true")).await;
        s.send_response(events(&[
            json!({"type": "MODIFIED", "object": pod_json(&conv, "u1", true, "11")}),
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                                "message": "too old resource version: 11 (40)", "reason": "Expired", "code": 410}}),
        ]));
        // 410 -> a fresh list (the pod is gone meanwhile) ...
        let (_, s) = expect(&mut h, "GET", PODS, Some("labelSelector")).await;
        s.send_response(list("PodList", vec![], "50"));
        // Gone, but was it released? (its Secret still exists: no, just stopped), and a watch
        // from the new list's version, answered 410 at once this time — in either order.
        for _ in 0..2 {
            let (req, s) = tokio::time::timeout(Duration::from_secs(10), h.next_request()).await.unwrap().unwrap();
            if req.uri().path().starts_with(SECRETS) {
                assert!(req.uri().path().ends_with(&conv.hex()));
                s.send_response(ok(secret_json(&conv, "k-1")));
            } else {
                assert!(req.uri().query().unwrap().contains("watch=true"), "{}", req.uri());
                assert!(req.uri().query().unwrap().contains("resourceVersion=50"), "{}", req.uri());
                s.send_response(status(410, "Expired", "too old resource version"));
            }
        }
        let (_, s) = expect(&mut h, "GET", PODS, Some("labelSelector")).await;
        s.send_response(list("PodList", vec![pod_json(&conv, "u2", true, "60")], "60"));
        // A watch that fails otherwise (500): back off, list again.
        let (_, s) = expect(&mut h, "GET", PODS, Some("watch=true")).await;
        s.send_response(status(500, "InternalError", "etcd is sad"));
        let (_, s) = expect(&mut h, "GET", PODS, Some("labelSelector")).await;
        s.send_response(list("PodList", vec![pod_json(&conv, "u2", true, "70")], "70"));
        // Then a watch that stays open (the test ends first).
        let (_, held) = expect(&mut h, "GET", PODS, Some("watch=true")).await;
        (h, held)
    });
    let owned = p.recover().await.unwrap();
    assert_eq!(owned.len(), 1);
    let ds = owned[0].clone();
    assert_eq!(ds.owner().map(|o| o.as_str()), Some("bob"));
    // Every state the downstream goes through.
    let seen = Arc::new(std::sync::Mutex::new(vec![ds.state().as_str()]));
    let mut rx = ds.subscribe_state();
    let s2 = seen.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let st = rx.borrow_and_update().as_str();
            s2.lock().unwrap().push(st);
        }
    });
    wait_for("ready through the watch", || ds.state() == DownstreamState::Ready).await;
    assert_eq!(ds.endpoint().unwrap().authority.as_str(), "127.0.0.1:40123");
    assert_eq!(ds.endpoint().unwrap().key.as_ref().unwrap().expose(), "k-1");
    let _h = tokio::time::timeout(Duration::from_secs(15), server).await.expect("server script").expect("server task");
    wait_for("ready again after the re-lists", || ds.state() == DownstreamState::Ready).await;
    let seen = seen.lock().unwrap().clone();
    let gone = seen.iter().position(|s| *s == "stopped").expect("stopped after the first re-list");
    assert!(seen[..gone].contains(&"running") && seen[gone..].contains(&"running"), "{seen:?}");
    assert_eq!(p.relists(), 4, "initial list + after 410 event + after 410 answer + after 500");
    p.shutdown().await;
}

#[tokio::test]
async fn conflicts_on_create_adopt_what_exists() {
    let (p, mut h) = mock_provisioner();
    let conv = ConversationId::new_random();
    let c2 = conv;
    let server = tokio::spawn(async move {
        // The watch starts with provision: answer its list, keep the watch open.
        let mut pending = Vec::new();
        // Provision's 4 creates/reads, and the watch loop's list + watch, interleaved.
        for _ in 0..6 {
            let (req, s) = tokio::time::timeout(Duration::from_secs(10), h.next_request()).await.unwrap().unwrap();
            let path = req.uri().path().to_owned();
            let q = req.uri().query().unwrap_or("").to_owned();
            match (req.method().as_str(), path.as_str()) {
                ("GET", PODS) if q.contains("watch=true") => pending.push(s),
                ("GET", PODS) => s.send_response(list("PodList", vec![], "1")),
                ("POST", SECRETS) => s.send_response(status(409, "AlreadyExists", "secrets \"x\" already exists")),
                ("GET", p) if p.starts_with(SECRETS) => s.send_response(ok(secret_json(&c2, "theirs"))),
                ("POST", PVCS) => s.send_response(status(409, "AlreadyExists", "persistentvolumeclaims \"x\" already exists")),
                ("POST", PODS) => s.send_response(status(409, "AlreadyExists", "pods \"x\" already exists")),
                other => panic!("unexpected {other:?} {q}"),
            }
        }
        (h, pending)
    });
    let ds = p.provision(ProvisionRequest { conversation: conv, owner: UserId::new("alice") }).await.unwrap();
    let c = p.0.conv_of(&ds).unwrap();
    assert_eq!(c.key.expose(), "theirs", "the existing Secret's key is used");
    assert!(matches!(ds.state(), DownstreamState::Stopped | DownstreamState::Starting), "{:?}", ds.state());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    p.shutdown().await;
}

#[tokio::test]
async fn an_unanswering_or_failing_api_server_is_reported_clearly() {
    // Connection-level failure.
    let (p, mut h) = mock_provisioner();
    let server = tokio::spawn(async move {
        let (_, s) = expect(&mut h, "GET", SECRETS, None).await;
        s.send_error(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused"));
    });
    let e = p.recover().await.unwrap_err();
    server.await.unwrap();
    assert!(matches!(e, ProvisionError::Unavailable { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("https://mock:6443") && msg.contains("unreachable") && msg.contains("Connection refused"), "{msg}");

    // No answer at all: bounded by api_timeout (2 s here).
    let (p, mut h) = mock_provisioner();
    let server = tokio::spawn(async move {
        let (_, s) = expect(&mut h, "GET", SECRETS, None).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(s);
    });
    let t0 = std::time::Instant::now();
    let e = p.recover().await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert!(e.to_string().contains("did not answer within"), "{e}");
    server.abort();

    // 503 is retryable; 403 names the verb and is the operator's to fix.
    let (p, mut h) = mock_provisioner();
    let server = tokio::spawn(async move {
        let (_, s) = expect(&mut h, "GET", SECRETS, None).await;
        s.send_response(status(503, "ServiceUnavailable", "etcd leader changed"));
        let (_, s) = expect(&mut h, "GET", SECRETS, None).await;
        s.send_response(status(403, "Forbidden", "secrets is forbidden: User \"x\" cannot list resource \"secrets\""));
    });
    let e = p.recover().await.unwrap_err();
    assert!(matches!(e, ProvisionError::Unavailable { .. }), "{e:?}");
    let e = p.recover().await.unwrap_err();
    server.await.unwrap();
    assert!(matches!(e, ProvisionError::Config(_)), "{e:?}");
    assert!(e.to_string().contains("not allowed to list secrets in namespace \"agents\""), "{e}");
}

#[tokio::test]
async fn a_missing_namespace_is_a_configuration_error() {
    let (p, mut h) = mock_provisioner();
    let server = tokio::spawn(async move {
        let (_, s) = expect(&mut h, "GET", SECRETS, None).await;
        // What a list in a missing namespace answers is an empty list; a create answers 404.
        s.send_response(list("SecretList", vec![], "1"));
        let (_, s) = expect(&mut h, "GET", PODS, None).await;
        s.send_response(list("PodList", vec![], "1"));
        for path in [SECRETS, PODS, PVCS] {
            let (_, s) = expect(&mut h, "GET", path, None).await;
            s.send_response(list("List", vec![], "1"));
        }
        // The watch (held open) and the create, in either order.
        let mut held = Vec::new();
        for _ in 0..2 {
            let (req, s) = tokio::time::timeout(Duration::from_secs(10), h.next_request()).await.unwrap().unwrap();
            if req.method() == "POST" {
                assert!(req.uri().path().starts_with(SECRETS), "{}", req.uri());
                s.send_response(status(404, "NotFound", "namespaces \"agents\" not found"));
            } else {
                held.push(s);
            }
        }
        (h, held)
    });
    p.recover().await.unwrap();
    let e = p.provision(ProvisionRequest { conversation: ConversationId::new_random(), owner: UserId::default_user() }).await;
    let e = e.unwrap_err();
    assert!(matches!(e, ProvisionError::Config(_)), "{e:?}");
    assert!(e.to_string().contains("namespace does not exist"), "{e}");
    let _ = server.await;
    p.shutdown().await;
}

/// A claimed warm pod whose relabel has not landed (still `nestor.dev/warm`) is routed to the
/// conversation its Secret names (the claim), and its deletion is that conversation's pod
/// going; an unclaimed warm pod stays nobody's.
#[tokio::test]
async fn a_claimed_pod_still_labelled_warm_is_routed_by_its_secret() {
    let (p, _h) = mock_provisioner();
    let conv = ConversationId::new_random();
    let slot = Slot::Conversation(conv);
    let name = "nestor-warm-0123456789abcdef";
    let c = p.0.insert_conv(slot, SessionKey::random(), UserId::new("bob"), None, name.into());
    let mut v = pod_json(&conv, "u1", true, "5");
    v["metadata"]["name"] = json!(name);
    v["metadata"]["labels"] =
        json!({"app.kubernetes.io/managed-by": "nestor", "nestor.dev/instance": "nestor", "nestor.dev/warm": "0123456789abcdef"});
    let pod: Pod = serde_json::from_value(v).unwrap();
    assert_eq!(p.0.slot_of(&pod), Some(slot));
    p.0.observe(&pod);
    assert_eq!(c.ds.state(), DownstreamState::Ready);
    assert_eq!(c.ds.endpoint().unwrap().authority.to_string(), "127.0.0.1:40123");
    let mut other = pod.clone();
    other.metadata.name = Some("nestor-warm-fedcba9876543210".into());
    assert_eq!(p.0.slot_of(&other), None, "an unclaimed warm pod is no conversation's");
    p.0.observe_gone(slot, Some("u1"));
    assert_eq!(c.ds.state(), DownstreamState::Stopped);
}
