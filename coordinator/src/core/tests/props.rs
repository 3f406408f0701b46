//! Property tests of the core: random sequences of what Git, hosts, people and time do —
//! commits, acquire, renew, release, lease expiry, heartbeats, approvals, pause, resume,
//! abort, retry, and coordinator restarts from what it stored — checked after every step:
//! - never more than `max_parallel` leases on the service;
//! - no outcome lost: a lease granted and not given up is released exactly once, even after
//!   it expired or the coordinator restarted, and its outcome counts in its rollout;
//! - no lease the hosts were not granted, and every transition one the matrix allows;
//!
//! and at the end, once every host reports, every rollout has ended.
//!
//! More cases: `PROPTEST_CASES=20000 cargo test -p drover-coordinator props`.

use proptest::prelude::*;

use super::*;
use crate::rollout::allowed;
use crate::wire::{Lease, Verification as Verdict};

const HOSTS: usize = 5;
const VERSIONS: [&str; 3] = ["1.0", "2.0", "3.0"];
const TTL: u64 = 30_000;
const BEAT: u64 = 5_000;
const ENV: &str = "prod";
const SERVICE: &str = "hello";

/// One thing that happens.
#[derive(Clone, Debug)]
enum Op {
    /// Git asks for a version.
    Commit(usize),
    /// A host asks for a deploy lease on Git's version.
    Acquire(usize),
    /// A host asks for a revert lease on the rollout rolling back.
    Revert(usize),
    /// A host renews its oldest lease.
    Renew(usize),
    /// A host ends its oldest lease.
    Release {
        host: usize,
        success: bool,
        medium: bool,
    },
    /// A host reports.
    Heartbeat { host: usize, healthy: bool },
    /// Time passes (leases expire, approvals time out, hosts go stale).
    Wait(u64),
    /// An approver approves or rejects Git's version.
    Decide(bool),
    /// An operator pauses, resumes or aborts.
    Operate(usize),
    /// An operator retries.
    Retry,
    /// The coordinator restarts from its store.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..VERSIONS.len()).prop_map(Op::Commit),
        6 => (0..HOSTS).prop_map(Op::Acquire),
        1 => (0..HOSTS).prop_map(Op::Revert),
        2 => (0..HOSTS).prop_map(Op::Renew),
        6 => (0..HOSTS, prop::bool::weighted(0.7), prop::bool::weighted(0.1))
            .prop_map(|(host, success, medium)| Op::Release { host, success, medium }),
        4 => (0..HOSTS, prop::bool::weighted(0.9))
            .prop_map(|(host, healthy)| Op::Heartbeat { host, healthy }),
        3 => (0u64..45_000).prop_map(Op::Wait),
        1 => prop::bool::weighted(0.8).prop_map(Op::Decide),
        1 => (0..3usize).prop_map(Op::Operate),
        1 => Just(Op::Retry),
        1 => Just(Op::Restart),
    ]
}

/// A lease as its host knows it.
#[derive(Clone, Debug)]
struct Held {
    id: String,
    rollout: u64,
    purpose: Purpose,
    version: String,
}

/// What the store holds: the changes folded, as the SQLite store writes them.
#[derive(Default)]
struct Stored {
    rollouts: BTreeMap<u64, Rollout>,
    leases: BTreeMap<String, Lease>,
    hosts: BTreeMap<String, Host>,
    last_audit: u64,
    desired: Option<Desired>,
    refused: Option<Refused>,
    overrides: BTreeMap<(String, String), Override>,
    outbox: BTreeMap<String, crate::notify::Delivery>,
    incidents: BTreeMap<String, crate::notify::Incident>,
}

impl Stored {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            rollouts: self.rollouts.values().cloned().collect(),
            leases: self.leases.values().cloned().collect(),
            hosts: self
                .hosts
                .iter()
                .map(|(n, h)| (n.clone(), h.clone()))
                .collect(),
            last_audit: self.last_audit,
            desired: self.desired.clone(),
            refused: self.refused.clone(),
            overrides: self.overrides.values().cloned().collect(),
            outbox: self.outbox.values().cloned().collect(),
            incidents: self.incidents.values().cloned().collect(),
        }
    }
}

