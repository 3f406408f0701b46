//! Freeze windows, the gate after the first batch, and gates at ECS traffic steps.

use drover_desired::freeze::{Stamp, Window};

use super::*;

/// T0 (1 000 000 ms) is 1970-01-01T00:16:40Z: a window from the epoch to 00:20:00Z is open.
const FREEZE_END: u64 = 1_200_000;

fn christmas() -> Window {
    Window::Between {
        from: Stamp::parse("1970-01-01T00:00:00Z").unwrap(),
        to: Stamp::parse("1970-01-01T00:20:00Z").unwrap(),
    }
}

/// Sets `env`'s freeze windows in what the core follows (the next `push` keeps them).
fn freeze(c: &mut Core, env: &str, windows: Vec<Window>) {
    let d = c.desired.as_mut().expect("a desired state");
    d.environments.get_mut(env).expect("env").freeze = windows;
}

/// One commit that both freezes prod and pins hello `version`.
fn push_frozen(c: &mut Core, version: &str, windows: Vec<Window>, now: u64) {
    let mut d = c.desired.clone().expect("a desired state");
    d.commit = format!("frozen-{version}");
    let e = d.environments.get_mut("prod").expect("prod");
    e.freeze = windows;
    e.services.insert("hello".into(), version.into());
    c.apply_desired(d, now);
}

#[test]
fn a_freeze_holds_a_new_deploy_and_releases_it_when_it_ends() {
    let mut c = core();
    let p = policy(1, 0);
    push(&mut c, "prod", "1.0", &p, 0);
    heartbeat(&mut c, "h1", "prod", "1.0", "1.0", 1);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Success);
    // The commit that freezes prod also asks for 2.0: the freeze holds it.
    push_frozen(&mut c, "2.0", vec![christmas()], T0);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Pending);
    let e = acquire(&mut c, "h1", "prod", "2.0", T0 + 1).unwrap_err();
    assert_eq!((e.status, e.body.reason.as_deref()), (409, Some("frozen")));
    assert!(
        e.body.message.contains(
            "prod is frozen until 1970-01-01T00:20:00Z (freeze: 1970-01-01T00:00:00Z to 1970-01-01T00:20:00Z)"
        ) && e
            .body
            .message
            .contains("drover approve --during-freeze prod hello 2.0"),
        "{}",
        e.body.message
    );
    let view = c.status(T0 + 100_000).rollouts;
    let two = view.iter().find(|r| r.version == "2.0").unwrap();
    assert!(
        two.waiting_for
            .as_deref()
            .is_some_and(|w| w.contains("frozen until 1970-01-01T00:20:00Z")),
        "{two:?}"
    );
    // It waits: it is not aborted, whatever time passes within the window.
    c.tick(FREEZE_END - 1);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Pending);
    // The sweep after the end starts it.
    c.tick(FREEZE_END + SWEEP_MS);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Running);
    assert!(acquire(&mut c, "h1", "prod", "2.0", FREEZE_END + SWEEP_MS + 1).is_ok());
}

#[test]
fn rollbacks_go_through_a_freeze() {
    let mut c = core();
    let p = policy(1, 0);
    push(&mut c, "prod", "1.0", &p, 0);
    heartbeat(&mut c, "h1", "prod", "1.0", "1.0", 1);
    push(&mut c, "prod", "2.0", &p, 2);
    let g = acquire(&mut c, "h1", "prod", "2.0", 3).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), 4).unwrap();
    heartbeat(&mut c, "h1", "prod", "2.0", "2.0", 5);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Success);
    freeze(&mut c, "prod", vec![christmas()]);
    // `git revert` to 1.0 during the freeze: a rollback, it starts at once.
    push(&mut c, "prod", "1.0", &p, T0);
    assert_eq!(rollout(&c, "prod", "1.0").kind, RolloutKind::Rollback);
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Running);
    assert!(acquire(&mut c, "h1", "prod", "1.0", T0 + 1).is_ok());
    // So does `drover rollback` (of a deploy that got through, here by an admin).
    let mut c = core();
    push(&mut c, "prod", "1.0", &p, 0);
    heartbeat(&mut c, "h1", "prod", "1.0", "1.0", 1);
    freeze(&mut c, "prod", vec![christmas()]);
    push(&mut c, "prod", "2.0", &p, T0);
    let root = person("root", Role::Admin, &[]);
    c.approve_during_freeze("prod", "hello", "2.0", &root, T0 + 1)
        .unwrap();
    let v = c
        .rollback(
            "prod",
            "hello",
            None,
            &person("ops", Role::Operator, &[]),
            T0 + 2,
        )
        .unwrap();
    assert_eq!(
        (v.version.as_str(), v.state),
        ("1.0", RolloutState::Running)
    );
}

