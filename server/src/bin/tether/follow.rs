//! Waiting for a deployment to end while streaming its logs: polls
//! `GET /api/v1/deployments/{id}` and, for each step that has started and not yet been
//! printed to its end, `GET .../jobs/{agent}/steps/{step}/log?offset=N`, printing what is new,
//! line by line, each line prefixed `[agent/step]`; then a line per finished step and job.
//! A server that cannot be reached for a while (a restart) is waited for, up to
//! [`UNREACHABLE_GRACE`].

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::{segment, Client, ClientError};
use crate::commands::str_at;
use crate::error::{About, CliError};

/// Between two looks at the deployment.
const POLL_INTERVAL: Duration = Duration::from_millis(300);
/// How long the server may stay unreachable before waiting is given up.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(60);
/// A line longer than this is printed before its end arrives.
const MAX_PENDING_LINE: usize = 64 * 1024;

/// How a deployment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
}

impl Outcome {
    /// The outcome of a final deployment status; `None` while it runs.
    pub fn of(status: &str) -> Option<Outcome> {
        match status {
            "succeeded" => Some(Outcome::Succeeded),
            "failed" => Some(Outcome::Failed),
            "cancelled" => Some(Outcome::Cancelled),
            _ => None,
        }
    }

    /// 0 succeeded, 1 failed, 3 cancelled.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Succeeded => 0,
            Outcome::Failed => 1,
            Outcome::Cancelled => 3,
        }
    }
}

/// What has been printed of one step's log.
#[derive(Debug, Default)]
struct StepLog {
    /// Bytes of the log seen so far.
    seen: usize,
    /// The seen part of the current line, not printed yet.
    pending: String,
    /// Printed to its end, with its status line.
    done: bool,
}

impl StepLog {
    /// Takes the log's `new` text (from byte `seen` on); returns what to print: the new
    /// complete lines, or everything left when `finished`.
    fn advance(&mut self, new: &str, finished: bool) -> String {
        self.pending.push_str(new);
        self.seen += new.len();
        let cut = if finished || self.pending.len() > MAX_PENDING_LINE {
            self.pending.len()
        } else {
            self.pending.rfind('\n').map_or(0, |i| i + 1)
        };
        let rest = self.pending.split_off(cut);
        let mut out = std::mem::replace(&mut self.pending, rest);
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out
    }
}

/// `text`'s lines, each prefixed with `prefix`.
fn prefixed(prefix: &str, text: &str) -> String {
    text.lines().map(|l| format!("{prefix} {l}\n")).collect()
}

/// A step or job status with its exit code and message, when they say more.
fn describe(status: &str, item: &Value) -> String {
    let name = status.replace('_', " ");
    let mut text = name.clone();
    if let Some(code) = item.get("exit_code").and_then(Value::as_i64) {
        if status != "succeeded" {
            text.push_str(&format!(" (exit {code})"));
        }
    }
    if let Some(message) = item.get("message").and_then(Value::as_str) {
        if !message.is_empty() && message != name && message != status {
            text.push_str(": ");
            text.push_str(message);
        }
    }
    text
}

