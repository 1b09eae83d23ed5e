//! Reading a downstream answer's body, whatever its framing, as a sequence of data pieces.
//!
//! The fast path passes every piece through the leak guard before the client sees it, so it
//! needs the body's data, not its framing: [`BodyReader`] undoes `Content-Length`, chunked
//! and close-delimited framing. It also tells whether the connection ended exactly at the
//! body's end (then it may be used again).

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::upstream::Framing;

/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data: bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// The data of one answer body, read from the downstream connection.
pub struct BodyReader {
    framing: Framing,
    /// Bytes left (`Length`), or the chunk state (`Chunked`).
    left: u64,
    chunk: Chunk,
    done: bool,
    stall: Duration,
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the agent-server's answer stalled for {0:?}")]
    Stalled(Duration),
    #[error("the agent-server's answer ended early")]
    Truncated,
    #[error("the agent-server's answer is malformed: {0}")]
    Malformed(&'static str),
    #[error("reading the agent-server's answer failed: {0}")]
    Io(#[from] std::io::Error),
}

impl BodyReader {
    /// `stall`: longest wait for the next bytes.
    pub fn new(framing: Framing, stall: Duration) -> Self {
        let left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Self { framing, left, chunk: Chunk::Size, done: matches!(framing, Framing::None | Framing::Length(0)), stall }
    }

    /// The whole body has been read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The next piece of data (`None`: the body is complete). `buf` holds bytes already read
    /// from `stream` and not yet consumed.
    pub async fn next(&mut self, stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Option<Bytes>, BodyError> {
        loop {
            if self.done {
                return Ok(None);
            }
            if let Some(piece) = self.take(buf)? {
                return Ok(Some(piece));
            }
            if self.done {
                return Ok(None);
            }
            // Need more bytes.
            if buf.capacity() - buf.len() < 8192 {
                buf.reserve(16 * 1024);
            }
            let n = match tokio::time::timeout(self.stall, stream.read_buf(buf)).await {
                Ok(r) => r?,
                Err(_) => return Err(BodyError::Stalled(self.stall)),
            };
            if n == 0 {
                if self.framing == Framing::Close {
                    self.done = true;
                    return Ok(None);
                }
                return Err(BodyError::Truncated);
            }
        }
    }

    /// Consume what `buf` holds: a piece of data, or progress through the framing.
    fn take(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, BodyError> {
        match self.framing {
            Framing::None => {
                self.done = true;
                Ok(None)
            }
            Framing::Close => Ok((!buf.is_empty()).then(|| buf.split().freeze())),
            Framing::Length(_) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = (buf.len() as u64).min(self.left) as usize;
                self.left -= n as u64;
                self.done = self.left == 0;
                Ok(Some(buf.split_to(n).freeze()))
            }
            Framing::Chunked => self.take_chunked(buf),
        }
    }

    fn take_chunked(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, BodyError> {
        loop {
            match self.chunk {
                Chunk::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        self.chunk = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_LINE => return Ok(None),
                    _ => return Err(BodyError::Malformed("invalid chunk size")),
                },
                Chunk::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (buf.len() as u64).min(left) as usize;
                    let rest = left - n as u64;
                    self.chunk = if rest == 0 { Chunk::DataEnd } else { Chunk::Data(rest) };
                    return Ok(Some(buf.split_to(n).freeze()));
                }
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BodyError::Malformed("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.chunk = Chunk::Size;
                }
                Chunk::Trailers => {
                    // Trailers are dropped (the client's answer is re-framed).
                    let Some(end) = memchr::memmem::find(buf, b"\r\n") else {
                        if buf.len() >= MAX_LINE {
                            return Err(BodyError::Malformed("trailer line too long"));
                        }
                        return Ok(None);
                    };
                    buf.advance(end + 2);
                    if end == 0 {
                        self.done = true;
                        return Ok(None);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Feed `wire` (written in `parts`) to a reader of `framing`; the data it yields.
    async fn read_all(framing: Framing, parts: Vec<&'static [u8]>) -> Result<(Vec<u8>, bool), BodyError> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            for p in parts {
                s.write_all(p).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // Keep it open a moment, then close.
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = BytesMut::new();
        let mut r = BodyReader::new(framing, Duration::from_secs(2));
        let mut out = Vec::new();
        while let Some(p) = r.next(&mut s, &mut buf).await? {
            out.extend_from_slice(&p);
        }
        writer.await.unwrap();
        Ok((out, buf.is_empty()))
    }

    #[tokio::test]
    async fn chunked_bodies_split_anywhere() {
        let (out, clean) = read_all(Framing::Chunked, vec![b"5\r\nhel", b"lo\r\n6", b";ext=1\r\n world\r", b"\n0\r\nx-t: 1\r\n\r\n"]).await.unwrap();
        assert_eq!(out, b"hello world");
        assert!(clean);
    }

    #[tokio::test]
    async fn length_and_close_bodies() {
        assert_eq!(read_all(Framing::Length(5), vec![b"he", b"llo"]).await.unwrap().0, b"hello");
        assert_eq!(read_all(Framing::Close, vec![b"he", b"llo"]).await.unwrap().0, b"hello");
        assert!(matches!(read_all(Framing::Length(9), vec![b"hello"]).await, Err(BodyError::Truncated)));
        assert!(matches!(read_all(Framing::Chunked, vec![b"zz\r\n"]).await, Err(BodyError::Malformed(_))));
        assert!(matches!(read_all(Framing::Chunked, vec![b"2\r\nabXX"]).await, Err(BodyError::Malformed(_))));
    }
}
