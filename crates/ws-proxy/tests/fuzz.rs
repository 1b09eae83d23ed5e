//! Fuzzing (proptest at scale) of the WebSocket frame peeking in `classify.rs`: every text
//! frame a downstream or a client sends passes through one of these functions, so none may
//! panic on any input, and what they report must agree with the frame.
//!
//! * CI smoke run: the default case count (a few seconds in a debug build).
//! * Long run: `NESTOR_FUZZ_CASES=1000000 cargo test --release -p nestor-ws-proxy --test fuzz`
//!   (docs/reliability.md).
//!
//! Inputs are arbitrary text (including invalid JSON and lossy-decoded arbitrary bytes) and
//! structured frames: events with random ids, timestamps, kinds, extra fields of any JSON
//! value; session envelopes with random types and fields; auth frames with extra fields.
//! Invariants:
//! * `event_head` answers `Some` exactly for JSON objects with a string `id` (and string or
//!   absent `timestamp`/`kind`/`key`), with that id; a `full_state` frame is never
//!   "persisted"; transient kinds are never "persisted".
//! * `session_frame` reports the envelope's `type`, `seq`, `item_id` as sent.
//! * `durable_event_id` is the `event.id` of the frame.
//! * `client_auth_frame` = `Some(k)` only for `{"type":"auth"}` objects with no other field
//!   than `session_api_key`; then `first_frame_auth_key` agrees when the key is non-empty.

use nestor_ws_proxy::classify::{client_auth_frame, durable_event_id, event_head, first_frame_auth_key, session_frame, SessionFrame};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

fn config(smoke: u32) -> ProptestConfig {
    let cases = std::env::var("NESTOR_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(smoke);
    ProptestConfig { cases, max_shrink_iters: 10_000, failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"))), ..ProptestConfig::default() }
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{0,8}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Text: arbitrary strings, lossy bytes, JSON-ish noise, any JSON value.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        "[{}\\[\\]\":,a-z0-9 \\\\]{0,48}",
        json_value().prop_map(|v| v.to_string()),
    ]
}

const KINDS: &[&str] = &[
    "MessageEvent",
    "ActionEvent",
    "ObservationEvent",
    "ConversationStateUpdateEvent",
    "StreamingDeltaEvent",
    "LLMCompletionLogEvent",
    "ServerErrorEvent",
    "",
];

/// A field value that is a string, or sometimes another JSON type (which must not be read
/// as a string), or absent.
fn maybe_str(s: impl Strategy<Value = String>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        3 => s.prop_map(|s| Some(Value::String(s))),
        1 => Just(None),
        1 => json_value().prop_map(Some),
    ]
}

fn event_frame() -> impl Strategy<Value = Map<String, Value>> {
    (
        maybe_str(any::<String>()),
        maybe_str("20[0-9]{2}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-5][0-9]\\.[0-9]{6}"),
        maybe_str(proptest::sample::select(KINDS).prop_map(str::to_owned)),
        maybe_str(prop_oneof![Just("full_state".to_owned()), "[a-z_]{0,10}"]),
        proptest::collection::btree_map("[a-z_]{1,8}", json_value(), 0..4),
    )
        .prop_map(|(id, ts, kind, key, extra)| {
            let mut m: Map<String, Value> = extra.into_iter().filter(|(k, _)| !matches!(k.as_str(), "id" | "timestamp" | "kind" | "key")).collect();
            for (k, v) in [("id", id), ("timestamp", ts), ("kind", kind), ("key", key)] {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            }
            m
        })
}

fn envelope() -> impl Strategy<Value = Map<String, Value>> {
    (
        maybe_str(proptest::sample::select(&["sync", "durable", "transient", "item_started", "item_aborted", "delta", "error", "other"][..]).prop_map(str::to_owned)),
        proptest::option::of(prop_oneof![any::<i64>().prop_map(|n| json!(n)), json_value()]),
        proptest::option::of(any::<i64>()),
        maybe_str("[a-z0-9-]{0,12}"),
        proptest::option::of(json_value()),
    )
        .prop_map(|(ty, seq, attempt, item_id, event)| {
            let mut m = Map::new();
            if let Some(t) = ty {
                m.insert("type".into(), t);
            }
            if let Some(s) = seq {
                m.insert("seq".into(), s.clone());
                m.insert("through_seq".into(), s);
            }
            if let Some(a) = attempt {
                m.insert("attempt".into(), json!(a));
            }
            if let Some(i) = item_id {
                m.insert("item_id".into(), i);
            }
            if let Some(e) = event {
                m.insert("event".into(), e);
            }
            m
        })
}

fn str_field<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

