//! The leak guard: downstream keys and addresses never reach a client.
//!
//! Downstreams mention themselves in places nestor cannot enumerate forever (a VS Code URL
//! embeds the key and a port, a redirect names the host, a future field might carry either).
//! So besides rewriting the fields it knows, nestor passes every downstream answer through a
//! [`Redactor`]: a streaming search-and-replace of the downstream's key (replaced by the
//! agent-server's own mask `**********`) and origin (replaced by nestor's public origin).
//!
//! It is cheap (SIMD substring search, zero copies when nothing matches) and streaming: a
//! match split across two body chunks is still found, and only a chunk's tail that could be
//! the start of a pattern is held back, so streamed answers (SSE) are not delayed.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use memchr::memmem::Finder;

/// The mask the agent-server itself uses for secrets.
pub const MASK: &str = "**********";

/// A set of byte patterns and their replacements.
#[derive(Clone)]
pub struct Redactor {
    rules: Arc<Vec<(Finder<'static>, Bytes)>>,
    max_len: usize,
    /// The shortest pattern: shorter data cannot match (most header values).
    min_len: usize,
    /// The order patterns are searched in, and for each, a pattern searched before it that
    /// it contains (`http://127.0.0.1:9101` contains `127.0.0.1:9101`): when that one is
    /// absent, so is this one, and its search is skipped. Most answers contain no pattern,
    /// so this halves the scans of a downstream's four (key, two URLs, authority) to two.
    order: Arc<Vec<(usize, Option<usize>)>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} rules)", self.rules.len())
    }
}

impl Redactor {
    /// Rules are tried leftmost-first; among matches at the same position the first rule wins.
    /// Empty patterns are ignored.
    pub fn new(rules: impl IntoIterator<Item = (Vec<u8>, Bytes)>) -> Self {
        let rules: Vec<_> = rules
            .into_iter()
            .filter(|(p, _)| !p.is_empty())
            .map(|(p, r)| (Finder::new(&p).into_owned(), r))
            .collect();
        let max_len = rules.iter().map(|(f, _)| f.needle().len()).max().unwrap_or(0);
        let min_len = rules.iter().map(|(f, _)| f.needle().len()).min().unwrap_or(0);
        let order = Arc::new(search_order(&rules));
        Self { rules: Arc::new(rules), max_len, min_len, order }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Earliest match at or after `from`: (position, rule index).
    fn find(&self, data: &[u8], from: usize) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize)> = None;
        // Bit i: pattern i was searched and not found (only patterns below 64 are tracked;
        // `search_order` gives no shortcut past them).
        let mut absent = 0u64;
        for &(i, inside) in self.order.iter() {
            if inside.is_some_and(|j| absent & (1 << j) != 0) {
                continue;
            }
            match self.rules[i].0.find(&data[from..]) {
                Some(p) => {
                    let p = p + from;
                    // Leftmost; at the same place, the rule given first.
                    if best.is_none_or(|(bp, bi)| p < bp || (p == bp && i < bi)) {
                        best = Some((p, i));
                    }
                }
                None if i < 64 => absent |= 1 << i,
                None => {}
            }
        }
        best
    }

    /// Replace every match in a complete buffer. Borrows when nothing matches.
    pub fn apply<'a>(&self, data: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        if self.rules.is_empty() || data.len() < self.min_len {
            return std::borrow::Cow::Borrowed(data);
        }
        let Some(first) = self.find(data, 0) else {
            return std::borrow::Cow::Borrowed(data);
        };
        let mut out = Vec::with_capacity(data.len());
        let mut pos = 0;
        let mut next = Some(first);
        while let Some((p, i)) = next {
            out.extend_from_slice(&data[pos..p]);
            out.extend_from_slice(&self.rules[i].1);
            pos = p + self.rules[i].0.needle().len();
            next = self.find(data, pos);
        }
        out.extend_from_slice(&data[pos..]);
        std::borrow::Cow::Owned(out)
    }

    /// Length of the longest suffix of `data` that is a proper prefix of some pattern:
    /// those bytes must wait for the next chunk.
    fn pending_prefix(&self, data: &[u8]) -> usize {
        let mut keep = 0;
        for (f, _) in self.rules.iter() {
            let needle = f.needle();
            let max = (needle.len() - 1).min(data.len());
            for k in (keep + 1..=max).rev() {
                if data[data.len() - k..] == needle[..k] {
                    keep = k;
                    break;
                }
            }
        }
        keep
    }

    /// Process one chunk of a stream: returns what can be emitted now; `carry` keeps the
    /// held-back tail between calls. With `last`, everything is emitted.
    pub fn process_chunk(&self, carry: &mut BytesMut, chunk: Bytes, last: bool) -> Bytes {
        if self.rules.is_empty() {
            return chunk;
        }
        let data: Bytes = if carry.is_empty() {
            chunk
        } else {
            carry.extend_from_slice(&chunk);
            carry.split().freeze()
        };
        let mut out = BytesMut::new();
        let mut pos = 0;
        let mut copied = false;
        while let Some((p, i)) = self.find(&data, pos) {
            out.extend_from_slice(&data[pos..p]);
            out.extend_from_slice(&self.rules[i].1);
            pos = p + self.rules[i].0.needle().len();
            copied = true;
        }
        let keep = if last { 0 } else { self.pending_prefix(&data[pos..]) };
        let emit_end = data.len() - keep;
        carry.extend_from_slice(&data[emit_end..]);
        if !copied {
            return data.slice(pos..emit_end);
        }
        out.extend_from_slice(&data[pos..emit_end]);
        out.freeze()
    }

    /// The guard for answers from `ep` to a client that reached nestor at `origin`
    /// (`http(s)://host[:port]`): the downstream's key becomes [`MASK`], its origin (and bare
    /// authority) becomes nestor's. Use [`crate::Endpoint::redactor`], which caches it.
    pub fn for_endpoint(ep: &crate::Endpoint, origin: Option<&str>) -> Self {
        let mut rules: Vec<(Vec<u8>, Bytes)> = Vec::with_capacity(4);
        if let Some(k) = &ep.key {
            if k.expose().len() >= 8 {
                rules.push((k.expose().as_bytes().to_vec(), Bytes::from_static(MASK.as_bytes())));
            }
        }
        let authority = ep.authority.as_str();
        let (nestor_http, nestor_ws, nestor_host) = match origin {
            Some(o) => {
                let host = o.split_once("://").map(|(_, h)| h).unwrap_or(o).to_owned();
                let ws = if o.starts_with("https://") { format!("wss://{host}") } else { format!("ws://{host}") };
                (o.to_owned(), ws, host)
            }
            None => ("http://nestor".to_owned(), "ws://nestor".to_owned(), "nestor".to_owned()),
        };
        rules.push((format!("{}://{authority}", ep.scheme).into_bytes(), Bytes::from(nestor_http)));
        rules.push((format!("ws://{authority}").into_bytes(), Bytes::from(nestor_ws)));
        rules.push((authority.as_bytes().to_vec(), Bytes::from(nestor_host)));
        Self::new(rules)
    }

    /// Wrap a body so its data passes through this redactor.
    pub fn wrap<B>(&self, body: B) -> RedactedBody<B> {
        RedactedBody { inner: body, redactor: self.clone(), carry: BytesMut::new(), done: false, trailers: None }
    }

    /// The longest pattern length (for tests and sizing).
    pub fn max_pattern_len(&self) -> usize {
        self.max_len
    }
}

