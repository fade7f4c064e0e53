//! [`request_streaming`]: the client of [`super`] over plain HTTP or HTTPS, with the response
//! body handed to a sink as it arrives instead of buffered (artifact downloads, the agent's
//! `http/request` step), an idle timeout besides the overall one, and chunked decoding.
//! [`exchange`] also sends a request body read from a file as it goes ([`super::upload`]).

use std::io::{self, BufRead, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::ClientConfig;

use super::upload::{send_body, SendError, Upload};
use super::{classify, describe_tls, HttpsError, Request};

/// Bounds of one streamed request ([`request_streaming`]).
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Per connection attempt.
    pub connect_timeout: Duration,
    /// Longest silence while sending or receiving.
    pub idle_timeout: Duration,
    /// From the start of the request until the whole body has arrived.
    pub total_timeout: Duration,
    /// Largest response head accepted.
    pub max_head_bytes: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            total_timeout: Duration::from_secs(3600),
            max_head_bytes: 64 * 1024,
        }
    }
}

/// The status and headers of a streamed response (the body went to the sink).
#[derive(Debug, Clone)]
pub struct Head {
    /// The status code.
    pub status: u16,
    /// Header names (lowercased) and values, in order.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `req` over plain HTTP (`tls: None`) or HTTPS and hands the body to `sink` piece by
/// piece as it arrives (never buffered whole; chunked transfer encoding decoded). Redirects
/// are not followed: a 3xx is answered like any status. A `sink` error ends the request with
/// [`HttpsError::Sink`] (a caller cancels that way).
pub fn request_streaming(
    tls: Option<Arc<ClientConfig>>,
    req: &Request<'_>,
    limits: &StreamLimits,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> Result<Head, HttpsError> {
    exchange(tls, req, None, limits, sink)
}

/// [`request_streaming`], with the request body read from `upload` as it is sent when given
/// (`req.body` is then ignored). If sending the body fails, the response is still read: a
/// server may answer (401, 413) and close before taking the whole body; only when no
/// response head arrives is the sending error returned.
pub(super) fn exchange(
    tls: Option<Arc<ClientConfig>>,
    req: &Request<'_>,
    upload: Option<Upload<'_>>,
    limits: &StreamLimits,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> Result<Head, HttpsError> {
    let started = Instant::now();
    let (target, tcp) = super::dial(req, limits.connect_timeout)?;
    let control = tcp.try_clone().map_err(|source| HttpsError::Connect {
        target: target.clone(),
        source,
    })?;
    let conn = match tls {
        None => Conn::Plain(tcp),
        Some(tls) => {
            let name = ServerName::try_from(req.host.to_owned()).map_err(|_| HttpsError::Host {
                host: req.host.to_owned(),
            })?;
            let c = rustls::ClientConnection::new(tls, name).map_err(|e| HttpsError::Tls {
                target: target.clone(),
                reason: describe_tls(&e),
            })?;
            Conn::Tls(Box::new(rustls::StreamOwned::new(c, tcp)))
        }
    };
    let mut timed = Timed {
        inner: conn,
        tcp: control,
        started,
        limits: *limits,
    };
    let fail = |e: io::Error| match e.kind() {
        io::ErrorKind::TimedOut => HttpsError::Timeout {
            target: target.clone(),
            timeout: limits.total_timeout,
        },
        _ => classify(&target, e),
    };
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        req.method, req.path, target
    );
    for (name, value) in req.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let length = match &upload {
        Some(up) => Some(up.length),
        None => req.body.map(|b| b.len() as u64),
    };
    if let Some(n) = length {
        head.push_str(&format!("Content-Length: {n}\r\n"));
    }
    head.push_str("\r\n");
    timed.write_all(head.as_bytes()).map_err(fail)?;
    let sent = match upload {
        Some(up) => send_body(&mut timed, up),
        None => req.body.map_or(Ok(()), |body| {
            timed.write_all(body).map_err(SendError::Write)
        }),
    };
    // Kept to report if no answer follows.
    let unsent = match sent.and_then(|()| timed.flush().map_err(SendError::Write)) {
        Ok(()) => None,
        Err(SendError::Source(e)) => return Err(HttpsError::Source(e)),
        // A silent peer will not answer either.
        Err(SendError::Write(e)) if e.kind() == io::ErrorKind::TimedOut => return Err(fail(e)),
        Err(SendError::Write(e)) => Some(fail(e)),
    };

    // The head, and whatever of the body came with it.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let split = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if raw.len() > limits.max_head_bytes {
            return Err(HttpsError::TooLarge {
                target,
                max: limits.max_head_bytes,
            });
        }
        match timed.read(&mut buf) {
            Ok(0) => {
                return Err(unsent.unwrap_or(HttpsError::Malformed {
                    target,
                    reason: "connection closed before the end of the response head",
                }))
            }
            Ok(n) => raw.extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(unsent.unwrap_or_else(|| fail(e))),
        }
    };
    let head = parse_head(raw.get(..split).unwrap_or_default()).map_err(|reason| {
        HttpsError::Malformed {
            target: target.clone(),
            reason,
        }
    })?;
    let rest = raw.get(split + 4..).unwrap_or_default().to_vec();
    let mut body = io::BufReader::new(io::Cursor::new(rest).chain(timed));
    let chunked = head
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let length = head
        .header("content-length")
        .and_then(|v| v.parse::<u64>().ok());
    let malformed = |reason| HttpsError::Malformed {
        target: target.clone(),
        reason,
    };
    let no_body = req.method.eq_ignore_ascii_case("HEAD")
        || head.status == 204
        || head.status == 304
        || (100..200).contains(&head.status);
    if no_body {
        return Ok(head);
    }
    if chunked {
        loop {
            let mut line = Vec::new();
            (&mut body)
                .take(1024)
                .read_until(b'\n', &mut line)
                .map_err(fail)?;
            let text = std::str::from_utf8(&line).map_err(|_| malformed("bad chunk size"))?;
            let size_text = text.split(';').next().unwrap_or_default().trim();
            let size =
                u64::from_str_radix(size_text, 16).map_err(|_| malformed("bad chunk size"))?;
            if size == 0 {
                break;
            }
            copy_exact(&mut body, size, sink).map_err(|e| sink_or(e, &fail))?;
            let mut crlf = [0u8; 2];
            body.read_exact(&mut crlf).map_err(fail)?;
            if &crlf != b"\r\n" {
                return Err(malformed("chunk not followed by CRLF"));
            }
        }
    } else if let Some(n) = length {
        copy_exact(&mut body, n, sink).map_err(|e| sink_or(e, &fail))?;
    } else {
        loop {
            match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => sink(buf.get(..n).unwrap_or_default()).map_err(HttpsError::Sink)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(fail(e)),
            }
        }
    }
    Ok(head)
}

