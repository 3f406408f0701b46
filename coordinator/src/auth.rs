//! Bearer tokens, stored as SHA-256 hashes, with roles and groups.

use std::collections::HashMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// An agent: heartbeats and leases.
    Agent,
    /// Read-only.
    Viewer,
    /// On call: read, pause, roll back.
    Responder,
    /// Read, pause, resume, abort, retry, roll back.
    Operator,
    /// Read, approve and reject (for its groups).
    Approver,
    /// Everything.
    Admin,
}

impl Role {
    /// The role's name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Viewer => "viewer",
            Role::Responder => "responder",
            Role::Operator => "operator",
            Role::Approver => "approver",
            Role::Admin => "admin",
        }
    }
}

/// What a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Heartbeats and leases.
    Agent,
    /// Reading status and history.
    Read,
    /// Pause a rollout.
    Pause,
    /// Resume or abort a rollout.
    Operate,
    /// Start a failed or aborted rollout again.
    Retry,
    /// Roll a service back to an earlier version.
    Rollback,
    /// Approve, reject.
    Approve,
}

impl Need {
    /// Whether `role` may do it.
    pub fn allows(self, role: Role) -> bool {
        match self {
            Need::Agent => matches!(role, Role::Agent | Role::Admin),
            Need::Read => matches!(
                role,
                Role::Viewer | Role::Responder | Role::Operator | Role::Approver | Role::Admin
            ),
            Need::Pause | Need::Rollback => {
                matches!(role, Role::Responder | Role::Operator | Role::Admin)
            }
            Need::Operate | Need::Retry => matches!(role, Role::Operator | Role::Admin),
            Need::Approve => matches!(role, Role::Approver | Role::Admin),
        }
    }

    /// The roles that may, for error messages.
    pub fn roles(self) -> &'static str {
        match self {
            Need::Agent => "agent or admin",
            Need::Read => "viewer, responder, operator, approver or admin",
            Need::Pause | Need::Rollback => "responder, operator or admin",
            Need::Operate | Need::Retry => "operator or admin",
            Need::Approve => "approver or admin",
        }
    }
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its groups (for approvals).
    pub groups: Vec<String>,
    /// The one host an agent token may act as; `None` for a fleet-wide agent token (and for
    /// every other role).
    pub host: Option<String>,
}

impl Caller {
    /// Whether this caller may heartbeat, lease, renew and release as `host`: a host-bound
    /// agent token only as its own host; a fleet-wide agent token or an admin as any.
    pub fn may_act_as(&self, host: &str) -> bool {
        self.host.as_deref().is_none_or(|h| h == host)
    }

    /// The 403 text for acting as another host.
    pub fn not_as(&self, host: &str) -> String {
        format!(
            "token {} is bound to host {}; it cannot act as host {}",
            self.name,
            self.host.as_deref().unwrap_or("*"),
            cap(host, 64)
        )
    }
}

/// Whether `h` is a host name drover accepts (as in heartbeats and leases).
pub fn valid_host(h: &str) -> bool {
    crate::core::valid_name(h, 253)
}

/// `s` cut to at most `max` bytes (on a character boundary), with `…` when cut: what the
/// coordinator keeps of client-supplied text in its audit and errors.
pub fn cap(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The known tokens, by hash.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    by_hash: HashMap<String, Caller>,
}

/// Hex SHA-256 of a token (what the configuration stores).
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

impl Tokens {
    /// Adds a token by its hash.
    pub fn add(&mut self, sha256: &str, caller: Caller) {
        self.by_hash.insert(sha256.to_ascii_lowercase(), caller);
    }

    /// The caller presenting `token`, if known.
    pub fn check(&self, token: &str) -> Option<&Caller> {
        self.by_hash.get(&hash_token(token))
    }

    /// The caller of the token whose SHA-256 is `sha256` (a dashboard session's).
    pub fn by_hash(&self, sha256: &str) -> Option<&Caller> {
        self.by_hash.get(sha256)
    }

    /// The caller of the token named `name` (an identity Slack users map to).
    pub fn by_name(&self, name: &str) -> Option<&Caller> {
        self.by_hash.values().find(|c| c.name == name)
    }

    /// The names of agent tokens that may act as any host (warned about at start).
    pub fn fleet_wide(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .by_hash
            .values()
            .filter(|c| c.role == Role::Agent && c.host.is_none())
            .map(|c| c.name.as_str())
            .collect();
        v.sort_unstable();
        v
    }
}

/// A token bucket per key: `rate` requests a second on average, bursts of up to `burst`.
/// At most `max_keys` keys are tracked; when full, the keys idle longest are forgotten (a
/// forgotten key starts again with a full bucket, which only ever errs towards serving).
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    max_keys: usize,
    buckets: HashMap<String, (f64, std::time::Instant)>,
}

