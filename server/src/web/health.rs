//! `GET /health`: what `/admin/health` observes, for people: every server actor with its
//! state, restarts and backlog; the journal's counters; the reconciliation with agents the
//! server was found behind (restored from a backup), with their results for jobs it does not
//! know; per agent its streams, a refused handshake and its own actors (from its
//! heartbeats); per relay link what it carries. `POST /health/reconciliation/{agent}/dismiss`
//! forgets one agent's reconciliation once reviewed.

use crate::state::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::Value;
use tether_shared::ids::AgentId;

use super::layout::{self, badge, csrf_field, enc, resource};
use super::session::CurrentUser;
use super::{csrf, WebError};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/health").route(web::get().to(health)))
        .service(resource("/health/reconciliation/{agent}/dismiss").route(web::post().to(dismiss)));
}

/// The reconciliation section: one row per agent, then the orphan results.
fn reconciliation(state: &AppState, user: &CurrentUser) -> Markup {
    let list = state.shared.work.reconciliations().list();
    let name = |id: &str| {
        state
            .registry
            .agent_name(id)
            .unwrap_or_else(|| id.to_owned())
    };
    html! {
        @if !list.is_empty() {
            h2 { "Reconciliation" }
            p.error { "This server was found behind these agents: it was restored from a backup taken before their last exchanges (or its database failed over to a replica that was behind). Their streams were taken up again and their jobs reported; review, then dismiss." }
            table #reconciliation {
                thead { tr {
                    th { "Agent" } th { "Detected" } th { "Events lost" } th { "Commands lost" }
                    th { "Report" } th { "Jobs brought up to date" } th { "Orphan results" } th {}
                } }
                tbody { @for (r, _) in &list {
                    tr data-agent=(r.agent_id) {
                        td { (name(&r.agent_id)) }
                        td { (layout::utc(r.detected_unix_ms)) }
                        td { (r.events_lost) } td { (r.commands_lost) }
                        td { (badge(&word(&r.phase))) " " (r.jobs_reported) " jobs"
                            @if r.jobs_omitted > 0 { ", " (r.jobs_omitted) " omitted" } }
                        td { (r.jobs_updated) }
                        td { (r.orphan_results) @if r.orphans_not_kept > 0 { " (+" (r.orphans_not_kept) " not kept)" } }
                        td { @if user.may_post(&format!("/health/reconciliation/{}/dismiss", enc(&r.agent_id))) { form method="post" action={ "/health/reconciliation/" (enc(&r.agent_id)) "/dismiss" } {
                            (csrf_field(user))
                            button type="submit" { "Dismiss" }
                        } } }
                    }
                } }
            }
            @if list.iter().any(|(_, o)| !o.is_empty()) {
                h3 { "Results for jobs this server does not know" }
                table #orphans {
                    thead { tr { th { "Agent" } th { "Deployment" } th { "Job" } th { "Status" } th { "Steps" } } }
                    tbody { @for (r, orphans) in &list { @for o in orphans {
                        tr {
                            td { (name(&r.agent_id)) } td { code { (o.deployment_id) } } td { code { (o.job_id) } }
                            td { (o.status.map_or_else(|| "running".to_owned(), |s| word(&s))) }
                            td { @for s in &o.steps {
                                div { (s.name) " " (s.status.map_or_else(|| "not ended".to_owned(), |st| word(&st)))
                                    @if let Some(code) = s.exit_code { " (exit " (code) ")" } }
                            } }
                        }
                    } } }
                }
            }
        }
    }
}

async fn dismiss(
    req: HttpRequest,
    user: CurrentUser,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    #[derive(Deserialize)]
    struct Form {}
    let _: Form = csrf::protected_form(&req, &user, &body)?;
    let agent = AgentId::from(path.into_inner());
    match state.shared.work.reconciliations().dismiss(&agent).await {
        Ok(true) => {
            tracing::info!(user = %user.name, agent_id = %agent, "web-reconciliation-dismissed");
            Ok(layout::redirect("/health"))
        }
        Ok(false) => Err(WebError::NotFound),
        Err(e) => {
            tracing::error!(agent_id = %agent, error = %e, "reconciliation-dismiss-failed");
            Err(crate::api_error::ApiError::Unavailable.into())
        }
    }
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
            div #health-live data-live="5000" {
            p.muted { (h.sessions) " sessions connected · observed " (layout::utc(crate::registry::now_unix_ms())) " · refreshed every 5 s" }
            h2 { "Server actors" }
            table #actors {
                thead { tr { th { "Name" } th { "Kind" } th { "State" } th { "Restarts" } th { "Backlog" } th { "Last beat" } } }
                tbody { @for a in &h.actors {
                    tr {
                        td { (actor_name(&state, &a.name, a.kind)) } td { (a.kind) } td { (badge(&word(&a.state))) }
                        td { (a.restarts) } td { (a.backlog) } td { (a.last_beat_ms) " ms" }
                    }
                } }
            }
            @if let Some(cluster) = &h.cluster {
                h2 { "Cluster" }
                p { "This node: " strong { (cluster.node) } " (" (cluster.role) ", lease epoch " (cluster.epoch) ")" }
                table #nodes {
                    thead { tr { th { "Node" } th { "Role" } th { "Release" } th { "Sessions" } th { "Address" } th { "Last heard" } } }
                    tbody { @for n in cluster.nodes.list() {
                        tr data-node=(n.node) {
                            td { (n.node) } td { (n.role) } td { (n.version) }
                            td data-field="sessions" { (n.sessions) }
                            td data-field="url" { (n.url) }
                            td { (n.seen_ms_ago.max(0) / 1000) " s ago" }
                        }
                    } }
                }
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
            (reconciliation(&state, &user))
            h2 { "Agents" }
            @if h.agents_refused > 0 {
                p.error #refused { (h.agents_refused) " agent(s) refused at their last handshake: see the Refused column." }
            }
            @if h.agents.is_empty() { p.muted { "No agent link yet." } } @else {
                table #agent-health {
                    thead { tr {
                        th { "Agent" } th { "Connected" } th { "Unacked commands" } th { "Oldest unacked" }
                        th { "Events received" } th { "Retransmits" } th { "Last heard" } th { "Resets" } th { "Refused" } th { "Its actors" }
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
                            td.error { @if let Some(why) = &a.refused { (why) } }
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
            }
        },
    )
}

/// An actor's name for people: an agent's or relay's actors show its name, their id beside.
fn actor_name(state: &AppState, name: &str, kind: &str) -> Markup {
    let peer = matches!(kind, "AgentLink" | "RelaySession")
        .then(|| state.registry.agent_name(name))
        .flatten();
    html! {
        @match peer {
            Some(n) => { (n) " " code.muted { (name) } },
            None => (name),
        }
    }
}
