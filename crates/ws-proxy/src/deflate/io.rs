//! [`DeflateStream`]: the codec as an `AsyncRead + AsyncWrite` between tungstenite and the
//! raw connection.
//!
//! * `Plain`: bytes pass untouched (no extension negotiated), read in batches while the
//!   connection is busy ([`PlainReader`]).
//! * `Sniffing` (client role, before the handshake answer): the request goes out untouched,
//!   the answer's header block is watched for `Sec-WebSocket-Extensions`; the stream
//!   switches at the exact byte where frames start (so frames that arrive in the same read
//!   as the answer are inflated too). A client that did not offer deflate sniffs too
//!   ([`DeflateStream::client_declining`]), only to hand tungstenite the answer alone: then
//!   nothing but the handshake is in tungstenite's buffer, and the dialer can rebuild the
//!   `WebSocketStream` without the 4 KiB buffer its handshake leaves behind
//!   ([`DeflateStream::handed_answer_alone`]).
//! * `Active`: frames are rewritten by [`Inflater`] and [`Deflater`]. When the connection
//!   has nothing to read the inflater is released, and when a flush completes the write
//!   buffers are: an idle socket keeps only the peer's window (if it uses context takeover)
//!   and a few hundred bytes of state.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::codec::{CodecError, Deflater, Inflater, Side};
use super::plain::PlainReader;
use super::{negotiate, Params};

/// Bytes read from the connection at a time while deflate is active.
const READ_CHUNK: usize = 4096;
/// Largest handshake answer header block watched while sniffing.
const MAX_HANDSHAKE: usize = 16 * 1024;

/// A connection with permessage-deflate (or without: see [`DeflateStream::plain`]).
pub struct DeflateStream<S> {
    inner: S,
    mode: Mode,
    /// Sniffing ended exactly at the end of the answer's header block.
    answer_alone: bool,
}

enum Mode {
    Plain(PlainReader),
    /// `accept`: switch to `Active` if the answer negotiated deflate (else always `Plain`).
    Sniffing { side: Side, max_message: usize, seen: Vec<u8>, accept: bool },
    Active(Box<Active>),
}

struct Active {
    inflater: Inflater,
    deflater: Deflater,
    /// Read from the connection, not yet fed.
    rbuf: Vec<u8>,
    rpos: usize,
    /// For tungstenite to read.
    out: Vec<u8>,
    opos: usize,
    /// Written by tungstenite, not yet a complete frame.
    win: Vec<u8>,
    /// Re-encoded, not yet written to the connection.
    wout: Vec<u8>,
    wpos: usize,
    /// A read error to repeat (the codec cannot go on after one).
    failed: Option<CodecError>,
}

/// The error a read fails with when a compressed message is refused; find it with
/// [`codec_error`] to choose the close code.
pub fn codec_error(e: &io::Error) -> Option<&CodecError> {
    e.get_ref().and_then(|e| e.downcast_ref::<CodecError>())
}

impl<S> DeflateStream<S> {
    /// No extension: bytes pass as they are.
    pub fn plain(inner: S) -> Self {
        Self { inner, mode: Mode::Plain(PlainReader::default()), answer_alone: false }
    }

    /// Deflate negotiated (for a server: in the handshake nestor answered; for a client: in
    /// the answer it got).
    pub fn active(inner: S, side: Side, params: Params, max_message: usize) -> Self {
        Self { inner, mode: Mode::Active(Box::new(Active::new(side, params, max_message))), answer_alone: false }
    }

    /// A client that offered deflate and has not read the answer yet.
    pub fn client_sniffing(inner: S, max_message: usize) -> Self {
        Self { inner, mode: Mode::Sniffing { side: Side::Client, max_message, seen: Vec::new(), accept: true }, answer_alone: false }
    }

    /// A client that did not offer deflate and has not read the answer yet: bytes pass as
    /// they are, but the answer's header block is handed over alone (the frames after it on
    /// the next read), so [`Self::handed_answer_alone`] can tell the dialer that tungstenite
    /// holds nothing beyond the handshake.
    pub fn client_declining(inner: S) -> Self {
        Self { inner, mode: Mode::Sniffing { side: Side::Client, max_message: 0, seen: Vec::new(), accept: false }, answer_alone: false }
    }

    /// Did the handshake answer reach tungstenite alone (no frame bytes in the same read)?
    /// Then, right after the handshake, tungstenite's read buffer is empty and the socket
    /// can be rebuilt around this stream (`WebSocketStream::from_raw_socket`) without losing
    /// a byte.
    pub fn handed_answer_alone(&self) -> bool {
        self.answer_alone
    }

    /// Is deflate in use?
    pub fn is_active(&self) -> bool {
        matches!(self.mode, Mode::Active(_))
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Heap bytes the deflate state holds now (beyond the connection itself).
    pub fn held_bytes(&self) -> usize {
        match &self.mode {
            Mode::Plain(r) => r.held_bytes(),
            Mode::Sniffing { seen, .. } => seen.capacity(),
            Mode::Active(a) => {
                std::mem::size_of::<Active>()
                    + a.inflater.held_bytes()
                    + a.deflater.held_bytes()
                    + a.rbuf.capacity()
                    + a.out.capacity()
                    + a.win.capacity()
                    + a.wout.capacity()
            }
        }
    }
}

impl Active {
    fn new(side: Side, params: Params, max_message: usize) -> Self {
        Self {
            inflater: Inflater::new(side, params, max_message),
            deflater: Deflater::new(params),
            rbuf: Vec::new(),
            rpos: 0,
            out: Vec::new(),
            opos: 0,
            win: Vec::new(),
            wout: Vec::new(),
            wpos: 0,
            failed: None,
        }
    }

