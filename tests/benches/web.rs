//! Web pages with 5,000 agents registered and connected (simulated, each reporting its facts):
//! the agents page (page 1 of 50, 100 rows), a search and filters on facts (`where=`), against
//! the unfiltered page and the REST API's JSON list of the same 5,000 agents as the baselines,
//! all measured in the same run on the same server; and `tether agents --where` against
//! `tether agents`. Ratios are of medians.
//!
//! - Raw HTTPS (a new TLS connection per request, as a browser's first visit): time to the
//!   first body byte and to the last, best and median of 20.
//! - In headless Chromium (if installed): the Navigation Timing of the agents page, response
//!   start and load event end (parsed, styled, laid out, its script run), best and median of 20.
//!
//! `cargo bench -p tether-tests --bench web` (`make bench`). `TETHER_BENCH_WEB_AGENTS` (default
//! 5000) sets the fleet size.

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench glue may unwrap

use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_shared::https::{request_streaming, Request, StreamLimits};
use tether_tests::fleet::eventually;
use tether_tests::fleet::{Server, TestDir};
use tether_tests::https_request_with_body;
use tether_tests::loadgen::{enroll_many, Fleet, SimConfig};
use tether_tests::webdriver::Driver;

const RUNS: usize = 20;

/// (time to first body byte, time to last byte, body bytes) of one GET.
fn timed_get(server: &Server, path: &str, headers: &[(&str, &str)]) -> (Duration, Duration, usize) {
    let request = Request {
        method: "GET",
        host: "localhost",
        port: server.https.port(),
        addr: Some(server.https),
        path,
        headers,
        body: None,
    };
    let started = Instant::now();
    let mut first = None;
    let mut bytes = 0;
    let head = request_streaming(
        Some(server.tls()),
        &request,
        &StreamLimits::default(),
        &mut |chunk| {
            first.get_or_insert_with(|| started.elapsed());
            bytes += chunk.len();
            Ok(())
        },
    )
    .unwrap();
    let total = started.elapsed();
    assert_eq!(head.status, 200, "GET {path}");
    (first.unwrap_or(total), total, bytes)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Best and median of `samples`.
fn stats(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    (samples[0], samples[samples.len() / 2])
}

/// Prints best / median of time to first byte and to the last; answers the median TTFB (ms).
fn measure(label: &str, server: &Server, path: &str, headers: &[(&str, &str)]) -> f64 {
    timed_get(server, path, headers); // warm-up
    let runs: Vec<_> = (0..RUNS)
        .map(|_| timed_get(server, path, headers))
        .collect();
    let (ttfb_best, ttfb_med) = stats(runs.iter().map(|r| ms(r.0)).collect());
    let (total_best, total_med) = stats(runs.iter().map(|r| ms(r.1)).collect());
    println!(
        "  {label:<44} first byte {ttfb_best:>7.1} / {ttfb_med:>7.1} ms   whole {total_best:>7.1} / {total_med:>7.1} ms   {:>9} bytes",
        runs[0].2
    );
    ttfb_med
}

/// Median wall time (ms) of `tether ARGS` (a new process and TLS connection each).
fn cli_median(cli: &tether_tests::tether_cli::Tether, args: &[&str]) -> f64 {
    let _ = cli.run(args);
    let runs: Vec<f64> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            let out = cli.run(args);
            assert!(out.status.success(), "{args:?}: {out:?}");
            ms(t.elapsed())
        })
        .collect();
    stats(runs).1
}

