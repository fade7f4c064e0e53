//! A server restored from a backup taken before its agents' last exchanges (as `docs/install.md`
//! §6 says to restore one) reconciles with them by itself: every agent, direct or behind a
//! relay, comes back online without a manual step; work the agents finished after the backup is
//! recorded (jobs the restored server knew are brought up to date, results for jobs it never
//! knew are kept and shown as such); nothing runs twice; new work runs; the operator sees the
//! reconciliation in `/admin/health`, the REST API, the CLI and the web page.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::measure::dispatch;
use tether_tests::relays::Relay;
use tether_tests::tether_cli::Tether;

const WAIT: Duration = Duration::from_secs(60);

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(ok.success(), "cp -a {} {}", from.display(), to.display());
}

fn post(server: &Server, path: &str, body: &Value) -> Value {
    let r = server.request("POST", path, Some(body));
    assert_eq!(r.status, 201, "{path}: {}", r.body);
    r.json()
}

fn deployment(server: &Server, id: &str) -> Value {
    server
        .request("GET", &format!("/api/v1/deployments/{id}"), None)
        .json()
}

fn online(server: &Server, agents: &[&Agent]) {
    for a in agents {
        eventually(&format!("{} online", a.name), WAIT, || {
            (server.agent_status(&a.id) == "online").then_some(())
        });
    }
}

