//! Following Git: each new commit continues, supersedes or creates the rollouts of every
//! (environment, service); a return to a version that succeeded before is a rollback; and
//! people may start a rollout again (`retry`) or roll a service back ahead of Git
//! (`rollback`, an override until Git changes the service's version).

use std::collections::{BTreeMap, BTreeSet};

use drover_desired::freeze;

use super::{
    ApiError, Change, Core, Desired, EnvDesired, Override, Refused, Rollout, check_names, key,
    short,
};
use crate::auth::Caller;
use crate::wire::{RolloutKind, RolloutState, RolloutView};

/// How much of a refused commit's problems the audit keeps.
const MAX_AUDIT_PROBLEMS: usize = 4096;

impl Core {
    /// A new valid commit of the branch: every (environment, service) follows it.
    pub fn apply_desired(&mut self, d: Desired, now: u64) {
        self.tip = Some(d.commit.clone());
        self.saw(&d.commit);
        self.git_error = None;
        if self.refused.take().is_some() {
            self.changes.push(Change::Refused(None));
        }
        if self
            .desired
            .as_ref()
            .is_some_and(|old| old.commit == d.commit)
        {
            return;
        }
        tracing::info!(commit = %d.commit, "new desired state");
        self.audit(
            now,
            "coordinator",
            "desired_state",
            short(&d.commit),
            format!(
                "commit {} ({} environment(s))",
                d.commit,
                d.environments.len()
            ),
        );
        for (env, e) in &d.environments {
            for (service, version) in &e.services {
                self.follow(env, service, version, e, &d, now);
            }
        }
        // Services no longer pinned in their environment: nothing is rolled out for them.
        let gone: BTreeSet<(String, String)> = self
            .rollouts
            .values()
            .filter(|r| !r.state.is_terminal() && d.version(&r.environment, &r.service).is_none())
            .map(|r| (r.environment.clone(), r.service.clone()))
            .chain(
                self.overrides
                    .keys()
                    .filter(|(e, s)| d.version(e, s).is_none())
                    .cloned(),
            )
            .collect();
        for (env, service) in gone {
            self.end_override(&env, &service, "the service is no longer pinned", now);
            self.supersede(
                &env,
                &service,
                &format!(
                    "{env}/{service} is no longer in the desired state (commit {})",
                    short(&d.commit)
                ),
                now,
            );
        }
        self.changes.push(Change::Desired(Box::new(d.clone())));
        self.desired = Some(d);
        self.advance_pending(now);
    }

    /// The branch tip does not validate: nothing moves, and status and the audit say why.
    pub fn refuse(&mut self, r: Refused, now: u64) {
        self.tip = Some(r.commit.clone());
        self.saw(&r.commit);
        self.git_error = None;
        if self
            .refused
            .as_ref()
            .is_some_and(|old| old.commit == r.commit)
        {
            return;
        }
        tracing::error!(commit = %r.commit, problems = r.problems.len(), "the desired state is invalid; nothing moves");
        let mut detail = format!(
            "commit {} refused, {} problem(s): {}",
            r.commit,
            r.problems.len(),
            r.problems.join("; ")
        );
        if detail.len() > MAX_AUDIT_PROBLEMS {
            let mut cut = MAX_AUDIT_PROBLEMS;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
            detail.push_str(" …");
        }
        self.audit(
            now,
            "coordinator",
            "commit_refused",
            short(&r.commit),
            detail,
        );
        self.changes.push(Change::Refused(Some(r.clone())));
        self.refused = Some(r);
    }

    /// The repo cannot be read now (kept in memory: shown by status until a fetch works).
    pub fn git_error(&mut self, error: String) {
        self.git_error = Some(error);
    }

