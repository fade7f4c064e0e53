//! The artifact store: operators upload versioned files, agents download them by sha256.
//!
//! Content-addressed blobs live in `DATA/artifacts/sha256/<hex>`; the index maps
//! `artifact/<name>/<version>` (journal meta, JSON [`ArtifactEntry`]) to a blob and is held in
//! memory too. An upload streams to `DATA/artifacts/tmp/` while it is hashed, and is published
//! only when complete and checked: blob renamed into place and the directory fsynced, then the
//! index entry committed. A failed or abandoned upload leaves nothing visible: its temp file is
//! deleted (and leftovers of a crash are swept at start).
//!
//! - [`routes`]: the REST routes on the HTTPS listener and the agents' download route.
//! - [`upload`]: the streaming `PUT` handler.
//!
//! At deployment time, `artifact/fetch` steps get the `sha256` and `size` of their artifact
//! through the [`ArtifactLookup`] this store installs in `deployments::validate`.

pub mod routes;
pub mod upload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse, ResponseError};
use serde::{Deserialize, Serialize};
use tether_shared::enroll::name_problem;
use tether_shared::journal::{JournalHandle, Op};

use crate::admin_token::AdminToken;
use crate::api_error::ApiError;
use crate::deployments::validate::ArtifactLookup;
use crate::registry::Registry;

pub use routes::{configure_agent, configure_api};

/// Largest artifact accepted by default.
pub const DEFAULT_MAX_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Overrides [`DEFAULT_MAX_BYTES`] (tests use a small value).
pub const MAX_BYTES_ENV: &str = "TETHER_ARTIFACT_MAX_BYTES";
/// Journal meta prefix of the index.
pub const INDEX_PREFIX: &str = "artifact/";

/// One published artifact version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactEntry {
    /// Lowercase hex sha256 of the content: the blob's name.
    pub sha256: String,
    pub size: u64,
    pub uploaded_unix_ms: u64,
}

/// Why an artifact request failed; rendered as `{"error": "..."}` like [`ApiError`].
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The body is, or is declared, larger than the limit.
    #[error("artifact larger than the limit of {max} bytes")]
    TooLarge { max: u64 },
    /// Missing, unknown or badly signed agent request: one answer for all.
    #[error("missing or invalid agent signature")]
    BadAgentSignature,
}

impl ResponseError for ArtifactError {
    fn status_code(&self) -> StatusCode {
        match self {
            ArtifactError::Api(e) => e.status_code(),
            ArtifactError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ArtifactError::BadAgentSignature => StatusCode::UNAUTHORIZED,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            ArtifactError::Api(e) => e.error_response(),
            other => HttpResponse::build(other.status_code())
                .json(serde_json::json!({"error": other.to_string()})),
        }
    }
}

fn bad_request(reason: String) -> ArtifactError {
    ArtifactError::Api(ApiError::BadRequest(reason))
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("artifact index: {0}")]
    Index(String),
}

/// Blobs, index and limits; shared as `web::Data<ArtifactStore>` by both listeners.
pub struct ArtifactStore {
    /// Guards the REST routes.
    token: AdminToken,
    /// Agents' keys, for the signed download route.
    registry: Arc<Registry>,
    journal: JournalHandle,
    /// `DATA/artifacts/sha256`.
    blobs: PathBuf,
    /// `DATA/artifacts/tmp`: uploads in progress.
    tmp: PathBuf,
    /// Largest upload.
    max_bytes: u64,
    /// (name, version) → entry; mirrors the journal.
    index: Arc<RwLock<BTreeMap<(String, String), ArtifactEntry>>>,
    /// Serializes publications (check, rename, commit as one step).
    publish: tokio::sync::Mutex<()>,
}

/// The deployments' view of the index.
struct IndexLookup(Arc<RwLock<BTreeMap<(String, String), ArtifactEntry>>>);

impl ArtifactLookup for IndexLookup {
    fn lookup(&self, name: &str, version: &str) -> Option<(String, u64)> {
        let index = self.0.read().unwrap_or_else(PoisonError::into_inner);
        index
            .get(&(name.to_owned(), version.to_owned()))
            .map(|e| (e.sha256.clone(), e.size))
    }
}

/// Why `value` is not a usable artifact name or version (agent-name charset, no `..`).
pub fn artifact_name_problem(what: &str, value: &str) -> Option<String> {
    name_problem(what, value).or_else(|| {
        value
            .contains("..")
            .then(|| format!("{what} {value:?} must not contain \"..\""))
    })
}