impl RateLimiter {
    /// A limiter of `rate` per second with bursts of `burst`; `rate` 0 turns it off.
    pub fn new(rate: u32, burst: u32, max_keys: usize) -> RateLimiter {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            max_keys: max_keys.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Takes one request for `key` at `now`; `Err(wait)` when over the rate, with how long
    /// until a request would pass.
    pub fn take(&mut self, key: &str, now: std::time::Instant) -> Result<(), std::time::Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_keys {
            // Forget the half of the keys idle longest.
            let mut by_age: Vec<(std::time::Instant, String)> =
                self.buckets.iter().map(|(k, v)| (v.1, k.clone())).collect();
            by_age.sort_unstable();
            for (_, k) in by_age.into_iter().take(self.max_keys / 2 + 1) {
                self.buckets.remove(&k);
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        let b = self.buckets.entry(key.to_string()).or_insert((burst, now));
        let refill = now.saturating_duration_since(b.1).as_secs_f64() * rate;
        b.0 = (b.0 + refill).min(burst);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64((1.0 - b.0) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_needs() {
        for (need, allowed) in [
            (Need::Agent, vec![Role::Agent, Role::Admin]),
            (
                Need::Read,
                vec![
                    Role::Viewer,
                    Role::Responder,
                    Role::Operator,
                    Role::Approver,
                    Role::Admin,
                ],
            ),
            (
                Need::Pause,
                vec![Role::Responder, Role::Operator, Role::Admin],
            ),
            (
                Need::Rollback,
                vec![Role::Responder, Role::Operator, Role::Admin],
            ),
            (Need::Operate, vec![Role::Operator, Role::Admin]),
            (Need::Retry, vec![Role::Operator, Role::Admin]),
            (Need::Approve, vec![Role::Approver, Role::Admin]),
        ] {
            for role in [
                Role::Agent,
                Role::Viewer,
                Role::Responder,
                Role::Operator,
                Role::Approver,
                Role::Admin,
            ] {
                assert_eq!(
                    need.allows(role),
                    allowed.contains(&role),
                    "{need:?} {role:?}"
                );
            }
        }
        // An agent token can never approve; a responder never approves or retries.
        assert!(!Need::Approve.allows(Role::Agent));
        assert!(!Need::Approve.allows(Role::Responder));
        assert!(!Need::Retry.allows(Role::Responder));
    }

    #[test]
    fn tokens_are_checked_by_hash() {
        let mut t = Tokens::default();
        let caller = Caller {
            name: "alice".into(),
            role: Role::Approver,
            groups: vec!["release-managers".into()],
            host: None,
        };
        t.add(&hash_token("s3cret"), caller.clone());
        assert_eq!(t.check("s3cret\n"), Some(&caller));
        assert_eq!(t.check("S3cret"), None);
        assert_eq!(
            hash_token("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn host_bound_tokens_act_only_as_their_host() {
        let bound = Caller {
            name: "web-01".into(),
            role: Role::Agent,
            groups: vec![],
            host: Some("web-01".into()),
        };
        assert!(bound.may_act_as("web-01"));
        assert!(!bound.may_act_as("web-02"));
        assert!(bound.not_as("web-02").contains("bound to host web-01"));
        let fleet = Caller {
            host: None,
            name: "fleet".into(),
            ..bound.clone()
        };
        assert!(fleet.may_act_as("web-02"));
        let mut t = Tokens::default();
        t.add(&hash_token("a"), bound);
        t.add(&hash_token("b"), fleet);
        assert_eq!(t.fleet_wide(), vec!["fleet"]);
    }

    #[test]
    fn cap_cuts_on_a_character_boundary() {
        assert_eq!(cap("short", 10), "short");
        assert_eq!(cap("abcdef", 3), "abc…");
        assert_eq!(cap("ééé", 3), "é…");
        assert!(cap(&"x".repeat(10_000), 256).len() <= 256 + '…'.len_utf8());
    }

    #[test]
    fn rate_limiter_allows_bursts_then_the_rate() {
        let t0 = std::time::Instant::now();
        let mut r = RateLimiter::new(10, 5, 100);
        for _ in 0..5 {
            r.take("a", t0).unwrap();
        }
        let wait = r.take("a", t0).unwrap_err();
        assert!(wait <= std::time::Duration::from_millis(100), "{wait:?}");
        // Another key has its own bucket.
        r.take("b", t0).unwrap();
        // 100 ms later one more request passes.
        r.take("a", t0 + std::time::Duration::from_millis(100))
            .unwrap();
        r.take("a", t0 + std::time::Duration::from_millis(100))
            .unwrap_err();
        // Off.
        let mut off = RateLimiter::new(0, 0, 1);
        for _ in 0..1000 {
            off.take("a", t0).unwrap();
        }
        // Bounded keys.
        let mut small = RateLimiter::new(1, 1, 4);
        for i in 0..100 {
            small.take(&format!("k{i}"), t0).unwrap();
        }
        assert!(small.buckets.len() <= 4);
    }
}
