//! Processes: `GET /processes` (list, and a form to create or replace one from JSON, checked by
//! exactly the rules of `POST /api/v1/processes`), `GET /processes/{name}` (its steps, secret
//! properties masked, and a form to start a deployment of it).

use actix_web::{web, HttpRequest, HttpResponse};
use maud::{html, Markup};
use serde::Deserialize;

use super::layout::{self, csrf_field, enc, found, resource, utc};
use super::session::CurrentUser;
use super::{csrf, WebError};
use crate::api_error::parse_json;
use crate::deployments::model::MASK;
use crate::deployments::validate::NewProcess;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/processes")
            .route(web::get().to(list))
            .route(web::post().to(create)),
    )
    .service(resource("/processes/{name}").route(web::get().to(detail)));
}

const EXAMPLE: &str = r#"{"name": "hello", "steps": [
  {"name": "greet", "plugin": "shell", "step": "run",
   "properties": {"script": "echo hello $TETHER_PROP_WHO", "who": "${who}"}}
]}"#;

fn list_page(user: &CurrentUser, state: &AppState, json: &str, error: Option<&str>) -> Markup {
    let processes = state.deployments.processes();
    html! {
        @if processes.is_empty() { p.muted { "No process yet." } } @else {
            table #processes {
                thead { tr { th { "Name" } th { "Version" } th { "Steps" } th { "Updated" } } }
                tbody { @for p in &processes {
                    tr {
                        td { a href={ "/processes/" (enc(&p.name)) } { (p.name) } }
                        td { (p.version) }
                        td { @for s in &p.steps { span.tag { (s.name) " (" (s.plugin) "/" (s.step) ")" } } }
                        td { (utc(p.updated_unix_ms)) }
                    }
                } }
            }
        }
        @if user.may_post("/processes") { form.card #new-process method="post" action="/processes" {
            (csrf_field(user))
            h2 { "Create or replace a process" }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            label for="process-json" { "The process as JSON (as for " code { "POST /api/v1/processes" } ")" }
            textarea #process-json name="json" rows="12" placeholder=(EXAMPLE) { (json) }
            button type="submit" { "Save process" }
        } }
    }
}

async fn list(user: CurrentUser, state: web::Data<AppState>) -> HttpResponse {
    let body = list_page(&user, &state, "", None);
    layout::page("Processes", &user, "/processes", body)
}

#[derive(Deserialize)]
struct ProcessForm {
    #[serde(default)]
    json: String,
}

async fn create(
    req: HttpRequest,
    user: CurrentUser,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: ProcessForm = csrf::protected_form(&req, &user, &body)?;
    let stored = match parse_json::<NewProcess>(form.json.as_bytes()) {
        Ok(new) => state
            .deployments
            .put_process(new)
            .await
            .map_err(|e| WebError::from(crate::api_error::ApiError::from(e))),
        Err(e) => Err(WebError::from(e)),
    };
    match stored {
        Ok(p) => {
            tracing::info!(user = %user.name, process = %p.name, version = p.version, "web-process-stored");
            Ok(layout::redirect(&format!(
                "/processes/{}?done=saved",
                enc(&p.name)
            )))
        }
        Err(WebError::BadRequest(reason)) => {
            let body = list_page(&user, &state, &form.json, Some(&reason));
            let mut r = layout::page("Processes", &user, "/processes", body);
            *r.status_mut() = actix_web::http::StatusCode::BAD_REQUEST;
            Ok(r)
        }
        Err(e) => Err(e),
    }
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
    let p = found(state.deployments.process(&path.into_inner()))?;
    Ok(layout::page(
        &format!("Process {}", p.name),
        &user,
        "/processes",
        html! {
            (layout::notice(query.done.as_deref()))
            p.muted { "Version " (p.version) " · updated " (utc(p.updated_unix_ms)) }
            table #steps {
                thead { tr { th { "#" } th { "Step" } th { "Plugin/step" } th { "Properties" } th { "On interrupt" } th { "Timeout" } } }
                tbody { @for (i, s) in p.steps.iter().enumerate() {
                    tr {
                        td { (i + 1) } td { (s.name) } td { (s.plugin) "/" (s.step) }
                        td { @for (k, v) in &s.properties {
                            div { code { (k) } " = "
                                @if s.secrets.contains(k) { (MASK) } @else { pre.inline { (v) } } }
                        } }
                        td { (format!("{:?}", s.on_interrupt).to_lowercase()) }
                        td { (s.timeout_s) " s" }
                    }
                } }
            }
            (super::deployments::start_form(&user, &state, Some(&p.name)))
        },
    ))
}
