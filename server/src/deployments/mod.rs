//! Deployments on the server: processes, deployments and per-agent jobs, their state machine
//! and their REST API.
//!
//! [`Deployments`] (shared as `Arc<Deployments>`, also through `SessionShared` so that every
//! `AgentLink` reaches it) holds the [`state::State`] in memory, loaded from the journal's meta
//! entries at start (`process/<name>`, `deployment/<id>`, `job/<job_id>`, JSON). Step output is
//! in journal blobs `joblog/<job_id>/<step>`, a file each, so pruning frees the disk at once
//! (logs written by earlier versions are journal records, one per chunk, and are read first).
//!
//! Changes made by REST requests are committed before they are answered; changes made by agent
//! events are returned as ops that the agent's link commits in the same batch as the event.
//! RunJob commands are queued by the agent's link (`DispatchJobs`), at most
//! [`Deployments::max_running_per_agent`] unfinished per agent; the rest wait here, journaled.
//!
//! - [`model`]: stored shapes, statuses, secret masking.
//! - [`validate`]: steps checked against plugin manifests (built-in and uploaded), request
//!   checks, `${property}` substitution, manifest defaults and bundles at deployment time.
//! - [`state`]: the job state machine (sans-IO).
//! - [`view`]: the JSON answers (secrets masked).
//! - [`api`]: the REST routes.

pub mod api;
pub mod model;
pub mod progress;
pub mod state;
pub mod validate;
pub mod view;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tether_shared::ids::{AgentId, DeploymentId, JobId};

use rand::RngCore;
use serde::Deserialize;
use tether_shared::journal::{JournalError, JournalHandle, Op};
use tether_shared::protocol::{CommandBody, EventBody, JobReport};

use crate::registry::{now_unix_ms, AgentIndex};
use crate::secrets::KeyRing;
use model::{Deployment, Job, JobState, Process, DEPLOYMENT_PREFIX, JOB_PREFIX, PROCESS_PREFIX};
use state::{deployment_op, job_op, process_op, Effect, State};
pub use state::{AgentTerms, Retention, Sealing, NO_SEALING_KEY};
use validate::{BuiltInsOnly, Catalog, NewProcess};

/// Unfinished jobs an agent runs at once, by default.
pub const DEFAULT_MAX_RUNNING_PER_AGENT: usize = 4;
/// Most targets of one deployment.
const MAX_TARGETS: usize = 10_000;
/// Unknown target names quoted in an error (the rest are counted).
const MAX_NAMED_UNKNOWN: usize = 10;
/// Deployments deleted per journal commit when pruning.
const PRUNE_BATCH: usize = 64;

/// Why a deployment operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeploymentsError {
    /// The request breaks a rule; the message lists every problem.
    #[error("{0}")]
    Invalid(String),
    /// No such process, deployment, job or step.
    #[error("not found")]
    NotFound,
    /// The journal refused the change; nothing changed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A stored entry could not be decoded at load.
    #[error("deployments entry {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// A stored secret does not open with the key ring.
    #[error("{0}: restore the key ring it was sealed with (secrets.key_file or key_command)")]
    Secrets(#[from] crate::secrets::SecretsError),
    /// Not now, in the state it is in (the message says why).
    #[error("{0}")]
    Conflict(String),
}

/// The body of `POST /api/v1/deployments`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDeployment {
    pub process: String,
    pub targets: Targets,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Skip agents in maintenance instead of waiting for them.
    #[serde(default)]
    pub skip_maintenance: bool,
    /// A rolling deployment: this many agents at a time (exclusive with `batch_percent`).
    #[serde(default)]
    pub batch_size: Option<u32>,
    /// A rolling deployment: this share of the targets at a time, rounded up (1 to 100).
    #[serde(default)]
    pub batch_percent: Option<u32>,
    /// Of a rolling deployment: a failed job cancels the later batches (default true).
    #[serde(default)]
    pub stop_on_failure: Option<bool>,
    /// Seconds from now by which each job must have started, or it expires (10 s to 30 days;
    /// default: 24 h after its RunJob is sent).
    #[serde(default)]
    pub deadline_s: Option<u64>,
}

