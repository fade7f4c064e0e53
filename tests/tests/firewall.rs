//! Firewalled topologies (network namespaces + nftables, see `tether_tests::netns`): agents
//! that may reach nothing on the server, a relay that may reach only the server's agent port,
//! and agents that get their deployments through the relay.
//!
//! Needs root, `ip` and `nft` (`make setup` installs nftables); without them the tests print
//! `skipped: ...` and pass, except under `CI=true`, where they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use tether_tests::fleet::{alive, eventually, TestDir};
use tether_tests::netns::{
    relay_topology, require_root, NsAgent, NsRelay, NsServer, Probe, Topology, HTTPS_PORT,
    RELAY_PORT, WSS_PORT,
};

const WAIT: Duration = Duration::from_secs(60);
/// How long a probe waits for an answer that a firewall drops.
const PROBE: Duration = Duration::from_millis(1500);

/// Holds a TCP connection open from `ns` to `ip:port`; `cut` runs while it is established,
/// then a request goes out and the answer is read (whichever of the write or the read meets a
/// reset fails the script). Answers bash's stderr and exit code.
fn established_then(
    topo: &Topology,
    ns: &str,
    ip: std::net::Ipv4Addr,
    port: u16,
    cut: impl FnOnce(),
) -> (String, Option<i32>) {
    let script = r#"exec 3<>"/dev/tcp/$0/$1" || exit 3
echo open
read -r _ || exit 6
printf 'GET / HTTP/1.0\r\n\r\n' >&3 && cat <&3 >/dev/null"#;
    let mut child = topo
        .command(ns, "timeout")
        .args(["10", "bash", "-c", script])
        .arg(ip.to_string())
        .arg(port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "open", "the connection did not open");
    cut();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

#[test]
fn firewall_blocks_direct_path() {
    if !require_root("firewall_blocks_direct_path") {
        return;
    }
    let tmp = TestDir::new();
    let topo = relay_topology(false);
    let mut server = NsServer::start(&topo, "server", tmp.path());
    let server_ip = topo.ip("server");

    // `ip netns exec` execs the program: the guarded pid is the server itself, in the namespace.
    let pid = server.child.as_ref().unwrap().id();
    assert!(
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .unwrap()
            .ends_with("tether-server"),
        "pid {pid} is not tether-server"
    );
    assert!(
        topo.pids("server").contains(&pid),
        "{:?}",
        topo.pids("server")
    );

    // The test process reaches the admin API over the host link.
    let health = server.request("GET", "/admin/health", None);
    assert_eq!(health.status, 200, "{}", health.body);

    // The server reaches itself; the relay reaches the agent port only; agents reach nothing.
    assert_eq!(
        topo.tcp_probe("server", server_ip, WSS_PORT, PROBE),
        Probe::Connected
    );
    assert_eq!(
        topo.tcp_probe("relay", server_ip, WSS_PORT, PROBE),
        Probe::Connected
    );
    assert_eq!(
        topo.tcp_probe("relay", server_ip, HTTPS_PORT, PROBE),
        Probe::TimedOut
    );
    for port in [WSS_PORT, HTTPS_PORT] {
        assert_eq!(
            topo.tcp_probe("agents", server_ip, port, PROBE),
            Probe::TimedOut,
            "agents -> server:{port}\n{}",
            topo.ruleset("router")
        );
    }
    // Nor through the host link, which only the root namespace can use.
    assert_ne!(
        topo.tcp_probe("agents", topo.host_ip("server"), HTTPS_PORT, PROBE),
        Probe::Connected
    );

    // Defence in depth: even with the router letting agents through, the server drops them.
    topo.allow("agents", "server", WSS_PORT);
    assert_eq!(
        topo.tcp_probe("agents", server_ip, WSS_PORT, PROBE),
        Probe::TimedOut,
        "{}",
        topo.ruleset("server")
    );
    topo.undeny_input("server", "agents");
    assert_eq!(
        topo.tcp_probe("agents", server_ip, WSS_PORT, PROBE),
        Probe::Connected
    );
    topo.deny_input("server", "agents");
    topo.disallow("agents", "server", WSS_PORT);

    // A cut resets connections in flight and refuses new ones at once; restore undoes it.
    let (err, code) = established_then(&topo, "relay", server_ip, WSS_PORT, || {
        topo.cut("relay", "server")
    });
    assert_ne!(code, Some(0), "the read after the cut succeeded: {err}");
    assert!(err.contains("Connection reset"), "{err} ({code:?})");
    let started = Instant::now();
    assert_eq!(
        topo.tcp_probe("relay", server_ip, WSS_PORT, PROBE),
        Probe::Refused
    );
    assert!(started.elapsed() < PROBE, "a refusal is immediate");
    topo.restore("relay", "server");
    assert_eq!(
        topo.tcp_probe("relay", server_ip, WSS_PORT, PROBE),
        Probe::Connected
    );
    // A blackhole is silence instead.
    topo.blackhole("relay", "server");
    assert_eq!(
        topo.tcp_probe("relay", server_ip, WSS_PORT, PROBE),
        Probe::TimedOut
    );
    topo.restore("relay", "server");
    assert_eq!(
        topo.tcp_probe("relay", server_ip, WSS_PORT, PROBE),
        Probe::Connected
    );

    // An agent installed from the agents' namespace cannot enroll: connect error, no agent.
    let token = server.enrollment_token("agent");
    let out = NsAgent::install_output(
        &topo,
        "agents",
        tmp.path(),
        "web-1",
        &[server.upstream()],
        &server.ca_path(),
        &token,
        Duration::from_secs(40),
    )
    .expect("tether-agent install should give up on its own");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "install succeeded: {err}");
    assert!(
        err.contains("no upstream could enroll")
            && err.contains(&format!("cannot connect to {server_ip}:{WSS_PORT}")),
        "{err}"
    );
    assert_eq!(server.agents(), Vec::<serde_json::Value>::new());
    assert!(!tmp.path().join("web-1/agent.json").exists());

    // The guard kills the server; the namespace is left empty.
    server.child.take();
    assert!(!alive(pid), "tether-server {pid} survived its guard");
    assert_eq!(topo.pids("server"), Vec::<u32>::new());
}

