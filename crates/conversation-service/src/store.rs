//! The catalog on disk: one small JSON file per conversation under `<state_dir>/catalog/`.
//!
//! Routes kept only in memory are a classic proxy failure (a restarted proxy that forgot
//! where everything lives). Each file records a conversation's downstream, owner and last
//! known `ConversationInfo`, so a restarted nestor routes and lists conversations at once,
//! even those whose downstream is stopped. Files are written atomically; one file per
//! conversation keeps every write small.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nestor_core::{ConversationId, DownstreamId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredEntry {
    pub version: u32,
    pub id: ConversationId,
    pub downstream: DownstreamId,
    pub owner: UserId,
    /// Shared with the catalog's entry (written as a plain JSON object).
    pub info: Arc<Value>,
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    fn path(&self, id: &ConversationId) -> PathBuf {
        self.dir.join(format!("{}.json", id.hex()))
    }

    /// Every readable entry; unreadable files are reported and skipped (never deleted).
    pub fn load_all(&self) -> Vec<StoredEntry> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return out };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&p).map_err(|e| e.to_string()).and_then(|b| {
                serde_json::from_slice::<StoredEntry>(&b).map_err(|e| e.to_string())
            }) {
                Ok(s) if s.version == 1 => out.push(s),
                Ok(s) => tracing::warn!(file = %p.display(), version = s.version, "skipping catalog entry of unknown version"),
                Err(e) => tracing::warn!(file = %p.display(), "skipping unreadable catalog entry: {e}"),
            }
        }
        out
    }

    pub fn save(&self, e: &StoredEntry) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(e).map_err(std::io::Error::other)?;
        nestor_core::fs::write_atomic(&self.path(&e.id), &bytes)
    }

    pub fn remove(&self, id: &ConversationId) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}
