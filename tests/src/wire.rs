//! A small, blocking, deliberately permissive WebSocket client for hostile-peer tests: it speaks
//! RFC 6455 by hand over rustls, so a test can send anything (garbage, oversized or half-sent
//! frames, frames of the wrong kind) to the server's real agent socket and observe exactly what
//! comes back: protocol frames, the close frame and its code, or the connection dropping.
//!
//! Also here: building signed `Hello`s like the agent's uplink does, and reading the server's
//! observable side effects (`/admin/health`, `/metrics`, the server log).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};
use serde_json::Value;
use tether_shared::e2e::{AgentGate, AgentStep};
use tether_shared::enroll::WS_PATH;
use tether_shared::identity::Identity;
use tether_shared::identity::PublicKey;
use tether_shared::protocol::{
    self, hello_proof_bytes, Frame, Hello, Sender, Seq, MAX_FRAME_BYTES,
};

use crate::fleet::Server;

/// WebSocket opcodes (RFC 6455 section 5.2).
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// How long connecting (TCP, TLS, upgrade) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One thing read from the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEvent {
    /// A data message (text or binary) with its payload.
    Data(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// A close frame: its code (absent if the payload was empty) and reason.
    Close(Option<u16>, String),
    /// The connection ended (TCP FIN, reset, or TLS EOF) without a close frame.
    Dropped(String),
}

/// How a connection ended, as [`WsClient::expect_close`] saw it.
#[derive(Debug, Clone)]
pub struct Closed {
    /// The close frame's code, or `None` if the connection dropped without one.
    pub code: Option<u16>,
    pub reason: String,
    /// Protocol frames received before the close (e.g. the error frame).
    pub frames: Vec<Frame>,
}

impl Closed {
    /// The error frame sent before the close, if any.
    pub fn error(&self) -> Option<&protocol::ErrorFrame> {
        self.frames.iter().find_map(|f| match f {
            Frame::Error(e) => Some(e),
            _ => None,
        })
    }
}

/// A WebSocket client connection to the server's agent surface.
pub struct WsClient {
    tls: StreamOwned<ClientConnection, TcpStream>,
    /// Bytes read but not yet parsed into frames.
    buf: Vec<u8>,
    /// The connection is known to have ended.
    ended: bool,
    /// End-to-end protection, once [`WsClient::secure`] ran: frames sent with
    /// [`WsClient::send`] and [`WsClient::send_binary`] are sealed, data received is opened.
    gate: Option<AgentGate>,
}

