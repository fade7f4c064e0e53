//! Egress through an HTTP CONNECT proxy: an agent in a network namespace whose only way out is
//! a proxy (the router lets the agents reach the proxy's port, nothing else; the server drops
//! anything from them) enrolls, connects, runs a deployment and downloads an artifact, every
//! byte through the proxy, with TLS end to end inside its tunnels; wrong credentials are
//! refused with the proxy's answer. Needs root, `ip` and `nft` (see `tether_tests::netns`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tether_tests::fleet::{eventually, TestDir};
use tether_tests::netns::{require_root, Builder, NsAgent, NsServer, WSS_PORT};
use tether_tests::{bin, ChildGuard};

const WAIT: Duration = Duration::from_secs(60);
const PROXY_PORT: u16 = 3128;

fn write_proxy_config(root: &std::path::Path, name: &str, proxy: &str) {
    let etc = root.join(format!("{name}-etc"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("agent.toml"),
        format!("[agent]\nproxy = \"{proxy}\"\n"),
    )
    .unwrap();
}

#[test]
fn an_agent_whose_only_way_out_is_a_proxy_enrolls_deploys_and_downloads_through_it() {
    if !require_root("an_agent_whose_only_way_out_is_a_proxy") {
        return;
    }
    let tmp = TestDir::new();
    let topo = Builder::star("router", &["agents", "proxy", "server"])
        .host_link("server")
        .allow("agents", "proxy", PROXY_PORT)
        .allow("proxy", "server", WSS_PORT)
        .deny_input("server", "agents")
        .build();
    let server = NsServer::start(&topo, "server", tmp.path());
    // No route of its own: the agents' namespace cannot reach the server.
    assert!(
        !topo.tcp_reachable(
            "agents",
            topo.ip("server"),
            WSS_PORT,
            Duration::from_millis(1500)
        ),
        "the agents reach the server directly"
    );
    let proxy_log = tmp.path().join("proxy.out");
    let mut cmd = topo.command("proxy", bin("tether-test-proxy"));
    cmd.arg(format!("0.0.0.0:{PROXY_PORT}"))
        .arg("tether:s3cret pass")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&proxy_log).unwrap())
        .stderr(Stdio::null());
    let _proxy = ChildGuard::spawn("tether-test-proxy", &mut cmd);
    let proxy_ip = topo.ip("proxy");
    eventually("the proxy listening", WAIT, || {
        std::fs::read_to_string(&proxy_log)
            .ok()
            .filter(|l| l.contains("listening"))
    });
    let tunnels = || {
        std::fs::read_to_string(&proxy_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("tunnel "))
            .count()
    };

    // Wrong credentials: the install fails saying what the proxy answered.
    write_proxy_config(
        tmp.path(),
        "px-bad",
        &format!("http://tether:wrong@{proxy_ip}:{PROXY_PORT}"),
    );
    let token = server.token(2);
    let out = NsAgent::install_output(
        &topo,
        "agents",
        tmp.path(),
        "px-bad",
        &[server.upstream()],
        &server.ca_path(),
        &token,
        WAIT,
    )
    .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let said = tether_tests::stderr(&out) + &tether_tests::stdout(&out);
    assert!(said.contains("407"), "{said}");
    assert_eq!(tunnels(), 0);

    // The password percent-encoded in the URL, as operators write it.
    write_proxy_config(
        tmp.path(),
        "px-1",
        &format!("http://tether:s3cret%20pass@{proxy_ip}:{PROXY_PORT}"),
    );
    let mut agent = NsAgent::install(
        &topo,
        "agents",
        tmp.path(),
        "px-1",
        &[server.upstream()],
        &server.ca_path(),
        &token,
    );
    assert!(tunnels() >= 1, "the enrollment went through the proxy");
    agent.run(&topo, &[]);
    eventually("online through the proxy", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    // A deployment that downloads an artifact over HTTPS (a tunnel of its own) and runs.
    let page = b"through the proxy\n";
    let r = server.request_raw("PUT", "/api/v1/artifacts/px-page/1.0", &[], page);
    assert_eq!(r.status, 201, "{}", r.body);
    let r = server.request(
        "POST",
        "/api/v1/processes",
        Some(&json!({"name": "px", "steps": [
            {"name": "get", "plugin": "artifact", "step": "fetch",
             "properties": {"name": "px-page", "version": "1.0", "dest": tmp.path().join("px-page").to_str().unwrap()}},
            {"name": "say", "plugin": "shell", "step": "run", "properties": {"script": "echo deployed"}}]})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let before = tunnels();
    let r = server.request(
        "POST",
        "/api/v1/deployments",
        Some(&json!({"process": "px", "targets": {"agents": ["px-1"]}})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let d: Value = eventually("the deployment done", WAIT, || {
        let d = server
            .request("GET", &format!("/api/v1/deployments/{id}"), None)
            .json();
        matches!(d["status"].as_str(), Some("succeeded" | "failed")).then_some(d)
    });
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(
        std::fs::read(tmp.path().join("px-page")).unwrap(),
        page,
        "the artifact arrived"
    );
    assert!(tunnels() > before, "the download had its own tunnel");
    let log = std::fs::read_to_string(&proxy_log).unwrap();
    let target = format!("tunnel {}:{WSS_PORT}", topo.ip("server"));
    assert!(
        log.lines()
            .filter(|l| l.starts_with("tunnel "))
            .all(|l| l == target),
        "every tunnel went to the server's agent port: {log}"
    );
}
