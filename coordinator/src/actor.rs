//! The single owner of the coordinator's state. HTTP handlers send it [`Command`]s; it takes
//! every command waiting, applies them to the [`Core`] in order, writes all their changes to
//! the store in **one** transaction (group commit: one disk sync for many requests), and only
//! then answers. If the write fails, the state is reloaded from the store and every request of
//! the batch gets `500 internal`: an answer is never given for a change that was not stored.

use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use crate::auth::Caller;
use crate::core::{ApiError, Core};
use crate::git::Update;
use crate::store::Store;
use crate::wire::{
    AcquireRequest, Granted, Heartbeat, HeartbeatReply, History, ReleaseRequest, Renewed,
    RolloutReply, Status,
};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where an answer goes.
pub type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// A request for the actor.
pub enum Command {
    /// Ask for a lease.
    Acquire(AcquireRequest, Caller, Reply<Granted>),
    /// Renew a lease.
    Renew(String, Reply<Renewed>),
    /// Release a lease.
    Release(String, ReleaseRequest, Reply<RolloutReply>),
    /// A host's heartbeat.
    Heartbeat(String, Heartbeat, Reply<HeartbeatReply>),
    /// Approve or reject.
    Decide {
        /// Environment.
        env: String,
        /// Service.
        service: String,
        /// Version.
        version: String,
        /// Approve (true) or reject.
        approve: bool,
        /// Who.
        caller: Caller,
        /// Answer.
        reply: Reply<RolloutReply>,
    },
    /// Start the failed or aborted rollout of the desired version again.
    Retry {
        /// Environment.
        env: String,
        /// Service.
        service: String,
        /// Who.
        caller: Caller,
        /// Answer.
        reply: Reply<RolloutReply>,
    },
    /// Roll a service back to a version that succeeded before.
    Rollback {
        /// Environment.
        env: String,
        /// Service.
        service: String,
        /// The version (default: the newest other that succeeded).
        to: Option<String>,
        /// Who.
        caller: Caller,
        /// Answer.
        reply: Reply<RolloutReply>,
    },
    /// What a fetch of the desired-state repo found.
    Desired(Box<Update>),
    /// Pause, resume or abort.
    Operate {
        /// Environment.
        env: String,
        /// Service.
        service: String,
        /// `pause`, `resume` or `abort`.
        verb: String,
        /// Who.
        caller: Caller,
        /// Answer.
        reply: Reply<RolloutReply>,
    },
    /// Fleet status.
    Status(Reply<Status>),
    /// Audit trail.
    History(u32, Reply<History>),
    /// Record a denied call.
    Denied {
        /// Who (token name or `unknown`).
        who: String,
        /// What was attempted.
        what: String,
        /// Why it was denied.
        why: String,
    },
    /// Metrics text.
    Metrics(Reply<String>),
}

/// Counters kept by the actor.
#[derive(Default, Debug)]
struct Stats {
    commands: u64,
    batches: u64,
    commit_errors: u64,
    commit_micros: u64,
}

/// An answer waiting for its batch to be stored.
type Pending = Box<dyn FnOnce(Result<(), &ApiError>) + Send>;

fn deferred<T: Send + 'static>(reply: Reply<T>, result: Result<T, ApiError>) -> Pending {
    Box::new(move |stored| {
        let _ = reply.send(match stored {
            Ok(()) => result,
            Err(e) => Err(e.clone()),
        });
    })
}

