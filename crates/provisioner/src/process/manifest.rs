//! The per-conversation manifest of the process backend (`nestor-process.json`).
//!
//! It holds everything needed to find, authenticate to, or restart a child after nestor
//! itself restarted. It contains keys, so it is written with mode 0600.

use std::path::Path;

use nestor_core::{ConversationId, SessionKey, UserId};
use serde::{Deserialize, Serialize};

/// Where a conversation's directory is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// A warm pool's server: started dormant (deferred init) for no conversation yet.
    Warm,
    /// Created for a conversation whose create has not reached the child yet.
    Provisioning,
    /// The conversation exists on the child.
    Active,
    /// Released but kept (delete_state_on_release = false).
    Released,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub conversation_id: ConversationId,
    pub owner: UserId,
    pub phase: Phase,
    /// The child's session key (nestor authenticates with it; clients never see it).
    pub key: SessionKey,
    /// The child's OH_SECRET_KEY: kept so secrets it stored stay readable across restarts.
    pub secret_key: SessionKey,
    pub port: Option<u16>,
    pub pid: Option<i32>,
    /// Start time of `pid` (clock ticks since boot), to tell it from a reused pid.
    pub pid_start: Option<u64>,
    pub created_at: String,
    /// Set when the child was started warm for a pool (`pool-<id>` directory, downstream
    /// `process-pool-<id>`); kept once a conversation claims it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_id: Option<String>,
}

impl Manifest {
    pub fn new(conversation_id: ConversationId, owner: UserId) -> Self {
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        Self {
            version: 1,
            conversation_id,
            owner,
            phase: Phase::Provisioning,
            key: SessionKey::random(),
            secret_key: SessionKey::random(),
            port: None,
            pid: None,
            pid_start: None,
            created_at: now,
            warm_id: None,
        }
    }

    /// A warm pool member: no conversation, a random boot session key (`key`, never handed
    /// out) and a random init key (`secret_key`, its dormant `OH_SECRET_KEY`).
    pub fn warm(warm_id: String) -> Self {
        let mut m = Self::new(ConversationId::from_uuid(uuid::Uuid::nil()), UserId::default_user());
        m.phase = Phase::Warm;
        m.warm_id = Some(warm_id);
        m
    }

    /// When the manifest was written (now if unreadable).
    pub fn created(&self) -> std::time::SystemTime {
        time::OffsetDateTime::parse(&self.created_at, &time::format_description::well_known::Rfc3339)
            .map(std::time::SystemTime::from)
            .unwrap_or_else(|_| std::time::SystemTime::now())
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if m.version != 1 {
            return Err(format!("unsupported manifest version {}", m.version));
        }
        Ok(m)
    }
}