/// The status line and headers of a response head (without its final blank line).
fn parse_head(head: &[u8]) -> Result<Head, &'static str> {
    let head = std::str::from_utf8(head).map_err(|_| "head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty head")?;
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or("bad status line")?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Head { status, headers })
}

/// A failure while copying a body: the sink's own, or the connection's.
enum CopyError {
    Sink(io::Error),
    Read(io::Error),
}

fn sink_or(e: CopyError, fail: &dyn Fn(io::Error) -> HttpsError) -> HttpsError {
    match e {
        CopyError::Sink(e) => HttpsError::Sink(e),
        CopyError::Read(e) => fail(e),
    }
}

/// Copies exactly `n` bytes of `from` to `sink`; fewer is an `UnexpectedEof`.
fn copy_exact(
    from: &mut impl Read,
    mut n: u64,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> Result<(), CopyError> {
    let mut buf = [0u8; 64 * 1024];
    while n > 0 {
        let want = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
        let got = match from.read(buf.get_mut(..want).unwrap_or_default()) {
            Ok(0) => {
                return Err(CopyError::Read(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the body ended early",
                )))
            }
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        sink(buf.get(..got).unwrap_or_default()).map_err(CopyError::Sink)?;
        n -= got as u64;
    }
    Ok(())
}

/// A plain or TLS connection.
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

/// A connection whose every read and write ends at the idle or the overall deadline.
struct Timed {
    inner: Conn,
    /// The same socket, to set its timeouts.
    tcp: TcpStream,
    started: Instant,
    limits: StreamLimits,
}

impl Timed {
    fn arm(&self) -> io::Result<()> {
        let left = self
            .limits
            .total_timeout
            .saturating_sub(self.started.elapsed());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        let t = left
            .min(self.limits.idle_timeout)
            .max(Duration::from_millis(1));
        self.tcp.set_read_timeout(Some(t))?;
        self.tcp.set_write_timeout(Some(t))
    }
}

fn timed_out(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            io::Error::new(io::ErrorKind::TimedOut, "no progress within the timeout")
        }
        _ => e,
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        match &mut self.inner {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
        .map_err(timed_out)
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        match &mut self.inner {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
        .map_err(timed_out)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
        .map_err(timed_out)
    }
}
