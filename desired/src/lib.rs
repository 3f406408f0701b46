//! drover's desired state, shared by the agent and the coordinator so that both read a commit
//! the same way: [`yaml`] (YAML with positions, strict deserialization reporting every
//! problem), [`spec`] (the repo format v1: `services/*.yaml`, `environments/*.yaml`, their
//! validation and what one host must run), [`freeze`] (freeze windows: when no new rollout starts), [`git`] (a bare mirror of the repo fetched with
//! gix, and the loop that keeps it at the branch tip); [`text`] (other hosts' text made
//! safe for a terminal) and [`file`] (bounded reads of files a configuration names); with the
//! `cli` feature, `cli` (shell completions and man pages for drover's binaries).

#[cfg(feature = "cli")]
pub mod cli;

pub mod file;
pub mod freeze;
pub mod git;
pub mod spec;
pub mod text;
pub mod yaml;

/// An error and its sources on one line, each cause once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}
