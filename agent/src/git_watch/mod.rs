//! The desired-state repo: a bare mirror under `state_dir/git/`, fetched with gix over
//! file://, http(s)://, git:// or ssh, polled with jitter (and, for a repo on this machine,
//! watched with inotify for instant reaction).
//!
//! The fetch refspec is forced (`+refs/heads/B:refs/remotes/origin/B`), so force-pushes and
//! rewritten history are followed: the desired state is whatever the branch tip says. Files are
//! read straight from the commit's tree; nothing is checked out.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gix::remote::Direction;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch};

use crate::artifact::error_chain;
use crate::config::RepoConfig;
use crate::fsutil;
use crate::spec::is_spec_file;
use crate::state::{RepoStatus, Store};

/// Why the repo could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// Fetching failed (unreachable server, wrong URL, authentication…).
    #[error("cannot fetch {url}: {message}")]
    Fetch {
        /// The repo URL.
        url: String,
        /// What gix said.
        message: String,
    },
    /// The branch does not exist on the remote.
    #[error("branch `{branch}` not found in {url}")]
    NoBranch {
        /// The repo URL.
        url: String,
        /// The branch.
        branch: String,
    },
    /// The fetch did not finish in time.
    #[error("fetching {url} timed out after {after:?}")]
    Timeout {
        /// The repo URL.
        url: String,
        /// The limit.
        after: Duration,
    },
    /// The local mirror is unusable.
    #[error("local mirror {path}: {message}")]
    Mirror {
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Reading the commit's files failed.
    #[error("reading commit {commit}: {message}")]
    Read {
        /// The commit.
        commit: String,
        /// What is wrong.
        message: String,
    },
}

/// The desired-state files of one commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The commit id (hex).
    pub commit: String,
    /// Its committer time, ms since the epoch.
    pub commit_time_ms: u64,
    /// `services/*.yaml` and `environments/*.yaml`, as (path, content).
    pub files: Vec<(String, String)>,
}

/// A bare mirror of the desired-state repo.
#[derive(Debug)]
pub struct Mirror {
    path: PathBuf,
    url: String,
    branch: String,
    busy: AtomicBool,
}

impl Mirror {
    /// The mirror of `url` under `git_dir` (one per URL).
    pub fn new(git_dir: &Path, url: &str, branch: &str) -> Mirror {
        let id = hex::encode(&Sha256::digest(url.as_bytes())[..6]);
        Mirror {
            path: git_dir.join(format!("{id}.git")),
            url: url.to_string(),
            branch: branch.to_string(),
            busy: AtomicBool::new(false),
        }
    }

    fn mirror_err(&self, e: impl std::fmt::Display) -> GitError {
        GitError::Mirror {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn open(&self) -> Result<gix::Repository, GitError> {
        if self.path.join("HEAD").is_file() {
            match gix::open(&self.path) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "mirror unusable; re-creating it");
                    std::fs::remove_dir_all(&self.path).map_err(|e| self.mirror_err(e))?;
                }
            }
        } else if self.path.exists() {
            // A crash during creation: start over.
            std::fs::remove_dir_all(&self.path).map_err(|e| self.mirror_err(e))?;
        }
        let tmp = self.path.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        gix::init_bare(&tmp).map_err(|e| self.mirror_err(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.mirror_err(e))?;
        gix::open(&self.path).map_err(|e| self.mirror_err(e))
    }