/// What the cases did, summed over all of them: the test fails if the random sequences
/// never reached what the invariants are about (so it cannot pass by doing nothing).
#[derive(Default, Debug)]
struct Seen {
    grants: usize,
    releases: usize,
    late_releases: usize,
    drops: usize,
    restarts_holding: usize,
    states: BTreeSet<RolloutState>,
}

/// The coordinator, the hosts as they see themselves, and what was stored.
struct World<'a> {
    seen: &'a mut Seen,
    c: Core,
    now: u64,
    policy: Policy,
    commits: u64,
    /// The version Git asks for.
    git: Option<&'static str>,
    held: Vec<Vec<Held>>,
    actual: Vec<String>,
    previous: Vec<String>,
    stored: Stored,
    /// Each rollout's state as last stored.
    states: BTreeMap<u64, RolloutState>,
    /// Audit entries of the last step.
    audit: Vec<AuditEntry>,
}

fn host(i: usize) -> String {
    format!("h{i}")
}

impl<'a> World<'a> {
    fn new(policy: Policy, seen: &'a mut Seen) -> World<'a> {
        World {
            seen,
            c: Core::new(Snapshot::default(), TTL, BEAT, T0),
            now: T0,
            policy,
            commits: 0,
            git: None,
            held: vec![Vec::new(); HOSTS],
            actual: vec!["0.9".into(); HOSTS],
            previous: vec!["0.9".into(); HOSTS],
            stored: Stored::default(),
            states: BTreeMap::new(),
            audit: Vec::new(),
        }
    }

    fn commit(&mut self, version: &'static str) {
        self.commits += 1;
        let mut services = BTreeMap::new();
        services.insert(SERVICE.to_string(), version.to_string());
        let d = Desired {
            commit: format!("{:040x}", self.commits),
            commit_time_ms: self.now,
            fetched_at_ms: self.now,
            environments: BTreeMap::from([(
                ENV.to_string(),
                EnvDesired {
                    policy: self.policy.clone(),
                    services,
                    after: BTreeMap::new(),
                    freeze: vec![],
                    jobs: Default::default(),
                    notify: vec![],
                },
            )]),
        };
        self.c.apply_desired(d, self.now);
        self.git = Some(version);
    }

    /// A host's request for a lease; the answer as the host sees it.
    fn acquire(&mut self, h: usize, version: &str, purpose: Purpose) -> Option<Held> {
        let r = AcquireRequest {
            host: host(h),
            environment: ENV.into(),
            service: SERVICE.into(),
            version: version.into(),
            purpose,
            commit: self.c.tip.clone().unwrap_or_default(),
        };
        let active_before: Vec<String> = self.held[h]
            .iter()
            .filter(|l| self.c.leases.contains_key(&l.id))
            .map(|l| l.id.clone())
            .collect();
        let g = self.c.acquire(&r, &agent(), self.now).ok()?;
        let held = Held {
            id: g.lease.id.clone(),
            rollout: g.lease.rollout,
            purpose,
            version: version.into(),
        };
        if !self.held[h].iter().any(|l| l.id == held.id) {
            // A host asking for another rollout gives up the deploy its older lease was for:
            // only a lease it held live may be dropped so, and the drop is audited.
            let mut dropped = Vec::new();
            self.held[h].retain(|l| {
                let kept = self.c.leases.contains_key(&l.id) || self.c.expired.contains_key(&l.id);
                if !kept {
                    dropped.push(l.clone());
                }
                kept
            });
            self.seen.grants += 1;
            self.seen.drops += dropped.len();
            for l in &dropped {
                assert!(active_before.contains(&l.id), "{l:?} vanished");
                assert_ne!(
                    l.rollout, held.rollout,
                    "a lease of the same rollout dropped"
                );
            }
            self.held[h].push(held.clone());
        }
        Some(held)
    }

    /// A host ends its oldest lease: the outcome must count.
    fn release(&mut self, h: usize, success: bool, medium: bool) {
        if self.held[h].is_empty() {
            return;
        }
        let l = self.held[h].remove(0);
        let req = ReleaseRequest {
            outcome: if success {
                Outcome::Success
            } else {
                Outcome::Failure
            },
            message: Some("done".into()),
            verification: medium.then(|| Verdict {
                risk: crate::wire::Risk::Medium,
                summary: "p=0.2".into(),
                metrics: vec![],
            }),
        };
        self.seen.releases += 1;
        if self.c.expired.contains_key(&l.id) {
            self.seen.late_releases += 1;
        }
        let view = self.c.release(&l.id, &req, self.now);
        assert!(view.is_ok(), "the outcome of {l:?} was lost: {view:?}");
        let r = &self.c.rollouts[&l.rollout];
        let name = host(h);
        match (l.purpose, success) {
            (Purpose::Deploy, true) => {
                assert!(r.succeeded.contains(&name), "{name} not counted: {r:?}");
                self.previous[h] = std::mem::replace(&mut self.actual[h], l.version.clone());
            }
            (Purpose::Deploy, false) => {
                assert!(r.failed.contains(&name), "{name} not counted: {r:?}");
            }
            (Purpose::Revert, true) => {
                assert!(r.reverted.contains(&name), "{name} not counted: {r:?}");
                self.actual[h] = self.previous[h].clone();
            }
            (Purpose::Revert, false) => {}
        }
        self.store();
        assert!(
            self.audit
                .iter()
                .any(|a| a.action == "lease_released" && a.actor == name),
            "the release of {l:?} is not audited"
        );
        // A second release of the same lease changes nothing.
        assert_eq!(
            self.c.release(&l.id, &req, self.now).unwrap_err().status,
            410
        );
    }

    fn heartbeat(&mut self, h: usize, healthy: bool) {
        let desired = self.git.map(str::to_string);
        let s = ServiceReport {
            service: SERVICE.into(),
            desired,
            actual: Some(self.actual[h].clone()),
            healthy,
            phase: None,
            last_error: None,
            failed: None,
        };
        beat(&mut self.c, &host(h), ENV, s, self.now);
    }

    fn wait(&mut self, ms: u64) {
        self.now += ms;
        self.c.tick(self.now);
    }

    fn rolling_back(&self) -> Option<String> {
        self.c
            .rollouts
            .values()
            .rev()
            .find(|r| r.state == RolloutState::RollingBack)
            .map(|r| r.version.clone())
    }

    fn step(&mut self, op: &Op) {
        let ops = person("ops", Role::Operator, &[]);
        match *op {
            Op::Commit(v) => self.commit(VERSIONS[v]),
            Op::Acquire(h) => {
                if let Some(v) = self.git {
                    self.acquire(h, v, Purpose::Deploy);
                }
            }
            Op::Revert(h) => {
                if let Some(v) = self.rolling_back() {
                    self.acquire(h, &v, Purpose::Revert);
                }
            }
            Op::Renew(h) => {
                if let Some(l) = self.held[h].first() {
                    let id = l.id.clone();
                    match self.c.renew(&id, self.now) {
                        Ok(_) => assert!(self.c.leases.contains_key(&id)),
                        Err(e) => {
                            assert_eq!(e.status, 410, "{e:?}");
                            assert!(!self.c.leases.contains_key(&id));
                        }
                    }
                }
            }
            Op::Release {
                host,
                success,
                medium,
            } => self.release(host, success, medium),
            Op::Heartbeat { host, healthy } => self.heartbeat(host, healthy),
            Op::Wait(ms) => self.wait(ms),
            Op::Decide(yes) => {
                if let Some(v) = self.git {
                    let ann = person("ann", Role::Approver, &[]);
                    let _ = self.c.decide(ENV, SERVICE, v, yes, &ann, self.now);
                }
            }
            Op::Operate(i) => {
                let verb = ["pause", "resume", "abort"][i];
                let _ = self.c.operate(ENV, SERVICE, verb, &ops, self.now);
            }
            Op::Retry => {
                let _ = self.c.retry(ENV, SERVICE, &ops, self.now);
            }
            Op::Restart => {
                if !self.c.leases.is_empty() {
                    self.seen.restarts_holding += 1;
                }
                self.store();
                self.c = Core::new(self.stored.snapshot(), TTL, BEAT, self.now);
            }
        }
        self.store();
        self.check();
    }

    /// Folds the step's changes into the store, checking each rollout's moves on the way.
    fn store(&mut self) {
        self.audit.clear();
        for ch in self.c.take_changes() {
            match ch {
                Change::Rollout(r) => {
                    if let Some(&from) = self.states.get(&r.id) {
                        assert!(
                            from == r.state || allowed(from, r.state),
                            "rollout {} stored {from} then {}",
                            r.id,
                            r.state
                        );
                    }
                    self.states.insert(r.id, r.state);
                    self.seen.states.insert(r.state);
                    self.stored.rollouts.insert(r.id, *r);
                }
                Change::Lease(l) => {
                    self.stored.leases.insert(l.id.clone(), l);
                }
                Change::LeaseGone(id) => {
                    self.stored.leases.remove(&id);
                }
                Change::Host(n, h) => {
                    self.stored.hosts.insert(n, h);
                }
                Change::Audit(a) => {
                    assert!(a.seq > self.stored.last_audit, "audit seq went back: {a:?}");
                    self.stored.last_audit = a.seq;
                    self.audit.push(a);
                }
                Change::Desired(d) => self.stored.desired = Some(*d),
                Change::Refused(r) => self.stored.refused = r,
                Change::Override(e, s, o) => match o {
                    Some(o) => {
                        self.stored.overrides.insert((e, s), o);
                    }
                    None => {
                        self.stored.overrides.remove(&(e, s));
                    }
                },
                Change::Outbox(d) => {
                    self.stored.outbox.insert(d.id.clone(), *d);
                }
                Change::OutboxGone(id) => {
                    self.stored.outbox.remove(&id);
                }
                Change::Incident(k, i) => match i {
                    Some(i) => {
                        self.stored.incidents.insert(k, *i);
                    }
                    None => {
                        self.stored.incidents.remove(&k);
                    }
                },
            }
        }
    }

    fn check(&self) {
        assert!(self.c.illegal.is_empty(), "{:?}", self.c.illegal);
        let live = self.c.leases_of_service(ENV, SERVICE);
        assert!(
            live <= self.policy.max_parallel as usize,
            "{live} leases, max_parallel {}",
            self.policy.max_parallel
        );
        for (h, held) in self.held.iter().enumerate() {
            for l in held {
                assert!(
                    self.c.leases.contains_key(&l.id) || self.c.expired.contains_key(&l.id),
                    "h{h}'s lease {l:?} is gone before its release"
                );
            }
        }
        for l in self.c.leases.values() {
            assert!(self.c.rollouts.contains_key(&l.rollout), "{l:?}");
            let h: usize = l.host[1..].parse().expect("a host of the test");
            assert!(
                self.held[h].iter().any(|x| x.id == l.id),
                "{l:?} was never granted to its host"
            );
        }
    }

    /// Every host reports and does what it is told, people approve and resume, until nothing
    /// moves; then every rollout must have ended.
    fn settle(&mut self) {
        let admin = person("root", Role::Admin, &[]);
        for _ in 0..40 {
            if self.c.rollouts.values().all(ended) {
                break;
            }
            if let Some(v) = self.git {
                let _ = self.c.decide(ENV, SERVICE, v, true, &admin, self.now);
            }
            while self
                .c
                .operate(ENV, SERVICE, "resume", &admin, self.now)
                .is_ok()
            {}
            self.store();
            for h in 0..HOSTS {
                while !self.held[h].is_empty() {
                    self.release(h, true, false);
                }
                if let Some(v) = self.git
                    && self.acquire(h, v, Purpose::Deploy).is_some()
                {
                    self.release(h, true, false);
                }
                if let Some(v) = self.rolling_back()
                    && self.acquire(h, &v, Purpose::Revert).is_some()
                {
                    self.release(h, true, false);
                }
                self.heartbeat(h, true);
                self.store();
                self.check();
            }
            self.wait(BEAT + 1_000);
            self.store();
            self.check();
        }
        let open: Vec<String> = self
            .c
            .rollouts
            .values()
            .filter(|r| !ended(r))
            .map(|r| format!("#{} {} {} {:?}", r.id, r.version, r.state, r.reason))
            .collect();
        assert!(open.is_empty(), "rollouts that never end: {open:?}");
    }
}

/// Whether a rollout has ended: terminal, or failed and waiting for an operator (a revert
/// that failed on a host).
fn ended(r: &Rollout) -> bool {
    r.state.is_terminal()
        || (r.state == RolloutState::Failed
            && r.reason.as_deref().is_some_and(|w| w.contains("operator")))
}

fn policies() -> impl Strategy<Value = Policy> {
    (1u32..4, 0u32..3, prop::bool::weighted(0.3)).prop_map(|(max_parallel, max_failures, gate)| {
        let mut p = policy(max_parallel, max_failures);
        p.approval_required = gate;
        p
    })
}

#[test]
fn leases_outcomes_and_endings_hold_whatever_happens() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(400);
    let config = ProptestConfig {
        cases,
        max_shrink_iters: 4096,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let seen = std::cell::RefCell::new(Seen::default());
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let cases = (policies(), prop::collection::vec(op(), 1..80));
    let result = runner.run(&cases, |(p, ops)| {
        let mut seen = seen.borrow_mut();
        let mut w = World::new(p, &mut seen);
        w.commit(VERSIONS[0]);
        w.store();
        for op in &ops {
            w.step(op);
        }
        w.settle();
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let seen = seen.into_inner();
    eprintln!("{seen:?}");
    assert!(seen.grants > 0 && seen.releases > 0, "{seen:?}");
    assert!(
        seen.late_releases > 0,
        "no lease was released after it expired: {seen:?}"
    );
    assert!(seen.drops > 0, "no lease was given up: {seen:?}");
    assert!(
        seen.restarts_holding > 0,
        "no restart with leases held: {seen:?}"
    );
    for s in RolloutState::ALL {
        assert!(
            seen.states.contains(&s),
            "no rollout was ever {s}: {seen:?}"
        );
    }
}

/// Replays a sequence the property test once shrank a failure to.
fn replay(p: Policy, ops: &[Op]) {
    let mut seen = Seen::default();
    let mut w = World::new(p, &mut seen);
    w.commit(VERSIONS[0]);
    w.store();
    for op in ops {
        w.step(op);
    }
    w.settle();
}

/// A failure on a superseded VERIFYING rollout rolled it back: ROLLING_BACK for good, since
/// no host could take a revert lease on it (Git asked for 1.0 again, under a newer rollout).
#[test]
fn a_superseded_rollout_that_fails_ends() {
    use Op::*;
    replay(
        policy(2, 0),
        &[
            Acquire(0),
            Heartbeat {
                host: 0,
                healthy: false,
            },
            Release {
                host: 0,
                success: true,
                medium: false,
            },
            Acquire(0),
            Acquire(1),
            Commit(1),
            Commit(0),
            Release {
                host: 0,
                success: false,
                medium: false,
            },
        ],
    );
}

/// A superseded VERIFYING rollout waited for ever for a host that ran another version while
/// Git asked for its version again (under a newer rollout, aborted by an operator).
#[test]
fn a_superseded_rollout_whose_hosts_run_another_version_ends() {
    use Op::*;
    replay(
        policy(3, 2),
        &[
            Heartbeat {
                host: 3,
                healthy: false,
            },
            Acquire(0),
            Release {
                host: 0,
                success: false,
                medium: false,
            },
            Acquire(3),
            Release {
                host: 3,
                success: true,
                medium: false,
            },
            Commit(1),
            Acquire(3),
            Commit(0),
            Operate(2),
        ],
    );
}
