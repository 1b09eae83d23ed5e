//! Fuzzing (proptest at scale) of what nestor's front door parses from untrusted requests —
//! paths, methods, queries, headers — and of its configuration parser.
//!
//! * CI smoke run: the default case counts (a few seconds in a debug build).
//! * Long run: `NESTOR_FUZZ_CASES=1000000 cargo test --release -p nestor-aggregator --test fuzz`
//!   (the config target runs a tenth of that: each case writes and parses a file);
//!   docs/reliability.md.
//!
//! Targets and invariants:
//! * Routing (`routes::compat::route`, `routes::home::classify`, `home::normalize_path`,
//!   `conversations::path_id`) on arbitrary and route-shaped paths: no panic; a `405`
//!   names allowed methods that exclude the request's; a `307` goes to the same path with
//!   the trailing slash toggled, which exists; every documented route template filled with
//!   any segment is routed; a "workspace" path really is under a host-global prefix;
//!   normalised paths are absolute, contain no `.`/`..`/empty segment and are a fixed point.
//! * Query: `forward::strip_key_from_query` leaves every other parameter, in order, and no
//!   `session_api_key` — as the downstream will decode the query (percent-decoding names).
//! * Headers: `forward::strip_hop_by_hop` removes every hop-by-hop header and every header
//!   `Connection` names, and keeps every other header with all its values in order;
//!   `forward::public_origin` is `http(s)://<Host>` or nothing.
//! * Config (`Config::load`) on arbitrary text and on TOML built from the real keys with
//!   values of random types: no panic; an accepted configuration satisfies its validation
//!   (positive finite timeouts, non-zero body limit, valid unique user ids); a generated
//!   valid configuration loads with exactly the values written.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;
use nestor_aggregator::config::{Config, Overrides, ProvisionerKind};
use nestor_aggregator::forward::{public_origin, strip_hop_by_hop, strip_key_from_query};
use nestor_aggregator::routes::compat::{route, Routed};
use nestor_aggregator::routes::conversations::path_id;
use nestor_aggregator::routes::home::{classify, normalize_path, Global};
use nestor_conversation_service::QueryParams;
use nestor_core::ApiError;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

fn cases(smoke: u32) -> u32 {
    std::env::var("NESTOR_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(smoke)
}

fn config(smoke: u32) -> ProptestConfig {
    ProptestConfig { cases: cases(smoke), max_shrink_iters: 10_000, failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"))), ..ProptestConfig::default() }
}

// ------------------------------------------------------------------------ routing

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "PROPFIND"];

fn method() -> impl Strategy<Value = Method> {
    proptest::sample::select(METHODS).prop_map(|m| Method::from_bytes(m.as_bytes()).expect("valid method"))
}

/// Segments that mean something to the router, near misses, and noise.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(&[
            "api", "conversations", "events", "search", "count", "sockets", "bash", "file", "git", "vscode",
            "workspace", "runtime", "credentials", "alive", "health", "server_info", "v1", "app-backends",
            "docs", "skills", "repositories", "home", "search_subdirs", "init", "nestor", "metrics", "",
            ".", "..", "%2F", "0a8b12be-0792-4413-8dd9-066610cb0473", "0a8b12be079244138dd9066610cb0473",
        ][..]).prop_map(str::to_owned),
        1 => "[a-zA-Z0-9_.~%-]{1,12}",
        1 => any::<String>().prop_map(|s| s.replace('/', "")),
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (proptest::collection::vec(segment(), 0..8), any::<bool>()).prop_map(|(segs, slash)| {
            let mut p = format!("/{}", segs.join("/"));
            if slash && p != "/" {
                p.push('/');
            }
            p
        }),
        1 => any::<String>(),
    ]
}

