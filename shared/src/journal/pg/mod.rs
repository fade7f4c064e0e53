//! The PostgreSQL store: the journal of a server that shares its state with other nodes.
//!
//! Every entry the sled store keeps under a key (records, meta, blob lengths) is a row of
//! `tether_journal (key bytea primary key, value bytea)`, encoded exactly as in sled (each with
//! its CRC), so recovery validates both stores alike. Blob bytes are rows of `tether_blobs
//! (name, at, bytes)`, one per append, never read past the length committed under its key.
//!
//! [`Store::apply`] is one transaction per batch: the batch's keys are reduced to their last
//! write (as sled's batches are), then written with one delete of the ranges truncated, one
//! insert of the records, one upsert of the rest and one delete; blob appends and deletions run
//! in their order. Statements are prepared once per connection, and sent in two flights
//! (`BEGIN` with the checks of the lease and the claims; then every write with the `COMMIT`),
//! each pipelined: the database runs them in order, and a transaction waits for two round
//! trips, not one per statement. It
//! returns only once `COMMIT` does, with `synchronous_commit` on (checked at open, as `fsync`
//! is): [`Store::sync`] has nothing left to do. When the
//! database goes away mid-batch (a `COMMIT` that got no answer included), the same planned
//! writes are tried again on a new connection until they commit: see [`apply`].
//!
//! The schema is created and migrated at open ([`MIGRATIONS`], numbered in `tether_schema`),
//! under an advisory lock so that two nodes starting at once migrate once. A database migrated
//! by a newer server is refused.
//!
//! The client is async (tokio-postgres) on a runtime of its own; the store's blocking calls
//! hand their work to it and wait, so they may be made from any thread, an actix one included.
//!
//! - [`connection`]: making, keeping and remaking connections (TLS by `ca_file`); errors.
//! - [`schema`]: migrations and the settings checked at open.
//! - [`lease`]: the lease that makes one node active, and fences the others.
//! - [`claims`]: which node serves each agent and relay, and the fences of their commits.
//! - [`nodes`]: the nodes as each last noted itself (role, release, when).

mod claims;
mod connection;
mod hints;
mod lease;
mod nodes;
mod schema;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use connection::{db_err, described, refuse, wait_on, Conn, Connector, Shared, Slot};
pub use hints::Hint;
pub use lease::{Lease, LeaseHolder};
pub use nodes::NodeSeen;
pub use schema::MIGRATIONS;
use schema::{check_settings, migrate};

use crate::journal::record::{self, LogName};
use crate::journal::store::{Fenced, Row, Rows, Store};
use crate::journal::{blobs, JournalError, Op};

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

