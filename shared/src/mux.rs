//! The relay link's framing: many agents' connections over one WebSocket.
//!
//! A relay connects to its parent (the server or another relay) at [`RELAY_WS_PATH`] and first
//! authenticates itself with the ordinary v1 handshake (`Challenge`, `Hello` signed by the
//! relay's key, `Welcome`). From then on every WebSocket message on the link is a mux frame:
//!
//! ```text
//! byte 0      kind: 1 = Open, 2 = Data, 3 = Close
//! bytes 1..5  channel id, big-endian u32 (0 is the link's own peer: the relay itself)
//! bytes 5..   Open:  JSON {"kind":"agent"|"relay","path":[relay ids, nearest the peer first],"peer":"ip:port"}
//!             Data:  one v1 frame, untouched (the relay never rewrites what an agent or the
//!                    server signed; on an agent's channel it is sealed end to end, see
//!                    [`crate::e2e`], so the relay cannot read it either)
//!             Close: u16 close code (big-endian), then a UTF-8 reason
//! ```
//!
//! A relay opens a channel for each downstream connection (an agent, or a child relay still
//! authenticating), and the two ends forward each channel's frames verbatim. The server runs the
//! handshake of every channel itself, so an agent is authenticated end to end by its own key
//! through any number of relays. Channel ids are chosen by the relay that opens them and never
//! reused on one link. Decoding is total: any bytes give a frame or a [`MuxError`].

use crate::close::CloseCode;
use serde::{Deserialize, Serialize};

use crate::e2e::MAX_SEALED_BYTES;

/// Where relays connect (on the server's agent-facing listener and on a relay's downstream one).
pub const RELAY_WS_PATH: &str = "/relay/v1/ws";
/// The channel of the link's own peer (the relay's own heartbeats).
pub const LINK_CHANNEL: u32 = 0;
/// Header bytes before a mux frame's payload.
pub const HEADER_BYTES: usize = 5;
/// Largest mux frame: a full-size v1 frame, sealed end to end, plus the header.
pub const MAX_MUX_BYTES: usize = MAX_SEALED_BYTES + HEADER_BYTES;
/// Most relays between an agent and the server.
pub const MAX_PATH: usize = 8;
/// Longest `Open` payload (a path of [`MAX_PATH`] ids and an address fit easily).
const MAX_OPEN_BYTES: usize = 4096;

const OPEN: u8 = 1;
const DATA: u8 = 2;
const CLOSE: u8 = 3;

/// What a channel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    /// An agent's session.
    Agent,
    /// A child relay's own handshake and heartbeats.
    Relay,
}

/// A new downstream connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Open {
    pub kind: ChannelKind,
    /// Relay ids the connection came through, nearest the peer first; the last one is the relay
    /// that sent this `Open`.
    pub path: Vec<String>,
    /// The peer's address as the first relay saw it (for logs).
    #[serde(default)]
    pub peer: String,
}

/// One mux frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mux {
    Open {
        ch: u32,
        open: Open,
    },
    Data {
        ch: u32,
        frame: Vec<u8>,
    },
    Close {
        ch: u32,
        code: CloseCode,
        reason: String,
    },
}

/// Why bytes are not a mux frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    #[error("mux frame of {0} bytes is shorter than its 5-byte header")]
    Short(usize),
    #[error("mux frame of {0} bytes exceeds the limit of {MAX_MUX_BYTES}")]
    TooLarge(usize),
    #[error("unknown mux frame kind {0}")]
    UnknownKind(u8),
    #[error("channel 0 is the link itself and cannot be opened or closed")]
    LinkChannel,
    #[error("bad open: {0}")]
    BadOpen(String),
    #[error("bad close: {0}")]
    BadClose(&'static str),
}

impl Mux {
    /// The channel this frame is about.
    pub fn ch(&self) -> u32 {
        match self {
            Mux::Open { ch, .. } | Mux::Data { ch, .. } | Mux::Close { ch, .. } => *ch,
        }
    }