/// Routes of the agent-server's table, to fill with any non-empty segment (`{…}`) or any
/// sub-path (`{…:path}`).
const TEMPLATES: &[(&str, &str)] = &[
    ("GET", "/alive"),
    ("GET", "/server_info"),
    ("GET", "/api/conversations/search"),
    ("GET", "/api/conversations/count"),
    ("POST", "/api/conversations"),
    ("GET", "/api/conversations/{id}"),
    ("PATCH", "/api/conversations/{id}"),
    ("DELETE", "/api/conversations/{id}"),
    ("GET", "/api/conversations/{id}/events/search"),
    ("POST", "/api/conversations/{id}/events"),
    ("GET", "/api/conversations/{id}/events/{event}"),
    ("POST", "/api/conversations/{id}/run"),
    ("GET", "/api/conversations/{id}/workspace/{path:path}"),
    ("POST", "/api/conversations/{id}/bash/bash_commands/{cmd}/stop"),
    ("GET", "/api/bash/bash_events/search"),
    ("GET", "/api/git/commits/{sha}/changes"),
    ("GET", "/api/file/download-trajectory/{id}"),
    ("POST", "/api/conversations/{id}/runtime/credentials"),
    ("PUT", "/api/conversations/{id}/credential-bindings/{name}"),
    ("GET", "/app-backends/{ext}/{path:path}"),
];

fn filled_template() -> impl Strategy<Value = (Method, String)> {
    (
        proptest::sample::select(TEMPLATES),
        proptest::collection::vec("[a-zA-Z0-9_.~%-]{1,10}", 4),
        proptest::collection::vec("[a-zA-Z0-9_.~%-]{0,6}", 0..4),
    )
        .prop_map(|((m, t), params, rest)| {
            let mut i = 0;
            let segs: Vec<String> = t
                .split('/')
                .map(|s| {
                    if s.ends_with(":path}") {
                        rest.join("/")
                    } else if s.starts_with('{') {
                        i += 1;
                        // Never "." or "..": a client's HTTP stack resolves those first.
                        let p = &params[i - 1];
                        if p == "." || p == ".." {
                            format!("x{p}")
                        } else {
                            p.clone()
                        }
                    } else {
                        s.to_owned()
                    }
                })
                .collect();
            (Method::from_bytes(m.as_bytes()).expect("valid method"), segs.join("/"))
        })
}

fn toggled(path: &str) -> String {
    match path.strip_suffix('/') {
        Some(p) => p.to_owned(),
        None => format!("{path}/"),
    }
}

// ------------------------------------------------------------------------ headers

const HOP: &[&str] = &["connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"];

fn header_name() -> impl Strategy<Value = HeaderName> {
    prop_oneof![
        2 => proptest::sample::select(HOP).prop_map(str::to_owned),
        2 => proptest::sample::select(&["x-session-api-key", "host", "cookie", "content-type", "x-custom", "x-forwarded-proto", "accept"][..]).prop_map(str::to_owned),
        1 => "[a-zA-Z0-9-]{1,16}",
    ]
    .prop_map(|n| HeaderName::from_bytes(n.as_bytes()).expect("valid header name"))
}

