use super::*;
use crate::auth::{Caller, Role};

const T0: u64 = 1_000_000;

fn policy(max_parallel: u32, max_failures: u32) -> Policy {
    Policy {
        max_parallel,
        max_failures,
        approval_required: false,
        approvers: vec![],
        approval_timeout_ms: 60_000,
        promotion_requires: None,
    }
}

fn agent() -> Caller {
    Caller {
        name: "fleet".into(),
        role: Role::Agent,
        groups: vec![],
    }
}

fn person(name: &str, role: Role, groups: &[&str]) -> Caller {
    Caller {
        name: name.into(),
        role,
        groups: groups.iter().map(|g| g.to_string()).collect(),
    }
}

fn req(host: &str, env: &str, version: &str, p: &Policy) -> AcquireRequest {
    AcquireRequest {
        host: host.into(),
        environment: env.into(),
        service: "hello".into(),
        version: version.into(),
        purpose: Purpose::Deploy,
        commit: format!("commit-{version}"),
        commit_time_ms: version.len() as u64 * 1000 + version.bytes().map(u64::from).sum::<u64>(),
        policy: p.clone(),
    }
}

fn core() -> Core {
    Core::new(Snapshot::default(), 30_000, 5_000, T0)
}

fn ok(o: Outcome) -> ReleaseRequest {
    ReleaseRequest {
        outcome: o,
        message: Some(format!("{o:?}")),
        verification: None,
    }
}

fn state(c: &Core, env: &str, version: &str) -> RolloutState {
    c.rollouts[&key(env, "hello", version)].state
}

fn heartbeat(
    c: &mut Core,
    host: &str,
    env: &str,
    desired: &str,
    actual: &str,
    now: u64,
) -> HeartbeatReply {
    c.heartbeat(
        host,
        &Heartbeat {
            environment: env.into(),
            labels: Default::default(),
            agent_version: None,
            services: vec![ServiceReport {
                service: "hello".into(),
                desired: Some(desired.into()),
                actual: Some(actual.into()),
                healthy: true,
                phase: None,
                last_error: None,
            }],
        },
        now,
    )
    .unwrap()
}

#[test]
fn at_most_max_parallel_leases_and_retries_are_idempotent() {
    let mut c = core();
    let p = policy(2, 0);
    let a = c
        .acquire(&req("h1", "prod", "1.0", &p), &agent(), T0)
        .unwrap();
    let b = c
        .acquire(&req("h2", "prod", "1.0", &p), &agent(), T0)
        .unwrap();
    assert_ne!(a.lease.id, b.lease.id);
    let e = c
        .acquire(&req("h3", "prod", "1.0", &p), &agent(), T0)
        .unwrap_err();
    assert_eq!(
        (e.status, e.body.kind.as_str(), e.body.reason.as_deref()),
        (409, "wait", Some("no_slot"))
    );
    // h1 asking again gets its lease back.
    let again = c
        .acquire(&req("h1", "prod", "1.0", &p), &agent(), T0 + 5)
        .unwrap();
    assert_eq!(again.lease.id, a.lease.id);
    c.release(&a.lease.id, &ok(Outcome::Success), T0 + 10)
        .unwrap();
    let g = c
        .acquire(&req("h3", "prod", "1.0", &p), &agent(), T0 + 11)
        .unwrap();
    assert_eq!(g.rollout.leases, 2);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Running);
}

#[test]
fn replayed_and_unknown_releases_change_nothing() {
    let mut c = core();
    let p = policy(1, 0);
    let g = c
        .acquire(&req("h1", "prod", "1.0", &p), &agent(), T0)
        .unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 1)
        .unwrap();
    c.take_changes();
    let before = c.status(T0 + 2);
    let e = c
        .release(&g.lease.id, &ok(Outcome::Failure), T0 + 2)
        .unwrap_err();
    assert_eq!((e.status, e.body.kind.as_str()), (410, "lease_lost"));
    let e = c.renew("nope", T0 + 2).unwrap_err();
    assert_eq!(e.status, 410);
    assert_eq!(c.status(T0 + 2), before);
    assert!(c.take_changes().is_empty());
}

