use super::*;
use crate::auth::{Caller, Role};
use crate::wire::{
    AcquireRequest, ActionKind, Granted, Heartbeat, HeartbeatReply, Outcome, Purpose,
    ReleaseRequest,
};

mod jobs;
mod notices;
mod pipeline;
mod props;

const T0: u64 = 1_000_000;

fn policy(max_parallel: u32, max_failures: u32) -> Policy {
    Policy {
        max_parallel,
        max_failures,
        approval_required: false,
        approvers: vec![],
        approval_timeout_ms: 60_000,
        promotion_requires: None,
        rollbacks_need_approval: false,
        approve_after_first_batch: false,
    }
}

fn agent() -> Caller {
    Caller {
        name: "fleet".into(),
        role: Role::Agent,
        groups: vec![],
        host: None,
    }
}

fn person(name: &str, role: Role, groups: &[&str]) -> Caller {
    Caller {
        name: name.into(),
        role,
        groups: groups.iter().map(|g| g.to_string()).collect(),
        host: None,
    }
}

/// Commits hello `version` with policy `p` to environment `env` (other environments as they
/// were), and has the core read it at `now`. Returns the commit.
fn push(c: &mut Core, env: &str, version: &str, p: &Policy, now: u64) -> String {
    let mut d = c.desired.clone().unwrap_or(Desired {
        commit: String::new(),
        commit_time_ms: 0,
        fetched_at_ms: 0,
        environments: BTreeMap::new(),
    });
    let n = c.rollouts.len() + d.environments.len() + now as usize;
    d.commit = format!("c{n:x}");
    d.commit_time_ms = now;
    d.fetched_at_ms = now;
    let e = d.environments.entry(env.into()).or_insert(EnvDesired {
        policy: p.clone(),
        services: BTreeMap::new(),
        after: BTreeMap::new(),
        freeze: vec![],
        jobs: Default::default(),
        notify: vec![],
    });
    e.policy = p.clone();
    e.services.insert("hello".into(), version.into());
    let commit = d.commit.clone();
    c.apply_desired(d, now);
    commit
}

fn req(c: &Core, host: &str, env: &str, version: &str) -> AcquireRequest {
    AcquireRequest {
        host: host.into(),
        environment: env.into(),
        service: "hello".into(),
        version: version.into(),
        purpose: Purpose::Deploy,
        commit: c.tip.clone().unwrap_or_else(|| "c0".into()),
    }
}

fn acquire(
    c: &mut Core,
    host: &str,
    env: &str,
    version: &str,
    now: u64,
) -> Result<Granted, ApiError> {
    let r = req(c, host, env, version);
    c.acquire(&r, &agent(), now)
}

fn revert(
    c: &mut Core,
    host: &str,
    env: &str,
    version: &str,
    now: u64,
) -> Result<Granted, ApiError> {
    let mut r = req(c, host, env, version);
    r.purpose = Purpose::Revert;
    c.acquire(&r, &agent(), now)
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

/// The newest rollout of hello `version` in `env`.
fn rollout<'a>(c: &'a Core, env: &str, version: &str) -> &'a Rollout {
    let id = c.newest(env, "hello", Some(version)).expect("a rollout");
    &c.rollouts[&id]
}

fn state(c: &Core, env: &str, version: &str) -> RolloutState {
    rollout(c, env, version).state
}

fn report(desired: &str, actual: &str, healthy: bool) -> ServiceReport {
    ServiceReport {
        service: "hello".into(),
        desired: Some(desired.into()),
        actual: Some(actual.into()),
        healthy,
        phase: None,
        last_error: None,
        failed: None,
    }
}

fn beat(c: &mut Core, host: &str, env: &str, s: ServiceReport, now: u64) -> HeartbeatReply {
    c.heartbeat(
        host,
        &Heartbeat {
            environment: env.into(),
            labels: Default::default(),
            agent_version: None,
            commit: c.tip.clone(),
            services: vec![s],
        },
        &agent(),
        now,
    )
    .unwrap()
}

fn heartbeat(
    c: &mut Core,
    host: &str,
    env: &str,
    desired: &str,
    actual: &str,
    now: u64,
) -> HeartbeatReply {
    beat(c, host, env, report(desired, actual, true), now)
}

