//! `RelaySession`: one relay's link on the server (`GET /relay/v1/ws` on the agent-facing
//! listener), carrying many agents' sessions as channels (see [`tether_shared::mux`]).
//!
//! The relay first proves its own identity exactly as an agent does (challenge, `Hello` signed
//! by its key, `Welcome`), but as an enrolled *relay*. From then on the link carries mux frames.
//! Each channel is a downstream connection the relay forwards verbatim, and this actor runs its
//! handshake itself: our nonce, the agent's (or child relay's) own signature, the agent's link.
//! So authorization is always on the peer's identity, never the relay's, and a relay that
//! invents frames for an agent it never saw sign our nonce gets nothing through.
//!
//! An agent's channel opens with the end-to-end handshake ([`tether_shared::e2e`]) between the
//! agent and this actor; from then on every frame on it is sealed, so the relays on the way see
//! only sizes and timing, and cannot alter, replay, reorder or inject a frame unnoticed.
//!
//! Channels also check their path: the `Open` must name this relay last, and every relay before
//! it must be connected to us through exactly the rest of that path. A relay cannot claim an
//! agent came through a relay it is not connected to.

mod member;
mod relays;
mod remote;
pub use member::{GreetRelaysAgain, RelayClaims, RelayMail};
use relays::is_relay_event;
pub use relays::push_relay_upgrade;
pub use remote::{FromRelayInbox, RemoteRelays};

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use actix_web_actors::ws;
use tether_shared::close::{self, CloseCode};
use tether_shared::ids::RelayId;
use tether_shared::mux::{self, ChannelKind, Mux, Open, LINK_CHANNEL};
use tether_shared::protocol::{
    self, command_signing_bytes, Command, CommandBody, ErrorCode, Event, EventBody, Frame,
    Heartbeat, Hello, Sender, Seq, Welcome,
};
use tether_shared::stream::ConnId;
use tether_shared::upgrade::{component_signing_bytes, Component};
use tether_shared::ws_inbound::{inbound, Inbound};

use crate::health::{RelayLinkHealth, RelayLinkStats};
use crate::session::agent_link::{AgentLink, Detach, FromAgent};
use crate::session::greeting::{Greeting, Refusal, Step};
use crate::session::handle::{Ask, ToSession};
use crate::session::handshake::{attach, SessionHandle};
use crate::session::handshake_counts::PeerKind;
use crate::session::session_registry::{SessionEnded, SessionRegistry};
use crate::session::source_slots::SourceSlot;
use crate::session::{now_ms, record_trust_serial, Holder, SessionShared};

/// Most channels one link may hold open.
const MAX_CHANNELS: usize = 100_000;

/// One downstream connection carried by this link.
struct Channel {
    conn: ConnId,
    kind: ChannelKind,
    /// Relay ids between us and the peer, nearest the peer first.
    path: Vec<String>,
    /// The peer's handshake (an agent's channel is protected end to end; a child relay's is
    /// not), then the sealing of every frame.
    greeting: Greeting,
    /// An agent's link, once attached.
    link: Option<Addr<AgentLink>>,
    opened: Instant,
    last_heard: Instant,
    /// Counts against the handshakes in flight until Ready.
    counted: bool,
}

impl Channel {
    /// The child relay on this channel, once it is authenticated.
    fn relay_id(&self) -> Option<&str> {
        match self.kind {
            ChannelKind::Relay if self.greeting.is_ready() => self.greeting.peer(),
            _ => None,
        }
    }
}

pub struct RelaySession {
    shared: Arc<SessionShared>,
    registry: Addr<SessionRegistry>,
    conn: ConnId,
    /// The relay's own handshake.
    greeting: Greeting,
    peer: String,
    /// The relay's id once its Hello checked out.
    relay_id: Option<RelayId>,
    last_heard: Instant,
    counted: bool,
    /// Its place among its address's handshakes, until the relay is authenticated.
    source_slot: Option<SourceSlot>,
    closing: bool,
    channels: HashMap<u32, Channel>,
    /// Channels of this link still handshaking (counted against the server's handshakes).
    handshaking: usize,
    stats: RelayLinkStats,
    /// On a member: the relays this link carries, claimed (see `member`).
    claimed: HashMap<String, member::Claimed>,
}