/// A `Connection` value: comma lists of tokens (some naming headers present), noise.
fn connection_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(prop_oneof![Just("close".to_owned()), Just("X-Custom".to_owned()), Just(" accept ".to_owned()), Just("upgrade".to_owned()), "[a-zA-Z0-9-]{0,10}", "[ -~]{0,10}"], 0..5)
            .prop_map(|v| v.join(",").into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..24),
    ]
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![3 => "[ -~]{0,24}".prop_map(String::into_bytes), 1 => proptest::collection::vec(any::<u8>(), 0..24)]
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn fuzz_routing_any_path(m in method(), p in path()) {
        match route(&m, &p) {
            Routed::Route | Routed::NotFound => {}
            Routed::WrongMethod(allow) => {
                prop_assert!(!allow.is_empty());
                prop_assert!(!allow.split(", ").any(|a| a == m.as_str()), "405 for {} {} allows it: {}", m, p, allow);
            }
            Routed::Redirect(other) => {
                prop_assert_eq!(&other, &toggled(&p));
                prop_assert_ne!(route(&m, &other), Routed::NotFound);
            }
        }
        match classify(&m, &p) {
            Global::Workspace => prop_assert!(["/api/bash/", "/api/file/", "/api/git/", "/api/vscode/"].iter().any(|x| p.starts_with(x))),
            Global::ProjectDir => prop_assert_eq!(&m, &Method::POST),
            Global::Local => {}
        }
        match normalize_path(&p) {
            None => prop_assert!(!p.starts_with('/')),
            Some(n) => {
                prop_assert!(n.starts_with('/'));
                prop_assert!(n == "/" || !n.ends_with('/'));
                prop_assert!(!n[1..].split('/').any(|s| s == "." || s == ".." || (s.is_empty() && n != "/")), "{:?} -> {:?}", p, n);
                prop_assert_eq!(normalize_path(&n), Some(n.clone()));
            }
        }
        // A path segment as a conversation id.
        for seg in p.split('/') {
            match path_id(seg) {
                Ok(id) => prop_assert_eq!(nestor_core::ConversationId::parse(seg).ok(), Some(id)),
                Err(ApiError::Validation(items)) => {
                    prop_assert_eq!(items.len(), 1);
                    prop_assert_eq!(&items[0].loc, &vec![serde_json::json!("path"), serde_json::json!("conversation_id")]);
                }
                Err(e) => prop_assert!(false, "unexpected error {:?}", e),
            }
        }
    }

    #[test]
    fn fuzz_routing_known_templates((m, p) in filled_template()) {
        prop_assert_eq!(route(&m, &p), Routed::Route, "{} {}", m, p);
    }

    #[test]
    fn fuzz_strip_key_from_query(q in prop_oneof![
        any::<String>(),
        proptest::collection::vec(
            (prop_oneof![
                Just("session_api_key".to_owned()), Just("session%5Fapi%5Fkey".to_owned()), Just("session_api_key%20".to_owned()),
                Just("session_api_keyX".to_owned()), Just("xsession_api_key".to_owned()), Just("a".to_owned()), Just("%73ession_api_key".to_owned()),
                "[a-z_%0-9]{0,8}",
            ], proptest::option::of("[a-zA-Z0-9=%+_]{0,8}")),
            0..6,
        ).prop_map(|v| v.into_iter().map(|(k, val)| match val { Some(x) => format!("{k}={x}"), None => k }).collect::<Vec<_>>().join("&")),
    ]) {
        let before = QueryParams::parse(Some(&q));
        let after = strip_key_from_query(&q);
        let after_pairs = QueryParams::parse(after.as_deref());
        prop_assert!(after_pairs.last("session_api_key").is_none(), "{:?} -> {:?}", q, after);
        let expected: Vec<(String, String)> = before.pairs().iter().filter(|(k, _)| k != "session_api_key").cloned().collect();
        prop_assert_eq!(after_pairs.pairs(), &expected[..], "{:?} -> {:?}", q, after);
        prop_assert!(after.as_deref() != Some(""));
    }

    #[test]
    fn fuzz_hop_by_hop_headers(
        headers in proptest::collection::vec((header_name(), header_value()), 0..10),
        connection in proptest::collection::vec(connection_value(), 0..3),
    ) {
        let mut h = HeaderMap::new();
        for (n, v) in &headers {
            if let Ok(v) = HeaderValue::from_bytes(v) {
                h.append(n.clone(), v);
            }
        }
        for c in &connection {
            if let Ok(v) = HeaderValue::from_bytes(c) {
                h.append(http::header::CONNECTION, v);
            }
        }
        let listed: Vec<String> = h
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|n| n.trim().to_ascii_lowercase())
            .collect();
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        for n in HOP {
            prop_assert!(!h.contains_key(*n), "{} kept", n);
        }
        for n in &listed {
            if let Ok(n) = HeaderName::from_bytes(n.as_bytes()) {
                prop_assert!(!h.contains_key(&n), "{} (named by Connection) kept", n);
            }
        }
        for name in before.keys() {
            let hop = HOP.contains(&name.as_str()) || listed.iter().any(|l| l == name.as_str());
            if !hop {
                let a: Vec<_> = before.get_all(name).iter().collect();
                let b: Vec<_> = h.get_all(name).iter().collect();
                prop_assert_eq!(a, b, "{} changed", name);
            }
        }
    }

    #[test]
    fn fuzz_public_origin(host in proptest::option::of(header_value()), proto in proptest::option::of(prop_oneof![Just(b"https".to_vec()), Just(b"http".to_vec()), header_value()])) {
        let mut h = HeaderMap::new();
        let mut host_str = None;
        if let Some(v) = host.as_ref().and_then(|b| HeaderValue::from_bytes(b).ok()) {
            host_str = v.to_str().ok().map(str::to_owned);
            h.insert(http::header::HOST, v);
        }
        if let Some(v) = proto.as_ref().and_then(|b| HeaderValue::from_bytes(b).ok()) {
            h.insert("x-forwarded-proto", v);
        }
        match public_origin(&h) {
            Some(o) => {
                let host = host_str.expect("an origin needs a Host");
                prop_assert!(o == format!("http://{host}") || o == format!("https://{host}"), "{}", o);
            }
            None => prop_assert!(host_str.is_none()),
        }
    }
}