/// The server's command-signing key, which agents trust (its `signing.pub`).
pub fn server_key(server: &Server) -> PublicKey {
    let path = server.dir.join("signing.pub");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    PublicKey::from_b64(text.trim()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The TLS client configuration trusting the server's CA only.
pub fn tls_config(server: &Server) -> Arc<rustls::ClientConfig> {
    let ca = std::fs::read_to_string(server.ca_path())
        .unwrap_or_else(|e| panic!("{}: {e}", server.ca_path().display()));
    Arc::new(tether_shared::tls::client_config(&ca).unwrap_or_else(|e| panic!("{e}")))
}

impl WsClient {
    /// Connects to `wss://localhost:<wss port>/agent/v1/ws` and completes the upgrade.
    pub fn connect(server: &Server) -> io::Result<WsClient> {
        Self::connect_to(server.wss, tls_config(server), WS_PATH)
    }

    /// Connects to `addr` (verified as `localhost`) and upgrades `path` to a WebSocket.
    pub fn connect_to(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        path: &str,
    ) -> io::Result<WsClient> {
        let tcp = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        Self::upgrade(tcp, addr, tls, path)
    }

    /// Like [`WsClient::connect_to`], with a receive buffer of about `bytes` set before the
    /// connection is made: a peer that stops reading then backs up its sender quickly.
    pub fn connect_with_recv_buffer(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        path: &str,
        bytes: usize,
    ) -> io::Result<WsClient> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_recv_buffer_size(bytes)?;
        socket.connect_timeout(&addr.into(), CONNECT_TIMEOUT)?;
        Self::upgrade(socket.into(), addr, tls, path)
    }

    /// Like [`WsClient::connect_to`], from the local address `source` (any of 127.0.0.0/8 on
    /// loopback): another "host" as far as the server can tell.
    pub fn connect_from(
        source: std::net::IpAddr,
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        path: &str,
    ) -> io::Result<WsClient> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        socket.connect_timeout(&addr.into(), CONNECT_TIMEOUT)?;
        Self::upgrade(socket.into(), addr, tls, path)
    }

    fn upgrade(
        tcp: TcpStream,
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        path: &str,
    ) -> io::Result<WsClient> {
        tcp.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        tcp.set_write_timeout(Some(CONNECT_TIMEOUT))?;
        tcp.set_nodelay(true)?;
        // The server's loopback certificate says `localhost`; anything else (a relay on
        // 127.0.0.2, a namespace's address) is certified for its IP address.
        let name = if addr.ip() == std::net::IpAddr::from([127, 0, 0, 1]) {
            ServerName::try_from("localhost").map_err(io::Error::other)?
        } else {
            ServerName::IpAddress(addr.ip().into())
        };
        let conn = ClientConnection::new(tls, name).map_err(io::Error::other)?;
        let mut tls = StreamOwned::new(conn, tcp);
        let key = base64_16(rand::random::<[u8; 16]>());
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost:{}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            addr.port()
        );
        tls.write_all(request.as_bytes())?;
        tls.flush()?;
        // Read the response head; anything after it already belongs to the frame stream.
        let mut buf = Vec::new();
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let head_end = loop {
            if let Some(pos) = find(&buf, b"\r\n\r\n") {
                break pos + 4;
            }
            if buf.len() > 64 * 1024 || Instant::now() > deadline {
                return Err(io::Error::other("no complete HTTP response head"));
            }
            let mut chunk = [0u8; 4096];
            let n = tls.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "closed during the upgrade: {}",
                        String::from_utf8_lossy(&buf)
                    ),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(io::Error::other(format!("upgrade refused: {head}")));
        }
        let rest = buf.split_off(head_end);
        Ok(WsClient {
            tls,
            buf: rest,
            ended: false,
            gate: None,
        })
    }

    /// Runs the end-to-end handshake as agent `agent_id` signing with `identity`, trusting
    /// `server`: from then on frames are sealed both ways. Panics if the server refuses.
    pub fn secure(&mut self, agent_id: &str, identity: &Identity, server: &PublicKey) {
        let (mut gate, first) = AgentGate::start().unwrap_or_else(|e| panic!("{e}"));
        self.send_frame(OP_BINARY, true, &first)
            .unwrap_or_else(|e| panic!("end-to-end handshake: {e}"));
        let answer = match self.recv(CONNECT_TIMEOUT) {
            Some(WsEvent::Data(bytes)) => bytes,
            other => panic!("end-to-end handshake: expected the server's answer, got {other:?}"),
        };
        match gate.on_message(&answer, std::slice::from_ref(server), agent_id, identity) {
            Ok(AgentStep::Send(last)) => self
                .send_frame(OP_BINARY, true, &last)
                .unwrap_or_else(|e| panic!("end-to-end handshake: {e}")),
            other => panic!("end-to-end handshake: {other:?}"),
        }
        self.gate = Some(gate);
    }

    /// Writes `bytes` as they are (no framing): for half-sent or malformed frames.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tls.write_all(bytes)?;
        self.tls.flush()
    }

    /// Sends one masked frame (as a client must) with `opcode`, FIN set if `fin`.
    pub fn send_frame(&mut self, opcode: u8, fin: bool, payload: &[u8]) -> io::Result<()> {
        let mut out = frame_header(opcode, fin, payload.len() as u64);
        let mask: [u8; 4] = rand::random();
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.send_raw(&out)
    }

    /// Sends the end-to-end handshake's first message and reads what comes back: `None` if
    /// the server answered it (the session is held, waiting for the rest of the handshake),
    /// or the frame it sent in clear instead (`Busy`, or a refusal).
    pub fn greet(&mut self, timeout: Duration) -> Option<Frame> {
        let (_, first) = AgentGate::start().unwrap_or_else(|e| panic!("{e}"));
        // A server that sheds us may close before this is read: its Busy is read anyway.
        let _ = self.send_frame(OP_BINARY, true, &first);
        match self.recv(timeout) {
            Some(WsEvent::Data(bytes))
                if bytes.first() == Some(&b'{')
                    && protocol::decode(&bytes, Sender::Server).is_ok() =>
            {
                Some(
                    protocol::decode(&bytes, Sender::Server)
                        .unwrap_or_else(|e| panic!("undecodable clear frame ({e})")),
                )
            }
            Some(WsEvent::Data(_)) => None,
            other => panic!("expected the handshake's answer or a clear frame, got {other:?}"),
        }
    }

    /// Sends a binary message (sealed once the session is secured; a payload too large to
    /// seal goes out as it is, for the server to refuse by its size).
    pub fn send_binary(&mut self, payload: &[u8]) -> io::Result<()> {
        match self
            .gate
            .as_mut()
            .filter(|_| payload.len() <= MAX_FRAME_BYTES)
        {
            Some(gate) => {
                let sealed = gate.seal(payload).map_err(io::Error::other)?;
                self.send_frame(OP_BINARY, true, &sealed)
            }
            None => self.send_frame(OP_BINARY, true, payload),
        }
    }

    /// Sends a protocol frame, encoded as the peers do.
    pub fn send(&mut self, frame: &Frame) -> io::Result<()> {
        let bytes = frame.encode().map_err(io::Error::other)?;
        self.send_binary(&bytes)
    }

    /// The next WebSocket event, or `None` if nothing arrived within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<WsEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.parse_one() {
                return Some(match (event, self.gate.as_mut()) {
                    (WsEvent::Data(bytes), Some(gate)) => match gate.open_frame(&bytes) {
                        Ok(frame) => WsEvent::Data(frame),
                        // A refusal of the handshake's last message comes in clear.
                        Err(_)
                            if bytes.first() == Some(&b'{')
                                && protocol::decode(&bytes, Sender::Server).is_ok() =>
                        {
                            WsEvent::Data(bytes)
                        }
                        Err(e) => WsEvent::Dropped(format!("a frame that does not open: {e}")),
                    },
                    (event, _) => event,
                });
            }
            if self.ended {
                return Some(WsEvent::Dropped("already ended".into()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let _ = self.tls.sock.set_read_timeout(Some(left));
            let mut chunk = [0u8; 16 * 1024];
            match self.tls.read(&mut chunk) {
                Ok(0) => {
                    self.ended = true;
                    return Some(WsEvent::Dropped("EOF".into()));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.ended = true;
                    return Some(WsEvent::Dropped(e.to_string()));
                }
            }
        }
    }

    /// The next protocol frame (pings and pongs skipped); panics on a timeout, a close or a
    /// drop, naming `what` was expected.
    pub fn recv_frame(&mut self, what: &str, timeout: Duration) -> Frame {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(WsEvent::Data(bytes)) => {
                    return protocol::decode(&bytes, Sender::Server).unwrap_or_else(|e| {
                        panic!(
                            "waiting for {what}: undecodable frame from the server ({e}): {}",
                            String::from_utf8_lossy(&bytes)
                        )
                    })
                }
                Some(WsEvent::Ping(_) | WsEvent::Pong(_)) => {}
                Some(other) => panic!("waiting for {what}: got {other:?}"),
                None => panic!("waiting for {what}: nothing within {timeout:?}"),
            }
        }
    }

    /// Reads the server's challenge nonce (the first frame on every connection).
    pub fn challenge(&mut self, timeout: Duration) -> String {
        match self.recv_frame("the challenge", timeout) {
            Frame::Challenge(c) => c.nonce,
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    /// Reads until the connection closes (close frame or drop); panics if it is still open
    /// after `timeout`. Frames seen on the way are kept.
    pub fn expect_close(&mut self, timeout: Duration) -> Closed {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(WsEvent::Data(bytes)) => match protocol::decode(&bytes, Sender::Server) {
                    Ok(f) => frames.push(f),
                    Err(e) => panic!(
                        "undecodable frame from the server before the close ({e}): {}",
                        String::from_utf8_lossy(&bytes)
                    ),
                },
                Some(WsEvent::Ping(_) | WsEvent::Pong(_)) => {}
                Some(WsEvent::Close(code, reason)) => {
                    self.ended = true;
                    return Closed {
                        code,
                        reason,
                        frames,
                    };
                }
                Some(WsEvent::Dropped(reason)) => {
                    return Closed {
                        code: None,
                        reason,
                        frames,
                    }
                }
                None => panic!(
                    "the connection is still open after {timeout:?}; frames so far: {frames:?}"
                ),
            }
        }
    }

    /// Whether the connection still works: a ping is answered with its pong.
    pub fn answers_ping(&mut self, timeout: Duration) -> bool {
        let token: [u8; 8] = rand::random();
        if self.send_frame(OP_PING, true, &token).is_err() {
            return false;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(WsEvent::Pong(p)) if p == token => return true,
                Some(WsEvent::Pong(_) | WsEvent::Ping(_) | WsEvent::Data(_)) => {}
                Some(WsEvent::Close(..) | WsEvent::Dropped(_)) | None => return false,
            }
        }
    }

    /// Parses one complete frame out of the buffer, if there is one.
    fn parse_one(&mut self) -> Option<WsEvent> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let opcode = b[0] & 0x0F;
        let masked = b[1] & 0x80 != 0;
        let (len, mut at) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(n), 10)
            }
            126 | 127 => return None,
            n => (u64::from(n), 2),
        };
        let mask = if masked {
            if b.len() < at + 4 {
                return None;
            }
            let m = [b[at], b[at + 1], b[at + 2], b[at + 3]];
            at += 4;
            Some(m)
        } else {
            None
        };
        let len = usize::try_from(len).ok()?;
        if b.len() < at + len {
            return None;
        }
        let mut payload: Vec<u8> = b[at..at + len].to_vec();
        if let Some(m) = mask {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= m[i % 4];
            }
        }
        self.buf.drain(..at + len);
        Some(match opcode {
            OP_TEXT | OP_BINARY | OP_CONTINUATION => WsEvent::Data(payload),
            OP_PING => WsEvent::Ping(payload),
            OP_PONG => WsEvent::Pong(payload),
            OP_CLOSE => {
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                let reason =
                    String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned();
                WsEvent::Close(code, reason)
            }
            other => WsEvent::Dropped(format!("server sent reserved opcode {other:#x}")),
        })
    }
}

