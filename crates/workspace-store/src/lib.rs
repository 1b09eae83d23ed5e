//! Persisting a conversation's directory trees to S3-compatible object storage.
//!
//! A conversation lives on a downstream agent-server that may be a throw-away container on
//! any host. Its two trees — the **workspace** (the agent's files) and the agent-server's
//! **state** for it (events, bash history, persistence dir) — are kept in a bucket so it can
//! resume anywhere:
//!
//! * [`ConversationStorage::pull`] restores a tree before the downstream starts;
//! * [`ConversationStorage::push`] stores what changed since the last push;
//! * [`ConversationStorage::spawn_pusher`] pushes periodically, and its [`PusherHandle`] runs
//!   the final push (idle stop, delete with keep, shutdown) or stops it (delete with purge,
//!   then [`ConversationStorage::purge`]).
//!
//! # Layout
//!
//! ```text
//! {prefix}/{user}/{conversation-hex}/workspace/manifest.json
//! {prefix}/{user}/{conversation-hex}/workspace/blobs/{h[0..2]}/{h}
//! {prefix}/{user}/{conversation-hex}/state/manifest.json
//! {prefix}/{user}/{conversation-hex}/state/blobs/{h[0..2]}/{h}
//! ```
//!
//! A tree is a **manifest** (JSON, see [`manifest`]: every path with its kind, size, mtime,
//! permission bits and content hash) plus **content-addressed blobs** named by the BLAKE3 hash
//! of their content. User ids are checked to be single safe key segments and file names never
//! become keys, so no name can reach another conversation's or user's keys (see [`keys`]).
//!
//! # Consistency
//!
//! Blobs are immutable (a key names one content forever), so uploading one never changes what
//! an existing manifest describes. A push uploads the missing blobs first, then writes the new
//! manifest in a single PUT — the commit point — and only then deletes the blobs no longer
//! referenced. Whatever fails or is interrupted, the stored manifest describes a complete,
//! consistent set of objects: the previous generation until the PUT succeeds, the new one
//! after. Leftovers of an interrupted push are unreferenced blobs, deleted by a later push's
//! sweep, and (for a multipart upload cut off mid-way) incomplete multipart uploads, which S3
//! keeps until aborted: give the bucket a lifecycle rule `AbortIncompleteMultipartUpload`.
//!
//! A pull downloads into a fresh temporary directory beside the target and swaps it into
//! place (`renameat2(RENAME_EXCHANGE)`, or two renames where that is unsupported), so the
//! agent never sees a half-restored tree; every blob's hash is checked as it streams to disk.
//! The target must therefore not be a mount point (mount its parent instead).
//!
//! A push is incremental: the manifest is also kept locally (under the store's cache root)
//! with each file's `stat`; a file whose size, mtime, ctime, inode and mode are unchanged is
//! not read again, and a blob the stored manifest already has is not uploaded again (so
//! renames and copies upload nothing). Before committing, the push checks the stored
//! manifest's ETag against the one it last wrote: if the bucket changed behind its back (it was
//! purged, restored from elsewhere, or the server lost its data) the push re-reads it and uploads
//! whatever it lacks. An unchanged tree costs one HEAD request and no upload. A file that
//! changes while it is being pushed keeps its previously stored version in this generation and
//! is pushed next time ("deferred"); the hash of every upload is checked against the content
//! actually sent.
//!
//! Pulls, pushes and purges of one conversation are serialised (one lock per conversation in
//! a [`WorkspaceStore`], however many handles exist). One conversation is expected to be
//! written by one nestor at a time; two nestors pushing the same conversation concurrently
//! would each keep a consistent manifest, but the last one wins.
//!
//! # Retry and status
//!
//! Every request is bounded by `request_timeout_secs`; object_store itself retries a failed
//! request twice. [`ConversationStorage::push_with_retry`] retries a failed push with doubling,
//! capped, jittered backoff (`[workspace_storage.retry]`), except for errors retrying cannot fix
//! (quota, configuration, corrupt manifest). Every attempt updates the conversation's
//! [`SyncStatus`] (last success, last error, consecutive failures, pending bytes), which is
//! what `/api/conversations/{id}/runtime` should show. While pushes fail, the local tree is
//! the only up-to-date copy and is left alone; the stored copy stays at its last generation.
//!
//! # Quotas
//!
//! `[workspace_storage.quota]` limits a conversation's bytes and files (both trees together).
//! A push that would exceed a limit, and grow the usage, uploads nothing and fails with
//! [`StoreError::QuotaExceeded`]; the stored copy is untouched. A push that shrinks the usage
//! is accepted even while still over the limit, so cleaning up always works.
//!
//! # What is kept
//!
//! Regular files (content, permission bits `0o777`, mtime), directories (including empty
//! ones, with their permission bits) and symlinks (their text, stored as is). Symlinks are
//! never followed, neither when walking nor when reading (files are opened `O_NOFOLLOW`), so a
//! link pointing outside the tree stores the link, not what it points to; a restored link is
//! recreated as the same link, after every file, and no stored entry can sit below a symlink
//! or a file (the manifest check refuses that), so restoring cannot write through a link.
//! FIFOs, sockets and device nodes are skipped, as are names that are not UTF-8 (both counted
//! in the [`PushReport`]). Owners, setuid/setgid bits, extended attributes and hard links (each
//! link is stored as a file; identical content shares one blob) are not kept.

