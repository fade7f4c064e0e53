//! Facts end to end: a real agent reports what its machine is; the server stores them (across
//! its own restart), shows them (REST, CLI, web), selects agents by them (`--where`), fills
//! `${agent.NAME}` in steps with them, and refuses an upgrade package built for another
//! architecture before anything is sent.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::time::Duration;

use serde_json::{json, Value};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};

const WAIT: Duration = Duration::from_secs(60);

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_owned())
        .collect()
}

fn agents_where(server: &Server, query: &str) -> Vec<String> {
    let r = server.request("GET", &format!("/api/v1/agents?{query}"), None);
    assert_eq!(r.status, 200, "{query}: {}", r.body);
    names(&r.json())
}

fn final_job(server: &Server, id: &str) -> Value {
    eventually("a final deployment", WAIT, || {
        let d = server
            .request("GET", &format!("/api/v1/deployments/{id}"), None)
            .json();
        matches!(d["status"].as_str(), Some("succeeded" | "failed")).then(|| d["jobs"][0].clone())
    })
}

fn deploy(server: &Server, process: &str) -> String {
    server.start_deployment(&json!({"process": process, "targets": {"tags": ["f"]}}))
}

#[test]
fn an_agent_reports_its_facts_and_they_select_it_fill_its_steps_and_survive_a_restart() {
    let tmp = TestDir::new();
    let mut server = Server::start(tmp.path());
    let mut agent = Agent::install(&server, tmp.path(), "f-1", &["f"]);
    let mut other = Agent::install(&server, tmp.path(), "f-2", &["g"]);
    agent.run();
    let facts = eventually("facts reported", WAIT, || {
        let a = server.agent(&agent.id)?;
        a["facts"].get("hostname").map(|_| a["facts"].clone())
    });
    assert_eq!(facts["os"], std::env::consts::OS, "{facts}");
    assert_eq!(facts["arch"], std::env::consts::ARCH, "{facts}");
    for name in ["kernel", "cpus", "memory_mb", "disk_free_mb", "user"] {
        assert!(facts.get(name).is_some(), "{name} missing: {facts}");
    }
    let hostname = facts["hostname"].as_str().unwrap().to_owned();

    // Selected by them (f-2 never connected: it has no facts, so no fact condition holds).
    let arch = std::env::consts::ARCH;
    assert_eq!(
        agents_where(&server, &format!("where=os%3Dlinux&where=arch%3D{arch}")),
        ["f-1"]
    );
    assert_eq!(
        agents_where(&server, "where=cpus%3E%3D1&where=tag%3Df"),
        ["f-1"]
    );
    assert!(agents_where(&server, "where=arch%3Dnot-an-arch").is_empty());
    assert_eq!(agents_where(&server, "where=os%21%3Dlinux"), ["f-2"]);
    assert_eq!(agents_where(&server, "").len(), 2);
    for (bad, says) in [
        ("where=oslinux", "no operator"),
        ("wher=os%3Dlinux", "unknown query parameter"),
    ] {
        let r = server.request("GET", &format!("/api/v1/agents?{bad}"), None);
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert!(r.body.contains(says), "{bad}: {}", r.body);
    }
    let cli = tether_tests::tether_cli::Tether::new(&tmp.path().join("cli"));
    cli.login(&server);
    let listed = tether_tests::stdout(&cli.run(&["agents", "--where", "os=linux"]));
    assert!(
        listed.contains("f-1") && !listed.contains("f-2"),
        "{listed}"
    );
    assert!(listed.contains(arch), "the system column: {listed}");
    let none = tether_tests::stdout(&cli.run(&["agents", "--where", "cpus>100000"]));
    assert!(!none.contains("f-1"), "{none}");
    let shown = tether_tests::stdout(&cli.run(&["agents", "show", "f-1"]));
    assert!(shown.contains(&hostname), "{shown}");

    // The web application shows and filters them.
    let r = server.request(
        "POST",
        "/api/v1/users",
        Some(&json!({"name": "viewer", "password": "facts-password-1", "role": "viewer"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let cookie = server.web_login("viewer", "facts-password-1");
    let page = server
        .web_get(&cookie, &format!("/agents?where=arch%3D{arch}"))
        .body;
    assert!(page.contains("f-1") && !page.contains(">f-2<"), "{page}");
    let page = server.web_get(&cookie, "/agents?where=nonsense").body;
    assert!(
        page.contains("filter-problem") && page.contains("no operator"),
        "{page}"
    );
    let page = server
        .web_get(&cookie, &format!("/agents/{}", agent.id))
        .body;
    assert!(
        page.contains("id=\"facts\"") && page.contains(&hostname),
        "{page}"
    );

    // Steps get each agent's own values; a fact it lacks fails its job, saying which.
    for (name, script) in [
        (
            "facts",
            "echo \"on ${agent.os}/${agent.arch} as ${agent.name} (${agent.id})\"",
        ),
        ("no-such-fact", "echo ${agent.gpu}"),
    ] {
        let r = server.request(
            "POST",
            "/api/v1/processes",
            Some(
                &json!({"name": name, "steps": [{"name": "say", "plugin": "shell",
                "step": "run", "properties": {"script": script}}]}),
            ),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let id = deploy(&server, "facts");
    let job = final_job(&server, &id);
    assert_eq!(job["status"], "succeeded", "{job}");
    let log = server
        .request(
            "GET",
            &format!("/api/v1/deployments/{id}/jobs/f-1/steps/say/log"),
            None,
        )
        .body;
    assert!(
        log.contains(&format!("on linux/{arch} as f-1 ({})", agent.id)),
        "{log}"
    );
    let job = final_job(&server, &deploy(&server, "no-such-fact"));
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["message"].as_str().unwrap().contains("no fact \"gpu\""),
        "{job}"
    );
    // A deployment property may not take an agent's name.
    let r = server.request(
        "POST",
        "/api/v1/deployments",
        Some(&json!({"process": "facts", "targets": {"tags": ["f"]},
                     "properties": {"agent.os": "plan9"}})),
    );
    assert_eq!(r.status, 400, "{}", r.body);

    // Stored: after a server restart, before the agent is back, they are still there.
    agent.stop();
    server.kill();
    server.run();
    let a = server.agent(&agent.id).unwrap();
    assert_eq!(a["status"], "offline", "{a}");
    assert_eq!(a["facts"]["hostname"], hostname.as_str(), "{a}");
    other.stop();
}

/// The first bytes of an ELF executable for `machine` (e_machine), enough for the server to
/// tell its architecture, then filler.
fn elf_for(machine: u16) -> Vec<u8> {
    let mut bytes = vec![0u8; 4096];
    bytes[..4].copy_from_slice(b"\x7fELF");
    bytes[4] = 2; // 64-bit
    bytes[5] = 1; // little-endian
    bytes[18..20].copy_from_slice(&machine.to_le_bytes());
    bytes
}

#[test]
fn an_upgrade_built_for_another_architecture_is_refused_before_anything_is_sent() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let mut agent = Agent::install(&server, tmp.path(), "arch-1", &["f"]);
    agent.run();
    eventually("facts reported", WAIT, || {
        server.agent(&agent.id)?["facts"].get("arch").map(|_| ())
    });
    let (other, other_name) = match std::env::consts::ARCH {
        "aarch64" => (0x3E, "x86_64"),
        _ => (0xB7, "aarch64"),
    };
    let r = server.request_raw("PUT", "/api/v1/upgrades/9.9.9", &[], &elf_for(other));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["arch"], other_name, "{}", r.body);
    let listed = server.request("GET", "/api/v1/upgrades", None).json();
    assert_eq!(listed[0]["arch"], other_name, "{listed}");

    let r = server.request(
        "POST",
        "/api/v1/upgrades/9.9.9/rollout",
        Some(&json!({"targets": {"agents": ["arch-1"]}})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let answer = &r.json()["agents"][0];
    assert_eq!(answer["queued"], false, "{answer}");
    let refused = answer["refused"].as_str().unwrap();
    assert!(
        refused.contains(&format!("built for {other_name}"))
            && refused.contains(std::env::consts::ARCH),
        "{refused}"
    );
    // Nothing recorded, nothing sent: the agent has no upgrade and still runs its version.
    let a = server.agent(&agent.id).unwrap();
    assert!(a["upgrade"].is_null(), "{a}");
    let health = server.request("GET", "/admin/health", None).json();
    assert_eq!(
        health["agents"][&agent.id]["unacked_commands"], 0,
        "{}",
        health["agents"][&agent.id]
    );

    // A package for its own architecture passes this check (and is queued).
    let own = match std::env::consts::ARCH {
        "aarch64" => 0xB7,
        _ => 0x3E,
    };
    let r = server.request_raw("PUT", "/api/v1/upgrades/9.9.10", &[], &elf_for(own));
    assert_eq!(r.status, 201, "{}", r.body);
    let r = server.request(
        "POST",
        "/api/v1/upgrades/9.9.10/rollout",
        Some(&json!({"targets": {"agents": ["arch-1"]}})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["agents"][0]["queued"], true, "{}", r.body);
    agent.stop();
}
