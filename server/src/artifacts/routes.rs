//! The artifact routes.
//!
//! HTTPS listener, admin bearer token ([`configure_api`]):
//! - `PUT /api/v1/artifacts/{name}/{version}` (raw body; optional `X-Checksum-Sha256`) →
//!   201 `{"name","version","sha256","size"}`, 200 if the same content was there, 409 if other
//!   content was, 400 / 413 (see [`super::upload`]);
//! - `GET /api/v1/artifacts` → `[{"name","version","sha256","size","uploaded_unix_ms"}]`;
//! - `GET /api/v1/artifacts/{name}/{version}` → the content (`Range` honoured).
//!
//! Agent-facing listener ([`configure_agent`]): `GET /agent/v1/artifacts/{sha256}`, signed by
//! the agent (`tether_shared::agent_auth`): unsigned, unknown agent, stale or bad signature →
//! 401 and nothing else; then 404 for content no published artifact has, or that no job of
//! this agent fetches (an agent downloads only what its own deployments send it). `Range:
//! bytes=N-` resumes (206 with `Content-Range`).

use actix_files::NamedFile;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use tether_shared::agent_auth::{claimed_agent, verify_request};
use tether_shared::identity::PublicKey;
use tether_shared::ids::AgentId;

use super::upload::put_artifact;
use super::{is_sha256_hex, ArtifactError, ArtifactStore};
use crate::api_error::{method_not_allowed, ApiError};
use crate::deployments::Deployments;
use crate::registry::now_unix_ms;

/// Path prefix of the agents' download route.
pub const AGENT_PATH: &str = "/agent/v1/artifacts";

/// Mounts the REST routes (HTTPS listener) with the store's state.
pub fn configure_api(store: web::Data<ArtifactStore>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        let resource =
            |path: &str| web::resource(path).default_service(web::to(method_not_allowed));
        cfg.app_data(store)
            .service(resource("/api/v1/artifacts").route(web::get().to(list)))
            .service(
                resource("/api/v1/artifacts/{name}/{version}")
                    .route(web::put().to(put_artifact))
                    .route(web::get().to(download)),
            );
    }
}

/// Mounts the agents' download route (agent-facing listener) with the store's state.
pub fn configure_agent(store: web::Data<ArtifactStore>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(store).service(
            web::resource(format!("{AGENT_PATH}/{{sha256}}"))
                .route(web::get().to(agent_download))
                .default_service(web::to(method_not_allowed)),
        );
    }
}

async fn list(
    req: HttpRequest,
    store: web::Data<ArtifactStore>,
) -> Result<HttpResponse, ArtifactError> {
    store.token.check(&req)?;
    Ok(HttpResponse::Ok().json(store.list()))
}

async fn download(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    store: web::Data<ArtifactStore>,
) -> Result<HttpResponse, ArtifactError> {
    store.token.check(&req)?;
    let (name, version) = path.into_inner();
    let entry = store.entry(&name, &version).ok_or(ApiError::NotFound)?;
    serve(&req, &store, &entry.sha256).await
}

async fn agent_download(
    req: HttpRequest,
    path: web::Path<String>,
    store: web::Data<ArtifactStore>,
    deployments: web::Data<Deployments>,
) -> Result<HttpResponse, ArtifactError> {
    let agent_id = AgentId::from(check_agent(&req, &store)?);
    let sha256 = path.into_inner();
    if !is_sha256_hex(&sha256) || !store.has_blob(&sha256) {
        return Err(ApiError::NotFound.into());
    }
    // Only what this agent's own jobs fetch; anything else looks absent.
    if !deployments.sends_blob(&agent_id, &sha256) {
        tracing::warn!(agent_id = %agent_id, sha256 = %sha256, "artifact-download-not-referenced");
        return Err(ApiError::NotFound.into());
    }
    tracing::info!(agent_id = %agent_id, sha256 = %sha256, range = req.headers().contains_key(header::RANGE), "artifact-download");
    serve(&req, &store, &sha256).await
}

/// The agent whose signature on `req` verifies; any failure is the same 401.
fn check_agent(req: &HttpRequest, store: &ArtifactStore) -> Result<String, ArtifactError> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let refuse = |reason: String| {
        tracing::warn!(source = ?req.peer_addr(), reason = %reason, "artifact-download-refused");
        ArtifactError::BadAgentSignature
    };
    let claimed = claimed_agent(header).map_err(|e| refuse(e.to_string()))?;
    let record = store
        .registry
        .agent(&claimed)
        .ok_or_else(|| refuse(format!("unknown agent {:?}", claimed.escape_debug())))?;
    let key = PublicKey::from_b64(&record.public_key).map_err(|e| refuse(e.to_string()))?;
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.path().to_owned(), |p| p.as_str().to_owned());
    verify_request(
        &key,
        req.method().as_str(),
        &path_and_query,
        header,
        now_unix_ms(),
    )
    .map_err(|e| refuse(e.to_string()))
}

/// Streams blob `sha256` (the file is read on the blocking pool; `Range` honoured).
async fn serve(
    req: &HttpRequest,
    store: &ArtifactStore,
    sha256: &str,
) -> Result<HttpResponse, ArtifactError> {
    let path = store.blob_path(sha256);
    let file = web::block(move || NamedFile::open(path))
        .await
        .map_err(|_| ApiError::Unavailable)?
        .map_err(|e| {
            tracing::error!(sha256 = %sha256, error = %e, "artifact-blob-unreadable");
            ArtifactError::Api(ApiError::Unavailable)
        })?
        .use_last_modified(false)
        .disable_content_disposition()
        .set_content_type(actix_web::mime::APPLICATION_OCTET_STREAM);
    let mut response = file.into_response(req);
    if let Ok(v) = HeaderValue::from_str(sha256) {
        response.headers_mut().insert(
            header::HeaderName::from_static(super::upload::CHECKSUM_HEADER),
            v,
        );
    }
    Ok(response)
}