#[test]
fn agents_reach_server_only_through_relay() {
    if !require_root("agents_reach_server_only_through_relay") {
        return;
    }
    let tmp = TestDir::new();
    let topo = relay_topology(false);
    let server = NsServer::start(&topo, "server", tmp.path());

    let token = server.enrollment_token("relay");
    let mut relay = NsRelay::install(
        &topo,
        "relay",
        tmp.path(),
        "relay-a",
        &server.upstream(),
        &server.ca_path(),
        &token,
    );
    let ports = relay.run(&topo, &[]);
    eprintln!("relay ports.json: {ports}");
    assert_eq!(
        topo.tcp_probe("agents", topo.ip("relay"), RELAY_PORT, PROBE),
        Probe::Connected
    );

    let token = server.enrollment_token("agent");
    let mut agent = NsAgent::install(
        &topo,
        "agents",
        tmp.path(),
        "web-1",
        &[relay.downstream()],
        &server.ca_path(),
        &token,
    );
    agent.run(&topo, &[]);
    let listed = eventually("the agent online through relay-a", WAIT, || {
        server
            .agent(&agent.id)
            .filter(|a| a["status"] == "online" && a["path"] == json!(["relay-a"]))
    });
    eprintln!("agent: {listed}");

    server.put_process(&json!({"name": "hello", "steps": [
        {"name": "say", "plugin": "shell", "step": "run",
         "properties": {"script": "echo hello through the relay"}}
    ]}));
    let id = server.deploy("hello", json!({"agents": [agent.id]}), json!({}));
    let d = server.wait_deployment(&id, WAIT);
    assert_eq!(d["status"], "succeeded", "{d}");
    let log = server.step_log(&id, &agent.id, "say");
    assert!(log.contains("hello through the relay"), "{log}");

    // The direct path stayed closed all along.
    assert_eq!(
        topo.tcp_probe("agents", server.ip, WSS_PORT, PROBE),
        Probe::TimedOut
    );
}
