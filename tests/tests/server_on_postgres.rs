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
