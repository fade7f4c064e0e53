//! The REST API on the HTTPS listener (`listen.https`), behind the admin bearer token:
//! `POST /api/v1/enrollment-tokens` (the token's text is in this answer only),
//! `GET /api/v1/enrollment-tokens` (live tokens by id: role, uses left, expiry; never the
//! text), `DELETE /api/v1/enrollment-tokens/{id}` (revoked at once), `GET /api/v1/agents` (with each agent's latest
//! `upgrade`, and `"status": "upgrading"` while one is underway) and `GET /api/v1/relays`.
//! [`configure`] mounts the routes; [`crate::state::AppState`] is what they read. Bodies are parsed only
//! after the token check, strictly (unknown fields refused), so an unauthenticated caller
//! learns nothing from a 400.

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use crate::agent_filter::Filter as AgentFilter;
use crate::api_error::{method_not_allowed, parse_json, ApiError};
use crate::registry::Role;
use crate::state::AppState;
use crate::upgrades::UpgradeState;

/// Mounts the `/api/v1` routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/enrollment-tokens")
            .route(web::post().to(create_token))
            .route(web::get().to(list_tokens))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/v1/enrollment-tokens/{id}")
            .route(web::delete().to(revoke_token))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/v1/agents")
            .route(web::get().to(list_agents))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/v1/relays")
            .route(web::get().to(list_relays))
            .default_service(web::to(method_not_allowed)),
    );
}

/// The body of `POST /api/v1/enrollment-tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    /// Enrollments it allows.
    uses: u32,
    /// Seconds it stays valid.
    ttl_s: u64,
    /// What it enrolls.
    #[serde(default)]
    role: Role,
}

/// The answer: the only time the token's text is shown.
#[derive(Debug, Serialize)]
struct TokenCreated<'a> {
    id: &'a str,
    token: &'a str,
    expires_unix_ms: u64,
    uses: u32,
    role: Role,
}

/// `POST /api/v1/enrollment-tokens`.
async fn create_token(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let new: NewToken = parse_json(&body)?;
    let issued = state
        .registry
        .create_token(new.uses, Duration::from_secs(new.ttl_s), new.role)
        .await?;
    Ok(HttpResponse::Created().json(TokenCreated {
        id: &issued.id,
        token: issued.token.expose(),
        expires_unix_ms: issued.expires_unix_ms,
        uses: issued.uses,
        role: issued.role,
    }))
}

/// `GET /api/v1/enrollment-tokens`.
async fn list_tokens(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    Ok(HttpResponse::Ok().json(state.registry.tokens()))
}

/// `DELETE /api/v1/enrollment-tokens/{id}`.
async fn revoke_token(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let revoked = state
        .registry
        .revoke_token(&path.into_inner())
        .await?
        .ok_or(ApiError::NotFound)?;
    let mut body = serde_json::to_value(&revoked).unwrap_or_default();
    body["revoked"] = true.into();
    Ok(HttpResponse::Ok().json(body))
}

/// The `where` conditions of a query string (repeatable: every one must hold); any other
/// parameter is refused, so a mistyped one does not silently select every agent.
fn where_filter(query: &str) -> Result<AgentFilter, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|e| ApiError::BadRequest(format!("bad query: {e}")))?;
    if let Some((other, _)) = pairs.iter().find(|(k, _)| k != "where") {
        let shown: String = other.chars().take(64).collect();
        return Err(ApiError::BadRequest(format!(
            "unknown query parameter {shown:?}: only where=FIELD=VALUE (repeatable)"
        )));
    }
    let conditions: Vec<&str> = pairs.iter().map(|(_, v)| v.as_str()).collect();
    AgentFilter::parse(&conditions).map_err(ApiError::BadRequest)
}

/// `GET /api/v1/agents`, or the agents meeting `?where=` conditions (`crate::agent_filter`).
async fn list_agents(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let filter = where_filter(req.query_string())?;
    let list: Vec<serde_json::Value> = state
        .registry
        .agent_statuses(state.presence.as_ref())
        .into_iter()
        .filter(|a| filter.matches(a))
        .map(|a| {
            let upgrade = state.upgrades.agent(&a.id);
            let mut v = serde_json::to_value(&a).unwrap_or_default();
            if upgrade
                .as_ref()
                .is_some_and(|u| u.state == UpgradeState::Upgrading)
            {
                v["status"] = "upgrading".into();
            }
            v["upgrade"] = serde_json::to_value(&upgrade).unwrap_or_default();
            v
        })
        .collect();
    Ok(HttpResponse::Ok().json(list))
}

/// `GET /api/v1/relays`.
async fn list_relays(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let list: Vec<serde_json::Value> = state
        .registry
        .relay_statuses(state.presence.as_ref())
        .into_iter()
        .map(|r| {
            let upgrade = state.upgrades.relay(&r.id);
            let mut v = serde_json::to_value(&r).unwrap_or_default();
            if upgrade
                .as_ref()
                .is_some_and(|u| u.state == UpgradeState::Upgrading)
            {
                v["status"] = "upgrading".into();
            }
            v["upgrade"] = serde_json::to_value(&upgrade).unwrap_or_default();
            v
        })
        .collect();
    Ok(HttpResponse::Ok().json(list))
}