/// The header of a client frame (without the masking key) declaring `len` payload bytes.
pub fn frame_header(opcode: u8, fin: bool, len: u64) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | (opcode & 0x0F)];
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Standard base64 of 16 bytes (the `Sec-WebSocket-Key`), without pulling in a crate for it.
fn base64_16(bytes: [u8; 16]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(24);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3F) as usize] as char);
        }
    }
    while !out.len().is_multiple_of(4) {
        out.push('=');
    }
    out
}

/// A random journal incarnation, as a fresh agent would present.
pub fn fresh_incarnation() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// A `Hello` as the uplink builds it for a fresh peer: `identity` signs `nonce` and `agent_id`.
pub fn hello(identity: &Identity, agent_id: &str, nonce: &str, incarnation: &str) -> Hello {
    Hello {
        agent_id: agent_id.to_owned(),
        version: "0.0.0-hostile".to_owned(),
        incarnation: incarnation.to_owned(),
        server_incarnation: String::new(),
        last_command_seq: Seq::ZERO,
        proof: identity.sign(&hello_proof_bytes(nonce, agent_id)),
        trust_serial: 0,
        ..Default::default()
    }
}

/// The private key an installed agent keeps in its data directory.
pub fn agent_identity(agent_dir: &Path) -> Identity {
    Identity::load(&agent_dir.join("agent.key"))
        .unwrap_or_else(|e| panic!("{}: {e}", agent_dir.display()))
}

