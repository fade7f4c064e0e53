//! An `AgentLink`'s side of the inbox and the mailbox (see `crate::mail`).
//!
//! - On a member node, the link puts every event it accepts in the inbox (with the event, under
//!   its claim) instead of working out its effect, and numbers the commands of the mailbox into
//!   the agent's command stream ([`FromMailbox`], and at each handshake).
//! - On the active node, the link of an agent this node does not serve now ([`AgentLink::remote`])
//!   takes the inbox's entries ([`FromInbox`]: their effects, in one commit with their
//!   deletion) and puts the commands it makes in the mailbox.

use actix::prelude::*;
use tether_shared::journal::Op;
use tether_shared::protocol::{self, Command, Frame, Sender, Seq};

use super::AgentLink;

/// Commands posted between two counts of an agent's mailbox.
const MAIL_RECOUNT: usize = 1024;
/// Inbox rows of one agent a member leaves waiting for the active node at most.
const MAX_INBOX_ROWS: usize = 10_000;
/// Inbox rows written between two counts.
const INBOX_RECOUNT: usize = 512;
use crate::mail::{self, Greeting, Inboxed};
use crate::session::probes::ProbeStats;
use crate::session::record_trust_serial;

impl AgentLink {
    /// On the active node of a cluster: this node does not serve the agent now (no session
    /// here), so the commands it makes go to the mailbox, for whichever node serves it.
    pub(super) fn remote(&self) -> bool {
        self.shared.has_members && self.session.is_none()
    }

    /// On a member: whether the agent's inbox holds as many rows as the active node may leave
    /// waiting ([`MAX_INBOX_ROWS`]: it is slow, or away): its next events are put off (the
    /// agent keeps them and sends them again), so that no agent's events pile up without
    /// bound. Counted again every [`INBOX_RECOUNT`] rows written.
    ///
    /// On the active node, the same while the inbox still holds events a member accepted
    /// before the agent came here (more than its handshake read: [`Self::inbox_now`]), so that
    /// they take effect before the agent's next ones.
    pub(super) fn inbox_full(&self) -> bool {
        (self.shared.member && self.inbox_rows >= MAX_INBOX_ROWS) || self.inbox_behind
    }

    /// At each heartbeat: once its inbox is taken again, a put-off agent is asked for its
    /// events.
    pub(super) fn inbox_drained(&mut self) {
        if self.inbox_behind {
            let prefix = mail::agent_prefix(mail::INBOX_PREFIX, &self.agent_id);
            if let Ok(0) = self.shared.journal.count_meta(&prefix, 1) {
                tracing::info!(agent_id = %self.agent_id, "inbox-caught-up");
                self.inbox_behind = false;
                self.deferred = false;
                self.ep.inbound.ask_resend();
                self.pump();
            }
            return;
        }
        if self.inbox_rows < MAX_INBOX_ROWS {
            return;
        }
        self.recount_inbox();
        if self.inbox_rows < MAX_INBOX_ROWS / 2 {
            self.deferred = false;
            self.ep.inbound.ask_resend();
            self.pump();
        }
    }

    fn recount_inbox(&mut self) {
        let prefix = mail::agent_prefix(mail::INBOX_PREFIX, &self.agent_id);
        match self.shared.journal.count_meta(&prefix, MAX_INBOX_ROWS) {
            Ok(rows) => self.inbox_rows = rows,
            Err(e) => tracing::warn!(agent_id = %self.agent_id, error = %e, "inbox-not-counted"),
        }
    }

    /// The key of the next inbox row this member writes for the agent (under its claim).
    pub(super) fn inbox_key(&mut self, kind: mail::Kind) -> String {
        self.inbox_rows += 1;
        if self.inbox_rows.is_multiple_of(INBOX_RECOUNT) {
            self.recount_inbox();
        }
        let epoch = self.fence.as_ref().map_or(0, |f| f.epoch);
        if epoch != self.inbox_epoch {
            self.inbox_epoch = epoch;
            self.inbox_next = 0;
        }
        let n = self.inbox_next;
        self.inbox_next += 1;
        mail::inbox_key(&self.agent_id, epoch, n, kind)
    }

