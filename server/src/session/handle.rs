//! [`SessionHandle`]: the one way an agent's link talks back to the session that carries the
//! agent, whether its WebSocket ends here (`AgentSession`) or it is a channel of a relay's
//! link (`RelaySession`). The link holds a recipient of [`ToSession`], not the session's type,
//! so links, the session registry and the handshake depend on this module alone.

use actix::prelude::*;
use tether_shared::close::CloseCode;
use tether_shared::protocol::ErrorCode;
use tether_shared::stream::ConnId;

/// What a link asks of a session.
pub enum Ask {
    /// Frames for the agent.
    Frames(Vec<Vec<u8>>),
    /// Refuse what the agent sent: an error frame, then close.
    Refuse {
        code: CloseCode,
        error: ErrorCode,
        reason: String,
    },
    /// A newer session of the agent took over: close without marking it offline.
    Replaced,
}

/// An [`Ask`] for the session of channel `ch` on connection `conn` (a direct session has one
/// channel and ignores both).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ToSession {
    pub ch: u32,
    pub conn: ConnId,
    pub ask: Ask,
}

/// How a link reaches the session of its agent.
#[derive(Clone)]
pub struct SessionHandle {
    to: Recipient<ToSession>,
    ch: u32,
    conn: ConnId,
    /// The relays the agent came through, nearest it first (none: direct).
    path: Vec<String>,
}

impl SessionHandle {
    /// The agent's own WebSocket ends at `session`.
    pub fn direct(session: Recipient<ToSession>) -> SessionHandle {
        SessionHandle {
            to: session,
            ch: 0,
            conn: ConnId(0),
            path: Vec::new(),
        }
    }

    /// The agent is channel `ch` (opened as `conn`) of the relay link `link`, through `path`
    /// (relays, nearest the agent first).
    pub fn relayed(
        link: Recipient<ToSession>,
        ch: u32,
        conn: ConnId,
        path: Vec<String>,
    ) -> SessionHandle {
        SessionHandle {
            to: link,
            ch,
            conn,
            path,
        }
    }

    /// The relays the agent came through, nearest it first.
    pub fn path(&self) -> &[String] {
        &self.path
    }

    fn ask(&self, ask: Ask) {
        self.to.do_send(ToSession {
            ch: self.ch,
            conn: self.conn,
            ask,
        });
    }

    /// Frames for the agent.
    pub fn send_frames(&self, frames: Vec<Vec<u8>>) {
        self.ask(Ask::Frames(frames));
    }

    /// Refuse what the agent sent: an error frame, then close.
    pub fn close(&self, code: CloseCode, error: ErrorCode, reason: String) {
        self.ask(Ask::Refuse {
            code,
            error,
            reason,
        });
    }

    /// A newer session of the agent took over.
    pub fn replaced(&self) {
        self.ask(Ask::Replaced);
    }

    /// The session's actor still runs.
    pub fn connected(&self) -> bool {
        self.to.connected()
    }
}
