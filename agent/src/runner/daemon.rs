//! The daemon's loop: follow the repo, keep every service in its desired state, heartbeat,
//! supervise, retry, and stop cleanly on shutdown.

use super::*;

impl Agent {
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
        let endpoint = match &self.config.metrics {
            Some(m) => {
                let listener = crate::metrics::http::bind(m.listen).await?;
                tracing::info!(listen = %m.listen, "serving Prometheus metrics at /metrics");
                let (reader, metrics) = (self.reader(), self.engine.metrics.clone());
                let page: crate::metrics::http::Page = std::sync::Arc::new(move || {
                    crate::metrics::render(&reader.status(), &metrics.snapshot())
                });
                Some(tokio::spawn(crate::metrics::http::serve(
                    listener,
                    m.token.clone(),
                    page,
                    shutdown.clone(),
                )))
            }
            None => None,
        };
        self.deployer_prepare();
        for (name, r) in self.recover().await {
            match r {
                Ok(o) if !matches!(o, Reconciled::UpToDate { .. }) => {
                    tracing::info!(service = %name, outcome = %o.summary(), "recovered")
                }
                Ok(_) => {}
                Err(e) => tracing::error!(service = %name, error = %e, "recovery failed"),
            }
        }
        let (tx, mut snapshots) = watch::channel(None);
        let (wake, wake_rx) = tokio::sync::mpsc::channel(1);
        // With a coordinator, it says when the tip moves; Git is polled while it is away.
        let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let follower = self.engine.gate.as_ref().map(|g| {
            tokio::spawn(git_watch::follow_coordinator(
                g.client().clone(),
                self.config.host.clone(),
                tx.subscribe(),
                wake.clone(),
                connected.clone(),
                shutdown.clone(),
            ))
        });
        let away = connected.clone();
        let watcher = tokio::spawn(git_watch::watch(
            self.mirror.clone(),
            self.config.repo.clone(),
            self.store.clone(),
            self.engine.metrics.clone(),
            tx,
            wake_rx,
            shutdown.clone(),
            move || !away.load(std::sync::atomic::Ordering::Relaxed),
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
        let mut tasks: JoinSet<(String, Result<Reconciled, DeployError>)> = JoinSet::new();
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
            let (d, e, once) = (self.deployer.clone(), self.ecs.clone(), self.once.clone());
            let (job, ctx) = (job.clone(), ctx.clone());
            tasks.spawn(async move {
                let r = match &job {
                    Job::Vm(s) => d.reconcile(s, ctx.as_ref()).await,
                    Job::Once(j) => once.reconcile(j, ctx.as_ref()).await,
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
                            self.engine.metrics.desired(jobs.iter().map(|j| (j.name(), j.version())));
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
                _ = beat.tick(), if self.engine.gate.is_some() => {
                    let commit = ctx.as_ref().map(|c| c.commit.as_str());
                    let Some(actions) = self.heartbeat(&jobs, commit).await else { continue };
                    let mut redo: Vec<String> = Vec::new();
                    let mut pinned_now: Vec<&str> = Vec::new();
                    for a in &actions {
                        let busy = slots.get(&a.service).is_some_and(|s| s.busy);
                        match a.action {
                            // While the tip is long-polled, that already fetched (or will):
                            // one fetch per commit.
                            ActionKind::Fetch if !connected.load(std::sync::atomic::Ordering::Relaxed) => {
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
                        self.engine.metrics.desired(jobs.iter().map(|j| (j.name(), j.version())));
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
        if let Some(f) = follower {
            f.abort();
        }
        if let Some(e) = endpoint {
            e.abort();
        }
        Ok(())
    }
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
    fn report(&mut self, name: &str, result: Result<Reconciled, DeployError>) {
        let (line, retry) = match &result {
            Ok(o) => (
                o.summary(),
                matches!(
                    o,
                    Reconciled::Abandoned { retry: true, .. } | Reconciled::Broken { .. }
                ),
            ),
            Err(e) => (e.to_string(), true),
        };
        if let Ok(Reconciled::Waiting { retry_after_ms, .. }) = &result {
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
            Ok(Reconciled::UpToDate { .. }) => tracing::debug!(service = name, "{line}"),
            Ok(
                Reconciled::Deployed { .. } | Reconciled::Started { .. } | Reconciled::Ran { .. },
            ) => {
                tracing::info!(service = name, "{line}")
            }
            Ok(Reconciled::Waiting { .. }) => tracing::info!(service = name, "{line}"),
            Ok(
                Reconciled::RolledBack { .. }
                | Reconciled::SkippedFailed { .. }
                | Reconciled::Abandoned { .. },
            ) => {
                tracing::warn!(service = name, "{line}")
            }
            Ok(Reconciled::Broken { .. } | Reconciled::Failed { .. }) | Err(_) => {
                tracing::error!(service = name, "{line}")
            }
        }
        self.last = Some(line);
    }
}
