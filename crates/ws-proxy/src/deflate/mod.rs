//! permessage-deflate (RFC 7692), negotiated per leg, implemented below tungstenite.
//!
//! Browsers always offer `permessage-deflate`, and the agent-server (uvicorn + websockets)
//! accepts it; tungstenite has no extension support and fails a connection on RSV1. So
//! nestor does it itself, as a byte-stream adapter between tungstenite and the raw
//! connection ([`DeflateStream`]): the bridge and both `WebSocketStream`s stay as they are.
//!
//! * [`negotiate`]: the `Sec-WebSocket-Extensions` header (offers, answers, validation).
//! * [`codec`]: the frame rewriting, without I/O (property-tested against flate2 used
//!   directly and against itself in both roles).
//! * [`io`]: the adapter.
//! * [`plain`]: its reads when no extension is in use (batched while the connection is busy).
//!
//! Memory: nestor compresses each message on its own (no context takeover on its side), so
//! an idle socket holds no compressor; the inflater (~43 KiB) is dropped when the socket
//! has nothing to read, and a peer that uses context takeover costs a copy of the last
//! bytes it sent (at most its window, 32 KiB; a browser's few small messages in practice).
//! The compressor (~230 KiB with flate2's miniz_oxide backend) is one per thread, shared by
//! every socket on it. So an idle deflate pair holds its adapter's state (~340 bytes) more
//! than a plain one (counted in tests/idle_memory.rs); docs/performance.md has the measured
//! RSS figures (what looked like +12-20 KiB per pair over 500 pairs is allocator pages kept
//! from the handshake burst, a fixed cost that fades over more pairs).

pub mod codec;
pub mod io;
pub mod negotiate;
pub mod plain;

pub use codec::{CodecError, Side};
pub use io::{codec_error, DeflateStream};

/// What was negotiated, from nestor's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// The window nestor's compressor may use (`server_max_window_bits` for a server,
    /// `client_max_window_bits` for a client), 8..=15.
    pub our_max_window_bits: u8,
    /// The peer resets its compressor per message (nestor keeps no window for it).
    pub peer_no_context_takeover: bool,
    /// The peer's window (how much of what it sent nestor must remember), 8..=15.
    pub peer_max_window_bits: u8,
}
