//! permessage-deflate codec and adapter: property tests against flate2 used directly (an
//! encoder and decoder written here, independent of the codec's), round trips through both
//! roles, deflate bombs, and the adapter under tungstenite on both ends.

use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use futures::{SinkExt, StreamExt};
use nestor_ws_proxy::deflate::codec::{Deflater, Inflater, CHUNK};
use nestor_ws_proxy::deflate::{CodecError, DeflateStream, Params, Side};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

fn frame(fin: bool, rsv1: bool, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![((fin as u8) << 7) | ((rsv1 as u8) << 6) | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    if payload.len() < 126 {
        out.push(m | payload.len() as u8);
    } else if payload.len() < 65536 {
        out.push(m | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    }
    let mut p = payload.to_vec();
    if let Some(k) = mask {
        out.extend_from_slice(&k);
        for (i, b) in p.iter_mut().enumerate() {
            *b ^= k[i & 3];
        }
    }
    out.extend_from_slice(&p);
    out
}

#[derive(Debug, Clone, PartialEq)]
struct F {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    masked: bool,
    payload: Vec<u8>,
}

/// Parse complete frames (test-side parser).
fn parse(mut b: &[u8]) -> Vec<F> {
    let mut v = Vec::new();
    while !b.is_empty() {
        let fin = b[0] & 0x80 != 0;
        let rsv1 = b[0] & 0x40 != 0;
        let opcode = b[0] & 0x0f;
        let masked = b[1] & 0x80 != 0;
        let (len, mut n) = match b[1] & 0x7f {
            126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 => (u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize, 10),
            l => (l as usize, 2),
        };
        let mut key = [0; 4];
        if masked {
            key.copy_from_slice(&b[n..n + 4]);
            n += 4;
        }
        let mut payload = b[n..n + len].to_vec();
        for (i, x) in payload.iter_mut().enumerate() {
            *x ^= key[i & 3];
        }
        v.push(F { fin, rsv1, opcode, masked, payload });
        b = &b[n + len..];
    }
    v
}

/// Data messages as (opcode, payload).
type Msgs = Vec<(u8, Vec<u8>)>;

/// Data messages and the control frames' payloads, from plain frames.
fn messages(frames: &[F]) -> (Msgs, Vec<Vec<u8>>) {
    let (mut msgs, mut ctl) = (Vec::new(), Vec::new());
    let mut cur: Option<(u8, Vec<u8>)> = None;
    for f in frames {
        if f.opcode & 8 != 0 {
            ctl.push(f.payload.clone());
            continue;
        }
        match (&mut cur, f.opcode) {
            (None, op) => cur = Some((op, f.payload.clone())),
            (Some((_, p)), 0) => p.extend_from_slice(&f.payload),
            _ => panic!("data frame inside a message"),
        }
        if f.fin {
            msgs.push(cur.take().unwrap());
        }
    }
    assert!(cur.is_none(), "unfinished message");
    (msgs, ctl)
}

/// The reference encoder: what a peer sends (flate2 used directly).
struct Peer {
    c: Compress,
    takeover: bool,
}

impl Peer {
    fn new(takeover: bool) -> Self {
        Self { c: Compress::new(Compression::default(), false), takeover }
    }
    fn compress(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 64);
        let start = self.c.total_in();
        loop {
            let done = (self.c.total_in() - start) as usize;
            if out.len() == out.capacity() {
                out.reserve(64 + out.capacity());
            }
            self.c.compress_vec(&data[done..], &mut out, FlushCompress::Sync).unwrap();
            if (self.c.total_in() - start) as usize == data.len() && out.len() < out.capacity() {
                break;
            }
        }
        assert!(out.ends_with(&TAIL));
        out.truncate(out.len() - 4);
        if !self.takeover {
            self.c.reset();
        }
        out
    }
}

fn feed_all(inf: &mut Inflater, wire: &[u8], chunks: &[usize], release_every: Option<usize>) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut k = 0;
    while i < wire.len() {
        let n = chunks[k % chunks.len()].max(1).min(wire.len() - i);
        let piece = &wire[i..i + n];
        let mut used = 0;
        loop {
            let before = out.len();
            used += inf.feed(&piece[used..], &mut out)?;
            assert!(out.len() - before < 2 * CHUNK + 64, "one feed produced {} bytes", out.len() - before);
            if used == piece.len() && out.len() - before < CHUNK {
                break;
            }
        }
        i += n;
        k += 1;
        if release_every.is_some_and(|r| k % r == 0) {
            inf.release();
        }
    }
    // Let a last message's tail finish.
    loop {
        let before = out.len();
        inf.feed(&[], &mut out)?;
        if out.len() == before {
            break;
        }
    }
    Ok(out)
}

