//! Workspace persistence (`[workspace_storage]`) for pods: nestor is not on the node, so the
//! pod persists itself, with nestor's own binary in two extra containers.
//!
//! ```text
//! initContainer  workspace-sync-pull   nestor workspace-sync pull: restores every missing
//!                                      tree (/workspace/state, /workspace/project) from the
//!                                      bucket, then exits; the agent-server starts only after
//!                                      it succeeded (the agent never sees a half-restored tree)
//! container      agent-server          state under /workspace/state (PERSISTED_STATE_ENV)
//! container      workspace-sync        nestor workspace-sync serve: pushes every
//!                                      push_interval_secs, the final push on SIGTERM (pod
//!                                      deletion), and serves GET /status and POST /push on
//!                                      port 8001 (the conversation's session key required)
//! volume         sync-cache (emptyDir) the local manifest copies, shared by the two sync
//!                                      containers only (not the agent's to tamper with)
//! ```
//!
//! Why containers in the pod rather than nestor reading the volume: nestor's replicas are
//! stateless and run anywhere; a PVC is mounted by one node, and an emptyDir only exists in
//! its pod. The pod is the only place the files are. The same store code (`nestor-workspace-
//! store`, one manifest + content-addressed blobs per tree, incremental, multipart, quotas)
//! runs in the sidecar that runs in nestor for the docker and process backends.
//!
//! Life cycle, as nestor drives it (see `super` for the pod life cycle):
//! * start (first start, resume after an idle stop, re-creation on another node): the init
//!   container restores what is missing. With `storage = "emptydir"` that is everything, every
//!   time, which is what makes idle stop possible without a PVC; with a PVC, trees present on
//!   the volume are newer than (or as new as) the stored copy and are kept. A pull that fails
//!   exits non-zero: the pod shows `Init:Error` and the kubelet retries with back-off; a start
//!   that is not Ready in time fails with that reason.
//! * running: the sidecar pushes every `push_interval_secs` (changed files only; deletions
//!   propagate); failures are retried with backoff and shown by `GET /status`, which nestor
//!   embeds in `GET /api/conversations/{id}/runtime`.
//! * stop (idle policy, `DELETE …/runtime`) and delete with `on_delete = "keep"`: nestor first
//!   asks the sidecar for a push (`POST /push`, bounded by `final_push_secs`) while the pod
//!   still runs; if it fails the pod is **not** deleted (the pod holds the only up-to-date
//!   copy) and the stop fails with the reason. Then the pod is deleted, and the sidecar pushes
//!   once more on SIGTERM (what the agent wrote meanwhile) within the pod's
//!   terminationGracePeriodSeconds, raised to `final_push_secs` + 5.
//! * delete with `on_delete = "purge"`: the pod is deleted at once (grace 0, no final push),
//!   and once it is gone nestor deletes the stored objects itself.
//! * nestor's exit: pods keep running and pushing (they are the deployment's, not the
//!   replica's); nothing to do.
//!
//! Which conversations: those created while persistence is on; their Secret carries the
//! annotation `nestor.dev/persisted: "true"`. Older conversations keep their layout (state
//! directly under /workspace) and their PVC, unpersisted, for life — turning persistence on
//! must not hide their state.
//!
//! Credentials: `credentials_secret` names an existing Secret whose keys become the sync
//! containers' environment (`envFrom`, e.g. `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`).
//! Without it, the credentials nestor itself uses (`[workspace_storage]` keys, else its
//! `AWS_*` environment) are written into the conversation's own Secret and referenced with
//! `secretKeyRef`, never as literals in the pod spec. With neither (IRSA, instance roles) the
//! sync containers use the pod's identity (`service_account_name`). Only the sync containers
//! get them; the agent-server never sees storage credentials.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar, Pod, ResourceRequirements,
    SecretEnvSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::ByteString;
use nestor_core::{ConversationId, UserId};
use nestor_workspace_store::WorkspaceStorageConfig;
use serde::Deserialize;

use super::config::{PullPolicy, Settings};
use super::objects::{from_secret, CONTAINER, STATE_MOUNT};
use crate::container_env::PERSISTED_STATE_ENV;
use crate::ProvisionError;

