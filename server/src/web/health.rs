//! `GET /health`: what `/admin/health` observes, for people: every server actor with its
//! state, restarts and backlog; the journal's counters; per agent its streams and its own
//! actors (from its heartbeats); per relay link what it carries.

use crate::state::AppState;
use actix_web::{web, HttpResponse};
use maud::{html, Markup};
use serde_json::Value;

use super::layout::{self, badge, enc, resource};
use super::session::CurrentUser;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/health").route(web::get().to(health)));
}

fn word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A JSON object's fields as a definition list (numbers and strings; nested values as JSON).
fn fields(v: &Value) -> Markup {
    html! {
        dl.props {
            @if let Some(o) = v.as_object() {
                @for (k, v) in o {
                    dt { (k) }
                    dd { @match v {
                        Value::String(s) => (s),
                        Value::Null => span.muted { "—" },
                        other => (other.to_string()),
                    } }
                }
            }
        }
    }
}

async fn health(user: CurrentUser, state: web::Data<AppState>) -> HttpResponse {
    let h = state.observe().await;
    let journal = serde_json::to_value(&h.journal).unwrap_or_default();
    layout::page(
        "Health",
        &user,
        "/health",
        html! {
            p.muted { (h.sessions) " sessions connected · observed now; reload to observe again" }
            h2 { "Server actors" }
            table #actors {
                thead { tr { th { "Name" } th { "Kind" } th { "State" } th { "Restarts" } th { "Backlog" } th { "Last beat" } } }
                tbody { @for a in &h.actors {
                    tr {
                        td { (a.name) } td { (a.kind) } td { (badge(&word(&a.state))) }
                        td { (a.restarts) } td { (a.backlog) } td { (a.last_beat_ms) " ms" }
                    }
                } }
            }
            h2 { "Journal" }
            (fields(&journal))
            h2 { "Certificates" }
            table #certificates {
                thead { tr { th { "Certificate" } th { "File" } th { "Expires" } th { "Days left" } } }
                tbody { @for c in &h.certificates {
                    tr data-certificate=(c.name) {
                        td { (c.name) } td { code { (c.file) } }
                        td { (layout::utc(u64::try_from(c.not_after_unix_s).unwrap_or(0).saturating_mul(1000))) }
                        td data-field="days-left" { (c.days_left) }
                    }
                } }
            }
            p #trust {
                "Trust set " strong data-field="trust-serial" { (h.trust.serial) }
                " (" (h.trust.phase) "): " (h.trust.peers.saturating_sub(h.trust.behind)) " of " (h.trust.peers)
                " agents and relays hold it. Key rollover: " code { "tether trust" } "."
            }
            h2 { "Agents" }
            @if h.agents.is_empty() { p.muted { "No agent link yet." } } @else {
                table #agent-health {
                    thead { tr {
                        th { "Agent" } th { "Connected" } th { "Unacked commands" } th { "Oldest unacked" }
                        th { "Events received" } th { "Retransmits" } th { "Last heard" } th { "Resets" } th { "Its actors" }
                    } }
                    tbody { @for (id, a) in &h.agents {
                        tr {
                            td { a href={ "/agents/" (enc(id)) } {
                                (state.registry.agent(id).map_or_else(|| id.clone(), |r| r.name)) } }
                            td { (badge(if a.connected { "online" } else { "offline" })) }
                            td { (a.unacked_commands) }
                            td { @if let Some(ms) = a.oldest_unacked_ms { (ms) " ms" } }
                            td { (a.events_received) } td { (a.retransmits) }
                            td { @if let Some(ms) = a.last_heard_ms { (ms) " ms ago" } }
                            td { (a.peer_resets) }
                            td { @for actor in &a.actors {
                                div { (actor.name) " " (badge(&actor.state))
                                    @if actor.restarts > 0 { " · " (actor.restarts) " restarts" } }
                            } }
                        }
                    } }
                }
            }
            @if !h.relay_links.is_empty() {
                h2 { "Relay links" }
                @for (id, link) in &h.relay_links {
                    h3 { (state.registry.agent(id).map_or_else(|| id.clone(), |r| r.name)) }
                    (fields(&serde_json::to_value(link).unwrap_or_default()))
                }
            }
        },
    )
}
