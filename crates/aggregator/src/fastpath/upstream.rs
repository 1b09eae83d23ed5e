//! The fast path's connections to downstreams: idle keep-alive connections per downstream
//! address, used by the request's own task (no connection task, no channel between the
//! request and its connection), and the reading of a downstream's answer head.
//!
//! uvicorn (the agent-server) closes a keep-alive connection after 5 s of quiet, without
//! telling anyone; an idle connection is therefore kept at most [`IDLE_KEEP`], checked for
//! a close before reuse, and a request that finds its pooled connection closed before any
//! answer is sent once more on a new one (fast-path requests are small and read whole, so
//! sending again is safe: the downstream never saw the first copy).

use std::time::{Duration, Instant};

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest an idle connection is kept (uvicorn closes them after 5 s).
pub const IDLE_KEEP: Duration = Duration::from_secs(4);

/// Idle connections older than this are checked for a close before reuse.
const PROBE_AFTER: Duration = Duration::from_millis(250);

/// Most idle connections kept per downstream address.
const MAX_IDLE_PER_ADDRESS: usize = 128;

/// Longest a downstream answer head may be.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Idle connections by downstream authority (`host:port`).
#[derive(Default)]
pub struct Pool {
    idle: DashMap<String, Vec<(TcpStream, Instant)>>,
    /// When expired connections to all addresses were last closed.
    last_sweep: std::sync::Mutex<Option<Instant>>,
}

/// A connection and whether it came from the pool (then it may turn out closed).
pub struct Conn {
    pub stream: TcpStream,
    pub reused: bool,
}

impl Pool {
    /// An idle connection to `authority` that is still open, or a new one.
    pub async fn get(&self, authority: &str, connect_timeout: Duration) -> std::io::Result<Conn> {
        while let Some((stream, idle_for)) = self.take_idle(authority) {
            // A connection quiet for a while may have been closed by the downstream: a closed
            // one reads EOF (or an error) at once, an open one would block. Under load
            // connections come back within microseconds and skip this extra system call;
            // a close that races the request is caught by the caller's one retry.
            if idle_for < PROBE_AFTER {
                return Ok(Conn { stream, reused: true });
            }
            let mut probe = [0u8; 1];
            match stream.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Conn { stream, reused: true }),
                _ => continue,
            }
        }
        Ok(Conn { stream: connect(authority, connect_timeout).await?, reused: false })
    }

    /// The most recently returned idle connection to `authority`, and how long it was idle.
    fn take_idle(&self, authority: &str) -> Option<(TcpStream, Duration)> {
        let mut list = self.idle.get_mut(authority)?;
        let now = Instant::now();
        while let Some((stream, since)) = list.pop() {
            let idle_for = now.duration_since(since);
            if idle_for < IDLE_KEEP {
                return Some((stream, idle_for));
            }
        }
        None
    }

    /// Keep `stream` for the next request to `authority`.
    pub fn put(&self, authority: &str, stream: TcpStream) {
        let now = Instant::now();
        self.sweep(now);
        // The common case, an address already known, without allocating its key.
        let mut list = match self.idle.get_mut(authority) {
            Some(list) => list,
            None => self.idle.entry(authority.to_owned()).or_default(),
        };
        // Expired connections are at the front (the list is in return order).
        let expired = list.iter().take_while(|(_, since)| now.duration_since(*since) >= IDLE_KEEP).count();
        list.drain(..expired);
        if list.len() < MAX_IDLE_PER_ADDRESS {
            list.push((stream, now));
        }
    }

    /// At most once per [`IDLE_KEEP`]: close expired connections to every address, and forget
    /// addresses with none left (a downstream that went away is not asked again, so its
    /// connections would otherwise stay open).
    fn sweep(&self, now: Instant) {
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|e| e.into_inner());
            match *last {
                Some(at) if now.duration_since(at) < IDLE_KEEP => return,
                _ => *last = Some(now),
            }
        }
        self.idle.retain(|_, list| {
            list.retain(|(_, since)| now.duration_since(*since) < IDLE_KEEP);
            !list.is_empty()
        });
    }
}

