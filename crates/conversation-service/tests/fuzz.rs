//! Fuzzing (proptest at scale) of the catalog routes' query parsing: every
//! `GET /api/conversations/search|count` and `GET /api/conversations?ids=…` query string,
//! and every `page_id` a client sends back, is untrusted text parsed here.
//!
//! * CI smoke run: the default case count (a few seconds in a debug build).
//! * Long run: `NESTOR_FUZZ_CASES=1000000 cargo test --release -p nestor-conversation-service --test fuzz`
//!   (docs/reliability.md).
//!
//! Invariants:
//! * `QueryParams::parse` never panics; it is the inverse of form encoding (pairs encoded
//!   with `form_urlencoded` parse back to the same pairs, in order); `last` is the last
//!   value of a repeated name, `all` every value in order.
//! * `SearchQuery::parse` accepts exactly: `limit` an integer in 1..=100 (surrounding
//!   spaces allowed), `status` one of the statuses, `sort_order` one of the orders,
//!   `include_skills` a lax bool — judged by the last value of each; otherwise one error per
//!   bad parameter, each located at `["query", <name>]`.
//! * `BatchQuery::parse`: 1..=99 ids, each a UUID, else errors.
//! * Page tokens round-trip (`decode(encode(t)) == t`); `decode` never panics on any text;
//!   `page()` with any `page_id` returns at most `limit` items of the filtered set.
//! * `parse_timestamp` never panics.

use std::sync::Arc;

use nestor_conversation_service::query::{parse_bool, parse_count, STATUSES};
use nestor_conversation_service::search::{page, parse_timestamp};
use nestor_conversation_service::{BatchQuery, PageToken, QueryParams, SearchItem, SearchQuery, SortOrder};
use nestor_core::ConversationId;
use proptest::prelude::*;
use serde_json::json;
use uuid::Uuid;

fn config(smoke: u32) -> ProptestConfig {
    let cases = std::env::var("NESTOR_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(smoke);
    ProptestConfig { cases, max_shrink_iters: 10_000, failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"))), ..ProptestConfig::default() }
}

const NAMES: &[&str] = &["limit", "status", "sort_order", "include_skills", "page_id", "ids", "session_api_key", "x"];

/// A value for one of the parameters: plausible, near misses, or noise.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "-?[0-9]{1,4}",
        " ?[+-]?[0-9]{1,25} ?",
        proptest::sample::select(STATUSES).prop_map(str::to_owned),
        proptest::sample::select(SortOrder::NAMES).prop_map(str::to_owned),
        proptest::sample::select(&["true", "FALSE", "On", "no", "1", "0", "y", "maybe", ""][..]).prop_map(str::to_owned),
        any::<[u8; 16]>().prop_map(|b| Uuid::from_bytes(b).to_string()),
        any::<String>(),
    ]
}

fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec((prop_oneof![4 => proptest::sample::select(NAMES).prop_map(str::to_owned), 1 => any::<String>()], value()), 0..8)
}

