//! The SQLite store: one file, WAL journal, every batch one transaction synced to disk.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::{Store, StoreError};
use crate::core::{Change, Host, Rollout, Snapshot};
use crate::wire::{AuditEntry, Lease};

/// Schema version stored in `meta`.
const SCHEMA: i64 = 1;

/// A SQLite database file.
pub struct Sqlite {
    conn: Connection,
}

fn err(what: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| StoreError {
        what,
        message: e.to_string(),
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("state serializes")
}

impl Sqlite {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Sqlite, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError {
                what: "open",
                message: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        let conn = Connection::open(path).map_err(err("open"))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS rollouts (key TEXT PRIMARY KEY, body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS leases (id TEXT PRIMARY KEY, body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS hosts (name TEXT PRIMARY KEY, body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, body TEXT NOT NULL);",
        )
        .map_err(err("open"))?;
        let version: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err("open"))?;
        match version {
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                    [SCHEMA],
                )
                .map_err(err("open"))?;
            }
            Some(SCHEMA) => {}
            Some(v) => {
                return Err(StoreError {
                    what: "open",
                    message: format!(
                        "{} has schema {v}, this coordinator knows schema {SCHEMA}; use a matching coordinator version",
                        path.display()
                    ),
                });
            }
        }
        Ok(Sqlite { conn })
    }

    fn all<T: serde::de::DeserializeOwned>(&self, sql: &str) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.conn.prepare(sql).map_err(err("load"))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(err("load"))?;
        let mut out = Vec::new();
        for body in rows {
            let body = body.map_err(err("load"))?;
            out.push(serde_json::from_str(&body).map_err(|e| StoreError {
                what: "load",
                message: format!("damaged row ({e}): {body}"),
            })?);
        }
        Ok(out)
    }
}

impl Store for Sqlite {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let rollouts: Vec<Rollout> = self.all("SELECT body FROM rollouts")?;
        let leases: Vec<Lease> = self.all("SELECT body FROM leases")?;
        let mut stmt = self
            .conn
            .prepare("SELECT name, body FROM hosts")
            .map_err(err("load"))?;
        let hosts = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(err("load"))?
            .map(|row| {
                let (name, body) = row.map_err(err("load"))?;
                let host: Host = serde_json::from_str(&body).map_err(|e| StoreError {
                    what: "load",
                    message: format!("damaged host row {name} ({e})"),
                })?;
                Ok((name, host))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        drop(stmt);
        let last_audit: i64 = self
            .conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM audit", [], |r| r.get(0))
            .map_err(err("load"))?;
        Ok(Snapshot {
            rollouts,
            leases,
            hosts,
            last_audit: last_audit as u64,
        })
    }

    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction().map_err(err("commit"))?;
        {
            let mut put_rollout = tx
                .prepare_cached("INSERT OR REPLACE INTO rollouts (key, body) VALUES (?1, ?2)")
                .map_err(err("commit"))?;
            let mut put_lease = tx
                .prepare_cached("INSERT OR REPLACE INTO leases (id, body) VALUES (?1, ?2)")
                .map_err(err("commit"))?;
            let mut del_lease = tx
                .prepare_cached("DELETE FROM leases WHERE id = ?1")
                .map_err(err("commit"))?;
            let mut put_host = tx
                .prepare_cached("INSERT OR REPLACE INTO hosts (name, body) VALUES (?1, ?2)")
                .map_err(err("commit"))?;
            let mut put_audit = tx
                .prepare_cached("INSERT INTO audit (seq, body) VALUES (?1, ?2)")
                .map_err(err("commit"))?;
            for c in changes {
                match c {
                    Change::Rollout(r) => put_rollout.execute(params![r.key(), json(r)]),
                    Change::Lease(l) => put_lease.execute(params![l.id, json(l)]),
                    Change::LeaseGone(id) => del_lease.execute(params![id]),
                    Change::Host(name, h) => put_host.execute(params![name, json(h)]),
                    Change::Audit(a) => put_audit.execute(params![a.seq as i64, json(a)]),
                }
                .map_err(err("commit"))?;
            }
        }
        tx.commit().map_err(err("commit"))
    }

    fn history(&mut self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT body FROM audit ORDER BY seq DESC LIMIT ?1")
            .map_err(err("history"))?;
        let rows = stmt
            .query_map([limit], |r| r.get::<_, String>(0))
            .map_err(err("history"))?;
        let mut out: Vec<AuditEntry> = Vec::new();
        for body in rows {
            let body = body.map_err(err("history"))?;
            out.push(serde_json::from_str(&body).map_err(|e| StoreError {
                what: "history",
                message: e.to_string(),
            })?);
        }
        out.reverse();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Purpose;

    #[test]
    fn batches_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let lease = Lease {
            id: "l1".into(),
            host: "h".into(),
            environment: "e".into(),
            service: "s".into(),
            version: "1".into(),
            purpose: Purpose::Deploy,
            ttl_ms: 30000,
            expires_at_ms: 5,
        };
        let audit = AuditEntry {
            seq: 1,
            at_ms: 1,
            actor: "a".into(),
            action: "x".into(),
            subject: "s".into(),
            detail: "d".into(),
        };
        {
            let mut s = Sqlite::open(&path).unwrap();
            s.commit(&[Change::Lease(lease.clone()), Change::Audit(audit.clone())])
                .unwrap();
        }
        let mut s = Sqlite::open(&path).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.leases, vec![lease]);
        assert_eq!(snap.last_audit, 1);
        assert_eq!(s.history(10).unwrap(), vec![audit.clone()]);
        // A failing batch (duplicate audit seq) changes nothing.
        let e = s
            .commit(&[Change::LeaseGone("l1".into()), Change::Audit(audit)])
            .unwrap_err();
        assert!(e.to_string().contains("UNIQUE"), "{e}");
        assert_eq!(s.load().unwrap().leases.len(), 1);
    }
}