/// The PostgreSQL store.
pub struct PgStore {
    /// `None` only while it is being dropped.
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
    syncs: AtomicU64,
    /// Claims asked of the batcher (see [`claims`]).
    claims: tokio::sync::mpsc::UnboundedSender<claims::ClaimRequest>,
    /// A member node's store: it commits only under claims (see [`PgStore::serve_as_member`]).
    member: std::sync::atomic::AtomicBool,
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
                waiting: std::sync::Mutex::new(None),
                hinted: Default::default(),
                outbox: Default::default(),
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
        let shared = Arc::new(shared);
        let (claims, asked) = tokio::sync::mpsc::unbounded_channel();
        runtime.spawn(claims::batcher(shared.clone(), asked));
        runtime.spawn(hints::send(shared.connector.clone(), shared.outbox.clone()));
        Ok(PgStore {
            runtime: Some(runtime),
            shared,
            syncs: AtomicU64::new(0),
            claims,
            member: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// From now on (a node that does not hold the lease, serving agents as a member of the
    /// cluster) this store commits only under claims: whatever else a journal asks of it is
    /// refused with [`JournalError::NotActive`], and nothing of it is written.
    pub fn serve_as_member(&self) {
        self.member.store(true, Ordering::Relaxed);
    }

    /// From now on every batch that writes meta keys under one of `prefixes` sends a hint (see
    /// [`hints`]): the prefix, on channel `tether_journal`, once the batch committed.
    pub fn hint_writes_under(&self, prefixes: &[&str]) {
        *self
            .shared
            .hinted
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            prefixes.iter().map(|p| (*p).to_owned()).collect();
    }

    /// The hints of every node's batches (see [`Self::hint_writes_under`]), as they come, for
    /// as long as the receiver is kept; listened for on a connection of their own, made again
    /// whenever it is lost (hints sent meanwhile are missed: they are only hints).
    pub fn hints(&self) -> tokio::sync::mpsc::UnboundedReceiver<String> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if let Some(runtime) = &self.runtime {
            runtime.spawn(hints::listen(self.shared.connector.clone(), tx));
        }
        rx
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
    /// Records appended (key, value): new keys, almost always, so they are inserted plainly;
    /// an insert that meets one already there (a try made again) is made again as an upsert.
    records: (Vec<Vec<u8>>, Vec<Vec<u8>>),
    /// Other keys written (meta, blob lengths), each with its last value in the batch.
    put: (Vec<Vec<u8>>, Vec<Vec<u8>>),
    /// Keys removed.
    gone: Vec<Vec<u8>>,
    /// Ranges of keys removed (first, last), before any other write of the batch.
    truncated: (Vec<Vec<u8>>, Vec<Vec<u8>>),
    blobs: Vec<BlobOp>,
    /// A plain insert of `records` met a key already there: they are upserted.
    overwrite_records: bool,
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Reads what a batch depends on (blob lengths) inside its transaction and
/// reduces it to a [`Plan`], as the sled store builds its batch.
async fn plan<'a>(
    tx: &tokio_postgres::Client,
    ops: impl IntoIterator<Item = &'a Op>,
) -> Result<Plan, Failure> {
    let mut plan = Plan::default();
    // Each key's last write in the batch (`None`: removed), and whether it is a record's.
    let mut keys: BTreeMap<Vec<u8>, (Option<Vec<u8>>, bool)> = BTreeMap::new();
    let mut lengths: std::collections::HashMap<&LogName, u64> = Default::default();
    for op in ops {
        match op {
            Op::Append { log, seq, payload } => {
                let value = record::encode_record(log, *seq, payload);
                keys.insert(record::record_key(log, *seq), (Some(value), true));
            }
            Op::TruncateThrough { log, upto } => {
                // The rows in the database go in one statement for every range, before the
                // batch's other writes; what this batch wrote there before goes here.
                let start = record::log_prefix(log);
                let end = record::record_key(log, *upto);
                let earlier: Vec<Vec<u8>> = keys
                    .range(start.clone()..=end.clone())
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in earlier {
                    keys.remove(&k);
                }
                plan.truncated.0.push(start);
                plan.truncated.1.push(end);
            }
            Op::PutMeta { key, value } => {
                let v = record::encode_meta(key, value);
                keys.insert(record::meta_key(key), (Some(v), false));
            }
            Op::DeleteMeta { key } => {
                keys.insert(record::meta_key(key), (None, false));
            }
            Op::AppendBlob { name, bytes } => {
                let at = match lengths.get(name) {
                    Some(len) => *len,
                    None => committed_len(tx, name).await?,
                };
                let len = at + bytes.len() as u64;
                lengths.insert(name, len);
                let key = blobs::length_key(name);
                keys.insert(
                    record::meta_key(&key),
                    (
                        Some(record::encode_meta(&key, &blobs::encode_length(len))),
                        false,
                    ),
                );
                plan.blobs.push(BlobOp::Append {
                    name: name.as_str().to_owned(),
                    at: to_i64(at),
                    bytes: bytes.clone(),
                });
            }
            Op::DeleteBlob { name } => {
                lengths.insert(name, 0);
                keys.insert(record::meta_key(&blobs::length_key(name)), (None, false));
                plan.blobs.push(BlobOp::Delete {
                    name: name.as_str().to_owned(),
                });
            }
        }
    }
    for (k, (v, is_record)) in keys {
        let into = if is_record {
            &mut plan.records
        } else {
            &mut plan.put
        };
        match v {
            Some(v) => {
                into.0.push(k);
                into.1.push(v);
            }
            None => plan.gone.push(k),
        }
    }
    Ok(plan)
}

/// A page of rows from a key on, under a prefix with an end (`$2`): the values' running total
/// says where the byte budget ends (the first row always fits), so no value past it leaves the
/// database.
const SCAN_PAGE: &str = "SELECT key, value FROM (
       SELECT key, value,
              sum(octet_length(value)) OVER (ORDER BY key) - octet_length(value) AS before
       FROM tether_journal WHERE key >= $1 AND key < $2 ORDER BY key LIMIT $3
     ) AS page WHERE before = 0 OR before < $4 ORDER BY key";
/// [`SCAN_PAGE`] under a prefix with no end (bytes 0xFF only).
const SCAN_PAGE_OPEN: &str = "SELECT key, value FROM (
       SELECT key, value,
              sum(octet_length(value)) OVER (ORDER BY key) - octet_length(value) AS before
       FROM tether_journal WHERE key >= $1 AND $2::bytea IS NULL ORDER BY key LIMIT $3
     ) AS page WHERE before = 0 OR before < $4 ORDER BY key";
/// Every row from a key on, under a prefix with an end (`$2`).
const SCAN_ALL: &str =
    "SELECT key, value FROM tether_journal WHERE key >= $1 AND key < $2 ORDER BY key";
