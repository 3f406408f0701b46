//! The I/O side of ECS mode: runs the [`Phase`]s against AWS, records each one before it runs
//! (in `state_dir/ecs/<service>.json`), rolls back on failure, resumes after a crash from the
//! record and the weights AWS shows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_coordinator::wire::Purpose;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::aws::{Aws, AwsError};
use super::{Colour, Next, Phase, Resume, Weights, resume};
use crate::coordinator::{Ctx, Gate, GateError, KeepAlive};
use crate::deploy::driver::{DeployError, Outcome};
use crate::failpoint;
use crate::fsutil;
use crate::notify::Notifier;
use crate::spec::{ResolvedEcs, ResolvedEcsService};
use crate::state::{Event, LeaseState, StateError, Store, record};
use crate::verify::{self, Prometheus};

/// Format of the ECS state file.
const FORMAT: u32 = 1;

/// A version running on one side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EcsRelease {
    /// Version.
    pub version: String,
    /// Image.
    pub image: String,
    /// Task definition ARN.
    pub task_definition: String,
    /// Side.
    pub colour: Colour,
}

/// A version that failed here, with the fingerprint of its definition: it is tried again
/// only when the version or its definition changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EcsFailure {
    /// Version.
    pub version: String,
    /// SHA-256 of the rendered service definition.
    pub fingerprint: String,
    /// Why.
    pub reason: String,
    /// When.
    pub at: String,
}

/// A deploy in flight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EcsDeployment {
    /// What is deployed.
    pub target: ResolvedEcsService,
    /// The phase being run.
    pub phase: Phase,
    /// The side live when the deploy started ("blue").
    pub live: Colour,
    /// The new task definition, once registered.
    pub task_definition: Option<String>,
    /// Why it is rolling back.
    pub error: Option<String>,
    /// The version live when it started.
    #[serde(default)]
    pub from: Option<String>,
    /// When it started.
    pub started_at: String,
}

/// What the ECS agent knows about one service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EcsState {
    /// File format.
    pub format: u32,
    /// Service.
    pub service: String,
    /// The live version.
    pub current: Option<EcsRelease>,
    /// The last version that failed.
    pub failed: Option<EcsFailure>,
    /// A deploy in flight.
    pub deployment: Option<EcsDeployment>,
    /// The last error.
    pub last_error: Option<String>,
    /// A coordinator lease held or to release.
    #[serde(default)]
    pub lease: Option<LeaseState>,
    /// Last change.
    pub updated_at: String,
}

record!(EcsState, "ecs", FORMAT);

impl EcsState {
    fn new(service: &str) -> EcsState {
        EcsState {
            format: FORMAT,
            service: service.into(),
            current: None,
            failed: None,
            deployment: None,
            last_error: None,
            lease: None,
            updated_at: fsutil::now_rfc3339(),
        }
    }
}

/// Why a phase failed.
#[derive(Debug, thiserror::Error)]
enum EcsError {
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error("{0}")]
    Unhealthy(String),
    #[error("metric verification: {0}")]
    Verify(String),
    #[error("stopped by the coordinator: {0}")]
    Aborted(String),
    #[error("{0}")]
    Injected(String),
}

/// `<service>-blue` or `<service>-green`.
pub fn service_name(service: &str, c: Colour) -> String {
    format!("{service}-{}", c.name())
}

fn tg(e: &ResolvedEcs, c: Colour) -> &str {
    match c {
        Colour::Blue => &e.tg_blue,
        Colour::Green => &e.tg_green,
    }
}

/// Weights with `live` at `100 - p` and the other side at `p`.
fn split(live: Colour, p: u8) -> Weights {
    let (l, n) = (u32::from(100 - p), u32::from(p));
    match live {
        Colour::Blue => Weights { blue: l, green: n },
        Colour::Green => Weights { blue: n, green: l },
    }
}

fn fingerprint(s: &ResolvedEcsService) -> String {
    hex::encode(Sha256::digest(serde_json::to_vec(s).expect("serializes")))
}

/// Deploys the ECS services of a cluster.
#[derive(Clone)]
pub struct EcsDeployer {
    aws: Aws,
    store: Store,
    host: String,
    gate: Option<Gate>,
    notify: Notifier,
    http: reqwest::Client,
    poll: Duration,
    /// Deploys to stop at once (service → why): the coordinator rolled the service back.
    aborts: Arc<Mutex<HashMap<String, String>>>,
}

