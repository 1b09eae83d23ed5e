//! The server side of the WebSocket handshake, on hyper.
//!
//! nestor upgrades client connections itself (rather than through a framework extractor)
//! so both legs of a pair are the same `tokio-tungstenite` type with the same tuned
//! configuration. Extensions (permessage-deflate) are declined, which RFC 6455 allows: the
//! leg then runs uncompressed.

use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

/// The upgraded client connection.
pub type ClientSocket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Is this a WebSocket upgrade request?
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == http::Method::GET
        && header_has_token(req.headers(), header::CONNECTION, "upgrade")
        && header_has_token(req.headers(), header::UPGRADE, "websocket")
}

/// Why a request cannot be upgraded.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("not a WebSocket upgrade request")]
    NotUpgrade,
    #[error("unsupported WebSocket version (13 required)")]
    Version,
    #[error("missing Sec-WebSocket-Key")]
    MissingKey,
}

impl UpgradeError {
    pub fn status(&self) -> StatusCode {
        match self {
            UpgradeError::Version => StatusCode::UPGRADE_REQUIRED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Validate the handshake and build the `101 Switching Protocols` answer. The caller sends
/// it, then awaits [`finish`] to get the socket.
pub fn accept<B>(req: &Request<B>) -> Result<Response<()>, UpgradeError> {
    if !is_upgrade(req) {
        return Err(UpgradeError::NotUpgrade);
    }
    if req.headers().get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(UpgradeError::Version);
    }
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).ok_or(UpgradeError::MissingKey)?;
    let accept = derive_accept_key(key.as_bytes());
    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&accept).expect("base64 is a valid header"));
    Ok(resp)
}

/// Wait for hyper to hand over the upgraded connection and wrap it.
pub async fn finish(on_upgrade: hyper::upgrade::OnUpgrade, cfg: WebSocketConfig) -> Result<ClientSocket, hyper::Error> {
    let upgraded = on_upgrade.await?;
    Ok(WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(cfg)).await)
}
