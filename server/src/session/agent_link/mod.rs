//! `AgentLink`: both message streams of one agent, on the server.
//!
//! It owns the sans-IO [`Endpoint`] for the agent, rebuilt from the journal when the link is
//! created, and is the only writer of that agent's stream entries in the journal. Every event
//! it accepts is committed (with its effect, e.g. probe counts) before it is acked; every
//! command it queues is committed before it is sent. Sessions come and go: `Attach` runs the
//! handshake (incarnations, watermarks) and resends what the agent lacks; frames from any
//! connection but the current one are ignored.
//!
//! Job and upgrade events go to `SessionShared::work` ([`crate::work`]), whose ops join the
//! event's batch; the link knows no deployment or upgrade. [`jobs`] sends the work that is
//! ready (`DispatchJobs`) and queues any commands the scheduler asks for (`QueueCommands`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::Serialize;
use tether_shared::close::CloseCode;
use tether_shared::ids::AgentId;
use tether_shared::journal::{Fence, JournalError, Op};
use tether_shared::link::{LinkError as FrameError, Received, StreamKeys, StreamReceiver};
use tether_shared::protocol::{
    self, command_signing_bytes, AgentStatus, Command, CommandBody, ErrorCode, EventBody, Frame,
    Hello, Sender, Seq, StreamId, Welcome,
};
use tether_shared::stream::{AckOutcome, ConnId, Endpoint, Handshake, Rejoined, StreamError};

use crate::session::handle::SessionHandle;

mod direct;
mod jobs;
mod mail;

use crate::session::probes::ProbeStats;
use crate::session::{now_ms, record_trust_serial, SessionShared};
pub use jobs::{DispatchJobs, QueueCommands};
pub use mail::{FromInbox, FromMailbox, GreetAgain, OfferTrust};

/// How often unacknowledged commands are checked for a retransmit.
const TICK: Duration = Duration::from_secs(1);
/// Inbound events kept in the journal after processing (replay checks after a restart).
const KEEP_INBOUND: u64 = 1024;
/// Trimmed every this many events, so at most `KEEP_INBOUND + TRIM_EVERY` stay (fewer entries
/// for the journal to carry and compact than trimming once per `KEEP_INBOUND`).
const TRIM_EVERY: u64 = 128;
/// Bytes of one agent's events in the journal's queue at most (see `AgentLink::uncommitted_bytes`).
const MAX_UNCOMMITTED_BYTES: usize = 8 * 1024 * 1024;
/// How long a queued command stays valid.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// Why a link could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentLinkError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("cannot encode a command: {0}")]
    Encode(String),
    #[error("{0}")]
    Internal(String),
}

pub struct AgentLink {
    agent_id: AgentId,
    shared: Arc<SessionShared>,
    keys: StreamKeys,
    receiver: StreamReceiver,
    ep: Endpoint<Vec<u8>>,
    session: Option<(ConnId, SessionHandle)>,
    probes: ProbeStats,
    /// The agent's last reported status (heartbeats).
    status: Option<AgentStatus>,
    last_heard: Option<Instant>,
    /// Events accepted since the inbound log was last trimmed.
    since_trim: u64,
    /// Handshakes that found the agent had lost its state, and the commands that died with it.
    peer_resets: u64,
    abandoned_commands: u64,
    /// Bytes of this agent's events taken and not yet durable: past [`MAX_UNCOMMITTED_BYTES`]
    /// its next events are deferred (the agent resends them), so one agent's flood never
    /// queues unbounded work in the journal every agent shares.
    uncommitted_bytes: usize,
    /// Commits under this link's claim not yet answered (one refused rebuilds the link).
    fenced_in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// When this link last tried to read the agent's stale jobs again (`refresh_jobs`).
    refresh_tried: Option<Instant>,
    /// Events deferred since the budget was last free; a nack asks for them once it is.
    deferred: bool,
    deferred_events: u64,
    /// The serial of the last `Trust` command queued by this link (not again until a newer
    /// set; after a server restart at most once more, which the agent answers as a resend).
    trust_queued: u64,
    /// The attached agent's release understands `Trust` commands.
    trust_capable: bool,
    /// Why its last handshake was refused (cleared by one that succeeds): shown in health,
    /// where `tether health` fails on it.
    refused: Option<String>,
    /// What seals the agent's job secrets, set up for the key of its last `Hello`: `None`
    /// before its first handshake since start, `Some(Err(why))` if it cannot be.
    sealing: Option<Result<Arc<tether_shared::sealing::Sealer>, String>>,
    /// When the agent's facts were last handed to the registry.
    facts_stored: Option<Instant>,
    /// Its release honours `run_as` (its last `Hello` said so).
    runs_as: bool,
    /// On a cluster: this node's claim on the agent, the fence of every commit of the link
    /// (`None` before its first handshake here, and on sled).
    fence: Option<Fence>,
    /// On a cluster: the agent's claim epoch when the link read its state (0: never claimed).
    /// A claim that then lands past the next epoch means another node served the agent in
    /// between, and the state is read again.
    loaded_epoch: u64,
    /// On a cluster whose nodes all serve agents: another node held the claim then.
    loaded_elsewhere: bool,
    /// The last inbox and mailbox entries taken (see `crate::mail`): a look that finds them
    /// again (their deletion not yet committed) skips them.
    inbox_done: Option<String>,
    mail_done: Option<String>,
    /// Commits of the inbox's effects or of mail may still be on their way: a handshake here
    /// waits for them before it reads the inbox and the mailbox.
    remote_writes: bool,
    /// Commands put in the mailbox since it was last counted (see `AgentLink::post`).
    mail_posted: usize,
    /// On a member: the claim epoch its inbox rows are written under, and the next row's
    /// number under it.
    inbox_epoch: u64,
    inbox_next: u64,
    /// On the active node: the agent's incarnation as its last handshake on a member said.
    remote_incarnation: Option<String>,
    /// On a member: what the agent's last handshake here told the active node (told again to
    /// a new active node).
    greeting: Option<crate::mail::Greeting>,
    /// On a member: the agent's inbox rows the active node had not taken when last counted,
    /// plus those written since (see `AgentLink::inbox_full`).
    inbox_rows: usize,
    /// On the active node: the inbox held more than the handshake read (see
    /// `AgentLink::inbox_full`).
    inbox_behind: bool,
    /// On the active node: the stream of the agent a member serves, which this node writes
    /// into (see [`direct`]), and its commits not yet answered.
    direct: Option<direct::Direct>,
    direct_in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// On the active node: a greeting just taken says the member takes no more mail (see
    /// `AgentLink::go_direct`).
    direct_wanted: Option<Fence>,
    /// On a member: the claim on this session's stream, when the active node writes it
    /// (see [`direct`]); and whether its greeting is committed (no more mail is taken then).
    out_fence: Option<Fence>,
    direct_out: bool,
    /// On a member: a read of the stream's records is under way, and another is wanted after
    /// it; a record did not fit (or a read failed): read again later.
    following: bool,
    follow_again: bool,
    tail_behind: bool,
    /// On a member: since when mail waits in the mailbox of an agent whose stream the active
    /// node writes (see `AgentLink::stray_mail`).
    stray_since: Option<Instant>,
    /// On a member: handshakes begun, and when the last one was committed (a read of the
    /// stream made before may hold what a reset removed since).
    handshakes: u64,
    handshake_done: Option<Instant>,
    /// On the active node: this link made commits under a member's claims (see [`direct`]):
    /// one may have been refused, and what it took from the inbox still be there.
    direct_used: std::cell::Cell<bool>,
    /// When this link read the agent's state (see `FromInbox`).
    loaded_at: Instant,
    /// Which reading of the journal this link's state is (a handshake that finds the agent
    /// was served elsewhere reads it again in place): a refused commit of an earlier one was
    /// dealt with by that reading.
    built: u64,
}

