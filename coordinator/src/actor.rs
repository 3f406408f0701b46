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
    AcquireRequest, GateRequest, Granted, Heartbeat, HeartbeatReply, History, ReleaseRequest,
    Renewed, RolloutReply, Status, TrafficRequest,
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
    Renew(String, Caller, Reply<Renewed>),
    /// Release a lease.
    Release(String, ReleaseRequest, Caller, Reply<RolloutReply>),
    /// The holder of a lease waits at a step gate.
    Gate(String, GateRequest, Caller, Reply<RolloutReply>),
    /// The holder of a lease set its new side's traffic weight.
    Traffic(String, TrafficRequest, Caller, Reply<RolloutReply>),
    /// One rollout in full, by id.
    Rollout(u64, Reply<RolloutReply>),
    /// A host's heartbeat.
    Heartbeat(String, Heartbeat, Caller, Reply<HeartbeatReply>),
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
        /// Approve it during a freeze of its environment (admins; `approve` is true).
        during_freeze: bool,
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
    /// The sender's report of an attempt at a notification.
    Delivered(String, crate::notify::Attempt),
    /// Notifications waiting or given up, and open incidents.
    Notifications(Reply<crate::notify::Listing>),
}

/// Counters kept by the actor.
#[derive(Default, Debug)]
struct Stats {
    commands: u64,
    batches: u64,
    commit_errors: u64,
    commit_micros: u64,
    /// Requests answered 503 because the store could not be written.
    unavailable: u64,
    /// Audit entries removed by the retention.
    audit_pruned: u64,
    /// Whether the store is read-only now (a write failed).
    read_only: bool,
}

/// How the actor runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often leases and approvals are checked for time-outs.
    pub tick: Duration,
    /// Audit entries older than this are removed.
    pub audit_max_age: Duration,
    /// At most this many audit entries are kept (the newest).
    pub audit_max_entries: u64,
    /// Where stored notification deliveries go to be sent (none: they wait in the outbox).
    pub outbox: Option<tokio::sync::mpsc::UnboundedSender<crate::notify::Delivery>>,
    /// Bumped each time changes are stored (the dashboard's live updates follow it).
    pub generation: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            tick: Duration::from_millis(250),
            audit_max_age: Duration::from_secs(400 * 24 * 3600),
            audit_max_entries: 1_000_000,
            outbox: None,
            generation: None,
        }
    }
}

/// How often the audit retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// First and longest wait between probes of a store that failed a write.
const PROBE_FIRST: Duration = Duration::from_secs(1);
const PROBE_MAX: Duration = Duration::from_secs(30);

/// The store failed a write: the coordinator answers reads and renewals, refuses changes
/// with 503, and probes the store with backoff until a write works again.
struct ReadOnly {
    why: String,
    next_probe: Instant,
    backoff: Duration,
    /// The newest desired state read from Git meanwhile, applied on recovery.
    held: Option<Box<Update>>,
}

impl ReadOnly {
    fn error(&self) -> ApiError {
        ApiError::unavailable(
            self.backoff.as_millis() as u64,
            format!(
                "the coordinator cannot write its store ({}); it answers reads and lease renewals and refuses changes until the store can be written again; retry later",
                self.why
            ),
        )
    }
}

