//! [`Client`]: the server's REST API over the blocking HTTPS client of `tether-shared`, with
//! the CA pinned and the bearer token on every request. A non-2xx answer becomes a
//! [`ClientError`] carrying the server's `{"error": ...}` message.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use serde_json::Value;
use tether_shared::config::Secret;
use tether_shared::https::{self, HttpsError, Limits, Request, Response, StreamLimits, Upload};
use tether_shared::tls::TlsError;

use crate::config::Connection;
use tether_shared::server_url::ServerUrl;

/// Bounds of an ordinary request (lists, logs up to the server's 8 MiB per step, masked).
const LIMITS: Limits = Limits {
    connect_timeout: Duration::from_secs(10),
    total_timeout: Duration::from_secs(60),
    max_response_bytes: 32 * 1024 * 1024,
};

/// Bounds of an upload: it may take long, but not stall.
const UPLOAD_LIMITS: StreamLimits = StreamLimits {
    connect_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(60),
    total_timeout: Duration::from_secs(6 * 3600),
    max_head_bytes: 64 * 1024,
};

/// Largest answer to an upload (a small JSON object).
const MAX_UPLOAD_ANSWER: usize = 1024 * 1024;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer: cannot connect, TLS refused (e.g. "untrusted issuer"), timeout.
    #[error(transparent)]
    Https(#[from] HttpsError),
    /// The token was refused.
    #[error("the server refused the token (HTTP 401: {0}); run `tether login` again or check TETHER_TOKEN")]
    Unauthorized(String),
    /// Any other non-2xx answer, with the server's reason.
    #[error("{message} (HTTP {status})")]
    Refused { status: u16, message: String },
    /// A 2xx answer that should be JSON and is not.
    #[error("the server's answer is not JSON: {0}")]
    NotJson(serde_json::Error),
    /// The CA certificate is unusable.
    #[error("the CA certificate: {0}")]
    Ca(#[from] TlsError),
}

impl ClientError {
    /// Whether nothing reached the server (worth retrying while waiting).
    pub fn is_unreachable(&self) -> bool {
        match self {
            ClientError::Https(e) => e.is_unreachable() || matches!(e, HttpsError::Io { .. }),
            _ => false,
        }
    }
}

/// A connection to the server's REST API.
pub struct Client {
    tls: Arc<ClientConfig>,
    server: ServerUrl,
    /// `Bearer <token>`.
    authorization: Secret<String>,
}

impl Client {
    /// A client for `connection`; fails only on an unusable CA certificate.
    pub fn new(connection: &Connection) -> Result<Client, ClientError> {
        let tls = tether_shared::tls::client_config(&connection.ca_pem)?;
        Ok(Client {
            tls: Arc::new(tls),
            server: connection.server.clone(),
            authorization: Secret::new(format!("Bearer {}", connection.token.expose())),
        })
    }

    fn request<'a>(
        &'a self,
        method: &'a str,
        path: &'a str,
        headers: &'a [(&'a str, &'a str)],
        body: Option<&'a [u8]>,
    ) -> Request<'a> {
        Request {
            method,
            host: &self.server.host,
            addr: None,
            port: self.server.port,
            path,
            headers,
            body,
        }
    }

    /// Sends one request; a non-2xx answer is an error.
    fn send(
        &self,
        method: &str,
        path: &str,
        json: Option<&Value>,
    ) -> Result<Response, ClientError> {
        let body = json.map(|v| v.to_string().into_bytes());
        let mut headers = vec![("Authorization", self.authorization.expose().as_str())];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        let response = https::request(
            self.tls.clone(),
            &self.request(method, path, &headers, body.as_deref()),
            &LIMITS,
        )?;
        // A standby of a cluster sends the request on to the active node: followed once, and
        // only to a server the same pinned CA vouches for (the token goes nowhere else).
        let response = match redirected(&response) {
            Some((server, path)) => https::request(
                self.tls.clone(),
                &Request {
                    host: &server.host,
                    port: server.port,
                    path: &path,
                    ..self.request(method, &path, &headers, body.as_deref())
                },
                &LIMITS,
            )?,
            None => response,
        };
        success(response)
    }

    /// `GET path`, a JSON answer.
    pub fn get_json(&self, path: &str) -> Result<Value, ClientError> {
        parse_json(&self.send("GET", path, None)?)
    }

    /// `POST path` with a JSON body (or none), a JSON answer.
    pub fn post_json(&self, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        parse_json(&self.send("POST", path, body)?)
    }

    /// `PATCH path` with a JSON body, a JSON answer.
    pub fn patch_json(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        parse_json(&self.send("PATCH", path, Some(body))?)
    }

    /// `DELETE path`, a JSON answer.
    pub fn delete_json(&self, path: &str) -> Result<Value, ClientError> {
        parse_json(&self.send("DELETE", path, None)?)
    }

    /// `GET path`, a text answer (invalid UTF-8 replaced).
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let response = self.send("GET", path, None)?;
        Ok(String::from_utf8_lossy(&response.body).into_owned())
    }

    /// `method path` with `body` (read as it is sent) announced with
    /// `X-Checksum-Sha256: sha256`; a JSON answer.
    pub fn upload(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        sha256: &str,
        body: Upload<'_>,
    ) -> Result<Value, ClientError> {
        let headers = [
            ("Authorization", self.authorization.expose().as_str()),
            ("Content-Type", content_type),
            ("X-Checksum-Sha256", sha256),
        ];
        let response = https::request_upload(
            Some(self.tls.clone()),
            &self.request(method, path, &headers, None),
            body,
            &UPLOAD_LIMITS,
            MAX_UPLOAD_ANSWER,
        )?;
        parse_json(&success(response)?)
    }
}

