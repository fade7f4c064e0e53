//! Handshakes and refusals of agents and relays by reason, since the server started, for
//! `/metrics`. Reasons are a fixed set of words (the refusal's kind, never its text), so a
//! peer cannot add a series.

use tether_shared::metrics::CounterVec;
use tether_shared::mux::ChannelKind;
use tether_shared::protocol::ErrorCode;

/// Who was refused or verified.
#[derive(Debug, Clone, Copy)]
pub enum PeerKind {
    Agent,
    Relay,
}

impl PeerKind {
    fn as_str(self) -> &'static str {
        match self {
            PeerKind::Agent => "agent",
            PeerKind::Relay => "relay",
        }
    }
}

impl From<ChannelKind> for PeerKind {
    fn from(kind: ChannelKind) -> Self {
        match kind {
            ChannelKind::Agent => PeerKind::Agent,
            ChannelKind::Relay => PeerKind::Relay,
        }
    }
}

/// The word for a refusal that has no finer reason than its error code.
pub fn error_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Malformed => "malformed",
        ErrorCode::UnsupportedVersion => "unsupported_version",
        ErrorCode::Unauthorized => "unauthorized",
        ErrorCode::ProtocolViolation => "protocol_violation",
        ErrorCode::Overloaded => "overloaded",
        ErrorCode::Internal => "internal",
    }
}

#[derive(Debug, Default)]
pub struct HandshakeCounts {
    outcomes: CounterVec,
    refusals: CounterVec,
}

impl HandshakeCounts {
    /// A peer's `Hello` checked out.
    pub fn verified(&self, peer: PeerKind) {
        self.outcomes.inc(&[peer.as_str(), "verified"]);
    }

    /// A peer was told to come back later (too many handshakes at once).
    pub fn shed(&self, peer: PeerKind) {
        self.outcomes.inc(&[peer.as_str(), "busy"]);
    }

    /// A peer was refused (`why`: a word of the fixed set, see [`error_label`]).
    pub fn refused(&self, peer: PeerKind, why: &'static str) {
        self.refusals.inc(&[peer.as_str(), why]);
    }

    pub fn render(&self, out: &mut String) {
        self.outcomes.write(
            out,
            "tether_handshakes_total",
            "Handshakes of agents and relays since start: verified, or shed as busy.",
            &["peer", "outcome"],
            &[
                &["agent", "verified"],
                &["agent", "busy"],
                &["relay", "verified"],
                &["relay", "busy"],
            ],
        );
        self.refusals.write(
            out,
            "tether_refusals_total",
            "Agents and relays refused since start (at the handshake or later), by reason.",
            &["peer", "reason"],
            &[],
        );
    }
}
