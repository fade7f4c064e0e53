//! The upgrade routes.
//!
//! HTTPS listener, admin bearer token ([`configure_api`]):
//! - `PUT /api/v1/upgrades/{version}[?component=agent|relay]` (raw body: the agent or relay
//!   binary; default `agent`; optional `X-Checksum-Sha256`) → 201 `{"version","sha256","size"}`, 200 if this version already
//!   holds the same content, 409 if it holds other content, 400 for a version that is not
//!   `MAJOR.MINOR.PATCH`, an empty body or a checksum mismatch, 413 past the size limit (before reading the
//!   body when `Content-Length` says so). The upload streams to a temp file while it is
//!   hashed; nothing is visible until it is complete, stored and signed.
//! - `GET /api/v1/upgrades` → `[{"component","version","sha256","size","uploaded_unix_ms"}]`.
//! - `POST /api/v1/upgrades/{version}/rollout` with `{"targets":{"agents":[..]}}` or
//!   `{"targets":{"tags":[..]}}` → 202 `{"version","agents":[{"id","name","queued","state"}]}`
//!   once every queued `Upgrade` command is durable. An agent whose latest upgrade to this
//!   version is in progress or done is left alone (`"queued": false`).
//!   `{"targets":{"relays":[names or ids]}}` rolls a relay package out to relays instead →
//!   202 `{"version","relays":[{"id","name","queued","state"}]}` once each relay's state is
//!   durable; a connected relay gets its signed `Upgrade` command at once, an offline one when
//!   it reconnects.
//!
//! Agent-facing listener ([`configure_agent_surface`]): `GET /agent/v1/upgrades/{sha256}`,
//! signed by an enrolled agent or relay (`tether_shared::agent_auth`; 401 otherwise), 404 for content
//! no published package has; `Range` honoured.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tether_shared::upgrade::{elf_arch, is_sha256, Component, Version, ELF_HEADER_BYTES};

use super::{AgentUpgrade, UpgradeState, Upgrades, UpgradesError, Upload};
use crate::api_error::parse_json;
use crate::api_error::{method_not_allowed, ApiError};
use crate::artifacts::upload::{TempUpload, CHECKSUM_HEADER, WRITE_BATCH};
use crate::deployments::{resolve_targets, Targets};
use crate::registry::now_unix_ms;
use crate::scheduler::Queued;
use crate::state::AppState;

/// The agents' download path prefix.
pub const AGENT_UPGRADES_PATH: &str = "/agent/v1/upgrades";

/// Mounts the REST routes (HTTPS listener).
pub fn configure_api(cfg: &mut web::ServiceConfig) {
    let resource = |path: &str| web::resource(path).default_service(web::to(method_not_allowed));
    cfg.service(resource("/api/v1/upgrades").route(web::get().to(list)))
        .service(resource("/api/v1/upgrades/{version}").route(web::put().to(upload)))
        .service(resource("/api/v1/upgrades/{version}/rollout").route(web::post().to(rollout)));
}

/// Mounts `/agent/v1/upgrades/{sha256}` (agent-facing listener).
pub fn configure_agent_surface(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource(format!("{AGENT_UPGRADES_PATH}/{{sha256}}"))
            .route(web::get().to(download))
            .default_service(web::to(method_not_allowed)),
    );
}

fn too_large(max: u64) -> HttpResponse {
    HttpResponse::PayloadTooLarge()
        .json(json!({"error": format!("an upgrade package may be at most {max} bytes")}))
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "upgrade-store-failed");
    ApiError::Unavailable
}

/// The query of an upload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    #[serde(default)]
    component: Option<String>,
}

