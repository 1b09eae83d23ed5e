//! `[provisioner.kubernetes]`: the settings as written, and their validated form.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Toleration;
use serde::Deserialize;

use crate::ProvisionError;

/// Where a conversation's state (`/workspace`) lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    /// A PersistentVolumeClaim per conversation: state survives the pod (idle stop, node
    /// loss, nestor restarts). Default.
    #[default]
    Pvc,
    /// An emptyDir: state dies with the pod. Idle stop is then skipped (it would lose the
    /// conversation), unless workspace persistence is on: the next pod restores the
    /// conversation's files from the bucket.
    #[serde(alias = "emptyDir", alias = "empty-dir")]
    EmptyDir,
}

/// How nestor reaches a pod's agent-server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Reach {
    /// `http://<status.podIP>:<port>`: nestor runs inside the cluster (or can route to pod
    /// IPs). Default, and what a real cluster uses: no Service per pod, no DNS, no kube-proxy.
    #[default]
    PodIp,
    /// `http://<status.podIP>:<annotation nestor.dev/host-port>`: only for the test node
    /// agent (`nestor-node-agent`), which runs each pod as a Docker container publishing the
    /// agent-server on a random loopback port and writes that port into the annotation.
    /// Never honoured unless configured: on a real cluster anyone who can annotate a pod
    /// could otherwise redirect nestor.
    HostPortAnnotation,
}

/// `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(&self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Requests and limits of the agent-server container (Kubernetes quantities).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "d_cpu_request")]
    pub cpu_request: String,
    #[serde(default = "d_memory_request")]
    pub memory_request: String,
    /// Empty: no limit.
    #[serde(default = "d_cpu_limit")]
    pub cpu_limit: String,
    #[serde(default = "d_memory_limit")]
    pub memory_limit: String,
    /// Empty: no limit.
    #[serde(default)]
    pub ephemeral_storage_limit: String,
}

fn d_cpu_request() -> String {
    "250m".into()
}
fn d_memory_request() -> String {
    "512Mi".into()
}
fn d_cpu_limit() -> String {
    "2".into()
}
fn d_memory_limit() -> String {
    "4Gi".into()
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            cpu_request: d_cpu_request(),
            memory_request: d_memory_request(),
            cpu_limit: d_cpu_limit(),
            memory_limit: d_memory_limit(),
            ephemeral_storage_limit: String::new(),
        }
    }
}

/// `[provisioner.kubernetes]` as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// A kubeconfig file. Default: `$KUBECONFIG`, `~/.kube/config`, else the in-cluster
    /// service account (what the Deployment in deploy/kubernetes uses).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// A context of that kubeconfig (default: its current context).
    #[serde(default)]
    pub context: Option<String>,
    /// Where agent-server pods go. Default: the kubeconfig context's namespace (in-cluster:
    /// nestor's own). A dedicated namespace is strongly advised: nestor lists secrets there.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Label value (`nestor.dev/instance`) marking this deployment's objects, and the prefix
    /// of their names. Replicas of one nestor deployment share it; two deployments sharing a
    /// namespace must differ. `[a-z0-9-]`, at most 20 characters. Default `nestor`.
    #[serde(default)]
    pub instance: Option<String>,
    /// The agent-server image (required), e.g. `nestor/agent-server:1.58.2`.
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub image_pull_policy: PullPolicy,
    /// Override the image's entrypoint (`command`) and its arguments (`args`). Default: the
    /// image's, which must start the agent-server on 0.0.0.0:`port` (ours does; upstream's
    /// needs `args = ["--host", "0.0.0.0", "--port", "8000"]` if its default differs).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// Names of Secrets for pulling the image from a private registry.
    #[serde(default)]
    pub image_pull_secrets: Vec<String>,
    /// The agent-server's port in the container (the image must listen on 0.0.0.0 there).
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub reach: Reach,
    #[serde(default)]
    pub storage: StorageMode,
    /// StorageClass of the PVCs (default: the cluster's default class).
    #[serde(default)]
    pub storage_class: Option<String>,
    /// Size of each PVC (default `10Gi`); with `storage = "emptydir"`, the emptyDir's limit.
    #[serde(default)]
    pub storage_size: Option<String>,
    #[serde(default)]
    pub resources: Resources,
    /// uid/gid the agent-server runs as (default 10001, the image's `openhands`; 0 refused).
    #[serde(default)]
    pub run_as_user: Option<i64>,
    #[serde(default)]
    pub run_as_group: Option<i64>,
    /// `runtimeClassName` of the pods, e.g. `gvisor` or `kata` (must exist in the cluster).
    #[serde(default)]
    pub runtime_class_name: Option<String>,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Kubernetes tolerations as in a pod spec (`{key, operator, value, effect}`).
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// Service account of the pods (default: none is mounted; the agent needs no API access).
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// Extra environment for every agent-server (e.g. LLM settings).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Extra labels and annotations of every pod.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Seconds from pod creation to Ready before the start counts as failed (default 180:
    /// image pulls are slow on a cold node).
    #[serde(default)]
    pub startup_timeout_secs: Option<f64>,
    /// Seconds any single Kubernetes API call may take (default 15).
    #[serde(default)]
    pub api_timeout_secs: Option<f64>,
    /// terminationGracePeriodSeconds of the pods (default 10).
    #[serde(default)]
    pub termination_grace_secs: Option<i64>,
    /// A conversation whose create never completed is removed after this many seconds
    /// (default 600).
    #[serde(default)]
    pub provisioning_grace_secs: Option<f64>,
    /// Check at start, with SelfSubjectAccessReviews, that nestor holds every verb it uses
    /// (default true): a missing one fails the start with its name.
    #[serde(default)]
    pub check_permissions: Option<bool>,
    /// `[provisioner.kubernetes.workspace_sync]`: the pods' sync containers when
    /// `[workspace_storage]` is on (see `super::persistence`).
    #[serde(default)]
    pub workspace_sync: super::persistence::WorkspaceSyncConfig,
}

