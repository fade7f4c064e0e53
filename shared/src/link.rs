//! The receiving half of a message stream at the edge, still without I/O: bytes off the wire
//! become either journal operations for an accepted message, or a typed error and nothing.
//!
//! [`StreamReceiver::on_bytes`] decodes (with the sender's direction rules), runs the caller's
//! check (the agent verifies the server's signature here), checks that the frame belongs to
//! this stream, applies the stream core's acceptance rules (next seq only, duplicates re-acked,
//! gaps nacked, conflicting replays refused) and, for an accepted message, returns the ops that
//! journal it together with the new watermark. The caller commits them (adding the ops of the
//! message's effect to the same batch), then calls [`Inbound::mark_durable`]; only then does
//! [`StreamReceiver::poll_ack`] offer an ack. A refused frame leaves nothing to journal and
//! nothing to acknowledge.

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
    #[error("refused: {0}")]
    Refused(String),
    /// Not taken now (the receiver's journal work for this peer is at its bound): nothing was
    /// recorded; the peer sends it again when asked (a nack) or after its retransmit timeout.
    #[error("deferred: too much of this peer's journal work is queued")]
    Deferred,
}

impl LinkError {
    pub fn close_code(&self) -> crate::close::CloseCode {
        match self {
            LinkError::Decode(e) => e.close_code(),
            LinkError::Stream(_) | LinkError::Refused(_) | LinkError::Deferred => {
                crate::close::CloseCode::Refused
            }
        }
    }
}

/// What an incoming frame asks of the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A new message: commit these ops (plus its effect's), then mark `seq` durable.
    Journal {
        seq: Seq,
        frame: Frame,
        ops: Vec<Op>,
    },
    /// A duplicate or a gap: nothing to journal (poll for the re-ack or the nack).
    Nothing,
    /// Not a message of this stream (handshake, heartbeat, ack of the other stream...):
    /// the caller handles it.
    Other(Frame),
}

/// Where one received stream (events on the server, commands on the agent) is journaled.
#[derive(Debug, Clone)]
pub struct StreamReceiver {
    stream: StreamId,
    log: LogName,
    watermark_key: String,
}

impl StreamReceiver {
    /// `log` holds the messages; `watermark_key` the durable watermark, written in the same batch.
    pub fn new(stream: StreamId, log: LogName, watermark_key: String) -> Self {
        StreamReceiver {
            stream,
            log,
            watermark_key,
        }
    }

    pub fn log(&self) -> &LogName {
        &self.log
    }

    pub fn watermark_key(&self) -> &str {
        &self.watermark_key
    }

