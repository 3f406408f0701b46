//! The agent's side of the desired-state repo: the mirror under `state_dir/git/`, kept at the
//! branch tip by [`drover_desired::git::follow`] (the loop the coordinator runs too), with
//! each fetch's result recorded in the repo status (`drover-agent status`) and each new
//! snapshot published to the daemon loop.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

pub use drover_desired::git::{GitError, Mirror, Snapshot, fetch_snapshot, snapshot_at};

use crate::config::RepoConfig;
use crate::fsutil;
use crate::metrics::Metrics;
use crate::state::{RepoStatus, StateStore};

/// Follows the repo and publishes each new snapshot, counting fetches in `metrics`; runs
/// until `shutdown` is set. `wake` asks for a fetch now (the coordinator said the tip moved).
pub async fn watch(
    mirror: Arc<Mirror>,
    repo: RepoConfig,
    store: StateStore,
    metrics: Metrics,
    tx: watch::Sender<Option<Arc<Snapshot>>>,
    wake: mpsc::Receiver<()>,
    shutdown: watch::Receiver<bool>,
) {
    let mut status = store.repo_status().unwrap_or_default();
    status.url = repo.url.clone();
    status.branch = repo.branch.clone();
    drover_desired::git::follow(mirror, repo, wake, shutdown, move |result| match result {
        Ok(snap) => {
            metrics.fetched(snap.commit_time_ms);
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
            metrics.fetch_failed();
            if status.error.is_none() {
                status.failing_since = Some(fsutil::now_rfc3339());
            }
            status.error = Some(e.to_string());
            save_status(&store, &status);
        }
    })
    .await
}

/// Records the result of a fetch in the repo status (as `once` and `plan` do; the daemon's
/// watch loop keeps its own copy).
pub fn record(store: &StateStore, url: &str, branch: &str, result: &Result<Snapshot, GitError>) {
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

fn save_status(store: &StateStore, status: &RepoStatus) {
    if let Err(e) = store.save_repo_status(status) {
        tracing::warn!(error = %e, "cannot write the repo status");
    }
}
