//! `GET /relays`: every relay with its status, version, path, agents carried, last seen and
//! its upgrade state (roll relay packages out with `tether upgrades rollout V --relay NAME`)
//! and the health its heartbeats report (`Registry::relay_statuses()`).
//! `POST /relays/{id}/delete` (confirm=yes): revokes the relay (`AgentAdmin::delete_relay`):
//! its key stops authenticating and its link and everything it carries close at once.
//! `POST /relays/{id}/maintenance` (on=yes|no, reason) and `POST /relays/{id}/upgrade`
//! (version): the same as `PATCH /api/v1/relays/{id}` and a relay rollout.

use actix_web::{web, HttpRequest, HttpResponse};
use maud::html;
use serde::Deserialize;

use super::agents::MaintenanceForm;
use super::layout::{self, ago, badge, csrf_field, enc, resource};
use super::session::CurrentUser;
use super::{csrf, WebError};
use crate::registry::Status;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/relays").route(web::get().to(list)))
        .service(resource("/relays/{id}/delete").route(web::post().to(delete)))
        .service(resource("/relays/{id}/maintenance").route(web::post().to(set_maintenance)))
        .service(resource("/relays/{id}/upgrade").route(web::post().to(upgrade)));
}

async fn list(
    user: CurrentUser,
    query: web::Query<layout::Done>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let relays = state
        .registry
        .relay_statuses(state.agent_admin.shared.presence.as_ref());
    let mut packages: Vec<String> = state
        .upgrades
        .all_packages()
        .into_iter()
        .filter(|p| p.component == tether_shared::upgrade::Component::Relay)
        .map(|p| p.version)
        .collect();
    packages.sort_by(|a, b| b.cmp(a));
    layout::page(
        "Relays",
        &user,
        "/relays",
        html! {
            (layout::notice(query.done.as_deref()))
            @if relays.is_empty() {
                p.muted { "No relay is enrolled. See “Relays” in docs/operations.md." }
            } @else {
                table #relays {
                    thead { tr {
                        th { "Name" } th { "Status" } th { "Version" } th { "Path" }
                        th { "Agents online through it" } th { "Last seen" } th { "Maintenance" } th { "Upgrade" } th { "Actors" } th {}
                    } }
                    tbody { @for r in &relays {
                        tr {
                            td { (r.name) br; code.muted { (r.id) } }
                            td { (badge(match r.status { Status::Online => "online", Status::Offline => "offline" })) }
                            td { (r.version.as_deref().unwrap_or("")) }
                            td {
                                @if r.path.is_empty() { span.muted { "direct" } } @else { (r.path.join(" → ")) " → server" }
                                @if let Some(node) = &r.node { " · served by node " strong.node { (node) } }
                            }
                            td { (r.agents) }
                            td { (ago(r.last_seen_unix_ms)) }
                            td.maintenance {
                                @if let Some(m) = &r.maintenance {
                                    (badge("maintenance")) " " (m.reason)
                                }
                                @if user.may_post(&format!("/relays/{}/maintenance", enc(&r.id))) {
                                    form.inline method="post" action={ "/relays/" (enc(&r.id)) "/maintenance" } {
                                        (csrf_field(&user))
                                        @if r.maintenance.is_some() {
                                            input type="hidden" name="on" value="no";
                                            button type="submit" { "End maintenance" }
                                        } @else {
                                            input type="hidden" name="on" value="yes";
                                            input type="text" name="reason" placeholder="reason" maxlength="200";
                                            button type="submit" title="No new job starts on the agents behind it" { "Start maintenance" }
                                        }
                                    }
                                }
                            }
                            td {
                                @if !packages.is_empty() && user.may_post(&format!("/relays/{}/upgrade", enc(&r.id))) {
                                    form.inline method="post" action={ "/relays/" (enc(&r.id)) "/upgrade" } {
                                        (csrf_field(&user))
                                        select name="version" { @for v in &packages { option value=(v) { (v) } } }
                                        button type="submit" { "Upgrade" }
                                    }
                                }
                                @match state.upgrades.relay(&r.id) {
                                    None => span.muted { "none" },
                                    Some(u) => {
                                        (badge(&serde_json::to_value(u.state).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()))
                                        " to " (u.version)
                                        @if !u.reason.is_empty() { " · " (u.reason) }
                                    }
                                }
                            }
                            td {
                                @if let Some(h) = &r.reported {
                                    @for a in &h.actors {
                                        div { (a.name) " " (badge(&a.state)) @if a.restarts > 0 { " · " (a.restarts) " restarts" } }
                                    }
                                }
                            }
                            td { @if user.may_post(&format!("/relays/{}/delete", enc(&r.id))) {
                                form.inline.delete-relay method="post" action={ "/relays/" (enc(&r.id)) "/delete" } {
                                    (csrf_field(&user))
                                    label { input type="checkbox" name="confirm" value="yes" required; " I am sure" }
                                    button.danger type="submit" title="Revoke: its connections close and its agents fail over" { "Delete" }
                                }
                            } }
                        }
                    } }
                }
            }
        },
    )
}

async fn set_maintenance(
    req: HttpRequest,
    user: CurrentUser,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: MaintenanceForm = csrf::protected_form(&req, &user, &body)?;
    let on = form.on == "yes";
    let relay = crate::agents_api::relay_maintenance(
        &state,
        &path.into_inner(),
        on,
        on.then_some(form.reason),
    )
    .await?;
    tracing::info!(user = %user.name, relay_id = %relay.id, on, "web-relay-maintenance");
    Ok(layout::redirect("/relays?done=saved"))
}

#[derive(Deserialize)]
struct UpgradeForm {
    version: String,
}

async fn upgrade(
    req: HttpRequest,
    user: CurrentUser,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: UpgradeForm = csrf::protected_form(&req, &user, &body)?;
    let id = path.into_inner();
    crate::upgrades::api::queue_relay_upgrades(&state, &form.version, std::slice::from_ref(&id))
        .await?;
    tracing::info!(user = %user.name, relay_id = %id, version = %form.version, "web-relay-upgrade-queued");
    Ok(layout::redirect("/relays?done=upgrade"))
}

#[derive(Deserialize)]
struct DeleteForm {
    confirm: Option<String>,
}

async fn delete(
    req: HttpRequest,
    user: CurrentUser,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: DeleteForm = csrf::protected_form(&req, &user, &body)?;
    csrf::confirmed(form.confirm.as_deref(), "a relay")?;
    let (relay, closed) = state.agent_admin.delete_relay(&path.into_inner()).await?;
    tracing::info!(user = %user.name, relay_id = %relay.id, name = %relay.name, closed, "web-relay-deleted");
    Ok(layout::redirect("/relays?done=relay-deleted"))
}