    /// On a member, at a heartbeat that carries the agent's facts: they go to the active node
    /// through the inbox, at most every `FACTS_MIN_INTERVAL` (as the active node stores them).
    pub(super) fn inbox_facts(
        &mut self,
        ctx: &mut Context<Self>,
        facts: tether_shared::facts::Facts,
    ) {
        let Ok(value) = serde_json::to_vec(&facts) else {
            return;
        };
        if let Some(greeting) = self.greeting.as_mut() {
            // What a new active node is told again (`GreetAgain`) is the newest.
            greeting.facts = facts;
        }
        let due = self
            .facts_stored
            .is_none_or(|t| t.elapsed() >= crate::session::FACTS_MIN_INTERVAL);
        if !due || self.fence.is_none() || self.inbox_full() {
            return;
        }
        self.facts_stored = Some(std::time::Instant::now());
        let key = self.inbox_key(mail::Kind::Facts);
        self.commit_then(ctx, vec![Op::PutMeta { key, value }], |_, _| {});
    }

    /// Whether this node carries anything through the inbox and the mailbox.
    pub(super) fn mails(&self) -> bool {
        self.shared.has_members || self.shared.member
    }

    /// Puts a signed command in the mailbox (see [`Self::remote`]): refused while the agent's
    /// mailbox holds as many commands as its stream may (its node is not taking them).
    pub(super) fn post(
        &mut self,
        command: &Command,
        ops: &mut Vec<Op>,
    ) -> Result<Seq, super::AgentLinkError> {
        let limit = self.shared.max_retained;
        if self.mail_posted >= MAIL_RECOUNT {
            // Counted again now and then: what the serving node took is gone.
            let prefix = mail::agent_prefix(mail::MAILBOX_PREFIX, &self.agent_id);
            self.mail_posted = self.shared.journal.count_meta(&prefix, limit)?;
        }
        if self.mail_posted >= limit {
            return Err(tether_shared::stream::StreamError::Backlog {
                in_flight: self.mail_posted,
                limit,
            }
            .into());
        }
        self.mail_posted += 1;
        // As JSON, not yet numbered (a frame's seq starts at 1), for the incarnation the agent
        // was last known to have.
        let incarnation = self
            .remote_incarnation
            .clone()
            .or_else(|| self.ep.peer_incarnation.clone())
            .unwrap_or_default();
        let bytes = serde_json::to_vec(&mail::Mail {
            incarnation,
            command: command.clone(),
        })
        .map_err(|e| super::AgentLinkError::Encode(e.to_string()))?;
        ops.push(Op::PutMeta {
            key: mail::mail_key(&self.agent_id, self.shared.mail_epoch),
            value: bytes,
        });
        self.remote_writes = true;
        Ok(Seq::ZERO)
    }

    /// The ops that number the mailbox's commands of `entries` into the command stream and
    /// delete them, and the last seq (entries taken before are skipped).
    pub(super) fn take_mail(&mut self, entries: Vec<(String, Vec<u8>)>) -> (Vec<Op>, Option<Seq>) {
        let mut ops = Vec::new();
        let mut last = None;
        if self.tail_behind {
            // What the active node wrote into the stream is not all held yet (it is read
            // again): mail numbered now would take its numbers. It waits for a later look.
            return (ops, last);
        }
        for (key, bytes) in entries {
            if self.mail_done.as_ref().is_some_and(|done| key <= *done) {
                continue;
            }
            if !self.ep.outbound.has_room(1) {
                // The agent is not acknowledging: the rest waits for a later look.
                break;
            }
            self.mail_done = Some(key.clone());
            match serde_json::from_slice::<mail::Mail>(&bytes) {
                Ok(m)
                    if !m.incarnation.is_empty()
                        && self.ep.peer_incarnation.as_deref() != Some(m.incarnation.as_str()) =>
                {
                    // Made for an incarnation the agent lost: its work was failed with it.
                    tracing::warn!(agent_id = %self.agent_id, key = %key, incarnation = %m.incarnation, "mail-for-a-lost-incarnation-dropped");
                }
                Ok(mail::Mail { command, .. }) => match self.number(command, &mut ops) {
                    Ok(seq) => last = Some(seq),
                    Err(e) => {
                        tracing::error!(agent_id = %self.agent_id, key = %key, error = %e, "mail-not-numbered-dropped")
                    }
                },
                _ => {
                    tracing::error!(agent_id = %self.agent_id, key = %key, "mail-unreadable-dropped")
                }
            }
            ops.push(Op::DeleteMeta { key });
        }
        (ops, last)
    }

