use std::time::Duration;

use super::*;
use crate::vm::fixtures::service;

fn flight(version: &str, phase: JobPhase) -> JobFlight {
    JobFlight {
        phase,
        target: service(version),
        timeout: Dur::secs(60),
        dir: version.into(),
        error: None,
        output: None,
        started_at: "2026-12-03T00:00:00Z".into(),
    }
}

#[test]
fn phases_run_in_order_and_only_a_failed_command_fails_the_job() {
    let mut p = JobPhase::Lease;
    let mut seen = vec![p];
    while let Next::Phase(n) = p.on_success() {
        seen.push(n);
        p = n;
    }
    assert_eq!(
        seen,
        [
            JobPhase::Lease,
            JobPhase::Fetch,
            JobPhase::Stage,
            JobPhase::Run,
            JobPhase::Done
        ]
    );
    assert_eq!(JobPhase::Done.on_success(), Next::End(End::Deployed));
    for p in [JobPhase::Lease, JobPhase::Fetch, JobPhase::Stage] {
        assert_eq!(p.on_failure(), Next::End(End::Abandoned), "{p:?}");
    }
    assert_eq!(JobPhase::Run.on_failure(), Next::End(End::Broken));
}

#[test]
fn decide_runs_a_version_once_and_not_after_it_failed() {
    let mut rec = JobRecord::new("hello");
    assert_eq!(decide(&rec, "5"), JobNeed::Run);
    rec.done = Some(JobDone {
        version: "5".into(),
        elsewhere: Some("ran on web-02".into()),
        output: None,
        at: "t".into(),
    });
    assert_eq!(decide(&rec, "5"), JobNeed::Done);
    assert_eq!(decide(&rec, "6"), JobNeed::Run);
    rec.failed = Some(JobFailure {
        version: "6".into(),
        reason: "exit 3".into(),
        at: "t".into(),
    });
    assert_eq!(
        decide(&rec, "6"),
        JobNeed::SkipFailed {
            reason: "exit 3".into()
        }
    );
    rec.deployment = Some(flight("6", JobPhase::Run));
    assert_eq!(decide(&rec, "6"), JobNeed::Recover);
}

#[test]
fn settle_records_where_it_ran_what_failed_and_what_waits() {
    // Ran here.
    let mut rec = JobRecord::new("hello");
    let mut f = flight("5", JobPhase::Done);
    f.output = Some("migrated 3 tables".into());
    let o = settle(&mut rec, &f, End::Deployed, None);
    assert_eq!(
        o,
        Reconciled::Ran {
            version: "5".into(),
            elsewhere: None
        }
    );
    let done = rec.done.clone().unwrap();
    assert_eq!(
        (done.version.as_str(), done.output.as_deref()),
        ("5", Some("migrated 3 tables"))
    );

    // Another host ran it: done here too, nothing marked failed, no wait left to report.
    let mut rec = JobRecord::new("hello");
    rec.last_error = Some("5: waiting: job_running".into());
    let cause = StepError::Gate(GateError::Rejected {
        reason: "done".into(),
        message: "prod/hello/5 ran on web-02".into(),
    });
    let o = settle(
        &mut rec,
        &flight("5", JobPhase::Lease),
        End::Abandoned,
        Some(&cause),
    );
    assert!(o.converged(), "{o:?}");
    assert_eq!(
        rec.done.unwrap().elsewhere.as_deref(),
        Some("prod/hello/5 ran on web-02")
    );
    assert!(rec.failed.is_none() && rec.last_error.is_none());

    // Another host runs it now: wait, with the reason for `status`, and neither done nor
    // failed.
    let mut rec = JobRecord::new("hello");
    let cause = StepError::Gate(GateError::Wait {
        reason: "job_running".into(),
        message: "runs on web-02".into(),
        retry_after: Duration::from_secs(5),
    });
    let mut f = flight("5", JobPhase::Lease);
    f.error = Some(cause.to_string());
    let o = settle(&mut rec, &f, End::Abandoned, Some(&cause));
    assert!(
        rec.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("5: ") && e.contains("runs on web-02")),
        "{:?}",
        rec.last_error
    );
    assert!(
        matches!(
            o,
            Reconciled::Waiting {
                retry_after_ms: 5000,
                ..
            }
        ),
        "{o:?}"
    );
    assert!(rec.done.is_none() && rec.failed.is_none());

    // The coordinator refuses it (its rollout failed): marked failed here.
    let mut rec = JobRecord::new("hello");
    let cause = StepError::Gate(GateError::Rejected {
        reason: "failed".into(),
        message: "failed on web-02".into(),
    });
    let mut f = flight("5", JobPhase::Lease);
    f.error = Some("lease: refused".into());
    settle(&mut rec, &f, End::Abandoned, Some(&cause));
    assert_eq!(rec.failed.unwrap().version, "5");

    // The command failed: the job failed here, with why.
    let mut rec = JobRecord::new("hello");
    let mut f = flight("5", JobPhase::Run);
    f.error = Some("run: exited with status 3".into());
    let o = settle(&mut rec, &f, End::Broken, None);
    assert_eq!(
        o,
        Reconciled::Failed {
            version: "5".into(),
            error: "run: exited with status 3".into()
        }
    );
    assert!(!o.converged());
    assert_eq!(rec.failed.unwrap().reason, "run: exited with status 3");
    assert_eq!(
        rec.last_error.as_deref(),
        Some("5: run: exited with status 3")
    );
}

#[test]
fn the_record_round_trips_and_refuses_unknown_fields() {
    let mut rec = JobRecord::new("hello");
    rec.deployment = Some(flight("5", JobPhase::Stage));
    let json = serde_json::to_string(&rec).unwrap();
    assert_eq!(serde_json::from_str::<JobRecord>(&json).unwrap(), rec);
    let bad = json.replacen("\"format\"", "\"formt\"", 1);
    assert!(serde_json::from_str::<JobRecord>(&bad).is_err());
}
