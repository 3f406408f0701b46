//! The agent's Prometheus metrics: what happened since the agent started (deploys, phase
//! durations, rollbacks, Git fetches, coordinator contact), counted here as it happens, and
//! what is true now (desired, running and failed versions), read from the state at each
//! scrape. [`render`] is a pure function of both; [`http`] serves it.
//!
//! Names follow Prometheus conventions: `drover_` prefix, units in names, `_total` counters,
//! `_info` metrics carrying a version as a label with the value 1, timestamps in seconds since
//! the epoch (alert on `time() - …`).

pub mod http;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::engine::Reconciled;
use crate::report::{Entry, HostStatus};

/// Upper bounds (seconds) of the phase duration histogram's buckets.
const BUCKETS: [f64; 11] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// At most this many (service, phase) histograms and (service, outcome) counters: services
/// and phases come from Git, and a scrape must stay small whatever a commit holds.
const MAX_SERIES: usize = 4096;

/// The agent's counters, shared by the engine, the Git watcher, the daemon loop and the
/// endpoint. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Counters>>,
}

/// What [`Metrics`] has counted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    /// Deploys ended, by (service, outcome).
    pub deploys: BTreeMap<(String, &'static str), u64>,
    /// Deploys that ended with the previous version running again, by service.
    pub rollbacks: BTreeMap<String, u64>,
    /// Phase durations, by (service, phase).
    pub phases: BTreeMap<(String, String), Histogram>,
    /// The last deploy that passed its checks, by service (seconds since the epoch).
    pub last_success: BTreeMap<String, f64>,
    /// The version the desired state asks of each service (after the coordinator's pins).
    pub desired: BTreeMap<String, String>,
    /// Failed fetches of the desired-state repo.
    pub git_errors: u64,
    /// The last successful fetch (seconds since the epoch).
    pub git_fetched: Option<f64>,
    /// The committer time of the commit last fetched (seconds since the epoch).
    pub git_commit_time: Option<f64>,
    /// The coordinator: whether the last call reached it, when one last did, failures.
    pub coordinator: Option<Contact>,
}

/// The agent's contact with its coordinator.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Contact {
    /// Whether the last heartbeat got an answer.
    pub up: bool,
    /// When one last did (seconds since the epoch).
    pub last: Option<f64>,
    /// Heartbeats that failed.
    pub failures: u64,
}

/// A Prometheus histogram over [`BUCKETS`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Observations at or under each bound (not cumulative; cumulated when rendered).
    pub counts: [u64; BUCKETS.len()],
    /// All observations.
    pub count: u64,
    /// Their sum (seconds).
    pub sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += secs;
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Counters)) {
        // A panic while holding the lock leaves the counters consistent (each update is
        // one insert or add): go on with them.
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> Counters {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A phase of a deploy of `service` ran for `secs`.
    pub fn phase(&self, service: &str, phase: &str, secs: f64) {
        self.with(|c| {
            let key = (service.to_string(), phase.to_string());
            if c.phases.len() < MAX_SERIES || c.phases.contains_key(&key) {
                c.phases.entry(key).or_default().observe(secs);
            }
        });
    }

    /// A deploy of `service` ended with `outcome` (outcomes that are not the end of a deploy,
    /// such as waiting for a lease, are not counted).
    pub fn ended(&self, service: &str, outcome: &Reconciled) {
        let Some(name) = outcome_label(outcome) else {
            return;
        };
        self.with(|c| {
            let key = (service.to_string(), name);
            if c.deploys.len() < MAX_SERIES || c.deploys.contains_key(&key) {
                *c.deploys.entry(key).or_default() += 1;
            }
            match outcome {
                Reconciled::Deployed { .. } => {
                    c.last_success.insert(service.to_string(), now());
                }
                Reconciled::RolledBack { .. } => {
                    *c.rollbacks.entry(service.to_string()).or_default() += 1;
                }
                _ => {}
            }
        });
    }

    /// The desired state now asks for these (service, version).
    pub fn desired<'a>(&self, services: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let desired: BTreeMap<String, String> = services
            .into_iter()
            .take(MAX_SERIES)
            .map(|(s, v)| (s.to_string(), v.to_string()))
            .collect();
        self.with(|c| c.desired = desired);
    }

    /// A fetch of the desired-state repo succeeded; its commit was made at `commit_time_ms`.
    pub fn fetched(&self, commit_time_ms: u64) {
        self.with(|c| {
            c.git_fetched = Some(now());
            c.git_commit_time = Some(commit_time_ms as f64 / 1000.0);
        });
    }

    /// A fetch of the desired-state repo failed.
    pub fn fetch_failed(&self) {
        self.with(|c| c.git_errors += 1);
    }

    /// A heartbeat reached the coordinator (`true`) or did not.
    pub fn coordinator(&self, reached: bool) {
        self.with(|c| {
            let contact = c.coordinator.get_or_insert_with(Contact::default);
            contact.up = reached;
            if reached {
                contact.last = Some(now());
            } else {
                contact.failures += 1;
            }
        });
    }
}

