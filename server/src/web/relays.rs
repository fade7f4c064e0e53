//! `GET /relays`: every relay with its status, version, path, agents carried, last seen and
//! its upgrade state (roll relay packages out with `tether upgrades rollout V --relay NAME`)
//! and the health its heartbeats report (`Registry::relay_statuses()`).
//! `POST /relays/{id}/delete` (confirm=yes): revokes the relay (`AgentAdmin::delete_relay`):
//! its key stops authenticating and its link and everything it carries close at once.

use actix_web::{web, HttpRequest, HttpResponse};
use maud::html;
use serde::Deserialize;

use super::layout::{self, ago, badge, csrf_field, enc, resource};
use super::session::CurrentUser;
use super::{csrf, WebError};
use crate::registry::Status;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/relays").route(web::get().to(list)))
        .service(resource("/relays/{id}/delete").route(web::post().to(delete)));
}

async fn list(
    user: CurrentUser,
    query: web::Query<layout::Done>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let relays = state
        .registry
        .relay_statuses(state.agent_admin.shared.presence.as_ref());
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
                        th { "Agents online through it" } th { "Last seen" } th { "Upgrade" } th { "Actors" } th {}
                    } }
                    tbody { @for r in &relays {
                        tr {
                            td { (r.name) br; code.muted { (r.id) } }
                            td { (badge(match r.status { Status::Online => "online", Status::Offline => "offline" })) }
                            td { (r.version.as_deref().unwrap_or("")) }
                            td { @if r.path.is_empty() { span.muted { "direct" } } @else { (r.path.join(" → ")) " → server" } }
                            td { (r.agents) }
                            td { (ago(r.last_seen_unix_ms)) }
                            td {
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
