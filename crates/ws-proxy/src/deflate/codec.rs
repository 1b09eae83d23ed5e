//! The permessage-deflate transforms on raw WebSocket bytes, without I/O (so they can be
//! property-tested): [`Inflater`] turns what the peer sends into what tungstenite can read,
//! [`Deflater`] turns what tungstenite writes into what the peer expects.
//!
//! Why below tungstenite: tungstenite (0.29/0.30) has no extension support and fails a
//! connection on RSV1. Rewriting the byte stream keeps both legs the same
//! `WebSocketStream` type with its tuned configuration, and the bridge unchanged.
//!
//! * Read side: frames are parsed incrementally. A compressed message (RSV1 on its first
//!   frame) is unmasked, inflated (the `00 00 ff ff` tail appended at the message end) and
//!   re-emitted as plain frames, at most [`CHUNK`] bytes each: unmasked for a client role,
//!   masked with a zero key for a server role (tungstenite refuses unmasked client frames).
//!   Control frames and uncompressed messages pass byte for byte (so tungstenite still
//!   judges every protocol rule). The inflated size of a message is bounded: past
//!   `max_message` the read fails with [`CodecError::TooBig`] (close 1009), whatever the
//!   compression ratio; output is produced only as fast as it is consumed, so memory stays
//!   bounded too.
//! * Write side: each complete frame tungstenite writes is re-encoded. A single-frame data
//!   message is compressed on its own (sync flush, tail stripped, RSV1 set; masked again
//!   with tungstenite's key for a client role); when compression does not make it smaller,
//!   or the negotiated window is smaller than the message, it goes uncompressed (RFC 7692
//!   allows that per message). Control frames and fragmented messages pass as they are.
//! * State: nestor never uses context takeover for what it sends, so the compressor holds
//!   nothing between messages: one per thread serves every socket on it. When the peer uses context takeover, the inflater's window is
//!   kept as a plain copy of the last window-size bytes the peer sent; the ~43 KiB
//!   inflater itself is dropped when the socket is idle ([`Inflater::release`]) and rebuilt
//!   from that copy (fed to a fresh inflater as stored blocks) when the next message comes.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::Params;

/// Largest payload of one re-emitted (inflated) frame, and the output budget of one
/// [`Inflater::feed`].
pub const CHUNK: usize = 16 * 1024;

/// The deflate level nestor compresses with: 1 (fastest). JSON events shrink about as much
/// at 1 as at 6 for their size, for a fraction of the CPU.
const LEVEL: u32 = 1;

const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Which end of the connection nestor is: `Server` reads masked frames and writes unmasked
/// ones, `Client` the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// Why the peer's bytes cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A compressed message inflates past the message size limit (close 1009).
    #[error("compressed message inflates past {max} bytes")]
    TooBig { max: usize },
    /// The compressed data is not valid deflate (close 1007).
    #[error("invalid compressed data: {0}")]
    Corrupt(String),
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub rsv1: bool,
    /// RSV2 or RSV3.
    pub rsv23: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
    /// Bytes of the header itself.
    pub header_len: usize,
}

impl Header {
    /// Parse a header at the start of `b`; `None` if `b` is too short to hold it.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < 2 {
            return None;
        }
        let masked = b[1] & 0x80 != 0;
        let (len, mut n) = match b[1] & 0x7f {
            126 => (u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as u64, 4),
            127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?), 10),
            l => (l as u64, 2),
        };
        let mask = if masked {
            let k: [u8; 4] = b.get(n..n + 4)?.try_into().ok()?;
            n += 4;
            Some(k)
        } else {
            None
        };
        Some(Header {
            fin: b[0] & 0x80 != 0,
            rsv1: b[0] & 0x40 != 0,
            rsv23: b[0] & 0x30 != 0,
            opcode: b[0] & 0x0f,
            mask,
            len,
            header_len: n,
        })
    }

    fn is_control(&self) -> bool {
        self.opcode & 0x08 != 0
    }
}

