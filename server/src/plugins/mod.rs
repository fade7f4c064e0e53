//! Uploaded plugins on the server: the store of bundles and its index.
//!
//! A bundle is a tar.gz holding `plugin.toml` and the files its steps' commands name. An upload
//! is checked whole (`tether_shared::plugin::inspect_bundle`: readable, safe entries only, a
//! valid manifest, every command file present) before anything is written; then the bundle is
//! stored content-addressed as `DATA/plugins/<sha256>.tar.gz` (temporary file, fsync, rename,
//! so a failed upload leaves nothing visible) and the index entry `plugin/<name>` → [`PluginRecord`]
//! is committed to the journal's meta entries. A newer version replaces the entry; the same
//! version with other content, or an older version, is a conflict. Replaced bundles stay on
//! disk: jobs already resolved against them may still fetch them.
//!
//! [`Plugins`] is the [`Catalog`] deployments validate uploaded plugin steps against.
//!
//! - [`api`]: `POST/GET /api/v1/plugins` and the agents' `GET /agent/v1/plugins/{sha256}`.

pub mod api;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tether_shared::journal::{JournalError, JournalHandle, Op};
use tether_shared::plugin::{inspect_bundle, Manifest};

use crate::deployments::validate::{built_ins, Catalog, CatalogEntry};
use crate::registry::now_unix_ms;

/// The bundles' directory inside the data directory.
pub const PLUGINS_DIR: &str = "plugins";
/// Meta key prefix of the index.
pub const PLUGIN_PREFIX: &str = "plugin/";

/// Why a plugin operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginsError {
    /// The bundle is unusable; every problem is listed.
    #[error("invalid plugin bundle: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// Another bundle holds this name and version, or a newer version is stored.
    #[error("{0}")]
    Conflict(String),
    /// Writing the bundle failed; nothing was stored.
    #[error("cannot store the bundle: {0}")]
    Io(#[from] std::io::Error),
    /// The journal refused the index entry; nothing was stored.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A stored index entry could not be decoded at load.
    #[error("plugin entry {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// The index entry of one plugin: its current version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRecord {
    pub name: String,
    pub version: String,
    /// sha256 (hex) of the bundle, its file name in `DATA/plugins/`.
    pub sha256: String,
    pub size: u64,
    pub manifest: Manifest,
    pub uploaded_unix_ms: u64,
}

/// What an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// A new plugin or a newer version.
    Created,
    /// The very same bundle was already the current version.
    Unchanged,
}

/// The plugin store; share as `Arc<Plugins>`.
pub struct Plugins {
    journal: JournalHandle,
    dir: PathBuf,
    index: RwLock<BTreeMap<String, PluginRecord>>,
    /// Serializes uploads (check, write, commit, apply as one step).
    changes: tokio::sync::Mutex<()>,
    /// Bundle downloads by agents since start, by sha256 (shows cache hits in tests and ops).
    downloads: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for Plugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugins")
            .field("dir", &self.dir)
            .field("plugins", &self.read().len())
            .finish_non_exhaustive()
    }
}

