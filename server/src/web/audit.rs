//! The audit page (admins): `GET /audit?actor=&path=&before=N`, the newest 200 entries (older
//! ones by `before`), newest first, filtered by actor and path text.

use actix_web::{web, HttpResponse};
use maud::html;
use serde::Deserialize;

use super::layout::{self, resource};
use super::session::CurrentUser;
use crate::audit_api::AuditQuery;
use crate::state::AppState;

/// Entries a page shows.
const PAGE: u64 = 200;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/audit").route(web::get().to(page)));
}

#[derive(Debug, Default, Deserialize)]
struct PageQuery {
    actor: Option<String>,
    path: Option<String>,
    before: Option<u64>,
}

async fn page(
    user: CurrentUser,
    query: web::Query<PageQuery>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let q = query.into_inner();
    if let Err(e) = crate::audit_api::settle(&state).await {
        tracing::warn!(error = %e, "audit-page-unsettled");
    }
    let before = q.before.unwrap_or(u64::MAX).min(state.audit.head() + 1);
    let after = before.saturating_sub(PAGE + 1);
    let filters = AuditQuery {
        after,
        limit: Some(PAGE as usize),
        actor: q.actor.clone().filter(|s| !s.is_empty()),
        path: q.path.clone().filter(|s| !s.is_empty()),
        outcome: None,
    };

    let found = filters.page(&state);
    let mut entries = found.map(|(e, _)| e).unwrap_or_default();
    entries.retain(|e| e.seq < before);
    entries.reverse();
    let older = entries.last().map(|e| e.seq).filter(|s| *s > 1);
    layout::page(
        "Audit",
        &user,
        "/audit",
        html! {
            p.muted { "Every change requested on this port: who, from where, what, and the result. Also "
                code { "GET /api/v1/audit" } " and " code { "/api/v1/audit/export" } " (JSON lines)." }
            form.searchbar method="get" action="/audit" {
                input type="search" name="actor" placeholder="actor" value=[q.actor.as_deref()];
                input type="search" name="path" placeholder="path" value=[q.path.as_deref()];
                button type="submit" { "Filter" }
            }
            table #audit {
                thead { tr { th { "#" } th { "When" } th { "Actor" } th { "Source" } th { "Request" } th { "Status" } } }
                tbody { @for e in &entries {
                    tr data-seq=(e.seq) {
                        td { (e.seq) } td { (layout::utc(e.at_unix_ms)) } td data-field="actor" { (e.actor) }
                        td { (e.source) } td data-field="request" { code { (e.method) " " (e.path) } }
                        td { (layout::badge(&e.outcome)) " " (e.status) }
                    }
                } }
            }
            @if let Some(seq) = older {
                a href={ "/audit?before=" (seq) } { "Older" }
            }
        },
    )
}
