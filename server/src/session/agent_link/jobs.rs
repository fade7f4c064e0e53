//! Commands of the job layer on an `AgentLink`: [`QueueCommands`] (any commands, e.g.
//! CancelJob) and [`DispatchJobs`] (RunJob for the agent's queued jobs, as far as its
//! concurrency limit allows). Both answer only once the commands are durable; a dispatched
//! job's `dispatched` mark is committed in the same batch as its RunJob.

use actix::prelude::*;
use tether_shared::journal::Op;
use tether_shared::protocol::{CommandBody, Seq};

use super::{AgentLink, LinkError};

impl AgentLink {
    /// Takes the agent's jobs that may start now and numbers their RunJob commands: the last
    /// seq and the ops (commands + job marks) to commit, or `None` if nothing is waiting.
    pub(super) fn take_jobs(&mut self) -> Result<Option<(Seq, Vec<Op>)>, LinkError> {
        let (ids, bodies, marks) = self.shared.deployments.take_ready(&self.agent_id);
        if bodies.is_empty() {
            return Ok(None);
        }
        match self.enqueue(bodies) {
            Ok((last, mut ops)) => {
                ops.extend(marks);
                tracing::info!(agent_id = %self.agent_id, jobs = ids.len(), seq = last.0, "jobs-dispatched");
                Ok(Some((last, ops)))
            }
            Err(e) => {
                self.shared.deployments.undo_dispatch(&ids);
                Err(e)
            }
        }
    }

    /// Dispatches what may start now, in the background (after a handshake).
    pub(super) fn dispatch_jobs(&mut self, ctx: &mut Context<Self>) {
        match self.take_jobs() {
            Ok(Some((last, ops))) => self.commit_then(ctx, ops, move |act, _| {
                act.ep.outbound.mark_durable(last);
                act.pump();
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
#[rtype(result = "Result<Seq, LinkError>")]
pub struct QueueCommands {
    pub bodies: Vec<CommandBody>,
}

impl Handler<QueueCommands> for AgentLink {
    type Result = ResponseActFuture<Self, Result<Seq, LinkError>>;

    fn handle(&mut self, msg: QueueCommands, _: &mut Self::Context) -> Self::Result {
        if msg.bodies.is_empty() {
            return Box::pin(fut::ready(Ok(self.ep.outbound.assigned())));
        }
        match self.enqueue(msg.bodies) {
            Ok((last, ops)) => self.commit_queued(last, ops),
            Err(e) => Box::pin(fut::ready(Err(e))),
        }
    }
}

/// Send RunJob for this agent's queued jobs, up to its limit of unfinished jobs; answered
/// once they are durable (with the last seq assigned so far).
#[derive(Message)]
#[rtype(result = "Result<Seq, LinkError>")]
pub struct DispatchJobs;

impl Handler<DispatchJobs> for AgentLink {
    type Result = ResponseActFuture<Self, Result<Seq, LinkError>>;

    fn handle(&mut self, _: DispatchJobs, _: &mut Self::Context) -> Self::Result {
        match self.take_jobs() {
            Ok(Some((last, ops))) => self.commit_queued(last, ops),
            // A dispatch of this agent's jobs may still be committing (after a handshake or a
            // finished job): an empty commit resolves after it, as commits apply in order.
            Ok(None) => {
                let last = self.ep.outbound.assigned();
                self.commit_queued(last, Vec::new())
            }
            Err(e) => Box::pin(fut::ready(Err(e))),
        }
    }
}
