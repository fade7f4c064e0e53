//! Agents connect out to the server: real `tether-server` and `tether-agent` processes on
//! loopback, enrolled, connected, stopped and restarted; numbered probe messages both ways
//! arrive exactly once and in order.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::time::Duration;

use serde_json::json;
use tether_tests::fleet::{eventually, listening_sockets, Agent, Forwarder, Server, TestDir};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn an_agent_comes_online_goes_offline_and_comes_back() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let mut agent = Agent::install(&server, tmp.path(), "web-1", &["web"]);
    assert_eq!(server.agent_status(&agent.id), "offline");

    agent.run();
    eventually("agent online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    let listed = server.agent(&agent.id).unwrap();
    assert_eq!(listed["version"], env!("CARGO_PKG_VERSION"), "{listed}");

    // An agent holds no listening socket: neither the monitor nor the worker.
    let worker = eventually("worker pid", WAIT, || agent.worker_pid());
    for pid in [agent.monitor_pid().unwrap(), worker] {
        assert_eq!(
            listening_sockets(pid),
            Vec::<String>::new(),
            "pid {pid} listens"
        );
    }

    // The server's health shows the agent's session and the agent's own actors (heartbeats).
    let health = eventually("agent actors in /admin/health", WAIT, || {
        let h = server.request("GET", "/admin/health", None).json();
        let agent_actors = h["agents"][&agent.id]["actors"].as_array()?.clone();
        agent_actors
            .iter()
            .any(|a| a["name"] == "uplink" && a["state"] == "connected")
            .then_some(h)
    });
    assert_eq!(health["sessions"], 1, "{health}");
    assert!(
        health["actors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "SessionRegistry" && a["state"] == "running"),
        "{health}"
    );
    let metrics = server.request("GET", "/metrics", None).body;
    assert!(
        metrics.contains(&format!(
            "tether_agent_connected{{agent=\"{}\"}} 1",
            agent.id
        )),
        "{metrics}"
    );

    // Numbered messages both ways.
    let r = server.request(
        "POST",
        &format!("/api/v1/agents/{}/probes", agent.id),
        Some(&json!({"commands": 200, "events": 300})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    server.wait_for_probes(&agent.id, 200, 300, WAIT);

    agent.stop();
    eventually("agent offline", WAIT, || {
        (server.agent_status(&agent.id) == "offline").then_some(())
    });

    // Commands queued while it is offline are delivered when it returns.
    let r = server.request(
        "POST",
        &format!("/api/v1/agents/{}/probes", agent.id),
        Some(&json!({"commands": 50, "events": 0})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    agent.run();
    eventually("agent online again", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    server.wait_for_probes(&agent.id, 250, 300, WAIT);
}

#[test]
fn an_agent_that_lost_its_state_is_detected_and_its_pending_commands_abandoned() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let mut agent = Agent::install(&server, tmp.path(), "amnesic-1", &[]);
    agent.run();
    let queue = |c: u64, e: u64| {
        let r = server.request(
            "POST",
            &format!("/api/v1/agents/{}/probes", agent.id),
            Some(&json!({"commands": c, "events": e})),
        );
        assert_eq!(r.status, 202, "{}", r.body);
    };
    eventually("agent online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    queue(10, 10);
    server.wait_for_probes(&agent.id, 10, 10, WAIT);

    agent.stop();
    eventually("agent offline", WAIT, || {
        (server.agent_status(&agent.id) == "offline").then_some(())
    });
    let r = server.request(
        "POST",
        &format!("/api/v1/agents/{}/probes", agent.id),
        Some(&json!({"commands": 20})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    // The agent loses its journal (disk replaced, directory wiped): a new incarnation.
    std::fs::remove_dir_all(agent.dir.join("journal")).unwrap();
    agent.run();

    let health = eventually("the reset seen by the server", WAIT, || {
        let h = server.request("GET", "/admin/health", None).json();
        (h["agents"][&agent.id]["peer_resets"] == 1).then_some(h)
    });
    assert_eq!(
        health["agents"][&agent.id]["abandoned_commands"], 20,
        "{health}"
    );
    assert_eq!(
        health["agents"][&agent.id]["unacked_commands"], 0,
        "{health}"
    );
    // The streams start over with the new incarnation, and work.
    let r = server.request(
        "POST",
        &format!("/api/v1/agents/{}/probes", agent.id),
        Some(&json!({"commands": 5, "events": 5})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let p = server.wait_for_probes(&agent.id, 5, 5, WAIT);
    assert_eq!(p["commands_sent"], 5, "{p}");
}

#[test]
fn agents_fail_over_between_upstreams_and_back() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    // Two paths to the same server, each of which can be cut.
    let primary = Forwarder::start(server.wss, true);
    let secondary = Forwarder::start(server.wss, true);
    let upstreams = [
        format!("wss://localhost:{}", primary.addr.port()),
        format!("wss://localhost:{}", secondary.addr.port()),
    ];
    let mut agent = Agent::install_via(&server, &upstreams, tmp.path(), "roamer-1", &[], &[]);
    let enrolled_via_primary = primary.accepted();

    primary.set(false);
    agent.run();
    eventually("online through the secondary", WAIT, || {
        (server.agent_status(&agent.id) == "online" && secondary.accepted() >= 1).then_some(())
    });
    assert_eq!(
        primary.accepted(),
        enrolled_via_primary,
        "nothing got through the cut primary"
    );

    // The primary comes back and the secondary goes: the agent returns to the primary.
    primary.set(true);
    secondary.set(false);
    eventually("back on the primary", WAIT, || {
        (primary.accepted() > enrolled_via_primary && server.agent_status(&agent.id) == "online")
            .then_some(())
    });
    let r = server.request(
        "POST",
        &format!("/api/v1/agents/{}/probes", agent.id),
        Some(&json!({"commands": 10, "events": 10})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    server.wait_for_probes(&agent.id, 10, 10, WAIT);
}