fn main() {
    let agents: usize = std::env::var("TETHER_BENCH_WEB_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let ca = std::fs::read_to_string(server.ca_path()).unwrap();
    let tls = Arc::new(tether_shared::tls::client_config(&ca).unwrap());
    let token = server.token(u32::try_from(agents).unwrap());
    let started = Instant::now();
    let enrolled = enroll_many(server.wss, tls, "localhost", &token, "agent", agents, 32).unwrap();
    println!(
        "web: {agents} agents enrolled in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Connected, so that each reports its facts (as a real agent does at its handshake); one
    // loopback address per 500 keeps each under the server's per-source bounds.
    let started = Instant::now();
    let spread = u8::try_from(agents.div_ceil(500)).unwrap_or(u8::MAX);
    let client = tether_shared::tls::client_config(&ca).unwrap();
    let fleet = Fleet::start(
        SimConfig::new(server.wss, "localhost", client).spread_over_loopback(spread),
        enrolled,
    )
    .unwrap();
    eventually(
        "every agent's facts stored",
        Duration::from_secs(600),
        || {
            let r = server.request("GET", "/api/v1/agents?where=os%3Dlinux", None);
            (r.json().as_array().map_or(0, Vec::len) == agents).then_some(())
        },
    );
    println!(
        "web: {agents} agents connected, facts stored, in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Log in as a browser would, with the password init wrote.
    let password = std::fs::read_to_string(server.dir.join("admin.password")).unwrap();
    let origin = format!("https://localhost:{}", server.https.port());
    let body = format!("user=admin&password={}", password.trim());
    let login = https_request_with_body(
        server.https,
        server.tls(),
        "localhost",
        "POST",
        "/login",
        &[
            ("Origin", &origin),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        Some(body.as_bytes()),
    )
    .unwrap();
    assert_eq!(login.status, 303, "{}", login.body);
    let cookie = login
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_owned();
    let auth = format!("Bearer {}", server.admin_token);

    println!("web: raw HTTPS, new TLS connection per request, best / median of {RUNS}:");
    let page = [("Cookie", cookie.as_str())];
    let unfiltered = measure(
        "baseline: GET /agents (page 1 of 50)",
        &server,
        "/agents",
        &page,
    );
    measure("GET /agents?page=50", &server, "/agents?page=50", &page);
    measure(
        "GET /agents?q=agent-4242 (search)",
        &server,
        "/agents?q=agent-4242",
        &page,
    );
    measure(
        "GET /agents?q=agent-1 (search, 1111 hits)",
        &server,
        "/agents?q=agent-1",
        &page,
    );
    let filtered = measure(
        "GET /agents?where=arch=aarch64 (facts)",
        &server,
        "/agents?where=arch%3Daarch64",
        &page,
    );
    let filtered2 = measure(
        "GET /agents?where=os=linux cpus>=4 distribution=deb*",
        &server,
        "/agents?where=os%3Dlinux+cpus%3E%3D4+distribution%3Ddeb*",
        &page,
    );
    let bearer = [("Authorization", auth.as_str())];
    let json_all = measure(
        "baseline: GET /api/v1/agents (JSON, all)",
        &server,
        "/api/v1/agents",
        &bearer,
    );
    let json_filtered = measure(
        "GET /api/v1/agents?where=arch=aarch64",
        &server,
        "/api/v1/agents?where=arch%3Daarch64",
        &bearer,
    );
    let cli = tether_tests::tether_cli::Tether::new(&dir.path().join("cli"));
    cli.login(&server);
    let cli_all = cli_median(&cli, &["agents"]);
    let cli_where = cli_median(
        &cli,
        &["agents", "--where", "arch=aarch64", "--where", "cpus>=4"],
    );
    println!("  tether agents (all)                           {cli_all:>7.1} ms median");
    println!("  tether agents --where arch=aarch64 cpus>=4    {cli_where:>7.1} ms median");
    println!("web: ratios of medians (target <= 1.5 for filters against the unfiltered page):");
    println!(
        "  page where=arch / unfiltered page            {:.2}x",
        filtered / unfiltered
    );
    println!(
        "  page three conditions / unfiltered page      {:.2}x",
        filtered2 / unfiltered
    );
    println!(
        "  JSON where=arch / JSON all                   {:.2}x",
        json_filtered / json_all
    );
    println!(
        "  tether agents --where / tether agents        {:.2}x",
        cli_where / cli_all
    );

    browser(&server, &origin, password.trim(), &dir);
    fleet.stop();
}

/// The agents page in headless Chromium: Navigation Timing, best / median of [`RUNS`].
fn browser(server: &Server, origin: &str, password: &str, dir: &TestDir) {
    let driver = match Driver::start(&dir.path().join("chromedriver.log")) {
        Ok(d) => d,
        Err(why) => {
            println!("web: browser timings skipped: {why}");
            return;
        }
    };
    let s = match driver.session(&dir.path().join("profile")) {
        Ok(s) => s,
        Err(why) => {
            println!("web: browser timings skipped: {why}");
            return;
        }
    };
    let wait = Duration::from_secs(30);
    s.goto(&format!("{origin}/login")).unwrap();
    s.type_text(&s.wait_for("#user", wait).unwrap(), "admin")
        .unwrap();
    s.type_text(&s.find("#password").unwrap(), password)
        .unwrap();
    s.click(&s.find("#login").unwrap()).unwrap();
    s.wait_text("h1", wait, |t| t == "Agents").unwrap();
    println!("web: headless Chromium, Navigation Timing, best / median of {RUNS}:");
    for (label, path) in [
        ("/agents (page 1 of 50)", "/agents"),
        ("/agents?q=agent-4242 (search)", "/agents?q=agent-4242"),
    ] {
        let mut first = Vec::new();
        let mut loaded = Vec::new();
        for _ in 0..=RUNS {
            s.goto(&format!("{origin}{path}")).unwrap();
            let t = s
                .execute(
                    "const n = performance.getEntriesByType('navigation')[0]; \
                     return [n.responseStart - n.startTime, n.loadEventEnd - n.startTime];",
                    serde_json::json!([]),
                )
                .unwrap();
            first.push(t[0].as_f64().unwrap_or(0.0));
            loaded.push(t[1].as_f64().unwrap_or(0.0));
        }
        // The first navigation warms the connection; drop it.
        first.remove(0);
        loaded.remove(0);
        let (fb, fm) = stats(first);
        let (lb, lm) = stats(loaded);
        println!(
            "  {label:<44} first byte {fb:>7.1} / {fm:>7.1} ms   rendered (load end) {lb:>7.1} / {lm:>7.1} ms"
        );
    }
    // The server is still there to be asked afterwards.
    let _ = server;
}
