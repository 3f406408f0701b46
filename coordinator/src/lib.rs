//! drover coordinator: rolling-batch leases, approval gates, fleet view and audit, over an
//! HTTP/JSON API (docs/protocol.md); and the `drover` operator CLI.
//!
//! With only the `client` feature, this crate is the protocol's types ([`wire`]) and a client
//! ([`client`]) — what the agent depends on. The `server` feature adds the coordinator itself:
//! the rollout state machine ([`rollout`]), the pure decisions over a state snapshot
//! ([`core`]), the coordinator's own reading of the desired-state repo ([`git`]), the store
//! ([`store`], SQLite), the actor that batches requests into store transactions ([`actor`])
//! and the HTTP layer ([`http`]) behind the coordinator's own accept loop ([`server`], with
//! [`tls`]).

#[cfg(feature = "client")]
pub mod client;
pub mod time;
#[cfg(feature = "client")]
pub mod wire;

#[cfg(feature = "server")]
pub mod actor;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod core;
#[cfg(feature = "server")]
pub mod git;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod notify;
#[cfg(feature = "server")]
pub mod rollout;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod tls;
#[cfg(feature = "server")]
pub mod ui;
#[cfg(feature = "server")]
pub mod view;
#[cfg(feature = "server")]
pub mod webhook;
