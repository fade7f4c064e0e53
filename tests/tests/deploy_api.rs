//! The deployments REST API's validation, against a real `tether-server`: good and bad
//! processes, deployments to unknown targets, and nothing stored for a rejected request (also
//! after a restart).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use serde_json::{json, Value};
use tether_tests::fleet::{Server, TestDir};

fn post(server: &Server, path: &str, body: &Value) -> (u16, String) {
    let r = server.request("POST", path, Some(body));
    (r.status, r.body)
}

#[test]
fn processes_and_deployments_are_validated_and_rejections_leave_nothing() {
    let tmp = TestDir::new();
    let mut server = Server::start(tmp.path());

    server.put_process(&json!({
        "name": "web-app",
        "steps": [
            {"name": "conf", "plugin": "file", "step": "write",
             "properties": {"path": "/tmp/${app}.conf", "content": "x", "mode": "0600"}},
            {"name": "start", "plugin": "shell", "step": "run",
             "properties": {"script": "echo ${app}"}, "timeout_s": 30},
        ]
    }));
    let p = server
        .request("GET", "/api/v1/processes/web-app", None)
        .json();
    assert_eq!(p["version"], 1, "{p}");
    assert_eq!(p["steps"][0]["on_interrupt"], "rerun", "{p}");
    assert_eq!(p["steps"][1]["on_interrupt"], "fail", "{p}");
    assert_eq!(p["steps"][1]["timeout_s"], 30, "{p}");

    // Every problem of a bad process at once; nothing stored.
    let (status, body) = post(
        &server,
        "/api/v1/processes",
        &json!({
            "name": "bad",
            "steps": [
                {"name": "s", "plugin": "shell", "step": "run", "properties": {"scrpt": "x"}},
                {"name": "s", "plugin": "nope", "step": "run"},
                {"name": "d", "plugin": "file", "step": "delete", "properties": {"path": "/x", "force": "yes"}},
            ]
        }),
    );
    assert_eq!(status, 400, "{body}");
    for needle in [
        "missing required property \\\"script\\\"",
        "unknown property \\\"force\\\"",
        "unique",
        "nope/run",
    ] {
        assert!(body.contains(needle), "{needle} not in {body}");
    }
    // Unknown fields are refused.
    let (status, body) = post(
        &server,
        "/api/v1/processes",
        &json!({"name": "x", "steps": [], "extra": 1}),
    );
    assert_eq!(status, 400, "{body}");
    let list = server.request("GET", "/api/v1/processes", None).json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(
        server.request("GET", "/api/v1/processes/bad", None).status,
        404
    );

    // Deployments: unknown agent, no matching tag, unknown process, unknown placeholder.
    let deploy = |targets: Value, process: &str, props: Value| {
        post(
            &server,
            "/api/v1/deployments",
            &json!({"process": process, "targets": targets, "properties": props}),
        )
    };
    let (status, body) = deploy(json!({"agents": ["ghost"]}), "web-app", json!({"app": "a"}));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("ghost"), "{body}");
    let (status, body) = deploy(json!({"tags": ["db"]}), "web-app", json!({"app": "a"}));
    assert_eq!(status, 400, "{body}");
    let (status, body) = deploy(json!({"agents": ["ghost"]}), "nope", json!({}));
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("unknown process") && body.contains("ghost"),
        "{body}"
    );
    let (status, body) = deploy(json!({"agents": ["ghost"]}), "web-app", json!({}));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("${app}"), "{body}");
    let deployments = server.request("GET", "/api/v1/deployments", None).json();
    assert_eq!(deployments, json!([]));
    assert_eq!(
        server
            .request("GET", "/api/v1/deployments/d-0000000000000000", None)
            .status,
        404
    );

    // A re-post replaces the process with the next version; all of it survives a restart.
    server.put_process(&json!({
        "name": "web-app",
        "steps": [{"name": "start", "plugin": "shell", "step": "run",
                   "properties": {"script": "true"}}]
    }));
    server.kill();
    server.run();
    let list = server.request("GET", "/api/v1/processes", None).json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["version"], 2, "{list}");
    assert_eq!(
        server.request("GET", "/api/v1/deployments", None).json(),
        json!([])
    );
}
