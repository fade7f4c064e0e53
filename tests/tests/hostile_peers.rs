//! Hostile peers against a real `tether-server` on its real sockets (HOSTILE-INPUTS.md sections
//! 1-3): plain TCP and old TLS on the TLS ports, garbage and oversized WebSocket frames, hellos
//! that do not prove a registered agent's identity (unknown, forged, replayed, relay-role),
//! protocol violations after the welcome, two connections for one agent, and a handshake flood.
//!
//! Each case asserts the visible outcome (close code, error frame, HTTP status) and that nothing
//! happened: no session (`/admin/health` "sessions", the agent's status in `/api/v1/agents`), no
//! journal write (`tether_journal_commits_total` in `/metrics`, compared around the hostile part
//! only, while no legitimate agent is connected), and that the server keeps serving (a legit
//! agent connects afterwards).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tether_shared::e2e::MAX_SEALED_BYTES;
use tether_shared::identity::Identity;
use tether_shared::protocol::{
    Ack, Busy, Challenge, Command as CommandFrame, CommandBody, ErrorCode, Event, EventBody, Frame,
    Hello, Seq, StreamId, Welcome,
};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::https_request_with_body;
use tether_tests::wire::{
    agent_identity, frame_header, fresh_incarnation, health, hello, journal_commits,
    plain_tcp_exchange, server_key, server_log, tcp_connections, tls_config, Closed, WsClient,
    OP_BINARY, OP_CONTINUATION, OP_PING, OP_TEXT,
};

/// Bound on every wait for the server (a frame, a close, a state change).
const WAIT: Duration = Duration::from_secs(10);
/// Bound on a real agent coming online.
const ONLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Helpers

/// Opens a connection protected end to end as `agent_id` (signing with `key`) and reads its
/// challenge nonce.
fn challenged(server: &Server, agent_id: &str, key: &Identity) -> (WsClient, String) {
    let mut ws = WsClient::connect(server).unwrap();
    ws.secure(agent_id, key, &server_key(server));
    let nonce = ws.challenge(WAIT);
    (ws, nonce)
}

/// A complete, legitimate handshake as `agent_id` signing with `key`: the client and Welcome.
fn welcomed(
    server: &Server,
    agent_id: &str,
    key: &Identity,
    incarnation: &str,
) -> (WsClient, Welcome) {
    let (mut ws, nonce) = challenged(server, agent_id, key);
    ws.send(&Frame::Hello(hello(key, agent_id, &nonce, incarnation)))
        .unwrap();
    match ws.recv_frame("the welcome", WAIT) {
        Frame::Welcome(w) => (ws, w),
        other => panic!("expected a welcome for {agent_id}, got {other:?}"),
    }
}

/// Asserts the close `code` (or, where `drop_ok`, a dropped connection) and, when `error` is
/// given, an error frame of that code whose message contains `needle`.
fn assert_closed(
    case: &str,
    closed: &Closed,
    code: u16,
    error: Option<(ErrorCode, &str)>,
    drop_ok: bool,
) {
    match closed.code {
        Some(c) => assert_eq!(c, code, "{case}: close code; {closed:?}"),
        None => assert!(drop_ok, "{case}: dropped without a close frame; {closed:?}"),
    }
    if let (Some((code, needle)), Some(_)) = (error, closed.code) {
        let e = closed
            .error()
            .unwrap_or_else(|| panic!("{case}: no error frame before the close; {closed:?}"));
        assert_eq!(e.code, code, "{case}: error frame code; {e:?}");
        assert!(
            e.message.contains(needle),
            "{case}: error message {:?} should contain {needle:?}",
            e.message
        );
    }
    // No protocol frame but the error frame may come before a refusal.
    for f in &closed.frames {
        assert!(
            matches!(f, Frame::Error(_) | Frame::Heartbeat(_)),
            "{case}: unexpected frame before the close: {f:?}"
        );
    }
}

/// Sessions now connected, per `/admin/health`.
fn sessions(server: &Server) -> u64 {
    health(server)["sessions"].as_u64().unwrap()
}

/// No session anywhere, `ids` listed offline, and (for identities that never got through the
/// handshake) no stream state created for them.
fn assert_nothing_registered(server: &Server, case: &str, ids: &[&str], never_welcomed: bool) {
    let h = health(server);
    assert_eq!(h["sessions"], 0, "{case}: sessions in /admin/health: {h}");
    for id in ids {
        // Agents are listed offline; relays are not listed among agents at all.
        let status = server.agent_status(id);
        assert!(
            status == "offline" || (id.starts_with("r-") && status.is_empty()),
            "{case}: {id} is listed as {status:?}"
        );
        if never_welcomed {
            assert!(
                h["agents"].get(*id).is_none(),
                "{case}: a link was created for {id}: {h}"
            );
        }
    }
}

/// Waits until no session is connected and `id` is offline again (a closed session's teardown
/// runs after the close frame went out).
fn wait_offline(server: &Server, case: &str, id: &str) {
    eventually(&format!("{case}: {id} offline, no sessions"), WAIT, || {
        (sessions(server) == 0 && server.agent_status(id) == "offline").then_some(())
    });
}

