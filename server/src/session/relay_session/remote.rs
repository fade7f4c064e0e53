//! `RemoteRelays`: on the active node of a cluster whose nodes all serve agents, the relays a
//! member carries (see `member` for the member's side, and `crate::mail`).
//!
//! Each relay's inbox says what it said on the member: its handshake, its events, the end of
//! its connection. This actor makes their effects here (its presence, the trust set it holds,
//! its upgrade's state) and deletes the rows in one commit. At each handshake it answers in the
//! relay's mailbox with what the relay gets at every connect (its upgrade, its certificate,
//! the trust set if it holds an older one), replacing whatever still waited there, so a relay
//! that connects again and again never piles commands up. Meanwhile, at each tend, a relay a
//! member serves gets a renewed certificate or a new trust set as one connected here does at
//! its link's beats.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tether_shared::ids::AgentId;
use tether_shared::journal::Op;
use tether_shared::protocol::{self, Frame, Sender};

use super::relays::{
    certificate_command, relay_event_effect, relay_upgrade_command, trust_command,
};
use crate::mail::{self, Entries, Inboxed};
use crate::session::{record_trust_serial, SessionShared};

/// How often renewed certificates and new trust sets are looked for.
const TEND: Duration = Duration::from_secs(5);

pub struct RemoteRelays {
    shared: Arc<SessionShared>,
    /// Relays whose inbox rows are being taken (a look meanwhile reads them again).
    taking: HashSet<String>,
    /// What each relay a member serves was last sent: the trust set's serial, its
    /// certificate (sent again only once they change).
    sent: HashMap<String, Sent>,
    /// A tend is under way (the next one waits for it).
    tending: bool,
}

/// What was last sent to a relay a member serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Sent {
    trust_serial: u64,
    certificate: String,
}

impl RemoteRelays {
    pub fn new(shared: Arc<SessionShared>) -> RemoteRelays {
        RemoteRelays {
            shared,
            taking: HashSet::new(),
            sent: HashMap::new(),
            tending: false,
        }
    }

    /// Certificates renewed and trust sets changed since, for relays members serve: one relay
    /// after the other, once the last tend is over.
    fn tend(&mut self, ctx: &mut Context<Self>) {
        if self.tending {
            return;
        }
        let serving: Vec<(String, Sent)> = self
            .shared
            .registry
            .relays()
            .into_iter()
            .map(|r| r.id.to_string())
            .filter(|id| !self.taking.contains(id) && self.shared.served_elsewhere(id).is_some())
            .map(|id| {
                let sent = self.sent.get(&id).cloned().unwrap_or_default();
                (id, sent)
            })
            .collect();
        self.sent
            .retain(|id, _| self.shared.served_elsewhere(id).is_some());
        self.tending = true;
        let shared = self.shared.clone();
        let work = async move {
            let mut now_sent = Vec::new();
            for (id, sent) in serving {
                let mut frames = Vec::new();
                let mut next = sent.clone();
                let serial = shared.trust.rotation().serial;
                if shared.registry.trust_serial(&id) < serial && sent.trust_serial < serial {
                    frames.extend(trust_command(&shared, &id));
                    next.trust_serial = serial;
                }
                match shared.relay_certs.current(&id).await {
                    Ok(Some(c)) if c.pem != sent.certificate => {
                        frames.extend(certificate_command(&shared, &id, c.pem.clone()));
                        next.certificate = c.pem;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(relay_id = %id, error = %e, "relay-certificate-renewal-failed")
                    }
                }
                if !frames.is_empty() && mail(&shared, &id, frames).await {
                    now_sent.push((id, next));
                }
            }
            now_sent
        };
        ctx.spawn(work.into_actor(self).map(|now_sent, act, _| {
            act.tending = false;
            for (id, sent) in now_sent {
                act.sent.insert(id, sent);
            }
        }));
    }
}

impl Actor for RemoteRelays {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(TEND, |act, ctx| act.tend(ctx));
    }
}

