//! Faults on the relay path, end to end: agents behind a relay while numbered probes flow both
//! ways and deployments run, and the relay is SIGKILLed and restarted, its upstream link is cut
//! (TCP resets) or blackholed (silence) by nftables, or it dies for good and the agents fail
//! over to a second relay. The relay stores nothing; reliability is end to end between the
//! agents' and the server's journals, so after every fault:
//! - every probe arrives exactly once, in order, with no gap (the server's probe counters);
//! - every deployment succeeds on every agent, each step on its first attempt;
//! - each (non-rerunnable) step ran exactly once: it appends one line to a marker file in its
//!   job's own work directory (`$HOME` of a step), so a second run would show as a second line;
//! - each step's log arrived exactly once (no chunk delivered twice).
//!
//! `TETHER_FAULT_SEED` replays one sequence of faults; `TETHER_FAULT_SECONDS` bounds the SIGKILL
//! loop (default 20 s).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::netns::{relay_topology, require_root, NsAgent, NsRelay, NsServer};
use tether_tests::relays::{relay_entry, Relay};
use tether_tests::HttpReply;

const WAIT: Duration = Duration::from_secs(60);
/// Steps per marker process.
const STEPS: usize = 4;

/// The admin REST API of a server on loopback or inside a topology.
trait Api {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> HttpReply;
}

impl Api for Server {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> HttpReply {
        self.request(method, path, body)
    }
}

impl Api for NsServer {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> HttpReply {
        self.request(method, path, body)
    }
}

/// The seeded rng of a fault test (the seed printed, `TETHER_FAULT_SEED` replays it).
fn fault_rng(test: &str) -> StdRng {
    let seed: u64 = std::env::var("TETHER_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{test}: seed {seed} (TETHER_FAULT_SEED={seed} replays it)");
    StdRng::seed_from_u64(seed)
}

/// One agent under test: its id, name and data directory (jobs' work directories are in
/// `DIR/work/<job id>`).
struct Target {
    id: String,
    name: String,
    dir: PathBuf,
}

impl Target {
    fn of(agent: &Agent) -> Target {
        Target {
            id: agent.id.clone(),
            name: agent.name.clone(),
            dir: agent.dir.clone(),
        }
    }

    fn of_ns(agent: &NsAgent) -> Target {
        Target {
            id: agent.id.clone(),
            name: agent.name.clone(),
            dir: agent.dir.clone(),
        }
    }
}

/// Probes queued so far for one agent.
#[derive(Default, Clone, Copy)]
struct Queued {
    commands: u64,
    events: u64,
}

fn queue_probes(api: &impl Api, agent: &Target, queued: &mut Queued, commands: u64, events: u64) {
    let r = api.call(
        "POST",
        &format!("/api/v1/agents/{}/probes", agent.id),
        Some(&json!({"commands": commands, "events": events})),
    );
    assert_eq!(r.status, 202, "queue probes for {}: {}", agent.name, r.body);
    queued.commands += commands;
    queued.events += events;
}

fn probes(api: &impl Api, agent: &Target) -> Value {
    let r = api.call("GET", &format!("/api/v1/agents/{}/probes", agent.id), None);
    assert_eq!(r.status, 200, "probes of {}: {}", agent.name, r.body);
    r.json()
}

