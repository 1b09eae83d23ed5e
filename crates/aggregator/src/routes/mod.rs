//! The HTTP surface: which handler answers which agent-server route.
//!
//! | routes | handler |
//! | --- | --- |
//! | `/alive`, `/health`, `/ready`, `/server_info`, `/`, `/openapi.json` | nestor itself ([`health`]) |
//! | `POST /api/conversations` | create: provision + forward ([`conversations::create`]) |
//! | `GET /api/conversations/search`, `/count`, `GET /api/conversations?ids=` | the merged catalog |
//! | `/api/conversations/{id}[/…]`, `/api/file/download-trajectory/{id}` | the conversation's downstream |
//! | `/sockets/events/{id}`, `/sockets/conversation/{id}/events`, `/sockets/session/{id}` | proxied WebSockets ([`sockets`]) |
//! | anything else under `/api/` | the home downstream ([`home`]) |

pub mod compat;
pub mod conversations;
pub mod health;
pub mod home;
pub mod sockets;
pub mod settings;
pub mod status;
pub mod vscode;
pub mod workspace_session;

use axum::routing::{any, get};
use axum::Router;

use crate::config::MetricsAccess;

use crate::app::AppState;

/// What downstreams call (secret lookups, webhooks). Served on the main listener and,
/// alone, on `internal_bind`.
fn internal_router() -> Router<AppState> {
    Router::new()
        .route("/nestor/secrets/{conversation}/{name}", get(crate::secrets::lookup))
        .route("/nestor/webhooks/conversations", axum::routing::post(crate::webhooks::receive_conversation))
        .route("/nestor/webhooks/events/{id}", axum::routing::post(crate::webhooks::receive_events))
}

/// The router of the internal listener: downstream callbacks only, no client API.
pub fn internal_only(state: AppState) -> Router {
    internal_router()
        .fallback(|| async { crate::errors::HttpError::from(nestor_core::ApiError::not_found()) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::observability::track))
        .with_state(state)
}

pub fn router(state: AppState) -> Router {
    let metrics = state.cfg.metrics;
    let mut r = Router::new();
    if metrics != MetricsAccess::Off {
        r = r.route("/metrics", get(status::metrics));
    }
    let app = r
        .route("/alive", get(health::alive))
        .route("/health", get(health::alive))
        .route("/ready", get(health::ready))
        .route("/server_info", get(health::server_info))
        .route("/", get(health::server_info))
        .route("/openapi.json", get(health::openapi))
        .route("/api/conversations", get(conversations::batch).post(conversations::create))
        .route("/api/conversations/search", get(conversations::search))
        .route("/api/conversations/count", get(conversations::count))
        .route("/api/conversations/{id}", any(conversations::per_conversation))
        .route("/api/conversations/{id}/{*rest}", any(conversations::per_conversation))
        .route("/api/file/download-trajectory/{id}", get(conversations::trajectory))
        .route("/sockets/events/{id}", get(sockets::events))
        .route("/sockets/conversation/{id}/events", get(sockets::events))
        .route("/sockets/session/{id}", get(sockets::session))
        .route("/sockets/bash-events", get(sockets::bash_events))
        .route("/nestor/status", get(status::status))
        .merge(internal_router())
        .route("/nestor/vscode/{conversation}/", any(vscode::proxy))
        .route("/nestor/vscode/{conversation}/{*rest}", any(vscode::proxy))
        .route("/api/profiles/{name}/validate", axum::routing::post(settings::validate_profile))
        .merge(settings::router(&state))
        .route(
            "/api/auth/workspace-session",
            axum::routing::post(workspace_session::create).delete(workspace_session::delete),
        )
        .fallback(home::fallback)
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::observability::track))
        .with_state(state);
    // Outside every route (compat::CompatLayer must see answers after axum's method router).
    Router::new().fallback_service(app).layer(compat::CompatLayer)
}