/// Shortest deployment deadline.
pub const MIN_DEADLINE_S: u64 = 10;
/// Longest deployment deadline.
pub const MAX_DEADLINE_S: u64 = 30 * 86_400;
/// Why a job ends `expired` on the server.
pub const EXPIRED_MESSAGE: &str = "not started before the deployment's deadline";

/// The batch size of a rolling deployment to `targets` agents, or why the request is wrong.
fn batch_size(new: &NewDeployment, targets: usize) -> Result<Option<u32>, String> {
    let size = match (new.batch_size, new.batch_percent) {
        (Some(_), Some(_)) => {
            return Err("give batch_size or batch_percent, not both".to_owned());
        }
        (Some(0), None) => return Err("batch_size must be at least 1".to_owned()),
        (Some(n), None) => n,
        (None, Some(p)) if (1..=100).contains(&p) => {
            u32::try_from((targets * p as usize).div_ceil(100).max(1)).unwrap_or(u32::MAX)
        }
        (None, Some(p)) => return Err(format!("batch_percent must be 1 to 100, got {p}")),
        (None, None) => {
            if new.stop_on_failure.is_some() {
                return Err(
                    "stop_on_failure applies to rolling deployments (batch_size or batch_percent)"
                        .to_owned(),
                );
            }
            return Ok(None);
        }
    };
    Ok(Some(size))
}

/// Which agents a deployment runs on: exactly one of the two.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// Agent names (ids are accepted too).
    pub agents: Option<Vec<String>>,
    /// Every agent having all of these tags.
    pub tags: Option<Vec<String>>,
    /// With `tags`: any this many of those agents (a pool), available ones first.
    #[serde(default)]
    pub count: Option<u32>,
}

/// `count` of `ids` (the agents a tag selects): those `available` (connected, not in
/// maintenance) first, then the others, each group in name order (`name_of`). `None`: all of
/// them.
pub fn pick_pool(
    ids: Vec<AgentId>,
    count: Option<u32>,
    name_of: &dyn Fn(&AgentId) -> Option<String>,
    available: &dyn Fn(&AgentId) -> bool,
) -> Result<Vec<AgentId>, String> {
    let Some(count) = count else {
        return Ok(ids);
    };
    if count == 0 {
        return Err("targets.count must be at least 1".to_owned());
    }
    if ids.len() < count as usize {
        return Err(format!(
            "targets.count is {count}, but only {} agents have those tags",
            ids.len()
        ));
    }
    let mut ranked: Vec<(bool, String, AgentId)> = ids
        .into_iter()
        .map(|id| match name_of(&id) {
            Some(name) => (!available(&id), name, id),
            None => (true, String::new(), id),
        })
        .collect();
    ranked.sort();
    Ok(ranked
        .into_iter()
        .take(count as usize)
        .map(|(_, _, id)| id)
        .collect())
}

/// Processes, deployments and jobs; share as `Arc<Deployments>`.
pub struct Deployments {
    journal: JournalHandle,
    /// Seals secret values before they are stored, opens them at load.
    keys: Arc<KeyRing>,
    /// Processes and deployments stored with secrets that are not sealed with the key that
    /// seals now (an older key, or a release before sealing): [`Deployments::reseal`] rewrites
    /// them.
    stale: std::sync::Mutex<Vec<String>>,
    state: RwLock<State>,
    /// Serializes REST changes (check, commit, apply as one step).
    changes: tokio::sync::Mutex<()>,
    /// Unfinished dispatched jobs per agent; more wait queued on the server.
    pub max_running_per_agent: usize,
    /// Uploaded plugins that process steps may use (besides the built-ins).
    catalog: std::sync::Arc<dyn Catalog>,
    /// Where `artifact/fetch` steps find their artifacts (none: such steps are refused).
    artifacts: Option<std::sync::Arc<dyn validate::ArtifactLookup>>,
    /// Output chunks refused (step not running) and steps cut at the cap, since start.
    output_refused: AtomicU64,
    output_truncated: AtomicU64,
    /// Agents whose links should take their jobs again: a batch of a rolling deployment
    /// opened, or a failure stopped one (see [`Deployments::woken`]).
    wake: std::sync::Mutex<BTreeSet<AgentId>>,
    woken: tokio::sync::Notify,
}

