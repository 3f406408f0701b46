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
use crate::notify::{ChannelSpec, Kind};
use crate::webhook::SecretFiles;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    /// Address to listen on. Default 127.0.0.1:7070.
    #[serde(default = "default_listen")]
    listen: Spanned<String>,
    /// Where state lives: `{ sqlite: PATH }` or `{ etcd: {…} }`.
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
    /// Where people reach the coordinator (links in notifications). Default: `listen`, as
    /// https when TLS is set.
    public_url: Option<Spanned<String>>,
    /// Notification channels (Slack, PagerDuty, Jira, webhooks); Git routes events to them.
    #[serde(default)]
    notifications: Vec<Spanned<ChannelInput>>,
}

/// A notification channel as written. Which fields apply depends on `type`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelInput {
    name: String,
    #[serde(rename = "type")]
    kind: Spanned<String>,
    webhook_url_file: Option<String>,
    bot_token_file: Option<String>,
    channel: Option<String>,
    signing_secret_file: Option<String>,
    #[serde(default)]
    slack_users: std::collections::BTreeMap<String, String>,
    response_url_base: Option<String>,
    base_url: Option<String>,
    routing_key_file: Option<String>,
    project: Option<String>,
    issue_type: Option<String>,
    email: Option<String>,
    token_file: Option<String>,
    url: Option<String>,
    secret_file: Option<String>,
    give_up_after: Option<Spanned<Dur>>,
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
    etcd: Option<EtcdInput>,
}

/// `store: { etcd: … }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EtcdInput {
    endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    prefix: String,
    /// etcd user (with `password_file`), when etcd has authentication on.
    user: Option<String>,
    password_file: Option<String>,
    #[serde(default = "default_txn_ops")]
    max_txn_ops: usize,
    #[serde(default = "default_leader_ttl")]
    leader_ttl: Dur,
    /// TLS to etcd (`https://` endpoints).
    tls: Option<EtcdTlsInput>,
}

/// `store.etcd.tls`: the CA that signed etcd's certificates, and this coordinator's client
/// certificate when etcd asks for one (`--client-cert-auth`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EtcdTlsInput {
    ca_file: String,
    cert_file: Option<String>,
    key_file: Option<String>,
}

fn default_prefix() -> String {
    "/drover".into()
}
fn default_txn_ops() -> usize {
    128
}
fn default_leader_ttl() -> Dur {
    Dur::secs(10)
}

/// Where the coordinator keeps its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// One SQLite file (the embedded default).
    Sqlite(PathBuf),
    /// etcd, shared by several coordinators of which one leads.
    Etcd(crate::store::etcd::EtcdConfig),
}

impl StoreConfig {
    /// For logs: the file, or the endpoints and prefix.
    pub fn describe(&self) -> String {
        match self {
            StoreConfig::Sqlite(p) => p.display().to_string(),
            StoreConfig::Etcd(e) => format!("etcd {} {}", e.endpoints.join(","), e.prefix),
        }
    }
}

/// Whether other users may read `p`.
fn world_readable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
}