/// Waits until at least every queued probe arrived both ways, then checks that exactly those
/// arrived: none twice, none skipped, in order.
fn check_probes(api: &impl Api, agent: &Target, queued: Queued, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let p = loop {
        let reply = probes(api, agent);
        let p = reply["probes"].clone();
        if p["echoes"]["received"].as_u64() >= Some(queued.commands)
            && p["events"]["received"].as_u64() >= Some(queued.events)
        {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "{}: not every probe arrived within {timeout:?}: expected {} commands and {} events, have {reply}",
            agent.name,
            queued.commands,
            queued.events
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(p["commands_sent"], queued.commands, "{}: {p}", agent.name);
    for (series, n) in [("echoes", queued.commands), ("events", queued.events)] {
        assert_eq!(p[series]["received"], n, "{} {series}: {p}", agent.name);
        assert_eq!(
            p[series]["duplicates"], 0,
            "{} {series} delivered twice: {p}",
            agent.name
        );
        assert_eq!(p[series]["gaps"], 0, "{} {series} skipped: {p}", agent.name);
        assert_eq!(p[series]["next"], n + 1, "{} {series}: {p}", agent.name);
    }
}

/// The agent list entry of `agent`.
fn agent_entry(api: &impl Api, agent: &Target) -> Option<Value> {
    let r = api.call("GET", "/api/v1/agents", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
        .as_array()?
        .iter()
        .find(|a| a["id"] == agent.id.as_str())
        .cloned()
}

fn online_via(api: &impl Api, agent: &Target, path: &[&str], timeout: Duration) -> Value {
    eventually(
        &format!("{} online through {path:?}", agent.name),
        timeout,
        || agent_entry(api, agent).filter(|a| a["status"] == "online" && a["path"] == json!(path)),
    )
}

/// Creates process `name`: [`STEPS`] shell steps of the default (non-rerunnable) kind, each
/// printing `sN ran`, appending one line to `$HOME/marker-sN` (the job's own work directory)
/// and then sleeping `pauses[N-1]` seconds, so that faults land mid-step.
fn put_marker_process(api: &impl Api, name: &str, pauses: [&str; STEPS]) {
    let steps: Vec<Value> = (1..=STEPS)
        .map(|i| {
            json!({"name": format!("s{i}"), "plugin": "shell", "step": "run", "properties": {
            "script": format!(
                "echo s{i} ran; echo ran >> \"$HOME/marker-s{i}\"; sleep {}",
                pauses[i - 1]
            )}})
        })
        .collect();
    let r = api.call(
        "POST",
        "/api/v1/processes",
        Some(&json!({"name": name, "steps": steps})),
    );
    assert_eq!(r.status, 201, "process: {}", r.body);
    // A step that ran twice must be a bug, not a declared retry.
    let r = api.call("GET", &format!("/api/v1/processes/{name}"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let p = r.json();
    for s in p["steps"].as_array().unwrap() {
        assert_eq!(s["on_interrupt"], "fail", "{p}");
    }
}

/// Deploys `process` to `agents` (by name); answers the deployment id.
fn deploy(api: &impl Api, process: &str, agents: &[Target]) -> String {
    let names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    let body = json!({"process": process, "targets": {"agents": names}, "properties": {}});
    let r = api.call("POST", "/api/v1/deployments", Some(&body));
    assert_eq!(r.status, 201, "deploy: {}", r.body);
    r.json()["id"].as_str().unwrap().to_owned()
}

fn deployment(api: &impl Api, id: &str) -> Value {
    let r = api.call("GET", &format!("/api/v1/deployments/{id}"), None);
    assert_eq!(r.status, 200, "deployment {id}: {}", r.body);
    r.json()
}

fn wait_final(api: &impl Api, id: &str, timeout: Duration) -> Value {
    eventually(&format!("deployment {id} final"), timeout, || {
        let d = deployment(api, id);
        matches!(
            d["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        )
        .then_some(d)
    })
}

/// Deployment `id` succeeded on exactly `agents`, every step on its first attempt, each step
/// ran exactly once (one line in its marker file) and its log arrived exactly once (unless the
/// agent dropped it for a full backlog, which the step's log or its end then says).
fn check_deployment(api: &impl Api, id: &str, agents: &[&Target], timeout: Duration) {
    let d = wait_final(api, id, timeout);
    assert_eq!(d["status"], "succeeded", "{d}");
    let jobs = d["jobs"].as_array().unwrap();
    let mut names: Vec<&str> = jobs.iter().map(|j| j["agent"].as_str().unwrap()).collect();
    names.sort_unstable();
    let mut expected: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    expected.sort_unstable();
    assert_eq!(names, expected, "one job per agent: {d}");
    for job in jobs {
        let agent = agents
            .iter()
            .find(|a| job["agent"] == a.name.as_str())
            .unwrap();
        assert_eq!(job["status"], "succeeded", "{d}");
        let steps = job["steps"].as_array().unwrap();
        assert_eq!(steps.len(), STEPS, "{d}");
        let work = agent.dir.join("work").join(job["job_id"].as_str().unwrap());
        for (i, s) in steps.iter().enumerate() {
            let n = i + 1;
            assert_eq!(s["status"], "succeeded", "{d}");
            assert_eq!(s["exit_code"], 0, "{d}");
            assert_eq!(s["attempt"], 1, "step s{n} started more than once: {d}");
            let marker = work.join(format!("marker-s{n}"));
            let text = std::fs::read_to_string(&marker)
                .unwrap_or_else(|e| panic!("{}: {e}", marker.display()));
            assert_eq!(
                text.lines().count(),
                1,
                "step s{n} of {id} ran {} times on {}: {}",
                text.lines().count(),
                agent.name,
                marker.display()
            );
            let r = api.call(
                "GET",
                &format!(
                    "/api/v1/deployments/{id}/jobs/{}/steps/s{n}/log",
                    agent.name
                ),
                None,
            );
            assert_eq!(r.status, 200, "log: {}", r.body);
            // Once; or never, if the agent dropped it for a full event backlog (by design: a
            // step's output never takes the room its end needs), and then the step says so.
            let logged = r.body.matches(&format!("s{n} ran")).count();
            let dropped = || {
                s["message"].as_str().is_some_and(|m| {
                    m.contains("output was lost") || r.body.contains("[output lost")
                })
            };
            assert!(
                logged == 1 || (logged == 0 && dropped()),
                "log of s{n} of {id} on {}: {:?}",
                agent.name,
                r.body
            );
        }
    }
}

/// Every job directory on `agent` belongs to one of `deployments` (one each): no job ran that
/// the server did not ask for, none twice.
fn check_job_dirs(api: &impl Api, agent: &Target, deployments: &[String]) {
    let mut expected: Vec<String> = deployments
        .iter()
        .map(|id| {
            let d = deployment(api, id);
            let job = d["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["agent"] == agent.name.as_str())
                .unwrap_or_else(|| panic!("no job for {} in {d}", agent.name))
                .clone();
            job["job_id"].as_str().unwrap().to_owned()
        })
        .collect();
    expected.sort();
    let mut found: Vec<String> = std::fs::read_dir(agent.dir.join("work"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    assert_eq!(found, expected, "job work directories on {}", agent.name);
}

/// The log of a process from byte `from` on (empty if absent).
fn log_since(path: &Path, from: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.get(from..).unwrap_or_default().to_owned()
}

#[test]
fn sigkill_relay_mid_stream_and_deployment_loses_and_doubles_nothing() {
    let mut rng = fault_rng("sigkill_relay_mid_stream_and_deployment_loses_and_doubles_nothing");
    let budget = Duration::from_secs(
        std::env::var("TETHER_FAULT_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let mut relay = Relay::start(&server, &[server.upstream()], tmp.path(), "relay-a");
    let mut agents: Vec<Agent> = ["edge-1", "edge-2"]
        .iter()
        .map(|name| {
            Agent::install_via(
                &server,
                &[relay.upstream()],
                tmp.path(),
                name,
                &["edge"],
                &[],
            )
        })
        .collect();
    for a in &mut agents {
        a.run();
    }
    let targets: Vec<Target> = agents.iter().map(Target::of).collect();
    for t in &targets {
        online_via(&server, t, &["relay-a"], WAIT);
    }

    put_marker_process(&server, "marks", ["0.3"; STEPS]);
    let mut queued = vec![Queued::default(); targets.len()];
    let mut ids = Vec::new();

    let started = Instant::now();
    let (mut kills, mut mid_stream, mut mid_step) = (0u32, 0u32, 0u32);
    while started.elapsed() < budget {
        // Fresh traffic (and now and then another deployment) before every kill, so that it
        // lands mid-stream; a thousand probes take about a second to drain here.
        for (t, q) in targets.iter().zip(&mut queued) {
            queue_probes(
                &server,
                t,
                q,
                rng.gen_range(200..1500),
                rng.gen_range(200..1500),
            );
        }
        if ids.is_empty() || rng.gen_bool(0.5) {
            ids.push(deploy(&server, "marks", &targets));
        }
        // A random moment of the streams and of the deployments.
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..1000)));
        let p = probes(&server, &targets[0])["probes"].clone();
        if p["echoes"]["received"].as_u64() < Some(queued[0].commands)
            || p["events"]["received"].as_u64() < Some(queued[0].events)
        {
            mid_stream += 1;
        }
        if ids.iter().any(|id| {
            deployment(&server, id)["jobs"]
                .as_array()
                .is_some_and(|jobs| {
                    jobs.iter().any(|j| {
                        j["steps"]
                            .as_array()
                            .is_some_and(|s| s.iter().any(|s| s["status"] == "running"))
                    })
                })
        }) {
            mid_step += 1;
        }
        relay.kill();
        kills += 1;
        // The relay stays away for a random while, then comes back on the same ports.
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..700)));
        relay.run();
    }
    eprintln!(
        "{kills} relay SIGKILLs in {:?} ({mid_stream} with probes in flight, {mid_step} with a step running); {} deployments",
        started.elapsed(),
        ids.len()
    );
    if budget >= Duration::from_secs(10) {
        assert!(kills >= 3, "only {kills} SIGKILLs");
        assert!(mid_stream >= 1, "no SIGKILL landed while probes flowed");
        assert!(mid_step >= 1, "no SIGKILL landed while a step ran");
    }

    for (t, q) in targets.iter().zip(&queued) {
        check_probes(&server, t, *q, WAIT);
    }
    let refs: Vec<&Target> = targets.iter().collect();
    for id in &ids {
        check_deployment(&server, id, &refs, WAIT);
    }
    for t in &targets {
        check_job_dirs(&server, t, &ids);
        online_via(&server, t, &["relay-a"], WAIT);
    }
    let entry = eventually("relay-a online carrying both agents", WAIT, || {
        relay_entry(&server, "relay-a").filter(|r| r["status"] == "online" && r["agents"] == 2)
    });
    eprintln!("relay-a: {entry}; total {:?}", started.elapsed());
}

#[test]
fn cut_upstream_link_with_nftables_and_restore() {
    if !require_root("cut_upstream_link_with_nftables_and_restore") {
        return;
    }
    let mut rng = fault_rng("cut_upstream_link_with_nftables_and_restore");
    let tmp = TestDir::new();
    let topo = relay_topology(false);
    // Beats every second both ways, so that a silent link is noticed in seconds: the server
    // times a relay link out after 4 s of silence, the relay its upstream after
    // 3 intervals + 2 s.
    let server = NsServer::start_with(
        &topo,
        "server",
        tmp.path(),
        &[
            ("TETHER_SERVER__HEARTBEAT_INTERVAL_MS", "1000"),
            ("TETHER_SERVER__HEARTBEAT_TIMEOUT_MS", "4000"),
        ],
    );
    let token = server.enrollment_token("relay");
    let mut relay = NsRelay::install(
        &topo,
        "relay",
        tmp.path(),
        "relay-a",
        &server.upstream(),
        &server.ca_path(),
        &token,
    );
    relay.run(&topo, &[("TETHER_RELAY__HEARTBEAT_INTERVAL_MS", "1000")]);
    let relay_log = tmp.path().join("relay-a.log");
    let server_log = tmp.path().join("server.log");
    let agents: Vec<NsAgent> = ["edge-1", "edge-2"]
        .iter()
        .map(|name| {
            let token = server.enrollment_token("agent");
            let mut a = NsAgent::install(
                &topo,
                "agents",
                tmp.path(),
                name,
                &[relay.downstream()],
                &server.ca_path(),
                &token,
            );
            a.run(&topo, &[]);
            a
        })
        .collect();
    let targets: Vec<Target> = agents.iter().map(Target::of_ns).collect();
    let started = Instant::now();
    for t in &targets {
        online_via(&server, t, &["relay-a"], WAIT);
    }

    put_marker_process(&server, "marks", ["0.5"; STEPS]);
    let mut queued = vec![Queued::default(); targets.len()];
    for (t, q) in targets.iter().zip(&mut queued) {
        queue_probes(&server, t, q, 3000, 3000);
    }
    let mut ids = vec![deploy(&server, "marks", &targets)];

    // Resets: both ends learn at once; the relay closes its agents' sessions and reconnects
    // when the path is back.
    for round in 0..2 {
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..1200)));
        let t0 = Instant::now();
        topo.cut("relay", "server");
        // The fault lasts a random while.
        std::thread::sleep(Duration::from_millis(rng.gen_range(1000..3000)));
        topo.restore("relay", "server");
        for (t, q) in targets.iter().zip(&mut queued) {
            queue_probes(&server, t, q, 300, 300);
        }
        ids.push(deploy(&server, "marks", &targets));
        for t in &targets {
            online_via(&server, t, &["relay-a"], WAIT);
        }
        eprintln!(
            "cut {round}: agents back online {:?} after the cut",
            t0.elapsed()
        );
    }

    // Silence: nothing tells either end; each must notice through its heartbeat timeout.
    std::thread::sleep(Duration::from_millis(rng.gen_range(200..1200)));
    let log_len = |p: &Path| std::fs::read_to_string(p).unwrap_or_default().len();
    let (relay_from, server_from) = (log_len(&relay_log), log_len(&server_log));
    let t0 = Instant::now();
    topo.blackhole("relay", "server");
    let (mut relay_noticed, mut server_noticed) = (None, None);
    eventually(
        "both ends noticing the silent link by their heartbeat timeouts",
        WAIT,
        || {
            if relay_noticed.is_none()
                && log_since(&relay_log, relay_from).contains("upstream-silent")
            {
                relay_noticed = Some(t0.elapsed());
            }
            if server_noticed.is_none()
                && log_since(&server_log, server_from).contains("relay-heartbeat-timeout")
            {
                server_noticed = Some(t0.elapsed());
            }
            (relay_noticed.is_some() && server_noticed.is_some()).then_some(())
        },
    );
    // The relay closed its agents' sessions; the server, the relay link's channels.
    for t in &targets {
        eventually(&format!("{} offline on the server", t.name), WAIT, || {
            agent_entry(&server, t).filter(|a| a["status"] == "offline")
        });
    }
    topo.restore("relay", "server");
    for (t, q) in targets.iter().zip(&mut queued) {
        queue_probes(&server, t, q, 300, 300);
    }
    for t in &targets {
        online_via(&server, t, &["relay-a"], WAIT);
    }
    eprintln!(
        "blackhole: the relay noticed after {:?}, the server after {:?}, agents back {:?} after it began",
        relay_noticed.unwrap_or_default(),
        server_noticed.unwrap_or_default(),
        t0.elapsed()
    );

    for (t, q) in targets.iter().zip(&queued) {
        check_probes(&server, t, *q, WAIT);
    }
    let refs: Vec<&Target> = targets.iter().collect();
    for id in &ids {
        check_deployment(&server, id, &refs, WAIT);
    }
    for t in &targets {
        check_job_dirs(&server, t, &ids);
    }
    eprintln!("total {:?}", started.elapsed());
}

/// Two relays on one server and two agents listing relay-a then relay-b, online through
/// relay-a, with a deployment of the marker process whose slow first step runs on both.
struct TwoRelays {
    tmp: TestDir,
    server: Server,
    relay_a: Relay,
    relay_b: Relay,
    _agents: Vec<Agent>,
    targets: Vec<Target>,
    /// The deployment under way.
    id: String,
}

impl TwoRelays {
    fn start() -> TwoRelays {
        let tmp = TestDir::new();
        let server = Server::start(tmp.path());
        let relay_a = Relay::start(&server, &[server.upstream()], tmp.path(), "relay-a");
        let relay_b = Relay::start(&server, &[server.upstream()], tmp.path(), "relay-b");
        let mut agents: Vec<Agent> = ["edge-1", "edge-2"]
            .iter()
            .map(|name| {
                Agent::install_via(
                    &server,
                    &[relay_a.upstream(), relay_b.upstream()],
                    tmp.path(),
                    name,
                    &["edge"],
                    &[],
                )
            })
            .collect();
        for a in &mut agents {
            a.run();
        }
        let targets: Vec<Target> = agents.iter().map(Target::of).collect();
        for t in &targets {
            online_via(&server, t, &["relay-a"], WAIT);
        }
        // The first step is slow, so that relay-a goes while it runs on both agents.
        put_marker_process(&server, "marks", ["3", "0.2", "0.2", "0.2"]);
        let id = deploy(&server, "marks", &targets);
        eventually("the first step running on both agents", WAIT, || {
            let d = deployment(&server, &id);
            let jobs = d["jobs"].as_array()?;
            (jobs.len() == 2 && jobs.iter().all(|j| j["steps"][0]["status"] == "running"))
                .then_some(())
        });
        TwoRelays {
            tmp,
            server,
            relay_a,
            relay_b,
            _agents: agents,
            targets,
            id,
        }
    }
}

#[test]
fn agents_fail_over_when_a_relay_dies_for_good() {
    let TwoRelays {
        tmp: _tmp,
        server,
        mut relay_a,
        relay_b,
        _agents,
        targets,
        id,
    } = TwoRelays::start();
    let mut queued = vec![Queued::default(); targets.len()];
    // And relay-a dies with thousands of probes in flight both ways (they drain at a few
    // thousand a second here).
    for (t, q) in targets.iter().zip(&mut queued) {
        queue_probes(&server, t, q, 5000, 5000);
    }
    let p = probes(&server, &targets[1])["probes"].clone();
    assert!(
        p["echoes"]["received"].as_u64() < Some(queued[1].commands),
        "the probes should still be in flight: {p}"
    );

    let t0 = Instant::now();
    relay_a.kill();
    for t in &targets {
        online_via(&server, t, &["relay-b"], WAIT);
    }
    eprintln!(
        "agents online through relay-b {:?} after relay-a died",
        t0.elapsed()
    );
    // New work goes through relay-b.
    for (t, q) in targets.iter().zip(&mut queued) {
        queue_probes(&server, t, q, 500, 500);
    }
    for (t, q) in targets.iter().zip(&queued) {
        check_probes(&server, t, *q, WAIT);
    }
    let refs: Vec<&Target> = targets.iter().collect();
    check_deployment(&server, &id, &refs, WAIT);
    for t in &targets {
        check_job_dirs(&server, t, std::slice::from_ref(&id));
        // Still there: nothing sent them back to the dead relay.
        online_via(&server, t, &["relay-b"], WAIT);
    }
    let a = eventually("relay-a offline", WAIT, || {
        relay_entry(&server, "relay-a").filter(|r| r["status"] == "offline")
    });
    let b = eventually("relay-b carrying both agents", WAIT, || {
        relay_entry(&server, "relay-b").filter(|r| r["status"] == "online" && r["agents"] == 2)
    });
    assert_eq!(relay_b.health()["upstream"]["agents"], 2);
    eprintln!("relay-a: {a}\nrelay-b: {b}");

    // relay-a comes back: it links up again, and the agents (which fail back to their first
    // upstream only after a session drops) keep every message exactly once whichever path
    // they take.
    relay_a.run();
    eventually("relay-a online again", WAIT, || {
        relay_entry(&server, "relay-a").filter(|r| r["status"] == "online")
    });
    for (t, q) in targets.iter().zip(&mut queued) {
        queue_probes(&server, t, q, 500, 500);
    }
    for (t, q) in targets.iter().zip(&queued) {
        check_probes(&server, t, *q, WAIT);
        let entry = agent_entry(&server, t).unwrap();
        assert_eq!(entry["status"], "online", "{entry}");
    }
    eprintln!("total {:?}", t0.elapsed());
}

#[test]
fn deleting_a_relay_revokes_it_at_once_and_its_agents_fail_over() {
    let TwoRelays {
        tmp,
        server,
        relay_a,
        relay_b,
        _agents,
        targets,
        id,
    } = TwoRelays::start();
    let relay_a_id = relay_entry(&server, "relay-a").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut queued = vec![Queued::default(); targets.len()];
    for (t, q) in targets.iter().zip(&mut queued) {
        queue_probes(&server, t, q, 3000, 3000);
    }

    // relay-a is deleted while it runs: the server closes its link itself.
    let t0 = Instant::now();
    let r = server.request("DELETE", "/api/v1/relays/relay-a", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["deleted"], true);
    assert!(
        r.json()["closed"].as_u64() >= Some(3),
        "its link and both agents' channels: {}",
        r.body
    );
    eventually("relay-a's link closed on the server", WAIT, || {
        let health = server.request("GET", "/admin/health", None).json();
        health["relay_links"]
            .get(&relay_a_id)
            .is_none()
            .then_some(())
    });
    let closed_after = t0.elapsed();
    eprintln!("relay-a's link closed {closed_after:?} after the delete");
    assert!(
        closed_after < Duration::from_secs(3),
        "closing is immediate, not a timeout: {closed_after:?}"
    );
    assert!(
        relay_entry(&server, "relay-a").is_none(),
        "no longer listed"
    );

    // Its agents move to relay-b and finish everything exactly once.
    for t in &targets {
        online_via(&server, t, &["relay-b"], WAIT);
    }
    eprintln!(
        "agents online through relay-b {:?} after the delete",
        t0.elapsed()
    );
    for (t, q) in targets.iter().zip(&mut queued) {
        queue_probes(&server, t, q, 300, 300);
    }
    for (t, q) in targets.iter().zip(&queued) {
        check_probes(&server, t, *q, WAIT);
    }
    let refs: Vec<&Target> = targets.iter().collect();
    check_deployment(&server, &id, &refs, WAIT);
    for t in &targets {
        check_job_dirs(&server, t, std::slice::from_ref(&id));
    }

    // relay-a, still running, keeps trying and is refused every time; it never carries an
    // agent again.
    let relay_log = tmp.path().join("relay-a.log");
    eventually("relay-a refused when it reconnects", WAIT, || {
        let log = std::fs::read_to_string(&relay_log).unwrap_or_default();
        (log.contains("relay revoked") && log.contains("upstream-refused")).then_some(())
    });
    let health = relay_a.health();
    assert_ne!(health["upstream"]["state"], "connected", "{health}");
    for t in &targets {
        let entry = agent_entry(&server, t).unwrap();
        assert_eq!(entry["path"], json!(["relay-b"]), "{entry}");
    }
    assert_eq!(relay_b.health()["upstream"]["agents"], 2);
}
