//! The plugin routes.
//!
//! On the HTTPS listener, behind the admin token:
//! - `POST /api/v1/plugins` with a tar.gz body (at most [`MAX_BUNDLE_BYTES`]; 413 past it,
//!   before reading when `Content-Length` says so): 201 `{"name","version","sha256"}` for a
//!   new plugin or version, 200 for the same bundle again, 400 `{"error","problems":[...]}`
//!   naming every problem, 409 for the same version with other content or an older version.
//! - `GET /api/v1/plugins`: `[{"name","version","sha256","size","description","steps":[...],
//!   "downloads","uploaded_unix_ms"}]`.
//!
//! On the agent-facing listener, signed by an enrolled agent (`tether_shared::agent_auth`):
//! - `GET /agent/v1/plugins/{sha256}`: the bundle (`application/gzip`); 401 unsigned.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde_json::json;
use tether_shared::agent_auth::{claimed_agent, verify_request};
use tether_shared::identity::PublicKey;
use tether_shared::ids::AgentId;
use tether_shared::plugin::MAX_BUNDLE_BYTES;

use super::{is_sha256, PluginsError, Stored};
use crate::api_error::{method_not_allowed, ApiError};
use crate::registry::{now_unix_ms, Registry};
use crate::state::AppState;

/// The agents' download path prefix.
pub const AGENT_PLUGINS_PATH: &str = "/agent/v1/plugins";

/// Mounts `/api/v1/plugins` (HTTPS listener).
pub fn configure_api(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/plugins")
            .route(web::post().to(upload))
            .route(web::get().to(list))
            .default_service(web::to(method_not_allowed)),
    );
}

/// Mounts `/agent/v1/plugins/{sha256}` (agent-facing listener).
pub fn configure_agent_surface(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource(format!("{AGENT_PLUGINS_PATH}/{{sha256}}"))
            .route(web::get().to(download))
            .default_service(web::to(method_not_allowed)),
    );
}

fn error(status: actix_web::http::StatusCode, message: String) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": message }))
}

fn too_large() -> HttpResponse {
    error(
        actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
        format!("a plugin bundle may be at most {MAX_BUNDLE_BYTES} bytes"),
    )
}

async fn upload(
    req: HttpRequest,
    mut payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BUNDLE_BYTES) {
        return Ok(too_large());
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0).min(1024 * 1024) as usize);
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        if (body.len() + chunk.len()) as u64 > MAX_BUNDLE_BYTES {
            return Ok(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    match state.plugins.upload(body).await {
        Ok((record, stored)) => {
            let answer =
                json!({"name": record.name, "version": record.version, "sha256": record.sha256});
            Ok(match stored {
                Stored::Created => HttpResponse::Created().json(answer),
                Stored::Unchanged => HttpResponse::Ok().json(answer),
            })
        }
        Err(PluginsError::Invalid(problems)) => {
            tracing::info!(problems = problems.len(), "plugin-upload-refused");
            Ok(HttpResponse::BadRequest().json(json!({
                "error": format!("invalid plugin bundle: {}", problems.join("; ")),
                "problems": problems,
            })))
        }
        Err(PluginsError::Conflict(reason)) => Err(ApiError::Conflict(reason)),
        Err(e) => {
            tracing::error!(error = %e, "plugin-store-failed");
            Err(ApiError::Unavailable)
        }
    }
}

async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let list: Vec<_> = state
        .plugins
        .list()
        .into_iter()
        .map(|r| {
            json!({
                "name": r.name,
                "version": r.version,
                "sha256": r.sha256,
                "size": r.size,
                "description": r.manifest.description,
                "steps": r.manifest.steps,
                "downloads": state.plugins.downloads(&r.sha256),
                "uploaded_unix_ms": r.uploaded_unix_ms,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(list))
}

/// The enrolled agent that signed `req`, or why not.
pub(crate) fn authenticate(req: &HttpRequest, registry: &Registry) -> Result<String, String> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let agent_id = claimed_agent(header).map_err(|e| e.to_string())?;
    let record = registry
        .agent(&agent_id)
        .ok_or_else(|| "unknown agent".to_owned())?;
    let key = PublicKey::from_b64(&record.public_key).map_err(|e| e.to_string())?;
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.path().to_owned(), |p| p.as_str().to_owned());
    verify_request(&key, req.method().as_str(), &path, header, now_unix_ms())
        .map_err(|e| e.to_string())
}

async fn download(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let agent_id = match authenticate(&req, &state.registry) {
        Ok(id) => id,
        Err(reason) => {
            // The reason is logged, never answered: an unknown agent and a bad signature look
            // the same from outside.
            tracing::warn!(peer = ?req.peer_addr(), reason = %reason, "plugin-download-refused");
            return error(
                actix_web::http::StatusCode::UNAUTHORIZED,
                "unauthorized: not signed by an enrolled agent".into(),
            );
        }
    };
    let sha256 = path.into_inner();
    if !is_sha256(&sha256) {
        return error(actix_web::http::StatusCode::NOT_FOUND, "not found".into());
    }
    if !state
        .deployments
        .sends_blob(&AgentId::from(agent_id.as_str()), &sha256)
    {
        tracing::warn!(agent_id = %agent_id, sha256 = %sha256, "plugin-download-not-referenced");
        return error(actix_web::http::StatusCode::NOT_FOUND, "not found".into());
    }
    let file = state.plugins.bundle_path(&sha256);
    // NamedFile honours `Range`: an agent resumes a download, and a relay checks access with a
    // one-byte request before serving its cached copy.
    match web::block(move || actix_files::NamedFile::open(file)).await {
        Ok(Ok(file)) => {
            let ranged = req.headers().contains_key(header::RANGE);
            if !ranged {
                state.plugins.count_download(&sha256);
            }
            tracing::info!(agent_id = %agent_id, sha256 = %sha256, ranged, "plugin-downloaded");
            file.use_last_modified(false)
                .disable_content_disposition()
                .set_content_type(
                    "application/gzip"
                        .parse()
                        .unwrap_or(actix_web::mime::APPLICATION_OCTET_STREAM),
                )
                .into_response(&req)
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            error(actix_web::http::StatusCode::NOT_FOUND, "not found".into())
        }
        Ok(Err(e)) => {
            tracing::error!(sha256 = %sha256, error = %e, "plugin-read-failed");
            error(
                actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
                "bundle unreadable".into(),
            )
        }
        Err(_) => error(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "busy".into(),
        ),
    }
}
