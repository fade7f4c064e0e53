//! [`Cache`]: the relay's on-disk, content-addressed cache of artifacts and plugin bundles,
//! `<cache dir>/<kind>/<sha256>` with kind `artifacts` or `plugins`.
//!
//! An entry is written through an [`Incoming`] temporary file (`.part-*` beside its final
//! place) that hashes what it is given; [`Cache::commit`] keeps it only if the sha256 matches,
//! after fsync, by rename (then fsync of the directory). Past `max_bytes`, least recently used
//! entries (use tracked in memory) are deleted, never the one just committed. At start the
//! directories are scanned: leftover temporary files are deleted, names that are not a sha256
//! are ignored, the rest is indexed oldest modification first.
//!
//! Every method does file I/O: call it from a blocking thread (`web::block`). The index lock
//! is held across the few syscalls that must agree with it (open, rename, unlink), never
//! across an await.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// Name prefix of temporary files; never a sha256.
const TEMP_PREFIX: &str = ".part-";

/// What a cached object is, and the directory (and URL segment) it lives under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Artifacts (`/agent/v1/artifacts/{sha256}`).
    Artifacts,
    /// Plugin bundles (`/agent/v1/plugins/{sha256}`).
    Plugins,
    /// Agent upgrade packages (`/agent/v1/upgrades/{sha256}`).
    Upgrades,
}

impl Kind {
    /// Every kind, for the recovery scan.
    pub const ALL: [Kind; 3] = [Kind::Artifacts, Kind::Plugins, Kind::Upgrades];

    /// Directory name, and the path segment after `/agent/v1/`.
    pub fn dir_name(self) -> &'static str {
        match self {
            Kind::Artifacts => "artifacts",
            Kind::Plugins => "plugins",
            Kind::Upgrades => "upgrades",
        }
    }
}

/// One cached object: its kind and lowercase hex sha256.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Which directory.
    pub kind: Kind,
    /// 64 lowercase hex digits (checked with [`is_sha256`] before a key is made).
    pub sha256: String,
}

/// `true` for exactly 64 lowercase hex digits: the only names the cache stores or looks up.
pub fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Why an entry was not committed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The content's sha256 is not the one it was fetched under; nothing was kept.
    #[error("content of {len} bytes has sha256 {got}, expected {expected}")]
    Mismatch {
        /// The sha256 asked for.
        expected: String,
        /// The sha256 of what arrived.
        got: String,
        /// Bytes that arrived.
        len: u64,
    },
    /// Writing, syncing or renaming failed.
    #[error("cache I/O: {0}")]
    Io(#[from] io::Error),
}

/// A cache entry opened for reading (the open file stays valid even if it is evicted).
#[derive(Debug)]
pub struct Hit {
    /// The open file.
    pub file: File,
    /// Where it is (for content type and logs).
    pub path: PathBuf,
    /// Its size.
    pub len: u64,
}

/// Size and recency of one entry.
#[derive(Debug, Clone, Copy)]
struct Entry {
    len: u64,
    /// Value of [`Index::clock`] at the last use; the smallest is evicted first.
    last_used: u64,
}

/// What is on disk, as far as the cache knows.
#[derive(Debug, Default)]
struct Index {
    entries: HashMap<CacheKey, Entry>,
    /// Sum of the entries' sizes.
    total_bytes: u64,
    /// Ticks once per use: a recency order that needs no clock.
    clock: u64,
}

impl Index {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some(e) = self.entries.remove(key) {
            self.total_bytes = self.total_bytes.saturating_sub(e.len);
        }
    }
}

/// The on-disk cache.
#[derive(Debug)]
pub struct Cache {
    /// Holds one directory per [`Kind`].
    root: PathBuf,
    /// Evict down to this many bytes after each commit.
    max_bytes: u64,
    index: Mutex<Index>,
    /// Makes temporary file names unique within the process.
    temp_counter: AtomicU64,
}

impl Cache {
    /// Opens (creating the directories) and indexes the cache under `root`, deleting leftover
    /// temporary files and evicting down to `max_bytes`.
    pub fn open(root: PathBuf, max_bytes: u64) -> io::Result<Cache> {
        let mut found: Vec<(SystemTime, CacheKey, u64)> = Vec::new();
        for kind in Kind::ALL {
            let dir = root.join(kind.dir_name());
            fs::create_dir_all(&dir)?;
            for item in fs::read_dir(&dir)? {
                let item = item?;
                let name = item.file_name();
                let Some(name) = name.to_str() else {
                    tracing::warn!(path = %item.path().display(), "cache-file-ignored");
                    continue;
                };
                if name.starts_with(TEMP_PREFIX) {
                    fs::remove_file(item.path())?;
                    tracing::info!(path = %item.path().display(), "cache-temp-file-deleted");
                    continue;
                }
                let meta = item.metadata()?;
                if !is_sha256(name) || !meta.is_file() {
                    tracing::warn!(path = %item.path().display(), "cache-file-ignored");
                    continue;
                }
                let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                let key = CacheKey {
                    kind,
                    sha256: name.to_owned(),
                };
                found.push((modified, key, meta.len()));
            }
        }
        found.sort_by_key(|(modified, _, _)| *modified);
        let mut index = Index::default();
        for (_, key, len) in found {
            let last_used = index.tick();
            index.total_bytes += len;
            index.entries.insert(key, Entry { len, last_used });
        }
        let cache = Cache {
            root,
            max_bytes,
            index: Mutex::new(index),
            temp_counter: AtomicU64::new(0),
        };
        {
            let mut index = cache.lock();
            cache.evict(&mut index, None);
            tracing::info!(root = %cache.root.display(), files = index.entries.len(), bytes = index.total_bytes, "cache-opened");
        }
        Ok(cache)
    }