/// The init container's and the sidecar's names.
pub const PULL_CONTAINER: &str = "workspace-sync-pull";
pub const SYNC_CONTAINER: &str = "workspace-sync";
/// The sidecar's port name; the test node agent publishes it as `nestor.dev/host-port-sync`.
pub const SYNC_PORT_NAME: &str = "sync";
pub const SYNC_HOST_PORT: &str = "nestor.dev/host-port-sync";
const CACHE_VOLUME: &str = "sync-cache";
const CACHE_MOUNT: &str = "/var/lib/nestor/sync-cache";

/// The sync containers' environment (read by `nestor workspace-sync`).
pub const ENV_STORAGE: &str = "NESTOR_SYNC_STORAGE";
pub const ENV_OWNER: &str = "NESTOR_SYNC_OWNER";
pub const ENV_CONVERSATION: &str = "NESTOR_SYNC_CONVERSATION";
pub const ENV_ROOT: &str = "NESTOR_SYNC_ROOT";
pub const ENV_CACHE: &str = "NESTOR_SYNC_CACHE";
pub const ENV_PORT: &str = "NESTOR_SYNC_PORT";
pub const ENV_FINAL_PUSH_SECS: &str = "NESTOR_SYNC_FINAL_PUSH_SECS";
/// The conversation's session key (from its Secret): the sidecar's API requires it.
pub const ENV_KEY: &str = "SESSION_API_KEY";

/// Keys of the conversation's Secret holding storage credentials (nestor's own, copied).
const CREDENTIAL_KEYS: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "storage-access-key-id"),
    ("AWS_SECRET_ACCESS_KEY", "storage-secret-access-key"),
    ("AWS_SESSION_TOKEN", "storage-session-token"),
];

/// `[provisioner.kubernetes.workspace_sync]` as written.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSyncConfig {
    /// The image of the sync containers: nestor's own (`nestor workspace-sync …`). Default
    /// `nestor:latest`, what deploy/kubernetes runs nestor from.
    #[serde(default)]
    pub image: Option<String>,
    /// Default: the agent-server's `image_pull_policy`.
    #[serde(default)]
    pub image_pull_policy: Option<PullPolicy>,
    /// An existing Secret whose keys become the sync containers' environment (`envFrom`).
    /// Default: nestor's own credentials, copied into each conversation's Secret.
    #[serde(default)]
    pub credentials_secret: Option<String>,
    /// The sidecar's port (default 8001).
    #[serde(default)]
    pub port: Option<u16>,
    /// Bound on the final push (nestor's `POST /push` before a pod is deleted, and the
    /// sidecar's own push on SIGTERM). The pods' terminationGracePeriodSeconds is raised to
    /// this + 5. Default 45 (nestor bounds an idle stop to 60 s), at most 3600.
    #[serde(default)]
    pub final_push_secs: Option<u64>,
    /// Requests and limits of each sync container (small: it streams, its memory is bounded
    /// by `[workspace_storage] buffer_budget_bytes`).
    #[serde(default)]
    pub cpu_request: Option<String>,
    #[serde(default)]
    pub memory_request: Option<String>,
    #[serde(default)]
    pub memory_limit: Option<String>,
}

