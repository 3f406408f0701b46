//! The agent's configuration: `/etc/drover/agent.yaml` plus drop-ins in `agent.d/*.yaml`.
//!
//! Loaded once at start-up in three stages: the YAML fragments are parsed and merged (a
//! drop-in overrides keys of the main file, mappings merge key by key), the merged tree is
//! deserialized strictly ([`Input`], unknown fields are errors), and the input is validated
//! into [`Config`], whose values are ready to use (absolute paths, parsed URLs, durations).
//! Every problem is reported at once, with file and line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use drover_desired::git::RepoConfig;
use drover_desired::git::RepoInput;

use crate::spec::{Account, BUILTINS, ByteSize, Dur, Name};
use crate::yaml::{self, Mark, Problem, Problems, Spanned};

/// The default configuration file.
pub const DEFAULT_PATH: &str = "/etc/drover/agent.yaml";

pub use crate::spec::ServiceManager;

/// What the agent deploys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The `kind: vm` services of this host.
    #[default]
    Vm,
    /// The `kind: ecs` services of an ECS cluster.
    Ecs,
}

/// The configuration file as written (after merging drop-ins).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    /// This host's name. Default: the system host name.
    host: Option<Spanned<String>>,
    /// The environment this host belongs to.
    environment: Name,
    /// Labels matched by services' `targets` selectors.
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Values for `{name}` templates in service definitions.
    #[serde(default)]
    vars: BTreeMap<String, Spanned<String>>,
    /// The desired-state repo.
    repo: RepoInput,
    /// Where the agent keeps its state, cache and mirror. Default /var/lib/drover.
    state_dir: Option<Spanned<String>>,
    /// `systemd` (default) or `process`.
    #[serde(default = "default_manager")]
    service_manager: ServiceManager,
    /// `vm` (default) or `ecs`.
    #[serde(default)]
    mode: Mode,
    /// Resource limits for artifacts.
    #[serde(default)]
    limits: LimitsInput,
    /// Artifact download behaviour.
    #[serde(default)]
    download: DownloadInput,
    /// The coordinator (optional): leases and approvals.
    coordinator: Option<CoordinatorInput>,
    /// The ECS cluster this agent deploys (mode: ecs).
    ecs: Option<EcsInput>,
    /// Who process-managed apps, hooks and smoke commands run as when a service names no
    /// `run.user`.
    run_as: Option<RunAsInput>,
    /// An opt-in Prometheus endpoint.
    metrics: Option<MetricsInput>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsInput {
    /// `address:port` to serve `/metrics` on.
    listen: Spanned<String>,
    /// A file holding the bearer token scrapes must carry (needed off loopback).
    token_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunAsInput {
    user: Option<Account>,
    group: Option<Account>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EcsInput {
    cluster: String,
    region: String,
    /// How often ECS and the ALB are polled while waiting (tasks, target health); waits for
    /// tasks back off from it up to eight times it. Target health during a bake is checked
    /// at this interval.
    #[serde(default = "default_ecs_poll")]
    poll_interval: Spanned<Dur>,
}

fn default_ecs_poll() -> Spanned<Dur> {
    Spanned {
        mark: Mark::file_start(""),
        value: Dur::secs(2),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CoordinatorInput {
    url: Spanned<Urls>,
    token_file: Spanned<String>,
    #[serde(default = "yes")]
    required: bool,
    #[serde(default = "default_heartbeat")]
    heartbeat_interval: Dur,
    /// PEM file of the CA certificates that sign the coordinator's TLS certificate (else the
    /// system roots).
    ca_file: Option<Spanned<String>>,
    /// Allow plain http:// to a non-loopback coordinator (the token crosses the network
    /// readable).
    #[serde(default)]
    insecure: bool,
}

/// One coordinator URL, or several (coordinators sharing an etcd store).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Urls {
    One(String),
    Many(Vec<String>),
}

fn yes() -> bool {
    true
}

fn default_heartbeat() -> Dur {
    Dur::secs(5)
}

fn default_manager() -> ServiceManager {
    ServiceManager::Systemd
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsInput {
    #[serde(default = "default_max_artifact")]
    max_artifact_size: ByteSize,
    #[serde(default = "default_max_unpacked")]
    max_unpacked_size: ByteSize,
    #[serde(default = "default_min_free")]
    min_free_space: ByteSize,
    #[serde(default = "default_max_entries")]
    max_entries: u64,
}

fn default_max_entries() -> u64 {
    crate::release::DEFAULT_MAX_ENTRIES
}

impl Default for LimitsInput {
    fn default() -> Self {
        LimitsInput {
            max_artifact_size: default_max_artifact(),
            max_unpacked_size: default_max_unpacked(),
            min_free_space: default_min_free(),
            max_entries: default_max_entries(),
        }
    }
}

fn default_max_artifact() -> ByteSize {
    ByteSize(2 << 30)
}
fn default_max_unpacked() -> ByteSize {
    ByteSize(8 << 30)
}
fn default_min_free() -> ByteSize {
    ByteSize(100 << 20)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DownloadInput {
    #[serde(default = "default_retries")]
    retries: u32,
    #[serde(default = "default_download_timeout")]
    timeout: Dur,
}

impl Default for DownloadInput {
    fn default() -> Self {
        DownloadInput {
            retries: default_retries(),
            timeout: default_download_timeout(),
        }
    }
}

fn default_retries() -> u32 {
    4
}
fn default_download_timeout() -> Dur {
    Dur::secs(600)
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// This host's name.
    pub host: String,
    /// The environment this host belongs to.
    pub environment: String,
    /// Labels matched by services' `targets`.
    pub labels: BTreeMap<String, String>,
    /// Host vars for templates.
    pub vars: BTreeMap<String, String>,
    /// The desired-state repo.
    pub repo: RepoConfig,
    /// State directory (absolute).
    pub state_dir: PathBuf,
    /// How services are stopped and started.
    pub service_manager: ServiceManager,
    /// What this agent deploys.
    pub mode: Mode,
    /// Artifact limits.
    pub limits: Limits,
    /// Download retries and timeout.
    pub download: Download,
    /// The coordinator, if one is configured.
    pub coordinator: Option<CoordinatorConfig>,
    /// The ECS cluster (mode: ecs).
    pub ecs: Option<EcsConfig>,
    /// Default user and group of process-managed services (`run_as`).
    pub run_as: Option<(Option<Account>, Option<Account>)>,
    /// The Prometheus endpoint, if enabled.
    pub metrics: Option<MetricsConfig>,
    /// The agent's environment variables, captured once, for `{env.NAME}` in template files.
    pub env: BTreeMap<String, String>,
    /// The files the configuration was read from.
    pub files: Vec<PathBuf>,
}

/// The ECS cluster of an agent in ECS mode. AWS credentials come from the SDK's default
/// chain (instance or task role); `AWS_ENDPOINT_URL` and friends are honoured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EcsConfig {
    /// Cluster name or ARN.
    pub cluster: String,
    /// AWS region.
    pub region: String,
    /// The polling interval of waits (`ecs.poll_interval`, 100ms to 60s; default 2s).
    pub poll: std::time::Duration,
}

/// The agent's Prometheus endpoint (`metrics:`).
#[derive(Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where to serve `/metrics`.
    pub listen: std::net::SocketAddr,
    /// The bearer token a scrape must carry, if any.
    pub token: Option<String>,
}

impl std::fmt::Debug for MetricsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// How to reach the coordinator.
#[derive(Clone)]
pub struct CoordinatorConfig {
    /// Its URL, or several separated by commas (tried in turn while one is unreachable).
    pub url: String,
    /// The bearer token (read from `token_file` at start).
    pub token: String,
    /// Whether deploys wait for a reachable coordinator (true) or go on without a lease.
    pub required: bool,
    /// How often to heartbeat.
    pub heartbeat: Duration,
    /// TLS trust and plain-HTTP permission.
    pub options: drover_coordinator::client::Options,
}

impl std::fmt::Debug for CoordinatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorConfig")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("required", &self.required)
            .field("heartbeat", &self.heartbeat)
            .field("options", &self.options)
            .finish()
    }
}

/// Artifact limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest artifact download accepted.
    pub max_artifact_size: u64,
    /// Largest total size an archive may unpack to.
    pub max_unpacked_size: u64,
    /// Free space that must remain on the state and install filesystems.
    pub min_free_space: u64,
    /// Most entries an archive may have.
    pub max_entries: u64,
}

