//! Reading just enough of each downstream frame to resume correctly.
//!
//! Frames are forwarded byte for byte; nestor only peeks at a few fields (borrowed, with a
//! scanner that skips what it does not need ([`peek`]), or serde_json when the scanner is
//! unsure) to keep its resume cursor:
//! * events socket (`/sockets/events/{id}`): every frame is one event JSON with `id`,
//!   `timestamp` (naive local ISO text) and `kind` (`key` for state updates);
//! * session socket (`/sockets/session/{id}`): envelopes with a `type` (`sync`, `durable`
//!   with `seq`, `transient`, `item_started`/`delta`/`item_aborted` with `item_id`, `error`).

mod peek;

use std::borrow::Cow;

use serde::Deserialize;

use peek::Peek;

/// Event kinds the agent-server publishes without persisting them. They are never part of a
/// resume position (a `since` replay does not repeat them).
const TRANSIENT_KINDS: &[&str] = &["StreamingDeltaEvent", "LLMCompletionLogEvent", "ServerErrorEvent"];

/// What the proxy needs of an events-socket frame: borrowed from the frame's text (a
/// field is only copied when JSON escapes in it had to be decoded), so peeking at a frame
/// allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventHead<'a> {
    pub id: Cow<'a, str>,
    pub timestamp: Option<Cow<'a, str>>,
    /// Persisted in the conversation's log (so a `since` replay can repeat it).
    pub persisted: bool,
    /// A `ConversationStateUpdateEvent` carrying the whole state (`key == "full_state"`).
    pub full_state: bool,
    /// A `ConversationStateUpdateEvent` other than the full-state snapshot.
    pub state_update: bool,
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    timestamp: Option<Cow<'a, str>>,
    #[serde(borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    key: Option<Cow<'a, str>>,
}

/// The kind of the state-update events nestor watches (to keep a conversation's status).
pub const STATE_UPDATE_KIND: &str = "ConversationStateUpdateEvent";

/// Peek at an events-socket frame. None when it is not an event with an id (it is then
/// forwarded without bookkeeping).
pub fn event_head(text: &str) -> Option<EventHead<'_>> {
    let (id, timestamp, kind, key) = match peek::fields(text, ["id", "timestamp", "kind", "key"]) {
        Peek::Found([id, timestamp, kind, key]) => (Cow::Borrowed(id.as_str()?), timestamp.as_str().map(Cow::Borrowed), kind.as_str(), key.as_str()),
        // Escapes and the like: read it properly.
        Peek::Unsure => {
            let raw: RawEvent<'_> = serde_json::from_str(text).ok()?;
            return head_of(raw.id?, raw.timestamp, raw.kind.as_deref().unwrap_or(""), raw.key.as_deref());
        }
    };
    head_of(id, timestamp, kind.unwrap_or(""), key)
}

fn head_of<'a>(id: Cow<'a, str>, timestamp: Option<Cow<'a, str>>, kind: &str, key: Option<&str>) -> Option<EventHead<'a>> {
    let is_update = kind == STATE_UPDATE_KIND;
    let full_state = is_update && key == Some("full_state");
    let persisted = !full_state && !TRANSIENT_KINDS.contains(&kind);
    Some(EventHead { id, timestamp, persisted, full_state, state_update: is_update && !full_state })
}

/// A session-socket envelope, as far as the proxy reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionFrame {
    /// `through_seq`: highest seq on disk at subscribe time (None: empty log).
    Sync { through_seq: Option<i64> },
    Durable { seq: i64 },
    Transient,
    ItemStarted { item_id: String, attempt: i64 },
    ItemEnded { item_id: String },
    Delta,
    Error,
    Other,
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    seq: Option<i64>,
    through_seq: Option<i64>,
    attempt: Option<i64>,
    #[serde(borrow)]
    item_id: Option<Cow<'a, str>>,
}

/// Peek at a session-socket frame.
pub fn session_frame(text: &str) -> SessionFrame {
    let Ok(raw) = serde_json::from_str::<RawEnvelope<'_>>(text) else { return SessionFrame::Other };
    match raw.kind.as_deref() {
        Some("sync") => SessionFrame::Sync { through_seq: raw.through_seq },
        Some("durable") => match raw.seq {
            Some(seq) => SessionFrame::Durable { seq },
            None => SessionFrame::Other,
        },
        Some("transient") => SessionFrame::Transient,
        Some("item_started") => match raw.item_id {
            Some(i) => SessionFrame::ItemStarted { item_id: i.into_owned(), attempt: raw.attempt.unwrap_or(1) },
            None => SessionFrame::Other,
        },
        Some("item_aborted") => match raw.item_id {
            Some(i) => SessionFrame::ItemEnded { item_id: i.into_owned() },
            None => SessionFrame::Other,
        },
        Some("delta") => SessionFrame::Delta,
        Some("error") => SessionFrame::Error,
        _ => SessionFrame::Other,
    }
}

/// The durable event's id inside a `durable` envelope (it closes a streamed item of the
/// same id).
pub fn durable_event_id(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Env<'a> {
        #[serde(borrow)]
        event: Option<Inner<'a>>,
    }
    #[derive(Deserialize)]
    struct Inner<'a> {
        #[serde(borrow)]
        id: Option<Cow<'a, str>>,
    }
    serde_json::from_str::<Env<'_>>(text).ok()?.event?.id.map(|s| s.into_owned())
}

