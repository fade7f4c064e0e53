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
