//! The sans-IO stream core: reliable, ordered, exactly-once delivery of one message stream over
//! connections that come and go, between two ends that may crash.
//!
//! No sockets, no actix, no clock: the edge feeds inputs (a message to send, a frame received, a
//! journal flush done, a timer tick with the time, a reconnect) and carries out the outputs
//! (messages and acks to transmit, records to journal).
//!
//! - [`Outbound`] is the producer's half: it numbers messages, retains them until the peer acks
//!   them cumulatively, transmits only what its journal already holds (so a crash can never
//!   reuse a number the peer has seen), bounds what is in flight, rewinds on a nack, a
//!   retransmit timeout or a reconnect from the peer's watermark, and ignores acks from an old
//!   connection or for messages it never sent.
//! - [`Inbound`] is the consumer's half: it accepts exactly the next sequence number, refuses
//!   gaps with a nack, re-acks duplicates without handing them on again (and refuses a replayed
//!   number whose payload differs), and acks only what its journal has flushed.
//! - [`Endpoint`] joins the two halves of one peer relationship with the incarnations of both
//!   ends, so a peer that lost its state is detected at the handshake.

use std::collections::VecDeque;

use crate::protocol::Seq;

/// Identifies one connection of an [`Endpoint`]; frames of an older connection are stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// Violations of the stream protocol by the peer (or by a journal that lost data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("sequence numbers exhausted")]
    SeqExhausted,
    #[error("{in_flight} messages retained, the limit is {limit}: the peer is not acknowledging")]
    Backlog { in_flight: usize, limit: usize },
    #[error("peer claims to hold up to seq {claimed}, but only {assigned} were ever sent")]
    PeerAhead { claimed: Seq, assigned: Seq },
    #[error("peer holds up to seq {claimed}, but already acknowledged {acked}: it lost acknowledged messages")]
    PeerRegressed { claimed: Seq, acked: Seq },
    #[error(
        "seq {seq} arrived while expecting {expected}: more than the window of {window} ahead"
    )]
    TooFarAhead {
        seq: Seq,
        expected: Seq,
        window: u64,
    },
    #[error("seq {seq} replayed with a different payload (crc {got:#010x}, held {held:#010x})")]
    ReplayMismatch { seq: Seq, held: u32, got: u32 },
    #[error("seq {seq} is not a valid message sequence number")]
    BadSeq { seq: Seq },
}

/// A message the producer still holds, because the peer has not acknowledged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained<P> {
    pub seq: Seq,
    pub payload: P,
    /// When it was enqueued (edge-supplied ms), for "age of the oldest unacked" in metrics.
    pub enqueued_ms: u64,
}

/// What an incoming ack did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The peer now holds everything up to this: drop it from the journal.
    Advanced(Seq),
    /// Nothing new (already acknowledged).
    Duplicate,
    /// From a connection that is no longer current: ignored and counted.
    Stale,
    /// For a message never transmitted on this connection: ignored and counted.
    Bogus,
}

/// Counters an edge exports as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboundStats {
    pub stale_acks: u64,
    pub bogus_acks: u64,
    pub retransmits: u64,
    pub nacks: u64,
}

/// The producer's half of a stream.
#[derive(Debug, Clone)]
pub struct Outbound<P> {
    /// Highest sequence number handed out.
    assigned: Seq,
    /// Highest sequence number the local journal holds (only those may go on the wire).
    durable: Seq,
    /// Highest sequence number the peer acknowledged (cumulatively).
    acked: Seq,
    /// Transmit cursor: the next message to put on the wire is the one after this.
    sent: Seq,
    /// Highest sequence number ever transmitted on the current connection (a rewind of the
    /// cursor does not lower it, so acks for messages already out stay valid).
    sent_max: Seq,
    /// `acked+1 ..= assigned`, in order.
    retained: VecDeque<Retained<P>>,
    conn: Option<ConnId>,
    /// At most this many messages beyond `acked` are on the wire at once.
    window: u64,
    /// At most this many messages are retained before `enqueue` pushes back.
    max_retained: usize,
    /// Without ack progress for this long, resend everything unacknowledged.
    rto_ms: u64,
    last_progress_ms: u64,
    stats: OutboundStats,
}

impl<P: Clone> Outbound<P> {
    /// A stream that has never sent anything.
    pub fn new(window: u64, max_retained: usize, rto_ms: u64) -> Self {
        Self::recover(Seq::ZERO, Vec::new(), window, max_retained, rto_ms)
    }

