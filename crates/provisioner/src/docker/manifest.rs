//! The per-conversation manifest of the docker backend: `<state_dir>/docker/<hex>.json`
//! (`home.json` for the home container), mode 0600.
//!
//! It holds what labels must not (labels are readable by anyone who can run `docker
//! inspect`, and cannot change): the container's session key and `OH_SECRET_KEY`, and the
//! conversation's phase. Keeping the keys here, outside the container, is what lets a
//! re-created container (removed by hand, image upgraded, settings changed) still read its
//! volume's state: stored secrets are encrypted with `OH_SECRET_KEY`. The manifest is also
//! the commitment record: it is written before the container exists and removed before the
//! container is, so a container or volume without a manifest is always an orphan.

use std::path::Path;

use nestor_core::{ConversationId, SessionKey, UserId};
use serde::{Deserialize, Serialize};

/// What holds a conversation's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mount {
    /// A named volume (`nestor-<instance>-<hex>`) mounted at /workspace.
    #[default]
    Volume,
    /// A host directory under nestor's state (`<state_dir>/docker/data/<hex>`) bind-mounted
    /// at /workspace: what workspace persistence restores into and pushes from.
    Bind,
}

/// Where a conversation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// A warm pool member, dormant, not claimed yet (`key` is its boot key, never handed
    /// out; `secret_key` its init key).
    Warm,
    /// Provisioned for a create that has not succeeded (yet).
    Provisioning,
    /// The conversation exists on its container.
    Active,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// None for the home container.
    pub conversation_id: Option<ConversationId>,
    pub owner: UserId,
    pub phase: Phase,
    /// The container's session key (nestor authenticates with it; clients never see it).
    pub key: SessionKey,
    /// The container's OH_SECRET_KEY.
    pub secret_key: SessionKey,
    /// Unix seconds of the provision (for the half-created grace period).
    pub created_unix: u64,
    /// Fixed at provision: a conversation keeps its kind of storage for life.
    #[serde(default)]
    pub mount: Mount,
    /// Set for a container started warm for a pool (slot `warm-<id>`), claimed or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<u64>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Manifest {
    pub fn new(conversation_id: Option<ConversationId>, owner: UserId, phase: Phase) -> Self {
        Self {
            version: 1,
            conversation_id,
            owner,
            phase,
            key: SessionKey::random(),
            secret_key: SessionKey::random(),
            created_unix: now_unix(),
            mount: Mount::Volume,
            warm: None,
        }
    }

    /// Seconds since it was provisioned.
    pub fn age_secs(&self) -> u64 {
        now_unix().saturating_sub(self.created_unix)
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if m.version != 1 {
            return Err(format!("unsupported manifest version {}", m.version));
        }
        Ok(m)
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("manifest serialises");
        nestor_core::fs::write_atomic(path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_private_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.json");
        let m = Manifest::new(Some(ConversationId::new_random()), UserId::default_user(), Phase::Provisioning);
        m.save(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let back = Manifest::load(&p).unwrap();
        assert_eq!(back.key, m.key);
        assert_eq!(back.secret_key, m.secret_key);
        assert_ne!(back.key, back.secret_key);
        assert_eq!(back.phase, Phase::Provisioning);
        assert!(back.age_secs() < 5);
        assert_eq!(back.mount, Mount::Volume);
    }

    #[test]
    fn manifests_without_a_mount_are_volumes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.json");
        let mut m = Manifest::new(None, UserId::default_user(), Phase::Active);
        m.mount = Mount::Bind;
        m.save(&p).unwrap();
        assert_eq!(Manifest::load(&p).unwrap().mount, Mount::Bind);
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("mount");
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(Manifest::load(&p).unwrap().mount, Mount::Volume);
    }
}