    /// The frame's bytes on the link.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Mux::Open { ch, open } => {
                // Serializing a struct of strings cannot fail.
                let body = serde_json::to_vec(open).unwrap_or_default();
                with_header(OPEN, *ch, &body)
            }
            Mux::Data { ch, frame } => data(*ch, frame),
            Mux::Close { ch, code, reason } => {
                let reason = truncate(reason, 120);
                let mut out = Vec::with_capacity(HEADER_BYTES + 2 + reason.len());
                out.push(CLOSE);
                out.extend_from_slice(&ch.to_be_bytes());
                out.extend_from_slice(&code.as_u16().to_be_bytes());
                out.extend_from_slice(reason.as_bytes());
                out
            }
        }
    }

    /// Parses one mux frame.
    pub fn decode(bytes: &[u8]) -> Result<Mux, MuxError> {
        if bytes.len() > MAX_MUX_BYTES {
            return Err(MuxError::TooLarge(bytes.len()));
        }
        if bytes.len() < HEADER_BYTES {
            return Err(MuxError::Short(bytes.len()));
        }
        let ch = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let body = &bytes[HEADER_BYTES..];
        match bytes[0] {
            DATA => Ok(Mux::Data {
                ch,
                frame: body.to_vec(),
            }),
            OPEN => {
                if ch == LINK_CHANNEL {
                    return Err(MuxError::LinkChannel);
                }
                if body.len() > MAX_OPEN_BYTES {
                    return Err(MuxError::BadOpen(format!(
                        "{} bytes (at most {MAX_OPEN_BYTES})",
                        body.len()
                    )));
                }
                let open: Open =
                    serde_json::from_slice(body).map_err(|e| MuxError::BadOpen(e.to_string()))?;
                if open.path.is_empty() || open.path.len() > MAX_PATH {
                    return Err(MuxError::BadOpen(format!(
                        "path must name 1 to {MAX_PATH} relays, got {}",
                        open.path.len()
                    )));
                }
                Ok(Mux::Open { ch, open })
            }
            CLOSE => {
                if ch == LINK_CHANNEL {
                    return Err(MuxError::LinkChannel);
                }
                if body.len() < 2 {
                    return Err(MuxError::BadClose("missing close code"));
                }
                let code = CloseCode::from_u16(u16::from_be_bytes([body[0], body[1]]));
                let reason = std::str::from_utf8(&body[2..])
                    .map_err(|_| MuxError::BadClose("reason is not UTF-8"))?
                    .to_owned();
                Ok(Mux::Close { ch, code, reason })
            }
            other => Err(MuxError::UnknownKind(other)),
        }
    }
}

/// A Data frame for `ch` around `frame`, without building a [`Mux`] first (the hot path).
pub fn data(ch: u32, frame: &[u8]) -> Vec<u8> {
    with_header(DATA, ch, frame)
}

fn with_header(kind: u8, ch: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.push(kind);
    out.extend_from_slice(&ch.to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let frames = [
            Mux::Open {
                ch: 7,
                open: Open {
                    kind: ChannelKind::Agent,
                    path: vec!["r-b".into(), "r-a".into()],
                    peer: "10.0.0.2:4000".into(),
                },
            },
            Mux::Data {
                ch: 0,
                frame: br#"{"v":1}"#.to_vec(),
            },
            Mux::Data {
                ch: u32::MAX,
                frame: Vec::new(),
            },
            Mux::Close {
                ch: 9,
                code: CloseCode::Replaced,
                reason: "replaced".into(),
            },
        ];
        for f in frames {
            assert_eq!(Mux::decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn refuses_bad_frames() {
        assert_eq!(Mux::decode(&[2, 0, 0]), Err(MuxError::Short(3)));
        assert_eq!(Mux::decode(&[9, 0, 0, 0, 1]), Err(MuxError::UnknownKind(9)));
        assert_eq!(
            Mux::decode(&[3, 0, 0, 0, 0, 3, 232]),
            Err(MuxError::LinkChannel)
        );
        assert!(matches!(
            Mux::decode(&[1, 0, 0, 0, 1, b'{']),
            Err(MuxError::BadOpen(_))
        ));
        let no_path = with_header(OPEN, 1, br#"{"kind":"agent","path":[]}"#);
        assert!(matches!(Mux::decode(&no_path), Err(MuxError::BadOpen(_))));
        assert!(matches!(
            Mux::decode(&[3, 0, 0, 0, 1, 3]),
            Err(MuxError::BadClose(_))
        ));
        assert!(matches!(
            Mux::decode(&[3, 0, 0, 0, 1, 3, 232, 0xff]),
            Err(MuxError::BadClose(_))
        ));
        let huge = vec![DATA; MAX_MUX_BYTES + 1];
        assert!(matches!(Mux::decode(&huge), Err(MuxError::TooLarge(_))));
    }

    #[test]
    fn close_reason_is_truncated_on_a_char_boundary() {
        let reason = "é".repeat(100);
        let bytes = Mux::Close {
            ch: 1,
            code: CloseCode::Normal,
            reason,
        }
        .encode();
        let Mux::Close { reason, .. } = Mux::decode(&bytes).unwrap() else {
            panic!("not a close");
        };
        assert_eq!(reason.len(), 120);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_or_error(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = Mux::decode(&bytes);
        }
    }
}
