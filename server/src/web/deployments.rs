//! Deployments: `GET /deployments` (newest first, paged, and the form to start one),
//! `POST /deployments` (start: process, targets by agent names or tags, properties),
//! `GET /deployments/{id}` (per-agent, per-step status and live logs, refreshed by the page
//! script from `GET /ui/deployments/{id}.json` and `GET /ui/deployments/{id}/log`), and
//! `POST /deployments/{id}/cancel` and `POST /deployments/{id}/retry` (the agents whose jobs did
//! not succeed run it again, as a new deployment). Starting, retrying and cancelling go through the same functions as
//! the REST API (`crate::scheduler`); the JSON is the REST
//! API's `GET /api/v1/deployments/{id}` (secrets masked).

use std::collections::BTreeMap;

use actix_web::{web, HttpRequest, HttpResponse};
use maud::{html, Markup};
use serde::Deserialize;

use super::layout::{self, badge, csrf_field, enc, found, resource, utc};
use super::session::CurrentUser;
use super::{csrf, WebError};
use crate::deployments::api as deployments_api;
use crate::deployments::model::{deployment_status, DeploymentStatus};
use crate::deployments::{view, NewDeployment, Targets};
use crate::state::AppState;

/// Deployments per page of the list.
const PAGE_SIZE: usize = 50;
/// Jobs whose logs are shown open at first (more: opened one by one).
const OPEN_LOGS_UP_TO: usize = 10;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/deployments")
            .route(web::get().to(list))
            .route(web::post().to(start)),
    )
    .service(resource("/deployments/{id}").route(web::get().to(detail)))
    .service(resource("/deployments/{id}/cancel").route(web::post().to(cancel)))
    .service(resource("/deployments/{id}/retry").route(web::post().to(retry)))
    .service(resource("/ui/deployments/{id}.json").route(web::get().to(detail_json)))
    .service(resource("/ui/deployments/{id}/log").route(web::get().to(log)));
}

fn status_word(s: DeploymentStatus) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The form starting a deployment (of `process`, if given).
pub fn start_form(user: &CurrentUser, state: &AppState, process: Option<&str>) -> Markup {
    let processes = state.deployments.processes();
    if !user.may_post("/deployments") {
        return html! {};
    }
    html! {
        form.card #start-deployment method="post" action="/deployments" {
            (csrf_field(user))
            h2 { "Start a deployment" }
            @if processes.is_empty() {
                p.muted { "Create a process first." }
            } @else {
                label for="process" { "Process" }
                select #process name="process" {
                    @for p in &processes {
                        option value=(p.name) selected[Some(p.name.as_str()) == process] { (p.name) " (v" (p.version) ")" }
                    }
                }
                label for="target-kind" { "Targets" }
                select #target-kind name="target_kind" {
                    option value="agents" { "agents named" }
                    option value="tags" { "every agent with all these tags" }
                    option value="pool" { "any N agents with all these tags (a pool)" }
                }
                input #targets type="text" name="targets" placeholder="web-1 web-2  (or: tags)" required;
                label for="count" { "N, for a pool" }
                input #count type="number" name="count" min="1";
                label for="batch-percent" { "Rolling: this % of the agents at a time (empty: all at once)" }
                input #batch-percent type="number" name="batch_percent" min="1" max="100";
                label { input #keep-going type="checkbox" name="keep_going" value="yes"; " rolling: go on after a failed job (otherwise later batches are cancelled)" }
                label for="deploy-properties" { "Properties, one name=value per line (names ending in _secret are masked)" }
                textarea #deploy-properties name="properties" rows="4" {}
                label { input #skip-maintenance type="checkbox" name="skip_maintenance" value="yes"; " skip agents in maintenance (otherwise their jobs wait)" }
                button #start-button type="submit" { "Start deployment" }
            }
        }
    }
}

#[derive(Deserialize)]
struct ListQuery {
    page: Option<usize>,
}

