//! The lease lifecycle, written once for every machine: a lease is asked for before the host
//! (or the cluster) is touched, kept alive while the deploy runs, and — once the deploy ends —
//! recorded with its outcome in the service's record until the coordinator has it, so an
//! outcome survives a crash or an unreachable coordinator.

use serde::{Deserialize, Serialize};

use crate::verify::Risk;

/// A coordinator lease, as a machine's record keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "LeaseFile", into = "LeaseFile")]
pub struct LeaseRecord {
    /// The lease id.
    pub id: String,
    /// A revert lease (its success is a rollback) rather than a deploy lease.
    pub revert: bool,
    /// The verification verdict to report with the outcome.
    pub verification: Option<LeaseVerdict>,
    /// Held by the deploy in flight, or ended with an outcome still to deliver.
    pub status: LeaseStatus,
}

/// Where a recorded lease is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseStatus {
    /// The deploy in flight holds it.
    Held,
    /// The deploy ended; its outcome is to be delivered.
    Ended {
        /// Whether the deploy (or, for a revert lease, the rollback) succeeded.
        success: bool,
        /// The error to report with a failure.
        message: Option<String>,
    },
}

/// A verification verdict, as reported with a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseVerdict {
    /// The risk the analysis found.
    pub risk: Risk,
    /// One line of why.
    pub summary: String,
    /// Its metrics' samples, for the coordinator's charts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub charts: Vec<crate::verify::Chart>,
}

impl LeaseRecord {
    /// A lease just granted.
    pub fn held(id: String, revert: bool) -> LeaseRecord {
        LeaseRecord {
            id,
            revert,
            verification: None,
            status: LeaseStatus::Held,
        }
    }

    /// Records how the deploy ended, unless an outcome is already recorded. `deployed` and
    /// `rolled_back` say how it ended; a revert lease succeeds with a rollback.
    pub fn end(&mut self, deployed: bool, rolled_back: bool, message: Option<String>) {
        if self.status == LeaseStatus::Held {
            self.status = LeaseStatus::Ended {
                success: if self.revert { rolled_back } else { deployed },
                message,
            };
        }
    }
}

/// The on-disk shape (the same JSON as before the enum: `success: null` while held).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseFile {
    id: String,
    #[serde(default)]
    revert: bool,
    success: Option<bool>,
    message: Option<String>,
    #[serde(default)]
    verification: Option<LeaseVerdict>,
}

impl From<LeaseFile> for LeaseRecord {
    fn from(f: LeaseFile) -> LeaseRecord {
        LeaseRecord {
            id: f.id,
            revert: f.revert,
            verification: f.verification,
            status: match f.success {
                None => LeaseStatus::Held,
                Some(success) => LeaseStatus::Ended {
                    success,
                    message: f.message,
                },
            },
        }
    }
}

impl From<LeaseRecord> for LeaseFile {
    fn from(l: LeaseRecord) -> LeaseFile {
        let (success, message) = match l.status {
            LeaseStatus::Held => (None, None),
            LeaseStatus::Ended { success, message } => (Some(success), message),
        };
        LeaseFile {
            id: l.id,
            revert: l.revert,
            success,
            message,
            verification: l.verification,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outcome_is_recorded_once_and_a_revert_succeeds_by_rolling_back() {
        let mut l = LeaseRecord::held("l1".into(), false);
        l.end(true, false, None);
        assert_eq!(
            l.status,
            LeaseStatus::Ended {
                success: true,
                message: None
            }
        );
        // A second ending does not overwrite the first.
        l.end(false, true, Some("late".into()));
        assert!(matches!(l.status, LeaseStatus::Ended { success: true, .. }));
        let mut r = LeaseRecord::held("l2".into(), true);
        r.end(false, true, Some("why".into()));
        assert!(matches!(r.status, LeaseStatus::Ended { success: true, .. }));
        let mut r = LeaseRecord::held("l3".into(), true);
        r.end(false, false, Some("broken".into()));
        assert!(matches!(
            r.status,
            LeaseStatus::Ended { success: false, .. }
        ));
    }

    #[test]
    fn the_file_format_is_unchanged() {
        let old = r#"{"id":"l1","revert":false,"success":null,"message":null,"verification":{"risk":"medium","summary":"s"}}"#;
        let l: LeaseRecord = serde_json::from_str(old).unwrap();
        assert_eq!(l.status, LeaseStatus::Held);
        assert_eq!(l.verification.as_ref().unwrap().risk, Risk::Medium);
        assert_eq!(serde_json::to_string(&l).unwrap(), old);
        let ended = r#"{"id":"l1","success":false,"message":"boom"}"#;
        let l: LeaseRecord = serde_json::from_str(ended).unwrap();
        assert_eq!(
            l.status,
            LeaseStatus::Ended {
                success: false,
                message: Some("boom".into())
            }
        );
        assert!(
            serde_json::from_str::<LeaseRecord>(
                r#"{"id":"l","success":null,"message":null,"x":1}"#
            )
            .is_err()
        );
    }
}
