//! End-to-end tests of enrollment: `tether-server run` with both listeners on port 0,
//! enrollment tokens from the REST API, `tether-agent install` against the agent-facing
//! listener, and the refusals (spent, expired and wrong-role tokens, name conflicts, a foreign
//! CA, bad input, the wrong listener, missing admin token, repeated failures), plus the
//! registry surviving a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tether_shared::identity::Identity;
use tether_shared::tls;
use tether_tests::enrollment::signed;
use tether_tests::{command, https_request_with_body, run, stderr, stdout, ChildGuard, HttpReply};

/// Bound on every wait for the server (readiness, shutdown).
const DEADLINE: Duration = Duration::from_secs(30);

/// A server on a fresh data directory, both listeners on port 0.
struct Server {
    child: Option<ChildGuard>,
    tmp: tempfile::TempDir,
    data: PathBuf,
    https: SocketAddr,
    wss: SocketAddr,
    token: String,
    tls: Arc<rustls::ClientConfig>,
}

impl Server {
    fn start() -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("server");
        let out = run(
            "tether-server",
            tmp.path(),
            ["init", "--data", data.to_str().unwrap()],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let token = fs::read_to_string(data.join("admin.token")).unwrap();
        let ca = fs::read_to_string(data.join("ca.pem")).unwrap();
        let tls = Arc::new(tls::client_config(&ca).unwrap());
        let unbound: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut server = Server {
            child: None,
            tmp,
            data,
            https: unbound,
            wss: unbound,
            token,
            tls,
        };
        server.launch();
        server
    }

    /// Starts `tether-server run` and waits for `ports.json`.
    fn launch(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join("server.log"))
            .unwrap();
        let mut cmd = command("tether-server", self.tmp.path());
        cmd.args(["run", "--data", self.data.to_str().unwrap()])
            .env("TETHER_LISTEN__HTTPS", "127.0.0.1:0")
            .env("TETHER_LISTEN__WSS", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = ChildGuard::spawn("tether-server run", &mut cmd);
        let ports: Value =
            serde_json::from_str(&child.wait_for_file(&self.data.join("ports.json"), DEADLINE))
                .unwrap();
        self.https = ports["https"].as_str().unwrap().parse().unwrap();
        self.wss = ports["wss"].as_str().unwrap().parse().unwrap();
        self.child = Some(child);
    }

    /// SIGTERM, wait for a clean exit, start again on the same data directory.
    fn restart(&mut self) {
        let mut child = self.child.take().unwrap();
        child.signal("TERM");
        let status = child.wait_exit(DEADLINE).expect("server did not stop");
        assert_eq!(status.code(), Some(0), "{}", self.log());
        self.launch();
    }

    fn log(&self) -> String {
        fs::read_to_string(self.tmp.path().join("server.log")).unwrap_or_default()
    }

    fn ca_path(&self) -> PathBuf {
        self.data.join("ca.pem")
    }

    fn upstream(&self) -> String {
        format!("wss://localhost:{}", self.wss.port())
    }

