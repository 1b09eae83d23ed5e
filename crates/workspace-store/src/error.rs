//! What can go wrong, typed so callers can tell "retry later" from "the operator must act"
//! from "the user is over quota".

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// Which quota a push would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaKind {
    /// Total bytes of regular files (both areas of the conversation together).
    Bytes,
    /// Number of files and symlinks (both areas together; directories are free).
    Files,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Misconfiguration: the operator must act. Never retried.
    #[error("workspace storage configuration: {0}")]
    Config(String),

    /// A user id (or other caller-supplied name) that cannot be part of a key.
    #[error("invalid id for workspace storage: {0}")]
    InvalidId(String),

    /// The object store answered with an error (or could not be reached).
    #[error("object storage {op} {key}: {source}")]
    Storage {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },

    /// A network call took longer than its bound.
    #[error("object storage {op} {key} timed out after {after:?}")]
    Timeout { op: &'static str, key: String, after: Duration },

    /// A local file-system operation failed.
    #[error("{op} {path}: {source}", path = path.display())]
    Local {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The directory to push is missing or is not a directory (a symlink to one is refused too).
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),

    /// A stored manifest that is unreadable or would be unsafe to restore (bad path, unknown
    /// format). Nothing is restored from it.
    #[error("stored manifest {key} is unusable: {reason}")]
    CorruptManifest { key: String, reason: String },

    /// A downloaded object whose content does not match the hash that names it.
    #[error("stored object {key} is corrupt: {reason}")]
    CorruptBlob { key: String, reason: String },

    /// The push would take the conversation over a quota. Nothing of it was uploaded and the
    /// stored manifest is unchanged.
    #[error("workspace storage quota exceeded: the conversation would store {would_be} {unit} (limit {limit}); nothing was uploaded, the stored copy is unchanged", unit = match kind { QuotaKind::Bytes => "bytes", QuotaKind::Files => "files" })]
    QuotaExceeded { kind: QuotaKind, limit: u64, would_be: u64 },

    /// The push would take the user (all their conversations together) over the per-user
    /// quota. Nothing of it was uploaded and the stored manifest is unchanged.
    #[error("workspace storage quota exceeded for user {user}: their conversations would store {would_be} {unit} (limit {limit}); nothing was uploaded, the stored copy is unchanged", unit = match kind { QuotaKind::Bytes => "bytes", QuotaKind::Files => "files" })]
    UserQuotaExceeded { user: String, kind: QuotaKind, limit: u64, would_be: u64 },

    /// The tree has more entries than `max_entries`: refused rather than walked forever.
    #[error("{path} has more than {limit} entries", path = path.display())]
    TooManyEntries { path: PathBuf, limit: u64 },

    /// Stopped on request (pusher stopped, shutdown).
    #[error("cancelled")]
    Cancelled,
}

impl StoreError {
    /// Whether trying again later may succeed without anyone acting (network, server errors,
    /// timeouts). Quota, configuration and corrupt-manifest errors are not retried.
    pub fn is_retriable(&self) -> bool {
        match self {
            StoreError::Storage { source, .. } => !matches!(
                source,
                object_store::Error::NotImplemented { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::UnknownConfigurationKey { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ),
            StoreError::Timeout { .. } | StoreError::CorruptBlob { .. } => true,
            // A local read error is usually a file that changed under us; the next attempt
            // sees the new state.
            StoreError::Local { .. } => true,
            StoreError::Config(_)
            | StoreError::InvalidId(_)
            | StoreError::NotADirectory(_)
            | StoreError::CorruptManifest { .. }
            | StoreError::QuotaExceeded { .. }
            | StoreError::UserQuotaExceeded { .. }
            | StoreError::TooManyEntries { .. }
            | StoreError::Cancelled => false,
        }
    }

    /// A quota (the conversation's or its user's) refused the push.
    pub fn is_quota(&self) -> bool {
        matches!(self, StoreError::QuotaExceeded { .. } | StoreError::UserQuotaExceeded { .. })
    }

    pub(crate) fn local(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Local { op, path: path.into(), source }
    }

    pub(crate) fn storage(op: &'static str, key: impl ToString, source: object_store::Error) -> Self {
        StoreError::Storage { op, key: key.to_string(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_message_is_clear() {
        let e = StoreError::QuotaExceeded { kind: QuotaKind::Bytes, limit: 100, would_be: 150 };
        let m = e.to_string();
        assert!(m.contains("150 bytes (limit 100)"), "{m}");
        assert!(m.contains("unchanged"), "{m}");
        assert!(!e.is_retriable() && e.is_quota());
        let e = StoreError::UserQuotaExceeded { user: "alice".into(), kind: QuotaKind::Files, limit: 10, would_be: 11 };
        let m = e.to_string();
        assert!(m.contains("user alice") && m.contains("11 files (limit 10)"), "{m}");
        assert!(!e.is_retriable() && e.is_quota());
        let e = StoreError::Timeout { op: "put", key: "k".into(), after: Duration::from_secs(1) };
        assert!(e.is_retriable());
    }
}
