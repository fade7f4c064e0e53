//! `tether deployments list|show ID|cancel ID` and `tether logs ID AGENT STEP`:
//! `/api/v1/deployments...`.

use std::process::ExitCode;

use serde_json::json;

use super::{items, str_at, u64_at};
use crate::client::{segment, Client};
use crate::error::{About, CliError};
use crate::output::{self, ago, cell, now_unix_ms, Table};

/// Every deployment.
pub fn list(client: &Client, json: bool) -> Result<ExitCode, CliError> {
    let deployments = client
        .get_json("/api/v1/deployments")
        .about(|| "deployments".to_owned())?;
    if json {
        output::json(&deployments)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_unix_ms();
    let mut table = Table::new(&["ID", "PROCESS", "STATUS", "JOBS", "CREATED"]);
    let mut rows: Vec<_> = deployments.as_array().into_iter().flatten().collect();
    rows.sort_by_key(|d| u64_at(d, "created_unix_ms"));
    for d in rows {
        table.row(vec![
            cell(&d["id"]),
            cell(&d["process"]),
            cell(&d["status"]),
            cell(&d["jobs"]),
            ago(u64_at(d, "created_unix_ms"), now),
        ]);
    }
    table.print()?;
    Ok(ExitCode::SUCCESS)
}

/// One deployment with its jobs and steps.
pub fn show(client: &Client, id: &str, json: bool) -> Result<ExitCode, CliError> {
    let d = client
        .get_json(&format!("/api/v1/deployments/{}", segment(id)))
        .about(|| format!("deployment {id}"))?;
    if json {
        output::json(&d)?;
        return Ok(ExitCode::SUCCESS);
    }
    output::fields(&[
        ("id", cell(&d["id"])),
        (
            "process",
            format!(
                "{} (version {})",
                str_at(&d, "process"),
                cell(&d["process_version"])
            ),
        ),
        ("status", cell(&d["status"])),
        ("created", ago(u64_at(&d, "created_unix_ms"), now_unix_ms())),
    ])?;
    output::line("")?;
    let mut table = Table::new(&["AGENT", "JOB", "STEP", "STATUS", "EXIT", "MESSAGE"]);
    for job in items(&d, "jobs") {
        table.row(vec![
            cell(&job["agent"]),
            cell(&job["status"]),
            String::new(),
            String::new(),
            String::new(),
            cell(&job["message"]),
        ]);
        for step in items(job, "steps") {
            table.row(vec![
                String::new(),
                String::new(),
                cell(&step["name"]),
                cell(&step["status"]),
                cell(&step["exit_code"]),
                cell(&step["message"]),
            ]);
        }
    }
    table.print()?;
    Ok(ExitCode::SUCCESS)
}

/// Cancels a deployment.
pub fn cancel(client: &Client, id: &str, json: bool) -> Result<ExitCode, CliError> {
    let answer = client
        .post_json(&format!("/api/v1/deployments/{}/cancel", segment(id)), None)
        .about(|| format!("deployment {id}"))?;
    if json {
        output::json(&answer)?;
    } else {
        output::line(&format!(
            "cancelling deployment {id}: sent to {} agent(s)",
            cell(&answer["cancel_sent"])
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prunes finished deployments (by the server's policy where an option is left out).
pub fn prune(
    client: &Client,
    older_than_days: Option<u64>,
    keep: Option<usize>,
    json: bool,
) -> Result<ExitCode, CliError> {
    let mut body = serde_json::Map::new();
    if let Some(days) = older_than_days {
        body.insert("older_than_days".into(), days.into());
    }
    if let Some(keep) = keep {
        body.insert("keep".into(), keep.into());
    }
    let answer = client
        .post_json("/api/v1/deployments/prune", Some(&body.into()))
        .about(|| "prune".to_owned())?;
    if json {
        output::json(&answer)?;
    } else {
        output::line(&format!(
            "pruned {} finished deployment(s); {} kept",
            cell(&answer["pruned"]),
            cell(&answer["kept"])
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The log of one step of one agent's job.
pub fn logs(
    client: &Client,
    id: &str,
    agent: &str,
    step: &str,
    json: bool,
) -> Result<ExitCode, CliError> {
    let path = format!(
        "/api/v1/deployments/{}/jobs/{}/steps/{}/log",
        segment(id),
        segment(agent),
        segment(step)
    );
    let text = client
        .get_text(&path)
        .about(|| format!("log of {agent}/{step} in deployment {id}"))?;
    if json {
        output::json(&json!({"deployment": id, "agent": agent, "step": step, "log": text}))?;
    } else {
        output::raw(&text)?;
    }
    Ok(ExitCode::SUCCESS)
}
