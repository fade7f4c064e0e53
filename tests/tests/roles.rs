//! Roles in the web application, on the real server: every form action and the pages only
//! admins read, tried by a viewer, a deployer and an admin, against the table below (which
//! doubles as documentation). A refused request names the role and changes nothing; pages show
//! only what the role may do; a role changed by an admin applies to the next request.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use serde_json::{json, Value};
use tether_tests::fleet::{Server, TestDir};

const PASSWORD: &str = "role-matrix-password";

/// The least role of each action: (method, path, form fields after the CSRF token, least role).
/// `{who}` is replaced by the acting user's name, so each leaves its own traces.
const ACTIONS: [(&str, &str, &str, &str); 12] = [
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
    ("POST", "/agents/no-such-agent/maintenance", "on=yes&reason=x", "admin"),
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

fn names(server: &Server, path: &str, field: &str) -> Vec<String> {
    let r = server.request("GET", path, None);
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    let v = r.json();
    let list = v.as_array().cloned().unwrap_or_default();
    list.iter()
        .filter_map(|u| u[field].as_str().map(str::to_owned))
        .collect()
}

/// The ids of the users' API tokens (the admin token, listed first, left out).
fn user_tokens(server: &Server) -> Vec<String> {
    let mut ids = names(server, "/api/v1/api-tokens", "id");
    assert_eq!(
        ids.first().map(String::as_str),
        Some("admin-token"),
        "{ids:?}"
    );
    ids.remove(0);
    ids
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
    let r = match method {
        "POST" => server.web_post(cookie, csrf, path, fields),
        _ => server.web_get(cookie, path),
    };
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
        let csrf = tether_tests::csrf_of(&page.body);
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
    let csrf = tether_tests::csrf_of(&server.web_get(&cookie, "/agents").body);
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
    let admin_csrf = tether_tests::csrf_of(&server.web_get(&admin_cookie, "/users").body);
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

/// A REST request with `token` as the bearer.
fn with_token(
    server: &Server,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, String) {
    let r = server.request_as(token, method, path, body);
    (r.status, r.body)
}

/// A token made over REST by the admin: (id, token).
fn make_token(server: &Server, body: Value) -> (String, String) {
    let r = server.request("POST", "/api/v1/api-tokens", Some(&body));
    assert_eq!(r.status, 201, "{body}: {}", r.body);
    let v = r.json();
    (
        v["id"].as_str().unwrap().to_owned(),
        v["token"].as_str().unwrap().to_owned(),
    )
}

fn process(name: &str) -> Value {
    json!({"name": name, "steps": [{"name": "s", "plugin": "shell", "step": "run",
        "properties": {"script": "true"}}]})
}

#[test]
fn api_tokens_act_with_their_role_and_end_when_revoked_expired_or_their_user_goes() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    create_user(&server, "viewer-1", "viewer");
    create_user(&server, "deployer-1", "deployer");
    // Refused: a role above the user's, an unknown user or role, a bad name or lifetime.
    for body in [
        json!({"user": "viewer-1", "name": "t", "role": "deployer"}),
        json!({"user": "nobody", "name": "t"}),
        json!({"user": "viewer-1", "name": "t", "role": "root"}),
        json!({"user": "viewer-1", "name": "bad name"}),
        json!({"user": "viewer-1", "name": "t", "expires_in_s": 0}),
    ] {
        let r = server.request("POST", "/api/v1/api-tokens", Some(&body));
        assert_eq!(r.status, 400, "{body}: {}", r.body);
    }
    assert_eq!(user_tokens(&server).len(), 0);
    let (_, viewer) = make_token(&server, json!({"user": "viewer-1", "name": "ci-read"}));
    let (deployer_id, deployer) = make_token(&server, json!({"user": "deployer-1", "name": "ci"}));
    let (_, lowered) = make_token(
        &server,
        json!({"user": "deployer-1", "name": "ro", "role": "viewer"}),
    );
    let enrollment_tokens = || names(&server, "/api/v1/enrollment-tokens", "id").len();
    let enrollment_before = enrollment_tokens();
    // (token, its role, the name it gives its process)
    for (token, role, who) in [
        (&viewer, "viewer", "v"),
        (&deployer, "deployer", "d"),
        (&lowered, "viewer", "l"),
    ] {
        let matrix: [(&str, &str, Option<Value>, &str); 7] = [
            ("GET", "/api/v1/agents", None, "viewer"),
            ("GET", "/admin/health", None, "viewer"),
            ("GET", "/api/v1/users", None, "admin"),
            ("GET", "/api/v1/api-tokens", None, "admin"),
            (
                "POST",
                "/api/v1/processes",
                Some(process(&format!("by-{who}"))),
                "deployer",
            ),
            ("DELETE", "/api/v1/relays/no-such-relay", None, "admin"),
            (
                "POST",
                "/api/v1/enrollment-tokens",
                Some(json!({"uses": 1, "ttl_s": 60, "role": "agent"})),
                "admin",
            ),
        ];
        for (method, path, body, least) in matrix {
            let (status, answer) = with_token(&server, token, method, path, body.as_ref());
            let allowed = rank(role) >= rank(least);
            assert_ne!(status, 401, "{who} {method} {path}: {answer}");
            assert_eq!(
                status != 403,
                allowed,
                "{who} ({role}) {method} {path}: {status} {answer}"
            );
            if !allowed {
                assert!(
                    answer.contains(&format!("this token's role ({role})")),
                    "{answer}"
                );
            }
        }
    }
    let processes = names(&server, "/api/v1/processes", "name");
    assert_eq!(processes, ["by-d"], "only the deployer token made one");
    assert_eq!(enrollment_tokens(), enrollment_before, "no token made one");

    // Never shown again, nor stored: not in the list, not in any file of the data directory
    // (where the search does find the admin token's file).
    assert!(!tether_tests::files_containing(dir.path(), server.admin_token.as_bytes()).is_empty());
    let listed = server.request("GET", "/api/v1/api-tokens", None).body;
    for token in [&viewer, &deployer, &lowered] {
        // tether_<id>_<secret>: the secret is base64url, which may hold '_' itself.
        let secret = token.splitn(3, '_').nth(2).unwrap();
        assert_eq!(secret.len(), 43, "{token}");
        assert!(!listed.contains(secret), "{listed}");
        assert!(
            tether_tests::files_containing(dir.path(), secret.as_bytes()).is_empty(),
            "a secret on disk"
        );
    }
    assert!(!listed.contains("sha256"), "{listed}");

    // The CLI with a token: what its role allows, a clear refusal for the rest.
    let cli = tether_tests::tether_cli::Tether::new(&dir.path().join("cli"));
    cli.login(&server);
    let out = cli.run_with(&[("TETHER_TOKEN", viewer.as_str())], None, &["processes"]);
    assert!(out.status.success(), "{out:?}");
    let out = cli.run_with(&[("TETHER_TOKEN", viewer.as_str())], None, &["users"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{out:?}"
    );
    let out = cli.json(&["api-tokens"]);
    assert_eq!(
        out.as_array().map(Vec::len),
        Some(4),
        "the admin token and 3: {out}"
    );
    assert_eq!(out[0]["id"], "admin-token", "{out}");

    // A user's role bounds their tokens: lowered, the deployer token deploys nothing more.
    let r = server.request(
        "PATCH",
        "/api/v1/users/deployer-1",
        Some(&json!({"role": "viewer"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let (status, _) = with_token(
        &server,
        &deployer,
        "POST",
        "/api/v1/processes",
        Some(&process("late")),
    );
    assert_eq!(status, 403);
    // Revoked: unknown from then on.
    let out = cli.run(&["api-tokens", "revoke", &deployer_id]);
    assert!(out.status.success(), "{out:?}");
    let (status, _) = with_token(&server, &deployer, "GET", "/api/v1/agents", None);
    assert_eq!(status, 401);
    // Expired: refused once its time is up.
    let (_, short) = make_token(
        &server,
        json!({"user": "viewer-1", "name": "short", "expires_in_s": 1}),
    );
    let (status, _) = with_token(&server, &short, "GET", "/api/v1/agents", None);
    assert_eq!(status, 200);
    tether_tests::fleet::eventually(
        "the token expired",
        std::time::Duration::from_secs(10),
        || (with_token(&server, &short, "GET", "/api/v1/agents", None).0 == 401).then_some(()),
    );
    // The user deleted: their tokens end, and stay ended for a new user of that name.
    let r = server.request("DELETE", "/api/v1/users/viewer-1", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        with_token(&server, &viewer, "GET", "/api/v1/agents", None).0,
        401
    );
    create_user(&server, "viewer-1", "admin");
    assert_eq!(
        with_token(&server, &viewer, "GET", "/api/v1/agents", None).0,
        401
    );
    // A forged token: a known id with another secret.
    let id = viewer.split('_').nth(1).unwrap();
    let forged = format!("tether_{id}_{}", "A".repeat(43));
    assert_eq!(
        with_token(&server, &forged, "GET", "/api/v1/agents", None).0,
        401
    );
}

#[test]
fn a_user_makes_and_revokes_their_own_api_tokens_on_the_account_page() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    create_user(&server, "viewer-1", "viewer");
    create_user(&server, "deployer-1", "deployer");
    let (others, _) = make_token(&server, json!({"user": "deployer-1", "name": "theirs"}));
    let cookie = server.web_login("viewer-1", PASSWORD);
    let page = server.web_get(&cookie, "/account");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("id=\"api-tokens\""), "{}", page.body);
    assert!(
        !page.body.contains("value=\"deployer\""),
        "no role above the user's is offered"
    );
    let csrf = tether_tests::csrf_of(&page.body);
    // Above the user's role: refused, nothing made.
    let (status, body) = act(
        &server,
        &cookie,
        &csrf,
        "POST",
        "/account/api-tokens",
        "name=up&role=admin&days=",
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(user_tokens(&server), std::slice::from_ref(&others));
    // Made: shown once on the answer, and it works.
    let (status, body) = act(
        &server,
        &cookie,
        &csrf,
        "POST",
        "/account/api-tokens",
        "name=laptop&role=viewer&days=30",
    );
    assert_eq!(status, 200, "{body}");
    let start = body
        .find("<pre id=\"new-api-token\">")
        .expect("the token shown")
        + "<pre id=\"new-api-token\">".len();
    let token = body[start..].split('<').next().unwrap().to_owned();
    assert!(token.starts_with("tether_"), "{token}");
    assert_eq!(
        with_token(&server, &token, "GET", "/api/v1/agents", None).0,
        200
    );
    let again = server.web_get(&cookie, "/account").body;
    assert!(!again.contains(&token), "shown only once");
    assert!(again.contains("laptop"), "{again}");
    // Nobody revokes another's token from their page; their own goes at once.
    let (status, _) = act(
        &server,
        &cookie,
        &csrf,
        "POST",
        &format!("/account/api-tokens/{others}/revoke"),
        "",
    );
    assert_eq!(status, 404);
    let mine: Vec<String> = server
        .request("GET", "/api/v1/api-tokens", None)
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["user"] == "viewer-1")
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(mine.len(), 1);
    let (status, _) = act(
        &server,
        &cookie,
        &csrf,
        "POST",
        &format!("/account/api-tokens/{}/revoke", mine[0]),
        "",
    );
    assert_eq!(status, 303);
    assert_eq!(
        with_token(&server, &token, "GET", "/api/v1/agents", None).0,
        401
    );
    assert_eq!(user_tokens(&server), [others]);
}

#[test]
fn tether_login_with_a_user_and_password_gets_a_token_with_the_users_role() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    create_user(&server, "deployer-1", "deployer");
    let cli = tether_tests::tether_cli::Tether::new(&dir.path().join("cli"));
    let url = tether_tests::tether_cli::server_url(&server);
    let ca = server.ca_path();
    let login = |user: &str, password: &str| {
        cli.run_with(
            &[],
            Some(&format!("{password}\n")),
            &[
                "login",
                "--server",
                &url,
                "--ca",
                ca.to_str().unwrap(),
                "--user",
                user,
            ],
        )
    };
    // Wrong password, unknown user: refused alike, nothing stored.
    for (user, password) in [("deployer-1", "not-the-password"), ("nobody", PASSWORD)] {
        let out = login(user, password);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("401"),
            "{out:?}"
        );
    }
    assert_eq!(user_tokens(&server).len(), 0);
    let out = login("deployer-1", PASSWORD);
    assert!(out.status.success(), "{out:?}");
    // A token of the user's role, expiring, stored by the CLI (never the password).
    let tokens = server.request("GET", "/api/v1/api-tokens", None).json();
    let tokens = &tokens[1];
    assert_eq!(tokens["user"], "deployer-1", "{tokens}");
    assert_eq!(tokens["role"], "deployer", "{tokens}");
    assert!(tokens["expires_unix_ms"].as_u64().is_some(), "{tokens}");
    assert!(
        tether_tests::files_containing(&dir.path().join("cli"), PASSWORD.as_bytes()).is_empty()
    );
    let out = cli.run(&["processes"]);
    assert!(out.status.success(), "{out:?}");
    let out = cli.run(&["users"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{out:?}"
    );
    // The password login route takes no bearer, and bad bodies are refused.
    let r = server.request_with(
        "POST",
        "/api/v1/login",
        &[("Content-Type", "application/json")],
        Some(b"{\"user\": 1}"),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(!r.body.contains(PASSWORD));
}

#[test]
fn the_admin_token_from_init_is_listed_and_revoked_like_the_others() {
    let dir = TestDir::new();
    let mut server = Server::start(dir.path());
    let listed = server.request("GET", "/api/v1/api-tokens", None).json();
    assert_eq!(listed[0]["id"], "admin-token", "{listed}");
    assert_eq!(listed[0]["role"], "admin", "{listed}");
    assert!(
        listed[0]["created_unix_ms"].as_u64().unwrap() > 0,
        "{listed}"
    );
    // Someone's own admin token first, then the shared one goes.
    let (_, own) = make_token(&server, json!({"user": "admin", "name": "mine"}));
    let (status, body) = with_token(
        &server,
        &own,
        "DELETE",
        "/api/v1/api-tokens/admin-token",
        None,
    );
    assert_eq!(status, 200, "{body}");
    let shared = server.admin_token.clone();
    assert_eq!(
        with_token(&server, &shared, "GET", "/api/v1/agents", None).0,
        401
    );
    assert_eq!(
        with_token(&server, &shared, "GET", "/admin/health", None).0,
        401
    );
    assert_eq!(
        with_token(&server, &own, "GET", "/api/v1/agents", None).0,
        200
    );
    let ids: Vec<String> = server
        .request_as(&own, "GET", "/api/v1/api-tokens", None)
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!ids.contains(&"admin-token".to_owned()), "{ids:?}");
    let (status, _) = with_token(
        &server,
        &own,
        "DELETE",
        "/api/v1/api-tokens/admin-token",
        None,
    );
    assert_eq!(status, 404, "revoked once");
    // Durable: still refused after a restart.
    server.kill();
    server.run();
    assert_eq!(
        with_token(&server, &shared, "GET", "/api/v1/agents", None).0,
        401
    );
    // The way back: a new token in admin.token, and a restart.
    server.kill();
    let fresh = format!("fresh-admin-{:x}", rand::random::<u64>());
    std::fs::write(server.dir.join("admin.token"), &fresh).unwrap();
    server.run();
    assert_eq!(
        with_token(&server, &fresh, "GET", "/api/v1/agents", None).0,
        200
    );
    assert_eq!(
        with_token(&server, &shared, "GET", "/api/v1/agents", None).0,
        401
    );
}
