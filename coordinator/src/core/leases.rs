//! Leases: a host asks before touching itself, renews while it deploys, and releases with the
//! outcome. At most `max_parallel` leases are held per (environment, service), whichever of
//! its rollouts they belong to.

use super::{ApiError, Change, Core, check_names, key, short};
use crate::auth::{Caller, cap};
use crate::wire::{
    AcquireRequest, Chart, Granted, Lease, MAX_POINTS, MAX_SERIES, MetricSeries, Outcome, Purpose,
    ReleaseRequest, Renewed, Risk, RolloutState, RolloutView, TrafficPoint,
};

/// Checks the samples a host sends with its verdict: bounded, named, finite. Pure.
pub fn check_series(metrics: &[MetricSeries]) -> Result<(), String> {
    if metrics.len() > MAX_SERIES {
        return Err(format!(
            "{} metrics; at most {MAX_SERIES} are charted",
            metrics.len()
        ));
    }
    for m in metrics {
        let name = cap(&m.name, 64);
        if m.name.is_empty() || m.name.chars().count() > 64 || m.name.chars().any(char::is_control)
        {
            return Err(format!(
                "metric name `{name}`: 1 to 64 characters, no control characters"
            ));
        }
        if !matches!(
            m.judgement.as_str(),
            "pass" | "marginal" | "fail" | "inconclusive"
        ) {
            return Err(format!(
                "metric `{name}`: judgement `{}` is not pass, marginal, fail or inconclusive",
                cap(&m.judgement, 16)
            ));
        }
        for (side, v) in [("samples", &m.samples), ("baseline", &m.baseline)] {
            if v.len() > MAX_POINTS {
                return Err(format!(
                    "metric `{name}`: {} {side}; at most {MAX_POINTS} (downsample)",
                    v.len()
                ));
            }
        }
        let numbers = m
            .samples
            .iter()
            .chain(&m.baseline)
            .chain(m.median.iter())
            .chain(m.baseline_median.iter())
            .chain(m.p_value.iter());
        if numbers.clone().any(|x| !x.is_finite()) {
            return Err(format!("metric `{name}`: a number is not finite"));
        }
        if m.p_value.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
            return Err(format!("metric `{name}`: p_value is not between 0 and 1"));
        }
    }
    Ok(())
}