/// A new connection to `authority`, counted like the router's client's.
pub async fn connect(authority: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    metrics::counter!("nestor_upstream_connections_opened_total").increment(1);
    let stream = tokio::time::timeout(timeout, TcpStream::connect(authority))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// How the body of a downstream answer is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the downstream closes the connection.
    Close,
}

/// A downstream answer head, with the headers to pass on already selected (as places in
/// the head as received: no copy, no allocation per header).
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    /// The head as received.
    raw: Bytes,
    reason: Range<usize>,
    /// (name, value) of the end-to-end headers.
    headers: Vec<(Range<usize>, Range<usize>)>,
    pub framing: Framing,
    /// The downstream keeps the connection open after this answer.
    pub keep_alive: bool,
}

impl ResponseHead {
    pub fn reason(&self) -> &[u8] {
        &self.raw[self.reason.clone()]
    }

    /// The end-to-end headers, (name, value), in the downstream's order.
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers.iter().map(|(n, v)| (&self.raw[n.clone()], &self.raw[v.clone()]))
    }
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum ExchangeError {
    /// The connection ended before any byte of an answer: the request may be sent again
    /// when the connection came from the pool.
    ClosedBeforeAnswer,
    Io(std::io::Error),
    /// Not an HTTP/1 answer nestor can pass on.
    Protocol(&'static str),
}

/// Send `request` on `stream` and read the answer head into `buf` (what follows the head
/// stays in `buf`: the start of the body). `head_request`: the request was `HEAD` (the answer
/// has no body whatever its headers say).
pub async fn exchange(stream: &mut TcpStream, request: &[u8], buf: &mut BytesMut, head_request: bool) -> Result<ResponseHead, ExchangeError> {
    match stream.write_all(request).await {
        Ok(()) => {}
        Err(e) if is_closed(&e) => return Err(ExchangeError::ClosedBeforeAnswer),
        Err(e) => return Err(ExchangeError::Io(e)),
    }
    buf.clear();
    // An interim answer was skipped: the downstream has seen the request.
    let mut interim = false;
    loop {
        // What is already read may hold a head: an interim answer and the final one can
        // arrive in one read.
        if !buf.is_empty() {
            match parse_head(buf, head_request)? {
                // An interim answer (never asked for: no `Expect` is sent): skip it.
                Some(head) if (100..200).contains(&head.status) => {
                    interim = true;
                    continue;
                }
                Some(head) => return Ok(head),
                None if buf.len() > MAX_RESPONSE_HEAD => return Err(ExchangeError::Protocol("the answer head is too long")),
                None => {}
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(8192);
        }
        let before_answer = buf.is_empty() && !interim;
        match stream.read_buf(buf).await {
            Ok(0) if before_answer => return Err(ExchangeError::ClosedBeforeAnswer),
            Ok(0) => return Err(ExchangeError::Protocol("the connection closed inside the answer head")),
            Ok(_) => {}
            Err(e) if before_answer && is_closed(&e) => return Err(ExchangeError::ClosedBeforeAnswer),
            Err(e) => return Err(ExchangeError::Io(e)),
        }
    }
}

fn is_closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::UnexpectedEof
    )
}

