//! Limits and timings of the WebSocket proxy. Every wait has a bound.

use std::time::Duration;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// First-message auth must arrive within this (the agent-server's 10 s).
    pub auth_timeout: Duration,
    /// How long the first connection may wait for a starting downstream.
    pub ready_timeout: Duration,
    /// How long a lost downstream may take to come back before the client is closed
    /// (with a retryable code).
    pub resume_deadline: Duration,
    /// Backoff between reconnection attempts: the first goes at once, then this, doubling,
    /// capped at `max_backoff`. The cap bounds how long a stream stays stopped after its
    /// downstream is back (issue 4: 100 ms): at most the cap plus one handshake.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Bound on one dial (TCP + WebSocket handshake).
    pub dial_timeout: Duration,
    /// Protocol pings to both legs; a leg silent for `2 × ping_interval` is dead.
    pub ping_interval: Duration,
    /// Bytes queued for a client beyond which it is dropped as a slow consumer
    /// (the agent-server's session-socket rule: 16 MiB), not counting the message being
    /// written: one frame larger than this alone does not drop a client that reads.
    pub max_pending_bytes: usize,
    /// Largest frame a client may send (the agent-server's 4 MiB).
    pub max_client_frame: usize,
    /// Largest frame accepted from a downstream.
    pub max_downstream_frame: usize,
    /// Client frames kept while the downstream is away (count and bytes).
    pub max_buffered_client_frames: usize,
    pub max_buffered_client_bytes: usize,
    /// Socket read buffer of the downstream leg, where events stream in. tungstenite's
    /// default is 128 KiB; small keeps idle pairs cheap (frames larger than this are still
    /// read, in several reads); 2 KiB still reads a typical ~1 KiB event in one read.
    /// docs/performance.md has the idle memory measured against it.
    pub read_buffer_size: usize,
    /// Socket read buffer of the client leg. Clients send little and rarely (auth, user
    /// messages, pongs), so this leg reads with a small buffer (larger frames are read in
    /// several reads): 1.5 KiB less per idle pair than the downstream leg's 2 KiB.
    pub client_read_buffer_size: usize,
    /// Frames queued for a client are written to its socket together, up to about this many
    /// bytes per write (tungstenite's write buffer). The writer flushes whenever its queue is
    /// empty, so a lone frame is never held back; under a burst this turns one system call
    /// per frame into one per batch (docs/performance.md). 0: one write per frame.
    pub client_write_batch_bytes: usize,
    /// Accept permessage-deflate on the client leg when the client offers it (browsers
    /// always do). On by default: events are JSON that shrinks 3-10x, which matters to
    /// remote clients, and an idle deflate socket costs nestor little (see [`crate::deflate`]).
    pub permessage_deflate: bool,
    /// Offer permessage-deflate to downstreams. Off by default: downstreams are local
    /// (loopback, a pod network), where bandwidth is cheap and compressing costs CPU on both
    /// ends of the hop for nothing.
    pub downstream_permessage_deflate: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            auth_timeout: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(120),
            resume_deadline: Duration::from_secs(120),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(80),
            dial_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            max_pending_bytes: 16 << 20,
            max_client_frame: 4 << 20,
            max_downstream_frame: 64 << 20,
            max_buffered_client_frames: 64,
            max_buffered_client_bytes: 4 << 20,
            read_buffer_size: 2048,
            client_read_buffer_size: 512,
            client_write_batch_bytes: 8192,
            permessage_deflate: true,
            downstream_permessage_deflate: false,
        }
    }
}

impl ProxyConfig {
    /// tungstenite settings for the client leg.
    pub fn client_ws_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.client_read_buffer_size)
            .write_buffer_size(self.client_write_batch_bytes)
            .max_message_size(Some(self.max_client_frame))
            .max_frame_size(Some(self.max_client_frame))
    }

    /// tungstenite settings for the downstream leg.
    pub fn downstream_ws_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_size)
            .write_buffer_size(0)
            .max_message_size(Some(self.max_downstream_frame))
            .max_frame_size(Some(self.max_downstream_frame))
    }
}
