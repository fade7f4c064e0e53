//! `FrameGuard`: refuses a WebSocket frame by its *header*, before its payload is buffered.
//!
//! actix's WebSocket decoder only checks a frame's size once the whole frame has arrived, and
//! buffers everything until then, so a peer declaring a 2^62-byte frame (or streaming a
//! gigabyte) could fill the server's memory before any limit applied. This adapter sits on the
//! raw request payload, follows the frame boundaries (headers only; payload bytes are skipped
//! by count, not copied), and ends the stream with `PayloadError::Overflow` as soon as a header
//! declares more than the limit. The session turns that into a 1009 close.

use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use futures_util::Stream;

use crate::close::CloseCode;

/// The WebSocket close code for an incoming frame that could not be read, from the error's
/// text: 1009 for a frame over the size limit (this guard's refusal, or the codec's overflow),
/// 1007 for a text frame that is not UTF-8, 1002 for anything else.
pub fn close_code_for(error: &dyn std::fmt::Display) -> CloseCode {
    let text = error.to_string();
    if text.contains("size limit") {
        CloseCode::TooBig
    } else if text.to_ascii_lowercase().contains("utf-8") {
        CloseCode::InvalidData
    } else {
        CloseCode::ProtocolError
    }
}

/// Where the tracker is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a frame header: `have` of its bytes seen so far.
    Header { have: usize },
    /// Skipping `remaining` payload bytes of the current frame.
    Payload { remaining: u64 },
}

/// Follows WebSocket frame headers in a client-to-server byte stream (sans-IO).
#[derive(Debug, Clone)]
pub struct FrameTracker {
    state: State,
    header: [u8; 14],
    max_payload: u64,
}

impl FrameTracker {
    pub fn new(max_payload: u64) -> Self {
        FrameTracker {
            state: State::Header { have: 0 },
            header: [0; 14],
            max_payload,
        }
    }

    /// Bytes of the extended length field, once the first two header bytes are known.
    fn ext_len(&self) -> usize {
        match self.header[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        }
    }

    /// Header length once its first two bytes are known.
    fn header_len(&self) -> usize {
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + self.ext_len() + mask
    }

    fn payload_len(&self) -> u64 {
        match self.header[1] & 0x7F {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        }
    }

    /// Feed the next bytes; `Err(declared)` as soon as a frame declares more than the limit.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), u64> {
        while !bytes.is_empty() {
            match self.state {
                State::Payload { remaining } => {
                    let take = remaining.min(bytes.len() as u64);
                    bytes = &bytes[take as usize..];
                    let left = remaining - take;
                    self.state = if left == 0 {
                        State::Header { have: 0 }
                    } else {
                        State::Payload { remaining: left }
                    };
                }
                State::Header { have } => {
                    let need = if have < 2 { 2 } else { self.header_len() };
                    let take = (need - have).min(bytes.len());
                    self.header[have..have + take].copy_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    let have = have + take;
                    // Refuse as soon as the length field is complete, before the mask key.
                    if have >= 2
                        && have >= 2 + self.ext_len()
                        && self.payload_len() > self.max_payload
                    {
                        return Err(self.payload_len());
                    }
                    if have < 2 || have < self.header_len() {
                        self.state = State::Header { have };
                        continue;
                    }
                    let len = self.payload_len();
                    self.state = if len == 0 {
                        State::Header { have: 0 }
                    } else {
                        State::Payload { remaining: len }
                    };
                }
            }
        }
        Ok(())
    }
}

/// The payload stream with a [`FrameTracker`] in front.
pub struct FrameGuard<S> {
    inner: S,
    tracker: FrameTracker,
    failed: bool,
}

impl<S> FrameGuard<S> {
    pub fn new(inner: S, max_payload: u64) -> Self {
        FrameGuard {
            inner,
            tracker: FrameTracker::new(max_payload),
            failed: false,
        }
    }
}

impl<S> Stream for FrameGuard<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => match self.tracker.feed(&chunk) {
                Ok(()) => Poll::Ready(Some(Ok(chunk))),
                Err(declared) => {
                    self.failed = true;
                    tracing::warn!(declared, "frame-header-over-limit");
                    Poll::Ready(Some(Err(PayloadError::Overflow)))
                }
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_follow_the_read_error() {
        let overflow = "Payload length is invalid or exceeds the size limit";
        assert_eq!(close_code_for(&overflow), CloseCode::TooBig);
        assert_eq!(
            close_code_for(&"frame header declares 2^62 bytes: reached size limit"),
            CloseCode::TooBig
        );
        assert_eq!(
            close_code_for(&"invalid UTF-8 in a text frame"),
            CloseCode::InvalidData
        );
        assert_eq!(
            close_code_for(&"Received an unmasked frame from client"),
            CloseCode::ProtocolError
        );
    }

    fn frame(len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x82];
        let m = if masked { 0x80 } else { 0 };
        match len {
            0..=125 => f.push(m | len as u8),
            126..=65535 => {
                f.push(m | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(m | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(0u8, len));
        f
    }

    #[test]
    fn follows_frames_of_every_length_form_in_any_chunking() {
        let mut all = Vec::new();
        for len in [0, 5, 125, 126, 300, 65535, 70_000] {
            all.extend(frame(len, true));
        }
        for chunk in [1, 3, 7, 1000, all.len()] {
            let mut t = FrameTracker::new(100_000);
            for c in all.chunks(chunk) {
                assert_eq!(t.feed(c), Ok(()), "chunk {chunk}");
            }
            assert_eq!(
                t.state,
                State::Header { have: 0 },
                "ends on a boundary (chunk {chunk})"
            );
        }
    }

    #[test]
    fn refuses_by_the_header_alone() {
        let mut t = FrameTracker::new(1000);
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 62).to_be_bytes());
        assert_eq!(t.feed(&header), Err(1 << 62));
        let mut t = FrameTracker::new(1000);
        assert_eq!(t.feed(&frame(1000, true)), Ok(()));
        assert_eq!(t.feed(&frame(1001, true)[..4]), Err(1001));
    }
}
