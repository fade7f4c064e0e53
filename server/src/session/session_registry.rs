//! `SessionRegistry`: which agent has which `AgentLink`.
//!
//! Links are created on first need (a connection, or a command queued for an offline agent)
//! from the journal, and live as long as the server. Which session is current is presence's
//! ([`crate::presence`]): a new session for an agent claims it there and the previous one is
//! told to close — newest wins, deterministically — and the link ignores anything still
//! arriving from the old connection (its frames carry the old `ConnId`).

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use tether_shared::close::CloseCode;
use tether_shared::enroll::Role;
use tether_shared::ids::AgentId;
use tether_shared::stream::ConnId;

use crate::session::agent_link::{AgentLink, AgentLinkError, Detach};
use crate::session::handle::SessionHandle;
use crate::session::relay_session::{FromRelayInbox, GreetRelaysAgain, RelayMail, RemoteRelays};
use crate::session::{Holder, SessionShared};

/// One agent's entry.
struct Entry {
    link: Addr<AgentLink>,
    /// Times the link died (a journal failure stops it) and was rebuilt from the journal.
    restarts: u64,
}

pub struct SessionRegistry {
    shared: Arc<SessionShared>,
    agents: HashMap<AgentId, Entry>,
    /// On the active node of a cluster whose nodes all serve agents: the relays members carry.
    relays: Option<Addr<RemoteRelays>>,
}

impl SessionRegistry {
    pub fn new(shared: Arc<SessionShared>) -> Self {
        SessionRegistry {
            relays: shared
                .has_members
                .then(|| RemoteRelays::new(shared.clone()).start()),
            shared,
            agents: HashMap::new(),
        }
    }

    fn entry(&mut self, agent_id: &AgentId) -> Result<&mut Entry, AgentLinkError> {
        // A link that died (its journal failed) is rebuilt from the journal.
        let dead = self
            .agents
            .get(agent_id)
            .filter(|e| !e.link.connected())
            .map(|e| e.restarts + 1);
        if dead.is_some() || !self.agents.contains_key(agent_id) {
            let link = AgentLink::recover(agent_id, self.shared.clone())?.start();
            let restarts = dead.unwrap_or(0);
            if restarts > 0 {
                tracing::warn!(agent_id = %agent_id, restarts, "link-rebuilt");
            }
            self.agents
                .insert(agent_id.clone(), Entry { link, restarts });
        }
        self.agents
            .get_mut(agent_id)
            .ok_or_else(|| AgentLinkError::Internal("entry vanished".into()))
    }
}

impl Actor for SessionRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(16_384);
    }
}

/// An authenticated session takes over its agent; answers the agent's link.
#[derive(Message)]
#[rtype(result = "Result<Addr<AgentLink>, AgentLinkError>")]
pub struct RegisterSession {
    pub agent_id: AgentId,
    pub conn: ConnId,
    pub session: SessionHandle,
}

impl Handler<RegisterSession> for SessionRegistry {
    type Result = Result<Addr<AgentLink>, AgentLinkError>;

    fn handle(&mut self, msg: RegisterSession, _: &mut Self::Context) -> Self::Result {
        if self
            .shared
            .drained
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // Its upgrade came in just before the drain.
            return Err(AgentLinkError::Internal(
                "this node was drained: connect to another node".into(),
            ));
        }
        let link = self.entry(&msg.agent_id)?.link.clone();
        let claim = Holder::Agent(msg.session);
        let presence = &self.shared.presence;
        if let Some(Holder::Agent(old)) = presence.claim(&msg.agent_id, msg.conn, claim) {
            tracing::info!(agent_id = %msg.agent_id, conn = msg.conn.0, "session-replaced");
            old.replaced();
        }
        Ok(link)
    }
}

/// A session ended; the agent is offline unless a newer session already took over.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionEnded {
    pub agent_id: AgentId,
    pub conn: ConnId,
}

impl Handler<SessionEnded> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: SessionEnded, _: &mut Self::Context) {
        if !self.shared.presence.release(&msg.agent_id, msg.conn) {
            return;
        }
        // Covers a session that died while attaching, before the link knew it.
        if let Some(entry) = self.agents.get(&msg.agent_id) {
            entry.link.do_send(Detach { conn: msg.conn });
        }
        tracing::info!(agent_id = %msg.agent_id, conn = msg.conn.0, "agent-offline");
    }
}

/// The link of an agent (created if needed), e.g. to queue commands while it is offline.
#[derive(Message)]
#[rtype(result = "Result<Addr<AgentLink>, AgentLinkError>")]
pub struct GetLink {
    pub agent_id: AgentId,
}

impl Handler<GetLink> for SessionRegistry {
    type Result = Result<Addr<AgentLink>, AgentLinkError>;

    fn handle(&mut self, msg: GetLink, _: &mut Self::Context) -> Self::Result {
        Ok(self.entry(&msg.agent_id)?.link.clone())
    }
}

/// Inbox or mailbox entries of an agent (see `crate::mail`), for its link: inbox entries make
/// the link if need be (the active node works for every agent), mailbox entries go only to a
/// link this node has (a member numbers commands only for the agents it serves).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    pub agent_id: AgentId,
    pub entries: Vec<(String, Vec<u8>)>,
    /// With mailbox entries: the records of the agent's command stream read with them, and
    /// when that read began.
    pub records: Vec<tether_shared::journal::Record>,
    pub read_at: std::time::Instant,
    pub inbox: bool,
}

