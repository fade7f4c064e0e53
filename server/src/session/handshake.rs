//! What every agent session shares, whether the agent's WebSocket ends here ([`AgentSession`])
//! or reaches us as a channel of a relay's link ([`RelaySession`]): the challenge nonce, the
//! identity check of a `Hello`, and attaching to the agent's link (the link talks back through
//! a [`SessionHandle`]).

use actix::prelude::*;
use base64::Engine as _;
use tether_shared::enroll::Role;
use tether_shared::identity::PublicKey;
use tether_shared::protocol::{hello_proof_bytes, Hello, Welcome};
use tether_shared::stream::ConnId;

use crate::session::agent_link::{AgentLink, Attach};
pub use crate::session::handle::SessionHandle;
use crate::session::session_registry::{RegisterSession, SessionRegistry};
use crate::session::SessionShared;

/// A fresh challenge nonce.
pub fn new_nonce() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

/// The identity check: `hello` names an enrolled peer of `role`, and carries its signature over
/// our `nonce`. Returns the peer's software version (trimmed).
pub fn verify_hello(
    shared: &SessionShared,
    nonce: &str,
    hello: &Hello,
    role: Role,
) -> Result<String, String> {
    let record = shared
        .registry
        .agent(&hello.agent_id)
        .ok_or(format!("unknown {role}"))?;
    if record.role != role {
        return Err(format!("not {} {role} identity", article(role)));
    }
    let key = PublicKey::from_b64(&record.public_key).map_err(|_| "unusable registered key")?;
    key.verify(&hello_proof_bytes(nonce, &hello.agent_id), &hello.proof)
        .map_err(|_| "bad proof signature")?;
    Ok(hello.version.chars().take(64).collect())
}

/// The registered key of enrolled peer `id` of `role`, for the end-to-end handshake.
pub fn enrolled_key(shared: &SessionShared, id: &str, role: Role) -> Option<PublicKey> {
    let record = shared.registry.agent(id).filter(|r| r.role == role)?;
    PublicKey::from_b64(&record.public_key).ok()
}

/// The `Hello` of a session protected end to end must name the agent the handshake proved:
/// otherwise an agent could speak for another through its own protected session.
pub fn hello_matches_gate(proved: Option<&str>, hello: &Hello) -> Result<(), String> {
    match proved {
        Some(id) if id == hello.agent_id => Ok(()),
        _ => Err("the hello names another agent than the end-to-end handshake proved".into()),
    }
}

fn article(role: Role) -> &'static str {
    match role {
        Role::Agent => "an",
        Role::Relay => "a",
    }
}

/// Register `handle` as the agent's session (replacing any older one) and run the stream
/// handshake on its link. Resolves to the link and the `Welcome` to send.
pub async fn attach(
    registry: Addr<SessionRegistry>,
    conn: ConnId,
    hello: Hello,
    handle: SessionHandle,
) -> Result<(Addr<AgentLink>, Welcome), String> {
    let link = registry
        .send(RegisterSession {
            agent_id: hello.agent_id.clone(),
            conn,
            session: handle.clone(),
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let welcome = link
        .send(Attach {
            conn,
            hello,
            session: handle,
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok((link, welcome))
}