impl EcsDeployer {
    /// A deployer over `aws`.
    pub fn new(
        aws: Aws,
        store: Store,
        host: String,
        gate: Option<Gate>,
        notify: Notifier,
        http: reqwest::Client,
    ) -> EcsDeployer {
        EcsDeployer {
            aws,
            store,
            host,
            gate,
            notify,
            http,
            poll: Duration::from_millis(200),
            aborts: Arc::default(),
        }
    }

    /// Stops the deploy of `service` in flight, if one is, unless it deploys `keep`: traffic
    /// goes back to the old side in one call (a deploy already past the traffic shift ends
    /// normally). Returns whether a deploy of another version was in flight.
    pub fn abort(&self, service: &str, keep: &str, why: &str) -> bool {
        let deploying = self
            .load(service)
            .ok()
            .and_then(|s| s.deployment)
            .is_some_and(|d| d.target.version != keep);
        if deploying {
            self.aborts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(service.to_string(), why.to_string());
        }
        deploying
    }

    fn aborted(&self, service: &str) -> Result<(), EcsError> {
        match self
            .aborts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
        {
            Some(why) => Err(EcsError::Aborted(why.clone())),
            None => Ok(()),
        }
    }

    /// Forgets that `version` of `service` failed here. Returns whether it had.
    pub fn forget_failure(&self, service: &str, version: &str) -> Result<bool, DeployError> {
        let mut st = self.load(service)?;
        if st.failed.as_ref().is_none_or(|f| f.version != version) {
            return Ok(false);
        }
        st.failed = None;
        self.save(&mut st)?;
        Ok(true)
    }

    /// The AWS clients.
    pub fn aws(&self) -> &Aws {
        &self.aws
    }

    /// Services with an ECS state file.
    pub fn services(&self) -> Vec<String> {
        self.store.records::<EcsState>().unwrap_or_default()
    }

    /// Reads a service's state (a fresh one if it has none).
    pub fn load(&self, service: &str) -> Result<EcsState, StateError> {
        Ok(self
            .store
            .load(service)?
            .unwrap_or_else(|| EcsState::new(service)))
    }

    fn save(&self, st: &mut EcsState) -> Result<(), DeployError> {
        self.store.save(st)?;
        Ok(())
    }

    fn event(&self, service: &str, version: &str, phase: &str, detail: Option<String>) {
        self.store
            .event(&Event::now(&self.host, service, version, phase, detail));
    }

