//! Where the coordinator's state lives. The logic ([`crate::core`]) never touches storage: it
//! produces [`Change`]s, and a [`Store`] writes a batch of them atomically. SQLite is the
//! embedded default; [`etcd`] serves several coordinators, one of which leads.

pub mod dump;
pub mod etcd;
mod sqlite;

pub use sqlite::{Sqlite, TABLES};

use crate::core::{Change, Snapshot};
use crate::wire::AuditEntry;

/// The `state` key of an override of (environment, service); both stores use it.
fn override_key(env: &str, service: &str) -> String {
    format!("override/{env}/{service}")
}

/// The `state` key of a notification delivery.
fn outbox_key(id: &str) -> String {
    format!("outbox/{id}")
}

/// The `state` key of an open incident.
fn incident_key(key: &str) -> String {
    format!("incident/{key}")
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[error("store {what}: {message}")]
pub struct StoreError {
    /// What was being done.
    pub what: &'static str,
    /// What went wrong.
    pub message: String,
}

/// Durable storage of rollouts, leases, hosts and the audit trail.
pub trait Store: Send {
    /// Everything, to rebuild the state at start.
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    /// Writes `changes` atomically and durably: all of them or none.
    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError>;
    /// The last `limit` audit entries, oldest first.
    fn history(&mut self, limit: u32) -> Result<Vec<AuditEntry>, StoreError>;
    /// A small durable write, to learn whether the store can be written again after a
    /// failure (disk full, I/O error).
    fn probe(&mut self) -> Result<(), StoreError>;
    /// Removes audit entries older than `before_ms`, and the oldest beyond `keep`; returns
    /// how many were removed.
    fn prune_audit(&mut self, before_ms: u64, keep: u64) -> Result<u64, StoreError>;
}
