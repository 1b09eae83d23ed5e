//! Fuzzing (proptest at scale) of what `nestor-core` parses from untrusted input and of the
//! leak guard every downstream answer passes through.
//!
//! Why proptest and not cargo-fuzz: the project builds offline on stable; proptest gives
//! the same "arbitrary input, assert no panic and the invariants" coverage, shrinks failures
//! to a minimal case and runs inside the ordinary `cargo test` unit stage.
//!
//! * CI smoke run: the default case counts below (a few seconds in a debug build).
//! * Long run: `NESTOR_FUZZ_CASES=1000000 cargo test --release -p nestor-core --test fuzz`
//!   (every property then runs that many cases; docs/reliability.md).
//!
//! Invariants:
//! * `ConversationId::parse` never panics on any text; an accepted id prints (dashed and
//!   hex) to text that parses back to the same id; it is case-insensitive.
//! * The endpoint leak guard: after redaction no text that came from the downstream still
//!   contains the downstream's key or its authority (`host:port`); redacting a stream in
//!   any chunking gives exactly the whole-buffer result; arbitrary rule sets never panic.

use bytes::{Bytes, BytesMut};
use nestor_core::leak_guard::{Redactor, MASK};
use nestor_core::{ConversationId, Endpoint, SessionKey};
use proptest::prelude::*;
use uuid::Uuid;

/// Cases per property: `NESTOR_FUZZ_CASES` for a long run, else the smoke count.
fn config(smoke: u32) -> ProptestConfig {
    let cases = std::env::var("NESTOR_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(smoke);
    ProptestConfig { cases, max_shrink_iters: 10_000, failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"))), ..ProptestConfig::default() }
}

/// Text: arbitrary Unicode, ASCII noise, or id-like shapes (near misses of a UUID).
fn id_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9a-fA-F-]{0,40}",
        "\\{?(urn:uuid:)?[0-9a-fA-FxX_-]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\\}?",
        any::<[u8; 16]>().prop_map(|b| Uuid::from_bytes(b).to_string()),
    ]
}

// ------------------------------------------------------------------ leak guard set-up

/// A downstream as the provisioners make them: loopback or a host name, a port, a key of
/// URL-safe alphanumerics (what `SessionKey::random` and operators' keys look like).
#[derive(Debug, Clone)]
struct Setup {
    https: bool,
    host: String,
    port: u16,
    key: String,
    /// The public origin nestor was reached at (None: no `Host` header).
    origin: Option<String>,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        any::<bool>(),
        prop_oneof![Just("127.0.0.1".to_owned()), "10\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}", "[a-z][a-z0-9-]{0,12}(\\.[a-z]{2,5})?"],
        1024u16..,
        "[A-Za-z0-9]{8,48}",
        proptest::option::of(prop_oneof![
            Just("http://127.0.0.1:8000".to_owned()),
            "https?://[a-z][a-z0-9.-]{0,20}(:[0-9]{2,5})?",
            "https?://\\[::1\\]:[0-9]{2,5}",
        ]),
    )
        .prop_map(|(https, host, port, key, origin)| Setup { https, host, port, key, origin })
}

impl Setup {
    fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    fn endpoint(&self) -> Endpoint {
        let scheme = if self.https { "https" } else { "http" };
        Endpoint::parse(&format!("{scheme}://{}", self.authority()), Some(SessionKey::new(self.key.clone()))).expect("generated URL is valid")
    }

    /// The leak guard's rules as documented (key → mask, origins and authority → nestor's),
    /// with every replacement swapped for `marker`: what is left of the downstream's own
    /// bytes in an answer, with redacted spans cut out.
    fn model(&self, marker: Option<&'static [u8]>) -> Redactor {
        let scheme = if self.https { "https" } else { "http" };
        let (http, ws, host) = match &self.origin {
            Some(o) => {
                let host = o.split_once("://").map(|(_, h)| h).unwrap_or(o).to_owned();
                let ws = if o.starts_with("https://") { format!("wss://{host}") } else { format!("ws://{host}") };
                (o.clone(), ws, host)
            }
            None => ("http://nestor".to_owned(), "ws://nestor".to_owned(), "nestor".to_owned()),
        };
        let rep = |b: String| marker.map(Bytes::from_static).unwrap_or_else(|| Bytes::from(b));
        Redactor::new([
            (self.key.as_bytes().to_vec(), rep(MASK.to_owned())),
            (format!("{scheme}://{}", self.authority()).into_bytes(), rep(http)),
            (format!("ws://{}", self.authority()).into_bytes(), rep(ws)),
            (self.authority().into_bytes(), rep(host)),
        ])
    }
}

