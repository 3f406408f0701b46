//! The agent's local state: one JSON file per service under `state_dir/services/`, written
//! atomically, plus the repo status and an append-only event log.
//!
//! The state says which release is current and which is the previous one (the backup), which
//! version failed here, and — while a deploy is in flight — its phase and everything needed to
//! finish or undo it after a crash, without Git.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::deploy::Phase;
use crate::fsutil::{self, FileLock};
use crate::spec::{Digest, ResolvedService};

/// Version of the state file format.
pub const FORMAT: u32 = 1;

/// A release on disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// The version.
    pub version: String,
    /// The artifact digest it was built from.
    pub sha256: Digest,
    /// Its directory name under `root/releases/`.
    pub dir: String,
    /// How it was run (rendered service definition), to restart it on rollback. Absent when
    /// the state was rebuilt from disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Box<ResolvedService>>,
}

/// A version that failed on this host and is not retried until the desired version changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    /// The version.
    pub version: String,
    /// Its digest.
    pub sha256: Digest,
    /// Why it failed.
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
}

/// A deploy in flight, recorded before each phase starts (write-ahead).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// The phase being executed.
    pub phase: Phase,
    /// What is being deployed, fully rendered.
    pub target: ResolvedService,
    /// Directory name of the new release under `releases/`.
    pub dir: String,
    /// The release that was current when the deploy started (the rollback target).
    pub from: Option<Release>,
    /// How many times this deploy was started (a crash during it counts as an attempt).
    pub attempts: u32,
    /// Why the deploy is rolling back, once it is.
    pub error: Option<String>,
    /// When the running version was first touched (ms since the epoch): the end of the
    /// "before the switch" baseline window of metric verification.
    #[serde(default)]
    pub touched_at_ms: Option<u64>,
    /// When it started (RFC 3339).
    pub started_at: String,
}

/// A coordinator lease held (or to be released) for this service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseState {
    /// The lease id.
    pub id: String,
    /// A revert lease (its success is a rollback) rather than a deploy lease.
    #[serde(default)]
    pub revert: bool,
    /// The outcome to report: `None` while the deploy runs.
    pub success: Option<bool>,
    /// The error to report with a failure.
    pub message: Option<String>,
    /// The verification verdict to report.
    #[serde(default)]
    pub verification: Option<drover_coordinator::wire::Verification>,
}

/// Everything the agent knows about one service on this host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceState {
    /// File format version.
    pub format: u32,
    /// Service name.
    pub service: String,
    /// Install root (where `releases/` and `current` live).
    pub root: Option<PathBuf>,
    /// The running release.
    pub current: Option<Release>,
    /// The release before it, kept for rollback.
    pub previous: Option<Release>,
    /// The last version that failed here.
    pub failed: Option<Failure>,
    /// A deploy in flight.
    pub deployment: Option<Deployment>,
    /// The last error (deploy, rollback or supervision), cleared by a successful deploy.
    pub last_error: Option<String>,
    /// The coordinator lease of the deploy in flight, or one whose release is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseState>,
    /// A version waiting for its lease (approval, free slot…), to log its retries quietly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// The last metric verification verdict (and the version it was for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<(String, crate::verify::Verdict)>,
    /// Last change (RFC 3339).
    pub updated_at: String,
}

impl ServiceState {
    /// The state of a service never deployed here.
    pub fn new(service: &str) -> ServiceState {
        ServiceState {
            format: FORMAT,
            service: service.to_string(),
            root: None,
            current: None,
            previous: None,
            failed: None,
            deployment: None,
            last_error: None,
            lease: None,
            waiting: None,
            verdict: None,
            updated_at: fsutil::now_rfc3339(),
        }
    }
}

/// Why state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("cannot access state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file exists but is not valid state.
    #[error(
        "state file {path} is damaged ({cause}); drover will not guess what is deployed. \
         It is rebuilt from the releases on disk at the next deploy of this service (the \
         damaged file is kept as {path}.corrupt-<time>); to rebuild it now run \
         `drover-agent once`, or restore it from a backup"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        cause: String,
    },
}

