//! nestor: one OpenHands agent-server API in front of many downstream agent-servers.
//!
//! Clients (the web frontend, the Python SDK) talk to nestor exactly as to an agent-server;
//! each conversation actually lives on its own downstream, started by a provisioner. This
//! crate is the binary's library: configuration ([`config`]), start-up ([`app`]), client
//! authentication ([`auth`]), the HTTP surface ([`routes`]), the forwarding hop
//! ([`forward`]), its fast path for plain conversation requests ([`fastpath`]) and serving
//! with graceful shutdown ([`server`]).

pub mod app;
pub mod auth;
pub mod config;
pub mod cors;
pub mod errors;
pub mod fastpath;
pub mod fleet;
pub mod io_threads;
pub mod forward;
pub mod lifecycle;
pub mod observability;
pub mod persistence;
pub mod workspace_sync;
pub mod routes;
pub mod secrets;
pub mod server;
pub mod webhooks;

pub use app::AppState;
pub use config::Config;
