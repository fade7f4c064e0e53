//! `GET /relays`: every relay with its status, version, path, agents carried, last seen and
//! its upgrade state (roll relay packages out with `tether upgrades rollout V --relay NAME`)
//! and the health its heartbeats report (`Registry::relay_statuses()`).

use actix_web::{web, HttpResponse};
use maud::html;

use super::layout::{self, ago, badge, resource};
use super::session::CurrentUser;
use super::WebState;
use crate::registry::Status;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/relays").route(web::get().to(list)));
}

async fn list(user: CurrentUser, state: web::Data<WebState>) -> HttpResponse {
    let relays = state.registry.relay_statuses();
    layout::page(
        "Relays",
        &user,
        "/relays",
        html! {
            @if relays.is_empty() {
                p.muted { "No relay is enrolled. See “Relays” in docs/operations.md." }
            } @else {
                table #relays {
                    thead { tr {
                        th { "Name" } th { "Status" } th { "Version" } th { "Path" }
                        th { "Agents online through it" } th { "Last seen" } th { "Upgrade" } th { "Actors" }
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
                        }
                    } }
                }
            }
        },
    )
}
