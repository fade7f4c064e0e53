//! Authorization and audit cost: REST requests per second, one keep-alive connection, one
//! request at a time, on two servers started by this run with 10 simulated agents each:
//!
//! - `GET /api/v1/agents` with a deployer's API token (looked up, its role checked) against the
//!   same with the admin token;
//! - `POST /api/v1/deployments` (to the 10 agents) with the API token on a server that records
//!   every change in its audit log, against the admin token on a server whose audit log is off
//!   (`retention.keep_audit_entries = 0`): the cost of roles and audit together;
//! - the same audited API-token `POST` of a process with a secret property (sealed at rest
//!   with the key ring, and for each of the 10 agents with its session's HPKE-exported key)
//!   against the same without one:
//!   the cost of secrets at rest.
//!
//! Measured in alternating rounds; the median round of each is shown. Target: each ratio at
//! least 0.9. `cargo bench -p tether-tests --bench authz` (`make bench`);
//! `TETHER_BENCH_AUTHZ_ROUNDS` (default 5), `TETHER_BENCH_AUTHZ_GETS` (default 500 a round),
//! `TETHER_BENCH_AUTHZ_POSTS` (default 50 a round).

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench glue may unwrap

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tether_tests::fleet::{eventually, Server, TestDir};
use tether_tests::loadgen::{enroll_many, Fleet, SimConfig};

const AGENTS: usize = 10;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// A server with simulated agents online, a process, and a deployer's API token.
struct Subject {
    server: Server,
    _fleet: Fleet,
    _dir: TestDir,
    ids: Vec<String>,
    api_token: String,
}