/// Follows deployment `id` until it is final, printing logs and step ends to `out`; the
/// final `GET /api/v1/deployments/{id}` answer and its outcome.
pub fn follow(
    client: &Client,
    id: &str,
    out: &mut dyn Write,
) -> Result<(Value, Outcome), CliError> {
    let path = format!("/api/v1/deployments/{}", segment(id));
    let mut logs: HashMap<(String, String), StepLog> = HashMap::new();
    let mut jobs_done: HashSet<String> = HashSet::new();
    loop {
        // Read before the logs: a deployment seen final has its logs complete.
        let deployment =
            patiently(|| client.get_json(&path)).about(|| format!("deployment {id}"))?;
        let outcome = Outcome::of(str_at(&deployment, "status"));
        let jobs = deployment.get("jobs").and_then(Value::as_array);
        for job in jobs.into_iter().flatten() {
            let agent = str_at(job, "agent");
            let steps = job.get("steps").and_then(Value::as_array);
            for step in steps.into_iter().flatten() {
                let (name, status) = (str_at(step, "name"), str_at(step, "status"));
                if status == "pending" || status.is_empty() {
                    continue;
                }
                let log = logs.entry((agent.to_owned(), name.to_owned())).or_default();
                if log.done {
                    continue;
                }
                // A final deployment's logs are complete, whatever a step still says.
                let finished = status != "running" || outcome.is_some();
                // Only what is new: the server streams the log from `offset` on.
                let log_path = format!(
                    "{path}/jobs/{}/steps/{}/log?offset={}",
                    segment(agent),
                    segment(name),
                    log.seen
                );
                let text = patiently(|| client.get_text(&log_path))
                    .about(|| format!("log of {agent}/{name}"))?;
                let prefix = format!("[{agent}/{name}]");
                let mut printed = prefixed(&prefix, &log.advance(&text, finished));
                if finished {
                    log.done = true;
                    printed.push_str(&format!("{prefix} {}\n", describe(status, step)));
                }
                out.write_all(printed.as_bytes())?;
            }
            let job_status = str_at(job, "status");
            if !matches!(job_status, "queued" | "running" | "")
                && jobs_done.insert(agent.to_owned())
            {
                writeln!(out, "[{agent}] job {}", describe(job_status, job))?;
            }
        }
        out.flush()?;
        if let Some(outcome) = outcome {
            return Ok((deployment, outcome));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Runs `call`, retrying while the server is unreachable, for at most [`UNREACHABLE_GRACE`].
fn patiently<T>(mut call: impl FnMut() -> Result<T, ClientError>) -> Result<T, ClientError> {
    let mut since: Option<Instant> = None;
    loop {
        match call() {
            Err(e) if e.is_unreachable() => {
                let first = match since {
                    Some(first) => first,
                    None => {
                        eprintln!("tether: {e}; still waiting (up to {UNREACHABLE_GRACE:?})");
                        *since.insert(Instant::now())
                    }
                };
                if first.elapsed() >= UNREACHABLE_GRACE {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn prints_complete_lines_once_and_the_rest_at_the_end() {
        let mut log = StepLog::default();
        assert_eq!(log.advance("", false), "");
        assert_eq!(log.advance("one\ntw", false), "one\n");
        assert_eq!(log.advance("o\nthr", false), "two\n");
        assert_eq!(log.advance("", false), "");
        assert_eq!(log.advance("ee", true), "three\n");
        assert_eq!(log.advance("", true), "");
        assert_eq!(
            log.seen,
            "one\ntwo\nthree".len(),
            "the next offset asked for"
        );
    }

    #[test]
    fn a_very_long_line_is_printed_before_its_end() {
        let mut log = StepLog::default();
        let long = "x".repeat(MAX_PENDING_LINE + 1);
        assert_eq!(log.advance(&long, false).len(), long.len() + 1);
    }

    #[test]
    fn outcomes_and_descriptions() {
        assert_eq!(Outcome::of("succeeded").map(Outcome::exit_code), Some(0));
        assert_eq!(Outcome::of("failed").map(Outcome::exit_code), Some(1));
        assert_eq!(Outcome::of("cancelled").map(Outcome::exit_code), Some(3));
        assert_eq!(Outcome::of("running"), None);
        assert_eq!(
            describe("failed", &json!({"exit_code": 3, "message": "boom"})),
            "failed (exit 3): boom"
        );
        assert_eq!(
            describe("succeeded", &json!({"exit_code": 0, "message": ""})),
            "succeeded"
        );
        assert_eq!(describe("timed_out", &json!({})), "timed out");
        assert_eq!(
            describe("cancelled", &json!({"message": "cancelled"})),
            "cancelled"
        );
        assert_eq!(prefixed("[a/b]", "x\ny\n"), "[a/b] x\n[a/b] y\n");
    }
}
