//! Forwarding one HTTP request to a downstream agent-server, and its answer back.
//!
//! The hop must be invisible: the path, query, method, status, headers and body pass
//! through unchanged, except for what a proxy must change —
//! * the client's key is removed and the downstream's own key is sent instead;
//! * hop-by-hop headers are dropped (RFC 9110 §7.6.1) in both directions;
//! * the client's `Host` is kept, so URLs the downstream builds (redirects) name nestor;
//! * the answer passes the leak guard (the downstream's key and address never reach the
//!   client). Small answers are redacted whole and keep an exact `content-length`; larger
//!   or unsized ones are redacted as they stream.
//!
//! Bodies stream both ways and are never fully buffered (except small answers, above).
//! Request bodies are bounded by `max_body_bytes` (413). A request whose downstream is not
//! ready waits for it, bounded by `ready_timeout`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use nestor_core::client::{BoxError, ProxyBody};
use nestor_core::leak_guard::Redactor;
use nestor_core::{ApiError, ConversationId, Downstream, DownstreamState, Endpoint};

use crate::app::AppState;

/// Answers at most this big are redacted whole (exact `content-length` kept).
const BUFFER_LIMIT: u64 = 256 * 1024;

/// Headers named by `Connection:` are hop-by-hop too.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// Remove `session_api_key` from a query string (it authenticated the client to nestor).
/// Names are compared percent-decoded, as the downstream reads them: `session%5Fapi%5Fkey`
/// is the same parameter (found while writing `tests/fuzz.rs`, whose
/// `fuzz_strip_key_from_query` covers it).
pub fn strip_key_from_query(q: &str) -> Option<String> {
    if !q.contains("session_api_key") && !q.contains('%') {
        return Some(q.to_owned()).filter(|s| !s.is_empty());
    }
    let is_key = |p: &str| {
        let name = p.split('=').next().unwrap_or(p);
        name == "session_api_key" || form_urlencoded::parse(name.as_bytes()).next().is_some_and(|(k, _)| k == "session_api_key")
    };
    let kept: Vec<&str> = q.split('&').filter(|p| !p.is_empty() && !is_key(p)).collect();
    if kept.is_empty() {
        None
    } else {
        Some(kept.join("&"))
    }
}

/// The origin clients use to reach nestor, from the request (`Host`, and
/// `X-Forwarded-Proto` when set by a TLS-terminating proxy in front).
pub fn public_origin(headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let proto = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .filter(|p| *p == "https" || *p == "http")
        .unwrap_or("http");
    Some(format!("{proto}://{host}"))
}

/// The leak guard for answers from `ep` to a client that reached nestor at `origin`.
pub fn redactor_for(ep: &Endpoint, origin: Option<&str>) -> Redactor {
    ep.redactor(origin)
}

/// Options of one forward.
#[derive(Debug, Clone, Copy)]
pub struct ForwardOpts {
    /// Keep and read the whole answer (for create/fork: nestor reads it) — returned as
    /// `Forwarded::Buffered`.
    pub buffer_answer: bool,
}

/// A forwarded answer.
pub enum Forwarded {
    /// Streamed to the client as is.
    Response(Response<Body>),
    /// Read whole (already redacted), for the caller to inspect before answering.
    Buffered { status: StatusCode, headers: HeaderMap, body: Bytes },
}

impl Forwarded {
    pub fn into_response(self) -> Response<Body> {
        match self {
            Forwarded::Response(r) => r,
            Forwarded::Buffered { status, headers, body } => {
                let mut r = Response::new(Body::from(body));
                *r.status_mut() = status;
                *r.headers_mut() = headers;
                r
            }
        }
    }
}

/// Wait (bounded) until `ds` can take requests, starting it if its provisioner can.
pub async fn ensure_ready(state: &AppState, ds: &Arc<Downstream>, conv: Option<ConversationId>) -> Result<Arc<Endpoint>, ApiError> {
    if ds.state() != DownstreamState::Ready || ds.endpoint().is_none() {
        if matches!(ds.state(), DownstreamState::Stopped | DownstreamState::Failed(_)) && ds.primary().is_some() {
            // Starting it again counts against the admission limits.
            crate::lifecycle::admit(state, ds.owner())?;
        }
        let timeout = state.ready_timeout;
        if let Err(e) = state.provisioner.ensure_ready(ds, timeout).await {
            let who = conv.map(|c| format!("conversation {c}'s agent-server")).unwrap_or_else(|| "the agent-server".into());
            tracing::warn!(downstream = %ds.id(), "not ready: {e}");
            return Err(crate::errors::provision_error(e, &who));
        }
    }
    ds.endpoint().ok_or_else(|| ApiError::unavailable("the agent-server is not running; retry shortly"))
}

