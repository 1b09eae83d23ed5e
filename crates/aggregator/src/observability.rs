//! Metrics (Prometheus text at `GET /metrics`) and per-request tracing spans.
//!
//! What is measured, and where:
//! * `nestor_http_requests_total{class,method,status}` and
//!   `nestor_http_request_duration_seconds{class}`: every request, by route class (the
//!   matched route, mapped to `health`, `create`, `catalog`, `conversation`, `socket`,
//!   `home`, `v1`, `metrics`, `other`); here.
//! * `nestor_upstream_requests_total`, `nestor_upstream_connections_opened_total`: the
//!   downstream client (connection reuse = 1 − opened / requests); nestor-core.
//! * `nestor_ws_pairs{kind}` (live client/downstream pairs, `events`|`session`|`bash_events`),
//!   `nestor_ws_downstream_lost_total`, `nestor_ws_resumed_total`, `nestor_ws_resume_seconds`
//!   (loss → resumed), `nestor_ws_slow_consumers_total`: the WebSocket proxy, through the
//!   hooks of its `Upstream` trait (`routes::sockets`) and a guard per pair ([`ws_pair`]).
//!   Registered at zero when the recorder is installed, so a dashboard sees the series (and
//!   a rate of 0) before the first socket ever drops.
//! * `nestor_downstreams{provisioner,state}`, `nestor_conversations`: sampled at scrape time.
//! * `nestor_provision_seconds{provisioner}`, `nestor_admission_rejections_total{reason}`:
//!   provisioning and admission.
//! * `nestor_busy_poll_pauses_total`: I/O threads' busy polling paused because the thread
//!   was busy (crate::io_threads::BusyPoll). On a saturated machine it rises by tens per
//!   second per thread (polling mostly off); serving a few clients, by a few per second or
//!   none.
//!
//! Labels never carry conversation ids (unbounded cardinality); spans and logs do.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, State};
use axum::middleware::Next;
use axum::response::Response;
use http::{header, HeaderValue, Request, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;

use crate::app::AppState;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the process-wide recorder once (several nestors in one test process share it).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let latency = &[
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), latency)
                .expect("buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::debug!("a metrics recorder was already installed");
            } else {
                register_zero_series();
            }
            handle
        })
        .clone()
}

/// The `kind` label of a socket pair.
pub const WS_KINDS: [&str; 3] = ["events", "session", "bash_events"];

/// The series that start at zero: the WebSocket proxy's and busy polling's (a counter or gauge
/// nobody touched is not rendered).
fn register_zero_series() {
    metrics::describe_gauge!("nestor_ws_pairs", "live proxied WebSocket pairs (client socket + downstream socket)");
    metrics::describe_counter!("nestor_ws_downstream_lost_total", "downstream sockets lost under a live client socket");
    metrics::describe_counter!("nestor_ws_resumed_total", "lost downstream sockets re-established (client kept)");
    metrics::describe_histogram!("nestor_ws_resume_seconds", "time from a downstream socket's loss to its resume");
    metrics::describe_counter!("nestor_ws_slow_consumers_total", "clients dropped for reading slower than they are sent");
    for kind in WS_KINDS {
        metrics::gauge!("nestor_ws_pairs", "kind" => kind).set(0.0);
    }
    metrics::counter!("nestor_ws_downstream_lost_total").increment(0);
    metrics::counter!("nestor_ws_resumed_total").increment(0);
    metrics::counter!("nestor_ws_slow_consumers_total").increment(0);
    metrics::describe_counter!("nestor_busy_poll_pauses_total", "I/O threads' busy polling paused because the thread was busy");
    metrics::counter!("nestor_busy_poll_pauses_total").increment(0);
}

/// One live socket pair: counted in `nestor_ws_pairs{kind}` from now until dropped (a guard,
/// so every way a pair ends — close, error, shutdown, a panic unwinding the task — counts
/// it out).
pub struct WsPairGuard(metrics::Gauge);

/// Count a pair of socket `kind` (one of [`WS_KINDS`]) as live.
pub fn ws_pair(kind: &'static str) -> WsPairGuard {
    let g = metrics::gauge!("nestor_ws_pairs", "kind" => kind);
    g.increment(1.0);
    WsPairGuard(g)
}

impl Drop for WsPairGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// A downstream socket was lost under a live client.
pub fn ws_downstream_lost() {
    metrics::counter!("nestor_ws_downstream_lost_total").increment(1);
}

/// A lost downstream socket came back `after` its loss.
pub fn ws_resumed(after: std::time::Duration) {
    metrics::counter!("nestor_ws_resumed_total").increment(1);
    metrics::histogram!("nestor_ws_resume_seconds").record(after.as_secs_f64());
}

/// A client was dropped as a slow consumer.
pub fn ws_slow_consumer() {
    metrics::counter!("nestor_ws_slow_consumers_total").increment(1);
}

/// The route class of a matched route template (or of an unmatched path).
pub fn route_class(matched: Option<&str>, path: &str) -> &'static str {
    match matched {
        Some("/alive" | "/health" | "/ready" | "/server_info" | "/" | "/openapi.json") => "health",
        Some("/metrics") => "metrics",
        Some("/api/conversations/search" | "/api/conversations/count") => "catalog",
        Some("/api/conversations") => "create_or_batch",
        Some(p) if p.starts_with("/sockets/") => "socket",
        Some(p) if p.starts_with("/api/conversations/{id}") || p.starts_with("/api/file/download-trajectory") => {
            "conversation"
        }
        Some(_) => "other",
        None if path.starts_with("/v1/") => "v1",
        None if path.starts_with("/api/") || path.starts_with("/app-backends/") => "home",
        None => "other",
    }
}