fn subject(env: &[(&str, &str)]) -> Subject {
    let dir = TestDir::new();
    let server = Server::start_with(dir.path(), env);
    let ca = std::fs::read_to_string(server.ca_path()).unwrap();
    let tls = tether_shared::tls::client_config(&ca).unwrap();
    let token = server.token(AGENTS as u32);
    let agents = enroll_many(
        server.wss,
        Arc::new(tls.clone()),
        "localhost",
        &token,
        "sim",
        AGENTS,
        8,
    )
    .unwrap();
    let ids: Vec<String> = agents.iter().map(|a| a.agent_id.clone()).collect();
    let fleet = Fleet::start(SimConfig::new(server.wss, "localhost", tls), agents).unwrap();
    eventually("simulated agents online", Duration::from_secs(120), || {
        (fleet.stats().ready.load(Ordering::Relaxed) == AGENTS).then_some(())
    });
    let r = server.request("POST", "/api/v1/processes", Some(&json!({"name": "trivial", "steps": [{"name": "hello", "plugin": "shell", "step": "run", "properties": {"script": "echo hello"}}]})));
    assert_eq!(r.status, 201, "{}", r.body);
    let r = server.request("POST", "/api/v1/processes", Some(&json!({"name": "guarded", "steps": [{"name": "hello", "plugin": "shell", "step": "run", "properties": {"script": "echo hello", "password": "${db_secret}"}, "secrets": ["password"]}]})));
    assert_eq!(r.status, 201, "{}", r.body);
    let r = server.request(
        "POST",
        "/api/v1/users",
        Some(&json!({"name": "bench", "password": "bench-password-long", "role": "deployer"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = server.request(
        "POST",
        "/api/v1/api-tokens",
        Some(&json!({"user": "bench", "name": "bench"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let api_token = r.json()["token"].as_str().unwrap().to_owned();
    Subject {
        server,
        _fleet: fleet,
        _dir: dir,
        ids,
        api_token,
    }
}

/// Requests per second of `n` requests, one at a time on one keep-alive connection.
fn rate(
    server: &Server,
    token: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    n: usize,
) -> f64 {
    let tls = server.tls();
    let url = format!("https://localhost:{}{path}", server.https.port());
    let auth = format!("Bearer {token}");
    let method = actix_web::http::Method::from_bytes(method.as_bytes()).unwrap();
    let system = actix_rt::System::new();
    system.block_on(async move {
        let connector = awc::Connector::new().rustls_0_23(tls).limit(1);
        let client = awc::Client::builder()
            .connector(connector)
            .timeout(Duration::from_secs(30))
            .finish();
        let started = Instant::now();
        for _ in 0..n {
            let request = client
                .request(method.clone(), &url)
                .insert_header(("Authorization", auth.as_str()));
            let mut response = match &body {
                Some(b) => request.send_json(b).await.unwrap(),
                None => request.send().await.unwrap(),
            };
            let status = response.status().as_u16();
            let answer = response.body().limit(16 * 1024 * 1024).await.unwrap();
            assert!(
                status < 300,
                "{status}: {}",
                String::from_utf8_lossy(&answer)
            );
        }
        n as f64 / started.elapsed().as_secs_f64()
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rounds = env_or("TETHER_BENCH_AUTHZ_ROUNDS", 5).max(1);
    let gets = env_or("TETHER_BENCH_AUTHZ_GETS", 500).max(1);
    let posts = env_or("TETHER_BENCH_AUTHZ_POSTS", 50).max(1);
    println!("authz bench: REST requests/s, one keep-alive connection, {rounds} rounds ({gets} GETs, {posts} POSTs a round), {AGENTS} simulated agents");
    let audited = subject(&[]);
    let unaudited = subject(&[("TETHER_RETENTION__KEEP_AUDIT_ENTRIES", "0")]);
    let deployment = |ids: &[String]| json!({"process": "trivial", "targets": {"agents": ids}, "properties": {}});
    let secret_deployment = |ids: &[String]| json!({"process": "guarded", "targets": {"agents": ids}, "properties": {"db_secret": "hunter2-bench"}});
    let (mut get_admin, mut get_api, mut post_base, mut post_api, mut post_secret) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let s = &audited;
        get_admin.push(rate(
            &s.server,
            &s.server.admin_token,
            "GET",
            "/api/v1/agents",
            None,
            gets,
        ));
        get_api.push(rate(
            &s.server,
            &s.api_token,
            "GET",
            "/api/v1/agents",
            None,
            gets,
        ));
        let u = &unaudited;
        post_base.push(rate(
            &u.server,
            &u.server.admin_token,
            "POST",
            "/api/v1/deployments",
            Some(deployment(&u.ids)),
            posts,
        ));
        post_api.push(rate(
            &s.server,
            &s.api_token,
            "POST",
            "/api/v1/deployments",
            Some(deployment(&s.ids)),
            posts,
        ));
        post_secret.push(rate(
            &s.server,
            &s.api_token,
            "POST",
            "/api/v1/deployments",
            Some(secret_deployment(&s.ids)),
            posts,
        ));
    }
    let recorded = audited.server.request("GET", "/api/v1/audit", None).json()["head"]
        .as_u64()
        .unwrap_or(0);
    let (ga, gt, pb, pa, ps) = (
        median(get_admin),
        median(get_api),
        median(post_base),
        median(post_api),
        median(post_secret),
    );
    println!("{:<58} {:>10}", "measurement", "req/s");
    println!(
        "{:<58} {:>10.0}",
        "GET /api/v1/agents, admin token (baseline)", ga
    );
    println!(
        "{:<58} {:>10.0}",
        "GET /api/v1/agents, deployer API token", gt
    );
    println!(
        "{:<58} {:>10.0}",
        "POST /api/v1/deployments, admin token, audit off (baseline)", pb
    );
    println!(
        "{:<58} {:>10.0}",
        "POST /api/v1/deployments, deployer API token, audit on", pa
    );
    println!(
        "{:<58} {:>10.0}",
        "  the same with a secret property (sealed at rest, per agent)", ps
    );
    println!("audit entries recorded on the audited server: {recorded}");
    let verdict = |r: f64| if r >= 0.9 { "met" } else { "MISSED" };
    println!(
        "target: API token GET >= 0.9x admin token: {:.2}x ({})",
        gt / ga,
        verdict(gt / ga)
    );
    println!(
        "target: audited API-token deployments >= 0.9x unaudited admin: {:.2}x ({})",
        pa / pb,
        verdict(pa / pb)
    );
    println!(
        "target: deployments with a secret >= 0.9x without: {:.2}x ({})",
        ps / pa,
        verdict(ps / pa)
    );
}
