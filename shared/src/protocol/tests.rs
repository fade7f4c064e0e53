//! Unit tests of the parent module.

use super::*;

fn event(seq: u64, n: u64) -> Frame {
    Frame::Event(
        Event::new(
            Seq(seq),
            EventBody::Probe {
                n,
                data: "x".into(),
            },
        )
        .unwrap(),
    )
}

#[test]
fn round_trips_an_event() {
    let f = event(7, 7);
    let bytes = f.encode().unwrap();
    assert_eq!(decode(&bytes, Sender::Agent).unwrap(), f);
}

#[test]
fn refuses_oversized_before_parsing() {
    let bytes = vec![b' '; MAX_FRAME_BYTES + 1];
    assert_eq!(
        decode(&bytes, Sender::Agent),
        Err(DecodeError::TooLarge {
            len: MAX_FRAME_BYTES + 1,
            max: MAX_FRAME_BYTES
        })
    );
}

#[test]
fn refuses_wrong_and_huge_versions() {
    for v in ["0", "2", "18446744073709551615"] {
        let text = format!(r#"{{"v":{v},"kind":"ack","body":{{"stream":"events","upto":1}}}}"#);
        let err = decode(text.as_bytes(), Sender::Server).unwrap_err();
        assert!(
            matches!(err, DecodeError::UnsupportedVersion { .. }),
            "{v}: {err}"
        );
        assert!(err.to_string().contains("supported 1..=1"));
    }
    let negative = br#"{"v":-1,"kind":"ack","body":{}}"#;
    assert!(matches!(
        decode(negative, Sender::Server),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn refuses_unknown_kind_and_wrong_direction() {
    let unknown = br#"{"v":1,"kind":"exec","body":{}}"#;
    assert_eq!(
        decode(unknown, Sender::Agent),
        Err(DecodeError::UnknownKind("exec".into()))
    );
    let cmd = Command::new(
        Seq(1),
        "c1".into(),
        0,
        CommandBody::Probe {
            n: 1,
            data: String::new(),
        },
    )
    .unwrap();
    let bytes = Frame::Command(cmd).encode().unwrap();
    assert_eq!(
        decode(&bytes, Sender::Agent),
        Err(DecodeError::WrongDirection {
            kind: "command",
            sender: Sender::Agent
        })
    );
    // An agent acks commands, never events.
    let ack = br#"{"v":1,"kind":"ack","body":{"stream":"events","upto":3}}"#;
    assert!(matches!(
        decode(ack, Sender::Agent),
        Err(DecodeError::WrongDirection { .. })
    ));
    assert!(decode(ack, Sender::Server).is_ok());
}

#[test]
fn refuses_bad_sequence_numbers() {
    for seq in [0, u64::MAX] {
        let ev = Frame::Event(Event {
            seq: Seq(seq),
            body: EventBody::Probe {
                n: 1,
                data: String::new(),
            },
            crc: 0,
        });
        let bytes = ev.encode().unwrap();
        assert_eq!(
            decode(&bytes, Sender::Agent),
            Err(DecodeError::BadSeq { seq })
        );
    }
    let ack = format!(
        r#"{{"v":1,"kind":"ack","body":{{"stream":"events","upto":{}}}}}"#,
        u64::MAX
    );
    assert!(matches!(
        decode(ack.as_bytes(), Sender::Server),
        Err(DecodeError::BadSeq { .. })
    ));
}

#[test]
fn refuses_checksum_mismatch() {
    let mut e = Event::new(
        Seq(1),
        EventBody::Probe {
            n: 1,
            data: "a".into(),
        },
    )
    .unwrap();
    e.crc ^= 1;
    let bytes = Frame::Event(e).encode().unwrap();
    assert!(matches!(
        decode(&bytes, Sender::Agent),
        Err(DecodeError::Checksum { .. })
    ));
}

#[test]
fn refuses_wrong_types_unknown_fields_and_deep_nesting() {
    let cases: [&[u8]; 6] = [
        br#"{"v":1,"kind":"ack","body":{"stream":"events","upto":"3"}}"#,
        br#"{"v":1,"kind":"ack","body":{"stream":"events","upto":3,"extra":1}}"#,
        br#"{"v":1,"kind":"ack","body":{"stream":"events"}}"#,
        br#"{"v":1,"kind":"ack","body":{"stream":"events","upto":3},"x":0}"#,
        br#"{"v":1,"kind":"ack","body":{"stream":"events","upto":3}"#,
        b"\xff\xfe",
    ];
    for c in cases {
        assert!(
            decode(c, Sender::Server).is_err(),
            "{}",
            String::from_utf8_lossy(c)
        );
    }
    let deep = format!(
        r#"{{"v":1,"kind":"ack","body":{}{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert!(decode(deep.as_bytes(), Sender::Server).is_err());
}

#[test]
fn unknown_kind_in_error_is_truncated() {
    let long = "k".repeat(10_000);
    let text = format!(r#"{{"v":1,"kind":"{long}","body":{{}}}}"#);
    let err = decode(text.as_bytes(), Sender::Agent).unwrap_err();
    assert!(err.to_string().len() < 200);
}

#[test]
fn encode_refuses_oversized_frames() {
    let big = Frame::Event(
        Event::new(
            Seq(1),
            EventBody::Probe {
                n: 1,
                data: "a".repeat(MAX_FRAME_BYTES),
            },
        )
        .unwrap(),
    );
    assert!(matches!(big.encode(), Err(EncodeError::TooLarge { .. })));
}
