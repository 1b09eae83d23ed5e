//! The Kubernetes objects of one conversation: names, labels, and the Secret, PVC and Pod
//! nestor creates. Pure functions of the settings, so they are unit-tested without a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
    LocalObjectReference, PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod,
    PodSecurityContext, PodSpec, Probe, ResourceRequirements, SeccompProfile, Secret, SecretKeySelector,
    SecurityContext, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use nestor_core::{ConversationId, SessionKey, UserId};

use super::config::{Settings, StorageMode};

/// `app.kubernetes.io/managed-by: nestor` on everything nestor creates.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "nestor";
pub const APP_NAME: &str = "app.kubernetes.io/name";
pub const APP_NAME_VALUE: &str = "agent-server";
/// Which nestor deployment (settings `instance`).
pub const INSTANCE: &str = "nestor.dev/instance";
/// The conversation (32 hex digits) or `home`.
pub const CONVERSATION: &str = "nestor.dev/conversation";
/// Annotations (values too free-form for labels).
pub const OWNER: &str = "nestor.dev/owner";
/// `provisioning` until the conversation's create succeeded, then `active`.
pub const PHASE: &str = "nestor.dev/phase";
/// The test node agent's published loopback port (honoured only with `reach =
/// "host-port-annotation"`).
pub const HOST_PORT: &str = "nestor.dev/host-port";

pub const PHASE_PROVISIONING: &str = "provisioning";
pub const PHASE_ACTIVE: &str = "active";

/// Keys of the per-conversation Secret.
pub const KEY_SESSION: &str = "session-api-key";
pub const KEY_SECRET: &str = "secret-key";

/// Where the state volume is mounted, and the conversation's working directory in it.
pub const STATE_MOUNT: &str = "/workspace";
pub use crate::container_env::WORKSPACE_DIR;
pub const CONTAINER: &str = "agent-server";

pub use crate::container_env::BASE_ENV;

/// A conversation's slot in the cluster: its own, or the shared home server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    Conversation(ConversationId),
    Home,
}

impl Slot {
    /// The `nestor.dev/conversation` label value.
    pub fn label(&self) -> String {
        match self {
            Slot::Conversation(c) => c.hex(),
            Slot::Home => "home".into(),
        }
    }

    pub fn from_label(v: &str) -> Option<Slot> {
        if v == "home" {
            return Some(Slot::Home);
        }
        if v.len() != 32 {
            return None;
        }
        ConversationId::parse(v).ok().map(Slot::Conversation)
    }

    pub fn conversation(&self) -> Option<ConversationId> {
        match self {
            Slot::Conversation(c) => Some(*c),
            Slot::Home => None,
        }
    }

    /// Pod, Secret and PVC name: `<instance>-<32 hex>` or `<instance>-home` (at most 53).
    pub fn object_name(&self, instance: &str) -> String {
        format!("{instance}-{}", self.label())
    }
}

/// The label selector of everything one nestor deployment owns.
pub fn selector(instance: &str) -> String {
    format!("{MANAGED_BY}={MANAGED_BY_VALUE},{INSTANCE}={instance}")
}

pub fn labels(s: &Settings, slot: &Slot) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
        (APP_NAME.to_owned(), APP_NAME_VALUE.to_owned()),
        (INSTANCE.to_owned(), s.instance.clone()),
        (CONVERSATION.to_owned(), slot.label()),
    ])
}

fn meta(s: &Settings, slot: &Slot, ns: &str, owner: &UserId) -> ObjectMeta {
    ObjectMeta {
        name: Some(slot.object_name(&s.instance)),
        namespace: Some(ns.to_owned()),
        labels: Some(labels(s, slot)),
        annotations: Some(BTreeMap::from([(OWNER.to_owned(), owner.as_str().to_owned())])),
        ..Default::default()
    }
}

/// The Secret holding the agent-server's session key and `OH_SECRET_KEY`. It is the
/// conversation's record: it exists from provisioning to release, also while no pod runs.
pub fn secret(s: &Settings, slot: &Slot, ns: &str, owner: &UserId, key: &SessionKey, secret_key: &SessionKey) -> Secret {
    let mut m = meta(s, slot, ns, owner);
    let phase = if matches!(slot, Slot::Home) { PHASE_ACTIVE } else { PHASE_PROVISIONING };
    m.annotations.get_or_insert_with(Default::default).insert(PHASE.into(), phase.into());
    Secret {
        metadata: m,
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (KEY_SESSION.to_owned(), ByteString(key.expose().as_bytes().to_vec())),
            (KEY_SECRET.to_owned(), ByteString(secret_key.expose().as_bytes().to_vec())),
        ])),
        ..Default::default()
    }
}

/// The keys of a Secret nestor created (None if it lacks them).
pub fn keys_of(secret: &Secret) -> Option<(SessionKey, SessionKey)> {
    let data = secret.data.as_ref()?;
    let get = |k: &str| {
        data.get(k).and_then(|b| String::from_utf8(b.0.clone()).ok()).filter(|v| !v.is_empty()).map(SessionKey::new)
    };
    Some((get(KEY_SESSION)?, get(KEY_SECRET)?))
}

pub fn pvc(s: &Settings, slot: &Slot, ns: &str, owner: &UserId) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: meta(s, slot, ns, owner),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: s.storage_class.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), Quantity(s.storage_size.clone()))])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(crate) fn from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: secret.into(), key: key.into(), optional: Some(false) }),
            ..Default::default()
        }),
    }
}

fn quantities(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, Quantity>> {
    let m: BTreeMap<String, Quantity> =
        pairs.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned()))).collect();
    (!m.is_empty()).then_some(m)
}

