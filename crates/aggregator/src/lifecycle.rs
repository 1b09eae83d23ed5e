//! Downstream life-cycle policy, the same for every provisioner that owns its downstreams:
//! admission limits (how many may run, how many may be starting at once) and the idle
//! reaper (stop a downstream nobody uses; it starts again on the next request or socket).
//!
//! Idle means all of: no client socket attached, no request in flight, nothing proxied for
//! `idle_stop_secs`, and — asked live, not from a cached status — none of its conversations
//! running or waiting for confirmation. Busy-but-silent work is therefore never culled, and
//! a tab that merely keeps a socket open keeps its conversation warm (it is attached).

use std::sync::Arc;
use std::time::Duration;

use nestor_core::{ApiError, Downstream, DownstreamState, UserId};
use serde::Deserialize;
use serde_json::Value;

use crate::app::AppState;

/// `[admission]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Most downstreams running (or starting) at once; beyond: 429 with Retry-After.
    #[serde(default)]
    pub max_running: Option<usize>,
    /// Most downstreams starting at once (start-up is CPU-heavy); beyond: 429.
    #[serde(default)]
    pub max_starting: Option<usize>,
    /// Most conversations of one user running (or starting) at once; beyond: 429 with
    /// Retry-After, at create and when a stopped one would start again.
    #[serde(default)]
    pub max_running_per_user: Option<usize>,
}

/// `[lifecycle]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// Stop a downstream idle this long (seconds). 0 or absent: never (the default for the
    /// `process` and `existing` provisioners).
    #[serde(default)]
    pub idle_stop_secs: Option<f64>,
}

/// May one more downstream start now, for a conversation of `owner`? Called before
/// provisioning a new one and before starting a stopped one.
pub fn admit(state: &AppState, owner: Option<&UserId>) -> Result<(), ApiError> {
    let cfg = &state.cfg.admission;
    let per_user = cfg.max_running_per_user.zip(owner);
    if cfg.max_running.is_none() && cfg.max_starting.is_none() && per_user.is_none() {
        return Ok(());
    }
    let (mut running, mut starting, mut users) = (0usize, 0usize, 0usize);
    for ds in state.provisioner.list() {
        if ds.primary().is_none() {
            continue; // shared servers (existing, home) are not started per conversation
        }
        let up = match ds.state() {
            DownstreamState::Ready => {
                running += 1;
                true
            }
            DownstreamState::Starting => {
                starting += 1;
                true
            }
            _ => false,
        };
        if up && per_user.is_some_and(|(_, u)| ds.owner() == Some(u)) {
            users += 1;
        }
    }
    if let Some((max, user)) = per_user {
        if users >= max {
            metrics::counter!("nestor_admission_rejections_total", "reason" => "max_running_per_user").increment(1);
            tracing::info!(user = %user, running = users, limit = max, "start refused: the user's running-conversation limit");
            return Err(ApiError::TooManyRequests {
                detail: format!(
                    "user {user} has {users} conversations running (limit {max}); stop one (DELETE /api/conversations/{{id}}/runtime) or retry later"
                ),
                retry_after: Some(Duration::from_secs(30)),
            });
        }
    }
    if let Some(max) = cfg.max_starting {
        if starting >= max {
            metrics::counter!("nestor_admission_rejections_total", "reason" => "max_starting").increment(1);
            return Err(ApiError::TooManyRequests {
                detail: format!("{starting} agent-servers are starting (limit {max}); retry shortly"),
                retry_after: Some(Duration::from_secs(5)),
            });
        }
    }
    if let Some(max) = cfg.max_running {
        if running + starting >= max {
            metrics::counter!("nestor_admission_rejections_total", "reason" => "max_running").increment(1);
            return Err(ApiError::TooManyRequests {
                detail: format!("{} agent-servers are running (limit {max}); retry later", running + starting),
                retry_after: Some(Duration::from_secs(30)),
            });
        }
    }
    Ok(())
}

/// Start the idle reaper if the configuration asks for one.
pub fn spawn_idle_reaper(state: &AppState) {
    let Some(secs) = state.cfg.lifecycle.idle_stop_secs.filter(|s| *s > 0.0) else { return };
    let idle = Duration::from_secs_f64(secs);
    let every = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let st = state.clone();
    tracing::info!(idle_stop = ?idle, "idle reaper on");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = st.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for ds in st.provisioner.list() {
                if is_idle(&ds, idle) && !busy(&st, &ds).await {
                    stop_idle(&st, &ds).await;
                }
            }
        }
    });
}

fn is_idle(ds: &Downstream, idle: Duration) -> bool {
    ds.primary().is_some()
        && ds.state() == DownstreamState::Ready
        && ds.attached_sockets() == 0
        && ds.in_flight() == 0
        && ds.idle_for() >= idle
}

/// Is any conversation on `ds` running? Asked live; an unreachable downstream counts as
/// busy (better keep it than lose work on a guess).
async fn busy(state: &AppState, ds: &Arc<Downstream>) -> bool {
    let ids = state.catalog.ids_on(ds.id());
    if ids.is_empty() {
        return false;
    }
    match state.catalog.fetch_live(ds, &ids, false, Duration::from_secs(10)).await {
        Ok(infos) => infos.iter().flatten().any(|i| {
            matches!(
                i.get("execution_status").and_then(Value::as_str),
                Some("running") | Some("waiting_for_confirmation")
            )
        }),
        Err(e) => {
            tracing::debug!(downstream = %ds.id(), "idle check could not read status: {e}");
            true
        }
    }
}

async fn stop_idle(state: &AppState, ds: &Arc<Downstream>) {
    if ds.in_flight() > 0 || ds.attached_sockets() > 0 {
        return; // someone came back meanwhile
    }
    tracing::info!(downstream = %ds.id(), idle_for = ?ds.idle_for(), "stopping idle agent-server");
    metrics::counter!("nestor_idle_stops_total", "provisioner" => state.provisioner.kind()).increment(1);
    match tokio::time::timeout(Duration::from_secs(60), state.provisioner.stop(ds)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(downstream = %ds.id(), "idle stop failed: {e}"),
        Err(_) => tracing::warn!(downstream = %ds.id(), "idle stop timed out"),
    }
}
