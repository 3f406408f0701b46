//! The coordinator's state and every decision over it, as plain functions of (state, input,
//! `now`). Nothing here does I/O: each operation mutates the in-memory [`Core`] and queues the
//! [`Change`]s the actor then writes to the store in one transaction before answering.
//!
//! The desired state comes from Git ([`Core::apply_desired`], in `desired.rs`): each new
//! commit creates, supersedes or continues the rollouts of every (environment, service) with
//! the policy of that commit. Hosts then lease (`leases.rs`), heartbeat (`hosts.rs`, which also
//! moves rollouts through VERIFYING to SUCCESS), and people approve, pause, retry and roll back
//! (`ops.rs`).

mod desired;
mod hosts;
mod leases;
mod notices;
mod ops;

pub use notices::{MAX_FAILED, MAX_PENDING};

use std::collections::{BTreeMap, BTreeSet, HashMap};

use drover_desired::freeze::Window;
use serde::{Deserialize, Serialize};

use crate::auth::{Caller, cap};
use crate::rollout::transition;
use crate::wire::{
    AuditEntry, Chart, Decision, DesiredView, ErrorBody, ErrorKind, HostView, Lease, OverrideView,
    Policy, RefusedView, RolloutKind, RolloutState, RolloutView, ServiceReport, Status,
    TrafficPoint,
};

/// Hosts whose verdict samples a rollout keeps (the latest; each a few kilobytes).
pub const MAX_CHARTS: usize = 4;
/// Traffic weights a rollout keeps (the latest).
pub const MAX_TRAFFIC: usize = 64;

/// A rollout as stored: one attempt at bringing one version of a service to an environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Unique, increasing.
    #[serde(default)]
    pub id: u64,
    /// Environment.
    pub environment: String,
    /// Service.
    pub service: String,
    /// Version.
    pub version: String,
    /// A new version, or a return to one that succeeded here before.
    #[serde(default = "deploy_kind")]
    pub kind: RolloutKind,
    /// 1, plus one per `drover retry`.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// What started it.
    #[serde(default)]
    pub trigger: String,
    /// State.
    pub state: RolloutState,
    /// Policy, from Git at `commit`.
    pub policy: Policy,
    /// The desired-state commit that promoted the version.
    pub commit: String,
    /// That commit's time, from Git.
    pub commit_time_ms: u64,
    /// Hosts that deployed it.
    pub succeeded: BTreeSet<String>,
    /// Hosts whose deploy failed, or that reported it unhealthy while it was verified.
    pub failed: BTreeSet<String>,
    /// Hosts that reverted from it.
    pub reverted: BTreeSet<String>,
    /// Hosts that reported it running healthy, not holding a lease on it.
    #[serde(default)]
    pub verified: BTreeSet<String>,
    /// Metric verification verdicts reported with releases, by host.
    #[serde(default)]
    pub verdicts: BTreeMap<String, String>,
    /// The samples of the latest verdicts: at most [`MAX_CHARTS`] hosts, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub charts: Vec<Chart>,
    /// The traffic weights its ECS agents set: at most [`MAX_TRAFFIC`], oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficPoint>,
    /// Approval decision.
    pub decision: Option<Decision>,
    /// Why it is in its state.
    pub reason: Option<String>,
    /// When an unanswered approval times out.
    pub approval_deadline_ms: Option<u64>,
    /// Created.
    pub created_at_ms: u64,
    /// Last change (of state or hosts).
    pub updated_at_ms: u64,
    /// Services of the environment (with the version the commit pins) whose rollouts must
    /// have succeeded before this one starts (`after:` in Git).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub after: BTreeMap<String, String>,
    /// The admin who let it start during a freeze (`drover approve --during-freeze`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_lifted: Option<Decision>,
    /// The decision at the gate after its first batch (`approval.after_first_batch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_batch: Option<Decision>,
    /// The step (e.g. `10%`) at which the lease holder waits for an approval (an ECS step
    /// with `approval: true`), while it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_gate: Option<String>,
    /// The decisions at step gates, by step.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub step_decisions: BTreeMap<String, Decision>,
    /// A job (`kind: job`): one host runs it, once; it succeeds or fails with that host's
    /// release, and nothing is reverted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub job: bool,
}

