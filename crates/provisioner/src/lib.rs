//! The provisioner seam: where a conversation's downstream agent-server comes from.
//!
//! nestor never runs a conversation itself; each one lives on a downstream agent-server. A
//! [`Provisioner`] decides which downstream that is — a subprocess it starts
//! ([`process::ProcessProvisioner`]), one of a fixed set of remote servers
//! ([`existing::ExistingProvisioner`]), a container per conversation
//! ([`docker::DockerProvisioner`]), a pod per conversation
//! ([`kubernetes::KubernetesProvisioner`]), or a pre-warmed one taken from a pool
//! ([`pool::PoolProvisioner`] over a backend that implements [`pool::WarmBackend`]).
//! Everything above this trait (routing, the catalog, the WebSocket proxy) only sees
//! [`Downstream`]s, so adding a backend touches nothing else.
//!
//! Contract, for every backend:
//! * [`Provisioner::recover`] runs once at start: adopt what a previous nestor left running
//!   (or clean it up) so routes survive a restart.
//! * [`Provisioner::provision`] returns quickly with a downstream that may still be
//!   `Starting`; callers wait with [`Provisioner::ensure_ready`], which also restarts a stopped
//!   downstream and is always bounded by a timeout.
//! * [`Provisioner::release`] is told when a conversation leaves a downstream; a
//!   per-conversation backend stops and removes its downstream when none remain.
//! * [`Provisioner::shutdown`] drains on nestor's exit.
//!
//! Backends that keep a conversation's files on nestor's host (`process`, `docker`) can
//! persist them through the [`sync::WorkspaceSync`] hooks (restore before start, push while
//! running, final push on stop and delete).

pub mod container_env;
pub mod docker;
pub mod existing;
pub mod kubernetes;
pub mod pool;
pub mod process;
pub mod sync;
mod util;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nestor_core::downstream::NotReady;
use nestor_core::{ConversationId, Downstream, DownstreamId, UserId};

/// What a new conversation needs from its provisioner.
#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    pub conversation: ConversationId,
    pub owner: UserId,
}

/// How a provisioner failed. Messages are for clients and logs: they name the conversation,
/// image, binary or setting at fault, never a downstream key.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProvisionError {
    /// Misconfiguration (missing binary, bad URL): the operator must act.
    #[error("{0}")]
    Config(String),
    /// No capacity now (all servers unhealthy, limits reached); retry later.
    #[error("{detail}")]
    Unavailable { detail: String, retry_after: Option<Duration> },
    /// Starting the downstream failed.
    #[error("could not start an agent-server: {0}")]
    Start(String),
    /// The downstream did not become ready.
    #[error("{0}")]
    NotReady(#[from] NotReady),
    /// This downstream is not one of ours.
    #[error("unknown downstream {0}")]
    UnknownDownstream(DownstreamId),
    #[error("{0}")]
    Other(String),
}

/// The seam. One implementation per backend kind.
#[async_trait]
pub trait Provisioner: Send + Sync + 'static {
    /// `process`, `existing`, `docker`, `kubernetes`, `pool`.
    fn kind(&self) -> &'static str;

    /// Start of day: find downstreams a previous nestor left behind, adopt the healthy ones,
    /// clean up the rest. Returns what it owns afterwards.
    async fn recover(&self) -> Result<Vec<Arc<Downstream>>, ProvisionError>;

    /// Choose or start a downstream for a new conversation. May return it still `Starting`.
    async fn provision(&self, req: ProvisionRequest) -> Result<Arc<Downstream>, ProvisionError>;

    /// Where `conversation` lives, when this backend can tell without nestor's catalog: asked
    /// on a catalog miss, so a replica serves conversations another replica created (the
    /// `kubernetes` backend looks the conversation's objects up by name and label). The
    /// downstream returned is then owned (`get`, `list`) like any other. Default: None.
    async fn find(&self, _conversation: &ConversationId) -> Result<Option<Arc<Downstream>>, ProvisionError> {
        Ok(None)
    }

    /// A downstream it owns.
    fn get(&self, id: &DownstreamId) -> Option<Arc<Downstream>>;

    /// Every downstream it owns, in any state.
    fn list(&self) -> Vec<Arc<Downstream>>;

    /// Make sure `ds` runs (start it again if it was stopped) and wait until it is ready,
    /// at most `timeout`.
    async fn ensure_ready(&self, ds: &Arc<Downstream>, timeout: Duration) -> Result<(), ProvisionError>;

    /// Stop `ds` but keep its state (idle policy); the next [`Provisioner::ensure_ready`]
    /// starts it again. Backends that do not own their downstreams do nothing.
    async fn stop(&self, _ds: &Arc<Downstream>) -> Result<(), ProvisionError> {
        Ok(())
    }

    /// `conversation` no longer lives on `ds` (deleted, or its create failed);
    /// `remaining` conversations still do.
    async fn release(
        &self,
        ds: &Arc<Downstream>,
        conversation: ConversationId,
        remaining: usize,
    ) -> Result<(), ProvisionError>;

    /// A downstream for host-global operations that name no conversation (settings, skills,
    /// host-wide bash, …), started if need be.
    async fn home(&self) -> Result<Arc<Downstream>, ProvisionError>;

    /// The create of a conversation provisioned on `ds` succeeded: what was provisioned for
    /// it is no longer "half-created" (which restart recovery and sweeps may remove).
    fn mark_active(&self, _ds: &Downstream) {}

    /// Adjust a create body for this downstream before it is forwarded (e.g. point the
    /// workspace at the conversation's own directory).
    fn prepare_create(&self, _ds: &Downstream, _body: &mut serde_json::Map<String, serde_json::Value>) {}

    /// Stop what nestor's exit should stop (per the backend's policy), bounded.
    async fn shutdown(&self);

    /// The persistence status of `ds`'s files when the backend, not nestor, pushes them
    /// (kubernetes: the pod's sync sidecar), for `GET …/runtime`. Default: None (nestor's own
    /// status applies).
    async fn workspace_status(&self, _ds: &Downstream) -> Option<serde_json::Value> {
        None
    }
}

/// How long a shutdown may take before children are killed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
