//! The coordinator's state and every decision over it, as plain functions of (state, request,
//! `now`). Nothing here does I/O: each operation mutates the in-memory [`Core`] and queues the
//! [`Change`]s the actor then writes to the store in one transaction before answering.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::auth::{Caller, Role};
use crate::rollout::transition;
use crate::wire::{
    AcquireRequest, Action, AuditEntry, Decision, ErrorBody, Granted, Heartbeat, HeartbeatReply,
    HostView, Lease, Outcome, Policy, Purpose, ReleaseRequest, Renewed, RolloutState, RolloutView,
    ServiceReport, Status,
};

/// A rollout as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Environment.
    pub environment: String,
    /// Service.
    pub service: String,
    /// Version.
    pub version: String,
    /// State.
    pub state: RolloutState,
    /// Policy (from the first request).
    pub policy: Policy,
    /// Commit of the first request.
    pub commit: String,
    /// That commit's time.
    pub commit_time_ms: u64,
    /// Hosts that deployed it.
    pub succeeded: BTreeSet<String>,
    /// Hosts whose deploy failed.
    pub failed: BTreeSet<String>,
    /// Hosts that reverted from it.
    pub reverted: BTreeSet<String>,
    /// Hosts that deployed it and then reported it running healthy.
    #[serde(default)]
    pub verified: BTreeSet<String>,
    /// Metric verification verdicts reported with releases, by host.
    #[serde(default)]
    pub verdicts: BTreeMap<String, String>,
    /// Approval decision.
    pub decision: Option<Decision>,
    /// Why it is in its state.
    pub reason: Option<String>,
    /// When an unanswered approval times out.
    pub approval_deadline_ms: Option<u64>,
    /// Created.
    pub created_at_ms: u64,
    /// Last change.
    pub updated_at_ms: u64,
}

impl Rollout {
    /// `env/service/version`.
    pub fn key(&self) -> String {
        key(&self.environment, &self.service, &self.version)
    }
}

/// How often `tick` re-checks every open rollout.
const SWEEP_MS: u64 = 5_000;

fn key(env: &str, service: &str, version: &str) -> String {
    format!("{env}/{service}/{version}")
}

/// A host as stored (its last heartbeat).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// Environment.
    pub environment: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Agent version.
    pub agent_version: Option<String>,
    /// Services as last reported.
    pub services: Vec<ServiceReport>,
    /// Last heartbeat (kept in memory; a restart counts as a heartbeat).
    #[serde(skip)]
    pub last_seen_ms: u64,
}

/// A write for the store.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Insert or replace a rollout.
    Rollout(Box<Rollout>),
    /// Insert or replace a lease.
    Lease(Lease),
    /// Delete a lease.
    LeaseGone(String),
    /// Insert or replace a host.
    Host(String, Host),
    /// Append an audit entry.
    Audit(AuditEntry),
}

/// Everything the store holds, as loaded at start.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Rollouts.
    pub rollouts: Vec<Rollout>,
    /// Leases.
    pub leases: Vec<Lease>,
    /// Hosts.
    pub hosts: Vec<(String, Host)>,
    /// The highest audit sequence number.
    pub last_audit: u64,
}

/// An error answer: HTTP status plus the protocol's error body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: ErrorBody,
}

impl ApiError {
    fn new(status: u16, kind: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                kind: kind.into(),
                message: message.into(),
                reason: None,
                retry_after_ms: None,
            },
        }
    }
    /// 400 bad_request.
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(400, "bad_request", m)
    }
    /// 403 forbidden.
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        ApiError::new(403, "forbidden", m)
    }
    /// 404 not_found.
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(404, "not_found", m)
    }
    /// 409 conflict.
    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(409, "conflict", m)
    }
    /// 410 lease_lost.
    pub fn lease_lost(m: impl Into<String>) -> ApiError {
        ApiError::new(410, "lease_lost", m)
    }
    /// 500 internal.
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(500, "internal", m)
    }
    /// 409 wait.
    pub fn wait(reason: &str, retry_after_ms: u64, m: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(409, "wait", m);
        e.body.reason = Some(reason.into());
        e.body.retry_after_ms = Some(retry_after_ms);
        e
    }
    /// 422 rejected.
    pub fn rejected(reason: &str, m: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(422, "rejected", m);
        e.body.reason = Some(reason.into());
        e
    }
}