/// The state directory's layout and accessors.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the state directory.
    pub fn open(dir: &Path) -> io::Result<Store> {
        for sub in ["services", "cache", "run", "logs", "git"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where verified artifacts are cached, by digest.
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.join("cache")
    }

    /// Where process-manager pid files live.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// Where process-manager app logs live.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Where the Git mirror lives.
    pub fn git_dir(&self) -> PathBuf {
        self.dir.join("git")
    }

    fn service_path(&self, service: &str) -> PathBuf {
        self.dir.join("services").join(format!("{service}.json"))
    }

    /// Names of every service with a state file.
    pub fn services(&self) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = fs::read_dir(self.dir.join("services"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".json")
                    .filter(|n| !n.starts_with('.'))
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// Reads a service's state; `Ok(None)` if it was never deployed here.
    pub fn load(&self, service: &str) -> Result<Option<ServiceState>, StateError> {
        let path = self.service_path(service);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let state: ServiceState =
            serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                path: path.clone(),
                cause: e.to_string(),
            })?;
        if state.format != FORMAT || state.service != service {
            return Err(StateError::Corrupt {
                path,
                cause: format!(
                    "format {} for service `{}`, expected format {FORMAT} for `{service}`",
                    state.format, state.service
                ),
            });
        }
        Ok(Some(state))
    }

    /// Writes a service's state atomically.
    pub fn save(&self, state: &mut ServiceState) -> Result<(), StateError> {
        state.updated_at = fsutil::now_rfc3339();
        let path = self.service_path(&state.service);
        let json = serde_json::to_vec_pretty(state).expect("state serializes");
        fsutil::write_atomic(&path, &json).map_err(|source| StateError::Io { path, source })
    }

    /// Moves a damaged state file aside (never deleting it) and returns where it went.
    pub fn quarantine(&self, service: &str) -> Result<PathBuf, StateError> {
        let path = self.service_path(service);
        let stamp = fsutil::now_rfc3339().replace(':', "");
        let aside = path.with_file_name(format!("{service}.json.corrupt-{stamp}"));
        fs::rename(&path, &aside).map_err(|source| StateError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(aside)
    }

    /// Takes the per-service operation lock (deploy, rollback), waiting for it.
    pub fn lock_service(&self, service: &str) -> io::Result<FileLock> {
        let path = self.dir.join("services").join(format!(".{service}.lock"));
        FileLock::acquire(&path, true).map(|l| l.expect("waiting lock"))
    }

    /// Takes the daemon lock, so that only one `drover-agent run` uses this state directory.
    pub fn lock_daemon(&self) -> io::Result<Option<FileLock>> {
        FileLock::acquire(&self.dir.join("agent.lock"), false)
    }

    /// Reads the repo status, if any.
    pub fn repo_status(&self) -> Option<RepoStatus> {
        let bytes = fs::read(self.dir.join("repo.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes the repo status.
    pub fn save_repo_status(&self, status: &RepoStatus) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(status).expect("repo status serializes");
        fsutil::write_atomic(&self.dir.join("repo.json"), &json)
    }

    /// Appends one event to `events.jsonl` (rotated to `events.jsonl.1` past 4 MiB).
    pub fn event(&self, event: &Event) {
        let path = self.dir.join("events.jsonl");
        if fs::metadata(&path).is_ok_and(|m| m.len() > 4 << 20) {
            let _ = fs::rename(&path, self.dir.join("events.jsonl.1"));
        }
        let mut line = serde_json::to_vec(event).expect("event serializes");
        line.push(b'\n');
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(&line));
        if let Err(e) = written {
            tracing::warn!(error = %e, path = %path.display(), "cannot append to the event log");
        }
    }

    /// Reads the event log (oldest first).
    pub fn events(&self) -> Vec<Event> {
        fs::read_to_string(self.dir.join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// What the agent last saw of the desired-state repo.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RepoStatus {
    /// The repo URL.
    pub url: String,
    /// The branch.
    pub branch: String,
    /// The commit last read successfully.
    pub commit: Option<String>,
    /// When it was fetched (RFC 3339).
    pub fetched_at: Option<String>,
    /// The current error, if the last fetch or parse failed.
    pub error: Option<String>,
    /// Since when fetching has been failing.
    pub failing_since: Option<String>,
}

/// One line of the event log: a phase of a deploy or rollback on this host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When (RFC 3339).
    pub at: String,
    /// Host name.
    pub host: String,
    /// Service.
    pub service: String,
    /// Version concerned.
    pub version: String,
    /// Phase entered, or an outcome (`deployed`, `rolled_back`, `failed`, …).
    pub phase: String,
    /// Details (an error, a previous version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Event {
    /// An event happening now.
    pub fn now(
        host: &str,
        service: &str,
        version: &str,
        phase: &str,
        detail: Option<String>,
    ) -> Event {
        Event {
            at: fsutil::now_rfc3339(),
            host: host.into(),
            service: service.into(),
            version: version.into(),
            phase: phase.into(),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_corruption_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.load("hello").unwrap().is_none());
        let mut s = ServiceState::new("hello");
        s.current = Some(Release {
            version: "1.0".into(),
            sha256: Digest::parse(&"a".repeat(64)).unwrap(),
            dir: "1.0".into(),
            spec: None,
        });
        store.save(&mut s).unwrap();
        assert_eq!(store.load("hello").unwrap().unwrap(), s);
        assert_eq!(store.services().unwrap(), vec!["hello".to_string()]);

        fs::write(
            dir.path().join("services/hello.json"),
            b"{\"format\": 1, \"serv",
        )
        .unwrap();
        let e = store.load("hello").unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }));
        assert!(
            e.to_string().contains("rebuilt from the releases on disk"),
            "{e}"
        );
        let aside = store.quarantine("hello").unwrap();
        assert!(aside.exists());
        assert!(store.load("hello").unwrap().is_none());
    }

    #[test]
    fn events_append() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for phase in ["stop", "start"] {
            store.event(&Event::now("h", "s", "1", phase, None));
        }
        let ev = store.events();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[1].phase, "start");
    }
}
