//! Egress through an HTTP proxy (HTTP `CONNECT`, RFC 9110 §9.3.6), for agents and relays in
//! networks whose only way out is a corporate proxy: the WebSocket to the upstream and every
//! HTTPS download go through a tunnel the proxy opens, and TLS still runs end to end inside it
//! (the proxy sees the host and port asked for, never the traffic).
//!
//! The proxy is `proxy` in `agent.toml`/`relay.toml`, else `HTTPS_PROXY` (or `https_proxy`):
//! `http://[user:password@]host:port`, with basic authentication when a user is given.
//! `no_proxy` (and `NO_PROXY`/`no_proxy`) lists hosts reached directly: a name matches itself and
//! its subdomains (`example.com`, `.example.com`), an address itself, `*` everything. One
//! process has one proxy, set once at start ([`install`]) and read by every dial ([`for_host`]).
//!
//! The exchange is sans-IO ([`Proxy::connect_request`], [`read_reply`]) with a blocking
//! ([`Proxy::tunnel_blocking`]) and an async ([`Proxy::tunnel`]) edge. The reply's head is
//! bounded ([`MAX_REPLY_HEAD`]): a hostile proxy cannot grow memory.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::config::Secret;

/// Largest proxy reply head read before the tunnel is refused.
pub const MAX_REPLY_HEAD: usize = 8 * 1024;

/// An HTTP proxy to tunnel through.
#[derive(Debug, Clone)]
pub struct Proxy {
    /// The proxy's host and port.
    pub host: String,
    pub port: u16,
    /// `Basic base64(user:password)`, when the URL names a user.
    authorization: Option<Secret<String>>,
    /// Hosts reached directly.
    no_proxy: Vec<String>,
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy {proxy}: {source}")]
    Io {
        proxy: String,
        source: std::io::Error,
    },
    #[error("proxy {proxy} refused the tunnel to {target}: {status} {reason}")]
    Refused {
        proxy: String,
        target: String,
        status: u16,
        reason: String,
    },
    #[error("proxy {proxy}: {reason}")]
    Malformed { proxy: String, reason: String },
}

