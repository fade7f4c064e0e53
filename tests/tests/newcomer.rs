//! What a newcomer runs into in the first hour, each against the real binaries: the wrong port
//! says which one to use, a certificate for other names says which names it holds, routes that
//! name an agent take its name, every CLI group lists by default, `install --force --tag` sets
//! exactly the tags given, and the server stops promptly with sessions connected.
//!
//! The documents themselves (`docs/install.md`, `docs/deployments.md`) are run as written by
//! `docs_as_written.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::tether_cli::{server_url, Tether};
use tether_tests::{stderr, stdout};

const WAIT: Duration = Duration::from_secs(60);

/// `tether-agent install --upstream UPSTREAM --ca <agent-ca.pem> --token <fresh one-use token>
/// --name NAME --data DIR/NAME` plus `extra`, run in `dir`.
fn install_agent(
    server: &Server,
    dir: &std::path::Path,
    upstream: &str,
    name: &str,
    extra: &[&str],
) -> std::process::Output {
    let data = dir.join(name);
    let ca = server.ca_path();
    let token = server.token(1);
    let mut args = vec![
        "install",
        "--upstream",
        upstream,
        "--ca",
        ca.to_str().unwrap(),
        "--token",
        &token,
        "--name",
        name,
        "--data",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    tether_tests::run("tether-agent", dir, args)
}

#[test]
fn the_wrong_port_says_which_port_to_use() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    // An agent pointed at the operators' port.
    let wrong = format!("wss://localhost:{}", server.https.port());
    let out = install_agent(&server, dir.path(), &wrong, "lost", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("operators' port") && stderr(&out).contains("7919"),
        "{}",
        stderr(&out)
    );
    assert!(
        !dir.path().join("lost").exists(),
        "a refused install leaves nothing"
    );
    // An operator pointed at the agents' port.
    let cli = Tether::new(&dir.path().join("cli"));
    let out = cli.run(&[
        "login",
        "--server",
        &format!("https://localhost:{}", server.wss.port()),
        "--ca",
        server.operator_ca_path().to_str().unwrap(),
        "--token",
        &server.admin_token,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("agent-facing port") && stderr(&out).contains("8443"),
        "{}",
        stderr(&out)
    );
    // Unknown paths on the right port stay a plain 404.
    let r = server.request("GET", "/api/v1/nothing-here", None);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "not found");
}

