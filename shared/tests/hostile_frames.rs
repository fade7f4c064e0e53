//! Hostile frames through the real receive path (decode → stream core → journal): each gets
//! its typed error, and afterwards the journal holds exactly the good messages sent before
//! them — nothing was journaled, nothing acknowledged for any hostile frame.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use tether_shared::journal::{Journal, JournalHandle, JournalOptions, LogName};
use tether_shared::link::{LinkError, Received, StreamReceiver};
use tether_shared::protocol::*;
use tether_shared::stream::{Inbound, StreamError};

fn event(seq: u64, data: &str) -> Vec<u8> {
    Frame::Event(
        Event::new(
            Seq(seq),
            EventBody::Probe {
                n: seq,
                data: data.into(),
            },
        )
        .unwrap(),
    )
    .encode()
    .unwrap()
}

/// The receive path under test: where the stream is journaled, and its sans-IO state.
struct Rx {
    receiver: StreamReceiver,
    inbound: Inbound,
}

impl Rx {
    fn poll_ack(&mut self) -> Option<Frame> {
        self.receiver.poll_ack(&mut self.inbound)
    }
    fn poll_nack(&mut self) -> Option<Frame> {
        self.receiver.poll_nack(&mut self.inbound)
    }
}

/// Feed `bytes`; commit whatever it asks to journal (a correct receiver asks nothing for
/// hostile input, and the final checks would catch it if it did).
async fn feed(rx: &mut Rx, journal: &JournalHandle, bytes: &[u8]) -> Result<Received, LinkError> {
    let r = rx.receiver.on_bytes(&mut rx.inbound, bytes, |_| Ok(()))?;
    if let Received::Journal { seq, ops, .. } = &r {
        journal.commit(ops.clone()).await.unwrap();
        rx.inbound.mark_durable(*seq);
    }
    Ok(r)
}