impl RelaySession {
    pub fn new(
        shared: Arc<SessionShared>,
        registry: Addr<SessionRegistry>,
        conn: ConnId,
        peer: String,
    ) -> Self {
        RelaySession {
            shared,
            registry,
            conn,
            greeting: Greeting::relay(),
            peer,
            relay_id: None,
            last_heard: Instant::now(),
            counted: false,
            source_slot: None,
            closing: false,
            channels: HashMap::new(),
            handshaking: 0,
            stats: RelayLinkStats::default(),
            claimed: HashMap::new(),
        }
    }

    fn send_frame(ctx: &mut ws::WebsocketContext<Self>, frame: &Frame) {
        match frame.encode() {
            Ok(bytes) => ctx.binary(bytes),
            Err(e) => tracing::error!(error = %e, "frame-encode-failed"),
        }
    }

    /// A v1 frame on channel `ch`.
    fn send_on(&mut self, ctx: &mut ws::WebsocketContext<Self>, ch: u32, frame: &Frame) {
        match frame.encode() {
            Ok(bytes) => self.put(ctx, ch, &bytes),
            Err(e) => tracing::error!(ch, error = %e, "frame-encode-failed"),
        }
    }

    /// An encoded frame on channel `ch`, sealed if the channel is an agent's whose handshake
    /// is done (before it, only `Busy` and refusals go out, in clear).
    fn put(&mut self, ctx: &mut ws::WebsocketContext<Self>, ch: u32, bytes: &[u8]) {
        let sealed = match self.channels.get_mut(&ch) {
            Some(c) => c.greeting.seal(bytes),
            None => Some(std::borrow::Cow::Borrowed(bytes)),
        };
        if let Some(sealed) = sealed {
            self.wire(ctx, ch, &sealed);
        }
    }

    /// Bytes on channel `ch` exactly as given (sealed already, or a handshake message).
    fn wire(&mut self, ctx: &mut ws::WebsocketContext<Self>, ch: u32, bytes: &[u8]) {
        self.stats.frames_out += 1;
        ctx.binary(mux::data(ch, bytes));
    }

    /// Refuse the relay itself: an error frame, then close the link (and so every channel).
    fn refuse(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        code: CloseCode,
        error: ErrorCode,
        reason: &str,
    ) {
        self.refuse_as(ctx, Refusal::new(code, error, reason));
    }

    /// [`RelaySession::refuse`], counted by the refusal's own kind.
    fn refuse_as(&mut self, ctx: &mut ws::WebsocketContext<Self>, refusal: Refusal) {
        self.shared
            .handshake_counts
            .refused(PeerKind::Relay, refusal.why);
        tracing::warn!(conn = self.conn.0, peer = %self.peer, relay_id = ?self.relay_id, code = %refusal.close, reason = %refusal.reason, "relay-link-refused");
        let frame = refusal.error_frame();
        match &self.relay_id {
            // In mux mode the link's own frames travel on channel 0.
            Some(_) => self.send_on(ctx, LINK_CHANNEL, &frame),
            None => Self::send_frame(ctx, &frame),
        }
        self.closing = true;
        ctx.close(Some(refusal.close.frame(&refusal.reason)));
        ctx.stop();
    }

    fn on_bytes(&mut self, ctx: &mut ws::WebsocketContext<Self>, bytes: &[u8]) {
        if self.closing {
            return;
        }
        self.last_heard = Instant::now();
        if self.relay_id.is_none() {
            return self.on_hello(ctx, bytes);
        }
        match Mux::decode(bytes) {
            Ok(Mux::Open { ch, open }) => self.on_open(ctx, ch, open),
            Ok(Mux::Data { ch, frame }) => self.on_data(ctx, ch, frame),
            Ok(Mux::Close { ch, code, reason }) => {
                if let Some(channel) = self.channels.remove(&ch) {
                    tracing::debug!(ch, code = %code, reason = %reason, "channel-closed-by-relay");
                    self.end_channel(channel);
                }
            }
            Err(e) => self.refuse(
                ctx,
                CloseCode::Refused,
                ErrorCode::Malformed,
                &e.to_string(),
            ),
        }
    }

