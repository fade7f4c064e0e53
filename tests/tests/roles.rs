//! Roles in the web application, on the real server: every form action and the pages only
//! admins read, tried by a viewer, a deployer and an admin, against the table below (which
//! doubles as documentation). A refused request names the role and changes nothing; pages show
//! only what the role may do; a role changed by an admin applies to the next request.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use serde_json::{json, Value};
use tether_tests::fleet::{Server, TestDir};
use tether_tests::https_request_with_body;

const PASSWORD: &str = "role-matrix-password";

/// The least role of each action: (method, path, form fields after the CSRF token, least role).
/// `{who}` is replaced by the acting user's name, so each leaves its own traces.
const ACTIONS: [(&str, &str, &str, &str); 11] = [
    ("GET", "/agents", "", "viewer"),
    ("GET", "/deployments", "", "viewer"),
    ("GET", "/users", "", "admin"),
    ("GET", "/tokens", "", "admin"),
    (
        "POST",
        "/processes",
        "json=%7B%22name%22%3A%22made-by-{who}%22%2C%22steps%22%3A%5B%7B%22name%22%3A%22s%22%2C%22plugin%22%3A%22shell%22%2C%22step%22%3A%22run%22%2C%22properties%22%3A%7B%22script%22%3A%22true%22%7D%7D%5D%7D",
        "deployer",
    ),
    ("POST", "/deployments/no-such-deployment/cancel", "", "deployer"),
    (
        "POST",
        "/users",
        "name=made-by-{who}&password=role-matrix-password&confirm=role-matrix-password&role=viewer",
        "admin",
    ),
    ("POST", "/users/victim/delete", "confirm=yes", "admin"),
    ("POST", "/tokens", "uses=1&ttl_s=3600&role=agent", "admin"),
    ("POST", "/agents/no-such-agent/tags", "tags=x", "admin"),
    ("POST", "/health/reconciliation/no-such-agent/dismiss", "", "admin"),
];

fn rank(role: &str) -> u8 {
    match role {
        "viewer" => 0,
        "deployer" => 1,
        "admin" => 2,
        other => panic!("unknown role {other}"),
    }
}

fn csrf_of(source: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = source.find(marker).expect("a csrf field") + marker.len();
    source[start..].split('"').next().unwrap().to_owned()
}

fn names(server: &Server, path: &str, field: &str) -> Vec<String> {
    let r = server.request("GET", path, None);
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    let v = r.json();
    let list = v.as_array().cloned().unwrap_or_default();
    list.iter()
        .filter_map(|u| u[field].as_str().map(str::to_owned))
        .collect()
}

fn create_user(server: &Server, name: &str, role: &str) {
    let body = json!({"name": name, "password": PASSWORD, "role": role});
    let r = server.request("POST", "/api/v1/users", Some(&body));
    assert_eq!(r.status, 201, "{}", r.body);
}

/// A web request of `user` (its cookie and CSRF token) from the server's own origin.
fn act(
    server: &Server,
    cookie: &str,
    csrf: &str,
    method: &str,
    path: &str,
    fields: &str,
) -> (u16, String) {
    let origin = format!("https://localhost:{}", server.https.port());
    let body = format!("csrf={csrf}&{fields}");
    let headers = [
        ("Cookie", cookie),
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Origin", origin.as_str()),
    ];
    let r = https_request_with_body(
        server.https,
        server.tls(),
        "localhost",
        method,
        path,
        &headers,
        (method == "POST").then_some(body.as_bytes()),
    )
    .unwrap();
    (r.status, r.body)
}