async fn upload(
    req: HttpRequest,
    path: web::Path<String>,
    mut payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let version =
        Version::parse(&path.into_inner()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let query = web::Query::<UploadQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("bad query: {e}")))?;
    let component = match query.component.as_deref() {
        None => Component::Agent,
        Some(c) => Component::parse(c).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "component must be \"agent\" or \"relay\", not {c:?}"
            ))
        })?,
    };
    let max = state.upgrades.max_bytes();
    if let Some(declared) = req.headers().get(header::CONTENT_LENGTH) {
        let declared = declared
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| ApiError::BadRequest("invalid Content-Length".into()))?;
        if declared > max {
            tracing::warn!(version = %version, declared, max, "upgrade-upload-too-large");
            return Ok(too_large(max));
        }
    }
    let expected = match req.headers().get(CHECKSUM_HEADER) {
        None => None,
        Some(v) => {
            let v = v.to_str().unwrap_or_default().trim().to_ascii_lowercase();
            if !is_sha256(&v) {
                return Err(ApiError::BadRequest(format!(
                    "{CHECKSUM_HEADER} must be 64 hex digits"
                )));
            }
            Some(v)
        }
    };
    let tmp_dir = state.upgrades.tmp_dir().to_owned();
    let mut tmp = web::block(move || TempUpload::create(&tmp_dir))
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut head = Vec::with_capacity(ELF_HEADER_BYTES);
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("upload interrupted: {e}")))?;
        size = size.saturating_add(chunk.len() as u64);
        if size > max {
            tracing::warn!(version = %version, max, "upgrade-upload-too-large");
            return Ok(too_large(max));
        }
        let want = ELF_HEADER_BYTES.saturating_sub(head.len()).min(chunk.len());
        head.extend_from_slice(&chunk[..want]);
        hasher.update(&chunk);
        batch.extend_from_slice(&chunk);
        if batch.len() >= WRITE_BATCH {
            tmp.append(std::mem::take(&mut batch), false)
                .await
                .map_err(unavailable)?;
        }
    }
    if size == 0 {
        return Err(ApiError::BadRequest(
            "an upgrade package must not be empty".into(),
        ));
    }
    tmp.append(batch, true).await.map_err(unavailable)?;
    let sha256 = hex::encode(hasher.finalize());
    if let Some(expected) = expected.filter(|e| *e != sha256) {
        return Err(ApiError::BadRequest(format!(
            "checksum mismatch: {CHECKSUM_HEADER} is {expected}, the body's sha256 is {sha256}"
        )));
    }
    let shared = state.shared.clone();
    let (package, created) = state
        .upgrades
        .publish(
            component,
            version,
            Upload {
                tmp: tmp.keep(),
                sha256,
                size,
                arch: elf_arch(&head).map(str::to_owned),
            },
            |bytes| shared.trust.sign(bytes),
        )
        .await
        .map_err(|e| match e {
            UpgradesError::Conflict(reason) => ApiError::Conflict(reason),
            other => unavailable(other),
        })?;
    if created {
        tracing::info!(component = %component, version = %package.version, sha256 = %package.sha256, size = package.size, "upgrade-published");
    }
    let body = json!({"component": package.component, "version": package.version,
                      "sha256": package.sha256, "size": package.size, "arch": package.arch});
    Ok(if created {
        HttpResponse::Created().json(body)
    } else {
        HttpResponse::Ok().json(body)
    })
}

async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let list: Vec<_> = state
        .upgrades
        .all_packages()
        .into_iter()
        .map(|p| {
            json!({"component": p.component, "version": p.version, "sha256": p.sha256, "size": p.size,
                   "arch": p.arch, "uploaded_unix_ms": p.uploaded_unix_ms})
        })
        .collect();
    Ok(HttpResponse::Ok().json(list))
}

/// The body of a rollout.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rollout {
    targets: RolloutTargets,
}

/// Agents (by name or tag, as deployments) or relays (by name or id): exactly one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutTargets {
    agents: Option<Vec<String>>,
    tags: Option<Vec<String>>,
    relays: Option<Vec<String>>,
}

async fn rollout(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let version = path.into_inner();
    let rollout: Rollout = parse_json(&body)?;
    let RolloutTargets {
        agents,
        tags,
        relays,
    } = rollout.targets;
    if let Some(relays) = relays {
        if agents.is_some() || tags.is_some() {
            return Err(ApiError::BadRequest(
                "targets must hold exactly one of \"agents\", \"tags\" or \"relays\"".into(),
            ));
        }
        return rollout_relays(&state, &version, &relays).await;
    }
    let targets = Targets {
        agents,
        tags,
        count: None,
    };
    let package = state.upgrades.package(&version).ok_or(ApiError::NotFound)?;
    let ids = state
        .registry
        .with_index(|index| resolve_targets(&targets, index))
        .map_err(ApiError::BadRequest)?;
    let mut answer = Vec::new();
    let mut failed = Vec::new();
    for id in ids {
        let name = state
            .registry
            .agent_name(&id)
            .unwrap_or_else(|| id.to_string());
        match state
            .scheduler
            .queue_upgrade(&id.as_str().into(), &package)
            .await
        {
            Ok(Queued::Refused(reason)) => {
                answer.push(json!({"id": id, "name": name, "queued": false, "refused": reason}));
            }
            Ok(Queued::Underway(s)) => {
                answer.push(json!({"id": id, "name": name, "queued": false, "state": s}));
            }
            Ok(Queued::Sent) => {
                answer.push(json!({"id": id, "name": name, "queued": true,
                                   "state": UpgradeState::Requested}));
            }
            Err(e) => {
                tracing::error!(agent_id = %id, version = %package.version, error = %e, "upgrade-queue-failed");
                failed.push(name);
            }
        }
    }
    if !failed.is_empty() {
        return Err(ApiError::Incomplete(format!(
            "the upgrade could not be queued to {}; retry",
            failed.join(", ")
        )));
    }
    Ok(HttpResponse::Accepted().json(json!({"version": package.version, "agents": answer})))
}

/// A rollout to relays: each one's state is recorded, and each connected one is told now.
async fn rollout_relays(
    state: &AppState,
    version: &str,
    names: &[String],
) -> Result<HttpResponse, ApiError> {
    let (version, answer) = queue_relay_upgrades(state, version, names).await?;
    Ok(HttpResponse::Accepted().json(json!({"version": version, "relays": answer})))
}

