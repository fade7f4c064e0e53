//! What every WebSocket session does with a message its peer sent (sans-IO): the server's agent
//! and relay sessions and a relay's downstream and child-relay sessions all follow this one rule,
//! each acting on the [`Inbound`] it gets.

use actix_http::ws::{Message, ProtocolError};

use crate::close::CloseCode;
use crate::frame_guard::close_code_for;
use crate::protocol::ErrorCode;

/// One inbound WebSocket message, as a session acts on it.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// A whole message (binary, or text taken as its bytes).
    Bytes(&'a [u8]),
    /// Answer with a pong carrying this payload (the peer is alive).
    Ping(&'a [u8]),
    /// The peer is alive.
    Pong,
    /// The peer closed the socket.
    Closed,
    /// Close the socket: a kind of message not accepted, or one that could not be read.
    Refuse {
        code: CloseCode,
        error: ErrorCode,
        reason: String,
    },
    /// Nothing to do.
    Nothing,
}

/// What a session does with `msg`.
pub fn inbound(msg: &Result<Message, ProtocolError>) -> Inbound<'_> {
    match msg {
        Ok(Message::Binary(bytes)) => Inbound::Bytes(bytes),
        Ok(Message::Text(text)) => Inbound::Bytes(text.as_bytes()),
        Ok(Message::Ping(payload)) => Inbound::Ping(payload),
        Ok(Message::Pong(_)) => Inbound::Pong,
        Ok(Message::Close(_)) => Inbound::Closed,
        Ok(Message::Continuation(_)) => Inbound::Refuse {
            code: CloseCode::Unsupported,
            error: ErrorCode::ProtocolViolation,
            reason: "fragmented messages are not accepted".into(),
        },
        Ok(Message::Nop) => Inbound::Nothing,
        Err(e) => Inbound::Refuse {
            code: close_code_for(e),
            error: ErrorCode::Malformed,
            reason: format!("websocket protocol error: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_http::ws::Item;
    use actix_web::web::Bytes;

    #[test]
    fn fragments_and_unreadable_frames_are_refused_with_their_close_codes() {
        let fragment = Ok(Message::Continuation(Item::FirstBinary(
            Bytes::from_static(b"x"),
        )));
        assert!(matches!(
            inbound(&fragment),
            Inbound::Refuse {
                code: CloseCode::Unsupported,
                error: ErrorCode::ProtocolViolation,
                ..
            }
        ));
        let too_big = Err(ProtocolError::Overflow);
        assert!(matches!(
            inbound(&too_big),
            Inbound::Refuse {
                code: CloseCode::TooBig,
                error: ErrorCode::Malformed,
                ..
            }
        ));
        let text = Ok(Message::Text("hi".into()));
        assert_eq!(inbound(&text), Inbound::Bytes(b"hi"));
        assert_eq!(inbound(&Ok(Message::Nop)), Inbound::Nothing);
    }
}