    /// Fetches the branch and returns its tip. Blocking.
    pub fn fetch(&self, interrupt: &AtomicBool) -> Result<String, GitError> {
        let repo = self.open()?;
        let fetch_err = |e: &dyn std::error::Error| GitError::Fetch {
            url: self.url.clone(),
            message: error_chain(e),
        };
        let b = &self.branch;
        let remote = repo
            .remote_at(self.url.as_str())
            .map_err(|e| fetch_err(&e))?
            .with_refspecs(
                [format!("+refs/heads/{b}:refs/remotes/origin/{b}").as_str()],
                Direction::Fetch,
            )
            .map_err(|e| fetch_err(&e))?
            .with_fetch_tags(gix::remote::fetch::Tags::None);
        let no_branch = || GitError::NoBranch {
            url: self.url.clone(),
            branch: b.clone(),
        };
        let conn = remote
            .connect(Direction::Fetch)
            .map_err(|e| fetch_err(&e))?;
        // gix refuses a fetch whose refspec matches nothing: the branch is missing.
        let classify = |e: &dyn std::error::Error| {
            let err = fetch_err(e);
            if err.to_string().contains("matched any of") {
                no_branch()
            } else {
                err
            }
        };
        let outcome = conn
            .prepare_fetch(gix::progress::Discard, Default::default())
            .map_err(|e| classify(&e))?
            .receive(gix::progress::Discard, interrupt)
            .map_err(|e| classify(&e))?;
        if outcome.ref_map.mappings.is_empty() {
            return Err(no_branch());
        }
        let name = format!("refs/remotes/origin/{b}");
        let mut reference = repo
            .find_reference(name.as_str())
            .map_err(|e| fetch_err(&e))?;
        let id = reference.peel_to_id().map_err(|e| fetch_err(&e))?;
        Ok(id.to_string())
    }

    /// Reads the desired-state files of `commit` from the mirror. Blocking.
    pub fn read(&self, commit: &str) -> Result<Snapshot, GitError> {
        let read_err = |e: &dyn std::fmt::Display| GitError::Read {
            commit: commit.to_string(),
            message: e.to_string(),
        };
        let repo = gix::open(&self.path).map_err(|e| self.mirror_err(e))?;
        let id = gix::ObjectId::from_hex(commit.as_bytes()).map_err(|e| read_err(&e))?;
        let commit_obj = repo
            .find_object(id)
            .map_err(|e| read_err(&e))?
            .peel_to_commit()
            .map_err(|e| read_err(&e))?;
        let commit_time_ms = commit_obj
            .time()
            .map(|t| (t.seconds.max(0) as u64) * 1000)
            .map_err(|e| read_err(&e))?;
        let tree = commit_obj.tree().map_err(|e| read_err(&e))?;
        let mut files = Vec::new();
        for dir in ["services", "environments"] {
            let Some(entry) = tree.find_entry(dir) else {
                continue;
            };
            if !entry.mode().is_tree() {
                continue;
            }
            let sub = entry
                .object()
                .map_err(|e| read_err(&e))?
                .peel_to_tree()
                .map_err(|e| read_err(&e))?;
            for e in sub.iter() {
                let e = e.map_err(|e| read_err(&e))?;
                let path = format!("{dir}/{}", e.filename());
                if !e.mode().is_blob() || !is_spec_file(&path) {
                    continue;
                }
                let blob = e.object().map_err(|e| read_err(&e))?;
                let text = String::from_utf8(blob.data.clone())
                    .map_err(|_| read_err(&format!("{path} is not UTF-8 text")))?;
                files.push((path, text));
            }
        }
        Ok(Snapshot {
            commit: commit.to_string(),
            commit_time_ms,
            files,
        })
    }
}

/// Fetches and reads the tip with a time limit, off the async threads.
pub async fn fetch_snapshot(mirror: &Arc<Mirror>, timeout: Duration) -> Result<Snapshot, GitError> {
    if mirror.busy.swap(true, Ordering::SeqCst) {
        return Err(GitError::Timeout {
            url: mirror.url.clone(),
            after: timeout,
        });
    }
    let interrupt = Arc::new(AtomicBool::new(false));
    let (m, i) = (mirror.clone(), interrupt.clone());
    let task = tokio::task::spawn_blocking(move || {
        let r = m.fetch(&i).and_then(|commit| m.read(&commit));
        m.busy.store(false, Ordering::SeqCst);
        r
    });
    match tokio::time::timeout(timeout, task).await {
        Ok(r) => r.expect("fetch task does not panic"),
        Err(_) => {
            // The blocking fetch notices the flag between steps; `busy` stays set until it
            // ends, so no second fetch races it on the same mirror.
            interrupt.store(true, Ordering::SeqCst);
            Err(GitError::Timeout {
                url: mirror.url.clone(),
                after: timeout,
            })
        }
    }
}

