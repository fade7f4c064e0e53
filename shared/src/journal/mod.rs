//! The durable journal of one process: the `Journal` actor over sled.
//!
//! Everything a process must not lose (messages in both streams, watermarks, peer
//! incarnations, and on the server the job state those messages change) goes through
//! [`Journal`] as a batch of [`Op`]s. Batches from every producer are group-committed on the
//! journal's own thread (see [`writer`]): the reply to a [`Commit`] comes only after the flush
//! and `fdatasync` that cover it, so an ack sent after that reply is never a lie.
//!
//! At [`Journal::open`] every record is read back and checked (our checksum and sequence number
//! in each value, see [`record`]); damage is a [`JournalError::Corrupt`] naming the way out,
//! never a silent empty start. The journal's random *incarnation* is created at first open: a
//! new one tells peers this process lost its state.
//!
//! - [`record`]: key and value encodings, checksums (sans-IO).
//! - [`blobs`]: append-only blobs (step logs) in files of their own beside sled.
//! - [`store`]: the [`Store`] trait and the sled implementation.
//! - [`writer`]: the group-commit thread.

pub mod blobs;
mod compaction;
pub mod generation;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod record;
pub mod store;
pub mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

#[cfg(feature = "postgres")]
pub use pg::{Lease, LeaseHolder, NodeSeen, PgOptions, PgStore};
pub use record::LogName;
pub use store::{Fence, Fenced, SledOptions, SledStore, Store};
pub use writer::Committed;

use crate::protocol::Seq;
use writer::{Request, WriterStats};

/// Largest payload of one record.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// File beside sled's that repeats the incarnation (see [`Journal::open`]).
pub(crate) const MARKER_FILE: &str = "INCARNATION";
/// Meta key holding the journal's incarnation.
const INCARNATION_KEY: &str = "incarnation";

/// One change to the journal; a [`Commit`] applies a list of them atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Add a record to a log (replacing one with the same seq, which makes retries harmless).
    Append {
        log: LogName,
        seq: Seq,
        payload: Vec<u8>,
    },
    /// Remove every record of `log` up to and including `upto` (acknowledged messages).
    TruncateThrough {
        log: LogName,
        upto: Seq,
    },
    /// Set a small named value (watermarks, incarnations, state).
    PutMeta {
        key: String,
        value: Vec<u8>,
    },
    DeleteMeta {
        key: String,
    },
    /// Add bytes at the end of a blob (a step's log), kept in a file of its own so that
    /// deleting it frees its space at once (see [`blobs`]).
    AppendBlob {
        name: LogName,
        bytes: Vec<u8>,
    },
    /// Delete a blob; its file goes once the deletion is durable.
    DeleteBlob {
        name: LogName,
    },
}

/// A page of meta entries (see [`JournalHandle::scan_meta_from`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaPage {
    /// Keys (without the meta prefix) and values, in key order.
    pub entries: Vec<(String, Vec<u8>)>,
    /// The page reached its bound: entries may follow.
    pub full: bool,
}

/// What [`JournalHandle::read_meta_and_logs_async`] read: meta entries (keys without the meta
/// prefix) and records with their log, each in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaAndLogs {
    pub meta: Vec<(String, Vec<u8>)>,
    pub records: Vec<(LogName, Record)>,
}

/// A record read back from a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: Seq,
    pub payload: Vec<u8>,
}

/// What recovery found at open.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovered {
    pub incarnation: String,
    /// Whether the journal was created by this open (no earlier state).
    pub created: bool,
    pub logs: BTreeMap<String, LogSummary>,
    pub meta_entries: usize,
}

/// The records one log holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSummary {
    pub records: u64,
    pub first: Seq,
    pub last: Seq,
}

const WAY_OUT: &str =
    "Nothing was changed. To start over, stop the process, move the directory aside \
(keep it for analysis) and start again: this node comes back with a new incarnation, its peers \
resend what they still hold and fail the work that was in flight here. See docs/durability.md.";

