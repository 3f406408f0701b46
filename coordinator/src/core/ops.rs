//! What people do to a rollout: approve or reject it, pause, resume or abort it.

use super::{ApiError, Core, key};
use crate::auth::{Caller, Role};
use crate::wire::{Decision, RolloutState, RolloutView};

impl Core {
    /// Approve (or reject) a rollout waiting for approval.
    pub fn decide(
        &mut self,
        env: &str,
        service: &str,
        version: &str,
        approve: bool,
        who: &Caller,
        now: u64,
    ) -> Result<RolloutView, ApiError> {
        let k = key(env, service, version);
        let Some(id) = self.newest(env, service, Some(version)) else {
            return Err(ApiError::not_found(format!(
                "no rollout {k}: a rollout starts when a commit asks for {service} {version} in {env}"
            )));
        };
        let r = &self.rollouts[&id];
        if r.state != RolloutState::ApprovalRequired {
            return Err(ApiError::conflict(format!(
                "rollout {k} is {}, not waiting for approval",
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
        let r = self.rollouts.get_mut(&id).expect("exists");
        r.decision = Some(Decision {
            approved: approve,
            by: who.name.clone(),
            at_ms: now,
        });
        r.approval_deadline_ms = None;
        let verb = if approve { "approve" } else { "reject" };
        self.audit(now, &who.name, verb, &k, format!("{verb}d by {}", who.name));
        // The decision records who and when; the state's reason stays short.
        if approve {
            self.set_state(id, RolloutState::Approved, None, &who.name, now);
            self.set_state(id, RolloutState::Running, None, &who.name, now);
            self.progress(id, now);
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