/// Numbers the readings of links' state (see `AgentLink::built`).
static BUILT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The id of an encoded command (as journaled in the outbound log).
fn command_id(bytes: &[u8]) -> Option<String> {
    match protocol::decode(bytes, Sender::Server) {
        Ok(Frame::Command(c)) => Some(c.id),
        _ => None,
    }
}

impl AgentLink {
    /// Hands the agent's facts to the registry: at a handshake (`now`), or from a heartbeat
    /// at most every `FACTS_MIN_INTERVAL`.
    fn store_facts(&mut self, facts: tether_shared::facts::Facts, now: bool) {
        let due = now
            || self
                .facts_stored
                .is_none_or(|t| t.elapsed() >= super::FACTS_MIN_INTERVAL);
        if due {
            self.facts_stored = Some(Instant::now());
            super::record_facts(&self.shared, &self.agent_id, facts);
        }
    }

    /// Rebuild the link of `agent_id` from the journal.
    pub fn recover(agent_id: &AgentId, shared: Arc<SessionShared>) -> Result<Self, AgentLinkError> {
        let loaded_at = Instant::now();
        // Before the state it stands for.
        let (loaded_epoch, loaded_elsewhere) = match &shared.claims {
            Some(claims) => claims.held_now(agent_id)?,
            None => (0, false),
        };
        // Where every node serves agents, the node that held it may have written its streams
        // since (where one node serves, the lease fenced the previous one off before this one
        // loaded anything).
        let loaded_elsewhere = loaded_elsewhere && (shared.has_members || shared.member);
        let keys = StreamKeys::server_side(agent_id)?;
        let ep = keys.recover(
            &shared.journal,
            shared.window,
            shared.max_retained,
            shared.rto.as_millis() as u64,
            now_ms(),
        )?;
        let probes = shared
            .journal
            .get_meta(&ProbeStats::meta_key(agent_id))?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default();
        Ok(AgentLink {
            agent_id: agent_id.clone(),
            receiver: keys.receiver(),
            keys,
            ep,
            shared,
            session: None,
            probes,
            status: None,
            last_heard: None,
            since_trim: 0,
            peer_resets: 0,
            abandoned_commands: 0,
            uncommitted_bytes: 0,
            fenced_in_flight: Default::default(),
            refresh_tried: None,
            deferred: false,
            deferred_events: 0,
            trust_queued: 0,
            trust_capable: false,
            refused: None,
            sealing: None,
            facts_stored: None,
            runs_as: false,
            fence: None,
            loaded_epoch,
            loaded_elsewhere,
            inbox_done: None,
            mail_done: None,
            remote_writes: false,
            mail_posted: 0,
            inbox_epoch: 0,
            inbox_next: 0,
            remote_incarnation: None,
            greeting: None,
            inbox_rows: 0,
            inbox_behind: false,
            direct: None,
            direct_in_flight: Default::default(),
            direct_wanted: None,
            out_fence: None,
            direct_out: false,
            following: false,
            follow_again: false,
            tail_behind: false,
            stray_since: None,
            handshakes: 0,
            handshake_done: None,
            direct_used: Default::default(),
            loaded_at,
            built: BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Commits `ops` under the link's claim on the agent, queued now (call order is commit
    /// order).
    fn commit(
        &self,
        ops: Vec<Op>,
    ) -> impl std::future::Future<Output = Result<tether_shared::journal::Committed, JournalError>>
    {
        // The active node's work for an agent it does not serve is not the claim's, unless it
        // writes the agent's stream (see `direct`): then all of it is under the member's
        // claims, so that once one of them moved on, nothing more of it lands.
        let (fence, in_flight) = match self.remote() {
            true => (
                self.direct.as_ref().map(|d| d.fence.clone()),
                &self.direct_in_flight,
            ),
            false => (self.fence.clone(), &self.fenced_in_flight),
        };
        let counted = fence.as_ref().map(|_| {
            in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            in_flight.clone()
        });
        if self.remote() && fence.is_some() {
            self.direct_used.set(true);
        }
        // Queued now, at the call (see `commit_then`).
        let commit = self.shared.journal.commit_under(ops, fence);
        async move {
            let done = commit.await;
            if let Some(counted) = counted {
                counted.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            done
        }
    }

    /// The agent's jobs are stale here (a commit of it was refused, see `fail`): they are read
    /// again, once every commit queued before has landed, with nothing else of this link
    /// running meanwhile (what arrives waits); then what may start is dispatched. If the read
    /// fails they stay stale, and the next need tries again (at most once a second).
    pub(super) fn refresh_jobs(&mut self, ctx: &mut Context<Self>) {
        if self
            .refresh_tried
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.refresh_tried = Some(Instant::now());
        // Queued now: it lands after every commit queued before.
        let landed = self.shared.journal.commit(Vec::new());
        let reload = self.shared.work.reload_agent(&self.agent_id);
        let read = async move {
            let _ = landed.await;
            reload.await
        };
        ctx.wait(read.into_actor(self).map(|res, act, ctx| match res {
            Ok(_) => {
                act.shared.work.take_stale(&act.agent_id);
                tracing::info!(agent_id = %act.agent_id, "agent-jobs-read-again");
                act.dispatch_jobs(ctx);
            }
            Err(e) => {
                tracing::error!(agent_id = %act.agent_id, error = %e, "agent-jobs-not-reloaded")
            }
        }));
    }

    /// Whether commits made under this link's claim (while it served the agent) are still
    /// unanswered: one may yet be refused, which rebuilds the link from the journal.
    pub(super) fn fenced_commits_pending(&self) -> bool {
        self.fenced_in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    }

    /// Whether the claim just made (`fence`) says another node served the agent since this
    /// link read or last claimed it.
    fn claimed_past(&self, fence: &Fence) -> bool {
        match &self.fence {
            Some(held) => held.epoch != fence.epoch,
            None => self.loaded_elsewhere || fence.epoch != self.loaded_epoch + 1,
        }
    }

    fn current(&self, conn: ConnId) -> bool {
        self.session.as_ref().is_some_and(|(c, _)| *c == conn)
    }

    /// A session is attached and its actor still runs.
    fn connected(&self) -> bool {
        self.session.as_ref().is_some_and(|(_, s)| s.connected())
    }

    /// Put on the wire everything the streams allow now.
    fn pump(&mut self) {
        let Some((_, session)) = &self.session else {
            return;
        };
        let mut frames: Vec<Vec<u8>> = self
            .ep
            .outbound
            .poll_transmit(now_ms())
            .into_iter()
            .map(|(_, bytes)| bytes)
            .collect();
        for f in [
            self.receiver.poll_ack(&mut self.ep.inbound),
            self.receiver.poll_nack(&mut self.ep.inbound),
        ]
        .into_iter()
        .flatten()
        {
            match f.encode() {
                Ok(bytes) => frames.push(bytes),
                Err(e) => {
                    tracing::error!(agent_id = %self.agent_id, error = %e, "frame-encode-failed")
                }
            }
        }
        if !frames.is_empty() {
            session.send_frames(frames);
        }
    }

    /// A commit failed: nothing more is acknowledged; the link is rebuilt from the journal.
    /// A commit fenced by a newer claim (the agent's newer session on another node) wrote
    /// nothing: what this node holds of the agent's jobs is read again, and the session is told
    /// to go and come back.
    fn fail(&mut self, ctx: &mut Context<Self>, error: &JournalError) {
        let (code, reason) = if let JournalError::Fenced { claim, epoch } = error {
            if self
                .fence
                .as_ref()
                .is_some_and(|f| f.claim == *claim && f.epoch > *epoch)
            {
                // Made before this link claimed the agent again (and read it again): that
                // claim already dealt with it.
                tracing::debug!(agent_id = %self.agent_id, epoch, "fenced-commit-of-an-older-claim");
                return;
            }
            tracing::warn!(agent_id = %self.agent_id, epoch, "agent-claimed-elsewhere");
            // Its jobs are read again before anything acts on them: at its next handshake here,
            // or by the rebuilt link before it takes what the inbox says of it or dispatches
            // (see `refresh_jobs`).
            self.shared.work.mark_stale(&self.agent_id);
            (
                CloseCode::Restart,
                "a newer session of this agent took it over",
            )
        } else {
            tracing::error!(agent_id = %self.agent_id, error = %error, "link-journal-failed");
            (CloseCode::Internal, "server journal failure")
        };
        if let Some((_, s)) = self.session.take() {
            s.close(code, ErrorCode::Internal, reason.into());
        }
        ctx.stop();
    }

    /// On a member: whether the active node says it writes the streams of the agents members
    /// serve (see [`direct`]).
    fn appends(&self) -> bool {
        self.shared
            .active_appends
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A commit made when the link's state was reading `built` failed: [`Self::fail`], unless
    /// the state was read again since (the reading came after the commit was answered).
    fn failed(&mut self, ctx: &mut Context<Self>, error: &JournalError, built: u64) {
        if built != self.built {
            tracing::debug!(agent_id = %self.agent_id, error = %error, "failed-commit-of-a-link-read-again-since");
            return;
        }
        self.fail(ctx, error);
    }

    fn commit_then(
        &mut self,
        ctx: &mut Context<Self>,
        ops: Vec<Op>,
        then: impl FnOnce(&mut Self, &mut Context<Self>) + 'static,
    ) {
        // Queued now (not when the future is first polled): commit order is call order, which
        // is what makes "a later commit is durable, so every earlier one is" true.
        let commit = self.commit(ops);
        let built = self.built;
        ctx.spawn(commit.into_actor(self).map(move |res, act, ctx| match res {
            Ok(_) => then(act, ctx),
            Err(e) => act.failed(ctx, &e, built),
        }));
    }

    /// An event was accepted: its effect goes into the same batch. Job events change job state
    /// (and a finished job may free a slot: the next queued job's RunJob joins the batch, and
    /// the answered seq must be marked durable once the batch is).
    fn effect_ops(&mut self, frame: &Frame) -> (Vec<Op>, Option<Seq>) {
        let Frame::Event(event) = frame else {
            return (Vec::new(), None);
        };
        let changed = match &event.body {
            EventBody::Probe { n, .. } => {
                self.probes.events.record(*n);
                true
            }
            EventBody::ProbeEcho { n } => {
                if *n != self.probes.echoes.next.max(1) {
                    tracing::warn!(agent_id = %self.agent_id, seq = event.seq.0, n, expected = self.probes.echoes.next, "probe-echo-out-of-order");
                }
                self.probes.echoes.record(*n);
                true
            }
            EventBody::TrustApplied { serial } => {
                tracing::info!(agent_id = %self.agent_id, seq = event.seq.0, serial, "agent-trust-applied");
                record_trust_serial(&self.shared, &self.agent_id, *serial);
                false
            }
            EventBody::TrustRefused { serial, reason } => {
                tracing::warn!(agent_id = %self.agent_id, seq = event.seq.0, serial, reason = %reason, "agent-trust-refused");
                false
            }
            EventBody::CommandExpired { id } => {
                tracing::warn!(agent_id = %self.agent_id, command_id = %id, seq = event.seq.0, "command-expired");
                false
            }
            body => {
                let Some(effect) = self.shared.work.on_event(&self.agent_id, body) else {
                    return (Vec::new(), None);
                };
                let mut ops = effect.ops;
                let mut last = None;
                if effect.slot_freed {
                    match self.take_jobs() {
                        Ok(Some((seq, more))) => {
                            ops.extend(more);
                            last = seq;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(agent_id = %self.agent_id, error = %e, "job-dispatch-failed")
                        }
                    }
                }
                return (ops, last);
            }
        };
        if !changed {
            return (Vec::new(), None);
        }
        match serde_json::to_vec(&self.probes) {
            Ok(v) => (
                vec![Op::PutMeta {
                    key: ProbeStats::meta_key(&self.agent_id),
                    value: v,
                }],
                None,
            ),
            Err(_) => (Vec::new(), None),
        }
    }

    fn on_frame(&mut self, ctx: &mut Context<Self>, conn: ConnId, bytes: &[u8]) {
        let over_budget = self.uncommitted_bytes >= MAX_UNCOMMITTED_BYTES || self.inbox_full();
        let size = bytes.len();
        match self.receiver.on_bytes(&mut self.ep.inbound, bytes, |_| {
            if over_budget {
                Err(FrameError::Deferred)
            } else {
                Ok(())
            }
        }) {
            Ok(Received::Journal {
                seq,
                frame,
                mut ops,
            }) => {
                let (effect, commands) = match self.shared.member {
                    // Its effect is the active node's: the event waits for it in the inbox.
                    true => match frame.encode() {
                        Ok(bytes) => (
                            vec![Op::PutMeta {
                                key: self.inbox_key(crate::mail::Kind::Event),
                                value: bytes,
                            }],
                            None,
                        ),
                        Err(e) => {
                            tracing::error!(agent_id = %self.agent_id, seq = seq.0, error = %e, "event-not-inboxed");
                            return;
                        }
                    },
                    false => self.effect_ops(&frame),
                };
                ops.extend(effect);
                self.since_trim += 1;
                if self.since_trim >= TRIM_EVERY {
                    ops.extend(self.keys.trim_inbound_ops(seq, KEEP_INBOUND));
                    self.since_trim = 0;
                }
                self.uncommitted_bytes += size;
                self.commit_then(ctx, ops, move |act, _| {
                    act.uncommitted_bytes = act.uncommitted_bytes.saturating_sub(size);
                    act.ep.inbound.mark_durable(seq);
                    if let Some(last) = commands {
                        act.ep.outbound.mark_durable(last);
                    }
                    if act.deferred && act.uncommitted_bytes < MAX_UNCOMMITTED_BYTES / 2 {
                        act.deferred = false;
                        act.ep.inbound.ask_resend();
                    }
                    act.pump();
                });
            }
            Ok(Received::Nothing) => self.pump(),
            Ok(Received::Other(frame)) => self.on_control(ctx, conn, frame),
            Err(FrameError::Deferred) => {
                if !self.deferred {
                    tracing::debug!(agent_id = %self.agent_id, uncommitted = self.uncommitted_bytes, "events-deferred");
                }
                self.deferred = true;
                self.deferred_events += 1;
            }
            Err(e) => self.refuse(conn, &e),
        }
    }

    fn on_control(&mut self, ctx: &mut Context<Self>, conn: ConnId, frame: Frame) {
        match frame {
            Frame::Ack(ack) if ack.stream == StreamId::Commands => {
                match self.ep.outbound.on_ack(conn, ack.upto, now_ms()) {
                    AckOutcome::Advanced(upto) => {
                        let ops = self.keys.acked_ops(upto);
                        self.commit_then(ctx, ops, |_, _| {});
                        if self.tail_behind {
                            // Room again for what the active node wrote.
                            self.follow(ctx);
                        }
                        self.pump();
                    }
                    AckOutcome::Duplicate => {}
                    AckOutcome::Stale | AckOutcome::Bogus => {
                        tracing::warn!(agent_id = %self.agent_id, upto = ack.upto.0, "ack-ignored");
                    }
                }
            }
            Frame::Nack(nack) if nack.stream == StreamId::Commands => {
                if self.ep.outbound.on_nack(conn, nack.from) {
                    self.pump();
                }
            }
            Frame::Heartbeat(hb) if self.shared.member => {
                // Trust is the active node's; facts go to it through the inbox.
                self.shared.presence.touch(&self.agent_id, None);
                self.inbox_drained();
                if let Some(facts) = hb.status.and_then(|s| s.facts) {
                    self.inbox_facts(ctx, facts);
                }
            }
            Frame::Heartbeat(hb) => {
                self.shared.presence.touch(&self.agent_id, None);
                self.inbox_drained();
                let held = self.shared.registry.trust_serial(&self.agent_id);
                self.offer_trust(ctx, held);
                if let Some(mut status) = hb.status {
                    if let Some(facts) = status.facts.take() {
                        self.store_facts(facts, false);
                    }
                    self.status = Some(status);
                }
            }
            Frame::Error(e) => {
                tracing::warn!(agent_id = %self.agent_id, code = ?e.code, message = %e.message, "agent-reported-error");
            }
            other => {
                let e = FrameError::Refused(format!(
                    "unexpected {} frame after the handshake",
                    other.kind()
                ));
                self.refuse(conn, &e);
            }
        }
    }

    fn refuse(&mut self, conn: ConnId, e: &FrameError) {
        tracing::warn!(agent_id = %self.agent_id, conn = conn.0, error = %e, "frame-refused");
        if let Some((_, s)) = &self.session {
            let error = match e {
                FrameError::Decode(d) => d.to_error_frame().code,
                FrameError::Stream(_) | FrameError::Refused(_) | FrameError::Deferred => {
                    ErrorCode::ProtocolViolation
                }
            };
            s.close(e.close_code(), error, e.to_string());
        }
    }

    /// Queues a `Trust` command with the set in force if the agent holds an older one (`held`:
    /// what it said in its Hello, or confirmed since) and none is queued for that set yet.
    pub(super) fn offer_trust(&mut self, ctx: &mut Context<Self>, held: u64) {
        let serial = self.shared.trust.rotation().serial;
        if !self.trust_capable || self.trust_queued >= serial || held >= serial {
            return;
        }
        let body = CommandBody::Trust {
            set: self.shared.trust.set(),
        };
        match self.enqueue(vec![body]) {
            Ok((last, ops)) => {
                self.trust_queued = serial;
                tracing::info!(agent_id = %self.agent_id, seq = last.0, serial, "agent-trust-queued");
                self.commit_then(ctx, ops, move |act, _| {
                    act.ep.outbound.mark_durable(last);
                    act.pump();
                });
            }
            // The backlog is full: offered again at the next beat.
            Err(e) => {
                tracing::warn!(agent_id = %self.agent_id, error = %e, "agent-trust-not-queued")
            }
        }
    }

    /// Number, sign and journal commands; they go out once durable.
    fn enqueue(&mut self, bodies: Vec<CommandBody>) -> Result<(Seq, Vec<Op>), AgentLinkError> {
        self.enqueue_until(bodies, &[])
    }

    /// [`Self::enqueue`], command `i` valid until `deadlines[i]` (Unix ms) if given, else for
    /// the default (24 h from now).
    fn enqueue_until(
        &mut self,
        bodies: Vec<CommandBody>,
        deadlines: &[Option<u64>],
    ) -> Result<(Seq, Vec<Op>), AgentLinkError> {
        // For an agent this node does not serve, the mailbox has a bound of its own.
        if !self.remote() && !self.ep.outbound.has_room(bodies.len()) {
            return Err(StreamError::Backlog {
                in_flight: self.ep.outbound.unacked(),
                limit: self.shared.max_retained,
            }
            .into());
        }
        if self.remote() {
            self.direct_room(bodies.len())?;
        }
        // If any command fails, none is committed: the numbers given are free again.
        let direct_next = self.direct_next();
        let numbered = self.number_all(bodies, deadlines);
        if numbered.is_err() {
            self.rewind_direct(direct_next);
        }
        numbered
    }

    /// [`Self::enqueue_until`]'s commands, numbered.
    fn number_all(
        &mut self,
        bodies: Vec<CommandBody>,
        deadlines: &[Option<u64>],
    ) -> Result<(Seq, Vec<Op>), AgentLinkError> {
        let default_deadline = now_ms() + DEFAULT_DEADLINE.as_millis() as u64;
        let mut ops = Vec::with_capacity(bodies.len() + 1);
        let mut last = Seq::ZERO;
        for (i, body) in bodies.into_iter().enumerate() {
            let deadline = deadlines
                .get(i)
                .copied()
                .flatten()
                .unwrap_or(default_deadline);
            if let CommandBody::Probe { .. } = body {
                self.probes.commands_sent += 1;
            }
            let id = hex::encode(rand::random::<[u8; 12]>());
            let signed = command_signing_bytes(&self.agent_id, &id, deadline, &body)
                .map_err(|e| AgentLinkError::Encode(e.to_string()))?;
            let mut command = Command::new(Seq::ZERO, id, deadline, body)
                .map_err(|e| AgentLinkError::Encode(e.to_string()))?;
            command.signature = self.shared.trust.sign(&signed);
            last = self.number(command, &mut ops)?;
        }
        if let Ok(v) = serde_json::to_vec(&self.probes) {
            ops.push(Op::PutMeta {
                key: ProbeStats::meta_key(&self.agent_id),
                value: v,
            });
        }
        Ok((last, ops))
    }

    /// Give a signed command the next number and journal it (its signature does not cover
    /// the number, so a command enqueued again after a rejoin keeps it).
    fn number(&mut self, mut command: Command, ops: &mut Vec<Op>) -> Result<Seq, AgentLinkError> {
        if self.remote() {
            return match self.direct.is_some() {
                true => self.append_direct(command, ops),
                false => self.post(&command, ops),
            };
        }
        command.seq = self
            .ep
            .outbound
            .next_seq()
            .ok_or(StreamError::SeqExhausted)?;
        let bytes = self.append_op(&command, ops)?;
        Ok(self.ep.outbound.enqueue(bytes, now_ms())?)
    }

    /// Appends `command` (numbered) to the agent's command stream in `ops`; returns it as
    /// sent.
    fn append_op(&self, command: &Command, ops: &mut Vec<Op>) -> Result<Vec<u8>, AgentLinkError> {
        let bytes = Frame::Command(command.clone())
            .encode()
            .map_err(|e| AgentLinkError::Encode(e.to_string()))?;
        ops.push(Op::Append {
            log: self.keys.out_log.clone(),
            seq: command.seq,
            payload: bytes.clone(),
        });
        Ok(bytes)
    }

    /// What seals job secrets for an agent whose `Hello` gave `key`, or why nothing can.
    fn sealer(&self, key: &str) -> Result<Arc<tether_shared::sealing::Sealer>, String> {
        if key.is_empty() {
            return Err(crate::deployments::NO_SEALING_KEY.to_owned());
        }
        tether_shared::sealing::Sealer::new(key)
            .map(Arc::new)
            .map_err(|e| {
                tracing::warn!(agent_id = %self.agent_id, error = %e, "agent-sealing-key-unusable");
                format!("the agent's sealing key is unusable ({e})")
            })
    }

    /// This server was found behind the agent (restored from a backup taken before their last
    /// exchanges; see `Endpoint::rejoin`). The streams continue after what the agent holds;
    /// the commands still retained go again under new numbers, after a `Reconcile` asking the
    /// agent for its jobs if it can answer one. Returns the ops for the handshake's batch and
    /// the last seq enqueued.
    fn on_behind(
        &mut self,
        rejoined: Rejoined<Vec<u8>>,
        reconciles: bool,
    ) -> (Vec<Op>, Option<Seq>) {
        tracing::warn!(
            agent_id = %self.agent_id,
            events_lost = rejoined.inbound_lost,
            commands_lost = rejoined.outbound_lost,
            resent = rejoined.resend.len(),
            "server-behind-agent"
        );
        let mut ops = self.keys.rejoin_ops(
            &rejoined,
            self.ep.inbound.durable(),
            self.ep.outbound.acked(),
        );
        ops.push(self.shared.work.on_behind(
            &self.agent_id,
            rejoined.inbound_lost,
            rejoined.outbound_lost,
            reconciles,
        ));
        let mut last = None;
        if reconciles && self.ep.outbound.has_room(rejoined.resend.len() + 1) {
            match self.enqueue(vec![CommandBody::Reconcile {}]) {
                Ok((seq, more)) => {
                    ops.extend(more);
                    last = Some(seq);
                }
                Err(e) => {
                    tracing::error!(agent_id = %self.agent_id, error = %e, "reconcile-not-queued")
                }
            }
        }
        for retained in rejoined.resend {
            let command = match protocol::decode(&retained.payload, Sender::Server) {
                Ok(Frame::Command(c)) => c,
                _ => continue,
            };
            match self.number(command, &mut ops) {
                Ok(seq) => last = Some(seq),
                Err(e) => {
                    tracing::error!(agent_id = %self.agent_id, error = %e, "command-not-requeued")
                }
            }
        }
        (ops, last)
    }

    /// Commit queued commands; the answer (and so the REST answer) comes once they are durable,
    /// after `then`.
    fn commit_queued(
        &mut self,
        last: Seq,
        ops: Vec<Op>,
        then: Option<Box<dyn FnOnce() + Send>>,
    ) -> ResponseActFuture<Self, Result<Seq, AgentLinkError>> {
        let commit = self.commit(ops);
        let built = self.built;
        Box::pin(commit.into_actor(self).map(move |res, act, ctx| match res {
            Ok(_) => {
                if let Some(then) = then {
                    then();
                }
                act.ep.outbound.mark_durable(last);
                act.pump();
                Ok(last)
            }
            Err(e) => {
                act.failed(ctx, &e, built);
                Err(e.into())
            }
        }))
    }
}

impl Actor for AgentLink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
        ctx.run_interval(TICK, |act, ctx| {
            act.ep.outbound.on_tick(now_ms());
            act.pump();
            if act.tail_behind && act.session.is_some() {
                // A read of the stream that failed, or a record that did not fit.
                act.follow(ctx);
            }
        });
    }
}

/// A verified session of this agent starts: run the stream handshake.
#[derive(Message)]
#[rtype(result = "Result<Welcome, AgentLinkError>")]
pub struct Attach {
    pub conn: ConnId,
    pub hello: Hello,
    pub session: SessionHandle,
}

type Attached = ResponseActFuture<AgentLink, Result<Welcome, AgentLinkError>>;

impl Handler<Attach> for AgentLink {
    /// Atomic: nothing else reaches the link until the handshake is committed (or refused).
    type Result = AtomicResponse<Self, Result<Welcome, AgentLinkError>>;

    /// On a cluster the agent is claimed first (see `crate::claims`): nothing of the
    /// handshake is committed before this node holds it. If another node served the agent
    /// since this link read it, or a commit of this node was fenced, what this node holds of
    /// the agent (its jobs, then its streams) is read again from the journal first.
    fn handle(&mut self, msg: Attach, _: &mut Self::Context) -> Self::Result {
        let Some(claims) = &self.shared.claims else {
            return AtomicResponse::new(self.attach(msg));
        };
        let claiming = claims.claim(&self.agent_id, self.fence.as_ref());
        // On a member: the claim on this session's stream is raised with the claim on the
        // agent, so that whatever the active node wrote for an earlier session writes nothing
        // from then on, and what it wrote before is read after both (see `direct`): before
        // this session takes any mail, and whether the active node writes its stream or not.
        let member = self.shared.member;
        self.handshakes += 1;
        let raising = member.then(|| claims.raise(&crate::mail::out_claim(&self.agent_id)));
        let tail = member.then(|| {
            direct::read_tail(
                self.shared.journal.clone(),
                self.keys.out_log.clone(),
                self.ep.outbound.assigned(),
                self.shared.max_retained,
            )
        });
        // What this node wrote for the agent while another served it lands first: the
        // handshake reads the inbox and the mailbox.
        let flush =
            std::mem::take(&mut self.remote_writes).then(|| self.shared.journal.commit(Vec::new()));
        let agent_id = self.agent_id.clone();
        let claiming = async move {
            if let Some(flush) = flush {
                if let Err(e) = flush.await {
                    tracing::warn!(error = %e, "remote-writes-not-flushed");
                }
            }
            let claimed = claiming.await?;
            let out = match raising {
                Some(raising) => Some(raising.await.inspect_err(|e| {
                    tracing::warn!(agent_id = %agent_id, error = %e, "stream-claim-not-raised");
                })?),
                None => None,
            };
            let records = match tail {
                Some(tail) => tail.await?,
                None => Vec::new(),
            };
            Ok::<_, JournalError>((claimed, out, records))
        };
        AtomicResponse::new(Box::pin(claiming.into_actor(self).then(
            move |claimed, act, _| -> Attached {
                let (fence, out, records) = match claimed {
                    Ok(fence) => fence,
                    Err(e) => {
                        tracing::warn!(agent_id = %act.agent_id, error = %e, "agent-not-claimed");
                        return Box::pin(fut::ready(Err(e.into())));
                    }
                };
                let moved = act.claimed_past(&fence);
                let stale = act.shared.work.take_stale(&act.agent_id);
                if !moved && !stale {
                    act.fence = Some(fence);
                    act.take_records(records);
                    act.out_fence = out.filter(|_| act.appends());
                    return act.attach(msg);
                }
                tracing::warn!(agent_id = %act.agent_id, epoch = fence.epoch, moved, "link-reloaded-after-a-claim-elsewhere");
                let reload = act.shared.work.reload_agent(&act.agent_id);
                Box::pin(reload.into_actor(act).then(move |reloaded, act, _| -> Attached {
                    if let Err(e) = reloaded {
                        act.shared.work.mark_stale(&act.agent_id);
                        return Box::pin(fut::ready(Err(AgentLinkError::Internal(e.to_string()))));
                    }
                    if moved {
                        match AgentLink::recover(&act.agent_id, act.shared.clone()) {
                            Ok(mut fresh) => {
                                // (Unless it committed under a member's claims: one such
                                // commit may have been refused, and what it took be there
                                // still, to be taken again. Every commit has landed now.)
                                if !act.direct_used.get() {
                                    fresh.inbox_done = act.inbox_done.take();
                                    fresh.mail_done = act.mail_done.take();
                                }
                                fresh.handshakes = act.handshakes;
                                *act = fresh;
                            }
                            Err(e) => return Box::pin(fut::ready(Err(e))),
                        }
                    }
                    act.fence = Some(fence);
                    act.take_records(records);
                    act.out_fence = out.filter(|_| act.appends());
                    act.attach(msg)
                }))
            },
        )))
    }
}

impl AgentLink {
    /// The stream handshake of a verified session (claimed, on a cluster).
    fn attach(&mut self, msg: Attach) -> ResponseActFuture<Self, Result<Welcome, AgentLinkError>> {
        let conn = msg.conn;
        let hello = msg.hello;
        let member = self.shared.member;
        self.ep.begin(conn);
        let knows_us = hello.server_incarnation == self.shared.incarnation;
        // Resuming with an agent that knows this incarnation (and holds every command it
        // acknowledged, or it is refused below): is this server behind it?
        let rejoined = if knows_us
            && self.ep.peer_incarnation.as_deref() == Some(hello.incarnation.as_str())
            && hello.last_command_seq >= self.ep.outbound.acked()
        {
            let held = hello.last_command_id.as_str();
            self.ep
                .rejoin(hello.events_acked, hello.last_command_seq, |bytes| {
                    held.is_empty() || command_id(bytes).as_deref() == Some(held)
                })
        } else {
            None
        };
        if member && rejoined.is_some() {
            // Settling a server restored behind the agent is the active node's work.
            let why = "this server is behind the agent: it settles with the active node";
            tracing::warn!(agent_id = %self.agent_id, "member-refused-a-rejoin");
            self.refused = Some(why.to_owned());
            return Box::pin(fut::ready(Err(AgentLinkError::Internal(why.to_owned()))));
        }
        let outcome = self.ep.complete(
            conn,
            &hello.incarnation,
            knows_us,
            hello.last_command_seq,
            now_ms(),
        );
        let outcome = match outcome {
            Ok(o) => {
                self.refused = None;
                o
            }
            Err(e) => {
                tracing::error!(agent_id = %self.agent_id, error = %e, "agent-refused");
                self.refused = Some(e.to_string());
                return Box::pin(fut::ready(Err(e.into())));
            }
        };
        if let Handshake::PeerReset {
            previous,
            abandoned,
        } = &outcome
        {
            // The job layer fails the work these carried; the stream itself starts over.
            tracing::warn!(agent_id = %self.agent_id, previous = %previous, incarnation = %hello.incarnation, abandoned = abandoned.len(), "agent-lost-state");
            self.peer_resets += 1;
            self.abandoned_commands += abandoned.len() as u64;
            // Probe series are numbered per agent incarnation.
            self.probes = ProbeStats::default();
        }
        let reset = matches!(outcome, Handshake::PeerReset { .. });
        let reset_jobs = match reset && !member {
            true => self.shared.work.on_reset(&self.agent_id),
            false => Vec::new(),
        };
        let path = msg.session.path().to_vec();
        self.session = Some((conn, msg.session));
        self.last_heard = Some(Instant::now());
        self.trust_capable = tether_shared::trust::understood_by(&hello.version);
        self.runs_as = hello.runs_as;
        self.shared
            .work
            .operations()
            .set_capable(&self.agent_id, hello.operations);
        if !hello.facts.is_empty() && !member {
            self.store_facts(hello.facts.clone(), true);
        }
        self.sealing = Some(self.sealer(&hello.sealing_key));
        let mut ops = self.keys.handshake_ops(&outcome, &hello.incarnation);
        if member {
            // The active node learns what the agent takes, whether it lost its state, and
            // whether it writes the agent's stream from now on (see `direct`).
            self.direct_out = false;
            let node = self.shared.claims.as_ref().map_or("", |c| c.node());
            let mut greeting = crate::mail::Greeting::of(&hello, reset, node, &path);
            greeting.appends = self.out_fence.as_ref().map(|f| f.epoch);
            greeting.claim_epoch = self.fence.as_ref().map_or(0, |f| f.epoch);
            self.greeting = Some(crate::mail::Greeting {
                reset: false,
                ..greeting.clone()
            });
            match serde_json::to_vec(&greeting) {
                Ok(v) => ops.push(Op::PutMeta {
                    key: self.inbox_key(crate::mail::Kind::Greeting),
                    value: v,
                }),
                Err(e) => {
                    tracing::error!(agent_id = %self.agent_id, error = %e, "greeting-not-inboxed")
                }
            }
        }
        if reset && !member {
            if let Ok(v) = serde_json::to_vec(&self.probes) {
                ops.push(Op::PutMeta {
                    key: ProbeStats::meta_key(&self.agent_id),
                    value: v,
                });
            }
        }
        ops.extend(reset_jobs);
        // Its last connection, stored with the handshake (at most every few minutes).
        let seen_at = now_ms();
        let seen_op = match member {
            true => None,
            false => self.shared.registry.seen_op(&self.agent_id, seen_at),
        };
        let seen_stored = seen_op.is_some();
        ops.extend(seen_op);
        let mut requeued = None;
        if let Some(rejoined) = rejoined {
            let (more, last) = self.on_behind(rejoined, hello.reconciles);
            ops.extend(more);
            requeued = last;
        }
        if self.mails() {
            // What the active node wrote into the stream for an earlier session is in it now
            // (read after this session's claims): its bell has nothing more to say.
            ops.push(Op::DeleteMeta {
                key: crate::mail::bell_key(&self.agent_id),
            });
            // What waited for the agent while no node, or another, served it: the commands of
            // the mailbox go first, then what the inbox's events still have to do.
            let (more, last) = self.take_mail(self.mail_now());
            ops.extend(more);
            requeued = last.or(requeued);
            if !member {
                let entries = self.inbox_now();
                let (more, last) = self.take_inbox(entries);
                ops.extend(more);
                requeued = last.or(requeued);
            }
        }
        // Queued now, before any later commit of this link.
        let commit = (!ops.is_empty()).then(|| self.commit(ops));
        Box::pin(
            async move {
                if let Some(commit) = commit {
                    commit.await?;
                }
                Ok::<(), AgentLinkError>(())
            }
            .into_actor(self)
            .map(move |res, act, ctx| {
                if let Err(AgentLinkError::Journal(e)) = &res {
                    act.fail(ctx, e);
                }
                res?;
                if seen_stored {
                    act.shared.registry.note_seen(&act.agent_id, seen_at);
                }
                if let Some(last) = requeued {
                    act.ep.outbound.mark_durable(last);
                }
                let welcome = Welcome {
                    last_event_seq: act.ep.inbound.durable(),
                    server_incarnation: act.shared.incarnation.clone(),
                    heartbeat_interval_ms: act.shared.heartbeat_interval.as_millis() as u64,
                };
                tracing::info!(agent_id = %act.agent_id, conn = conn.0, last_event_seq = welcome.last_event_seq.0, last_command_seq = hello.last_command_seq.0, "agent-attached");
                act.pump();
                if act.shared.member {
                    // From now on the active node writes the stream, if it said so.
                    act.direct_out = act.out_fence.is_some();
                    act.handshake_done = Some(Instant::now());
                    // Jobs, trust and the agent's record are the active node's.
                    return Ok(welcome);
                }
                // Jobs waiting for this agent (after a reset, or left from before a restart).
                act.dispatch_jobs(ctx);
                record_trust_serial(&act.shared, &act.agent_id, hello.trust_serial);
                if hello.trust_serial < act.trust_queued {
                    // It lost what was queued (a reinstall): queue it again.
                    act.trust_queued = 0;
                }
                act.offer_trust(ctx, hello.trust_serial);
                Ok(welcome)
            }),
        )
    }
}

/// Bytes the current (or an old) session received from the agent.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromAgent {
    pub conn: ConnId,
    pub bytes: Vec<u8>,
}

impl Handler<FromAgent> for AgentLink {
    type Result = ();

    fn handle(&mut self, msg: FromAgent, ctx: &mut Self::Context) {
        if !self.current(msg.conn) {
            return;
        }
        self.last_heard = Some(Instant::now());
        self.on_frame(ctx, msg.conn, &msg.bytes);
    }
}

/// The session `conn` ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Detach {
    pub conn: ConnId,
}

impl Handler<Detach> for AgentLink {
    type Result = ();

