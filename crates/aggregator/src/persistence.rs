//! Workspace persistence (`[workspace_storage]`): the provisioners' [`WorkspaceSync`] hooks
//! implemented over `nestor-workspace-store`, and what the API shows of it.
//!
//! Each conversation with local trees gets one [`ConversationStorage`] (its lock and its
//! status) for as long as nestor knows it, and, while its downstream runs, one periodic
//! pusher. In the life cycle (see `nestor_provisioner::sync`):
//!
//! * restore: each missing tree is pulled (`{prefix}/{owner}/{conversation}/{workspace,state}`)
//!   before the downstream starts; a pusher left from a run that died is stopped first (its
//!   tree is gone). Storage unreachable → the start fails with 503 + Retry-After.
//! * started: a pusher every `push_interval_secs` (idempotent).
//! * stopped (idle stop, `DELETE …/runtime`): the final push, in a task of its own (a caller
//!   that gives up does not cut it short), bounded by [`FINAL_PUSH_TIMEOUT`]. If it fails, a
//!   retrying pusher takes over until a push succeeds (the local trees are the only
//!   up-to-date copy meanwhile; the failures are in the runtime status and the log).
//! * released (delete): `on_delete = "keep"`: final push, and an error keeps the local trees;
//!   `"purge"`: the pusher stops and every stored object of the conversation is deleted.
//! * nestor's graceful shutdown ([`Persistence::shutdown`]): a final push of every
//!   conversation that has a pusher, concurrently, bounded.
//!
//! Quotas: the store refuses a push that would take a conversation
//! (`[workspace_storage.quota]`) or its user (`[workspace_storage.user_quota]`) over a limit
//! and leaves the stored copy as it was. nestor answers 413 to a create by a user already at
//! their limit ([`Persistence::check_create`]) and to new agent work (`POST …/events`,
//! `POST …/run`) on a conversation whose last push was refused ([`Persistence::check_work`]),
//! each with a log line; the runtime status says the same.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use http::StatusCode;
use nestor_core::{ConversationId, UserId};
use nestor_provisioner::sync::{Restored, SyncTrees, WorkspaceSync};
use nestor_provisioner::ProvisionError;
use nestor_workspace_store::{
    Area, ConversationStorage, OnDelete, PusherHandle, StoreError, SyncStatus, TreeSpec, WorkspaceStorageConfig, WorkspaceStore,
};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::errors::HttpError;

/// Longest a final push may take (idle stop, delete with keep, shutdown) before it is left to
/// the background retries.
pub const FINAL_PUSH_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest nestor's exit waits for the final pushes of every running conversation.
pub const SHUTDOWN_PUSH_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the start-up probe of the bucket.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on reading a user's usage for the create check.
const USAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The persistence of every conversation of this nestor.
pub struct Persistence {
    store: WorkspaceStore,
    cfg: WorkspaceStorageConfig,
    convs: DashMap<ConversationId, Arc<Conv>>,
    /// Ends background retries at exit.
    cancel: CancellationToken,
}

struct Conv {
    storage: ConversationStorage,
    trees: Mutex<SyncTrees>,
    pusher: Mutex<Option<Pusher>>,
}

struct Pusher {
    handle: PusherHandle,
    /// Pushing after a failed final push (the downstream is not running): stopped at the
    /// first success.
    retrying: bool,
}

impl std::fmt::Debug for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persistence").field("store", &self.store).field("conversations", &self.convs.len()).finish()
    }
}

impl Persistence {
    /// Connect to the bucket and check it answers (bounded), so a misconfiguration stops
    /// nestor at start with a clear message. `cache_root` is private to nestor.
    pub async fn start(cfg: &WorkspaceStorageConfig, cache_root: std::path::PathBuf) -> anyhow::Result<Arc<Self>> {
        let store = WorkspaceStore::connect(cfg, &cache_root).map_err(|e| anyhow::anyhow!("{e}"))?;
        match tokio::time::timeout(PROBE_TIMEOUT, store.probe()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!(
                "workspace_storage: bucket {:?} at {} is not usable: {e}",
                cfg.bucket,
                cfg.endpoint.as_deref().unwrap_or("AWS S3")
            ),
            Err(_) => anyhow::bail!(
                "workspace_storage: bucket {:?} at {} did not answer within {PROBE_TIMEOUT:?}",
                cfg.bucket,
                cfg.endpoint.as_deref().unwrap_or("AWS S3")
            ),
        }
        tracing::info!(bucket = %cfg.bucket, prefix = %cfg.prefix, push_interval_secs = cfg.push_interval_secs, on_delete = ?cfg.on_delete, "workspace storage ready");
        Ok(Arc::new(Self { store, cfg: cfg.clone(), convs: DashMap::new(), cancel: CancellationToken::new() }))
    }

