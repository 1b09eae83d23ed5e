//! Files on disk: one directory per user, crash-safe writes, serialized writers.
//!
//! Layout under the configured directory (nestor's `state_dir/settings`):
//!
//! ```text
//! users/<user>/settings.json                    PersistedSettings (secrets as Fernet tokens)
//! users/<user>/secrets.json                     {"custom_secrets": {NAME: {name, secret, description}}}
//! users/<user>/profiles/<name>.json             LLM profiles
//! users/<user>/agent-profiles/<name>.json       agent profiles (secret-free)
//! users/<user>/meta-profiles/<name>.json        meta-profiles (secret-free)
//! users/<user>/provider-connections/provider_connections.json
//! ```
//!
//! It is the agent-server's `OH_PERSISTENCE_DIR` layout, per user, with the same file shapes
//! and cipher, so a user's directory can be inspected with (or migrated from) an agent-server.
//! `<user>` is the user id with every byte outside `[A-Za-z0-9_-]` written `%XX`, so no id
//! can climb out of `users/`.
//!
//! **Writes** go through [`write_json`]: temp file in the same directory, fsync, rename, fsync
//! the directory — a crash leaves the old file or the new one, never half of one, and a stray
//! temp file (`.<name>.tmp-<pid>`) is never read (readers open only `*.json` with valid names).
//! **Writers are serialized** per user: an in-process mutex plus an `flock` on
//! `users/<user>/.lock` (another nestor process on the same directory waits too). Readers do not
//! lock: a rename is atomic, so they see one whole version.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// The directory of one user.
pub fn user_dir(base: &Path, user: &str) -> PathBuf {
    let mut enc = String::new();
    for b in user.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            enc.push(b as char);
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    if enc.is_empty() {
        enc.push('%');
    }
    base.join("users").join(enc)
}

pub fn ensure_dir(p: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(p)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700));
    }
    Ok(())
}

/// Write `value` as indented JSON, atomically (see module docs).
pub fn write_json(path: &Path, value: &Value) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        ensure_dir(dir)?;
    }
    let mut bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    nestor_core::fs::write_atomic(path, &bytes)
}

/// What reading a JSON file found.
pub enum Read {
    Missing,
    Corrupt(String),
    Json(Value),
}

pub fn read_json(path: &Path) -> std::io::Result<Read> {
    match std::fs::read(path) {
        Ok(b) => Ok(match serde_json::from_slice(&b) {
            Ok(v) => Read::Json(v),
            Err(e) => Read::Corrupt(e.to_string()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Read::Missing),
        Err(e) => Err(e),
    }
}

/// `*.json` files of `dir` whose stem matches the profile-name pattern, sorted by name.
pub fn list_named(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<(String, PathBuf)> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".json")?.to_owned();
            crate::service::valid_profile_name(&stem).then(|| (stem, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Per-user write locks (in-process mutex + cross-process `flock`).
#[derive(Default)]
pub struct Locks {
    map: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while a user's files are being changed. Field order matters: the file (and its
/// `flock`) is released before the in-process mutex.
pub struct Guard {
    _file: File,
    _inner: tokio::sync::OwnedMutexGuard<()>,
}

impl Locks {
    /// Hold the write lock of the user whose directory is `dir` until the guard drops.
    /// Blocking: call from a blocking thread, never from an async task.
    pub fn lock(&self, dir: &Path) -> std::io::Result<Guard> {
        let arc = {
            let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(dir.to_path_buf()).or_default().clone()
        };
        let inner = arc.blocking_lock_owned();
        ensure_dir(dir)?;
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(".lock"))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a descriptor this function owns; released when the file closes.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(Guard { _file: file, _inner: inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_cannot_escape() {
        let b = Path::new("/s");
        assert_eq!(user_dir(b, "default"), PathBuf::from("/s/users/default"));
        assert_eq!(user_dir(b, "../x"), PathBuf::from("/s/users/%2E%2E%2Fx"));
        assert_eq!(user_dir(b, ""), PathBuf::from("/s/users/%"));
    }
}