/// Rows of relay `relay_id`'s inbox, in key order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromRelayInbox {
    pub relay_id: String,
    pub entries: Entries,
}

impl Handler<FromRelayInbox> for RemoteRelays {
    type Result = ();

    fn handle(&mut self, msg: FromRelayInbox, ctx: &mut Self::Context) {
        if !self.taking.insert(msg.relay_id.clone()) {
            return;
        }
        let relay_id = msg.relay_id.clone();
        let work = take(self.shared.clone(), msg.relay_id, msg.entries);
        ctx.spawn(work.into_actor(self).map(move |sent, act, _| {
            act.taking.remove(&relay_id);
            if let Some(sent) = sent {
                act.sent.insert(relay_id, sent);
            }
        }));
    }
}

/// Takes relay `relay_id`'s inbox `entries`: their effects, the commands a handshake gets, and
/// their deletion, in one commit. Answers what was sent, after a handshake.
async fn take(shared: Arc<SessionShared>, relay_id: String, entries: Entries) -> Option<Sent> {
    let mut ops = Vec::new();
    let mut greeted = None;
    // Its upgrade's state before (memory changes with each event ahead of the commit).
    let upgrade_before = shared.upgrades.relay(&relay_id);
    let mut upgrade_changed = false;
    for (key, value) in entries {
        ops.push(Op::DeleteMeta { key: key.clone() });
        if key.ends_with(".f") {
            // Its status, from its heartbeats (a relay reports no facts).
            match serde_json::from_slice::<protocol::AgentStatus>(&value) {
                Ok(status) => shared.presence.touch(&relay_id, Some(status)),
                Err(_) => {
                    tracing::warn!(relay_id = %relay_id, key = %key, "relay-status-unreadable-dropped")
                }
            }
            continue;
        }
        match Inboxed::read(&key, value) {
            Some(Inboxed::Greeting(g)) => {
                let epoch = mail::epoch_of(&key).unwrap_or(0);
                if !newer_than_here(&shared, &relay_id, epoch) {
                    tracing::info!(relay_id = %relay_id, node = %g.node, epoch, "relay-greeting-older-than-its-connection-here-dropped");
                    continue;
                }
                tracing::info!(relay_id = %relay_id, node = %g.node, path = ?g.path, "relay-online-elsewhere");
                shared
                    .presence
                    .moved_elsewhere(&relay_id, &g.version, &g.node, &g.path);
                record_trust_serial(&shared, &relay_id, g.trust_serial);
                greeted = Some(g);
            }
            Some(Inboxed::Event(frame)) => match protocol::decode(&frame, Sender::Agent) {
                Ok(Frame::Event(event)) if super::is_relay_event(&event.body) => {
                    let op = relay_event_effect(&shared, &relay_id, &event);
                    upgrade_changed |= op.is_some();
                    ops.extend(op);
                }
                _ => {
                    tracing::warn!(relay_id = %relay_id, key = %key, "relay-inbox-event-unreadable-dropped")
                }
            },
            Some(Inboxed::Departure(node)) => {
                tracing::info!(relay_id = %relay_id, node = %node, "relay-left-elsewhere");
                shared.presence.left_elsewhere(&relay_id, &node);
            }
            _ => {
                tracing::warn!(relay_id = %relay_id, key = %key, "relay-inbox-entry-unreadable-dropped")
            }
        }
    }
    let mut sent = None;
    // Unless it left again meanwhile (its commands would wait for nobody).
    if let Some(greeting) = greeted.filter(|_| shared.served_elsewhere(&relay_id).is_some()) {
        // What it gets at every connect, in place of what still waited for it.
        let mut frames: Vec<Frame> = relay_upgrade_command(&shared, &relay_id)
            .into_iter()
            .collect();
        let mut now_sent = Sent::default();
        match shared.relay_certs.current(&relay_id).await {
            Ok(Some(c)) => {
                frames.extend(certificate_command(&shared, &relay_id, c.pem.clone()));
                now_sent.certificate = c.pem;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(relay_id = %relay_id, error = %e, "relay-certificate-renewal-failed")
            }
        }
        let serial = shared.trust.rotation().serial;
        now_sent.trust_serial = greeting.trust_serial;
        if greeting.trust_serial < serial {
            frames.extend(trust_command(&shared, &relay_id));
            now_sent.trust_serial = serial;
        }
        ops.extend(waiting_mail(&shared, &relay_id).await);
        ops.extend(mail_ops(&relay_id, shared.mail_epoch, frames));
        sent = Some(now_sent);
    }
    if let Err(e) = shared.journal.commit(ops).await {
        // The rows stay, and are read again at the next look: what their events changed in
        // memory is undone, so that they change it again then.
        tracing::warn!(relay_id = %relay_id, error = %e, "relay-inbox-not-taken");
        if let (true, Some(before)) = (upgrade_changed, upgrade_before) {
            shared.upgrades.set_relay(&relay_id, before);
        }
        return None;
    }
    sent
}

