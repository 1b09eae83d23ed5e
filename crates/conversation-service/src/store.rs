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

    /// Remove `id`'s file, durably: a delete nestor confirmed must not come back after a
    /// power loss. Unlinking only changes the directory, so the directory is fsynced after
    /// it ([`nestor_core::fs::sync_dir`], as `write_atomic` does after its rename); until then the
    /// removal may sit in the page cache only. A file that is already gone is not an error,
    /// but the directory is still synced: an earlier attempt may have unlinked it and
    /// failed before its sync.
    pub fn remove(&self, id: &ConversationId) -> std::io::Result<()> {
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(with_context(e, format!("removing catalog entry {}", path.display())));
            }
            _ => {}
        }
        nestor_core::fs::sync_dir(&self.dir).map_err(|e| with_context(e, format!("syncing catalog directory {}", self.dir.display())))
    }
}

/// `e` with what was being done, keeping its kind (callers match on it).
fn with_context(e: std::io::Error, what: String) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nestor-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// A removal deletes the file and syncs the directory; removing again (the file already
    /// gone) and removing from a vanished directory both succeed.
    #[test]
    fn remove_is_durable_and_idempotent() {
        let d = dir("remove");
        let store = Store::open(&d).unwrap();
        let id = ConversationId::new_random();
        let e = StoredEntry { version: 1, id, downstream: DownstreamId::new("d"), owner: UserId::default_user(), info: Arc::new(json!({"id": id.to_string()})) };
        store.save(&e).unwrap();
        assert_eq!(store.load_all().len(), 1);
        store.remove(&id).unwrap();
        assert!(store.load_all().is_empty());
        assert!(!store.path(&id).exists());
        store.remove(&id).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        store.remove(&id).unwrap();
    }

    /// A failure other than NotFound is reported with the file it concerns.
    #[cfg(unix)]
    #[test]
    fn remove_failure_names_the_file() {
        let d = dir("remove-fail");
        let store = Store::open(&d).unwrap();
        let id = ConversationId::new_random();
        // A non-empty directory in the file's place: unlinking it fails (EISDIR/EPERM).
        std::fs::create_dir_all(store.path(&id).join("x")).unwrap();
        let err = store.remove(&id).unwrap_err();
        assert!(err.to_string().contains(&id.hex()), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
