//! Work on an `AgentLink`: [`DispatchJobs`] (what `crate::work` says is ready: RunJob for the
//! agent's queued jobs, as far as its concurrency limit allows) and [`QueueCommands`] (any
//! commands the scheduler asks for: CancelJob, Upgrade). Both answer only once the commands
//! are durable; a dispatched job's `dispatched` mark is committed in the same batch as its
//! RunJob.

use actix::prelude::*;
use tether_shared::journal::Op;
use tether_shared::protocol::{CommandBody, Seq};

use super::{AgentLink, AgentLinkError};
use crate::deployments::{AgentTerms, Sealing};

/// Jobs taken: the last seq of their commands (none if every one failed instead of being
/// sent), and the ops to commit.
pub(super) type Taken = (Option<Seq>, Vec<Op>);

impl AgentLink {
    /// Takes the agent's jobs that may start now and numbers their RunJob commands: the last
    /// seq and the ops (commands + job marks) to commit, or `None` if nothing is waiting.
    /// (Jobs that could not be sent, failed instead, have only ops: `None` as the seq.)
    pub(super) fn take_jobs(&mut self) -> Result<Option<Taken>, AgentLinkError> {
        if self.remote() && self.remote_incarnation.is_none() {
            // Served elsewhere (or nowhere) and not heard of since this node started: what it
            // can take (its key for secrets, `run_as`) is not known yet. Its greeting, when it
            // (re)connects, dispatches its jobs.
            return Ok(None);
        }
        let sealing = match &self.sealing {
            None => Sealing::Unknown,
            Some(Err(why)) => Sealing::Unable(why),
            Some(Ok(sealer)) => Sealing::For(sealer),
        };
        let path = self
            .shared
            .presence
            .online_path(&self.agent_id)
            .unwrap_or_default();
        let (maintenance, max_running) = self.shared.registry.dispatch_terms(&self.agent_id, &path);
        let registry = &self.shared.registry;
        let values = || registry.placeholder_values(&self.agent_id);
        let terms = AgentTerms {
            sealing,
            agent: &values,
            runs_as: self.runs_as,
            maintenance,
            max_running,
        };
        let mut ready = self.shared.work.ready(&self.agent_id, terms);
        if ready.commands.is_empty() {
            return Ok((!ready.ops.is_empty()).then_some((None, ready.ops)));
        }
        match self.enqueue_until(std::mem::take(&mut ready.commands), &ready.deadlines) {
            Ok((last, mut ops)) => {
                ops.append(&mut ready.ops);
                tracing::info!(agent_id = %self.agent_id, jobs = ready.job_ids.len(), seq = last.0, "jobs-dispatched");
                Ok(Some((Some(last), ops)))
            }
            Err(e) => {
                self.shared.work.undo(&ready);
                Err(e)
            }
        }
    }

    /// Dispatches what may start now, in the background (after a handshake).
    pub(super) fn dispatch_jobs(&mut self, ctx: &mut Context<Self>) {
        match self.take_jobs() {
            Ok(Some((last, ops))) => self.commit_then(ctx, ops, move |act, _| {
                if let Some(last) = last {
                    act.ep.outbound.mark_durable(last);
                    act.pump();
                }
            }),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(agent_id = %self.agent_id, error = %e, "job-dispatch-failed")
            }
        }
    }
}

/// Queue these commands; answered with the last seq once they are durable.
#[derive(Message)]
#[rtype(result = "Result<Seq, AgentLinkError>")]
pub struct QueueCommands {
    pub bodies: Vec<CommandBody>,
    /// Committed in the commands' batch (the state they put something in).
    pub ops: Vec<Op>,
    /// Run once they are durable, before they are sent (the same state, in memory).
    pub then: Option<Box<dyn FnOnce() + Send>>,
    /// Valid until then (Unix ms); `None`: the default (24 h).
    pub deadline: Option<u64>,
}

impl Handler<QueueCommands> for AgentLink {
    type Result = ResponseActFuture<Self, Result<Seq, AgentLinkError>>;

    fn handle(&mut self, msg: QueueCommands, _: &mut Self::Context) -> Self::Result {
        if msg.bodies.is_empty() {
            return Box::pin(fut::ready(Ok(self.ep.outbound.assigned())));
        }
        let deadlines = vec![msg.deadline; msg.bodies.len()];
        match self.enqueue_until(msg.bodies, &deadlines) {
            Ok((last, mut ops)) => {
                ops.extend(msg.ops);
                self.commit_queued(last, ops, msg.then)
            }
            Err(e) => Box::pin(fut::ready(Err(e))),
        }
    }
}

/// Send RunJob for this agent's queued jobs, up to its limit of unfinished jobs; answered
/// once they are durable (with the last seq assigned so far).
#[derive(Message)]
#[rtype(result = "Result<Seq, AgentLinkError>")]
pub struct DispatchJobs;

impl Handler<DispatchJobs> for AgentLink {
    type Result = ResponseActFuture<Self, Result<Seq, AgentLinkError>>;

    fn handle(&mut self, _: DispatchJobs, ctx: &mut Self::Context) -> Self::Result {
        if self.shared.work.is_stale(&self.agent_id) {
            // A commit of this agent was refused: its jobs are read again first, and what may
            // start is dispatched then.
            self.refresh_jobs(ctx);
            return Box::pin(fut::ready(Ok(self.ep.outbound.assigned())));
        }
        match self.take_jobs() {
            Ok(Some((last, ops))) => {
                let last = last.unwrap_or_else(|| self.ep.outbound.assigned());
                self.commit_queued(last, ops, None)
            }
            // A dispatch of this agent's jobs may still be committing (after a handshake or a
            // finished job): an empty commit resolves after it, as commits apply in order.
            Ok(None) => {
                let last = self.ep.outbound.assigned();
                self.commit_queued(last, Vec::new(), None)
            }
            Err(e) => Box::pin(fut::ready(Err(e))),
        }
    }
}
