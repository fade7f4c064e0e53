//! A rollover of the server's command-signing key, server CA and relay CA on a running fleet
//! (agents direct and behind a relay), with deployments under way: begin (both trusted),
//! switch (the new ones sign and certify), finish (the new ones alone). Every agent and the
//! relay end on the new keys with nothing reinstalled; every job runs exactly once; after the
//! finish, a server signing with the old key is refused by every agent (and the fleet returns
//! once it signs with the new one again).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::relays::Relay;
use tether_tests::tether_cli::Tether;

const WAIT: Duration = Duration::from_secs(90);

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn trust_json(dir: &Path) -> Value {
    serde_json::from_str(&read(&dir.join("trust.json"))).unwrap()
}

fn step(server: &Server, name: &str) -> Value {
    let r = server.request("POST", &format!("/api/v1/trust/{name}"), None);
    assert_eq!(r.status, 200, "{name}: {}", r.body);
    r.json()
}

/// A simulated agent named `name` (its release, "loadgen-…", reads no `Trust` command), saying
/// it holds trust set `trust_serial`: its id, and the fleet that runs it.
fn simulated_agent(
    server: &Server,
    name: &str,
    trust_serial: u64,
) -> (String, tether_tests::loadgen::Fleet) {
    use tether_tests::loadgen::{enroll, Fleet, SimConfig};
    let ca = read(&server.ca_path());
    let tls = tether_shared::tls::client_config(&ca).unwrap();
    let sim = enroll(
        server.wss,
        std::sync::Arc::new(tls.clone()),
        "localhost",
        &server.token(1),
        name,
    )
    .unwrap();
    let id = sim.agent_id.clone();
    let mut cfg = SimConfig::new(server.wss, "localhost", tls);
    cfg.threads = 1;
    cfg.trust_serial = trust_serial;
    (id, Fleet::start(cfg, vec![sim]).unwrap())
}