/// The `outcome` label of a deploy that ended, or `None` for a reconcile that did not deploy.
fn outcome_label(outcome: &Reconciled) -> Option<&'static str> {
    Some(match outcome {
        Reconciled::Deployed { .. } => "deployed",
        Reconciled::RolledBack { .. } => "rolled_back",
        Reconciled::Abandoned { .. } => "abandoned",
        Reconciled::Broken { .. } => "broken",
        Reconciled::Ran {
            elsewhere: None, ..
        } => "ran",
        Reconciled::Failed { .. } => "job_failed",
        Reconciled::Ran { .. }
        | Reconciled::UpToDate { .. }
        | Reconciled::Started { .. }
        | Reconciled::SkippedFailed { .. }
        | Reconciled::Waiting { .. } => return None,
    })
}

/// A label value in the exposition format: backslash, double quote and newline escaped.
fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The sample of an `_info` metric of `service` at `version`, if it has one.
fn version_info(service: &str, version: Option<&str>) -> Option<String> {
    version.map(|v| {
        format!(
            "{{service=\"{}\",version=\"{}\"}} 1",
            label(service),
            label(v)
        )
    })
}

/// One metric family: `# HELP`, `# TYPE`, then `samples` (lines after the name).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[String]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for s in samples {
        let _ = writeln!(out, "{name}{s}");
    }
}

/// What one service is now, read from the state.
struct Now<'a> {
    running: Option<&'a str>,
    failed: Option<&'a str>,
    deploying: bool,
}

fn services_now(status: &HostStatus) -> BTreeMap<&str, Now<'_>> {
    let mut out = BTreeMap::new();
    for (name, entry) in &status.services {
        if let Entry::Read(s) = entry {
            out.insert(
                name.as_str(),
                Now {
                    running: s.current.as_deref(),
                    failed: s.failed.as_ref().map(|f| f.version.as_str()),
                    deploying: s.deploying.is_some(),
                },
            );
        }
    }
    for (name, entry) in status.ecs.iter().flatten() {
        if let Entry::Read(s) = entry {
            out.insert(
                name.as_str(),
                Now {
                    running: s.current.as_ref().map(|c| c.version.as_str()),
                    failed: s.failed.as_ref().map(|f| f.version.as_str()),
                    deploying: s.deploying.is_some(),
                },
            );
        }
    }
    out
}

