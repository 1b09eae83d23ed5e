//! CORS exactly like the agent-server (its `CORSDispatcher`: Starlette's `CORSMiddleware`
//! with credentials, all methods and headers).
//!
//! * Allowed origins: the configured `allow_cors_origins`, `allow_cors_origin_regex` (full
//!   match), and always any origin whose host is `localhost`, `127.0.0.1` or
//!   `$DOCKER_HOST_ADDR`.
//! * The workspace-cookie paths (`/api/auth/workspace-session`,
//!   `/api/conversations/{id}/workspace…`) echo any `http(s)://` origin: they are the only
//!   routes a browser reaches with an ambient credential (the cookie), from iframes.
//! * Preflight (`OPTIONS` with `Access-Control-Request-Method`): `200 OK` with the allowed
//!   origin and requested headers echoed, or `400 Disallowed CORS origin`.
//! * Other requests with an `Origin`: `Access-Control-Allow-Credentials: true` and
//!   `Vary: Origin` always, `Access-Control-Allow-Origin` when allowed.

use axum::body::Body;
use axum::response::Response;
use http::{header, HeaderValue, Method, Request, StatusCode};

/// The configured policy.
#[derive(Debug, Clone)]
pub struct CorsPolicy {
    origins: Vec<String>,
    regex: Option<regex::Regex>,
    docker_host_addr: Option<String>,
}

const ALLOW_METHODS: &str = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, QUERY";
const PREFLIGHT_VARY: &str =
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers, Access-Control-Request-Private-Network";

impl CorsPolicy {
    pub fn new(origins: Vec<String>, regex: Option<&str>) -> Result<Self, regex::Error> {
        // Starlette matches the whole origin (`re.fullmatch`).
        let regex = regex.map(|r| regex::Regex::new(&format!("^(?:{r})$"))).transpose()?;
        let docker_host_addr = std::env::var("DOCKER_HOST_ADDR").ok().filter(|s| !s.is_empty());
        Ok(Self { origins, regex, docker_host_addr })
    }

    fn host_of(origin: &str) -> Option<&str> {
        let rest = origin.split_once("://")?.1;
        let authority = rest.split('/').next()?;
        let host = if let Some(v6) = authority.strip_prefix('[') {
            v6.split(']').next()?
        } else {
            authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority)
        };
        Some(host)
    }

    /// Is `origin` allowed on ordinary routes?
    pub fn allows(&self, origin: &str) -> bool {
        if let Some(host) = Self::host_of(origin) {
            let host = host.to_ascii_lowercase();
            if host == "localhost" || host == "127.0.0.1" {
                return true;
            }
            if self.docker_host_addr.as_deref() == Some(host.as_str()) {
                return true;
            }
        }
        self.origins.iter().any(|o| o == "*" || o == origin) || self.regex.as_ref().is_some_and(|r| r.is_match(origin))
    }
}

/// The workspace-cookie routes (their own, permissive CORS).
pub fn is_workspace_cookie_path(path: &str) -> bool {
    if path == "/api/auth/workspace-session" {
        return true;
    }
    let Some(rest) = path.strip_prefix("/api/conversations/") else { return false };
    let mut parts = rest.splitn(2, '/');
    let id = parts.next().unwrap_or("");
    let tail = parts.next().unwrap_or("");
    !id.is_empty() && (tail == "workspace" || tail.starts_with("workspace/"))
}

/// Whether `origin` may read answers of `path` (the fast path decides with this too).
pub(crate) fn allowed_for(policy: &CorsPolicy, path: &str, origin: &str) -> bool {
    if is_workspace_cookie_path(path) {
        origin.starts_with("http://") || origin.starts_with("https://")
    } else {
        policy.allows(origin)
    }
}

/// What the CORS layer decided for one request with an `Origin`.
pub struct Decision {
    origin: HeaderValue,
    allowed: bool,
}

/// Look at a request: `Err(response)` answers a preflight at once; `Ok(Some(decision))`
/// is applied to the response later with [`finish`]; `Ok(None)` means no `Origin` (nothing
/// to do, the common case for API clients).
#[allow(clippy::result_large_err)] // the Err is the preflight's answer, returned as it is
pub fn begin(policy: &CorsPolicy, req: &Request<Body>) -> Result<Option<Decision>, Response> {
    let Some(origin) = req.headers().get(header::ORIGIN).cloned() else { return Ok(None) };
    let allowed = allowed_for(policy, req.uri().path(), origin.to_str().unwrap_or(""));
    if req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        let requested_headers = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned();
        let (status, body) = if allowed { (StatusCode::OK, "OK") } else { (StatusCode::BAD_REQUEST, "Disallowed CORS origin") };
        let mut r = Response::new(Body::from(body));
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(header::VARY, HeaderValue::from_static(PREFLIGHT_VARY));
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOW_METHODS));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        if allowed {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            if let Some(rh) = requested_headers {
                h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, rh);
            }
        }
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        return Err(r);
    }
    Ok(Some(Decision { origin, allowed }))
}

/// Apply a [`Decision`] to the response.
pub fn finish(d: Decision, r: &mut Response) {
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    if d.allowed {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, d.origin);
    } else {
        // The downstream may have answered with its own CORS headers: nestor's decision stands.
        h.remove(header::ACCESS_CONTROL_ALLOW_ORIGIN);
    }
    if !h.get_all(header::VARY).iter().any(|v| v.to_str().unwrap_or("").contains("Origin")) {
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let p = CorsPolicy::new(vec!["https://app.example.com".into()], Some(r"https://.*\.example\.org")).unwrap();
        assert!(p.allows("http://localhost:3000"));
        assert!(p.allows("http://127.0.0.1"));
        assert!(p.allows("https://app.example.com"));
        assert!(p.allows("https://x.example.org"));
        assert!(!p.allows("https://x.example.org.evil.com"), "full match only");
        assert!(!p.allows("http://evil.com"));
        assert!(!p.allows("null"));
        assert!(is_workspace_cookie_path("/api/auth/workspace-session"));
        assert!(is_workspace_cookie_path("/api/conversations/abc/workspace"));
        assert!(is_workspace_cookie_path("/api/conversations/abc/workspace/a/b.html"));
        assert!(!is_workspace_cookie_path("/api/conversations/abc/workspaces"));
        assert!(!is_workspace_cookie_path("/api/conversations/search"));
    }
}
