//! The deployments REST routes on the HTTPS listener, behind the admin token:
//!
//! - `POST /api/v1/processes`, `GET /api/v1/processes`, `GET /api/v1/processes/{name}`
//! - `POST /api/v1/deployments` (201 once every RunJob that may start now is journaled),
//!   `GET /api/v1/deployments`, `GET /api/v1/deployments/{id}`,
//!   `POST /api/v1/deployments/{id}/cancel` (202),
//!   `POST /api/v1/deployments/{id}/retry` (201, a new deployment for the agents whose jobs
//!   did not succeed; 409 while it runs or if every job succeeded),
//!   `GET /api/v1/deployments/{id}/jobs/{agent}/steps/{step}/log` (text/plain).
//!
//! Starting, retrying and cancelling go through the scheduler (`crate::scheduler`).

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::model::StepState;
use super::validate::NewProcess;
use super::{view, Deployments, DeploymentsError, NewDeployment};
use crate::api_error::parse_json;
use crate::api_error::{method_not_allowed, ApiError};
use crate::registry::Registry;
use crate::state::AppState;

impl From<DeploymentsError> for ApiError {
    fn from(e: DeploymentsError) -> Self {
        match e {
            DeploymentsError::Invalid(reason) => ApiError::BadRequest(reason),
            DeploymentsError::NotFound => ApiError::NotFound,
            DeploymentsError::Conflict(reason) => ApiError::Conflict(reason),
            DeploymentsError::Journal(ref j) if j.is_disk_full() => {
                tracing::error!(error = %e, "deployments-change-failed-disk-full");
                ApiError::StorageFull
            }
            DeploymentsError::Journal(_)
            | DeploymentsError::Corrupt { .. }
            | DeploymentsError::Secrets(_) => {
                tracing::error!(error = %e, "deployments-change-failed");
                ApiError::Unavailable
            }
        }
    }
}

/// Mounts the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    let resource = |path: &str| web::resource(path).default_service(web::to(method_not_allowed));
    cfg.service(
        resource("/api/v1/processes")
            .route(web::post().to(put_process))
            .route(web::get().to(list_processes)),
    )
    .service(resource("/api/v1/processes/{name}").route(web::get().to(get_process)))
    .service(
        resource("/api/v1/deployments")
            .route(web::post().to(create_deployment))
            .route(web::get().to(list_deployments)),
    )
    .service(resource("/api/v1/deployments/prune").route(web::post().to(prune)))
    .service(resource("/api/v1/deployments/{id}").route(web::get().to(get_deployment)))
    .service(resource("/api/v1/deployments/{id}/cancel").route(web::post().to(cancel)))
    .service(resource("/api/v1/deployments/{id}/retry").route(web::post().to(retry)))
    .service(
        resource("/api/v1/deployments/{id}/jobs/{agent}/steps/{step}/log")
            .route(web::get().to(step_log)),
    );
}

async fn put_process(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let new: NewProcess = parse_json(&body)?;
    let p = state.deployments.put_process(new).await?;
    Ok(HttpResponse::Created().json(json!({"name": p.name, "version": p.version})))
}

async fn list_processes(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let list: Vec<_> = state
        .deployments
        .processes()
        .iter()
        .map(view::process)
        .collect();
    Ok(HttpResponse::Ok().json(list))
}

async fn get_process(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let p = state
        .deployments
        .process(&path.into_inner())
        .ok_or(ApiError::NotFound)?;
    Ok(HttpResponse::Ok().json(view::process(&p)))
}

async fn create_deployment(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let new: NewDeployment = parse_json(&body)?;
    let (id, jobs) = state.scheduler.start_deployment(new).await?;
    Ok(HttpResponse::Created().json(json!({"id": id, "jobs": jobs})))
}

async fn list_deployments(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let list = state.deployments.with_state(|s| {
        s.deployments
            .values()
            .map(|d| {
                json!({
                    "id": d.id,
                    "process": d.process,
                    "status": super::model::deployment_status(s.jobs_of(d)),
                    "jobs": d.agents.len(),
                    "created_unix_ms": d.created_unix_ms,
                })
            })
            .collect::<Vec<_>>()
    });
    Ok(HttpResponse::Ok().json(list))
}

/// The query of `GET /api/v1/deployments/{id}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeploymentQuery {
    /// `false`: the status and job counts only.
    #[serde(default = "yes")]
    jobs: bool,
}

fn yes() -> bool {
    true
}