impl From<ProxyError> for std::io::Error {
    fn from(e: ProxyError) -> std::io::Error {
        match e {
            ProxyError::Io { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        }
    }
}

impl Proxy {
    /// Parses `http://[user:password@]host:port` (percent-encoded user and password), with
    /// the hosts of `no_proxy` reached directly.
    pub fn parse(url: &str, no_proxy: &[String]) -> Result<Proxy, String> {
        let shown = || {
            // Never echo a password: the part before '@' is left out.
            let tail = url.rsplit('@').next().unwrap_or(url);
            format!("{:?}", tail.chars().take(80).collect::<String>())
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("proxy {} must start with http://", shown()))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = hostport
            .rsplit_once(':')
            .ok_or_else(|| format!("proxy {} needs a port (host:port)", shown()))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("proxy {}: the port is not 1 to 65535", shown()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
        if !host_ok || hostport.contains('/') {
            return Err(format!("proxy {}: not a host:port", shown()));
        }
        let authorization = match userinfo {
            None => None,
            Some(u) => {
                let (user, password) = u.split_once(':').unwrap_or((u, ""));
                let pair = format!("{}:{}", percent_decode(user)?, percent_decode(password)?);
                Some(Secret::new(format!("Basic {}", STANDARD.encode(pair))))
            }
        };
        Ok(Proxy {
            host: host.to_owned(),
            port,
            authorization,
            no_proxy: no_proxy
                .iter()
                .map(|h| h.trim().trim_start_matches('.').to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
        })
    }

    /// Whether `host` is reached directly (see the module documentation).
    pub fn bypasses(&self, host: &str) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        self.no_proxy.iter().any(|n| {
            n == "*"
                || host == *n
                || host
                    .strip_suffix(n.as_str())
                    .is_some_and(|head| head.ends_with('.'))
        })
    }

    /// `host:port` of the proxy, for messages.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The `CONNECT` request for a tunnel to `host:port`.
    pub fn connect_request(&self, host: &str, port: u16) -> String {
        let target = authority(host, port);
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(auth) = &self.authorization {
            head.push_str("Proxy-Authorization: ");
            head.push_str(auth.expose());
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        head
    }

    /// A TCP stream to the proxy tunnelled to `host:port`, within `timeout` (blocking).
    pub fn tunnel_blocking(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream, ProxyError> {
        let io = |source| ProxyError::Io {
            proxy: self.address(),
            source,
        };
        let started = Instant::now();
        let addrs: Vec<_> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(io)?
            .collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        let mut tcp = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(t) => {
                    tcp = Some(t);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let mut tcp = tcp.ok_or_else(|| io(last))?;
        let left = || {
            timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(1))
        };
        tcp.set_write_timeout(Some(left())).map_err(io)?;
        tcp.write_all(self.connect_request(host, port).as_bytes())
            .map_err(io)?;
        let mut head = Vec::with_capacity(512);
        let mut byte = [0u8; 1];
        // Byte by byte: nothing past the head may be taken from the tunnel.
        loop {
            tcp.set_read_timeout(Some(left())).map_err(io)?;
            match tcp.read(&mut byte).map_err(io)? {
                0 => {
                    return Err(ProxyError::Malformed {
                        proxy: self.address(),
                        reason: "closed the connection before answering".into(),
                    })
                }
                _ => head.push(byte[0]),
            }
            if let Some(_len) = self.check_reply(&head, host, port)? {
                tcp.set_read_timeout(None).map_err(io)?;
                tcp.set_write_timeout(None).map_err(io)?;
                return Ok(tcp);
            }
        }
    }

    /// A tokio TCP stream to the proxy tunnelled to `host:port` (async).
    pub async fn tunnel(&self, host: &str, port: u16) -> Result<tokio::net::TcpStream, ProxyError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let io = |source| ProxyError::Io {
            proxy: self.address(),
            source,
        };
        let mut tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(io)?;
        let _ = tcp.set_nodelay(true);
        tcp.write_all(self.connect_request(host, port).as_bytes())
            .await
            .map_err(io)?;
        let mut head = Vec::with_capacity(512);
        let mut byte = [0u8; 1];
        loop {
            match tcp.read(&mut byte).await.map_err(io)? {
                0 => {
                    return Err(ProxyError::Malformed {
                        proxy: self.address(),
                        reason: "closed the connection before answering".into(),
                    })
                }
                _ => head.push(byte[0]),
            }
            if self.check_reply(&head, host, port)?.is_some() {
                return Ok(tcp);
            }
        }
    }

    fn check_reply(&self, head: &[u8], host: &str, port: u16) -> Result<Option<usize>, ProxyError> {
        read_reply(head).map_err(|e| match e {
            Reply::Refused { status, reason } => ProxyError::Refused {
                proxy: self.address(),
                target: authority(host, port),
                status,
                reason,
            },
            Reply::Malformed(reason) => ProxyError::Malformed {
                proxy: self.address(),
                reason,
            },
        })
    }
}

/// What is wrong with a proxy's reply to `CONNECT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A complete head with another status than 2xx.
    Refused { status: u16, reason: String },
    /// Not HTTP, or a head past [`MAX_REPLY_HEAD`].
    Malformed(String),
}

/// Reads a reply head: `Ok(Some(len))` once a whole head with a 2xx status is in `buf` (the
/// tunnel is open), `Ok(None)` while more is needed.
pub fn read_reply(buf: &[u8]) -> Result<Option<usize>, Reply> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let status = response.code.unwrap_or(0);
            if (200..300).contains(&status) {
                Ok(Some(len))
            } else {
                Err(Reply::Refused {
                    status,
                    reason: response.reason.unwrap_or("").chars().take(100).collect(),
                })
            }
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_REPLY_HEAD => Err(Reply::Malformed(
            format!("its reply head is longer than {MAX_REPLY_HEAD} bytes"),
        )),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(Reply::Malformed(format!("its reply is not HTTP ({e})"))),
    }
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "the proxy's user or password has a bad %-escape".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the proxy's user or password is not UTF-8".to_owned())
}

/// The proxy of this process: `configured` (a config's `proxy`) if not empty, else
/// `HTTPS_PROXY`/`https_proxy`; with `no_proxy` and `NO_PROXY`/`no_proxy` reached directly.
/// `Ok(None)`: no proxy. `Err` names the setting that is wrong.
pub fn from_settings(configured: &str, no_proxy: &[String]) -> Result<Option<Proxy>, String> {
    let env = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
    };
    let mut bypass: Vec<String> = no_proxy.to_vec();
    if let Some(list) = env(&["NO_PROXY", "no_proxy"]) {
        bypass.extend(list.split(',').map(|h| h.trim().to_owned()));
    }
    if !configured.is_empty() {
        return Proxy::parse(configured, &bypass).map(Some);
    }
    match env(&["HTTPS_PROXY", "https_proxy"]) {
        Some(url) => Proxy::parse(url.trim(), &bypass)
            .map(Some)
            .map_err(|e| format!("HTTPS_PROXY: {e}")),
        None => Ok(None),
    }
}

