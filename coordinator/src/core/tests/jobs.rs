//! Jobs (`kind: job`): once per version, on one host, under a lease of one.

use super::*;

/// One commit pinning the job `migrate` at `job` and hello at `hello`, hello after migrate.
fn push_job(c: &mut Core, job: &str, hello: &str, now: u64) {
    let d = Desired {
        commit: format!("j{now:x}"),
        commit_time_ms: now,
        fetched_at_ms: now,
        environments: BTreeMap::from([(
            "prod".to_string(),
            EnvDesired {
                policy: policy(2, 0),
                services: BTreeMap::from([
                    ("hello".to_string(), hello.to_string()),
                    ("migrate".to_string(), job.to_string()),
                ]),
                after: BTreeMap::from([("hello".to_string(), vec!["migrate".to_string()])]),
                freeze: vec![],
                jobs: BTreeSet::from(["migrate".to_string()]),
                notify: vec![],
            },
        )]),
    };
    c.apply_desired(d, now);
}

fn run(c: &mut Core, host: &str, version: &str, now: u64) -> Result<Granted, ApiError> {
    let mut r = req(c, host, "prod", version);
    r.service = "migrate".into();
    c.acquire(&r, &agent(), now)
}

fn job<'a>(c: &'a Core, version: &str) -> &'a Rollout {
    let id = c
        .newest("prod", "migrate", Some(version))
        .expect("a job rollout");
    &c.rollouts[&id]
}

fn failed_report(version: &str) -> ServiceReport {
    ServiceReport {
        service: "migrate".into(),
        desired: Some(version.into()),
        actual: None,
        healthy: true,
        phase: None,
        last_error: None,
        failed: Some(version.into()),
    }
}

#[test]
fn a_job_runs_once_on_one_host_and_the_service_after_it_then_rolls() {
    let mut c = core();
    push_job(&mut c, "5", "1.0", T0);
    assert!(job(&c, "5").job);
    assert_eq!(job(&c, "5").state, RolloutState::Running);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Pending);
    // Two hosts of max_parallel 2 ask: one runs it.
    let g = run(&mut c, "h1", "5", T0 + 1).unwrap();
    let e = run(&mut c, "h2", "5", T0 + 2).unwrap_err();
    assert_eq!(
        (e.status, e.body.reason.as_deref()),
        (409, Some("job_running"))
    );
    assert!(e.body.message.contains("runs on h1"), "{}", e.body.message);
    // The holder asking again keeps its lease.
    assert_eq!(run(&mut c, "h1", "5", T0 + 3).unwrap().lease.id, g.lease.id);
    let view = c.status(T0 + 60_000).rollouts;
    let five = view.iter().find(|r| r.service == "migrate").unwrap();
    assert!(five.job);
    assert_eq!(
        five.waiting_for.as_deref(),
        Some("h1 to finish the job, for 60s")
    );
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 4)
        .unwrap();
    let r = job(&c, "5");
    assert_eq!(r.state, RolloutState::Success);
    assert_eq!(r.reason.as_deref(), Some("the job ran on h1"));
    // Nobody runs it again, h1 included.
    for h in ["h1", "h2", "h3"] {
        let e = run(&mut c, h, "5", T0 + 5).unwrap_err();
        assert_eq!(
            (e.status, e.body.reason.as_deref()),
            (422, Some("done")),
            "{h}"
        );
        assert!(
            e.body.message.contains("ran on h1 (kind: job)"),
            "{}",
            e.body.message
        );
    }
    // The service after it starts.
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Running);
    assert!(acquire(&mut c, "h1", "prod", "1.0", T0 + 6).is_ok());
    // Going back to a version that ran runs nothing again.
    push_job(&mut c, "6", "1.0", T0 + 10);
    let six = run(&mut c, "h2", "6", T0 + 11).unwrap();
    c.release(&six.lease.id, &ok(Outcome::Success), T0 + 12)
        .unwrap();
    let rollouts = c.rollouts.len();
    push_job(&mut c, "5", "1.0", T0 + 20);
    assert_eq!(
        c.rollouts.len(),
        rollouts,
        "no new rollout of a version that ran"
    );
    assert_eq!(run(&mut c, "h3", "5", T0 + 21).unwrap_err().status, 422);
    assert!(c.illegal.is_empty(), "{:?}", c.illegal);
}

