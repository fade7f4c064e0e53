//! `tether audit [--after N] [--limit N] [--actor TEXT] [--path TEXT] [--export]`: the audit
//! log, through `GET /api/v1/audit` (a table, oldest first; `--json` the answer) or, with
//! `--export`, `GET /api/v1/audit/export` (JSON lines, for a SIEM).

use std::process::ExitCode;

use super::u64_at;
use crate::client::Client;
use crate::error::{About, CliError};
use crate::output::{self, ago, cell, now_unix_ms, Table};

/// What to show.
pub struct AuditFilter<'a> {
    pub after: u64,
    pub limit: usize,
    pub actor: Option<&'a str>,
    pub path: Option<&'a str>,
}

/// `k=v` query pairs, encoded.
fn query(f: &AuditFilter<'_>) -> Result<String, CliError> {
    let (after, limit) = (f.after.to_string(), f.limit.to_string());
    let mut pairs = vec![("after", after.as_str()), ("limit", limit.as_str())];
    pairs.extend(f.actor.map(|a| ("actor", a)));
    pairs.extend(f.path.map(|p| ("path", p)));
    serde_urlencoded::to_string(pairs).map_err(|e| CliError::Failed(format!("query: {e}")))
}

pub fn show(
    client: &Client,
    f: &AuditFilter<'_>,
    export: bool,
    json: bool,
) -> Result<ExitCode, CliError> {
    if export {
        let text = client
            .get_text(&format!("/api/v1/audit/export?{}", query(f)?))
            .about(|| "the audit log".to_owned())?;
        output::raw(&text)?;
        return Ok(ExitCode::SUCCESS);
    }
    let answer = client
        .get_json(&format!("/api/v1/audit?{}", query(f)?))
        .about(|| "the audit log".to_owned())?;
    if json {
        output::json(&answer)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_unix_ms();
    let mut table = Table::new(&["#", "WHEN", "ACTOR", "SOURCE", "REQUEST", "STATUS"]);
    for e in answer["entries"].as_array().into_iter().flatten() {
        table.row(vec![
            cell(&e["seq"]),
            ago(u64_at(e, "at_unix_ms"), now),
            cell(&e["actor"]),
            cell(&e["source"]),
            format!("{} {}", cell(&e["method"]), cell(&e["path"])),
            format!("{} {}", cell(&e["status"]), cell(&e["outcome"])),
        ]);
    }
    table.print()?;
    eprintln!(
        "tether: continue with --after {} (newest: {})",
        cell(&answer["next"]),
        cell(&answer["head"])
    );
    Ok(ExitCode::SUCCESS)
}