impl Core {
    /// `POST /v1/leases`.
    pub fn acquire(
        &mut self,
        req: &AcquireRequest,
        who: &Caller,
        now: u64,
    ) -> Result<Granted, ApiError> {
        check_names(&[
            ("host", &req.host, 253),
            ("environment", &req.environment, 63),
            ("service", &req.service, 63),
            ("version", &req.version, 128),
            ("commit", &req.commit, 64),
        ])?;
        self.acting_as(who, &req.host, "acquire lease", now)?;
        let (env, service, version) = (&req.environment, &req.service, &req.version);
        let k = key(env, service, version);
        let Some(desired) = &self.desired else {
            self.host_read(&req.commit, now);
            return Err(ApiError::wait(
                "no_desired_state",
                2000,
                "the coordinator has not read the desired state from Git yet; nothing moves until it has",
            ));
        };
        let tip = desired.commit.clone();
        self.host_read(&req.commit, now);
        let id = match req.purpose {
            Purpose::Deploy => {
                let wanted = self.wanted(env, service);
                if wanted != Some(version.as_str()) {
                    let o = self.overrides.get(&(env.clone(), service.clone()));
                    return Err(match (o, wanted) {
                        (Some(o), _) if o.from == *version => ApiError::wait(
                            "rolled_back",
                            5000,
                            format!(
                                "{env}/{service} was {}: commit a change of its version to end the rollback",
                                o.note()
                            ),
                        ),
                        (_, Some(w)) => ApiError::wait(
                            "stale",
                            2000,
                            format!(
                                "{env}/{service}: Git asks for {w} (commit {}), this host for {version} (commit {}); the host fetches again",
                                short(&tip),
                                short(&req.commit)
                            ),
                        ),
                        (_, None) => ApiError::wait(
                            "stale",
                            5000,
                            format!(
                                "{env}/{service} is not in the desired state the coordinator follows (commit {})",
                                short(&tip)
                            ),
                        ),
                    });
                }
                let Some(id) = self.newest(env, service, Some(version)) else {
                    return Err(ApiError::wait(
                        "stale",
                        2000,
                        format!("{k} has no rollout yet"),
                    ));
                };
                let r = &self.rollouts[&id];
                if r.job
                    && let Some(busy) = self.job_taken(r, &req.host, &k)
                {
                    return Err(busy);
                }
                match r.state {
                    RolloutState::Running | RolloutState::Verifying | RolloutState::Success => {}
                    RolloutState::Pending | RolloutState::Approved => {
                        if let Some(why) = self.frozen_for(r, now) {
                            return Err(ApiError::wait("frozen", 5000, why));
                        }
                        let why = self
                            .held_back(r, now)
                            .unwrap_or_else(|| format!("{k} has not started yet"));
                        return Err(ApiError::wait("upstream_missing", 5000, why));
                    }
                    RolloutState::ApprovalRequired => {
                        let gate = if r.at_batch_gate() {
                            "after its first batch "
                        } else {
                            ""
                        };
                        return Err(ApiError::wait(
                            "approval_required",
                            2000,
                            format!(
                                "{k} waits for approval {gate}({}): drover approve {env} {service} {version}",
                                r.approvers()
                            ),
                        ));
                    }
                    RolloutState::Paused => {
                        return Err(ApiError::wait(
                            "paused",
                            2000,
                            format!(
                                "{k} is paused ({})",
                                r.reason.as_deref().unwrap_or("by an operator")
                            ),
                        ));
                    }
                    RolloutState::Failed | RolloutState::RollingBack => {
                        return Err(ApiError::rejected(
                            "failed",
                            format!(
                                "{k} failed at commit {} ({}); it will not be deployed unless a new commit asks for it again or an operator runs drover retry {env} {service}",
                                short(&r.commit),
                                r.reason.as_deref().unwrap_or("too many failures")
                            ),
                        ));
                    }
                    RolloutState::Aborted => {
                        let why = r.reason.clone().unwrap_or_else(|| "aborted".into());
                        let reason = if why.starts_with("superseded") {
                            "superseded"
                        } else {
                            "aborted"
                        };
                        return Err(ApiError::rejected(
                            reason,
                            format!(
                                "{k} was aborted at commit {} ({why}); it will not be deployed unless a new commit asks for it again or an operator runs drover retry {env} {service}",
                                short(&r.commit)
                            ),
                        ));
                    }
                }
                id
            }
            Purpose::Revert => {
                let Some(id) = self.newest(env, service, Some(version)) else {
                    return Err(ApiError::not_found(format!(
                        "no rollout {k} to revert from"
                    )));
                };
                let r = &self.rollouts[&id];
                if r.state != RolloutState::RollingBack {
                    return Err(ApiError::conflict(format!(
                        "{k} is {}, not rolling back",
                        r.state
                    )));
                }
                if !self.to_revert(r).contains(&req.host) {
                    return Err(ApiError::conflict(format!(
                        "host {} has nothing to revert in {k}",
                        req.host
                    )));
                }
                id
            }
        };
        // A retry from a host that already holds a lease on this rollout gets the same lease;
        // a lease it holds on another rollout of the service is of a deploy it gave up.
        let mut mine: Vec<Lease> = self
            .leases
            .values()
            .filter(|l| l.host == req.host && l.environment == *env && l.service == *service)
            .cloned()
            .collect();
        if let Some(pos) = mine.iter().position(|l| l.rollout == id) {
            let held = self.leases.get_mut(&mine[pos].id).expect("listed");
            held.expires_at_ms = now.saturating_add(self.lease_ttl_ms);
            let lease = held.clone();
            return Ok(Granted {
                lease,
                rollout: self.view_of(id, now),
            });
        }
        for old in mine.drain(..) {
            self.leases.remove(&old.id);
            self.changes.push(Change::LeaseGone(old.id.clone()));
            self.audit(
                now,
                &req.host,
                "lease_dropped",
                &key(&old.environment, &old.service, &old.version),
                format!("{} asks for {version} instead", req.host),
            );
        }
        let r = &self.rollouts[&id];
        // A job runs on one host.
        let max = if r.job {
            1
        } else {
            r.policy.max_parallel as usize
        };
        if r.gate_ahead() && r.succeeded.len() + self.leases_of(id) >= max {
            // The first batch is the first `max_parallel` hosts: no more start before the
            // approval after it.
            return Err(ApiError::wait(
                "first_batch",
                2000,
                format!(
                    "{k}: the first batch ({max} host(s)) must succeed and be approved before the rest start (approval.after_first_batch)"
                ),
            ));
        }
        if self.leases_of_service(env, service) >= max {
            return Err(ApiError::wait(
                "no_slot",
                300,
                format!("{k}: {max} host(s) already deploying (max_parallel {max})"),
            ));
        }
        self.lease_counter += 1;
        let lease_id = format!(
            "{:016x}{:08x}",
            rand::random::<u64>(),
            self.lease_counter as u32
        );
        let lease = Lease {
            id: lease_id,
            host: req.host.clone(),
            environment: env.clone(),
            service: service.clone(),
            version: version.clone(),
            purpose: req.purpose,
            ttl_ms: self.lease_ttl_ms,
            expires_at_ms: now.saturating_add(self.lease_ttl_ms),
            rollout: id,
            expired_at_ms: None,
        };
        self.leases.insert(lease.id.clone(), lease.clone());
        self.changes.push(Change::Lease(lease.clone()));
        let purpose = match req.purpose {
            Purpose::Deploy => "deploy",
            Purpose::Revert => "revert",
        };
        self.audit(
            now,
            &req.host,
            "lease_granted",
            &k,
            format!("{purpose} lease (rollout #{id}) by {}", who.name),
        );
        Ok(Granted {
            lease,
            rollout: self.view_of(id, now),
        })
    }