pub mod config;
pub mod error;
mod io;
pub mod keys;
pub mod manifest;
mod pull;
mod push;
mod pusher;
mod scan;
pub mod status;
mod usage;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use nestor_core::{ConversationId, UserId};
use object_store::ObjectStore;

pub use config::{OnDelete, QuotaConfig, RetrySettings, Secret, WorkspaceStorageConfig};
pub use error::{QuotaKind, StoreError};
pub use io::IoStats;
pub use keys::Area;
pub use manifest::{Entry, Manifest, Totals};
pub use pull::PullReport;
pub use push::PushReport;
pub use pusher::{PusherHandle, TreeSpec};
pub use status::{AreaStatus, SyncStatus};

use io::Io;
use keys::ConversationKeys;

/// The largest manifest accepted (about a million entries).
pub const MAX_MANIFEST_BYTES: u64 = 512 * 1024 * 1024;

/// The bucket, as configured: one per nestor, shared by all conversations.
#[derive(Clone)]
pub struct WorkspaceStore {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: WorkspaceStorageConfig,
    io: Io,
    cache_root: PathBuf,
    conversations: Mutex<HashMap<(UserId, ConversationId), Weak<ConvShared>>>,
    /// Per-user usage, for the per-user quota (see [`usage`]).
    users: Mutex<HashMap<UserId, Arc<usage::Ledger>>>,
}

/// Shared by every handle of one conversation.
#[derive(Default)]
struct ConvShared {
    /// Held for the whole of a pull, push or purge.
    op: tokio::sync::Mutex<()>,
    status: Mutex<SyncStatus>,
    /// What each area stores (for the quota, which counts both).
    committed: Mutex<HashMap<Area, Totals>>,
}

impl std::fmt::Debug for WorkspaceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkspaceStore")
            .field("bucket", &self.inner.cfg.bucket)
            .field("prefix", &self.inner.cfg.prefix)
            .finish()
    }
}

impl WorkspaceStore {
    /// The store `cfg` describes. `cache_root` is a directory private to nestor (not visible to
    /// agents) where the local copies of manifests are kept.
    pub fn connect(cfg: &WorkspaceStorageConfig, cache_root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let store = cfg.build_object_store()?;
        Self::with_object_store(store, cfg, cache_root)
    }