fn audit(changes: &[Change]) -> Vec<(String, String, String)> {
    changes
        .iter()
        .filter_map(|ch| match ch {
            Change::Audit(a) => Some((a.actor.clone(), a.action.clone(), a.detail.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn nothing_moves_before_the_desired_state_is_read() {
    let mut c = core();
    let e = acquire(&mut c, "h1", "prod", "1.0", T0).unwrap_err();
    assert_eq!(
        (e.status, e.body.reason.as_deref()),
        (409, Some("no_desired_state"))
    );
    assert!(c.take_wake(), "the coordinator fetches at once");
    assert!(c.rollouts.is_empty());
}

#[test]
fn at_most_max_parallel_leases_and_retries_are_idempotent() {
    let mut c = core();
    push(&mut c, "prod", "1.0", &policy(2, 0), T0);
    let a = acquire(&mut c, "h1", "prod", "1.0", T0).unwrap();
    let b = acquire(&mut c, "h2", "prod", "1.0", T0).unwrap();
    assert_ne!(a.lease.id, b.lease.id);
    let e = acquire(&mut c, "h3", "prod", "1.0", T0).unwrap_err();
    assert_eq!(
        (e.status, e.body.kind.as_str(), e.body.reason.as_deref()),
        (409, "wait", Some("no_slot"))
    );
    // h1 asking again gets its lease back.
    let again = acquire(&mut c, "h1", "prod", "1.0", T0 + 5).unwrap();
    assert_eq!(again.lease.id, a.lease.id);
    c.release(&a.lease.id, &ok(Outcome::Success), T0 + 10)
        .unwrap();
    let g = acquire(&mut c, "h3", "prod", "1.0", T0 + 11).unwrap();
    assert_eq!(g.rollout.leases, 2);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Running);
}

#[test]
fn replayed_and_unknown_releases_change_nothing() {
    let mut c = core();
    push(&mut c, "prod", "1.0", &policy(1, 0), T0);
    let g = acquire(&mut c, "h1", "prod", "1.0", T0).unwrap();
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
    push(&mut c, "prod", "1.0", &policy(1, 0), T0);
    let g = acquire(&mut c, "h1", "prod", "1.0", T0).unwrap();
    assert!(c.renew(&g.lease.id, T0 + 20_000).is_ok());
    // Restart: rebuild from what was stored; the lease is there with a fresh TTL.
    let snap = Snapshot {
        rollouts: c.rollouts.values().cloned().collect(),
        leases: vec![g.lease.clone()],
        hosts: vec![],
        last_audit: 10,
        desired: c.desired.clone(),
        refused: None,
        overrides: vec![],
        ..Snapshot::default()
    };
    let mut c2 = Core::new(snap, 30_000, 5_000, T0 + 40_000);
    let e = acquire(&mut c2, "h2", "prod", "1.0", T0 + 40_001).unwrap_err();
    assert_eq!(
        e.body.reason.as_deref(),
        Some("no_slot"),
        "the restored lease still holds the slot"
    );
    assert!(c2.renew(&g.lease.id, T0 + 60_000).is_ok());
    // Not renewed for a TTL: it expires and frees the slot.
    c2.tick(T0 + 90_001);
    assert!(c2.renew(&g.lease.id, T0 + 90_002).is_err());
    assert!(acquire(&mut c2, "h2", "prod", "1.0", T0 + 90_003).is_ok());
    let audit = audit(&c2.take_changes());
    assert!(audit.iter().any(|a| a.1 == "lease_expired"), "{audit:?}");
}

#[test]
fn approval_gates_the_rollout_whatever_the_hosts_say() {
    let mut c = core();
    let mut p = policy(2, 0);
    p.approval_required = true;
    p.approvers = vec!["release-managers".into()];
    push(&mut c, "prod", "1.0", &p, T0);
    // The rollout waits before any host asks: the policy is Git's.
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::ApprovalRequired);
    let e = acquire(&mut c, "h1", "prod", "1.0", T0).unwrap_err();
    assert_eq!(e.body.reason.as_deref(), Some("approval_required"));
    assert!(
        e.body.message.contains("drover approve prod hello 1.0"),
        "{}",
        e.body.message
    );
    // Someone outside the group may not approve; the denial is audited.
    let bob = person("bob", Role::Approver, &["qa"]);
    let e = c
        .decide("prod", "hello", "1.0", true, &bob, T0 + 1)
        .unwrap_err();
    assert_eq!(e.status, 403);
    assert!(
        audit(&c.take_changes())
            .iter()
            .any(|(who, what, _)| what == "denied" && who == "bob")
    );
    let alice = person("alice", Role::Approver, &["release-managers"]);
    let v = c
        .decide("prod", "hello", "1.0", true, &alice, T0 + 2)
        .unwrap();
    assert_eq!(v.state, RolloutState::Running);
    assert_eq!(v.decision.as_ref().unwrap().by, "alice");
    assert!(acquire(&mut c, "h1", "prod", "1.0", T0 + 3).is_ok());
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
    push(&mut c, "prod", "1.0", &p, T0);
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
    let e = acquire(&mut c, "h1", "prod", "1.0", T0 + 2).unwrap_err();
    assert_eq!((e.status, e.body.reason.as_deref()), (422, Some("aborted")));

    push(&mut c, "prod", "1.1", &p, T0 + 3);
    c.tick(T0 + 3 + 59_000);
    assert_eq!(state(&c, "prod", "1.1"), RolloutState::ApprovalRequired);
    c.tick(T0 + 3 + 60_000);
    assert_eq!(state(&c, "prod", "1.1"), RolloutState::Aborted);
    assert!(
        rollout(&c, "prod", "1.1")
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
    push(&mut c, "staging", "0.9", &policy(1, 0), T0);
    push(&mut c, "prod", "1.0", &p, T0);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Pending);
    let e = acquire(&mut c, "p1", "prod", "1.0", T0).unwrap_err();
    assert_eq!(e.body.reason.as_deref(), Some("upstream_missing"));
    assert!(
        e.body.message.contains("has not succeeded in staging"),
        "{}",
        e.body.message
    );
    // Staging deploys it on its only host.
    push(&mut c, "staging", "1.0", &policy(1, 0), T0 + 1);
    heartbeat(&mut c, "s1", "staging", "1.0", "0.9", T0 + 1);
    let g = acquire(&mut c, "s1", "staging", "1.0", T0 + 2).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 3)
        .unwrap();
    assert_eq!(state(&c, "staging", "1.0"), RolloutState::Verifying);
    heartbeat(&mut c, "s1", "staging", "1.0", "1.0", T0 + 4);
    assert_eq!(state(&c, "staging", "1.0"), RolloutState::Success);
    // Prod moves on at once.
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Running);
    assert!(acquire(&mut c, "p1", "prod", "1.0", T0 + 5).is_ok());
}

#[test]
fn failures_halt_and_revert_the_upgraded_hosts() {
    let mut c = core();
    let p = policy(2, 0);
    push(&mut c, "prod", "1.0", &p, T0);
    push(&mut c, "prod", "2.0", &p, T0);
    for h in ["h1", "h2", "h3", "h4"] {
        heartbeat(&mut c, h, "prod", "2.0", "1.0", T0);
    }
    let g1 = acquire(&mut c, "h1", "prod", "2.0", T0 + 1).unwrap();
    let g2 = acquire(&mut c, "h2", "prod", "2.0", T0 + 1).unwrap();
    c.release(&g1.lease.id, &ok(Outcome::Success), T0 + 2)
        .unwrap();
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 3);
    let v = c
        .release(&g2.lease.id, &ok(Outcome::Failure), T0 + 4)
        .unwrap();
    assert_eq!(v.state, RolloutState::RollingBack);
    assert!(v.reason.unwrap().contains("max_failures 0"));
    // Nobody else starts it.
    let e = acquire(&mut c, "h3", "prod", "2.0", T0 + 5).unwrap_err();
    assert_eq!((e.status, e.body.reason.as_deref()), (422, Some("failed")));
    // h1 is told to revert; h2 (rolled back by itself) and h3 are not.
    let acts = heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 6).actions;
    assert_eq!(acts.len(), 1);
    assert_eq!(
        (acts[0].action, acts[0].version.as_str()),
        (ActionKind::Revert, "2.0")
    );
    assert!(
        heartbeat(&mut c, "h2", "prod", "2.0", "1.0", T0 + 6)
            .actions
            .is_empty()
    );
    let g = revert(&mut c, "h1", "prod", "2.0", T0 + 7).unwrap();
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::RollingBack);
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 8)
        .unwrap();
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Aborted);
    assert_eq!(
        rollout(&c, "prod", "2.0").reason.as_deref(),
        Some("rolled back")
    );
}

#[test]
fn a_failed_revert_needs_an_operator() {
    let mut c = core();
    push(&mut c, "prod", "2.0", &policy(1, 0), T0);
    let g = acquire(&mut c, "h1", "prod", "2.0", T0).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 1)
        .unwrap();
    let g = acquire(&mut c, "h2", "prod", "2.0", T0 + 2).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Failure), T0 + 3)
        .unwrap();
    let g = revert(&mut c, "h1", "prod", "2.0", T0 + 4).unwrap();
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
fn a_newer_commit_supersedes_at_once_and_an_older_version_is_stale() {
    let mut c = core();
    let p = policy(1, 0);
    push(&mut c, "prod", "1.0", &p, T0);
    acquire(&mut c, "h1", "prod", "1.0", T0).unwrap();
    // The newer commit supersedes 1.0 before any host asks for 1.10.
    push(&mut c, "prod", "1.10", &p, T0 + 1);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Aborted);
    assert!(
        rollout(&c, "prod", "1.0")
            .reason
            .as_deref()
            .unwrap()
            .starts_with("superseded by 1.10")
    );
    assert_eq!(state(&c, "prod", "1.10"), RolloutState::Running);
    // A host still reading the older commit is told to fetch, not refused.
    let e = acquire(&mut c, "h3", "prod", "1.0", T0 + 2).unwrap_err();
    assert_eq!((e.status, e.body.reason.as_deref()), (409, Some("stale")));
    // The slot h1 still holds on the superseded rollout counts: at most max_parallel hosts
    // of the service deploy at once, whatever rollout they deploy.
    let e = acquire(&mut c, "h2", "prod", "1.10", T0 + 3).unwrap_err();
    assert_eq!(e.body.reason.as_deref(), Some("no_slot"));
    // h1 moving on to 1.10 drops its old lease.
    assert!(acquire(&mut c, "h1", "prod", "1.10", T0 + 4).is_ok());
}