    pub fn store(&self) -> &WorkspaceStore {
        &self.store
    }

    fn conv(&self, t: &SyncTrees) -> Result<Arc<Conv>, ProvisionError> {
        if let Some(c) = self.convs.get(&t.conversation) {
            *c.trees.lock().unwrap() = t.clone();
            return Ok(c.clone());
        }
        let storage = self
            .store
            .conversation(&t.owner, t.conversation)
            .map_err(|e| ProvisionError::Config(format!("workspace storage for user {:?}: {e}", t.owner.as_str())))?;
        let c = Arc::new(Conv { storage, trees: Mutex::new(t.clone()), pusher: Mutex::new(None) });
        Ok(self.convs.entry(t.conversation).or_insert(c).clone())
    }

    fn spawn_pusher(&self, c: &Conv, retrying: bool) -> Pusher {
        let t = c.trees.lock().unwrap().clone();
        let trees = vec![TreeSpec::new(Area::Workspace, t.workspace), TreeSpec::new(Area::State, t.state)];
        Pusher { handle: c.storage.spawn_pusher(trees, self.cfg.push_interval()), retrying }
    }

    /// The final push of `c`: its pusher's, or a one-off one. Runs in a task of its own.
    async fn final_push(self: &Arc<Self>, c: Arc<Conv>) -> Result<(), StoreError> {
        let pusher = c.pusher.lock().unwrap().take();
        let task = tokio::spawn(async move {
            match pusher {
                Some(p) => p.handle.finish(FINAL_PUSH_TIMEOUT).await.map(|_| ()),
                None => {
                    let t = c.trees.lock().unwrap().clone();
                    for (area, dir) in [(Area::Workspace, &t.workspace), (Area::State, &t.state)] {
                        if dir.is_dir() {
                            tokio::time::timeout(FINAL_PUSH_TIMEOUT, c.storage.push_with_retry(area, dir))
                                .await
                                .map_err(|_| StoreError::Timeout { op: "final push", key: c.storage.key_prefix().to_owned(), after: FINAL_PUSH_TIMEOUT })??;
                        }
                    }
                    Ok(())
                }
            }
        });
        match task.await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Config(format!("final push task failed: {e}"))),
        }
    }

    /// After a failed final push: push on until one succeeds (or the downstream runs again,
    /// or the conversation goes, or nestor exits).
    fn retry_in_background(self: &Arc<Self>, id: ConversationId, c: Arc<Conv>) {
        {
            let mut slot = c.pusher.lock().unwrap();
            if slot.is_some() {
                return; // started again meanwhile
            }
            *slot = Some(self.spawn_pusher(&c, true));
        }
        let me = self.clone();
        let every = self.cfg.push_interval().max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = me.cancel.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let st = c.storage.status();
                let done = st.healthy() && st.workspace.last_success_at.is_some() && st.state.last_success_at.is_some();
                let finished = {
                    let mut slot = c.pusher.lock().unwrap();
                    match slot.as_ref() {
                        Some(p) if p.retrying => {}
                        _ => return, // replaced by a running pusher, or taken by a final push
                    }
                    if done {
                        slot.take()
                    } else {
                        None
                    }
                };
                if let Some(p) = finished {
                    p.handle.stop().await;
                    tracing::info!(conversation = %id, "workspace store: the stopped conversation's files are stored now");
                    return;
                }
            }
        });
    }

    /// Final pushes of every conversation with a pusher (nestor exits), concurrently, bounded.
    pub async fn shutdown(self: &Arc<Self>) {
        let convs: Vec<(ConversationId, Arc<Conv>)> = self.convs.iter().map(|e| (*e.key(), e.value().clone())).collect();
        let pushes = convs.into_iter().filter(|(_, c)| c.pusher.lock().unwrap().is_some()).map(|(id, c)| async move {
            if let Err(e) = self.final_push(c).await {
                tracing::warn!(conversation = %id, error = %e, "workspace store: final push at shutdown failed; the files stay on this host and are pushed by the next nestor");
            }
        });
        let pushes: Vec<_> = pushes.collect();
        let n = pushes.len();
        if tokio::time::timeout(SHUTDOWN_PUSH_TIMEOUT, futures::future::join_all(pushes)).await.is_err() {
            tracing::warn!("workspace store: final pushes still running after {SHUTDOWN_PUSH_TIMEOUT:?}; abandoned (stored copies stay at their last generation)");
        } else if n > 0 {
            tracing::info!(conversations = n, "workspace store: final pushes done");
        }
        self.cancel.cancel();
    }

    /// The persistence status of a conversation, for `GET …/runtime`.
    pub fn status(&self, owner: &UserId, id: ConversationId) -> Option<SyncStatus> {
        if let Some(c) = self.convs.get(&id) {
            return Some(c.storage.status());
        }
        self.store.status(owner, id)
    }

    /// The `workspace_storage` object of the runtime answer.
    pub fn status_json(&self, owner: &UserId, id: ConversationId) -> Value {
        status_value(&self.status(owner, id).unwrap_or_default(), self.cfg.push_interval_secs)
    }

    /// Deletes every stored object of a conversation, retrying what can be retried.
    async fn purge_stored(&self, id: ConversationId, storage: &ConversationStorage) {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match storage.purge().await {
                Ok(r) => {
                    tracing::info!(conversation = %id, objects = r.objects_deleted, "workspace store: purged the deleted conversation");
                    return;
                }
                Err(e) if e.is_retriable() && attempt < self.cfg.retry.max_attempts => {
                    tokio::time::sleep(self.cfg.retry.backoff(attempt)).await;
                }
                Err(e) => {
                    tracing::warn!(conversation = %id, prefix = %storage.key_prefix(), error = %e, "workspace store: could not purge the deleted conversation's objects");
                    return;
                }
            }
        }
    }
}