/// Runs the actor until every sender is dropped. Call on a dedicated thread. `wake_git`
/// receives a poke whenever the core wants the repo fetched now.
pub fn run(
    mut core: Core,
    mut store: Box<dyn Store>,
    rx: mpsc::Receiver<Command>,
    tick: Duration,
    wake_git: Option<tokio::sync::mpsc::Sender<()>>,
) {
    let mut stats = Stats::default();
    let mut last_tick = Instant::now();
    loop {
        let first = match rx.recv_timeout(tick) {
            Ok(c) => Some(c),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut batch: Vec<Command> = first.into_iter().collect();
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let now = now_ms();
        let mut pending: Vec<Pending> = Vec::with_capacity(batch.len());
        let mut histories: Vec<(u32, Reply<History>)> = Vec::new();
        for cmd in batch {
            stats.commands += 1;
            match cmd {
                Command::Acquire(req, caller, reply) => {
                    let r = core.acquire(&req, &caller, now);
                    pending.push(deferred(reply, r));
                }
                Command::Renew(id, reply) => {
                    let r = core.renew(&id, now);
                    pending.push(deferred(reply, r));
                }
                Command::Release(id, req, reply) => {
                    let r = core
                        .release(&id, &req, now)
                        .map(|rollout| RolloutReply { rollout });
                    pending.push(deferred(reply, r));
                }
                Command::Heartbeat(host, hb, reply) => {
                    let r = core.heartbeat(&host, &hb, now);
                    pending.push(deferred(reply, r));
                }
                Command::Decide {
                    env,
                    service,
                    version,
                    approve,
                    caller,
                    reply,
                } => {
                    let r = core
                        .decide(&env, &service, &version, approve, &caller, now)
                        .map(|rollout| RolloutReply { rollout });
                    pending.push(deferred(reply, r));
                }
                Command::Retry {
                    env,
                    service,
                    caller,
                    reply,
                } => {
                    let r = core
                        .retry(&env, &service, &caller, now)
                        .map(|rollout| RolloutReply { rollout });
                    pending.push(deferred(reply, r));
                }
                Command::Rollback {
                    env,
                    service,
                    to,
                    caller,
                    reply,
                } => {
                    let r = core
                        .rollback(&env, &service, to.as_deref(), &caller, now)
                        .map(|rollout| RolloutReply { rollout });
                    pending.push(deferred(reply, r));
                }
                Command::Desired(update) => match *update {
                    Update::Desired(d) => core.apply_desired(d, now),
                    Update::Refused(r) => core.refuse(r, now),
                    Update::Error(e) => core.git_error(e),
                },
                Command::Operate {
                    env,
                    service,
                    verb,
                    caller,
                    reply,
                } => {
                    let r = core
                        .operate(&env, &service, &verb, &caller, now)
                        .map(|rollout| RolloutReply { rollout });
                    pending.push(deferred(reply, r));
                }
                Command::Status(reply) => {
                    let _ = reply.send(Ok(core.status(now)));
                }
                Command::History(limit, reply) => histories.push((limit, reply)),
                Command::Denied { who, what, why } => core.denied(now, &who, &what, &why),
                Command::Metrics(reply) => {
                    let _ = reply.send(Ok(metrics(&core, &stats)));
                }
            }
        }
        if last_tick.elapsed() >= tick {
            core.tick(now);
            last_tick = Instant::now();
        }
        if core.take_wake()
            && let Some(w) = &wake_git
        {
            let _ = w.try_send(());
        }
        let changes = core.take_changes();
        let t0 = Instant::now();
        let stored = store.commit(&changes);
        stats.commit_micros += t0.elapsed().as_micros() as u64;
        stats.batches += 1;
        match stored {
            Ok(()) => {
                for p in pending {
                    p(Ok(()));
                }
            }
            Err(e) => {
                stats.commit_errors += 1;
                tracing::error!(error = %e, changes = changes.len(), "store write failed; reloading state");
                let err = ApiError::internal(format!(
                    "the coordinator could not store the change ({e}); nothing was changed, retry"
                ));
                match store.load() {
                    Ok(snap) => core = Core::new(snap, core.lease_ttl_ms, core.heartbeat_ms, now),
                    Err(e2) => tracing::error!(error = %e2, "reloading state failed"),
                }
                for p in pending {
                    p(Err(&err));
                }
            }
        }
        for (limit, reply) in histories {
            let r = store
                .history(limit)
                .map(|entries| History { entries })
                .map_err(|e| ApiError::internal(e.to_string()));
            let _ = reply.send(r);
        }
    }
    tracing::info!("coordinator state actor stopped");
}

fn metrics(core: &Core, s: &Stats) -> String {
    let mut t = String::new();
    let mut one = |name: &str, kind: &str, value: String| {
        t.push_str(&format!(
            "# TYPE drover_coordinator_{name} {kind}\ndrover_coordinator_{name} {value}\n"
        ));
    };
    one("commands_total", "counter", s.commands.to_string());
    one("store_batches_total", "counter", s.batches.to_string());
    one("store_errors_total", "counter", s.commit_errors.to_string());
    one(
        "store_seconds_total",
        "counter",
        (s.commit_micros as f64 / 1e6).to_string(),
    );
    one("leases", "gauge", core.lease_count().to_string());
    one("hosts", "gauge", core.host_count().to_string());
    t.push_str("# TYPE drover_coordinator_rollouts gauge\n");
    for (state, n) in core.rollout_counts() {
        t.push_str(&format!(
            "drover_coordinator_rollouts{{state=\"{state}\"}} {n}\n"
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Snapshot;

    #[test]
    fn metrics_are_prometheus_text() {
        let core = Core::new(Snapshot::default(), 30_000, 5_000, 0);
        let stats = Stats {
            commands: 7,
            batches: 3,
            commit_errors: 1,
            commit_micros: 1_500_000,
        };
        assert_eq!(
            metrics(&core, &stats),
            "# TYPE drover_coordinator_commands_total counter\n\
             drover_coordinator_commands_total 7\n\
             # TYPE drover_coordinator_store_batches_total counter\n\
             drover_coordinator_store_batches_total 3\n\
             # TYPE drover_coordinator_store_errors_total counter\n\
             drover_coordinator_store_errors_total 1\n\
             # TYPE drover_coordinator_store_seconds_total counter\n\
             drover_coordinator_store_seconds_total 1.5\n\
             # TYPE drover_coordinator_leases gauge\n\
             drover_coordinator_leases 0\n\
             # TYPE drover_coordinator_hosts gauge\n\
             drover_coordinator_hosts 0\n\
             # TYPE drover_coordinator_rollouts gauge\n"
        );
    }
}