async fn list(
    user: CurrentUser,
    query: web::Query<ListQuery>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let rows = state.deployments.with_state(|s| {
        let mut rows: Vec<(u64, String, String, DeploymentStatus, usize)> = s
            .deployments
            .values()
            .map(|d| {
                (
                    d.created_unix_ms,
                    d.id.to_string(),
                    d.process.clone(),
                    deployment_status(s.jobs_of(d)),
                    d.agents.len(),
                )
            })
            .collect();
        rows.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        rows
    });
    let pages = rows.len().div_ceil(PAGE_SIZE).max(1);
    let page = query.page.unwrap_or(1).clamp(1, pages);
    layout::page(
        "Deployments",
        &user,
        "/deployments",
        html! {
            (start_form(&user, &state, None))
            @if rows.is_empty() { p.muted { "No deployment yet." } } @else {
                table #deployments {
                    thead { tr { th { "Id" } th { "Process" } th { "Status" } th { "Jobs" } th { "Created" } } }
                    tbody { @for (created, id, process, status, jobs) in rows.iter().skip((page - 1) * PAGE_SIZE).take(PAGE_SIZE) {
                        tr {
                            td { a href={ "/deployments/" (enc(id)) } { (id) } }
                            td { (process) } td { (badge(&status_word(*status))) }
                            td { (jobs) } td { (utc(*created)) }
                        }
                    } }
                }
                @if pages > 1 {
                    nav.pager aria-label="pages" {
                        @if page > 1 { a rel="prev" href={ "/deployments?page=" (page - 1) } { "← newer" } }
                        span { "page " (page) " of " (pages) }
                        @if page < pages { a rel="next" href={ "/deployments?page=" (page + 1) } { "older →" } }
                    }
                }
            }
        },
    )
}

#[derive(Deserialize)]
struct StartForm {
    process: String,
    target_kind: String,
    #[serde(default)]
    targets: String,
    #[serde(default)]
    properties: String,
    /// A checkbox: present when ticked.
    #[serde(default)]
    skip_maintenance: Option<String>,
    /// For a pool: how many agents (empty: none given).
    #[serde(default)]
    count: String,
    /// For a rolling deployment: the share of agents at a time (empty: all at once).
    #[serde(default)]
    batch_percent: String,
    /// A checkbox: a rolling deployment goes on after a failed job.
    #[serde(default)]
    keep_going: Option<String>,
}

/// An optional whole number of a form (empty: `None`).
fn form_number(field: &str, text: &str) -> Result<Option<u32>, WebError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| WebError::BadRequest(format!("{field} must be a whole number, got {text:?}")))
}

