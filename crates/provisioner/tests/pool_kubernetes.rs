//! The `pool` provisioner over the `kubernetes` backend against a real kube-apiserver + etcd
//! (scripts/setup-kube.sh) with pods run by the test node agent as Docker containers of the
//! real agent-server image: warm pods are dormant and of no conversation, creates are served
//! from the pool without a cold start, the pool refills, a claimed pod serves only its own
//! conversation (also after it is stopped and re-created under its warm name), and two
//! replicas (two provisioners, one cluster, no shared memory) claiming the same warm pods at
//! once never share one. A claim whose relabel of pod and PVC never happened (paused: the
//! replica died right after its claim) is still found and served by another replica (its
//! Secret is the record), deleted whole, never offered as warm again, and relabelled by the
//! next replica's sweep.
//!
//! One test (agent-server pods boot in 10-30 s on 2 cores: one namespace, one sequence, 17
//! pod starts). Prerequisites and skipping as in kubernetes.rs (`NESTOR_TEST_REQUIRE_KUBE=1`
//! in CI).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::ListParams;
use nestor_core::{ConversationId, Downstream, DownstreamClient, DownstreamState, UserId};
use nestor_provisioner::kubernetes::{KubernetesConfig, KubernetesProvisioner, Reach};
use nestor_provisioner::pool::{PoolConfig, PoolProvisioner};
use nestor_provisioner::{ProvisionRequest, Provisioner};
use nestor_test_support::kube_env::{agent_server_image, KubeEnv};
use nestor_test_support::node_agent::TestNode;

