//! The agents pages.
//!
//! - `GET /agents?q=&status=&page=`: 100 agents per page, by name; `q` matches a substring of
//!   the name, a tag, or a property value (case-insensitive), `status` is `online`, `offline`
//!   or `upgrading`. Rendered from one `Registry::agent_statuses()` snapshot, so 5,000 agents
//!   cost one pass. The page script refreshes status, version and last seen of the rows shown
//!   from `GET /ui/agents/status.json?ids=...`.
//! - `GET /agents/{id}`: everything known of one agent, its recent jobs, and forms to replace
//!   its tags (`POST /agents/{id}/tags`) and properties (`POST /agents/{id}/properties`),
//!   upgrade it (`POST /agents/{id}/upgrade`) and delete it (`POST /agents/{id}/delete`). The
//!   changes go through `agents_api::AgentAdmin`, the same rules as the REST API.

use std::collections::BTreeMap;

use actix_web::{web, HttpRequest, HttpResponse};
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::json;

use super::layout::{self, ago, badge, csrf_field, enc, found, resource, utc};
use super::session::CurrentUser;
use super::{csrf, WebError};
use crate::agent_admin::AgentPatch;
use crate::agent_filter::Filter;
use crate::registry::{AgentView, Status};
use crate::scheduler::Queued;
use crate::state::AppState;
use crate::upgrades::{AgentUpgrade, UpgradeState};

/// Agents per page.
pub const PAGE_SIZE: usize = 100;
/// Ids one status request may ask for.
const MAX_STATUS_IDS: usize = 500;
/// Recent jobs shown on an agent's page.
const RECENT_JOBS: usize = 10;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/agents").route(web::get().to(list)))
        .service(resource("/ui/agents/status.json").route(web::get().to(statuses)))
        .service(resource("/agents/{id}").route(web::get().to(detail)))
        .service(resource("/agents/{id}/tags").route(web::post().to(set_tags)))
        .service(resource("/agents/{id}/maintenance").route(web::post().to(set_maintenance)))
        .service(resource("/agents/{id}/properties").route(web::post().to(set_properties)))
        .service(resource("/agents/{id}/upgrade").route(web::post().to(upgrade)))
        .service(resource("/agents/{id}/delete").route(web::post().to(delete)))
        .service(resource("/agents/{id}/operations").route(web::post().to(operate)))
        .service(resource("/agents/{id}/operations/{op_id}").route(web::get().to(operation)));
}

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    status: String,
    /// Conditions on facts and fields (`crate::agent_filter`), separated by spaces.
    #[serde(default, rename = "where")]
    conditions: String,
    page: Option<usize>,
    done: Option<String>,
}

/// The status shown: `upgrading` while an upgrade is underway, else online/offline.
fn shown_status(a: &AgentView, upgrade: Option<&AgentUpgrade>) -> &'static str {
    if upgrade.is_some_and(|u| u.state == UpgradeState::Upgrading) {
        return "upgrading";
    }
    match a.status {
        Status::Online => "online",
        Status::Offline => "offline",
    }
}

/// Whether agent `a` matches the lowercase search text `q`.
fn matches(a: &AgentView, q: &str) -> bool {
    q.is_empty()
        || a.name.to_lowercase().contains(q)
        || a.id == q
        || a.tags.iter().any(|t| t.to_lowercase() == q)
        || a.properties.values().any(|v| v.to_lowercase().contains(q))
}

