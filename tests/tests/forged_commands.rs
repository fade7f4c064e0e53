//! Commands injected on the wire: a fake upstream (what a compromised relay or a
//! man-in-the-middle holding a certificate from the right CA could do) speaks the real protocol
//! to a real agent. A command signed by anyone but the server — or for another agent — is
//! refused before anything about it is recorded (no job, no marker, no acceptance event); a
//! correctly signed command past its deadline is reported expired, not run; a correctly signed
//! current one runs (the control that proves the fake works). A `Trust` command (new signing
//! keys and CAs) not signed by the server, or unusable, changes nothing the agent trusts; one
//! from the server is applied and confirmed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_shared::identity::Identity;
use tether_shared::protocol::{
    command_signing_bytes, Command, CommandBody, EventBody, Frame, OnInterrupt, Seq, StepSpec,
};
use tether_shared::trust::TrustSet;
use tether_tests::fake_upstream::{FakeUpstream, Seen};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};

const WAIT: Duration = Duration::from_secs(30);

fn run_job(
    agent_id: &str,
    marker: &std::path::Path,
    signer: &Identity,
    deadline_ms: u64,
) -> Vec<u8> {
    let body = CommandBody::RunJob {
        job_id: "j-injected".into(),
        deployment_id: "d-injected".into(),
        steps: vec![StepSpec {
            name: "pwn".into(),
            plugin: "shell".into(),
            step: "run".into(),
            properties: BTreeMap::from([(
                "script".to_string(),
                format!("touch {}", marker.display()),
            )]),
            secrets: Vec::new(),
            on_interrupt: OnInterrupt::Fail,
            timeout_ms: 10_000,
            bundle: None,
            sealed: None,
        }],
    };
    signed(agent_id, signer, deadline_ms, body)
}

fn signed(agent_id: &str, signer: &Identity, deadline_ms: u64, body: CommandBody) -> Vec<u8> {
    let mut c = Command::new(Seq(1), "c-injected".into(), deadline_ms, body.clone()).unwrap();
    c.signature =
        signer.sign(&command_signing_bytes(agent_id, "c-injected", deadline_ms, &body).unwrap());
    Frame::Command(c).encode().unwrap()
}

/// A `Trust` command for `agent_id`, signed by `signer`, putting `keys` and `ca_pem` in force.
fn trust(agent_id: &str, signer: &Identity, keys: Vec<String>, ca_pem: String) -> Vec<u8> {
    let set = TrustSet {
        serial: 1,
        signing_keys: keys,
        ca_pem,
    };
    signed(
        agent_id,
        signer,
        now_ms() + 600_000,
        CommandBody::Trust { set },
    )
}

/// Builds the command frame to inject, from the real server and the target agent.
type MakeCommand = fn(&Server, &Agent, &std::path::Path) -> Vec<u8>;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// An agent enrolled with a real server, whose upstream address is then taken by the fake.
fn agent_behind_a_fake(
    tmp: &TestDir,
    name: &str,
    command: impl FnOnce(&Server, &Agent) -> Vec<u8>,
) -> (Agent, Arc<Mutex<Seen>>) {
    let mut server = Server::start(tmp.path());
    let mut agent = Agent::install(&server, tmp.path(), name, &[]);
    let frame = command(&server, &agent);
    let addr = server.wss;
    server.kill();
    let key = tether_tests::wire::agent_identity(&agent.dir).public_key();
    let seen = FakeUpstream::start(&server, addr, key, frame);
    agent.run();
    (agent, seen)
}

#[test]
fn commands_not_signed_by_the_server_for_this_agent_are_refused_unrecorded() {
    let cases: [(&str, MakeCommand); 2] = [
        ("signed by another key", |_, a, m| {
            run_job(&a.id, m, &Identity::generate(), now_ms() + 600_000)
        }),
        ("signed for another agent", |s, _, m| {
            run_job(
                "a-someone-else",
                m,
                &Identity::load(&s.dir.join("signing.key")).unwrap(),
                now_ms() + 600_000,
            )
        }),
    ];
    for (case, make) in cases {
        let tmp = TestDir::new();
        let marker = tmp.path().join("pwned");
        let (agent, seen) = agent_behind_a_fake(&tmp, "target-1", |s, a| make(s, a, &marker));
        // Refused: the agent logs why, drops the connection, and comes back for another try.
        let log = tmp.path().join("target-1.log");
        eventually(&format!("{case}: the agent refuses it"), WAIT, || {
            let refused = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("not signed by the server");
            (refused && seen.lock().unwrap().hellos >= 2).then_some(())
        });
        let s = seen.lock().unwrap();
        assert!(
            !s.events
                .iter()
                .any(|e| matches!(e, EventBody::JobAccepted { .. })),
            "{case}: accepted: {:?}",
            s.events
        );
        assert!(!marker.exists(), "{case}: the injected step ran");
        let journal_has_job = std::fs::read_dir(agent.dir.join("work"))
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        assert!(!journal_has_job, "{case}: a job directory exists");
    }
}