/// [`SCAN_ALL`] under a prefix with no end.
const SCAN_ALL_OPEN: &str =
    "SELECT key, value FROM tether_journal WHERE key >= $1 AND $2::bytea IS NULL ORDER BY key";
/// The first rows under each of several prefixes (`$1`, each ending before `$2`), each an
/// index scan; the values' running total over all of them says where the byte budget ends.
const SCAN_PREFIXES: &str = "SELECT key, value FROM (
       SELECT key, value,
              sum(octet_length(value)) OVER (ORDER BY key) - octet_length(value) AS before
       FROM unnest($1::bytea[], $2::bytea[]) AS r(first, after)
       CROSS JOIN LATERAL (
         SELECT key, value FROM tether_journal
         WHERE key >= r.first AND key < r.after
         ORDER BY key LIMIT $3) AS j
     ) AS page WHERE before = 0 OR before < $4 ORDER BY key";
const GET_KEY: &str = "SELECT value FROM tether_journal WHERE key = $1";

/// The rows from key `from` on whose keys start with `prefix`, in key order: one `page` of
/// them, or all. Both bounds are given where the prefix has an end, so the index scan stops
/// there.
async fn rows_in(
    conn: &mut Conn,
    from: &[u8],
    prefix: &[u8],
    page: Option<Page>,
) -> Result<Rows, JournalError> {
    let end = prefix_end(prefix);
    let sql = match (page.is_some(), end.is_some()) {
        (true, true) => SCAN_PAGE,
        (true, false) => SCAN_PAGE_OPEN,
        (false, true) => SCAN_ALL,
        (false, false) => SCAN_ALL_OPEN,
    };
    let rows = match page {
        Some(page) => {
            conn.read(sql, &[&from, &end, &page.rows, &page.bytes])
                .await
        }
        None => conn.read(sql, &[&from, &end]).await,
    }
    .map_err(|e| db_err("cannot read", &e))?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
        .filter(|(k, _)| k.starts_with(prefix))
        .collect())
}

/// How much one read may bring back: rows, and bytes of values (see `Store::scan_from`).
#[derive(Debug, Clone, Copy)]
struct Page {
    rows: i64,
    bytes: i64,
}

impl Page {
    fn new(rows: usize, bytes: usize) -> Page {
        Page {
            rows: to_i64(rows as u64),
            bytes: to_i64(bytes as u64),
        }
    }
}

/// Keys, in a statement's parameter.
type Keys = Vec<Vec<u8>>;

/// The key ranges [first, end) of `prefixes` (each once), the bounds of their index scans
/// (`None`: a prefix of bytes 0xFF only has no end: never one of ours, read in turn if need
/// be).
fn ranges(prefixes: &[Vec<u8>]) -> Option<(Keys, Keys)> {
    let firsts = crate::journal::store::distinct(prefixes);
    let ends = firsts
        .iter()
        .map(|p| prefix_end(p))
        .collect::<Option<Vec<Vec<u8>>>>()?;
    Some((firsts, ends))
}

/// [`Store::scan_prefixes`] of the ranges [`ranges`] gave.
async fn scan_ranges(
    shared: &Shared,
    firsts: Keys,
    ends: Keys,
    page: Page,
) -> Result<Rows, JournalError> {
    let mut guard = shared.client(shared.reader()).await?;
    let conn = guard.as_mut().ok_or(JournalError::Closed)?;
    let rows = conn
        .read(SCAN_PREFIXES, &[&firsts, &ends, &page.rows, &page.bytes])
        .await
        .map_err(|e| db_err("cannot read", &e))?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
        .collect())
}

/// The committed length of blob `name` (0 for none), read with `client`.
async fn committed_len<C: tokio_postgres::GenericClient>(
    client: &C,
    name: &LogName,
) -> Result<u64, Failure> {
    let key = blobs::length_key(name);
    let k = record::meta_key(&key);
    let row = client
        .query_opt("SELECT value FROM tether_journal WHERE key = $1", &[&k])
        .await
        .map_err(|e| Failure::of("cannot read a blob's length", &e))?;
    let Some(row) = row else {
        return Ok(0);
    };
    let v: Vec<u8> = row.get(0);
    let corrupt = |reason| {
        Failure::refused(JournalError::Corrupt {
            path: PathBuf::from("postgres"),
            key: key.clone(),
            reason,
        })
    };
    let raw = record::decode_meta(&k, &v).map_err(corrupt)?;
    blobs::decode_length(raw).map_err(corrupt)
}