    /// Brings `desired` about: resume an interrupted deploy, or deploy, or nothing.
    #[tracing::instrument(skip_all, fields(service = %desired.service, version = %desired.version))]
    pub async fn reconcile(
        &self,
        desired: &ResolvedEcsService,
        ctx: Option<&Ctx>,
    ) -> Result<Outcome, DeployError> {
        let store = self.store.clone();
        let name = format!("ecs-{}", desired.service);
        let _lock = tokio::task::spawn_blocking(move || store.lock_service(&name))
            .await
            .expect("lock task")
            .map_err(|source| DeployError::Lock {
                service: desired.service.clone(),
                source,
            })?;
        let mut st = self.load(&desired.service)?;
        if let Some(l) = st.lease.clone()
            && crate::coordinator::flush(self.gate.as_ref(), &l).await
        {
            st.lease = None;
            self.save(&mut st)?;
        }
        let version = desired.version.clone();
        let abandon = |e: AwsError, st: &mut EcsState| {
            let error = e.to_string();
            let retry = e.is_transient();
            if !retry {
                st.failed = Some(EcsFailure {
                    version: version.clone(),
                    fingerprint: fingerprint(desired),
                    reason: error.clone(),
                    at: fsutil::now_rfc3339(),
                });
            }
            st.last_error = Some(format!("{version}: {error}"));
            Outcome::Abandoned {
                version: version.clone(),
                error,
                retry,
            }
        };
        let e = &desired.ecs;
        let weights = match self.aws.weights(e).await {
            Ok(w) => w,
            Err(err) => {
                let o = abandon(err, &mut st);
                self.save(&mut st)?;
                return Ok(o);
            }
        };
        let record = st.deployment.as_ref().map(|d| (d.phase, d.live));
        let live = match resume(record, weights) {
            Resume::At(phase) => {
                let d = st.deployment.clone().expect("a record");
                tracing::warn!(phase = %phase.name(), "resuming an interrupted ECS deploy");
                self.event(
                    &d.target.service,
                    &d.target.version,
                    "recover",
                    Some(format!("resuming at {}", phase.name())),
                );
                return self.drive(&mut st, d, phase, None).await;
            }
            Resume::Restore { to } => {
                tracing::warn!(
                    to = to.name(),
                    ?weights,
                    "traffic split with no deploy on record: putting it all on one side"
                );
                if let Err(err) = self.aws.set_weights(e, split(to, 0)).await {
                    let o = abandon(err, &mut st);
                    self.save(&mut st)?;
                    return Ok(o);
                }
                self.event(
                    &desired.service,
                    &desired.version,
                    "restored",
                    Some(format!("all traffic on {}", to.name())),
                );
                to
            }
            Resume::Idle { live } => live,
        };
        if let Some(f) = &st.failed
            && f.version == desired.version
            && f.fingerprint == fingerprint(desired)
        {
            return Ok(Outcome::SkippedFailed {
                version: desired.version.clone(),
                reason: f.reason.clone(),
            });
        }
        // Preflight: nothing is touched if the cluster or a target group is missing.
        let pre = async {
            self.aws.check_cluster(&e.cluster).await?;
            self.aws.check_target_groups(e).await
        };
        if let Err(err) = pre.await {
            let o = abandon(err, &mut st);
            self.save(&mut st)?;
            self.event(
                &desired.service,
                &desired.version,
                "abandoned",
                Some(st.last_error.clone().unwrap_or_default()),
            );
            return Ok(o);
        }
        // Up to date if the live side runs the desired image.
        let live_name = service_name(&desired.service, live);
        let running = match self.live_image(e, &live_name).await {
            Ok(r) => r,
            Err(err) => {
                let o = abandon(err, &mut st);
                self.save(&mut st)?;
                return Ok(o);
            }
        };
        if let Some((image, td)) = &running
            && image == &e.image
        {
            let rel = EcsRelease {
                version: desired.version.clone(),
                image: image.clone(),
                task_definition: td.clone(),
                colour: live,
            };
            if st.current.as_ref() != Some(&rel) {
                st.current = Some(rel);
                self.save(&mut st)?;
            }
            return Ok(Outcome::UpToDate {
                version: desired.version.clone(),
            });
        }

        let d = EcsDeployment {
            target: desired.clone(),
            phase: Phase::StableBlue,
            live,
            task_definition: None,
            error: None,
            from: st.current.as_ref().map(|c| c.version.clone()),
            started_at: fsutil::now_rfc3339(),
        };
        self.drive(&mut st, d, Phase::StableBlue, ctx).await
    }

    /// (image, task definition) of the live service, if it exists.
    async fn live_image(
        &self,
        e: &ResolvedEcs,
        name: &str,
    ) -> Result<Option<(String, String)>, AwsError> {
        let Some(svc) = self.aws.service(&e.cluster, name).await? else {
            return Ok(None);
        };
        let td = self.aws.task_definition(&svc.task_definition).await?;
        Ok(Aws::image_of(&td, &e.container).map(|i| (i, svc.task_definition)))
    }

