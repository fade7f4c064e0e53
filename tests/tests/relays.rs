//! Agents behind relays, end to end on loopback: agent → relay → server and agent → relay →
//! relay → server. Both message streams (numbered probes, exactly once, in order) and a real
//! deployment go through; the server shows each agent's path and each relay's status; each relay
//! shows its own health on its loopback admin port.

use std::time::Duration;

use serde_json::{json, Value};
use tether_shared::protocol::Frame;
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::relays::{relay_entry, Relay};
use tether_tests::wire::{self, WsClient};

const WAIT: Duration = Duration::from_secs(60);

fn online_with_path(server: &Server, agent: &Agent, path: &[&str]) -> Value {
    eventually(
        &format!("{} online through {path:?}", agent.name),
        WAIT,
        || {
            server
                .agent(&agent.id)
                .filter(|a| a["status"] == "online" && a["path"] == json!(path))
        },
    )
}

/// A two-step deployment (a shell step and a file written by the agent); checks it succeeded on
/// `agent` and its log arrived.
fn deploy_and_check(server: &Server, agent: &Agent, dir: &std::path::Path) {
    let marker = dir.join(format!("{}-deployed.txt", agent.name));
    server.put_process(&json!({
        "name": format!("via-{}", agent.name),
        "steps": [
            {"name": "hello", "plugin": "shell", "step": "run",
             "properties": {"script": "echo hello from $(hostname) through relays"}},
            {"name": "mark", "plugin": "file", "step": "write",
             "properties": {"path": marker.to_string_lossy(), "content": "deployed"}},
        ]
    }));
    let id = server.deploy(
        &format!("via-{}", agent.name),
        json!({"agents": [agent.name]}),
        json!({}),
    );
    let d = server.wait_deployment(&id, WAIT);
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(d["jobs"][0]["steps"][0]["exit_code"], 0, "{d}");
    let log = server.step_log(&id, &agent.name, "hello");
    assert!(log.contains("through relays"), "log: {log}");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap_or_default(),
        "deployed"
    );
}

#[test]
fn an_agent_deploys_through_one_relay() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let relay = Relay::start(&server, &[server.upstream()], dir.path(), "relay-a");
    // The agent enrolls through the relay too: it only ever talks to the relay.
    let mut agent = Agent::install_via(
        &server,
        &[relay.upstream()],
        dir.path(),
        "behind-1",
        &["edge"],
        &[],
    );
    agent.run();
    online_with_path(&server, &agent, &["relay-a"]);
    let r = eventually("relay-a online carrying one agent", WAIT, || {
        relay_entry(&server, "relay-a").filter(|r| r["status"] == "online" && r["agents"] == 1)
    });
    assert_eq!(r["path"], json!([]), "{r}");

    server.queue_probes(&agent.id, 300, 300);
    server.wait_for_probes(&agent.id, 300, 300, WAIT);
    deploy_and_check(&server, &agent, dir.path());

    let health = relay.health();
    assert_eq!(health["upstream"]["state"], "connected", "{health}");
    assert_eq!(health["upstream"]["agents"], 1, "{health}");
    assert_eq!(health["actors"][0]["state"], "running", "{health}");
    // The same figures for Prometheus, on the same loopback listener.
    let metrics = relay.metrics();
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing\n{metrics}"))
    };
    assert_eq!(
        value("tether_relay_upstream_state{state=\"connected\"}"),
        1.0
    );
    assert_eq!(value("tether_relay_agents"), 1.0);
    assert!(
        value("tether_relay_upstream_frames_up_total") >= 300.0,
        "the probes went up"
    );
    assert!(value("tether_relay_upstream_bytes_down_total") > 0.0);
    assert!(value("tether_relay_upstream_connects_total") >= 1.0);
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("tether_relay_certificate_expiry_timestamp_seconds") > 1.6e9);
    assert!(metrics.contains("tether_build_info{version="), "{metrics}");
    assert!(
        relay.admin.ip().is_loopback(),
        "admin must be on loopback: {}",
        relay.admin
    );
}

