//! The VM deployer: brings one service of this host to its desired version — recovers a
//! deploy a crash interrupted, decides what the service needs, and has the engine drive the
//! deploy (or a rollback); supervises the running release.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::{VmFlight, VmNeed, VmPhase, VmRecord, VmRecovery, VmRelease, decide, recover};
use crate::artifact::Fetcher;
use crate::coordinator::{Ctx, LeasePurpose};
use crate::engine::{self, DeployError, End, Engine, Reconciled};
use crate::fsutil;
use crate::health::Checker;
use crate::release::Layout;
use crate::service::Manager;
use crate::spec::ResolvedService;
use crate::state::StateError;

/// The VM machine's own peers, built once from the configuration.
pub struct Peers {
    /// The artifact store.
    pub fetcher: Fetcher,
    /// Health checks and smoke tests.
    pub checker: Checker,
    /// systemd or the process manager.
    pub manager: Manager,
}

/// Deploys services on this host: the VM [`Machine`].
#[derive(Clone)]
pub struct VmDeployer {
    pub(super) engine: Engine,
    pub(super) fetcher: Fetcher,
    pub(super) checker: Checker,
    pub(super) manager: Manager,
    pub(super) env: Arc<BTreeMap<String, String>>,
    pub(super) unpack: crate::release::Unpack,
}

impl VmDeployer {
    /// A deployer over the shared `engine` and its own peers; `env` is the agent's `env:`
    /// (template values), `unpack` the extraction limits.
    pub fn new(
        engine: Engine,
        peers: Peers,
        env: Arc<BTreeMap<String, String>>,
        unpack: crate::release::Unpack,
    ) -> VmDeployer {
        VmDeployer {
            engine,
            fetcher: peers.fetcher,
            checker: peers.checker,
            manager: peers.manager,
            env,
            unpack,
        }
    }

    /// The service manager.
    pub fn manager(&self) -> &Manager {
        &self.manager
    }