fn deploy_kind() -> RolloutKind {
    RolloutKind::Deploy
}

fn first_attempt() -> u32 {
    1
}

impl Rollout {
    /// `env/service/version`: the subject of its audit entries.
    pub fn key(&self) -> String {
        key(&self.environment, &self.service, &self.version)
    }

    /// Whether it belongs to (env, service).
    fn of(&self, env: &str, service: &str) -> bool {
        self.environment == env && self.service == service
    }

    /// Whether it must still stop for an approval after its first batch.
    fn gate_ahead(&self) -> bool {
        self.policy.approve_after_first_batch
            && self.first_batch.is_none()
            && self.kind == RolloutKind::Deploy
    }

    /// Whether it waits at the gate after its first batch (not the one before its start).
    fn at_batch_gate(&self) -> bool {
        self.state == RolloutState::ApprovalRequired
            && self.gate_ahead()
            && !self.succeeded.is_empty()
    }

    /// Who may approve it, in words.
    fn approvers(&self) -> String {
        if self.policy.approvers.is_empty() {
            "any approver".to_string()
        } else {
            self.policy.approvers.join(", ")
        }
    }
}

/// How often `tick` re-checks every open rollout.
const SWEEP_MS: u64 = 5_000;

/// A rollout whose hosts are slow shows what it waits for after this many heartbeat intervals
/// (hosts go stale, and are no longer waited for, after 3).
const WAIT_SHOWN_AFTER: u64 = 2;

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
    /// The desired-state commit it last reported.
    #[serde(default)]
    pub commit: Option<String>,
    /// Last heartbeat (kept in memory; a restart counts as a heartbeat).
    #[serde(skip)]
    pub last_seen_ms: u64,
}

impl Host {
    fn report(&self, service: &str) -> Option<&ServiceReport> {
        self.services.iter().find(|s| s.service == service)
    }
}

/// What one environment wants, as read from one commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvDesired {
    /// Its policy at that commit.
    pub policy: Policy,
    /// The desired version of each pinned service.
    pub services: BTreeMap<String, String>,
    /// The services each service comes after (`after:`), for those that name any.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub after: BTreeMap<String, Vec<String>>,
    /// Its freeze windows (`freeze:`): while one is open, no new deploy starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze: Vec<Window>,
    /// The pinned services that are jobs (`kind: job`): run once, on one host.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub jobs: BTreeSet<String>,
    /// Who is told what (`notify:`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<crate::notify::Route>,
}

impl EnvDesired {
    /// What `service` comes after, each with the version this commit pins.
    pub fn after_of(&self, service: &str) -> BTreeMap<String, String> {
        self.after
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|a| self.services.get(a).map(|v| (a.clone(), v.clone())))
            .collect()
    }
}

/// The desired state the coordinator follows: the last valid commit of the branch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// The commit.
    pub commit: String,
    /// Its committer time.
    pub commit_time_ms: u64,
    /// When it was read.
    pub fetched_at_ms: u64,
    /// Every environment.
    pub environments: BTreeMap<String, EnvDesired>,
}

impl Desired {
    /// The version Git asks for in (env, service).
    pub fn version(&self, env: &str, service: &str) -> Option<&str> {
        self.environments
            .get(env)
            .and_then(|e| e.services.get(service))
            .map(String::as_str)
    }
}

/// A commit that does not validate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// The commit.
    pub commit: String,
    /// Every problem found.
    pub problems: Vec<String>,
    /// When it was read.
    pub at_ms: u64,
}

/// A service held on `to` by `drover rollback` while Git asks for `from`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    /// Environment.
    pub environment: String,
    /// Service.
    pub service: String,
    /// The version Git asks for.
    pub from: String,
    /// The version run instead.
    pub to: String,
    /// The commit that promoted `to` (where its definition is read from).
    pub commit: String,
    /// Who.
    pub by: String,
    /// When.
    pub at_ms: u64,
}