async fn start(
    req: HttpRequest,
    user: CurrentUser,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: StartForm = csrf::protected_form(&req, &user, &body)?;
    let names: Vec<String> = form
        .targets
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    let count = form_number("N", &form.count)?;
    let batch_percent = form_number("the rolling share", &form.batch_percent)?;
    let targets = match form.target_kind.as_str() {
        "agents" => Targets {
            agents: Some(names),
            ..Targets::default()
        },
        "tags" => Targets {
            tags: Some(names),
            ..Targets::default()
        },
        "pool" => Targets {
            tags: Some(names),
            count: Some(count.ok_or_else(|| {
                WebError::BadRequest("a pool needs N, the number of agents".into())
            })?),
            ..Targets::default()
        },
        _ => {
            return Err(WebError::BadRequest(
                "targets must be agents or tags".into(),
            ))
        }
    };
    let mut properties = BTreeMap::new();
    for (i, line) in form.properties.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| {
            WebError::BadRequest(format!("properties line {}: expected name=value", i + 1))
        })?;
        properties.insert(k.trim().to_owned(), v.to_owned());
    }
    let new = NewDeployment {
        process: form.process,
        targets,
        properties,
        skip_maintenance: form.skip_maintenance.is_some(),
        batch_size: None,
        batch_percent,
        stop_on_failure: batch_percent.map(|_| form.keep_going.is_none()),
        deadline_s: None,
    };
    let (id, jobs) = state.scheduler.start_deployment(new).await?;
    tracing::info!(user = %user.name, deployment_id = %id, jobs, "web-deployment-started");
    Ok(layout::redirect(&format!(
        "/deployments/{}?done=started",
        enc(&id)
    )))
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
    let id = path.into_inner();
    let d = view::deployment(
        &found(state.deployments.snapshot(&id))?,
        &state.registry,
        view::Detail::Jobs,
    );
    let str_of = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let status = str_of(&d["status"]);
    let final_ = matches!(status.as_str(), "succeeded" | "failed" | "cancelled");
    let jobs = d["jobs"].as_array().cloned().unwrap_or_default();
    let open_logs = jobs.len() <= OPEN_LOGS_UP_TO;
    let id_enc = enc(&id);
    Ok(layout::page(
        &format!("Deployment {id}"),
        &user,
        "/deployments",
        html! {
            (layout::notice(query.done.as_deref()))
            section #deployment data-deployment data-poll={ "/ui/deployments/" (id_enc) ".json" } {
                dl.props {
                    dt { "Status" } dd { span data-field="status" { (badge(&status)) } }
                    dt { "Process" } dd { a href={ "/processes/" (enc(&str_of(&d["process"]))) } { (str_of(&d["process"])) }
                        " v" (d["process_version"].as_u64().unwrap_or(0)) }
                    dt { "Created" } dd { (utc(d["created_unix_ms"].as_u64().unwrap_or(0))) }
                    @if let Some(original) = d["retry_of"].as_str() {
                        dt { "Retry of" } dd #retry-of { a href={ "/deployments/" (enc(original)) } { (original) } }
                    }
                    dt { "Properties" } dd {
                        @if let Some(props) = d["properties"].as_object() {
                            @for (k, v) in props { div { code { (k) } " = " (str_of(v)) } }
                        }
                    }
                    @if let Some(rolling) = d["rolling"].as_object() {
                        dt { "Rolling" } dd #rolling {
                            (rolling["batch_size"].as_u64().unwrap_or(0)) " agents at a time"
                            @if rolling["stop_on_failure"] == true { ", stops on the first failure" }
                            table.batches { tbody { @for b in rolling["batches"].as_array().cloned().unwrap_or_default() {
                                tr data-batch=(b["batch"].as_u64().unwrap_or(0)) {
                                    th { "batch " (b["batch"].as_u64().unwrap_or(0) + 1) }
                                    td { (badge(&str_of(&b["status"]))) }
                                    td { (b["ended"].as_u64().unwrap_or(0)) " of " (b["jobs"].as_u64().unwrap_or(0)) " ended" }
                                }
                            } } }
                        }
                    }
                }
                @if !final_ && user.may_post(&format!("/deployments/{id_enc}/cancel")) {
                    form.card #cancel data-while-running method="post" action={ "/deployments/" (id_enc) "/cancel" } {
                        (csrf_field(&user))
                        p { "Cancelling kills each agent's running step; the steps after it end cancelled." }
                        button.danger #cancel-button type="submit" { "Cancel deployment" }
                    }
                }
                @if status != "succeeded" && user.may_post(&format!("/deployments/{id_enc}/retry")) {
                    form.card #retry data-when-retryable hidden[!final_] method="post" action={ "/deployments/" (id_enc) "/retry" } {
                        (csrf_field(&user))
                        p { "Retrying runs the same steps again, as they ran here, on the agents whose jobs did not succeed: a new deployment." }
                        button #retry-button type="submit" { "Retry the jobs that did not succeed" }
                    }
                }
                (timeline(&jobs))
                @for (j, job) in jobs.iter().enumerate() {
                    section.card.job data-job=(j) {
                        h2 {
                            a href={ "/agents/" (enc(&str_of(&job["agent_id"]))) } { (str_of(&job["agent"])) } " "
                            span data-field="job-status" { (badge(&str_of(&job["status"]))) }
                            @if d["rolling"].is_object() { " " span.muted { "batch " (job["batch"].as_u64().unwrap_or(0) + 1) } }
                        }
                        p.muted data-field="job-message" { (str_of(&job["message"])) }
                        table.steps {
                            thead { tr { th { "Step" } th { "Status" } th { "Exit" } th { "Outputs" } th { "Message" } } }
                            tbody { @for (i, step) in job["steps"].as_array().cloned().unwrap_or_default().iter().enumerate() {
                                tr data-step=(i) {
                                    td { (str_of(&step["name"])) }
                                    td { span data-field="step-status" { (badge(&str_of(&step["status"]))) } }
                                    td data-field="exit-code" { @if let Some(c) = step["exit_code"].as_i64() { (c) } }
                                    td data-field="outputs" {
                                        @if let Some(o) = step["outputs"].as_object() {
                                            (o.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(", "))
                                        }
                                    }
                                    td data-field="step-message" { (str_of(&step["message"])) }
                                }
                            } }
                        }
                        @for (i, step) in job["steps"].as_array().cloned().unwrap_or_default().iter().enumerate() {
                            details.log open[open_logs] {
                                summary { "Log of " (str_of(&step["name"])) }
                                pre.log data-step-log=(i) data-state=(str_of(&step["status"]))
                                    data-log={ "/ui/deployments/" (id_enc) "/log?agent=" (enc(&str_of(&job["agent_id"]))) "&step=" (i) } {}
                            }
                        }
                    }
                }
            }
        },
    ))
}