/// Validated: what the pod spec and nestor's calls need.
#[derive(Debug, Clone)]
pub struct PodSync {
    pub image: String,
    pub pull_policy: PullPolicy,
    pub credentials_secret: Option<String>,
    pub port: u16,
    pub final_push: Duration,
    pub cpu_request: String,
    pub memory_request: String,
    pub memory_limit: String,
    /// `[workspace_storage]` without credentials, as the sync containers read it (JSON).
    pub storage_json: String,
    pub on_delete_purge: bool,
    /// Copied into each conversation's Secret (empty with `credentials_secret`, or when
    /// nestor has none of its own).
    pub credentials: Vec<(&'static str, String)>,
}

impl WorkspaceSyncConfig {
    /// `storage` is nestor's `[workspace_storage]`; credentials come from it or from nestor's
    /// environment (read now).
    pub fn validate(&self, s: &Settings, storage: &WorkspaceStorageConfig) -> Result<PodSync, ProvisionError> {
        let err = |m: String| ProvisionError::Config(format!("provisioner.kubernetes.workspace_sync.{m}"));
        let image = self.image.clone().unwrap_or_else(|| "nestor:latest".into());
        if image.trim().is_empty() {
            return Err(err("image must not be empty".into()));
        }
        let port = self.port.unwrap_or(8001);
        if port == 0 || port == s.port {
            return Err(err(format!("port = {port} must be non-zero and differ from the agent-server's port {}", s.port)));
        }
        let final_secs = self.final_push_secs.unwrap_or(45);
        if !(1..=3600).contains(&final_secs) {
            return Err(err(format!("final_push_secs = {final_secs} must be between 1 and 3600")));
        }
        if let Some(n) = &self.credentials_secret {
            if !super::config::is_dns_label(n, 63) && !n.split('.').all(|p| super::config::is_dns_label(p, 63)) {
                return Err(err(format!("credentials_secret {n:?} is not a Secret name")));
            }
        }
        let mut stored = storage.clone();
        let own = (stored.access_key_id.take(), stored.secret_access_key.take(), stored.session_token.take());
        let storage_json = serde_json::to_string(&stored).map_err(|e| err(format!("cannot encode [workspace_storage]: {e}")))?;
        let credentials = if self.credentials_secret.is_some() {
            Vec::new()
        } else {
            match own {
                (Some(k), Some(sk), t) => {
                    let mut v = vec![(CREDENTIAL_KEYS[0].0, k), (CREDENTIAL_KEYS[1].0, sk.0)];
                    if let Some(t) = t {
                        v.push((CREDENTIAL_KEYS[2].0, t.0));
                    }
                    v
                }
                _ => CREDENTIAL_KEYS
                    .iter()
                    .filter_map(|(env, _)| std::env::var(env).ok().filter(|v| !v.is_empty()).map(|v| (*env, v)))
                    .collect(),
            }
        };
        Ok(PodSync {
            image,
            pull_policy: self.image_pull_policy.unwrap_or(s.image_pull_policy),
            credentials_secret: self.credentials_secret.clone(),
            port,
            final_push: Duration::from_secs(final_secs),
            cpu_request: self.cpu_request.clone().unwrap_or_else(|| "50m".into()),
            memory_request: self.memory_request.clone().unwrap_or_else(|| "64Mi".into()),
            memory_limit: self.memory_limit.clone().unwrap_or_else(|| "512Mi".into()),
            storage_json,
            on_delete_purge: storage.on_delete == nestor_workspace_store::OnDelete::Purge,
            credentials,
        })
    }
}

impl PodSync {
    /// The pods' terminationGracePeriodSeconds: room for the final push on SIGTERM.
    pub fn grace_secs(&self, configured: i64) -> i64 {
        configured.max(self.final_push.as_secs() as i64 + 5)
    }

    /// Credentials to store in the conversation's Secret (keys `storage-*`).
    pub fn secret_data(&self) -> BTreeMap<String, ByteString> {
        self.credentials
            .iter()
            .filter_map(|(env, v)| {
                let key = CREDENTIAL_KEYS.iter().find(|(e, _)| e == env)?.1;
                Some((key.to_owned(), ByteString(v.as_bytes().to_vec())))
            })
            .collect()
    }

