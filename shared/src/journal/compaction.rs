//! Compaction of the sled store: sled 0.34 gives back little of the space that rewritten and
//! removed entries leave in its data file, so once the file has doubled since the last
//! compaction (and grown by at least `compact_after_growth_bytes`), every live entry is copied
//! into a fresh database, the next [`generation`], which then replaces the old one atomically.
//!
//! The copy runs on a thread of its own while commits go on, pausing after each batch as long
//! as the batch took (so it never takes more than half a core from them): every key an apply
//! writes meanwhile is noted. Once the copy is done, the noted keys are copied again twice
//! while commits go on (each pass notes fewer), then the writers are held off just long enough
//! to copy the last few again, sync the new database, publish it and swap it in. Reads are never
//! held off: they use whichever generation is live when they start.

use std::collections::HashSet;
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::Instant;

use crate::journal::generation::{self, Layout};
use crate::journal::store::SledOptions;
use crate::journal::JournalError;

fn io_err(context: &str, path: &Path, e: std::io::Error) -> JournalError {
    JournalError::Io {
        context: format!("{context} {}", path.display()),
        reason: e.to_string(),
    }
}

pub(crate) fn sled_err(context: &str, e: sled::Error) -> JournalError {
    JournalError::Io {
        context: context.to_owned(),
        reason: e.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The live generation of one store and what its compaction needs.
pub(crate) struct Generations {
    dir: PathBuf,
    opts: SledOptions,
    /// The live generation; readers clone it and read without holding the lock.
    current: RwLock<Arc<Generation>>,
    /// Held shared by every apply and sync, exclusively by a compaction's last step.
    writing: RwLock<()>,
    /// Keys written since a compaction's copy began (`None`: no copy under way).
    touched: Mutex<Option<HashSet<Vec<u8>>>>,
    /// A compaction thread is running.
    running: AtomicBool,
    /// Held by a compaction throughout: one at a time, whoever starts it.
    one_at_a_time: Mutex<()>,
    /// A compaction failed after publishing: nothing more may be acknowledged.
    fatal: Mutex<Option<String>>,
    compactions: AtomicU64,
    /// The data file's length at which the next compaction starts.
    compact_at: AtomicU64,
}

impl Generations {
    /// Opens the live generation of the journal in `dir` (creating the first one).
    pub(crate) fn open(dir: &Path, opts: &SledOptions) -> Result<Arc<Generations>, JournalError> {
        let found = generation::current(dir)?;
        let layout = found.unwrap_or(Layout::Generation(0));
        generation::remove_stale(dir, layout)?;
        let current = Generation::open(dir, layout, opts)?;
        if found.is_none() {
            generation::publish(dir, layout)?;
        }
        // A journal that is already bloated is compacted at the first chance.
        let live = current.live_bytes()?;
        let gens = Generations {
            dir: dir.to_owned(),
            opts: opts.clone(),
            current: RwLock::new(Arc::new(current)),
            writing: RwLock::new(()),
            touched: Mutex::new(None),
            running: AtomicBool::new(false),
            one_at_a_time: Mutex::new(()),
            fatal: Mutex::new(None),
            compactions: AtomicU64::new(0),
            compact_at: AtomicU64::new(0),
        };
        gens.compact_at
            .store(gens.threshold(live), Ordering::Relaxed);
        Ok(Arc::new(gens))
    }

    /// The journal's directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn current(&self) -> Arc<Generation> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Held by an apply or a sync for its whole length.
    pub(crate) fn writing(&self) -> RwLockReadGuard<'_, ()> {
        self.writing.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether applies must report the keys they write.
    pub(crate) fn tracking(&self) -> bool {
        lock(&self.touched).is_some()
    }

    /// Keys an apply wrote (reported while [`Generations::tracking`]).
    pub(crate) fn touched(&self, keys: Option<Vec<Vec<u8>>>) {
        if let (Some(keys), Some(set)) = (keys, lock(&self.touched).as_mut()) {
            set.extend(keys);
        }
    }

    pub(crate) fn compacting(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    pub(crate) fn compactions(&self) -> u64 {
        self.compactions.load(Ordering::Relaxed)
    }

    /// The data file's length past which a store whose last compaction left `base` bytes is
    /// compacted.
    fn threshold(&self, base: u64) -> u64 {
        base.saturating_add(base.max(self.opts.compact_after_growth_bytes))
    }

    /// Called by the writer between syncs: starts a compaction on its own thread when the
    /// data file has grown past the threshold. An error is a compaction that failed after it
    /// published the new generation: the store must not be written to again.
    pub(crate) fn maintain(this: &Arc<Generations>) -> Result<(), JournalError> {
        if let Some(reason) = lock(&this.fatal).clone() {
            return Err(JournalError::Poisoned { reason });
        }
        let bytes = this.current().file_bytes();
        if bytes < this.compact_at.load(Ordering::Relaxed)
            || this.running.swap(true, Ordering::AcqRel)
        {
            return Ok(());
        }
        let gens = this.clone();
        let spawned = std::thread::Builder::new()
            .name("journal-compaction".into())
            .spawn(move || {
                match gens.compact() {
                    Ok(c) => tracing::info!(
                        path = %gens.dir.display(),
                        before_bytes = c.before_bytes,
                        after_bytes = c.after_bytes,
                        entries = c.entries,
                        ms = c.millis,
                        writers_held_ms = c.writers_held_ms,
                        "journal-compacted"
                    ),
                    Err(JournalError::Poisoned { reason }) => {
                        tracing::error!(path = %gens.dir.display(), error = %reason, "journal-compaction-failed-after-publishing");
                        *lock(&gens.fatal) = Some(reason);
                    }
                    Err(e) => {
                        // Not fatal: the store is as it was. Tried again after as much growth.
                        gens.compact_at
                            .store(gens.threshold(bytes), Ordering::Relaxed);
                        tracing::warn!(path = %gens.dir.display(), error = %e, "journal-compaction-failed");
                    }
                }
                gens.running.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            this.running.store(false, Ordering::Release);
            tracing::warn!(error = %e, "journal-compaction-thread-not-started");
        }
        Ok(())
    }

    /// Copies every live entry into the next generation and makes it the live one (see the
    /// module's documentation). An error before the new generation is published leaves the
    /// store as it was; one after it is [`JournalError::Poisoned`] (a restart opens the new
    /// one, but whether this process may go on is not known).
    pub(crate) fn compact(&self) -> Result<Compacted, JournalError> {
        let _one = lock(&self.one_at_a_time);
        let started = Instant::now();
        let old = {
            // From here on every apply reports its keys: none is under way while it starts.
            let _writers = self.writing.write().unwrap_or_else(|p| p.into_inner());
            *lock(&self.touched) = Some(HashSet::new());
            self.current()
        };
        let layout = old.layout.next();
        let result = self.copy(&old, layout);
        let (fresh, entries, writers_held_ms) = match result {
            Ok(done) => done,
            Err(e) => {
                *lock(&self.touched) = None;
                // Best effort: the next open removes it anyway.
                let _ = generation::remove_stale(&self.dir, old.layout);
                return Err(e);
            }
        };
        let after_bytes = fresh.file_bytes();
        // The old files stay open (by readers, and by `old`) until their last handle goes.
        // What cannot be removed now is removed at the next open.
        if let Err(e) = generation::remove_stale(&self.dir, layout) {
            tracing::warn!(path = %self.dir.display(), error = %e, "journal-old-generation-not-removed");
        }
        self.compact_at
            .store(self.threshold(after_bytes), Ordering::Relaxed);
        self.compactions.fetch_add(1, Ordering::Relaxed);
        Ok(Compacted {
            before_bytes: old.file_bytes(),
            after_bytes,
            entries,
            millis: started.elapsed().as_millis() as u64,
            writers_held_ms,
        })
    }

    /// The copy, then (writers held off) the keys written meanwhile, the sync, the
    /// publication and the swap. Answers the new generation, the entries copied and how long
    /// writers waited.
    fn copy(
        &self,
        old: &Arc<Generation>,
        layout: Layout,
    ) -> Result<(Arc<Generation>, u64, u64), JournalError> {
        let path = layout.path(&self.dir);
        generation::remove_stale(&self.dir, old.layout)?;
        let fresh = Generation::open(&self.dir, layout, &self.opts)?;
        let mut batch = sled::Batch::default();
        let (mut entries, mut in_batch) = (0u64, 0usize);
        let mut working = Instant::now();
        for item in old.db.iter() {
            let (k, v) = item.map_err(|e| sled_err("cannot read for compaction", e))?;
            batch.insert(k, v);
            entries += 1;
            in_batch += 1;
            if in_batch == COMPACTION_BATCH {
                fresh
                    .db
                    .apply_batch(std::mem::take(&mut batch))
                    .map_err(|e| sled_err("cannot write the compacted journal", e))?;
                in_batch = 0;
                // At most half a core: the copy is not urgent, the commits it runs beside are.
                std::thread::sleep(working.elapsed());
                working = Instant::now();
            }
        }
        settle(&fresh, batch, &path)?;
        // Keys written during the copy are copied again, twice without holding commits off
        // (each pass is shorter than the last, and notes fewer keys), then once holding them.
        for _ in 0..2 {
            let touched = lock(&self.touched)
                .replace(HashSet::new())
                .unwrap_or_default();
            settle(&fresh, recopy(old, touched)?, &path)?;
        }
        let writers = self.writing.write().unwrap_or_else(|p| p.into_inner());
        let held = Instant::now();
        let touched = lock(&self.touched).take().unwrap_or_default();
        settle(&fresh, recopy(old, touched)?, &path)?;
        generation::publish(&self.dir, layout).map_err(|e| JournalError::Poisoned {
            reason: format!("the journal's compaction could not be published: {e}"),
        })?;
        let fresh = Arc::new(fresh);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        drop(writers);
        Ok((fresh, entries, held.elapsed().as_millis() as u64))
    }
}

/// One sled database (see [`generation`]).
pub(crate) struct Generation {
    pub(crate) db: sled::Db,
    layout: Layout,
    /// Its directory.
    path: PathBuf,
    /// sled's data file, opened once, synced after every flush.
    pub(crate) data_file: File,
    pub(crate) data_path: PathBuf,
    /// Blob files already synced (sled writes large pages to their own files).
    synced_blobs: Mutex<HashSet<std::ffi::OsString>>,
}

/// What one compaction did, for the log and the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub before_bytes: u64,
    pub after_bytes: u64,
    pub entries: u64,
    pub millis: u64,
    /// How long commits waited for it.
    pub writers_held_ms: u64,
}

/// Entries per sled batch when a compaction copies them.
const COMPACTION_BATCH: usize = 10_000;

impl Generation {
    pub(crate) fn open(
        dir: &Path,
        layout: Layout,
        opts: &SledOptions,
    ) -> Result<Self, JournalError> {
        let path = layout.path(dir);
        let config = sled::Config::new()
            .path(&path)
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
        let data_path = path.join("db");
        let data_file = File::open(&data_path)
            .map_err(|e| io_err("cannot open sled's data file", &data_path, e))?;
        Ok(Generation {
            db,
            layout,
            data_file,
            data_path,
            path,
            synced_blobs: Mutex::new(HashSet::new()),
        })
    }

    pub(crate) fn file_bytes(&self) -> u64 {
        self.data_file.metadata().map_or(0, |m| m.len())
    }

    /// Bytes of every key and value.
    fn live_bytes(&self) -> Result<u64, JournalError> {
        let mut total = 0u64;
        for item in self.db.iter() {
            let (k, v) = item.map_err(|e| sled_err("cannot read", e))?;
            total += (k.len() + v.len()) as u64;
        }
        Ok(total)
    }

    pub(crate) fn sync_new_blobs(&self) -> Result<(), JournalError> {
        let blobs = self.path.join("blobs");
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
}

/// A batch that sets each of `keys` in the new generation as it is in `old` now.
fn recopy(old: &Generation, keys: HashSet<Vec<u8>>) -> Result<sled::Batch, JournalError> {
    let mut batch = sled::Batch::default();
    for key in keys {
        match old
            .db
            .get(&key)
            .map_err(|e| sled_err("cannot read for compaction", e))?
        {
            Some(v) => batch.insert(key, v),
            None => batch.remove(key),
        }
    }
    Ok(batch)
}

/// Applies `batch` to the new generation and makes all of it durable.
fn settle(fresh: &Generation, batch: sled::Batch, path: &Path) -> Result<(), JournalError> {
    fresh
        .db
        .apply_batch(batch)
        .map_err(|e| sled_err("cannot write the compacted journal", e))?;
    fresh
        .db
        .flush()
        .map_err(|e| sled_err("cannot flush the compacted journal", e))?;
    generation::sync_tree(path)
}