async fn list(
    user: CurrentUser,
    query: web::Query<ListQuery>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let q = query.q.trim().to_lowercase();
    let status_filter = query.status.as_str();
    let conditions: Vec<&str> = query.conditions.split_whitespace().collect();
    let (filter, filter_problem) = match Filter::parse(&conditions) {
        Ok(f) => (f, None),
        Err(e) => (Filter::default(), Some(e)),
    };
    let all = state
        .registry
        .agent_statuses(state.agent_admin.shared.presence.as_ref());
    let total = all.len();
    let overview = fleet_overview(&all);
    let matching: Vec<(AgentView, &'static str)> = all
        .into_iter()
        .filter(|a| matches(a, &q) && filter.matches(a))
        .map(|a| {
            let shown = shown_status(&a, state.upgrades.agent(&a.id).as_ref());
            (a, shown)
        })
        .filter(|(_, shown)| status_filter.is_empty() || *shown == status_filter)
        .collect();
    let pages = matching.len().div_ceil(PAGE_SIZE).max(1);
    let page = query.page.unwrap_or(1).clamp(1, pages);
    let shown = matching.iter().skip((page - 1) * PAGE_SIZE).take(PAGE_SIZE);
    let page_link = |p: usize| {
        format!(
            "/agents?q={}&status={}&where={}&page={p}",
            enc(&query.q),
            enc(&query.status),
            enc(&query.conditions)
        )
    };
    layout::page(
        "Agents",
        &user,
        "/agents",
        html! {
            (layout::notice(query.done.as_deref()))
            form.searchbar method="get" action="/agents" role="search" {
                div {
                    label for="q" { "Search name, tag or property" }
                    input #q type="search" name="q" value=(query.q);
                }
                div {
                    label for="where" { "Facts (e.g. os=linux arch=x86_64 cpus>=4)" }
                    input #where type="search" name="where" value=(query.conditions);
                }
                div {
                    label for="status" { "Status" }
                    select #status name="status" {
                        @for s in ["", "online", "offline", "upgrading"] {
                            option value=(s) selected[s == status_filter] {
                                @if s.is_empty() { "any" } @else { (s) }
                            }
                        }
                    }
                }
                button type="submit" { "Search" }
            }
            @if let Some(problem) = &filter_problem { p.error #filter-problem { (problem) } }
            (overview)
            p.muted #summary {
                (matching.len()) " of " (total) " agents"
                @if matching.len() > PAGE_SIZE { " · page " (page) " of " (pages) }
            }
            table #agents {
                thead { tr {
                    th { "Name" } th { "Status" } th { "Version" } th { "System" } th { "Tags" }
                    th { "Path" } th { "Last seen" }
                } }
                tbody data-agents data-poll="/ui/agents/status.json" {
                    @for (a, status) in shown {
                        tr data-id=(a.id) {
                            td { a href={ "/agents/" (enc(&a.id)) } { (a.name) } }
                            td { span data-field="status" { (badge(status)) }
                                 @if a.maintenance.is_some() { " " span.maintenance { (badge("maintenance")) } }
                                 @if a.stale { " " span.stale title="offline for longer than retention.mark_stale_after_s" { (badge("stale")) } } }
                            td { span data-field="version" { (a.version.as_deref().unwrap_or("")) }
                                 @if a.upgrade_recommended { " " span.upgrade-recommended title="older than the server" { (badge("upgrade recommended")) } } }
                            td.system { (system_text(a)) }
                            td { @for t in &a.tags { span.tag { (t) } } }
                            td { (path_text(a)) }
                            td data-field="last-seen" { (ago(a.last_seen_unix_ms)) }
                        }
                    }
                }
            }
            @if pages > 1 {
                nav.pager aria-label="pages" {
                    @if page > 1 { a rel="prev" href=(page_link(page - 1)) { "← previous" } }
                    span { "page " (page) " of " (pages) }
                    @if page < pages { a rel="next" href=(page_link(page + 1)) { "next →" } }
                }
            }
        },
    )
}

/// The whole fleet at a glance: agents by status, maintenance, staleness and version.
fn fleet_overview(all: &[AgentView]) -> Markup {
    let count = |f: &dyn Fn(&AgentView) -> bool| all.iter().filter(|a| f(a)).count();
    let online = count(&|a| a.status == Status::Online);
    let mut versions: BTreeMap<&str, usize> = BTreeMap::new();
    for a in all {
        *versions
            .entry(a.version.as_deref().unwrap_or("never connected"))
            .or_default() += 1;
    }
    html! {
        p #fleet {
            strong { "Fleet: " }
            span data-count="online" { (online) " online" } " · "
            span data-count="offline" { (all.len() - online) " offline" } " · "
            (count(&|a| a.maintenance.is_some())) " in maintenance · "
            (count(&|a| a.stale)) " stale · "
            (count(&|a| a.upgrade_recommended)) " to upgrade · versions: "
            @for (i, (v, n)) in versions.iter().enumerate() {
                @if i > 0 { ", " }
                code { (v) } " ×" (n)
            }
        }
    }
}