/// Environment nestor sets itself.
const RESERVED_ENV: &[&str] = &[
    "SESSION_API_KEY",
    "OH_SESSION_API_KEYS_0",
    "OH_SECRET_KEY",
    "OH_CONVERSATIONS_PATH",
    "OH_BASH_EVENTS_DIR",
    "OH_PERSISTENCE_DIR",
    "OH_WORKSPACE_PATH",
    "HOME",
];

/// The validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub namespace: Option<String>,
    pub instance: String,
    pub image: String,
    pub image_pull_policy: PullPolicy,
    pub image_pull_secrets: Vec<String>,
    pub command: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
    pub port: u16,
    pub reach: Reach,
    pub storage: StorageMode,
    pub storage_class: Option<String>,
    pub storage_size: String,
    pub resources: Resources,
    pub run_as_user: i64,
    pub run_as_group: i64,
    pub runtime_class_name: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub service_account_name: Option<String>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub startup_timeout: Duration,
    pub api_timeout: Duration,
    pub termination_grace_secs: i64,
    pub provisioning_grace: Duration,
    pub check_permissions: bool,
    /// Checked against `[workspace_storage]` when persistence is on.
    pub workspace_sync: super::persistence::WorkspaceSyncConfig,
}

fn cfg_err(s: impl Into<String>) -> ProvisionError {
    ProvisionError::Config(s.into())
}

