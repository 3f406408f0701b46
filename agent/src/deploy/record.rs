//! The VM machine's record of one service: which release is current and which is the previous
//! one (the backup), which version failed here, and — while a deploy is in flight — its phase
//! and everything needed to finish or undo it after a crash, without Git.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Phase;
use crate::fsutil;
use crate::spec::{Digest, ResolvedService};
use crate::state::{LeaseState, record};

/// Version of the state file format.
pub const FORMAT: u32 = 1;

/// A release on disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// The version.
    pub version: String,
    /// The artifact digest it was built from.
    pub sha256: Digest,
    /// Its directory name under `root/releases/`.
    pub dir: String,
    /// How it was run (rendered service definition), to restart it on rollback. Absent when
    /// the state was rebuilt from disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Box<ResolvedService>>,
}

/// A version that failed on this host and is not retried until the desired version changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    /// The version.
    pub version: String,
    /// Its digest.
    pub sha256: Digest,
    /// Why it failed.
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
}

/// A deploy in flight, recorded before each phase starts (write-ahead).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// The phase being executed.
    pub phase: Phase,
    /// What is being deployed, fully rendered.
    pub target: ResolvedService,
    /// Directory name of the new release under `releases/`.
    pub dir: String,
    /// The release that was current when the deploy started (the rollback target).
    pub from: Option<Release>,
    /// How many times this deploy was started (a crash during it counts as an attempt).
    pub attempts: u32,
    /// Why the deploy is rolling back, once it is.
    pub error: Option<String>,
    /// When the running version was first touched (ms since the epoch): the end of the
    /// "before the switch" baseline window of metric verification.
    #[serde(default)]
    pub touched_at_ms: Option<u64>,
    /// When it started (RFC 3339).
    pub started_at: String,
}

/// Everything the agent knows about one service on this host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceState {
    /// File format version.
    pub format: u32,
    /// Service name.
    pub service: String,
    /// Install root (where `releases/` and `current` live).
    pub root: Option<PathBuf>,
    /// The running release.
    pub current: Option<Release>,
    /// The release before it, kept for rollback.
    pub previous: Option<Release>,
    /// The last version that failed here.
    pub failed: Option<Failure>,
    /// A deploy in flight.
    pub deployment: Option<Deployment>,
    /// The last error (deploy, rollback or supervision), cleared by a successful deploy.
    pub last_error: Option<String>,
    /// The coordinator lease of the deploy in flight, or one whose release is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseState>,
    /// A version waiting for its lease (approval, free slot…), to log its retries quietly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// The last metric verification verdict (and the version it was for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<(String, crate::verify::Verdict)>,
    /// Last change (RFC 3339).
    pub updated_at: String,
}

impl ServiceState {
    /// The state of a service never deployed here.
    pub fn new(service: &str) -> ServiceState {
        ServiceState {
            format: FORMAT,
            service: service.to_string(),
            root: None,
            current: None,
            previous: None,
            failed: None,
            deployment: None,
            last_error: None,
            lease: None,
            waiting: None,
            verdict: None,
            updated_at: fsutil::now_rfc3339(),
        }
    }
}

record!(ServiceState, "services", FORMAT);
