//! Recovery tools for a damaged store (`drover-coordinator store check|export|import`): read
//! every row that can still be read, table by table, skipping what cannot; write them out as
//! JSON lines; build a new store from such a dump.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, params};
use serde::{Deserialize, Serialize};

use super::sqlite::{Sqlite, restrict};
use super::{Store, StoreError, TABLES};
use crate::core::{Desired, Host, Override, Refused, Rollout};
use crate::wire::{AuditEntry, Lease};

/// One row of a dump: the table, the row's key and its value (a JSON body, or the schema
/// number in `meta`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    /// Table.
    pub table: String,
    /// Key (text, or the audit's sequence number).
    pub key: serde_json::Value,
    /// Value.
    pub value: serde_json::Value,
}

/// What was found in each table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Rows read (or written), by table.
    pub rows: BTreeMap<String, u64>,
    /// Problems found, each with where.
    pub problems: Vec<String>,
}

fn err(what: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| StoreError {
        what,
        message: e.to_string(),
    }
}

fn to_json(v: Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Integer(i) => i.into(),
        Value::Real(f) => f.into(),
        Value::Text(t) => t.into(),
        Value::Blob(b) => hex::encode(b).into(),
    }
}

/// Whether a row's body is what the coordinator can load.
fn body_problem(table: &str, key: &serde_json::Value, value: &serde_json::Value) -> Option<String> {
    let body = match value {
        serde_json::Value::String(s) => s.as_str(),
        serde_json::Value::Number(_) if table == "meta" => return None,
        _ => return Some("value is not text".into()),
    };
    let parsed = match table {
        "rollouts" => serde_json::from_str::<Rollout>(body).map(drop),
        "leases" => serde_json::from_str::<Lease>(body).map(drop),
        "hosts" => serde_json::from_str::<Host>(body).map(drop),
        "audit" => serde_json::from_str::<AuditEntry>(body).map(drop),
        "state" => match key.as_str().unwrap_or("") {
            "desired" => serde_json::from_str::<Desired>(body).map(drop),
            "refused" => serde_json::from_str::<Refused>(body).map(drop),
            k if k.starts_with("override/") => serde_json::from_str::<Override>(body).map(drop),
            k if k.starts_with("outbox/") => {
                serde_json::from_str::<crate::notify::Delivery>(body).map(drop)
            }
            k if k.starts_with("incident/") => {
                serde_json::from_str::<crate::notify::Incident>(body).map(drop)
            }
            _ => Ok(()),
        },
        _ => Ok(()),
    };
    parsed.err().map(|e| e.to_string())
}

/// Reads every readable row of `path`, calling `each` for each: a full scan in rowid order;
/// where the file is damaged, the scan jumps ahead and goes on. Rows whose body does not
/// parse are reported as problems and skipped.
fn read(path: &Path, mut each: impl FnMut(Row)) -> Result<Counts, StoreError> {
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(err("open"))?;
    let mut counts = Counts::default();
    for table in TABLES {
        let (k, v) = match table {
            "meta" => ("key", "value"),
            "hosts" => ("name", "body"),
            "leases" => ("id", "body"),
            "audit" => ("seq", "body"),
            _ => ("key", "body"),
        };
        let max: i64 = match conn.query_row(&format!("SELECT MAX(rowid) FROM {table}"), [], |r| {
            r.get::<_, Option<i64>>(0)
        }) {
            Ok(m) => m.unwrap_or(0),
            Err(e) => {
                counts
                    .problems
                    .push(format!("table {table}: unreadable ({e})"));
                continue;
            }
        };
        let sql = format!("SELECT rowid, {k}, {v} FROM {table} WHERE rowid > ?1 ORDER BY rowid");
        let mut after = 0i64;
        let mut n = 0u64;
        let mut skip = 1i64;
        'scan: while after < max {
            let mut st = conn.prepare(&sql).map_err(err("read"))?;
            let mut rows = match st.query(params![after]) {
                Ok(r) => r,
                Err(e) => {
                    counts.problems.push(format!(
                        "table {table}: rows after {after} unreadable ({e})"
                    ));
                    after = after.saturating_add(skip);
                    skip = skip.saturating_mul(2);
                    continue;
                }
            };
            loop {
                match rows.next() {
                    Ok(Some(r)) => {
                        let got: Result<(i64, Value, Value), _> =
                            (|| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))();
                        match got {
                            Ok((rowid, key, value)) => {
                                after = rowid;
                                skip = 1;
                                let (key, value) = (to_json(key), to_json(value));
                                if let Some(p) = body_problem(table, &key, &value) {
                                    counts
                                        .problems
                                        .push(format!("table {table}, row {key}: {p}; skipped"));
                                    continue;
                                }
                                n += 1;
                                each(Row {
                                    table: table.into(),
                                    key,
                                    value,
                                });
                            }
                            Err(e) => {
                                let e: rusqlite::Error = e;
                                counts.problems.push(format!(
                                    "table {table}: a row after {after} is unreadable ({e})"
                                ));
                                after = after.saturating_add(skip);
                                skip = skip.saturating_mul(2);
                                continue 'scan;
                            }
                        }
                    }
                    Ok(None) => break 'scan,
                    Err(e) => {
                        counts.problems.push(format!(
                            "table {table}: rows after {after} unreadable ({e})"
                        ));
                        after = after.saturating_add(skip);
                        skip = skip.saturating_mul(2);
                        continue 'scan;
                    }
                }
            }
        }
        counts.rows.insert(table.into(), n);
    }
    Ok(counts)
}