/// The positive control: a real agent process connects and comes online.
fn real_agent_comes_online(server: &Server, agent: &mut Agent) {
    agent.run();
    eventually(&format!("real agent {} online", agent.name), ONLINE, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    agent.stop();
}

/// Enrolls a relay identity through `POST /agent/v1/enroll` with a relay token: (id, key).
fn enroll_relay(server: &Server, name: &str) -> (String, Identity) {
    let r = server.request(
        "POST",
        "/api/v1/enrollment-tokens",
        Some(&json!({"uses": 1, "ttl_s": 60, "role": "relay"})),
    );
    assert_eq!(r.status, 201, "relay token: {}", r.body);
    let token = r.json()["token"].as_str().unwrap().to_owned();
    let key = Identity::generate();
    let tls_key = tether_shared::tls::TlsKey::generate().unwrap();
    let body = tether_tests::enrollment::signed(
        json!({
            "token": token,
            "name": name,
            "public_key": key.public_key_b64(),
            "role": "relay",
            "tls_public_key": tether_tests::enrollment::tls_public_key(&tls_key),
            "hostnames": ["relay.example"],
        }),
        &key,
        Some(&tls_key),
    )
    .to_string();
    let reply = https_request_with_body(
        server.wss,
        tls_config(server),
        "localhost",
        "POST",
        "/agent/v1/enroll",
        &[("Content-Type", "application/json")],
        Some(body.as_bytes()),
    )
    .unwrap();
    assert_eq!(reply.status, 200, "relay enrollment: {}", reply.body);
    let id = reply.json()["agent_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("r-"), "{id}");
    (id, key)
}

fn probe_event(seq: u64, n: u64) -> Event {
    Event::new(
        Seq(seq),
        EventBody::Probe {
            n,
            data: format!("hostile {n}"),
        },
    )
    .unwrap()
}

/// Raw JSON of an event frame with any `seq` and `crc` (the encoder would not check, but this
/// keeps the bytes obvious).
fn raw_event(seq: u64, crc: u32) -> Vec<u8> {
    format!(
        r#"{{"v":1,"kind":"event","body":{{"seq":{seq},"body":{{"type":"probe","n":1,"data":"x"}},"crc":{crc}}}}}"#
    )
    .into_bytes()
}

/// The CRC the server expects for [`raw_event`]'s body.
fn raw_event_crc() -> u32 {
    tether_shared::protocol::body_crc(&EventBody::Probe {
        n: 1,
        data: "x".into(),
    })
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Section 3: the TLS ports

#[test]
fn tls_ports_refuse_plaintext_and_tls_1_1() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let pid = server.pid().unwrap();

    for (port_name, addr) in [("https", server.https), ("wss", server.wss)] {
        for (case, bytes) in [
            (
                "plain HTTP",
                &b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"[..],
            ),
            (
                "ws:// upgrade",
                &b"GET /agent/v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   Sec-WebSocket-Version: 13\r\n\r\n"[..],
            ),
            ("binary junk", &[0u8, 1, 2, 3, 0xff, 0xfe, b'\n'][..]),
        ] {
            let (reply, closed) = plain_tcp_exchange(addr, bytes, WAIT).unwrap();
            assert!(
                closed,
                "{port_name} {case}: the server kept the connection open for {WAIT:?}"
            );
            assert!(
                !reply.starts_with(b"HTTP"),
                "{port_name} {case}: answered in plaintext: {}",
                String::from_utf8_lossy(&reply)
            );
            // At most a TLS alert record (content type 21) comes back.
            assert!(
                reply.is_empty() || reply[0] == 0x15,
                "{port_name} {case}: not a TLS alert: {reply:?}"
            );
        }
    }

    // TLS 1.1 only: refused with a protocol_version alert (rustls never speaks it).
    let openssl_present = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if openssl_present {
        let s_client = |addr: std::net::SocketAddr, version: &str| {
            // SECLEVEL=0: OpenSSL 3 does not even offer TLS 1.1 otherwise.
            Command::new("timeout")
                .args(["20", "openssl", "s_client", "-connect"])
                .arg(addr.to_string())
                .args(["-servername", "localhost", version])
                .args(["-cipher", "DEFAULT@SECLEVEL=0"])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        };
        for (port_name, addr) in [("https", server.https), ("wss", server.wss)] {
            let out = s_client(addr, "-tls1_1");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                !out.status.success(),
                "{port_name}: a TLS 1.1-only handshake succeeded:\n{text}"
            );
            // rustls answers a TLS 1.1 hello with a fatal alert: handshake_failure (40), since
            // such a hello lacks signature_algorithms, which rustls checks before the version
            // (protocol_version (70) for hellos that do carry it).
            assert!(
                text.contains("alert handshake failure") || text.contains("alert protocol version"),
                "{port_name}: expected a fatal alert from the server:\n{text}"
            );
            assert!(
                text.contains("Cipher is (NONE)"),
                "{port_name}: a cipher was negotiated:\n{text}"
            );
            // The tool itself works: TLS 1.2 goes through.
            let ok = s_client(addr, "-tls1_2");
            assert!(
                ok.status.success(),
                "{port_name}: TLS 1.2 control failed:\n{}",
                String::from_utf8_lossy(&ok.stderr)
            );
        }
    } else if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the openssl binary is required in CI for the TLS 1.1 check");
    } else {
        eprintln!("SKIPPED: TLS 1.1 refusal (no openssl binary on this machine)");
    }

    // Still serving, and no socket left behind by the refused connections.
    assert_eq!(server.request("GET", "/admin/health", None).status, 200);
    // No connection left open on the server's side: it drops refused peers at once.
    eventually("the server to hold no TCP connection", WAIT, || {
        tcp_connections(pid).is_empty().then_some(())
    });
}

// ---------------------------------------------------------------------------------------------
// Section 1: frames before the hello

