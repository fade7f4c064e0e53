//! The JSON answers of the deployments API, built from a consistent snapshot of the state.
//! Secret values never leave here: `*_secret` properties and secret step properties show as
//! `***`, and any secret value found inside outputs, messages or logs is replaced by `***`.

use serde_json::{json, Value};
use tether_shared::journal::{JournalError, JournalHandle};
use tether_shared::protocol::Seq;

use super::model::{deployment_status, is_secret_property, mask, Deployment, Process, MASK};
use super::state::{step_log, State};
use crate::registry::Registry;

/// Records read from a step log per page.
const LOG_PAGE: usize = 1024;

/// A process as `GET /api/v1/processes[/{name}]` shows it; properties declared secret show
/// as `***`.
pub fn process(p: &Process) -> Value {
    json!({
        "name": p.name,
        "version": p.version,
        "updated_unix_ms": p.updated_unix_ms,
        "steps": p.steps.iter().map(|s| json!({
            "name": s.name,
            "plugin": s.plugin,
            "step": s.step,
            "properties": s.properties.iter().map(|(k, v)| {
                let shown = if s.secrets.contains(k) { MASK } else { v.as_str() };
                (k.clone(), Value::String(shown.to_owned()))
            }).collect::<serde_json::Map<_, _>>(),
            "secrets": s.secrets,
            "on_interrupt": s.on_interrupt,
            "timeout_s": s.timeout_s,
        })).collect::<Vec<_>>(),
    })
}

/// `GET /api/v1/deployments/{id}`.
pub fn deployment(state: &State, d: &Deployment, registry: &Registry) -> Value {
    let secrets = d.secret_values();
    let properties: serde_json::Map<String, Value> = d
        .properties
        .iter()
        .map(|(k, v)| {
            let shown = if is_secret_property(k) {
                MASK.to_owned()
            } else {
                mask(v, &secrets)
            };
            (k.clone(), Value::String(shown))
        })
        .collect();
    let jobs: Vec<Value> = state
        .jobs_of(d)
        .map(|j| {
            let name = registry.agent(&j.agent_id).map(|a| a.name);
            json!({
                "agent": name.unwrap_or_else(|| j.agent_id.clone()),
                "agent_id": j.agent_id,
                "job_id": j.job_id,
                "status": j.status,
                "message": mask(&j.message, &secrets),
                "finished_unix_ms": j.finished_unix_ms,
                "steps": j.steps.iter().enumerate().map(|(i, s)| {
                    let declared = d.steps.get(i).map(|spec| spec.secrets.as_slice()).unwrap_or_default();
                    let outputs: serde_json::Map<String, Value> = s.outputs.iter().map(|(k, v)| {
                        let shown = if is_secret_property(k) || declared.contains(k) {
                            MASK.to_owned()
                        } else {
                            mask(v, &secrets)
                        };
                        (k.clone(), Value::String(shown))
                    }).collect();
                    json!({
                        "name": s.name,
                        "status": s.status,
                        "exit_code": s.exit_code,
                        "outputs": outputs,
                        "message": mask(&s.message, &secrets),
                        "attempt": s.attempt,
                    })
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "id": d.id,
        "status": deployment_status(state.jobs_of(d)),
        "process": d.process,
        "process_version": d.process_version,
        "properties": properties,
        "created_unix_ms": d.created_unix_ms,
        "jobs": jobs,
    })
}

/// The whole output of step `step` of `job_id`, chunks in order, secrets masked.
pub fn step_log_text(
    journal: &JournalHandle,
    job_id: &str,
    step: u32,
    secrets: &[String],
) -> Result<String, JournalError> {
    let Some(log) = step_log(job_id, step) else {
        return Ok(String::new());
    };
    let mut text = Vec::new();
    let mut after = Seq::ZERO;
    loop {
        let page = journal.read_log(&log, after, LOG_PAGE)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in &page {
            text.extend_from_slice(&r.payload);
        }
        if page.len() < LOG_PAGE {
            break;
        }
    }
    Ok(mask(&String::from_utf8_lossy(&text), secrets))
}
