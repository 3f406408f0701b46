//! The ECS machine's record of one service: the live version, the version that failed here,
//! and — while a deploy is in flight — its phase and sides, from which a crash is recovered
//! (with the weights AWS shows).

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Colour, EcsError, EcsPhase};
use crate::engine::{self, End, LeaseRecord, Reconciled, StepError};
use crate::fsutil;
use crate::spec::ResolvedEcsService;
use crate::state::record;

/// Format of the ECS state file.
const FORMAT: u32 = 1;

/// A version running on one side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EcsRelease {
    /// The version, as in the desired state.
    pub version: String,
    /// The container image it runs.
    pub image: String,
    /// The ARN of its task definition revision.
    pub task_definition: String,
    /// The side (`<service>-blue` or `-green`) that runs it.
    pub colour: Colour,
}

/// A version that failed here, with the fingerprint of its definition: it is tried again
/// only when the version or its definition changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EcsFailure {
    /// The version that failed.
    pub version: String,
    /// SHA-256 of its rendered service definition.
    pub fingerprint: String,
    /// Why it failed (the phase and the error).
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
}

/// An ECS deploy in flight: what it deploys, from which side, and how far it got.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EcsFlight {
    /// What is deployed.
    pub target: ResolvedEcsService,
    /// The phase being run.
    pub phase: EcsPhase,
    /// The side live when the deploy started ("blue").
    pub live: Colour,
    /// The new task definition, once registered.
    pub task_definition: Option<String>,
    /// Why it is rolling back, once it is.
    pub error: Option<String>,
    /// The version live when it started.
    #[serde(default)]
    pub from: Option<String>,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// The agent's count of AWS calls when this run of it started (not recorded).
    #[serde(skip)]
    pub calls_before: u64,
}

/// The ECS machine's record of one service (`state_dir/ecs/<service>.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EcsRecord {
    /// File format version.
    pub format: u32,
    /// The ECS service's name in the desired state.
    pub service: String,
    /// The version live behind the listener, as last seen.
    pub current: Option<EcsRelease>,
    /// The version live before the last deploy: what `drover-agent rollback` goes back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<EcsRelease>,
    /// The definition the last deploy deployed, for a rollback that needs no Git.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed: Option<Box<ResolvedEcsService>>,
    /// The last version that failed here; not retried until it or its definition changes.
    pub failed: Option<EcsFailure>,
    /// A deploy in flight (written before each phase).
    pub deployment: Option<EcsFlight>,
    /// The last error, cleared by a successful deploy.
    pub last_error: Option<String>,
    /// The coordinator lease of the deploy in flight, or one whose outcome is undelivered.
    #[serde(default)]
    pub lease: Option<LeaseRecord>,
    /// Last change (RFC 3339).
    pub updated_at: String,
}

record!(EcsRecord, "ecs", FORMAT);

impl EcsRecord {
    /// The record of a service never deployed by this agent.
    pub fn new(service: &str) -> EcsRecord {
        EcsRecord {
            format: FORMAT,
            service: service.into(),
            current: None,
            previous: None,
            deployed: None,
            failed: None,
            deployment: None,
            last_error: None,
            lease: None,
            updated_at: fsutil::now_rfc3339(),
        }
    }
}

engine::ledger!(EcsRecord, EcsFlight, EcsPhase);

/// The SHA-256 of a rendered service definition: a failed version is tried again when it
/// changes.
pub fn fingerprint(s: &ResolvedEcsService) -> String {
    hex::encode(Sha256::digest(serde_json::to_vec(s).expect("serializes")))
}

/// Marks `target` failed here for `reason`.
pub fn failure(target: &ResolvedEcsService, reason: &str) -> EcsFailure {
    EcsFailure {
        version: target.version.clone(),
        fingerprint: fingerprint(target),
        reason: reason.to_string(),
        at: fsutil::now_rfc3339(),
    }
}