/// `store check`: SQLite's integrity check plus a read of every row. The store is sound when
/// the returned problems are empty.
pub fn check(path: &Path) -> Result<Counts, StoreError> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() == 0 => {
            return Ok(Counts {
                rows: BTreeMap::new(),
                problems: vec![format!(
                    "{} is empty (0 bytes): it was truncated; restore a backup or import a dump",
                    path.display()
                )],
            });
        }
        Ok(_) => {}
        Err(e) => {
            return Err(StoreError {
                what: "check",
                message: format!("cannot read {}: {e}", path.display()),
            });
        }
    }
    let mut problems = Vec::new();
    match Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).and_then(|c| {
        let mut st = c.prepare("PRAGMA integrity_check(20)")?;
        st.query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()
    }) {
        Ok(lines) if lines == ["ok"] => {}
        Ok(lines) => problems.extend(lines.into_iter().map(|l| format!("integrity: {l}"))),
        Err(e) => problems.push(format!("integrity: {e}")),
    }
    let mut counts = read(path, |_| {})?;
    problems.append(&mut counts.problems);
    counts.problems = problems;
    Ok(counts)
}

/// `store export`: every readable row of `path` as JSON lines on `out`.
pub fn export(path: &Path, out: &mut dyn Write) -> Result<Counts, StoreError> {
    let mut io_error = None;
    let counts = read(path, |row| {
        if io_error.is_none()
            && let Err(e) = serde_json::to_writer(&mut *out, &row)
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n"))
        {
            io_error = Some(e);
        }
    })?;
    if let Some(e) = io_error.or_else(|| out.flush().err()) {
        return Err(StoreError {
            what: "export",
            message: format!("cannot write the dump: {e}"),
        });
    }
    Ok(counts)
}

/// The next row of a dump (blank lines skipped); `at` counts its lines. `None` at the end.
fn next_row(input: &mut dyn BufRead, at: &mut u64) -> Result<Option<Row>, StoreError> {
    let fail = |m: String| StoreError {
        what: "import",
        message: m,
    };
    let mut line = String::new();
    loop {
        line.clear();
        let n = input
            .read_line(&mut line)
            .map_err(|e| fail(format!("cannot read the dump: {e}")))?;
        if n == 0 {
            return Ok(None);
        }
        *at += 1;
        if !line.trim().is_empty() {
            return serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| fail(format!("dump line {at}: not a dump row ({e})")));
        }
    }
}

