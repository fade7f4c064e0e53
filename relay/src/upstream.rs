//! `Upstream`: the relay's one WebSocket to its parent (the server or another relay), and the
//! table of channels it carries.
//!
//! It connects to `/relay/v1/ws` of the first upstream that answers (failing over in order, and
//! back to the first after a session that worked), proves the relay's identity with its own key,
//! and then multiplexes (see [`tether_shared::mux`]): each downstream agent, each child relay's
//! own handshake, and each channel a child relay carries, is one channel. Frames are forwarded
//! verbatim; the relay reads only the mux header. Nothing is stored: reliability is end to end
//! between the agents' and the server's journals, so when the link drops every downstream
//! session is closed, and the agents reconnect and resume from their journals.
//!
//! One slow agent never holds up the others: frames for an agent go to its session's bounded
//! mailbox with `try_send`, and an agent whose mailbox is full is dropped (the relay tells the
//! server its channel closed; the agent reconnects and resumes).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::io::WriteHandler;
use actix::prelude::*;
use awc::error::WsProtocolError;
use tether_shared::close::CloseCode;
use tether_shared::dialer::{busy_delay, Dialer, DialerConfig, Dials, Incoming, LinkState, Plan};
use tether_shared::identity::Identity;
use tether_shared::mux::{
    self, ChannelKind, Mux, Open, LINK_CHANNEL, MAX_MUX_BYTES, RELAY_WS_PATH,
};
use tether_shared::protocol::{
    self, hello_proof_bytes, ActorHealth, AgentFigures, AgentStatus, ErrorCode, Event, EventBody,
    Frame, Heartbeat, Hello, Sender, Seq,
};

use crate::child_relay::{ChildFrame, ChildRelay, CloseChild};
use crate::downstream::{AgentDown, CloseDown, ToDown};
use crate::upgrade::LinkNews;

/// Everything the link needs, fixed at start.
pub struct UpstreamConfig {
    /// `wss://host:port` base URLs, in order of preference.
    pub upstreams: Vec<String>,
    /// The server's keys and the CAs trusted upstream, in force now (replaced by a rollover).
    pub trust: std::sync::Arc<tether_shared::trust::Pinned>,
    pub identity: Identity,
    pub relay_id: String,
    /// The version reported upstream (the package's when running an upgrade).
    pub version: String,
    pub heartbeat_interval: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

/// Our own handshake on an open link, before mux mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    AwaitChallenge,
    AwaitWelcome,
}

/// Who is behind one of our channels.
enum Down {
    Agent(Addr<AgentDown>),
    /// A child relay's own channel: its handshake, then its heartbeats.
    ChildLink {
        session: Addr<ChildRelay>,
    },
    /// Channel `ch` of child relay link `child`.
    ChildChannel {
        session: Addr<ChildRelay>,
        child: u64,
        ch: u32,
    },
}

/// Counters for the admin endpoint.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct UpstreamStats {
    pub connects: u64,
    pub disconnects: u64,
    pub frames_up: u64,
    pub frames_down: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub channels_opened: u64,
    pub shed_slow_agents: u64,
    pub refused_not_ready: u64,
}

pub struct Upstream {
    cfg: UpstreamConfig,
    dial: Dialer,
    step: Step,
    next_ch: u32,
    channels: HashMap<u32, Down>,
    /// (child link, child's channel) -> our channel.
    by_child: HashMap<(u64, u32), u32>,
    /// How often we beat: our configured interval, or the parent's if it asks for less.
    beat_every: Duration,
    /// How long the parent may stay silent: a few of its intervals.
    silence_limit: Duration,
    last_beat: Instant,
    stats: UpstreamStats,
    /// Told when the link is ready or drops, and given the relay's own commands.
    upgrader: Option<Recipient<LinkNews>>,
    /// Sequence number of our own events on this connection.
    own_seq: u64,
    /// Draining for a re-exec: no link, no reconnect.
    draining: bool,
}

