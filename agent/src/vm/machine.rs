//! The VM machine's I/O: what each [`VmPhase`] does on this host (download, stage, stop,
//! switch, start, check, verify, roll back), for the engine to drive.

use std::path::Path;

use super::record::settle;
use super::{VmDeployer, VmFlight, VmPhase, VmRecord};
use crate::account::AccountError;
use crate::artifact::ArtifactError;
use crate::engine::{self, End, Engine, Machine, Next, Reconciled, StepError, Transient};
use crate::health::CheckError;
use crate::hooks::{self, Exec, HookError};
use crate::redact::Redactor;
use crate::release::{Layout, ReleaseError, Stage};
use crate::service::{Manager, ServiceError};
use crate::spec::{Digest, ResolvedService};
use crate::verify::{self, CloudWatch, Prometheus, Side};

/// Why a VM phase failed (the engine adds the errors every machine shares).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
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
    /// `run.user`, `run.group` or a template owner is not on this host.
    #[error(transparent)]
    Account(#[from] AccountError),
}

impl Transient for VmError {
    fn is_transient(&self) -> bool {
        match self {
            // A missing artifact is often an upload that has not finished: retry later.
            VmError::Artifact(e) => {
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
            VmError::Release(ReleaseError::Io { .. }) => true,
            VmError::Release(ReleaseError::Extract(crate::release::ExtractError::Io {
                ..
            })) => true,
            _ => false,
        }
    }
}

impl Machine for VmDeployer {
    type Phase = VmPhase;
    type Flight = VmFlight;
    type Record = VmRecord;
    type Error = VmError;

    fn engine(&self) -> &Engine {
        &self.engine
    }

    fn name(phase: VmPhase) -> String {
        phase.name().to_string()
    }

    fn failpoint(phase: VmPhase) -> String {
        phase.name().to_string()
    }

    fn on_success(&self, _flight: &VmFlight, phase: VmPhase) -> Next<VmPhase> {
        phase.on_success()
    }

    fn on_failure(phase: VmPhase) -> Next<VmPhase> {
        phase.on_failure()
    }

    fn takes_lease(phase: VmPhase) -> bool {
        phase == VmPhase::LeaseRecord
    }

    fn rolls_back(phase: VmPhase) -> bool {
        phase == VmPhase::RollBack
    }

    fn exhausted(_phase: VmPhase) -> End {
        // No VM phase fails into itself.
        End::Broken
    }

    fn enter(&self, rec: &VmRecord, flight: &mut VmFlight, phase: VmPhase) -> bool {
        if phase == VmPhase::Stop && flight.touched_at_ms.is_none() {
            flight.touched_at_ms = Some(now_ms());
        }
        // Retrying a deploy that waits for its lease: the phases before the lease are quick
        // no-ops (cached, staged); they are not news.
        rec.waiting.as_deref() != Some(flight.target.version.as_str()) || phase.touches_host()
    }

    async fn run_phase(
        &self,
        rec: &mut VmRecord,
        flight: &mut VmFlight,
        phase: VmPhase,
    ) -> Result<(), StepError<VmError>> {
        if phase == VmPhase::Verify {
            flight.note = self.verify(rec, flight).await?;
            return Ok(());
        }
        self.io(phase, flight).await.map_err(StepError::Machine)
    }

    fn settle(
        &self,
        rec: &mut VmRecord,
        flight: &VmFlight,
        end: End,
        cause: Option<&StepError<VmError>>,
    ) -> Reconciled {
        let on_disk = match end {
            End::Broken => Layout::new(&flight.target.root).current(),
            _ => None,
        };
        settle(rec, flight, end, cause, on_disk.as_deref())
    }

    async fn after(&self, rec: &VmRecord, flight: &VmFlight, outcome: &Reconciled) {
        if matches!(outcome, Reconciled::Deployed { .. }) {
            self.cleanup(rec, &flight.target);
        }
    }
}

impl VmDeployer {
    /// The verify phase: metric analysis, if the service has `verify`. Records the verdict;
    /// a medium risk under `on_medium: pause` keeps the version and returns a note.
    async fn verify(
        &self,
        st: &mut VmRecord,
        d: &VmFlight,
    ) -> Result<Option<String>, StepError<VmError>> {
        let t = &d.target;
        let Some(v) = &t.verify else {
            return Ok(None);
        };
        let touched = d
            .touched_at_ms
            .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
            .unwrap_or_else(std::time::SystemTime::now);
        tracing::info!(duration = %v.duration, metrics = v.metrics.len(), "verifying metrics");
        let (new, old) = (
            Side::version(&t.version),
            d.from.as_ref().map(|f| Side::version(&f.version)),
        );
        let verdict = match &v.cloudwatch {
            Some(c) => {
                let source = CloudWatch::connect(c.region.as_deref()).await;
                verify::run(&source, v, &new, old.as_ref(), touched).await
            }
            None => {
                let source = Prometheus::new(self.checker.client().clone(), &v.prometheus);
                verify::run(&source, v, &new, old.as_ref(), touched).await
            }
        };
        tracing::info!(risk = %verdict.risk, "{}", verdict.summary);
        self.engine.event(
            &t.service,
            &t.version,
            "verified",
            Some(verdict.summary.clone()),
        );
        if let Some(l) = &mut st.lease {
            l.verification = Some(engine::LeaseVerdict {
                risk: verdict.risk,
                summary: verdict.summary.clone(),
                charts: verify::charts(&verdict),
            });
        }
        let decision = verify::decide(verdict.risk, v.on_medium);
        let summary = verdict.summary.clone();
        st.verdict = Some((t.version.clone(), verdict));
        match decision {
            verify::RiskResponse::Continue => Ok(None),
            verify::RiskResponse::Pause => Ok(Some(format!(
                "verification {summary}; kept for a human to decide (the rollout is paused)"
            ))),
            verify::RiskResponse::RollBack => Err(StepError::Verify(summary)),
        }
    }

