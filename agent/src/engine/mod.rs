//! One deploy engine for every target.
//!
//! A target is a [`Machine`]: its phases (an enum with its transitions), its record of a
//! service (with the deploy in flight, a [`Flight`]), the I/O of each phase, and a pure
//! [`Machine::settle`] that says what an ended deploy leaves in the record. [`drive`] runs any
//! machine the same way:
//!
//! 1. write the phase to the record before it runs (write-ahead), so a crash can be recovered;
//! 2. tell it: an event in the log, the phase in `systemctl status`, a log line;
//! 3. hit the phase's failpoint (tests), then run the phase — the lease phase is the
//!    engine's own (ask the coordinator, keep the lease alive);
//! 4. step: success and failure lead where the machine says; a phase that fails into itself
//!    is retried with backoff, a few times;
//! 5. at the end: settle the record, record the outcome on the lease, save, tell, and deliver
//!    the outcome to the coordinator (kept in the record until it is delivered).
//!
//! The VM machine is [`crate::vm`], the ECS one [`crate::ecs`]; a new target is a new folder
//! with its own machine.

pub mod lease;
mod outcome;
#[cfg(test)]
mod tests;

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

pub use lease::{LeaseRecord, LeaseStatus, LeaseVerdict};
pub use outcome::{DeployError, Reconciled};

use crate::coordinator::{self, Ctx, Gate, GateError, KeepAlive, LeasePurpose};
use crate::failpoint;
use crate::fsutil::FileLock;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::progress::{Progress, Update};
use crate::state::{Event, Record, StateStore};

/// Where a phase leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next<P> {
    /// Run this phase next.
    Phase(P),
    /// The deploy is over.
    End(End),
}

/// How a deploy ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The new version runs and passed its checks.
    Deployed,
    /// It failed (or waits) before touching anything: the running version never stopped.
    Abandoned,
    /// It failed and the previous version runs again.
    RolledBack,
    /// The rollback failed too: an operator is needed.
    Broken,
}

/// Whether a failure may go away by itself (network trouble, a full disk, throttling): such
/// failures do not mark a version failed.
pub trait Transient {
    /// Whether trying again later may succeed without a change to the desired state.
    fn is_transient(&self) -> bool;
}

/// Why a phase failed: the machine's own error, or one every machine shares.
#[derive(Debug, thiserror::Error)]
pub enum StepError<E: std::error::Error + 'static> {
    /// The machine's I/O.
    #[error(transparent)]
    Machine(E),
    /// No lease from the coordinator.
    #[error(transparent)]
    Gate(#[from] GateError),
    /// The metric verification judged the new version too risky.
    #[error("metric verification: {0}")]
    Verify(String),
    /// The coordinator stopped the deploy (it rolled the service back).
    #[error("stopped by the coordinator: {0}")]
    Aborted(String),
    /// An injected test failure.
    #[error("{0}")]
    Injected(String),
}

impl<E: std::error::Error + Transient + 'static> StepError<E> {
    /// Whether trying again later may succeed (see [`Transient`]).
    pub fn is_transient(&self) -> bool {
        match self {
            StepError::Machine(e) => e.is_transient(),
            StepError::Gate(g) => g.retry_after().is_some(),
            _ => false,
        }
    }

    /// The coordinator's "not now", with when to ask again.
    pub fn wait(&self) -> Option<(&GateError, Duration)> {
        match self {
            StepError::Gate(g) => g.retry_after().map(|d| (g, d)),
            _ => None,
        }
    }
}

/// A deploy in flight, as its machine records it.
pub trait Flight: Clone + Send + Sync {
    /// The machine's phase type.
    type Phase: Copy + Eq + Debug + Send + Sync;
    /// The service deployed.
    fn service(&self) -> &str;
    /// The version deployed.
    fn version(&self) -> &str;
    /// Records the phase about to run.
    fn set_phase(&mut self, phase: Self::Phase);
    /// Why it is rolling back (or ended badly), once it is.
    fn error(&self) -> Option<&str>;
    /// Sets why.
    fn set_error(&mut self, error: String);
}

/// A machine's record of one service, as the engine uses it.
pub trait Ledger: Record + Send {
    /// The machine's deploy in flight.
    type Flight: Flight;
    /// The deploy in flight, if any.
    fn flight(&mut self) -> &mut Option<Self::Flight>;
    /// The coordinator lease held, or ended with an outcome to deliver.
    fn lease(&mut self) -> &mut Option<LeaseRecord>;
}