/// How many header bytes the header starting with `b` has (2 until its second byte is known).
fn header_need(b: &[u8]) -> usize {
    if b.len() < 2 {
        return 2;
    }
    let ext = match b[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b[1] & 0x80 != 0 { 4 } else { 0 }
}

/// Append a frame header.
pub fn write_header(out: &mut Vec<u8>, fin: bool, rsv1: bool, opcode: u8, mask: Option<[u8; 4]>, len: usize) {
    out.push(((fin as u8) << 7) | ((rsv1 as u8) << 6) | (opcode & 0x0f));
    let m = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if let Some(k) = mask {
        out.extend_from_slice(&k);
    }
}

/// XOR `data` with `key`, starting at key offset `pos`.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], pos: usize) {
    if key == [0; 4] {
        return;
    }
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[(pos + i) & 3];
    }
}

/// Where the reader is in the peer's byte stream.
#[derive(Debug)]
enum RState {
    /// Collecting a frame header.
    Header,
    /// Copying a frame's payload as it is.
    Pass { left: u64 },
    /// Inflating a compressed frame's payload.
    Inflate { left: u64, mask: Option<[u8; 4]>, pos: usize, fin: bool },
    /// The compressed message's last frame is read; `fed` bytes of the tail are inflated.
    Tail { fed: usize },
}

/// The read side (see the module docs).
pub struct Inflater {
    side: Side,
    params: Params,
    max_message: usize,
    state: RState,
    hdr: [u8; 14],
    hdr_len: usize,
    /// In a fragmented uncompressed data message (its continuations pass too).
    in_plain: bool,
    /// In a compressed message: its opcode, whether a frame of it was emitted, its inflated
    /// size so far.
    in_compressed: Option<(u8, bool, usize)>,
    inflater: Option<Box<Decompress>>,
    /// The peer's window (the last bytes it sent), kept while it uses context takeover.
    history: Vec<u8>,
    /// Inflated bytes not yet framed (at most [`CHUNK`]).
    pending: Vec<u8>,
    /// The inflater's last call filled its output: it may hold more.
    more_output: bool,
    /// The message's deflate data so far ends exactly at the end of a block with BFINAL=1
    /// (RFC 7692 7.2.3.4): the sender appended no empty stored block after it (or put its
    /// header bits in the final block's last byte), so the `00 00 ff ff` tail would be read
    /// by the next stream as the start of a stored block and must not be fed.
    stream_ended: bool,
}

impl Inflater {
    pub fn new(side: Side, params: Params, max_message: usize) -> Self {
        Self {
            side,
            params,
            max_message,
            state: RState::Header,
            hdr: [0; 14],
            hdr_len: 0,
            in_plain: false,
            in_compressed: None,
            inflater: None,
            history: Vec::new(),
            pending: Vec::new(),
            more_output: false,
            stream_ended: false,
        }
    }

    fn window(&self) -> usize {
        1 << self.params.peer_max_window_bits
    }

