//! What an agent's link asks of the work it carries, and nothing more: events in (their
//! journal ops, and whether a job slot came free), ready work out (the commands that may be
//! sent now and the ops that mark them sent). A link knows no deployment and no upgrade; the
//! scheduler (`crate::scheduler`) offers everything else to the operators' surface.
//!
//! `RunJob` commands are made in exactly one place, [`Work::ready`], which a link calls when
//! it may send: after its handshake, after one of its jobs ended, and when the scheduler
//! wakes it (a new deployment, a restart with jobs waiting).

use std::sync::Arc;
use tether_shared::ids::AgentId;

use tether_shared::journal::Op;
use tether_shared::protocol::{CommandBody, EventBody};

use crate::deployments::{AgentTerms, Deployments};
use crate::operations::Operations;
use crate::presence::Sightings;
use crate::reconcile::Reconciliations;
use crate::upgrades::Upgrades;

/// The job and upgrade layers, as links see them; share as `Arc<Work>`.
pub struct Work {
    deployments: Arc<Deployments>,
    upgrades: Arc<Upgrades>,
    reconciliations: Arc<Reconciliations>,
    operations: Arc<Operations>,
    /// Who is connected through which relays, and what relays report of their links.
    presence: Arc<dyn Sightings + Send + Sync>,
    /// Agents whose jobs are to be read again before their next handshake (see
    /// [`Work::mark_stale`]); at most one entry per agent.
    stale: std::sync::Mutex<std::collections::HashSet<AgentId>>,
}

/// What an event changes.
#[derive(Debug, Default)]
pub struct EventEffect {
    /// Committed in the event's batch.
    pub ops: Vec<Op>,
    /// One of the agent's jobs ended: another may be sent now.
    pub slot_freed: bool,
}

/// Work an agent may be sent now.
#[derive(Debug, Default)]
pub struct Ready {
    /// What it is (for [`Work::undo`] if the commands cannot be queued).
    pub job_ids: Vec<tether_shared::ids::JobId>,
    pub commands: Vec<CommandBody>,
    /// Each command's deadline (Unix ms): its deployment's, if it has one.
    pub deadlines: Vec<Option<u64>>,
    /// Marks it sent; committed with the commands.
    pub ops: Vec<Op>,
}

impl Work {
    pub fn new(
        deployments: Arc<Deployments>,
        upgrades: Arc<Upgrades>,
        reconciliations: Arc<Reconciliations>,
        presence: Arc<dyn Sightings + Send + Sync>,
    ) -> Work {
        Work {
            deployments,
            upgrades,
            reconciliations,
            operations: Arc::default(),
            presence,
            stale: Default::default(),
        }
    }

    /// A ping's hops to `agent_id`, from its path now, its relays' heartbeats and its answer.
    fn hops(&self, agent_id: &AgentId, answer: &str) -> Vec<crate::operations::Hop> {
        let agent_rtt = serde_json::from_str::<serde_json::Value>(answer)
            .ok()
            .and_then(|v| v["uplink_rtt_us"].as_u64());
        let relay_rtt = |relay: &str| {
            let status = self.presence.seen(relay).reported?;
            status.figures?.uplink_rtt_us
        };
        let path = self.presence.seen(agent_id).path;
        crate::operations::hops(agent_id, &path, relay_rtt, agent_rtt)
    }

    /// Remote operations and their answers.
    pub fn operations(&self) -> &Arc<Operations> {
        &self.operations
    }

    /// What agents' reports after a restore found.
    pub fn reconciliations(&self) -> &Arc<Reconciliations> {
        &self.reconciliations
    }

    /// The link of `agent_id` found this server behind the agent (restored from a backup):
    /// the record's op joins the handshake's batch. `reports`: the agent was asked for its jobs.
    pub fn on_behind(
        &self,
        agent_id: &AgentId,
        events_lost: u64,
        commands_lost: u64,
        reports: bool,
    ) -> Op {
        let now = tether_shared::clock::now_unix_ms();
        self.reconciliations
            .detected(agent_id, events_lost, commands_lost, reports, now)
    }