    /// Runs phases from `start` to the end.
    async fn drive(
        &self,
        st: &mut EcsState,
        mut d: EcsDeployment,
        start: Phase,
        ctx: Option<&Ctx>,
    ) -> Result<Outcome, DeployError> {
        let t0 = Instant::now();
        let calls0 = self.aws.calls();
        let steps = d.target.ecs.steps.clone();
        let mut phase = start;
        let mut keep: Option<KeepAlive> = None;
        let mut rollback_tries = 0;
        loop {
            d.phase = phase;
            st.deployment = Some(d.clone());
            self.save(st)?;
            self.notify.status(&format!(
                "deploying {} {} (ECS): {}",
                d.target.service,
                d.target.version,
                phase.name()
            ));
            self.event(
                &d.target.service,
                &d.target.version,
                &phase.name(),
                d.error.clone().filter(|_| phase == Phase::RollingBack),
            );
            tracing::info!(phase = %phase.name(), "ECS phase");
            // The coordinator may stop a deploy between the lease and the end of the traffic
            // shift: then traffic goes back to the old side.
            let stoppable = phase.on_failure() == Next::Phase(Phase::RollingBack)
                && !matches!(phase, Phase::RollingBack | Phase::StableBlue);
            let result = match failpoint::hit(&phase.failpoint()) {
                Err(e) => Err(EcsError::Injected(e)),
                Ok(()) if stoppable => match self.aborted(&d.target.service) {
                    Ok(()) => self.run_phase(st, &mut d, phase, ctx, &mut keep).await,
                    Err(e) => Err(e),
                },
                Ok(()) => self.run_phase(st, &mut d, phase, ctx, &mut keep).await,
            };
            let next = match result {
                Ok(()) => phase.on_success(&steps),
                Err(e) if phase == Phase::StableBlue => {
                    // Nothing touched yet: no lease (wait, refused) is not a rollback.
                    drop(keep.take());
                    return self.not_started(st, &d, e);
                }
                Err(e) => {
                    tracing::error!(phase = %phase.name(), error = %e, "ECS phase failed");
                    let msg = format!("{}: {e}", phase.name());
                    if phase == Phase::RollingBack {
                        rollback_tries += 1;
                        d.error = Some(format!(
                            "{}; rollback failed: {msg}",
                            d.error.clone().unwrap_or_default()
                        ));
                        if rollback_tries >= 5 {
                            drop(keep.take());
                            return self.finish(st, d, false, true).await;
                        }
                        tokio::time::sleep(Duration::from_millis(500 * rollback_tries)).await;
                    } else if d.error.is_none() || !phase.traffic_moved() {
                        d.error = Some(msg);
                    }
                    phase.on_failure()
                }
            };
            match next {
                Next::Phase(n) => {
                    phase = phase
                        .step(n, &steps)
                        .expect("the machine returns legal steps");
                }
                Next::Done | Next::RolledBack => {
                    let calls = self.aws.calls() - calls0;
                    tracing::info!(
                        took_ms = t0.elapsed().as_millis() as u64,
                        api_calls = calls,
                        "ECS deploy ended"
                    );
                    drop(keep.take());
                    return self.finish(st, d, next == Next::Done, false).await;
                }
            }
        }
    }