#[test]
fn an_agent_deploys_through_two_relays() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let outer = Relay::start(&server, &[server.upstream()], dir.path(), "relay-a");
    // The inner relay enrolls and connects through the outer one.
    let inner = Relay::start(&server, &[outer.upstream()], dir.path(), "relay-b");
    let mut agent =
        Agent::install_via(&server, &[inner.upstream()], dir.path(), "deep-1", &[], &[]);
    agent.run();
    online_with_path(&server, &agent, &["relay-b", "relay-a"]);
    let b = eventually("relay-b online through relay-a", WAIT, || {
        relay_entry(&server, "relay-b").filter(|r| r["status"] == "online" && r["agents"] == 1)
    });
    assert_eq!(b["path"], json!(["relay-a"]), "{b}");
    let a = relay_entry(&server, "relay-a").unwrap_or_default();
    assert_eq!(a["agents"], 1, "the outer relay carries it too: {a}");

    server.queue_probes(&agent.id, 300, 300);
    server.wait_for_probes(&agent.id, 300, 300, WAIT);
    deploy_and_check(&server, &agent, dir.path());
    assert_eq!(inner.health()["upstream"]["agents"], 1);
    assert_eq!(outer.health()["upstream"]["child_channels"], 2);
}

#[test]
fn artifacts_cross_the_upstream_link_once_and_stay_authorized_by_the_server() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let relay = Relay::start(&server, &[server.upstream()], dir.path(), "relay-a");
    let mut agents: Vec<Agent> = ["cache-1", "cache-2"]
        .iter()
        .map(|name| Agent::install_via(&server, &[relay.upstream()], dir.path(), name, &[], &[]))
        .collect();
    for agent in &mut agents {
        agent.run();
        online_with_path(&server, agent, &["relay-a"]);
    }
    // 300 KiB of incompressible bytes.
    let content: Vec<u8> = (0..300 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let r = server.request_raw("PUT", "/api/v1/artifacts/site/1.0", &[], &content);
    assert_eq!(r.status, 201, "{}", r.body);
    let sha = r.json()["sha256"].as_str().unwrap_or_default().to_owned();

    for agent in &agents {
        let dest = dir.path().join(format!("{}-site.bin", agent.name));
        let process = format!("fetch-{}", agent.name);
        server.put_process(&json!({"name": process, "steps": [
            {"name": "get", "plugin": "artifact", "step": "fetch", "properties": {
                "name": "site", "version": "1.0", "dest": dest.to_string_lossy()}}]}));
        let id = server.deploy(&process, json!({"agents": [agent.name]}), json!({}));
        let d = server.wait_deployment(&id, WAIT);
        assert_eq!(d["status"], "succeeded", "{d}");
        assert_eq!(std::fs::read(&dest).unwrap_or_default(), content);
    }
    let cache = relay.health()["cache"].clone();
    assert_eq!(cache["misses"], 1, "{cache}");
    assert_eq!(
        cache["upstream_bytes"],
        content.len() as u64,
        "the body crossed the upstream link once: {cache}"
    );
    assert_eq!(cache["cached_files"], 1, "{cache}");

    // Cached or not, the server decides: a request no agent signed gets the server's 401.
    let r = tether_tests::https_request_with_body(
        relay.downstream,
        server.tls(),
        tether_tests::relays::RELAY_HOST,
        "GET",
        &format!("/agent/v1/artifacts/{sha}"),
        &[
            ("x-tether-agent", agents[0].id.as_str()),
            ("x-tether-time", "1"),
            ("x-tether-signature", "AAAA"),
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(!r.body.contains("\u{0}"), "no content leaked");
}

#[test]
fn a_slow_agent_is_shed_without_holding_up_the_others() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let mut relay = Relay::install(
        &server,
        &[server.upstream()],
        dir.path(),
        "relay-a",
        &[("TETHER_RELAY__MAX_QUEUE_PER_AGENT", "8")],
    );
    relay.run();
    let mut fast = Agent::install_via(&server, &[relay.upstream()], dir.path(), "fast-1", &[], &[]);
    fast.run();
    online_with_path(&server, &fast, &["relay-a"]);

    // The slow one is a real enrolled agent whose reader stops after the handshake, with a
    // small receive buffer so that the relay's side backs up quickly.
    let slow = Agent::install_via(&server, &[relay.upstream()], dir.path(), "slow-1", &[], &[]);
    let identity = wire::agent_identity(&slow.dir);
    let mut ws = WsClient::connect_with_recv_buffer(
        relay.downstream,
        server.tls(),
        tether_shared::enroll::WS_PATH,
        4096,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    ws.secure(&slow.id, &identity, &wire::server_key(&server));
    let nonce = ws.challenge(WAIT);
    let hello = wire::hello(&identity, &slow.id, &nonce, &wire::fresh_incarnation());
    ws.send(&Frame::Hello(hello))
        .unwrap_or_else(|e| panic!("{e}"));
    match ws.recv_frame("welcome", WAIT) {
        Frame::Welcome(_) => {}
        other => panic!("expected a welcome, got {}", other.kind()),
    }
    online_with_path(&server, &slow, &["relay-a"]);

    // Many commands for the slow agent (it never reads them), and traffic for the fast one.
    server.queue_probes(&slow.id, 5_000, 0);
    server.queue_probes(&fast.id, 1_000, 1_000);
    server.wait_for_probes(&fast.id, 1_000, 1_000, WAIT);
    let upstream = eventually("the relay sheds the slow agent", WAIT, || {
        let h = relay.health()["upstream"].clone();
        (h["shed_slow_agents"].as_u64() >= Some(1)).then_some(h)
    });
    // With a queue this small even the fast agent may be shed in a burst; it reconnects and
    // resumes (its probes above arrived exactly once). The stalled one stays gone.
    eventually("the slow agent offline, the fast one online", WAIT, || {
        (server.agent_status(&slow.id) == "offline" && server.agent_status(&fast.id) == "online")
            .then_some(())
    });
    assert!(
        upstream["shed_slow_agents"].as_u64() >= Some(1),
        "{upstream}"
    );
    drop(ws);
}

#[test]
fn relay_install_and_run_refuse_bad_input_and_write_nothing() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let etc = dir.path().join("etc-relay");
    std::fs::create_dir_all(&etc).unwrap_or_else(|e| panic!("{e}"));
    let data = dir.path().join("relay-data");
    let ca = server.ca_path();
    let ca = ca.to_str().unwrap_or_default();
    let relay_token = server.enrollment_token("relay");
    let agent_token = server.token(1);
    let upstream = server.upstream();
    let install = |args: &[&str]| {
        let mut all = vec!["install", "--data", data.to_str().unwrap_or_default()];
        all.extend_from_slice(args);
        tether_tests::run("tether-relay", &etc, all)
    };
    // (arguments, exit code, what the error must say)
    let cases: [(Vec<&str>, i32, &str); 5] = [
        (
            vec![
                "--upstream",
                "https://x:1",
                "--ca",
                ca,
                "--token",
                &relay_token,
                "--name",
                "r1",
            ],
            2,
            "wss://",
        ),
        (
            vec![
                "--upstream",
                &upstream,
                "--ca",
                ca,
                "--token",
                &relay_token,
                "--name",
                "r1",
                "--hostname",
                "not a host",
            ],
            2,
            "--hostname",
        ),
        (
            vec![
                "--upstream",
                &upstream,
                "--ca",
                "/nonexistent.pem",
                "--token",
                &relay_token,
                "--name",
                "r1",
            ],
            2,
            "--ca",
        ),
        (
            vec![
                "--upstream",
                &upstream,
                "--ca",
                ca,
                "--token",
                &relay_token,
                "--name",
                "bad name",
            ],
            2,
            "--name",
        ),
        // An agent's token does not enroll a relay.
        (
            vec![
                "--upstream",
                &upstream,
                "--ca",
                ca,
                "--token",
                &agent_token,
                "--name",
                "r1",
                "--hostname",
                "relay.example",
            ],
            1,
            "invalid or expired enrollment token",
        ),
    ];
    for (args, code, needle) in cases {
        let out = install(&args);
        let err = tether_tests::stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(
            !data.join("relay.json").exists(),
            "{args:?} wrote relay.json"
        );
    }
    let r = server.request("GET", "/api/v1/relays", None);
    assert_eq!(r.json(), json!([]), "nothing enrolled");
    // The relay token was not spent by the refusals: it still enrolls.
    let out = install(&[
        "--upstream",
        &upstream,
        "--ca",
        ca,
        "--token",
        &relay_token,
        "--name",
        "r1",
        "--hostname",
        "relay.example",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", tether_tests::stderr(&out));
    // `run` without an install says so.
    let out = tether_tests::run(
        "tether-relay",
        &etc,
        ["run", "--data", "/nonexistent-relay"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        tether_tests::stderr(&out).contains("tether-relay install"),
        "{}",
        tether_tests::stderr(&out)
    );
}

#[test]
fn enrollment_refuses_certificate_fields_for_the_wrong_role() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let enroll = |body: Value| {
        tether_tests::https_request_with_body(
            server.wss,
            server.tls(),
            "localhost",
            "POST",
            "/agent/v1/enroll",
            &[("Content-Type", "application/json")],
            Some(body.to_string().as_bytes()),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let identity = tether_shared::identity::Identity::generate();
    let key = identity.public_key_b64();
    let tls_key = tether_shared::tls::TlsKey::generate().unwrap_or_else(|e| panic!("{e}"));
    let tls_public = tether_tests::enrollment::tls_public_key(&tls_key);
    let sign = |body: Value, tls: bool| {
        tether_tests::enrollment::signed(body, &identity, tls.then_some(&tls_key))
    };
    let agent_token = server.token(1);
    let r = enroll(sign(
        json!({"token": agent_token, "name": "a1", "public_key": key,
        "tls_public_key": "AAAA", "hostnames": ["x"]}),
        false,
    ));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("agents do not get TLS certificates"),
        "{}",
        r.body
    );
    let relay_token = server.enrollment_token("relay");
    let r = enroll(sign(
        json!({"token": relay_token, "name": "r1", "public_key": key, "role": "relay"}),
        false,
    ));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("tls_public_key"), "{}", r.body);
    let r = enroll(sign(
        json!({"token": relay_token, "name": "r1", "public_key": key, "role": "relay",
        "tls_public_key": "AAAA", "hostnames": ["relay.example"]}),
        false,
    ));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("P-256"), "{}", r.body);
    // A relay must prove it holds the TLS key it wants certified.
    let other_tls = tether_shared::tls::TlsKey::generate().unwrap_or_else(|e| panic!("{e}"));
    let mut forged = sign(
        json!({"token": relay_token, "name": "r1", "public_key": key, "role": "relay",
        "tls_public_key": tls_public, "hostnames": ["relay.example"]}),
        true,
    );
    forged["tls_public_key"] = tether_tests::enrollment::tls_public_key(&other_tls).into();
    forged["proof"] = sign(
        json!({"token": relay_token, "name": "r1", "public_key": key, "role": "relay",
        "tls_public_key": forged["tls_public_key"].clone(), "hostnames": ["relay.example"]}),
        false,
    )["proof"]
        .clone();
    let r = enroll(forged);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("tls_proof does not verify"), "{}", r.body);
    let mut no_tls_proof = sign(
        json!({"token": relay_token, "name": "r1", "public_key": key, "role": "relay",
        "tls_public_key": tls_public, "hostnames": ["relay.example"]}),
        true,
    );
    no_tls_proof
        .as_object_mut()
        .unwrap_or_else(|| panic!("object"))
        .remove("tls_proof");
    let r = enroll(no_tls_proof);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("tls_proof does not verify"), "{}", r.body);
    // No certificate for a name the server's own certificate covers (localhost, 127.0.0.1).
    for name in ["localhost", "127.0.0.1"] {
        let r = enroll(sign(
            json!({"token": relay_token, "name": "r1", "public_key": key, "role": "relay",
            "tls_public_key": tls_public, "hostnames": ["relay.example", name]}),
            true,
        ));
        assert_eq!(r.status, 400, "{name}: {}", r.body);
        assert!(r.body.contains("server's own names"), "{}", r.body);
    }
    // Nothing was enrolled and both tokens still work.
    assert_eq!(
        server.request("GET", "/api/v1/agents", None).json(),
        json!([])
    );
    assert_eq!(
        server.request("GET", "/api/v1/relays", None).json(),
        json!([])
    );
}