impl Override {
    /// What `drover status` says of it.
    pub fn note(&self) -> String {
        format!(
            "rolled back from {} to {} by {}; Git still asks for {}",
            self.from, self.to, self.by, self.from
        )
    }
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
    /// The desired state followed now.
    Desired(Box<Desired>),
    /// The refused branch tip, or none.
    Refused(Option<Refused>),
    /// Set or end the override of (environment, service).
    Override(String, String, Option<Override>),
    /// Queue or update a notification delivery.
    Outbox(Box<crate::notify::Delivery>),
    /// A delivery is done (delivered, or forgotten).
    OutboxGone(String),
    /// Open, update or close (none) an incident, by key.
    Incident(String, Option<Box<crate::notify::Incident>>),
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
    /// The desired state last followed.
    pub desired: Option<Desired>,
    /// The refused tip.
    pub refused: Option<Refused>,
    /// Overrides.
    pub overrides: Vec<Override>,
    /// Notification deliveries waiting or given up.
    pub outbox: Vec<crate::notify::Delivery>,
    /// Open incidents (PagerDuty alerts, Jira issues).
    pub incidents: Vec<crate::notify::Incident>,
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
    /// An error of any status and kind.
    pub fn new(status: u16, kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                kind,
                message: message.into(),
                reason: None,
                retry_after_ms: None,
            },
        }
    }
    /// 400 bad_request.
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(400, ErrorKind::BadRequest, m)
    }
    /// 403 forbidden.
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        ApiError::new(403, ErrorKind::Forbidden, m)
    }
    /// 404 not_found.
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(404, ErrorKind::NotFound, m)
    }
    /// 409 conflict.
    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(409, ErrorKind::Conflict, m)
    }
    /// 410 lease_lost.
    pub fn lease_lost(m: impl Into<String>) -> ApiError {
        ApiError::new(410, ErrorKind::LeaseLost, m)
    }
    /// 503 unavailable: the coordinator cannot store changes now (disk full, I/O error);
    /// reads still work, retry later.
    pub fn unavailable(retry_after_ms: u64, m: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(503, ErrorKind::Unavailable, m);
        e.body.retry_after_ms = Some(retry_after_ms);
        e
    }
    /// 429 rate_limited.
    pub fn rate_limited(retry_after_ms: u64, m: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(429, ErrorKind::RateLimited, m);
        e.body.retry_after_ms = Some(retry_after_ms);
        e
    }
    /// 500 internal.
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(500, ErrorKind::Internal, m)
    }
    /// 409 wait.
    pub fn wait(reason: &str, retry_after_ms: u64, m: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(409, ErrorKind::Wait, m);
        e.body.reason = Some(reason.into());
        e.body.retry_after_ms = Some(retry_after_ms);
        e
    }
    /// 422 rejected.
    pub fn rejected(reason: &str, m: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(422, ErrorKind::Rejected, m);
        e.body.reason = Some(reason.into());
        e
    }
}

/// The coordinator's state.
#[derive(Debug)]
pub struct Core {
    rollouts: BTreeMap<u64, Rollout>,
    next_rollout: u64,
    leases: HashMap<String, Lease>,
    /// Leases that expired unrenewed, kept for a day so their holder's late release counts.
    expired: HashMap<String, Lease>,
    hosts: BTreeMap<String, Host>,
    /// The most hosts the coordinator tracks (heartbeats of new hosts beyond it get 409).
    pub max_hosts: usize,
    desired: Option<Desired>,
    /// The last commit fetched (valid or refused).
    tip: Option<String>,
    refused: Option<Refused>,
    git_error: Option<String>,
    overrides: BTreeMap<(String, String), Override>,
    /// Lease time to live.
    pub lease_ttl_ms: u64,
    /// Heartbeat interval asked of agents.
    pub heartbeat_ms: u64,
    next_audit: u64,
    changes: Vec<Change>,
    lease_counter: u64,
    /// When `tick` last looked at every open rollout.
    last_sweep_ms: u64,
    /// A host knows of a commit this coordinator has not read: fetch now.
    wake_git: bool,
    /// When a fetch was last asked for because of a host's commit (at most one a second).
    last_wake_ms: u64,
    /// Commits read lately (the tips followed): a host reporting one of them is only behind.
    seen: std::collections::VecDeque<String>,
    /// Notification channels of coordinator.yaml, by name.
    pub channels: BTreeMap<String, crate::notify::Kind>,
    /// Deliveries waiting or given up, by id.
    outbox: BTreeMap<String, crate::notify::Delivery>,
    /// Open incidents, by key.
    incidents: BTreeMap<String, crate::notify::Incident>,
    /// Deliveries delivered since start.
    stats_delivered: u64,
    /// Deliveries given up since start.
    stats_gave_up: u64,
    /// Transitions the decisions asked for that the matrix refused (a bug): the tests check
    /// there are none.
    #[cfg(test)]
    illegal: Vec<String>,
}

