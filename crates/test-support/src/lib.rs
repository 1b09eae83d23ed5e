//! Test support for nestor.
//!
//! [`fake_server`] is an in-process fake of the OpenHands agent-server 1.58.2 — the
//! downstream nestor proxies to — fast enough for unit, property, fault-injection and load
//! tests (thousands of requests per second, 1,000+ WebSockets) and faithful in everything
//! nestor relies on. The `nestor-fake-agent-server` binary serves the same fake from its own
//! process for benchmarks and comparisons with other proxies.

pub mod fake_server;

pub use fake_server::{FakeAgentServer, FakeConfig, Fault, TimestampMode};
