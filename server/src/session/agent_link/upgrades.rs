//! Upgrades on an `AgentLink`: [`QueueUpgrade`] numbers, signs and journals an `Upgrade`
//! command together with the agent's new upgrade state (`requested`), in one batch; the
//! agent's upgrade events move that state through `SessionShared::upgrades` (see
//! `AgentLink::effect_ops`).

use actix::prelude::*;
use tether_shared::protocol::{CommandBody, Seq};
use tether_shared::upgrade::component_signing_bytes;

use super::{AgentLink, LinkError};
use crate::registry::now_unix_ms;
use crate::upgrades::{AgentUpgrade, Package, UpgradeState, Upgrades};

/// Queue an `Upgrade` to `package` for this agent; answered with its seq once it is durable.
#[derive(Message)]
#[rtype(result = "Result<Seq, LinkError>")]
pub struct QueueUpgrade {
    pub package: Package,
}

impl Handler<QueueUpgrade> for AgentLink {
    type Result = ResponseActFuture<Self, Result<Seq, LinkError>>;

    fn handle(&mut self, msg: QueueUpgrade, _: &mut Self::Context) -> Self::Result {
        let p = msg.package;
        // Signed now, by the key in force (it may have changed since the upload).
        let signature =
            self.shared
                .trust
                .sign(&component_signing_bytes(p.component, &p.version, &p.sha256));
        let body = CommandBody::Upgrade {
            version: p.version.clone(),
            sha256: p.sha256,
            size: p.size,
            signature,
        };
        let (last, mut ops) = match self.enqueue(vec![body]) {
            Ok(queued) => queued,
            Err(e) => return Box::pin(fut::ready(Err(e))),
        };
        let record = AgentUpgrade {
            state: UpgradeState::Requested,
            version: p.version,
            reason: String::new(),
            updated_unix_ms: now_unix_ms(),
            rollout_id: String::new(),
        };
        ops.push(Upgrades::agent_op(&self.agent_id, &record));
        let commit = self.shared.journal.commit(ops);
        Box::pin(commit.into_actor(self).map(move |res, act, ctx| match res {
            Ok(_) => {
                act.ep.outbound.mark_durable(last);
                act.shared.upgrades.set_agent(&act.agent_id, record);
                act.pump();
                Ok(last)
            }
            Err(e) => {
                act.fail(ctx, &e);
                Err(e.into())
            }
        }))
    }
}
