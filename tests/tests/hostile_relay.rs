//! A hostile relay (HOSTILE-INPUTS.md section 2: "Agent impersonates another agent through a
//! relay", "Relay injects or alters commands toward agents"; section 1 for its link's framing).
//!
//! The attacker is a *legitimately enrolled* relay: a real `tether-relay install` whose data
//! directory it reads (`relay.key`, its TLS certificate from the server's CA). It speaks the
//! relay link by hand (a [`WsClient`] at `/relay/v1/ws` on the server's agent-facing listener:
//! the relay's own v1 handshake, then mux frames), or it listens where its agents expect it and
//! speaks the agent surface to a real agent. Against the server it tries:
//!
//! 1. impersonation: a channel whose `Hello` names a real agent, with a proof signed by the
//!    relay's key, or replayed from another nonce, or with the wrong role;
//! 2. frames for an agent on a channel that has not finished its handshake, or was never
//!    opened, or was already refused;
//! 3. channels with a forged relay path;
//! 4. garbage on the link itself;
//! 5. an agent identity opening a relay link;
//!
//! and against an agent that has only it as upstream:
//!
//! 6. commands it minted, or genuine server-signed ones it altered or replayed.
//!
//! Each case asserts the visible refusal (error frame, channel close or link close with its
//! code; the agent's logged refusal and dropped connection) and that nothing happened: no journal commit on the server
//! (`tether_journal_commits_total`), no agent online, no link created for an agent that never
//! got through, an agent's event counters and probes unchanged, no marker file written, nothing
//! in the agent's journal. Positive controls with the same hand-made client (a real agent key
//! signing the server's nonce on a channel, a true relay path, a genuine command) prove the
//! refusals are not just a broken client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web_actors::ws;
use serde_json::{json, Value};
use tether_shared::e2e::{AgentGate, AgentStep, ServerGate, ServerStep};
use tether_shared::identity::{Identity, PublicKey};
use tether_shared::journal::{Journal, JournalOptions, LogName};
use tether_shared::mux::{
    self, ChannelKind, Mux, Open, LINK_CHANNEL, MAX_MUX_BYTES, RELAY_WS_PATH,
};
use tether_shared::protocol::{
    self, command_signing_bytes, Ack, Challenge, Command, CommandBody, ErrorCode, ErrorFrame,
    Event, EventBody, Frame, Heartbeat, OnInterrupt, Sender, Seq, StepSpec, StreamId, Welcome,
};
use tether_tests::fake_upstream;
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::relays::{relay_entry, Relay};
use tether_tests::wire::{
    agent_identity, frame_header, fresh_incarnation, health, hello, journal_commits, server_key,
    server_log, tls_config, Closed, WsClient, WsEvent, OP_BINARY,
};

/// Bound on every wait for the server (a frame, a close, a state change).
const WAIT: Duration = Duration::from_secs(10);
/// Bound on a real agent coming online or a job running.
const ONLINE: Duration = Duration::from_secs(30);
/// How long "nothing came back" is watched for.
const QUIET: Duration = Duration::from_millis(750);

// ---------------------------------------------------------------------------------------------
// The hostile relay's link to the server

/// What the server sent on a relay link.
#[derive(Debug)]
enum LinkEvent {
    /// A v1 frame on a channel (heartbeats are answered and skipped).
    Frame(u32, Frame),
    /// The server closed a channel.
    ChannelClosed(u32, u16, String),
    /// The link itself ended: its close code (`None`: dropped without one) and reason.
    Ended(Option<u16>, String),
    /// The server's answer to an agent's end-to-end handshake on a channel.
    Answer(u32, Vec<u8>),
}

/// A relay link spoken by hand with an enrolled relay's key.
struct FakeRelay {
    ws: WsClient,
    /// Agent channels' end-to-end protection, as the agent it carries would hold it.
    gates: HashMap<u32, AgentGate>,
    server_key: PublicKey,
}

impl FakeRelay {
    /// Connects to `/relay/v1/ws` and completes the relay's own handshake as `id`.
    fn connect(server: &Server, id: &str, key: &Identity) -> FakeRelay {
        let mut ws = WsClient::connect_to(server.wss, tls_config(server), RELAY_WS_PATH).unwrap();
        let nonce = ws.challenge(WAIT);
        ws.send(&Frame::Hello(hello(key, id, &nonce, ""))).unwrap();
        match ws.recv_frame("the relay link's welcome", WAIT) {
            Frame::Welcome(_) => {}
            other => panic!("relay {id}: expected a welcome, got {other:?}"),
        }
        FakeRelay {
            ws,
            gates: HashMap::new(),
            server_key: server_key(server),
        }
    }

    fn send(&mut self, frame: &Mux) {
        self.ws.send_binary(&frame.encode()).unwrap();
    }

    /// Any bytes as one binary WebSocket message.
    fn send_bytes(&mut self, bytes: &[u8]) {
        self.ws.send_binary(bytes).unwrap();
    }

    /// A v1 frame on channel `ch` (sealed on an agent channel whose handshake is done).
    fn data(&mut self, ch: u32, frame: &Frame) {
        let mut bytes = frame.encode().unwrap();
        if let Some(gate) = self.gates.get_mut(&ch).filter(|g| g.is_open()) {
            bytes = gate.seal(&bytes).unwrap();
        }
        self.send_bytes(&mux::data(ch, &bytes));
    }

    fn open(&mut self, ch: u32, kind: ChannelKind, path: &[&str]) {
        self.send(&Mux::Open {
            ch,
            open: Open {
                kind,
                path: path.iter().map(|s| s.to_string()).collect(),
                peer: "198.51.100.7:40000".into(),
            },
        });
    }