/// The first pause before a batch the database did not take is tried again; it doubles up to
/// [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A try of a batch that failed, and what is done next.
struct Failure {
    error: JournalError,
    next: Next,
    /// The database answered the statement with this error (it ran, and failed): inside a
    /// transaction, which is then aborted. Otherwise it got no answer, or was never sent.
    answered: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Next {
    /// The database, or the way to it, went away (no fault of the batch): tried again once
    /// it is back.
    Wait,
    /// Tried again at once (the plan was changed to get past what failed).
    Again,
    /// Refused: the batch fails.
    Fail,
}

impl Failure {
    fn of(context: &str, e: &tokio_postgres::Error) -> Failure {
        Failure {
            error: db_err(context, e),
            next: if transient(e) { Next::Wait } else { Next::Fail },
            answered: e.as_db_error().is_some(),
        }
    }

    fn refused(error: JournalError) -> Failure {
        Failure {
            error,
            next: Next::Fail,
            answered: false,
        }
    }
}

/// Whether `e` says the database or the connection went away (it shut down, crashed, or cannot
/// take connections yet; the socket broke), rather than that the statement was refused.
fn transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // No SQLSTATE: the client's own failure, an I/O one (a broken socket).
        None => {
            e.as_db_error().is_none()
                && std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
        }
        Some(code) => {
            let code = code.code();
            code.starts_with("08")
                // (25P03: a session idle in a transaction too long was ended.)
                || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "25P03")
        }
    }
}

/// Commits `ops` as one transaction, trying again (on a new connection, with the same plan)
/// each time the database goes away, until it takes the batch or refuses it.
///
/// The plan is made once, by the first try that gets that far, and every later try writes
/// exactly the same rows: upserts of the same values, deletions of the same keys, blob bytes at
/// the same offsets. So a try whose `COMMIT` got no answer (the batch may or may not be
/// durable) is resolved by the next one, which leaves the database the same either way; and a
/// batch is answered (and so acknowledged) only once a `COMMIT` of it returned. Meanwhile no
/// other batch runs (the writer is serial) and no other node commits (the lease, checked by
/// every try), so the plan's reads stay true.
///
/// Requests fenced by a claim ([`Fenced`]) are checked in each try: those whose claim moved on
/// are left out of the plan, and the returned flags say which.
async fn apply(shared: &Shared, ops: &[Op], fenced: &[Fenced]) -> Result<Vec<bool>, JournalError> {
    let mut attempt = Attempt::default();
    let mut pause = RETRY_MIN;
    let mut tries = 0u32;
    let mut waited = false;
    loop {
        tries += 1;
        match try_batch(shared, ops, fenced, &mut attempt).await {
            Ok(out) => {
                if waited {
                    tracing::info!(tries, "postgres-batch-committed-after-retry");
                    set_waiting(shared, None);
                }
                return Ok(out);
            }
            Err(Failure {
                next: Next::Again, ..
            }) => {}
            Err(f) if f.next == Next::Wait => {
                if !waited {
                    tracing::error!(error = %f.error, "postgres-batch-failed-retrying");
                    waited = true;
                }
                set_waiting(
                    shared,
                    Some(format!("{} (tried {tries} times, trying again)", f.error)),
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_MAX);
            }
            Err(f) => {
                set_waiting(shared, None);
                return Err(f.error);
            }
        }
    }
}

fn set_waiting(shared: &Shared, why: Option<String>) {
    *shared
        .waiting
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = why;
}

const CHECK_LEASE: &str = "SELECT 1 FROM tether_lease WHERE id = 1 AND holder = $1 AND epoch = $2
     AND expires_at > now() FOR SHARE";
const APPEND_BLOB: &str = "INSERT INTO tether_blobs (name, at, bytes) VALUES ($1, $2, $3)
     ON CONFLICT (name, at) DO UPDATE SET bytes = excluded.bytes";
const DELETE_BLOB: &str = "DELETE FROM tether_blobs WHERE name = $1";
const DELETE_KEYS: &str = "DELETE FROM tether_journal WHERE key = ANY($1)";
/// Every key within any of the ranges (first, last): each range is an index scan.
const DELETE_RANGES: &str = "DELETE FROM tether_journal WHERE key = ANY(ARRAY(
       SELECT j.key FROM unnest($1::bytea[], $2::bytea[]) AS r(first, last)
       CROSS JOIN LATERAL (SELECT key FROM tether_journal
                           WHERE key >= r.first AND key <= r.last) AS j))";
const PUT_KEYS: &str =
    "INSERT INTO tether_journal (key, value) SELECT * FROM unnest($1::bytea[], $2::bytea[])
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";
/// New keys only: cheaper than an upsert, which probes the index before it inserts.
const INSERT_KEYS: &str =
    "INSERT INTO tether_journal (key, value) SELECT * FROM unnest($1::bytea[], $2::bytea[])";
/// SQLSTATE `unique_violation`.
const UNIQUE_VIOLATION: &str = "23505";

/// Statements the writer prepares on its connection.
const WRITER_STATEMENTS: [&str; 8] = [
    CHECK_LEASE,
    claims::CHECK_CLAIMS,
    APPEND_BLOB,
    DELETE_BLOB,
    DELETE_KEYS,
    DELETE_RANGES,
    PUT_KEYS,
    INSERT_KEYS,
];

