//! Answers shaped like the agent-server's router (FastAPI on Starlette) where nestor's own
//! router would answer differently. Found by the differential fidelity test
//! (`tests/e2e/test_fidelity.py`, docs/compatibility.md).
//!
//! * **Routing comes before authentication** on the agent-server: an unknown path is a
//!   `404 {"detail":"Not Found"}`, a known path with another method a
//!   `405 {"detail":"Method Not Allowed"}` with `allow`, and a path that only differs by a
//!   trailing slash a `307` redirect — with or without a key. nestor authenticates in its
//!   handlers (and forwards unknown `/api/...` paths to the home agent-server once
//!   authenticated), so a `401` of nestor's is replaced by what the agent-server's router
//!   would have answered when the agent-server has no such route. The route table is the
//!   agent-server's own OpenAPI document (embedded) plus its hidden routes, in registration
//!   order, and the docker-runtime routes nestor serves itself.
//! * nestor's own `405`s (axum: empty body, `allow` with `HEAD`) get FastAPI's body and the
//!   `allow` of the first route matching the path (Starlette answers with the first partial
//!   match). A path that exists only as a WebSocket is a `404` over HTTP, as on Starlette.
//! * The CORS preflight answer carries no `allow` (axum's method router adds one when the
//!   preflight is answered on a route without an `OPTIONS` handler).
//! * `Vary: Origin` on every answer, as the agent-server's CORS middleware does even for
//!   requests without an `Origin`.
//!
//! Only the rare answers (401, 405, preflight) are touched; the others pass with one header
//! lookup.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use serde_json::Value;

const OPENAPI: &[u8] = include_bytes!("../../assets/openapi-1.58.2.json");

/// Routes the agent-server 1.58.2 has that its OpenAPI document does not list, and the
/// docker-runtime routes nestor serves (they exist behind nestor, so a request without a
/// key is answered `401` like every other route).
const EXTRA: &[(&str, &str)] = &[
    ("POST", "/api/conversations/prepare-for-sandbox-pause"),
    ("PUT", "/api/conversations/{conversation_id}/credential-bindings/{secret_name}"),
    ("*", "/app-backends/{extension_name}"),
    ("*", "/app-backends/{extension_name}/{path:path}"),
    ("GET", "/docs"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
    ("GET", "/docs/oauth2-redirect"),
    ("DELETE", "/api/conversations/{conversation_id}/runtime"),
    ("POST", "/api/conversations/{conversation_id}/runtime/credentials"),
];

/// OpenAPI paths whose last parameter is a Starlette `:path` converter (it takes several
/// segments; the OpenAPI document drops the converter).
const PATH_CONVERTERS: &[&str] = &["/api/conversations/{conversation_id}/workspace/{file_path}"];

#[derive(Debug)]
enum Seg {
    Lit(String),
    Param,
    Rest,
}

#[derive(Debug)]
struct RouteEntry {
    segs: Vec<Seg>,
    /// Empty: every method.
    methods: Vec<Method>,
}

impl RouteEntry {
    fn matches(&self, path: &str) -> bool {
        let mut parts = path.strip_prefix('/').unwrap_or(path).split('/');
        for (i, seg) in self.segs.iter().enumerate() {
            match seg {
                Seg::Rest => return true,
                Seg::Lit(l) => {
                    if parts.next() != Some(l.as_str()) {
                        return false;
                    }
                }
                Seg::Param => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    // `{path:path}` may be empty ("/app-backends/x/"), a plain parameter not.
                    _ => return matches!(self.segs.get(i + 1), Some(Seg::Rest)),
                },
            }
        }
        parts.next().is_none()
    }

    fn allows(&self, m: &Method) -> bool {
        self.methods.is_empty() || self.methods.contains(m)
    }
}

fn parse(path: &str, methods: Vec<Method>) -> RouteEntry {
    let segs = path
        .strip_prefix('/')
        .unwrap_or(path)
        .split('/')
        .map(|s| {
            if s.ends_with(":path}") {
                Seg::Rest
            } else if s.starts_with('{') {
                Seg::Param
            } else {
                Seg::Lit(s.to_owned())
            }
        })
        .collect();
    RouteEntry { segs, methods }
}

