//! The ECS deployer: brings one ECS service of this agent's cluster to its desired version —
//! recovers a deploy a crash interrupted (from its record and the weights AWS shows), checks
//! the cluster, and has the engine drive the deploy; plans, and stops a deploy on request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::aws::{Aws, AwsError};
use super::record::{failure, fingerprint};
use super::{
    EcsError, EcsFlight, EcsPhase, EcsRecord, EcsRecovery, EcsRelease, recover, service_name,
    split, tg,
};
use crate::coordinator::Ctx;
use crate::engine::{self, DeployError, Engine, Reconciled, StepError};
use crate::fsutil;
use crate::spec::{ResolvedEcs, ResolvedEcsService};
use crate::state::StateError;

/// Deploys the ECS services of a cluster.
#[derive(Clone)]
pub struct EcsDeployer {
    pub(super) engine: Engine,
    pub(super) aws: Aws,
    pub(super) http: reqwest::Client,
    pub(super) poll: Duration,
    /// Deploys to stop at once (service → why): the coordinator rolled the service back.
    pub(super) aborts: Arc<Mutex<HashMap<String, String>>>,
}

impl EcsDeployer {
    /// A deployer over the shared `engine` and `aws`; `http` queries Prometheus.
    pub fn new(engine: Engine, aws: Aws, http: reqwest::Client) -> EcsDeployer {
        EcsDeployer {
            engine,
            aws,
            http,
            poll: Duration::from_secs(2),
            aborts: Arc::default(),
        }
    }

