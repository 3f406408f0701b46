//! The outbox: events of rollouts turned into deliveries (queued with the change that caused
//! them, in the same store transaction), and the sender's reports of them.

use std::collections::BTreeSet;

use super::{Change, Core};
use crate::notify::{self, Action, Attempt, Delivery, Event, Incident, Notice};
use crate::wire::RolloutState;

/// The most deliveries waiting at once: beyond, new ones are dropped (audited), so that a dead
/// receiver and a busy fleet cannot grow the store without bound.
pub const MAX_PENDING: usize = 10_000;
/// The given-up deliveries kept for `drover notifications` (the oldest are forgotten).
pub const MAX_FAILED: usize = 1_000;

impl Core {
    /// The event a transition is, if any.
    pub(super) fn event_of(from: RolloutState, to: RolloutState) -> Option<Event> {
        use RolloutState::*;
        match (from, to) {
            (_, ApprovalRequired) => Some(Event::ApprovalRequired),
            (Pending | Approved, Running) => Some(Event::Started),
            (_, Success) => Some(Event::Succeeded),
            (_, Failed) => Some(Event::Failed),
            (RollingBack, Aborted) => Some(Event::RolledBack),
            (_, Paused) => Some(Event::Paused),
            _ => None,
        }
    }

    /// Queues the deliveries of `event` of rollout `id` (`host`: the one it is about, if one).
    pub(super) fn notify(&mut self, id: u64, event: Event, host: Option<&str>, now: u64) {
        let Some(r) = self.rollouts.get(&id) else {
            return;
        };
        let routes = match self
            .desired
            .as_ref()
            .and_then(|d| d.environments.get(&r.environment))
        {
            Some(e) if !e.notify.is_empty() => e.notify.clone(),
            // A success may still resolve what a failure opened.
            _ if event == Event::Succeeded && !self.incidents.is_empty() => Vec::new(),
            _ => return,
        };
        let hosts: BTreeSet<&String> = match (host, event) {
            (Some(_), _) => BTreeSet::new(),
            (None, Event::Failed) => r.failed.iter().collect(),
            (None, Event::RolledBack) => r.reverted.iter().collect(),
            (None, Event::Succeeded) => r.succeeded.iter().chain(&r.verified).collect(),
            (None, Event::ApprovalRequired) => r.succeeded.iter().collect(),
            (None, _) => BTreeSet::new(),
        };
        let mut names: Vec<String> = hosts
            .iter()
            .take(notify::MAX_HOSTS)
            .map(|h| h.to_string())
            .collect();
        let host_count = if let Some(h) = host {
            names = vec![h.to_string()];
            1
        } else {
            hosts.len()
        };
        let notice = Notice {
            event,
            rollout: id,
            environment: r.environment.clone(),
            service: r.service.clone(),
            version: r.version.clone(),
            commit: r.commit.clone(),
            state: r.state,
            hosts: names,
            host_count,
            reason: match (event, host) {
                (Event::VerificationMedium, Some(h)) => r.verdicts.get(h).cloned(),
                _ => r.reason.clone(),
            },
            approvers: (event == Event::ApprovalRequired).then(|| r.approvers()),
            at_ms: now,
        };
        let subject = r.key();
        let mut counter = self.lease_counter;
        let plan = notify::plan(&notice, &routes, &self.channels, &self.incidents, || {
            counter += 1;
            format!("{:016x}{:08x}", rand::random::<u64>(), counter as u32)
        });
        self.lease_counter = counter;
        for c in &plan.unknown {
            tracing::warn!(channel = %c, rollout = %subject, "notify: a route names a channel coordinator.yaml does not define");
        }
        if !plan.unknown.is_empty() {
            self.audit(
                now,
                "coordinator",
                "notification_unrouted",
                &subject,
                format!(
                    "{event}: notify names channel(s) {} that coordinator.yaml's notifications do not define",
                    plan.unknown.join(", ")
                ),
            );
        }
        for i in plan.open {
            self.changes
                .push(Change::Incident(i.key(), Some(Box::new(i.clone()))));
            self.incidents.insert(i.key(), i);
        }
        for k in plan.close {
            self.incidents.remove(&k);
            self.changes.push(Change::Incident(k, None));
        }
        for (channel, action, id) in plan.send {
            if self.pending_count() >= MAX_PENDING {
                tracing::error!(%channel, rollout = %subject, "notification dropped: the outbox is full");
                self.audit(
                    now,
                    "coordinator",
                    "notification_dropped",
                    &subject,
                    format!(
                        "{event} to {channel}: {MAX_PENDING} notifications wait already (are the receivers down?)"
                    ),
                );
                continue;
            }
            let d = Delivery {
                id,
                channel,
                action,
                notice: notice.clone(),
                created_at_ms: now,
                attempts: 0,
                next_at_ms: now,
                last_error: None,
                failed_at_ms: None,
            };
            self.changes.push(Change::Outbox(Box::new(d.clone())));
            self.outbox.insert(d.id.clone(), d);
        }
    }

