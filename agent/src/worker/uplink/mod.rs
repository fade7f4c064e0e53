//! `Uplink`: the worker's one connection to its upstream (a server or a relay), and both
//! message streams over it.
//!
//! It dials out only (`wss://…/agent/v1/ws`, rustls trusting the installed CA alone), answers
//! the server's challenge with a `Hello` signed by the agent's key, and on `Welcome` resumes
//! both streams from the watermarks (the sans-IO [`Endpoint`], rebuilt from the journal when
//! the actor starts). Commands are verified against the server's trusted signing keys before
//! anything about them is recorded; each accepted command is journaled together with its
//! effect (the events it causes) before it is acked. Events are journaled before they are
//! sent. On any failure it reconnects with jittered exponential backoff, trying the listed
//! upstreams in order and starting again from the first after a connection ends.
//!
//! - [`jobs`]: the job runner (every transition journaled with its event).
//! - [`upgrade`]: the upgrade driver (drain, download, stage, exit for the swap, report).
//! - [`trust`]: the server's new signing keys and CAs (a rollover) put in force.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::io::WriteHandler;
use actix::prelude::*;
use awc::error::WsProtocolError;
use tether_shared::dialer::{busy_delay, Dialer, DialerConfig, Dials, Incoming, Plan};
use tether_shared::e2e::{AgentGate, AgentStep, MAX_SEALED_BYTES};
use tether_shared::identity::Identity;
use tether_shared::journal::{JournalHandle, Op};
use tether_shared::link::{
    decode_u64, verify_command, LinkError, Received, StreamKeys, StreamReceiver,
};
use tether_shared::protocol::{
    self, hello_proof_bytes, AgentStatus, CommandBody, Event, EventBody, Frame, Heartbeat, Hello,
    Sender, Seq, StreamId,
};
use tether_shared::stream::{AckOutcome, Endpoint, Handshake};
use tether_shared::trust::Pinned;

use crate::worker::jobs::runner::{Generation, RunnerSlot};
use crate::worker::supervisor::Ping;

mod jobs;
pub mod operations;
mod trust;
mod upgrade;
use crate::worker::upgrade::driver::{Driver, Offer};

/// Meta keys of the probe generator's durable state.
const PROBE_NEXT: &str = "probe/next";
const PROBE_TODO: &str = "probe/todo";
/// Most probe events generated per journal batch.
const PROBE_BATCH: u64 = 256;
/// Inbound commands kept in the journal after processing (replay checks after a restart).
const KEEP_INBOUND: u64 = 1024;
/// How often unacknowledged events are checked for a retransmit.
const TICK: Duration = Duration::from_secs(1);

/// Everything the uplink needs that does not change while the worker runs.
pub struct UplinkConfig {
    pub agent_id: String,
    /// The agent's configuration as `--check-config` shows it (secrets masked), for
    /// diagnostics bundles.
    pub diagnostics_config: String,
    /// Whom steps may run as (`run_as`), and where their directories go.
    pub run_as: Arc<crate::worker::jobs::run_as::Policy>,
    pub version: String,
    /// Shared with the step runners, which sign bulk downloads with it.
    pub identity: Arc<Identity>,
    /// Opens job secrets sealed for this agent; its public half goes in every `Hello`.
    pub sealing: Arc<tether_shared::sealing::SealingKey>,
    /// That public half, standard base64.
    pub sealing_key: String,
    /// The server's signing keys and the CAs trusted upstream: pinned at install, replaced by
    /// the server's `Trust` commands (a rollover).
    pub trust: Arc<Pinned>,
    /// `wss://host:port/agent/v1/ws`, in order of preference.
    pub upstreams: Vec<String>,
    pub journal: JournalHandle,
    pub window: u64,
    pub max_retained: usize,
    pub rto: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Spread over the upstreams (see `tether_shared::dialer::placement`).
    pub spread: bool,
    /// Heartbeat interval until the server's Welcome names one.
    pub heartbeat_interval: Duration,
    /// The worker's status (actor health), sent in every heartbeat.
    pub status: Arc<std::sync::Mutex<Option<AgentStatus>>>,
    /// Where jobs get their working directories.
    pub work_dir: std::path::PathBuf,
    /// Where unpacked plugin bundles are cached (`DATA/plugins`).
    pub plugin_dir: std::path::PathBuf,
    /// Where `artifact/fetch` caches verified artifacts (`DATA/cache/artifacts`).
    pub artifact_cache: std::path::PathBuf,
    /// The data directory (upgrades are staged in `DATA/upgrade`).
    pub data_dir: std::path::PathBuf,
    /// How long an upgrade waits for running steps before it is abandoned.
    pub upgrade_drain_timeout: Duration,
    /// How long a finished job's record and work directory stay once its end is acknowledged.
    pub job_retention: Duration,
    /// Where the step runner is (rebuilt apart from the uplink by the supervisor).
    pub runner: RunnerSlot,
}