    /// Adds the init container, the sidecar, their volume and the agent-server's state
    /// layout to a conversation's pod. `secret` is the conversation's Secret.
    pub fn decorate(&self, s: &Settings, pod: &mut Pod, secret: &str, conversation: ConversationId, owner: &UserId) {
        state_layout(pod);
        let Some(spec) = pod.spec.as_mut() else { return };
        let mut env = vec![
            lit(ENV_STORAGE, &self.storage_json),
            lit(ENV_OWNER, owner.as_str()),
            lit(ENV_CONVERSATION, &conversation.hex()),
            lit(ENV_ROOT, STATE_MOUNT),
            lit(ENV_CACHE, CACHE_MOUNT),
            lit(ENV_PORT, &self.port.to_string()),
            lit(ENV_FINAL_PUSH_SECS, &self.final_push.as_secs().to_string()),
            lit("NESTOR_LOG", "info"),
            from_secret(ENV_KEY, secret, super::objects::KEY_SESSION),
        ];
        for (env_name, key) in CREDENTIAL_KEYS {
            if self.credentials.iter().any(|(e, _)| *e == env_name) {
                env.push(from_secret(env_name, secret, key));
            }
        }
        let env_from = self.credentials_secret.as_ref().map(|n| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource { name: n.clone(), optional: Some(false) }),
                ..Default::default()
            }]
        });
        let mounts = vec![
            VolumeMount { name: "state".into(), mount_path: STATE_MOUNT.into(), ..Default::default() },
            VolumeMount { name: CACHE_VOLUME.into(), mount_path: CACHE_MOUNT.into(), ..Default::default() },
        ];
        let base = Container {
            image: Some(self.image.clone()),
            image_pull_policy: Some(self.pull_policy.as_str().into()),
            env: Some(env),
            env_from,
            volume_mounts: Some(mounts),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_owned(), Quantity(self.cpu_request.clone())),
                    ("memory".to_owned(), Quantity(self.memory_request.clone())),
                ])),
                limits: Some(BTreeMap::from([("memory".to_owned(), Quantity(self.memory_limit.clone()))])),
                ..Default::default()
            }),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                privileged: Some(false),
                run_as_non_root: Some(true),
                run_as_user: Some(s.run_as_user),
                run_as_group: Some(s.run_as_group),
                capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
                ..Default::default()
            }),
            termination_message_policy: Some("FallbackToLogsOnError".into()),
            ..Default::default()
        };
        let pull = Container {
            name: PULL_CONTAINER.into(),
            command: Some(vec!["/usr/local/bin/nestor".into()]),
            args: Some(vec!["workspace-sync".into(), "pull".into()]),
            ..base.clone()
        };
        let serve = Container {
            name: SYNC_CONTAINER.into(),
            command: Some(vec!["/usr/local/bin/nestor".into()]),
            args: Some(vec!["workspace-sync".into(), "serve".into()]),
            ports: Some(vec![ContainerPort {
                name: Some(SYNC_PORT_NAME.into()),
                container_port: self.port as i32,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..base
        };
        spec.init_containers.get_or_insert_with(Vec::new).push(pull);
        spec.containers.push(serve);
        spec.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: CACHE_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource { medium: None, size_limit: Some(Quantity("1Gi".into())) }),
            ..Default::default()
        });
        let grace = self.grace_secs(spec.termination_grace_period_seconds.unwrap_or(s.termination_grace_secs));
        spec.termination_grace_period_seconds = Some(grace);
    }
}

/// The agent-server keeps its state in /workspace/state, beside /workspace/project (the two
/// persisted trees). Also for a conversation created with persistence after it was turned
/// off: its state stays where its pods wrote it.
pub fn state_layout(pod: &mut Pod) {
    let Some(spec) = pod.spec.as_mut() else { return };
    if let Some(agent) = spec.containers.iter_mut().find(|c| c.name == CONTAINER) {
        let env = agent.env.get_or_insert_with(Vec::new);
        for (k, v) in PERSISTED_STATE_ENV {
            env.retain(|e| e.name != *k);
            env.push(EnvVar { name: (*k).into(), value: Some((*v).into()), value_from: None });
        }
    }
}