/// Implements [`Flight`] for a machine's flight with `target.service`, `target.version`,
/// `phase` and `error` fields, and [`Ledger`] for its record with `deployment` and `lease`
/// fields: `ledger!(Record, Flight, Phase)`.
macro_rules! ledger {
    ($rec:ty, $flight:ty, $phase:ty) => {
        impl $crate::engine::Flight for $flight {
            type Phase = $phase;

            fn service(&self) -> &str {
                &self.target.service
            }

            fn version(&self) -> &str {
                &self.target.version
            }

            fn set_phase(&mut self, phase: $phase) {
                self.phase = phase;
            }

            fn error(&self) -> Option<&str> {
                self.error.as_deref()
            }

            fn set_error(&mut self, error: String) {
                self.error = Some(error);
            }
        }

        impl $crate::engine::Ledger for $rec {
            type Flight = $flight;

            fn flight(&mut self) -> &mut Option<$flight> {
                &mut self.deployment
            }

            fn lease(&mut self) -> &mut Option<$crate::engine::LeaseRecord> {
                &mut self.lease
            }
        }
    };
}
pub(crate) use ledger;

/// A deploy target: its phases, its record, and the I/O of each phase.
pub trait Machine: Sync {
    /// The phase enum.
    type Phase: Copy + Eq + Debug + Send + Sync;
    /// The deploy in flight.
    type Flight: Flight<Phase = Self::Phase>;
    /// The record of one service.
    type Record: Ledger<Flight = Self::Flight>;
    /// The I/O errors of its phases.
    type Error: std::error::Error + Transient + Send + Sync + 'static;

    /// How often a phase that fails into itself runs before the deploy ends.
    const TRIES: u32 = 5;
    /// The wait before such a phase runs again, times the tries so far.
    const BACKOFF: Duration = Duration::from_millis(500);

    /// The shared peers (store, coordinator, notifications).
    fn engine(&self) -> &Engine;
    /// The phase's name, as in logs, events and status.
    fn name(phase: Self::Phase) -> String;
    /// The failpoint of the phase (tests).
    fn failpoint(phase: Self::Phase) -> String;
    /// Where `phase` leads when it succeeds.
    fn on_success(&self, flight: &Self::Flight, phase: Self::Phase) -> Next<Self::Phase>;
    /// Where `phase` leads when it fails.
    fn on_failure(phase: Self::Phase) -> Next<Self::Phase>;
    /// Whether the engine asks for the lease in this phase (instead of running it).
    fn takes_lease(phase: Self::Phase) -> bool;
    /// Whether this phase undoes the deploy (its failure is a failed rollback).
    fn rolls_back(phase: Self::Phase) -> bool;
    /// How the deploy ends when `phase`, failing into itself, failed [`Machine::TRIES`] times.
    fn exhausted(phase: Self::Phase) -> End;
    /// Called as `phase` is entered, before it is recorded; returns whether entering it is
    /// news (logged, told), which a retried wait for a lease is not.
    fn enter(&self, _rec: &Self::Record, _flight: &mut Self::Flight, _phase: Self::Phase) -> bool {
        true
    }
    /// Runs `phase`.
    fn run_phase(
        &self,
        rec: &mut Self::Record,
        flight: &mut Self::Flight,
        phase: Self::Phase,
    ) -> impl Future<Output = Result<(), StepError<Self::Error>>> + Send;
    /// What the ended deploy `flight` leaves in `rec`, and the outcome. No I/O: whatever it
    /// needs from disk or AWS the machine reads before.
    fn settle(
        &self,
        rec: &mut Self::Record,
        flight: &Self::Flight,
        end: End,
        cause: Option<&StepError<Self::Error>>,
    ) -> Reconciled;
    /// After the outcome is recorded and delivered: clean-up (old releases, abort flags).
    fn after(
        &self,
        rec: &Self::Record,
        flight: &Self::Flight,
        outcome: &Reconciled,
    ) -> impl Future<Output = ()> + Send;
}

/// The peers every machine shares, built once.
#[derive(Clone)]
pub struct Engine {
    /// The state store.
    pub store: StateStore,
    /// This agent's host name (in events and leases).
    pub host: String,
    /// The coordinator, if one is configured.
    pub gate: Option<Gate>,
    /// systemd notifications (the phase in `systemctl status`).
    pub notify: Notifier,
    /// The agent's Prometheus counters (deploys, phase durations).
    pub metrics: Metrics,
    /// Phases as they happen, for a command that shows them (`once`).
    pub progress: Progress,
}