/// A page of the web application, logged in as the initial admin.
fn web_page(server: &Server, path: &str) -> String {
    let password = std::fs::read_to_string(server.dir.join("admin.password")).unwrap();
    let cookie = server.web_login("admin", password.trim());
    let r = server.web_get(&cookie, path);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

/// The job ids of deployment `d`.
fn job_ids(d: &Value) -> Vec<String> {
    d["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_server_restored_behind_its_fleet_reconciles_with_every_agent_by_itself() {
    let tmp = TestDir::new();
    let mut server = Server::start(tmp.path());
    // Once more, now on the ports it got: a restart in place keeps them.
    server.kill();
    server.run();
    let mut relay = Relay::start(&server, &[server.upstream()], tmp.path(), "relay");
    let mut direct = Agent::install(&server, tmp.path(), "direct", &[]);
    let mut relayed = Agent::install_via(
        &server,
        &[relay.upstream()],
        tmp.path(),
        "relayed",
        &[],
        &[],
    );
    direct.run();
    relayed.run();
    online(&server, &[&direct, &relayed]);
    let targets = vec![direct.id.clone(), relayed.id.clone()];
    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let release = tmp.path().join("release");
    // Every step appends a line to its job's marks file: each must appear exactly once.
    server.shell_process(
        "hello",
        &format!("echo say >> {}/$TETHER_JOB_ID.marks", marks.display()),
    );
    post(
        &server,
        "/api/v1/processes",
        &json!({"name": "gated", "steps": [
            {"name": "wait", "plugin": "shell", "step": "run", "properties": {"script": format!(
                "echo wait >> {m}/$TETHER_JOB_ID.marks; while [ ! -f {r} ]; do sleep 0.1; done",
                m = marks.display(), r = release.display())}},
            {"name": "after", "plugin": "shell", "step": "run", "properties": {"script": format!(
                "echo after >> {}/$TETHER_JOB_ID.marks", marks.display())}}]}),
    );
    assert!(dispatch(&server, "hello", &targets).is_some(), "before");

    // A deployment under way when the backup is taken.
    let gated = post(
        &server,
        "/api/v1/deployments",
        &json!({"process": "gated", "targets": {"agents": targets}, "properties": {}}),
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let gated_jobs = job_ids(&deployment(&server, &gated));
    eventually("both gated jobs waiting", WAIT, || {
        gated_jobs
            .iter()
            .all(|j| marks.join(format!("{j}.marks")).exists())
            .then_some(())
    });
    server.kill();
    let backup = tmp.path().join("backup");
    copy_dir(&server.dir, &backup);
    server.run();

    // After the backup: the gated jobs finish, and a new deployment runs to the end.
    std::fs::write(&release, "").unwrap();
    eventually("the gated deployment finished", WAIT, || {
        (deployment(&server, &gated)["status"] == "succeeded").then_some(())
    });
    let lost = post(
        &server,
        "/api/v1/deployments",
        &json!({"process": "hello", "targets": {"agents": targets}, "properties": {}}),
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually("the deployment after the backup finished", WAIT, || {
        (deployment(&server, &lost)["status"] == "succeeded").then_some(())
    });
    let lost_jobs = job_ids(&deployment(&server, &lost));

    // The server's disk dies; it is restored from the backup.
    server.kill();
    copy_dir(&backup, &server.dir);
    server.run();
    assert_eq!(
        deployment(&server, &gated)["status"],
        "running",
        "the backup's view"
    );
    assert_eq!(
        server
            .request("GET", &format!("/api/v1/deployments/{lost}"), None)
            .status,
        404,
        "made after the backup"
    );

    // Every agent comes back by itself, and its report completes the record.
    online(&server, &[&direct, &relayed]);
    let reconciliation = eventually("both agents reported", WAIT, || {
        let r = server.request("GET", "/api/v1/reconciliation", None).json();
        let agents = r["agents"].as_array()?;
        (agents.len() == 2 && agents.iter().all(|a| a["phase"] == "reported")).then_some(r)
    });
    let d = eventually("the gated deployment brought up to date", WAIT, || {
        let d = deployment(&server, &gated);
        (d["status"] == "succeeded").then_some(d)
    });
    for job in d["jobs"].as_array().unwrap() {
        for step in job["steps"].as_array().unwrap() {
            assert_eq!(step["status"], "succeeded", "{d}");
        }
    }
    let mut orphans: Vec<String> = Vec::new();
    for a in reconciliation["agents"].as_array().unwrap() {
        assert!(
            a["events_lost"].as_u64().unwrap() > 0,
            "the events after the backup were lost: {a}"
        );
        assert!(a["jobs_updated"].as_u64().unwrap() >= 1, "{a}");
        for o in a["orphans"].as_array().unwrap() {
            if o["deployment_id"] == lost.as_str() {
                assert_eq!(o["status"], "succeeded", "{o}");
                assert_eq!(o["steps"][0]["status"], "succeeded", "{o}");
                orphans.push(o["job_id"].as_str().unwrap().to_owned());
            }
        }
    }
    orphans.sort();
    let mut expected = lost_jobs.clone();
    expected.sort();
    assert_eq!(
        orphans, expected,
        "the lost deployment's results are kept: {reconciliation}"
    );

    // The operator sees it: health, the CLI and the web page.
    let health = server.try_health().expect("health");
    assert_eq!(health["agents_refused"], 0, "{health}");
    assert_eq!(health["reconciliation"]["agents"], 2, "{health}");
    assert!(health["reconciliation"]["orphan_results"].as_u64().unwrap() >= 2);
    let metrics = server.request("GET", "/metrics", None).body;
    assert!(
        metrics.contains("tether_reconciliation_agents 2\n")
            && metrics.contains("tether_agents_refused 0\n"),
        "{metrics}"
    );
    let page = web_page(&server, "/health");
    assert!(
        page.contains("id=\"reconciliation\"") && page.contains(&lost),
        "the web health page shows the reconciliation and the orphan results:\n{page}"
    );
    let cli = Tether::new(&tmp.path().join("cli"));
    cli.login(&server);
    let out = cli.run(&["health"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("reconciliation"), "{text}");
    let out = cli.run(&["reconciliation"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("relayed") && text.contains(&lost), "{text}");

    // Nothing ran twice; new work runs on both.
    assert!(
        dispatch(&server, "hello", &targets).is_some(),
        "after the restore"
    );
    let entries: Vec<_> = std::fs::read_dir(&marks).unwrap().flatten().collect();
    assert_eq!(entries.len(), 8, "four deployments' jobs on two agents");
    for e in entries {
        let lines = std::fs::read_to_string(e.path()).unwrap();
        let mut sorted: Vec<&str> = lines.lines().collect();
        let all = sorted.len();
        sorted.dedup();
        assert_eq!(all, sorted.len(), "{:?}: {lines}", e.path());
    }

    // Reviewed: dismissed, one agent at a time.
    let r = server.request("DELETE", "/api/v1/reconciliation/direct", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = server.request("DELETE", "/api/v1/reconciliation/direct", None);
    assert_eq!(r.status, 404, "{}", r.body);
    let r = server.request("GET", "/api/v1/reconciliation", None).json();
    assert_eq!(r["agents"].as_array().unwrap().len(), 1, "{r}");
    relay.kill();
}

/// The restored server numbers new commands before the agent is back: the agent holds other
/// commands under those numbers. Told apart by the command id in its Hello, they are sent again
/// under new numbers (never skipped as "already held"), and run.
#[test]
fn commands_numbered_after_a_restore_are_not_mistaken_for_those_the_agent_holds() {
    let tmp = TestDir::new();
    let mut server = Server::start(tmp.path());
    server.kill();
    server.run();
    let mut agent = Agent::install(&server, tmp.path(), "solo", &[]);
    agent.run();
    online(&server, &[&agent]);
    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    server.shell_process(
        "hello",
        &format!("echo say >> {}/$TETHER_JOB_ID.marks", marks.display()),
    );
    let targets = vec![agent.id.clone()];
    server.kill();
    let backup = tmp.path().join("backup");
    copy_dir(&server.dir, &backup);
    server.run();
    assert!(
        dispatch(&server, "hello", &targets).is_some(),
        "after the backup"
    );

    // Restored while the agent is away; a deployment is queued for it before it is back.
    agent.stop();
    server.kill();
    copy_dir(&backup, &server.dir);
    server.run();
    let queued = post(
        &server,
        "/api/v1/deployments",
        &json!({"process": "hello", "targets": {"agents": targets}, "properties": {}}),
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    agent.run();
    eventually(
        "the deployment queued while the agent was away ran",
        WAIT,
        || (deployment(&server, &queued)["status"] == "succeeded").then_some(()),
    );
    let job = &job_ids(&deployment(&server, &queued))[0];
    let ran = std::fs::read_to_string(marks.join(format!("{job}.marks"))).unwrap();
    assert_eq!(ran.lines().count(), 1, "{ran}");
    let r = server.request("GET", "/api/v1/reconciliation", None).json();
    let a = &r["agents"][0];
    assert_eq!(a["commands_lost"], 1, "{r}");
    assert!(a["events_lost"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(
        a["orphan_results"], 1,
        "the deployment after the backup: {r}"
    );

    // The other way round, an agent restored behind the server (it lost commands it
    // acknowledged) is refused, not resynchronised blindly: health names it and `tether
    // health` fails until an operator acts.
    agent.stop();
    let agent_backup = tmp.path().join("agent-backup");
    copy_dir(&agent.dir, &agent_backup);
    agent.run();
    assert!(
        dispatch(&server, "hello", &targets).is_some(),
        "after the agent's backup"
    );
    agent.stop();
    copy_dir(&agent_backup, &agent.dir);
    agent.run();
    let health = eventually("the restored agent refused", WAIT, || {
        let h = server.try_health()?;
        (h["agents_refused"] == 1).then_some(h)
    });
    let why = health["agents"][agent.id.as_str()]["refused"]
        .as_str()
        .unwrap();
    assert!(why.contains("lost acknowledged messages"), "{health}");
    let cli = Tether::new(&tmp.path().join("cli"));
    cli.login(&server);
    let out = cli.run(&["health"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refused"),
        "{out:?}"
    );
    agent.stop();
}

/// A peer holding an agent's key claims in its Hello that the server is behind it: malformed
/// claims are refused with nothing journaled; a well-formed one moves only that agent's own
/// streams forward (and is shown), never another agent's.
#[test]
fn a_hello_claiming_the_server_is_behind_moves_only_its_own_agents_streams() {
    use tether_shared::protocol::{ErrorCode, Frame, Seq};
    use tether_tests::wire::{
        agent_identity, fresh_incarnation, hello, journal_commits, server_key, WsClient,
    };
    let short = Duration::from_secs(10);
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let victim = Agent::install(&server, tmp.path(), "claimer", &[]);
    let mut other = Agent::install(&server, tmp.path(), "other", &[]);
    let key = agent_identity(&victim.dir);
    let session = |f: &dyn Fn(&str) -> tether_shared::protocol::Hello| {
        let mut ws = WsClient::connect(&server).unwrap();
        ws.secure(&victim.id, &key, &server_key(&server));
        let nonce = ws.challenge(short);
        ws.send(&Frame::Hello(f(&nonce))).unwrap();
        ws
    };
    let incarnation = fresh_incarnation();
    let commits = journal_commits(&server);
    type MakeHello<'a> = Box<dyn Fn(&str) -> tether_shared::protocol::Hello + 'a>;
    let cases: Vec<(&str, &str, MakeHello)> = vec![
        (
            "an oversized command id",
            "last_command_id",
            Box::new(|nonce| {
                let mut h = hello(&key, &victim.id, nonce, &incarnation);
                h.last_command_id = "f".repeat(65);
                h
            }),
        ),
        (
            "events acknowledged past the last seq",
            "out of range",
            Box::new(|nonce| {
                let mut h = hello(&key, &victim.id, nonce, &incarnation);
                h.events_acked = Seq(u64::MAX);
                h
            }),
        ),
    ];
    for (case, needle, make) in cases {
        let closed = session(&*make).expect_close(short);
        let e = closed
            .error()
            .unwrap_or_else(|| panic!("{case}: {closed:?}"));
        assert_eq!(e.code, ErrorCode::Malformed, "{case}: {e:?}");
        assert!(e.message.contains(needle), "{case}: {e:?}");
    }
    assert_eq!(
        journal_commits(&server),
        commits,
        "malformed hellos were journaled"
    );

    // Well-formed: a first session makes this incarnation known, a second claims to be far ahead.
    let mut ws = session(&|nonce| hello(&key, &victim.id, nonce, &incarnation));
    let Frame::Welcome(w) = ws.recv_frame("welcome", short) else {
        panic!("no welcome")
    };
    drop(ws);
    let mut ws = session(&|nonce| {
        let mut h = hello(&key, &victim.id, nonce, &incarnation);
        h.server_incarnation = w.server_incarnation.clone();
        h.events_acked = Seq(1_000_000);
        h
    });
    let Frame::Welcome(w2) = ws.recv_frame("welcome", short) else {
        panic!("no welcome")
    };
    assert_eq!(w2.last_event_seq, Seq(1_000_000), "its own stream moved");
    drop(ws);
    let r = server.request("GET", "/api/v1/reconciliation", None).json();
    let agents = r["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1, "{r}");
    assert_eq!(agents[0]["agent_id"], victim.id.as_str(), "{r}");
    assert_eq!(agents[0]["events_lost"], 1_000_000, "{r}");
    assert_eq!(
        agents[0]["phase"], "unsupported",
        "it did not offer a report: {r}"
    );

    // Not seen since the server started: its path is unknown, not "direct".
    let cli = Tether::new(&tmp.path().join("cli"));
    cli.login(&server);
    let out = cli.run(&["agents"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text.lines().find(|l| l.starts_with("other")).unwrap();
    assert!(!line.contains("direct"), "{text}");
    // Another agent is untouched: it comes online and runs work.
    other.run();
    online(&server, &[&other]);
    server.shell_process("hello", "echo hello");
    assert!(dispatch(&server, "hello", &[other.id.clone()]).is_some());
    let r = server.request("GET", "/api/v1/reconciliation", None).json();
    assert_eq!(r["agents"].as_array().unwrap().len(), 1, "{r}");
}
