//! Agent sessions on the server: the WebSocket edge and the per-agent stream state behind it.
//!
//! - [`agent_session`]: `AgentSession`, one actor per WebSocket: challenge, signature check,
//!   heartbeats, offline detection, frame I/O. Holds no stream state.
//! - [`agent_link`]: `AgentLink`, one actor per known agent: both message streams (the sans-IO
//!   core fed from the journal), commits before acks, resync at every handshake. It outlives
//!   sessions, so a reconnect (or a replacing connection) resumes exactly where the journal is.
//! - [`session_registry`]: `SessionRegistry`, which agent has which link and which session;
//!   a second connection for an agent replaces the first.
//! - [`relay_session`]: `RelaySession`, one actor per relay link: the relay's own handshake,
//!   then every agent it carries as a channel, each authenticated end to end.
//! - [`handshake`]: what both session kinds share (nonce, identity check, attach, handle).
//! - [`probes`]: numbered test messages both ways, checked for exactly-once in-order delivery.
//! - [`source_slots`]: handshakes in flight per source address (one address, half at most).

pub mod agent_link;
pub mod agent_session;
pub mod greeting;
pub mod handle;
pub mod handshake;
pub mod handshake_counts;
pub mod probes;
pub mod relay_session;
pub mod routes;
pub mod session_registry;
pub mod source_slots;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;
use tether_shared::ids::AgentId;

use tether_shared::journal::JournalHandle;
use tether_shared::stream::ConnId;

use crate::presence::Presence;
use crate::registry::Registry;
use crate::upgrades::Upgrades;

/// What holds a peer's current connection.
#[derive(Clone)]
pub enum Holder {
    /// An agent's session: its WebSocket here, or its channel on a relay's link.
    Agent(handle::SessionHandle),
    /// A relay's own link to us.
    Relay(actix::Addr<relay_session::RelaySession>),
}

/// Who is connected now, on which connection.
pub type Peers = Presence<Holder>;

impl Presence<Holder> {
    /// The agent's current session.
    pub fn session(&self, agent_id: &AgentId) -> Option<(ConnId, handle::SessionHandle)> {
        match self.current(agent_id)? {
            (conn, Holder::Agent(session)) => Some((conn, session)),
            (_, Holder::Relay(_)) => None,
        }
    }

    /// Every agent's current session.
    pub fn sessions(&self) -> Vec<handle::SessionHandle> {
        self.holders()
            .into_iter()
            .filter_map(|(_, h)| match h {
                Holder::Agent(session) => Some(session),
                Holder::Relay(_) => None,
            })
            .collect()
    }

    /// The relay's own link, if it is connected to us directly.
    pub fn relay_link(&self, relay_id: &str) -> Option<actix::Addr<relay_session::RelaySession>> {
        match self.current(relay_id)? {
            (_, Holder::Relay(link)) => Some(link),
            (_, Holder::Agent(_)) => None,
        }
    }

    /// Every relay link, by relay id.
    pub fn relay_links(&self) -> Vec<(String, actix::Addr<relay_session::RelaySession>)> {
        self.holders()
            .into_iter()
            .filter_map(|(id, h)| match h {
                Holder::Relay(link) => Some((id, link)),
                Holder::Agent(_) => None,
            })
            .collect()
    }
}

