//! The `tether` CLI against a real server (and agent): login and where the token comes
//! from, every command with `--json` parsed and compared with the server's own REST answer,
//! the exit codes (0 ok, 1 failure, 2 usage or not logged in, 3 cancelled), deployments
//! streamed to their end, cancelled from another process or abandoned with Ctrl-C, and
//! uploads whose sha256 the server checks.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::tether_cli::{server_url, Tether};
use tether_tests::{stderr, stdout, ChildGuard};

const WAIT: Duration = Duration::from_secs(60);

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn get(server: &Server, path: &str) -> Value {
    let r = server.request("GET", path, None);
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.json()
}

#[test]
fn login_stores_the_token_privately_and_the_environment_overrides_it() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let cli = Tether::new(&dir.path().join("cli"));
    let url = server_url(&server);
    let ca = server.operator_ca_path();
    let ca = ca.to_str().unwrap();

    // Not logged in, and usage errors: 2.
    let out = cli.run(&["agents"]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("tether login"), "{}", stderr(&out));
    assert_eq!(code(&cli.run(&["no-such-command"])), Some(2));
    assert_eq!(
        code(&cli.run(&["tokens", "create", "--uses", "0"])),
        Some(2)
    );
    assert_eq!(code(&cli.run(&["login", "--ca", ca])), Some(2));

    // A wrong token (from standard input) is refused and nothing is stored.
    let out = cli.run_with(
        &[],
        Some("not-the-token\n"),
        &["login", "--server", &url, "--ca", ca],
    );
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refused the token"),
        "{}",
        stderr(&out)
    );
    assert!(!cli.login_file().exists());

    // A CA that did not sign the server's certificate: the TLS failure in words.
    let other_ca = tether_shared::tls::Ca::generate("another CA").unwrap();
    let other_ca_path = dir.path().join("other-ca.pem");
    fs::write(&other_ca_path, other_ca.cert_pem()).unwrap();
    let out = cli.run(&[
        "login",
        "--server",
        &url,
        "--ca",
        other_ca_path.to_str().unwrap(),
        "--token",
        &server.admin_token,
    ]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("untrusted issuer"),
        "{}",
        stderr(&out)
    );
    assert!(!cli.login_file().exists());

    // The right token, from standard input: stored 0600 in a 0700 directory.
    let out = cli.run_with(
        &[],
        Some(&format!("{}\n", server.admin_token)),
        &["login", "--server", &url, "--ca", ca],
    );
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cli.login_file()), 0o600);
    assert_eq!(mode(cli.login_file().parent().unwrap()), 0o700);
    let stored: Value = serde_json::from_slice(&fs::read(cli.login_file()).unwrap()).unwrap();
    assert_eq!(stored["token"], server.admin_token.as_str());
    assert_eq!(stored["server"], url.as_str());
    assert_eq!(
        stored["ca_pem"].as_str().unwrap(),
        fs::read_to_string(ca).unwrap()
    );

    assert_eq!(cli.json(&["agents"]), get(&server, "/api/v1/agents"));
    let settings = cli.run(&["--check-config"]);
    assert_eq!(code(&settings), Some(0), "{}", stderr(&settings));
    assert!(!stdout(&settings).contains(&server.admin_token));

    // TETHER_TOKEN wins over the stored token.
    let out = cli.run_with(&[("TETHER_TOKEN", "wrong")], None, &["agents"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("HTTP 401"), "{}", stderr(&out));

    // With no login file at all, the environment is enough.
    let bare = Tether::new(&dir.path().join("bare"));
    let env = [
        ("TETHER_SERVER", url.as_str()),
        ("TETHER_CA", ca),
        ("TETHER_TOKEN", server.admin_token.as_str()),
    ];
    let out = bare.run_with(&env, None, &["relays", "--json"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let relays: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(relays, get(&server, "/api/v1/relays"));
    assert!(!bare.login_file().exists());

    // Health: the same actors and sessions as the server reports.
    let health = cli.json(&["health"]);
    let server_health = get(&server, "/admin/health");
    let names = |h: &Value| -> Vec<String> {
        let mut names: Vec<String> = h["actors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&health), names(&server_health));
    assert_eq!(health["sessions"], server_health["sessions"]);
    assert!(health["journal"]["commits"].is_u64(), "{health}");
    let out = cli.run(&["health"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("journal"), "{}", stdout(&out));

    // Tokens: the JSON answer, and the bare token in text mode.
    let created = cli.json(&["tokens", "create", "--uses", "2", "--role", "relay"]);
    assert!(
        created["token"].as_str().unwrap().starts_with("tte_"),
        "{created}"
    );
    assert_eq!(created["role"], "relay");
    assert_eq!(created["uses"], 2);
    let out = cli.run(&["tokens", "create", "--ttl", "60"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let token = stdout(&out);
    assert!(
        token.starts_with("tte_") && token.trim().lines().count() == 1,
        "{token}"
    );

    // Logout forgets it.
    let out = cli.run(&["logout"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(!cli.login_file().exists());
    assert_eq!(code(&cli.run(&["agents"])), Some(2));
}

/// Writes `process` to a file and creates it with `tether processes create -f`.
fn create_process(cli: &Tether, dir: &Path, process: &Value) {
    let file = dir.join(format!("{}.json", process["name"].as_str().unwrap()));
    fs::write(&file, process.to_string()).unwrap();
    let out = cli.run(&["processes", "create", "-f", file.to_str().unwrap()]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
}

fn shell_process(name: &str, steps: &[(&str, &str)]) -> Value {
    json!({"name": name, "steps": steps.iter().map(|(step, script)| json!({
        "name": step, "plugin": "shell", "step": "run", "properties": {"script": script}
    })).collect::<Vec<_>>()})
}

/// The id of the one deployment not in `known`, once it exists.
fn new_deployment(server: &Server, known: &mut Vec<String>) -> String {
    let id = eventually("a new deployment", WAIT, || {
        get(server, "/api/v1/deployments")
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .find(|id| !known.contains(id))
    });
    known.push(id.clone());
    id
}

fn wait_step_running(server: &Server, id: &str) {
    eventually("the step to run", WAIT, || {
        (server.deployment(id)["jobs"][0]["steps"][0]["status"] == "running").then_some(())
    });
}

#[test]
fn deploy_streams_the_logs_and_exits_by_the_outcome() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let mut agent = Agent::install(&server, dir.path(), "web-1", &["web"]);
    agent.run();
    let cli = Tether::new(&dir.path().join("cli"));
    cli.login(&server);

    let listed = eventually("web-1 online through the CLI", WAIT, || {
        let agents = cli.json(&["agents", "list"]);
        (agents[0]["status"] == "online").then_some(agents)
    });
    let from_server = get(&server, "/api/v1/agents");
    let ids = |v: &Value| -> Vec<(Value, Value, Value)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|a| (a["id"].clone(), a["name"].clone(), a["tags"].clone()))
            .collect()
    };
    assert_eq!(ids(&listed), ids(&from_server));
    let shown = cli.json(&["agents", "show", "web-1"]);
    assert_eq!(shown["id"], agent.id.as_str());
    assert_eq!(cli.json(&["agents", "show", &agent.id])["name"], "web-1");
    let out = cli.run(&["agents", "show", "nobody"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    let out = cli.run(&["agents"]);
    assert!(stdout(&out).contains("web-1"), "{}", stdout(&out));

    let work = dir.path().join("processes");
    fs::create_dir_all(&work).unwrap();
    create_process(
        &cli,
        &work,
        &json!({"name": "hello", "steps": [{"name": "say", "plugin": "shell", "step": "run",
            "properties": {"script": "echo \"hello from $TETHER_PROP_WHO\"; echo second line",
                           "who": "${who}"}}]}),
    );
    create_process(
        &cli,
        &work,
        &shell_process(
            "broken",
            &[("try", "echo trying; exit 3"), ("after", "echo never")],
        ),
    );
    create_process(
        &cli,
        &work,
        &shell_process("slow", &[("nap", "echo napping; sleep 120")]),
    );
    assert_eq!(
        cli.json(&["processes", "list"]),
        get(&server, "/api/v1/processes")
    );
    assert_eq!(
        cli.json(&["processes", "show", "hello"]),
        get(&server, "/api/v1/processes/hello")
    );
    let out = cli.run(&["processes", "show", "nope"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));

    // Success: the log on stdout, prefixed, and exit 0.
    let mut known = Vec::new();
    let out = cli.run(&[
        "deploy",
        "hello",
        "--agent",
        "web-1",
        "--prop",
        "who=tether",
    ]);
    assert_eq!(code(&out), Some(0), "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("[web-1/say] hello from tether\n"), "{text}");
    assert!(text.contains("[web-1/say] second line\n"), "{text}");
    assert_eq!(text.matches("hello from tether").count(), 1, "{text}");
    assert!(text.contains(" succeeded\n"), "{text}");
    let id = new_deployment(&server, &mut known);
    assert_eq!(
        cli.json(&["deployments", "show", &id]),
        server.deployment(&id)
    );
    let listed = cli.json(&["deployments", "list"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["id"] == id.as_str()),
        "{listed}"
    );
    let out = cli.run(&["logs", &id, "web-1", "say"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), server.step_log(&id, "web-1", "say"));
    assert_eq!(
        cli.json(&["logs", &id, "web-1", "say"])["log"],
        server.step_log(&id, "web-1", "say").as_str()
    );

    // With --json the final deployment goes to stdout, the logs to stderr.
    let out = cli.run(&[
        "deploy", "hello", "--tag", "web", "--prop", "who=json", "--json",
    ]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let final_state: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(final_state["status"], "succeeded");
    let id = new_deployment(&server, &mut known);
    assert_eq!(final_state["id"], id.as_str());
    assert!(
        stderr(&out).contains("[web-1/say] hello from json"),
        "{}",
        stderr(&out)
    );

    // A failing step: exit 1, its exit code shown, the next step skipped.
    let out = cli.run(&["deploy", "broken", "--tag", "web"]);
    assert_eq!(code(&out), Some(1), "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("[web-1/try] trying\n"), "{text}");
    assert!(text.contains("[web-1/try] failed (exit 3)"), "{text}");
    assert!(text.contains("[web-1/after] skipped"), "{text}");
    new_deployment(&server, &mut known);

    // An unknown agent: refused by the server, exit 1, nothing created.
    let out = cli.run(&["deploy", "hello", "--agent", "nobody", "--prop", "who=x"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("unknown agents"), "{}", stderr(&out));
    assert_eq!(code(&cli.run(&["deploy", "hello"])), Some(2));
    assert_eq!(
        code(&cli.run(&["deploy", "hello", "--agent", "a", "--tag", "t"])),
        Some(2)
    );

    // Cancelled from another process while one waits: the waiting one exits 3.
    let log_path = dir.path().join("deploy-cancelled.out");
    let mut cmd = cli.command(&["deploy", "slow", "--agent", "web-1"]);
    cmd.stdout(fs::File::create(&log_path).unwrap())
        .stderr(Stdio::null());
    let mut waiting = ChildGuard::spawn("tether deploy", &mut cmd);
    let id = new_deployment(&server, &mut known);
    wait_step_running(&server, &id);
    let cancel = cli.json(&["deployments", "cancel", &id]);
    assert_eq!(cancel["id"], id.as_str());
    let status = waiting.wait_exit(WAIT).expect("the waiting deploy to end");
    assert_eq!(status.code(), Some(3), "{status}");
    let text = fs::read_to_string(&log_path).unwrap();
    assert!(text.contains("[web-1/nap] napping\n"), "{text}");
    assert!(
        text.contains(&format!("deployment {id} cancelled")),
        "{text}"
    );

    // --no-wait prints the id alone; `deployments wait` follows it to its end.
    let out = cli.run(&["deploy", "slow", "--agent", "web-1", "--no-wait"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let id = stdout(&out).trim().to_owned();
    assert_eq!(id, new_deployment(&server, &mut known));
    wait_step_running(&server, &id);
    let out = cli.run(&["deployments", "cancel", &id]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let out = cli.run(&["deployments", "wait", &id]);
    assert_eq!(code(&out), Some(3), "{}", stderr(&out));
    let shown = cli.json(&["deployments", "show", &id]);
    assert_eq!(shown["status"], "cancelled");
    assert_eq!(shown, server.deployment(&id));

    // Ctrl-C stops waiting, not the deployment.
    let mut cmd = cli.command(&["deploy", "slow", "--agent", "web-1"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut waiting = ChildGuard::spawn("tether deploy", &mut cmd);
    let id = new_deployment(&server, &mut known);
    wait_step_running(&server, &id);
    waiting.signal("INT");
    let status = waiting.wait_exit(WAIT).expect("tether deploy to stop");
    assert!(!status.success(), "{status}");
    assert_eq!(server.deployment(&id)["status"], "running");
    assert_eq!(code(&cli.run(&["deployments", "cancel", &id])), Some(0));
    assert_eq!(server.wait_deployment(&id, WAIT)["status"], "cancelled");
}

#[test]
fn uploads_send_their_sha256_and_lists_show_it() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let cli = Tether::new(&dir.path().join("cli"));
    cli.login(&server);

    // An artifact of a few pieces: the server checks the announced sha256 and stores it.
    let content: String = (0..40_000).map(|i| format!("line {i}\n")).collect();
    let file = dir.path().join("site-1.2.txt");
    fs::write(&file, &content).unwrap();
    let sha256 = hex::encode(Sha256::digest(content.as_bytes()));
    let file = file.to_str().unwrap();
    let answer = cli.json(&["artifacts", "upload", "site", "1.2", file]);
    assert_eq!(answer["sha256"], sha256.as_str(), "{answer}");
    assert_eq!(answer["size"], content.len());
    let listed = cli.json(&["artifacts", "list"]);
    assert_eq!(listed, get(&server, "/api/v1/artifacts"));
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "site" && a["sha256"] == sha256.as_str()),
        "{listed}"
    );
    let out = cli.run(&["artifacts", "list"]);
    assert!(stdout(&out).contains(&sha256), "{}", stdout(&out));
    let stored = server.request("GET", "/api/v1/artifacts/site/1.2", None);
    assert_eq!(stored.status, 200);
    assert!(stored.body == content, "the stored artifact differs");
    // The same again is fine; other content under the same version is refused.
    assert_eq!(
        cli.json(&["artifacts", "upload", "site", "1.2", file])["sha256"],
        sha256.as_str()
    );
    let other = dir.path().join("other.txt");
    fs::write(&other, "other content").unwrap();
    let out = cli.run(&[
        "artifacts",
        "upload",
        "site",
        "1.2",
        other.to_str().unwrap(),
    ]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("HTTP 409"), "{}", stderr(&out));
    let out = cli.run(&["artifacts", "upload", "site", "1.3", "/nonexistent/file"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));

    // A plugin bundle.
    let manifest = "name = \"greeter\"\nversion = \"1.0.0\"\n[[steps]]\nname = \"greet\"\ncommand = [\"/bin/sh\", \"greet.sh\"]\n";
    let bundle = tether_tests::fixtures::tar_gz(
        &[
            ("plugin.toml", manifest.as_bytes()),
            ("greet.sh", b"echo hello\n"),
        ],
        0o755,
    );
    let bundle_path = dir.path().join("greeter.tar.gz");
    fs::write(&bundle_path, &bundle).unwrap();
    let answer = cli.json(&["plugins", "upload", bundle_path.to_str().unwrap()]);
    assert_eq!(answer["name"], "greeter");
    assert_eq!(
        answer["sha256"],
        hex::encode(Sha256::digest(&bundle)).as_str()
    );
    assert_eq!(
        cli.json(&["plugins", "list"]),
        get(&server, "/api/v1/plugins")
    );
    let out = cli.run(&["plugins", "list"]);
    assert!(stdout(&out).contains("greeter"), "{}", stdout(&out));
    let not_a_bundle = dir.path().join("not-a-bundle");
    fs::write(&not_a_bundle, "plain text").unwrap();
    let out = cli.run(&["plugins", "upload", not_a_bundle.to_str().unwrap()]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("invalid plugin bundle"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn upgrades_are_uploaded_listed_and_rolled_out_from_the_cli() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let mut agent = Agent::install_with(
        &server,
        tmp.path(),
        "up-1",
        &["fleet"],
        &[
            ("TETHER_AGENT__WORKER_BEAT_TIMEOUT_MS", "3000"),
            ("TETHER_AGENT__UPGRADE_HEALTHY_AFTER_MS", "2000"),
        ],
    );
    agent.run();
    eventually("agent online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    let cli = Tether::new(&tmp.path().join("cli"));
    cli.login(&server);
    let binary = tether_tests::bin("tether-agent");
    let uploaded = cli.json(&["upgrades", "upload", "99.0.0", binary.to_str().unwrap()]);
    let listed = cli.json(&["upgrades", "list"]);
    assert_eq!(listed, get(&server, "/api/v1/upgrades"));
    assert_eq!(listed[0]["sha256"], uploaded["sha256"], "{listed}");
    // Usage: a rollout needs targets.
    assert_eq!(code(&cli.run(&["upgrades", "rollout", "99.0.0"])), Some(2));
    let out = cli.run(&["upgrades", "rollout", "99.0.0", "--tag", "fleet", "--wait"]);
    assert_eq!(code(&out), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("done"), "{}", stdout(&out));
    let a = server.agent(&agent.id).unwrap();
    assert_eq!(a["version"], "99.0.0", "{a}");
    // An older package is refused by the agent: exit 1 with the reason.
    cli.json(&["upgrades", "upload", "0.0.1", binary.to_str().unwrap()]);
    let out = cli.run(&["upgrades", "rollout", "0.0.1", "--agent", "up-1", "--wait"]);
    assert_eq!(code(&out), Some(1), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("refused"), "{}", stdout(&out));
}

/// Users of the web application over REST and from the CLI: list, create (password from
/// standard input, never echoed back), the rules (400), an existing name and the last user
/// (409), delete; the exit codes and the `--json` answers.
#[test]
fn users_are_managed_over_rest_and_from_the_cli() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let cli = Tether::new(&dir.path().join("cli"));
    cli.login(&server);
    let password = "correct-horse-42";

    // REST: the initial admin only; no hash or password in the answer.
    let listed = get(&server, "/api/v1/users");
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["name"], "admin");
    assert!(!listed.to_string().contains("argon2"), "{listed}");
    let anonymous = tether_tests::https_request_with_body(
        server.https,
        server.tls(),
        "localhost",
        "GET",
        "/api/v1/users",
        &[],
        None,
    )
    .unwrap();
    assert_eq!(anonymous.status, 401);
    for (body, status) in [
        (json!({"name": "bad name", "password": password}), 400),
        (json!({"name": "ops-2", "password": "too-short"}), 400),
        (json!({"name": "ops-2"}), 400),
        (json!({"name": "ops-2", "password": 12}), 400),
        (json!({"name": "admin", "password": password}), 409),
    ] {
        let r = server.request("POST", "/api/v1/users", Some(&body));
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert!(!r.body.contains(password), "{}", r.body);
    }
    for (body, status) in [
        (
            json!({"name": "ops-2", "password": password, "role": "root"}),
            400,
        ),
        (
            json!({"name": "ops-2", "password": password, "role": 1}),
            400,
        ),
    ] {
        let r = server.request("POST", "/api/v1/users", Some(&body));
        assert_eq!(r.status, status, "{body}: {}", r.body);
    }
    let r = server.request(
        "POST",
        "/api/v1/users",
        Some(&json!({"name": "ops-2", "password": password, "role": "admin"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["name"], "ops-2");
    assert_eq!(r.json()["role"], "admin");
    assert!(!r.body.contains(password), "{}", r.body);

    // CLI: list (--json is the REST answer), create from standard input, 409 → exit 1.
    assert_eq!(cli.json(&["users"]), get(&server, "/api/v1/users"));
    let out = cli.run(&["users", "list"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("ops-2"), "{}", stdout(&out));
    let out = cli.run_with(
        &[],
        Some(&format!("{password}\n")),
        &["users", "create", "ops-3", "--json"],
    );
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["name"], "ops-3");
    assert_eq!(
        created["role"], "viewer",
        "a new user is a viewer by default"
    );
    // Roles: given from the CLI (PATCH over REST), shown in the list; bad ones refused.
    let out = cli.run(&["users", "role", "ops-3", "deployer"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let out = cli.run(&["users", "list"]);
    let row = stdout(&out)
        .lines()
        .find(|l| l.starts_with("ops-3"))
        .unwrap_or_default()
        .to_owned();
    assert!(row.contains("deployer"), "{}", stdout(&out));
    let out = cli.run(&["users", "role", "ops-3", "root"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("viewer, deployer or admin"),
        "{}",
        stderr(&out)
    );
    let r = server.request(
        "PATCH",
        "/api/v1/users/nobody",
        Some(&json!({"role": "admin"})),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(created["created_unix_ms"].as_u64().unwrap() > 0);
    let out = cli.run_with(
        &[],
        Some(&format!("{password}\n")),
        &["users", "create", "ops-3"],
    );
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("409"), "{}", stderr(&out));
    assert!(!stderr(&out).contains(password), "{}", stderr(&out));
    let out = cli.run_with(&[], Some("short\n"), &["users", "create", "ops-4"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("12 characters"), "{}", stderr(&out));
    assert_eq!(code(&cli.run(&["users", "create", "ops-4"])), Some(2));
    assert_eq!(code(&cli.run(&["users", "create"])), Some(2));
    let names = |v: Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        names(get(&server, "/api/v1/users")),
        ["admin", "ops-2", "ops-3"]
    );

    // Delete: over the CLI, then REST; unknown → 404, the last user → 409.
    let deleted = cli.json(&["users", "delete", "ops-3"]);
    assert_eq!(deleted, json!({"name": "ops-3", "deleted": true}));
    let out = cli.run(&["users", "delete", "ops-3"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("404"), "{}", stderr(&out));
    assert_eq!(
        server.request("DELETE", "/api/v1/users/admin", None).status,
        200
    );
    let r = server.request("DELETE", "/api/v1/users/ops-2", None);
    assert_eq!(r.status, 409, "{}", r.body);
    let out = cli.run(&["users", "delete", "ops-2"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("last user"), "{}", stderr(&out));
    assert_eq!(names(get(&server, "/api/v1/users")), ["ops-2"]);
}

/// Relay packages from the CLI: `upgrades upload --component relay`, listed with their
/// component, and `upgrades rollout --relay NAME --wait` (an older version: refused, exit 1).
#[test]
fn relay_upgrades_are_uploaded_and_rolled_out_from_the_cli() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let relay =
        tether_tests::relays::Relay::start(&server, &[server.upstream()], tmp.path(), "edge-1");
    eventually("relay online", WAIT, || {
        tether_tests::relays::relay_entry(&server, &relay.name).filter(|r| r["status"] == "online")
    });
    let cli = Tether::new(&tmp.path().join("cli"));
    cli.login(&server);
    let package = tmp.path().join("old-relay");
    fs::write(&package, "#!/bin/sh\nexit 3\n").unwrap();
    let file = package.to_str().unwrap();
    let uploaded = cli.json(&["upgrades", "upload", "0.0.1", file, "--component", "relay"]);
    assert_eq!(uploaded["component"], "relay", "{uploaded}");
    let listed = cli.json(&["upgrades", "list"]);
    assert_eq!(listed[0]["component"], "relay", "{listed}");
    // Usage: relays and agents are not rolled out together.
    let out = cli.run(&[
        "upgrades", "rollout", "0.0.1", "--relay", "edge-1", "--agent", "x",
    ]);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    let out = cli.run(&[
        "upgrades", "rollout", "0.0.1", "--relay", "edge-1", "--wait",
    ]);
    assert_eq!(code(&out), Some(1), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("refused"), "{}", stdout(&out));
    assert!(stdout(&out).contains("RELAY"), "{}", stdout(&out));
}
