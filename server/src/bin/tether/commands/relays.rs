//! `tether relays [list]`: `GET /api/v1/relays`; `tether relays delete RELAY`:
//! `DELETE /api/v1/relays/RELAY` (revoked, its link and what it carries closed at once).

use std::process::ExitCode;

use serde_json::Value;

use super::{items, str_at, u64_at};
use crate::client::{segment, Client};
use crate::error::{About, CliError};
use crate::output::{self, ago, cell, now_unix_ms, Table};

/// Every relay.
pub fn list(client: &Client, json: bool) -> Result<ExitCode, CliError> {
    let relays = client
        .get_json("/api/v1/relays")
        .about(|| "relays".to_owned())?;
    if json {
        output::json(&relays)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_unix_ms();
    let mut table = Table::new(&[
        "NAME",
        "STATUS",
        "VERSION",
        "PATH",
        "AGENTS",
        "LAST SEEN",
        "UPGRADE",
    ]);
    for r in relays.as_array().into_iter().flatten() {
        let parents: Vec<&str> = items(r, "path").iter().filter_map(Value::as_str).collect();
        table.row(vec![
            cell(&r["name"]),
            super::agents::status(r),
            cell(&r["version"]),
            if parents.is_empty() {
                "direct".to_owned()
            } else {
                parents.join(" > ")
            },
            cell(&r["agents"]),
            ago(u64_at(r, "last_seen"), now),
            match r["upgrade"]["state"].as_str() {
                Some(state) => format!("{state} {}", str_at(&r["upgrade"], "version")),
                None => "-".to_owned(),
            },
        ]);
    }
    table.print()?;
    Ok(ExitCode::SUCCESS)
}

/// Deletes (revokes) relay `relay`, by name or id.
pub fn delete(client: &Client, relay: &str, json: bool) -> Result<ExitCode, CliError> {
    let answer = client
        .delete_json(&format!("/api/v1/relays/{}", segment(relay)))
        .about(|| format!("relay {relay}"))?;
    if json {
        output::json(&answer)?;
    } else {
        output::line(&format!(
            "relay {relay} deleted: its key no longer authenticates; {} link(s) and connection(s) closed",
            cell(&answer["closed"])
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}