#[test]
fn undecodable_and_oversized_frames_before_the_hello_are_refused() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let mut agent = Agent::install(&server, tmp.path(), "target-1", &[]);
    let key = agent_identity(&agent.dir);
    let commits = journal_commits(&server);

    let refuse = |case: &str, attack: &dyn Fn(&mut WsClient)| -> Closed {
        let (mut ws, _) = challenged(&server, &agent.id, &key);
        attack(&mut ws);
        let closed = ws.expect_close(WAIT);
        eprintln!("{case}: {closed:?}");
        closed
    };

    let c = refuse("garbage bytes", &|ws| {
        ws.send_binary(b"\x00\xff\x13garbage, not a frame").unwrap()
    });
    assert_closed(
        "garbage bytes",
        &c,
        1002,
        Some((ErrorCode::Malformed, "malformed")),
        false,
    );

    // Not sealed: it does not open, so it is refused before anything reads it.
    let c = refuse("garbage text", &|ws| {
        ws.send_frame(OP_TEXT, true, b"GET / HTTP/1.1").unwrap()
    });
    assert_closed(
        "garbage text",
        &c,
        1008,
        Some((ErrorCode::Unauthorized, "does not open")),
        false,
    );

    for v in ["0", "2", "18446744073709551615"] {
        let case = format!("protocol version {v}");
        let c = refuse(&case, &|ws| {
            let text = format!(r#"{{"v":{v},"kind":"hello","body":{{}}}}"#);
            ws.send_binary(text.as_bytes()).unwrap()
        });
        assert_closed(
            &case,
            &c,
            1002,
            Some((ErrorCode::UnsupportedVersion, "supported 1..=1")),
            false,
        );
    }

    let c = refuse("unknown kind", &|ws| {
        ws.send_binary(br#"{"v":1,"kind":"exec","body":{"cmd":"id"}}"#)
            .unwrap()
    });
    assert_closed(
        "unknown kind",
        &c,
        1002,
        Some((ErrorCode::Malformed, "unknown frame kind")),
        false,
    );

    let c = refuse("an event instead of the hello", &|ws| {
        ws.send(&Frame::Event(probe_event(1, 1))).unwrap()
    });
    assert_closed(
        "an event instead of the hello",
        &c,
        1008,
        Some((ErrorCode::ProtocolViolation, "expected hello, got event")),
        false,
    );

    let c = refuse("a welcome (server-only kind) instead of the hello", &|ws| {
        ws.send(&Frame::Welcome(Welcome {
            last_event_seq: Seq::ZERO,
            server_incarnation: "x".into(),
            heartbeat_interval_ms: 1000,
        }))
        .unwrap()
    });
    assert_closed(
        "a welcome instead of the hello",
        &c,
        1008,
        Some((ErrorCode::ProtocolViolation, "may not be sent by the agent")),
        false,
    );

    let c = refuse("unmasked client frame", &|ws| {
        let payload = b"{}";
        let mut raw = vec![0x80 | OP_BINARY, payload.len() as u8];
        raw.extend_from_slice(payload);
        ws.send_raw(&raw).unwrap()
    });
    assert_closed(
        "unmasked client frame",
        &c,
        1002,
        Some((ErrorCode::Malformed, "websocket protocol error")),
        true,
    );

    let c = refuse("ping with a 200-byte payload", &|ws| {
        ws.send_frame(OP_PING, true, &[7u8; 200]).unwrap()
    });
    assert_closed("oversized control frame", &c, 1002, None, true);

    let c = refuse("fragmented message", &|ws| {
        ws.send_frame(OP_BINARY, false, b"{\"v\":1,").unwrap();
        // Whatever the server does with the first fragment, it must not wait forever.
        let _ = ws.send_frame(OP_CONTINUATION, true, b"\"kind\":\"hello\"}");
    });
    assert_closed(
        "fragmented message",
        &c,
        1003,
        Some((ErrorCode::ProtocolViolation, "fragmented")),
        false,
    );

    let c = refuse("frame of MAX_SEALED_BYTES + 1", &|ws| {
        // The server may close while this is still being written.
        let _ = ws.send_binary(&vec![b' '; MAX_SEALED_BYTES + 1]);
    });
    assert_closed(
        "MAX_SEALED_BYTES + 1",
        &c,
        1009,
        Some((ErrorCode::Malformed, "size limit")),
        true,
    );

    // Nothing happened.
    assert_nothing_registered(&server, "frames before the hello", &[&agent.id], true);
    assert_eq!(
        journal_commits(&server),
        commits,
        "frames before the hello were journaled"
    );
    eventually("the refusals in the server log", WAIT, || {
        let log = server_log(&server);
        (log.matches("session-refused").count() >= 12).then_some(())
    });

    real_agent_comes_online(&server, &mut agent);
}

/// A header declaring 2^62 payload bytes, and no payload: it must be refused from the header
/// alone (1009), before anything is buffered for (or waited on) the declared size
/// (HOSTILE-INPUTS 1, "declared size = 2^64-1": rejected before allocating).
#[test]
fn a_frame_header_declaring_2_pow_62_bytes_is_refused_before_its_payload() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let commits = journal_commits(&server);
    let mut ws = WsClient::connect(&server).unwrap();
    let mut raw = frame_header(OP_BINARY, true, 1 << 62);
    raw.extend_from_slice(&[1, 2, 3, 4]); // the masking key; no payload follows
    ws.send_raw(&raw).unwrap();
    // Well under the 10 s handshake timeout, which would close it anyway (with 1008).
    let closed = ws.expect_close(Duration::from_secs(3));
    assert_closed(
        "frame header declaring 2^62 bytes",
        &closed,
        1009,
        Some((ErrorCode::Malformed, "size limit")),
        true,
    );
    assert_nothing_registered(&server, "declared 2^62 bytes", &[], true);
    assert_eq!(journal_commits(&server), commits);
}

// ---------------------------------------------------------------------------------------------
// Section 2: authentication

