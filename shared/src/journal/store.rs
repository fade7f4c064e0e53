//! The storage behind the journal: a small trait, and its sled implementation.
//!
//! [`Store::apply`] makes a batch visible atomically; [`Store::sync`] returns once everything
//! applied before it began is on stable storage. That is the whole durability contract; a
//! server backend on a distributed store implements the same trait. The sled store follows every flush with `fdatasync` on sled's data file (and
//! `fsync` on any new blob file), because sled's own `flush` issues `sync_file_range` only.

use std::collections::HashSet;
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use crate::journal::blobs::{self, BlobFiles};
use crate::journal::record::{self, LogName};
use crate::journal::{JournalError, Op};

/// Key-value pairs as read from a store, in key order.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// Durable key-value storage with atomic batches.
pub trait Store: Send + Sync + 'static {
    /// Apply `ops` atomically (visible to reads, not yet durable).
    fn apply(&self, ops: &[Op]) -> Result<(), JournalError>;
    /// Make everything applied before this call durable.
    fn sync(&self) -> Result<(), JournalError>;
    /// Apply and sync.
    fn commit(&self, ops: &[Op]) -> Result<(), JournalError> {
        self.apply(ops)?;
        self.sync()
    }
    /// Every `(key, value)` whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &[u8]) -> Result<Rows, JournalError>;
    /// Records of one log with a key from `from` (inclusive), at most `limit` of them.
    fn scan_from(&self, from: &[u8], prefix: &[u8], limit: usize) -> Result<Rows, JournalError>;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, JournalError>;
    /// Up to `max` bytes of blob `name` from `offset`, never past its committed length.
    fn read_blob(&self, name: &LogName, offset: u64, max: usize) -> Result<Vec<u8>, JournalError>;
    /// How many data syncs (`fdatasync`) have completed: the tests check one per batch.
    fn syncs(&self) -> u64;
}

/// Tuning for the sled store.
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// sled's page cache; small on agents (memory target), larger on the server.
    pub cache_capacity_bytes: u64,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            cache_capacity_bytes: 16 * 1024 * 1024,
        }
    }
}

/// The sled store of one process.
pub struct SledStore {
    db: sled::Db,
    dir: PathBuf,
    /// sled's data file, opened once, synced after every flush.
    data_file: File,
    /// Blob files already synced (sled writes large pages to their own files).
    synced_blobs: std::sync::Mutex<HashSet<std::ffi::OsString>>,
    /// Our blobs (step logs), in files of their own.
    files: BlobFiles,
    syncs: std::sync::atomic::AtomicU64,
}

/// The directory of [`blobs`] files inside the journal's.
pub const BLOB_DIR: &str = "files";

fn io_err(context: &str, path: &Path, e: std::io::Error) -> JournalError {
    JournalError::Io {
        context: format!("{context} {}", path.display()),
        reason: e.to_string(),
    }
}

fn sled_err(context: &str, e: sled::Error) -> JournalError {
    JournalError::Io {
        context: context.to_owned(),
        reason: e.to_string(),
    }
}