#[test]
fn leases_expire_after_their_ttl_and_survive_a_restart() {
    let mut c = core();
    let p = policy(1, 0);
    let g = c
        .acquire(&req("h1", "prod", "1.0", &p), &agent(), T0)
        .unwrap();
    assert!(c.renew(&g.lease.id, T0 + 20_000).is_ok());
    // Restart: rebuild from what was stored; the lease is there with a fresh TTL.
    let snap = Snapshot {
        rollouts: c.rollouts.values().cloned().collect(),
        leases: vec![g.lease.clone()],
        hosts: vec![],
        last_audit: 10,
    };
    let mut c2 = Core::new(snap, 30_000, 5_000, T0 + 40_000);
    let e = c2
        .acquire(&req("h2", "prod", "1.0", &p), &agent(), T0 + 40_001)
        .unwrap_err();
    assert_eq!(
        e.body.reason.as_deref(),
        Some("no_slot"),
        "the restored lease still holds the slot"
    );
    assert!(c2.renew(&g.lease.id, T0 + 60_000).is_ok());
    // Not renewed for a TTL: it expires and frees the slot.
    c2.tick(T0 + 90_001);
    assert!(c2.renew(&g.lease.id, T0 + 90_002).is_err());
    assert!(
        c2.acquire(&req("h2", "prod", "1.0", &p), &agent(), T0 + 90_003)
            .is_ok()
    );
    let audit: Vec<String> = c2
        .take_changes()
        .into_iter()
        .filter_map(|ch| match ch {
            Change::Audit(a) => Some(a.action),
            _ => None,
        })
        .collect();
    assert!(audit.contains(&"lease_expired".to_string()), "{audit:?}");
}

#[test]
fn approval_gates_the_rollout() {
    let mut c = core();
    let mut p = policy(2, 0);
    p.approval_required = true;
    p.approvers = vec!["release-managers".into()];
    let e = c
        .acquire(&req("h1", "prod", "1.0", &p), &agent(), T0)
        .unwrap_err();
    assert_eq!(e.body.reason.as_deref(), Some("approval_required"));
    assert!(
        e.body.message.contains("drover approve prod hello 1.0"),
        "{}",
        e.body.message
    );
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::ApprovalRequired);
    // Someone outside the group may not approve; the denial is audited.
    let bob = person("bob", Role::Approver, &["qa"]);
    let e = c
        .decide("prod", "hello", "1.0", true, &bob, T0 + 1)
        .unwrap_err();
    assert_eq!(e.status, 403);
    assert!(
        c.take_changes()
            .iter()
            .any(|ch| matches!(ch, Change::Audit(a) if a.action == "denied" && a.actor == "bob"))
    );
    let alice = person("alice", Role::Approver, &["release-managers"]);
    let v = c
        .decide("prod", "hello", "1.0", true, &alice, T0 + 2)
        .unwrap();
    assert_eq!(v.state, RolloutState::Running);
    assert_eq!(v.decision.as_ref().unwrap().by, "alice");
    assert!(
        c.acquire(&req("h1", "prod", "1.0", &p), &agent(), T0 + 3)
            .is_ok()
    );
    // Deciding again is a conflict.
    let e = c
        .decide("prod", "hello", "1.0", true, &alice, T0 + 4)
        .unwrap_err();
    assert_eq!(e.status, 409);
}

