//! Hostile load on the real server, each case with its positive control: what a burst from
//! one peer may cost, and that it stays within a stated bound.
//! - 40 parallel wrong logins from one address: at most the per-source budget of password
//!   checks run (the rest get 429 without one), and the server's memory stays flat.
//! - Step results too large for a frame (400 outputs of 1 KiB, 64 KiB of NUL bytes): the step
//!   fails saying why, or the value is cut; nothing is lost silently, no NUL reaches a step.
//! - An agent sending 14 MB of output for one step, and more after its job ended: the server
//!   keeps 8 MiB and a marker, refuses and counts the late chunks, and another agent's
//!   deployment still finishes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::sync::{Arc, Barrier};

use serde_json::json;
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::measure::rss_kib;

/// The server's per-source budget of failed logins per minute (`web::login`).
const FAILURES_PER_SOURCE: usize = 10;

fn post_login(server: &Server, user: &str, password: &str) -> u16 {
    let origin = format!("https://localhost:{}", server.https.port());
    let body = format!("user={user}&password={password}");
    tether_tests::https_request_with_body(
        server.https,
        server.tls(),
        "localhost",
        "POST",
        "/login",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Origin", origin.as_str()),
        ],
        Some(body.as_bytes()),
    )
    .map(|r| r.status)
    .unwrap_or(0)
}

