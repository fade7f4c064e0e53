//! The receiving half of a message stream at the edge, still without I/O: bytes off the wire
//! become either journal operations for an accepted message, or a typed error and nothing.
//!
//! [`StreamReceiver::on_bytes`] decodes (with the sender's direction rules), checks that the
//! frame belongs to this stream, runs the stream core's acceptance rules (next seq only,
//! duplicates re-acked, gaps nacked, conflicting replays refused) and, for an accepted message,
//! returns the ops that journal it together with the new watermark. The caller commits them,
//! then calls [`StreamReceiver::journaled`]; only then does [`StreamReceiver::poll_ack`] offer an
//! ack. A refused frame leaves nothing to journal and nothing to acknowledge.

use crate::journal::{LogName, Op};
use crate::protocol::{self, Ack, DecodeError, Frame, Nack, Sender, Seq, StreamId};
use crate::stream::{DataOutcome, Inbound, StreamError};

/// Why an incoming frame was refused. The connection is closed with [`LinkError::close_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Stream(#[from] StreamError),
}

impl LinkError {
    pub fn close_code(&self) -> u16 {
        match self {
            LinkError::Decode(e) => e.close_code(),
            LinkError::Stream(_) => 1008,
        }
    }
}

/// What an incoming frame asks of the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A new message: commit these ops, then call [`StreamReceiver::journaled`] with `seq`.
    Journal { seq: Seq, ops: Vec<Op> },
    /// A duplicate or a gap: nothing to journal (poll for the re-ack or the nack).
    Nothing,
    /// Not a message of this stream (handshake, heartbeat, ack of the other stream...):
    /// the caller handles it.
    Other(Frame),
}

/// Receives one stream (events on the server, commands on the agent) from one peer.
#[derive(Debug, Clone)]
pub struct StreamReceiver {
    stream: StreamId,
    log: LogName,
    watermark_key: String,
    inbound: Inbound,
}

impl StreamReceiver {
    /// `log` holds the messages; `watermark_key` the durable watermark, written in the same batch.
    pub fn new(stream: StreamId, log: LogName, watermark_key: String, inbound: Inbound) -> Self {
        StreamReceiver {
            stream,
            log,
            watermark_key,
            inbound,
        }
    }

    fn sender(&self) -> Sender {
        self.stream.producer()
    }

    /// Bytes arrived from the peer.
    pub fn on_bytes(&mut self, bytes: &[u8]) -> Result<Received, LinkError> {
        let frame = protocol::decode(bytes, self.sender())?;
        let (seq, crc) = match (&frame, self.stream) {
            (Frame::Event(e), StreamId::Events) => (e.seq, e.crc),
            (Frame::Command(c), StreamId::Commands) => (c.seq, c.crc),
            _ => return Ok(Received::Other(frame)),
        };
        match self.inbound.on_data(seq, crc)? {
            DataOutcome::Accept => Ok(Received::Journal {
                seq,
                ops: vec![
                    Op::Append {
                        log: self.log.clone(),
                        seq,
                        payload: bytes.to_vec(),
                    },
                    Op::PutMeta {
                        key: self.watermark_key.clone(),
                        value: seq.0.to_be_bytes().to_vec(),
                    },
                ],
            }),
            DataOutcome::Duplicate | DataOutcome::Gap { .. } => Ok(Received::Nothing),
        }
    }

    /// The ops of the message `seq` (and all before it) are durable.
    pub fn journaled(&mut self, seq: Seq) {
        self.inbound.mark_durable(seq);
    }

    /// The ack to send now, if any.
    pub fn poll_ack(&mut self) -> Option<Frame> {
        self.inbound.poll_ack().map(|upto| {
            Frame::Ack(Ack {
                stream: self.stream,
                upto,
            })
        })
    }

    /// The nack to send now, if a gap was seen.
    pub fn poll_nack(&mut self) -> Option<Frame> {
        self.inbound.poll_nack().map(|from| {
            Frame::Nack(Nack {
                stream: self.stream,
                from,
            })
        })
    }

    pub fn inbound(&self) -> &Inbound {
        &self.inbound
    }
}