fn validate_etcd(
    e: EtcdInput,
    at: &Mark,
    problems: &mut Vec<Problem>,
) -> crate::store::etcd::EtcdConfig {
    let mut bad = |m: String| problems.push(Problem::new(at.clone(), m));
    if e.endpoints.is_empty() {
        bad("store.etcd.endpoints: give the client URL of each etcd member, e.g. [https://10.0.0.1:2379]".into());
    }
    let scheme = if e.tls.is_some() {
        "https://"
    } else {
        "http://"
    };
    for u in &e.endpoints {
        let ok = u
            .strip_prefix(scheme)
            .is_some_and(|rest| !rest.is_empty() && !rest.contains(['/', ' ', '@']));
        if ok {
            continue;
        }
        bad(if e.tls.is_some() {
            format!(
                "store.etcd.endpoints: `{u}` is not https://HOST:PORT (with store.etcd.tls every member is reached over TLS)"
            )
        } else if u.starts_with("https://") {
            format!(
                "store.etcd.endpoints: `{u}` is https: add `tls: {{ ca_file: … }}` under store.etcd (the CA that signed etcd's certificates)"
            )
        } else {
            format!(
                "store.etcd.endpoints: `{u}` is not http://HOST:PORT (or https://HOST:PORT with store.etcd.tls)"
            )
        });
    }
    let p = &e.prefix;
    if !p.starts_with('/')
        || p.ends_with('/')
        || p.len() > 128
        || !p[1..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/-_.".contains(c))
    {
        bad(format!(
            "store.etcd.prefix `{p}`: a key prefix like /drover/prod (starts with /, no trailing /, letters, digits, / - _ .)"
        ));
    }
    if !(16..=100_000).contains(&e.max_txn_ops) {
        bad(format!(
            "store.etcd.max_txn_ops {}: between 16 and 100000 (etcd's --max-txn-ops, 128 by default)",
            e.max_txn_ops
        ));
    }
    if e.leader_ttl.0 < Duration::from_secs(2) || e.leader_ttl.0 > Duration::from_secs(60) {
        bad("store.etcd.leader_ttl: between 2s and 60s".into());
    }
    let user = match (e.user, e.password_file) {
        (Some(u), Some(f)) => match std::fs::read_to_string(&f) {
            Ok(_) if world_readable(Path::new(&f)) => {
                bad(format!(
                    "store.etcd.password_file {f} is readable by every user; chmod 600 it"
                ));
                None
            }
            Ok(pw) if !pw.trim().is_empty() => Some((u, pw.trim().to_string())),
            Ok(_) => {
                bad(format!("store.etcd.password_file {f} is empty"));
                None
            }
            Err(err) => {
                bad(format!("store.etcd.password_file {f}: {err}"));
                None
            }
        },
        (None, None) => None,
        _ => {
            bad("store.etcd: `user` and `password_file` go together".into());
            None
        }
    };
    let tls = e.tls.and_then(|t| etcd_tls(t, &mut bad));
    crate::store::etcd::EtcdConfig {
        endpoints: e.endpoints,
        prefix: e.prefix,
        user,
        max_txn_ops: e.max_txn_ops,
        leader_ttl: e.leader_ttl.0,
        tls,
    }
}

/// Reads and checks `store.etcd.tls`'s files (PEM), reporting each problem with `bad`.
fn etcd_tls(t: EtcdTlsInput, bad: &mut impl FnMut(String)) -> Option<crate::store::etcd::EtcdTls> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut read = |field: &str, f: &str| match std::fs::read(f) {
        Ok(b) => Some(b),
        Err(err) => {
            bad(format!("store.etcd.tls.{field} {f}: {err}"));
            None
        }
    };
    // Every field holding certificates holds one at least, all of them PEM.
    let check_certs = |field: &str, f: &str, pem: &[u8], bad: &mut dyn FnMut(String)| {
        match CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>() {
            Ok(c) if !c.is_empty() => {}
            Ok(_) => bad(format!(
                "store.etcd.tls.{field} {f}: no PEM certificate in it"
            )),
            Err(err) => bad(format!("store.etcd.tls.{field} {f}: {err}")),
        }
    };
    let ca = read("ca_file", &t.ca_file);
    let identity = match (&t.cert_file, &t.key_file) {
        (Some(c), Some(k)) => Some((read("cert_file", c), read("key_file", k))),
        (None, None) => None,
        _ => {
            bad("store.etcd.tls: `cert_file` and `key_file` go together".into());
            None
        }
    };
    let ca = ca?;
    check_certs("ca_file", &t.ca_file, &ca, bad);
    let identity = match identity {
        Some((Some(cert), Some(key))) => {
            let (c, k) = (
                t.cert_file.unwrap_or_default(),
                t.key_file.unwrap_or_default(),
            );
            check_certs("cert_file", &c, &cert, bad);
            if world_readable(Path::new(&k)) {
                bad(format!(
                    "store.etcd.tls.key_file {k} is readable by every user; chmod 600 it"
                ));
            } else if let Err(err) = PrivateKeyDer::from_pem_slice(&key) {
                bad(format!(
                    "store.etcd.tls.key_file {k}: not a PEM private key ({err})"
                ));
            }
            Some((cert, key))
        }
        Some(_) => return None,
        None => None,
    };
    Some(crate::store::etcd::EtcdTls { ca, identity })
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
    /// Where state lives.
    pub store: StoreConfig,
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
    /// Where people reach the coordinator (links in notifications).
    pub public_url: String,
    /// Notification channels.
    pub notifications: Vec<ChannelSpec>,
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
    let store = match (i.store.value.sqlite, i.store.value.etcd) {
        (Some(p), None) if p.starts_with('/') => StoreConfig::Sqlite(PathBuf::from(p)),
        (Some(p), None) => {
            problems.push(Problem::new(
                store_mark,
                format!("store.sqlite `{p}` must be an absolute path"),
            ));
            StoreConfig::Sqlite(PathBuf::new())
        }
        (None, Some(e)) => {
            if i.state_dir.is_none() {
                problems.push(Problem::new(
                    store_mark.clone(),
                    "store: etcd needs `state_dir:` (where this coordinator keeps its Git mirror)",
                ));
            }
            StoreConfig::Etcd(validate_etcd(e, &store_mark, problems))
        }
        _ => {
            problems.push(Problem::new(
                store_mark,
                "store: give exactly one of `sqlite: PATH` or `etcd: {...}`",
            ));
            StoreConfig::Sqlite(PathBuf::new())
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
        None => match &store {
            StoreConfig::Sqlite(p) => p.as_path(),
            StoreConfig::Etcd(_) => std::path::Path::new(""),
        }
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
    let public_url = match i.public_url {
        Some(u) => {
            let v = u.value.trim_end_matches('/').to_string();
            if !(v.starts_with("https://") || v.starts_with("http://"))
                || v.contains(char::is_whitespace)
            {
                problems.push(Problem::new(
                    mark(&u.mark),
                    format!(
                        "public_url `{}` is not an http(s) URL like https://drover.example.com",
                        u.value
                    ),
                ));
            }
            v
        }
        None => format!(
            "{}://{listen}",
            if tls.is_some() { "https" } else { "http" }
        ),
    };
    let notifications = channels(i.notifications, &names, &mark, problems);
    Config {
        listen,
        store,
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
        public_url,
        notifications,
    }
}

/// Slack's own host for `response_url`s.
const SLACK_HOOKS: &str = "https://hooks.slack.com/";
/// The default give-up time of a channel.
const GIVE_UP_DEFAULT: Duration = Duration::from_secs(24 * 3600);

/// Validates `notifications:`: each channel with the fields of its type and no others,
/// absolute secret file paths, http(s) URLs, Slack users mapped to known tokens.
fn channels(
    input: Vec<Spanned<ChannelInput>>,
    tokens: &HashSet<String>,
    mark: &dyn Fn(&Mark) -> Mark,
    problems: &mut Vec<Problem>,
) -> Vec<ChannelSpec> {
    let mut out: Vec<ChannelSpec> = Vec::new();
    if input.len() > 64 {
        problems.push(Problem::new(
            mark(&input[64].mark),
            format!("notifications: {} channels; at most 64", input.len()),
        ));
    }
    for c in input {
        let (m, c) = (mark(&c.mark), c.value);
        let name = c.name.clone();
        let mut errs: Vec<String> = Vec::new();
        if drover_desired::spec::Name::parse(&c.name).is_err() {
            errs.push("the name must be lowercase letters, digits, `-` and `_` (it is what `notify:` in Git names)".into());
        }
        if out.iter().any(|o| o.name == c.name) {
            errs.push("defined twice".into());
        }
        let kind = match c.kind.value.as_str() {
            "slack" => Kind::Slack,
            "pagerduty" => Kind::Pagerduty,
            "jira" => Kind::Jira,
            "webhook" => Kind::Webhook,
            other => {
                errs.push(format!(
                    "type `{other}` is not one of slack, pagerduty, jira, webhook"
                ));
                problems.extend(errs.into_iter().map(|text| {
                    Problem::new(m.clone(), format!("notification channel `{name}`: {text}"))
                }));
                continue;
            }
        };
        let file = |errs: &mut Vec<String>, what: &str, p: &Option<String>| -> Option<PathBuf> {
            match p {
                Some(p) if p.starts_with('/') => Some(PathBuf::from(p)),
                Some(p) => {
                    errs.push(format!("{what} `{p}` must be an absolute path"));
                    None
                }
                None => None,
            }
        };
        let files = [
            (
                "webhook_url_file",
                file(&mut errs, "webhook_url_file", &c.webhook_url_file),
            ),
            (
                "bot_token_file",
                file(&mut errs, "bot_token_file", &c.bot_token_file),
            ),
            (
                "signing_secret_file",
                file(&mut errs, "signing_secret_file", &c.signing_secret_file),
            ),
            (
                "routing_key_file",
                file(&mut errs, "routing_key_file", &c.routing_key_file),
            ),
            ("token_file", file(&mut errs, "token_file", &c.token_file)),
            (
                "secret_file",
                file(&mut errs, "secret_file", &c.secret_file),
            ),
        ];
        let f = |what: &str| {
            files
                .iter()
                .find(|(w, _)| *w == what)
                .and_then(|(_, p)| p.clone())
        };
        // The fields each type takes (the others are refused: a typo must not pass silently).
        let allowed: &[&str] = match kind {
            Kind::Slack => &[
                "webhook_url_file",
                "bot_token_file",
                "channel",
                "signing_secret_file",
                "slack_users",
                "response_url_base",
                "base_url",
            ],
            Kind::Pagerduty => &["routing_key_file", "base_url"],
            Kind::Jira => &["base_url", "project", "issue_type", "email", "token_file"],
            Kind::Webhook => &["url", "secret_file"],
        };
        let given = [
            ("webhook_url_file", c.webhook_url_file.is_some()),
            ("bot_token_file", c.bot_token_file.is_some()),
            ("channel", c.channel.is_some()),
            ("signing_secret_file", c.signing_secret_file.is_some()),
            ("slack_users", !c.slack_users.is_empty()),
            ("response_url_base", c.response_url_base.is_some()),
            ("base_url", c.base_url.is_some()),
            ("routing_key_file", c.routing_key_file.is_some()),
            ("project", c.project.is_some()),
            ("issue_type", c.issue_type.is_some()),
            ("email", c.email.is_some()),
            ("token_file", c.token_file.is_some()),
            ("url", c.url.is_some()),
            ("secret_file", c.secret_file.is_some()),
        ];
        for (field, set) in given {
            if set && !allowed.contains(&field) {
                errs.push(format!(
                    "`{field}` does not apply to a {} channel (it takes {})",
                    kind.name(),
                    allowed.join(", ")
                ));
            }
        }
        let url =
            |errs: &mut Vec<String>, what: &str, v: Option<&String>, default: &str| -> String {
                let v = v
                    .map_or(default, |s| s.as_str())
                    .trim_end_matches('/')
                    .to_string();
                if !(v.starts_with("https://") || v.starts_with("http://"))
                    || v.contains(char::is_whitespace)
                {
                    errs.push(format!("{what} `{v}` is not an http(s) URL"));
                }
                v
            };
        let base_url = match kind {
            Kind::Slack => url(
                &mut errs,
                "base_url",
                c.base_url.as_ref(),
                "https://slack.com/api",
            ),
            Kind::Pagerduty => url(
                &mut errs,
                "base_url",
                c.base_url.as_ref(),
                "https://events.pagerduty.com",
            ),
            Kind::Jira => match &c.base_url {
                Some(b) => url(&mut errs, "base_url", Some(b), ""),
                None => {
                    errs.push("base_url is missing (e.g. https://example.atlassian.net)".into());
                    String::new()
                }
            },
            Kind::Webhook => String::new(),
        };
        let response_url_base = {
            let v = c
                .response_url_base
                .clone()
                .unwrap_or_else(|| SLACK_HOOKS.into());
            if !(v.starts_with("https://") || v.starts_with("http://")) || !v.ends_with('/') {
                errs.push(format!(
                    "response_url_base `{v}` must be an http(s) URL ending in `/` (Slack's is {SLACK_HOOKS})"
                ));
            }
            v
        };
        let webhook_url = match kind {
            Kind::Webhook => match &c.url {
                Some(u) => url(&mut errs, "url", Some(u), ""),
                None => {
                    errs.push("url is missing".into());
                    String::new()
                }
            },
            _ => String::new(),
        };
        match kind {
            Kind::Slack => {
                match (&c.webhook_url_file, &c.bot_token_file, &c.channel) {
                    (Some(_), None, None) | (None, Some(_), Some(_)) => {}
                    _ => errs.push(
                        "give either webhook_url_file (an incoming webhook), or bot_token_file and channel (chat.postMessage)".into(),
                    ),
                }
                if !c.slack_users.is_empty() && c.signing_secret_file.is_none() {
                    errs.push("slack_users needs signing_secret_file: clicks are only trusted when Slack's signature verifies".into());
                }
                for (uid, who) in &c.slack_users {
                    if !crate::core::valid_name(uid, 64) {
                        errs.push(format!(
                            "slack_users: `{uid}` is not a Slack user id (like U0123ABC)"
                        ));
                    }
                    if !tokens.contains(who) {
                        errs.push(format!(
                            "slack_users: `{uid}` maps to `{who}`, which is not a token name in `tokens:` (the identity whose role and groups apply)"
                        ));
                    }
                }
            }
            Kind::Pagerduty => {
                if c.routing_key_file.is_none() {
                    errs.push(
                        "routing_key_file is missing (the integration's Events API v2 key)".into(),
                    );
                }
            }
            Kind::Jira => {
                for (what, v) in [("project", &c.project), ("issue_type", &c.issue_type)] {
                    if v.as_deref().is_none_or(|v| v.trim().is_empty()) {
                        errs.push(format!("{what} is missing"));
                    }
                }
                if c.project
                    .as_deref()
                    .is_some_and(|p| !p.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_'))
                {
                    errs.push("project must be a project key (letters, digits, `_`)".into());
                }
                if c.token_file.is_none() {
                    errs.push("token_file is missing (with email: an API token; without: a personal access token)".into());
                }
            }
            Kind::Webhook => {
                if c.secret_file.is_none() {
                    errs.push(
                        "secret_file is missing (receivers verify X-Drover-Signature-256 with it)"
                            .into(),
                    );
                }
            }
        }
        let give_up_after = match c.give_up_after {
            Some(d) if d.value.0 < Duration::from_secs(1) => {
                errs.push("give_up_after must be at least 1s".into());
                GIVE_UP_DEFAULT
            }
            Some(d) if d.value.0 > Duration::from_secs(30 * 24 * 3600) => {
                errs.push("give_up_after must be at most 30d".into());
                GIVE_UP_DEFAULT
            }
            Some(d) => d.value.0,
            None => GIVE_UP_DEFAULT,
        };
        problems.extend(
            errs.into_iter().map(|text| {
                Problem::new(m.clone(), format!("notification channel `{name}`: {text}"))
            }),
        );
        out.push(ChannelSpec {
            name: c.name,
            kind,
            webhook_url_file: f("webhook_url_file"),
            bot_token_file: f("bot_token_file"),
            slack_channel: c.channel,
            signing_secret_file: f("signing_secret_file"),
            slack_users: c.slack_users,
            response_url_base,
            base_url,
            routing_key_file: f("routing_key_file"),
            project: c.project.unwrap_or_default(),
            issue_type: c.issue_type.unwrap_or_default(),
            email: c.email,
            token_file: f("token_file"),
            url: webhook_url,
            secret_file: f("secret_file"),
            give_up_after,
        });
    }
    out
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
    fn notification_channels_take_the_fields_of_their_type() {
        let cfg = |channels: &str| {
            Config::parse(
                "c.yaml",
                &format!(
                    "store: {{ sqlite: /x/c.db }}\nrepo: {{ url: /r }}\n{channels}tokens:\n  - {{ name: alice, role: approver, sha256: {H} }}\n"
                ),
            )
        };
        let c = cfg(
            "public_url: https://drover.example.com/\nnotifications:\n\
             \x20 - { name: deploys-slack, type: slack, webhook_url_file: /s/url, signing_secret_file: /s/sign, slack_users: { U0123: alice } }\n\
             \x20 - { name: prod-pager, type: pagerduty, routing_key_file: /s/pd, base_url: http://127.0.0.1:9/ }\n\
             \x20 - { name: ops-jira, type: jira, base_url: https://jira.example, project: OPS, issue_type: Bug, email: ops@example.com, token_file: /s/jira, give_up_after: 2h }\n\
             \x20 - { name: audit-hook, type: webhook, url: https://hook.example/in, secret_file: /s/hook }\n",
        )
        .unwrap();
        assert_eq!(c.public_url, "https://drover.example.com");
        let n = &c.notifications;
        assert_eq!(n.len(), 4);
        assert_eq!(n[0].kind, Kind::Slack);
        assert_eq!(n[0].response_url_base, "https://hooks.slack.com/");
        assert_eq!(n[0].slack_users["U0123"], "alice");
        assert_eq!(n[1].base_url, "http://127.0.0.1:9");
        assert_eq!(n[2].give_up_after, Duration::from_secs(7200));
        assert_eq!(n[3].give_up_after, Duration::from_secs(24 * 3600));
        assert_eq!(n[3].url, "https://hook.example/in");
        // Defaults: PagerDuty's and Slack's own hosts; the listen address for links.
        let c = cfg("notifications: [{ name: p, type: pagerduty, routing_key_file: /s/pd }]\n")
            .unwrap();
        assert_eq!(c.notifications[0].base_url, "https://events.pagerduty.com");
        assert_eq!(c.public_url, "http://127.0.0.1:7070");
        for (channels, says) in [
            (
                "notifications: [{ name: x, type: teams }]\n",
                "type `teams` is not one of slack, pagerduty, jira, webhook",
            ),
            (
                "notifications: [{ name: Bad, type: webhook, url: https://h, secret_file: /s }]\n",
                "the name must be lowercase",
            ),
            (
                "notifications: [{ name: x, type: webhook, url: https://h, secret_file: /s }, { name: x, type: webhook, url: https://h, secret_file: /s }]\n",
                "`x`: defined twice",
            ),
            (
                "notifications: [{ name: x, type: webhook, url: https://h }]\n",
                "secret_file is missing",
            ),
            (
                "notifications: [{ name: x, type: webhook, url: ftp://h, secret_file: /s }]\n",
                "url `ftp://h` is not an http(s) URL",
            ),
            (
                "notifications: [{ name: x, type: webhook, url: https://h, secret_file: s }]\n",
                "secret_file `s` must be an absolute path",
            ),
            (
                "notifications: [{ name: x, type: webhook, url: https://h, secret_file: /s, project: OPS }]\n",
                "`project` does not apply to a webhook channel",
            ),
            (
                "notifications: [{ name: x, type: slack }]\n",
                "give either webhook_url_file",
            ),
            (
                "notifications: [{ name: x, type: slack, bot_token_file: /t }]\n",
                "give either webhook_url_file",
            ),
            (
                "notifications: [{ name: x, type: slack, webhook_url_file: /u, slack_users: { U1: alice } }]\n",
                "slack_users needs signing_secret_file",
            ),
            (
                "notifications: [{ name: x, type: slack, webhook_url_file: /u, signing_secret_file: /s, slack_users: { U1: mallory } }]\n",
                "maps to `mallory`, which is not a token name",
            ),
            (
                "notifications: [{ name: x, type: slack, webhook_url_file: /u, response_url_base: https://hooks.example }]\n",
                "must be an http(s) URL ending in `/`",
            ),
            (
                "notifications: [{ name: x, type: pagerduty }]\n",
                "routing_key_file is missing",
            ),
            (
                "notifications: [{ name: x, type: jira, project: OPS, issue_type: Bug, token_file: /t }]\n",
                "base_url is missing",
            ),
            (
                "notifications: [{ name: x, type: jira, base_url: https://j, project: O-P, issue_type: Bug, token_file: /t }]\n",
                "project must be a project key",
            ),
            (
                "notifications: [{ name: x, type: jira, base_url: https://j, project: OPS, token_file: /t }]\n",
                "issue_type is missing",
            ),
            (
                "notifications: [{ name: x, type: pagerduty, routing_key_file: /k, give_up_after: 500ms }]\n",
                "give_up_after must be at least 1s",
            ),
            (
                "notifications: [{ name: x, type: pagerduty, routing_key: abc }]\n",
                "unknown field `routing_key`",
            ),
            (
                "public_url: drover.example.com\n",
                "public_url `drover.example.com` is not an http(s) URL",
            ),
        ] {
            let e = cfg(channels).unwrap_err().to_string();
            assert!(e.contains("c.yaml:3:"), "{channels}: {e}");
            assert!(e.contains(says), "{channels}: {e}");
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

    #[test]
    fn an_etcd_store_is_checked_once_at_start() {
        let cfg = |store: &str| {
            Config::parse(
                "c.yaml",
                &format!(
                    "{store}repo: {{ url: /r }}\ntokens:\n  - {{ name: alice, role: approver, sha256: {H} }}\n"
                ),
            )
        };
        let c = cfg("store: { etcd: { endpoints: [http://127.0.0.1:2379, http://10.0.0.2:2379], prefix: /drover/prod, max_txn_ops: 1024 } }\nstate_dir: /var/lib/drover\n").unwrap();
        let StoreConfig::Etcd(e) = &c.store else {
            panic!("{:?}", c.store)
        };
        assert_eq!(e.endpoints.len(), 2);
        assert_eq!(e.prefix, "/drover/prod");
        assert_eq!(e.max_txn_ops, 1024);
        assert_eq!(e.leader_ttl, Duration::from_secs(10));
        assert_eq!(c.git_dir, PathBuf::from("/var/lib/drover/git"));
        for (store, says) in [
            (
                "store: { etcd: { endpoints: [http://e:2379] } }\n",
                "etcd needs `state_dir:`",
            ),
            (
                "store: { etcd: { endpoints: [] } }\nstate_dir: /s\n",
                "give the client URL of each etcd member",
            ),
            (
                "store: { etcd: { endpoints: [https://e:2379] } }\nstate_dir: /s\n",
                "is https: add `tls: { ca_file: … }`",
            ),
            (
                "store: { etcd: { endpoints: [http://e:2379], tls: { ca_file: /nope } } }\nstate_dir: /s\n",
                "is not https://HOST:PORT (with store.etcd.tls",
            ),
            (
                "store: { etcd: { endpoints: [https://e:2379], tls: { ca_file: /nope } } }\nstate_dir: /s\n",
                "store.etcd.tls.ca_file /nope: No such file",
            ),
            (
                "store: { etcd: { endpoints: [https://e:2379], tls: { ca_file: /nope, cert_file: /c } } }\nstate_dir: /s\n",
                "`cert_file` and `key_file` go together",
            ),
            (
                "store: { etcd: { endpoints: [https://e:2379], tls: { ca: /nope } } }\nstate_dir: /s\n",
                "unknown field `ca`",
            ),
            (
                "store: { etcd: { endpoints: [http://e:2379], prefix: drover } }\nstate_dir: /s\n",
                "a key prefix like /drover/prod",
            ),
            (
                "store: { etcd: { endpoints: [http://e:2379], prefix: /d/ } }\nstate_dir: /s\n",
                "no trailing /",
            ),
            (
                "store: { etcd: { endpoints: [http://e:2379], max_txn_ops: 5 } }\nstate_dir: /s\n",
                "between 16 and 100000",
            ),
            (
                "store: { etcd: { endpoints: [http://e:2379], leader_ttl: 1s } }\nstate_dir: /s\n",
                "between 2s and 60s",
            ),
            (
                "store: { etcd: { endpoints: [http://e:2379], user: root } }\nstate_dir: /s\n",
                "go together",
            ),
            (
                "store: { etcd: { endpoints: [http://e:2379], password_file: /nope, user: u } }\nstate_dir: /s\n",
                "store.etcd.password_file /nope",
            ),
            (
                "store: { etcd: { endpoints: [http://e:2379], tls: {} } }\nstate_dir: /s\n",
                "missing field `ca_file`",
            ),
            (
                "store: { sqlite: /x, etcd: { endpoints: [http://e:2379] } }\n",
                "exactly one of",
            ),
        ] {
            let e = cfg(store).unwrap_err().to_string();
            assert!(e.contains(says), "{store}: {e}");
        }
        // The password never shows in a debug print of the configuration.
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret-pw\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
        let open = format!(
            "store: {{ etcd: {{ endpoints: [http://e:2379], user: drover, password_file: {} }} }}\nstate_dir: /s\n",
            pw.display()
        );
        assert!(cfg(&open).unwrap_err().to_string().contains("chmod 600"));
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = cfg(&format!(
            "store: {{ etcd: {{ endpoints: [http://e:2379], user: drover, password_file: {} }} }}\nstate_dir: /s\n",
            pw.display()
        ))
        .unwrap();
        assert!(!format!("{c:?}").contains("s3cret-pw"));
        let StoreConfig::Etcd(e) = c.store else {
            panic!()
        };
        assert_eq!(e.user, Some(("drover".into(), "s3cret-pw".into())));
    }

    #[test]
    fn etcd_tls_files_are_read_and_checked_at_start() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = drover_tests::tls::TestCa::new(&dir.path().join("ca"));
        let (cert, key) = ca.client("coordinator");
        let cfg = |tls: String| {
            Config::parse(
                "c.yaml",
                &format!(
                    "store: {{ etcd: {{ endpoints: [https://10.0.0.1:2379], tls: {{ {tls} }} }} }}\nstate_dir: /s\nrepo: {{ url: /r }}\ntokens:\n  - {{ name: alice, role: approver, sha256: {H} }}\n"
                ),
            )
        };
        let (ca_f, cert_f, key_f) = (ca.ca.display(), cert.display(), key.display());
        let c = cfg(format!(
            "ca_file: {ca_f}, cert_file: {cert_f}, key_file: {key_f}"
        ))
        .unwrap();
        let StoreConfig::Etcd(e) = &c.store else {
            panic!("{:?}", c.store)
        };
        let t = e.tls.as_ref().unwrap();
        assert_eq!(t.ca, std::fs::read(&ca.ca).unwrap());
        let (c_pem, k_pem) = t.identity.as_ref().unwrap();
        assert_eq!(c_pem, &std::fs::read(&cert).unwrap());
        // The key never shows in a debug print of the configuration.
        let k_text = String::from_utf8_lossy(k_pem).into_owned();
        let body = k_text.lines().nth(1).unwrap();
        assert!(!format!("{c:?}").contains(body));
        assert!(format!("{c:?}").contains("ca + client certificate"));
        // The CA alone (etcd without --client-cert-auth).
        assert!(cfg(format!("ca_file: {ca_f}")).is_ok());

        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
        for (tls, says) in [
            (
                format!("ca_file: {}", junk.display()),
                format!(
                    "store.etcd.tls.ca_file {}: no PEM certificate in it",
                    junk.display()
                ),
            ),
            (
                format!(
                    "ca_file: {ca_f}, cert_file: {}, key_file: {key_f}",
                    junk.display()
                ),
                format!(
                    "store.etcd.tls.cert_file {}: no PEM certificate in it",
                    junk.display()
                ),
            ),
            (
                format!(
                    "ca_file: {ca_f}, cert_file: {cert_f}, key_file: {}",
                    junk.display()
                ),
                format!(
                    "store.etcd.tls.key_file {}: not a PEM private key",
                    junk.display()
                ),
            ),
        ] {
            let e = cfg(tls.clone()).unwrap_err().to_string();
            assert!(e.contains(&says), "{tls}: {e}");
        }
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = cfg(format!(
            "ca_file: {ca_f}, cert_file: {cert_f}, key_file: {key_f}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("is readable by every user; chmod 600 it"), "{e}");
    }
}