/// Parse the answer head at the front of `buf` and take it from there (what follows, the
/// start of the body, stays); `None`: incomplete.
pub fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<ResponseHead>, ExchangeError> {
    let (start, end) = (buf.as_ptr() as usize, buf.as_ptr() as usize + buf.len());
    // Where `part` is in `buf`. httparse returns a static "" (not a slice of `buf`) for a
    // missing or non-ASCII reason phrase: that is the empty range.
    let place = |part: &[u8]| {
        let at = part.as_ptr() as usize;
        if part.is_empty() || at < start || at + part.len() > end {
            return 0..0;
        }
        at - start..at - start + part.len()
    };
    let mut slots = [httparse::EMPTY_HEADER; 96];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ExchangeError::Protocol("the answer is not valid HTTP/1")),
    };
    let status = resp.code.ok_or(ExchangeError::Protocol("the answer has no status"))?;
    let mut keep_alive = resp.version == Some(1);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut headers = Vec::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.split(',').any(|t| t.trim() == "close") {
                keep_alive = false;
            }
            continue;
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            // Only plain `chunked` (the last coding must be chunked; others are not used by
            // the agent-server).
            if v.trim() != "chunked" || chunked {
                return Err(ExchangeError::Protocol("unsupported transfer-encoding"));
            }
            chunked = true;
            continue;
        }
        if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<u64>().ok());
            match (n, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return Err(ExchangeError::Protocol("invalid content-length")),
            }
            if head_request {
                // A HEAD answer's length describes the GET body: pass it on as is.
                headers.push((place(name.as_bytes()), place(h.value)));
            }
            continue;
        }
        // `connection` and `transfer-encoding` were read above; the other hop-by-hop headers
        // are dropped as the router drops them.
        if crate::forward::HOP_BY_HOP.iter().any(|n| name.eq_ignore_ascii_case(n)) {
            continue;
        }
        headers.push((place(name.as_bytes()), place(h.value)));
    }
    let framing = if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        keep_alive = false;
        Framing::Close
    };
    let reason = resp.reason.map_or(0..0, |r| place(r.as_bytes()));
    let raw = buf.split_to(len).freeze();
    Ok(Some(ResponseHead { status, raw, reason, headers, framing, keep_alive }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_their_framing() {
        let parse_head = |raw: &[u8], head_request| parse_head(&mut BytesMut::from(raw), head_request);
        let headers = |h: &ResponseHead| h.headers().map(|(n, v)| (n.to_vec(), v.to_vec())).collect::<Vec<_>>();
        let mut raw = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: keep-alive\r\nx-a: b\r\n\r\nhello"[..]);
        let h = super::parse_head(&mut raw, false).unwrap().unwrap();
        assert_eq!((h.status, h.framing, h.keep_alive, &raw[..]), (200, Framing::Length(5), true, &b"hello"[..]));
        assert_eq!((h.reason(), headers(&h)), (&b"OK"[..], vec![(b"x-a".to_vec(), b"b".to_vec())]));

        let h = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        let h = parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", false).unwrap().unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let h = parse_head(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n", false).unwrap().unwrap();
        assert_eq!(h.framing, Framing::None);
        let h = parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true).unwrap().unwrap();
        assert_eq!(h.framing, Framing::None);
        assert_eq!(headers(&h), vec![(b"content-length".to_vec(), b"9".to_vec())]);
        let h = parse_head(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false).unwrap().unwrap();
        assert!(!h.keep_alive);

        // No reason phrase, or one httparse does not pass on (non-ASCII): empty.
        let h = parse_head(b"HTTP/1.1 200\r\ncontent-length: 0\r\n\r\n", false).unwrap().unwrap();
        assert_eq!((h.status, h.reason()), (200, &b""[..]));
        let h = parse_head(b"HTTP/1.1 200 \xC3\xA9t\xC3\xA9\r\nx-a: b\r\n\r\n", false).unwrap().unwrap();
        assert_eq!((h.reason(), headers(&h)), (&b""[..], vec![(b"x-a".to_vec(), b"b".to_vec())]));

        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-", false).unwrap().is_none());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", false).is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", false).is_err());
        assert!(parse_head(b"nonsense\r\n\r\n", false).is_err());
    }

    /// An interim answer and the final one in one read: both are seen without waiting for
    /// more bytes.
    #[tokio::test]
    async fn an_interim_answer_and_the_final_one_in_one_read() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 256];
            let _ = tcp.read(&mut req).await.unwrap();
            tcp.write_all(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi").await.unwrap();
            // Keep the connection open: the answer must not wait for a close.
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        });
        let mut stream = connect(&addr.to_string(), std::time::Duration::from_secs(5)).await.unwrap();
        let mut buf = BytesMut::new();
        let exchanged = tokio::time::timeout(std::time::Duration::from_secs(5), exchange(&mut stream, b"GET / HTTP/1.1\r\nhost: h\r\n\r\n", &mut buf, false));
        let head = exchanged.await.expect("answered without waiting").unwrap();
        assert_eq!((head.status, head.framing, &buf[..]), (200, Framing::Length(2), &b"hi"[..]));
        server.abort();
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400), head in proptest::prelude::any::<bool>()) {
            let mut buf = BytesMut::from(&bytes[..]);
            if let Ok(Some(h)) = parse_head(&mut buf, head) {
                // Every place is inside the head.
                let _ = (h.reason(), h.headers().count());
            }
        }
    }
}
