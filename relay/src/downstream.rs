//! `AgentDown`: one agent's WebSocket on the relay (`GET /agent/v1/ws` on the downstream
//! listener). It opens a channel on the upstream link and moves frames both ways without
//! reading them: the agent's handshake is with the server, which checks its signature over the
//! server's own nonce. If the upstream link is not up, the agent gets `Busy` and retries.
//!
//! Its mailbox is the agent's bounded queue: the upstream link puts frames in with `try_send`,
//! and the mailbox only drains as fast as the agent's socket takes them, so a slow agent fills
//! its own queue and is shed, never slowing the others.

use std::sync::Arc;

use actix::prelude::*;
use actix_web_actors::ws;
use tether_shared::close::{self, CloseCode};
use tether_shared::protocol::ErrorCode;
use tether_shared::ws_inbound::{inbound, Inbound};

use crate::upstream::{error_frame, DownGone, Forward, OpenAgent, Upstream};

/// How a downstream session is configured.
pub struct DownConfig {
    /// Frames queued for one agent before it is shed.
    pub max_queue: usize,
}

pub struct AgentDown {
    upstream: Addr<Upstream>,
    cfg: Arc<DownConfig>,
    peer: String,
    ch: Option<u32>,
    /// The close came from upstream (or was refused): nothing to report back.
    quiet: bool,
}

impl AgentDown {
    pub fn new(upstream: Addr<Upstream>, cfg: Arc<DownConfig>, peer: String) -> Self {
        AgentDown {
            upstream,
            cfg,
            peer,
            ch: None,
            quiet: false,
        }
    }

    fn close(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: CloseCode, reason: &str) {
        close_ws(ctx, code, reason);
    }

    /// A protocol problem on the agent's socket: tell it, close, and report the channel closed.
    fn refuse(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: CloseCode, reason: &str) {
        tracing::warn!(peer = %self.peer, ch = ?self.ch, code = %code, reason, "agent-refused");
        if let Some(bytes) = error_frame(ErrorCode::Malformed, reason) {
            ctx.binary(bytes);
        }
        self.close(ctx, code, reason);
    }
}

impl Actor for AgentDown {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.cfg.max_queue);
        let open = self.upstream.send(OpenAgent {
            session: ctx.address(),
            peer: self.peer.clone(),
        });
        // Nothing from the agent is read until its channel exists.
        ctx.wait(open.into_actor(self).map(|res, act, ctx| match res {
            Ok(Ok(ch)) => act.ch = Some(ch),
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
                reason: "agent disconnected from the relay".into(),
            });
        }
        Running::Stop
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for AgentDown {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let Some(ch) = self.ch else {
            return;
        };
        match inbound(&msg) {
            Inbound::Bytes(bytes) => self.upstream.do_send(Forward {
                ch,
                frame: bytes.to_vec(),
            }),
            Inbound::Ping(p) => ctx.pong(p),
            Inbound::Pong | Inbound::Nothing => {}
            Inbound::Closed => ctx.stop(),
            Inbound::Refuse { code, reason, .. } => self.refuse(ctx, code, &reason),
        }
    }
}

/// Close a downstream socket with `code` and a reason (truncated to fit a close frame).
pub fn close_ws<A>(ctx: &mut ws::WebsocketContext<A>, code: CloseCode, reason: &str)
where
    A: Actor<Context = ws::WebsocketContext<A>>,
{
    ctx.close(Some(code.frame(reason)));
    ctx.stop();
}

/// The relay cannot carry a downstream peer now (no upstream link): `Busy`, then close 1013,
/// so the peer retries after a jittered delay.
pub fn refuse_busy<A>(ctx: &mut ws::WebsocketContext<A>)
where
    A: Actor<Context = ws::WebsocketContext<A>>,
{
    if let Ok(bytes) = close::busy(2_500).encode() {
        ctx.binary(bytes);
    }
    close_ws(
        ctx,
        CloseCode::Busy,
        "relay has no upstream yet, retry later",
    );
}

/// A frame from upstream for this agent.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ToDown(pub Vec<u8>);

impl Handler<ToDown> for AgentDown {
    type Result = ();

    fn handle(&mut self, msg: ToDown, ctx: &mut Self::Context) {
        ctx.binary(msg.0);
    }
}

/// Upstream closed this agent's channel (refused, replaced, shed, or the link dropped).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseDown {
    pub code: CloseCode,
    pub reason: String,
}

impl Handler<CloseDown> for AgentDown {
    type Result = ();

    fn handle(&mut self, msg: CloseDown, ctx: &mut Self::Context) {
        self.quiet = true;
        self.close(ctx, msg.code, &msg.reason);
    }
}
