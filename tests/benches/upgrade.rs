//! Agent upgrades: time from the rollout request until every target agent runs the new version
//! (its upgrade state `done`, reported by the new worker after it beat healthy), for 1 and 100
//! real agents (release binaries; the package is the release `tether-agent` itself, uploaded as
//! a newer version). The baseline, measured in the same run, is the time for the same agents to
//! run a one-step deployment: the command round trip without download, swap and health wait.
//!
//! `cargo bench -p tether-tests --bench upgrade` (`make bench`). `TETHER_BENCH_UPGRADE`
//! (default `1,100`) sets the fleet sizes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench glue may unwrap

use std::time::{Duration, Instant};

use serde_json::json;
use tether_tests::fleet::{eventually, Agent, Server, TestDir};

const TIMEOUT: Duration = Duration::from_secs(600);
/// How long a new worker must beat before it counts as healthy (the default is 10 s).
const HEALTHY_AFTER_MS: &str = "1000";

/// Seconds until every agent of the fleet is `done` at `version`.
fn rollout(server: &Server, version: &str, n: usize) -> f64 {
    let started = Instant::now();
    let r = server.request(
        "POST",
        &format!("/api/v1/upgrades/{version}/rollout"),
        Some(&json!({"targets": {"tags": ["bench"]}})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    eventually("every agent upgraded", TIMEOUT, || {
        let list = server.request("GET", "/api/v1/agents", None).json();
        let done = list
            .as_array()?
            .iter()
            .filter(|a| a["upgrade"]["state"] == "done" && a["version"] == version)
            .count();
        let failed: Vec<_> = list
            .as_array()?
            .iter()
            .filter(|a| {
                matches!(
                    a["upgrade"]["state"].as_str(),
                    Some("rolled_back" | "refused")
                )
            })
            .collect();
        assert!(failed.is_empty(), "upgrade failed: {failed:?}");
        (done == n).then_some(())
    });
    started.elapsed().as_secs_f64()
}

/// Seconds for a one-step deployment on every agent (the baseline).
fn deploy(server: &Server) -> f64 {
    let started = Instant::now();
    let id = server.deploy("noop", json!({"tags": ["bench"]}), json!({}));
    let d = server.wait_deployment(&id, TIMEOUT);
    assert_eq!(d["status"], "succeeded", "{d}");
    started.elapsed().as_secs_f64()
}

fn main() {
    let sizes: Vec<usize> = std::env::var("TETHER_BENCH_UPGRADE")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 100]);
    let package = std::fs::read(tether_tests::bin("tether-agent")).unwrap();
    println!(
        "upgrade bench: rollout request until every agent runs the new version (package {} MiB, healthy after {HEALTHY_AFTER_MS} ms)",
        package.len() / (1024 * 1024)
    );
    println!(
        "{:>7} {:>18} {:>22} {:>8}",
        "agents", "upgrade s", "baseline deploy s", "ratio"
    );
    for n in sizes {
        let dir = TestDir::new();
        let server = Server::start(dir.path());
        server.put_process(&json!({"name": "noop", "steps": [
            {"name": "noop", "plugin": "shell", "step": "run", "properties": {"script": "true"}}]}));
        let mut agents: Vec<Agent> = (0..n)
            .map(|i| {
                Agent::install_with(
                    &server,
                    dir.path(),
                    &format!("up-{i}"),
                    &["bench"],
                    &[("TETHER_AGENT__UPGRADE_HEALTHY_AFTER_MS", HEALTHY_AFTER_MS)],
                )
            })
            .collect();
        for a in &mut agents {
            a.run();
        }
        for a in &agents {
            eventually("agents online", TIMEOUT, || {
                (server.agent_status(&a.id) == "online").then_some(())
            });
        }
        deploy(&server);
        let baseline = deploy(&server);
        server.upload_upgrade("99.0.0", &package);
        let took = rollout(&server, "99.0.0", n);
        println!(
            "{n:>7} {took:>18.2} {baseline:>22.2} {:>7.1}x",
            took / baseline.max(0.001)
        );
        // The upgraded fleet still works.
        deploy(&server);
    }
}