/// Its distribution and architecture, as its facts say (`debian 12 · x86_64`).
fn system_text(a: &AgentView) -> String {
    ["distribution", "distribution_version"]
        .iter()
        .filter_map(|k| a.facts.get(*k).map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
        + a.facts
            .get(tether_shared::facts::ARCH)
            .map(|arch| format!(" · {arch}"))
            .unwrap_or_default()
            .as_str()
}

/// The relays between the agent and the server, and the node of the cluster that serves it
/// if not this one; unknown for an agent not seen since the server started (its path is
/// learnt at its handshake).
fn path_text(a: &crate::registry::AgentView) -> Markup {
    html! {
        @if a.path.is_empty() && a.last_seen_unix_ms.is_none() && a.node.is_none() { span.muted { "unknown (not seen since the server started)" } }
        @else if a.path.is_empty() { span.muted { "direct" } }
        @else { (a.path.join(" → ")) " → server" }
        @if let Some(node) = &a.node { " · served by node " strong.node { (node) } }
    }
}

#[derive(Deserialize)]
struct StatusQuery {
    #[serde(default)]
    ids: String,
}

/// `GET /ui/agents/status.json?ids=a-..,a-..`: what the list page refreshes.
async fn statuses(
    _user: CurrentUser,
    query: web::Query<StatusQuery>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let list: Vec<_> = query
        .ids
        .split(',')
        .filter(|id| !id.is_empty())
        .take(MAX_STATUS_IDS)
        .filter_map(|id| {
            state
                .registry
                .agent_status(id, state.agent_admin.shared.presence.as_ref())
        })
        .map(|a| {
            let status = shown_status(&a, state.upgrades.agent(&a.id).as_ref());
            json!({"id": a.id, "status": status, "version": a.version, "last_seen": a.last_seen_unix_ms})
        })
        .collect();
    layout::json(&list)
}

#[derive(Deserialize)]
struct DetailQuery {
    done: Option<String>,
}

async fn detail(
    user: CurrentUser,
    path: web::Path<String>,
    query: web::Query<DetailQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let record = found(state.agent_admin.resolve(&path.into_inner()))?;
    let seen = state.agent_admin.shared.presence.as_ref();
    let a = found(state.registry.agent_status(&record.id, seen))?;
    let upgrade = state.upgrades.agent(&a.id);
    let status = shown_status(&a, upgrade.as_ref());
    let packages = state.upgrades.packages();
    let unfinished = state.agent_admin.unfinished_jobs(&a.id);
    let jobs = state.deployments.with_state(|s| {
        let mut jobs: Vec<(u64, String, String, String)> = s
            .jobs
            .values()
            .filter(|j| j.agent_id == a.id.as_str())
            .filter_map(|j| {
                let d = s.deployments.get(&j.deployment_id)?;
                let status = serde_json::to_value(j.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                Some((
                    d.created_unix_ms,
                    d.id.to_string(),
                    d.process.clone(),
                    status,
                ))
            })
            .collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.0));
        jobs.truncate(RECENT_JOBS);
        jobs
    });
    let properties_text: String = a
        .properties
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect();
    let base = format!("/agents/{}", enc(&a.id));
    Ok(layout::page(
        &a.name,
        &user,
        "/agents",
        html! {
            (layout::notice(query.done.as_deref()))
            dl.props #agent {
                dt { "Id" } dd { code { (a.id) } }
                dt { "Status" } dd #status { (badge(status)) }
                dt { "Version" } dd #version { (a.version.as_deref().unwrap_or("unknown (never connected)"))
                    @if a.upgrade_recommended { " · " (badge("upgrade recommended")) " older than the server's " (env!("CARGO_PKG_VERSION")) } }
                dt { "Tags" } dd #tags { @for t in &a.tags { span.tag { (t) } } }
                dt { "Properties" } dd #properties {
                    @if a.properties.is_empty() { span.muted { "none" } }
                    table { @for (k, v) in &a.properties { tr { th { (k) } td { (v) } } } }
                }
                dt { "Path" } dd { (path_text(&a)) }
                dt { "Facts" } dd #facts {
                    @if a.facts.is_empty() { span.muted { "none reported yet" } }
                    @else {
                        table { @for (k, v) in &a.facts { tr { th { (k) } td {
                            @match (k.as_str(), v.parse::<u64>()) {
                                ("boot_unix_s", Ok(s)) => { "up since " (utc(s.saturating_mul(1000))) " (" (ago(Some(s.saturating_mul(1000)))) ")" },
                                _ => (v),
                            }
                        } } } }
                        span.muted { "reported " (ago(a.facts_unix_ms)) " · usable in steps as ${agent.NAME}" }
                    }
                }
                dt { "Maintenance" } dd #maintenance {
                    @match &a.maintenance {
                        None => span.muted { "no" },
                        Some(m) => {
                            (badge("maintenance")) " since " (utc(m.since_unix_ms))
                            @if !m.reason.is_empty() { " · " (m.reason) }
                            " · no new job starts here"
                        }
                    }
                }
                dt { "Last seen" } dd { (ago(a.last_seen_unix_ms)) }
                dt { "Enrolled" } dd { (utc(record.enrolled_unix_ms)) }
                dt { "Upgrade" } dd #upgrade-state {
                    @match &upgrade {
                        None => span.muted { "none" },
                        Some(u) => {
                            (badge(&serde_json::to_value(u.state).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()))
                            " to " (u.version)
                            @if !u.reason.is_empty() { " · " (u.reason) }
                        }
                    }
                }
            }
            h2 { "Operations" }
            @if user.may_post(&format!("{base}/operations")) {
                form.inline #operations method="post" action={ (base) "/operations" } {
                    (csrf_field(&user))
                    button name="op" value="ping" type="submit" title="A round trip to the agent, through its relays" { "Test connection" }
                    button name="op" value="log" type="submit" { "Recent log" }
                    button name="op" value="diagnostics" type="submit" { "Diagnostics" }
                    button.danger name="op" value="restart" type="submit" title="The monitor starts a new worker; running steps are interrupted" { "Restart worker" }
                }
            }
            @let recent = state.operations().recent(&a.id, 5);
            @if !recent.is_empty() {
                table #recent-operations { tbody { @for r in &recent {
                    tr { td { a href={ (base) "/operations/" (enc(&r.id)) } { (word(&r.op)) } }
                         td { (badge(r.state)) } td { (utc(r.requested_unix_ms)) }
                         td { @if let Some(ms) = r.round_trip_ms { (ms) " ms" } } }
                } } }
            }
            h2 { "Recent jobs" }
            @if jobs.is_empty() { p.muted { "No jobs yet." } } @else {
                table { thead { tr { th { "Deployment" } th { "Process" } th { "Job" } th { "Created" } } }
                    tbody { @for (created, id, process, status) in &jobs {
                        tr { td { a href={ "/deployments/" (enc(id)) } { (id) } } td { (process) }
                             td { (badge(status)) } td { (utc(*created)) } }
                    } } }
            }
            @if user.may_post(&format!("{base}/tags")) { div.grid2 {
                form.card #edit-tags method="post" action={ (base) "/tags" } {
                    (csrf_field(&user))
                    h2 { "Tags" }
                    label for="tags-input" { "Tags, separated by spaces or commas" }
                    input #tags-input type="text" name="tags" value=(a.tags.join(" "));
                    button type="submit" { "Save tags" }
                }
                form.card #edit-properties method="post" action={ (base) "/properties" } {
                    (csrf_field(&user))
                    h2 { "Properties" }
                    label for="properties-input" { "One name=value per line" }
                    textarea #properties-input name="properties" { (properties_text) }
                    button type="submit" { "Save properties" }
                }
                form.card #maintenance-form method="post" action={ (base) "/maintenance" } {
                    (csrf_field(&user))
                    h2 { "Maintenance" }
                    @if a.maintenance.is_some() {
                        p { "No new job starts here; its queued jobs wait (or are skipped, for deployments made to skip agents in maintenance)." }
                        input type="hidden" name="on" value="no";
                        button #maintenance-button type="submit" { "End maintenance" }
                    } @else {
                        label for="maintenance-reason" { "Reason (optional)" }
                        input #maintenance-reason type="text" name="reason" maxlength="200";
                        input type="hidden" name="on" value="yes";
                        button #maintenance-button type="submit" { "Start maintenance" }
                    }
                }
                form.card #upgrade method="post" action={ (base) "/upgrade" } {
                    (csrf_field(&user))
                    h2 { "Upgrade" }
                    @if packages.is_empty() {
                        p.muted #upgrade-note { "No upgrade package is stored yet: upload one with "
                            code { "PUT /api/v1/upgrades/VERSION" } "." }
                        button #upgrade-button type="submit" disabled { "Upgrade" }
                    } @else {
                        label for="version" { "To version" }
                        select #version name="version" {
                            @for p in packages.iter().rev() { option value=(p.version) { (p.version) } }
                        }
                        button #upgrade-button type="submit" { "Upgrade" }
                    }
                }
                form.card #delete method="post" action={ (base) "/delete" } {
                    (csrf_field(&user))
                    h2 { "Delete" }
                    p { "Its key stops authenticating and its session is closed; enrolling it again makes a new agent." }
                    @if unfinished > 0 {
                        p.error { "This agent has " (unfinished) " unfinished job(s). Cancel its deployments first, or:" }
                        label { input type="checkbox" name="force" value="yes"; " fail its unfinished jobs (\"agent deleted\")" }
                    }
                    label { input type="checkbox" name="confirm" value="yes" required; " I am sure" }
                    button.danger #delete-button type="submit" { "Delete agent" }
                }
            } }
        },
    ))
}

