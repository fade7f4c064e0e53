//! The server's side of one peer's handshake, sans IO: a [`Greeting`] is fed the peer's
//! messages and says what to do with each ([`Step`]). The same machine serves an agent whose
//! WebSocket ends here ([`super::agent_session`]), an agent on a relay's channel, a child relay
//! on a channel, and a relay's own link ([`super::relay_session`]).
//!
//! An agent opens with the end-to-end handshake ([`tether_shared::e2e`]); once it is done
//! every frame both ways is sealed and the agent is challenged. A relay has no end-to-end
//! handshake and is challenged at once. The peer's first frame after the challenge must be a
//! `Hello` naming an enrolled peer of the expected role (and, for an agent, the one its
//! end-to-end handshake proved), signed over our nonce. Then an agent attaches to its link
//! (frames for it are held until the link's `Welcome` went out) and a relay is ready.

use std::borrow::Cow;

use base64::Engine as _;
use tether_shared::close::CloseCode;
use tether_shared::e2e::{ServerGate, ServerStep};
use tether_shared::enroll::Role;
use tether_shared::identity::{Identity, PublicKey};
use tether_shared::protocol::{
    self, hello_proof_bytes, Challenge, ErrorCode, Frame, Hello, Sender,
};

/// Why a peer's `Hello` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("unknown {0}")]
    Unknown(Role),
    #[error("not {article} {role} identity", article = article(*.0), role = .0)]
    WrongRole(Role),
    #[error("unusable registered key")]
    UnusableKey,
    #[error("bad proof signature")]
    BadProof,
    /// Otherwise an agent could speak for another through its own protected session.
    #[error("the hello names another agent than the end-to-end handshake proved")]
    NotTheProvedAgent,
}

impl HelloError {
    /// The refusal's word in `/metrics`.
    pub fn label(&self) -> &'static str {
        match self {
            HelloError::Unknown(_) => "unknown_peer",
            HelloError::WrongRole(_) => "wrong_role",
            HelloError::UnusableKey => "unusable_key",
            HelloError::BadProof => "bad_proof",
            HelloError::NotTheProvedAgent => "not_the_proved_agent",
        }
    }
}

fn article(role: Role) -> &'static str {
    match role {
        Role::Agent => "an",
        Role::Relay => "a",
    }
}

/// What the handshake needs to know of enrolled peers: the role and registered public key
/// (base64) of peer `id`.
pub trait Enrolled {
    fn enrolled(&self, id: &str) -> Option<(Role, String)>;
}

/// A refusal: the error frame's code and reason, and the close code after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub close: CloseCode,
    pub error: ErrorCode,
    pub reason: String,
    /// Its kind in `/metrics` (a fixed word, never the reason's text).
    pub why: &'static str,
}

impl Refusal {
    /// A refusal counted by its error code.
    pub fn new(close: CloseCode, error: ErrorCode, reason: impl Into<String>) -> Self {
        Refusal {
            close,
            error,
            reason: reason.into(),
            why: super::handshake_counts::error_label(error),
        }
    }

    /// Counted as `why` instead.
    pub fn because(mut self, why: &'static str) -> Self {
        self.why = why;
        self
    }

    /// The error frame that tells the peer, before the close.
    pub fn error_frame(&self) -> Frame {
        Frame::Error(protocol::ErrorFrame {
            code: self.error,
            message: self.reason.clone(),
            details: Default::default(),
        })
    }
}

/// What the owner does with one message of the peer.
#[derive(Debug)]
pub enum Step {
    /// Put these bytes on the wire as they are (the end-to-end handshake's answer).
    Wire(Vec<u8>),
    /// Send this frame (sealed by [`Greeting::seal`]).
    Send(Frame),
    /// The `Hello` checked out (its version trimmed): attach an agent, welcome a relay.
    Verified { hello: Hello, version: String },
    /// A stream frame for the agent's link.
    ToLink(Vec<u8>),
    /// Nothing to do.
    Nothing,
    /// Refuse the peer.
    Refuse(Refusal),
}

#[derive(Debug)]
enum Phase {
    /// The end-to-end handshake runs.
    Securing,
    /// Challenge sent; waiting for the Hello.
    Challenged,
    /// An agent's Hello checked out and its link runs the stream handshake; frames from the
    /// link wait here.
    Attaching { held: Vec<Vec<u8>> },
    /// Streams (an agent) or heartbeats (a relay) run.
    Ready,
    /// Refused, gone or replaced: nothing more is processed.
    Closing,
}

