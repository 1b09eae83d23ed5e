//! Shared vocabulary of nestor.
//!
//! Every other crate speaks in these types: typed ids ([`ConversationId`], [`DownstreamId`]),
//! the [`Downstream`] a conversation lives on, secrets that never print ([`SessionKey`]),
//! the agent-server's error body shapes ([`ApiError`]) and the pooled HTTP client used to
//! reach downstream agent-servers ([`DownstreamClient`]). Keeping them here lets the
//! provisioner, catalog, WebSocket proxy and the binary agree without depending on each other.

pub mod client;
pub mod downstream;
pub mod error;
pub mod fs;
pub mod ids;
pub mod leak_guard;
pub mod secret;

pub use client::{DownstreamClient, ProxyBody};
pub use downstream::{Downstream, DownstreamState, Endpoint};
pub use error::ApiError;
pub use ids::{ConversationId, DownstreamId, IdParseError, UserId};
pub use secret::SessionKey;

/// The agent-server version nestor speaks (routes, shapes, status codes).
pub const AGENT_SERVER_API_VERSION: &str = "1.58.2";

/// The header carrying a session key on REST requests, in both directions.
pub const SESSION_KEY_HEADER: &str = "x-session-api-key";
