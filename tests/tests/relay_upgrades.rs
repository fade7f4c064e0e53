//! Relay upgrades end to end, with the real binaries: the workspace's own `tether-relay`
//! uploaded as relay package 99.0.0 and rolled out while an agent behind the relay runs a
//! deployment and exchanges probes (nothing lost or doubled; the relay re-executes itself into
//! the new binary, same pid, and the agent comes back through it); a "new version" that exits
//! at once rolled back automatically by the installed binary, restarted by a supervisor as
//! systemd would; and an older version refused with nothing written.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::relays::{relay_entry, Relay};

const WAIT: Duration = Duration::from_secs(90);
/// The version the workspace's relay reports.
const BUILD_VERSION: &str = env!("CARGO_PKG_VERSION");
/// A short trial.
const RELAY_ENV: &[(&str, &str)] = &[("TETHER_RELAY__UPGRADE_HEALTHY_AFTER_MS", "2000")];

fn rollout(server: &Server, version: &str, relay: &Relay) {
    let r = server.request(
        "POST",
        &format!("/api/v1/upgrades/{version}/rollout"),
        Some(&json!({"targets": {"relays": [relay.name]}})),
    );
    assert_eq!(r.status, 202, "rollout {version}: {}", r.body);
    assert_eq!(r.json()["relays"][0]["queued"], true, "{}", r.body);
    assert_eq!(r.json()["relays"][0]["id"], relay.id, "{}", r.body);
}

/// Polls the relay's list entry until its upgrade to `version` is in `state`.
fn wait_upgrade(server: &Server, relay: &Relay, version: &str, state: &str) -> Value {
    eventually(&format!("relay upgrade {version} {state}"), WAIT, || {
        let r = relay_entry(server, &relay.name)?;
        let u = &r["upgrade"];
        if u["version"] == version && u["state"] != state {
            let s = u["state"].as_str().unwrap_or("");
            assert!(
                matches!(s, "requested" | "upgrading"),
                "relay upgrade {version} ended {s} instead of {state}: {r}"
            );
        }
        (u["version"] == version && u["state"] == state).then_some(r)
    })
}

