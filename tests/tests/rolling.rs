//! Pools and rolling deployments end to end, with real agents: a batch starts only once every
//! job of the batch before it ended (checked from the times the steps themselves wrote), a
//! failure stops the later batches, and a pool runs on exactly N of the tagged agents.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::time::Duration;

use serde_json::{json, Value};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};

const WAIT: Duration = Duration::from_secs(90);

fn final_deployment(server: &Server, id: &str) -> Value {
    eventually("a final deployment", WAIT, || {
        let d = server
            .request("GET", &format!("/api/v1/deployments/{id}"), None)
            .json();
        matches!(
            d["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        )
        .then_some(d)
    })
}

fn deploy(server: &Server, body: Value) -> Value {
    final_deployment(server, &server.start_deployment(&body))
}

fn job<'a>(d: &'a Value, agent: &str) -> &'a Value {
    d["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["agent"] == agent)
        .unwrap_or_else(|| panic!("no job of {agent}: {d}"))
}

#[test]
fn batches_run_one_after_another_a_failure_stops_the_rest_and_a_pool_takes_n() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let names = ["r-1", "r-2", "r-3", "r-4", "r-5"];
    let mut agents: Vec<Agent> = names
        .iter()
        .map(|n| Agent::install(&server, tmp.path(), n, &["r"]))
        .collect();
    for a in &mut agents {
        a.run();
    }
    for a in &agents {
        eventually("online", WAIT, || {
            (server.agent_status(&a.id) == "online").then_some(())
        });
    }
    let times = tmp.path().join("times");
    std::fs::create_dir_all(&times).unwrap();
    // Each job writes when it started and ended (ms), holding its batch open a little.
    let r = server.request(
        "POST",
        "/api/v1/processes",
        Some(
            &json!({"name": "timed", "steps": [{"name": "t", "plugin": "shell", "step": "run",
            "properties": {"script": format!(
                "f={}/${{agent.name}}; date +%s%3N > $f.start; sleep 0.3; date +%s%3N > $f.end; \
                 [ \"${{agent.name}}\" != \"$TETHER_PROP_FAIL_ON\" ]",
                times.display()),
                "fail_on": "${fail_on}"}}]}),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let read = |name: &str, what: &str| -> u64 {
        std::fs::read_to_string(times.join(format!("{name}.{what}")))
            .unwrap_or_else(|e| panic!("{name}.{what}: {e}"))
            .trim()
            .parse()
            .unwrap()
    };

    // Batches of 40% of 5 = 2: [r-1 r-2] [r-3 r-4] [r-5], in target order.
    let d = deploy(
        &server,
        json!({"process": "timed", "targets": {"agents": names},
               "properties": {"fail_on": "none"}, "batch_percent": 40}),
    );
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(d["rolling"]["batch_size"], 2, "{d}");
    assert_eq!(d["rolling"]["batches"].as_array().unwrap().len(), 3, "{d}");
    let batch_of = |n: &str| job(&d, n)["batch"].as_u64().unwrap();
    assert_eq!(names.map(batch_of), [0, 0, 1, 1, 2]);
    for (earlier, later) in [(&names[0..2], &names[2..4]), (&names[2..4], &names[4..5])] {
        let ended = earlier.iter().map(|n| read(n, "end")).max().unwrap();
        let started = later.iter().map(|n| read(n, "start")).min().unwrap();
        assert!(
            started >= ended,
            "{later:?} started at {started}, before {earlier:?} ended at {ended}"
        );
    }

    // The server's own step times say the same.
    let step_times = |n: &str, what: &str| job(&d, n)["steps"][0][what].as_u64().unwrap();
    let ended = names[..2]
        .iter()
        .map(|n| step_times(n, "finished_unix_ms"))
        .max()
        .unwrap();
    let started = names[2..4]
        .iter()
        .map(|n| step_times(n, "started_unix_ms"))
        .min()
        .unwrap();
    assert!(
        started >= ended,
        "batch 2 started at {started}, batch 1 ended at {ended}"
    );

    // One at a time, failing on r-2: r-3.. are cancelled, saying why, and never ran.
    for n in names {
        let _ = std::fs::remove_file(times.join(format!("{n}.start")));
    }
    let d = deploy(
        &server,
        json!({"process": "timed", "targets": {"agents": names},
               "properties": {"fail_on": "r-2"}, "batch_size": 1}),
    );
    assert_eq!(d["status"], "failed", "{d}");
    assert_eq!(job(&d, "r-1")["status"], "succeeded");
    assert_eq!(job(&d, "r-2")["status"], "failed");
    for n in &names[2..] {
        let j = job(&d, n);
        assert_eq!(j["status"], "cancelled", "{j}");
        assert!(
            j["message"]
                .as_str()
                .unwrap()
                .contains("earlier batch failed"),
            "{j}"
        );
        assert!(!times.join(format!("{n}.start")).exists(), "{n} ran");
    }
    // With stop_on_failure false, the rest runs.
    let d = deploy(
        &server,
        json!({"process": "timed", "targets": {"agents": names},
               "properties": {"fail_on": "r-2"}, "batch_size": 2, "stop_on_failure": false}),
    );
    assert_eq!(d["status"], "failed", "{d}");
    assert_eq!(job(&d, "r-5")["status"], "succeeded", "{d}");

    // A pool: any 2 of the agents tagged r.
    let d = deploy(
        &server,
        json!({"process": "timed", "targets": {"tags": ["r"], "count": 2},
               "properties": {"fail_on": "none"}}),
    );
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(d["jobs"].as_array().unwrap().len(), 2, "{d}");
    // Bad requests say what is wrong.
    for (body, says) in [
        (
            json!({"process": "timed", "targets": {"tags": ["r"], "count": 9}}),
            "only 5 agents",
        ),
        (
            json!({"process": "timed", "targets": {"agents": ["r-1"], "count": 1}}),
            "goes with",
        ),
        (
            json!({"process": "timed", "targets": {"tags": ["r"]}, "batch_percent": 0}),
            "1 to 100",
        ),
        (
            json!({"process": "timed", "targets": {"tags": ["r"]}, "batch_size": 1, "batch_percent": 5}),
            "not both",
        ),
        (
            json!({"process": "timed", "targets": {"tags": ["r"]}, "stop_on_failure": true}),
            "rolling",
        ),
    ] {
        let r = server.request("POST", "/api/v1/deployments", Some(&body));
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(r.body.contains(says), "{body}: {}", r.body);
    }

    // The CLI says the same, and the web page shows the batches.
    let cli = tether_tests::tether_cli::Tether::new(&tmp.path().join("cli"));
    cli.login(&server);
    let out = cli.run(&[
        "deploy",
        "timed",
        "--tag",
        "r",
        "--count",
        "3",
        "--batch-size",
        "1",
        "--prop",
        "fail_on=none",
    ]);
    assert!(out.status.success(), "{out:?}");
    let list = server.request("GET", "/api/v1/deployments", None).json();
    let newest = list
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|d| d["created_unix_ms"].as_u64())
        .unwrap();
    let id = newest["id"].as_str().unwrap();
    let d = final_deployment(&server, id);
    assert_eq!(d["jobs"].as_array().unwrap().len(), 3, "{d}");
    assert_eq!(d["rolling"]["batches"].as_array().unwrap().len(), 3, "{d}");
    let r = server.request(
        "POST",
        "/api/v1/users",
        Some(&json!({"name": "viewer", "password": "rolling-password-1", "role": "viewer"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let cookie = server.web_login("viewer", "rolling-password-1");
    let page = server.web_get(&cookie, &format!("/deployments/{id}")).body;
    // The timeline: one bar per step run, three here.
    assert!(page.contains("id=\"timeline\""), "{page}");
    assert_eq!(
        page.matches("<rect class=\"step succeeded\"").count(),
        3,
        "{page}"
    );
    assert!(
        page.contains("id=\"rolling\"")
            && page.contains("1 agents at a time")
            && page.contains("batch 3"),
        "{page}"
    );
    for a in &mut agents {
        a.stop();
    }
}

/// A deployment with a deadline: the job of an agent that never came online expires on the
/// server once it passes (found by the server's sweep, not by the agent), saying why.
#[test]
fn a_job_not_started_by_the_deployments_deadline_expires() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let _away = Agent::install(&server, tmp.path(), "away-1", &["away"]);
    server.shell_process("noop", "true");
    let id = server.start_deployment(
        &json!({"process": "noop", "targets": {"tags": ["away"]}, "deadline_s": 10}),
    );
    let d = server
        .request("GET", &format!("/api/v1/deployments/{id}"), None)
        .json();
    assert_eq!(d["status"], "queued", "{d}");
    let deadline = d["deadline_unix_ms"].as_u64().unwrap();
    assert!(
        deadline > d["created_unix_ms"].as_u64().unwrap() + 9_000,
        "{d}"
    );
    let d = final_deployment(&server, &id);
    assert_eq!(d["status"], "failed", "expired counts as failed: {d}");
    assert_eq!(d["jobs"][0]["status"], "expired", "{d}");
    assert!(
        d["jobs"][0]["finished_unix_ms"].as_u64().unwrap() >= deadline,
        "{d}"
    );
    assert_eq!(
        d["jobs"][0]["message"], "not started before the deployment's deadline",
        "{d}"
    );
    let r = server.request(
        "POST",
        "/api/v1/deployments",
        Some(&json!({"process": "noop", "targets": {"tags": ["away"]}, "deadline_s": 5})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
}