/// Queues relay package `version` to relays `names` (names or ids; REST and the web
/// application): answers the version and, per relay, whether it was queued and its state.
pub async fn queue_relay_upgrades(
    state: &AppState,
    version: &str,
    names: &[String],
) -> Result<(String, Vec<serde_json::Value>), ApiError> {
    let package = state
        .upgrades
        .component_package(Component::Relay, version)
        .ok_or(ApiError::NotFound)?;
    let relays = state
        .registry
        .relay_statuses(state.shared.presence.as_ref());
    let mut ids: Vec<(String, String)> = Vec::new();
    let mut unknown = Vec::new();
    for n in names {
        match relays.iter().find(|r| &r.name == n || r.id.as_str() == n) {
            Some(r) if !ids.iter().any(|(id, _)| id == r.id.as_str()) => {
                ids.push((r.id.to_string(), r.name.clone()))
            }
            Some(_) => {}
            None => unknown.push(format!("{n:?}")),
        }
    }
    if !unknown.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "unknown relays: {}",
            unknown.join(", ")
        )));
    }
    if ids.is_empty() {
        return Err(ApiError::BadRequest(
            "targets.relays must name at least one relay".into(),
        ));
    }
    let mut answer = Vec::new();
    for (id, name) in ids {
        let current = state.upgrades.relay(&id);
        let settled = current.as_ref().is_some_and(|c| {
            c.version == package.version && (c.state.in_progress() || c.state == UpgradeState::Done)
        });
        if settled {
            let s = current.map(|c| c.state);
            tracing::info!(relay_id = %id, version = %package.version, state = ?s, "upgrade-already-underway");
            answer.push(json!({"id": id, "name": name, "queued": false, "state": s}));
            continue;
        }
        let record = AgentUpgrade {
            state: UpgradeState::Requested,
            version: package.version.clone(),
            reason: String::new(),
            updated_unix_ms: now_unix_ms(),
            rollout_id: hex::encode(rand::random::<[u8; 12]>()),
        };
        state
            .shared
            .journal
            .commit(vec![Upgrades::relay_op(&id, &record)])
            .await
            .map_err(|e| {
                tracing::error!(relay_id = %id, version = %package.version, error = %e, "upgrade-queue-failed");
                ApiError::Incomplete(format!("the upgrade could not be recorded for {name}; retry"))
            })?;
        state.upgrades.set_relay(&id, record);
        let told =
            crate::session::relay_session::push_relay_upgrade(&state.shared, &id.as_str().into());
        tracing::info!(relay_id = %id, version = %package.version, connected = told, "relay-upgrade-queued");
        answer.push(json!({"id": id, "name": name, "queued": true,
                           "state": UpgradeState::Requested}));
    }
    Ok((package.version, answer))
}

async fn download(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let error = |status: actix_web::http::StatusCode, message: &str| {
        HttpResponse::build(status).json(json!({ "error": message }))
    };
    let agent_id = match crate::plugins::api::authenticate(&req, &state.registry) {
        Ok(id) => id,
        Err(reason) => {
            tracing::warn!(peer = ?req.peer_addr(), reason = %reason, "upgrade-download-refused");
            return error(
                actix_web::http::StatusCode::UNAUTHORIZED,
                &format!("unauthorized: {reason}"),
            );
        }
    };
    let sha256 = path.into_inner();
    if !is_sha256(&sha256) {
        return error(actix_web::http::StatusCode::NOT_FOUND, "not found");
    }
    if !state.upgrades.has_blob(&sha256) && state.shared.member {
        // The active node may have uploaded it since this member last read the packages.
        let upgrades = state.upgrades.clone();
        if let Ok(Err(e)) = web::block(move || upgrades.reload_packages_for_unknown()).await {
            tracing::warn!(error = %e, "member-packages-not-refreshed");
        }
    }
    if !state.upgrades.has_blob(&sha256) {
        return error(actix_web::http::StatusCode::NOT_FOUND, "not found");
    }
    let file = state.upgrades.blob_path(&sha256);
    match web::block(move || actix_files::NamedFile::open(file)).await {
        Ok(Ok(file)) => {
            let ranged = req.headers().contains_key(header::RANGE);
            tracing::info!(agent_id = %agent_id, sha256 = %sha256, ranged, "upgrade-downloaded");
            file.use_last_modified(false)
                .disable_content_disposition()
                .set_content_type(actix_web::mime::APPLICATION_OCTET_STREAM)
                .into_response(&req)
        }
        Ok(Err(e)) => {
            tracing::error!(sha256 = %sha256, error = %e, "upgrade-blob-unreadable");
            error(
                actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
                "package unreadable",
            )
        }
        Err(_) => error(actix_web::http::StatusCode::SERVICE_UNAVAILABLE, "busy"),
    }
}