    /// Environment for hooks and smoke commands.
    fn hook_env(&self, d: &VmFlight) -> Vec<(&'static str, String)> {
        let t = &d.target;
        let layout = Layout::new(&t.root);
        vec![
            ("DROVER_SERVICE", t.service.clone()),
            ("DROVER_VERSION", t.version.clone()),
            ("DROVER_ENVIRONMENT", t.environment.clone()),
            ("DROVER_HOST", self.engine.host.clone()),
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

    /// Downloads `t`'s artifact into the cache (once) and checks its digest.
    pub(crate) async fn fetch(&self, t: &ResolvedService) -> Result<(), VmError> {
        self.fetcher.fetch(&t.artifact_url, &t.sha256).await?;
        Ok(())
    }

    /// Stages `t`'s cached artifact as release `dir` under its root, unless it already is.
    pub(crate) async fn stage(&self, t: &ResolvedService, dir: &str) -> Result<(), VmError> {
        let layout = Layout::new(&t.root);
        if layout.is_staged(dir, &t.sha256) {
            tracing::debug!(dir = %dir, "already staged");
            return Ok(());
        }
        let archive = self.fetcher.cached_path(&t.sha256);
        let opts = Stage {
            unpack: self.unpack,
            ids: self.manager.ids(t)?,
        };
        if matches!(self.manager, Manager::Process(_)) && opts.ids.is_root() {
            tracing::warn!("this service runs as root: set `run.user` (or the agent's `run_as`)");
        }
        let (dir, t, env) = (dir.to_string(), t.clone(), self.env.clone());
        tokio::task::spawn_blocking(move || layout.stage(&dir, &archive, &t, &env, &opts))
            .await
            .expect("stage task does not panic")?;
        Ok(())
    }

    /// Runs `t`'s `run.command` once in release `dir` (a job), as `run.user`, with `run.env`
    /// and the `DROVER_*` variables; killed with its process group after `timeout`. Returns
    /// its output, redacted; a non-zero exit, a kill or a timeout is an error.
    pub(crate) async fn run_once(
        &self,
        t: &ResolvedService,
        dir: &str,
        timeout: std::time::Duration,
    ) -> Result<String, VmError> {
        let layout = Layout::new(&t.root);
        let release = layout.release(dir);
        let redact = self.redactor(&layout, &[dir], t);
        let mut env: Vec<(&str, String)> = t
            .run
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        env.extend([
            ("DROVER_SERVICE", t.service.clone()),
            ("DROVER_VERSION", t.version.clone()),
            ("DROVER_ENVIRONMENT", t.environment.clone()),
            ("DROVER_HOST", self.engine.host.clone()),
            ("DROVER_ROOT", t.root.display().to_string()),
            ("DROVER_RELEASE_DIR", release.display().to_string()),
        ]);
        let exec = self.exec(t, &release, &env, &redact)?;
        Ok(hooks::run("run", &t.run.command, &exec, timeout).await?)
    }

    /// The I/O of every phase but the lease (the engine's) and verify.
    async fn io(&self, phase: VmPhase, d: &VmFlight) -> Result<(), VmError> {
        let t = &d.target;
        let layout = Layout::new(&t.root);
        // Output of the new release's and the previous one's hooks and checks is redacted.
        let dirs: Vec<&str> = std::iter::once(d.dir.as_str())
            .chain(d.from.as_ref().map(|f| f.dir.as_str()))
            .collect();
        let release = layout.release(&d.dir);
        match phase {
            VmPhase::Fetch => self.fetch(t).await?,
            VmPhase::Stage => self.stage(t, &d.dir).await?,
            VmPhase::Stop => {
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
            VmPhase::LeaseRecord | VmPhase::Verify => unreachable!("run elsewhere"),
            VmPhase::Switch => layout.switch(&d.dir)?,
            VmPhase::Start => {
                if let Some(h) = &t.after_install {
                    let (env, redact) = (self.hook_env(d), self.redactor(&layout, &dirs, t));
                    let exec = self.exec(t, &release, &env, &redact)?;
                    hooks::run("after_install", &h.command, &exec, h.timeout.0).await?;
                }
                self.manager.start(t, &release).await?;
            }
            VmPhase::Check => {
                let (env, redact) = (self.hook_env(d), self.redactor(&layout, &dirs, t));
                self.check(t, &redact).await?;
                let exec = self.exec(t, &release, &env, &redact)?;
                for s in &t.smoke {
                    self.checker.smoke(s, &exec).await?;
                }
                self.still_running(t)?;
            }
            VmPhase::RollBack => {
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
    pub(super) fn redactor(
        &self,
        layout: &Layout,
        dirs: &[&str],
        svc: &ResolvedService,
    ) -> Redactor {
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
    ) -> Result<Exec<'a>, VmError> {
        Ok(Exec {
            release,
            env,
            ids: self.manager.ids(svc)?,
            redact,
        })
    }

    /// Waits for `svc` to pass its health check, failing fast if its process exits.
    pub(super) async fn check(
        &self,
        svc: &ResolvedService,
        redact: &Redactor,
    ) -> Result<(), VmError> {
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
    fn still_running(&self, svc: &ResolvedService) -> Result<(), VmError> {
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

    /// Deletes old releases and cached artifacts no service needs any more.
    fn cleanup(&self, st: &VmRecord, t: &ResolvedService) {
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
        for name in self.engine.store.records::<VmRecord>().unwrap_or_default() {
            if let Ok(Some(s)) = self.engine.store.load::<VmRecord>(&name) {
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
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