impl SledStore {
    /// Open (or create) the store in `dir`. A database sled cannot open is an error naming
    /// the way out, never a silent empty start.
    pub fn open(dir: &Path, opts: &SledOptions) -> Result<Self, JournalError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io_err("cannot create the journal directory", dir, e))?;
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(opts.cache_capacity_bytes)
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput);
        // sled may panic on some damaged files instead of returning an error: contain it.
        let opened = catch_unwind(AssertUnwindSafe(|| config.open()));
        let db = match opened {
            Ok(Ok(db)) => db,
            // sled reports a lock held by another process only through its message.
            Ok(Err(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(JournalError::Locked {
                    path: dir.to_owned(),
                })
            }
            Ok(Err(e)) => return Err(JournalError::cannot_open(dir, e.to_string())),
            Err(_) => {
                return Err(JournalError::cannot_open(
                    dir,
                    "sled panicked while reading it".into(),
                ))
            }
        };
        let data_path = dir.join("db");
        let data_file = File::open(&data_path)
            .map_err(|e| io_err("cannot open sled's data file", &data_path, e))?;
        let store = SledStore {
            db,
            dir: dir.to_owned(),
            data_file,
            synced_blobs: std::sync::Mutex::new(HashSet::new()),
            files: BlobFiles::open(&dir.join(BLOB_DIR))?,
            syncs: std::sync::atomic::AtomicU64::new(0),
        };
        let live = store.blob_names()?;
        let orphans = store.files.remove_orphans(&live)?;
        if orphans > 0 {
            tracing::info!(path = %dir.display(), orphans, "journal-orphan-blob-files-removed");
        }
        Ok(store)
    }

    /// Every blob with a committed length.
    fn blob_names(&self) -> Result<Vec<LogName>, JournalError> {
        let prefix = record::meta_key(blobs::LENGTH_KEY_PREFIX);
        let mut names = Vec::new();
        for key in self.db.scan_prefix(&prefix).keys() {
            let key = key.map_err(|e| sled_err("cannot scan blob lengths", e))?;
            let name = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            names.push(LogName::new(name)?);
        }
        Ok(names)
    }

    /// The committed length of blob `name` (0 for none).
    fn blob_len(&self, name: &LogName) -> Result<u64, JournalError> {
        let key = blobs::length_key(name);
        let k = record::meta_key(&key);
        let Some(v) = self.db.get(&k).map_err(|e| sled_err("cannot read", e))? else {
            return Ok(0);
        };
        let corrupt = |reason| JournalError::Corrupt {
            path: self.dir.clone(),
            key: key.clone(),
            reason,
        };
        let raw = record::decode_meta(&k, &v).map_err(corrupt)?;
        blobs::decode_length(raw).map_err(corrupt)
    }

    fn sync_new_blobs(&self) -> Result<(), JournalError> {
        let blobs = self.dir.join("blobs");
        let entries = match std::fs::read_dir(&blobs) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("cannot list", &blobs, e)),
        };
        let mut synced = self
            .synced_blobs
            .lock()
            .map_err(|_| JournalError::Poisoned {
                reason: "blob bookkeeping lock poisoned".into(),
            })?;
        let mut present = HashSet::new();
        let mut any_new = false;
        for entry in entries {
            let entry = entry.map_err(|e| io_err("cannot list", &blobs, e))?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                let path = entry.path();
                match File::open(&path) {
                    Ok(f) => f
                        .sync_all()
                        .map_err(|e| io_err("cannot fsync blob", &path, e))?,
                    // sled removes obsolete blobs concurrently; a vanished one needs no sync.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err("cannot open blob", &path, e)),
                }
                any_new = true;
            }
            present.insert(name);
        }
        if any_new {
            File::open(&blobs)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err("cannot fsync", &blobs, e))?;
        }
        *synced = present;
        Ok(())
    }

    /// The sled batch for `ops`, and the blobs it deletes. Blob bytes are written and made
    /// durable here, before sled sees the lengths that commit them.
    fn build_batch(&self, ops: &[Op]) -> Result<(sled::Batch, Vec<LogName>), JournalError> {
        let mut batch = sled::Batch::default();
        let mut appends = blobs::Appends::default();
        let mut lengths: std::collections::HashMap<&LogName, u64> = Default::default();
        let mut deleted = Vec::new();
        for op in ops {
            match op {
                Op::Append { log, seq, payload } => {
                    batch.insert(
                        record::record_key(log, *seq),
                        record::encode_record(log, *seq, payload),
                    );
                }
                Op::TruncateThrough { log, upto } => {
                    for key in self.keys_through(log, *upto)? {
                        batch.remove(key);
                    }
                }
                Op::PutMeta { key, value } => {
                    batch.insert(record::meta_key(key), record::encode_meta(key, value))
                }
                Op::DeleteMeta { key } => batch.remove(record::meta_key(key)),
                Op::AppendBlob { name, bytes } => {
                    deleted.retain(|d| d != name);
                    let at = match lengths.get(name) {
                        Some(len) => *len,
                        None => self.blob_len(name)?,
                    };
                    self.files.write_at(&mut appends, name, at, bytes)?;
                    let len = at + bytes.len() as u64;
                    lengths.insert(name, len);
                    let key = blobs::length_key(name);
                    batch.insert(
                        record::meta_key(&key),
                        record::encode_meta(&key, &blobs::encode_length(len)),
                    );
                }
                Op::DeleteBlob { name } => {
                    lengths.insert(name, 0);
                    batch.remove(record::meta_key(&blobs::length_key(name)));
                    deleted.push(name.clone());
                }
            }
        }
        self.files.sync_appends(appends)?;
        Ok((batch, deleted))
    }

    fn keys_through(
        &self,
        log: &LogName,
        upto: crate::protocol::Seq,
    ) -> Result<Vec<sled::IVec>, JournalError> {
        let start = record::log_prefix(log);
        let end = record::record_key(log, upto);
        self.db
            .range(start..=end)
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| sled_err("cannot scan for truncation", e))
    }
}

impl Store for SledStore {
    fn apply(&self, ops: &[Op]) -> Result<(), JournalError> {
        let (batch, deleted) = self.build_batch(ops)?;
        self.db
            .apply_batch(batch)
            .map_err(|e| sled_err("cannot apply batch", e))?;
        // Queued only now: a sync that takes them flushes this batch too.
        for name in &deleted {
            self.files.delete_after_sync(name)?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), JournalError> {
        let deleted = self.files.take_deleted()?;
        self.db.flush().map_err(|e| sled_err("cannot flush", e))?;
        self.sync_new_blobs()?;
        // An fdatasync failure is not retried: the kernel may have dropped the dirty pages
        // ("fsyncgate"), so nothing after it can be trusted until the process restarts.
        self.data_file
            .sync_data()
            .map_err(|e| JournalError::Poisoned {
                reason: format!("fdatasync of {} failed: {e}", self.dir.join("db").display()),
            })?;
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.files.remove_deleted(deleted)
    }

    fn scan(&self, prefix: &[u8]) -> Result<Rows, JournalError> {
        self.db
            .scan_prefix(prefix)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<Result<_, _>>()
            .map_err(|e| sled_err("cannot scan", e))
    }

    fn scan_from(&self, from: &[u8], prefix: &[u8], limit: usize) -> Result<Rows, JournalError> {
        let mut out = Vec::new();
        for item in self.db.range(from.to_vec()..) {
            let (k, v) = item.map_err(|e| sled_err("cannot read", e))?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, JournalError> {
        self.db
            .get(key)
            .map(|o| o.map(|v| v.to_vec()))
            .map_err(|e| sled_err("cannot read", e))
    }

    fn read_blob(&self, name: &LogName, offset: u64, max: usize) -> Result<Vec<u8>, JournalError> {
        let committed = self.blob_len(name)?;
        self.files.read(name, committed, offset, max)
    }

    fn syncs(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }
}