proptest! {
    #![proptest_config(config(1500))]

    #[test]
    fn fuzz_frames_arbitrary_text_never_panics(t in text()) {
        let _ = event_head(&t);
        let _ = session_frame(&t);
        let _ = durable_event_id(&t);
        let a = first_frame_auth_key(&t);
        if let Some(Some(k)) = client_auth_frame(&t) {
            if !k.is_empty() {
                prop_assert_eq!(a, Some(k));
            }
        }
    }

    #[test]
    fn fuzz_event_head(m in event_frame()) {
        let text = Value::Object(m.clone()).to_string();
        let head = event_head(&text);
        // The peek reads id/timestamp/kind/key as strings: any other JSON type there makes
        // the frame "not an event with an id" (forwarded without bookkeeping).
        let typed = ["timestamp", "kind", "key"].iter().all(|k| m.get(*k).is_none_or(|v| v.is_string() || v.is_null()));
        match (str_field(&m, "id"), head) {
            (Some(id), Some(h)) => {
                prop_assert!(typed);
                prop_assert_eq!(&*h.id, id);
                prop_assert_eq!(h.timestamp.as_deref(), str_field(&m, "timestamp"));
                let kind = str_field(&m, "kind").unwrap_or("");
                let full = kind == "ConversationStateUpdateEvent" && str_field(&m, "key") == Some("full_state");
                prop_assert_eq!(h.full_state, full);
                prop_assert_eq!(h.state_update, kind == "ConversationStateUpdateEvent" && !full);
                if full || matches!(kind, "StreamingDeltaEvent" | "LLMCompletionLogEvent" | "ServerErrorEvent") {
                    prop_assert!(!h.persisted);
                } else {
                    prop_assert!(h.persisted);
                }
            }
            (Some(_), None) => prop_assert!(!typed, "an event with a string id was not recognised: {}", text),
            (None, Some(h)) => prop_assert!(false, "no string id, yet {:?}", h),
            (None, None) => {}
        }
    }

    #[test]
    fn fuzz_session_frame(m in envelope()) {
        let text = Value::Object(m.clone()).to_string();
        let f = session_frame(&text);
        let ints_ok = ["seq", "through_seq", "attempt"].iter().all(|k| m.get(*k).is_none_or(|v| v.is_i64() || v.is_null()));
        let strs_ok = ["type", "item_id"].iter().all(|k| m.get(*k).is_none_or(|v| v.is_string() || v.is_null()));
        if !(ints_ok && strs_ok) {
            prop_assert_eq!(f, SessionFrame::Other);
            return Ok(());
        }
        let seq = m.get("seq").and_then(Value::as_i64);
        let item = str_field(&m, "item_id").map(str::to_owned);
        let expected = match str_field(&m, "type") {
            Some("sync") => SessionFrame::Sync { through_seq: m.get("through_seq").and_then(Value::as_i64) },
            Some("durable") => seq.map(|seq| SessionFrame::Durable { seq }).unwrap_or(SessionFrame::Other),
            Some("transient") => SessionFrame::Transient,
            Some("item_started") => item.map(|item_id| SessionFrame::ItemStarted { item_id, attempt: m.get("attempt").and_then(Value::as_i64).unwrap_or(1) }).unwrap_or(SessionFrame::Other),
            Some("item_aborted") => item.map(|item_id| SessionFrame::ItemEnded { item_id }).unwrap_or(SessionFrame::Other),
            Some("delta") => SessionFrame::Delta,
            Some("error") => SessionFrame::Error,
            _ => SessionFrame::Other,
        };
        prop_assert_eq!(f, expected);
        // `event` as an object (what downstreams send). serde's derive also reads a struct
        // from a JSON array (`"event": ["x"]` gives id "x"): harmless for frames no
        // downstream sends, so arrays are not judged here.
        if !m.get("event").is_some_and(Value::is_array) {
            let ev_id = m.get("event").and_then(|e| e.get("id")).and_then(Value::as_str);
            let got = durable_event_id(&text);
            prop_assert_eq!(got.as_deref(), ev_id, "{}", text);
        }
    }

    #[test]
    fn fuzz_auth_frames(
        ty in maybe_str(prop_oneof![Just("auth".to_owned()), Just("Auth".to_owned()), "[a-z]{0,5}"]),
        key in maybe_str(any::<String>()),
        extra in proptest::collection::btree_map("[a-z_]{1,16}", json_value(), 0..3),
    ) {
        let mut m: Map<String, Value> = extra.into_iter().filter(|(k, _)| k != "type" && k != "session_api_key").collect();
        let has_extra = !m.is_empty();
        if let Some(t) = ty.clone() { m.insert("type".into(), t); }
        if let Some(k) = key.clone() { m.insert("session_api_key".into(), k); }
        let text = Value::Object(m).to_string();
        let is_auth = ty.as_ref().and_then(Value::as_str) == Some("auth");
        let k = key.as_ref().and_then(Value::as_str).map(str::to_owned);
        prop_assert_eq!(first_frame_auth_key(&text), if is_auth { k.clone().filter(|k| !k.is_empty()) } else { None });
        prop_assert_eq!(client_auth_frame(&text), if is_auth && !has_extra { Some(k) } else { None });
    }
}
