//! The `systemd` service manager: `systemctl stop/start/is-active` of the service's unit.

use std::time::Duration;

use tokio::process::Command;

use super::ServiceError;

/// Drives units through `systemctl`.
#[derive(Clone, Debug)]
pub struct Systemd {
    /// The systemctl program.
    systemctl: String,
    /// Time limit for one systemctl call (stop and start wait for the job to finish).
    timeout: Duration,
}

impl Default for Systemd {
    fn default() -> Self {
        Systemd {
            systemctl: "systemctl".into(),
            timeout: Duration::from_secs(120),
        }
    }
}

impl Systemd {
    async fn run(
        &self,
        action: &'static str,
        unit: &str,
    ) -> Result<std::process::Output, ServiceError> {
        let mut cmd = Command::new(&self.systemctl);
        cmd.arg(action).arg(unit).kill_on_drop(true);
        if action == "is-active" {
            cmd.arg("--quiet");
        }
        let out = tokio::time::timeout(self.timeout, cmd.output())
            .await
            .map_err(|_| ServiceError::Timeout {
                unit: unit.to_string(),
                action,
                after: self.timeout,
            })?
            .map_err(|source| ServiceError::Spawn {
                command: format!("{} {action} {unit}", self.systemctl),
                source,
            })?;
        Ok(out)
    }

    async fn job(&self, action: &'static str, unit: &str) -> Result<(), ServiceError> {
        let out = self.run(action, unit).await?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        // systemctl exits 5 ("program is not installed") when the unit does not exist.
        if out.status.code() == Some(5) || stderr.contains("not found") {
            return Err(ServiceError::UnitMissing {
                unit: unit.to_string(),
            });
        }
        Err(ServiceError::Systemctl {
            unit: unit.to_string(),
            action,
            status: out.status.to_string(),
            stderr,
        })
    }

    /// `systemctl stop UNIT`.
    pub async fn stop(&self, unit: &str) -> Result<(), ServiceError> {
        self.job("stop", unit).await
    }

    /// `systemctl start UNIT` (waits for the start job: a failing ExecStart is an error).
    pub async fn start(&self, unit: &str) -> Result<(), ServiceError> {
        self.job("start", unit).await
    }

    /// `systemctl is-active UNIT`.
    pub async fn is_active(&self, unit: &str) -> Result<bool, ServiceError> {
        Ok(self.run("is-active", unit).await?.status.success())
    }
}
