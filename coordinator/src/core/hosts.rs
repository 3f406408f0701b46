//! Hosts: heartbeats, what the coordinator asks of each host in return, and how the hosts'
//! reports move a rollout on (RUNNING → VERIFYING → SUCCESS, ROLLING_BACK → ABORTED).

use std::collections::BTreeSet;

use super::{
    ApiError, Change, Core, Host, Rollout, WAIT_SHOWN_AFTER, check_names, short, valid_name,
};
use crate::auth::{Caller, cap};
use crate::wire::{Action, ActionKind, Heartbeat, HeartbeatReply, RolloutState, ServiceReport};

/// Where the hosts of a VERIFYING rollout stand.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    /// Reported it running healthy.
    pub verified: usize,
    /// Not heard from for 3 heartbeat intervals.
    pub stale: Vec<String>,
    /// Now desire another version (or, for a superseded rollout, run another one).
    pub moved_on: Vec<String>,
    /// Still to report it running healthy.
    pub pending: Vec<String>,
}

/// Most services one heartbeat may report.
pub const MAX_SERVICES: usize = 256;
/// Most labels one heartbeat may carry.
pub const MAX_LABELS: usize = 64;

/// A heartbeat as a host record, every field checked and bounded: what one host can make the
/// coordinator store is a few tens of kilobytes at most.
fn bounded(hb: &Heartbeat, now: u64) -> Result<Host, ApiError> {
    check_names(&[("environment", &hb.environment, 63)])?;
    if hb.services.len() > MAX_SERVICES {
        return Err(ApiError::bad_request(format!(
            "heartbeat reports {} services; at most {MAX_SERVICES}",
            hb.services.len()
        )));
    }
    if hb.labels.len() > MAX_LABELS {
        return Err(ApiError::bad_request(format!(
            "heartbeat has {} labels; at most {MAX_LABELS}",
            hb.labels.len()
        )));
    }
    for (k, v) in &hb.labels {
        if k.is_empty()
            || k.len() > 63
            || v.len() > 253
            || (k.chars().chain(v.chars())).any(char::is_control)
        {
            return Err(ApiError::bad_request(format!(
                "label `{}`: names are 1 to 63 bytes, values at most 253, no control characters",
                cap(k, 63)
            )));
        }
    }
    if let Some(c) = &hb.commit {
        check_names(&[("commit", c, 64)])?;
    }
    let mut seen = BTreeSet::new();
    let mut services = Vec::with_capacity(hb.services.len());
    for s in &hb.services {
        check_names(&[("service", &s.service, 63)])?;
        if !seen.insert(s.service.as_str()) {
            return Err(ApiError::bad_request(format!(
                "service {} is reported twice",
                s.service
            )));
        }
        for v in [&s.desired, &s.actual, &s.failed].into_iter().flatten() {
            check_names(&[("version", v, 128)])?;
        }
        services.push(ServiceReport {
            phase: s.phase.as_deref().map(|p| cap(p, 64)),
            last_error: s.last_error.as_deref().map(|e| cap(e, 512)),
            ..s.clone()
        });
    }
    Ok(Host {
        environment: hb.environment.clone(),
        labels: hb.labels.clone(),
        agent_version: hb.agent_version.as_deref().map(|v| cap(v, 64)),
        services,
        commit: hb.commit.clone(),
        last_seen_ms: now,
    })
}

impl Core {
    /// `POST /v1/hosts/{host}/heartbeat`.
    pub fn heartbeat(
        &mut self,
        host: &str,
        hb: &Heartbeat,
        who: &Caller,
        now: u64,
    ) -> Result<HeartbeatReply, ApiError> {
        if !valid_name(host, 253) {
            return Err(ApiError::bad_request(format!(
                "invalid host name `{}`",
                host.chars().take(80).collect::<String>()
            )));
        }
        self.acting_as(who, host, &format!("heartbeat {host}"), now)?;
        let rec = bounded(hb, now)?;
        if !self.hosts.contains_key(host) && self.hosts.len() >= self.max_hosts {
            return Err(ApiError::conflict(format!(
                "the coordinator already tracks {} hosts (limits.max_hosts); host {host} is not added",
                self.hosts.len()
            )));
        }
        if let Some(commit) = &hb.commit {
            self.host_read(commit, now);
        }
        // Only a change of content is written, and only a change can move a rollout on; the
        // time of the last heartbeat stays in memory. Steady heartbeats are cheap.
        let prev = self.hosts.insert(host.to_string(), rec.clone());
        let mut touched: Vec<&str> = rec.services.iter().map(|s| s.service.as_str()).collect();
        let changed = match &prev {
            None => true,
            Some(p) => {
                touched.extend(p.services.iter().map(|s| s.service.as_str()));
                Host {
                    last_seen_ms: now,
                    ..p.clone()
                } != rec
            }
        };
        if changed {
            self.changes
                .push(Change::Host(host.to_string(), rec.clone()));
        }
        let open: Vec<u64> = self
            .rollouts
            .values()
            .filter(|r| {
                r.environment == hb.environment
                    && !r.state.is_terminal()
                    && touched.contains(&r.service.as_str())
            })
            .map(|r| r.id)
            .collect();
        let mut actions = Vec::new();
        for id in open {
            let moved = self.verify_report(id, host, &rec, now);
            if changed || moved {
                self.progress(id, now);
            }
            let r = &self.rollouts[&id];
            if r.state == RolloutState::RollingBack && self.to_revert(r).iter().any(|h| h == host) {
                actions.push(Action {
                    service: r.service.clone(),
                    action: ActionKind::Revert,
                    version: r.version.clone(),
                    reason: format!(
                        "rollout {} failed: {}",
                        r.key(),
                        r.reason.as_deref().unwrap_or("too many failures")
                    ),
                    commit: None,
                });
            }
        }
        for s in &rec.services {
            actions.extend(self.asks(&hb.environment, host, s));
        }
        Ok(HeartbeatReply {
            interval_ms: self.heartbeat_ms,
            actions,
        })
    }