/// The agent-server pod. Keys come from the Secret (`valueFrom.secretKeyRef`), never as
/// literals in the pod spec.
pub fn pod(s: &Settings, slot: &Slot, ns: &str, owner: &UserId) -> Pod {
    let name = slot.object_name(&s.instance);
    let mut m = meta(s, slot, ns, owner);
    for (k, v) in &s.labels {
        m.labels.get_or_insert_with(Default::default).entry(k.clone()).or_insert_with(|| v.clone());
    }
    for (k, v) in &s.annotations {
        m.annotations.get_or_insert_with(Default::default).entry(k.clone()).or_insert_with(|| v.clone());
    }
    let mut env: Vec<EnvVar> =
        BASE_ENV.iter().map(|(k, v)| EnvVar { name: (*k).into(), value: Some((*v).into()), value_from: None }).collect();
    env.extend(s.env.iter().map(|(k, v)| EnvVar { name: k.clone(), value: Some(v.clone()), value_from: None }));
    env.push(from_secret("OH_SESSION_API_KEYS_0", &name, KEY_SESSION));
    env.push(from_secret("SESSION_API_KEY", &name, KEY_SESSION));
    env.push(from_secret("OH_SECRET_KEY", &name, KEY_SECRET));
    let r = &s.resources;
    let state = match s.storage {
        StorageMode::Pvc => Volume {
            name: "state".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource { claim_name: name.clone(), read_only: None }),
            ..Default::default()
        },
        StorageMode::EmptyDir => Volume {
            name: "state".into(),
            empty_dir: Some(EmptyDirVolumeSource { medium: None, size_limit: Some(Quantity(s.storage_size.clone())) }),
            ..Default::default()
        },
    };
    let container = Container {
        name: CONTAINER.into(),
        image: Some(s.image.clone()),
        image_pull_policy: Some(s.image_pull_policy.as_str().into()),
        command: s.command.clone(),
        args: s.args.clone(),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: s.port as i32,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/alive".into()),
                port: IntOrString::Int(s.port as i32),
                ..Default::default()
            }),
            period_seconds: Some(2),
            timeout_seconds: Some(2),
            failure_threshold: Some(3),
            success_threshold: Some(1),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: quantities(&[("cpu", &r.cpu_request), ("memory", &r.memory_request)]),
            limits: quantities(&[
                ("cpu", &r.cpu_limit),
                ("memory", &r.memory_limit),
                ("ephemeral-storage", &r.ephemeral_storage_limit),
            ]),
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
        volume_mounts: Some(vec![VolumeMount { name: "state".into(), mount_path: STATE_MOUNT.into(), ..Default::default() }]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    Pod {
        metadata: m,
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(vec![state]),
            restart_policy: Some("Always".into()),
            termination_grace_period_seconds: Some(s.termination_grace_secs),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            service_account_name: s.service_account_name.clone(),
            runtime_class_name: s.runtime_class_name.clone(),
            node_selector: (!s.node_selector.is_empty()).then(|| s.node_selector.clone()),
            tolerations: (!s.tolerations.is_empty()).then(|| s.tolerations.clone()),
            image_pull_secrets: (!s.image_pull_secrets.is_empty()).then(|| {
                s.image_pull_secrets.iter().map(|n| LocalObjectReference { name: n.clone() }).collect()
            }),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(s.run_as_user),
                run_as_group: Some(s.run_as_group),
                fs_group: Some(s.run_as_group),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::config::KubernetesConfig;

    fn settings() -> Settings {
        KubernetesConfig { image: Some("img:1".into()), ..Default::default() }.validate().unwrap()
    }

    #[test]
    fn names_and_labels_round_trip() {
        let c = ConversationId::new_random();
        let slot = Slot::Conversation(c);
        assert_eq!(Slot::from_label(&slot.label()), Some(slot));
        assert_eq!(Slot::from_label("home"), Some(Slot::Home));
        assert_eq!(Slot::from_label("nope"), None);
        let n = slot.object_name(&"x".repeat(20));
        assert!(n.len() <= 63, "{n}");
        assert!(crate::kubernetes::config::is_dns_label(&n, 63));
    }

    #[test]
    fn pod_is_hardened_and_takes_keys_from_its_secret() {
        let s = settings();
        let slot = Slot::Conversation(ConversationId::new_random());
        let p = pod(&s, &slot, "ns", &UserId::default_user());
        let spec = p.spec.as_ref().unwrap();
        let c = &spec.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(), &vec!["ALL".to_string()]);
        assert_eq!(spec.automount_service_account_token, Some(false));
        let env = c.env.as_ref().unwrap();
        for k in ["SESSION_API_KEY", "OH_SESSION_API_KEYS_0", "OH_SECRET_KEY"] {
            let e = env.iter().find(|e| e.name == k).unwrap();
            assert!(e.value.is_none(), "{k} must not be a literal");
            let r = e.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
            assert_eq!(r.name, slot.object_name("nestor"));
        }
        let probe = c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(probe.path.as_deref(), Some("/alive"));
        assert_eq!(
            spec.volumes.as_ref().unwrap()[0].persistent_volume_claim.as_ref().unwrap().claim_name,
            slot.object_name("nestor")
        );
        let json = serde_json::to_string(&p).unwrap();
        assert!(!json.contains("secret-key\":\""), "no key material in the pod");
    }

    #[test]
    fn secret_round_trips_keys() {
        let s = settings();
        let (k, sk) = (SessionKey::random(), SessionKey::random());
        let sec = secret(&s, &Slot::Home, "ns", &UserId::default_user(), &k, &sk);
        assert_eq!(keys_of(&sec), Some((k, sk)));
    }
}
