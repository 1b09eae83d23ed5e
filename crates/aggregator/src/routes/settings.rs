//! Settings, secrets, profiles and LLM catalogs: served by nestor's own store
//! (`nestor-settings`), per user, with the agent-server's routes and shapes.
//!
//! nestor authenticates (a user key; a conversation key opens no settings) and hands the
//! user to the store as a request extension. The few routes that need an LLM call or an
//! external process go to the home downstream (`nestor_settings::DELEGATED_ROUTES`); the
//! profile validation first resolves the draft against nestor's store (provider connection,
//! cipher text) so the downstream tests the real credentials.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use http::{header, HeaderValue};
use http_body_util::BodyExt;
use nestor_core::ApiError;
use nestor_settings::SettingsUser;
use serde_json::Value;

use crate::app::AppState;
use crate::errors::{provision_error, HttpError, HttpResult};
use crate::routes::conversations::forward_streaming;

/// The store's routes behind nestor's authentication.
pub fn router(state: &AppState) -> Router<AppState> {
    nestor_settings::router::<AppState>(state.settings.clone())
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
}

async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    match state.auth.check_user(req.headers()) {
        Ok(user) => {
            req.extensions_mut().insert(SettingsUser(user));
            next.run(req).await
        }
        Err(e) => e.to_http::<Body>(),
    }
}

fn settings_error(e: nestor_settings::Error) -> HttpError {
    let mut r = Response::new(Body::from(serde_json::to_vec(&e.body).unwrap_or_default()));
    *r.status_mut() = e.status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    HttpError::Raw(Box::new(r))
}

/// `POST /api/profiles/{name}/validate`: resolve the draft here, test it on the home.
pub async fn validate_profile(State(state): State<AppState>, req: Request) -> HttpResult {
    let user = state.auth.check_user(req.headers())?;
    let (mut parts, body) = req.into_parts();
    let bytes = http_body_util::Limited::new(body, 1 << 20)
        .collect()
        .await
        .map_err(|e| ApiError::BadRequest(format!("could not read the request body: {e}")))?
        .to_bytes();
    let mut v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::Validation(vec![nestor_core::error::ValidationItem::json_invalid(e.column(), &e.to_string())]))?;
    if let Some(llm) = v.get("llm").cloned() {
        let resolved = state.settings.resolve_llm_for_validation(&user, llm).await.map_err(settings_error)?;
        v["llm"] = resolved;
    }
    let bytes = Bytes::from(serde_json::to_vec(&v).unwrap_or_default());
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    let ds = state.provisioner.home().await.map_err(|e| provision_error(e, "the home agent-server"))?;
    forward_streaming(&state, &ds, None, Request::from_parts(parts, Body::from(bytes))).await
}

/// A settings-store error as an answer.
pub(crate) fn map_settings_error(e: nestor_settings::Error) -> HttpError {
    settings_error(e)
}
