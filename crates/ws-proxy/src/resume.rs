//! Resume bookkeeping: where to pick up after the downstream connection was lost, and
//! which replayed frames the client has already seen.
//!
//! **Session socket** (`after_seq`): exact. Every persisted event has a sequence number;
//! nestor remembers the last one it delivered and reconnects with `after_seq=<it>` (or, if
//! none was delivered yet, the client's own `after_seq`, or the `through_seq` of the first
//! `sync`, which is where a live-only subscription began). Anything at or below the cursor is
//! dropped. The reconnection's `sync` is hidden (the client already had one), and streamed
//! items left open by the loss are closed with `item_aborted`.
//!
//! **Events socket** (`resend_mode=since&after_timestamp=`): inclusive and timestamp based,
//! and live events may interleave with (and repeat) the replay. nestor therefore
//! (1) remembers the id of every persisted event it delivered on this client socket, and
//! (2) reconnects asking for *at least* everything the client could be missing: the
//! client's own history request (`all`, or `since` its timestamp) if it made one, else
//! everything since a little before the first frame of the first connection. Replayed
//! events already delivered are dropped by id. The cost is replaying some history to nestor
//! after a loss (rare); the gain is exactly-once delivery whatever the timestamps do
//! (equal, or out of delivery order, both seen on real servers).

use std::collections::HashSet;

use crate::classify::{EventHead, SessionFrame};

/// What to do with a frame from the downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    Drop,
}

/// The client's own history request on the events socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum History {
    /// Live events only.
    None,
    /// `resend_mode=all` (or the deprecated `resend_all=true`).
    All,
    /// `resend_mode=since&after_timestamp=<t>`.
    Since(String),
}

/// How far before the first frame of a live-only subscription a resume looks back, to
/// catch events stamped just before the subscription but published after it.
pub const LIVE_LOOKBACK: time::Duration = time::Duration::seconds(5);

/// The set of event ids delivered: UUIDs as their 128 bits (compact), anything else as text.
#[derive(Debug, Clone, Default)]
struct IdSet {
    uuids: HashSet<u128>,
    other: HashSet<String>,
}

impl IdSet {
    /// Insert; false if it was already there.
    fn insert(&mut self, id: &str) -> bool {
        match parse_uuid(id) {
            Some(u) => self.uuids.insert(u),
            None => self.other.insert(id.to_owned()),
        }
    }

    fn len(&self) -> usize {
        self.uuids.len() + self.other.len()
    }
}

/// The 128 bits of a dashed UUID.
fn parse_uuid(s: &str) -> Option<u128> {
    let b = s.as_bytes();
    if b.len() != 36 || b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
        return None;
    }
    let mut v: u128 = 0;
    for (i, c) in b.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        v = v << 4 | (*c as char).to_digit(16)? as u128;
    }
    Some(v)
}

/// Events-socket cursor.
#[derive(Debug, Clone)]
pub struct EventsCursor {
    history: History,
    delivered: IdSet,
    /// Timestamp of the first frame of the first connection (live-only resume anchor).
    first_seen: Option<String>,
}

impl EventsCursor {
    pub fn new(history: History) -> Self {
        Self { history, delivered: IdSet::default(), first_seen: None }
    }

    /// Decide on one downstream frame (None head: not an event, forward as is).
    pub fn on_frame(&mut self, head: Option<&EventHead>) -> Verdict {
        let Some(h) = head else { return Verdict::Forward };
        if self.first_seen.is_none() {
            if let Some(ts) = &h.timestamp {
                self.first_seen = Some(ts.clone());
            }
        }
        if !h.persisted {
            return Verdict::Forward;
        }
        if self.delivered.insert(&h.id) {
            Verdict::Forward
        } else {
            Verdict::Drop
        }
    }

    /// Persisted events delivered so far.
    pub fn delivered(&self) -> usize {
        self.delivered.len()
    }

    /// The history to ask for when reconnecting: the client's own request, widened to cover
    /// live events of the first connection (stamped from a little before its first frame).
    /// With no frame seen at all there is no safe anchor: ask for everything.
    pub fn resume_history(&self) -> History {
        let live_anchor = self
            .first_seen
            .as_ref()
            .map(|ts| shift_naive(ts, -LIVE_LOOKBACK).unwrap_or_else(|| ts.clone()));
        match (&self.history, live_anchor) {
            (History::All, _) | (_, None) => History::All,
            (History::Since(t), Some(a)) => History::Since(if a < *t { a } else { t.clone() }),
            (History::None, Some(a)) => History::Since(a),
        }
    }
}