    /// The same over any object store (tests, other back ends).
    pub fn with_object_store(
        store: Arc<dyn ObjectStore>,
        cfg: &WorkspaceStorageConfig,
        cache_root: impl Into<PathBuf>,
    ) -> Result<Self, StoreError> {
        cfg.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                io: Io::new(store, cfg.request_timeout(), cfg.buffer_budget_bytes),
                cfg: cfg.clone(),
                cache_root: cache_root.into(),
                conversations: Mutex::default(),
                users: Mutex::default(),
            }),
        })
    }

    pub fn config(&self) -> &WorkspaceStorageConfig {
        &self.inner.cfg
    }

    /// One conversation's storage. Fails only for a user id that cannot be a key segment
    /// (see [`keys::validate_segment`]). Handles for the same conversation share their lock
    /// and status.
    pub fn conversation(&self, user: &UserId, conversation: ConversationId) -> Result<ConversationStorage, StoreError> {
        let keys = ConversationKeys::new(&self.inner.cfg.prefix, user, conversation)?;
        let mut map = self.inner.conversations.lock().unwrap();
        let k = (user.clone(), conversation);
        let shared = match map.get(&k).and_then(Weak::upgrade) {
            Some(s) => s,
            None => {
                // Forget conversations nobody holds any more (bounded by the map's size).
                if map.len() >= 64 {
                    map.retain(|_, w| w.strong_count() > 0);
                }
                let s = Arc::new(ConvShared::default());
                map.insert(k, Arc::downgrade(&s));
                s
            }
        };
        Ok(ConversationStorage {
            inner: self.inner.clone(),
            keys,
            user: user.clone(),
            conversation,
            shared,
        })
    }

    /// The status of a conversation someone holds a handle (or a pusher) for.
    pub fn status(&self, user: &UserId, conversation: ConversationId) -> Option<SyncStatus> {
        let map = self.inner.conversations.lock().unwrap();
        let shared = map.get(&(user.clone(), conversation))?.upgrade()?;
        let s = shared.status.lock().unwrap().clone();
        Some(s)
    }

    /// Checks at start-up that the bucket exists, answers and the credentials work (one
    /// bounded LIST under the prefix), so a misconfiguration shows at once rather than at the
    /// first push.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let io = &self.inner.io;
        let prefix = object_store::path::Path::parse(&self.inner.cfg.prefix).expect("validated prefix");
        let prefix = (!self.inner.cfg.prefix.is_empty()).then_some(prefix);
        let fut = io.store.list_with_delimiter(prefix.as_ref());
        match io.call(io::Op::List, "list", &prefix.clone().unwrap_or_default(), fut).await {
            Ok(_) => Ok(()),
            Err(StoreError::Storage { source, .. })
                if matches!(source, object_store::Error::NotFound { .. }) || source.to_string().contains("NoSuchBucket") =>
            {
                Err(StoreError::Config(format!(
                    "workspace_storage.bucket {:?} does not exist (or is not visible with these credentials)",
                    self.inner.cfg.bucket
                )))
            }
            Err(StoreError::Storage {
                source: source @ (object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }),
                ..
            }) => Err(StoreError::Config(format!(
                "workspace_storage: the credentials were refused for bucket {:?}: {source}",
                self.inner.cfg.bucket
            ))),
            Err(e) => Err(e),
        }
    }

    /// What all of `user`'s conversations store (both areas), as counted for
    /// `[workspace_storage.user_quota]`: read from the bucket the first time, then kept current
    /// by this store's pulls, pushes and purges.
    pub async fn user_usage(&self, user: &UserId) -> Result<Totals, StoreError> {
        self.inner.user_usage(user).await
    }

    /// Request and byte counters since this store was made.
    pub fn io_stats(&self) -> IoStats {
        self.inner.io.stats()
    }
}

/// One conversation's stored trees. Cheap to clone.
#[derive(Clone)]
pub struct ConversationStorage {
    inner: Arc<Inner>,
    keys: ConversationKeys,
    user: UserId,
    conversation: ConversationId,
    shared: Arc<ConvShared>,
}

impl std::fmt::Debug for ConversationStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConversationStorage").field("keys", &self.keys.base()).finish()
    }
}

/// What [`ConversationStorage::purge`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PurgeReport {
    pub objects_deleted: u64,
}

impl ConversationStorage {
    pub fn user(&self) -> &UserId {
        &self.user
    }

    pub fn conversation(&self) -> ConversationId {
        self.conversation
    }

    /// `{prefix}/{user}/{conversation-hex}`: every object of the conversation is below it.
    pub fn key_prefix(&self) -> &str {
        self.keys.base()
    }