    /// Rebuild from the journal after a restart: `acked` is the last acknowledged watermark,
    /// `retained` the messages still held (all durable, in any order).
    pub fn recover(
        acked: Seq,
        mut retained: Vec<Retained<P>>,
        window: u64,
        max_retained: usize,
        rto_ms: u64,
    ) -> Self {
        retained.sort_by_key(|r| r.seq);
        retained.retain(|r| r.seq > acked);
        let assigned = retained.last().map_or(acked, |r| r.seq);
        Outbound {
            assigned,
            durable: assigned,
            acked,
            sent: acked,
            sent_max: acked,
            retained: retained.into(),
            conn: None,
            window: window.max(1),
            max_retained: max_retained.max(1),
            rto_ms,
            last_progress_ms: 0,
            stats: OutboundStats::default(),
        }
    }

    /// Number a new message. It is retained but not sent until [`Outbound::mark_durable`]
    /// covers it: the caller journals `(seq, payload)` first.
    pub fn enqueue(&mut self, payload: P, now_ms: u64) -> Result<Seq, StreamError> {
        if self.retained.len() >= self.max_retained {
            return Err(StreamError::Backlog {
                in_flight: self.retained.len(),
                limit: self.max_retained,
            });
        }
        let seq = self.assigned.next().ok_or(StreamError::SeqExhausted)?;
        self.assigned = seq;
        self.retained.push_back(Retained {
            seq,
            payload,
            enqueued_ms: now_ms,
        });
        Ok(seq)
    }

    /// Takes `payload`, numbered `seq` and made durable by another writer of this stream's
    /// journal (the active node of a cluster, for an agent a member serves): only the message
    /// right after the last one held, once every one before it is durable, while it fits.
    /// Returns whether it was taken.
    pub fn adopt(&mut self, seq: Seq, payload: P, now_ms: u64) -> bool {
        if self.assigned.next() != Some(seq)
            || self.durable != self.assigned
            || self.retained.len() >= self.max_retained
        {
            return false;
        }
        self.assigned = seq;
        self.durable = seq;
        self.retained.push_back(Retained {
            seq,
            payload,
            enqueued_ms: now_ms,
        });
        true
    }

    /// The local journal now holds every message up to `upto`.
    pub fn mark_durable(&mut self, upto: Seq) {
        self.durable = self.durable.max(upto.min(self.assigned));
    }

    /// The number the next [`Outbound::enqueue`] will hand out (for payloads that carry it).
    pub fn next_seq(&self) -> Option<Seq> {
        self.assigned.next()
    }

    /// Whether `n` more messages fit before [`StreamError::Backlog`].
    pub fn has_room(&self, n: usize) -> bool {
        self.retained.len() + n <= self.max_retained
    }

    /// A connection is up and the peer says it holds everything up to `peer_has`.
    /// Transmission restarts right after that; the watermark also counts as an ack.
    pub fn connect(
        &mut self,
        conn: ConnId,
        peer_has: Seq,
        now_ms: u64,
    ) -> Result<AckOutcome, StreamError> {
        if peer_has > self.assigned {
            return Err(StreamError::PeerAhead {
                claimed: peer_has,
                assigned: self.assigned,
            });
        }
        if peer_has < self.acked {
            return Err(StreamError::PeerRegressed {
                claimed: peer_has,
                acked: self.acked,
            });
        }
        self.conn = Some(conn);
        let outcome = self.advance(peer_has, now_ms);
        self.sent = self.acked;
        self.sent_max = self.acked;
        self.last_progress_ms = now_ms;
        Ok(outcome)
    }

    /// The connection is gone; nothing is transmitted until the next [`Outbound::connect`].
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// A cumulative ack arrived on `conn`.
    pub fn on_ack(&mut self, conn: ConnId, upto: Seq, now_ms: u64) -> AckOutcome {
        if self.conn != Some(conn) {
            self.stats.stale_acks += 1;
            return AckOutcome::Stale;
        }
        if upto > self.sent_max {
            self.stats.bogus_acks += 1;
            return AckOutcome::Bogus;
        }
        self.advance(upto, now_ms)
    }

    fn advance(&mut self, upto: Seq, now_ms: u64) -> AckOutcome {
        if upto <= self.acked {
            return AckOutcome::Duplicate;
        }
        self.acked = upto;
        self.sent = self.sent.max(upto);
        while self.retained.front().is_some_and(|r| r.seq <= upto) {
            self.retained.pop_front();
        }
        self.last_progress_ms = now_ms;
        AckOutcome::Advanced(upto)
    }