/// `store import`: a new store at `path` (which must not exist) from a dump. Built in a
/// temporary file next to it and renamed into place once complete and loadable.
pub fn import(path: &Path, input: &mut dyn BufRead) -> Result<Counts, StoreError> {
    let fail = |m: String| StoreError {
        what: "import",
        message: m,
    };
    if path.exists() {
        return Err(fail(format!(
            "{} exists; import makes a new store: move the old file away first",
            path.display()
        )));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".import");
    let tmp = std::path::PathBuf::from(tmp);
    for suffix in ["", "-wal", "-shm"] {
        let mut p = tmp.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(std::path::PathBuf::from(p));
    }
    let mut counts = Counts::default();
    {
        let _created = Sqlite::open(&tmp)?;
    }
    let mut conn = Connection::open(&tmp).map_err(err("import"))?;
    let tx = conn.transaction().map_err(err("import"))?;
    let mut at = 0u64;
    while let Some(row) = next_row(input, &mut at)? {
        if !TABLES.contains(&row.table.as_str()) {
            return Err(fail(format!(
                "dump line {at}: unknown table `{}`",
                row.table
            )));
        }
        if let Some(p) = body_problem(&row.table, &row.key, &row.value) {
            counts
                .problems
                .push(format!("dump line {at} ({}): {p}; skipped", row.table));
            continue;
        }
        let val = |v: &serde_json::Value| match v {
            serde_json::Value::Number(n) => Value::Integer(n.as_i64().unwrap_or(0)),
            serde_json::Value::String(s) => Value::Text(s.clone()),
            other => Value::Text(other.to_string()),
        };
        let sql = match row.table.as_str() {
            "meta" => "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            "hosts" => "INSERT OR REPLACE INTO hosts (name, body) VALUES (?1, ?2)",
            "leases" => "INSERT OR REPLACE INTO leases (id, body) VALUES (?1, ?2)",
            "audit" => "INSERT OR REPLACE INTO audit (seq, body) VALUES (?1, ?2)",
            "rollouts" => "INSERT OR REPLACE INTO rollouts (key, body) VALUES (?1, ?2)",
            _ => "INSERT OR REPLACE INTO state (key, body) VALUES (?1, ?2)",
        };
        tx.execute(sql, params![val(&row.key), val(&row.value)])
            .map_err(|e| fail(format!("dump line {at}: {e}")))?;
        *counts.rows.entry(row.table).or_default() += 1;
    }
    tx.commit().map_err(err("import"))?;
    drop(conn);
    // What the coordinator will do at start: it must load.
    Sqlite::open(&tmp)?
        .load()
        .map_err(|e| fail(format!("the imported store does not load: {e}")))?;
    restrict(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| fail(format!("cannot move it into place: {e}")))?;
    for suffix in ["-wal", "-shm"] {
        let mut p = tmp.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(std::path::PathBuf::from(p));
    }
    if let Some(dir) = path.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(counts)
}

/// The dump key of an etcd key suffix: rollout ids and audit sequence numbers as SQLite keeps
/// them (a number's text, a number), the rest as is.
fn etcd_key(table: &str, k: &str) -> serde_json::Value {
    match table {
        "rollouts" => k
            .trim_start_matches('0')
            .parse::<u64>()
            .unwrap_or(0)
            .to_string()
            .into(),
        "audit" => k.parse::<u64>().unwrap_or(0).into(),
        _ => k.into(),
    }
}

/// `store export` of an etcd store: every readable row, in the dump format of SQLite's (so a
/// dump of either imports into either).
pub fn export_etcd(
    store: &mut super::etcd::Etcd,
    out: &mut dyn Write,
) -> Result<Counts, StoreError> {
    let mut counts = Counts::default();
    let fail = |e: std::io::Error| StoreError {
        what: "export",
        message: format!("cannot write the dump: {e}"),
    };
    if let Some(n) = store.journal_pending()? {
        return Err(StoreError {
            what: "export",
            message: format!(
                "a batch of {n} writes is half applied (meta/journal): start a coordinator on this prefix to finish it, then export"
            ),
        });
    }
    for table in ["rollouts", "leases", "hosts", "state", "audit"] {
        let mut n = 0;
        for (k, v) in store.scan(table)? {
            let value = serde_json::Value::String(String::from_utf8_lossy(&v).into_owned());
            let key = etcd_key(table, &k);
            if let Some(p) = body_problem(table, &key, &value) {
                counts.problems.push(format!("{table} {k}: {p}"));
                continue;
            }
            let row = Row {
                table: table.into(),
                key,
                value,
            };
            serde_json::to_writer(&mut *out, &row).map_err(|e| fail(e.into()))?;
            out.write_all(b"\n").map_err(fail)?;
            n += 1;
        }
        counts.rows.insert(table.into(), n);
    }
    out.flush().map_err(fail)?;
    Ok(counts)
}

