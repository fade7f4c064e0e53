//! The storage behind the journal: a small trait, and its sled implementation.
//!
//! [`Store::apply`] makes a batch visible atomically; [`Store::sync`] returns once everything
//! applied before it began is on stable storage. That is the whole durability contract; a
//! server backend on a distributed store implements the same trait. The sled store follows every flush with `fdatasync` on sled's data file (and
//! `fsync` on any new blob file), because sled's own `flush` issues `sync_file_range` only.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use crate::journal::compaction::Compacted;
use crate::journal::compaction::{sled_err, Generation, Generations};

use crate::journal::blobs::{self, BlobFiles};
use crate::journal::record::{self, LogName};
use crate::journal::{JournalError, Op};

/// A key-value pair as read from a store.
pub type Row = (Vec<u8>, Vec<u8>);
/// Key-value pairs as read from a store, in key order.
pub type Rows = Vec<Row>;

/// The claim a commit is made under: it is written only while `claim` (the id of the agent it is
/// for) is still held at `epoch`. On a cluster every node that verifies an agent's handshake
/// claims it (see the PostgreSQL store's `claiming`), so a node whose claim was taken elsewhere
/// commits nothing more for that agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    pub claim: String,
    pub epoch: u64,
    /// A second claim that must hold too, at its epoch (the active node's commands written
    /// straight into the stream of an agent a member serves: under the member's claim on the
    /// agent and on that session's stream).
    pub also: Option<(String, u64)>,
}

impl Fence {
    /// The fence of one claim.
    pub fn of(claim: impl Into<String>, epoch: u64) -> Fence {
        Fence {
            claim: claim.into(),
            epoch,
            also: None,
        }
    }

    /// Every claim this fence checks, with the epoch it must be held at.
    pub fn claims(&self) -> impl Iterator<Item = (&str, u64)> {
        std::iter::once((self.claim.as_str(), self.epoch))
            .chain(self.also.iter().map(|(c, e)| (c.as_str(), *e)))
    }
}

/// The ops of one fenced request inside a batch: `ops[range]`, written only under `fence`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    pub range: std::ops::Range<usize>,
    pub fence: Fence,
}

/// Durable key-value storage with atomic batches.
pub trait Store: Send + Sync + 'static {
    /// Apply `ops` atomically (visible to reads, not yet durable).
    fn apply(&self, ops: &[Op]) -> Result<(), JournalError>;
    /// Apply `ops` atomically, except each [`Fenced`] range whose fence no longer holds: that
    /// request's ops are left out and the rest still apply. Returns, for each of `fenced`,
    /// whether it was left out. A store of one machine has no claims to check (its one process
    /// holds every peer), so by default every fence holds.
    fn apply_fenced(&self, ops: &[Op], fenced: &[Fenced]) -> Result<Vec<bool>, JournalError> {
        self.apply(ops).map(|()| vec![false; fenced.len()])
    }
    /// Make everything applied before this call durable.
    fn sync(&self) -> Result<(), JournalError>;
    /// Whether [`Store::apply`] returns only once its batch is durable (a database's `COMMIT`):
    /// then [`Store::sync`] has nothing to do, and the writer answers each batch as soon as it
    /// is applied instead of gathering batches for one sync.
    fn durable_on_apply(&self) -> bool {
        false
    }
    /// Whether this store writes only under claims: a commit without a [`Fence`] is refused
    /// (a cluster's member node, which may write only for the agents it serves).
    fn fenced_only(&self) -> bool {
        false
    }
    /// Apply and sync.
    fn commit(&self, ops: &[Op]) -> Result<(), JournalError> {
        self.apply(ops)?;
        self.sync()
    }
    /// Every `(key, value)` whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &[u8]) -> Result<Rows, JournalError>;
    /// Rows whose key starts with `prefix`, from key `from` (inclusive), in key order: at most
    /// `limit` of them, and none past the first whose values, with those before it, reach
    /// `max_bytes` (the first row is always read, whatever its size).
    fn scan_from(
        &self,
        from: &[u8],
        prefix: &[u8],
        limit: usize,
        max_bytes: usize,
    ) -> Result<Rows, JournalError>;
    /// Rows whose key starts with one of `prefixes` (none of which starts another), in key
    /// order: at most `limit` under each, and none past the first whose values, with those
    /// before it, reach `max_bytes` (the first row is always read, whatever its size).
    fn scan_prefixes(
        &self,
        prefixes: &[Vec<u8>],
        limit: usize,
        max_bytes: usize,
    ) -> Result<Rows, JournalError> {
        scan_prefixes_in_turn(self, prefixes, limit, max_bytes)
    }
    /// [`Store::scan_prefixes`] of ranges that each start at a key of their own (a prefix is
    /// the range from itself): the rows of each `(from, prefix)` of `ranges` (none overlapping
    /// another) from `from` on whose keys start with `prefix`, with the same bounds, given to
    /// `reply`: by a store whose reads wait on the network (a database), on a thread of its
    /// own, so that the caller (an async one) neither blocks nor hands the wait to another
    /// thread; by default, at once.
    fn scan_ranges_then(
        &self,
        ranges: Vec<(Vec<u8>, Vec<u8>)>,
        limit: usize,
        max_bytes: usize,
        reply: Box<dyn FnOnce(Result<Rows, JournalError>) + Send>,
    ) {
        reply(scan_ranges_in_turn(self, &ranges, limit, max_bytes))
    }
    /// The last row, in key order, whose key starts with `prefix`.
    fn last_under(&self, prefix: &[u8]) -> Result<Option<Row>, JournalError> {
        Ok(self.scan(prefix)?.pop())
    }
    /// How many keys start with `prefix`, counted up to `limit`.
    fn count(&self, prefix: &[u8], limit: usize) -> Result<usize, JournalError> {
        Ok(self.scan_from(prefix, prefix, limit, usize::MAX)?.len())
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, JournalError>;
    /// Up to `max` bytes of blob `name` from `offset`, never past its committed length.
    fn read_blob(&self, name: &LogName, offset: u64, max: usize) -> Result<Vec<u8>, JournalError>;
    /// How many data syncs (`fdatasync`) have completed: the tests check one per batch.
    fn syncs(&self) -> u64;
    /// Housekeeping the writer runs between syncs (with no apply or sync under way).
    fn maintain(&self) -> Result<(), JournalError> {
        Ok(())
    }
    /// How many compactions [`Store::maintain`] has done.
    fn compactions(&self) -> u64 {
        0
    }
    /// Whether a compaction is under way now.
    fn compacting(&self) -> bool {
        false
    }
    /// Why the store is waiting for its storage to take a batch it keeps trying (a database
    /// gone away), while it is.
    fn waiting(&self) -> Option<String> {
        None
    }
    /// Whether the storage answers again after a failure (a store on a disk leaves this to a
    /// check of the disk).
    fn probe(&self) -> Result<(), JournalError> {
        Ok(())
    }
}

