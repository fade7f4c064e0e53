//! What a relay credential can and cannot get, against the real binaries:
//! - a relay token yields a certificate only for keys the requester proves it holds, never for
//!   a name of the server, and once spent, only the same certificate again;
//! - that certificate comes from the relay CA, which operators' clients (`ca.pem`) never
//!   trust: the CLI refuses a relay that poses as the server, and sends it nothing;
//! - enrollment tokens are listed by id (never their text) and revoked at once, from the REST
//!   API and the CLI;
//! - installs read the token from a file or standard input, so it stays out of `ps`;
//! - an agent enrolling through a relay that alters the answer (to make it pin another
//!   command-signing key) refuses it and pins nothing.
//!
//! Deleting a relay while it carries agents is in `relay_faults.rs` (it shares the fault
//! harness there).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use tether_shared::identity::Identity;
use tether_shared::tls::{self, TlsKey};
use tether_tests::enrollment::{signed, tls_public_key};
use tether_tests::fleet::{Server, TestDir};
use tether_tests::relays::{Relay, RELAY_HOST};
use tether_tests::tether_cli::{server_url, Tether};
use tether_tests::{stderr, HttpReply};

fn enroll(server: &Server, body: &Value) -> HttpReply {
    tether_tests::https_request_with_body(
        server.wss,
        server.tls(),
        "localhost",
        "POST",
        "/agent/v1/enroll",
        &[("Content-Type", "application/json")],
        Some(body.to_string().as_bytes()),
    )
    .unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Whether `cert` (with `key`) passes a TLS handshake for `name` against the CA(s) in
/// `ca_pem`.
fn verifies(ca_pem: &str, cert: &str, key: &TlsKey, name: &str) -> bool {
    let client = Arc::new(tls::client_config(ca_pem).unwrap());
    let server = Arc::new(tls::server_config(cert, &key.key_pem()).unwrap());
    tls::handshake_in_memory(client, server, name).is_ok()
}

#[test]
fn a_relay_token_certifies_only_proven_keys_for_names_of_its_own_and_only_once() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let operator_ca = read(&server.operator_ca_path());
    let relay_ca = read(&server.dir.join("relay-ca.pem"));
    let token = server.enrollment_token("relay");
    let identity = Identity::generate();
    let tls_key = TlsKey::generate().unwrap();
    let request = |names: &[&str], key: &TlsKey, token: &str| {
        signed(
            json!({"token": token, "name": "r1", "public_key": identity.public_key_b64(),
                "role": "relay", "tls_public_key": tls_public_key(key), "hostnames": names}),
            &identity,
            Some(key),
        )
    };

    // The server's own names are refused, alone or among others, and spend nothing.
    for names in [&["localhost"][..], &["relay.example", "127.0.0.1"]] {
        let r = enroll(&server, &request(names, &tls_key, &token));
        assert_eq!(r.status, 400, "{names:?}: {}", r.body);
        assert!(r.body.contains("server's own names"), "{}", r.body);
        assert!(!r.body.contains("BEGIN CERTIFICATE"), "{}", r.body);
    }

    // The positive control: a name of its own, both keys proven.
    let r = enroll(&server, &request(&["relay.example"], &tls_key, &token));
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["agent_id"].as_str().unwrap().to_owned();
    let cert = r.json()["tls_certificate"].as_str().unwrap().to_owned();
    assert!(verifies(&relay_ca, &cert, &tls_key, "relay.example"));
    // Signed by the relay CA: what operators trust (ca.pem) does not accept it.
    assert!(!verifies(&operator_ca, &cert, &tls_key, "relay.example"));
    assert!(!verifies(&relay_ca, &cert, &tls_key, "localhost"));

    // The token is spent. The same request again (an install whose answer was lost) gets the
    // same id and a certificate for the same key and names, and nothing more.
    let r = enroll(&server, &request(&["relay.example"], &tls_key, &token));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["agent_id"], id.as_str());
    let again = r.json()["tls_certificate"].as_str().unwrap().to_owned();
    assert!(verifies(&relay_ca, &again, &tls_key, "relay.example"));
    // Other names, or another TLS key, with the spent token: refused, no certificate.
    let other_key = TlsKey::generate().unwrap();
    for (names, key) in [
        (&["relay.example", "evil.example"][..], &tls_key),
        (&["evil.example"], &tls_key),
        (&["relay.example"], &other_key),
    ] {
        let r = enroll(&server, &request(names, key, &token));
        assert_eq!(r.status, 409, "{names:?}: {}", r.body);
        assert!(
            r.body.contains("needs a relay enrollment token"),
            "{}",
            r.body
        );
        assert!(!r.body.contains("BEGIN CERTIFICATE"), "{}", r.body);
    }
    // Another identity with the spent token: nothing.
    let stranger = Identity::generate();
    let r = enroll(
        &server,
        &signed(
            json!({"token": token, "name": "r2", "public_key": stranger.public_key_b64(),
                "role": "relay", "tls_public_key": tls_public_key(&other_key),
                "hostnames": ["r2.example"]}),
            &stranger,
            Some(&other_key),
        ),
    );
    assert_eq!(r.status, 401, "{}", r.body);
    // Someone who knows the relay's public keys but holds neither cannot re-certify them.
    let mut replayed = request(&["relay.example"], &tls_key, &token);
    replayed["hostnames"] = json!(["evil.example"]);
    let r = enroll(&server, &replayed);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("proof does not verify"), "{}", r.body);

    // A fresh token lets the relay move to other names (and spends that token).
    let fresh = server.enrollment_token("relay");
    let r = enroll(&server, &request(&["relay2.example"], &tls_key, &fresh));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["agent_id"], id.as_str());
    let moved = r.json()["tls_certificate"].as_str().unwrap().to_owned();
    assert!(verifies(&relay_ca, &moved, &tls_key, "relay2.example"));
    let tokens = server.request("GET", "/api/v1/enrollment-tokens", None);
    assert_eq!(tokens.json(), json!([]), "both tokens are spent");

    let relays = server.request("GET", "/api/v1/relays", None).json();
    let names: Vec<&str> = relays
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["r1"]);
}