    fn pending_count(&self) -> usize {
        self.outbox
            .values()
            .filter(|d| d.failed_at_ms.is_none())
            .count()
    }

    /// The sender's report of an attempt at delivery `id`.
    pub fn delivered(&mut self, id: &str, attempt: Attempt, now: u64) {
        let Some(d) = self.outbox.get_mut(id) else {
            return;
        };
        match attempt {
            Attempt::Delivered(issue) => {
                self.stats_delivered += 1;
                let d = self.outbox.remove(id).expect("present");
                self.changes.push(Change::OutboxGone(d.id.clone()));
                if let (Action::CreateIssue, Some(key)) = (&d.action, issue) {
                    self.issue_created(&d, key);
                }
            }
            Attempt::Retry { error, at_ms } => {
                d.attempts += 1;
                d.next_at_ms = at_ms;
                d.last_error = Some(crate::auth::cap(&error, 512));
                self.changes.push(Change::Outbox(Box::new(d.clone())));
            }
            Attempt::GaveUp(error) => {
                self.stats_gave_up += 1;
                d.attempts += 1;
                d.failed_at_ms = Some(now);
                d.last_error = Some(crate::auth::cap(&error, 512));
                let d = d.clone();
                self.changes.push(Change::Outbox(Box::new(d.clone())));
                self.audit(
                    now,
                    "coordinator",
                    "notification_failed",
                    &d.notice.subject(),
                    format!(
                        "{} to {} ({}), delivery {}: {}",
                        d.notice.event,
                        d.channel,
                        d.action.name(),
                        d.id,
                        d.last_error.as_deref().unwrap_or("")
                    ),
                );
                self.forget_failed();
            }
        }
    }

    /// A Jira issue was created: its incident and the comments waiting for it learn its key.
    fn issue_created(&mut self, d: &Delivery, key: String) {
        for i in self.incidents.values_mut() {
            if i.created_by.as_deref() == Some(&d.id) {
                i.issue = Some(key.clone());
                self.changes
                    .push(Change::Incident(i.key(), Some(Box::new(i.clone()))));
            }
        }
        for w in self.outbox.values_mut() {
            if let Action::Comment { issue, after } = &mut w.action
                && issue.is_none()
                && after.as_deref() == Some(&d.id)
            {
                *issue = Some(key.clone());
                *after = None;
                self.changes.push(Change::Outbox(Box::new(w.clone())));
            }
        }
    }

    /// Forgets the oldest given-up deliveries beyond [`MAX_FAILED`].
    fn forget_failed(&mut self) {
        let mut failed: Vec<(u64, String)> = self
            .outbox
            .values()
            .filter_map(|d| d.failed_at_ms.map(|at| (at, d.id.clone())))
            .collect();
        if failed.len() <= MAX_FAILED {
            return;
        }
        failed.sort_unstable();
        for (_, id) in failed.iter().take(failed.len() - MAX_FAILED) {
            self.outbox.remove(id);
            self.changes.push(Change::OutboxGone(id.clone()));
        }
    }

    /// The deliveries the sender must make (at start).
    pub fn pending_deliveries(&self) -> Vec<Delivery> {
        self.outbox
            .values()
            .filter(|d| d.failed_at_ms.is_none())
            .cloned()
            .collect()
    }

    /// Every delivery waiting or given up, oldest first (`drover notifications`).
    pub fn notifications(&self) -> Vec<Delivery> {
        let mut v: Vec<Delivery> = self.outbox.values().cloned().collect();
        v.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        v
    }

    /// Open incidents (PagerDuty alerts, Jira issues), for `drover notifications`.
    pub fn incidents(&self) -> Vec<Incident> {
        self.incidents.values().cloned().collect()
    }

    /// (waiting, given up, delivered since start, given up since start), for metrics.
    pub fn notification_counts(&self) -> (usize, usize, u64, u64) {
        let waiting = self.pending_count();
        (
            waiting,
            self.outbox.len() - waiting,
            self.stats_delivered,
            self.stats_gave_up,
        )
    }
}
