//! The agent's side of the coordinator (docs/protocol.md): a lease before touching the host,
//! renewed while the deploy runs and released with its outcome; heartbeats; reverts.
//!
//! This module is the agent's one adapter to the protocol: the wire types and the HTTP client
//! come from `drover_coordinator` (its `client` feature), and the machines see only the types
//! here ([`Gate`], [`LeasePurpose`], [`GateError`]) and the engine's [`LeaseRecord`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use drover_coordinator::client::{Client, ClientError};
use drover_coordinator::wire::{self, AcquireRequest, ErrorKind, ReleaseRequest};

use crate::engine::{LeaseRecord, LeaseStatus, LeaseVerdict};
use crate::verify;

/// What a lease is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeasePurpose {
    /// Deploying the desired version.
    Deploy,
    /// Going back from it, at the coordinator's request.
    Revert,
}

impl From<LeasePurpose> for wire::Purpose {
    fn from(p: LeasePurpose) -> wire::Purpose {
        match p {
            LeasePurpose::Deploy => wire::Purpose::Deploy,
            LeasePurpose::Revert => wire::Purpose::Revert,
        }
    }
}

impl From<LeaseVerdict> for wire::Verification {
    fn from(v: LeaseVerdict) -> wire::Verification {
        wire::Verification {
            risk: v.risk.into(),
            summary: v.summary,
            metrics: v
                .charts
                .into_iter()
                .map(|c| wire::MetricSeries {
                    name: c.name,
                    judgement: c.judgement.name().into(),
                    median: c.median,
                    baseline_median: c.baseline_median,
                    p_value: c.p_value,
                    samples: c.samples,
                    baseline: c.baseline,
                })
                .collect(),
        }
    }
}

impl From<verify::Risk> for wire::Risk {
    fn from(r: verify::Risk) -> wire::Risk {
        match r {
            verify::Risk::Low => wire::Risk::Low,
            verify::Risk::Medium => wire::Risk::Medium,
            verify::Risk::High => wire::Risk::High,
        }
    }
}

/// Where a desired state came from: what a lease request needs besides the service. The
/// coordinator reads the policy from Git itself; the host only says which commit it read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ctx {
    /// The desired-state commit.
    pub commit: String,
}

/// Why no lease was obtained.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// Not now: try again later.
    #[error("waiting for the coordinator ({reason}): {message}")]
    Wait {
        /// Why (`no_slot`, `approval_required`, `upstream_missing`, `paused`, `stale`…).
        reason: String,
        /// What the coordinator said.
        message: String,
        /// When to ask again.
        retry_after: Duration,
    },
    /// Never: this version is not to be deployed.
    #[error("the coordinator refused this version ({reason}): {message}")]
    Rejected {
        /// Why (`failed`, `aborted`, `superseded`).
        reason: String,
        /// What the coordinator said.
        message: String,
    },
    /// The coordinator could not be reached or answered an error; the host is not touched.
    #[error("no lease, the running version stays: {0}")]
    Unavailable(ClientError),
}

impl From<ClientError> for GateError {
    /// The coordinator's `409 wait` and `422 rejected` answers; anything else leaves the host
    /// untouched for now.
    fn from(e: ClientError) -> GateError {
        if let Some((reason, retry_after)) = e.wait() {
            return GateError::Wait {
                reason: reason.to_string(),
                message: e.to_string(),
                retry_after,
            };
        }
        if let Some(reason) = e.rejected() {
            return GateError::Rejected {
                reason: reason.to_string(),
                message: e.to_string(),
            };
        }
        GateError::Unavailable(e)
    }
}

impl GateError {
    /// When to try again (None: never, for this version).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GateError::Wait { retry_after, .. } => Some(*retry_after),
            GateError::Rejected { .. } => None,
            GateError::Unavailable(_) => Some(Duration::from_secs(5)),
        }
    }

    /// Whether the coordinator answered that the request conflicts with its state (a revert
    /// of a rollout that has nothing to revert).
    pub fn is_conflict(&self) -> bool {
        matches!(self, GateError::Unavailable(e) if e.is(ErrorKind::Conflict))
    }
}

/// A lease held by this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// Its id.
    pub id: String,
    /// Its TTL.
    pub ttl: Duration,
}

/// The coordinator, as the deployer sees it.
#[derive(Clone, Debug)]
pub struct Gate {
    client: Client,
    host: String,
    environment: String,
    required: bool,
    /// The coordinator answered `404` to a traffic report (it is older): not asked again.
    no_traffic: Arc<AtomicBool>,
}

impl Gate {
    /// Whether deploys wait for the coordinator (`required`, the default).
    pub fn required(&self) -> bool {
        self.required
    }

    /// A gate for `host` through `client`; with `required: false` an unreachable coordinator
    /// does not block deploys.
    pub fn new(client: Client, host: &str, environment: &str, required: bool) -> Gate {
        Gate {
            client,
            host: host.to_string(),
            environment: environment.to_string(),
            required,
            no_traffic: Arc::default(),
        }
    }

