//! End-to-end protection of an agent's session, through any number of relays (sans-IO).
//!
//! A relay carries an agent's WebSocket frames; it must learn nothing from them but their sizes
//! and timing, and change nothing without being caught. Before anything else on an agent's
//! session, the agent and the server run a Noise handshake,
//! `Noise_XX_25519_ChaChaPoly_SHA256` (the `snow` crate). Each side's Noise static key is fresh
//! for the session and **signed with its long-term Ed25519 key**, the construction libp2p's
//! Noise handshake uses ("static key signatures"):
//! - the agent signs with its enrollment key; the server checks the signature against the key
//!   the registry holds for the agent id the agent names;
//! - the server signs with its command-signing key; the agent checks it against the keys it
//!   trusts (pinned at enrollment, more than one during a key rollover).
//!
//! A relay holds neither key, so it can complete neither side: it cannot sit in the middle.
//!
//! ```text
//! agent (initiator)                                   server (responder)
//!   -> e                                         m1
//!                                                m2   <- e, ee, s, es   {"sig": server's}
//!   -> s, se   {"agent_id", "sig": agent's}      m3
//!   sealed frames   <->   sealed frames
//! ```
//!
//! After the handshake every frame is sealed ([`Transport`]): its bytes are cut into pieces,
//! each a Noise transport message (ChaCha20-Poly1305, the message counter as nonce) whose
//! plaintext ends with a flag byte (more pieces follow, or this is the last), written as
//! `u16 length ‖ ciphertext`. A flipped bit, a replayed, reordered, dropped, split or injected
//! message, or a message of another session fails to open, and the caller ends the session.

mod gate;
#[cfg(test)]
mod tests;

pub use gate::{AgentGate, AgentStep, ServerGate, ServerStep};

use serde::{Deserialize, Serialize};
use snow::{Builder, HandshakeState, TransportState};

use crate::identity::{Identity, PublicKey};
use crate::protocol::MAX_FRAME_BYTES;

/// The Noise protocol name: XX (both static keys sent, encrypted), X25519, ChaCha20-Poly1305,
/// SHA-256.
pub const PATTERN: &str = "Noise_XX_25519_ChaChaPoly_SHA256";
/// What a long-term key signs: this context, then the 32-byte Noise static public key.
const STATIC_KEY_CONTEXT: &[u8] = b"tether-e2e-v1 noise static key:";
/// Largest Noise message.
const NOISE_MAX: usize = 65_535;
/// Poly1305 tag.
const TAG: usize = 16;
/// Frame bytes in one piece (the rest of a Noise message is the flag and the tag).
pub const MAX_PIECE_BYTES: usize = NOISE_MAX - TAG - 1;
/// Largest handshake message (keys, tags and a small JSON payload).
pub const MAX_HANDSHAKE_BYTES: usize = 2_048;
/// Largest sealed frame: a full-size frame in pieces, each with its length, flag and tag.
pub const MAX_SEALED_BYTES: usize = MAX_FRAME_BYTES + pieces(MAX_FRAME_BYTES) * (2 + 1 + TAG);

const MORE: u8 = 1;
const LAST: u8 = 0;

const fn pieces(len: usize) -> usize {
    if len == 0 {
        1
    } else {
        len.div_ceil(MAX_PIECE_BYTES)
    }
}

/// Why a handshake or a sealed frame failed. Every one ends the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum E2eError {
    #[error("end-to-end handshake: {0}")]
    Noise(String),
    #[error("end-to-end handshake: the {which} message is malformed: {reason}")]
    Malformed { which: &'static str, reason: String },
    #[error("end-to-end handshake: the server's key is not signed by a key this agent trusts")]
    UntrustedServer,
    #[error("end-to-end handshake: unknown agent {0:?}")]
    UnknownAgent(String),
    #[error("end-to-end handshake: agent {0:?} did not sign its key with its enrolled key")]
    BadAgentSignature(String),
    #[error("a sealed frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("a sealed frame does not open (altered, replayed, reordered, or of another session)")]
    Open,
}

impl From<snow::Error> for E2eError {
    fn from(e: snow::Error) -> Self {
        E2eError::Noise(e.to_string())
    }
}