#[test]
fn an_admin_lets_one_rollout_through_a_freeze_audited() {
    let mut c = core();
    let mut p = policy(1, 0);
    p.approval_required = true;
    push(&mut c, "prod", "1.0", &p, 0);
    freeze(&mut c, "prod", vec![christmas()]);
    push(&mut c, "prod", "2.0", &p, T0);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Pending);
    // A plain approval says why it cannot.
    let alice = person("alice", Role::Approver, &[]);
    let e = c
        .decide("prod", "hello", "2.0", true, &alice, T0 + 1)
        .unwrap_err();
    assert_eq!(e.status, 409);
    assert!(
        e.body.message.contains("prod is frozen until"),
        "{}",
        e.body.message
    );
    // --during-freeze is for admins; a refusal is audited.
    c.take_changes();
    let e = c
        .approve_during_freeze("prod", "hello", "2.0", &alice, T0 + 2)
        .unwrap_err();
    assert_eq!(e.status, 403);
    assert!(
        audit(&c.take_changes())
            .iter()
            .any(|(who, what, _)| who == "alice" && what == "denied")
    );
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Pending);
    // An admin's lets it through and approves it (it needed an approval too).
    let root = person("root", Role::Admin, &[]);
    let v = c
        .approve_during_freeze("prod", "hello", "2.0", &root, T0 + 3)
        .unwrap();
    assert_eq!(v.state, RolloutState::Running);
    assert_eq!(v.decision.as_ref().unwrap().by, "root");
    let r = rollout(&c, "prod", "2.0");
    assert_eq!(r.freeze_lifted.as_ref().unwrap().by, "root");
    let trail = audit(&c.take_changes());
    assert!(
        trail.iter().any(|(who, what, detail)| who == "root"
            && what == "freeze_lifted"
            && detail.contains("other rollouts still wait until 1970-01-01T00:20:00Z")),
        "{trail:?}"
    );
    // Once is enough: the rollout is no longer held by the freeze.
    let e = c
        .approve_during_freeze("prod", "hello", "2.0", &root, T0 + 4)
        .unwrap_err();
    assert_eq!(e.status, 409);
    // The freeze still holds the next one.
    push(&mut c, "prod", "3.0", &p, T0 + 5);
    assert_eq!(state(&c, "prod", "3.0"), RolloutState::Pending);
    // The lift survives a restart of the coordinator (it is stored with the rollout).
    let stored: Vec<Rollout> = c.rollouts.values().cloned().collect();
    let json = serde_json::to_string(&stored).unwrap();
    let back: Vec<Rollout> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, stored);
}

/// Four hosts of prod on 1.0, and 2.0 pushed with `max_parallel: 2` and the gate after the
/// first batch.
fn gated(approval_required: bool) -> (Core, Policy) {
    let mut c = core();
    let mut p = policy(2, 0);
    push(&mut c, "prod", "1.0", &p, T0);
    for h in ["h1", "h2", "h3", "h4"] {
        heartbeat(&mut c, h, "prod", "1.0", "1.0", T0);
    }
    p.approve_after_first_batch = true;
    p.approval_required = approval_required;
    p.approvers = vec!["release-managers".into()];
    push(&mut c, "prod", "2.0", &p, T0 + 1);
    for h in ["h1", "h2", "h3", "h4"] {
        heartbeat(&mut c, h, "prod", "2.0", "1.0", T0 + 1);
    }
    (c, p)
}

/// The first batch (h1, h2) deploys 2.0 and reports it.
fn first_batch(c: &mut Core, at: u64) {
    let g1 = acquire(c, "h1", "prod", "2.0", at).unwrap();
    let g2 = acquire(c, "h2", "prod", "2.0", at).unwrap();
    // The first batch is two hosts: nobody else starts, even once one is done.
    let e = acquire(c, "h3", "prod", "2.0", at).unwrap_err();
    assert_eq!(e.body.reason.as_deref(), Some("first_batch"));
    c.release(&g1.lease.id, &ok(Outcome::Success), at + 1)
        .unwrap();
    heartbeat(c, "h1", "prod", "2.0", "2.0", at + 2);
    let e = acquire(c, "h3", "prod", "2.0", at + 3).unwrap_err();
    assert_eq!(
        e.body.reason.as_deref(),
        Some("first_batch"),
        "{}",
        e.body.message
    );
    c.release(&g2.lease.id, &ok(Outcome::Success), at + 4)
        .unwrap();
    heartbeat(c, "h2", "prod", "2.0", "2.0", at + 5);
}