/// Make the client's request the downstream's, in place (no header copies): the target
/// URI, hop-by-hop headers and the client's credentials out, the downstream's key in.
fn downstream_request(
    ep: &Endpoint,
    mut parts: http::request::Parts,
    path_and_query: &str,
    body: ProxyBody,
) -> Result<Request<ProxyBody>, ApiError> {
    parts.uri = ep.uri(path_and_query).map_err(|e| ApiError::BadRequest(format!("invalid request target: {e}")))?;
    parts.version = http::Version::HTTP_11;
    parts.extensions = http::Extensions::new();
    strip_hop_by_hop(&mut parts.headers);
    strip_client_credentials(&mut parts.headers);
    if let Some(k) = ep.key_header() {
        parts.headers.insert(HeaderName::from_static(nestor_core::SESSION_KEY_HEADER), k.clone());
    }
    Ok(Request::from_parts(parts, body))
}

/// Take out what authenticates the client to nestor: it is never passed to a downstream.
fn strip_client_credentials(headers: &mut HeaderMap) {
    headers.remove(nestor_core::SESSION_KEY_HEADER);
    // `/v1/*` accepts the session key as a bearer token: never pass the client's on.
    headers.remove(header::AUTHORIZATION);
    // The workspace cookie is the client's key: authenticated here, not passed on.
    if headers.contains_key(header::COOKIE) {
        let cookies: Vec<HeaderValue> = headers.get_all(header::COOKIE).iter().filter_map(without_workspace_cookie).collect();
        headers.remove(header::COOKIE);
        for c in cookies {
            headers.append(header::COOKIE, c);
        }
    }
}

/// Remove hop-by-hop headers (RFC 9110 §7.6.1), including those `Connection` names.
/// Public for the fuzz tests (`tests/fuzz.rs`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        for n in connection_listed(headers) {
            headers.remove(n);
        }
    }
    for n in HOP_BY_HOP {
        if headers.contains_key(*n) {
            headers.remove(*n);
        }
    }
}

/// Hop-by-hop headers (besides those `Connection` names); the fast path drops the same.
pub(crate) const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"];

/// A `Cookie` header without the workspace cookie (None if nothing is left).
fn without_workspace_cookie(v: &HeaderValue) -> Option<HeaderValue> {
    let s = v.to_str().ok()?;
    if !s.contains(crate::routes::conversations::WORKSPACE_COOKIE) {
        return Some(v.clone());
    }
    let kept: Vec<&str> = s
        .split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.starts_with(&format!("{}=", crate::routes::conversations::WORKSPACE_COOKIE)))
        .collect();
    if kept.is_empty() {
        None
    } else {
        HeaderValue::from_str(&kept.join("; ")).ok()
    }
}

/// Turn the client's body into a bounded streaming body (413 when `content-length` says
/// it is too big; a stream that grows past the limit is cut with an error).
pub fn bounded_body(parts: &http::request::Parts, body: Body, limit: u64) -> Result<ProxyBody, ApiError> {
    if let Some(len) = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()) {
        if len > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
    }
    // A request without a body (most GETs) needs no limiter and no boxing of the client's.
    if http_body::Body::is_end_stream(&body) {
        return Ok(nestor_core::client::empty_body());
    }
    Ok(Limited::new(body, limit as usize).map_err(|e: BoxError| e).boxed_unsync())
}

