//! A relay's link on a member node of a cluster (see `crate::mail`).
//!
//! A member carries a relay's channels as the active node does: each agent behind it is an
//! agent this member serves. What the relays themselves say and are told goes through the
//! database, under each relay's claim (the newest connection wins, as for an agent):
//!
//! - its handshake (what it runs, the trust set it holds, its path), the events it reports
//!   about itself (its upgrades, its trust) and the end of its connection go to the active node
//!   in the relay's **inbox**, where it takes effect as if the relay had said it there;
//! - what the active node sends it (its upgrade, its certificate, the trust set) comes in the
//!   relay's **mailbox**: this link deletes each row under the relay's claim, then sends it
//!   (relays keep no journal: the active node sends all of it again at their next connect).

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tether_shared::ids::AgentId;
use tether_shared::journal::{Fence, JournalError, Op};

use super::*;
use crate::mail::{self, Kind};

/// Inbox rows of reports one relay may write per minute at most, whatever its connections: a
/// relay says little of itself (a few events per upgrade or trust rotation); past it, what it
/// says is dropped (and logged once), so that a relay cannot fill the database. It may connect
/// as many times a minute (a relay that connects more often than once a second is broken, or
/// hostile, and is refused).
const MAX_ROWS_PER_MINUTE: u32 = 60;
/// Reports a relay may make before its claim is made (kept, then written).
const MAX_EARLY: usize = 8;
/// Mailbox rows taken lately, remembered so that a look that read them before they were
/// deleted does not send them again.
const MAX_DONE: usize = 1024;

/// What this node keeps of the relays it claims, whichever link carries them.
#[derive(Default)]
pub struct RelayClaims {
    /// On the active node of a cluster whose nodes all serve agents: the epoch of this node's
    /// claim on each relay at its last connection here.
    epochs: Mutex<HashMap<String, u64>>,
    /// Inbox rows written (and claims made) for each relay this minute.
    rows: Mutex<HashMap<String, Minute>>,
}

impl RelayClaims {
    /// This node claimed relay `id` at `epoch` (it connected here).
    pub fn claimed_here(&self, id: &str, epoch: u64) {
        let mut epochs = self.epochs.lock().unwrap_or_else(PoisonError::into_inner);
        epochs.insert(id.to_owned(), epoch);
    }

    /// The epoch of this node's claim on relay `id` at its last connection here.
    pub fn epoch_here(&self, id: &str) -> Option<u64> {
        let epochs = self.epochs.lock().unwrap_or_else(PoisonError::into_inner);
        epochs.get(id).copied()
    }

    /// Whether relay `id` may write one more inbox row of `kind` this minute. Its reports
    /// (events, status) and its connections (claims, handshakes, departures: three per
    /// connection) are counted apart.
    pub(super) fn row_allowed(&self, id: &str, kind: Kind) -> bool {
        let mut rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        if rows.len() > 10_000 {
            rows.retain(|_, m| m.since.elapsed() < Duration::from_secs(60));
        }
        let entry = rows.entry(id.to_owned()).or_insert_with(Minute::new);
        if entry.since.elapsed() >= Duration::from_secs(60) {
            *entry = Minute::new();
        }
        let (count, limit) = match kind {
            Kind::Greeting | Kind::Departure => (&mut entry.connections, 3 * MAX_ROWS_PER_MINUTE),
            Kind::Event | Kind::Facts => (&mut entry.reports, MAX_ROWS_PER_MINUTE),
        };
        if *count >= limit {
            if !entry.logged {
                entry.logged = true;
                tracing::warn!(relay_id = %id, ?kind, max = MAX_ROWS_PER_MINUTE, "relay-says-too-much-dropping-for-a-minute");
            }
            return false;
        }
        *count += 1;
        true
    }
}

/// What one relay wrote in the current minute.
struct Minute {
    since: Instant,
    reports: u32,
    connections: u32,
    /// A drop was logged this minute.
    logged: bool,
}

impl Minute {
    fn new() -> Minute {
        Minute {
            since: Instant::now(),
            reports: 0,
            connections: 0,
            logged: false,
        }
    }
}

/// A relay this link carries (its own, or a child's on a channel), claimed by this member.
#[derive(Default)]
pub(super) struct Claimed {
    /// Which connection of the relay this is (the answer to an older one's claim is not its).
    generation: u64,
    fence: Option<Fence>,
    /// What its handshake said (told again to a new active node).
    greeting: Vec<u8>,
    /// Inbox rows written under the claim (the next row's number).
    written: u64,
    /// What it reported before its claim was made.
    early: Vec<(Kind, Vec<u8>)>,
    /// Mailbox rows being taken, and taken lately.
    taking: HashSet<String>,
    done: HashSet<String>,
    /// When its status (from its heartbeats) last went to the active node.
    status_sent: Option<Instant>,
}

