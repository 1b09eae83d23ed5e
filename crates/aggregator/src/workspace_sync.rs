//! `nestor workspace-sync pull|serve`: workspace persistence from inside a kubernetes pod.
//!
//! nestor's replicas cannot reach a pod's volume, so the pod runs nestor's own binary twice
//! (see `nestor_provisioner::kubernetes::persistence` for the pod spec and the life cycle):
//!
//! * `pull` (init container): restores every missing tree (`<root>/state`, `<root>/project`)
//!   from the bucket with the same code nestor uses for the docker backend
//!   ([`nestor_workspace_store::ConversationStorage::pull`]: hash-checked, swapped into place),
//!   creates what the agent-server expects, and exits. Non-zero exit on failure: the pod shows
//!   `Init:Error` and the agent-server never starts on a half-restored tree.
//! * `serve` (sidecar): the periodic pusher over both trees, an HTTP API on its own port for
//!   nestor (`GET /status`, the same JSON nestor shows for its own pushes; `POST /push`, a
//!   push now, answered when it is done; `POST /discard`, stop pushing for good: the
//!   conversation is deleted and its stored copy purged), and the final push on SIGTERM
//!   (pod deletion; none after a discard),
//!   bounded by `NESTOR_SYNC_FINAL_PUSH_SECS`. Both routes require the conversation's
//!   session key (`X-Session-API-Key`): the port is reachable by anything in the cluster.
//!
//! Everything comes from the environment the pod spec sets (names in
//! `nestor_provisioner::kubernetes::persistence`): the `[workspace_storage]` section as JSON
//! without credentials, which come from the usual `AWS_*` variables.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use nestor_core::{ConversationId, UserId};
use nestor_provisioner::container_env::{PERSISTED_PROJECT_DIR, PERSISTED_STATE_DIR, PERSISTED_STATE_SUBDIRS};
use nestor_provisioner::kubernetes::persistence as env;
use nestor_workspace_store::{Area, ConversationStorage, PusherHandle, TreeSpec, WorkspaceStorageConfig, WorkspaceStore};
use serde_json::json;

/// Attempts of a pull inside one init-container run (the kubelet retries the container too).
const PULL_ATTEMPTS: u32 = 3;

/// What both subcommands read from the environment.
pub struct SyncEnv {
    pub storage: WorkspaceStorageConfig,
    pub owner: UserId,
    pub conversation: ConversationId,
    pub root: PathBuf,
    pub cache: PathBuf,
}

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty()).with_context(|| format!("{name} is not set (set by nestor's pod spec)"))
}

impl SyncEnv {
    pub fn from_env() -> anyhow::Result<Self> {
        let storage: WorkspaceStorageConfig =
            serde_json::from_str(&var(env::ENV_STORAGE)?).with_context(|| format!("{} is not a [workspace_storage] section", env::ENV_STORAGE))?;
        storage.validate().map_err(|e| anyhow::anyhow!("{}: {e}", env::ENV_STORAGE))?;
        let conversation = ConversationId::parse(&var(env::ENV_CONVERSATION)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", env::ENV_CONVERSATION))?;
        Ok(Self {
            storage,
            owner: UserId::new(var(env::ENV_OWNER)?),
            conversation,
            root: PathBuf::from(var(env::ENV_ROOT)?),
            cache: PathBuf::from(var(env::ENV_CACHE)?),
        })
    }

    fn trees(&self) -> [(Area, PathBuf); 2] {
        [(Area::State, self.root.join(PERSISTED_STATE_DIR)), (Area::Workspace, self.root.join(PERSISTED_PROJECT_DIR))]
    }

    fn storage(&self) -> anyhow::Result<ConversationStorage> {
        let store = WorkspaceStore::connect(&self.storage, &self.cache).map_err(|e| anyhow::anyhow!("{e}"))?;
        store
            .conversation(&self.owner, self.conversation)
            .map_err(|e| anyhow::anyhow!("workspace storage for user {:?}: {e}", self.owner.as_str()))
    }
}

/// The init container: restore every missing tree, then make what the agent-server expects.
pub async fn pull(e: &SyncEnv) -> anyhow::Result<()> {
    let storage = e.storage()?;
    for (area, dir) in e.trees() {
        if dir.exists() {
            tracing::info!(%area, dir = %dir.display(), "workspace-sync: present on the volume; kept");
            continue;
        }
        let mut attempt = 0;
        let r = loop {
            attempt += 1;
            match storage.pull(area, &dir).await {
                Ok(r) => break r,
                Err(err) if err.is_retriable() && attempt < PULL_ATTEMPTS => {
                    let pause = e.storage.retry.backoff(attempt);
                    tracing::warn!(%area, error = %err, "workspace-sync: restore failed; retrying in {pause:?}");
                    tokio::time::sleep(pause).await;
                }
                Err(err) => return Err(anyhow::anyhow!("restoring {area} of conversation {} failed: {err}", e.conversation)),
            }
        };
        tracing::info!(%area, found = r.found, files = r.files, bytes = r.bytes, generation = r.generation, elapsed_ms = r.elapsed_ms, "workspace-sync: restored");
    }
    let state = e.root.join(PERSISTED_STATE_DIR);
    for d in PERSISTED_STATE_SUBDIRS.iter().map(|s| state.join(s)).chain([e.root.join(PERSISTED_PROJECT_DIR)]) {
        create_dir(&d)?;
    }
    Ok(())
}

fn create_dir(d: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))
}