impl Upstream {
    pub fn new(cfg: UpstreamConfig) -> Self {
        let interval = cfg.heartbeat_interval;
        Upstream {
            dial: Dialer::new(DialerConfig {
                upstreams: cfg.upstreams.clone(),
                spread_as: None,
                path: RELAY_WS_PATH,
                max_frame: MAX_MUX_BYTES,
                reconnect_min: cfg.reconnect_min,
                reconnect_max: cfg.reconnect_max,
            }),
            cfg,
            step: Step::AwaitChallenge,
            next_ch: 0,
            channels: HashMap::new(),
            by_child: HashMap::new(),
            beat_every: interval,
            silence_limit: silence_limit(interval),
            last_beat: Instant::now(),
            stats: UpstreamStats::default(),
            upgrader: None,
            own_seq: 0,
            draining: false,
        }
    }

    fn write(&mut self, bytes: Vec<u8>) {
        let len = bytes.len() as u64;
        if self.dial.send(bytes) {
            self.stats.frames_up += 1;
            self.stats.bytes_up += len;
        }
    }

    fn send_v1(&mut self, frame: &Frame, wrapped: bool) {
        match frame.encode() {
            Ok(bytes) if wrapped => self.write(mux::data(LINK_CHANNEL, &bytes)),
            Ok(bytes) => self.write(bytes),
            Err(e) => tracing::error!(error = %e, "frame-encode-failed"),
        }
    }

    fn on_frame(&mut self, ctx: &mut Context<Self>, bytes: &[u8]) {
        self.stats.frames_down += 1;
        self.stats.bytes_down += bytes.len() as u64;
        match self.dial.state() {
            LinkState::Handshaking => self.on_handshake(ctx, bytes),
            LinkState::Ready => match Mux::decode(bytes) {
                Ok(Mux::Data { ch, frame }) => self.on_data(ctx, ch, frame),
                Ok(Mux::Close { ch, code, reason }) => {
                    if let Some(down) = self.channels.remove(&ch) {
                        if let Down::ChildChannel { child, ch: c, .. } = &down {
                            self.by_child.remove(&(*child, *c));
                        }
                        close_down(&down, code, &reason);
                    }
                }
                Ok(Mux::Open { .. }) => self.violation(ctx, "the upstream opened a channel"),
                Err(e) => self.violation(ctx, &e.to_string()),
            },
            LinkState::Idle | LinkState::Connecting => {}
        }
    }

    /// Our own handshake, on the raw link before mux mode.
    fn on_handshake(&mut self, ctx: &mut Context<Self>, bytes: &[u8]) {
        match (self.step, protocol::decode(bytes, Sender::Server)) {
            (Step::AwaitChallenge, Ok(Frame::Challenge(c))) => {
                let proof = self
                    .cfg
                    .identity
                    .sign(&hello_proof_bytes(&c.nonce, &self.cfg.relay_id));
                let hello = Frame::Hello(Hello {
                    agent_id: self.cfg.relay_id.clone(),
                    version: self.cfg.version.clone(),
                    incarnation: String::new(),
                    server_incarnation: String::new(),
                    last_command_seq: Seq::ZERO,
                    proof,
                    trust_serial: self.cfg.trust.current().serial,
                    ..Default::default()
                });
                self.send_v1(&hello, false);
                self.step = Step::AwaitWelcome;
            }
            (Step::AwaitWelcome, Ok(Frame::Welcome(w))) => {
                let theirs = Duration::from_millis(w.heartbeat_interval_ms.clamp(100, 600_000));
                self.beat_every = self.cfg.heartbeat_interval.min(theirs);
                self.silence_limit = silence_limit(theirs.max(self.cfg.heartbeat_interval));
                self.dial.set_ready();
                self.stats.connects += 1;
                tracing::info!(upstream = ?self.dial.connected_to(), "upstream-ready");
                if let Some(u) = &self.upgrader {
                    u.do_send(LinkNews::Ready {
                        conn: self.dial.conn().0,
                    });
                }
            }
            (_, Ok(Frame::Busy(b))) => {
                tracing::info!(retry_after_ms = b.retry_after_ms, "upstream-busy");
                self.hang_up(ctx, Some(busy_delay(b.retry_after_ms)));
            }
            (_, Ok(Frame::Error(e))) => {
                tracing::warn!(code = ?e.code, message = %e.message, "upstream-refused");
                self.hang_up(ctx, None);
            }
            (_, other) => {
                let got = other.map(|f| f.kind());
                self.violation(ctx, &format!("unexpected handshake frame {got:?}"));
            }
        }
    }

