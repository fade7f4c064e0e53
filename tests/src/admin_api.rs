//! The server's admin REST API as tests use it: bearer token, JSON in and out, a panic with
//! the answer when a call that must succeed does not. Shared by the loopback
//! [`crate::fleet::Server`] and the network-namespace [`crate::netns::NsServer`] (both deref
//! to it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::fleet::eventually;
use crate::{https_request_with_body, HttpReply};

/// Where the REST API is and how to call it.
#[derive(Clone)]
pub struct AdminApi {
    /// The HTTPS listener as the test process reaches it.
    pub https: SocketAddr,
    /// The name its certificate is checked for.
    pub server_name: String,
    /// The admin bearer token.
    pub admin_token: String,
    tls: Arc<rustls::ClientConfig>,
}

impl AdminApi {
    pub fn new(
        https: SocketAddr,
        server_name: &str,
        admin_token: String,
        tls: Arc<rustls::ClientConfig>,
    ) -> AdminApi {
        AdminApi {
            https,
            server_name: server_name.to_owned(),
            admin_token,
            tls,
        }
    }

    /// Trust the CAs in `ca_pem_path` from now on (a key rollover changed the server's CA).
    pub fn trust_ca_file(&mut self, ca_pem_path: &std::path::Path) {
        let ca = std::fs::read_to_string(ca_pem_path)
            .unwrap_or_else(|e| panic!("{}: {e}", ca_pem_path.display()));
        self.tls =
            Arc::new(tether_shared::tls::client_config(&ca).unwrap_or_else(|e| panic!("{e}")));
    }

    /// A client configuration trusting this server's CA only.
    pub fn tls(&self) -> Arc<rustls::ClientConfig> {
        self.tls.clone()
    }