#[test]
fn a_failed_job_holds_the_pipeline_reverts_nothing_and_retry_runs_it_again() {
    let mut c = core();
    push_job(&mut c, "5", "1.0", T0);
    beat(&mut c, "h1", "prod", failed_report("5"), T0);
    let g = run(&mut c, "h1", "5", T0 + 1).unwrap();
    c.release(
        &g.lease.id,
        &ReleaseRequest {
            outcome: Outcome::Failure,
            message: Some("run: exited with status 3".into()),
            verification: None,
        },
        T0 + 2,
    )
    .unwrap();
    let r = job(&c, "5");
    assert_eq!(r.state, RolloutState::Failed);
    assert_eq!(
        r.reason.as_deref(),
        Some(
            "the job failed on h1: run: exited with status 3; drover retry prod migrate runs it again"
        )
    );
    c.tick(T0 + 2 + SWEEP_MS);
    assert_eq!(
        job(&c, "5").state,
        RolloutState::Failed,
        "nothing to revert"
    );
    let acts = beat(&mut c, "h1", "prod", failed_report("5"), T0 + 3).actions;
    assert!(
        acts.iter().all(|a| a.action != ActionKind::Revert),
        "{acts:?}"
    );
    // The service after it waits, saying why.
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Pending);
    let e = acquire(&mut c, "h2", "prod", "1.0", T0 + 4).unwrap_err();
    assert!(e.body.message.contains("migrate 5"), "{}", e.body.message);
    assert_eq!(run(&mut c, "h2", "5", T0 + 4).unwrap_err().status, 422);
    // drover retry: a new attempt; the host that failed is told to forget it.
    let ops = person("ops", Role::Operator, &[]);
    c.retry("prod", "migrate", &ops, T0 + 5).unwrap();
    assert_eq!(job(&c, "5").attempt, 2);
    assert_eq!(job(&c, "5").state, RolloutState::Running);
    let acts = beat(&mut c, "h1", "prod", failed_report("5"), T0 + 6).actions;
    assert!(
        acts.iter()
            .any(|a| a.action == ActionKind::Retry && a.version == "5"),
        "{acts:?}"
    );
    let g = run(&mut c, "h2", "5", T0 + 7).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 8)
        .unwrap();
    assert_eq!(job(&c, "5").state, RolloutState::Success);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Running);
    // A job is not rolled back.
    let e = c
        .rollback("prod", "migrate", None, &ops, T0 + 9)
        .unwrap_err();
    assert_eq!(e.status, 409);
    assert!(e.body.message.contains("is a job"), "{}", e.body.message);
    assert!(c.illegal.is_empty(), "{:?}", c.illegal);
}

#[test]
fn a_job_whose_host_went_silent_is_not_run_twice() {
    let mut c = core();
    push_job(&mut c, "5", "1.0", T0);
    let g = run(&mut c, "h1", "5", T0 + 1).unwrap();
    // h1 stops renewing: its lease expires, but it may still be running the command.
    c.tick(T0 + 1 + 31_000);
    let e = run(&mut c, "h2", "5", T0 + 32_001).unwrap_err();
    assert_eq!(
        (e.status, e.body.reason.as_deref()),
        (409, Some("job_running"))
    );
    assert!(
        e.body.message.contains("its lease expired"),
        "{}",
        e.body.message
    );
    // Its late outcome counts.
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 40_000)
        .unwrap();
    assert_eq!(job(&c, "5").state, RolloutState::Success);

    // No outcome at all within a day: it fails, for a person to retry.
    let mut c = core();
    push_job(&mut c, "5", "1.0", T0);
    run(&mut c, "h1", "5", T0 + 1).unwrap();
    c.tick(T0 + 1 + 31_000);
    c.tick(T0 + 1 + 31_000 + EXPIRED_KEPT_MS + SWEEP_MS + 1);
    let r = job(&c, "5");
    assert_eq!(r.state, RolloutState::Failed);
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("may or may not have run"),
        "{r:?}"
    );
    assert!(c.illegal.is_empty(), "{:?}", c.illegal);
}
