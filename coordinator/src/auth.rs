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
        };
        t.add(&hash_token("s3cret"), caller.clone());
        assert_eq!(t.check("s3cret\n"), Some(&caller));
        assert_eq!(t.check("S3cret"), None);
        assert_eq!(
            hash_token("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }
}
