//! The job state machine (sans-IO): [`State`] holds processes, deployments and jobs in memory
//! and turns agent events, agent resets, dispatches and cancels into state changes plus the
//! journal ops that make them durable (which the caller commits in the batch of the cause).

use crate::secrets::KeyRing;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tether_shared::ids::{AgentId, DeploymentId, JobId};

use tether_shared::journal::{LogName, Op};
use tether_shared::protocol::{
    CommandBody, EventBody, JobReport, Seq, StepSpec, MAX_STEP_OUTPUT, OUTPUT_TRUNCATED,
};

use super::model::{
    deployment_status, Deployment, Job, JobState, Process, StepState, DEPLOYMENT_PREFIX,
    JOB_PREFIX, PROCESS_PREFIX,
};
use super::progress::{Ended, ProgressBook, WorkMetrics};

/// The message of jobs skipped because their agent was in maintenance.
pub const MAINTENANCE_MESSAGE: &str = "skipped: the agent is in maintenance";
/// The message of jobs failed because their agent came back without its journal.
pub const RESET_MESSAGE: &str = "agent lost its state (new incarnation)";

/// Meta key prefix of the output bytes stored so far for a running step
/// (`outlen/<job_id>/<step>`, u64 big-endian), removed when the step ends.
pub const OUTPUT_LEN_PREFIX: &str = "outlen/";

/// Output kept per step on the server: the agent's cap and its marker. Past it, the server
/// keeps one marker of its own and drops the rest, whatever the agent sends.
const MAX_KEPT_OUTPUT: u64 = (MAX_STEP_OUTPUT + OUTPUT_TRUNCATED.len()) as u64;

/// A deployment and its jobs as they were at one instant (see [`State::snapshot`]).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub deployment: Deployment,
    pub jobs: Vec<Job>,
}

/// Everything, in memory.
#[derive(Debug, Default)]
pub struct State {
    pub processes: BTreeMap<String, Process>,
    pub deployments: BTreeMap<DeploymentId, Deployment>,
    pub jobs: BTreeMap<JobId, Job>,
    /// Output bytes stored so far, by the meta key of running steps (see
    /// [`OUTPUT_LEN_PREFIX`]).
    pub output_bytes: HashMap<String, u64>,
    /// Each agent's jobs that are not final (queued or running), so that dispatching to one
    /// agent looks at its own few jobs, never at every job ever created. Jobs that became
    /// final leave it lazily (see [`State::active_jobs`]).
    active: BTreeMap<AgentId, BTreeSet<JobId>>,
    /// Each deployment's unfinished jobs, by batch.
    progress: ProgressBook,
    /// The deployments whose steps fetch each blob (an artifact's or a plugin bundle's
    /// sha256): an agent's download is checked against these alone, whatever the history.
    blobs: HashMap<String, BTreeSet<DeploymentId>>,
    /// Counters and latencies of the work, for `/metrics`.
    pub metrics: std::sync::Arc<WorkMetrics>,
}

/// The blobs (sha256) deployment `d`'s steps fetch: artifacts (`artifact/fetch`) and uploaded
/// plugins' bundles.
fn blobs_of(d: &Deployment) -> BTreeSet<String> {
    d.steps
        .iter()
        .flat_map(|s| {
            let artifact = (s.plugin == "artifact" && s.step == "fetch")
                .then(|| s.properties.get("sha256").cloned())
                .flatten();
            s.bundle
                .as_ref()
                .map(|b| b.sha256.clone())
                .into_iter()
                .chain(artifact)
        })
        .collect()
}

/// Where a rolling deployment stands (see `State::gate`).
struct Gate {
    open: u32,
    failed: Option<u32>,
}

/// What becomes of a queued job of a rolling deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchTurn {
    /// Its batch is open: it may start.
    Goes,
    /// An earlier batch has not ended.
    Waits,
    /// An earlier batch failed and the deployment stops on failure: it is cancelled.
    Stopped,
}

/// Longest wait past a deployment's deadline before a job sent but never accepted expires.
const DEADLINE_GRACE_MS: u64 = 60_000;

/// Why a job of a rolling deployment ends cancelled without running.
pub const STOPPED_MESSAGE: &str = "not run: a job of an earlier batch failed (stop_on_failure)";

/// What an event changed.
#[derive(Debug, Default)]
pub struct Effect {
    /// Ops to commit with the event.
    pub ops: Vec<Op>,
    /// A job of the agent became final: a slot may be free for a queued one.
    pub job_finished: bool,
    /// Output was refused: its step was not running (or is unknown).
    pub output_refused: bool,
    /// Output went over the step's cap and was cut.
    pub output_truncated: bool,
    /// A rolling deployment's gate moved (a batch ended, or failed): its queued jobs may
    /// start, or stop (see `State::batch_wakeups`).
    pub batch_moved: bool,
}

