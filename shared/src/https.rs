//! A minimal blocking HTTPS/1.1 client over rustls and `std::net::TcpStream`, for the few
//! one-shot requests made outside an actix system (`tether-agent install`, `tether-relay
//! install`, the end-to-end tests): one request per connection (`Connection: close`), a body
//! with `Content-Length`, the response read under a size cap and an overall deadline.
//! [`request_streaming`] is the same over plain HTTP or HTTPS with the body handed to a sink
//! as it arrives (artifact downloads, the agent's `http/request` step); [`request_upload`]
//! sends a body read from a file as it goes, reporting progress (the `tether` CLI's uploads).
//!
//! Failures are told apart the way an operator needs them: could not connect, TLS refused
//! (with the certificate problem spelled out: "untrusted issuer" for a CA mismatch), or a
//! malformed or oversized answer.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig};

mod streaming;
mod upload;
pub use streaming::{request_streaming, Head, StreamLimits};
pub use upload::{request_upload, Upload};

/// Bounds of one request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Per connection attempt.
    pub connect_timeout: Duration,
    /// From the start of the request until the whole response has arrived.
    pub total_timeout: Duration,
    /// Largest response (head and body together) accepted.
    pub max_response_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(30),
            max_response_bytes: 1024 * 1024,
        }
    }
}

/// One request.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// Host name or IP address to dial and to verify the certificate for.
    pub host: &'a str,
    /// Dial this address instead of resolving `host` (the certificate is still checked for
    /// `host`).
    pub addr: Option<SocketAddr>,
    /// The port.
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: &'a str,
    /// Extra header lines (name, value).
    pub headers: &'a [(&'a str, &'a str)],
    /// A body, sent with `Content-Length`.
    pub body: Option<&'a [u8]>,
}

/// A response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names (lowercased) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body, decoded from chunked transfer encoding if need be.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `error` field of a JSON error body, else the body as text (shortened).
    pub fn reason(&self) -> String {
        let from_json = serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned));
        from_json.unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&self.body);
            text.chars().take(200).collect::<String>().trim().to_owned()
        })
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    /// The host name is not usable for TLS (neither a DNS name nor an IP address).
    #[error("{host:?} is not a valid host name")]
    Host {
        /// The host given.
        host: String,
    },
    /// Name resolution or every TCP connection attempt failed.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// `host:port`.
        target: String,
        /// The last failure.
        source: io::Error,
    },
    /// The TLS handshake failed, e.g. the certificate is not signed by the trusted CA.
    #[error("TLS with {target} failed: {reason}")]
    Tls {
        /// `host:port`.
        target: String,
        /// What rustls refused, in words.
        reason: String,
    },
    /// Sending or receiving failed after the connection was up.
    #[error("{target}: {source}")]
    Io {
        /// `host:port`.
        target: String,
        /// The underlying failure.
        source: io::Error,
    },
    /// The deadline passed before the response was complete.
    #[error("{target}: no complete response within {timeout:?}")]
    Timeout {
        /// `host:port`.
        target: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The response exceeds [`Limits::max_response_bytes`].
    #[error("{target}: response larger than {max} bytes")]
    TooLarge {
        /// `host:port`.
        target: String,
        /// The cap.
        max: usize,
    },
    /// The response is not valid HTTP/1.1.
    #[error("{target}: malformed response: {reason}")]
    Malformed {
        /// `host:port`.
        target: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The caller's body sink refused the data (or the caller cancelled).
    #[error("{0}")]
    Sink(io::Error),
    /// Reading the request body to send failed (an upload's file), or it ended early.
    #[error("reading the body to send: {0}")]
    Source(io::Error),
}

impl HttpsError {
    /// Whether nothing reached the peer's HTTP layer (another address may do better).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            HttpsError::Connect { .. } | HttpsError::Tls { .. } | HttpsError::Timeout { .. }
        )
    }
}

/// Opens the TCP connection of `req` (its fixed address, or the host resolved; or a tunnel
/// through the process's proxy, `crate::proxy`), within `timeout`; returns `host:port` for
/// messages, and the stream.
pub(crate) fn dial(
    req: &Request<'_>,
    timeout: Duration,
) -> Result<(String, TcpStream), HttpsError> {
    let target = if req.host.contains(':') {
        format!("[{}]:{}", req.host, req.port)
    } else {
        format!("{}:{}", req.host, req.port)
    };
    let dialled = match (crate::proxy::for_host(req.host), req.addr) {
        // Through the process's proxy, which resolves the name itself.
        (Some(proxy), _) => proxy
            .tunnel_blocking(req.host, req.port, timeout)
            .map_err(io::Error::from),
        (None, Some(addr)) => TcpStream::connect_timeout(&addr, timeout),
        (None, None) => connect(req.host, req.port, timeout),
    };
    let tcp = dialled.map_err(|source| HttpsError::Connect {
        target: target.clone(),
        source,
    })?;
    // Without it, the request written after TLS's last handshake message (or a body after its
    // head) waits for the server's delayed ACK: 40 ms on a request that takes one.
    let _ = tcp.set_nodelay(true);
    Ok((target, tcp))
}

