//! The ECS machine's I/O: what each [`EcsPhase`] does against ECS and the ALB, for the engine
//! to drive.

use std::time::Instant;

use super::aws::AwsError;
use super::record::settle;
use super::{
    EcsDeployer, EcsFlight, EcsPhase, EcsRecord, EcsRelease, lb_dimension, service_name, split, tg,
    tg_dimension,
};
use crate::coordinator::GateError;
use crate::engine::{self, End, Engine, Machine, Next, Reconciled, StepError, Transient};
use crate::verify::{self, Prometheus, Side};

/// Why an ECS phase failed (the engine adds the errors every machine shares).
#[derive(Debug, thiserror::Error)]
pub enum EcsError {
    /// An AWS call.
    #[error(transparent)]
    Aws(#[from] AwsError),
    /// The new side is not healthy (or not cleanly provisioned) in time.
    #[error("{0}")]
    Unhealthy(String),
    /// A step waits for an approval no coordinator can give.
    #[error("{0}")]
    NoApprover(String),
}

impl Transient for EcsError {
    fn is_transient(&self) -> bool {
        match self {
            EcsError::Aws(e) => e.is_transient(),
            EcsError::Unhealthy(_) | EcsError::NoApprover(_) => false,
        }
    }
}

impl Machine for EcsDeployer {
    type Phase = EcsPhase;
    type Flight = EcsFlight;
    type Record = EcsRecord;
    type Error = EcsError;

    fn engine(&self) -> &Engine {
        &self.engine
    }

    fn name(phase: EcsPhase) -> String {
        phase.name()
    }

    fn failpoint(phase: EcsPhase) -> String {
        phase.failpoint()
    }

    fn on_success(&self, flight: &EcsFlight, phase: EcsPhase) -> Next<EcsPhase> {
        phase.on_success(&flight.target.ecs.steps)
    }

    fn on_failure(phase: EcsPhase) -> Next<EcsPhase> {
        phase.on_failure()
    }

    fn takes_lease(phase: EcsPhase) -> bool {
        phase == EcsPhase::StableBlue
    }

    fn rolls_back(phase: EcsPhase) -> bool {
        phase == EcsPhase::RollingBack
    }

    fn exhausted(phase: EcsPhase) -> End {
        match phase {
            // All traffic is on the new side: the old side, left at weight 0, is removed by
            // the next deploy (which builds on that side).
            EcsPhase::DeletingBlue => End::Deployed,
            _ => End::Broken,
        }
    }

    async fn run_phase(
        &self,
        rec: &mut EcsRecord,
        flight: &mut EcsFlight,
        phase: EcsPhase,
    ) -> Result<(), StepError<EcsError>> {
        // The coordinator may stop a deploy between the lease and the end of the traffic
        // shift: then traffic goes back to the old side.
        if phase.on_failure() == Next::Phase(EcsPhase::RollingBack)
            && phase != EcsPhase::RollingBack
        {
            self.aborted(&flight.target.service)?;
        }
        self.io(rec, flight, phase).await
    }

    fn settle(
        &self,
        rec: &mut EcsRecord,
        flight: &EcsFlight,
        end: End,
        cause: Option<&StepError<EcsError>>,
    ) -> Reconciled {
        settle(rec, flight, end, cause)
    }

    async fn after(&self, _rec: &EcsRecord, flight: &EcsFlight, _outcome: &Reconciled) {
        self.aborts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&flight.target.service);
        let calls = self.aws.calls().saturating_sub(flight.calls_before);
        tracing::info!(api_calls = calls, "ECS deploy ended");
    }
}