#[test]
fn hellos_that_do_not_prove_a_registered_agent_are_refused() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let agent_a = Agent::install(&server, tmp.path(), "agent-a", &[]);
    let mut agent_b = Agent::install(&server, tmp.path(), "agent-b", &[]);
    let (relay_id, relay_key) = enroll_relay(&server, "relay-1");
    let key_a = agent_identity(&agent_a.dir);
    let stranger = Identity::generate();
    let ids = [agent_a.id.as_str(), agent_b.id.as_str(), relay_id.as_str()];
    let commits = journal_commits(&server);

    let refuse = |case: &str, make: &dyn Fn(&str) -> Vec<u8>| -> Closed {
        let (mut ws, nonce) = challenged(&server, &agent_a.id, &key_a);
        ws.send_binary(&make(&nonce)).unwrap();
        let closed = ws.expect_close(WAIT);
        eprintln!("{case}: {closed:?}");
        closed
    };
    let encode = |h: Hello| Frame::Hello(h).encode().unwrap();
    let unauthorized = |case: &str, closed: &Closed, reason: &str| {
        assert_closed(
            case,
            closed,
            1008,
            Some((ErrorCode::Unauthorized, reason)),
            false,
        )
    };

    let c = refuse("unknown agent id", &|nonce| {
        encode(hello(
            &stranger,
            "a-00000000deadbeef",
            nonce,
            &fresh_incarnation(),
        ))
    });
    unauthorized("unknown agent id", &c, "unknown agent");

    let c = refuse("hello without a proof field", &|_| {
        let id = &agent_a.id;
        format!(
            r#"{{"v":1,"kind":"hello","body":{{"agent_id":"{id}","version":"1","incarnation":"i","server_incarnation":"","last_command_seq":0}}}}"#
        )
        .into_bytes()
    });
    assert_closed(
        "no proof field",
        &c,
        1002,
        Some((ErrorCode::Malformed, "proof")),
        false,
    );

    for (case, proof) in [
        ("empty proof", String::new()),
        ("garbled proof", "!!not base64!!".to_owned()),
        ("proof of 64 zero bytes", "A".repeat(86) + "=="),
        ("proof of 65 bytes", "A".repeat(87) + "="),
    ] {
        let c = refuse(case, &|nonce| {
            let mut h = hello(&key_a, &agent_a.id, nonce, &fresh_incarnation());
            h.proof = proof.clone();
            encode(h)
        });
        unauthorized(case, &c, "bad proof signature");
    }

    let c = refuse("proof by another key", &|nonce| {
        encode(hello(&stranger, &agent_a.id, nonce, &fresh_incarnation()))
    });
    unauthorized("proof by another key", &c, "bad proof signature");

    let c = refuse("A's key signing only the nonce", &|nonce| {
        let mut h = hello(&key_a, &agent_a.id, nonce, &fresh_incarnation());
        h.proof = key_a.sign(nonce.as_bytes());
        encode(h)
    });
    unauthorized(
        "signature over the wrong message",
        &c,
        "bad proof signature",
    );

    // Forged agent id: A's real key, B's id.
    let c = refuse("A's key claiming to be B", &|nonce| {
        encode(hello(&key_a, &agent_b.id, nonce, &fresh_incarnation()))
    });
    unauthorized("forged agent id", &c, "bad proof signature");

    // A relay's identity, with a valid proof, is not an agent.
    let c = refuse("a relay identity on the agent channel", &|nonce| {
        encode(hello(&relay_key, &relay_id, nonce, &fresh_incarnation()))
    });
    unauthorized("relay identity", &c, "not an agent identity");

    assert_nothing_registered(&server, "bad hellos", &ids, true);
    assert_eq!(
        journal_commits(&server),
        commits,
        "bad hellos were journaled"
    );
    eventually("the unauthorized refusals in the server log", WAIT, || {
        let log = server_log(&server);
        (log.contains("unknown agent")
            && log.contains("bad proof signature")
            && log.contains("not an agent identity"))
        .then_some(())
    });

    // Each refusal is counted once, by its kind, in /metrics.
    let metrics = server.request("GET", "/metrics", None).body;
    for (reason, n) in [
        ("unknown_peer", 1),
        ("bad_proof", 7),
        ("wrong_role", 1),
        ("malformed", 1),
    ] {
        let series = format!("tether_refusals_total{{peer=\"agent\",reason=\"{reason}\"}} {n}");
        assert!(metrics.lines().any(|l| l == series), "{series}\n{metrics}");
    }

    // The proofs above were built right: A's key with A's id gets through.
    let (ws, _) = welcomed(&server, &agent_a.id, &key_a, &fresh_incarnation());
    drop(ws);
    let metrics = server.request("GET", "/metrics", None).body;
    assert!(
        metrics
            .lines()
            .any(|l| l == "tether_handshakes_total{peer=\"agent\",outcome=\"verified\"} 1"),
        "{metrics}"
    );
    wait_offline(&server, "control handshake", &agent_a.id);
    assert_eq!(server.agent_status(&agent_b.id), "offline");

    real_agent_comes_online(&server, &mut agent_b);
}

#[test]
fn a_replayed_handshake_is_refused() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let mut agent = Agent::install(&server, tmp.path(), "agent-r", &[]);
    let key = agent_identity(&agent.dir);
    let incarnation = fresh_incarnation();
    let commits = journal_commits(&server);

    // A valid hello for connection 1's nonce, presented on connection 2.
    let (mut ws1, n1) = challenged(&server, &agent.id, &key);
    let captured = Frame::Hello(hello(&key, &agent.id, &n1, &incarnation));
    let (mut ws2, n2) = challenged(&server, &agent.id, &key);
    assert_ne!(n1, n2, "two connections got the same nonce");
    ws2.send(&captured).unwrap();
    let c = ws2.expect_close(WAIT);
    assert_closed(
        "hello signed over another connection's nonce",
        &c,
        1008,
        Some((ErrorCode::Unauthorized, "bad proof signature")),
        false,
    );
    assert_nothing_registered(&server, "replay onto a live nonce", &[&agent.id], true);
    assert_eq!(
        journal_commits(&server),
        commits,
        "the replay was journaled"
    );

    // The captured hello was genuine: on its own connection it is welcomed (first contact: one
    // commit).
    ws1.send(&captured).unwrap();
    assert!(
        matches!(ws1.recv_frame("the welcome", WAIT), Frame::Welcome(_)),
        "the genuine hello was not welcomed"
    );
    assert_eq!(
        journal_commits(&server),
        commits + 1,
        "first contact commits once"
    );
    drop(ws1);
    wait_offline(&server, "after the genuine session", &agent.id);

    // Replaying the hello of that finished session on a new connection fails too.
    let commits = journal_commits(&server);
    let (mut ws3, _) = challenged(&server, &agent.id, &key);
    ws3.send(&captured).unwrap();
    let c = ws3.expect_close(WAIT);
    assert_closed(
        "hello of an earlier session",
        &c,
        1008,
        Some((ErrorCode::Unauthorized, "bad proof signature")),
        false,
    );
    assert_nothing_registered(&server, "replay of an earlier session", &[&agent.id], false);
    assert_eq!(
        journal_commits(&server),
        commits,
        "the replay was journaled"
    );

    real_agent_comes_online(&server, &mut agent);
}

// ---------------------------------------------------------------------------------------------
// Section 1: frames after the welcome

