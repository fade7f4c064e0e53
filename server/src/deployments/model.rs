//! The stored shapes of processes, deployments and jobs (journal meta values, JSON), their
//! status enums, and the rule that derives a deployment's status from its jobs.

use std::collections::BTreeMap;
use tether_shared::ids::{AgentId, DeploymentId, JobId};

use serde::{Deserialize, Serialize};

use crate::secrets::SecretsError;
use tether_shared::protocol::{JobStatus, OnInterrupt, StepSpec, StepStatus};

/// Meta key prefixes.
pub const PROCESS_PREFIX: &str = "process/";
pub const DEPLOYMENT_PREFIX: &str = "deployment/";
pub const JOB_PREFIX: &str = "job/";

pub use tether_shared::mask::{mask, MASK};

/// One step of a stored process, as the operator wrote it (before substitution).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessStep {
    pub name: String,
    pub plugin: String,
    pub step: String,
    pub properties: BTreeMap<String, String>,
    /// Properties whose values are secret.
    pub secrets: Vec<String>,
    pub on_interrupt: OnInterrupt,
    pub timeout_s: u64,
}

/// A stored process: an ordered list of steps, replaced as a whole by a re-post.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    pub name: String,
    /// 1 at first creation, +1 at every replacement.
    pub version: u64,
    pub steps: Vec<ProcessStep>,
    pub updated_unix_ms: u64,
}

/// A stored deployment: a process resolved with properties, for a set of agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    pub id: DeploymentId,
    pub process: String,
    pub process_version: u64,
    /// As given (secret ones are masked in answers).
    pub properties: BTreeMap<String, String>,
    /// The steps every job runs, properties substituted (secret values included: the agent
    /// needs them; never answered).
    pub steps: Vec<StepSpec>,
    /// Target agent ids, in job order.
    pub agents: Vec<AgentId>,
    pub created_unix_ms: u64,
    /// Jobs for an agent in maintenance are skipped (cancelled, saying so) rather than left
    /// waiting for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_maintenance: bool,
    /// A rolling deployment: jobs run this many agents at a time, a batch starting once every
    /// job of the batch before it ended (`None`: every job at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// Of a rolling deployment: a failed (or expired) job cancels the jobs of later batches.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stop_on_failure: bool,
    /// A job not started by then (Unix ms) expires: on the server if still queued there, on
    /// the agent if its RunJob arrives later. `None`: 24 h after it is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_unix_ms: Option<u64>,
    /// The deployment this one runs again for the agents whose jobs did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<DeploymentId>,
    /// An operator cancelled it: no job of it is sent from then on (one whose sending was
    /// refused meanwhile, and is queued again, ends cancelled instead).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancelled: bool,
}

impl Deployment {
    /// The batch (0-based) the job of the `index`-th target belongs to.
    pub fn batch_of(&self, index: usize) -> u32 {
        match self.batch_size {
            Some(size) if size > 0 => u32::try_from(index / size as usize).unwrap_or(u32::MAX),
            _ => 0,
        }
    }
}

impl Deployment {
    /// Secret values to mask wherever text reaches an answer: `*_secret` deployment properties
    /// and every step property declared secret.
    pub fn secret_values(&self) -> Vec<String> {
        let values: Vec<String> = self
            .properties
            .iter()
            .filter(|(k, _)| is_secret_property(k))
            .map(|(_, v)| v.clone())
            .chain(self.steps.iter().flat_map(|s| {
                s.secrets
                    .iter()
                    .filter_map(|name| s.properties.get(name).cloned())
            }))
            .collect();
        tether_shared::mask::ordered(&values)
    }
}

/// What a stored secret value (in a process or a deployment) is bound to, and how it is kept:
/// sealing every secret of a record with `f(context, value)`, or opening them.
fn map_step_secrets<'a>(
    prefix: &str,
    steps: impl Iterator<Item = (&'a [String], &'a mut BTreeMap<String, String>)>,
    f: &mut impl FnMut(&str, &str) -> Result<String, SecretsError>,
) -> Result<(), SecretsError> {
    for (i, (secrets, properties)) in steps.enumerate() {
        for name in secrets {
            if let Some(v) = properties.get_mut(name) {
                *v = f(&format!("{prefix}/steps/{i}/{name}"), v)?;
            }
        }
    }
    Ok(())
}

impl Deployment {
    /// Applies `f(context, value)` to every secret value (see [`crate::secrets`]).
    pub fn map_secrets(
        &mut self,
        mut f: impl FnMut(&str, &str) -> Result<String, SecretsError>,
    ) -> Result<(), SecretsError> {
        let prefix = format!("{DEPLOYMENT_PREFIX}{}", self.id);
        for (k, v) in self.properties.iter_mut() {
            if is_secret_property(k) {
                *v = f(&format!("{prefix}/properties/{k}"), v)?;
            }
        }
        let steps = self
            .steps
            .iter_mut()
            .map(|s| (s.secrets.as_slice(), &mut s.properties));
        map_step_secrets(&prefix, steps, &mut f)
    }
}