/// Everything that can go wrong with the journal. Callers never see `sled::Error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("the journal at {path} cannot be opened: {reason}. {WAY_OUT}")]
    Open { path: PathBuf, reason: String },
    /// The PostgreSQL store's database cannot serve (unreachable, refused, unsafe settings,
    /// a newer schema); nothing was written to it.
    #[error("the journal's database cannot be used: {reason}")]
    Database { reason: String },
    #[error("the journal at {path} is in use by another process: is another tether process running with this data directory?")]
    Locked { path: PathBuf },
    #[error("the journal at {path} is damaged: {key}: {reason}. {WAY_OUT}")]
    Corrupt {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("journal I/O failed: {context}: {reason}")]
    Io { context: String, reason: String },
    #[error(
        "the journal stopped accepting writes after a storage failure ({reason}); it resumes once the storage takes writes again"
    )]
    Poisoned { reason: String },
    #[error("invalid journal log name {name:?}")]
    BadName { name: String },
    #[error("record of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("the journal writer has stopped")]
    Closed,
    /// The commit was made under a claim that another node (or a newer session) has taken
    /// since: nothing of it was written.
    #[error("{claim} was claimed again since epoch {epoch} (a newer session, on this node or another): nothing of this commit was written")]
    Fenced { claim: String, epoch: u64 },
    /// A member node of a cluster writes only under its claims on the agents it serves.
    #[error("this node is a member of the cluster, not the active node: it writes only for the agents it serves")]
    NotActive,
}

impl JournalError {
    /// The storage is full (`ENOSPC`), now or when the journal was poisoned.
    pub fn is_disk_full(&self) -> bool {
        let reason = match self {
            JournalError::Io { reason, .. } | JournalError::Poisoned { reason } => reason,
            _ => return false,
        };
        reason.contains("os error 28") || reason.contains("No space left on device")
    }

    pub(crate) fn cannot_open(path: &Path, reason: String) -> Self {
        JournalError::Open {
            path: path.to_owned(),
            reason,
        }
    }
}

/// A snapshot of the journal's health for `/admin/health` and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JournalHealth {
    pub incarnation: String,
    pub batches: u64,
    pub commits: u64,
    pub ops: u64,
    pub syncs: u64,
    pub queued: u64,
    pub last_batch_commits: u64,
    pub max_batch_commits: u64,
    pub last_commit_unix_ms: u64,
    pub failures: u64,
    /// Commits refused because the claim they were made under was taken since (another
    /// node, or a newer session, serves that agent now).
    pub fenced: u64,
    pub poisoned: Option<String>,
    /// Why the journal is waiting for its storage (a database gone away) to take a batch it
    /// keeps trying; nothing more is acknowledged meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Compactions of the store since the process started.
    pub compactions: u64,
    /// A compaction is under way.
    pub compacting: bool,
    /// Commit latency, from the call to durable.
    pub commit_latency: crate::metrics::HistogramSnapshot,
}

/// A cloneable handle on the journal, for code that is not an actor (and for the actor itself).
#[derive(Clone)]
pub struct JournalHandle {
    tx: mpsc::UnboundedSender<Request>,
    store: Arc<dyn Store>,
    stats: Arc<WriterStats>,
    incarnation: Arc<str>,
    path: Arc<Path>,
}