/// The relay's `DATA/upgrade` entries, sorted; empty if the directory is absent.
fn upgrade_dir(relay: &Relay) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(relay.dir.join("upgrade"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .count()
}

fn online_through(server: &Server, agent: &Agent, relay: &Relay) {
    eventually(
        &format!("{} online through the relay", agent.name),
        WAIT,
        || {
            server
                .agent(&agent.id)
                .filter(|a| a["status"] == "online" && a["path"] == json!([relay.name]))
        },
    );
}

/// A server, a relay (supervised or not), and an agent behind it, online.
fn fleet(tmp: &TestDir, supervised: bool) -> (Server, Relay, Agent) {
    let server = Server::start(tmp.path());
    let mut relay = Relay::install(&server, &[server.upstream()], tmp.path(), "edge", RELAY_ENV);
    if supervised {
        relay.run_supervised();
    } else {
        // Learn free ports, then run on them fixed, as a configured relay does: the re-executed
        // binary inherits the same arguments and environment, so it listens where agents expect.
        relay.run();
        relay.kill();
        relay.run();
    }
    let mut agent = Agent::install_via(
        &server,
        &[relay.upstream()],
        tmp.path(),
        "behind",
        &["edge"],
        &[],
    );
    agent.run();
    online_through(&server, &agent, &relay);
    (server, relay, agent)
}

#[test]
fn a_relay_upgrades_itself_while_agents_behind_it_work_and_nothing_is_lost() {
    let tmp = TestDir::new();
    let (server, relay, agent) = fleet(&tmp, false);
    let pid = relay.child.as_ref().unwrap().id();
    let binary = std::fs::read(tether_tests::bin("tether-relay")).unwrap();
    let package = server.upload_package("99.0.0", "relay", &binary);
    assert_eq!(package["component"], "relay", "{package}");
    assert_eq!(package["sha256"], hex::encode(Sha256::digest(&binary)));
    let listed = server.request("GET", "/api/v1/upgrades", None).json();
    assert_eq!(listed[0]["component"], "relay", "{listed}");
    // A relay package is no agent package: it cannot be rolled out to agents.
    let r = server.request(
        "POST",
        "/api/v1/upgrades/99.0.0/rollout",
        Some(&json!({"targets": {"agents": [agent.name]}})),
    );
    assert_eq!(r.status, 404, "{}", r.body);

    let out = tmp.path().join("markers");
    std::fs::create_dir_all(&out).unwrap();
    let m = |name: &str| out.join(name);
    let shell = |name: &str, script: String| json!({"name": name, "plugin": "shell", "step": "run", "properties": {"script": script}});
    server.put_process(&json!({"name": "long", "steps": [
        shell("one", format!("echo x >> {}", m("one").display())),
        shell("two", format!("echo x >> {}; sleep 3; echo x >> {}", m("two").display(), m("two-done").display())),
        shell("three", format!("echo x >> {}", m("three").display())),
    ]}));
    let deployment = server.deploy("long", json!({"agents": [agent.name]}), json!({}));
    eventually("step two running", WAIT, || m("two").exists().then_some(()));
    server.queue_probes(&agent.id, 50, 50);

    rollout(&server, "99.0.0", &relay);
    server.queue_probes(&agent.id, 50, 50);
    let r = wait_upgrade(&server, &relay, "99.0.0", "done");
    assert_eq!(r["status"], "online", "{r}");
    eventually("the relay reports 99.0.0", WAIT, || {
        relay_entry(&server, &relay.name).filter(|r| r["version"] == "99.0.0")
    });
    // The same process (systemd's unit keeps its pid) now runs the package.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, relay.dir.join("upgrade/tether-relay-99.0.0"));
    assert_eq!(relay.health()["version"], "99.0.0");
    assert_eq!(
        upgrade_dir(&relay),
        ["active.json", "result.json", "tether-relay-99.0.0"]
    );

    online_through(&server, &agent, &relay);
    let d = server.wait_deployment(&deployment, WAIT);
    assert_eq!(d["status"], "succeeded", "{d}");
    for marker in ["one", "two", "two-done", "three"] {
        assert_eq!(lines(&m(marker)), 1, "step marker {marker} written once");
    }
    server.queue_probes(&agent.id, 50, 50);
    server.wait_for_probes(&agent.id, 150, 150, WAIT);

    // A rollout of the version it runs is left alone.
    let r = server.request(
        "POST",
        "/api/v1/upgrades/99.0.0/rollout",
        Some(&json!({"targets": {"relays": [relay.name]}})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["relays"][0]["queued"], false, "{}", r.body);
}

#[test]
fn a_relay_that_does_not_start_is_rolled_back_and_the_old_one_carries_the_agents() {
    let tmp = TestDir::new();
    let (server, relay, agent) = fleet(&tmp, true);
    server.upload_package("99.0.0", "relay", b"#!/bin/sh\nexit 3\n");
    rollout(&server, "99.0.0", &relay);
    let r = wait_upgrade(&server, &relay, "99.0.0", "rolled_back");
    assert_eq!(r["upgrade"]["reason"], "the new relay did not start", "{r}");
    assert!(relay.restarts() >= 1, "the supervisor restarted the relay");
    eventually("the old relay online", WAIT, || {
        relay_entry(&server, &relay.name)
            .filter(|r| r["status"] == "online" && r["version"] == BUILD_VERSION)
    });
    assert_eq!(upgrade_dir(&relay), ["result.json"], "the trial is gone");
    online_through(&server, &agent, &relay);
    server.queue_probes(&agent.id, 20, 20);
    server.wait_for_probes(&agent.id, 20, 20, WAIT);
    // Reconnecting does not try the rolled-back version again.
    let restarts = relay.restarts();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(relay.restarts(), restarts);
    let r = relay_entry(&server, &relay.name).unwrap();
    assert_eq!(r["upgrade"]["state"], "rolled_back", "{r}");

    // A new rollout of that version is tried again (and fails the same way).
    rollout(&server, "99.0.0", &relay);
    let r = wait_upgrade(&server, &relay, "99.0.0", "rolled_back");
    assert_eq!(r["upgrade"]["reason"], "the new relay did not start", "{r}");
    assert!(relay.restarts() > restarts, "tried again");
    online_through(&server, &agent, &relay);
    server.queue_probes(&agent.id, 20, 20);
    server.wait_for_probes(&agent.id, 40, 40, WAIT);
}

#[test]
fn a_relay_refuses_an_older_version_with_nothing_written() {
    let tmp = TestDir::new();
    let (server, relay, agent) = fleet(&tmp, false);
    server.upload_package("0.0.1", "relay", b"#!/bin/sh\nexit 3\n");
    // Rolled out from the web application's relays page.
    let r = server.request(
        "POST",
        "/api/v1/users",
        Some(&json!({"name": "ops", "password": "relay-upgrade-pw-1", "role": "admin"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let cookie = server.web_login("ops", "relay-upgrade-pw-1");
    let page = server.web_get(&cookie, "/relays").body;
    assert!(page.contains("<option value=\"0.0.1\">"), "{page}");
    let r = server.web_post(
        &cookie,
        &tether_tests::csrf_of(&page),
        &format!("/relays/{}/upgrade", relay.id),
        "version=0.0.1",
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let r = wait_upgrade(&server, &relay, "0.0.1", "refused");
    let reason = r["upgrade"]["reason"].as_str().unwrap();
    assert!(reason.contains("not newer"), "{r}");
    assert_eq!(r["version"], BUILD_VERSION, "{r}");
    assert!(upgrade_dir(&relay).is_empty(), "{:?}", upgrade_dir(&relay));
    online_through(&server, &agent, &relay);
    let r = server.request(
        "POST",
        "/api/v1/upgrades/0.0.1/rollout",
        Some(&json!({"targets": {"relays": ["no-such-relay"]}})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
}

#[test]
fn a_relay_behind_a_relay_is_upgraded_through_it() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let outer = Relay::start(&server, &[server.upstream()], tmp.path(), "outer");
    let mut inner = Relay::install(&server, &[outer.upstream()], tmp.path(), "inner", RELAY_ENV);
    inner.run();
    inner.kill();
    inner.run();
    let mut agent = Agent::install_via(
        &server,
        &[inner.upstream()],
        tmp.path(),
        "deep",
        &["edge"],
        &[],
    );
    agent.run();
    eventually("the agent online through both relays", WAIT, || {
        server
            .agent(&agent.id)
            .filter(|a| a["status"] == "online" && a["path"] == json!(["inner", "outer"]))
    });
    let binary = std::fs::read(tether_tests::bin("tether-relay")).unwrap();
    server.upload_package("99.0.0", "relay", &binary);
    server.queue_probes(&agent.id, 30, 30);
    rollout(&server, "99.0.0", &inner);
    server.queue_probes(&agent.id, 30, 30);
    let r = wait_upgrade(&server, &inner, "99.0.0", "done");
    assert_eq!(r["path"], json!(["outer"]), "{r}");
    eventually("inner reports 99.0.0", WAIT, || {
        relay_entry(&server, "inner").filter(|r| r["version"] == "99.0.0")
    });
    // The outer relay was not touched; the package crossed it once (and is cached there).
    let o = relay_entry(&server, "outer").unwrap();
    assert_eq!(o["version"], BUILD_VERSION, "{o}");
    assert!(o["upgrade"].is_null(), "{o}");
    assert_eq!(outer.health()["cache"]["misses"], 1, "{}", outer.health());
    server.wait_for_probes(&agent.id, 60, 60, WAIT);
}
