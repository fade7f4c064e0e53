//! Changing and deleting agents, for both the REST API and the web application.
//!
//! [`AgentAdmin`] holds the rules; the REST routes here (HTTPS listener, admin bearer token)
//! and the web application's forms both call it:
//! - `GET /api/v1/agents/{id}` → one agent as `GET /api/v1/agents` lists it (id or name).
//! - `PATCH /api/v1/agents/{id}` with `{"tags":[..]}` and/or `{"properties":{..}}` → the agent;
//!   each given field replaces the stored one whole (400 with the reason if invalid).
//! - `DELETE /api/v1/agents/{id}` → `{"id","name","deleted":true,"failed_jobs":N}`; 409 while
//!   the agent has unfinished (queued or running) jobs, unless `?force=true`, which first fails
//!   them ("agent deleted"; an agent that is gone for good never finishes them). A deleted
//!   agent's session is closed and its key no longer authenticates; its jobs stay in their
//!   deployments (shown by id). Enrolling the same name again makes a new agent with a new id,
//!   which inherits nothing.
//! - `DELETE /api/v1/relays/{id}` (id or name) → `{"id","name","deleted":true,"closed":N}`:
//!   the relay's key stops authenticating at once, its link closes (and with it every channel
//!   it carries: its agents and child relays fail over to their next upstream), and any
//!   channel elsewhere that names it in its path closes too. `closed` counts links and
//!   channels closed.
//! - `POST /api/v1/agents/{id}/operations` with `{"op": "ping"|"restart"|"log"|"diagnostics",
//!   "wait_s": 0..60}` (default 10) → the operation once answered (200), or still `pending`
//!   (202) past `wait_s`; `GET /api/v1/agents/{id}/operations[/{op_id}]` → the recent ones, or
//!   one (`crate::operations`). 409 for an agent whose release takes none.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::agent_admin::AgentPatch;
use crate::api_error::parse_json;
use crate::api_error::{method_not_allowed, ApiError};
use crate::state::AppState;

/// Mounts `/api/v1/agents/{id}`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/agents/{id}")
            .route(web::get().to(get_agent))
            .route(web::patch().to(patch_agent))
            .route(web::delete().to(delete_agent))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/v1/agents/{id}/operations")
            .route(web::post().to(post_operation))
            .route(web::get().to(list_operations))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/v1/agents/{id}/operations/{op_id}")
            .route(web::get().to(get_operation))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/v1/relays/{id}")
            .route(web::patch().to(patch_relay))
            .route(web::delete().to(delete_relay))
            .default_service(web::to(method_not_allowed)),
    );
}

/// The body of `POST /api/v1/agents/{id}/operations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOperation {
    op: String,
    /// Seconds to wait for the answer (at most [`MAX_OPERATION_WAIT_S`]).
    #[serde(default = "default_wait")]
    wait_s: u64,
}

/// Longest an operation request waits for its answer.
const MAX_OPERATION_WAIT_S: u64 = 60;

fn default_wait() -> u64 {
    10
}

/// Starts operation `op` on agent `id_or_name` and waits at most `wait` for its answer (REST
/// and web alike).
pub async fn start_operation(
    state: &AppState,
    id_or_name: &str,
    op: &str,
    wait: std::time::Duration,
) -> Result<crate::operations::OperationRecord, ApiError> {
    let op = crate::operations::parse_op(op).map_err(ApiError::BadRequest)?;
    let agent = agent_of(state, id_or_name)?;
    let op_id = state
        .scheduler
        .operate(&agent.id.as_str().into(), op)
        .await?;
    state
        .operations()
        .wait(&agent.id, &op_id, wait)
        .await
        .ok_or_else(|| ApiError::Incomplete("the operation was forgotten; ask again".into()))
}

async fn post_operation(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let new: NewOperation = parse_json(&body)?;
    if new.wait_s > MAX_OPERATION_WAIT_S {
        return Err(ApiError::BadRequest(format!(
            "wait_s is 0 to {MAX_OPERATION_WAIT_S}, got {}",
            new.wait_s
        )));
    }
    let record = start_operation(
        &state,
        &path.into_inner(),
        &new.op,
        std::time::Duration::from_secs(new.wait_s),
    )
    .await?;
    Ok(match record.state {
        "pending" => HttpResponse::Accepted().json(record),
        _ => HttpResponse::Ok().json(record),
    })
}

