//! The built-in `http/request` step: one HTTP or HTTPS request that must answer the expected
//! status.
//!
//! Properties: `url` (`http://` or `https://` only), `method` (GET, POST, PUT or DELETE;
//! default GET), `body` (sent with `Content-Length`), `expect_status` (default 200). Outputs:
//! `status` and `body` (lossy UTF-8 with NULs as U+FFFD, cut to [`MAX_BODY_OUTPUT`] bytes
//! once JSON-encoded, with a `[truncated]` marker; the rest is read and dropped). HTTPS trusts the Mozilla roots of `webpki-roots` (public services), not the
//! agent's own CA. Redirects are not followed: a 3xx is a status like any other. A connection
//! or TLS error, or an unexpected status, fails the step with the reason.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tether_shared::https::{self, Request, StreamLimits};
use tether_shared::protocol::{StepSpec, StepStatus};
use tokio::sync::oneshot;

use super::fetch::run_blocking;
use super::outputs::truncate_encoded;
use super::step::StepResult;

/// Longest `body` output.
pub const MAX_BODY_OUTPUT: usize = 64 * 1024;

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

/// Parses `url`: scheme, host, optional port, path; no credentials, no whitespace.
pub fn parse_url(url: &str) -> Result<Target, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("url {url:?} must start with http:// or https://"));
    };
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("url {url:?} must not contain whitespace"));
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (host, port) = tether_shared::authority::parse(authority, if tls { 443 } else { 80 })
        .map_err(|e| format!("url {url:?}: {e}"))?;
    let path = tail.split('#').next().unwrap_or_default();
    let path = if path.is_empty() {
        "/".to_owned()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    Ok(Target {
        tls,
        host,
        port,
        path,
    })
}

/// Trusts the public web PKI.
fn public_tls() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
                .map_err(|e| format!("TLS setup: {e}"))
        })
        .clone()
}

/// The step.
pub async fn run(spec: &StepSpec, cancel: oneshot::Receiver<()>) -> StepResult {
    let spec2 = spec.clone();
    run_blocking(spec, cancel, move |stop, deadline| {
        match request(&spec2, stop, deadline) {
            Ok(r) => r,
            Err(message) => StepResult {
                status: StepStatus::Failed,
                exit_code: None,
                outputs: Default::default(),
                message,
            },
        }
    })
    .await
}

fn request(spec: &StepSpec, stop: &AtomicBool, deadline: Instant) -> Result<StepResult, String> {
    let url = spec
        .properties
        .get("url")
        .ok_or_else(|| "missing property \"url\"".to_owned())?;
    let target = parse_url(url)?;
    let method = spec.properties.get("method").map_or("GET", String::as_str);
    if !matches!(method, "GET" | "POST" | "PUT" | "DELETE") {
        return Err(format!(
            "method must be GET, POST, PUT or DELETE, got {method:?}"
        ));
    }
    let expect: u16 = match spec.properties.get("expect_status") {
        None => 200,
        Some(e) => e
            .parse()
            .map_err(|_| format!("expect_status {e:?} is not a number"))?,
    };
    let tls = if target.tls {
        Some(public_tls()?)
    } else {
        None
    };
    let body = spec.properties.get("body").map(String::as_bytes);
    let req = Request {
        method,
        host: &target.host,
        addr: None,
        port: target.port,
        path: &target.path,
        headers: &[("User-Agent", "tether-agent")],
        body,
    };
    let limits = StreamLimits {
        total_timeout: deadline.saturating_duration_since(Instant::now()),
        ..StreamLimits::default()
    };
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut sink = |bytes: &[u8]| -> io::Result<()> {
        if stop.load(Ordering::Relaxed) {
            return Err(io::Error::other("stopped (timeout or cancel)"));
        }
        let room = MAX_BODY_OUTPUT.saturating_sub(kept.len());
        kept.extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or_default());
        truncated |= bytes.len() > room;
        Ok(())
    };
    let head = https::request_streaming(tls, &req, &limits, &mut sink)
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let mut text = String::from_utf8_lossy(&kept).into_owned();
    // Binary bodies grow when encoded (a NUL takes six bytes): cut to what travels.
    truncated |= truncate_encoded(&mut text, MAX_BODY_OUTPUT);
    if truncated {
        text.push_str("\n[truncated]");
    }
    let ok = head.status == expect;
    let outputs = [
        ("status".to_owned(), head.status.to_string()),
        ("body".to_owned(), text),
    ]
    .into_iter()
    .collect();
    Ok(StepResult {
        status: if ok {
            StepStatus::Succeeded
        } else {
            StepStatus::Failed
        },
        exit_code: None,
        outputs,
        message: if ok {
            String::new()
        } else {
            format!(
                "{method} {url} answered HTTP {}, expected {expect}",
                head.status
            )
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_strictly() {
        let t = parse_url("http://127.0.0.1:8080/a?b=1#frag").unwrap();
        assert_eq!(
            t,
            Target {
                tls: false,
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/a?b=1".into()
            }
        );
        let t = parse_url("https://[::1]").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (true, "::1", 443, "/")
        );
        assert_eq!(parse_url("http://h?x").unwrap().path, "/?x");
        for bad in [
            "file:///etc/passwd",
            "ftp://h/",
            "http://u:p@h/",
            "http://",
            "http://h:0/",
            "http://h /",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