    /// The next event within `timeout`; heartbeats are skipped, and the link's own ones
    /// answered like a real relay does.
    fn next(&mut self, timeout: Duration) -> Option<LinkEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.ws.recv(left)? {
                WsEvent::Data(bytes) => {
                    let frame = Mux::decode(&bytes).unwrap_or_else(|e| {
                        panic!("the server sent an undecodable mux frame ({e}): {bytes:?}")
                    });
                    match frame {
                        Mux::Data { ch, frame } => {
                            let frame = match self.gates.get_mut(&ch) {
                                // A refusal of the handshake's last message comes in clear.
                                Some(g) if g.is_open() => match g.open_frame(&frame) {
                                    Ok(opened) => opened,
                                    Err(_) if is_clear(&frame) => frame,
                                    Err(e) => panic!("a frame on channel {ch} does not open: {e}"),
                                },
                                Some(_) if !is_clear(&frame) => {
                                    return Some(LinkEvent::Answer(ch, frame))
                                }
                                _ => frame,
                            };
                            let f = protocol::decode(&frame, Sender::Server).unwrap_or_else(|e| {
                                panic!(
                                    "undecodable frame from the server on channel {ch} ({e}): {}",
                                    String::from_utf8_lossy(&frame)
                                )
                            });
                            if let Frame::Heartbeat(_) = f {
                                if ch == LINK_CHANNEL {
                                    let _ = self.ws.send_binary(&mux::data(LINK_CHANNEL, &beat()));
                                }
                                continue;
                            }
                            // The server sends a relay its certificate at every connect (and
                            // renews it on the link): not what these tests look at.
                            if let Frame::Command(c) = &f {
                                if matches!(c.body, CommandBody::RelayCertificate { .. }) {
                                    continue;
                                }
                            }
                            return Some(LinkEvent::Frame(ch, f));
                        }
                        Mux::Close { ch, code, reason } => {
                            return Some(LinkEvent::ChannelClosed(ch, code.as_u16(), reason))
                        }
                        Mux::Open { .. } => panic!("the server opened a channel: {frame:?}"),
                    }
                }
                WsEvent::Ping(_) | WsEvent::Pong(_) => {}
                WsEvent::Close(code, reason) => return Some(LinkEvent::Ended(code, reason)),
                WsEvent::Dropped(reason) => return Some(LinkEvent::Ended(None, reason)),
            }
        }
    }

    fn expect(&mut self, what: &str) -> LinkEvent {
        self.next(WAIT)
            .unwrap_or_else(|| panic!("waiting for {what}: nothing within {WAIT:?}"))
    }

    /// Opens channel `ch` and gets it accepted: a child relay's challenge nonce; for an
    /// agent's, the server's answer to the end-to-end handshake's first message (the nonce
    /// comes once the handshake is done, see [`FakeRelay::open_as`]).
    fn open_challenged(&mut self, ch: u32, kind: ChannelKind, path: &[&str]) -> String {
        self.open(ch, kind, path);
        if kind == ChannelKind::Relay {
            return match self.expect("a channel's challenge") {
                LinkEvent::Frame(c, Frame::Challenge(Challenge { nonce })) if c == ch => nonce,
                other => panic!("channel {ch}: expected a challenge, got {other:?}"),
            };
        }
        let (gate, first) = AgentGate::start().unwrap();
        self.gates.insert(ch, gate);
        self.send_bytes(&mux::data(ch, &first));
        match self.expect("the handshake's answer") {
            LinkEvent::Answer(c, answer) if c == ch => hex::encode(answer),
            other => panic!("channel {ch}: expected the handshake's answer, got {other:?}"),
        }
    }

    /// Opens agent channel `ch` and runs its end-to-end handshake as `id` signing with `key`:
    /// the challenge nonce, or the server's refusal.
    fn open_as(
        &mut self,
        ch: u32,
        path: &[&str],
        id: &str,
        key: &Identity,
    ) -> Result<String, (ErrorFrame, u16, String)> {
        let answer = hex::decode(self.open_challenged(ch, ChannelKind::Agent, path)).unwrap();
        let trusted = [self.server_key];
        let gate = self.gates.get_mut(&ch).unwrap();
        let last = match gate.on_message(&answer, &trusted, id, key) {
            Ok(AgentStep::Send(last)) => last,
            other => panic!("channel {ch}: {other:?}"),
        };
        self.send_bytes(&mux::data(ch, &last));
        match self.expect("the challenge or a refusal") {
            LinkEvent::Frame(c, Frame::Challenge(Challenge { nonce })) if c == ch => Ok(nonce),
            LinkEvent::Frame(c, Frame::Error(e)) if c == ch => match self.expect("the close") {
                LinkEvent::ChannelClosed(c, code, reason) if c == ch => Err((e, code, reason)),
                other => panic!("channel {ch}: expected its close, got {other:?}"),
            },
            other => panic!("channel {ch}: expected a challenge or a refusal, got {other:?}"),
        }
    }

    /// Channel `ch`'s peer refused: an error frame on it, then its close (the link stays).
    fn expect_refused(&mut self, case: &str, ch: u32) -> (ErrorFrame, u16, String) {
        let error = loop {
            match self.expect(case) {
                LinkEvent::Frame(c, Frame::Error(e)) if c == ch => break e,
                // A resumed session's ack may come first.
                LinkEvent::Frame(c, Frame::Ack(_)) if c == ch => {}
                other => panic!("{case}: expected an error frame on channel {ch}, got {other:?}"),
            }
        };
        match self.expect(case) {
            LinkEvent::ChannelClosed(c, code, reason) if c == ch => (error, code, reason),
            other => panic!("{case}: expected channel {ch} closed, got {other:?}"),
        }
    }

    /// Channel `ch` closed without any frame on it first (an `Open` refused).
    fn expect_channel_closed(&mut self, case: &str, ch: u32) -> (u16, String) {
        match self.expect(case) {
            LinkEvent::ChannelClosed(c, code, reason) if c == ch => (code, reason),
            other => panic!("{case}: expected channel {ch} closed at once, got {other:?}"),
        }
    }

    /// Nothing but heartbeats comes back for a while.
    fn expect_silence(&mut self, case: &str) {
        if let Some(e) = self.next(QUIET) {
            panic!("{case}: expected no answer, got {e:?}");
        }
    }

    /// The link ends: its close code, reason, and the error frames sent on channel 0 first.
    fn expect_link_end(&mut self, case: &str) -> (Option<u16>, String, Vec<ErrorFrame>) {
        let mut errors = Vec::new();
        loop {
            match self.expect(case) {
                LinkEvent::Frame(LINK_CHANNEL, Frame::Error(e)) => errors.push(e),
                LinkEvent::Ended(code, reason) => return (code, reason, errors),
                other => panic!("{case}: expected the link to close, got {other:?}"),
            }
        }
    }
}

/// A frame in clear (JSON that decodes), not a handshake message that happens to start with `{`.
fn is_clear(bytes: &[u8]) -> bool {
    bytes.first() == Some(&b'{') && protocol::decode(bytes, Sender::Server).is_ok()
}

