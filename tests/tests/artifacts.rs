//! Artifacts end to end: real server, real agent. Uploads (round trip, checksum mismatch,
//! size limit before the body and mid-chunked-body, no temp file left), the agents' signed
//! download route (401 unless signed by an enrolled agent, Range resume), and the built-in
//! steps `artifact/fetch` (a tar.gz made here unpacked into dest; a hostile one refused with
//! nothing written) and `http/request` (against a tiny local HTTP server).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tether_shared::agent_auth::sign_request;
use tether_shared::identity::Identity;
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::{https_request_with_body, HttpReply};

const WAIT: Duration = Duration::from_secs(60);
const LIMIT: usize = 64 * 1024;

fn tls(server: &Server) -> Arc<rustls::ClientConfig> {
    server.tls()
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn upload(server: &Server, name: &str, version: &str, body: &[u8], sum: Option<&str>) -> HttpReply {
    let headers: Vec<(&str, &str)> = sum.map(|s| ("X-Checksum-Sha256", s)).into_iter().collect();
    server.request_raw(
        "PUT",
        &format!("/api/v1/artifacts/{name}/{version}"),
        &headers,
        body,
    )
}

/// A raw TLS connection to `addr`, for requests the helpers cannot make.
fn raw(
    server: &Server,
    addr: SocketAddr,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let conn = rustls::ClientConnection::new(tls(server), "localhost".try_into().unwrap()).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Reads until the end of a response head; answers its status line.
fn read_status(s: &mut impl Read) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => got.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

fn tmp_files(server: &Server) -> usize {
    std::fs::read_dir(server.dir.join("artifacts/tmp")).map_or(0, |d| d.count())
}

fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    tether_tests::fixtures::tar_gz(entries, 0o644)
}

fn started(tmp: &TestDir) -> (Server, Agent) {
    let limit = LIMIT.to_string();
    let server = Server::start_with(tmp.path(), &[("TETHER_ARTIFACT_MAX_BYTES", &limit)]);
    let mut agent = Agent::install(&server, tmp.path(), "box-1", &[]);
    agent.run();
    eventually("agent online", WAIT, || {
        (server.agent_status(&agent.id) == "online").then_some(())
    });
    (server, agent)
}

fn deploy_and_wait(server: &Server, process: Value) -> Value {
    let name = process["name"].as_str().unwrap().to_owned();
    server.put_process(&process);
    let id = server.deploy(&name, json!({"agents": ["box-1"]}), json!({}));
    server.wait_deployment(&id, WAIT)
}

#[test]
fn uploads_limits_and_the_agents_download_route() {
    let tmp = TestDir::new();
    let (server, agent) = started(&tmp);
    // Text: the test client hands bodies back as (lossy) strings.
    let content: Vec<u8> = (0..5000)
        .map(|i| format!("line {i}\n"))
        .collect::<String>()
        .into_bytes();
    let sum = sha_hex(&content);

    // Round trip, idempotent re-upload, conflicting re-upload.
    let r = upload(&server, "web", "1.0", &content, Some(&sum));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["sha256"], sum.as_str());
    assert_eq!(upload(&server, "web", "1.0", &content, None).status, 200);
    assert_eq!(upload(&server, "web", "1.0", b"other", None).status, 409);
    let r = server.request("GET", "/api/v1/artifacts", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json().as_array().unwrap().len(), 1, "{}", r.body);
    let auth = format!("Bearer {}", server.admin_token);
    let got = https_request_with_body(
        server.https,
        tls(&server),
        "localhost",
        "GET",
        "/api/v1/artifacts/web/1.0",
        &[("Authorization", &auth)],
        None,
    )
    .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.body.as_bytes(), content.as_slice());

    // Checksum mismatch, bad names: refused, nothing listed.
    let r = upload(&server, "bad", "1", b"abc", Some(&sha_hex(b"abd")));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("checksum mismatch"), "{}", r.body);
    assert_eq!(upload(&server, "..", "1", b"abc", None).status, 400);
    assert_eq!(upload(&server, "a", "1..2", b"abc", None).status, 400);
    let r = server.request("GET", "/api/v1/artifacts", None);
    assert!(!r.body.contains("\"bad\""), "{}", r.body);
    assert_eq!(r.json().as_array().unwrap().len(), 1);

    // Content-Length over the limit: 413 before any body byte is sent.
    let mut s = raw(&server, server.https);
    write!(s, "PUT /api/v1/artifacts/big/1 HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\nContent-Length: {}\r\n\r\n", LIMIT + 1).unwrap();
    s.flush().unwrap();
    assert!(read_status(&mut s).contains(" 413 "), "413 before the body");

    // A chunked body crossing the limit: 413, and its temp file is gone.
    let mut s = raw(&server, server.https);
    write!(s, "PUT /api/v1/artifacts/big/2 HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    let chunk = vec![b'x'; 4096];
    for _ in 0..(LIMIT / 4096 + 2) {
        if write!(s, "1000\r\n")
            .and_then(|_| s.write_all(&chunk))
            .and_then(|_| write!(s, "\r\n"))
            .and_then(|_| s.flush())
            .is_err()
        {
            break;
        }
    }
    assert!(read_status(&mut s).contains(" 413 "), "413 mid-body");
    drop(s);
    eventually("no temp file left", WAIT, || {
        (tmp_files(&server) == 0).then_some(())
    });
    let r = server.request("GET", "/api/v1/artifacts", None);
    assert_eq!(r.json().as_array().unwrap().len(), 1, "{}", r.body);

    // The agents' route: 401 unless signed by an enrolled agent's key.
    let path = format!("/agent/v1/artifacts/{sum}");
    let get = |headers: &[(&str, &str)]| {
        https_request_with_body(
            server.wss,
            tls(&server),
            "localhost",
            "GET",
            &path,
            headers,
            None,
        )
        .unwrap()
    };
    assert_eq!(get(&[]).status, 401);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let forged = sign_request(&Identity::generate(), &agent.id, "GET", &path, now);
    let forged: Vec<(&str, &str)> = forged.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(get(&forged).status, 401);
    let key = Identity::load(&agent.dir.join("agent.key")).unwrap();
    let unknown = sign_request(&key, "a-0000000000000000", "GET", &path, now);
    let unknown: Vec<(&str, &str)> = unknown.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(get(&unknown).status, 401);
    let signed = sign_request(&key, &agent.id, "GET", &path, now);
    let mut headers: Vec<(&str, &str)> = signed.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Signed by this agent, but none of its jobs fetches the artifact: it looks absent.
    let r = get(&headers);
    assert_eq!(r.status, 404, "{}", r.body);
    // Unknown agent and bad signature get the same answer.
    assert_eq!(get(&unknown).body, get(&forged).body);
    // Once a deployment sends it one, the agent may fetch it (and only this agent).
    let d = deploy_and_wait(
        &server,
        json!({"name": "get-web", "steps": [{"name": "get", "plugin": "artifact", "step": "fetch",
            "properties": {"name": "web", "version": "1.0",
                "dest": tmp.path().join("fetched-web.txt").to_str().unwrap()}}]}),
    );
    assert_eq!(d["status"], "succeeded", "{d}");
    let whole = get(&headers);
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body.as_bytes(), content.as_slice());
    headers.push(("Range", "bytes=100-"));
    let part = get(&headers);
    assert_eq!(part.status, 206, "{:?}", part.headers);
    assert_eq!(
        part.headers
            .iter()
            .find(|(k, _)| k == "content-range")
            .map(|(_, v)| v.as_str()),
        Some(format!("bytes 100-{}/{}", content.len() - 1, content.len()).as_str())
    );
    assert_eq!(part.body.as_bytes(), &content[100..]);
    // Signed, but for content no artifact has: 404.
    let other = format!("/agent/v1/artifacts/{}", "0".repeat(64));
    let signed = sign_request(&key, &agent.id, "GET", &other, now);
    let h: Vec<(&str, &str)> = signed.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = https_request_with_body(
        server.wss,
        tls(&server),
        "localhost",
        "GET",
        &other,
        &h,
        None,
    )
    .unwrap();
    assert_eq!(r.status, 404);
}