    /// `POST /v1/leases/{id}/renew`.
    pub fn renew(&mut self, id: &str, now: u64) -> Result<Renewed, ApiError> {
        match self.leases.get_mut(id) {
            Some(l) if l.expires_at_ms > now => {
                // Renewals are not written: a restart gives every lease a fresh TTL anyway.
                l.expires_at_ms = now.saturating_add(self.lease_ttl_ms);
                Ok(Renewed {
                    expires_at_ms: l.expires_at_ms,
                })
            }
            _ if self.expired.contains_key(id) => Err(ApiError::lease_lost(format!(
                "lease {id} expired unrenewed and its slot was given away; stop renewing it, and release it with the outcome when the deploy ends (the outcome still counts)"
            ))),
            _ => Err(ApiError::lease_lost(format!(
                "lease {id} is unknown, expired or already released"
            ))),
        }
    }

    /// `POST /v1/leases/{id}/release`.
    pub fn release(
        &mut self,
        id: &str,
        req: &ReleaseRequest,
        now: u64,
    ) -> Result<RolloutView, ApiError> {
        if let Some(v) = &req.verification {
            check_series(&v.metrics).map_err(|e| {
                ApiError::bad_request(format!(
                    "verification.metrics: {e}; nothing was changed (send the release again without `metrics`)"
                ))
            })?;
        }
        let (lease, late) = match self.leases.remove(id) {
            Some(l) => (l, false),
            // The lease expired while its host was still deploying: its slot was given away,
            // but the outcome is the host's and still counts (max_failures included).
            None => match self.expired.remove(id) {
                Some(l) => (l, true),
                None => {
                    return Err(ApiError::lease_lost(format!(
                        "lease {id} is unknown or already released; nothing was changed"
                    )));
                }
            },
        };
        self.changes.push(Change::LeaseGone(id.into()));
        let k = key(&lease.environment, &lease.service, &lease.version);
        let outcome = match req.outcome {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        };
        self.audit(
            now,
            &lease.host,
            "lease_released",
            &k,
            format!(
                "{outcome}{}{}",
                if late {
                    " (after its lease expired)"
                } else {
                    ""
                },
                match &req.message {
                    Some(m) => format!(": {}", cap(m, 1024)),
                    None => String::new(),
                }
            ),
        );
        let rid = lease.rollout;
        let Some(r) = self.rollouts.get_mut(&rid) else {
            return Err(ApiError::not_found(format!("rollout {k} is gone")));
        };
        match (lease.purpose, req.outcome) {
            (Purpose::Deploy, Outcome::Success) => {
                r.succeeded.insert(lease.host.clone());
                r.failed.remove(&lease.host);
            }
            (Purpose::Deploy, Outcome::Failure) => {
                r.failed.insert(lease.host.clone());
            }
            (Purpose::Revert, Outcome::Success) => {
                r.reverted.insert(lease.host.clone());
            }
            (Purpose::Revert, Outcome::Failure) => {}
        }
        r.updated_at_ms = now;
        if let Some(v) = &req.verification {
            r.verdicts.insert(
                lease.host.clone(),
                format!("{}: {}", v.risk, cap(&v.summary, 1024)),
            );
            if !v.metrics.is_empty() {
                r.charts.retain(|c| c.host != lease.host);
                r.charts.push(Chart {
                    host: lease.host.clone(),
                    at_ms: now,
                    risk: v.risk,
                    metrics: v.metrics.clone(),
                });
                if r.charts.len() > super::MAX_CHARTS {
                    r.charts.remove(0);
                }
            }
        }
        let (state, failures, max) = (r.state, r.failed.len() as u32, r.policy.max_failures);
        self.save(rid);
        if let Some(v) = &req.verification {
            self.audit(
                now,
                &lease.host,
                "verification",
                &k,
                format!("risk {}: {}", v.risk, cap(&v.summary, 1024)),
            );
            if v.risk == crate::wire::Risk::Medium {
                self.notify(
                    rid,
                    crate::notify::Event::VerificationMedium,
                    Some(&lease.host),
                    now,
                );
            }
        }
        let job = self.rollouts[&rid].job;
        match (lease.purpose, req.outcome) {
            (Purpose::Deploy, outcome)
                if job && matches!(state, RolloutState::Running | RolloutState::Verifying) =>
            {
                // A job ends with its one host's outcome; nothing is reverted (a command
                // that ran cannot be undone by running an older one).
                if outcome == Outcome::Success {
                    self.set_state(rid, RolloutState::Verifying, None, "coordinator", now);
                    let why = format!("the job ran on {}", lease.host);
                    self.set_state(rid, RolloutState::Success, Some(why), "coordinator", now);
                } else {
                    let why = format!(
                        "the job failed on {}: {}; drover retry {} {} runs it again",
                        lease.host,
                        cap(req.message.as_deref().unwrap_or("no message"), 256),
                        lease.environment,
                        lease.service
                    );
                    self.set_state(rid, RolloutState::Failed, Some(why), "coordinator", now);
                }
            }
            (Purpose::Deploy, Outcome::Failure) if failures > max => {
                if matches!(state, RolloutState::Running | RolloutState::Verifying) {
                    self.fail(
                        rid,
                        format!(
                            "{failures} host(s) failed (max_failures {max}); last: {} ({})",
                            lease.host,
                            cap(req.message.as_deref().unwrap_or("no message"), 256)
                        ),
                        now,
                    );
                }
            }
            (Purpose::Deploy, Outcome::Success)
                if req
                    .verification
                    .as_ref()
                    .is_some_and(|v| v.risk == Risk::Medium)
                    && matches!(state, RolloutState::Running | RolloutState::Verifying)
                    && self.newest(&lease.environment, &lease.service, None) == Some(rid) =>
            {
                // The host kept the version but its metrics were not conclusive: a human
                // decides (`drover resume` or `drover abort`). A superseded rollout is not
                // paused: nobody could resume it, and Git has moved on anyway.
                self.set_state(
                    rid,
                    RolloutState::Paused,
                    Some(format!(
                        "verification on {} was not conclusive (medium risk); resume or abort",
                        lease.host
                    )),
                    "coordinator",
                    now,
                );
            }
            (Purpose::Revert, Outcome::Failure) if state == RolloutState::RollingBack => {
                self.set_state(
                    rid,
                    RolloutState::Failed,
                    Some(format!(
                        "revert failed on {}: {}; an operator is needed",
                        lease.host,
                        cap(req.message.as_deref().unwrap_or("no message"), 256)
                    )),
                    "coordinator",
                    now,
                );
            }
            _ => {}
        }
        self.progress(rid, now);
        Ok(self.view_of(rid, now))
    }

