//! [`PlainReader`]: reads of a connection without deflate, batched while it is busy.
//!
//! tungstenite reads through a small buffer (`read_buffer_size`, 2 KiB on the downstream
//! leg, so that 10,000 idle pairs stay cheap), and it reads a large frame in pieces of that
//! size too. On a busy event stream that is a system call per one or two 1 KiB events, and
//! 128 of them per 256 KiB frame. So while reads keep filling what tungstenite asks for,
//! this reader asks the kernel for up to [`READ_AHEAD`] bytes at once (one system call,
//! only what is already there, never waiting for more) and hands them on from memory.
//!
//! Memory: the batch buffer exists only between a read that filled it and the moment it is
//! drained and the connection has nothing more to read; an idle socket holds none of it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

/// Most bytes read from the connection at once while it is busy.
pub const READ_AHEAD: usize = 16 * 1024;

/// The read side of a plain connection.
#[derive(Default)]
pub struct PlainReader {
    /// Bytes read and not yet handed on. No allocation unless a batch is being handed on,
    /// or bytes were left over from the handshake.
    buf: BytesMut,
    /// The last read filled what was asked: more is probably waiting, so read in batches.
    busy: bool,
}

impl PlainReader {
    /// A reader that first hands on `leftover` (bytes read with the handshake).
    pub fn with_leftover(leftover: Vec<u8>) -> Self {
        Self { buf: BytesMut::from(&leftover[..]), busy: false }
    }

    /// Heap bytes held now (of a batch being handed on: the part from the read position).
    pub fn held_bytes(&self) -> usize {
        self.buf.capacity()
    }

    fn release(&mut self) {
        self.buf = BytesMut::new();
    }

    /// Hand on buffered bytes: as many as fit in `out`.
    fn hand_on(&mut self, out: &mut ReadBuf<'_>) {
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        if self.buf.is_empty() && !self.busy {
            // Drained and quiet. (While busy the buffer is kept for the next batch; it is
            // dropped as soon as the connection has nothing to read: `poll_read` on Pending.)
            self.release();
        }
    }

    pub fn poll_read<S: AsyncRead + Unpin>(&mut self, inner: &mut S, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.buf.is_empty() {
            self.hand_on(out);
            return Poll::Ready(Ok(()));
        }
        let want = out.remaining();
        if want == 0 {
            return Poll::Ready(Ok(()));
        }
        if !self.busy || want >= READ_AHEAD {
            let start = out.filled().len();
            return match Pin::new(inner).poll_read(cx, out) {
                Poll::Ready(Ok(())) => {
                    self.busy = out.filled().len() - start == want;
                    Poll::Ready(Ok(()))
                }
                Poll::Pending => {
                    self.release();
                    Poll::Pending
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            };
        }
        // Read into the buffer's spare room (not zeroed first). It is empty here.
        self.buf.reserve(READ_AHEAD);
        match tokio_util::io::poll_read_buf(Pin::new(inner), cx, &mut self.buf) {
            Poll::Ready(Ok(n)) => {
                // More than was asked for: batching pays; else go back to direct reads.
                self.busy = n > want;
                self.hand_on(out);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                // Nothing to read: an idle connection holds no batch buffer. Stay busy: the
                // next wake-up most likely brings another burst.
                self.release();
                Poll::Pending
            }
            Poll::Ready(Err(e)) => {
                self.release();
                Poll::Ready(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Reader<S>(PlainReader, S);

    impl<S: AsyncRead + Unpin> AsyncRead for Reader<S> {
        fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.0.poll_read(&mut this.1, cx, buf)
        }
    }

    /// A busy stream read in small pieces: every byte once, in order; batches are used; no
    /// memory is held once drained; EOF still shows.
    #[tokio::test]
    async fn batches_keep_every_byte_and_hold_nothing_when_idle() {
        let (mut peer, ours) = tokio::io::duplex(256 * 1024);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&data).await.unwrap();
        let mut r = Reader(PlainReader::with_leftover(b"hello".to_vec()), ours);
        let mut got = Vec::new();
        let mut piece = [0u8; 2048];
        let mut batched = false;
        while got.len() < data.len() + 5 {
            let n = r.read(&mut piece).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&piece[..n]);
            // Direct reads hold nothing; a batch being handed on does.
            batched |= got.len() > 5 && r.0.held_bytes() > 0;
        }
        assert_eq!(&got[..5], b"hello");
        assert_eq!(&got[5..], &data[..]);
        assert!(batched, "a busy stream is read in batches");
        // Nothing left to read: the next read waits, and the batch buffer is gone.
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(20), r.read(&mut piece)).await;
        assert!(waiting.is_err());
        assert_eq!(r.0.held_bytes(), 0, "idle: nothing held");
        drop(peer);
        assert_eq!(r.read(&mut piece).await.unwrap(), 0, "EOF after a batch");
    }

    /// A quiet stream (reads smaller than asked) never allocates a batch buffer.
    #[tokio::test]
    async fn a_quiet_stream_reads_directly() {
        let (mut peer, ours) = tokio::io::duplex(64 * 1024);
        let mut r = Reader(PlainReader::default(), ours);
        let mut piece = [0u8; 2048];
        for i in 0..50u8 {
            peer.write_all(&[i; 100]).await.unwrap();
            let n = r.read(&mut piece).await.unwrap();
            assert_eq!(&piece[..n], &[i; 100][..]);
            assert_eq!(r.0.held_bytes(), 0);
        }
    }
}
