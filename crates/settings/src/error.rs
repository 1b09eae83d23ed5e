//! Errors in the agent-server's shapes: `{"detail": "<text>"}` or a 422 `{"detail": [..]}`.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::{json, Value};

use crate::schema::FieldError;

/// An HTTP error answer (status + JSON body), as the agent-server would give it.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    pub status: StatusCode,
    pub body: Value,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.body)
    }
}

impl std::error::Error for Error {}

impl Error {
    pub fn detail(status: StatusCode, detail: impl Into<String>) -> Self {
        Self { status, body: json!({ "detail": detail.into() }) }
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::detail(StatusCode::NOT_FOUND, detail)
    }
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::detail(StatusCode::BAD_REQUEST, detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::detail(StatusCode::CONFLICT, detail)
    }
    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::detail(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }
    /// FastAPI's request-validation answer.
    pub fn validation(items: &[FieldError]) -> Self {
        Self { status: StatusCode::UNPROCESSABLE_ENTITY, body: json!({ "detail": items.iter().map(FieldError::to_json).collect::<Vec<_>>() }) }
    }
    /// A 422 whose `detail` list has been shaped by the caller.
    pub fn validation_raw(items: Vec<Value>) -> Self {
        Self { status: StatusCode::UNPROCESSABLE_ENTITY, body: json!({ "detail": items }) }
    }
    /// A pydantic `value_error` raised by a model validator, at `loc`.
    pub fn value_error(loc: Vec<Value>, msg: &str, input: &Value) -> Self {
        Self::validation_raw(vec![json!({
            "type": "value_error",
            "loc": loc,
            "msg": format!("Value error, {msg}"),
            "input": input,
            "ctx": {"error": msg},
        })])
    }
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::detail(StatusCode::INTERNAL_SERVER_ERROR, detail)
    }
    pub fn io(e: std::io::Error) -> Self {
        tracing::error!(error = %e, "settings store I/O error");
        Self::internal("Failed to update settings")
    }
    /// Writing a secret needs a key; nestor never stores one in plaintext.
    pub fn no_key() -> Self {
        Self::detail(
            StatusCode::SERVICE_UNAVAILABLE,
            "Encryption not available: no secret key is configured. Cannot store secrets.",
        )
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

pub type Result<T> = std::result::Result<T, Error>;
