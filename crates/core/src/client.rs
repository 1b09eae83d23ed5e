//! The pooled HTTP/1.1 client nestor uses to reach downstream agent-servers.
//!
//! One client (one connection pool) for the whole process: every proxied request, catalog
//! refresh and readiness probe reuses warm keep-alive connections, which is most of what
//! keeps nestor's added latency small. Bodies are streamed both ways ([`ProxyBody`]).

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use crate::downstream::Endpoint;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed request or response body.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// An empty [`ProxyBody`].
pub fn empty_body() -> ProxyBody {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync()
}

/// A [`ProxyBody`] holding `bytes`.
pub fn full_body(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// What went wrong talking to a downstream. Messages never contain its address or key.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not connect to the agent-server: {0}")]
    Connect(String),
    #[error("the agent-server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the agent-server answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("the agent-server's answer could not be read: {0}")]
    Body(String),
    #[error("the agent-server's answer is not the expected JSON: {0}")]
    Decode(String),
    #[error("invalid request: {0}")]
    Request(String),
}

impl ClientError {
    /// True when the downstream could not be reached at all (vs. it answered badly).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Connect(_) | ClientError::Timeout(_))
    }

    /// True when an established connection was closed or reset before any answer: what a
    /// pooled keep-alive connection the downstream closed meanwhile gives (uvicorn closes a
    /// connection after an unhandled-error 500 without announcing it), so the request never
    /// reached the application and may be sent again on a new connection.
    pub fn is_closed_connection(&self) -> bool {
        matches!(self, ClientError::Connect(m) if m == CLOSED_BEFORE_ANSWER || m == RESET)
    }
}

const CLOSED_BEFORE_ANSWER: &str = "connection closed before a complete answer";
const RESET: &str = "connection reset";

/// Describe an I/O error reaching a downstream in words, without its address.
pub fn describe_io(io: &std::io::Error) -> String {
    match io.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::ConnectionReset => "connection reset".into(),
        std::io::ErrorKind::TimedOut => "connect timed out".into(),
        k => format!("{k}"),
    }
}

/// Describe a hyper client error without leaking the address it was connecting to.
fn describe(err: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error;
    let mut cause: Option<&dyn Error> = err.source();
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return describe_io(io);
        }
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() {
                return CLOSED_BEFORE_ANSWER.into();
            }
            // An I/O error on an established connection (e.g. a reset: the peer had closed it).
            if let Some(io) = h.source().and_then(|s| s.downcast_ref::<std::io::Error>()) {
                if matches!(io.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) {
                    return RESET.into();
                }
            }
            return "protocol error".into();
        }
        cause = c.source();
    }
    if err.is_connect() {
        "connect failed".into()
    } else {
        "request failed".into()
    }
}

/// An [`HttpConnector`] that counts the connections it opens
/// (`nestor_upstream_connections_opened_total`): against the request count this gives the
/// upstream connection reuse ratio.
#[derive(Clone)]
pub struct CountingConnector(HttpConnector);

impl tower_service::Service<http::Uri> for CountingConnector {
    type Response = <HttpConnector as tower_service::Service<http::Uri>>::Response;
    type Error = <HttpConnector as tower_service::Service<http::Uri>>::Error;
    type Future = <HttpConnector as tower_service::Service<http::Uri>>::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        metrics::counter!("nestor_upstream_connections_opened_total").increment(1);
        self.0.call(uri)
    }
}

/// The shared downstream client.
#[derive(Clone)]
pub struct DownstreamClient {
    inner: Client<CountingConnector, ProxyBody>,
}

impl std::fmt::Debug for DownstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DownstreamClient")
    }
}

impl Default for DownstreamClient {
    fn default() -> Self {
        Self::new(Duration::from_secs(5))
    }
}

impl DownstreamClient {
    /// A client whose TCP connects give up after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(50))
            .pool_max_idle_per_host(1024)
            .build(CountingConnector(connector));
        Self { inner }
    }

    /// Send a request as is (the caller set URI, key header and body).
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, ClientError> {
        metrics::counter!("nestor_upstream_requests_total").increment(1);
        self.inner.request(req).await.map_err(|e| ClientError::Connect(describe(&e)))
    }

    /// A request to `endpoint` with its key set, bounded by `timeout` until response headers.
    pub async fn call(
        &self,
        endpoint: &Endpoint,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ClientError> {
        self.call_with(endpoint, method, path_and_query, body, &[], timeout).await
    }

    /// [`Self::call`] with extra request headers (e.g. the agent-server's `X-Init-API-Key`).
    pub async fn call_with(
        &self,
        endpoint: &Endpoint,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        headers: &[(HeaderName, HeaderValue)],
        timeout: Duration,
    ) -> Result<Response<Incoming>, ClientError> {
        let uri = endpoint.uri(path_and_query).map_err(|e| ClientError::Request(e.to_string()))?;
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(k) = endpoint.key_header() {
            builder = builder.header(crate::SESSION_KEY_HEADER, k.clone());
        }
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        let body = match body {
            Some(b) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                full_body(b)
            }
            None => empty_body(),
        };
        let req = builder.body(body).map_err(|e| ClientError::Request(e.to_string()))?;
        match tokio::time::timeout(timeout, self.send(req)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout(timeout)),
        }
    }

    /// Call and read the whole answer (at most `max_bytes`), requiring a 2xx status.
    pub async fn call_bytes(
        &self,
        endpoint: &Endpoint,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.call_bytes_with(endpoint, method, path_and_query, body, &[], timeout, max_bytes).await
    }

    /// [`Self::call_bytes`] with extra request headers.
    #[allow(clippy::too_many_arguments)]
    pub async fn call_bytes_with(
        &self,
        endpoint: &Endpoint,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        headers: &[(HeaderName, HeaderValue)],
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let fut = async {
            let resp = self.call_with(endpoint, method, path_and_query, body, headers, timeout).await?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), max_bytes)
                .collect()
                .await
                .map_err(|e| ClientError::Body(e.to_string()))?
                .to_bytes();
            Ok::<_, ClientError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or(Err(ClientError::Timeout(timeout)))?;
        if !status.is_success() {
            let body = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
            return Err(ClientError::Status { status, body });
        }
        Ok((status, bytes))
    }

    /// GET a JSON document (2xx required), at most 64 MiB.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        endpoint: &Endpoint,
        path_and_query: &str,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let (_, bytes) =
            self.call_bytes(endpoint, Method::GET, path_and_query, None, timeout, 64 << 20).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// True when `GET /alive` answers 200 within `timeout`.
    pub async fn is_alive(&self, endpoint: &Endpoint, timeout: Duration) -> bool {
        matches!(
            self.call_bytes(endpoint, Method::GET, "/alive", None, timeout, 4096).await,
            Ok((StatusCode::OK, _))
        )
    }
}