    fn on_data(&mut self, ctx: &mut Context<Self>, ch: u32, frame: Vec<u8>) {
        if ch == LINK_CHANNEL {
            // The parent's heartbeats, errors about the link itself, and the server's commands
            // for this relay (its upgrades).
            match protocol::decode(&frame, Sender::Server) {
                Ok(Frame::Error(e)) => {
                    tracing::warn!(code = ?e.code, message = %e.message, "upstream-reported-error")
                }
                Ok(Frame::Command(c)) => match &self.upgrader {
                    Some(u) => u.do_send(LinkNews::Command(c)),
                    None => tracing::warn!("relay-command-ignored"),
                },
                _ => {}
            }
            return;
        }
        let Some(down) = self.channels.get(&ch) else {
            return;
        };
        match down {
            Down::Agent(session) => {
                if session.try_send(ToDown(frame)).is_err() {
                    // Full (a slow agent) or gone: shed it; it reconnects and resumes.
                    self.stats.shed_slow_agents += 1;
                    tracing::warn!(ch, "agent-shed-queue-full");
                    self.close_channel(ch, CloseCode::Busy, "relay queue full for this agent");
                }
            }
            Down::ChildLink { session } => session.do_send(ChildFrame::Link(frame)),
            Down::ChildChannel { session, ch: c, .. } => {
                if session
                    .try_send(ChildFrame::Raw(mux::data(*c, &frame)))
                    .is_err()
                {
                    self.stats.shed_slow_agents += 1;
                    tracing::warn!(ch, "child-relay-shed-queue-full");
                    let _ = ctx;
                    self.close_child_link_of(ch);
                }
            }
        }
    }

    /// Close our channel `ch` both ways.
    fn close_channel(&mut self, ch: u32, code: CloseCode, reason: &str) {
        if let Some(down) = self.channels.remove(&ch) {
            if let Down::ChildChannel { child, ch: c, .. } = &down {
                self.by_child.remove(&(*child, *c));
            }
            close_down(&down, code, reason);
            self.write(
                Mux::Close {
                    ch,
                    code,
                    reason: reason.to_owned(),
                }
                .encode(),
            );
        }
    }

    /// A child relay that cannot keep up loses its whole link.
    fn close_child_link_of(&mut self, ch: u32) {
        if let Some(Down::ChildChannel { session, .. }) = self.channels.get(&ch) {
            session.do_send(CloseChild {
                code: CloseCode::Busy,
                reason: "relay queue full".into(),
            });
        }
    }

    fn open(&mut self, down: Down, kind: ChannelKind, path: Vec<String>, peer: String) -> u32 {
        self.next_ch = self.next_ch.wrapping_add(1).max(1);
        while self.channels.contains_key(&self.next_ch) {
            self.next_ch = self.next_ch.wrapping_add(1).max(1);
        }
        let ch = self.next_ch;
        self.channels.insert(ch, down);
        self.stats.channels_opened += 1;
        self.write(
            Mux::Open {
                ch,
                open: Open { kind, path, peer },
            }
            .encode(),
        );
        ch
    }

    fn beat(&mut self, ctx: &mut Context<Self>) {
        if matches!(self.dial.state(), LinkState::Idle | LinkState::Connecting) {
            return;
        }
        if self.dial.silent_for() > self.silence_limit {
            tracing::warn!(
                silent_ms = self.dial.silent_for().as_millis() as u64,
                "upstream-silent"
            );
            return self.hang_up(ctx, None);
        }
        if !self.dial.is_ready() || self.last_beat.elapsed() < self.beat_every {
            return;
        }
        self.last_beat = Instant::now();
        let (agents, _) = self.counts();
        let status = AgentStatus {
            version: self.cfg.version.clone(),
            running_jobs: agents as u32,
            load_milli: load_milli(),
            actors: vec![ActorHealth {
                name: "upstream".into(),
                kind: "Upstream".into(),
                state: "running".into(),
                restarts: 0,
                last_beat_ms: 0,
            }],
            facts: None,
            figures: Some(AgentFigures {
                uplink_rtt_us: self.dial.rtt_us(),
                ..tether_shared::metrics::process::heartbeat_figures()
            }),
        };
        // Times this hop for the next beat (the server composes a test connection's hops).
        self.dial.ping();
        let frame = Frame::Heartbeat(Heartbeat {
            sent_ms: now_ms(),
            status: Some(status),
        });
        self.send_v1(&frame, true);
    }