/// The server's proof in m2.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerProof {
    sig: String,
}

/// The agent's proof in m3.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentProof {
    agent_id: String,
    sig: String,
}

fn static_key_message(static_public: &[u8]) -> Vec<u8> {
    [STATIC_KEY_CONTEXT, static_public].concat()
}

/// A handshake state with a fresh static key; returns it and the static public key.
fn fresh(initiator: bool) -> Result<(HandshakeState, Vec<u8>), E2eError> {
    let params: snow::params::NoiseParams = PATTERN.parse()?;
    let keys = Builder::new(params.clone()).generate_keypair()?;
    let builder = Builder::new(params).local_private_key(&keys.private)?;
    let hs = if initiator {
        builder.build_initiator()?
    } else {
        builder.build_responder()?
    };
    Ok((hs, keys.public))
}

fn write(hs: &mut HandshakeState, payload: &[u8]) -> Result<Vec<u8>, E2eError> {
    let mut out = vec![0u8; MAX_HANDSHAKE_BYTES];
    let n = hs.write_message(payload, &mut out)?;
    out.truncate(n);
    Ok(out)
}

fn read(hs: &mut HandshakeState, message: &[u8], which: &'static str) -> Result<Vec<u8>, E2eError> {
    if message.len() > MAX_HANDSHAKE_BYTES {
        return Err(E2eError::Malformed {
            which,
            reason: format!("{} bytes", message.len()),
        });
    }
    let mut payload = vec![0u8; message.len()];
    let n = hs.read_message(message, &mut payload)?;
    payload.truncate(n);
    Ok(payload)
}

fn parse<T: for<'de> Deserialize<'de>>(payload: &[u8], which: &'static str) -> Result<T, E2eError> {
    serde_json::from_slice(payload).map_err(|e| E2eError::Malformed {
        which,
        reason: e.to_string(),
    })
}

fn remote_static(hs: &HandshakeState, which: &'static str) -> Result<Vec<u8>, E2eError> {
    hs.get_remote_static()
        .map(<[u8]>::to_vec)
        .ok_or(E2eError::Malformed {
            which,
            reason: "no static key".into(),
        })
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    // Two strings: serializing cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// The agent's side of the handshake.
pub struct Initiator {
    hs: HandshakeState,
    static_public: Vec<u8>,
}

impl Initiator {
    /// Starts the handshake: the initiator and the first message (m1) to send.
    pub fn start() -> Result<(Initiator, Vec<u8>), E2eError> {
        let (mut hs, static_public) = fresh(true)?;
        let m1 = write(&mut hs, &[])?;
        Ok((Initiator { hs, static_public }, m1))
    }

    /// Takes the server's answer (m2), checks that one of `trusted` signed its static key,
    /// and proves `agent_id` with `identity`: returns the transport and the last message (m3).
    pub fn finish(
        mut self,
        m2: &[u8],
        trusted: &[PublicKey],
        agent_id: &str,
        identity: &Identity,
    ) -> Result<(Transport, Vec<u8>), E2eError> {
        let proof: ServerProof = parse(&read(&mut self.hs, m2, "server's")?, "server's")?;
        let signed = static_key_message(&remote_static(&self.hs, "server's")?);
        if !trusted
            .iter()
            .any(|k| k.verify(&signed, &proof.sig).is_ok())
        {
            return Err(E2eError::UntrustedServer);
        }
        let proof = AgentProof {
            agent_id: agent_id.to_owned(),
            sig: identity.sign(&static_key_message(&self.static_public)),
        };
        let m3 = write(&mut self.hs, &json(&proof))?;
        Ok((Transport::new(self.hs.into_transport_mode()?), m3))
    }
}

/// The server's side of the handshake.
pub struct Responder {
    hs: HandshakeState,
}

impl Responder {
    /// Answers the agent's first message (m1) with m2, signed by the server's `identity`.
    pub fn answer(m1: &[u8], identity: &Identity) -> Result<(Responder, Vec<u8>), E2eError> {
        let (mut hs, static_public) = fresh(false)?;
        let payload = read(&mut hs, m1, "agent's first")?;
        if !payload.is_empty() {
            return Err(E2eError::Malformed {
                which: "agent's first",
                reason: "a payload where none belongs".into(),
            });
        }
        let proof = ServerProof {
            sig: identity.sign(&static_key_message(&static_public)),
        };
        let m2 = write(&mut hs, &json(&proof))?;
        Ok((Responder { hs }, m2))
    }

    /// Takes the agent's last message (m3): the agent id it proved (checked against
    /// `enrolled_key`, the registry's key for an id) and the transport.
    pub fn finish(
        mut self,
        m3: &[u8],
        enrolled_key: impl FnOnce(&str) -> Option<PublicKey>,
    ) -> Result<(Transport, String), E2eError> {
        let proof: AgentProof = parse(&read(&mut self.hs, m3, "agent's last")?, "agent's last")?;
        let signed = static_key_message(&remote_static(&self.hs, "agent's last")?);
        let id: String = proof.agent_id.chars().take(128).collect();
        let key =
            enrolled_key(&proof.agent_id).ok_or_else(|| E2eError::UnknownAgent(id.clone()))?;
        key.verify(&signed, &proof.sig)
            .map_err(|_| E2eError::BadAgentSignature(id))?;
        Ok((
            Transport::new(self.hs.into_transport_mode()?),
            proof.agent_id,
        ))
    }
}

/// Sealing and opening frames once the handshake is done.
pub struct Transport {
    state: TransportState,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Transport")
    }
}