fn table() -> &'static [RouteEntry] {
    static TABLE: OnceLock<Vec<RouteEntry>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut out = Vec::new();
        let doc: Value = serde_json::from_slice(OPENAPI).expect("the embedded OpenAPI document is JSON");
        if let Some(paths) = doc.get("paths").and_then(Value::as_object) {
            for (path, ops) in paths {
                // One entry per method, like FastAPI registers one route per operation.
                for m in ops.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default() {
                    if let Ok(m) = Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                        let path = if PATH_CONVERTERS.contains(&path.as_str()) {
                            format!("{}:path}}", path.trim_end_matches('}'))
                        } else {
                            path.clone()
                        };
                        out.push(parse(&path, vec![m]));
                    }
                }
            }
        }
        for (m, p) in EXTRA {
            let methods = if *m == "*" { Vec::new() } else { vec![Method::from_bytes(m.as_bytes()).expect("valid method")] };
            out.push(parse(p, methods));
        }
        out
    })
}

/// What the agent-server's router does with a request, before any handler runs.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed {
    /// A route takes it (the handler authenticates).
    Route,
    /// The path exists with other methods: 405, `allow` = the first such route's methods.
    WrongMethod(String),
    /// Only the other trailing-slash form exists: 307 to it.
    Redirect(String),
    NotFound,
}

/// Starlette's routing decision for `method path` against the agent-server's routes.
pub fn route(method: &Method, path: &str) -> Routed {
    let t = table();
    let mut first_partial: Option<&RouteEntry> = None;
    for r in t {
        if r.matches(path) {
            if r.allows(method) {
                return Routed::Route;
            }
            first_partial.get_or_insert(r);
        }
    }
    if let Some(r) = first_partial {
        let allow = r.methods.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
        return Routed::WrongMethod(allow);
    }
    if path != "/" {
        let other = match path.strip_suffix('/') {
            Some(p) => p.to_owned(),
            None => format!("{path}/"),
        };
        if t.iter().any(|r| r.matches(&other)) {
            return Routed::Redirect(other);
        }
    }
    Routed::NotFound
}

/// nestor's own paths (not the agent-server's API): left alone.
fn is_nestor_path(path: &str) -> bool {
    path.starts_with("/nestor/") || path == "/nestor" || path == "/metrics"
}

