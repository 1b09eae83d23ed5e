//! The real Kubernetes API server of the tests (scripts/setup-kube.sh) and a namespace per
//! test, with nestor's RBAC Role from deploy/kubernetes/rbac.yaml bound to the test user
//! `nestor` — so every test also checks that the shipped Role is enough.
//!
//! [`KubeEnv::get`] starts the cluster if its binaries are cached (it never builds them:
//! `scripts/setup-kube.sh build` does, in CI's set-up stage) and says why not otherwise, so
//! tests can skip unless `NESTOR_TEST_REQUIRE_KUBE=1`. [`TestNamespace`] removes every pod,
//! Secret and PVC in its namespace, then the namespace, when shut down or dropped (also when a
//! test panics).

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, PostParams};

/// The agent-server image the pods of the tests run (`NESTOR_TEST_AGENT_SERVER_IMAGE`, as
/// scripts/build-agent-server-image.sh tags it by default).
pub fn agent_server_image() -> String {
    std::env::var("NESTOR_TEST_AGENT_SERVER_IMAGE")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "nestor/agent-server:1.58.2".into())
}

/// The cluster, Docker and the agent-server image, or why not.
pub async fn prerequisites() -> Result<KubeEnv, String> {
    let env = KubeEnv::get()?;
    let docker = crate::node_agent::connect_docker(None).await.map_err(|e| format!("no Docker engine: {e}"))?;
    let image = agent_server_image();
    if docker.inspect_image(&image).await.is_err() {
        return Err(format!("image {image} is not present (scripts/build-agent-server-image.sh builds it)"));
    }
    Ok(env)
}

/// In an async test: the [`KubeEnv`] when [`prerequisites`] hold; otherwise skip the test
/// (return), or fail it when `NESTOR_TEST_REQUIRE_KUBE=1`.
#[macro_export]
macro_rules! require_kube {
    () => {
        match $crate::kube_env::prerequisites().await {
            Ok(env) => env,
            Err(why) => {
                if $crate::kube_env::kube_required() {
                    panic!("NESTOR_TEST_REQUIRE_KUBE=1 but: {why}");
                }
                eprintln!("SKIPPED (no test cluster): {why}");
                return;
            }
        }
    };
}

/// The repository root (this crate is crates/test-support).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

/// Kubeconfigs of the running test cluster.
#[derive(Debug, Clone)]
pub struct KubeEnv {
    /// system:masters (set-up and checks).
    pub admin: PathBuf,
    /// User `nestor`: only what a test's RoleBinding grants.
    pub nestor: PathBuf,
    /// User `nestor-readonly`: get/list/watch only (permission tests).
    pub readonly: PathBuf,
}

/// Whether CI demands the cluster (then a missing one fails instead of skipping).
pub fn kube_required() -> bool {
    std::env::var("NESTOR_TEST_REQUIRE_KUBE").as_deref() == Ok("1")
}

impl KubeEnv {
    /// Start (or find) the test cluster: `scripts/setup-kube.sh --no-build`, bounded.
    pub fn get() -> Result<KubeEnv, String> {
        static ENV: std::sync::OnceLock<Result<KubeEnv, String>> = std::sync::OnceLock::new();
        ENV.get_or_init(|| {
            let script = repo_root().join("scripts/setup-kube.sh");
            let out = std::process::Command::new("timeout")
                .arg("300")
                .arg("bash")
                .arg(&script)
                .arg("--no-build")
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                let tail: Vec<&str> = err.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect();
                return Err(format!("scripts/setup-kube.sh failed ({}): {}", out.status, tail.join(" | ")));
            }
            let admin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().lines().last().unwrap_or(""));
            let dir = admin.parent().ok_or("setup-kube.sh printed no kubeconfig")?.to_path_buf();
            Ok(KubeEnv { admin, nestor: dir.join("nestor.kubeconfig"), readonly: dir.join("nestor-readonly.kubeconfig") })
        })
        .clone()
    }

    pub async fn admin_client(&self) -> anyhow::Result<kube::Client> {
        crate::node_agent::kube_client(&self.admin).await
    }
}

/// The Role of deploy/kubernetes/rbac.yaml (the one for the agents' namespace).
pub fn shipped_role() -> anyhow::Result<Role> {
    let text = std::fs::read_to_string(repo_root().join("deploy/kubernetes/rbac.yaml"))?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc)?;
        if v.get("kind").and_then(|k| k.as_str()) == Some("Role") {
            return Ok(serde_json::from_value(v)?);
        }
    }
    anyhow::bail!("deploy/kubernetes/rbac.yaml has no Role")
}