/// [`Redactor::order`]: patterns that contain no other pattern first, then each of the rest
/// with one (among the first 64) it contains.
fn search_order(rules: &[(Finder<'static>, Bytes)]) -> Vec<(usize, Option<usize>)> {
    let contains = |hay: &[u8], needle: &[u8]| hay.len() > needle.len() && memchr::memmem::find(hay, needle).is_some();
    let inside: Vec<Option<usize>> = rules
        .iter()
        .map(|(f, _)| {
            (0..rules.len().min(64)).find(|&j| {
                let base = rules[j].0.needle();
                // A base contains no other pattern itself (so it is searched first).
                contains(f.needle(), base) && !rules.iter().any(|(g, _)| contains(base, g.needle()))
            })
        })
        .collect();
    let mut order: Vec<_> = inside.iter().enumerate().filter(|(_, j)| j.is_none()).map(|(i, _)| (i, None)).collect();
    order.extend(inside.iter().enumerate().filter_map(|(i, j)| j.map(|j| (i, Some(j)))));
    order
}

pin_project_lite::pin_project! {
    /// A body whose data frames pass through a [`Redactor`]; trailers pass unchanged.
    pub struct RedactedBody<B> {
        #[pin]
        inner: B,
        redactor: Redactor,
        carry: BytesMut,
        done: bool,
        trailers: Option<Frame<Bytes>>,
    }
}

impl<B> Body for RedactedBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        loop {
            if *this.done {
                return Poll::Ready(this.trailers.take().map(Ok));
            }
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    *this.done = true;
                    if this.carry.is_empty() {
                        return Poll::Ready(None);
                    }
                    let rest = this.carry.split().freeze();
                    let out = this.redactor.process_chunk(this.carry, rest, true);
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.redactor.process_chunk(this.carry, data, false);
                        if out.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    Err(frame) => {
                        // Trailers come after all data: emit what is held back first.
                        if this.carry.is_empty() {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        *this.trailers = Some(frame);
                        *this.done = true;
                        let rest = this.carry.split().freeze();
                        let out = this.redactor.process_chunk(this.carry, rest, true);
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.carry.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Replacements change the length: never claim an exact size.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    use proptest::prelude::*;

    fn redactor() -> Redactor {
        Redactor::new([
            (b"SECRETKEY123".to_vec(), Bytes::from_static(MASK.as_bytes())),
            (b"http://127.0.0.1:9101".to_vec(), Bytes::from_static(b"http://nestor:8000")),
        ])
    }

    #[test]
    fn replaces_in_whole_buffers() {
        let r = redactor();
        let s = br#"{"url":"http://127.0.0.1:9101/?tkn=SECRETKEY123&x=1"}"#;
        assert_eq!(
            r.apply(s).as_ref(),
            br#"{"url":"http://nestor:8000/?tkn=**********&x=1"}"#
        );
        assert!(matches!(r.apply(b"nothing here"), std::borrow::Cow::Borrowed(_)));
    }

    fn stream_through(r: &Redactor, chunks: &[&[u8]]) -> Vec<u8> {
        let mut carry = BytesMut::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&r.process_chunk(&mut carry, Bytes::copy_from_slice(c), false));
        }
        out.extend_from_slice(&r.process_chunk(&mut carry, Bytes::new(), true));
        out
    }

    #[test]
    fn finds_matches_split_across_chunks() {
        let r = redactor();
        let out = stream_through(&r, &[b"aa SECRET", b"KEY1", b"23 bb http://127.", b"0.0.1:9101/x"]);
        assert_eq!(out, b"aa ********** bb http://nestor:8000/x");
    }

    #[test]
    fn does_not_hold_back_unrelated_tails() {
        let r = redactor();
        let mut carry = BytesMut::new();
        let out = r.process_chunk(&mut carry, Bytes::from_static(b"data: {}\n\n"), false);
        assert_eq!(&out[..], b"data: {}\n\n");
        assert!(carry.is_empty());
    }

    #[tokio::test]
    async fn wraps_a_body() {
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"x SECRE"))),
            Ok(Frame::data(Bytes::from_static(b"TKEY123 y"))),
        ];
        let body = StreamBody::new(futures::stream::iter(chunks));
        let out = redactor().wrap(body).collect().await.unwrap().to_bytes();
        assert_eq!(&out[..], b"x ********** y");
    }

    /// Leftmost match first, the rule given first at the same place, then on after it.
    fn naive(rules: &[(Vec<u8>, Vec<u8>)], data: &[u8]) -> Vec<u8> {
        let (mut out, mut pos) = (Vec::new(), 0);
        loop {
            let mut best: Option<(usize, usize)> = None;
            for (i, (p, _)) in rules.iter().enumerate().filter(|(_, (p, _))| !p.is_empty()) {
                let hit = (pos..data.len()).find(|&q| data[q..].starts_with(p));
                if let Some(q) = hit {
                    if best.is_none_or(|(bq, _)| q < bq) {
                        best = Some((q, i));
                    }
                }
            }
            let Some((q, i)) = best else {
                out.extend_from_slice(&data[pos..]);
                return out;
            };
            out.extend_from_slice(&data[pos..q]);
            out.extend_from_slice(&rules[i].1);
            pos = q + rules[i].0.len();
        }
    }

    #[test]
    fn patterns_inside_others_are_searched_after_them() {
        let r = Redactor::for_endpoint(&crate::Endpoint::loopback(9101, Some(crate::SessionKey::new("SECRETKEY123"))), None);
        // Key and authority first; the two URLs (which contain the authority) after it.
        let firsts: Vec<_> = r.order.iter().filter(|(_, inside)| inside.is_none()).map(|&(i, _)| r.rules[i].0.needle().to_vec()).collect();
        assert_eq!(firsts, [b"SECRETKEY123".to_vec(), b"127.0.0.1:9101".to_vec()]);
        let s = b"ws://127.0.0.1:9101/x http://127.0.0.1:9101 127.0.0.1:9101 SECRETKEY123";
        assert_eq!(r.apply(s).as_ref(), b"ws://nestor/x http://nestor nestor **********");
        assert!(matches!(r.apply(b"127.0.0.1:9102 and nothing else"), std::borrow::Cow::Borrowed(_)));
    }

    proptest! {
        /// Any patterns (on a small alphabet, so they overlap and contain each other) on any
        /// data: exactly the naive search-and-replace.
        #[test]
        fn apply_equals_the_naive_replacement(
            rules in proptest::collection::vec(
                (proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), Just(b'c')], 0..5), proptest::collection::vec(Just(b'X'), 0..3)),
                1..6,
            ),
            data in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), Just(b'c'), Just(b'd')], 0..48),
        ) {
            let r = Redactor::new(rules.iter().map(|(p, w)| (p.clone(), Bytes::from(w.clone()))));
            prop_assert_eq!(r.apply(&data).into_owned(), naive(&rules, &data));
        }

        /// Streaming in any chunking gives exactly the whole-buffer result.
        #[test]
        fn streaming_equals_whole(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just(b"SECRETKEY123".to_vec()),
                    Just(b"http://127.0.0.1:9101".to_vec()),
                    Just(b"SECRET".to_vec()),
                    Just(b"http://127".to_vec()),
                    proptest::collection::vec(any::<u8>(), 0..8),
                ],
                0..12,
            ),
            cuts in proptest::collection::vec(0usize..200, 0..10),
        ) {
            let r = redactor();
            let data: Vec<u8> = parts.concat();
            let expected = r.apply(&data).into_owned();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut prev = 0;
            for c in cuts { chunks.push(&data[prev..c]); prev = c; }
            chunks.push(&data[prev..]);
            prop_assert_eq!(stream_through(&r, &chunks), expected);
        }
    }
}