impl std::fmt::Debug for Deployments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.read();
        f.debug_struct("Deployments")
            .field("processes", &s.processes.len())
            .field("deployments", &s.deployments.len())
            .field("jobs", &s.jobs.len())
            .finish_non_exhaustive()
    }
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T, DeploymentsError> {
    serde_json::from_slice(value).map_err(|e| DeploymentsError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

impl Deployments {
    /// The key ring that seals secrets at rest.
    pub fn secrets(&self) -> Arc<KeyRing> {
        self.keys.clone()
    }

    /// Reads every process, deployment and job from the journal's meta entries, opening
    /// their secrets with `keys`.
    pub fn load(
        journal: JournalHandle,
        keys: Arc<KeyRing>,
    ) -> Result<Deployments, DeploymentsError> {
        let mut state = State::default();
        let mut stale = Vec::new();
        let mut open = |key: &str, context: &str, v: &str| {
            if !keys.is_current(v) && !stale.iter().any(|k| k == key) {
                stale.push(key.to_owned());
            }
            keys.open(context, v)
        };
        for (key, value) in journal.scan_meta(PROCESS_PREFIX)? {
            let mut p: Process = decode(&key, &value)?;
            p.map_secrets(|context, v| open(&key, context, v))?;
            state.processes.insert(p.name.clone(), p);
        }
        for (key, value) in journal.scan_meta(DEPLOYMENT_PREFIX)? {
            let mut d: Deployment = decode(&key, &value)?;
            d.map_secrets(|context, v| open(&key, context, v))?;
            state.insert_deployment(d);
        }
        for (key, value) in journal.scan_meta(JOB_PREFIX)? {
            let j: Job = decode(&key, &value)?;
            state.insert_job(j);
        }
        for (key, value) in journal.scan_meta(state::OUTPUT_LEN_PREFIX)? {
            let bytes =
                <[u8; 8]>::try_from(value.as_slice()).map_err(|_| DeploymentsError::Corrupt {
                    key: key.clone(),
                    reason: "not a u64".into(),
                })?;
            state.output_bytes.insert(key, u64::from_be_bytes(bytes));
        }
        tracing::info!(
            processes = state.processes.len(),
            deployments = state.deployments.len(),
            jobs = state.jobs.len(),
            "deployments-loaded"
        );
        Ok(Deployments {
            journal,
            keys,
            stale: std::sync::Mutex::new(stale),
            state: RwLock::new(state),
            changes: tokio::sync::Mutex::new(()),
            max_running_per_agent: DEFAULT_MAX_RUNNING_PER_AGENT,
            catalog: std::sync::Arc::new(BuiltInsOnly),
            artifacts: None,
            output_refused: AtomicU64::new(0),
            output_truncated: AtomicU64::new(0),
            wake: Default::default(),
            woken: tokio::sync::Notify::new(),
        })
    }

    /// Lets processes use the uploaded plugins of `catalog` (the server's plugin store).
    pub fn with_artifacts(
        mut self,
        artifacts: std::sync::Arc<dyn validate::ArtifactLookup>,
    ) -> Self {
        self.artifacts = Some(artifacts);
        self
    }

    /// Jobs an agent runs at once unless its own setting says otherwise.
    pub fn with_max_running_per_agent(mut self, n: usize) -> Self {
        self.max_running_per_agent = n.max(1);
        self
    }

    pub fn with_catalog(mut self, catalog: std::sync::Arc<dyn Catalog>) -> Self {
        self.catalog = catalog;
        self
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The effect of an event `agent_id` sent (ops to commit in the event's batch).
    pub fn on_event(&self, agent_id: &AgentId, body: &EventBody) -> Effect {
        let effect = {
            let mut s = self.write();
            let effect = s.apply_event(agent_id, body);
            if let (true, EventBody::JobFinished { job_id, .. }) = (effect.batch_moved, body) {
                let deployment = s.jobs.get(job_id.as_str()).map(|j| j.deployment_id.clone());
                if let Some(d) = deployment {
                    self.wake_up(s.batch_wakeups(&d));
                }
            }
            effect
        };
        if effect.output_refused {
            self.output_refused.fetch_add(1, Ordering::Relaxed);
        }
        if effect.output_truncated {
            self.output_truncated.fetch_add(1, Ordering::Relaxed);
        }
        effect
    }

    /// The effect of a job report `agent_id` sent; `None` for a job this server does not know.
    pub fn on_report(&self, agent_id: &AgentId, report: &JobReport) -> Option<Effect> {
        self.write().apply_report(agent_id, report)
    }

    /// Hands `agents` to whoever waits on [`Deployments::woken`].
    fn wake_up(&self, agents: Vec<AgentId>) {
        if agents.is_empty() {
            return;
        }
        self.wake
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(agents);
        self.woken.notify_one();
    }

    /// Waits until some agent's links should take their jobs again (a rolling deployment's
    /// batch opened or stopped), and answers them.
    pub async fn woken(&self) -> Vec<AgentId> {
        loop {
            let agents: Vec<AgentId> =
                std::mem::take(&mut *self.wake.lock().unwrap_or_else(PoisonError::into_inner))
                    .into_iter()
                    .collect();
            if !agents.is_empty() {
                return agents;
            }
            self.woken.notified().await;
        }
    }

    /// The deadline (Unix ms) of job `id`'s deployment, if it has one.
    pub fn deadline_of(&self, id: &JobId) -> Option<u64> {
        let s = self.read();
        let job = s.jobs.get(id.as_str())?;
        s.deployments.get(&job.deployment_id)?.deadline_unix_ms
    }

    /// Jobs still queued on the server past their deployment's deadline end `expired`
    /// (committed); answers how many.
    pub async fn expire_overdue(&self) -> Result<usize, DeploymentsError> {
        let _guard = self.changes.lock().await;
        let now = now_unix_ms();
        let ops = self.write().expire_overdue(now);
        if !ops.is_empty() {
            self.journal.commit(ops.clone()).await?;
            tracing::info!(jobs = ops.len(), "jobs-expired-deadline");
        }
        Ok(ops.len())
    }

    /// Looks at every rolling deployment not yet ended and wakes the agents whose jobs may
    /// start or must stop (whatever ended their batch: an event, a cancel, a deleted agent, a
    /// restart). Answers how many rolling deployments there are.
    pub fn sweep_rolling(&self) -> usize {
        let s = self.read();
        let rolling = s.rolling();
        for d in &rolling {
            self.wake_up(s.batch_wakeups(d));
        }
        rolling.len()
    }

    /// Output refused or cut since start.
    pub fn health(&self) -> crate::health::DeploymentsHealth {
        crate::health::DeploymentsHealth {
            output_refused: self.output_refused.load(Ordering::Relaxed),
            output_truncated: self.output_truncated.load(Ordering::Relaxed),
            secrets_keys: self.keys.ids().into_iter().map(String::from).collect(),
            secrets_stale: self.stale_secrets() as u64,
        }
    }

    /// `agent_id` came back without its state: ops failing its jobs in flight.
    pub fn on_agent_reset(&self, agent_id: &AgentId) -> Vec<Op> {
        self.write().reset_agent(agent_id)
    }

    /// Jobs of `agent_id` to send now (marked dispatched): ids, RunJob commands (secrets
    /// sealed for the agent), ops.
    pub fn take_ready(
        &self,
        agent_id: &AgentId,
        terms: AgentTerms<'_>,
    ) -> (Vec<JobId>, Vec<CommandBody>, Vec<Op>) {
        let mut s = self.write();
        if terms.maintenance {
            return (Vec::new(), Vec::new(), s.skip_for_maintenance(agent_id));
        }
        let limit = terms.max_running.unwrap_or(self.max_running_per_agent);
        s.take_ready(agent_id, limit, terms.sealing, terms.agent, terms.runs_as)
    }

    /// Stored processes and deployments whose secrets are not sealed with the current key.
    pub fn stale_secrets(&self) -> usize {
        self.stale
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Seals again, with the key that seals now, what [`Deployments::load`] found sealed
    /// otherwise (after a key rotation, or stored in clear by an older release); a batch
    /// at a time, each entry as it is now in memory.
    pub async fn reseal(&self) -> Result<usize, DeploymentsError> {
        let mut done = 0;
        loop {
            let batch: Vec<String> = {
                let stale = self.stale.lock().unwrap_or_else(PoisonError::into_inner);
                stale.iter().take(PRUNE_BATCH).cloned().collect()
            };
            if batch.is_empty() {
                return Ok(done);
            }
            let _guard = self.changes.lock().await;
            let ops: Vec<Op> = {
                let s = self.read();
                batch
                    .iter()
                    .filter_map(|key| {
                        if let Some(name) = key.strip_prefix(PROCESS_PREFIX) {
                            s.processes.get(name).map(|p| process_op(p, &self.keys))
                        } else {
                            let id = key.strip_prefix(DEPLOYMENT_PREFIX)?;
                            s.deployments.get(id).map(|d| deployment_op(d, &self.keys))
                        }
                    })
                    .collect()
            };
            self.journal.commit(ops).await?;
            done += batch.len();
            self.stale
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|k| !batch.contains(k));
            tracing::info!(entries = batch.len(), "secrets-resealed");
        }
    }

    /// The commands for `job_ids` could not be queued.
    pub fn undo_dispatch(&self, job_ids: &[JobId]) {
        self.write().undo_dispatch(job_ids);
    }

    /// Reads `agent_id`'s jobs again from the journal, as another node (or a commit fenced by
    /// its claim) left them; answers how many. Not while a change to deployments is under way
    /// (it changes memory before its commit lands); the reads run off the async threads.
    pub async fn reload_jobs_of(
        self: Arc<Self>,
        agent_id: AgentId,
    ) -> Result<usize, DeploymentsError> {
        let _changes = self.changes.lock().await;
        let ids: Vec<JobId> = self
            .read()
            .jobs
            .values()
            .filter(|j| j.agent_id == agent_id)
            .map(|j| j.job_id.clone())
            .collect();
        let journal = self.journal.clone();
        let (fresh, lengths) = tokio::task::spawn_blocking(move || {
            let mut fresh = Vec::with_capacity(ids.len());
            // With each job, how much of its steps' output is stored (a refused commit may
            // have counted more in memory).
            let mut lengths = Vec::new();
            for id in ids {
                let key = format!("{JOB_PREFIX}{id}");
                let Some(value) = journal.get_meta(&key)? else {
                    continue;
                };
                let job = decode::<Job>(&key, &value)?;
                if !job.status.is_final() {
                    // A finished job's steps keep no length.
                    let prefix = format!("{}{id}/", state::OUTPUT_LEN_PREFIX);
                    lengths.extend(journal.scan_meta(&prefix)?);
                }
                fresh.push(job);
            }
            Ok::<_, DeploymentsError>((fresh, lengths))
        })
        .await
        .map_err(|_| DeploymentsError::Journal(JournalError::Closed))??;
        let n = fresh.len();
        let mut state = self.write();
        // The lengths of these jobs' steps are the stored ones, and only those.
        let reread: std::collections::HashSet<String> =
            fresh.iter().map(|j| j.job_id.to_string()).collect();
        state.output_bytes.retain(|key, _| {
            let job = key
                .strip_prefix(state::OUTPUT_LEN_PREFIX)
                .and_then(|rest| rest.rsplit_once('/'))
                .map(|(job, _)| job);
            !job.is_some_and(|j| reread.contains(j))
        });
        for job in fresh {
            state.insert_job(job);
        }
        for (key, value) in lengths {
            if let Ok(bytes) = <[u8; 8]>::try_from(value.as_slice()) {
                state.output_bytes.insert(key, u64::from_be_bytes(bytes));
            }
        }
        Ok(n)
    }

    /// Agents that have jobs waiting to be sent (checked at start-up).
    pub fn agents_with_waiting_jobs(&self) -> Vec<AgentId> {
        self.read().agents_with_waiting_jobs()
    }

    /// Creates or replaces a process.
    pub async fn put_process(&self, new: NewProcess) -> Result<Process, DeploymentsError> {
        let (name, steps) = validate::validate_process_in(new, self.catalog.as_ref())
            .map_err(DeploymentsError::Invalid)?;
        let _guard = self.changes.lock().await;
        let version = self.read().processes.get(&name).map_or(0, |p| p.version) + 1;
        let process = Process {
            name,
            version,
            steps,
            updated_unix_ms: now_unix_ms(),
        };
        self.journal
            .commit(vec![process_op(&process, &self.keys)])
            .await?;
        self.write()
            .processes
            .insert(process.name.clone(), process.clone());
        tracing::info!(process = %process.name, version, "process-stored");
        Ok(process)
    }

    pub fn process(&self, name: &str) -> Option<Process> {
        self.read().processes.get(name).cloned()
    }

    pub fn processes(&self) -> Vec<Process> {
        self.read().processes.values().cloned().collect()
    }

    /// Validates and stores a deployment with one queued job per target agent (committed
    /// before it returns); the caller then has the agents' links dispatch them. `targets` are
    /// `new.targets` resolved (see [`resolve_targets`] and [`pick_pool`]), or why they are
    /// wrong.
    pub async fn create(
        &self,
        new: NewDeployment,
        targets: Result<Vec<AgentId>, String>,
    ) -> Result<Deployment, DeploymentsError> {
        let mut problems = validate::validate_properties(&new.properties);
        let targets = match targets {
            Ok(t) => t,
            Err(e) => {
                problems.push(e);
                Vec::new()
            }
        };
        let batch_size = batch_size(&new, targets.len()).unwrap_or_else(|e| {
            problems.push(e);
            None
        });
        if let Some(s) = new
            .deadline_s
            .filter(|s| !(MIN_DEADLINE_S..=MAX_DEADLINE_S).contains(s))
        {
            problems.push(format!(
                "deadline_s must be {MIN_DEADLINE_S} to {MAX_DEADLINE_S}, got {s}"
            ));
        }
        let steps = match self.process(&new.process) {
            None => {
                problems.push(format!("unknown process {:?}", new.process));
                None
            }
            Some(p) => match validate::resolve_steps_in(
                &p,
                &new.properties,
                self.catalog.as_ref(),
                self.artifacts.as_deref(),
            ) {
                Ok(steps) => Some((p.version, steps)),
                Err(e) => {
                    problems.push(e);
                    None
                }
            },
        };
        let Some((process_version, steps)) = steps.filter(|_| problems.is_empty()) else {
            return Err(DeploymentsError::Invalid(problems.join("; ")));
        };
        let _guard = self.changes.lock().await;
        let deployment = Deployment {
            id: self.new_id(),
            process: new.process,
            process_version,
            properties: new.properties,
            steps,
            agents: targets,
            created_unix_ms: now_unix_ms(),
            skip_maintenance: new.skip_maintenance,
            batch_size,
            stop_on_failure: batch_size.is_some() && new.stop_on_failure.unwrap_or(true),
            deadline_unix_ms: new
                .deadline_s
                .map(|s| now_unix_ms().saturating_add(s.saturating_mul(1000))),
            retry_of: None,
            cancelled: false,
        };
        self.store(deployment).await
    }

    /// Runs deployment `id` again for the agents whose jobs did not succeed (failed, expired,
    /// cancelled): a new deployment of the same resolved steps and properties (as they ran,
    /// even if the process changed since), the same rolling terms, and a deadline as far from
    /// now as the first one's was from its start. Agents deleted since (`exists` says no) are
    /// left out. Refused while any job of it is unfinished, and when every job succeeded.
    pub async fn retry(
        &self,
        id: &str,
        exists: &dyn Fn(&AgentId) -> bool,
    ) -> Result<Deployment, DeploymentsError> {
        let _guard = self.changes.lock().await;
        let (original, jobs) = {
            let s = self.read();
            let d = s.deployments.get(id).ok_or(DeploymentsError::NotFound)?;
            let jobs: Vec<(AgentId, JobState)> = s
                .jobs_of(d)
                .map(|j| (j.agent_id.clone(), j.status))
                .collect();
            (d.clone(), jobs)
        };
        if jobs.iter().any(|(_, state)| !state.is_final()) {
            return Err(DeploymentsError::Conflict(format!(
                "deployment {id} is still running: wait for it to end, or cancel it, before retrying"
            )));
        }
        let agents: Vec<AgentId> = jobs
            .into_iter()
            .filter(|(agent, state)| *state != JobState::Succeeded && exists(agent))
            .map(|(agent, _)| agent)
            .collect();
        if agents.is_empty() {
            return Err(DeploymentsError::Conflict(format!(
                "deployment {id} has no job to retry: every job succeeded, or its agents were deleted"
            )));
        }
        let now = now_unix_ms();
        let deployment = Deployment {
            id: self.new_id(),
            agents,
            created_unix_ms: now,
            deadline_unix_ms: original
                .deadline_unix_ms
                .map(|d| now.saturating_add(d.saturating_sub(original.created_unix_ms))),
            retry_of: Some(original.id.clone()),
            cancelled: false,
            ..original
        };
        self.store(deployment).await
    }

    /// A deployment id no deployment has (the caller holds `changes`).
    fn new_id(&self) -> DeploymentId {
        let s = self.read();
        loop {
            let id = format!("d-{:016x}", rand::rngs::OsRng.next_u64());
            if !s.deployments.contains_key(id.as_str()) {
                return id.into();
            }
        }
    }

    /// Commits `deployment` and its jobs in one batch, then keeps them (the caller holds
    /// `changes`).
    async fn store(&self, deployment: Deployment) -> Result<Deployment, DeploymentsError> {
        let jobs: Vec<Job> = deployment
            .agents
            .iter()
            .enumerate()
            .map(|(i, a)| Job::new(&deployment, a, i))
            .collect();
        let mut ops = vec![deployment_op(&deployment, &self.keys)];
        ops.extend(jobs.iter().map(job_op));
        self.journal.commit(ops).await?;
        {
            let mut s = self.write();
            for j in jobs {
                s.insert_job(j);
            }
            s.insert_deployment(deployment.clone());
        }
        tracing::info!(deployment_id = %deployment.id, process = %deployment.process, jobs = deployment.agents.len(), retry_of = ?deployment.retry_of, "deployment-created");
        Ok(deployment)
    }

    /// Cancels a deployment: answers the (agent id, job id) of the jobs to send CancelJob to.
    pub async fn cancel(&self, id: &str) -> Result<Vec<(AgentId, JobId)>, DeploymentsError> {
        let _guard = self.changes.lock().await;
        if !self.read().deployments.contains_key(id) {
            return Err(DeploymentsError::NotFound);
        }
        // Applied in memory first so that no link dispatches a job being cancelled here; the
        // deployment says so too, so that a job whose sending is refused after this (a claim
        // moved on) and is queued again never goes out.
        let (mut ops, remote) = self.write().cancel(id);
        if let Some(d) = self.read().deployments.get(id) {
            ops.push(deployment_op(d, &self.keys));
        }
        if !ops.is_empty() {
            self.journal.commit(ops).await?;
        }
        tracing::info!(deployment_id = %id, remote = remote.len(), "deployment-cancel-requested");
        Ok(remote)
    }

    /// Fails every unfinished job of `agent_id` (queued or running) with `message`, committed
    /// before it answers how many (an agent being deleted). The agent is not told: it is gone.
    pub async fn fail_agent_jobs(
        &self,
        agent_id: &AgentId,
        message: &str,
    ) -> Result<usize, DeploymentsError> {
        let _guard = self.changes.lock().await;
        let ops = self.write().fail_agent(agent_id, message);
        let n = ops.len();
        if n > 0 {
            self.journal.commit(ops).await?;
        }
        Ok(n)
    }

    /// Whether a deployment sent `agent_id` a step that fetches the blob `sha256`: an artifact
    /// (`artifact/fetch`) or an uploaded plugin's bundle. Agents download only what their own
    /// jobs reference, so one agent's key does not open every artifact and bundle.
    pub fn sends_blob(&self, agent_id: &AgentId, sha256: &str) -> bool {
        self.read().sends_blob(agent_id, sha256)
    }

    /// Prunes final deployments under `policy` (their jobs and logs with them), committed in
    /// batches before each leaves memory; answers how many went.
    pub async fn prune(&self, policy: &Retention) -> Result<usize, DeploymentsError> {
        let _guard = self.changes.lock().await;
        let ids = self.read().prunable(policy, now_unix_ms());
        let mut pruned = 0;
        for chunk in ids.chunks(PRUNE_BATCH) {
            let ops: Vec<Op> = {
                let s = self.read();
                chunk.iter().flat_map(|id| s.prune_ops(id)).collect()
            };
            self.journal.commit(ops).await?;
            let mut s = self.write();
            for id in chunk {
                s.forget(id);
            }
            pruned += chunk.len();
        }
        if pruned > 0 {
            tracing::info!(pruned, "deployments-pruned");
        }
        Ok(pruned)
    }

    /// Reads a consistent snapshot with `f`.
    pub fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.read())
    }

    /// Deployment `id` and its jobs, copied under the lock (see [`State::snapshot`]).
    pub fn snapshot(&self, id: &str) -> Option<state::Snapshot> {
        self.read().snapshot(id)
    }

    pub fn journal(&self) -> &JournalHandle {
        &self.journal
    }
}

/// The agent ids a deployment targets: named agents (names or ids; every one must exist), or
/// every agent having all the given tags (at least one must), looked up in `index`.
pub fn resolve_targets(targets: &Targets, index: &AgentIndex) -> Result<Vec<AgentId>, String> {
    if targets.count.is_some() && targets.tags.is_none() {
        return Err("targets.count goes with targets.tags (any N agents having them)".to_owned());
    }
    let ids: Vec<AgentId> = match (&targets.agents, &targets.tags) {
        (Some(names), None) => {
            if names.len() > MAX_TARGETS {
                return Err(format!(
                    "at most {MAX_TARGETS} targets, got {}",
                    names.len()
                ));
            }
            // One lookup per name.
            let mut seen = std::collections::HashSet::new();
            let (mut ids, mut unknown, mut unknown_count) = (Vec::new(), Vec::new(), 0usize);
            for n in names {
                match index.id_of(n) {
                    Some(id) if seen.insert(id) => ids.push(id.clone()),
                    Some(_) => {}
                    None => {
                        unknown_count += 1;
                        if unknown.len() < MAX_NAMED_UNKNOWN {
                            let shown: String = n.chars().take(64).collect();
                            unknown.push(format!("{shown:?}"));
                        }
                    }
                }
            }
            if unknown_count > 0 {
                let more = unknown_count - unknown.len();
                let tail = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                return Err(format!("unknown agents: {}{tail}", unknown.join(", ")));
            }
            ids
        }
        (None, Some(tags)) if tags.is_empty() => {
            return Err("targets.tags must name at least one tag".to_owned())
        }
        (None, Some(tags)) => index.tagged(tags),
        _ => return Err("targets must hold exactly one of \"agents\" or \"tags\"".to_owned()),
    };
    if ids.is_empty() {
        return Err("the targets match no agent".to_owned());
    }
    if ids.len() > MAX_TARGETS {
        return Err(format!("at most {MAX_TARGETS} targets, got {}", ids.len()));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests;