/// Watches the repo and publishes each new snapshot; runs until `shutdown` is set.
pub async fn watch(
    mirror: Arc<Mirror>,
    repo: RepoConfig,
    store: Store,
    tx: watch::Sender<Option<Arc<Snapshot>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (wake_tx, mut wake) = mpsc::channel::<()>(1);
    // Keep the watcher alive for the life of the loop.
    let _watcher = repo
        .local_path
        .as_deref()
        .and_then(|p| local_watcher(p, wake_tx.clone()));
    let mut status = store.repo_status().unwrap_or_default();
    status.url = repo.url.clone();
    status.branch = repo.branch.clone();
    let mut backoff = Duration::from_secs(1);
    let timeout = Duration::from_secs(120).max(repo.poll_interval);
    loop {
        let mut next = jitter(repo.poll_interval);
        match fetch_snapshot(&mirror, timeout).await {
            Ok(snap) => {
                backoff = Duration::from_secs(1);
                let changed = status.commit.as_deref() != Some(snap.commit.as_str());
                let recovered = status.error.is_some();
                if changed || recovered || tx.borrow().is_none() {
                    if recovered {
                        tracing::info!(commit = %snap.commit, "repo reachable again");
                    }
                    if changed {
                        tracing::info!(commit = %snap.commit, "new desired state");
                        status.commit = Some(snap.commit.clone());
                        status.fetched_at = Some(fsutil::now_rfc3339());
                    }
                    status.error = None;
                    status.failing_since = None;
                    save_status(&store, &status);
                    let _ = tx.send(Some(Arc::new(snap)));
                }
            }
            Err(e) => {
                let first = status.error.is_none();
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot read the desired state; the running versions stay as they are");
                status.error = Some(e.to_string());
                if first {
                    status.failing_since = Some(fsutil::now_rfc3339());
                }
                save_status(&store, &status);
                next = backoff.min(repo.poll_interval);
                backoff = (backoff * 2).min(Duration::from_secs(300));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            Some(()) = wake.recv() => {
                // Let a burst of ref updates settle.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while wake.try_recv().is_ok() {}
            }
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// Records the result of a fetch in the repo status (as `once` and `plan` do; the daemon's
/// watch loop keeps its own copy).
pub fn record(store: &Store, url: &str, branch: &str, result: &Result<Snapshot, GitError>) {
    let mut status = store.repo_status().unwrap_or_default();
    status.url = url.to_string();
    status.branch = branch.to_string();
    match result {
        Ok(snap) => {
            if status.commit.as_deref() != Some(snap.commit.as_str()) {
                status.commit = Some(snap.commit.clone());
                status.fetched_at = Some(fsutil::now_rfc3339());
            }
            status.error = None;
            status.failing_since = None;
        }
        Err(e) => {
            if status.error.is_none() {
                status.failing_since = Some(fsutil::now_rfc3339());
            }
            status.error = Some(e.to_string());
        }
    }
    save_status(store, &status);
}

fn save_status(store: &Store, status: &RepoStatus) {
    if let Err(e) = store.save_repo_status(status) {
        tracing::warn!(error = %e, "cannot write the repo status");
    }
}

/// `interval` ± 10%.
fn jitter(interval: Duration) -> Duration {
    let f: f64 = rand::random_range(0.9..1.1);
    interval.mul_f64(f)
}

/// Watches the refs of a repo on this machine; each change wakes the fetch loop.
fn local_watcher(path: &Path, wake: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let git_dir = if path.join(".git").is_dir() {
        path.join(".git")
    } else {
        path.to_path_buf()
    };
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|e| !e.kind.is_access()) {
            let _ = wake.try_send(());
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "cannot watch the local repo; polling only"))
    .ok()?;
    let heads = git_dir.join("refs").join("heads");
    let watched = w
        .watch(&heads, RecursiveMode::Recursive)
        .and_then(|()| w.watch(&git_dir, RecursiveMode::NonRecursive));
    match watched {
        Ok(()) => {
            tracing::info!(path = %git_dir.display(), "watching the local repo for commits");
            Some(w)
        }
        Err(e) => {
            tracing::warn!(path = %git_dir.display(), error = %e, "cannot watch the local repo; polling only");
            None
        }
    }
}