fn not_after(pem_path: &std::path::Path) -> i64 {
    let pem = std::fs::read_to_string(pem_path).unwrap_or_default();
    tether_shared::tls::certificate_not_after(&pem)
        .unwrap_or_else(|e| panic!("{}: {e}", pem_path.display()))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Relay certificates are short-lived and renewed over the relay's link: with a 30-second
/// lifetime set by config, the relay serves a new certificate (on disk and to new handshakes)
/// before the first one expires, and an agent that enrolls and deploys through it after that
/// expiry gets through. The renewal shows in the server's health and metrics and the relay's.
#[test]
fn a_relay_certificate_is_renewed_over_its_link_before_it_expires() {
    let dir = TestDir::new();
    let server = Server::start_with(
        dir.path(),
        &[
            ("TETHER_SERVER__RELAY_CERTIFICATE_LIFETIME_S", "30"),
            ("TETHER_SERVER__HEARTBEAT_INTERVAL_MS", "500"),
        ],
    );
    let relay = Relay::start(&server, &[server.upstream()], dir.path(), "relay-a");
    let cert_path = relay.dir.join("tls.pem");
    let first = not_after(&cert_path);
    assert!(
        first - unix_now() <= 31,
        "the certificate lasts the configured 30 s: {} s left",
        first - unix_now()
    );
    let renewed = eventually("the relay's certificate renewed", WAIT, || {
        let n = not_after(&cert_path);
        (n > first).then_some(n)
    });
    assert!(
        unix_now() < first,
        "renewed before the first certificate expired"
    );
    let health = relay.health();
    assert_eq!(
        health["certificate"]["not_after_unix_s"], renewed,
        "{health}"
    );

    eventually("the first certificate expired", WAIT, || {
        (unix_now() > first + 1).then_some(())
    });
    // A new handshake with the relay gets the renewed certificate: enrollment and the
    // agent's link both go through it.
    let mut agent =
        Agent::install_via(&server, &[relay.upstream()], dir.path(), "late-1", &[], &[]);
    agent.run();
    online_with_path(&server, &agent, &["relay-a"]);
    deploy_and_check(&server, &agent, dir.path());

    let listed = tether_tests::wire::health(&server);
    let entry = listed["certificates"]
        .as_array()
        .and_then(|l| l.iter().find(|c| c["name"] == "relay:relay-a"))
        .cloned()
        .unwrap_or_default();
    assert!(
        entry["not_after_unix_s"].as_i64() >= Some(renewed),
        "the server's health shows the relay's current certificate: {entry}"
    );
    let metrics = server.request("GET", "/metrics", None).body;
    assert!(
        metrics
            .contains("tether_certificate_expiry_timestamp_seconds{certificate=\"relay:relay-a\"}"),
        "{metrics}"
    );
}

#[test]
fn a_relay_in_maintenance_starts_no_new_job_on_the_agents_behind_it() {
    let tmp = TestDir::new();
    let server = Server::start(tmp.path());
    let relay = Relay::start(&server, &[server.upstream()], tmp.path(), "relay-m");
    let mut behind = Agent::install_via(
        &server,
        &[relay.upstream()],
        tmp.path(),
        "behind-1",
        &["r"],
        &[],
    );
    let mut direct = Agent::install(&server, tmp.path(), "direct-1", &["r"]);
    behind.run();
    direct.run();
    for a in [&behind, &direct] {
        eventually("online", WAIT, || {
            (server.agent_status(&a.id) == "online").then_some(())
        });
    }
    let r = server.request(
        "POST",
        "/api/v1/processes",
        Some(
            &json!({"name": "hello", "steps": [{"name": "say", "plugin": "shell",
            "step": "run", "properties": {"script": "echo hello"}}]}),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let cli = tether_tests::tether_cli::Tether::new(&tmp.path().join("cli"));
    cli.login(&server);
    let out = cli.run(&[
        "relays",
        "maintenance",
        "relay-m",
        "on",
        "--reason",
        "firewall change",
    ]);
    assert!(out.status.success(), "{out:?}");
    let listed = tether_tests::stdout(&cli.run(&["relays"]));
    assert!(listed.contains("(maintenance)"), "{listed}");
    let r = server.request(
        "POST",
        "/api/v1/deployments",
        Some(&json!({"process": "hello", "targets": {"tags": ["r"]}})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let job = |d: &Value, agent: &str| {
        d["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["agent"] == agent)
            .map(|j| j["status"].as_str().unwrap_or_default().to_owned())
            .unwrap()
    };
    let get = || {
        server
            .request("GET", &format!("/api/v1/deployments/{id}"), None)
            .json()
    };
    // The direct agent's job runs to its end; the one behind the relay waits.
    let d = eventually("the direct agent's job done", WAIT, || {
        let d = get();
        (job(&d, "direct-1") == "succeeded").then_some(d)
    });
    assert_eq!(job(&d, "behind-1"), "queued", "{d}");
    // Refused: a reason without maintenance; an unknown relay.
    let r = server.request(
        "PATCH",
        "/api/v1/relays/relay-m",
        Some(&json!({"maintenance": false, "maintenance_reason": "x"})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let r = server.request(
        "PATCH",
        "/api/v1/relays/no-such-relay",
        Some(&json!({"maintenance": true})),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    // The web application shows it, and its form ends it: the waiting job runs.
    let r = server.request(
        "POST",
        "/api/v1/users",
        Some(&json!({"name": "ops", "password": "relay-maint-password", "role": "admin"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let cookie = server.web_login("ops", "relay-maint-password");
    let page = server.web_get(&cookie, "/relays").body;
    assert!(
        page.contains("firewall change") && page.contains("End maintenance"),
        "{page}"
    );
    let r = server.web_post(
        &cookie,
        &tether_tests::csrf_of(&page),
        &format!("/relays/{}/maintenance", relay.id),
        "on=no",
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let listed = tether_tests::stdout(&cli.run(&["relays"]));
    assert!(!listed.contains("(maintenance)"), "{listed}");
    eventually("the job behind the relay done", WAIT, || {
        (job(&get(), "behind-1") == "succeeded").then_some(())
    });
}