    /// What the coordinator asks of `host` for one of its services.
    fn asks(&self, env: &str, host: &str, s: &ServiceReport) -> Vec<Action> {
        let mut out = Vec::new();
        let pair = (env.to_string(), s.service.clone());
        if let Some(o) = self.overrides.get(&pair) {
            out.push(Action {
                service: s.service.clone(),
                action: ActionKind::Pin,
                version: o.to.clone(),
                reason: o.note(),
                commit: Some(o.commit.clone()),
            });
        } else if let (Some(have), Some(want), Some(d)) = (
            s.desired.as_deref(),
            self.wanted(env, &s.service),
            &self.desired,
        ) && have != want
        {
            out.push(Action {
                service: s.service.clone(),
                action: ActionKind::Fetch,
                version: want.to_string(),
                reason: format!(
                    "Git asks for {want} (commit {}); this host still reads {have}",
                    short(&d.commit)
                ),
                commit: Some(d.commit.clone()),
            });
        }
        // A version the host gave up (failed, or refused earlier) that a rollout now asks for
        // again (a new commit, or `drover retry`): the host forgets the failure.
        if let Some(failed) = s.failed.as_deref()
            && self.wanted(env, &s.service) == Some(failed)
            && let Some(id) = self.newest(env, &s.service, Some(failed))
        {
            let r = &self.rollouts[&id];
            let open = !matches!(
                r.state,
                RolloutState::Failed | RolloutState::RollingBack | RolloutState::Aborted
            );
            if open && !r.failed.contains(host) {
                out.push(Action {
                    service: s.service.clone(),
                    action: ActionKind::Retry,
                    version: failed.to_string(),
                    reason: format!("rollout #{} ({}) asks for {failed} again", r.id, r.trigger),
                    commit: None,
                });
            }
        }
        out
    }

    /// Takes what `host` reports of rollout `id`'s version: running healthy (verified, also
    /// while the rollout is paused) or, while VERIFYING, unhealthy (a failure). Only a host holding no lease on the rollout counts:
    /// its report is then of a finished deploy. Returns whether the rollout changed.
    fn verify_report(&mut self, id: u64, host: &str, rec: &Host, now: u64) -> bool {
        let holds = self
            .leases
            .values()
            .any(|l| l.rollout == id && l.host == host);
        let r = &self.rollouts[&id];
        let watched = matches!(
            r.state,
            RolloutState::Running | RolloutState::Verifying | RolloutState::Paused
        );
        if holds || !watched {
            return false;
        }
        let Some(s) = rec.report(&r.service) else {
            return false;
        };
        if s.actual.as_deref() != Some(r.version.as_str()) || s.phase.is_some() {
            return false;
        }
        let subject = r.key();
        if s.healthy {
            if r.verified.contains(host) {
                return false;
            }
            let r = self.rollouts.get_mut(&id).expect("exists");
            r.verified.insert(host.to_string());
            r.updated_at_ms = now;
            self.audit(
                now,
                host,
                "verified",
                &subject,
                format!("{host} runs it healthy"),
            );
            self.save(id);
            return true;
        }
        if r.state != RolloutState::Verifying || r.failed.contains(host) {
            return false;
        }
        let r = self.rollouts.get_mut(&id).expect("exists");
        r.failed.insert(host.to_string());
        r.verified.remove(host);
        r.updated_at_ms = now;
        let (failures, max) = (r.failed.len() as u32, r.policy.max_failures);
        let why = s.last_error.clone().unwrap_or_else(|| "not running".into());
        self.audit(
            now,
            host,
            "unhealthy",
            &subject,
            format!("{host} reports it unhealthy while verifying: {why}"),
        );
        self.save(id);
        if failures > max {
            self.fail(
                id,
                format!(
                    "{failures} host(s) failed (max_failures {max}); last: {host} reported it unhealthy ({why})"
                ),
                now,
            );
        }
        true
    }