/// Tuning for the sled store.
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// sled's page cache; small on agents (memory target), larger on the server.
    pub cache_capacity_bytes: u64,
    /// sled 0.34 gives back little of the space that rewritten and removed entries leave in
    /// its data file, so the store is compacted (its live entries copied into a fresh
    /// database, swapped in atomically) once the file has doubled since the last compaction
    /// *and* grown by at least this much.
    pub compact_after_growth_bytes: u64,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            cache_capacity_bytes: 16 * 1024 * 1024,
            compact_after_growth_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The sled store of one process.
pub struct SledStore {
    /// The live sled database, and its compactions.
    gens: Arc<Generations>,
    /// Our blobs (step logs), in files of their own.
    files: BlobFiles,
    syncs: AtomicU64,
}

/// The directory of [`blobs`] files inside the journal's.
pub const BLOB_DIR: &str = "files";

fn io_err(context: &str, path: &Path, e: std::io::Error) -> JournalError {
    JournalError::Io {
        context: format!("{context} {}", path.display()),
        reason: e.to_string(),
    }
}

impl SledStore {
    /// Open (or create) the store in `dir`. A database sled cannot open is an error naming
    /// the way out, never a silent empty start.
    pub fn open(dir: &Path, opts: &SledOptions) -> Result<Self, JournalError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io_err("cannot create the journal directory", dir, e))?;
        let store = SledStore {
            gens: Generations::open(dir, opts)?,
            files: BlobFiles::open(&dir.join(BLOB_DIR))?,
            syncs: AtomicU64::new(0),
        };
        let live = store.blob_names()?;
        let orphans = store.files.remove_orphans(&live)?;
        if orphans > 0 {
            tracing::info!(path = %dir.display(), orphans, "journal-orphan-blob-files-removed");
        }
        Ok(store)
    }

    fn gen(&self) -> Arc<Generation> {
        self.gens.current()
    }

    /// Bytes of sled's data file now.
    pub fn data_file_bytes(&self) -> u64 {
        self.gen().file_bytes()
    }

    /// Compact the store now, on this thread (see [`Generations::compact`]).
    pub fn compact(&self) -> Result<Compacted, JournalError> {
        self.gens.compact()
    }

    /// Every blob with a committed length.
    fn blob_names(&self) -> Result<Vec<LogName>, JournalError> {
        let prefix = record::meta_key(blobs::LENGTH_KEY_PREFIX);
        let mut names = Vec::new();
        for key in self.gen().db.scan_prefix(&prefix).keys() {
            let key = key.map_err(|e| sled_err("cannot scan blob lengths", e))?;
            let name = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            names.push(LogName::new(name)?);
        }
        Ok(names)
    }

    /// The committed length of blob `name` (0 for none).
    fn blob_len_in(&self, db: &sled::Db, name: &LogName) -> Result<u64, JournalError> {
        let key = blobs::length_key(name);
        let k = record::meta_key(&key);
        let Some(v) = db.get(&k).map_err(|e| sled_err("cannot read", e))? else {
            return Ok(0);
        };
        let corrupt = |reason| JournalError::Corrupt {
            path: self.gens.dir().to_owned(),
            key: key.clone(),
            reason,
        };
        let raw = record::decode_meta(&k, &v).map_err(corrupt)?;
        blobs::decode_length(raw).map_err(corrupt)
    }

    /// The sled batch for `ops`, and the blobs it deletes. Blob bytes are written and made
    /// durable here, before sled sees the lengths that commit them.
    /// The keys it writes are returned too while a compaction needs them.
    #[allow(clippy::type_complexity)]
    fn build_batch(
        &self,
        db: &sled::Db,
        ops: &[Op],
    ) -> Result<(sled::Batch, Vec<LogName>, Option<Vec<Vec<u8>>>), JournalError> {
        let mut keys = self.gens.tracking().then(Vec::new);
        let mut touch = |k: &[u8]| {
            if let Some(keys) = keys.as_mut() {
                keys.push(k.to_vec());
            }
        };
        let mut batch = sled::Batch::default();
        let mut appends = blobs::Appends::default();
        let mut lengths: std::collections::HashMap<&LogName, u64> = Default::default();
        let mut deleted = Vec::new();
        // Records this batch appended so far: a truncation later in it removes them too.
        let mut appended = std::collections::BTreeSet::new();
        for op in ops {
            match op {
                Op::Append { log, seq, payload } => {
                    let key = record::record_key(log, *seq);
                    touch(&key);
                    appended.insert(key.clone());
                    batch.insert(key, record::encode_record(log, *seq, payload));
                }
                Op::TruncateThrough { log, upto } => {
                    let (start, end) = (record::log_prefix(log), record::record_key(log, *upto));
                    let earlier: Vec<Vec<u8>> = appended.range(start..=end).cloned().collect();
                    for key in earlier {
                        appended.remove(&key);
                        touch(&key);
                        batch.remove(key);
                    }
                    for key in keys_through(db, log, *upto)? {
                        touch(&key);
                        batch.remove(key);
                    }
                }
                Op::PutMeta { key, value } => {
                    let k = record::meta_key(key);
                    touch(&k);
                    batch.insert(k, record::encode_meta(key, value))
                }
                Op::DeleteMeta { key } => {
                    let k = record::meta_key(key);
                    touch(&k);
                    batch.remove(k)
                }
                Op::AppendBlob { name, bytes } => {
                    deleted.retain(|d| d != name);
                    let at = match lengths.get(name) {
                        Some(len) => *len,
                        None => self.blob_len_in(db, name)?,
                    };
                    self.files.write_at(&mut appends, name, at, bytes)?;
                    let len = at + bytes.len() as u64;
                    lengths.insert(name, len);
                    let key = blobs::length_key(name);
                    let k = record::meta_key(&key);
                    touch(&k);
                    batch.insert(k, record::encode_meta(&key, &blobs::encode_length(len)));
                }
                Op::DeleteBlob { name } => {
                    lengths.insert(name, 0);
                    let k = record::meta_key(&blobs::length_key(name));
                    touch(&k);
                    batch.remove(k);
                    deleted.push(name.clone());
                }
            }
        }
        self.files.sync_appends(appends)?;
        Ok((batch, deleted, keys))
    }
}