/// The key of a first-message auth frame, checked as the agent-server does: a JSON object
/// with `"type": "auth"` and a non-empty string `session_api_key` (other fields are
/// allowed in the first frame). None: not an acceptable auth frame (close 4001).
pub fn first_frame_auth_key(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let obj = v.as_object()?;
    if obj.get("type").and_then(|t| t.as_str()) != Some("auth") {
        return None;
    }
    obj.get("session_api_key").and_then(|k| k.as_str()).filter(|k| !k.is_empty()).map(str::to_owned)
}

/// Is this client frame the first-message auth frame (`{"type":"auth","session_api_key":…}`
/// and nothing else)? Such frames are never forwarded: nestor authenticated the client,
/// and the downstream is authenticated with its own key.
pub fn client_auth_frame(text: &str) -> Option<Option<String>> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let obj = v.as_object()?;
    if obj.get("type").and_then(|t| t.as_str()) != Some("auth") {
        return None;
    }
    if obj.keys().any(|k| k != "type" && k != "session_api_key") {
        return None;
    }
    Some(obj.get("session_api_key").and_then(|k| k.as_str()).map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_events() {
        let h = event_head(r#"{"id":"a","timestamp":"2026-11-22T14:42:27.674188","source":"environment","key":"full_state","value":{"x":1},"kind":"ConversationStateUpdateEvent"}"#).unwrap();
        assert!(h.full_state && !h.persisted);
        let h = event_head(r#"{"id":"b","timestamp":"t","kind":"ConversationStateUpdateEvent","key":"stats","value":{}}"#).unwrap();
        assert!(!h.full_state && h.persisted);
        let h = event_head(r#"{"id":"c","timestamp":"t","source":"agent","content":"","kind":"StreamingDeltaEvent"}"#).unwrap();
        assert!(!h.persisted);
        assert!(event_head("not json").is_none());
        assert!(event_head(r#"{"kind":"X"}"#).is_none());
    }

    #[test]
    fn reads_envelopes() {
        assert_eq!(session_frame(r#"{"type":"sync","from_seq":-1}"#), SessionFrame::Sync { through_seq: None });
        assert_eq!(session_frame(r#"{"type":"sync","from_seq":3,"through_seq":9}"#), SessionFrame::Sync { through_seq: Some(9) });
        assert_eq!(session_frame(r#"{"type":"durable","seq":7,"event":{"id":"x"}}"#), SessionFrame::Durable { seq: 7 });
        assert_eq!(durable_event_id(r#"{"type":"durable","seq":7,"event":{"id":"x"}}"#).as_deref(), Some("x"));
        assert_eq!(
            session_frame(r#"{"type":"item_started","item_id":"i","attempt":1,"anchor_seq":4}"#),
            SessionFrame::ItemStarted { item_id: "i".into(), attempt: 1 }
        );
        assert_eq!(session_frame(r#"{"type":"delta","item_id":"i","kind":"text"}"#), SessionFrame::Delta);
        assert_eq!(session_frame("garbage"), SessionFrame::Other);
    }

    #[test]
    fn first_frame_auth_is_checked_like_the_agent_server() {
        assert_eq!(first_frame_auth_key(r#"{"type":"auth","session_api_key":"k"}"#).as_deref(), Some("k"));
        // The agent-server only looks at `type` and `session_api_key` of the first frame.
        assert_eq!(first_frame_auth_key(r#"{"type":"auth","session_api_key":"k","v":2}"#).as_deref(), Some("k"));
        for bad in [r#"{"type":"auth","session_api_key":""}"#, r#"{"type":"auth","session_api_key":7}"#, r#"{"type":"auth"}"#,
            r#"{"type":"Auth","session_api_key":"k"}"#, r#"["auth","k"]"#, "not json", r#""k""#]
        {
            assert_eq!(first_frame_auth_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn recognises_auth_frames_only() {
        assert_eq!(client_auth_frame(r#"{"type":"auth","session_api_key":"k"}"#), Some(Some("k".into())));
        assert_eq!(client_auth_frame(r#"{"type":"auth"}"#), Some(None));
        assert_eq!(client_auth_frame(r#"{"type":"auth","session_api_key":"k","x":1}"#), None);
        assert_eq!(client_auth_frame(r#"{"role":"user","content":[]}"#), None);
        assert_eq!(client_auth_frame("[1]"), None);
    }

    #[test]
    fn classifies_every_captured_frame() {
        // The captured real runs: every events-socket frame has an id, and exactly the
        // full_state snapshots and token deltas are transient.
        for f in ["events-socket-plain.json", "events-socket-streaming.json", "events-socket-resend-all-while-running.json"] {
            let path = format!("{}/../../tests/fixtures/frames/{f}", env!("CARGO_MANIFEST_DIR"));
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            let frames: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
            for fr in frames {
                let s = fr["frame"].to_string();
                let h = event_head(&s).expect("every event has an id");
                let kind = fr["frame"]["kind"].as_str().unwrap();
                let transient = kind == "StreamingDeltaEvent" || fr["frame"]["key"] == "full_state";
                assert_eq!(h.persisted, !transient, "{s}");
            }
        }
    }
}
