//! What people do to a rollout: approve or reject it, pause, resume or abort it.

use drover_desired::freeze;

use super::{ApiError, Core, key};
use crate::auth::{Caller, Role};
use crate::wire::{Decision, RolloutState, RolloutView};

impl Core {
    /// Approve (or reject) a rollout waiting for approval: before its start, after its first
    /// batch, or at a traffic step its lease holder waits at.
    pub fn decide(
        &mut self,
        env: &str,
        service: &str,
        version: &str,
        approve: bool,
        who: &Caller,
        now: u64,
    ) -> Result<RolloutView, ApiError> {
        let (id, k) = self.to_decide(env, service, version)?;
        let r = &self.rollouts[&id];
        if r.state != RolloutState::ApprovalRequired {
            let why = match self.frozen_for(r, now) {
                Some(f) if r.state == RolloutState::Pending => format!(": {f}"),
                _ => String::new(),
            };
            return Err(ApiError::conflict(format!(
                "rollout {k} is {}, not waiting for approval{why}",
                r.state
            )));
        }
        let approvers = r.policy.approvers.clone();
        if who.role != Role::Admin
            && !approvers.is_empty()
            && !who.groups.iter().any(|g| approvers.contains(g))
        {
            let why = format!(
                "{} is not in an approver group of {env} ({})",
                who.name,
                approvers.join(", ")
            );
            self.denied(now, &who.name, &k, &why);
            return Err(ApiError::forbidden(why));
        }
        // Which gate: a step the lease holder waits at, the one after the first batch, or
        // the one before the start.
        let step = r.step_gate.clone();
        let mid = match &step {
            Some(s) => Some(format!(" at {s}")),
            None => r
                .at_batch_gate()
                .then(|| " after the first batch".to_string()),
        };
        let decision = Decision {
            approved: approve,
            by: who.name.clone(),
            at_ms: now,
        };
        let r = self.rollouts.get_mut(&id).expect("exists");
        match &step {
            Some(s) => {
                r.step_decisions.insert(s.clone(), decision);
                r.step_gate = None;
            }
            None if mid.is_some() => r.first_batch = Some(decision),
            None => r.decision = Some(decision),
        }
        r.approval_deadline_ms = None;
        let verb = if approve { "approve" } else { "reject" };
        let gate = mid.clone().unwrap_or_default();
        self.audit(
            now,
            &who.name,
            verb,
            &k,
            format!("{verb}d{gate} by {}", who.name),
        );
        // The decision records who and when; the state's reason stays short.
        if approve {
            let reason = mid.map(|g| format!("approved{g} by {}", who.name));
            self.set_state(id, RolloutState::Approved, None, &who.name, now);
            self.set_state(id, RolloutState::Running, reason, &who.name, now);
            self.progress(id, now);
        } else if let Some(g) = mid {
            // Hosts (or traffic) already run the rejected version: it goes back.
            self.fail(id, format!("rejected{g} by {}", who.name), now);
        } else {
            self.set_state(
                id,
                RolloutState::Aborted,
                Some("rejected".into()),
                &who.name,
                now,
            );
        }
        Ok(self.view_of(id, now))
    }

    /// The newest rollout of (env, service, version) and its key.
    fn to_decide(
        &self,
        env: &str,
        service: &str,
        version: &str,
    ) -> Result<(u64, String), ApiError> {
        let k = key(env, service, version);
        match self.newest(env, service, Some(version)) {
            Some(id) => Ok((id, k)),
            None => Err(ApiError::not_found(format!(
                "no rollout {k}: a rollout starts when a commit asks for {service} {version} in {env}"
            ))),
        }
    }

    /// `drover approve --during-freeze`: an admin lets a deploy held by a freeze of its
    /// environment start (audited), and approves it if it then waits for an approval. It
    /// still waits for its promotion rule and its `after:` services.
    pub fn approve_during_freeze(
        &mut self,
        env: &str,
        service: &str,
        version: &str,
        who: &Caller,
        now: u64,
    ) -> Result<RolloutView, ApiError> {
        let (id, k) = self.to_decide(env, service, version)?;
        if who.role != Role::Admin {
            let why = format!(
                "{} may not let a rollout through a freeze: --during-freeze is for admins",
                who.name
            );
            self.denied(now, &who.name, &k, &why);
            return Err(ApiError::forbidden(why));
        }
        let r = &self.rollouts[&id];
        if r.state != RolloutState::Pending || self.frozen_for(r, now).is_none() {
            return Err(ApiError::conflict(format!(
                "rollout {k} is {} and not held by a freeze: approve it without --during-freeze",
                r.state
            )));
        }
        let (until, why) = self.frozen(&r.environment, now).expect("frozen");
        let r = self.rollouts.get_mut(&id).expect("exists");
        r.freeze_lifted = Some(Decision {
            approved: true,
            by: who.name.clone(),
            at_ms: now,
        });
        self.save(id);
        self.audit(
            now,
            &who.name,
            "freeze_lifted",
            &k,
            format!(
                "let through a freeze by {} ({why}; other rollouts still wait until {})",
                who.name,
                freeze::show_ms(until)
            ),
        );
        self.advance(id, now);
        if self.rollouts[&id].state == RolloutState::ApprovalRequired {
            return self.decide(env, service, version, true, who, now);
        }
        Ok(self.view_of(id, now))
    }

    /// `pause`, `resume` or `abort` the newest rollout of (env, service), if unfinished.
    pub fn operate(
        &mut self,
        env: &str,
        service: &str,
        verb: &str,
        who: &Caller,
        now: u64,
    ) -> Result<RolloutView, ApiError> {
        use RolloutState::*;
        let (from, to, done): (&[RolloutState], RolloutState, &str) = match verb {
            "pause" => (&[Running, Verifying], Paused, "paused"),
            "resume" => (&[Paused], Running, "resumed"),
            "abort" => (
                &[
                    Pending,
                    ApprovalRequired,
                    Running,
                    Paused,
                    Verifying,
                    Failed,
                    RollingBack,
                ],
                Aborted,
                "aborted",
            ),
            other => return Err(ApiError::not_found(format!("unknown operation `{other}`"))),
        };
        // Only the newest rollout of (env, service) is operated on. An older one is superseded
        // (a VERIFYING one still counts its hosts' reports): paused and then resumed, it would
        // be RUNNING a version Git no longer asks for, which no host deploys and nothing ends.
        let newest = self.newest(env, service, None);
        let Some(id) = newest.filter(|id| from.contains(&self.rollouts[id].state)) else {
            return Err(match newest {
                Some(id) if !self.rollouts[&id].state.is_terminal() => ApiError::conflict(format!(
                    "cannot {verb} {}: it is {}",
                    self.rollouts[&id].key(),
                    self.rollouts[&id].state
                )),
                _ => ApiError::not_found(format!("{env}/{service} has no unfinished rollout")),
            });
        };
        self.set_state(
            id,
            to,
            Some(format!("{done} by {}", who.name)),
            &who.name,
            now,
        );
        if to == Running {
            let r = &self.rollouts[&id];
            if r.failed.len() as u32 > r.policy.max_failures {
                let why = format!(
                    "{} host(s) failed (max_failures {})",
                    r.failed.len(),
                    r.policy.max_failures
                );
                self.fail(id, why, now);
            }
        }
        self.progress(id, now);
        Ok(self.view_of(id, now))
    }
}
