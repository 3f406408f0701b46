//! Notifications: queued with the change that caused them, answered by the sender's reports.

use super::*;
use crate::notify::{Action, Attempt, Delivery, Event, Kind, Route};

/// A core whose `prod` routes failures to a pager, a Jira project and a webhook, and
/// successes to the webhook.
fn routed() -> Core {
    let mut c = core();
    c.channels = [
        ("pager", Kind::Pagerduty),
        ("jira", Kind::Jira),
        ("hook", Kind::Webhook),
    ]
    .into_iter()
    .map(|(n, k)| (n.to_string(), k))
    .collect();
    c
}

fn routes() -> Vec<Route> {
    vec![
        Route {
            on: [Event::Failed, Event::RolledBack].into(),
            to: vec!["pager".into(), "jira".into(), "hook".into()],
        },
        Route {
            on: [Event::Succeeded, Event::Started].into(),
            to: vec!["hook".into()],
        },
    ]
}

/// Commits hello `version` to prod with `routes` (kept by later commits of `push`).
fn push_routed(c: &mut Core, version: &str, now: u64) {
    if c.desired.is_none() {
        c.desired = Some(Desired {
            commit: "c0".into(),
            commit_time_ms: 0,
            fetched_at_ms: 0,
            environments: BTreeMap::from([(
                "prod".to_string(),
                EnvDesired {
                    policy: policy(1, 0),
                    services: BTreeMap::new(),
                    after: BTreeMap::new(),
                    freeze: vec![],
                    jobs: Default::default(),
                    notify: routes(),
                },
            )]),
        });
    }
    push(c, "prod", version, &policy(1, 0), now);
}

fn queued(changes: &[Change]) -> Vec<Delivery> {
    changes
        .iter()
        .filter_map(|ch| match ch {
            Change::Outbox(d) => Some((**d).clone()),
            _ => None,
        })
        .collect()
}

fn what(ds: &[Delivery]) -> Vec<(String, String, &'static str)> {
    ds.iter()
        .map(|d| {
            (
                d.channel.clone(),
                d.notice.event.to_string(),
                d.action.name(),
            )
        })
        .collect()
}

#[test]
fn a_failure_is_queued_in_the_same_batch_as_its_transition() {
    let mut c = routed();
    push_routed(&mut c, "1.0", T0);
    // The rollout starts as the commit is read: the webhook hears of it in that batch.
    let started = c.take_changes();
    assert_eq!(
        what(&queued(&started)),
        vec![("hook".into(), "started".into(), "post")]
    );
    // h1 deploys it, h2 fails: h1 has to revert.
    heartbeat(&mut c, "h1", "prod", "1.0", "0.9", T0);
    heartbeat(&mut c, "h2", "prod", "1.0", "0.9", T0);
    let g = acquire(&mut c, "h1", "prod", "1.0", T0 + 1).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 1)
        .unwrap();
    heartbeat(&mut c, "h1", "prod", "1.0", "1.0", T0 + 1);
    c.take_changes();
    let g = acquire(&mut c, "h2", "prod", "1.0", T0 + 1).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Failure), T0 + 2)
        .unwrap();
    let batch = c.take_changes();
    // The transition to FAILED and its deliveries are one batch: one store transaction.
    assert!(batch.iter().any(
        |ch| matches!(ch, Change::Rollout(r) if r.state == RolloutState::Failed || r.state == RolloutState::RollingBack)
    ));
    let q = queued(&batch);
    assert_eq!(
        what(&q),
        vec![
            ("pager".into(), "failed".into(), "trigger"),
            ("jira".into(), "failed".into(), "create_issue"),
            ("hook".into(), "failed".into(), "post"),
        ]
    );
    assert!(
        batch
            .iter()
            .any(|ch| matches!(ch, Change::Incident(k, Some(_)) if k == "pager/prod/hello"))
    );
    let n = &q[0].notice;
    assert_eq!(
        (
            n.environment.as_str(),
            n.service.as_str(),
            n.version.as_str()
        ),
        ("prod", "hello", "1.0")
    );
    assert_eq!(n.hosts, vec!["h2".to_string()]);
    assert!(
        n.reason.as_deref().unwrap().contains("max_failures 0"),
        "{n:?}"
    );
    let ids: std::collections::BTreeSet<&String> = q.iter().map(|d| &d.id).collect();
    assert_eq!(ids.len(), 3, "each delivery has its own id");

    // The sender reports: the hook retried, Jira created OPS-7, the pager delivered.
    let (pager, jira, hook) = (q[0].id.clone(), q[1].id.clone(), q[2].id.clone());
    c.delivered(
        &hook,
        Attempt::Retry {
            error: "HTTP 500".into(),
            at_ms: T0 + 1000,
        },
        T0 + 3,
    );
    let all = c.notifications();
    let d = all.iter().find(|d| d.id == hook).unwrap();
    assert_eq!((d.attempts, d.next_at_ms), (1, T0 + 1000));
    assert_eq!(d.last_error.as_deref(), Some("HTTP 500"));
    c.delivered(&pager, Attempt::Delivered(None), T0 + 3);
    c.take_changes();

    // h1 reverts before Jira answers: the comment waits for the issue's key.
    let g = revert(&mut c, "h1", "prod", "1.0", T0 + 4).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Success), T0 + 5)
        .unwrap();
    let q2 = queued(&c.take_changes());
    assert_eq!(
        what(&q2),
        vec![
            ("jira".into(), "rolled_back".into(), "comment"),
            ("hook".into(), "rolled_back".into(), "post"),
        ],
        "no second page"
    );
    assert!(
        !q2[0].ready(),
        "a comment on an issue not created yet waits"
    );
    c.delivered(&jira, Attempt::Delivered(Some("OPS-7".into())), T0 + 6);
    let patched = queued(&c.take_changes());
    assert_eq!(
        patched[0].action,
        Action::Comment {
            issue: Some("OPS-7".into()),
            after: None
        }
    );
    assert!(patched[0].ready());

    // The hook gives up: kept as failed, audited.
    c.delivered(
        &hook,
        Attempt::GaveUp("gave up after 9 attempt(s)".into()),
        T0 + 7,
    );
    let ch = c.take_changes();
    let a = audit(&ch);
    assert!(
        a.iter()
            .any(|(_, action, detail)| action == "notification_failed"
                && detail.contains("failed to hook (post)")
                && detail.contains("gave up after 9")),
        "{a:?}"
    );
    assert!(c.pending_deliveries().iter().all(|d| d.id != hook));
    assert!(
        c.notifications()
            .iter()
            .any(|d| d.id == hook && d.failed_at_ms.is_some())
    );

    // A new version succeeds: the pager resolves the alert the failure opened and Jira
    // hears of it on OPS-7.
    push_routed(&mut c, "2.0", T0 + 10);
    for h in ["h1", "h2"] {
        heartbeat(&mut c, h, "prod", "2.0", "0.9", T0 + 10);
        let g = acquire(&mut c, h, "prod", "2.0", T0 + 11).unwrap();
        c.release(&g.lease.id, &ok(Outcome::Success), T0 + 12)
            .unwrap();
        heartbeat(&mut c, h, "prod", "2.0", "2.0", T0 + 13);
    }
    assert_eq!(state(&c, "prod", "2.0"), RolloutState::Success);
    let q3 = queued(&c.take_changes());
    let w = what(&q3);
    assert!(
        w.contains(&("pager".into(), "succeeded".into(), "resolve")),
        "{w:?}"
    );
    assert!(
        w.contains(&("jira".into(), "succeeded".into(), "comment")),
        "{w:?}"
    );
    assert!(c.incidents().is_empty());
    let resolve = q3.iter().find(|d| d.channel == "pager").unwrap();
    assert_eq!(
        resolve.action,
        Action::Resolve {
            dedup_key: crate::notify::dedup_key("prod", "hello", rollout(&c, "prod", "1.0").id)
        }
    );
    // A report for a delivery no longer known changes nothing.
    c.delivered("nope", Attempt::Delivered(None), T0 + 20);
    assert!(c.take_changes().is_empty());
}

