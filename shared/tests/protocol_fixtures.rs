//! Golden frames and property tests of the v1 protocol.
//!
//! Every file in `fixtures/frames/` is one frame exactly as it travels; its name starts with the
//! sender (`server-` or `agent-`). Each must decode and re-encode byte-identically, so an
//! accidental change of the wire format fails here. Property tests check that every frame
//! round-trips and that no byte sequence makes the decoder panic.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::Path;

use proptest::prelude::*;
use tether_shared::protocol::*;

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/frames");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn sender_of(name: &str) -> Sender {
    if name.starts_with("server-") {
        Sender::Server
    } else if name.starts_with("agent-") {
        Sender::Agent
    } else {
        panic!("fixture {name} must start with server- or agent-")
    }
}

#[test]
fn golden_frames_decode_and_reencode_byte_identically() {
    let all = fixtures();
    assert!(
        all.len() >= 10,
        "expected a fixture per frame kind, found {}",
        all.len()
    );
    let mut kinds = std::collections::BTreeSet::new();
    for (name, bytes) in all {
        let text = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        let frame = decode(text, sender_of(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        kinds.insert(frame.kind());
        let again = frame.encode().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&again),
            String::from_utf8_lossy(text),
            "{name} re-encodes differently"
        );
    }
    assert_eq!(kinds.len(), 10, "every kind has a golden frame: {kinds:?}");
}

fn arb_seq() -> impl Strategy<Value = Seq> {
    (1..=Seq::MAX_VALID.0).prop_map(Seq)
}