    /// (env, service) at `version` in commit `d`.
    fn follow(
        &mut self,
        env: &str,
        service: &str,
        version: &str,
        e: &EnvDesired,
        d: &Desired,
        now: u64,
    ) {
        let policy = &e.policy;
        let after = e.after_of(service);
        if let Some(o) = self.overrides.get(&(env.to_string(), service.to_string())) {
            if o.from == version {
                return; // Git still asks for what was rolled back from: the override holds.
            }
            self.end_override(
                env,
                service,
                &format!("Git now asks for {version} (commit {})", short(&d.commit)),
                now,
            );
        }
        let newest = self.newest(env, service, None);
        if let Some(id) = newest.filter(|id| self.rollouts[id].version == version) {
            // Same version as before: its rollout goes on, whatever its state; one that has
            // not started waits for what this commit pins of the services it comes after.
            let r = self.rollouts.get_mut(&id).expect("exists");
            if r.state == RolloutState::Pending && r.after != after {
                r.after = after;
                self.save(id);
            }
            return;
        }
        let job = e.jobs.contains(service);
        if job && self.succeeded_before(env, service, version) {
            // A job runs once per version: going back to one that ran runs nothing.
            return;
        }
        self.supersede(
            env,
            service,
            &format!("superseded by {version} (commit {})", short(&d.commit)),
            now,
        );
        let kind = if self.succeeded_before(env, service, version) {
            RolloutKind::Rollback
        } else {
            RolloutKind::Deploy
        };
        self.create(Rollout {
            id: 0,
            environment: env.into(),
            service: service.into(),
            version: version.into(),
            kind,
            attempt: 1,
            trigger: format!("commit {}", short(&d.commit)),
            state: RolloutState::Pending,
            policy: policy.clone(),
            commit: d.commit.clone(),
            commit_time_ms: d.commit_time_ms,
            succeeded: BTreeSet::new(),
            failed: BTreeSet::new(),
            reverted: BTreeSet::new(),
            verified: BTreeSet::new(),
            verdicts: BTreeMap::new(),
            charts: Vec::new(),
            traffic: Vec::new(),
            decision: None,
            reason: None,
            approval_deadline_ms: None,
            created_at_ms: now,
            updated_at_ms: now,
            after,
            freeze_lifted: None,
            first_batch: None,
            step_gate: None,
            step_decisions: BTreeMap::new(),
            job,
        });
        // It moves on (or waits) once the whole commit is followed: `apply_desired` then
        // advances every PENDING rollout under this commit's freeze windows and order.
    }

    fn succeeded_before(&self, env: &str, service: &str, version: &str) -> bool {
        self.rollouts
            .values()
            .any(|r| r.of(env, service) && r.version == version && r.state == RolloutState::Success)
    }

    /// Stores a new rollout (its id assigned here) and audits it.
    fn create(&mut self, mut r: Rollout) -> u64 {
        let id = self.next_rollout;
        self.next_rollout += 1;
        r.id = id;
        let kind = match r.kind {
            RolloutKind::Deploy => "deploy",
            RolloutKind::Rollback => "rollback",
        };
        let detail = format!(
            "#{id} {kind} of {} from commit {}, attempt {} ({})",
            r.version,
            short(&r.commit),
            r.attempt,
            r.trigger
        );
        let (subject, at) = (r.key(), r.created_at_ms);
        self.rollouts.insert(id, r);
        self.audit(at, "coordinator", "rollout_created", &subject, detail);
        self.save(id);
        id
    }

    /// Ends every unfinished rollout of (env, service). A VERIFYING one goes on counting: its
    /// hosts took the version and report on it, and those that move on are counted apart.
    fn supersede(&mut self, env: &str, service: &str, why: &str, now: u64) {
        let open: Vec<u64> = self
            .rollouts
            .values()
            .filter(|r| {
                r.of(env, service) && !r.state.is_terminal() && r.state != RolloutState::Verifying
            })
            .map(|r| r.id)
            .collect();
        for id in open {
            self.set_state(
                id,
                RolloutState::Aborted,
                Some(why.to_string()),
                "coordinator",
                now,
            );
        }
    }

    fn end_override(&mut self, env: &str, service: &str, why: &str, now: u64) {
        let k = (env.to_string(), service.to_string());
        if let Some(o) = self.overrides.remove(&k) {
            self.audit(
                now,
                "coordinator",
                "override_ended",
                &key(env, service, &o.to),
                format!("rollback to {} by {} ended: {why}", o.to, o.by),
            );
            self.changes.push(Change::Override(k.0, k.1, None));
        }
    }

    /// Moves a PENDING rollout on when it may: a rollback at once (or to approval when
    /// `approval.rollbacks: required`); a deploy once its promotion rule holds.
    pub(super) fn advance(&mut self, id: u64, now: u64) {
        let r = &self.rollouts[&id];
        if r.state != RolloutState::Pending {
            return;
        }
        let needs_approval = match r.kind {
            RolloutKind::Rollback => r.policy.rollbacks_need_approval,
            RolloutKind::Deploy => {
                if self.held_back(r, now).is_some() {
                    return;
                }
                r.policy.approval_required
            }
        };
        if needs_approval {
            let deadline = now.saturating_add(r.policy.approval_timeout_ms);
            self.rollouts
                .get_mut(&id)
                .expect("exists")
                .approval_deadline_ms = Some(deadline);
            self.set_state(id, RolloutState::ApprovalRequired, None, "coordinator", now);
        } else {
            self.set_state(id, RolloutState::Running, None, "coordinator", now);
        }
    }

    /// Every PENDING rollout that may move on does.
    pub(super) fn advance_pending(&mut self, now: u64) {
        let pending: Vec<u64> = self
            .rollouts
            .values()
            .filter(|r| r.state == RolloutState::Pending)
            .map(|r| r.id)
            .collect();
        for id in pending {
            self.advance(id, now);
        }
    }

