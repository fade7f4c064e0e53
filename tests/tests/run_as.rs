//! Steps run as another user, end to end: a real agent (root) allowed one user by its
//! `agent.toml` runs a shell step and a file step as that user (the files they make are that
//! user's), refuses a user it does not list (nothing runs), and a deployment naming a user of
//! bad shape is refused by the server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};

const WAIT: Duration = Duration::from_secs(60);

/// A system user made for the test and removed after it, with a directory of its own under
/// `/var/tmp` (the test directory is 0700 root: the user could not reach into it).
struct TestUser {
    name: String,
    uid: u32,
    dir: PathBuf,
}

impl TestUser {
    fn create() -> TestUser {
        let name = format!("tether-ra{}", std::process::id() % 100_000);
        let _ = Command::new("userdel").arg(&name).output();
        let made = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(&name)
            .output()
            .unwrap();
        assert!(made.status.success(), "useradd: {made:?}");
        let id = Command::new("id").args(["-u", &name]).output().unwrap();
        let uid: u32 = String::from_utf8_lossy(&id.stdout).trim().parse().unwrap();
        let dir = PathBuf::from(format!("/var/tmp/{name}-test"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("own")).unwrap();
        std::os::unix::fs::chown(dir.join("own"), Some(uid), None).unwrap();
        TestUser { name, uid, dir }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

fn final_deployment(server: &Server, id: &str) -> Value {
    eventually("a final deployment", WAIT, || {
        let d = server
            .request("GET", &format!("/api/v1/deployments/{id}"), None)
            .json();
        matches!(d["status"].as_str(), Some("succeeded" | "failed")).then_some(d)
    })
}

fn process(server: &Server, name: &str, steps: Value) {
    let r = server.request(
        "POST",
        "/api/v1/processes",
        Some(&json!({"name": name, "steps": steps})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

fn deploy(server: &Server, process: &str) -> Value {
    let id = server.start_deployment(&json!({"process": process, "targets": {"agents": ["ra-1"]}}));
    final_deployment(server, &id)
}

#[test]
fn a_step_runs_as_an_allowed_user_and_a_user_not_allowed_runs_nothing() {
    let user = TestUser::create();
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let steps_dir = user.dir.join("steps");
    let mut agent = Agent::install_with(
        &server,
        tmp.path(),
        "ra-1",
        &[],
        &[
            ("TETHER_AGENT__RUN_AS_USERS", user.name.as_str()),
            ("TETHER_AGENT__RUN_AS_DIR", steps_dir.to_str().unwrap()),
        ],
    );
    agent.run();
    eventually("online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    let own = user.dir.join("own");
    let by_shell = own.join("by-shell");
    let by_file = own.join("by-file");
    process(
        &server,
        "as-user",
        json!([
            {"name": "shell", "plugin": "shell", "step": "run", "properties": {
                "script": format!("id -un; echo \"home=$HOME\"; touch {}", by_shell.display()),
                "run_as": user.name}},
            {"name": "file", "plugin": "file", "step": "write", "properties": {
                "path": by_file.to_str().unwrap(), "content": "written as the user\n",
                "mode": "0600", "run_as": user.name}},
        ]),
    );
    let d = deploy(&server, "as-user");
    assert_eq!(d["status"], "succeeded", "{d}");
    for f in [&by_shell, &by_file] {
        let meta = std::fs::metadata(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert_eq!(meta.uid(), user.uid, "{} is not the user's", f.display());
    }
    assert_eq!(
        std::fs::read_to_string(&by_file).unwrap(),
        "written as the user\n"
    );
    let id = d["id"].as_str().unwrap();
    let log = server
        .request(
            "GET",
            &format!("/api/v1/deployments/{id}/jobs/ra-1/steps/shell/log"),
            None,
        )
        .body;
    assert!(log.starts_with(&format!("{}\n", user.name)), "{log}");

    // Its rights, not root's: a file where only root may write is refused, nothing written.
    let forbidden = user.dir.join("root-only");
    process(
        &server,
        "as-user-forbidden",
        json!([{"name": "file", "plugin": "file", "step": "write", "properties": {
            "path": forbidden.to_str().unwrap(), "content": "x", "run_as": user.name}}]),
    );
    let d = deploy(&server, "as-user-forbidden");
    assert_eq!(d["status"], "failed", "{d}");
    assert!(!forbidden.exists());

    // A user the agent does not list: the step fails saying so and runs nothing.
    let canary = user.dir.join("canary");
    process(
        &server,
        "as-nobody",
        json!([{"name": "shell", "plugin": "shell", "step": "run", "properties": {
            "script": format!("touch {}", canary.display()), "run_as": "nobody"}}]),
    );
    let d = deploy(&server, "as-nobody");
    assert_eq!(d["status"], "failed", "{d}");
    let message =
        d["jobs"][0]["steps"][0]["message"].to_string() + &d["jobs"][0]["message"].to_string();
    assert!(
        message.contains("may not run steps as \\\"nobody\\\""),
        "{d}"
    );
    assert!(!canary.exists(), "a refused step ran");

    // The server refuses a user of bad shape, and run_as on a step that cannot honour it.
    for (step, says) in [
        (
            json!({"name": "s", "plugin": "shell", "step": "run",
                "properties": {"script": "true", "run_as": "root; rm -rf /"}}),
            "is not user",
        ),
        (
            json!({"name": "s", "plugin": "http", "step": "request",
                "properties": {"url": "https://example.invalid/", "run_as": "nobody"}}),
            "applies to",
        ),
    ] {
        let r = server.request(
            "POST",
            "/api/v1/processes",
            Some(&json!({"name": "bad-run-as", "steps": [step]})),
        );
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains(says), "{}", r.body);
    }
    agent.stop();
}