/// Reads a dump for an etcd import: its rows as (table, key, value), checked as for SQLite.
pub fn rows_for_etcd(
    input: &mut dyn BufRead,
) -> Result<(Vec<super::etcd::Row>, Counts), StoreError> {
    let fail = |m: String| StoreError {
        what: "import",
        message: m,
    };
    let mut counts = Counts::default();
    let mut rows = Vec::new();
    let mut at = 0u64;
    while let Some(row) = next_row(input, &mut at)? {
        let Some(table) = TABLES.iter().copied().find(|t| *t == row.table) else {
            return Err(fail(format!(
                "dump line {at}: unknown table `{}`",
                row.table
            )));
        };
        if table == "meta" {
            continue;
        }
        if let Some(p) = body_problem(table, &row.key, &row.value) {
            counts
                .problems
                .push(format!("dump line {at} ({table}): {p}; skipped"));
            continue;
        }
        let key = match (table, &row.key) {
            ("rollouts", k) => {
                let id: u64 = k
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .or_else(|| k.as_u64())
                    .ok_or_else(|| fail(format!("dump line {at}: rollout key {k} is not an id")))?;
                format!("{id:020}")
            }
            ("audit", k) => {
                let seq = k.as_u64().ok_or_else(|| {
                    fail(format!("dump line {at}: audit key {k} is not a number"))
                })?;
                format!("{seq:020}")
            }
            (_, serde_json::Value::String(k)) if !k.is_empty() && !k.contains('\0') => k.clone(),
            (_, k) => return Err(fail(format!("dump line {at}: key {k} is not a name"))),
        };
        let value = row.value.as_str().unwrap_or_default().as_bytes().to_vec();
        *counts.rows.entry(row.table.clone()).or_default() += 1;
        rows.push((table, key, value));
    }
    Ok((rows, counts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Change;
    use crate::wire::AuditEntry;

    fn audit(seq: u64) -> Change {
        Change::Audit(AuditEntry {
            seq,
            at_ms: seq * 1000,
            actor: "a".into(),
            action: "approve".into(),
            subject: "prod/hello/1".into(),
            detail: String::new(),
        })
    }

    #[test]
    fn export_then_import_keeps_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("c.db");
        let mut s = Sqlite::open(&db).unwrap();
        s.commit(&(1..=50).map(audit).collect::<Vec<_>>()).unwrap();
        drop(s);
        let c = check(&db).unwrap();
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!(c.rows["audit"], 50);
        let mut dump = Vec::new();
        export(&db, &mut dump).unwrap();
        let new = dir.path().join("new.db");
        let got = import(&new, &mut dump.as_slice()).unwrap();
        assert_eq!(got.rows["audit"], 50);
        let mut s = Sqlite::open(&new).unwrap();
        assert_eq!(s.load().unwrap().last_audit, 50);
        assert_eq!(s.history(100).unwrap().len(), 50);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&new).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Never over an existing file.
        let e = import(&new, &mut dump.as_slice()).unwrap_err();
        assert!(e.to_string().contains("exists"), "{e}");
        // A line that is not a row is refused with where.
        let e = import(&dir.path().join("x.db"), &mut "nope\n".as_bytes()).unwrap_err();
        assert!(e.to_string().contains("dump line 1"), "{e}");
        assert!(!dir.path().join("x.db").exists());
    }

    #[test]
    fn damaged_and_empty_stores_are_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        let e = Sqlite::open(&empty).err().unwrap().to_string();
        assert!(
            e.contains("empty (0 bytes)") && e.contains("empty.db"),
            "{e}"
        );
        assert!(!check(&empty).unwrap().problems.is_empty());
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, vec![b'x'; 8192]).unwrap();
        let e = Sqlite::open(&junk).err().unwrap().to_string();
        assert!(e.contains("damaged") && e.contains("store export"), "{e}");
        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        let e = Sqlite::open(&other).err().unwrap().to_string();
        assert!(e.contains("not a drover store"), "{e}");
        // A sound store with many rows, its middle pages overwritten: refused at open, and
        // the readable rows still come out.
        let db = dir.path().join("c.db");
        let mut s = Sqlite::open(&db).unwrap();
        let big = |seq: u64| {
            Change::Audit(AuditEntry {
                seq,
                at_ms: seq,
                actor: "a".into(),
                action: "x".into(),
                subject: "s".into(),
                detail: "d".repeat(500),
            })
        };
        s.commit(&(1..=2000).map(big).collect::<Vec<_>>()).unwrap();
        drop(s);
        let mut bytes = std::fs::read(&db).unwrap();
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 16384] {
            *b = 0xAB;
        }
        std::fs::write(&db, &bytes).unwrap();
        let e = Sqlite::open(&db).err().unwrap().to_string();
        assert!(e.contains("damaged"), "{e}");
        let c = check(&db).unwrap();
        assert!(!c.problems.is_empty());
        let mut dump = Vec::new();
        let got = export(&db, &mut dump).unwrap();
        assert!(got.rows["audit"] > 500, "{:?}", got.rows);
        assert!(got.rows["audit"] < 2000, "{:?}", got.rows);
        let new = dir.path().join("new.db");
        import(&new, &mut dump.as_slice()).unwrap();
        assert!(Sqlite::open(&new).unwrap().load().is_ok());
    }
}