    /// The peer saw a gap and asks for everything from `from` again.
    pub fn on_nack(&mut self, conn: ConnId, from: Seq) -> bool {
        if self.conn != Some(conn)
            || from <= self.acked
            || from > self.sent_max.next().unwrap_or(self.sent_max)
        {
            self.stats.bogus_acks += 1;
            return false;
        }
        self.stats.nacks += 1;
        self.sent = Seq(from.0 - 1);
        true
    }

    /// Time passed: without ack progress for the retransmit timeout, resend from the last ack.
    pub fn on_tick(&mut self, now_ms: u64) {
        if self.conn.is_some()
            && self.sent > self.acked
            && now_ms.saturating_sub(self.last_progress_ms) >= self.rto_ms
        {
            self.stats.retransmits += 1;
            self.sent = self.acked;
            self.last_progress_ms = now_ms;
        }
    }

    /// The messages to put on the wire now, in order (durable, within the window).
    pub fn poll_transmit(&mut self, now_ms: u64) -> Vec<(Seq, P)> {
        let mut out = Vec::new();
        if self.conn.is_none() {
            return out;
        }
        if self.sent == self.acked {
            self.last_progress_ms = now_ms;
        }
        let limit = Seq(self.durable.0.min(self.acked.0.saturating_add(self.window)));
        let skip = (self.sent.0 - self.acked.0) as usize;
        for r in self.retained.iter().skip(skip) {
            if r.seq > limit {
                break;
            }
            out.push((r.seq, r.payload.clone()));
            self.sent = r.seq;
            self.sent_max = self.sent_max.max(r.seq);
        }
        out
    }

    /// Drop everything retained and start numbering again at 1 (the peer lost its state).
    /// Returns the messages that will never be delivered, so the edge can fail their work.
    pub fn reset(&mut self) -> Vec<Retained<P>> {
        let abandoned = self.retained.drain(..).collect();
        self.assigned = Seq::ZERO;
        self.durable = Seq::ZERO;
        self.acked = Seq::ZERO;
        self.sent = Seq::ZERO;
        self.sent_max = Seq::ZERO;
        abandoned
    }

    /// This end was restored behind its peer, which holds up to `peer_has` of a stream this
    /// end no longer remembers all of: numbering continues after `peer_has`. Returns what was
    /// retained (the peer never had those under these numbers), to enqueue again.
    pub fn rebase(&mut self, peer_has: Seq) -> Vec<Retained<P>> {
        let retained = self.retained.drain(..).collect();
        self.assigned = peer_has;
        self.durable = peer_has;
        self.acked = peer_has;
        self.sent = peer_has;
        self.sent_max = peer_has;
        retained
    }

    /// The retained message numbered `seq`, if any.
    pub fn retained(&self, seq: Seq) -> Option<&P> {
        let first = self.retained.front()?.seq;
        let at = seq.0.checked_sub(first.0)?;
        self.retained
            .get(usize::try_from(at).ok()?)
            .map(|r| &r.payload)
    }

    pub fn acked(&self) -> Seq {
        self.acked
    }
    pub fn assigned(&self) -> Seq {
        self.assigned
    }
    pub fn unacked(&self) -> usize {
        self.retained.len()
    }
    pub fn oldest_unacked_ms(&self) -> Option<u64> {
        self.retained.front().map(|r| r.enqueued_ms)
    }
    pub fn stats(&self) -> OutboundStats {
        self.stats
    }
}

/// What the consumer should do with an incoming message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataOutcome {
    /// The next message: journal it (with the new watermark, in one batch), then call
    /// [`Inbound::mark_durable`]; only then is it acked and handed to the application.
    Accept,
    /// Already held: not handed on again; it is re-acked once durable.
    Duplicate,
    /// A gap before it: dropped; a nack asks for the missing ones.
    Gap { expected: Seq },
}

/// The consumer's half of a stream.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Highest contiguous sequence number accepted (its journal append may still be pending).
    received: Seq,
    /// Highest contiguous sequence number the local journal holds.
    durable: Seq,
    /// Highest ack put on the wire on the current connection.
    ack_sent: Seq,
    /// A duplicate arrived: repeat the ack even if it did not move.
    reack: bool,
    /// The first missing seq to nack, once per gap position.
    nack_due: Option<Seq>,
    nacked: Option<Seq>,
    /// CRCs of the latest messages, to tell a harmless resend from a conflicting replay.
    recent: VecDeque<(Seq, u32)>,
    window: u64,
    /// Counts, exported as metrics.
    pub duplicates: u64,
    pub gaps: u64,
}

impl Inbound {
    pub fn new(window: u64) -> Self {
        Self::recover(Seq::ZERO, Vec::new(), window)
    }