    /// The effect of an event of `agent_id` about its jobs or its upgrade; `None` for any
    /// other event (the link's own: probes, trust, expiries).
    pub fn on_event(&self, agent_id: &AgentId, body: &EventBody) -> Option<EventEffect> {
        match body {
            EventBody::UpgradeStarted { .. }
            | EventBody::UpgradeStaged { .. }
            | EventBody::UpgradeRefused { .. }
            | EventBody::UpgradeFinished { .. } => Some(EventEffect {
                ops: self.upgrades.on_event(agent_id, body).into_iter().collect(),
                slot_freed: false,
            }),
            EventBody::JobAccepted { .. }
            | EventBody::StepStarted { .. }
            | EventBody::StepOutput { .. }
            | EventBody::StepFinished { .. }
            | EventBody::JobFinished { .. } => {
                let effect = self.deployments.on_event(agent_id, body);
                Some(EventEffect {
                    ops: effect.ops,
                    slot_freed: effect.job_finished,
                })
            }
            EventBody::JobReport(report) => {
                let now = tether_shared::clock::now_unix_ms();
                match self.deployments.on_report(agent_id, report) {
                    Some(effect) => {
                        let mut ops = effect.ops;
                        if !ops.is_empty() {
                            tracing::info!(agent_id = %agent_id, job_id = %report.job_id, "job-brought-up-to-date");
                            ops.extend(self.reconciliations.updated(agent_id));
                        }
                        Some(EventEffect {
                            ops,
                            slot_freed: effect.job_finished,
                        })
                    }
                    None => Some(EventEffect {
                        ops: self.reconciliations.orphan(agent_id, report, now),
                        slot_freed: false,
                    }),
                }
            }
            EventBody::OperationResult {
                op_id,
                ok,
                data,
                message,
            } => {
                self.operations
                    .complete(agent_id, op_id, *ok, data, message, |answer| {
                        self.hops(agent_id, answer)
                    });
                Some(EventEffect::default())
            }
            EventBody::JobsReported { jobs, omitted } => {
                tracing::info!(agent_id = %agent_id, jobs, omitted, "agent-jobs-reported");
                Some(EventEffect {
                    ops: self
                        .reconciliations
                        .reported(agent_id, *jobs, *omitted)
                        .into_iter()
                        .collect(),
                    slot_freed: false,
                })
            }
            _ => None,
        }
    }

    /// `agent_id` lost its state (a new journal): what it was running has failed.
    pub fn on_reset(&self, agent_id: &AgentId) -> Vec<Op> {
        self.deployments.on_agent_reset(agent_id)
    }

    /// The jobs `agent_id` may start now, marked sent, their secrets sealed for the agent.
    /// None while the agent is in maintenance (see `Deployments::take_ready`).
    pub fn ready(&self, agent_id: &AgentId, terms: AgentTerms<'_>) -> Ready {
        let (job_ids, commands, ops) = self.deployments.take_ready(agent_id, terms);
        let deadlines = job_ids
            .iter()
            .map(|id| self.deployments.deadline_of(id))
            .collect();
        Ready {
            job_ids,
            commands,
            deadlines,
            ops,
        }
    }

    /// The commands of `ready` could not be queued: its jobs wait again.
    pub fn undo(&self, ready: &Ready) {
        self.deployments.undo_dispatch(&ready.job_ids);
    }

    /// Another node served `agent_id` meanwhile: its jobs are read again from the journal.
    pub fn reload_agent(
        &self,
        agent_id: &AgentId,
    ) -> impl std::future::Future<Output = Result<usize, crate::deployments::DeploymentsError>>
    {
        self.deployments.clone().reload_jobs_of(agent_id.clone())
    }

    /// A commit for `agent_id` was fenced: what this node holds of its jobs may be ahead of the
    /// journal until they are read again, which its next handshake here waits for.
    pub fn mark_stale(&self, agent_id: &AgentId) {
        self.stale
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(agent_id.clone());
    }

    /// Whether `agent_id`'s jobs are to be read again: until they are, nothing may act on
    /// them (what this node holds may be ahead of the journal).
    pub fn is_stale(&self, agent_id: &AgentId) -> bool {
        self.stale
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(agent_id)
    }

    /// Whether `agent_id`'s jobs must be read again (and forgets it).
    pub fn take_stale(&self, agent_id: &AgentId) -> bool {
        self.stale
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(agent_id)
    }
}
