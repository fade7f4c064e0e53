//! The server with `[storage] backend = "postgres"`: a real server and agent on a PostgreSQL the
//! test starts itself. Deployments run, everything is in the database (nothing in a local
//! journal), and a server killed with SIGKILL comes back with it all; a database that cannot
//! serve (wrong password, unreachable, fsync off, a newer schema) stops the server at start
//! with exit code 1 and the cause.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::time::Duration;

use serde_json::json;
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::measure::dispatch;
use tether_tests::postgres::Postgres;
use tether_tests::{run, stderr};

const WAIT: Duration = Duration::from_secs(60);

fn on(pg: &Postgres) -> [(&'static str, String); 2] {
    [
        ("TETHER_STORAGE__BACKEND", "postgres".to_owned()),
        ("TETHER_STORAGE__URL", pg.url()),
    ]
}

#[test]
fn a_server_on_postgres_deploys_and_keeps_everything_across_a_kill() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let env = on(&pg);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut server = Server::start_with(tmp.path(), &env);
    let mut agent = Agent::install(&server, tmp.path(), "pg-agent", &["pg"]);
    agent.run();
    eventually("agent online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    let r = server.request(
        "POST",
        "/api/v1/processes",
        Some(
            &json!({"name": "hello", "steps": [{"name": "say", "plugin": "shell", "step": "run",
            "properties": {"script": "echo hello from postgres"}}]}),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let ids = vec![agent.id.clone()];
    assert!(
        dispatch(&server, "hello", &ids).is_some(),
        "first deployment"
    );
    let list = server.request("GET", "/api/v1/deployments", None).json();
    let first = list[0]["id"].as_str().unwrap().to_owned();

    // Everything is in the database; the data directory holds no journal.
    assert!(
        !server.dir.join("journal").exists(),
        "a local journal was written"
    );
    let rows: u64 = pg
        .psql("SELECT count(*) FROM tether_journal")
        .parse()
        .unwrap();
    assert!(rows > 10, "the journal is in PostgreSQL ({rows} rows)");
    let log_rows: u64 = pg
        .psql("SELECT count(*) FROM tether_blobs")
        .parse()
        .unwrap();
    assert!(log_rows >= 1, "the step's log is in PostgreSQL");

    server.kill();
    server.run();
    let d = server
        .request("GET", &format!("/api/v1/deployments/{first}"), None)
        .json();
    assert_eq!(d["status"], "succeeded", "{d}");
    let log = server.request(
        "GET",
        &format!("/api/v1/deployments/{first}/jobs/pg-agent/steps/say/log"),
        None,
    );
    assert!(log.body.contains("hello from postgres"), "{}", log.body);
    eventually("agent online again", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    assert!(dispatch(&server, "hello", &ids).is_some(), "after the kill");
}

#[test]
fn the_database_stopped_mid_deployment_loses_nothing_and_the_server_comes_back_by_itself() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let env = on(&pg);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut server = Server::start_with(tmp.path(), &env);
    // Once more, now on the ports it got: a restart in place keeps them.
    server.kill();
    server.run();
    let pid = server.pid().unwrap();
    let mut agent = Agent::install(&server, tmp.path(), "pg-agent", &[]);
    agent.run();
    eventually("agent online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    let marker = tmp.path().join("marker");
    let steps: Vec<serde_json::Value> = (1..=6)
        .map(|i| {
            json!({"name": format!("s{i}"), "plugin": "shell", "step": "run", "properties": {
                "script": format!("echo s{i} >> {}; echo output of s{i}; sleep 0.3", marker.display())}})
        })
        .collect();
    let r = server.request(
        "POST",
        "/api/v1/processes",
        Some(&json!({"name": "marks", "steps": steps})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = server.request(
        "POST",
        "/api/v1/deployments",
        Some(&json!({"process": "marks", "targets": {"agents": ["pg-agent"]}, "properties": {}})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    // In the middle of the deployment: the database crashes and comes back.
    eventually("the deployment under way", WAIT, || {
        let text = std::fs::read_to_string(&marker).unwrap_or_default();
        (text.lines().count() >= 2).then_some(())
    });
    pg.stop_immediately();
    // The next commit fails: the journal stops (acknowledging nothing more) and says why.
    eventually("the storage failure reported", WAIT, || {
        storage_failed(&server).filter(|r| r.contains("postgres"))
    });
    pg.restart();
    // The server starts over by itself from the database, and the agent resends what was not
    // acknowledged.
    eventually("storage recovered", WAIT, || {
        health(&server).filter(|h| h["storage"]["failed"].is_null())
    });
    let log = std::fs::read_to_string(tmp.path().join("server.log")).unwrap();
    assert!(log.contains("storage-recovered-restarting"), "{log}");
    let d = eventually("the deployment finished", Duration::from_secs(120), || {
        let r = server.request("GET", &format!("/api/v1/deployments/{id}"), None);
        (r.status == 200 && r.json()["status"] == "succeeded").then(|| r.json())
    });
    // Every step ran exactly once, and every step's output was recorded.
    let text = std::fs::read_to_string(&marker).unwrap();
    let expected: Vec<String> = (1..=6).map(|i| format!("s{i}")).collect();
    assert_eq!(text.lines().collect::<Vec<_>>(), expected, "{d}");
    for i in 1..=6 {
        let log = server.request(
            "GET",
            &format!("/api/v1/deployments/{id}/jobs/pg-agent/steps/s{i}/log"),
            None,
        );
        assert!(
            log.body.contains(&format!("output of s{i}")),
            "s{i}: {}",
            log.body
        );
    }
    // The same process came back by itself (re-executed in place), nobody restarted it.
    assert_eq!(server.pid(), Some(pid));
    assert!(tether_tests::fleet::alive(pid));
}

/// `/admin/health`, or `None` while the server is between two lives.
fn health(server: &Server) -> Option<serde_json::Value> {
    let auth = format!("Bearer {}", server.admin_token);
    tether_tests::https_request_with_body(
        server.https,
        server.tls(),
        "localhost",
        "GET",
        "/admin/health",
        &[("Authorization", auth.as_str())],
        None,
    )
    .ok()
    .filter(|r| r.status == 200)
    .map(|r| r.json())
}

/// Why the server's storage failed, if it did.
fn storage_failed(server: &Server) -> Option<String> {
    health(server)?["storage"]["failed"]
        .as_str()
        .map(str::to_owned)
}

/// `tether-server run` on `url` (the data directory initialised first): its exit code and
/// what it printed.
fn run_on(tmp: &TestDir, url: &str) -> (Option<i32>, String) {
    let etc = tmp.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let data = tmp.path().join("server");
    if !data.exists() {
        let out = run(
            "tether-server",
            &etc,
            ["init", "--data", data.to_str().unwrap()],
        );
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = tether_tests::command("tether-server", &etc)
        .args(["run", "--data", data.to_str().unwrap()])
        .env("TETHER_STORAGE__BACKEND", "postgres")
        .env("TETHER_STORAGE__URL", url)
        .env("TETHER_LISTEN__HTTPS", "127.0.0.1:0")
        .env("TETHER_LISTEN__WSS", "127.0.0.1:0")
        .output()
        .unwrap();
    (out.status.code(), stderr(&out))
}

#[test]
fn a_database_that_cannot_serve_stops_the_server_at_start_with_its_cause() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let (code, text) = run_on(&tmp, &pg.url_with_password("wrong"));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(
        !text.contains("password=wrong"),
        "the password was printed: {text}"
    );

    let (code, text) = run_on(&tmp, "host=/nonexistent-socket-dir user=postgres");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("cannot connect to the database"), "{text}");

    // A schema a newer server migrated.
    pg.psql("CREATE TABLE tether_schema (version integer NOT NULL)");
    pg.psql("INSERT INTO tether_schema VALUES (42)");
    let (code, text) = run_on(&tmp, &pg.url());
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("schema is version 42"), "{text}");

    let Some(unsafe_pg) = Postgres::start_with(&["fsync=off"]) else {
        return;
    };
    let (code, text) = run_on(&tmp, &unsafe_pg.url());
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("fsync = off"), "{text}");

    // A storage section that is not valid is a configuration error (exit 2), as any other.
    let etc = tmp.path().join("etc");
    let out = tether_tests::command("tether-server", &etc)
        .args(["--check-config"])
        .env("TETHER_STORAGE__BACKEND", "postgres")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("storage.url"), "{}", stderr(&out));
}