/// The `workspace_storage` object of the runtime answer, from a status (nestor's own, or the
/// one a pod's sync sidecar serves: the same shape either way).
pub fn status_value(s: &SyncStatus, push_interval_secs: u64) -> Value {
    {
        let areas = [&s.workspace, &s.state];
        let last_success = if areas.iter().all(|a| a.last_success_at.is_some()) {
            areas.iter().filter_map(|a| a.last_success_at).min()
        } else {
            None
        };
        let last_error = areas.iter().filter(|a| a.last_error_at.is_some()).max_by_key(|a| a.last_error_at);
        let mut v = json!({
            "healthy": s.healthy(),
            "over_quota": s.over_quota(),
            "pushing": s.workspace.pushing || s.state.pushing,
            "pending_bytes": s.workspace.pending_bytes + s.state.pending_bytes,
            "consecutive_failures": s.workspace.consecutive_failures.max(s.state.consecutive_failures),
            "last_success_at": last_success.map(rfc3339),
            "last_error": last_error.and_then(|a| a.last_error.clone()),
            "last_error_at": last_error.and_then(|a| a.last_error_at).map(rfc3339),
            "push_interval_secs": push_interval_secs,
        });
        if let Ok(areas) = serde_json::to_value(s) {
            if let (Some(o), Some(a)) = (v.as_object_mut(), areas.as_object()) {
                o.extend(a.clone());
            }
        }
        v
    }
}