#[test]
fn rejection_and_timeout_abort() {
    let mut c = core();
    let mut p = policy(1, 0);
    p.approval_required = true;
    let _ = c.acquire(&req("h1", "prod", "1.0", &p), &agent(), T0);
    let v = c
        .decide(
            "prod",
            "hello",
            "1.0",
            false,
            &person("ann", Role::Approver, &[]),
            T0 + 1,
        )
        .unwrap();
    assert_eq!(v.state, RolloutState::Aborted);
    let e = c
        .acquire(&req("h1", "prod", "1.0", &p), &agent(), T0 + 2)
        .unwrap_err();
    assert_eq!((e.status, e.body.reason.as_deref()), (422, Some("aborted")));

    let _ = c.acquire(&req("h1", "prod", "1.1", &p), &agent(), T0 + 3);
    c.tick(T0 + 3 + 59_000);
    assert_eq!(state(&c, "prod", "1.1"), RolloutState::ApprovalRequired);
    c.tick(T0 + 3 + 60_000);
    assert_eq!(state(&c, "prod", "1.1"), RolloutState::Aborted);
    assert!(
        c.rollouts[&key("prod", "hello", "1.1")]
            .reason
            .as_deref()
            .unwrap()
            .contains("timed out")
    );
}

#[test]
fn promotion_requires_an_upstream_success() {
    let mut c = core();
    let mut p = policy(1, 0);
    p.promotion_requires = Some("staging".into());
    let e = c
        .acquire(&req("p1", "prod", "1.0", &p), &agent(), T0)
        .unwrap_err();
    assert_eq!(e.body.reason.as_deref(), Some("upstream_missing"));
    assert!(
        e.body.message.contains("has not succeeded in staging"),
        "{}",
        e.body.message
    );
    // Staging deploys it on its only host.
    let s = policy(1, 0);
    heartbeat(&mut c, "s1", "staging", "1.0", "0.9", T0 + 1);
    let g = c
        .acquire(&req("s1", "staging", "1.0", &s), &agent(), T0 + 2)
        .unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 3)
        .unwrap();
    assert_eq!(state(&c, "staging", "1.0"), RolloutState::Verifying);
    heartbeat(&mut c, "s1", "staging", "1.0", "1.0", T0 + 4);
    assert_eq!(state(&c, "staging", "1.0"), RolloutState::Success);
    assert!(
        c.acquire(&req("p1", "prod", "1.0", &p), &agent(), T0 + 5)
            .is_ok()
    );
}

#[test]
fn failures_halt_and_revert_the_upgraded_hosts() {
    let mut c = core();
    let p = policy(2, 0);
    for h in ["h1", "h2", "h3", "h4"] {
        heartbeat(&mut c, h, "prod", "2.0", "1.0", T0);
    }
    let g1 = c
        .acquire(&req("h1", "prod", "2.0", &p), &agent(), T0 + 1)
        .unwrap();
    let g2 = c
        .acquire(&req("h2", "prod", "2.0", &p), &agent(), T0 + 1)
        .unwrap();
    c.release(&g1.lease.id, &ok(Outcome::Success), T0 + 2)
        .unwrap();
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 3);
    let v = c
        .release(&g2.lease.id, &ok(Outcome::Failure), T0 + 4)
        .unwrap();
    assert_eq!(v.state, RolloutState::RollingBack);
    assert!(v.reason.unwrap().contains("max_failures 0"));
    // Nobody else starts it.
    let e = c
        .acquire(&req("h3", "prod", "2.0", &p), &agent(), T0 + 5)
        .unwrap_err();
    assert_eq!((e.status, e.body.reason.as_deref()), (422, Some("failed")));
    // h1 is told to revert; h2 (rolled back by itself) and h3 are not.
    let acts = heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 6).actions;
    assert_eq!(acts.len(), 1);
    assert_eq!(
        (acts[0].action.as_str(), acts[0].version.as_str()),
        ("revert", "2.0")
    );
    assert!(
        heartbeat(&mut c, "h2", "prod", "2.0", "1.0", T0 + 6)
            .actions
            .is_empty()
    );
    let mut r = req("h1", "prod", "2.0", &p);
    r.purpose = Purpose::Revert;
    let g = c.acquire(&r, &agent(), T0 + 7).unwrap();
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::RollingBack);
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 8)
        .unwrap();
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Aborted);
    assert_eq!(
        c.rollouts[&key("prod", "hello", "2.0")].reason.as_deref(),
        Some("rolled back")
    );
}