/// Where the handshake on an open connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The end-to-end handshake with the server runs (through any relays).
    Securing,
    AwaitChallenge,
    AwaitWelcome,
}

pub struct Uplink {
    cfg: Arc<UplinkConfig>,
    keys: StreamKeys,
    receiver: StreamReceiver,
    ep: Endpoint<Vec<u8>>,
    dial: Dialer,
    step: Step,
    /// End-to-end protection of the current connection: the handshake, then sealed frames.
    gate: Option<AgentGate>,
    /// When our last heartbeat went out, and how often the server wants one.
    last_beat_sent: Instant,
    heartbeat: Duration,
    /// When our facts last went out (in the `Hello`, then every `facts::REFRESH`).
    facts_sent: Instant,
    /// Probe events still to emit and the next number.
    probe_next: u64,
    probe_todo: u64,
    generating: bool,
    /// Inbound commands accepted since the log was last trimmed.
    since_trim: u64,
    /// The jobs this agent holds.
    jobs: jobs::Jobs,
    /// The step runner adopted, and its generation.
    runner: Option<Generation>,
    /// The upgrade underway, if any (journaled), and its progress.
    upgrade: Driver,
    /// Raised when the actor stops: a package download in flight gives up.
    upgrade_stop: Arc<AtomicBool>,
}

pub(crate) use tether_shared::clock::now_unix_ms as now_ms;

impl Uplink {
    /// Build from the journal (the truth after any restart).
    pub fn recover(cfg: Arc<UplinkConfig>) -> Result<Self, tether_shared::journal::JournalError> {
        let keys = StreamKeys::agent_side()?;
        let ep = keys.recover(
            &cfg.journal,
            cfg.window,
            cfg.max_retained,
            cfg.rto.as_millis() as u64,
            now_ms(),
        )?;
        let meta = |k: &str| -> Result<u64, tether_shared::journal::JournalError> {
            Ok(cfg
                .journal
                .get_meta(k)?
                .as_deref()
                .and_then(decode_u64)
                .unwrap_or(0))
        };
        let probe_next = meta(PROBE_NEXT)?.max(1);
        let probe_todo = meta(PROBE_TODO)?;
        Ok(Uplink {
            receiver: keys.receiver(),
            keys,
            ep,
            dial: Dialer::new(DialerConfig {
                upstreams: cfg.upstreams.clone(),
                spread_as: cfg.spread.then(|| cfg.agent_id.clone()),
                path: "",
                max_frame: MAX_SEALED_BYTES,
                reconnect_min: cfg.reconnect_min,
                reconnect_max: cfg.reconnect_max,
            }),
            step: Step::Securing,
            gate: None,
            last_beat_sent: Instant::now(),
            facts_sent: Instant::now(),
            heartbeat: cfg.heartbeat_interval,
            probe_next,
            probe_todo,
            generating: false,
            since_trim: 0,
            jobs: jobs::Jobs::load(&cfg.journal)?,
            runner: None,
            upgrade: upgrade::load_driver(&cfg.journal)?,
            upgrade_stop: Arc::new(AtomicBool::new(false)),
            cfg,
        })
    }

