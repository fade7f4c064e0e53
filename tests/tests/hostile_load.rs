//! Hostile load on the real server, each case with its positive control: what a burst from
//! one peer may cost, and that it stays within a stated bound.
//! - 40 parallel wrong logins from one address: at most the per-source budget of password
//!   checks run (the rest get 429 without one), and the server's memory stays flat.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::sync::{Arc, Barrier};

use tether_tests::fleet::{Server, TestDir};
use tether_tests::measure::rss_kib;

/// The server's per-source budget of failed logins per minute (`web::login`).
const FAILURES_PER_SOURCE: usize = 10;

fn post_login(server: &Server, user: &str, password: &str) -> u16 {
    let origin = format!("https://localhost:{}", server.https.port());
    let body = format!("user={user}&password={password}");
    tether_tests::https_request_with_body(
        server.https,
        server.tls(),
        "localhost",
        "POST",
        "/login",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Origin", origin.as_str()),
        ],
        Some(body.as_bytes()),
    )
    .map(|r| r.status)
    .unwrap_or(0)
}

#[test]
fn a_login_burst_runs_a_bounded_number_of_password_checks_in_flat_memory() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let password = std::fs::read_to_string(server.dir.join("admin.password")).unwrap();
    let pid = server.pid().unwrap();
    // The control: the right password works, and warms up whatever a check allocates.
    assert_eq!(post_login(&server, "admin", password.trim()), 303);
    let before = rss_kib(pid);

    let attempts = 40;
    let barrier = Arc::new(Barrier::new(attempts));
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..attempts)
            .map(|i| {
                let barrier = barrier.clone();
                let server = &server;
                scope.spawn(move || {
                    barrier.wait();
                    post_login(server, "admin", &format!("wrong-password-{i}"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let after = rss_kib(pid);
    let refused = statuses.iter().filter(|s| **s == 401).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    eprintln!(
        "40 parallel wrong logins: {refused} checked and refused, {limited} limited; RSS {before} -> {after} KiB"
    );
    assert_eq!(refused + limited, attempts, "{statuses:?}");
    assert!(
        refused <= FAILURES_PER_SOURCE,
        "at most the budget of checks ran: {statuses:?}"
    );
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.matches("web-login-failed").count() <= FAILURES_PER_SOURCE);
    // Each check holds about 19 MiB; two run at once. 40 unbounded ones took 750 MiB.
    assert!(
        after.saturating_sub(before) < 100 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    // The source stays limited for the window, even with the right password.
    assert_eq!(post_login(&server, "admin", password.trim()), 429);
}