#[test]
fn a_login_burst_runs_a_bounded_number_of_password_checks_in_flat_memory() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let password = std::fs::read_to_string(server.dir.join("admin.password")).unwrap();
    let pid = server.pid().unwrap();
    // The control: the right password works, and warms up whatever a check allocates.
    assert_eq!(post_login(&server, "admin", password.trim()), 303);
    let before = rss_kib(pid);

    let attempts = 40;
    let barrier = Arc::new(Barrier::new(attempts));
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..attempts)
            .map(|i| {
                let barrier = barrier.clone();
                let server = &server;
                scope.spawn(move || {
                    barrier.wait();
                    post_login(server, "admin", &format!("wrong-password-{i}"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let after = rss_kib(pid);
    let refused = statuses.iter().filter(|s| **s == 401).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    eprintln!(
        "40 parallel wrong logins: {refused} checked and refused, {limited} limited; RSS {before} -> {after} KiB"
    );
    assert_eq!(refused + limited, attempts, "{statuses:?}");
    assert!(
        refused <= FAILURES_PER_SOURCE,
        "at most the budget of checks ran: {statuses:?}"
    );
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.matches("web-login-failed").count() <= FAILURES_PER_SOURCE);
    // Each check holds about 19 MiB; two run at once. 40 unbounded ones took 750 MiB.
    assert!(
        after.saturating_sub(before) < 100 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    // The source stays limited for the window, even with the right password.
    assert_eq!(post_login(&server, "admin", password.trim()), 429);
}

/// Sends `head` (a request head announcing a large body, none of it sent) over TLS to the
/// operators' listener and reads the status line within `wait`; `None` if nothing came.
fn status_without_body(server: &Server, head: &str, wait: std::time::Duration) -> Option<String> {
    use std::io::{Read, Write};
    let tcp = std::net::TcpStream::connect(server.https).unwrap();
    tcp.set_read_timeout(Some(wait)).unwrap();
    let conn =
        rustls::ClientConnection::new(server.tls(), "localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(head.as_bytes()).unwrap();
    tls.flush().unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n") {
        match tls.read(&mut byte) {
            Ok(1) => got.push(byte[0]),
            _ => break,
        }
    }
    (!got.is_empty()).then(|| String::from_utf8_lossy(&got).trim().to_owned())
}

#[test]
fn the_bearer_token_is_checked_before_any_body_is_read() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let head = |auth: &str| {
        format!(
            "POST /api/v1/processes HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n{auth}\r\n"
        )
    };
    // No token, or a wrong one: 401 at once, though not a byte of the body was sent.
    for auth in ["", "Authorization: Bearer wrong\r\n"] {
        let status = status_without_body(&server, &head(auth), std::time::Duration::from_secs(10));
        assert!(
            status.as_deref().is_some_and(|s| s.contains(" 401 ")),
            "{auth:?}: {status:?}"
        );
    }
    // The control: with the right token the server waits for the body it was promised.
    let right = format!("Authorization: Bearer {}\r\n", server.admin_token);
    let status = status_without_body(&server, &head(&right), std::time::Duration::from_secs(1));
    assert_eq!(status, None, "answered before the body arrived");
    // Nothing was created.
    assert_eq!(
        server.request("GET", "/api/v1/processes", None).json(),
        serde_json::json!([])
    );
}

const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

fn online(server: &Server, agent: &Agent) {
    eventually("agent online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
}

fn step<'a>(job: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    job["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {job}"))
}

#[test]
fn step_results_too_large_for_a_frame_fail_visibly_and_nul_bytes_never_reach_a_step() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let mut agent = Agent::install(&server, dir.path(), "big-1", &[]);
    agent.run();
    online(&server, &agent);
    let nuls = tether_tests::fixtures::tiny_http_bytes(200, vec![0u8; 64 * 1024]);
    server.put_process(&json!({"name": "results", "steps": [
        {"name": "fetch", "plugin": "http", "step": "request",
         "properties": {"url": format!("http://{nuls}/")}},
        {"name": "use", "plugin": "shell", "step": "run",
         "properties": {"script": "printf %s \"$TETHER_OUTPUT_BODY\" | wc -c"}},
        {"name": "many", "plugin": "shell", "step": "run", "properties": {"script":
            "i=0; while [ $i -lt 400 ]; do printf '::output k%d=%01024d\\n' $i 0; i=$((i+1)); done"}},
        {"name": "after", "plugin": "shell", "step": "run", "properties": {"script": "echo ran"}}
    ]}));
    let id = server.deploy("results", json!({"agents": ["big-1"]}), json!({}));
    let d = server.wait_deployment(&id, WAIT);
    let job = &d["jobs"][0];
    // The NUL body arrives cut to what a result can carry, without a NUL, and the next step
    // gets it in its environment.
    let fetch = step(job, "fetch");
    assert_eq!(fetch["status"], "succeeded", "{fetch}");
    let body = fetch["outputs"]["body"].as_str().unwrap();
    assert!(
        !body.contains('\0') && body.ends_with("[truncated]"),
        "{}",
        body.len()
    );
    assert_eq!(step(job, "use")["status"], "succeeded", "{job}");
    // 400 outputs of 1 KiB: the step fails and says why, keeping what fits.
    let many = step(job, "many");
    assert_eq!(many["status"], "failed", "{many}");
    let message = many["message"].as_str().unwrap();
    assert!(message.contains("outputs refused"), "{message}");
    let kept = many["outputs"].as_object().unwrap().len();
    assert!((1..=100).contains(&kept), "{kept} outputs kept");
    // Never `succeeded` with a step that did not: the rest is skipped, the job failed.
    assert_eq!(step(job, "after")["status"], "skipped");
    assert_eq!(job["status"], "failed");
    assert_eq!(d["status"], "failed");
}

#[test]
fn an_agent_flooding_output_is_capped_and_late_output_refused_while_others_finish() {
    use std::sync::atomic::Ordering;
    use tether_tests::loadgen::{enroll, Fleet, JobOutput, SimConfig};
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let mut good = Agent::install(&server, dir.path(), "good-1", &[]);
    good.run();
    online(&server, &good);
    let ca = std::fs::read_to_string(server.ca_path()).unwrap();
    let tls = tether_shared::tls::client_config(&ca).unwrap();
    let flooder = enroll(
        server.wss,
        Arc::new(tls.clone()),
        "localhost",
        &server.token(1),
        "flooder",
    )
    .unwrap();
    let flooder_id = flooder.agent_id.clone();
    // 70 chunks of 200 KB (14 MB) for its step, then 10 more after its job ended.
    let mut cfg = SimConfig::new(server.wss, "localhost", tls);
    cfg.threads = 1;
    cfg.job_output = JobOutput {
        chunks: 70,
        chunk_bytes: 200_000,
        after_finish: 10,
    };
    let fleet = Fleet::start(cfg, vec![flooder]).unwrap();
    eventually("the flooder online", WAIT, || {
        (fleet.stats().ready.load(Ordering::Relaxed) == 1).then_some(())
    });
    server.put_process(&json!({"name": "one", "steps": [
        {"name": "say", "plugin": "shell", "step": "run", "properties": {"script": "echo hello"}}
    ]}));
    // The positive control first: the good agent's deployment, timed alone.
    let started = std::time::Instant::now();
    let alone = server.deploy("one", json!({"agents": ["good-1"]}), json!({}));
    assert_eq!(server.wait_deployment(&alone, WAIT)["status"], "succeeded");
    let control = started.elapsed();
    let journal_before = tether_tests::measure::disk_bytes(&server.dir.join("journal"));

    let flood = server.deploy("one", json!({"agents": ["flooder"]}), json!({}));
    let started = std::time::Instant::now();
    let beside = server.deploy("one", json!({"agents": ["good-1"]}), json!({}));
    assert_eq!(server.wait_deployment(&beside, WAIT)["status"], "succeeded");
    let during = started.elapsed();
    let d = server.wait_deployment(&flood, WAIT);
    assert_eq!(d["status"], "succeeded", "{d}");
    // The late chunks reach the server and are refused, counted.
    let refused = eventually("late output refused", WAIT, || {
        let n = tether_tests::wire::health(&server)["deployments"]["output_refused"]
            .as_u64()
            .unwrap_or(0);
        (n >= 10).then_some(n)
    });
    let deferred = tether_tests::wire::health(&server)["agents"][&flooder_id]["events_deferred"]
        .as_u64()
        .unwrap_or(0);
    eprintln!("flood: {deferred} events deferred (resent by the agent when asked)");
    let log = server.step_log(&flood, &flooder_id, "say");
    let journal_after = tether_tests::measure::disk_bytes(&server.dir.join("journal"));
    eprintln!(
        "flood: log {} bytes, {refused} chunks refused, journal {journal_before} -> {journal_after} bytes; \
         the good agent's deployment took {control:?} alone, {during:?} beside the flood",
        log.len()
    );
    let max = tether_shared::protocol::MAX_STEP_OUTPUT + 100;
    assert!(log.len() <= max, "the log kept {} bytes", log.len());
    assert!(log.ends_with(tether_shared::protocol::OUTPUT_TRUNCATED));
    assert_eq!(log.matches("[output truncated").count(), 1);
    // The journal holds the capped log (events are kept as their CRC): 22 MB on sled here,
    // 65 MB when every event was also kept whole.
    assert!(
        journal_after.saturating_sub(journal_before) < 32 * 1024 * 1024,
        "journal grew from {journal_before} to {journal_after}"
    );
    assert!(
        during < control * 10 + std::time::Duration::from_secs(10),
        "the good agent waited {during:?} beside the flood ({control:?} alone)"
    );
    fleet.stop();
}

/// The files holding step logs in the server's journal.
fn step_log_files(server: &Server) -> usize {
    let blobs = server.dir.join("journal").join("files");
    std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .map(|shard| std::fs::read_dir(shard.path()).unwrap().count())
        .sum()
}

#[test]
fn finished_work_is_pruned_on_both_ends_by_policy_and_on_demand() {
    let dir = TestDir::new();
    // The server keeps one finished deployment and prunes every second; the agent deletes a
    // job's record and work directory as soon as the server has its end.
    let server = Server::start_with(
        dir.path(),
        &[
            ("TETHER_RETENTION__KEEP_DEPLOYMENTS", "1"),
            ("TETHER_RETENTION__PRUNE_INTERVAL_S", "1"),
        ],
    );
    let mut agent = Agent::install_with(
        &server,
        dir.path(),
        "keep-1",
        &[],
        &[("TETHER_AGENT__JOB_RETENTION_MS", "0")],
    );
    agent.run();
    online(&server, &agent);
    server.put_process(&json!({"name": "one", "steps": [
        {"name": "say", "plugin": "shell", "step": "run", "properties": {"script": "echo kept"}}
    ]}));
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = server.deploy("one", json!({"agents": ["keep-1"]}), json!({}));
        assert_eq!(server.wait_deployment(&id, WAIT)["status"], "succeeded");
        // The agent's copy goes once the server acknowledged the job's end.
        let work = agent.dir.join("work").join(format!("{id}-{}", agent.id));
        eventually("the job's work directory pruned on the agent", WAIT, || {
            (!work.exists()).then_some(())
        });
        ids.push(id);
    }
    // On the server, the policy leaves the newest one; the others and their logs are gone.
    eventually("older deployments pruned", WAIT, || {
        let list = server.request("GET", "/api/v1/deployments", None).json();
        (list.as_array().map(Vec::len) == Some(1)).then_some(())
    });
    // Each step's log is a file of its own: the pruned ones' are gone, the disk freed.
    assert_eq!(
        step_log_files(&server),
        1,
        "only the kept deployment's log file"
    );
    let newest = ids.last().unwrap();
    assert_eq!(server.deployment(newest)["status"], "succeeded");
    assert!(server.step_log(newest, "keep-1", "say").contains("kept"));
    for old in &ids[..2] {
        let r = server.request("GET", &format!("/api/v1/deployments/{old}"), None);
        assert_eq!(r.status, 404, "{old}: {}", r.body);
        let r = server.request(
            "GET",
            &format!("/api/v1/deployments/{old}/jobs/keep-1/steps/say/log"),
            None,
        );
        assert_eq!(r.status, 404, "{old}'s log: {}", r.body);
    }
    // On demand, from the CLI: the last one goes too.
    let cli = tether_tests::tether_cli::Tether::new(dir.path());
    cli.login(&server);
    let answer = cli.json(&["deployments", "prune", "--keep", "0"]);
    assert_eq!(answer["kept"], 0, "{answer}");
    assert_eq!(answer["pruned"], 1, "{answer}");
    assert_eq!(step_log_files(&server), 0, "every log file is gone");
    // A bad request changes nothing.
    let r = server.request(
        "POST",
        "/api/v1/deployments/prune",
        Some(&json!({"keep": -1})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    // A deployment still running is never pruned, whatever the policy.
    server.put_process(&json!({"name": "slow", "steps": [
        {"name": "nap", "plugin": "shell", "step": "run", "properties": {"script": "sleep 3"}}
    ]}));
    let running = server.deploy("slow", json!({"agents": ["keep-1"]}), json!({}));
    let r = server.request(
        "POST",
        "/api/v1/deployments/prune",
        Some(&json!({"keep": 0, "older_than_days": 0})),
    );
    assert_eq!(r.json()["kept"], 1, "{}", r.body);
    assert_eq!(
        server.wait_deployment(&running, WAIT)["status"],
        "succeeded"
    );
}

/// The ALPN protocol `addr` agrees to when offered `protocols`; `Err` if the handshake fails.
fn negotiated(
    server: &Server,
    addr: std::net::SocketAddr,
    protocols: &[&[u8]],
) -> Result<Option<Vec<u8>>, String> {
    use std::io::Write;
    let mut config = (*server.tls()).clone();
    config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap())
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // Writing drives the handshake to its end (or its failure).
    tls.write_all(b"GET /admin/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .and_then(|()| tls.flush())
        .map_err(|e| e.to_string())?;
    Ok(tls.conn.alpn_protocol().map(<[u8]>::to_vec))
}

#[test]
fn alpn_is_pinned_to_http_1_1_on_both_listeners() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    for (name, addr) in [("https", server.https), ("wss", server.wss)] {
        // A browser offers both and gets HTTP/1.1 (HTTP/2 would allow unbounded streams).
        assert_eq!(
            negotiated(&server, addr, &[b"h2", b"http/1.1"]),
            Ok(Some(b"http/1.1".to_vec())),
            "{name}"
        );
        // A client that speaks only HTTP/2 is refused at the handshake.
        assert!(
            negotiated(&server, addr, &[b"h2"]).is_err(),
            "{name}: h2 alone was accepted"
        );
        // The control: no ALPN at all is plain HTTP/1.1, as curl --http1.1 sends it.
        assert_eq!(negotiated(&server, addr, &[]), Ok(None), "{name}");
    }
}

/// Sends `head` over TLS to `addr`, then a byte of body every 2 s; answers how long until the
/// server ended the exchange (a status line or a close), `None` if it never did within 60 s.
fn trickle(server: &Server, addr: std::net::SocketAddr, head: &str) -> Option<std::time::Duration> {
    use std::io::{Read, Write};
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let conn =
        rustls::ClientConnection::new(server.tls(), "localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let started = std::time::Instant::now();
    tls.write_all(head.as_bytes()).unwrap();
    tls.flush().unwrap();
    let mut byte = [0u8; 1];
    while started.elapsed() < std::time::Duration::from_secs(60) {
        match tls.read(&mut byte) {
            Ok(_) => return Some(started.elapsed()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(started.elapsed()),
        }
        if tls.write_all(b"{").and_then(|()| tls.flush()).is_err() {
            return Some(started.elapsed());
        }
    }
    None
}

#[test]
fn a_body_trickled_a_byte_at_a_time_is_cut_on_both_listeners() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let api = format!(
        "POST /api/v1/processes HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000\r\nAuthorization: Bearer {}\r\n\r\n",
        server.admin_token
    );
    let enroll = "POST /agent/v1/enroll HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n";
    for (name, addr, head) in [
        ("https", server.https, api.as_str()),
        ("wss", server.wss, enroll),
    ] {
        let cut = trickle(&server, addr, head);
        eprintln!("{name}: a trickled body was cut after {cut:?}");
        // 10 s of grace (the floor is 16 KiB/s after it); it used to last 75 s and 45 s.
        assert!(
            cut.is_some_and(|d| d < std::time::Duration::from_secs(25)),
            "{name}: {cut:?}"
        );
    }
    // Nothing was created; the control: the same request, sent whole, works.
    assert_eq!(
        server.request("GET", "/api/v1/processes", None).json(),
        json!([])
    );
    server.put_process(&json!({"name": "whole", "steps": [
        {"name": "say", "plugin": "shell", "step": "run", "properties": {"script": "echo hi"}}
    ]}));
}

/// A size-limited tmpfs mounted at a directory, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs at {}", at.display());
        Tmpfs(at.to_owned())
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {}", self.0.display());
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0u8; 256 * 1024];
        while f.write_all(&block).is_ok() {}
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_refuses_new_work_loses_nothing_and_recovers_by_itself() {
    let dir = TestDir::new();
    // The server's data directory on a 48 MB filesystem (mounted before `init` fills it).
    let disk = Tmpfs::mount(&dir.path().join("server"), "48m");
    let mut server = Server::start(dir.path());
    // Once more, now on the ports it got: a restart in place keeps them.
    server.kill();
    server.run();
    let mut agent = Agent::install(&server, dir.path(), "disk-1", &[]);
    agent.run();
    online(&server, &agent);
    server.put_process(&json!({"name": "slow", "steps": [
        {"name": "nap", "plugin": "shell", "step": "run",
         "properties": {"script": "sleep 3; echo slept"}}
    ]}));
    let under_way = server.deploy("slow", json!({"agents": ["disk-1"]}), json!({}));
    eventually("the step running", WAIT, || {
        (server.deployment(&under_way)["jobs"][0]["steps"][0]["status"] == "running").then_some(())
    });
    disk.fill();
    // Writes fail once sled's preallocated room is spent too: store processes until then.
    let big = "x".repeat(32 * 1024);
    let refused = eventually("a write refused for the full disk", WAIT, || {
        let r = server.request(
            "POST",
            "/api/v1/processes",
            Some(&json!({"name": "filler", "steps": [
                {"name": "s", "plugin": "shell", "step": "run", "properties": {"script": big}}
            ]})),
        );
        (r.status != 201).then_some(r)
    });
    assert_eq!(refused.status, 507, "{}", refused.body);
    assert!(refused.body.contains("disk is full"), "{}", refused.body);
    // New work is refused with the reason, and nothing is created.
    let before = server.request("GET", "/api/v1/deployments", None).json();
    let r = server.request(
        "POST",
        "/api/v1/deployments",
        Some(&json!({"process": "slow", "targets": {"agents": ["disk-1"]}})),
    );
    assert_eq!(r.status, 507, "{}", r.body);
    let health = tether_tests::wire::health(&server);
    assert!(
        health["storage"]["failed"]
            .as_str()
            .is_some_and(|r| r.contains("No space left")),
        "{health}"
    );
    let r = server.request("GET", "/api/v1/deployments", None);
    assert_eq!(r.status, 200, "reads are served: {}", r.body);
    assert!(r.json() == before, "a refused deployment was created");

    // Space returns: the server starts over by itself, and the deployment under way ends.
    disk.resize("400m");
    let health = eventually("storage recovered", WAIT, || {
        // The server restarts in place: a request may find it between two lives.
        server
            .try_health()
            .filter(|h| h["storage"]["failed"].is_null())
    });
    eprintln!("recovered: {}", health["storage"]);
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.contains("storage-recovered-restarting"), "{log}");
    let d = server.wait_deployment(&under_way, WAIT);
    assert_eq!(d["status"], "succeeded", "{d}");
    assert!(server
        .step_log(&under_way, "disk-1", "nap")
        .contains("slept"));
    let again = server.deploy("slow", json!({"agents": ["disk-1"]}), json!({}));
    assert_eq!(server.wait_deployment(&again, WAIT)["status"], "succeeded");
    drop(agent);
    drop(server);
    drop(disk);
}

#[test]
fn an_agent_on_a_full_disk_goes_offline_and_comes_back_when_space_returns() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let disk = Tmpfs::mount(&dir.path().join("full-1"), "24m");
    let mut agent = Agent::install(&server, dir.path(), "full-1", &[]);
    agent.run();
    online(&server, &agent);
    server.put_process(&json!({"name": "loud", "steps": [
        {"name": "shout", "plugin": "shell", "step": "run",
         "properties": {"script": "head -c 8000000 /dev/zero | tr '\\\\0' x; sleep 1"}}
    ]}));
    server.put_process(&json!({"name": "quiet", "steps": [
        {"name": "say", "plugin": "shell", "step": "run", "properties": {"script": "echo back"}}
    ]}));
    disk.fill();
    // Its output cannot be journaled: the agent stops acknowledging and goes offline.
    let loud = server.deploy("loud", json!({"agents": ["full-1"]}), json!({}));
    eventually("the agent offline", WAIT, || {
        (server.agent_status(&agent.id) == "offline").then_some(())
    });
    let log_path = dir.path().join("full-1.log");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(log.contains("uplink-storage-failed-offline"), "{log}");
    // Work sent meanwhile waits in the server's journal.
    let quiet = server.deploy("quiet", json!({"agents": ["full-1"]}), json!({}));
    assert_eq!(server.deployment(&quiet)["status"], "queued");

    // Space returns: the worker starts over from its journal and the agent comes back.
    disk.resize("400m");
    let _ = std::fs::remove_file(dir.path().join("full-1").join("filler"));
    online(&server, &agent);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(log.contains("storage-recovered-restarting"), "{log}");
    // The step cut short by the full disk is reported, never run twice; the rest runs.
    let d = server.wait_deployment(&loud, WAIT);
    assert_eq!(d["status"], "failed", "{d}");
    assert_eq!(d["jobs"][0]["steps"][0]["status"], "interrupted", "{d}");
    assert_eq!(server.wait_deployment(&quiet, WAIT)["status"], "succeeded");
    assert!(server.step_log(&quiet, "full-1", "say").contains("back"));
    drop(agent);
    drop(disk);
}

/// A TCP connection to `addr` from `source`, sending nothing.
fn tcp_from(source: [u8; 4], addr: std::net::SocketAddr) -> std::net::TcpStream {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .unwrap();
    socket
        .bind(&std::net::SocketAddr::from((source, 0)).into())
        .unwrap();
    socket.connect(&addr.into()).unwrap();
    socket.into()
}

/// Whether the server has closed the non-blocking `tcp` (EOF or reset).
fn is_closed(tcp: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut byte = [0u8; 1];
    match tcp.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[test]
fn one_source_cannot_take_every_tls_handshake_slot() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    // 160 connections from 127.0.0.1 that never start TLS: the server holds 128 of them
    // (its per-source handshake bound) until the handshake deadline, and closes the rest at
    // once, before any TLS work.
    let mut idle: Vec<_> = (0..160)
        .map(|_| tcp_from([127, 0, 0, 1], server.https))
        .collect();
    // Which ones are refused depends on the order the server's workers take them in, so
    // every connection is watched at once, well within the handshake deadline (5 s) that
    // ends the held ones: exactly the 32 over the bound are closed.
    let started = std::time::Instant::now();
    for c in &idle {
        c.set_nonblocking(true).unwrap();
    }
    let mut closed = vec![false; idle.len()];
    while closed.iter().filter(|c| **c).count() < 32
        && started.elapsed() < std::time::Duration::from_secs(3)
    {
        for (c, done) in idle.iter_mut().zip(closed.iter_mut()) {
            *done = *done || is_closed(c);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let closed = closed.iter().filter(|c| **c).count();
    assert_eq!(
        closed, 32,
        "the connections over the bound, and only they, are closed at once"
    );
    // Another address is served meanwhile.
    let auth = format!("Bearer {}", server.admin_token);
    let tcp = tcp_from([127, 0, 0, 3], server.https);
    let conn =
        rustls::ClientConnection::new(server.tls(), "localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    {
        use std::io::{Read, Write};
        write!(
            tls,
            "GET /admin/health HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 12];
        tls.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "another source was not served");
    }
    // Once the idle ones are gone, the first address is served again.
    drop(idle);
    eventually("127.0.0.1 served again", WAIT, || server.try_health());
}
