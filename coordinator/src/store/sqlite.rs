//! The SQLite store: one file, WAL journal, every batch one transaction synced to disk.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::{Store, StoreError, incident_key, outbox_key, override_key};
use crate::core::{Change, Desired, Host, Override, Refused, Rollout, Snapshot};
use crate::wire::{AuditEntry, Lease};

/// Schema version stored in `meta`. 2: rollouts keyed by id (several per version: one per
/// promoting commit and attempt), leases naming their rollout, and the desired state,
/// refused commit and overrides in `state`.
const SCHEMA: i64 = 2;

/// The tables of a drover store, in the order a dump lists them.
pub const TABLES: [&str; 6] = ["meta", "rollouts", "leases", "hosts", "state", "audit"];

/// Makes the database and its WAL and shared-memory files readable by their owner only: they
/// hold lease ids (each its holder's secret) and the audit.
pub fn restrict(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let p = std::path::PathBuf::from(p);
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StoreError {
                    what: "open",
                    message: format!("cannot make {} private (mode 0600): {e}", p.display()),
                });
            }
        }
    }
    Ok(())
}

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
    /// Opens (creating if needed) the database at `path`, upgrading an older schema. An
    /// existing file must be a sound drover store: an empty (truncated) file, a damaged one or
    /// another program's database is refused with what to do, never started as an empty
    /// coordinator (that would silently lose approvals and failure history).
    pub fn open(path: &Path) -> Result<Sqlite, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError {
                what: "open",
                message: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        let existing = match std::fs::metadata(path) {
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(StoreError {
                    what: "open",
                    message: format!("cannot read {}: {e}", path.display()),
                });
            }
        };
        if existing == Some(0) {
            return Err(StoreError {
                what: "open",
                message: format!(
                    "{} is empty (0 bytes), but a drover store is never empty once created: it was truncated or replaced. \
                     Refusing to start as an empty coordinator (that would lose approvals and failure history). \
                     Restore it from a backup (or `drover-coordinator store import` a dump); delete it only if you mean to start from nothing",
                    path.display()
                ),
            });
        }
        let damaged = |why: String| StoreError {
            what: "open",
            message: format!(
                "{} is damaged ({why}). Refusing to start. `drover-coordinator store check --store {p}` tells what is readable; \
                 `drover-coordinator store export --store {p} > dump.jsonl` saves the readable rows, and \
                 `drover-coordinator store import --store NEW.db < dump.jsonl` makes a new store of them",
                path.display(),
                p = path.display()
            ),
        };
        let mut conn = Connection::open(path).map_err(err("open"))?;
        if existing.is_some() {
            let check: Result<Vec<String>, rusqlite::Error> = conn
                .prepare("PRAGMA quick_check(5)")
                .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect());
            match check {
                Ok(lines) if lines == ["ok"] => {}
                Ok(lines) => return Err(damaged(lines.join("; "))),
                Err(e) => return Err(damaged(e.to_string())),
            }
            let tables: Vec<String> = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
                .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
                .map_err(|e| damaged(e.to_string()))?;
            if tables.is_empty() {
                return Err(damaged(
                    "it holds no tables at all: its content is lost (was its -wal file removed?)"
                        .into(),
                ));
            }
            if !tables.iter().any(|t| t == "meta") {
                return Err(StoreError {
                    what: "open",
                    message: format!(
                        "{} is a SQLite file but not a drover store (no `meta` table); check store.sqlite in the configuration",
                        path.display()
                    ),
                });
            }
        }
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS rollouts (key TEXT PRIMARY KEY, body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS leases (id TEXT PRIMARY KEY, body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS hosts (name TEXT PRIMARY KEY, body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, body TEXT NOT NULL);",
        )
        .map_err(err("open"))?;
        let version: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err("open"))?;
        match version {
            None if existing.is_some() => {
                return Err(damaged("its meta table has no schema version".into()));
            }
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                    [SCHEMA],
                )
                .map_err(err("open"))?;
            }
            Some(1) => migrate_from_1(&mut conn)?,
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
        restrict(path)?;
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

    fn state<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let body: Option<String> = self
            .conn
            .query_row("SELECT body FROM state WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(err("load"))?;
        body.map(|b| {
            serde_json::from_str(&b).map_err(|e| StoreError {
                what: "load",
                message: format!("damaged state row {key} ({e})"),
            })
        })
        .transpose()
    }
}

