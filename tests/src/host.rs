//! A test fleet: a desired-state repo, an artifact server (lighttpd) and agent "hosts", each
//! with its own state dir, install root and app port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::TestDir;
use crate::artifact::{self, Built};
use crate::git::Repo;
use crate::lighttpd::Lighttpd;

/// The hello service as the tests define it (host vars: `port`, `base`, `art`).
pub const SERVICE: &str = r#"service: hello
artifact:
  url: "{art}/hello-{version}.tar.gz"
install:
  root: "{base}/hello"
  keep_releases: 3
  shared: [data]
  templates:
    - { src: config/app.env.tmpl, dest: config/app.env }
run:
  command: ["bin/hello", "--port", "{port}"]
  env: { HELLO_HOST: "{host}" }
  stop_timeout: 5s
hooks:
  before_stop: bin/drain
health:
  url: "http://127.0.0.1:{port}/health"
  timeout: 5s
smoke:
  - url: "http://127.0.0.1:{port}/version"
    expect_body: "{version}"
"#;

/// A repo, an artifact server and hosts, under one test directory.
pub struct Fleet {
    /// The test directory (kills app processes when dropped).
    pub dir: TestDir,
    /// The desired-state repo (a work tree; agents read it as a local path by default).
    pub repo: Repo,
    /// The artifact server.
    pub art: Lighttpd,
}

impl Fleet {
    /// A fleet whose repo defines the hello service and an empty `test` environment.
    pub fn new() -> Fleet {
        let dir = TestDir::new();
        let repo = Repo::init(&dir.path().join("fleet"));
        repo.write("services/hello.yaml", SERVICE).write(
            "environments/test.yaml",
            "environment: test\nservices: {}\n",
        );
        repo.commit("initial");
        let art = Lighttpd::start(dir.path(), &dir.path().join("artifacts"), None);
        Fleet { dir, repo, art }
    }

    /// The artifacts directory (served by `art`).
    pub fn artifacts(&self) -> PathBuf {
        self.dir.path().join("artifacts")
    }

    /// Packages hello `version` (with extra `release.env` lines) into the artifact server.
    pub fn hello(&self, version: &str, env: &[&str]) -> Built {
        artifact::hello(&self.artifacts(), version, env)
    }

    /// Commits a pin of hello to `built` in environment `test`; returns the commit.
    pub fn pin(&self, built: &Built) -> String {
        self.pin_raw(&built.version, &built.sha256)
    }

    /// Commits a pin of hello to (`version`, `sha256`).
    pub fn pin_raw(&self, version: &str, sha256: &str) -> String {
        self.repo.write(
            "environments/test.yaml",
            &format!(
                "environment: test\nrollout: {{ max_parallel: 2 }}\nservices:\n  hello: {{ version: {version}, sha256: {sha256} }}\n"
            ),
        );
        self.repo.commit(&format!("hello {version}"))
    }

    /// A host reading the repo as a local path.
    pub fn host(&self, name: &str) -> Host {
        self.host_with(name, "test", "")
    }

    /// A host of environment `env` with `extra` config lines.
    pub fn host_with(&self, name: &str, env: &str, extra: &str) -> Host {
        let h = Host::new(
            self.dir.path(),
            name,
            self.repo.dir.to_str().expect("utf-8"),
            &self.art.url(),
            extra,
        );
        if env != "test" {
            let cfg = std::fs::read_to_string(&h.config)
                .expect("config")
                .replace("environment: test\n", &format!("environment: {env}\n"));
            std::fs::write(&h.config, cfg).expect("config");
        }
        h
    }

    /// Commits environment `env` with `policy` lines and hello pinned to `built`.
    pub fn pin_env(&self, env: &str, policy: &str, built: &Built) -> String {
        self.repo.write(
            &format!("environments/{env}.yaml"),
            &format!(
                "environment: {env}\n{policy}services:\n  hello: {{ version: {}, sha256: {} }}\n",
                built.version, built.sha256
            ),
        );
        self.repo.commit(&format!("{env}: hello {}", built.version))
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet::new()
    }
}