fn lit(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), value_from: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::config::KubernetesConfig;
    use crate::kubernetes::objects::{pod, Slot};

    fn settings() -> Settings {
        KubernetesConfig { image: Some("img:1".into()), ..Default::default() }.validate().unwrap()
    }

    fn storage() -> WorkspaceStorageConfig {
        let mut c = WorkspaceStorageConfig::new("bucket-1");
        c.endpoint = Some("http://127.0.0.1:9000".into());
        c.access_key_id = Some("AKID".into());
        c.secret_access_key = Some(nestor_workspace_store::Secret("S3CR3T-VALUE".into()));
        c
    }

    #[test]
    fn pod_gets_the_pull_before_the_agent_and_the_sidecar_beside_it() {
        let s = settings();
        let sync = WorkspaceSyncConfig::default().validate(&s, &storage()).unwrap();
        let conv = ConversationId::new_random();
        let slot = Slot::Conversation(conv);
        let owner = UserId::new("alice");
        let mut p = pod(&s, &slot, "ns", &owner);
        let secret = slot.object_name(&s.instance);
        sync.decorate(&s, &mut p, &secret, conv, &owner);
        let spec = p.spec.as_ref().unwrap();
        let init = spec.init_containers.as_ref().unwrap();
        assert_eq!(init.len(), 1);
        assert_eq!(init[0].name, PULL_CONTAINER);
        assert_eq!(init[0].args.as_ref().unwrap(), &vec!["workspace-sync".to_string(), "pull".to_string()]);
        assert_eq!(spec.containers[0].name, CONTAINER, "the agent-server stays first");
        let side = &spec.containers[1];
        assert_eq!(side.name, SYNC_CONTAINER);
        assert_eq!(side.image.as_deref(), Some("nestor:latest"));
        assert_eq!(side.ports.as_ref().unwrap()[0].container_port, 8001);
        assert_eq!(side.ports.as_ref().unwrap()[0].name.as_deref(), Some(SYNC_PORT_NAME));
        for c in [&init[0], side] {
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.run_as_non_root, Some(true));
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(), &vec!["ALL".to_string()]);
            assert!(c.resources.as_ref().unwrap().requests.is_some());
            let env = c.env.as_ref().unwrap();
            let get = |k: &str| env.iter().find(|e| e.name == k).unwrap();
            assert_eq!(get(ENV_OWNER).value.as_deref(), Some("alice"));
            assert_eq!(get(ENV_CONVERSATION).value.as_deref(), Some(conv.hex().as_str()));
            for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", ENV_KEY] {
                let e = get(k);
                assert!(e.value.is_none(), "{k} must not be a literal");
                assert_eq!(e.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().name, secret);
            }
            let cfg: WorkspaceStorageConfig = serde_json::from_str(get(ENV_STORAGE).value.as_deref().unwrap()).unwrap();
            assert_eq!(cfg.bucket, "bucket-1");
            assert!(cfg.access_key_id.is_none() && cfg.secret_access_key.is_none());
            let mounts: Vec<_> = c.volume_mounts.as_ref().unwrap().iter().map(|m| m.mount_path.as_str()).collect();
            assert!(mounts.contains(&STATE_MOUNT));
        }
        let agent_env = spec.containers[0].env.as_ref().unwrap();
        let convs = agent_env.iter().filter(|e| e.name == "OH_CONVERSATIONS_PATH").collect::<Vec<_>>();
        assert_eq!(convs.len(), 1);
        assert_eq!(convs[0].value.as_deref(), Some("/workspace/state/conversations"));
        assert!(!agent_env.iter().any(|e| e.name.starts_with("AWS_")), "the agent never sees storage credentials");
        assert_eq!(spec.termination_grace_period_seconds, Some(50));
        let json = serde_json::to_string(&p).unwrap();
        assert!(!json.contains("S3CR3T-VALUE") && !json.contains("AKID"), "no credential in the pod spec");
        let data = sync.secret_data();
        assert_eq!(data["storage-secret-access-key"].0, b"S3CR3T-VALUE");
    }

    #[test]
    fn a_credentials_secret_is_used_by_reference() {
        let s = settings();
        let cfg = WorkspaceSyncConfig { credentials_secret: Some("s3-creds".into()), ..Default::default() };
        let sync = cfg.validate(&s, &storage()).unwrap();
        assert!(sync.secret_data().is_empty());
        let conv = ConversationId::new_random();
        let mut p = pod(&s, &Slot::Conversation(conv), "ns", &UserId::default_user());
        sync.decorate(&s, &mut p, "x", conv, &UserId::default_user());
        let side = &p.spec.as_ref().unwrap().containers[1];
        assert_eq!(side.env_from.as_ref().unwrap()[0].secret_ref.as_ref().unwrap().name, "s3-creds");
        assert!(!side.env.as_ref().unwrap().iter().any(|e| e.name == "AWS_SECRET_ACCESS_KEY"));
    }

    #[test]
    fn bad_settings_name_the_key() {
        let s = settings();
        for (c, key) in [
            (WorkspaceSyncConfig { port: Some(8000), ..Default::default() }, "port"),
            (WorkspaceSyncConfig { final_push_secs: Some(0), ..Default::default() }, "final_push_secs"),
            (WorkspaceSyncConfig { image: Some(" ".into()), ..Default::default() }, "image"),
            (WorkspaceSyncConfig { credentials_secret: Some("Bad_Name".into()), ..Default::default() }, "credentials_secret"),
        ] {
            let e = c.validate(&s, &storage()).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }
}
