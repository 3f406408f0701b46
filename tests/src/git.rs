//! Throwaway Git repos (driven with the git CLI, hermetic config) and a `git daemon`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Runs git in `dir` with a hermetic environment; panics on failure; returns stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A work tree whose commits are the desired state.
pub struct Repo {
    /// The work tree.
    pub dir: PathBuf,
}

impl Repo {
    /// `git init -b main` in `dir`.
    pub fn init(dir: &Path) -> Repo {
        std::fs::create_dir_all(dir).expect("mkdir");
        git(dir, &["init", "-q", "-b", "main"]);
        Repo {
            dir: dir.to_path_buf(),
        }
    }

    /// Writes a file (creating directories).
    pub fn write(&self, path: &str, content: &str) -> &Repo {
        let p = self.dir.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, content).expect("write");
        self
    }

    /// Commits everything; returns the commit id.
    pub fn commit(&self, message: &str) -> String {
        git(&self.dir, &["add", "-A"]);
        git(&self.dir, &["commit", "-q", "--allow-empty", "-m", message]);
        git(&self.dir, &["rev-parse", "HEAD"])
    }

    /// `git revert` of `commit` (as a user undoes a release); returns the new commit.
    pub fn revert(&self, commit: &str) -> String {
        git(&self.dir, &["revert", "--no-edit", commit]);
        git(&self.dir, &["rev-parse", "HEAD"])
    }

    /// Runs git in the work tree.
    pub fn git(&self, args: &[&str]) -> String {
        git(&self.dir, args)
    }

    /// A bare clone at `dest`, with this repo pushing to it as `origin`.
    pub fn bare_clone(&self, dest: &Path) -> PathBuf {
        git(
            self.dir.parent().expect("parent"),
            &[
                "clone",
                "-q",
                "--bare",
                self.dir.to_str().expect("utf-8"),
                dest.to_str().expect("utf-8"),
            ],
        );
        // Let the smart-HTTP backend serve and accept pushes without extra config.
        git(dest, &["config", "http.receivepack", "true"]);
        let _ = Command::new("git")
            .args(["remote", "remove", "origin"])
            .current_dir(&self.dir)
            .output();
        git(
            &self.dir,
            &["remote", "add", "origin", dest.to_str().expect("utf-8")],
        );
        dest.to_path_buf()
    }

    /// Pushes main to origin, forcing (history rewrites included).
    pub fn push(&self) {
        git(&self.dir, &["push", "-q", "--force", "origin", "main"]);
    }
}

/// A `git daemon` serving every repo under a directory over git://.
pub struct GitDaemon {
    /// Its port.
    pub port: u16,
    child: Child,
}

impl GitDaemon {
    /// Starts the daemon on a free port.
    pub fn start(base: &Path) -> GitDaemon {
        GitDaemon::spawn(base, None)
    }

    /// Starts the daemon on a free port, logging each request (`--verbose`) to `log`: one
    /// `Request upload-pack` line per fetch.
    pub fn start_logged(base: &Path, log: &Path) -> GitDaemon {
        GitDaemon::spawn(base, Some(log))
    }

    fn spawn(base: &Path, log: Option<&Path>) -> GitDaemon {
        let port = crate::free_port();
        let mut cmd = Command::new("git");
        cmd.args([
            "daemon",
            "--reuseaddr",
            "--export-all",
            "--listen=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", base.display()))
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Some(log) = log {
            cmd.arg("--verbose")
                .stderr(std::fs::File::create(log).expect("git daemon log"));
        }
        let child = cmd.arg(base).spawn().expect("git daemon starts");
        crate::wait_port(port, Duration::from_secs(10));
        GitDaemon { port, child }
    }

    /// Stops the daemon (its port refuses connections afterwards).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}
