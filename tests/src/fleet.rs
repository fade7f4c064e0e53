//! A small fleet for end-to-end tests: a real `tether-server` and real `tether-agent`s on
//! loopback, each with its own data directory, started, killed and restarted at will.
//!
//! The server keeps its ports across restarts (first start on port 0, later ones on the ports
//! it got), so agents find it again. Everything is killed when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub use crate::admin_api::AdminApi;
use crate::{bin, ChildGuard};

/// How long start-ups may take before a test fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Poll `f` until it returns `Some`, at most `timeout`; panics with `what` otherwise.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn base_command(name: &str, config_dir: &Path, log: &Path) -> Command {
    let mut cmd = Command::new(bin(name));
    for (k, _) in std::env::vars() {
        if k.starts_with("TETHER_") {
            cmd.env_remove(k);
        }
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    cmd.env("TETHER_CONFIG_DIR", config_dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    cmd
}

/// A loopback address with a port free now (for a process that binds it later), below the
/// range the kernel picks local ports of outgoing connections from: a port from that range
/// (what binding port 0 gives) may be taken by any connection made before the process binds it
/// (a standby binds its agents' port only once it is active, seconds later).
pub fn free_addr() -> SocketAddr {
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let below = 10_000..ephemeral_from.max(10_001);
    for _ in 0..1000 {
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), below.clone());
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    l.local_addr().unwrap_or_else(|e| panic!("{e}"))
}

/// A running (or stopped) server.
pub struct Server {
    pub dir: PathBuf,
    config_dir: PathBuf,
    pub child: Option<ChildGuard>,
    /// The REST API (`server.request(...)`, `server.deploy(...)`, ...).
    pub api: AdminApi,
    pub wss: SocketAddr,
    env: Vec<(String, String)>,
}

impl std::ops::Deref for Server {
    type Target = AdminApi;

    fn deref(&self) -> &AdminApi {
        &self.api
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut AdminApi {
        &mut self.api
    }
}

impl Server {
    /// Initialize `dir` and start the server on free ports.
    pub fn start(dir: &Path) -> Server {
        Self::start_with(dir, &[])
    }

    /// Like [`Server::start`], with extra `TETHER_...` environment.
    pub fn start_with(dir: &Path, env: &[(&str, &str)]) -> Server {
        let config_dir = dir.join("etc");
        std::fs::create_dir_all(&config_dir).unwrap_or_else(|e| panic!("{e}"));
        let data = dir.join("server");
        let out = base_command("tether-server", &config_dir, &dir.join("server-init.log"))
            .args(["init", "--data"])
            .arg(&data)
            .output()
            .unwrap_or_else(|e| panic!("init: {e}"));
        assert!(out.status.success(), "server init failed: {out:?}");
        let admin_token = std::fs::read_to_string(data.join("admin.token"))
            .unwrap_or_else(|e| panic!("{e}"))
            .trim()
            .to_owned();
        // The agents' bundle: tests talk to relays as well as to the server.
        let ca =
            std::fs::read_to_string(data.join("agent-ca.pem")).unwrap_or_else(|e| panic!("{e}"));
        let tls =
            Arc::new(tether_shared::tls::client_config(&ca).unwrap_or_else(|e| panic!("{e}")));
        let unbound: SocketAddr = "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"));
        let mut server = Server {
            dir: data,
            config_dir,
            child: None,
            api: AdminApi::new(unbound, "localhost", admin_token, tls),
            wss: unbound,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        server.run();
        server
    }