    /// The relay's own Hello: an enrolled relay's signature over our nonce.
    fn on_hello(&mut self, ctx: &mut ws::WebsocketContext<Self>, bytes: &[u8]) {
        let signer = self.shared.trust.signer();
        let (hello, version) =
            match self
                .greeting
                .on_message(bytes, &signer, self.shared.registry.as_ref())
            {
                Step::Verified { hello, version } => {
                    self.shared.handshake_counts.verified(PeerKind::Relay);
                    (hello, version)
                }
                Step::Refuse(r) => return self.refuse_as(ctx, r),
                other => {
                    // A relay has no end-to-end handshake: a Hello or a refusal, nothing else.
                    tracing::error!(step = ?other, "relay-handshake-unexpected-step");
                    return;
                }
            };
        let (relay_id, trust_serial) = (hello.agent_id.clone(), hello.trust_serial);
        self.uncount();
        let claim = Holder::Relay(ctx.address());
        if let Some(Holder::Relay(old)) = self.shared.presence.claim(&relay_id, self.conn, claim) {
            old.do_send(LinkReplaced);
        }
        self.shared
            .presence
            .set_online(&relay_id, &version, Vec::new());
        tracing::info!(relay_id = %relay_id, conn = self.conn.0, peer = %self.peer, "relay-online");
        self.relay_id = Some(relay_id.as_str().into());
        Self::send_frame(ctx, &self.welcome());
        self.tend_on_connect(ctx, &hello, &version, &[], trust_serial);
    }

    fn welcome(&self) -> Frame {
        Frame::Welcome(Welcome {
            last_event_seq: Seq::ZERO,
            server_incarnation: self.shared.incarnation.clone(),
            heartbeat_interval_ms: self.shared.heartbeat_interval.as_millis() as u64,
        })
    }

    fn on_open(&mut self, ctx: &mut ws::WebsocketContext<Self>, ch: u32, open: Open) {
        if self.channels.contains_key(&ch) {
            // Channel ids are never reused on a link: a relay that does is broken or hostile.
            let reason = format!("channel {ch} opened twice");
            return self.refuse(
                ctx,
                CloseCode::Refused,
                ErrorCode::ProtocolViolation,
                &reason,
            );
        }
        let refusal = if self.channels.len() >= MAX_CHANNELS {
            Some(format!("at most {MAX_CHANNELS} channels per link"))
        } else {
            self.path_problem(&open.path)
        };
        if let Some(reason) = refusal {
            tracing::warn!(relay_id = ?self.relay_id, ch, path = ?open.path, reason = %reason, "channel-refused");
            self.stats.channels_refused += 1;
            return self.close_channel_wire(ctx, ch, CloseCode::Refused, &reason);
        }
        // One link may hold at most half of the server's handshakes, so that a relay (broken or
        // hostile) cannot starve everybody else's.
        let mine = self.handshaking;
        let in_flight = self.shared.handshakes.fetch_add(1, Ordering::Relaxed) + 1;
        if in_flight > self.shared.max_handshakes || mine >= (self.shared.max_handshakes / 2).max(1)
        {
            self.shared.handshakes.fetch_sub(1, Ordering::Relaxed);
            self.shared.handshake_counts.shed(PeerKind::from(open.kind));
            self.send_on(ctx, ch, &close::busy(close::BUSY_SPREAD_MS));
            return self.close_channel_wire(ctx, ch, CloseCode::Busy, "busy, retry later");
        }
        self.stats.channels_opened += 1;
        self.handshaking += 1;
        let conn = ConnId(self.shared.next_conn.fetch_add(1, Ordering::Relaxed) + 1);
        let agent = open.kind == ChannelKind::Agent;
        let channel = Channel {
            conn,
            kind: open.kind,
            path: open.path,
            greeting: if agent {
                Greeting::agent()
            } else {
                Greeting::relay()
            },
            link: None,
            opened: Instant::now(),
            last_heard: Instant::now(),
            counted: true,
        };
        let challenge = channel.greeting.challenge();
        tracing::debug!(relay_id = ?self.relay_id, ch, conn = conn.0, peer = %open.peer, kind = ?channel.kind, "channel-opened");
        self.channels.insert(ch, channel);
        // An agent speaks first, with its end-to-end handshake; a child relay is challenged.
        if !agent {
            self.send_on(ctx, ch, &challenge);
        }
    }

    /// Why `path` is not believable from this link, if it is not.
    fn path_problem(&self, path: &[String]) -> Option<String> {
        let me = self.relay_id.as_deref()?;
        if path.last().map(String::as_str) != Some(me) {
            return Some("the path must end with the relay that opens the channel".into());
        }
        for (i, relay) in path.iter().enumerate().take(path.len() - 1) {
            match self.shared.presence.online_path(relay) {
                Some(p) if p == path[i + 1..] => {}
                _ => return Some(format!("relay {relay} is not connected through this path")),
            }
        }
        None
    }