    /// The mailbox's commands for this agent now, read from the journal.
    pub(super) fn mail_now(&self) -> Vec<(String, Vec<u8>)> {
        let prefix = mail::agent_prefix(mail::MAILBOX_PREFIX, &self.agent_id);
        self.read_entries(&prefix)
    }

    /// The inbox's first entries for this agent now (a page, [`mail::PAGE`]: an agent may
    /// have left many, each up to a frame), read from the journal. If there are more, the
    /// agent's events are put off until the active node's looks took the rest
    /// ([`Self::inbox_full`]).
    pub(super) fn inbox_now(&mut self) -> Vec<(String, Vec<u8>)> {
        let prefix = mail::agent_prefix(mail::INBOX_PREFIX, &self.agent_id);
        let page =
            self.shared
                .journal
                .scan_meta_from(&prefix, &prefix, mail::PAGE, mail::PAGE_BYTES);
        // Not read (the database is away): as if more were waiting, until a look finds none
        // (but a damaged row would never go: the agent is not held up for it).
        let (entries, more) = match page {
            Ok(page) => (page.entries, page.full),
            Err(e) => (
                self.not_read(&e),
                !matches!(e, tether_shared::journal::JournalError::Corrupt { .. }),
            ),
        };
        self.inbox_behind = more;
        if more {
            tracing::info!(agent_id = %self.agent_id, "inbox-behind-events-put-off");
        }
        entries
    }

    fn read_entries(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        self.shared
            .journal
            .scan_meta(prefix)
            .unwrap_or_else(|e| self.not_read(&e))
    }

    /// Nothing, after a read that failed: what it would have found is taken at a later look.
    fn not_read(&self, e: &tether_shared::journal::JournalError) -> Vec<(String, Vec<u8>)> {
        tracing::warn!(agent_id = %self.agent_id, error = %e, "mail-not-read");
        Vec::new()
    }

    /// The effects of the inbox's `entries` (events a member accepted, handshakes it ran), with
    /// their deletion, and the last seq of the commands they queued (in the command stream, if
    /// this node serves the agent now); entries taken before are skipped.
    pub(super) fn take_inbox(&mut self, entries: Vec<(String, Vec<u8>)>) -> (Vec<Op>, Option<Seq>) {
        let mut ops = Vec::new();
        let mut last = None;
        // The last facts of these entries (older ones are superseded).
        let mut facts = None;
        for (key, value) in entries {
            if self.inbox_done.as_ref().is_some_and(|done| key <= *done) {
                continue;
            }
            self.inbox_done = Some(key.clone());
            self.remote_writes = true;
            match Inboxed::read(&key, value) {
                Some(Inboxed::Event(bytes)) => match protocol::decode(&bytes, Sender::Agent) {
                    Ok(frame @ Frame::Event(_)) => {
                        let (more, queued) = self.effect_ops(&frame);
                        ops.extend(more);
                        last = queued.or(last);
                    }
                    _ => {
                        tracing::error!(agent_id = %self.agent_id, key = %key, "inbox-event-unreadable-dropped")
                    }
                },
                Some(Inboxed::Facts(reported)) => facts = Some(reported),
                Some(Inboxed::Departure(node)) => {
                    tracing::info!(agent_id = %self.agent_id, node = %node, "agent-left-elsewhere");
                    self.shared.presence.left_elsewhere(&self.agent_id, &node);
                }
                Some(Inboxed::Greeting(greeting)) => {
                    let (more, queued) = self.greeted(&greeting);
                    ops.extend(more);
                    last = queued.or(last);
                }
                None => {
                    tracing::error!(agent_id = %self.agent_id, key = %key, "inbox-entry-unreadable-dropped")
                }
            }
            ops.push(Op::DeleteMeta { key });
        }
        // A handshake here since knows better.
        if let Some(facts) = facts.filter(|_| self.session.is_none()) {
            self.store_facts(facts, true);
        }
        (ops, last)
    }