    /// (agent channels, child relay channels).
    fn counts(&self) -> (usize, usize) {
        let agents = self
            .channels
            .values()
            .filter(|d| matches!(d, Down::Agent(_)))
            .count();
        (agents, self.channels.len() - agents)
    }
}

/// Silence tolerated from a parent beating every `interval`.
fn silence_limit(interval: Duration) -> Duration {
    interval * 3 + Duration::from_secs(2)
}

fn close_down(down: &Down, code: CloseCode, reason: &str) {
    match down {
        Down::Agent(s) => s.do_send(CloseDown {
            code,
            reason: reason.to_owned(),
        }),
        Down::ChildLink { session } => session.do_send(CloseChild {
            code,
            reason: reason.to_owned(),
        }),
        Down::ChildChannel { session, ch, .. } => session.do_send(ChildFrame::Raw(
            Mux::Close {
                ch: *ch,
                code,
                reason: reason.to_owned(),
            }
            .encode(),
        )),
    }
}

use tether_shared::clock::now_unix_ms as now_ms;

/// One-minute load average times 1000 (0 if unknown).
fn load_milli() -> u32 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |l| (l * 1000.0) as u32)
}

impl Dials for Upstream {
    fn dialer(&mut self) -> &mut Dialer {
        &mut self.dial
    }

    fn plan(&self) -> Plan {
        if self.draining {
            Plan::Hold
        } else {
            Plan::Dial(self.cfg.trust.current().tls.clone())
        }
    }

    fn on_open(&mut self, _: &mut Context<Self>) {
        self.step = Step::AwaitChallenge;
        self.own_seq = 0;
    }

    fn on_message(&mut self, ctx: &mut Context<Self>, bytes: &[u8]) {
        self.on_frame(ctx, bytes);
    }

    /// Every downstream session goes with the link (they reconnect and resume).
    fn on_close(&mut self, _: &mut Context<Self>) {
        self.stats.disconnects += 1;
        let dropped = self.channels.len();
        for (_, down) in self.channels.drain() {
            close_down(&down, CloseCode::Restart, "relay lost its upstream");
        }
        self.by_child.clear();
        tracing::info!(dropped_channels = dropped, "upstream-dropped");
        if let Some(u) = &self.upgrader {
            u.do_send(LinkNews::Down);
        }
    }
}

impl Actor for Upstream {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(65_536);
        self.dial(ctx);
        let tick = self.cfg.heartbeat_interval.min(Duration::from_millis(500));
        ctx.run_interval(tick, |act, ctx| act.beat(ctx));
    }
}

impl StreamHandler<Incoming> for Upstream {
    fn finished(&mut self, _: &mut Self::Context) {}

    fn handle(&mut self, msg: Incoming, ctx: &mut Self::Context) {
        self.on_incoming(msg, ctx);
    }
}

impl WriteHandler<WsProtocolError> for Upstream {
    /// A failed write ends that connection's writer (`Stop` finishes its `SinkWrite` future and
    /// drops the sink; `finished` below keeps the actor). `Continue` would leave the future
    /// polled, and failing, on every wake of this actor forever, holding the socket open: one
    /// leaked fd and a growing stream of these warnings per upstream connection that ended with
    /// a reset. The read side of the same connection reports the failure and drops it.
    fn error(&mut self, err: WsProtocolError, _: &mut Self::Context) -> Running {
        tracing::warn!(error = %err, "upstream-write-failed");
        Running::Stop
    }

    fn finished(&mut self, _: &mut Self::Context) {}
}

/// Who hears about the link and gets the relay's own commands.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetUpgrader(pub Recipient<LinkNews>);

impl Handler<SetUpgrader> for Upstream {
    type Result = ();

    fn handle(&mut self, msg: SetUpgrader, _: &mut Self::Context) {
        self.upgrader = Some(msg.0);
    }
}

/// An event about the relay itself (its upgrades), sent on its own channel if the link is
/// ready (numbered per connection; not journaled: the relay reports its state again).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SendOwnEvent(pub EventBody);

impl Handler<SendOwnEvent> for Upstream {
    type Result = ();