/// Where a `307`/`308` answer sends its request: the server and the path (with its query).
fn redirected(response: &Response) -> Option<(ServerUrl, String)> {
    if !matches!(response.status, 307 | 308) {
        return None;
    }
    let rest = response.header("location")?.strip_prefix("https://")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let server = ServerUrl::parse(&format!("https://{authority}")).ok()?;
    let path = if path.is_empty() { "/" } else { path };
    Some((server, path.to_owned()))
}

/// `response` if its status is 2xx, else the error it carries.
fn success(response: Response) -> Result<Response, ClientError> {
    match response.status {
        200..=299 => Ok(response),
        401 => Err(ClientError::Unauthorized(response.reason())),
        status => Err(ClientError::Refused {
            status,
            message: response.reason(),
        }),
    }
}

fn parse_json(response: &Response) -> Result<Value, ClientError> {
    serde_json::from_slice(&response.body).map_err(ClientError::NotJson)
}

/// `text` as one URL path segment: everything but unreserved characters percent-encoded.
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(segment("web-1.a_b~c"), "web-1.a_b~c");
        assert_eq!(segment("a b/c?d%"), "a%20b%2Fc%3Fd%25");
        assert_eq!(segment("é"), "%C3%A9");
    }

    #[test]
    fn only_a_temporary_or_permanent_redirect_to_https_is_followed() {
        let answer = |status: &str, location: &str| {
            let raw =
                format!("HTTP/1.1 {status}\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n");
            https::parse_response(raw.as_bytes()).unwrap()
        };
        let (server, path) = redirected(&answer(
            "307 Temporary Redirect",
            "https://node-a.example:9443/api/v1/deployments?limit=5",
        ))
        .unwrap();
        assert_eq!(
            (server.host.as_str(), server.port),
            ("node-a.example", 9443)
        );
        assert_eq!(path, "/api/v1/deployments?limit=5");
        let (_, path) = redirected(&answer("308 Permanent Redirect", "https://[::1]")).unwrap();
        assert_eq!(path, "/");
        for (status, location) in [
            ("302 Found", "https://node-a.example/x"),
            ("307 Temporary Redirect", "http://node-a.example/x"),
            ("307 Temporary Redirect", "https://user@node-a.example/x"),
            ("307 Temporary Redirect", "/relative"),
        ] {
            assert!(
                redirected(&answer(status, location)).is_none(),
                "{status} {location}"
            );
        }
    }

    #[test]
    fn refusals_carry_the_servers_reason() {
        let response = |raw: &[u8]| https::parse_response(raw).unwrap();
        let err = success(response(
            b"HTTP/1.1 400 Bad\r\n\r\n{\"error\":\"unknown agents: x\"}",
        ))
        .unwrap_err();
        assert_eq!(err.to_string(), "unknown agents: x (HTTP 400)");
        assert!(matches!(err, ClientError::Refused { status: 400, .. }));
        let err = success(response(b"HTTP/1.1 401 No\r\n\r\n{\"error\":\"bad\"}")).unwrap_err();
        assert!(matches!(err, ClientError::Unauthorized(_)), "{err}");
        assert!(success(response(b"HTTP/1.1 202 A\r\n\r\n{}")).is_ok());
    }
}