    /// Another node of this server's cluster (its storage a shared database): `dir/server` made
    /// by `tether-server join` from this node's data directory (as `docs/cluster.md` says), on ports of its own chosen now, with `env` on top of
    /// this node's. Started, not waited for: a standby binds nothing until it is active (see
    /// [`Server::wait_active`]).
    pub fn another_node(&self, dir: &Path, env: &[(&str, &str)]) -> Server {
        let data = dir.join("server");
        let config_dir = dir.join("etc");
        std::fs::create_dir_all(&config_dir).unwrap_or_else(|e| panic!("{e}"));
        let joined = crate::command("tether-server", &config_dir)
            .arg("join")
            .arg("--from")
            .arg(&self.dir)
            .arg("--data")
            .arg(&data)
            .arg("--secrets-key")
            .arg(self.config_dir.join("secrets.key"))
            .output()
            .unwrap_or_else(|e| panic!("tether-server join: {e}"));
        assert!(joined.status.success(), "tether-server join: {joined:?}");
        // Its ports and its address are its own, whatever this node's environment fixed.
        let mut all: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| !k.starts_with("TETHER_LISTEN__") && k != "TETHER_STORAGE__NODE_URL")
            .cloned()
            .collect();
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut api = self.api.clone();
        api.https = free_addr();
        let mut node = Server {
            dir: data,
            config_dir,
            child: None,
            api,
            wss: free_addr(),
            env: all,
        };
        node.spawn();
        node
    }

    /// Waits until this node is active (it wrote its ports), at most `timeout`.
    pub fn wait_active(&mut self, timeout: Duration) {
        let child = self.child.as_mut().unwrap_or_else(|| panic!("not started"));
        let text = child.wait_for_file(&self.dir.join("ports.json"), timeout);
        assert!(!text.is_empty(), "empty ports.json");
    }

    /// Start the process (again), on the same ports once they are known.
    pub fn run(&mut self) {
        self.spawn();
        let child = self.child.as_mut().unwrap_or_else(|| panic!("not started"));
        let ports = child.wait_for_ports(&self.dir);
        self.api.https = ports.addr("https");
        self.wss = ports.addr("wss");
    }

    /// Start the process without waiting for it to listen.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("ports.json"));
        let log = self.dir.join("../server.log");
        let mut cmd = base_command("tether-server", &self.config_dir, &log);
        cmd.args(["run", "--data"]).arg(&self.dir);
        cmd.env("TETHER_LISTEN__HTTPS", self.https.to_string())
            .env("TETHER_LISTEN__WSS", self.wss.to_string());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(ChildGuard::spawn("tether-server", &mut cmd));
    }

    /// SIGKILL the server and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.signal("KILL");
            c.wait_exit(START_TIMEOUT);
        }
    }

    /// SIGTERM the server (a graceful stop) and wait for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.signal("TERM");
            c.wait_exit(START_TIMEOUT);
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::id)
    }

    /// `agent-ca.pem`: what agents and relays are installed with (the server's CA and the
    /// relay CA).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("agent-ca.pem")
    }

    /// `ca.pem`: the server's CA alone, what operators' clients trust.
    pub fn operator_ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The agent-facing base URL agents install with.
    pub fn upstream(&self) -> String {
        format!("wss://localhost:{}", self.wss.port())
    }
}

/// An installed agent and, while it runs, its monitor process.
pub struct Agent {
    pub dir: PathBuf,
    config_dir: PathBuf,
    pub id: String,
    pub name: String,
    pub monitor: Option<ChildGuard>,
    env: Vec<(String, String)>,
}

impl Agent {
    /// `tether-agent install` against `server` with a one-use token.
    pub fn install(server: &Server, root: &Path, name: &str, tags: &[&str]) -> Agent {
        Self::install_with(server, root, name, tags, &[])
    }

    pub fn install_with(
        server: &Server,
        root: &Path,
        name: &str,
        tags: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        Self::install_via(server, &[server.upstream()], root, name, tags, env)
    }

