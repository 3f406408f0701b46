//! The coordinator's request bodies, parsed as its HTTP layer parses them (`serde_json` into
//! the protocol's types) and, when they parse, handled by the coordinator's core against a
//! fleet in the middle of a rollout.
//!
//! The first byte picks the endpoint (heartbeat, lease, release, step gate, rollback); the rest is the
//! body. Nothing may panic, no request may take more than `max_parallel` leases, and the
//! status page must still serialize.
#![no_main]

use std::collections::BTreeMap;

use drover_coordinator::auth::{Caller, Role};
use drover_coordinator::core::{Core, Desired, EnvDesired, Snapshot};
use drover_coordinator::wire::{
    AcquireRequest, GateRequest, Heartbeat, Outcome, Policy, Purpose, ReleaseRequest,
    RollbackRequest, ServiceReport,
};
use libfuzzer_sys::fuzz_target;

const T0: u64 = 1_000_000;
const MAX_PARALLEL: u32 = 2;

fn caller(name: &str, role: Role, host: Option<&str>) -> Caller {
    Caller {
        name: name.into(),
        role,
        groups: vec!["managers".into()],
        host: host.map(str::to_string),
    }
}

fn desired(version: &str, n: u64) -> Desired {
    let policy = Policy {
        max_parallel: MAX_PARALLEL,
        max_failures: 1,
        approval_required: false,
        approvers: vec![],
        approval_timeout_ms: 60_000,
        promotion_requires: None,
        rollbacks_need_approval: false,
        approve_after_first_batch: false,
    };
    Desired {
        commit: format!("{n:040x}"),
        commit_time_ms: T0 + n,
        fetched_at_ms: T0 + n,
        environments: BTreeMap::from([(
            "prod".to_string(),
            EnvDesired {
                policy,
                services: BTreeMap::from([("hello".to_string(), version.to_string())]),
                after: BTreeMap::new(),
                freeze: vec![],
                jobs: Default::default(),
                notify: vec![],
            },
        )]),
    }
}

fn acquire(c: &mut Core, host: &str, version: &str, now: u64) -> Option<String> {
    let req = AcquireRequest {
        host: host.into(),
        environment: "prod".into(),
        service: "hello".into(),
        version: version.into(),
        purpose: Purpose::Deploy,
        commit: c.status(now).desired.map(|d| d.commit).unwrap_or_default(),
    };
    let agent = caller("fleet", Role::Agent, None);
    c.acquire(&req, &agent, now).ok().map(|g| g.lease.id)
}

/// hello 1.0 succeeded on web-1, then 2.0 was committed: web-1 holds a lease on it.
fn fleet() -> (Core, String) {
    let mut c = Core::new(Snapshot::default(), 30_000, 5_000, T0);
    c.apply_desired(desired("1.0", 1), T0);
    let id = acquire(&mut c, "web-1", "1.0", T0).expect("a lease on 1.0");
    let ok = ReleaseRequest {
        outcome: Outcome::Success,
        message: None,
        verification: None,
    };
    c.release(&id, &ok, T0 + 1).expect("released");
    let beat = Heartbeat {
        environment: "prod".into(),
        labels: BTreeMap::new(),
        agent_version: None,
        commit: None,
        services: vec![ServiceReport {
            service: "hello".into(),
            desired: Some("1.0".into()),
            actual: Some("1.0".into()),
            healthy: true,
            phase: None,
            last_error: None,
            failed: None,
        }],
    };
    let agent = caller("fleet", Role::Agent, None);
    c.heartbeat("web-1", &beat, &agent, T0 + 2)
        .expect("heartbeat");
    c.tick(T0 + 10_000);
    c.apply_desired(desired("2.0", 2), T0 + 10_001);
    let lease = acquire(&mut c, "web-1", "2.0", T0 + 10_002).expect("a lease on 2.0");
    (c, lease)
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let now = T0 + 20_000;
    let (mut c, lease) = fleet();
    let agent = caller("fleet", Role::Agent, None);
    let bound = caller("web-2", Role::Agent, Some("web-2"));
    match which % 5 {
        0 => {
            let Ok(hb) = serde_json::from_slice::<Heartbeat>(body) else {
                return;
            };
            let _ = c.heartbeat("web-2", &hb, &agent, now);
            let _ = c.heartbeat("web-2", &hb, &bound, now);
        }
        1 => {
            let Ok(req) = serde_json::from_slice::<AcquireRequest>(body) else {
                return;
            };
            let _ = c.acquire(&req, &agent, now);
            let _ = c.acquire(&req, &bound, now);
        }
        2 => {
            let Ok(req) = serde_json::from_slice::<ReleaseRequest>(body) else {
                return;
            };
            let _ = c.release(&lease, &req, now);
            // A second release of the same lease changes nothing.
            assert!(c.release(&lease, &req, now).is_err());
        }
        3 => {
            let Ok(req) = serde_json::from_slice::<GateRequest>(body) else {
                return;
            };
            let first = c.step_gate(&lease, &req.step, now).map(|_| ());
            // Asking again answers alike (a wait stays a wait).
            let again = c.step_gate(&lease, &req.step, now).map(|_| ());
            assert_eq!(first.map_err(|e| e.status), again.map_err(|e| e.status));
        }
        _ => {
            let body = if body.iter().all(u8::is_ascii_whitespace) {
                b"{}".as_slice()
            } else {
                body
            };
            let Ok(req) = serde_json::from_slice::<RollbackRequest>(body) else {
                return;
            };
            let admin = caller("alice", Role::Admin, None);
            let _ = c.rollback("prod", "hello", req.to.as_deref(), &admin, now);
        }
    }
    c.tick(now + 1);
    assert!(
        c.lease_count() <= MAX_PARALLEL as usize,
        "{} leases",
        c.lease_count()
    );
    serde_json::to_string(&c.status(now + 1)).expect("status serializes");
    let _ = c.take_changes();
});
