//! The agent-server's error shapes, so a client cannot tell nestor's errors from a
//! downstream's.
//!
//! * client errors: `{"detail": "<text>"}` or, for validation (422), FastAPI's list form
//!   `{"detail": [{"type", "loc", "msg", "input", "ctx"?}]}`;
//! * server errors: `{"detail": "Internal Server Error", "exception": ..., "error_id": ...}`.
//!
//! Gateway errors (502/503/504) use `{"detail": "<text>"}` and never name a downstream's
//! address or key: they say which conversation and what happened.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};

/// One entry of a 422 `detail` list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidationItem {
    #[serde(rename = "type")]
    pub kind: String,
    pub loc: Vec<Value>,
    pub msg: String,
    pub input: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctx: Option<Value>,
}

impl ValidationItem {
    /// A bad UUID at `loc` (e.g. `["path","conversation_id"]`).
    pub fn uuid_parsing(loc: Vec<Value>, input: &str, error: &str) -> Self {
        Self {
            kind: "uuid_parsing".into(),
            loc,
            msg: format!("Input should be a valid UUID, {error}"),
            input: Value::String(input.to_owned()),
            ctx: Some(json!({ "error": error })),
        }
    }

    /// A body that is not JSON.
    pub fn json_invalid(position: usize, error: &str) -> Self {
        Self {
            kind: "json_invalid".into(),
            loc: vec![json!("body"), json!(position)],
            msg: "JSON decode error".into(),
            input: json!({}),
            ctx: Some(json!({ "error": error })),
        }
    }

    /// A required field that is absent.
    pub fn missing(loc: Vec<Value>, input: Value) -> Self {
        Self { kind: "missing".into(), loc, msg: "Field required".into(), input, ctx: None }
    }

    /// An integer query parameter outside its bounds (`greater_than` / `less_than_equal`).
    pub fn int_bound(loc: Vec<Value>, input: &str, kind: &str, bound: i64) -> Self {
        let (msg, ctx_key) = match kind {
            "greater_than" => (format!("Input should be greater than {bound}"), "gt"),
            "greater_than_equal" => (format!("Input should be greater than or equal to {bound}"), "ge"),
            "less_than" => (format!("Input should be less than {bound}"), "lt"),
            _ => (format!("Input should be less than or equal to {bound}"), "le"),
        };
        Self {
            kind: kind.into(),
            loc,
            msg,
            input: Value::String(input.to_owned()),
            ctx: Some(json!({ ctx_key: bound })),
        }
    }

    /// A query parameter that is not an integer.
    pub fn int_parsing(loc: Vec<Value>, input: &str) -> Self {
        Self {
            kind: "int_parsing".into(),
            loc,
            msg: "Input should be a valid integer, unable to parse string as an integer".into(),
            input: Value::String(input.to_owned()),
            ctx: None,
        }
    }

    /// A value outside an enum (`expected` lists the choices, quoted, pydantic style).
    pub fn enum_value(loc: Vec<Value>, input: &str, choices: &[&str]) -> Self {
        let expected = quote_choices(choices);
        Self {
            kind: "enum".into(),
            loc,
            msg: format!("Input should be {expected}"),
            input: Value::String(input.to_owned()),
            ctx: Some(json!({ "expected": expected })),
        }
    }

    /// A boolean query parameter that does not parse.
    pub fn bool_parsing(loc: Vec<Value>, input: &str) -> Self {
        Self {
            kind: "bool_parsing".into(),
            loc,
            msg: "Input should be a valid boolean, unable to interpret input".into(),
            input: Value::String(input.to_owned()),
            ctx: None,
        }
    }
}

/// pydantic's "'A', 'B' or 'C'".
fn quote_choices(choices: &[&str]) -> String {
    let quoted: Vec<String> = choices.iter().map(|c| format!("'{c}'")).collect();
    match quoted.len() {
        0 => String::new(),
        1 => quoted[0].clone(),
        n => format!("{} or {}", quoted[..n - 1].join(", "), quoted[n - 1]),
    }
}