    /// Why `host` may not run job rollout `r` now: it ran (`422 rejected`, reason `done`), or
    /// another host runs it, or one whose lease expired may still (`409 wait`, `job_running`).
    fn job_taken(&self, r: &super::Rollout, host: &str, k: &str) -> Option<ApiError> {
        if r.state == RolloutState::Success {
            let by: Vec<&str> = r.succeeded.iter().map(String::as_str).collect();
            return Some(ApiError::rejected(
                "done",
                format!(
                    "{k} ran on {} (kind: job): it runs once per version, so nothing is left to do here",
                    by.join(", ")
                ),
            ));
        }
        let held = self
            .leases
            .values()
            .find(|l| l.rollout == r.id && l.host != host);
        let lost = self.expired.values().find(|l| l.rollout == r.id);
        let (l, note) = match (held, lost) {
            (Some(l), _) => (l, ""),
            (None, Some(l)) => (
                l,
                "; its lease expired unrenewed and its outcome is awaited: if that host is gone, drover abort, then drover retry runs it on another host",
            ),
            (None, None) => return None,
        };
        Some(ApiError::wait(
            "job_running",
            5000,
            format!("{k} runs on {} (kind: job: one host runs it){note}", l.host),
        ))
    }

    /// RUNNING/VERIFYING → FAILED → ROLLING_BACK; or, for a superseded rollout (one still
    /// VERIFYING when a newer commit came), FAILED → ABORTED: its hosts follow the newer
    /// rollout, and reverting them would fight it (nor could they take a revert lease: lease
    /// requests name a version, and its newest rollout is another).
    pub(super) fn fail(&mut self, id: u64, why: String, now: u64) {
        self.set_state(id, RolloutState::Failed, Some(why), "coordinator", now);
        let r = &self.rollouts[&id];
        if self.newest(&r.environment, &r.service, None) != Some(id) {
            self.set_state(
                id,
                RolloutState::Aborted,
                Some(format!(
                    "{}; superseded, so its hosts follow the newer rollout instead of reverting",
                    r.reason.as_deref().unwrap_or("failed")
                )),
                "coordinator",
                now,
            );
            return;
        }
        self.set_state(id, RolloutState::RollingBack, None, "coordinator", now);
        self.progress(id, now);
    }
}

