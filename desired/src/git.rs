//! The desired-state repo as both binaries read it: a bare mirror fetched with gix over
//! file://, http(s)://, git:// or ssh, and [`follow`], the loop that keeps it at the branch
//! tip (polled with jitter; a repo on this machine is also watched with inotify; anyone may
//! wake it, e.g. the coordinator when a host reports a commit it has not seen).
//!
//! The fetch refspec is forced (`+refs/heads/B:refs/remotes/origin/B`), so force-pushes and
//! rewritten history are followed: the desired state is whatever the branch tip says. Files are
//! read straight from a commit's tree; nothing is checked out.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gix::remote::Direction;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch};

use crate::error_chain;
use crate::spec::{Dur, is_spec_file};
use crate::yaml::{Problem, Spanned};

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

/// `repo:` as written in the agent's and the coordinator's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoInput {
    /// `https://`, `http://`, `git://`, `ssh://`, `file://`, scp-like or an absolute path.
    pub url: Spanned<String>,
    /// The branch whose tip is the desired state. Default `main`.
    #[serde(default = "default_branch")]
    pub branch: String,
    /// How often it is fetched (± 10 %). Default 30s.
    #[serde(default = "default_poll")]
    pub poll_interval: Dur,
}

fn default_branch() -> String {
    "main".into()
}

fn default_poll() -> Dur {
    Dur::secs(30)
}

/// The desired-state repo, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoConfig {
    /// Its URL.
    pub url: String,
    /// The branch followed.
    pub branch: String,
    /// Poll interval (± 10 %).
    pub poll_interval: Duration,
    /// For a repo on this machine, its path: watched for instant reaction.
    pub local_path: Option<PathBuf>,
}

impl RepoInput {
    /// Validates the input; every problem goes to `problems`.
    pub fn validate(self, problems: &mut Vec<Problem>) -> RepoConfig {
        let url = self.url.value.trim().to_string();
        let mark = self.url.mark;
        if !url_ok(&url) {
            problems.push(Problem::new(
                mark.clone(),
                format!(
                    "repo url `{url}` is not a Git URL: use https://, http://, git://, ssh://, file:// or an absolute path"
                ),
            ));
        }
        let b = &self.branch;
        if b.is_empty() || b.contains("..") || b.contains(' ') || b.starts_with('-') {
            problems.push(Problem::new(mark.clone(), format!("invalid branch `{b}`")));
        }
        if self.poll_interval.0 < Duration::from_millis(100) {
            problems.push(Problem::new(
                mark,
                "repo.poll_interval must be at least 100ms",
            ));
        }
        RepoConfig {
            local_path: local_path(&url),
            url,
            branch: self.branch,
            poll_interval: self.poll_interval.0,
        }
    }
}

/// The path of a repo on this machine (absolute path or `file://` URL).
pub fn local_path(url: &str) -> Option<PathBuf> {
    if url.starts_with('/') {
        Some(PathBuf::from(url))
    } else {
        url.strip_prefix("file://").map(PathBuf::from)
    }
}

