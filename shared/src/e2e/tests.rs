//! Unit tests of the parent module: the handshake between the real parties, and a relay in
//! the middle that reads, alters, replays, reorders, splits or injects.

use super::*;

struct Parties {
    agent: Identity,
    server: Identity,
}

impl Parties {
    fn new() -> Self {
        Parties {
            agent: Identity::generate(),
            server: Identity::generate(),
        }
    }

    /// The registry's view: only agent "a1" is enrolled, with the agent's key.
    fn enrolled(&self) -> impl FnOnce(&str) -> Option<PublicKey> + '_ {
        |id| (id == "a1").then(|| self.agent.public_key())
    }

    /// A completed handshake: (agent's transport, server's transport).
    fn connect(&self) -> (Transport, Transport) {
        let (initiator, m1) = Initiator::start().unwrap();
        let (responder, m2) = Responder::answer(&m1, &self.server).unwrap();
        let (agent, m3) = initiator
            .finish(&m2, &[self.server.public_key()], "a1", &self.agent)
            .unwrap();
        let (server, id) = responder.finish(&m3, self.enrolled()).unwrap();
        assert_eq!(id, "a1");
        (agent, server)
    }
}

#[test]
fn frames_of_every_size_cross_both_ways_and_nothing_is_in_clear() {
    let p = Parties::new();
    let (mut agent, mut server) = p.connect();
    let secret = b"password_secret=hunter2-very-secret";
    for len in [
        0,
        1,
        100,
        MAX_PIECE_BYTES,
        MAX_PIECE_BYTES + 1,
        MAX_FRAME_BYTES,
    ] {
        let mut frame: Vec<u8> = secret.iter().copied().cycle().take(len).collect();
        frame.truncate(len);
        let sealed = agent.seal(&frame).unwrap();
        assert!(sealed.len() <= MAX_SEALED_BYTES);
        if len >= secret.len() {
            assert!(
                !sealed.windows(secret.len()).any(|w| w == secret),
                "the frame's bytes show in clear"
            );
        }
        assert_eq!(server.open(&sealed).unwrap(), frame, "{len} bytes");
        let back = server.seal(&frame).unwrap();
        assert_eq!(agent.open(&back).unwrap(), frame, "{len} bytes back");
    }
    assert!(matches!(
        agent.seal(&vec![0; MAX_FRAME_BYTES + 1]),
        Err(E2eError::TooLarge { .. })
    ));
    assert!(matches!(
        server.open(&vec![0; MAX_SEALED_BYTES + 1]),
        Err(E2eError::TooLarge { .. })
    ));
}

#[test]
fn a_relay_cannot_pose_as_the_server_or_as_an_agent() {
    let p = Parties::new();
    let relay = Identity::generate();
    // Posing as the server to the agent: the relay's own key is not trusted.
    let (initiator, m1) = Initiator::start().unwrap();
    let (_, m2) = Responder::answer(&m1, &relay).unwrap();
    let err = initiator
        .finish(&m2, &[p.server.public_key()], "a1", &p.agent)
        .err();
    assert_eq!(err, Some(E2eError::UntrustedServer));
    // Posing as agent a1 to the server: its key is not a1's enrolled key.
    let (initiator, m1) = Initiator::start().unwrap();
    let (responder, m2) = Responder::answer(&m1, &p.server).unwrap();
    let (_, m3) = initiator
        .finish(&m2, &[p.server.public_key()], "a1", &relay)
        .unwrap();
    let err = responder.finish(&m3, p.enrolled()).err();
    assert_eq!(err, Some(E2eError::BadAgentSignature("a1".into())));
    // An id that is not enrolled.
    let (initiator, m1) = Initiator::start().unwrap();
    let (responder, m2) = Responder::answer(&m1, &p.server).unwrap();
    let (_, m3) = initiator
        .finish(&m2, &[p.server.public_key()], "ghost", &p.agent)
        .unwrap();
    let err = responder.finish(&m3, p.enrolled()).err();
    assert_eq!(err, Some(E2eError::UnknownAgent("ghost".into())));
    // During a rollover the agent trusts both keys: the new server key is accepted.
    let old = Identity::generate();
    let (initiator, m1) = Initiator::start().unwrap();
    let (_, m2) = Responder::answer(&m1, &p.server).unwrap();
    assert!(initiator
        .finish(
            &m2,
            &[old.public_key(), p.server.public_key()],
            "a1",
            &p.agent
        )
        .is_ok());
}

#[test]
fn a_relay_in_the_middle_cannot_splice_two_handshakes() {
    // The relay answers the agent with its own responder (signed by the server? it cannot be)
    // and forwards the agent's proof to the server: the server's check is over the static key
    // of the session the agent signed, which the relay cannot re-sign.
    let p = Parties::new();
    let (initiator, m1) = Initiator::start().unwrap();
    let (responder, m2) = Responder::answer(&m1, &p.server).unwrap();
    let (_, m3) = initiator
        .finish(&m2, &[p.server.public_key()], "a1", &p.agent)
        .unwrap();
    // m3 replayed into another handshake with the server fails (other ephemeral keys).
    let (initiator2, m1b) = Initiator::start().unwrap();
    let (responder2, _) = Responder::answer(&m1b, &p.server).unwrap();
    assert!(matches!(
        responder2.finish(&m3, p.enrolled()),
        Err(E2eError::Noise(_))
    ));
    drop((initiator2, responder));
}

#[test]
fn altered_replayed_reordered_split_injected_and_foreign_frames_do_not_open() {
    let p = Parties::new();
    // A bit flipped anywhere.
    let (mut agent, mut server) = p.connect();
    let sealed = agent.seal(b"run job 7").unwrap();
    for i in [0, 2, sealed.len() / 2, sealed.len() - 1] {
        let (mut a, mut s) = p.connect();
        let mut bad = a.seal(b"run job 7").unwrap();
        bad[i] ^= 0x01;
        assert_eq!(s.open(&bad), Err(E2eError::Open), "bit {i}");
        drop(a);
    }
    // Replayed.
    assert!(server.open(&sealed).is_ok());
    assert_eq!(server.open(&sealed), Err(E2eError::Open));

    // Reordered.
    let (mut agent, mut server) = p.connect();
    let first = agent.seal(b"first").unwrap();
    let second = agent.seal(b"second").unwrap();
    assert_eq!(server.open(&second), Err(E2eError::Open));
    drop(first);

    // A two-piece frame split into two messages, or two frames joined into one.
    let (mut agent, mut server) = p.connect();
    let big = agent.seal(&vec![7u8; MAX_PIECE_BYTES + 10]).unwrap();
    let cut = 2 + usize::from(u16::from_be_bytes([big[0], big[1]]));
    assert_eq!(server.open(&big[..cut]), Err(E2eError::Open));
    let (mut agent, mut server) = p.connect();
    let joined = [agent.seal(b"a").unwrap(), agent.seal(b"b").unwrap()].concat();
    assert_eq!(server.open(&joined), Err(E2eError::Open));

    // Injected: bytes the relay made up, and a frame of another session.
    let (_, mut server) = p.connect();
    assert_eq!(server.open(b"\x00\x05hello"), Err(E2eError::Open));
    assert_eq!(server.open(b""), Err(E2eError::Open));
    let (mut other_agent, _) = p.connect();
    let foreign = other_agent.seal(b"from elsewhere").unwrap();
    assert_eq!(server.open(&foreign), Err(E2eError::Open));
}