/// An error nestor answers itself, in the agent-server's shape.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("unauthorized")]
    Unauthorized,
    /// 404 with a detail text (`"Not Found"` for an unknown conversation, like upstream).
    #[error("not found: {0}")]
    NotFound(String),
    #[error("validation failed")]
    Validation(Vec<ValidationItem>),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("too many requests: {detail}")]
    TooManyRequests { detail: String, retry_after: Option<Duration> },
    #[error("bad gateway: {0}")]
    BadGateway(String),
    #[error("service unavailable: {detail}")]
    Unavailable { detail: String, retry_after: Option<Duration> },
    #[error("gateway timeout: {0}")]
    GatewayTimeout(String),
    #[error("not implemented: {0}")]
    NotImplemented(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn not_found() -> Self {
        ApiError::NotFound("Not Found".into())
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        ApiError::Unavailable { detail: detail.into(), retry_after: None }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body.
    pub fn body_json(&self) -> Value {
        match self {
            ApiError::Unauthorized => json!({ "detail": "Unauthorized" }),
            ApiError::Validation(items) => json!({ "detail": items }),
            ApiError::PayloadTooLarge { limit } => json!({
                "detail": format!("Request body too large: the limit is {limit} bytes")
            }),
            ApiError::Internal(msg) => json!({
                "detail": "Internal Server Error",
                "exception": msg,
                "error_id": uuid::Uuid::new_v4().simple().to_string(),
            }),
            ApiError::NotFound(d)
            | ApiError::BadRequest(d)
            | ApiError::Conflict(d)
            | ApiError::BadGateway(d)
            | ApiError::GatewayTimeout(d)
            | ApiError::NotImplemented(d) => json!({ "detail": d }),
            ApiError::TooManyRequests { detail, .. } | ApiError::Unavailable { detail, .. } => {
                json!({ "detail": detail })
            }
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::TooManyRequests { retry_after, .. } | ApiError::Unavailable { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// A complete HTTP response (status, `content-type`, `retry-after` when known, body).
    pub fn to_http<B: From<Bytes>>(&self) -> http::Response<B> {
        let body = Bytes::from(serde_json::to_vec(&self.body_json()).unwrap_or_default());
        let mut resp = http::Response::new(B::from(body));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(d) = self.retry_after() {
            let secs = d.as_secs().max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_the_agent_server() {
        assert_eq!(
            serde_json::to_string(&ApiError::Unauthorized.body_json()).unwrap(),
            r#"{"detail":"Unauthorized"}"#
        );
        let e = ApiError::Validation(vec![ValidationItem::uuid_parsing(
            vec![json!("path"), json!("conversation_id")],
            "xyz",
            "invalid character: found `x` at 0",
        )]);
        // Byte-for-byte what agent-server 1.58.2 answers for GET /api/conversations/xyz.
        assert_eq!(
            serde_json::to_string(&e.body_json()).unwrap(),
            r#"{"detail":[{"type":"uuid_parsing","loc":["path","conversation_id"],"msg":"Input should be a valid UUID, invalid character: found `x` at 0","input":"xyz","ctx":{"error":"invalid character: found `x` at 0"}}]}"#
        );
        let e = ApiError::Validation(vec![ValidationItem::enum_value(
            vec![json!("query"), json!("sort_order")],
            "BAD",
            &["CREATED_AT", "UPDATED_AT", "CREATED_AT_DESC", "UPDATED_AT_DESC"],
        )]);
        assert_eq!(
            serde_json::to_string(&e.body_json()).unwrap(),
            r#"{"detail":[{"type":"enum","loc":["query","sort_order"],"msg":"Input should be 'CREATED_AT', 'UPDATED_AT', 'CREATED_AT_DESC' or 'UPDATED_AT_DESC'","input":"BAD","ctx":{"expected":"'CREATED_AT', 'UPDATED_AT', 'CREATED_AT_DESC' or 'UPDATED_AT_DESC'"}}]}"#
        );
        let e = ApiError::Validation(vec![ValidationItem::int_bound(
            vec![json!("query"), json!("limit")],
            "0",
            "greater_than",
            0,
        )]);
        assert_eq!(
            serde_json::to_string(&e.body_json()).unwrap(),
            r#"{"detail":[{"type":"greater_than","loc":["query","limit"],"msg":"Input should be greater than 0","input":"0","ctx":{"gt":0}}]}"#
        );
    }

    #[test]
    fn retry_after_is_set() {
        let e = ApiError::TooManyRequests { detail: "busy".into(), retry_after: Some(Duration::from_secs(3)) };
        let r: http::Response<Bytes> = e.to_http();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
    }
}
