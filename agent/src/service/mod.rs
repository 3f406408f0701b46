//! Stopping and starting services: `systemd` (systemctl) or `process` (the agent runs the
//! command itself, detached, and supervises it).

mod process;
mod systemd;

use std::path::Path;
use std::time::Duration;

pub use process::{AppProcess, Process};
pub use systemd::Systemd;

use crate::account::{self, AccountError, Ids};
use crate::spec::ResolvedService;

/// Why a service could not be stopped, started or inspected.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs, reason = "variant fields are named for what they hold")]
pub enum ServiceError {
    /// `run.user` or `run.group` is not on this host.
    #[error(transparent)]
    Account(#[from] AccountError),
    /// The command could not be started.
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// The started command exited at once.
    #[error("`{command}` exited right after start ({status}); see {log}")]
    ExitedAtStart {
        command: String,
        /// How it exited.
        status: String,
        log: String,
    },
    /// The process did not stop, even after SIGKILL.
    #[error("process {pid} of `{service}` did not exit after SIGTERM and SIGKILL")]
    WontStop { service: String, pid: i32 },
    /// The systemd unit does not exist.
    #[error("systemd unit {unit} not found; install the unit file (systemctl cat {unit})")]
    UnitMissing { unit: String },
    /// systemctl failed.
    #[error("systemctl {action} {unit} failed ({status}): {stderr}; see `journalctl -u {unit}`")]
    Systemctl {
        unit: String,
        /// stop, start, …
        action: &'static str,
        status: String,
        /// What systemctl printed.
        stderr: String,
    },
    /// systemctl did not finish in time.
    #[error("systemctl {action} {unit} timed out after {after:?}")]
    Timeout {
        unit: String,
        /// stop, start, …
        action: &'static str,
        after: Duration,
    },
    /// A pid file or log could not be accessed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The service's definition has no way to run it with this manager.
    #[error("service {service}: {message}")]
    Config {
        service: String,
        /// What is missing.
        message: String,
    },
}

/// The configured service manager.
#[derive(Clone, Debug)]
pub enum Manager {
    /// systemctl.
    Systemd(Systemd),
    /// Agent-run processes.
    Process(Process),
}

impl Manager {
    /// Stops the service (no-op if it is not running).
    pub async fn stop(&self, svc: &ResolvedService) -> Result<(), ServiceError> {
        match self {
            Manager::Systemd(s) => s.stop(unit(svc)?).await,
            Manager::Process(p) => p.stop(&svc.service, svc.run.stop_timeout.0).await,
        }
    }

    /// Starts the service from `release` (no-op if that release already runs).
    pub async fn start(&self, svc: &ResolvedService, release: &Path) -> Result<(), ServiceError> {
        match self {
            Manager::Systemd(s) => s.start(unit(svc)?).await,
            Manager::Process(p) => p.start(svc, release).await,
        }
    }

    /// Who `svc`'s processes run as (process manager: `run.user`, else the agent's
    /// `run_as`; systemd: the unit decides) and who owns its rendered templates.
    pub fn ids(&self, svc: &ResolvedService) -> Result<Ids, AccountError> {
        match self {
            Manager::Systemd(_) => account::resolve(svc, None, false),
            Manager::Process(p) => account::resolve(svc, p.run_as(), true),
        }
    }

    /// Whether the service is running.
    pub async fn is_running(&self, svc: &ResolvedService) -> Result<bool, ServiceError> {
        match self {
            Manager::Systemd(s) => s.is_active(unit(svc)?).await,
            Manager::Process(p) => Ok(p.running(&svc.service).is_some()),
        }
    }

    /// Stops and starts the service from `release`.
    pub async fn restart(&self, svc: &ResolvedService, release: &Path) -> Result<(), ServiceError> {
        self.stop(svc).await?;
        self.start(svc, release).await
    }
}

fn unit(svc: &ResolvedService) -> Result<&str, ServiceError> {
    svc.run.unit.as_deref().ok_or_else(|| ServiceError::Config {
        service: svc.service.clone(),
        message: "service_manager is systemd but `run.unit` is not set".into(),
    })
}
