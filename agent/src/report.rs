//! What `drover-agent status` reports, as data: built once from the local state, then
//! serialized for `--json` or rendered as a table, so the two cannot disagree.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::ecs::Colour;
use crate::ecs::{EcsFailure, EcsRelease};
use crate::state::RepoStatus;
use crate::verify::{MetricVerdict, Risk};
use crate::vm::VmFailure;
use crate::vm::VmPhase;

/// The host and every service the agent keeps state for.
#[derive(Clone, Debug, Serialize)]
pub struct HostStatus {
    /// This host's name.
    pub host: String,
    /// Its environment.
    pub environment: String,
    /// The desired-state repo as last fetched.
    pub repo: Option<RepoStatus>,
    /// VM services.
    pub services: BTreeMap<String, Entry<ServiceStatus>>,
    /// ECS services, for an agent in ECS mode.
    pub ecs: Option<BTreeMap<String, Entry<EcsStatus>>>,
    /// Jobs (`kind: job`) this host ran or heard of.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub jobs: BTreeMap<String, Entry<JobStatus>>,
}

/// A job as this host knows it.
#[derive(Clone, Debug, Serialize)]
pub struct JobStatus {
    /// The last version done: here (with its output's last lines) or elsewhere.
    pub done: Option<crate::job::JobDone>,
    /// The last version that failed here.
    pub failed: Option<crate::job::JobFailure>,
    /// A run under way (or interrupted): version and phase.
    pub running: Option<(String, crate::job::JobPhase)>,
    /// The last error.
    pub last_error: Option<String>,
}

/// A service's status, or why its state file could not be read.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Entry<T> {
    /// Read.
    Read(T),
    /// Unreadable.
    Unreadable {
        /// Why.
        error: String,
    },
}

/// A VM service on this host.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceStatus {
    /// The running version.
    pub current: Option<String>,
    /// The release kept to roll back to.
    pub previous: Option<String>,
    /// The version that failed here, not retried until the desired version changes.
    pub failed: Option<VmFailure>,
    /// A deploy in progress (or interrupted).
    pub deploying: Option<Deploying>,
    /// The app, when the agent supervises it (`service_manager: process`) and it runs.
    pub process: Option<Running>,
    /// The last error.
    pub last_error: Option<String>,
    /// The last metric verification.
    pub verdict: Option<VerdictView>,
    /// The install root.
    pub root: Option<PathBuf>,
    /// When the state last changed (RFC 3339).
    pub updated_at: String,
}

/// A VM deploy under way.
#[derive(Clone, Debug, Serialize)]
pub struct Deploying {
    /// To this version.
    pub version: String,
    /// In this phase.
    pub phase: VmPhase,
    /// Started this many times (an agent crash restarts it).
    pub attempts: u32,
    /// Since (RFC 3339).
    pub since: String,
}

/// A supervised app process.
#[derive(Clone, Debug, Serialize)]
pub struct Running {
    /// Its pid.
    pub pid: i32,
    /// The version it runs.
    pub version: String,
    /// Since (RFC 3339).
    pub since: String,
}

/// A metric verification verdict.
#[derive(Clone, Debug, Serialize)]
pub struct VerdictView {
    /// Of this version.
    pub version: String,
    /// Its risk.
    pub risk: Risk,
    /// In one line.
    pub summary: String,
    /// Per metric.
    pub metrics: Vec<MetricVerdict>,
}

/// An ECS service of this agent's cluster.
#[derive(Clone, Debug, Serialize)]
pub struct EcsStatus {
    /// The live version.
    pub current: Option<EcsRelease>,
    /// The version that failed, not retried until it or its definition changes.
    pub failed: Option<EcsFailure>,
    /// A deploy in progress (or interrupted).
    pub deploying: Option<EcsDeploying>,
    /// The last error.
    pub last_error: Option<String>,
}

/// An ECS deploy under way.
#[derive(Clone, Debug, Serialize)]
pub struct EcsDeploying {
    /// To this version.
    pub version: String,
    /// In this phase (`traffic_shift_50`, …).
    pub phase: String,
    /// The side serving before it began.
    pub live: Colour,
}

