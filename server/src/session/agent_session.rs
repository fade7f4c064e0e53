//! `AgentSession`: one agent WebSocket on the server (`GET /agent/v1/ws` on the agent-facing
//! listener).
//!
//! Lifecycle, as in the actix chat example: `started` sends `Busy` when too many handshakes are
//! in flight, and arms the handshake timeout. The agent opens with the end-to-end handshake
//! ([`tether_shared::e2e`]); once it is done every frame both ways is sealed, and the server
//! sends its `Challenge`. The first frame must then be a `Hello` (naming the agent the
//! handshake proved) whose proof is the registered agent's signature over this connection's nonce; then
//! the session registers (replacing any older session of the agent), attaches to the agent's
//! `AgentLink`, answers `Welcome`, and from then on only moves frames between the socket and
//! the link. A heartbeat interval sends our beat and closes a session the agent has not been
//! heard from for the heartbeat timeout. `stopping` always tells the registry and the link.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use actix_web_actors::ws;
use tether_shared::close::{self, CloseCode};
use tether_shared::protocol::{ErrorCode, Frame, Heartbeat};
use tether_shared::stream::ConnId;
use tether_shared::ws_inbound::{inbound, Inbound};

use crate::session::agent_link::{AgentLink, Detach, FromAgent};
use crate::session::greeting::{Greeting, Refusal, Step};
use crate::session::handle::{Ask, ToSession};
use crate::session::handshake::{attach, SessionHandle};
use crate::session::handshake_counts;
use crate::session::session_registry::{SessionEnded, SessionRegistry};
use crate::session::source_slots::SourceSlot;
use crate::session::{now_ms, SessionShared};

pub struct AgentSession {
    shared: Arc<SessionShared>,
    registry: Addr<SessionRegistry>,
    conn: ConnId,
    /// The handshake, then the sealing of every frame.
    greeting: Greeting,
    /// The agent's link, once attached.
    link: Option<Addr<AgentLink>>,
    last_heard: Instant,
    /// This session counts against the handshakes in flight until it is Ready or gone.
    counted: bool,
    /// Its place among its address's handshakes, until it is Ready or gone.
    source_slot: Option<SourceSlot>,
    peer: String,
    /// A close was sent: nothing more is processed or sent.
    closing: bool,
}

impl AgentSession {
    pub fn new(
        shared: Arc<SessionShared>,
        registry: Addr<SessionRegistry>,
        conn: ConnId,
        peer: String,
    ) -> Self {
        AgentSession {
            shared,
            registry,
            conn,
            greeting: Greeting::agent(),
            link: None,
            last_heard: Instant::now(),
            counted: false,
            source_slot: None,
            peer,
            closing: false,
        }
    }

    fn send_frame(&mut self, ctx: &mut ws::WebsocketContext<Self>, frame: &Frame) {
        match frame.encode() {
            Ok(bytes) => self.send_bytes(ctx, &bytes),
            Err(e) => tracing::error!(error = %e, "frame-encode-failed"),
        }
    }

    /// An encoded frame on the socket: sealed once the end-to-end handshake is done (before
    /// it, only `Busy` and refusals go out, in clear).
    fn send_bytes(&mut self, ctx: &mut ws::WebsocketContext<Self>, bytes: &[u8]) {
        if let Some(wire) = self.greeting.seal(bytes) {
            ctx.binary(wire.into_owned());
        }
    }

    /// Refuse the peer: an error frame with the reason, then a close with `code`.
    fn refuse(&mut self, ctx: &mut ws::WebsocketContext<Self>, refusal: Refusal) {
        self.shared
            .handshake_counts
            .refused(handshake_counts::PeerKind::Agent, refusal.why);
        tracing::warn!(conn = self.conn.0, peer = %self.peer, code = %refusal.close, reason = %refusal.reason, "session-refused");
        self.send_frame(ctx, &refusal.error_frame());
        self.close(ctx, refusal.close, &refusal.reason);
    }

    /// Close the socket; `stopping` then tears the session down according to its phase.
    fn close(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: CloseCode, reason: &str) {
        self.closing = true;
        ctx.close(Some(code.frame(reason)));
        ctx.stop();
    }