impl Process {
    /// Applies `f(context, value)` to every secret value (see [`crate::secrets`]).
    pub fn map_secrets(
        &mut self,
        mut f: impl FnMut(&str, &str) -> Result<String, SecretsError>,
    ) -> Result<(), SecretsError> {
        let prefix = format!("{PROCESS_PREFIX}{}", self.name);
        let steps = self
            .steps
            .iter_mut()
            .map(|s| (s.secrets.as_slice(), &mut s.properties));
        map_step_secrets(&prefix, steps, &mut f)
    }
}

/// A deployment property whose name ends with `_secret` is secret.
pub fn is_secret_property(name: &str) -> bool {
    name.ends_with("_secret")
}

/// Where a job is, on the server's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Expired,
}

impl JobState {
    /// As it is written in answers (snake case).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Expired => "expired",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

impl From<JobStatus> for JobState {
    fn from(s: JobStatus) -> Self {
        match s {
            JobStatus::Succeeded => JobState::Succeeded,
            JobStatus::Failed => JobState::Failed,
            JobStatus::Cancelled => JobState::Cancelled,
            JobStatus::Expired => JobState::Expired,
        }
    }
}

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Interrupted,
    Skipped,
}

impl StepState {
    /// As it is written in answers (snake case).
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::TimedOut => "timed_out",
            StepState::Cancelled => "cancelled",
            StepState::Interrupted => "interrupted",
            StepState::Skipped => "skipped",
        }
    }
}

impl From<StepStatus> for StepState {
    fn from(s: StepStatus) -> Self {
        match s {
            StepStatus::Succeeded => StepState::Succeeded,
            StepStatus::Failed => StepState::Failed,
            StepStatus::TimedOut => StepState::TimedOut,
            StepStatus::Cancelled => StepState::Cancelled,
            StepStatus::Interrupted => StepState::Interrupted,
            StepStatus::Skipped => StepState::Skipped,
        }
    }
}

/// One step of one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobStep {
    pub name: String,
    pub status: StepState,
    pub exit_code: Option<i32>,
    pub outputs: BTreeMap<String, String>,
    pub message: String,
    /// Times it started (a rerun after an interruption counts again).
    pub attempt: u32,
    /// When the server heard it start (its last attempt) and end, Unix ms: the deployment
    /// timeline. Absent for steps recorded before they were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_unix_ms: Option<u64>,
}

/// One agent's run of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// `<deployment id>-<agent id>`.
    pub job_id: JobId,
    pub deployment_id: DeploymentId,
    pub agent_id: AgentId,
    pub status: JobState,
    /// Its RunJob was queued to the agent (journaled with the command); a queued job that is
    /// not dispatched waits for a free slot of its agent.
    pub dispatched: bool,
    pub message: String,
    pub steps: Vec<JobStep>,
    /// When the server recorded its final state (Unix ms); `None` while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_unix_ms: Option<u64>,
    /// Its batch in a rolling deployment (0 for the first, and for every job of others).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub batch: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Job {
    /// The job of `agent_id`, the `index`-th target of `deployment`.
    pub fn new(deployment: &Deployment, agent_id: &AgentId, index: usize) -> Job {
        Job {
            batch: deployment.batch_of(index),
            job_id: JobId::new(format!("{}-{agent_id}", deployment.id)),
            deployment_id: deployment.id.clone(),
            agent_id: agent_id.clone(),
            status: JobState::Queued,
            dispatched: false,
            finished_unix_ms: None,
            message: String::new(),
            steps: deployment
                .steps
                .iter()
                .map(|s| JobStep {
                    name: s.name.clone(),
                    status: StepState::Pending,
                    exit_code: None,
                    outputs: BTreeMap::new(),
                    message: String::new(),
                    attempt: 0,
                    started_unix_ms: None,
                    finished_unix_ms: None,
                })
                .collect(),
        }
    }

    /// Ends the job with `status`; unfinished steps become `running_to` (if they ran) or skipped.
    pub fn finish(&mut self, status: JobState, running_to: StepState, message: &str) {
        self.status = status;
        self.finished_unix_ms = Some(crate::registry::now_unix_ms());
        if !message.is_empty() {
            self.message = message.to_owned();
        }
        let now = self.finished_unix_ms;
        for s in &mut self.steps {
            match s.status {
                StepState::Running => {
                    s.status = running_to;
                    s.finished_unix_ms = now;
                }
                StepState::Pending => s.status = StepState::Skipped,
                _ => {}
            }
        }
    }
}

/// A deployment's status, derived from its jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// Queued until a job runs; running until every job is final; then failed if any failed or
/// expired, else cancelled if any was cancelled, else succeeded.
pub fn deployment_status<'a>(jobs: impl IntoIterator<Item = &'a Job>) -> DeploymentStatus {
    let (mut any_started, mut all_final, mut failed, mut cancelled) = (false, true, false, false);
    for j in jobs {
        any_started |= j.status != JobState::Queued;
        all_final &= j.status.is_final();
        failed |= matches!(j.status, JobState::Failed | JobState::Expired);
        cancelled |= j.status == JobState::Cancelled;
    }
    if !all_final {
        return if any_started {
            DeploymentStatus::Running
        } else {
            DeploymentStatus::Queued
        };
    }
    if failed {
        DeploymentStatus::Failed
    } else if cancelled {
        DeploymentStatus::Cancelled
    } else {
        DeploymentStatus::Succeeded
    }
}
