//! The audit log over the REST API (admins; see [`crate::audit`]):
//! - `GET /api/v1/audit?after=N&limit=N&actor=TEXT&path=TEXT&outcome=ok|refused|failed` →
//!   `{"entries": [...], "next": N, "head": N}`: up to `limit` (1..1000, default 100) entries
//!   numbered after `after` (default 0), oldest first, whose actor and path contain the texts
//!   given; `next` is where to continue (`after=next`), `head` the newest number. An entry
//!   whose request is still running reads `"outcome": "pending"`, `"status": 0`.
//! - `GET /api/v1/audit/export?after=N` → the same entries as JSON lines
//!   (`application/x-ndjson`), up to 10,000 a request, for a SIEM; the header `Tether-Next`
//!   says where to continue.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::api_error::{method_not_allowed, ApiError};
use crate::audit::AuditEntry;
use crate::state::AppState;

/// Entries a page holds at most.
const MAX_PAGE: usize = 1000;
/// Entries an export answer holds at most.
const MAX_EXPORT: usize = 10_000;
/// Entries a filtered page scans at most, per entry it may return.
const SCAN_FACTOR: usize = 20;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/audit")
            .route(web::get().to(list))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/v1/audit/export")
            .route(web::get().to(export))
            .default_service(web::to(method_not_allowed)),
    );
}

/// The filters of a page.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    #[serde(default)]
    pub after: u64,
    pub limit: Option<usize>,
    pub actor: Option<String>,
    pub path: Option<String>,
    pub outcome: Option<String>,
}

impl AuditQuery {
    /// Whether `e` passes the filters.
    pub fn accepts(&self, e: &AuditEntry) -> bool {
        self.actor
            .as_ref()
            .is_none_or(|a| e.actor.contains(a.as_str()))
            && self
                .path
                .as_ref()
                .is_none_or(|p| e.path.contains(p.as_str()))
            && self.outcome.as_ref().is_none_or(|o| e.outcome == *o)
    }

    /// Entries of one page, and where to continue.
    pub fn page(&self, state: &AppState) -> Result<(Vec<AuditEntry>, u64), ApiError> {
        let limit = self.limit.unwrap_or(100).clamp(1, MAX_PAGE);
        state
            .audit
            .read(self.after, limit, limit * SCAN_FACTOR, |e| self.accepts(e))
            .map_err(|e| {
                tracing::error!(error = %e, "audit-read-failed");
                ApiError::Unavailable
            })
    }
}

/// Outcomes queued before this read are committed first.
pub async fn settle(state: &AppState) -> Result<(), ApiError> {
    state.audit.settle().await.map_err(|e| {
        tracing::error!(error = %e, "audit-settle-failed");
        ApiError::Unavailable
    })
}

fn query_of(req: &HttpRequest) -> Result<AuditQuery, ApiError> {
    web::Query::<AuditQuery>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::BadRequest(format!("query: {e}")))
}

async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let query = query_of(&req)?;
    settle(&state).await?;
    let (entries, next) = query.page(&state)?;
    Ok(HttpResponse::Ok().json(json!({
        "entries": entries,
        "next": next,
        "head": state.audit.head(),
    })))
}

async fn export(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let query = query_of(&req)?;
    settle(&state).await?;
    let (entries, next) = state
        .audit
        .read(query.after, MAX_EXPORT, MAX_EXPORT, |e| query.accepts(e))
        .map_err(|_| ApiError::Unavailable)?;
    let mut body = String::new();
    for e in &entries {
        body.push_str(&serde_json::to_string(e).map_err(|_| ApiError::Unavailable)?);
        body.push('\n');
    }
    Ok(HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .insert_header(("Tether-Next", next.to_string()))
        .body(body))
}