impl Persistence {
    /// A create by `user` when they are at their storage limit: 413.
    pub async fn check_create(&self, user: &UserId) -> Result<(), HttpError> {
        let q = self.cfg.user_quota;
        if q.max_bytes.is_none() && q.max_files.is_none() {
            return Ok(());
        }
        let usage = match tokio::time::timeout(USAGE_TIMEOUT, self.store.user_usage(user)).await {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                tracing::debug!(user = %user, "cannot read the user's storage usage ({e}); not checked");
                return Ok(());
            }
            Err(_) => return Ok(()),
        };
        let over = match (q.max_bytes, q.max_files) {
            (Some(l), _) if usage.bytes >= l => Some(format!("{} bytes (limit {l})", usage.bytes)),
            (_, Some(l)) if usage.files >= l => Some(format!("{} files (limit {l})", usage.files)),
            _ => None,
        };
        let Some(what) = over else { return Ok(()) };
        let detail = format!(
            "workspace storage quota exceeded for user {user}: their conversations store {what}; delete files or conversations to create new ones"
        );
        tracing::warn!(user = %user, "create refused: {detail}");
        metrics::counter!("nestor_quota_rejections_total", "quota" => "user_storage").increment(1);
        Err(too_large(detail))
    }

    /// New agent work on a conversation whose last push a quota refused: 413 (its files are
    /// safe locally; the stored copy is the last one within the quota).
    pub fn check_work(&self, owner: &UserId, id: ConversationId) -> Result<(), HttpError> {
        let Some(s) = self.status(owner, id) else { return Ok(()) };
        if !s.over_quota() {
            return Ok(());
        }
        let why = [&s.workspace, &s.state]
            .into_iter()
            .find(|a| a.over_quota)
            .and_then(|a| a.last_error.clone())
            .unwrap_or_else(|| "workspace storage quota exceeded".into());
        refuse_work(owner, id, why)
    }

    /// [`Persistence::check_work`] from a status the pod's sync sidecar reported (the
    /// `workspace_storage` object of the runtime answer).
    pub fn check_work_status(&self, owner: &UserId, id: ConversationId, status: &Value) -> Result<(), HttpError> {
        if status["over_quota"] != Value::Bool(true) {
            return Ok(());
        }
        let why = ["workspace", "state"]
            .into_iter()
            .find(|a| status[a]["over_quota"] == Value::Bool(true))
            .and_then(|a| status[a]["last_error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "workspace storage quota exceeded".into());
        refuse_work(owner, id, why)
    }
}

fn refuse_work(owner: &UserId, id: ConversationId, why: String) -> Result<(), HttpError> {
    let detail = format!("{why}. Free space (delete files, or other conversations) before giving the agent more work.");
    tracing::warn!(conversation = %id, user = %owner, "agent work refused: {why}");
    metrics::counter!("nestor_quota_rejections_total", "quota" => "storage").increment(1);
    Err(too_large(detail))
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

fn too_large(detail: String) -> HttpError {
    HttpError::Raw(Box::new(crate::routes::conversations::json_response(StatusCode::PAYLOAD_TOO_LARGE, &json!({ "detail": detail }))))
}

/// A store error as the start of a downstream sees it.
fn restore_error(id: ConversationId, e: StoreError) -> ProvisionError {
    if e.is_retriable() {
        ProvisionError::Unavailable {
            detail: format!("the stored files of conversation {id} cannot be restored now ({e})"),
            retry_after: Some(Duration::from_secs(5)),
        }
    } else {
        ProvisionError::Start(format!("cannot restore the stored files of conversation {id}: {e}"))
    }
}

/// The provisioners' view of [`Persistence`].
pub struct Hooks(pub Arc<Persistence>);

impl Persistence {
    /// What provisioners are given.
    pub fn hooks(self: &Arc<Self>) -> Arc<dyn WorkspaceSync> {
        Arc::new(Hooks(self.clone()))
    }
}

impl std::ops::Deref for Hooks {
    type Target = Arc<Persistence>;
    fn deref(&self) -> &Arc<Persistence> {
        &self.0
    }
}

#[async_trait]
impl WorkspaceSync for Hooks {
    async fn restore(&self, t: &SyncTrees) -> Result<Restored, ProvisionError> {
        let c = self.conv(t)?;
        let missing = [(Area::Workspace, &t.workspace), (Area::State, &t.state)]
            .into_iter()
            .filter(|(_, d)| !d.exists())
            .collect::<Vec<_>>();
        if missing.is_empty() {
            return Ok(Restored::default());
        }
        // A pusher of a run that died would push the tree being replaced: stop it.
        let stale = c.pusher.lock().unwrap().take();
        if let Some(p) = stale {
            p.handle.stop().await;
        }
        let mut out = Restored::default();
        for (area, dir) in missing {
            let r = c.storage.pull(area, dir).await.map_err(|e| {
                tracing::warn!(conversation = %t.conversation, %area, error = %e, "workspace store: restore failed");
                restore_error(t.conversation, e)
            })?;
            if r.found {
                tracing::info!(conversation = %t.conversation, %area, files = r.files, bytes = r.bytes, generation = r.generation, elapsed_ms = r.elapsed_ms, "workspace store: restored");
            }
            match area {
                Area::Workspace => out.workspace = true,
                Area::State => out.state = true,
            }
        }
        Ok(out)
    }

    fn started(&self, t: &SyncTrees) {
        let Ok(c) = self.conv(t) else { return };
        let mut slot = c.pusher.lock().unwrap();
        match slot.as_mut() {
            Some(p) => p.retrying = false,
            None => *slot = Some(self.spawn_pusher(&c, false)),
        }
    }

    async fn stopped(&self, t: &SyncTrees) {
        let Ok(c) = self.conv(t) else { return };
        match self.final_push(c.clone()).await {
            Ok(()) => tracing::debug!(conversation = %t.conversation, "workspace store: final push done"),
            Err(e) => {
                tracing::warn!(conversation = %t.conversation, error = %e, "workspace store: final push failed; retrying in the background");
                self.retry_in_background(t.conversation, c);
            }
        }
    }

    async fn released(&self, t: &SyncTrees) -> Result<(), String> {
        let c = self.conv(t).map_err(|e| e.to_string())?;
        let r = match self.cfg.on_delete {
            OnDelete::Keep => self.final_push(c.clone()).await.map_err(|e| format!("the final push failed: {e}")),
            OnDelete::Purge => {
                let p = c.pusher.lock().unwrap().take();
                if let Some(p) = p {
                    p.handle.stop().await;
                }
                self.purge_stored(t.conversation, &c.storage).await;
                Ok(())
            }
        };
        self.convs.remove(&t.conversation);
        r
    }

    async fn purge(&self, conversation: ConversationId, owner: &UserId) -> Result<(), String> {
        let storage = self
            .store
            .conversation(owner, conversation)
            .map_err(|e| format!("workspace storage for user {:?}: {e}", owner.as_str()))?;
        self.purge_stored(conversation, &storage).await;
        self.convs.remove(&conversation);
        Ok(())
    }
}
