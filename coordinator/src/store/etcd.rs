//! The etcd store (`store: { etcd: … }`): the same rows as SQLite's, as keys under a prefix,
//! for several coordinators serving one fleet. One of them leads (docs/protocol.md, "Several
//! coordinators"): it holds `PREFIX/leader` under an etcd lease it keeps alive, and every
//! write it makes is a transaction that first compares that key's lease with its own — a
//! coordinator that lost the lead (paused, partitioned, its lease expired) cannot write a
//! single key, and exits on its first refused write.
//!
//! Keys: `rollouts/ID` (20 digits), `leases/ID`, `hosts/NAME`, `audit/SEQ` (20 digits),
//! `state/KEY` (`desired`, `refused`, `override/…`, `outbox/…`, `incident/…`), `meta/probe`,
//! and `leader`; values are the JSON bodies SQLite stores.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, SortOrder, SortTarget, Txn, TxnOp,
};
use tokio::runtime::Handle;

use super::{Store, StoreError, incident_key, outbox_key, override_key};
use crate::core::{Change, Desired, Host, Override, Refused, Rollout, Snapshot};
use crate::wire::{AuditEntry, Lease};

/// Keys read per range request while loading (responses stay far below gRPC's 4 MiB).
const PAGE: i64 = 500;
/// Most bytes of values written in one transaction (etcd's default request limit is 1.5 MiB).
const MAX_TXN_BYTES: usize = 1 << 20;

/// How to reach etcd (validated configuration).
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://`: this build speaks plain gRPC to etcd, so it
    /// belongs on a private network or behind a local TLS proxy).
    pub endpoints: Vec<String>,
    /// Key prefix of this fleet, e.g. `/drover/prod` (no trailing `/`).
    pub prefix: String,
    /// etcd user and password, when etcd has authentication on.
    pub user: Option<(String, String)>,
    /// Most operations etcd takes in one transaction (its `--max-txn-ops`).
    pub max_txn_ops: usize,
    /// TTL of the leader's etcd lease: how long a dead leader blocks a standby.
    pub leader_ttl: Duration,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("max_txn_ops", &self.max_txn_ops)
            .field("leader_ttl", &self.leader_ttl)
            .finish()
    }
}

fn err(what: &'static str) -> impl Fn(etcd_client::Error) -> StoreError {
    move |e| StoreError {
        what,
        message: format!("etcd: {e}"),
    }
}

/// Connects to etcd (fails within 5 s when no member answers).
pub async fn connect(c: &EtcdConfig) -> Result<Client, StoreError> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_require_leader(true);
    let options = match &c.user {
        Some((u, p)) => options.with_user(u.clone(), p.clone()),
        None => options,
    };
    let mut client = Client::connect(&c.endpoints, Some(options))
        .await
        .map_err(err("connect"))?;
    // A first request: the endpoints answer, and a transaction as large as the configured
    // limit is accepted (else every large batch would fail later).
    let probe = Txn::new().and_then(
        (0..c.max_txn_ops)
            .map(|_| TxnOp::get(format!("{}/meta/probe", c.prefix), None))
            .collect::<Vec<_>>(),
    );
    let mut tried = client.txn(probe.clone()).await;
    for _ in 0..4 {
        if tried.is_ok() {
            break;
        }
        // A member that is down is still picked for a while: try the others.
        tokio::time::sleep(Duration::from_millis(250)).await;
        tried = client.txn(probe.clone()).await;
    }
    tried.map_err(|e| StoreError {
        what: "connect",
        message: format!(
            "etcd at {} refused a transaction of {} operations ({e}); start etcd with --max-txn-ops={} or lower store.etcd.max_txn_ops",
            c.endpoints.join(", "),
            c.max_txn_ops,
            c.max_txn_ops
        ),
    })?;
    Ok(client)
}

/// The lead, once won: the etcd lease that holds `PREFIX/leader`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lead {
    /// The etcd lease id.
    pub lease: i64,
}

