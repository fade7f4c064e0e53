//! Blobs: append-only byte strings (a step's log) kept in files of their own beside sled.
//!
//! sled gives back the space of deleted values lazily: a server streaming step output and
//! pruning old deployments grew its journal five-fold in five minutes while the live data
//! stayed flat. A blob lives in its own file, so deleting it frees its space at once.
//!
//! The protocol that keeps a blob as durable as a record:
//! - Its committed length is a meta entry (`blob/<name>`) written in the same sled batch as
//!   the append. The bytes are written at that length and made durable (`fdatasync`, and the
//!   directory's `fsync` for a new file) **before** the batch is applied, so sled can never
//!   hold a length whose bytes are not on disk.
//! - Bytes past the committed length (a batch that died before its commit) are never read
//!   and are overwritten by the next append.
//! - A deleted blob's file is removed after the sync that makes the deletion durable; files
//!   with no committed length (a crash in between) are removed at open.
//!
//! File names are the SHA-256 of the blob's name, under 256 subdirectories, so any
//! [`LogName`] maps to a safe path and no directory grows past a few thousand entries.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::journal::record::LogName;
use crate::journal::JournalError;

/// Meta key prefix of a blob's committed length.
pub(crate) const LENGTH_KEY_PREFIX: &str = "blob/";

/// The meta key holding `name`'s committed length.
pub(crate) fn length_key(name: &LogName) -> String {
    format!("{LENGTH_KEY_PREFIX}{name}")
}

pub(crate) fn encode_length(len: u64) -> Vec<u8> {
    len.to_be_bytes().to_vec()
}

pub(crate) fn decode_length(value: &[u8]) -> Result<u64, String> {
    let bytes: [u8; 8] = value
        .try_into()
        .map_err(|_| format!("a blob length of {} bytes (8 expected)", value.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

fn io_err(context: &str, path: &Path, e: std::io::Error) -> JournalError {
    JournalError::Io {
        context: format!("{context} {}", path.display()),
        reason: e.to_string(),
    }
}

/// The directory of blob files and the deletions waiting for their sync.
pub(crate) struct BlobFiles {
    dir: PathBuf,
    pending_deletes: Mutex<HashSet<PathBuf>>,
}

/// Appends of one batch, gathered per file: written, then synced once each.
#[derive(Default)]
pub(crate) struct Appends {
    files: HashMap<PathBuf, File>,
    /// Directories that gained a file.
    new_dirs: HashSet<PathBuf>,
}

impl BlobFiles {
    pub(crate) fn open(dir: &Path) -> Result<Self, JournalError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, e))?;
        Ok(BlobFiles {
            dir: dir.to_owned(),
            pending_deletes: Mutex::new(HashSet::new()),
        })
    }

    pub(crate) fn path(&self, name: &LogName) -> PathBuf {
        let digest = hex::encode(Sha256::digest(name.as_str().as_bytes()));
        let (shard, rest) = digest.split_at(2);
        self.dir.join(shard).join(rest)
    }

    /// Write `bytes` at `at` in `name`'s file (created if absent). Durable once
    /// [`BlobFiles::sync_appends`] returned.
    pub(crate) fn write_at(
        &self,
        appends: &mut Appends,
        name: &LogName,
        at: u64,
        bytes: &[u8],
    ) -> Result<(), JournalError> {
        let path = self.path(name);
        // A blob deleted and written again before the deletion's sync keeps its new file.
        self.pending()?.remove(&path);
        if !appends.files.contains_key(&path) {
            let shard = path.parent().unwrap_or(&self.dir).to_owned();
            let existed = path.exists();
            if !existed {
                std::fs::create_dir_all(&shard).map_err(|e| io_err("cannot create", &shard, e))?;
                appends.new_dirs.insert(shard);
            }
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| io_err("cannot open blob", &path, e))?;
            appends.files.insert(path.clone(), file);
        }
        if let Some(file) = appends.files.get(&path) {
            file.write_all_at(bytes, at)
                .map_err(|e| io_err("cannot write blob", &path, e))?;
        }
        Ok(())
    }

    /// Make a batch's appends durable: `fdatasync` each file, then `fsync` the directories
    /// that gained one. A failure poisons the journal, as sled's would.
    pub(crate) fn sync_appends(&self, appends: Appends) -> Result<(), JournalError> {
        for (path, file) in &appends.files {
            file.sync_data().map_err(|e| JournalError::Poisoned {
                reason: format!("fdatasync of {} failed: {e}", path.display()),
            })?;
        }
        // A new file's name is durable once its directory is synced (and a new shard's, once
        // the top directory is).
        for dir in &appends.new_dirs {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err("cannot fsync", dir, e))?;
        }
        if !appends.new_dirs.is_empty() {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err("cannot fsync", &self.dir, e))?;
        }
        Ok(())
    }

    /// Remove `name`'s file once the batch deleting its length is durable.
    pub(crate) fn delete_after_sync(&self, name: &LogName) -> Result<(), JournalError> {
        let path = self.path(name);
        self.pending()?.insert(path);
        Ok(())
    }

    /// Remove the files of every deletion made durable by the sync that just returned.
    pub(crate) fn remove_deleted(&self, deleted: HashSet<PathBuf>) -> Result<(), JournalError> {
        for path in deleted {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("cannot remove blob", &path, e)),
            }
        }
        Ok(())
    }

    /// Deletions queued so far (taken before a sync begins: only those are covered by it).
    pub(crate) fn take_deleted(&self) -> Result<HashSet<PathBuf>, JournalError> {
        Ok(std::mem::take(&mut *self.pending()?))
    }

    /// Up to `max` bytes of `name` from `offset`, never past `committed`.
    pub(crate) fn read(
        &self,
        name: &LogName,
        committed: u64,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, JournalError> {
        let want = committed.saturating_sub(offset).min(max as u64) as usize;
        if want == 0 {
            return Ok(Vec::new());
        }
        let path = self.path(name);
        let file = File::open(&path).map_err(|e| io_err("cannot open blob", &path, e))?;
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => {
                    return Err(JournalError::Corrupt {
                        path: path.clone(),
                        key: name.to_string(),
                        reason: format!(
                            "the file ends at {} bytes, but {committed} are committed",
                            offset + got as u64
                        ),
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("cannot read blob", &path, e)),
            }
        }
        Ok(buf)
    }

    /// Remove every file that no committed blob owns (a deletion or a first append cut
    /// short by a crash). Returns how many went.
    pub(crate) fn remove_orphans(&self, live: &[LogName]) -> Result<usize, JournalError> {
        let keep: HashSet<PathBuf> = live.iter().map(|n| self.path(n)).collect();
        let mut removed = 0;
        let shards =
            std::fs::read_dir(&self.dir).map_err(|e| io_err("cannot list", &self.dir, e))?;
        for shard in shards {
            let shard = shard
                .map_err(|e| io_err("cannot list", &self.dir, e))?
                .path();
            if !shard.is_dir() {
                continue;
            }
            let files = std::fs::read_dir(&shard).map_err(|e| io_err("cannot list", &shard, e))?;
            for file in files {
                let path = file.map_err(|e| io_err("cannot list", &shard, e))?.path();
                if !keep.contains(&path) {
                    std::fs::remove_file(&path)
                        .map_err(|e| io_err("cannot remove orphan blob", &path, e))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    fn pending(&self) -> Result<std::sync::MutexGuard<'_, HashSet<PathBuf>>, JournalError> {
        self.pending_deletes
            .lock()
            .map_err(|_| JournalError::Poisoned {
                reason: "blob deletion bookkeeping lock poisoned".into(),
            })
    }
}
