//! `tether processes list|show NAME|create -f FILE`: `/api/v1/processes`.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use serde_json::Value;

use super::{items, str_at, u64_at};
use crate::client::{segment, Client};
use crate::error::{About, CliError};
use crate::output::{self, ago, cell, now_unix_ms, Table};

/// Every process.
pub fn list(client: &Client, json: bool) -> Result<ExitCode, CliError> {
    let processes = client
        .get_json("/api/v1/processes")
        .about(|| "processes".to_owned())?;
    if json {
        output::json(&processes)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_unix_ms();
    let mut table = Table::new(&["NAME", "VERSION", "STEPS", "UPDATED"]);
    for p in processes.as_array().into_iter().flatten() {
        let steps: Vec<&str> = items(p, "steps")
            .iter()
            .map(|s| str_at(s, "name"))
            .collect();
        table.row(vec![
            cell(&p["name"]),
            cell(&p["version"]),
            steps.join(","),
            ago(u64_at(p, "updated_unix_ms"), now),
        ]);
    }
    table.print()?;
    Ok(ExitCode::SUCCESS)
}

/// One process and its steps.
pub fn show(client: &Client, name: &str, json: bool) -> Result<ExitCode, CliError> {
    let process = client
        .get_json(&format!("/api/v1/processes/{}", segment(name)))
        .about(|| format!("process {name}"))?;
    if json {
        output::json(&process)?;
        return Ok(ExitCode::SUCCESS);
    }
    output::fields(&[
        ("name", cell(&process["name"])),
        ("version", cell(&process["version"])),
        (
            "updated",
            ago(u64_at(&process, "updated_unix_ms"), now_unix_ms()),
        ),
    ])?;
    output::line("")?;
    let mut table = Table::new(&["STEP", "PLUGIN", "TIMEOUT", "ON INTERRUPT", "PROPERTIES"]);
    for s in items(&process, "steps") {
        let properties: Vec<&str> = s
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default();
        table.row(vec![
            cell(&s["name"]),
            format!("{}/{}", str_at(s, "plugin"), str_at(s, "step")),
            u64_at(s, "timeout_s").map_or_else(|| "-".to_owned(), |t| format!("{t}s")),
            cell(&s["on_interrupt"]),
            properties.join(","),
        ]);
    }
    table.print()?;
    Ok(ExitCode::SUCCESS)
}

/// Creates a process (or its next version) from the JSON in `file` (`-`: standard input).
pub fn create(client: &Client, file: &Path, json: bool) -> Result<ExitCode, CliError> {
    let failed = |e: std::io::Error| CliError::Failed(format!("{}: {e}", file.display()));
    let text = if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(failed)?;
        text
    } else {
        std::fs::read_to_string(file).map_err(failed)?
    };
    let body: Value = serde_json::from_str(&text)
        .map_err(|e| CliError::Failed(format!("{}: not JSON: {e}", file.display())))?;
    let name = str_at(&body, "name").to_owned();
    let answer = client
        .post_json("/api/v1/processes", Some(&body))
        .about(|| format!("process {name}"))?;
    if json {
        output::json(&answer)?;
    } else {
        output::line(&format!(
            "process {} version {}",
            str_at(&answer, "name"),
            cell(&answer["version"])
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}