impl Transport {
    fn new(state: TransportState) -> Self {
        Transport { state }
    }

    /// One frame (at most [`MAX_FRAME_BYTES`]) sealed for the peer.
    pub fn seal(&mut self, frame: &[u8]) -> Result<Vec<u8>, E2eError> {
        if frame.len() > MAX_FRAME_BYTES {
            return Err(E2eError::TooLarge {
                len: frame.len(),
                max: MAX_FRAME_BYTES,
            });
        }
        let count = pieces(frame.len());
        let mut out = Vec::with_capacity(frame.len() + count * (2 + 1 + TAG));
        let mut plain = Vec::with_capacity(frame.len().min(MAX_PIECE_BYTES) + 1);
        for i in 0..count {
            let piece = &frame[(i * MAX_PIECE_BYTES).min(frame.len())
                ..((i + 1) * MAX_PIECE_BYTES).min(frame.len())];
            plain.clear();
            plain.extend_from_slice(piece);
            plain.push(if i + 1 < count { MORE } else { LAST });
            let at = out.len();
            out.resize(at + 2 + plain.len() + TAG, 0);
            let n = self.state.write_message(&plain, &mut out[at + 2..])?;
            out.truncate(at + 2 + n);
            out[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
        }
        Ok(out)
    }

    /// The frame inside one sealed message. Any error means the session cannot go on.
    pub fn open(&mut self, sealed: &[u8]) -> Result<Vec<u8>, E2eError> {
        if sealed.len() > MAX_SEALED_BYTES {
            return Err(E2eError::TooLarge {
                len: sealed.len(),
                max: MAX_SEALED_BYTES,
            });
        }
        // Each piece is opened straight into the frame's buffer; its flag is its last byte.
        let mut frame = Vec::with_capacity(sealed.len());
        let mut rest = sealed;
        loop {
            let (len, tail) = rest.split_at_checked(2).ok_or(E2eError::Open)?;
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            let (message, tail) = tail.split_at_checked(len).ok_or(E2eError::Open)?;
            let at = frame.len();
            frame.resize(at + message.len(), 0);
            let n = self
                .state
                .read_message(message, &mut frame[at..])
                .map_err(|_| E2eError::Open)?;
            if n == 0 {
                return Err(E2eError::Open);
            }
            frame.truncate(at + n);
            let flag = frame.pop().ok_or(E2eError::Open)?;
            rest = tail;
            match (flag, rest.is_empty()) {
                (LAST, true) => return Ok(frame),
                (MORE, false) => {}
                _ => return Err(E2eError::Open),
            }
        }
    }
}