#[test]
fn artifact_fetch_unpacks_onto_the_agent_and_refuses_hostile_archives() {
    let tmp = TestDir::new();
    let (server, _agent) = started(&tmp);
    let good = tar_gz(&[
        ("app/run.sh", b"echo hi\n"),
        ("app/conf/x.toml", b"x = 1\n"),
    ]);
    assert_eq!(upload(&server, "site", "1.0", &good, None).status, 201);
    let dest = tmp.path().join("deploy/site");
    let d = deploy_and_wait(
        &server,
        json!({"name": "fetch-site", "steps": [
            {"name": "get", "plugin": "artifact", "step": "fetch", "properties": {
                "name": "site", "version": "1.0", "dest": dest.to_str().unwrap(), "unpack": "true"}},
            {"name": "copy", "plugin": "artifact", "step": "fetch", "properties": {
                "name": "site", "version": "1.0", "dest": format!("{}.tar.gz", dest.display())}}
        ]}),
    );
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(
        std::fs::read(dest.join("app/run.sh")).unwrap(),
        b"echo hi\n"
    );
    assert_eq!(
        std::fs::read(dest.join("app/conf/x.toml")).unwrap(),
        b"x = 1\n"
    );
    assert_eq!(
        std::fs::read(format!("{}.tar.gz", dest.display())).unwrap(),
        good
    );
    // The second step was a cache hit: the server served the content once.
    let log = std::fs::read_to_string(server.dir.join("../server.log")).unwrap();
    assert_eq!(log.matches("artifact-download").count(), 1, "{log}");

    // Unknown artifact: 400 naming it.
    server.put_process(
        &json!({"name": "missing", "steps": [{"name": "get", "plugin": "artifact", "step": "fetch",
        "properties": {"name": "nope", "version": "9", "dest": "/tmp/x"}}]}),
    );
    let r = server.request(
        "POST",
        "/api/v1/deployments",
        Some(&json!({"process": "missing", "targets": {"agents": ["box-1"]}})),
    );
    assert_eq!(r.status, 400);
    assert!(r.body.contains("nope/9"), "{}", r.body);

    // A traversal entry: the step fails with the unpack error, nothing is written.
    let evil = tar_gz(&[("ok.txt", b"fine"), ("../../escaped.txt", b"pwned")]);
    assert_eq!(upload(&server, "evil", "1.0", &evil, None).status, 201);
    let target = tmp.path().join("deploy/evil/inner");
    let d = deploy_and_wait(
        &server,
        json!({"name": "fetch-evil", "steps": [
            {"name": "get", "plugin": "artifact", "step": "fetch", "properties": {
                "name": "evil", "version": "1.0", "dest": target.to_str().unwrap(), "unpack": "true"}}
        ]}),
    );
    assert_eq!(d["status"], "failed", "{d}");
    let step = &d["jobs"][0]["steps"][0];
    assert_eq!(step["status"], "failed", "{d}");
    assert!(d.to_string().contains("'..'"), "{d}");
    assert!(!target.exists(), "no partial destination");
    assert!(!tmp.path().join("deploy/escaped.txt").exists());
    assert!(!tmp.path().join("deploy/evil/escaped.txt").exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("deploy/evil"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A one-connection-at-a-time HTTP server answering every request with `status` and `body`.

#[test]
fn http_request_steps_check_the_status_and_output_the_body() {
    let tmp = TestDir::new();
    let (server, _agent) = started(&tmp);
    let ok = tether_tests::fixtures::tiny_http(200, "hello from the service");
    let teapot = tether_tests::fixtures::tiny_http(418, "short and stout");
    let d = deploy_and_wait(
        &server,
        json!({"name": "probe", "steps": [
            {"name": "ping", "plugin": "http", "step": "request", "properties": {"url": format!("http://{ok}/health")}},
            {"name": "use", "plugin": "shell", "step": "run", "properties": {
                "script": "test \"$TETHER_OUTPUT_BODY\" = 'hello from the service' && echo seen"}}
        ]}),
    );
    assert_eq!(d["status"], "succeeded", "{d}");
    let step = &d["jobs"][0]["steps"][0];
    assert_eq!(step["outputs"]["body"], "hello from the service", "{d}");
    assert_eq!(step["outputs"]["status"], "200", "{d}");

    let d = deploy_and_wait(
        &server,
        json!({"name": "probe2", "steps": [
            {"name": "ping", "plugin": "http", "step": "request", "properties": {
                "url": format!("http://{teapot}/"), "method": "POST", "body": "x"}}
        ]}),
    );
    assert_eq!(d["status"], "failed", "{d}");
    assert!(d.to_string().contains("answered HTTP 418"), "{d}");
}