/// One agent "host".
pub struct Host {
    /// Its name.
    pub name: String,
    /// Its directory (config, state, install root).
    pub base: PathBuf,
    /// Its app port.
    pub port: u16,
    /// Its config file.
    pub config: PathBuf,
    /// Its state dir.
    pub state: PathBuf,
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Out {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Out {
    fn from(o: Output) -> Out {
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Out {
    /// stdout and stderr together, for assertions and failure messages.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl Host {
    /// A host under `dir/hosts/<name>` reading `repo_url`; `extra` is appended to its config.
    pub fn new(dir: &Path, name: &str, repo_url: &str, art_url: &str, extra: &str) -> Host {
        let base = dir.join("hosts").join(name);
        std::fs::create_dir_all(&base).expect("mkdir");
        let port = crate::free_port();
        let state = base.join("state");
        let config = base.join("agent.yaml");
        let h = Host {
            name: name.into(),
            base,
            port,
            config,
            state,
        };
        h.write_config(repo_url, art_url, extra);
        h
    }

    /// (Re)writes the config.
    pub fn write_config(&self, repo_url: &str, art_url: &str, extra: &str) {
        std::fs::write(
            &self.config,
            format!(
                "host: {name}\nenvironment: test\nvars: {{ port: \"{port}\", base: \"{base}\", art: \"{art_url}\" }}\nrepo: {{ url: \"{repo_url}\", poll_interval: 1s }}\nstate_dir: {state}\nservice_manager: process\n{extra}",
                name = self.name,
                port = self.port,
                base = self.base.display(),
                state = self.state.display(),
            ),
        )
        .expect("write config");
    }

    /// `drover-agent --config <cfg> ARGS` with the test environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(crate::bin("drover-agent"));
        c.arg("--config")
            .arg(&self.config)
            .args(args)
            .env("DROVER_TEST_SECRET", "s3cret")
            .env("DROVER_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .env("GIT_CONFIG_GLOBAL", "/dev/null");
        c
    }

    /// Runs `drover-agent ARGS` to completion.
    pub fn run_cmd(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let mut c = self.cmd(args);
        c.envs(env.iter().copied());
        c.output().expect("drover-agent runs").into()
    }

    /// `drover-agent once`.
    pub fn once(&self) -> Out {
        self.run_cmd(&["once"], &[])
    }

    /// `drover-agent once` with extra environment (e.g. failpoints).
    pub fn once_with(&self, env: &[(&str, &str)]) -> Out {
        self.run_cmd(&["once"], env)
    }

    /// Starts `drover-agent run`; its log goes to `<base>/agent-N.log`.
    pub fn spawn(&self, env: &[(&str, &str)]) -> Running {
        let n = std::fs::read_dir(&self.base)
            .map(|d| d.count())
            .unwrap_or(0);
        let log = self.base.join(format!("agent-{n}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut c = self.cmd(&["run"]);
        c.envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file);
        Running {
            child: c.spawn().expect("agent starts"),
            log,
        }
    }

    /// `status --json`.
    pub fn status(&self) -> Value {
        let out = self.run_cmd(&["status", "--json"], &[]);
        assert_eq!(out.code, 0, "status failed: {}", out.all());
        serde_json::from_str(&out.stdout).expect("status is JSON")
    }

    /// The state of hello, from `status --json`.
    pub fn hello(&self) -> Value {
        self.status()["services"]["hello"].clone()
    }

    /// The current version of hello per the agent's state.
    pub fn current(&self) -> Option<String> {
        self.hello()["current"].as_str().map(str::to_string)
    }

    /// What the running app says at /version.
    pub fn version(&self) -> Option<String> {
        crate::http_get(self.port, "/version")
            .filter(|(s, _)| *s == 200)
            .map(|(_, b)| b.trim().to_string())
    }

    /// The agent's event log.
    pub fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state.join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Phases recorded in the event log, as "version:phase".
    pub fn phases(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|e| {
                format!(
                    "{}:{}",
                    e["version"].as_str().unwrap_or(""),
                    e["phase"].as_str().unwrap_or("")
                )
            })
            .collect()
    }

    /// Live app processes of this host.
    pub fn app_pids(&self) -> Vec<i32> {
        crate::instance_pids(&self.state)
    }

    /// The install root of hello.
    pub fn root(&self) -> PathBuf {
        self.base.join("hello")
    }

    /// The release `current` points at.
    pub fn current_dir(&self) -> Option<String> {
        std::fs::read_link(self.root().join("current"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    /// Release directories on disk (sorted).
    pub fn releases(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root().join("releases"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Waits until the agent's state says `version` is current and nothing is in flight.
    pub fn wait_current(&self, version: &str, limit: Duration) {
        crate::wait_for(&format!("{} to run {version}", self.name), limit, || {
            let h = self.hello();
            (h["current"] == version && h["deploying"].is_null()).then_some(())
        });
    }
}

/// Watches apps from outside: polls each port's `/version` and records the most hosts that
/// did not answer at the same moment (a host between stop and healthy).
pub struct Outage {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Outage {
    /// Starts watching `ports`.
    pub fn watch(ports: Vec<u16>) -> Outage {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut most = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let down = ports
                    .iter()
                    .filter(|p| {
                        crate::http_get(**p, "/version").is_none_or(|(status, _)| status != 200)
                    })
                    .count();
                most = most.max(down);
                std::thread::sleep(Duration::from_millis(5));
            }
            most
        });
        Outage {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops watching; the most hosts down at once.
    pub fn most_down(mut self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("watcher"))
            .unwrap_or(0)
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A running `drover-agent run`, killed (SIGKILL) when dropped.
pub struct Running {
    child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Running {
    /// Stops it with SIGTERM and waits.
    pub fn stop(mut self) -> i32 {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child
            .wait()
            .map(|s| s.code().unwrap_or(-1))
            .unwrap_or(-1)
    }

    /// Kills it with SIGKILL (a crash) and waits.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