/// Least time between two of a relay's statuses sent to the active node.
const STATUS_EVERY: Duration = Duration::from_secs(60);

impl RelaySession {
    /// On a member: relay `relay_id` (this link's, or a child relay's on a channel) proved
    /// itself. It is claimed for this node, and its handshake goes to the active node, which
    /// answers in its mailbox.
    pub(super) fn member_greet(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        hello: &Hello,
        version: &str,
        path: &[String],
    ) {
        let Some(claims) = self.shared.claims.clone() else {
            return;
        };
        let relay_id = hello.agent_id.clone();
        if !self
            .shared
            .relay_claims
            .row_allowed(&relay_id, Kind::Greeting)
        {
            // It connects more than once a second: broken, or hostile.
            let reason = "this relay connects too often: retry later";
            return self.refuse_relay(ctx, &relay_id, CloseCode::Busy, reason);
        }
        static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed) + 1;
        let greeting = mail::Greeting::of_relay(hello, version, claims.node(), path);
        let greeting = match serde_json::to_vec(&greeting) {
            Ok(g) => g,
            Err(e) => {
                return tracing::error!(relay_id = %relay_id, error = %e, "greeting-not-encoded")
            }
        };
        self.claimed.insert(
            relay_id.clone(),
            Claimed {
                generation,
                greeting,
                ..Default::default()
            },
        );
        let claim = claims.claim(&AgentId::new(relay_id.as_str()), None);
        ctx.spawn(claim.into_actor(self).map(move |res, act, ctx| {
            let Some(claimed) = act
                .claimed
                .get_mut(&relay_id)
                .filter(|c| c.generation == generation)
            else {
                // It left meanwhile (and may have come back on another channel).
                return;
            };
            match res {
                Ok(fence) => {
                    tracing::info!(relay_id = %relay_id, epoch = fence.epoch, "relay-claimed");
                    claimed.fence = Some(fence);
                    let greeting = claimed.greeting.clone();
                    let early = std::mem::take(&mut claimed.early);
                    act.inbox_row(ctx, &relay_id, Kind::Greeting, greeting);
                    for (kind, value) in early {
                        act.inbox_row(ctx, &relay_id, kind, value);
                    }
                }
                Err(e) => act.claim_lost(ctx, &relay_id, &e),
            }
        }));
    }

    /// On a member: a new active node is told every relay's handshake again.
    pub(super) fn member_greet_again(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let again: Vec<(String, Vec<u8>)> = self
            .claimed
            .iter()
            .filter(|(_, c)| c.fence.is_some())
            .map(|(id, c)| (id.clone(), c.greeting.clone()))
            .collect();
        for (relay_id, greeting) in again {
            self.inbox_row(ctx, &relay_id, Kind::Greeting, greeting);
        }
    }

    /// On a member: an event relay `relay_id` reported about itself (`frame`, as it sent it)
    /// goes to the active node.
    pub(super) fn member_event(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        relay_id: &str,
        frame: &[u8],
    ) {
        self.inbox_row(ctx, relay_id, Kind::Event, frame.to_vec());
    }

    /// On a member: the status relay `relay_id` reported in a heartbeat (its load, its actors'
    /// health) goes to the active node, at most every [`STATUS_EVERY`], for its relay list.
    pub(super) fn member_status(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        relay_id: &str,
        status: &tether_shared::protocol::AgentStatus,
    ) {
        let Some(claimed) = self.claimed.get_mut(relay_id) else {
            return;
        };
        if claimed.fence.is_none()
            || claimed
                .status_sent
                .is_some_and(|t| t.elapsed() < STATUS_EVERY)
        {
            return;
        }
        claimed.status_sent = Some(Instant::now());
        if let Ok(value) = serde_json::to_vec(status) {
            self.inbox_row(ctx, relay_id, Kind::Facts, value);
        }
    }

    /// On a member: relay `relay_id` is no longer carried here; the active node learns it
    /// (unless a newer connection claimed it meanwhile: then nothing is written).
    pub(super) fn member_depart(&mut self, relay_id: &str) {
        let Some(claimed) = self.claimed.remove(relay_id) else {
            return;
        };
        let (Some(fence), Some(claims)) = (claimed.fence, self.shared.claims.as_ref()) else {
            return;
        };
        if !self
            .shared
            .relay_claims
            .row_allowed(relay_id, Kind::Departure)
        {
            return;
        }
        let key = mail::inbox_key(
            &AgentId::new(relay_id),
            fence.epoch,
            claimed.written,
            Kind::Departure,
        );
        let op = Op::PutMeta {
            key,
            value: claims.node().as_bytes().to_vec(),
        };
        let commit = self.shared.journal.commit_under(vec![op], Some(fence));
        let relay_id = relay_id.to_owned();
        // Not tied to this link: it may be stopping.
        actix_rt::spawn(async move {
            match commit.await {
                Ok(_) | Err(JournalError::Fenced { .. }) => {}
                Err(e) => {
                    tracing::warn!(relay_id = %relay_id, error = %e, "relay-departure-not-noted")
                }
            }
        });
    }

    /// A row for the active node in relay `relay_id`'s inbox, under its claim.
    fn inbox_row(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        relay_id: &str,
        kind: Kind,
        value: Vec<u8>,
    ) {
        let Some(claimed) = self.claimed.get_mut(relay_id) else {
            return;
        };
        let Some(fence) = claimed.fence.clone() else {
            // Said before its claim was made: written once it is.
            if claimed.early.len() < MAX_EARLY {
                claimed.early.push((kind, value));
            }
            return;
        };
        if !self.shared.relay_claims.row_allowed(relay_id, kind) {
            return;
        }
        let key = mail::inbox_key(&AgentId::new(relay_id), fence.epoch, claimed.written, kind);
        claimed.written += 1;
        let commit = self
            .shared
            .journal
            .commit_under(vec![Op::PutMeta { key, value }], Some(fence));
        let relay_id = relay_id.to_owned();
        ctx.spawn(commit.into_actor(self).map(move |res, act, ctx| {
            if let Err(e) = res {
                act.claim_lost(ctx, &relay_id, &e);
            }
        }));
    }

    /// Relay `relay_id`'s claim could not be made or kept (a newer connection claimed it, or
    /// the database failed): this member carries it no more.
    fn claim_lost(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        relay_id: &str,
        e: &JournalError,
    ) {
        tracing::warn!(relay_id = %relay_id, error = %e, "relay-claim-lost-closing");
        self.claimed.remove(relay_id);
        let reason = "this node no longer serves this relay";
        self.refuse_relay(ctx, relay_id, CloseCode::GoingAway, reason);
    }
}