    async fn run_phase(
        &self,
        st: &mut EcsState,
        d: &mut EcsDeployment,
        phase: Phase,
        ctx: Option<&Ctx>,
        keep: &mut Option<KeepAlive>,
    ) -> Result<(), EcsError> {
        let t = d.target.clone();
        let e = &t.ecs;
        let new = d.live.other();
        let new_name = service_name(&t.service, new);
        let live_name = service_name(&t.service, d.live);
        match phase {
            Phase::StableBlue => {
                if let Some(gate) = &self.gate
                    && let Some(h) = gate
                        .acquire(&t.service, &t.version, ctx, Purpose::Deploy)
                        .await?
                {
                    st.lease = Some(LeaseState {
                        id: h.id.clone(),
                        revert: false,
                        success: None,
                        message: None,
                        verification: None,
                    });
                    *keep = Some(gate.keep_alive(&h));
                }
            }
            Phase::CreatingGreen => {
                // Copy the live side's task definition (the family's latest on a first deploy).
                let base_id = match self.aws.service(&e.cluster, &live_name).await? {
                    Some(s) => s.task_definition,
                    None => e.task_family.clone(),
                };
                let base = self.aws.task_definition(&base_id).await?;
                let arn = self
                    .aws
                    .register_copy(&base, &e.container, &e.image)
                    .await?;
                tracing::info!(task_definition = %arn, "registered");
                d.task_definition = Some(arn);
            }
            Phase::Provisioning => {
                let td = d
                    .task_definition
                    .clone()
                    .ok_or_else(|| EcsError::Unhealthy("no task definition recorded".into()))?;
                // The new side starts fresh: a service left on it (a removal that failed) goes,
                // and its healthy targets must be gone before new tasks count as healthy.
                self.aws.remove_service(&e.cluster, &new_name).await?;
                let deadline = Instant::now() + e.health_timeout.0;
                loop {
                    let left = self.aws.healthy_targets(tg(e, new)).await?;
                    if left == 0 {
                        break;
                    }
                    if Instant::now() >= deadline {
                        return Err(EcsError::Unhealthy(format!(
                            "target group {} still has {left} healthy target(s) of an earlier service after {}",
                            tg(e, new),
                            e.health_timeout
                        )));
                    }
                    tokio::time::sleep(self.poll).await;
                }
                self.aws.ensure_service(e, &new_name, new, &td).await?;
                // The new side is attached with no traffic before it gets any.
                self.aws.set_weights(e, split(d.live, 0)).await?;
            }
            Phase::HealthCheck => {
                let deadline = Instant::now() + e.health_timeout.0;
                loop {
                    let svc = self.aws.service(&e.cluster, &new_name).await?;
                    let running = svc.as_ref().map_or(0, |s| s.running);
                    let healthy = self.aws.healthy_targets(tg(e, new)).await?;
                    if running >= e.desired_count as i32 && healthy >= e.desired_count {
                        break;
                    }
                    self.aborted(&t.service)?;
                    if Instant::now() >= deadline {
                        return Err(EcsError::Unhealthy(format!(
                            "{new_name} not healthy within {}: {running}/{} tasks running, {healthy}/{} healthy targets in {}",
                            e.health_timeout,
                            e.desired_count,
                            e.desired_count,
                            tg(e, new)
                        )));
                    }
                    tokio::time::sleep(self.poll).await;
                }
            }
            Phase::TrafficShift(p) => self.aws.set_weights(e, split(d.live, p)).await?,
            Phase::Monitoring(p) => {
                let until = Instant::now() + e.step_wait.0;
                loop {
                    let healthy = self.aws.healthy_targets(tg(e, new)).await?;
                    if healthy < e.desired_count {
                        return Err(EcsError::Unhealthy(format!(
                            "at {p}% only {healthy}/{} targets of {new_name} are healthy",
                            e.desired_count
                        )));
                    }
                    if Instant::now() >= until {
                        break;
                    }
                    self.aborted(&t.service)?;
                    tokio::time::sleep(
                        self.poll
                            .min(until.saturating_duration_since(Instant::now())),
                    )
                    .await;
                }
                if let Some(v) = &t.verify {
                    let source = Prometheus::new(self.http.clone(), &v.prometheus);
                    let old = st.current.as_ref().map(|c| c.version.clone());
                    let verdict = verify::run(
                        &source,
                        v,
                        &t.version,
                        old.as_deref(),
                        std::time::SystemTime::now(),
                    )
                    .await;
                    self.event(
                        &t.service,
                        &t.version,
                        "verified",
                        Some(format!("at {p}%: {}", verdict.summary)),
                    );
                    if let Some(l) = &mut st.lease {
                        l.verification = Some(drover_coordinator::wire::Verification {
                            risk: verdict.risk.into(),
                            summary: verdict.summary.clone(),
                        });
                    }
                    // With traffic split, anything but a low risk rolls back: the agent never
                    // leaves a split waiting for a human.
                    if verdict.risk != verify::Risk::Low {
                        return Err(EcsError::Verify(verdict.summary));
                    }
                }
            }
            Phase::StableGreen => {
                st.current = Some(EcsRelease {
                    version: t.version.clone(),
                    image: e.image.clone(),
                    task_definition: d.task_definition.clone().unwrap_or_default(),
                    colour: new,
                });
            }
            Phase::DeletingBlue => {
                tokio::time::sleep(e.drain.0).await;
                self.aws.remove_service(&e.cluster, &live_name).await?;
            }
            Phase::Complete => {}
            Phase::RollingBack => {
                // One call puts all traffic back on the old side …
                self.aws.set_weights(e, split(d.live, 0)).await?;
                // … then the new side goes.
                if let Err(err) = self.aws.remove_service(&e.cluster, &new_name).await {
                    tracing::warn!(error = %err, service = %new_name, "removing the new side failed; it has no traffic");
                }
            }
        }
        Ok(())
    }

