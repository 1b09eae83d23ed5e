//! The server side of the WebSocket handshake, on hyper.
//!
//! nestor upgrades client connections itself (rather than through a framework extractor)
//! so both legs of a pair are the same `tokio-tungstenite` type with the same tuned
//! configuration. permessage-deflate is accepted when the client offers it and the proxy
//! allows it ([`crate::deflate`]); any other extension is declined, which RFC 6455 allows.

use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::config::ProxyConfig;
use crate::deflate::{self, DeflateStream, Params};

/// The upgraded client connection.
pub type ClientSocket = WebSocketStream<DeflateStream<TokioIo<hyper::upgrade::Upgraded>>>;

/// An accepted handshake: the answer to send and what it negotiated.
#[derive(Debug)]
pub struct Accepted {
    pub response: Response<()>,
    /// permessage-deflate parameters, if the answer accepted an offer.
    pub deflate: Option<Params>,
}

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

/// Validate the handshake and build the `101 Switching Protocols` answer (accepting the
/// client's first honourable permessage-deflate offer when `offer_deflate`). The caller sends
/// it, then awaits [`finish`] to get the socket.
pub fn accept<B>(req: &Request<B>, offer_deflate: bool) -> Result<Accepted, UpgradeError> {
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
    let mut negotiated = None;
    if offer_deflate {
        let offers = req.headers().get_all(header::SEC_WEBSOCKET_EXTENSIONS).iter().filter_map(|v| v.to_str().ok());
        if let Some((params, answer)) = deflate::negotiate::accept_offers(offers) {
            // The answer is built from tokens and digits only.
            if let Ok(v) = HeaderValue::from_str(&answer) {
                h.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
                negotiated = Some(params);
            }
        }
    }
    Ok(Accepted { response: resp, deflate: negotiated })
}

/// Wait for hyper to hand over the upgraded connection and wrap it (with the deflate
/// adapter if [`accept`] negotiated it).
pub async fn finish(on_upgrade: hyper::upgrade::OnUpgrade, deflate: Option<Params>, cfg: &ProxyConfig) -> Result<ClientSocket, hyper::Error> {
    let upgraded = on_upgrade.await?;
    let io = TokioIo::new(upgraded);
    let io = match deflate {
        Some(p) => DeflateStream::active(io, deflate::Side::Server, p, cfg.max_client_frame),
        None => DeflateStream::plain(io),
    };
    Ok(wrap(io, cfg.client_ws_config()).await)
}

async fn wrap<S>(io: S, cfg: WebSocketConfig) -> WebSocketStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    WebSocketStream::from_raw_socket(io, Role::Server, Some(cfg)).await
}