    /// Bytes arrived from the peer; `check` may refuse a decoded message of this stream
    /// before anything about it is recorded.
    pub fn on_bytes(
        &self,
        inbound: &mut Inbound,
        bytes: &[u8],
        check: impl FnOnce(&Frame) -> Result<(), LinkError>,
    ) -> Result<Received, LinkError> {
        let frame = protocol::decode(bytes, self.stream.producer())?;
        let (seq, crc) = match (&frame, self.stream) {
            (Frame::Event(e), StreamId::Events) => (e.seq, e.crc),
            (Frame::Command(c), StreamId::Commands) => (c.seq, c.crc),
            _ => return Ok(Received::Other(frame)),
        };
        check(&frame)?;
        match inbound.on_data(seq, crc)? {
            DataOutcome::Accept => Ok(Received::Journal {
                seq,
                frame,
                ops: vec![
                    Op::Append {
                        log: self.log.clone(),
                        seq,
                        payload: self.record(bytes, crc),
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

    /// What the log keeps of a message: for events (on the server), only the CRC that replay
    /// checks compare (their effects are journaled in the same batch; a 200 KB output chunk
    /// is not stored twice); commands (on the agent) whole, as signed.
    fn record(&self, bytes: &[u8], crc: u32) -> Vec<u8> {
        match self.stream {
            StreamId::Events => crc.to_be_bytes().to_vec(),
            StreamId::Commands => bytes.to_vec(),
        }
    }

    /// The ack to send now, if any.
    pub fn poll_ack(&self, inbound: &mut Inbound) -> Option<Frame> {
        inbound.poll_ack().map(|upto| {
            Frame::Ack(Ack {
                stream: self.stream,
                upto,
            })
        })
    }

    /// The nack to send now, if a gap was seen.
    pub fn poll_nack(&self, inbound: &mut Inbound) -> Option<Frame> {
        inbound.poll_nack().map(|from| {
            Frame::Nack(Nack {
                stream: self.stream,
                from,
            })
        })
    }

    /// Who sends this stream.
    pub fn sender(&self) -> Sender {
        self.stream.producer()
    }
}

/// An agent's check of a received command: signed by one of the server's trusted keys (more
/// than one during a rollover, `crate::trust`), for this agent.
/// A relay in between can neither forge a command nor move one to another agent. Frames that
/// are not commands pass.
pub fn verify_command(
    frame: &Frame,
    agent_id: &str,
    server_keys: &[crate::identity::PublicKey],
) -> Result<(), LinkError> {
    let Frame::Command(c) = frame else {
        return Ok(());
    };
    let signed = protocol::command_signing_bytes(agent_id, &c.id, c.deadline_ms, &c.body)
        .map_err(|e| LinkError::Refused(e.to_string()))?;
    if server_keys
        .iter()
        .any(|k| k.verify(&signed, &c.signature).is_ok())
    {
        Ok(())
    } else {
        Err(LinkError::Refused(format!(
            "command {} is not signed by the server",
            c.seq
        )))
    }
}

/// Read a big-endian u64 stored by [`StreamReceiver`] (watermarks) or its siblings.
pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// The journal names of one peer relationship: what we send, what we received, who the peer is.
#[derive(Debug, Clone)]
pub struct StreamKeys {
    /// Our outbound messages, retained until acknowledged.
    pub out_log: LogName,
    /// The peer's cumulative ack of our stream.
    pub out_acked: String,
    /// Inbound messages (the latest ones, for replay checks; of events, only their CRC).
    pub in_log: LogName,
    /// Our durable watermark of the peer's stream.
    pub in_watermark: String,
    /// The peer's incarnation as last seen.
    pub peer: String,
    pub inbound_stream: StreamId,
}

impl StreamKeys {
    /// The server's names for agent `agent_id` (commands out, events in).
    pub fn server_side(agent_id: &str) -> Result<Self, crate::journal::JournalError> {
        Ok(StreamKeys {
            out_log: LogName::new(format!("out/commands/{agent_id}"))?,
            out_acked: format!("out/commands/{agent_id}/acked"),
            in_log: LogName::new(format!("in/events/{agent_id}"))?,
            in_watermark: format!("in/events/{agent_id}/wm"),
            peer: format!("peer/{agent_id}"),
            inbound_stream: StreamId::Events,
        })
    }

    /// The agent's names for its server (events out, commands in).
    pub fn agent_side() -> Result<Self, crate::journal::JournalError> {
        Ok(StreamKeys {
            out_log: LogName::new("out/events")?,
            out_acked: "out/events/acked".into(),
            in_log: LogName::new("in/commands")?,
            in_watermark: "in/commands/wm".into(),
            peer: "peer/server".into(),
            inbound_stream: StreamId::Commands,
        })
    }

    pub fn receiver(&self) -> StreamReceiver {
        StreamReceiver::new(
            self.inbound_stream,
            self.in_log.clone(),
            self.in_watermark.clone(),
        )
    }

    /// Journal ops after the peer acknowledged our stream up to `upto`.
    pub fn acked_ops(&self, upto: Seq) -> Vec<Op> {
        vec![
            Op::TruncateThrough {
                log: self.out_log.clone(),
                upto,
            },
            Op::PutMeta {
                key: self.out_acked.clone(),
                value: upto.0.to_be_bytes().to_vec(),
            },
        ]
    }

    /// Journal ops that keep only the latest `keep` inbound messages once `upto` is durable.
    pub fn trim_inbound_ops(&self, upto: Seq, keep: u64) -> Vec<Op> {
        match upto.0.checked_sub(keep) {
            Some(through) if through > 0 => vec![Op::TruncateThrough {
                log: self.in_log.clone(),
                upto: Seq(through),
            }],
            _ => Vec::new(),
        }
    }

    /// Journal ops after the handshake: remember the peer; after a reset, forget both streams.
    pub fn handshake_ops<P>(
        &self,
        outcome: &crate::stream::Handshake<P>,
        peer_incarnation: &str,
    ) -> Vec<Op> {
        use crate::stream::Handshake;
        let remember = Op::PutMeta {
            key: self.peer.clone(),
            value: peer_incarnation.as_bytes().to_vec(),
        };
        match outcome {
            Handshake::Resumed => Vec::new(),
            Handshake::FirstContact => vec![
                Op::TruncateThrough {
                    log: self.in_log.clone(),
                    upto: Seq::MAX_VALID,
                },
                Op::PutMeta {
                    key: self.in_watermark.clone(),
                    value: 0u64.to_be_bytes().to_vec(),
                },
                remember,
            ],
            Handshake::PeerReset { .. } => vec![
                Op::TruncateThrough {
                    log: self.out_log.clone(),
                    upto: Seq::MAX_VALID,
                },
                Op::PutMeta {
                    key: self.out_acked.clone(),
                    value: 0u64.to_be_bytes().to_vec(),
                },
                Op::TruncateThrough {
                    log: self.in_log.clone(),
                    upto: Seq::MAX_VALID,
                },
                Op::PutMeta {
                    key: self.in_watermark.clone(),
                    value: 0u64.to_be_bytes().to_vec(),
                },
                remember,
            ],
        }
    }

    /// Journal ops after [`crate::stream::Endpoint::rejoin`] found this end behind its peer:
    /// the inbound watermark moves up to `inbound_durable` (the log of what this end lost is
    /// gone); if the outbound half was renumbered, its log restarts after `outbound_acked` (the
    /// edge appends what it enqueues again in the same batch, after these).
    pub fn rejoin_ops<P>(
        &self,
        rejoined: &crate::stream::Rejoined<P>,
        inbound_durable: Seq,
        outbound_acked: Seq,
    ) -> Vec<Op> {
        let mut ops = Vec::new();
        if rejoined.inbound_lost > 0 {
            ops.push(Op::TruncateThrough {
                log: self.in_log.clone(),
                upto: Seq::MAX_VALID,
            });
            ops.push(Op::PutMeta {
                key: self.in_watermark.clone(),
                value: inbound_durable.0.to_be_bytes().to_vec(),
            });
        }
        if rejoined.outbound_lost > 0 {
            ops.push(Op::TruncateThrough {
                log: self.out_log.clone(),
                upto: Seq::MAX_VALID,
            });
            ops.push(Op::PutMeta {
                key: self.out_acked.clone(),
                value: outbound_acked.0.to_be_bytes().to_vec(),
            });
        }
        ops
    }

    /// Rebuild both halves of the relationship from the journal (after a restart).
    pub fn recover(
        &self,
        journal: &crate::journal::JournalHandle,
        window: u64,
        max_retained: usize,
        rto_ms: u64,
        now_ms: u64,
    ) -> Result<crate::stream::Endpoint<Vec<u8>>, crate::journal::JournalError> {
        use crate::stream::{Endpoint, Outbound, Retained};
        let meta_u64 = |key: &str| -> Result<u64, crate::journal::JournalError> {
            Ok(journal
                .get_meta(key)?
                .as_deref()
                .and_then(decode_u64)
                .unwrap_or(0))
        };
        let acked = Seq(meta_u64(&self.out_acked)?);
        let retained = journal
            .read_log(&self.out_log, acked, usize::MAX)?
            .into_iter()
            .map(|r| Retained {
                seq: r.seq,
                payload: r.payload,
                enqueued_ms: now_ms,
            })
            .collect();
        let outbound = Outbound::recover(acked, retained, window, max_retained, rto_ms);
        let watermark = Seq(meta_u64(&self.in_watermark)?);
        let from = Seq(watermark.0.saturating_sub(window));
        let sender = self.inbound_stream.producer();
        let recent = journal
            .read_log(&self.in_log, from, usize::MAX)?
            .into_iter()
            .filter_map(|r| match protocol::decode(&r.payload, sender) {
                Ok(Frame::Event(e)) => Some((r.seq, e.crc)),
                Ok(Frame::Command(c)) => Some((r.seq, c.crc)),
                // A CRC alone (see `StreamReceiver::record`).
                _ => <[u8; 4]>::try_from(r.payload.as_slice())
                    .ok()
                    .map(|crc| (r.seq, u32::from_be_bytes(crc))),
            })
            .collect();
        let inbound = Inbound::recover(watermark, recent, window);
        let peer = journal
            .get_meta(&self.peer)?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        Ok(Endpoint::new(outbound, inbound, peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::protocol::{command_signing_bytes, Command, CommandBody};

    fn signed(server: &Identity, agent_id: &str, n: u64) -> Command {
        let body = CommandBody::Probe {
            n,
            data: "x".into(),
        };
        let mut c = Command::new(Seq(1), "cmd-1".into(), 99, body.clone()).unwrap();
        c.signature = server.sign(&command_signing_bytes(agent_id, "cmd-1", 99, &body).unwrap());
        c
    }

    #[test]
    fn commands_must_be_signed_by_the_server_for_this_agent() {
        let server = Identity::generate();
        let key = server.public_key();
        let good = signed(&server, "a-1", 1);
        assert_eq!(
            verify_command(&Frame::Command(good.clone()), "a-1", &[key]),
            Ok(())
        );
        // During a rollover either trusted key will do.
        let other = Identity::generate().public_key();
        assert_eq!(
            verify_command(&Frame::Command(good.clone()), "a-1", &[other, key]),
            Ok(())
        );
        assert!(verify_command(&Frame::Command(good.clone()), "a-1", &[other]).is_err());
        // Meant for another agent (a relay replaying it elsewhere).
        assert!(verify_command(&Frame::Command(good.clone()), "a-2", &[key]).is_err());
        // Altered on the way (body, deadline, id).
        let mut altered = good.clone();
        altered.body = CommandBody::Probe {
            n: 2,
            data: "x".into(),
        };
        assert!(verify_command(&Frame::Command(altered), "a-1", &[key]).is_err());
        let mut later = good.clone();
        later.deadline_ms += 1;
        assert!(verify_command(&Frame::Command(later), "a-1", &[key]).is_err());
        // Signed by someone else, or not at all.
        let forged = signed(&Identity::generate(), "a-1", 1);
        assert!(verify_command(&Frame::Command(forged), "a-1", &[key]).is_err());
        let mut unsigned = good;
        unsigned.signature.clear();
        assert!(verify_command(&Frame::Command(unsigned), "a-1", &[key]).is_err());
    }

    #[actix::test]
    #[allow(clippy::unwrap_used)]
    async fn events_are_kept_as_their_crc_and_still_checked_after_a_restart() {
        use crate::journal::{Journal, JournalOptions};
        use crate::protocol::{Event, EventBody};
        use actix::Actor;
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), &JournalOptions::default()).unwrap();
        let handle = journal.handle();
        let _writer = journal.start();
        let keys = StreamKeys::server_side("a-1").unwrap();
        let receiver = keys.receiver();
        let event = |data: &str| {
            let body = EventBody::Probe {
                n: 1,
                data: data.into(),
            };
            Frame::Event(Event::new(Seq(1), body).unwrap())
                .encode()
                .unwrap()
        };
        let big = "x".repeat(100_000);
        let mut inbound = Inbound::new(16);
        let Received::Journal { ops, .. } = receiver
            .on_bytes(&mut inbound, &event(&big), |_| Ok(()))
            .unwrap()
        else {
            panic!("not journaled");
        };
        match &ops[0] {
            Op::Append { payload, .. } => assert_eq!(payload.len(), 4, "only the CRC"),
            other => panic!("{other:?}"),
        }
        handle.commit(ops).await.unwrap();
        let mut ep = keys.recover(&handle, 16, 16, 1000, 0).unwrap();
        // The same seq with other content is a replay mismatch, even after the restart.
        assert!(receiver
            .on_bytes(&mut ep.inbound, &event("other"), |_| Ok(()))
            .is_err());
        assert!(matches!(
            receiver.on_bytes(&mut ep.inbound, &event(&big), |_| Ok(())),
            Ok(Received::Nothing)
        ));
    }
}
