//! The persistence seam: hooks a provisioner calls around a conversation's downstream so the
//! conversation's two trees — its **workspace** (the agent's files) and the agent-server's
//! **state** for it (events, bash history, persistence dir) — outlive the downstream and can
//! be restored on a fresh one, on this host or another.
//!
//! Provisioners only know directories on nestor's host; what "stored" means (object storage,
//! quotas, retries) is the implementation's business (nestor's aggregator implements it over
//! `nestor-workspace-store`). A backend that supports persistence keeps each conversation's
//! two trees as directories of their own on nestor's host (never a mount point: a restore
//! swaps the directory) and calls, in this order:
//!
//! 1. [`WorkspaceSync::restore`] before the downstream starts (first start, restart after a
//!    stop, re-creation of a removed container): every tree whose directory is **missing** is
//!    restored from storage — a fresh host, or a container whose local data was removed — and
//!    trees present locally are left alone (they were written here and are at least as new as
//!    the stored copy, which this host pushed). The downstream starts only after this returns
//!    Ok, so the agent never sees a half-restored tree; an error fails the start.
//! 2. [`WorkspaceSync::started`] once the downstream runs (or was re-adopted running): pushes
//!    periodically from then on.
//! 3. [`WorkspaceSync::stopped`] after the downstream stopped with its trees kept (idle policy,
//!    an explicit stop): the final push. A failed final push goes on being retried in the
//!    background and is reported, never dropped.
//! 4. [`WorkspaceSync::released`] after the conversation's downstream is gone for good
//!    (deleted): final push and keep, or stop pushing and purge the stored copy, per the
//!    implementation's policy. When it fails the backend keeps the local trees (the only
//!    up-to-date copy) instead of removing them.
//!
//! nestor's exit (graceful shutdown) is not the provisioner's to report: the aggregator runs
//! the final pushes of every running conversation after the provisioner's own shutdown.

use std::path::PathBuf;

use async_trait::async_trait;
use nestor_core::{ConversationId, UserId};

use crate::ProvisionError;

/// A conversation's trees on nestor's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncTrees {
    pub conversation: ConversationId,
    pub owner: UserId,
    /// The agent's files.
    pub workspace: PathBuf,
    /// The agent-server's state for the conversation.
    pub state: PathBuf,
}

/// What [`WorkspaceSync::restore`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// The workspace directory was missing and was restored (or created empty).
    pub workspace: bool,
    /// The state directory was missing and was restored (or created empty).
    pub state: bool,
}

/// The hooks (see the module docs for when each one is called).
#[async_trait]
pub trait WorkspaceSync: Send + Sync + 'static {
    /// Before the downstream starts: restore every missing tree. Errors are
    /// [`ProvisionError::Unavailable`] (storage unreachable: retry later) or
    /// [`ProvisionError::Start`] (a stored copy that cannot be restored).
    async fn restore(&self, trees: &SyncTrees) -> Result<Restored, ProvisionError>;

    /// The downstream runs: push periodically (a second call for a conversation already being
    /// pushed changes nothing).
    fn started(&self, trees: &SyncTrees);

    /// The downstream stopped and its trees stay: final push (bounded).
    async fn stopped(&self, trees: &SyncTrees);

    /// The conversation is gone. `Err` (with the reason) means its local trees must be kept.
    async fn released(&self, trees: &SyncTrees) -> Result<(), String>;

    /// For backends whose trees are not on nestor's host (kubernetes: the pod restores and
    /// pushes them itself, see `kubernetes::persistence`): the conversation is deleted with
    /// `on_delete = "purge"` and its pod is gone; delete its stored copy. Default: nothing.
    async fn purge(&self, _conversation: ConversationId, _owner: &UserId) -> Result<(), String> {
        Ok(())
    }
}

/// For tests and backends: a [`WorkspaceSync`] that only records what it is told.
#[derive(Debug, Default)]
pub struct RecordingSync {
    pub calls: std::sync::Mutex<Vec<(&'static str, ConversationId)>>,
}

#[async_trait]
impl WorkspaceSync for RecordingSync {
    async fn restore(&self, t: &SyncTrees) -> Result<Restored, ProvisionError> {
        self.calls.lock().unwrap().push(("restore", t.conversation));
        let mut r = Restored::default();
        for (dir, flag) in [(&t.workspace, &mut r.workspace), (&t.state, &mut r.state)] {
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|e| ProvisionError::Start(e.to_string()))?;
                *flag = true;
            }
        }
        Ok(r)
    }

    fn started(&self, t: &SyncTrees) {
        self.calls.lock().unwrap().push(("started", t.conversation));
    }

    async fn stopped(&self, t: &SyncTrees) {
        self.calls.lock().unwrap().push(("stopped", t.conversation));
    }

    async fn released(&self, t: &SyncTrees) -> Result<(), String> {
        self.calls.lock().unwrap().push(("released", t.conversation));
        Ok(())
    }
}