#[test]
fn a_gate_after_the_first_batch_holds_the_rest_until_approved() {
    let (mut c, _) = gated(false);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Running);
    first_batch(&mut c, T0 + 10);
    let r = rollout(&c, "prod", "2.0");
    assert_eq!(r.state, RolloutState::ApprovalRequired);
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("its first batch (h1, h2) succeeded: approve to go on"),
        "{:?}",
        r.reason
    );
    let e = acquire(&mut c, "h3", "prod", "2.0", T0 + 20).unwrap_err();
    assert_eq!(e.body.reason.as_deref(), Some("approval_required"));
    assert!(
        e.body
            .message
            .contains("after its first batch (release-managers)")
    );
    // Outside the approver groups: refused.
    let bob = person("bob", Role::Approver, &["qa"]);
    assert_eq!(
        c.decide("prod", "hello", "2.0", true, &bob, T0 + 21)
            .unwrap_err()
            .status,
        403
    );
    let alice = person("alice", Role::Approver, &["release-managers"]);
    let v = c
        .decide("prod", "hello", "2.0", true, &alice, T0 + 22)
        .unwrap();
    assert_eq!(v.state, RolloutState::Running);
    assert!(v.decision.is_none(), "the start needed no approval");
    assert_eq!(
        rollout(&c, "prod", "2.0").first_batch.as_ref().unwrap().by,
        "alice"
    );
    // The rest go, two at a time, and the rollout completes.
    let g3 = acquire(&mut c, "h3", "prod", "2.0", T0 + 23).unwrap();
    let g4 = acquire(&mut c, "h4", "prod", "2.0", T0 + 23).unwrap();
    c.release(&g3.lease.id, &ok(Outcome::Success), T0 + 24)
        .unwrap();
    c.release(&g4.lease.id, &ok(Outcome::Success), T0 + 24)
        .unwrap();
    for h in ["h1", "h2", "h3", "h4"] {
        heartbeat(&mut c, h, "prod", "2.0", "2.0", T0 + 25);
    }
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Success);
    assert!(c.illegal.is_empty(), "{:?}", c.illegal);
}

#[test]
fn both_gates_ask_separately() {
    let (mut c, _) = gated(true);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::ApprovalRequired);
    let alice = person("alice", Role::Approver, &["release-managers"]);
    c.decide("prod", "hello", "2.0", true, &alice, T0 + 2)
        .unwrap();
    first_batch(&mut c, T0 + 10);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::ApprovalRequired);
    let carol = person("carol", Role::Approver, &["release-managers"]);
    let v = c
        .decide("prod", "hello", "2.0", true, &carol, T0 + 20)
        .unwrap();
    assert_eq!(v.state, RolloutState::Running);
    assert_eq!(v.decision.as_ref().unwrap().by, "alice");
    assert_eq!(
        rollout(&c, "prod", "2.0").first_batch.as_ref().unwrap().by,
        "carol"
    );
    assert!(c.illegal.is_empty(), "{:?}", c.illegal);
}

#[test]
fn a_rejected_or_unanswered_gate_rolls_the_first_batch_back() {
    let (mut c, _) = gated(false);
    first_batch(&mut c, T0 + 10);
    let alice = person("alice", Role::Approver, &["release-managers"]);
    let v = c
        .decide("prod", "hello", "2.0", false, &alice, T0 + 20)
        .unwrap();
    assert_eq!(v.state, RolloutState::RollingBack);
    assert!(
        v.reason
            .unwrap()
            .contains("rejected after the first batch by alice")
    );
    // h1 and h2 are told to revert; h3 never starts.
    for h in ["h1", "h2"] {
        let acts = heartbeat(&mut c, h, "prod", "2.0", "2.0", T0 + 21).actions;
        assert_eq!(acts[0].action, ActionKind::Revert, "{h}");
    }
    let e = acquire(&mut c, "h3", "prod", "2.0", T0 + 21).unwrap_err();
    assert_eq!(e.status, 422);

    // Unanswered: the timeout (60 s here) rolls back too.
    let (mut c, _) = gated(false);
    first_batch(&mut c, T0 + 10);
    c.tick(T0 + 15 + 59_000);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::ApprovalRequired);
    c.tick(T0 + 15 + 60_000);
    let r = rollout(&c, "prod", "2.0");
    assert_eq!(r.state, RolloutState::RollingBack);
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("the approval after the first batch timed out after 60s")
    );
    assert!(c.illegal.is_empty(), "{:?}", c.illegal);
}

