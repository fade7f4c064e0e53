//! The audit log on the real server: changes made over the web application, REST and the CLI
//! (a failed login, a login, a user, a process by an API token, a request refused by a role, an
//! enrollment token) are recorded with who, from where, what and the result, in order, durably
//! (they survive a restart), filtered and paged over REST, exported as JSON lines, shown to
//! admins only, and never with a secret in them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use serde_json::{json, Value};
use tether_tests::fleet::{Server, TestDir};

const PASSWORD: &str = "audit-test-password";

fn entries(server: &Server, query: &str) -> Vec<Value> {
    let r = server.request("GET", &format!("/api/v1/audit{query}"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["entries"].as_array().unwrap().clone()
}

/// Entries as `actor | METHOD path | status` lines.
fn lines(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| {
            format!(
                "{} | {} {} | {}",
                e["actor"].as_str().unwrap(),
                e["method"].as_str().unwrap(),
                e["path"].as_str().unwrap(),
                e["status"]
            )
        })
        .collect()
}

#[test]
fn every_change_is_recorded_with_who_where_what_and_the_result_and_no_secret() {
    let dir = TestDir::new();
    let mut server = Server::start(dir.path());
    let origin = format!("https://localhost:{}", server.https.port());
    // A failed login (wrong password of a real user; then a "user name" that is a password).
    for user in ["admin", "s3cret-typed-in-the-name"] {
        let body = format!("user={user}&password=wrong-password-xyz");
        let form = [
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Origin", origin.as_str()),
        ];
        let r = server.request_with("POST", "/login", &form, Some(body.as_bytes()));
        assert_eq!(r.status, 401);
    }
    let r = server.request(
        "POST",
        "/api/v1/users",
        Some(&json!({"name": "ops-1", "password": PASSWORD, "role": "deployer"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let _cookie = server.web_login("ops-1", PASSWORD);
    let r = server.request(
        "POST",
        "/api/v1/api-tokens",
        Some(&json!({"user": "ops-1", "name": "ci"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let token = r.json()["token"].as_str().unwrap().to_owned();
    let token_id = r.json()["id"].as_str().unwrap().to_owned();
    let process = json!({"name": "p1", "steps": [{"name": "s", "plugin": "shell", "step": "run", "properties": {"script": "true"}}]});
    for (method, path, body, status) in [
        ("POST", "/api/v1/processes", Some(&process), 201),
        ("DELETE", "/api/v1/relays/no-such-relay", None, 403),
    ] {
        let r = server.request_as(&token, method, path, body);
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
    }
    let cli = tether_tests::tether_cli::Tether::new(&dir.path().join("cli"));
    cli.login(&server);
    let out = cli.run(&["tokens", "create"]);
    assert!(out.status.success(), "{out:?}");
    let enrollment = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    // Reads are not recorded.
    let before_reads = server.request("GET", "/api/v1/audit", None).json()["head"]
        .as_u64()
        .unwrap();
    server.request("GET", "/api/v1/agents", None);
    assert_eq!(
        server.request("GET", "/api/v1/audit", None).json()["head"]
            .as_u64()
            .unwrap(),
        before_reads
    );

    let expected = [
        "user admin (logging in) | POST /login | 401".to_owned(),
        "anonymous (logging in as an unknown user) | POST /login | 401".to_owned(),
        "admin token | POST /api/v1/users | 201".to_owned(),
        "user ops-1 | POST /login | 303".to_owned(),
        "admin token | POST /api/v1/api-tokens | 201".to_owned(),
        format!("user ops-1 (API token {token_id}) | POST /api/v1/processes | 201"),
        format!("user ops-1 (API token {token_id}) | DELETE /api/v1/relays/no-such-relay | 403"),
        "admin token | POST /api/v1/enrollment-tokens | 201".to_owned(),
    ];
    let all = entries(&server, "?limit=1000");
    assert_eq!(lines(&all), expected);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(
            e["seq"].as_u64(),
            Some(i as u64 + 1),
            "numbered in order: {e}"
        );
        assert_eq!(e["source"], "127.0.0.1", "{e}");
        assert!(e["at_unix_ms"].as_u64().unwrap() > 0);
    }
    assert_eq!(all[6]["outcome"], "refused");
    assert_eq!(all[5]["outcome"], "ok");
    // Filters and paging.
    assert_eq!(
        lines(&entries(&server, "?actor=API%20token")),
        expected[5..7]
    );
    assert_eq!(entries(&server, "?outcome=refused").len(), 3);
    let page = server.request("GET", "/api/v1/audit?limit=3", None).json();
    assert_eq!(page["entries"].as_array().unwrap().len(), 3);
    let next = page["next"].as_u64().unwrap();
    assert_eq!(
        lines(&entries(&server, &format!("?after={next}&limit=3"))),
        expected[3..6]
    );
    assert_eq!(
        server.request("GET", "/api/v1/audit?limit=x", None).status,
        400
    );
    // Export: JSON lines, the same entries.
    let export = server.request("GET", "/api/v1/audit/export", None);
    assert_eq!(export.status, 200);
    let exported: Vec<Value> = export
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported, all);
    // The CLI: the same export; a table filtered by actor.
    let out = cli.run(&["audit", "--export"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), export.body);
    let out = cli.run(&["audit", "--actor", "API token"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        table.contains("DELETE /api/v1/relays/no-such-relay"),
        "{table}"
    );
    assert!(!table.contains("/login"), "{table}");
    // Never a secret: no password, API token, enrollment token or typed-in password.
    for secret in [
        PASSWORD,
        "wrong-password-xyz",
        "s3cret-typed-in-the-name",
        token.as_str(),
        enrollment.as_str(),
    ] {
        assert!(!export.body.contains(secret), "{secret} in the audit log");
    }
    // Admins only: the deployer's token may not read it; its page is an admin's.
    assert_eq!(
        server
            .request_as(&token, "GET", "/api/v1/audit", None)
            .status,
        403
    );
    let ops_cookie = server.web_login("ops-1", PASSWORD);
    assert_eq!(server.web_get(&ops_cookie, "/audit").status, 403);
    let admin_password =
        std::fs::read_to_string(dir.path().join("data/admin.password")).unwrap_or_default();
    if !admin_password.trim().is_empty() {
        let admin_cookie = server.web_login("admin", admin_password.trim());
        let page = server.web_get(&admin_cookie, "/audit");
        assert_eq!(page.status, 200);
        assert!(
            page.body.contains("DELETE /api/v1/relays/no-such-relay"),
            "{}",
            page.body
        );
    }
    // Durable: the same entries after a restart, and numbering goes on.
    let head = server.request("GET", "/api/v1/audit", None).json()["head"]
        .as_u64()
        .unwrap();
    server.kill();
    server.run();
    let after = entries(&server, "?limit=1000");
    assert_eq!(after[..all.len()], all[..]);
    let r = server.request(
        "POST",
        "/api/v1/users",
        Some(&json!({"name": "ops-2", "password": PASSWORD})),
    );
    assert_eq!(r.status, 201);
    let last = entries(
        &server,
        &format!("?after={head}&actor=admin%20token&path=/api/v1/users"),
    );
    assert_eq!(last.last().unwrap()["path"], "/api/v1/users");
    assert!(last.last().unwrap()["seq"].as_u64().unwrap() > head);

    // Anyone can send requests without credentials: their refusals are recorded at most 20 a
    // second, the rest counted.
    let head = server.request("GET", "/api/v1/audit", None).json()["head"]
        .as_u64()
        .unwrap();
    let unrecorded = |s: &Server| {
        s.try_health().unwrap()["audit"]["unrecorded"]
            .as_u64()
            .unwrap()
    };
    let before = unrecorded(&server);
    let started = std::time::Instant::now();
    for _ in 0..100 {
        let r = server.request_with("POST", "/api/v1/processes", &[], Some(b"{}"));
        assert_eq!(r.status, 401);
    }
    let seconds = started.elapsed().as_secs() + 2;
    let recorded = server.request("GET", "/api/v1/audit", None).json()["head"]
        .as_u64()
        .unwrap()
        - head;
    assert!(
        recorded <= 20 * seconds,
        "{recorded} recorded in {seconds} s"
    );
    assert!(recorded >= 20, "{recorded}");
    assert_eq!(recorded + unrecorded(&server) - before, 100);
    let anonymous = entries(&server, &format!("?after={head}&actor=anonymous"));
    assert_eq!(anonymous.len() as u64, recorded);
    assert_eq!(anonymous[0]["status"], 401);
}
