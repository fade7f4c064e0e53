//! Egress through an HTTP CONNECT proxy: an agent in a network namespace whose only way out is
//! a proxy (the router lets the agents reach the proxy's port, nothing else; the server drops
//! anything from them) enrolls, connects, runs a deployment and downloads an artifact, every
//! byte through the proxy, with TLS end to end inside its tunnels; wrong credentials are
//! refused with the proxy's answer. The same for a relay whose only way out is the proxy, with
//! an agent behind it. Needs root, `ip` and `nft` (see `tether_tests::netns`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tether_tests::fleet::{eventually, TestDir};
use tether_tests::netns::{
    require_root, Builder, NsAgent, NsRelay, NsServer, Topology, RELAY_PORT, WSS_PORT,
};
use tether_tests::{bin, ChildGuard};

const WAIT: Duration = Duration::from_secs(60);
const PROXY_PORT: u16 = 3128;

/// `[section] proxy = ...` in `NAME-etc/FILE` (`agent.toml`, `relay.toml`).
fn write_proxy_config(root: &std::path::Path, name: &str, file: &str, proxy: &str) {
    let etc = root.join(format!("{name}-etc"));
    std::fs::create_dir_all(&etc).unwrap();
    let section = file.trim_end_matches(".toml");
    std::fs::write(
        etc.join(file),
        format!("[{section}]\nproxy = \"{proxy}\"\n"),
    )
    .unwrap();
}

/// The test proxy in namespace `ns`, with user `tether`, password `s3cret pass`: its log
/// (`tunnel HOST:PORT` per CONNECT) and the guard that stops it.
fn start_proxy(
    topo: &Topology,
    ns: &str,
    root: &std::path::Path,
) -> (std::path::PathBuf, ChildGuard) {
    let proxy_log = root.join("proxy.out");
    let mut cmd = topo.command(ns, bin("tether-test-proxy"));
    cmd.arg(format!("0.0.0.0:{PROXY_PORT}"))
        .arg("tether:s3cret pass")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&proxy_log).unwrap())
        .stderr(Stdio::null());
    let proxy = ChildGuard::spawn("tether-test-proxy", &mut cmd);
    eventually("the proxy listening", WAIT, || {
        std::fs::read_to_string(&proxy_log)
            .ok()
            .filter(|l| l.contains("listening"))
    });
    (proxy_log, proxy)
}

/// The `tunnel ...` lines of the proxy's log.
fn tunnels(proxy_log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(proxy_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("tunnel "))
        .map(str::to_owned)
        .collect()
}

/// Deploys a process that downloads an artifact to `dest` and runs a step on agent `name`;
/// checks it succeeded and the artifact arrived.
fn deploy_with_download(server: &NsServer, name: &str, dest: &std::path::Path) {
    let page = b"through the proxy\n";
    let r = server.request_raw("PUT", "/api/v1/artifacts/px-page/1.0", &[], page);
    assert!(r.status == 201 || r.status == 409, "{}", r.body);
    server.put_process(&json!({"name": "px", "steps": [
        {"name": "get", "plugin": "artifact", "step": "fetch",
         "properties": {"name": "px-page", "version": "1.0", "dest": dest.to_str().unwrap()}},
        {"name": "say", "plugin": "shell", "step": "run", "properties": {"script": "echo deployed"}}]}));
    let r = server.request(
        "POST",
        "/api/v1/deployments",
        Some(&json!({"process": "px", "targets": {"agents": [name]}})),
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
    assert_eq!(std::fs::read(dest).unwrap(), page, "the artifact arrived");
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
    let (proxy_log, _proxy) = start_proxy(&topo, "proxy", tmp.path());
    let proxy_ip = topo.ip("proxy");
    let tunnels = || tunnels(&proxy_log).len();

    // Wrong credentials: the install fails saying what the proxy answered.
    write_proxy_config(
        tmp.path(),
        "px-bad",
        "agent.toml",
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
        "agent.toml",
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
    let before = tunnels();
    deploy_with_download(&server, "px-1", &tmp.path().join("px-page"));
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

#[test]
fn a_relay_whose_only_way_out_is_a_proxy_carries_its_agents_through_it() {
    if !require_root("a_relay_whose_only_way_out_is_a_proxy") {
        return;
    }
    let tmp = TestDir::new();
    let topo = Builder::star("router", &["agents", "relay", "proxy", "server"])
        .host_link("server")
        .allow("agents", "relay", RELAY_PORT)
        .allow("relay", "proxy", PROXY_PORT)
        .allow("proxy", "server", WSS_PORT)
        .deny_input("server", "agents")
        .deny_input("server", "relay")
        .build();
    let server = NsServer::start(&topo, "server", tmp.path());
    for ns in ["relay", "agents"] {
        assert!(
            !topo.tcp_reachable(ns, topo.ip("server"), WSS_PORT, Duration::from_millis(1500)),
            "{ns} reach the server directly"
        );
    }
    let (proxy_log, _proxy) = start_proxy(&topo, "proxy", tmp.path());
    write_proxy_config(
        tmp.path(),
        "relay-px",
        "relay.toml",
        &format!(
            "http://tether:s3cret%20pass@{}:{PROXY_PORT}",
            topo.ip("proxy")
        ),
    );
    let token = server.enrollment_token("relay");
    let mut relay = NsRelay::install(
        &topo,
        "relay",
        tmp.path(),
        "relay-px",
        &server.upstream(),
        &server.ca_path(),
        &token,
    );
    assert!(
        !tunnels(&proxy_log).is_empty(),
        "the relay enrolled through the proxy"
    );
    relay.run(&topo, &[]);

    let token = server.enrollment_token("agent");
    let mut agent = NsAgent::install(
        &topo,
        "agents",
        tmp.path(),
        "behind-px",
        &[relay.downstream()],
        &server.ca_path(),
        &token,
    );
    agent.run(&topo, &[]);
    eventually("the agent online through the relay", WAIT, || {
        server
            .agent(&agent.id)
            .filter(|a| a["status"] == "online" && a["path"] == json!(["relay-px"]))
    });
    // The agent's download goes through the relay, whose request upstream is a tunnel.
    let before = tunnels(&proxy_log).len();
    deploy_with_download(&server, "behind-px", &tmp.path().join("px-relay-page"));
    let log = tunnels(&proxy_log);
    assert!(
        log.len() > before,
        "the relay's download had its own tunnel: {log:?}"
    );
    let target = format!("tunnel {}:{WSS_PORT}", topo.ip("server"));
    assert!(
        log.iter().all(|l| *l == target),
        "every tunnel went to the server's agent port: {log:?}"
    );
}