/// The coordinator's state.
#[derive(Debug)]
pub struct Core {
    rollouts: BTreeMap<String, Rollout>,
    leases: HashMap<String, Lease>,
    hosts: BTreeMap<String, Host>,
    /// Lease time to live.
    pub lease_ttl_ms: u64,
    /// Heartbeat interval asked of agents.
    pub heartbeat_ms: u64,
    next_audit: u64,
    changes: Vec<Change>,
    lease_counter: u64,
    /// When `tick` last looked at every open rollout.
    last_sweep_ms: u64,
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'))
}

impl Core {
    /// The state from a store snapshot at `now`. Held leases get a fresh TTL, so a restart of
    /// the coordinator loses none; hosts count as just seen.
    pub fn new(snap: Snapshot, lease_ttl_ms: u64, heartbeat_ms: u64, now: u64) -> Core {
        let mut core = Core {
            rollouts: snap.rollouts.into_iter().map(|r| (r.key(), r)).collect(),
            leases: HashMap::new(),
            hosts: snap
                .hosts
                .into_iter()
                .map(|(n, mut h)| {
                    h.last_seen_ms = now;
                    (n, h)
                })
                .collect(),
            lease_ttl_ms,
            heartbeat_ms,
            next_audit: snap.last_audit + 1,
            changes: Vec::new(),
            lease_counter: 0,
            last_sweep_ms: 0,
        };
        for mut l in snap.leases {
            l.expires_at_ms = l.expires_at_ms.max(now + lease_ttl_ms);
            l.ttl_ms = lease_ttl_ms;
            core.leases.insert(l.id.clone(), l);
        }
        core
    }

