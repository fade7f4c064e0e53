//! The server with `[storage] backend = "postgres"`: a real server and agent on a PostgreSQL the
//! test starts itself. Deployments run, everything is in the database (nothing in a local
//! journal), and a server killed with SIGKILL comes back with it all; a database that cannot
//! serve (wrong password, unreachable, fsync off, a newer schema) stops the server at start
//! with exit code 1 and the cause.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::time::Duration;

use serde_json::{json, Value};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::marks::{marking_process, marks_in};
use tether_tests::measure::dispatch;
use tether_tests::postgres::Postgres;
use tether_tests::relays::Relay;
use tether_tests::tether_cli::{server_url, Tether};
use tether_tests::{borrowed, run, stderr};

const WAIT: Duration = Duration::from_secs(60);

fn on(pg: &Postgres) -> Vec<(String, String)> {
    vec![
        ("TETHER_STORAGE__BACKEND".into(), "postgres".into()),
        ("TETHER_STORAGE__URL".into(), pg.url()),
    ]
}

#[test]
fn a_server_on_postgres_deploys_and_keeps_everything_across_a_kill() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let mut server = Server::start_with(tmp.path(), &borrowed(&on(&pg)));
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
fn the_database_stopped_mid_deployment_loses_nothing_and_the_server_goes_on_without_a_restart() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let mut server = Server::start_with(tmp.path(), &borrowed(&on(&pg)));
    // Once more, now on the ports it got: a restart in place keeps them.
    server.kill();
    server.run();
    let pid = server.pid().unwrap();
    let mut agent = Agent::install(&server, tmp.path(), "pg-agent", &[]);
    agent.run();
    eventually("agent online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    marking_process(&server, "marks", 6, &marks);
    let r = server.request(
        "POST",
        "/api/v1/deployments",
        Some(&json!({"process": "marks", "targets": {"agents": ["pg-agent"]}, "properties": {}})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    // In the middle of the deployment: the database crashes and comes back.
    eventually("the deployment under way", WAIT, || {
        marks_in(&marks).iter().any(|l| l.len() >= 2).then_some(())
    });
    let log_path = tmp.path().join("server.log");
    let started = |log: &str| log.matches("server-listening").count();
    let starts = started(&std::fs::read_to_string(&log_path).unwrap());
    let cli = Tether::new(&tmp.path().join("cli"));
    cli.login(&server);
    pg.stop_immediately();
    // The next commit gets no answer: the journal acknowledges nothing while it waits for the
    // database, and says so (the CLI's health check fails meanwhile).
    eventually("the wait for the database reported", WAIT, || {
        storage_waiting(&server).filter(|r| r.contains("postgres"))
    });
    let health = cli.run(&["health"]);
    let stderr = String::from_utf8_lossy(&health.stderr);
    assert_eq!(health.status.code(), Some(1), "{health:?}");
    assert!(stderr.contains("waiting for its database"), "{stderr}");
    pg.restart();
    // The batch it kept trying is committed once the database is back: the server goes on,
    // without a restart, and the agent resends what was not acknowledged.
    eventually("storage recovered", WAIT, || {
        server
            .try_health()
            .filter(|h| h["storage"]["waiting"].is_null() && h["storage"]["failed"].is_null())
    });
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("postgres-batch-committed-after-retry"),
        "{log}"
    );
    assert!(!log.contains("storage-recovered-restarting"), "{log}");
    assert_eq!(
        started(&log),
        starts,
        "the server did not start over: {log}"
    );
    let d = eventually("the deployment finished", Duration::from_secs(120), || {
        let r = server.request("GET", &format!("/api/v1/deployments/{id}"), None);
        (r.status == 200 && r.json()["status"] == "succeeded").then(|| r.json())
    });
    // Every step ran exactly once, and every step's output was recorded.
    let expected: Vec<String> = (1..=6).map(|i| format!("s{i}")).collect();
    assert_eq!(marks_in(&marks), vec![expected], "{d}");
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
    // The same process, never restarted.
    assert_eq!(server.pid(), Some(pid));
    assert!(tether_tests::fleet::alive(pid));
}

/// Why the server waits for its storage, if it does.
fn storage_waiting(server: &Server) -> Option<String> {
    server.try_health()?["storage"]["waiting"]
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
    // `init --storage` checks the database before it writes anything.
    let etc = tmp.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let fresh = tmp.path().join("refused");
    let out = run(
        "tether-server",
        &etc,
        [
            "init",
            "--data",
            fresh.to_str().unwrap(),
            "--storage",
            &pg.url_with_password("wrong"),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("password authentication failed")
            && !stderr(&out).contains("password=wrong"),
        "{}",
        stderr(&out)
    );
    assert!(!fresh.exists(), "a refused database left a data directory");
    let ready = tmp.path().join("ready");
    let out = run(
        "tether-server",
        &etc,
        [
            "init",
            "--data",
            ready.to_str().unwrap(),
            "--storage",
            &pg.url(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = tether_tests::stdout(&out);
    assert!(
        text.contains("schema ready") && text.contains("backend = \"postgres\""),
        "{text}"
    );
    assert!(ready.join("ca.pem").exists());
    assert_eq!(
        pg.psql("SELECT count(*) FROM tether_schema"),
        "1",
        "the schema was created"
    );
    pg.psql("DROP TABLE tether_schema, tether_journal, tether_blobs, tether_lease, tether_nodes");

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

/// The environment of a node named `name` of a cluster on `pg` with a lease of `ttl_ms`.
fn node(pg: &Postgres, name: &str, ttl_ms: &str) -> Vec<(String, String)> {
    pg.node_env(name, ttl_ms.parse().unwrap())
}

#[test]
fn the_standby_takes_over_when_the_active_node_is_killed_and_every_step_runs_once() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    // Artifacts, plugins and upgrade packages on a directory both nodes share.
    let files = tmp.path().join("shared-files");
    let files_env = ("TETHER_SERVER__FILES_DIR", files.to_str().unwrap());
    let node_a = node(&pg, "node-a", "3000");
    let mut env_a = borrowed(&node_a);
    env_a.push(files_env);
    let mut a = Server::start_with(&tmp.path().join("a"), &env_a);
    let b_dir = tmp.path().join("b");
    let mut b = a.another_node(
        &b_dir,
        &[("TETHER_STORAGE__NODE_NAME", "node-b"), files_env],
    );
    // The standby waits for the lease, binding nothing.
    eventually("node b waiting as a standby", WAIT, || {
        let log = std::fs::read_to_string(b_dir.join("server.log")).unwrap_or_default();
        log.contains("standby-waiting-for-the-lease").then_some(())
    });
    assert!(!b.dir.join("ports.json").exists(), "a standby listens");
    // On the operators' port it says what it is and which node is active; nothing else.
    let h = eventually("the standby's health", WAIT, || b.try_health());
    assert_eq!(h["cluster"]["role"], "standby", "{h}");
    assert_eq!(h["cluster"]["node"], "node-b", "{h}");
    assert_eq!(h["cluster"]["active"]["node"], "node-a", "{h}");
    let active = tether_tests::wire::health(&a);
    assert_eq!(active["cluster"]["role"], "active", "{active}");
    assert_eq!(active["cluster"]["node"], "node-a", "{active}");
    // Both nodes list both, each with its role and release, heard from within a lease.
    let listed = |h: &Value| -> Vec<(String, String)> {
        h["cluster"]["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| {
                n["version"] == env!("CARGO_PKG_VERSION") && n["seen_ms_ago"].as_i64() < Some(3_000)
            })
            .map(|n| {
                (
                    n["node"].as_str().unwrap_or("").to_owned(),
                    n["role"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    let both = vec![
        ("node-a".to_owned(), "active".to_owned()),
        ("node-b".to_owned(), "standby".to_owned()),
    ];
    eventually("the nodes listed by the active node", WAIT, || {
        (listed(&tether_tests::wire::health(&a)) == both).then_some(())
    });
    eventually("the nodes listed by the standby", WAIT, || {
        b.try_health().filter(|h| listed(h) == both)
    });
    let r = b.request("GET", "/api/v1/deployments", None);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.body.contains("standby") && r.body.contains("node-a"),
        "{}",
        r.body
    );
    let denied = tether_tests::https_request_with_body(
        b.https,
        b.tls(),
        "localhost",
        "GET",
        "/admin/health",
        &[],
        None,
    )
    .unwrap();
    assert_eq!(
        denied.status, 401,
        "health without the token: {}",
        denied.body
    );
    // The CLI says the same, and a standby is healthy as a standby.
    let cli = Tether::new(&tmp.path().join("cli"));
    let ca = a.operator_ca_path();
    let as_operator = |node: &Server| {
        cli.run_with(
            &[
                ("TETHER_SERVER", server_url(node).as_str()),
                ("TETHER_CA", ca.to_str().unwrap()),
                ("TETHER_TOKEN", a.admin_token.as_str()),
            ],
            None,
            &["health"],
        )
    };
    let out = as_operator(&b);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = tether_tests::stdout(&out);
    assert!(
        text.contains("standby") && text.contains("node-b") && text.contains("node-a"),
        "{text}"
    );
    let out = as_operator(&a);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = tether_tests::stdout(&out);
    assert!(
        text.contains("active node node-a") && text.contains("node-b standby"),
        "{text}"
    );
    // Agents cannot reach it: it does not listen for them.
    assert!(
        std::net::TcpStream::connect(b.wss).is_err(),
        "a standby took agents"
    );
    let upstreams = [a.upstream(), format!("wss://localhost:{}", b.wss.port())];
    // Kept running to the end (dropped, they stop).
    let _agents = two_agents_online(&a, &upstreams, tmp.path(), "fo");
    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    marking_process(&a, "marks", 8, &marks);
    let id = start_marks(&a, "fo");
    // An operator logged in to the web application on node a.
    let password = std::fs::read_to_string(a.dir.join("admin.password")).unwrap();
    let cookie = a.web_login("admin", password.trim());
    let page = a.web_get(&cookie, "/health");
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("data-node=\"node-a\"") && page.body.contains("data-node=\"node-b\""),
        "the web health page lists the nodes: {}",
        page.body
    );
    let artifact = b"an artifact uploaded to node a".repeat(100);
    let up = a.request_raw("PUT", "/api/v1/artifacts/site/1.0", &[], &artifact);
    assert_eq!(up.status, 201, "{}", up.body);
    assert!(
        files.join("artifacts").is_dir(),
        "kept in the shared directory"
    );
    eventually("the deployment under way", WAIT, || {
        marks_in(&marks).iter().any(|l| l.len() >= 2).then_some(())
    });
    a.kill();
    // Node b takes over once a's lease ran out, and the agents move to it.
    b.wait_active(Duration::from_secs(30));
    let d = eventually(
        "the deployment finished on node b",
        Duration::from_secs(120),
        || {
            let r = b.request("GET", &format!("/api/v1/deployments/{id}"), None);
            (r.status == 200 && r.json()["status"] == "succeeded").then(|| r.json())
        },
    );
    // Every step ran exactly once on each agent.
    let expected: Vec<String> = (1..=8).map(|i| format!("s{i}")).collect();
    assert_eq!(marks_in(&marks), vec![expected.clone(), expected], "{d}");
    for agent in ["fo-1", "fo-2"] {
        for i in [1, 8] {
            let log = b.request(
                "GET",
                &format!("/api/v1/deployments/{id}/jobs/{agent}/steps/s{i}/log"),
                None,
            );
            assert!(
                log.body.contains(&format!("output of s{i}")),
                "{agent} s{i}: {}",
                log.body
            );
        }
    }
    // The operator is still logged in on node b.
    let page = b.web_get(&cookie, "/health");
    assert_eq!(
        page.status, 200,
        "the session did not survive the takeover: {}",
        page.body
    );
    // The artifact uploaded to node a is served by node b.
    let got = b.request("GET", "/api/v1/artifacts/site/1.0", None);
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.body.as_bytes(), artifact.as_slice());
    let log = std::fs::read_to_string(b_dir.join("server.log")).unwrap();
    assert!(log.contains("lease-taken-active"), "{log}");
    let h = tether_tests::wire::health(&b);
    assert_eq!(h["cluster"]["role"], "active", "{h}");
    assert_eq!(h["cluster"]["node"], "node-b", "{h}");
    assert!(
        h["cluster"]["epoch"].as_i64() > Some(1),
        "a takeover raises the epoch: {h}"
    );
    // Node b lists itself active; node a, silent since its kill, is no longer current.
    let h = eventually("node b listed active", WAIT, || {
        let h = tether_tests::wire::health(&b);
        (listed(&h) == vec![("node-b".to_owned(), "active".to_owned())]).then_some(h)
    });
    let a_line = h["cluster"]["nodes"]
        .as_array()
        .and_then(|l| l.iter().find(|n| n["node"] == "node-a").cloned())
        .unwrap_or_else(|| panic!("node a is still listed (for a day): {h}"));
    assert!(a_line["seen_ms_ago"].as_i64() >= Some(3_000), "{a_line}");
    assert!(h["journal"].is_object(), "the full health: {h}");
}

/// Agents `<prefix>-1` and `<prefix>-2` installed with `upstreams`, running, online on
/// `server`.
fn two_agents_online(
    server: &Server,
    upstreams: &[String],
    root: &std::path::Path,
    prefix: &str,
) -> Vec<Agent> {
    let mut agents: Vec<Agent> = (1..=2)
        .map(|i| Agent::install_via(server, upstreams, root, &format!("{prefix}-{i}"), &[], &[]))
        .collect();
    for agent in &mut agents {
        agent.run();
    }
    for agent in &agents {
        eventually("agent online", WAIT, || {
            (server.agent_status(&agent.id) == "online").then_some(())
        });
    }
    agents
}

/// `tether-server drain --data DIR` against the node running on `dir`.
fn drain(server: &Server, tmp: &std::path::Path) -> std::process::Output {
    let data = server.dir.to_str().unwrap();
    run("tether-server", tmp, ["drain", "--data", data])
}

/// A node's line in `health`'s node list.
fn node_line(health: &Value, name: &str) -> Option<Value> {
    health["cluster"]["nodes"]
        .as_array()
        .and_then(|l| l.iter().find(|n| n["node"] == name).cloned())
}

/// Starts the marking process on agents `<prefix>-1` and `<prefix>-2` from `server`; its id.
fn start_marks(server: &Server, prefix: &str) -> String {
    let targets = [format!("{prefix}-1"), format!("{prefix}-2")];
    let r = server.request(
        "POST",
        "/api/v1/deployments",
        Some(&json!({"process": "marks", "targets": {"agents": targets}, "properties": {}})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["id"].as_str().unwrap().to_owned()
}

/// Deploys the marking process to both agents from `server` and waits until it is under way.
fn deploy_marks(server: &Server, marks: &std::path::Path) -> String {
    for f in std::fs::read_dir(marks).unwrap().flatten() {
        std::fs::remove_file(f.path()).unwrap();
    }
    let id = start_marks(server, "dr");
    eventually("the deployment under way", WAIT, || {
        marks_in(marks).iter().any(|l| l.len() >= 2).then_some(())
    });
    id
}

/// Waits for deployment `id` to succeed on `server`, and checks that every step ran exactly
/// once on each agent.
fn every_step_once(server: &Server, id: &str, marks: &std::path::Path) {
    let d = eventually("the deployment succeeded", Duration::from_secs(120), || {
        let r = server.request("GET", &format!("/api/v1/deployments/{id}"), None);
        (r.status == 200 && r.json()["status"] == "succeeded").then(|| r.json())
    });
    let expected: Vec<String> = (1..=8).map(|i| format!("s{i}")).collect();
    assert_eq!(marks_in(marks), vec![expected.clone(), expected], "{d}");
}

#[test]
fn a_drained_or_stopped_active_node_hands_over_at_once_and_a_rolling_restart_loses_nothing() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    // A long lease: a takeover by its running out would come after 30 s, so a node active
    // within 15 s got the lease handed over.
    let handed_over_within = Duration::from_secs(15);
    let mut env_a = node(&pg, "node-a", "30000");
    // Fixed ports: node a starts over in place (as a standby, then active again) on them.
    let a_https = tether_tests::fleet::free_addr();
    env_a.push(("TETHER_LISTEN__HTTPS".into(), a_https.to_string()));
    let a_wss = tether_tests::fleet::free_addr();
    env_a.push(("TETHER_LISTEN__WSS".into(), a_wss.to_string()));
    // Node a advertises its operators' address; node b does not.
    let a_url = format!("https://localhost:{}", a_https.port());
    env_a.push(("TETHER_STORAGE__NODE_URL".into(), a_url.clone()));
    let mut a = Server::start_with(&tmp.path().join("a"), &borrowed(&env_a));
    // A directory no server runs with: the command says so and does nothing.
    let nowhere = tmp.path().join("not-a-server");
    let out = run(
        "tether-server",
        tmp.path(),
        ["drain", "--data", nowhere.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("ports.json") && stderr(&out).contains("is the server running"),
        "{}",
        stderr(&out)
    );
    // Alone, a node is not drained: nothing would take over. It says so, and goes on serving.
    let out = drain(&a, tmp.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no standby"), "{}", stderr(&out));
    assert_eq!(a.request("GET", "/api/v1/deployments", None).status, 200);
    // Without the admin token nothing is drained (only admins may: see `authz`).
    let anonymous = tether_tests::https_request_with_body(
        a.https,
        a.tls(),
        "localhost",
        "POST",
        "/admin/drain",
        &[],
        None,
    )
    .unwrap();
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    let refused = a.request_as("not-a-token", "POST", "/admin/drain", None);
    assert_eq!(refused.status, 401, "{}", refused.body);
    // A node of the embedded journal is refused the same way, with its reason.
    let sled = Server::start(&tmp.path().join("sled"));
    let out = drain(&sled, tmp.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("embedded journal"),
        "{}",
        stderr(&out)
    );
    drop(sled);

    let b_dir = tmp.path().join("b");
    let mut b = a.another_node(&b_dir, &[("TETHER_STORAGE__NODE_NAME", "node-b")]);
    let upstreams = [a.upstream(), format!("wss://localhost:{}", b.wss.port())];
    // One agent reaches the nodes directly, the other through a relay that lists both.
    let relay = Relay::start(&a, &upstreams, tmp.path(), "relay-1");
    let mut agents = vec![
        Agent::install_via(&a, &upstreams, tmp.path(), "dr-1", &[], &[]),
        Agent::install_via(&a, &[relay.upstream()], tmp.path(), "dr-2", &[], &[]),
    ];
    for agent in &mut agents {
        agent.run();
    }
    // Node a lists node b as a standby, and itself with its sessions (two agents, a relay).
    eventually(
        "node a's list: b standby, a serving three peers",
        WAIT,
        || {
            let h = tether_tests::wire::health(&a);
            let b_line = node_line(&h, "node-b")?;
            let a_line = node_line(&h, "node-a")?;
            (b_line["role"] == "standby" && a_line["sessions"] == 3).then_some(())
        },
    );
    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    marking_process(&a, "marks", 8, &marks);

    // Drained mid-deployment: node b is active at once, the agents move to it, and the
    // deployment finishes there with every step run once.
    let id = deploy_marks(&a, &marks);
    let drained_at = std::time::Instant::now();
    let out = drain(&a, tmp.path());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        tether_tests::stdout(&out).contains("node-b is active"),
        "{}",
        tether_tests::stdout(&out)
    );
    b.wait_active(handed_over_within.saturating_sub(drained_at.elapsed()));
    every_step_once(&b, &id, &marks);
    // Node a started over in place and waits as a standby; b lists it so, and itself with the
    // agents.
    let a_pid = a.pid();
    eventually("node a a standby again", WAIT, || {
        let log = std::fs::read_to_string(tmp.path().join("a/server.log")).unwrap_or_default();
        let (_, after) = log.split_once("drained-starting-over-as-a-standby")?;
        after
            .contains("standby-waiting-for-the-lease")
            .then_some(())
    });
    assert_eq!(a.pid(), a_pid, "it started over in place");
    let r = a.request("GET", "/api/v1/deployments", None);
    assert_eq!(r.status, 503, "{}", r.body);
    eventually(
        "node b's list: a standby, b serving three peers",
        WAIT,
        || {
            let h = tether_tests::wire::health(&b);
            let a_line = node_line(&h, "node-a")?;
            let b_line = node_line(&h, "node-b")?;
            (a_line["role"] == "standby" && b_line["role"] == "active" && b_line["sessions"] == 3)
                .then_some(())
        },
    );

    // A rolling restart: node b stopped (SIGTERM) mid-deployment hands over to a on its way
    // out; then b comes back as a standby.
    let id = deploy_marks(&b, &marks);
    let stopped_at = std::time::Instant::now();
    b.stop();
    a.wait_active(handed_over_within.saturating_sub(stopped_at.elapsed()));
    every_step_once(&a, &id, &marks);
    let log = std::fs::read_to_string(b_dir.join("server.log")).unwrap();
    assert!(log.contains("lease-handed-over"), "{log}");
    b.spawn();
    eventually("node b back as a standby", WAIT, || {
        b.try_health().filter(|h| {
            h["cluster"]["role"] == "standby" && h["cluster"]["active"]["node"] == "node-a"
        })
    });
    for agent in &agents {
        assert_eq!(a.agent_status(&agent.id), "online");
    }
    let via = a.agent(&agents[1].id).unwrap();
    assert_eq!(via["path"], json!(["relay-1"]), "{via}");
    // The standby sends operators to the active node, which advertises its address: REST
    // clients get a redirect with the same path and query, and the CLI follows it.
    let r = b.request("GET", "/api/v1/deployments?limit=5", None);
    assert_eq!(r.status, 307, "{}", r.body);
    assert!(r.body.contains("node-a"), "{}", r.body);
    let location = r
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("location"))
        .map(|(_, v)| v.clone());
    assert_eq!(
        location.as_deref(),
        Some(format!("{a_url}/api/v1/deployments?limit=5").as_str())
    );
    let cli = Tether::new(&tmp.path().join("cli"));
    let ca = a.operator_ca_path();
    let listed = cli.run_with(
        &[
            ("TETHER_SERVER", server_url(&b).as_str()),
            ("TETHER_CA", ca.to_str().unwrap()),
            ("TETHER_TOKEN", a.admin_token.as_str()),
        ],
        None,
        &["deployments", "list", "--json"],
    );
    assert_eq!(listed.status.code(), Some(0), "{}", stderr(&listed));
    let through_b: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let from_a = a.request("GET", "/api/v1/deployments", None).json();
    assert_eq!(through_b, from_a, "the same answer through the standby");
    // Its address is in the node list, and on the CLI's `nodes:` line.
    let h = tether_tests::wire::health(&a);
    assert_eq!(
        node_line(&h, "node-a").unwrap()["url"],
        a_url.as_str(),
        "{h}"
    );
    let health = cli.run_with(
        &[
            ("TETHER_SERVER", server_url(&a).as_str()),
            ("TETHER_CA", ca.to_str().unwrap()),
            ("TETHER_TOKEN", a.admin_token.as_str()),
        ],
        None,
        &["health"],
    );
    let text = tether_tests::stdout(&health);
    assert!(text.contains(&format!("at {a_url}")), "{text}");
    // A node advertising no address still answers 503 naming the active node (above).
}

#[test]
fn an_active_node_cut_off_from_the_database_keeps_no_agent_and_the_standby_finishes_its_work() {
    if !tether_tests::blackhole::Blackhole::available() {
        return;
    }
    let Some(pg) = Postgres::start_tcp() else {
        return;
    };
    let tmp = TestDir::new();
    // Node a reaches the database at 127.0.0.2 (the way that is cut), node b at 127.0.0.1.
    let mut env_a = node(&pg, "node-a", "4000");
    for (k, v) in &mut env_a {
        if k == "TETHER_STORAGE__URL" {
            *v = pg.tcp_url("127.0.0.2");
        }
    }
    let mut a = Server::start_with(&tmp.path().join("a"), &borrowed(&env_a));
    let b_dir = tmp.path().join("b");
    let url_b = pg.tcp_url("127.0.0.1");
    let mut b = a.another_node(
        &b_dir,
        &[
            ("TETHER_STORAGE__NODE_NAME", "node-b"),
            ("TETHER_STORAGE__URL", &url_b),
        ],
    );
    let upstreams = [a.upstream(), format!("wss://localhost:{}", b.wss.port())];
    let agents = two_agents_online(&a, &upstreams, tmp.path(), "dr");
    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    marking_process(&a, "marks", 8, &marks);
    let id = deploy_marks(&a, &marks);
    let a_pid = a.pid();
    // The network between node a and the database fails silently mid-deployment.
    let cut = tether_tests::blackhole::Blackhole::cut(pg.tcp_addr("127.0.0.2"));
    // Node a lets its agents go once its lease would have run out unrenewed; node b takes
    // over, the agents move to it and the deployment finishes there, every step run once.
    b.wait_active(WAIT);
    every_step_once(&b, &id, &marks);
    for agent in &agents {
        assert_eq!(b.agent_status(&agent.id), "online");
    }
    let log = std::fs::read_to_string(tmp.path().join("a/server.log")).unwrap();
    assert!(log.contains("lease-unrenewed-stepping-down"), "{log}");
    assert_eq!(a.pid(), a_pid, "it started over in place");
    assert!(
        std::net::TcpStream::connect(a.wss).is_err(),
        "node a takes agents while cut off"
    );
    // Once the database is back within reach, node a waits as a standby (started again as
    // its service manager would, `Restart=always`, if it gave up waiting for the database).
    drop(cut);
    eventually("node a a standby", WAIT, || {
        if a.child.as_mut().and_then(|c| c.try_exit()).is_some() {
            a.spawn();
        }
        b.try_health().and_then(|h| {
            let line = node_line(&h, "node-a")?;
            (line["role"] == "standby" && line["seen_ms_ago"].as_i64() < Some(4_000)).then_some(())
        })
    });
}

#[test]
fn a_frozen_active_node_that_lost_its_lease_commits_nothing_and_steps_down() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let env_a = node(&pg, "node-a", "2000");
    let a = Server::start_with(&tmp.path().join("a"), &borrowed(&env_a));
    let a_pid = a.pid().unwrap();
    let b_dir = tmp.path().join("b");
    let mut b = a.another_node(&b_dir, &[("TETHER_STORAGE__NODE_NAME", "node-b")]);
    eventually("node b waiting as a standby", WAIT, || {
        let log = std::fs::read_to_string(b_dir.join("server.log")).unwrap_or_default();
        log.contains("standby-waiting-for-the-lease").then_some(())
    });
    // Node a freezes past its lease: b takes over.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(a_pid).unwrap()),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    b.wait_active(Duration::from_secs(30));
    // a wakes up and is asked to change something: it commits nothing and says why.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(a_pid).unwrap()),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
    // (It may be refused, or the connection cut by the node stepping down at that moment.)
    let late = json!({"name": "late", "steps": [{"name": "s", "plugin": "shell", "step": "run",
        "properties": {"script": "true"}}]});
    let r = a.try_request("POST", "/api/v1/processes", Some(&late));
    if let Ok(r) = &r {
        assert_ne!(r.status, 201, "a fenced node accepted a change: {}", r.body);
    }
    // Nothing of it reached the database (a process is the meta entry `process/<name>`).
    let stored =
        "SELECT count(*) FROM tether_journal WHERE key = convert_to('Mprocess/late', 'UTF8')";
    assert_eq!(pg.psql(stored), "0");
    // It steps down by itself (told by the database that it lost the lease, or seeing by its
    // own clock that it could not renew it in time): it starts over in place and waits as a
    // standby.
    eventually("node a stepped down", WAIT, || {
        let log = std::fs::read_to_string(tmp.path().join("a/server.log")).unwrap_or_default();
        let stepped_down = log.contains("lease-lost-stepping-down")
            || log.contains("lease-unrenewed-stepping-down");
        (stepped_down && log.contains("standby-waiting-for-the-lease")).then_some(())
    });
    assert_eq!(a.pid(), Some(a_pid), "it started over in place");
    // b serves: the same change is accepted there.
    let r = b.request(
        "POST",
        "/api/v1/processes",
        Some(
            &json!({"name": "late", "steps": [{"name": "s", "plugin": "shell", "step": "run",
            "properties": {"script": "true"}}]}),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(pg.psql(stored), "1", "the check sees a stored process");
}

/// The database restored from a backup taken before the agent's last exchanges (or failed over
/// to a replica that was behind): the server reconciles with the agent by itself, as on sled.
#[test]
fn a_database_restored_behind_the_agent_reconciles_by_itself() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let mut server = Server::start_with(tmp.path(), &borrowed(&on(&pg)));
    let mut agent = Agent::install(&server, tmp.path(), "pg-agent", &[]);
    agent.run();
    eventually("agent online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    server.shell_process("hello", "echo hello");
    let ids = vec![agent.id.clone()];
    assert!(
        dispatch(&server, "hello", &ids).is_some(),
        "before the backup"
    );
    server.kill();
    pg.psql(
        "CREATE TABLE backup_journal AS SELECT * FROM tether_journal; \
         CREATE TABLE backup_blobs AS SELECT * FROM tether_blobs",
    );
    server.run();
    assert!(
        dispatch(&server, "hello", &ids).is_some(),
        "after the backup"
    );
    // One round trip through the agent before the kill: it answers a probe sent after the
    // acknowledgements of that job's events, so it holds them (they are what the restored
    // database lost).
    let probes = format!("/api/v1/agents/{}/probes", agent.id);
    let r = server.request("POST", &probes, Some(&json!({"commands": 1, "events": 0})));
    assert_eq!(r.status, 202, "{}", r.body);
    eventually("the probe echoed", WAIT, || {
        let r = server.request("GET", &probes, None);
        (r.status == 200 && r.json()["probes"]["echoes"]["received"] == 1).then_some(())
    });
    server.kill();
    pg.psql(
        "BEGIN; TRUNCATE tether_journal, tether_blobs; \
         INSERT INTO tether_journal SELECT * FROM backup_journal; \
         INSERT INTO tether_blobs SELECT * FROM backup_blobs; COMMIT",
    );
    server.run();
    let r = eventually("the agent's report in", WAIT, || {
        let r = server.request("GET", "/api/v1/reconciliation", None).json();
        (r["agents"][0]["phase"] == "reported").then_some(r)
    });
    let a = &r["agents"][0];
    assert!(a["events_lost"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(
        a["orphan_results"], 1,
        "the deployment after the backup: {r}"
    );
    assert_eq!(a["orphans"][0]["status"], "succeeded", "{r}");
    assert_eq!(server.agent_status(&agent.id), "online");
    assert!(
        dispatch(&server, "hello", &ids).is_some(),
        "after the restore"
    );
}

#[test]
fn a_secret_is_absent_from_a_dump_of_the_database_and_from_every_directory() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let server = Server::start_with(tmp.path(), &borrowed(&on(&pg)));
    let mut agent = Agent::install(&server, tmp.path(), "pg-secret", &[]);
    agent.run();
    eventually("agent online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    let nonce: u64 = rand::random();
    let (secret, visible) = (
        format!("pgS3cr3t-{nonce:x}"),
        format!("pgV1sible-{nonce:x}"),
    );
    let r = server.request(
        "POST",
        "/api/v1/processes",
        Some(&json!({"name": "guarded", "steps": [{"name": "use", "plugin": "shell",
            "step": "run", "properties": {
                "script": "test \"$TETHER_PROP_PASSWORD\" = '${api_secret}' && echo \"ok $TETHER_PROP_NOTE\"",
                "password": "${api_secret}", "note": "${note}"}, "secrets": ["password"]}]})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = server.request(
        "POST",
        "/api/v1/deployments",
        Some(
            &json!({"process": "guarded", "targets": {"agents": ["pg-secret"]},
            "properties": {"api_secret": secret, "note": visible}}),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let d = eventually("deployment done", WAIT, || {
        let d = server
            .request("GET", &format!("/api/v1/deployments/{id}"), None)
            .json();
        (d["status"] != "queued" && d["status"] != "running").then_some(d)
    });
    assert_eq!(d["status"], "succeeded", "{d}");
    let log = server.request(
        "GET",
        &format!("/api/v1/deployments/{id}/jobs/pg-secret/steps/use/log"),
        None,
    );
    assert!(log.body.contains(&format!("ok {visible}")), "{}", log.body);

    let dump = pg.dump();
    // As text, or as bytea (COPY writes it in hex).
    let holds = |needle: &str| {
        [needle.to_owned(), hex::encode(needle)]
            .iter()
            .any(|n| dump.windows(n.len()).any(|w| w == n.as_bytes()))
    };
    assert!(holds(&visible), "the dump holds the deployment");
    assert!(
        holds("tether-sealed:v1:"),
        "the dump holds the sealed secret"
    );
    assert!(!holds(&secret), "the secret is in the database dump");
    let found = tether_tests::files_containing(tmp.path(), secret.as_bytes());
    assert!(found.is_empty(), "the secret is in {found:?}");
}

#[test]
fn a_node_whose_claim_on_an_agent_was_taken_commits_nothing_more_for_it_and_its_work_finishes_once()
{
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let env = node(&pg, "node-a", "5000");
    let server = Server::start_with(tmp.path(), &borrowed(&env));
    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    marking_process(&server, "marks", 8, &marks);
    let agents = two_agents_online(&server, &[server.upstream()], tmp.path(), "cl");
    // Each verified handshake claimed its agent for this node.
    let claims = |agent: &str| {
        pg.psql(&format!(
            "SELECT node || ' ' || epoch FROM tether_claims WHERE claim = '{agent}'"
        ))
    };
    eventually("both agents claimed", WAIT, || {
        (claims(&agents[0].id) == "node-a 1" && claims(&agents[1].id) == "node-a 1").then_some(())
    });

    let id = start_marks(&server, "cl");
    eventually("the deployment under way", WAIT, || {
        marks_in(&marks).iter().any(|l| l.len() >= 2).then_some(())
    });
    // Another node takes cl-1, as a newer session of it elsewhere would.
    pg.psql(&format!(
        "UPDATE tether_claims SET node = 'node-b', epoch = epoch + 1 WHERE claim = '{}'",
        agents[0].id
    ));
    let log_path = tmp.path().join("server.log");
    // Its next event is not committed here: the session is closed, the agent comes back, is
    // claimed again, and the job goes on from what the database holds.
    eventually("node-a gives cl-1 up", WAIT, || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        log.contains("agent-claimed-elsewhere").then_some(())
    });
    eventually("node-a claims cl-1 again", WAIT, || {
        (claims(&agents[0].id) == "node-a 3").then_some(())
    });
    every_step_once(&server, &id, &marks);
    assert_eq!(
        claims(&agents[1].id),
        "node-a 1",
        "the other agent kept its claim"
    );
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("link-reloaded-after-a-claim-elsewhere") || log.contains("link-rebuilt"),
        "the link was read again from the database"
    );
    // A deleted agent's claim goes with it.
    let r = server.request("DELETE", &format!("/api/v1/agents/{}", agents[1].id), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        claims(&agents[1].id),
        "",
        "the deleted agent's claim is gone"
    );
    assert_eq!(claims(&agents[0].id), "node-a 3");
}

#[test]
fn an_agent_whose_claim_flaps_many_times_a_second_loses_and_doubles_nothing() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let tmp = TestDir::new();
    let server = Server::start_with(tmp.path(), &borrowed(&node(&pg, "node-a", "5000")));
    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    marking_process(&server, "marks", 8, &marks);
    let agents = two_agents_online(&server, &[server.upstream()], tmp.path(), "fl");
    let flapper = agents[0].id.clone();
    let probes = format!("/api/v1/agents/{flapper}/probes");
    let (mut commands, mut events) = (0u64, 0u64);
    let mut queue = |c: u64, e: u64| {
        let r = server.request("POST", &probes, Some(&json!({"commands": c, "events": e})));
        // A queue the node refused (the agent claimed away mid-commit) wrote nothing.
        if r.status == 202 {
            commands += c;
            events += e;
        }
    };
    queue(500, 500);
    let id = start_marks(&server, "fl");
    // Another node claims the agent over and over, as a session flapping between two nodes
    // would make it, while its job and its probes run.
    let bump = format!(
        "UPDATE tether_claims SET node = 'node-b', epoch = epoch + 1 WHERE claim = '{flapper}'"
    );
    let started = std::time::Instant::now();
    let mut bumps = 0;
    while started.elapsed() < Duration::from_secs(6) {
        pg.psql(&bump);
        bumps += 1;
        if bumps % 10 == 0 {
            queue(100, 100);
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    let log_path = tmp.path().join("server.log");
    let given_up = std::fs::read_to_string(&log_path)
        .unwrap()
        .matches("agent-claimed-elsewhere")
        .count();
    eprintln!("{bumps} claims taken away; node-a gave the agent up {given_up} times");
    assert!(given_up >= 3, "the flapping reached the agent's commits");
    let metrics = server.request("GET", "/metrics", None).body;
    let fenced: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tether_journal_fenced_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        fenced >= given_up as u64,
        "fenced commits counted: {fenced}"
    );

    every_step_once(&server, &id, &marks);
    let p = eventually("every probe arrived", Duration::from_secs(120), || {
        let p = server.probes(&flapper);
        (p["echoes"]["received"].as_u64() >= Some(commands)
            && p["events"]["received"].as_u64() >= Some(events))
        .then_some(p)
    });
    for (series, n) in [("echoes", commands), ("events", events)] {
        assert_eq!(p[series]["received"], n, "{series}: {p}");
        assert_eq!(p[series]["duplicates"], 0, "{series} delivered twice: {p}");
        assert_eq!(p[series]["gaps"], 0, "{series} skipped: {p}");
    }
}