impl JournalHandle {
    /// Commit `ops` atomically; resolves once they are durable.
    ///
    /// The request is queued when this is *called*, not when the future is first polled, so
    /// commits are applied in call order: a caller that numbers messages and commits them one
    /// after the other knows that a later commit's durability implies every earlier one's.
    pub fn commit(
        &self,
        ops: Vec<Op>,
    ) -> impl std::future::Future<Output = Result<Committed, JournalError>> + 'static {
        self.commit_under(ops, None)
    }

    /// Commit `ops` atomically, only while `fence` holds (see [`Fence`]): a commit under a
    /// claim taken since fails with [`JournalError::Fenced`] and writes nothing, while the
    /// other commits of its batch go through. Queued in call order, as [`Self::commit`].
    pub fn commit_under(
        &self,
        ops: Vec<Op>,
        fence: Option<Fence>,
    ) -> impl std::future::Future<Output = Result<Committed, JournalError>> + 'static {
        let started = std::time::Instant::now();
        let stats = self.stats.clone();
        let queued = self.enqueue(ops, fence);
        async move {
            let done = queued?.await.map_err(|_| JournalError::Closed)?;
            if done.is_ok() {
                stats.commit_latency.record(started.elapsed());
            }
            done
        }
    }

    fn enqueue(
        &self,
        ops: Vec<Op>,
        fence: Option<Fence>,
    ) -> Result<oneshot::Receiver<Result<Committed, JournalError>>, JournalError> {
        for op in &ops {
            if let Op::Append { payload, .. } | Op::AppendBlob { bytes: payload, .. } = op {
                if payload.len() > MAX_RECORD_BYTES {
                    return Err(JournalError::TooLarge {
                        len: payload.len(),
                        max: MAX_RECORD_BYTES,
                    });
                }
            }
        }
        let (reply, rx) = oneshot::channel();
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Request { ops, fence, reply }).is_err() {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(JournalError::Closed);
        }
        Ok(rx)
    }

    /// Records of `log` after `after`, at most `limit`, each validated.
    pub fn read_log(
        &self,
        log: &LogName,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Record>, JournalError> {
        let Some(from) = after.next() else {
            return Ok(Vec::new());
        };
        let prefix = record::log_prefix(log);
        let rows =
            self.store
                .scan_from(&record::record_key(log, from), &prefix, limit, usize::MAX)?;
        rows.iter()
            .map(|(k, v)| {
                record::decode_record(k, v)
                    .map(|(seq, payload)| Record {
                        seq,
                        payload: payload.to_vec(),
                    })
                    .map_err(|reason| self.corrupt(k, reason))
            })
            .collect()
    }

    /// The seq of the last record `log` holds (`None`: it holds none).
    pub fn last_seq(&self, log: &LogName) -> Result<Option<Seq>, JournalError> {
        match self.store.last_under(&record::log_prefix(log))? {
            Some((k, v)) => record::decode_record(&k, &v)
                .map(|(seq, _)| Some(seq))
                .map_err(|reason| self.corrupt(&k, reason)),
            None => Ok(None),
        }
    }

    /// Without blocking the caller (see [`Self::scan_meta_prefixes_async`]), in one read: the
    /// meta entries under each of `prefixes` (at most `limit` under each), and the records of
    /// each of `logs` after its seq (at most `limit` of each), validated, none past the first
    /// that brings the values read to `max_bytes`.
    pub fn read_meta_and_logs_async(
        &self,
        prefixes: &[String],
        logs: &[(LogName, Seq)],
        limit: usize,
        max_bytes: usize,
    ) -> impl std::future::Future<Output = Result<MetaAndLogs, JournalError>> + 'static {
        let mut ranges: Vec<(Vec<u8>, Vec<u8>)> = prefixes
            .iter()
            .map(|p| (record::meta_key(p), record::meta_key(p)))
            .collect();
        ranges.extend(logs.iter().filter_map(|(log, after)| {
            let from = after.next()?;
            Some((record::record_key(log, from), record::log_prefix(log)))
        }));
        ranges.sort();
        ranges.dedup();
        let rows = self.ranges_async(ranges, limit, max_bytes);
        let this = self.clone();
        async move {
            let rows = rows.await?;
            let mut out = MetaAndLogs::default();
            for (k, v) in rows {
                if k.first() == Some(&record::META_PREFIX) {
                    out.meta.extend(this.meta_rows(&[(k, v)])?);
                    continue;
                }
                let (log, seq, payload) = match record::parse_record_key(&k)
                    .and_then(|(log, _)| Ok((log.to_vec(), record::decode_record(&k, &v)?)))
                {
                    Ok((log, (seq, payload))) => (log, seq, payload.to_vec()),
                    Err(reason) => return Err(this.corrupt(&k, reason)),
                };
                let log = LogName::new(String::from_utf8_lossy(&log).into_owned())?;
                out.records.push((log, Record { seq, payload }));
            }
            Ok(out)
        }
    }

    /// Up to `max` bytes of blob `name` from byte `offset` (nothing past its committed
    /// length; nothing at all for a blob never written).
    pub fn read_blob(
        &self,
        name: &LogName,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, JournalError> {
        self.store.read_blob(name, offset, max)
    }

    /// A meta value, validated.
    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let k = record::meta_key(key);
        match self.store.get(&k)? {
            None => Ok(None),
            Some(v) => record::decode_meta(&k, &v)
                .map(|p| Some(p.to_vec()))
                .map_err(|reason| self.corrupt(&k, reason)),
        }
    }

    /// Every meta entry whose key starts with `prefix`, validated, in key order.
    pub fn scan_meta(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        let rows = self.store.scan(&record::meta_key(prefix))?;
        self.meta_rows(&rows)
    }

    /// Meta rows as read from the store, validated, their keys without the meta prefix.
    fn meta_rows(
        &self,
        rows: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        rows.iter()
            .map(|(k, v)| {
                let payload =
                    record::decode_meta(k, v).map_err(|reason| self.corrupt(k, reason))?;
                let key = String::from_utf8_lossy(k.get(1..).unwrap_or_default()).into_owned();
                Ok((key, payload.to_vec()))
            })
            .collect()
    }

    /// How many meta entries' keys start with `prefix`, counted up to `limit`.
    pub fn count_meta(&self, prefix: &str, limit: usize) -> Result<usize, JournalError> {
        self.store.count(&record::meta_key(prefix), limit)
    }

    /// A page of the meta entries whose key starts with `prefix`, from key `from` on
    /// (inclusive), validated, in key order: at most `limit` entries, and none past the first
    /// that brings the values read (as stored) to `max_bytes` (see [`Store::scan_from`]).
    pub fn scan_meta_from(
        &self,
        from: &str,
        prefix: &str,
        limit: usize,
        max_bytes: usize,
    ) -> Result<MetaPage, JournalError> {
        let rows = self.store.scan_from(
            &record::meta_key(from),
            &record::meta_key(prefix),
            limit,
            max_bytes,
        )?;
        let stored: usize = rows.iter().map(|(_, v)| v.len()).sum();
        Ok(MetaPage {
            full: rows.len() >= limit || stored >= max_bytes,
            entries: self.meta_rows(&rows)?,
        })
    }

    /// The meta entries under each of `prefixes` (none of which starts another), validated,
    /// in key order: at most `limit` under each, and none past the first that brings the values
    /// read (as stored) to `max_bytes` (see [`Store::scan_prefixes`]). `full`: some prefix may
    /// hold more.
    pub fn scan_meta_prefixes(
        &self,
        prefixes: &[String],
        limit: usize,
        max_bytes: usize,
    ) -> Result<MetaPage, JournalError> {
        let keys: Vec<Vec<u8>> = prefixes.iter().map(|p| record::meta_key(p)).collect();
        let rows = self.store.scan_prefixes(&keys, limit, max_bytes)?;
        self.meta_page(keys, rows, limit, max_bytes)
    }

    /// [`Self::scan_meta_prefixes`] without blocking the caller: on a database, the read runs
    /// on the store's own threads (see [`Store::scan_ranges_then`]).
    pub fn scan_meta_prefixes_async(
        &self,
        prefixes: &[String],
        limit: usize,
        max_bytes: usize,
    ) -> impl std::future::Future<Output = Result<MetaPage, JournalError>> + 'static {
        let keys: Vec<Vec<u8>> = prefixes.iter().map(|p| record::meta_key(p)).collect();
        let ranges = store::distinct(&keys)
            .into_iter()
            .map(|k| (k.clone(), k))
            .collect();
        let rows = self.ranges_async(ranges, limit, max_bytes);
        let this = self.clone();
        async move { this.meta_page(keys, rows.await?, limit, max_bytes) }
    }

    /// The rows of `ranges` (see [`Store::scan_ranges_then`]), without blocking the caller.
    fn ranges_async(
        &self,
        ranges: Vec<(Vec<u8>, Vec<u8>)>,
        limit: usize,
        max_bytes: usize,
    ) -> impl std::future::Future<Output = Result<store::Rows, JournalError>> + 'static {
        let (tx, rx) = oneshot::channel();
        self.store.scan_ranges_then(
            ranges,
            limit,
            max_bytes,
            Box::new(move |rows| {
                let _ = tx.send(rows);
            }),
        );
        async move { rx.await.map_err(|_| JournalError::Closed)? }
    }

    /// The page that `rows`, read under `keys` (see [`Self::scan_meta_prefixes`]), make.
    fn meta_page(
        &self,
        mut keys: Vec<Vec<u8>>,
        rows: store::Rows,
        limit: usize,
        max_bytes: usize,
    ) -> Result<MetaPage, JournalError> {
        let stored: usize = rows.iter().map(|(_, v)| v.len()).sum();
        // Rows come in key order, so each prefix's are one run.
        keys.sort();
        let mut under = vec![0usize; keys.len()];
        for (row, _) in &rows {
            let i = keys.partition_point(|k| k.as_slice() <= row.as_slice());
            if let Some(n) = i.checked_sub(1).and_then(|i| under.get_mut(i)) {
                *n += 1;
            }
        }
        let most_under_one = under.into_iter().max().unwrap_or(0);
        Ok(MetaPage {
            full: most_under_one >= limit || stored >= max_bytes,
            entries: self.meta_rows(&rows)?,
        })
    }

    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }

    /// Whether the store answers (see [`Store::probe`]); blocking.
    pub fn probe_store(&self) -> Result<(), JournalError> {
        self.store.probe()
    }

    pub fn observe(&self) -> JournalHealth {
        let s = &self.stats;
        JournalHealth {
            incarnation: self.incarnation.to_string(),
            batches: s.batches.load(Ordering::Relaxed),
            commits: s.requests.load(Ordering::Relaxed),
            ops: s.ops.load(Ordering::Relaxed),
            syncs: self.store.syncs(),
            queued: s.queued.load(Ordering::Relaxed),
            last_batch_commits: s.last_batch_requests.load(Ordering::Relaxed),
            max_batch_commits: s.max_batch_requests.load(Ordering::Relaxed),
            last_commit_unix_ms: s.last_commit_unix_ms.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            fenced: s.fenced.load(Ordering::Relaxed),
            poisoned: s.poisoned(),
            waiting: self.store.waiting(),
            compactions: self.store.compactions(),
            compacting: self.store.compacting(),
            commit_latency: s.commit_latency.snapshot(),
        }
    }

    fn corrupt(&self, key: &[u8], reason: String) -> JournalError {
        JournalError::Corrupt {
            path: self.path.to_path_buf(),
            key: printable_key(key),
            reason,
        }
    }
}

