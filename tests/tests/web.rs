//! The web application in a real browser (headless Chromium driven over WebDriver) against the
//! real server and a real agent: log in, see the agent come online, create a process and start
//! a deployment from the forms and watch its log appear, cancel a long one, trigger an upgrade;
//! a property value and a log line holding `<script>alert(1)</script>` render as text; and,
//! with raw HTTPS and the browser's own session cookie, a state change without the CSRF token
//! (or with a wrong one, or from another origin) is refused with 403 and changes nothing. Then
//! users: admin creates `ops-1` on the users page, logs out; a wrong password is refused;
//! ops-1 logs in, cannot delete itself, deletes another user; deleting ops-1 ends its session.
//!
//! Without Chromium (`apt-get install chromium chromium-driver`; `make test` installs them) the
//! test says why and is skipped, except under `CI=true`, where it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::time::Duration;

use serde_json::{json, Value};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::webdriver::{driver_or_skip, Driver, Session};
use tether_tests::{https_request_with_body, HttpReply};

const WAIT: Duration = Duration::from_secs(60);
const XSS: &str = "<script>alert(1)</script>";

/// Sets a form field's value directly (long text types slowly key by key).
fn set_value(s: &Session<'_>, css: &str, value: &str) {
    let e = s.wait_for(css, WAIT).unwrap();
    s.set_value(&e, value)
        .unwrap_or_else(|err| panic!("set {css}: {err}"));
}

/// With `TETHER_WEB_SCREENSHOTS=DIR`, saves the page as `DIR/<name>.png` (to look at it).
fn screenshot(s: &Session<'_>, name: &str) {
    if let Some(dir) = std::env::var_os("TETHER_WEB_SCREENSHOTS") {
        let png = s.screenshot().unwrap();
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).unwrap();
    }
}

fn click(s: &Session<'_>, css: &str) {
    let e = s.wait_for(css, WAIT).unwrap();
    s.click(&e)
        .unwrap_or_else(|err| panic!("click {css}: {err}"));
}

/// No script ran: no dialog open, and the page source holds the payload only escaped.
fn assert_inert(s: &Session<'_>, what: &str) {
    assert_eq!(
        s.alert_text(),
        None,
        "{what}: a dialog is open: a script ran"
    );
    let source = s.source().unwrap();
    assert!(
        !source.contains(XSS),
        "{what}: raw payload in the page:\n{source}"
    );
    assert!(
        source.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{what}: the payload is not shown as text:\n{source}"
    );
}

fn raw(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpReply {
    https_request_with_body(
        server.https,
        server.tls(),
        "localhost",
        method,
        path,
        headers,
        body.map(str::as_bytes),
    )
    .unwrap()
}

/// A browser session on `driver`; `None` (the test skips) if Chromium does not start outside
/// CI, a panic under `CI=true`.
fn session_or_skip<'a>(driver: &'a Driver, profile: &std::path::Path) -> Option<Session<'a>> {
    match driver.session(profile) {
        Ok(s) => Some(s),
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("headless Chromium does not start: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: headless Chromium does not start: {why}");
            None
        }
    }
}

