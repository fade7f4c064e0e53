//! The PostgreSQL store: the journal of a server that shares its state with other nodes.
//!
//! Every entry the sled store keeps under a key (records, meta, blob lengths) is a row of
//! `tether_journal (key bytea primary key, value bytea)`, encoded exactly as in sled (each with
//! its CRC), so recovery validates both stores alike. Blob bytes are rows of `tether_blobs
//! (name, at, bytes)`, one per append, never read past the length committed under its key.
//!
//! [`Store::apply`] is one transaction per batch: the batch's keys are reduced to their last
//! write (as sled's batches are), then written with one upsert and one delete; blob appends and
//! deletions run in their order. It returns only once `COMMIT` does, with `synchronous_commit`
//! on (checked at open, as `fsync` is): [`Store::sync`] has nothing left to do. A batch whose
//! `COMMIT` got no answer is ambiguous; the journal then acknowledges nothing more.
//!
//! The schema is created and migrated at open ([`MIGRATIONS`], numbered in `tether_schema`),
//! under an advisory lock so that two nodes starting at once migrate once. A database migrated
//! by a newer server is refused.
//!
//! The client is async (tokio-postgres) on a runtime of its own; the store's blocking calls
//! hand their work to it and wait, so they may be made from any thread, an actix one included.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::config::SslMode;
use tokio_postgres::Client;

use crate::journal::record::{self, LogName};
use crate::journal::store::{Rows, Store};
use crate::journal::{blobs, JournalError, Op};

/// The schema, one step per version: version N is the first N steps applied.
pub const MIGRATIONS: &[&str] = &[
    "CREATE TABLE tether_journal (
        key bytea PRIMARY KEY,
        value bytea NOT NULL
     );
     CREATE TABLE tether_blobs (
        name text NOT NULL,
        at bigint NOT NULL,
        bytes bytea NOT NULL,
        PRIMARY KEY (name, at)
     );",
    // The lease: which node is active, with an epoch that every takeover raises.
    "CREATE TABLE tether_lease (
        id smallint PRIMARY KEY CHECK (id = 1),
        holder text NOT NULL,
        epoch bigint NOT NULL,
        expires_at timestamptz NOT NULL
     );",
];

/// Taken (per transaction) while the schema is checked and migrated.
const MIGRATION_LOCK: i64 = 0x7465_7468_6572; // "tether"
/// Longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the database is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// A libpq connection string or `postgres://` URL (password included, if any).
    pub url: String,
    /// CA certificates (PEM) that sign the database's certificate; TLS is then required.
    pub ca_file: Option<PathBuf>,
    /// Connections for reads (the writer has one of its own).
    pub pool_size: usize,
}

/// Why the database cannot serve as a journal, in words an operator can act on.
fn refuse(reason: impl Into<String>) -> JournalError {
    JournalError::Database {
        reason: reason.into(),
    }
}

/// A client error with its causes ("error connecting to server: No such file or directory").
fn described(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_owned();
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

fn db_err(context: &str, e: &tokio_postgres::Error) -> JournalError {
    // The server's own words (e.g. "password authentication failed"), not only "db error".
    JournalError::Io {
        context: format!("postgres: {context}"),
        reason: described(e),
    }
}

/// A connection recipe: the parsed configuration and the TLS connector, if any.
#[derive(Clone)]
struct Connector {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl Connector {
    fn new(opts: &PgOptions) -> Result<Connector, JournalError> {
        let mut config: tokio_postgres::Config = opts
            .url
            .parse()
            .map_err(|e| refuse(format!("invalid storage.url: {e}")))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("tether-server");
        let tls = match &opts.ca_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read_to_string(path).map_err(|e| {
                    refuse(format!(
                        "cannot read storage.ca_file {}: {e}",
                        path.display()
                    ))
                })?;
                let client = crate::tls::client_config(&pem)
                    .map_err(|e| refuse(format!("storage.ca_file {}: {e}", path.display())))?;
                config.ssl_mode(SslMode::Require);
                Some(tokio_postgres_rustls::MakeRustlsConnect::new(client))
            }
        };
        Ok(Connector { config, tls })
    }

    async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        match &self.tls {
            Some(tls) => {
                let (client, conn) = self.config.connect(tls.clone()).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::warn!(error = %e, "postgres-connection-lost");
                    }
                });
                Ok(client)
            }
            None => {
                let (client, conn) = self.config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::warn!(error = %e, "postgres-connection-lost");
                    }
                });
                Ok(client)
            }
        }
    }
}

