//! Turning nestor's errors into agent-server-shaped HTTP answers.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use nestor_core::downstream::NotReady;
use nestor_core::ApiError;
use nestor_provisioner::ProvisionError;

/// An error answer: an [`ApiError`], or a ready response from a library that shapes its
/// own errors (the settings store).
#[derive(Debug)]
pub enum HttpError {
    Api(ApiError),
    /// Boxed: a `Response` is large, and this error travels in every handler's `Result`.
    Raw(Box<Response>),
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        match self {
            HttpError::Api(e) => e.to_http::<Body>(),
            HttpError::Raw(r) => *r,
        }
    }
}

pub type HttpResult<T = Response> = Result<T, HttpError>;

/// A provisioning failure as the client sees it. `who` names the thing that failed
/// ("conversation X's agent-server").
pub fn provision_error(e: ProvisionError, who: &str) -> ApiError {
    use std::time::Duration;
    match e {
        ProvisionError::Unavailable { detail, retry_after } => {
            ApiError::Unavailable { detail: format!("{who} is unavailable: {detail}"), retry_after }
        }
        ProvisionError::NotReady(NotReady::Timeout(t)) => ApiError::Unavailable {
            detail: format!("{who} is still starting after {}s; retry shortly", t.as_secs()),
            retry_after: Some(Duration::from_secs(5)),
        },
        ProvisionError::NotReady(NotReady::Released) => ApiError::not_found(),
        ProvisionError::NotReady(NotReady::Failed(m)) => ApiError::BadGateway(format!("{who} failed: {m}")),
        ProvisionError::NotReady(NotReady::Stopped) => ApiError::Unavailable {
            detail: format!("{who} is stopped; retry shortly"),
            retry_after: Some(Duration::from_secs(2)),
        },
        ProvisionError::Start(m) => ApiError::BadGateway(format!("{who} could not be started: {m}")),
        ProvisionError::Config(m) => ApiError::Internal(format!("nestor is misconfigured: {m}")),
        ProvisionError::UnknownDownstream(_) | ProvisionError::Other(_) => ApiError::Internal(e.to_string()),
    }
}
