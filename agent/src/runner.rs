//! The agent's top level: builds the peers from the configuration once, then runs the
//! daemon loop (`run`), a single pass (`once`), or answers `plan`, `status` and `rollback`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::artifact::Fetcher;
use crate::config::{Config, Mode, ServiceManager};
use crate::coordinator::{Ctx, Gate};
use crate::deploy::driver::{DeployError, Deployer, Outcome, Peers};
use crate::deploy::{Action, decide};
use crate::ecs::aws::Aws;
use crate::ecs::driver::EcsDeployer;
use crate::git_watch::{self, Mirror, Snapshot};
use crate::health::Checker;
use crate::notify::Notifier;
use crate::release::Layout;
use crate::service::{Manager, Process, Systemd};
use crate::spec::{self, Host, HostPlan, Kind, ResolvedEcsService, ResolvedService};
use crate::state::Store;
use crate::yaml::Problems;
use drover_coordinator::wire::{self, ActionKind, ServiceReport};

/// How often process-managed services are checked for having died.
const SUPERVISE_EVERY: Duration = Duration::from_secs(2);

/// The agent, with its peers built from the configuration.
pub struct Agent {
    config: Config,
    store: Store,
    deployer: Deployer,
    mirror: Arc<Mirror>,
    notify: Notifier,
    ecs: Option<EcsDeployer>,
}

