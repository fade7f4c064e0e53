//! The fault matrix: numbered probe messages flow both ways between a real server and a real
//! agent while the server, the agent's worker and the agent's monitor are SIGKILLed at random
//! moments (bounded by time). Every probe acknowledged to the operator (the REST call answered
//! once the commands were durable) arrives exactly once and in order, and the worker killed
//! alone is restarted by the monitor with no help.
//!
//! `TETHER_FAULT_SECONDS` bounds the fault loop (default 45 s); `TETHER_FAULT_SEED` replays one
//! sequence of faults.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tether_tests::fleet::{alive, eventually, Agent, Server, TestDir};

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn every_acknowledged_probe_arrives_once_in_order_across_sigkills() {
    let seed: u64 = std::env::var("TETHER_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let budget = Duration::from_secs(
        std::env::var("TETHER_FAULT_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(45),
    );
    eprintln!("fault matrix seed {seed} (TETHER_FAULT_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);

    let tmp = TestDir::new();
    let mut server = Server::start(tmp.path());
    // Killing the worker over and over is the point here, not a reason for the monitor to give up.
    let budget_env = [("TETHER_AGENT__WORKER_RESTART_BUDGET", "1000")];
    let mut agent = Agent::install_with(&server, tmp.path(), "faulty-1", &[], &budget_env);
    agent.run();
    eventually("agent online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });

    let (mut commands, mut events) = (0u64, 0u64);
    let path = format!("/api/v1/agents/{}/probes", agent.id);
    let queue = |server: &Server, c: u64, e: u64, commands: &mut u64, events: &mut u64| {
        let r = server.request("POST", &path, Some(&json!({"commands": c, "events": e})));
        assert_eq!(r.status, 202, "{}", r.body);
        *commands += c;
        *events += e;
    };
    queue(&server, 1000, 1000, &mut commands, &mut events);

    let started = Instant::now();
    let mut kills = [0u32; 3];
    while started.elapsed() < budget {
        // A random moment of the stream.
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..400)));
        match rng.gen_range(0..3) {
            0 => {
                server.kill();
                server.run();
                kills[0] += 1;
            }
            1 => {
                let Some(old) = agent.kill_worker() else {
                    continue;
                };
                // The monitor alone brings a new worker.
                eventually("a new worker", WAIT, || {
                    agent.worker_pid().filter(|p| *p != old && !alive(old))
                });
                kills[1] += 1;
            }
            _ => {
                agent.kill_monitor();
                agent.run();
                kills[2] += 1;
            }
        }
        // More traffic behind every fault, so the next one lands mid-stream.
        queue(
            &server,
            rng.gen_range(50..300),
            rng.gen_range(50..300),
            &mut commands,
            &mut events,
        );
    }
    eprintln!("fault matrix: {} server, {} worker, {} monitor SIGKILLs in {:?}; {commands} commands and {events} events", kills[0], kills[1], kills[2], started.elapsed());
    assert!(
        kills.iter().all(|k| *k > 0) || budget < Duration::from_secs(10),
        "every kind of fault happened: {kills:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    let p = loop {
        let p = server.probes(&agent.id);
        if p["echoes"]["received"].as_u64() >= Some(commands)
            && p["events"]["received"].as_u64() >= Some(events)
        {
            break p;
        }
        if Instant::now() > deadline {
            let health = server.request("GET", "/admin/health", None).body;
            panic!("not every probe arrived after the faults: {p}\nexpected {commands} commands and {events} events\nhealth: {health}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(p["commands_sent"], commands, "{p}");
    for (series, n) in [("echoes", commands), ("events", events)] {
        assert_eq!(p[series]["received"], n, "{series}: {p}");
        assert_eq!(p[series]["duplicates"], 0, "{series} delivered twice: {p}");
        assert_eq!(p[series]["gaps"], 0, "{series} skipped: {p}");
        assert_eq!(p[series]["next"], n + 1, "{series}: {p}");
    }
    assert!(commands >= 2000 && events >= 2000);
}