/// A relay's heartbeat, encoded.
fn beat() -> Vec<u8> {
    Frame::Heartbeat(Heartbeat {
        sent_ms: now_ms(),
        status: None,
    })
    .encode()
    .unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `tether-relay install` against `server` (not run): the relay and its private key, as a
/// compromised relay host holds them.
fn install_relay(server: &Server, root: &Path, name: &str) -> (Relay, Identity) {
    let relay = Relay::install(server, &[server.upstream()], root, name, &[]);
    let key = Identity::load(&relay.dir.join("relay.key")).unwrap();
    (relay, key)
}

/// What the server's health says relay `id`'s current link holds (`null` if it has none).
fn link_stats(server: &Server, id: &str) -> Value {
    health(server)["relay_links"][id].clone()
}

fn relay_status(server: &Server, name: &str) -> String {
    relay_entry(server, name)
        .and_then(|r| r["status"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn probe_event(seq: u64, n: u64) -> Event {
    Event::new(
        Seq(seq),
        EventBody::Probe {
            n,
            data: format!("smuggled {n}"),
        },
    )
    .unwrap()
}

/// Builds a message's bytes from a connection's nonce.
type MakeBytes<'a> = dyn Fn(&str) -> Vec<u8> + 'a;

/// Asserts an error frame of `code` whose message contains `needle`.
fn assert_error(case: &str, e: &ErrorFrame, code: ErrorCode, needle: &str) {
    assert_eq!(e.code, code, "{case}: error code; {e:?}");
    assert!(
        e.message.contains(needle),
        "{case}: error message {:?} should contain {needle:?}",
        e.message
    );
}

// ---------------------------------------------------------------------------------------------
// Cases 1 and 2: impersonation, and frames for an agent outside a finished handshake

#[test]
fn a_relay_cannot_impersonate_an_agent_or_speak_for_it_before_its_handshake() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let (relay, rkey) = install_relay(&server, tmp.path(), "relay-a");
    // An agent with a history: a link on the server, events and probes received.
    let mut known = Agent::install(&server, tmp.path(), "known-1", &[]);
    known.run();
    eventually("known-1 online", ONLINE, || {
        (server.agent_status(&known.id) == "online").then_some(())
    });
    server.queue_probes(&known.id, 3, 3);
    let probes = server.wait_for_probes(&known.id, 3, 3, ONLINE);
    known.stop();
    eventually("known-1 offline", WAIT, || {
        (server.agent_status(&known.id) == "offline").then_some(())
    });
    let known_key = agent_identity(&known.dir);
    // An agent that never connected.
    let fresh = Agent::install(&server, tmp.path(), "fresh-1", &[]);
    let fresh_key = agent_identity(&fresh.dir);

    let mut link = FakeRelay::connect(&server, &relay.id, &rkey);
    eventually("relay-a online", WAIT, || {
        (relay_status(&server, "relay-a") == "online").then_some(())
    });
    let events_received = health(&server)["agents"][&known.id]["events_received"].clone();
    assert!(
        events_received.as_u64().is_some_and(|n| n >= 6),
        "known-1's link: {}",
        health(&server)
    );
    let commits = journal_commits(&server);
    let me = [relay.id.as_str()];
    let inc = fresh_incarnation();
    let mut opened = 0;

    // 1. Impersonation. On an agent's channel the agent speaks first, with the end-to-end
    //    handshake signed by its own key: a relay holding only its own key is refused there,
    //    before any Hello, whatever agent it names. (And it never sees a Hello in clear, so
    //    it has none to replay.)
    let cases: [(&str, &str, &str); 4] = [
        (
            "relay-signed handshake for fresh-1",
            &fresh.id,
            "did not sign its key",
        ),
        (
            "relay-signed handshake for known-1",
            &known.id,
            "did not sign its key",
        ),
        (
            "the relay's own identity on an agent channel",
            &relay.id,
            "unknown agent",
        ),
        (
            "an id nobody enrolled",
            "a-00000000deadbeef",
            "unknown agent",
        ),
    ];
    for (i, (case, id, needle)) in cases.iter().enumerate() {
        let ch = 1 + i as u32;
        let (e, code, reason) = link
            .open_as(ch, &me, id, &rkey)
            .expect_err("a relay passed an agent's handshake");
        opened += 1;
        eprintln!("{case}: {e:?} close {code} {reason:?}");
        assert_error(case, &e, ErrorCode::Unauthorized, needle);
        assert_eq!(code, 1008, "{case}");
    }
    // On a relay's channel (no end-to-end layer: a child relay speaks for itself), an agent's
    // genuine proof is refused as not a relay's.
    let captured = hello(&known_key, &known.id, "a nonce seen elsewhere", &inc);
    link.open_challenged(5, ChannelKind::Relay, &me);
    opened += 1;
    link.data(5, &Frame::Hello(captured.clone()));
    let (e, code, _) = link.expect_refused("known-1's proof on a relay channel", 5);
    assert_error(
        "proof on a relay channel",
        &e,
        ErrorCode::Unauthorized,
        "not a relay identity",
    );
    assert_eq!(code, 1008);

    // 2. Frames for an agent in place of the handshake's last message: refused, the channel
    //    closed; never handed to the agent's link.
    let steps: [(&str, Vec<u8>); 3] = [
        (
            "an event for known-1 instead of the handshake",
            Frame::Event(probe_event(7, 4)).encode().unwrap(),
        ),
        (
            "a welcome (server-only kind) instead of the handshake",
            Frame::Welcome(Welcome {
                last_event_seq: Seq::ZERO,
                server_incarnation: "x".into(),
                heartbeat_interval_ms: 1000,
            })
            .encode()
            .unwrap(),
        ),
        (
            "an undecodable frame instead of the handshake",
            b"{\"v\":1,\"kind\":\"event\",".to_vec(),
        ),
    ];
    for (i, (case, bytes)) in steps.iter().enumerate() {
        let ch = 10 + i as u32;
        link.open_challenged(ch, ChannelKind::Agent, &me);
        opened += 1;
        link.send_bytes(&mux::data(ch, bytes));
        let (e, code, _) = link.expect_refused(case, ch);
        eprintln!("{case}: {e:?} close {code}");
        assert_error(case, &e, ErrorCode::Unauthorized, "end-to-end handshake");
        assert_eq!(code, 1008, "{case}");
    }

    // Frames on channels that are not open: one never opened, and the refused ones. Ignored
    // (counted), no answer, and in particular no welcome for the hello signed by the agent.
    let unknown_frames: [(u32, Frame); 4] = [
        (99, Frame::Event(probe_event(7, 5))),
        (99, Frame::Hello(captured.clone())),
        (1, Frame::Event(probe_event(7, 6))),
        (3, Frame::Hello(captured.clone())),
    ];
    for (ch, frame) in &unknown_frames {
        link.data(*ch, frame);
    }
    link.expect_silence("frames on channels that are not open");

    // The link itself survived all of this, and nothing happened.
    assert!(link.ws.answers_ping(WAIT), "the relay link was closed");
    let stats = link_stats(&server, &relay.id);
    eprintln!("link: {stats}");
    assert_eq!(stats["channels_opened"], opened, "{stats}");
    assert_eq!(stats["channels_refused"], 0, "{stats}");
    assert_eq!(
        stats["handshaking"], 0,
        "a refused channel lingers: {stats}"
    );
    assert_eq!(stats["agents"], 0, "{stats}");
    assert_eq!(
        stats["unknown_channel_frames"],
        unknown_frames.len(),
        "{stats}"
    );
    assert_eq!(
        journal_commits(&server),
        commits,
        "a hostile relay's channels were journaled"
    );
    let h = health(&server);
    assert_eq!(h["sessions"], 1, "only the relay link is a session: {h}");
    assert!(
        h["agents"].get(&fresh.id).is_none(),
        "a link was created for fresh-1: {h}"
    );
    assert_eq!(
        h["agents"][&known.id]["events_received"], events_received,
        "known-1's events: {h}"
    );
    assert_eq!(h["agents"][&known.id]["connected"], false, "{h}");
    assert_eq!(server.probes(&known.id), probes, "known-1's probes changed");
    for a in [&known, &fresh] {
        assert_eq!(server.agent_status(&a.id), "offline", "{}", a.name);
    }
    assert_eq!(relay_entry(&server, "relay-a").unwrap()["agents"], 0);
    eventually("the refusals in the server log", WAIT, || {
        let log = server_log(&server);
        (log.matches("channel-refused").count() >= opened).then_some(())
    });

    // The positive control, on the same link: fresh-1's own key signing the server's nonce for
    // its channel is welcomed, and fresh-1 is online through relay-a.
    let nonce = link.open_as(20, &me, &fresh.id, &fresh_key).unwrap();
    link.data(
        20,
        &Frame::Hello(hello(&fresh_key, &fresh.id, &nonce, &inc)),
    );
    match link.expect("the welcome on channel 20") {
        LinkEvent::Frame(20, Frame::Welcome(w)) => {
            assert_eq!(w.last_event_seq, Seq::ZERO, "{w:?}")
        }
        other => panic!("control: expected a welcome on channel 20, got {other:?}"),
    }
    eventually("fresh-1 online through relay-a", WAIT, || {
        server
            .agent(&fresh.id)
            .filter(|a| a["status"] == "online" && a["path"] == json!(["relay-a"]))
    });
    assert_eq!(link_stats(&server, &relay.id)["agents"], 1);
    // The relay closes that channel: fresh-1 is offline again.
    link.send(&Mux::Close {
        ch: 20,
        code: tether_shared::close::CloseCode::Normal,
        reason: "agent left".into(),
    });
    eventually("fresh-1 offline after its channel closed", WAIT, || {
        (server.agent_status(&fresh.id) == "offline").then_some(())
    });
}

// ---------------------------------------------------------------------------------------------
// Case 3: forged relay paths

#[test]
fn a_relay_cannot_claim_a_path_it_does_not_carry() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let (a, a_key) = install_relay(&server, tmp.path(), "relay-a");
    let (b, b_key) = install_relay(&server, tmp.path(), "relay-b");
    let (c, c_key) = install_relay(&server, tmp.path(), "relay-c");
    let mut link_a = FakeRelay::connect(&server, &a.id, &a_key);
    let mut link_c = FakeRelay::connect(&server, &c.id, &c_key);
    eventually("relay-a and relay-c online", WAIT, || {
        (relay_status(&server, "relay-a") == "online"
            && relay_status(&server, "relay-c") == "online")
            .then_some(())
    });
    let commits = journal_commits(&server);
    let (a_id, b_id, c_id) = (a.id.as_str(), b.id.as_str(), c.id.as_str());

    // Each refused Open gets a close on its channel, no challenge; the channel does not exist
    // afterwards (a hello on it is ignored).
    let not_through = "is not connected through this path";
    let not_last = "the path must end with the relay that opens the channel";
    let forged: [(&str, ChannelKind, Vec<&str>, String); 6] = [
        (
            "a relay nobody enrolled before us",
            ChannelKind::Agent,
            vec!["r-00000000deadbeef", a_id],
            format!("relay r-00000000deadbeef {not_through}"),
        ),
        (
            "relay-c, online on its own link, claimed behind us",
            ChannelKind::Agent,
            vec![c_id, a_id],
            format!("relay {c_id} {not_through}"),
        ),
        (
            "relay-b, enrolled but offline, claimed behind us",
            ChannelKind::Agent,
            vec![b_id, a_id],
            format!("relay {b_id} {not_through}"),
        ),
        (
            "a child relay's channel through relay-c",
            ChannelKind::Relay,
            vec![c_id, a_id],
            format!("relay {c_id} {not_through}"),
        ),
        (
            "a path not ending with us",
            ChannelKind::Agent,
            vec![a_id, c_id],
            not_last.to_owned(),
        ),
        (
            "a path naming another relay only",
            ChannelKind::Agent,
            vec![c_id],
            not_last.to_owned(),
        ),
    ];
    for (i, (case, kind, path, want)) in forged.iter().enumerate() {
        let ch = 1 + i as u32;
        link_a.open(ch, *kind, path);
        let (code, reason) = link_a.expect_channel_closed(case, ch);
        eprintln!("{case}: close {code} {reason:?}");
        assert_eq!(code, 1008, "{case}");
        assert_eq!(&reason, want, "{case}");
        link_a.data(ch, &Frame::Hello(hello(&a_key, a_id, "no nonce", "")));
        link_a.expect_silence(case);
    }
    let stats = link_stats(&server, a_id);
    assert_eq!(stats["channels_opened"], 0, "{stats}");
    assert_eq!(stats["channels_refused"], forged.len(), "{stats}");
    assert_eq!(stats["handshaking"], 0, "{stats}");
    assert_eq!(stats["unknown_channel_frames"], forged.len(), "{stats}");

    // The control: relay-b really connects through relay-a (a relay channel, relay-b's own key
    // signing the server's nonce). Then [relay-b, relay-a] is a true path and is challenged...
    let nonce = link_a.open_challenged(10, ChannelKind::Relay, &[a_id]);
    link_a.data(10, &Frame::Hello(hello(&b_key, b_id, &nonce, "")));
    match link_a.expect("relay-b's welcome") {
        LinkEvent::Frame(10, Frame::Welcome(_)) => {}
        other => panic!("control: expected relay-b's welcome, got {other:?}"),
    }
    let entry = eventually("relay-b online through relay-a", WAIT, || {
        relay_entry(&server, "relay-b").filter(|r| r["status"] == "online")
    });
    assert_eq!(entry["path"], json!(["relay-a"]), "{entry}");
    link_a.open_challenged(11, ChannelKind::Agent, &[b_id, a_id]);
    link_a.send(&Mux::Close {
        ch: 11,
        code: tether_shared::close::CloseCode::Normal,
        reason: "control done".into(),
    });

    // ...but relay-c cannot claim relay-b, which is connected through relay-a, not through it;
    // nor can relay-a put relay-c in front of relay-b.
    link_c.open(1, ChannelKind::Agent, &[b_id, c_id]);
    let (code, reason) = link_c.expect_channel_closed("relay-b claimed by relay-c", 1);
    assert_eq!(
        (code, reason),
        (1008, format!("relay {b_id} {not_through}"))
    );
    link_a.open(12, ChannelKind::Agent, &[c_id, b_id, a_id]);
    let (code, reason) = link_a.expect_channel_closed("relay-c claimed behind relay-b", 12);
    assert_eq!(
        (code, reason),
        (1008, format!("relay {c_id} {not_through}"))
    );
    // A relay cannot come through itself: relay-a's own key on its own relay channel.
    let nonce = link_a.open_challenged(13, ChannelKind::Relay, &[a_id]);
    link_a.data(13, &Frame::Hello(hello(&a_key, a_id, &nonce, "")));
    let (e, code, _) = link_a.expect_refused("relay loop", 13);
    assert_error("relay loop", &e, ErrorCode::ProtocolViolation, "relay loop");
    assert_eq!(code, 1008);

    let stats = link_stats(&server, a_id);
    assert_eq!(stats["channels_opened"], 3, "{stats}");
    assert_eq!(stats["channels_refused"], forged.len() + 1, "{stats}");
    assert_eq!(stats["relays"], 1, "{stats}");
    assert_eq!(link_stats(&server, c_id)["channels_refused"], 1);
    assert_eq!(
        journal_commits(&server),
        commits,
        "forged paths were journaled"
    );
    assert_eq!(relay_entry(&server, "relay-a").unwrap()["path"], json!([]));
    assert_eq!(relay_entry(&server, "relay-c").unwrap()["path"], json!([]));
    assert!(link_a.ws.answers_ping(WAIT) && link_c.ws.answers_ping(WAIT));
    let log = server_log(&server);
    assert!(log.contains(not_through), "no refusal logged");

    // relay-a drops relay-b's channel: relay-b is offline, and so is the path through it.
    link_a.send(&Mux::Close {
        ch: 10,
        code: tether_shared::close::CloseCode::Normal,
        reason: "child left".into(),
    });
    eventually("relay-b offline", WAIT, || {
        (relay_status(&server, "relay-b") == "offline").then_some(())
    });
    link_a.open(14, ChannelKind::Agent, &[b_id, a_id]);
    let (code, _) = link_a.expect_channel_closed("relay-b's old path", 14);
    assert_eq!(code, 1008);
}

// ---------------------------------------------------------------------------------------------
// Case 4: garbage on the link

/// A relay link carrying an agent is sent garbage: the link is closed with a close code and an
/// error frame on channel 0, the relay and the agent it carried go offline. Then every other
/// kind of garbage, each on a fresh link.
#[test]
fn garbage_on_a_relay_link_closes_it_and_the_relay_goes_offline() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let (relay, rkey) = install_relay(&server, tmp.path(), "relay-a");
    let agent = Agent::install(&server, tmp.path(), "carried-1", &[]);
    let agent_key = agent_identity(&agent.dir);
    let id = relay.id.clone();

    let connect = || {
        let link = FakeRelay::connect(&server, &id, &rkey);
        eventually("relay-a online", WAIT, || {
            (relay_status(&server, "relay-a") == "online").then_some(())
        });
        link
    };
    let assert_gone = |case: &str| {
        eventually(
            &format!("{case}: relay-a offline, its link gone"),
            WAIT,
            || {
                let h = health(&server);
                (relay_status(&server, "relay-a") == "offline"
                    && h["relay_links"].get(&id).is_none()
                    && h["sessions"] == 0)
                    .then_some(())
            },
        );
    };
    let check_end = |case: &str,
                     end: &(Option<u16>, String, Vec<ErrorFrame>),
                     want: u16,
                     error: ErrorCode,
                     needle: &str,
                     drop_ok: bool| {
        eprintln!("{case}: {end:?}");
        let (code, _, errors) = end;
        match code {
            Some(c) => {
                assert_eq!(*c, want, "{case}: close code; {end:?}");
                let e = errors
                    .first()
                    .unwrap_or_else(|| panic!("{case}: no error frame on channel 0; {end:?}"));
                assert_error(case, e, error, needle);
            }
            None => assert!(drop_ok, "{case}: dropped without a close frame; {end:?}"),
        }
    };

    // First, with an agent on the link (the control of a channel that works).
    let mut link = connect();
    let nonce = link.open_as(1, &[&id], &agent.id, &agent_key).unwrap();
    link.data(
        1,
        &Frame::Hello(hello(&agent_key, &agent.id, &nonce, &fresh_incarnation())),
    );
    match link.expect("carried-1's welcome") {
        LinkEvent::Frame(1, Frame::Welcome(_)) => {}
        other => panic!("expected carried-1's welcome, got {other:?}"),
    }
    eventually("carried-1 online through relay-a", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    let commits = journal_commits(&server);
    link.send_bytes(&[9, 0, 0, 0, 1, b'x']);
    let end = link.expect_link_end("unknown mux kind with an agent on the link");
    check_end(
        "unknown mux kind",
        &end,
        1008,
        ErrorCode::Malformed,
        "unknown mux frame kind 9",
        false,
    );
    assert_gone("unknown mux kind");
    eventually("carried-1 offline with its relay", WAIT, || {
        (server.agent_status(&agent.id) == "offline").then_some(())
    });

    let open_json = |ch: u32, json: &str| {
        let mut b = vec![1];
        b.extend_from_slice(&ch.to_be_bytes());
        b.extend_from_slice(json.as_bytes());
        b
    };
    let long_path: Vec<String> = (0..9).map(|i| format!("r-{i:016x}")).collect();
    let long_path = json!({"kind": "agent", "path": long_path}).to_string();
    let v1_heartbeat = beat();
    let event = Frame::Event(probe_event(1, 1)).encode().unwrap();
    let relay_hello = Frame::Hello(hello(&rkey, &id, "nonce", ""))
        .encode()
        .unwrap();
    let server_only = Frame::Welcome(Welcome {
        last_event_seq: Seq::ZERO,
        server_incarnation: "x".into(),
        heartbeat_interval_ms: 1000,
    })
    .encode()
    .unwrap();
    let cases: Vec<(&str, Vec<u8>, u16, ErrorCode, &str)> = vec![
        (
            "a short frame (3 bytes)",
            vec![2, 0, 0],
            1008,
            ErrorCode::Malformed,
            "shorter than its 5-byte header",
        ),
        (
            "an empty message",
            Vec::new(),
            1008,
            ErrorCode::Malformed,
            "mux frame of 0 bytes",
        ),
        (
            "a bare v1 frame without the mux header",
            v1_heartbeat,
            1008,
            ErrorCode::Malformed,
            "unknown mux frame kind 123",
        ),
        (
            "an Open on channel 0",
            open_json(0, &json!({"kind": "agent", "path": [id]}).to_string()),
            1008,
            ErrorCode::Malformed,
            "channel 0 is the link itself",
        ),
        (
            "a Close of channel 0",
            vec![3, 0, 0, 0, 0, 3, 232],
            1008,
            ErrorCode::Malformed,
            "channel 0 is the link itself",
        ),
        (
            "an Open with undecodable JSON",
            open_json(5, "{\"kind\":"),
            1008,
            ErrorCode::Malformed,
            "bad open",
        ),
        (
            "an Open with 9 relays on its path",
            open_json(5, &long_path),
            1008,
            ErrorCode::Malformed,
            "path must name 1 to 8 relays, got 9",
        ),
        (
            "an Open with an empty path",
            open_json(5, r#"{"kind":"agent","path":[]}"#),
            1008,
            ErrorCode::Malformed,
            "got 0",
        ),
        (
            "an Open with an unknown field",
            open_json(
                5,
                &json!({"kind": "agent", "path": [id], "exec": "id"}).to_string(),
            ),
            1008,
            ErrorCode::Malformed,
            "bad open",
        ),
        (
            "an Open of an unknown kind",
            open_json(5, &json!({"kind": "admin", "path": [id]}).to_string()),
            1008,
            ErrorCode::Malformed,
            "bad open",
        ),
        (
            "a Close whose reason is not UTF-8",
            vec![3, 0, 0, 0, 5, 3, 232, 0xff, 0xfe],
            1008,
            ErrorCode::Malformed,
            "bad close",
        ),
        (
            "an agent's event on the link channel",
            mux::data(LINK_CHANNEL, &event),
            1008,
            ErrorCode::ProtocolViolation,
            "unexpected event frame on the link channel",
        ),
        (
            "a second hello on the link channel",
            mux::data(LINK_CHANNEL, &relay_hello),
            1008,
            ErrorCode::ProtocolViolation,
            "unexpected hello frame on the link channel",
        ),
        (
            "a server-only frame on the link channel",
            mux::data(LINK_CHANNEL, &server_only),
            1008,
            ErrorCode::ProtocolViolation,
            "may not be sent by the agent",
        ),
        (
            "an undecodable v1 frame on the link channel",
            mux::data(LINK_CHANNEL, b"\x00not json"),
            1002,
            ErrorCode::Malformed,
            "malformed frame",
        ),
    ];
    for (case, bytes, code, error, needle) in &cases {
        let mut link = connect();
        link.send_bytes(bytes);
        let end = link.expect_link_end(case);
        check_end(case, &end, *code, *error, needle, false);
        assert_gone(case);
    }

    // Oversized: one byte over the largest mux frame, and a header declaring 2^62 bytes (refused
    // from the header alone). The server may close while the payload is still being written.
    let mut link = connect();
    let _ = link.ws.send_binary(&vec![2u8; MAX_MUX_BYTES + 1]);
    let end = link.expect_link_end("MAX_MUX_BYTES + 1");
    check_end(
        "MAX_MUX_BYTES + 1",
        &end,
        1009,
        ErrorCode::Malformed,
        "size limit",
        true,
    );
    assert_gone("MAX_MUX_BYTES + 1");
    let mut link = connect();
    let mut raw = frame_header(OP_BINARY, true, 1 << 62);
    raw.extend_from_slice(&[1, 2, 3, 4]);
    link.ws.send_raw(&raw).unwrap();
    let started = Instant::now();
    let end = link.expect_link_end("a header declaring 2^62 bytes");
    assert!(started.elapsed() < Duration::from_secs(5), "{end:?}");
    check_end(
        "2^62 bytes declared",
        &end,
        1009,
        ErrorCode::Malformed,
        "size limit",
        true,
    );
    assert_gone("2^62 bytes declared");

    assert_eq!(journal_commits(&server), commits, "garbage was journaled");
    assert_eq!(server.agent_status(&agent.id), "offline");
    eventually("the link refusals in the server log", WAIT, || {
        let log = server_log(&server);
        (log.matches("relay-link-refused").count() > cases.len() + 2).then_some(())
    });

    // The control: a link that behaves stays up past the server's heartbeat interval (5 s),
    // its heartbeats answered.
    let mut link = connect();
    if let Some(e) = link.next(Duration::from_secs(6)) {
        panic!("a quiet link: expected nothing but heartbeats, got {e:?}");
    }
    assert!(link.ws.answers_ping(WAIT));
    assert_eq!(relay_status(&server, "relay-a"), "online");
}

// ---------------------------------------------------------------------------------------------
// Case 5: only a relay identity opens a relay link

/// The mirror case, a relay identity at `/agent/v1/ws`, is covered in hostile_peers.rs
/// (`hellos_that_do_not_prove_a_registered_agent_are_refused`: "not an agent identity").
#[test]
fn only_an_enrolled_relay_identity_opens_a_relay_link() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let (relay, rkey) = install_relay(&server, tmp.path(), "relay-a");
    let agent = Agent::install(&server, tmp.path(), "agent-1", &[]);
    let agent_key = agent_identity(&agent.dir);
    let stranger = Identity::generate();
    let commits = journal_commits(&server);

    let connect = || {
        let mut ws = WsClient::connect_to(server.wss, tls_config(&server), RELAY_WS_PATH).unwrap();
        let nonce = ws.challenge(WAIT);
        (ws, nonce)
    };
    // A genuine relay hello, over the nonce of a connection that is then abandoned.
    let (abandoned, old_nonce) = connect();
    let captured = hello(&rkey, &relay.id, &old_nonce, "");
    drop(abandoned);

    let hello_bytes = |h: protocol::Hello| Frame::Hello(h).encode().unwrap();
    let cases: [(&str, &MakeBytes, u16, ErrorCode, &str); 6] = [
        (
            "an agent's own valid proof",
            &|n| hello_bytes(hello(&agent_key, &agent.id, n, "")),
            1008,
            ErrorCode::Unauthorized,
            "not a relay identity",
        ),
        (
            "an id nobody enrolled",
            &|n| hello_bytes(hello(&stranger, "r-00000000deadbeef", n, "")),
            1008,
            ErrorCode::Unauthorized,
            "unknown relay",
        ),
        (
            "the relay's id, another key",
            &|n| hello_bytes(hello(&stranger, &relay.id, n, "")),
            1008,
            ErrorCode::Unauthorized,
            "bad proof signature",
        ),
        (
            "the relay's proof over another connection's nonce",
            &|_| hello_bytes(captured.clone()),
            1008,
            ErrorCode::Unauthorized,
            "bad proof signature",
        ),
        (
            "a mux Open instead of the hello",
            &|_| {
                Mux::Open {
                    ch: 1,
                    open: Open {
                        kind: ChannelKind::Agent,
                        path: vec![relay.id.clone()],
                        peer: String::new(),
                    },
                }
                .encode()
            },
            1002,
            ErrorCode::Malformed,
            "malformed frame",
        ),
        (
            "an event instead of the hello",
            &|_| Frame::Event(probe_event(1, 1)).encode().unwrap(),
            1008,
            ErrorCode::ProtocolViolation,
            "expected hello, got event",
        ),
    ];
    for (case, make, code, error, needle) in cases {
        let (mut ws, nonce) = connect();
        ws.send_binary(&make(&nonce)).unwrap();
        let closed: Closed = ws.expect_close(WAIT);
        eprintln!("{case}: {closed:?}");
        assert_eq!(closed.code, Some(code), "{case}: {closed:?}");
        let e = closed
            .error()
            .unwrap_or_else(|| panic!("{case}: no error frame; {closed:?}"));
        assert_error(case, e, error, needle);
        assert!(
            closed.frames.iter().all(|f| matches!(f, Frame::Error(_))),
            "{case}: {closed:?}"
        );
    }

    eventually("no session left", WAIT, || {
        (health(&server)["sessions"] == 0).then_some(())
    });
    let h = health(&server);
    assert_eq!(h["relay_links"], json!({}), "{h}");
    assert!(h["agents"].get(&agent.id).is_none(), "{h}");
    assert_eq!(relay_status(&server, "relay-a"), "offline");
    assert!(
        relay_entry(&server, "relay-a").unwrap()["last_seen"].is_null(),
        "relay-a was seen"
    );
    assert_eq!(server.agent_status(&agent.id), "offline");
    assert_eq!(journal_commits(&server), commits, "refused links journaled");
    eventually("the refusals in the server log", WAIT, || {
        let log = server_log(&server);
        (log.contains("not a relay identity") && log.contains("unknown relay")).then_some(())
    });

    // The control: the relay's own key over this connection's nonce opens the link.
    let mut link = FakeRelay::connect(&server, &relay.id, &rkey);
    eventually("relay-a online", WAIT, || {
        (relay_status(&server, "relay-a") == "online").then_some(())
    });
    assert!(link.ws.answers_ping(WAIT));
}

// ---------------------------------------------------------------------------------------------
// Case 6: commands towards an agent

/// What the hostile relay saw from its agent.
#[derive(Default)]
struct AgentSide {
    hellos: usize,
    /// Sessions that ended.
    ended: usize,
    /// The agent's error frames (its refusals), in order.
    errors: Vec<String>,
    events: Vec<EventBody>,
    /// The agent's cumulative ack of the commands stream.
    commands_acked: u64,
    /// The session welcomed last, while it lasts.
    current: Option<Addr<HostileSession>>,
}

/// One downstream session of the hostile relay: challenge, welcome, then whatever the test
/// injects.
struct HostileSession {
    seen: Arc<Mutex<AgentSide>>,
    /// The key it answers the agent's end-to-end handshake with: its own (what a hostile
    /// relay has), or the server's (a stand-in for a relay that somehow got past that layer,
    /// to show that commands are still checked on their own).
    signer: Arc<Identity>,
    agent: PublicKey,
    gate: ServerGate,
}

#[derive(Message)]
#[rtype(result = "()")]
struct Inject(Vec<u8>);

impl Actor for HostileSession {
    type Context = ws::WebsocketContext<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        self.seen.lock().unwrap().ended += 1;
    }
}

impl Handler<Inject> for HostileSession {
    type Result = ();
    fn handle(&mut self, msg: Inject, ctx: &mut Self::Context) {
        ctx.binary(self.gate.seal(&msg.0).unwrap());
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for HostileSession {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let bytes = match msg {
            Ok(ws::Message::Binary(b)) => b.to_vec(),
            Ok(ws::Message::Text(t)) => t.as_bytes().to_vec(),
            Ok(ws::Message::Close(_)) | Err(_) => return ctx.stop(),
            _ => return,
        };
        let agent = self.agent;
        let bytes = match self.gate.on_message(&bytes, &self.signer, |_| Some(agent)) {
            Ok(ServerStep::Reply(answer)) => return ctx.binary(answer),
            Ok(ServerStep::Established(_)) => {
                let nonce = hex::encode(rand::random::<[u8; 16]>());
                let challenge = Frame::Challenge(Challenge { nonce }).encode().unwrap();
                return ctx.binary(self.gate.seal(&challenge).unwrap());
            }
            Ok(ServerStep::Frame(frame)) => frame,
            Err(_) => return ctx.stop(),
        };
        let Ok(frame) = protocol::decode(&bytes, Sender::Agent) else {
            return;
        };
        let mut seen = self.seen.lock().unwrap();
        match frame {
            Frame::Hello(_) => {
                seen.hellos += 1;
                seen.current = Some(ctx.address());
                let welcome = Welcome {
                    last_event_seq: Seq::ZERO,
                    server_incarnation: "hostile-relay".into(),
                    heartbeat_interval_ms: 5000,
                };
                drop(seen);
                let welcome = Frame::Welcome(welcome).encode().unwrap();
                ctx.binary(self.gate.seal(&welcome).unwrap());
            }
            Frame::Event(e) => seen.events.push(e.body),
            Frame::Error(e) => seen.errors.push(e.message),
            Frame::Ack(Ack {
                stream: StreamId::Commands,
                upto,
            }) => seen.commands_acked = seen.commands_acked.max(upto.0),
            _ => {}
        }
    }
}

/// Serves the agent surface at `addr` with `cert`/`key` to the agent whose key is `agent`,
/// answering its end-to-end handshake with `signer`; returns what it sees.
fn hostile_downstream(
    addr: std::net::SocketAddr,
    cert: String,
    key: String,
    signer: Identity,
    agent: PublicKey,
) -> Arc<Mutex<AgentSide>> {
    let seen = Arc::new(Mutex::new(AgentSide::default()));
    let shared = seen.clone();
    let signer = Arc::new(signer);
    fake_upstream::serve_with(addr, &cert, &key, move || HostileSession {
        seen: shared.clone(),
        signer: signer.clone(),
        agent,
        gate: ServerGate::default(),
    });
    seen
}

/// An agent whose only upstream is relay-a (not yet running); relay-a is then replaced by a
/// hostile downstream holding its TLS certificate and key, which answers the agent's end-to-end
/// handshake with the server's command-signing key (`with_server_key`) or with relay-a's own.
/// Returns the agent, relay-a's key and what the hostile side sees.
fn agent_behind_hostile_relay(
    tmp: &TestDir,
    server: &Server,
    with_server_key: bool,
) -> (Agent, Identity, Arc<Mutex<AgentSide>>) {
    let mut relay = Relay::start(server, &[server.upstream()], tmp.path(), "relay-a");
    let agent = Agent::install_via(server, &[relay.upstream()], tmp.path(), "edge-1", &[], &[]);
    let relay_key = Identity::load(&relay.dir.join("relay.key")).unwrap();
    let read = |f: &str| std::fs::read_to_string(relay.dir.join(f)).unwrap();
    let (cert, key) = (read("tls.pem"), read("tls.key"));
    let signer = if with_server_key {
        Identity::load(&server.dir.join("signing.key")).unwrap()
    } else {
        Identity::load(&relay.dir.join("relay.key")).unwrap()
    };
    let addr = relay.downstream;
    relay.kill();
    let agent_key = agent_identity(&agent.dir).public_key();
    let seen = hostile_downstream(addr, cert, key, signer, agent_key);
    (agent, relay_key, seen)
}

/// A RunJob whose one shell step appends `line` to `file`.
fn run_job(job_id: &str, file: &Path, line: &str) -> CommandBody {
    CommandBody::RunJob {
        job_id: job_id.into(),
        deployment_id: format!("d-{job_id}"),
        steps: vec![StepSpec {
            name: "mark".into(),
            plugin: "shell".into(),
            step: "run".into(),
            properties: BTreeMap::from([(
                "script".to_string(),
                format!("echo {line} >> {}", file.display()),
            )]),
            secrets: Vec::new(),
            on_interrupt: OnInterrupt::Fail,
            timeout_ms: 10_000,
            bundle: None,
            sealed: None,
        }],
    }
}

/// A command frame with any signature (its checksum is right, so it decodes).
fn command_frame(seq: u64, id: &str, deadline_ms: u64, body: CommandBody, sig: String) -> Vec<u8> {
    let mut c = Command::new(Seq(seq), id.into(), deadline_ms, body).unwrap();
    c.signature = sig;
    Frame::Command(c).encode().unwrap()
}

fn sign(key: &Identity, agent_id: &str, id: &str, deadline_ms: u64, body: &CommandBody) -> String {
    key.sign(&command_signing_bytes(agent_id, id, deadline_ms, body).unwrap())
}

/// An agent whose only upstream is a relay; the relay is then replaced by a hostile one holding
/// its TLS certificate and key. It mints commands, alters genuine server-signed ones and replays
/// them; each forged one is refused (the reason in the agent's log, the connection dropped; the
/// agent's error frame does not reach the wire, see below), and nothing about it is acknowledged,
/// reported, journaled or run. A genuine command then runs exactly once, even when replayed and
/// renumbered (the control that proves the fake is a working upstream).
///
/// Overlap: forged_commands.rs already refuses a command signed by an unrelated key or for
/// another agent from a fake *server*; here the forger is an enrolled relay with its own key and
/// certificate, and the forgeries start from genuine server-signed commands.
#[test]
fn a_relay_cannot_mint_alter_or_replay_commands_for_its_agents() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let (mut agent, relay_key, seen) = agent_behind_hostile_relay(&tmp, &server, true);
    let server_key = Identity::load(&server.dir.join("signing.key")).unwrap();
    agent.run();

    let pwned = tmp.path().join("pwned");
    let genuine_marker = tmp.path().join("genuine");
    let aid = agent.id.clone();
    let later = now_ms() + 600_000;
    let forged: Vec<(&str, Vec<u8>)> = vec![
        {
            let body = run_job("j-relay", &pwned, "relay-signed");
            let sig = sign(&relay_key, &aid, "c-relay", later, &body);
            (
                "signed by the relay's own key",
                command_frame(1, "c-relay", later, body, sig),
            )
        },
        {
            let body = run_job("j-unsigned", &pwned, "unsigned");
            (
                "unsigned",
                command_frame(1, "c-unsigned", later, body, String::new()),
            )
        },
        {
            // The server signed a harmless script; the relay swaps in its own.
            let signed = run_job("j-altered", &pwned, "harmless");
            let sig = sign(&server_key, &aid, "c-altered", later, &signed);
            let altered = run_job("j-altered", &pwned, "altered-script");
            (
                "server-signed, script altered",
                command_frame(1, "c-altered", later, altered, sig),
            )
        },
        {
            // A genuine command that had expired, its deadline pushed forward.
            let body = run_job("j-expired", &pwned, "deadline-extended");
            let past = now_ms() - 1;
            let sig = sign(&server_key, &aid, "c-expired", past, &body);
            (
                "server-signed, deadline extended",
                command_frame(1, "c-expired", later, body, sig),
            )
        },
        {
            // A genuine command under a new id (to have it taken as another command).
            let body = run_job("j-renamed", &pwned, "id-changed");
            let sig = sign(&server_key, &aid, "c-renamed", later, &body);
            (
                "server-signed, id changed",
                command_frame(1, "c-renamed-2", later, body, sig),
            )
        },
    ];

    let welcomed = |hellos: usize| -> Addr<HostileSession> {
        eventually(&format!("the agent's hello #{hellos}"), ONLINE, || {
            let s = seen.lock().unwrap();
            (s.hellos >= hellos).then(|| s.current.clone()).flatten()
        })
    };
    let agent_log = tmp.path().join("edge-1.log");
    let refusals = || {
        std::fs::read_to_string(&agent_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("frame-refused") && l.contains("not signed by the server"))
            .count()
    };
    for (i, (case, frame)) in forged.iter().enumerate() {
        let session = welcomed(i + 1);
        let ended = seen.lock().unwrap().ended;
        session.do_send(Inject(frame.clone()));
        // The agent refuses it, says why in its log, and drops the connection.
        eventually(
            &format!("{case}: refused, connection dropped"),
            WAIT,
            || (refusals() > i && seen.lock().unwrap().ended > ended).then_some(()),
        );
        let s = seen.lock().unwrap();
        assert_eq!(s.commands_acked, 0, "{case}: acknowledged");
        assert!(
            s.events.is_empty(),
            "{case}: the agent reported {:?}",
            s.events
        );
        // The agent writes an error frame (and a close frame) before dropping the connection,
        // but neither reaches the wire: its `drop_connection` calls `SinkWrite::close()` right
        // behind the writes, and actix-codec 0.5.4's `Framed::close` shuts the socket down
        // without writing out its own write buffer. Whatever does arrive must be the refusal.
        assert!(
            s.errors
                .iter()
                .all(|e| e.contains("not signed by the server")),
            "{case}: {:?}",
            s.errors
        );
    }
    eprintln!(
        "error frames the hostile relay received from the agent: {:?}",
        seen.lock().unwrap().errors
    );

    // The control: the genuine command runs; replayed as is, and renumbered, it runs no more.
    let body = run_job("j-genuine", &genuine_marker, "ran");
    let sig = sign(&server_key, &aid, "c-genuine", later, &body);
    let session = welcomed(forged.len() + 1);
    session.do_send(Inject(command_frame(
        1,
        "c-genuine",
        later,
        body.clone(),
        sig.clone(),
    )));
    let finished = |s: &AgentSide| {
        s.events.iter().any(|e| {
            matches!(e, EventBody::JobFinished { job_id, status: protocol::JobStatus::Succeeded }
                if job_id == "j-genuine")
        })
    };
    eventually("the genuine job run", ONLINE, || {
        let s = seen.lock().unwrap();
        (finished(&s) && s.commands_acked >= 1).then_some(())
    });
    session.do_send(Inject(command_frame(
        1,
        "c-genuine",
        later,
        body.clone(),
        sig.clone(),
    )));
    session.do_send(Inject(command_frame(2, "c-genuine", later, body, sig)));
    eventually("the renumbered replay acknowledged", WAIT, || {
        (seen.lock().unwrap().commands_acked >= 2).then_some(())
    });
    // Give a second run, if one were started, the time to write its line.
    std::thread::sleep(Duration::from_secs(2));
    {
        let s = seen.lock().unwrap();
        assert_eq!(
            std::fs::read_to_string(&genuine_marker).unwrap(),
            "ran\n",
            "the genuine job ran more than once"
        );
        let accepted: Vec<&String> = s
            .events
            .iter()
            .filter_map(|e| match e {
                EventBody::JobAccepted { job_id } => Some(job_id),
                _ => None,
            })
            .collect();
        assert_eq!(accepted, ["j-genuine"], "events: {:?}", s.events);
    }
    assert!(
        !pwned.exists(),
        "a forged command ran: {:?}",
        std::fs::read_to_string(&pwned)
    );
    // The renumbered replay reached the job book, which knew the job already.
    let log = std::fs::read_to_string(&agent_log).unwrap_or_default();
    assert!(log.contains("job-already-known"), "agent log:\n{log}");
    // Exactly one refusal per forgery: the genuine command and its replays were not refused.
    assert_eq!(refusals(), forged.len(), "refusals in the agent's log");
    // The server never saw it: the agent's only upstream was the relay.
    assert_eq!(server.agent_status(&agent.id), "offline");

    // The agent's journal: the genuine command only (as sent, and renumbered), one job record.
    agent.stop();
    let (journal, _) = eventually("the agent's journal released", WAIT, || {
        Journal::open(&agent.dir.join("journal"), &JournalOptions::default()).ok()
    });
    let journal = journal.handle();
    let commands = journal
        .read_log(&LogName::new("in/commands").unwrap(), Seq::ZERO, 100)
        .unwrap();
    eprintln!("commands in the agent's journal: {}", commands.len());
    assert!(!commands.is_empty());
    for r in &commands {
        let text = String::from_utf8_lossy(&r.payload);
        assert!(
            text.contains("c-genuine"),
            "journaled command {}: {text}",
            r.seq.0
        );
    }
    let jobs: Vec<String> = journal
        .scan_meta("job/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(jobs, ["job/j-genuine"], "job records");
}

#[test]
fn a_relay_cannot_starve_others_of_handshakes_or_reuse_a_channel() {
    let tmp = TestDir::new();
    // A small handshake budget: one link may take at most half of it.
    let server = Server::start_with(
        tmp.path(),
        &[("TETHER_SERVER__MAX_HANDSHAKES_IN_FLIGHT", "20")],
    );
    let (a, a_key) = install_relay(&server, tmp.path(), "relay-a");
    let mut link = FakeRelay::connect(&server, &a.id, &a_key);
    // 15 channels opened, each with an agent's first handshake message and nothing more: 10
    // are answered (held until their handshake deadline), the other 5 get Busy.
    for ch in 1..=15 {
        link.open(ch, ChannelKind::Agent, &[a.id.as_str()]);
        let (gate, first) = AgentGate::start().unwrap();
        link.gates.insert(ch, gate);
        link.send_bytes(&mux::data(ch, &first));
    }
    let (mut challenged, mut busy) = (0, 0);
    while challenged + busy < 15 {
        match link.expect("answers to 15 opens") {
            LinkEvent::Answer(_, _) => challenged += 1,
            LinkEvent::Frame(_, Frame::Busy(_)) => {}
            LinkEvent::ChannelClosed(_, 1013, _) => busy += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((challenged, busy), (10, 5));
    // Meanwhile an agent connecting directly still gets its handshake.
    let mut agent = Agent::install(&server, tmp.path(), "direct-1", &[]);
    agent.run();
    eventually("the direct agent online", ONLINE, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    // Channel ids are never reused on a link: opening one twice closes the link.
    link.open(3, ChannelKind::Agent, &[a.id.as_str()]);
    let (code, reason, errors) = link.expect_link_end("a channel opened twice");
    assert_eq!(code, Some(1008), "{reason}");
    assert!(
        errors.iter().any(|e| e.message.contains("opened twice")),
        "{errors:?}"
    );
    eventually("relay-a offline", ONLINE, || {
        (relay_status(&server, "relay-a") == "offline").then_some(())
    });
}

/// With only its own key, a relay cannot pass as the server to an agent: the agent refuses the
/// end-to-end handshake, never sends a `Hello`, and nothing reaches the relay. (The control is
/// the test above: the same fake answering with the server's key gets the agent's `Hello`.)
#[test]
fn a_relay_with_only_its_own_key_gets_no_session_from_an_agent() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let (mut agent, _, seen) = agent_behind_hostile_relay(&tmp, &server, false);
    agent.run();
    let agent_log = tmp.path().join("edge-1.log");
    eventually(
        "the agent refusing the relay's handshake twice",
        ONLINE,
        || {
            let log = std::fs::read_to_string(&agent_log).unwrap_or_default();
            (log.matches("not signed by a key this agent trusts").count() >= 2).then_some(())
        },
    );
    let s = seen.lock().unwrap();
    assert_eq!(
        s.hellos, 0,
        "the agent said hello to a relay posing as the server"
    );
    assert!(
        s.events.is_empty(),
        "events reached the relay: {:?}",
        s.events
    );
    assert_eq!(s.commands_acked, 0);
    drop(s);
    drop(agent);
}

/// On an agent's channel whose end-to-end handshake is done (here the fake relay carries a
/// genuine agent's session: it holds the agent's key to play it), frames the relay alters,
/// replays, reorders or makes up do not open: the server refuses the channel and records
/// nothing; a frame sealed as the agent would seal it goes through (the control).
#[test]
fn frames_a_relay_alters_replays_reorders_or_injects_on_a_sealed_channel_are_refused() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let (relay, rkey) = install_relay(&server, tmp.path(), "relay-a");
    let agent = Agent::install(&server, tmp.path(), "sealed-1", &[]);
    let key = agent_identity(&agent.dir);
    let mut link = FakeRelay::connect(&server, &relay.id, &rkey);
    let me = [relay.id.as_str()];
    let inc = fresh_incarnation();
    // A welcomed session of sealed-1 on channel `ch`.
    let welcomed = |link: &mut FakeRelay, ch: u32| {
        let nonce = link.open_as(ch, &me, &agent.id, &key).unwrap();
        link.data(ch, &Frame::Hello(hello(&key, &agent.id, &nonce, &inc)));
        match link.expect("the welcome") {
            LinkEvent::Frame(c, Frame::Welcome(_)) if c == ch => {}
            other => panic!("channel {ch}: expected a welcome, got {other:?}"),
        }
    };
    let sealed = |link: &mut FakeRelay, ch: u32, frame: &Frame| -> Vec<u8> {
        let gate = link.gates.get_mut(&ch).unwrap();
        gate.seal(&frame.encode().unwrap()).unwrap()
    };
    welcomed(&mut link, 1);
    let commits = journal_commits(&server);
    let probes = server.probes(&agent.id);

    // A bit flipped.
    let mut bad = sealed(&mut link, 1, &Frame::Event(probe_event(1, 1)));
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    link.send_bytes(&mux::data(1, &bad));
    let (e, code, _) = link.expect_refused("a flipped bit", 1);
    assert_error(
        "a flipped bit",
        &e,
        ErrorCode::Unauthorized,
        "does not open",
    );
    assert_eq!(code, 1008);

    // Replayed: a frame the server already took, sent again.
    welcomed(&mut link, 2);
    let first = sealed(&mut link, 2, &Frame::Event(probe_event(1, 1)));
    link.send_bytes(&mux::data(2, &first));
    link.send_bytes(&mux::data(2, &first));
    let (e, _, _) = link.expect_refused("a replayed frame", 2);
    assert_error(
        "a replayed frame",
        &e,
        ErrorCode::Unauthorized,
        "does not open",
    );

    // Reordered: the second frame before the first.
    welcomed(&mut link, 3);
    let _first = sealed(&mut link, 3, &Frame::Event(probe_event(1, 1)));
    let second = sealed(&mut link, 3, &Frame::Event(probe_event(2, 2)));
    link.send_bytes(&mux::data(3, &second));
    let (e, _, _) = link.expect_refused("a reordered frame", 3);
    assert_error(
        "a reordered frame",
        &e,
        ErrorCode::Unauthorized,
        "does not open",
    );

    // Made up: a frame in clear, and bytes of the right shape sealed by nobody.
    welcomed(&mut link, 4);
    link.send_bytes(&mux::data(
        4,
        &Frame::Event(probe_event(1, 1)).encode().unwrap(),
    ));
    let (e, _, _) = link.expect_refused("an injected clear frame", 4);
    assert_error(
        "an injected frame",
        &e,
        ErrorCode::Unauthorized,
        "does not open",
    );
    welcomed(&mut link, 5);
    link.send_bytes(&mux::data(
        5,
        &[
            0, 20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
        ],
    ));
    let (e, _, _) = link.expect_refused("injected bytes", 5);
    assert_error(
        "injected bytes",
        &e,
        ErrorCode::Unauthorized,
        "does not open",
    );

    // Nothing else was recorded: the one genuine frame before the replay, once.
    let after = server.probes(&agent.id);
    assert_eq!(
        after["events"]["received"], 1,
        "before {probes}, after {after}"
    );
    assert_eq!(after["events"]["duplicates"], 0, "{after}");
    // The probe is counted as it is taken; its batch is durable a commit later (an fdatasync
    // that a loaded disk may hold up), so wait for it rather than race it.
    eventually("the genuine probe journaled", WAIT, || {
        (journal_commits(&server) > commits).then_some(())
    });

    // The control: sealed as the agent seals it, the next probe is taken.
    welcomed(&mut link, 6);
    let good = sealed(&mut link, 6, &Frame::Event(probe_event(2, 2)));
    link.send_bytes(&mux::data(6, &good));
    eventually("the control probe recorded", WAIT, || {
        (server.probes(&agent.id)["events"]["received"] == 2).then_some(())
    });
}

/// A relay carries a child relay's channels only under the same rules the server applies: a
/// channel whose path does not end with the child, or one opened twice, closes the child's link
/// (1008, with the reason), and nothing of it reaches the server.
#[test]
fn a_relay_closes_the_link_of_a_child_relay_that_breaks_the_channel_rules() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let parent = Relay::start(&server, &[server.upstream()], tmp.path(), "parent");
    let (child, child_key) = {
        let child = Relay::install(&server, &[parent.upstream()], tmp.path(), "child", &[]);
        let key = Identity::load(&child.dir.join("relay.key")).unwrap();
        (child, key)
    };
    eventually("the parent relay online", WAIT, || {
        (relay_status(&server, "parent") == "online").then_some(())
    });
    let cases: [(&str, Vec<String>, &str); 2] = [
        (
            "a path ending with the parent, not the child",
            vec![parent.id.clone()],
            "the path must end with the relay that opens the channel",
        ),
        (
            "the same channel opened twice",
            vec![child.id.clone()],
            "channel 7 is already open",
        ),
    ];
    for (case, path, want) in cases {
        let mut link =
            WsClient::connect_to(parent.downstream, tls_config(&server), RELAY_WS_PATH).unwrap();
        let nonce = link.challenge(WAIT);
        link.send(&Frame::Hello(hello(&child_key, &child.id, &nonce, "")))
            .unwrap();
        match link.recv_frame("the child link's welcome", WAIT) {
            Frame::Welcome(_) => {}
            other => panic!("{case}: expected a welcome, got {other:?}"),
        }
        eventually("the child relay online", WAIT, || {
            (relay_status(&server, "child") == "online").then_some(())
        });
        let opened_before = link_stats(&server, &parent.id)["channels_opened"].clone();
        let open = Mux::Open {
            ch: 7,
            open: Open {
                kind: ChannelKind::Agent,
                path: path.clone(),
                peer: "127.0.0.1:1".into(),
            },
        };
        let times = if want.contains("already open") { 2 } else { 1 };
        for _ in 0..times {
            link.send_binary(&open.encode()).unwrap();
        }
        // Heartbeats may come first (mux data on the link channel); then the close.
        let deadline = Instant::now() + WAIT;
        let (code, reason) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match link.recv(left) {
                Some(WsEvent::Close(code, reason)) => break (code, reason),
                Some(WsEvent::Dropped(reason)) => {
                    panic!("{case}: dropped without a close: {reason}")
                }
                Some(_) => continue,
                None => panic!("{case}: the child's link is still open after {WAIT:?}"),
            }
        };
        assert_eq!(code, Some(1008), "{case}");
        assert_eq!(reason, want, "{case}");
        // Nothing reached the server for the refused channel: the parent's link opened no
        // channel past the good one (the double open), and the parent stays online.
        let opened_after = link_stats(&server, &parent.id)["channels_opened"].clone();
        let expected = opened_before.as_u64().unwrap_or(0) + u64::from(times == 2);
        assert_eq!(opened_after.as_u64().unwrap_or(0), expected, "{case}");
        assert_eq!(relay_status(&server, "parent"), "online", "{case}");
        eventually("the child relay offline", WAIT, || {
            (relay_status(&server, "child") == "offline").then_some(())
        });
    }
}

/// A relay linked to a member of a cluster (`storage.every_node_serves_agents`) says what it
/// says of itself through the database: a flood of reports costs at most 60 rows a minute,
/// and the link and the relay stay served.
#[test]
fn a_relay_flooding_a_member_with_reports_about_itself_writes_a_bounded_number_of_rows() {
    use tether_tests::postgres::Postgres;
    let Some(pg) = Postgres::start() else {
        return;
    };
    let dir = TestDir::new();
    let mut env = pg.node_env("node-a", 3000);
    env.push((
        "TETHER_STORAGE__EVERY_NODE_SERVES_AGENTS".into(),
        "true".into(),
    ));
    let a = Server::start_with(&dir.path().join("a"), &tether_tests::borrowed(&env));
    let mut b = a.another_node(
        &dir.path().join("b"),
        &[("TETHER_STORAGE__NODE_NAME", "node-b")],
    );
    b.wait_active(ONLINE);
    // Every row written to the journal from now on, noted by the database itself.
    pg.psql(
        "CREATE TABLE test_inserts (key bytea);
         CREATE FUNCTION test_note() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO test_inserts VALUES (NEW.key); RETURN NEW; END $$;
         CREATE TRIGGER test_note AFTER INSERT ON tether_journal
           FOR EACH ROW EXECUTE FUNCTION test_note();",
    );
    let (relay, key) = install_relay(&a, dir.path(), "flood");
    let mut link = FakeRelay::connect(&b, &relay.id, &key);
    eventually(
        "the relay online on node a, served by node b",
        ONLINE,
        || (relay_status(&a, "flood") == "online").then_some(()),
    );
    let inbox_rows = || {
        pg.psql(&format!(
            "SELECT count(*) FROM test_inserts WHERE position('Minbox/{}/'::bytea in key) = 1",
            relay.id
        ))
        .parse::<u64>()
        .unwrap()
    };
    assert_eq!(inbox_rows(), 1, "its handshake");
    // 500 reports of an upgrade nobody asked for, on its own channel, at once.
    for seq in 1..=500u64 {
        let event = Event::new(
            Seq(seq),
            EventBody::UpgradeStarted {
                version: "9.9.9".into(),
            },
        )
        .unwrap();
        link.data(LINK_CHANNEL, &Frame::Event(event));
    }
    eventually("node b noticed the flood", ONLINE, || {
        std::fs::read_to_string(dir.path().join("b/server.log"))
            .unwrap()
            .contains("relay-says-too-much-dropping-for-a-minute")
            .then_some(())
    });
    // Its handshake and 60 of its reports: the minute's rows, and no more.
    eventually("the minute's rows written", ONLINE, || {
        (inbox_rows() >= 61).then_some(())
    });
    eventually("node a took every row it was given", ONLINE, || {
        let waiting = pg.psql(&format!(
            "SELECT count(*) FROM tether_journal WHERE position('Minbox/{}/'::bytea in key) = 1",
            relay.id
        ));
        (waiting == "0").then_some(())
    });
    assert_eq!(
        inbox_rows(),
        61,
        "its handshake and at most 60 reports a minute for one relay"
    );
    // The link was not closed over it (its end would have marked the relay offline).
    assert_eq!(relay_status(&a, "flood"), "online");
    // Nothing of it took effect: no upgrade was asked of it.
    let entry = relay_entry(&a, "flood").unwrap();
    assert!(entry["upgrade"].is_null(), "{entry}");
    drop(link);
}
