//! Attaching a verified agent to its link, whether the agent's WebSocket ends here
//! ([`super::agent_session`]) or reaches us as a channel of a relay's link ([`super::relay_session`]); the link
//! talks back through a [`SessionHandle`]. The handshake before it is [`super::greeting`].

use actix::prelude::*;
use tether_shared::ids::AgentId;
use tether_shared::protocol::{Hello, Welcome};
use tether_shared::stream::ConnId;

use crate::session::agent_link::{AgentLink, AgentLinkError, Attach};
pub use crate::session::handle::SessionHandle;
use crate::session::session_registry::{RegisterSession, SessionRegistry};

/// Why an agent's verified session could not attach to its link.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The session registry or the link is gone (the server is stopping, or the link died).
    #[error("{0}")]
    Mailbox(#[from] MailboxError),
    #[error(transparent)]
    Link(#[from] AgentLinkError),
}

/// Register `handle` as the agent's session (replacing any older one) and run the stream
/// handshake on its link. Resolves to the link and the `Welcome` to send.
pub async fn attach(
    registry: Addr<SessionRegistry>,
    conn: ConnId,
    hello: Hello,
    handle: SessionHandle,
) -> Result<(Addr<AgentLink>, Welcome), AttachError> {
    let link = registry
        .send(RegisterSession {
            agent_id: AgentId::new(hello.agent_id.as_str()),
            conn,
            session: handle.clone(),
        })
        .await??;
    let welcome = link
        .send(Attach {
            conn,
            hello,
            session: handle,
        })
        .await??;
    Ok((link, welcome))
}
