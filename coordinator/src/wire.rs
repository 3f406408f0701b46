//! The protocol's types (docs/protocol.md), shared by the server, the agent and the CLI.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The protocol version, sent in the `Drover-Protocol` header.
pub const PROTOCOL: &str = "1";

/// The header carrying [`PROTOCOL`].
pub const PROTOCOL_HEADER: &str = "Drover-Protocol";

/// A rollout's state (docs/protocol.md, "Rollouts").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RolloutState {
    /// Created; waiting for its promotion rule.
    Pending,
    /// Waiting for an approver.
    ApprovalRequired,
    /// Approved (moves to RUNNING at once).
    Approved,
    /// Hosts are deploying.
    Running,
    /// Stopped by an operator; no new leases.
    Paused,
    /// Every host deployed; confirming they run healthy.
    Verifying,
    /// Done.
    Success,
    /// Too many failures.
    Failed,
    /// Hosts that deployed the version are reverting.
    RollingBack,
    /// Stopped for good: rejected, timed out, superseded, aborted by an operator, or rolled back.
    Aborted,
}

impl RolloutState {
    /// Every state.
    pub const ALL: [RolloutState; 10] = [
        RolloutState::Pending,
        RolloutState::ApprovalRequired,
        RolloutState::Approved,
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Verifying,
        RolloutState::Success,
        RolloutState::Failed,
        RolloutState::RollingBack,
        RolloutState::Aborted,
    ];

    /// Whether the rollout is over (SUCCESS or ABORTED).
    pub fn is_terminal(self) -> bool {
        matches!(self, RolloutState::Success | RolloutState::Aborted)
    }

    /// The state's name as written in the protocol.
    pub fn name(self) -> &'static str {
        match self {
            RolloutState::Pending => "PENDING",
            RolloutState::ApprovalRequired => "APPROVAL_REQUIRED",
            RolloutState::Approved => "APPROVED",
            RolloutState::Running => "RUNNING",
            RolloutState::Paused => "PAUSED",
            RolloutState::Verifying => "VERIFYING",
            RolloutState::Success => "SUCCESS",
            RolloutState::Failed => "FAILED",
            RolloutState::RollingBack => "ROLLING_BACK",
            RolloutState::Aborted => "ABORTED",
        }
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An environment's rollout policy, as the coordinator read it from Git at the commit that
/// promoted the version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Hosts deploying at once.
    pub max_parallel: u32,
    /// Failures tolerated before the rollout fails.
    pub max_failures: u32,
    /// Whether an approval is needed.
    pub approval_required: bool,
    /// Groups whose approvers may approve (empty: any approver).
    #[serde(default)]
    pub approvers: Vec<String>,
    /// Unanswered approvals abort after this long.
    pub approval_timeout_ms: u64,
    /// Environment the version must have succeeded in first.
    #[serde(default)]
    pub promotion_requires: Option<String>,
    /// Whether a return to a version that succeeded here before (a `git revert`) waits for
    /// an approval too (`approval.rollbacks: required`).
    #[serde(default)]
    pub rollbacks_need_approval: bool,
    /// Whether a deploy stops for an approval once its first batch (`max_parallel` hosts)
    /// has succeeded (`approval.after_first_batch`).
    #[serde(default)]
    pub approve_after_first_batch: bool,
}

/// Why a rollout exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutKind {
    /// A version new to the environment: promotion rule and approval apply.
    Deploy,
    /// A return to a version that succeeded in the environment before (`git revert`, or
    /// `drover rollback`): it starts at once.
    Rollback,
}

/// Why a lease is wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Deploy the rollout's version.
    Deploy,
    /// Go back from the rollout's (failed) version.
    Revert,
}

/// `POST /v1/leases`. The coordinator knows the version each environment wants and its
/// policy from Git; the host says what it asks for and at which commit it read it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireRequest {
    /// The host.
    pub host: String,
    /// Its environment.
    pub environment: String,
    /// The service.
    pub service: String,
    /// The version.
    pub version: String,
    /// Deploy or revert.
    pub purpose: Purpose,
    /// The desired-state commit the host read (a coordinator that has not seen it fetches).
    pub commit: String,
}