#[test]
fn protocol_violations_after_the_welcome_close_the_session() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let mut agent = Agent::install(&server, tmp.path(), "agent-v", &[]);
    let key = agent_identity(&agent.dir);
    // One journal incarnation, as one real agent keeps across its connections.
    let incarnation = fresh_incarnation();
    let mut first_contact = true;

    // Cases whose closed session stayed registered (connected, agent online); collected so that
    // every case's other checks still run, and reported together at the end.
    let stayed_registered: std::cell::RefCell<Vec<String>> = Default::default();
    // A teardown takes milliseconds; once one was seen not to happen at all, the later cases
    // only take a short look, to keep the run short while the bug is there.
    let teardown = |seen: &std::cell::RefCell<Vec<String>>| {
        if seen.borrow().is_empty() {
            Duration::from_secs(3)
        } else {
            Duration::from_millis(300)
        }
    };
    let mut violate =
        |case: &str, frame: Vec<u8>, code: u16, error: Option<(ErrorCode, &str)>, drop_ok: bool| {
            let before = journal_commits(&server);
            let (mut ws, _) = welcomed(&server, &agent.id, &key, &incarnation);
            let after_handshake = journal_commits(&server);
            let handshake_commits = u64::from(first_contact);
            first_contact = false;
            assert_eq!(
                after_handshake,
                before + handshake_commits,
                "{case}: the handshake's own commits"
            );
            // The server may close while a big frame is still being written.
            let sent = ws.send_binary(&frame);
            assert!(sent.is_ok() || drop_ok, "{case}: send failed: {sent:?}");
            let closed = ws.expect_close(WAIT);
            eprintln!("{case}: {closed:?}");
            assert_closed(case, &closed, code, error, drop_ok);
            if let Some(h) = still_registered(&server, &agent.id, teardown(&stayed_registered)) {
                stayed_registered.borrow_mut().push(format!("{case}: {h}"));
            }
            assert_eq!(
                journal_commits(&server),
                after_handshake,
                "{case}: journaled beyond the handshake"
            );
        };

    // (a) Server-only kinds.
    let mut command = CommandFrame::new(
        Seq(1),
        "c-1".into(),
        u64::MAX,
        CommandBody::EmitProbes { count: 1000 },
    )
    .unwrap();
    command.signature = key.sign(b"whatever");
    let wrong_direction = Some((ErrorCode::ProtocolViolation, "may not be sent by the agent"));
    violate(
        "a command frame from the agent",
        Frame::Command(command).encode().unwrap(),
        1008,
        wrong_direction,
        false,
    );
    violate(
        "a welcome from the agent",
        Frame::Welcome(Welcome {
            last_event_seq: Seq(5),
            server_incarnation: "x".into(),
            heartbeat_interval_ms: 1,
        })
        .encode()
        .unwrap(),
        1008,
        wrong_direction,
        false,
    );
    violate(
        "a challenge from the agent",
        Frame::Challenge(Challenge { nonce: "n".into() })
            .encode()
            .unwrap(),
        1008,
        wrong_direction,
        false,
    );
    violate(
        "a busy from the agent",
        Frame::Busy(Busy { retry_after_ms: 1 }).encode().unwrap(),
        1008,
        wrong_direction,
        false,
    );
    violate(
        "an ack of the agent's own events stream",
        Frame::Ack(Ack {
            stream: StreamId::Events,
            upto: Seq(1),
        })
        .encode()
        .unwrap(),
        1008,
        wrong_direction,
        false,
    );

    // (b) Sequence numbers out of range, a wrong checksum, an unknown event type: decode errors,
    // reported as malformed (as before the welcome).
    let crc = raw_event_crc();
    violate(
        "event seq u64::MAX",
        raw_event(u64::MAX, crc),
        1002,
        Some((ErrorCode::Malformed, "out of range")),
        false,
    );
    violate(
        "event seq 0",
        raw_event(0, crc),
        1002,
        Some((ErrorCode::Malformed, "out of range")),
        false,
    );
    violate(
        "event with a wrong checksum",
        raw_event(1, crc ^ 1),
        1002,
        Some((ErrorCode::Malformed, "checksum mismatch")),
        false,
    );
    violate(
        "event of an unknown type",
        br#"{"v":1,"kind":"event","body":{"seq":1,"body":{"type":"exec","cmd":"id"},"crc":0}}"#
            .to_vec(),
        1002,
        Some((ErrorCode::Malformed, "malformed event body")),
        false,
    );

    // (c) Far beyond the window.
    violate(
        "event seq 1_000_000",
        Frame::Event(probe_event(1_000_000, 1)).encode().unwrap(),
        1008,
        Some((ErrorCode::ProtocolViolation, "window")),
        false,
    );

    // (f) A heartbeat whose worker figures are not numbers, are negative, or carry a field no
    // release sends: malformed, the session closed, nothing recorded (the figures stay absent).
    let heartbeat = |figures: serde_json::Value| {
        serde_json::to_vec(&json!({"v": 1, "kind": "heartbeat", "body": {"sent_ms": 1,
            "status": {"version": "0.2.0", "running_jobs": 0, "load_milli": 0, "actors": [],
                "figures": figures}}}))
        .unwrap()
    };
    let figures = |resident: serde_json::Value| {
        json!({"resident_bytes": resident, "cpu_ms": 1, "open_fds": 1, "uptime_s": 1,
            "jobs_unfinished": 0, "steps_running": 0, "events_unacked": 0,
            "journal_commits": 0, "journal_failures": 0})
    };
    let mut extra = figures(json!(1));
    extra["fork_bomb"] = json!(1);
    for (case, garbled) in [
        ("heartbeat figures that are text", figures(json!("lots"))),
        ("heartbeat figures that are negative", figures(json!(-1))),
        ("heartbeat figures past u64", figures(json!(1e30))),
        ("heartbeat figures with an unknown field", extra),
    ] {
        violate(
            case,
            heartbeat(garbled),
            1002,
            Some((ErrorCode::Malformed, "malformed heartbeat body")),
            false,
        );
        let h = health(&server);
        assert!(h["agents"][&agent.id]["figures"].is_null(), "{case}: {h}");
    }

    // (e) A second hello after the welcome (validly signed, even).
    {
        let (mut ws, nonce) = challenged(&server, &agent.id, &key);
        let h = Frame::Hello(hello(&key, &agent.id, &nonce, &incarnation));
        let before = journal_commits(&server);
        ws.send(&h).unwrap();
        assert!(matches!(
            ws.recv_frame("the welcome", WAIT),
            Frame::Welcome(_)
        ));
        ws.send(&h).unwrap();
        let c = ws.expect_close(WAIT);
        assert_closed(
            "a second hello",
            &c,
            1008,
            Some((ErrorCode::ProtocolViolation, "unexpected hello frame")),
            false,
        );
        if let Some(h) = still_registered(&server, &agent.id, teardown(&stayed_registered)) {
            stayed_registered
                .borrow_mut()
                .push(format!("a second hello: {h}"));
        }
        assert_eq!(
            journal_commits(&server),
            before,
            "a second hello: journaled"
        );
    }

    // Oversized, after the welcome.
    violate(
        "frame of MAX_SEALED_BYTES + 1 after the welcome",
        vec![b' '; MAX_SEALED_BYTES + 1],
        1009,
        Some((ErrorCode::Malformed, "size limit")),
        true,
    );

    // (d) An ack for commands never sent: ignored and counted; the session stays up. A small
    // gap is nacked, not journaled; the expected event is then accepted and acked.
    {
        let before = journal_commits(&server);
        let (mut ws, _) = welcomed(&server, &agent.id, &key, &incarnation);
        assert_eq!(
            journal_commits(&server),
            before,
            "a resumed handshake commits nothing"
        );
        ws.send(&Frame::Ack(Ack {
            stream: StreamId::Commands,
            upto: Seq(99_999),
        }))
        .unwrap();
        let h = eventually("the bogus ack counted", WAIT, || {
            let h = health(&server);
            (h["agents"][&agent.id]["ignored_acks"] == 1).then_some(h)
        });
        assert_eq!(h["sessions"], 1, "{h}");
        assert_eq!(h["agents"][&agent.id]["connected"], true, "{h}");
        assert_eq!(h["agents"][&agent.id]["unacked_commands"], 0, "{h}");
        assert!(ws.answers_ping(WAIT), "the session died after a bogus ack");
        assert_eq!(server.agent_status(&agent.id), "online");
        assert_eq!(
            journal_commits(&server),
            before,
            "the bogus ack was journaled"
        );

        ws.send(&Frame::Event(probe_event(3, 3))).unwrap();
        match ws.recv_frame("a nack for the gap", WAIT) {
            Frame::Nack(n) => {
                assert_eq!((n.stream, n.from), (StreamId::Events, Seq(1)), "{n:?}")
            }
            other => panic!("expected a nack, got {other:?}"),
        }
        assert_eq!(
            journal_commits(&server),
            before,
            "an event past a gap was journaled"
        );

        ws.send(&Frame::Event(probe_event(1, 1))).unwrap();
        match ws.recv_frame("the ack of event 1", WAIT) {
            Frame::Ack(a) => assert_eq!((a.stream, a.upto), (StreamId::Events, Seq(1)), "{a:?}"),
            other => panic!("expected an ack, got {other:?}"),
        }
        assert_eq!(journal_commits(&server), before + 1, "event 1 commits once");
        drop(ws);
        wait_offline(&server, "after the bogus ack", &agent.id);
    }

    // (g) The largest figures a heartbeat can carry: kept as they are, shown by the health and
    // written by `/metrics` without overflow; the session stays up.
    {
        let (mut ws, _) = welcomed(&server, &agent.id, &key, &incarnation);
        let mut max = figures(json!(u64::MAX));
        for field in [
            "cpu_ms",
            "open_fds",
            "uptime_s",
            "events_unacked",
            "uplink_rtt_us",
        ] {
            max[field] = json!(u64::MAX);
        }
        ws.send_binary(&heartbeat(max)).unwrap();
        let h = eventually("the largest figures shown", WAIT, || {
            let h = health(&server);
            (h["agents"][&agent.id]["figures"]["resident_bytes"] == json!(u64::MAX)).then_some(h)
        });
        assert_eq!(
            h["agents"][&agent.id]["figures"]["uplink_rtt_us"],
            json!(u64::MAX),
            "{h}"
        );
        let metrics = server.request("GET", "/metrics", None);
        assert_eq!(metrics.status, 200, "{}", metrics.body);
        let resident = metrics
            .body
            .lines()
            .find(|l| l.contains("resident") && l.contains(&agent.id))
            .unwrap_or_else(|| panic!("no resident series for the agent: {}", metrics.body));
        assert!(resident.ends_with(&format!(" {}", u64::MAX)), "{resident}");
        assert!(
            ws.answers_ping(WAIT),
            "the session died after the largest figures"
        );
        drop(ws);
        wait_offline(&server, "after the largest figures", &agent.id);
    }

    real_agent_comes_online(&server, &mut agent);

    assert!(
        stayed_registered.borrow().is_empty(),
        "BUG: after the server closed these sessions, /admin/health still counts them and the \
         agent stays listed online:\n{}",
        stayed_registered.borrow().join("\n")
    );
}

