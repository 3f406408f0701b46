//! The agent's top level: builds the peers from the configuration once, then runs the
//! daemon loop (`run`), a single pass (`once`), or answers `plan`, `status` and `rollback`.

mod daemon;
mod plan;
mod status;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::artifact::Fetcher;
use crate::config::{Config, Mode, ServiceManager};
use crate::coordinator::{Ctx, Gate};
use crate::ecs::EcsDeployer;
use crate::ecs::aws::Aws;
use crate::engine::{DeployError, Engine, Reconciled};
use crate::git_watch::{self, Mirror, Snapshot};
use crate::health::Checker;
use crate::job::JobRunner;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::release::Layout;
use crate::report::{self, Entry, HostStatus};
use crate::service::{Manager, Process, Systemd};
use crate::spec::{self, Host, HostPlan, Kind, ResolvedEcsService, ResolvedJob, ResolvedService};
use crate::state::StateStore;
use crate::vm::{Peers, VmDeployer, VmRecord};
use crate::yaml::Problems;
use drover_coordinator::wire::{self, ActionKind, ServiceReport};

/// How often process-managed services are checked for having died.
const SUPERVISE_EVERY: Duration = Duration::from_secs(2);

/// The agent, with its peers built from the configuration.
pub struct Agent {
    config: Config,
    store: StateStore,
    engine: Engine,
    deployer: VmDeployer,
    mirror: Arc<Mirror>,
    notify: Notifier,
    ecs: Option<EcsDeployer>,
    /// Runs this host's jobs (`kind: job`).
    once: JobRunner,
}

impl Agent {
    /// Builds the agent; fails if the state directory cannot be created.
    pub async fn new(config: Config, notify: Notifier) -> anyhow::Result<Agent> {
        let store = StateStore::open(&config.state_dir)
            .with_context(|| format!("cannot create state_dir {}", config.state_dir.display()))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("drover-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .context(
                "cannot build the HTTP client (TLS needs the system's CA certificates: install the ca-certificates package)",
            )?;
        let fetcher = Fetcher::new(
            http.clone(),
            store.cache_dir(),
            config.limits,
            config.download,
        );
        let manager = match config.service_manager {
            ServiceManager::Systemd => Manager::Systemd(Systemd::default()),
            ServiceManager::Process => {
                let (user, group) = config.run_as.clone().unwrap_or_default();
                if user
                    .as_ref()
                    .is_none_or(|u| matches!(u.as_str(), "root" | "0"))
                {
                    tracing::warn!(
                        "service_manager: process with no `run_as.user`: apps, hooks and smoke commands of services without `run.user` run as root"
                    );
                }
                Manager::Process(
                    Process::new(&config.state_dir, store.run_dir(), store.log_dir())
                        .with_run_as(user, group),
                )
            }
        };
        let http_for_ecs = http.clone();
        let gate = match &config.coordinator {
            Some(c) => Some(Gate::new(
                drover_coordinator::client::Client::with_options(&c.url, &c.token, &c.options)?,
                &config.host,
                &config.environment,
                c.required,
            )),
            None => None,
        };
        let engine = Engine {
            store: store.clone(),
            host: config.host.clone(),
            gate,
            notify: notify.clone(),
            metrics: Metrics::default(),
            progress: Default::default(),
        };
        let deployer = VmDeployer::new(
            engine.clone(),
            Peers {
                fetcher,
                checker: Checker::new(http.clone()),
                manager,
            },
            Arc::new(config.env.clone()),
            crate::release::Unpack {
                max_bytes: config.limits.max_unpacked_size,
                max_entries: config.limits.max_entries,
            },
        );

        let mirror = Arc::new(Mirror::new(
            &store.git_dir(),
            &config.repo.url,
            &config.repo.branch,
        ));
        let ecs = match &config.ecs {
            Some(c) if config.mode == Mode::Ecs => Some(
                EcsDeployer::new(engine.clone(), Aws::new(&c.region).await, http_for_ecs)
                    .with_poll(c.poll),
            ),
            _ => None,
        };
        let once = JobRunner::new(deployer.clone());
        Ok(Agent {
            config,
            store,
            engine,
            once,
            deployer,
            mirror,
            notify,
            ecs,
        })
    }

    /// Where deploys report their phases as they happen (nobody listens unless subscribed).
    pub fn progress(&self) -> &crate::progress::Progress {
        &self.engine.progress
    }