/// Forward the client's request to `ds` at `path_and_query`.
pub async fn forward(
    state: &AppState,
    ds: &Arc<Downstream>,
    conv: Option<ConversationId>,
    parts: http::request::Parts,
    body: ProxyBody,
    path_and_query: &str,
    opts: ForwardOpts,
) -> Result<Forwarded, ApiError> {
    // Counted in flight before waiting, so the idle reaper never stops a downstream a
    // request is about to use; a streamed answer keeps it counted until it is sent.
    let activity = ds.begin_request();
    let ep = ensure_ready(state, ds, conv).await?;
    let origin = public_origin(&parts.headers);
    let is_head = parts.method == http::Method::HEAD;
    let (body, replay) = replayable(&parts, body).await?;
    let req = downstream_request(&ep, parts, path_and_query, body)?;
    let again = replay.map(|b| (req.method().clone(), req.uri().clone(), req.headers().clone(), b));
    let mut sent = tokio::time::timeout(state.upstream_timeout, state.client.send(req)).await;
    if let (Ok(Err(e)), Some((method, uri, headers, body))) = (&sent, again) {
        if e.is_closed_connection() {
            // A pooled connection the downstream had closed (see is_closed_connection):
            // once more on a new one.
            tracing::debug!(downstream = %ds.id(), "pooled connection was closed ({e}); sending again");
            let body = if body.is_empty() { nestor_core::client::empty_body() } else { nestor_core::client::full_body(body) };
            let mut retry = Request::new(body);
            *retry.method_mut() = method;
            *retry.uri_mut() = uri;
            *retry.headers_mut() = headers;
            sent = tokio::time::timeout(state.upstream_timeout, state.client.send(retry)).await;
        }
    }
    let resp = match sent {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(downstream = %ds.id(), conversation = ?conv, "upstream error: {e}");
            let who = conv.map(|c| format!("conversation {c}'s agent-server")).unwrap_or_else(|| "the agent-server".into());
            return Err(ApiError::BadGateway(format!("{who} is unreachable: {e}")));
        }
        Err(_) => {
            return Err(ApiError::GatewayTimeout(format!(
                "the agent-server did not answer within {:?}",
                state.upstream_timeout
            )))
        }
    };
    let redactor = ep.redactor(origin.as_deref());
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    redact_headers(&mut rparts.headers, &redactor);

    let size = rparts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if opts.buffer_answer || size.is_some_and(|s| s <= BUFFER_LIMIT) {
        let limit = if opts.buffer_answer { 64 << 20 } else { BUFFER_LIMIT as usize };
        let bytes = match tokio::time::timeout(state.upstream_timeout, Limited::new(rbody, limit).collect()).await {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(e)) => return Err(ApiError::BadGateway(format!("the agent-server's answer could not be read: {e}"))),
            Err(_) => return Err(ApiError::GatewayTimeout("the agent-server's answer stalled".into())),
        };
        let body = match redactor.apply(&bytes) {
            std::borrow::Cow::Borrowed(_) => bytes,
            std::borrow::Cow::Owned(v) => Bytes::from(v),
        };
        // A HEAD answer's length is the GET body's (there is no body here to measure).
        if !is_head {
            rparts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        if opts.buffer_answer {
            return Ok(Forwarded::Buffered { status: rparts.status, headers: rparts.headers, body });
        }
        return Ok(Forwarded::Response(Response::from_parts(rparts, Body::from(body))));
    }
    rparts.headers.remove(header::CONTENT_LENGTH);
    let body = Body::new(InFlight { inner: redactor.wrap(rbody), _activity: activity });
    Ok(Forwarded::Response(Response::from_parts(rparts, body)))
}

pin_project_lite::pin_project! {
    /// A streamed answer that keeps its downstream counted in flight until the body is
    /// done (read to its end, or dropped with the client's connection): the idle reaper
    /// must not stop an agent-server in the middle of a long download.
    struct InFlight<B> {
        #[pin]
        inner: B,
        _activity: nestor_core::downstream::ActivityGuard,
    }
}

impl<B: http_body::Body> http_body::Body for InFlight<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Request bodies up to this size are read before forwarding, so the request can be sent
/// again if the pooled connection turns out to be closed.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// The body to send and, when the request can be sent twice, a copy of it: no body, or a
/// small one with a known length (read first). Large or streamed bodies are not replayable.
async fn replayable(parts: &http::request::Parts, body: ProxyBody) -> Result<(ProxyBody, Option<Bytes>), ApiError> {
    if http_body::Body::is_end_stream(&body) {
        return Ok((body, Some(Bytes::new())));
    }
    let small = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n <= REPLAY_LIMIT);
    if !small {
        return Ok((body, None));
    }
    let bytes = body
        .collect()
        .await
        .map_err(|e| ApiError::BadRequest(format!("could not read the request body: {e}")))?
        .to_bytes();
    Ok((nestor_core::client::full_body(bytes.clone()), Some(bytes)))
}