/// On a member: rows of relay `relay_id`'s mailbox (commands from the active node), for the
/// link that carries it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RelayMail {
    pub relay_id: String,
    pub entries: Vec<(String, Vec<u8>)>,
}

impl Handler<RelayMail> for RelaySession {
    type Result = ();

    fn handle(&mut self, msg: RelayMail, ctx: &mut Self::Context) {
        let relay_id = msg.relay_id;
        let Some(claimed) = self.claimed.get_mut(&relay_id) else {
            return;
        };
        let Some(fence) = claimed.fence.clone() else {
            return;
        };
        let mut keys = Vec::new();
        let mut commands = Vec::new();
        for (key, value) in msg.entries {
            if claimed.done.contains(&key) || !claimed.taking.insert(key.clone()) {
                continue;
            }
            match serde_json::from_slice::<mail::Mail>(&value) {
                Ok(m) => commands.push(m.command),
                Err(e) => {
                    tracing::error!(relay_id = %relay_id, key = %key, error = %e, "mail-unreadable-dropped")
                }
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return;
        }
        let ops = keys
            .iter()
            .map(|key| Op::DeleteMeta { key: key.clone() })
            .collect();
        // Taken under the claim first: only the node that serves the relay sends them.
        let commit = self.shared.journal.commit_under(ops, Some(fence));
        ctx.spawn(commit.into_actor(self).map(move |res, act, ctx| {
            if let Some(claimed) = act.claimed.get_mut(&relay_id) {
                if claimed.done.len() + keys.len() > MAX_DONE {
                    claimed.done.clear();
                }
                for key in &keys {
                    claimed.taking.remove(key);
                    if res.is_ok() {
                        claimed.done.insert(key.clone());
                    }
                }
            }
            if let Err(e) = res {
                return act.claim_lost(ctx, &relay_id, &e);
            }
            let Some(ch) = act.relay_channel(&relay_id) else {
                return;
            };
            for command in commands {
                tracing::info!(relay_id = %relay_id, ch, id = %command.id, "relay-command-from-mailbox-sent");
                act.send_on(ctx, ch, &Frame::Command(command));
            }
        }));
    }
}

/// On a member: every relay this link carries greets the new active node.
#[derive(Message)]
#[rtype(result = "()")]
pub struct GreetRelaysAgain;

impl Handler<GreetRelaysAgain> for RelaySession {
    type Result = ();

    fn handle(&mut self, _: GreetRelaysAgain, ctx: &mut Self::Context) {
        if !self.closing {
            self.member_greet_again(ctx);
        }
    }
}
