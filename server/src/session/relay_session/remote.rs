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
    /// The trust set serial last sent to each relay (sent again only once it changes).
    trust_sent: HashMap<String, u64>,
}

impl RemoteRelays {
    pub fn new(shared: Arc<SessionShared>) -> RemoteRelays {
        RemoteRelays {
            shared,
            taking: HashSet::new(),
            trust_sent: HashMap::new(),
        }
    }

    /// Certificates renewed and trust sets changed since, for relays members serve.
    fn tend(&mut self, ctx: &mut Context<Self>) {
        let serial = self.shared.trust.rotation().serial;
        for relay in self.shared.registry.relays() {
            let id = relay.id.to_string();
            if self.taking.contains(&id) || self.shared.served_elsewhere(&id).is_none() {
                continue;
            }
            let mut frames = Vec::new();
            let sent = self.trust_sent.get(&id).copied().unwrap_or(0);
            if self.shared.registry.trust_serial(&id) < serial && sent < serial {
                frames.extend(trust_command(&self.shared, &id));
                self.trust_sent.insert(id.clone(), serial);
            }
            let (shared, certs) = (self.shared.clone(), self.shared.relay_certs.clone());
            let renewed = async move {
                match certs.current(&id).await {
                    Ok(Some(c)) if c.renewed => {
                        frames.extend(certificate_command(&shared, &id, c.pem));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(relay_id = %id, error = %e, "relay-certificate-renewal-failed")
                    }
                }
                if !frames.is_empty() {
                    mail(&shared, &id, frames).await;
                }
            };
            ctx.spawn(renewed.into_actor(self));
        }
        self.trust_sent
            .retain(|id, _| self.shared.served_elsewhere(id).is_some());
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
        ctx.spawn(work.into_actor(self).map(move |trust_sent, act, _| {
            act.taking.remove(&relay_id);
            if let Some(serial) = trust_sent {
                act.trust_sent.insert(relay_id, serial);
            }
        }));
    }
}

/// Takes relay `relay_id`'s inbox `entries`: their effects, the commands a handshake gets, and
/// their deletion, in one commit. Answers the trust set serial sent, if one was.
async fn take(shared: Arc<SessionShared>, relay_id: String, entries: Entries) -> Option<u64> {
    let mut ops = Vec::new();
    let mut greeted = None;
    for (key, value) in entries {
        ops.push(Op::DeleteMeta { key: key.clone() });
        match Inboxed::read(&key, value) {
            Some(Inboxed::Greeting(g)) => {
                tracing::info!(relay_id = %relay_id, node = %g.node, path = ?g.path, "relay-online-elsewhere");
                shared
                    .presence
                    .set_elsewhere(&relay_id, &g.version, &g.node, &g.path);
                record_trust_serial(&shared, &relay_id, g.trust_serial);
                greeted = Some(g);
            }
            Some(Inboxed::Event(frame)) => match protocol::decode(&frame, Sender::Agent) {
                Ok(Frame::Event(event)) if super::is_relay_event(&event.body) => {
                    ops.extend(relay_event_effect(&shared, &relay_id, &event));
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
    let mut trust_sent = None;
    if let Some(greeting) = greeted {
        // What it gets at every connect, in place of what still waited for it.
        let mut frames: Vec<Frame> = relay_upgrade_command(&shared, &relay_id)
            .into_iter()
            .collect();
        match shared.relay_certs.current(&relay_id).await {
            Ok(Some(c)) => frames.extend(certificate_command(&shared, &relay_id, c.pem)),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(relay_id = %relay_id, error = %e, "relay-certificate-renewal-failed")
            }
        }
        let serial = shared.trust.rotation().serial;
        if greeting.trust_serial < serial {
            frames.extend(trust_command(&shared, &relay_id));
            trust_sent = Some(serial);
        }
        ops.extend(waiting_mail(&shared, &relay_id).await);
        ops.extend(mail_ops(&relay_id, shared.mail_epoch, frames));
    }
    if let Err(e) = shared.journal.commit(ops).await {
        // The rows stay, and are read again at the next look.
        tracing::warn!(relay_id = %relay_id, error = %e, "relay-inbox-not-taken");
        return None;
    }
    trust_sent
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

/// Puts `frames` (commands) in relay `relay_id`'s mailbox, for the member that serves it.
pub(super) fn mail(
    shared: &SessionShared,
    relay_id: &str,
    frames: Vec<Frame>,
) -> impl Future<Output = ()> + 'static {
    let ops = mail_ops(relay_id, shared.mail_epoch, frames);
    let commit = shared.journal.commit(ops);
    let relay_id = relay_id.to_owned();
    async move {
        if let Err(e) = commit.await {
            tracing::warn!(relay_id = %relay_id, error = %e, "relay-commands-not-mailed");
        }
    }
}
