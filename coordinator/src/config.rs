//! `drover-coordinator serve --config /etc/drover/coordinator.yaml`, read with the same strict
//! positioned parser as the agent's files (every problem at once, with file and line) and
//! validated once at start.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_desired::git::{RepoConfig, RepoInput};
use drover_desired::spec::Dur;
use drover_desired::yaml::{self, Mark, Problem, Problems, Spanned};
use serde::Deserialize;

use crate::auth::{Caller, Role, Tokens, valid_host};
use crate::webhook::SecretFiles;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    /// Address to listen on. Default 127.0.0.1:7070.
    #[serde(default = "default_listen")]
    listen: Spanned<String>,
    /// Where state lives: `{ sqlite: PATH }`.
    store: Spanned<StoreInput>,
    /// The desired-state repo, read by the coordinator itself: versions and policies.
    repo: RepoInput,
    /// Where the coordinator keeps its Git mirror. Default: the store file's directory.
    state_dir: Option<Spanned<String>>,
    /// Lease time to live. Default 30s.
    #[serde(default = "default_ttl")]
    lease_ttl: Spanned<Dur>,
    /// Heartbeat interval asked of agents. Default 5s.
    #[serde(default = "default_heartbeat")]
    heartbeat_interval: Spanned<Dur>,
    /// Bearer tokens, by SHA-256.
    tokens: Vec<Spanned<TokenInput>>,
    /// TLS certificate chain and key (PEM files). Without it the coordinator speaks plain HTTP,
    /// which it only does on a loopback address unless `insecure: true`.
    tls: Option<Spanned<TlsInput>>,
    /// Allow plain HTTP on a non-loopback address (tokens cross the network readable).
    #[serde(default)]
    insecure: bool,
    /// A second, token-less address serving only `/metrics` (for a Prometheus on the host).
    metrics_listen: Option<Spanned<String>>,
    /// How long the audit is kept.
    #[serde(default)]
    audit_retention: RetentionInput,
    /// Server limits.
    #[serde(default)]
    limits: LimitsInput,
    /// Git push webhooks (`POST /v1/webhooks/git`): the secret files of the forges allowed
    /// to ask for a fetch.
    webhook: Option<Spanned<WebhookInput>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookInput {
    github_secret_file: Option<String>,
    gitlab_token_file: Option<String>,
    gitea_secret_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsInput {
    cert: String,
    key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionInput {
    max_age: Option<Spanned<Dur>>,
    max_entries: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsInput {
    connections: Option<Spanned<u32>>,
    connections_per_address: Option<Spanned<u32>>,
    header_timeout: Option<Spanned<Dur>>,
    request_timeout: Option<Spanned<Dur>>,
    requests_per_second: Option<Spanned<u32>>,
    burst: Option<Spanned<u32>>,
    max_hosts: Option<Spanned<u32>>,
}

fn at_start<T>(value: T) -> Spanned<T> {
    Spanned {
        mark: Mark::file_start(""),
        value,
    }
}

fn default_listen() -> Spanned<String> {
    at_start("127.0.0.1:7070".into())
}
fn default_ttl() -> Spanned<Dur> {
    at_start(Dur::secs(30))
}
fn default_heartbeat() -> Spanned<Dur> {
    at_start(Dur::secs(5))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreInput {
    sqlite: Option<String>,
    etcd: Option<yaml::Spanned<IgnoredAny>>,
}

/// Anything (an `etcd:` block this build does not implement).
#[derive(Debug)]
struct IgnoredAny;

impl<'de> Deserialize<'de> for IgnoredAny {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| IgnoredAny)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenInput {
    name: String,
    role: Role,
    #[serde(default)]
    groups: Vec<String>,
    sha256: String,
    /// For an agent token: the one host it may act as (`*`: any host, as if absent).
    host: Option<String>,
}

/// TLS files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM (not readable by others).
    pub key: PathBuf,
}

/// Server limits: what one client, or all together, may take of the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most (beyond it new ones are closed at once).
    pub connections: u32,
    /// Open connections at most from one source address.
    pub connections_per_address: u32,
    /// Time to send a request's headers (and the TLS handshake).
    pub header_timeout: Duration,
    /// Time to answer a request, body included.
    pub request_timeout: Duration,
    /// Requests a second per token, on average (0: no limit).
    pub requests_per_second: u32,
    /// Requests a token may send at once above the rate.
    pub burst: u32,
    /// Hosts tracked at most.
    pub max_hosts: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections: 4096,
            connections_per_address: 256,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            requests_per_second: 50,
            burst: 200,
            max_hosts: 100_000,
        }
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// SQLite database file.
    pub sqlite: PathBuf,
    /// The desired-state repo.
    pub repo: RepoConfig,
    /// Where the Git mirror lives.
    pub git_dir: PathBuf,
    /// Lease TTL.
    pub lease_ttl: Duration,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Tokens.
    pub tokens: Tokens,
    /// The file it was read from (re-read on SIGHUP).
    pub path: PathBuf,
    /// TLS, if set.
    pub tls: Option<TlsFiles>,
    /// Plain HTTP allowed on a non-loopback address.
    pub insecure: bool,
    /// The token-less metrics address, if set.
    pub metrics_listen: Option<SocketAddr>,
    /// Audit entries older than this are removed.
    pub audit_max_age: Duration,
    /// At most this many audit entries are kept.
    pub audit_max_entries: u64,
    /// Server limits.
    pub limits: Limits,
    /// Webhook secret files (none: `/v1/webhooks/git` answers 404).
    pub webhook: SecretFiles,
}

/// Whether `addr` is a loopback address (plain HTTP is only spoken there unless insecure).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

impl Config {
    /// Reads and validates `path`; the error lists every problem found.
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = drover_desired::file::read_text_capped(path, 1 << 20)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut c = Config::parse(&path.display().to_string(), &text).map_err(|p| p.to_string())?;
        c.path = path.to_path_buf();
        Ok(c)
    }

    /// Parses and validates a configuration text; `file` names it in problems.
    pub fn parse(file: &str, text: &str) -> Result<Config, Problems> {
        let node = yaml::parse(file, text)?;
        let mut problems = Vec::new();
        let input = yaml::from_node::<Input>(&node, &mut problems);
        let config = input.map(|i| validate(i, file, &mut problems));
        match config {
            Some(c) if problems.is_empty() => Ok(c),
            _ => Err(Problems(problems).sorted()),
        }
    }
}