    /// Install with an explicit list of upstream base URLs.
    pub fn install_via(
        server: &Server,
        upstreams: &[String],
        root: &Path,
        name: &str,
        tags: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let dir = root.join(name);
        let config_dir = root.join(format!("{name}-etc"));
        std::fs::create_dir_all(&config_dir).unwrap_or_else(|e| panic!("{e}"));
        let token = server.token(1);
        let mut cmd = base_command(
            "tether-agent",
            &config_dir,
            &root.join(format!("{name}-install.log")),
        );
        cmd.arg("install");
        for u in upstreams {
            cmd.args(["--upstream", u]);
        }
        cmd.arg("--ca")
            .arg(server.ca_path())
            .args(["--token", &token, "--name", name, "--data"])
            .arg(&dir);
        for t in tags {
            cmd.args(["--tag", t]);
        }
        let out = cmd.output().unwrap_or_else(|e| panic!("install: {e}"));
        assert!(out.status.success(), "install {name} failed: {out:?}");
        let state: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("agent.json")).unwrap_or_else(|e| panic!("{e}")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let id = state["agent_id"]
            .as_str()
            .unwrap_or_else(|| panic!("agent.json: {state}"))
            .to_owned();
        Agent {
            dir,
            config_dir,
            id,
            name: name.to_owned(),
            monitor: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Start the monitor (which starts the worker).
    pub fn run(&mut self) {
        let log = self.dir.join("../").join(format!("{}.log", self.name));
        let mut cmd = base_command("tether-agent", &self.config_dir, &log);
        cmd.args(["run", "--data"]).arg(&self.dir);
        // Short timers so that faults are noticed quickly in tests.
        cmd.env("TETHER_AGENT__RECONNECT_MIN_MS", "50")
            .env("TETHER_AGENT__RECONNECT_MAX_MS", "1000");
        cmd.env("TETHER_AGENT__HEARTBEAT_INTERVAL_MS", "1000");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.monitor = Some(ChildGuard::spawn("tether-agent run", &mut cmd));
    }

    pub fn monitor_pid(&self) -> Option<u32> {
        self.monitor.as_ref().map(ChildGuard::id)
    }

    /// The worker process the monitor runs now, if any.
    pub fn worker_pid(&self) -> Option<u32> {
        children_of(self.monitor_pid()?).into_iter().next()
    }

    /// SIGKILL the monitor (its worker follows when its stdin pipe closes).
    pub fn kill_monitor(&mut self) {
        let worker = self.worker_pid();
        if let Some(mut m) = self.monitor.take() {
            m.signal("KILL");
            m.wait_exit(START_TIMEOUT);
        }
        if let Some(w) = worker {
            eventually("the orphaned worker to exit", START_TIMEOUT, || {
                (!alive(w)).then_some(())
            });
        }
    }

    /// SIGKILL the worker alone; the monitor restarts it.
    pub fn kill_worker(&self) -> Option<u32> {
        let pid = self.worker_pid()?;
        let _ = Command::new("kill")
            .args(["-s", "KILL", &pid.to_string()])
            .status();
        Some(pid)
    }

    /// SIGTERM the monitor and wait for it.
    pub fn stop(&mut self) {
        if let Some(mut m) = self.monitor.take() {
            m.signal("TERM");
            m.wait_exit(START_TIMEOUT);
        }
    }
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Live child processes of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // Fields after the command name: state ppid ...
        let mut rest = stat.rsplit(')').next().unwrap_or("").split_whitespace();
        let state = rest.next().unwrap_or("");
        let ppid = rest.next().and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) && state != "Z" {
            out.push(child);
        }
    }
    out
}

/// Listening TCP sockets (IPv4 and IPv6) held by process `pid`.
pub fn listening_sockets(pid: u32) -> Vec<String> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    inodes.insert(inode.to_owned());
                }
            }
        }
    }
    let mut found = Vec::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // st == 0A is LISTEN for TCP; any bound UDP socket counts as listening.
            let listening = if table.starts_with("tcp") {
                cols.get(3) == Some(&"0A")
            } else {
                true
            };
            if listening && cols.get(9).is_some_and(|inode| inodes.contains(*inode)) {
                found.push(format!("{table} {}", cols.get(1).unwrap_or(&"?")));
            }
        }
    }
    found
}

