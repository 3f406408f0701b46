//! How a reconcile of one service ended, for every machine, and the errors that stop a
//! deploy from even trying.

use crate::state::StateError;

/// Errors that stop the agent from even trying (the state cannot be read or written).
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs, reason = "variant fields are named for what they hold")]
pub enum DeployError {
    /// The state file.
    #[error(transparent)]
    State(#[from] StateError),
    /// The service lock.
    #[error("cannot lock service {service}: {source}")]
    Lock {
        service: String,
        #[source]
        source: std::io::Error,
    },
    /// Nothing to roll back to (manual rollback).
    #[error("cannot roll back {service}: {reason}")]
    NoRollback { service: String, reason: String },
}

impl DeployError {
    /// A manual rollback of `service` refused, and why.
    pub fn no_rollback(service: &str, reason: &str) -> DeployError {
        DeployError::NoRollback {
            service: service.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// How a reconcile of one service ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs, reason = "variant fields are named for what they hold")]
pub enum Reconciled {
    /// The desired version was already running.
    UpToDate { version: String },
    /// The desired version was installed but not running; it was started.
    Started { version: String },
    /// The desired version was deployed and passed its checks.
    Deployed {
        version: String,
        /// The version it replaced.
        from: Option<String>,
        /// Something to tell (a medium-risk verification that paused the rollout).
        note: Option<String>,
    },
    /// The deploy failed before touching the running version.
    Abandoned {
        version: String,
        error: String,
        /// Whether it will be retried (transient failure).
        retry: bool,
    },
    /// The deploy failed and the previous release runs again.
    RolledBack {
        version: String,
        /// The version running again.
        to: Option<String>,
        error: String,
    },
    /// The desired version failed here before; not retried.
    SkippedFailed {
        version: String,
        /// Why it failed.
        reason: String,
    },
    /// The coordinator has not given a lease yet (approval, no free slot, unreachable…);
    /// nothing was touched, it is asked again later.
    Waiting {
        version: String,
        /// What the coordinator said.
        reason: String,
        /// When to ask again, in milliseconds.
        retry_after_ms: u64,
    },
    /// The deploy failed and so did its rollback.
    Broken { version: String, error: String },
    /// A job (`kind: job`) is done: it ran here (`elsewhere` absent), or on another host.
    Ran {
        version: String,
        /// What the coordinator said about where it ran.
        elsewhere: Option<String>,
    },
    /// A job's command failed here; it is not run again until a retry or a new version.
    Failed { version: String, error: String },
}

impl Reconciled {
    /// Whether the host ended in its desired state for this service.
    pub fn converged(&self) -> bool {
        matches!(
            self,
            Reconciled::UpToDate { .. }
                | Reconciled::Started { .. }
                | Reconciled::Deployed { .. }
                | Reconciled::Ran { .. }
        )
    }

    /// One line for the CLI and logs.
    pub fn summary(&self) -> String {
        match self {
            Reconciled::UpToDate { version } => format!("{version} running (up to date)"),
            Reconciled::Started { version } => format!("{version} was not running; started"),
            Reconciled::Deployed {
                version,
                from,
                note,
            } => {
                let mut s = match from {
                    Some(f) => format!("deployed {version} (was {f})"),
                    None => format!("deployed {version} (first install)"),
                };
                if let Some(n) = note {
                    s.push_str(&format!("; {n}"));
                }
                s
            }
            Reconciled::Abandoned {
                version,
                error,
                retry,
            } => format!(
                "{version} not deployed{}: {error}",
                if *retry { " (will retry)" } else { "" }
            ),
            Reconciled::RolledBack { version, to, error } => format!(
                "{version} failed and was rolled back to {}: {error}",
                to.as_deref().unwrap_or("nothing (first install)")
            ),
            Reconciled::SkippedFailed { version, reason } => format!(
                "{version} failed here before and is not retried until the desired version changes ({reason})"
            ),
            Reconciled::Waiting {
                version, reason, ..
            } => format!("{version} not deployed yet: {reason}"),
            Reconciled::Broken { version, error } => {
                format!("{version} failed and the rollback failed too; operator needed: {error}")
            }
            Reconciled::Ran {
                version,
                elsewhere: None,
            } => format!("job {version} ran here"),
            Reconciled::Ran {
                version,
                elsewhere: Some(m),
            } => format!("job {version} is done: {m}"),
            Reconciled::Failed { version, error } => format!(
                "job {version} failed: {error}; it is not run again until drover retry or a new version"
            ),
        }
    }
}

impl Reconciled {
    /// The event an ended deploy writes to the log (what, detail), if it is news.
    pub fn event(&self) -> Option<(&'static str, Option<String>)> {
        match self {
            Reconciled::Deployed { from, .. } => Some(("deployed", from.clone())),
            Reconciled::Abandoned { error, .. } => Some(("abandoned", Some(error.clone()))),
            Reconciled::RolledBack { error, .. } => Some(("rolled_back", Some(error.clone()))),
            Reconciled::Broken { error, .. } => Some(("broken", Some(error.clone()))),
            Reconciled::Ran {
                elsewhere: None, ..
            } => Some(("ran", None)),
            Reconciled::Failed { error, .. } => Some(("job_failed", Some(error.clone()))),
            _ => None,
        }
    }
}
