//! Agent upgrades end to end, with the real binaries: the workspace's own `tether-agent`
//! uploaded as a newer version and swapped in while a deployment runs (nothing lost, nothing
//! run twice, work sent during the upgrade runs after it); a "new version" that crashes at
//! start rolled back automatically; and packages refused with nothing changed on disk: an
//! older version, content altered on the server after upload (bad sha256), and a package
//! signature that is not the server's (through a fake upstream, as a compromised relay would).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tether_shared::identity::Identity;
use tether_shared::protocol::{command_signing_bytes, Command, CommandBody, EventBody, Frame, Seq};
use tether_shared::upgrade::package_signing_bytes;
use tether_tests::fake_upstream::FakeUpstream;
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::relays::Relay;

const WAIT: Duration = Duration::from_secs(60);
/// The version the workspace's agent reports (it has no package version of its own).
const BUILD_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Short trial timers, and beats every second (a third of the beat timeout).
const AGENT_ENV: &[(&str, &str)] = &[
    ("TETHER_AGENT__WORKER_BEAT_TIMEOUT_MS", "3000"),
    ("TETHER_AGENT__UPGRADE_HEALTHY_AFTER_MS", "2000"),
    ("TETHER_AGENT__UPGRADE_TRIAL_TIMEOUT_MS", "20000"),
];