    /// Rebuild from the journal: the durable watermark and the CRCs of the latest messages held.
    pub fn recover(durable: Seq, recent: Vec<(Seq, u32)>, window: u64) -> Self {
        let window = window.max(1);
        let mut recent: VecDeque<_> = recent.into_iter().filter(|(s, _)| *s <= durable).collect();
        recent.make_contiguous().sort_by_key(|(s, _)| *s);
        while recent.len() as u64 > window {
            recent.pop_front();
        }
        Inbound {
            received: durable,
            durable,
            ack_sent: Seq::ZERO,
            reack: false,
            nack_due: None,
            nacked: None,
            recent,
            window,
            duplicates: 0,
            gaps: 0,
        }
    }

    /// A new connection: returns the watermark to announce to the peer.
    pub fn connect(&mut self) -> Seq {
        self.ack_sent = self.durable;
        self.nack_due = None;
        self.nacked = None;
        self.durable
    }

    /// A message arrived.
    pub fn on_data(&mut self, seq: Seq, crc: u32) -> Result<DataOutcome, StreamError> {
        if seq == Seq::ZERO || seq > Seq::MAX_VALID {
            return Err(StreamError::BadSeq { seq });
        }
        if seq <= self.received {
            if let Some((_, held)) = self.recent.iter().find(|(s, _)| *s == seq) {
                if *held != crc {
                    return Err(StreamError::ReplayMismatch {
                        seq,
                        held: *held,
                        got: crc,
                    });
                }
            }
            self.duplicates += 1;
            self.reack = true;
            return Ok(DataOutcome::Duplicate);
        }
        let expected = Seq(self.received.0 + 1);
        if seq > expected {
            if seq.0 - self.received.0 > self.window {
                return Err(StreamError::TooFarAhead {
                    seq,
                    expected,
                    window: self.window,
                });
            }
            self.gaps += 1;
            if self.nacked != Some(expected) {
                self.nack_due = Some(expected);
            }
            return Ok(DataOutcome::Gap { expected });
        }
        self.received = seq;
        self.recent.push_back((seq, crc));
        if self.recent.len() as u64 > self.window {
            self.recent.pop_front();
        }
        Ok(DataOutcome::Accept)
    }

    /// The journal now holds every accepted message up to `upto`.
    pub fn mark_durable(&mut self, upto: Seq) {
        self.durable = self.durable.max(upto.min(self.received));
    }

    /// The ack to send now, if any (coalesced: one per poll, covering all that is durable).
    pub fn poll_ack(&mut self) -> Option<Seq> {
        if self.durable > self.ack_sent || (self.reack && self.durable > Seq::ZERO) {
            self.ack_sent = self.durable;
            self.reack = false;
            return Some(self.durable);
        }
        self.reack = false;
        None
    }

    /// Messages after the last one received were dropped unrecorded (deferred): ask the
    /// producer to send again from there.
    pub fn ask_resend(&mut self) {
        self.nacked = None;
        self.nack_due = Some(Seq(self.received.0 + 1));
    }

    /// The nack to send now, if a gap was seen.
    pub fn poll_nack(&mut self) -> Option<Seq> {
        let due = self.nack_due.take()?;
        if due <= self.received {
            return None;
        }
        self.nacked = Some(due);
        Some(due)
    }

    /// The peer's messages up to `upto` were acknowledged by a copy of this end that was lost
    /// (this end was restored from a backup): take the stream up again after them.
    pub fn skip_to(&mut self, upto: Seq) {
        if upto > self.durable {
            *self = Inbound::recover(upto, Vec::new(), self.window);
        }
    }

    /// Forget the stream (the peer lost its state and starts again at 1).
    pub fn reset(&mut self) {
        *self = Inbound::new(self.window);
    }

    pub fn durable(&self) -> Seq {
        self.durable
    }
    pub fn received(&self) -> Seq {
        self.received
    }
}

/// What the handshake found out about the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake<P> {
    /// First contact with this peer: remember its incarnation (journal it) before going on.
    FirstContact,
    /// The same peer as before: streams resume from the watermarks.
    Resumed,
    /// The peer lost its state: both streams restart at 1. `abandoned` will never be
    /// delivered (the edge fails the work they carried, with that reason).
    PeerReset {
        previous: String,
        abandoned: Vec<Retained<P>>,
    },
}

/// What [`Endpoint::rejoin`] found: this end had been restored behind its peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejoined<P> {
    /// Peer messages this end had acknowledged and no longer holds.
    pub inbound_lost: u64,
    /// Messages of ours the peer holds that this end no longer remembers sending.
    pub outbound_lost: u64,
    /// What this end still retained: numbered again after what the peer holds, the edge
    /// enqueues it anew (it never reached the peer under those numbers).
    pub resend: Vec<Retained<P>>,
}