/// Schema 1 kept one rollout per (environment, service, version), keyed by that triple, and
/// leases without their rollout. Rollouts get ids in creation order; leases the id of their
/// triple's rollout. One transaction: all or nothing.
fn migrate_from_1(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction().map_err(err("migrate"))?;
    let mut rollouts: Vec<Rollout> = {
        let mut stmt = tx
            .prepare("SELECT body FROM rollouts")
            .map_err(err("migrate"))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(err("migrate"))?
            .collect::<Result<Vec<String>, _>>()
            .map_err(err("migrate"))?;
        rows.iter()
            .map(|b| serde_json::from_str(b))
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError {
                what: "migrate",
                message: format!("damaged rollout row ({e})"),
            })?
    };
    rollouts.sort_by_key(|r| (r.created_at_ms, r.key()));
    tx.execute("DELETE FROM rollouts", [])
        .map_err(err("migrate"))?;
    let mut ids = std::collections::HashMap::new();
    for (i, r) in rollouts.iter_mut().enumerate() {
        r.id = i as u64 + 1;
        r.trigger = format!("commit {}", &r.commit[..r.commit.len().min(12)]);
        ids.insert(r.key(), r.id);
        tx.execute(
            "INSERT INTO rollouts (key, body) VALUES (?1, ?2)",
            params![r.id.to_string(), json(r)],
        )
        .map_err(err("migrate"))?;
    }
    let leases: Vec<String> = {
        let mut stmt = tx
            .prepare("SELECT body FROM leases")
            .map_err(err("migrate"))?;
        stmt.query_map([], |r| r.get::<_, String>(0))
            .map_err(err("migrate"))?
            .collect::<Result<_, _>>()
            .map_err(err("migrate"))?
    };
    for body in leases {
        let mut l: Lease = serde_json::from_str(&body).map_err(|e| StoreError {
            what: "migrate",
            message: format!("damaged lease row ({e})"),
        })?;
        l.rollout = ids
            .get(&format!("{}/{}/{}", l.environment, l.service, l.version))
            .copied()
            .unwrap_or(0);
        tx.execute(
            "UPDATE leases SET body = ?2 WHERE id = ?1",
            params![l.id, json(&l)],
        )
        .map_err(err("migrate"))?;
    }
    tx.execute("UPDATE meta SET value = ?1 WHERE key = 'schema'", [SCHEMA])
        .map_err(err("migrate"))?;
    tx.commit().map_err(err("migrate"))?;
    tracing::info!(
        rollouts = ids.len(),
        "store upgraded from schema 1 to {SCHEMA}"
    );
    Ok(())
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
        let desired: Option<Desired> = self.state("desired")?;
        let refused: Option<Refused> = self.state("refused")?;
        let overrides: Vec<Override> =
            self.all("SELECT body FROM state WHERE key LIKE 'override/%'")?;
        let outbox = self.all("SELECT body FROM state WHERE key LIKE 'outbox/%'")?;
        let incidents = self.all("SELECT body FROM state WHERE key LIKE 'incident/%'")?;
        Ok(Snapshot {
            rollouts,
            leases,
            hosts,
            last_audit: last_audit as u64,
            desired,
            refused,
            overrides,
            outbox,
            incidents,
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
            let mut put_state = tx
                .prepare_cached("INSERT OR REPLACE INTO state (key, body) VALUES (?1, ?2)")
                .map_err(err("commit"))?;
            let mut del_state = tx
                .prepare_cached("DELETE FROM state WHERE key = ?1")
                .map_err(err("commit"))?;
            for c in changes {
                match c {
                    Change::Rollout(r) => put_rollout.execute(params![r.id.to_string(), json(r)]),
                    Change::Lease(l) => put_lease.execute(params![l.id, json(l)]),
                    Change::LeaseGone(id) => del_lease.execute(params![id]),
                    Change::Host(name, h) => put_host.execute(params![name, json(h)]),
                    Change::Audit(a) => put_audit.execute(params![a.seq as i64, json(a)]),
                    Change::Desired(d) => put_state.execute(params!["desired", json(d)]),
                    Change::Refused(Some(r)) => put_state.execute(params!["refused", json(r)]),
                    Change::Refused(None) => del_state.execute(params!["refused"]),
                    Change::Override(env, service, Some(o)) => {
                        put_state.execute(params![override_key(env, service), json(o)])
                    }
                    Change::Override(env, service, None) => {
                        del_state.execute(params![override_key(env, service)])
                    }
                    Change::Outbox(d) => put_state.execute(params![outbox_key(&d.id), json(d)]),
                    Change::OutboxGone(id) => del_state.execute(params![outbox_key(id)]),
                    Change::Incident(k, Some(i)) => {
                        put_state.execute(params![incident_key(k), json(i)])
                    }
                    Change::Incident(k, None) => del_state.execute(params![incident_key(k)]),
                }
                .map_err(err("commit"))?;
            }
        }
        tx.commit().map_err(err("commit"))
    }

    fn probe(&mut self) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?1)",
                [crate::actor::now_ms() as i64],
            )
            .map(drop)
            .map_err(err("probe"))
    }

    fn prune_audit(&mut self, before_ms: u64, keep: u64) -> Result<u64, StoreError> {
        let tx = self.conn.transaction().map_err(err("prune"))?;
        // Sequence numbers are consecutive: everything `keep` below the newest goes.
        let mut n = tx
            .execute(
                "DELETE FROM audit WHERE seq <= (SELECT MAX(seq) FROM audit) - ?1",
                [keep as i64],
            )
            .map_err(err("prune"))? as u64;
        // Then by age, oldest first, in order: stop at the first entry young enough.
        let cut: Option<i64> = {
            let mut st = tx
                .prepare("SELECT seq, json_extract(body, '$.at_ms') FROM audit ORDER BY seq")
                .map_err(err("prune"))?;
            let mut rows = st.query([]).map_err(err("prune"))?;
            let mut cut = None;
            while let Some(r) = rows.next().map_err(err("prune"))? {
                let (seq, at): (i64, Option<i64>) = (
                    r.get(0).map_err(err("prune"))?,
                    r.get(1).map_err(err("prune"))?,
                );
                if at.is_some_and(|a| (a as u64) < before_ms) {
                    cut = Some(seq);
                } else {
                    break;
                }
            }
            cut
        };
        if let Some(seq) = cut {
            n += tx
                .execute("DELETE FROM audit WHERE seq <= ?1", [seq])
                .map_err(err("prune"))? as u64;
        }
        tx.commit().map_err(err("prune"))?;
        Ok(n)
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
    use crate::wire::{Policy, Purpose, RolloutState};

    fn lease(rollout: u64) -> Lease {
        Lease {
            id: "l1".into(),
            host: "h".into(),
            environment: "e".into(),
            service: "s".into(),
            version: "1".into(),
            purpose: Purpose::Deploy,
            ttl_ms: 30000,
            expires_at_ms: 5,
            rollout,
            expired_at_ms: None,
        }
    }

    #[test]
    fn batches_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let audit = AuditEntry {
            seq: 1,
            at_ms: 1,
            actor: "a".into(),
            action: "x".into(),
            subject: "s".into(),
            detail: "d".into(),
        };
        let desired = Desired {
            commit: "c1".into(),
            commit_time_ms: 1,
            fetched_at_ms: 2,
            environments: Default::default(),
        };
        let o = Override {
            environment: "e".into(),
            service: "s".into(),
            from: "2".into(),
            to: "1".into(),
            commit: "c0".into(),
            by: "ops".into(),
            at_ms: 3,
        };
        {
            let mut s = Sqlite::open(&path).unwrap();
            s.commit(&[
                Change::Lease(lease(7)),
                Change::Audit(audit.clone()),
                Change::Desired(Box::new(desired.clone())),
                Change::Override("e".into(), "s".into(), Some(o.clone())),
                Change::Override("e".into(), "t".into(), Some(o.clone())),
                Change::Override("e".into(), "t".into(), None),
            ])
            .unwrap();
        }
        let mut s = Sqlite::open(&path).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.leases, vec![lease(7)]);
        assert_eq!(snap.last_audit, 1);
        assert_eq!(snap.desired, Some(desired));
        assert_eq!(snap.overrides, vec![o]);
        assert_eq!(snap.refused, None);
        assert_eq!(s.history(10).unwrap(), vec![audit.clone()]);
        // A failing batch (duplicate audit seq) changes nothing.
        let e = s
            .commit(&[Change::LeaseGone("l1".into()), Change::Audit(audit)])
            .unwrap_err();
        assert!(e.to_string().contains("UNIQUE"), "{e}");
        assert_eq!(s.load().unwrap().leases.len(), 1);
    }

    #[test]
    fn a_schema_1_store_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        // A store as schema 1 wrote it: rollouts keyed by env/service/version, no ids.
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 CREATE TABLE rollouts (key TEXT PRIMARY KEY, body TEXT NOT NULL);
                 CREATE TABLE leases (id TEXT PRIMARY KEY, body TEXT NOT NULL);
                 CREATE TABLE hosts (name TEXT PRIMARY KEY, body TEXT NOT NULL);
                 CREATE TABLE audit (seq INTEGER PRIMARY KEY, body TEXT NOT NULL);
                 INSERT INTO meta VALUES ('schema', 1);",
            )
            .unwrap();
            let policy = Policy {
                max_parallel: 1,
                max_failures: 0,
                approval_required: false,
                approvers: vec![],
                approval_timeout_ms: 1,
                promotion_requires: None,
                rollbacks_need_approval: false,
                approve_after_first_batch: false,
            };
            for (v, at) in [("2", 20), ("1", 10)] {
                let body = serde_json::json!({
                    "environment": "e", "service": "s", "version": v, "state": "SUCCESS",
                    "policy": policy, "commit": format!("commit-{v}"), "commit_time_ms": at,
                    "succeeded": [], "failed": [], "reverted": [], "decision": null,
                    "reason": null, "approval_deadline_ms": null, "created_at_ms": at,
                    "updated_at_ms": at
                });
                conn.execute(
                    "INSERT INTO rollouts VALUES (?1, ?2)",
                    params![format!("e/s/{v}"), body.to_string()],
                )
                .unwrap();
            }
            let mut l = serde_json::to_value(lease(0)).unwrap();
            l.as_object_mut().unwrap().remove("rollout");
            l["version"] = "2".into();
            conn.execute("INSERT INTO leases VALUES ('l1', ?1)", [l.to_string()])
                .unwrap();
        }
        let mut s = Sqlite::open(&path).unwrap();
        let snap = s.load().unwrap();
        let mut got: Vec<(u64, String, RolloutState)> = snap
            .rollouts
            .iter()
            .map(|r| (r.id, r.version.clone(), r.state))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (1, "1".into(), RolloutState::Success),
                (2, "2".into(), RolloutState::Success)
            ]
        );
        assert_eq!(snap.leases[0].rollout, 2);
        // Opened again: schema 2 now, nothing changes.
        drop(s);
        let mut s = Sqlite::open(&path).unwrap();
        assert_eq!(s.load().unwrap().rollouts.len(), 2);
    }
}