#[test]
fn a_host_behind_the_tip_is_told_to_fetch() {
    let mut c = core();
    push(&mut c, "prod", "2.0", &policy(1, 0), T0);
    let acts = heartbeat(&mut c, "h1", "prod", "1.0", "1.0", T0 + 1).actions;
    assert_eq!(acts.len(), 1, "{acts:?}");
    assert_eq!(acts[0].action, ActionKind::Fetch);
    assert_eq!(acts[0].version, "2.0");
    assert_eq!(acts[0].commit, c.tip);
    assert!(
        heartbeat(&mut c, "h1", "prod", "2.0", "1.0", T0 + 2)
            .actions
            .is_empty()
    );
    // A host that read a commit the coordinator has not makes it fetch.
    c.take_wake();
    let mut r = req(&c, "h1", "prod", "2.0");
    r.commit = "f00d".into();
    let _ = c.acquire(&r, &agent(), T0 + 3);
    assert!(c.take_wake());
}

#[test]
fn a_git_revert_to_the_last_good_version_is_a_rollback() {
    let mut c = core();
    let mut p = policy(1, 0);
    p.approval_required = true;
    // 1.0 succeeded in prod earlier (approved).
    push(&mut c, "prod", "1.0", &p, T0);
    let alice = person("alice", Role::Approver, &[]);
    c.decide("prod", "hello", "1.0", true, &alice, T0 + 1)
        .unwrap();
    heartbeat(&mut c, "h1", "prod", "1.0", "1.0", T0 + 2);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Success);
    // 2.0 is approved and half rolled out …
    heartbeat(&mut c, "h2", "prod", "1.0", "1.0", T0 + 2);
    push(&mut c, "prod", "2.0", &p, T0 + 3);
    c.decide("prod", "hello", "2.0", true, &alice, T0 + 4)
        .unwrap();
    let g = acquire(&mut c, "h1", "prod", "2.0", T0 + 5).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 6)
        .unwrap();
    heartbeat(&mut c, "h2", "prod", "2.0", "1.0", T0 + 7);
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 7);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Running);
    // … when `git revert` puts 1.0 back: a new rollout, a rollback, no approval.
    let first = c.newest("prod", "hello", Some("1.0")).unwrap();
    push(&mut c, "prod", "1.0", &p, T0 + 8);
    let back = rollout(&c, "prod", "1.0");
    assert_eq!(back.kind, RolloutKind::Rollback);
    assert_eq!(back.state, RolloutState::Running);
    assert_ne!(back.id, first);
    assert_eq!(c.rollouts[&first].state, RolloutState::Success);
    let two = rollout(&c, "prod", "2.0");
    assert_eq!(two.state, RolloutState::Aborted);
    assert!(
        two.reason
            .as_deref()
            .unwrap()
            .starts_with("superseded by 1.0")
    );
    // h2 never gets a lease for 2.0 now; h1 takes 1.0 back under the lease limit.
    let e = acquire(&mut c, "h2", "prod", "2.0", T0 + 9).unwrap_err();
    assert_eq!((e.status, e.body.reason.as_deref()), (409, Some("stale")));
    let g = acquire(&mut c, "h1", "prod", "1.0", T0 + 9).unwrap();
    assert_eq!(g.rollout.kind, RolloutKind::Rollback);
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 10)
        .unwrap();
    heartbeat(&mut c, "h2", "prod", "1.0", "1.0", T0 + 11);
    heartbeat(&mut c, "h1", "prod", "1.0", "1.0", T0 + 11);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Success);

    // With `approval.rollbacks: required` a revert waits like any version.
    push(&mut c, "prod", "3.0", &p, T0 + 12);
    c.decide("prod", "hello", "3.0", true, &alice, T0 + 13)
        .unwrap();
    let mut strict = p.clone();
    strict.rollbacks_need_approval = true;
    push(&mut c, "prod", "1.0", &strict, T0 + 14);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::ApprovalRequired);
}

#[test]
fn a_return_to_a_superseded_version_starts_a_new_rollout() {
    let mut c = core();
    let mut p = policy(1, 0);
    p.approval_required = true;
    push(&mut c, "prod", "2.0", &p, T0);
    push(&mut c, "prod", "3.0", &p, T0 + 1);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Aborted);
    // `git revert` of the 3.0 commit: 2.0 again, never deployed here, so approval again.
    push(&mut c, "prod", "2.0", &p, T0 + 2);
    let r = rollout(&c, "prod", "2.0");
    assert_eq!(
        (r.state, r.kind),
        (RolloutState::ApprovalRequired, RolloutKind::Deploy)
    );
    let ids: Vec<u64> = c
        .rollouts
        .values()
        .filter(|r| r.version == "2.0")
        .map(|r| r.id)
        .collect();
    assert_eq!(ids.len(), 2, "history keeps both");
    let alice = person("alice", Role::Approver, &[]);
    c.decide("prod", "hello", "2.0", true, &alice, T0 + 3)
        .unwrap();
    assert!(acquire(&mut c, "h1", "prod", "2.0", T0 + 4).is_ok());
    // A version that failed at an earlier commit is not refused when a new commit asks again.
    let g = acquire(&mut c, "h1", "prod", "2.0", T0 + 5).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Failure), T0 + 6)
        .unwrap();
    assert_eq!(
        acquire(&mut c, "h2", "prod", "2.0", T0 + 7)
            .unwrap_err()
            .status,
        422
    );
    push(&mut c, "prod", "4.0", &policy(1, 0), T0 + 8);
    push(&mut c, "prod", "2.0", &policy(1, 0), T0 + 9);
    assert!(acquire(&mut c, "h2", "prod", "2.0", T0 + 10).is_ok());
}

#[test]
fn retry_starts_a_new_attempt_and_hosts_forget_their_failure() {
    let mut c = core();
    push(&mut c, "prod", "2.0", &policy(1, 0), T0);
    let g = acquire(&mut c, "h1", "prod", "2.0", T0).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Failure), T0 + 1)
        .unwrap();
    // h1 rolled back by itself: nothing to revert; the rollout ends ABORTED.
    heartbeat(&mut c, "h1", "prod", "2.0", "1.0", T0 + 2);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Aborted);
    let e = c
        .retry("prod", "other", &person("ops", Role::Operator, &[]), T0 + 3)
        .unwrap_err();
    assert_eq!(e.status, 404);
    let v = c
        .retry("prod", "hello", &person("ops", Role::Operator, &[]), T0 + 3)
        .unwrap();
    assert_eq!((v.state, v.attempt), (RolloutState::Running, 2));
    assert!(v.trigger.contains("retry by ops"));
    // The host that marked 2.0 failed is told to forget it.
    let mut s = report("2.0", "1.0", true);
    s.failed = Some("2.0".into());
    let acts = beat(&mut c, "h1", "prod", s, T0 + 4).actions;
    assert!(
        acts.iter()
            .any(|a| a.action == ActionKind::Retry && a.version == "2.0"),
        "{acts:?}"
    );
    assert!(acquire(&mut c, "h1", "prod", "2.0", T0 + 5).is_ok());
    // A running rollout is not retried.
    let e = c
        .retry("prod", "hello", &person("ops", Role::Operator, &[]), T0 + 6)
        .unwrap_err();
    assert_eq!(e.status, 409);
}