#[test]
fn a_relay_certificate_cannot_pose_as_the_server_to_operators() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let relay = Relay::start(&server, &[server.upstream()], dir.path(), "relay-a");
    let cli = Tether::new(&dir.path().join("cli"));
    let operator_ca = server.operator_ca_path();
    let agent_ca = server.ca_path();
    let impostor = format!("https://{RELAY_HOST}:{}", relay.downstream.port());
    let login = |url: &str, ca: &Path| {
        cli.run(&[
            "login",
            "--server",
            url,
            "--ca",
            ca.to_str().unwrap(),
            "--token",
            &server.admin_token,
        ])
    };

    // The relay, holding a valid certificate for the name the CLI dials, is refused by the
    // operators' CA before a byte of the request is sent.
    let out = login(&impostor, &operator_ca);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("untrusted issuer"),
        "{}",
        stderr(&out)
    );
    assert!(!cli.login_file().exists());
    // Contrast: with the agents' bundle the handshake does succeed (so the refusal above is
    // the CA's doing), and the relay, which serves no operator API, still refuses the login.
    let out = login(&impostor, &agent_ca);
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("untrusted issuer"),
        "{}",
        stderr(&out)
    );
    // The admin token never reached the relay's log (nor anything the relay keeps).
    let relay_log = read(&dir.path().join("relay-a.log"));
    assert!(!relay_log.contains(&server.admin_token));

    // A plain HTTPS client trusting ca.pem refuses the relay too; trusting the bundle, it
    // talks to it.
    let operator_tls = Arc::new(tls::client_config(&read(&operator_ca)).unwrap());
    let err = tether_tests::https_request(
        relay.downstream,
        operator_tls.clone(),
        RELAY_HOST,
        "GET",
        "/api/v1/agents",
        &[],
    )
    .unwrap_err();
    assert!(err.to_string().contains("untrusted issuer"), "{err}");
    let agent_tls = Arc::new(tls::client_config(&read(&agent_ca)).unwrap());
    tether_tests::https_request(
        relay.downstream,
        agent_tls,
        RELAY_HOST,
        "GET",
        "/agent/v1/nothing",
        &[],
    )
    .unwrap();

    // The positive control: the real server, with ca.pem.
    let out = login(&server_url(&server), &operator_ca);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    tether_tests::https_request(
        server.https,
        operator_tls,
        "localhost",
        "GET",
        "/admin/health",
        &[],
    )
    .unwrap();
}