fn json(status: StatusCode, detail: &str) -> Response {
    let mut r = Response::new(Body::from(serde_json::to_vec(&serde_json::json!({ "detail": detail })).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The answer the agent-server's router gives a request it has no route for.
fn routing_answer(routed: Routed, uri: &Uri, host: Option<&HeaderValue>, forwarded_proto: Option<&HeaderValue>) -> Option<Response> {
    match routed {
        Routed::Route => None,
        Routed::NotFound => Some(json(StatusCode::NOT_FOUND, "Not Found")),
        Routed::WrongMethod(allow) => {
            let mut r = json(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
            if let Ok(v) = HeaderValue::from_str(&allow) {
                r.headers_mut().insert(header::ALLOW, v);
            }
            Some(r)
        }
        Routed::Redirect(path) => {
            let host = host.and_then(|h| h.to_str().ok()).unwrap_or("localhost");
            let proto = forwarded_proto.and_then(|p| p.to_str().ok()).filter(|p| *p == "https").unwrap_or("http");
            let location = match uri.query() {
                Some(q) => format!("{proto}://{host}{path}?{q}"),
                None => format!("{proto}://{host}{path}"),
            };
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            Some(r)
        }
    }
}

/// What the layer keeps of a request to shape its answer.
struct Seen {
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
    proto: Option<HeaderValue>,
    preflight: bool,
    /// A WebSocket upgrade: its refusal is uvicorn's bare 403, outside the CORS middleware.
    upgrade: bool,
}

fn shape(seen: Seen, mut resp: Response) -> Response {
    let status = resp.status();
    let path = seen.uri.path();
    if (status == StatusCode::UNAUTHORIZED || status == StatusCode::METHOD_NOT_ALLOWED) && !is_nestor_path(path) {
        let axum_405 = status == StatusCode::METHOD_NOT_ALLOWED && !resp.headers().contains_key(header::CONTENT_TYPE);
        if status == StatusCode::UNAUTHORIZED || axum_405 {
            let routed = route(&seen.method, path);
            // An axum 405 on a path the agent-server routes for this method cannot happen
            // (nestor routes every method of such paths); keep it then.
            if let Some(mut r) = routing_answer(routed, &seen.uri, seen.host.as_ref(), seen.proto.as_ref()) {
                // The CORS headers nestor's layer put on the original answer still apply.
                for name in [
                    header::ACCESS_CONTROL_ALLOW_ORIGIN,
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    header::ACCESS_CONTROL_EXPOSE_HEADERS,
                ] {
                    if let Some(v) = resp.headers().get(&name) {
                        r.headers_mut().insert(name, v.clone());
                    }
                }
                resp = r;
            }
        }
    }
    if seen.preflight && resp.headers().contains_key(header::ACCESS_CONTROL_ALLOW_METHODS) {
        resp.headers_mut().remove(header::ALLOW);
    }
    if !seen.upgrade && !resp.headers().contains_key(header::VARY) {
        resp.headers_mut().insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    resp
}

/// The layer (outermost: it must see answers after axum's method router has set `allow`).
#[derive(Clone, Copy, Default)]
pub struct CompatLayer;

impl<S> tower::Layer<S> for CompatLayer {
    type Service = Compat<S>;
    fn layer(&self, inner: S) -> Compat<S> {
        Compat { inner }
    }
}

#[derive(Clone)]
pub struct Compat<S> {
    inner: S,
}

impl<S> tower::Service<Request<Body>> for Compat<S>
where
    S: tower::Service<Request<Body>, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let h = req.headers();
        let seen = Seen {
            method: req.method().clone(),
            uri: req.uri().clone(),
            host: h.get(header::HOST).cloned(),
            proto: h.get("x-forwarded-proto").cloned(),
            preflight: req.method() == Method::OPTIONS && h.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD),
            upgrade: nestor_ws_proxy::upgrade::is_upgrade(&req),
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(shape(seen, resp))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_like_starlette() {
        let get = Method::GET;
        let id = "0b7d1a8e-4a52-4a7b-9c62-3f7e7c1b2d10";
        assert_eq!(route(&get, "/api/settings"), Routed::Route);
        assert_eq!(route(&get, &format!("/api/conversations/{id}/events/search")), Routed::Route);
        assert_eq!(route(&get, "/api/nope"), Routed::NotFound);
        assert_eq!(route(&get, "/nope"), Routed::NotFound);
        assert_eq!(route(&get, "/api/tools"), Routed::Redirect("/api/tools/".into()));
        assert_eq!(route(&Method::DELETE, "/api/tools/"), Routed::WrongMethod("GET".into()));
        assert_eq!(route(&Method::PUT, "/api/settings"), Routed::WrongMethod("GET".into()));
        assert_eq!(route(&Method::POST, "/api/conversations/prepare-for-sandbox-pause"), Routed::Route);
        assert_eq!(route(&Method::PATCH, "/app-backends/ext/a/b"), Routed::Route);
        assert_eq!(route(&Method::POST, "/app-backends/ext/session"), Routed::Route);
        assert_eq!(route(&get, "/sockets/events/x"), Routed::NotFound, "WebSocket routes do not answer HTTP");
        assert_eq!(route(&Method::DELETE, &format!("/api/conversations/{id}/runtime")), Routed::Route);
        assert_eq!(route(&get, "/api/init"), Routed::Route);
        assert_eq!(route(&get, &format!("/api/conversations/{id}/workspace/site/page.txt")), Routed::Route, "a `:path` parameter");
    }

    #[test]
    fn unauthorized_becomes_the_routers_answer() {
        let seen = |m: Method, u: &str| Seen {
            method: m,
            uri: u.parse().unwrap(),
            host: Some(HeaderValue::from_static("nestor.example:8000")),
            proto: None,
            preflight: false,
            upgrade: false,
        };
        let unauthorized = || json(StatusCode::UNAUTHORIZED, "Unauthorized");
        let r = shape(seen(Method::GET, "/api/nope"), unauthorized());
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[header::VARY], "Origin");
        let r = shape(seen(Method::GET, "/api/tools?x=1"), unauthorized());
        assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(r.headers()[header::LOCATION], "http://nestor.example:8000/api/tools/?x=1");
        let r = shape(seen(Method::GET, "/api/settings"), unauthorized());
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "a real route keeps its 401");
        let r = shape(seen(Method::GET, "/nestor/status"), unauthorized());
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "nestor's own routes are left alone");
        let mut axum405 = Response::new(Body::empty());
        *axum405.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        axum405.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET,HEAD,PATCH"));
        let r = shape(seen(Method::PUT, "/api/settings"), axum405);
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }
}