#[test]
fn a_fleet_rollback_holds_until_git_changes_the_version() {
    let mut c = core();
    let mut p = policy(1, 0);
    p.approval_required = true;
    push(&mut c, "prod", "1.0", &p, T0);
    let alice = person("alice", Role::Approver, &[]);
    c.decide("prod", "hello", "1.0", true, &alice, T0).unwrap();
    heartbeat(&mut c, "h1", "prod", "1.0", "1.0", T0 + 1);
    heartbeat(&mut c, "h2", "prod", "1.0", "1.0", T0 + 1);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Success);
    let one = c.newest("prod", "hello", Some("1.0")).unwrap();
    push(&mut c, "prod", "2.0", &p, T0 + 2);
    c.decide("prod", "hello", "2.0", true, &alice, T0 + 2)
        .unwrap();
    let g = acquire(&mut c, "h1", "prod", "2.0", T0 + 3).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 4)
        .unwrap();
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 5);
    // On call rolls back: no approval, a Rollback rollout of 1.0 from 1.0's commit.
    let pager = person("pager", Role::Responder, &[]);
    let v = c.rollback("prod", "hello", None, &pager, T0 + 6).unwrap();
    assert_eq!(
        (v.version.as_str(), v.kind, v.state),
        ("1.0", RolloutKind::Rollback, RolloutState::Running)
    );
    assert_eq!(v.commit, c.rollouts[&one].commit);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Aborted);
    let s = c.status(T0 + 6);
    assert_eq!(s.overrides.len(), 1);
    assert_eq!(
        (s.overrides[0].from.as_str(), s.overrides[0].to.as_str()),
        ("2.0", "1.0")
    );
    // Hosts are pinned to 1.0; nobody gets 2.0 while Git still asks for it.
    let acts = heartbeat(&mut c, "h2", "prod", "2.0", "1.0", T0 + 7).actions;
    assert!(
        acts.iter().any(|a| a.action == ActionKind::Pin
            && a.version == "1.0"
            && a.commit.as_deref() == Some(c.rollouts[&one].commit.as_str())),
        "{acts:?}"
    );
    let e = acquire(&mut c, "h2", "prod", "2.0", T0 + 8).unwrap_err();
    assert_eq!(e.body.reason.as_deref(), Some("rolled_back"));
    assert!(
        e.body.message.contains("Git still asks for 2.0"),
        "{}",
        e.body.message
    );
    let g = acquire(&mut c, "h1", "prod", "1.0", T0 + 9).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 10)
        .unwrap();
    heartbeat(&mut c, "h1", "prod", "1.0", "1.0", T0 + 11);
    heartbeat(&mut c, "h2", "prod", "1.0", "1.0", T0 + 11);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Success);
    // A commit that changes nothing of hello keeps the rollback …
    let d = c.desired.clone().unwrap();
    let mut d2 = d.clone();
    d2.commit = "unrelated".into();
    c.apply_desired(d2, T0 + 12);
    assert_eq!(c.status(T0 + 12).overrides.len(), 1);
    // … a commit of another version ends it.
    push(&mut c, "prod", "3.0", &policy(1, 0), T0 + 13);
    assert!(c.status(T0 + 13).overrides.is_empty());
    assert_eq!(state(&c, "prod", "3.0"), RolloutState::Running);
    assert!(
        heartbeat(&mut c, "h2", "prod", "1.0", "1.0", T0 + 14)
            .actions
            .iter()
            .all(|a| a.action != ActionKind::Pin)
    );
    // --to must name a version that succeeded there.
    let e = c
        .rollback("prod", "hello", Some("2.0"), &pager, T0 + 15)
        .unwrap_err();
    assert_eq!(e.status, 409);
    assert!(
        e.body.message.contains("never succeeded"),
        "{}",
        e.body.message
    );
}

#[test]
fn a_refused_commit_moves_nothing_and_says_why() {
    let mut c = core();
    push(&mut c, "prod", "1.0", &policy(1, 0), T0);
    let before: Vec<RolloutView> = c.status(T0).rollouts;
    c.refuse(
        Refused {
            commit: "bad1".into(),
            problems: vec!["environments/prod.yaml:2:3: unknown field `rollot`".into()],
            at_ms: T0 + 1,
        },
        T0 + 1,
    );
    let s = c.status(T0 + 1);
    assert_eq!(s.rollouts, before);
    assert_eq!(s.refused.as_ref().unwrap().commit, "bad1");
    assert_eq!(
        s.desired.as_ref().unwrap().commit,
        c.desired.as_ref().unwrap().commit
    );
    let a = audit(&c.take_changes());
    assert!(
        a.iter()
            .any(|(_, what, detail)| what == "commit_refused" && detail.contains("rollot")),
        "{a:?}"
    );
    // Leases go on at the last valid commit.
    assert!(acquire(&mut c, "h1", "prod", "1.0", T0 + 2).is_ok());
    // A valid commit clears it.
    push(&mut c, "prod", "1.1", &policy(1, 0), T0 + 3);
    assert!(c.status(T0 + 3).refused.is_none());
}

#[test]
fn pause_resume_and_abort() {
    let mut c = core();
    push(&mut c, "prod", "1.0", &policy(1, 0), T0);
    let op = person("ops", Role::Operator, &[]);
    assert_eq!(
        c.operate("prod", "hello", "pause", &op, T0 + 1)
            .unwrap()
            .state,
        RolloutState::Paused
    );
    let e = acquire(&mut c, "h2", "prod", "1.0", T0 + 2).unwrap_err();
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
    push(&mut c, "prod", "1.0", &policy(1, 0), T0);
    c.take_changes();
    let before = c.status(T0);
    let mut r = req(&c, "h1", "prod", "1.0");
    r.host = "bad host/../x".into();
    assert_eq!(c.acquire(&r, &agent(), T0).unwrap_err().status, 400);
    let mut r = req(&c, "h1", "prod", "1.0");
    r.commit = "x".repeat(100);
    assert_eq!(c.acquire(&r, &agent(), T0).unwrap_err().status, 400);
    let mut r = req(&c, "h1", "prod", "1.0");
    r.purpose = Purpose::Revert;
    assert_eq!(c.acquire(&r, &agent(), T0).unwrap_err().status, 409);
    let r = req(&c, "h1", "prod", "9.9");
    assert_eq!(c.acquire(&r, &agent(), T0).unwrap_err().status, 409);
    assert!(c.take_changes().is_empty());
    assert_eq!(c.status(T0), before);
}

