//! Remote operations end to end, to a real agent behind a real relay: test the connection, read
//! its recent log and a diagnostics bundle, restart its worker (the monitor stays, the restart
//! happens once), from the CLI, the REST API and the web application; bad requests refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::time::Duration;

use serde_json::{json, Value};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::relays::Relay;

const WAIT: Duration = Duration::from_secs(60);

fn operate(server: &Server, agent: &str, op: &str) -> Value {
    let r = server.request(
        "POST",
        &format!("/api/v1/agents/{agent}/operations"),
        Some(&json!({"op": op, "wait_s": 30})),
    );
    assert_eq!(r.status, 200, "{op}: {}", r.body);
    let v = r.json();
    assert_eq!(v["state"], "done", "{v}");
    v
}

#[test]
fn an_operator_pings_reads_and_restarts_an_agent_behind_a_relay() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let relay = Relay::start(&server, &[server.upstream()], tmp.path(), "relay-o");
    let mut agent = Agent::install_via(
        &server,
        &[relay.upstream()],
        tmp.path(),
        "op-1",
        &[],
        // A proxy that is never used (NO_PROXY: every host): it shows, masked, in diagnostics.
        &[
            ("TETHER_AGENT__PROXY", "http://ops:hunter2@127.0.0.1:1"),
            ("NO_PROXY", "*"),
        ],
    );
    agent.run();
    eventually("online through the relay", WAIT, || {
        let a = server.agent(&agent.id)?;
        (a["status"] == "online" && !a["path"].as_array()?.is_empty()).then_some(())
    });

    let cli = tether_tests::tether_cli::Tether::new(&tmp.path().join("cli"));
    cli.login(&server);
    let out = cli.run(&["agents", "ping", "op-1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        tether_tests::stdout(&out).contains("op-1 answered in"),
        "{out:?}"
    );

    // Per hop: the server to the relay (timed by the relay), the relay to the agent (timed by
    // the agent), once each has pinged its parent at a heartbeat.
    let relay_id = relay.id.clone();
    let hops = eventually("both hops timed", WAIT, || {
        let hops = operate(&server, "op-1", "ping")["hops"].clone();
        hops.as_array()?
            .iter()
            .all(|h| h["rtt_ms"].as_f64().is_some())
            .then_some(hops)
    });
    let view: Vec<(&str, &str)> = hops
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["from"].as_str().unwrap(), h["to"].as_str().unwrap()))
        .collect();
    assert_eq!(
        view,
        vec![
            ("server", relay_id.as_str()),
            (relay_id.as_str(), agent.id.as_str())
        ],
        "{hops}"
    );
    for h in hops.as_array().unwrap() {
        let ms = h["rtt_ms"].as_f64().unwrap();
        assert!(ms > 0.0 && ms < 10_000.0, "{hops}");
    }
    let out = cli.run(&["agents", "ping", "op-1"]);
    let printed = tether_tests::stdout(&out);
    assert!(
        printed.contains(&format!("  server -> {relay_id}: ")) && printed.contains(" ms\n"),
        "{printed}"
    );

    let log = operate(&server, "op-1", "log");
    let text = log["data"].as_str().unwrap();
    assert!(text.contains("uplink-ready"), "{text}");
    let out = cli.run(&["agents", "log", "op-1"]);
    assert!(
        tether_tests::stdout(&out).contains("worker-version"),
        "{out:?}"
    );

    let d = operate(&server, "op-1", "diagnostics");
    let bundle: Value = serde_json::from_str(d["data"].as_str().unwrap()).unwrap();
    assert_eq!(bundle["agent_id"], agent.id.as_str(), "{bundle}");
    assert_eq!(bundle["facts"]["os"], std::env::consts::OS, "{bundle}");
    assert!(bundle["journal"]["commits"].as_u64().is_some(), "{bundle}");
    let text = d["data"].as_str().unwrap();
    assert!(!text.contains("hunter2"), "a secret in diagnostics: {text}");
    assert_eq!(
        bundle["config"]["agent"]["proxy"], "http://ops:***@127.0.0.1:1",
        "{bundle}"
    );

    // A restart: the monitor stays, a new worker starts, once, and it comes back online.
    let (monitor, worker) = (agent.monitor_pid().unwrap(), agent.worker_pid().unwrap());
    let out = cli.run(&["agents", "restart", "op-1"]);
    assert!(out.status.success(), "{out:?}");
    let new_worker = eventually("a new worker", WAIT, || {
        agent.worker_pid().filter(|p| *p != worker)
    });
    assert_eq!(agent.monitor_pid(), Some(monitor), "the monitor stayed");
    eventually("online again", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    operate(&server, "op-1", "ping");
    assert_eq!(
        agent.worker_pid(),
        Some(new_worker),
        "the restart was not repeated after it"
    );
    let listed = server
        .request("GET", "/api/v1/agents/op-1/operations", None)
        .json();
    let ops: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["op"].as_str().unwrap())
        .collect();
    assert_eq!(
        ops.iter().filter(|o| **o == "restart_worker").count(),
        1,
        "{listed}"
    );

    // The web application: the agent page's buttons, the answer on its own page.
    let r = server.request(
        "POST",
        "/api/v1/users",
        Some(&json!({"name": "ops", "password": "operations-pw-1", "role": "admin"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let cookie = server.web_login("ops", "operations-pw-1");
    let page = server
        .web_get(&cookie, &format!("/agents/{}", agent.id))
        .body;
    assert!(page.contains("Test connection"), "{page}");
    let r = server.web_post(
        &cookie,
        &tether_tests::csrf_of(&page),
        &format!("/agents/{}/operations", agent.id),
        "op=ping",
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let at = r.header("location").unwrap().to_owned();
    let shown = eventually("the answer shown", WAIT, || {
        let p = server.web_get(&cookie, &at).body;
        p.contains("round-trip").then_some(p)
    });
    assert!(shown.contains("agent_unix_ms"), "{shown}");
    assert!(
        shown.contains("<table id=\"hops\">") && shown.contains(&format!("<td>{}</td>", relay.id)),
        "{shown}"
    );

    // Bad requests change nothing.
    for (body, status) in [
        (json!({"op": "format-disk"}), 400),
        (json!({"op": "ping", "wait_s": 61}), 400),
        (json!({"op": "ping", "extra": 1}), 400),
    ] {
        let r = server.request("POST", "/api/v1/agents/op-1/operations", Some(&body));
        assert_eq!(r.status, status, "{body}: {}", r.body);
    }
    let r = server.request(
        "POST",
        "/api/v1/agents/no-such-agent/operations",
        Some(&json!({"op": "ping"})),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    agent.stop();
}

/// Agents offline for long: marked stale, then removed (their queued jobs failed), while an
/// agent that stays connected is left alone.
#[test]
fn agents_offline_for_long_are_marked_stale_then_removed() {
    let tmp = TestDir::new();
    let server = Server::start_with(
        tmp.path(),
        &[
            ("TETHER_RETENTION__MARK_STALE_AFTER_S", "2"),
            ("TETHER_RETENTION__REMOVE_STALE_AFTER_S", "5"),
            ("TETHER_RETENTION__PRUNE_INTERVAL_S", "1"),
        ],
    );
    let mut gone = Agent::install(&server, tmp.path(), "gone-1", &["s"]);
    let mut kept = Agent::install(&server, tmp.path(), "kept-1", &["s"]);
    gone.run();
    kept.run();
    for a in [&gone, &kept] {
        eventually("online", WAIT, || {
            (server.agent_status(&a.id) == "online").then_some(())
        });
    }
    gone.stop();
    server.shell_process("noop", "true");
    let id =
        server.start_deployment(&json!({"process": "noop", "targets": {"agents": ["gone-1"]}}));
    eventually("marked stale", WAIT, || {
        (server.agent(&gone.id)?["stale"] == true).then_some(())
    });
    let cli = tether_tests::tether_cli::Tether::new(&tmp.path().join("cli"));
    cli.login(&server);
    let listed = tether_tests::stdout(&cli.run(&["agents"]));
    assert!(listed.contains("offline (stale)"), "{listed}");
    eventually("removed", WAIT, || {
        server.agent(&gone.id).is_none().then_some(())
    });
    let d = server
        .request("GET", &format!("/api/v1/deployments/{id}"), None)
        .json();
    assert_eq!(d["jobs"][0]["status"], "failed", "{d}");
    let k = server.agent(&kept.id).unwrap();
    assert_eq!(
        (k["status"].as_str(), k["stale"].as_bool()),
        (Some("online"), Some(false))
    );
    kept.stop();
}