/// Shift a naive ISO timestamp (`YYYY-MM-DDTHH:MM:SS[.ffffff]`) by `d`, keeping the format.
pub fn shift_naive(ts: &str, d: time::Duration) -> Option<String> {
    use time::format_description::well_known::Iso8601;
    let t = time::PrimitiveDateTime::parse(ts, &Iso8601::DEFAULT).ok()?;
    let t = t.checked_add(d)?;
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]");
    t.format(&fmt).ok()
}

/// Session-socket cursor.
#[derive(Debug, Clone)]
pub struct SessionCursor {
    /// The client's `after_seq` (None: live only).
    initial: Option<i64>,
    last_seq: Option<i64>,
    /// `through_seq` of the first `sync` (where a live-only subscription began).
    first_through: Option<Option<i64>>,
    synced: bool,
    /// Streamed items started and not yet closed: (item_id, attempt).
    open_items: Vec<(String, i64)>,
}

impl SessionCursor {
    pub fn new(after_seq: Option<i64>) -> Self {
        Self { initial: after_seq, last_seq: None, first_through: None, synced: false, open_items: Vec::new() }
    }

    /// Decide on one downstream envelope (`durable_id`: the event id inside a `durable`).
    pub fn on_frame(&mut self, frame: &SessionFrame, durable_id: Option<&str>) -> Verdict {
        match frame {
            SessionFrame::Sync { through_seq } => {
                if self.synced {
                    return Verdict::Drop;
                }
                self.synced = true;
                self.first_through = Some(*through_seq);
                Verdict::Forward
            }
            SessionFrame::Durable { seq } => {
                let floor = self.last_seq.or(self.initial).or(match self.first_through {
                    Some(Some(t)) => Some(t),
                    _ => None,
                });
                if floor.is_some_and(|f| *seq <= f) {
                    return Verdict::Drop;
                }
                self.last_seq = Some(*seq);
                if let Some(id) = durable_id {
                    self.open_items.retain(|(i, _)| i != id);
                }
                Verdict::Forward
            }
            SessionFrame::ItemStarted { item_id, attempt } => {
                self.open_items.retain(|(i, _)| i != item_id);
                self.open_items.push((item_id.clone(), *attempt));
                Verdict::Forward
            }
            SessionFrame::ItemEnded { item_id } => {
                self.open_items.retain(|(i, _)| i != item_id);
                Verdict::Forward
            }
            _ => Verdict::Forward,
        }
    }

    /// `after_seq` for the reconnection.
    pub fn resume_after_seq(&self) -> i64 {
        if let Some(s) = self.last_seq {
            return s;
        }
        if let Some(a) = self.initial {
            return a;
        }
        match self.first_through {
            // Live-only: everything after what was on disk at the first subscription.
            Some(Some(t)) => t,
            // The log was empty then: everything.
            Some(None) | None => -1,
        }
    }

    /// Frames to send the client when the downstream is lost: close every open streamed
    /// item (it will never complete on this connection).
    pub fn abort_open_items(&mut self) -> Vec<String> {
        self.open_items
            .drain(..)
            .map(|(id, attempt)| {
                serde_json::json!({"type": "item_aborted", "item_id": id, "attempt": attempt, "reason": "downstream_reconnected"})
                    .to_string()
            })
            .collect()
    }