    fn uncount(&mut self) {
        self.source_slot = None;
        if self.counted {
            self.counted = false;
            self.shared.handshakes.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn on_bytes(&mut self, ctx: &mut ws::WebsocketContext<Self>, bytes: &[u8]) {
        if self.closing {
            return;
        }
        self.last_heard = Instant::now();
        let signer = self.shared.trust.signer();
        match self
            .greeting
            .on_message(bytes, &signer, self.shared.registry.as_ref())
        {
            Step::Wire(answer) => ctx.binary(answer),
            Step::Send(frame) => self.send_frame(ctx, &frame),
            Step::Verified { hello, version } => {
                self.shared
                    .handshake_counts
                    .verified(handshake_counts::PeerKind::Agent);
                self.attach(ctx, hello, version)
            }
            Step::ToLink(bytes) => {
                if let Some(link) = &self.link {
                    link.do_send(FromAgent {
                        conn: self.conn,
                        bytes,
                    });
                }
            }
            Step::Nothing => {}
            Step::Refuse(refusal) => self.refuse(ctx, refusal),
        }
    }

    fn attach(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        hello: tether_shared::protocol::Hello,
        version: String,
    ) {
        let agent_id = hello.agent_id.clone();
        let handle = SessionHandle::direct(ctx.address().recipient());
        let attach = attach(self.registry.clone(), self.conn, hello, handle);
        ctx.wait(attach.into_actor(self).map(move |res, act, ctx| {
            // Still attaching unless replaced meanwhile; on failure it stays attaching so that
            // `stopping` unregisters the session.
            if !act.greeting.is_attaching() {
                return;
            }
            match res {
                Ok((link, welcome)) => {
                    act.send_frame(ctx, &Frame::Welcome(welcome));
                    let held = act.greeting.attached().unwrap_or_default();
                    tracing::debug!(conn = act.conn.0, held = held.len(), "sent-welcome");
                    for f in held {
                        act.send_bytes(ctx, &f);
                    }
                    act.uncount();
                    act.shared
                        .presence
                        .set_online(&agent_id, &version, Vec::new());
                    act.link = Some(link);
                }
                Err(reason) => act.refuse(
                    ctx,
                    Refusal::new(
                        CloseCode::Internal,
                        ErrorCode::Internal,
                        format!("attach failed: {reason}"),
                    ),
                ),
            }
        }));
    }
}

impl Actor for AgentSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let in_flight = self.shared.handshakes.fetch_add(1, Ordering::Relaxed) + 1;
        self.counted = true;
        // One address may hold at most half of the slots: before the Hello, an address is all
        // that tells peers apart.
        let source = self.shared.sources.take_for_peer(&self.peer);
        let source_full = source.is_err();
        self.source_slot = source.unwrap_or(None);
        if in_flight > self.shared.max_handshakes || source_full {
            // Spread a reconnect storm: the agent retries after a jittered delay.
            self.send_frame(ctx, &close::busy(close::BUSY_SPREAD_MS));
            tracing::debug!(conn = self.conn.0, in_flight, source_full, "handshake-shed");
            self.shared
                .handshake_counts
                .shed(handshake_counts::PeerKind::Agent);
            return self.close(ctx, CloseCode::Busy, "busy, retry later");
        }
        ctx.run_later(self.shared.handshake_timeout, |act, ctx| {
            if act.greeting.handshaking() && !act.closing {
                act.refuse(
                    ctx,
                    Refusal::new(
                        CloseCode::Refused,
                        ErrorCode::Unauthorized,
                        "handshake timeout",
                    )
                    .because("handshake_timeout"),
                );
            }
        });
        ctx.run_interval(self.shared.heartbeat_interval, |act, ctx| {
            if act.last_heard.elapsed() > act.shared.heartbeat_timeout {
                if let (true, Some(agent_id)) = (act.greeting.is_ready(), act.greeting.peer()) {
                    tracing::info!(agent_id = %agent_id, conn = act.conn.0, "heartbeat-timeout");
                }
                return act.close(ctx, CloseCode::GoingAway, "heartbeat timeout");
            }
            if act.greeting.is_ready() {
                act.send_frame(
                    ctx,
                    &Frame::Heartbeat(Heartbeat {
                        sent_ms: now_ms(),
                        status: None,
                    }),
                );
            }
        });
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.uncount();
        let registered = self.greeting.close();
        if let Some(link) = self.link.take().filter(|_| registered) {
            link.do_send(Detach { conn: self.conn });
        }
        if let (true, Some(agent_id)) = (registered, self.greeting.peer()) {
            self.registry.do_send(SessionEnded {
                agent_id: agent_id.into(),
                conn: self.conn,
            });
        }
        Running::Stop
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for AgentSession {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        match inbound(&msg) {
            Inbound::Bytes(bytes) => self.on_bytes(ctx, bytes),
            Inbound::Ping(p) => {
                self.last_heard = Instant::now();
                ctx.pong(p);
            }
            Inbound::Pong => self.last_heard = Instant::now(),
            Inbound::Closed => {
                if let (true, Some(agent_id)) = (self.greeting.is_ready(), self.greeting.peer()) {
                    tracing::info!(agent_id = %agent_id, conn = self.conn.0, "agent-closed-session");
                }
                ctx.stop();
            }
            Inbound::Refuse {
                code,
                error,
                reason,
            } => self.refuse(ctx, Refusal::new(code, error, reason)),
            Inbound::Nothing => {}
        }
    }
}

/// What the agent's link asks: frames to put on the socket, a refusal, or a replacement.
impl Handler<ToSession> for AgentSession {
    type Result = ();

    fn handle(&mut self, msg: ToSession, ctx: &mut Self::Context) {
        match msg.ask {
            Ask::Frames(frames) => {
                if self.closing {
                    return;
                }
                tracing::debug!(
                    conn = self.conn.0,
                    frames = frames.len(),
                    phase = self.greeting.phase_name(),
                    "send-frames"
                );
                for wire in self.greeting.outgoing(frames) {
                    ctx.binary(wire);
                }
            }
            Ask::Refuse {
                code,
                error,
                reason,
            } => {
                if !self.closing {
                    self.refuse(ctx, Refusal::new(code, error, reason));
                }
            }
            Ask::Replaced => {
                // Not Ready any more: stopping must not mark the agent offline or detach the
                // new session.
                self.greeting.close();
                self.close(ctx, CloseCode::Replaced, "replaced by a newer session");
            }
        }
    }
}
