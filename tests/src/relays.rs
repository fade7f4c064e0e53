//! Relays for end-to-end tests: a real `tether-relay`, installed against a [`Server`] (directly
//! or through a parent relay) and run on loopback with its own data directory. Like the
//! server, it keeps its ports across restarts. Killed when dropped. [`Relay::run_supervised`]
//! runs it under a restart loop, as systemd's `Restart=always` would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::fleet::{base_command, eventually, Server, START_TIMEOUT};
use crate::ChildGuard;

/// The address relays listen on and the name their certificates hold in loopback tests: a
/// relay is never certified for a name of the server (`localhost`, `127.0.0.1`), as on a real
/// network it has an address of its own. Linux routes all of 127.0.0.0/8 to loopback.
pub const RELAY_HOST: &str = "127.0.0.2";

pub struct Relay {
    pub dir: PathBuf,
    config_dir: PathBuf,
    pub id: String,
    pub name: String,
    pub child: Option<ChildGuard>,
    pub downstream: SocketAddr,
    pub admin: SocketAddr,
    env: Vec<(String, String)>,
    supervisor: Option<Supervisor>,
}

/// A restart loop around `tether-relay run` (systemd's `Restart=always`, 200 ms apart).
struct Supervisor {
    stop: Arc<AtomicBool>,
    /// Processes started after the first one.
    restarts: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervisor {
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Relay {
    /// `tether-relay install` with a one-use relay token, through `upstreams`; then `run`.
    pub fn start(server: &Server, upstreams: &[String], root: &Path, name: &str) -> Relay {
        let mut relay = Self::install(server, upstreams, root, name, &[]);
        relay.run();
        relay
    }

    pub fn install(
        server: &Server,
        upstreams: &[String],
        root: &Path,
        name: &str,
        env: &[(&str, &str)],
    ) -> Relay {
        let dir = root.join(name);
        let config_dir = root.join(format!("{name}-etc"));
        std::fs::create_dir_all(&config_dir).unwrap_or_else(|e| panic!("{e}"));
        let token = server.enrollment_token("relay");
        let mut cmd = base_command(
            "tether-relay",
            &config_dir,
            &root.join(format!("{name}-install.log")),
        );
        cmd.arg("install");
        for u in upstreams {
            cmd.args(["--upstream", u]);
        }
        cmd.arg("--ca")
            .arg(server.ca_path())
            .args(["--token", &token, "--name", name])
            .args(["--hostname", RELAY_HOST])
            .arg("--data")
            .arg(&dir);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("relay install: {e}"));
        assert!(out.status.success(), "relay install {name} failed: {out:?}");
        let state: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("relay.json")).unwrap_or_else(|e| panic!("{e}")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let unbound: SocketAddr = "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"));
        let downstream = SocketAddr::new(RELAY_HOST.parse().unwrap_or_else(|e| panic!("{e}")), 0);
        Relay {
            id: state["relay_id"]
                .as_str()
                .unwrap_or_else(|| panic!("relay.json: {state}"))
                .to_owned(),
            dir,
            config_dir,
            name: name.to_owned(),
            child: None,
            downstream,
            admin: unbound,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            supervisor: None,
        }
    }

    /// The `tether-relay run` command, on the known ports (0 = any until first run).
    fn run_command(&self) -> Command {
        let log = self.dir.join(format!("../{}.log", self.name));
        let mut cmd = base_command("tether-relay", &self.config_dir, &log);
        cmd.args(["run", "--data"]).arg(&self.dir);
        cmd.env("TETHER_LISTEN__DOWNSTREAM", self.downstream.to_string())
            .env("TETHER_LISTEN__ADMIN", self.admin.to_string())
            .env("TETHER_RELAY__HEARTBEAT_INTERVAL_MS", "1000");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs the relay under a restart loop emulating systemd's `Restart=always`: whenever the
    /// process exits, `tether-relay run` starts again (200 ms later) on the same ports. Waits
    /// for the first process to listen.
    pub fn run_supervised(&mut self) {
        if self.downstream.port() == 0 {
            // Learn the ports first, so that every restart reuses them.
            self.run();
            self.kill();
        }
        self.kill();
        let ports_path = self.dir.join("ports.json");
        let _ = std::fs::remove_file(&ports_path);
        let stop = Arc::new(AtomicBool::new(false));
        let restarts = Arc::new(AtomicU32::new(0));
        let mut cmd = self.run_command();
        let (stop_t, restarts_t) = (stop.clone(), restarts.clone());
        let thread = std::thread::spawn(move || {
            let mut first = true;
            while !stop_t.load(Ordering::SeqCst) {
                if !first {
                    restarts_t.fetch_add(1, Ordering::SeqCst);
                }
                first = false;
                let mut child = ChildGuard::spawn("tether-relay (supervised)", &mut cmd);
                loop {
                    if stop_t.load(Ordering::SeqCst) {
                        return; // dropping the guard kills the process
                    }
                    if child.try_exit().is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        self.supervisor = Some(Supervisor {
            stop,
            restarts,
            thread: Some(thread),
        });
        eventually("supervised relay ports.json", START_TIMEOUT, || {
            std::fs::read_to_string(&ports_path).ok()
        });
    }

    /// Processes the supervisor started after its first one (0 when not supervised).
    pub fn restarts(&self) -> u32 {
        self.supervisor
            .as_ref()
            .map_or(0, |s| s.restarts.load(Ordering::SeqCst))
    }

    /// Start the process (again), on the same ports once they are known.
    pub fn run(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("ports.json"));
        let mut cmd = self.run_command();
        let mut child = ChildGuard::spawn("tether-relay", &mut cmd);
        let ports = child.wait_for_ports(&self.dir);
        self.downstream = ports.addr("downstream");
        self.admin = ports.addr("admin");
        self.child = Some(child);
    }

    /// SIGKILL the relay and reap it (and stop its supervisor, if any).
    pub fn kill(&mut self) {
        if let Some(mut s) = self.supervisor.take() {
            s.stop();
        }
        if let Some(mut c) = self.child.take() {
            c.signal("KILL");
            c.wait_exit(START_TIMEOUT);
        }
    }

    /// The base URL agents and child relays install with.
    pub fn upstream(&self) -> String {
        format!("wss://{RELAY_HOST}:{}", self.downstream.port())
    }

    /// `GET /admin/health` on the loopback admin listener (plain HTTP).
    pub fn health(&self) -> Value {
        let body = self.admin_get("/admin/health");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("relay health {body}: {e}"))
    }

    /// `GET /metrics` on the loopback admin listener: Prometheus text.
    pub fn metrics(&self) -> String {
        self.admin_get("/metrics")
    }

    /// The body of `GET path` on the loopback admin listener.
    fn admin_get(&self, path: &str) -> String {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let raw = crate::raw_exchange(self.admin, request.as_bytes(), START_TIMEOUT)
            .unwrap_or_else(|e| panic!("relay {path}: {e}"));
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 200"), "relay {path}: {text}");
        text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()
    }
}

/// The relay list entry named `name`.
pub fn relay_entry(server: &Server, name: &str) -> Option<Value> {
    let r = server.request("GET", "/api/v1/relays", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
        .as_array()?
        .iter()
        .find(|a| a["name"] == name)
        .cloned()
}
