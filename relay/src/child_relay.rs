//! `ChildRelay`: a child relay's link on this relay (`GET /relay/v1/ws` on the downstream
//! listener), so relays chain to any depth.
//!
//! The child authenticates to the *server*, not to us: its link's first frames (challenge,
//! hello, welcome) travel on a channel of our own upstream link, which the server runs like any
//! agent channel but for a relay identity. Once the server's `Welcome` passes, the child's link
//! switches to mux mode and we carry its channels: each child channel becomes one of ours, with
//! our id appended to its path. The child's own heartbeats (its channel 0) go on the channel its
//! handshake used.

use std::sync::atomic::{AtomicU64, Ordering};

use actix::prelude::*;
use actix_web_actors::ws;
use tether_shared::close::CloseCode;
use tether_shared::mux::{self, Mux, LINK_CHANNEL};
use tether_shared::protocol::{self, ErrorCode, Frame, Sender};
use tether_shared::ws_inbound::{inbound, Inbound};

use crate::downstream::{close_ws, refuse_busy};
use crate::upstream::{
    error_frame, ChildGone, DownGone, Forward, FromChild, OpenChildLink, Upstream,
};

/// Mailbox bound of a child relay's link: it carries many agents.
const CHILD_QUEUE: usize = 65_536;

static NEXT_CHILD: AtomicU64 = AtomicU64::new(1);

enum Phase {
    /// Waiting for our channel upstream.
    Opening,
    /// The handshake crosses raw; `claimed` is the id in the child's Hello.
    Handshake { claimed: Option<String> },
    /// Authenticated by the server as `relay_id`: mux frames.
    Mux { relay_id: String },
}

pub struct ChildRelay {
    id: u64,
    upstream: Addr<Upstream>,
    peer: String,
    /// Our channel for the child's own handshake and heartbeats.
    ch: Option<u32>,
    phase: Phase,
    quiet: bool,
}

impl ChildRelay {
    pub fn new(upstream: Addr<Upstream>, peer: String) -> Self {
        ChildRelay {
            id: NEXT_CHILD.fetch_add(1, Ordering::Relaxed),
            upstream,
            peer,
            ch: None,
            phase: Phase::Opening,
            quiet: false,
        }
    }

    fn close(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: CloseCode, reason: &str) {
        close_ws(ctx, code, reason);
    }

    fn refuse(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: CloseCode, reason: &str) {
        tracing::warn!(peer = %self.peer, code = %code, reason, "child-relay-refused");
        if let Some(bytes) = error_frame(ErrorCode::ProtocolViolation, reason) {
            match self.phase {
                Phase::Mux { .. } => ctx.binary(mux::data(LINK_CHANNEL, &bytes)),
                _ => ctx.binary(bytes),
            }
        }
        self.close(ctx, code, reason);
    }

    fn on_bytes(&mut self, ctx: &mut ws::WebsocketContext<Self>, bytes: &[u8]) {
        let Some(ch) = self.ch else {
            return;
        };
        match &mut self.phase {
            Phase::Opening => {}
            Phase::Handshake { claimed } => {
                if claimed.is_none() {
                    if let Ok(Frame::Hello(h)) = protocol::decode(bytes, Sender::Agent) {
                        *claimed = Some(h.agent_id);
                    }
                }
                self.upstream.do_send(Forward {
                    ch,
                    frame: bytes.to_vec(),
                });
            }
            Phase::Mux { relay_id } => match Mux::decode(bytes) {
                Ok(Mux::Data {
                    ch: LINK_CHANNEL,
                    frame,
                }) => self.upstream.do_send(Forward { ch, frame }),
                Ok(frame) => self.upstream.do_send(FromChild {
                    child: self.id,
                    child_id: relay_id.clone(),
                    session: ctx.address(),
                    frame,
                }),
                Err(e) => self.refuse(ctx, CloseCode::Refused, &e.to_string()),
            },
        }
    }
}

impl Actor for ChildRelay {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(CHILD_QUEUE);
        let open = self.upstream.send(OpenChildLink {
            session: ctx.address(),
            peer: self.peer.clone(),
        });
        ctx.wait(open.into_actor(self).map(|res, act, ctx| match res {
            Ok(Ok(ch)) => {
                act.ch = Some(ch);
                act.phase = Phase::Handshake { claimed: None };
            }
            _ => {
                act.quiet = true;
                refuse_busy(ctx);
            }
        }));
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        if let (Some(ch), false) = (self.ch, self.quiet) {
            self.upstream.do_send(DownGone {
                ch,
                code: CloseCode::GoingAway,
                reason: "child relay disconnected".into(),
            });
        }
        if let Phase::Mux { relay_id } = &self.phase {
            tracing::info!(relay_id = %relay_id, "child-relay-gone");
        }
        self.upstream.do_send(ChildGone { child: self.id });
        Running::Stop
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for ChildRelay {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        match inbound(&msg) {
            Inbound::Bytes(bytes) => self.on_bytes(ctx, bytes),
            Inbound::Ping(p) => ctx.pong(p),
            Inbound::Pong | Inbound::Nothing => {}
            Inbound::Closed => ctx.stop(),
            Inbound::Refuse { code, reason, .. } => self.refuse(ctx, code, &reason),
        }
    }
}

/// Something for the child relay's socket.
#[derive(Message)]
#[rtype(result = "()")]
pub enum ChildFrame {
    /// A v1 frame on the child's own channel (its handshake, then the server's heartbeats).
    Link(Vec<u8>),
    /// A mux frame already addressed to one of the child's channels.
    Raw(Vec<u8>),
}

impl Handler<ChildFrame> for ChildRelay {
    type Result = ();

    fn handle(&mut self, msg: ChildFrame, ctx: &mut Self::Context) {
        match msg {
            ChildFrame::Raw(bytes) => ctx.binary(bytes),
            ChildFrame::Link(bytes) => match &self.phase {
                Phase::Mux { .. } => ctx.binary(mux::data(LINK_CHANNEL, &bytes)),
                Phase::Handshake { claimed } => {
                    let welcome = matches!(
                        protocol::decode(&bytes, Sender::Server),
                        Ok(Frame::Welcome(_))
                    );
                    let claimed = claimed.clone();
                    ctx.binary(bytes);
                    if welcome {
                        match claimed {
                            Some(relay_id) => {
                                tracing::info!(relay_id = %relay_id, peer = %self.peer, "child-relay-ready");
                                self.phase = Phase::Mux { relay_id };
                            }
                            None => self.refuse(ctx, CloseCode::Refused, "welcome without a hello"),
                        }
                    }
                }
                Phase::Opening => {}
            },
        }
    }
}

/// Close the child's whole link.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseChild {
    pub code: CloseCode,
    pub reason: String,
}

impl Handler<CloseChild> for ChildRelay {
    type Result = ();

    fn handle(&mut self, msg: CloseChild, ctx: &mut Self::Context) {
        self.quiet = true;
        self.close(ctx, msg.code, &msg.reason);
    }
}
