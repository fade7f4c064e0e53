//! [`request_upload`]: one request whose body is read from a file (any reader) as it is sent,
//! with `Content-Length`, reporting the bytes sent to a progress callback, never holding the
//! body in memory; the (small) response is read whole, under a cap. The `tether` CLI uploads
//! artifacts and plugin bundles with it.

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::ClientConfig;

use super::streaming::exchange;
use super::{HttpsError, Request, Response, StreamLimits};

/// A request body read as it is sent.
pub struct Upload<'a> {
    /// Where the bytes come from; exactly `length` of them are sent.
    pub body: &'a mut dyn Read,
    /// The `Content-Length`; a body that ends before it fails the request
    /// ([`HttpsError::Source`]), bytes past it are not read.
    pub length: u64,
    /// Called with the total bytes sent so far, after each piece.
    pub progress: &'a mut dyn FnMut(u64),
}

/// Why sending a body stopped.
pub(super) enum SendError {
    /// Reading the body failed.
    Source(io::Error),
    /// Writing to the connection failed.
    Write(io::Error),
}

/// Bytes read from the body and written per piece.
const PIECE: usize = 64 * 1024;

/// Copies exactly `up.length` bytes of `up.body` to `to`, reporting progress.
pub(super) fn send_body(to: &mut impl Write, up: Upload<'_>) -> Result<(), SendError> {
    let mut buf = vec![0u8; PIECE];
    let mut sent = 0u64;
    while sent < up.length {
        let want = usize::try_from(up.length - sent)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = match up.body.read(buf.get_mut(..want).unwrap_or_default()) {
            Ok(0) => {
                return Err(SendError::Source(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the body ended after {sent} of {} bytes (did the file change?)",
                        up.length
                    ),
                )))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(SendError::Source(e)),
        };
        to.write_all(buf.get(..n).unwrap_or_default())
            .map_err(SendError::Write)?;
        sent += n as u64;
        (up.progress)(sent);
    }
    Ok(())
}

/// Sends `req` (its `body` ignored) over plain HTTP (`tls: None`) or HTTPS with the body read
/// from `upload`, and reads the whole response (at most `max_response_bytes` of body).
/// Timeouts are those of [`StreamLimits`]: a slow but moving upload is not cut off before
/// `total_timeout`; a stalled one fails after `idle_timeout`.
pub fn request_upload(
    tls: Option<Arc<ClientConfig>>,
    req: &Request<'_>,
    upload: Upload<'_>,
    limits: &StreamLimits,
    max_response_bytes: usize,
) -> Result<Response, HttpsError> {
    let mut body = Vec::new();
    let mut too_large = false;
    let mut sink = |piece: &[u8]| {
        if body.len() + piece.len() > max_response_bytes {
            too_large = true;
            return Err(io::Error::other("response too large"));
        }
        body.extend_from_slice(piece);
        Ok(())
    };
    match exchange(tls, req, Some(upload), limits, &mut sink) {
        Ok(head) => Ok(Response {
            status: head.status,
            headers: head.headers,
            body,
        }),
        Err(HttpsError::Sink(_)) if too_large => Err(HttpsError::TooLarge {
            target: format!("{}:{}", req.host, req.port),
            max: max_response_bytes,
        }),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use std::io::{BufRead, BufReader};
    use std::net::{SocketAddr, TcpListener};
    use std::time::Duration;

    use sha2::{Digest, Sha256};

    use super::*;

    /// A one-connection HTTP server: reads the head, then answers `status` either after
    /// reading the whole body (`drain_first`) or before reading any of it (draining it
    /// afterwards, so that closing does not reset the connection). The body's sha256 and
    /// length come back as the response body.
    fn server(status: u16, drain_first: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut length = 0u64;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut hasher = Sha256::new();
            let mut body = reader.take(length);
            let answer = |conn: &std::net::TcpStream, text: String| {
                let mut conn = conn;
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n",
                    text.len()
                );
                conn.write_all(head.as_bytes()).unwrap();
                conn.write_all(text.as_bytes()).unwrap();
            };
            if drain_first {
                let n = io::copy(&mut body, &mut hasher).unwrap();
                answer(&conn, format!("{} {n}", hex::encode(hasher.finalize())));
            } else {
                answer(&conn, "{\"error\":\"too large\"}".to_owned());
                let _ = io::copy(&mut body, &mut io::sink());
            }
        });
        addr
    }

    fn send(
        addr: SocketAddr,
        body: &[u8],
        length: u64,
        max_response: usize,
    ) -> (Result<Response, HttpsError>, Vec<u64>) {
        let mut progress = Vec::new();
        let mut reader = body;
        let result = request_upload(
            None,
            &Request {
                method: "PUT",
                host: "127.0.0.1",
                addr: Some(addr),
                port: addr.port(),
                path: "/upload",
                headers: &[("X-Test", "1")],
                body: None,
            },
            Upload {
                body: &mut reader,
                length,
                progress: &mut |n| progress.push(n),
            },
            &StreamLimits {
                idle_timeout: Duration::from_secs(10),
                ..StreamLimits::default()
            },
            max_response,
        );
        (result, progress)
    }

    #[test]
    fn streams_the_body_with_its_length_and_reports_progress() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (result, progress) = send(server(201, true), &data, data.len() as u64, 1024);
        let response = result.unwrap();
        assert_eq!(response.status, 201);
        let expected = format!("{} {}", hex::encode(Sha256::digest(&data)), data.len());
        assert_eq!(String::from_utf8(response.body).unwrap(), expected);
        assert!(progress.len() > 1, "{progress:?}");
        assert!(progress.windows(2).all(|w| w[0] < w[1]), "{progress:?}");
        assert_eq!(progress.last().copied(), Some(data.len() as u64));
    }

    #[test]
    fn sends_only_the_declared_length_and_refuses_a_short_body() {
        let data = b"0123456789";
        let (result, progress) = send(server(200, true), data, 4, 1024);
        let body = result.unwrap().body;
        let expected = format!("{} 4", hex::encode(Sha256::digest(b"0123")));
        assert_eq!(String::from_utf8(body).unwrap(), expected);
        assert_eq!(progress, vec![4]);

        let (result, _) = send(server(200, true), data, 20, 1024);
        let err = result.unwrap_err();
        assert!(matches!(err, HttpsError::Source(_)), "{err}");
        assert!(err.to_string().contains("after 10 of 20 bytes"), "{err}");
    }

    #[test]
    fn an_early_answer_is_returned_and_a_large_one_refused() {
        let data = vec![7u8; 100_000];
        let (result, _) = send(server(413, false), &data, data.len() as u64, 1024);
        let response = result.unwrap();
        assert_eq!(response.status, 413);
        assert_eq!(response.reason(), "too large");

        let (result, _) = send(server(200, true), &data, data.len() as u64, 10);
        let err = result.unwrap_err();
        assert!(matches!(err, HttpsError::TooLarge { max: 10, .. }), "{err}");
    }
}