    /// The id of the command held at `seq` (the last one), so that a server restored behind
    /// this agent tells its own command so numbered from this one.
    fn last_command_id(&self, seq: Seq) -> String {
        let Some(before) = seq.0.checked_sub(1) else {
            return String::new();
        };
        match self
            .cfg
            .journal
            .read_log(self.receiver.log(), Seq(before), 1)
        {
            Ok(entries) => entries
                .into_iter()
                .find(|e| e.seq == seq)
                .and_then(|e| match protocol::decode(&e.payload, Sender::Server) {
                    Ok(Frame::Command(c)) => Some(c.id),
                    _ => None,
                })
                .unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "last-command-unreadable");
                String::new()
            }
        }
    }

    fn send(&mut self, frame: &Frame) {
        match frame.encode() {
            Ok(bytes) => self.send_bytes(bytes),
            Err(e) => tracing::error!(error = %e, "frame-encode-failed"),
        }
    }

    /// An encoded frame, sealed for the server (nothing goes out before the handshake).
    fn send_bytes(&mut self, bytes: Vec<u8>) {
        match self.gate.as_mut().map(|g| g.seal(&bytes)) {
            Some(Ok(sealed)) => self.send_raw(sealed),
            Some(Err(e)) => tracing::error!(error = %e, "frame-seal-failed"),
            None => {}
        }
    }

    fn send_raw(&mut self, bytes: Vec<u8>) {
        self.dial.send(bytes);
    }

    /// Before the handshake is done, a relay or the server may only say it is busy or refuse
    /// us, in clear: a JSON frame (a Noise message is binary and never starts with `{`).
    fn on_clear_frame(&mut self, ctx: &mut Context<Self>, bytes: &[u8]) {
        match protocol::decode(bytes, Sender::Server) {
            Ok(Frame::Busy(b)) => {
                tracing::info!(retry_after_ms = b.retry_after_ms, "server-busy");
                self.hang_up(ctx, Some(busy_delay(b.retry_after_ms)));
            }
            Ok(Frame::Error(e)) => {
                tracing::error!(code = ?e.code, message = %e.message, "server-refused-session");
                self.hang_up(ctx, None);
            }
            Ok(other) => self.violation(ctx, &format!("{} in clear", other.kind())),
            Err(e) => self.violation(ctx, &e.to_string()),
        }
    }

    /// Put on the wire everything the streams allow now.
    fn pump(&mut self) {
        if !self.dial.is_ready() {
            return;
        }
        for (_, bytes) in self.ep.outbound.poll_transmit(now_ms()) {
            self.send_bytes(bytes);
        }
        let control: Vec<Frame> = [
            self.receiver.poll_ack(&mut self.ep.inbound),
            self.receiver.poll_nack(&mut self.ep.inbound),
        ]
        .into_iter()
        .flatten()
        .collect();
        for f in control {
            self.send(&f);
        }
    }

    fn commit_then(
        &mut self,
        ctx: &mut Context<Self>,
        ops: Vec<Op>,
        then: impl FnOnce(&mut Self, &mut Context<Self>) + 'static,
    ) {
        ctx.spawn(self.cfg.journal.commit(ops).into_actor(self).map(
            move |res, act, ctx| match res {
                Ok(_) => then(act, ctx),
                // A full disk: stay offline (nothing can be acknowledged) until the worker
                // starts over once the disk takes writes again (see `worker::run`).
                Err(e) if act.cfg.journal.observe().poisoned.is_some() => {
                    tracing::error!(error = %e, "uplink-storage-failed-offline");
                    act.hang_up(ctx, None);
                }
                Err(e) => {
                    // Nothing more can be acknowledged: die, and be rebuilt from the journal.
                    tracing::error!(error = %e, "uplink-journal-failed");
                    ctx.stop();
                }
            },
        ));
    }

    /// Number and encode an event; returns its journal op (the caller commits it).
    fn event_op(&mut self, body: EventBody) -> Option<(Seq, Op)> {
        let seq = self.ep.outbound.next_seq()?;
        let event = Event::new(seq, body).ok()?;
        let bytes = Frame::Event(event).encode().ok()?;
        let op = Op::Append {
            log: self.keys.out_log.clone(),
            seq,
            payload: bytes.clone(),
        };
        self.ep.outbound.enqueue(bytes, now_ms()).ok()?;
        Some((seq, op))
    }

    fn on_frame(&mut self, ctx: &mut Context<Self>, bytes: &[u8]) {
        let Some(gate) = self.gate.as_mut() else {
            return;
        };
        if !gate.is_open() && is_clear_refusal(bytes) {
            return self.on_clear_frame(ctx, bytes);
        }
        let cfg = &self.cfg;
        let anchors = cfg.trust.current();
        let step = gate.on_message(bytes, &anchors.keys, &cfg.agent_id, &cfg.identity);
        let frame = match step {
            Ok(AgentStep::Send(last)) => {
                self.send_raw(last);
                self.step = Step::AwaitChallenge;
                return;
            }
            Ok(AgentStep::Frame(frame)) => frame,
            // The server refuses the handshake's last message (an agent it no longer knows)
            // before anything is sealed: its reason comes in clear.
            Err(_) if is_clear_refusal(bytes) => return self.on_clear_frame(ctx, bytes),
            Err(e) => return self.violation(ctx, &e.to_string()),
        };
        let bytes = frame.as_slice();
        if self.dial.is_ready() {
            return self.on_stream_frame(ctx, bytes);
        }
        match self.step {
            Step::AwaitChallenge => match protocol::decode(bytes, Sender::Server) {
                Ok(Frame::Challenge(c)) => {
                    let last_command_seq = self.ep.begin(self.dial.conn());
                    let hello = Hello {
                        agent_id: self.cfg.agent_id.clone(),
                        version: self.cfg.version.clone(),
                        incarnation: self.cfg.journal.incarnation().to_owned(),
                        server_incarnation: self.ep.peer_incarnation.clone().unwrap_or_default(),
                        last_command_seq,
                        proof: self
                            .cfg
                            .identity
                            .sign(&hello_proof_bytes(&c.nonce, &self.cfg.agent_id)),
                        trust_serial: self.cfg.trust.current().serial,
                        events_acked: if self.ep.peer_incarnation.is_some() {
                            self.ep.outbound.acked()
                        } else {
                            Seq::ZERO
                        },
                        last_command_id: self.last_command_id(last_command_seq),
                        reconciles: true,
                        sealing_key: self.cfg.sealing_key.clone(),
                        facts: tether_shared::facts::collect(&self.cfg.data_dir),
                        runs_as: true,
                        operations: true,
                    };
                    self.facts_sent = Instant::now();
                    self.send(&Frame::Hello(hello));
                    self.step = Step::AwaitWelcome;
                }
                Ok(Frame::Busy(b)) => {
                    tracing::info!(retry_after_ms = b.retry_after_ms, "server-busy");
                    self.hang_up(ctx, Some(busy_delay(b.retry_after_ms)));
                }
                Ok(other) => {
                    self.violation(ctx, &format!("expected challenge, got {}", other.kind()))
                }
                Err(e) => self.violation(ctx, &e.to_string()),
            },
            Step::AwaitWelcome => match protocol::decode(bytes, Sender::Server) {
                Ok(Frame::Welcome(w)) => self.on_welcome(ctx, w),
                Ok(Frame::Error(e)) => {
                    tracing::error!(code = ?e.code, message = %e.message, "server-refused-hello");
                    self.hang_up(ctx, None);
                }
                Ok(other) => {
                    self.violation(ctx, &format!("expected welcome, got {}", other.kind()))
                }
                Err(e) => self.violation(ctx, &e.to_string()),
            },
            Step::Securing => {}
        }
    }

    fn on_welcome(&mut self, ctx: &mut Context<Self>, w: tether_shared::protocol::Welcome) {
        let outcome = match self.ep.complete(
            self.dial.conn(),
            &w.server_incarnation,
            true,
            w.last_event_seq,
            now_ms(),
        ) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "resync-refused");
                return self.hang_up(ctx, None);
            }
        };
        if let Handshake::PeerReset {
            previous,
            abandoned,
        } = &outcome
        {
            tracing::warn!(previous = %previous, incarnation = %w.server_incarnation, abandoned = abandoned.len(), "server-lost-state");
        }
        let ops = self.keys.handshake_ops(&outcome, &w.server_incarnation);
        self.heartbeat = Duration::from_millis(w.heartbeat_interval_ms.clamp(100, 600_000));
        // Ready at once: the server may send commands right behind its Welcome. Commits run in
        // call order, so anything journaled from here on lands after the handshake's own ops.
        if !ops.is_empty() {
            self.commit_then(ctx, ops, |_, _| {});
        }
        self.dial.set_ready();
        tracing::info!(
            conn = self.dial.conn().0,
            last_event_seq = w.last_event_seq.0,
            commands_held = self.ep.inbound.durable().0,
            "uplink-ready"
        );
        self.pump();
        self.generate(ctx);
    }

    fn on_stream_frame(&mut self, ctx: &mut Context<Self>, bytes: &[u8]) {
        let room = self.ep.outbound.has_room(1);
        let anchors = self.cfg.trust.current();
        let agent_id = &self.cfg.agent_id;
        let check = |frame: &Frame| -> Result<(), LinkError> {
            verify_command(frame, agent_id, &anchors.keys)?;
            if !room {
                // The event backlog is full.
                return Err(LinkError::Deferred);
            }
            Ok(())
        };
        match self.receiver.on_bytes(&mut self.ep.inbound, bytes, check) {
            Ok(Received::Journal {
                seq,
                frame,
                mut ops,
            }) => {
                let Frame::Command(command) = frame else {
                    return;
                };
                let expired = now_ms() > command.deadline_ms;
                let mut job_to_drive = None;
                let mut drive_upgrade = false;
                let mut restart_worker = false;
                let effect = match &command.body {
                    CommandBody::Upgrade {
                        version,
                        sha256,
                        size,
                        signature,
                    } => {
                        drive_upgrade = true;
                        let offer = Offer {
                            version,
                            sha256,
                            size: *size,
                            signature,
                            expired,
                        };
                        self.accept_upgrade(offer, &mut ops).map(|s| (s, None))
                    }
                    CommandBody::RunJob {
                        job_id,
                        deployment_id,
                        steps,
                    } => {
                        let seq = if expired {
                            self.expire_job(job_id, deployment_id, &mut ops)
                        } else {
                            job_to_drive = Some(job_id.clone());
                            self.accept_job(job_id, deployment_id, steps.clone(), &mut ops)
                        };
                        seq.map(|s| (s, None))
                    }
                    CommandBody::CancelJob { job_id } => {
                        self.accept_cancel(job_id, &mut ops);
                        job_to_drive = Some(job_id.clone());
                        None
                    }
                    // Never too late: its serial, not its deadline, says whether it is current.
                    CommandBody::Trust { set } => self
                        .event_op(self.apply_trust(set))
                        .map(|(s, op)| (s, Some(op))),
                    _ if expired => self
                        .event_op(EventBody::CommandExpired {
                            id: command.id.clone(),
                        })
                        .map(|(s, op)| (s, Some(op))),
                    CommandBody::Probe { n, .. } => self
                        .event_op(EventBody::ProbeEcho { n: *n })
                        .map(|(s, op)| (s, Some(op))),
                    CommandBody::Reconcile {} => self.report_jobs(&mut ops).map(|s| (s, None)),
                    CommandBody::Operate { op_id, op } => {
                        let (answer, restart) = self.operate(op_id, *op);
                        restart_worker = restart;
                        self.event_op(answer).map(|(s, op)| (s, Some(op)))
                    }
                    // For relays; an agent has no certificate to renew.
                    CommandBody::RelayCertificate { .. } => None,
                    CommandBody::EmitProbes { count } => {
                        self.probe_todo = self.probe_todo.saturating_add(*count);
                        ops.push(Op::PutMeta {
                            key: PROBE_TODO.into(),
                            value: self.probe_todo.to_be_bytes().to_vec(),
                        });
                        None
                    }
                };
                let event_seq = effect.map(|(s, op)| {
                    ops.extend(op);
                    s
                });
                self.since_trim += 1;
                if self.since_trim >= KEEP_INBOUND {
                    ops.extend(self.keys.trim_inbound_ops(seq, KEEP_INBOUND));
                    self.since_trim = 0;
                }
                self.commit_then(ctx, ops, move |act, ctx| {
                    act.ep.inbound.mark_durable(seq);
                    if let Some(s) = event_seq {
                        act.ep.outbound.mark_durable(s);
                    }
                    act.pump();
                    act.generate(ctx);
                    if let Some(job) = job_to_drive {
                        act.advance(ctx, &job);
                    }
                    if drive_upgrade {
                        act.drive_upgrade(ctx);
                    }
                    if restart_worker {
                        // The answer is durable: it goes out after the restart at the latest.
                        tracing::warn!("worker-restart-requested");
                        System::current().stop_with_code(operations::RESTART_EXIT_CODE);
                    }
                });
            }
            Ok(Received::Nothing) => self.pump(),
            Ok(Received::Other(frame)) => self.on_control(ctx, frame),
            Err(LinkError::Deferred) => {
                // Not recorded at all: the server resends it once our events are acked.
                tracing::debug!("command-deferred");
            }
            Err(e) => {
                tracing::warn!(error = %e, "frame-refused");
                self.send(&Frame::Error(protocol::ErrorFrame {
                    code: protocol::ErrorCode::ProtocolViolation,
                    message: e.to_string(),
                    details: Default::default(),
                }));
                self.hang_up(ctx, None);
            }
        }
    }

    fn on_control(&mut self, ctx: &mut Context<Self>, frame: Frame) {
        match frame {
            Frame::Ack(a) if a.stream == StreamId::Events => {
                if let AckOutcome::Advanced(upto) =
                    self.ep.outbound.on_ack(self.dial.conn(), a.upto, now_ms())
                {
                    let ops = self.keys.acked_ops(upto);
                    self.commit_then(ctx, ops, |_, _| {});
                    self.pump();
                    self.generate(ctx);
                    self.resume_after_acks(ctx);
                    self.drive_upgrade(ctx);
                }
            }
            Frame::Nack(n) if n.stream == StreamId::Events => {
                if self.ep.outbound.on_nack(self.dial.conn(), n.from) {
                    self.pump();
                }
            }
            Frame::Heartbeat(_) => {}
            Frame::Error(e) => {
                tracing::warn!(code = ?e.code, message = %e.message, "server-reported-error")
            }
            other => self.violation(ctx, &format!("unexpected {} frame", other.kind())),
        }
    }

    /// Emit pending probe events, a batch at a time, as the window allows.
    fn generate(&mut self, ctx: &mut Context<Self>) {
        if self.generating || self.probe_todo == 0 {
            return;
        }
        let mut ops = Vec::new();
        let mut last = None;
        let mut made = 0;
        // Probes never take the room kept for step and job ends.
        while made < PROBE_BATCH.min(self.probe_todo)
            && self.ep.outbound.has_room(jobs::CONTROL_RESERVE + 1)
        {
            let n = self.probe_next + made;
            match self.event_op(EventBody::Probe {
                n,
                data: format!("event {n}"),
            }) {
                Some((seq, op)) => {
                    ops.push(op);
                    last = Some(seq);
                    made += 1;
                }
                None => break,
            }
        }
        let Some(last) = last else { return };
        self.probe_next += made;
        self.probe_todo -= made;
        ops.push(Op::PutMeta {
            key: PROBE_NEXT.into(),
            value: self.probe_next.to_be_bytes().to_vec(),
        });
        ops.push(Op::PutMeta {
            key: PROBE_TODO.into(),
            value: self.probe_todo.to_be_bytes().to_vec(),
        });
        self.generating = true;
        self.commit_then(ctx, ops, move |act, ctx| {
            act.generating = false;
            act.ep.outbound.mark_durable(last);
            act.pump();
            act.generate(ctx);
        });
    }

    fn beat(&mut self, ctx: &mut Context<Self>) {
        if !self.dial.is_ready() {
            return;
        }
        if self.dial.silent_for() > self.heartbeat * 3 {
            tracing::warn!(
                silent_ms = self.dial.silent_for().as_millis() as u64,
                "server-silent"
            );
            return self.hang_up(ctx, None);
        }
        // The timer ticks at most every second; beat at the interval the server named.
        if self.last_beat_sent.elapsed() < self.heartbeat {
            return;
        }
        self.last_beat_sent = Instant::now();
        // Times this hop for the next beat's figures and the test connection.
        self.dial.ping();
        let mut status = self.cfg.status.lock().ok().and_then(|s| s.clone());
        if let Some(s) = status.as_mut() {
            if self.facts_sent.elapsed() >= tether_shared::facts::REFRESH {
                self.facts_sent = Instant::now();
                s.facts = Some(tether_shared::facts::collect(&self.cfg.data_dir));
            }
            let figures = self.figures();
            s.running_jobs = u32::try_from(figures.steps_running).unwrap_or(u32::MAX);
            s.figures = Some(figures);
        }
        self.send(&Frame::Heartbeat(Heartbeat {
            sent_ms: now_ms(),
            status,
        }));
    }
}

