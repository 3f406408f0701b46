//! The I/O side of a deploy: runs the phases, records each one before it starts, rolls back
//! on failure, recovers after a crash, and supervises running services.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::{Action, Next, Phase, Recovery, decide, recover};
use drover_coordinator::wire::Purpose;

use crate::account::AccountError;
use crate::artifact::{ArtifactError, Fetcher};
use crate::coordinator::{Ctx, Gate, GateError, Held, KeepAlive};
use crate::failpoint;
use crate::fsutil::{self, FileLock};
use crate::health::{CheckError, Checker};
use crate::hooks::{self, Exec, HookError};
use crate::notify::Notifier;
use crate::redact::Redactor;
use crate::release::{Layout, ReleaseError, Stage};
use crate::service::{Manager, ServiceError};
use crate::spec::{Digest, ResolvedService};
use crate::state::{Event, LeaseState, StateError, Store};

use super::{Deployment, Failure, Release, ServiceState};
use crate::verify::{self, Prometheus};

/// Why a phase failed.
#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    /// Download or verification.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// Staging.
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// A hook.
    #[error(transparent)]
    Hook(#[from] HookError),
    /// Stop or start.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// Health or smoke.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// No lease from the coordinator.
    #[error(transparent)]
    Gate(#[from] GateError),
    /// The metric verification judged the new version too risky.
    #[error("metric verification: {0}")]
    Verify(String),
    /// An injected test failure.
    #[error("{0}")]
    Injected(String),
    /// `run.user`, `run.group` or a template owner is not on this host.
    #[error(transparent)]
    Account(#[from] AccountError),
}

impl PhaseError {
    /// Whether trying again later may succeed without a change to the desired state
    /// (network trouble, a full disk) — such failures do not mark the version failed.
    pub fn is_transient(&self) -> bool {
        match self {
            // A missing artifact is often an upload that has not finished: retry later.
            PhaseError::Artifact(e) => {
                matches!(
                    e,
                    ArtifactError::NotFound { .. }
                        | ArtifactError::Network { .. }
                        | ArtifactError::Truncated { .. }
                        | ArtifactError::NoSpace { .. }
                        | ArtifactError::Io { .. }
                ) || matches!(e, ArtifactError::Http { status, .. } if *status >= 500 || *status == 429)
            }
            // A refused path (ReleaseError::Refused) is the archive's or the spec's fault.
            PhaseError::Release(ReleaseError::Io { .. }) => true,
            PhaseError::Release(ReleaseError::Extract(crate::release::ExtractError::Io {
                ..
            })) => true,
            PhaseError::Gate(e) => e.retry_after().is_some(),
            _ => false,
        }
    }
}

/// Errors that stop the agent from even trying (the state cannot be read or written).
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The state file.
    #[error(transparent)]
    State(#[from] StateError),
    /// The service lock.
    #[error("cannot lock service {service}: {source}")]
    Lock {
        /// Service.
        service: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Nothing to roll back to (manual rollback).
    #[error("cannot roll back {service}: {reason}")]
    NoRollback {
        /// Service.
        service: String,
        /// Why.
        reason: String,
    },
}

/// How a reconcile of one service ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The desired version was already running.
    UpToDate {
        /// Version.
        version: String,
    },
    /// The desired version was installed but not running; it was started.
    Started {
        /// Version.
        version: String,
    },
    /// The desired version was deployed and passed its checks.
    Deployed {
        /// Version.
        version: String,
        /// The version it replaced.
        from: Option<String>,
        /// Something to tell (a medium-risk verification that paused the rollout).
        note: Option<String>,
    },
    /// The deploy failed before touching the running version.
    Abandoned {
        /// Version.
        version: String,
        /// Why.
        error: String,
        /// Whether it will be retried (transient failure).
        retry: bool,
    },
    /// The deploy failed and the previous release runs again.
    RolledBack {
        /// The failed version.
        version: String,
        /// The version running again.
        to: Option<String>,
        /// Why.
        error: String,
    },
    /// The desired version failed here before; not retried.
    SkippedFailed {
        /// Version.
        version: String,
        /// Why it failed.
        reason: String,
    },
    /// The coordinator has not given a lease yet (approval, no free slot, unreachable…);
    /// nothing was touched, it is asked again later.
    Waiting {
        /// Version.
        version: String,
        /// What the coordinator said.
        reason: String,
        /// When to ask again, in milliseconds.
        retry_after_ms: u64,
    },
    /// The deploy failed and so did its rollback.
    Broken {
        /// Version.
        version: String,
        /// Why.
        error: String,
    },
}

impl Outcome {
    /// Whether the host ended in its desired state for this service.
    pub fn converged(&self) -> bool {
        matches!(
            self,
            Outcome::UpToDate { .. } | Outcome::Started { .. } | Outcome::Deployed { .. }
        )
    }

    /// One line for the CLI and logs.
    pub fn summary(&self) -> String {
        match self {
            Outcome::UpToDate { version } => format!("{version} running (up to date)"),
            Outcome::Started { version } => format!("{version} was not running; started"),
            Outcome::Deployed {
                version,
                from,
                note,
            } => {
                let mut s = match from {
                    Some(f) => format!("deployed {version} (was {f})"),
                    None => format!("deployed {version} (first install)"),
                };
                if let Some(n) = note {
                    s.push_str(&format!("; {n}"));
                }
                s
            }
            Outcome::Abandoned {
                version,
                error,
                retry,
            } => format!(
                "{version} not deployed{}: {error}",
                if *retry { " (will retry)" } else { "" }
            ),
            Outcome::RolledBack { version, to, error } => format!(
                "{version} failed and was rolled back to {}: {error}",
                to.as_deref().unwrap_or("nothing (first install)")
            ),
            Outcome::SkippedFailed { version, reason } => format!(
                "{version} failed here before and is not retried until the desired version changes ({reason})"
            ),
            Outcome::Waiting {
                version, reason, ..
            } => format!("{version} not deployed yet: {reason}"),
            Outcome::Broken { version, error } => {
                format!("{version} failed and the rollback failed too; operator needed: {error}")
            }
        }
    }
}

/// The peers a deploy talks to, built once from the configuration.
pub struct Peers {
    /// The artifact store.
    pub fetcher: Fetcher,
    /// Health checks and smoke tests.
    pub checker: Checker,
    /// systemd or the process manager.
    pub manager: Manager,
    /// The coordinator, if configured.
    pub gate: Option<Gate>,
    /// systemd notifications (the phase in `systemctl status`).
    pub notify: Notifier,
}

/// Deploys services on this host.
#[derive(Clone)]
pub struct Deployer {
    store: Store,
    host: String,
    fetcher: Fetcher,
    checker: Checker,
    manager: Manager,
    env: Arc<BTreeMap<String, String>>,
    unpack: crate::release::Unpack,
    gate: Option<Gate>,
    notify: Notifier,
}

impl Deployer {
    /// A deployer over its peers.
    pub fn new(
        store: Store,
        host: String,
        peers: Peers,
        env: Arc<BTreeMap<String, String>>,
        unpack: crate::release::Unpack,
    ) -> Deployer {
        Deployer {
            store,
            host,
            fetcher: peers.fetcher,
            checker: peers.checker,
            manager: peers.manager,
            env,
            unpack,
            gate: peers.gate,
            notify: peers.notify,
        }
    }

    /// The coordinator, if one is configured.
    pub fn gate(&self) -> Option<&Gate> {
        self.gate.as_ref()
    }

    /// The state store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The service manager.
    pub fn manager(&self) -> &Manager {
        &self.manager
    }

    async fn lock(&self, service: &str) -> Result<FileLock, DeployError> {
        let store = self.store.clone();
        let name = service.to_string();
        tokio::task::spawn_blocking(move || store.lock_service(&name))
            .await
            .expect("lock task does not panic")
            .map_err(|source| DeployError::Lock {
                service: service.to_string(),
                source,
            })
    }

    fn event(&self, svc: &str, version: &str, phase: &str, detail: Option<String>) {
        self.store
            .event(&Event::now(&self.host, svc, version, phase, detail));
    }

    /// Loads a service's state; a damaged file is set aside and the state rebuilt from the
    /// releases under `root`.
    fn load(&self, service: &str, root: Option<&PathBuf>) -> Result<ServiceState, DeployError> {
        match self.store.load(service) {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Ok(ServiceState::new(service)),
            Err(StateError::Corrupt { path, cause }) if root.is_some() => {
                let aside = self.store.quarantine::<ServiceState>(service)?;
                let mut st = rebuild(service, root.expect("checked"));
                self.save(&mut st)?;
                tracing::warn!(
                    state = %path.display(), %cause, kept_as = %aside.display(),
                    current = ?st.current.as_ref().map(|r| &r.version),
                    "state file was damaged; rebuilt it from the releases on disk"
                );
                self.event(service, "", "state_rebuilt", Some(cause));
                Ok(st)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn save(&self, st: &mut ServiceState) -> Result<(), DeployError> {
        Ok(self.store.save(st)?)
    }

    /// Brings `desired` about on this host: recover an interrupted deploy, then deploy,
    /// start, or leave it as it is.
    #[tracing::instrument(skip_all, fields(service = %desired.service, version = %desired.version))]
    pub async fn reconcile(
        &self,
        desired: &ResolvedService,
        ctx: Option<&Ctx>,
    ) -> Result<Outcome, DeployError> {
        let _lock = self.lock(&desired.service).await?;
        let mut st = self.load(&desired.service, Some(&desired.root))?;
        self.flush_release(&mut st).await?;
        let mut attempts = 0;
        if let Some(d) = st.deployment.clone() {
            match self.recover(&mut st, d, desired).await? {
                Resume::Done(outcome) => return Ok(outcome),
                Resume::Continue { prior_attempts } => attempts = prior_attempts,
            }
        }
        let layout = Layout::new(&desired.root);
        match decide(desired, &st, layout.current().as_deref()) {
            Action::Recover => unreachable!("recovered above"),
            Action::SkipFailed { reason } => Ok(Outcome::SkippedFailed {
                version: desired.version.clone(),
                reason,
            }),
            Action::EnsureRunning => self.ensure_running(&mut st, desired).await,
            // An earlier deploy's outcome is not delivered yet: a new deploy would replace
            // the record of it, and the coordinator would never count it. Deliver it first.
            // (With `required: false` the deploy goes on: it takes no lease while the
            // coordinator cannot be reached, so the record stays and is sent later.)
            Action::Deploy
                if st.lease.as_ref().is_some_and(|l| l.success.is_some())
                    && self.gate.as_ref().is_some_and(|g| g.required()) =>
            {
                Ok(Outcome::Waiting {
                    version: desired.version.clone(),
                    reason: "the outcome of the previous deploy is not delivered to the coordinator yet; it is sent again first".into(),
                    retry_after_ms: 2000,
                })
            }
            Action::Deploy => self.deploy(&mut st, desired, attempts, ctx).await,
        }
    }

    /// Sends a lease release that an earlier pass could not deliver.
    async fn flush_release(&self, st: &mut ServiceState) -> Result<(), DeployError> {
        if let Some(l) = st.lease.clone()
            && crate::coordinator::flush(self.gate.as_ref(), &l).await
        {
            st.lease = None;
            self.save(st)?;
        }
        Ok(())
    }

    /// Makes sure the current release of `svc` runs; starts it if not.
    async fn ensure_running(
        &self,
        st: &mut ServiceState,
        svc: &ResolvedService,
    ) -> Result<Outcome, DeployError> {
        let version = svc.version.clone();
        match self.manager.is_running(svc).await {
            Ok(true) => return Ok(Outcome::UpToDate { version }),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell whether the service runs");
                return Ok(Outcome::UpToDate { version });
            }
        }
        let layout = Layout::new(&svc.root);
        let dir = st
            .current
            .as_ref()
            .map(|c| c.dir.clone())
            .unwrap_or_default();
        tracing::warn!("the current release is not running; starting it");
        self.event(
            &svc.service,
            &version,
            "restart",
            Some("was not running".into()),
        );
        let result = async {
            self.manager.start(svc, &layout.release(&dir)).await?;
            let redact = self.redactor(&layout, &[&dir], svc);
            self.check(svc, &redact).await
        }
        .await;
        match result {
            Ok(()) => {
                st.last_error = None;
                self.save(st)?;
                Ok(Outcome::Started { version })
            }
            Err(e) => {
                let error = e.to_string();
                tracing::error!(%error, "restarting the current release failed");
                st.last_error = Some(format!("restart of {version} failed: {error}"));
                self.save(st)?;
                Ok(Outcome::Broken { version, error })
            }
        }
    }

    /// Deploys `svc`, `prior_attempts` earlier tries having crashed.
    async fn deploy(
        &self,
        st: &mut ServiceState,
        svc: &ResolvedService,
        prior_attempts: u32,
        ctx: Option<&Ctx>,
    ) -> Result<Outcome, DeployError> {
        let layout = Layout::new(&svc.root);
        // The state may lag behind the disk (rebuilt, or `current` changed by hand): the
        // symlink is the truth about what runs.
        let on_disk = layout.current();
        let from = match (&st.current, &on_disk) {
            (Some(c), Some(d)) if &c.dir == d => Some(c.clone()),
            (_, Some(d)) => layout.marker(d).map(|m| Release {
                version: m.version,
                sha256: m.sha256,
                dir: d.clone(),
                spec: None,
            }),
            (_, None) => None,
        };
        let mut protect: Vec<&str> = Vec::new();
        if let Some(p) = &st.previous {
            protect.push(&p.dir);
        }
        let dir = layout.dir_for(&svc.version, &svc.sha256, &protect);
        st.root = Some(svc.root.clone());
        // Asking again for a lease (approval, free slot) is not news.
        if st.waiting.as_deref() == Some(svc.version.as_str()) {
            tracing::debug!(from = ?from.as_ref().map(|f| &f.version), %dir, "deploying (still waiting for a lease)");
        } else {
            tracing::info!(from = ?from.as_ref().map(|f| &f.version), %dir, "deploying");
        }
        let d = Deployment {
            phase: Phase::Fetch,
            target: svc.clone(),
            dir,
            from,
            attempts: prior_attempts + 1,
            error: None,
            touched_at_ms: None,
            started_at: fsutil::now_rfc3339(),
        };
        self.drive(st, d, Phase::Fetch, ctx, None).await
    }

    /// Runs phases from `start` until the deploy ends. `lease` is a lease already held (a
    /// revert); otherwise the lease phase asks for one.
    async fn drive(
        &self,
        st: &mut ServiceState,
        mut d: Deployment,
        start: Phase,
        ctx: Option<&Ctx>,
        mut lease: Option<(Held, KeepAlive)>,
    ) -> Result<Outcome, DeployError> {
        let t0 = Instant::now();
        let mut phase = start;
        let mut last_error: Option<PhaseError> = None;
        let mut note: Option<String> = None;
        // Retrying a deploy that waits for its lease: the phases before the lease are quick
        // no-ops (cached, staged); they are not logged again.
        let quiet = st.waiting.as_deref() == Some(d.target.version.as_str());
        loop {
            d.phase = phase;
            if phase == Phase::Stop && d.touched_at_ms.is_none() {
                d.touched_at_ms = Some(now_ms());
            }
            st.deployment = Some(d.clone());
            self.save(st)?;
            if !quiet || phase.touches_host() {
                self.notify.status(&format!(
                    "deploying {} {}: {}",
                    d.target.service,
                    d.target.version,
                    phase.name()
                ));
                self.event(
                    &d.target.service,
                    &d.target.version,
                    phase.name(),
                    d.error.clone().filter(|_| phase == Phase::RollBack),
                );
                tracing::info!(phase = phase.name(), "phase");
            }
            let result = match failpoint::hit(phase.name()) {
                Err(e) => Err(PhaseError::Injected(e)),
                Ok(()) if phase == Phase::Lease => match self.lease(&d, ctx).await {
                    Ok(held) => {
                        if let Some((h, _)) = &held {
                            st.lease = Some(LeaseState {
                                id: h.id.clone(),
                                revert: false,
                                success: None,
                                message: None,
                                verification: None,
                            });
                        }
                        lease = held;
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                Ok(()) if phase == Phase::Verify => match self.verify(st, &d).await {
                    Ok(n) => {
                        note = n;
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                Ok(()) => self.run_phase(phase, &d).await,
            };
            let next = match result {
                Ok(()) => phase.on_success(),
                Err(e) => {
                    if matches!(e, PhaseError::Gate(GateError::Wait { .. })) {
                        tracing::debug!(error = %e, "no lease yet");
                    } else {
                        tracing::error!(phase = phase.name(), error = %e, "phase failed");
                    }
                    let msg = format!("{}: {e}", phase.name());
                    d.error = Some(match (&d.error, phase) {
                        (Some(first), Phase::RollBack) => {
                            format!("{first}; rollback failed: {msg}")
                        }
                        _ => msg,
                    });
                    let next = phase.on_failure();
                    last_error = Some(e);
                    next
                }
            };
            match next {
                Next::Phase(n) => {
                    phase = phase
                        .step(n)
                        .expect("the phase machine only returns legal steps");
                }
                end => {
                    tracing::debug!(took_ms = t0.elapsed().as_millis() as u64, outcome = ?end, "deploy ended");
                    drop(lease.take().map(|(_, keep)| keep));
                    return self.finish(st, d, end, last_error, note).await;
                }
            }
        }
    }

    /// The verify phase: metric analysis, if the service has `verify`. Records the verdict;
    /// a medium risk under `on_medium: pause` keeps the version and returns a note.
    async fn verify(
        &self,
        st: &mut ServiceState,
        d: &Deployment,
    ) -> Result<Option<String>, PhaseError> {
        let t = &d.target;
        let Some(v) = &t.verify else {
            return Ok(None);
        };
        let source = Prometheus::new(self.checker.client().clone(), &v.prometheus);
        let touched = d
            .touched_at_ms
            .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
            .unwrap_or_else(std::time::SystemTime::now);
        tracing::info!(duration = %v.duration, metrics = v.metrics.len(), "verifying metrics");
        let verdict = verify::run(
            &source,
            v,
            &t.version,
            d.from.as_ref().map(|f| f.version.as_str()),
            touched,
        )
        .await;
        tracing::info!(risk = %verdict.risk, "{}", verdict.summary);
        self.event(
            &t.service,
            &t.version,
            "verified",
            Some(verdict.summary.clone()),
        );
        if let Some(l) = &mut st.lease {
            l.verification = Some(drover_coordinator::wire::Verification {
                risk: verdict.risk.into(),
                summary: verdict.summary.clone(),
            });
        }
        let decision = verify::decide(verdict.risk, v.on_medium);
        let summary = verdict.summary.clone();
        st.verdict = Some((t.version.clone(), verdict));
        match decision {
            verify::Decision::Continue => Ok(None),
            verify::Decision::Pause => Ok(Some(format!(
                "verification {summary}; kept for a human to decide (the rollout is paused)"
            ))),
            verify::Decision::RollBack => Err(PhaseError::Verify(summary)),
        }
    }

    /// The lease phase: asks the coordinator, if one is configured.
    async fn lease(
        &self,
        d: &Deployment,
        ctx: Option<&Ctx>,
    ) -> Result<Option<(Held, KeepAlive)>, PhaseError> {
        let Some(gate) = &self.gate else {
            return Ok(None);
        };
        let held = gate
            .acquire(&d.target.service, &d.target.version, ctx, Purpose::Deploy)
            .await?;
        Ok(held.map(|h| {
            let keep = gate.keep_alive(&h);
            (h, keep)
        }))
    }

    /// Environment for hooks and smoke commands.
    fn hook_env(&self, d: &Deployment) -> Vec<(&'static str, String)> {
        let t = &d.target;
        let layout = Layout::new(&t.root);
        vec![
            ("DROVER_SERVICE", t.service.clone()),
            ("DROVER_VERSION", t.version.clone()),
            ("DROVER_ENVIRONMENT", t.environment.clone()),
            ("DROVER_HOST", self.host.clone()),
            ("DROVER_ROOT", t.root.display().to_string()),
            (
                "DROVER_RELEASE_DIR",
                layout.release(&d.dir).display().to_string(),
            ),
            (
                "DROVER_PREVIOUS_VERSION",
                d.from
                    .as_ref()
                    .map(|f| f.version.clone())
                    .unwrap_or_default(),
            ),
        ]
    }

    async fn run_phase(&self, phase: Phase, d: &Deployment) -> Result<(), PhaseError> {
        let t = &d.target;
        let layout = Layout::new(&t.root);
        // Output of the new release's and the previous one's hooks and checks is redacted.
        let dirs: Vec<&str> = std::iter::once(d.dir.as_str())
            .chain(d.from.as_ref().map(|f| f.dir.as_str()))
            .collect();
        let release = layout.release(&d.dir);
        match phase {
            Phase::Fetch => {
                self.fetcher.fetch(&t.artifact_url, &t.sha256).await?;
            }
            Phase::Stage => {
                if layout.is_staged(&d.dir, &t.sha256) {
                    tracing::debug!(dir = %d.dir, "already staged");
                } else {
                    let archive = self.fetcher.cached_path(&t.sha256);
                    let opts = Stage {
                        unpack: self.unpack,
                        ids: self.manager.ids(t)?,
                    };
                    if matches!(self.manager, Manager::Process(_)) && opts.ids.is_root() {
                        tracing::warn!(
                            "this service runs as root: set `run.user` (or the agent's `run_as`)"
                        );
                    }
                    let (layout, dir, t, env) =
                        (layout.clone(), d.dir.clone(), t.clone(), self.env.clone());
                    tokio::task::spawn_blocking(move || {
                        layout.stage(&dir, &archive, &t, &env, &opts)
                    })
                    .await
                    .expect("stage task does not panic")?;
                }
            }
            Phase::Stop => {
                if let Some(from) = &d.from {
                    if let Some(h) = &t.before_stop {
                        let (env, redact) = (self.hook_env(d), self.redactor(&layout, &dirs, t));
                        let exec = self.exec(t, &release, &env, &redact)?;
                        hooks::run("before_stop", &h.command, &exec, h.timeout.0).await?;
                    }
                    let old = from.spec.as_deref().unwrap_or(t);
                    self.manager.stop(old).await?;
                } else {
                    self.manager.stop(t).await?;
                }
            }
            Phase::Lease | Phase::Verify => unreachable!("drive runs this phase itself"),
            Phase::Switch => layout.switch(&d.dir)?,
            Phase::Start => {
                if let Some(h) = &t.after_install {
                    let (env, redact) = (self.hook_env(d), self.redactor(&layout, &dirs, t));
                    let exec = self.exec(t, &release, &env, &redact)?;
                    hooks::run("after_install", &h.command, &exec, h.timeout.0).await?;
                }
                self.manager.start(t, &release).await?;
            }
            Phase::Check => {
                let (env, redact) = (self.hook_env(d), self.redactor(&layout, &dirs, t));
                self.check(t, &redact).await?;
                let exec = self.exec(t, &release, &env, &redact)?;
                for s in &t.smoke {
                    self.checker.smoke(s, &exec).await?;
                }
                self.still_running(t)?;
            }
            Phase::RollBack => {
                if let Err(e) = self.manager.stop(t).await {
                    tracing::warn!(error = %e, "stopping the failed version");
                }
                match &d.from {
                    Some(from) => {
                        layout.switch(&from.dir)?;
                        let spec = from.spec.as_deref().unwrap_or(t);
                        self.manager.start(spec, &layout.release(&from.dir)).await?;
                        self.check(spec, &self.redactor(&layout, &dirs, spec))
                            .await?;
                        self.still_running(spec)?;
                    }
                    None => {
                        // First install: nothing to go back to; leave no `current` behind.
                        let _ = std::fs::remove_file(layout.current_link());
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes from output the values of the `{env.*}` the templates of the releases `dirs`
    /// used, and what `svc`'s `redact:` patterns match.
    fn redactor(&self, layout: &Layout, dirs: &[&str], svc: &ResolvedService) -> Redactor {
        let names: Vec<String> = dirs
            .iter()
            .filter_map(|d| layout.marker(d))
            .flat_map(|m| m.secret_env)
            .collect();
        Redactor::new(&names, &self.env, &svc.redact)
    }

    /// How hooks and smoke commands of `svc` run.
    fn exec<'a>(
        &self,
        svc: &ResolvedService,
        release: &'a Path,
        env: &'a [(&'a str, String)],
        redact: &'a Redactor,
    ) -> Result<Exec<'a>, PhaseError> {
        Ok(Exec {
            release,
            env,
            ids: self.manager.ids(svc)?,
            redact,
        })
    }

    /// Waits for `svc` to pass its health check, failing fast if its process exits.
    async fn check(&self, svc: &ResolvedService, redact: &Redactor) -> Result<(), PhaseError> {
        let Some(h) = &svc.health else {
            return Ok(());
        };
        let took = match &self.manager {
            Manager::Process(p) => {
                // The pid file, even if the process already exited (then its status is known).
                let pid = p.recorded(&svc.service).map(|a| a.pid);
                self.checker
                    .wait_healthy(
                        h,
                        || match pid {
                            Some(pid) => p.exit_status(pid),
                            None => Some("not running".into()),
                        },
                        redact,
                    )
                    .await?
            }
            Manager::Systemd(_) => self.checker.wait_healthy(h, || None, redact).await?,
        };
        tracing::info!(took_ms = took.as_millis() as u64, "healthy");
        Ok(())
    }

    /// After the checks passed: the app started by the process manager must still be the
    /// one running (an app that could not bind its port exits at once, while another program
    /// on that port answers its checks).
    fn still_running(&self, svc: &ResolvedService) -> Result<(), PhaseError> {
        let Manager::Process(p) = &self.manager else {
            return Ok(());
        };
        let Some(pid) = p.recorded(&svc.service).map(|a| a.pid) else {
            return Ok(());
        };
        match p.exit_status(pid) {
            Some(status) => Err(CheckError::NotItself { status }.into()),
            None => Ok(()),
        }
    }

    /// Records how a deploy ended, and releases its lease with the outcome.
    async fn finish(
        &self,
        st: &mut ServiceState,
        d: Deployment,
        end: Next,
        last_error: Option<PhaseError>,
        note: Option<String>,
    ) -> Result<Outcome, DeployError> {
        let t = &d.target;
        let version = t.version.clone();
        let error = d.error.clone().unwrap_or_default();
        let report = (!error.is_empty()).then(|| error.clone());
        let failure = || Failure {
            version: t.version.clone(),
            sha256: t.sha256.clone(),
            reason: error.clone(),
            at: fsutil::now_rfc3339(),
        };
        st.deployment = None;
        st.waiting = None;
        let outcome = match end {
            Next::Deployed => {
                let new = Release {
                    version: version.clone(),
                    sha256: t.sha256.clone(),
                    dir: d.dir.clone(),
                    spec: Some(Box::new(t.clone())),
                };
                if let Some(from) = d.from.clone().filter(|f| f.dir != d.dir) {
                    st.previous = Some(from);
                }
                st.current = Some(new);
                st.failed = None;
                st.last_error = None;
                Outcome::Deployed {
                    version,
                    from: d.from.as_ref().map(|f| f.version.clone()),
                    note,
                }
            }
            Next::Abandoned => match &last_error {
                Some(PhaseError::Gate(g)) if g.retry_after().is_some() => {
                    st.waiting = Some(version.clone());
                    st.last_error = Some(format!("{version}: {g}"));
                    Outcome::Waiting {
                        version,
                        reason: g.to_string(),
                        retry_after_ms: g.retry_after().unwrap_or_default().as_millis() as u64,
                    }
                }
                _ => {
                    let transient = last_error.as_ref().is_some_and(PhaseError::is_transient);
                    if !transient {
                        st.failed = Some(failure());
                    }
                    st.last_error = Some(format!("{version}: {error}"));
                    Outcome::Abandoned {
                        version,
                        error,
                        retry: transient,
                    }
                }
            },
            Next::RolledBack => {
                st.failed = Some(failure());
                st.current = d.from.clone();
                st.last_error = Some(format!("{version} rolled back: {error}"));
                Outcome::RolledBack {
                    version,
                    to: d.from.as_ref().map(|f| f.version.clone()),
                    error,
                }
            }
            Next::Broken => {
                st.failed = Some(failure());
                let layout = Layout::new(&t.root);
                st.current = match (layout.current(), &d.from) {
                    (Some(dir), Some(from)) if dir == from.dir => Some(from.clone()),
                    _ => None,
                };
                st.last_error = Some(format!("{version}: {error}"));
                Outcome::Broken { version, error }
            }
            Next::Phase(_) => unreachable!("finish is called at the end"),
        };
        if let Some(l) = &mut st.lease
            && l.success.is_none()
        {
            l.success = Some(if l.revert {
                matches!(outcome, Outcome::RolledBack { .. })
            } else {
                matches!(outcome, Outcome::Deployed { .. })
            });
            l.message = report;
        }
        self.save(st)?;
        let (phase, detail) = match &outcome {
            Outcome::Deployed { from, .. } => ("deployed", from.clone()),
            Outcome::Abandoned { error, .. } => ("abandoned", Some(error.clone())),
            Outcome::RolledBack { error, .. } => ("rolled_back", Some(error.clone())),
            Outcome::Broken { error, .. } => ("broken", Some(error.clone())),
            _ => ("", None),
        };
        if !phase.is_empty() {
            self.event(&t.service, &t.version, phase, detail);
            self.notify
                .status(&format!("{}: {}", t.service, outcome.summary()));
        }
        self.flush_release(st).await?;
        if matches!(outcome, Outcome::Deployed { .. }) {
            self.cleanup(st, t);
        }
        Ok(outcome)
    }

    /// Deletes old releases and cached artifacts no service needs any more.
    fn cleanup(&self, st: &ServiceState, t: &ResolvedService) {
        let layout = Layout::new(&t.root);
        let protect: Vec<&str> = [&st.current, &st.previous]
            .into_iter()
            .flatten()
            .map(|r| r.dir.as_str())
            .collect();
        let removed = layout.prune(t.keep_releases as usize, &protect);
        if !removed.is_empty() {
            tracing::info!(?removed, "removed old releases");
        }
        let mut keep: Vec<Digest> = Vec::new();
        for name in self.store.records::<ServiceState>().unwrap_or_default() {
            if let Ok(Some(s)) = self.store.load::<ServiceState>(&name) {
                keep.extend(
                    [&s.current, &s.previous]
                        .into_iter()
                        .flatten()
                        .map(|r| r.sha256.clone()),
                );
                keep.extend(s.deployment.map(|d| d.target.sha256));
            }
        }
        self.fetcher.prune(&keep);
    }

    /// Finishes or undoes a deploy interrupted by a crash.
    async fn recover(
        &self,
        st: &mut ServiceState,
        d: Deployment,
        desired: &ResolvedService,
    ) -> Result<Resume, DeployError> {
        let layout = Layout::new(&d.target.root);
        layout.clean_tmp();
        let new_is_current = layout.current().as_deref() == Some(d.dir.as_str());
        let how = recover(d.phase, d.attempts, new_is_current);
        tracing::warn!(
            phase = d.phase.name(),
            attempts = d.attempts,
            ?how,
            "recovering an interrupted deploy"
        );
        self.event(
            &d.target.service,
            &d.target.version,
            "recover",
            Some(format!("interrupted in {}: {how:?}", d.phase.name())),
        );
        let same_target = d.target == *desired;
        let prior_attempts = if same_target { d.attempts } else { 0 };
        let mut d = d;
        match how {
            Recovery::Redeploy => {
                st.deployment = None;
                self.save(st)?;
                Ok(Resume::Continue { prior_attempts })
            }
            Recovery::RestoreThenRedeploy => {
                self.restore(&layout, &d).await;
                st.deployment = None;
                self.save(st)?;
                Ok(Resume::Continue { prior_attempts })
            }
            Recovery::ResumeStart | Recovery::FinishRollBack => {
                // Finishing what was started needs no new lease: the host is already touched.
                // Resuming is another attempt: a deploy that keeps crashing the agent is
                // given up after MAX_ATTEMPTS.
                d.attempts += 1;
                let phase = if how == Recovery::ResumeStart {
                    Phase::Start
                } else {
                    Phase::RollBack
                };
                Ok(Resume::Done(self.drive(st, d, phase, None, None).await?))
            }
            Recovery::GiveUp => {
                d.error = Some(format!(
                    "the agent stopped {} times during this deploy (last in phase {}); giving up on this version",
                    d.attempts,
                    d.phase.name()
                ));
                if new_is_current {
                    Ok(Resume::Done(
                        self.drive(st, d, Phase::RollBack, None, None).await?,
                    ))
                } else {
                    self.restore(&layout, &d).await;
                    Ok(Resume::Done(
                        self.finish(st, d, Next::Abandoned, None, None).await?,
                    ))
                }
            }
        }
    }

    /// Makes sure the release the deploy started from runs again (it may have been stopped).
    async fn restore(&self, layout: &Layout, d: &Deployment) {
        let Some(from) = &d.from else { return };
        if layout.current().as_deref() != Some(from.dir.as_str())
            && let Err(e) = layout.switch(&from.dir)
        {
            tracing::error!(error = %e, "restoring current");
        }
        let spec = from.spec.as_deref().unwrap_or(&d.target);
        if let Err(e) = self.manager.start(spec, &layout.release(&from.dir)).await {
            tracing::error!(error = %e, version = %from.version, "restarting the previous release");
        }
    }

    /// Forgets that `version` of `service` failed here (the coordinator asks for it again).
    /// Returns whether it had.
    pub async fn forget_failure(&self, service: &str, version: &str) -> Result<bool, DeployError> {
        let _lock = self.lock(service).await?;
        let Some(mut st) = self.store.load::<ServiceState>(service)? else {
            return Ok(false);
        };
        if st.failed.as_ref().is_none_or(|f| f.version != version) {
            return Ok(false);
        }
        st.failed = None;
        self.save(&mut st)?;
        Ok(true)
    }

    /// Rolls `service` back to its previous release, by operator request. The version rolled
    /// back from is marked failed, so it is not deployed again until the desired version
    /// changes.
    pub async fn rollback(&self, service: &str) -> Result<Outcome, DeployError> {
        self.back(service, None, "rolled back by operator", None)
            .await
    }

    /// Reverts `service` from `version` at the coordinator's request, under a revert lease.
    /// Nothing is done if `version` is not the current release.
    pub async fn revert(
        &self,
        service: &str,
        version: &str,
        reason: &str,
        ctx: Option<&Ctx>,
    ) -> Result<Outcome, DeployError> {
        self.back(service, Some(version), reason, Some(ctx)).await
    }

    /// Goes back from the current release to the previous one. With `only_from`, only if that
    /// version is current; with `revert`, under a revert lease.
    async fn back(
        &self,
        service: &str,
        only_from: Option<&str>,
        why: &str,
        revert: Option<Option<&Ctx>>,
    ) -> Result<Outcome, DeployError> {
        let _lock = self.lock(service).await?;
        let mut st = self.load(service, None)?;
        self.flush_release(&mut st).await?;
        let no = |reason: &str| DeployError::NoRollback {
            service: service.to_string(),
            reason: reason.to_string(),
        };
        if st.deployment.is_some() {
            return Err(no("a deploy is in flight; let the agent finish it first"));
        }
        let current = st
            .current
            .clone()
            .ok_or_else(|| no("nothing is deployed"))?;
        if let Some(v) = only_from
            && current.version != v
        {
            return Ok(Outcome::UpToDate {
                version: current.version,
            });
        }
        let previous = st
            .previous
            .clone()
            .ok_or_else(|| no("there is no previous release on record"))?;
        let spec = current.spec.clone().ok_or_else(|| {
            no("no record of how the current release runs (the state was rebuilt); redeploy it first")
        })?;
        if !Layout::new(&spec.root).is_staged(&previous.dir, &previous.sha256) {
            return Err(no(&format!(
                "the previous release {} is no longer on disk",
                previous.version
            )));
        }
        let mut lease = None;
        if let (Some(ctx), Some(gate)) = (revert, &self.gate) {
            match gate
                .acquire(&spec.service, &spec.version, ctx, Purpose::Revert)
                .await
            {
                Ok(Some(h)) => {
                    st.lease = Some(LeaseState {
                        id: h.id.clone(),
                        revert: true,
                        success: None,
                        message: None,
                        verification: None,
                    });
                    let keep = gate.keep_alive(&h);
                    lease = Some((h, keep));
                }
                Ok(None) => {}
                Err(GateError::Unavailable(e))
                    if e.is(drover_coordinator::wire::ErrorKind::Conflict) =>
                {
                    tracing::info!(error = %e, "nothing to revert");
                    return Ok(Outcome::UpToDate {
                        version: current.version,
                    });
                }
                Err(e) => {
                    return Ok(Outcome::Waiting {
                        version: current.version,
                        retry_after_ms: e.retry_after().unwrap_or_default().as_millis() as u64,
                        reason: e.to_string(),
                    });
                }
            }
        }
        let d = Deployment {
            phase: Phase::RollBack,
            target: *spec,
            dir: current.dir.clone(),
            from: Some(previous),
            attempts: 1,
            error: Some(why.to_string()),
            touched_at_ms: None,
            started_at: fsutil::now_rfc3339(),
        };
        let outcome = self.drive(&mut st, d, Phase::RollBack, None, lease).await?;
        if matches!(outcome, Outcome::RolledBack { .. }) {
            // The release rolled back from stays on disk as the new "previous".
            st.previous = Some(current);
            self.save(&mut st)?;
        }
        Ok(outcome)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What reconcile does after recovery.
enum Resume {
    /// Recovery finished the job.
    Done(Outcome),
    /// Go on deciding; a redeploy of the same target counts earlier attempts.
    Continue {
        /// Attempts already made.
        prior_attempts: u32,
    },
}

/// Rebuilds a service's state from the releases on disk: `current` is what the symlink
/// points at, `previous` the newest other complete release.
pub fn rebuild(service: &str, root: &std::path::Path) -> ServiceState {
    let layout = Layout::new(root);
    let mut st = ServiceState::new(service);
    st.root = Some(root.to_path_buf());
    let current = layout.current();
    let release = |dir: &str, m: crate::release::Marker| Release {
        version: m.version,
        sha256: m.sha256,
        dir: dir.to_string(),
        spec: None,
    };
    if let Some(dir) = &current
        && let Some(m) = layout.marker(dir)
    {
        st.current = Some(release(dir, m));
    }
    st.previous = layout
        .list()
        .into_iter()
        .rev()
        .find(|(dir, _)| Some(dir) != current.as_ref())
        .map(|(dir, m)| release(&dir, m));
    st
}