/// A scratch directory for one test; kept (and its path printed) when `TETHER_KEEP_TEST_DIRS`
/// is set, to read the processes' logs after a failure.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().to_owned();
        if std::env::var_os("TETHER_KEEP_TEST_DIRS").is_some() {
            eprintln!("test dir kept: {}", path.display());
            let _ = dir.keep();
            return TestDir { dir: None, path };
        }
        TestDir {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Show where the logs are; the directory itself goes unless kept.
            eprintln!(
                "logs of the failed test were in {} (set TETHER_KEEP_TEST_DIRS=1 to keep them)",
                self.path.display()
            );
        }
        self.dir.take();
    }
}

/// A TCP forwarder on loopback that can be switched off (closing every connection through it)
/// and on again on the same port: a stand-in for a path to an upstream that comes and goes.
/// Given several targets, each connection goes to the first that accepts it (a TCP load
/// balancer in front of the nodes of a cluster).
pub struct Forwarder {
    pub addr: SocketAddr,
    targets: Vec<SocketAddr>,
    on: Arc<std::sync::atomic::AtomicBool>,
    /// Connections accepted so far.
    pub accepted: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Cuts asked for (see [`Forwarder::cut`]).
    cuts: Arc<std::sync::atomic::AtomicU64>,
}

impl Forwarder {
    pub fn start(target: SocketAddr, on: bool) -> Forwarder {
        Self::start_to(vec![target], on)
    }

    /// Forwards each connection to the first of `targets` that accepts it.
    pub fn start_to(targets: Vec<SocketAddr>, on: bool) -> Forwarder {
        Self::start_with(targets, on, false)
    }

    /// Forwards each connection to the next of `targets` in turn (the one after that if it
    /// refuses): a peer that reconnects lands on another node each time.
    pub fn alternating(targets: Vec<SocketAddr>) -> Forwarder {
        Self::start_with(targets, true, true)
    }

    fn start_with(targets: Vec<SocketAddr>, on: bool, alternate: bool) -> Forwarder {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let fwd = Forwarder {
            addr,
            targets: targets.clone(),
            on: Arc::new(AtomicBool::new(on)),
            accepted: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            cuts: Arc::new(AtomicU64::new(0)),
        };
        let (flag, accepted, stop) = (fwd.on.clone(), fwd.accepted.clone(), fwd.stop.clone());
        let cuts = fwd.cuts.clone();
        std::thread::spawn(move || {
            let mut live: Vec<std::net::TcpStream> = Vec::new();
            let mut cut = 0;
            while !stop.load(Ordering::Relaxed) {
                let asked = cuts.load(Ordering::Relaxed);
                if !flag.load(Ordering::Relaxed) || asked != cut {
                    cut = asked;
                    for s in live.drain(..) {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                }
                match listener.accept() {
                    Ok((client, _)) if flag.load(Ordering::Relaxed) => {
                        let first = match alternate {
                            true => accepted.load(Ordering::Relaxed) as usize % targets.len(),
                            false => 0,
                        };
                        let Some(server) = targets
                            .iter()
                            .cycle()
                            .skip(first)
                            .take(targets.len())
                            .find_map(|t| std::net::TcpStream::connect(t).ok())
                        else {
                            continue;
                        };
                        accepted.fetch_add(1, Ordering::Relaxed);
                        let _ = client.set_nonblocking(false);
                        for (mut from, mut to) in [
                            (client.try_clone(), server.try_clone()),
                            (server.try_clone(), client.try_clone()),
                        ]
                        .into_iter()
                        .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                        {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                        live.push(client);
                        live.push(server);
                    }
                    // Switched off: refuse by closing at once.
                    Ok((client, _)) => drop(client),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for s in live {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        });
        fwd
    }

    pub fn set(&self, on: bool) {
        self.on.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Cuts every connection through it now (it keeps accepting new ones).
    pub fn cut(&self) {
        self.cuts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn target(&self) -> SocketAddr {
        self.targets[0]
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
