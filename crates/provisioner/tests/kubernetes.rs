//! The kubernetes provisioner against a real kube-apiserver 1.20 + etcd (scripts/setup-kube.sh)
//! with pods run by the test node agent (`nestor_test_support::node_agent`) as Docker
//! containers of the real agent-server image.
//!
//! Needs the cached kube-apiserver (`scripts/setup-kube.sh build`), a Docker engine and the
//! image `NESTOR_TEST_AGENT_SERVER_IMAGE` (default `nestor/agent-server:1.58.2`). Without them
//! the tests print why and pass as skipped, unless `NESTOR_TEST_REQUIRE_KUBE=1` (CI).
//!
//! Each test has its own namespace (the shipped RBAC Role bound to the test user `nestor`,
//! whose token nestor uses) and its own node agent; both remove everything they made when
//! the test ends, also when it fails.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use nestor_core::{ConversationId, Downstream, DownstreamClient, DownstreamState, UserId};
use nestor_provisioner::kubernetes::{KubernetesConfig, KubernetesProvisioner, Reach};
use nestor_provisioner::{ProvisionError, ProvisionRequest, Provisioner};
use nestor_test_support::kube_env::{agent_server_image, KubeEnv, TestNamespace};
use nestor_test_support::node_agent::TestNode;

/// A namespace + node agent for one test, removed afterwards (also on panic).
struct Ctx {
    env: KubeEnv,
    node: TestNode,
}

impl Ctx {
    async fn new(env: KubeEnv, prefix: &str) -> Ctx {
        let node = TestNode::start(&env, prefix).await;
        Ctx { env, node }
    }

    fn cfg(&self) -> KubernetesConfig {
        KubernetesConfig {
            kubeconfig: Some(self.env.nestor.clone()),
            namespace: Some(self.node.ns.name.clone()),
            image: Some(agent_server_image()),
            reach: Reach::HostPortAnnotation,
            startup_timeout_secs: Some(240.0),
            api_timeout_secs: Some(10.0),
            termination_grace_secs: Some(2),
            ..Default::default()
        }
    }

    /// Same image, a tiny HTTP server answering /alive: for tests about the provisioner's
    /// own bookkeeping rather than the agent-server.
    fn cheap_cfg(&self) -> KubernetesConfig {
        KubernetesConfig {
            command: Some(vec!["sh".into(), "-c".into()]),
            args: Some(vec![
                "mkdir -p /tmp/www && echo ok > /tmp/www/alive && cd /tmp/www && exec python3 -m http.server 8000 >/dev/null 2>&1"
                    .into(),
            ]),
            ..self.cfg()
        }
    }

    async fn provisioner(&self, cfg: &KubernetesConfig) -> KubernetesProvisioner {
        KubernetesProvisioner::new(cfg).await.expect("provisioner")
    }

    async fn finish(self) {
        self.node.finish().await;
    }
}

fn req(conv: ConversationId) -> ProvisionRequest {
    ProvisionRequest { conversation: conv, owner: UserId::new("alice") }
}

async fn call(ds: &Downstream, method: Method, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    let ep = ds.endpoint().expect("endpoint");
    let body = body.map(|b| Bytes::from(serde_json::to_vec(&b).unwrap()));
    match DownstreamClient::default().call_bytes(&ep, method, path, body, Duration::from_secs(60), 16 << 20).await {
        Ok((s, b)) => (s.as_u16(), serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null)),
        Err(nestor_core::client::ClientError::Status { status, body }) => (status.as_u16(), serde_json::Value::String(body)),
        Err(e) => panic!("{path}: {e}"),
    }
}

