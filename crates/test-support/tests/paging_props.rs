//! Property tests: paging through events and conversations with any limit and sort order
//! visits every item exactly once, in order — the contract nestor's merged search relies on.

mod common;

use std::sync::OnceLock;

use common::*;
use nestor_test_support::{FakeAgentServer, FakeConfig};
use proptest::prelude::*;
use serde_json::{json, Value};
use uuid::Uuid;

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// One server per property: paging over a set that another test mutates concurrently is
/// allowed to skip or repeat items (on the real server too).
fn server(which: usize) -> &'static FakeAgentServer {
    static SRV: [OnceLock<FakeAgentServer>; 2] = [OnceLock::new(), OnceLock::new()];
    SRV[which].get_or_init(|| {
        rt().block_on(FakeAgentServer::start(FakeConfig {
            system_prompt_event: false,
            ..fast_config()
        }))
        .unwrap()
    })
}

async fn page_all(h: &Http, first: &str, next: impl Fn(&str) -> String) -> Vec<String> {
    let mut out = Vec::new();
    let (s, mut page) = h.get(first).await;
    assert_eq!(s, 200, "{page}");
    loop {
        for it in page["items"].as_array().unwrap() {
            out.push(it["id"].as_str().unwrap().to_owned());
        }
        match page["next_page_id"].as_str() {
            None => return out,
            Some(p) => {
                let (s, p2) = h.get(&next(p)).await;
                assert_eq!(s, 200);
                page = p2;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn event_paging_is_complete(n in 0usize..60, limit in 1usize..20, desc in any::<bool>(), kind_filter in any::<bool>()) {
        let srv = server(0);
        let id = Uuid::new_v4();
        srv.create_conversation(Some(id), json!({}));
        for i in 0..n {
            let kind = if i % 3 == 0 { "PauseEvent" } else { "InterruptEvent" };
            srv.append_event(id, json!({"source": "user", "kind": kind}));
        }
        let mut expected: Vec<String> = srv
            .events(id)
            .iter()
            .filter(|e| !kind_filter || e["kind"] == "PauseEvent")
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        if desc {
            expected.reverse();
        }
        let h = http(srv);
        let sort = if desc { "TIMESTAMP_DESC" } else { "TIMESTAMP" };
        let kind = if kind_filter { "&kind=PauseEvent" } else { "" };
        let base = format!("/api/conversations/{id}/events/search?limit={limit}&sort_order={sort}{kind}");
        let got = rt().block_on(page_all(&h, &base, |p| format!("{base}&page_id={p}")));
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn conversation_paging_is_complete(limit in 1usize..30, sort in 0usize..4) {
        let srv = server(1);
        for _ in 0..3 {
            srv.create_conversation(None, json!({}));
        }
        let sorts = ["CREATED_AT", "UPDATED_AT", "CREATED_AT_DESC", "UPDATED_AT_DESC"];
        let h = http(srv);
        let base = format!("/api/conversations/search?limit={limit}&sort_order={}", sorts[sort]);
        let got = rt().block_on(page_all(&h, &base, |p| format!("{base}&page_id={p}")));
        let mut unique = got.clone();
        unique.sort();
        unique.dedup();
        prop_assert_eq!(unique.len(), got.len());
        let count: Value = rt().block_on(h.get("/api/conversations/count")).1;
        prop_assert_eq!(got.len() as u64, count.as_u64().unwrap());
    }
}
