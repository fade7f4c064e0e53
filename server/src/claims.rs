//! This node's claims on the agents it serves, on a cluster on PostgreSQL.
//!
//! A verified handshake claims its agent before the link commits anything for it: the claim is
//! kept if this node holds it already (another session of the agent here), raised if another
//! node (or none) held it. Every commit of the agent's link then carries the claim as its fence
//! (see `tether_shared::journal::Fence`), so once a newer session claimed the agent elsewhere
//! this node commits nothing more for it and closes its session. On sled there are no claims:
//! one process serves every agent.

use std::future::Future;
use std::sync::Arc;

use tether_shared::ids::AgentId;
use tether_shared::journal::{Fence, JournalError, PgStore};

/// The claims this node makes; share by clone.
#[derive(Clone)]
pub struct Claims {
    store: Arc<PgStore>,
    node: Arc<str>,
}

impl Claims {
    pub fn new(store: Arc<PgStore>, node: &str) -> Claims {
        Claims {
            store,
            node: node.into(),
        }
    }

    /// Claims `agent_id` for this node, keeping `held` if this node still holds it at that
    /// epoch; resolves once the claim is durable.
    pub fn claim(
        &self,
        agent_id: &AgentId,
        held: Option<&Fence>,
    ) -> impl Future<Output = Result<Fence, JournalError>> + Send + 'static {
        self.store
            .claiming(agent_id.as_str(), &self.node, held.map(|f| f.epoch))
    }

    /// Raises `claim` (whoever held it) for this node: commits under any earlier epoch of it
    /// write nothing from now on (see `crate::mail::out_claim`).
    pub fn raise(
        &self,
        claim: &str,
    ) -> impl Future<Output = Result<Fence, JournalError>> + Send + 'static {
        self.store.claiming(claim, &self.node, None)
    }

    /// This node's name in its claims.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The epoch `agent_id` is claimed at now (0: never claimed), and whether another node
    /// holds that claim; blocking.
    pub fn held_now(&self, agent_id: &AgentId) -> Result<(u64, bool), JournalError> {
        Ok(self
            .store
            .claim_holder(agent_id.as_str())?
            .map_or((0, false), |(node, epoch)| (epoch, *node != *self.node)))
    }

    /// Forgets the claims of deleted agent `agent_id`, on it and on its stream (one row per
    /// agent ever served would otherwise stay).
    pub fn forget(
        &self,
        agent_id: &AgentId,
    ) -> impl Future<Output = Result<(), JournalError>> + Send + 'static {
        let agent = self.store.forget_claim(agent_id.as_str());
        let stream = self.store.forget_claim(&crate::mail::out_claim(agent_id));
        async move {
            agent.await?;
            stream.await
        }
    }
}