    /// Loads a service's state; a damaged file is set aside and the state rebuilt from the
    /// releases under `root`.
    fn load(&self, service: &str, root: Option<&PathBuf>) -> Result<VmRecord, DeployError> {
        match self.engine.store.load(service) {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Ok(VmRecord::new(service)),
            Err(StateError::Corrupt { path, cause }) if root.is_some() => {
                let aside = self.engine.store.quarantine::<VmRecord>(service)?;
                let mut st = rebuild(service, root.expect("checked"));
                self.engine.save(&mut st)?;
                tracing::warn!(
                    state = %path.display(), %cause, kept_as = %aside.display(),
                    current = ?st.current.as_ref().map(|r| &r.version),
                    "state file was damaged; rebuilt it from the releases on disk"
                );
                self.engine.event(service, "", "state_rebuilt", Some(cause));
                Ok(st)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Brings `desired` about on this host: recover an interrupted deploy, then deploy,
    /// start, or leave it as it is.
    #[tracing::instrument(skip_all, fields(service = %desired.service, version = %desired.version))]
    pub async fn reconcile(
        &self,
        desired: &ResolvedService,
        ctx: Option<&Ctx>,
    ) -> Result<Reconciled, DeployError> {
        let _lock = self.engine.lock(&desired.service, &desired.service).await?;
        let mut st = self.load(&desired.service, Some(&desired.root))?;
        self.engine.flush(&mut st).await?;
        let mut attempts = 0;
        if let Some(d) = st.deployment.clone() {
            match self.recover(&mut st, d, desired).await? {
                Recovered::Done(outcome) => return Ok(outcome),
                Recovered::Continue { prior_attempts } => attempts = prior_attempts,
            }
        }
        let layout = Layout::new(&desired.root);
        match decide(desired, &st, layout.current().as_deref()) {
            VmNeed::Recover => unreachable!("recovered above"),
            VmNeed::SkipFailed { reason } => Ok(Reconciled::SkippedFailed {
                version: desired.version.clone(),
                reason,
            }),
            VmNeed::EnsureRunning => self.ensure_running(&mut st, desired).await,
            // An earlier deploy's outcome is not delivered yet: a new deploy would replace
            // the record of it, and the coordinator would never count it. Deliver it first.
            // (With `required: false` the deploy goes on: it takes no lease while the
            // coordinator cannot be reached, so the record stays and is sent later.)
            VmNeed::Deploy if self.engine.undelivered(&mut st) =>
            {
                Ok(Reconciled::Waiting {
                    version: desired.version.clone(),
                    reason: "the outcome of the previous deploy is not delivered to the coordinator yet; it is sent again first".into(),
                    retry_after_ms: 2000,
                })
            }
            VmNeed::Deploy => self.deploy(&mut st, desired, attempts, ctx).await,
        }
    }

    /// Makes sure the current release of `svc` runs; starts it if not.
    async fn ensure_running(
        &self,
        st: &mut VmRecord,
        svc: &ResolvedService,
    ) -> Result<Reconciled, DeployError> {
        let version = svc.version.clone();
        match self.manager.is_running(svc).await {
            Ok(true) => return Ok(Reconciled::UpToDate { version }),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell whether the service runs");
                return Ok(Reconciled::UpToDate { version });
            }
        }
        let layout = Layout::new(&svc.root);
        let dir = st
            .current
            .as_ref()
            .map(|c| c.dir.clone())
            .unwrap_or_default();
        tracing::warn!("the current release is not running; starting it");
        self.engine.event(
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
                self.engine.save(st)?;
                Ok(Reconciled::Started { version })
            }
            Err(e) => {
                let error = e.to_string();
                tracing::error!(%error, "restarting the current release failed");
                st.last_error = Some(format!("restart of {version} failed: {error}"));
                self.engine.save(st)?;
                Ok(Reconciled::Broken { version, error })
            }
        }
    }

    /// Deploys `svc`, `prior_attempts` earlier tries having crashed.
    async fn deploy(
        &self,
        st: &mut VmRecord,
        svc: &ResolvedService,
        prior_attempts: u32,
        ctx: Option<&Ctx>,
    ) -> Result<Reconciled, DeployError> {
        let layout = Layout::new(&svc.root);
        // The state may lag behind the disk (rebuilt, or `current` changed by hand): the
        // symlink is the truth about what runs.
        let on_disk = layout.current();
        let from = match (&st.current, &on_disk) {
            (Some(c), Some(d)) if &c.dir == d => Some(c.clone()),
            (_, Some(d)) => layout.marker(d).map(|m| VmRelease {
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
        let d = VmFlight {
            phase: VmPhase::Fetch,
            target: svc.clone(),
            dir,
            from,
            attempts: prior_attempts + 1,
            error: None,
            touched_at_ms: None,
            started_at: fsutil::now_rfc3339(),
            note: None,
        };
        engine::drive(self, st, d, VmPhase::Fetch, ctx, None).await
    }

    /// Finishes or undoes a deploy interrupted by a crash.
    async fn recover(
        &self,
        st: &mut VmRecord,
        d: VmFlight,
        desired: &ResolvedService,
    ) -> Result<Recovered, DeployError> {
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
        self.engine.event(
            &d.target.service,
            &d.target.version,
            "recover",
            Some(format!("interrupted in {}: {how:?}", d.phase.name())),
        );
        let same_target = d.target == *desired;
        let prior_attempts = if same_target { d.attempts } else { 0 };
        let mut d = d;
        match how {
            VmRecovery::Redeploy => {
                st.deployment = None;
                self.engine.save(st)?;
                Ok(Recovered::Continue { prior_attempts })
            }
            VmRecovery::RestoreThenRedeploy => {
                self.restore(&layout, &d).await;
                st.deployment = None;
                self.engine.save(st)?;
                Ok(Recovered::Continue { prior_attempts })
            }
            VmRecovery::ResumeStart | VmRecovery::FinishRollBack => {
                // Finishing what was started needs no new lease: the host is already touched.
                // Resuming is another attempt: a deploy that keeps crashing the agent is
                // given up after MAX_ATTEMPTS.
                d.attempts += 1;
                let phase = if how == VmRecovery::ResumeStart {
                    VmPhase::Start
                } else {
                    VmPhase::RollBack
                };
                Ok(Recovered::Done(
                    engine::drive(self, st, d, phase, None, None).await?,
                ))
            }
            VmRecovery::GiveUp => {
                d.error = Some(format!(
                    "the agent stopped {} times during this deploy (last in phase {}); giving up on this version",
                    d.attempts,
                    d.phase.name()
                ));
                if new_is_current {
                    Ok(Recovered::Done(
                        engine::drive(self, st, d, VmPhase::RollBack, None, None).await?,
                    ))
                } else {
                    self.restore(&layout, &d).await;
                    Ok(Recovered::Done(
                        engine::conclude(self, st, &d, End::Abandoned, None).await?,
                    ))
                }
            }
        }
    }

    /// Makes sure the release the deploy started from runs again (it may have been stopped).
    async fn restore(&self, layout: &Layout, d: &VmFlight) {
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
        let _lock = self.engine.lock(service, service).await?;
        let Some(mut st) = self.engine.store.load::<VmRecord>(service)? else {
            return Ok(false);
        };
        if st.failed.as_ref().is_none_or(|f| f.version != version) {
            return Ok(false);
        }
        st.failed = None;
        self.engine.save(&mut st)?;
        Ok(true)
    }

    /// Rolls `service` back to its previous release, by operator request. The version rolled
    /// back from is marked failed, so it is not deployed again until the desired version
    /// changes.
    pub async fn rollback(&self, service: &str) -> Result<Reconciled, DeployError> {
        self.back(service, "rolled back by operator", Asker::Operator)
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
    ) -> Result<Reconciled, DeployError> {
        self.back(service, reason, Asker::Coordinator { version, ctx })
            .await
    }

    /// Goes back from the current release to the previous one, as `asker` asks.
    async fn back(
        &self,
        service: &str,
        why: &str,
        asker: Asker<'_>,
    ) -> Result<Reconciled, DeployError> {
        let _lock = self.engine.lock(service, service).await?;
        let mut st = self.load(service, None)?;
        self.engine.flush(&mut st).await?;
        let no = |reason: &str| DeployError::no_rollback(service, reason);
        if st.deployment.is_some() {
            return Err(no("a deploy is in flight; let the agent finish it first"));
        }
        let current = st
            .current
            .clone()
            .ok_or_else(|| no("nothing is deployed"))?;
        if let Asker::Coordinator { version, .. } = asker
            && current.version != version
        {
            return Ok(Reconciled::UpToDate {
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
        let mut keep = None;
        if let Asker::Coordinator { ctx, .. } = asker {
            match self
                .engine
                .acquire(
                    &mut st,
                    &spec.service,
                    &spec.version,
                    ctx,
                    LeasePurpose::Revert,
                )
                .await
            {
                Ok(k) => keep = k,
                Err(e) if e.is_conflict() => {
                    tracing::info!(error = %e, "nothing to revert");
                    return Ok(Reconciled::UpToDate {
                        version: current.version,
                    });
                }
                Err(e) => {
                    return Ok(Reconciled::Waiting {
                        version: current.version,
                        retry_after_ms: e.retry_after().unwrap_or_default().as_millis() as u64,
                        reason: e.to_string(),
                    });
                }
            }
        }
        let d = VmFlight {
            phase: VmPhase::RollBack,
            target: *spec,
            dir: current.dir.clone(),
            from: Some(previous),
            attempts: 1,
            error: Some(why.to_string()),
            touched_at_ms: None,
            started_at: fsutil::now_rfc3339(),
            note: None,
        };
        let outcome = engine::drive(self, &mut st, d, VmPhase::RollBack, None, keep).await?;
        if matches!(outcome, Reconciled::RolledBack { .. }) {
            // The release rolled back from stays on disk as the new "previous".
            st.previous = Some(current);
            self.engine.save(&mut st)?;
        }
        Ok(outcome)
    }
}

/// Who asks for a rollback.
#[derive(Clone, Copy)]
enum Asker<'a> {
    /// An operator (`drover-agent rollback`): no lease.
    Operator,
    /// The coordinator, rolling the fleet back from `version`: under a revert lease, and only
    /// if `version` is current.
    Coordinator {
        /// The version to go back from.
        version: &'a str,
        /// The desired state read (for the lease request).
        ctx: Option<&'a Ctx>,
    },
}

/// What reconcile does after recovering a deploy a crash interrupted.
enum Recovered {
    /// Recovery finished the job.
    Done(Reconciled),
    /// Go on deciding; a redeploy of the same target counts earlier attempts.
    Continue {
        /// Attempts already made.
        prior_attempts: u32,
    },
}

/// Rebuilds a service's state from the releases on disk: `current` is what the symlink
/// points at, `previous` the newest other complete release.
pub fn rebuild(service: &str, root: &std::path::Path) -> VmRecord {
    let layout = Layout::new(root);
    let mut st = VmRecord::new(service);
    st.root = Some(root.to_path_buf());
    let current = layout.current();
    let release = |dir: &str, m: crate::release::Marker| VmRelease {
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