/// Wait (bounded) until the namespace holds exactly `want` of (pods, secrets, pvcs).
async fn wait_objects(ns: &TestNamespace, want: (usize, usize, usize), within: Duration) -> (Vec<String>, Vec<String>, Vec<String>) {
    let deadline = Instant::now() + within;
    loop {
        let o = ns.objects().await.unwrap();
        if (o.0.len(), o.1.len(), o.2.len()) == want || Instant::now() > deadline {
            return o;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_agent_server_pod_life_cycle() {
    let env = nestor_test_support::require_kube!();
    let ctx = Ctx::new(env, "k-life").await;
    let p = ctx.provisioner(&ctx.cfg()).await;
    assert!(p.recover().await.unwrap().is_empty());
    let conv = ConversationId::new_random();
    let t0 = Instant::now();
    let ds = p.provision(req(conv)).await.unwrap();
    assert!(matches!(ds.state(), DownstreamState::Starting), "{:?}", ds.state());
    p.ensure_ready(&ds, Duration::from_secs(240)).await.unwrap();
    eprintln!("TIMING pod create->ready (real agent-server): {:?}", t0.elapsed());
    assert_eq!(ds.kind(), "kubernetes");
    assert_eq!(ds.primary(), Some(conv));
    assert_eq!(ds.owner().map(|o| o.as_str()), Some("alice"));

    // The key is the pod's own and required.
    let ep = ds.endpoint().unwrap();
    assert!(DownstreamClient::default().is_alive(&ep, Duration::from_secs(5)).await);
    let no_key = nestor_core::Endpoint::new(ep.scheme.clone(), ep.authority.clone(), ep.base_path.clone(), None);
    let r = DownstreamClient::default()
        .call_bytes(&no_key, Method::GET, "/api/conversations/search", None, Duration::from_secs(10), 1 << 20)
        .await;
    assert!(matches!(r, Err(nestor_core::client::ClientError::Status { status, .. }) if status.as_u16() == 401), "{r:?}");

    // Pod spec: hardened, keys from the Secret.
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(ctx.node.ns.client(), &ctx.node.ns.name);
    let pod = pods.get(&p.object_name(&conv)).await.unwrap();
    let spec = pod.spec.unwrap();
    let c = &spec.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.as_ref().unwrap().drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(spec.automount_service_account_token, Some(false));
    let key_env = c.env.as_ref().unwrap().iter().find(|e| e.name == "SESSION_API_KEY").unwrap();
    assert!(key_env.value.is_none() && key_env.value_from.as_ref().unwrap().secret_key_ref.is_some());
    let (pods_now, secrets, pvcs) = ctx.node.ns.objects().await.unwrap();
    assert_eq!((pods_now.len(), secrets.len(), pvcs.len()), (1, 1, 1), "{pods_now:?} {secrets:?} {pvcs:?}");

    // A conversation on it, in its workspace.
    let mut body = serde_json::json!({
        "conversation_id": conv.to_string(),
        "agent": {"kind": "Agent", "llm": {"usage_id": "agent", "model": "openai/fake",
                  "base_url": "http://127.0.0.1:9/v1", "api_key": "x"}, "tools": [{"name": "terminal"}]},
        "workspace": {"kind": "LocalWorkspace", "working_dir": "/elsewhere"},
        "autotitle": false
    })
    .as_object()
    .unwrap()
    .clone();
    p.prepare_create(&ds, &mut body);
    let (status, created) = call(&ds, Method::POST, "/api/conversations", Some(serde_json::Value::Object(body))).await;
    assert!((200..300).contains(&status), "{status}: {created}");
    assert_eq!(created["workspace"]["working_dir"], "/workspace/project");
    p.mark_active(&ds);

    // Idle stop: pod gone, Secret and PVC kept; ensure_ready brings it back with its state.
    p.stop(&ds).await.unwrap();
    assert_eq!(ds.state(), DownstreamState::Stopped);
    let o = wait_objects(&ctx.node.ns, (0, 1, 1), Duration::from_secs(30)).await;
    assert_eq!((o.0.len(), o.1.len(), o.2.len()), (0, 1, 1), "{o:?}");
    let t1 = Instant::now();
    p.ensure_ready(&ds, Duration::from_secs(240)).await.unwrap();
    eprintln!("TIMING stopped->ready: {:?}", t1.elapsed());
    let (status, got) = call(&ds, Method::GET, &format!("/api/conversations/{conv}"), None).await;
    assert_eq!(status, 200, "the conversation survives a stop (PVC): {got}");

    // Release removes pod, Secret and PVC.
    p.release(&ds, conv, 0).await.unwrap();
    assert_eq!(ds.state(), DownstreamState::Released);
    let o = wait_objects(&ctx.node.ns, (0, 0, 0), Duration::from_secs(30)).await;
    assert_eq!((o.0.len(), o.1.len(), o.2.len()), (0, 0, 0), "{o:?}");
    assert!(p.list().is_empty());
    p.shutdown().await;
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_pods_through_labels_and_secrets() {
    let env = nestor_test_support::require_kube!();
    let ctx = Ctx::new(env, "k-repl").await;
    let cfg = ctx.cheap_cfg();
    let a = ctx.provisioner(&cfg).await;
    a.recover().await.unwrap();
    let c1 = ConversationId::new_random();
    let d1 = a.provision(req(c1)).await.unwrap();
    a.ensure_ready(&d1, Duration::from_secs(60)).await.unwrap();

    // B starts later: recovers A's pod from labels, with the key from its Secret.
    let b = ctx.provisioner(&cfg).await;
    let found = b.recover().await.unwrap();
    assert_eq!(found.len(), 1);
    let b1 = &found[0];
    assert_eq!(b1.id(), d1.id());
    assert_eq!(b1.state(), DownstreamState::Ready);
    assert_eq!(b1.endpoint().unwrap().key, d1.endpoint().unwrap().key);
    assert_eq!(b1.owner().map(|o| o.as_str()), Some("alice"));

    // A pod A creates now reaches B through B's watch (readiness included).
    let c2 = ConversationId::new_random();
    let d2 = a.provision(req(c2)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let b2 = loop {
        if let Some(d) = b.get(d2.id()) {
            if d.state() == DownstreamState::Ready {
                break d;
            }
        }
        assert!(Instant::now() < deadline, "B never saw A's second pod ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(DownstreamClient::default().is_alive(&b2.endpoint().unwrap(), Duration::from_secs(5)).await);

    // find() answers from the cluster for a conversation B has not seen (and None for none).
    let c3 = ConversationId::new_random();
    let d3 = a.provision(req(c3)).await.unwrap();
    let f3 = b.find(&c3).await.unwrap().expect("found by name");
    assert_eq!(f3.id(), d3.id());
    assert!(b.find(&ConversationId::new_random()).await.unwrap().is_none());

    // Concurrent provision of the same conversation by both: one set of objects (409 adopted).
    let c4 = ConversationId::new_random();
    let (r1, r2) = tokio::join!(a.provision(req(c4)), b.provision(req(c4)));
    let (x, y) = (r1.unwrap(), r2.unwrap());
    a.ensure_ready(&x, Duration::from_secs(60)).await.unwrap();
    b.ensure_ready(&y, Duration::from_secs(60)).await.unwrap();
    assert_eq!(x.endpoint().unwrap().key, y.endpoint().unwrap().key, "one Secret, one key");

    // B releases what A created: A forgets it (no resurrection by A's next ensure_ready).
    let bd1 = b.get(d1.id()).unwrap();
    b.release(&bd1, c1, 0).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.get(d1.id()).is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.get(d1.id()).is_none(), "A still routes a conversation B released");
    let r = a.ensure_ready(&d1, Duration::from_secs(10)).await;
    assert!(matches!(r, Err(ProvisionError::NotReady(nestor_core::downstream::NotReady::Released))), "{r:?}");

    for ds in a.list() {
        a.release(&ds, ds.primary().unwrap(), 0).await.unwrap();
    }
    let o = wait_objects(&ctx.node.ns, (0, 0, 0), Duration::from_secs(30)).await;
    assert_eq!((o.0.len(), o.1.len(), o.2.len()), (0, 0, 0), "{o:?}");
    a.shutdown().await;
    b.shutdown().await;
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_that_never_becomes_ready_fails_in_bounded_time() {
    let env = nestor_test_support::require_kube!();
    let ctx = Ctx::new(env, "k-bad").await;
    let cfg = KubernetesConfig {
        image: Some("nestor/does-not-exist:0".into()),
        startup_timeout_secs: Some(6.0),
        ..ctx.cfg()
    };
    let p = ctx.provisioner(&cfg).await;
    p.recover().await.unwrap();
    let conv = ConversationId::new_random();
    let ds = p.provision(req(conv)).await.unwrap();
    let t0 = Instant::now();
    let r = p.ensure_ready(&ds, Duration::from_secs(60)).await;
    let took = t0.elapsed();
    let msg = match r {
        Err(ProvisionError::NotReady(nestor_core::downstream::NotReady::Failed(m))) => m.to_string(),
        other => panic!("expected a failed start, got {other:?}"),
    };
    assert!(took < Duration::from_secs(20), "bounded by the startup timeout: {took:?}");
    assert!(msg.contains("did not become ready") && msg.contains("ErrImagePull"), "{msg}");
    assert!(matches!(ds.state(), DownstreamState::Failed(_)));
    // Its pod is deleted; Secret and PVC wait for release (the aggregator releases a failed create).
    let o = wait_objects(&ctx.node.ns, (0, 1, 1), Duration::from_secs(30)).await;
    assert_eq!(o.0.len(), 0, "{o:?}");
    p.release(&ds, conv, 0).await.unwrap();
    let o = wait_objects(&ctx.node.ns, (0, 0, 0), Duration::from_secs(30)).await;
    assert_eq!((o.0.len(), o.1.len(), o.2.len()), (0, 0, 0), "{o:?}");
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_permissions_are_named() {
    let env = nestor_test_support::require_kube!();
    let ctx = Ctx::new(env, "k-rbac").await;
    // get/list/watch only: the start-up check names every missing verb.
    let cfg = KubernetesConfig { kubeconfig: Some(ctx.env.readonly.clone()), ..ctx.cheap_cfg() };
    let p = ctx.provisioner(&cfg).await;
    let e = p.recover().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ProvisionError::Config(_)), "{e:?}");
    for want in ["create pods", "delete pods", "create secrets", "patch secrets", "create persistentvolumeclaims"] {
        assert!(msg.contains(want), "{want} missing from: {msg}");
    }
    assert!(!msg.contains("list pods"), "{msg}");
    assert!(msg.contains(&ctx.node.ns.name), "{msg}");

    // Without the check, the failing call itself names its verb.
    let cfg = KubernetesConfig { check_permissions: Some(false), ..cfg };
    let p = ctx.provisioner(&cfg).await;
    p.recover().await.unwrap();
    let e = p.provision(req(ConversationId::new_random())).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("not allowed to create secrets") && msg.contains("403"), "{msg}");

    // The shipped Role is enough: the check passes for user nestor.
    let p = ctx.provisioner(&ctx.cheap_cfg()).await;
    assert!(p.missing_permissions().await.unwrap().is_empty());
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_at_start_is_a_clear_bounded_error() {
    let env = nestor_test_support::require_kube!();
    // The nestor kubeconfig, pointed at a loopback port nothing listens on.
    let text = std::fs::read_to_string(&env.nestor).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("down.kubeconfig");
    let api_port = std::env::var("NESTOR_KUBE_API_PORT").unwrap_or_else(|_| "26443".into());
    std::fs::write(&path, text.replace(&format!("127.0.0.1:{api_port}"), &format!("127.0.0.1:{port}"))).unwrap();
    let cfg = KubernetesConfig {
        kubeconfig: Some(path),
        namespace: Some("nowhere".into()),
        image: Some(agent_server_image()),
        api_timeout_secs: Some(3.0),
        ..Default::default()
    };
    let p = KubernetesProvisioner::new(&cfg).await.unwrap();
    let t0 = Instant::now();
    let e = p.recover().await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let msg = e.to_string();
    assert!(matches!(e, ProvisionError::Unavailable { .. }), "{e:?}");
    assert!(msg.contains("unreachable") && msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
}

#[test]
fn shipped_role_grants_exactly_what_nestor_uses() {
    let role = nestor_test_support::kube_env::shipped_role().unwrap();
    let mut granted: Vec<(String, String)> = Vec::new();
    for r in role.rules.unwrap_or_default() {
        assert_eq!(r.api_groups, Some(vec![String::new()]), "core group only");
        for res in r.resources.unwrap_or_default() {
            for v in &r.verbs {
                granted.push((v.clone(), res.clone()));
            }
        }
    }
    granted.sort();
    let mut used: Vec<(String, String)> = nestor_provisioner::kubernetes::required_permissions(
        nestor_provisioner::kubernetes::StorageMode::Pvc,
    )
    .into_iter()
    .map(|(v, r)| (v.to_owned(), r.to_owned()))
    .collect();
    used.sort();
    assert_eq!(granted, used);
}