pub struct Greeting {
    role: Role,
    nonce: String,
    /// An agent's end-to-end protection; a relay has none.
    gate: Option<ServerGate>,
    phase: Phase,
    /// The peer's id once its Hello checked out.
    peer: Option<String>,
}

impl Greeting {
    /// An agent's handshake: it speaks first, with the end-to-end handshake.
    pub fn agent() -> Self {
        Self::new(Role::Agent, Some(ServerGate::default()), Phase::Securing)
    }

    /// A relay's handshake: send [`Greeting::challenge`] first.
    pub fn relay() -> Self {
        Self::new(Role::Relay, None, Phase::Challenged)
    }

    fn new(role: Role, gate: Option<ServerGate>, phase: Phase) -> Self {
        let nonce = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
        Greeting {
            role,
            nonce,
            gate,
            phase,
            peer: None,
        }
    }

    pub fn challenge(&self) -> Frame {
        Frame::Challenge(Challenge {
            nonce: self.nonce.clone(),
        })
    }

    /// The verified peer's id.
    pub fn peer(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    /// Still handshaking (counts against the handshakes in flight, and its deadline runs).
    pub fn handshaking(&self) -> bool {
        matches!(
            self.phase,
            Phase::Securing | Phase::Challenged | Phase::Attaching { .. }
        )
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready)
    }

    pub fn is_attaching(&self) -> bool {
        matches!(self.phase, Phase::Attaching { .. })
    }

    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Securing => "securing",
            Phase::Challenged => "challenged",
            Phase::Attaching { .. } => "attaching",
            Phase::Ready => "ready",
            Phase::Closing => "closing",
        }
    }

    /// One message of the peer. `signer` answers the end-to-end handshake.
    pub fn on_message(&mut self, bytes: &[u8], signer: &Identity, peers: &impl Enrolled) -> Step {
        if matches!(self.phase, Phase::Closing) {
            return Step::Nothing;
        }
        let opened;
        let frame = match self.gate.as_mut() {
            None => bytes,
            Some(gate) => {
                let step = gate.on_message(bytes, signer, |id| match peers.enrolled(id) {
                    Some((Role::Agent, key)) => PublicKey::from_b64(&key).ok(),
                    _ => None,
                });
                match step {
                    Ok(ServerStep::Reply(answer)) => return Step::Wire(answer),
                    Ok(ServerStep::Established(agent_id)) => {
                        tracing::debug!(agent_id = %agent_id, "session-sealed");
                        self.phase = Phase::Challenged;
                        return Step::Send(self.challenge());
                    }
                    Ok(ServerStep::Frame(frame)) => {
                        opened = frame;
                        &opened
                    }
                    Err(e) => {
                        return Step::Refuse(
                            Refusal::new(
                                CloseCode::Refused,
                                ErrorCode::Unauthorized,
                                e.to_string(),
                            )
                            .because("end_to_end_handshake"),
                        )
                    }
                }
            }
        };
        match &self.phase {
            Phase::Challenged => self.on_hello(frame, peers),
            Phase::Ready => Step::ToLink(frame.to_vec()),
            Phase::Attaching { .. } => self.refuse(
                CloseCode::Refused,
                ErrorCode::ProtocolViolation,
                "frame before the welcome",
            ),
            Phase::Securing | Phase::Closing => Step::Nothing,
        }
    }

    fn on_hello(&mut self, bytes: &[u8], peers: &impl Enrolled) -> Step {
        let hello = match protocol::decode(bytes, Sender::Agent) {
            Ok(Frame::Hello(h)) => h,
            Ok(other) => {
                let reason = format!("expected hello, got {}", other.kind());
                return self.refuse(CloseCode::Refused, ErrorCode::ProtocolViolation, reason);
            }
            Err(e) => return self.refuse(e.close_code(), e.to_error_frame().code, e.to_string()),
        };
        if let Err(e) = self.verify(&hello, peers) {
            return Step::Refuse(
                Refusal::new(CloseCode::Refused, ErrorCode::Unauthorized, e.to_string())
                    .because(e.label()),
            );
        }
        self.peer = Some(hello.agent_id.clone());
        self.phase = match self.role {
            Role::Agent => Phase::Attaching { held: Vec::new() },
            Role::Relay => Phase::Ready,
        };
        let version = hello.version.chars().take(64).collect();
        Step::Verified { hello, version }
    }

    /// `hello` names an enrolled peer of our role (the one the end-to-end handshake proved, if
    /// any) and carries its signature over our nonce.
    fn verify(&self, hello: &Hello, peers: &impl Enrolled) -> Result<(), HelloError> {
        let (role, key) = peers
            .enrolled(&hello.agent_id)
            .ok_or(HelloError::Unknown(self.role))?;
        if role != self.role {
            return Err(HelloError::WrongRole(self.role));
        }
        let key = PublicKey::from_b64(&key).map_err(|_| HelloError::UnusableKey)?;
        key.verify(
            &hello_proof_bytes(&self.nonce, &hello.agent_id),
            &hello.proof,
        )
        .map_err(|_| HelloError::BadProof)?;
        match &self.gate {
            Some(gate) if gate.agent_id() != Some(hello.agent_id.as_str()) => {
                Err(HelloError::NotTheProvedAgent)
            }
            _ => Ok(()),
        }
    }

    /// The agent's link welcomed it: ready. Returns the frames held meanwhile, or `None` if the
    /// session was closed or replaced in between.
    pub fn attached(&mut self) -> Option<Vec<Vec<u8>>> {
        match std::mem::replace(&mut self.phase, Phase::Ready) {
            Phase::Attaching { held } => Some(held),
            other => {
                self.phase = other;
                None
            }
        }
    }

    /// Frames from the agent's link: what to put on the wire now, sealed (frames are held while
    /// attaching, and dropped before or after).
    pub fn outgoing(&mut self, frames: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        match &mut self.phase {
            // A frame that needs no sealing goes as it is, uncopied.
            Phase::Ready => frames
                .into_iter()
                .filter_map(|f| {
                    let sealed = match self.seal(&f)? {
                        Cow::Owned(sealed) => Some(sealed),
                        Cow::Borrowed(_) => None,
                    };
                    Some(sealed.unwrap_or(f))
                })
                .collect(),
            Phase::Attaching { held } => {
                held.extend(frames);
                Vec::new()
            }
            Phase::Securing | Phase::Challenged | Phase::Closing => Vec::new(),
        }
    }

    /// An encoded frame as it goes on the wire: sealed once the end-to-end handshake is done
    /// (before it, and for relays, in clear).
    pub fn seal<'a>(&mut self, bytes: &'a [u8]) -> Option<Cow<'a, [u8]>> {
        match self.gate.as_mut().filter(|g| g.is_open()) {
            None => Some(Cow::Borrowed(bytes)),
            Some(gate) => gate
                .seal(bytes)
                .map(Cow::Owned)
                .map_err(|e| tracing::error!(error = %e, "frame-seal-failed"))
                .ok(),
        }
    }

    /// Nothing more is processed. Returns whether the peer had been verified (its id is in
    /// [`Greeting::peer`]) and so must be unregistered.
    pub fn close(&mut self) -> bool {
        let was = std::mem::replace(&mut self.phase, Phase::Closing);
        matches!(was, Phase::Attaching { .. } | Phase::Ready)
    }

    fn refuse(&mut self, close: CloseCode, error: ErrorCode, reason: impl Into<String>) -> Step {
        Step::Refuse(Refusal::new(close, error, reason))
    }
}