#[test]
fn a_failed_revert_needs_an_operator() {
    let mut c = core();
    let p = policy(1, 0);
    let g = c
        .acquire(&req("h1", "prod", "2.0", &p), &agent(), T0)
        .unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 1)
        .unwrap();
    let g = c
        .acquire(&req("h2", "prod", "2.0", &p), &agent(), T0 + 2)
        .unwrap();
    c.release(&g.lease.id, &ok(Outcome::Failure), T0 + 3)
        .unwrap();
    let mut r = req("h1", "prod", "2.0", &p);
    r.purpose = Purpose::Revert;
    let g = c.acquire(&r, &agent(), T0 + 4).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Failure), T0 + 5)
        .unwrap();
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Failed);
    // Abort is the operator's way out.
    let op = person("ops", Role::Operator, &[]);
    assert_eq!(
        c.operate("prod", "hello", "abort", &op, T0 + 6)
            .unwrap()
            .state,
        RolloutState::Aborted
    );
}

#[test]
fn a_newer_version_supersedes_and_an_older_one_is_stale() {
    let mut c = core();
    let p = policy(1, 0);
    c.acquire(&req("h1", "prod", "1.0", &p), &agent(), T0)
        .unwrap();
    // 1.10 has a newer commit time than 1.0 in these tests.
    c.acquire(&req("h2", "prod", "1.10", &p), &agent(), T0 + 1)
        .unwrap();
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Aborted);
    let e = c
        .acquire(&req("h3", "prod", "1.0", &p), &agent(), T0 + 2)
        .unwrap_err();
    assert_eq!(e.body.reason.as_deref(), Some("superseded"));
    let mut old = req("h3", "prod", "0.9", &p);
    old.commit_time_ms = 1;
    let e = c.acquire(&old, &agent(), T0 + 3).unwrap_err();
    assert_eq!(e.body.reason.as_deref(), Some("stale"));
    assert!(!c.rollouts.contains_key(&key("prod", "hello", "0.9")));
}

#[test]
fn pause_resume_and_abort() {
    let mut c = core();
    let p = policy(1, 0);
    c.acquire(&req("h1", "prod", "1.0", &p), &agent(), T0)
        .unwrap();
    let op = person("ops", Role::Operator, &[]);
    assert_eq!(
        c.operate("prod", "hello", "pause", &op, T0 + 1)
            .unwrap()
            .state,
        RolloutState::Paused
    );
    let e = c
        .acquire(&req("h2", "prod", "1.0", &p), &agent(), T0 + 2)
        .unwrap_err();
    assert_eq!(e.body.reason.as_deref(), Some("paused"));
    let e = c
        .operate("prod", "hello", "pause", &op, T0 + 3)
        .unwrap_err();
    assert_eq!(e.status, 409);
    assert_eq!(
        c.operate("prod", "hello", "resume", &op, T0 + 4)
            .unwrap()
            .state,
        RolloutState::Running
    );
    assert_eq!(
        c.operate("prod", "hello", "abort", &op, T0 + 5)
            .unwrap()
            .state,
        RolloutState::Aborted
    );
    let e = c
        .operate("prod", "hello", "resume", &op, T0 + 6)
        .unwrap_err();
    assert_eq!(e.status, 404);
}

#[test]
fn bad_requests_are_refused_without_changes() {
    let mut c = core();
    let mut r = req("h1", "prod", "1.0", &policy(0, 0));
    assert_eq!(c.acquire(&r, &agent(), T0).unwrap_err().status, 400);
    r.policy.max_parallel = 1;
    r.host = "bad host/../x".into();
    assert_eq!(c.acquire(&r, &agent(), T0).unwrap_err().status, 400);
    let mut r = req("h1", "prod", "1.0", &policy(1, 0));
    r.purpose = Purpose::Revert;
    assert_eq!(c.acquire(&r, &agent(), T0).unwrap_err().status, 404);
    assert!(c.take_changes().is_empty());
    assert!(c.status(T0).rollouts.is_empty());
}

