//! drover's integration tests: real agent processes against real peers (Git over file://,
//! smart HTTP and git://, lighttpd serving artifacts), one module per area.

mod artifacts;
mod coordinator;
mod deploy;
mod ecs;
mod git;
mod gitops;
mod ha;
mod hostile;
mod metrics;
mod notify;
mod packaging;
mod pipeline;
mod recovery;
mod schema;
mod security;
mod ui;
mod validate;
mod verify;