fn progress(server: &Server) -> Value {
    let r = server.request("GET", "/api/v1/trust", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// Waits until every agent and relay holds trust set `serial` and nothing blocks the next step.
fn all_confirmed(server: &Server, serial: u64) -> Value {
    eventually(&format!("every peer on trust set {serial}"), WAIT, || {
        let p = progress(server);
        (p["serial"] == serial && p["confirmed"] == p["peers"] && p["waiting_for"].is_null())
            .then_some(p)
    })
}

/// A deployment to `agents` whose one step appends a line to `marker` (after `sleep_s`).
fn deploy(server: &Server, agents: &[&Agent], marker: &Path, sleep_s: u32) -> String {
    let name = format!("rollover-{}", marker.file_name().unwrap().to_string_lossy());
    server.put_process(&json!({
        "name": name,
        "steps": [{"name": "mark", "plugin": "shell", "step": "run",
                   "properties": {"script": format!("sleep {sleep_s}; echo ran >> {}", marker.display())}}]
    }));
    let names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    server.deploy(&name, json!({ "agents": names }), json!({}))
}

/// The deployment succeeded and every agent ran its step once.
fn ran_once_each(server: &Server, id: &str, marker: &Path, agents: usize) {
    let d = server.wait_deployment(id, WAIT);
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(
        read(marker).lines().count(),
        agents,
        "one run per agent: {d}"
    );
}

#[test]
fn a_key_and_ca_rollover_moves_a_fleet_behind_a_relay_to_new_keys_with_nothing_lost() {
    let dir = TestDir::new();
    let mut server = Server::start_with(
        dir.path(),
        &[("TETHER_SERVER__HEARTBEAT_INTERVAL_MS", "500")],
    );
    let relay = Relay::start(&server, &[server.upstream()], dir.path(), "relay-a");
    let mut agents: Vec<Agent> = (1..=2)
        .map(|i| {
            Agent::install_via(
                &server,
                &[relay.upstream()],
                dir.path(),
                &format!("behind-{i}"),
                &[],
                &[],
            )
        })
        .collect();
    agents.push(Agent::install(&server, dir.path(), "direct-1", &[]));
    for a in &mut agents {
        a.run();
    }
    for a in &agents {
        eventually(&format!("{} online", a.name), WAIT, || {
            server.agent(&a.id).filter(|s| s["status"] == "online")
        });
    }
    let old_key = read(&server.dir.join("signing.pub"));
    let old_ca = read(&server.dir.join("ca.pem"));
    let old_relay_ca = read(&server.dir.join("relay-ca.pem"));
    let saved = dir.path().join("old-keys");
    std::fs::create_dir(&saved).unwrap();
    for f in ["signing.key", "signing.pub", "signing.pem"] {
        std::fs::copy(server.dir.join(f), saved.join(f)).unwrap();
    }
    // An operator's CLI, logged in with the server CA of before the rollover.
    let cli = Tether::new(&dir.path().join("cli"));
    cli.login(&server);
    let p = progress(&server);
    assert_eq!(
        (p["serial"].as_u64(), p["phase"].as_str()),
        (Some(0), Some("steady")),
        "{p}"
    );
    // Nothing to switch to yet.
    assert_eq!(
        server.request("POST", "/api/v1/trust/switch", None).status,
        409
    );

    // A deployment is under way through the whole rollover.
    let agent_refs: Vec<&Agent> = agents.iter().collect();
    let first_marker = dir.path().join("first.txt");
    let first = deploy(&server, &agent_refs, &first_marker, 4);

    // 1. Begin: new keys trusted alongside the old.
    let begun = step(&server, "begin");
    assert_eq!(
        (begun["serial"].as_u64(), begun["phase"].as_str()),
        (Some(1), Some("overlap")),
        "{begun}"
    );
    assert_eq!(
        begun["signing_keys"].as_array().map(Vec::len),
        Some(2),
        "{begun}"
    );
    // The test's client trusts both CAs from now on, as agents do.
    server.api.trust_ca_file(&server.dir.join("agent-ca.pem"));
    let next_key = read(&server.dir.join("next/signing.pub"));
    // `tether trust` stores the CAs the server names: the old and the new.
    let shown = cli.json(&["trust"]);
    assert_eq!(shown["phase"], "overlap", "{shown}");
    let stored: Value = serde_json::from_str(&read(&cli.login_file())).unwrap();
    assert_eq!(
        stored["ca_pem"]
            .as_str()
            .map(|p| p.matches("BEGIN CERTIFICATE").count()),
        Some(2)
    );
    all_confirmed(&server, 1);
    for d in agents.iter().map(|a| &a.dir).chain([&relay.dir]) {
        let t = trust_json(d);
        assert_eq!(t["serial"], 1, "{}: {t}", d.display());
        assert_eq!(
            t["signing_keys"],
            json!([old_key.trim(), next_key.trim()]),
            "{t}"
        );
    }

    // 2. Switch: the new key signs, the new CAs certify.
    let switched = cli.json(&["trust", "switch"]);
    assert_eq!(switched["phase"], "switched", "{switched}");
    assert_eq!(read(&server.dir.join("signing.pub")), next_key);
    let new_ca = read(&server.dir.join("ca.pem"));
    let new_relay_ca = read(&server.dir.join("relay-ca.pem"));
    assert_ne!(new_ca, old_ca);
    // The server serves a certificate from the new CA (a client trusting it alone gets in),
    // and the relay one from the new relay CA, renewed over its link.
    let new_only = std::sync::Arc::new(tether_shared::tls::client_config(&new_ca).unwrap());
    let bearer = format!("Bearer {}", server.admin_token);
    eventually("the server serves the new CA's certificate", WAIT, || {
        let reply = tether_tests::https_request_with_body(
            server.https,
            new_only.clone(),
            "localhost",
            "GET",
            "/api/v1/trust",
            &[("Authorization", &bearer)],
            None,
        );
        reply.ok().filter(|r| r.status == 200).map(drop)
    });
    eventually(
        "the relay serves the new relay CA's certificate",
        WAIT,
        || {
            let pem = read(&relay.dir.join("tls.pem"));
            tether_shared::tls::issued_by(&pem, &new_relay_ca).then_some(())
        },
    );
    all_confirmed(&server, 1);
    // The CLI still reaches the server, whose certificate now comes from the new CA.
    assert_eq!(cli.json(&["trust"])["phase"], "switched");
    ran_once_each(&server, &first, &first_marker, agents.len());
    // Commands signed by the new key run.
    let second_marker = dir.path().join("second.txt");
    let second = deploy(&server, &agent_refs, &second_marker, 0);
    ran_once_each(&server, &second, &second_marker, agents.len());

    // 3. Finish: the new keys alone.
    let finished = cli.json(&["trust", "finish"]);
    assert_eq!(
        (finished["serial"].as_u64(), finished["phase"].as_str()),
        (Some(2), Some("steady")),
        "{finished}"
    );
    assert!(!server.dir.join("previous").exists());
    let stored: Value = serde_json::from_str(&read(&cli.login_file())).unwrap();
    assert_eq!(
        stored["ca_pem"].as_str().map(str::trim),
        Some(new_ca.trim())
    );
    assert_eq!(
        cli.json(&["agents"]).as_array().map(Vec::len),
        Some(agents.len())
    );
    all_confirmed(&server, 2);
    let health = tether_tests::wire::health(&server);
    assert_eq!(
        health["trust"],
        json!({"serial": 2, "phase": "steady", "peers": 4, "behind": 0})
    );
    let metrics = server.request("GET", "/metrics", None).body;
    assert!(
        metrics.contains("tether_trust_serial 2\n")
            && metrics.contains("tether_trust_peers_behind 0\n"),
        "{metrics}"
    );
    for d in agents.iter().map(|a| &a.dir).chain([&relay.dir]) {
        let t = trust_json(d);
        assert_eq!(t["serial"], 2, "{}: {t}", d.display());
        assert_eq!(t["signing_keys"], json!([next_key.trim()]), "{t}");
        let ca = read(&d.join("ca.pem"));
        assert!(
            !ca.contains(old_ca.trim()) && !ca.contains(old_relay_ca.trim()),
            "{}",
            d.display()
        );
        assert!(
            ca.contains(new_ca.trim()) && ca.contains(new_relay_ca.trim()),
            "{}",
            d.display()
        );
    }
    assert_eq!(
        read(&server.dir.join("agent-ca.pem"))
            .matches("BEGIN CERTIFICATE")
            .count(),
        2
    );
    // An agent restarted after the finish dials the relay and the server on the new trust.
    agents[0].kill_worker();
    let third_marker = dir.path().join("third.txt");
    let third = deploy(&server, &agent_refs, &third_marker, 0);
    ran_once_each(&server, &third, &third_marker, agents.len());

    // The old key is refused: a server signing with it again (its key restored by an
    // attacker, say) completes no handshake with any agent, so it can send them nothing.
    server.kill();
    let current = dir.path().join("new-keys");
    std::fs::create_dir(&current).unwrap();
    for f in ["signing.key", "signing.pub", "signing.pem"] {
        std::fs::copy(server.dir.join(f), current.join(f)).unwrap();
        std::fs::copy(saved.join(f), server.dir.join(f)).unwrap();
    }
    let refusals = |a: &Agent| {
        std::fs::read_to_string(dir.path().join(format!("{}.log", a.name)))
            .unwrap_or_default()
            .matches("not signed by a key this agent trusts")
            .count()
    };
    let before: Vec<usize> = agents.iter().map(refusals).collect();
    let restarted_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    server.run();
    for (a, n) in agents.iter().zip(&before) {
        eventually(
            &format!("{} refuses the old key twice", a.name),
            WAIT,
            || (refusals(a) >= n + 2).then_some(()),
        );
    }
    for a in &agents {
        let now = server.agent(&a.id).unwrap();
        assert_ne!(
            now["status"], "online",
            "{} took the old key: {now}",
            a.name
        );
        assert!(
            now["last_seen"].as_u64() < Some(restarted_ms),
            "{} was heard by the server with the old key: {now}",
            a.name
        );
    }

    // Positive control: the new key back, and the fleet deploys again, once per agent.
    server.kill();
    for f in ["signing.key", "signing.pub", "signing.pem"] {
        std::fs::copy(current.join(f), server.dir.join(f)).unwrap();
    }
    server.run();
    let fourth_marker = dir.path().join("fourth.txt");
    let fourth = deploy(&server, &agent_refs, &fourth_marker, 0);
    ran_once_each(&server, &fourth, &fourth_marker, agents.len());
}

#[test]
fn an_agent_of_an_older_release_is_sent_no_trust_set_keeps_working_and_holds_the_switch() {
    let dir = TestDir::new();
    let server = Server::start_with(
        dir.path(),
        &[("TETHER_SERVER__HEARTBEAT_INTERVAL_MS", "500")],
    );
    let mut new = Agent::install(&server, dir.path(), "new-1", &[]);
    new.run();
    // A simulated agent reports a version ("loadgen-...") that is no release of 0.2.0 or
    // later: the server must treat it as one that cannot read a `Trust` command.
    let (old_id, _fleet) = simulated_agent(&server, "old-1", 0);
    for id in [&new.id, &old_id] {
        eventually(&format!("{id} online"), WAIT, || {
            server.agent(id).filter(|s| s["status"] == "online")
        });
    }
    step(&server, "begin");
    let p = eventually("the current agent confirms", WAIT, || {
        let p = progress(&server);
        (p["confirmed"] == 1).then_some(p)
    });
    assert_eq!(p["behind"][0]["id"], old_id.as_str(), "{p}");
    assert_eq!(trust_json(&new.dir)["serial"], 1);
    // The switch waits for it, and says so.
    let refused = server.request("POST", "/api/v1/trust/switch", None);
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(
        refused.body.contains("have not confirmed"),
        "{}",
        refused.body
    );
    // Nothing was queued that it cannot read (it would refuse a `Trust` command, and its
    // refusal would be logged): its commands still flow.
    server.put_process(&json!({"name": "one", "steps": [
        {"name": "say", "plugin": "shell", "step": "run", "properties": {"script": "echo hello"}}
    ]}));
    let id = server.deploy("one", json!({ "agents": [old_id] }), json!({}));
    assert_eq!(server.wait_deployment(&id, WAIT)["status"], "succeeded");
    let log = read(&dir.path().join("server.log"));
    assert!(
        !log.contains("agent-trust-refused"),
        "a trust set was sent to it"
    );
    assert!(!log.contains(&format!("agent-trust-queued agent_id={old_id}")));
    // The same line for the current agent shows that the check above can fail.
    assert!(log.contains(&format!("agent-trust-queued agent_id={}", new.id)));
    // Forced, the switch goes ahead (the operator's call: that agent must be reinstalled).
    let forced = server.request("POST", "/api/v1/trust/switch?force=true", None);
    assert_eq!(forced.status, 200, "{}", forced.body);
}

#[test]
fn an_agent_that_claims_a_trust_set_never_sent_is_still_behind_and_holds_the_switch() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    // Far past any set the server made: as if it had confirmed the next rollovers already.
    let (liar, _fleet) = simulated_agent(&server, "liar-1", 999);
    eventually("the agent online", WAIT, || {
        server.agent(&liar).filter(|s| s["status"] == "online")
    });
    step(&server, "begin");
    // Its claim was not taken: it is behind the set in force, and the switch waits for it.
    let p = progress(&server);
    assert!(p["serial"].as_u64().is_some_and(|s| s < 999), "{p}");
    assert_eq!(p["confirmed"], 0, "{p}");
    assert_eq!(p["behind"][0]["id"], liar.as_str(), "{p}");
    let refused = server.request("POST", "/api/v1/trust/switch", None);
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(
        read(&dir.path().join("server.log")).contains(&format!(
            "trust-serial-beyond-the-current-set-ignored agent_id={liar}"
        )),
        "the claim was not noticed"
    );
}