/// A connection, made again once it is lost.
struct Slot {
    client: Mutex<Option<Client>>,
}

impl Slot {
    fn new(client: Client) -> Slot {
        Slot {
            client: Mutex::new(Some(client)),
        }
    }
}

/// The state the runtime's tasks share.
struct Shared {
    connector: Connector,
    writer: Slot,
    readers: Vec<Slot>,
    next_reader: AtomicUsize,
    /// The lease this store holds, once [`PgStore::acquire_lease`] got it: every batch checks
    /// it inside its transaction.
    lease: std::sync::Mutex<Option<Lease>>,
}

/// The lease a node holds: while it is unexpired and its epoch current, the node is the only
/// one whose batches commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub epoch: i64,
    /// Its length, renewed by [`PgStore::renew_lease`].
    pub ttl: Duration,
}

/// Who holds the lease now, as a node that does not sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub holder: String,
    pub epoch: i64,
    /// Milliseconds until it expires by the database's clock (negative: expired).
    pub expires_in_ms: i64,
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

/// Why a batch was not committed by a node that is no longer the active one.
fn fenced(lease: &Lease) -> JournalError {
    JournalError::Poisoned {
        reason: format!(
            "this node ({}) no longer holds the lease at epoch {}: another node is active, so nothing more is committed here",
            lease.holder, lease.epoch
        ),
    }
}

impl Shared {
    /// The slot's client, connected again if it was lost.
    async fn client<'a>(
        &self,
        slot: &'a Slot,
    ) -> Result<tokio::sync::MutexGuard<'a, Option<Client>>, JournalError> {
        let mut guard = slot.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = None;
            let client = self
                .connector
                .connect()
                .await
                .map_err(|e| db_err("cannot connect", &e))?;
            tracing::info!("postgres-reconnected");
            *guard = Some(client);
        }
        Ok(guard)
    }

    fn reader(&self) -> &Slot {
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed);
        &self.readers[i % self.readers.len()]
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    /// `None` only while it is being dropped.
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
    syncs: AtomicU64,
}

impl PgStore {
    /// Connects, checks that the database keeps what it acknowledges, and creates or migrates
    /// the schema. Every refusal names its cause.
    pub fn open(opts: &PgOptions) -> Result<PgStore, JournalError> {
        let connector = Connector::new(opts)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("postgres")
            .enable_all()
            .build()
            .map_err(|e| refuse(format!("cannot start the database client: {e}")))?;
        let pool = opts.pool_size.max(1);
        let init = async move {
            let connect = || async {
                connector.connect().await.map_err(|e| {
                    refuse(format!("cannot connect to the database: {}", described(&e)))
                })
            };
            let mut writer = connect().await?;
            check_settings(&writer).await?;
            migrate(&mut writer).await?;
            let mut readers = Vec::with_capacity(pool);
            for _ in 0..pool {
                readers.push(Slot::new(connect().await?));
            }
            Ok::<_, JournalError>(Shared {
                connector: connector.clone(),
                writer: Slot::new(writer),
                readers,
                next_reader: AtomicUsize::new(0),
                lease: std::sync::Mutex::new(None),
            })
        };
        let shared = match wait_on(&runtime, init) {
            Ok(shared) => shared,
            Err(e) => {
                // Without waiting: `open` may be called on an async thread.
                runtime.shutdown_background();
                return Err(e);
            }
        };
        Ok(PgStore {
            runtime: Some(runtime),
            shared: Arc::new(shared),
            syncs: AtomicU64::new(0),
        })
    }