/// An answer body: pieces of what a downstream might say about itself (its key, URLs with
/// its address, prefixes of both that end where a chunk might) and noise.
fn body_for(s: &Setup) -> impl Strategy<Value = Vec<u8>> {
    let key = s.key.clone();
    let auth = s.authority();
    let scheme = if s.https { "https" } else { "http" };
    let pieces: Vec<Vec<u8>> = vec![
        key.as_bytes().to_vec(),
        format!("{scheme}://{auth}/api/x?k={key}").into_bytes(),
        format!("ws://{auth}/sockets/events/1").into_bytes(),
        auth.as_bytes().to_vec(),
        format!("\"{key}\"").into_bytes(),
        key.as_bytes()[..key.len() / 2].to_vec(),
        key.as_bytes()[key.len() / 2..].to_vec(),
        auth.as_bytes()[..auth.len() / 2].to_vec(),
        format!("{scheme}://").into_bytes(),
        b"ws://".to_vec(),
    ];
    proptest::collection::vec(
        prop_oneof![
            3 => proptest::sample::select(pieces),
            2 => proptest::collection::vec(any::<u8>(), 0..12),
            1 => "[ -~]{0,16}".prop_map(String::into_bytes),
        ],
        0..24,
    )
    .prop_map(|v| v.concat())
}

fn stream_through(r: &Redactor, data: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    cuts.sort_unstable();
    let mut carry = BytesMut::new();
    let mut out = Vec::with_capacity(data.len());
    let mut prev = 0;
    for c in cuts {
        out.extend_from_slice(&r.process_chunk(&mut carry, Bytes::copy_from_slice(&data[prev..c]), false));
        prev = c;
    }
    out.extend_from_slice(&r.process_chunk(&mut carry, Bytes::copy_from_slice(&data[prev..]), true));
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn fuzz_conversation_id_parse(s in id_like()) {
        if let Ok(id) = ConversationId::parse(&s) {
            prop_assert_eq!(ConversationId::parse(&id.to_string()).unwrap(), id);
            prop_assert_eq!(ConversationId::parse(&id.hex()).unwrap(), id);
            prop_assert_eq!(ConversationId::parse(&s.to_ascii_uppercase()).unwrap(), id);
        }
    }

    #[test]
    fn fuzz_leak_guard_never_leaves_key_or_address(
        (s, body, cuts) in setup().prop_flat_map(|s| { let b = body_for(&s); (Just(s), b, proptest::collection::vec(any::<usize>(), 0..8)) })
    ) {
        let ep = s.endpoint();
        let real = ep.redactor(s.origin.as_deref());
        let whole = real.apply(&body).into_owned();
        // The documented rules are the rules (pins the model used below to the code).
        prop_assert_eq!(&whole, &s.model(None).apply(&body).into_owned());
        // Nothing of the downstream's own text left unredacted holds its key or address.
        let rest = s.model(Some(b"\x00")).apply(&body).into_owned();
        prop_assert!(!contains(&rest, s.key.as_bytes()), "key left in {:?}", String::from_utf8_lossy(&rest));
        prop_assert!(!contains(&rest, s.authority().as_bytes()), "address left in {:?}", String::from_utf8_lossy(&rest));
        // Streaming in any chunking is the whole-buffer result.
        prop_assert_eq!(stream_through(&real, &body, &cuts), whole);
    }

    #[test]
    fn fuzz_leak_guard_arbitrary_rules(
        rules in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..6), proptest::collection::vec(any::<u8>(), 0..6)), 0..5),
        data in proptest::collection::vec(any::<u8>(), 0..256),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let r = Redactor::new(rules.iter().map(|(p, rep)| (p.clone(), Bytes::from(rep.clone()))));
        let whole = r.apply(&data).into_owned();
        let streamed = stream_through(&r, &data, &cuts);
        // Same bytes emitted whatever the chunking, for any rule set: rules that overlap each
        // other can legitimately resolve differently across a chunk boundary, so only the
        // length budget and "no panic" are universal here.
        prop_assert!(streamed.len() <= data.len() * 6 + 6 && whole.len() <= data.len() * 6 + 6);
        // No rule matched: untouched.
        if rules.iter().all(|(p, _)| p.is_empty() || !contains(&data, p)) {
            prop_assert_eq!(&whole, &data);
            prop_assert_eq!(&streamed, &data);
        }
    }
}