    /// Consume bytes of the peer's stream, appending what tungstenite should read to `out`.
    /// Returns how many bytes of `input` were used: fewer than all only when `out` grew by
    /// [`CHUNK`] or more (call again once it is drained).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, CodecError> {
        let start_out = out.len();
        let mut used = 0;
        loop {
            if out.len() - start_out >= CHUNK {
                return Ok(used);
            }
            if let RState::Header = self.state {
                let need = header_need(&self.hdr[..self.hdr_len]);
                let take = (need - self.hdr_len).min(input.len() - used);
                self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&input[used..used + take]);
                self.hdr_len += take;
                used += take;
                if self.hdr_len < need {
                    if used == input.len() {
                        return Ok(used);
                    }
                    continue;
                }
                if need == 2 && header_need(&self.hdr[..2]) > 2 {
                    continue;
                }
                let h = Header::parse(&self.hdr[..self.hdr_len]).expect("a complete header");
                self.on_header(h, out);
                continue;
            }
            let rest = &input[used..];
            match &mut self.state {
                RState::Tail { fed } => {
                    let from = *fed;
                    if from == 0 && self.stream_ended {
                        // Nothing follows the final block: the message is complete as is.
                        self.finish_message(out);
                        self.state = RState::Header;
                        continue;
                    }
                    let n = self.inflate(&TAIL[from..], None, 0, out)?;
                    if let RState::Tail { fed } = &mut self.state {
                        *fed += n;
                    }
                    if from + n == TAIL.len() && !self.more_output {
                        self.finish_message(out);
                        self.state = RState::Header;
                    }
                    continue;
                }
                _ if rest.is_empty() => return Ok(used),
                RState::Header => unreachable!("handled above"),
                RState::Pass { left } => {
                    let n = (*left).min(rest.len() as u64) as usize;
                    out.extend_from_slice(&rest[..n]);
                    *left -= n as u64;
                    used += n;
                    if *left == 0 {
                        self.state = RState::Header;
                    }
                }
                RState::Inflate { left, mask, pos, fin } => {
                    let (mask, pos0, fin) = (*mask, *pos, *fin);
                    let n = (*left).min(rest.len() as u64) as usize;
                    let n = self.inflate(&rest[..n], mask, pos0, out)?;
                    used += n;
                    if let RState::Inflate { left, pos, .. } = &mut self.state {
                        *left -= n as u64;
                        *pos += n;
                        if *left == 0 {
                            self.state = if fin { RState::Tail { fed: 0 } } else { RState::Header };
                        }
                    }
                }
            }
        }
    }

    /// A complete header is in `self.hdr`.
    fn on_header(&mut self, h: Header, out: &mut Vec<u8>) {
        let compressed_start = !h.is_control() && (h.opcode == 1 || h.opcode == 2) && h.rsv1 && !h.rsv23 && self.in_compressed.is_none() && !self.in_plain;
        let compressed_cont = !h.is_control() && h.opcode == 0 && !h.rsv1 && !h.rsv23 && self.in_compressed.is_some();
        if compressed_start || compressed_cont {
            self.hdr_len = 0;
            if compressed_start {
                self.in_compressed = Some((h.opcode, false, 0));
            }
            self.state = if h.len == 0 {
                if h.fin { RState::Tail { fed: 0 } } else { RState::Header }
            } else {
                RState::Inflate { left: h.len, mask: h.mask, pos: 0, fin: h.fin }
            };
            return;
        }
        // Everything else passes as is: tungstenite judges it (RSV bits, stray
        // continuations, a data frame inside another message, …).
        if !h.is_control() {
            if h.opcode == 1 || h.opcode == 2 {
                self.in_plain = !h.fin;
            } else if h.opcode == 0 && h.fin {
                self.in_plain = false;
            }
        }
        out.extend_from_slice(&self.hdr[..h.header_len]);
        self.hdr_len = 0;
        self.state = if h.len == 0 { RState::Header } else { RState::Pass { left: h.len } };
    }

    /// Inflate `data` (masked with `mask` from key offset `pos`), framing output as it
    /// comes. Returns the bytes of `data` used.
    fn inflate(&mut self, data: &[u8], mask: Option<[u8; 4]>, pos: usize, out: &mut Vec<u8>) -> Result<usize, CodecError> {
        let start_out = out.len();
        let mut used = 0;
        let mut scratch = [0u8; 4096];
        // Bounded: every pass consumes input, produces output (each at most `CHUNK` before
        // returning), ends a stream (which consumed its last byte), or fails.
        loop {
            if self.inflater.is_none() {
                // The first data of the socket, of a message without context takeover, or
                // after a final block: a new raw stream whose window is the peer's history.
                self.inflater = Some(self.fresh_inflater()?);
            }
            if self.pending.len() >= CHUNK {
                self.emit(false, out);
            }
            if out.len() - start_out >= CHUNK {
                return Ok(used);
            }
            let n = (data.len() - used).min(scratch.len());
            let piece = &mut scratch[..n];
            piece.copy_from_slice(&data[used..used + n]);
            if let Some(k) = mask {
                apply_mask(piece, k, pos + used);
            }
            if self.pending.capacity() < CHUNK {
                self.pending.reserve_exact(CHUNK - self.pending.len());
            }
            let limit = CHUNK - self.pending.len();
            let d = self.inflater.as_mut().expect("created above");
            let (in0, out0) = (d.total_in(), d.total_out());
            let before = self.pending.len();
            // decompress_vec writes into the spare capacity; cap it at the chunk.
            let mut buf = std::mem::take(&mut self.pending);
            let spare_cap = before + limit;
            let status = if buf.capacity() > spare_cap {
                let mut tmp = Vec::with_capacity(limit);
                let s = d.decompress_vec(piece, &mut tmp, FlushDecompress::None);
                buf.extend_from_slice(&tmp);
                s
            } else {
                d.decompress_vec(piece, &mut buf, FlushDecompress::None)
            };
            self.pending = buf;
            let status = status.map_err(|e| CodecError::Corrupt(e.to_string()))?;
            let consumed = (d.total_in() - in0) as usize;
            let produced = (d.total_out() - out0) as usize;
            used += consumed;
            if consumed > 0 {
                self.stream_ended = false;
            }
            if let Some((_, _, total)) = &mut self.in_compressed {
                *total += produced;
                if *total > self.max_message {
                    return Err(CodecError::TooBig { max: self.max_message });
                }
            }
            if !self.params.peer_no_context_takeover && produced > 0 {
                let w = self.window();
                self.history.extend_from_slice(&self.pending[before..]);
                if self.history.len() > 2 * w {
                    let cut = self.history.len() - w;
                    self.history.drain(..cut);
                }
            }
            let output_full = self.pending.len() - before == limit;
            self.more_output = output_full;
            if status == Status::StreamEnd {
                // A block with BFINAL=1 ends zlib's stream, but not the peer's: RFC 7692
                // 7.2.3.4 lets a sender flush with one, followed by an empty stored block
                // (its header byte sent, its `00 00 ff ff` stripped as the tail) and then
                // possibly more blocks, to be read "in the same manner" as if BFINAL were
                // unset. So the rest is read by a new raw stream that keeps the window
                // (`history`, unless the peer has no context takeover): a sender that
                // restarted its compressor never reaches back past its own output, one that
                // kept its window finds it. The inflater is rebuilt on the next input; a
                // finished one would read nothing more.
                self.inflater = None;
                self.stream_ended = true;
                // zlib reports the end only once all of the stream's output is out.
                self.more_output = false;
                if used == data.len() {
                    return Ok(used);
                }
                continue;
            }
            if used == data.len() && !output_full {
                return Ok(used);
            }
            if consumed == 0 && produced == 0 {
                return Err(CodecError::Corrupt("inflater made no progress".into()));
            }
        }
    }

    /// A raw inflater whose window holds `history` (fed to it as stored blocks).
    fn fresh_inflater(&self) -> Result<Box<Decompress>, CodecError> {
        let mut d = Box::new(Decompress::new(false));
        if !self.history.is_empty() {
            let h = &self.history[self.history.len().saturating_sub(self.window())..];
            let mut blocks = Vec::with_capacity(h.len() + 5 * (h.len() / 65535 + 1));
            for c in h.chunks(65535) {
                blocks.push(0x00); // BFINAL=0, BTYPE=00 (stored), padding
                blocks.extend_from_slice(&(c.len() as u16).to_le_bytes());
                blocks.extend_from_slice(&(!(c.len() as u16)).to_le_bytes());
                blocks.extend_from_slice(c);
            }
            let mut sink = Vec::with_capacity(h.len());
            d.decompress_vec(&blocks, &mut sink, FlushDecompress::Sync).map_err(|e| CodecError::Corrupt(e.to_string()))?;
            if sink.len() != h.len() || d.total_in() as usize != blocks.len() {
                return Err(CodecError::Corrupt("could not restore the inflater's window".into()));
            }
        }
        Ok(d)
    }

    /// Frame the pending output.
    fn emit(&mut self, fin: bool, out: &mut Vec<u8>) {
        let Some((opcode, emitted, _)) = &mut self.in_compressed else { return };
        let op = if *emitted { 0 } else { *opcode };
        *emitted = true;
        let mask = match self.side {
            Side::Server => Some([0; 4]),
            Side::Client => None,
        };
        write_header(out, fin, false, op, mask, self.pending.len());
        out.extend_from_slice(&self.pending);
        self.pending.clear();
    }

    fn finish_message(&mut self, out: &mut Vec<u8>) {
        self.emit(true, out);
        self.in_compressed = None;
        self.stream_ended = false;
        if self.params.peer_no_context_takeover {
            self.inflater = None;
        }
    }

    /// The socket is idle: drop what can be rebuilt (the inflater between messages, empty
    /// buffers), keep only the peer's window.
    pub fn release(&mut self) {
        if self.in_compressed.is_none() {
            self.inflater = None;
            let w = self.window();
            if self.history.len() > w {
                let cut = self.history.len() - w;
                self.history.drain(..cut);
            }
            self.history.shrink_to_fit();
        }
        if self.pending.is_empty() {
            self.pending = Vec::new();
        }
    }

    /// Heap bytes held now (for tests and the memory figures).
    pub fn held_bytes(&self) -> usize {
        self.history.capacity() + self.pending.capacity() + if self.inflater.is_some() { 43 * 1024 } else { 0 }
    }
}

thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<Box<Compress>>> = const { std::cell::RefCell::new(None) };
}

/// The write side (see the module docs).
pub struct Deflater {
    params: Params,
    /// In a fragmented data message (sent uncompressed).
    in_fragmented: bool,
    scratch: Vec<u8>,
    packed: Vec<u8>,
}

impl Deflater {
    pub fn new(params: Params) -> Self {
        Self { params, in_fragmented: false, scratch: Vec::new(), packed: Vec::new() }
    }

    /// Re-encode the complete frames at the start of `input` into `out`. Returns the bytes
    /// used (a trailing partial frame is left for the next call).
    pub fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut used = 0;
        while let Some(h) = Header::parse(&input[used..]) {
            let total = h.header_len as u64 + h.len;
            if ((input.len() - used) as u64) < total {
                break;
            }
            let frame = &input[used..used + total as usize];
            self.encode_frame(h, frame, out);
            used += total as usize;
        }
        used
    }

    fn encode_frame(&mut self, h: Header, frame: &[u8], out: &mut Vec<u8>) {
        let data_start = !h.is_control() && (h.opcode == 1 || h.opcode == 2);
        if !data_start || !h.fin || h.rsv1 || h.rsv23 || self.in_fragmented {
            if !h.is_control() {
                if data_start {
                    self.in_fragmented = !h.fin;
                } else if h.opcode == 0 && h.fin {
                    self.in_fragmented = false;
                }
            }
            out.extend_from_slice(frame);
            return;
        }
        let payload = &frame[h.header_len..];
        // A window below 15 bits is kept by compressing only what fits in it: each message
        // is compressed alone, so no match reaches further back than its own start.
        if payload.is_empty() || (self.params.our_max_window_bits < 15 && payload.len() > 1 << self.params.our_max_window_bits) {
            out.extend_from_slice(frame);
            return;
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(payload);
        if let Some(k) = h.mask {
            apply_mask(&mut self.scratch, k, 0);
        }
        // One compressor per thread, shared by every socket on it: nestor never uses
        // context takeover for what it sends, so a compressor carries nothing from one
        // message to the next, and compressing has no await inside. (A per-socket
        // compressor, ~230 KiB with miniz_oxide, cost 33 KiB of RSS per idle pair in the
        // benchmark: the peak of those alive during handshakes stayed in the heap.)
        let ok = COMPRESSOR.with(|c| {
            let mut c = c.borrow_mut();
            let c = c.get_or_insert_with(|| Box::new(Compress::new(Compression::new(LEVEL), false)));
            c.reset();
            self.packed.clear();
            self.packed.reserve(self.scratch.len() / 2 + 64);
            loop {
                let in0 = c.total_in() as usize;
                if self.packed.len() == self.packed.capacity() {
                    self.packed.reserve(self.packed.capacity().max(64));
                }
                if c.compress_vec(&self.scratch[in0..], &mut self.packed, FlushCompress::Sync).is_err() {
                    return false;
                }
                // Done once all input is in and the flush fit (spare room left).
                if c.total_in() as usize == self.scratch.len() && self.packed.len() < self.packed.capacity() {
                    return true;
                }
            }
        });
        if !ok || !self.packed.ends_with(&TAIL) || self.packed.len() - TAIL.len() >= payload.len() {
            out.extend_from_slice(frame);
            return;
        }
        let n = self.packed.len() - TAIL.len();
        self.packed.truncate(n);
        write_header(out, true, true, h.opcode, h.mask, n);
        let at = out.len();
        out.extend_from_slice(&self.packed);
        if let Some(k) = h.mask {
            apply_mask(&mut out[at..], k, 0);
        }
    }

    /// The writer is idle: drop the buffers (they hold nothing between messages).
    pub fn release(&mut self) {
        self.scratch = Vec::new();
        self.packed = Vec::new();
    }

    pub fn held_bytes(&self) -> usize {
        self.scratch.capacity() + self.packed.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn takeover_params() -> Params {
        Params { our_max_window_bits: 15, peer_no_context_takeover: false, peer_max_window_bits: 15 }
    }

    /// Raw deflate of `data` ended with Z_FINISH: its last block has BFINAL=1.
    fn finished(data: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(data.len() + 64);
        // Bounded: each pass either finishes or grows the output buffer it filled.
        for _ in 0..64 {
            let done = c.total_in() as usize;
            if out.len() == out.capacity() {
                out.reserve(64 + out.capacity());
            }
            if c.compress_vec(&data[done..], &mut out, FlushCompress::Finish).unwrap() == Status::StreamEnd {
                return out;
            }
        }
        panic!("compressor did not finish");
    }

    /// One masked compressed text frame, as a client sends it.
    fn client_frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut wire = Vec::new();
        write_header(&mut wire, fin, rsv1, opcode, Some(key), payload.len());
        let at = wire.len();
        wire.extend_from_slice(payload);
        apply_mask(&mut wire[at..], key, 0);
        wire
    }

    /// Feed `wire` in pieces of `step` bytes (draining as `feed` asks), then the data
    /// messages of the plain frames that come out.
    fn decode(inf: &mut Inflater, wire: &[u8], step: usize) -> Result<Vec<Vec<u8>>, CodecError> {
        let mut out = Vec::new();
        for piece in wire.chunks(step) {
            let mut used = 0;
            // Bounded: a call uses all of `piece` unless it produced a chunk of output.
            for _ in 0..=piece.len() + 8 {
                let before = out.len();
                used += inf.feed(&piece[used..], &mut out)?;
                if used == piece.len() && out.len() - before < CHUNK {
                    break;
                }
            }
            assert_eq!(used, piece.len());
        }
        for _ in 0..8 {
            let before = out.len();
            inf.feed(&[], &mut out)?;
            if out.len() == before {
                break;
            }
        }
        let (mut msgs, mut cur, mut b) = (Vec::new(), Vec::new(), &out[..]);
        while !b.is_empty() {
            let h = Header::parse(b).expect("a whole frame");
            assert!(!h.rsv1 && !h.is_control());
            let end = h.header_len + h.len as usize;
            let mut p = b[h.header_len..end].to_vec();
            apply_mask(&mut p, h.mask.unwrap_or([0; 4]), 0);
            cur.extend_from_slice(&p);
            if h.fin {
                msgs.push(std::mem::take(&mut cur));
            }
            b = &b[end..];
        }
        assert!(cur.is_empty(), "unfinished message");
        Ok(msgs)
    }

    const FIRST: &[u8] = b"{\"type\":\"event\",\"text\":\"hello hello hello, the first message\"}";
    const SECOND: &[u8] = b"{\"type\":\"event\",\"text\":\"and the second one, after a final block\"}";

    /// The regression: with context takeover, a message ending with a BFINAL=1 block and
    /// nothing after it left an inflater half way into a stored block made of the tail, and
    /// the next message failed with "invalid stored block lengths".
    #[test]
    fn bfinal_messages_back_to_back_with_context_takeover() {
        let mut wire = client_frame(true, true, 1, &finished(FIRST));
        wire.extend(client_frame(true, true, 1, &finished(SECOND)));
        for step in [1, 3, 7, wire.len()] {
            let mut inf = Inflater::new(Side::Server, takeover_params(), 1 << 20);
            assert_eq!(decode(&mut inf, &wire, step).unwrap(), vec![FIRST.to_vec(), SECOND.to_vec()], "step {step}");
        }
    }

    /// RFC 7692 7.2.3.4's form: the final block, then the header byte of an empty stored
    /// block whose `00 00 ff ff` was stripped as the tail.
    #[test]
    fn bfinal_messages_with_the_empty_stored_block_header() {
        let mut wire = Vec::new();
        for m in [FIRST, SECOND, FIRST] {
            let mut p = finished(m);
            p.push(0x00);
            wire.extend(client_frame(true, true, 1, &p));
        }
        for step in [1, 5, wire.len()] {
            let mut inf = Inflater::new(Side::Server, takeover_params(), 1 << 20);
            assert_eq!(decode(&mut inf, &wire, step).unwrap(), vec![FIRST.to_vec(), SECOND.to_vec(), FIRST.to_vec()], "step {step}");
        }
    }

    /// The RFC's own example bytes ("Hello", BFINAL=1, then the empty block's header).
    #[test]
    fn rfc_7692_bfinal_example() {
        let wire = client_frame(true, true, 1, &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00]);
        let mut inf = Inflater::new(Side::Server, takeover_params(), 1 << 20);
        assert_eq!(decode(&mut inf, &wire, wire.len()).unwrap(), vec![b"Hello".to_vec()]);
    }

    /// A BFINAL=1 flush inside a message (and across its frames), followed by a sync-flushed
    /// message from a compressor that takes over the window of the stream after it.
    #[test]
    fn bfinal_flush_mid_message_then_a_sync_flushed_message() {
        let mut payload = finished(FIRST);
        payload.extend_from_slice(&[0x00, 0x00, 0x00, 0xff, 0xff]); // the empty stored block
        payload.extend(finished(SECOND));
        let (a, b) = payload.split_at(payload.len() / 2);
        let mut wire = client_frame(false, true, 1, a);
        wire.extend(client_frame(true, false, 0, b));
        // The next message: a sync flush with a (new) compressor that keeps its window for
        // the message after, which references it.
        let mut c = Compress::new(Compression::default(), false);
        let mut sync = |data: &[u8]| {
            let mut out = Vec::with_capacity(data.len() + 64);
            c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
            assert!(out.ends_with(&TAIL));
            out.truncate(out.len() - TAIL.len());
            out
        };
        wire.extend(client_frame(true, true, 1, &sync(SECOND)));
        wire.extend(client_frame(true, true, 1, &sync(SECOND)));
        let mut joined = FIRST.to_vec();
        joined.extend_from_slice(SECOND);
        for step in [1, 4, wire.len()] {
            let mut inf = Inflater::new(Side::Server, takeover_params(), 1 << 20);
            let got = decode(&mut inf, &wire, step).unwrap();
            assert_eq!(got, vec![joined.clone(), SECOND.to_vec(), SECOND.to_vec()], "step {step}");
        }
    }

    /// Released between messages (the inflater dropped and rebuilt from the window), a
    /// BFINAL message still leaves the socket readable.
    #[test]
    fn bfinal_message_then_release_then_another() {
        let mut inf = Inflater::new(Side::Server, takeover_params(), 1 << 20);
        let first = client_frame(true, true, 1, &finished(FIRST));
        assert_eq!(decode(&mut inf, &first, first.len()).unwrap(), vec![FIRST.to_vec()]);
        inf.release();
        let second = client_frame(true, true, 1, &finished(SECOND));
        assert_eq!(decode(&mut inf, &second, 2).unwrap(), vec![SECOND.to_vec()]);
    }
}