    /// Takes the changes queued since the last call.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    fn audit(&mut self, now: u64, actor: &str, action: &str, subject: &str, detail: String) {
        let e = AuditEntry {
            seq: self.next_audit,
            at_ms: now,
            actor: actor.into(),
            action: action.into(),
            subject: subject.into(),
            detail,
        };
        self.next_audit += 1;
        self.changes.push(Change::Audit(e));
    }

    /// Records a denied call.
    pub fn denied(&mut self, now: u64, who: &str, what: &str, why: &str) {
        self.audit(now, who, "denied", what, why.into());
    }

    fn save(&mut self, key: &str) {
        if let Some(r) = self.rollouts.get(key) {
            self.changes.push(Change::Rollout(Box::new(r.clone())));
        }
    }

    /// Moves rollout `key` to `to`, checking the matrix and auditing.
    fn set_state(
        &mut self,
        key: &str,
        to: RolloutState,
        reason: Option<String>,
        actor: &str,
        now: u64,
    ) {
        let Some(r) = self.rollouts.get_mut(key) else {
            return;
        };
        let from = r.state;
        if let Err(e) = transition(from, to) {
            // The decisions below only ask for legal moves; this is a bug, not user input.
            tracing::error!(error = %e, rollout = key, "illegal transition refused");
            return;
        }
        r.state = to;
        r.updated_at_ms = now;
        if reason.is_some() {
            r.reason = reason.clone();
        }
        let detail = match &reason {
            Some(why) => format!("{from} → {to}: {why}"),
            None => format!("{from} → {to}"),
        };
        tracing::info!(rollout = key, %from, %to, reason = reason.as_deref().unwrap_or(""), "rollout transition");
        self.audit(now, actor, "transition", key, detail);
        self.save(key);
    }

    fn leases_of(&self, key: &str) -> usize {
        self.leases
            .values()
            .filter(|l| self::key(&l.environment, &l.service, &l.version) == key)
            .count()
    }

    fn view(&self, r: &Rollout) -> RolloutView {
        RolloutView {
            environment: r.environment.clone(),
            service: r.service.clone(),
            version: r.version.clone(),
            state: r.state,
            policy: r.policy.clone(),
            commit: r.commit.clone(),
            leases: self.leases_of(&r.key()) as u32,
            succeeded: r.succeeded.iter().cloned().collect(),
            failed: r.failed.iter().cloned().collect(),
            reverted: r.reverted.iter().cloned().collect(),
            verdicts: r.verdicts.clone(),
            decision: r.decision.clone(),
            reason: r.reason.clone(),
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
        }
    }

    fn view_of(&self, key: &str) -> RolloutView {
        self.view(&self.rollouts[key])
    }

    /// `POST /v1/leases`.
    pub fn acquire(
        &mut self,
        req: &AcquireRequest,
        who: &Caller,
        now: u64,
    ) -> Result<Granted, ApiError> {
        for (what, v, max) in [
            ("host", &req.host, 253),
            ("environment", &req.environment, 63),
            ("service", &req.service, 63),
            ("version", &req.version, 128),
        ] {
            if !valid_name(v, max) {
                return Err(ApiError::bad_request(format!(
                    "invalid {what} `{v}`: letters, digits, `.`, `-`, `_`, `+`, at most {max}"
                )));
            }
        }
        if req.policy.max_parallel == 0 {
            return Err(ApiError::bad_request(
                "policy.max_parallel must be at least 1",
            ));
        }
        let k = key(&req.environment, &req.service, &req.version);
        if !self.rollouts.contains_key(&k) {
            if req.purpose == Purpose::Revert {
                return Err(ApiError::not_found(format!(
                    "no rollout {k} to revert from"
                )));
            }
            if let Some(newer) = self.rollouts.values().find(|r| {
                r.environment == req.environment
                    && r.service == req.service
                    && !r.state.is_terminal()
                    && r.commit_time_ms > req.commit_time_ms
            }) {
                return Err(ApiError::wait(
                    "stale",
                    5000,
                    format!(
                        "{}/{} {} is rolling out from a newer desired state (commit {}); this host's desired state (commit {}) is older and will be fetched again",
                        newer.environment,
                        newer.service,
                        newer.version,
                        short(&newer.commit),
                        short(&req.commit)
                    ),
                ));
            }
            self.create(req, who, now);
        }
        self.advance_pending(&k, now)?;
        let r = &self.rollouts[&k];
        let state = r.state;
        match (state, req.purpose) {
            (RolloutState::ApprovalRequired, _) => {
                let approvers = if r.policy.approvers.is_empty() {
                    "any approver".to_string()
                } else {
                    r.policy.approvers.join(", ")
                };
                return Err(ApiError::wait(
                    "approval_required",
                    2000,
                    format!(
                        "{k} waits for approval ({approvers}): drover approve {} {} {}",
                        req.environment, req.service, req.version
                    ),
                ));
            }
            (RolloutState::Paused, _) => {
                return Err(ApiError::wait(
                    "paused",
                    2000,
                    format!("{k} is paused by an operator"),
                ));
            }
            (RolloutState::Failed | RolloutState::RollingBack, Purpose::Deploy) => {
                return Err(ApiError::rejected(
                    "failed",
                    format!(
                        "{k} failed ({}); it will not be deployed",
                        r.reason.as_deref().unwrap_or("too many failures")
                    ),
                ));
            }
            (RolloutState::Aborted, Purpose::Deploy) => {
                let why = r.reason.clone().unwrap_or_else(|| "aborted".into());
                let reason = if why.starts_with("superseded") {
                    "superseded"
                } else {
                    "aborted"
                };
                return Err(ApiError::rejected(
                    reason,
                    format!("{k} was aborted ({why}); it will not be deployed"),
                ));
            }
            (RolloutState::RollingBack, Purpose::Revert) => {
                if !r.succeeded.contains(&req.host) || r.reverted.contains(&req.host) {
                    return Err(ApiError::conflict(format!(
                        "host {} has nothing to revert in {k}",
                        req.host
                    )));
                }
            }
            (_, Purpose::Revert) => {
                return Err(ApiError::conflict(format!(
                    "{k} is {state}, not rolling back"
                )));
            }
            (
                RolloutState::Running | RolloutState::Verifying | RolloutState::Success,
                Purpose::Deploy,
            ) => {}
            (RolloutState::Pending | RolloutState::Approved, Purpose::Deploy) => {
                unreachable!("advance_pending leaves no rollout in {state}")
            }
        }
        // A retry from a host that already holds a lease on this rollout gets the same lease.
        if let Some(held) = self
            .leases
            .values_mut()
            .find(|l| l.host == req.host && key(&l.environment, &l.service, &l.version) == k)
        {
            held.expires_at_ms = now + self.lease_ttl_ms;
            let lease = held.clone();
            return Ok(Granted {
                lease,
                rollout: self.view_of(&k),
            });
        }
        let max = self.rollouts[&k].policy.max_parallel as usize;
        if self.leases_of(&k) >= max {
            return Err(ApiError::wait(
                "no_slot",
                300,
                format!("{k}: {max} host(s) already deploying (max_parallel {max})"),
            ));
        }
        self.lease_counter += 1;
        let id = format!(
            "{:016x}{:08x}",
            rand::random::<u64>(),
            self.lease_counter as u32
        );
        let lease = Lease {
            id: id.clone(),
            host: req.host.clone(),
            environment: req.environment.clone(),
            service: req.service.clone(),
            version: req.version.clone(),
            purpose: req.purpose,
            ttl_ms: self.lease_ttl_ms,
            expires_at_ms: now + self.lease_ttl_ms,
        };
        self.leases.insert(id.clone(), lease.clone());
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
            format!("{purpose} lease {id} by {}", who.name),
        );
        Ok(Granted {
            lease,
            rollout: self.view_of(&k),
        })
    }

    /// Creates the rollout of `req`, superseding unfinished rollouts of other versions.
    fn create(&mut self, req: &AcquireRequest, who: &Caller, now: u64) {
        let k = key(&req.environment, &req.service, &req.version);
        let superseded: Vec<String> = self
            .rollouts
            .values()
            .filter(|r| {
                r.environment == req.environment
                    && r.service == req.service
                    && matches!(
                        r.state,
                        RolloutState::Pending
                            | RolloutState::ApprovalRequired
                            | RolloutState::Running
                            | RolloutState::Paused
                    )
            })
            .map(Rollout::key)
            .collect();
        self.rollouts.insert(
            k.clone(),
            Rollout {
                environment: req.environment.clone(),
                service: req.service.clone(),
                version: req.version.clone(),
                state: RolloutState::Pending,
                policy: req.policy.clone(),
                commit: req.commit.clone(),
                commit_time_ms: req.commit_time_ms,
                succeeded: BTreeSet::new(),
                failed: BTreeSet::new(),
                reverted: BTreeSet::new(),
                verified: BTreeSet::new(),
                verdicts: BTreeMap::new(),
                decision: None,
                reason: None,
                approval_deadline_ms: None,
                created_at_ms: now,
                updated_at_ms: now,
            },
        );
        self.audit(
            now,
            &req.host,
            "rollout_created",
            &k,
            format!("commit {} (token {})", short(&req.commit), who.name),
        );
        self.save(&k);
        for old in superseded {
            self.set_state(
                &old,
                RolloutState::Aborted,
                Some(format!("superseded by {}", req.version)),
                "coordinator",
                now,
            );
        }
    }

    /// Moves a PENDING rollout on once its promotion rule holds; errors while it does not.
    fn advance_pending(&mut self, k: &str, now: u64) -> Result<(), ApiError> {
        let r = &self.rollouts[k];
        if r.state != RolloutState::Pending {
            return Ok(());
        }
        if let Some(up) = &r.policy.promotion_requires {
            let upstream = key(up, &r.service, &r.version);
            let ok = self
                .rollouts
                .get(&upstream)
                .is_some_and(|u| u.state == RolloutState::Success);
            if !ok {
                return Err(ApiError::wait(
                    "upstream_missing",
                    5000,
                    format!(
                        "{} {} has not succeeded in {up} yet (promotion.requires: {up}); no host of {} may deploy it before",
                        r.service, r.version, r.environment
                    ),
                ));
            }
        }
        if r.policy.approval_required {
            let deadline = now + r.policy.approval_timeout_ms;
            self.rollouts
                .get_mut(k)
                .expect("exists")
                .approval_deadline_ms = Some(deadline);
            self.set_state(k, RolloutState::ApprovalRequired, None, "coordinator", now);
        } else {
            self.set_state(k, RolloutState::Running, None, "coordinator", now);
        }
        Ok(())
    }

    /// `POST /v1/leases/{id}/renew`.
    pub fn renew(&mut self, id: &str, now: u64) -> Result<Renewed, ApiError> {
        match self.leases.get_mut(id) {
            Some(l) if l.expires_at_ms > now => {
                // Renewals are not written: a restart gives every lease a fresh TTL anyway.
                l.expires_at_ms = now + self.lease_ttl_ms;
                Ok(Renewed {
                    expires_at_ms: l.expires_at_ms,
                })
            }
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
        let Some(lease) = self.leases.remove(id) else {
            return Err(ApiError::lease_lost(format!(
                "lease {id} is unknown, expired or already released; nothing was changed"
            )));
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
            match &req.message {
                Some(m) => format!("{outcome}: {m}"),
                None => outcome.to_string(),
            },
        );
        let Some(r) = self.rollouts.get_mut(&k) else {
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
            r.verdicts
                .insert(lease.host.clone(), format!("{}: {}", v.risk, v.summary));
        }
        let (state, failures, max) = (r.state, r.failed.len() as u32, r.policy.max_failures);
        self.save(&k);
        if let Some(v) = &req.verification {
            self.audit(
                now,
                &lease.host,
                "verification",
                &k,
                format!("risk {}: {}", v.risk, v.summary),
            );
        }
        match (lease.purpose, req.outcome) {
            (Purpose::Deploy, Outcome::Failure) if failures > max => {
                if matches!(state, RolloutState::Running | RolloutState::Verifying) {
                    self.fail(
                        &k,
                        format!(
                            "{failures} host(s) failed (max_failures {max}); last: {} ({})",
                            lease.host,
                            req.message.as_deref().unwrap_or("no message")
                        ),
                        now,
                    );
                }
            }
            (Purpose::Deploy, Outcome::Success)
                if req
                    .verification
                    .as_ref()
                    .is_some_and(|v| v.risk == "medium")
                    && matches!(state, RolloutState::Running | RolloutState::Verifying) =>
            {
                // The host kept the version but its metrics were not conclusive: a human
                // decides (`drover resume` or `drover abort`).
                self.set_state(
                    &k,
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
                    &k,
                    RolloutState::Failed,
                    Some(format!(
                        "revert failed on {}: {}; an operator is needed",
                        lease.host,
                        req.message.as_deref().unwrap_or("no message")
                    )),
                    "coordinator",
                    now,
                );
            }
            _ => {}
        }
        self.progress(&k, now);
        Ok(self.view_of(&k))
    }

    /// RUNNING/VERIFYING → FAILED → ROLLING_BACK.
    fn fail(&mut self, k: &str, why: String, now: u64) {
        self.set_state(k, RolloutState::Failed, Some(why), "coordinator", now);
        self.set_state(k, RolloutState::RollingBack, None, "coordinator", now);
        self.progress(k, now);
    }

    fn is_stale(&self, h: &Host, now: u64) -> bool {
        now.saturating_sub(h.last_seen_ms) > 3 * self.heartbeat_ms
    }

    /// The live hosts of `r`'s environment that run its service, whatever version their
    /// desired state names: a host that has not fetched the promoting commit yet still has to
    /// take the version, so the rollout is not over without it (and its failure still counts).
    fn targets(&self, r: &Rollout, now: u64) -> Vec<(&String, &ServiceReport)> {
        self.hosts
            .iter()
            .filter(|(_, h)| h.environment == r.environment && !self.is_stale(h, now))
            .filter_map(|(name, h)| {
                h.services
                    .iter()
                    .find(|s| s.service == r.service && s.desired.is_some())
                    .map(|s| (name, s))
            })
            .collect()
    }

    /// Hosts that deployed `r`'s version and still have to revert from it.
    fn to_revert(&self, r: &Rollout) -> Vec<String> {
        r.succeeded
            .iter()
            .filter(|h| !r.reverted.contains(*h))
            .filter(|h| {
                // A host whose report shows another version has left it already.
                self.hosts.get(*h).is_none_or(|host| {
                    host.services
                        .iter()
                        .find(|s| s.service == r.service)
                        .is_none_or(|s| s.actual.as_deref() == Some(r.version.as_str()))
                })
            })
            .cloned()
            .collect()
    }

    /// Moves `k` on when its hosts are done: RUNNING → VERIFYING → SUCCESS, ROLLING_BACK →
    /// ABORTED.
    fn progress(&mut self, k: &str, now: u64) {
        let Some(r) = self.rollouts.get(k) else {
            return;
        };
        let held = self.leases_of(k);
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
                    self.set_state(k, RolloutState::Verifying, None, "coordinator", now);
                    self.progress(k, now);
                }
            }
            RolloutState::Verifying => {
                // Every live host that deployed it has since reported it running healthy
                // (or has moved on to another version: it can no longer be checked).
                let on_it = |h: &String| {
                    self.hosts.get(h).is_some_and(|host| {
                        !self.is_stale(host, now)
                            && host.services.iter().any(|s| {
                                s.service == r.service
                                    && s.actual.as_deref() == Some(r.version.as_str())
                            })
                    })
                };
                let pending = r
                    .succeeded
                    .iter()
                    .filter(|h| !r.verified.contains(*h) && on_it(h))
                    .count();
                if pending == 0 && !r.verified.is_empty() && held == 0 {
                    let n = r.verified.len();
                    self.set_state(
                        k,
                        RolloutState::Success,
                        Some(format!("{n} host(s) run it healthy")),
                        "coordinator",
                        now,
                    );
                }
            }
            RolloutState::RollingBack if self.to_revert(r).is_empty() && held == 0 => {
                self.set_state(
                    k,
                    RolloutState::Aborted,
                    Some("rolled back".into()),
                    "coordinator",
                    now,
                );
            }
            _ => {}
        }
    }

    /// `POST /v1/hosts/{host}/heartbeat`.
    pub fn heartbeat(
        &mut self,
        host: &str,
        hb: &Heartbeat,
        now: u64,
    ) -> Result<HeartbeatReply, ApiError> {
        if !valid_name(host, 253) {
            return Err(ApiError::bad_request(format!("invalid host name `{host}`")));
        }
        let rec = Host {
            environment: hb.environment.clone(),
            labels: hb.labels.clone(),
            agent_version: hb.agent_version.clone(),
            services: hb.services.clone(),
            last_seen_ms: now,
        };
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
        let keys: Vec<String> = self
            .rollouts
            .values()
            .filter(|r| {
                r.environment == hb.environment
                    && !r.state.is_terminal()
                    && touched.contains(&r.service.as_str())
            })
            .map(Rollout::key)
            .collect();
        let mut actions = Vec::new();
        for k in keys {
            if changed {
                let r = self.rollouts.get_mut(&k).expect("listed");
                let healthy_on_it = rec.services.iter().any(|s| {
                    s.service == r.service
                        && s.actual.as_deref() == Some(r.version.as_str())
                        && s.healthy
                });
                if healthy_on_it
                    && r.succeeded.contains(host)
                    && r.verified.insert(host.to_string())
                {
                    self.save(&k);
                }
                self.progress(&k, now);
            }
            let r = &self.rollouts[&k];
            if r.state == RolloutState::RollingBack && self.to_revert(r).iter().any(|h| h == host) {
                actions.push(Action {
                    service: r.service.clone(),
                    action: "revert".into(),
                    version: r.version.clone(),
                    reason: format!(
                        "rollout {k} failed: {}",
                        r.reason.as_deref().unwrap_or("too many failures")
                    ),
                });
            }
        }
        Ok(HeartbeatReply {
            interval_ms: self.heartbeat_ms,
            actions,
        })
    }

    fn rollout_for_decision(
        &self,
        env: &str,
        service: &str,
        version: &str,
    ) -> Result<String, ApiError> {
        let k = key(env, service, version);
        match self.rollouts.get(&k) {
            None => Err(ApiError::not_found(format!(
                "no rollout {k}: it is created when the first host of {env} asks to deploy {service} {version}"
            ))),
            Some(r) if r.state != RolloutState::ApprovalRequired => Err(ApiError::conflict(
                format!("rollout {k} is {}, not waiting for approval", r.state),
            )),
            Some(_) => Ok(k),
        }
    }

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
        let k = self.rollout_for_decision(env, service, version)?;
        let approvers = self.rollouts[&k].policy.approvers.clone();
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
        let r = self.rollouts.get_mut(&k).expect("exists");
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
            self.set_state(&k, RolloutState::Approved, None, &who.name, now);
            self.set_state(&k, RolloutState::Running, None, &who.name, now);
        } else {
            self.set_state(
                &k,
                RolloutState::Aborted,
                Some("rejected".into()),
                &who.name,
                now,
            );
        }
        Ok(self.view_of(&k))
    }

    /// The newest rollout of (env, service) in one of `states`.
    fn newest(&self, env: &str, service: &str, states: &[RolloutState]) -> Option<String> {
        self.rollouts
            .values()
            .filter(|r| r.environment == env && r.service == service && states.contains(&r.state))
            .max_by_key(|r| r.created_at_ms)
            .map(Rollout::key)
    }

    /// `pause`, `resume` or `abort` by an operator.
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
                    Failed,
                    RollingBack,
                ],
                Aborted,
                "aborted",
            ),
            other => return Err(ApiError::not_found(format!("unknown operation `{other}`"))),
        };
        let Some(k) = self.newest(env, service, from) else {
            let open = self.newest(
                env,
                service,
                &[
                    Pending,
                    ApprovalRequired,
                    Approved,
                    Running,
                    Paused,
                    Verifying,
                    Failed,
                    RollingBack,
                ],
            );
            return Err(match open {
                Some(k) => ApiError::conflict(format!(
                    "cannot {verb} {k}: it is {}",
                    self.rollouts[&k].state
                )),
                None => ApiError::not_found(format!("{env}/{service} has no unfinished rollout")),
            });
        };
        self.set_state(
            &k,
            to,
            Some(format!("{done} by {}", who.name)),
            &who.name,
            now,
        );
        if to == Running {
            let r = &self.rollouts[&k];
            if r.failed.len() as u32 > r.policy.max_failures {
                let why = format!(
                    "{} host(s) failed (max_failures {})",
                    r.failed.len(),
                    r.policy.max_failures
                );
                self.fail(&k, why, now);
            }
        }
        self.progress(&k, now);
        Ok(self.view_of(&k))
    }

    /// Periodic work: expire leases, time out approvals, move rollouts on.
    pub fn tick(&mut self, now: u64) {
        let expired: Vec<Lease> = self
            .leases
            .values()
            .filter(|l| l.expires_at_ms <= now)
            .cloned()
            .collect();
        for l in expired {
            self.leases.remove(&l.id);
            self.changes.push(Change::LeaseGone(l.id.clone()));
            let k = key(&l.environment, &l.service, &l.version);
            tracing::warn!(lease = %l.id, host = %l.host, rollout = %k, "lease expired");
            self.audit(
                now,
                "coordinator",
                "lease_expired",
                &k,
                format!("lease {} of {} was not renewed", l.id, l.host),
            );
        }
        let timed_out: Vec<String> = self
            .rollouts
            .values()
            .filter(|r| {
                r.state == RolloutState::ApprovalRequired
                    && r.approval_deadline_ms.is_some_and(|d| d <= now)
            })
            .map(Rollout::key)
            .collect();
        for k in timed_out {
            let t = self.rollouts[&k].policy.approval_timeout_ms;
            self.set_state(
                &k,
                RolloutState::Aborted,
                Some(format!("approval timed out after {}s", t / 1000)),
                "coordinator",
                now,
            );
        }
        // Requests and heartbeats move rollouts on as they come; this sweep only catches
        // what time alone changes (hosts going stale), so it need not run often.
        if now.saturating_sub(self.last_sweep_ms) >= SWEEP_MS {
            self.last_sweep_ms = now;
            let open: Vec<String> = self
                .rollouts
                .values()
                .filter(|r| !r.state.is_terminal())
                .map(Rollout::key)
                .collect();
            for k in open {
                self.progress(&k, now);
            }
        }
    }

    /// `GET /v1/status`.
    pub fn status(&self, now: u64) -> Status {
        let mut rollouts: Vec<RolloutView> = self.rollouts.values().map(|r| self.view(r)).collect();
        rollouts.sort_by_key(|r| r.created_at_ms);
        Status {
            hosts: self
                .hosts
                .iter()
                .map(|(n, h)| HostView {
                    host: n.clone(),
                    environment: h.environment.clone(),
                    labels: h.labels.clone(),
                    agent_version: h.agent_version.clone(),
                    services: h.services.clone(),
                    last_seen_ms: h.last_seen_ms,
                    stale: self.is_stale(h, now),
                })
                .collect(),
            rollouts,
        }
    }

    /// Number of leases held (for metrics).
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Rollouts per state (for metrics).
    pub fn rollout_counts(&self) -> BTreeMap<RolloutState, usize> {
        let mut m = BTreeMap::new();
        for r in self.rollouts.values() {
            *m.entry(r.state).or_default() += 1;
        }
        m
    }

    /// Hosts known (for metrics).
    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

#[cfg(test)]
mod tests;