/// Both directions of one peer relationship, plus the peer's incarnation.
///
/// Sequence numbers belong to one pair of incarnations: a stream restarts at 1 whenever either
/// end's incarnation changes. So each end tells the other which incarnation of it the peer's
/// watermark refers to; a watermark about a previous incarnation counts as 0.
///
/// Handshake order: the agent calls [`Endpoint::begin`] and sends the watermark it returns with
/// its incarnation and the server incarnation it knows; the server calls [`Endpoint::begin`],
/// then [`Endpoint::complete`] (which may reset its inbound half), and answers with
/// [`Inbound::durable`]; the agent calls [`Endpoint::complete`] with that answer (the server
/// knows the agent's current incarnation by then). A first contact or a reset must be journaled
/// before the connection goes on.
#[derive(Debug, Clone)]
pub struct Endpoint<P> {
    pub outbound: Outbound<P>,
    pub inbound: Inbound,
    /// The peer's journal id as last seen; `None` before first contact.
    pub peer_incarnation: Option<String>,
    conn: Option<ConnId>,
}

impl<P: Clone> Endpoint<P> {
    pub fn new(outbound: Outbound<P>, inbound: Inbound, peer_incarnation: Option<String>) -> Self {
        Endpoint {
            outbound,
            inbound,
            peer_incarnation,
            conn: None,
        }
    }

    /// A connection `conn` starts: returns our watermark of the peer's stream to announce.
    pub fn begin(&mut self, conn: ConnId) -> Seq {
        self.conn = Some(conn);
        self.outbound.disconnect();
        self.inbound.connect()
    }

    /// The peer's half of the handshake arrived: its incarnation, whether its watermark refers
    /// to our current incarnation, and that watermark of our stream.
    pub fn complete(
        &mut self,
        conn: ConnId,
        peer_incarnation: &str,
        peer_knows_us: bool,
        peer_has: Seq,
        now_ms: u64,
    ) -> Result<Handshake<P>, StreamError> {
        let outcome = match &self.peer_incarnation {
            Some(known) if known == peer_incarnation => Handshake::Resumed,
            None => {
                self.inbound.reset();
                Handshake::FirstContact
            }
            Some(known) => {
                let previous = known.clone();
                let abandoned = self.outbound.reset();
                self.inbound.reset();
                Handshake::PeerReset {
                    previous,
                    abandoned,
                }
            }
        };
        let peer_has = if peer_knows_us { peer_has } else { Seq::ZERO };
        self.outbound.connect(conn, peer_has, now_ms)?;
        self.peer_incarnation = Some(peer_incarnation.to_owned());
        self.conn = Some(conn);
        Ok(outcome)
    }

    /// Before [`Endpoint::complete`], on a resumed relationship: the peer says this end had
    /// acknowledged its stream up to `peer_acked`, and that it holds ours up to `peer_has`,
    /// the last of which `held_is_ours` recognises (or not). A peer ahead of this end on
    /// either stream means this end was restored from a copy taken before their last
    /// exchanges: the inbound half skips what was lost, the outbound half continues after
    /// what the peer holds. `None` when this end is not behind (the usual case).
    ///
    /// A peer can only move its own relationship forward with this, never another's.
    pub fn rejoin(
        &mut self,
        peer_acked: Seq,
        peer_has: Seq,
        held_is_ours: impl Fn(&P) -> bool,
    ) -> Option<Rejoined<P>> {
        let inbound_lost = peer_acked.0.saturating_sub(self.inbound.durable().0);
        let out = &self.outbound;
        let diverged = peer_has > out.assigned()
            || (peer_has > out.acked() && out.retained(peer_has).is_some_and(|p| !held_is_ours(p)));
        if inbound_lost == 0 && !diverged {
            return None;
        }
        self.inbound.skip_to(peer_acked);
        let (outbound_lost, resend) = if diverged {
            let lost = peer_has.0 - out.acked().0;
            (lost, self.outbound.rebase(peer_has))
        } else {
            (0, Vec::new())
        };
        Some(Rejoined {
            inbound_lost,
            outbound_lost,
            resend,
        })
    }

    /// The connection dropped.
    pub fn disconnect(&mut self) {
        self.conn = None;
        self.outbound.disconnect();
    }

    pub fn conn(&self) -> Option<ConnId> {
        self.conn
    }
}

#[cfg(test)]
mod tests;