    /// The state store.
    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// What this host must run according to `snap`, or every problem in the repo.
    pub fn plan_for(&self, snap: &Snapshot) -> Result<HostPlan, Problems> {
        let vars: Vec<String> = self.config.vars.keys().cloned().collect();
        let repo = spec::load(&snap.files, Some(&vars))?;
        spec::resolve(
            &repo,
            &Host {
                name: &self.config.host,
                environment: &self.config.environment,
                labels: &self.config.labels,
                vars: &self.config.vars,
                manager: self.config.service_manager,
                kind: match self.config.mode {
                    Mode::Vm => Kind::Vm,
                    Mode::Ecs => Kind::Ecs,
                },
            },
        )
    }

    /// The services this agent keeps: the host's (vm), or its cluster's (ecs).
    fn jobs(&self, plan: &HostPlan) -> Vec<Job> {
        match (&self.ecs, &self.config.ecs) {
            (Some(_), Some(c)) => plan
                .ecs
                .iter()
                .filter(|s| s.ecs.cluster == c.cluster)
                .cloned()
                .map(Job::Ecs)
                .collect(),
            _ => plan
                .services
                .iter()
                .cloned()
                .map(Job::Vm)
                .chain(plan.jobs.iter().cloned().map(Job::Once))
                .collect(),
        }
    }

    /// What a lease request needs to know about `snap`.
    fn ctx(snap: &Snapshot) -> Ctx {
        Ctx {
            commit: snap.commit.clone(),
        }
    }

    /// The job of `service` at `version` as of `commit` (a `pin` from the coordinator): that
    /// commit's definition of the service, rendered for this host.
    async fn pinned(&self, service: &str, version: &str, commit: &str) -> anyhow::Result<Job> {
        let timeout = Duration::from_secs(120).max(self.config.repo.poll_interval);
        let snap = git_watch::snapshot_at(&self.mirror, commit, timeout)
            .await
            .with_context(|| format!("reading commit {} for {service} {version}", short(commit)))?;
        let plan = self.plan_for(&snap).map_err(|p| {
            anyhow::anyhow!(
                "commit {} (where {service} {version} comes from) does not validate for this host:\n{p}",
                short(commit)
            )
        })?;
        self.jobs(&plan)
            .into_iter()
            .find(|j| j.name() == service && j.version() == version)
            .with_context(|| {
                format!(
                    "commit {} has no {service} {version} for this host",
                    short(commit)
                )
            })
    }