/// `prefixes` in order, each once.
pub(crate) fn distinct(prefixes: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut sorted = prefixes.to_vec();
    sorted.sort();
    sorted.dedup();
    sorted
}

/// [`Store::scan_prefixes`] as one [`Store::scan_from`] per prefix, in key order.
pub(crate) fn scan_prefixes_in_turn<S: Store + ?Sized>(
    store: &S,
    prefixes: &[Vec<u8>],
    limit: usize,
    max_bytes: usize,
) -> Result<Rows, JournalError> {
    let ranges: Vec<(Vec<u8>, Vec<u8>)> = distinct(prefixes)
        .into_iter()
        .map(|p| (p.clone(), p))
        .collect();
    scan_ranges_in_turn(store, &ranges, limit, max_bytes)
}

/// [`Store::scan_ranges_then`]'s rows, as one [`Store::scan_from`] per range, in key order.
pub(crate) fn scan_ranges_in_turn<S: Store + ?Sized>(
    store: &S,
    ranges: &[(Vec<u8>, Vec<u8>)],
    limit: usize,
    max_bytes: usize,
) -> Result<Rows, JournalError> {
    let mut ranges = ranges.to_vec();
    ranges.sort();
    let mut out: Rows = Vec::new();
    let mut bytes = 0usize;
    for (from, prefix) in ranges {
        if bytes >= max_bytes && !out.is_empty() {
            break;
        }
        let rows = store.scan_from(&from, &prefix, limit, max_bytes - bytes)?;
        bytes = rows
            .iter()
            .fold(bytes, |sum, (_, v)| sum.saturating_add(v.len()));
        out.extend(rows);
    }
    Ok(out)
}