/// A namespace of one test.
pub struct TestNamespace {
    pub name: String,
    client: kube::Client,
    admin: PathBuf,
    done: bool,
}

async fn bounded<T>(f: impl std::future::Future<Output = Result<T, kube::Error>>) -> anyhow::Result<T> {
    Ok(tokio::time::timeout(Duration::from_secs(20), f).await.map_err(|_| anyhow::anyhow!("timed out"))??)
}

impl TestNamespace {
    /// Create `<prefix>-<random>` with the shipped Role bound to user `nestor`, and a
    /// read-only Role bound to `nestor-readonly`.
    pub async fn create(env: &KubeEnv, prefix: &str) -> anyhow::Result<TestNamespace> {
        let name = format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        Self::create_named(&env.admin, &name).await
    }

    /// The same with a given name, as the admin of kubeconfig `admin`.
    pub async fn create_named(admin: &Path, name: &str) -> anyhow::Result<TestNamespace> {
        let env = KubeEnv { admin: admin.to_path_buf(), nestor: PathBuf::new(), readonly: PathBuf::new() };
        let client = env.admin_client().await?;
        let name = name.to_owned();
        let nss: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
        bounded(nss.create(&PostParams::default(), &ns)).await?;
        let me = TestNamespace { name: name.clone(), client: client.clone(), admin: env.admin.clone(), done: false };
        let roles: Api<Role> = Api::namespaced(client.clone(), &name);
        let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &name);
        let mut role = shipped_role()?;
        role.metadata.namespace = Some(name.clone());
        let role_name = role.metadata.name.clone().unwrap_or_default();
        bounded(roles.create(&PostParams::default(), &role)).await?;
        let ro: Role = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "readonly"},
            "rules": [{"apiGroups": [""], "resources": ["pods", "secrets", "persistentvolumeclaims"], "verbs": ["get", "list", "watch"]}],
        }))?;
        bounded(roles.create(&PostParams::default(), &ro)).await?;
        for (binding, role, user) in [("nestor", role_name.as_str(), "nestor"), ("readonly", "readonly", "nestor-readonly")] {
            let b: RoleBinding = serde_json::from_value(serde_json::json!({
                "metadata": {"name": binding},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
            }))?;
            bounded(bindings.create(&PostParams::default(), &b)).await?;
        }
        Ok(me)
    }

    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Names of the pods, Secrets and PVCs in the namespace (pods being deleted included).
    pub async fn objects(&self) -> anyhow::Result<(Vec<String>, Vec<String>, Vec<String>)> {
        objects(&self.client, &self.name).await
    }

    /// Remove everything in the namespace, then the namespace.
    pub async fn shutdown(mut self) {
        self.done = true;
        cleanup(&self.client, &self.name).await;
    }
}

fn names<K: kube::Resource>(items: Vec<K>) -> Vec<String> {
    let mut v: Vec<String> = items.into_iter().filter_map(|i| i.meta().name.clone()).collect();
    v.sort();
    v
}

async fn objects(client: &kube::Client, ns: &str) -> anyhow::Result<(Vec<String>, Vec<String>, Vec<String>)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default();
    Ok((
        names(bounded(pods.list(&lp)).await?.items),
        names(bounded(secrets.list(&lp)).await?.items),
        names(bounded(pvcs.list(&lp)).await?.items),
    ))
}

async fn cleanup(client: &kube::Client, ns: &str) {
    let dp = DeleteParams::default().grace_period(0);
    let lp = ListParams::default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let _ = bounded(pods.delete_collection(&dp, &lp)).await;
    let _ = bounded(secrets.delete_collection(&dp, &lp)).await;
    let _ = bounded(pvcs.delete_collection(&dp, &lp)).await;
    // Without a namespace controller the namespace itself stays Terminating (empty) until the
    // test cluster is reset; its contents are gone.
    let nss: Api<Namespace> = Api::all(client.clone());
    let _ = bounded(nss.delete(ns, &DeleteParams::default())).await;
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let admin = self.admin.clone();
        let ns = self.name.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(async move {
                    if let Ok(c) = crate::node_agent::kube_client(&admin).await {
                        cleanup(&c, &ns).await;
                    }
                });
            }
        })
        .join();
    }
}