/// Download behaviour.
#[derive(Clone, Copy, Debug)]
pub struct Download {
    /// Retries after a transient failure (connection error, 5xx, truncated body).
    pub retries: u32,
    /// Time limit for one attempt.
    pub timeout: Duration,
}

/// The largest configuration file, drop-in or CA bundle read.
const MAX_FILE: u64 = 1 << 20;
/// The largest token file read.
const MAX_TOKEN: u64 = 64 << 10;

/// The drop-in directory of a configuration file: `agent.yaml` → `agent.d/`.
pub fn dropin_dir(main: &Path) -> PathBuf {
    let stem = main
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "agent".into());
    main.with_file_name(format!("{stem}.d"))
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs, reason = "variant fields are named for what they hold")]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The files were read but are not valid.
    #[error("invalid agent configuration:\n{0}")]
    Invalid(Problems),
}

impl Config {
    /// Loads `main` and its drop-ins, with `env` as the process environment.
    pub fn load(main: &Path, env: BTreeMap<String, String>) -> Result<Config, ConfigError> {
        let read = |p: &Path| {
            crate::fsutil::read_text_capped(p, MAX_FILE).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let mut files = vec![(main.to_path_buf(), read(main)?)];
        let dir = dropin_dir(main);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut dropins: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                .collect();
            dropins.sort();
            for p in dropins {
                let text = read(&p)?;
                files.push((p, text));
            }
        }
        Config::from_texts(&files, env)
    }

