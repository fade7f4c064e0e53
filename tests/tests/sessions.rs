//! Agents connect out to the server: real `tether-server` and `tether-agent` processes on
//! loopback, enrolled, connected, stopped and restarted; numbered probe messages both ways
//! arrive exactly once and in order.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::time::Duration;

use serde_json::{json, Value};
use tether_tests::fleet::{eventually, listening_sockets, Agent, Server, TestDir};

const WAIT: Duration = Duration::from_secs(30);

fn probes(server: &Server, id: &str) -> Value {
    let r = server.request("GET", &format!("/api/v1/agents/{id}/probes"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["probes"].clone()
}

/// Wait until `commands` echoes and `events` probe events arrived; then check none twice, none skipped.
pub fn wait_for_probes(
    server: &Server,
    id: &str,
    commands: u64,
    events: u64,
    timeout: Duration,
) -> Value {
    let p = eventually("all probes", timeout, || {
        let p = probes(server, id);
        (p["echoes"]["received"] == commands && p["events"]["received"] == events).then_some(p)
    });
    for series in ["echoes", "events"] {
        assert_eq!(p[series]["duplicates"], 0, "{series} delivered twice: {p}");
        assert_eq!(p[series]["gaps"], 0, "{series} skipped: {p}");
    }
    assert_eq!(p["echoes"]["next"], commands + 1, "{p}");
    assert_eq!(p["events"]["next"], events + 1, "{p}");
    p
}

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
    wait_for_probes(&server, &agent.id, 200, 300, WAIT);

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
    wait_for_probes(&server, &agent.id, 250, 300, WAIT);
}