    /// Why a deploy `r` may not start yet — its promotion rule, its `after:` order, then a
    /// freeze of its environment — if it may not.
    pub(super) fn held_back(&self, r: &Rollout, now: u64) -> Option<String> {
        self.upstream_missing(r)
            .or_else(|| self.order_missing(r))
            .or_else(|| self.frozen_for(r, now))
    }

    /// Whether `env` is frozen at `now`: until when (ms), and the message that says so.
    pub(super) fn frozen(&self, env: &str, now: u64) -> Option<(u64, String)> {
        let windows = &self.desired.as_ref()?.environments.get(env)?.freeze;
        let (until, first) = freeze::frozen_until(windows, now)?;
        Some((
            until,
            format!(
                "{env} is frozen until {} (freeze: {first})",
                freeze::show_ms(until)
            ),
        ))
    }

    /// Why deploy `r` may not start during a freeze of its environment, if one is open and no
    /// admin let it through.
    pub(super) fn frozen_for(&self, r: &Rollout, now: u64) -> Option<String> {
        if r.kind != RolloutKind::Deploy || r.freeze_lifted.is_some() {
            return None;
        }
        let (_, why) = self.frozen(&r.environment, now)?;
        Some(format!(
            "{why}: new rollouts start when it ends, rollbacks go through; an admin may let this one through: drover approve --during-freeze {} {} {}",
            r.environment, r.service, r.version
        ))
    }

    /// Why `r` may not start yet under `promotion.requires`, if it may not.
    fn upstream_missing(&self, r: &Rollout) -> Option<String> {
        let up = r.policy.promotion_requires.as_deref()?;
        let ok = self.rollouts.values().any(|u| {
            u.of(up, &r.service) && u.version == r.version && u.state == RolloutState::Success
        });
        (!ok).then(|| {
            format!(
                "{} {} has not succeeded in {up} yet (promotion.requires: {up}); no host of {} may deploy it before",
                r.service, r.version, r.environment
            )
        })
    }