impl Core {
    /// `POST /v1/leases/{id}/traffic`: the holder of lease `id` (an ECS agent) set the new
    /// side's weight to `percent`. Kept with the rollout for the dashboard; a repeat of the
    /// holder's last weight is not kept twice.
    pub fn traffic(&mut self, id: &str, percent: u8, now: u64) -> Result<RolloutView, ApiError> {
        if percent > 100 {
            return Err(ApiError::bad_request(format!(
                "percent: {percent} is not a weight from 0 to 100"
            )));
        }
        let Some(lease) = self.lease_or_expired(id) else {
            return Err(ApiError::lease_lost(format!(
                "lease {id} is unknown or already released"
            )));
        };
        let (rid, host) = (lease.rollout, lease.host.clone());
        let Some(r) = self.rollouts.get_mut(&rid) else {
            return Err(ApiError::lease_lost(format!(
                "the rollout of lease {id} is gone"
            )));
        };
        let repeat = r
            .traffic
            .iter()
            .rev()
            .find(|p| p.host == host)
            .is_some_and(|p| p.percent == percent);
        if !repeat {
            r.traffic.push(TrafficPoint {
                at_ms: now,
                host,
                percent,
            });
            if r.traffic.len() > super::MAX_TRAFFIC {
                r.traffic.remove(0);
            }
            self.save(rid);
        }
        Ok(self.view_of(rid, now))
    }
}