fn arb_text() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn arb_frame() -> impl Strategy<Value = (Frame, Sender)> {
    prop_oneof![
        arb_text().prop_map(|nonce| (Frame::Challenge(Challenge { nonce }), Sender::Server)),
        (
            arb_text(),
            arb_text(),
            arb_text(),
            arb_text(),
            0..=Seq::MAX_VALID.0,
            arb_text()
        )
            .prop_map(
                |(agent_id, version, incarnation, server_incarnation, s, proof)| {
                    let h = Hello {
                        agent_id,
                        version,
                        incarnation,
                        server_incarnation,
                        last_command_seq: Seq(s),
                        proof,
                        trust_serial: s % 3,
                        events_acked: Seq(s / 2),
                        last_command_id: format!("{s:x}"),
                        reconciles: s % 2 == 0,
                        sealing_key: format!("k{s}"),
                        facts: [("os".to_owned(), format!("os{}", s % 5))]
                            .into_iter()
                            .filter(|_| s % 3 == 0)
                            .collect(),
                        runs_as: s % 2 == 1,
                        operations: s % 4 == 1,
                    };
                    (Frame::Hello(h), Sender::Agent)
                }
            ),
        (0..=Seq::MAX_VALID.0, arb_text(), any::<u64>()).prop_map(
            |(s, server_incarnation, heartbeat_interval_ms)| {
                (
                    Frame::Welcome(Welcome {
                        last_event_seq: Seq(s),
                        server_incarnation,
                        heartbeat_interval_ms,
                    }),
                    Sender::Server,
                )
            }
        ),
        any::<u64>()
            .prop_map(|retry_after_ms| (Frame::Busy(Busy { retry_after_ms }), Sender::Server)),
        (
            arb_seq(),
            arb_text(),
            any::<u64>(),
            any::<u64>(),
            arb_text(),
            arb_text()
        )
            .prop_map(|(seq, id, deadline, n, data, sig)| {
                let mut c =
                    Command::new(seq, id, deadline, CommandBody::Probe { n, data }).unwrap();
                c.signature = sig;
                (Frame::Command(c), Sender::Server)
            }),
        (arb_seq(), any::<u64>(), arb_text()).prop_map(|(seq, n, data)| {
            (
                Frame::Event(Event::new(seq, EventBody::Probe { n, data }).unwrap()),
                Sender::Agent,
            )
        }),
        (0..=Seq::MAX_VALID.0).prop_map(|s| (
            Frame::Ack(Ack {
                stream: StreamId::Events,
                upto: Seq(s)
            }),
            Sender::Server
        )),
        (0..=Seq::MAX_VALID.0).prop_map(|s| (
            Frame::Ack(Ack {
                stream: StreamId::Commands,
                upto: Seq(s)
            }),
            Sender::Agent
        )),
        arb_seq().prop_map(|from| (
            Frame::Nack(Nack {
                stream: StreamId::Commands,
                from
            }),
            Sender::Agent
        )),
        (
            any::<u64>(),
            proptest::option::of((
                arb_text(),
                any::<u32>(),
                any::<u32>(),
                arb_text(),
                any::<u32>(),
                any::<u64>()
            ))
        )
            .prop_map(|(sent_ms, status)| {
                let status = status.map(
                    |(version, running_jobs, load_milli, name, restarts, last_beat_ms)| {
                        AgentStatus {
                            facts: (restarts % 2 == 0)
                                .then(|| [("cpus".to_owned(), restarts.to_string())].into()),
                            figures: (restarts % 3 == 0).then(|| AgentFigures {
                                resident_bytes: last_beat_ms,
                                cpu_ms: u64::from(restarts),
                                events_unacked: last_beat_ms / 2,
                                ..AgentFigures::default()
                            }),
                            version,
                            running_jobs,
                            load_milli,
                            actors: vec![ActorHealth {
                                name,
                                kind: "Supervisor".into(),
                                state: "running".into(),
                                restarts,
                                last_beat_ms,
                            }],
                        }
                    },
                );
                (
                    Frame::Heartbeat(Heartbeat { sent_ms, status }),
                    Sender::Agent,
                )
            }),
        (arb_text(), arb_text(), arb_text()).prop_map(|(message, k, v)| {
            let details = [(k, v)].into_iter().collect();
            (
                Frame::Error(ErrorFrame {
                    code: ErrorCode::ProtocolViolation,
                    message,
                    details,
                }),
                Sender::Server,
            )
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn every_frame_round_trips((frame, sender) in arb_frame()) {
        let bytes = frame.encode().unwrap();
        prop_assert_eq!(decode(&bytes, sender).unwrap(), frame.clone());
        // and the encoding is stable
        prop_assert_eq!(decode(&bytes, sender).unwrap().encode().unwrap(), bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes, Sender::Agent);
        let _ = decode(&bytes, Sender::Server);
    }

    #[test]
    fn mutated_frames_never_panic_and_never_pass_a_checksum((frame, sender) in arb_frame(), idx in any::<usize>(), byte in any::<u8>()) {
        let mut bytes = frame.encode().unwrap();
        let i = idx % bytes.len();
        bytes[i] = byte;
        // Anything that still decodes must be self-consistent (checksums verified).
        if let Ok(Frame::Event(e)) = decode(&bytes, sender) {
            prop_assert_eq!(body_crc(&e.body).unwrap(), e.crc);
        }
    }
}

/// Each sample frame is exactly its golden file (and decodes from it to itself). After an
/// intended wire change, run once with `TETHER_BLESS=1` to rewrite the files, review, commit.
#[test]
fn samples_match_their_golden_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/frames");
    let bless = std::env::var("TETHER_BLESS").as_deref() == Ok("1");
    let mut cmd = Command::new(
        Seq(42),
        "cmd-7f3a".into(),
        1_790_000_000_000,
        CommandBody::Probe {
            n: 42,
            data: "payload".into(),
        },
    )
    .unwrap();
    cmd.signature = "c2lnbmF0dXJl".into();
    let mut upgrade = Command::new(
        Seq(43),
        "cmd-8a1b".into(),
        1_790_000_000_000,
        CommandBody::Upgrade {
            version: "1.4.0".into(),
            sha256: "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03".into(),
            size: 18_874_368,
            signature: "cGFja2FnZSBzaWduYXR1cmU=".into(),
        },
    )
    .unwrap();
    upgrade.signature = "c2lnbmF0dXJl".into();
    let samples: Vec<(&str, Frame)> = vec![
        (
            "server-challenge",
            Frame::Challenge(Challenge {
                nonce: "bm9uY2Utbm9uY2Utbm9uY2Utbm9uY2UtMzI=".into(),
            }),
        ),
        (
            "agent-hello",
            Frame::Hello(Hello {
                agent_id: "agent-web-1".into(),
                version: "0.1.0".into(),
                incarnation: "9f1c2b7a".into(),
                server_incarnation: "5e6d4c3b".into(),
                last_command_seq: Seq(41),
                proof: "cHJvb2Y=".into(),
                trust_serial: 0,
                ..Default::default()
            }),
        ),
        (
            "server-welcome",
            Frame::Welcome(Welcome {
                last_event_seq: Seq(17),
                server_incarnation: "5e6d4c3b".into(),
                heartbeat_interval_ms: 5000,
            }),
        ),
        (
            "server-busy",
            Frame::Busy(Busy {
                retry_after_ms: 1500,
            }),
        ),
        ("server-command", Frame::Command(cmd)),
        ("server-command-upgrade", Frame::Command(upgrade)),
        (
            "agent-event-upgrade-finished",
            Frame::Event(
                Event::new(
                    Seq(19),
                    EventBody::UpgradeFinished {
                        version: "1.4.0".into(),
                        outcome: UpgradeOutcome::RolledBack,
                        reason: "the new worker exited with code 3 before it was healthy".into(),
                    },
                )
                .unwrap(),
            ),
        ),
        (
            "agent-event",
            Frame::Event(
                Event::new(
                    Seq(18),
                    EventBody::Probe {
                        n: 18,
                        data: "ok".into(),
                    },
                )
                .unwrap(),
            ),
        ),
        (
            "agent-ack",
            Frame::Ack(Ack {
                stream: StreamId::Commands,
                upto: Seq(42),
            }),
        ),
        (
            "server-ack",
            Frame::Ack(Ack {
                stream: StreamId::Events,
                upto: Seq(18),
            }),
        ),
        (
            "server-nack",
            Frame::Nack(Nack {
                stream: StreamId::Events,
                from: Seq(19),
            }),
        ),
        (
            "agent-heartbeat",
            Frame::Heartbeat(Heartbeat {
                sent_ms: 1_790_000_000_123,
                status: Some(AgentStatus {
                    facts: None,
                    figures: None,
                    version: "0.1.0".into(),
                    running_jobs: 1,
                    load_milli: 250,
                    actors: vec![ActorHealth {
                        name: "uplink".into(),
                        kind: "Uplink".into(),
                        state: "running".into(),
                        restarts: 0,
                        last_beat_ms: 120,
                    }],
                }),
            }),
        ),
        (
            "server-heartbeat",
            Frame::Heartbeat(Heartbeat {
                sent_ms: 1_790_000_000_456,
                status: None,
            }),
        ),
        (
            "server-error",
            Frame::Error(ErrorFrame {
                code: ErrorCode::UnsupportedVersion,
                message: "unsupported protocol version 2, supported 1..=1".into(),
                details: [("supported".to_string(), "1..=1".to_string())]
                    .into_iter()
                    .collect(),
            }),
        ),
    ];
    assert_eq!(
        samples.len(),
        fixtures().len(),
        "a golden file without a sample, or the reverse"
    );
    for (name, frame) in samples {
        let path = dir.join(format!("{name}.json"));
        if bless {
            std::fs::write(&path, frame.encode().unwrap()).unwrap();
        }
        let golden = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            String::from_utf8_lossy(&frame.encode().unwrap()),
            String::from_utf8_lossy(&golden),
            "{name}"
        );
        assert_eq!(decode(&golden, sender_of(name)).unwrap(), frame, "{name}");
    }
}