fn keys_through(
    db: &sled::Db,
    log: &LogName,
    upto: crate::protocol::Seq,
) -> Result<Vec<sled::IVec>, JournalError> {
    let start = record::log_prefix(log);
    let end = record::record_key(log, upto);
    db.range(start..=end)
        .keys()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| sled_err("cannot scan for truncation", e))
}

impl Store for SledStore {
    fn apply(&self, ops: &[Op]) -> Result<(), JournalError> {
        let _writing = self.gens.writing();
        let gen = self.gen();
        let (batch, deleted, keys) = self.build_batch(&gen.db, ops)?;
        gen.db
            .apply_batch(batch)
            .map_err(|e| sled_err("cannot apply batch", e))?;
        self.gens.touched(keys);
        // Queued only now: a sync that takes them flushes this batch too.
        for name in &deleted {
            self.files.delete_after_sync(name)?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), JournalError> {
        let _writing = self.gens.writing();
        let gen = self.gen();
        let deleted = self.files.take_deleted()?;
        gen.db.flush().map_err(|e| sled_err("cannot flush", e))?;
        gen.sync_new_blobs()?;
        // An fdatasync failure is not retried: the kernel may have dropped the dirty pages
        // ("fsyncgate"), so nothing after it can be trusted until the process restarts.
        gen.data_file
            .sync_data()
            .map_err(|e| JournalError::Poisoned {
                reason: format!("fdatasync of {} failed: {e}", gen.data_path.display()),
            })?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.files.remove_deleted(deleted)
    }

    fn maintain(&self) -> Result<(), JournalError> {
        Generations::maintain(&self.gens)
    }

    fn compactions(&self) -> u64 {
        self.gens.compactions()
    }

    fn compacting(&self) -> bool {
        self.gens.compacting()
    }

    fn last_under(&self, prefix: &[u8]) -> Result<Option<Row>, JournalError> {
        match self.gen().db.scan_prefix(prefix).next_back() {
            Some(Ok((k, v))) => Ok(Some((k.to_vec(), v.to_vec()))),
            Some(Err(e)) => Err(sled_err("cannot read", e)),
            None => Ok(None),
        }
    }

    fn scan(&self, prefix: &[u8]) -> Result<Rows, JournalError> {
        self.gen()
            .db
            .scan_prefix(prefix)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<Result<_, _>>()
            .map_err(|e| sled_err("cannot scan", e))
    }

    fn scan_from(
        &self,
        from: &[u8],
        prefix: &[u8],
        limit: usize,
        max_bytes: usize,
    ) -> Result<Rows, JournalError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in self.gen().db.range(from.to_vec()..) {
            let (k, v) = item.map_err(|e| sled_err("cannot read", e))?;
            if !k.starts_with(prefix)
                || out.len() >= limit
                || (bytes >= max_bytes && !out.is_empty())
            {
                break;
            }
            bytes = bytes.saturating_add(v.len());
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, JournalError> {
        self.gen()
            .db
            .get(key)
            .map(|o| o.map(|v| v.to_vec()))
            .map_err(|e| sled_err("cannot read", e))
    }

    fn read_blob(&self, name: &LogName, offset: u64, max: usize) -> Result<Vec<u8>, JournalError> {
        let committed = self.blob_len_in(&self.gen().db, name)?;
        self.files.read(name, committed, offset, max)
    }

    fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}
