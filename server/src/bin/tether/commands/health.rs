//! `tether health`: `GET /admin/health` as tables (server actors, sessions, journal, agents,
//! relay links), or verbatim with `--json`. Exits 1 when a server actor is not running, the
//! journal is poisoned or waiting for its database, or an agent's handshake is refused, so that
//! scripts can watch it. A standby (servers on PostgreSQL)
//! shows its role and the active node, and exits 0.

use std::collections::HashMap;
use std::process::ExitCode;

use serde_json::Value;

use super::{items, str_at, u64_at};
use crate::client::Client;
use crate::error::{About, CliError};
use crate::output::{self, ago, cell, duration, now_unix_ms, Table};

/// A cluster's nodes on one line: `name role version, N sessions[, at URL] (seen 1s ago)`,
/// comma-separated.
fn nodes(cluster: &Value) -> String {
    let list: Vec<String> = items(cluster, "nodes")
        .iter()
        .map(|n| {
            format!(
                "{} {} {}, {} sessions{} (seen {} ago)",
                str_at(n, "node"),
                str_at(n, "role"),
                str_at(n, "version"),
                u64_at(n, "sessions").unwrap_or(0),
                match str_at(n, "url") {
                    "" => String::new(),
                    url => format!(", at {url}"),
                },
                duration(u64_at(n, "seen_ms_ago").unwrap_or(0))
            )
        })
        .collect();
    if list.is_empty() {
        "not listed yet".to_owned()
    } else {
        list.join(", ")
    }
}