impl EcsDeployer {
    /// The I/O of every phase but the lease (the engine's).
    async fn io(
        &self,
        st: &mut EcsRecord,
        d: &mut EcsFlight,
        phase: EcsPhase,
    ) -> Result<(), StepError<EcsError>> {
        let t = d.target.clone();
        let e = &t.ecs;
        let new = d.live.other();
        let new_name = service_name(&t.service, new);
        let live_name = service_name(&t.service, d.live);
        match phase {
            EcsPhase::StableBlue => unreachable!("the engine takes the lease"),
            EcsPhase::CreatingGreen => {
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
            EcsPhase::Provisioning => {
                let td = d
                    .task_definition
                    .clone()
                    .ok_or_else(|| unhealthy("no task definition recorded".into()))?;
                // The new side starts fresh: a service left on it (a removal that failed) goes,
                // and its healthy targets must be gone before new tasks count as healthy.
                if self.aws.service(&e.cluster, &new_name).await?.is_some() {
                    // An old side left at weight 0 may still hold the autoscaling that never
                    // reached the live side: it moves there first (never over the live side's
                    // own), so removing the leftover loses no policy.
                    if !self.aws.has_scaling(&e.cluster, &live_name).await?
                        && let Some(n) = self
                            .aws
                            .carry_scaling(&e.cluster, &new_name, &live_name)
                            .await?
                    {
                        tracing::warn!(policies = n, from = %new_name, to = %live_name, "autoscaling of a leftover side moved to the live side");
                    }
                    self.aws.remove_service(&e.cluster, &new_name).await?;
                    self.aws.drop_scaling(&e.cluster, &new_name).await?;
                }
                let deadline = Instant::now() + e.health_timeout.0;
                let mut pause = Backoff::new(self.poll);
                loop {
                    let left = self.aws.healthy_targets(tg(e, new)).await?;
                    if left == 0 {
                        break;
                    }
                    if Instant::now() >= deadline {
                        return Err(unhealthy(format!(
                            "target group {} still has {left} healthy target(s) of an earlier service after {}",
                            tg(e, new),
                            e.health_timeout
                        )));
                    }
                    tokio::time::sleep(pause.next()).await;
                }
                // The live side's settings (deployment configuration, placement, tags…) go
                // to the new side; its autoscaling follows once all traffic is on it.
                let carried = self.aws.carried(&e.cluster, &live_name).await?;
                self.aws
                    .ensure_service(e, &new_name, new, &td, e.first_tasks(), &carried)
                    .await?;
                // The new side is attached with no traffic before it gets any.
                self.aws.set_weights(e, split(d.live, 0)).await?;
            }
            EcsPhase::HealthCheck => {
                self.wait_healthy(&t.service, e, new, e.first_tasks())
                    .await?
            }
            EcsPhase::TrafficShift(p) => {
                // A canary grows with its traffic: more tasks, healthy, before more traffic.
                let before = e
                    .steps
                    .iter()
                    .copied()
                    .filter(|s| *s < p)
                    .max()
                    .map_or(e.first_tasks(), |s| e.tasks_at(s));
                let want = e.tasks_at(p);
                if want > before {
                    tracing::info!(tasks = want, percent = p, service = %new_name, "scaling the canary with its traffic");
                    self.aws.scale(&e.cluster, &new_name, want).await?;
                    self.wait_healthy(&t.service, e, new, want).await?;
                }
                self.aws.set_weights(e, split(d.live, p)).await?;
                self.traffic(st, p).await;
            }
            EcsPhase::Monitoring(p) => {
                let until = Instant::now() + e.wait_at(p).0;
                loop {
                    let healthy = self.aws.healthy_targets(tg(e, new)).await?;
                    if healthy < e.tasks_at(p) {
                        return Err(unhealthy(format!(
                            "at {p}% only {healthy}/{} targets of {new_name} are healthy",
                            e.tasks_at(p)
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
                    // Each colour is a side: its version and its own target group, so the new
                    // side is judged against the old one over the same window.
                    let lb = lb_dimension(&e.listener_arn);
                    let new_side = Side {
                        version: &t.version,
                        target_group: Some(tg_dimension(tg(e, new))),
                        load_balancer: lb,
                    };
                    let old_side = st.current.as_ref().map(|c| Side {
                        version: &c.version,
                        target_group: Some(tg_dimension(tg(e, d.live))),
                        load_balancer: lb,
                    });
                    let now = std::time::SystemTime::now();
                    let verdict = match &v.cloudwatch {
                        Some(c) => {
                            let source = self.aws.cloudwatch(c.region.as_deref());
                            verify::run(&source, v, &new_side, old_side.as_ref(), now).await
                        }
                        None => {
                            let source = Prometheus::new(self.http.clone(), &v.prometheus);
                            verify::run(&source, v, &new_side, old_side.as_ref(), now).await
                        }
                    };
                    self.engine.event(
                        &t.service,
                        &t.version,
                        "verified",
                        Some(format!("at {p}%: {}", verdict.summary)),
                    );
                    if let Some(l) = &mut st.lease {
                        l.verification = Some(engine::LeaseVerdict {
                            risk: verdict.risk,
                            summary: verdict.summary.clone(),
                            charts: verify::charts(&verdict),
                        });
                    }
                    // With traffic split, anything but a low risk rolls back: the agent never
                    // leaves a split waiting for a human.
                    if verdict.risk != verify::Risk::Low {
                        return Err(StepError::Verify(verdict.summary));
                    }
                }
                if e.approval_at(p) {
                    self.await_approval(st, d, p).await?;
                }
            }
            EcsPhase::StableGreen => {
                let rel = EcsRelease {
                    version: t.version.clone(),
                    image: e.image.clone(),
                    task_definition: d.task_definition.clone().unwrap_or_default(),
                    colour: new,
                };
                // Recorded once: a retried phase must not make the new release its own
                // previous one.
                if st.current.as_ref() != Some(&rel) {
                    st.previous = st.current.take();
                    st.current = Some(rel);
                    st.deployed = Some(Box::new(t.clone()));
                }
            }
            EcsPhase::DeletingBlue => {
                // Autoscaling moves to the side that now serves (before the old side and
                // its scalable target go; both calls are upserts, so a retry is safe).
                if let Some(n) = self
                    .aws
                    .carry_scaling(&e.cluster, &live_name, &new_name)
                    .await?
                {
                    tracing::info!(policies = n, service = %new_name, "autoscaling carried to the new side");
                }
                tokio::time::sleep(e.drain.0).await;
                self.aws.remove_service(&e.cluster, &live_name).await?;
                self.aws.drop_scaling(&e.cluster, &live_name).await?;
            }
            EcsPhase::Complete => {}
            EcsPhase::RollingBack => {
                // One call puts all traffic back on the old side …
                self.aws.set_weights(e, split(d.live, 0)).await?;
                self.traffic(st, 0).await;
                // … then the new side goes.
                if let Err(err) = self.aws.remove_service(&e.cluster, &new_name).await {
                    tracing::warn!(error = %err, service = %new_name, "removing the new side failed; it has no traffic");
                }
                if let Err(err) = self.aws.drop_scaling(&e.cluster, &new_name).await {
                    tracing::warn!(error = %err, service = %new_name, "removing the new side's scalable target failed");
                }
            }
        }
        Ok(())
    }
}

impl EcsDeployer {
    /// Reports the new side's weight to the coordinator, under the deploy's lease (if any).
    async fn traffic(&self, st: &EcsRecord, percent: u8) {
        if let (Some(gate), Some(lease)) = (&self.engine.gate, &st.lease) {
            gate.traffic(&lease.id, percent).await;
        }
    }

    /// Waits at step `p` (`approval: true`, baked and verified) until the coordinator says go
    /// on. Traffic stays where it is; the new side's targets are still checked between asks;
    /// a rejection, a timed-out approval or a failed rollout rolls back.
    async fn await_approval(
        &self,
        st: &EcsRecord,
        d: &EcsFlight,
        p: u8,
    ) -> Result<(), StepError<EcsError>> {
        let t = &d.target;
        let e = &t.ecs;
        let new = d.live.other();
        let step = format!("{p}%");
        let (Some(gate), Some(lease)) = (&self.engine.gate, &st.lease) else {
            return Err(StepError::Machine(EcsError::NoApprover(format!(
                "step {step} waits for an approval (ecs.steps: approval: true), and this deploy holds no coordinator lease to ask under: give the agent a `coordinator:` that is reachable"
            ))));
        };
        let mut told = false;
        loop {
            let pause = match gate.at_step(&lease.id, &step).await {
                Ok(()) => {
                    if told {
                        self.engine.event(
                            &t.service,
                            &t.version,
                            "approved",
                            Some(format!("at {step}")),
                        );
                    }
                    tracing::info!(step = %step, "step approved; going on");
                    return Ok(());
                }
                Err(GateError::Rejected { message, .. }) => {
                    return Err(StepError::Aborted(message));
                }
                Err(err @ GateError::Wait { .. }) => {
                    if !told {
                        told = true;
                        tracing::info!(step = %step, why = %err, "waiting for an approval; traffic stays where it is");
                        self.engine.event(
                            &t.service,
                            &t.version,
                            "waiting_for_approval",
                            Some(format!("at {step}: {err}")),
                        );
                        self.engine.notify.status(&format!(
                            "{} {}: waiting for an approval at {step}",
                            t.service, t.version
                        ));
                    }
                    err.retry_after().unwrap_or(GATE_RETRY)
                }
                Err(err) => {
                    // Unreachable, or refusing for now: the approval timeout is the
                    // coordinator's; traffic stays split until it answers.
                    tracing::warn!(step = %step, error = %err, "cannot ask the coordinator about the step; retrying");
                    GATE_RETRY
                }
            };
            let healthy = self.aws.healthy_targets(tg(e, new)).await?;
            if healthy < e.tasks_at(p) {
                return Err(unhealthy(format!(
                    "at {p}%, waiting for an approval, only {healthy}/{} targets of {} are healthy",
                    e.tasks_at(p),
                    service_name(&t.service, new)
                )));
            }
            self.aborted(&t.service)?;
            tokio::time::sleep(pause.clamp(self.poll, GATE_RETRY)).await;
        }
    }
}

impl EcsDeployer {
    /// Waits (up to `health_timeout`) until side `new` of `service` runs `want` tasks with as
    /// many healthy targets; stops early if the coordinator stopped the deploy.
    async fn wait_healthy(
        &self,
        service: &str,
        e: &crate::spec::ResolvedEcs,
        new: super::Colour,
        want: u32,
    ) -> Result<(), StepError<EcsError>> {
        let name = service_name(service, new);
        let deadline = Instant::now() + e.health_timeout.0;
        let mut pause = Backoff::new(self.poll);
        loop {
            let svc = self.aws.service(&e.cluster, &name).await?;
            let running = svc.as_ref().map_or(0, |s| s.running);
            let healthy = self.aws.healthy_targets(tg(e, new)).await?;
            if running >= want as i32 && healthy >= want {
                return Ok(());
            }
            self.aborted(service)?;
            if Instant::now() >= deadline {
                return Err(unhealthy(format!(
                    "{name} not healthy within {}: {running}/{want} tasks running, {healthy}/{want} healthy targets in {}",
                    e.health_timeout,
                    tg(e, new)
                )));
            }
            tokio::time::sleep(
                pause
                    .next()
                    .min(deadline.saturating_duration_since(Instant::now())),
            )
            .await;
        }
    }
}

/// Waits that grow from the polling interval by half each time, up to eight times it: tasks
/// take tens of seconds to start, and polling them every 200 ms only spends API calls.
#[derive(Clone, Copy, Debug)]
struct Backoff {
    next: std::time::Duration,
    max: std::time::Duration,
}

impl Backoff {
    fn new(poll: std::time::Duration) -> Backoff {
        Backoff {
            next: poll,
            max: poll * 8,
        }
    }

    fn next(&mut self) -> std::time::Duration {
        let now = self.next;
        self.next = (self.next * 3 / 2).min(self.max);
        now
    }
}

/// How often a deploy waiting at a step asks again, at most.
const GATE_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

fn unhealthy(why: String) -> StepError<EcsError> {
    StepError::Machine(EcsError::Unhealthy(why))
}

impl From<AwsError> for StepError<EcsError> {
    fn from(e: AwsError) -> StepError<EcsError> {
        StepError::Machine(EcsError::Aws(e))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Backoff;

    #[test]
    fn waits_back_off_by_half_up_to_eight_times_the_interval() {
        let mut b = Backoff::new(Duration::from_secs(2));
        let waits: Vec<u64> = (0..8).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(waits, [2000, 3000, 4500, 6750, 10125, 15187, 16000, 16000]);
    }
}