#[derive(Deserialize)]
struct TagsForm {
    #[serde(default)]
    tags: String,
}

async fn set_tags(
    req: HttpRequest,
    user: CurrentUser,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: TagsForm = csrf::protected_form(&req, &user, &body)?;
    let tags: Vec<String> = form
        .tags
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    let patch = AgentPatch {
        tags: Some(tags),
        ..AgentPatch::default()
    };
    patched(&state, &user, &path.into_inner(), patch, "tags").await
}

/// Applies `patch` (`what` it changes) to agent `id` for `user` (as the REST API does), and
/// goes back to its page.
async fn patched(
    state: &AppState,
    user: &CurrentUser,
    id: &str,
    patch: AgentPatch,
    what: &str,
) -> Result<HttpResponse, WebError> {
    let agent = crate::agents_api::apply_patch(state, id, patch).await?;
    tracing::info!(user = %user.name, agent_id = %agent.id, change = what, "web-agent-changed");
    Ok(layout::redirect(&format!(
        "/agents/{}?done=saved",
        enc(&agent.id)
    )))
}

/// The maintenance form of an agent's or a relay's page.
#[derive(Deserialize)]
pub(super) struct MaintenanceForm {
    /// `yes` starts it, anything else ends it.
    pub on: String,
    #[serde(default)]
    pub reason: String,
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
    let patch = AgentPatch {
        maintenance: Some(on),
        maintenance_reason: on.then_some(form.reason),
        ..AgentPatch::default()
    };
    patched(&state, &user, &path.into_inner(), patch, "maintenance").await
}