impl Agent {
    /// Builds the agent; fails if the state directory cannot be created.
    pub async fn new(config: Config, notify: Notifier) -> anyhow::Result<Agent> {
        let store = Store::open(&config.state_dir)
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
        let deployer = Deployer::new(
            store.clone(),
            config.host.clone(),
            Peers {
                fetcher,
                checker: Checker::new(http.clone()),
                manager,
                gate,
                notify: notify.clone(),
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
            Some(c) if config.mode == Mode::Ecs => Some(EcsDeployer::new(
                Aws::new(&c.region).await,
                store.clone(),
                config.host.clone(),
                deployer.gate().cloned(),
                notify.clone(),
                http_for_ecs,
            )),
            _ => None,
        };
        Ok(Agent {
            config,
            store,
            deployer,
            mirror,
            notify,
            ecs,
        })
    }

    /// The state store.
    pub fn store(&self) -> &Store {
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
            _ => plan.services.iter().cloned().map(Job::Vm).collect(),
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
        let gate = self.deployer.gate()?;
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
            let mut names: Vec<String> = self.store.services().unwrap_or_default();
            names.extend(jobs.iter().map(|j| j.name().to_string()));
            names.sort();
            names.dedup();
            let mut reports = Vec::new();
            for name in names {
                let desired = jobs
                    .iter()
                    .find(|j| j.name() == name)
                    .map(|j| j.version().to_string());
                let st = self.store.load(&name).ok().flatten();
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
            Ok(actions) => Some(actions),
            Err(e) => {
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
    pub async fn recover(&self) -> Vec<(String, Result<Outcome, DeployError>)> {
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
        for name in self.store.services().unwrap_or_default() {
            let st = match self.store.load(&name) {
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
    pub async fn once(&self) -> anyhow::Result<Vec<(String, Outcome)>> {
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
            tasks.spawn(async move {
                let r = match &job {
                    Job::Vm(s) => d.reconcile(s, Some(&ctx)).await,
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

    /// The daemon: watch the repo and keep the host in its desired state until `shutdown`.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let _daemon = self
            .store
            .lock_daemon()
            .context("cannot lock the state directory")?
            .with_context(|| {
                format!(
                    "another drover-agent is already running with state_dir {}",
                    self.config.state_dir.display()
                )
            })?;
        self.deployer_prepare();
        for (name, r) in self.recover().await {
            match r {
                Ok(o) if !matches!(o, Outcome::UpToDate { .. }) => {
                    tracing::info!(service = %name, outcome = %o.summary(), "recovered")
                }
                Ok(_) => {}
                Err(e) => tracing::error!(service = %name, error = %e, "recovery failed"),
            }
        }
        let (tx, mut snapshots) = watch::channel(None);
        let (wake, wake_rx) = tokio::sync::mpsc::channel(1);
        let watcher = tokio::spawn(git_watch::watch(
            self.mirror.clone(),
            self.config.repo.clone(),
            self.store.clone(),
            tx,
            wake_rx,
            shutdown.clone(),
        ));
        tracing::info!(
            host = %self.config.host,
            environment = %self.config.environment,
            repo = %self.config.repo.url,
            "agent running"
        );
        self.notify.ready(&format!(
            "watching {} ({})",
            self.config.repo.url, self.config.repo.branch
        ));
        let mut dog = tokio::time::interval(
            self.notify
                .watchdog_every()
                .unwrap_or(Duration::from_secs(3600)),
        );
        let mut ctx: Option<Ctx> = None;
        // The jobs of the branch tip, and the services the coordinator pins to another
        // version (`drover rollback`) until Git changes their version.
        let mut base: Vec<Job> = Vec::new();
        let mut pins: BTreeMap<String, Job> = BTreeMap::new();
        let mut slots: HashMap<String, Slot> = HashMap::new();
        let mut tasks: JoinSet<(String, Result<Outcome, DeployError>)> = JoinSet::new();
        let mut tick = tokio::time::interval(SUPERVISE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let beat_every = self
            .config
            .coordinator
            .as_ref()
            .map(|c| c.heartbeat)
            .unwrap_or(Duration::from_secs(3600));
        let mut beat = tokio::time::interval(beat_every);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut jobs: Vec<Job> = Vec::new();
        let spawn = |tasks: &mut JoinSet<_>, slot: &mut Slot, job: &Job, ctx: &Option<Ctx>| {
            slot.busy = true;
            slot.dirty = false;
            let (d, e) = (self.deployer.clone(), self.ecs.clone());
            let (job, ctx) = (job.clone(), ctx.clone());
            tasks.spawn(async move {
                let r = match &job {
                    Job::Vm(s) => d.reconcile(s, ctx.as_ref()).await,
                    Job::Ecs(s) => {
                        let e = e.expect("ECS jobs only in ECS mode");
                        e.reconcile(s, ctx.as_ref()).await
                    }
                };
                (job.name().to_string(), r)
            });
        };
        loop {
            let next_retry = slots
                .values()
                .filter(|s| !s.busy)
                .filter_map(|s| s.retry_at)
                .min();
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() { break; }
                    let Some(snap) = snapshots.borrow_and_update().clone() else { continue };
                    match self.plan_for(&snap) {
                        Ok(p) => {
                            ctx = Some(Agent::ctx(&snap));
                            base = self.jobs(&p);
                            jobs = pinned(&base, &pins);
                            let wanted: Vec<&str> = jobs.iter().map(Job::name).collect();
                            for old in slots.keys().filter(|k| !wanted.contains(&k.as_str())) {
                                tracing::warn!(service = %old, "no longer in this host's desired state; leaving it as it is");
                            }
                            slots.retain(|k, _| wanted.contains(&k.as_str()));
                            for job in &jobs {
                                let slot = slots.entry(job.name().to_string()).or_default();
                                slot.retry_at = None;
                                slot.backoff = Duration::ZERO;
                                if slot.busy { slot.dirty = true } else { spawn(&mut tasks, slot, job, &ctx) }
                            }
                        }
                        Err(problems) => {
                            tracing::error!(
                                commit = %short(&snap.commit),
                                problems = problems.0.len(),
                                "the desired state is invalid; keeping the running versions:\n{problems}"
                            );
                            let mut status = self.store.repo_status().unwrap_or_default();
                            status.error = Some(format!("commit {} is invalid:\n{problems}", short(&snap.commit)));
                            let _ = self.store.save_repo_status(&status);
                        }
                    }
                }
                Some(done) = tasks.join_next() => {
                    let (name, result) = done.expect("reconcile task does not panic");
                    let Some(slot) = slots.get_mut(&name) else { continue };
                    slot.busy = false;
                    slot.report(&name, result);
                    if slot.dirty && let Some(job) = jobs.iter().find(|j| j.name() == name) {
                        spawn(&mut tasks, slot, job, &ctx);
                    }
                }
                _ = beat.tick(), if self.deployer.gate().is_some() => {
                    let commit = ctx.as_ref().map(|c| c.commit.as_str());
                    let Some(actions) = self.heartbeat(&jobs, commit).await else { continue };
                    let mut redo: Vec<String> = Vec::new();
                    let mut pinned_now: Vec<&str> = Vec::new();
                    for a in &actions {
                        let busy = slots.get(&a.service).is_some_and(|s| s.busy);
                        match a.action {
                            ActionKind::Fetch => {
                                tracing::info!(service = %a.service, reason = %a.reason, "the coordinator says the desired state moved; fetching");
                                let _ = wake.try_send(());
                            }
                            ActionKind::Retry if !busy => {
                                self.forget_failure(&a.service, &a.version).await;
                                redo.push(a.service.clone());
                            }
                            ActionKind::Pin => {
                                pinned_now.push(&a.service);
                                if let Some(ecs) = &self.ecs
                                    && ecs.abort(&a.service, &a.version, &a.reason)
                                {
                                    tracing::warn!(service = %a.service, reason = %a.reason, "stopping the deploy in flight: traffic goes back to the old side");
                                }
                                if pins.get(&a.service).is_some_and(|j| j.version() == a.version) {
                                    continue;
                                }
                                let Some(commit) = &a.commit else { continue };
                                match self.pinned(&a.service, &a.version, commit).await {
                                    Ok(job) => {
                                        tracing::warn!(service = %a.service, version = %a.version, reason = %a.reason, "the coordinator rolls this service back");
                                        pins.insert(a.service.clone(), job);
                                        redo.push(a.service.clone());
                                    }
                                    Err(e) => tracing::error!(service = %a.service, error = %format!("{e:#}"), "cannot follow the coordinator's rollback; retrying at the next heartbeat"),
                                }
                            }
                            ActionKind::Revert if self.ecs.is_none() && !busy => {
                                let slot = slots.entry(a.service.clone()).or_default();
                                tracing::warn!(service = %a.service, version = %a.version, reason = %a.reason, "the coordinator asks to revert");
                                slot.busy = true;
                                let (d, ctx, a) = (self.deployer.clone(), ctx.clone(), a.clone());
                                tasks.spawn(async move {
                                    let r = d.revert(&a.service, &a.version, &a.reason, ctx.as_ref()).await;
                                    (a.service, r)
                                });
                            }
                            _ => {}
                        }
                    }
                    let ended: Vec<String> = pins
                        .keys()
                        .filter(|k| !pinned_now.contains(&k.as_str()))
                        .cloned()
                        .collect();
                    for service in ended {
                        tracing::info!(service = %service, "the coordinator's rollback ended; following Git again");
                        pins.remove(&service);
                        redo.push(service);
                    }
                    if !redo.is_empty() {
                        jobs = pinned(&base, &pins);
                        for name in redo {
                            let Some(job) = jobs.iter().find(|j| j.name() == name) else { continue };
                            let slot = slots.entry(name).or_default();
                            slot.retry_at = None;
                            slot.backoff = Duration::ZERO;
                            if slot.busy { slot.dirty = true } else { spawn(&mut tasks, slot, job, &ctx) }
                        }
                    }
                }
                _ = tick.tick() => {
                    // Supervision: process-managed apps that died are started again.
                    if !matches!(self.config.service_manager, ServiceManager::Process) || self.ecs.is_some() { continue; }
                    for job in &jobs {
                        let slot = slots.entry(job.name().to_string()).or_default();
                        if !slot.busy && slot.retry_at.is_none() {
                            spawn(&mut tasks, slot, job, &ctx);
                        }
                    }
                }
                _ = until(next_retry) => {
                    let now = Instant::now();
                    for job in &jobs {
                        let slot = slots.entry(job.name().to_string()).or_default();
                        if !slot.busy && slot.retry_at.is_some_and(|at| at <= now) {
                            spawn(&mut tasks, slot, job, &ctx);
                        }
                    }
                }
                _ = dog.tick(), if self.notify.watchdog_every().is_some() => self.notify.watchdog(),
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { break; }
                }
            }
        }
        tracing::info!("stopping; waiting for deploys in flight");
        self.notify.stopping();
        let wait = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(90), wait)
            .await
            .is_err()
        {
            tracing::warn!("deploys still in flight after 90s; they resume at the next start");
        }
        watcher.abort();
        Ok(())
    }

    /// What `plan` prints: what would change on this host, nothing done.
    pub async fn plan(&self) -> anyhow::Result<String> {
        let (snap, plan) = self.desired("").await?;
        let mut out = format!(
            "commit {} — host {} in environment {}\n",
            short(&snap.commit),
            self.config.host,
            self.config.environment
        );
        if let Some(ecs) = &self.ecs {
            for job in self.jobs(&plan) {
                if let Job::Ecs(svc) = job {
                    out.push_str(&format!("  {}: {}\n", svc.service, ecs.plan(&svc).await));
                }
            }
            if plan.ecs.is_empty() {
                out.push_str("  no ECS services in this environment\n");
            }
            return Ok(out);
        }
        for svc in &plan.services {
            let st = match self.store.load(&svc.service) {
                Ok(s) => s.unwrap_or_else(|| crate::state::ServiceState::new(&svc.service)),
                Err(e) => {
                    out.push_str(&format!("  {}: {e}\n", svc.service));
                    continue;
                }
            };
            let layout = Layout::new(&svc.root);
            let line = match decide(svc, &st, layout.current().as_deref()) {
                Action::Recover => format!(
                    "finish an interrupted deploy of {} (phase {})",
                    st.deployment
                        .as_ref()
                        .map(|d| d.target.version.as_str())
                        .unwrap_or("?"),
                    st.deployment
                        .as_ref()
                        .map(|d| d.phase.name())
                        .unwrap_or("?")
                ),
                Action::EnsureRunning => format!("{} — up to date", svc.version),
                Action::SkipFailed { reason } => format!(
                    "{} failed here before; not retried until the desired version changes ({reason})",
                    svc.version
                ),
                Action::Deploy => {
                    deploy_steps(svc, st.current.as_ref().map(|c| c.version.as_str()))
                }
            };
            out.push_str(&format!("  {}: {line}\n", svc.service));
        }
        for (name, why) in &plan.skipped {
            out.push_str(&format!("  {name}: not on this host ({why})\n"));
        }
        if plan.services.is_empty() && plan.skipped.is_empty() {
            out.push_str("  no services for this host\n");
        }
        Ok(out)
    }

    /// Rolls `service` back to its previous release.
    pub async fn rollback(&self, service: &str) -> anyhow::Result<Outcome> {
        Ok(self.deployer.rollback(service).await?)
    }

    /// The local state of every service, and the repo status, as JSON.
    pub fn status(&self) -> serde_json::Value {
        let mut services = BTreeMap::new();
        for name in self.store.services().unwrap_or_default() {
            let v = match self.store.load(&name) {
                Ok(Some(st)) => {
                    let running = match self.deployer.manager() {
                        Manager::Process(p) => p.running(&name).map(|a| {
                            serde_json::json!({
                                "pid": a.pid, "version": a.version, "since": a.started_at,
                            })
                        }),
                        Manager::Systemd(_) => None,
                    };
                    serde_json::json!({
                        "current": st.current.as_ref().map(|r| &r.version),
                        "previous": st.previous.as_ref().map(|r| &r.version),
                        "failed": st.failed,
                        "deploying": st.deployment.as_ref().map(|d| serde_json::json!({
                            "version": d.target.version, "phase": d.phase, "attempts": d.attempts,
                            "since": d.started_at,
                        })),
                        "process": running,
                        "last_error": st.last_error,
                        "verdict": st.verdict.as_ref().map(|(v, verdict)| serde_json::json!({
                            "version": v, "risk": verdict.risk, "summary": verdict.summary,
                            "metrics": verdict.metrics,
                        })),
                        "root": st.root,
                        "updated_at": st.updated_at,
                    })
                }
                Ok(None) => continue,
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            };
            services.insert(name, v);
        }
        serde_json::json!({
            "host": self.config.host,
            "environment": self.config.environment,
            "repo": self.store.repo_status(),
                        "services": services,
            "ecs": self.ecs.as_ref().map(|e| {
                e.services()
                    .into_iter()
                    .map(|n| {
                        let v = match e.load(&n) {
                            Ok(st) => serde_json::json!({
                                "current": st.current,
                                "failed": st.failed,
                                "deploying": st.deployment.as_ref().map(|d| serde_json::json!({
                                    "version": d.target.version, "phase": d.phase.name(), "live": d.live,
                                })),
                                "last_error": st.last_error,
                            }),
                            Err(err) => serde_json::json!({ "error": err.to_string() }),
                        };
                        (n, v)
                    })
                    .collect::<BTreeMap<_, _>>()
            }),
        })
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
}

impl Job {
    fn name(&self) -> &str {
        match self {
            Job::Vm(s) => &s.service,
            Job::Ecs(s) => &s.service,
        }
    }

    fn version(&self) -> &str {
        match self {
            Job::Vm(s) => &s.version,
            Job::Ecs(s) => &s.version,
        }
    }
}

/// The jobs of the branch tip, with the services the coordinator pins replaced.
fn pinned(base: &[Job], pins: &BTreeMap<String, Job>) -> Vec<Job> {
    base.iter()
        .map(|j| pins.get(j.name()).unwrap_or(j).clone())
        .collect()
}

/// Sleeps until `at`, or forever.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The per-service bookkeeping of the daemon loop.
#[derive(Debug, Default)]
struct Slot {
    busy: bool,
    /// The desired state changed while busy: reconcile again when done.
    dirty: bool,
    /// When to retry after a failure that may pass (none: only on change/supervision).
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The last outcome logged, to log each new situation once.
    last: Option<String>,
}

impl Slot {
    fn report(&mut self, name: &str, result: Result<Outcome, DeployError>) {
        let (line, retry) = match &result {
            Ok(o) => (
                o.summary(),
                matches!(
                    o,
                    Outcome::Abandoned { retry: true, .. } | Outcome::Broken { .. }
                ),
            ),
            Err(e) => (e.to_string(), true),
        };
        if let Ok(Outcome::Waiting { retry_after_ms, .. }) = &result {
            // The coordinator says when to ask again.
            self.retry_at =
                Some(Instant::now() + Duration::from_millis((*retry_after_ms).max(200)));
        } else if retry {
            self.backoff =
                (self.backoff * 2).clamp(Duration::from_secs(5), Duration::from_secs(300));
            self.retry_at = Some(Instant::now() + self.backoff);
        } else {
            self.retry_at = None;
            self.backoff = Duration::ZERO;
        }
        if self.last.as_deref() == Some(line.as_str()) {
            return;
        }
        match &result {
            Ok(Outcome::UpToDate { .. }) => tracing::debug!(service = name, "{line}"),
            Ok(Outcome::Deployed { .. } | Outcome::Started { .. }) => {
                tracing::info!(service = name, "{line}")
            }
            Ok(Outcome::Waiting { .. }) => tracing::info!(service = name, "{line}"),
            Ok(
                Outcome::RolledBack { .. }
                | Outcome::SkippedFailed { .. }
                | Outcome::Abandoned { .. },
            ) => {
                tracing::warn!(service = name, "{line}")
            }
            Ok(Outcome::Broken { .. }) | Err(_) => tracing::error!(service = name, "{line}"),
        }
        self.last = Some(line);
    }
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

fn deploy_steps(svc: &ResolvedService, from: Option<&str>) -> String {
    let mut steps = vec![format!(
        "fetch {} (sha256 {})",
        svc.artifact_url,
        svc.sha256.short()
    )];
    steps.push(format!(
        "stage {}/releases/{}",
        svc.root.display(),
        svc.version
    ));
    if from.is_some() && svc.before_stop.is_some() {
        steps.push("before_stop hook".into());
    }
    steps.push("stop".into());
    steps.push("switch current".into());
    if svc.after_install.is_some() {
        steps.push("after_install hook".into());
    }
    steps.push("start".into());
    if let Some(h) = &svc.health {
        steps.push(format!("health {}", h.url));
    }
    if !svc.smoke.is_empty() {
        steps.push(format!("{} smoke test(s)", svc.smoke.len()));
    }
    format!(
        "{} → {}: {}",
        from.unwrap_or("(nothing)"),
        svc.version,
        steps.join(", ")
    )
}