    fn handle(&mut self, msg: SendOwnEvent, _: &mut Self::Context) {
        if !self.dial.is_ready() {
            tracing::info!(event = ?msg.0, "relay-event-not-sent-link-down");
            return;
        }
        self.own_seq += 1;
        match Event::new(Seq(self.own_seq), msg.0) {
            Ok(event) => self.send_v1(&Frame::Event(event), true),
            Err(e) => tracing::error!(error = %e, "frame-encode-failed"),
        }
    }
}

/// Drain for a re-exec (`on`: close the link and every downstream session, and stay
/// disconnected), or resume after a failed one.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain {
    pub on: bool,
}

impl Handler<Drain> for Upstream {
    type Result = ();

    fn handle(&mut self, msg: Drain, ctx: &mut Self::Context) {
        self.draining = msg.on;
        if msg.on {
            tracing::info!(channels = self.channels.len(), "upstream-draining");
            self.hang_up(ctx, None);
        } else {
            self.dial(ctx);
        }
    }
}

/// Why a downstream connection cannot be carried now.
#[derive(Debug, Clone, Copy)]
pub struct NotReady;

/// A downstream agent connected: open its channel.
#[derive(Message)]
#[rtype(result = "Result<u32, NotReady>")]
pub struct OpenAgent {
    pub session: Addr<AgentDown>,
    pub peer: String,
}

impl Handler<OpenAgent> for Upstream {
    type Result = Result<u32, NotReady>;

    fn handle(&mut self, msg: OpenAgent, _: &mut Self::Context) -> Self::Result {
        if !self.dial.is_ready() {
            self.stats.refused_not_ready += 1;
            return Err(NotReady);
        }
        let path = vec![self.cfg.relay_id.clone()];
        Ok(self.open(Down::Agent(msg.session), ChannelKind::Agent, path, msg.peer))
    }
}

/// A child relay connected: open the channel its own handshake runs on.
#[derive(Message)]
#[rtype(result = "Result<u32, NotReady>")]
pub struct OpenChildLink {
    pub session: Addr<ChildRelay>,
    pub peer: String,
}

impl Handler<OpenChildLink> for Upstream {
    type Result = Result<u32, NotReady>;

    fn handle(&mut self, msg: OpenChildLink, _: &mut Self::Context) -> Self::Result {
        if !self.dial.is_ready() {
            self.stats.refused_not_ready += 1;
            return Err(NotReady);
        }
        let path = vec![self.cfg.relay_id.clone()];
        let down = Down::ChildLink {
            session: msg.session,
        };
        Ok(self.open(down, ChannelKind::Relay, path, msg.peer))
    }
}

/// A frame from a downstream peer for our channel `ch`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Forward {
    pub ch: u32,
    pub frame: Vec<u8>,
}

impl Handler<Forward> for Upstream {
    type Result = ();

    fn handle(&mut self, msg: Forward, _: &mut Self::Context) {
        if self.channels.contains_key(&msg.ch) {
            self.write(mux::data(msg.ch, &msg.frame));
        }
    }
}

/// A downstream peer went away.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DownGone {
    pub ch: u32,
    pub code: CloseCode,
    pub reason: String,
}

impl Handler<DownGone> for Upstream {
    type Result = ();

    fn handle(&mut self, msg: DownGone, _: &mut Self::Context) {
        if let Some(down) = self.channels.remove(&msg.ch) {
            if let Down::ChildChannel { child, ch, .. } = down {
                self.by_child.remove(&(child, ch));
            }
            self.write(
                Mux::Close {
                    ch: msg.ch,
                    code: msg.code,
                    reason: msg.reason,
                }
                .encode(),
            );
        }
    }
}

/// Why a child relay's frame is refused (its link is then closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChildRefused {
    #[error("channel {0} is already open")]
    Reopened(u32),
    #[error("the path must end with the relay that opens the channel")]
    PathNotOurs,
    #[error("too many relays on the path")]
    PathTooLong,
}

/// A mux frame from authenticated child relay link `child` (whose own id is `child_id`). A
/// frame that breaks the rules closes the child's link.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromChild {
    pub child: u64,
    pub child_id: String,
    pub session: Addr<ChildRelay>,
    pub frame: Mux,
}

impl Handler<FromChild> for Upstream {
    type Result = ();