/// A granted lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Its id.
    pub id: String,
    /// The host holding it.
    pub host: String,
    /// Environment.
    pub environment: String,
    /// Service.
    pub service: String,
    /// Version.
    pub version: String,
    /// Deploy or revert.
    pub purpose: Purpose,
    /// Its time to live; renew every third of it.
    pub ttl_ms: u64,
    /// When it expires unless renewed.
    pub expires_at_ms: u64,
    /// The id of the rollout it belongs to.
    #[serde(default)]
    pub rollout: u64,
    /// When it expired unrenewed (the slot was given away; the holder's late release still
    /// counts). Absent while it is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at_ms: Option<u64>,
}

/// A rollout as shown to clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutView {
    /// Its id (unique, increasing).
    #[serde(default)]
    pub id: u64,
    /// Environment.
    pub environment: String,
    /// Service.
    pub service: String,
    /// Version.
    pub version: String,
    /// A new version, or a return to one that succeeded before.
    #[serde(default = "deploy")]
    pub kind: RolloutKind,
    /// 1, then one more for each `drover retry`.
    #[serde(default = "first")]
    pub attempt: u32,
    /// What started it (`commit 3f9c…`, `retry by ops`, `rollback by alice from 2.0.0`).
    #[serde(default)]
    pub trigger: String,
    /// State.
    pub state: RolloutState,
    /// Policy, from Git at `commit`.
    pub policy: Policy,
    /// The desired-state commit that promoted the version.
    pub commit: String,
    /// That commit's time (committer time, from Git).
    #[serde(default)]
    pub commit_time_ms: u64,
    /// Leases held now.
    pub leases: u32,
    /// Hosts that deployed it successfully.
    pub succeeded: Vec<String>,
    /// Hosts whose deploy failed (or that reported it unhealthy while verifying).
    pub failed: Vec<String>,
    /// Hosts that reverted from it.
    pub reverted: Vec<String>,
    /// Hosts that reported it running healthy after deploying it.
    #[serde(default)]
    pub verified: Vec<String>,
    /// Metric verification verdicts, by host.
    #[serde(default)]
    pub verdicts: BTreeMap<String, String>,
    /// The samples of the latest verdicts (a few hosts): only in `GET /v1/rollouts/{id}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub charts: Vec<Chart>,
    /// The traffic weights its ECS agents set, oldest first (at most 64).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficPoint>,
    /// Who approved or rejected, and when.
    #[serde(default)]
    pub decision: Option<Decision>,
    /// Why it is in its state (failure, abort reason), if anything to say.
    #[serde(default)]
    pub reason: Option<String>,
    /// What an unfinished rollout waits for (hosts, approval, upstream), when it has waited a
    /// while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// Created.
    pub created_at_ms: u64,
    /// Last change.
    pub updated_at_ms: u64,
    /// A job (`kind: job`): one host runs it once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub job: bool,
}

fn deploy() -> RolloutKind {
    RolloutKind::Deploy
}

fn first() -> u32 {
    1
}

/// An approval decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Approved (true) or rejected.
    pub approved: bool,
    /// Token name of the approver.
    pub by: String,
    /// When.
    pub at_ms: u64,
}

/// `200` answer to an acquire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Granted {
    /// The lease.
    pub lease: Lease,
    /// Its rollout.
    pub rollout: RolloutView,
}

/// `POST /v1/leases/{id}/renew` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewed {
    /// New expiry.
    pub expires_at_ms: u64,
}

/// `GET /v1/tip` answer: the branch tip the coordinator last fetched (none before its first
/// fetch).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tip {
    /// The commit id.
    pub commit: Option<String>,
}

/// How a leased deploy (or revert) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It runs and passed its checks.
    Success,
    /// It failed (and the host rolled back).
    Failure,
}

