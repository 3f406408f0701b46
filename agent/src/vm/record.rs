//! The VM machine's record of one service: which release is current and which is the previous
//! one (the backup), which version failed here, and — while a deploy is in flight — its phase
//! and everything needed to finish or undo it after a crash, without Git.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{VmError, VmPhase};
use crate::engine::{self, End, LeaseRecord, Reconciled, StepError};
use crate::fsutil;
use crate::spec::{Digest, ResolvedService};
use crate::state::record;

/// Version of the state file format.
pub const FORMAT: u32 = 1;

/// A release on disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRelease {
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
pub struct VmFailure {
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
pub struct VmFlight {
    /// The phase being executed.
    pub phase: VmPhase,
    /// What is being deployed, fully rendered.
    pub target: ResolvedService,
    /// Directory name of the new release under `releases/`.
    pub dir: String,
    /// The release that was current when the deploy started (the rollback target).
    pub from: Option<VmRelease>,
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
    /// Something to tell with the outcome (a medium-risk verification that paused the rollout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Everything the agent knows about one service on this host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    /// File format version.
    pub format: u32,
    /// Service name.
    pub service: String,
    /// Install root (where `releases/` and `current` live).
    pub root: Option<PathBuf>,
    /// The running release.
    pub current: Option<VmRelease>,
    /// The release before it, kept for rollback.
    pub previous: Option<VmRelease>,
    /// The last version that failed here.
    pub failed: Option<VmFailure>,
    /// A deploy in flight.
    pub deployment: Option<VmFlight>,
    /// The last error (deploy, rollback or supervision), cleared by a successful deploy.
    pub last_error: Option<String>,
    /// The coordinator lease of the deploy in flight, or one whose release is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseRecord>,
    /// A version waiting for its lease (approval, free slot…), to log its retries quietly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// The last metric verification verdict (and the version it was for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<(String, crate::verify::Verdict)>,
    /// Last change (RFC 3339).
    pub updated_at: String,
}

impl VmRecord {
    /// The state of a service never deployed here.
    pub fn new(service: &str) -> VmRecord {
        VmRecord {
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

record!(VmRecord, "services", FORMAT);

engine::ledger!(VmRecord, VmFlight, VmPhase);

/// What the ended deploy `f` leaves in `rec`, and the outcome. Pure: `on_disk` is the release
/// directory `current` points at (after a failed rollback, the record believes the disk).
pub fn settle(
    rec: &mut VmRecord,
    f: &VmFlight,
    end: End,
    cause: Option<&StepError<VmError>>,
    on_disk: Option<&str>,
) -> Reconciled {
    let t = &f.target;
    let version = t.version.clone();
    let error = f.error.clone().unwrap_or_default();
    let failure = || VmFailure {
        version: t.version.clone(),
        sha256: t.sha256.clone(),
        reason: error.clone(),
        at: fsutil::now_rfc3339(),
    };
    rec.waiting = None;
    match end {
        End::Deployed => {
            if let Some(from) = f.from.clone().filter(|p| p.dir != f.dir) {
                rec.previous = Some(from);
            }
            rec.current = Some(VmRelease {
                version: version.clone(),
                sha256: t.sha256.clone(),
                dir: f.dir.clone(),
                spec: Some(Box::new(t.clone())),
            });
            rec.failed = None;
            rec.last_error = None;
            Reconciled::Deployed {
                version,
                from: f.from.as_ref().map(|p| p.version.clone()),
                note: f.note.clone(),
            }
        }
        End::Abandoned => match cause.and_then(StepError::wait) {
            Some((g, after)) => {
                rec.waiting = Some(version.clone());
                rec.last_error = Some(format!("{version}: {g}"));
                Reconciled::Waiting {
                    version,
                    reason: g.to_string(),
                    retry_after_ms: after.as_millis() as u64,
                }
            }
            None => {
                let retry = cause.is_some_and(StepError::is_transient);
                if !retry {
                    rec.failed = Some(failure());
                }
                rec.last_error = Some(format!("{version}: {error}"));
                Reconciled::Abandoned {
                    version,
                    error,
                    retry,
                }
            }
        },
        End::RolledBack => {
            rec.failed = Some(failure());
            rec.current = f.from.clone();
            rec.last_error = Some(format!("{version} rolled back: {error}"));
            Reconciled::RolledBack {
                version,
                to: f.from.as_ref().map(|p| p.version.clone()),
                error,
            }
        }
        End::Broken => {
            rec.failed = Some(failure());
            rec.current = match (on_disk, &f.from) {
                (Some(dir), Some(from)) if dir == from.dir => Some(from.clone()),
                _ => None,
            };
            rec.last_error = Some(format!("{version}: {error}"));
            Reconciled::Broken { version, error }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::coordinator::GateError;
    use crate::release::ReleaseError;

    fn release(version: &str) -> VmRelease {
        VmRelease {
            version: version.into(),
            sha256: Digest::parse(&"a".repeat(64)).unwrap(),
            dir: format!("{version}-dir"),
            spec: None,
        }
    }

    /// A record running 1 (0 before it), and a deploy of 2 from 1 that ended with `error`.
    fn setup(error: Option<&str>) -> (VmRecord, VmFlight) {
        let mut rec = VmRecord::new("hello");
        rec.current = Some(release("1"));
        rec.previous = Some(release("0"));
        rec.waiting = Some("2".into());
        let f = VmFlight {
            phase: VmPhase::Check,
            target: super::super::fixtures::service("2"),
            dir: "2-dir".into(),
            from: Some(release("1")),
            attempts: 1,
            error: error.map(str::to_string),
            touched_at_ms: None,
            started_at: "t".into(),
            note: Some("paused".into()),
        };
        (rec, f)
    }

    #[test]
    fn a_deploy_makes_the_new_release_current_and_the_old_one_previous() {
        let (mut rec, f) = setup(None);
        rec.failed = Some(VmFailure {
            version: "2".into(),
            sha256: Digest::parse(&"a".repeat(64)).unwrap(),
            reason: "earlier".into(),
            at: "t".into(),
        });
        let o = settle(&mut rec, &f, End::Deployed, None, None);
        assert_eq!(
            o,
            Reconciled::Deployed {
                version: "2".into(),
                from: Some("1".into()),
                note: Some("paused".into())
            }
        );
        assert_eq!(rec.current.as_ref().unwrap().dir, "2-dir");
        assert!(rec.current.as_ref().unwrap().spec.is_some());
        assert_eq!(rec.previous, Some(release("1")));
        assert_eq!(
            (rec.failed, rec.waiting, rec.last_error),
            (None, None, None)
        );
    }

    #[test]
    fn no_lease_yet_is_waiting_and_marks_nothing_failed() {
        let (mut rec, f) = setup(Some("lease: not now"));
        let wait = StepError::Gate(GateError::Wait {
            reason: "no_slot".into(),
            message: "busy".into(),
            retry_after: Duration::from_secs(3),
        });
        let o = settle(&mut rec, &f, End::Abandoned, Some(&wait), None);
        assert!(
            matches!(
                o,
                Reconciled::Waiting {
                    retry_after_ms: 3000,
                    ..
                }
            ),
            "{o:?}"
        );
        assert_eq!(rec.waiting.as_deref(), Some("2"));
        assert!(rec.failed.is_none());
        assert_eq!(rec.current, Some(release("1")), "the running version stays");
    }

    #[test]
    fn an_abandoned_deploy_marks_the_version_failed_unless_the_cause_is_transient() {
        let (mut rec, f) = setup(Some("stage: refused"));
        let o = settle(
            &mut rec,
            &f,
            End::Abandoned,
            Some(&StepError::Injected("boom".into())),
            None,
        );
        assert!(matches!(o, Reconciled::Abandoned { retry: false, .. }));
        assert_eq!(rec.failed.as_ref().unwrap().reason, "stage: refused");
        let (mut rec, f) = setup(Some("stage: disk"));
        let full = StepError::Machine(VmError::Release(ReleaseError::Io {
            what: "writing",
            path: "/x".into(),
            source: std::io::Error::other("no space"),
        }));
        let o = settle(&mut rec, &f, End::Abandoned, Some(&full), None);
        assert!(matches!(o, Reconciled::Abandoned { retry: true, .. }));
        assert!(rec.failed.is_none());
        assert_eq!(rec.last_error.as_deref(), Some("2: stage: disk"));
        assert_eq!(rec.waiting, None);
    }

    #[test]
    fn a_rollback_restores_the_old_release_and_marks_the_new_one_failed() {
        let (mut rec, f) = setup(Some("check: unhealthy"));
        let o = settle(&mut rec, &f, End::RolledBack, None, None);
        assert_eq!(
            o,
            Reconciled::RolledBack {
                version: "2".into(),
                to: Some("1".into()),
                error: "check: unhealthy".into()
            }
        );
        assert_eq!(rec.current, Some(release("1")));
        assert_eq!(rec.failed.as_ref().unwrap().version, "2");
    }

    #[test]
    fn a_failed_rollback_believes_the_disk() {
        let (mut rec, f) = setup(Some("check; rollback failed"));
        let o = settle(&mut rec, &f, End::Broken, None, Some("1-dir"));
        assert!(matches!(o, Reconciled::Broken { .. }));
        assert_eq!(rec.current, Some(release("1")));
        let (mut rec, f) = setup(Some("check; rollback failed"));
        settle(&mut rec, &f, End::Broken, None, Some("2-dir"));
        assert_eq!(rec.current, None, "what runs is unknown");
        assert_eq!(rec.failed.as_ref().unwrap().version, "2");
    }
}