    /// A snapshot of the persistence status.
    pub fn status(&self) -> SyncStatus {
        self.shared.status.lock().unwrap().clone()
    }

    /// Where the local copy of an area's manifest is kept.
    fn cache_path(&self, area: Area) -> PathBuf {
        self.inner
            .cache_root
            .join(self.user.as_str())
            .join(self.conversation.hex())
            .join(format!("{area}.json"))
    }

    /// Deletes every stored object of the conversation (both trees) and the local manifest
    /// copies. The manifests go first, so an interrupted purge leaves "nothing stored" plus
    /// unreferenced blobs (which a later purge or push removes), never a manifest whose blobs
    /// are gone. Stop the conversation's pusher first ([`PusherHandle::stop`]).
    pub async fn purge(&self) -> Result<PurgeReport, StoreError> {
        let _op = self.shared.op.lock().await;
        let io = &self.inner.io;
        let mut deleted = io.delete_many(Area::ALL.iter().map(|a| self.keys.manifest(*a)).collect()).await?;
        for area in Area::ALL {
            let _ = std::fs::remove_file(self.cache_path(area));
        }
        let _ = std::fs::remove_dir(self.cache_path(Area::Workspace).parent().expect("has parent"));
        self.shared.committed.lock().unwrap().clear();
        self.ledger_forget();
        {
            let mut st = self.shared.status.lock().unwrap();
            for area in Area::ALL {
                let a = st.area_mut(area);
                a.generation = 0;
                a.stored_bytes = 0;
                a.stored_files = 0;
            }
        }
        let limit = self.inner.cfg.max_entries.saturating_mul(2).saturating_add(1000);
        let rest = io.list_all(&self.keys.conversation_prefix(), limit).await?;
        if !rest.is_empty() {
            deleted += io.delete_many(rest).await?;
        }
        tracing::info!(conversation = %self.conversation, user = %self.user, deleted, "workspace store: purged");
        Ok(PurgeReport { objects_deleted: deleted })
    }

    /// What the stored copy of `area` holds, if known without a request (after a pull or push
    /// in this process).
    pub fn stored_totals(&self, area: Area) -> Option<Totals> {
        self.shared.committed.lock().unwrap().get(&area).copied()
    }

    /// Totals of the other area, for the quota: known, or from its local manifest copy, or
    /// from the bucket.
    async fn other_area_totals(&self, area: Area) -> Result<Totals, StoreError> {
        let other = match area {
            Area::Workspace => Area::State,
            Area::State => Area::Workspace,
        };
        if let Some(t) = self.stored_totals(other) {
            return Ok(t);
        }
        let t = match self.fetch_manifest(other).await? {
            Some((m, _)) => m.totals(),
            None => Totals::default(),
        };
        self.shared.committed.lock().unwrap().insert(other, t);
        self.ledger_commit(other, t);
        Ok(t)
    }

    /// The stored manifest of `area` (checked) and its ETag; `None` when nothing is stored.
    async fn fetch_manifest(&self, area: Area) -> Result<Option<(Manifest, Option<String>)>, StoreError> {
        let key = self.keys.manifest(area);
        let Some((bytes, etag)) = self.inner.io.get_small(&key, MAX_MANIFEST_BYTES).await? else {
            return Ok(None);
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| StoreError::CorruptManifest {
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        m.validate(key.as_ref(), self.inner.cfg.max_entries)?;
        Ok(Some((m, etag)))
    }

    fn set_committed(&self, area: Area, m: &Manifest) {
        let t = m.totals();
        self.shared.committed.lock().unwrap().insert(area, t);
        self.ledger_commit(area, t);
        let mut st = self.shared.status.lock().unwrap();
        let a = st.area_mut(area);
        a.generation = m.generation;
        a.stored_bytes = t.bytes;
        a.stored_files = t.files;
    }
}

/// `dir`'s parent and name, for temporary siblings.
fn split_dir(dir: &Path) -> Result<(PathBuf, String), StoreError> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| StoreError::Config(format!("{} does not end in a UTF-8 directory name", dir.display())))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_owned()))
}
