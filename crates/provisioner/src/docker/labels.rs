//! Labels, names and addresses: the pure parts of the docker backend.
//!
//! Labels are the source of truth for *which* containers and volumes are nestor's: every
//! object carries the nestor instance id, the conversation (or `home`) and the owner. Docker
//! labels cannot change after creation, so a conversation's life-cycle phase lives in its
//! manifest (see `manifest.rs`), never in a label.

use std::collections::HashMap;
use std::path::Path;

use bollard::models::{ContainerSummary, PortMap, PortSummary};
use nestor_core::ConversationId;

use crate::util::stable_hash;

pub const PREFIX: &str = "org.nestor.";
pub const MANAGED_BY: &str = "org.nestor.managed-by";
pub const INSTANCE: &str = "org.nestor.instance";
pub const CONVERSATION: &str = "org.nestor.conversation";
pub const OWNER: &str = "org.nestor.owner";
pub const ROLE: &str = "org.nestor.role";
/// Hash of the settings a container was created with; a stopped container whose spec differs
/// from the current one is re-created (from its volume) on its next start.
pub const SPEC: &str = "org.nestor.spec";

pub const ROLE_CONVERSATION: &str = "conversation";
pub const ROLE_HOME: &str = "home";
/// A warm pool member (started dormant; it keeps this role once claimed: labels are
/// immutable, its manifest says which conversation it serves).
pub const ROLE_POOL: &str = "pool";
/// Prefix of a warm pool member's `conversation` label and name suffix (`warm-<16 hex>`).
pub const WARM_PREFIX: &str = "warm-";
/// The `conversation` label of the home container.
pub const HOME: &str = "home";

/// Port the agent-server listens on inside its container.
pub const CONTAINER_PORT: u16 = 8000;
pub const CONTAINER_PORT_KEY: &str = "8000/tcp";

/// Which conversation a container or volume belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    Conversation(ConversationId),
    Home,
    /// A warm pool member, by its random id (claimed or not: the slot never changes).
    Warm(u64),
}

impl Slot {
    pub fn label(&self) -> String {
        match self {
            Slot::Conversation(c) => c.to_string(),
            Slot::Home => HOME.to_owned(),
            Slot::Warm(w) => format!("{WARM_PREFIX}{w:016x}"),
        }
    }

    pub fn parse(label: &str) -> Option<Self> {
        if label == HOME {
            Some(Slot::Home)
        } else if let Some(hex) = label.strip_prefix(WARM_PREFIX) {
            (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok()).flatten().map(Slot::Warm)
        } else {
            ConversationId::parse(label).ok().map(Slot::Conversation)
        }
    }

    /// The name suffix (`<hex>` or `home`).
    pub fn key(&self) -> String {
        match self {
            Slot::Conversation(c) => c.hex(),
            Slot::Home => HOME.to_owned(),
            Slot::Warm(_) => self.label(),
        }
    }

    /// The conversation of a conversation slot (a warm slot's is in its manifest).
    pub fn conversation(&self) -> Option<ConversationId> {
        match self {
            Slot::Conversation(c) => Some(*c),
            Slot::Home | Slot::Warm(_) => None,
        }
    }
}

/// The default instance id: a stable hash of nestor's (canonical) docker state directory, so
/// the same nestor finds its containers after a restart and two nestors never share them.
pub fn derive_instance_id(root: &Path) -> String {
    let canonical = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    format!("{:012x}", stable_hash(&canonical.to_string_lossy()) & 0xffff_ffff_ffff)
}

/// Container and volume name of a slot: `nestor-<instance>-<hex|home>`.
pub fn object_name(instance: &str, slot: &Slot) -> String {
    format!("nestor-{instance}-{}", slot.key())
}

