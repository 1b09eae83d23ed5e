//! Routes nestor answers itself: liveness, readiness, `/server_info`, `/openapi.json`.
//! All public, like the agent-server's.

use axum::extract::State;
use axum::response::Response;
use http::{header, HeaderValue, StatusCode};
use serde_json::json;

use crate::app::AppState;
use crate::routes::conversations::json_response;

const OPENAPI: &[u8] = include_bytes!("../../assets/openapi-1.58.2.json");

pub async fn alive() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// nestor is ready once it has recovered its downstreams and catalog (it only starts
/// serving after that), so readiness is liveness.
pub async fn ready() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ready"}))
}

pub async fn server_info(State(state): State<AppState>) -> Response {
    let uptime = (state.started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    json_response(StatusCode::OK, &state.fleet.server_info(uptime))
}

pub async fn openapi() -> Response {
    let mut r = Response::new(axum::body::Body::from(OPENAPI));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