/// Sends `req` over TLS configured by `tls` and reads the whole response.
pub fn request(
    tls: Arc<ClientConfig>,
    req: &Request<'_>,
    limits: &Limits,
) -> Result<Response, HttpsError> {
    let name = ServerName::try_from(req.host.to_owned()).map_err(|_| HttpsError::Host {
        host: req.host.to_owned(),
    })?;
    let started = Instant::now();
    let (target, tcp) = dial(req, limits.connect_timeout)?;
    let conn = rustls::ClientConnection::new(tls, name).map_err(|e| HttpsError::Tls {
        target: target.clone(),
        reason: describe_tls(&e),
    })?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);

    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        req.method, req.path, target
    );
    for (name, value) in req.headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    if let Some(body) = req.body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let io_err = |source: io::Error| classify(&target, source);
    set_timeouts(&stream.sock, started, limits).map_err(io_err)?;
    stream.write_all(head.as_bytes()).map_err(io_err)?;
    if let Some(body) = req.body {
        stream.write_all(body).map_err(io_err)?;
    }
    stream.flush().map_err(io_err)?;

    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if started.elapsed() >= limits.total_timeout {
            return Err(HttpsError::Timeout {
                target,
                timeout: limits.total_timeout,
            });
        }
        set_timeouts(&stream.sock, started, limits).map_err(io_err)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(buf.get(..n).unwrap_or_default());
                if raw.len() > limits.max_response_bytes {
                    return Err(HttpsError::TooLarge {
                        target,
                        max: limits.max_response_bytes,
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A peer closing without close_notify after a complete response is acceptable.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => break,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HttpsError::Timeout {
                    target,
                    timeout: limits.total_timeout,
                })
            }
            Err(e) => return Err(classify(&target, e)),
        }
    }
    parse_response(&raw).map_err(|reason| HttpsError::Malformed { target, reason })
}

/// Dials every address `host` resolves to, in order, until one answers.
fn connect(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Socket timeouts that end at the overall deadline at the latest.
fn set_timeouts(tcp: &TcpStream, started: Instant, limits: &Limits) -> io::Result<()> {
    let left = limits
        .total_timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(1));
    tcp.set_read_timeout(Some(left))?;
    tcp.set_write_timeout(Some(left))
}

/// A TLS failure surfaces as an `io::Error` wrapping a `rustls::Error`: tell it apart.
fn classify(target: &str, e: io::Error) -> HttpsError {
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(describe_tls);
    match tls {
        Some(reason) => HttpsError::Tls {
            target: target.to_owned(),
            reason,
        },
        None => HttpsError::Io {
            target: target.to_owned(),
            source: e,
        },
    }
}

/// Words an operator can act on for the common certificate failures.
fn describe_tls(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the server certificate has an untrusted issuer: it was not signed by the given CA"
                .to_owned()
        }
        rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected,
            presented,
        }) => format!(
            "the server certificate is not valid for {}: it is valid for {}. Dial one of those names, or add this one to the certificate (a server: tether-server cert renew --hostname NAME; a relay: tether-relay install --force --hostname NAME, with a new relay token)",
            expected.to_str(),
            if presented.is_empty() {
                "no name".to_owned()
            } else {
                presented
                    .iter()
                    .map(|p| plain_name(p))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName) => {
            "the server certificate is not valid for this host name".to_owned()
        }
        rustls::Error::InvalidCertificate(CertificateError::Expired)
        | rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "the server certificate has expired".to_owned()
        }
        other => format!("{other}"),
    }
}

/// `localhost` for rustls's `DnsName("localhost")`, `127.0.0.1` for `IpAddress(127.0.0.1)`.
fn plain_name(presented: &str) -> &str {
    presented
        .split_once('(')
        .and_then(|(_, inner)| inner.strip_suffix(')'))
        .map_or(presented, |inner| inner.trim_matches('"'))
}

/// Splits a raw HTTP/1.1 response into status, headers and (de-chunked) body.
pub fn parse_response(raw: &[u8]) -> Result<Response, &'static str> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of response head")?;
    let head = std::str::from_utf8(raw.get(..split).unwrap_or_default())
        .map_err(|_| "head is not UTF-8")?;
    let body = raw.get(split + 4..).unwrap_or_default();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty head")?;
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or("bad status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        decode_chunked(body).ok_or("bad chunked body")?
    } else {
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        match length {
            Some(n) => body
                .get(..n)
                .ok_or("body shorter than Content-Length")?
                .to_vec(),
            None => body.to_vec(),
        }
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn decode_chunked(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(rest.get(..eol)?).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        rest = rest.get(eol + 2..)?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size.checked_add(2)?..)?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn parses_plain_chunked_and_broken_responses() {
        let r =
            parse_response(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-A: b\r\n\r\nokEXTRA")
                .unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.body, b"ok");
        assert_eq!(r.header("x-a"), Some("b"));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab"
        )
        .is_err());
    }

    #[test]
    fn reason_prefers_the_json_error_field() {
        let r = parse_response(b"HTTP/1.1 401 X\r\n\r\n{\"error\":\"nope\"}").unwrap();
        assert_eq!(r.reason(), "nope");
        let r = parse_response(b"HTTP/1.1 502 X\r\n\r\nbad gateway\n").unwrap();
        assert_eq!(r.reason(), "bad gateway");
    }

    #[test]
    fn refusal_to_connect_is_unreachable() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Bind then drop: the port is very likely closed right after.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let ca = crate::tls::Ca::generate("test CA").unwrap();
        let tls = Arc::new(crate::tls::client_config(ca.cert_pem()).unwrap());
        let err = request(
            tls,
            &Request {
                method: "GET",
                host: "127.0.0.1",
                addr: None,
                port,
                path: "/",
                headers: &[],
                body: None,
            },
            &Limits::default(),
        )
        .unwrap_err();
        assert!(err.is_unreachable(), "{err}");
        assert!(matches!(err, HttpsError::Connect { .. }), "{err}");
    }
}