    /// Takes the lease for `holder` if it is free, expired, or `holder`'s own (a restart):
    /// the lease, with an epoch above every earlier one; `Err(current holder)` if another node
    /// holds it. From then on every batch commits only while the lease is held.
    pub fn acquire_lease(
        &self,
        holder: &str,
        ttl: Duration,
    ) -> Result<Result<Lease, LeaseHolder>, JournalError> {
        let holder = holder.to_owned();
        let got = self.run(move |shared| async move {
            let guard = shared.client(&shared.writer).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            let row = client
                .query_opt(
                    "INSERT INTO tether_lease AS l (id, holder, epoch, expires_at)
                     VALUES (1, $1, 1, now() + $2 * interval '1 millisecond')
                     ON CONFLICT (id) DO UPDATE
                       SET holder = excluded.holder, epoch = l.epoch + 1,
                           expires_at = excluded.expires_at
                       WHERE l.expires_at <= now() OR l.holder = excluded.holder
                     RETURNING epoch",
                    &[&holder, &(ttl_ms(ttl) as f64)],
                )
                .await
                .map_err(|e| db_err("cannot take the lease", &e))?;
            if let Some(row) = row {
                let lease = Lease {
                    holder,
                    epoch: row.get(0),
                    ttl,
                };
                *shared
                    .lease
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(lease.clone());
                return Ok(Ok(lease));
            }
            Ok(Err(current_holder(client).await?))
        })?;
        Ok(got)
    }

    /// Extends the lease this store holds by its length; an error once it is lost (another
    /// node took it): the node must step down.
    pub fn renew_lease(&self) -> Result<(), JournalError> {
        self.run(|shared| async move {
            let lease = shared
                .lease
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
                .ok_or_else(|| JournalError::Poisoned {
                    reason: "no lease to renew".into(),
                })?;
            let guard = shared.client(&shared.writer).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            let renewed = client
                .execute(
                    "UPDATE tether_lease SET expires_at = now() + $3 * interval '1 millisecond'
                     WHERE id = 1 AND holder = $1 AND epoch = $2",
                    &[&lease.holder, &lease.epoch, &(ttl_ms(lease.ttl) as f64)],
                )
                .await
                .map_err(|e| db_err("cannot renew the lease", &e))?;
            if renewed == 1 {
                Ok(())
            } else {
                Err(fenced(&lease))
            }
        })
    }