    /// Applies what a heartbeat answer asks of `once`: `retry` forgets failures, `pin`
    /// replaces a job by the pinned version. (`revert` and `fetch` are for the daemon.)
    async fn apply_once(&self, actions: &[wire::Action], jobs: &mut [Job]) {
        for a in actions {
            match a.action {
                ActionKind::Retry => self.forget_failure(&a.service, &a.version).await,
                ActionKind::Pin => {
                    let Some(commit) = &a.commit else { continue };
                    match self.pinned(&a.service, &a.version, commit).await {
                        Ok(job) => {
                            tracing::warn!(service = %a.service, version = %a.version, reason = %a.reason, "the coordinator pins this version");
                            if let Some(j) = jobs.iter_mut().find(|j| j.name() == a.service) {
                                *j = job;
                            }
                        }
                        Err(e) => {
                            tracing::error!(service = %a.service, error = %format!("{e:#}"), "cannot follow the coordinator's rollback")
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Forgets that `version` of `service` failed here (the coordinator asks for it again).
    async fn forget_failure(&self, service: &str, version: &str) {
        let forgot = match &self.ecs {
            Some(e) => e.forget_failure(service, version),
            None if self.once.record(service).is_some() => {
                self.once.forget_failure(service, version)
            }
            None => self.deployer.forget_failure(service, version).await,
        };
        match forgot {
            Ok(true) => {
                tracing::info!(
                    service,
                    version,
                    "the coordinator asks for this version again; its failure here is forgotten"
                )
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(service, error = %e, "cannot update the state"),
        }
    }

    /// Tells the coordinator (if any) how this host's services are (`jobs`: what it is to run,
    /// read at `commit`); returns its actions, or `None` when it could not be told.
    async fn heartbeat(&self, jobs: &[Job], commit: Option<&str>) -> Option<Vec<wire::Action>> {
        let gate = self.engine.gate.as_ref()?;
        let reports = if let Some(ecs) = &self.ecs {
            let mut reports = Vec::new();
            for job in jobs {
                let Job::Ecs(svc) = job else { continue };
                let st = ecs.load(&svc.service).ok();
                reports.push(ServiceReport {
                    service: svc.service.clone(),
                    desired: Some(svc.version.clone()),
                    actual: st
                        .as_ref()
                        .and_then(|s| s.current.as_ref())
                        .map(|c| c.version.clone()),
                    healthy: st
                        .as_ref()
                        .is_some_and(|s| s.current.is_some() && s.deployment.is_none()),
                    phase: st
                        .as_ref()
                        .and_then(|s| s.deployment.as_ref())
                        .map(|d| d.phase.name()),
                    failed: st
                        .as_ref()
                        .and_then(|s| s.failed.as_ref())
                        .map(|f| f.version.clone()),
                    last_error: st.and_then(|s| s.last_error),
                });
            }
            reports
        } else {
            let mut reports = Vec::new();
            // Jobs: done (here or elsewhere) is as good as running; nothing runs to be checked.
            for job in jobs {
                let Job::Once(j) = job else { continue };
                let rec = self.once.record(&j.service.service);
                reports.push(ServiceReport {
                    service: j.service.service.clone(),
                    desired: Some(j.service.version.clone()),
                    actual: rec
                        .as_ref()
                        .and_then(|r| r.done.as_ref())
                        .map(|d| d.version.clone()),
                    healthy: true,
                    phase: rec
                        .as_ref()
                        .and_then(|r| r.deployment.as_ref())
                        .map(|d| d.phase.name().to_string()),
                    failed: rec
                        .as_ref()
                        .and_then(|r| r.failed.as_ref())
                        .map(|f| f.version.clone()),
                    last_error: rec.and_then(|r| r.last_error),
                });
            }
            let mut names: Vec<String> = self.store.records::<VmRecord>().unwrap_or_default();
            names.extend(
                jobs.iter()
                    .filter(|j| !matches!(j, Job::Once(_)))
                    .map(|j| j.name().to_string()),
            );
            names.sort();
            names.dedup();
            for name in names {
                let desired = jobs
                    .iter()
                    .find(|j| j.name() == name)
                    .map(|j| j.version().to_string());
                let st = self.store.load::<VmRecord>(&name).ok().flatten();
                let current = st.as_ref().and_then(|s| s.current.as_ref());
                let healthy = match current.and_then(|c| c.spec.as_deref()) {
                    Some(spec) => self
                        .deployer
                        .manager()
                        .is_running(spec)
                        .await
                        .unwrap_or(false),
                    None => false,
                };
                reports.push(ServiceReport {
                    service: name,
                    desired,
                    actual: current.map(|c| c.version.clone()),
                    healthy,
                    phase: st
                        .as_ref()
                        .and_then(|s| s.deployment.as_ref())
                        .map(|d| d.phase.name().to_string()),
                    failed: st
                        .as_ref()
                        .and_then(|s| s.failed.as_ref())
                        .map(|f| f.version.clone()),
                    last_error: st.and_then(|s| s.last_error),
                });
            }
            reports
        };
        match gate
            .heartbeat(reports, &self.config.labels, commit.map(str::to_string))
            .await
        {
            Ok(actions) => {
                self.engine.metrics.coordinator(true);
                Some(actions)
            }
            Err(e) => {
                self.engine.metrics.coordinator(false);
                tracing::warn!(error = %e, "heartbeat failed");
                None
            }
        }
    }

    /// Fetches the desired state and renders this host's plan from it; `consequence` is
    /// appended to the error when the state is invalid.
    async fn desired(&self, consequence: &str) -> anyhow::Result<(Snapshot, HostPlan)> {
        let snap = self
            .fetch()
            .await
            .context("cannot read the desired state")?;
        let plan = self.plan_for(&snap).map_err(|p| {
            anyhow::anyhow!(
                "the desired state at commit {} is invalid{consequence}:\n{p}",
                short(&snap.commit)
            )
        })?;
        Ok((snap, plan))
    }

    async fn fetch(&self) -> anyhow::Result<Snapshot> {
        let timeout = Duration::from_secs(120).max(self.config.repo.poll_interval);
        let result = git_watch::fetch_snapshot(&self.mirror, timeout).await;
        let repo = &self.config.repo;
        git_watch::record(&self.store, &repo.url, &repo.branch, &result);
        Ok(result?)
    }

    /// Finishes deploys that a crash interrupted and restarts current releases that are not
    /// running, from the local state alone (no Git needed).
    pub async fn recover(&self) -> Vec<(String, Result<Reconciled, DeployError>)> {
        let mut out = Vec::new();
        if let Some(ecs) = &self.ecs {
            // An ECS deploy in flight is finished or undone from its record and AWS.
            for name in ecs.services() {
                if let Ok(st) = ecs.load(&name)
                    && let Some(d) = st.deployment
                {
                    let r = ecs.reconcile(&d.target, None).await;
                    out.push((name, r));
                }
            }
            return out;
        }
        for name in self.store.records::<VmRecord>().unwrap_or_default() {
            let st = match self.store.load::<VmRecord>(&name) {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(service = %name, error = %e, "cannot read state");
                    continue;
                }
            };
            let target = match (&st.deployment, &st.current) {
                (Some(d), _) => d.target.clone(),
                (None, Some(c)) => match &c.spec {
                    Some(spec) => (**spec).clone(),
                    None => continue,
                },
                _ => continue,
            };
            let r = self.deployer.reconcile(&target, None).await;
            out.push((name, r));
        }
        out
    }

    /// One pass: recover, fetch, deploy every service of this host, wait for the checks.
    /// Returns each service's outcome; the host converged if all did.
    pub async fn once(&self) -> anyhow::Result<Vec<(String, Reconciled)>> {
        self.deployer_prepare();
        for (name, r) in self.recover().await {
            if let Err(e) = r {
                tracing::error!(service = %name, error = %e, "recovery failed");
            }
        }
        let (snap, plan) = self.desired("; nothing was changed").await?;
        let ctx = Agent::ctx(&snap);
        let mut jobs = self.jobs(&plan);
        if let Some(actions) = self.heartbeat(&jobs, Some(&snap.commit)).await {
            self.apply_once(&actions, &mut jobs).await;
        }
        let mut tasks = JoinSet::new();
        for job in jobs.clone() {
            let (d, e, ctx) = (self.deployer.clone(), self.ecs.clone(), ctx.clone());
            let once = self.once.clone();
            tasks.spawn(async move {
                let r = match &job {
                    Job::Vm(s) => d.reconcile(s, Some(&ctx)).await,
                    Job::Once(j) => once.reconcile(j, Some(&ctx)).await,
                    Job::Ecs(s) => {
                        let e = e.expect("ECS jobs only in ECS mode");
                        e.reconcile(s, Some(&ctx)).await
                    }
                };
                (job.name().to_string(), r)
            });
        }
        let mut results = Vec::new();
        while let Some(r) = tasks.join_next().await {
            let (name, r) = r.expect("reconcile task does not panic");
            results.push((name.clone(), r.with_context(|| format!("service {name}"))?));
        }
        results.sort_by(|a, b| a.0.cmp(&b.0));
        self.heartbeat(&jobs, Some(&snap.commit)).await;
        Ok(results)
    }

    fn deployer_prepare(&self) {
        crate::artifact::clean_partials(&self.store.cache_dir());
    }

    /// Rolls `service` back to its previous release.
    pub async fn rollback(&self, service: &str) -> anyhow::Result<Reconciled> {
        Ok(match &self.ecs {
            Some(e) => e.rollback(service).await?,
            None => self.deployer.rollback(service).await?,
        })
    }

    /// The local state of every service, and the repo status.
    pub fn status(&self) -> HostStatus {
        self.reader().status()
    }

    /// What reads the status, detached from the agent (for the metrics endpoint).
    fn reader(&self) -> status::Reader {
        status::Reader {
            store: self.store.clone(),
            deployer: self.deployer.clone(),
            ecs: self.ecs.clone(),
            host: self.config.host.clone(),
            environment: self.config.environment.clone(),
        }
    }
}

/// One service to keep in its desired state.
#[derive(Clone, Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "a handful per pass, never moved in bulk"
)]
enum Job {
    /// A service of this host.
    Vm(ResolvedService),
    /// An ECS service of this agent's cluster.
    Ecs(ResolvedEcsService),
    /// A `kind: job` this host may run (once, if the coordinator's lease picks it).
    Once(ResolvedJob),
}

impl Job {
    fn name(&self) -> &str {
        match self {
            Job::Vm(s) => &s.service,
            Job::Ecs(s) => &s.service,
            Job::Once(j) => &j.service.service,
        }
    }

    fn version(&self) -> &str {
        match self {
            Job::Vm(s) => &s.version,
            Job::Ecs(s) => &s.version,
            Job::Once(j) => &j.service.version,
        }
    }
}

/// The jobs of the branch tip, with the services the coordinator pins replaced.
fn pinned(base: &[Job], pins: &BTreeMap<String, Job>) -> Vec<Job> {
    base.iter()
        .map(|j| pins.get(j.name()).unwrap_or(j).clone())
        .collect()
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}