// ------------------------------------------------------------------------ config

/// Keys the configuration knows, at their level, for the structured TOML generator.
const TOP_KEYS: &[&str] = &[
    "bind", "session_api_keys", "state_dir", "max_body_bytes", "ready_timeout_secs", "upstream_timeout_secs",
    "secret_key", "inject_stored_secrets", "internal_url", "internal_bind", "allow_cors_origins",
    "allow_cors_origin_regex", "metrics", "log_format", "unknown_key",
];

fn toml_scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}").replace("inf", "inf").replace("NaN", "nan")),
        Just("-inf".to_owned()),
        Just("inf".to_owned()),
        Just("1e300".to_owned()),
        Just("2e19".to_owned()),
        Just("0.001".to_owned()),
        Just("nan".to_owned()),
        Just("0".to_owned()),
        Just("-1".to_owned()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[ -~]{0,16}".prop_map(|s| format!("{s:?}")),
        Just("\"127.0.0.1:0\"".to_owned()),
        Just("\"0.0.0.0:8000\"".to_owned()),
        Just("\"http://127.0.0.1:9\"".to_owned()),
        Just("\"((\"".to_owned()),
        Just("[]".to_owned()),
        Just("[\"k\", \"\"]".to_owned()),
        Just("{ a = 1 }".to_owned()),
        Just("\"existing\"".to_owned()),
        Just("\"process\"".to_owned()),
        Just("\"docker\"".to_owned()),
        Just("\"kubernetes\"".to_owned()),
        Just("\"pool\"".to_owned()),
    ]
}

/// Seconds: ordinary, zero, negative, and the values no `Duration` holds.
fn secs() -> BoxedStrategy<String> {
    prop_oneof![
        3 => proptest::sample::select(&["1", "0.5", "0", "-1", "inf", "-inf", "nan", "1e300", "2e19", "1e9", "86400"][..]).prop_map(str::to_owned),
        1 => any::<f64>().prop_map(|f| format!("{f:?}").replace("NaN", "nan")),
    ]
    .boxed()
}

/// A value for `key`: mostly of the right type (so whole documents get accepted and their
/// invariants checked), sometimes any scalar.
fn value_for(key: &str) -> BoxedStrategy<String> {
    let pick = |v: &'static [&'static str]| proptest::sample::select(v).prop_map(str::to_owned).boxed();
    let typed = match key {
        "bind" => pick(&["\"127.0.0.1:0\"", "\"0.0.0.0:8000\"", "\"[::1]:9\""]),
        "session_api_keys" => pick(&["[\"k\"]", "[]", "\"a,b\"", "[\"\"]"]),
        "state_dir" => pick(&["\"/tmp/nestor-fuzz\"", "\"\""]),
        "max_body_bytes" => pick(&["0", "1", "104857600", "-1"]),
        "ready_timeout_secs" | "upstream_timeout_secs" => secs(),
        "secret_key" => pick(&["\"s\"", "\"\""]),
        "inject_stored_secrets" => pick(&["true", "false"]),
        "internal_url" => pick(&["\"http://127.0.0.1:9\"", "\"ftp://x\"", "\"::\"", "\"http://h/p?q\""]),
        "internal_bind" => pick(&["\"127.0.0.1:1\"", "\"x\""]),
        "allow_cors_origins" => pick(&["[\"https://a.example\"]", "[]"]),
        "allow_cors_origin_regex" => pick(&["\"https://.*\\\\.example\"", "\"((\""]),
        "metrics" => pick(&["\"public\"", "\"key\"", "\"off\"", "\"x\""]),
        "log_format" => pick(&["\"json\"", "\"human\""]),
        _ => toml_scalar().boxed(),
    };
    prop_oneof![4 => typed, 1 => toml_scalar()].boxed()
}

