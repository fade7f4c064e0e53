//! `tether agents [list]` and `tether agents show NAME|ID`: `GET /api/v1/agents`, and for one
//! agent its entry there with what `/admin/health` says about it; `tether agents delete
//! NAME|ID [--force]`: `DELETE /api/v1/agents/{id}`; `tether agents maintenance NAME|ID on|off
//! [--reason TEXT]` and `tether agents concurrency NAME|ID N`: `PATCH /api/v1/agents/{id}`.

use std::process::ExitCode;

use serde_json::Value;

use super::{items, str_at, u64_at};
use crate::client::Client;
use crate::error::{About, CliError};
use crate::output::{self, ago, cell, now_unix_ms, Table};

/// Every agent, or those meeting `conditions` (`--where`, checked by the server).
pub fn list(client: &Client, conditions: &[String], json: bool) -> Result<ExitCode, CliError> {
    let pairs: Vec<(&str, &str)> = conditions.iter().map(|c| ("where", c.as_str())).collect();
    let query =
        serde_urlencoded::to_string(pairs).map_err(|e| CliError::Failed(format!("query: {e}")))?;
    let url = match query.is_empty() {
        true => "/api/v1/agents".to_owned(),
        false => format!("/api/v1/agents?{query}"),
    };
    let agents = client.get_json(&url).about(|| "agents".to_owned())?;
    if json {
        output::json(&agents)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_unix_ms();
    let mut table = Table::new(&[
        "NAME",
        "STATUS",
        "VERSION",
        "SYSTEM",
        "TAGS",
        "PATH",
        "LAST SEEN",
    ]);
    for a in agents.as_array().into_iter().flatten() {
        table.row(vec![
            cell(&a["name"]),
            status(a),
            version(a),
            system(a),
            cell(&a["tags"]),
            path(a),
            ago(u64_at(a, "last_seen"), now),
        ]);
    }
    table.print()?;
    Ok(ExitCode::SUCCESS)
}

/// Its version, and `(upgrade recommended)` when it is older than the server's.
fn version(agent: &Value) -> String {
    match agent["upgrade_recommended"].as_bool() {
        Some(true) => format!("{} (upgrade recommended)", cell(&agent["version"])),
        _ => cell(&agent["version"]),
    }
}

/// Its distribution and architecture from its facts (`debian 12 x86_64`), `-` if none.
fn system(agent: &Value) -> String {
    let facts = &agent["facts"];
    let parts: Vec<&str> = ["distribution", "distribution_version", "arch"]
        .iter()
        .filter_map(|k| facts.get(*k)?.as_str())
        .collect();
    match parts.is_empty() {
        true => "-".to_owned(),
        false => parts.join(" "),
    }
}

/// Its status, `(maintenance)` while it (an agent or a relay) is in maintenance, `(stale)`
/// while it has been offline for longer than the server's `retention.mark_stale_after_s`.
pub fn status(agent: &Value) -> String {
    let mut text = cell(&agent["status"]);
    if agent.get("maintenance").is_some_and(|m| !m.is_null()) {
        text.push_str(" (maintenance)");
    }
    if agent["stale"] == true {
        text.push_str(" (stale)");
    }
    text
}

/// The relays an agent's session runs through, nearest the agent first; `direct` if none, `-`
/// if it was not seen since the server started (its path is learnt at its handshake).
fn path(agent: &Value) -> String {
    let relays: Vec<&str> = items(agent, "path")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if !relays.is_empty() {
        relays.join(" > ")
    } else if agent.get("last_seen").is_none_or(Value::is_null) {
        "-".to_owned()
    } else {
        "direct".to_owned()
    }
}

/// One agent by name or id, with `health` (its entry in `/admin/health`, if any) added.
pub fn show(client: &Client, wanted: &str, json: bool) -> Result<ExitCode, CliError> {
    let agents = client
        .get_json("/api/v1/agents")
        .about(|| "agents".to_owned())?;
    let found = agents
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| str_at(a, "id") == wanted || str_at(a, "name") == wanted)
        .cloned();
    let Some(mut agent) = found else {
        return Err(CliError::Failed(format!(
            "no agent has the name or id {wanted:?}"
        )));
    };
    let health = client
        .get_json("/admin/health")
        .about(|| "health".to_owned())?;
    let own = health
        .get("agents")
        .and_then(|all| all.get(str_at(&agent, "id")).or_else(|| all.get(wanted)))
        .cloned()
        .unwrap_or(Value::Null);
    if let Some(fields) = agent.as_object_mut() {
        fields.insert("health".to_owned(), own.clone());
    }
    if json {
        output::json(&agent)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_unix_ms();
    let mut lines = vec![
        ("name", cell(&agent["name"])),
        ("id", cell(&agent["id"])),
        ("status", status(&agent)),
        (
            "maintenance",
            match agent.get("maintenance").filter(|m| !m.is_null()) {
                Some(m) => format!(
                    "since {} {}",
                    ago(u64_at(m, "since_unix_ms"), now),
                    str_at(m, "reason")
                ),
                None => "no".to_owned(),
            },
        ),
        ("version", version(&agent)),
        ("tags", cell(&agent["tags"])),
        ("path", path(&agent)),
        (
            "jobs at once",
            match u64_at(&agent, "max_running_jobs") {
                Some(n) => n.to_string(),
                None => "the server's default".to_owned(),
            },
        ),
        ("last seen", ago(u64_at(&agent, "last_seen"), now)),
    ];
    if !own.is_null() {
        lines.push(("connected", cell(&own["connected"])));
        lines.push(("unacked commands", cell(&own["unacked_commands"])));
        lines.push(("events received", cell(&own["events_received"])));
    }
    output::fields(&lines)?;
    if let Some(facts) = agent["facts"].as_object().filter(|f| !f.is_empty()) {
        output::line("")?;
        let mut table = Table::new(&["FACT", "VALUE"]);
        for (k, v) in facts {
            table.row(vec![k.clone(), cell(v)]);
        }
        table.print()?;
    }
    let actors = items(&own, "actors");
    if !actors.is_empty() {
        output::line("")?;
        let mut table = Table::new(&["ACTOR", "KIND", "STATE", "RESTARTS"]);
        for a in actors {
            table.row(vec![
                cell(&a["name"]),
                cell(&a["kind"]),
                cell(&a["state"]),
                cell(&a["restarts"]),
            ]);
        }
        table.print()?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Deletes agent `agent` (name or id); with `force`, its unfinished jobs are failed first.
pub fn delete(client: &Client, agent: &str, force: bool, json: bool) -> Result<ExitCode, CliError> {
    let path = format!(
        "/api/v1/agents/{}{}",
        crate::client::segment(agent),
        if force { "?force=true" } else { "" }
    );
    let answer = client
        .delete_json(&path)
        .about(|| format!("agent {agent}"))?;
    if json {
        output::json(&answer)?;
    } else {
        output::line(&format!(
            "agent {agent} deleted: its key no longer authenticates; {} unfinished job(s) failed",
            cell(&answer["failed_jobs"])
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Sets how many jobs agent `agent` runs at once (0: the server's default).
pub fn concurrency(
    client: &Client,
    agent: &str,
    jobs: u32,
    json: bool,
) -> Result<ExitCode, CliError> {
    let path = format!("/api/v1/agents/{}", crate::client::segment(agent));
    let answer = client
        .patch_json(&path, &serde_json::json!({"max_running_jobs": jobs}))
        .about(|| format!("agent {agent}"))?;
    if json {
        output::json(&answer)?;
    } else if jobs == 0 {
        output::line(&format!(
            "agent {agent} runs as many jobs at once as the server's default"
        ))?;
    } else {
        output::line(&format!("agent {agent} runs at most {jobs} job(s) at once"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Seconds a remote operation waits for the agent's answer.
const OPERATION_WAIT_S: u64 = 30;

/// Remote operation `op` (`ping`, `restart`, `log`, `diagnostics`) on `agent`: its answer,
/// or an error if the agent did not answer in time or could not.
pub fn operate(client: &Client, agent: &str, op: &str, json: bool) -> Result<ExitCode, CliError> {
    let path = format!(
        "/api/v1/agents/{}/operations",
        crate::client::segment(agent)
    );
    let answer = client
        .post_json(
            &path,
            Some(&serde_json::json!({"op": op, "wait_s": OPERATION_WAIT_S})),
        )
        .about(|| format!("agent {agent}"))?;
    if json {
        output::json(&answer)?;
    }
    let rtt = u64_at(&answer, "round_trip_ms").unwrap_or(0);
    match str_at(&answer, "state") {
        "pending" => Err(CliError::Failed(format!(
            "no answer from {agent} within {OPERATION_WAIT_S} s: it gets the {op} if it comes back within 5 minutes (GET {path}/{})",
            str_at(&answer, "id")
        ))),
        "failed" => Err(CliError::Failed(format!(
            "{agent}: {op} failed: {}",
            str_at(&answer, "message")
        ))),
        _ if json => Ok(ExitCode::SUCCESS),
        _ => {
            match op {
                "ping" => {
                    output::line(&format!("{agent} answered in {rtt} ms"))?;
                    for hop in answer["hops"].as_array().into_iter().flatten() {
                        let took = hop["rtt_ms"]
                            .as_f64()
                            .map_or("not measured yet".to_owned(), |ms| format!("{ms:.1} ms"));
                        output::line(&format!(
                            "  {} -> {}: {took}",
                            str_at(hop, "from"),
                            str_at(hop, "to")
                        ))?;
                    }
                }
                "restart" => output::line(&format!(
                    "{agent}'s worker restarts (the request was answered in {rtt} ms)"
                ))?,
                _ => output::line(str_at(&answer, "data").trim_end())?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// An agent, or a relay (the agents behind it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Agent,
    Relay,
}

/// Puts agent (or relay) `agent` in maintenance (`on`, with `reason`) or ends it.
pub fn maintenance_of(
    client: &Client,
    peer: Peer,
    agent: &str,
    on: bool,
    reason: Option<String>,
    json: bool,
) -> Result<ExitCode, CliError> {
    let (collection, what, place) = match peer {
        Peer::Agent => ("agents", "agent", "there"),
        Peer::Relay => ("relays", "relay", "on the agents behind it"),
    };
    let mut body = serde_json::json!({"maintenance": on});
    if let Some(reason) = reason {
        if !on {
            return Err(CliError::Usage("--reason goes with `on`".to_owned()));
        }
        body["maintenance_reason"] = reason.into();
    }
    let path = format!("/api/v1/{collection}/{}", crate::client::segment(agent));
    let answer = client
        .patch_json(&path, &body)
        .about(|| format!("{what} {agent}"))?;
    if json {
        output::json(&answer)?;
    } else if on {
        output::line(&format!(
            "{what} {agent} in maintenance: no new job starts {place}"
        ))?;
    } else {
        output::line(&format!(
            "{what} {agent} out of maintenance: waiting jobs start"
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}
