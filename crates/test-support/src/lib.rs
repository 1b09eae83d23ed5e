//! Test support for nestor.
//!
//! [`fake_server`] is an in-process fake of the OpenHands agent-server 1.58.2 — the
//! downstream nestor proxies to — fast enough for unit, property, fault-injection and load
//! tests (thousands of requests per second, 1,000+ WebSockets) and faithful in everything
//! nestor relies on. The `nestor-fake-agent-server` binary serves the same fake from its own
//! process for benchmarks and comparisons with other proxies.
//!
//! [`chaos_proxy`] is a fault-injecting TCP proxy (reset, stall, refuse connections) to put
//! between nestor and its downstreams in chaos tests.
//!
//! [`node_agent`] (binary `nestor-node-agent`) schedules and runs pods for the kubernetes
//! provisioner's tests: a real kube-apiserver, each pod a Docker container.
//!
//! ```
//! use nestor_test_support::{FakeAgentServer, FakeConfig, Fault};
//! use serde_json::json;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let srv = FakeAgentServer::start(FakeConfig::with_key("k")).await.unwrap();
//! // Seed directly, or drive it over HTTP/WebSocket at `srv.url()` / `srv.ws_url()`.
//! let info = srv.create_conversation(None, json!({"workspace": {"working_dir": "/w"}}));
//! let id = info["id"].as_str().unwrap().parse().unwrap();
//! let seq = srv.append_event(id, json!({"source": "agent", "kind": "PauseEvent"}));
//! assert_eq!(seq, 0);
//! srv.set_fault(Fault::DropSocketsAfterFrames(3));
//! srv.restart().await; // same port, same state, every socket cut without a close frame
//! assert_eq!(srv.events(id).len(), 1);
//! # });
//! ```

pub mod chaos_proxy;
pub mod fake_server;
pub mod kube_env;
pub mod node_agent;

pub use chaos_proxy::{ChaosProxy, ChaosStats};
pub use fake_server::{FakeAgentServer, FakeConfig, Fault, SocketRequest, TimestampMode};