fn params(takeover: bool, our: u8, peer: u8) -> Params {
    Params { our_max_window_bits: our, peer_no_context_takeover: !takeover, peer_max_window_bits: peer }
}

fn msg_strategy() -> impl Strategy<Value = (bool, Vec<u8>)> {
    (
        any::<bool>(),
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            // Compressible: repeated JSON-ish text, sometimes past a chunk.
            (1usize..3000).prop_map(|n| format!("{{\"id\":{n},\"kind\":\"MessageEvent\",\"text\":\"hello\"}}").repeat(n % 40 + 1).into_bytes()),
            (0usize..70_000).prop_map(|n| vec![b'a'; n]),
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever a peer sends (compressed or not, fragmented anywhere, pings between the
    /// fragments, masked or not, with or without context takeover, read in any chunking,
    /// the inflater released at any point), tungstenite gets the same messages in plain
    /// frames, masked with a zero key towards a server.
    #[test]
    fn inflater_reads_what_a_peer_sends(
        msgs in proptest::collection::vec(msg_strategy(), 1..8),
        takeover in any::<bool>(),
        server in any::<bool>(),
        splits in proptest::collection::vec(1usize..5, 8),
        chunks in proptest::collection::vec(1usize..5000, 1..6),
        release in proptest::option::of(1usize..4),
        key in any::<[u8; 4]>(),
    ) {
        let side = if server { Side::Server } else { Side::Client };
        let mask = if server { Some(key) } else { None };
        let mut peer = Peer::new(takeover);
        let mut wire = Vec::new();
        for (j, (compress, m)) in msgs.iter().enumerate() {
            let opcode = if j % 2 == 0 { 2 } else { 1 };
            let body = if *compress { peer.compress(m) } else { m.clone() };
            // Fragment into `parts` frames.
            let parts = splits[j % splits.len()].min(body.len().max(1));
            let step = body.len().div_ceil(parts).max(1);
            let pieces: Vec<&[u8]> = if body.is_empty() { vec![&body[..]] } else { body.chunks(step).collect() };
            for (i, p) in pieces.iter().enumerate() {
                let last = i + 1 == pieces.len();
                wire.extend(frame(last, *compress && i == 0, if i == 0 { opcode } else { 0 }, mask, p));
                if !last && i % 2 == 0 {
                    wire.extend(frame(true, false, 9, mask, b"ping"));
                }
            }
        }
        let mut inf = Inflater::new(side, params(takeover, 15, 15), 1 << 20);
        let out = feed_all(&mut inf, &wire, &chunks, release).unwrap();
        let frames = parse(&out);
        prop_assert!(frames.iter().all(|f| !f.rsv1));
        prop_assert!(frames.iter().all(|f| f.masked == server));
        let (got, ctl) = messages(&frames);
        let want: Vec<(u8, Vec<u8>)> = msgs.iter().enumerate().map(|(j, (_, m))| (if j % 2 == 0 { 2 } else { 1 }, m.clone())).collect();
        prop_assert_eq!(got, want);
        prop_assert!(ctl.iter().all(|c| c == b"ping"));
        inf.release();
        let cap = if takeover { 2 << 15 } else { 0 };
        prop_assert!(inf.held_bytes() <= cap, "{} held", inf.held_bytes());
    }

    /// What the deflater writes decodes (flate2 directly) to what tungstenite wrote, with
    /// RSV1 on the compressed ones and masking redone for a client.
    #[test]
    fn deflater_output_decodes(
        msgs in proptest::collection::vec(msg_strategy(), 1..8),
        server in any::<bool>(),
        chunks in proptest::collection::vec(1usize..5000, 1..6),
        window in 8u8..=15,
        key in any::<[u8; 4]>(),
    ) {
        let mask = if server { None } else { Some(key) };
        let mut wire = Vec::new();
        for (j, (_, m)) in msgs.iter().enumerate() {
            wire.extend(frame(true, false, if j % 2 == 0 { 2 } else { 1 }, mask, m));
            wire.extend(frame(true, false, 10, mask, b"pong"));
        }
        let mut d = Deflater::new(params(false, window, 15));
        let (mut pending, mut out) = (Vec::new(), Vec::new());
        let mut i = 0;
        let mut k = 0;
        while i < wire.len() {
            let n = chunks[k % chunks.len()].min(wire.len() - i);
            pending.extend_from_slice(&wire[i..i + n]);
            let used = d.encode(&pending, &mut out);
            pending.drain(..used);
            i += n;
            k += 1;
            if k % 3 == 0 {
                d.release();
            }
        }
        prop_assert!(pending.is_empty());
        // A browser's inflater: one for the whole connection.
        let mut inf = Decompress::new(false);
        let mut got = Vec::new();
        for f in parse(&out) {
            prop_assert_eq!(f.masked, !server);
            if f.opcode & 8 != 0 {
                prop_assert!(!f.rsv1);
                continue;
            }
            let body = if f.rsv1 {
                let mut input = f.payload.clone();
                input.extend_from_slice(&TAIL);
                let mut o = Vec::with_capacity(200_000);
                inf.decompress_vec(&input, &mut o, FlushDecompress::Sync).unwrap();
                prop_assert!(window == 15 || o.len() <= 1 << window, "a message longer than the window was compressed");
                o
            } else {
                f.payload.clone()
            };
            got.push((f.opcode, body));
        }
        let want: Vec<(u8, Vec<u8>)> = msgs.iter().enumerate().map(|(j, (_, m))| (if j % 2 == 0 { 2 } else { 1 }, m.clone())).collect();
        prop_assert_eq!(got, want);
    }

    /// Deflater on one side, inflater on the other, both roles.
    #[test]
    fn round_trip(msgs in proptest::collection::vec(msg_strategy(), 1..8), server_writes in any::<bool>(), key in any::<[u8; 4]>()) {
        let (w, r) = if server_writes { (None, Side::Client) } else { (Some(key), Side::Server) };
        let mut wire = Vec::new();
        for (_, m) in &msgs {
            wire.extend(frame(true, false, 2, w, m));
        }
        let mut d = Deflater::new(params(false, 15, 15));
        let mut out = Vec::new();
        prop_assert_eq!(d.encode(&wire, &mut out), wire.len());
        let mut inf = Inflater::new(r, params(false, 15, 15), 1 << 20);
        let plain = feed_all(&mut inf, &out, &[4096], None).unwrap();
        let (got, _) = messages(&parse(&plain));
        prop_assert_eq!(got, msgs.iter().map(|(_, m)| (2u8, m.clone())).collect::<Vec<_>>());
    }
}

#[test]
fn json_events_are_compressed() {
    let ev = br#"{"id":"5b0c","timestamp":"2025-01-01T00:00:00","source":"agent","kind":"MessageEvent","llm_message":{"role":"assistant","content":[{"type":"text","text":"Done. The tests pass."}]}}"#;
    let mut d = Deflater::new(params(false, 15, 15));
    let mut out = Vec::new();
    d.encode(&frame(true, false, 1, None, ev), &mut out);
    let f = &parse(&out)[0];
    assert!(f.rsv1);
    assert!(f.payload.len() < ev.len(), "{} of {}", f.payload.len(), ev.len());
    // Tiny messages that would not shrink go as they are.
    let mut out = Vec::new();
    d.encode(&frame(true, false, 1, None, b"{}"), &mut out);
    assert!(!parse(&out)[0].rsv1);
}

#[test]
fn a_deflate_bomb_is_refused_with_bounded_memory() {
    let mut peer = Peer::new(false);
    let bomb = peer.compress(&vec![0u8; 64 << 20]);
    assert!(bomb.len() < 128 << 10);
    let wire = frame(true, true, 2, Some([1, 2, 3, 4]), &bomb);
    let mut inf = Inflater::new(Side::Server, params(false, 15, 15), 4 << 20);
    let mut out = Vec::new();
    let mut used = 0;
    let mut emitted = 0;
    let err = loop {
        match inf.feed(&wire[used..], &mut out) {
            Ok(n) => {
                used += n;
                assert!(out.len() < 2 * CHUNK + 64);
                emitted += out.len();
                out.clear();
            }
            Err(e) => break e,
        }
    };
    assert_eq!(err, CodecError::TooBig { max: 4 << 20 });
    // At most one chunk past the limit (plus frame headers) ever left the inflater.
    assert!(emitted <= (4 << 20) + CHUNK + 4096, "{emitted}");
}

#[test]
fn corrupt_data_is_an_error_not_a_panic() {
    let wire = frame(true, true, 1, None, &[0xff; 40]);
    let mut inf = Inflater::new(Side::Client, params(false, 15, 15), 1 << 20);
    let mut out = Vec::new();
    assert!(matches!(inf.feed(&wire, &mut out), Err(CodecError::Corrupt(_))));
}

#[test]
fn control_and_plain_frames_pass_byte_for_byte() {
    let key = Some([9, 8, 7, 6]);
    let mut wire = frame(true, false, 9, key, b"hi");
    wire.extend(frame(false, false, 1, key, b"ab"));
    wire.extend(frame(true, false, 0, key, b"cd"));
    wire.extend(frame(true, false, 8, key, &[3, 232]));
    // RSV1 on a continuation: tungstenite must see it (and fail the connection).
    wire.extend(frame(true, true, 0, key, b"x"));
    let mut inf = Inflater::new(Side::Server, params(true, 15, 15), 1 << 20);
    let mut out = Vec::new();
    assert_eq!(inf.feed(&wire, &mut out).unwrap(), wire.len());
    assert_eq!(out, wire);
    let mut d = Deflater::new(params(false, 15, 15));
    let mut out = Vec::new();
    let w2 = [frame(true, false, 10, None, b"pong"), frame(false, false, 2, None, &[7; 300]), frame(true, false, 0, None, &[7; 300])].concat();
    assert_eq!(d.encode(&w2, &mut out), w2.len());
    assert_eq!(out, w2, "fragmented messages and control frames go as they are");
}

fn ws_cfg() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(2048).write_buffer_size(0).max_message_size(Some(1 << 20)).max_frame_size(Some(1 << 20))
}

/// tungstenite on both ends of a connection, each over the adapter.
#[tokio::test]
async fn tungstenite_over_the_adapter_both_ways() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let p = params(true, 15, 15);
    let server = DeflateStream::active(a, Side::Server, p, 1 << 20);
    let client = DeflateStream::active(b, Side::Client, p, 1 << 20);
    let mut server = WebSocketStream::from_raw_socket(server, Role::Server, Some(ws_cfg())).await;
    let mut client = WebSocketStream::from_raw_socket(client, Role::Client, Some(ws_cfg())).await;
    let texts: Vec<String> = (0..200).map(|i| format!("{{\"seq\":{i},\"text\":\"{}\"}}", "x".repeat(i * 37 % 5000))).collect();
    let t2 = texts.clone();
    let echo = tokio::spawn(async move {
        while let Some(Ok(m)) = server.next().await {
            match m {
                Message::Text(_) | Message::Binary(_) => server.send(m).await.unwrap(),
                Message::Close(_) => break,
                _ => {}
            }
        }
        server
    });
    for t in &t2 {
        client.send(Message::Text(t.clone().into())).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), client.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(got, Message::Text(t.clone().into()));
    }
    client.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
    client.close(None).await.unwrap();
    let server = tokio::time::timeout(Duration::from_secs(5), echo).await.unwrap().unwrap();
    assert!(server.get_ref().is_active());
    // Idle: only the peer's window is kept.
    assert!(server.get_ref().held_bytes() < 70_000, "{}", server.get_ref().held_bytes());
    drop(texts);
}