impl Enrolled for crate::registry::Registry {
    fn enrolled(&self, id: &str) -> Option<(Role, String)> {
        self.agent(id)
            .or_else(|| self.enrolled_since(id))
            .map(|r| (r.role, r.public_key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tether_shared::e2e::{AgentGate, AgentStep};

    struct Peers(HashMap<String, (Role, String)>);

    impl Enrolled for Peers {
        fn enrolled(&self, id: &str) -> Option<(Role, String)> {
            self.0.get(id).cloned()
        }
    }

    fn peers(list: &[(&str, Role, &Identity)]) -> Peers {
        Peers(
            list.iter()
                .map(|(id, role, key)| (id.to_string(), (*role, key.public_key_b64())))
                .collect(),
        )
    }

    fn hello(id: &str, nonce: &str, key: &Identity) -> Vec<u8> {
        Frame::Hello(Hello {
            agent_id: id.into(),
            version: "v".repeat(100),
            incarnation: String::new(),
            server_incarnation: String::new(),
            last_command_seq: protocol::Seq::ZERO,
            proof: key.sign(&hello_proof_bytes(nonce, id)),
            trust_serial: 0,
            ..Default::default()
        })
        .encode()
        .expect("encode")
    }

    /// An agent's end-to-end handshake run to its challenge: the server's greeting, the
    /// agent's open gate, and the challenge's nonce.
    fn sealed_agent(
        id: &str,
        key: &Identity,
        signer: &Identity,
        known: &Peers,
    ) -> (Greeting, AgentGate, String) {
        let mut g = Greeting::agent();
        let (mut gate, first) = AgentGate::start().expect("start");
        let Step::Wire(answer) = g.on_message(&first, signer, known) else {
            panic!("expected the handshake's answer");
        };
        let Ok(AgentStep::Send(last)) = gate.on_message(&answer, &[signer.public_key()], id, key)
        else {
            panic!("expected the handshake's last message");
        };
        let Step::Send(Frame::Challenge(c)) = g.on_message(&last, signer, known) else {
            panic!("expected a challenge");
        };
        (g, gate, c.nonce)
    }

    fn refusal(step: Step) -> String {
        match step {
            Step::Refuse(r) => r.reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_relay_is_challenged_verified_and_ready() {
        let relay = Identity::generate();
        let signer = Identity::generate();
        let known = peers(&[("r1", Role::Relay, &relay)]);
        let mut g = Greeting::relay();
        assert!(g.handshaking());
        let step = g.on_message(&hello("r1", &g.nonce.clone(), &relay), &signer, &known);
        match step {
            Step::Verified { hello, version } => {
                assert_eq!(hello.agent_id, "r1");
                assert_eq!(version.len(), 64, "the version is trimmed");
            }
            other => panic!("expected verified, got {other:?}"),
        }
        assert!(g.is_ready());
        assert_eq!(g.peer(), Some("r1"));
        assert!(g.close(), "a verified peer must be unregistered");
    }

    #[test]
    fn hellos_that_must_not_pass() {
        let relay = Identity::generate();
        let other = Identity::generate();
        let signer = Identity::generate();
        let known = peers(&[("r1", Role::Relay, &relay), ("a1", Role::Agent, &other)]);
        let cases = [
            (hello("r2", "n", &relay), "unknown relay"),
            (hello("a1", "n", &other), "not a relay identity"),
            (hello("r1", "n", &other), "bad proof signature"),
            (hello("r1", "wrong nonce", &relay), "bad proof signature"),
            // Not a Hello at all: refused, whatever the decoder calls it.
            (b"{\"t\":\"heartbeat\"}".to_vec(), ""),
        ];
        for (bytes, want) in cases {
            let mut g = Greeting::relay();
            let reason = refusal(g.on_message(&bytes, &signer, &known));
            assert!(reason.contains(want), "{reason} / {want}");
            assert!(g.peer().is_none());
            assert!(!g.is_ready());
        }
    }

    #[test]
    fn an_agent_is_sealed_challenged_attached_and_gets_held_frames() {
        let agent = Identity::generate();
        let signer = Identity::generate();
        let known = peers(&[("a1", Role::Agent, &agent)]);
        let (mut g, mut gate, nonce) = sealed_agent("a1", &agent, &signer, &known);
        // A frame for the agent before it is attached goes nowhere.
        assert!(g.outgoing(vec![b"early".to_vec()]).is_empty());
        let sealed = gate.seal(&hello("a1", &nonce, &agent)).expect("seal");
        assert!(matches!(
            g.on_message(&sealed, &signer, &known),
            Step::Verified { .. }
        ));
        assert!(g.is_attaching());
        assert!(g.outgoing(vec![b"held".to_vec()]).is_empty());
        // Anything from the agent before its welcome is a violation.
        let early = gate.seal(b"{}").expect("seal");
        assert!(refusal(g.on_message(&early, &signer, &known)).contains("before the welcome"));
        let held = g.attached().expect("attaching");
        assert_eq!(held, vec![b"held".to_vec()]);
        assert_eq!(g.outgoing(vec![b"x".to_vec()]).len(), 1);
        let data = gate.seal(b"stream").expect("seal");
        match g.on_message(&data, &signer, &known) {
            Step::ToLink(bytes) => assert_eq!(bytes, b"stream"),
            other => panic!("expected a frame for the link, got {other:?}"),
        }
    }

    #[test]
    fn an_agent_may_not_speak_for_another_through_its_own_handshake() {
        let a1 = Identity::generate();
        let a2 = Identity::generate();
        let signer = Identity::generate();
        let known = peers(&[("a1", Role::Agent, &a1), ("a2", Role::Agent, &a2)]);
        let (mut g, mut gate, nonce) = sealed_agent("a1", &a1, &signer, &known);
        let sealed = gate.seal(&hello("a2", &nonce, &a2)).expect("seal");
        let reason = refusal(g.on_message(&sealed, &signer, &known));
        assert_eq!(reason, HelloError::NotTheProvedAgent.to_string());
        assert!(g.peer().is_none());
    }
}