#[test]
fn a_fleet_that_fits_in_the_first_batch_needs_no_gate() {
    let mut c = core();
    let mut p = policy(2, 0);
    p.approve_after_first_batch = true;
    push(&mut c, "prod", "1.0", &p, T0);
    for h in ["h1", "h2"] {
        heartbeat(&mut c, h, "prod", "1.0", "0.9", T0);
        let g = acquire(&mut c, h, "prod", "1.0", T0 + 1).unwrap();
        c.release(&g.lease.id, &ok(Outcome::Success), T0 + 2)
            .unwrap();
    }
    for h in ["h1", "h2"] {
        heartbeat(&mut c, h, "prod", "1.0", "1.0", T0 + 3);
    }
    assert_eq!(state(&c, "prod", "1.0"), RolloutState::Success);
}

/// hello 1.0 live on `ecs`, the cluster agent holding a lease on 2.0 (approvers: release-managers).
fn at_a_step() -> (Core, String) {
    let mut c = core();
    let mut p = policy(1, 0);
    p.approvers = vec!["release-managers".into()];
    push(&mut c, "prod", "1.0", &p, T0);
    heartbeat(&mut c, "ecs", "prod", "1.0", "1.0", T0);
    push(&mut c, "prod", "2.0", &p, T0 + 1);
    let g = acquire(&mut c, "ecs", "prod", "2.0", T0 + 2).unwrap();
    (c, g.lease.id)
}

#[test]
fn a_step_gate_holds_the_lease_holder_until_approved_once_per_step() {
    let (mut c, id) = at_a_step();
    let e = c.step_gate(&id, "10%", T0 + 3).unwrap_err();
    assert_eq!(
        (e.status, e.body.reason.as_deref()),
        (409, Some("approval_required"))
    );
    assert!(
        e.body.message.contains(
            "waits at 10% for an approval (release-managers): drover approve prod hello 2.0"
        ),
        "{}",
        e.body.message
    );
    let r = rollout(&c, "prod", "2.0");
    assert_eq!(r.state, RolloutState::ApprovalRequired);
    assert_eq!(r.step_gate.as_deref(), Some("10%"));
    let view = c.status(T0 + 4).rollouts;
    let two = view.iter().find(|r| r.version == "2.0").unwrap();
    assert!(
        two.waiting_for
            .as_deref()
            .is_some_and(|w| w.starts_with("an approval at 10% (release-managers)")),
        "{two:?}"
    );
    // Asking again changes nothing; the lease stays renewable.
    assert_eq!(c.step_gate(&id, "10%", T0 + 5).unwrap_err().status, 409);
    c.renew(&id, T0 + 5).unwrap();
    // Not an approver of prod: refused.
    let bob = person("bob", Role::Approver, &["others"]);
    assert_eq!(
        c.decide("prod", "hello", "2.0", true, &bob, T0 + 6)
            .unwrap_err()
            .status,
        403
    );
    let alice = person("alice", Role::Approver, &["release-managers"]);
    let v = c
        .decide("prod", "hello", "2.0", true, &alice, T0 + 7)
        .unwrap();
    assert_eq!(v.state, RolloutState::Running);
    assert_eq!(v.reason.as_deref(), Some("approved at 10% by alice"));
    // The step is passed; the next step with an approval stops again.
    assert!(c.step_gate(&id, "10%", T0 + 8).is_ok());
    assert_eq!(c.step_gate(&id, "50%", T0 + 9).unwrap_err().status, 409);
    let r = rollout(&c, "prod", "2.0");
    assert!(r.step_decisions["10%"].approved);
    assert_eq!(r.step_gate.as_deref(), Some("50%"));
    c.decide("prod", "hello", "2.0", true, &alice, T0 + 10)
        .unwrap();
    assert!(c.step_gate(&id, "50%", T0 + 11).is_ok());
    c.release(&id, &ok(Outcome::Success), T0 + 12).unwrap();
    heartbeat(&mut c, "ecs", "prod", "2.0", "2.0", T0 + 13);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Success);
    let approvals: Vec<_> = audit(&c.changes)
        .into_iter()
        .filter(|(_, a, _)| a == "approve")
        .map(|(_, _, d)| d)
        .collect();
    assert_eq!(
        approvals,
        ["approved at 10% by alice", "approved at 50% by alice"]
    );
    assert!(c.illegal.is_empty(), "{:?}", c.illegal);
}