/// `POST /v1/leases/{id}/release`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// How it ended.
    pub outcome: Outcome,
    /// Details (the error).
    #[serde(default)]
    pub message: Option<String>,
    /// The metric verification of the host, if it ran one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
}

/// `POST /v1/leases/{id}/gate`: the holder has reached a step that waits for an approval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateRequest {
    /// The step, e.g. `10%` (1 to 32 printable ASCII characters).
    pub step: String,
}

/// How risky a host's metric verification found the new version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    /// Go on.
    Low,
    /// Inconclusive or marginal: the rollout pauses for a human.
    Medium,
    /// The host rolled back.
    High,
    /// A risk this version does not know (from a newer agent); recorded, acted on as low.
    #[serde(other)]
    Other,
}

impl fmt::Display for Risk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Risk::Low => "low",
            Risk::Medium => "medium",
            Risk::High => "high",
            Risk::Other => "other",
        })
    }
}

/// A host's metric verification verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verification {
    /// A medium risk on a successful deploy pauses the rollout.
    pub risk: Risk,
    /// Per-metric medians, p-values and judgements, in one line.
    pub summary: String,
    /// Each metric's samples (for the dashboard's charts): at most [`MAX_SERIES`] metrics of
    /// at most [`MAX_POINTS`] finite samples a side. Older coordinators refuse the field; the
    /// agent then sends the release again without it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricSeries>,
}

/// Most metrics charted per verdict.
pub const MAX_SERIES: usize = 8;
/// Most samples per side of a charted metric (agents downsample longer windows).
pub const MAX_POINTS: usize = 120;

/// One metric of a verdict, with the samples it was judged on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSeries {
    /// Metric name (1 to 64 characters, no control characters).
    pub name: String,
    /// `pass`, `marginal`, `fail` or `inconclusive`.
    pub judgement: String,
    /// Median of the new version's samples.
    #[serde(default)]
    pub median: Option<f64>,
    /// Median of the baseline's samples.
    #[serde(default)]
    pub baseline_median: Option<f64>,
    /// Mann-Whitney p-value of new against baseline.
    #[serde(default)]
    pub p_value: Option<f64>,
    /// The new version's samples, oldest first.
    #[serde(default)]
    pub samples: Vec<f64>,
    /// The baseline's samples, oldest first.
    #[serde(default)]
    pub baseline: Vec<f64>,
}

// Every number in a series is finite (checked where a series is taken in), so equality is
// an equivalence.
impl Eq for MetricSeries {}

/// `POST /v1/leases/{id}/traffic`: the holder (an ECS agent) has set the new side's share of
/// the load balancer's traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficRequest {
    /// The new side's weight, 0 to 100.
    pub percent: u8,
}

/// A traffic weight an ECS agent set, as a rollout keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficPoint {
    /// When it was reported.
    pub at_ms: u64,
    /// The agent (its host name).
    pub host: String,
    /// The new side's weight, 0 to 100.
    pub percent: u8,
}

/// A host's verdict with its metrics' samples.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chart {
    /// The host.
    pub host: String,
    /// When the verdict was reported.
    pub at_ms: u64,
    /// `low`, `medium` or `high`.
    pub risk: Risk,
    /// Its metrics.
    pub metrics: Vec<MetricSeries>,
}

/// An answer carrying a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutReply {
    /// The rollout after the call.
    pub rollout: RolloutView,
}

/// One service as a host reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceReport {
    /// Service.
    pub service: String,
    /// Version the host's desired state names.
    #[serde(default)]
    pub desired: Option<String>,
    /// Version running.
    #[serde(default)]
    pub actual: Option<String>,
    /// Whether it runs.
    #[serde(default)]
    pub healthy: bool,
    /// Deploy phase in flight.
    #[serde(default)]
    pub phase: Option<String>,
    /// Last error.
    #[serde(default)]
    pub last_error: Option<String>,
    /// A version that failed on this host and that it will not try again by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// `POST /v1/hosts/{host}/heartbeat`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Environment.
    pub environment: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Agent version.
    #[serde(default)]
    pub agent_version: Option<String>,
    /// The desired-state commit the host last fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Services.
    #[serde(default)]
    pub services: Vec<ServiceReport>,
}