/// How long finished deployments are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Deployments that ended longer ago than this are pruned (`None`: kept whatever their age).
    pub max_age_ms: Option<u64>,
    /// At most this many finished deployments are kept; the oldest go first.
    pub keep_deployments: usize,
}

impl Retention {
    /// The policy of the `[retention]` config section.
    pub fn from_config(c: &tether_shared::config::Retention) -> Self {
        Retention {
            max_age_ms: (c.keep_days > 0).then(|| c.keep_days.saturating_mul(86_400_000)),
            keep_deployments: usize::try_from(c.keep_deployments).unwrap_or(usize::MAX),
        }
    }
}

/// The meta key counting the output of step `step` of `job_id`.
pub fn output_len_key(job_id: &str, step: u32) -> String {
    format!("{OUTPUT_LEN_PREFIX}{job_id}/{step}")
}

/// The log holding step `step` of `job_id`'s output chunks.
pub fn step_log(job_id: &str, step: u32) -> Option<LogName> {
    LogName::new(format!("joblog/{job_id}/{step}")).ok()
}

pub fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers: serializing cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

pub fn job_op(job: &Job) -> Op {
    Op::PutMeta {
        key: format!("{JOB_PREFIX}{}", job.job_id),
        value: json(job),
    }
}

/// A deployment as stored: its secret values sealed with `keys`.
pub fn deployment_op(d: &Deployment, keys: &KeyRing) -> Op {
    let mut stored = d.clone();
    let _ = stored.map_secrets(|context, v| Ok(keys.seal(context, v)));
    Op::PutMeta {
        key: format!("{DEPLOYMENT_PREFIX}{}", d.id),
        value: json(&stored),
    }
}

/// A process as stored: its secret values sealed with `keys`.
pub fn process_op(p: &Process, keys: &KeyRing) -> Op {
    let mut stored = p.clone();
    let _ = stored.map_secrets(|context, v| Ok(keys.seal(context, v)));
    Op::PutMeta {
        key: format!("{PROCESS_PREFIX}{}", p.name),
        value: json(&stored),
    }
}

/// Why a job with secrets fails on an agent whose release sends no sealing key.
pub const NO_SEALING_KEY: &str =
    "the agent's release cannot receive secrets sealed for it: upgrade the agent, then deploy again";

/// The target agent's values for `${agent.NAME}` (its name, id and facts), asked for only
/// when a step holds such a placeholder.
pub type AgentValues<'a> = &'a dyn Fn() -> BTreeMap<String, String>;

/// Why a job whose steps name a user (`run_as`) fails on an agent that does not honour it.
pub const RUNS_AS_MESSAGE: &str = "the agent's release cannot run steps as another user (run_as); upgrade the agent, or deploy to another";

/// What dispatch to one agent may do now, as its link knows it.
#[derive(Clone, Copy)]
pub struct AgentTerms<'a> {
    pub sealing: Sealing<'a>,
    /// Its values for `${agent.NAME}` placeholders.
    pub agent: AgentValues<'a>,
    /// Its release honours `run_as` (it said so in its `Hello`).
    pub runs_as: bool,
    /// In maintenance: nothing starts (see `State::skip_for_maintenance`).
    pub maintenance: bool,
    /// Its own limit of jobs at once (`None`: the server's).
    pub max_running: Option<usize>,
}