    pub fn last_seq(&self) -> Option<i64> {
        self.last_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ev(id: u32, ts: u32, persisted: bool) -> EventHead {
        EventHead {
            id: format!("00000000-0000-4000-8000-{id:012}"),
            timestamp: Some(format!("2026-01-01T00:00:{:02}.{:06}", ts / 1000, ts % 1000)),
            persisted,
            full_state: !persisted,
        }
    }

    #[test]
    fn shifts_naive_timestamps() {
        assert_eq!(shift_naive("2026-11-22T14:42:27.674188", time::Duration::seconds(-5)).unwrap(), "2026-11-22T14:42:22.674188");
        assert_eq!(shift_naive("2026-11-22T00:00:01", time::Duration::seconds(-5)).unwrap(), "2026-11-21T23:59:56.000000");
        assert!(shift_naive("nope", time::Duration::seconds(1)).is_none());
    }

    #[test]
    fn id_set_keeps_uuids_compact_and_others_verbatim() {
        let mut s = IdSet::default();
        assert!(s.insert("00000000-0000-4000-8000-000000000001"));
        assert!(!s.insert("00000000-0000-4000-8000-000000000001"));
        assert!(s.insert("not-a-uuid"));
        assert!(!s.insert("not-a-uuid"));
        assert_eq!(s.len(), 2);
        assert_eq!(parse_uuid("00000000-0000-0000-0000-0000000000ff"), Some(255));
        assert_eq!(parse_uuid("00000000-0000-0000-0000-0000000000fg"), None);
    }

    #[test]
    fn session_cursor_hides_second_sync_and_aborts_items() {
        let mut c = SessionCursor::new(None);
        assert_eq!(c.on_frame(&SessionFrame::Sync { through_seq: Some(3) }, None), Verdict::Forward);
        assert_eq!(c.resume_after_seq(), 3);
        assert_eq!(c.on_frame(&SessionFrame::ItemStarted { item_id: "i".into(), attempt: 2 }, None), Verdict::Forward);
        assert_eq!(c.on_frame(&SessionFrame::Durable { seq: 4 }, Some("other")), Verdict::Forward);
        let aborts = c.abort_open_items();
        assert_eq!(aborts.len(), 1);
        assert!(aborts[0].contains(r#""item_id":"i""#) && aborts[0].contains(r#""attempt":2"#));
        assert_eq!(c.on_frame(&SessionFrame::Sync { through_seq: Some(9) }, None), Verdict::Drop);
        assert_eq!(c.on_frame(&SessionFrame::Durable { seq: 4 }, None), Verdict::Drop);
        assert_eq!(c.on_frame(&SessionFrame::Durable { seq: 5 }, None), Verdict::Forward);
        assert_eq!(c.resume_after_seq(), 5);
    }

    #[test]
    fn events_cursor_uses_client_history_or_first_frame() {
        let c = EventsCursor::new(History::All);
        assert_eq!(c.resume_history(), History::All);
        let mut c = EventsCursor::new(History::None);
        assert_eq!(c.resume_history(), History::All);
        c.on_frame(Some(&ev(1, 10_000, false)));
        assert_eq!(c.resume_history(), History::Since("2026-01-01T00:00:05.000000".into()));
    }

    /// A model of one downstream conversation for the property test: a persisted log with
    /// timestamps that can tie or go backwards relative to publication order.
    #[derive(Debug, Clone)]
    struct Model {
        /// (id, ts) in log (seq) order.
        log: Vec<(u32, u32)>,
    }

    impl Model {
        /// Frames an events-socket subscription sees, given `history`, when it subscribes
        /// after `subscribed_at` events were persisted: full_state, then interleaved replay
        /// and live events (live ones may also repeat in the replay).
        fn events_frames(&self, history: &History, subscribed_at: usize, interleave: &[bool]) -> Vec<EventHead> {
            let ts_of = |t: u32| format!("2026-01-01T00:00:{:02}.{:06}", t / 1000, t % 1000);
            let anchor_ts = self.log.get(subscribed_at.saturating_sub(1)).map(|e| e.1).unwrap_or(0);
            let mut out = vec![ev(900_000 + subscribed_at as u32, anchor_ts, false)];
            let replay: Vec<(u32, u32)> = match history {
                History::None => vec![],
                History::All => self.log.clone(),
                History::Since(t) => self.log.iter().copied().filter(|e| ts_of(e.1) >= *t).collect(),
            };
            let live: Vec<(u32, u32)> = self.log[subscribed_at.min(self.log.len())..].to_vec();
            let (mut r, mut l) = (0, 0);
            let mut k = 0;
            while r < replay.len() || l < live.len() {
                let take_live = l < live.len() && (r >= replay.len() || interleave.get(k).copied().unwrap_or(false));
                k += 1;
                let e = if take_live { l += 1; live[l - 1] } else { r += 1; replay[r - 1] };
                out.push(ev(e.0, e.1, true));
            }
            out
        }
    }

    proptest! {
        /// Whatever the timestamps (ties, backwards steps), the client's history request,
        /// where the downstream connection drops (several times) and how live events
        /// interleave with the replay: the client receives every persisted event exactly once.
        #[test]
        fn events_resume_is_exactly_once(
            steps in proptest::collection::vec(0u32..3, 1..40),
            backwards in proptest::collection::vec(any::<bool>(), 40),
            history_kind in 0u8..3,
            drops in proptest::collection::vec(0usize..60, 0..4),
            interleave in proptest::collection::vec(any::<bool>(), 0..120),
        ) {
            // Build a log whose timestamps mostly increase, sometimes tie or step back.
            let mut ts = 5_000u32;
            let log: Vec<(u32, u32)> = steps.iter().enumerate().map(|(i, s)| {
                if backwards[i] && ts > 3 { ts -= 2 } else { ts += s }
                (i as u32 + 1, ts)
            }).collect();
            let model = Model { log: log.clone() };
            let history = match history_kind {
                0 => History::None,
                1 => History::All,
                _ => History::Since("2026-01-01T00:00:05.000000".into()),
            };
            // The client's original request defines which events it must get.
            let ts_of = |t: u32| format!("2026-01-01T00:00:{:02}.{:06}", t / 1000, t % 1000);
            let mut cursor = EventsCursor::new(history.clone());
            let mut got: Vec<u32> = Vec::new();
            // Connection 1 subscribes when `sub` events exist; the rest are live.
            let sub = log.len() / 2;
            let must: Vec<u32> = match &history {
                History::None => log[sub..].iter().map(|e| e.0).collect(),
                History::All => log.iter().map(|e| e.0).collect(),
                History::Since(t) => {
                    let mut v: Vec<u32> = log.iter().filter(|e| ts_of(e.1) >= *t).map(|e| e.0).collect();
                    v.extend(log[sub..].iter().map(|e| e.0));
                    v.sort(); v.dedup(); v
                }
            };
            let mut frames = model.events_frames(&history, sub, &interleave);
            let mut drops = drops.clone();
            drops.sort();
            let mut delivered_frames = 0usize;
            loop {
                // Deliver until the next drop point (or the end).
                let cut = drops.first().copied().map(|d| d.saturating_sub(delivered_frames)).unwrap_or(usize::MAX);
                let mut dropped = false;
                for (i, f) in frames.iter().enumerate() {
                    if i >= cut { dropped = true; break; }
                    delivered_frames += 1;
                    if cursor.on_frame(Some(f)) == Verdict::Forward && f.persisted {
                        got.push(f.id[24..].parse().unwrap());
                    }
                }
                if !dropped { break; }
                drops.remove(0);
                // Reconnect: the downstream now has the whole log (live ones persisted while
                // we were away); nothing more is live.
                let h = cursor.resume_history();
                frames = model.events_frames(&h, log.len(), &[]);
            }
            let mut sorted = got.clone();
            sorted.sort();
            let before = sorted.len();
            sorted.dedup();
            prop_assert_eq!(before, sorted.len(), "duplicates delivered");
            for m in &must {
                prop_assert!(sorted.contains(m), "event {} lost", m);
            }
        }

        /// Session socket: any drop points, any client after_seq: durable seqs reach the
        /// client strictly increasing, without gaps after the first.
        #[test]
        fn session_resume_is_exact(n in 0i64..50, after in proptest::option::of(-1i64..20), drops in proptest::collection::vec(0i64..60, 0..4)) {
            let mut c = SessionCursor::new(after);
            let mut got = Vec::new();
            // First connection: sync, then history after `after` (or live from n/2).
            let start = after.map(|a| a + 1).unwrap_or(n / 2);
            let through = if n / 2 > 0 { Some(n / 2 - 1) } else { None };
            c.on_frame(&SessionFrame::Sync { through_seq: through }, None);
            let mut next = start.max(0);
            let mut drops = drops.clone();
            drops.sort();
            loop {
                let stop = drops.first().copied().unwrap_or(i64::MAX);
                while next < n && next < stop {
                    if c.on_frame(&SessionFrame::Durable { seq: next }, None) == Verdict::Forward { got.push(next); }
                    next += 1;
                }
                if next >= n || drops.is_empty() { break; }
                drops.remove(0);
                // Reconnect: sync (dropped), then everything after the cursor, plus a
                // repeat of the last frame or two (as a racing live event would).
                prop_assert_eq!(c.on_frame(&SessionFrame::Sync { through_seq: Some(n - 1) }, None), Verdict::Drop);
                next = (c.resume_after_seq() - 1).max(0);
            }
            for w in got.windows(2) { prop_assert_eq!(w[1], w[0] + 1); }
            if let Some(f) = got.first() { prop_assert_eq!(*f, start.max(0)); }
        }
    }
}