#[test]
fn each_role_does_what_the_table_says_and_a_refusal_changes_nothing() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    for (name, role) in [
        ("viewer-1", "viewer"),
        ("deployer-1", "deployer"),
        ("admin-2", "admin"),
    ] {
        create_user(&server, name, role);
    }
    let tokens_before = server
        .request("GET", "/api/v1/enrollment-tokens", None)
        .json()
        .as_array()
        .map_or(0, Vec::len);
    for (user, role) in [
        ("viewer-1", "viewer"),
        ("deployer-1", "deployer"),
        ("admin-2", "admin"),
    ] {
        // The victim of the delete action exists for each user in turn.
        if !names(&server, "/api/v1/users", "name").contains(&"victim".to_owned()) {
            create_user(&server, "victim", "viewer");
        }
        let cookie = server.web_login(user, PASSWORD);
        let page = server.web_get(&cookie, "/agents");
        assert_eq!(page.status, 200, "{}", page.body);
        assert!(
            page.body.contains(&format!("data-field=\"role\">{role}<")),
            "{}",
            page.body
        );
        let csrf = csrf_of(&page.body);
        for (method, path, fields, least) in ACTIONS {
            let fields = fields.replace("{who}", user);
            let (status, body) = act(&server, &cookie, &csrf, method, path, &fields);
            let allowed = rank(role) >= rank(least);
            let refused_by_role =
                status == 403 && body.contains(&format!("your role ({role}) may not do this"));
            assert_eq!(
                !refused_by_role, allowed,
                "{user} ({role}) {method} {path}: {status} {body}"
            );
        }
        // Pages show only what the role may do.
        let processes = server.web_get(&cookie, "/processes").body;
        assert_eq!(
            processes.contains("id=\"new-process\""),
            rank(role) >= 1,
            "{role}: {processes}"
        );
        let deployments = server.web_get(&cookie, "/deployments").body;
        assert_eq!(
            deployments.contains("id=\"start-deployment\""),
            rank(role) >= 1,
            "{role}"
        );
        assert_eq!(
            deployments.contains("href=\"/users\""),
            rank(role) >= 2,
            "{role}: nav"
        );
        assert_eq!(
            deployments.contains("href=\"/tokens\""),
            rank(role) >= 2,
            "{role}: nav"
        );
    }
    // What the refused requests would have made is not there; the allowed ones did their work.
    let processes = names(&server, "/api/v1/processes", "name");
    assert!(
        !processes.contains(&"made-by-viewer-1".to_owned()),
        "{processes:?}"
    );
    assert!(
        processes.contains(&"made-by-deployer-1".to_owned()),
        "{processes:?}"
    );
    assert!(
        processes.contains(&"made-by-admin-2".to_owned()),
        "{processes:?}"
    );
    let users = names(&server, "/api/v1/users", "name");
    assert_eq!(
        users,
        [
            "admin",
            "admin-2",
            "deployer-1",
            "made-by-admin-2",
            "viewer-1"
        ],
        "the victim deleted once, by the admin; users made by the admin only"
    );
    let tokens: Value = server
        .request("GET", "/api/v1/enrollment-tokens", None)
        .json();
    assert_eq!(
        tokens.as_array().map(Vec::len),
        Some(tokens_before + 1),
        "one enrollment token, the admin's: {tokens}"
    );

    // An admin's change of role applies to the next request of a live session.
    let cookie = server.web_login("viewer-1", PASSWORD);
    let csrf = csrf_of(&server.web_get(&cookie, "/agents").body);
    let fields = ACTIONS[4].2.replace("{who}", "promoted");
    let (status, _) = act(&server, &cookie, &csrf, "POST", "/processes", &fields);
    assert_eq!(status, 403);
    let r = server.request(
        "PATCH",
        "/api/v1/users/viewer-1",
        Some(&json!({"role": "deployer"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["role"], "deployer");
    let (status, body) = act(&server, &cookie, &csrf, "POST", "/processes", &fields);
    assert_ne!(status, 403, "{body}");
    assert!(names(&server, "/api/v1/processes", "name").contains(&"made-by-promoted".to_owned()));
    // Nobody raises their own role, and the last admins stay: demoting both is refused at the
    // second.
    let admin_cookie = server.web_login("admin-2", PASSWORD);
    let admin_csrf = csrf_of(&server.web_get(&admin_cookie, "/users").body);
    let (status, body) = act(
        &server,
        &admin_cookie,
        &admin_csrf,
        "POST",
        "/users/admin-2/role",
        "role=viewer",
    );
    assert_eq!(status, 409, "{body}");
    let r = server.request(
        "PATCH",
        "/api/v1/users/admin",
        Some(&json!({"role": "viewer"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = server.request(
        "PATCH",
        "/api/v1/users/admin-2",
        Some(&json!({"role": "viewer"})),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("last admin"), "{}", r.body);
}