#[derive(Deserialize)]
struct PropertiesForm {
    #[serde(default)]
    properties: String,
}

/// `name=value` lines; blank lines are skipped.
fn parse_properties(text: &str) -> Result<BTreeMap<String, String>, WebError> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(WebError::BadRequest(format!(
                "line {}: expected name=value",
                i + 1
            )));
        };
        out.insert(k.trim().to_owned(), v.to_owned());
    }
    Ok(out)
}

async fn set_properties(
    req: HttpRequest,
    user: CurrentUser,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: PropertiesForm = csrf::protected_form(&req, &user, &body)?;
    let patch = AgentPatch {
        properties: Some(parse_properties(&form.properties)?),
        ..AgentPatch::default()
    };
    patched(&state, &user, &path.into_inner(), patch, "properties").await
}

#[derive(Deserialize)]
struct UpgradeForm {
    version: String,
}

/// Queues an upgrade of one agent to a stored package (as the REST rollout does).
async fn upgrade(
    req: HttpRequest,
    user: CurrentUser,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: UpgradeForm = csrf::protected_form(&req, &user, &body)?;
    let agent = found(state.agent_admin.resolve(&path.into_inner()))?;
    let package = state.upgrades.package(&form.version).ok_or_else(|| {
        WebError::BadRequest(format!("no package for version {:?}", form.version))
    })?;
    let back = format!("/agents/{}?done=upgrade", enc(&agent.id));
    let queued = state
        .scheduler
        .queue_upgrade(&agent.id.as_str().into(), &package)
        .await
        .map_err(|e| WebError::Unavailable(e.to_string()))?;
    match queued {
        Queued::Sent => {
            tracing::info!(user = %user.name, agent_id = %agent.id, version = %package.version, "web-upgrade-queued");
        }
        Queued::Refused(reason) => return Err(WebError::BadRequest(reason)),
        Queued::Underway(_) => {}
    }
    Ok(layout::redirect(&back))
}