/// `None` once the server shows no session and `id` offline (waiting up to `wait`); else the
/// last `/admin/health` and status seen.
fn still_registered(server: &Server, id: &str, wait: Duration) -> Option<String> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let h = health(server);
        let status = server.agent_status(id);
        if h["sessions"] == 0 && status == "offline" {
            return None;
        }
        if std::time::Instant::now() >= deadline {
            return Some(format!(
                "sessions={} connected={} status={status}",
                h["sessions"], h["agents"][id]["connected"]
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An authenticated peer that goes silent (a half-open connection, HOSTILE-INPUTS 7) is closed
/// at the heartbeat timeout, and its agent is then offline.
#[test]
fn a_silent_session_is_closed_and_its_agent_goes_offline() {
    let tmp = TestDir::new();
    let server = Server::start_with(
        tmp.path(),
        &[
            ("TETHER_SERVER__HEARTBEAT_INTERVAL_MS", "200"),
            ("TETHER_SERVER__HEARTBEAT_TIMEOUT_MS", "1000"),
        ],
    );
    let agent = Agent::install(&server, tmp.path(), "agent-silent", &[]);
    let key = agent_identity(&agent.dir);
    let (mut ws, welcome) = welcomed(&server, &agent.id, &key, &fresh_incarnation());
    assert_eq!(welcome.heartbeat_interval_ms, 200);
    assert_eq!(server.agent_status(&agent.id), "online");
    // Say nothing: the server's beats arrive, none go back.
    let closed = ws.expect_close(WAIT);
    assert_eq!(closed.code, Some(1001), "{closed:?}");
    assert!(closed.reason.contains("heartbeat timeout"), "{closed:?}");
    if let Some(h) = still_registered(&server, &agent.id, Duration::from_secs(3)) {
        panic!(
            "BUG: the session closed at the heartbeat timeout stays registered and the agent \
             online: {h}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Two connections for one agent

#[test]
fn the_newest_of_two_sessions_for_one_agent_wins() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let agent = Agent::install(&server, tmp.path(), "agent-twice", &[]);
    let key = agent_identity(&agent.dir);
    let incarnation = fresh_incarnation();

    let (mut old, _) = welcomed(&server, &agent.id, &key, &incarnation);
    let (mut new, _) = welcomed(&server, &agent.id, &key, &incarnation);
    let c = old.expect_close(WAIT);
    assert_eq!(c.code, Some(4000), "the older session: {c:?}");
    assert!(c.reason.contains("replaced"), "{c:?}");
    assert!(new.answers_ping(WAIT), "the newer session is not up");
    let h = eventually("one session", WAIT, || {
        let h = health(&server);
        (h["sessions"] == 1).then_some(h)
    });
    assert_eq!(h["agents"][&agent.id]["connected"], true, "{h}");
    assert_eq!(server.agent_status(&agent.id), "online");

    // Again, the other way round: the newest always wins.
    let (mut newest, _) = welcomed(&server, &agent.id, &key, &incarnation);
    let c = new.expect_close(WAIT);
    assert_eq!(c.code, Some(4000), "the second session: {c:?}");
    assert!(newest.answers_ping(WAIT), "the newest session is not up");
    assert_eq!(sessions(&server), 1);
    // The replaced sessions closing did not take the agent offline.
    assert_eq!(server.agent_status(&agent.id), "online");

    drop(newest);
    wait_offline(&server, "the last session closed", &agent.id);
}

// ---------------------------------------------------------------------------------------------
// Section 6 (pre-auth limit): a handshake flood

#[test]
fn a_handshake_flood_is_shed_with_busy() {
    const LIMIT: usize = 4;
    const FLOOD: usize = 20;
    let tmp = TestDir::new();
    let server = Server::start_with(
        tmp.path(),
        &[("TETHER_SERVER__MAX_HANDSHAKES_IN_FLIGHT", "4")],
    );
    let mut agent = Agent::install(&server, tmp.path(), "agent-f", &[]);
    let commits = journal_commits(&server);

    let mut held = Vec::new();
    let mut busy = Vec::new();
    for i in 0..FLOOD {
        let mut ws = WsClient::connect(&server).unwrap();
        match ws.greet(WAIT) {
            None => held.push(ws),
            Some(Frame::Busy(b)) => {
                assert!(
                    (500..=5_000).contains(&b.retry_after_ms),
                    "connection {i}: retry_after_ms {}",
                    b.retry_after_ms
                );
                let c = ws.expect_close(WAIT);
                assert_eq!(c.code, Some(1013), "connection {i}: {c:?}");
                busy.push(b.retry_after_ms);
            }
            Some(other) => panic!("connection {i}: {other:?}"),
        }
    }
    // One address holds at most half of the slots...
    assert_eq!(
        held.len(),
        LIMIT / 2,
        "challenged connections from one address"
    );
    assert_eq!(busy.len(), FLOOD - LIMIT / 2, "shed connections");
    // ...so others still get theirs, up to the server's limit.
    let mut others = Vec::new();
    for i in 0..LIMIT {
        let source = std::net::IpAddr::from([127, 0, 0, 10 + i as u8]);
        let mut ws = WsClient::connect_from(
            source,
            server.wss,
            tls_config(&server),
            tether_shared::enroll::WS_PATH,
        )
        .unwrap();
        match ws.greet(WAIT) {
            None => others.push(ws),
            Some(Frame::Busy(_)) => busy.push(0),
            Some(other) => panic!("from {source}: {other:?}"),
        }
    }
    assert_eq!(
        others.len(),
        LIMIT / 2,
        "the rest of the slots went to other addresses"
    );
    held.extend(others);
    assert_nothing_registered(&server, "flood", &[&agent.id], true);
    assert_eq!(journal_commits(&server), commits, "the flood was journaled");
    // The server itself still answers.
    assert_eq!(server.request("GET", "/admin/health", None).status, 200);

    // Once the unanswered handshakes are gone, handshakes are accepted again.
    drop(held);
    eventually("a challenge for a new connection", WAIT, || {
        let mut ws = WsClient::connect(&server).ok()?;
        ws.greet(WAIT).is_none().then_some(())
    });
    real_agent_comes_online(&server, &mut agent);
}

/// An agent whose `Hello` announces a sealing key that is no X25519 key (or a peer lying about
/// it) gets no job secret: its job with secrets fails with the reason, no `RunJob` reaches its
/// socket, and a job without secrets still does.
#[test]
fn an_unusable_sealing_key_gets_no_secret_and_the_job_fails_saying_why() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let agent = Agent::install(&server, tmp.path(), "bad-seal", &[]);
    let key = agent_identity(&agent.dir);
    let (mut ws, nonce) = challenged(&server, &agent.id, &key);
    let mut h = hello(&key, &agent.id, &nonce, &fresh_incarnation());
    h.sealing_key = "not an X25519 key!".into();
    ws.send(&Frame::Hello(h)).unwrap();
    assert!(
        matches!(ws.recv_frame("the welcome", WAIT), Frame::Welcome(_)),
        "the handshake itself is not refused"
    );
    for (name, secret) in [("guarded", true), ("plain", false)] {
        let mut step = json!({"name": "s", "plugin": "shell", "step": "run",
            "properties": {"script": "echo hi"}});
        if secret {
            step["properties"]["password"] = json!("${db_secret}");
            step["secrets"] = json!(["password"]);
        }
        let r = server.request(
            "POST",
            "/api/v1/processes",
            Some(&json!({"name": name, "steps": [step]})),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let deploy = |process: &str| {
        let r = server.request(
            "POST",
            "/api/v1/deployments",
            Some(
                &json!({"process": process, "targets": {"agents": ["bad-seal"]},
                "properties": {"db_secret": "s3cr3t-for-nobody"}}),
            ),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()["id"].as_str().unwrap().to_owned()
    };
    let id = deploy("guarded");
    let d = eventually("the job failed", WAIT, || {
        let d = server
            .request("GET", &format!("/api/v1/deployments/{id}"), None)
            .json();
        (d["status"] == "failed").then_some(d)
    });
    let message = d["jobs"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("sealing key is unusable"),
        "{message}: {d}"
    );
    // Nothing of it reached the agent's socket; the next job, without secrets, does.
    let plain = deploy("plain");
    let run_job = loop {
        match ws.recv_frame("a command", WAIT) {
            Frame::Command(CommandFrame {
                body: CommandBody::RunJob { job_id, steps, .. },
                ..
            }) => break (job_id, steps),
            Frame::Heartbeat(_) => {}
            other => panic!("expected the plain job's RunJob, got {other:?}"),
        }
    };
    assert!(run_job.0.starts_with(&plain), "{run_job:?}");
    assert!(!format!("{run_job:?}").contains("s3cr3t"), "{run_job:?}");
}

/// Facts out of bounds in a `Hello` (too many, a bad name, a control character, too long) close
/// the connection as malformed before anything is stored; and an agent that does not announce
/// `runs_as` (an older release, or a peer lying about it) is never sent a job that names a
/// user: the job fails saying why, and a job without one still reaches it.
#[test]
fn hostile_facts_store_nothing_and_a_run_as_job_never_reaches_an_agent_that_cannot_switch() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let agent = Agent::install(&server, tmp.path(), "facts-peer", &[]);
    let key = agent_identity(&agent.dir);
    let many: tether_shared::facts::Facts =
        (0..40).map(|i| (format!("f{i}"), "x".into())).collect();
    let cases: Vec<(&str, tether_shared::facts::Facts)> = vec![
        ("40 facts", many),
        (
            "a name with a dot",
            [("os.name".to_owned(), "linux".to_owned())].into(),
        ),
        (
            "a newline",
            [("os".to_owned(), "linux\nEVIL=1".to_owned())].into(),
        ),
        ("257 bytes", [("os".to_owned(), "x".repeat(257))].into()),
    ];
    for (case, facts) in cases {
        let (mut ws, nonce) = challenged(&server, &agent.id, &key);
        let mut h = hello(&key, &agent.id, &nonce, &fresh_incarnation());
        h.facts = facts;
        ws.send(&Frame::Hello(h)).unwrap();
        let closed = ws.expect_close(WAIT);
        assert_closed(
            case,
            &closed,
            1002,
            Some((ErrorCode::Malformed, "fact")),
            false,
        );
        let listed = server.agent(&agent.id).unwrap();
        assert_eq!(listed["facts"], json!({}), "{case}: {listed}");
        assert_eq!(listed["status"], "offline", "{case}: {listed}");
    }

    let (mut ws, nonce) = challenged(&server, &agent.id, &key);
    let mut h = hello(&key, &agent.id, &nonce, &fresh_incarnation());
    h.facts = [("os".to_owned(), "linux".to_owned())].into();
    h.version = "0.0.1".into();
    assert!(!h.runs_as);
    ws.send(&Frame::Hello(h)).unwrap();
    assert!(matches!(
        ws.recv_frame("the welcome", WAIT),
        Frame::Welcome(_)
    ));
    eventually("its facts stored", WAIT, || {
        (server.agent(&agent.id)?["facts"]["os"] == "linux").then_some(())
    });
    // An older release than the server's is told to upgrade.
    assert_eq!(
        server.agent(&agent.id).unwrap()["upgrade_recommended"],
        true
    );
    for (name, run_as) in [("as-deploy", Some("deploy")), ("as-itself", None)] {
        let mut step = json!({"name": "s", "plugin": "shell", "step": "run",
            "properties": {"script": "id -un"}});
        if let Some(user) = run_as {
            step["properties"]["run_as"] = json!(user);
        }
        server.put_process(&json!({"name": name, "steps": [step]}));
    }
    let deploy = |process: &str| {
        server.start_deployment(&json!({"process": process, "targets": {"agents": ["facts-peer"]}}))
    };
    let id = deploy("as-deploy");
    let d = eventually("the job failed", WAIT, || {
        let d = server
            .request("GET", &format!("/api/v1/deployments/{id}"), None)
            .json();
        (d["status"] == "failed").then_some(d)
    });
    let message = d["jobs"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("cannot run steps as another user"), "{d}");
    let plain = deploy("as-itself");
    let job_id = loop {
        match ws.recv_frame("a command", WAIT) {
            Frame::Command(CommandFrame {
                body: CommandBody::RunJob { job_id, .. },
                ..
            }) => break job_id,
            Frame::Heartbeat(_) => {}
            other => panic!("expected the plain job's RunJob, got {other:?}"),
        }
    };
    assert!(job_id.starts_with(&plain), "{job_id} is not of {plain}");
    // Nor a remote operation: its release (it said nothing of them) is not asked any.
    let r = server.request(
        "POST",
        &format!("/api/v1/agents/{}/operations", agent.id),
        Some(&json!({"op": "restart"})),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("takes no remote operations"), "{}", r.body);
}