#[test]
fn a_medium_verdict_pauses_the_rollout() {
    let mut c = core();
    push(&mut c, "prod", "1.0", &policy(2, 0), T0);
    let g = acquire(&mut c, "h1", "prod", "1.0", T0).unwrap();
    let mut r = ok(Outcome::Success);
    r.verification = Some(crate::wire::Verification {
        risk: crate::wire::Risk::Medium,
        summary: "error_rate: inconclusive".into(),
        metrics: vec![],
    });
    let v = c.release(&g.lease.id, &r, T0 + 1).unwrap();
    assert_eq!(v.state, RolloutState::Paused);
    assert!(v.verdicts["h1"].starts_with("medium"));
    let e = acquire(&mut c, "h2", "prod", "1.0", T0 + 2).unwrap_err();
    assert_eq!(e.body.reason.as_deref(), Some("paused"));
    let op = person("ops", Role::Operator, &[]);
    assert_eq!(
        c.operate("prod", "hello", "resume", &op, T0 + 3)
            .unwrap()
            .state,
        RolloutState::Running
    );
    assert!(acquire(&mut c, "h2", "prod", "1.0", T0 + 4).is_ok());
}

fn series(name: &str, n: usize) -> crate::wire::MetricSeries {
    crate::wire::MetricSeries {
        name: name.into(),
        judgement: "pass".into(),
        median: Some(1.0),
        baseline_median: Some(1.0),
        p_value: Some(0.5),
        samples: vec![1.0; n],
        baseline: vec![1.0; n],
    }
}

#[test]
fn verdict_samples_are_kept_for_the_latest_hosts_and_bad_ones_refused() {
    let mut c = core();
    push(&mut c, "prod", "1.0", &policy(10, 0), T0);
    let release = |c: &mut Core, host: &str, metrics, now| {
        let g = acquire(c, host, "prod", "1.0", now).unwrap();
        let mut r = ok(Outcome::Success);
        r.verification = Some(crate::wire::Verification {
            risk: crate::wire::Risk::Low,
            summary: "ok".into(),
            metrics,
        });
        (g.lease.id.clone(), c.release(&g.lease.id, &r, now + 1))
    };
    // Refused, each with what is wrong; the lease is not spent and the outcome still counts.
    let nan = crate::wire::MetricSeries {
        samples: vec![f64::NAN],
        ..series("latency", 1)
    };
    let bad = [
        (vec![series("m", 1); 9], "9 metrics; at most 8"),
        (vec![series("m", 121)], "121 samples; at most 120"),
        (vec![series("", 1)], "1 to 64 characters"),
        (vec![series("a\nb", 1)], "no control characters"),
        (vec![nan], "not finite"),
        (
            vec![crate::wire::MetricSeries {
                judgement: "great".into(),
                ..series("m", 1)
            }],
            "judgement `great`",
        ),
        (
            vec![crate::wire::MetricSeries {
                p_value: Some(2.0),
                ..series("m", 1)
            }],
            "p_value is not between 0 and 1",
        ),
    ];
    for (i, (metrics, why)) in bad.into_iter().enumerate() {
        let (id, r) = release(&mut c, &format!("b{i}"), metrics, T0 + 10 * i as u64);
        let e = r.unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.body.message.contains(why), "{}", e.body.message);
        assert!(e.body.message.contains("without `metrics`"));
        let v = c
            .release(&id, &ok(Outcome::Success), T0 + 10 * i as u64 + 2)
            .unwrap();
        assert!(v.succeeded.contains(&format!("b{i}")));
    }
    // Five hosts report samples: the latest four are kept, and only the full view has them.
    for i in 0..5 {
        let (_, r) = release(
            &mut c,
            &format!("h{i}"),
            vec![series("latency", 3)],
            T0 + 100 + i,
        );
        assert!(r.unwrap().charts.is_empty(), "not in the lists");
    }
    let id = rollout(&c, "prod", "1.0").id;
    let full = c.rollout(id, T0 + 200).unwrap();
    let hosts: Vec<&str> = full.charts.iter().map(|x| x.host.as_str()).collect();
    assert_eq!(hosts, ["h1", "h2", "h3", "h4"]);
    assert_eq!(full.charts[3].metrics, vec![series("latency", 3)]);
    assert!(c.status(T0 + 200).rollouts[0].charts.is_empty());
    assert!(c.rollout(id + 1, T0).is_none());
}

#[test]
fn traffic_weights_are_kept_with_the_rollout() {
    let mut c = core();
    push(&mut c, "prod", "1.0", &policy(1, 0), T0);
    let g = acquire(&mut c, "ecs", "prod", "1.0", T0).unwrap();
    let id = g.lease.id.clone();
    for (i, p) in [0, 10, 10, 50, 100].into_iter().enumerate() {
        c.traffic(&id, p, T0 + i as u64).unwrap();
    }
    let got = |c: &Core| -> Vec<(u64, u8)> {
        rollout(c, "prod", "1.0")
            .traffic
            .iter()
            .map(|p| (p.at_ms - T0, p.percent))
            .collect()
    };
    // A repeated weight (a retried report) is kept once.
    assert_eq!(got(&c), [(0, 0), (1, 10), (3, 50), (4, 100)]);
    assert!(
        c.changes
            .iter()
            .any(|x| matches!(x, Change::Rollout(r) if r.traffic.len() == 4)),
        "stored"
    );
    let e = c.traffic(&id, 101, T0).unwrap_err();
    assert_eq!(e.status, 400);
    assert!(e.body.message.contains("101 is not a weight from 0 to 100"));
    assert_eq!(c.traffic("nope", 10, T0).unwrap_err().status, 410);
    // Bounded: the latest 64.
    for i in 0..100u64 {
        c.traffic(&id, (i % 2) as u8, T0 + 10 + i).unwrap();
    }
    let t = got(&c);
    assert_eq!(t.len(), super::MAX_TRAFFIC);
    assert_eq!(t.last(), Some(&(109, 1)));
    // Released, the lease reports no more.
    c.release(&id, &ok(Outcome::Success), T0 + 200).unwrap();
    assert_eq!(c.traffic(&id, 10, T0 + 201).unwrap_err().status, 410);
}

#[test]
fn a_host_that_has_not_fetched_the_commit_yet_keeps_the_rollout_running() {
    let mut c = core();
    push(&mut c, "prod", "2.0", &policy(1, 0), T0);
    heartbeat(&mut c, "h1", "prod", "2.0", "1.0", T0);
    // h2 polls Git less often: it still reports 1.0 as desired.
    heartbeat(&mut c, "h2", "prod", "1.0", "1.0", T0);
    let g = acquire(&mut c, "h1", "prod", "2.0", T0 + 1).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 2)
        .unwrap();
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 3);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Running);
    // When h2 gets there and fails, the rollout fails and h1 reverts.
    heartbeat(&mut c, "h2", "prod", "2.0", "1.0", T0 + 4);
    let g = acquire(&mut c, "h2", "prod", "2.0", T0 + 5).unwrap();
    let v = c
        .release(&g.lease.id, &ok(Outcome::Failure), T0 + 6)
        .unwrap();
    assert_eq!(v.state, RolloutState::RollingBack);
}

