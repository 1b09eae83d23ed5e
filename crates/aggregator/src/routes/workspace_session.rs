//! `POST`/`DELETE /api/auth/workspace-session`: the workspace cookie, minted by nestor.
//!
//! The agent-server's cookie value is the session key itself, so a downstream must never
//! mint it (its key would reach the browser). nestor sets it to the key the client
//! presented, with the agent-server's attributes: `Path=/api/conversations`, `HttpOnly`,
//! `SameSite=none`, ten years, and `Secure; Partitioned` in a secure context (https,
//! honouring `X-Forwarded-Proto`, or a loopback host).

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use http::{header, HeaderMap, HeaderValue, Request, StatusCode};

use crate::app::AppState;
use crate::errors::HttpResult;
use crate::routes::conversations::WORKSPACE_COOKIE;

const MAX_AGE: u64 = 60 * 60 * 24 * 365 * 10;

fn secure_context(headers: &HeaderMap) -> bool {
    let proto = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).unwrap_or("");
    if proto.split(',').next().unwrap_or("").trim().eq_ignore_ascii_case("https") {
        return true;
    }
    let host = headers
        .get("x-forwarded-host")
        .and_then(|v| v.to_str().ok())
        .map(|h| h.split(',').next().unwrap_or("").trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| headers.get(header::HOST).and_then(|v| v.to_str().ok()).map(str::to_owned))
        .unwrap_or_default();
    let bare = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or("").to_owned()
    } else if host.matches(':').count() == 1 {
        host.split(':').next().unwrap_or("").to_owned()
    } else {
        host
    };
    matches!(bare.to_ascii_lowercase().as_str(), "localhost" | "127.0.0.1" | "::1")
}

fn cookie(value: &str, max_age: u64, secure: bool) -> HeaderValue {
    let mut c = format!("{WORKSPACE_COOKIE}={value}; HttpOnly; Max-Age={max_age}; Path=/api/conversations; SameSite=none");
    if secure {
        c.push_str("; Secure; Partitioned");
    }
    HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn no_content(set_cookie: HeaderValue) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r.headers_mut().insert(header::SET_COOKIE, set_cookie);
    r
}

pub async fn create(State(state): State<AppState>, req: Request<Body>) -> HttpResult {
    state.auth.check_client(req.headers())?;
    let key = req.headers().get(nestor_core::SESSION_KEY_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    Ok(no_content(cookie(key, MAX_AGE, secure_context(req.headers()))))
}

pub async fn delete(State(state): State<AppState>, req: Request<Body>) -> HttpResult {
    state.auth.check_client(req.headers())?;
    // Starlette's `delete_cookie`: an empty value, which Python's cookie module quotes.
    Ok(no_content(cookie("\"\"", 0, secure_context(req.headers()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_like_the_agent_server() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8000".parse().unwrap());
        assert!(secure_context(&h));
        assert_eq!(
            cookie("k1", MAX_AGE, true).to_str().unwrap(),
            "oh_workspace_session_key=k1; HttpOnly; Max-Age=315360000; Path=/api/conversations; SameSite=none; Secure; Partitioned"
        );
        h.insert(header::HOST, "nestor.example.com".parse().unwrap());
        assert!(!secure_context(&h));
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        assert!(secure_context(&h));
    }
}
