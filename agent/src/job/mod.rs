//! Jobs (`kind: job`): a command from an artifact — a database migration, say — run once per
//! (environment, version) on one matching host. The coordinator's lease of one picks the host;
//! this module is the job's machine: its phases, its record and how a run ends. The I/O (fetch,
//! stage, run) is the VM machine's, in [`runner`].

mod runner;

use serde::{Deserialize, Serialize};

pub use runner::JobRunner;

use crate::coordinator::GateError;
use crate::engine::{self, End, LeaseRecord, Next, Reconciled, StepError};
use crate::fsutil;
use crate::spec::{Dur, ResolvedService};
use crate::state::record;
use crate::vm::VmError;

/// Version of the job record's file format.
pub const FORMAT: u32 = 1;

/// Where a job's run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    /// Asking the coordinator for the job's one lease.
    Lease,
    /// Downloading the artifact and checking its digest.
    Fetch,
    /// Extracting it into `releases/<version>` (templates, shared dirs).
    Stage,
    /// Running `run.command`, up to `timeout`.
    Run,
    /// It exited 0.
    Done,
}

impl JobPhase {
    /// The phase's name in logs, events and status.
    pub fn name(self) -> &'static str {
        match self {
            JobPhase::Lease => "lease",
            JobPhase::Fetch => "fetch",
            JobPhase::Stage => "stage",
            JobPhase::Run => "run",
            JobPhase::Done => "done",
        }
    }

    /// Where it leads when it succeeds.
    pub fn on_success(self) -> Next<JobPhase> {
        match self {
            JobPhase::Lease => Next::Phase(JobPhase::Fetch),
            JobPhase::Fetch => Next::Phase(JobPhase::Stage),
            JobPhase::Stage => Next::Phase(JobPhase::Run),
            JobPhase::Run => Next::Phase(JobPhase::Done),
            JobPhase::Done => Next::End(End::Deployed),
        }
    }

    /// Where it leads when it fails: before the command ran nothing happened (the run is
    /// abandoned, and tried again if the failure may pass); a failed command fails the job
    /// (it is not run again by itself: `drover retry` or a new version).
    pub fn on_failure(self) -> Next<JobPhase> {
        match self {
            JobPhase::Lease | JobPhase::Fetch | JobPhase::Stage => Next::End(End::Abandoned),
            JobPhase::Run => Next::End(End::Broken),
            JobPhase::Done => Next::End(End::Deployed),
        }
    }
}

/// A version of the job that is done as far as this host is concerned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobDone {
    /// The version.
    pub version: String,
    /// Where it ran: absent when here, else what the coordinator said (`… ran on web-02`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elsewhere: Option<String>,
    /// Its output's last lines (redacted), when it ran here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// When (RFC 3339).
    pub at: String,
}

/// A version of the job that failed here; not run again until a retry or a new version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFailure {
    /// The version.
    pub version: String,
    /// Why.
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
}

/// A run in flight, recorded before each phase (write-ahead).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFlight {
    /// The phase being executed.
    pub phase: JobPhase,
    /// What runs, fully rendered.
    pub target: ResolvedService,
    /// How long the command may run.
    pub timeout: Dur,
    /// Its release directory under `releases/`.
    pub dir: String,
    /// Why it failed, once it did.
    pub error: Option<String>,
    /// The command's output (redacted), once it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// When it started (RFC 3339).
    pub started_at: String,
}

/// Everything this host knows about one job (`state_dir/jobs/<service>.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRecord {
    /// File format version.
    pub format: u32,
    /// The job's name.
    pub service: String,
    /// The last version done (here or elsewhere).
    pub done: Option<JobDone>,
    /// The last version that failed here.
    pub failed: Option<JobFailure>,
    /// A run in flight.
    pub deployment: Option<JobFlight>,
    /// The last error, cleared by a run that succeeds.
    pub last_error: Option<String>,
    /// The coordinator lease of the run in flight, or one whose outcome is undelivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseRecord>,
    /// Last change (RFC 3339).
    pub updated_at: String,
}

record!(JobRecord, "jobs", FORMAT);

engine::ledger!(JobRecord, JobFlight, JobPhase);

impl JobRecord {
    /// The record of a job this host never ran or heard of.
    pub fn new(service: &str) -> JobRecord {
        JobRecord {
            format: FORMAT,
            service: service.to_string(),
            done: None,
            failed: None,
            deployment: None,
            last_error: None,
            lease: None,
            updated_at: fsutil::now_rfc3339(),
        }
    }
}

/// What this host does about `version` of the job given its record. Pure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobNeed {
    /// A run was interrupted: finish or settle it first.
    Recover,
    /// It is done (here or elsewhere).
    Done,
    /// It failed here: not again until a retry or a new version.
    SkipFailed {
        /// Why it failed.
        reason: String,
    },
    /// Ask for the lease and run it.
    Run,
}

/// Decides what `version` of the job needs on this host.
pub fn decide(rec: &JobRecord, version: &str) -> JobNeed {
    if rec.deployment.is_some() {
        return JobNeed::Recover;
    }
    if rec.done.as_ref().is_some_and(|d| d.version == version) {
        return JobNeed::Done;
    }
    match &rec.failed {
        Some(f) if f.version == version => JobNeed::SkipFailed {
            reason: f.reason.clone(),
        },
        _ => JobNeed::Run,
    }
}

/// What the ended run `f` leaves in `rec`, and the outcome. Pure.
pub fn settle(
    rec: &mut JobRecord,
    f: &JobFlight,
    end: End,
    cause: Option<&StepError<VmError>>,
) -> Reconciled {
    let version = f.target.version.clone();
    let error = f.error.clone().unwrap_or_default();
    if end == End::Deployed {
        rec.failed = None;
        rec.last_error = None;
        rec.done = Some(JobDone {
            version: version.clone(),
            elsewhere: None,
            output: f.output.clone(),
            at: fsutil::now_rfc3339(),
        });
        return Reconciled::Ran {
            version,
            elsewhere: None,
        };
    }
    // Another host ran it: this one is done with it too.
    if let Some(StepError::Gate(GateError::Rejected { reason, message })) = cause
        && reason == "done"
    {
        rec.failed = None;
        rec.last_error = None;
        rec.done = Some(JobDone {
            version: version.clone(),
            elsewhere: Some(message.clone()),
            output: None,
            at: fsutil::now_rfc3339(),
        });
        return Reconciled::Ran {
            version,
            elsewhere: Some(message.clone()),
        };
    }
    // Recorded for waits too, so `drover-agent status` says why this host waits.
    rec.last_error = Some(format!("{version}: {error}"));
    if end == End::Abandoned
        && let Some((g, after)) = cause.and_then(StepError::wait)
    {
        return Reconciled::Waiting {
            version,
            reason: g.to_string(),
            retry_after_ms: after.as_millis() as u64,
        };
    }
    let retry = end == End::Abandoned && cause.is_some_and(StepError::is_transient);
    if !retry {
        rec.failed = Some(JobFailure {
            version: version.clone(),
            reason: error.clone(),
            at: fsutil::now_rfc3339(),
        });
    }
    match end {
        End::Abandoned => Reconciled::Abandoned {
            version,
            error,
            retry,
        },
        _ => Reconciled::Failed { version, error },
    }
}

#[cfg(test)]
mod tests;