    /// Why `r` may not start yet under `after:`, if it may not: the services it comes after
    /// whose pinned versions have not succeeded in its environment.
    fn order_missing(&self, r: &Rollout) -> Option<String> {
        let missing: Vec<String> = r
            .after
            .iter()
            .filter(|(service, version)| {
                !self.rollouts.values().any(|u| {
                    u.of(&r.environment, service)
                        && &u.version == *version
                        && u.state == RolloutState::Success
                })
            })
            .map(|(s, v)| format!("{s} {v}"))
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "{} comes after {} in {}: it starts once they have succeeded there",
                r.service,
                missing.join(" and "),
                r.environment
            )
        })
    }

    /// `drover retry ENV SERVICE`: the failed or aborted rollout of the version Git asks for
    /// starts again as a new attempt (through the same gates).
    pub fn retry(
        &mut self,
        env: &str,
        service: &str,
        who: &Caller,
        now: u64,
    ) -> Result<RolloutView, ApiError> {
        if let Some(o) = self.overrides.get(&(env.to_string(), service.to_string())) {
            return Err(ApiError::conflict(format!(
                "{env}/{service} was {}: commit a change of its version to Git instead",
                o.note()
            )));
        }
        let version = self.git_version(env, service)?;
        let Some(old) = self.newest(env, service, Some(&version)) else {
            return Err(ApiError::not_found(format!(
                "{env}/{service} {version} has no rollout to retry"
            )));
        };
        let r = &self.rollouts[&old];
        if !matches!(r.state, RolloutState::Failed | RolloutState::Aborted) {
            return Err(ApiError::conflict(format!(
                "{env}/{service} {version} is {}: only a FAILED or ABORTED rollout can be retried",
                r.state
            )));
        }
        let attempt = r.attempt.saturating_add(1);
        let after = self
            .desired
            .as_ref()
            .and_then(|d| d.environments.get(env))
            .map(|e| e.after_of(service))
            .unwrap_or_default();
        let next = Rollout {
            id: 0,
            attempt,
            after,
            trigger: format!("retry by {}", who.name),
            state: RolloutState::Pending,
            succeeded: BTreeSet::new(),
            failed: BTreeSet::new(),
            reverted: BTreeSet::new(),
            verified: BTreeSet::new(),
            verdicts: BTreeMap::new(),
            decision: None,
            reason: None,
            approval_deadline_ms: None,
            freeze_lifted: None,
            first_batch: None,
            step_gate: None,
            step_decisions: BTreeMap::new(),
            created_at_ms: now,
            updated_at_ms: now,
            ..r.clone()
        };
        if r.state == RolloutState::Failed {
            self.set_state(
                old,
                RolloutState::Aborted,
                Some(format!("retried by {} (attempt {attempt})", who.name)),
                &who.name,
                now,
            );
        }
        self.audit(
            now,
            &who.name,
            "retry",
            &key(env, service, &version),
            format!("attempt {attempt} of {version}"),
        );
        let id = self.create(next);
        self.advance(id, now);
        Ok(self.view_of(id, now))
    }

    /// `drover rollback ENV SERVICE [--to VERSION]`: every host of the service goes back to
    /// `to` (default: the newest other version that succeeded there), with no approval, under
    /// the lease limit, until Git's desired version of the service changes.
    pub fn rollback(
        &mut self,
        env: &str,
        service: &str,
        to: Option<&str>,
        who: &Caller,
        now: u64,
    ) -> Result<RolloutView, ApiError> {
        let from = self.git_version(env, service)?;
        if let Some(v) = to {
            check_names(&[("version", v, 128)])?;
        }
        let is_job = self
            .desired
            .as_ref()
            .and_then(|d| d.environments.get(env))
            .is_some_and(|e| e.jobs.contains(service));
        if is_job {
            return Err(ApiError::conflict(format!(
                "{env}/{service} is a job: what it ran cannot be rolled back; to run another version, pin it in Git (each version runs once)"
            )));
        }
        let current = self.wanted(env, service).map(str::to_string);
        let good = |r: &Rollout| r.of(env, service) && r.state == RolloutState::Success;
        let target = match to {
            Some(v) => {
                if current.as_deref() == Some(v) {
                    return Err(ApiError::conflict(format!(
                        "{env}/{service} is already asked to run {v}"
                    )));
                }
                self.rollouts
                    .values()
                    .rev()
                    .find(|r| good(r) && r.version == v)
                    .ok_or_else(|| {
                        ApiError::conflict(format!(
                            "{service} {v} has never succeeded in {env}: a rollback goes only to a version that did"
                        ))
                    })?
            }
            None => self
                .rollouts
                .values()
                .rev()
                .find(|r| good(r) && r.version != from && Some(&r.version) != current.as_ref())
                .ok_or_else(|| {
                    ApiError::conflict(format!(
                        "{env}/{service}: no other version has succeeded there to roll back to"
                    ))
                })?,
        };
        let (version, commit, commit_time_ms) = (
            target.version.clone(),
            target.commit.clone(),
            target.commit_time_ms,
        );
        let policy = self
            .desired
            .as_ref()
            .and_then(|d| d.environments.get(env))
            .map(|e| e.policy.clone())
            .unwrap_or_else(|| target.policy.clone());
        self.supersede(
            env,
            service,
            &format!("rolled back to {version} by {}", who.name),
            now,
        );
        let o = Override {
            environment: env.into(),
            service: service.into(),
            from: from.clone(),
            to: version.clone(),
            commit: commit.clone(),
            by: who.name.clone(),
            at_ms: now,
        };
        self.audit(
            now,
            &who.name,
            "rollback",
            &key(env, service, &version),
            o.note(),
        );
        self.changes.push(Change::Override(
            env.into(),
            service.into(),
            Some(o.clone()),
        ));
        self.overrides.insert((env.into(), service.into()), o);
        let id = self.create(Rollout {
            id: 0,
            environment: env.into(),
            service: service.into(),
            version,
            kind: RolloutKind::Rollback,
            attempt: 1,
            trigger: format!("rollback by {} from {from}", who.name),
            state: RolloutState::Pending,
            policy,
            commit,
            commit_time_ms,
            succeeded: BTreeSet::new(),
            failed: BTreeSet::new(),
            reverted: BTreeSet::new(),
            verified: BTreeSet::new(),
            verdicts: BTreeMap::new(),
            charts: Vec::new(),
            traffic: Vec::new(),
            decision: None,
            reason: None,
            approval_deadline_ms: None,
            created_at_ms: now,
            updated_at_ms: now,
            after: BTreeMap::new(),
            freeze_lifted: None,
            first_batch: None,
            step_gate: None,
            step_decisions: BTreeMap::new(),
            job: false,
        });
        // Asked for by a person on call: no approval, whatever the policy.
        self.set_state(id, RolloutState::Running, None, &who.name, now);
        Ok(self.view_of(id, now))
    }

    /// The version Git asks for in (env, service), or why there is none.
    fn git_version(&self, env: &str, service: &str) -> Result<String, ApiError> {
        check_names(&[("environment", env, 63), ("service", service, 63)])?;
        let d = self.desired.as_ref().ok_or_else(|| {
            ApiError::conflict("the coordinator has not read the desired state yet")
        })?;
        d.version(env, service).map(str::to_string).ok_or_else(|| {
            ApiError::not_found(format!(
                "{env}/{service} is not in the desired state (commit {})",
                short(&d.commit)
            ))
        })
    }
}
