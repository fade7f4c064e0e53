//! Harness for the end-to-end tests in `tests/tests/`: locating the workspace's built binaries,
//! running them with a clean, controlled environment, keeping long-running ones under a guard
//! that kills them on drop, polling for readiness files, and a small blocking HTTPS client;
//! `webdriver` drives headless Chromium for the web application's browser tests.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_shared::https;

pub mod admin_api;
pub mod blackhole;
pub mod enrollment;
pub mod fake_upstream;
pub mod fixtures;
pub mod fleet;
pub mod loadgen;
pub mod marks;
pub mod measure;
pub mod netns;
pub mod pg_proxy;
pub mod postgres;
pub mod relays;
pub mod tether_cli;
pub mod webdriver;
pub mod wire;

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The directory holding the workspace's built binaries: `TETHER_BIN_DIR` if set (the fleet
/// bench points it at `target/release`), else the same target profile directory as the running
/// test, i.e. `target/debug` for `cargo test`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TETHER_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().and_then(Path::parent).map(Path::to_path_buf))
        .unwrap_or_else(|| workspace_root().join("target/debug"))
}

/// Path of a workspace binary (`tether-server`, ...) in [`bin_dir`]. Panics if it is missing:
/// the binaries must be built before the end-to-end tests run.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --workspace` first",
        path.display()
    );
    path
}

/// A command for binary `name` whose environment holds no `TETHER_` variables and whose config
/// dir is `config_dir`, so the host's `/etc/tether` and shell never leak into a test.
pub fn command(name: &str, config_dir: &Path) -> Command {
    let mut cmd = Command::new(bin(name));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TETHER_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("TETHER_CONFIG_DIR", config_dir);
    cmd
}

/// Runs `name` with `args` (see [`command`]) and returns its output.
pub fn run<I, S>(name: &str, config_dir: &Path, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    match command(name, config_dir).args(args).output() {
        Ok(output) => output,
        Err(e) => panic!("cannot start {name}: {e}"),
    }
}

/// Stdout of `output` as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// An environment as the borrowed pairs `Server::start_with` takes.
pub fn borrowed(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Stderr of `output` as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// How often the polling helpers look again.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// A running child process that is killed and reaped when dropped, so that a failing test
/// never leaves a server behind.
pub struct ChildGuard {
    child: Child,
    name: String,
}

impl ChildGuard {
    /// Spawns `cmd`; `name` labels panics.
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        match cmd.spawn() {
            Ok(child) => ChildGuard {
                child,
                name: name.to_owned(),
            },
            Err(e) => panic!("cannot start {name}: {e}"),
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends signal `name` (`TERM`, `INT`, `KILL`) with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg("-s")
            .arg(name)
            .arg(self.id().to_string())
            .status();
        match status {
            Ok(s) if s.success() => {}
            other => panic!("kill -s {name} {} ({}): {other:?}", self.id(), self.name),
        }
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        match self.child.try_wait() {
            Ok(status) => status,
            Err(e) => panic!("{}: cannot poll: {e}", self.name),
        }
    }

    /// Waits at most `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits at most `timeout` for `path` to exist and returns its contents; panics if the
    /// process exits first or the time runs out. Only for files written atomically (complete
    /// once visible), such as `ports.json`.
    /// Waits for `dir/ports.json`, the addresses a Tether process bound (written atomically once
    /// it listens); panics if the process exits first.
    pub fn wait_for_ports(&mut self, dir: &Path) -> Ports {
        let path = dir.join("ports.json");
        let text = self.wait_for_file(&path, fleet::START_TIMEOUT);
        Ports(
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display())),
        )
    }

    pub fn wait_for_file(&mut self, path: &Path, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match std::fs::read_to_string(path) {
                Ok(text) => return text,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => panic!("{}: {e}", path.display()),
            }
            if let Some(status) = self.try_exit() {
                panic!(
                    "{} exited ({status}) before writing {}",
                    self.name,
                    path.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not write {} within {timeout:?}",
                self.name,
                path.display()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Best effort: it may exit between the check and the kill.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// An HTTP response read by [`https_request`].
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// The status code.
    pub status: u16,
    /// Header names (lowercased) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body, decoded from chunked transfer encoding if need be.
    pub body: String,
}

impl HttpReply {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics with the body if it is not.
    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_str(&self.body) {
            Ok(value) => value,
            Err(e) => panic!("not JSON ({e}): {}", self.body),
        }
    }
}

/// How long the helpers wait for a peer to answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one HTTP/1.1 request over TLS to `addr`, verifying the server as `server_name` with
/// `tls`, and reads the whole response (the request asks for `Connection: close`).
pub fn https_request(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    server_name: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<HttpReply> {
    https_request_with_body(addr, tls, server_name, method, path, headers, None)
}

/// [`https_request`] with an optional body (sent with `Content-Length`), through the shared
/// client `tether_shared::https`.
pub fn https_request_with_body(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    server_name: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> io::Result<HttpReply> {
    let request = https::Request {
        method,
        host: server_name,
        port: addr.port(),
        addr: Some(addr),
        path,
        headers,
        body,
    };
    let limits = https::Limits {
        connect_timeout: IO_TIMEOUT,
        total_timeout: IO_TIMEOUT,
        max_response_bytes: 16 * 1024 * 1024,
    };
    match https::request(tls, &request, &limits) {
        Ok(reply) => Ok(HttpReply {
            status: reply.status,
            headers: reply.headers,
            body: String::from_utf8_lossy(&reply.body).into_owned(),
        }),
        Err(https::HttpsError::Connect { source, .. } | https::HttpsError::Io { source, .. }) => {
            Err(source)
        }
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

/// Connects to `addr` without TLS, sends `bytes` and returns whatever comes back before the
/// peer closes the connection or stays silent for `timeout`.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.write_all(bytes)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(out)
            }
            // A reset after the peer gave up on us is an answer too.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

/// A process's `ports.json`: listener name to bound address.
#[derive(Debug, Clone)]
pub struct Ports(pub serde_json::Value);

impl Ports {
    /// The address of listener `name`; panics if it is not there.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.0[name]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("ports.json has no address for {name}: {}", self.0))
    }
}

/// Every file under `dir` (recursively) whose bytes contain `needle`: for checks that a secret
/// was never written to disk.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(path),
                Ok(t) if t.is_file() => {
                    let holds = std::fs::read(&path)
                        .map(|bytes| bytes.windows(needle.len().max(1)).any(|w| w == needle))
                        .unwrap_or(false);
                    if holds {
                        found.push(path);
                    }
                }
                _ => {}
            }
        }
    }
    found
}

/// The CSRF token of a web page (from its first form's hidden field).
pub fn csrf_of(page: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = page
        .find(marker)
        .unwrap_or_else(|| panic!("no csrf field in the page"))
        + marker.len();
    page[start..]
        .split('"')
        .next()
        .unwrap_or_default()
        .to_owned()
}
