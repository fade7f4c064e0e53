//! Each end's state through a session: handshake, then sealed frames (sans-IO). The session
//! actors (agent uplink, server sessions and relay channels) and the test harnesses hold one.

use crate::e2e::{E2eError, Initiator, Responder, Transport};
use crate::identity::{Identity, PublicKey};

/// What the agent's end made of one message from the server.
#[derive(Debug)]
pub enum AgentStep {
    /// The handshake is done: send this (its last message); frames are sealed from now on.
    Send(Vec<u8>),
    /// A frame, opened.
    Frame(Vec<u8>),
}

/// The agent's end: [`AgentGate::start`] when connected, then every message goes through
/// [`AgentGate::on_message`] and every frame out through [`AgentGate::seal`].
pub enum AgentGate {
    AwaitReply(Box<Initiator>),
    Open(Transport),
    Failed,
}

impl AgentGate {
    /// A new session: the gate and the first message to send.
    pub fn start() -> Result<(AgentGate, Vec<u8>), E2eError> {
        let (initiator, m1) = Initiator::start()?;
        Ok((AgentGate::AwaitReply(Box::new(initiator)), m1))
    }

    pub fn is_open(&self) -> bool {
        matches!(self, AgentGate::Open(_))
    }

    /// One message from the server. After an error the session must end.
    pub fn on_message(
        &mut self,
        bytes: &[u8],
        trusted: &[PublicKey],
        agent_id: &str,
        identity: &Identity,
    ) -> Result<AgentStep, E2eError> {
        // A frame that does not open leaves the sending half usable: a refusal can still go
        // out sealed before the session ends.
        if let AgentGate::Open(transport) = self {
            return transport.open(bytes).map(AgentStep::Frame);
        }
        match std::mem::replace(self, AgentGate::Failed) {
            AgentGate::AwaitReply(initiator) => {
                let (transport, m3) = initiator.finish(bytes, trusted, agent_id, identity)?;
                *self = AgentGate::Open(transport);
                Ok(AgentStep::Send(m3))
            }
            AgentGate::Open(_) | AgentGate::Failed => Err(E2eError::Open),
        }
    }

    /// A frame sealed for the server (an error before the handshake is done).
    pub fn seal(&mut self, frame: &[u8]) -> Result<Vec<u8>, E2eError> {
        match self {
            AgentGate::Open(transport) => transport.seal(frame),
            _ => Err(E2eError::Open),
        }
    }

    /// A sealed frame from the server, opened (an error before the handshake is done).
    pub fn open_frame(&mut self, sealed: &[u8]) -> Result<Vec<u8>, E2eError> {
        match self {
            AgentGate::Open(transport) => transport.open(sealed),
            _ => Err(E2eError::Open),
        }
    }
}

/// What the server's end made of one message from an agent.
#[derive(Debug)]
pub enum ServerStep {
    /// Send this (the handshake's answer) as it is.
    Reply(Vec<u8>),
    /// The handshake is done: the agent proved this id. Frames are sealed from now on.
    Established(String),
    /// A frame, opened.
    Frame(Vec<u8>),
}

/// The server's end of an agent's session.
#[derive(Default)]
pub enum ServerGate {
    #[default]
    AwaitFirst,
    AwaitLast(Box<Responder>),
    Open {
        transport: Transport,
        agent_id: String,
    },
    Failed,
}

impl ServerGate {
    /// The agent id the handshake proved, once done.
    pub fn agent_id(&self) -> Option<&str> {
        match self {
            ServerGate::Open { agent_id, .. } => Some(agent_id),
            _ => None,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self, ServerGate::Open { .. })
    }

    /// One message from the agent; `enrolled_key` is the registry's key of an enrolled agent
    /// id. After an error the session must end.
    pub fn on_message(
        &mut self,
        bytes: &[u8],
        identity: &Identity,
        enrolled_key: impl FnOnce(&str) -> Option<PublicKey>,
    ) -> Result<ServerStep, E2eError> {
        if let ServerGate::Open { transport, .. } = self {
            return transport.open(bytes).map(ServerStep::Frame);
        }
        match std::mem::replace(self, ServerGate::Failed) {
            ServerGate::AwaitFirst => {
                let (responder, m2) = Responder::answer(bytes, identity)?;
                *self = ServerGate::AwaitLast(Box::new(responder));
                Ok(ServerStep::Reply(m2))
            }
            ServerGate::AwaitLast(responder) => {
                let (transport, agent_id) = responder.finish(bytes, enrolled_key)?;
                *self = ServerGate::Open {
                    transport,
                    agent_id: agent_id.clone(),
                };
                Ok(ServerStep::Established(agent_id))
            }
            ServerGate::Open { .. } | ServerGate::Failed => Err(E2eError::Open),
        }
    }

    /// A frame sealed for the agent (an error before the handshake is done).
    pub fn seal(&mut self, frame: &[u8]) -> Result<Vec<u8>, E2eError> {
        match self {
            ServerGate::Open { transport, .. } => transport.seal(frame),
            _ => Err(E2eError::Open),
        }
    }
}