#[actix::test]
async fn hostile_frames_are_refused_with_nothing_journaled_or_acked() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(dir.path(), &JournalOptions::default()).unwrap();
    let journal = journal.handle();
    let log = LogName::new("in/events/agent-1").unwrap();
    let mut rx = Rx {
        receiver: StreamReceiver::new(StreamId::Events, log.clone(), "wm/in/events/agent-1".into()),
        inbound: Inbound::new(64),
    };

    // Positive control: three good events are journaled and acked.
    for seq in 1..=3 {
        assert!(matches!(
            feed(&mut rx, &journal, &event(seq, "good")).await,
            Ok(Received::Journal { .. })
        ));
    }
    assert_eq!(
        rx.poll_ack(),
        Some(Frame::Ack(Ack {
            stream: StreamId::Events,
            upto: Seq(3)
        }))
    );
    let commits_before = journal.observe().commits;

    let good = event(4, "good");
    let mut bad_crc = Event::new(
        Seq(4),
        EventBody::Probe {
            n: 4,
            data: "x".into(),
        },
    )
    .unwrap();
    bad_crc.crc ^= 0xFFFF;
    let cmd = Command::new(
        Seq(4),
        "c".into(),
        0,
        CommandBody::Probe {
            n: 4,
            data: String::new(),
        },
    )
    .unwrap();
    let deep = format!(
        r#"{{"v":1,"kind":"event","body":{}{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let raw_event = |seq: &str| {
        format!(
            r#"{{"v":1,"kind":"event","body":{{"seq":{seq},"body":{{"type":"probe","n":1,"data":""}},"crc":0}}}}"#
        )
    };

    type Check = fn(&LinkError) -> bool;
    let cases: Vec<(&str, Vec<u8>, Check)> = vec![
        ("oversized", vec![b'{'; MAX_FRAME_BYTES + 1], |e| {
            matches!(e, LinkError::Decode(DecodeError::TooLarge { .. }))
        }),
        ("truncated", good[..good.len() / 2].to_vec(), |e| {
            matches!(e, LinkError::Decode(DecodeError::Malformed(_)))
        }),
        ("empty", Vec::new(), |e| {
            matches!(e, LinkError::Decode(DecodeError::Malformed(_)))
        }),
        (
            "wrong version",
            String::from_utf8(good.clone())
                .unwrap()
                .replacen(r#""v":1"#, r#""v":2"#, 1)
                .into_bytes(),
            |e| {
                matches!(
                    e,
                    LinkError::Decode(DecodeError::UnsupportedVersion { got: 2, .. })
                )
            },
        ),
        (
            "unknown kind",
            br#"{"v":1,"kind":"run_shell","body":{"cmd":"id"}}"#.to_vec(),
            |e| matches!(e, LinkError::Decode(DecodeError::UnknownKind(_))),
        ),
        (
            "server-only kind from an agent",
            Frame::Command(cmd).encode().unwrap(),
            |e| {
                matches!(
                    e,
                    LinkError::Decode(DecodeError::WrongDirection {
                        kind: "command",
                        ..
                    })
                )
            },
        ),
        ("wrong types", raw_event(r#""4""#).into_bytes(), |e| {
            matches!(e, LinkError::Decode(DecodeError::BadBody { .. }))
        }),
        ("negative seq", raw_event("-4").into_bytes(), |e| {
            matches!(e, LinkError::Decode(DecodeError::BadBody { .. }))
        }),
        (
            "duplicate key",
            br#"{"v":1,"v":1,"kind":"event","body":{}}"#.to_vec(),
            |e| matches!(e, LinkError::Decode(DecodeError::Malformed(_))),
        ),
        ("deep nesting", deep.into_bytes(), |e| {
            matches!(e, LinkError::Decode(_))
        }),
        (
            "seq u64::MAX",
            raw_event(&u64::MAX.to_string()).into_bytes(),
            |e| matches!(e, LinkError::Decode(DecodeError::BadSeq { .. })),
        ),
        ("seq 0", raw_event("0").into_bytes(), |e| {
            matches!(e, LinkError::Decode(DecodeError::BadSeq { .. }))
        }),
        (
            "checksum mismatch",
            Frame::Event(bad_crc).encode().unwrap(),
            |e| matches!(e, LinkError::Decode(DecodeError::Checksum { .. })),
        ),
        ("seq far ahead", event(1_000_000, "x"), |e| {
            matches!(e, LinkError::Stream(StreamError::TooFarAhead { .. }))
        }),
        ("replayed seq, other payload", event(2, "forged"), |e| {
            matches!(e, LinkError::Stream(StreamError::ReplayMismatch { .. }))
        }),
    ];
    assert!(cases.len() >= 15);
    for (name, bytes, expected) in &cases {
        match feed(&mut rx, &journal, bytes).await {
            Err(e) => {
                assert!(expected(&e), "{name}: unexpected error {e}");
                assert!(
                    e.close_code().as_u16() >= 1002,
                    "{name}: close code {}",
                    e.close_code()
                );
            }
            Ok(r) => panic!("{name}: accepted as {r:?}"),
        }
        assert_eq!(rx.poll_ack(), None, "{name}: produced an ack");
    }

    // A small skip ahead is not accepted either: it asks for a resend instead.
    assert_eq!(
        feed(&mut rx, &journal, &event(6, "early")).await,
        Ok(Received::Nothing)
    );
    assert_eq!(
        rx.poll_nack(),
        Some(Frame::Nack(Nack {
            stream: StreamId::Events,
            from: Seq(4)
        }))
    );
    assert_eq!(rx.poll_ack(), None);
    // A plain duplicate is re-acked, not journaled again.
    assert_eq!(
        feed(&mut rx, &journal, &event(3, "good")).await,
        Ok(Received::Nothing)
    );
    assert_eq!(
        rx.poll_ack(),
        Some(Frame::Ack(Ack {
            stream: StreamId::Events,
            upto: Seq(3)
        }))
    );

    // Nothing reached the journal: the same commits, exactly the three good records.
    assert_eq!(journal.observe().commits, commits_before);
    let held = journal.read_log(&log, Seq::ZERO, 100).unwrap();
    assert_eq!(
        held.iter().map(|r| r.seq.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(
        journal.get_meta("wm/in/events/agent-1").unwrap(),
        Some(3u64.to_be_bytes().to_vec())
    );

    // And the stream goes on: the real seq 4 is accepted.
    assert!(matches!(
        feed(&mut rx, &journal, &good).await,
        Ok(Received::Journal { .. })
    ));
    assert_eq!(
        rx.poll_ack(),
        Some(Frame::Ack(Ack {
            stream: StreamId::Events,
            upto: Seq(4)
        }))
    );
}