fn printable_key(key: &[u8]) -> String {
    match record::parse_record_key(key) {
        Ok((log, seq)) => format!("record {}#{seq}", String::from_utf8_lossy(log)),
        Err(_) => format!("entry {:?}", String::from_utf8_lossy(key)),
    }
}

/// Read every entry back and check it: the recovery pass of [`Journal::open`].
fn validate(
    store: &dyn Store,
    path: &Path,
) -> Result<(BTreeMap<String, LogSummary>, usize), JournalError> {
    let corrupt = |k: &[u8], reason: String| JournalError::Corrupt {
        path: path.to_owned(),
        key: printable_key(k),
        reason,
    };
    let mut logs: BTreeMap<String, LogSummary> = BTreeMap::new();
    let mut meta = 0;
    let mut unknown = 0;
    // One pass over one read: on a shared database other nodes write meanwhile, so counts
    // taken by separate reads would not agree.
    for (k, v) in store.scan(&[])? {
        match k.first() {
            Some(&record::RECORD_PREFIX) => {
                let (seq, _) = record::decode_record(&k, &v).map_err(|r| corrupt(&k, r))?;
                let (log, _) = record::parse_record_key(&k).map_err(|r| corrupt(&k, r))?;
                let name = String::from_utf8_lossy(log).into_owned();
                let entry = logs.entry(name).or_insert(LogSummary {
                    records: 0,
                    first: seq,
                    last: seq,
                });
                entry.records += 1;
                entry.last = seq;
            }
            Some(&record::META_PREFIX) => {
                record::decode_meta(&k, &v).map_err(|r| corrupt(&k, r))?;
                meta += 1;
            }
            _ => unknown += 1,
        }
    }
    if unknown > 0 {
        return Err(corrupt(
            b"?",
            format!("{unknown} entries have an unknown key prefix"),
        ));
    }
    Ok((logs, meta))
}

