//! How a WebSocket (or a relay's channel) is closed: the close codes Tether uses, named by
//! what they mean (RFC 6455 §7.4 and one private code), and the close frame's reason cut to
//! what a close frame holds. Every session and the relay close through these.

/// A close code, by meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: done.
    Normal,
    /// 1001: the peer is going away (stopping, or silent past its heartbeat timeout).
    GoingAway,
    /// 1002: the WebSocket framing was broken.
    ProtocolError,
    /// 1003: a kind of message that is not accepted (fragmented, text).
    Unsupported,
    /// 1007: a text frame that is not UTF-8.
    InvalidData,
    /// 1008: refused: not authenticated, or against the protocol.
    Refused,
    /// 1009: a message over the size limit.
    TooBig,
    /// 1011: the server failed (its journal); the peer should come back.
    Internal,
    /// 1012: restarting (a relay lost its upstream); come back.
    Restart,
    /// 1013: busy (a reconnect storm, a full queue); retry after a delay.
    Busy,
    /// 4000: a newer session of the same peer replaced this one.
    Replaced,
    /// Any other code, as a peer sent it (a relay passes it on).
    Other(u16),
}

/// Characters of a close reason at most (a close frame holds 123 bytes).
pub const MAX_REASON_CHARS: usize = 100;

impl CloseCode {
    /// The number on the wire.
    pub const fn as_u16(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::Unsupported => 1003,
            CloseCode::InvalidData => 1007,
            CloseCode::Refused => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::Internal => 1011,
            CloseCode::Restart => 1012,
            CloseCode::Busy => 1013,
            CloseCode::Replaced => 4000,
            CloseCode::Other(n) => n,
        }
    }

    /// The code a peer sent, by meaning where it has one.
    pub const fn from_u16(n: u16) -> CloseCode {
        match n {
            1000 => CloseCode::Normal,
            1001 => CloseCode::GoingAway,
            1002 => CloseCode::ProtocolError,
            1003 => CloseCode::Unsupported,
            1007 => CloseCode::InvalidData,
            1008 => CloseCode::Refused,
            1009 => CloseCode::TooBig,
            1011 => CloseCode::Internal,
            1012 => CloseCode::Restart,
            1013 => CloseCode::Busy,
            4000 => CloseCode::Replaced,
            n => CloseCode::Other(n),
        }
    }

    /// A WebSocket close frame with this code and `reason` (cut, see [`reason`]).
    pub fn frame(self, text: &str) -> awc::ws::CloseReason {
        awc::ws::CloseReason {
            code: awc::ws::CloseCode::from(self.as_u16()),
            description: Some(reason(text)),
        }
    }
}

impl From<CloseCode> for awc::ws::CloseCode {
    fn from(code: CloseCode) -> Self {
        awc::ws::CloseCode::from(code.as_u16())
    }
}

impl std::fmt::Display for CloseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

/// What a peer that is shed hears before the `Busy` close: retry after a delay drawn from
/// `[500 ms, 500 ms + spread_ms)`, so that a reconnect storm spreads out.
pub fn busy(spread_ms: u64) -> crate::protocol::Frame {
    crate::protocol::Frame::Busy(crate::protocol::Busy {
        retry_after_ms: 500 + rand::random::<u64>() % spread_ms.max(1),
    })
}

impl crate::protocol::DecodeError {
    /// The WebSocket close code (RFC 6455) to close the connection with (here, beside every
    /// other close code, so that the protocol module does not depend on this one).
    pub fn close_code(&self) -> CloseCode {
        use crate::protocol::DecodeError;
        match self {
            DecodeError::TooLarge { .. } => CloseCode::TooBig,
            DecodeError::WrongDirection { .. } => CloseCode::Refused,
            _ => CloseCode::ProtocolError,
        }
    }
}

/// The usual spread of [`busy`]'s delay: 4.5 s.
pub const BUSY_SPREAD_MS: u64 = 4_500;

/// `text` cut to [`MAX_REASON_CHARS`] characters (never inside one).
pub fn reason(text: &str) -> String {
    text.chars().take(MAX_REASON_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_reasons_fit_a_close_frame() {
        assert_eq!(CloseCode::Refused.as_u16(), 1008);
        for n in [1000, 1008, 1013, 4000, 4999, 0] {
            assert_eq!(CloseCode::from_u16(n).as_u16(), n);
        }
        assert_eq!(CloseCode::from_u16(4321), CloseCode::Other(4321));
        assert_eq!(CloseCode::Busy.to_string(), "1013");
        let long = "é".repeat(300);
        let cut = reason(&long);
        assert_eq!(cut.chars().count(), MAX_REASON_CHARS);
        assert!(cut.len() <= 2 * MAX_REASON_CHARS);
        let frame = CloseCode::Replaced.frame("replaced");
        assert_eq!(u16::from(frame.code), 4000);
    }
}