impl Command {
    /// Refuses a command that would change the state (while the store is read-only); returns
    /// the command back if it does not change anything.
    fn refuse(self, e: &ApiError) -> Option<Command> {
        match self {
            Command::Acquire(_, _, r) => drop(r.send(Err(e.clone()))),
            Command::Release(_, _, _, r)
            | Command::Gate(_, _, _, r)
            | Command::Traffic(_, _, _, r) => drop(r.send(Err(e.clone()))),
            Command::Heartbeat(_, _, _, r) => drop(r.send(Err(e.clone()))),
            Command::Decide { reply, .. }
            | Command::Retry { reply, .. }
            | Command::Rollback { reply, .. }
            | Command::Operate { reply, .. } => drop(reply.send(Err(e.clone()))),
            other => return Some(other),
        }
        None
    }
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
    settings: Settings,
    wake_git: Option<tokio::sync::mpsc::Sender<()>>,
) {
    let tick = settings.tick;
    let mut stats = Stats::default();
    let mut last_tick = Instant::now();
    let mut last_prune: Option<Instant> = None;
    let mut read_only: Option<ReadOnly> = None;
    if let Some(o) = &settings.outbox {
        // What was stored before a restart and not delivered yet.
        for d in core.pending_deliveries() {
            let _ = o.send(d);
        }
    }
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
            let cmd = match &mut read_only {
                None => cmd,
                Some(ro) => match cmd {
                    Command::Desired(update) => {
                        ro.held = Some(update);
                        continue;
                    }
                    // Not stored while read-only; the tracing log has it.
                    Command::Denied { who, what, why } => {
                        tracing::warn!(%who, %what, %why, "denied (not audited: the store is read-only)");
                        continue;
                    }
                    cmd => match cmd.refuse(&ro.error()) {
                        Some(c) => c,
                        None => {
                            stats.unavailable += 1;
                            continue;
                        }
                    },
                },
            };
            match cmd {
                Command::Acquire(req, caller, reply) => {
                    let r = core.acquire(&req, &caller, now);
                    pending.push(deferred(reply, r));
                }
                Command::Renew(id, caller, reply) => {
                    let r = core
                        .check_holder(&id, &caller, "renew lease", now)
                        .and_then(|()| core.renew(&id, now));
                    pending.push(deferred(reply, r));
                }
                Command::Release(id, req, caller, reply) => {
                    let r = core
                        .check_holder(&id, &caller, "release lease", now)
                        .and_then(|()| core.release(&id, &req, now))
                        .map(|rollout| RolloutReply { rollout });
                    pending.push(deferred(reply, r));
                }
                Command::Gate(id, req, caller, reply) => {
                    let r = core
                        .check_holder(&id, &caller, "step gate", now)
                        .and_then(|()| core.step_gate(&id, &req.step, now))
                        .map(|rollout| RolloutReply { rollout });
                    pending.push(deferred(reply, r));
                }
                Command::Traffic(id, req, caller, reply) => {
                    let r = core
                        .check_holder(&id, &caller, "report traffic", now)
                        .and_then(|()| core.traffic(&id, req.percent, now))
                        .map(|rollout| RolloutReply { rollout });
                    pending.push(deferred(reply, r));
                }
                Command::Rollout(id, reply) => {
                    let r = core
                        .rollout(id, now)
                        .map(|rollout| RolloutReply { rollout })
                        .ok_or_else(|| ApiError::not_found(format!("no rollout {id}")));
                    let _ = reply.send(r);
                }
                Command::Heartbeat(host, hb, caller, reply) => {
                    let r = core.heartbeat(&host, &hb, &caller, now);
                    pending.push(deferred(reply, r));
                }
                Command::Decide {
                    env,
                    service,
                    version,
                    approve,
                    during_freeze,
                    caller,
                    reply,
                } => {
                    let r = if during_freeze {
                        core.approve_during_freeze(&env, &service, &version, &caller, now)
                    } else {
                        core.decide(&env, &service, &version, approve, &caller, now)
                    }
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
                Command::Desired(update) => apply(&mut core, *update, now),
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
                    stats.read_only = read_only.is_some();
                    let _ = reply.send(Ok(metrics(&core, &stats)));
                }
                Command::Delivered(id, attempt) => core.delivered(&id, attempt, now),
                Command::Notifications(reply) => {
                    let _ = reply.send(Ok(crate::notify::Listing {
                        deliveries: core.notifications(),
                        incidents: core.incidents(),
                    }));
                }
            }
        }
        if let Some(ro) = &mut read_only {
            // Only renewals (kept in memory) were served: nothing to write. Probe the store.
            let dropped = core.take_changes();
            if !dropped.is_empty() {
                tracing::warn!(
                    changes = dropped.len(),
                    "not stored: the store is read-only"
                );
            }
            for p in pending {
                p(Ok(()));
            }
            if Instant::now() >= ro.next_probe {
                match store.probe() {
                    Ok(()) => {
                        tracing::info!("the store can be written again; leaving read-only mode");
                        if let Some(u) = ro.held.take() {
                            apply(&mut core, *u, now);
                        }
                        read_only = None;
                    }
                    Err(e) => {
                        ro.backoff = (ro.backoff * 2).min(PROBE_MAX);
                        ro.next_probe = Instant::now() + ro.backoff;
                        ro.why = e.to_string();
                        tracing::warn!(error = %e, retry_in = ?ro.backoff, "the store is still not writable");
                    }
                }
            }
        } else {
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
                    if let Some(g) = &settings.generation
                        && !changes.is_empty()
                    {
                        g.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    // Only once stored: a delivery is never sent for a change that was not.
                    if let Some(o) = &settings.outbox {
                        for c in &changes {
                            if let crate::core::Change::Outbox(d) = c
                                && d.failed_at_ms.is_none()
                            {
                                let _ = o.send((**d).clone());
                            }
                        }
                    }
                }
                Err(e) => {
                    stats.commit_errors += 1;
                    tracing::error!(error = %e, changes = changes.len(), "store write failed; read-only until the store can be written again");
                    let ro = ReadOnly {
                        why: e.to_string(),
                        next_probe: Instant::now() + PROBE_FIRST,
                        backoff: PROBE_FIRST,
                        held: None,
                    };
                    // The changes of this batch were not stored: go back to what the store
                    // holds, once, keeping each lease's expiry (a reload must not extend them).
                    let expiries = core.lease_expiries();
                    match store.load() {
                        Ok(snap) => {
                            let max_hosts = core.max_hosts;
                            let channels = std::mem::take(&mut core.channels);
                            core = Core::new(snap, core.lease_ttl_ms, core.heartbeat_ms, now);
                            core.max_hosts = max_hosts;
                            core.channels = channels;
                            core.keep_expiries(&expiries);
                        }
                        Err(e2) => tracing::error!(error = %e2, "reloading state failed"),
                    }
                    let err = ro.error();
                    for p in pending {
                        stats.unavailable += 1;
                        p(Err(&err));
                    }
                    read_only = Some(ro);
                }
            }
            if read_only.is_none() && last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
                last_prune = Some(Instant::now());
                let before = now.saturating_sub(settings.audit_max_age.as_millis() as u64);
                match store.prune_audit(before, settings.audit_max_entries) {
                    Ok(0) => {}
                    Ok(n) => {
                        stats.audit_pruned += n;
                        tracing::info!(removed = n, "audit retention removed old entries");
                    }
                    Err(e) => tracing::warn!(error = %e, "audit retention failed"),
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

fn apply(core: &mut Core, update: Update, now: u64) {
    match update {
        Update::Desired(d) => core.apply_desired(d, now),
        Update::Refused(r) => core.refuse(r, now),
        Update::Error(e) => core.git_error(e),
    }
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
    one("unavailable_total", "counter", s.unavailable.to_string());
    one(
        "store_read_only",
        "gauge",
        u8::from(s.read_only).to_string(),
    );
    one("audit_pruned_total", "counter", s.audit_pruned.to_string());
    one("leases", "gauge", core.lease_count().to_string());
    one("hosts", "gauge", core.host_count().to_string());
    let (waiting, failed, delivered, gave_up) = core.notification_counts();
    t.push_str("# TYPE drover_coordinator_notifications gauge\n");
    t.push_str(&format!(
        "drover_coordinator_notifications{{state=\"waiting\"}} {waiting}\n\
         drover_coordinator_notifications{{state=\"failed\"}} {failed}\n"
    ));
    t.push_str("# TYPE drover_coordinator_notifications_total counter\n");
    t.push_str(&format!(
        "drover_coordinator_notifications_total{{result=\"delivered\"}} {delivered}\n\
         drover_coordinator_notifications_total{{result=\"gave_up\"}} {gave_up}\n"
    ));
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
            unavailable: 2,
            audit_pruned: 4,
            read_only: true,
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
             # TYPE drover_coordinator_unavailable_total counter\n\
             drover_coordinator_unavailable_total 2\n\
             # TYPE drover_coordinator_store_read_only gauge\n\
             drover_coordinator_store_read_only 1\n\
             # TYPE drover_coordinator_audit_pruned_total counter\n\
             drover_coordinator_audit_pruned_total 4\n\
             # TYPE drover_coordinator_leases gauge\n\
             drover_coordinator_leases 0\n\
             # TYPE drover_coordinator_hosts gauge\n\
             drover_coordinator_hosts 0\n\
             # TYPE drover_coordinator_notifications gauge\n\
             drover_coordinator_notifications{state=\"waiting\"} 0\n\
             drover_coordinator_notifications{state=\"failed\"} 0\n\
             # TYPE drover_coordinator_notifications_total counter\n\
             drover_coordinator_notifications_total{result=\"delivered\"} 0\n\
             drover_coordinator_notifications_total{result=\"gave_up\"} 0\n\
             # TYPE drover_coordinator_rollouts gauge\n"
        );
    }
}