/// Tuning of a journal.
#[derive(Debug, Clone)]
pub struct JournalOptions {
    pub sled: SledOptions,
    /// Most commits one batch takes.
    pub max_batch: usize,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            sled: SledOptions::default(),
            max_batch: 4_096,
        }
    }
}

/// The journal actor: answers [`Commit`], [`ReadLog`], [`GetMeta`] and [`Observe`].
pub struct Journal {
    handle: JournalHandle,
}

impl Journal {
    /// Open the journal in `dir` (creating it if absent), validate every entry and start the
    /// writer thread. Start the actor with `.start()`; the thread ends when the last handle goes.
    ///
    /// Beside sled's files, the file `INCARNATION` repeats the journal's incarnation: a journal
    /// whose data files vanished or were swapped is then refused instead of starting empty.
    pub fn open(dir: &Path, opts: &JournalOptions) -> Result<(Journal, Recovered), JournalError> {
        let store = SledStore::open(dir, &opts.sled)?;
        let marker = dir.join(MARKER_FILE);
        let expected = match std::fs::read_to_string(&marker) {
            Ok(text) => Some(text.trim().to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(JournalError::Io {
                    context: format!("cannot read {}", marker.display()),
                    reason: e.to_string(),
                })
            }
        };
        let (journal, recovered) =
            Self::with_store(Arc::new(store), dir, opts, expected.as_deref())?;
        if expected.as_deref() != Some(recovered.incarnation.as_str()) {
            crate::identity::write_file_atomic(&marker, recovered.incarnation.as_bytes(), 0o600)
                .map_err(|e| JournalError::Io {
                    context: format!("cannot write {}", marker.display()),
                    reason: e.to_string(),
                })?;
        }
        Ok((journal, recovered))
    }