/// The longest step name a lease holder may give a gate (`10%`, `step 3 at 25%`).
const MAX_STEP: usize = 32;

impl Core {
    /// `POST /v1/leases/{id}/gate`: the holder of lease `id` has reached `step` (an ECS traffic
    /// step with `approval: true`; traffic stays where it is) and asks whether to go on. `Ok`:
    /// go on (approved, or a rollback, which never waits); `409 wait`: not yet — the first
    /// call moves the rollout RUNNING → APPROVAL_REQUIRED with the environment's approvers
    /// and approval timeout; `422 rejected`: the rollout failed (rejected, timed out) or was
    /// stopped, so the holder puts traffic back.
    pub fn step_gate(&mut self, id: &str, step: &str, now: u64) -> Result<RolloutView, ApiError> {
        if step.is_empty()
            || step.len() > MAX_STEP
            || !step.chars().all(|c| c.is_ascii_graphic() || c == ' ')
        {
            return Err(ApiError::bad_request(format!(
                "step: 1 to {MAX_STEP} printable ASCII characters (e.g. \"10%\")"
            )));
        }
        let Some(lease) = self.lease_or_expired(id) else {
            return Err(ApiError::lease_lost(format!(
                "lease {id} is unknown or already released"
            )));
        };
        let rid = lease.rollout;
        let revert = lease.purpose == Purpose::Revert;
        let Some(r) = self.rollouts.get(&rid) else {
            return Err(ApiError::lease_lost(format!(
                "the rollout of lease {id} is gone"
            )));
        };
        let k = r.key();
        // A rollback (or a revert) is never held by a person.
        if revert || r.kind != crate::wire::RolloutKind::Deploy {
            return Ok(self.view_of(rid, now));
        }
        if let Some(d) = r.step_decisions.get(step) {
            return if d.approved {
                Ok(self.view_of(rid, now))
            } else {
                Err(ApiError::rejected(
                    "rejected",
                    format!("{k} was rejected at {step} by {}: put traffic back", d.by),
                ))
            };
        }
        let ask = |r: &super::Rollout| {
            ApiError::wait(
                "approval_required",
                2000,
                format!(
                    "{k} waits at {step} for an approval ({}): drover approve {} {} {}",
                    r.approvers(),
                    r.environment,
                    r.service,
                    r.version
                ),
            )
        };
        match r.state {
            RolloutState::Running => {
                let why = format!(
                    "waiting at {step} (ecs steps: approval): approve to go on, or reject to put traffic back ({})",
                    r.approvers()
                );
                let e = ask(r);
                let deadline = now.saturating_add(r.policy.approval_timeout_ms);
                let r = self.rollouts.get_mut(&rid).expect("exists");
                r.step_gate = Some(step.to_string());
                r.approval_deadline_ms = Some(deadline);
                self.set_state(
                    rid,
                    RolloutState::ApprovalRequired,
                    Some(why),
                    "coordinator",
                    now,
                );
                Err(e)
            }
            RolloutState::ApprovalRequired => Err(ask(r)),
            RolloutState::Verifying | RolloutState::Success => Ok(self.view_of(rid, now)),
            RolloutState::Paused => Err(ApiError::wait(
                "paused",
                2000,
                format!(
                    "{k} is paused ({}): traffic stays where it is",
                    r.reason.as_deref().unwrap_or("by an operator")
                ),
            )),
            s => Err(ApiError::rejected(
                "failed",
                format!(
                    "{k} is {s}{}: put traffic back",
                    r.reason
                        .as_deref()
                        .map(|w| format!(" ({w})"))
                        .unwrap_or_default()
                ),
            )),
        }
    }
}