fn encode(pairs: &[(String, String)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

fn last<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn item(n: u128, created: i64, updated: i64, status: Option<&str>) -> SearchItem {
    SearchItem {
        id: ConversationId::from_uuid(Uuid::from_u128(n)),
        created: created as i128,
        updated: updated as i128,
        status: status.map(str::to_owned),
        info: Arc::new(json!(null)),
    }
}

fn order() -> impl Strategy<Value = SortOrder> {
    proptest::sample::select(&[SortOrder::CreatedAt, SortOrder::UpdatedAt, SortOrder::CreatedAtDesc, SortOrder::UpdatedAtDesc][..])
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn fuzz_query_params_raw_text(raw in prop_oneof![any::<String>(), "[a-z_=&%0-9A-F+;]{0,64}"]) {
        let q = QueryParams::parse(Some(&raw));
        for (k, _) in q.pairs() {
            prop_assert!(q.last(k).is_some());
        }
        let _ = SearchQuery::parse(&q);
        let _ = BatchQuery::parse(&q);
        let _ = parse_count(&q);
    }

    #[test]
    fn fuzz_query_params_round_trip(p in pairs()) {
        let q = QueryParams::parse(Some(&encode(&p)));
        prop_assert_eq!(q.pairs(), &p[..]);
        for name in NAMES {
            prop_assert_eq!(q.last(name), last(&p, name));
            let all: Vec<&str> = q.all(name).collect();
            let expected: Vec<&str> = p.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect();
            prop_assert_eq!(all, expected);
        }
    }

    #[test]
    fn fuzz_search_query(p in pairs()) {
        let q = QueryParams::parse(Some(&encode(&p)));
        let limit_ok = last(&p, "limit").is_none_or(|v| v.trim().parse::<i64>().is_ok_and(|n| (1..=100).contains(&n)));
        let status_ok = last(&p, "status").is_none_or(|v| STATUSES.contains(&v));
        let order_ok = last(&p, "sort_order").is_none_or(|v| SortOrder::parse(v).is_some());
        let skills_ok = last(&p, "include_skills").is_none_or(|v| parse_bool(v).is_some());
        match SearchQuery::parse(&q) {
            Ok(s) => {
                prop_assert!(limit_ok && status_ok && order_ok && skills_ok);
                prop_assert!((1..=100).contains(&s.limit));
                prop_assert_eq!(s.status.as_deref(), last(&p, "status"));
                prop_assert_eq!(s.page_id.as_deref(), last(&p, "page_id"));
                prop_assert_eq!(s.sort_order, last(&p, "sort_order").and_then(SortOrder::parse).unwrap_or(SortOrder::CreatedAtDesc));
            }
            Err(errors) => {
                let bad = [!limit_ok, !status_ok, !order_ok, !skills_ok].iter().filter(|b| **b).count();
                prop_assert_eq!(errors.len(), bad);
                for e in &errors {
                    prop_assert_eq!(e.loc.len(), 2);
                    prop_assert_eq!(&e.loc[0], &json!("query"));
                }
            }
        }
        prop_assert_eq!(parse_count(&q).is_ok(), status_ok);
    }

    #[test]
    fn fuzz_batch_query(ids in proptest::collection::vec(prop_oneof![3 => any::<[u8; 16]>().prop_map(|b| Uuid::from_bytes(b).to_string()), 1 => any::<String>()], 0..120)) {
        let p: Vec<(String, String)> = ids.iter().map(|i| ("ids".to_owned(), i.clone())).collect();
        let q = QueryParams::parse(Some(&encode(&p)));
        let all_valid = ids.iter().all(|i| ConversationId::parse(i).is_ok());
        match BatchQuery::parse(&q) {
            Ok(b) => {
                prop_assert!(!ids.is_empty() && ids.len() <= 99 && all_valid);
                prop_assert_eq!(b.ids.len(), ids.len());
            }
            Err(e) => prop_assert!(ids.is_empty() || ids.len() > 99 || !all_valid, "{:?}", e),
        }
    }

    #[test]
    fn fuzz_page_tokens(o in order(), key in any::<i64>(), id in any::<u128>(), junk in any::<String>()) {
        let t = PageToken { order: o, key: key as i128, id: ConversationId::from_uuid(Uuid::from_u128(id)) };
        prop_assert_eq!(PageToken::decode(&t.encode()), Some(t));
        let _ = PageToken::decode(&junk);
        let _ = parse_timestamp(&junk);
    }

    #[test]
    fn fuzz_page_with_any_page_id(
        items in proptest::collection::vec((any::<u16>(), 0i64..50, 0i64..50, proptest::option::of(proptest::sample::select(&["idle", "running"][..]))), 0..40),
        o in order(),
        page_id in proptest::option::of(prop_oneof![
            any::<String>(),
            (order(), any::<i64>(), any::<u16>()).prop_map(|(o, k, n)| PageToken { order: o, key: k as i128, id: ConversationId::from_uuid(Uuid::from_u128(n as u128)) }.encode()),
        ]),
        status in proptest::option::of(proptest::sample::select(&["idle", "running", "x"][..])),
        limit in 0usize..120,
    ) {
        let items: Vec<SearchItem> = items.into_iter().map(|(n, c, u, s)| item(n as u128, c, u, s)).collect();
        let filtered = items.iter().filter(|i| status.is_none_or(|s| i.status.as_deref() == Some(s))).count();
        let p = page(items, status, o, page_id.as_deref(), limit);
        prop_assert!(p.items.len() <= limit.max(1));
        prop_assert!(p.items.len() <= filtered);
        if let Some(next) = &p.next_page_id {
            prop_assert!(PageToken::decode(next).is_some_and(|t| t.order == o));
        }
    }
}