/// Apply the leak guard to header values.
fn redact_headers(headers: &mut HeaderMap, redactor: &Redactor) {
    for v in headers.values_mut() {
        if let std::borrow::Cow::Owned(new) = redactor.apply(v.as_bytes()) {
            if let Ok(nv) = HeaderValue::from_bytes(&new) {
                *v = nv;
            }
        }
    }
}

/// The timeout for small internal calls to downstreams.
pub const INTERNAL_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Forward an upgrade request (a WebSocket that is not a conversation socket, e.g. VS
/// Code's) and, on `101`, splice the two upgraded connections byte for byte. No timeout on
/// the spliced connection: it lives as long as either side keeps it (a per-request timeout
/// on an upgraded connection is a classic proxy bug).
pub async fn forward_upgrade(
    state: &AppState,
    ep: &Endpoint,
    mut parts: http::request::Parts,
    _body: Body,
    path_and_query: &str,
) -> Result<Response<Body>, ApiError> {
    let client_upgrade = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| ApiError::BadRequest("connection cannot be upgraded".into()))?;
    let uri = ep.uri(path_and_query).map_err(|e| ApiError::BadRequest(format!("invalid request target: {e}")))?;
    let redactor = ep.redactor(public_origin(&parts.headers).as_deref());
    let mut req = Request::new(nestor_core::client::empty_body());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    // `Connection` and `Upgrade` stay: they ask for the upgrade.
    for (name, value) in parts.headers.iter() {
        if matches!(name.as_str(), "keep-alive" | "proxy-connection" | "te" | "trailer" | "transfer-encoding") {
            continue;
        }
        req.headers_mut().append(name.clone(), value.clone());
    }
    strip_client_credentials(req.headers_mut());
    if let Some(k) = ep.key_header() {
        req.headers_mut().insert(HeaderName::from_static(nestor_core::SESSION_KEY_HEADER), k.clone());
    }
    let mut resp = match tokio::time::timeout(state.upstream_timeout, state.client.send(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(ApiError::BadGateway(format!("the upgrade target is unreachable: {e}"))),
        Err(_) => return Err(ApiError::GatewayTimeout("the upgrade target did not answer".into())),
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Refused: an answer like any other, through the leak guard.
        let (mut p, b) = resp.into_parts();
        strip_hop_by_hop(&mut p.headers);
        redact_headers(&mut p.headers, &redactor);
        p.headers.remove(header::CONTENT_LENGTH);
        return Ok(Response::from_parts(p, Body::new(redactor.wrap(b))));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    let mut out = Response::new(Body::empty());
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *out.headers_mut() = resp.headers().clone();
    redact_headers(out.headers_mut(), &redactor);
    // Tracked like the conversation sockets; a raw splice has no close code to send, so
    // shutdown just ends it.
    let shutdown = state.shutdown.clone();
    state.sockets.spawn(async move {
        let (c, u) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!("upgrade splice failed: {e}");
                return;
            }
        };
        let mut c = hyper_util::rt::TokioIo::new(c);
        let mut u = hyper_util::rt::TokioIo::new(u);
        metrics::gauge!("nestor_spliced_connections").increment(1.0);
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut c, &mut u) => {}
            _ = shutdown.cancelled() => {}
        }
        metrics::gauge!("nestor_spliced_connections").decrement(1.0);
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nestor_core::SessionKey;

    #[test]
    fn strips_only_the_key_from_queries() {
        assert_eq!(strip_key_from_query("a=1&session_api_key=k&b=2").as_deref(), Some("a=1&b=2"));
        assert_eq!(strip_key_from_query("session_api_key=k"), None);
        assert_eq!(strip_key_from_query("resend_mode=all").as_deref(), Some("resend_mode=all"));
        assert_eq!(strip_key_from_query(""), None);
        // Percent-encoded names are the same parameter to the downstream.
        assert_eq!(strip_key_from_query("session%5Fapi%5Fkey=k&a=%41").as_deref(), Some("a=%41"));
        assert_eq!(strip_key_from_query("%73ession_api_key=k"), None);
    }

    #[test]
    fn redactor_hides_key_and_address() {
        let ep = Endpoint::loopback(41234, Some(SessionKey::new("downstreamkey123")));
        let r = redactor_for(&ep, Some("http://nestor.example:8000"));
        let out = r.apply(b"http://127.0.0.1:41234/x?tkn=downstreamkey123 ws://127.0.0.1:41234/s 127.0.0.1:41234");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "http://nestor.example:8000/x?tkn=********** ws://nestor.example:8000/s nestor.example:8000"
        );
    }
}