#[test]
fn a_failure_within_max_failures_does_not_hold_the_rollout_up() {
    let mut c = core();
    push(&mut c, "prod", "2.0", &policy(1, 1), T0);
    heartbeat(&mut c, "h1", "prod", "2.0", "1.0", T0);
    heartbeat(&mut c, "h2", "prod", "2.0", "1.0", T0);
    let g = acquire(&mut c, "h1", "prod", "2.0", T0 + 1).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Failure), T0 + 2)
        .unwrap();
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Running);
    let g = acquire(&mut c, "h2", "prod", "2.0", T0 + 3).unwrap();
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
    push(&mut c, "prod", "2.0", &policy(1, 0), T0);
    heartbeat(&mut c, "h1", "prod", "2.0", "1.0", T0);
    heartbeat(&mut c, "h2", "prod", "1.0", "1.0", T0);
    let g = acquire(&mut c, "h1", "prod", "2.0", T0 + 1).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 2)
        .unwrap();
    // h2 is not heard from for more than 3 heartbeat intervals (5 s in `core()`).
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 16_000);
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 16_001);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Success);
}

/// Five hosts take 2.0 two at a time; each one's last heartbeat before its release still
/// shows 1.0 (issue: such hosts were skipped and VERIFYING → SUCCESS came at once).
fn five_hosts_released(c: &mut Core) {
    push(c, "prod", "2.0", &policy(2, 0), T0);
    for h in ["h1", "h2", "h3", "h4", "h5"] {
        heartbeat(c, h, "prod", "2.0", "1.0", T0);
    }
    for (i, h) in ["h1", "h2", "h3", "h4", "h5"].iter().enumerate() {
        let t = T0 + 10 * i as u64;
        let g = acquire(c, h, "prod", "2.0", t).unwrap();
        c.release(&g.lease.id, &ok(Outcome::Success), t + 1)
            .unwrap();
    }
}

#[test]
fn success_waits_for_a_healthy_heartbeat_after_each_release() {
    let mut c = core();
    five_hosts_released(&mut c);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Verifying);
    for h in ["h1", "h2", "h3", "h4"] {
        heartbeat(&mut c, h, "prod", "2.0", "2.0", T0 + 100);
        assert_eq!(
            state(&c, "prod", "2.0"),
            RolloutState::Verifying,
            "after {h}"
        );
    }
    // After a few heartbeat intervals status says who it waits for.
    let v = c.view(rollout(&c, "prod", "2.0"), T0 + 100 + 10_001);
    assert!(
        v.waiting_for.as_deref().unwrap_or("").contains("h5"),
        "{:?}",
        v.waiting_for
    );
    heartbeat(&mut c, "h5", "prod", "2.0", "2.0", T0 + 101);
    let r = rollout(&c, "prod", "2.0");
    assert_eq!(r.state, RolloutState::Success);
    assert_eq!(r.reason.as_deref(), Some("5 host(s) run it healthy"));
    let a = audit(&c.take_changes());
    let success = a
        .iter()
        .position(|x| x.2.contains("VERIFYING → SUCCESS"))
        .unwrap();
    let last = a
        .iter()
        .position(|x| x.0 == "h5" && x.1 == "verified")
        .unwrap();
    assert!(last < success, "{a:?}");
}

#[test]
fn a_heartbeat_before_the_release_does_not_verify() {
    let mut c = core();
    push(&mut c, "prod", "2.0", &policy(1, 0), T0);
    heartbeat(&mut c, "h1", "prod", "2.0", "1.0", T0);
    let g = acquire(&mut c, "h1", "prod", "2.0", T0 + 1).unwrap();
    // While it holds the lease, even a report of 2.0 healthy is not a verification.
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 2);
    assert!(rollout(&c, "prod", "2.0").verified.is_empty());
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 3)
        .unwrap();
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Verifying);
    // The same report after the release counts (steady heartbeats included).
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 4);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Success);
}

#[test]
fn stale_and_moved_on_hosts_are_counted_apart() {
    let mut c = core();
    five_hosts_released(&mut c);
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 100);
    heartbeat(&mut c, "h2", "prod", "2.0", "2.0", T0 + 100);
    // h3 already deploys a newer version (it read a commit the coordinator has not).
    let mut s = report("3.0", "2.0", true);
    s.phase = Some("fetch".into());
    beat(&mut c, "h3", "prod", s, T0 + 14_000);
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 14_001);
    heartbeat(&mut c, "h2", "prod", "2.0", "2.0", T0 + 14_001);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Verifying);
    // h4 and h5 go stale: the periodic sweep sees it.
    c.tick(T0 + 16_000);
    let r = rollout(&c, "prod", "2.0");
    assert_eq!(r.state, RolloutState::Success);
    let why = r.reason.as_deref().unwrap();
    assert!(why.starts_with("2 host(s) run it healthy"), "{why}");
    assert!(why.contains("2 stale (h4, h5)"), "{why}");
    assert!(why.contains("1 moved on to another version (h3)"), "{why}");
}

#[test]
fn a_host_unhealthy_while_verifying_counts_as_a_failure() {
    let mut c = core();
    five_hosts_released(&mut c);
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 100);
    let v = beat(&mut c, "h2", "prod", report("2.0", "2.0", false), T0 + 101);
    let r = rollout(&c, "prod", "2.0");
    assert!(r.failed.contains("h2"));
    assert_eq!(r.state, RolloutState::RollingBack);
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("h2 reported it unhealthy")
    );
    assert!(v.actions.iter().any(|a| a.action == ActionKind::Revert));
    // Deploying (phase set) is not unhealthy.
    let mut c = core();
    five_hosts_released(&mut c);
    let mut s = report("2.0", "2.0", false);
    s.phase = Some("start".into());
    beat(&mut c, "h2", "prod", s, T0 + 100);
    assert!(rollout(&c, "prod", "2.0").failed.is_empty());
}

#[test]
fn a_service_no_longer_pinned_ends_its_rollout() {
    let mut c = core();
    push(&mut c, "prod", "1.0", &policy(1, 0), T0);
    let mut d = c.desired.clone().unwrap();
    d.commit = "removed".into();
    d.environments.get_mut("prod").unwrap().services.clear();
    c.apply_desired(d, T0 + 1);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Aborted);
    assert_eq!(
        acquire(&mut c, "h1", "prod", "1.0", T0 + 2)
            .unwrap_err()
            .body
            .reason
            .as_deref(),
        Some("stale")
    );
}

#[test]
fn hosts_report_while_paused_and_a_resumed_rollout_completes() {
    let mut c = core();
    push(&mut c, "prod", "2.0", &policy(1, 0), T0);
    heartbeat(&mut c, "h1", "prod", "2.0", "1.0", T0);
    let g = acquire(&mut c, "h1", "prod", "2.0", T0 + 1).unwrap();
    let mut r = ok(Outcome::Success);
    r.verification = Some(crate::wire::Verification {
        risk: crate::wire::Risk::Medium,
        summary: "inconclusive".into(),
        metrics: vec![],
    });
    c.release(&g.lease.id, &r, T0 + 2).unwrap();
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Paused);
    // Its only host reports it healthy while the rollout is paused …
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", T0 + 3);
    // … so once resumed, it is done at once.
    let op = person("ops", Role::Operator, &[]);
    let v = c.operate("prod", "hello", "resume", &op, T0 + 4).unwrap();
    assert_eq!(v.state, RolloutState::Success);
    // An unhealthy report while paused is not a failure (only while verifying).
    let mut c = core();
    push(&mut c, "prod", "2.0", &policy(1, 0), T0);
    let g = acquire(&mut c, "h1", "prod", "2.0", T0 + 1).unwrap();
    c.release(&g.lease.id, &r, T0 + 2).unwrap();
    beat(&mut c, "h1", "prod", report("2.0", "2.0", false), T0 + 3);
    assert!(rollout(&c, "prod", "2.0").failed.is_empty());
}