    /// Open over any [`Store`]. `expected_incarnation` is what the journal is known to be (if
    /// anything): a store without it, or with another, is refused as damaged.
    pub fn with_store(
        store: Arc<dyn Store>,
        dir: &Path,
        opts: &JournalOptions,
        expected_incarnation: Option<&str>,
    ) -> Result<(Journal, Recovered), JournalError> {
        let (logs, meta_entries) = validate(store.as_ref(), dir)?;
        let key = record::meta_key(INCARNATION_KEY);
        let (incarnation, created) = match store.get(&key)? {
            Some(v) => {
                let raw =
                    record::decode_meta(&key, &v).map_err(|reason| JournalError::Corrupt {
                        path: dir.to_owned(),
                        key: INCARNATION_KEY.into(),
                        reason,
                    })?;
                let found = String::from_utf8_lossy(raw).into_owned();
                if let Some(expected) = expected_incarnation.filter(|e| *e != found) {
                    return Err(JournalError::Corrupt {
                        path: dir.to_owned(),
                        key: INCARNATION_KEY.into(),
                        reason: format!("the data files hold incarnation {found}, but {MARKER_FILE} says {expected}: they belong to another journal"),
                    });
                }
                (found, false)
            }
            None => {
                if let Some(expected) = expected_incarnation {
                    return Err(JournalError::Corrupt {
                        path: dir.to_owned(),
                        key: INCARNATION_KEY.into(),
                        reason: format!("the data files are empty or gone, but {MARKER_FILE} says this journal is incarnation {expected}"),
                    });
                }
                if !logs.is_empty() || meta_entries > 0 {
                    return Err(JournalError::Corrupt {
                        path: dir.to_owned(),
                        key: INCARNATION_KEY.into(),
                        reason: "missing while other entries exist".into(),
                    });
                }
                let inc = new_incarnation();
                store.commit(&[Op::PutMeta {
                    key: INCARNATION_KEY.into(),
                    value: inc.clone().into_bytes(),
                }])?;
                (inc, true)
            }
        };
        let stats = Arc::new(WriterStats::default());
        let tx = writer::spawn(store.clone(), stats.clone(), opts.max_batch)?;
        let handle = JournalHandle {
            tx,
            store,
            stats,
            incarnation: incarnation.as_str().into(),
            path: dir.into(),
        };
        tracing::info!(path = %dir.display(), incarnation = %incarnation, created, logs = logs.len(), "journal-opened");
        Ok((
            Journal { handle },
            Recovered {
                incarnation,
                created,
                logs,
                meta_entries,
            },
        ))
    }