    fn send(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        authorization: Option<&str>,
        body: Option<&str>,
    ) -> HttpReply {
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(value) = authorization {
            headers.push(("Authorization", value));
        }
        https_request_with_body(
            addr,
            self.tls.clone(),
            "localhost",
            method,
            path,
            &headers,
            body.map(str::as_bytes),
        )
        .unwrap()
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// `POST /api/v1/enrollment-tokens` with the admin token.
    fn create_token(&self, body: Value) -> HttpReply {
        let bearer = self.bearer();
        self.send(
            self.https,
            "POST",
            "/api/v1/enrollment-tokens",
            Some(&bearer),
            Some(&body.to_string()),
        )
    }

    /// A token that must be created; returns its text and the whole answer.
    fn token(&self, uses: u32, ttl_s: u64, role: &str) -> (String, Value) {
        let reply = self.create_token(json!({"uses": uses, "ttl_s": ttl_s, "role": role}));
        assert_eq!(reply.status, 201, "{}", reply.body);
        let body = reply.json();
        (body["token"].as_str().unwrap().to_owned(), body)
    }

    /// `GET /api/v1/agents` with the admin token.
    fn agents(&self) -> Vec<Value> {
        let bearer = self.bearer();
        let reply = self.send(self.https, "GET", "/api/v1/agents", Some(&bearer), None);
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json().as_array().unwrap().clone()
    }

    /// `POST /agent/v1/enroll` on the agent-facing listener.
    fn enroll(&self, body: &Value) -> HttpReply {
        self.send(
            self.wss,
            "POST",
            "/agent/v1/enroll",
            None,
            Some(&body.to_string()),
        )
    }

    /// Runs `tether-agent install` into `data` (a directory under the test's temp dir).
    fn install(&self, data: &Path, token: &str, name: &str, extra: &[&str]) -> Output {
        let upstream = self.upstream();
        let ca = self.ca_path();
        let mut args = vec![
            "install",
            "--upstream",
            &upstream,
            "--ca",
            ca.to_str().unwrap(),
            "--token",
            token,
            "--name",
            name,
            "--data",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run("tether-agent", self.tmp.path(), args)
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn now_unix_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn names(agents: &[Value]) -> Vec<String> {
    agents
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn install_enrolls_an_agent_that_is_listed_and_survives_a_restart() {
    let mut server = Server::start();
    let (token, created) = server.token(3, 3600, "agent");
    assert_eq!(created["uses"], 3);
    assert_eq!(created["role"], "agent");
    assert!(token.starts_with("tte_") && token.len() == 47, "{token}");
    let expires = created["expires_unix_ms"].as_u64().unwrap();
    assert!(expires > now_unix_ms() + 3_500_000, "{created}");
    assert!(!server.log().contains(&token), "the token is never logged");

    let dir = server.dir("agent-1");
    let out = server.install(&dir, &token, "web-1", &["--tag", "web", "--tag", "eu"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("agent.key")), 0o600);
    assert_eq!(mode(&dir.join("agent.json")), 0o644);
    assert_eq!(
        fs::read_to_string(dir.join("ca.pem")).unwrap(),
        fs::read_to_string(server.ca_path()).unwrap()
    );
    let state: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("agent.json")).unwrap()).unwrap();
    let id = state["agent_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("a-") && id.len() == 18, "{state}");
    assert!(stdout(&out).contains(&id));
    assert_eq!(state["name"], "web-1");
    assert_eq!(state["tags"], json!(["web", "eu"]));
    assert_eq!(state["upstreams"], json!([server.upstream()]));
    let signing_pub = fs::read_to_string(server.data.join("signing.pub")).unwrap();
    assert_eq!(state["server_signing_key"], signing_pub.trim());

    let agents = server.agents();
    assert_eq!(agents.len(), 1, "{agents:?}");
    let agent = &agents[0];
    assert_eq!(agent["id"], id.as_str());
    assert_eq!(agent["name"], "web-1");
    assert_eq!(agent["status"], "offline");
    assert_eq!(agent["version"], Value::Null);
    assert_eq!(agent["tags"], json!(["web", "eu"]));
    assert_eq!(agent["path"], json!([]));

    // A second install over the same directory is refused and changes nothing.
    let out = server.install(&dir, &token, "web-1", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already installed"),
        "{}",
        stderr(&out)
    );

    // Same name, another key: conflict, nothing added, no use consumed.
    let out = server.install(&server.dir("agent-1b"), &token, "web-1", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("409")
            && stderr(&out).contains("name already enrolled with another key")
            && stderr(&out).contains("tether agents delete NAME"),
        "{}",
        stderr(&out)
    );
    assert_eq!(server.agents().len(), 1);

    // Same name, same key (a retry after a lost answer): the same id, no use consumed.
    let identity = Identity::load(&dir.join("agent.key")).unwrap();
    let key = identity.public_key_b64();
    let retry = signed(
        json!({"token": token, "name": "web-1", "public_key": key, "tags": ["web", "eu"]}),
        &identity,
        None,
    );
    for _ in 0..2 {
        let reply = server.enroll(&retry);
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["agent_id"], id.as_str());
        assert_eq!(reply.json()["server_signing_key"], signing_pub.trim());
    }
    // So the token still has its two other uses.
    for name in ["web-2", "web-3"] {
        let out = server.install(&server.dir(name), &token, name, &[]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
    }
    let out = server.install(&server.dir("web-4"), &token, "web-4", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("invalid or expired enrollment token"),
        "{}",
        stderr(&out)
    );
    assert_eq!(names(&server.agents()), ["web-1", "web-2", "web-3"]);

    // `--force` enrolls again over an installation (same key, so the same id).
    let (token2, _) = server.token(1, 3600, "agent");
    let out = server.install(
        &dir,
        &token2,
        "web-1",
        &["--tag", "web", "--tag", "eu", "--force"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let again: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("agent.json")).unwrap()).unwrap();
    assert_eq!(again["agent_id"], id.as_str());

    server.restart();
    let after = server.agents();
    assert_eq!(names(&after), ["web-1", "web-2", "web-3"]);
    assert_eq!(after[0]["id"], id.as_str());
    assert_eq!(after[0]["tags"], json!(["web", "eu"]));
    assert_eq!(after[0]["status"], "offline");
    // The retry still works after the restart; the spent token still enrolls nobody new.
    let reply = server.enroll(&retry);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["agent_id"], id.as_str());
    let out = server.install(&server.dir("web-5"), &token, "web-5", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!server.log().contains(&token), "the token is never logged");
}

#[test]
fn spent_expired_and_wrong_role_tokens_are_refused_alike() {
    let server = Server::start();
    let (once, _) = server.token(1, 3600, "agent");
    let out = server.install(&server.dir("a"), &once, "first", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let before = server.agents();

    let refused = |out: &Output| {
        assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
        let err = stderr(out);
        assert!(err.contains("401"), "{err}");
        assert!(err.contains("invalid or expired enrollment token"), "{err}");
    };
    // Spent. A refused install leaves nothing behind: not the directory it made, and in a
    // directory that existed, not the files it made (and nothing else is touched).
    let dir = server.dir("b");
    refused(&server.install(&dir, &once, "second", &[]));
    assert!(!dir.exists(), "a refused install left {}", dir.display());
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("notes.txt"), "mine").unwrap();
    refused(&server.install(&dir, &once, "second", &[]));
    let left: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["notes.txt"]);

    // Wrong role.
    let (relay, created) = server.token(5, 3600, "relay");
    assert_eq!(created["role"], "relay");
    refused(&server.install(&server.dir("c"), &relay, "third", &[]));

    // Unknown.
    refused(&server.install(&server.dir("d"), "no-such-token", "fourth", &[]));

    // Expired: wait (by polling the clock) until past its expiry.
    let (short, created) = server.token(5, 1, "agent");
    let expires = created["expires_unix_ms"].as_u64().unwrap();
    while now_unix_ms() <= expires + 50 {
        std::thread::sleep(Duration::from_millis(20));
    }
    refused(&server.install(&server.dir("e"), &short, "fifth", &[]));

    assert_eq!(server.agents(), before, "no new agent appeared");
}

#[test]
fn listeners_keep_their_own_routes_and_check_their_input() {
    let server = Server::start();
    let bearer = server.bearer();
    // Each surface exists on its own listener only.
    let reply = server.send(server.https, "POST", "/agent/v1/enroll", None, Some("{}"));
    assert_eq!(reply.status, 404, "{}", reply.body);
    let reply = server.send(server.wss, "GET", "/api/v1/agents", Some(&bearer), None);
    assert_eq!(reply.status, 404, "{}", reply.body);
    let reply = server.send(
        server.wss,
        "POST",
        "/api/v1/enrollment-tokens",
        Some(&bearer),
        Some(r#"{"uses":1,"ttl_s":60}"#),
    );
    assert_eq!(reply.status, 404, "{}", reply.body);
    let reply = server.send(server.wss, "GET", "/admin/health", Some(&bearer), None);
    assert_eq!(reply.status, 404, "{}", reply.body);

    // No or wrong admin token: 401, also before looking at a bad body.
    for auth in [None, Some("Bearer wrong"), Some("")] {
        let reply = server.send(server.https, "GET", "/api/v1/agents", auth, None);
        assert_eq!(reply.status, 401, "{auth:?}: {}", reply.body);
        let reply = server.send(
            server.https,
            "POST",
            "/api/v1/enrollment-tokens",
            auth,
            Some("not json"),
        );
        assert_eq!(reply.status, 401, "{auth:?}: {}", reply.body);
    }

    // Bad bodies and values: 400 with the reason.
    for (body, needle) in [
        ("not json", "invalid JSON"),
        (r#"{"uses":1,"ttl_s":60,"extra":true}"#, "unknown field"),
        (r#"{"uses":1,"ttl_s":60,"role":"admin"}"#, "unknown variant"),
        (r#"{"ttl_s":60}"#, "missing field"),
        (r#"{"uses":0,"ttl_s":60}"#, "uses"),
        (r#"{"uses":10001,"ttl_s":60}"#, "uses"),
        (r#"{"uses":-1,"ttl_s":60}"#, "invalid"),
        (r#"{"uses":1,"ttl_s":0}"#, "ttl_s"),
        (r#"{"uses":1,"ttl_s":2592001}"#, "ttl_s"),
    ] {
        let reply = server.send(
            server.https,
            "POST",
            "/api/v1/enrollment-tokens",
            Some(&bearer),
            Some(body),
        );
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
        assert!(
            reply.json()["error"].as_str().unwrap().contains(needle),
            "{body}: {}",
            reply.body
        );
    }
    // Role defaults to agent.
    let reply = server.create_token(json!({"uses": 1, "ttl_s": 60}));
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(reply.json()["role"], "agent");
    let token = reply.json()["token"].as_str().unwrap().to_owned();

    let identity = Identity::generate();
    let key = identity.public_key_b64();
    let sign = |body: Value| signed(body, &identity, None);
    let mut unsigned = sign(json!({"token": token, "name": "x", "public_key": key}));
    unsigned.as_object_mut().unwrap().remove("proof");
    let mut forged = sign(json!({"token": token, "name": "x", "public_key": key}));
    // Signed by another key than the one enrolled: whoever sends it does not hold `key`.
    forged["proof"] =
        sign(json!({"token": token, "name": "y", "public_key": key}))["proof"].clone();
    for (body, needle) in [
        (json!("not an object"), "invalid JSON"),
        (
            json!({"token": token, "name": "x", "public_key": key, "proof": "", "admin": true}),
            "unknown field",
        ),
        (unsigned, "missing field `proof`"),
        (forged, "proof does not verify"),
        (
            sign(json!({"token": token, "name": "bad name", "public_key": key})),
            "name",
        ),
        (
            sign(json!({"token": token, "name": "x".repeat(65), "public_key": key})),
            "name",
        ),
        (
            json!({"token": token, "name": "x", "public_key": "AAAA", "proof": ""}),
            "public key",
        ),
        (
            sign(json!({"token": token, "name": "x", "public_key": key, "tags": ["a b"]})),
            "tag",
        ),
    ] {
        let reply = server.enroll(&body);
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
        assert!(
            reply.json()["error"].as_str().unwrap().contains(needle),
            "{body}: {}",
            reply.body
        );
    }
    let reply = server.send(server.wss, "GET", "/agent/v1/enroll", None, None);
    assert_eq!(reply.status, 405, "{}", reply.body);
    // None of that consumed the token.
    let reply = server.enroll(&sign(
        json!({"token": token, "name": "ok", "public_key": key}),
    ));
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[test]
fn install_trusts_only_the_given_ca_and_fails_over_between_upstreams() {
    let server = Server::start();
    let (token, _) = server.token(2, 3600, "agent");

    let foreign = tls::Ca::generate("Someone else's CA").unwrap();
    let foreign_pem = server.dir("foreign-ca.pem");
    fs::write(&foreign_pem, foreign.cert_pem()).unwrap();
    let dir = server.dir("a");
    let upstream = server.upstream();
    let out = run(
        "tether-agent",
        server.tmp.path(),
        [
            "install",
            "--upstream",
            &upstream,
            "--ca",
            foreign_pem.to_str().unwrap(),
            "--token",
            &token,
            "--name",
            "a",
            "--data",
            dir.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("certificate") && err.contains("issuer"),
        "{err}"
    );
    assert!(!dir.join("agent.json").exists());

    // Bad usage: exit 2, nothing written.
    let dir = server.dir("b");
    for bad in [
        "https://localhost:1",
        "ws://localhost:1",
        "wss://",
        "wss://h:0",
    ] {
        let out = run(
            "tether-agent",
            server.tmp.path(),
            [
                "install",
                "--upstream",
                bad,
                "--ca",
                server.ca_path().to_str().unwrap(),
                "--token",
                &token,
                "--name",
                "b",
                "--data",
                dir.to_str().unwrap(),
            ],
        );
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
        assert!(stderr(&out).contains("upstream"), "{bad}: {}", stderr(&out));
        assert!(!dir.exists());
    }

    // A dead first upstream is skipped; the second enrolls; both are kept in order.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("wss://localhost:{}", dead.local_addr().unwrap().port());
    drop(dead);
    let dir2 = server.dir("c");
    let out = run(
        "tether-agent",
        server.tmp.path(),
        [
            "install",
            "--upstream",
            &dead_url,
            "--upstream",
            &upstream,
            "--ca",
            server.ca_path().to_str().unwrap(),
            "--token",
            &token,
            "--name",
            "c",
            "--data",
            dir2.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let state: Value =
        serde_json::from_str(&fs::read_to_string(dir2.join("agent.json")).unwrap()).unwrap();
    assert_eq!(state["upstreams"], json!([dead_url, upstream]));
    assert_eq!(names(&server.agents()), ["c"]);
}

#[test]
fn repeated_failures_from_one_source_are_limited() {
    let server = Server::start();
    let identity = Identity::generate();
    let key = identity.public_key_b64();
    let guess = signed(
        json!({"token": "guess", "name": "x", "public_key": key}),
        &identity,
        None,
    );
    for i in 0..20 {
        let reply = server.enroll(&guess);
        assert_eq!(reply.status, 401, "attempt {i}: {}", reply.body);
        assert_eq!(reply.json()["error"], "invalid or expired enrollment token");
    }
    let reply = server.enroll(&guess);
    assert_eq!(reply.status, 429, "{}", reply.body);
    assert!(reply.header("retry-after").is_some());
    // Even a valid token waits out the window from that source.
    let (token, _) = server.token(1, 3600, "agent");
    let reply = server.enroll(&signed(
        json!({"token": token, "name": "x", "public_key": key}),
        &identity,
        None,
    ));
    assert_eq!(reply.status, 429, "{}", reply.body);
}