#[test]
fn a_verifying_rollout_superseded_goes_on_counting() {
    let mut c = core();
    push(&mut c, "prod", "1.0", &policy(2, 0), T0);
    for h in ["h1", "h2"] {
        heartbeat(&mut c, h, "prod", "1.0", "0.9", T0);
        let g = acquire(&mut c, h, "prod", "1.0", T0 + 1).unwrap();
        c.release(&g.lease.id, &ok(Outcome::Success), T0 + 2)
            .unwrap();
    }
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Verifying);
    // 2.0 is committed before the hosts report 1.0: 1.0 is not thrown away …
    push(&mut c, "prod", "2.0", &policy(2, 0), T0 + 3);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Verifying);
    heartbeat(&mut c, "h1", "prod", "1.0", "1.0", T0 + 4);
    // … h2 already moved on to 2.0 (deploying it) …
    let mut s = report("2.0", "1.0", true);
    s.phase = Some("fetch".into());
    beat(&mut c, "h2", "prod", s, T0 + 4);
    // … so 1.0 succeeded, and a later revert to it is a rollback.
    let r = rollout(&c, "prod", "1.0");
    assert_eq!(r.state, RolloutState::Success);
    assert!(r.reason.as_deref().unwrap().contains("1 moved on"), "{r:?}");
    // Had no host reported it before moving on, it would have ended ABORTED.
    let mut c = core();
    push(&mut c, "prod", "1.0", &policy(1, 0), T0);
    heartbeat(&mut c, "h1", "prod", "1.0", "0.9", T0);
    let g = acquire(&mut c, "h1", "prod", "1.0", T0 + 1).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 2)
        .unwrap();
    push(&mut c, "prod", "2.0", &policy(1, 0), T0 + 3);
    let mut s = report("2.0", "1.0", true);
    s.phase = Some("stage".into());
    beat(&mut c, "h1", "prod", s, T0 + 4);
    let r = rollout(&c, "prod", "1.0");
    assert_eq!(r.state, RolloutState::Aborted);
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .starts_with("superseded before any host"),
        "{r:?}"
    );
}

/// Found by the property tests: a second `drover pause` reached the superseded 1.0 (still
/// VERIFYING), and a resume then left it RUNNING a version no host would deploy again.
#[test]
fn operations_and_verdicts_never_reach_a_superseded_rollout() {
    let mut c = core();
    let ops = person("ops", Role::Operator, &[]);
    push(&mut c, "prod", "1.0", &policy(1, 0), T0);
    heartbeat(&mut c, "h1", "prod", "1.0", "0.9", T0);
    heartbeat(&mut c, "h2", "prod", "1.0", "0.9", T0);
    let g = acquire(&mut c, "h1", "prod", "1.0", T0 + 1).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 2)
        .unwrap();
    let late = acquire(&mut c, "h2", "prod", "1.0", T0 + 3).unwrap();
    push(&mut c, "prod", "2.0", &policy(1, 0), T0 + 4);
    c.operate("prod", "hello", "pause", &ops, T0 + 5).unwrap();
    let e = c
        .operate("prod", "hello", "pause", &ops, T0 + 6)
        .unwrap_err();
    assert_eq!(e.status, 409);
    assert!(e.body.message.contains("hello/2.0: it is PAUSED"), "{e:?}");
    // A late inconclusive verdict on the superseded 1.0 is recorded, but pauses nothing.
    let medium = ReleaseRequest {
        outcome: Outcome::Success,
        message: None,
        verification: Some(crate::wire::Verification {
            risk: crate::wire::Risk::Medium,
            summary: "p=0.2".into(),
            metrics: vec![],
        }),
    };
    c.release(&late.lease.id, &medium, T0 + 7).unwrap();
    let old = rollout(&c, "prod", "1.0");
    assert_ne!(old.state, RolloutState::Paused);
    assert!(old.verdicts.contains_key("h2"), "{old:?}");
    c.operate("prod", "hello", "resume", &ops, T0 + 8).unwrap();
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Running);
    let e = c
        .operate("prod", "hello", "resume", &ops, T0 + 9)
        .unwrap_err();
    assert_eq!(e.status, 409, "{e:?}");
}

fn bound(host: &str) -> Caller {
    Caller {
        name: host.into(),
        role: Role::Agent,
        groups: vec![],
        host: Some(host.into()),
    }
}

#[test]
fn a_host_bound_token_acts_only_as_its_host() {
    let mut c = core();
    push(&mut c, "prod", "1.0", &policy(2, 0), T0);
    c.take_changes();
    // web-01 asks for a lease as web-02: 403, audited, no lease.
    let r = req(&c, "web-02", "prod", "1.0");
    let e = c.acquire(&r, &bound("web-01"), T0).unwrap_err();
    assert_eq!((e.status, e.body.kind.as_str()), (403, "forbidden"));
    assert!(e.body.message.contains("bound to host web-01"), "{e:?}");
    assert_eq!(c.lease_count(), 0);
    let a = audit(&c.take_changes());
    assert!(a.iter().any(|e| e.1 == "denied"), "{a:?}");
    // web-02's own lease: web-01 can neither renew nor release it, and the audit does not
    // show the lease id.
    let g = c.acquire(&r, &bound("web-02"), T0).unwrap();
    c.take_changes();
    let id = g.lease.id.clone();
    for what in ["renew lease", "release lease"] {
        let e = c
            .check_holder(&id, &bound("web-01"), what, T0 + 1)
            .unwrap_err();
        assert_eq!(e.status, 403);
    }
    let changes = c.take_changes();
    assert_eq!(audit(&changes).len(), 2);
    assert!(
        !format!("{changes:?}").contains(&id),
        "lease id in the audit"
    );
    assert!(
        c.check_holder(&id, &bound("web-02"), "renew lease", T0 + 1)
            .is_ok()
    );
    assert!(
        c.check_holder(&id, &agent(), "renew lease", T0 + 1).is_ok(),
        "fleet-wide"
    );
    assert_eq!(rollout(&c, "prod", "1.0").failed.len(), 0);
}