/// What the ended deploy `f` leaves in `rec`, and the outcome. Pure. (The live release is
/// recorded by the phase that puts all traffic on it.)
pub fn settle(
    rec: &mut EcsRecord,
    f: &EcsFlight,
    end: End,
    cause: Option<&StepError<EcsError>>,
) -> Reconciled {
    let t = &f.target;
    let version = t.version.clone();
    let error = f.error.clone().unwrap_or_default();
    if end == End::Deployed {
        rec.failed = None;
        rec.last_error = None;
        return Reconciled::Deployed {
            version,
            from: f.from.clone(),
            note: None,
        };
    }
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
        rec.failed = Some(failure(t, &error));
    }
    match end {
        End::Abandoned => Reconciled::Abandoned {
            version,
            error,
            retry,
        },
        End::RolledBack => Reconciled::RolledBack {
            version,
            to: f.from.clone(),
            error,
        },
        _ => Reconciled::Broken { version, error },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::coordinator::GateError;

    fn flight(error: Option<&str>) -> EcsFlight {
        let target: ResolvedEcsService = serde_json::from_value(serde_json::json!({
            "service": "web", "environment": "prod", "version": "2",
            "ecs": {
                "cluster": "c", "task_family": "web", "container": "app", "image": "web:2",
                "desired_count": 2, "listener_arn": "l", "rule_arn": null,
                "tg_blue": "b", "tg_green": "g", "steps": [10, 50, 100], "step_wait": "1s",
                "drain": "1s", "health_timeout": "1m", "launch_type": "FARGATE",
                "container_port": 80, "network": null
            }
        }))
        .unwrap();
        EcsFlight {
            target,
            phase: EcsPhase::Monitoring(50),
            live: Colour::Blue,
            task_definition: Some("td:2".into()),
            error: error.map(str::to_string),
            from: Some("1".into()),
            started_at: "t".into(),
            calls_before: 0,
        }
    }

    #[test]
    fn a_deploy_clears_the_failure_mark() {
        let mut rec = EcsRecord::new("web");
        rec.failed = Some(failure(&flight(None).target, "earlier"));
        rec.last_error = Some("x".into());
        let o = settle(&mut rec, &flight(None), End::Deployed, None);
        assert!(matches!(o, Reconciled::Deployed { ref from, .. } if from.as_deref() == Some("1")));
        assert_eq!((rec.failed, rec.last_error), (None, None));
    }

    #[test]
    fn a_rollback_or_a_refusal_marks_the_version_and_its_definition_failed() {
        let f = flight(Some("monitoring_50: 5xx"));
        let mut rec = EcsRecord::new("web");
        let o = settle(&mut rec, &f, End::RolledBack, None);
        assert!(matches!(o, Reconciled::RolledBack { ref to, .. } if to.as_deref() == Some("1")));
        let mark = rec.failed.unwrap();
        assert_eq!(mark.fingerprint, fingerprint(&f.target));
        assert_eq!(mark.reason, "monitoring_50: 5xx");
        let mut rec = EcsRecord::new("web");
        let refused = StepError::Gate(GateError::Rejected {
            reason: "failed".into(),
            message: "no".into(),
        });
        let o = settle(&mut rec, &f, End::Abandoned, Some(&refused));
        assert!(matches!(o, Reconciled::Abandoned { retry: false, .. }));
        assert!(rec.failed.is_some());
        let mut rec = EcsRecord::new("web");
        assert!(matches!(
            settle(&mut rec, &f, End::Broken, None),
            Reconciled::Broken { .. }
        ));
        assert!(rec.failed.is_some());
    }

    #[test]
    fn waiting_for_a_lease_marks_nothing() {
        let mut rec = EcsRecord::new("web");
        let wait = StepError::Gate(GateError::Wait {
            reason: "approval_required".into(),
            message: "ask".into(),
            retry_after: Duration::from_secs(5),
        });
        let o = settle(
            &mut rec,
            &flight(Some("stable_blue: wait")),
            End::Abandoned,
            Some(&wait),
        );
        assert!(matches!(
            o,
            Reconciled::Waiting {
                retry_after_ms: 5000,
                ..
            }
        ));
        assert!(rec.failed.is_none());
    }
}