/// The labels of a slot's container and volume (plus the configured extra labels).
pub fn labels_for(
    instance: &str,
    slot: &Slot,
    owner: &str,
    extra: &std::collections::BTreeMap<String, String>,
) -> HashMap<String, String> {
    let mut l: HashMap<String, String> = extra.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    l.insert(MANAGED_BY.into(), "nestor".into());
    l.insert(INSTANCE.into(), instance.into());
    l.insert(CONVERSATION.into(), slot.label());
    l.insert(OWNER.into(), owner.into());
    let role = match slot {
        Slot::Home => ROLE_HOME,
        Slot::Warm(_) => ROLE_POOL,
        Slot::Conversation(_) => ROLE_CONVERSATION,
    };
    l.insert(ROLE.into(), role.into());
    l
}

/// `label=<INSTANCE>=<id>`: the filter that selects exactly this nestor's objects.
pub fn instance_filter(instance: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([("label".to_owned(), vec![format!("{INSTANCE}={instance}")])])
}

/// The slot a labelled object belongs to (None: not a well-formed nestor object).
pub fn slot_of(labels: Option<&HashMap<String, String>>) -> Option<Slot> {
    labels?.get(CONVERSATION).and_then(|v| Slot::parse(v))
}

/// The loopback host port mapped to 8000/tcp, from `inspect` (`NetworkSettings.Ports`).
pub fn host_port_from_inspect(ports: Option<&PortMap>) -> Option<u16> {
    let bindings = ports?.get(CONTAINER_PORT_KEY)?.as_ref()?;
    bindings
        .iter()
        .filter(|b| matches!(b.host_ip.as_deref(), Some("127.0.0.1") | Some("") | None))
        .find_map(|b| b.host_port.as_deref()?.parse::<u16>().ok().filter(|p| *p != 0))
}

/// The loopback host port mapped to 8000/tcp, from a container list entry.
pub fn host_port_from_summary(ports: Option<&Vec<PortSummary>>) -> Option<u16> {
    ports?
        .iter()
        .filter(|p| p.private_port == CONTAINER_PORT)
        .filter(|p| matches!(p.ip.as_deref(), Some("127.0.0.1") | None))
        .find_map(|p| p.public_port.filter(|x| *x != 0))
}

/// The container's address on `network`, from a container list entry.
pub fn address_from_summary(c: &ContainerSummary, network: &str) -> Option<String> {
    let nets = c.network_settings.as_ref()?.networks.as_ref()?;
    nets.get(network)?.ip_address.clone().filter(|ip| !ip.is_empty())
}