/// One try of a batch: its transaction, with the plan made in it if `plan` has none yet.
/// What the tries of one batch carry from one to the next.
#[derive(Default)]
struct Attempt {
    /// The plan, made by the first try that got that far, and which fenced requests it leaves
    /// out.
    plan: Option<(Plan, Vec<bool>)>,
    /// The transaction ids of the fenced tries whose `COMMIT` got no answer: whether one took
    /// effect is asked of the database if a later try finds a claim moved on.
    unanswered: Vec<String>,
}

/// Where a try whose `COMMIT` got no answer stands (`pg_xact_status`).
async fn outcome(client: &tokio_postgres::Client, xid: &str) -> Result<Option<String>, Failure> {
    let row = client
        .query_one("SELECT pg_xact_status($1::text::xid8)", &[&xid])
        .await
        .map_err(|e| Failure::of("cannot ask how a commit ended", &e))?;
    Ok(row.get(0))
}

/// One try of a batch on the writer's connection: [`transaction`]; a transaction it left open
/// (it failed before its `COMMIT`) is rolled back, so that the connection serves the next try.
async fn try_batch(
    shared: &Shared,
    ops: &[Op],
    fenced: &[Fenced],
    attempt: &mut Attempt,
) -> Result<Vec<bool>, Failure> {
    let mut guard = shared
        .client(&shared.writer)
        .await
        .map_err(|error| Failure {
            error,
            next: Next::Wait,
            answered: false,
        })?;
    let conn = guard
        .as_mut()
        .ok_or(Failure::refused(JournalError::Closed))?;
    let tried = transaction(shared, conn, ops, fenced, attempt).await;
    if tried.is_err() && !conn.is_closed() {
        // Outside a transaction (its COMMIT ended it), only a warning.
        if let Err(e) = conn.batch_execute("ROLLBACK").await {
            tracing::warn!(error = %described(&e), "postgres-rollback-failed");
        }
    }
    tried
}

