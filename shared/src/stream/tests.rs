//! Unit tests of the parent module.

use super::*;

fn out() -> Outbound<u32> {
    Outbound::new(4, 100, 1000)
}

#[test]
fn transmits_only_durable_messages_within_the_window() {
    let mut o = out();
    for i in 0..6 {
        o.enqueue(i, 0).unwrap();
    }
    o.connect(ConnId(1), Seq::ZERO, 0).unwrap();
    assert!(o.poll_transmit(0).is_empty(), "nothing is durable yet");
    o.mark_durable(Seq(6));
    let sent: Vec<_> = o.poll_transmit(0).into_iter().map(|(s, _)| s.0).collect();
    assert_eq!(sent, vec![1, 2, 3, 4], "window of 4");
    assert_eq!(o.on_ack(ConnId(1), Seq(2), 1), AckOutcome::Advanced(Seq(2)));
    let sent: Vec<_> = o.poll_transmit(1).into_iter().map(|(s, _)| s.0).collect();
    assert_eq!(sent, vec![5, 6]);
    assert_eq!(o.unacked(), 4);
}

#[test]
fn ignores_stale_and_bogus_acks() {
    let mut o = out();
    o.enqueue(1, 0).unwrap();
    o.mark_durable(Seq(1));
    o.connect(ConnId(1), Seq::ZERO, 0).unwrap();
    o.poll_transmit(0);
    o.connect(ConnId(2), Seq::ZERO, 0).unwrap();
    assert_eq!(o.on_ack(ConnId(1), Seq(1), 0), AckOutcome::Stale);
    assert_eq!(
        o.on_ack(ConnId(2), Seq(1), 0),
        AckOutcome::Bogus,
        "not sent on conn 2 yet"
    );
    assert_eq!(o.on_ack(ConnId(2), Seq(9), 0), AckOutcome::Bogus);
    assert_eq!(o.stats().stale_acks, 1);
    assert_eq!(o.stats().bogus_acks, 2);
    assert_eq!(o.unacked(), 1);
}

#[test]
fn refuses_a_peer_ahead_or_regressed() {
    let mut o = out();
    o.enqueue(1, 0).unwrap();
    o.mark_durable(Seq(1));
    assert!(matches!(
        o.connect(ConnId(1), Seq(5), 0),
        Err(StreamError::PeerAhead { .. })
    ));
    o.connect(ConnId(1), Seq(1), 0).unwrap();
    assert!(matches!(
        o.connect(ConnId(2), Seq(0), 0),
        Err(StreamError::PeerRegressed { .. })
    ));
}

#[test]
fn rewinds_on_nack_and_timeout() {
    let mut o = out();
    for i in 0..3 {
        o.enqueue(i, 0).unwrap();
    }
    o.mark_durable(Seq(3));
    o.connect(ConnId(1), Seq::ZERO, 0).unwrap();
    assert_eq!(o.poll_transmit(0).len(), 3);
    assert!(o.on_nack(ConnId(1), Seq(2)));
    assert_eq!(o.poll_transmit(0).first().map(|(s, _)| *s), Some(Seq(2)));
    o.on_tick(999);
    assert!(o.poll_transmit(999).is_empty());
    o.on_tick(1000);
    assert_eq!(o.poll_transmit(1000).len(), 3);
    assert!(!o.on_nack(ConnId(1), Seq(9)), "nack beyond what was sent");
}

#[test]
fn inbound_accepts_in_order_dedupes_and_nacks_gaps() {
    let mut i = Inbound::new(8);
    assert_eq!(i.on_data(Seq(1), 11), Ok(DataOutcome::Accept));
    assert_eq!(i.poll_ack(), None, "not durable yet");
    i.mark_durable(Seq(1));
    assert_eq!(i.poll_ack(), Some(Seq(1)));
    assert_eq!(i.on_data(Seq(1), 11), Ok(DataOutcome::Duplicate));
    assert_eq!(i.poll_ack(), Some(Seq(1)), "duplicate is re-acked");
    assert_eq!(
        i.on_data(Seq(3), 33),
        Ok(DataOutcome::Gap { expected: Seq(2) })
    );
    assert_eq!(i.poll_nack(), Some(Seq(2)));
    assert_eq!(
        i.on_data(Seq(4), 44),
        Ok(DataOutcome::Gap { expected: Seq(2) })
    );
    assert_eq!(i.poll_nack(), None, "one nack per gap");
    assert!(matches!(
        i.on_data(Seq(1), 99),
        Err(StreamError::ReplayMismatch { .. })
    ));
    assert!(matches!(
        i.on_data(Seq(100), 0),
        Err(StreamError::TooFarAhead { .. })
    ));
    assert!(matches!(
        i.on_data(Seq(u64::MAX), 0),
        Err(StreamError::BadSeq { .. })
    ));
    assert_eq!(i.received(), Seq(1));
}

#[test]
fn detects_a_peer_that_lost_its_state() {
    let mut e: Endpoint<u32> = Endpoint::new(out(), Inbound::new(8), None);
    e.begin(ConnId(1));
    assert_eq!(
        e.complete(ConnId(1), "inc-a", false, Seq::ZERO, 0),
        Ok(Handshake::FirstContact)
    );
    e.outbound.enqueue(7, 0).unwrap();
    e.outbound.mark_durable(Seq(1));
    e.disconnect();
    e.begin(ConnId(2));
    match e.complete(ConnId(2), "inc-b", false, Seq(1), 0) {
        Ok(Handshake::PeerReset {
            previous,
            abandoned,
        }) => {
            assert_eq!(previous, "inc-a");
            assert_eq!(abandoned.len(), 1);
        }
        other => panic!("expected a reset, got {other:?}"),
    }
    assert_eq!(e.outbound.enqueue(8, 0), Ok(Seq(1)), "numbering restarts");
}