#[test]
fn a_signed_command_past_its_deadline_is_reported_expired_and_a_current_one_runs() {
    let tmp = TestDir::new();
    let marker = tmp.path().join("ran");
    let (_agent, seen) = agent_behind_a_fake(&tmp, "late-1", |s, a| {
        run_job(
            &a.id,
            &marker,
            &Identity::load(&s.dir.join("signing.key")).unwrap(),
            now_ms() - 1,
        )
    });
    eventually("the expiry reported", WAIT, || {
        let s = seen.lock().unwrap();
        s.events
            .iter()
            .any(|e| {
                matches!(
                    e,
                    EventBody::JobFinished {
                        status: tether_shared::protocol::JobStatus::Expired,
                        ..
                    }
                )
            })
            .then_some(())
    });
    assert!(!marker.exists(), "an expired command ran");

    // The control: the same fake with a current deadline gets the job run.
    let tmp = TestDir::new();
    let marker = tmp.path().join("ran");
    let (_agent, seen) = agent_behind_a_fake(&tmp, "ok-1", |s, a| {
        run_job(
            &a.id,
            &marker,
            &Identity::load(&s.dir.join("signing.key")).unwrap(),
            now_ms() + 600_000,
        )
    });
    eventually("the job accepted and run", WAIT, || {
        (marker.exists()
            && seen
                .lock()
                .unwrap()
                .events
                .iter()
                .any(|e| matches!(e, EventBody::JobAccepted { .. })))
        .then_some(())
    });
}

#[test]
fn a_trust_set_not_from_the_server_or_unusable_changes_nothing_and_a_real_one_is_applied() {
    let cases: [(&str, MakeCommand); 2] = [
        // A relay or a man in the middle would pin its own key and CA.
        ("signed by another key", |_, a, _| {
            let attacker = Identity::generate();
            let ca = tether_shared::tls::Ca::generate("attacker CA").unwrap();
            trust(
                &a.id,
                &attacker,
                vec![attacker.public_key_b64()],
                ca.cert_pem().to_owned(),
            )
        }),
        ("signed by the server, unusable", |s, a, _| {
            let key = Identity::load(&s.dir.join("signing.key")).unwrap();
            trust(
                &a.id,
                &key,
                vec![key.public_key_b64()],
                "not a certificate".into(),
            )
        }),
    ];
    for (case, make) in cases {
        let tmp = TestDir::new();
        let unused = tmp.path().join("unused");
        let (agent, seen) = agent_behind_a_fake(&tmp, "target-1", |s, a| make(s, a, &unused));
        let ca_before = std::fs::read_to_string(agent.dir.join("ca.pem")).unwrap();
        let log = tmp.path().join("target-1.log");
        eventually(&format!("{case}: the agent refuses it"), WAIT, || {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            let refused = log.contains("not signed by the server") || log.contains("trust-refused");
            (refused && seen.lock().unwrap().hellos >= 2).then_some(())
        });
        let s = seen.lock().unwrap();
        assert!(
            !s.events
                .iter()
                .any(|e| matches!(e, EventBody::TrustApplied { .. })),
            "{case}: applied: {:?}",
            s.events
        );
        assert!(
            !agent.dir.join("trust.json").exists(),
            "{case}: trust.json written"
        );
        assert_eq!(
            std::fs::read_to_string(agent.dir.join("ca.pem")).unwrap(),
            ca_before,
            "{case}: ca.pem changed"
        );
    }

    // The control: the server's key, a usable set (the same CAs, one more key).
    let tmp = TestDir::new();
    let (agent, seen) = agent_behind_a_fake(&tmp, "ok-1", |s, a| {
        let key = Identity::load(&s.dir.join("signing.key")).unwrap();
        let ca = std::fs::read_to_string(s.ca_path()).unwrap();
        trust(
            &a.id,
            &key,
            vec![key.public_key_b64(), Identity::generate().public_key_b64()],
            ca,
        )
    });
    eventually("the set applied and confirmed", WAIT, || {
        seen.lock()
            .unwrap()
            .events
            .iter()
            .any(|e| matches!(e, EventBody::TrustApplied { serial: 1 }))
            .then_some(())
    });
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(agent.dir.join("trust.json")).unwrap())
            .unwrap();
    assert_eq!(t["serial"], 1, "{t}");
    assert_eq!(t["signing_keys"].as_array().map(Vec::len), Some(2), "{t}");
}