/// `true` for 64 lowercase hex digits (a sha256 as we name files).
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Plugins {
    /// Reads the index from the journal's meta entries; bundles live in `data_dir/plugins`.
    pub fn load(journal: JournalHandle, data_dir: &Path) -> Result<Plugins, PluginsError> {
        let mut index = BTreeMap::new();
        for (key, value) in journal.scan_meta(PLUGIN_PREFIX)? {
            let r: PluginRecord =
                serde_json::from_slice(&value).map_err(|e| PluginsError::Corrupt {
                    key: key.clone(),
                    reason: e.to_string(),
                })?;
            index.insert(r.name.clone(), r);
        }
        tracing::info!(plugins = index.len(), "plugins-loaded");
        Ok(Plugins {
            journal,
            dir: data_dir.join(PLUGINS_DIR),
            index: RwLock::new(index),
            changes: tokio::sync::Mutex::new(()),
            downloads: Mutex::new(HashMap::new()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, PluginRecord>> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every plugin's current version.
    pub fn list(&self) -> Vec<PluginRecord> {
        self.read().values().cloned().collect()
    }

    /// Where the bundle with `sha256` is (whether or not it exists).
    pub fn bundle_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.tar.gz"))
    }

    /// Counts one download of `sha256`.
    pub fn count_download(&self, sha256: &str) {
        let mut d = self
            .downloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *d.entry(sha256.to_owned()).or_default() += 1;
    }

    /// Downloads of `sha256` since the server started.
    pub fn downloads(&self, sha256: &str) -> u64 {
        let d = self
            .downloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        d.get(sha256).copied().unwrap_or(0)
    }

    /// Checks and stores an uploaded bundle; nothing is visible unless it all succeeds.
    pub async fn upload(&self, bundle: Vec<u8>) -> Result<(PluginRecord, Stored), PluginsError> {
        let bundle = Arc::new(bundle);
        let checked = bundle.clone();
        let (manifest, sha256) = tokio::task::spawn_blocking(move || {
            let manifest = inspect_bundle(&checked[..]).map_err(PluginsError::Invalid)?;
            Ok::<_, PluginsError>((manifest, hex::encode(Sha256::digest(&checked[..]))))
        })
        .await
        .map_err(|e| PluginsError::Io(std::io::Error::other(e.to_string())))??;
        if built_ins().iter().any(|b| b.name == manifest.name) {
            return Err(PluginsError::Invalid(vec![format!(
                "plugin name {:?} is reserved for a built-in plugin",
                manifest.name
            )]));
        }
        let _guard = self.changes.lock().await;
        if let Some(current) = self.read().get(&manifest.name) {
            let (old, new) = (current.manifest.semver(), manifest.semver());
            if current.version == manifest.version || old == new {
                if current.sha256 == sha256 {
                    return Ok((current.clone(), Stored::Unchanged));
                }
                return Err(PluginsError::Conflict(format!(
                    "plugin {} {} is already stored with other content (sha256 {}); upload it with a new version",
                    manifest.name, manifest.version, current.sha256
                )));
            }
            if new < old {
                return Err(PluginsError::Conflict(format!(
                    "plugin {} {} is older than the stored version {}",
                    manifest.name, manifest.version, current.version
                )));
            }
        }
        let record = PluginRecord {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            sha256: sha256.clone(),
            size: bundle.len() as u64,
            manifest,
            uploaded_unix_ms: now_unix_ms(),
        };
        let (dir, path) = (self.dir.clone(), self.bundle_path(&sha256));
        let created = tokio::task::spawn_blocking(move || write_bundle(&dir, &path, &bundle))
            .await
            .map_err(|e| PluginsError::Io(std::io::Error::other(e.to_string())))??;
        let op = Op::PutMeta {
            key: format!("{PLUGIN_PREFIX}{}", record.name),
            value: serde_json::to_vec(&record).unwrap_or_default(),
        };
        if let Err(e) = self.journal.commit(vec![op]).await {
            if created {
                let _ = std::fs::remove_file(self.bundle_path(&sha256));
            }
            return Err(e.into());
        }
        self.index
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(record.name.clone(), record.clone());
        tracing::info!(plugin = %record.name, version = %record.version, sha256 = %record.sha256, "plugin-stored");
        Ok((record, Stored::Created))
    }
}

/// Writes `bytes` to `path` through a temporary file in `dir` (fsync, rename, fsync of the
/// directory). `Ok(false)` if the file was there already (content-addressed: same bytes).
fn write_bundle(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".upload-{:016x}", rand::rngs::OsRng.next_u64()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(true)
}

impl Catalog for Plugins {
    fn uploaded(&self, name: &str) -> Option<CatalogEntry> {
        self.read().get(name).map(|r| CatalogEntry {
            manifest: Arc::new(r.manifest.clone()),
            bundle_sha256: Some(r.sha256.clone()),
        })
    }

    fn uploaded_all(&self) -> Vec<Arc<Manifest>> {
        self.read()
            .values()
            .map(|r| Arc::new(r.manifest.clone()))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn bundles_are_written_whole_or_not_at_all() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("plugins");
        let path = dir.join("x.tar.gz");
        assert!(write_bundle(&dir, &path, b"abc").unwrap());
        assert!(!write_bundle(&dir, &path, b"abc").unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left");
        assert!(is_sha256(&"a0".repeat(32)));
        assert!(!is_sha256(&"A0".repeat(32)) && !is_sha256("../x"));
    }
}