/// [`from_settings`], then [`install`]: what a binary does at start. `Err` names the setting.
pub fn install_from(configured: &str, no_proxy: &[String]) -> Result<(), String> {
    install(from_settings(configured, no_proxy)?);
    Ok(())
}

static PROXY: OnceLock<Option<Proxy>> = OnceLock::new();

/// Sets this process's proxy (once; a later call changes nothing).
pub fn install(proxy: Option<Proxy>) {
    if let Some(p) = &proxy {
        tracing::info!(proxy = %p.address(), no_proxy = ?p.no_proxy, "egress-proxy");
    }
    let _ = PROXY.set(proxy);
}

/// The proxy to reach `host` through, if any.
pub fn for_host(host: &str) -> Option<&'static Proxy> {
    PROXY
        .get()
        .and_then(Option::as_ref)
        .filter(|p| !p.bypasses(host))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_refuse_what_they_cannot_be() {
        let p = Proxy::parse("http://squid.corp:3128", &[]).unwrap();
        assert_eq!((p.host.as_str(), p.port), ("squid.corp", 3128));
        assert_eq!(
            p.connect_request("server.example", 7919),
            "CONNECT server.example:7919 HTTP/1.1\r\nHost: server.example:7919\r\n\r\n"
        );
        let p = Proxy::parse("http://ops%40corp:p%3Ass@10.0.0.1:8080/", &[]).unwrap();
        let req = p.connect_request("::1", 443);
        assert!(req.starts_with("CONNECT [::1]:443 HTTP/1.1\r\n"), "{req}");
        let basic = format!("Basic {}", STANDARD.encode("ops@corp:p:ss"));
        assert!(
            req.contains(&format!("Proxy-Authorization: {basic}\r\n")),
            "{req}"
        );
        for bad in [
            "https://proxy:3128",
            "proxy:3128",
            "http://proxy",
            "http://proxy:0",
            "http://proxy:99999",
            "http://pro xy:3128",
            "http://proxy:3128/path",
            "http://u:%zz@proxy:1",
        ] {
            assert!(Proxy::parse(bad, &[]).is_err(), "{bad}");
        }
        let e = Proxy::parse("https://user:hunter2@proxy:1", &[]).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn no_proxy_matches_hosts_their_subdomains_and_star() {
        let p = Proxy::parse(
            "http://proxy:3128",
            &["internal.corp".into(), ".lan".into(), "10.1.2.3".into()],
        )
        .unwrap();
        assert!(p.bypasses("internal.corp"));
        assert!(p.bypasses("a.internal.corp"));
        assert!(!p.bypasses("notinternal.corp"));
        assert!(p.bypasses("x.LAN"));
        assert!(p.bypasses("10.1.2.3"));
        assert!(!p.bypasses("server.example"));
        let all = Proxy::parse("http://proxy:3128", &["*".into()]).unwrap();
        assert!(all.bypasses("anything"));
    }

    #[test]
    fn replies_open_the_tunnel_only_on_2xx_and_are_bounded() {
        assert_eq!(
            read_reply(b"HTTP/1.1 200 Connection established\r\n"),
            Ok(None)
        );
        assert_eq!(
            read_reply(b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\n"),
            Ok(Some(47))
        );
        assert_eq!(
            read_reply(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"),
            Err(Reply::Refused {
                status: 407,
                reason: "Proxy Authentication Required".into()
            })
        );
        assert!(matches!(
            read_reply(b"SSH-2.0-x\r\n\r\n"),
            Err(Reply::Malformed(_))
        ));
        let mut long = b"HTTP/1.1 200 OK\r\n".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_REPLY_HEAD));
        assert!(matches!(read_reply(&long), Err(Reply::Malformed(_))));
    }

    #[test]
    fn a_tunnel_goes_through_a_proxy_and_a_refusal_says_why() {
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for answer in ["HTTP/1.1 200 OK\r\n\r\n", "HTTP/1.1 403 Forbidden\r\n\r\n"] {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).unwrap();
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                assert!(req.starts_with("CONNECT target.example:443 "), "{req}");
                s.write_all(answer.as_bytes()).unwrap();
                if answer.contains("200") {
                    s.write_all(b"tunnelled").unwrap();
                }
            }
        });
        let p = Proxy::parse(&format!("http://127.0.0.1:{port}"), &[]).unwrap();
        let mut t = p
            .tunnel_blocking("target.example", 443, Duration::from_secs(5))
            .unwrap();
        let mut got = [0u8; 9];
        t.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"tunnelled", "nothing past the head was taken");
        let e = p
            .tunnel_blocking("target.example", 443, Duration::from_secs(5))
            .unwrap_err();
        assert!(e.to_string().contains("403 Forbidden"), "{e}");
        server.join().unwrap();
    }
}