#[test]
fn a_late_release_after_expiry_still_counts() {
    let mut c = core();
    push(&mut c, "prod", "1.0", &policy(1, 0), T0);
    let g = acquire(&mut c, "h1", "prod", "1.0", T0).unwrap();
    // Not renewed: it expires, the slot goes to h2.
    c.tick(T0 + 30_001);
    let e = c.renew(&g.lease.id, T0 + 30_002).unwrap_err();
    assert_eq!(e.status, 410);
    assert!(e.body.message.contains("still counts"), "{e:?}");
    assert!(acquire(&mut c, "h2", "prod", "1.0", T0 + 30_003).is_ok());
    // It survives a restart (stored as expired).
    let changes = c.take_changes();
    let stored: Vec<&Lease> = changes
        .iter()
        .filter_map(|ch| match ch {
            Change::Lease(l) if l.expired_at_ms.is_some() => Some(l),
            _ => None,
        })
        .collect();
    assert_eq!(stored.len(), 1);
    let snap = Snapshot {
        rollouts: c.rollouts.values().cloned().collect(),
        leases: c
            .leases
            .values()
            .cloned()
            .chain(stored.into_iter().cloned())
            .collect(),
        hosts: vec![],
        last_audit: 10,
        desired: c.desired.clone(),
        refused: None,
        overrides: vec![],
        ..Snapshot::default()
    };
    let mut c = Core::new(snap, 30_000, 5_000, T0 + 40_000);
    assert_eq!(c.lease_count(), 1, "only h2's lease is live");
    // h1's failure arrives late: it counts, and max_failures 0 fails the rollout.
    let v = c
        .release(&g.lease.id, &ok(Outcome::Failure), T0 + 40_001)
        .unwrap();
    assert_eq!(v.failed, vec!["h1".to_string()]);
    assert!(matches!(
        state(&c, "prod", "1.0"),
        RolloutState::RollingBack | RolloutState::Failed
    ));
    let a = audit(&c.take_changes());
    assert!(
        a.iter().any(|e| e.2.contains("after its lease expired")),
        "{a:?}"
    );
    // Replayed: now unknown.
    let e = c
        .release(&g.lease.id, &ok(Outcome::Failure), T0 + 40_002)
        .unwrap_err();
    assert_eq!(e.status, 410);
    // Expired leases are forgotten after a day.
    let g3 = {
        c.tick(T0 + 100_000);
        c.expired.len()
    };
    c.tick(T0 + 100_000 + 25 * 3600 * 1000);
    assert!(c.expired.len() <= g3);
    assert!(c.expired.is_empty());
}

#[test]
fn heartbeats_are_bounded() {
    let mut c = core();
    c.max_hosts = 2;
    let hb = |services: usize, labels: usize| Heartbeat {
        environment: "prod".into(),
        labels: (0..labels).map(|i| (format!("l{i}"), "v".into())).collect(),
        agent_version: Some("x".repeat(10_000)),
        commit: None,
        services: (0..services)
            .map(|i| ServiceReport {
                service: format!("s{i}"),
                desired: None,
                actual: None,
                healthy: true,
                phase: Some("p".repeat(10_000)),
                last_error: Some("e".repeat(100_000)),
                failed: None,
            })
            .collect(),
    };
    let e = c.heartbeat("h1", &hb(257, 0), &agent(), T0).unwrap_err();
    assert!(e.body.message.contains("at most 256"), "{e:?}");
    let e = c.heartbeat("h1", &hb(1, 65), &agent(), T0).unwrap_err();
    assert!(e.body.message.contains("at most 64"), "{e:?}");
    let mut bad = hb(1, 0);
    bad.environment = "x/../y".into();
    assert_eq!(
        c.heartbeat("h1", &bad, &agent(), T0).unwrap_err().status,
        400
    );
    let mut twice = hb(2, 0);
    twice.services[1].service = "s0".into();
    assert!(
        c.heartbeat("h1", &twice, &agent(), T0)
            .unwrap_err()
            .body
            .message
            .contains("twice")
    );
    c.heartbeat("h1", &hb(3, 3), &agent(), T0).unwrap();
    let stored = format!("{:?}", c.take_changes());
    assert!(
        stored.len() < 10_000,
        "long texts are capped: {}",
        stored.len()
    );
    c.heartbeat("h2", &hb(1, 0), &agent(), T0).unwrap();
    let e = c.heartbeat("h3", &hb(1, 0), &agent(), T0).unwrap_err();
    assert_eq!(e.status, 409);
    assert!(e.body.message.contains("max_hosts"), "{e:?}");
    // A known host still heartbeats.
    c.heartbeat("h1", &hb(1, 0), &agent(), T0 + 1).unwrap();
}

/// A commit of `prod` pinning `migrate` and hello, hello coming after migrate.
fn push_ordered(c: &mut Core, migrate: &str, hello: &str, now: u64) {
    let d = Desired {
        commit: format!("c{now:x}"),
        commit_time_ms: now,
        fetched_at_ms: now,
        environments: BTreeMap::from([(
            "prod".to_string(),
            EnvDesired {
                policy: policy(1, 0),
                services: BTreeMap::from([
                    ("hello".to_string(), hello.to_string()),
                    ("migrate".to_string(), migrate.to_string()),
                ]),
                after: BTreeMap::from([("hello".to_string(), vec!["migrate".to_string()])]),
                freeze: vec![],
                jobs: Default::default(),
                notify: vec![],
            },
        )]),
    };
    c.apply_desired(d, now);
}

/// `migrate` `version` deployed on its one host m1: leased, released, reported.
fn migrate(c: &mut Core, from: &str, version: &str, now: u64) {
    let mut s = report(version, from, true);
    s.service = "migrate".into();
    beat(c, "m1", "prod", s.clone(), now);
    let mut r = req(c, "m1", "prod", version);
    r.service = "migrate".into();
    let g = c.acquire(&r, &agent(), now + 1).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), now + 2)
        .unwrap();
    s.actual = Some(version.into());
    beat(c, "m1", "prod", s, now + 3);
}

#[test]
fn a_service_after_another_waits_for_its_success() {
    let mut c = core();
    push_ordered(&mut c, "1", "1.0", T0);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Pending);
    let e = acquire(&mut c, "p1", "prod", "1.0", T0).unwrap_err();
    assert_eq!(e.body.reason.as_deref(), Some("upstream_missing"));
    assert!(
        e.body.message.contains(
            "hello comes after migrate 1 in prod: it starts once they have succeeded there"
        ),
        "{}",
        e.body.message
    );
    let view = c.status(T0 + 100_000).rollouts;
    let hello = view.iter().find(|r| r.service == "hello").unwrap();
    assert!(
        hello
            .waiting_for
            .as_deref()
            .unwrap_or("")
            .contains("comes after migrate 1"),
        "{hello:?}"
    );
    migrate(&mut c, "0", "1", T0 + 10);
    let id = c.newest("prod", "migrate", Some("1")).unwrap();
    assert_eq!(c.rollouts[&id].state, RolloutState::Success);
    // hello moves on as migrate succeeds.
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Running);
    assert!(acquire(&mut c, "p1", "prod", "1.0", T0 + 20).is_ok());
}

#[test]
fn a_waiting_service_follows_a_new_version_of_what_it_comes_after() {
    let mut c = core();
    push_ordered(&mut c, "1", "1.0", T0);
    // Git moves migrate on before it succeeded: hello waits for migrate 2, not 1.
    push_ordered(&mut c, "2", "1.0", T0 + 1);
    migrate(&mut c, "0", "2", T0 + 10);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Running);
    // A rollout of a service with no `after` starts at once; a rollback is not held.
    push_ordered(&mut c, "3", "1.1", T0 + 20);
    let id = c.newest("prod", "migrate", Some("3")).unwrap();
    assert_eq!(c.rollouts[&id].state, RolloutState::Running);
    assert_eq!(state(&c, "prod", "1.1"), RolloutState::Pending);
}
