//! `tether upgrades upload VERSION FILE [--component agent|relay]` (`PUT
//! /api/v1/upgrades/{version}?component=...`: the server stores and signs the package),
//! `tether upgrades list`, and `tether upgrades rollout VERSION (--agent NAME | --tag TAG |
//! --relay NAME)... [--wait]` (`POST /api/v1/upgrades/{version}/rollout`; with `--wait`, until
//! every target reports done, rolled back or refused).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{items, str_at, u64_at};
use crate::client::{segment, Client};
use crate::error::{About, CliError};
use crate::output::{self, ago, bytes, cell, now_unix_ms, Table};
use crate::upload::{upload_and_report, Destination};

/// How long `--wait` waits for the targets to finish.
const WAIT_LIMIT: Duration = Duration::from_secs(30 * 60);
const POLL: Duration = Duration::from_millis(500);

/// Uploads `file` as upgrade package `version`.
pub fn upload(
    client: &Client,
    version: &str,
    file: &Path,
    component: &str,
    json: bool,
) -> Result<ExitCode, CliError> {
    let (path, what) = if component == "relay" {
        (
            format!("/api/v1/upgrades/{}?component=relay", segment(version)),
            format!("relay upgrade package {version}"),
        )
    } else {
        (
            format!("/api/v1/upgrades/{}", segment(version)),
            format!("upgrade package {version}"),
        )
    };
    upload_and_report(
        client,
        &Destination {
            method: "PUT",
            path: &path,
            content_type: "application/octet-stream",
            what: &what,
        },
        file,
        json,
        |answer| {
            format!(
                "{what} uploaded and signed: {}, sha256 {}",
                u64_at(answer, "size").map_or_else(|| "-".to_owned(), bytes),
                str_at(answer, "sha256")
            )
        },
    )
}

/// Every upgrade package.
pub fn list(client: &Client, json: bool) -> Result<ExitCode, CliError> {
    let packages = client
        .get_json("/api/v1/upgrades")
        .about(|| "upgrades".to_owned())?;
    if json {
        output::json(&packages)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_unix_ms();
    let mut table = Table::new(&["COMPONENT", "VERSION", "SIZE", "UPLOADED", "SHA256"]);
    for p in packages.as_array().into_iter().flatten() {
        table.row(vec![
            cell(&p["component"]),
            cell(&p["version"]),
            u64_at(p, "size").map_or_else(|| "-".to_owned(), bytes),
            ago(u64_at(p, "uploaded_unix_ms"), now),
            cell(&p["sha256"]),
        ]);
    }
    table.print()?;
    Ok(ExitCode::SUCCESS)
}

/// A rollout's targets: agents by name, agents by tag, or relays by name (one kind given).
pub struct Targets<'a> {
    pub agents: &'a [String],
    pub tags: &'a [String],
    pub relays: &'a [String],
}

impl Targets<'_> {
    /// The kind of target: `agents` or `relays` (the answer's key and the list to poll).
    fn kind(&self) -> &'static str {
        if self.relays.is_empty() {
            "agents"
        } else {
            "relays"
        }
    }
}

/// The rollout's request body.
pub fn rollout_body(targets: &Targets<'_>) -> Value {
    if !targets.relays.is_empty() {
        json!({"targets": {"relays": targets.relays}})
    } else if targets.agents.is_empty() {
        json!({"targets": {"tags": targets.tags}})
    } else {
        json!({"targets": {"agents": targets.agents}})
    }
}

/// Rolls `version` out to the targets; with `wait`, until each is final. Exit code 1 if any
/// target rolled back or refused.
pub fn rollout(
    client: &Client,
    version: &str,
    targets: &Targets<'_>,
    wait: bool,
    json: bool,
) -> Result<ExitCode, CliError> {
    let kind = targets.kind();
    let header = if kind == "relays" { "RELAY" } else { "AGENT" };
    let path = format!("/api/v1/upgrades/{}/rollout", segment(version));
    let answer = client
        .post_json(&path, Some(&rollout_body(targets)))
        .about(|| format!("rollout of {version}"))?;
    let targets: Vec<String> = items(&answer, kind)
        .iter()
        .map(|a| str_at(a, "id").to_owned())
        .collect();
    if !wait {
        if json {
            output::json(&answer)?;
        } else {
            let mut table = Table::new(&[header, "QUEUED", "STATE"]);
            for a in items(&answer, kind) {
                table.row(vec![
                    cell(&a["name"]),
                    cell(&a["queued"]),
                    cell(&a["state"]),
                ]);
            }
            table.print()?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let started = Instant::now();
    let finals = loop {
        let list = client
            .get_json(&format!("/api/v1/{kind}"))
            .about(|| kind.to_owned())?;
        let mine: Vec<Value> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| targets.iter().any(|t| t == str_at(a, "id")))
            .cloned()
            .collect();
        let done = mine.iter().all(|a| {
            a["upgrade"]["version"] == version
                && matches!(
                    a["upgrade"]["state"].as_str(),
                    Some("done" | "rolled_back" | "refused")
                )
        });
        if done || started.elapsed() > WAIT_LIMIT {
            break mine;
        }
        std::thread::sleep(POLL);
    };
    let failed = finals
        .iter()
        .any(|a| a["upgrade"]["state"] != "done" || a["upgrade"]["version"] != version);
    if json {
        output::json(&Value::Array(finals))?;
    } else {
        let mut table = Table::new(&[header, "STATE", "VERSION", "REASON"]);
        for a in &finals {
            table.row(vec![
                cell(&a["name"]),
                cell(&a["upgrade"]["state"]),
                cell(&a["version"]),
                cell(&a["upgrade"]["reason"]),
            ]);
        }
        table.print()?;
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_agents_tags_or_relays() {
        let t = |agents: &[&str], tags: &[&str], relays: &[&str]| {
            let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            let (agents, tags, relays) = (own(agents), own(tags), own(relays));
            rollout_body(&Targets {
                agents: &agents,
                tags: &tags,
                relays: &relays,
            })
        };
        assert_eq!(
            t(&["web-1"], &[], &[]),
            json!({"targets": {"agents": ["web-1"]}})
        );
        assert_eq!(t(&[], &["web"], &[]), json!({"targets": {"tags": ["web"]}}));
        assert_eq!(
            t(&[], &[], &["edge"]),
            json!({"targets": {"relays": ["edge"]}})
        );
    }
}