/// What the coordinator asks a host to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Go back from `version` to the previous release (its rollout failed elsewhere).
    Revert,
    /// Fetch the desired state now: the branch tip moved (`commit`).
    Fetch,
    /// Run `version` as of `commit` instead of what Git asks for (`drover rollback`), until a
    /// new commit changes the service's desired version.
    Pin,
    /// Forget that `version` failed here and try it again (`drover retry`, or a new rollout
    /// of it).
    Retry,
    /// An action this agent does not know (from a newer coordinator): ignored.
    #[serde(other)]
    Unknown,
}

impl ActionKind {
    /// The action's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ActionKind::Revert => "revert",
            ActionKind::Fetch => "fetch",
            ActionKind::Pin => "pin",
            ActionKind::Retry => "retry",
            ActionKind::Unknown => "unknown",
        }
    }
}

/// Something the coordinator asks a host to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    /// Service.
    pub service: String,
    /// What.
    pub action: ActionKind,
    /// The version concerned: reverted from (`revert`), to run (`pin`), to try again
    /// (`retry`), or the coordinator's desired version (`fetch`).
    pub version: String,
    /// Why.
    pub reason: String,
    /// The commit concerned: the branch tip (`fetch`), or the commit whose definition of the
    /// service to run (`pin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

/// Heartbeat answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// When to send the next heartbeat.
    pub interval_ms: u64,
    /// Actions for this host.
    #[serde(default)]
    pub actions: Vec<Action>,
}

/// A host as shown by `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    /// Name.
    pub host: String,
    /// Environment.
    pub environment: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Agent version.
    pub agent_version: Option<String>,
    /// Services.
    pub services: Vec<ServiceReport>,
    /// Last heartbeat.
    pub last_seen_ms: u64,
    /// Not heard from for 3 heartbeat intervals.
    pub stale: bool,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The desired state the coordinator follows (the last valid commit it read).
    #[serde(default)]
    pub desired: Option<DesiredView>,
    /// The newest commit it refused, while the branch tip is refused.
    #[serde(default)]
    pub refused: Option<RefusedView>,
    /// Why the repo cannot be read now, if it cannot.
    #[serde(default)]
    pub git_error: Option<String>,
    /// Services held on another version than Git asks for (`drover rollback`).
    #[serde(default)]
    pub overrides: Vec<OverrideView>,
    /// Hosts.
    pub hosts: Vec<HostView>,
    /// Rollouts, newest last.
    pub rollouts: Vec<RolloutView>,
}

/// The desired state the coordinator follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredView {
    /// The commit.
    pub commit: String,
    /// Its committer time.
    pub commit_time_ms: u64,
    /// When the coordinator read it.
    pub fetched_at_ms: u64,
}

/// A commit the coordinator refused: it does not validate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedView {
    /// The commit.
    pub commit: String,
    /// Every problem, `file:line:column: message`.
    pub problems: Vec<String>,
    /// When it was read.
    pub at_ms: u64,
}

/// A service rolled back by an operator while Git still asks for another version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideView {
    /// Environment.
    pub environment: String,
    /// Service.
    pub service: String,
    /// The version Git asks for.
    pub from: String,
    /// The version the hosts run instead.
    pub to: String,
    /// Who rolled back.
    pub by: String,
    /// When.
    pub at_ms: u64,
}

/// `POST /v1/rollouts/{env}/{service}/rollback`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The version to go back to (it must have succeeded in the environment); default: the
    /// newest other version that did.
    #[serde(default)]
    pub to: Option<String>,
}