fn agent_json(server: &Server, id: &str) -> Value {
    let r = server.request("GET", &format!("/api/v1/agents/{id}"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[test]
fn operators_surface_in_a_browser() {
    let dir = TestDir::new();
    let Some(driver) = driver_or_skip(&dir.path().join("chromedriver.log")) else {
        return;
    };
    let server = Server::start(dir.path());
    let password = std::fs::read_to_string(server.dir.join("admin.password")).unwrap();
    let mut agent = Agent::install(&server, dir.path(), "web-1", &["web"]);
    agent.run();

    let profile = dir.path().join("chromium-profile");
    let Some(s) = session_or_skip(&driver, &profile) else {
        return;
    };
    let base = format!("https://localhost:{}", server.https.port());

    log_in(&s, &base, &password);

    // The agent comes online: the list refreshes itself.
    let row = format!("tr[data-id='{}']", agent.id);
    s.wait_text(&format!("{row} [data-field=status]"), WAIT, |t| {
        t == "online"
    })
    .unwrap();
    assert_eq!(s.alert_text(), None);

    // A property value holding a script (operator-controlled) renders as text.
    s.goto(&format!("{base}/agents/{}", agent.id)).unwrap();
    set_value(
        &s,
        "#properties-input",
        &format!("note={XSS}\nimg=\"><img src=x onerror=alert(2)>"),
    );
    click(&s, "#edit-properties button");
    s.wait_text(".notice", WAIT, |t| t == "Saved.").unwrap();
    assert_inert(&s, "agent page");
    screenshot(&s, "agent");
    assert_eq!(agent_json(&server, &agent.id)["properties"]["note"], XSS);
    let found = format!("{base}/agents?q=alert(1)");
    s.goto(&found).unwrap();
    s.wait_text("#summary", WAIT, |t| t.starts_with("1 of 1"))
        .unwrap();
    screenshot(&s, "agents");
    // Filtered by its facts from the search form; a condition that holds for none shows none.
    s.goto(&format!("{base}/agents")).unwrap();
    set_value(
        &s,
        "#where",
        &format!("os=linux arch={}", std::env::consts::ARCH),
    );
    click(&s, "form.searchbar button");
    // The unfiltered page says "1 of 1" too: wait for the search's own page first.
    s.wait_url(WAIT, |u| u.contains("where=os")).unwrap();
    s.wait_text("#summary", WAIT, |t| t.starts_with("1 of 1"))
        .unwrap();
    s.goto(&format!("{base}/agents?where=cpus%3E100000"))
        .unwrap();
    s.wait_text("#summary", WAIT, |t| t.starts_with("0 of 1"))
        .unwrap();
    // The health page names the agent's link and refreshes itself.
    s.goto(&format!("{base}/health")).unwrap();
    s.wait_text("#actors", WAIT, |t| t.contains("web-1"))
        .unwrap();
    s.wait_for("#health-live[data-refreshed]", WAIT).unwrap();
    s.wait_text("#actors", WAIT, |t| t.contains("web-1"))
        .unwrap();

    // A process from the JSON form; a deployment from the start form; its log appears.
    s.goto(&format!("{base}/processes")).unwrap();
    let hello = json!({"name": "hello", "steps": [{"name": "greet", "plugin": "shell", "step": "run",
        "properties": {"script": format!("echo '{XSS}'; echo hello-from-web")}}]});
    set_value(&s, "#process-json", &hello.to_string());
    click(&s, "#new-process button");
    s.wait_text("h1", WAIT, |t| t == "Process hello").unwrap();
    let slow = json!({"name": "slow", "steps": [{"name": "nap", "plugin": "shell", "step": "run",
        "properties": {"script": "echo napping; sleep 300"}}]});
    s.goto(&format!("{base}/processes")).unwrap();
    set_value(&s, "#process-json", &slow.to_string());
    click(&s, "#new-process button");
    s.wait_text("h1", WAIT, |t| t == "Process slow").unwrap();

    s.goto(&format!("{base}/deployments")).unwrap();
    click(&s, "#process option[value='hello']");
    s.type_text(&s.find("#targets").unwrap(), "web-1").unwrap();
    click(&s, "#start-button");
    s.wait_text("h1", WAIT, |t| t.starts_with("Deployment d-"))
        .unwrap();
    s.wait_text("[data-deployment] [data-field=status]", WAIT, |t| {
        t == "succeeded"
    })
    .unwrap();
    let log = s
        .wait_text("pre[data-step-log='0']", WAIT, |t| {
            t.contains("hello-from-web")
        })
        .unwrap();
    assert!(log.contains(XSS), "the log line shows as text: {log:?}");
    assert_inert(&s, "deployment page");
    screenshot(&s, "deployment");

    // Cancel a long one while its step runs.
    s.goto(&format!("{base}/deployments")).unwrap();
    click(&s, "#process option[value='slow']");
    s.type_text(&s.find("#targets").unwrap(), "web-1").unwrap();
    click(&s, "#start-button");
    s.wait_text(
        "[data-job='0'] [data-step='0'] [data-field=step-status]",
        WAIT,
        |t| t == "running",
    )
    .unwrap();
    s.wait_text("pre[data-step-log='0']", WAIT, |t| t.contains("napping"))
        .unwrap();
    click(&s, "#cancel-button");
    s.wait_text("[data-deployment] [data-field=status]", WAIT, |t| {
        t == "cancelled"
    })
    .unwrap();
    screenshot(&s, "cancelled");

    // CSRF: the browser's own session cookie, raw HTTPS, no or a wrong token, or another
    // origin: 403 and nothing changed.
    let cookie = format!("tether_session={}", s.cookie("tether_session").unwrap());
    let agent_page = format!("/agents/{}", agent.id);
    let page = raw(&server, "GET", &agent_page, &[("Cookie", &cookie)], None);
    assert_eq!(page.status, 200);
    for (name, value) in [
        ("content-security-policy", "default-src 'self'"),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "same-origin"),
        ("strict-transport-security", "max-age=31536000"),
    ] {
        let got = page.header(name).unwrap_or_default();
        assert!(got.starts_with(value), "{name}: {got:?}");
    }
    let token = tether_tests::csrf_of(&page.body);
    let tags = format!("{agent_page}/tags");
    let form = [
        ("Cookie", cookie.as_str()),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ];
    let origin = ("Origin", base.as_str());
    let evil = ("Origin", "https://evil.example");
    let refused: [(&[(&str, &str)], String); 4] = [
        (&[form[0], form[1], origin], "tags=hacked".to_owned()),
        (
            &[form[0], form[1], origin],
            "csrf=wrong&tags=hacked".to_owned(),
        ),
        (&[form[0], form[1], origin], "csrf=&tags=hacked".to_owned()),
        (
            &[form[0], form[1], evil],
            format!("csrf={token}&tags=hacked"),
        ),
    ];
    for (headers, body) in &refused {
        let r = raw(&server, "POST", &tags, headers, Some(body));
        assert_eq!(r.status, 403, "{body}: {}", r.body);
    }
    // No session at all: to the login, nothing changed either.
    let r = raw(
        &server,
        "POST",
        &tags,
        &[form[1], origin],
        Some(&format!("csrf={token}&tags=hacked")),
    );
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/login"));
    assert_eq!(agent_json(&server, &agent.id)["tags"], json!(["web"]));
    // The same request with the token goes through (the refusals were for the token alone).
    let r = raw(
        &server,
        "POST",
        &tags,
        &[form[0], form[1], origin],
        Some(&format!("csrf={token}&tags=web+ok")),
    );
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(agent_json(&server, &agent.id)["tags"], json!(["web", "ok"]));

    // Trigger an upgrade from the agent's page.
    let up = server.request_raw(
        "PUT",
        "/api/v1/upgrades/99.0.0",
        &[],
        b"not really an agent",
    );
    assert_eq!(up.status, 201, "{}", up.body);
    s.goto(&format!("{base}{agent_page}")).unwrap();
    click(&s, "#version option[value='99.0.0']");
    click(&s, "#upgrade-button");
    s.wait_text(".notice", WAIT, |t| t == "Upgrade queued.")
        .unwrap();
    s.wait_text("#upgrade-state", WAIT, |t| t.contains("99.0.0"))
        .unwrap();
    let upgrade = eventually("the agent's upgrade state", WAIT, || {
        let a = agent_json(&server, &agent.id);
        (a["upgrade"]["version"] == "99.0.0").then_some(a)
    });
    assert!(upgrade["upgrade"]["state"].is_string(), "{upgrade}");

    // Users: creating one without the CSRF token is refused and creates nothing; from the
    // form it works (the password typed twice).
    let ops_password = "ops-1-password-long";
    let users_token =
        tether_tests::csrf_of(&raw(&server, "GET", "/users", &[("Cookie", &cookie)], None).body);
    assert_eq!(users_token, token, "one CSRF token per session");
    let r = raw(
        &server,
        "POST",
        "/users",
        &[form[0], form[1], origin],
        Some(&format!(
            "name=ops-1&password={ops_password}&confirm={ops_password}"
        )),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let names = || -> Vec<String> {
        let r = server.request("GET", "/api/v1/users", None);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(), ["admin"]);
    click(&s, "nav a[href='/users']");
    s.wait_text("h1", WAIT, |t| t == "Users").unwrap();
    assert!(
        s.find("tr[data-user='admin'] form").is_err(),
        "no delete form for oneself"
    );
    s.type_text(&s.find("#new-name").unwrap(), "ops-1").unwrap();
    s.type_text(&s.find("#new-password").unwrap(), ops_password)
        .unwrap();
    s.type_text(&s.find("#new-confirm").unwrap(), ops_password)
        .unwrap();
    // A new user is a viewer unless another role is chosen; ops-1 manages users, so: admin.
    click(&s, "#new-user select[name=role] option[value=admin]");
    click(&s, "#create-user");
    s.wait_text(".notice", WAIT, |t| t == "User created.")
        .unwrap();
    s.wait_for("tr[data-user='ops-1'] form", WAIT).unwrap();
    assert_eq!(names(), ["admin", "ops-1"]);
    assert_eq!(get_user(&server, "ops-1")["role"], "admin");
    assert!(!s.source().unwrap().contains(ops_password));
    screenshot(&s, "users");

    // Logging out ends the session server-side: the old cookie no longer works.
    click(&s, "nav form button");
    s.wait_text("h1", WAIT, |t| t == "Log in").unwrap();
    let r = raw(&server, "GET", &agent_page, &[("Cookie", &cookie)], None);
    assert_eq!(r.status, 303);

    // ops-1: a wrong password is refused; the right one logs in.
    s.type_text(&s.wait_for("#user", WAIT).unwrap(), "ops-1")
        .unwrap();
    s.type_text(&s.find("#password").unwrap(), "not-the-password")
        .unwrap();
    click(&s, "#login");
    s.wait_text("p.error", WAIT, |t| {
        t.contains("Wrong user name or password")
    })
    .unwrap();
    s.type_text(&s.wait_for("#user", WAIT).unwrap(), "ops-1")
        .unwrap();
    s.type_text(&s.find("#password").unwrap(), ops_password)
        .unwrap();
    click(&s, "#login");
    s.wait_text("h1", WAIT, |t| t == "Agents").unwrap();
    s.goto(&format!("{base}/users")).unwrap();
    s.wait_text("tr[data-user='ops-1'] [data-field=name]", WAIT, |t| {
        t == "ops-1 (you)"
    })
    .unwrap();
    assert!(s.find("tr[data-user='ops-1'] form").is_err());
    let ops_cookie = format!("tether_session={}", s.cookie("tether_session").unwrap());
    let ops_token = tether_tests::csrf_of(&s.source().unwrap());
    // Deleting oneself is refused even when posted by hand; ticking nothing deletes nothing.
    for (path, body) in [
        (
            "/users/ops-1/delete",
            format!("csrf={ops_token}&confirm=yes"),
        ),
        ("/users/admin/delete", format!("csrf={ops_token}")),
    ] {
        let r = raw(
            &server,
            "POST",
            path,
            &[("Cookie", &ops_cookie), form[1], origin],
            Some(&body),
        );
        assert!(matches!(r.status, 400 | 409), "{path}: {}", r.body);
    }
    assert_eq!(names(), ["admin", "ops-1"]);
    let last_login = get_user(&server, "ops-1")["last_login_unix_ms"].clone();
    assert!(last_login.as_u64().is_some(), "{last_login}");

    // ops-1 deletes another user from the page (confirm ticked).
    let r = server.request(
        "POST",
        "/api/v1/users",
        Some(&json!({"name": "ops-2", "password": ops_password, "role": "deployer"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    s.goto(&format!("{base}/users")).unwrap();
    click(
        &s,
        "tr[data-user='ops-2'] form.delete-user input[name=confirm]",
    );
    click(&s, "tr[data-user='ops-2'] form.delete-user button");
    s.wait_text(".notice", WAIT, |t| t.starts_with("User deleted"))
        .unwrap();
    assert_eq!(names(), ["admin", "ops-1"]);

    // Deleting ops-1 (over REST) ends its session at once.
    let r = server.request("DELETE", "/api/v1/users/ops-1", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = raw(&server, "GET", "/users", &[("Cookie", &ops_cookie)], None);
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/login"));
    drop(s);
    agent.stop();
}

fn get_user(server: &Server, name: &str) -> Value {
    let r = server.request("GET", "/api/v1/users", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no user {name}"))
}

/// The REST side of the agent changes the web application makes (no browser needed).
#[test]
fn agents_can_be_patched_and_deleted_over_rest() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let agent = Agent::install(&server, dir.path(), "db-1", &["db"]);
    let path = format!("/api/v1/agents/{}", agent.id);

    let r = server.request(
        "PATCH",
        &path,
        Some(&json!({"tags": ["db", "eu"], "properties": {"rack": "b2", "note": XSS}})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["tags"], json!(["db", "eu"]));
    let by_name = server.request("GET", "/api/v1/agents/db-1", None).json();
    assert_eq!(by_name["properties"], json!({"rack": "b2", "note": XSS}));
    let listed = server.agent(&agent.id).unwrap();
    assert_eq!(listed["properties"]["rack"], "b2");
    for bad in [
        json!({"tags": ["no spaces"]}),
        json!({"properties": {"k": "line\r\nbreak"}}),
        json!({"properties": {"bad key": "v"}}),
        json!({"colour": "red"}),
        json!({}),
    ] {
        let r = server.request("PATCH", &path, Some(&bad));
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    assert_eq!(
        server.agent(&agent.id).unwrap()["tags"],
        json!(["db", "eu"])
    );
    let anonymous = raw(&server, "PATCH", &path, &[], Some("{\"tags\":[]}"));
    assert_eq!(anonymous.status, 401);
    assert_eq!(
        server.request("GET", "/api/v1/agents/nobody", None).status,
        404
    );

    // A queued job (the agent is not running) keeps it from being deleted.
    server.put_process(
        &json!({"name": "p", "steps": [{"name": "s", "plugin": "shell",
        "step": "run", "properties": {"script": "true"}}]}),
    );
    let d = server.deploy("p", json!({"agents": ["db-1"]}), json!({}));
    let r = server.request("DELETE", &path, None);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(server.agent(&agent.id).is_some());
    // Cancelling tells the agent, which never answers (it is not running): the job stays
    // unfinished until a forced delete fails it.
    let r = server.request("POST", &format!("/api/v1/deployments/{d}/cancel"), None);
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(server.request("DELETE", &path, None).status, 409);
    let r = server.request("DELETE", &format!("{path}?force=true"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["name"], "db-1");
    assert_eq!(r.json()["failed_jobs"], 1);
    let job = &server.deployment(&d)["jobs"][0];
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["message"], "agent deleted", "{job}");
    assert_eq!(server.request("GET", &path, None).status, 404);
    assert!(server.agent(&agent.id).is_none());
    assert_eq!(server.request("DELETE", &path, None).status, 404);
}

/// Logs `s` in as admin at `base` (a page asked for first redirects to the login) and waits
/// for the agents page.
fn log_in(s: &Session<'_>, base: &str, password: &str) {
    log_in_as(s, base, "admin", password);
}

/// The same as `user`.
fn log_in_as(s: &Session<'_>, base: &str, user: &str, password: &str) {
    s.goto(&format!("{base}/agents")).unwrap();
    assert!(s.url().unwrap().ends_with("/login"), "{}", s.url().unwrap());
    s.type_text(&s.wait_for("#user", WAIT).unwrap(), user)
        .unwrap();
    s.type_text(&s.find("#password").unwrap(), password.trim())
        .unwrap();
    click(s, "#login");
    s.wait_text("h1", WAIT, |t| t == "Agents").unwrap();
}

#[test]
fn enrollment_tokens_and_relays_are_revoked_from_the_browser() {
    let dir = TestDir::new();
    let Some(driver) = driver_or_skip(&dir.path().join("chromedriver.log")) else {
        return;
    };
    let server = Server::start(dir.path());
    let password = std::fs::read_to_string(server.dir.join("admin.password")).unwrap();
    let relay =
        tether_tests::relays::Relay::start(&server, &[server.upstream()], dir.path(), "relay-w");
    let profile = dir.path().join("chromium-profile");
    let Some(s) = session_or_skip(&driver, &profile) else {
        return;
    };
    let base = format!("https://localhost:{}", server.https.port());
    log_in(&s, &base, &password);
    let tokens = || {
        server
            .request("GET", "/api/v1/enrollment-tokens", None)
            .json()
    };

    // A token made on the Tokens page is shown once, and only there.
    click(&s, "nav a[href='/tokens']");
    s.wait_text("h1", WAIT, |t| t == "Enrollment tokens")
        .unwrap();
    set_value(&s, "#token-uses", "2");
    click(&s, "#create-token");
    let shown = s.wait_for("#token-text", WAIT).unwrap();
    let token = s.text(&shown).unwrap();
    assert!(token.starts_with("tte_"), "{token}");
    let listed = tokens();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let id = listed[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(listed[0]["uses_left"], 2);
    s.goto(&format!("{base}/tokens")).unwrap();
    s.wait_for(&format!("tr[data-token='{id}']"), WAIT).unwrap();
    assert!(!s.source().unwrap().contains(&token), "shown once only");

    // Revoking without the CSRF token changes nothing; the button revokes it.
    let cookie = format!("tether_session={}", s.cookie("tether_session").unwrap());
    let form = [
        ("Cookie", cookie.as_str()),
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Origin", base.as_str()),
    ];
    let relay_id = server.request("GET", "/api/v1/relays", None).json()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for path in [
        format!("/tokens/{id}/revoke"),
        format!("/relays/{relay_id}/delete"),
    ] {
        let r = raw(&server, "POST", &path, &form, Some("confirm=yes"));
        assert_eq!(r.status, 403, "{path}: {}", r.body);
    }
    assert_eq!(tokens().as_array().unwrap().len(), 1);
    click(&s, &format!("tr[data-token='{id}'] button"));
    s.wait_text(".notice", WAIT, |t| t.starts_with("Token revoked"))
        .unwrap();
    assert_eq!(tokens(), json!([]));

    // The relay, deleted from the relays page: revoked and no longer listed.
    click(&s, "nav a[href='/relays']");
    s.wait_text("h1", WAIT, |t| t == "Relays").unwrap();
    click(&s, "form.delete-relay input[name=confirm]");
    click(&s, "form.delete-relay button");
    s.wait_text(".notice", WAIT, |t| t.starts_with("Relay deleted"))
        .unwrap();
    assert_eq!(
        server.request("GET", "/api/v1/relays", None).json(),
        json!([])
    );
    eventually("the relay refused upstream", WAIT, || {
        (relay.health()["upstream"]["state"] != "connected").then_some(())
    });
    drop(s);
}

#[test]
fn roles_shape_the_pages_in_a_browser() {
    let dir = TestDir::new();
    let Some(driver) = driver_or_skip(&dir.path().join("chromedriver.log")) else {
        return;
    };
    let server = Server::start(dir.path());
    let password = "role-browser-password";
    for (name, role) in [("viewer-1", "viewer"), ("deployer-1", "deployer")] {
        let r = server.request(
            "POST",
            "/api/v1/users",
            Some(&json!({"name": name, "password": password, "role": role})),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let profile = dir.path().join("chromium-profile");
    let Some(s) = session_or_skip(&driver, &profile) else {
        return;
    };
    let base = format!("https://localhost:{}", server.https.port());

    // A viewer: no Users, Tokens or Audit in the navigation, no form to make a process, and
    // the pages refused if asked for anyway.
    log_in_as(&s, &base, "viewer-1", password);
    assert_eq!(
        s.text(&s.find("nav [data-field=role]").unwrap()).unwrap(),
        "viewer"
    );
    for hidden in ["/users", "/tokens", "/audit"] {
        assert!(
            s.find(&format!("nav a[href='{hidden}']")).is_err(),
            "{hidden} in the nav"
        );
    }
    s.find("nav a[href='/deployments']").unwrap();
    s.goto(&format!("{base}/processes")).unwrap();
    s.wait_text("h1", WAIT, |t| t == "Processes").unwrap();
    assert!(
        s.find("#new-process").is_err(),
        "a viewer sees no process form"
    );
    s.goto(&format!("{base}/users")).unwrap();
    s.wait_text("body", WAIT, |t| {
        t.contains("your role (viewer) may not do this")
    })
    .unwrap();
    screenshot(&s, "viewer-refused");

    // A deployer: the process form; and a token made on the account page, shown once.
    s.goto(&format!("{base}/agents")).unwrap();
    click(&s, "nav form button");
    s.wait_text("h1", WAIT, |t| t == "Log in").unwrap();
    log_in_as(&s, &base, "deployer-1", password);
    s.goto(&format!("{base}/processes")).unwrap();
    s.wait_for("#new-process", WAIT).unwrap();
    assert!(s.find("nav a[href='/users']").is_err());
    s.goto(&format!("{base}/account")).unwrap();
    s.type_text(
        &s.wait_for("#new-api-token-form input[name=name]", WAIT)
            .unwrap(),
        "laptop",
    )
    .unwrap();
    click(&s, "#new-api-token-form button");
    let shown = s
        .text(&s.wait_for("#new-api-token", WAIT).unwrap())
        .unwrap();
    assert!(shown.starts_with("tether_"), "{shown}");
    let r = server.request_as(shown.trim(), "GET", "/api/v1/processes", None);
    assert_eq!(r.status, 200, "{}", r.body);
    screenshot(&s, "account-token");
}