/// How long an expired lease is remembered, so that its holder's late release still counts.
const EXPIRED_KEPT_MS: u64 = 24 * 3600 * 1000;
/// At most this many expired leases are remembered (the oldest are forgotten first).
const EXPIRED_KEPT: usize = 10_000;
/// Default for [`Core::max_hosts`].
pub const DEFAULT_MAX_HOSTS: usize = 100_000;

/// How many recent tips the coordinator remembers.
const SEEN_COMMITS: usize = 256;

/// Whether `s` is a name drover accepts (hosts, environments, services, versions): letters,
/// digits, `.`, `-`, `_`, `+`, at most `max` bytes.
pub fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'))
}

/// `400` for the first of (what, value, max length) that is not a valid name.
fn check_names(names: &[(&str, &str, usize)]) -> Result<(), ApiError> {
    for (what, v, max) in names {
        if !valid_name(v, *max) {
            return Err(ApiError::bad_request(format!(
                "invalid {what} `{}`: letters, digits, `.`, `-`, `_`, `+`, at most {max}",
                v.chars().take(80).collect::<String>()
            )));
        }
    }
    Ok(())
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

impl Core {
    /// The state from a store snapshot at `now`. Held leases get a fresh TTL, so a restart of
    /// the coordinator loses none; hosts count as just seen.
    pub fn new(snap: Snapshot, lease_ttl_ms: u64, heartbeat_ms: u64, now: u64) -> Core {
        let next_rollout = snap.rollouts.iter().map(|r| r.id).max().unwrap_or(0) + 1;
        let mut core = Core {
            rollouts: snap.rollouts.into_iter().map(|r| (r.id, r)).collect(),
            next_rollout,
            leases: HashMap::new(),
            expired: HashMap::new(),
            max_hosts: DEFAULT_MAX_HOSTS,
            hosts: snap
                .hosts
                .into_iter()
                .map(|(n, mut h)| {
                    h.last_seen_ms = now;
                    (n, h)
                })
                .collect(),
            tip: snap
                .refused
                .as_ref()
                .map(|r| r.commit.clone())
                .or_else(|| snap.desired.as_ref().map(|d| d.commit.clone())),
            desired: snap.desired,
            refused: snap.refused,
            git_error: None,
            overrides: snap
                .overrides
                .into_iter()
                .map(|o| ((o.environment.clone(), o.service.clone()), o))
                .collect(),
            lease_ttl_ms,
            heartbeat_ms,
            next_audit: snap.last_audit + 1,
            changes: Vec::new(),
            lease_counter: 0,
            last_sweep_ms: 0,
            wake_git: false,
            last_wake_ms: 0,
            seen: std::collections::VecDeque::new(),
            channels: BTreeMap::new(),
            outbox: snap.outbox.into_iter().map(|d| (d.id.clone(), d)).collect(),
            incidents: snap.incidents.into_iter().map(|i| (i.key(), i)).collect(),
            stats_delivered: 0,
            stats_gave_up: 0,
            #[cfg(test)]
            illegal: Vec::new(),
        };
        for mut l in snap.leases {
            if l.expired_at_ms.is_some() {
                core.expired.insert(l.id.clone(), l);
                continue;
            }
            l.expires_at_ms = l.expires_at_ms.max(now.saturating_add(lease_ttl_ms));
            l.ttl_ms = lease_ttl_ms;
            core.leases.insert(l.id.clone(), l);
        }
        core
    }

    /// Takes the changes queued since the last call.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// Whether a fetch of the repo was asked for since the last call.
    pub fn take_wake(&mut self) -> bool {
        std::mem::take(&mut self.wake_git)
    }

    /// A host read `commit`: if this coordinator has not seen it, it may be newer than the
    /// tip it follows, so fetch (at most once a second, whatever hosts report).
    fn host_read(&mut self, commit: &str, now: u64) {
        if self.tip.as_deref() == Some(commit) || self.seen.iter().any(|c| c == commit) {
            return;
        }
        if now.saturating_sub(self.last_wake_ms) >= 1000 {
            self.last_wake_ms = now;
            self.wake_git = true;
        }
    }

    /// Remembers a tip read from Git.
    fn saw(&mut self, commit: &str) {
        if !self.seen.iter().any(|c| c == commit) {
            if self.seen.len() == SEEN_COMMITS {
                self.seen.pop_front();
            }
            self.seen.push_back(commit.to_string());
        }
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

    /// Records a denied call by a known token, its text capped: a token holder cannot grow
    /// the audit by more than a few hundred bytes a call.
    pub fn denied(&mut self, now: u64, who: &str, what: &str, why: &str) {
        self.audit(now, &cap(who, 64), "denied", &cap(what, 128), cap(why, 256));
    }

    /// Lease `id`, held or expired (an expired one's holder may still release or report).
    pub(super) fn lease_or_expired(&self, id: &str) -> Option<&Lease> {
        self.leases.get(id).or_else(|| self.expired.get(id))
    }

    /// Checks that `who` may act on lease `id` (live or expired): a host-bound token only on
    /// its own host's leases. A refusal is audited (without the lease id, its holder's secret).
    pub fn check_holder(
        &mut self,
        id: &str,
        who: &Caller,
        what: &str,
        now: u64,
    ) -> Result<(), ApiError> {
        let holder = self.lease_or_expired(id).map(|l| l.host.clone());
        match holder {
            Some(h) => self.acting_as(who, &h, what, now),
            None => Ok(()),
        }
    }

    /// Whether `who` may act as `host`; a refusal is 403 and audited. Every host-identity
    /// decision (heartbeat, acquire, renew, release) goes through here.
    pub(super) fn acting_as(
        &mut self,
        who: &Caller,
        host: &str,
        what: &str,
        now: u64,
    ) -> Result<(), ApiError> {
        if who.may_act_as(host) {
            return Ok(());
        }
        let why = who.not_as(host);
        self.denied(now, &who.name, what, &why);
        Err(ApiError::forbidden(why))
    }

    /// Lease expiry times (kept across a reload of the state from the store, which would
    /// otherwise give every lease a fresh TTL).
    pub fn lease_expiries(&self) -> HashMap<String, u64> {
        self.leases
            .values()
            .map(|l| (l.id.clone(), l.expires_at_ms))
            .collect()
    }

    /// Puts back expiry times taken by [`Core::lease_expiries`].
    pub fn keep_expiries(&mut self, expiries: &HashMap<String, u64>) {
        for l in self.leases.values_mut() {
            if let Some(&at) = expiries.get(&l.id) {
                l.expires_at_ms = at;
            }
        }
    }

    fn save(&mut self, id: u64) {
        if let Some(r) = self.rollouts.get(&id) {
            self.changes.push(Change::Rollout(Box::new(r.clone())));
        }
    }

    /// Moves rollout `id` to `to`, checking the matrix and auditing.
    fn set_state(
        &mut self,
        id: u64,
        to: RolloutState,
        reason: Option<String>,
        actor: &str,
        now: u64,
    ) {
        let Some(r) = self.rollouts.get_mut(&id) else {
            return;
        };
        let from = r.state;
        if let Err(e) = transition(from, to) {
            // The decisions only ask for legal moves; this is a bug, not user input.
            tracing::error!(error = %e, rollout = id, "illegal transition refused");
            #[cfg(test)]
            self.illegal.push(format!("rollout {id}: {e}"));
            return;
        }
        r.state = to;
        r.updated_at_ms = now;
        if to != RolloutState::ApprovalRequired {
            // A step gate lasts while the rollout waits at it.
            r.step_gate = None;
        }
        if reason.is_some() {
            r.reason = reason.clone();
        }
        let subject = r.key();
        let detail = match &reason {
            Some(why) => format!("{from} → {to}: {why}"),
            None => format!("{from} → {to}"),
        };
        tracing::info!(rollout = %subject, id, %from, %to, reason = reason.as_deref().unwrap_or(""), "rollout transition");
        self.audit(now, actor, "transition", &subject, detail);
        self.save(id);
        if let Some(event) = Core::event_of(from, to) {
            self.notify(id, event, None, now);
        }
        if to == RolloutState::Success {
            // A version that succeeded here may unblock environments that promote from here.
            self.advance_pending(now);
        }
    }

    /// Leases held on rollout `id`.
    fn leases_of(&self, id: u64) -> usize {
        self.leases.values().filter(|l| l.rollout == id).count()
    }

    /// Leases held on any rollout of (env, service): the slots `max_parallel` limits, so a
    /// newer rollout never runs alongside the hosts still finishing a superseded one.
    fn leases_of_service(&self, env: &str, service: &str) -> usize {
        self.leases
            .values()
            .filter(|l| l.environment == env && l.service == service)
            .count()
    }

    /// The newest rollout of (env, service), of `version` if given.
    fn newest(&self, env: &str, service: &str, version: Option<&str>) -> Option<u64> {
        self.rollouts
            .values()
            .rev()
            .find(|r| r.of(env, service) && version.is_none_or(|v| r.version == v))
            .map(|r| r.id)
    }

    /// The version hosts of (env, service) must run: an override's, else Git's.
    fn wanted(&self, env: &str, service: &str) -> Option<&str> {
        match self.overrides.get(&(env.to_string(), service.to_string())) {
            Some(o) => Some(&o.to),
            None => self.desired.as_ref()?.version(env, service),
        }
    }

    fn is_stale(&self, h: &Host, now: u64) -> bool {
        now.saturating_sub(h.last_seen_ms) > self.heartbeat_ms.saturating_mul(3)
    }

    fn view(&self, r: &Rollout, now: u64) -> RolloutView {
        RolloutView {
            id: r.id,
            environment: r.environment.clone(),
            service: r.service.clone(),
            version: r.version.clone(),
            kind: r.kind,
            attempt: r.attempt,
            trigger: r.trigger.clone(),
            state: r.state,
            policy: r.policy.clone(),
            commit: r.commit.clone(),
            commit_time_ms: r.commit_time_ms,
            leases: self.leases_of(r.id) as u32,
            succeeded: r.succeeded.iter().cloned().collect(),
            failed: r.failed.iter().cloned().collect(),
            reverted: r.reverted.iter().cloned().collect(),
            verified: r.verified.iter().cloned().collect(),
            verdicts: r.verdicts.clone(),
            charts: Vec::new(),
            traffic: r.traffic.clone(),
            decision: r.decision.clone(),
            reason: r.reason.clone(),
            waiting_for: self.waiting_for(r, now),
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            job: r.job,
        }
    }

    fn view_of(&self, id: u64, now: u64) -> RolloutView {
        self.view(&self.rollouts[&id], now)
    }

    /// One rollout in full (its verdicts' samples too): `GET /v1/rollouts/{id}`.
    pub fn rollout(&self, id: u64, now: u64) -> Option<RolloutView> {
        let r = self.rollouts.get(&id)?;
        let mut v = self.view(r, now);
        v.charts = r.charts.clone();
        Some(v)
    }

    /// Periodic work: expire leases, time out approvals, move rollouts on.
    pub fn tick(&mut self, now: u64) {
        let expired: Vec<Lease> = self
            .leases
            .values()
            .filter(|l| l.expires_at_ms <= now)
            .cloned()
            .collect();
        for mut l in expired {
            self.leases.remove(&l.id);
            // Kept (as expired) so the holder's late release still counts.
            l.expired_at_ms = Some(now);
            self.changes.push(Change::Lease(l.clone()));
            let k = key(&l.environment, &l.service, &l.version);
            tracing::warn!(host = %l.host, rollout = %k, "lease expired");
            self.audit(
                now,
                "coordinator",
                "lease_expired",
                &k,
                format!(
                    "lease of {} was not renewed; its slot is given away, its outcome still counts when it comes",
                    l.host
                ),
            );
            self.expired.insert(l.id.clone(), l);
        }
        let timed_out: Vec<u64> = self
            .rollouts
            .values()
            .filter(|r| {
                r.state == RolloutState::ApprovalRequired
                    && r.approval_deadline_ms.is_some_and(|d| d <= now)
            })
            .map(|r| r.id)
            .collect();
        for id in timed_out {
            let r = &self.rollouts[&id];
            let t = r.policy.approval_timeout_ms / 1000;
            if let Some(step) = &r.step_gate {
                // Traffic is split: nobody said go on, so it goes back.
                let why = format!("the approval at {step} timed out after {t}s");
                self.fail(id, why, now);
            } else if r.at_batch_gate() {
                // The first batch runs the new version: nobody said go on, so it goes back.
                self.fail(
                    id,
                    format!("the approval after the first batch timed out after {t}s"),
                    now,
                );
            } else {
                self.set_state(
                    id,
                    RolloutState::Aborted,
                    Some(format!("approval timed out after {t}s")),
                    "coordinator",
                    now,
                );
            }
        }
        // Requests and heartbeats move rollouts on as they come; this sweep only catches
        // what time alone changes (hosts going stale), so it need not run often.
        if now.saturating_sub(self.last_sweep_ms) >= SWEEP_MS {
            self.last_sweep_ms = now;
            self.forget_expired(now);
            self.advance_pending(now);
            let open: Vec<u64> = self
                .rollouts
                .values()
                .filter(|r| !r.state.is_terminal())
                .map(|r| r.id)
                .collect();
            for id in open {
                self.progress(id, now);
            }
        }
    }

    /// Forgets expired leases older than a day, and the oldest beyond [`EXPIRED_KEPT`].
    fn forget_expired(&mut self, now: u64) {
        let mut old: Vec<(u64, String)> = self
            .expired
            .values()
            .map(|l| (l.expired_at_ms.unwrap_or(0), l.id.clone()))
            .collect();
        old.sort_unstable();
        let over = old.len().saturating_sub(EXPIRED_KEPT);
        for (i, (at, id)) in old.into_iter().enumerate() {
            if i < over || now.saturating_sub(at) > EXPIRED_KEPT_MS {
                if let Some(l) = self.expired.remove(&id)
                    && self.rollouts.get(&l.rollout).is_some_and(|r| {
                        r.job && matches!(r.state, RolloutState::Running | RolloutState::Verifying)
                    })
                {
                    // No outcome will come any more; running it elsewhere is for a person
                    // to decide (it may have run).
                    let why = format!(
                        "no outcome came from {} after its lease expired: the job may or may not have run; drover retry {} {} runs it again",
                        l.host, l.environment, l.service
                    );
                    self.set_state(
                        l.rollout,
                        RolloutState::Failed,
                        Some(why),
                        "coordinator",
                        now,
                    );
                }
                self.changes.push(Change::LeaseGone(id));
            } else {
                break;
            }
        }
    }

    /// `GET /v1/status`.
    pub fn status(&self, now: u64) -> Status {
        Status {
            desired: self.desired.as_ref().map(|d| DesiredView {
                commit: d.commit.clone(),
                commit_time_ms: d.commit_time_ms,
                fetched_at_ms: d.fetched_at_ms,
            }),
            refused: self.refused.as_ref().map(|r| RefusedView {
                commit: r.commit.clone(),
                problems: r.problems.clone(),
                at_ms: r.at_ms,
            }),
            git_error: self.git_error.clone(),
            overrides: self
                .overrides
                .values()
                .map(|o| OverrideView {
                    environment: o.environment.clone(),
                    service: o.service.clone(),
                    from: o.from.clone(),
                    to: o.to.clone(),
                    by: o.by.clone(),
                    at_ms: o.at_ms,
                })
                .collect(),
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
            rollouts: self.rollouts.values().map(|r| self.view(r, now)).collect(),
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

#[cfg(test)]
mod tests;
