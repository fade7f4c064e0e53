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

/// Sends `head` (a request head announcing a large body, none of it sent) over TLS to the
/// operators' listener and reads the status line within `wait`; `None` if nothing came.
fn status_without_body(server: &Server, head: &str, wait: std::time::Duration) -> Option<String> {
    use std::io::{Read, Write};
    let tcp = std::net::TcpStream::connect(server.https).unwrap();
    tcp.set_read_timeout(Some(wait)).unwrap();
    let conn =
        rustls::ClientConnection::new(server.tls(), "localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(head.as_bytes()).unwrap();
    tls.flush().unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n") {
        match tls.read(&mut byte) {
            Ok(1) => got.push(byte[0]),
            _ => break,
        }
    }
    (!got.is_empty()).then(|| String::from_utf8_lossy(&got).trim().to_owned())
}

#[test]
fn the_bearer_token_is_checked_before_any_body_is_read() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let head = |auth: &str| {
        format!(
            "POST /api/v1/processes HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n{auth}\r\n"
        )
    };
    // No token, or a wrong one: 401 at once, though not a byte of the body was sent.
    for auth in ["", "Authorization: Bearer wrong\r\n"] {
        let status = status_without_body(&server, &head(auth), std::time::Duration::from_secs(10));
        assert!(
            status.as_deref().is_some_and(|s| s.contains(" 401 ")),
            "{auth:?}: {status:?}"
        );
    }
    // The control: with the right token the server waits for the body it was promised.
    let right = format!("Authorization: Bearer {}\r\n", server.admin_token);
    let status = status_without_body(&server, &head(&right), std::time::Duration::from_secs(1));
    assert_eq!(status, None, "answered before the body arrived");
    // Nothing was created.
    assert_eq!(
        server.request("GET", "/api/v1/processes", None).json(),
        serde_json::json!([])
    );
}