/// Prints the server's health.
pub fn show(client: &Client, json: bool) -> Result<ExitCode, CliError> {
    let health = client
        .get_json("/admin/health")
        .about(|| "health".to_owned())?;
    // A standby (servers on PostgreSQL) reports only its role and the active node: it works
    // as it should by waiting. So does a member (it serves agents, and waits for the lease).
    let role = health.pointer("/cluster/role").and_then(Value::as_str);
    if let Some(role @ ("standby" | "member")) = role {
        if json {
            output::json(&health)?;
        } else {
            let cluster = &health["cluster"];
            let active = match cluster.get("active").filter(|a| !a.is_null()) {
                Some(a) => format!(
                    "{} (epoch {}, its lease ends in {})",
                    cell(&a["node"]),
                    cell(&a["epoch"]),
                    duration(u64_at(a, "lease_expires_in_ms").unwrap_or(0))
                ),
                None => "none yet".to_owned(),
            };
            output::fields(&[
                ("role", role.to_owned()),
                ("node", cell(&cluster["node"])),
                ("active node", active),
                ("nodes", nodes(cluster)),
            ])?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let troubled: Vec<String> = items(&health, "actors")
        .iter()
        .filter(|a| str_at(a, "state") != "running")
        .map(|a| format!("{} {}", str_at(a, "name"), str_at(a, "state")))
        .collect();
    let journal_says = |field: &str| {
        health
            .get("journal")
            .and_then(|j| j.get(field))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let poisoned = journal_says("poisoned");
    let waiting = journal_says("waiting");
    let refused: Vec<String> = health
        .get("agents")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(id, a)| {
            a.get("refused")
                .and_then(Value::as_str)
                .map(|why| format!("agent {id} refused: {why}"))
        })
        .collect();
    let healthy =
        troubled.is_empty() && poisoned.is_none() && waiting.is_none() && refused.is_empty();
    if json {
        output::json(&health)?;
    } else {
        print_tables(client, &health)?;
    }
    if !healthy {
        let mut problems = troubled;
        problems.extend(poisoned.map(|p| format!("journal poisoned: {p}")));
        problems.extend(waiting.map(|w| format!("journal waiting for its database: {w}")));
        problems.extend(refused);
        eprintln!("tether: unhealthy: {}", problems.join("; "));
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_tables(client: &Client, health: &Value) -> Result<(), CliError> {
    let now = now_unix_ms();
    let mut actors = Table::new(&["ACTOR", "KIND", "STATE", "RESTARTS", "BACKLOG", "LAST BEAT"]);
    for a in items(health, "actors") {
        actors.row(vec![
            cell(&a["name"]),
            cell(&a["kind"]),
            cell(&a["state"]),
            cell(&a["restarts"]),
            cell(&a["backlog"]),
            u64_at(a, "last_beat_ms")
                .map_or_else(|| "-".to_owned(), |ms| format!("{} ago", duration(ms))),
        ]);
    }
    actors.print()?;
    output::line("")?;
    let journal = health.get("journal").unwrap_or(&Value::Null);
    let cluster = health.get("cluster").filter(|c| !c.is_null());
    let role = cluster.map_or_else(
        || "single server (sled)".to_owned(),
        |c| {
            format!(
                "{} node {} (epoch {})",
                cell(&c["role"]),
                cell(&c["node"]),
                cell(&c["epoch"])
            )
        },
    );
    if let Some(c) = cluster {
        output::fields(&[("nodes", nodes(c))])?;
    }
    output::fields(&[
        ("role", role),
        ("sessions", cell(&health["sessions"])),
        (
            "journal",
            format!(
                "last commit {}, {} commits, {} syncs, {} queued, {} failures{}",
                ago(u64_at(journal, "last_commit_unix_ms"), now),
                cell(&journal["commits"]),
                cell(&journal["syncs"]),
                cell(&journal["queued"]),
                cell(&journal["failures"]),
                journal
                    .get("poisoned")
                    .and_then(Value::as_str)
                    .map(|p| format!(", POISONED: {p}"))
                    .unwrap_or_default()
            ),
        ),
    ])?;
    let reconciliation = &health["reconciliation"];
    if u64_at(reconciliation, "agents").is_some_and(|n| n > 0) {
        output::fields(&[(
            "reconciliation",
            format!(
                "behind {} agent(s) (restored from a backup?), {} still reporting: {} events and {} commands lost, {} jobs brought up to date, {} results for unknown jobs (tether reconciliation)",
                cell(&reconciliation["agents"]),
                cell(&reconciliation["reconciling"]),
                cell(&reconciliation["events_lost"]),
                cell(&reconciliation["commands_lost"]),
                cell(&reconciliation["jobs_updated"]),
                cell(&reconciliation["orphan_results"]),
            ),
        )])?;
    }
    let agents = health.get("agents").and_then(Value::as_object);
    if let Some(agents) = agents.filter(|a| !a.is_empty()) {
        // Names for the ids health is keyed by; ids alone if the list is unavailable.
        let names: HashMap<String, String> = client
            .get_json("/api/v1/agents")
            .ok()
            .and_then(|list| list.as_array().cloned())
            .into_iter()
            .flatten()
            .map(|a| (str_at(&a, "id").to_owned(), str_at(&a, "name").to_owned()))
            .collect();
        output::line("")?;
        let mut table = Table::new(&[
            "AGENT",
            "CONNECTED",
            "UNACKED",
            "OLDEST UNACKED",
            "EVENTS",
            "LAST HEARD",
            "ACTORS RUNNING",
        ]);
        for (id, a) in agents {
            let own = items(a, "actors");
            let running = own
                .iter()
                .filter(|x| str_at(x, "state") == "running")
                .count();
            table.row(vec![
                names.get(id).cloned().unwrap_or_else(|| id.clone()),
                cell(&a["connected"]),
                cell(&a["unacked_commands"]),
                u64_at(a, "oldest_unacked_ms").map_or_else(|| "-".to_owned(), duration),
                cell(&a["events_received"]),
                u64_at(a, "last_heard_ms")
                    .map_or_else(|| "-".to_owned(), |ms| format!("{} ago", duration(ms))),
                format!("{running}/{}", own.len()),
            ]);
        }
        table.print()?;
    }
    let links = health.get("relay_links").and_then(Value::as_object);
    if let Some(links) = links.filter(|l| !l.is_empty()) {
        output::line("")?;
        let mut table = Table::new(&["RELAY LINK", "AGENTS", "RELAYS", "HANDSHAKING"]);
        for (name, l) in links {
            table.row(vec![
                name.clone(),
                cell(&l["agents"]),
                cell(&l["relays"]),
                cell(&l["handshaking"]),
            ]);
        }
        table.print()?;
    }
    Ok(())
}