/// An enum's name as JSON gives it (`restart_worker`).
fn word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[derive(Deserialize)]
struct OperateForm {
    op: String,
}

/// Starts a remote operation and shows it (answered within a few seconds, or pending).
async fn operate(
    req: HttpRequest,
    user: CurrentUser,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: OperateForm = csrf::protected_form(&req, &user, &body)?;
    let record = crate::agents_api::start_operation(
        &state,
        &path.into_inner(),
        &form.op,
        std::time::Duration::from_secs(5),
    )
    .await?;
    tracing::info!(user = %user.name, agent_id = %record.agent_id, op_id = %record.id, "web-operation");
    Ok(layout::redirect(&format!(
        "/agents/{}/operations/{}",
        enc(&record.agent_id),
        enc(&record.id)
    )))
}

/// One operation: its state and its answer, refreshed while it is pending.
async fn operation(
    user: CurrentUser,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let (id, op_id) = path.into_inner();
    let agent = found(state.agent_admin.resolve(&id))?;
    let r = found(state.operations().get(&agent.id, &op_id))?;
    let back = format!("/agents/{}", enc(&agent.id));
    Ok(layout::page(
        &format!("{} on {}", word(&r.op), agent.name),
        &user,
        "/agents",
        html! {
            div #operation data-live=[(r.state == "pending").then_some("2000")] {
                dl.props {
                    dt { "Agent" } dd { a href=(back) { (agent.name) } }
                    dt { "State" } dd #operation-state { (badge(r.state)) }
                    dt { "Asked" } dd { (utc(r.requested_unix_ms)) }
                    @if let Some(ms) = r.round_trip_ms { dt { "Round trip" } dd #round-trip { (ms) " ms" } }
                    @if !r.message.is_empty() { dt { "Message" } dd { (r.message) } }
                }
                @if !r.hops.is_empty() {
                    h2 { "Hops" }
                    p.muted { "Each link's round trip, as its far end last timed it (every heartbeat)." }
                    table #hops {
                        thead { tr { th { "From" } th { "To" } th { "Round trip" } } }
                        tbody {
                            @for h in &r.hops {
                                tr {
                                    td { (h.from) } td { (h.to) }
                                    td { @match h.rtt_ms { Some(ms) => { (format!("{ms:.1}")) " ms" }, None => { "not measured yet" } } }
                                }
                            }
                        }
                    }
                }
                @if r.state == "pending" { p.muted { "Waiting for the agent (it gets it if it comes back within 5 minutes)…" } }
                @if !r.data.is_empty() { pre.log #operation-data { (r.data) } }
            }
        },
    ))
}

#[derive(Deserialize)]
struct DeleteForm {
    confirm: Option<String>,
    force: Option<String>,
}

async fn delete(
    req: HttpRequest,
    user: CurrentUser,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: DeleteForm = csrf::protected_form(&req, &user, &body)?;
    csrf::confirmed(form.confirm.as_deref(), "an agent")?;
    let force = form.force.as_deref() == Some("yes");
    let (agent, failed) = state.agent_admin.delete(&path.into_inner(), force).await?;
    tracing::info!(user = %user.name, agent_id = %agent.id, name = %agent.name, failed_jobs = failed, "web-agent-deleted");
    Ok(layout::redirect("/agents?done=deleted"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn properties_parse_per_line() {
        let p = parse_properties("rack=b2\n\n owner = ops team\nurl=a=b\n").unwrap();
        assert_eq!(p["rack"], "b2");
        assert_eq!(p["owner"], " ops team");
        assert_eq!(p["url"], "a=b");
        assert!(parse_properties("no equals sign").is_err());
    }
}
