//! `/metrics` as a dashboard reads it: the fleet, the work, the process and the release, and
//! every metric the shipped Grafana dashboard (`config/grafana/tether-dashboard.json`) queries
//! is one the server exports; the agents page shows the fleet at a glance.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};

const WAIT: Duration = Duration::from_secs(60);

/// The value of the sample `series` (name and labels as written) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn metrics_cover_the_fleet_the_work_and_the_process_and_the_dashboard_queries_only_them() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let mut agent = Agent::install(&server, tmp.path(), "m-1", &["m"]);
    let never = Agent::install(&server, tmp.path(), "m-2", &["m"]);
    agent.run();
    eventually("online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    server.shell_process("noop", "true");
    let id = server.start_deployment(&json!({"process": "noop", "targets": {"agents": ["m-1"]}}));
    eventually("the deployment done", WAIT, || {
        let d = server
            .request("GET", &format!("/api/v1/deployments/{id}?jobs=false"), None)
            .json();
        (d["status"] == "succeeded").then_some(())
    });
    let text = server.request("GET", "/metrics", None).body;
    assert_eq!(
        sample(&text, "tether_agents{status=\"online\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "tether_agents{status=\"offline\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "tether_jobs{status=\"succeeded\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "tether_deployments{status=\"succeeded\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                "tether_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0)
    );
    assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(sample(&text, "process_open_fds").unwrap() > 0.0);
    assert!(sample(&text, "process_start_time_seconds").unwrap() > 1.6e9);
    assert!(sample(&text, "tether_journal_commit_seconds_count").unwrap() > 0.0);
    // The agent's own figures, carried in its heartbeats.
    let reported =
        |text: &str, name: &str| sample(text, &format!("{name}{{agent=\"{}\"}}", agent.id));
    let text = eventually("the agent's figures in /metrics", WAIT, || {
        let text = server.request("GET", "/metrics", None).body;
        reported(&text, "tether_agent_resident_memory_bytes").map(|_| text)
    });
    assert!(
        reported(&text, "tether_agent_resident_memory_bytes").unwrap() > 1e6,
        "{text}"
    );
    assert!(reported(&text, "tether_agent_open_fds").unwrap() > 0.0);
    assert!(reported(&text, "tether_agent_cpu_milliseconds_total").unwrap() > 0.0);
    assert!(reported(&text, "tether_agent_load1").is_some());
    assert_eq!(reported(&text, "tether_agent_steps_running"), Some(0.0));
    assert!(reported(&text, "tether_agent_journal_failures_total") == Some(0.0));
    assert!(
        !text.contains(&format!("{{agent=\"{}\"}}", never.id)),
        "an agent that never connected reports nothing"
    );
    // What ended, by result, and how long it took: one job of one step.
    for (series, value) in [
        ("tether_jobs_ended_total{result=\"succeeded\"}", 1.0),
        ("tether_jobs_ended_total{result=\"failed\"}", 0.0),
        ("tether_deployments_ended_total{result=\"succeeded\"}", 1.0),
        ("tether_dispatch_first_event_seconds_count", 1.0),
        ("tether_step_duration_seconds_count", 1.0),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series}\n{text}");
    }
    assert!(
        sample(
            &text,
            "tether_dispatch_first_event_seconds_bucket{le=\"+Inf\"}"
        ) == Some(1.0)
            && sample(&text, "tether_dispatch_first_event_seconds_sum").unwrap() > 0.0
    );
    assert!(
        sample(
            &text,
            "tether_handshakes_total{peer=\"agent\",outcome=\"verified\"}"
        )
        .unwrap()
            >= 1.0
    );
    // Every line is a comment or a sample: a scraper reads it all.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let value = l.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample: {l:?}");
    }

    // The dashboard queries nothing the server does not export.
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            tether_tests::workspace_root().join("config/grafana/tether-dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut queried = BTreeSet::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("tether_") || word.starts_with("process_") {
                    queried.insert(word.to_owned());
                }
            }
        }
    }
    assert!(queried.len() >= 15, "{queried:?}");
    // A histogram's series are its family's name with a suffix.
    let family = |q: &str| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| q.strip_suffix(suffix).filter(|f| exported.contains(f)))
            .unwrap_or(q)
            .to_owned()
    };
    let missing: Vec<&String> = queried
        .iter()
        .filter(|q| !exported.contains(family(q).as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, not exported"
    );

    // The agents page: the fleet at a glance.
    let r = server.request(
        "POST",
        "/api/v1/users",
        Some(&json!({"name": "viewer", "password": "metrics-password-1", "role": "viewer"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let cookie = server.web_login("viewer", "metrics-password-1");
    let page = server.web_get(&cookie, "/agents").body;
    assert!(
        page.contains("<span data-count=\"online\">1 online</span>"),
        "{page}"
    );
    assert!(page.contains("never connected</code> ×1"), "{page}");
    agent.stop();
}