fn validate(i: Input, file: &str, problems: &mut Vec<Problem>) -> Config {
    // Defaults carry a mark with no file: place their problems at the file's start.
    let mark = |m: &Mark| {
        if m.file.is_empty() {
            Mark::file_start(file)
        } else {
            m.clone()
        }
    };
    let listen = i
        .listen
        .value
        .parse()
        .map_err(|_| {
            problems.push(Problem::new(
                mark(&i.listen.mark),
                format!(
                    "listen `{}` is not an address like 127.0.0.1:7070",
                    i.listen.value
                ),
            ))
        })
        .unwrap_or_else(|()| SocketAddr::from(([127, 0, 0, 1], 7070)));
    let store_mark = mark(&i.store.mark);
    let sqlite = match (i.store.value.sqlite, i.store.value.etcd) {
        (Some(p), None) if p.starts_with('/') => PathBuf::from(p),
        (Some(p), None) => {
            problems.push(Problem::new(
                store_mark,
                format!("store.sqlite `{p}` must be an absolute path"),
            ));
            PathBuf::new()
        }
        (None, Some(_)) => {
            problems.push(Problem::new(
                store_mark,
                "store: etcd is not available in this build; use { sqlite: PATH }",
            ));
            PathBuf::new()
        }
        _ => {
            problems.push(Problem::new(
                store_mark,
                "store: give exactly one of `sqlite: PATH` or `etcd: {...}`",
            ));
            PathBuf::new()
        }
    };
    let repo = i.repo.validate(problems);
    let git_dir = match i.state_dir {
        Some(d) if d.value.starts_with('/') => PathBuf::from(d.value).join("git"),
        Some(d) => {
            problems.push(Problem::new(
                mark(&d.mark),
                format!("state_dir `{}` must be an absolute path", d.value),
            ));
            PathBuf::new()
        }
        None => sqlite
            .parent()
            .map(|p| p.join("git"))
            .unwrap_or_else(|| PathBuf::from("/var/lib/drover/git")),
    };
    let at_least_in = |problems: &mut Vec<Problem>, what: &str, d: &Spanned<Dur>, min: Duration| {
        if d.value.0 < min {
            problems.push(Problem::new(
                mark(&d.mark),
                format!("{what} must be at least {}", Dur(min)),
            ));
            min
        } else {
            d.value.0
        }
    };
    // An optional duration: `default` when absent, at least `min` when given.
    let optional =
        |problems: &mut Vec<Problem>,
         what: &str,
         d: Option<Spanned<Dur>>,
         min: Duration,
         default: Duration| { d.map_or(default, |d| at_least_in(problems, what, &d, min)) };
    let lease_ttl = at_least_in(problems, "lease_ttl", &i.lease_ttl, Duration::from_secs(1));
    let heartbeat = at_least_in(
        problems,
        "heartbeat_interval",
        &i.heartbeat_interval,
        Duration::from_millis(100),
    );
    let mut tokens = Tokens::default();
    let mut names = HashSet::new();
    if i.tokens.is_empty() {
        problems.push(Problem::new(
            Mark::file_start(file),
            "tokens: at least one token is needed (drover-coordinator hash-token prints the line to add)",
        ));
    }
    for t in i.tokens {
        let (m, t) = (mark(&t.mark), t.value);
        let hash = t.sha256.to_ascii_lowercase();
        if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
            problems.push(Problem::new(
                m.clone(),
                format!(
                    "token `{}`: sha256 must be 64 hex digits (echo -n TOKEN | drover-coordinator hash-token)",
                    t.name
                ),
            ));
        }
        if !names.insert(t.name.clone()) {
            problems.push(Problem::new(
                m.clone(),
                format!("token `{}` is defined twice", t.name),
            ));
        }
        let host = match (t.role, t.host) {
            (_, None) => None,
            (Role::Agent, Some(h)) if h == "*" => None,
            (Role::Agent, Some(h)) => {
                if !valid_host(&h) {
                    problems.push(Problem::new(
                        m.clone(),
                        format!(
                            "token `{}`: host `{h}` is not a host name (letters, digits, `.`, `-`, `_`, `+`; or `*` for any host)",
                            t.name
                        ),
                    ));
                }
                Some(h)
            }
            (role, Some(_)) => {
                problems.push(Problem::new(
                    m.clone(),
                    format!(
                        "token `{}`: `host` binds an agent token to its host; a {} token acts for people, not hosts",
                        t.name,
                        role.name()
                    ),
                ));
                None
            }
        };
        tokens.add(
            &hash,
            Caller {
                name: t.name,
                role: t.role,
                groups: t.groups,
                host,
            },
        );
    }
    let tls = i.tls.map(|t| {
        for (what, p) in [("tls.cert", &t.value.cert), ("tls.key", &t.value.key)] {
            if !p.starts_with('/') {
                problems.push(Problem::new(
                    mark(&t.mark),
                    format!("{what} `{p}` must be an absolute path"),
                ));
            }
        }
        TlsFiles {
            cert: PathBuf::from(t.value.cert),
            key: PathBuf::from(t.value.key),
        }
    });
    if tls.is_none() && !i.insecure && !is_loopback(&listen) {
        problems.push(Problem::new(
            mark(&i.listen.mark),
            format!(
                "listen {listen} is not a loopback address, and without `tls: {{ cert, key }}` bearer tokens would cross the network readable; \
                 set tls, or `insecure: true` if something else encrypts the traffic"
            ),
        ));
    }
    let metrics_listen = i.metrics_listen.and_then(|m| match m.value.parse::<SocketAddr>() {
        Ok(a) if a == listen => {
            problems.push(Problem::new(
                mark(&m.mark),
                "metrics_listen must differ from listen (or leave it out: /metrics on listen needs a viewer token)",
            ));
            None
        }
        Ok(a) => Some(a),
        Err(_) => {
            problems.push(Problem::new(
                mark(&m.mark),
                format!("metrics_listen `{}` is not an address like 127.0.0.1:9170", m.value),
            ));
            None
        }
    });
    let audit_max_age = optional(
        problems,
        "audit_retention.max_age",
        i.audit_retention.max_age,
        Duration::from_secs(3600),
        Duration::from_secs(400 * 24 * 3600),
    );
    let audit_max_entries = match i.audit_retention.max_entries {
        Some(n) if n.value < 1000 => {
            problems.push(Problem::new(
                mark(&n.mark),
                "audit_retention.max_entries must be at least 1000",
            ));
            1000
        }
        Some(n) => n.value,
        None => 1_000_000,
    };
    let d = Limits::default();
    let l = i.limits;
    let count = |problems: &mut Vec<Problem>,
                 what: &str,
                 v: Option<Spanned<u32>>,
                 min: u32,
                 default: u32| match v {
        Some(v) if v.value < min => {
            problems.push(Problem::new(
                mark(&v.mark),
                format!("limits.{what} must be at least {min}"),
            ));
            min
        }
        Some(v) => v.value,
        None => default,
    };
    let connections = count(problems, "connections", l.connections, 16, d.connections);
    let connections_per_address = count(
        problems,
        "connections_per_address",
        l.connections_per_address,
        1,
        d.connections_per_address,
    );
    let requests_per_second = count(
        problems,
        "requests_per_second",
        l.requests_per_second,
        0,
        d.requests_per_second,
    );
    let burst = count(problems, "burst", l.burst, 1, d.burst);
    let max_hosts = count(problems, "max_hosts", l.max_hosts, 1, d.max_hosts);
    let header_timeout = optional(
        problems,
        "limits.header_timeout",
        l.header_timeout,
        Duration::from_millis(100),
        d.header_timeout,
    );
    let request_timeout = optional(
        problems,
        "limits.request_timeout",
        l.request_timeout,
        Duration::from_secs(1),
        d.request_timeout,
    );
    let webhook = i.webhook.map_or_else(SecretFiles::default, |w| {
        let (m, w) = (mark(&w.mark), w.value);
        let mut path = |what: &str, p: Option<String>| {
            p.and_then(|p| {
                if p.starts_with('/') {
                    Some(PathBuf::from(p))
                } else {
                    problems.push(Problem::new(
                        m.clone(),
                        format!("webhook.{what} `{p}` must be an absolute path"),
                    ));
                    None
                }
            })
        };
        let files = SecretFiles {
            github: path("github_secret_file", w.github_secret_file),
            gitlab: path("gitlab_token_file", w.gitlab_token_file),
            gitea: path("gitea_secret_file", w.gitea_secret_file),
        };
        if files == SecretFiles::default() {
            problems.push(Problem::new(
                m,
                "webhook: give at least one of github_secret_file, gitlab_token_file, gitea_secret_file (or leave `webhook:` out)",
            ));
        }
        files
    });
    Config {
        listen,
        sqlite,
        repo,
        git_dir,
        lease_ttl,
        heartbeat,
        tokens,
        path: PathBuf::from(file),
        tls,
        insecure: i.insecure,
        metrics_listen,
        audit_max_age,
        audit_max_entries,
        limits: Limits {
            connections,
            connections_per_address,
            header_timeout,
            request_timeout,
            requests_per_second,
            burst,
            max_hosts,
        },
        webhook,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    /// A config path to a device is refused, not read for ever.
    #[test]
    fn a_config_or_tls_file_that_is_not_a_regular_file_is_refused() {
        let e = Config::load(Path::new("/dev/zero")).unwrap_err();
        assert!(
            e.contains("cannot read /dev/zero: not a regular file"),
            "{e}"
        );
        let files = TlsFiles {
            cert: "/dev/zero".into(),
            key: "/dev/zero".into(),
        };
        let e = crate::tls::load(&files).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn loads_with_defaults() {
        let c = Config::parse(
            "c.yaml",
            &format!(
                "store: {{ sqlite: /tmp/x/c.db }}\nrepo: {{ url: /srv/fleet }}\ntokens:\n  - {{ name: fleet, role: agent, sha256: {H} }}\n"
            ),
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7070");
        assert_eq!(c.lease_ttl, Duration::from_secs(30));
        assert_eq!(c.repo.branch, "main");
        assert_eq!(c.repo.local_path, Some(PathBuf::from("/srv/fleet")));
        assert_eq!(c.git_dir, PathBuf::from("/tmp/x/git"));
        assert!(c.tokens.check("test").is_some());
    }

    #[test]
    fn reports_every_problem() {
        let e = Config::parse(
            "c.yaml",
            "listen: nowhere\nstore: {}\nrepo: { url: \"ftp://x\" }\nlease_ttl: soon\ntokens:\n  - { name: a, role: agent, sha256: abc }\n  - { name: a, role: viewer, sha256: abc }\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "c.yaml:1:9: listen `nowhere`",
            "c.yaml:2:8: store: give exactly one of",
            "c.yaml:3:14: repo url `ftp://x` is not a Git URL",
            "c.yaml:4:12: invalid duration `soon`",
            "64 hex digits",
            "c.yaml:7:5: token `a` is defined twice",
        ] {
            assert!(e.contains(want), "{want} in {e}");
        }
        let e = Config::parse(
            "c.yaml",
            "store: { sqlite: /x }\nrepo: { url: /r }\ntokens: []\nlease_tll: 3s\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("c.yaml:4:1: unknown field `lease_tll`"), "{e}");
        assert!(e.contains("at least one token"), "{e}");
        let e = Config::parse(
            "c.yaml",
            &format!(
                "store: {{ sqlite: /x }}\nrepo: {{ url: /r }}\ntokens:\n  - {{ name: a, role: root, sha256: {H} }}\n"
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("c.yaml:4:"), "{e}");
        assert!(e.contains("unknown variant `root`"), "{e}");
        let e = Config::parse(
            "c.yaml",
            &format!(
                "store: {{ sqlite: /x }}\ntokens:\n  - {{ name: a, role: agent, sha256: {H} }}\n"
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("missing field `repo`"), "{e}");
    }

    #[test]
    fn webhook_secret_files_are_absolute_and_at_least_one() {
        let cfg = |webhook: &str| {
            Config::parse(
                "c.yaml",
                &format!(
                    "store: {{ sqlite: /x/c.db }}\nrepo: {{ url: /r }}\n{webhook}tokens:\n  - {{ name: fleet, role: agent, sha256: {H} }}\n"
                ),
            )
        };
        let c = cfg(
            "webhook: { github_secret_file: /etc/drover/gh, gitea_secret_file: /etc/drover/gt }\n",
        )
        .unwrap();
        assert_eq!(
            c.webhook.github.as_deref(),
            Some(Path::new("/etc/drover/gh"))
        );
        assert_eq!(
            c.webhook.gitea.as_deref(),
            Some(Path::new("/etc/drover/gt"))
        );
        assert!(c.webhook.gitlab.is_none());
        assert_eq!(cfg("").unwrap().webhook, SecretFiles::default());
        for (webhook, says) in [
            (
                "webhook: { gitlab_token_file: gl.secret }\n",
                "webhook.gitlab_token_file `gl.secret` must be an absolute path",
            ),
            ("webhook: {}\n", "give at least one of github_secret_file"),
            (
                "webhook: { github_secret: s3cret }\n",
                "unknown field `github_secret`",
            ),
        ] {
            let e = cfg(webhook).unwrap_err().to_string();
            assert!(e.contains("c.yaml:3:"), "{webhook}: {e}");
            assert!(e.contains(says), "{webhook}: {e}");
        }
    }

    #[test]
    fn tokens_name_hosts_and_plain_http_stays_local() {
        let base = "store: { sqlite: /x/c.db }\nrepo: { url: /r }\n";
        let c = Config::parse(
            "c.yaml",
            &format!(
                "{base}tokens:\n  - {{ name: web-01, role: agent, host: web-01, sha256: {H} }}\n  - {{ name: any, role: agent, host: \"*\", sha256: {} }}\n",
                "a".repeat(64)
            ),
        )
        .unwrap();
        assert_eq!(
            c.tokens.check("test").unwrap().host.as_deref(),
            Some("web-01")
        );
        assert_eq!(c.tokens.fleet_wide(), vec!["any"]);
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.audit_max_entries, 1_000_000);
        let e = Config::parse(
            "c.yaml",
            &format!(
                "{base}listen: 0.0.0.0:7070\ntokens:\n  - {{ name: a, role: viewer, host: web-01, sha256: {H} }}\n  - {{ name: b, role: agent, host: \"web 01\", sha256: {} }}\nlimits: {{ connections: 1, header_timeout: 1ms }}\naudit_retention: {{ max_entries: 5 }}\nmetrics_listen: nowhere\n",
                "b".repeat(64)
            ),
        )
        .unwrap_err()
        .to_string();
        for want in [
            "c.yaml:3:9: listen 0.0.0.0:7070 is not a loopback address",
            "a viewer token acts for people",
            "host `web 01` is not a host name",
            "limits.connections must be at least 16",
            "limits.header_timeout must be at least",
            "audit_retention.max_entries must be at least 1000",
            "metrics_listen `nowhere`",
        ] {
            assert!(e.contains(want), "{want} in {e}");
        }
        // TLS, or an explicit insecure, allows a non-loopback address.
        for extra in [
            "tls: { cert: /etc/drover/tls.crt, key: /etc/drover/tls.key }\n",
            "insecure: true\n",
        ] {
            let c = Config::parse(
                "c.yaml",
                &format!(
                    "{base}listen: 0.0.0.0:7070\n{extra}tokens:\n  - {{ name: a, role: agent, sha256: {H} }}\n"
                ),
            )
            .unwrap();
            assert_eq!(c.listen.to_string(), "0.0.0.0:7070");
        }
    }
}