/// The transaction of one try, in two flights: `BEGIN` with the checks of the lease and the
/// claims; then every write with the `COMMIT`. The database runs each flight's statements in
/// order without waiting for the client between them: a statement that fails aborts the
/// transaction, and the `COMMIT` after it then rolls it back (nothing is written). A write the
/// client could not even send (its first poll failed) keeps the `COMMIT` from being sent.
async fn transaction(
    shared: &Shared,
    conn: &mut Conn,
    ops: &[Op],
    fenced: &[Fenced],
    attempt: &mut Attempt,
) -> Result<Vec<bool>, Failure> {
    let mut prepared = Vec::with_capacity(WRITER_STATEMENTS.len());
    for sql in WRITER_STATEMENTS {
        let statement = conn.prepared(sql).await;
        prepared.push(statement.map_err(|e| Failure::of("cannot prepare", &e))?);
    }
    let [check_lease, check_claims, append_blob, delete_blob, delete_keys, delete_ranges, put_keys, insert_keys] =
        <[_; WRITER_STATEMENTS.len()]>::try_from(prepared)
            .map_err(|_| Failure::refused(JournalError::Closed))?;
    let tx: &tokio_postgres::Client = conn;
    let begin = async {
        tx.batch_execute("BEGIN")
            .await
            .map_err(|e| Failure::of("cannot begin", &e))
    };
    // Fencing: the lease row is read (and locked against a takeover) inside the transaction,
    // so a node that lost it can never commit again; the claims of the fenced requests alike.
    // Both in the flight of the `BEGIN`.
    let lease = shared.held_lease();
    let held = async {
        match &lease {
            Some(lease) => tx
                .query_opt(&check_lease, &[&lease.holder, &lease.epoch])
                .await
                .map(|row| row.is_some())
                .map_err(|e| Failure::of("cannot check the lease", &e)),
            None => Ok(true),
        }
    };
    let checked = async {
        match fenced.is_empty() {
            true => Ok((Vec::new(), None)),
            false => claims::left_out(tx, &check_claims, fenced)
                .await
                .map(|checked| (checked.out, checked.xid)),
        }
    };
    // Polled in this order, so sent in it.
    let (begun, held, checked) = futures_util::future::join3(begin, held, checked).await;
    begun?;
    if let (false, Some(lease)) = (held?, &lease) {
        return Err(Failure::refused(lease::fenced(lease)));
    }
    let (out, checked_xid) = checked?;
    // A try made again writes what the first one planned, so that a try whose COMMIT got no
    // answer is settled either way. But if a claim the plan writes under moved on meanwhile, it
    // may not be written now: the plan is made again without it, once it is known that no
    // earlier try took effect (a try that failed before its COMMIT was rolled back).
    let moved = attempt.plan.as_ref().is_some_and(|(_, then)| {
        out.iter()
            .zip(then.iter())
            .any(|(now, then)| *now && !*then)
    });
    // Earlier tries whose COMMIT got no answer are asked about first: one that committed
    // settles the batch, and those rolled back are forgotten, so that what is remembered stays
    // what is still unknown however often the database goes away.
    if !attempt.unanswered.is_empty() {
        let asked = std::mem::take(&mut attempt.unanswered);
        let mut unknown = Vec::with_capacity(asked.len());
        for xid in &asked {
            match outcome(tx, xid).await {
                Ok(Some(o)) if o == "committed" => {
                    // Nothing of this try is written: its transaction ends here.
                    tx.batch_execute("ROLLBACK")
                        .await
                        .map_err(|e| Failure::of("cannot roll back", &e))?;
                    let (_, then) = attempt.plan.take().unwrap_or_default();
                    return Ok(then);
                }
                Ok(Some(o)) if o == "aborted" => {}
                Ok(o) => unknown.push((xid.clone(), o.is_some())),
                Err(f) => {
                    // Asked again at the next try.
                    attempt.unanswered = asked;
                    return Err(f);
                }
            }
        }
        if moved {
            if unknown
                .iter()
                .any(|(_, known_to_the_database)| !known_to_the_database)
            {
                return Err(Failure::refused(JournalError::Database {
                    reason: "the database went away during a commit, and a claim the batch was written under was taken meanwhile: the batch may or may not have been written".into(),
                }));
            }
            if !unknown.is_empty() {
                attempt.unanswered = unknown.into_iter().map(|(x, _)| x).collect();
                return Err(Failure {
                    error: JournalError::Database {
                        reason: "an earlier try of this batch is still in progress".into(),
                    },
                    next: Next::Wait,
                    answered: false,
                });
            }
        }
        attempt.unanswered = unknown.into_iter().map(|(x, _)| x).collect();
    }
    if moved {
        // No earlier try took effect: the plan is made again without the claims moved on.
        attempt.plan = None;
    }
    let (plan, planned_out) = match &mut attempt.plan {
        Some(plan) => plan,
        none if out.iter().any(|o| *o) => {
            let kept = claims::kept(ops, fenced, &out);
            none.insert((self::plan(tx, kept).await?, out.clone()))
        }
        none => none.insert((self::plan(tx, ops).await?, out.clone())),
    };
    let out = planned_out.clone();
    // Its id, needed only where a claim could move on before a try made again: read with the
    // claims, or (none of them found) on its own.
    let xid: Option<String> = match (fenced.is_empty(), checked_xid) {
        (true, _) => None,
        (false, Some(xid)) => Some(xid),
        (false, None) => Some(
            tx.query_one("SELECT pg_current_xact_id()::text", &[])
                .await
                .map_err(|e| Failure::of("cannot read the transaction id", &e))?
                .get(0),
        ),
    };
    // Every write in one flight, in the plan's order: the blobs' in the batch's, and the
    // truncations before the keys written (one may be written again after its range went).
    let mut writes: Vec<InFlight<'_>> = Vec::new();
    for blob in &plan.blobs {
        writes.push(match blob {
            BlobOp::Append { name, at, bytes } => Box::pin(async {
                tx.execute(&append_blob, &[name, at, bytes])
                    .await
                    .map_err(|e| Failure::of("cannot append to a blob", &e))
            }),
            BlobOp::Delete { name } => Box::pin(async {
                tx.execute(&delete_blob, &[name])
                    .await
                    .map_err(|e| Failure::of("cannot delete a blob", &e))
            }),
        });
    }
    let (first, last) = &plan.truncated;
    if !first.is_empty() {
        writes.push(Box::pin(async {
            tx.execute(&delete_ranges, &[first, last])
                .await
                .map_err(|e| Failure::of("cannot truncate", &e))
        }));
    }
    if !plan.gone.is_empty() {
        writes.push(Box::pin(async {
            tx.execute(&delete_keys, &[&plan.gone])
                .await
                .map_err(|e| Failure::of("cannot delete", &e))
        }));
    }
    if !plan.put.0.is_empty() {
        writes.push(Box::pin(async {
            tx.execute(&put_keys, &[&plan.put.0, &plan.put.1])
                .await
                .map_err(|e| Failure::of("cannot write", &e))
        }));
    }
    let overwrite = plan.overwrite_records;
    let (keys, values) = &plan.records;
    if !keys.is_empty() {
        let (put_keys, insert_keys) = (&put_keys, &insert_keys);
        writes.push(Box::pin(async move {
            let written = match overwrite {
                true => tx.execute(put_keys, &[keys, values]).await,
                false => tx.execute(insert_keys, &[keys, values]).await,
            };
            written.map_err(|e| match e.code().map(|c| c.code()) {
                // A try made again after its COMMIT got no answer: the next one upserts.
                Some(UNIQUE_VIOLATION) if !overwrite => Failure {
                    error: db_err("records already there", &e),
                    next: Next::Again,
                    answered: true,
                },
                _ => Failure::of("cannot append", &e),
            })
        }));
    }
    let hinted = hints::of(
        &shared
            .hinted
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
        &plan.put.0,
    );
    let commit = async {
        tx.batch_execute("COMMIT")
            .await
            .map_err(|e| Failure::of("commit", &e))
    };
    let (written, committed) = match in_flight_then(writes, commit).await {
        Ok(answers) => answers,
        // A write was not sent, nor the COMMIT: the transaction is open (rolled back by the
        // caller).
        Err(f) => return Err(f),
    };
    match (written, committed) {
        (Ok(()), Ok(())) => {}
        // A write the database refused aborted the transaction: its COMMIT rolled it back.
        (Err(f), _) if f.answered => {
            if f.next == Next::Again {
                plan.overwrite_records = true;
            }
            return Err(f);
        }
        // No answer to a write or to COMMIT (the connection went away): the batch may or may
        // not be durable; the next try settles it.
        (written, committed) => {
            attempt.unanswered.extend(xid);
            let mut f = match (written, committed) {
                (_, Err(f)) | (Err(f), _) => f,
                (Ok(()), Ok(())) => Failure::refused(JournalError::Closed),
            };
            if let JournalError::Io { reason, .. } = &mut f.error {
                reason.push_str(" (the commit's outcome is unknown)");
            }
            return Err(f);
        }
    }
    // Once it is durable: a listener that reads after the hint finds what it wrote.
    shared.outbox.post(hinted);
    Ok(out)
}

