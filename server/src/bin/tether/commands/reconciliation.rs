//! `tether reconciliation [list]`: `GET /api/v1/reconciliation`, what agents reported after
//! the server was found behind them (restored from a backup): per agent, what was lost, where
//! its report stands, and its results for jobs the server does not know (orphans).
//! `tether reconciliation dismiss AGENT`: `DELETE /api/v1/reconciliation/AGENT` once reviewed.

use std::process::ExitCode;

use serde_json::Value;

use super::{items, str_at, u64_at};
use crate::client::{segment, Client};
use crate::error::{About, CliError};
use crate::output::{self, ago, cell, now_unix_ms, Table};

/// Every agent's reconciliation, then every orphan result.
pub fn list(client: &Client, json: bool) -> Result<ExitCode, CliError> {
    let answer = client
        .get_json("/api/v1/reconciliation")
        .about(|| "reconciliation".to_owned())?;
    if json {
        output::json(&answer)?;
        return Ok(ExitCode::SUCCESS);
    }
    let agents = items(&answer, "agents");
    if agents.is_empty() {
        output::line("no reconciliation: the server has not been found behind any agent")?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_unix_ms();
    let name = |a: &Value| match a["agent_name"].as_str() {
        Some(n) => n.to_owned(),
        None => str_at(a, "agent_id").to_owned(),
    };
    let mut table = Table::new(&[
        "AGENT",
        "DETECTED",
        "EVENTS LOST",
        "COMMANDS LOST",
        "REPORT",
        "JOBS UPDATED",
        "ORPHANS",
    ]);
    for a in agents {
        table.row(vec![
            name(a),
            ago(u64_at(a, "detected_unix_ms"), now),
            cell(&a["events_lost"]),
            cell(&a["commands_lost"]),
            format!(
                "{} ({} jobs, {} omitted)",
                cell(&a["phase"]),
                cell(&a["jobs_reported"]),
                cell(&a["jobs_omitted"])
            ),
            cell(&a["jobs_updated"]),
            format!(
                "{}{}",
                cell(&a["orphan_results"]),
                match u64_at(a, "orphans_not_kept") {
                    Some(n) if n > 0 => format!(" (+{n} not kept)"),
                    _ => String::new(),
                }
            ),
        ]);
    }
    table.print()?;
    let orphans: Vec<(&Value, &Value)> = agents
        .iter()
        .flat_map(|a| items(a, "orphans").iter().map(move |o| (a, o)))
        .collect();
    if !orphans.is_empty() {
        output::line("")?;
        output::line("Results for jobs this server does not know (their deployments were lost):")?;
        let mut table = Table::new(&["AGENT", "DEPLOYMENT", "JOB", "STATUS", "STEPS"]);
        for (a, o) in orphans {
            let steps: Vec<String> = items(o, "steps")
                .iter()
                .map(|s| {
                    format!(
                        "{} {}",
                        str_at(s, "name"),
                        s["status"].as_str().unwrap_or("not ended")
                    )
                })
                .collect();
            table.row(vec![
                name(a),
                cell(&o["deployment_id"]),
                cell(&o["job_id"]),
                o["status"].as_str().unwrap_or("running").to_owned(),
                steps.join(", "),
            ]);
        }
        table.print()?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Dismisses `agent`'s reconciliation (reviewed): its record and orphan results go.
pub fn dismiss(client: &Client, agent: &str, json: bool) -> Result<ExitCode, CliError> {
    let answer = client
        .delete_json(&format!("/api/v1/reconciliation/{}", segment(agent)))
        .about(|| format!("reconciliation of {agent}"))?;
    if json {
        output::json(&answer)?;
    } else {
        output::line(&format!("reconciliation of {agent} dismissed"))?;
    }
    Ok(ExitCode::SUCCESS)
}
