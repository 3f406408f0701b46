//! The agent's side of the desired-state repo: the mirror under `state_dir/git/`, kept at the
//! branch tip by [`drover_desired::git::follow`] (the loop the coordinator runs too), with
//! each fetch's result recorded in the repo status (`drover-agent status`) and each new
//! snapshot published to the daemon loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use drover_coordinator::client::Client;
use drover_coordinator::wire::ErrorKind;
use tokio::sync::{mpsc, watch};

pub use drover_desired::git::{GitError, Mirror, Snapshot, fetch_snapshot, snapshot_at};

use crate::config::RepoConfig;
use crate::fsutil;
use crate::metrics::Metrics;
use crate::state::{RepoStatus, StateStore};

/// Follows the repo and publishes each new snapshot, counting fetches in `metrics`; runs
/// until `shutdown` is set. `wake` asks for a fetch now (the coordinator said the tip moved);
/// the periodic fetch happens only when `periodic()` says so (the coordinator is away).
#[allow(clippy::too_many_arguments, reason = "the loop's peers, each distinct")]
pub async fn watch(
    mirror: Arc<Mirror>,
    repo: RepoConfig,
    store: StateStore,
    metrics: Metrics,
    tx: watch::Sender<Option<Arc<Snapshot>>>,
    wake: mpsc::Receiver<()>,
    shutdown: watch::Receiver<bool>,
    periodic: impl Fn() -> bool,
) {
    let mut status = store.repo_status().unwrap_or_default();
    status.url = repo.url.clone();
    status.branch = repo.branch.clone();
    drover_desired::git::follow(
        mirror,
        repo,
        wake,
        shutdown,
        periodic,
        move |result| match result {
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
        },
    )
    .await
}

/// How long a long-poll of the coordinator's tip is held (the coordinator may answer sooner).
const LONG_POLL: Duration = Duration::from_secs(25);

/// How long a fetch asked for by the coordinator's tip may take to publish a snapshot.
const FETCH_WAIT: Duration = Duration::from_secs(10);

/// Long-polls the coordinator for the branch tip it fetched; when that is not the commit this
/// host has, asks for a fetch (`wake`) and waits for it before asking again, so Git sees one
/// fetch per commit. `connected` says whether the coordinator answers with a tip this host has
/// caught up with: while it does, the periodic Git poll is skipped. While the coordinator is
/// away, has no tip yet, or follows a commit this host's Git does not give (a lagging mirror,
/// another repo), the poll is the fallback. Ends at `shutdown`, or at once when the
/// coordinator does not serve `/v1/tip` (an older one).
pub async fn follow_coordinator(
    client: Client,
    host: String,
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    wake: mpsc::Sender<()>,
    connected: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_secs(1);
    // A tip the coordinator has and a fetch here did not give.
    let mut ahead: Option<String> = None;
    loop {
        let mine = commit(&mut snapshots);
        if ahead.is_some() && ahead == mine {
            ahead = None;
        }
        let after = ahead.clone().or_else(|| mine.clone());
        let answer = tokio::select! {
            r = client.tip(&host, after.as_deref(), LONG_POLL) => r,
            // Caught up with the tip by polling Git: ask again with this commit.
            _ = snapshots.changed(), if ahead.is_some() => continue,
            _ = shutdown.changed() => return,
        };
        let tip = match answer {
            Ok(tip) => tip,
            Err(e) if e.is(ErrorKind::NotFound) => {
                tracing::info!(coordinator = %client.url(), "the coordinator does not serve the branch tip; polling Git");
                connected.store(false, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                if connected.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "the coordinator does not answer; polling Git until it does");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_secs(1);
        if tip.is_some() && tip != mine && tip != ahead {
            tracing::info!(
                commit = tip.as_deref().unwrap_or(""),
                "the coordinator has a new commit; fetching"
            );
            let _ = wake.try_send(());
            tokio::select! {
                _ = snapshots.changed() => {}
                _ = tokio::time::sleep(FETCH_WAIT) => {}
                _ = shutdown.changed() => return,
            }
            let now = commit(&mut snapshots);
            if now != tip {
                tracing::warn!(
                    coordinator = tip.as_deref().unwrap_or(""),
                    fetched = now.as_deref().unwrap_or(""),
                    "the coordinator follows a commit that fetching from Git here did not give; polling Git until it does"
                );
                ahead = tip.clone();
            }
        } else if tip.is_some() && tip == mine {
            ahead = None;
        }
        let synced = tip.is_some() && ahead.is_none();
        if connected.swap(synced, Ordering::Relaxed) != synced && synced {
            tracing::info!(coordinator = %client.url(), "following the coordinator for new commits; Git is polled only while it is away");
        }
    }
}

/// The commit of the newest snapshot, marking it seen.
fn commit(snapshots: &mut watch::Receiver<Option<Arc<Snapshot>>>) -> Option<String> {
    snapshots
        .borrow_and_update()
        .as_ref()
        .map(|s| s.commit.clone())
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
