//! The protocol's types (docs/protocol.md), shared by the server, the agent and the CLI.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The protocol version, sent in the `Drover-Protocol` header.
pub const PROTOCOL: &str = "1";

/// The header carrying [`PROTOCOL`].
pub const PROTOCOL_HEADER: &str = "Drover-Protocol";

/// A rollout's state (DESIGN.md §4).
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

/// An environment's rollout policy, as the agents read it from Git.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

/// `POST /v1/leases`.
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
    /// The desired-state commit the host read.
    pub commit: String,
    /// That commit's time (ms since the epoch): a request from an older commit than the
    /// running rollout's is stale.
    pub commit_time_ms: u64,
    /// The environment's policy.
    pub policy: Policy,
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
}

/// A rollout as shown to clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutView {
    /// Environment.
    pub environment: String,
    /// Service.
    pub service: String,
    /// Version.
    pub version: String,
    /// State.
    pub state: RolloutState,
    /// Policy.
    pub policy: Policy,
    /// Desired-state commit that started it.
    pub commit: String,
    /// Leases held now.
    pub leases: u32,
    /// Hosts that deployed it successfully.
    pub succeeded: Vec<String>,
    /// Hosts whose deploy failed.
    pub failed: Vec<String>,
    /// Hosts that reverted from it.
    pub reverted: Vec<String>,
    /// Metric verification verdicts, by host.
    #[serde(default)]
    pub verdicts: BTreeMap<String, String>,
    /// Who approved or rejected, and when.
    #[serde(default)]
    pub decision: Option<Decision>,
    /// Why it is in its state (failure, abort reason), if anything to say.
    #[serde(default)]
    pub reason: Option<String>,
    /// Created.
    pub created_at_ms: u64,
    /// Last change.
    pub updated_at_ms: u64,
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

/// A host's metric verification verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verification {
    /// `low`, `medium` or `high`. A medium risk on a successful deploy pauses the rollout.
    pub risk: String,
    /// Per-metric medians, p-values and judgements, in one line.
    pub summary: String,
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
    /// Services.
    #[serde(default)]
    pub services: Vec<ServiceReport>,
}

/// Something the coordinator asks a host to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    /// Service.
    pub service: String,
    /// What: `revert` (go back to the previous release).
    pub action: String,
    /// The version concerned (the one to revert from).
    pub version: String,
    /// Why.
    pub reason: String,
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
    /// Hosts.
    pub hosts: Vec<HostView>,
    /// Rollouts, newest last.
    pub rollouts: Vec<RolloutView>,
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

/// An error body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The kind (see docs/protocol.md).
    pub kind: String,
    /// What happened, for people.
    pub message: String,
    /// For `wait` and `rejected`: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For `wait`: when to ask again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}