/// A statement of a flight (see [`in_flight_then`]).
type InFlight<'a> = std::pin::Pin<Box<dyn Future<Output = Result<u64, Failure>> + Send + 'a>>;

/// Runs `statements` on one connection as one flight, then `last` in it, sent only if every
/// statement was: each is sent right after the one before it, without waiting for its answer
/// (the database runs them in that order; the client pipelines what is asked of it
/// concurrently), then every answer is awaited. Returns the statements' answer (the first
/// failure, in order: the database ignores the statements after a failed one, until the
/// transaction ends) and `last`'s. Fails, sending
/// nothing more, if a statement could not be sent (its first poll failed: the client's own
/// failure, such as a value it cannot encode).
async fn in_flight_then(
    statements: Vec<InFlight<'_>>,
    last: impl Future<Output = Result<(), Failure>>,
) -> Result<(Result<(), Failure>, Result<(), Failure>), Failure> {
    use std::task::Poll;
    let mut pending: Vec<futures_util::future::MaybeDone<InFlight<'_>>> = statements
        .into_iter()
        .map(futures_util::future::maybe_done)
        .collect();
    // The first poll of each sends it.
    std::future::poll_fn(|cx| {
        for statement in pending.iter_mut() {
            let _ = std::pin::Pin::new(statement).poll(cx);
        }
        Poll::Ready(())
    })
    .await;
    for statement in pending.iter_mut() {
        if let futures_util::future::MaybeDone::Done(Err(f)) = statement {
            if !f.answered {
                return Err(std::mem::replace(f, Failure::refused(JournalError::Closed)));
            }
        }
    }
    let rest = async {
        let mut first: Result<(), Failure> = Ok(());
        for statement in pending.iter_mut() {
            std::pin::Pin::new(&mut *statement).await;
            if let Some(Err(f)) = std::pin::Pin::new(statement).take_output() {
                if first.is_ok() {
                    first = Err(f);
                }
            }
        }
        first
    };
    Ok(futures_util::future::join(rest, last).await)
}

impl Store for PgStore {
    fn apply(&self, ops: &[Op]) -> Result<(), JournalError> {
        self.apply_fenced(ops, &[]).map(|_| ())
    }

    fn apply_fenced(&self, ops: &[Op], fenced: &[Fenced]) -> Result<Vec<bool>, JournalError> {
        let runtime = self.runtime.as_ref().ok_or(JournalError::Closed)?;
        let out = if tokio::runtime::Handle::try_current().is_ok() {
            // On an async thread, which may not block on a runtime: the work is handed over.
            let (ops, fenced) = (ops.to_vec(), fenced.to_vec());
            self.run(move |shared| async move { apply(&shared, &ops, &fenced).await })?
        } else {
            // The writer's own thread: the batch is borrowed, not copied.
            runtime.block_on(apply(&self.shared, ops, fenced))?
        };
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(out)
    }