/// Waits until this coordinator leads the fleet under `prefix` (`me` names it in the leader
/// key). Another leader's key goes when its lease expires (`leader_ttl` after it died).
pub async fn campaign(client: &mut Client, c: &EtcdConfig, me: &str) -> Result<Lead, StoreError> {
    let key = format!("{}/leader", c.prefix);
    let ttl = c.leader_ttl.as_secs().max(2) as i64;
    let mut waiting_for: Option<String> = None;
    loop {
        match try_lead(client, &key, ttl, me).await {
            Ok(Ok(lead)) => return Ok(lead),
            Ok(Err(holder)) => {
                if waiting_for.as_deref() != Some(holder.as_str()) {
                    tracing::info!(leader = %holder, "standing by: another coordinator leads this fleet");
                    waiting_for = Some(holder);
                }
            }
            // etcd is electing, or a member is down: try again.
            Err(e) => tracing::warn!(error = %e, "cannot campaign to lead; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One attempt at the leader key: the lead, or who holds it.
async fn try_lead(
    client: &mut Client,
    key: &str,
    ttl: i64,
    me: &str,
) -> Result<Result<Lead, String>, StoreError> {
    {
        let lease = client
            .lease_grant(ttl, None)
            .await
            .map_err(err("campaign"))?
            .id();
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                me,
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let r = match client.txn(txn).await {
            Ok(r) => r,
            Err(e) => {
                let _ = client.lease_revoke(lease).await;
                return Err(err("campaign")(e));
            }
        };
        if r.succeeded() {
            return Ok(Ok(Lead { lease }));
        }
        let _ = client.lease_revoke(lease).await;
        let holder = r
            .op_responses()
            .into_iter()
            .find_map(|o| match o {
                etcd_client::TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Err(holder))
    }
}

/// Keeps the lead's lease alive until it cannot (etcd unreachable for longer than the TTL,
/// or the lease gone); returns why. The caller must stop acting as leader at once.
pub async fn keep_lead(mut client: Client, c: &EtcdConfig, lead: Lead) -> String {
    let every = (c.leader_ttl / 3).max(Duration::from_millis(500));
    let mut last_ok = tokio::time::Instant::now();
    let mut stream: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    loop {
        // After a failure, try again soon (another member may answer): the lease is short.
        let pause = if stream.is_some() {
            every
        } else {
            Duration::from_millis(100)
        };
        tokio::time::sleep(pause).await;
        let renewed = tokio::time::timeout(every, async {
            if stream.is_none() {
                stream = Some(client.lease_keep_alive(lead.lease).await?);
            }
            let (keeper, answers) = stream.as_mut().expect("opened");
            keeper.keep_alive().await?;
            Ok::<_, etcd_client::Error>(answers.message().await?.map(|r| r.ttl()))
        })
        .await;
        match renewed {
            Ok(Ok(Some(ttl))) if ttl > 0 => last_ok = tokio::time::Instant::now(),
            Ok(Ok(Some(_))) => return "the leader's etcd lease expired".into(),
            Ok(Ok(None)) => {
                tracing::warn!("the leader's etcd lease keep-alive stream ended; reopening it");
                stream = None;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot renew the leader's etcd lease");
                stream = None;
            }
            Err(_) => {
                tracing::warn!("renewing the leader's etcd lease timed out");
                stream = None;
            }
        }
        if last_ok.elapsed() >= c.leader_ttl {
            return "etcd did not answer for longer than the leader's lease".into();
        }
    }
}

/// The store of the leading coordinator: every write guarded by its lead.
pub struct Etcd {
    client: Client,
    rt: Handle,
    prefix: String,
    lead: Lead,
    max_ops: usize,
}

impl Etcd {
    /// A store on `client`, writing under `lead`; its calls run on `rt` (call them from a
    /// thread outside the runtime, as the state actor's is).
    pub fn new(client: Client, rt: Handle, c: &EtcdConfig, lead: Lead) -> Etcd {
        Etcd {
            client,
            rt,
            prefix: c.prefix.clone(),
            lead,
            max_ops: c.max_txn_ops,
        }
    }

    /// Runs `call` on the runtime, again (up to 5 times in about a second) while it fails: a
    /// member that just died is still picked for a while, and etcd may be electing. Every
    /// call here may run twice (puts and deletes of whole values, guarded by the lead).
    fn retry<T, F, Fut>(&self, what: &'static str, call: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut attempt = 0;
        loop {
            match self.rt.block_on(call(self.client.clone())) {
                Ok(v) => return Ok(v),
                Err(e) if attempt < 4 => {
                    tracing::debug!(error = %e, what, "etcd call failed; retrying");
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => return Err(err(what)(e)),
            }
        }
    }

    fn key(&self, table: &str, k: &str) -> String {
        format!("{}/{table}/{k}", self.prefix)
    }

    /// Every (key suffix, value) under `PREFIX/table/`, in key order, a page at a time.
    pub(crate) fn scan(&mut self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let base = format!("{}/{table}/", self.prefix);
        let end = format!("{}/{table}0", self.prefix); // '0' follows '/'
        let mut from = base.clone().into_bytes();
        let mut out = Vec::new();
        loop {
            let opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            let r = self.retry("load", |mut c| {
                let (key, opts) = (from.clone(), opts.clone());
                async move { c.get(key, Some(opts)).await }
            })?;
            for kv in r.kvs() {
                let k = String::from_utf8_lossy(&kv.key()[base.len()..]).into_owned();
                out.push((k, kv.value().to_vec()));
            }
            match r.kvs().last() {
                Some(last) if r.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    fn all<T: serde::de::DeserializeOwned>(&mut self, table: &str) -> Result<Vec<T>, StoreError> {
        self.scan(table)?
            .into_iter()
            .map(|(k, v)| parse(table, &k, &v))
            .collect()
    }

    /// Runs `ops` as one transaction guarded by the lead; a refused guard means another
    /// coordinator leads now: this process exits (its writes could only be refused).
    fn guarded(&mut self, what: &'static str, ops: Vec<TxnOp>) -> Result<(), StoreError> {
        let txn = Txn::new()
            .when([Compare::lease(
                format!("{}/leader", self.prefix),
                CompareOp::Equal,
                self.lead.lease,
            )])
            .and_then(ops);
        let r = self.retry(what, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })?;
        if !r.succeeded() {
            deposed("a write was refused: another coordinator holds the leader key");
        }
        Ok(())
    }
}

/// Writes `rows` ((table, key, value) as a dump holds them) under `c.prefix`, which must be
/// empty: no coordinator may be leading it. Transactions of `max_txn_ops`, each refused if a
/// coordinator started leading meanwhile.
pub async fn import(client: &mut Client, c: &EtcdConfig, rows: Vec<Row>) -> Result<(), StoreError> {
    let fail = |m: String| StoreError {
        what: "import",
        message: m,
    };
    let opts = GetOptions::new().with_prefix().with_count_only();
    let n = client
        .get(format!("{}/", c.prefix), Some(opts))
        .await
        .map_err(err("import"))?
        .count();
    if n > 0 {
        return Err(fail(format!(
            "etcd prefix {} holds {n} keys; import makes a new store: use an empty prefix (or delete it: etcdctl del --prefix {}/)",
            c.prefix, c.prefix
        )));
    }
    let leader = format!("{}/leader", c.prefix);
    let rows = rows.into_iter().map(|(t, k, v)| (t, k, Some(v))).collect();
    for part in batches(rows, c.max_txn_ops) {
        let ops: Vec<TxnOp> = part
            .into_iter()
            .map(|(t, k, v)| {
                TxnOp::put(format!("{}/{t}/{k}", c.prefix), v.unwrap_or_default(), None)
            })
            .collect();
        let txn = Txn::new()
            .when([Compare::create_revision(
                leader.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(ops);
        if !client.txn(txn).await.map_err(err("import"))?.succeeded() {
            return Err(fail(format!(
                "a coordinator started leading {} during the import; stop it, delete the prefix and import again",
                c.prefix
            )));
        }
    }
    Ok(())
}

/// This coordinator no longer leads: stop at once (systemd restarts it as a standby).
pub fn deposed(why: &str) -> ! {
    tracing::error!(
        why,
        "this coordinator no longer leads the fleet; exiting so that it restarts as a standby"
    );
    std::process::exit(75)
}

fn parse<T: serde::de::DeserializeOwned>(
    table: &str,
    key: &str,
    v: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError {
        what: "load",
        message: format!("damaged {table} key {key} ({e})"),
    })
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("state serializes")
}

/// A write: (table, key under the table, the value; `None` deletes the key).
pub type Put = (&'static str, String, Option<Vec<u8>>);

/// A row of a dump to import: (table, key under the table, the value).
pub type Row = (&'static str, String, Vec<u8>);

/// Each change as a write. Pure.
pub fn rows(changes: &[Change]) -> Vec<Put> {
    changes
        .iter()
        .map(|c| match c {
            Change::Rollout(r) => ("rollouts", format!("{:020}", r.id), Some(json(r))),
            Change::Lease(l) => ("leases", l.id.clone(), Some(json(l))),
            Change::LeaseGone(id) => ("leases", id.clone(), None),
            Change::Host(name, h) => ("hosts", name.clone(), Some(json(h))),
            Change::Audit(a) => ("audit", format!("{:020}", a.seq), Some(json(a))),
            Change::Desired(d) => ("state", "desired".into(), Some(json(d))),
            Change::Refused(r) => ("state", "refused".into(), r.as_ref().map(json)),
            Change::Override(env, service, o) => {
                ("state", override_key(env, service), o.as_ref().map(json))
            }
            Change::Outbox(d) => ("state", outbox_key(&d.id), Some(json(d))),
            Change::OutboxGone(id) => ("state", outbox_key(id), None),
            Change::Incident(k, i) => ("state", incident_key(k), i.as_ref().map(json)),
        })
        .collect()
}

/// The writes of a batch: the last change of each key wins (etcd refuses a key twice in one
/// transaction), cut into transactions of at most `max_ops` operations and about
/// [`MAX_TXN_BYTES`]. Pure.
pub fn batches(rows: Vec<Put>, max_ops: usize) -> Vec<Vec<Put>> {
    let mut last: BTreeMap<(&'static str, String), Option<Vec<u8>>> = BTreeMap::new();
    for (t, k, v) in rows {
        last.insert((t, k), v);
    }
    let mut out: Vec<Vec<Put>> = vec![Vec::new()];
    let mut bytes = 0;
    for ((t, k), v) in last {
        let n = v.as_ref().map_or(0, Vec::len) + k.len();
        let cur = out.last_mut().expect("one batch at least");
        if !cur.is_empty() && (cur.len() >= max_ops.max(1) || bytes + n > MAX_TXN_BYTES) {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += n;
        out.last_mut().expect("one batch at least").push((t, k, v));
    }
    out.retain(|b| !b.is_empty());
    out
}

impl Store for Etcd {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let rollouts: Vec<Rollout> = self.all("rollouts")?;
        let leases: Vec<Lease> = self.all("leases")?;
        let hosts = self
            .scan("hosts")?
            .into_iter()
            .map(|(k, v)| parse::<Host>("hosts", &k, &v).map(|h| (k, h)))
            .collect::<Result<Vec<_>, _>>()?;
        let last_audit = {
            let base = format!("{}/audit/", self.prefix);
            let opts = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Key, SortOrder::Descend)
                .with_limit(1)
                .with_keys_only();
            let r = self.retry("load", |mut c| {
                let (base, opts) = (base.clone(), opts.clone());
                async move { c.get(base, Some(opts)).await }
            })?;
            r.kvs()
                .first()
                .and_then(|kv| kv.key_str().ok()?.rsplit('/').next()?.parse().ok())
                .unwrap_or(0)
        };
        let (mut desired, mut refused): (Option<Desired>, Option<Refused>) = (None, None);
        let mut overrides: Vec<Override> = Vec::new();
        let mut outbox = Vec::new();
        let mut incidents = Vec::new();
        for (k, v) in self.scan("state")? {
            if k == "desired" {
                desired = Some(parse("state", &k, &v)?);
            } else if k == "refused" {
                refused = Some(parse("state", &k, &v)?);
            } else if k.starts_with("override/") {
                overrides.push(parse("state", &k, &v)?);
            } else if k.starts_with("outbox/") {
                outbox.push(parse("state", &k, &v)?);
            } else if k.starts_with("incident/") {
                incidents.push(parse("state", &k, &v)?);
            }
        }
        Ok(Snapshot {
            rollouts,
            leases,
            hosts,
            last_audit,
            desired,
            refused,
            overrides,
            outbox,
            incidents,
        })
    }

    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let parts = batches(rows(changes), self.max_ops.saturating_sub(1));
        if parts.len() > 1 {
            tracing::warn!(
                transactions = parts.len(),
                "a batch larger than one etcd transaction (store.etcd.max_txn_ops, 1 MiB) is written in parts"
            );
        }
        for part in parts {
            let ops = part
                .into_iter()
                .map(|(t, k, v)| {
                    let key = self.key(t, &k);
                    match v {
                        Some(v) => TxnOp::put(key, v, None),
                        None => TxnOp::delete(key, None),
                    }
                })
                .collect();
            self.guarded("commit", ops)?;
        }
        Ok(())
    }

    fn history(&mut self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let base = format!("{}/audit/", self.prefix);
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(i64::from(limit));
        let r = self.retry("history", |mut c| {
            let (base, opts) = (base.clone(), opts.clone());
            async move { c.get(base, Some(opts)).await }
        })?;
        let mut out: Vec<AuditEntry> = r
            .kvs()
            .iter()
            .map(|kv| parse("audit", kv.key_str().unwrap_or("?"), kv.value()))
            .collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    fn probe(&mut self) -> Result<(), StoreError> {
        let key = self.key("meta", "probe");
        let now = crate::actor::now_ms().to_string();
        self.guarded("probe", vec![TxnOp::put(key, now, None)])
    }

    fn prune_audit(&mut self, before_ms: u64, keep: u64) -> Result<u64, StoreError> {
        // Sequence numbers are consecutive: everything `keep` below the newest goes, then the
        // oldest while they are older than `before_ms`.
        let entries: Vec<(u64, u64)> = self
            .scan("audit")?
            .into_iter()
            .filter_map(|(k, v)| {
                let a: AuditEntry = serde_json::from_slice(&v).ok()?;
                Some((k.parse().ok()?, a.at_ms))
            })
            .collect();
        let Some(&(newest, _)) = entries.last() else {
            return Ok(0);
        };
        let by_count = newest.saturating_sub(keep);
        let cut = entries
            .iter()
            .take_while(|(seq, at)| *seq <= by_count || *at < before_ms)
            .map(|(seq, _)| *seq)
            .last();
        let Some(cut) = cut else { return Ok(0) };
        let n = entries.iter().filter(|(s, _)| *s <= cut).count() as u64;
        let from = self.key("audit", &format!("{:020}", 0));
        let to = self.key("audit", &format!("{:020}", cut + 1));
        self.guarded(
            "prune",
            vec![TxnOp::delete(
                from,
                Some(etcd_client::DeleteOptions::new().with_range(to)),
            )],
        )?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_change_of_a_key_wins_and_batches_respect_the_limits() {
        let rows = vec![
            ("hosts", "h1".to_string(), Some(b"1".to_vec())),
            ("hosts", "h2".to_string(), Some(b"2".to_vec())),
            ("hosts", "h1".to_string(), Some(b"3".to_vec())),
            ("leases", "l1".to_string(), None),
        ];
        let b = batches(rows.clone(), 10);
        assert_eq!(b.len(), 1);
        assert_eq!(
            b[0],
            vec![
                ("hosts", "h1".to_string(), Some(b"3".to_vec())),
                ("hosts", "h2".to_string(), Some(b"2".to_vec())),
                ("leases", "l1".to_string(), None),
            ]
        );
        let b = batches(rows, 2);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
        // Big values: about 1 MiB a transaction.
        let big: Vec<_> = (0..5)
            .map(|i| ("hosts", format!("h{i}"), Some(vec![b'x'; 400 << 10])))
            .collect();
        let b = batches(big, 1000);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
        assert!(batches(vec![], 10).is_empty());
    }
}