    /// Builds the configuration from (path, text) fragments, the first being the main file.
    pub fn from_texts(
        files: &[(PathBuf, String)],
        env: BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut merged: Option<yaml::Node> = None;
        for (path, text) in files {
            match yaml::parse(&path.display().to_string(), text) {
                Ok(node) if matches!(node.value, yaml::Value::Null) => {}
                Ok(node) => match &mut merged {
                    None => merged = Some(node),
                    Some(base) => base.merge(node),
                },
                Err(p) => problems.extend(p.0),
            }
        }
        let first = files
            .first()
            .map(|(p, _)| p.display().to_string())
            .unwrap_or_default();
        let node = merged.unwrap_or(yaml::Node {
            mark: Mark::file_start(&first),
            value: yaml::Value::Null,
        });
        let input = if problems.is_empty() {
            yaml::from_node::<Input>(&node, &mut problems)
        } else {
            None
        };
        let config = input.map(|i| validate(i, env, &mut problems));
        match config {
            Some(mut c) if problems.is_empty() => {
                c.files = files.iter().map(|(p, _)| p.clone()).collect();
                Ok(c)
            }
            _ => Err(ConfigError::Invalid(Problems(problems).sorted())),
        }
    }
}

fn validate(i: Input, env: BTreeMap<String, String>, problems: &mut Vec<Problem>) -> Config {
    let host = match i.host {
        Some(h) => {
            let ok = !h.value.is_empty()
                && h.value.len() <= 253
                && h.value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
            if !ok {
                problems.push(Problem::new(
                    h.mark.clone(),
                    format!(
                        "invalid host name `{}`: use letters, digits, `.`, `-`, `_`",
                        h.value
                    ),
                ));
            }
            h.value
        }
        None => system_hostname(),
    };
    let mut vars = BTreeMap::new();
    for (k, v) in i.vars {
        let ident = k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ident {
            problems.push(Problem::new(
                v.mark.clone(),
                format!("var `{k}`: names are letters, digits and `_`, starting with a letter"),
            ));
        } else if BUILTINS.contains(&k.as_str()) || k == "env" {
            problems.push(Problem::new(
                v.mark.clone(),
                format!("var `{k}` would hide the built-in `{{{k}}}`; choose another name"),
            ));
        }
        vars.insert(k, v.value);
    }
    let repo = i.repo.validate(problems);
    let state_dir = match i.state_dir {
        Some(s) => {
            if !s.value.starts_with('/') {
                problems.push(Problem::new(
                    s.mark.clone(),
                    format!("state_dir `{}` must be an absolute path", s.value),
                ));
            }
            PathBuf::from(s.value)
        }
        None => PathBuf::from("/var/lib/drover"),
    };
    let coordinator = i.coordinator.map(|c| {
        let urls: Vec<String> = match &c.url.value {
            Urls::One(u) => vec![u.clone()],
            Urls::Many(v) => v.clone(),
        };
        if urls.is_empty() || urls.len() > 16 {
            problems.push(Problem::new(
                c.url.mark.clone(),
                "coordinator url: one URL, or a list of 1 to 16 (coordinators sharing an etcd store)",
            ));
        }
        for u in &urls {
            let u = u.trim_end_matches('/');
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                problems.push(Problem::new(
                    c.url.mark.clone(),
                    format!("coordinator url `{u}` must start with http:// or https://"),
                ));
            } else if u.contains([',', ' ']) {
                problems.push(Problem::new(
                    c.url.mark.clone(),
                    format!("coordinator url `{u}`: one URL per entry (no commas or spaces); give several as a list"),
                ));
            }
            if let Some(p) = drover_coordinator::client::plain_http_problem(u, c.insecure) {
                problems.push(Problem::new(c.url.mark.clone(), format!("coordinator {p}")));
            }
        }
        let url = urls
            .iter()
            .map(|u| u.trim_end_matches('/'))
            .collect::<Vec<_>>()
            .join(",");
        let ca_file = c.ca_file.map(|f| {
            if !f.value.starts_with('/') {
                problems.push(Problem::new(
                    f.mark.clone(),
                    format!("coordinator ca_file `{}` must be an absolute path", f.value),
                ));
            } else if let Err(e) = crate::fsutil::read_capped(Path::new(&f.value), MAX_FILE) {
                problems.push(Problem::new(
                    f.mark.clone(),
                    format!("cannot read coordinator ca_file {}: {e}", f.value),
                ));
            }
            PathBuf::from(f.value)
        });
        let token = read_token("coordinator", &c.token_file, problems);
        CoordinatorConfig {
            url,
            token,
            required: c.required,
            heartbeat: c.heartbeat_interval.0,
            options: drover_coordinator::client::Options {
                ca_file,
                insecure: c.insecure,
            },
        }
    });
    let metrics = i.metrics.map(|m| {
        let listen = match m.listen.value.parse::<std::net::SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                problems.push(Problem::new(
                    m.listen.mark.clone(),
                    format!(
                        "metrics listen `{}` is not an address and port: write e.g. 127.0.0.1:9469",
                        m.listen.value
                    ),
                ));
                std::net::SocketAddr::from(([127, 0, 0, 1], 9469))
            }
        };
        let token = m
            .token_file
            .as_ref()
            .map(|f| read_token("metrics", f, problems));
        if token.is_none() && !crate::metrics::http::is_private(&listen) {
            problems.push(Problem::new(
                m.listen.mark.clone(),
                format!(
                    "metrics listen {listen} is reachable from other hosts: set metrics.token_file (a bearer token Prometheus sends) or listen on 127.0.0.1"
                ),
            ));
        }
        MetricsConfig { listen, token }
    });
    let ecs = i.ecs.map(|e| {
        let poll = e.poll_interval.value.0;
        if !(std::time::Duration::from_millis(100)..=std::time::Duration::from_secs(60))
            .contains(&poll)
        {
            problems.push(Problem::new(
                e.poll_interval.mark.clone(),
                format!(
                    "ecs.poll_interval {} is out of range: from 100ms to 60s (default 2s)",
                    e.poll_interval.value
                ),
            ));
        }
        EcsConfig {
            cluster: e.cluster,
            region: e.region,
            poll,
        }
    });
    match (i.mode, &ecs) {
        (Mode::Ecs, None) => problems.push(Problem::new(
            Mark::file_start(""),
            "mode: ecs needs `ecs: { cluster: NAME, region: REGION }`",
        )),
        (Mode::Vm, Some(_)) => problems.push(Problem::new(
            Mark::file_start(""),
            "`ecs:` is only for mode: ecs (this agent is mode: vm)",
        )),
        _ => {}
    }
    Config {
        host,
        environment: i.environment.as_str().to_string(),
        labels: i.labels,
        vars,
        repo,
        state_dir,
        service_manager: i.service_manager,
        mode: i.mode,
        limits: Limits {
            max_artifact_size: i.limits.max_artifact_size.0,
            max_unpacked_size: i.limits.max_unpacked_size.0,
            max_entries: i.limits.max_entries.max(1),
            min_free_space: i.limits.min_free_space.0,
        },
        download: Download {
            retries: i.download.retries,
            timeout: i.download.timeout.0,
        },
        coordinator,
        ecs,
        run_as: i.run_as.map(|r| (r.user, r.group)),
        metrics,
        env,
        files: Vec::new(),
    }
}

/// Reads the token in `file` (the `what` setting's `token_file`): refused when others may read
/// it, empty, or unreadable.
fn read_token(what: &str, file: &Spanned<String>, problems: &mut Vec<Problem>) -> String {
    let others_read = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(&file.value)
            .map(|m| m.permissions().mode() & 0o004 != 0)
            .unwrap_or(false)
    };
    if others_read {
        problems.push(Problem::new(
            file.mark.clone(),
            format!(
                "{what} token file {} is readable by every user: anyone on this host could act as it; chmod 600 it",
                file.value
            ),
        ));
    }
    match crate::fsutil::read_text_capped(Path::new(&file.value), MAX_TOKEN) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        Ok(_) => {
            problems.push(Problem::new(
                file.mark.clone(),
                format!("{what} token file {} is empty", file.value),
            ));
            String::new()
        }
        Err(e) => {
            problems.push(Problem::new(
                file.mark.clone(),
                format!("cannot read {what} token file {}: {e}", file.value),
            ));
            String::new()
        }
    }
}

/// The system's host name.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests;
