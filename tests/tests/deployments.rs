//! Deployments end to end: real server, real agents, processes of built-in steps, statuses,
//! logs, secrets, and SIGKILLs in the middle of a deployment (no step that may not run twice
//! ever runs twice, and every deployment reaches a final state).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tether_tests::fleet::{alive, eventually, Agent, Forwarder, Server, TestDir};

const WAIT: Duration = Duration::from_secs(60);

fn create_process(server: &Server, body: Value) {
    let r = server.request("POST", "/api/v1/processes", Some(&body));
    assert_eq!(r.status, 201, "{}", r.body);
}

fn deploy(server: &Server, body: Value) -> String {
    let r = server.request("POST", "/api/v1/deployments", Some(&body));
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["id"].as_str().unwrap().to_owned()
}

fn deployment(server: &Server, id: &str) -> Value {
    let r = server.request("GET", &format!("/api/v1/deployments/{id}"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn final_deployment(server: &Server, id: &str, timeout: Duration) -> Value {
    eventually("a final deployment state", timeout, || {
        let d = deployment(server, id);
        let s = d["status"].as_str().unwrap_or("");
        matches!(s, "succeeded" | "failed" | "cancelled").then_some(d)
    })
}

fn log(server: &Server, id: &str, agent: &str, step: &str) -> String {
    let r = server.request(
        "GET",
        &format!("/api/v1/deployments/{id}/jobs/{agent}/steps/{step}/log"),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

#[test]
fn a_process_of_all_four_built_ins_runs_on_the_agents_with_a_tag() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let mut web1 = Agent::install(&server, tmp.path(), "web-1", &["web"]);
    let mut web2 = Agent::install(&server, tmp.path(), "web-2", &["web"]);
    let mut db = Agent::install(&server, tmp.path(), "db-1", &["db"]);
    for a in [&mut web1, &mut web2, &mut db] {
        a.run();
    }
    for a in [&web1, &web2, &db] {
        eventually("online", WAIT, || {
            (server.agent_status(&a.id) == "online").then_some(())
        });
    }
    let out = tmp.path().join("deployed");
    std::fs::create_dir_all(&out).unwrap();
    let canary = tmp.path().join("canary");
    // An artifact to fetch and a service to call.
    let page = b"<h1>deployed</h1>\n";
    let r = server.request_raw("PUT", "/api/v1/artifacts/site-page/1.0", &[], page);
    assert_eq!(r.status, 201, "{}", r.body);
    let service = tether_tests::fixtures::tiny_http(200, "pong");
    create_process(
        &server,
        json!({"name": "site", "steps": [
            {"name": "build", "plugin": "shell", "step": "run", "properties": {
                "script": "echo \"building for $TETHER_PROP_WHO\"; echo \"pw is $TETHER_PROP_PASSWORD\"; echo '::output version=1.2.3'"
                , "who": "${greeting}", "password": "${db_password_secret}"}, "secrets": ["password"]},
            {"name": "config", "plugin": "file", "step": "write", "properties": {
                "path": format!("{}/${{agent_file}}", out.display()), "content": "greeting=${greeting}\n"}},
            {"name": "fetch", "plugin": "artifact", "step": "fetch", "properties": {
                "name": "site-page", "version": "1.0", "dest": format!("{}/index.html", out.display())}},
            {"name": "ping", "plugin": "http", "step": "request", "properties": {
                "url": format!("http://{service}/health")}},
            {"name": "check", "plugin": "shell", "step": "run", "properties": {
                "script": "test \"$TETHER_OUTPUT_VERSION\" = 1.2.3 && test \"$TETHER_OUTPUT_BODY\" = pong && echo \"saw version $TETHER_OUTPUT_VERSION\""}}
        ]}),
    );
    let evil = format!(
        "hi; touch {} $(touch {})",
        canary.display(),
        canary.display()
    );
    let id = deploy(
        &server,
        json!({"process": "site", "targets": {"tags": ["web"]}, "properties": {
            "greeting": evil, "db_password_secret": "s3cr3t-pw", "agent_file": "site.conf"}}),
    );
    let d = final_deployment(&server, &id, WAIT);
    assert_eq!(d["status"], "succeeded", "{d}");
    let jobs = d["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2, "only the web agents: {d}");
    for job in jobs {
        assert_eq!(job["status"], "succeeded", "{d}");
        let steps = job["steps"].as_array().unwrap();
        assert_eq!(
            steps
                .iter()
                .map(|s| s["status"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["succeeded"; 5],
            "{d}"
        );
        assert_eq!(steps[0]["outputs"]["version"], "1.2.3", "{d}");
        let agent = job["agent"].as_str().unwrap();
        let build = log(&server, &id, agent, "build");
        assert!(build.contains(&format!("building for {evil}")), "{build}");
        assert!(
            build.contains("pw is ***") && !build.contains("s3cr3t-pw"),
            "the secret leaked: {build}"
        );
        assert!(log(&server, &id, agent, "check").contains("saw version 1.2.3"));
    }
    assert!(
        !d.to_string().contains("s3cr3t-pw"),
        "the secret is in the API answer"
    );
    assert_eq!(d["counts"], json!({"succeeded": 2}), "{d}");
    // The summary a poller reads: status and counts, no jobs, secrets masked all the same.
    let r = server.request("GET", &format!("/api/v1/deployments/{id}?jobs=false"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let summary = r.json();
    assert_eq!(summary["status"], "succeeded", "{summary}");
    assert_eq!(summary["counts"], json!({"succeeded": 2}), "{summary}");
    assert_eq!(
        summary["properties"]["db_password_secret"], "***",
        "{summary}"
    );
    assert!(summary.get("jobs").is_none(), "{summary}");
    for bad in ["jobs=maybe", "jobs=false&evil=1"] {
        let r = server.request("GET", &format!("/api/v1/deployments/{id}?{bad}"), None);
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert!(r.body.contains("invalid query"), "{bad}: {}", r.body);
    }
    assert!(!canary.exists(), "a property reached a shell as code");
    assert_eq!(
        std::fs::read(out.join("index.html")).unwrap(),
        page,
        "the artifact arrived"
    );
    let written = std::fs::read_to_string(out.join("site.conf")).unwrap();
    assert_eq!(written, format!("greeting={evil}\n"));
    for a in [&web1, &web2, &db] {
        let text = std::fs::read_to_string(a.dir.join("../").join(format!("{}.log", a.name)))
            .unwrap_or_default();
        assert!(!text.contains("s3cr3t-pw"), "{} logged the secret", a.name);
    }
    let server_log = std::fs::read_to_string(server.dir.join("../server.log")).unwrap_or_default();
    assert!(
        !server_log.contains("s3cr3t-pw"),
        "the server logged the secret"
    );
}

#[test]
fn sigkills_during_a_deployment_never_run_a_step_twice() {
    let seed: u64 = std::env::var("TETHER_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("deployment fault seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let tmp = TestDir::new();
    let mut server = Server::start(tmp.path());
    let budget_env = [("TETHER_AGENT__WORKER_RESTART_BUDGET", "1000")];
    let mut agent = Agent::install_with(&server, tmp.path(), "marked-1", &[], &budget_env);
    agent.run();
    eventually("online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    let marker = tmp.path().join("marker");
    let steps: Vec<Value> = (1..=4)
        .map(|i| {
            json!({"name": format!("s{i}"), "plugin": "shell", "step": "run", "properties": {
                "script": format!("echo s{i} >> {}; sleep 0.2", marker.display())}})
        })
        .collect();
    create_process(&server, json!({"name": "marks", "steps": steps}));

    let mut ids = Vec::new();
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(15) {
        ids.push(deploy(
            &server,
            json!({"process": "marks", "targets": {"agents": ["marked-1"]}, "properties": {}}),
        ));
        // A random moment of the deployment.
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..1500)));
        match rng.gen_range(0..3) {
            0 => {
                server.kill();
                server.run();
            }
            1 => {
                if let Some(old) = agent.kill_worker() {
                    eventually("a new worker", WAIT, || {
                        agent.worker_pid().filter(|p| *p != old && !alive(old))
                    });
                }
            }
            _ => {
                agent.kill_monitor();
                agent.run();
            }
        }
        kills += 1;
    }
    let text = std::fs::read_to_string(&marker).unwrap_or_default();
    let mut interrupted = 0;
    for id in &ids {
        let d = final_deployment(&server, id, Duration::from_secs(120));
        for job in d["jobs"].as_array().unwrap() {
            for s in job["steps"].as_array().unwrap() {
                interrupted += usize::from(s["status"] == "interrupted");
                assert!(
                    s["attempt"].as_u64().unwrap_or(0) <= 1,
                    "a non-rerunnable step started twice: {d}"
                );
            }
        }
    }
    let text_after = std::fs::read_to_string(&marker).unwrap_or_default();
    assert!(text_after.len() >= text.len());
    // Every line is one start of one step; deployments ran one after another on one agent, so
    // the count of each step's line can be checked against the jobs' own reports.
    let mut ran = std::collections::BTreeMap::<String, usize>::new();
    for line in text_after.lines() {
        *ran.entry(line.to_owned()).or_default() += 1;
    }
    let mut reported = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        let d = deployment(&server, id);
        for job in d["jobs"].as_array().unwrap() {
            for s in job["steps"].as_array().unwrap() {
                if matches!(
                    s["status"].as_str(),
                    Some("succeeded" | "failed" | "interrupted" | "timed_out" | "cancelled")
                ) {
                    *reported
                        .entry(s["name"].as_str().unwrap().to_owned())
                        .or_default() += 1;
                }
            }
        }
    }
    for (step, n) in &ran {
        let r = reported.get(step).copied().unwrap_or(0);
        assert!(*n <= r, "step {step} ran {n} times but only {r} runs were reported (a step ran twice): {ran:?} vs {reported:?}");
    }
    eprintln!(
        "{} deployments, {kills} SIGKILLs, {interrupted} steps reported interrupted; lines {ran:?}",
        ids.len()
    );
}

#[test]
fn an_agent_cut_off_finishes_its_job_and_reports_it_later() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let path = Forwarder::start(server.wss, true);
    let mut agent = Agent::install_via(
        &server,
        &[format!("wss://localhost:{}", path.addr.port())],
        tmp.path(),
        "island-1",
        &[],
        &[],
    );
    agent.run();
    eventually("online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    let gate = tmp.path().join("gate");
    let done = tmp.path().join("done");
    create_process(
        &server,
        json!({"name": "offline-work", "steps": [
            {"name": "wait", "plugin": "shell", "step": "run", "properties": {
                "script": format!("echo waiting; while [ ! -e {} ]; do sleep 0.05; done; echo released", gate.display())}},
            {"name": "finish", "plugin": "shell", "step": "run", "properties": {
                "script": format!("for i in $(seq 1 200); do echo line $i; done; touch {}", done.display())}}
        ]}),
    );
    let id = deploy(
        &server,
        json!({"process": "offline-work", "targets": {"agents": ["island-1"]}, "properties": {}}),
    );
    eventually("the first step running", WAIT, || {
        let d = deployment(&server, &id);
        (d["jobs"][0]["steps"][0]["status"] == "running").then_some(())
    });
    path.set(false);
    eventually("agent offline", WAIT, || {
        (server.agent_status(&agent.id) == "offline").then_some(())
    });
    std::fs::write(&gate, b"go").unwrap();
    eventually("the job done on the island", WAIT, || {
        done.exists().then_some(())
    });
    assert_ne!(
        deployment(&server, &id)["status"],
        "succeeded",
        "the server cannot know yet"
    );
    path.set(true);
    let d = final_deployment(&server, &id, WAIT);
    assert_eq!(d["status"], "succeeded", "{d}");
    let text = log(&server, &id, "island-1", "finish");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("line ")).count(),
        200,
        "the full log arrived: {text}"
    );
    assert!(log(&server, &id, "island-1", "wait").contains("released"));
}

#[test]
fn cancel_stops_the_running_step_and_its_whole_process_group() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let mut agent = Agent::install(&server, tmp.path(), "cancel-1", &[]);
    agent.run();
    eventually("online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    let pids = tmp.path().join("pids");
    let after = tmp.path().join("after-cancel");
    create_process(
        &server,
        json!({"name": "long", "steps": [
            {"name": "hang", "plugin": "shell", "step": "run", "properties": {
                // A background grandchild in the same group, and the step itself, both wait.
                "script": format!("sleep 300 & echo $! >> {p}; echo $$ >> {p}; wait", p = pids.display())}},
            {"name": "never", "plugin": "shell", "step": "run", "properties": {
                "script": format!("touch {}", after.display())}}
        ]}),
    );
    let id = deploy(
        &server,
        json!({"process": "long", "targets": {"agents": ["cancel-1"]}, "properties": {}}),
    );
    let running: Vec<u32> = eventually("the step's processes", WAIT, || {
        let text = std::fs::read_to_string(&pids).ok()?;
        let v: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        (v.len() == 2).then_some(v)
    });
    assert!(running.iter().all(|p| alive(*p)));
    let r = server.request("POST", &format!("/api/v1/deployments/{id}/cancel"), None);
    assert_eq!(r.status, 202, "{}", r.body);
    let d = final_deployment(&server, &id, WAIT);
    assert_eq!(d["status"], "cancelled", "{d}");
    let steps = &d["jobs"][0]["steps"];
    assert_eq!(steps[0]["status"], "cancelled", "{d}");
    assert_eq!(steps[1]["status"], "cancelled", "{d}");
    eventually("the step's whole process group gone", WAIT, || {
        running.iter().all(|p| !alive(*p)).then_some(())
    });
    assert!(!after.exists(), "a step after the cancel ran");
}

/// Health's view of the key ring: its key ids and the stored entries not sealed with the last.
fn secrets_health(server: &Server) -> (Vec<String>, u64) {
    let h = server.request("GET", "/admin/health", None).json();
    let keys = h["deployments"]["secrets_keys"]
        .as_array()
        .unwrap_or_else(|| panic!("no secrets_keys: {h}"))
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    (keys, h["deployments"]["secrets_stale"].as_u64().unwrap())
}

#[test]
fn a_secret_is_in_no_file_of_any_data_directory_and_survives_a_key_rotation() {
    let tmp = TestDir::new();
    let mut server = Server::start(tmp.path());
    let relay =
        tether_tests::relays::Relay::start(&server, &[server.upstream()], tmp.path(), "relay-s");
    let mut direct = Agent::install(&server, tmp.path(), "direct-1", &["s"]);
    let mut edge = Agent::install_via(
        &server,
        &[relay.upstream()],
        tmp.path(),
        "edge-1",
        &["s"],
        &[],
    );
    for a in [&mut direct, &mut edge] {
        a.run();
    }
    for a in [&direct, &edge] {
        eventually("online", WAIT, || {
            (server.agent_status(&a.id) == "online").then_some(())
        });
    }
    let nonce: u64 = rand::random();
    let (secret, literal, visible) = (
        format!("dplY-s3cr3t-{nonce:x}"),
        format!("proc-l1teral-{nonce:x}"),
        format!("v1sible-{nonce:x}"),
    );
    // A secret substituted into a script (which makes the script secret), passed as a declared
    // secret property, and one written literally into the process.
    create_process(
        &server,
        json!({"name": "guarded", "steps": [
            {"name": "use", "plugin": "shell", "step": "run", "properties": {
                "script": "test \"$TETHER_PROP_PASSWORD\" = '${db_secret}' && printf %s \"$TETHER_PROP_TOKEN\" | sha256sum && echo \"matched $TETHER_PROP_NOTE\"",
                "password": "${db_secret}", "token": literal, "note": "${note}"},
             "secrets": ["password", "token"]}
        ]}),
    );
    let token_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(literal.as_bytes()));
    let deploy_once = |server: &Server| {
        let id = deploy(
            server,
            json!({"process": "guarded", "targets": {"tags": ["s"]},
                   "properties": {"db_secret": secret, "note": visible}}),
        );
        let d = final_deployment(server, &id, WAIT);
        assert_eq!(d["status"], "succeeded", "{d}");
        for agent in ["direct-1", "edge-1"] {
            let text = log(server, &id, agent, "use");
            assert!(
                text.contains(&format!("matched {visible}")),
                "{agent}: {text}"
            );
            assert!(
                text.contains(&token_sha),
                "{agent} got another token: {text}"
            );
        }
        id
    };
    deploy_once(&server);

    let leaks = |what: &str| {
        let mut found = Vec::new();
        for needle in [&secret, &literal] {
            found.extend(tether_tests::files_containing(
                tmp.path(),
                needle.as_bytes(),
            ));
        }
        assert!(found.is_empty(), "{what}: a secret is in {found:?}");
    };
    // The check can see what is stored: the visible property is in both journals.
    let holding = tether_tests::files_containing(tmp.path(), visible.as_bytes());
    for dir in [&server.dir, &direct.dir, &edge.dir] {
        assert!(
            holding.iter().any(|f| f.starts_with(dir.join("journal"))),
            "{} does not hold the visible property: {holding:?}",
            dir.display()
        );
    }
    leaks("after a deployment");

    // Rotation: a new key seals from the next start, everything stored is sealed again
    // with it, and the old key can go; the stored process still deploys.
    let (keys, stale) = secrets_health(&server);
    assert_eq!((keys.len(), stale), (1, 0));
    server.kill();
    let etc = tmp.path().join("etc");
    let out = tether_tests::run("tether-server", &etc, ["secrets", "rotate"]);
    assert!(out.status.success(), "{out:?}");
    server.run();
    let new_keys = eventually("stored secrets sealed again", WAIT, || {
        let (keys, stale) = secrets_health(&server);
        (keys.len() == 2 && stale == 0).then_some(keys)
    });
    assert_eq!(new_keys[0], keys[0]);
    server.kill();
    let out = tether_tests::run("tether-server", &etc, ["secrets", "retire", &keys[0]]);
    assert!(out.status.success(), "{out:?}");
    let out = tether_tests::run("tether-server", &etc, ["secrets", "retire", &new_keys[1]]);
    assert!(!out.status.success(), "the sealing key was retired");
    assert!(
        tether_tests::stderr(&out).contains("rotate first"),
        "{out:?}"
    );
    server.run();
    assert_eq!(secrets_health(&server), (vec![new_keys[1].clone()], 0));
    for a in [&direct, &edge] {
        eventually("online again", WAIT, || {
            (server.agent_status(&a.id) == "online").then_some(())
        });
    }
    deploy_once(&server);
    leaks("after a rotation and a second deployment");
}

#[test]
fn an_agent_in_maintenance_starts_nothing_new_until_it_ends_and_skipping_deployments_pass_it_by() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let mut kept = Agent::install(&server, tmp.path(), "m-1", &["m"]);
    let mut other = Agent::install(&server, tmp.path(), "m-2", &["m"]);
    for a in [&mut kept, &mut other] {
        a.run();
    }
    for a in [&kept, &other] {
        eventually("online", WAIT, || {
            (server.agent_status(&a.id) == "online").then_some(())
        });
    }
    create_process(
        &server,
        json!({"name": "hello", "steps": [{"name": "say", "plugin": "shell", "step": "run",
            "properties": {"script": "echo hello from $TETHER_JOB_ID"}}]}),
    );
    let cli = tether_tests::tether_cli::Tether::new(&tmp.path().join("cli"));
    cli.login(&server);
    let out = cli.run(&[
        "agents",
        "maintenance",
        "m-1",
        "on",
        "--reason",
        "kernel upgrade",
    ]);
    assert!(out.status.success(), "{out:?}");
    let agents = server.request("GET", "/api/v1/agents", None).json();
    let m1 = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "m-1")
        .unwrap();
    assert_eq!(m1["maintenance"]["reason"], "kernel upgrade", "{m1}");
    let listed = tether_tests::stdout(&cli.run(&["agents"]));
    assert!(listed.contains("online (maintenance)"), "{listed}");
    let job_of = |d: &Value, agent: &str| {
        d["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["agent"] == agent)
            .cloned()
            .unwrap()
    };

    // Made to wait: m-2's job runs to its end while m-1's stays queued.
    let waiting = deploy(
        &server,
        json!({"process": "hello", "targets": {"tags": ["m"]}}),
    );
    let d = eventually("m-2's job done", WAIT, || {
        let d = deployment(&server, &waiting);
        (job_of(&d, "m-2")["status"] == "succeeded").then_some(d)
    });
    assert_eq!(job_of(&d, "m-1")["status"], "queued", "{d}");
    // Made to skip: m-1's job ends cancelled, saying why; m-2's runs.
    let skipping = deploy(
        &server,
        json!({"process": "hello", "targets": {"tags": ["m"]}, "skip_maintenance": true}),
    );
    let d = final_deployment(&server, &skipping, WAIT);
    let skipped = job_of(&d, "m-1");
    assert_eq!(skipped["status"], "cancelled", "{d}");
    assert_eq!(
        skipped["message"], "skipped: the agent is in maintenance",
        "{d}"
    );
    assert_eq!(job_of(&d, "m-2")["status"], "succeeded", "{d}");
    // The waiting job is still waiting, after a later one passed it by.
    assert_eq!(
        job_of(&deployment(&server, &waiting), "m-1")["status"],
        "queued"
    );

    // The web application shows it, and its form ends it: the waiting job starts and ends.
    let r = server.request(
        "POST",
        "/api/v1/users",
        Some(&json!({"name": "ops", "password": "maintenance-password", "role": "admin"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let cookie = server.web_login("ops", "maintenance-password");
    let list = server.web_get(&cookie, "/agents").body;
    assert!(list.contains("data-status=\"maintenance\""), "{list}");
    let page = server
        .web_get(&cookie, &format!("/agents/{}", kept.id))
        .body;
    assert!(
        page.contains("kernel upgrade") && page.contains("End maintenance"),
        "{page}"
    );
    let r = server.web_post(
        &cookie,
        &tether_tests::csrf_of(&page),
        &format!("/agents/{}/maintenance", kept.id),
        "on=no",
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let page = server
        .web_get(&cookie, &format!("/agents/{}", kept.id))
        .body;
    assert!(page.contains("Start maintenance"), "{page}");
    let d = final_deployment(&server, &waiting, WAIT);
    assert_eq!(d["status"], "succeeded", "{d}");
    // Refused: a reason without maintenance, a reason with control characters; nothing changes.
    for body in [
        json!({"maintenance_reason": "x"}),
        json!({"maintenance": true, "maintenance_reason": "a\u{7}b"}),
    ] {
        let r = server.request("PATCH", "/api/v1/agents/m-1", Some(&body));
        assert_eq!(r.status, 400, "{body}: {}", r.body);
    }
    let agents = server.request("GET", "/api/v1/agents", None).json();
    assert!(
        agents
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["maintenance"].is_null()),
        "{agents}"
    );
}

/// The order of `start ID` / `end ID` lines the steps wrote.
fn marks(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn an_agents_own_concurrency_limit_runs_its_jobs_one_after_the_other() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let mut agent = Agent::install(&server, tmp.path(), "single-1", &[]);
    agent.run();
    eventually("online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    let log = tmp.path().join("marks");
    // Each job holds its slot a second (its work), between its two marks.
    create_process(
        &server,
        json!({"name": "slow", "steps": [{"name": "s", "plugin": "shell", "step": "run",
            "properties": {"script": format!(
                "echo \"start $TETHER_JOB_ID\" >> {0}; sleep 1; echo \"end $TETHER_JOB_ID\" >> {0}",
                log.display())}}]}),
    );
    let run_two = || {
        let _ = std::fs::remove_file(&log);
        let ids: Vec<String> = (0..2)
            .map(|_| {
                deploy(
                    &server,
                    json!({"process": "slow", "targets": {"agents": ["single-1"]}}),
                )
            })
            .collect();
        for id in &ids {
            let d = final_deployment(&server, id, WAIT);
            assert_eq!(d["status"], "succeeded", "{d}");
        }
        let m = marks(&log);
        assert_eq!(m.len(), 4, "{m:?}");
        m
    };
    // The server's default (4): both run at once, their marks interleave.
    let both = run_two();
    assert!(both[1].starts_with("start"), "ran together: {both:?}");
    // Its own limit of 1: one after the other.
    let cli = tether_tests::tether_cli::Tether::new(&tmp.path().join("cli"));
    cli.login(&server);
    let out = cli.run(&["agents", "concurrency", "single-1", "1"]);
    assert!(out.status.success(), "{out:?}");
    let shown = tether_tests::stdout(&cli.run(&["agents", "show", "single-1"]));
    assert!(
        shown.contains("jobs at once") && shown.contains('1'),
        "{shown}"
    );
    let one = run_two();
    assert!(
        one[0].starts_with("start") && one[1].starts_with("end") && one[2].starts_with("start"),
        "one at a time: {one:?}"
    );
    assert_eq!(
        one[0].replace("start", ""),
        one[1].replace("end", ""),
        "{one:?}"
    );
    // Out of range: refused, nothing changes; 0 goes back to the default.
    let r = server.request(
        "PATCH",
        "/api/v1/agents/single-1",
        Some(&json!({"max_running_jobs": 100_000})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let r = server.request(
        "PATCH",
        "/api/v1/agents/single-1",
        Some(&json!({"max_running_jobs": 0})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["max_running_jobs"].is_null(), "{}", r.body);
}

#[test]
fn a_retry_runs_the_same_steps_again_only_where_jobs_did_not_succeed() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let mut fine = Agent::install(&server, tmp.path(), "retry-fine", &[]);
    let mut flaky = Agent::install(&server, tmp.path(), "retry-flaky", &[]);
    for a in [&mut fine, &mut flaky] {
        a.run();
    }
    for a in [&fine, &flaky] {
        eventually("online", WAIT, || {
            (server.agent_status(&a.id) == "online").then_some(())
        });
    }
    let (runs, go, fixed) = (
        tmp.path().join("runs"),
        tmp.path().join("go"),
        tmp.path().join("fixed"),
    );
    // Every job notes its id; the flaky agent's waits for `go`, then fails until `fixed` exists.
    create_process(
        &server,
        json!({"name": "flaky", "steps": [{"name": "s", "plugin": "shell", "step": "run",
            "properties": {"script": format!(
                "echo \"$TETHER_JOB_ID\" >> {runs}\ncase \"$TETHER_JOB_ID\" in *-{flaky})\n  i=0; while [ ! -f {go} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n  test -f {fixed};;\nesac",
                runs = runs.display(), go = go.display(), fixed = fixed.display(), flaky = flaky.id)}}]}),
    );
    let first = deploy(
        &server,
        json!({"process": "flaky", "targets": {"agents": ["retry-fine", "retry-flaky"]}}),
    );
    let job_of = |d: &Value, agent: &str| -> Value {
        d["jobs"]
            .as_array()
            .and_then(|jobs| jobs.iter().find(|j| j["agent"] == agent).cloned())
            .unwrap_or_else(|| panic!("no job of {agent}: {d}"))
    };
    let count = || {
        server
            .request("GET", "/api/v1/deployments", None)
            .json()
            .as_array()
            .map_or(0, Vec::len)
    };
    eventually("the flaky job running, the other done", WAIT, || {
        let d = deployment(&server, &first);
        (job_of(&d, "retry-fine")["status"] == "succeeded"
            && job_of(&d, "retry-flaky")["status"] == "running")
            .then_some(())
    });
    // Refused while a job runs; nothing is created.
    let r = server.request("POST", &format!("/api/v1/deployments/{first}/retry"), None);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("still running"), "{}", r.body);
    assert_eq!(count(), 1);
    std::fs::write(&go, "").unwrap();
    let d = final_deployment(&server, &first, WAIT);
    assert_eq!(d["status"], "failed", "{d}");

    // The process changes meanwhile; the retry still runs the steps as they ran.
    create_process(
        &server,
        json!({"name": "flaky", "steps": [{"name": "s", "plugin": "shell", "step": "run",
            "properties": {"script": "exit 7"}}]}),
    );
    std::fs::write(&fixed, "").unwrap();
    let r = server.request("POST", &format!("/api/v1/deployments/{first}/retry"), None);
    assert_eq!(r.status, 201, "{}", r.body);
    let answer = r.json();
    assert_eq!(
        (answer["jobs"].as_u64(), &answer["retry_of"]),
        (Some(1), &json!(first))
    );
    let second = answer["id"].as_str().unwrap().to_owned();
    let d = final_deployment(&server, &second, WAIT);
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(
        (&d["retry_of"], &d["process_version"]),
        (&json!(first), &json!(1))
    );
    assert_eq!(d["jobs"].as_array().map(Vec::len), Some(1), "{d}");
    assert_eq!(job_of(&d, "retry-flaky")["status"], "succeeded");
    // The agent whose job succeeded ran once; the other twice, once per deployment.
    let mut ran = marks(&runs);
    ran.sort();
    let mut expected = vec![
        format!("{first}-{}", fine.id),
        format!("{first}-{}", flaky.id),
        format!("{second}-{}", flaky.id),
    ];
    expected.sort();
    assert_eq!(ran, expected);

    // Nothing to retry, or no such deployment: refused, nothing created.
    let r = server.request("POST", &format!("/api/v1/deployments/{second}/retry"), None);
    assert_eq!(r.status, 409, "{}", r.body);
    let r = server.request("POST", "/api/v1/deployments/d-0000000000000000/retry", None);
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(count(), 2);

    // The CLI: version 2 fails everywhere, and so does its retry (its own steps, both agents).
    let third = deploy(
        &server,
        json!({"process": "flaky", "targets": {"agents": ["retry-fine", "retry-flaky"]}}),
    );
    assert_eq!(final_deployment(&server, &third, WAIT)["status"], "failed");
    let cli = tether_tests::tether_cli::Tether::new(&tmp.path().join("cli"));
    cli.login(&server);
    let out = cli.run(&["deployments", "retry", &third, "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let shown = tether_tests::stdout(&out);
    assert!(
        shown.contains("2 job(s)") && shown.contains("failed"),
        "{shown}"
    );

    // The web application: a failed deployment's page offers the retry, a succeeded one's
    // does not; the form starts one and shows it.
    let r = server.request(
        "POST",
        "/api/v1/users",
        Some(&json!({"name": "ops", "password": "retry-password", "role": "deployer"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let cookie = server.web_login("ops", "retry-password");
    let page = server
        .web_get(&cookie, &format!("/deployments/{second}"))
        .body;
    assert!(!page.contains("id=\"retry\""), "{page}");
    assert!(page.contains("id=\"retry-of\""), "{page}");
    let page = server
        .web_get(&cookie, &format!("/deployments/{third}"))
        .body;
    assert!(page.contains("id=\"retry\""), "{page}");
    let before = count();
    let r = server.web_post(
        &cookie,
        &tether_tests::csrf_of(&page),
        &format!("/deployments/{third}/retry"),
        "",
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let location = r.header("location").unwrap_or_default().to_owned();
    assert!(location.ends_with("?done=retried"), "{location}");
    assert_eq!(count(), before + 1);
    let page = server.web_get(&cookie, &location).body;
    assert!(
        page.contains("Retry started") && page.contains(&third),
        "{page}"
    );
}