/// The sniffing client switches at the exact byte where frames start, even when the first
/// compressed frame comes in the same write as the handshake answer.
#[tokio::test]
async fn client_sniffs_the_answer_and_inflates_frames_glued_to_it() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        let mut b = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut b).await.unwrap();
            req.extend_from_slice(&b[..n]);
        }
        let text = String::from_utf8_lossy(&req).to_string();
        assert!(text.to_ascii_lowercase().contains("sec-websocket-extensions: permessage-deflate"), "{text}");
        let key = text.lines().find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ").or(l.strip_prefix("sec-websocket-key: "))).unwrap().trim().to_owned();
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=12; client_max_window_bits=12\r\n\r\n"
        )
        .into_bytes();
        let mut peer = Peer::new(true);
        resp.extend(frame(true, true, 1, None, &peer.compress(b"hello hello hello")));
        resp.extend(frame(true, true, 1, None, &peer.compress(b"hello hello hello again")));
        s.write_all(&resp).await.unwrap();
        // Then whatever the client sends: one compressed text, masked.
        let mut got = Vec::new();
        loop {
            let n = s.read(&mut b).await.unwrap();
            got.extend_from_slice(&b[..n]);
            if n == 0 || (got.len() > 2 && got.len() >= 6 + (got[1] & 0x7f) as usize) {
                break;
            }
        }
        parse(&got)
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let io = DeflateStream::client_sniffing(tcp, 1 << 20);
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{addr}/x")).unwrap();
    req.headers_mut().insert("Sec-WebSocket-Extensions", nestor_ws_proxy::deflate::negotiate::CLIENT_OFFER.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, io, Some(ws_cfg())).await.unwrap();
    assert!(ws.get_ref().is_active());
    let m1 = ws.next().await.unwrap().unwrap();
    let m2 = ws.next().await.unwrap().unwrap();
    assert_eq!(m1, Message::Text("hello hello hello".into()));
    assert_eq!(m2, Message::Text("hello hello hello again".into()));
    ws.send(Message::Text("abcabcabcabcabcabcabcabcabc".into())).await.unwrap();
    let frames = server.await.unwrap();
    assert!(frames[0].rsv1 && frames[0].masked);
    let mut input = frames[0].payload.clone();
    input.extend_from_slice(&TAIL);
    let mut o = Vec::with_capacity(100);
    Decompress::new(false).decompress_vec(&input, &mut o, FlushDecompress::Sync).unwrap();
    assert_eq!(o, b"abcabcabcabcabcabcabcabcabc");
}
