//! The `process` service manager: the agent starts `run.command` itself, in its own session
//! (so it outlives the agent: an agent restart, upgrade or `once` never stops it), records it
//! in a pid file, adopts it again on start, and stops it by process group.
//!
//! Every app process carries `DROVER_INSTANCE=<state_dir>/<service>` in its environment; a
//! stop also kills any process carrying it that the pid file does not know (a crash between
//! spawn and pid-file write), so exactly one instance runs.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::ServiceError;
use crate::account;
use crate::fsutil;
use crate::spec::{Account, ResolvedService};

/// What the pid file of a running app records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppProcess {
    /// Process id (also its process group and session id).
    pub pid: i32,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat` field 22), to tell it
    /// from a later process that reuses the pid.
    pub start_ticks: u64,
    /// The release directory it runs from.
    pub release: PathBuf,
    /// The version.
    pub version: String,
    /// When it was started (RFC 3339).
    pub started_at: String,
}

/// The process manager.
#[derive(Clone, Debug)]
pub struct Process {
    run_dir: PathBuf,
    log_dir: PathBuf,
    /// Prefix of the instance marker: `<state_dir>/`.
    instance: String,
    /// Children started by this agent process, kept to reap them.
    children: Arc<Mutex<HashMap<i32, Child>>>,
    /// The user and group apps run as when their service names none (`run_as`).
    run_as: Option<(Option<Account>, Option<Account>)>,
}

/// Reads (state, start time) of `pid` from /proc; `None` if there is no such process.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

impl Process {
    /// A process manager keeping pid files in `run_dir` and app output in `log_dir`.
    pub fn new(state_dir: &Path, run_dir: PathBuf, log_dir: PathBuf) -> Process {
        Process {
            run_dir,
            log_dir,
            instance: format!("{}/", state_dir.display()),
            children: Arc::default(),
            run_as: None,
        }
    }

    /// Apps whose service names no `run.user` run as `user` / `group`.
    pub fn with_run_as(mut self, user: Option<Account>, group: Option<Account>) -> Process {
        self.run_as = (user.is_some() || group.is_some()).then_some((user, group));
        self
    }

    /// The default user and group, if set.
    pub fn run_as(&self) -> Option<&(Option<Account>, Option<Account>)> {
        self.run_as.as_ref()
    }

    fn pid_path(&self, service: &str) -> PathBuf {
        self.run_dir.join(format!("{service}.pid"))
    }

    /// The service's log file.
    pub fn log_path(&self, service: &str) -> PathBuf {
        self.log_dir.join(format!("{service}.log"))
    }

    fn marker(&self, service: &str) -> String {
        format!("{}{service}", self.instance)
    }

    /// Reaps `pid` if it is our exited child.
    fn reap(&self, pid: i32) {
        let mut children = self.children.lock().expect("children lock");
        if let Some(child) = children.get_mut(&pid)
            && !matches!(child.try_wait(), Ok(None))
        {
            children.remove(&pid);
        }
    }

    fn alive(&self, pid: i32, start_ticks: u64) -> bool {
        self.reap(pid);
        matches!(proc_stat(pid), Some((state, start)) if start == start_ticks && state != 'Z' && state != 'X')
    }

    /// What the pid file of `service` records, alive or not.
    pub fn recorded(&self, service: &str) -> Option<AppProcess> {
        let bytes = fs::read(self.pid_path(service)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The running app of `service`, if its pid file names a live process.
    pub fn running(&self, service: &str) -> Option<AppProcess> {
        let app = self.recorded(service)?;
        self.alive(app.pid, app.start_ticks).then_some(app)
    }

    /// Processes carrying this service's instance marker (other than `except`).
    pub fn strays(&self, service: &str, except: Option<i32>) -> Vec<i32> {
        let needle = format!("DROVER_INSTANCE={}\0", self.marker(service));
        let me = std::process::id() as i32;
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != me && Some(pid) != except)
            .filter(|&pid| {
                fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle.as_bytes()))
            })
            .filter(|&pid| matches!(proc_stat(pid), Some((s, _)) if s != 'Z' && s != 'X'))
            .collect()
    }

    /// Starts `svc` from `release`, unless that release already runs.
    pub async fn start(&self, svc: &ResolvedService, release: &Path) -> Result<(), ServiceError> {
        if let Some(app) = self.running(&svc.service) {
            if app.release == release {
                tracing::debug!(pid = app.pid, "already running");
                return Ok(());
            }
            tracing::info!(pid = app.pid, release = %app.release.display(), "another release is running; stopping it first");
            self.stop(&svc.service, svc.run.stop_timeout.0).await?;
        }
        let Some(program) = svc.run.command.first() else {
            return Err(ServiceError::Config {
                service: svc.service.clone(),
                message: "service_manager is process but `run.command` is not set".into(),
            });
        };
        let program = if program.contains('/') && !program.starts_with('/') {
            release.join(program)
        } else {
            PathBuf::from(program)
        };
        let ids = account::resolve(svc, self.run_as.as_ref(), true)?;
        let log_path = self.log_path(&svc.service);
        if fs::metadata(&log_path).is_ok_and(|m| m.len() > 10 << 20) {
            let _ = fs::rename(&log_path, log_path.with_extension("log.1"));
        }
        let io = |source| ServiceError::Io {
            path: log_path.display().to_string(),
            source,
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&log_path)
            .map_err(io)?;
        let log2 = log.try_clone().map_err(io)?;
        let mut cmd = Command::new(&program);
        if let Some(base) = ids.base_env() {
            cmd.env_clear().envs(base);
        }
        cmd.args(&svc.run.command[1..])
            .current_dir(release)
            .envs(&svc.run.env)
            .env("DROVER_INSTANCE", self.marker(&svc.service))
            .env("DROVER_SERVICE", &svc.service)
            .env("DROVER_VERSION", &svc.version)
            .env("DROVER_RELEASE_DIR", release)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        if let Some(uid) = ids.uid {
            // Dropping from root also drops the supplementary groups.
            cmd.uid(uid);
        }
        if let Some(gid) = ids.gid {
            cmd.gid(gid);
        }
        // SAFETY: setsid is async-signal-safe; it detaches the app into its own session and
        // process group so it survives the agent and can be stopped as a group.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let command_line = svc.run.command.join(" ");
        let child = cmd.spawn().map_err(|source| ServiceError::Spawn {
            command: command_line.clone(),
            source,
        })?;
        let pid = child.id() as i32;
        let start_ticks = proc_stat(pid).map(|(_, s)| s).unwrap_or(0);
        self.children
            .lock()
            .expect("children lock")
            .insert(pid, child);
        let app = AppProcess {
            pid,
            start_ticks,
            release: release.to_path_buf(),
            version: svc.version.clone(),
            started_at: fsutil::now_rfc3339(),
        };
        let pid_path = self.pid_path(&svc.service);
        fsutil::write_atomic(
            &pid_path,
            &serde_json::to_vec(&app).expect("pid file serializes"),
        )
        .map_err(|source| ServiceError::Io {
            path: pid_path.display().to_string(),
            source,
        })?;
        tracing::info!(pid, command = %command_line, "started");
        Ok(())
    }

    /// Whether the app of `service` started as `pid` has exited; with its status if it was
    /// our child.
    pub fn exit_status(&self, pid: i32) -> Option<String> {
        let mut children = self.children.lock().expect("children lock");
        match children.get_mut(&pid).map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => {
                children.remove(&pid);
                Some(status.to_string())
            }
            Some(_) => None,
            None => (proc_stat(pid).is_none_or(|(s, _)| s == 'Z' || s == 'X'))
                .then(|| "exited".to_string()),
        }
    }

    /// Stops the app of `service` (and any stray instance): SIGTERM to its process group,
    /// SIGKILL after `timeout`.
    pub async fn stop(&self, service: &str, timeout: Duration) -> Result<(), ServiceError> {
        let app = self.running(service);
        let mut pids: Vec<i32> = app.iter().map(|a| a.pid).collect();
        pids.extend(self.strays(service, app.as_ref().map(|a| a.pid)));
        if !pids.is_empty() {
            tracing::info!(?pids, "stopping");
            let started = Instant::now();
            signal_all(&pids, libc::SIGTERM);
            let mut killed = false;
            loop {
                pids.retain(|&p| {
                    self.reap(p);
                    matches!(proc_stat(p), Some((s, _)) if s != 'Z' && s != 'X')
                });
                if pids.is_empty() {
                    break;
                }
                if !killed && started.elapsed() >= timeout {
                    tracing::warn!(?pids, ?timeout, "did not stop in time; sending SIGKILL");
                    signal_all(&pids, libc::SIGKILL);
                    killed = true;
                } else if killed && started.elapsed() >= timeout + Duration::from_secs(5) {
                    return Err(ServiceError::WontStop {
                        service: service.to_string(),
                        pid: pids[0],
                    });
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let _ = fs::remove_file(self.pid_path(service));
        Ok(())
    }
}

/// Sends `sig` to each process and its process group.
fn signal_all(pids: &[i32], sig: i32) {
    for &pid in pids {
        // SAFETY: kill has no memory-safety preconditions; a stale pid just fails with ESRCH.
        unsafe {
            libc::kill(-pid, sig);
            libc::kill(pid, sig);
        }
    }
}