impl Dials for Uplink {
    fn dialer(&mut self) -> &mut Dialer {
        &mut self.dial
    }

    /// Not while the disk refuses writes: nothing could be acknowledged.
    fn plan(&self) -> Plan {
        if self.cfg.journal.observe().poisoned.is_some() {
            Plan::Later(self.cfg.reconnect_max)
        } else {
            Plan::Dial(self.cfg.trust.current().tls.clone())
        }
    }

    /// The agent speaks first: the end-to-end handshake's first message, in clear.
    fn on_open(&mut self, _: &mut Context<Self>) {
        self.step = Step::Securing;
        match AgentGate::start() {
            Ok((gate, first)) => {
                self.gate = Some(gate);
                self.send_raw(first);
            }
            Err(e) => tracing::error!(error = %e, "e2e-start-failed"),
        }
    }

    fn on_message(&mut self, ctx: &mut Context<Self>, bytes: &[u8]) {
        self.on_frame(ctx, bytes);
    }

    fn on_close(&mut self, _: &mut Context<Self>) {
        self.ep.disconnect();
        self.gate = None;
    }
}

impl Actor for Uplink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::info!(
            events_unacked = self.ep.outbound.unacked(),
            commands_held = self.ep.inbound.durable().0,
            "uplink-started"
        );
        self.clear_stale_result();
        self.adopt_runner(ctx);
        self.drive_upgrade(ctx);
        self.dial(ctx);
        ctx.run_interval(TICK, |act, ctx| {
            act.ep.outbound.on_tick(now_ms());
            act.adopt_runner(ctx);
            act.pump();
            act.drive_upgrade(ctx);
            act.prune_jobs(ctx);
        });
        let hb = self.heartbeat;
        ctx.run_interval(hb.min(Duration::from_secs(1)), |act, ctx| act.beat(ctx));
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.stop_upgrade_work();
    }
}