    /// Polls ECS and the ALB every `poll` while waiting (waits for tasks back off from it).
    pub fn with_poll(mut self, poll: Duration) -> EcsDeployer {
        self.poll = poll;
        self
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

    /// Fails if the coordinator stopped the deploy of `service`.
    pub(super) fn aborted(&self, service: &str) -> Result<(), StepError<EcsError>> {
        match self
            .aborts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
        {
            Some(why) => Err(StepError::Aborted(why.clone())),
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
        self.engine.save(&mut st)?;
        Ok(true)
    }

    /// The AWS clients.
    pub fn aws(&self) -> &Aws {
        &self.aws
    }

    /// Services with an ECS state file.
    pub fn services(&self) -> Vec<String> {
        self.engine.store.records::<EcsRecord>().unwrap_or_default()
    }

    /// Reads a service's state (a fresh one if it has none).
    pub fn load(&self, service: &str) -> Result<EcsRecord, StateError> {
        Ok(self
            .engine
            .store
            .load(service)?
            .unwrap_or_else(|| EcsRecord::new(service)))
    }

    /// Brings `desired` about: resume an interrupted deploy, or deploy, or nothing.
    #[tracing::instrument(skip_all, fields(service = %desired.service, version = %desired.version))]
    pub async fn reconcile(
        &self,
        desired: &ResolvedEcsService,
        ctx: Option<&Ctx>,
    ) -> Result<Reconciled, DeployError> {
        let name = format!("ecs-{}", desired.service);
        let _lock = self.engine.lock(&name, &desired.service).await?;
        let mut st = self.load(&desired.service)?;
        self.engine.flush(&mut st).await?;
        let version = desired.version.clone();
        let abandon = |e: AwsError, st: &mut EcsRecord| {
            let error = e.to_string();
            let retry = e.is_transient();
            if !retry {
                st.failed = Some(failure(desired, &error));
            }
            st.last_error = Some(format!("{version}: {error}"));
            Reconciled::Abandoned {
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
                self.engine.save(&mut st)?;
                return Ok(o);
            }
        };
        let record = st.deployment.as_ref().map(|d| (d.phase, d.live));
        let live = match recover(record, weights) {
            EcsRecovery::At(phase) => {
                let mut d = st.deployment.clone().expect("a record");
                d.calls_before = self.aws.calls();
                tracing::warn!(phase = %phase.name(), "resuming an interrupted ECS deploy");
                self.engine.event(
                    &d.target.service,
                    &d.target.version,
                    "recover",
                    Some(format!("resuming at {}", phase.name())),
                );
                return engine::drive(self, &mut st, d, phase, None, None).await;
            }
            EcsRecovery::Restore { to } => {
                tracing::warn!(
                    to = to.name(),
                    ?weights,
                    "traffic split with no deploy on record: putting it all on one side"
                );
                if let Err(err) = self.aws.set_weights(e, split(to, 0)).await {
                    let o = abandon(err, &mut st);
                    self.engine.save(&mut st)?;
                    return Ok(o);
                }
                self.engine.event(
                    &desired.service,
                    &desired.version,
                    "restored",
                    Some(format!("all traffic on {}", to.name())),
                );
                to
            }
            EcsRecovery::Idle { live } => live,
        };
        if let Some(f) = &st.failed
            && f.version == desired.version
            && f.fingerprint == fingerprint(desired)
        {
            return Ok(Reconciled::SkippedFailed {
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
            self.engine.save(&mut st)?;
            self.engine.event(
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
                self.engine.save(&mut st)?;
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
                self.engine.save(&mut st)?;
            }
            return Ok(Reconciled::UpToDate {
                version: desired.version.clone(),
            });
        }

        if self.engine.undelivered(&mut st) {
            return Ok(Reconciled::Waiting {
                version: desired.version.clone(),
                reason: "the outcome of the previous deploy is not delivered to the coordinator yet; it is sent again first".into(),
                retry_after_ms: 2000,
            });
        }
        let d = EcsFlight {
            target: desired.clone(),
            phase: EcsPhase::StableBlue,
            live,
            task_definition: None,
            error: None,
            from: st.current.as_ref().map(|c| c.version.clone()),
            started_at: fsutil::now_rfc3339(),
            calls_before: self.aws.calls(),
        };
        engine::drive(self, &mut st, d, EcsPhase::StableBlue, ctx, None).await
    }

    /// `drover-agent rollback SERVICE`: a blue-green back to the version live before the
    /// last deploy (its image on a copy of the live task definition), by operator request —
    /// no lease, no Git. The version rolled back from is marked failed here, so it is not
    /// deployed again until the desired version (or its definition) changes.
    pub async fn rollback(&self, service: &str) -> Result<Reconciled, DeployError> {
        let name = format!("ecs-{service}");
        let _lock = self.engine.lock(&name, service).await?;
        let mut st = self.load(service)?;
        self.engine.flush(&mut st).await?;
        let no = |reason: &str| DeployError::no_rollback(service, reason);
        if st.deployment.is_some() {
            return Err(no("a deploy is in flight; let the agent finish it first"));
        }
        let current = st
            .current
            .clone()
            .ok_or_else(|| no("this agent has deployed nothing of it"))?;
        let previous = st
            .previous
            .clone()
            .ok_or_else(|| no("there is no previous version on record"))?;
        let spec = st.deployed.clone().ok_or_else(|| {
            no("no record of the last deploy's definition (an older agent deployed it); deploy once first")
        })?;
        let mut target = (*spec).clone();
        target.version = previous.version.clone();
        target.ecs.image = previous.image.clone();
        let weights = self
            .aws
            .weights(&target.ecs)
            .await
            .map_err(|e| no(&e.to_string()))?;
        let live = weights.all_on().ok_or_else(|| {
            no("traffic is split between the sides; let the agent finish or undo that first")
        })?;
        let why = format!("rolled back by operator to {}", previous.version);
        self.engine
            .event(service, &current.version, "rollback", Some(why.clone()));
        let d = EcsFlight {
            target,
            phase: EcsPhase::CreatingGreen,
            live,
            task_definition: None,
            error: None,
            from: Some(current.version.clone()),
            started_at: fsutil::now_rfc3339(),
            calls_before: self.aws.calls(),
        };
        let outcome = engine::drive(self, &mut st, d, EcsPhase::CreatingGreen, None, None).await?;
        Ok(match outcome {
            Reconciled::Deployed { .. } => {
                st.failed = Some(failure(&spec, &why));
                self.engine.save(&mut st)?;
                Reconciled::RolledBack {
                    version: current.version,
                    to: Some(previous.version),
                    error: why,
                }
            }
            // The way back failed, and traffic stayed on the current version (which is not
            // marked failed: it runs; nor is the previous one, which Git may ask for).
            Reconciled::RolledBack { error, .. } => {
                st.failed = None;
                self.engine.save(&mut st)?;
                Reconciled::Abandoned {
                    version: current.version,
                    error: format!(
                        "the rollback to {} failed and traffic stays where it was: {error}",
                        previous.version
                    ),
                    retry: false,
                }
            }
            other => other,
        })
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
                "ecs:CreateService {new_name} (desired {}, target group {}, the live side's settings and tags)",
                e.first_tasks(),
                tg(e, new)
            ),
            format!("{listener} {} (attach {} at 0)", w(0), new.name()),
            format!(
                "wait ≤ {}: {} tasks running and healthy targets in {}",
                e.health_timeout,
                e.first_tasks(),
                tg(e, new)
            ),
        ];
        let mut tasks = e.first_tasks();
        for p in &e.steps {
            let scale = if e.tasks_at(*p) > tasks {
                tasks = e.tasks_at(*p);
                format!("ecs:UpdateService {new_name} desired {tasks}, wait healthy; ")
            } else {
                String::new()
            };
            out.push(format!(
                "{scale}{listener} {}, then bake {}{}{}",
                w(*p),
                e.wait_at(*p),
                if desired.verify.is_some() {
                    " and verify metrics"
                } else {
                    ""
                },
                if e.approval_at(*p) {
                    ", then wait for an approval (drover approve; traffic stays)"
                } else {
                    ""
                }
            ));
        }
        out.push(format!("autoscaling of {live_name} (if any) to {new_name}; wait {} (drain); ecs:UpdateService {live_name} desired 0; ecs:DeleteService {live_name}", e.drain));
        out.push(format!(
            "on failure: {listener} {} (one call), then remove {new_name}",
            w(0)
        ));
        out.join("\n    ")
    }
}