    fn handle(&mut self, msg: FromChild, _: &mut Self::Context) {
        let session = msg.session.clone();
        let Err(e) = self.carry_for_child(msg) else {
            return;
        };
        tracing::warn!(reason = %e, "child-relay-refused");
        // Closing the child's own channel tells the server (the child is offline) and closes
        // the child's link; its carried channels go with it.
        let own = self.channels.iter().find_map(|(ch, d)| match d {
            Down::ChildLink { session: s } if *s == session => Some(*ch),
            _ => None,
        });
        match own {
            Some(ch) => self.close_channel(ch, CloseCode::Refused, &e.to_string()),
            None => session.do_send(CloseChild {
                code: CloseCode::Refused,
                reason: e.to_string(),
            }),
        }
    }
}

impl Upstream {
    fn carry_for_child(&mut self, msg: FromChild) -> Result<(), ChildRefused> {
        // Without a link, the child's link is being closed with every channel.
        if !self.dial.is_ready() {
            return Ok(());
        }
        match msg.frame {
            Mux::Open { ch, mut open } => {
                if self.by_child.contains_key(&(msg.child, ch)) {
                    return Err(ChildRefused::Reopened(ch));
                }
                if open.path.last() != Some(&msg.child_id) {
                    return Err(ChildRefused::PathNotOurs);
                }
                if open.path.len() >= mux::MAX_PATH {
                    return Err(ChildRefused::PathTooLong);
                }
                open.path.push(self.cfg.relay_id.clone());
                let down = Down::ChildChannel {
                    session: msg.session,
                    child: msg.child,
                    ch,
                };
                let ours = self.open(down, open.kind, open.path, open.peer);
                self.by_child.insert((msg.child, ch), ours);
            }
            Mux::Data { ch, frame } => {
                if let Some(ours) = self.by_child.get(&(msg.child, ch)).copied() {
                    self.write(mux::data(ours, &frame));
                }
            }
            Mux::Close { ch, code, reason } => {
                if let Some(ours) = self.by_child.remove(&(msg.child, ch)) {
                    self.channels.remove(&ours);
                    self.write(
                        Mux::Close {
                            ch: ours,
                            code,
                            reason,
                        }
                        .encode(),
                    );
                }
            }
        }
        Ok(())
    }
}

/// Child relay link `child` is gone: close every channel it carried.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ChildGone {
    pub child: u64,
}

impl Handler<ChildGone> for Upstream {
    type Result = ();

    fn handle(&mut self, msg: ChildGone, _: &mut Self::Context) {
        let ours: Vec<u32> = self
            .by_child
            .iter()
            .filter(|((c, _), _)| *c == msg.child)
            .map(|(_, o)| *o)
            .collect();
        for ch in ours {
            if let Some(Down::ChildChannel { child, ch: c, .. }) = self.channels.remove(&ch) {
                self.by_child.remove(&(child, c));
            }
            self.write(
                Mux::Close {
                    ch,
                    code: CloseCode::GoingAway,
                    reason: "child relay gone".into(),
                }
                .encode(),
            );
        }
    }
}

/// What the link is doing, for the admin endpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamHealth {
    pub state: &'static str,
    pub upstream: Option<String>,
    pub agents: usize,
    pub child_channels: usize,
    /// Round trip of the last WebSocket ping to the parent, µs.
    pub rtt_us: Option<u64>,
    #[serde(flatten)]
    pub stats: UpstreamStats,
}

#[derive(Message)]
#[rtype(result = "UpstreamHealth")]
pub struct ObserveUpstream;

impl Handler<ObserveUpstream> for Upstream {
    type Result = MessageResult<ObserveUpstream>;

    fn handle(&mut self, _: ObserveUpstream, _: &mut Self::Context) -> Self::Result {
        let (agents, child_channels) = self.counts();
        MessageResult(UpstreamHealth {
            state: self.dial.state().label(),
            upstream: self.dial.connected_to().map(str::to_owned),
            agents,
            child_channels,
            rtt_us: self.dial.rtt_us(),
            stats: self.stats,
        })
    }
}

/// Used by the error path of a refused peer.
pub fn error_frame(code: ErrorCode, message: &str) -> Option<Vec<u8>> {
    Frame::Error(protocol::ErrorFrame {
        code,
        message: message.to_owned(),
        details: Default::default(),
    })
    .encode()
    .ok()
}