/// Whether a handshake of relay `relay_id` a member noted under claim `epoch` is newer than
/// its connection here, if it has one; if so, that connection is stale (the relay, or the
/// relay that carries it, left without a word) and is closed.
fn newer_than_here(shared: &SessionShared, relay_id: &str, epoch: u64) -> bool {
    use crate::presence::Sightings;
    let seen = shared.presence.seen(relay_id);
    if !seen.online || seen.node.is_some() {
        return true;
    }
    match shared.relay_claims.epoch_here(relay_id) {
        Some(here) if here < epoch => {
            tracing::info!(relay_id = %relay_id, here, epoch, "relay-moved-to-a-member-closing-here");
            let relay: tether_shared::ids::RelayId = relay_id.into();
            for (_, link) in shared.presence.relay_links() {
                link.do_send(super::RevokeRelay {
                    relay_id: relay.clone(),
                    moved: true,
                });
            }
            true
        }
        // Connected here since (or its claim here is not made yet): the row is older.
        _ => false,
    }
}

/// The deletion of every row waiting in relay `relay_id`'s mailbox.
async fn waiting_mail(shared: &SessionShared, relay_id: &str) -> Vec<Op> {
    let (journal, prefix) = (
        shared.journal.clone(),
        mail::agent_prefix(mail::MAILBOX_PREFIX, &AgentId::new(relay_id)),
    );
    match actix_web::web::block(move || journal.scan_meta(&prefix)).await {
        Ok(Ok(rows)) => rows
            .into_iter()
            .map(|(key, _)| Op::DeleteMeta { key })
            .collect(),
        Ok(Err(e)) => {
            tracing::warn!(relay_id = %relay_id, error = %e, "relay-mailbox-not-read");
            Vec::new()
        }
        Err(_) => Vec::new(),
    }
}

/// The rows that put `frames` (commands) in relay `relay_id`'s mailbox, made by the active
/// node at lease `epoch`.
fn mail_ops(relay_id: &str, epoch: u64, frames: Vec<Frame>) -> Vec<Op> {
    let relay = AgentId::new(relay_id);
    frames
        .into_iter()
        .filter_map(|frame| match frame {
            Frame::Command(command) => Some(command),
            _ => None,
        })
        .filter_map(|command| {
            let mail = mail::Mail {
                incarnation: String::new(),
                command,
            };
            serde_json::to_vec(&mail).ok().map(|value| Op::PutMeta {
                key: mail::mail_key(&relay, epoch),
                value,
            })
        })
        .collect()
}

/// Puts `frames` (commands) in relay `relay_id`'s mailbox, for the member that serves it;
/// `true` once they are there.
pub(super) fn mail(
    shared: &SessionShared,
    relay_id: &str,
    frames: Vec<Frame>,
) -> impl Future<Output = bool> + 'static {
    let ops = mail_ops(relay_id, shared.mail_epoch, frames);
    let commit = shared.journal.commit(ops);
    let relay_id = relay_id.to_owned();
    async move {
        match commit.await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(relay_id = %relay_id, error = %e, "relay-commands-not-mailed");
                false
            }
        }
    }
}
