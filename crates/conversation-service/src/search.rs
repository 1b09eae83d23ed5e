//! The merged search: one sorted, paged list over conversations held by many downstreams.
//!
//! A downstream's own `next_page_id` only means something on that downstream, so nestor
//! pages its catalog itself. Items are totally ordered by `(timestamp, id)` (ties on the
//! timestamp broken by id, so the order is deterministic), and a page token encodes the
//! position of the first item of the next page — not an index. A page therefore never
//! repeats or skips an item because another conversation was created or deleted between
//! two requests. An unknown or foreign token restarts from the top, like the agent-server.
//!
//! This module is pure (no I/O) so it can be property-tested: paging through any catalog
//! with any page size yields exactly the sorted union.

use std::sync::Arc;

use base64::Engine;
use nestor_core::ConversationId;
use serde_json::Value;

use crate::query::SortOrder;

/// What the search needs to know about one conversation.
#[derive(Debug, Clone)]
pub struct SearchItem {
    pub id: ConversationId,
    /// `created_at` / `updated_at` as nanoseconds since the epoch (UTC).
    pub created: i128,
    pub updated: i128,
    pub status: Option<String>,
    pub info: Arc<Value>,
}

impl SearchItem {
    /// Build from a `ConversationInfo` document.
    pub fn from_info(id: ConversationId, info: Arc<Value>) -> Self {
        let ts = |k: &str| info.get(k).and_then(Value::as_str).map(parse_timestamp).unwrap_or(i128::MIN);
        Self {
            id,
            created: ts("created_at"),
            updated: ts("updated_at"),
            status: info.get("execution_status").and_then(Value::as_str).map(str::to_owned),
            info,
        }
    }

    fn key(&self, order: SortOrder) -> i128 {
        if order.by_updated() {
            self.updated
        } else {
            self.created
        }
    }
}

/// Parse an ISO-8601 timestamp (`…Z`, an offset, or naive = UTC) to epoch nanoseconds.
pub fn parse_timestamp(s: &str) -> i128 {
    use time::format_description::well_known::Iso8601;
    if let Ok(t) = time::OffsetDateTime::parse(s, &Iso8601::DEFAULT) {
        return t.unix_timestamp_nanos();
    }
    if let Ok(t) = time::PrimitiveDateTime::parse(s, &Iso8601::DEFAULT) {
        return t.assume_utc().unix_timestamp_nanos();
    }
    i128::MIN
}

/// A position in one sort order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageToken {
    pub order: SortOrder,
    pub key: i128,
    pub id: ConversationId,
}

const TOKEN_VERSION: &str = "n1";

impl PageToken {
    pub fn encode(&self) -> String {
        let raw = format!("{TOKEN_VERSION}:{}:{}:{}", self.order.as_str(), self.key, self.id.hex());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    /// None for anything that is not a token nestor made.
    pub fn decode(s: &str) -> Option<Self> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let mut parts = raw.splitn(4, ':');
        if parts.next()? != TOKEN_VERSION {
            return None;
        }
        let order = SortOrder::parse(parts.next()?)?;
        let key = parts.next()?.parse().ok()?;
        let id = ConversationId::parse(parts.next()?).ok()?;
        Some(Self { order, key, id })
    }
}

/// Compare two items in `order`: `Less` means `a` comes first.
fn cmp_in(order: SortOrder, a: (i128, ConversationId), b: (i128, ConversationId)) -> std::cmp::Ordering {
    let c = a.cmp(&b);
    if order.descending() {
        c.reverse()
    } else {
        c
    }
}

/// One page of results.
#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<SearchItem>,
    pub next_page_id: Option<String>,
}

/// Filter, sort and cut one page out of `items` (any order, any source).
pub fn page(
    items: impl IntoIterator<Item = SearchItem>,
    status: Option<&str>,
    order: SortOrder,
    page_id: Option<&str>,
    limit: usize,
) -> Page {
    let mut all: Vec<SearchItem> = items
        .into_iter()
        .filter(|i| status.is_none_or(|s| i.status.as_deref() == Some(s)))
        .collect();
    all.sort_by(|a, b| cmp_in(order, (a.key(order), a.id), (b.key(order), b.id)));
    let start = page_id
        .and_then(PageToken::decode)
        .filter(|t| t.order == order)
        .map(|t| all.partition_point(|i| cmp_in(order, (i.key(order), i.id), (t.key, t.id)).is_lt()))
        .unwrap_or(0);
    let limit = limit.max(1);
    let end = (start + limit).min(all.len());
    let next_page_id = all.get(end).map(|n| PageToken { order, key: n.key(order), id: n.id }.encode());
    let items = all.drain(start..end).collect();
    Page { items, next_page_id }
}

