//! Routes with no conversation in them (settings, secrets, profiles, skills, host-wide
//! bash/file/git, …) go to one "home" downstream until nestor implements them itself.
//!
//! The home is stable — the first healthy server of an `existing` fleet, or a dedicated
//! agent-server process for the `process` provisioner — so what a client writes there
//! (settings, secrets) is what it reads back. Conversations do not see it: their own
//! downstreams have their own settings stores (documented in docs/routing.md).

use axum::body::Body;
use axum::extract::State;
use http::Request;
use nestor_core::ApiError;

use crate::app::AppState;
use crate::errors::{provision_error, HttpResult};
use crate::routes::conversations::forward_streaming;

/// Fallback for everything not routed elsewhere.
pub async fn fallback(State(state): State<AppState>, req: Request<Body>) -> HttpResult {
    let path = req.uri().path();
    let public = matches!(path, "/docs" | "/redoc" | "/docs/oauth2-redirect");
    if !path.starts_with("/api/") && !public {
        return Err(ApiError::not_found().into());
    }
    if !public {
        state.auth.check_headers(req.headers())?;
    }
    let ds = state.provisioner.home().await.map_err(|e| provision_error(e, "the home agent-server"))?;
    forward_streaming(&state, &ds, None, req).await
}