/// Agents drawn on a deployment's timeline at most.
const TIMELINE_ROWS: usize = 200;

/// One step's bar: heard started and ended (Unix ms), its status and name.
struct Bar {
    start: u64,
    end: u64,
    status: String,
    name: String,
}

/// The deployment's timeline: one row per agent (the first [`TIMELINE_ROWS`]), one bar per
/// step from when the server heard it start to when it heard it end (or now), coloured by its
/// status; an SVG with attributes only (the pages allow no inline style).
fn timeline(jobs: &[serde_json::Value]) -> maud::Markup {
    let span_of = |s: &serde_json::Value| {
        let start = s["started_unix_ms"].as_u64()?;
        Some((start, s["finished_unix_ms"].as_u64()))
    };
    let now = crate::registry::now_unix_ms();
    let bars: Vec<(usize, String, Vec<Bar>)> = jobs
        .iter()
        .take(TIMELINE_ROWS)
        .enumerate()
        .map(|(row, job)| {
            let steps = job["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| {
                    let (start, end) = span_of(s)?;
                    let status = s["status"].as_str().unwrap_or_default().to_owned();
                    let name = s["name"].as_str().unwrap_or_default().to_owned();
                    let end = end.unwrap_or(now).max(start);
                    Some(Bar {
                        start,
                        end,
                        status,
                        name,
                    })
                })
                .collect();
            (
                row,
                job["agent"].as_str().unwrap_or_default().to_owned(),
                steps,
            )
        })
        .collect();
    let (t0, t1) = bars
        .iter()
        .flat_map(|(_, _, steps)| steps.iter().map(|b| (b.start, b.end)))
        .fold((u64::MAX, 0), |(lo, hi), (a, b)| (lo.min(a), hi.max(b)));
    if t0 == u64::MAX {
        return maud::html! {};
    }
    let span = t1.saturating_sub(t0).max(1) as f64;
    const LABEL: f64 = 160.0;
    const WIDTH: f64 = 800.0;
    const ROW: usize = 18;
    let x = |t: u64| LABEL + (t.saturating_sub(t0) as f64 / span) * (WIDTH - LABEL);
    let height = bars.len() * ROW + 20;
    maud::html! {
        h2 { "Timeline" }
        p.muted { "From the first step's start to the last step's end: "
            (format!("{:.1}", span / 1000.0)) " s"
            @if jobs.len() > TIMELINE_ROWS { " · the first " (TIMELINE_ROWS) " of " (jobs.len()) " agents" } }
        svg.timeline #timeline xmlns="http://www.w3.org/2000/svg" viewBox={ "0 0 " (WIDTH) " " (height) } role="img" aria-label="deployment timeline" {
            @for (row, agent, steps) in &bars {
                @let y = row * ROW + 4;
                text x="0" y=(y + 12) { (agent) }
                @for b in steps {
                    rect class={ "step " (b.status) } x=(format!("{:.1}", x(b.start))) y=(y)
                        width=(format!("{:.1}", (x(b.end) - x(b.start)).max(1.0))) height=(ROW - 4) {
                        title { (agent) " · " (b.name) " · " (b.status) " · " ((b.end - b.start)) " ms" }
                    }
                }
            }
            text x=(LABEL) y=(height - 4) { "0 s" }
            text x=(WIDTH - 40.0) y=(height - 4) { (format!("{:.1} s", span / 1000.0)) }
        }
    }
}