async fn get_deployment(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let query = web::Query::<DeploymentQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    let snapshot = state
        .deployments
        .snapshot(&path)
        .ok_or(ApiError::NotFound)?;
    let detail = if query.jobs {
        view::Detail::Jobs
    } else {
        view::Detail::Summary
    };
    Ok(HttpResponse::Ok().json(view::deployment(&snapshot, &state.registry, detail)))
}

async fn cancel(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let id = path.into_inner();
    let sent = state.scheduler.cancel_deployment(&id).await?;
    Ok(HttpResponse::Accepted().json(json!({"id": id, "cancel_sent": sent})))
}

async fn retry(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let id = path.into_inner();
    let (new_id, jobs) = state.scheduler.retry_deployment(&id).await?;
    Ok(HttpResponse::Created().json(json!({"id": new_id, "jobs": jobs, "retry_of": id})))
}

/// The body of `POST /api/v1/deployments/prune`: what to keep, the configured policy for
/// what is left out.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneRequest {
    /// Prune deployments that ended more than this many days ago (0: any age).
    older_than_days: Option<u64>,
    /// Keep at most this many finished deployments.
    keep: Option<usize>,
}

async fn prune(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let ask: PruneRequest = if body.is_empty() {
        PruneRequest::default()
    } else {
        parse_json(&body)?
    };
    let mut policy = state.retention;
    if let Some(days) = ask.older_than_days {
        policy.max_age_ms = Some(days.saturating_mul(86_400_000));
    }
    if let Some(keep) = ask.keep {
        policy.keep_deployments = keep;
    }
    let pruned = state.deployments.prune(&policy).await?;
    let kept = state.deployments.with_state(|s| s.deployments.len());
    Ok(HttpResponse::Ok().json(json!({"pruned": pruned, "kept": kept})))
}

/// `?offset=N`: the log from byte `N` of its masked text on (what a follower already has).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    #[serde(default)]
    offset: usize,
}

async fn step_log(
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
    query: web::Query<LogQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let (id, agent, step) = path.into_inner();
    let reader = log_reader(&state.deployments, &state.registry, &id, agent, &step).await?;
    // Streamed from storage a page at a time: memory stays flat whatever the log's size.
    let pages =
        futures_util::stream::unfold((Some(reader), query.offset), |(reader, skip)| async move {
            let mut reader = reader?;
            let read = web::block(move || {
                let page = reader.next_page();
                (reader, page)
            })
            .await;
            let (reader, page) = match read {
                Ok((reader, Ok(Some(page)))) => (reader, page),
                Ok((_, Ok(None))) => return None,
                Ok((_, Err(e))) => {
                    tracing::error!(error = %e, "step-log-read-failed");
                    let e = std::io::Error::other("the log could not be read");
                    return Some((Err(e), (None, 0)));
                }
                Err(_) => return None,
            };
            let mut cut = skip.min(page.len());
            while !page.is_char_boundary(cut) {
                cut += 1;
            }
            let bytes = web::Bytes::copy_from_slice(&page.as_bytes()[cut..]);
            Some((Ok(bytes), (Some(reader), skip - skip.min(page.len()))))
        });
    Ok(HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .streaming(pages))
}

/// A reader of the log of `step` (name or index) of deployment `id`'s job on `agent` (name or
/// id), secrets masked (for the REST API and the web application).
pub async fn log_reader(
    deployments: &Deployments,
    registry: &Registry,
    id: &str,
    agent: String,
    step: &str,
) -> Result<view::LogReader, ApiError> {
    let agent_id = registry
        .resolve_agent(&agent)
        .map_or(agent, |a| a.id.into_string());
    let found = deployments.with_state(|s| {
        let d = s.deployments.get(id)?;
        let job = s.jobs.get(format!("{id}-{agent_id}").as_str())?;
        let index = job
            .steps
            .iter()
            .position(|st| st.name == step)
            .or_else(|| step.parse::<usize>().ok().filter(|i| *i < job.steps.len()))?;
        let complete = job.status.is_final() || job.steps[index].status != StepState::Running;
        Some((
            job.job_id.clone(),
            u32::try_from(index).ok()?,
            d.secret_values(),
            complete,
        ))
    });
    let (job_id, index, secrets, complete) = found.ok_or(ApiError::NotFound)?;
    let journal = deployments.journal().clone();
    // A step's end is in memory as soon as its event is read; its last output is stored with
    // it, in a commit that is queued by then. Commits are applied in order: once an empty one
    // is through, the log is complete.
    if complete {
        journal.commit(Vec::new()).await.map_err(|e| {
            tracing::error!(error = %e, "step-log-barrier-failed");
            ApiError::Unavailable
        })?;
    }
    Ok(view::LogReader::new(
        journal, &job_id, index, &secrets, complete,
    ))
}
