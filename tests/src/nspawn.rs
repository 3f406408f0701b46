//! A real systemd in a `systemd-nspawn` container, booted from a cached Debian root
//! (`tests/nspawn/make-root.sh`), for the packaging tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::host::Out;

/// The cached root tarball, built on first use; `Err` says why there is none.
pub fn root_tarball() -> Result<PathBuf, String> {
    static TARBALL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    TARBALL
        .get_or_init(|| {
            let cache = crate::bin_dir().join("nspawn");
            let out = Command::new(crate::workspace().join("tests/nspawn/make-root.sh"))
                .arg(&cache)
                .output()
                .map_err(|e| format!("make-root.sh: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "make-root.sh failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
        .clone()
}

/// A booted container.
pub struct Container {
    /// Its root directory on the host.
    pub root: PathBuf,
    nspawn: Child,
    /// The container's PID 1 (systemd), as seen from the host.
    pub pid1: i32,
}

impl Container {
    /// Unpacks the cached root under `work` and boots it with `binds` (host dir, container dir).
    pub fn boot(work: &Path, binds: &[(&Path, &str)]) -> Result<Container, String> {
        let tarball = root_tarball()?;
        let root = work.join("container-root");
        std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
        let ok = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-xf")
            .arg(&tarball)
            .status()
            .map_err(|e| e.to_string())?
            .success();
        if !ok {
            return Err("unpacking the root failed".into());
        }
        // The container's console (boot messages such as "A start job is running for …") goes
        // to a file that a failed boot quotes.
        let console_log = work.join("container-console.log");
        let console = std::fs::File::create(&console_log).map_err(|e| e.to_string())?;
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("-D")
            .arg(&root)
            .args(["--register=no", "--keep-unit", "--private-network", "-b"])
            .stdin(Stdio::null())
            .stdout(console.try_clone().map_err(|e| e.to_string())?)
            .stderr(console);
        for (host, inside) in binds {
            cmd.arg(format!("--bind={}:{inside}", host.display()));
        }
        let nspawn = cmd.spawn().map_err(|e| format!("systemd-nspawn: {e}"))?;
        let nspawn_pid = nspawn.id();
        let mut c = Container {
            root,
            nspawn,
            pid1: 0,
        };
        // nspawn's first child is a short-lived helper in nspawn's own PID namespace; the
        // container's init is the child that lives in a new one. Taking the helper's pid (a
        // race with a slow boot) made every later nsenter fail.
        let pid_ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
        let outer = pid_ns(&nspawn_pid.to_string());
        c.pid1 = crate::wait_for("the container's systemd", Duration::from_secs(30), || {
            let children =
                std::fs::read_to_string(format!("/proc/{nspawn_pid}/task/{nspawn_pid}/children"))
                    .ok()?;
            children
                .split_whitespace()
                .find(|p| pid_ns(p).is_some_and(|ns| Some(ns) != outer))?
                .parse()
                .ok()
        });
        c.wait_booted(&console_log)?;
        Ok(c)
    }

    /// Waits until systemd has finished booting (`running` or `degraded`). A shared 2-core
    /// machine that is also compiling can make a boot slow, so the limit is generous; a boot
    /// that does not finish is an error quoting the pending jobs, failed units and console.
    fn wait_booted(&self, console_log: &Path) -> Result<(), String> {
        let limit = Duration::from_secs(240);
        let start = Instant::now();
        let mut state = String::new();
        while start.elapsed() < limit {
            state = self
                .exec("systemctl is-system-running")
                .stdout
                .trim()
                .to_string();
            if matches!(state.as_str(), "running" | "degraded") {
                eprintln!("container booted in {:.1?}", start.elapsed());
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let jobs = self.exec("systemctl list-jobs --no-pager").all();
        let failed = self.exec("systemctl --failed --no-pager").all();
        let console = std::fs::read_to_string(console_log).unwrap_or_default();
        let lines: Vec<&str> = console.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        Err(format!(
            "the container did not finish booting in {limit:?} (state {state:?})\n\
             pending jobs:\n{jobs}\nfailed units:\n{failed}\nconsole (last 40 lines):\n{}",
            tail.join("\n")
        ))
    }

    /// Runs `sh -c script` inside the container.
    pub fn exec(&self, script: &str) -> Out {
        Command::new("nsenter")
            .args(["-t", &self.pid1.to_string(), "-a", "sh", "-c", script])
            .output()
            .expect("nsenter runs")
            .into()
    }

    /// Runs `script` and panics unless it succeeds; returns stdout.
    pub fn ok(&self, script: &str) -> String {
        let out = self.exec(script);
        assert_eq!(
            out.code,
            0,
            "`{script}` failed in the container:\n{}",
            out.all()
        );
        out.stdout
    }

    /// Writes a file inside the container.
    pub fn put(&self, path: &str, content: &[u8]) {
        let p = self.root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, content).expect("write");
    }

    /// Reads a file of the container.
    pub fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.root.join(path.trim_start_matches('/'))).unwrap_or_default()
    }

    /// The MainPID of a unit (0 when not running).
    pub fn main_pid(&self, unit: &str) -> u32 {
        self.ok(&format!("systemctl show -P MainPID {unit}"))
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGKILL to the container's PID 1 ends its whole PID namespace.
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(self.pid1, libc::SIGKILL);
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}