fn toml_doc() -> impl Strategy<Value = String> {
    let top = proptest::sample::subsequence(TOP_KEYS, 0..6)
        .prop_flat_map(|keys| keys.into_iter().map(|k| value_for(k).prop_map(move |v| format!("{k} = {v}\n"))).collect::<Vec<_>>());
    (
        top,
        proptest::option::of((
            prop_oneof![3 => Just("\"existing\"".to_owned()), 1 => toml_scalar()],
            proptest::collection::vec((prop_oneof![3 => "\"http://127\\.0\\.0\\.1:[0-9]{1,5}\"", 1 => toml_scalar()], prop_oneof![3 => Just("\"k\"".to_owned()), 1 => toml_scalar()]), 0..3),
        )),
        proptest::collection::vec((prop_oneof![3 => "[a-z0-9_-]{1,8}", 1 => "[a-zA-Z0-9_ -]{0,8}"], proptest::collection::vec(prop_oneof![3 => Just("\"uk\"".to_owned()), 1 => toml_scalar()], 0..2)), 0..3),
        proptest::option::of((secs(), secs(), secs(), secs(), prop_oneof![Just("1024".to_owned()), toml_scalar()])),
    )
        .prop_map(|(top, prov, users, ws)| {
            let mut s: String = top.concat();
            if let Some((resume, staleness, flush, retry, pending)) = ws {
                s.push_str(&format!("[websocket]\nresume_deadline_secs = {resume}\nmax_pending_bytes = {pending}\n"));
                s.push_str(&format!("[catalog]\nwebhook_staleness_secs = {staleness}\n[lifecycle]\nidle_stop_secs = {retry}\n"));
                s.push_str(&format!("[[webhooks]]\nbase_url = \"http://127.0.0.1:9\"\nflush_delay = {flush}\nretry_delay = {retry}\n"));
            }
            if let Some((kind, servers)) = prov {
                s.push_str(&format!("[provisioner]\nkind = {kind}\n"));
                for (url, key) in servers {
                    s.push_str(&format!("[[provisioner.existing.servers]]\nurl = {url}\napi_key = {key}\n"));
                }
            }
            for (id, keys) in users {
                s.push_str(&format!("[[users]]\nid = {id:?}\nsession_api_keys = [{}]\n", keys.join(", ")));
            }
            s
        })
}