/// `key=value` environment entries, sorted (stable for the spec hash).
pub fn env_list(env: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    env.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::ContainerInspectResponse;

    #[test]
    fn names_and_labels() {
        let c = ConversationId::parse("3f2a0000-0000-4000-8000-0000000000ab").unwrap();
        let slot = Slot::Conversation(c);
        assert_eq!(object_name("abc123", &slot), "nestor-abc123-3f2a00000000400080000000000000ab");
        assert_eq!(object_name("abc123", &Slot::Home), "nestor-abc123-home");
        let mut extra = std::collections::BTreeMap::new();
        extra.insert("team".to_owned(), "blue".to_owned());
        let l = labels_for("abc123", &slot, "alice", &extra);
        assert_eq!(l[INSTANCE], "abc123");
        assert_eq!(l[CONVERSATION], "3f2a0000-0000-4000-8000-0000000000ab");
        assert_eq!(l[OWNER], "alice");
        assert_eq!(l[ROLE], ROLE_CONVERSATION);
        assert_eq!(l["team"], "blue");
        assert_eq!(slot_of(Some(&l)), Some(slot));
        let h = labels_for("abc123", &Slot::Home, "default", &Default::default());
        assert_eq!(h[ROLE], ROLE_HOME);
        assert_eq!(slot_of(Some(&h)), Some(Slot::Home));
        let mut bad = l.clone();
        bad.insert(CONVERSATION.into(), "nope".into());
        assert_eq!(slot_of(Some(&bad)), None);
        assert_eq!(slot_of(None), None);
        let w = Slot::Warm(0xab);
        assert_eq!(object_name("abc123", &w), "nestor-abc123-warm-00000000000000ab");
        let l = labels_for("abc123", &w, "", &Default::default());
        assert_eq!((l[ROLE].as_str(), l[CONVERSATION].as_str()), (ROLE_POOL, "warm-00000000000000ab"));
        assert_eq!(slot_of(Some(&l)), Some(w));
        assert_eq!(Slot::parse("warm-ab"), None);
        assert_eq!(w.conversation(), None);
        assert_eq!(instance_filter("x")["label"], vec!["org.nestor.instance=x"]);
    }

    #[test]
    fn instance_id_is_stable_and_path_dependent() {
        let d = tempfile::tempdir().unwrap();
        let a = derive_instance_id(d.path());
        assert_eq!(a.len(), 12);
        assert_eq!(a, derive_instance_id(&d.path().join(".")));
        assert_ne!(a, derive_instance_id(&d.path().join("other")));
    }

    #[test]
    fn port_from_inspect_of_engine_1_41() {
        // Shape as dockerd 20.10 answers (IPv4 and IPv6 bindings when publishing on all
        // addresses; only the loopback one when publishing on 127.0.0.1).
        let j = r#"{"NetworkSettings":{"Ports":{"8000/tcp":[{"HostIp":"127.0.0.1","HostPort":"49153"}]}}}"#;
        let r: ContainerInspectResponse = serde_json::from_str(j).unwrap();
        assert_eq!(host_port_from_inspect(r.network_settings.as_ref().unwrap().ports.as_ref()), Some(49153));
        // Stopped container: the key is there with null bindings.
        let j = r#"{"NetworkSettings":{"Ports":{"8000/tcp":null}}}"#;
        let r: ContainerInspectResponse = serde_json::from_str(j).unwrap();
        assert_eq!(host_port_from_inspect(r.network_settings.as_ref().unwrap().ports.as_ref()), None);
        let j = r#"{"NetworkSettings":{"Ports":{}}}"#;
        let r: ContainerInspectResponse = serde_json::from_str(j).unwrap();
        assert_eq!(host_port_from_inspect(r.network_settings.as_ref().unwrap().ports.as_ref()), None);
        // Never a binding on another interface.
        let j = r#"{"NetworkSettings":{"Ports":{"8000/tcp":[{"HostIp":"10.1.2.3","HostPort":"5"},{"HostIp":"127.0.0.1","HostPort":"x"}]}}}"#;
        let r: ContainerInspectResponse = serde_json::from_str(j).unwrap();
        assert_eq!(host_port_from_inspect(r.network_settings.as_ref().unwrap().ports.as_ref()), None);
        assert_eq!(host_port_from_inspect(None), None);
    }

    #[test]
    fn port_and_address_from_list_entry() {
        let j = r#"{"Id":"abc","Names":["/nestor-x-home"],"State":"running",
            "Ports":[{"PrivatePort":8000,"Type":"tcp"},{"IP":"127.0.0.1","PrivatePort":8000,"PublicPort":49160,"Type":"tcp"}],
            "Labels":{"org.nestor.conversation":"home"},
            "NetworkSettings":{"Networks":{"bridge":{"IPAddress":"172.17.0.5"},"nestor-net":{"IPAddress":"172.20.0.3"}}}}"#;
        let c: ContainerSummary = serde_json::from_str(j).unwrap();
        assert_eq!(host_port_from_summary(c.ports.as_ref()), Some(49160));
        assert_eq!(address_from_summary(&c, "nestor-net").as_deref(), Some("172.20.0.3"));
        assert_eq!(address_from_summary(&c, "other"), None);
        let j = r#"{"Id":"abc","State":"exited","Ports":[]}"#;
        let c: ContainerSummary = serde_json::from_str(j).unwrap();
        assert_eq!(host_port_from_summary(c.ports.as_ref()), None);
    }
}