    fn handle(&mut self, msg: Detach, ctx: &mut Self::Context) {
        if self.current(msg.conn) {
            self.session = None;
            self.ep.disconnect();
            let node = self.shared.claims.as_ref().map(|c| c.node().to_owned());
            if let (true, Some(node)) = (self.shared.member, node) {
                // The active node learns that the agent left (unless another node claimed
                // it since: then this writes nothing).
                let key = self.inbox_key(crate::mail::Kind::Departure);
                let ops = vec![Op::PutMeta {
                    key,
                    value: node.into_bytes(),
                }];
                let commit = self.commit(ops);
                let agent_id = self.agent_id.clone();
                ctx.spawn(
                    async move {
                        if let Err(e) = commit.await {
                            tracing::debug!(agent_id = %agent_id, error = %e, "departure-not-noted");
                        }
                    }
                    .into_actor(self),
                );
            }
        }
    }
}

/// A snapshot of the link for health, metrics and the probe check.
#[derive(Debug, Clone, Serialize)]
pub struct LinkHealth {
    pub agent_id: AgentId,
    pub connected: bool,
    /// Commands not yet acknowledged by the agent, and the age of the oldest.
    pub unacked_commands: usize,
    pub oldest_unacked_ms: Option<u64>,
    pub commands_acked: u64,
    pub events_received: u64,
    pub stale_acks: u64,
    pub bogus_acks: u64,
    pub retransmits: u64,
    pub duplicates: u64,
    pub last_heard_ms: Option<u64>,
    pub probes: ProbeStats,
    pub status: Option<AgentStatus>,
    pub peer_resets: u64,
    pub abandoned_commands: u64,
    /// Events put off because too much of this agent's journal work was queued.
    pub events_deferred: u64,
    /// Why its last handshake was refused, until one succeeds.
    pub refused: Option<String>,
}

#[derive(Message)]
#[rtype(result = "LinkHealth")]
pub struct ObserveLink;

impl Handler<ObserveLink> for AgentLink {
    type Result = MessageResult<ObserveLink>;

