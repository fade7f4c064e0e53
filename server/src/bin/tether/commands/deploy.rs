//! `tether deploy` (`POST /api/v1/deployments`, then by default waiting while streaming the
//! logs), `tether deployments retry ID` and `tether deployments wait ID`. Exit codes: 0 succeeded, 1 failed, 3 cancelled.

use std::collections::BTreeMap;
use std::io;
use std::process::ExitCode;

use serde_json::{json, Value};

use super::{str_at, u64_at};
use crate::client::{segment, Client};
use crate::error::{About, CliError};
use crate::follow::follow;
use crate::output;

/// What to deploy where.
#[derive(Debug)]
pub struct Request {
    pub process: String,
    /// Agent names or ids; used when not empty.
    pub agents: Vec<String>,
    /// Every agent with all of these tags, when `agents` is empty.
    pub tags: Vec<String>,
    pub properties: BTreeMap<String, String>,
    /// Skip agents in maintenance instead of waiting for them.
    pub skip_maintenance: bool,
    /// With `tags`: any this many of those agents.
    pub count: Option<u32>,
    /// Rolling: agents at a time, or their share (percent).
    pub batch_size: Option<u32>,
    pub batch_percent: Option<u32>,
    /// Rolling: later batches go on after a failed job.
    pub keep_going: bool,
    /// Seconds by which each job must have started.
    pub deadline_s: Option<u64>,
}

impl Request {
    /// The `POST /api/v1/deployments` body.
    fn body(&self) -> Value {
        let mut targets = if self.agents.is_empty() {
            json!({"tags": self.tags})
        } else {
            json!({"agents": self.agents})
        };
        if let Some(n) = self.count {
            targets["count"] = n.into();
        }
        let mut body =
            json!({"process": self.process, "targets": targets, "properties": self.properties});
        if self.skip_maintenance {
            body["skip_maintenance"] = true.into();
        }
        if let Some(n) = self.batch_size {
            body["batch_size"] = n.into();
        }
        if let Some(p) = self.batch_percent {
            body["batch_percent"] = p.into();
        }
        if self.keep_going {
            body["stop_on_failure"] = false.into();
        }
        if let Some(s) = self.deadline_s {
            body["deadline_s"] = s.into();
        }
        body
    }
}

/// Creates the deployment; with `wait`, follows it to its end.
pub fn deploy(
    client: &Client,
    request: &Request,
    wait: bool,
    json: bool,
) -> Result<ExitCode, CliError> {
    let answer = client
        .post_json("/api/v1/deployments", Some(&request.body()))
        .about(|| format!("deploying {}", request.process))?;
    started(client, &answer, wait, json)
}

/// Runs deployment `id` again for the agents whose jobs did not succeed (a new deployment);
/// with `wait`, follows the new one to its end.
pub fn retry(client: &Client, id: &str, wait: bool, json: bool) -> Result<ExitCode, CliError> {
    let answer = client
        .post_json(&format!("/api/v1/deployments/{}/retry", segment(id)), None)
        .about(|| format!("retrying deployment {id}"))?;
    started(client, &answer, wait, json)
}

/// A deployment the server just started (its answer): prints its id (or, with `json`, the
/// answer); with `wait`, follows it to its end.
fn started(client: &Client, answer: &Value, wait: bool, json: bool) -> Result<ExitCode, CliError> {
    let id = str_at(answer, "id").to_owned();
    if id.is_empty() {
        return Err(CliError::Failed(format!(
            "the server's answer holds no deployment id: {answer}"
        )));
    }
    if !wait {
        if json {
            output::json(answer)?;
        } else {
            output::line(&id)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !json {
        let jobs = u64_at(answer, "jobs").unwrap_or(0);
        output::line(&format!("deployment {id}: {jobs} job(s)"))?;
    }
    follow_to_end(client, &id, json)
}

/// Follows deployment `id` to its end.
pub fn wait(client: &Client, id: &str, json: bool) -> Result<ExitCode, CliError> {
    follow_to_end(client, id, json)
}

/// Streams the logs (to stdout, or stderr with `--json`), then prints the final status (or
/// the final deployment as JSON) and returns the outcome's exit code.
fn follow_to_end(client: &Client, id: &str, json: bool) -> Result<ExitCode, CliError> {
    eprintln!("tether: waiting for deployment {id}; Ctrl-C stops waiting, not the deployment");
    let (deployment, outcome) = if json {
        follow(client, id, &mut io::stderr())?
    } else {
        follow(client, id, &mut io::stdout())?
    };
    if json {
        output::json(&deployment)?;
    } else {
        output::line(&format!(
            "deployment {id} {}",
            str_at(&deployment, "status")
        ))?;
    }
    Ok(ExitCode::from(outcome.exit_code()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn targets_are_agents_or_tags() {
        let mut request = Request {
            process: "site".into(),
            agents: vec!["web-1".into()],
            tags: vec![],
            properties: [("who".to_owned(), "me".to_owned())].into(),
            skip_maintenance: false,
            count: None,
            batch_size: None,
            batch_percent: None,
            keep_going: false,
            deadline_s: None,
        };
        assert_eq!(
            request.body(),
            json!({"process": "site", "targets": {"agents": ["web-1"]}, "properties": {"who": "me"}})
        );
        request.agents.clear();
        request.tags = vec!["web".into(), "eu".into()];
        assert_eq!(request.body()["targets"], json!({"tags": ["web", "eu"]}));
        request.skip_maintenance = true;
        assert_eq!(request.body()["skip_maintenance"], true);
        request.count = Some(2);
        request.batch_percent = Some(10);
        request.keep_going = true;
        let body = request.body();
        assert_eq!(body["targets"]["count"], 2);
        assert_eq!(body["batch_percent"], 10);
        assert_eq!(body["stop_on_failure"], false);
    }
}