    /// Who holds the lease now (`None`: nobody ever did).
    pub fn lease_holder(&self) -> Result<Option<LeaseHolder>, JournalError> {
        self.run(|shared| async move {
            let guard = shared.client(shared.reader()).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            match current_holder(client).await {
                Ok(h) => Ok(Some(h)),
                Err(JournalError::Database { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    /// Runs `work` on the store's runtime and waits for it, from any thread.
    fn run<T, F>(&self, work: impl FnOnce(Arc<Shared>) -> F) -> Result<T, JournalError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, JournalError>> + Send + 'static,
    {
        let runtime = self.runtime.as_ref().ok_or(JournalError::Closed)?;
        wait_on(runtime, work(Arc::clone(&self.shared)))
    }
}

/// Runs `fut` on `runtime` and blocks the calling thread (any thread, an async one included:
/// the work runs on the runtime's own threads) until it is done.
fn wait_on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    fut: impl Future<Output = Result<T, JournalError>> + Send + 'static,
) -> Result<T, JournalError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| JournalError::Closed)?
}

/// The lease row as it is now.
async fn current_holder(client: &Client) -> Result<LeaseHolder, JournalError> {
    let row = client
        .query_opt(
            "SELECT holder, epoch,
                    (extract(epoch FROM expires_at - now()) * 1000)::bigint
             FROM tether_lease WHERE id = 1",
            &[],
        )
        .await
        .map_err(|e| db_err("cannot read the lease", &e))?
        .ok_or_else(|| refuse("nobody holds the lease"))?;
    Ok(LeaseHolder {
        holder: row.get(0),
        epoch: row.get(1),
        expires_in_ms: row.get(2),
    })
}

/// `fsync` and `synchronous_commit` must be on, or a commit the database acknowledged can be
/// lost in a crash.
async fn check_settings(client: &Client) -> Result<(), JournalError> {
    for (setting, refused) in [("fsync", "off"), ("synchronous_commit", "off")] {
        let row = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .map_err(|e| db_err("cannot read the settings", &e))?;
        let value: String = row.get(0);
        if value == refused {
            return Err(refuse(format!(
                "the database runs with {setting} = {value}: it may lose commits it acknowledged, so tether refuses it (set {setting} = on)"
            )));
        }
    }
    Ok(())
}

/// Creates or migrates the schema; refuses a database migrated by a newer version.
async fn migrate(client: &mut Client) -> Result<(), JournalError> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| db_err("cannot begin", &e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| db_err("cannot lock the schema", &e))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS tether_schema (version integer NOT NULL)")
        .await
        .map_err(|e| db_err("cannot create tether_schema", &e))?;
    let found: Option<i32> = tx
        .query_opt("SELECT max(version) FROM tether_schema", &[])
        .await
        .map_err(|e| db_err("cannot read the schema version", &e))?
        .and_then(|row| row.get(0));
    let found = usize::try_from(found.unwrap_or(0)).unwrap_or(0);
    let known = MIGRATIONS.len();
    if found > known {
        return Err(refuse(format!(
            "the database schema is version {found}, newer than this server's ({known}): a newer tether-server migrated it; run that version"
        )));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(found) {
        tx.batch_execute(step)
            .await
            .map_err(|e| db_err(&format!("migration {}", i + 1), &e))?;
        tracing::info!(version = i + 1, "postgres-schema-migrated");
    }
    if found < known {
        let version = i32::try_from(known).unwrap_or(i32::MAX);
        tx.execute("DELETE FROM tether_schema", &[])
            .await
            .map_err(|e| db_err("cannot record the schema version", &e))?;
        tx.execute(
            "INSERT INTO tether_schema (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(|e| db_err("cannot record the schema version", &e))?;
    }
    tx.commit()
        .await
        .map_err(|e| db_err("cannot commit the schema", &e))
}

/// The first key past every key that starts with `prefix` (`None`: no bound).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A blob operation, in the batch's order.
enum BlobOp {
    Append {
        name: String,
        at: i64,
        bytes: Vec<u8>,
    },
    Delete {
        name: String,
    },
}

/// One batch, reduced to what the transaction writes.
#[derive(Default)]
struct Plan {
    /// Each key's last write in the batch (`None`: removed).
    keys: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    blobs: Vec<BlobOp>,
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Reads what a batch depends on (keys to truncate, blob lengths) inside its transaction and
/// reduces it to a [`Plan`], as the sled store builds its batch.
async fn plan(tx: &tokio_postgres::Transaction<'_>, ops: &[Op]) -> Result<Plan, JournalError> {
    let mut plan = Plan::default();
    let mut lengths: std::collections::HashMap<&LogName, u64> = Default::default();
    for op in ops {
        match op {
            Op::Append { log, seq, payload } => {
                let value = record::encode_record(log, *seq, payload);
                plan.keys.insert(record::record_key(log, *seq), Some(value));
            }
            Op::TruncateThrough { log, upto } => {
                let start = record::log_prefix(log);
                let end = record::record_key(log, *upto);
                let rows = tx
                    .query(
                        "SELECT key FROM tether_journal WHERE key >= $1 AND key <= $2",
                        &[&start, &end],
                    )
                    .await
                    .map_err(|e| db_err("cannot scan for truncation", &e))?;
                for row in rows {
                    plan.keys.insert(row.get(0), None);
                }
            }
            Op::PutMeta { key, value } => {
                let v = record::encode_meta(key, value);
                plan.keys.insert(record::meta_key(key), Some(v));
            }
            Op::DeleteMeta { key } => {
                plan.keys.insert(record::meta_key(key), None);
            }
            Op::AppendBlob { name, bytes } => {
                let at = match lengths.get(name) {
                    Some(len) => *len,
                    None => committed_len(tx, name).await?,
                };
                let len = at + bytes.len() as u64;
                lengths.insert(name, len);
                let key = blobs::length_key(name);
                plan.keys.insert(
                    record::meta_key(&key),
                    Some(record::encode_meta(&key, &blobs::encode_length(len))),
                );
                plan.blobs.push(BlobOp::Append {
                    name: name.as_str().to_owned(),
                    at: to_i64(at),
                    bytes: bytes.clone(),
                });
            }
            Op::DeleteBlob { name } => {
                lengths.insert(name, 0);
                plan.keys
                    .insert(record::meta_key(&blobs::length_key(name)), None);
                plan.blobs.push(BlobOp::Delete {
                    name: name.as_str().to_owned(),
                });
            }
        }
    }
    Ok(plan)
}

/// The committed length of blob `name` (0 for none), read with `client`.
async fn committed_len<C: tokio_postgres::GenericClient>(
    client: &C,
    name: &LogName,
) -> Result<u64, JournalError> {
    let key = blobs::length_key(name);
    let k = record::meta_key(&key);
    let row = client
        .query_opt("SELECT value FROM tether_journal WHERE key = $1", &[&k])
        .await
        .map_err(|e| db_err("cannot read a blob's length", &e))?;
    let Some(row) = row else {
        return Ok(0);
    };
    let v: Vec<u8> = row.get(0);
    let corrupt = |reason| JournalError::Corrupt {
        path: PathBuf::from("postgres"),
        key: key.clone(),
        reason,
    };
    let raw = record::decode_meta(&k, &v).map_err(corrupt)?;
    blobs::decode_length(raw).map_err(corrupt)
}

async fn apply(shared: Arc<Shared>, ops: Vec<Op>) -> Result<(), JournalError> {
    let mut guard = shared.client(&shared.writer).await?;
    let client = guard.as_mut().ok_or(JournalError::Closed)?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| db_err("cannot begin", &e))?;
    // Fencing: the lease row is read (and locked against a takeover) inside the transaction,
    // so a node that lost it can never commit again.
    let lease = shared
        .lease
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if let Some(lease) = &lease {
        let held = tx
            .query_opt(
                "SELECT 1 FROM tether_lease WHERE id = 1 AND holder = $1 AND epoch = $2
                 AND expires_at > now() FOR SHARE",
                &[&lease.holder, &lease.epoch],
            )
            .await
            .map_err(|e| db_err("cannot check the lease", &e))?;
        if held.is_none() {
            return Err(fenced(lease));
        }
    }
    let plan = plan(&tx, &ops).await?;
    for blob in &plan.blobs {
        match blob {
            BlobOp::Append { name, at, bytes } => tx
                .execute(
                    "INSERT INTO tether_blobs (name, at, bytes) VALUES ($1, $2, $3)
                     ON CONFLICT (name, at) DO UPDATE SET bytes = excluded.bytes",
                    &[name, at, bytes],
                )
                .await
                .map_err(|e| db_err("cannot append to a blob", &e))?,
            BlobOp::Delete { name } => tx
                .execute("DELETE FROM tether_blobs WHERE name = $1", &[name])
                .await
                .map_err(|e| db_err("cannot delete a blob", &e))?,
        };
    }
    let (mut put_keys, mut put_values, mut gone) = (Vec::new(), Vec::new(), Vec::new());
    for (k, v) in plan.keys {
        match v {
            Some(v) => {
                put_keys.push(k);
                put_values.push(v);
            }
            None => gone.push(k),
        }
    }
    if !gone.is_empty() {
        tx.execute("DELETE FROM tether_journal WHERE key = ANY($1)", &[&gone])
            .await
            .map_err(|e| db_err("cannot delete", &e))?;
    }
    if !put_keys.is_empty() {
        tx.execute(
            "INSERT INTO tether_journal (key, value) SELECT * FROM unnest($1::bytea[], $2::bytea[])
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&put_keys, &put_values],
        )
        .await
        .map_err(|e| db_err("cannot write", &e))?;
    }
    tx.commit().await.map_err(|e| {
        // No answer to COMMIT: the batch may or may not be durable.
        let mut err = db_err("commit", &e);
        if let JournalError::Io { reason, .. } = &mut err {
            reason.push_str(" (the commit's outcome is unknown)");
        }
        err
    })
}

impl Store for PgStore {
    fn apply(&self, ops: &[Op]) -> Result<(), JournalError> {
        let ops = ops.to_vec();
        self.run(move |shared| apply(shared, ops))?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Every applied batch was committed with `synchronous_commit` on: nothing is left to do.
    fn sync(&self) -> Result<(), JournalError> {
        Ok(())
    }

    fn scan(&self, prefix: &[u8]) -> Result<Rows, JournalError> {
        let start = prefix.to_vec();
        self.run(move |shared| async move {
            let guard = shared.client(shared.reader()).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            let rows = match prefix_end(&start) {
                Some(end) => client
                    .query(
                        "SELECT key, value FROM tether_journal WHERE key >= $1 AND key < $2 ORDER BY key",
                        &[&start, &end],
                    )
                    .await,
                None => client
                    .query(
                        "SELECT key, value FROM tether_journal WHERE key >= $1 ORDER BY key",
                        &[&start],
                    )
                    .await,
            }
            .map_err(|e| db_err("cannot scan", &e))?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn scan_from(&self, from: &[u8], prefix: &[u8], limit: usize) -> Result<Rows, JournalError> {
        let (from, prefix) = (from.to_vec(), prefix.to_vec());
        let limit = to_i64(limit as u64);
        self.run(move |shared| async move {
            let guard = shared.client(shared.reader()).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            let rows = match prefix_end(&prefix) {
                Some(end) => client
                    .query(
                        "SELECT key, value FROM tether_journal WHERE key >= $1 AND key < $2 ORDER BY key LIMIT $3",
                        &[&from, &end, &limit],
                    )
                    .await,
                None => client
                    .query(
                        "SELECT key, value FROM tether_journal WHERE key >= $1 ORDER BY key LIMIT $2",
                        &[&from, &limit],
                    )
                    .await,
            }
            .map_err(|e| db_err("cannot read", &e))?;
            Ok(rows
                .into_iter()
                .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
                .filter(|(k, _)| k.starts_with(&prefix))
                .collect())
        })
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, JournalError> {
        let key = key.to_vec();
        self.run(move |shared| async move {
            let guard = shared.client(shared.reader()).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            let row = client
                .query_opt("SELECT value FROM tether_journal WHERE key = $1", &[&key])
                .await
                .map_err(|e| db_err("cannot read", &e))?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn read_blob(&self, name: &LogName, offset: u64, max: usize) -> Result<Vec<u8>, JournalError> {
        let name = name.clone();
        self.run(move |shared| async move {
            let guard = shared.client(shared.reader()).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            // Bytes are written in the transaction that commits the length they end at.
            let committed = committed_len(client, &name).await?;
            let end = committed.min(offset.saturating_add(max as u64));
            if offset >= end {
                return Ok(Vec::new());
            }
            let rows = client
                .query(
                    "SELECT at, bytes FROM tether_blobs WHERE name = $1 AND at < $2
                     AND at + octet_length(bytes) > $3 ORDER BY at",
                    &[&name.as_str(), &to_i64(end), &to_i64(offset)],
                )
                .await
                .map_err(|e| db_err("cannot read a blob", &e))?;
            let mut out = Vec::with_capacity((end - offset) as usize);
            for row in rows {
                let at = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
                let bytes: Vec<u8> = row.get(1);
                let from = offset.max(at);
                let to = end.min(at + bytes.len() as u64);
                if from >= to || from != offset + out.len() as u64 {
                    break;
                }
                let (a, b) = ((from - at) as usize, (to - at) as usize);
                out.extend_from_slice(&bytes[a..b]);
            }
            Ok(out)
        })
    }

    fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// The writer's connection (made again if it was lost) answers a query.
    fn probe(&self) -> Result<(), JournalError> {
        self.run(|shared| async move {
            let guard = shared.client(&shared.writer).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| db_err("probe", &e))?;
            Ok(())
        })
    }
}

impl Drop for PgStore {
    /// Without waiting: the store may be dropped on an async thread, where a runtime may not
    /// block.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_past_every_key_it_starts() {
        assert_eq!(prefix_end(b"L/a"), Some(b"L/b".to_vec()));
        assert_eq!(prefix_end(&[b'M', 0xff]), Some(vec![b'N']));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }
}
