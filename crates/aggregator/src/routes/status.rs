//! nestor's own operational routes: `GET /metrics` and `GET /nestor/status` (what
//! `nestor status` prints). Neither exists on an agent-server; both are outside `/api/`.

use axum::body::Body;
use axum::extract::State;
use http::{Request, StatusCode};
use serde_json::{json, Value};

use crate::app::AppState;
use crate::config::MetricsAccess;
use crate::errors::HttpResult;
use crate::routes::conversations::json_response;

/// `GET /metrics` (Prometheus text).
pub async fn metrics(State(state): State<AppState>, req: Request<Body>) -> HttpResult {
    if state.cfg.metrics == MetricsAccess::Key {
        state.auth.check_user(req.headers())?;
    }
    Ok(crate::observability::metrics_handler(State(state)).await)
}

/// `GET /nestor/status`: every conversation with its downstream, state and age, and every
/// downstream. Authenticated like `/api/*`.
pub async fn status(State(state): State<AppState>, req: Request<Body>) -> HttpResult {
    state.auth.check_user(req.headers())?;
    let mut conversations: Vec<Value> = Vec::new();
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    for ds in state.provisioner.list() {
        for id in state.catalog.ids_on(ds.id()) {
            let Some(e) = state.catalog.get(&id) else { continue };
            let age = (e.item.created > i128::MIN).then(|| ((now - e.item.created) / 1_000_000_000) as i64);
            conversations.push(json!({
                "id": id.to_string(),
                "downstream": ds.id().as_str(),
                "state": ds.state().as_str(),
                "execution_status": e.item.status,
                "owner": e.owner.as_str(),
                "age_seconds": age,
                "title": e.item.info.get("title"),
            }));
        }
    }
    conversations.sort_by(|a, b| a["age_seconds"].as_i64().cmp(&b["age_seconds"].as_i64()));
    let downstreams: Vec<Value> = state
        .provisioner
        .list()
        .iter()
        .map(|ds| {
            json!({
                "id": ds.id().as_str(),
                "provisioner": ds.kind(),
                "state": ds.state().as_str(),
                "conversations": ds.conversation_count(),
                "attached_sockets": ds.attached_sockets(),
                "in_flight": ds.in_flight(),
                "idle_seconds": ds.idle_for().as_secs(),
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "nestor_version": env!("CARGO_PKG_VERSION"),
            "provisioner": state.provisioner.kind(),
            "uptime_seconds": state.started.elapsed().as_secs(),
            "conversations": conversations,
            "downstreams": downstreams,
        }),
    ))
}