    pub fn handle(&self) -> JournalHandle {
        self.handle.clone()
    }
}

fn new_incarnation() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

impl Actor for Journal {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
    }
}

/// Commit a batch of operations atomically; the reply comes once they are durable.
#[derive(Message)]
#[rtype(result = "Result<Committed, JournalError>")]
pub struct Commit {
    pub ops: Vec<Op>,
}

/// Read records of a log after a sequence number.
#[derive(Message)]
#[rtype(result = "Result<Vec<Record>, JournalError>")]
pub struct ReadLog {
    pub log: LogName,
    pub after: Seq,
    pub limit: usize,
}

/// Read one meta value.
#[derive(Message)]
#[rtype(result = "Result<Option<Vec<u8>>, JournalError>")]
pub struct GetMeta {
    pub key: String,
}

/// A handle for callers that commit from outside the actor system's mailboxes.
#[derive(Message)]
#[rtype(result = "JournalHandle")]
pub struct GetHandle;

impl Handler<GetHandle> for Journal {
    type Result = MessageResult<GetHandle>;

    fn handle(&mut self, _: GetHandle, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.handle.clone())
    }
}

/// Health snapshot.
#[derive(Message)]
#[rtype(result = "JournalHealth")]
pub struct Observe;

impl Handler<Commit> for Journal {
    type Result = ResponseFuture<Result<Committed, JournalError>>;

    fn handle(&mut self, msg: Commit, _: &mut Self::Context) -> Self::Result {
        // Queued now, in mailbox order.
        Box::pin(self.handle.commit(msg.ops))
    }
}

impl Handler<ReadLog> for Journal {
    type Result = Result<Vec<Record>, JournalError>;

    fn handle(&mut self, msg: ReadLog, _: &mut Self::Context) -> Self::Result {
        self.handle.read_log(&msg.log, msg.after, msg.limit)
    }
}

impl Handler<GetMeta> for Journal {
    type Result = Result<Option<Vec<u8>>, JournalError>;

    fn handle(&mut self, msg: GetMeta, _: &mut Self::Context) -> Self::Result {
        self.handle.get_meta(&msg.key)
    }
}

impl Handler<Observe> for Journal {
    type Result = MessageResult<Observe>;

    fn handle(&mut self, _: Observe, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.handle.observe())
    }
}

#[cfg(test)]
mod tests;
