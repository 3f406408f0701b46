//! `drover-coordinator serve --config /etc/drover/coordinator.yaml`, validated once at start.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{Caller, Role, Tokens};

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    /// Address to listen on. Default 127.0.0.1:7070.
    #[serde(default = "default_listen")]
    listen: String,
    /// Where state lives: `{ sqlite: PATH }`.
    store: StoreInput,
    /// Lease time to live. Default 30s.
    #[serde(default = "default_ttl")]
    lease_ttl: String,
    /// Heartbeat interval asked of agents. Default 5s.
    #[serde(default = "default_heartbeat")]
    heartbeat_interval: String,
    /// Bearer tokens, by SHA-256.
    tokens: Vec<TokenInput>,
}

fn default_listen() -> String {
    "127.0.0.1:7070".into()
}
fn default_ttl() -> String {
    "30s".into()
}
fn default_heartbeat() -> String {
    "5s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreInput {
    sqlite: Option<PathBuf>,
    etcd: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenInput {
    name: String,
    role: Role,
    #[serde(default)]
    groups: Vec<String>,
    sha256: String,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// SQLite database file.
    pub sqlite: PathBuf,
    /// Lease TTL.
    pub lease_ttl: Duration,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Tokens.
    pub tokens: Tokens,
}

/// Parses `30s`, `500ms`, `5m`, `1h`, `2d` (and sums like `1h30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration `{s}`: write e.g. 500ms, 30s, 5m, 1h");
    let mut rest = s.trim();
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let n_end = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = rest[..n_end].parse().map_err(|_| bad())?;
        rest = &rest[n_end..];
        let u_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        total += match &rest[..u_end] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86400),
            _ => return Err(bad()),
        };
        rest = &rest[u_end..];
    }
    Ok(total)
}

impl Config {
    /// Reads and validates `path`; the error lists every problem found.
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and validates a configuration text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let input: Input = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let mut problems = Vec::new();
        let listen = input
            .listen
            .parse()
            .map_err(|_| {
                problems.push(format!(
                    "listen `{}` is not an address like 127.0.0.1:7070",
                    input.listen
                ))
            })
            .ok();
        let sqlite = match (input.store.sqlite, input.store.etcd) {
            (Some(p), None) => p,
            (None, Some(_)) => {
                problems.push(
                    "store: etcd is not available in this build; use { sqlite: PATH }".into(),
                );
                PathBuf::new()
            }
            _ => {
                problems.push("store: give exactly one of `sqlite: PATH` or `etcd: {...}`".into());
                PathBuf::new()
            }
        };
        let mut dur = |what: &str, s: &str, min: Duration| match parse_duration(s) {
            Ok(d) if d >= min => d,
            Ok(_) => {
                problems.push(format!("{what} must be at least {min:?}"));
                min
            }
            Err(e) => {
                problems.push(format!("{what}: {e}"));
                min
            }
        };
        let lease_ttl = dur("lease_ttl", &input.lease_ttl, Duration::from_secs(1));
        let heartbeat = dur(
            "heartbeat_interval",
            &input.heartbeat_interval,
            Duration::from_millis(100),
        );
        let mut tokens = Tokens::default();
        let mut names = HashSet::new();
        if input.tokens.is_empty() {
            problems.push("tokens: at least one token is needed (drover-coordinator hash-token prints the line to add)".into());
        }
        for t in input.tokens {
            let hash = t.sha256.to_ascii_lowercase();
            if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
                problems.push(format!(
                    "token `{}`: sha256 must be 64 hex digits (echo -n TOKEN | drover-coordinator hash-token)",
                    t.name
                ));
            }
            if !names.insert(t.name.clone()) {
                problems.push(format!("token `{}` is defined twice", t.name));
            }
            tokens.add(
                &hash,
                Caller {
                    name: t.name,
                    role: t.role,
                    groups: t.groups,
                },
            );
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        Ok(Config {
            listen: listen.expect("checked"),
            sqlite,
            lease_ttl,
            heartbeat,
            tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn loads_with_defaults() {
        let c = Config::parse(&format!(
            "store: {{ sqlite: /tmp/c.db }}\ntokens:\n  - {{ name: fleet, role: agent, sha256: {H} }}\n"
        ))
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7070");
        assert_eq!(c.lease_ttl, Duration::from_secs(30));
        assert!(c.tokens.check("test").is_some());
    }

    #[test]
    fn reports_every_problem() {
        let e = Config::parse(
            "listen: nowhere\nstore: {}\nlease_ttl: soon\ntokens:\n  - { name: a, role: agent, sha256: abc }\n  - { name: a, role: viewer, sha256: abc }\n",
        )
        .unwrap_err();
        for want in [
            "listen `nowhere`",
            "exactly one of",
            "lease_ttl: invalid duration",
            "64 hex digits",
            "defined twice",
        ] {
            assert!(e.contains(want), "{want} in {e}");
        }
        let e = Config::parse("store: { sqlite: x }\ntokens: []\nlease_tll: 3s\n").unwrap_err();
        assert!(e.contains("unknown field `lease_tll`"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        let e = Config::parse(&format!(
            "store: {{ sqlite: x }}\ntokens:\n  - {{ name: a, role: root, sha256: {H} }}\n"
        ))
        .unwrap_err();
        assert!(e.contains("unknown variant `root`"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("30").is_err());
    }
}
