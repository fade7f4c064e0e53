//! End-to-end tests of `tether-server run`: the real binary on a fresh data directory, port 0,
//! readiness from `ports.json`, the admin endpoints over TLS trusting only the generated CA,
//! non-TLS bytes on the HTTPS port, a clean SIGTERM shutdown, and refusal of an uninitialized
//! directory.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tether_shared::tls;
use tether_tests::{command, https_request, raw_exchange, run, stderr, ChildGuard, HttpReply};

/// Bound on every wait for the server (readiness, shutdown).
const DEADLINE: Duration = Duration::from_secs(30);

/// A server started on a fresh data directory, with what a client needs to talk to it.
struct Server {
    child: ChildGuard,
    data: PathBuf,
    log: PathBuf,
    https: SocketAddr,
    token: String,
    tls: Arc<rustls::ClientConfig>,
    _tmp: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let out = run(
            "tether-server",
            tmp.path(),
            ["init", "--data", data.to_str().unwrap()],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let token = fs::read_to_string(data.join("admin.token")).unwrap();

        let log = tmp.path().join("server.log");
        let mut cmd = command("tether-server", tmp.path());
        cmd.args(["run", "--data", data.to_str().unwrap()])
            .env("TETHER_LISTEN__HTTPS", "127.0.0.1:0")
            .env("TETHER_LISTEN__WSS", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(fs::File::create(tmp.path().join("server.out")).unwrap())
            .stderr(fs::File::create(&log).unwrap());
        let mut child = ChildGuard::spawn("tether-server run", &mut cmd);

        let ports: serde_json::Value =
            serde_json::from_str(&child.wait_for_file(&data.join("ports.json"), DEADLINE)).unwrap();
        let https: SocketAddr = ports["https"].as_str().unwrap().parse().unwrap();
        assert_eq!(https.ip().to_string(), "127.0.0.1");
        assert_ne!(https.port(), 0);
        let wss: SocketAddr = ports["wss"].as_str().unwrap().parse().unwrap();
        assert_eq!(wss.ip().to_string(), "127.0.0.1");
        assert_ne!(wss.port(), 0);
        assert_ne!(wss.port(), https.port());
        assert_eq!(
            ports.as_object().unwrap().len(),
            2,
            "only what listens: {ports}"
        );

        let ca = fs::read_to_string(data.join("ca.pem")).unwrap();
        let tls = Arc::new(tls::client_config(&ca).unwrap());
        Server {
            child,
            data,
            log,
            https,
            token,
            tls,
            _tmp: tmp,
        }
    }

    fn get(&self, path: &str, authorization: Option<&str>) -> HttpReply {
        let headers: Vec<(&str, &str)> = authorization
            .map(|value| ("Authorization", value))
            .into_iter()
            .collect();
        https_request(
            self.https,
            self.tls.clone(),
            "localhost",
            "GET",
            path,
            &headers,
        )
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap()
    }

    fn assert_healthy(&self) {
        let reply = self.get("/admin/health", Some(&self.bearer()));
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let health = reply.json();
        let actors = health["actors"].as_array().unwrap();
        let journal = actors
            .iter()
            .find(|a| a["name"] == "journal")
            .unwrap_or_else(|| panic!("no journal actor: {health}"));
        assert_eq!(journal["kind"], "Journal", "{health}");
        assert_eq!(journal["state"], "running", "{health}");
        assert_eq!(journal["restarts"], 0, "{health}");
        assert!(journal["last_beat_ms"].is_u64(), "{health}");
        assert_eq!(health["sessions"], 0, "{health}");
        assert!(health["journal"]["incarnation"].is_string(), "{health}");
        assert!(health["journal"]["syncs"].is_u64(), "{health}");
        assert!(health["agents"].as_object().unwrap().is_empty(), "{health}");
        assert!(!reply.body.contains(&self.token));
    }
}

#[test]
fn run_serves_admin_endpoints_over_tls_and_stops_cleanly() {
    let mut server = Server::start();
    let data_dir_listing: Vec<String> = fs::read_dir(&server.data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        data_dir_listing.iter().any(|n| n == "journal"),
        "{data_dir_listing:?}"
    );

    server.assert_healthy();

    // Without a token, with a wrong one, with the right one under the wrong scheme: 401, JSON,
    // and the real token never appears in the answer.
    let wrong = format!("Bearer {}x", server.token);
    let basic = format!("Basic {}", server.token);
    for (path, auth) in [
        ("/admin/health", None),
        ("/admin/health", Some(wrong.as_str())),
        ("/admin/health", Some(basic.as_str())),
        ("/metrics", None),
        ("/metrics", Some(wrong.as_str())),
    ] {
        let reply = server.get(path, auth);
        assert_eq!(reply.status, 401, "{path} {auth:?}: {}", reply.body);
        assert!(reply.json()["error"].is_string(), "{}", reply.body);
        assert!(!reply.body.contains(&server.token), "{}", reply.body);
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }

    let metrics = server.get("/metrics", Some(&server.bearer()));
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    assert!(
        metrics
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        metrics.headers
    );
    for name in [
        "tether_journal_batches_total",
        "tether_journal_commits_total",
        "tether_journal_syncs_total",
        "tether_journal_queued",
        "tether_journal_failures_total",
    ] {
        assert!(
            metrics.body.lines().any(|l| l
                .split_once(' ')
                .is_some_and(|(n, v)| n == name && v.parse::<u64>().is_ok())),
            "{name} missing from:\n{}",
            metrics.body
        );
    }
    assert!(
        metrics.body.lines().any(|l| l == "tether_sessions 0"),
        "{}",
        metrics.body
    );
    assert!(!metrics.body.contains(&server.token));

    let missing = server.get("/no/such/route", Some(&server.bearer()));
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert_eq!(missing.json()["error"], "not found");

    // Plain HTTP to the TLS port gets no HTTP response, and the server keeps serving.
    let answer = raw_exchange(
        server.https,
        b"GET /admin/health HTTP/1.1\r\nHost: localhost\r\n\r\n",
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    server.assert_healthy();

    // SIGTERM: a graceful stop with exit code 0, ports.json removed.
    server.child.signal("TERM");
    let status = server
        .child
        .wait_exit(DEADLINE)
        .unwrap_or_else(|| panic!("no exit within {DEADLINE:?} of SIGTERM"));
    let log = server.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(!server.data.join("ports.json").exists());
    for event in ["server-listening", "server-stopping", "server-stopped"] {
        assert!(log.contains(event), "{event} missing from:\n{log}");
    }
    assert!(log.contains(&server.https.to_string()), "{log}");
    assert!(!log.contains(&server.token), "token leaked to the log");
    for key in ["signing.key", "server.key", "ca.key"] {
        let pem = fs::read_to_string(server.data.join(key)).unwrap();
        let body = pem.lines().nth(1).unwrap_or_default();
        assert!(!body.is_empty() && !log.contains(body), "{key} leaked");
    }
}

#[test]
fn sigint_also_stops_cleanly_and_a_restart_reuses_the_journal() {
    let mut server = Server::start();
    let first = server.get("/admin/health", Some(&server.bearer())).json();
    server.child.signal("INT");
    let status = server.child.wait_exit(DEADLINE).unwrap();
    assert_eq!(status.code(), Some(0), "{}", server.log());

    // Same data dir again: the journal's incarnation survives the restart.
    let mut cmd = command("tether-server", server.data.parent().unwrap());
    cmd.args(["run", "--data", server.data.to_str().unwrap()])
        .env("TETHER_LISTEN__HTTPS", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    server.child = ChildGuard::spawn("tether-server run (again)", &mut cmd);
    let ports = server
        .child
        .wait_for_file(&server.data.join("ports.json"), DEADLINE);
    server.https = serde_json::from_str::<serde_json::Value>(&ports).unwrap()["https"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let second = server.get("/admin/health", Some(&server.bearer())).json();
    assert_eq!(
        first["journal"]["incarnation"], second["journal"]["incarnation"],
        "{first}\n{second}"
    );
}

#[test]
fn run_refuses_an_uninitialized_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    for data in [tmp.path().join("absent"), tmp.path().to_path_buf()] {
        let out = run_on(tmp.path(), &data);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("not initialized"), "{err}");
        assert!(err.contains("tether-server init"), "{err}");
        assert!(!data.join("journal").exists(), "nothing may be created");
        assert!(!data.join("ports.json").exists());
    }
}

fn run_on(config_dir: &Path, data: &Path) -> std::process::Output {
    command("tether-server", config_dir)
        .args(["run", "--data", data.to_str().unwrap()])
        .env("TETHER_LISTEN__HTTPS", "127.0.0.1:0")
        .output()
        .unwrap()
}