impl Engine {
    /// Appends an event to the log.
    pub fn event(&self, service: &str, version: &str, what: &str, detail: Option<String>) {
        self.store
            .event(&Event::now(&self.host, service, version, what, detail));
    }

    /// Writes a record (atomically).
    pub fn save<R: Record>(&self, rec: &mut R) -> Result<(), DeployError> {
        Ok(self.store.save(rec)?)
    }

    /// Takes the lock `name` of `service` (one deploy of a service at a time).
    pub async fn lock(&self, name: &str, service: &str) -> Result<FileLock, DeployError> {
        let store = self.store.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || store.lock_service(&name))
            .await
            .expect("lock task does not panic")
            .map_err(|source| DeployError::Lock {
                service: service.to_string(),
                source,
            })
    }

    /// Asks the coordinator (if any) for a lease on `service` at `version`; a lease granted
    /// is recorded in `rec` (saved with the next write) and kept alive until the returned
    /// guard drops. `Ok(None)`: go on without one.
    pub async fn acquire<R: Ledger>(
        &self,
        rec: &mut R,
        service: &str,
        version: &str,
        ctx: Option<&Ctx>,
        purpose: LeasePurpose,
    ) -> Result<Option<KeepAlive>, GateError> {
        let Some(gate) = &self.gate else {
            return Ok(None);
        };
        let Some(held) = gate.acquire(service, version, ctx, purpose).await? else {
            return Ok(None);
        };
        *rec.lease() = Some(LeaseRecord::held(
            held.id.clone(),
            purpose == LeasePurpose::Revert,
        ));
        Ok(Some(gate.keep_alive(&held)))
    }

    /// Delivers an ended lease's outcome that is not delivered yet; forgets the lease once
    /// the coordinator has it.
    pub async fn flush<R: Ledger>(&self, rec: &mut R) -> Result<(), DeployError> {
        if let Some(l) = rec.lease().clone()
            && coordinator::flush(self.gate.as_ref(), &l).await
        {
            *rec.lease() = None;
            self.save(rec)?;
        }
        Ok(())
    }

    /// Whether an ended deploy's outcome still waits to be delivered to a coordinator that
    /// deploys must wait for: a new deploy would replace its record, and the coordinator
    /// would never count it.
    pub fn undelivered<R: Ledger>(&self, rec: &mut R) -> bool {
        rec.lease()
            .as_ref()
            .is_some_and(|l| l.status != LeaseStatus::Held)
            && self.gate.as_ref().is_some_and(|g| g.required())
    }
}

/// How often a resumed deploy renews the lease it holds.
const RESUMED_RENEWAL: Duration = Duration::from_secs(1);