fn check_accepted(c: &Config) -> Result<(), TestCaseError> {
    for v in [c.upstream_timeout_secs, c.ready_timeout_secs, c.websocket.resume_deadline_secs] {
        prop_assert!(v.is_finite() && v > 0.0, "accepted a timeout of {}", v);
    }
    prop_assert!(c.max_body_bytes > 0);
    // Every duration nestor builds from the configuration is representable
    // (`Duration::from_secs_f64` panics on NaN, infinity and values past ~1.8e19 s).
    let mut secs = vec![("catalog.webhook_staleness_secs", c.catalog.webhook_staleness_secs.max(0.0))];
    if let Some(v) = c.lifecycle.idle_stop_secs.filter(|v| *v > 0.0) {
        secs.push(("lifecycle.idle_stop_secs", v));
    }
    for w in &c.webhooks {
        secs.push(("webhooks.flush_delay", w.flush_delay.max(0.0)));
        secs.push(("webhooks.retry_delay", w.retry_delay.max(0.0)));
    }
    for v in [c.upstream_timeout_secs, c.ready_timeout_secs, c.websocket.resume_deadline_secs] {
        secs.push(("timeout", v));
    }
    for (what, v) in secs {
        let usable = std::time::Duration::try_from_secs_f64(v).ok().and_then(|d| std::time::Instant::now().checked_add(d));
        prop_assert!(usable.is_some(), "accepted {} = {}", what, v);
    }
    let mut ids = std::collections::HashSet::new();
    for u in &c.users {
        prop_assert!(!u.id.is_empty() && u.id.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_'));
        prop_assert!(ids.insert(u.id.clone()));
        prop_assert!(!u.session_api_keys.is_empty());
    }
    if c.session_api_keys.as_ref().is_some_and(|k| k.is_empty()) && c.users.is_empty() {
        prop_assert!(c.bind.ip().is_loopback(), "no auth on {}", c.bind);
    }
    Ok(())
}

/// Runs inside a `figment::Jail` (its own directory and an empty environment, so a
/// developer's `NESTOR_*` variables do not leak in), one file rewritten per case.
#[test]
#[allow(clippy::result_large_err)] // figment::Jail's closure returns figment::Error
fn fuzz_config_parsing() {
    // A file per case: a tenth of the cases of the in-memory targets.
    let n = (cases(5000) / 10).max(100);
    figment::Jail::expect_with(|jail| {
        jail.clear_env();
        let path = jail.directory().join("nestor.toml");
        let mut runner = TestRunner::new(ProptestConfig { cases: n, max_shrink_iters: 2_000, failure_persistence: None, ..ProptestConfig::default() });
        let texts = prop_oneof![3 => toml_doc(), 1 => any::<String>(), 1 => "[ -~\n]{0,80}"];
        let result = runner.run(&texts, |text| {
            std::fs::write(&path, &text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if let Ok(c) = Config::load(Some(&path), &Overrides::default()) {
                check_accepted(&c)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("config fuzzing failed: {e}");
        }
        // A valid configuration, generated: loads with exactly its values.
        let mut runner = TestRunner::new(ProptestConfig { cases: n, max_shrink_iters: 2_000, failure_persistence: None, ..ProptestConfig::default() });
        let valid = (1u16.., proptest::collection::vec("[A-Za-z0-9_-]{1,40}", 0..4), proptest::collection::vec(1u16.., 1..4), 1u32..100_000, 1u64..=i64::MAX as u64); // TOML integers are i64
        let result = runner.run(&valid, |(port, keys, servers, timeout, body)| {
            let mut s = format!(
                "bind = \"127.0.0.1:{port}\"\nsession_api_keys = {keys:?}\nupstream_timeout_secs = {timeout}\nmax_body_bytes = {body}\n[provisioner]\nkind = \"existing\"\n"
            );
            for p in &servers {
                s.push_str(&format!("[[provisioner.existing.servers]]\nurl = \"http://127.0.0.1:{p}\"\napi_key = \"key-{p}\"\n"));
            }
            std::fs::write(&path, &s).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let c = Config::load(Some(&path), &Overrides::default()).map_err(|e| TestCaseError::fail(format!("{e} for\n{s}")))?;
            prop_assert_eq!(c.bind.port(), port);
            prop_assert_eq!(c.session_api_keys.as_ref().map(|k| k.iter().map(|k| k.expose().to_owned()).collect::<Vec<_>>()), Some(keys));
            prop_assert_eq!(c.upstream_timeout_secs, f64::from(timeout));
            prop_assert_eq!(c.max_body_bytes, body);
            prop_assert_eq!(c.provisioner.kind, ProvisionerKind::Existing);
            prop_assert_eq!(c.provisioner.existing.servers.len(), servers.len());
            check_accepted(&c)
        });
        if let Err(e) = result {
            panic!("config fuzzing failed: {e}");
        }
        Ok(())
    });
}