/// What a link knows of its agent's sealing key.
#[derive(Debug, Clone, Copy)]
pub enum Sealing<'a> {
    /// The agent has not attached since this server started: jobs with secrets wait for it.
    Unknown,
    /// Secrets cannot be sealed for it (why): jobs with secrets fail.
    Unable(&'a str),
    /// Job secrets are sealed with this agent's sealer.
    For(&'a tether_shared::sealing::Sealer),
}

/// `steps` as job `job_id` sends them to an agent: its `${agent.NAME}` placeholders filled in
/// and secrets sealed (see [`Sealing`]); `Ok(None)`: not yet.
fn steps_for_agent(
    steps: &[StepSpec],
    sealing: Sealing<'_>,
    agent: AgentValues<'_>,
    runs_as: bool,
    job_id: &str,
) -> Result<Option<Vec<StepSpec>>, String> {
    if !runs_as && super::validate::names_a_user(steps) {
        return Err(RUNS_AS_MESSAGE.to_owned());
    }
    let mut sealed = steps.to_vec();
    fill_agent_values(&mut sealed, agent)?;
    for (i, step) in sealed.iter_mut().enumerate() {
        if !step.secrets.iter().any(|n| step.properties.contains_key(n)) {
            continue;
        }
        let sealer = match sealing {
            Sealing::Unknown => return Ok(None),
            Sealing::Unable(why) => return Err(why.to_owned()),
            Sealing::For(sealer) => sealer,
        };
        tether_shared::sealing::seal_step(step, sealer, job_id, i)
            .map_err(|e| format!("the job's secrets could not be sealed for the agent: {e}"))?;
    }
    Ok(Some(sealed))
}

/// Replaces the `${agent.NAME}` placeholders of `steps` with the agent's values; `Err` names
/// one it does not have, or says the steps grew past what a job may carry.
fn fill_agent_values(steps: &mut [StepSpec], agent: AgentValues<'_>) -> Result<(), String> {
    let marker = format!("${{{}", super::validate::AGENT_PLACEHOLDER);
    let mut values = None;
    for step in steps.iter_mut() {
        for (k, v) in step.properties.iter_mut() {
            if !v.contains(&marker) {
                continue;
            }
            let values = values.get_or_insert_with(agent);
            *v = super::validate::substitute_agent(v, values)
                .map_err(|e| format!("step {:?} property {k:?}: {e}", step.name))?;
        }
    }
    if values.is_some() {
        let size = serde_json::to_vec(&steps).map_or(usize::MAX, |v| v.len());
        if size > super::validate::MAX_STEPS_BYTES {
            return Err(format!(
                "with the agent's values filled in, the steps take {size} bytes, more than the {} one job may carry",
                super::validate::MAX_STEPS_BYTES
            ));
        }
    }
    Ok(())
}

impl State {
    /// Applies an event `agent_id` sent. Events of unknown jobs, of another agent's jobs, or
    /// that repeat what is known change nothing (a repeated output chunk rewrites the same key).
    pub fn apply_event(&mut self, agent_id: &AgentId, body: &EventBody) -> Effect {
        self.apply(agent_id, body, true)
    }

    /// [`State::apply_event`]; `live`: the event happens now (not rebuilt from a report), so
    /// its timing is observed.
    fn apply(&mut self, agent_id: &AgentId, body: &EventBody, live: bool) -> Effect {
        let job_id = match body {
            EventBody::JobAccepted { job_id }
            | EventBody::StepStarted { job_id, .. }
            | EventBody::StepOutput { job_id, .. }
            | EventBody::StepFinished { job_id, .. }
            | EventBody::JobFinished { job_id, .. } => job_id,
            _ => return Effect::default(),
        };
        let Some(job) = self.jobs.get_mut(job_id.as_str()) else {
            tracing::warn!(agent_id = %agent_id, job_id = %job_id, "event-for-unknown-job");
            return Effect::default();
        };
        if job.agent_id != *agent_id {
            tracing::warn!(agent_id = %agent_id, job_id = %job_id, owner = %job.agent_id, "event-for-another-agents-job");
            return Effect::default();
        }
        let mut effect = Effect::default();
        let step_ok = |job: &Job, step: u32| (step as usize) < job.steps.len();
        let was_queued = job.status == JobState::Queued;
        let changed = match body {
            EventBody::JobAccepted { .. } => {
                let start = job.status == JobState::Queued;
                if start {
                    job.status = JobState::Running;
                }
                start
            }
            EventBody::StepStarted { step, attempt, .. } => {
                if job.status.is_final() || !step_ok(job, *step) {
                    false
                } else {
                    job.status = JobState::Running;
                    let s = &mut job.steps[*step as usize];
                    let newer = *attempt > s.attempt
                        || (*attempt == s.attempt && s.status == StepState::Pending);
                    if newer {
                        s.status = StepState::Running;
                        s.attempt = *attempt;
                        s.exit_code = None;
                        s.message.clear();
                        s.started_unix_ms = Some(crate::registry::now_unix_ms());
                        s.finished_unix_ms = None;
                    }
                    newer
                }
            }
            EventBody::StepOutput { step, data, .. } => {
                let running = !job.status.is_final()
                    && job
                        .steps
                        .get(*step as usize)
                        .is_some_and(|s| s.status == StepState::Running);
                match step_log(job_id, *step) {
                    Some(log) if running => {
                        let key = output_len_key(job_id, *step);
                        let stored = self.output_bytes.get(&key).copied().unwrap_or(0);
                        let payload = if stored + data.len() as u64 <= MAX_KEPT_OUTPUT {
                            Some(data.as_bytes().to_vec())
                        } else if stored < MAX_KEPT_OUTPUT {
                            effect.output_truncated = true;
                            tracing::warn!(agent_id = %agent_id, job_id = %job_id, step, "step-output-truncated");
                            Some(OUTPUT_TRUNCATED.as_bytes().to_vec())
                        } else {
                            None
                        };
                        // Once cut, the count stays past the cap: the rest is dropped.
                        let now = match &payload {
                            Some(p) if p.len() == data.len() => stored + p.len() as u64,
                            Some(_) => MAX_KEPT_OUTPUT + 1,
                            None => stored,
                        };
                        if let Some(payload) = payload {
                            effect.ops.push(Op::AppendBlob {
                                name: log,
                                bytes: payload,
                            });
                            effect.ops.push(Op::PutMeta {
                                key: key.clone(),
                                value: now.to_be_bytes().to_vec(),
                            });
                            self.output_bytes.insert(key, now);
                        }
                    }
                    _ => {
                        effect.output_refused = true;
                        tracing::warn!(agent_id = %agent_id, job_id = %job_id, step, "step-output-refused-step-not-running");
                    }
                }
                false
            }
            EventBody::StepFinished {
                step,
                status,
                exit_code,
                outputs,
                message,
                ..
            } => {
                if job.status.is_final() || !step_ok(job, *step) {
                    false
                } else {
                    job.status = JobState::Running;
                    let s = &mut job.steps[*step as usize];
                    let new = StepState::from(*status);
                    let changed = s.status != new
                        || s.exit_code != *exit_code
                        || s.outputs != *outputs
                        || s.message != *message;
                    if s.status != new {
                        let now = crate::registry::now_unix_ms();
                        s.finished_unix_ms = Some(now);
                        if let (true, Some(started)) = (live, s.started_unix_ms) {
                            self.metrics.step_ended(started, now);
                        }
                    }
                    s.status = new;
                    s.exit_code = *exit_code;
                    s.outputs = outputs.clone();
                    s.message = message.clone();
                    let key = output_len_key(job_id, *step);
                    if self.output_bytes.remove(&key).is_some() {
                        effect.ops.push(Op::DeleteMeta { key });
                    }
                    changed
                }
            }
            EventBody::JobFinished { status, .. } => {
                if job.status.is_final() {
                    false
                } else {
                    let mut end = JobState::from(*status);
                    let running_to = if end == JobState::Cancelled {
                        StepState::Cancelled
                    } else {
                        StepState::Interrupted
                    };
                    // A job succeeds only if every step did, whatever the agent says.
                    let mut message = String::new();
                    if end == JobState::Succeeded {
                        if let Some(s) = job.steps.iter().find(|s| s.status != StepState::Succeeded)
                        {
                            end = JobState::Failed;
                            message = format!(
                                "the agent reported success, but step {:?} is {}",
                                s.name,
                                s.status.as_str()
                            );
                            tracing::warn!(agent_id = %agent_id, job_id = %job_id, "job-success-refused");
                        }
                    }
                    job.finish(end, running_to, &message);
                    for step in 0..job.steps.len() as u32 {
                        let key = output_len_key(job_id, step);
                        if self.output_bytes.remove(&key).is_some() {
                            effect.ops.push(Op::DeleteMeta { key });
                        }
                    }
                    effect.job_finished = true;
                    true
                }
            }
            _ => false,
        };
        if live && was_queued && job.status != JobState::Queued {
            self.metrics.job_accepted(job_id.as_str());
        }
        if changed {
            effect.ops.push(job_op(job));
        }
        if effect.job_finished {
            effect.batch_moved = self.note_end(job_id.as_str()).gate;
        }
        effect
    }

    /// Job `id` became final: counts it and its deployment's progress.
    fn note_end(&mut self, id: &str) -> Ended {
        let Some(job) = self.jobs.get(id) else {
            return Ended::default();
        };
        self.metrics.job_ended(job);
        let Some(p) = self.progress.get_mut(&job.deployment_id) else {
            return Ended::default();
        };
        let ended = p.end(job);
        if ended.deployment {
            if let Some(d) = self.deployments.get(&job.deployment_id) {
                self.metrics
                    .deployment_ended(deployment_status(self.jobs_of(d)));
            }
        }
        ended
    }

    /// [`State::note_end`] for each of `ids`.
    fn note_ends(&mut self, ids: Vec<JobId>) {
        for id in ids {
            self.note_end(id.as_str());
        }
    }

    /// Where one of its jobs stands, as `agent_id` reports it: the events that would have
    /// said so, applied in order (what is known already changes nothing). `None` if this
    /// server does not know the job.
    pub fn apply_report(&mut self, agent_id: &AgentId, report: &JobReport) -> Option<Effect> {
        if !self.jobs.contains_key(report.job_id.as_str()) {
            return None;
        }
        let job_id = || report.job_id.clone();
        let mut events = vec![EventBody::JobAccepted { job_id: job_id() }];
        for (step, s) in (0u32..).zip(&report.steps) {
            match s.status {
                Some(status) => events.push(EventBody::StepFinished {
                    job_id: job_id(),
                    step,
                    status,
                    exit_code: s.exit_code,
                    outputs: s.outputs.clone(),
                    message: s.message.clone(),
                }),
                None if s.attempt > 0 => events.push(EventBody::StepStarted {
                    job_id: job_id(),
                    step,
                    attempt: s.attempt,
                }),
                None => {}
            }
        }
        if let Some(status) = report.status {
            events.push(EventBody::JobFinished {
                job_id: job_id(),
                status,
            });
        }
        let mut effect = Effect::default();
        for event in &events {
            let e = self.apply(agent_id, event, false);
            effect.ops.extend(e.ops);
            effect.job_finished |= e.job_finished;
            effect.batch_moved |= e.batch_moved;
        }
        Some(effect)
    }

    /// Adds `job` (a new one, or one loaded at start).
    pub fn insert_job(&mut self, job: Job) {
        if !job.status.is_final() {
            self.active
                .entry(job.agent_id.clone())
                .or_default()
                .insert(job.job_id.clone());
        }
        let deployment = job.deployment_id.clone();
        let progress = self.progress.entry(deployment.clone()).or_default();
        progress.add(&job);
        if self.jobs.insert(job.job_id.clone(), job).is_some() {
            // A job replaced (loaded again): its deployment is counted afresh.
            let mut fresh = super::progress::Progress::default();
            for j in self.jobs.values().filter(|j| j.deployment_id == deployment) {
                fresh.add(j);
            }
            self.progress.insert(deployment, fresh);
        }
    }

    /// The ids of `agent_id`'s jobs that are not final, dropping from the index those that
    /// became final since.
    fn active_jobs(&mut self, agent_id: &AgentId) -> Vec<JobId> {
        let Some(ids) = self.active.get_mut(agent_id) else {
            return Vec::new();
        };
        let jobs = &self.jobs;
        ids.retain(|id| jobs.get(id).is_some_and(|j| !j.status.is_final()));
        let live: Vec<JobId> = ids.iter().cloned().collect();
        if live.is_empty() {
            self.active.remove(agent_id);
        }
        live
    }

    /// Jobs of `agent_id` that are not final (queued or running).
    pub fn unfinished(&self, agent_id: &AgentId) -> impl Iterator<Item = &Job> + '_ {
        self.active
            .get(agent_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.jobs.get(id))
            .filter(|j| !j.status.is_final())
    }

    /// Where rolling deployment `d` stands: the first batch with an unfinished job (`open`;
    /// `u32::MAX` once all ended) and the first with a failed one; `None` if it is not rolling.
    /// Counted as jobs end (see [`super::progress::Progress`]): costs nothing per job.
    fn gate(&self, d: &Deployment) -> Option<Gate> {
        d.batch_size?;
        let p = self.progress.get(&d.id)?;
        Some(Gate {
            open: p.open(),
            failed: p.failed,
        })
    }

    /// What becomes of queued job `job` of rolling deployment `d` at `gate`.
    fn batch_turn(d: &Deployment, gate: &Gate, job: &Job) -> BatchTurn {
        if d.stop_on_failure && gate.failed.is_some_and(|f| job.batch > f) {
            BatchTurn::Stopped
        } else if job.batch > gate.open {
            BatchTurn::Waits
        } else {
            BatchTurn::Goes
        }
    }

    /// The agents with a queued job of rolling deployment `id` that may start now, or that a
    /// failure stopped: their links should take their jobs (see `take_ready`).
    pub fn batch_wakeups(&self, id: &str) -> Vec<AgentId> {
        let Some(d) = self.deployments.get(id) else {
            return Vec::new();
        };
        let Some(gate) = self.gate(d) else {
            return Vec::new();
        };
        d.agents
            .iter()
            .filter(|a| {
                self.jobs
                    .get(format!("{}-{a}", d.id).as_str())
                    .is_some_and(|j| {
                        j.status == JobState::Queued
                            && !j.dispatched
                            && Self::batch_turn(d, &gate, j) != BatchTurn::Waits
                    })
            })
            .cloned()
            .collect()
    }

    /// Ends `expired` every job its agent never accepted once its deployment's deadline is
    /// before `now`: at the deadline for a job not yet sent, one grace period later (the
    /// deployment's span, at most a minute) for one sent, so that an agent that got it just in
    /// time has its acceptance heard first. An agent that gets it later finds it expired too
    /// (the command carries the same deadline). Answers their ops.
    pub fn expire_overdue(&mut self, now: u64) -> Vec<Op> {
        let overdue: Vec<(String, u64)> = self
            .deployments
            .values()
            .filter_map(|d| {
                let deadline = d.deadline_unix_ms.filter(|t| *t < now)?;
                let grace = deadline
                    .saturating_sub(d.created_unix_ms)
                    .min(DEADLINE_GRACE_MS);
                Some(
                    d.agents
                        .iter()
                        .map(move |a| (format!("{}-{a}", d.id), deadline + grace)),
                )
            })
            .flatten()
            .collect();
        let (mut ops, mut ended) = (Vec::new(), Vec::new());
        for (id, sent_until) in overdue {
            if let Some(job) = self.jobs.get_mut(id.as_str()) {
                if job.status == JobState::Queued && (!job.dispatched || sent_until < now) {
                    job.finish(
                        JobState::Expired,
                        StepState::Skipped,
                        super::EXPIRED_MESSAGE,
                    );
                    tracing::info!(agent_id = %job.agent_id, job_id = %job.job_id, "job-expired-deadline");
                    ops.push(job_op(job));
                    ended.push(job.job_id.clone());
                }
            }
        }
        self.note_ends(ended);
        ops
    }

    /// Rolling deployments not yet ended.
    pub fn rolling(&self) -> Vec<DeploymentId> {
        self.deployments
            .values()
            .filter(|d| d.batch_size.is_some())
            .filter(|d| self.progress.get(&d.id).is_some_and(|p| p.unfinished > 0))
            .map(|d| d.id.clone())
            .collect()
    }

    /// Agents that have jobs waiting to be sent.
    pub fn agents_with_waiting_jobs(&self) -> Vec<AgentId> {
        self.active
            .keys()
            .filter(|a| {
                self.unfinished(a)
                    .any(|j| !j.dispatched && j.status == JobState::Queued)
            })
            .cloned()
            .collect()
    }

    /// The agent came back without its state: its jobs in flight there failed. Jobs still
    /// queued on the server are untouched (the agent never had them).
    pub fn reset_agent(&mut self, agent_id: &AgentId) -> Vec<Op> {
        let (mut ops, mut ended) = (Vec::new(), Vec::new());
        for id in self.active_jobs(agent_id) {
            let Some(job) = self.jobs.get_mut(id.as_str()) else {
                continue;
            };
            if job.dispatched {
                job.finish(JobState::Failed, StepState::Interrupted, RESET_MESSAGE);
                tracing::warn!(agent_id = %agent_id, job_id = %job.job_id, "job-failed-agent-reset");
                ops.push(job_op(job));
                ended.push(id);
            }
        }
        self.note_ends(ended);
        ops
    }

    /// Fails every unfinished job of `agent_id` (queued or running) with `message` (the agent
    /// is being deleted): answers their ops.
    pub fn fail_agent(&mut self, agent_id: &AgentId, message: &str) -> Vec<Op> {
        let (mut ops, mut ended) = (Vec::new(), Vec::new());
        for id in self.active_jobs(agent_id) {
            if let Some(job) = self.jobs.get_mut(id.as_str()) {
                job.finish(JobState::Failed, StepState::Interrupted, message);
                tracing::warn!(agent_id = %agent_id, job_id = %job.job_id, "job-failed-agent-deleted");
                ops.push(job_op(job));
                ended.push(id);
            }
        }
        self.note_ends(ended);
        ops
    }

    /// Jobs of `agent_id` dispatched and not final.
    #[cfg(test)]
    pub fn running(&self, agent_id: &AgentId) -> usize {
        self.unfinished(agent_id).filter(|j| j.dispatched).count()
    }

    /// Marks up to the free slots of `agent_id` of its undispatched queued jobs dispatched
    /// (oldest deployment first) and answers their RunJob commands and ops. Looks at the
    /// agent's unfinished jobs only: the cost does not grow with history or fleet size.
    ///
    /// Secret values are sealed for the agent (`tether_shared::sealing`, see [`Sealing`]).
    pub fn take_ready(
        &mut self,
        agent_id: &AgentId,
        limit: usize,
        sealing: Sealing<'_>,
        agent: AgentValues<'_>,
        runs_as: bool,
    ) -> (Vec<JobId>, Vec<CommandBody>, Vec<Op>) {
        let active = self.active_jobs(agent_id);
        let mut running = 0;
        let mut ready: Vec<(u64, JobId)> = Vec::new();
        for id in active {
            let Some(j) = self.jobs.get(id.as_str()) else {
                continue;
            };
            if j.dispatched {
                running += 1;
            } else if j.status == JobState::Queued {
                let created = self
                    .deployments
                    .get(&j.deployment_id)
                    .map_or(0, |d| d.created_unix_ms);
                ready.push((created, id));
            }
        }
        let free = limit.saturating_sub(running);
        ready.sort();
        let (mut ids, mut bodies, mut ops, mut ended) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // Rolling deployments: jobs of a batch not yet open wait, those a failure stopped end.
        let mut turns = Vec::with_capacity(ready.len());
        for (created, job_id) in ready {
            let cancelled = self
                .jobs
                .get(job_id.as_str())
                .and_then(|j| self.deployments.get(&j.deployment_id))
                .is_some_and(|d| d.cancelled);
            if cancelled {
                // Queued again after its sending was refused (a claim moved on), and cancelled
                // meanwhile: it never goes out, and takes no slot.
                if let Some(job) = self.jobs.get_mut(job_id.as_str()) {
                    job.finish(
                        JobState::Cancelled,
                        StepState::Cancelled,
                        "cancelled before it was sent",
                    );
                    tracing::info!(agent_id = %agent_id, job_id = %job_id, "job-of-a-cancelled-deployment-not-sent");
                    ops.push(job_op(job));
                    ended.push(job_id);
                }
                continue;
            }
            let turn = self
                .jobs
                .get(job_id.as_str())
                .and_then(|j| Some((j, self.deployments.get(&j.deployment_id)?)))
                .and_then(|(j, d)| Some(Self::batch_turn(d, &self.gate(d)?, j)))
                .unwrap_or(BatchTurn::Goes);
            match turn {
                BatchTurn::Goes => turns.push((created, job_id)),
                BatchTurn::Waits => {}
                BatchTurn::Stopped => {
                    if let Some(job) = self.jobs.get_mut(job_id.as_str()) {
                        job.finish(JobState::Cancelled, StepState::Skipped, STOPPED_MESSAGE);
                        tracing::info!(agent_id = %agent_id, job_id = %job_id, "job-stopped-earlier-batch-failed");
                        ops.push(job_op(job));
                        ended.push(job_id);
                    }
                }
            }
        }
        for (_, job_id) in turns.into_iter().take(free) {
            let Some(job) = self.jobs.get_mut(job_id.as_str()) else {
                continue;
            };
            let Some(d) = self.deployments.get(&job.deployment_id) else {
                continue;
            };
            let steps = match steps_for_agent(&d.steps, sealing, agent, runs_as, &job_id) {
                Ok(Some(steps)) => steps,
                // Later jobs wait too: an agent runs its jobs in the order they were made.
                Ok(None) => break,
                Err(message) => {
                    tracing::warn!(agent_id = %agent_id, job_id = %job_id, reason = %message, "job-failed-not-sendable");
                    job.finish(JobState::Failed, StepState::Interrupted, &message);
                    ops.push(job_op(job));
                    ended.push(job_id);
                    continue;
                }
            };
            job.dispatched = true;
            self.metrics.job_dispatched(&job_id);
            bodies.push(CommandBody::RunJob {
                job_id: job_id.to_string(),
                deployment_id: d.id.to_string(),
                steps,
            });
            ops.push(job_op(job));
            ids.push(job_id);
        }
        self.note_ends(ended);
        (ids, bodies, ops)
    }

    /// `agent_id` is in maintenance: its queued jobs of deployments made with
    /// `skip_maintenance` end `cancelled`, saying so (ops); the others wait.
    pub fn skip_for_maintenance(&mut self, agent_id: &AgentId) -> Vec<Op> {
        let (mut ops, mut ended) = (Vec::new(), Vec::new());
        for id in self.active_jobs(agent_id) {
            let Some(job) = self.jobs.get_mut(id.as_str()) else {
                continue;
            };
            let skip = self
                .deployments
                .get(&job.deployment_id)
                .is_some_and(|d| d.skip_maintenance);
            if skip && !job.dispatched && job.status == JobState::Queued {
                job.finish(JobState::Cancelled, StepState::Skipped, MAINTENANCE_MESSAGE);
                tracing::info!(agent_id = %agent_id, job_id = %job.job_id, "job-skipped-maintenance");
                ops.push(job_op(job));
                ended.push(id);
            }
        }
        self.note_ends(ended);
        ops
    }

    /// The commands of `take_ready` could not be queued: the jobs wait again.
    pub fn undo_dispatch(&mut self, job_ids: &[JobId]) {
        for id in job_ids {
            if let Some(j) = self.jobs.get_mut(id.as_str()) {
                j.dispatched = false;
                self.metrics.job_undispatched(id.as_str());
            }
        }
    }

    /// Cancels deployment `id`: jobs still queued on the server are cancelled here (ops); the
    /// dispatched, unfinished ones are answered as (agent id, job id) to send CancelJob to.
    pub fn cancel(&mut self, id: &str) -> (Vec<Op>, Vec<(AgentId, JobId)>) {
        let (mut ops, mut remote, mut ended) = (Vec::new(), Vec::new(), Vec::new());
        if let Some(d) = self.deployments.get_mut(id) {
            // No job of it goes out from now on (see `take_ready`).
            d.cancelled = true;
        }
        let job_ids: Vec<String> = self
            .deployments
            .get(id)
            .map(|d| d.agents.iter().map(|a| format!("{id}-{a}")).collect())
            .unwrap_or_default();
        for job_id in job_ids {
            let Some(job) = self.jobs.get_mut(job_id.as_str()) else {
                continue;
            };
            if job.status.is_final() {
                continue;
            }
            if job.dispatched {
                remote.push((job.agent_id.clone(), job.job_id.clone()));
            } else {
                job.finish(
                    JobState::Cancelled,
                    StepState::Cancelled,
                    "cancelled before it was sent",
                );
                ops.push(job_op(job));
                ended.push(job.job_id.clone());
            }
        }
        self.note_ends(ended);
        (ops, remote)
    }

    /// Final deployments to prune under `policy` at `now_ms`, oldest end first: every one that
    /// ended before the age limit, then the oldest beyond the count limit. A deployment with
    /// a job not final is never pruned.
    pub fn prunable(&self, policy: &Retention, now_ms: u64) -> Vec<String> {
        let mut ended: Vec<(u64, &str)> = self
            .deployments
            .values()
            .filter_map(|d| {
                let mut end = d.created_unix_ms;
                for j in self.jobs_of(d) {
                    if !j.status.is_final() {
                        return None;
                    }
                    end = end.max(j.finished_unix_ms.unwrap_or(0));
                }
                Some((end, d.id.as_str()))
            })
            .collect();
        ended.sort_unstable();
        let over_count = ended.len().saturating_sub(policy.keep_deployments);
        let cutoff = policy
            .max_age_ms
            .map_or(0, |age| now_ms.saturating_sub(age));
        ended
            .iter()
            .enumerate()
            .take_while(|(i, (end, _))| *i < over_count || *end < cutoff)
            .map(|(_, (_, id))| (*id).to_owned())
            .collect()
    }

    /// The ops deleting deployment `id`, its jobs and their logs (nothing changes in memory:
    /// call [`State::forget`] once they are durable).
    pub fn prune_ops(&self, id: &str) -> Vec<Op> {
        let Some(d) = self.deployments.get(id) else {
            return Vec::new();
        };
        let mut ops = vec![Op::DeleteMeta {
            key: format!("{DEPLOYMENT_PREFIX}{id}"),
        }];
        for job in self.jobs_of(d) {
            ops.push(Op::DeleteMeta {
                key: format!("{JOB_PREFIX}{}", job.job_id),
            });
            for step in 0..job.steps.len() as u32 {
                if let Some(log) = step_log(&job.job_id, step) {
                    // Logs written before they moved to blobs are records.
                    ops.push(Op::TruncateThrough {
                        log: log.clone(),
                        upto: Seq::MAX_VALID,
                    });
                    ops.push(Op::DeleteBlob { name: log });
                }
                ops.push(Op::DeleteMeta {
                    key: output_len_key(&job.job_id, step),
                });
            }
        }
        ops
    }

    /// Keeps deployment `d` (its jobs are inserted apart, with [`State::insert_job`]).
    pub fn insert_deployment(&mut self, d: Deployment) {
        for sha256 in blobs_of(&d) {
            self.blobs.entry(sha256).or_default().insert(d.id.clone());
        }
        self.deployments.insert(d.id.clone(), d);
    }

    /// Whether a deployment with a job for `agent_id` has a step that fetches blob `sha256`.
    pub fn sends_blob(&self, agent_id: &str, sha256: &str) -> bool {
        self.blobs.get(sha256).is_some_and(|ids| {
            ids.iter()
                .any(|d| self.jobs.contains_key(format!("{d}-{agent_id}").as_str()))
        })
    }

    /// Drops deployment `id` and its jobs from memory (after [`State::prune_ops`] committed).
    pub fn forget(&mut self, id: &str) {
        self.progress.remove(id);
        if let Some(d) = self.deployments.remove(id) {
            for sha256 in blobs_of(&d) {
                if let Some(ids) = self.blobs.get_mut(&sha256) {
                    ids.remove(&d.id);
                    if ids.is_empty() {
                        self.blobs.remove(&sha256);
                    }
                }
            }
            for a in &d.agents {
                let job_id = format!("{}-{a}", d.id);
                if let Some(job) = self.jobs.remove(job_id.as_str()) {
                    if let Some(ids) = self.active.get_mut(job.agent_id.as_str()) {
                        ids.remove(job_id.as_str());
                    }
                    for step in 0..job.steps.len() as u32 {
                        self.output_bytes.remove(&output_len_key(&job_id, step));
                    }
                }
            }
        }
    }

    /// The jobs of a deployment, in its agent order.
    pub fn jobs_of<'a>(&'a self, d: &'a Deployment) -> impl Iterator<Item = &'a Job> + 'a {
        d.agents
            .iter()
            .filter_map(move |a| self.jobs.get(format!("{}-{a}", d.id).as_str()))
    }

    /// Deployment `id` and its jobs, copied: an answer is rendered from it after the lock is
    /// let go, so a large deployment being read does not hold up the results being recorded.
    pub fn snapshot(&self, id: &str) -> Option<Snapshot> {
        let d = self.deployments.get(id)?;
        Some(Snapshot {
            jobs: self.jobs_of(d).cloned().collect(),
            deployment: d.clone(),
        })
    }
}