async fn list_operations(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let agent = agent_of(&state, &path.into_inner())?;
    let operations = state.operations();
    Ok(HttpResponse::Ok().json(operations.recent(&agent.id, crate::operations::KEEP)))
}

async fn get_operation(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let (id, op_id) = path.into_inner();
    let agent = agent_of(&state, &id)?;
    let operations = state.operations();
    let record = operations
        .get(&agent.id, &op_id)
        .ok_or(ApiError::NotFound)?;
    Ok(HttpResponse::Ok().json(record))
}

/// The agent named `id_or_name` (id or name), or 404.
fn agent_of(state: &AppState, id_or_name: &str) -> Result<crate::registry::AgentRecord, ApiError> {
    state
        .agent_admin
        .resolve(id_or_name)
        .ok_or(ApiError::NotFound)
}

async fn get_agent(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let agent = agent_of(&state, &path.into_inner())?;
    let status = state
        .agent_admin
        .status(&agent.id)
        .ok_or(ApiError::NotFound)?;
    Ok(HttpResponse::Ok().json(state.agent_admin.status_json(&status)))
}

/// Applies `patch` to agent `id_or_name` (REST and web alike). When its maintenance or its
/// limit of jobs changed, its link dispatches what may start now: out of maintenance or with a
/// higher limit its waiting jobs go, into maintenance the skippable ones are skipped.
pub async fn apply_patch(
    state: &AppState,
    id_or_name: &str,
    patch: AgentPatch,
) -> Result<crate::registry::AgentRecord, crate::agent_admin::AgentsError> {
    let terms_changed = patch.maintenance.is_some() || patch.max_running_jobs.is_some();
    let agent = state.agent_admin.update(id_or_name, patch).await?;
    if terms_changed {
        if let Err(e) = state.scheduler.dispatch(&agent.id.as_str().into()).await {
            tracing::warn!(agent_id = %agent.id, error = %e, "job-dispatch-failed");
        }
    }
    Ok(agent)
}

/// The body of `PATCH /api/v1/relays/{id}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayPatch {
    maintenance: bool,
    #[serde(default)]
    maintenance_reason: Option<String>,
}

/// Puts relay `id` (id or name) in maintenance or takes it out (REST and web application).
pub async fn relay_maintenance(
    state: &AppState,
    id: &str,
    on: bool,
    reason: Option<String>,
) -> Result<crate::registry::AgentRecord, ApiError> {
    let reason = crate::agent_admin::maintenance_change(Some(on), reason)?.flatten();
    let relay = state.agent_admin.set_relay_maintenance(id, reason).await?;
    // Out of it, the agents behind it start their waiting jobs; into it, skippable ones end.
    state.scheduler.dispatch_waiting().await;
    Ok(relay)
}

async fn patch_relay(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let patch: RelayPatch = parse_json(&body)?;
    let relay = relay_maintenance(
        &state,
        &path.into_inner(),
        patch.maintenance,
        patch.maintenance_reason,
    )
    .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": relay.id, "name": relay.name, "maintenance": relay.maintenance,
    })))
}

async fn patch_agent(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let patch: AgentPatch = parse_json(&body)?;
    let agent = apply_patch(&state, &path.into_inner(), patch).await?;
    let status = state
        .agent_admin
        .status(&agent.id)
        .ok_or(ApiError::NotFound)?;
    Ok(HttpResponse::Ok().json(state.agent_admin.status_json(&status)))
}

/// The query of `DELETE /api/v1/agents/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete_agent(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let query = web::Query::<DeleteQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let (agent, failed) = state
        .agent_admin
        .delete(&path.into_inner(), query.force)
        .await?;
    Ok(HttpResponse::Ok()
        .json(json!({"id": agent.id, "name": agent.name, "deleted": true, "failed_jobs": failed})))
}

async fn delete_relay(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let (relay, closed) = state.agent_admin.delete_relay(&path.into_inner()).await?;
    Ok(HttpResponse::Ok()
        .json(json!({"id": relay.id, "name": relay.name, "deleted": true, "closed": closed})))
}
