//! drover agent: deploys its own host (or an ECS cluster) from a desired-state Git repo.
//!
//! The binary `drover-agent` is a thin CLI over this library. Modules follow the peers and
//! concerns of a deployment: [`git_watch`] reads the desired state, [`artifact`] downloads and
//! verifies, [`release`] installs and switches, [`service`] stops and starts, [`health`] checks.
//! [`engine`] drives one service through the phases of its target's machine — [`vm`] for a
//! host, [`ecs`] for an ECS service — and rolls back on failure; [`coordinator`] speaks the
//! coordinator's protocol, and [`runner`] wires it all into the daemon.

pub mod account;
pub mod artifact;
pub mod config;
pub mod coordinator;
pub mod ecs;
pub mod engine;
pub mod failpoint;
pub mod fsutil;
pub mod git_watch;
pub mod health;
pub mod hooks;
pub mod job;
pub mod metrics;
pub mod notify;
pub mod progress;
pub mod redact;
pub mod release;
pub mod report;
pub mod runner;
pub mod service;
pub mod state;
pub mod telemetry;
pub mod verify;
pub mod vm;

pub use drover_desired::{spec, yaml};