fn secs(v: Option<f64>, def: f64, what: &str) -> Result<Duration, ProvisionError> {
    let v = v.unwrap_or(def);
    // Bounded: `Duration::from_secs_f64` panics past ~1.8e19 s (found while fuzzing the config).
    if v.is_finite() && v > 0.0 && v <= 1e9 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(cfg_err(format!("provisioner.kubernetes.{what} must be a positive number of seconds")))
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most `max` characters.
pub fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl KubernetesConfig {
    pub fn validate(&self) -> Result<Settings, ProvisionError> {
        let image = self.image.clone().filter(|s| !s.trim().is_empty()).ok_or_else(|| {
            cfg_err("provisioner.kubernetes.image is required (e.g. \"nestor/agent-server:1.58.2\", built by scripts/build-agent-server-image.sh, or the upstream agent-server image)")
        })?;
        let instance = self.instance.clone().unwrap_or_else(|| "nestor".into());
        if !is_dns_label(&instance, 20) {
            return Err(cfg_err(format!(
                "provisioner.kubernetes.instance {instance:?} must be 1-20 characters of a-z, 0-9 and '-' (not at either end)"
            )));
        }
        if let Some(ns) = &self.namespace {
            if !is_dns_label(ns, 63) {
                return Err(cfg_err(format!("provisioner.kubernetes.namespace {ns:?} is not a valid namespace name")));
            }
        }
        let run_as_user = self.run_as_user.unwrap_or(10001);
        let run_as_group = self.run_as_group.unwrap_or(10001);
        if run_as_user <= 0 || run_as_group < 0 {
            return Err(cfg_err(
                "provisioner.kubernetes.run_as_user must be a non-root uid (agent-servers never run as root)",
            ));
        }
        for k in self.env.keys() {
            if RESERVED_ENV.contains(&k.as_str()) {
                return Err(cfg_err(format!(
                    "provisioner.kubernetes.env must not set {k}: nestor sets it for every agent-server"
                )));
            }
        }
        for k in self.labels.keys() {
            if k.starts_with("nestor.dev/") || k.starts_with("app.kubernetes.io/") {
                return Err(cfg_err(format!("provisioner.kubernetes.labels must not set {k}: nestor owns that label")));
            }
        }
        let port = self.port.unwrap_or(8000);
        if port == 0 {
            return Err(cfg_err("provisioner.kubernetes.port must not be 0"));
        }
        let grace = self.termination_grace_secs.unwrap_or(10);
        if grace < 0 {
            return Err(cfg_err("provisioner.kubernetes.termination_grace_secs must not be negative"));
        }
        Ok(Settings {
            kubeconfig: self.kubeconfig.clone(),
            context: self.context.clone(),
            namespace: self.namespace.clone(),
            instance,
            image,
            image_pull_policy: self.image_pull_policy,
            image_pull_secrets: self.image_pull_secrets.clone(),
            command: self.command.clone(),
            args: self.args.clone(),
            port,
            reach: self.reach,
            storage: self.storage,
            storage_class: self.storage_class.clone().filter(|s| !s.is_empty()),
            storage_size: self.storage_size.clone().unwrap_or_else(|| "10Gi".into()),
            resources: self.resources.clone(),
            run_as_user,
            run_as_group,
            runtime_class_name: self.runtime_class_name.clone().filter(|s| !s.is_empty()),
            node_selector: self.node_selector.clone(),
            tolerations: self.tolerations.clone(),
            service_account_name: self.service_account_name.clone().filter(|s| !s.is_empty()),
            env: self.env.clone(),
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
            startup_timeout: secs(self.startup_timeout_secs, 180.0, "startup_timeout_secs")?,
            api_timeout: secs(self.api_timeout_secs, 15.0, "api_timeout_secs")?,
            termination_grace_secs: grace,
            provisioning_grace: secs(self.provisioning_grace_secs, 600.0, "provisioning_grace_secs")?,
            check_permissions: self.check_permissions.unwrap_or(true),
            workspace_sync: self.workspace_sync.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> KubernetesConfig {
        KubernetesConfig { image: Some("img:1".into()), ..Default::default() }
    }

    #[test]
    fn defaults_are_hardened_and_documented() {
        let s = base().validate().unwrap();
        assert_eq!(s.instance, "nestor");
        assert_eq!((s.run_as_user, s.run_as_group), (10001, 10001));
        assert_eq!(s.port, 8000);
        assert_eq!(s.reach, Reach::PodIp);
        assert_eq!(s.storage, StorageMode::Pvc);
        assert_eq!(s.storage_size, "10Gi");
        assert!(s.check_permissions);
    }

    #[test]
    fn refuses_bad_settings_with_the_key_named() {
        let e = KubernetesConfig::default().validate().unwrap_err().to_string();
        assert!(e.contains("provisioner.kubernetes.image"), "{e}");
        for (c, key) in [
            (KubernetesConfig { instance: Some("Bad_Name".into()), ..base() }, "instance"),
            (KubernetesConfig { instance: Some("a".repeat(21)), ..base() }, "instance"),
            (KubernetesConfig { namespace: Some("-x".into()), ..base() }, "namespace"),
            (KubernetesConfig { run_as_user: Some(0), ..base() }, "run_as_user"),
            (KubernetesConfig { startup_timeout_secs: Some(0.0), ..base() }, "startup_timeout_secs"),
            (
                KubernetesConfig { env: [("SESSION_API_KEY".to_string(), "x".to_string())].into(), ..base() },
                "SESSION_API_KEY",
            ),
            (
                KubernetesConfig { labels: [("nestor.dev/instance".to_string(), "x".to_string())].into(), ..base() },
                "nestor.dev/instance",
            ),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn parses_from_toml_with_kubernetes_shaped_tolerations() {
        let c: KubernetesConfig = toml::from_str(
            r#"
image = "img:1"
namespace = "agents"
storage = "emptydir"
reach = "host-port-annotation"
image_pull_policy = "Never"
runtime_class_name = "gvisor"
node_selector = { "pool" = "agents" }
tolerations = [{ key = "dedicated", operator = "Equal", value = "agents", effect = "NoSchedule" }]
[resources]
memory_limit = "2Gi"
"#,
        )
        .unwrap();
        let s = c.validate().unwrap();
        assert_eq!(s.storage, StorageMode::EmptyDir);
        assert_eq!(s.reach, Reach::HostPortAnnotation);
        assert_eq!(s.image_pull_policy, PullPolicy::Never);
        assert_eq!(s.tolerations[0].key.as_deref(), Some("dedicated"));
        assert_eq!(s.resources.memory_limit, "2Gi");
        assert_eq!(s.resources.cpu_limit, "2");
    }
}