/// An endpoint that sent `sent` messages (payload = seq), of which the peer acked `acked`, and
/// holds the peer's stream up to `held`.
fn endpoint(sent: u32, acked: u64, held: u64) -> Endpoint<u32> {
    let mut o = out();
    for i in 1..=sent {
        o.enqueue(i, 0).unwrap();
    }
    o.mark_durable(Seq(sent.into()));
    o.connect(ConnId(1), Seq(acked), 0).unwrap();
    let mut i = Inbound::new(8);
    for seq in 1..=held {
        i.on_data(Seq(seq), 0).unwrap();
    }
    i.mark_durable(Seq(held));
    Endpoint::new(o, i, Some("peer".into()))
}

#[test]
fn rejoin_finds_nothing_when_this_end_is_not_behind() {
    let mut ep = endpoint(5, 3, 7);
    assert_eq!(ep.rejoin(Seq(7), Seq(4), |p| *p == 4), None);
    assert_eq!(
        ep.rejoin(Seq(6), Seq(5), |p| *p == 5),
        None,
        "an ack in flight"
    );
    assert_eq!(
        ep.rejoin(Seq(7), Seq(3), |_| false),
        None,
        "nothing held to compare"
    );
    ep.complete(ConnId(2), "peer", true, Seq(4), 0).unwrap();
    assert_eq!(ep.outbound.acked(), Seq(4));
}

#[test]
fn rejoin_skips_peer_messages_this_end_lost() {
    let mut ep = endpoint(2, 2, 5);
    let r = ep.rejoin(Seq(9), Seq(2), |_| true).unwrap();
    assert_eq!((r.inbound_lost, r.outbound_lost), (4, 0));
    assert!(r.resend.is_empty());
    assert_eq!(
        ep.inbound.connect(),
        Seq(9),
        "announced: the peer resends from 10"
    );
    assert_eq!(ep.inbound.on_data(Seq(10), 0), Ok(DataOutcome::Accept));
}

#[test]
fn rejoin_continues_after_what_the_peer_holds_and_resends_what_was_retained() {
    // Restored with 1..=5 sent and 3 acked; after the restore 6 and 7 were numbered anew,
    // but the peer holds 6 from before the restore (another message).
    let mut ep = endpoint(7, 3, 0);
    let r = ep.rejoin(Seq::ZERO, Seq(6), |p| *p == 99).unwrap();
    assert_eq!(r.outbound_lost, 3);
    let again: Vec<u32> = r.resend.iter().map(|r| r.payload).collect();
    assert_eq!(again, vec![4, 5, 6, 7], "everything unacked goes again");
    ep.complete(ConnId(2), "peer", true, Seq(6), 0).unwrap();
    assert_eq!(
        ep.outbound.enqueue(4, 0).unwrap(),
        Seq(7),
        "numbered after the peer's"
    );

    // Ahead of anything this end numbered.
    let mut ep = endpoint(2, 2, 0);
    let r = ep.rejoin(Seq::ZERO, Seq(9), |_| true).unwrap();
    assert_eq!((r.outbound_lost, r.resend.len()), (7, 0));
    ep.complete(ConnId(2), "peer", true, Seq(9), 0).unwrap();
}

#[test]
fn a_peer_behind_what_it_acked_is_still_refused_after_rejoin() {
    let mut ep = endpoint(5, 4, 0);
    assert_eq!(ep.rejoin(Seq::ZERO, Seq(2), |_| true), None);
    assert!(matches!(
        ep.complete(ConnId(2), "peer", true, Seq(2), 0),
        Err(StreamError::PeerRegressed { .. })
    ));
}

#[test]
fn adopts_only_the_next_durable_message_that_fits() {
    let mut o = Outbound::new(4, 3, 1000);
    assert!(!o.adopt(Seq(2), 2, 0), "a gap is not taken");
    assert!(o.adopt(Seq(1), 1, 0));
    assert!(!o.adopt(Seq(1), 1, 0), "nor a message held already");
    o.enqueue(2, 0).unwrap();
    assert!(
        !o.adopt(Seq(3), 3, 0),
        "not after a message of its own that is not durable yet"
    );
    o.mark_durable(Seq(2));
    assert!(o.adopt(Seq(3), 3, 0));
    assert!(
        !o.adopt(Seq(4), 4, 0),
        "not past what the stream may retain"
    );
    o.connect(ConnId(1), Seq::ZERO, 0).unwrap();
    let sent: Vec<_> = o.poll_transmit(0).into_iter().map(|(s, _)| s.0).collect();
    assert_eq!(sent, vec![1, 2, 3], "adopted messages go out as durable");
    assert_eq!(o.on_ack(ConnId(1), Seq(3), 1), AckOutcome::Advanced(Seq(3)));
    assert!(o.adopt(Seq(4), 4, 1), "room again once acknowledged");
    assert_eq!(o.next_seq(), Some(Seq(5)));
}
