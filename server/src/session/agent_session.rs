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
use tether_shared::e2e::{ServerGate, ServerStep};
use tether_shared::enroll::Role;
use tether_shared::frame_guard::close_code_for;
use tether_shared::protocol::{
    self, Challenge, ErrorCode, ErrorFrame, Frame, Heartbeat, Hello, Sender,
};
use tether_shared::stream::ConnId;

use crate::session::agent_link::{AgentLink, Detach, FromAgent};
use crate::session::handle::{Ask, ToSession};
use crate::session::handshake::{
    attach, enrolled_key, hello_matches_gate, new_nonce, verify_hello, SessionHandle,
};
use crate::session::session_registry::{SessionEnded, SessionRegistry};
use crate::session::source_slots::SourceSlot;
use crate::session::{now_ms, SessionShared};

/// How far along the session is.
enum Phase {
    /// The end-to-end handshake runs.
    Securing,
    /// Challenge sent; waiting for the agent's Hello.
    Challenged,
    /// Hello verified; waiting for the link's Welcome. Frames from the link wait here.
    Attaching {
        agent_id: String,
        held: Vec<Vec<u8>>,
    },
    /// Streams running.
    Ready {
        agent_id: String,
        link: Addr<AgentLink>,
    },
    /// Refused or replaced: nothing more is processed.
    Closing,
}

pub struct AgentSession {
    shared: Arc<SessionShared>,
    registry: Addr<SessionRegistry>,
    conn: ConnId,
    nonce: String,
    /// End-to-end protection: the handshake, then every frame sealed.
    gate: ServerGate,
    phase: Phase,
    last_heard: Instant,
    /// This session counts against the handshakes in flight until it is Ready or gone.
    counted: bool,
    /// Its place among its address's handshakes, until it is Ready or gone.
    source_slot: Option<SourceSlot>,
    peer: String,
    /// The agent's software version, from its Hello.
    version: String,
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
        let nonce = new_nonce();
        AgentSession {
            shared,
            registry,
            conn,
            nonce,
            gate: ServerGate::default(),
            phase: Phase::Securing,
            last_heard: Instant::now(),
            counted: false,
            source_slot: None,
            peer,
            version: String::new(),
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
        if !self.gate.is_open() {
            return ctx.binary(bytes.to_vec());
        }
        match self.gate.seal(bytes) {
            Ok(sealed) => ctx.binary(sealed),
            Err(e) => tracing::error!(conn = self.conn.0, error = %e, "frame-seal-failed"),
        }
    }