/// Whether `text` is a lowercase hex sha256.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl ArtifactStore {
    /// The index as the deployments see it (name and version to sha256 and size).
    pub fn lookup(&self) -> Arc<dyn ArtifactLookup> {
        Arc::new(IndexLookup(self.index.clone()))
    }

    /// Opens (creating) `DATA/artifacts`, sweeps abandoned uploads and loads the index.
    /// Blocking: call before the system starts serving.
    pub fn open(
        data_dir: &Path,
        journal: JournalHandle,
        registry: Arc<Registry>,
        token: AdminToken,
    ) -> Result<web::Data<ArtifactStore>, OpenError> {
        let root = data_dir.join("artifacts");
        let blobs = root.join("sha256");
        let tmp = root.join("tmp");
        for dir in [&blobs, &tmp] {
            std::fs::create_dir_all(dir).map_err(|source| OpenError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        let leftovers = std::fs::read_dir(&tmp).map_err(|source| OpenError::Io {
            path: tmp.clone(),
            source,
        })?;
        for entry in leftovers.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        let mut index = BTreeMap::new();
        let rows = journal
            .scan_meta(INDEX_PREFIX)
            .map_err(|e| OpenError::Index(e.to_string()))?;
        for (key, value) in rows {
            let Some((name, version)) = key
                .strip_prefix(INDEX_PREFIX)
                .and_then(|rest| rest.split_once('/'))
            else {
                return Err(OpenError::Index(format!("bad key {key:?}")));
            };
            let entry: ArtifactEntry = serde_json::from_slice(&value)
                .map_err(|e| OpenError::Index(format!("{key}: {e}")))?;
            index.insert((name.to_owned(), version.to_owned()), entry);
        }
        let max_bytes = std::env::var(MAX_BYTES_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(DEFAULT_MAX_BYTES);
        tracing::info!(artifacts = index.len(), max_bytes, "artifacts-loaded");
        let index = Arc::new(RwLock::new(index));
        Ok(web::Data::new(ArtifactStore {
            token,
            registry,
            journal,
            blobs,
            tmp,
            max_bytes,
            index,
            publish: tokio::sync::Mutex::new(()),
        }))
    }

    fn entry(&self, name: &str, version: &str) -> Option<ArtifactEntry> {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        index.get(&(name.to_owned(), version.to_owned())).cloned()
    }

    /// Every artifact, by name then version.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        index
            .iter()
            .map(|((name, version), e)| {
                serde_json::json!({
                    "name": name, "version": version, "sha256": e.sha256,
                    "size": e.size, "uploaded_unix_ms": e.uploaded_unix_ms,
                })
            })
            .collect()
    }

    /// Whether a published artifact has this content (a blob without an index entry, left by
    /// a failed commit, is never served).
    fn has_blob(&self, sha256: &str) -> bool {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        index.values().any(|e| e.sha256 == sha256)
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.blobs.join(sha256)
    }

    /// Publishes the complete, checked upload at `tmp` as `name`/`version`. `Ok(true)`: newly
    /// published; `Ok(false)`: the same content was already there (the temp file is dropped).
    async fn publish(
        &self,
        name: &str,
        version: &str,
        tmp: PathBuf,
        entry: ArtifactEntry,
    ) -> Result<bool, ArtifactError> {
        let _guard = self.publish.lock().await;
        if let Some(existing) = self.entry(name, version) {
            let _ = std::fs::remove_file(&tmp);
            return if existing.sha256 == entry.sha256 {
                Ok(false)
            } else {
                Err(ApiError::Conflict(format!(
                    "artifact {name}/{version} exists with other content (sha256 {})",
                    existing.sha256
                ))
                .into())
            };
        }
        let target = self.blob_path(&entry.sha256);
        let blobs = self.blobs.clone();
        let placed = web::block(move || -> std::io::Result<()> {
            if target.is_file() {
                // Same content, already stored for another name or version.
                std::fs::remove_file(&tmp)
            } else {
                std::fs::rename(&tmp, &target)?;
                std::fs::File::open(&blobs)?.sync_all()
            }
        })
        .await
        .map_err(|_| ApiError::Unavailable)?;
        if let Err(e) = placed {
            tracing::error!(error = %e, "artifact-blob-not-placed");
            return Err(ApiError::Unavailable.into());
        }
        let value = serde_json::to_vec(&entry).map_err(|_| ApiError::Unavailable)?;
        let op = Op::PutMeta {
            key: format!("{INDEX_PREFIX}{name}/{version}"),
            value,
        };
        if let Err(e) = self.journal.commit(vec![op]).await {
            tracing::error!(error = %e, "artifact-index-commit-failed");
            return Err(ApiError::Unavailable.into());
        }
        let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
        index.insert((name.to_owned(), version.to_owned()), entry);
        Ok(true)
    }
}