#[test]
fn a_rejected_or_unanswered_step_fails_the_rollout_and_the_holder_puts_traffic_back() {
    let (mut c, id) = at_a_step();
    c.step_gate(&id, "10%", T0 + 3).unwrap_err();
    let alice = person("alice", Role::Approver, &["release-managers"]);
    let v = c
        .decide("prod", "hello", "2.0", false, &alice, T0 + 4)
        .unwrap();
    assert_eq!(v.state, RolloutState::RollingBack);
    assert_eq!(v.reason.as_deref(), Some("rejected at 10% by alice"));
    let e = c.step_gate(&id, "10%", T0 + 5).unwrap_err();
    assert_eq!(
        (e.status, e.body.reason.as_deref()),
        (422, Some("rejected"))
    );
    // The holder rolled back: its release ends the rollback.
    c.release(&id, &ok(Outcome::Failure), T0 + 6).unwrap();
    heartbeat(&mut c, "ecs", "prod", "2.0", "1.0", T0 + 7);
    c.tick(T0 + 7 + SWEEP_MS);
    assert!(rollout(&c, "prod", "2.0").state.is_terminal());

    // Unanswered within the timeout (60 s here): it fails too.
    let (mut c, id) = at_a_step();
    c.step_gate(&id, "10%", T0 + 3).unwrap_err();
    // The holder keeps its lease alive while it waits.
    for t in (T0 + 1_000..T0 + 3 + 60_000).step_by(1_000) {
        c.renew(&id, t).unwrap();
        c.tick(t);
    }
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::ApprovalRequired);
    c.tick(T0 + 3 + 60_000);
    let r = rollout(&c, "prod", "2.0");
    assert_eq!(r.state, RolloutState::RollingBack);
    assert_eq!(
        r.reason.as_deref(),
        Some("the approval at 10% timed out after 60s")
    );
    assert_eq!(r.step_gate, None);
    let e = c.step_gate(&id, "10%", T0 + 3 + 60_001).unwrap_err();
    assert_eq!((e.status, e.body.reason.as_deref()), (422, Some("failed")));
    assert!(c.illegal.is_empty(), "{:?}", c.illegal);
}

#[test]
fn rollbacks_pass_their_steps_and_bad_gate_requests_change_nothing() {
    let (mut c, id) = at_a_step();
    for bad in ["", &"x".repeat(33), "10%\n", "ten\u{e9}"] {
        let e = c.step_gate(&id, bad, T0 + 3).unwrap_err();
        assert_eq!(e.status, 400, "{bad:?}");
    }
    assert_eq!(c.step_gate("nope", "10%", T0 + 3).unwrap_err().status, 410);
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Running);
    // Paused by an operator: the holder waits where it is.
    let ops = person("ops", Role::Operator, &[]);
    c.operate("prod", "hello", "pause", &ops, T0 + 4).unwrap();
    let e = c.step_gate(&id, "10%", T0 + 5).unwrap_err();
    assert_eq!((e.status, e.body.reason.as_deref()), (409, Some("paused")));
    // A git revert to 1.0 is a rollback: its steps never wait for a person.
    let p = rollout(&c, "prod", "2.0").policy.clone();
    c.release(&id, &ok(Outcome::Success), T0 + 6).unwrap();
    heartbeat(&mut c, "ecs", "prod", "2.0", "2.0", T0 + 7);
    push(&mut c, "prod", "1.0", &p, T0 + 8);
    assert_eq!(rollout(&c, "prod", "1.0").kind, RolloutKind::Rollback);
    let g = acquire(&mut c, "ecs", "prod", "1.0", T0 + 9).unwrap();
    assert!(c.step_gate(&g.lease.id, "10%", T0 + 10).is_ok());
    assert_eq!(rollout(&c, "prod", "1.0").state, RolloutState::Running);
}