    /// The live hosts of `r`'s environment that run its service, whatever version their
    /// desired state names: a host that has not fetched the promoting commit yet still has to
    /// take the version, so the rollout is not over without it (and its failure still counts).
    fn targets(&self, r: &Rollout, now: u64) -> Vec<(&String, &ServiceReport)> {
        self.hosts
            .iter()
            .filter(|(_, h)| h.environment == r.environment && !self.is_stale(h, now))
            .filter_map(|(name, h)| {
                h.report(&r.service)
                    .filter(|s| s.desired.is_some())
                    .map(|s| (name, s))
            })
            .collect()
    }

    /// Hosts that deployed `r`'s version and still have to revert from it.
    pub(super) fn to_revert(&self, r: &Rollout) -> Vec<String> {
        r.succeeded
            .iter()
            .filter(|h| !r.reverted.contains(*h))
            .filter(|h| {
                // A host whose report shows another version has left it already.
                self.hosts.get(*h).is_none_or(|host| {
                    host.report(&r.service)
                        .is_none_or(|s| s.actual.as_deref() == Some(r.version.as_str()))
                })
            })
            .cloned()
            .collect()
    }

    /// Where the hosts that took `r`'s version (by a lease, or running it already) stand.
    pub fn verification(&self, r: &Rollout, now: u64) -> Verification {
        let mut expected: BTreeSet<&String> = r.succeeded.difference(&r.failed).collect();
        expected.extend(r.verified.iter());
        for (h, s) in self.targets(r, now) {
            if s.actual.as_deref() == Some(r.version.as_str()) && !r.failed.contains(h) {
                expected.insert(h);
            }
        }
        // A superseded rollout's host that now runs another version, and is not deploying,
        // has left it too, even if Git asks for its version again: that is the newer
        // rollout's to deploy and count.
        let superseded = self.newest(&r.environment, &r.service, None) != Some(r.id);
        let mut v = Verification::default();
        for h in expected {
            let host = self.hosts.get(h);
            let report = host.and_then(|x| x.report(&r.service));
            let left = report.is_some_and(|s| {
                s.desired.as_deref().is_some_and(|d| d != r.version)
                    || (superseded
                        && s.phase.is_none()
                        && s.actual.as_deref().is_some_and(|a| a != r.version))
            });
            if r.verified.contains(h) {
                v.verified += 1;
            } else if host.is_none_or(|x| self.is_stale(x, now)) {
                v.stale.push(h.clone());
            } else if left {
                v.moved_on.push(h.clone());
            } else {
                v.pending.push(h.clone());
            }
        }
        v
    }

    /// Moves `id` on when its hosts are done: RUNNING → VERIFYING → SUCCESS, ROLLING_BACK →
    /// ABORTED.
    pub(super) fn progress(&mut self, id: u64, now: u64) {
        let Some(r) = self.rollouts.get(&id) else {
            return;
        };
        if r.job {
            // A job moves on with its host's release only (`release`).
            return;
        }
        let held = self.leases_of(id);
        match r.state {
            RolloutState::Running => {
                let targets = self.targets(r, now);
                // Done when every live host runs it, or tried and failed within
                // `max_failures` (a failed host keeps its old version until the next one).
                let done = !targets.is_empty()
                    && targets.iter().all(|(h, s)| {
                        r.succeeded.contains(*h)
                            || r.failed.contains(*h)
                            || s.actual.as_deref() == Some(r.version.as_str())
                    });
                if done && held == 0 {
                    self.set_state(id, RolloutState::Verifying, None, "coordinator", now);
                    self.progress(id, now);
                } else if held == 0
                    && r.gate_ahead()
                    && r.succeeded.len() >= r.policy.max_parallel as usize
                {
                    // The first batch succeeded and hosts remain: a person says go on.
                    let batch: Vec<&str> = r.succeeded.iter().map(String::as_str).collect();
                    let why = format!(
                        "its first batch ({}) succeeded: approve to go on with the rest ({}), or reject to roll it back",
                        batch.join(", "),
                        r.approvers()
                    );
                    let deadline = now.saturating_add(r.policy.approval_timeout_ms);
                    self.rollouts
                        .get_mut(&id)
                        .expect("exists")
                        .approval_deadline_ms = Some(deadline);
                    self.set_state(
                        id,
                        RolloutState::ApprovalRequired,
                        Some(why),
                        "coordinator",
                        now,
                    );
                }
            }
            RolloutState::Verifying => {
                // SUCCESS only once every host that took it has reported it running healthy
                // (after its lease was released), or has gone stale or moved on: each counted.
                let v = self.verification(r, now);
                let newest = self.newest(&r.environment, &r.service, None) == Some(id);
                if v.pending.is_empty() && v.verified == 0 && !newest {
                    // Superseded, and every host moved on (or went stale) before reporting it.
                    self.set_state(
                        id,
                        RolloutState::Aborted,
                        Some(format!(
                            "superseded before any host reported it healthy ({} moved on, {} stale)",
                            v.moved_on.len(),
                            v.stale.len()
                        )),
                        "coordinator",
                        now,
                    );
                    return;
                }
                if v.pending.is_empty() && v.verified > 0 && held == 0 {
                    let mut msg = format!("{} host(s) run it healthy", v.verified);
                    if !v.stale.is_empty() {
                        msg.push_str(&format!(
                            ", {} stale ({})",
                            v.stale.len(),
                            v.stale.join(", ")
                        ));
                    }
                    if !v.moved_on.is_empty() {
                        msg.push_str(&format!(
                            ", {} moved on to another version ({})",
                            v.moved_on.len(),
                            v.moved_on.join(", ")
                        ));
                    }
                    self.set_state(id, RolloutState::Success, Some(msg), "coordinator", now);
                }
            }
            RolloutState::RollingBack if self.to_revert(r).is_empty() && held == 0 => {
                self.set_state(
                    id,
                    RolloutState::Aborted,
                    Some("rolled back".into()),
                    "coordinator",
                    now,
                );
            }
            _ => {}
        }
    }