/// One audit entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Sequence number.
    pub seq: u64,
    /// When.
    pub at_ms: u64,
    /// Who (token name, host, or `coordinator`).
    pub actor: String,
    /// What (`transition`, `approve`, `lease_granted`, `denied`, …).
    pub action: String,
    /// On what (`prod/hello/1.4.2`, a lease id, a path).
    pub subject: String,
    /// Details.
    pub detail: String,
}

/// `GET /v1/history`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Entries, oldest first.
    pub entries: Vec<AuditEntry>,
}

/// The kind of an error answer (docs/protocol.md, "Conventions"), as its snake_case name on
/// the wire. A kind this version does not know reads as [`ErrorKind::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// 400: malformed JSON, unknown field, bad value.
    BadRequest,
    /// 400: missing or unsupported `Drover-Protocol` header.
    Protocol,
    /// 401: missing or unknown token.
    Unauthorized,
    /// 403: the token may not do this.
    Forbidden,
    /// 404: no such rollout, lease or service.
    NotFound,
    /// 409: not now; ask again after `retry_after_ms` (`reason` says why).
    Wait,
    /// 409: not allowed from the current state.
    Conflict,
    /// 410: the lease expired or was released.
    LeaseLost,
    /// 413: the body is too large.
    PayloadTooLarge,
    /// 422: never, at this commit (`reason` says why).
    Rejected,
    /// 429: over the token's rate; ask again after `retry_after_ms`.
    RateLimited,
    /// 500: the store failed; nothing was changed.
    Internal,
    /// 503: the store cannot be written now; ask again after `retry_after_ms`.
    Unavailable,
    /// 503: not answered within the request timeout.
    Timeout,
    /// A kind this version does not know (from a newer coordinator).
    #[serde(other)]
    Other,
}

impl ErrorKind {
    /// Its name on the wire (and in logs and metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Wait => "wait",
            ErrorKind::Conflict => "conflict",
            ErrorKind::LeaseLost => "lease_lost",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Rejected => "rejected",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Internal => "internal",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Other => "other",
        }
    }

    /// Whether the answer says to come back later.
    pub fn is_wait(self) -> bool {
        matches!(
            self,
            ErrorKind::Wait | ErrorKind::RateLimited | ErrorKind::Unavailable | ErrorKind::Timeout
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The kind.
    pub kind: ErrorKind,
    /// What happened, for people.
    pub message: String,
    /// For `wait` and `rejected`: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For `wait`: when to ask again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_are_their_snake_case_names_and_unknown_ones_read_as_other() {
        for (kind, name) in [
            (ErrorKind::BadRequest, "bad_request"),
            (ErrorKind::LeaseLost, "lease_lost"),
            (ErrorKind::PayloadTooLarge, "payload_too_large"),
            (ErrorKind::RateLimited, "rate_limited"),
            (ErrorKind::Timeout, "timeout"),
        ] {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(kind.as_str(), name);
            assert_eq!(serde_json::from_str::<ErrorKind>(&json).unwrap(), kind);
        }
        let body: ErrorBody =
            serde_json::from_str(r#"{"kind": "quota_exceeded", "message": "m"}"#).unwrap();
        assert_eq!(body.kind, ErrorKind::Other);
        assert!(ErrorKind::Wait.is_wait() && ErrorKind::Unavailable.is_wait());
        assert!(!ErrorKind::Rejected.is_wait());
    }

    #[test]
    fn risks_keep_their_json_and_an_unknown_one_does_not_lose_the_release() {
        let r: ReleaseRequest = serde_json::from_str(
            r#"{"outcome": "success", "verification": {"risk": "medium", "summary": "s"}}"#,
        )
        .unwrap();
        assert_eq!(r.verification.unwrap().risk, Risk::Medium);
        let r: ReleaseRequest = serde_json::from_str(
            r#"{"outcome": "success", "verification": {"risk": "severe", "summary": "s"}}"#,
        )
        .unwrap();
        assert_eq!(r.verification.unwrap().risk, Risk::Other);
        assert_eq!(serde_json::to_string(&Risk::High).unwrap(), "\"high\"");
    }
}