#[test]
fn a_medium_verdict_pauses_the_rollout() {
    let mut c = core();
    let p = policy(2, 0);
    let g = c
        .acquire(&req("h1", "prod", "1.0", &p), &agent(), T0)
        .unwrap();
    let mut r = ok(Outcome::Success);
    r.verification = Some(crate::wire::Verification {
        risk: "medium".into(),
        summary: "error_rate: inconclusive".into(),
    });
    let v = c.release(&g.lease.id, &r, T0 + 1).unwrap();
    assert_eq!(v.state, RolloutState::Paused);
    assert!(v.verdicts["h1"].starts_with("medium"));
    let e = c
        .acquire(&req("h2", "prod", "1.0", &p), &agent(), T0 + 2)
        .unwrap_err();
    assert_eq!(e.body.reason.as_deref(), Some("paused"));
    let op = person("ops", Role::Operator, &[]);
    assert_eq!(
        c.operate("prod", "hello", "resume", &op, T0 + 3)
            .unwrap()
            .state,
        RolloutState::Running
    );
    assert!(
        c.acquire(&req("h2", "prod", "1.0", &p), &agent(), T0 + 4)
            .is_ok()
    );
}

#[test]
fn a_host_that_has_not_fetched_the_commit_yet_keeps_the_rollout_running() {
    let mut c = core();
    let p = policy(1, 0);
    heartbeat(&mut c, "h1", "prod", "2.0", "1.0", T0);
    // h2 polls Git less often: it still reports 1.0 as desired.
    heartbeat(&mut c, "h2", "prod", "1.0", "1.0", T0);
    let g = c
        .acquire(&req("h1", "prod", "2.0", &p), &agent(), T0 + 1)
        .unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 2)
        .unwrap();
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 3);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Running);
    // When h2 gets there and fails, the rollout fails and h1 reverts.
    heartbeat(&mut c, "h2", "prod", "2.0", "1.0", T0 + 4);
    let g = c
        .acquire(&req("h2", "prod", "2.0", &p), &agent(), T0 + 5)
        .unwrap();
    let v = c
        .release(&g.lease.id, &ok(Outcome::Failure), T0 + 6)
        .unwrap();
    assert_eq!(v.state, RolloutState::RollingBack);
}

#[test]
fn a_failure_within_max_failures_does_not_hold_the_rollout_up() {
    let mut c = core();
    let p = policy(1, 1);
    heartbeat(&mut c, "h1", "prod", "2.0", "1.0", T0);
    heartbeat(&mut c, "h2", "prod", "2.0", "1.0", T0);
    let g = c
        .acquire(&req("h1", "prod", "2.0", &p), &agent(), T0 + 1)
        .unwrap();
    c.release(&g.lease.id, &ok(Outcome::Failure), T0 + 2)
        .unwrap();
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Running);
    let g = c
        .acquire(&req("h2", "prod", "2.0", &p), &agent(), T0 + 3)
        .unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 4)
        .unwrap();
    // h1 stays on 1.0 (it rolled back); h2 runs 2.0 healthy.
    heartbeat(&mut c, "h1", "prod", "2.0", "1.0", T0 + 5);
    heartbeat(&mut c, "h2", "prod", "2.0", "2.0", T0 + 5);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Success);
}

#[test]
fn a_host_gone_stale_does_not_hold_the_rollout_up() {
    let mut c = core();
    let p = policy(1, 0);
    heartbeat(&mut c, "h1", "prod", "2.0", "1.0", T0);
    heartbeat(&mut c, "h2", "prod", "1.0", "1.0", T0);
    let g = c
        .acquire(&req("h1", "prod", "2.0", &p), &agent(), T0 + 1)
        .unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 2)
        .unwrap();
    // h2 is not heard from for more than 3 heartbeat intervals (5 s in `core()`).
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 16_000);
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 16_001);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Success);
}