#[test]
fn enrollment_tokens_are_listed_without_their_text_and_revoked_at_once() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let cli = Tether::new(&dir.path().join("cli"));
    cli.login(&server);
    let create = |uses: u32, role: &str| {
        let r = server.request(
            "POST",
            "/api/v1/enrollment-tokens",
            Some(&json!({"uses": uses, "ttl_s": 600, "role": role})),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        let body = r.json();
        (
            body["id"].as_str().unwrap().to_owned(),
            body["token"].as_str().unwrap().to_owned(),
        )
    };
    let (agent_id, agent_token) = create(3, "agent");
    let (relay_id, relay_token) = create(1, "relay");

    let listed = server.request("GET", "/api/v1/enrollment-tokens", None);
    assert_eq!(listed.status, 200, "{}", listed.body);
    let ids: Vec<String> = listed
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "{}", listed.body);
    assert!(
        ids.contains(&agent_id) && ids.contains(&relay_id),
        "{ids:?}"
    );
    assert!(
        !listed.body.contains(&agent_token) && !listed.body.contains(&relay_token),
        "a list never shows a token: {}",
        listed.body
    );
    let entry = listed
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == agent_id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(entry["role"], "agent");
    assert_eq!(entry["uses_left"], 3);
    // The CLI lists the same (list is the default), by id, without the text.
    assert_eq!(cli.json(&["tokens"]), listed.json());
    let out = cli.run(&["tokens", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = tether_tests::stdout(&out);
    assert!(
        table.contains(&agent_id) && !table.contains(&agent_token),
        "{table}"
    );

    // Revoked from the CLI: gone from the list, and it enrolls nobody.
    let out = cli.run(&["tokens", "revoke", &agent_id]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let install = |token_args: &[&str], name: &str, input: Option<&str>| {
        install_agent(&server, dir.path(), token_args, name, input)
    };
    let out = install(&["--token", &agent_token], "web-1", None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("invalid or expired enrollment token"),
        "{}",
        stderr(&out)
    );
    assert!(server.agents().is_empty());
    // Again, or an id that names nothing: 404, exit 1.
    for id in [agent_id.as_str(), "0123456789abcdef", "not-an-id"] {
        let out = cli.run(&["tokens", "revoke", id]);
        assert_eq!(out.status.code(), Some(1), "{id}: {}", stderr(&out));
    }
    // Revoked through REST.
    let r = server.request(
        "DELETE",
        &format!("/api/v1/enrollment-tokens/{relay_id}"),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["revoked"], true);
    assert_eq!(
        server
            .request("GET", "/api/v1/enrollment-tokens", None)
            .json(),
        json!([])
    );
    // Without the admin token, nothing is listed or revoked.
    for (method, path) in [
        ("GET", "/api/v1/enrollment-tokens".to_owned()),
        ("DELETE", format!("/api/v1/enrollment-tokens/{relay_id}")),
    ] {
        let r = tether_tests::https_request(
            server.https,
            server.tls(),
            "localhost",
            method,
            &path,
            &[],
        )
        .unwrap();
        assert_eq!(r.status, 401, "{method} {path}: {}", r.body);
    }
    // A live token still enrolls (the control).
    let (_, live) = create(1, "agent");
    let out = install(&["--token", &live], "web-2", None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// `tether-agent install` against `server` into `root/name`, with `token_args` and `input` on
/// standard input.
fn install_agent(
    server: &Server,
    root: &Path,
    token_args: &[&str],
    name: &str,
    input: Option<&str>,
) -> std::process::Output {
    use std::io::Write;
    let data = root.join(name);
    let upstream = server.upstream();
    let ca = server.ca_path();
    let mut cmd = tether_tests::command("tether-agent", root);
    cmd.args(["install", "--upstream", &upstream, "--ca"])
        .arg(&ca)
        .args(["--name", name, "--data"])
        .arg(&data)
        .args(token_args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(text) = input {
        stdin.write_all(text.as_bytes()).unwrap();
    }
    drop(stdin);
    child.wait_with_output().unwrap()
}

#[test]
fn installs_read_the_token_from_a_file_or_standard_input() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let token_file = dir.path().join("token");

    std::fs::write(&token_file, format!("{}\n", server.token(1))).unwrap();
    let out = install_agent(
        &server,
        dir.path(),
        &["--token-file", token_file.to_str().unwrap()],
        "from-file",
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let token = server.token(1);
    let out = install_agent(
        &server,
        dir.path(),
        &["--token-file", "-"],
        "from-stdin",
        Some(&format!("{token}\n")),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut names: Vec<String> = server
        .agents()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["from-file", "from-stdin"]);

    // Both, neither, or an empty file: a usage error, and nothing written or spent.
    let spare = server.token(1);
    std::fs::write(&token_file, "\n").unwrap();
    for (args, needle) in [
        (
            vec![
                "--token",
                spare.as_str(),
                "--token-file",
                token_file.to_str().unwrap(),
            ],
            "not both",
        ),
        (vec![], "token is required"),
        (
            vec!["--token-file", token_file.to_str().unwrap()],
            "must not be empty",
        ),
        (vec!["--token-file", "/nonexistent/token"], "--token-file"),
    ] {
        let out = install_agent(&server, dir.path(), &args, "refused", None);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert!(!dir.path().join("refused").exists(), "{args:?} wrote data");
    }
    // The relay's install reads it the same way.
    let relay_token = server.enrollment_token("relay");
    std::fs::write(&token_file, &relay_token).unwrap();
    let out = tether_tests::run(
        "tether-relay",
        dir.path(),
        [
            "install",
            "--upstream",
            &server.upstream(),
            "--ca",
            server.ca_path().to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
            "--name",
            "relay-f",
            "--hostname",
            RELAY_HOST,
            "--data",
            dir.path().join("relay-f").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The spare token was never spent by the refusals.
    let out = install_agent(&server, dir.path(), &["--token", &spare], "spare", None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// What the hostile enrollment relay does to the server's answer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Alter {
    /// Passes it on unchanged (the control).
    Nothing,
    /// Replaces the signing key with its own, keeps the server's certificate.
    Key,
    /// Replaces the key and brings a certificate for it from a CA of its own.
    KeyAndCertificate,
    /// Replaces the key and drops the certificate.
    KeyWithoutCertificate,
}

/// A hostile relay in front of the server's enrollment endpoint, with a real relay-CA
/// certificate for [`RELAY_HOST`] (what a stolen relay holds): it forwards each enrollment to
/// the server and alters the answer as `mode` says. Answers its address.
fn altering_relay(server: &Server, mode: Arc<AtomicU8>) -> SocketAddr {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let relay_ca = tls::Ca::from_pem(
        &read(&server.dir.join("relay-ca.pem")),
        &read(&server.dir.join("relay-ca.key")),
    )
    .unwrap();
    let key = TlsKey::generate().unwrap();
    let cert = relay_ca
        .issue_cert_for_key(
            &[RELAY_HOST.to_owned()],
            &key.public_key_raw(),
            std::time::Duration::from_secs(86_400),
        )
        .unwrap();
    let config = tls::server_config(&cert, &key.key_pem()).unwrap();
    let listener = TcpListener::bind((RELAY_HOST, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let (wss, client) = (server.wss, server.tls());
    let attacker = Identity::generate();
    let attacker_ca = tls::Ca::generate("attacker").unwrap();
    let raw = attacker.public_key().to_bytes();
    let forged_cert = attacker_ca.issue_signing_cert(&raw).unwrap();
    let forged_key = attacker.public_key_b64();
    std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let srv = HttpServer::new(move || {
                let (client, mode) = (client.clone(), mode.clone());
                let (forged_key, forged_cert) = (forged_key.clone(), forged_cert.clone());
                App::new().route(
                    "/agent/v1/enroll",
                    web::post().to(move |body: web::Bytes| {
                        let (client, mode) = (client.clone(), mode.clone());
                        let (forged_key, forged_cert) = (forged_key.clone(), forged_cert.clone());
                        async move {
                            let reply = web::block(move || {
                                tether_tests::https_request_with_body(
                                    wss,
                                    client,
                                    "localhost",
                                    "POST",
                                    "/agent/v1/enroll",
                                    &[("Content-Type", "application/json")],
                                    Some(&body),
                                )
                            })
                            .await
                            .unwrap()
                            .unwrap();
                            let mut answer: Value =
                                serde_json::from_str(&reply.body).unwrap_or(Value::Null);
                            if reply.status == 200 {
                                let alter = mode.load(Ordering::SeqCst);
                                if alter != Alter::Nothing as u8 {
                                    answer["server_signing_key"] = forged_key.into();
                                }
                                if alter == Alter::KeyAndCertificate as u8 {
                                    answer["server_signing_certificate"] = forged_cert.into();
                                }
                                if alter == Alter::KeyWithoutCertificate as u8 {
                                    answer
                                        .as_object_mut()
                                        .unwrap()
                                        .remove("server_signing_certificate");
                                }
                            }
                            HttpResponse::build(
                                actix_web::http::StatusCode::from_u16(reply.status).unwrap(),
                            )
                            .json(answer)
                        }
                    }),
                )
            })
            .workers(1)
            .listen_rustls_0_23(listener, config)
            .unwrap()
            .run();
            let _ = srv.await;
        });
    });
    addr
}

#[test]
fn an_agent_enrolling_through_a_relay_refuses_an_altered_signing_key() {
    let dir = TestDir::new();
    let server = Server::start(dir.path());
    let mode = Arc::new(AtomicU8::new(Alter::Nothing as u8));
    let relay = altering_relay(&server, mode.clone());
    let upstream = format!("wss://{RELAY_HOST}:{}", relay.port());
    let signing_pub = read(&server.dir.join("signing.pub"));
    let install = |name: &str| {
        let token = server.token(1);
        let data = dir.path().join(name);
        let out = tether_tests::run(
            "tether-agent",
            dir.path(),
            [
                "install",
                "--upstream",
                &upstream,
                "--ca",
                server.ca_path().to_str().unwrap(),
                "--token",
                &token,
                "--name",
                name,
                "--data",
                data.to_str().unwrap(),
            ],
        );
        (out, data)
    };
    for alter in [
        Alter::Key,
        Alter::KeyAndCertificate,
        Alter::KeyWithoutCertificate,
    ] {
        mode.store(alter as u8, Ordering::SeqCst);
        let (out, data) = install(&format!("altered-{}", alter as u8));
        assert_eq!(out.status.code(), Some(1), "{alter:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("nothing was pinned"),
            "{alter:?}: {}",
            stderr(&out)
        );
        assert!(
            !data.join("agent.json").exists(),
            "{alter:?}: an altered answer was saved"
        );
    }
    // The control: the same relay passing the answer on unchanged.
    mode.store(Alter::Nothing as u8, Ordering::SeqCst);
    let (out, data) = install("honest");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let state: Value = serde_json::from_str(&read(&data.join("agent.json"))).unwrap();
    assert_eq!(state["server_signing_key"], signing_pub.trim());
}