    /// The deploy did not start (no lease, refused): nothing was touched.
    fn not_started(
        &self,
        st: &mut EcsState,
        d: &EcsDeployment,
        e: EcsError,
    ) -> Result<Outcome, DeployError> {
        st.deployment = None;
        self.aborts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&d.target.service);
        let version = d.target.version.clone();
        let outcome = match &e {
            EcsError::Gate(g) if g.retry_after().is_some() => Outcome::Waiting {
                version: version.clone(),
                reason: g.to_string(),
                retry_after_ms: g.retry_after().unwrap_or_default().as_millis() as u64,
            },
            _ => {
                st.failed = Some(EcsFailure {
                    version: version.clone(),
                    fingerprint: fingerprint(&d.target),
                    reason: e.to_string(),
                    at: fsutil::now_rfc3339(),
                });
                Outcome::Abandoned {
                    version: version.clone(),
                    error: e.to_string(),
                    retry: false,
                }
            }
        };
        st.last_error = Some(format!("{version}: {e}"));
        self.save(st)?;
        Ok(outcome)
    }

    async fn finish(
        &self,
        st: &mut EcsState,
        d: EcsDeployment,
        done: bool,
        broken: bool,
    ) -> Result<Outcome, DeployError> {
        let t = &d.target;
        st.deployment = None;
        self.aborts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&t.service);
        let error = d.error.clone().unwrap_or_default();
        let outcome = if done {
            st.failed = None;
            st.last_error = None;
            Outcome::Deployed {
                version: t.version.clone(),
                from: d.from.clone(),
                note: None,
            }
        } else {
            st.failed = Some(EcsFailure {
                version: t.version.clone(),
                fingerprint: fingerprint(t),
                reason: error.clone(),
                at: fsutil::now_rfc3339(),
            });
            st.last_error = Some(format!("{}: {error}", t.version));
            if broken {
                Outcome::Broken {
                    version: t.version.clone(),
                    error: error.clone(),
                }
            } else {
                Outcome::RolledBack {
                    version: t.version.clone(),
                    to: d.from.clone(),
                    error: error.clone(),
                }
            }
        };
        if let Some(l) = &mut st.lease
            && l.success.is_none()
        {
            l.success = Some(done);
            l.message = (!done).then(|| d.error.clone().unwrap_or_default());
        }
        self.save(st)?;
        let phase = match &outcome {
            Outcome::Deployed { .. } => "deployed",
            Outcome::Broken { .. } => "broken",
            _ => "rolled_back",
        };
        self.event(
            &t.service,
            &t.version,
            phase,
            (!done).then(|| error.clone()),
        );
        self.notify
            .status(&format!("{}: {}", t.service, outcome.summary()));
        if let Some(l) = st.lease.clone()
            && crate::coordinator::flush(self.gate.as_ref(), &l).await
        {
            st.lease = None;
            self.save(st)?;
        }
        Ok(outcome)
    }

    /// What a deploy of `desired` would do: the AWS calls, in order. Read-only.
    pub async fn plan(&self, desired: &ResolvedEcsService) -> String {
        let e = &desired.ecs;
        let w = match self.aws.weights(e).await {
            Ok(w) => w,
            Err(err) => return format!("cannot plan: {err}"),
        };
        let Some(live) = w.all_on() else {
            return format!(
                "traffic is split (blue {} / green {}): the agent first finishes or undoes the deploy in flight",
                w.blue, w.green
            );
        };
        let live_name = service_name(&desired.service, live);
        let new = live.other();
        let new_name = service_name(&desired.service, new);
        match self.live_image(e, &live_name).await {
            Ok(Some((image, _))) if image == e.image => {
                return format!(
                    "{} — up to date ({live_name} runs {image})",
                    desired.version
                );
            }
            Err(err) => return format!("cannot plan: {err}"),
            _ => {}
        }
        let listener = if e.rule_arn.is_some() {
            "elbv2:ModifyRule"
        } else {
            "elbv2:ModifyListener"
        };
        let w = |p: u8| {
            let s = split(live, p);
            format!("blue {} / green {}", s.blue, s.green)
        };
        let mut out = vec![
            format!(
                "{} → {} ({} steps {:?}; live side {})",
                "current",
                desired.version,
                e.steps.len(),
                e.steps,
                live.name()
            ),
            format!(
                "ecs:DescribeTaskDefinition (of {live_name}, else family {})",
                e.task_family
            ),
            format!(
                "ecs:RegisterTaskDefinition family {}, container {} image {}",
                e.task_family, e.container, e.image
            ),
            format!(
                "ecs:CreateService or ecs:UpdateService {new_name} (desired {}, target group {})",
                e.desired_count,
                tg(e, new)
            ),
            format!("{listener} {} (attach {} at 0)", w(0), new.name()),
            format!(
                "wait ≤ {}: {} tasks running and healthy targets in {}",
                e.health_timeout,
                e.desired_count,
                tg(e, new)
            ),
        ];
        for p in &e.steps {
            out.push(format!(
                "{listener} {}, then bake {}{}",
                w(*p),
                e.step_wait,
                if desired.verify.is_some() {
                    " and verify metrics"
                } else {
                    ""
                }
            ));
        }
        out.push(format!("wait {} (drain); ecs:UpdateService {live_name} desired 0; ecs:DeleteService {live_name}", e.drain));
        out.push(format!(
            "on failure: {listener} {} (one call), then remove {new_name}",
            w(0)
        ));
        out.join("\n    ")
    }
}
