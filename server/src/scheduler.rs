//! The scheduler: the one owner of "which work goes to which agent when", for both the REST
//! API and the web application. It starts, retries and cancels deployments, queues upgrades and wakes
//! agents' links to send what is ready; links take their work through `crate::work` and know
//! nothing of deployments or upgrades. Every operation answers once what it queued is
//! durable.

use std::sync::Arc;
use std::time::Duration;
use tether_shared::ids::{AgentId, DeploymentId};

use actix::Addr;
use futures_util::stream::{self, StreamExt};
use tether_shared::protocol::{CommandBody, Operation};
use tether_shared::upgrade::component_signing_bytes;

use crate::api_error::ApiError;
use crate::deployments::model::Deployment;
use crate::deployments::{pick_pool, resolve_targets, Deployments, NewDeployment, Targets};
use crate::registry::{now_unix_ms, Registry};
use crate::session::agent_link::{AgentLink, AgentLinkError, DispatchJobs, QueueCommands};
use crate::session::session_registry::{GetLink, SessionRegistry};
use crate::trust::Trust;
use crate::upgrades::{AgentUpgrade, Package, UpgradeState, Upgrades};

/// Agents whose jobs one deployment queues at once.
const DISPATCH_CONCURRENCY: usize = 256;

/// Why work could not be queued to an agent's link.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The session registry or the agent's link stopped (the server is stopping).
    #[error("the agent's link is gone: {0}")]
    Mailbox(#[from] actix::MailboxError),
    /// The link refused or could not commit (a full backlog, a journal failure).
    #[error(transparent)]
    Link(#[from] AgentLinkError),
}

/// What [`Scheduler::queue_upgrade`] did.
pub enum Queued {
    /// The `Upgrade` command is journaled on the agent's link.
    Sent,
    /// An upgrade to this version is already underway or done (its state): left alone.
    Underway(Option<UpgradeState>),
    /// Not sent (why): the package is built for another architecture than the agent's.
    Refused(String),
}

/// Share as `Arc<Scheduler>`.
pub struct Scheduler {
    pub deployments: Arc<Deployments>,
    pub upgrades: Arc<Upgrades>,
    pub registry: Arc<Registry>,
    /// The agents' links.
    pub sessions: Addr<SessionRegistry>,
    /// Signs upgrade packages with the key in force.
    pub trust: Arc<Trust>,
    /// Who is connected (pools pick available agents first).
    pub presence: Arc<crate::session::Peers>,
    /// The links' work: remote operations' answers arrive there.
    pub sessions_work: Arc<crate::work::Work>,
}

impl Scheduler {
    /// Validates and stores deployment `new`, then has every target's link queue its job.
    /// Answers the id and the number of jobs once every job that may start now is durable.
    pub async fn start_deployment(
        &self,
        new: NewDeployment,
    ) -> Result<(DeploymentId, usize), ApiError> {
        let targets = self.resolve(&new.targets);
        let d = self.deployments.create(new, targets).await?;
        self.queue_jobs(&d).await
    }

    /// The agent ids `targets` name, by the registry's indexes; a pool (`count`) takes the
    /// available agents (connected, not in maintenance) first.
    fn resolve(&self, targets: &Targets) -> Result<Vec<AgentId>, String> {
        let (registry, presence) = (&self.registry, &self.presence);
        let ids = registry.with_index(|index| resolve_targets(targets, index))?;
        let available = |id: &AgentId| {
            presence.online_path(id).is_some_and(|path| {
                let (maintenance, _) = registry.dispatch_terms(id, &path);
                !maintenance
            })
        };
        pick_pool(
            ids,
            targets.count,
            &|id: &AgentId| registry.agent_name(id),
            &available,
        )
    }

    /// Runs deployment `id` again for the agents whose jobs did not succeed (see
    /// [`Deployments::retry`]): answers as [`Scheduler::start_deployment`] does.
    pub async fn retry_deployment(&self, id: &str) -> Result<(DeploymentId, usize), ApiError> {
        let registry = &self.registry;
        let d = self
            .deployments
            .retry(id, &|agent| registry.agent(agent).is_some())
            .await?;
        self.queue_jobs(&d).await
    }

    /// Has the link of every agent of stored deployment `d` queue its job: answers once every
    /// job that may start now is durable.
    async fn queue_jobs(&self, d: &Deployment) -> Result<(DeploymentId, usize), ApiError> {
        // Every agent's jobs are queued on its own link and committed there: many at once, so
        // that their commits share the journal's batches instead of waiting one after another.
        let results: Vec<(&AgentId, Result<(), SchedulerError>)> = stream::iter(&d.agents)
            .map(|agent_id| async move { (agent_id, self.dispatch(agent_id).await) })
            .buffer_unordered(DISPATCH_CONCURRENCY)
            .collect()
            .await;
        let mut failed = Vec::new();
        for (agent_id, result) in results {
            if let Err(e) = result {
                tracing::error!(deployment_id = %d.id, agent_id = %agent_id, error = %e, "job-dispatch-failed");
                failed.push(agent_id.to_string());
            }
        }
        failed.sort();
        if !failed.is_empty() {
            return Err(ApiError::Incomplete(format!(
                "deployment {} is stored, but the jobs of {} could not be queued yet; they are sent when the server restarts or the agent reconnects",
                d.id,
                failed.join(", ")
            )));
        }
        Ok((d.id.clone(), d.agents.len()))
    }

    /// Cancels deployment `id` and queues a CancelJob to every agent running one of its jobs.
    /// Answers how many were queued.
    pub async fn cancel_deployment(&self, id: &str) -> Result<usize, ApiError> {
        let remote = self.deployments.cancel(id).await?;
        let mut failed = Vec::new();
        for (agent_id, job_id) in &remote {
            let body = CommandBody::CancelJob {
                job_id: job_id.to_string(),
            };
            let queued = self.queue(agent_id, vec![body], Vec::new(), None).await;
            if let Err(e) = queued {
                tracing::error!(deployment_id = %id, agent_id = %agent_id, error = %e, "cancel-queue-failed");
                failed.push(agent_id.clone());
            }
        }
        if !failed.is_empty() {
            return Err(ApiError::Incomplete(format!(
                "the cancel could not be queued to {}; retry",
                failed.join(", ")
            )));
        }
        Ok(remote.len())
    }

    /// Queues an upgrade of `agent_id` to `package` on its link (journaled, so it reaches an
    /// offline agent when it returns), unless one to this version is underway or done. The
    /// command carries the package's signature by the key in force (it may have changed since
    /// the upload); the agent's upgrade state becomes `requested` in the same batch.
    pub async fn queue_upgrade(
        &self,
        agent_id: &AgentId,
        package: &Package,
    ) -> Result<Queued, SchedulerError> {
        let facts = self
            .registry
            .agent(agent_id)
            .map(|a| a.facts)
            .unwrap_or_default();
        if let Some(problem) = package.arch_problem(&facts) {
            tracing::warn!(agent_id = %agent_id, version = %package.version, reason = %problem, "upgrade-refused-architecture");
            return Ok(Queued::Refused(problem));
        }
        let current = self.upgrades.agent(agent_id);
        let settled = current.as_ref().is_some_and(|c| {
            c.version == package.version && (c.state.in_progress() || c.state == UpgradeState::Done)
        });
        if settled {
            let state = current.map(|c| c.state);
            tracing::info!(agent_id = %agent_id, version = %package.version, state = ?state, "upgrade-already-underway");
            return Ok(Queued::Underway(state));
        }
        let signature = self.trust.sign(&component_signing_bytes(
            package.component,
            &package.version,
            &package.sha256,
        ));
        let body = CommandBody::Upgrade {
            version: package.version.clone(),
            sha256: package.sha256.clone(),
            size: package.size,
            signature,
        };
        let record = AgentUpgrade {
            state: UpgradeState::Requested,
            version: package.version.clone(),
            reason: String::new(),
            updated_unix_ms: now_unix_ms(),
            rollout_id: String::new(),
        };
        let op = Upgrades::agent_op(agent_id, &record);
        let (upgrades, id) = (self.upgrades.clone(), agent_id.to_owned());
        let then: Box<dyn FnOnce() + Send> = Box::new(move || upgrades.set_agent(&id, record));
        self.queue(agent_id, vec![body], vec![op], Some(then))
            .await?;
        tracing::info!(agent_id = %agent_id, version = %package.version, "upgrade-queued");
        Ok(Queued::Sent)
    }

    /// Has `agent_id`'s link queue the jobs that may start now; resolves once they are durable.
    pub async fn dispatch(&self, agent_id: &AgentId) -> Result<(), SchedulerError> {
        let link = self.link(agent_id).await?;
        link.send(DispatchJobs).await??;
        Ok(())
    }

    /// Rolling deployments: each batch starts when the one before it ended (the agents the
    /// deployments layer wakes take their jobs), and a sweep every `sweep` catches a batch
    /// ended by anything else (a cancel, a deleted agent, a restart).
    pub async fn roll(self: Arc<Self>, sweep: Duration) {
        let sweeping = self.clone();
        actix_rt::spawn(async move {
            let mut tick = actix_rt::time::interval(sweep);
            loop {
                tick.tick().await;
                sweeping.deployments.sweep_rolling();
                if let Err(e) = sweeping.deployments.expire_overdue().await {
                    tracing::error!(error = %e, "deadline-expiry-failed");
                }
            }
        });
        loop {
            let woken = self.deployments.woken().await;
            // Many links at once, so that their commits share the journal's batches.
            stream::iter(&woken)
                .for_each_concurrent(DISPATCH_CONCURRENCY, |agent_id| {
                    let this = &self;
                    async move {
                        if let Err(e) = this.dispatch(agent_id).await {
                            tracing::warn!(agent_id = %agent_id, error = %e, "batch-dispatch-failed");
                        }
                    }
                })
                .await;
        }
    }

    /// Jobs journaled as queued but not yet sent (the server stopped first) go out now.
    pub async fn dispatch_waiting(&self) {
        for agent_id in self.deployments.agents_with_waiting_jobs() {
            if let Err(e) = self.dispatch(&agent_id).await {
                tracing::error!(agent_id = %agent_id, error = %e, "job-dispatch-failed");
            }
        }
    }

    async fn queue(
        &self,
        agent_id: &AgentId,
        bodies: Vec<CommandBody>,
        ops: Vec<tether_shared::journal::Op>,
        then: Option<Box<dyn FnOnce() + Send>>,
    ) -> Result<(), SchedulerError> {
        let link = self.link(agent_id).await?;
        link.send(QueueCommands {
            bodies,
            ops,
            then,
            deadline: None,
        })
        .await??;
        Ok(())
    }

    /// Asks agent `agent_id` for remote operation `op` (see `crate::operations`): answers its
    /// id once the command is journaled on the link. Refused for an agent whose release takes
    /// none; an agent not seen since start gets it if it comes back within the deadline.
    pub async fn operate(&self, agent_id: &AgentId, op: Operation) -> Result<String, ApiError> {
        let operations = self.sessions_work.operations();
        if operations.capable(agent_id) == Some(false) {
            return Err(ApiError::Conflict(
                "the agent's release takes no remote operations; upgrade it".into(),
            ));
        }
        let op_id = operations.begin(agent_id, op);
        let deadline =
            tether_shared::clock::now_unix_ms() + crate::operations::DEADLINE.as_millis() as u64;
        let link = self
            .link(agent_id)
            .await
            .map_err(|e| ApiError::Incomplete(format!("the operation could not be queued: {e}")))?;
        link.send(QueueCommands {
            bodies: vec![CommandBody::Operate {
                op_id: op_id.clone(),
                op,
            }],
            ops: Vec::new(),
            then: None,
            deadline: Some(deadline),
        })
        .await
        .map_err(|e| ApiError::Incomplete(format!("the operation could not be queued: {e}")))?
        .map_err(|e| ApiError::Incomplete(format!("the operation could not be queued: {e}")))?;
        tracing::info!(agent_id = %agent_id, op_id = %op_id, op = ?op, "operation-queued");
        Ok(op_id)
    }

    async fn link(&self, agent_id: &AgentId) -> Result<Addr<AgentLink>, SchedulerError> {
        let agent_id = agent_id.clone();
        Ok(self.sessions.send(GetLink { agent_id }).await??)
    }
}