    /// An admin request with a raw body (uploads) and extra headers.
    pub fn request_raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpReply {
        let auth = format!("Bearer {}", self.admin_token);
        let mut all = vec![("Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        self.request_with(method, path, &all, Some(body))
    }

    /// A request with exactly `headers` (no credentials unless they hold some).
    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> HttpReply {
        https_request_with_body(
            self.https,
            self.tls.clone(),
            &self.server_name,
            method,
            path,
            headers,
            body,
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A request with `token` as the bearer and `body`, if any, as JSON.
    pub fn request_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> HttpReply {
        let auth = format!("Bearer {token}");
        let body = body.map(serde_json::Value::to_string);
        let mut headers = vec![("Authorization", auth.as_str())];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        self.request_with(method, path, &headers, body.as_deref().map(str::as_bytes))
    }

    /// Stores process `name`: one shell step, `say`, running `script`.
    pub fn shell_process(&self, name: &str, script: &str) {
        let r = self.request(
            "POST",
            "/api/v1/processes",
            Some(
                &serde_json::json!({"name": name, "steps": [{"name": "say", "plugin": "shell",
                "step": "run", "properties": {"script": script}}]}),
            ),
        );
        assert_eq!(r.status, 201, "process {name}: {}", r.body);
    }

    /// Logs in to the web application as `user` (form login, as a browser does): the session
    /// cookie (`name=value`) to send with [`AdminApi::web_get`].
    pub fn web_login(&self, user: &str, password: &str) -> String {
        let origin = format!("https://{}:{}", self.server_name, self.https.port());
        let body = format!("user={user}&password={password}");
        let login = https_request_with_body(
            self.https,
            self.tls.clone(),
            &self.server_name,
            "POST",
            "/login",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Origin", origin.as_str()),
            ],
            Some(body.as_bytes()),
        )
        .unwrap_or_else(|e| panic!("POST /login: {e}"));
        assert_eq!(login.status, 303, "login refused: {}", login.body);
        login
            .header("set-cookie")
            .and_then(|c| c.split(';').next())
            .unwrap_or_else(|| panic!("no session cookie: {:?}", login.headers))
            .to_owned()
    }

    /// A form `fields` (URL-encoded, without the token) posted as a browser of the session
    /// `cookie` would, with the page's `csrf` token, from the server's own origin.
    pub fn web_post(&self, cookie: &str, csrf: &str, path: &str, fields: &str) -> HttpReply {
        let origin = format!("https://{}:{}", self.server_name, self.https.port());
        let body = format!("csrf={csrf}&{fields}");
        https_request_with_body(
            self.https,
            self.tls.clone(),
            &self.server_name,
            "POST",
            path,
            &[
                ("Cookie", cookie),
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Origin", origin.as_str()),
            ],
            Some(body.as_bytes()),
        )
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// A page of the web application with the session `cookie` (from [`AdminApi::web_login`]).
    pub fn web_get(&self, cookie: &str, path: &str) -> HttpReply {
        https_request_with_body(
            self.https,
            self.tls.clone(),
            &self.server_name,
            "GET",
            path,
            &[("Cookie", cookie)],
            None,
        )
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> HttpReply {
        self.try_request(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// [`AdminApi::request`] to a server that may be between two lives (restarting in place,
    /// stepping down): the connection's failure is returned, not a panic.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> std::io::Result<HttpReply> {
        let auth = format!("Bearer {}", self.admin_token);
        let bytes = body.map(|b| b.to_string().into_bytes());
        let mut headers = vec![("Authorization", auth.as_str())];
        if bytes.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        https_request_with_body(
            self.https,
            self.tls.clone(),
            &self.server_name,
            method,
            path,
            &headers,
            bytes.as_deref(),
        )
    }

    /// `/admin/health`, or `None` while the server is between two lives.
    pub fn try_health(&self) -> Option<Value> {
        self.try_request("GET", "/admin/health", None)
            .ok()
            .filter(|r| r.status == 200)
            .map(|r| r.json())
    }

    /// A fresh enrollment token.
    pub fn token(&self, uses: u32) -> String {
        self.token_for(uses, "agent")
    }

    /// A fresh token enrolling `uses` peers of `role` ("agent" or "relay").
    pub fn token_for(&self, uses: u32, role: &str) -> String {
        let body = json!({"uses": uses, "ttl_s": 3600, "role": role});
        let r = self.request("POST", "/api/v1/enrollment-tokens", Some(&body));
        assert_eq!(r.status, 201, "token: {}", r.body);
        r.json()["token"]
            .as_str()
            .unwrap_or_else(|| panic!("token: {}", r.body))
            .to_owned()
    }

    /// The agent list entry with `id`.
    pub fn agent(&self, id: &str) -> Option<Value> {
        let r = self.request("GET", "/api/v1/agents", None);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json().as_array()?.iter().find(|a| a["id"] == id).cloned()
    }

    pub fn agent_status(&self, id: &str) -> String {
        self.agent(id)
            .and_then(|a| a["status"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// `POST /api/v1/deployments` with `body`, expecting 201: the deployment's id.
    pub fn start_deployment(&self, body: &Value) -> String {
        let r = self.request("POST", "/api/v1/deployments", Some(body));
        assert_eq!(r.status, 201, "deployment: {}", r.body);
        r.json()["id"]
            .as_str()
            .unwrap_or_else(|| panic!("deployment: {}", r.body))
            .to_owned()
    }

    /// `POST /api/v1/processes` with `body`, expecting 201.
    pub fn put_process(&self, body: &Value) {
        let r = self.request("POST", "/api/v1/processes", Some(body));
        assert_eq!(r.status, 201, "process: {}", r.body);
    }

    /// `POST /api/v1/deployments` of `process` to `targets` (`{"agents":[...]}` or
    /// `{"tags":[...]}`) with `properties`, expecting 201; answers the deployment id.
    pub fn deploy(&self, process: &str, targets: Value, properties: Value) -> String {
        self.start_deployment(
            &json!({"process": process, "targets": targets, "properties": properties}),
        )
    }

    /// `GET /api/v1/deployments/{id}`, expecting 200.
    pub fn deployment(&self, id: &str) -> Value {
        let r = self.request("GET", &format!("/api/v1/deployments/{id}"), None);
        assert_eq!(r.status, 200, "deployment {id}: {}", r.body);
        r.json()
    }

    /// Polls deployment `id` until it is final (succeeded, failed or cancelled).
    pub fn wait_deployment(&self, id: &str, timeout: Duration) -> Value {
        eventually(&format!("deployment {id} final"), timeout, || {
            let d = self.deployment(id);
            matches!(
                d["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
            .then_some(d)
        })
    }

    /// The log of `step` (name or index) of the job of `agent` (name or id), expecting 200.
    pub fn step_log(&self, id: &str, agent: &str, step: &str) -> String {
        let r = self.request(
            "GET",
            &format!("/api/v1/deployments/{id}/jobs/{agent}/steps/{step}/log"),
            None,
        );
        assert_eq!(r.status, 200, "log: {}", r.body);
        r.body
    }

    /// `PUT /api/v1/upgrades/{version}` of a package (large: a generous timeout), expecting 201;
    /// answers `{"version","sha256","size"}`.
    pub fn upload_upgrade(&self, version: &str, bytes: &[u8]) -> Value {
        self.upload_package(version, "agent", bytes)
    }

    /// Like [`AdminApi::upload_upgrade`], for a `component` ("agent" or "relay").
    pub fn upload_package(&self, version: &str, component: &str, bytes: &[u8]) -> Value {
        let auth = format!("Bearer {}", self.admin_token);
        let path = format!("/api/v1/upgrades/{version}?component={component}");
        let request = tether_shared::https::Request {
            method: "PUT",
            host: &self.server_name,
            port: self.https.port(),
            addr: Some(self.https),
            path: &path,
            headers: &[("Authorization", auth.as_str())],
            body: Some(bytes),
        };
        let limits = tether_shared::https::Limits {
            connect_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(300),
            max_response_bytes: 1024 * 1024,
        };
        let r = tether_shared::https::request(self.tls(), &request, &limits)
            .unwrap_or_else(|e| panic!("upload {version}: {e}"));
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, 201, "upload {version}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("upload {version}: {e}"))
    }

    /// `GET /api/v1/agents/{id}/probes`: the probe series' counters.
    pub fn probes(&self, id: &str) -> Value {
        let r = self.request("GET", &format!("/api/v1/agents/{id}/probes"), None);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["probes"].clone()
    }

    /// Queue `commands` probe commands for agent `id` and ask it for `events` probe events.
    pub fn queue_probes(&self, id: &str, commands: u64, events: u64) {
        let r = self.request(
            "POST",
            &format!("/api/v1/agents/{id}/probes"),
            Some(&json!({"commands": commands, "events": events})),
        );
        assert_eq!(r.status, 202, "{}", r.body);
    }

    /// Wait until `commands` echoes and `events` probe events arrived; then check none came
    /// twice and none was skipped.
    pub fn wait_for_probes(
        &self,
        id: &str,
        commands: u64,
        events: u64,
        timeout: Duration,
    ) -> Value {
        let p = eventually("all probes", timeout, || {
            let p = self.probes(id);
            (p["echoes"]["received"] == commands && p["events"]["received"] == events).then_some(p)
        });
        for series in ["echoes", "events"] {
            assert_eq!(p[series]["duplicates"], 0, "{series} delivered twice: {p}");
            assert_eq!(p[series]["gaps"], 0, "{series} skipped: {p}");
        }
        assert_eq!(p["echoes"]["next"], commands + 1, "{p}");
        assert_eq!(p["events"]["next"], events + 1, "{p}");
        p
    }

    /// A fresh one-use enrollment token for `role` ("agent" or "relay").
    pub fn enrollment_token(&self, role: &str) -> String {
        self.token_for(1, role)
    }

    /// `GET /api/v1/agents`.
    pub fn agents(&self) -> Vec<Value> {
        let r = self.request("GET", "/api/v1/agents", None);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json().as_array().cloned().unwrap_or_default()
    }
}
