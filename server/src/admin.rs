//! The admin HTTP surface: `GET /admin/health` (JSON, the operator contract's shape) and
//! `GET /metrics` (Prometheus text), both behind the admin bearer token. [`configure`] mounts
//! them; [`AdminState`] is what they read.

use std::collections::BTreeMap;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use crate::admin_token::AdminToken;
use crate::api_error::{method_not_allowed, ApiError};
use crate::health::{JournalWatch, ServerHealth, OBSERVE_TIMEOUT};

/// Prometheus text exposition format 0.0.4.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Shared by every worker: who may ask, and what to observe.
pub struct AdminState {
    /// Required on every admin request.
    pub token: AdminToken,
    /// The journal's liveness and counters.
    pub journal: JournalWatch,
}

impl AdminState {
    /// Observes every actor now.
    async fn observe(&self) -> ServerHealth {
        let (journal_actor, journal) = self.journal.observe(OBSERVE_TIMEOUT).await;
        ServerHealth {
            actors: vec![journal_actor],
            // Sessions arrive with the WSS listener; until then there are none.
            sessions: 0,
            journal,
            agents: BTreeMap::new(),
        }
    }
}

/// Mounts the admin routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/admin/health")
            .route(web::get().to(health))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/metrics")
            .route(web::get().to(metrics))
            .default_service(web::to(method_not_allowed)),
    );
}

/// `GET /admin/health`.
async fn health(req: HttpRequest, state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    Ok(HttpResponse::Ok().json(state.observe().await))
}

/// `GET /metrics`.
async fn metrics(req: HttpRequest, state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let text = state.observe().await.to_prometheus();
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE))
        .body(text))
}