/// Everything sessions and links share, built once at start.
pub struct SessionShared {
    pub journal: JournalHandle,
    pub registry: Arc<Registry>,
    /// The work agents carry (jobs, upgrades): their events change it in the event's batch,
    /// and it says what may be sent.
    pub work: Arc<crate::work::Work>,
    /// Relays' upgrade states (relays' own upgrades; agents' go through `work`).
    pub upgrades: Arc<Upgrades>,
    /// The command-signing key in force, and what agents and relays should trust.
    pub trust: Arc<crate::trust::Trust>,
    /// The journal's incarnation, announced in every Welcome.
    pub incarnation: String,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// Time an agent has to answer the challenge.
    pub handshake_timeout: Duration,
    /// Handshakes in progress now, and the most allowed (past it: `Busy`).
    pub handshakes: AtomicUsize,
    pub max_handshakes: usize,
    /// Handshakes in progress per source address (past half the most: `Busy` for it).
    pub sources: Arc<source_slots::SourceSlots>,
    /// Who is connected now, through which path, on which connection.
    pub presence: Arc<Peers>,
    /// Relays' certificates, renewed over their links.
    pub relay_certs: Arc<crate::relay_certs::RelayCerts>,
    /// Connection ids handed out so far.
    pub next_conn: AtomicU64,
    /// Stream tuning: in flight per direction, retained per agent, retransmit timeout.
    pub window: u64,
    pub max_retained: usize,
    pub rto: Duration,
    /// Handshakes and refusals by reason, for `/metrics`.
    pub handshake_counts: Arc<handshake_counts::HandshakeCounts>,
    /// On a cluster: the claims that fence each link's commits (see `crate::claims`).
    pub claims: Option<crate::claims::Claims>,
    /// On a cluster whose nodes all serve agents: this node is a member, not the active node
    /// (see `crate::mail`).
    pub member: bool,
    /// This node is the active node of a cluster whose other nodes serve agents too: the
    /// commands of an agent it does not serve go to the mailbox.
    pub has_members: bool,
    /// The lease epoch of this active node: its mailbox rows sort after every earlier one's.
    pub mail_epoch: u64,
    /// On a member: the active node takes the events members carry (it says so in the
    /// journal, see `crate::mail::ACTIVE_TAKES_MEMBERS`); a member serves agents only then.
    pub active_takes_members: std::sync::atomic::AtomicBool,
    /// On a member: the active node answers the enrollments members forward (see
    /// `crate::member_enroll`; an active node of an earlier release does not).
    pub active_takes_enrollments: std::sync::atomic::AtomicBool,
    /// On a member: the active node writes the commands of the agents members serve into
    /// their streams itself (see `crate::mail::ACTIVE_APPENDS`; one of an earlier release
    /// puts them in the mailbox, for the member to number).
    pub active_appends: std::sync::atomic::AtomicBool,
    /// A member was drained (`tether-server drain`): it takes no more agents.
    pub drained: std::sync::atomic::AtomicBool,
    /// What agents and relays reported of themselves and is not yet stored, by id, and
    /// whether a flush is under way (see [`record_facts`], [`record_trust_serial`]).
    pub reports_pending: ReportsPending,
    /// The relays this node claimed (see `relay_session::RelayClaims`).
    pub relay_claims: relay_session::RelayClaims,
}

impl SessionShared {
    /// The member node that serves peer `id`, if a member does (on the active node of a
    /// cluster whose nodes all serve agents).
    pub fn served_elsewhere(&self, id: &str) -> Option<String> {
        use crate::presence::Sightings;
        let seen = self.presence.seen(id);
        seen.node
            .filter(|_| seen.online && self.presence.current(id).is_none())
    }
}

/// See [`SessionShared::reports_pending`].
pub type ReportsPending = Arc<
    std::sync::Mutex<(
        std::collections::HashMap<String, crate::registry::Reported>,
        bool,
    )>,
>;

/// Records the trust set agent or relay `id` says it holds, unless already recorded (in the
/// background, batched with others: a lost record only means the set is offered again).
pub fn record_trust_serial(shared: &SessionShared, id: &str, serial: u64) {
    if shared.registry.trust_serial(id) == serial {
        return;
    }
    let current = shared.trust.rotation().serial;
    if serial > current {
        // No such set was ever sent: claiming it would hide that it needs the one in force.
        tracing::warn!(agent_id = %id, serial, current, "trust-serial-beyond-the-current-set-ignored");
        return;
    }
    record_report(shared, id, |r| r.trust_serial = Some(serial));
}

/// Least time between two stores of one agent's facts from its heartbeats: an agent that
/// sends facts in every heartbeat costs no more writes than one that follows `facts::REFRESH`.
pub const FACTS_MIN_INTERVAL: Duration = Duration::from_secs(60);

/// Records the facts agent `id` reported (in the background, batched with others: a lost
/// record is replaced by the next report).
pub fn record_facts(shared: &SessionShared, id: &str, facts: tether_shared::facts::Facts) {
    record_report(shared, id, |r| r.facts = Some(facts));
}

/// Notes what `id` reported of itself (`note` sets it): the newest of each, one entry per
/// agent or relay, stored in one commit with everything reported meanwhile (a fleet
/// connecting at once costs a few commits, not one per agent).
fn record_report(
    shared: &SessionShared,
    id: &str,
    note: impl FnOnce(&mut crate::registry::Reported),
) {
    let start = {
        let mut pending = shared
            .reports_pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        note(pending.0.entry(id.to_owned()).or_default());
        !std::mem::replace(&mut pending.1, true)
    };
    if !start {
        // The flush under way takes them with its next commit.
        return;
    }
    let (registry, pending) = (shared.registry.clone(), shared.reports_pending.clone());
    actix_rt::spawn(async move {
        loop {
            let batch: Vec<_> = {
                let mut p = pending
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if p.0.is_empty() {
                    p.1 = false;
                    return;
                }
                std::mem::take(&mut p.0).into_iter().collect()
            };
            let peers = batch.len();
            if let Err(e) = registry.set_reported(batch).await {
                tracing::error!(peers, error = %e, "reports-record-failed");
            }
        }
    });
}

/// Milliseconds since the Unix epoch (the stream core takes time as an input).
pub use tether_shared::clock::now_unix_ms as now_ms;