    /// Tells the coordinator that the new side of the deploy under `lease` now has `percent`
    /// of the traffic (its dashboard draws the weights). Best effort, bounded to 2 s: the
    /// deploy never waits on it; a failure is logged.
    pub async fn traffic(&self, lease: &str, percent: u8) {
        if self.no_traffic.load(Ordering::Relaxed) {
            return;
        }
        let sent =
            tokio::time::timeout(Duration::from_secs(2), self.client.traffic(lease, percent)).await;
        match sent {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.is(ErrorKind::NotFound) => {
                tracing::info!(error = %e, "the coordinator does not take traffic reports; not sending them again");
                self.no_traffic.store(true, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                tracing::warn!(lease = %lease, percent, error = %e, "cannot report the traffic weight to the coordinator")
            }
            Err(_) => {
                tracing::warn!(lease = %lease, percent, "reporting the traffic weight to the coordinator timed out")
            }
        }
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Asks for a lease on `svc`. `Ok(None)`: go on without one (coordinator unreachable and
    /// not required).
    pub async fn acquire(
        &self,
        service: &str,
        version: &str,
        ctx: Option<&Ctx>,
        purpose: LeasePurpose,
    ) -> Result<Option<Held>, GateError> {
        let Some(ctx) = ctx else {
            return Err(GateError::Wait {
                reason: "no_desired_state".into(),
                message: "the desired state has not been read yet; a lease is asked for once it is"
                    .into(),
                retry_after: Duration::from_secs(2),
            });
        };
        let req = AcquireRequest {
            host: self.host.clone(),
            environment: self.environment.clone(),
            service: service.to_string(),
            version: version.to_string(),
            purpose: purpose.into(),
            commit: ctx.commit.clone(),
        };
        match self.client.acquire(&req).await {
            Ok(g) => {
                tracing::info!(lease = %g.lease.id, rollout_state = %g.rollout.state, "lease granted");
                Ok(Some(Held {
                    id: g.lease.id,
                    ttl: Duration::from_millis(g.lease.ttl_ms),
                }))
            }
            Err(e) => {
                if matches!(e, ClientError::Unreachable { .. }) && !self.required {
                    tracing::warn!(error = %e, "coordinator unreachable; deploying without a lease (coordinator.required: false)");
                    return Ok(None);
                }
                Err(GateError::from(e))
            }
        }
    }

    /// Asks, under `lease`, whether the deploy may go on past `step` (a step that waits for an
    /// approval). `Ok`: go on; `Wait`: ask again later, traffic stays; `Rejected`: put traffic
    /// back (the step was rejected or timed out, the rollout failed, or the lease is gone).
    pub async fn at_step(&self, lease: &str, step: &str) -> Result<(), GateError> {
        match self.client.gate(lease, step).await {
            Ok(_) => Ok(()),
            Err(e) if e.is(ErrorKind::LeaseLost) => Err(GateError::Rejected {
                reason: "lease_lost".into(),
                message: e.to_string(),
            }),
            Err(e) => Err(GateError::from(e)),
        }
    }

    /// Keeps `lease` alive until the returned guard is dropped.
    pub fn keep_alive(&self, lease: &Held) -> KeepAlive {
        let client = self.client.clone();
        let id = lease.id.clone();
        let every = (lease.ttl / 3).max(Duration::from_millis(200));
        KeepAlive(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match client.renew(&id).await {
                    Ok(_) => {}
                    Err(e) if e.is(ErrorKind::LeaseLost) => {
                        tracing::warn!(lease = %id, "lease lost (expired); finishing the deploy under way");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(lease = %id, error = %e, "cannot renew the lease; retrying")
                    }
                }
            }
        }))
    }

    /// Releases a lease with its outcome. `Ok` also when the coordinator no longer knows it.
    pub async fn release(
        &self,
        id: &str,
        success: bool,
        message: Option<String>,
        verification: Option<LeaseVerdict>,
    ) -> Result<(), ClientError> {
        let req = ReleaseRequest {
            outcome: if success {
                wire::Outcome::Success
            } else {
                wire::Outcome::Failure
            },
            message,
            verification: verification.map(Into::into),
        };
        let mut sent = self.client.release(id, &req).await;
        if let (Err(e), Some(v)) = (&sent, &req.verification)
            && e.is(ErrorKind::BadRequest)
            && !v.metrics.is_empty()
        {
            // A coordinator older than the charts (or refusing these samples): the outcome
            // matters, the samples do not.
            tracing::warn!(lease = %id, error = %e, "the coordinator refused the verdict's samples; releasing without them");
            let mut req = req.clone();
            if let Some(v) = &mut req.verification {
                v.metrics.clear();
            }
            sent = self.client.release(id, &req).await;
        }
        match sent {
            Ok(r) => {
                tracing::info!(lease = %id, rollout_state = %r.rollout.state, "lease released");
                Ok(())
            }
            Err(e) if e.is(ErrorKind::LeaseLost) => {
                tracing::warn!(lease = %id, "the coordinator had already dropped this lease");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Sends a heartbeat (with the desired-state `commit` last read); returns the
    /// coordinator's actions for this host.
    pub async fn heartbeat(
        &self,
        services: Vec<wire::ServiceReport>,
        labels: &std::collections::BTreeMap<String, String>,
        commit: Option<String>,
    ) -> Result<Vec<wire::Action>, ClientError> {
        let hb = wire::Heartbeat {
            environment: self.environment.clone(),
            labels: labels.clone(),
            agent_version: Some(env!("CARGO_PKG_VERSION").into()),
            commit,
            services,
        };
        Ok(self.client.heartbeat(&self.host, &hb).await?.actions)
    }
}

/// Delivers an ended lease's outcome. Returns whether the lease record is done with
/// (released, or no coordinator any more); a held lease (a deploy in flight) is not.
pub async fn flush(gate: Option<&Gate>, lease: &LeaseRecord) -> bool {
    let LeaseStatus::Ended { success, message } = &lease.status else {
        return false;
    };
    let Some(gate) = gate else {
        return true;
    };
    match gate
        .release(
            &lease.id,
            *success,
            message.clone(),
            lease.verification.clone(),
        )
        .await
    {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(lease = %lease.id, error = %e, "cannot release the lease yet; will retry");
            false
        }
    }
}

/// Renews a lease in the background; stops when dropped.
pub struct KeepAlive(tokio::task::JoinHandle<()>);

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}
