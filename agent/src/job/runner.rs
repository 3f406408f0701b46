//! The job machine's I/O: the lease (the engine's), then the VM machine's fetch and stage, and
//! the command run once.

use super::{JobFlight, JobNeed, JobPhase, JobRecord, decide, settle};
use crate::coordinator::Ctx;
use crate::engine::{self, DeployError, End, Engine, Machine, Next, Reconciled, StepError};
use crate::fsutil;
use crate::release::Layout;
use crate::spec::ResolvedJob;
use crate::state::StateError;
use crate::vm::{VmDeployer, VmError};

/// Runs this host's jobs: the job [`Machine`].
#[derive(Clone)]
pub struct JobRunner {
    vm: VmDeployer,
}

impl JobRunner {
    /// A runner that fetches, stages and runs as `vm` does.
    pub fn new(vm: VmDeployer) -> JobRunner {
        JobRunner { vm }
    }

    /// Loads a job's record; a damaged one is set aside and a fresh one started (the
    /// coordinator still knows whether the job ran: a host never runs it twice on its word).
    fn load(&self, service: &str) -> Result<JobRecord, DeployError> {
        let e = self.vm.engine();
        match e.store.load(service) {
            Ok(r) => Ok(r.unwrap_or_else(|| JobRecord::new(service))),
            Err(StateError::Corrupt { path, cause }) => {
                let aside = e.store.quarantine::<JobRecord>(service)?;
                tracing::warn!(state = %path.display(), %cause, kept_as = %aside.display(), "job record was damaged; starting a new one");
                e.event(service, "", "state_rebuilt", Some(cause));
                Ok(JobRecord::new(service))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// The record of `service`, if this host has one.
    pub fn record(&self, service: &str) -> Option<JobRecord> {
        self.vm.engine().store.load(service).ok().flatten()
    }

    /// Brings `job` about as far as this host goes: settles a run a crash interrupted, then
    /// asks for the lease and runs it, unless it is done (here or elsewhere) or failed here.
    #[tracing::instrument(skip_all, fields(job = %job.service.service, version = %job.service.version))]
    pub async fn reconcile(
        &self,
        job: &ResolvedJob,
        ctx: Option<&Ctx>,
    ) -> Result<Reconciled, DeployError> {
        let t = &job.service;
        let e = self.vm.engine();
        let _lock = e.lock(&t.service, &t.service).await?;
        let mut rec = self.load(&t.service)?;
        e.flush(&mut rec).await?;
        let version = t.version.clone();
        match decide(&rec, &version) {
            JobNeed::Recover => {
                let mut f = rec.deployment.clone().expect("decided on it");
                if f.phase == JobPhase::Run {
                    // The command may have run, in part or whole: never again by itself.
                    f.error = Some(format!(
                        "the agent stopped while the job ran: its outcome is unknown; drover retry {} {} runs it again",
                        f.target.environment, f.target.service
                    ));
                    return engine::conclude(self, &mut rec, &f, End::Broken, None).await;
                }
                // Nothing ran yet: go on from where it stopped, under the lease it holds.
                let phase = f.phase;
                engine::drive(self, &mut rec, f, phase, ctx, None).await
            }
            JobNeed::Done => Ok(Reconciled::Ran {
                version,
                elsewhere: rec.done.and_then(|d| d.elsewhere),
            }),
            JobNeed::SkipFailed { reason } => Ok(Reconciled::SkippedFailed { version, reason }),
            JobNeed::Run if e.gate.is_none() => Ok(Reconciled::Abandoned {
                version,
                error: "a job runs under the coordinator's lease, so that it runs once, on one host: give this agent a `coordinator:`".into(),
                retry: false,
            }),
            JobNeed::Run if e.undelivered(&mut rec) => Ok(Reconciled::Waiting {
                version,
                reason: "the outcome of the previous run is not delivered to the coordinator yet; it is sent again first".into(),
                retry_after_ms: 2000,
            }),
            JobNeed::Run => {
                let layout = Layout::new(&t.root);
                let flight = JobFlight {
                    phase: JobPhase::Lease,
                    target: t.clone(),
                    timeout: job.timeout,
                    dir: layout.dir_for(&t.version, &t.sha256, &[]),
                    error: None,
                    output: None,
                    started_at: fsutil::now_rfc3339(),
                };
                engine::drive(self, &mut rec, flight, JobPhase::Lease, ctx, None).await
            }
        }
    }

    /// Forgets that `version` of `service` failed here (`drover retry`). Returns whether it had.
    pub fn forget_failure(&self, service: &str, version: &str) -> Result<bool, DeployError> {
        let Some(mut rec) = self.record(service) else {
            return Ok(false);
        };
        if rec.failed.as_ref().is_none_or(|f| f.version != version) {
            return Ok(false);
        }
        rec.failed = None;
        self.vm.engine().save(&mut rec)?;
        Ok(true)
    }
}

impl Machine for JobRunner {
    type Phase = JobPhase;
    type Flight = JobFlight;
    type Record = JobRecord;
    type Error = VmError;

    fn engine(&self) -> &Engine {
        self.vm.engine()
    }

    fn name(phase: JobPhase) -> String {
        phase.name().into()
    }

    fn failpoint(phase: JobPhase) -> String {
        format!("job:{}", phase.name())
    }

    fn on_success(&self, _flight: &JobFlight, phase: JobPhase) -> Next<JobPhase> {
        phase.on_success()
    }

    fn on_failure(phase: JobPhase) -> Next<JobPhase> {
        phase.on_failure()
    }

    fn takes_lease(phase: JobPhase) -> bool {
        phase == JobPhase::Lease
    }

    fn rolls_back(_phase: JobPhase) -> bool {
        false
    }

    fn exhausted(_phase: JobPhase) -> End {
        End::Broken
    }

    async fn run_phase(
        &self,
        rec: &mut JobRecord,
        f: &mut JobFlight,
        phase: JobPhase,
    ) -> Result<(), StepError<VmError>> {
        let t = f.target.clone();
        match phase {
            JobPhase::Lease => unreachable!("the engine takes the lease"),
            JobPhase::Fetch => {
                if rec.lease.is_none() {
                    // `coordinator.required: false` and the coordinator unreachable: a
                    // service would deploy, but a job must not risk running twice.
                    return Err(StepError::Gate(crate::coordinator::GateError::Wait {
                        reason: "no_lease".into(),
                        message: "the coordinator cannot be reached, and a job runs only under its lease (so that it runs once, on one host)".into(),
                        retry_after: std::time::Duration::from_secs(5),
                    }));
                }
                self.vm.fetch(&t).await.map_err(StepError::Machine)?;
            }
            JobPhase::Stage => self
                .vm
                .stage(&t, &f.dir)
                .await
                .map_err(StepError::Machine)?,
            JobPhase::Run => {
                let out = self
                    .vm
                    .run_once(&t, &f.dir, f.timeout.0)
                    .await
                    .map_err(StepError::Machine)?;
                f.output = Some(tail(&out));
            }
            JobPhase::Done => {}
        }
        Ok(())
    }

    fn settle(
        &self,
        rec: &mut JobRecord,
        flight: &JobFlight,
        end: End,
        cause: Option<&StepError<VmError>>,
    ) -> Reconciled {
        settle(rec, flight, end, cause)
    }

    async fn after(&self, _rec: &JobRecord, f: &JobFlight, _outcome: &Reconciled) {
        let t = &f.target;
        let layout = Layout::new(&t.root);
        let removed = layout.prune(t.keep_releases as usize, &[f.dir.as_str()]);
        if !removed.is_empty() {
            tracing::info!(removed = ?removed, "old job releases removed");
        }
    }
}

/// The last lines of a job's output, as kept in its record.
fn tail(out: &str) -> String {
    let lines: Vec<&str> = out.lines().collect();
    let start = lines.len().saturating_sub(10);
    let text = lines[start..].join("\n");
    let mut cut = text.len().min(2048);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].to_string()
}