impl StreamHandler<Incoming> for Uplink {
    /// Each connection's stream ends with `Incoming::Ended`; the actor lives on.
    fn finished(&mut self, _: &mut Self::Context) {}

    fn handle(&mut self, msg: Incoming, ctx: &mut Self::Context) {
        self.on_incoming(msg, ctx);
    }
}

impl WriteHandler<WsProtocolError> for Uplink {
    /// A failed write ends that connection's writer (its socket is then released); the read
    /// side sees the connection end and reconnects. `Continue` would keep a dead writer retrying
    /// its close forever, holding the socket.
    fn error(&mut self, err: WsProtocolError, _: &mut Self::Context) -> Running {
        tracing::warn!(error = %err, "uplink-write-failed");
        Running::Stop
    }

    /// A closed sink ends one connection, not the actor (the default would stop it).
    fn finished(&mut self, _: &mut Self::Context) {}
}

impl Handler<Ping> for Uplink {
    type Result = String;

    fn handle(&mut self, _: Ping, _: &mut Self::Context) -> String {
        self.dial.state().label().into()
    }
}

/// A `Busy` or `Error` frame in clear (a handshake message is binary, but may start with `{`).
fn is_clear_refusal(bytes: &[u8]) -> bool {
    bytes.first() == Some(&b'{')
        && matches!(
            protocol::decode(bytes, Sender::Server),
            Ok(Frame::Busy(_) | Frame::Error(_))
        )
}
