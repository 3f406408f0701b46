//! drover agent: deploys its own host (or an ECS cluster) from a desired-state Git repo.
//!
//! The binary `drover-agent` is a thin CLI over this library. Modules follow the peers and
//! concerns of a deployment: [`git_watch`] reads the desired state, [`artifact`] downloads and
//! verifies, [`release`] installs and switches, [`service`] stops and starts, [`health`] checks,
//! and [`deploy`] drives one service through its phases and rolls back on failure.

pub mod account;
pub mod artifact;
pub mod config;
pub mod coordinator;
pub mod deploy;
pub mod ecs;
pub mod failpoint;
pub mod fsutil;
pub mod git_watch;
pub mod health;
pub mod hooks;
pub mod notify;
pub mod redact;
pub mod release;
pub mod report;
pub mod runner;
pub mod service;
pub mod state;
pub mod telemetry;
pub mod verify;

pub use drover_desired::{spec, yaml};