    /// Refuse the peer: an error frame with the reason, then a close with `code`.
    fn refuse(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        code: CloseCode,
        error: ErrorCode,
        reason: &str,
    ) {
        tracing::warn!(conn = self.conn.0, peer = %self.peer, code = %code, reason, "session-refused");
        self.send_frame(
            ctx,
            &Frame::Error(ErrorFrame {
                code: error,
                message: reason.to_owned(),
                details: Default::default(),
            }),
        );
        self.close(ctx, code, reason);
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

    fn on_bytes(&mut self, ctx: &mut ws::WebsocketContext<Self>, bytes: Vec<u8>) {
        if self.closing {
            return;
        }
        self.last_heard = Instant::now();
        let shared = self.shared.clone();
        let signer = shared.trust.signer();
        let step = self
            .gate
            .on_message(&bytes, &signer, |id| enrolled_key(&shared, id, Role::Agent));
        let bytes = match step {
            Ok(ServerStep::Reply(answer)) => return ctx.binary(answer),
            Ok(ServerStep::Established(agent_id)) => {
                tracing::debug!(conn = self.conn.0, agent_id = %agent_id, "session-sealed");
                self.phase = Phase::Challenged;
                let challenge = Frame::Challenge(Challenge {
                    nonce: self.nonce.clone(),
                });
                return self.send_frame(ctx, &challenge);
            }
            Ok(ServerStep::Frame(frame)) => frame,
            Err(e) => {
                return self.refuse(
                    ctx,
                    CloseCode::Refused,
                    ErrorCode::Unauthorized,
                    &e.to_string(),
                )
            }
        };
        match &self.phase {
            Phase::Challenged => self.on_hello(ctx, &bytes),
            Phase::Ready { link, .. } => link.do_send(FromAgent {
                conn: self.conn,
                bytes,
            }),
            Phase::Securing => {}
            Phase::Attaching { .. } => self.refuse(
                ctx,
                CloseCode::Refused,
                ErrorCode::ProtocolViolation,
                "frame before the welcome",
            ),
            Phase::Closing => {}
        }
    }

    fn on_hello(&mut self, ctx: &mut ws::WebsocketContext<Self>, bytes: &[u8]) {
        let hello = match protocol::decode(bytes, Sender::Agent) {
            Ok(Frame::Hello(h)) => h,
            Ok(other) => {
                let reason = format!("expected hello, got {}", other.kind());
                return self.refuse(
                    ctx,
                    CloseCode::Refused,
                    ErrorCode::ProtocolViolation,
                    &reason,
                );
            }
            Err(e) => {
                return self.refuse(ctx, e.close_code(), e.to_error_frame().code, &e.to_string())
            }
        };
        let proved = self.gate.agent_id().map(str::to_owned);
        if let Err(reason) = self
            .verify(&hello)
            .and_then(|()| hello_matches_gate(proved.as_deref(), &hello))
        {
            return self.refuse(ctx, CloseCode::Refused, ErrorCode::Unauthorized, &reason);
        }
        let agent_id = hello.agent_id.clone();
        self.phase = Phase::Attaching {
            agent_id: agent_id.clone(),
            held: Vec::new(),
        };
        let handle = SessionHandle::direct(ctx.address().recipient());
        let attach = attach(self.registry.clone(), self.conn, hello, handle);
        ctx.wait(attach.into_actor(self).map(move |res, act, ctx| {
            // Still Attaching unless replaced meanwhile; on failure the phase stays Attaching so
            // that `stopping` unregisters the session.
            let held = match &mut act.phase {
                Phase::Attaching { held, .. } => std::mem::take(held),
                _ => return,
            };
            match res {
                Ok((link, welcome)) => {
                    tracing::debug!(conn = act.conn.0, held = held.len(), "sending-welcome");
                    act.send_frame(ctx, &Frame::Welcome(welcome));
                    for f in held {
                        act.send_bytes(ctx, &f);
                    }
                    act.uncount();
                    act.shared
                        .registry
                        .set_online(&agent_id, &act.version, Vec::new());
                    act.phase = Phase::Ready { agent_id, link };
                }
                Err(reason) => act.refuse(
                    ctx,
                    CloseCode::Internal,
                    ErrorCode::Internal,
                    &format!("attach failed: {reason}"),
                ),
            }
        }));
    }

    fn verify(&mut self, hello: &Hello) -> Result<(), String> {
        self.version = verify_hello(&self.shared, &self.nonce, hello, Role::Agent)?;
        Ok(())
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
            return self.close(ctx, CloseCode::Busy, "busy, retry later");
        }
        ctx.run_later(self.shared.handshake_timeout, |act, ctx| {
            if matches!(
                act.phase,
                Phase::Securing | Phase::Challenged | Phase::Attaching { .. }
            ) {
                act.refuse(
                    ctx,
                    CloseCode::Refused,
                    ErrorCode::Unauthorized,
                    "handshake timeout",
                );
            }
        });
        ctx.run_interval(self.shared.heartbeat_interval, |act, ctx| {
            if act.last_heard.elapsed() > act.shared.heartbeat_timeout {
                if let Phase::Ready { agent_id, .. } = &act.phase {
                    tracing::info!(agent_id = %agent_id, conn = act.conn.0, "heartbeat-timeout");
                }
                return act.close(ctx, CloseCode::GoingAway, "heartbeat timeout");
            }
            if matches!(act.phase, Phase::Ready { .. }) {
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
        match std::mem::replace(&mut self.phase, Phase::Closing) {
            Phase::Ready { agent_id, link } => {
                link.do_send(Detach { conn: self.conn });
                self.registry.do_send(SessionEnded {
                    agent_id,
                    conn: self.conn,
                });
            }
            Phase::Attaching { agent_id, .. } => {
                self.registry.do_send(SessionEnded {
                    agent_id,
                    conn: self.conn,
                });
            }
            Phase::Securing | Phase::Challenged | Phase::Closing => {}
        }
        Running::Stop
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for AgentSession {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        match msg {
            Ok(ws::Message::Binary(bytes)) => self.on_bytes(ctx, bytes.to_vec()),
            Ok(ws::Message::Text(text)) => self.on_bytes(ctx, text.as_bytes().to_vec()),
            Ok(ws::Message::Ping(p)) => {
                self.last_heard = Instant::now();
                ctx.pong(&p);
            }
            Ok(ws::Message::Pong(_)) => self.last_heard = Instant::now(),
            Ok(ws::Message::Close(_)) => {
                self.phase_closing_log();
                ctx.stop();
            }
            Ok(ws::Message::Continuation(_)) => self.refuse(
                ctx,
                CloseCode::Unsupported,
                ErrorCode::ProtocolViolation,
                "fragmented messages are not accepted",
            ),
            Ok(ws::Message::Nop) => {}
            Err(e) => {
                let reason = format!("websocket protocol error: {e}");
                self.refuse(ctx, close_code_for(&e), ErrorCode::Malformed, &reason)
            }
        }
    }
}

impl AgentSession {
    fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Securing => "securing",
            Phase::Challenged => "challenged",
            Phase::Attaching { .. } => "attaching",
            Phase::Ready { .. } => "ready",
            Phase::Closing => "closing",
        }
    }

    fn phase_closing_log(&self) {
        if let Phase::Ready { agent_id, .. } = &self.phase {
            tracing::info!(agent_id = %agent_id, conn = self.conn.0, "agent-closed-session");
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
                    phase = self.phase_name(),
                    "send-frames"
                );
                match &mut self.phase {
                    Phase::Ready { .. } => {
                        for f in frames {
                            self.send_bytes(ctx, &f);
                        }
                    }
                    Phase::Attaching { held, .. } => held.extend(frames),
                    Phase::Securing | Phase::Challenged | Phase::Closing => {}
                }
            }
            Ask::Refuse {
                code,
                error,
                reason,
            } => {
                if !self.closing {
                    self.refuse(ctx, code, error, &reason);
                }
            }
            Ask::Replaced => {
                // Not Ready any more: stopping must not mark the agent offline or detach the
                // new session.
                self.phase = Phase::Closing;
                self.close(ctx, CloseCode::Replaced, "replaced by a newer session");
            }
        }
    }
}