    /// Where the entry `key` lives (whether or not it exists).
    pub fn path(&self, key: &CacheKey) -> PathBuf {
        self.root.join(key.kind.dir_name()).join(&key.sha256)
    }

    /// The entry `key`, opened and marked used; `None` if it is not cached.
    pub fn get(&self, key: &CacheKey) -> io::Result<Option<Hit>> {
        let mut index = self.lock();
        if !index.entries.contains_key(key) {
            return Ok(None);
        }
        let path = self.path(key);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), "cache-entry-vanished");
                index.remove(key);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let tick = index.tick();
        let len = index.entries.get_mut(key).map_or(0, |e| {
            e.last_used = tick;
            e.len
        });
        Ok(Some(Hit { file, path, len }))
    }

    /// A new temporary file for an object of `kind`, to be [`Cache::commit`]ted.
    pub fn begin(&self, kind: Kind) -> io::Result<Incoming> {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let path = self
            .root
            .join(kind.dir_name())
            .join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Incoming {
            file,
            path,
            hasher: Sha256::new(),
            len: 0,
            kept: false,
        })
    }

    /// Keeps `incoming` as the entry `key` if its sha256 matches (the temporary file is
    /// deleted otherwise), then evicts down to the bound; returns the entry opened.
    pub fn commit(&self, mut incoming: Incoming, key: &CacheKey) -> Result<Hit, CacheError> {
        let got = hex::encode(incoming.hasher.clone().finalize());
        if got != key.sha256 {
            return Err(CacheError::Mismatch {
                expected: key.sha256.clone(),
                got,
                len: incoming.len,
            });
        }
        incoming.file.flush()?;
        incoming.file.sync_all()?;
        let path = self.path(key);
        let hit = {
            let mut index = self.lock();
            fs::rename(&incoming.path, &path)?;
            incoming.kept = true;
            let file = File::open(&path)?;
            index.remove(key);
            let last_used = index.tick();
            index.total_bytes += incoming.len;
            index.entries.insert(
                key.clone(),
                Entry {
                    len: incoming.len,
                    last_used,
                },
            );
            self.evict(&mut index, Some(key));
            Hit {
                file,
                path,
                len: incoming.len,
            }
        };
        if let Some(dir) = hit.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(hit)
    }

    /// Entries and bytes cached now.
    pub fn usage(&self) -> (u64, u64) {
        let index = self.lock();
        (index.entries.len() as u64, index.total_bytes)
    }

    /// Deletes least recently used entries, never `keep`, until the total fits the bound.
    fn evict(&self, index: &mut Index, keep: Option<&CacheKey>) {
        while index.total_bytes > self.max_bytes {
            let victim = index
                .entries
                .iter()
                .filter(|(k, _)| Some(*k) != keep)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else { break };
            let path = self.path(&victim);
            match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(sha256 = %victim.sha256, kind = victim.kind.dir_name(), "cache-entry-evicted")
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Forgotten all the same: a file the relay cannot delete must not stop it.
                Err(e) => tracing::error!(path = %path.display(), error = %e, "cache-evict-failed"),
            }
            index.remove(&victim);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A temporary file being filled, hashed as it goes; deleted on drop unless committed.
#[derive(Debug)]
pub struct Incoming {
    file: File,
    path: PathBuf,
    hasher: Sha256,
    /// Bytes written so far.
    len: u64,
    /// Renamed into the cache: nothing to delete.
    kept: bool,
}

impl Incoming {
    /// Appends `bytes` to the file and the hash.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.kept {
            if let Err(e) = fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.path.display(), error = %e, "cache-temp-file-left");
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use std::io::Read;
    use std::path::Path;

    fn key(kind: Kind, content: &[u8]) -> CacheKey {
        CacheKey {
            kind,
            sha256: hex::encode(Sha256::digest(content)),
        }
    }

    fn put(cache: &Cache, kind: Kind, content: &[u8]) -> CacheKey {
        let k = key(kind, content);
        let mut incoming = cache.begin(kind).unwrap();
        incoming.write(content).unwrap();
        cache.commit(incoming, &k).unwrap();
        k
    }

    fn read(hit: Hit) -> Vec<u8> {
        let mut out = Vec::new();
        let mut file = hit.file;
        file.read_to_end(&mut out).unwrap();
        out
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn inserts_and_finds_by_kind_and_sha() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().to_owned(), 1 << 20).unwrap();
        let k = put(&cache, Kind::Artifacts, b"hello");
        assert_eq!(read(cache.get(&k).unwrap().unwrap()), b"hello");
        assert_eq!(cache.path(&k), dir.path().join("artifacts").join(&k.sha256));
        let other_kind = CacheKey {
            kind: Kind::Plugins,
            sha256: k.sha256.clone(),
        };
        assert!(cache.get(&other_kind).unwrap().is_none());
        assert_eq!(cache.usage(), (1, 5));
        // Only the entry is left: no temporary file.
        assert_eq!(files_in(&dir.path().join("artifacts")), vec![k.sha256]);
    }

    #[test]
    fn refuses_content_whose_sha_differs_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().to_owned(), 1 << 20).unwrap();
        let k = key(Kind::Plugins, b"expected");
        let mut incoming = cache.begin(Kind::Plugins).unwrap();
        incoming.write(b"something else").unwrap();
        assert_eq!(files_in(&dir.path().join("plugins")).len(), 1);
        match cache.commit(incoming, &k) {
            Err(CacheError::Mismatch { expected, got, len }) => {
                assert_eq!(expected, k.sha256);
                assert_eq!(got, hex::encode(Sha256::digest(b"something else")));
                assert_eq!(len, 14);
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
        assert!(cache.get(&k).unwrap().is_none());
        assert!(files_in(&dir.path().join("plugins")).is_empty());
        assert_eq!(cache.usage(), (0, 0));
    }

    #[test]
    fn dropped_incoming_deletes_its_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().to_owned(), 1 << 20).unwrap();
        let mut incoming = cache.begin(Kind::Artifacts).unwrap();
        incoming.write(b"partial").unwrap();
        drop(incoming);
        assert!(files_in(&dir.path().join("artifacts")).is_empty());
    }

    #[test]
    fn evicts_least_recently_used_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().to_owned(), 25).unwrap();
        let a = put(&cache, Kind::Artifacts, &[b'a'; 10]);
        let b = put(&cache, Kind::Artifacts, &[b'b'; 10]);
        // `a` used after `b`: `b` is now the least recently used.
        assert!(cache.get(&a).unwrap().is_some());
        let c = put(&cache, Kind::Plugins, &[b'c'; 10]);
        assert!(cache.get(&b).unwrap().is_none());
        assert!(!cache.path(&b).exists());
        assert!(cache.get(&a).unwrap().is_some());
        assert!(cache.get(&c).unwrap().is_some());
        assert_eq!(cache.usage(), (2, 20));
        // An entry larger than the bound evicts everything else but is kept itself.
        let big = put(&cache, Kind::Artifacts, &[b'd'; 40]);
        assert_eq!(cache.usage(), (1, 40));
        assert_eq!(read(cache.get(&big).unwrap().unwrap()), vec![b'd'; 40]);
    }

    #[test]
    fn recovery_indexes_entries_and_deletes_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let cache = Cache::open(dir.path().to_owned(), 1 << 20).unwrap();
            let a = put(&cache, Kind::Artifacts, b"first");
            let b = put(&cache, Kind::Plugins, b"second!");
            // A download interrupted by a crash.
            let mut incoming = cache.begin(Kind::Artifacts).unwrap();
            incoming.write(b"half").unwrap();
            std::mem::forget(incoming);
            (a, b)
        };
        let artifacts = dir.path().join("artifacts");
        fs::write(artifacts.join("README"), b"not a sha").unwrap();
        fs::write(artifacts.join("A".repeat(64)), b"uppercase is not ours").unwrap();
        assert_eq!(files_in(&artifacts).len(), 4);

        let cache = Cache::open(dir.path().to_owned(), 1 << 20).unwrap();
        assert_eq!(cache.usage(), (2, 12));
        assert_eq!(read(cache.get(&a).unwrap().unwrap()), b"first");
        assert_eq!(read(cache.get(&b).unwrap().unwrap()), b"second!");
        let mut left = files_in(&artifacts);
        left.retain(|n| n.starts_with(TEMP_PREFIX));
        assert!(left.is_empty(), "temp files left: {left:?}");
        // Foreign files are ignored, not deleted.
        assert!(artifacts.join("README").exists());
        assert!(artifacts.join("A".repeat(64)).exists());

        // Reopened with a smaller bound: evicted down to it at start.
        drop(cache);
        let cache = Cache::open(dir.path().to_owned(), 8).unwrap();
        assert_eq!(cache.usage().0, 1);
        assert!(cache.usage().1 <= 8);
    }

    #[test]
    fn sha256_names_are_exactly_64_lowercase_hex() {
        assert!(is_sha256(&"0a".repeat(32)));
        assert!(!is_sha256(&"0A".repeat(32)));
        assert!(!is_sha256(&"0a".repeat(31)));
        assert!(!is_sha256(&format!("{}g", "0".repeat(63))));
        assert!(!is_sha256("../../etc/passwd"));
        assert!(!is_sha256(""));
    }
}
