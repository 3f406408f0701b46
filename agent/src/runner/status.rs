//! The host's status read from the state store: for `status`, heartbeats and the metrics
//! endpoint, which reads it at each scrape from a task of its own.

use super::*;

/// What the status is read from (cheap to clone).
#[derive(Clone)]
pub(super) struct Reader {
    pub(super) store: StateStore,
    pub(super) deployer: VmDeployer,
    pub(super) ecs: Option<EcsDeployer>,
    pub(super) host: String,
    pub(super) environment: String,
}

impl Reader {
    /// The local state of every service, and the repo status.
    pub(super) fn status(&self) -> HostStatus {
        let mut services = BTreeMap::new();
        for name in self.store.records::<VmRecord>().unwrap_or_default() {
            let entry = match self.store.load::<VmRecord>(&name) {
                Ok(Some(st)) => {
                    let process = match self.deployer.manager() {
                        Manager::Process(p) => p.running(&name).map(|a| report::Running {
                            pid: a.pid,
                            version: a.version,
                            since: a.started_at,
                        }),
                        Manager::Systemd(_) => None,
                    };
                    Entry::Read(report::ServiceStatus {
                        current: st.current.map(|r| r.version),
                        previous: st.previous.map(|r| r.version),
                        failed: st.failed,
                        deploying: st.deployment.map(|d| report::Deploying {
                            version: d.target.version,
                            phase: d.phase,
                            attempts: d.attempts,
                            since: d.started_at,
                        }),
                        process,
                        last_error: st.last_error,
                        verdict: st.verdict.map(|(version, v)| report::VerdictView {
                            version,
                            risk: v.risk,
                            summary: v.summary,
                            metrics: v.metrics,
                        }),
                        root: st.root,
                        updated_at: st.updated_at,
                    })
                }
                Ok(None) => continue,
                Err(e) => Entry::Unreadable {
                    error: e.to_string(),
                },
            };
            services.insert(name, entry);
        }
        let ecs = self.ecs.as_ref().map(|e| {
            e.services()
                .into_iter()
                .map(|n| {
                    let entry = match e.load(&n) {
                        Ok(st) => Entry::Read(report::EcsStatus {
                            current: st.current,
                            failed: st.failed,
                            deploying: st.deployment.map(|d| report::EcsDeploying {
                                version: d.target.version,
                                phase: d.phase.name(),
                                live: d.live,
                            }),
                            last_error: st.last_error,
                        }),
                        Err(err) => Entry::Unreadable {
                            error: err.to_string(),
                        },
                    };
                    (n, entry)
                })
                .collect()
        });
        let jobs = self
            .store
            .records::<crate::job::JobRecord>()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| {
                let entry = match self.store.load::<crate::job::JobRecord>(&n) {
                    Ok(Some(r)) => Entry::Read(report::JobStatus {
                        done: r.done,
                        failed: r.failed,
                        running: r.deployment.map(|d| (d.target.version, d.phase)),
                        last_error: r.last_error,
                    }),
                    Ok(None) => return None,
                    Err(e) => Entry::Unreadable {
                        error: e.to_string(),
                    },
                };
                Some((n, entry))
            })
            .collect();
        HostStatus {
            host: self.host.clone(),
            environment: self.environment.clone(),
            repo: self.store.repo_status(),
            services,
            ecs,
            jobs,
        }
    }
}
