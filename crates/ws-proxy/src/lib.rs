//! nestor's WebSocket proxy.
//!
//! Clients keep one socket to nestor; nestor keeps one to the conversation's downstream and
//! pumps frames both ways. The downstream socket may drop (the agent-server restarted, its
//! container was replaced, a connection was reset): nestor keeps the client socket open,
//! reconnects, replays the handshake (its own downstream key; the resume position) and goes
//! on, so the client sees every persisted event exactly once, in order.
//!
//! * [`upgrade`]: the server side of the WebSocket handshake (on hyper).
//! * [`classify`]: peeking at frames (event ids, timestamps, seqs).
//! * [`resume`]: the resume cursors (pure, property-tested).
//! * [`bridge`]: one proxied pair: client auth, dialing, pumping, reconnecting.
//! * [`outbox`]: the queue from a pair to its client writer (no buffer while idle).
//! * [`deflate`]: permessage-deflate per leg, below tungstenite.

pub mod bridge;
pub mod classify;
pub mod config;
pub mod deflate;
pub mod outbox;
pub mod resume;
pub mod upgrade;

pub use bridge::{bridge, bridge_until, ClientAuth, PairSpec, Shutdown, SocketKind, Upstream, UpstreamError, SHUTDOWN_CLOSE};
pub use config::ProxyConfig;