    fn handle(&mut self, _: ObserveLink, _: &mut Self::Context) -> Self::Result {
        let stats = self.ep.outbound.stats();
        let now = now_ms();
        MessageResult(LinkHealth {
            agent_id: self.agent_id.clone(),
            connected: self.connected(),
            unacked_commands: self.ep.outbound.unacked(),
            oldest_unacked_ms: self
                .ep
                .outbound
                .oldest_unacked_ms()
                .map(|t| now.saturating_sub(t)),
            commands_acked: self.ep.outbound.acked().0,
            events_received: self.ep.inbound.durable().0,
            stale_acks: stats.stale_acks,
            bogus_acks: stats.bogus_acks,
            retransmits: stats.retransmits,
            duplicates: self.ep.inbound.duplicates,
            last_heard_ms: self.last_heard.map(|t| t.elapsed().as_millis() as u64),
            probes: self.probes,
            status: self.status.clone(),
            peer_resets: self.peer_resets,
            abandoned_commands: self.abandoned_commands,
            events_deferred: self.deferred_events,
            refused: self.refused.clone(),
        })
    }
}

/// Queue `commands` numbered probe commands and ask the agent for `events` probe events.
#[derive(Message)]
#[rtype(result = "Result<Seq, AgentLinkError>")]
pub struct QueueProbes {
    pub commands: u64,
    pub events: u64,
}

impl Handler<QueueProbes> for AgentLink {
    type Result = ResponseActFuture<Self, Result<Seq, AgentLinkError>>;

    fn handle(&mut self, msg: QueueProbes, _: &mut Self::Context) -> Self::Result {
        let base = self.probes.commands_sent;
        let mut bodies: Vec<CommandBody> = (1..=msg.commands)
            .map(|i| CommandBody::Probe {
                n: base + i,
                data: format!("probe {}", base + i),
            })
            .collect();
        if msg.events > 0 {
            bodies.push(CommandBody::EmitProbes { count: msg.events });
        }
        if bodies.is_empty() {
            return Box::pin(fut::ready(Ok(self.ep.outbound.assigned())));
        }
        match self.enqueue(bodies) {
            Ok((last, ops)) => self.commit_queued(last, ops, None),
            Err(e) => Box::pin(fut::ready(Err(e))),
        }
    }
}