#[test]
fn deliveries_and_incidents_survive_a_restart() {
    let mut c = routed();
    push_routed(&mut c, "1.0", T0);
    heartbeat(&mut c, "h1", "prod", "1.0", "0.9", T0);
    let g = acquire(&mut c, "h1", "prod", "1.0", T0 + 1).unwrap();
    c.release(&g.lease.id, &ok(Outcome::Failure), T0 + 2)
        .unwrap();
    let mut outbox = std::collections::BTreeMap::new();
    let mut incidents = std::collections::BTreeMap::new();
    for ch in c.take_changes() {
        match ch {
            Change::Outbox(d) => {
                outbox.insert(d.id.clone(), *d);
            }
            Change::OutboxGone(id) => {
                outbox.remove(&id);
            }
            Change::Incident(k, i) => match i {
                Some(i) => {
                    incidents.insert(k, *i);
                }
                None => {
                    incidents.remove(&k);
                }
            },
            _ => {}
        }
    }
    let snap = Snapshot {
        rollouts: c.rollouts.values().cloned().collect(),
        desired: c.desired.clone(),
        outbox: outbox.values().cloned().collect(),
        incidents: incidents.values().cloned().collect(),
        ..Snapshot::default()
    };
    let c2 = Core::new(snap, 30_000, 5_000, T0 + 100);
    assert_eq!(
        c2.pending_deliveries().len(),
        6,
        "started, 3 for the failure, 2 for the rollback (nothing to revert)"
    );
    assert_eq!(c2.incidents().len(), 2);
}

#[test]
fn the_outbox_is_bounded() {
    let mut c = routed();
    push_routed(&mut c, "1.0", T0);
    for i in 0..MAX_PENDING {
        let d = Delivery {
            id: format!("x{i}"),
            channel: "hook".into(),
            action: Action::Post,
            notice: crate::notify::Notice {
                event: Event::Started,
                rollout: 1,
                environment: "prod".into(),
                service: "hello".into(),
                version: "1.0".into(),
                commit: "c".into(),
                state: RolloutState::Running,
                hosts: vec![],
                host_count: 0,
                reason: None,
                approvers: None,
                at_ms: T0,
            },
            created_at_ms: T0,
            attempts: 0,
            next_at_ms: T0,
            last_error: None,
            failed_at_ms: None,
        };
        c.outbox.insert(d.id.clone(), d);
    }
    c.take_changes();
    push(&mut c, "prod", "1.1", &policy(1, 0), T0 + 1);
    let ch = c.take_changes();
    assert!(queued(&ch).is_empty(), "{:?}", what(&queued(&ch)));
    assert!(
        audit(&ch)
            .iter()
            .any(|(_, a, d)| a == "notification_dropped" && d.contains("started to hook")),
        "{:?}",
        audit(&ch)
    );
}