/// Whether `url` is a Git URL drover can fetch.
pub fn url_ok(url: &str) -> bool {
    if url.starts_with('/') {
        return true;
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        return matches!(scheme, "http" | "https" | "git" | "ssh" | "file") && !rest.is_empty();
    }
    // scp-like: user@host:path
    url.split_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && !p.is_empty() && !h.contains('/'))
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

    /// The repo's URL.
    pub fn url(&self) -> &str {
        &self.url
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
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.mirror_err(e))?;
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

    /// Whether the mirror holds `commit` (fetched before). Blocking.
    pub fn has(&self, commit: &str) -> bool {
        let Ok(id) = gix::ObjectId::from_hex(commit.as_bytes()) else {
            return false;
        };
        gix::open(&self.path).is_ok_and(|r| r.find_object(id).is_ok())
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
            .map(|t| (t.seconds.max(0) as u64).saturating_mul(1000))
            .map_err(|e| read_err(&e))?;
        let tree = commit_obj.tree().map_err(|e| read_err(&e))?;
        let mut files = Vec::new();
        let mut total = 0u64;
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
                // Sizes are checked from the object header, before anything is loaded.
                let size = repo
                    .find_header(e.oid().to_owned())
                    .map_err(|e| read_err(&e))?
                    .size();
                if size > crate::yaml::MAX_FILE_BYTES as u64 {
                    return Err(read_err(&format!(
                        "{path} is {size} bytes; desired-state files are at most {} bytes",
                        crate::yaml::MAX_FILE_BYTES
                    )));
                }
                total = total.saturating_add(size);
                if files.len() >= MAX_REPO_FILES || total > MAX_REPO_BYTES {
                    return Err(read_err(&format!(
                        "the desired state has more than {MAX_REPO_FILES} files or {MAX_REPO_BYTES} bytes under services/ and environments/"
                    )));
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

/// Most desired-state files read from one commit.
pub const MAX_REPO_FILES: usize = 10_000;
/// Most bytes of desired-state files read from one commit.
pub const MAX_REPO_BYTES: u64 = 32 << 20;

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

/// Reads `commit` from the mirror off the async threads, fetching first if the mirror does
/// not hold it yet.
pub async fn snapshot_at(
    mirror: &Arc<Mirror>,
    commit: &str,
    timeout: Duration,
) -> Result<Snapshot, GitError> {
    let (m, c) = (mirror.clone(), commit.to_string());
    let held = tokio::task::spawn_blocking(move || m.has(&c))
        .await
        .unwrap_or(false);
    if !held {
        fetch_snapshot(mirror, timeout).await?;
    }
    let (m, c) = (mirror.clone(), commit.to_string());
    tokio::task::spawn_blocking(move || m.read(&c))
        .await
        .expect("read task does not panic")
}

/// The limit of one fetch.
pub fn fetch_timeout(cfg: &RepoConfig) -> Duration {
    Duration::from_secs(120).max(cfg.poll_interval)
}

/// Keeps fetching the branch tip until `shutdown` is set: every `poll_interval` ± 10 % (when
/// `periodic()` says a periodic fetch is needed: an agent whose coordinator tells it when the
/// tip moves skips them), at once when a local repo's refs change or `wake` receives, with
/// backoff (capped at the poll interval) while fetching fails. Every result is handed to
/// `report`.
pub async fn follow(
    mirror: Arc<Mirror>,
    cfg: RepoConfig,
    mut wake: mpsc::Receiver<()>,
    mut shutdown: watch::Receiver<bool>,
    periodic: impl Fn() -> bool,
    mut report: impl FnMut(Result<Snapshot, GitError>),
) {
    let (local_tx, mut local) = mpsc::channel::<()>(1);
    // Keep the watcher alive for the life of the loop.
    let _watcher = cfg
        .local_path
        .as_deref()
        .and_then(|p| local_watcher(p, local_tx));
    let mut backoff = Duration::from_secs(1);
    let timeout = fetch_timeout(&cfg);
    let mut fetch = true;
    loop {
        let mut next = jitter(cfg.poll_interval);
        if fetch {
            let result = fetch_snapshot(&mirror, timeout).await;
            match &result {
                Ok(_) => backoff = Duration::from_secs(1),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot read the desired state; the running versions stay as they are");
                    next = backoff.min(cfg.poll_interval);
                    backoff = (backoff * 2).min(Duration::from_secs(300));
                }
            }
            report(result);
        }
        fetch = true;
        tokio::select! {
            // A periodic fetch, unless told it is not needed (a retry after a failure is).
            _ = tokio::time::sleep(next) => fetch = backoff > Duration::from_secs(1) || periodic(),
            Some(()) = local.recv() => {
                // Let a burst of ref updates settle.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while local.try_recv().is_ok() {}
            }
            Some(()) = wake.recv() => {
                while wake.try_recv().is_ok() {}
            }
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            local_path("/srv/git/fleet.git"),
            Some(PathBuf::from("/srv/git/fleet.git"))
        );
        assert_eq!(
            local_path("file:///srv/fleet"),
            Some(PathBuf::from("/srv/fleet"))
        );
        assert_eq!(local_path("https://x/y.git"), None);
        assert!(url_ok("git@github.com:org/fleet.git"));
        assert!(url_ok("git://127.0.0.1:9418/fleet.git"));
        assert!(!url_ok("fleet.git"));
        assert!(!url_ok("ftp://x/y"));
    }
}
