//! Where the coordinator's state lives. The logic ([`crate::core`]) never touches storage: it
//! produces [`Change`]s, and a [`Store`] writes a batch of them atomically. SQLite is the
//! embedded default; an etcd store would implement the same trait.

mod sqlite;

pub use sqlite::Sqlite;

use crate::core::{Change, Snapshot};
use crate::wire::AuditEntry;

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
}
