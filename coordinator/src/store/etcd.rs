//! The etcd store (`store: { etcd: … }`): the same rows as SQLite's, as keys under a prefix,
//! for several coordinators serving one fleet. One of them leads (docs/protocol.md, "Several
//! coordinators"): it holds `PREFIX/leader` under an etcd lease it keeps alive, and every
//! write it makes is a transaction that first compares that key's lease with its own — a
//! coordinator that lost the lead (paused, partitioned, its lease expired) cannot write a
//! single key, and exits on its first refused write.
//!
//! Keys: `rollouts/ID` (20 digits), `leases/ID`, `hosts/NAME`, `audit/SEQ` (20 digits),
//! `state/KEY` (`desired`, `refused`, `override/…`, `outbox/…`, `incident/…`), `meta/probe`,
//! and `leader`; values are the JSON bodies SQLite stores. A batch too large for one etcd
//! transaction goes through `journal/N` and `meta/journal` first (see [`Etcd::commit`]).

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
    /// Client URLs of the members: all `https://` with [`EtcdConfig::tls`], else all
    /// `http://` (plain gRPC: for a private network only).
    pub endpoints: Vec<String>,
    /// Key prefix of this fleet, e.g. `/drover/prod` (no trailing `/`).
    pub prefix: String,
    /// etcd user and password, when etcd has authentication on.
    pub user: Option<(String, String)>,
    /// Most operations etcd takes in one transaction (its `--max-txn-ops`).
    pub max_txn_ops: usize,
    /// TTL of the leader's etcd lease: how long a dead leader blocks a standby.
    pub leader_ttl: Duration,
    /// TLS to etcd, for `https://` endpoints.
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd: PEM bytes read (and checked) at start-up.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA certificates that signed etcd's server certificates.
    pub ca: Vec<u8>,
    /// This coordinator's client certificate chain and private key, when etcd asks for one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("max_txn_ops", &self.max_txn_ops)
            .field("leader_ttl", &self.leader_ttl)
            .field(
                "tls",
                &self.tls.as_ref().map(|t| {
                    if t.identity.is_some() {
                        "ca + client certificate"
                    } else {
                        "ca"
                    }
                }),
            )
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
    let options = match &c.tls {
        Some(t) => {
            // tonic takes the process's default crypto provider, else ring: make it the
            // aws-lc-rs of the coordinator's own TLS (an error only says one is installed).
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            let tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&t.ca));
            options.with_tls(match &t.identity {
                Some((cert, key)) => tls.identity(etcd_client::Identity::from_pem(cert, key)),
                None => tls,
            })
        }
        None => options,
    };
    let client = Client::connect(&c.endpoints, Some(options))
        .await
        .map_err(err("connect"))?;
    // A first request: the endpoints answer (with TLS as configured).
    let key = format!("{}/meta/probe", c.prefix);
    patiently(|| {
        let (mut client, key) = (client.clone(), key.clone());
        async move { client.get(key, None).await }
    })
    .await
    .map_err(|e| StoreError {
        what: "connect",
        message: format!(
            "cannot reach etcd at {} ({e}); {}",
            c.endpoints.join(", "),
            if c.tls.is_some() {
                "check the endpoints, that store.etcd.tls.ca_file signed etcd's server certificate (which names the endpoint's host or IP), and, if etcd runs with --client-cert-auth, that cert_file is signed by etcd's --trusted-ca-file"
            } else {
                "check the endpoints; if etcd serves TLS, use https:// endpoints and store.etcd.tls"
            }
        ),
    })?;
    // A transaction as large as the configured limit is accepted (else every large batch
    // would fail later).
    let probe = Txn::new().and_then(
        (0..c.max_txn_ops)
            .map(|_| TxnOp::get(format!("{}/meta/probe", c.prefix), None))
            .collect::<Vec<_>>(),
    );
    patiently(|| {
        let (mut client, probe) = (client.clone(), probe.clone());
        async move { client.txn(probe).await }
    })
    .await
    .map_err(|e| StoreError {
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

/// Runs `call` again (up to 5 times in about a second) while it fails: a member that is down
/// is still picked for a while, so the others get their turn.
async fn patiently<T, F, Fut>(mut call: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut r = call().await;
    for _ in 0..4 {
        if r.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        r = call().await;
    }
    r
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

impl Etcd {
    /// Writes `part` (at most one transaction's worth) in one guarded transaction.
    fn apply(&mut self, what: &'static str, part: Vec<Put>) -> Result<(), StoreError> {
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
        self.guarded(what, ops)
    }

    /// Writes `writes` as `journal/N` keys and, if `commit`, then `meta/journal` (their
    /// number) in one more transaction: from then on the batch counts as written.
    fn stage(&mut self, writes: &[Put], commit: bool) -> Result<(), StoreError> {
        let staged: Vec<Put> = writes
            .iter()
            .enumerate()
            .map(|(i, w)| ("journal", format!("{i:08}"), Some(encode(w))))
            .collect();
        for part in batches(staged, self.max_ops.saturating_sub(1)) {
            self.apply("journal", part)?;
        }
        if commit {
            let n = writes.len().to_string().into_bytes();
            self.apply("journal", vec![("meta", "journal".into(), Some(n))])?;
        }
        Ok(())
    }

    /// Applies a committed journal's `writes` in parts, then deletes the journal and its mark
    /// in one transaction. Safe to repeat: each write is a whole value or a delete.
    fn finish_journal(&mut self, writes: Vec<Put>) -> Result<(), StoreError> {
        for part in batches(writes, self.max_ops.saturating_sub(1)) {
            self.apply("journal", part)?;
        }
        self.clear_journal()
    }

    fn clear_journal(&mut self) -> Result<(), StoreError> {
        let (from, to) = (
            format!("{}/journal/", self.prefix),
            format!("{}/journal0", self.prefix),
        );
        let mark = self.key("meta", "journal");
        self.guarded(
            "journal",
            vec![
                TxnOp::delete(from, Some(etcd_client::DeleteOptions::new().with_range(to))),
                TxnOp::delete(mark, None),
            ],
        )
    }

    /// Whether a committed journal waits to be applied (`meta/journal` is there).
    pub(crate) fn journal_pending(&mut self) -> Result<Option<usize>, StoreError> {
        let key = self.key("meta", "journal");
        let r = self.retry("load", |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        let Some(kv) = r.kvs().first() else {
            return Ok(None);
        };
        std::str::from_utf8(kv.value())
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Some)
            .ok_or_else(|| StoreError {
                what: "load",
                message: format!(
                    "damaged meta/journal key ({:?})",
                    String::from_utf8_lossy(kv.value())
                ),
            })
    }

    /// What a leader that died in [`Etcd::commit`] left: a committed journal is applied, an
    /// uncommitted one deleted.
    fn recover_journal(&mut self) -> Result<(), StoreError> {
        let staged = self.scan("journal")?;
        match self.journal_pending()? {
            Some(n) => {
                let writes = staged
                    .iter()
                    .map(|(k, v)| decode(v).ok_or_else(|| format!("journal key {k}")))
                    .collect::<Result<Vec<Put>, String>>()
                    .and_then(|w| {
                        if w.len() == n {
                            Ok(w)
                        } else {
                            Err(format!("the journal holds {} writes, meta/journal says {n}", w.len()))
                        }
                    })
                    .map_err(|m| StoreError {
                        what: "load",
                        message: format!("damaged journal of a large batch: {m}; restore the prefix from a dump (store import)"),
                    })?;
                tracing::warn!(
                    writes = n,
                    "applying the large batch a previous leader committed but did not finish"
                );
                self.finish_journal(writes)
            }
            None if !staged.is_empty() => {
                tracing::warn!(
                    writes = staged.len(),
                    "deleting a large batch a previous leader staged but never committed"
                );
                self.clear_journal()
            }
            None => Ok(()),
        }
    }
}

/// A write as a journal value: `table NUL`, the key's length (4 bytes, big-endian), the
/// key, then `P` and the value, or `D`. Pure.
fn encode((t, k, v): &Put) -> Vec<u8> {
    let mut out = Vec::with_capacity(t.len() + k.len() + 6 + v.as_ref().map_or(0, Vec::len));
    out.extend_from_slice(t.as_bytes());
    out.push(0);
    out.extend_from_slice(&(k.len() as u32).to_be_bytes());
    out.extend_from_slice(k.as_bytes());
    match v {
        Some(v) => {
            out.push(b'P');
            out.extend_from_slice(v);
        }
        None => out.push(b'D'),
    }
    out
}

/// The write of a journal value, if it is one (its table one of the store's). Pure.
fn decode(b: &[u8]) -> Option<Put> {
    let nul = b.iter().position(|c| *c == 0)?;
    let t = match &b[..nul] {
        b"rollouts" => "rollouts",
        b"leases" => "leases",
        b"hosts" => "hosts",
        b"audit" => "audit",
        b"state" => "state",
        _ => return None,
    };
    let rest = &b[nul + 1..];
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let k = std::str::from_utf8(rest.get(4..4 + len)?).ok()?.to_string();
    let v = match rest[4 + len..].split_first()? {
        (b'P', v) => Some(v.to_vec()),
        (b'D', []) => None,
        _ => return None,
    };
    Some((t, k, v))
}

impl Store for Etcd {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        self.recover_journal()?;
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

    /// Writes a batch all or nothing. One that fits a transaction is one transaction. A
    /// larger one is first staged as `journal/N` keys (several transactions, invisible to
    /// [`Store::load`]), then committed by one transaction writing `meta/journal` (the number
    /// of staged writes), then applied in parts, then the journal is deleted. A leader that
    /// dies before `meta/journal` leaves nothing (the next load deletes the staged keys); one
    /// that dies after leaves a journal the next load applies first.
    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let parts = batches(rows(changes), self.max_ops.saturating_sub(1));
        if parts.len() <= 1 {
            for part in parts {
                self.apply("commit", part)?;
            }
            return Ok(());
        }
        let writes: Vec<Put> = parts.into_iter().flatten().collect();
        tracing::info!(
            writes = writes.len(),
            "a batch larger than one etcd transaction (store.etcd.max_txn_ops, 1 MiB): written through the journal"
        );
        self.stage(&writes, true)?;
        self.finish_journal(writes)
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

    #[test]
    fn journal_values_decode_to_the_writes_they_encode() {
        let writes: Vec<Put> = vec![
            ("hosts", "h1".into(), Some(b"{\"a\":1}".to_vec())),
            ("state", "override/prod/web".into(), None),
            ("leases", "".into(), Some(Vec::new())),
            ("audit", "a\0b".into(), Some(vec![0, b'D', 0])),
        ];
        for w in &writes {
            assert_eq!(decode(&encode(w)).as_ref(), Some(w));
        }
        for junk in [
            &b""[..],
            b"hosts",
            b"nope\0\0\0\0\x01kP",
            b"hosts\0\0\0\0\x09kP",
            b"hosts\0\0\0\0\x01kX",
            b"hosts\0\0\0\0\x01kDx",
            b"hosts\0\0\0\0\x01k",
        ] {
            assert_eq!(decode(junk), None, "{junk:?}");
        }
    }

    /// A leading store on a real etcd cluster, transactions of at most 16 operations.
    fn leading(
        dir: &std::path::Path,
    ) -> (
        drover_tests::etcd::Etcd,
        tokio::runtime::Runtime,
        EtcdConfig,
        Etcd,
    ) {
        let cluster = drover_tests::etcd::Etcd::start(dir);
        let c = EtcdConfig {
            endpoints: cluster.endpoints(),
            prefix: "/j".into(),
            user: None,
            max_txn_ops: 16,
            leader_ttl: Duration::from_secs(10),
            tls: None,
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (client, lead) = rt.block_on(async {
            let mut client = connect(&c).await.unwrap();
            let lead = campaign(&mut client, &c, "test").await.unwrap();
            (client, lead)
        });
        let store = Etcd::new(client, rt.handle().clone(), &c, lead);
        (cluster, rt, c, store)
    }

    fn host_changes(n: usize, version: &str) -> Vec<Change> {
        (0..n)
            .map(|i| {
                let h = Host {
                    environment: version.into(),
                    labels: BTreeMap::new(),
                    agent_version: None,
                    services: Vec::new(),
                    commit: None,
                    last_seen_ms: 0,
                };
                Change::Host(format!("h{i:03}"), h)
            })
            .collect()
    }

    /// A batch of 100 writes (7 transactions' worth) is written whole through the journal;
    /// one a leader committed and did not apply is applied by the next load; one it staged
    /// without committing is deleted, and nothing of it shows.
    #[test]
    fn a_batch_larger_than_a_transaction_is_written_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (cluster, _rt, _c, mut s) = leading(dir.path());
        let versions = |s: &mut Etcd| -> Vec<String> {
            let snap = s.load().unwrap();
            snap.hosts.into_iter().map(|(_, h)| h.environment).collect()
        };
        let journal = |cluster: &drover_tests::etcd::Etcd| {
            cluster.ctl(&["get", "/j/journal/", "--prefix", "--keys-only"])
                + &cluster.ctl(&["get", "/j/meta/journal", "--keys-only"])
        };
        s.commit(&host_changes(100, "1")).unwrap();
        assert_eq!(versions(&mut s), vec!["1".to_string(); 100]);
        assert_eq!(journal(&cluster).trim(), "", "the journal is gone");

        // Committed (meta/journal written), then the leader died: the next load applies it.
        let writes: Vec<Put> = batches(rows(&host_changes(100, "2")), 1000).remove(0);
        s.stage(&writes, true).unwrap();
        assert!(journal(&cluster).contains("/j/meta/journal"));
        // An export now would show half a batch: refused.
        let e = super::super::dump::export_etcd(&mut s, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("a batch of 100 writes is half applied"), "{e}");
        assert_eq!(versions(&mut s), vec!["2".to_string(); 100]);
        assert_eq!(journal(&cluster).trim(), "");

        // Staged, not committed: deleted, and nothing of it shows.
        let writes: Vec<Put> = batches(rows(&host_changes(100, "3")), 1000).remove(0);
        s.stage(&writes, false).unwrap();
        assert!(journal(&cluster).contains("/j/journal/"));
        assert_eq!(versions(&mut s), vec!["2".to_string(); 100]);
        assert_eq!(journal(&cluster).trim(), "");

        // A damaged journal stops the load with the reason (and is left for an operator).
        s.stage(&writes, true).unwrap();
        cluster.ctl(&["put", "/j/journal/00000007", "junk"]);
        let e = s.load().unwrap_err().to_string();
        assert!(
            e.contains("damaged journal of a large batch: journal key 00000007"),
            "{e}"
        );
        cluster.ctl(&["put", "/j/meta/journal", "x"]);
        let e = s.load().unwrap_err().to_string();
        assert!(e.contains("damaged meta/journal key"), "{e}");
    }
}