    fn on_data(&mut self, ctx: &mut ws::WebsocketContext<Self>, ch: u32, frame: Vec<u8>) {
        self.stats.frames_in += 1;
        if ch == LINK_CHANNEL {
            return self.on_link_frame(ctx, &frame);
        }
        let Some(channel) = self.channels.get_mut(&ch) else {
            // A frame that crossed our close: nothing to do.
            self.stats.unknown_channel_frames += 1;
            return;
        };
        channel.last_heard = Instant::now();
        let signer = self.shared.trust.signer();
        let step = channel
            .greeting
            .on_message(&frame, &signer, self.shared.registry.as_ref());
        match step {
            Step::Wire(answer) => self.wire(ctx, ch, &answer),
            Step::Send(frame) => self.send_on(ctx, ch, &frame),
            Step::Verified { hello, version } => {
                let kind = channel.kind;
                self.shared.handshake_counts.verified(PeerKind::from(kind));
                match kind {
                    ChannelKind::Relay => self.child_relay_ready(ctx, ch, hello, &version),
                    ChannelKind::Agent => self.attach_agent(ctx, ch, hello, version),
                }
            }
            Step::ToLink(bytes) => match (&channel.link, channel.relay_id()) {
                (Some(link), _) => link.do_send(FromAgent {
                    conn: channel.conn,
                    bytes,
                }),
                (None, Some(relay_id)) => {
                    let relay_id = relay_id.to_owned();
                    self.on_relay_frame(ctx, ch, &relay_id, &bytes);
                }
                (None, None) => {}
            },
            Step::Nothing => {}
            Step::Refuse(r) => self.refuse_channel_as(ctx, ch, r),
        }
    }

    /// The relay's own frames: heartbeats with its status.
    fn on_link_frame(&mut self, ctx: &mut ws::WebsocketContext<Self>, frame: &[u8]) {
        let Some(relay_id) = self.relay_id.clone() else {
            return;
        };
        match protocol::decode(frame, Sender::Agent) {
            Ok(Frame::Heartbeat(hb)) => self.on_relay_heartbeat(ctx, &relay_id, hb),
            Ok(Frame::Event(event)) if is_relay_event(&event.body) => {
                self.on_relay_event(ctx, &relay_id, &event, frame)
            }
            Ok(Frame::Error(e)) => {
                tracing::warn!(relay_id = %relay_id, code = ?e.code, message = %e.message, "relay-reported-error")
            }
            Ok(other) => {
                let reason = format!("unexpected {} frame on the link channel", other.kind());
                self.refuse(
                    ctx,
                    CloseCode::Refused,
                    ErrorCode::ProtocolViolation,
                    &reason,
                );
            }
            Err(e) => self.refuse(ctx, e.close_code(), e.to_error_frame().code, &e.to_string()),
        }
    }

    fn attach_agent(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        ch: u32,
        hello: Hello,
        version: String,
    ) {
        let Some(channel) = self.channels.get(&ch) else {
            return;
        };
        let agent_id = hello.agent_id.clone();
        let conn = channel.conn;
        let handle =
            SessionHandle::relayed(ctx.address().recipient(), ch, conn, channel.path.clone());
        let attach = attach(self.registry.clone(), conn, hello, handle);
        ctx.spawn(attach.into_actor(self).map(move |res, act, ctx| {
            let Some(channel) = act.channels.get_mut(&ch).filter(|c| c.conn == conn) else {
                return;
            };
            if !channel.greeting.is_attaching() {
                return;
            }
            match res {
                Ok((link, welcome)) => {
                    uncount(&act.shared, &mut act.handshaking, channel);
                    let path = channel.path.clone();
                    channel.link = Some(link);
                    act.shared.presence.set_online(&agent_id, &version, path);
                    act.send_on(ctx, ch, &Frame::Welcome(welcome));
                    let held = act
                        .channels
                        .get_mut(&ch)
                        .and_then(|c| c.greeting.attached())
                        .unwrap_or_default();
                    for f in held {
                        act.put(ctx, ch, &f);
                    }
                }
                Err(reason) => act.refuse_channel(
                    ctx,
                    ch,
                    CloseCode::Internal,
                    ErrorCode::Internal,
                    &format!("attach failed: {reason}"),
                ),
            }
        }));
    }