    /// What a handshake on a member changes here: what the agent takes (its sealing key, its
    /// release's abilities), its jobs failed if it lost its state, and its waiting jobs sent.
    fn greeted(&mut self, greeting: &Greeting) -> (Vec<Op>, Option<Seq>) {
        tracing::info!(agent_id = %self.agent_id, node = %greeting.node, reset = greeting.reset, appends = ?greeting.appends, "agent-attached-elsewhere");
        if self.session.is_none() {
            // A new session: what this node wrote into the stream was for the one before.
            // Until the stream's end is read again (`go_direct`), commands go to the mailbox.
            // (The same session greeting again keeps it: mail waits that it takes first.)
            let fence = super::direct::fence_of(&self.agent_id, greeting);
            if self.direct.as_ref().map(|d| &d.fence) != fence.as_ref() {
                self.direct = None;
            }
            self.direct_wanted = fence;
            // (A handshake here since knows better.)
            self.remote_incarnation = Some(greeting.incarnation.clone());
            self.shared.presence.set_elsewhere(
                &self.agent_id,
                &greeting.version,
                &greeting.node,
                &greeting.path,
            );
            self.trust_capable = tether_shared::trust::understood_by(&greeting.version);
            self.runs_as = greeting.runs_as;
            self.shared
                .work
                .operations()
                .set_capable(&self.agent_id, greeting.operations);
            self.sealing = Some(self.sealer(&greeting.sealing_key));
            record_trust_serial(&self.shared, &self.agent_id, greeting.trust_serial);
            if !greeting.facts.is_empty() {
                self.store_facts(greeting.facts.clone(), true);
            }
        }
        let mut ops = Vec::new();
        if greeting.reset {
            self.peer_resets += 1;
            self.probes = ProbeStats::default();
            if let Ok(v) = serde_json::to_vec(&self.probes) {
                ops.push(Op::PutMeta {
                    key: ProbeStats::meta_key(&self.agent_id),
                    value: v,
                });
            }
            ops.extend(self.shared.work.on_reset(&self.agent_id));
        }
        let mut last = None;
        match self.take_jobs() {
            Ok(Some((queued, more))) => {
                ops.extend(more);
                last = queued;
            }
            Ok(None) => {}
            Err(e) => tracing::error!(agent_id = %self.agent_id, error = %e, "job-dispatch-failed"),
        }
        (ops, last)
    }
}

/// On a member: greet the active node again (it is a new one), if the agent is served here.
#[derive(Message)]
#[rtype(result = "()")]
pub struct GreetAgain;

impl Handler<GreetAgain> for AgentLink {
    type Result = ();

    fn handle(&mut self, _: GreetAgain, ctx: &mut Self::Context) {
        self.greet_again(ctx);
    }
}

/// Inbox entries of this link's agent (on the active node).
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromInbox {
    pub entries: Vec<(String, Vec<u8>)>,
    /// When the read of the entries began.
    pub read_at: std::time::Instant,
}

impl Handler<FromInbox> for AgentLink {
    type Result = ();

