//! Deferred init (`deferred_init = true`): the agent-server's dormant mode, for warm pools.
//!
//! Reproduced from 1.58.2's `init_router.py` and checked against a running server:
//! * `GET /api/init` (no auth) → `{"state": "dormant"|"ready", "error": null}`; 404 when the
//!   server was not started deferred.
//! * `POST /api/init` needs `X-Init-API-Key` = the dormant server's secret key (open when it
//!   has none) → 401; a second init → 400 `server already in state: ready`; empty session
//!   keys → 422. The body's `session_api_keys` replace the server's keys at once, its
//!   `secret_key` (else the first session key) becomes the key a later init would need.
//! * While dormant every other `/api/*` route answers 503 (the real server's exception
//!   handler wraps it: `{"detail": "Internal Server Error", "exception": "503: …"}`) and a
//!   socket upgrade is refused with HTTP 403 (uvicorn's answer to a close before accept).
//!   `/alive`, `/health`, `/ready` and `/server_info` answer as usual.
//!
//! Not reproduced: the rest of the `InitRequest` (paths, webhooks, env…) is accepted and
//! recorded ([`crate::FakeAgentServer::init_request`]) but has no effect on the fake.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use super::{validate as v, Inner};

const DORMANT: &str = "server is in deferred-init state 'dormant'; call POST /api/init first";

/// The init state of one fake server.
#[derive(Default)]
pub(crate) struct InitState {
    dormant: AtomicBool,
    /// Keys delivered by `POST /api/init` (replace the configured ones).
    keys: ArcSwapOption<Vec<String>>,
    /// What a (further) init must present; `None` = open.
    init_key: Mutex<Option<String>>,
    /// The last accepted init body.
    pub(crate) request: Mutex<Option<Value>>,
}

impl InitState {
    pub(crate) fn new(deferred: bool, secret_key: Option<String>) -> Self {
        Self {
            dormant: AtomicBool::new(deferred),
            init_key: Mutex::new(secret_key.filter(|k| !k.trim().is_empty())),
            ..Default::default()
        }
    }

    /// The session keys in force when an init delivered some.
    pub(crate) fn keys(&self) -> Option<Arc<Vec<String>>> {
        self.keys.load_full()
    }

    pub(crate) fn is_dormant(&self) -> bool {
        self.dormant.load(Ordering::SeqCst)
    }
}

/// Answer `/api/init`, and gate everything else while dormant; `Err` hands the request on.
pub(crate) async fn gate(
    inner: &Inner,
    req: http::Request<hyper::body::Incoming>,
) -> Result<Response, http::Request<hyper::body::Incoming>> {
    let path = req.uri().path();
    if path == "/api/init" {
        return Ok(init_route(inner, req).await);
    }
    if !inner.init.is_dormant() {
        return Err(req);
    }
    if path.starts_with("/api/") {
        return Ok(v::json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"detail": "Internal Server Error", "exception": format!("503: {DORMANT}")}),
        ));
    }
    if path.starts_with("/sockets/") {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::FORBIDDEN;
        return Ok(r);
    }
    Err(req)
}

fn status(inner: &Inner) -> Response {
    let state = if inner.init.is_dormant() { "dormant" } else { "ready" };
    v::json_response(StatusCode::OK, &json!({"state": state, "error": null}))
}

async fn init_route(inner: &Inner, req: http::Request<hyper::body::Incoming>) -> Response {
    if !inner.cfg.deferred_init {
        return v::detail(
            StatusCode::NOT_FOUND,
            "server is not running with deferred_init=True; the /api/init endpoint is not available",
        );
    }
    match *req.method() {
        http::Method::GET => return status(inner),
        http::Method::POST => {}
        _ => return v::detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed"),
    }
    let presented = req.headers().get("x-init-api-key").and_then(|h| h.to_str().ok()).map(str::to_owned);
    let bytes = match axum::body::to_bytes(Body::new(req.into_body()), 1 << 20).await {
        Ok(b) => b,
        Err(_) => return v::detail(StatusCode::BAD_REQUEST, "could not read the body"),
    };
    let body = match v::parse_body(&bytes) {
        Ok(v::BodyJson::Value(b)) => b,
        Ok(v::BodyJson::Empty) => {
            return v::validation(vec![v::missing(vec![json!("body")], Value::Null)]);
        }
        Err(r) => return r,
    };
    let expected = inner.init.init_key.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if expected.is_some() && presented != expected {
        return v::unauthorized();
    }
    if !inner.init.is_dormant() {
        return v::detail(StatusCode::BAD_REQUEST, "server already in state: ready");
    }
    let Value::Object(obj) = &body else {
        return v::validation(vec![v::item(
            "model_attributes_type",
            vec![json!("body")],
            "Input should be a valid dictionary or object to extract fields from",
            body.clone(),
            None,
        )]);
    };
    let keys: Option<Vec<String>> = match obj.get("session_api_keys") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            Some(a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        }
        Some(other) => {
            return v::validation(vec![v::item(
                "list_type",
                vec![json!("body"), json!("session_api_keys")],
                "Input should be a valid list",
                other.clone(),
                None,
            )])
        }
    };
    if keys.as_ref().is_some_and(|k| k.iter().any(String::is_empty)) {
        return v::detail(StatusCode::UNPROCESSABLE_ENTITY, "session_api_keys cannot contain empty keys");
    }
    let secret = obj.get("secret_key").and_then(Value::as_str).filter(|s| !s.trim().is_empty()).map(str::to_owned);
    {
        let mut k = inner.init.init_key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = secret.or_else(|| keys.as_ref().and_then(|k| k.first().cloned())) {
            *k = Some(s);
        }
    }
    if let Some(k) = keys {
        inner.init.keys.store(Some(Arc::new(k)));
    }
    *inner.init.request.lock().unwrap_or_else(|p| p.into_inner()) = Some(body);
    inner.init.dormant.store(false, Ordering::SeqCst);
    status(inner)
}