/// A namespace + node agent for one test, removed afterwards.
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
            env: BTreeMap::from([("OH_WEBHOOKS_0_BASE_URL".to_owned(), "http://127.0.0.1:9/nestor/webhooks".to_owned())]),
            ..Default::default()
        }
    }

    /// One replica: a kubernetes provisioner of its own (own client, own watch) in a pool.
    async fn replica(&self, min_idle: usize, max_size: usize) -> PoolProvisioner {
        self.replica_with(min_idle, max_size).await.0
    }

    /// A replica and its kubernetes backend (the same one: cheap clone, shared state).
    async fn replica_with(&self, min_idle: usize, max_size: usize) -> (PoolProvisioner, KubernetesProvisioner) {
        let backend = KubernetesProvisioner::new(&self.cfg()).await.expect("provisioner");
        let cfg = PoolConfig { min_idle, max_size, ..Default::default() };
        (PoolProvisioner::new(&cfg, Arc::new(backend.clone()), DownstreamClient::default()).unwrap(), backend)
    }

    fn pods(&self) -> kube::Api<Pod> {
        kube::Api::namespaced(self.node.ns.client(), &self.node.ns.name)
    }

    fn secrets(&self) -> kube::Api<Secret> {
        kube::Api::namespaced(self.node.ns.client(), &self.node.ns.name)
    }

    fn pvcs(&self) -> kube::Api<PersistentVolumeClaim> {
        kube::Api::namespaced(self.node.ns.client(), &self.node.ns.name)
    }

    /// The labels of pod `name`.
    async fn pod_labels(&self, name: &str) -> BTreeMap<String, String> {
        self.pods().get(name).await.unwrap().metadata.labels.unwrap_or_default()
    }

    /// The name of the objects of `conv` (from its Secret's label).
    async fn object_name(&self, conv: ConversationId) -> String {
        let lp = ListParams::default().labels(&format!("nestor.dev/conversation={}", conv.hex()));
        let found = self.secrets().list(&lp).await.unwrap().items;
        assert_eq!(found.len(), 1, "one Secret of {conv}");
        found[0].metadata.name.clone().unwrap()
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

/// Create `conv` on its server, as nestor does (prepare_create, then mark_active).
async fn create_on(p: &PoolProvisioner, ds: &Arc<Downstream>, conv: ConversationId) {
    let mut body = serde_json::json!({
        "conversation_id": conv.to_string(),
        "agent": {"kind": "Agent", "llm": {"usage_id": "agent", "model": "openai/fake",
                  "base_url": "http://127.0.0.1:9/v1", "api_key": "x"}, "tools": []},
        "workspace": {"kind": "LocalWorkspace", "working_dir": "/elsewhere"},
        "autotitle": false
    })
    .as_object()
    .unwrap()
    .clone();
    p.prepare_create(ds, &mut body);
    let (status, created) = call(ds, Method::POST, "/api/conversations", Some(serde_json::Value::Object(body))).await;
    assert!((200..300).contains(&status), "{status}: {created}");
    p.mark_active(ds);
}

/// The conversations a server holds.
async fn held(ds: &Downstream) -> Vec<String> {
    let (status, page) = call(ds, Method::GET, "/api/conversations/search?limit=100", None).await;
    assert_eq!(status, 200, "{page}");
    page["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().replace('-', "")).collect()
}

/// The pod (by name) each conversation's label points at.
async fn pods_by_conversation(ctx: &Ctx) -> HashMap<String, Vec<String>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for p in ctx.pods().list(&Default::default()).await.unwrap().items {
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if let Some(c) = p.metadata.labels.as_ref().and_then(|l| l.get("nestor.dev/conversation")) {
            m.entry(c.clone()).or_default().push(p.metadata.name.clone().unwrap());
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creates_are_served_warm_the_pool_refills_and_replicas_never_share_a_pod() {
    let env = nestor_test_support::require_kube!();
    let ctx = Ctx::new(env, "k-pool").await;
    const N: usize = 10;
    // A pool big enough for the N creates (they boot in parallel, which is the shortest wall
    // time here); max_size N + 4: after the N claims the pool refills to 4 (not min_idle),
    // which bounds the pods this test boots (17 in all): 2 for the lagging relabel, LEFT for
    // the race.
    const WARM: usize = N;
    const LEFT: usize = 2;
    const LAG: usize = 2;
    let p = ctx.replica(WARM, N + LEFT + LAG).await;
    assert!(p.recover().await.unwrap().is_empty());
    let t0 = Instant::now();
    assert!(p.wait_idle(WARM, Duration::from_secs(300)).await, "{:?}", p.stats());
    eprintln!("TIMING {WARM} warm pods ready: {:?}", t0.elapsed());

    // A warm pod: dormant, of no conversation, no webhook settings, keys from its own Secret.
    let warm = p.idle_downstreams()[0].clone();
    assert_eq!(call(&warm, Method::GET, "/api/conversations/count", None).await.0, 503, "dormant");
    let (_, init) = call(&warm, Method::GET, "/api/init", None).await;
    assert_eq!(init["state"], "dormant");
    let pods = ctx.pods().list(&Default::default()).await.unwrap().items;
    assert_eq!(pods.len(), WARM);
    for pod in &pods {
        let l = pod.metadata.labels.as_ref().unwrap();
        assert!(l.contains_key("nestor.dev/warm") && !l.contains_key("nestor.dev/conversation"), "{l:?}");
        let env = pod.spec.as_ref().unwrap().containers[0].env.as_ref().unwrap();
        // Webhook settings only as optional references to Secret keys the claim writes.
        for e in env.iter().filter(|e| e.name.starts_with("OH_WEBHOOKS_")) {
            assert!(e.value.is_none(), "no literal webhook settings in a warm pod: {e:?}");
            let r = e.value_from.as_ref().and_then(|f| f.secret_key_ref.as_ref()).expect("from the Secret");
            assert!(r.optional == Some(true) && r.key.starts_with("late."), "{r:?}");
        }
        assert!(env.iter().all(|e| e.value_from.as_ref().and_then(|f| f.secret_key_ref.as_ref()).is_none_or(|r| Some(&r.name) == pod.metadata.name.as_ref())));
    }

    // N creates, each taking an idle pod (waiting, when the pool is momentarily empty, for
    // the refill rather than starting cold).
    let mut convs = Vec::new();
    let mut claim_times = Vec::new();
    for _ in 0..N {
        assert!(p.wait_idle(1, Duration::from_secs(300)).await, "{:?}", p.stats());
        let conv = ConversationId::new_random();
        let t = Instant::now();
        let ds = p.provision(req(conv)).await.unwrap();
        claim_times.push(t.elapsed());
        assert_eq!(ds.state(), DownstreamState::Ready, "a claimed pod is ready at once");
        assert_eq!(ds.primary(), Some(conv));
        convs.push((conv, ds));
    }
    claim_times.sort();
    eprintln!("TIMING claim p50 {:?} max {:?}", claim_times[N / 2], claim_times[N - 1]);
    let s = p.stats();
    assert_eq!((s.claims, s.cold_starts, s.failed_claims), (N as u64, 0, 0), "{s:?}");

    // Each claimed server carries its own conversation and nothing else, in its own pod.
    for (conv, ds) in &convs {
        create_on(&p, ds, *conv).await;
    }
    for (conv, ds) in &convs {
        assert_eq!(held(ds).await, vec![conv.hex()]);
    }
    let by_conv = pods_by_conversation(&ctx).await;
    let mut names = HashSet::new();
    for (conv, _) in &convs {
        let pods = &by_conv[&conv.hex()];
        assert_eq!(pods.len(), 1, "{pods:?}");
        assert!(pods[0].contains("-warm-"), "claimed pods keep their warm names: {pods:?}");
        assert!(names.insert(pods[0].clone()), "two conversations on {}", pods[0]);
    }
    // The Secret is the conversation's now: its keys, no longer dormant on a restart.
    let (conv0, ds0) = convs[0].clone();
    let sec = ctx.secrets().get(&by_conv[&conv0.hex()][0]).await.unwrap();
    let data = sec.data.unwrap();
    assert_eq!(data["session-api-key"].0, ds0.endpoint().unwrap().key.clone().unwrap().expose().as_bytes());
    assert_eq!(data["deferred-init"].0, b"false");
    // The late-bound settings, for a container restarted inside the claimed pod.
    assert_eq!(data["late.OH_WEBHOOKS_0_BASE_URL"].0, b"http://127.0.0.1:9/nestor/webhooks");
    assert_eq!(sec.metadata.labels.unwrap()["nestor.dev/conversation"], conv0.hex());

    // The pool refilled behind the claims (N claimed, more started) and refills up to max_size.
    let t = Instant::now();
    assert!(p.wait_idle(LEFT + LAG, Duration::from_secs(300)).await, "refilled: {:?}", p.stats());
    eprintln!("TIMING refill to {}: {:?} ({:?})", LEFT + LAG, t.elapsed(), p.stats());
    assert_eq!(p.stats().started, (N + LEFT + LAG) as u64, "{:?}", p.stats());

    // nestor dies; replica A starts (no refill: min_idle 0), re-adopting all the
    // conversations and the warm pods, starting none.
    p.abandon();
    drop(p);
    let (a, ka) = ctx.replica_with(0, 2 * N + 8).await;
    let owned = a.recover().await.unwrap();
    assert_eq!(owned.len(), N);
    assert!(owned.iter().all(|d| d.state() == DownstreamState::Ready));
    assert_eq!((a.stats().idle, a.stats().started), (LEFT + LAG, 0), "{:?}", a.stats());

    // A claims LAG pods whose relabel never happens (paused: as if A died right after each
    // claim). The Secret, patched by the claim, is the record; the pods still say warm.
    ka.pause_relabel_for_tests(true);
    let (late, gone) = (ConversationId::new_random(), ConversationId::new_random());
    let late_ds = a.provision(req(late)).await.unwrap();
    let gone_ds = a.provision(req(gone)).await.unwrap();
    ka.pause_relabel_for_tests(false);
    let (late_name, gone_name) = (ctx.object_name(late).await, ctx.object_name(gone).await);
    for name in [&late_name, &gone_name] {
        let l = ctx.pod_labels(name).await;
        assert!(l.contains_key("nestor.dev/warm") && !l.contains_key("nestor.dev/conversation"), "relabel paused: {l:?}");
    }
    assert_eq!((late_ds.state(), gone_ds.state()), (DownstreamState::Ready, DownstreamState::Ready));
    create_on(&a, &late_ds, late).await;
    // A second replica's lookup (a fresh provisioner: no watch, no recover yet) finds both by
    // their Secrets and reaches the right server with the right key.
    let fresh = KubernetesProvisioner::new(&ctx.cfg()).await.unwrap();
    let f_late = fresh.find(&late).await.unwrap().expect("found by its Secret");
    assert_eq!(f_late.state(), DownstreamState::Ready);
    assert_eq!(held(&f_late).await, vec![late.hex()]);
    // Deleted before the relabel (by the other replica): pod, Secret and PVC all go.
    let f_gone = fresh.find(&gone).await.unwrap().expect("found by its Secret");
    fresh.release(&f_gone, gone, 0).await.unwrap();
    fresh.shutdown().await;
    wait_gone(&ctx, &gone_name).await;

    // Replica B starts now: its warm listing does not offer the claimed pods (only the LEFT
    // still warm), it serves `late` (routed by the Secret's name while the pod says warm), and
    // its sweep finishes the relabel A never did.
    let b = ctx.replica(0, 2 * N + 8).await;
    let owned = b.recover().await.unwrap();
    assert_eq!(owned.len(), N + 1);
    assert!(owned.iter().all(|d| d.state() == DownstreamState::Ready));
    assert!(owned.iter().any(|d| d.primary() == Some(late)) && !owned.iter().any(|d| d.primary() == Some(gone)));
    assert_eq!((b.stats().idle, b.stats().started), (LEFT, 0), "{:?}", b.stats());
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctx.pod_labels(&late_name).await.get("nestor.dev/conversation") != Some(&late.hex()) {
        assert!(Instant::now() < deadline, "B's sweep relabels the claimed pod: {:?}", ctx.pod_labels(&late_name).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pvc = ctx.pvcs().get(&late_name).await.unwrap().metadata.labels.unwrap();
    assert_eq!(pvc.get("nestor.dev/conversation"), Some(&late.hex()));
    assert!(!pvc.contains_key("nestor.dev/warm"));
    // A's claims so far: the race below counts from here. A dropped `gone` when its pod went.
    let claims_before = a.stats().claims;
    assert_eq!(claims_before, LAG as u64);
    let ds0 = a.get(ds0.id()).unwrap();
    assert_eq!(ds0.owner().map(|o| o.as_str()), Some("alice"));
    assert_eq!(held(&ds0).await, vec![conv0.hex()]);

    // Both replicas claim the same warm pods at once: each pod goes to exactly one
    // conversation; the losers of a race (409) start cold.
    let racers: Vec<ConversationId> = (0..2 * LEFT).map(|_| ConversationId::new_random()).collect();
    let creates = racers.iter().enumerate().map(|(i, c)| {
        let r = if i % 2 == 0 { a.clone() } else { b.clone() };
        let c = *c;
        async move { (c, i % 2, r.provision(req(c)).await.expect("create")) }
    });
    let raced = futures::future::join_all(creates).await;
    let (sa, sb) = (a.stats(), b.stats());
    eprintln!("replica A {sa:?}\nreplica B {sb:?}");
    assert_eq!(sa.claims - claims_before + sb.claims, LEFT as u64, "each warm pod claimed exactly once");
    assert_eq!(sa.cold_starts + sb.cold_starts, LEFT as u64);

    // Meanwhile ds0 is stopped (idle policy) and started again: re-created under its warm
    // name, as an ordinary pod with its conversation's keys and state.
    let restart = async {
        a.stop(&ds0).await.unwrap();
        a.ensure_ready(&ds0, Duration::from_secs(240)).await.unwrap();
    };
    let ready = futures::future::join_all(raced.iter().map(|(_, i, ds)| {
        let r = if *i == 0 { &a } else { &b };
        r.ensure_ready(ds, Duration::from_secs(240))
    }));
    let ((), ready) = tokio::join!(restart, ready);
    ready.into_iter().for_each(|r| r.unwrap());
    assert_eq!(call(&ds0, Method::GET, &format!("/api/conversations/{conv0}"), None).await.0, 200);
    let pod = ctx.pods().get(&by_conv[&conv0.hex()][0]).await.unwrap();
    let env = pod.spec.unwrap().containers[0].env.clone().unwrap();
    assert!(env.iter().any(|e| e.name == "OH_WEBHOOKS_0_BASE_URL"));
    assert!(!env.iter().any(|e| e.name == "OH_DEFERRED_INIT"));

    for (conv, i, ds) in &raced {
        create_on(if *i == 0 { &a } else { &b }, ds, *conv).await;
    }
    for (conv, _, ds) in &raced {
        assert_eq!(held(ds).await, vec![conv.hex()], "a server holds only its own conversation");
    }
    let by_conv = pods_by_conversation(&ctx).await;
    let mut names = HashSet::new();
    for conv in convs.iter().map(|(c, _)| c).chain(racers.iter()).chain([&late]) {
        let pods = &by_conv[&conv.hex()];
        assert_eq!(pods.len(), 1, "{pods:?}");
        assert!(names.insert(pods[0].clone()), "two conversations on {}", pods[0]);
    }
    assert_eq!(names.iter().filter(|n| n.contains("-warm-")).count(), N + LEFT + 1);
    assert!(!by_conv.contains_key(&gone.hex()));

    // Replica A releases every conversation, B's too (found by label); nothing is left.
    for conv in convs.iter().map(|(c, _)| c).chain(racers.iter()).chain([&late]) {
        let ds = a.find(conv).await.unwrap().expect("replica A finds every conversation");
        a.release(&ds, *conv, 0).await.unwrap();
    }
    a.shutdown().await;
    b.shutdown().await;
    wait_empty(&ctx).await;

    // A nestor without a pool removes warm objects a pooled one left.
    let mut leftover: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "nestor-warm-0123456789abcdef", "labels": {
            "app.kubernetes.io/managed-by": "nestor", "nestor.dev/instance": "nestor", "nestor.dev/warm": "0123456789abcdef"},
            "annotations": {"nestor.dev/phase": "warm"}},
        "stringData": {"session-api-key": "a", "secret-key": "b", "deferred-init": "true"}
    }))
    .unwrap();
    leftover.metadata.namespace = Some(ctx.node.ns.name.clone());
    ctx.secrets().create(&Default::default(), &leftover).await.unwrap();
    let plain = KubernetesProvisioner::new(&ctx.cfg()).await.unwrap();
    assert!(plain.recover().await.unwrap().is_empty());
    wait_empty(&ctx).await;
    plain.shutdown().await;
    ctx.finish().await;
}

/// Wait (bounded) until pod, Secret and PVC `name` are gone.
async fn wait_gone(ctx: &Ctx, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pod = ctx.pods().get_opt(name).await.unwrap().is_some();
        let secret = ctx.secrets().get_opt(name).await.unwrap().is_some();
        let pvc = ctx.pvcs().get_opt(name).await.unwrap().is_some();
        if !(pod || secret || pvc) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} left: pod {pod}, Secret {secret}, PVC {pvc}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_empty(ctx: &Ctx) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (pods, secrets, pvcs) = ctx.node.ns.objects().await.unwrap();
        if (pods.len(), secrets.len(), pvcs.len()) == (0, 0, 0) || Instant::now() > deadline {
            assert_eq!((pods.len(), secrets.len(), pvcs.len()), (0, 0, 0), "{pods:?} {secrets:?} {pvcs:?}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