#[test]
fn a_certificate_for_other_names_says_which_names_and_a_renewal_adds_one_live() {
    let dir = TestDir::new();
    // Listening on every loopback address, reached at one its certificate does not name.
    let server = Server::start_with(
        dir.path(),
        &[
            ("TETHER_LISTEN__WSS", "0.0.0.0:0"),
            ("TETHER_LISTEN__HTTPS", "0.0.0.0:0"),
        ],
    );
    let mut agent = Agent::install(&server, dir.path(), "before", &[]);
    agent.run();
    eventually("the agent online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    let upstream = format!("wss://127.0.0.3:{}", server.wss.port());
    let install = |name: &str| install_agent(&server, dir.path(), &upstream, name, &[]);
    let out = install("misnamed");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("not valid for 127.0.0.3: it is valid for localhost, 127.0.0.1")
            && err.contains("tether-server cert renew --hostname"),
        "{err}"
    );
    assert!(
        !dir.path().join("misnamed").exists(),
        "a refused install leaves nothing"
    );

    // Every certificate's expiry is in the health report and the metrics.
    let health = server.request("GET", "/admin/health", None).json();
    let days: std::collections::BTreeMap<String, i64> = health["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["days_left"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        days.keys().map(String::as_str).collect::<Vec<_>>(),
        ["ca", "relay_ca", "server", "signing"],
        "{health}"
    );
    assert!((824..=825).contains(&days["server"]), "{days:?}");
    assert!((3649..=3650).contains(&days["ca"]), "{days:?}");
    let metrics = server.request("GET", "/metrics", None).body;
    assert!(
        metrics.contains("tether_certificate_expiry_timestamp_seconds{certificate=\"server\"}"),
        "{metrics}"
    );

    // The operator adds the name: same CA, nothing re-enrolled, no restart.
    let pid = server.pid();
    let out = tether_tests::run(
        "tether-server",
        dir.path(),
        [
            "cert",
            "renew",
            "--hostname",
            "127.0.0.3",
            "--data",
            server.dir.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("localhost, 127.0.0.1, 127.0.0.3"),
        "{}",
        stdout(&out)
    );
    let out = eventually("the renewed certificate served", WAIT, || {
        let out = install("renamed");
        out.status.success().then_some(out)
    });
    assert!(stdout(&out).contains("a-"), "{}", stdout(&out));
    assert_eq!(server.pid(), pid, "no restart");
    // The agent enrolled before is still online and was never asked to re-enroll; an
    // operator's client trusting ca.pem reaches the new name too.
    assert_eq!(server.agent_status(&agent.id), "online");
    let operator = std::sync::Arc::new(
        tether_shared::tls::client_config(
            &std::fs::read_to_string(server.operator_ca_path()).unwrap(),
        )
        .unwrap(),
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 3], server.https.port()));
    let r = tether_tests::https_request(addr, operator, "127.0.0.3", "GET", "/login", &[]).unwrap();
    assert_eq!(r.status, 200);
    // A renewal with a bad name changes nothing.
    let out = tether_tests::run(
        "tether-server",
        dir.path(),
        [
            "cert",
            "renew",
            "--hostname",
            "not a name",
            "--data",
            server.dir.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn routes_take_names_lists_are_the_default_and_force_sets_the_tags() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let mut agent = Agent::install(&server, dir.path(), "web-1", &["web"]);
    agent.run();
    eventually("web-1 online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    // Probes by name, as every other agent route.
    let r = server.request(
        "POST",
        "/api/v1/agents/web-1/probes",
        Some(&json!({"commands": 3, "events": 0})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let probes = eventually("3 probes echoed", WAIT, || {
        let r = server.request("GET", "/api/v1/agents/web-1/probes", None);
        (r.status == 200 && r.json()["probes"]["echoes"]["received"] == 3).then(|| r.json())
    });
    assert_eq!(probes["agent_id"], agent.id.as_str());

    // Every CLI group lists without a subcommand, as `list` does.
    let cli = Tether::new(&dir.path().join("cli"));
    cli.login(&server);
    for (group, path) in [
        ("agents", "/api/v1/agents"),
        ("relays", "/api/v1/relays"),
        ("users", "/api/v1/users"),
        ("tokens", "/api/v1/enrollment-tokens"),
        ("artifacts", "/api/v1/artifacts"),
        ("plugins", "/api/v1/plugins"),
        ("processes", "/api/v1/processes"),
        ("deployments", "/api/v1/deployments"),
        ("upgrades", "/api/v1/upgrades"),
    ] {
        let bare = cli.json(&[group]);
        assert_eq!(bare, cli.json(&[group, "list"]), "{group}");
        let rest: Value = server.request("GET", path, None).json();
        assert_eq!(bare, rest, "{group} vs {path}");
        let out = cli.run(&[group]);
        assert_eq!(out.status.code(), Some(0), "{group}: {}", stderr(&out));
    }
    // `tether tokens create --ttl 86400` says 24h, not 23h.
    let out = cli.run(&["tokens", "create", "--ttl", "86400"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("valid for 24h"), "{}", stderr(&out));

    // `install --force --tag db` with a new token: exactly the tags given.
    agent.stop();
    // Into the agent's own data directory (`dir/web-1`), as `--force` means.
    let out = install_agent(
        &server,
        dir.path(),
        &server.upstream(),
        "web-1",
        &["--tag", "db", "--force"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains(&agent.id), "{}", stdout(&out));
    let listed = server.agent(&agent.id).unwrap();
    assert_eq!(listed["tags"], json!(["db"]), "{listed}");
    // And `tether agents delete` takes it away.
    let out = cli.run(&["agents", "delete", "web-1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(server.agents().is_empty());
    let _ = server_url(&server);
}

#[test]
fn the_server_stops_promptly_with_sessions_connected() {
    let dir = TestDir::new();
    let mut server = Server::start(dir.path());
    let mut agents: Vec<Agent> = (1..=3)
        .map(|i| Agent::install(&server, dir.path(), &format!("a-{i}"), &[]))
        .collect();
    for a in &mut agents {
        a.run();
    }
    for a in &agents {
        eventually("agent online", WAIT, || {
            (server.agent_status(&a.id) == "online").then_some(())
        });
    }
    let mut child = server.child.take().unwrap();
    let t0 = Instant::now();
    child.signal("TERM");
    let status = child
        .wait_exit(Duration::from_secs(30))
        .expect("the server did not stop");
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0));
    eprintln!("stopped in {took:?} with 3 sessions");
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        log.contains("sessions-closed") && log.contains("sessions=3"),
        "the stop says what it closed"
    );
    // The listeners' graceful timeout is 10 s; closing the sessions first ends well before.
    assert!(took < Duration::from_secs(8), "took {took:?}");
    // The agents come back when the server does, nothing lost.
    server.run();
    for a in &agents {
        eventually("agent online again", WAIT, || {
            (server.agent_status(&a.id) == "online").then_some(())
        });
    }
}

#[test]
fn an_agent_installed_and_run_with_a_relative_data_directory_runs_its_steps() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    // As a newcomer types it, from the directory that will hold `agent/`.
    let out = tether_tests::command("tether-agent", dir.path())
        .current_dir(dir.path())
        .args(["install", "--upstream", &server.upstream(), "--ca"])
        .arg(server.ca_path())
        .args([
            "--token",
            &server.token(1),
            "--name",
            "rel-1",
            "--tag",
            "rel",
        ])
        .args(["--data", "agent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut run = tether_tests::command("tether-agent", dir.path());
    run.current_dir(dir.path())
        .args(["run", "--data", "agent"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _agent = tether_tests::ChildGuard::spawn("tether-agent run --data agent", &mut run);
    server.put_process(&json!({"name": "hello", "steps": [
        {"name": "say", "plugin": "shell", "step": "run", "properties": {"script": "echo hello from $PWD"}}]}));
    let id = server.deploy("hello", json!({"tags": ["rel"]}), json!({}));
    let d = server.wait_deployment(&id, WAIT);
    assert_eq!(d["status"], "succeeded", "{d}");
    let log = server.step_log(&id, "rel-1", "say");
    assert!(log.contains("hello from /"), "{log}");
}