async fn detail_json(
    _user: CurrentUser,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let id = path.into_inner();
    let d = view::deployment(
        &found(state.deployments.snapshot(&id))?,
        &state.registry,
        view::Detail::Jobs,
    );
    Ok(layout::json(&d))
}

#[derive(Deserialize)]
struct LogQuery {
    agent: String,
    step: String,
    #[serde(default)]
    offset: usize,
}

/// The log text from byte `offset` on (the whole log if `offset` is not a place in it), with
/// `X-Log-Offset` (where the body starts) and `X-Log-Length` (the whole log's length).
async fn log(
    _user: CurrentUser,
    path: web::Path<String>,
    query: web::Query<LogQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let q = query.into_inner();
    let reader = deployments_api::log_reader(
        &state.deployments,
        &state.registry,
        &path.into_inner(),
        q.agent,
        &q.step,
    )
    .await?;
    // Only the part the page does not have yet is held in memory.
    let (offset, tail) = web::block(move || reader.read_from(q.offset))
        .await
        .map_err(|_| crate::api_error::ApiError::Unavailable)?
        .map_err(|e| {
            tracing::error!(error = %e, "step-log-read-failed");
            crate::api_error::ApiError::Unavailable
        })?;
    let length = offset + tail.len();
    let mut r = layout::text(tail);
    let headers = r.headers_mut();
    for (name, value) in [("x-log-offset", offset), ("x-log-length", length)] {
        if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&value.to_string()) {
            headers.insert(actix_web::http::header::HeaderName::from_static(name), v);
        }
    }
    Ok(r)
}

async fn retry(
    req: HttpRequest,
    user: CurrentUser,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let _: layout::Empty = csrf::protected_form(&req, &user, &body)?;
    let id = path.into_inner();
    let (new_id, jobs) = state.scheduler.retry_deployment(&id).await?;
    tracing::info!(user = %user.name, deployment_id = %new_id, retry_of = %id, jobs, "web-deployment-retried");
    Ok(layout::redirect(&format!(
        "/deployments/{}?done=retried",
        enc(new_id.as_str())
    )))
}

async fn cancel(
    req: HttpRequest,
    user: CurrentUser,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let _: layout::Empty = csrf::protected_form(&req, &user, &body)?;
    let id = path.into_inner();
    let sent = state.scheduler.cancel_deployment(&id).await?;
    tracing::info!(user = %user.name, deployment_id = %id, sent, "web-deployment-cancelled");
    Ok(layout::redirect(&format!(
        "/deployments/{}?done=cancelled",
        enc(&id)
    )))
}
