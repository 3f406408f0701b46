//! A real `drover-coordinator` process for the tests, with one token per role.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// The tokens the test coordinator knows (name, role, groups).
pub const TOKENS: &[(&str, &str, &str)] = &[
    ("fleet", "agent", ""),
    ("alice", "approver", "release-managers"),
    ("bob", "approver", "qa"),
    ("ops", "operator", ""),
    ("pager", "responder", ""),
    ("watcher", "viewer", ""),
    ("root", "admin", ""),
];

/// Hosts with an agent token of their own (`host:` set to their name).
pub const HOSTS: &[&str] = &["web-01", "web-02"];

/// A running coordinator.
pub struct Coordinator {
    /// Its port.
    pub port: u16,
    /// Its directory (config, database, token files).
    pub dir: PathBuf,
    child: Option<Child>,
    /// Its log file.
    pub log: PathBuf,
    /// The CA that signs its TLS certificate, when it speaks TLS.
    pub ca: Option<PathBuf>,
    /// A command (and its arguments) the coordinator is started under, e.g. `prlimit …`.
    pub wrapper: Vec<String>,
}

/// Writes a token file as an operator must: readable by its owner only.
fn write_token(path: &Path, token: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, token).expect("token file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// The secret token of `name` (deterministic for tests).
pub fn token(name: &str) -> String {
    format!("token-of-{name}")
}

impl Coordinator {
    /// Writes a config under `dir/coordinator` and starts it, reading the desired-state repo
    /// at `dir/fleet` (where the test fleets keep it); `extra` is appended to the config.
    pub fn start(dir: &Path, extra: &str) -> Coordinator {
        let mut c = Coordinator::prepare(dir, extra);
        c.restart();
        c
    }

    /// Writes the config and token files as [`Coordinator::start`] does, without starting it.
    pub fn prepare(dir: &Path, extra: &str) -> Coordinator {
        let store = format!(
            "store: {{ sqlite: {} }}\n",
            dir.join("coordinator").join("coordinator.db").display()
        );
        Coordinator::prepare_with(dir, "coordinator", &store, extra)
    }

    /// [`Coordinator::prepare`] in `dir/name`, with `store` (a `store:` line and whatever
    /// goes with it) instead of a SQLite file.
    pub fn prepare_with(dir: &Path, name: &str, store: &str, extra: &str) -> Coordinator {
        let repo = dir.join("fleet");
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let port = crate::free_port();
        let mut cfg = format!(
            "listen: 127.0.0.1:{port}\n{store}repo: {{ url: \"{}\", poll_interval: 1s }}\n{extra}tokens:\n",
            repo.display()
        );
        for (name, role, groups) in TOKENS {
            let groups = if groups.is_empty() {
                String::new()
            } else {
                format!(", groups: [{groups}]")
            };
            cfg.push_str(&format!(
                "  - {{ name: {name}, role: {role}{groups}, sha256: {} }}\n",
                crate::artifact::sha256(token(name).as_bytes())
            ));
            write_token(&dir.join(format!("{name}.token")), &token(name));
        }
        for host in HOSTS {
            cfg.push_str(&format!(
                "  - {{ name: {host}, role: agent, host: {host}, sha256: {} }}\n",
                crate::artifact::sha256(token(host).as_bytes())
            ));
            write_token(&dir.join(format!("{host}.token")), &token(host));
        }
        std::fs::write(dir.join("coordinator.yaml"), cfg).expect("config");
        Coordinator {
            port,
            log: dir.join("coordinator.log"),
            dir,
            child: None,
            ca: None,
            wrapper: Vec::new(),
        }
    }

    /// The config file.
    pub fn config(&self) -> PathBuf {
        self.dir.join("coordinator.yaml")
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for it to exit by itself (for a start that must fail); its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let code = crate::wait_for("the coordinator to exit", limit, || {
            child.try_wait().ok().flatten()
        });
        self.child = None;
        code.code()
    }

    /// Starts it without waiting for it to serve.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut cmd = match self.wrapper.split_first() {
            Some((w, args)) => {
                let mut c = Command::new(w);
                c.args(args).arg(crate::bin("drover-coordinator"));
                c
            }
            None => Command::new(crate::bin("drover-coordinator")),
        };
        let child = cmd
            .arg("serve")
            .arg("--config")
            .arg(self.config())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("coordinator starts");
        self.child = Some(child);
    }

    /// Starts it again (same port, same database).
    pub fn restart(&mut self) {
        self.spawn();
        if self.ca.is_some() {
            crate::wait_port(self.port, Duration::from_secs(20));
            return;
        }
        crate::wait_for("the coordinator", Duration::from_secs(20), || {
            crate::http_get(self.port, "/healthz").filter(|(s, _)| *s == 200)
        });
    }

    /// Whether it was started and has exited by itself since.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Kills it with SIGKILL (a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        match self.ca {
            Some(_) => format!("https://127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// The token file of `name`.
    pub fn token_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.token"))
    }

    /// The agent config block pointing at this coordinator.
    pub fn agent_config(&self) -> String {
        self.agent_config_as("fleet")
    }

    /// The agent config block with the token of `name` (a host's own token).
    pub fn agent_config_as(&self, name: &str) -> String {
        let ca = match &self.ca {
            Some(ca) => format!(", ca_file: \"{}\"", ca.display()),
            None => String::new(),
        };
        format!(
            "coordinator: {{ url: \"{}\", token_file: \"{}\", heartbeat_interval: 500ms{ca} }}\n",
            self.url(),
            self.token_file(name).display()
        )
    }

    /// Runs the `drover` CLI as `who`.
    pub fn cli(&self, who: &str, args: &[&str]) -> crate::host::Out {
        let mut cmd = Command::new(crate::bin("drover"));
        if let Some(ca) = &self.ca {
            cmd.arg("--ca-file").arg(ca);
        }
        cmd.arg("--url")
            .arg(self.url())
            .arg("--token-file")
            .arg(self.token_file(who))
            .args(args)
            .output()
            .expect("drover runs")
            .into()
    }

    /// `drover status --json` as admin.
    pub fn status(&self) -> Value {
        let out = self.cli("root", &["status", "--json"]);
        assert_eq!(out.code, 0, "{}", out.all());
        serde_json::from_str(&out.stdout).expect("json")
    }

    /// Waits until the coordinator follows `commit` of the desired-state repo.
    pub fn wait_commit(&self, commit: &str) {
        crate::wait_for(
            &format!("the coordinator to read commit {commit}"),
            Duration::from_secs(30),
            || (self.status()["desired"]["commit"] == commit).then_some(()),
        );
    }

    /// The rollout of (env, version) of hello, from status (the newest, when a version was
    /// rolled out more than once).
    pub fn rollout(&self, env: &str, version: &str) -> Option<Value> {
        self.status()["rollouts"]
            .as_array()?
            .iter()
            .rev()
            .find(|r| r["environment"] == env && r["version"] == version)
            .cloned()
    }

    /// The state of that rollout.
    pub fn state(&self, env: &str, version: &str) -> Option<String> {
        self.rollout(env, version)
            .and_then(|r| r["state"].as_str().map(str::to_string))
    }

    /// `drover history --json` entries.
    pub fn history(&self) -> Vec<Value> {
        let out = self.cli("root", &["history", "--json", "--limit", "10000"]);
        assert_eq!(out.code, 0, "{}", out.all());
        let v: Value = serde_json::from_str(&out.stdout).expect("json");
        v["entries"].as_array().cloned().unwrap_or_default()
    }

    /// A raw HTTP request: (status, body).
    pub fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
        protocol: bool,
    ) -> (u16, Value) {
        let mut headers = Vec::new();
        if let Some(t) = token {
            headers.push(format!("Authorization: Bearer {t}"));
        }
        if protocol {
            headers.push("Drover-Protocol: 1".to_string());
        }
        let (status, text) =
            crate::http_request(self.port, method, path, &headers, body.as_bytes())
                .expect("coordinator answers");
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.clone())),
        )
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}
