//! The operators' view of reconciliations (HTTPS listener, admin bearer token):
//! - `GET /api/v1/reconciliation` → `{"agents": [..]}`: per agent found ahead of this server
//!   (restored from a backup), when, how many events and commands were lost, where its report
//!   stands, and the results it reported for jobs this server does not know (`orphans`).
//! - `DELETE /api/v1/reconciliation/{agent}` (id or name) → `{"agent_id","dismissed":true}`:
//!   an operator reviewed it; the record and its orphan results are deleted (404 if none).

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};
use tether_shared::ids::AgentId;

use crate::api_error::{method_not_allowed, ApiError};
use crate::reconcile::{Orphan, Record};
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/reconciliation")
            .route(web::get().to(list))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/v1/reconciliation/{agent}")
            .route(web::delete().to(dismiss))
            .default_service(web::to(method_not_allowed)),
    );
}

/// One agent's reconciliation as answered (and shown by the web application and the CLI).
pub fn record_json(state: &AppState, record: &Record, orphans: &[Orphan]) -> Value {
    let mut v = json!(record);
    v["agent_name"] = json!(state.registry.agent_name(&record.agent_id));
    v["orphans"] = json!(orphans);
    v
}

async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let agents: Vec<Value> = state
        .shared
        .work
        .reconciliations()
        .list()
        .iter()
        .map(|(r, o)| record_json(&state, r, o))
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "agents": agents })))
}

async fn dismiss(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let given = path.into_inner();
    let id = state
        .registry
        .resolve_agent(&given)
        .map_or_else(|| AgentId::from(given), |a| a.id);
    match state.shared.work.reconciliations().dismiss(&id).await {
        Ok(true) => Ok(HttpResponse::Ok().json(json!({"agent_id": id, "dismissed": true}))),
        Ok(false) => Err(ApiError::NotFound),
        Err(e) if e.is_disk_full() => Err(ApiError::StorageFull),
        Err(e) => {
            tracing::error!(agent_id = %id, error = %e, "reconciliation-dismiss-failed");
            Err(ApiError::Unavailable)
        }
    }
}