impl HostStatus {
    /// The JSON of `drover-agent status --json`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a status serializes")
    }

    /// The table of `drover-agent status` (text from apps and hooks is not made printable
    /// here: the caller does, for the terminal).
    pub fn table(&self) -> String {
        let mut out = format!("host {} — environment {}\n", self.host, self.environment);
        if let Some(repo) = &self.repo {
            out.push_str(&format!(
                "repo {} ({}) at {}{}\n",
                repo.url,
                repo.branch,
                repo.commit
                    .as_deref()
                    .map(|c| &c[..c.len().min(12)])
                    .unwrap_or("-"),
                repo.error
                    .as_deref()
                    .map(|e| format!("\n  error: {e}"))
                    .unwrap_or_default()
            ));
        }
        out.push_str(&format!(
            "{:<16} {:<14} {:<14} {:<22} {}\n",
            "SERVICE", "CURRENT", "PREVIOUS", "STATE", "LAST ERROR"
        ));
        for (name, entry) in &self.services {
            let s = match entry {
                Entry::Read(s) => s,
                Entry::Unreadable { error } => {
                    out.push_str(&format!("{name:<16} {error}\n"));
                    continue;
                }
            };
            let state = if let Some(d) = &s.deploying {
                format!("deploying {} ({})", d.version, d.phase.name())
            } else if let Some(p) = &s.process {
                format!("running pid {}", p.pid)
            } else if let Some(f) = &s.failed {
                format!("{} failed", f.version)
            } else {
                "-".into()
            };
            out.push_str(&format!(
                "{name:<16} {:<14} {:<14} {:<22} {}\n",
                s.current.as_deref().unwrap_or("-"),
                s.previous.as_deref().unwrap_or("-"),
                state,
                s.last_error.as_deref().unwrap_or("")
            ));
        }
        for (name, entry) in &self.jobs {
            let j = match entry {
                Entry::Read(j) => j,
                Entry::Unreadable { error } => {
                    out.push_str(&format!("{name:<16} {error}\n"));
                    continue;
                }
            };
            let state = match (&j.running, &j.failed, &j.done) {
                (Some((v, p)), _, _) => format!("job {v} {}", p.name()),
                (None, Some(f), _) => format!("job {} failed", f.version),
                (None, None, Some(d)) if d.elsewhere.is_some() => {
                    format!("job {} done elsewhere", d.version)
                }
                (None, None, Some(d)) => format!("job {} ran here", d.version),
                _ => "job".into(),
            };
            out.push_str(&format!(
                "{name:<16} {:<14} {:<14} {:<22} {}\n",
                j.done.as_ref().map_or("-", |d| d.version.as_str()),
                "-",
                state,
                j.last_error.as_deref().unwrap_or("")
            ));
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A host with one service rolling back and one unreadable.
    pub(crate) fn status() -> HostStatus {
        let hello = ServiceStatus {
            current: Some("1.0".into()),
            previous: Some("0.9".into()),
            failed: None,
            deploying: Some(Deploying {
                version: "2.0".into(),
                phase: VmPhase::RollBack,
                attempts: 1,
                since: "2026-12-02T10:00:00.000Z".into(),
            }),
            process: None,
            last_error: Some("health check failed".into()),
            verdict: None,
            root: Some("/opt/hello".into()),
            updated_at: "2026-12-02T10:00:01.000Z".into(),
        };
        HostStatus {
            host: "web-1".into(),
            environment: "prod".into(),
            repo: None,
            services: BTreeMap::from([
                ("hello".to_string(), Entry::Read(hello)),
                (
                    "odd".to_string(),
                    Entry::Unreadable {
                        error: "state file is corrupt".into(),
                    },
                ),
            ]),
            ecs: None,
            jobs: BTreeMap::new(),
        }
    }

    #[test]
    fn json_and_table_come_from_the_same_data() {
        let s = status();
        let j = s.json();
        assert_eq!(j["services"]["hello"]["current"], "1.0");
        assert_eq!(j["services"]["hello"]["deploying"]["phase"], "roll_back");
        assert_eq!(j["services"]["hello"]["process"], serde_json::Value::Null);
        assert_eq!(j["services"]["odd"]["error"], "state file is corrupt");
        assert_eq!(j["repo"], serde_json::Value::Null);
        assert_eq!(j["ecs"], serde_json::Value::Null);
        let t = s.table();
        assert!(t.starts_with("host web-1 — environment prod\n"), "{t}");
        assert!(
            t.contains("hello            1.0            0.9            deploying 2.0 (rollback) health check failed"),
            "{t}"
        );
        assert!(t.contains("odd              state file is corrupt"), "{t}");
    }
}