    fn handle(&mut self, msg: FromInbox, ctx: &mut Self::Context) {
        if msg.read_at < self.loaded_at {
            // Read before this link read the agent's state: what it holds may have been taken
            // (and its deletion committed) since. What is still there comes at the next look.
            return;
        }
        if self.uncommitted_bytes > 0 {
            // Events the agent sent here are still being committed, their effects already in
            // this link's memory. If the claim moved on meanwhile, their commit is refused and
            // the member that has the agent now accepts them again, into the inbox: taking
            // those here before the refusal rebuilds the link would count them twice. The rows
            // stay, and come again at the next look.
            return;
        }
        if self.remote() && self.fenced_commits_pending() {
            // It served the agent until just now, and a commit of then may yet be refused,
            // which rebuilds this link from the journal: what it would take now (a member's
            // note of the agent's handshake, say) would be lost with it. The rows stay.
            return;
        }
        if self.shared.work.is_stale(&self.agent_id) {
            // A commit of this agent was refused: its jobs are read again first, and what the
            // rows do to them waits until they are (the rows come again at the next look).
            return self.refresh_jobs(ctx);
        }
        let mut entries = msg.entries;
        if self.remote() && self.direct.is_some() {
            // A note of a new session of the agent ends what this node writes into the stream
            // for the one before: what comes before it is taken (and committed) under that
            // session's claims first; the note, once every commit under them is answered (one
            // refused rebuilds this link). The rows stay until then.
            // (At most one note per page, at its head.)
            let notes: Vec<usize> = entries
                .iter()
                .enumerate()
                .filter(|(_, (k, _))| k.ends_with(".h"))
                .map(|(i, _)| i)
                .collect();
            match notes.as_slice() {
                [0, ..] if self.direct_commits_pending() => return,
                [0, next, ..] | [next, ..] if *next > 0 => entries.truncate(*next),
                _ => {}
            }
        }
        let trust_serial =
            entries
                .iter()
                .rev()
                .find_map(|(k, v)| match Inboxed::read(k, v.clone()) {
                    Some(Inboxed::Greeting(g)) => Some(g.trust_serial),
                    _ => None,
                });
        let (ops, last) = self.take_inbox(entries);
        if ops.is_empty() {
            return;
        }
        self.commit_then(ctx, ops, move |act, _| {
            if let Some(last) = last.filter(|s| *s > Seq::ZERO) {
                act.ep.outbound.mark_durable(last);
                act.pump();
            }
            act.inbox_drained();
        });
        // What it confirmed since, through the inbox, if no handshake said it (an agent a
        // member serves beats there, not here: this is where it is offered a newer set again).
        let held =
            trust_serial.unwrap_or_else(|| self.shared.registry.trust_serial(&self.agent_id));
        self.offer_trust(ctx, held);
        // Last: every command made above is committed before the stream's end is read.
        if let Some(fence) = self.direct_wanted.take().filter(|_| self.remote()) {
            self.go_direct(ctx, fence);
        }
    }
}

/// On the active node, after a step of a key rollover: the set in force, to the agent if it
/// holds an older one (one this node serves would be offered it at its next beat; one a member
/// serves, at its next inbox entry).
#[derive(Message)]
#[rtype(result = "()")]
pub struct OfferTrust;

impl Handler<OfferTrust> for AgentLink {
    type Result = ();

    fn handle(&mut self, _: OfferTrust, ctx: &mut Self::Context) {
        // Not to an agent connected nowhere: it is offered the set at its next handshake.
        let online = self
            .shared
            .presence
            .online_path(self.agent_id.as_str())
            .is_some();
        if self.shared.member || !online {
            return;
        }
        let held = self.shared.registry.trust_serial(&self.agent_id);
        self.offer_trust(ctx, held);
    }
}

/// Mailbox entries of this link's agent (on the node that serves it), and the records of its
/// command stream read with them (see `super::direct`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromMailbox {
    pub entries: Vec<(String, Vec<u8>)>,
    pub records: Vec<tether_shared::journal::Record>,
    /// When the read of the entries and records began.
    pub read_at: std::time::Instant,
}

impl Handler<FromMailbox> for AgentLink {
    type Result = ();

    fn handle(&mut self, msg: FromMailbox, ctx: &mut Self::Context) {
        if self.session.is_none() || self.fence.is_none() {
            return;
        }
        if self.direct_out {
            return self.followed(ctx, msg.entries, msg.records, msg.read_at);
        }
        let (ops, last) = self.take_mail(msg.entries);
        if ops.is_empty() {
            return;
        }
        self.commit_then(ctx, ops, move |act, _| {
            if let Some(last) = last {
                act.ep.outbound.mark_durable(last);
            }
            act.pump();
        });
    }
}