impl Handler<Deliver> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: Deliver, _: &mut Self::Context) {
        use crate::session::agent_link::{FromInbox, FromMailbox};
        let role = self.shared.registry.agent(&msg.agent_id).map(|a| a.role);
        if msg.inbox && role.is_none() {
            // An agent deleted (or never enrolled): nothing of it takes effect, and its rows go.
            tracing::warn!(agent_id = %msg.agent_id, rows = msg.entries.len(), "inbox-of-an-unknown-agent-purged");
            let journal = self.shared.journal.clone();
            actix::spawn(async move { crate::mail::purge(&journal, &msg.agent_id).await });
        } else if role == Some(Role::Relay) {
            self.deliver_to_relay(msg);
        } else if msg.inbox {
            match self.entry(&msg.agent_id) {
                Ok(entry) => entry.link.do_send(FromInbox {
                    entries: msg.entries,
                    read_at: msg.read_at,
                }),
                Err(e) => {
                    tracing::error!(agent_id = %msg.agent_id, error = %e, "inbox-not-delivered")
                }
            }
        } else if let Some(entry) = self.agents.get(&msg.agent_id) {
            entry.link.do_send(FromMailbox {
                entries: msg.entries,
                records: msg.records,
                read_at: msg.read_at,
            });
        }
    }
}

impl SessionRegistry {
    /// Relay rows: on the active node its inbox's, on a member its mailbox's (for the link
    /// that carries it here, if one does).
    fn deliver_to_relay(&self, msg: Deliver) {
        let relay_id = msg.agent_id.to_string();
        if msg.inbox {
            if let Some(relays) = &self.relays {
                relays.do_send(FromRelayInbox {
                    relay_id,
                    entries: msg.entries,
                });
            }
            return;
        }
        let Some(path) = self.shared.presence.online_path(&relay_id) else {
            return;
        };
        // The link of the relay nearest this node on its path.
        let holder = path.last().map_or(relay_id.as_str(), String::as_str);
        if let Some(link) = self.shared.presence.relay_link(holder) {
            link.do_send(RelayMail {
                relay_id,
                entries: msg.entries,
            });
        }
    }
}

/// On a member: every link with a session greets the active node again (see
/// `crate::mail::greet_each_active_node`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct GreetAgain;

impl Handler<GreetAgain> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, _: GreetAgain, _: &mut Self::Context) {
        for entry in self.agents.values() {
            entry.link.do_send(crate::session::agent_link::GreetAgain);
        }
        for (_, link) in self.shared.presence.relay_links() {
            link.do_send(GreetRelaysAgain);
        }
    }
}

/// On the active node, after a step of a key rollover: every agent's link offers the set in
/// force to its agent if it holds an older one.
#[derive(Message)]
#[rtype(result = "()")]
pub struct OfferTrustToAll;

impl Handler<OfferTrustToAll> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, _: OfferTrustToAll, _: &mut Self::Context) {
        for entry in self.agents.values() {
            entry.link.do_send(crate::session::agent_link::OfferTrust);
        }
    }
}

/// Every link, for health and metrics.
#[derive(Message)]
#[rtype(result = "ListedLinks")]
pub struct ListLinks;

/// Every agent's link, with how often it was rebuilt.
pub struct ListedLinks {
    pub links: Vec<(AgentId, Addr<AgentLink>, u64)>,
}

impl Handler<ListLinks> for SessionRegistry {
    type Result = MessageResult<ListLinks>;

    fn handle(&mut self, _: ListLinks, _: &mut Self::Context) -> Self::Result {
        let links = self
            .agents
            .iter()
            .map(|(id, e)| (id.clone(), e.link.clone(), e.restarts))
            .collect();
        MessageResult(ListedLinks { links })
    }
}

/// The agent was deleted: its current session (if any) is closed with a policy-violation code.
/// Its next handshake is refused by the identity check, since its record is gone.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct DisconnectAgent {
    pub agent_id: AgentId,
    /// Said in the close frame.
    pub reason: String,
}

impl Handler<DisconnectAgent> for SessionRegistry {
    type Result = bool;

    fn handle(&mut self, msg: DisconnectAgent, _: &mut Self::Context) -> bool {
        // The entry keeps the session: its end (`SessionEnded`) detaches it from the link.
        let Some((conn, session)) = self.shared.presence.session(&msg.agent_id) else {
            return false;
        };
        session.close(
            CloseCode::Refused,
            tether_shared::protocol::ErrorCode::Unauthorized,
            msg.reason,
        );
        tracing::info!(agent_id = %msg.agent_id, conn = conn.0, "agent-disconnected");
        true
    }
}

/// The server is stopping: every agent's current session is closed now (1001, "going away"),
/// instead of the listeners waiting for them until their shutdown timeout. Agents reconnect
/// (to another upstream, or to this server when it is back) and resume from their journals.
/// Answers how many sessions were closed.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CloseAllSessions;

impl Handler<CloseAllSessions> for SessionRegistry {
    type Result = usize;

    fn handle(&mut self, _: CloseAllSessions, _: &mut Self::Context) -> usize {
        let sessions = self.shared.presence.sessions();
        for session in &sessions {
            session.close(
                CloseCode::GoingAway,
                tether_shared::protocol::ErrorCode::Overloaded,
                "server stopping".into(),
            );
        }
        sessions.len()
    }
}