/// The one middleware of the edge: CORS (crate::cors), one span per request (with the
/// conversation id when the path has one), request counter and latency histogram by route
/// class. One layer rather than several: each layer costs allocations on every request.
pub async fn track(State(state): State<AppState>, req: Request<Body>, next: Next) -> Response {
    let started = Instant::now();
    let cors = match crate::cors::begin(&state.cors, &req) {
        Ok(d) => d,
        Err(preflight) => return preflight,
    };
    let matched = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned());
    let class = route_class(matched.as_deref(), req.uri().path());
    let method = req.method().clone();
    let conversation = conversation_in_path(req.uri().path()).unwrap_or("");
    // A debug span: free when debug logging is off (the hot path pays ~4 % of its CPU for an
    // info span); warnings on the request path name their conversation themselves.
    let span = tracing::debug_span!("request", %method, class, conversation);
    let mut resp = next.run(req).instrument(span).await;
    if let Some(d) = cors {
        crate::cors::finish(d, &mut resp);
    }
    count_request(class, method_label(&method), resp.status().as_u16(), started);
    resp
}

/// Count one answered request in `nestor_http_requests_total` and its latency since
/// `started` in `nestor_http_request_duration_seconds` (the router's edge and the fast path).
pub(crate) fn count_request(class: &'static str, method: &'static str, status: u16, started: Instant) {
    let status_class = match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let seconds = started.elapsed().as_secs_f64();
    with_handles(class, method, status_class, |counter, histogram| {
        counter.increment(1);
        histogram.record(seconds);
    });
}

/// Per-request metric handles, resolved once per label set and thread (building a labelled
/// key on every request allocates; a shared cache would bounce between the I/O threads).
/// A short list searched in order: a thread sees a handful of label sets, and comparing
/// three short labels costs less than hashing them.
fn with_handles(class: &'static str, method: &'static str, status: &'static str, f: impl FnOnce(&metrics::Counter, &metrics::Histogram)) {
    type Key = (&'static str, &'static str, &'static str);
    thread_local! {
        static CACHE: std::cell::RefCell<Vec<(Key, metrics::Counter, metrics::Histogram)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let key = (class, method, status);
    CACHE.with_borrow_mut(|cache| {
        let i = match cache.iter().position(|(k, _, _)| *k == key) {
            Some(i) => i,
            None => {
                cache.push((
                    key,
                    metrics::counter!("nestor_http_requests_total", "class" => class, "method" => method, "status" => status),
                    metrics::histogram!("nestor_http_request_duration_seconds", "class" => class),
                ));
                cache.len() - 1
            }
        };
        let (_, counter, histogram) = &cache[i];
        f(counter, histogram);
    })
}

/// Count one request sent to a downstream in `nestor_upstream_requests_total` (the fast
/// path's; the router's client counts its own).
pub(crate) fn count_upstream_request() {
    thread_local! {
        static COUNTER: metrics::Counter = metrics::counter!("nestor_upstream_requests_total");
    }
    COUNTER.with(|c| c.increment(1));
}

fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The conversation id segment of a path, if it has one (not validated: for spans only).
fn conversation_in_path(path: &str) -> Option<&str> {
    let rest = path
        .strip_prefix("/api/conversations/")
        .or_else(|| path.strip_prefix("/sockets/events/"))
        .or_else(|| path.strip_prefix("/sockets/session/"))
        .or_else(|| path.strip_prefix("/sockets/conversation/"))
        .or_else(|| path.strip_prefix("/api/file/download-trajectory/"))?;
    let seg = rest.split('/').next()?;
    (seg.len() >= 32 && seg.len() <= 45).then_some(seg)
}

/// `GET /metrics`.
pub async fn metrics_handler(State(state): State<AppState>) -> Response {
    // Gauges sampled now: downstreams by provisioner and state, conversations.
    let mut by_state: BTreeMap<&'static str, usize> = BTreeMap::new();
    for s in ["starting", "running", "stopped", "error", "released"] {
        by_state.insert(s, 0);
    }
    for ds in state.provisioner.list() {
        *by_state.entry(ds.state().as_str()).or_default() += 1;
    }
    let kind = state.provisioner.kind();
    for (s, n) in by_state {
        metrics::gauge!("nestor_downstreams", "provisioner" => kind, "state" => s).set(n as f64);
    }
    metrics::gauge!("nestor_conversations").set(state.catalog.len() as f64);
    let body = install().render();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::OK;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(route_class(Some("/api/conversations/{id}/{*rest}"), "/x"), "conversation");
        assert_eq!(route_class(Some("/sockets/events/{id}"), "/x"), "socket");
        assert_eq!(route_class(None, "/api/settings"), "home");
        assert_eq!(route_class(None, "/v1/models"), "v1");
        assert_eq!(route_class(None, "/nope"), "other");
        assert_eq!(conversation_in_path("/api/conversations/0a8b12be-0792-4413-8dd9-066610cb0473/events"), Some("0a8b12be-0792-4413-8dd9-066610cb0473"));
        assert_eq!(conversation_in_path("/api/conversations/search"), None);
    }
}