/// Runs `flight` from `start` until it ends, under `keep` (a lease already held, for a revert)
/// or the lease its lease phase asks for. Returns how it ended; errors only when the record
/// cannot be written.
pub async fn drive<M: Machine>(
    m: &M,
    rec: &mut M::Record,
    mut flight: M::Flight,
    start: M::Phase,
    ctx: Option<&Ctx>,
    mut keep: Option<KeepAlive>,
) -> Result<Reconciled, DeployError> {
    let e = m.engine();
    if keep.is_none()
        && let (Some(gate), Some(l)) = (&e.gate, rec.lease().clone())
        && l.status == LeaseStatus::Held
    {
        // A deploy resumed after a restart keeps renewing the lease it holds (its TTL is not
        // recorded: renewing every second suits any the coordinator may use).
        keep = Some(gate.keep_alive(&coordinator::Held {
            id: l.id,
            ttl: RESUMED_RENEWAL * 3,
        }));
    }
    let t0 = Instant::now();
    let mut phase = start;
    let mut tries: u32 = 0;
    let mut cause: Option<StepError<M::Error>> = None;
    loop {
        flight.set_phase(phase);
        let news = m.enter(rec, &mut flight, phase);
        *rec.flight() = Some(flight.clone());
        e.save(rec)?;
        let name = M::name(phase);
        let (service, version) = (flight.service().to_string(), flight.version().to_string());
        if news {
            e.notify
                .status(&format!("deploying {service} {version}: {name}"));
            let detail = flight.error().filter(|_| M::rolls_back(phase));
            e.event(&service, &version, &name, detail.map(str::to_string));
            tracing::info!(phase = %name, "phase");
            e.progress.send(Update::PhaseStarted {
                service: service.clone(),
                version: version.clone(),
                phase: name.clone(),
            });
        }
        let began = Instant::now();
        let result = match failpoint::hit(&M::failpoint(phase)) {
            Err(msg) => Err(StepError::Injected(msg)),
            Ok(()) if M::takes_lease(phase) => {
                match e
                    .acquire(rec, &service, &version, ctx, LeasePurpose::Deploy)
                    .await
                {
                    Ok(k) => {
                        keep = k.or(keep);
                        Ok(())
                    }
                    Err(g) => Err(StepError::Gate(g)),
                }
            }
            Ok(()) => m.run_phase(rec, &mut flight, phase).await,
        };
        if !matches!(result, Err(StepError::Gate(GateError::Wait { .. }))) {
            // Waiting for a lease is not a phase's work: its retries are not timed.
            let took = began.elapsed();
            e.metrics.phase(&service, &name, took.as_secs_f64());
            e.progress.send(Update::PhaseEnded {
                service: service.clone(),
                version: version.clone(),
                phase: name.clone(),
                took_ms: took.as_millis() as u64,
                error: result.as_ref().err().map(|e| e.to_string()),
            });
        }
        let next = match result {
            Ok(()) => m.on_success(&flight, phase),
            Err(err) => {
                if matches!(err, StepError::Gate(GateError::Wait { .. })) {
                    tracing::debug!(error = %err, "no lease yet");
                } else {
                    tracing::error!(phase = %name, error = %err, "phase failed");
                }
                let msg = format!("{name}: {err}");
                let error = match flight.error() {
                    Some(first) if M::rolls_back(phase) => {
                        format!("{first}; rollback failed: {msg}")
                    }
                    Some(first) => first.to_string(),
                    None => msg,
                };
                flight.set_error(error);
                cause = Some(err);
                match M::on_failure(phase) {
                    Next::Phase(p) if p == phase => {
                        tries += 1;
                        if tries >= M::TRIES {
                            Next::End(M::exhausted(phase))
                        } else {
                            tokio::time::sleep(M::BACKOFF * tries).await;
                            Next::Phase(p)
                        }
                    }
                    next => next,
                }
            }
        };
        match next {
            Next::Phase(p) => {
                if p != phase {
                    tries = 0;
                }
                phase = p;
            }
            Next::End(end) => {
                drop(keep.take());
                let took_ms = t0.elapsed().as_millis() as u64;
                tracing::info!(took_ms, outcome = ?end, "deploy ended");
                let outcome = conclude(m, rec, &flight, end, cause.as_ref()).await?;
                e.progress.send(Update::Ended {
                    service: flight.service().to_string(),
                    version: flight.version().to_string(),
                    outcome: crate::progress::outcome_name(&outcome),
                    summary: outcome.summary(),
                    took_ms,
                });
                return Ok(outcome);
            }
        }
    }
}

/// Ends `flight` as `end` (`cause`: the failure that ended it): settles the record, records the
/// outcome on the lease, saves, tells, and delivers the outcome to the coordinator.
pub async fn conclude<M: Machine>(
    m: &M,
    rec: &mut M::Record,
    flight: &M::Flight,
    end: End,
    cause: Option<&StepError<M::Error>>,
) -> Result<Reconciled, DeployError> {
    let e = m.engine();
    let outcome = m.settle(rec, flight, end, cause);
    *rec.flight() = None;
    if let Some(l) = rec.lease() {
        let message = flight.error().filter(|s| !s.is_empty());
        l.end(
            matches!(
                outcome,
                Reconciled::Deployed { .. }
                    | Reconciled::Ran {
                        elsewhere: None,
                        ..
                    }
            ),
            matches!(outcome, Reconciled::RolledBack { .. }),
            message.map(str::to_string),
        );
    }
    e.save(rec)?;
    e.metrics.ended(flight.service(), &outcome);
    if let Some((what, detail)) = outcome.event() {
        e.event(flight.service(), flight.version(), what, detail);
        e.notify
            .status(&format!("{}: {}", flight.service(), outcome.summary()));
    }
    e.flush(rec).await?;
    m.after(rec, flight, &outcome).await;
    Ok(outcome)
}