struct Served {
    storage: ConversationStorage,
    pusher: tokio::sync::Mutex<Option<PusherHandle>>,
    key: String,
    interval_secs: u64,
    final_push: Duration,
}

/// The sidecar: push periodically, answer nestor, final push on SIGTERM.
pub async fn serve(e: &SyncEnv) -> anyhow::Result<()> {
    let port: u16 = var(env::ENV_PORT)?.parse().with_context(|| format!("{} is not a port", env::ENV_PORT))?;
    let final_secs: u64 = var(env::ENV_FINAL_PUSH_SECS)?.parse().with_context(|| format!("{} is not a number", env::ENV_FINAL_PUSH_SECS))?;
    let key = var(env::ENV_KEY)?;
    let storage = e.storage()?;
    let trees = e.trees().into_iter().map(|(a, d)| TreeSpec::new(a, d)).collect();
    let handle = storage.spawn_pusher(trees, e.storage.push_interval());
    let served = Arc::new(Served {
        storage: storage.clone(),
        pusher: tokio::sync::Mutex::new(Some(handle)),
        key,
        interval_secs: e.storage.push_interval_secs,
        final_push: Duration::from_secs(final_secs.clamp(1, 3600)),
    });
    let app = axum::Router::new()
        .route("/status", get(status))
        .route("/push", post(push_now))
        .route("/discard", post(discard))
        .with_state(served.clone());
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await.with_context(|| format!("cannot listen on port {port}"))?;
    tracing::info!(port, conversation = %e.conversation, interval_secs = e.storage.push_interval_secs, "workspace-sync: pushing");
    let stop = tokio_util::sync::CancellationToken::new();
    let s2 = stop.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(async move { s2.cancelled().await }).await
    });
    terminated().await?;
    tracing::info!("workspace-sync: terminating; final push");
    let handle = served.pusher.lock().await.take();
    let r = match handle {
        Some(h) => h.finish(served.final_push).await.map(|_| ()),
        None => Ok(()),
    };
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    match r {
        Ok(()) => {
            tracing::info!("workspace-sync: final push done");
            Ok(())
        }
        Err(err) => Err(anyhow::anyhow!("final push failed: {err} (the stored copy stays at its last generation)")),
    }
}

async fn terminated() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

fn authorised(s: &Served, headers: &HeaderMap) -> bool {
    let Some(got) = headers.get(nestor_core::SESSION_KEY_HEADER).map(|v| v.as_bytes()) else { return false };
    let want = s.key.as_bytes();
    // Constant-time over the expected length.
    got.len() == want.len() && got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn unauthorised() -> Response {
    (StatusCode::UNAUTHORIZED, Json(json!({"detail": "Unauthorized"}))).into_response()
}

async fn status(State(s): State<Arc<Served>>, headers: HeaderMap) -> Response {
    if !authorised(&s, &headers) {
        return unauthorised();
    }
    Json(crate::persistence::status_value(&s.storage.status(), s.interval_secs)).into_response()
}

async fn push_now(State(s): State<Arc<Served>>, headers: HeaderMap) -> Response {
    if !authorised(&s, &headers) {
        return unauthorised();
    }
    let r = {
        let guard = s.pusher.lock().await;
        match guard.as_ref() {
            Some(h) => match tokio::time::timeout(s.final_push, h.push_now()).await {
                Ok(r) => r.map(|_| ()).map_err(|e| e.to_string()),
                Err(_) => Err(format!("the push did not finish within {:?}", s.final_push)),
            },
            None => Err("terminating".into()),
        }
    };
    let mut body = crate::persistence::status_value(&s.storage.status(), s.interval_secs);
    match r {
        Ok(()) => Json(body).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "workspace-sync: push on request failed");
            if let Some(o) = body.as_object_mut() {
                o.insert("detail".into(), json!(format!("push failed: {e}")));
            }
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

async fn discard(State(s): State<Arc<Served>>, headers: HeaderMap) -> Response {
    if !authorised(&s, &headers) {
        return unauthorised();
    }
    let handle = s.pusher.lock().await.take();
    if let Some(h) = handle {
        // A push in flight is abandoned, which is safe (see the store's consistency docs).
        h.stop().await;
        tracing::info!("workspace-sync: pushes discarded (the conversation is being deleted)");
    }
    Json(json!({"discarded": true})).into_response()
}
