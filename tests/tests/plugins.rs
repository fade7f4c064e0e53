//! Uploaded plugins end to end: a bundle made here is uploaded, listed, used by a process on a
//! real agent (which fetches it once, signed, and caches it); bad bundles are refused with
//! every problem named and leave nothing stored; the agents' download route wants a signature.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::{https_request_with_body, HttpReply};

const WAIT: Duration = Duration::from_secs(60);

const MANIFEST: &str = r#"
name = "nginx"
version = "1.2.0"
description = "test plugin"
[[steps]]
name = "reload"
command = ["/bin/sh", "bin/reload.sh"]
on_interrupt = "rerun"
timeout_s = 30
  [[steps.properties]]
  name = "config"
  required = true
  [[steps.properties]]
  name = "level"
  default = "info"
  [[steps.properties]]
  name = "token"
  secret = true
  [[steps.outputs]]
  name = "pid"
"#;

const SCRIPT: &str = "echo \"reloading $TETHER_PROP_CONFIG level=$TETHER_PROP_LEVEL token=$TETHER_PROP_TOKEN\"\necho '::output pid=4242'\n";

/// A tar.gz of `files` (path, contents), executable.
fn targz(files: &[(&str, &str)]) -> Vec<u8> {
    let entries: Vec<(&str, &[u8])> = files.iter().map(|(p, d)| (*p, d.as_bytes())).collect();
    tether_tests::fixtures::tar_gz(&entries, 0o755)
}

fn client_tls(server: &Server) -> Arc<rustls::ClientConfig> {
    server.tls()
}

fn upload(server: &Server, bundle: &[u8]) -> HttpReply {
    let auth = format!("Bearer {}", server.admin_token);
    https_request_with_body(
        server.https,
        client_tls(server),
        "localhost",
        "POST",
        "/api/v1/plugins",
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/gzip"),
        ],
        Some(bundle),
    )
    .unwrap()
}

fn plugins(server: &Server) -> Vec<Value> {
    let r = server.request("GET", "/api/v1/plugins", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json().as_array().unwrap().clone()
}

fn stored_bundles(server: &Server) -> Vec<String> {
    match std::fs::read_dir(server.dir.join("plugins")) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn an_uploaded_plugin_runs_on_an_agent_and_is_fetched_once() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let mut agent = Agent::install(&server, tmp.path(), "web-1", &["web"]);
    agent.run();

    // Bad bundles first: each is refused with every problem named, and nothing is stored.
    let bad_manifest = targz(&[(
        "plugin.toml",
        "name = \"bad name\"\nversion = \"x\"\n[[steps]]\nname = \"a\"\ncommand = [\"../out.sh\"]\n  [[steps.properties]]\n  name = \"p\"\n  required = true\n  default = \"d\"\n",
    )]);
    let r = upload(&server, &bad_manifest);
    assert_eq!(r.status, 400, "{}", r.body);
    let problems = r.json()["problems"].as_array().unwrap().clone();
    let all = r.body.clone();
    for needle in [
        "plugin name",
        "version \\\"x\\\"",
        "'..'",
        "required property has no default",
    ] {
        assert!(all.contains(needle), "{needle} not in {all}");
    }
    assert!(problems.len() >= 4, "{all}");

    let r = upload(&server, b"this is not a tar.gz");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("not a tar.gz"), "{}", r.body);

    let r = upload(&server, &targz(&[("plugin.toml", MANIFEST)]));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body
            .contains("command file \\\"bin/reload.sh\\\" is not in the bundle"),
        "{}",
        r.body
    );
    let r = upload(&server, &targz(&[("bin/reload.sh", SCRIPT)]));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("no plugin.toml"), "{}", r.body);
    assert!(plugins(&server).is_empty());
    assert!(
        stored_bundles(&server).is_empty(),
        "{:?}",
        stored_bundles(&server)
    );

    // A good one: stored, listed, idempotent; the same version with other content conflicts.
    let good = targz(&[("plugin.toml", MANIFEST), ("bin/reload.sh", SCRIPT)]);
    let r = upload(&server, &good);
    assert_eq!(r.status, 201, "{}", r.body);
    let sha = r.json()["sha256"].as_str().unwrap().to_owned();
    assert_eq!(upload(&server, &good).status, 200);
    let other = targz(&[("plugin.toml", MANIFEST), ("bin/reload.sh", "echo other\n")]);
    assert_eq!(upload(&server, &other).status, 409);
    let list = plugins(&server);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["name"], "nginx");
    assert_eq!(list[0]["version"], "1.2.0");
    assert_eq!(list[0]["sha256"], sha.as_str());
    assert_eq!(list[0]["steps"][0]["name"], "reload");
    assert_eq!(stored_bundles(&server), [format!("{sha}.tar.gz")]);

    // The agents' route wants a valid agent signature.
    let path = format!("/agent/v1/plugins/{sha}");
    let r = https_request_with_body(
        server.wss,
        client_tls(&server),
        "localhost",
        "GET",
        &path,
        &[],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    let forged = tether_shared::identity::Identity::generate();
    let signed =
        tether_shared::agent_auth::sign_request(&forged, &agent.id, "GET", &path, now_ms());
    let headers: Vec<(&str, &str)> = signed.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = https_request_with_body(
        server.wss,
        client_tls(&server),
        "localhost",
        "GET",
        &path,
        &headers,
        None,
    )
    .unwrap();
    assert_eq!(r.status, 401, "a forged signature: {}", r.body);

    // Validation follows the manifest.
    let r = server.request(
        "POST",
        "/api/v1/processes",
        Some(&json!({"name": "broken", "steps": [
            {"name": "r", "plugin": "nginx", "step": "reload", "properties": {"colour": "red"}}]})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("missing required property") && r.body.contains("unknown property"),
        "{}",
        r.body
    );

    server.put_process(&json!({"name": "reload-web", "steps": [
        {"name": "reload", "plugin": "nginx", "step": "reload",
         "properties": {"config": "${conf}", "token": "${api_token_secret}"}}]}));
    eventually("agent online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    for round in 0..2 {
        let id = server.deploy(
            "reload-web",
            json!({"agents": ["web-1"]}),
            json!({"conf": "/etc/nginx/site.conf", "api_token_secret": "t0ps3cret"}),
        );
        let d = server.wait_deployment(&id, WAIT);
        assert_eq!(d["status"], "succeeded", "round {round}: {d}");
        let step = &d["jobs"][0]["steps"][0];
        assert_eq!(step["outputs"]["pid"], "4242", "{d}");
        let log = server.step_log(&id, "web-1", "reload");
        assert!(
            log.contains("reloading /etc/nginx/site.conf level=info token=***"),
            "{log}"
        );
        assert!(!log.contains("t0ps3cret"), "the secret leaked: {log}");
        // Fetched once, by the first deployment; the second used the agent's cache.
        assert_eq!(plugins(&server)[0]["downloads"], 1, "round {round}");
    }
    assert!(agent
        .dir
        .join("plugins")
        .join(&sha)
        .join("bin/reload.sh")
        .is_file());
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