    fn read_error(e: &CodecError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e.clone())
    }

    fn poll_read<S: AsyncRead + Unpin>(&mut self, inner: &mut S, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.opos < self.out.len() {
                let n = (self.out.len() - self.opos).min(buf.remaining());
                buf.put_slice(&self.out[self.opos..self.opos + n]);
                self.opos += n;
                if self.opos == self.out.len() {
                    self.out.clear();
                    self.opos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = &self.failed {
                return Poll::Ready(Err(Self::read_error(e)));
            }
            if self.rpos < self.rbuf.len() {
                match self.inflater.feed(&self.rbuf[self.rpos..], &mut self.out) {
                    Ok(n) => self.rpos += n,
                    Err(e) => {
                        // What was decoded before the error still goes to tungstenite.
                        self.failed = Some(e);
                        continue;
                    }
                }
                if self.rpos == self.rbuf.len() {
                    self.rbuf.clear();
                    self.rpos = 0;
                }
                continue;
            }
            // Need bytes from the connection. (A compressed message may also be waiting on
            // its tail: feeding nothing lets it finish.)
            match self.inflater.feed(&[], &mut self.out) {
                Ok(_) if !self.out.is_empty() => continue,
                Ok(_) => {}
                Err(e) => {
                    self.failed = Some(e);
                    continue;
                }
            }
            self.rbuf.resize(READ_CHUNK, 0);
            let mut rb = ReadBuf::new(&mut self.rbuf);
            match Pin::new(&mut *inner).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    self.rbuf = Vec::new();
                    self.rpos = 0;
                    self.out = Vec::new();
                    self.inflater.release();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    self.rbuf.clear();
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    self.rbuf.truncate(n);
                    if n == 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }

    /// Write re-encoded bytes to the connection until none are left (or it is not ready).
    fn poll_drain<S: AsyncWrite + Unpin>(&mut self, inner: &mut S, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wout.len() {
            let n = ready!(Pin::new(&mut *inner).poll_write(cx, &self.wout[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        self.wout.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_write<S: AsyncWrite + Unpin>(&mut self, inner: &mut S, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // Back-pressure: take nothing new while earlier frames are still unwritten.
        ready!(self.poll_drain(inner, cx))?;
        if self.win.is_empty() {
            // The usual case: tungstenite writes whole frames; encode straight from its buffer.
            let used = self.deflater.encode(buf, &mut self.wout);
            self.win.extend_from_slice(&buf[used..]);
        } else {
            self.win.extend_from_slice(buf);
            let used = self.deflater.encode(&self.win, &mut self.wout);
            self.win.drain(..used);
        }
        // Start writing now; what does not fit goes on the next write or flush.
        if let Poll::Ready(Err(e)) = self.poll_drain(inner, cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush<S: AsyncWrite + Unpin>(&mut self, inner: &mut S, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(inner, cx))?;
        ready!(Pin::new(&mut *inner).poll_flush(cx))?;
        // Idle writer: no buffer is needed until the next message.
        if self.win.is_empty() {
            self.win = Vec::new();
        }
        self.wout = Vec::new();
        self.deflater.release();
        Poll::Ready(Ok(()))
    }
}

/// The answer's header block, if `seen` holds all of it: its length.
fn header_end(seen: &[u8]) -> Option<usize> {
    seen.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The negotiated parameters in an answer's header block (`Ok(None)`: none, or not a
/// `101` answer: tungstenite reports that).
fn sniffed_params(head: &[u8]) -> Result<Option<Params>, negotiate::NegotiateError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) if resp.code == Some(101) => {}
        _ => return Ok(None),
    }
    let values: Vec<&str> = resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .collect();
    negotiate::parse_answer(values)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for DeflateStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.mode {
            Mode::Plain(r) => r.poll_read(&mut this.inner, cx, buf),
            Mode::Active(a) => a.poll_read(&mut this.inner, cx, buf),
            Mode::Sniffing { side, max_message, seen, accept } => {
                let start = buf.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                let got = &buf.filled()[start..];
                if got.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                let before = seen.len();
                seen.extend_from_slice(got);
                let Some(end) = header_end(seen) else {
                    if seen.len() > MAX_HANDSHAKE {
                        // Not a WebSocket answer tungstenite will take either; stop watching.
                        this.mode = Mode::Plain(PlainReader::default());
                    }
                    return Poll::Ready(Ok(()));
                };
                // Hand tungstenite the header block only; the bytes after it are frames.
                let keep = end - before;
                let rest = got[keep..].to_vec();
                buf.set_filled(start + keep);
                let (side, max_message, accept) = (*side, *max_message, *accept);
                this.answer_alone = true;
                this.mode = match if accept { sniffed_params(&seen[..end]) } else { Ok(None) } {
                    Ok(Some(p)) => {
                        let mut a = Active::new(side, p, max_message);
                        a.rbuf = rest;
                        Mode::Active(Box::new(a))
                    }
                    // No extension, none offered, or a bad answer (the dialer fails the
                    // connect on it).
                    _ => Mode::Plain(PlainReader::with_leftover(rest)),
                };
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for DeflateStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match &mut this.mode {
            Mode::Active(a) => a.poll_write(&mut this.inner, cx, buf),
            _ => Pin::new(&mut this.inner).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.mode {
            Mode::Active(a) => a.poll_flush(&mut this.inner, cx),
            _ => Pin::new(&mut this.inner).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Mode::Active(a) = &mut this.mode {
            ready!(a.poll_drain(&mut this.inner, cx))?;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