    /// What an unfinished rollout waits for: at once for one that has not started (or waits for
    /// an approval), once it has waited a few heartbeat intervals for one that runs.
    pub(super) fn waiting_for(&self, r: &Rollout, now: u64) -> Option<String> {
        let waited = now.saturating_sub(r.updated_at_ms);
        // What a rollout that has not started waits for is known at once; what one waits
        // for from its hosts is shown once they are slow.
        let gated = matches!(
            r.state,
            RolloutState::Pending | RolloutState::ApprovalRequired
        );
        if !gated && waited < self.heartbeat_ms.saturating_mul(WAIT_SHOWN_AFTER) {
            return None;
        }
        let secs = waited / 1000;
        if r.job && r.state == RolloutState::Running {
            let on = self
                .leases
                .values()
                .chain(self.expired.values())
                .find(|l| l.rollout == r.id);
            return Some(match on {
                Some(l) => format!("{} to finish the job, for {secs}s", l.host),
                None => format!("a host of {} to run the job, for {secs}s", r.environment),
            });
        }
        match r.state {
            RolloutState::Verifying => {
                let v = self.verification(r, now);
                Some(if v.pending.is_empty() {
                    format!(
                        "a host to report {} running healthy ({} verified, {} stale, {} moved on), for {secs}s",
                        r.version,
                        v.verified,
                        v.stale.len(),
                        v.moved_on.len()
                    )
                } else {
                    format!(
                        "hosts {} to report {} running healthy ({} verified), for {secs}s",
                        v.pending.join(", "),
                        r.version,
                        v.verified
                    )
                })
            }
            RolloutState::Running => {
                let missing: Vec<String> = self
                    .targets(r, now)
                    .into_iter()
                    .filter(|(h, s)| {
                        !r.succeeded.contains(*h)
                            && !r.failed.contains(*h)
                            && s.actual.as_deref() != Some(r.version.as_str())
                    })
                    .map(|(h, s)| match s.desired.as_deref() {
                        Some(d) if d != r.version => format!("{h} (still reads {d})"),
                        _ => h.clone(),
                    })
                    .collect();
                Some(if missing.is_empty() {
                    if self.targets(r, now).is_empty() {
                        format!(
                            "no live host of {} runs {} yet, for {secs}s",
                            r.environment, r.service
                        )
                    } else {
                        format!("leases still held, for {secs}s")
                    }
                } else {
                    format!("hosts {} to deploy it, for {secs}s", missing.join(", "))
                })
            }
            RolloutState::Pending => self.held_back(r, now),
            RolloutState::ApprovalRequired => Some(format!(
                "an approval{} ({}): drover approve {} {} {}",
                match &r.step_gate {
                    Some(s) => format!(" at {s}"),
                    None if r.at_batch_gate() => " after its first batch".into(),
                    None => String::new(),
                },
                r.approvers(),
                r.environment,
                r.service,
                r.version
            )),
            RolloutState::RollingBack => {
                let left = self.to_revert(r);
                Some(format!("hosts {} to revert, for {secs}s", left.join(", ")))
            }
            _ => None,
        }
        .map(|w| w.chars().take(1024).collect())
    }
}