/// A server and one running, online agent.
fn fleet(tmp: &TestDir, name: &str) -> (Server, Agent) {
    let server = Server::start(tmp.path());
    let mut agent = Agent::install_with(&server, tmp.path(), name, &["up"], AGENT_ENV);
    agent.run();
    eventually("the agent online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    (server, agent)
}

fn rollout(server: &Server, version: &str, agent: &Agent) {
    let r = server.request(
        "POST",
        &format!("/api/v1/upgrades/{version}/rollout"),
        Some(&json!({"targets": {"agents": [agent.name]}})),
    );
    assert_eq!(r.status, 202, "rollout {version}: {}", r.body);
    assert_eq!(r.json()["agents"][0]["queued"], true, "{}", r.body);
}

/// Polls the agent's list entry until its upgrade to `version` is in `state`.
fn wait_upgrade(server: &Server, agent: &Agent, version: &str, state: &str) -> Value {
    eventually(&format!("upgrade {version} {state}"), WAIT, || {
        let a = server.agent(&agent.id)?;
        let u = &a["upgrade"];
        if u["version"] == version && u["state"] != state {
            let s = u["state"].as_str().unwrap_or("");
            assert!(
                matches!(s, "requested" | "upgrading"),
                "upgrade {version} ended {s} instead of {state}: {a}"
            );
        }
        (u["version"] == version && u["state"] == state).then_some(a)
    })
}

/// The agent's `DATA/upgrade` entries (file names), sorted; empty if the directory is absent.
fn upgrade_dir(agent: &Agent) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(agent.dir.join("upgrade"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The program the agent's worker process runs now.
fn worker_exe(agent: &Agent) -> PathBuf {
    eventually("a worker process", WAIT, || {
        let pid = agent.worker_pid()?;
        std::fs::read_link(format!("/proc/{pid}/exe")).ok()
    })
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn shell(name: &str, script: String) -> Value {
    json!({"name": name, "plugin": "shell", "step": "run", "properties": {"script": script}})
}

#[test]
fn the_agent_upgrades_while_a_deployment_runs_and_nothing_is_lost_or_doubled() {
    let tmp = TestDir::new();
    let (server, agent) = fleet(&tmp, "up-1");
    let out = tmp.path().join("markers");
    std::fs::create_dir_all(&out).unwrap();
    let m = |name: &str| out.join(name);
    let binary = std::fs::read(tether_tests::bin("tether-agent")).unwrap();
    let package = server.upload_upgrade("99.0.0", &binary);
    assert_eq!(package["sha256"], hex::encode(Sha256::digest(&binary)));
    let listed = server.request("GET", "/api/v1/upgrades", None).json();
    assert_eq!(listed[0]["version"], "99.0.0", "{listed}");

    server.put_process(&json!({"name": "long", "steps": [
        shell("one", format!("echo x >> {}", m("one").display())),
        shell("two", format!("echo x >> {}; sleep 3; echo x >> {}", m("two").display(), m("two-done").display())),
        shell("three", format!("echo x >> {}", m("three").display())),
    ]}));
    server.put_process(&json!({"name": "late", "steps": [
        {"name": "mark", "plugin": "shell", "step": "run", "properties": {
            "script": format!("echo x >> {}/\"$TETHER_PROP_WHICH\"", out.display()),
            "which": "${which}"}},
    ]}));
    let late = |which: &str| {
        let body = json!({"process": "late", "targets": {"agents": ["up-1"]},
                          "properties": {"which": which}});
        let r = server.request("POST", "/api/v1/deployments", Some(&body));
        assert_eq!(r.status, 201, "{}", r.body);
        (
            r.json()["id"].as_str().unwrap().to_owned(),
            which.to_owned(),
        )
    };
    let first = server.deploy("long", json!({"agents": ["up-1"]}), json!({}));
    eventually("step two running", WAIT, || m("two").exists().then_some(()));

    // The upgrade arrives while step two runs: it waits for it (drain), nothing else starts.
    rollout(&server, "99.0.0", &agent);
    let mut during = vec![late("during-drain")];
    server.queue_probes(&agent.id, 5, 5);
    let a = wait_upgrade(&server, &agent, "99.0.0", "upgrading");
    assert_eq!(a["status"], "upgrading", "{a}");
    // Once staged, the worker exits for the swap: more work queued now waits on the server.
    eventually("the package staged", WAIT, || {
        let a = server.agent(&agent.id)?;
        a["upgrade"]["reason"]
            .as_str()?
            .contains("staged")
            .then_some(())
    });
    during.push(late("during-swap"));
    server.queue_probes(&agent.id, 5, 5);

    let a = wait_upgrade(&server, &agent, "99.0.0", "done");
    assert_eq!(a["status"], "online", "{a}");
    eventually("the new version reported", WAIT, || {
        (server.agent(&agent.id)?["version"] == "99.0.0").then_some(())
    });
    let program = agent.dir.join("upgrade/tether-agent-99.0.0");
    assert_eq!(worker_exe(&agent), program);
    let active: Value = serde_json::from_str(
        &std::fs::read_to_string(agent.dir.join("upgrade/active.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(active["current"]["version"], "99.0.0", "{active}");
    assert_eq!(
        upgrade_dir(&agent),
        ["active.json", "tether-agent-99.0.0"],
        "only the active record and the new program remain"
    );

    let d = server.wait_deployment(&first, WAIT);
    assert_eq!(d["status"], "succeeded", "{d}");
    for name in ["one", "two", "two-done", "three"] {
        assert_eq!(lines(&m(name)).len(), 1, "marker {name} written once: {d}");
    }
    let swapped = std::fs::metadata(agent.dir.join("upgrade/active.json"))
        .unwrap()
        .modified()
        .unwrap();
    // Steps held by the upgrade ran after it, in the new worker.
    let three = std::fs::metadata(m("three")).unwrap().modified().unwrap();
    assert!(three >= swapped, "step three ran before the swap was done");
    for (id, which) in during {
        let d = server.wait_deployment(&id, WAIT);
        assert_eq!(d["status"], "succeeded", "{which}: {d}");
        assert_eq!(lines(&m(&which)).len(), 1, "{which} ran once");
        let at = std::fs::metadata(m(&which)).unwrap().modified().unwrap();
        assert!(at >= swapped, "{which} ran before the upgrade was done");
    }
    server.wait_for_probes(&agent.id, 10, 10, WAIT);

    // A rollout of the version the agent already runs is not queued again.
    let r = server.request(
        "POST",
        "/api/v1/upgrades/99.0.0/rollout",
        Some(&json!({"targets": {"tags": ["up"]}})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["agents"][0]["queued"], false, "{}", r.body);
}

#[test]
fn a_new_version_that_crashes_at_start_is_rolled_back() {
    let tmp = TestDir::new();
    let (server, agent) = fleet(&tmp, "crash-1");
    let original = worker_exe(&agent);
    server.upload_upgrade("99.0.1", b"#!/bin/sh\nexit 3\n");
    rollout(&server, "99.0.1", &agent);
    let a = wait_upgrade(&server, &agent, "99.0.1", "rolled_back");
    let reason = a["upgrade"]["reason"].as_str().unwrap();
    assert!(reason.contains("exited with code 3"), "{a}");
    eventually("the old worker online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    assert_eq!(server.agent(&agent.id).unwrap()["version"], BUILD_VERSION);
    assert_eq!(worker_exe(&agent), original);
    assert!(upgrade_dir(&agent).is_empty(), "{:?}", upgrade_dir(&agent));

    // The old version still works.
    let marker = tmp.path().join("after-rollback");
    server.put_process(&json!({"name": "after", "steps": [
        shell("mark", format!("echo x >> {}", marker.display())),
    ]}));
    let id = server.deploy("after", json!({"agents": ["crash-1"]}), json!({}));
    let d = server.wait_deployment(&id, WAIT);
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(lines(&marker).len(), 1);
}

#[test]
fn a_step_that_outlasts_the_drain_timeout_is_never_killed_the_upgrade_is_abandoned() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let env: Vec<(&str, &str)> = AGENT_ENV
        .iter()
        .copied()
        .chain([("TETHER_AGENT__UPGRADE_DRAIN_TIMEOUT_MS", "1000")])
        .collect();
    let mut agent = Agent::install_with(&server, tmp.path(), "busy-1", &[], &env);
    agent.run();
    eventually("the agent online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    let (started, done) = (tmp.path().join("started"), tmp.path().join("done"));
    server.put_process(&json!({"name": "slow", "steps": [
        shell("slow", format!("echo x >> {}; sleep 4; echo x >> {}", started.display(), done.display())),
    ]}));
    let id = server.deploy("slow", json!({"agents": ["busy-1"]}), json!({}));
    eventually("the step running", WAIT, || started.exists().then_some(()));
    server.upload_upgrade("99.0.3", b"#!/bin/sh\nexit 0\n");
    rollout(&server, "99.0.3", &agent);
    let a = wait_upgrade(&server, &agent, "99.0.3", "refused");
    let reason = a["upgrade"]["reason"].as_str().unwrap();
    assert!(reason.contains("drain timeout"), "{a}");
    let d = server.wait_deployment(&id, WAIT);
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!((lines(&started).len(), lines(&done).len()), (1, 1));
    assert!(upgrade_dir(&agent).is_empty(), "{:?}", upgrade_dir(&agent));
    assert_eq!(server.agent(&agent.id).unwrap()["version"], BUILD_VERSION);
}

#[test]
fn an_agent_behind_a_relay_gets_its_package_through_the_relay() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let relay = Relay::start(&server, &[server.upstream()], tmp.path(), "relay-a");
    let mut agent = Agent::install_via(
        &server,
        &[relay.upstream()],
        tmp.path(),
        "far-1",
        &[],
        AGENT_ENV,
    );
    agent.run();
    eventually("the agent online through the relay", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    // A package that only a completed, verified download can have put on trial.
    server.upload_upgrade("99.0.4", b"#!/bin/sh\nexit 4\n");
    rollout(&server, "99.0.4", &agent);
    let a = wait_upgrade(&server, &agent, "99.0.4", "rolled_back");
    let reason = a["upgrade"]["reason"].as_str().unwrap();
    assert!(reason.contains("exited with code 4"), "{a}");
    assert_eq!(a["path"][0], "relay-a", "{a}");
}

#[test]
fn older_and_altered_packages_are_refused_with_nothing_changed() {
    let tmp = TestDir::new();
    let (server, agent) = fleet(&tmp, "refuse-1");
    let original = worker_exe(&agent);
    let script = b"#!/bin/sh\nexit 0\n";

    // Older than the running version: refused on arrival, nothing downloaded.
    server.upload_upgrade("0.0.1", script);
    rollout(&server, "0.0.1", &agent);
    let a = wait_upgrade(&server, &agent, "0.0.1", "refused");
    let reason = a["upgrade"]["reason"].as_str().unwrap();
    assert!(reason.contains("not newer"), "{a}");
    assert!(upgrade_dir(&agent).is_empty(), "{:?}", upgrade_dir(&agent));

    // Altered on the server's disk after it was signed: the download does not verify.
    let package = server.upload_upgrade("99.0.2", script);
    let blob = server
        .dir
        .join("upgrades/sha256")
        .join(package["sha256"].as_str().unwrap());
    std::fs::write(&blob, b"#!/bin/sh\nexit 1\n").unwrap();
    rollout(&server, "99.0.2", &agent);
    let a = wait_upgrade(&server, &agent, "99.0.2", "refused");
    let reason = a["upgrade"]["reason"].as_str().unwrap();
    assert!(reason.contains("verification failed"), "{a}");
    assert!(upgrade_dir(&agent).is_empty(), "{:?}", upgrade_dir(&agent));

    assert_eq!(server.agent_status(&agent.id), "online");
    assert_eq!(server.agent(&agent.id).unwrap()["version"], BUILD_VERSION);
    assert_eq!(worker_exe(&agent), original);
}

#[test]
fn the_upgrade_api_refuses_what_it_must_and_stores_nothing_for_it() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let put = |version: &str, body: &[u8]| {
        server.request_raw("PUT", &format!("/api/v1/upgrades/{version}"), &[], body)
    };
    for bad in ["latest", "1.2", "1.2.3-rc1", "01.2.3", "..%2f..%2fx"] {
        let r = put(bad, b"x");
        assert!(
            matches!(r.status, 400 | 404),
            "{bad}: {} {}",
            r.status,
            r.body
        );
    }
    let r = tether_tests::https_request_with_body(
        server.https,
        server.tls(),
        "localhost",
        "PUT",
        "/api/v1/upgrades/1.0.0",
        &[],
        Some(b"x"),
    )
    .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    let r = put("1.0.0", b"");
    assert_eq!(r.status, 400, "{}", r.body);
    let r = put("1.0.0", b"one");
    assert_eq!(r.status, 201, "{}", r.body);
    let sha = r.json()["sha256"].as_str().unwrap().to_owned();
    assert_eq!(put("1.0.0", b"one").status, 200, "the same content again");
    let r = put("1.0.0", b"two");
    assert_eq!(r.status, 409, "{}", r.body);
    let r = server.request_raw(
        "PUT",
        "/api/v1/upgrades/1.0.1",
        &[("X-Checksum-Sha256", &"0".repeat(64))],
        b"three",
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let listed = server.request("GET", "/api/v1/upgrades", None).json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let blobs = std::fs::read_dir(server.dir.join("upgrades/sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 1);
    let temps = std::fs::read_dir(server.dir.join("upgrades/tmp"))
        .unwrap()
        .count();
    assert_eq!(temps, 0);

    let targets = json!({"targets": {"agents": ["nobody"]}});
    let r = server.request("POST", "/api/v1/upgrades/9.9.9/rollout", Some(&targets));
    assert_eq!(r.status, 404, "{}", r.body);
    let r = server.request("POST", "/api/v1/upgrades/1.0.0/rollout", Some(&targets));
    assert_eq!(r.status, 400, "{}", r.body);
    let extra = json!({"targets": {"tags": ["x"]}, "force": true});
    let r = server.request("POST", "/api/v1/upgrades/1.0.0/rollout", Some(&extra));
    assert_eq!(r.status, 400, "{}", r.body);

    // Agents download only with their signature, on the agent-facing listener only.
    let path = format!("/agent/v1/upgrades/{sha}");
    let r = tether_tests::https_request(server.wss, server.tls(), "localhost", "GET", &path, &[])
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    let r = server.request("GET", &path, None);
    assert_eq!(r.status, 404, "{}", r.body);
}

#[test]
fn a_package_not_signed_by_the_server_is_refused_with_nothing_changed() {
    let tmp = TestDir::new();
    let mut server = Server::start(tmp.path());
    let mut agent = Agent::install_with(&server, tmp.path(), "forged-1", &[], AGENT_ENV);
    // A correctly signed command (as a relay would forward it) carrying a package signature
    // by another key: what someone able to rewrite the server's package index could send.
    let sha256 = hex::encode(Sha256::digest(b"#!/bin/sh\nexit 0\n"));
    let body = CommandBody::Upgrade {
        version: "99.1.0".into(),
        sha256: sha256.clone(),
        size: 17,
        signature: Identity::generate().sign(&package_signing_bytes("99.1.0", &sha256)),
    };
    let deadline = u64::try_from(
        (std::time::SystemTime::now() + Duration::from_secs(600))
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let signer = Identity::load(&server.dir.join("signing.key")).unwrap();
    let mut c = Command::new(Seq(1), "c-upgrade".into(), deadline, body.clone()).unwrap();
    c.signature =
        signer.sign(&command_signing_bytes(&agent.id, "c-upgrade", deadline, &body).unwrap());
    let addr = server.wss;
    server.kill();
    let key = tether_tests::wire::agent_identity(&agent.dir).public_key();
    let seen = FakeUpstream::start(&server, addr, key, Frame::Command(c).encode().unwrap());
    agent.run();
    let reason = eventually("the upgrade refused", WAIT, || {
        seen.lock().unwrap().events.iter().find_map(|e| match e {
            EventBody::UpgradeRefused { version, reason } if version == "99.1.0" => {
                Some(reason.clone())
            }
            _ => None,
        })
    });
    assert!(reason.contains("signature"), "{reason}");
    let events = &seen.lock().unwrap().events;
    assert!(
        !events.iter().any(|e| matches!(
            e,
            EventBody::UpgradeStarted { .. } | EventBody::UpgradeStaged { .. }
        )),
        "{events:?}"
    );
    assert!(upgrade_dir(&agent).is_empty(), "{:?}", upgrade_dir(&agent));
}