/// Count items with `status` (all when None).
pub fn count<'a>(items: impl IntoIterator<Item = &'a SearchItem>, status: Option<&str>) -> usize {
    items.into_iter().filter(|i| status.is_none_or(|s| i.status.as_deref() == Some(s))).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn item(n: u128, created: i128, updated: i128, status: &str) -> SearchItem {
        SearchItem {
            id: ConversationId::from_uuid(uuid::Uuid::from_u128(n)),
            created,
            updated,
            status: Some(status.into()),
            info: Arc::new(Value::Null),
        }
    }

    #[test]
    fn parses_agent_server_timestamps() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:01Z"), 1_000_000_000);
        assert_eq!(parse_timestamp("1970-01-01T00:00:01.5"), 1_500_000_000);
        assert_eq!(parse_timestamp("2026-11-25T18:56:14.488216Z") % 1_000_000_000, 488_216_000);
        assert_eq!(parse_timestamp("garbage"), i128::MIN);
    }

    #[test]
    fn token_round_trip_and_garbage() {
        let t = PageToken { order: SortOrder::UpdatedAtDesc, key: -5, id: ConversationId::new_random() };
        assert_eq!(PageToken::decode(&t.encode()), Some(t));
        assert_eq!(PageToken::decode("zzz"), None);
        assert_eq!(PageToken::decode(&ConversationId::new_random().hex()), None);
    }

    #[test]
    fn foreign_token_restarts_from_top() {
        let items = vec![item(1, 1, 1, "idle"), item(2, 2, 2, "idle")];
        let p = page(items.clone(), None, SortOrder::CreatedAt, None, 1);
        let tok = p.next_page_id.unwrap();
        let p2 = page(items, None, SortOrder::CreatedAtDesc, Some(&tok), 1);
        assert_eq!(p2.items[0].id, ConversationId::from_uuid(uuid::Uuid::from_u128(2)));
    }

    #[test]
    fn position_survives_deletion_and_insertion() {
        let mut items: Vec<_> = (1..=5).map(|n| item(n, n as i128 * 10, 0, "idle")).collect();
        let p1 = page(items.clone(), None, SortOrder::CreatedAt, None, 2);
        assert_eq!(p1.items.len(), 2);
        // Delete the item the token points at, and add one before the cursor.
        items.retain(|i| i.created != 30);
        items.push(item(9, 5, 0, "idle"));
        let p2 = page(items, None, SortOrder::CreatedAt, p1.next_page_id.as_deref(), 10);
        let created: Vec<i128> = p2.items.iter().map(|i| i.created).collect();
        assert_eq!(created, vec![40, 50]);
    }

    fn arb_items() -> impl Strategy<Value = Vec<SearchItem>> {
        proptest::collection::vec((any::<u16>(), 0i128..20, 0i128..20, 0usize..3), 0..60).prop_map(|v| {
            let mut seen = HashSet::new();
            v.into_iter()
                .filter(|(id, ..)| seen.insert(*id))
                .map(|(id, c, u, s)| item(id as u128, c, u, ["idle", "running", "finished"][s]))
                .collect()
        })
    }

    fn arb_order() -> impl Strategy<Value = SortOrder> {
        prop_oneof![
            Just(SortOrder::CreatedAt),
            Just(SortOrder::UpdatedAt),
            Just(SortOrder::CreatedAtDesc),
            Just(SortOrder::UpdatedAtDesc)
        ]
    }

    proptest! {
        /// Paging through the merged search returns exactly the sorted union: nothing lost,
        /// nothing repeated, in order, for any page size, sort order and status filter —
        /// whatever the downstreams the items came from (split into shards here).
        #[test]
        fn paging_yields_the_sorted_union(
            items in arb_items(),
            shards in 1usize..5,
            limit in 1usize..12,
            order in arb_order(),
            status in proptest::option::of(prop_oneof![Just("idle"), Just("running"), Just("finished")]),
        ) {
            // Items arrive from several downstreams, each in its own order.
            let mut merged: Vec<SearchItem> = Vec::new();
            for s in 0..shards {
                let mut shard: Vec<SearchItem> = items.iter().enumerate()
                    .filter(|(i, _)| i % shards == s).map(|(_, x)| x.clone()).collect();
                shard.reverse();
                merged.extend(shard);
            }
            let mut expected: Vec<SearchItem> = items.iter()
                .filter(|i| status.is_none_or(|s| i.status.as_deref() == Some(s)))
                .cloned().collect();
            expected.sort_by(|a, b| cmp_in(order, (a.key(order), a.id), (b.key(order), b.id)));

            let mut got = Vec::new();
            let mut token: Option<String> = None;
            for _ in 0..=items.len() + 1 {
                let p = page(merged.clone(), status, order, token.as_deref(), limit);
                prop_assert!(p.items.len() <= limit);
                got.extend(p.items.into_iter().map(|i| i.id));
                token = p.next_page_id;
                if token.is_none() { break; }
            }
            prop_assert!(token.is_none(), "paging did not terminate");
            let want: Vec<ConversationId> = expected.iter().map(|i| i.id).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(count(&merged, status), expected.len());
        }
    }
}