/// `GET /admin/health` as JSON.
pub fn health(server: &Server) -> Value {
    let r = server.request("GET", "/admin/health", None);
    assert_eq!(r.status, 200, "/admin/health: {}", r.body);
    r.json()
}

/// `tether_journal_commits_total` from `GET /metrics`.
pub fn journal_commits(server: &Server) -> u64 {
    let r = server.request("GET", "/metrics", None);
    assert_eq!(r.status, 200, "/metrics: {}", r.body);
    r.body
        .lines()
        .find_map(|l| l.strip_prefix("tether_journal_commits_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no tether_journal_commits_total in /metrics:\n{}", r.body))
}

/// The server's log so far (stderr of `tether-server run`).
pub fn server_log(server: &Server) -> String {
    std::fs::read_to_string(server.dir.join("../server.log")).unwrap_or_default()
}

/// Sends `bytes` over plain TCP to `addr` and reads until the peer closes or `timeout` passes:
/// what came back, and whether the peer closed (FIN or reset) rather than stayed silent.
pub fn plain_tcp_exchange(
    addr: SocketAddr,
    bytes: &[u8],
    timeout: Duration,
) -> io::Result<(Vec<u8>, bool)> {
    let mut tcp = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    tcp.write_all(bytes)?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok((out, false));
        }
        tcp.set_read_timeout(Some(left))?;
        match tcp.read(&mut chunk) {
            Ok(0) => return Ok((out, true)),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
            {
                return Ok((out, true))
            }
            Err(e) => return Err(e),
        }
    }
}

/// TCP connections (sockets not listening) that process `pid` holds open, as
/// `local -> remote state` lines from `/proc/<pid>/net/tcp{,6}`.
pub fn tcp_connections(pid: u32) -> Vec<String> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|t| {
                    let t = t.to_string_lossy();
                    Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // st 0A is LISTEN; inode 0 is a socket no process holds (TIME_WAIT).
            if cols.get(3) != Some(&"0A") && cols.get(9).is_some_and(|i| inodes.contains(*i)) {
                found.push(format!(
                    "{} -> {} st={}",
                    cols.get(1).unwrap_or(&"?"),
                    cols.get(2).unwrap_or(&"?"),
                    cols.get(3).unwrap_or(&"?")
                ));
            }
        }
    }
    found
}