/// The exposition text (format 0.0.4) of `counters` and the state `status`.
pub fn render(status: &HostStatus, counters: &Counters) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "drover_agent_info",
        "gauge",
        "The agent: its host, environment and version.",
        &[format!(
            "{{host=\"{}\",environment=\"{}\",version=\"{}\"}} 1",
            label(&status.host),
            label(&status.environment),
            env!("CARGO_PKG_VERSION")
        )],
    );
    let now = services_now(status);
    let mut names: Vec<&str> = now.keys().copied().collect();
    names.extend(counters.desired.keys().map(String::as_str));
    names.sort_unstable();
    names.dedup();
    let per = |f: &dyn Fn(&str) -> Option<String>| -> Vec<String> {
        names.iter().filter_map(|n| f(n)).collect()
    };
    family(
        &mut out,
        "drover_service_desired_version_info",
        "gauge",
        "The version the desired state (or the coordinator's rollback) asks of a service.",
        &per(&|n| version_info(n, counters.desired.get(n).map(String::as_str))),
    );
    family(
        &mut out,
        "drover_service_running_version_info",
        "gauge",
        "The version a service runs.",
        &per(&|n| version_info(n, now.get(n).and_then(|s| s.running))),
    );
    family(
        &mut out,
        "drover_service_failed_version_info",
        "gauge",
        "A version marked failed on this host (not retried until the desired version changes).",
        &per(&|n| version_info(n, now.get(n).and_then(|s| s.failed))),
    );
    family(
        &mut out,
        "drover_service_converged",
        "gauge",
        "1 when a service runs its desired version and no deploy is under way, else 0.",
        &per(&|n| {
            let desired = counters.desired.get(n)?;
            let s = now.get(n);
            let ok = s.is_some_and(|s| s.running == Some(desired.as_str()) && !s.deploying);
            Some(format!("{{service=\"{}\"}} {}", label(n), u8::from(ok)))
        }),
    );
    family(
        &mut out,
        "drover_service_deploying",
        "gauge",
        "1 while a deploy (or its rollback) of a service is under way, else 0.",
        &per(&|n| {
            let s = now.get(n)?;
            Some(format!(
                "{{service=\"{}\"}} {}",
                label(n),
                u8::from(s.deploying)
            ))
        }),
    );
    family(
        &mut out,
        "drover_deploys_total",
        "counter",
        "Deploys ended since the agent started, by outcome (deployed, rolled_back, abandoned, broken).",
        &counters
            .deploys
            .iter()
            .map(|((s, o), n)| format!("{{service=\"{}\",outcome=\"{o}\"}} {n}", label(s)))
            .collect::<Vec<_>>(),
    );
    family(
        &mut out,
        "drover_rollbacks_total",
        "counter",
        "Deploys since the agent started that ended with the previous version running again.",
        &counters
            .rollbacks
            .iter()
            .map(|(s, n)| format!("{{service=\"{}\"}} {n}", label(s)))
            .collect::<Vec<_>>(),
    );
    family(
        &mut out,
        "drover_last_success_timestamp_seconds",
        "gauge",
        "When a deploy of a service last passed its checks (since the agent started).",
        &counters
            .last_success
            .iter()
            .map(|(s, t)| format!("{{service=\"{}\"}} {t:.3}", label(s)))
            .collect::<Vec<_>>(),
    );
    let mut hist = Vec::new();
    for ((s, p), h) in &counters.phases {
        let l = format!("service=\"{}\",phase=\"{}\"", label(s), label(p));
        let mut cum = 0;
        for (b, c) in BUCKETS.iter().zip(h.counts) {
            cum += c;
            hist.push(format!("_bucket{{{l},le=\"{b}\"}} {cum}"));
        }
        hist.push(format!("_bucket{{{l},le=\"+Inf\"}} {}", h.count));
        hist.push(format!("_sum{{{l}}} {:.3}", h.sum));
        hist.push(format!("_count{{{l}}} {}", h.count));
    }
    family(
        &mut out,
        "drover_deploy_phase_duration_seconds",
        "histogram",
        "How long each phase of a deploy took.",
        &hist,
    );
    family(
        &mut out,
        "drover_git_fetch_errors_total",
        "counter",
        "Failed fetches of the desired-state repo since the agent started.",
        &[format!(" {}", counters.git_errors)],
    );
    if let Some(t) = counters.git_fetched {
        family(
            &mut out,
            "drover_git_last_fetch_timestamp_seconds",
            "gauge",
            "When the desired-state repo was last fetched successfully.",
            &[format!(" {t:.3}")],
        );
    }
    if let Some(t) = counters.git_commit_time {
        family(
            &mut out,
            "drover_git_commit_timestamp_seconds",
            "gauge",
            "The committer time of the desired-state commit last fetched (its age: time() minus this).",
            &[format!(" {t:.3}")],
        );
    }
    if let Some(c) = &counters.coordinator {
        family(
            &mut out,
            "drover_agent_coordinator_up",
            "gauge",
            "1 when the last heartbeat reached the coordinator, else 0.",
            &[format!(" {}", u8::from(c.up))],
        );
        family(
            &mut out,
            "drover_agent_coordinator_failures_total",
            "counter",
            "Heartbeats that did not reach the coordinator since the agent started.",
            &[format!(" {}", c.failures)],
        );
        if let Some(t) = c.last {
            family(
                &mut out,
                "drover_agent_coordinator_last_contact_timestamp_seconds",
                "gauge",
                "When a heartbeat last reached the coordinator.",
                &[format!(" {t:.3}")],
            );
        }
    }
    out
}

#[cfg(test)]
mod tests;