    fn waiting(&self) -> Option<String> {
        self.shared
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Every applied batch was committed with `synchronous_commit` on: nothing is left to do.
    fn sync(&self) -> Result<(), JournalError> {
        Ok(())
    }

    fn durable_on_apply(&self) -> bool {
        true
    }

    fn fenced_only(&self) -> bool {
        self.member.load(Ordering::Relaxed)
    }

    fn scan(&self, prefix: &[u8]) -> Result<Rows, JournalError> {
        let prefix = prefix.to_vec();
        self.run(move |shared| async move {
            let mut guard = shared.client(shared.reader()).await?;
            let conn = guard.as_mut().ok_or(JournalError::Closed)?;
            rows_in(conn, &prefix, &prefix, None).await
        })
    }

    fn scan_from(
        &self,
        from: &[u8],
        prefix: &[u8],
        limit: usize,
        max_bytes: usize,
    ) -> Result<Rows, JournalError> {
        let (from, prefix) = (from.to_vec(), prefix.to_vec());
        let page = Page::new(limit, max_bytes);
        self.run(move |shared| async move {
            let mut guard = shared.client(shared.reader()).await?;
            let conn = guard.as_mut().ok_or(JournalError::Closed)?;
            rows_in(conn, &from, &prefix, Some(page)).await
        })
    }

    fn scan_prefixes(
        &self,
        prefixes: &[Vec<u8>],
        limit: usize,
        max_bytes: usize,
    ) -> Result<Rows, JournalError> {
        match ranges(prefixes) {
            Some((firsts, ends)) => {
                let page = Page::new(limit, max_bytes);
                self.run(
                    move |shared| async move { scan_ranges(&shared, firsts, ends, page).await },
                )
            }
            None => crate::journal::store::scan_prefixes_in_turn(self, prefixes, limit, max_bytes),
        }
    }

    fn scan_ranges_then(
        &self,
        ranges: Vec<(Vec<u8>, Vec<u8>)>,
        limit: usize,
        max_bytes: usize,
        reply: Box<dyn FnOnce(Result<Rows, JournalError>) + Send>,
    ) {
        let mut ranges = ranges;
        ranges.sort();
        let ends = ranges
            .iter()
            .map(|(_, prefix)| prefix_end(prefix))
            .collect::<Option<Vec<Vec<u8>>>>();
        match (&self.runtime, ends) {
            (Some(runtime), Some(ends)) => {
                let firsts: Keys = ranges.into_iter().map(|(from, _)| from).collect();
                let (shared, page) = (self.shared.clone(), Page::new(limit, max_bytes));
                runtime.spawn(async move { reply(scan_ranges(&shared, firsts, ends, page).await) });
            }
            _ => reply(crate::journal::store::scan_ranges_in_turn(
                self, &ranges, limit, max_bytes,
            )),
        }
    }

    fn last_under(&self, prefix: &[u8]) -> Result<Option<Row>, JournalError> {
        let (from, end) = (prefix.to_vec(), prefix_end(prefix));
        self.run(move |shared| async move {
            let guard = shared.client(shared.reader()).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            let row = client
                .query_opt(
                    "SELECT key, value FROM tether_journal
                      WHERE key >= $1 AND ($2::bytea IS NULL OR key < $2)
                      ORDER BY key DESC LIMIT 1",
                    &[&from, &end],
                )
                .await
                .map_err(|e| db_err("cannot read", &e))?;
            Ok(row.map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1))))
        })
    }

    fn count(&self, prefix: &[u8], limit: usize) -> Result<usize, JournalError> {
        let from = prefix.to_vec();
        let end = prefix_end(prefix);
        let limit = to_i64(limit as u64);
        self.run(move |shared| async move {
            let guard = shared.client(shared.reader()).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            let row = client
                .query_one(
                    "SELECT count(*) FROM (SELECT 1 FROM tether_journal
                      WHERE key >= $1 AND ($2::bytea IS NULL OR key < $2) LIMIT $3) AS k",
                    &[&from, &end, &limit],
                )
                .await
                .map_err(|e| db_err("cannot count", &e))?;
            Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(usize::MAX))
        })
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, JournalError> {
        let key = key.to_vec();
        self.run(move |shared| async move {
            let mut guard = shared.client(shared.reader()).await?;
            let conn = guard.as_mut().ok_or(JournalError::Closed)?;
            let rows = conn
                .read(GET_KEY, &[&key])
                .await
                .map_err(|e| db_err("cannot read", &e))?;
            Ok(rows.first().map(|r| r.get(0)))
        })
    }

    fn read_blob(&self, name: &LogName, offset: u64, max: usize) -> Result<Vec<u8>, JournalError> {
        let name = name.clone();
        self.run(move |shared| async move {
            let guard = shared.client(shared.reader()).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            // Bytes are written in the transaction that commits the length they end at.
            let committed = committed_len(&**client, &name).await.map_err(|f| f.error)?;
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
