//! The agent's local state: one record per service and machine (`state_dir/services/`,
//! `state_dir/ecs/`; see [`Record`]), written atomically, plus the repo status, the locks and
//! an append-only event log.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::fsutil::{self, FileLock};

/// A machine's record of one service: one JSON file under the state dir, written before each
/// phase runs (write-ahead), from which a deploy is finished or undone after a crash. The VM
/// machine's is `vm::VmRecord`, the ECS machine's `ecs::EcsRecord`.
pub trait Record: Serialize + DeserializeOwned {
    /// Its folder under the state dir.
    const DIR: &'static str;
    /// The file format this version writes (and reads).
    const FORMAT: u32;
    /// The service it is of.
    fn service(&self) -> &str;
    /// Its file format.
    fn format(&self) -> u32;
    /// Sets its last change (RFC 3339).
    fn touch(&mut self, at: String);
}

/// Implements [`Record`] for a struct with `service`, `format` and `updated_at` fields:
/// `record!(Type, "folder", FORMAT)`.
macro_rules! record {
    ($t:ty, $dir:literal, $format:expr) => {
        impl $crate::state::Record for $t {
            const DIR: &'static str = $dir;
            const FORMAT: u32 = $format;

            fn service(&self) -> &str {
                &self.service
            }

            fn format(&self) -> u32 {
                self.format
            }

            fn touch(&mut self, at: String) {
                self.updated_at = at;
            }
        }
    };
}
pub(crate) use record;

/// Why state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs, reason = "variant fields are named for what they hold")]
pub enum StateError {
    /// Reading or writing failed.
    #[error("cannot access state file {path}: {source}")]
    Io {
        path: PathBuf,
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
        path: PathBuf,
        /// What is wrong with it.
        cause: String,
    },
}

/// The state directory's layout and accessors.
#[derive(Clone, Debug)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Opens (creating if needed) the state directory.
    pub fn open(dir: &Path) -> io::Result<StateStore> {
        for sub in ["services", "cache", "run", "logs", "git"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        Ok(StateStore {
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

    fn record_path<R: Record>(&self, service: &str) -> PathBuf {
        self.dir.join(R::DIR).join(format!("{service}.json"))
    }

    /// Names of every service with a record of kind `R`.
    pub fn records<R: Record>(&self) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = match fs::read_dir(self.dir.join(R::DIR)) {
            Ok(d) => d
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".json")
                        .filter(|n| !n.starts_with('.'))
                        .map(str::to_string)
                })
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        names.sort();
        Ok(names)
    }

    /// Reads a service's record; `Ok(None)` if there is none (never deployed here).
    pub fn load<R: Record>(&self, service: &str) -> Result<Option<R>, StateError> {
        let path = self.record_path::<R>(service);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let record: R = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            cause: e.to_string(),
        })?;
        if record.format() != R::FORMAT || record.service() != service {
            return Err(StateError::Corrupt {
                path,
                cause: format!(
                    "format {} for service `{}`, expected format {} for `{service}`",
                    record.format(),
                    record.service(),
                    R::FORMAT
                ),
            });
        }
        Ok(Some(record))
    }

    /// Writes a service's record atomically.
    pub fn save<R: Record>(&self, record: &mut R) -> Result<(), StateError> {
        record.touch(fsutil::now_rfc3339());
        let path = self.record_path::<R>(record.service());
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(self.dir.join(R::DIR)).map_err(io)?;
        let json = serde_json::to_vec_pretty(record).expect("a record serializes");
        fsutil::write_atomic(&path, &json).map_err(io)
    }

    /// Moves a damaged record aside (never deleting it) and returns where it went.
    pub fn quarantine<R: Record>(&self, service: &str) -> Result<PathBuf, StateError> {
        let path = self.record_path::<R>(service);
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
    use crate::spec::Digest;
    use crate::vm::{VmRecord, VmRelease};

    #[test]
    fn state_round_trips_and_corruption_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        assert!(store.load::<VmRecord>("hello").unwrap().is_none());
        let mut s = VmRecord::new("hello");
        s.current = Some(VmRelease {
            version: "1.0".into(),
            sha256: Digest::parse(&"a".repeat(64)).unwrap(),
            dir: "1.0".into(),
            spec: None,
        });
        store.save(&mut s).unwrap();
        assert_eq!(store.load::<VmRecord>("hello").unwrap().unwrap(), s);
        assert_eq!(
            store.records::<VmRecord>().unwrap(),
            vec!["hello".to_string()]
        );

        fs::write(
            dir.path().join("services/hello.json"),
            b"{\"format\": 1, \"serv",
        )
        .unwrap();
        let e = store.load::<VmRecord>("hello").unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }));
        assert!(
            e.to_string().contains("rebuilt from the releases on disk"),
            "{e}"
        );
        let aside = store.quarantine::<VmRecord>("hello").unwrap();
        assert!(aside.exists());
        assert!(store.load::<VmRecord>("hello").unwrap().is_none());
    }

    #[test]
    fn a_record_of_another_format_or_service_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut s = VmRecord::new("hello");
        store.save(&mut s).unwrap();
        let path = dir.path().join("services/hello.json");
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("\"format\": 1", "\"format\": 2")).unwrap();
        let e = store.load::<VmRecord>("hello").unwrap_err().to_string();
        assert!(
            e.contains("format 2 for service `hello`, expected format 1"),
            "{e}"
        );
        fs::write(&path, text).unwrap();
        fs::copy(&path, dir.path().join("services/other.json")).unwrap();
        let e = store.load::<VmRecord>("other").unwrap_err().to_string();
        assert!(
            e.contains("for service `hello`, expected format 1 for `other`"),
            "{e}"
        );
    }

    #[test]
    fn events_append() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        for phase in ["stop", "start"] {
            store.event(&Event::now("h", "s", "1", phase, None));
        }
        let ev = store.events();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[1].phase, "start");
    }
}