    /// Refuse a channel's peer: an error frame on it, a close, and the session ends.
    fn refuse_channel(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        ch: u32,
        code: CloseCode,
        error: ErrorCode,
        reason: &str,
    ) {
        self.refuse_channel_as(ctx, ch, Refusal::new(code, error, reason));
    }

    /// [`RelaySession::refuse_channel`], counted by the refusal's own kind.
    fn refuse_channel_as(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        ch: u32,
        refusal: Refusal,
    ) {
        let peer = self
            .channels
            .get(&ch)
            .map_or(PeerKind::Agent, |c| PeerKind::from(c.kind));
        self.shared.handshake_counts.refused(peer, refusal.why);
        tracing::warn!(relay_id = ?self.relay_id, ch, code = %refusal.close, reason = %refusal.reason, "channel-refused");
        self.send_on(ctx, ch, &refusal.error_frame());
        self.close_channel_wire(ctx, ch, refusal.close, &refusal.reason);
        if let Some(channel) = self.channels.remove(&ch) {
            self.end_channel(channel);
        }
    }

    fn close_channel_wire(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        ch: u32,
        code: CloseCode,
        reason: &str,
    ) {
        ctx.binary(
            Mux::Close {
                ch,
                code,
                reason: reason.to_owned(),
            }
            .encode(),
        );
    }

    /// A channel is gone: its agent or child relay is offline unless it reconnected already.
    fn end_channel(&mut self, mut channel: Channel) {
        uncount(&self.shared, &mut self.handshaking, &mut channel);
        if !channel.greeting.close() {
            return;
        }
        let Some(peer) = channel.greeting.peer().map(str::to_owned) else {
            return;
        };
        match channel.kind {
            ChannelKind::Agent => {
                if let Some(link) = channel.link {
                    link.do_send(Detach { conn: channel.conn });
                }
                self.registry.do_send(SessionEnded {
                    agent_id: peer.into(),
                    conn: channel.conn,
                });
            }
            ChannelKind::Relay => {
                self.shared.presence.set_offline(&peer);
                self.member_depart(&peer);
                tracing::info!(relay_id = %peer, "relay-offline");
            }
        }
    }

