//! `PUT /api/v1/artifacts/{name}/{version}`: the raw body streamed to a temp file while it is
//! hashed, never held whole in memory.
//!
//! Refused with 413 before any byte of the body is read when `Content-Length` exceeds the
//! limit, and as soon as a chunked body crosses it; 400 when `X-Checksum-Sha256` does not
//! match. The temp file is deleted on every failure, including the client going away (the
//! handler's future is dropped, and [`TempUpload`] with it). File writes run on the blocking
//! pool, in batches of [`WRITE_BATCH`].

use std::io::Write;
use std::path::{Path, PathBuf};

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{
    artifact_name_problem, bad_request, is_sha256_hex, ArtifactEntry, ArtifactError, ArtifactStore,
};
use crate::api_error::ApiError;
use crate::registry::now_unix_ms;

/// Optional header: the sha256 the client expects (lowercase or uppercase hex).
pub const CHECKSUM_HEADER: &str = "x-checksum-sha256";
/// Bytes gathered before they go to the file.
pub(crate) const WRITE_BATCH: usize = 1024 * 1024;

/// An upload in progress: deleted when dropped unless handed over. Also used by the upgrade
/// package store (`crate::upgrades`).
pub(crate) struct TempUpload {
    path: PathBuf,
    file: Option<std::fs::File>,
    kept: bool,
}

impl TempUpload {
    pub(crate) fn create(dir: &Path) -> std::io::Result<TempUpload> {
        let path = dir.join(format!("upload-{:016x}", rand::rngs::OsRng.next_u64()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(TempUpload {
            path,
            file: Some(file),
            kept: false,
        })
    }

    /// Appends `bytes` (and with `sync`, flushes to disk) on the blocking pool.
    async fn write(&mut self, bytes: Vec<u8>, sync: bool) -> Result<(), ArtifactError> {
        self.append(bytes, sync).await.map_err(|e| {
            tracing::error!(path = %self.path.display(), error = %e, "artifact-upload-write-failed");
            ArtifactError::Api(ApiError::Unavailable)
        })
    }

    /// Appends `bytes` (and with `sync`, flushes to disk) on the blocking pool.
    pub(crate) async fn append(&mut self, bytes: Vec<u8>, sync: bool) -> std::io::Result<()> {
        let Some(mut file) = self.file.take() else {
            return Err(std::io::Error::other("the upload file is gone"));
        };
        let (file, written) = web::block(move || {
            let mut r = file.write_all(&bytes);
            if r.is_ok() && sync {
                r = file.sync_all();
            }
            (file, r)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.file = Some(file);
        written
    }

    /// The path, now the caller's to publish or delete.
    pub(crate) fn keep(mut self) -> PathBuf {
        self.kept = true;
        self.file = None;
        self.path.clone()
    }
}

impl Drop for TempUpload {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The handler.
pub async fn put_artifact(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    mut payload: web::Payload,
    store: web::Data<ArtifactStore>,
) -> Result<HttpResponse, ArtifactError> {
    store.token.check(&req)?;
    let (name, version) = path.into_inner();
    let problems: Vec<String> = [
        artifact_name_problem("artifact name", &name),
        artifact_name_problem("artifact version", &version),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !problems.is_empty() {
        return Err(bad_request(problems.join("; ")));
    }
    let max = store.max_bytes;
    if let Some(declared) = req.headers().get(header::CONTENT_LENGTH) {
        let declared = declared
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| bad_request("invalid Content-Length".into()))?;
        if declared > max {
            tracing::warn!(name = %name, version = %version, declared, max, "artifact-upload-too-large");
            return Err(ArtifactError::TooLarge { max });
        }
    }
    let expected = match req.headers().get(CHECKSUM_HEADER) {
        None => None,
        Some(v) => {
            let v = v.to_str().unwrap_or_default().trim().to_ascii_lowercase();
            if !is_sha256_hex(&v) {
                return Err(bad_request(format!(
                    "{CHECKSUM_HEADER} must be 64 hex digits"
                )));
            }
            Some(v)
        }
    };
    let tmp_dir = store.tmp.clone();
    let mut tmp = web::block(move || TempUpload::create(&tmp_dir))
        .await
        .map_err(|_| ApiError::Unavailable)?
        .map_err(|e| {
            tracing::error!(error = %e, "artifact-upload-temp-failed");
            ArtifactError::Api(ApiError::Unavailable)
        })?;
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| bad_request(format!("upload interrupted: {e}")))?;
        size = size.saturating_add(chunk.len() as u64);
        if size > max {
            tracing::warn!(name = %name, version = %version, max, "artifact-upload-too-large");
            return Err(ArtifactError::TooLarge { max });
        }
        hasher.update(&chunk);
        batch.extend_from_slice(&chunk);
        if batch.len() >= WRITE_BATCH {
            tmp.write(std::mem::take(&mut batch), false).await?;
        }
    }
    tmp.write(batch, true).await?;
    let sha256 = hex::encode(hasher.finalize());
    if let Some(expected) = expected.filter(|e| *e != sha256) {
        return Err(bad_request(format!(
            "checksum mismatch: {CHECKSUM_HEADER} is {expected}, the body's sha256 is {sha256}"
        )));
    }
    let entry = ArtifactEntry {
        sha256: sha256.clone(),
        size,
        uploaded_unix_ms: now_unix_ms(),
    };
    let created = store
        .publish(&name, &version, tmp.keep(), entry.clone())
        .await?;
    if created {
        tracing::info!(name = %name, version = %version, sha256 = %sha256, size, "artifact-published");
    }
    let body = serde_json::json!({
        "name": name, "version": version, "sha256": entry.sha256, "size": entry.size,
    });
    Ok(if created {
        HttpResponse::Created().json(body)
    } else {
        HttpResponse::Ok().json(body)
    })
}