    fn uncount(&mut self) {
        self.source_slot = None;
        if self.counted {
            self.counted = false;
            self.shared.handshakes.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Heartbeats on the link and every ready channel; silent or stuck channels are closed.
    fn beat(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        if self.last_heard.elapsed() > self.shared.heartbeat_timeout {
            tracing::info!(relay_id = ?self.relay_id, conn = self.conn.0, "relay-heartbeat-timeout");
            return self.refuse(
                ctx,
                CloseCode::GoingAway,
                ErrorCode::Unauthorized,
                "heartbeat timeout",
            );
        }
        if self.relay_id.is_none() {
            return;
        }
        let beat = Frame::Heartbeat(Heartbeat {
            sent_ms: now_ms(),
            status: None,
        });
        let Ok(beat) = beat.encode() else {
            return;
        };
        ctx.binary(mux::data(LINK_CHANNEL, &beat));
        let mut stale = Vec::new();
        let mut beating = Vec::new();
        for (ch, c) in &self.channels {
            let ready = c.greeting.is_ready();
            if ready && c.last_heard.elapsed() > self.shared.heartbeat_timeout {
                stale.push((*ch, "heartbeat timeout"));
            } else if !ready && c.opened.elapsed() > self.shared.handshake_timeout {
                stale.push((*ch, "handshake timeout"));
            } else if ready {
                beating.push(*ch);
            }
        }
        for ch in beating {
            self.put(ctx, ch, &beat);
        }
        // Renewals come due while a relay stays connected: checked at each beat.
        let relays: Vec<RelayId> = self
            .relay_id
            .iter()
            .cloned()
            .chain(
                self.channels
                    .values()
                    .filter_map(|c| c.relay_id().map(RelayId::from)),
            )
            .collect();
        // On a member, the active node sends them through the mailbox.
        let member = self.shared.member;
        for relay_id in relays.iter().filter(|_| !member) {
            self.push_certificate(ctx, relay_id, false);
            self.push_trust(ctx, relay_id, None);
        }
        for (ch, reason) in stale {
            self.refuse_channel(
                ctx,
                ch,
                CloseCode::GoingAway,
                ErrorCode::Unauthorized,
                reason,
            );
        }
    }

    /// Channels by phase, for health.
    fn observe(&self) -> RelayLinkHealth {
        let mut health = RelayLinkHealth {
            relay_id: self.relay_id.as_ref().map(RelayId::to_string),
            conn: self.conn.0,
            stats: self.stats,
            ..Default::default()
        };
        for c in self.channels.values() {
            match (c.greeting.is_ready(), c.kind) {
                (true, ChannelKind::Agent) => health.agents += 1,
                (true, ChannelKind::Relay) => health.relays += 1,
                (false, _) => health.handshaking += 1,
            }
        }
        health
    }
}

/// `channel` no longer counts as a handshake in flight (it is ready or gone).
fn uncount(shared: &SessionShared, on_link: &mut usize, channel: &mut Channel) {
    if channel.counted {
        channel.counted = false;
        *on_link = on_link.saturating_sub(1);
        shared.handshakes.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Actor for RelaySession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let in_flight = self.shared.handshakes.fetch_add(1, Ordering::Relaxed) + 1;
        self.counted = true;
        let source = self.shared.sources.take_for_peer(&self.peer);
        let source_full = source.is_err();
        self.source_slot = source.unwrap_or(None);
        if in_flight > self.shared.max_handshakes || source_full {
            self.shared.handshake_counts.shed(PeerKind::Relay);
            Self::send_frame(ctx, &close::busy(close::BUSY_SPREAD_MS));
            self.closing = true;
            ctx.close(Some(CloseCode::Busy.frame("busy, retry later")));
            return ctx.stop();
        }
        Self::send_frame(ctx, &self.greeting.challenge());
        ctx.run_later(self.shared.handshake_timeout, |act, ctx| {
            if act.relay_id.is_none() && !act.closing {
                act.refuse(
                    ctx,
                    CloseCode::Refused,
                    ErrorCode::Unauthorized,
                    "handshake timeout",
                );
            }
        });
        ctx.run_interval(self.shared.heartbeat_interval, |act, ctx| act.beat(ctx));
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.uncount();
        for (_, channel) in std::mem::take(&mut self.channels) {
            self.end_channel(channel);
        }
        if let Some(relay_id) = self.relay_id.clone() {
            if self.shared.presence.release(&relay_id, self.conn) {
                tracing::info!(relay_id = %relay_id, conn = self.conn.0, "relay-offline");
            }
            self.member_depart(&relay_id);
        }
        Running::Stop
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for RelaySession {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        match inbound(&msg) {
            Inbound::Bytes(bytes) => self.on_bytes(ctx, bytes),
            Inbound::Ping(p) => {
                self.last_heard = Instant::now();
                ctx.pong(p);
            }
            Inbound::Pong => self.last_heard = Instant::now(),
            Inbound::Closed => ctx.stop(),
            Inbound::Refuse {
                code,
                error,
                reason,
            } => self.refuse(ctx, code, error, &reason),
            Inbound::Nothing => {}
        }
    }
}

/// What an agent's link asks of its channel: frames, a refusal, or a replacement.
impl Handler<ToSession> for RelaySession {
    type Result = ();

    fn handle(&mut self, msg: ToSession, ctx: &mut Self::Context) {
        let (ch, conn) = (msg.ch, msg.conn);
        match msg.ask {
            Ask::Frames(frames) => self.channel_frames(ctx, ch, conn, frames),
            Ask::Refuse {
                code,
                error,
                reason,
            } => self.channel_close(ctx, ch, conn, code, Some(error), &reason),
            Ask::Replaced => self.channel_close(
                ctx,
                ch,
                conn,
                CloseCode::Replaced,
                None,
                "replaced by a newer session",
            ),
        }
    }
}

impl RelaySession {
    /// Frames from an agent's link for its channel.
    fn channel_frames(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        ch: u32,
        conn: ConnId,
        frames: Vec<Vec<u8>>,
    ) {
        if self.closing {
            return;
        }
        let Some(channel) = self.channels.get_mut(&ch).filter(|c| c.conn == conn) else {
            return;
        };
        if channel.kind != ChannelKind::Agent {
            return;
        }
        for wire in channel.greeting.outgoing(frames) {
            self.wire(ctx, ch, &wire);
        }
    }

    /// Close one channel: refused by its link (`error` set), or replaced by a newer session
    /// (the agent stays online).
    fn channel_close(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        ch: u32,
        conn: ConnId,
        code: CloseCode,
        error: Option<ErrorCode>,
        reason: &str,
    ) {
        let current = self.channels.get(&ch).is_some_and(|c| c.conn == conn);
        if self.closing || !current {
            return;
        }
        let Some(error) = error else {
            if let Some(mut channel) = self.channels.remove(&ch) {
                uncount(&self.shared, &mut self.handshaking, &mut channel);
            }
            return self.close_channel_wire(ctx, ch, code, reason);
        };
        self.refuse_channel(ctx, ch, code, error, reason);
    }
}

/// A newer link of the same relay took over.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkReplaced;

impl Handler<LinkReplaced> for RelaySession {
    type Result = ();

    fn handle(&mut self, _: LinkReplaced, ctx: &mut Self::Context) {
        // The new link owns the relay's presence now: stopping must not mark it offline.
        if let Some(relay_id) = &self.relay_id {
            tracing::info!(relay_id = %relay_id, conn = self.conn.0, "relay-link-replaced");
        }
        self.closing = true;
        ctx.close(Some(CloseCode::Replaced.frame("replaced by a newer link")));
        ctx.stop();
    }
}

/// A relay was deleted: if it is this link's relay, the link closes (and with it every
/// channel it carries); otherwise every channel of this link that is that relay, or runs
/// through it, closes. Sent to every link, since a relay may be carried by another. Answers
/// how many channels (and links) were closed.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct RevokeRelay {
    pub relay_id: RelayId,
    /// Not revoked: a member serves it now (its connection here is stale).
    pub moved: bool,
}

impl Handler<RevokeRelay> for RelaySession {
    type Result = usize;

    fn handle(&mut self, msg: RevokeRelay, ctx: &mut Self::Context) -> usize {
        let (code, error, reason) = match msg.moved {
            false => (CloseCode::Refused, ErrorCode::Unauthorized, "relay revoked"),
            true => (
                CloseCode::Replaced,
                ErrorCode::Overloaded,
                "the relay is served by another node now",
            ),
        };
        if self.relay_id.as_deref() == Some(msg.relay_id.as_str()) {
            let carried = self.channels.len();
            tracing::warn!(relay_id = %msg.relay_id, conn = self.conn.0, channels = carried, moved = msg.moved, "relay-link-revoked");
            self.refuse(ctx, code, error, reason);
            return carried + 1;
        }
        let doomed: Vec<u32> = self
            .channels
            .iter()
            .filter(|(_, c)| {
                c.path.iter().any(|r| msg.relay_id == r.as_str())
                    || c.relay_id() == Some(msg.relay_id.as_str())
            })
            .map(|(ch, _)| *ch)
            .collect();
        for ch in &doomed {
            self.refuse_channel(ctx, *ch, code, error, reason);
        }
        doomed.len()
    }
}

/// The server is stopping: the link closes now (1001), and with it every channel it carries.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ServerStopping;

impl Handler<ServerStopping> for RelaySession {
    type Result = ();

    fn handle(&mut self, _: ServerStopping, ctx: &mut Self::Context) {
        self.refuse(
            ctx,
            CloseCode::GoingAway,
            ErrorCode::Overloaded,
            "server stopping",
        );
    }
}

/// Ask a link what it holds.
#[derive(Message)]
#[rtype(result = "RelayLinkHealth")]
pub struct ObserveRelayLink;

impl Handler<ObserveRelayLink> for RelaySession {
    type Result = MessageResult<ObserveRelayLink>;

    fn handle(&mut self, _: ObserveRelayLink, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.observe())
    }
}

/// Closes relay `relay_id`'s link, or the channels carrying it or running through it on other
/// links (a relay behind a relay); answers how many links and channels were closed.
pub async fn revoke_relay(shared: &SessionShared, relay_id: &RelayId) -> usize {
    let mut closed = 0;
    for (_, link) in shared.presence.relay_links() {
        let revoke = RevokeRelay {
            relay_id: relay_id.to_owned(),
            moved: false,
        };
        // A link that stopped meanwhile has nothing left to close.
        closed += link.send(revoke).await.unwrap_or(0);
    }
    closed
}
