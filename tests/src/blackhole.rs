//! A partition on this machine's loopback: nftables (root) drops every packet to and from one
//! TCP address, silently, as a cut network does (no reset: the peers' sockets hang), until the
//! guard is dropped. Its own table, named after the test process, so parallel tests and the
//! machine's own ruleset are left alone.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness: a failure to set up is a test failure

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Tables made so far by this process (each guard has its own).
static MADE: AtomicU32 = AtomicU32::new(0);

/// Packets to and from `addr` are dropped while this lives.
pub struct Blackhole {
    table: String,
}

/// Loads `script` with `nft -f -`; stderr as the error.
fn nft(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Blackhole {
    /// Whether partitions can be made here (root, and `nft`); outside CI a test without them
    /// is skipped, in CI it fails (see `make setup`).
    pub fn available() -> bool {
        let root = nix::unistd::geteuid().is_root();
        let nft = Command::new("nft")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            (root && nft) || std::env::var("CI").as_deref() != Ok("true"),
            "partitions need root and nft (nftables): run `make setup` as root"
        );
        root && nft
    }

    /// Cuts every packet to and from `addr` (IPv4, TCP).
    pub fn cut(addr: SocketAddr) -> Blackhole {
        let table = format!(
            "tether_blackhole_{}_{}",
            std::process::id(),
            MADE.fetch_add(1, Ordering::Relaxed)
        );
        let (ip, port) = (addr.ip(), addr.port());
        nft(&format!(
            "table ip {table} {{
               chain out {{
                 type filter hook output priority 0; policy accept;
                 ip daddr {ip} tcp dport {port} drop
                 ip saddr {ip} tcp sport {port} drop
               }}
             }}"
        ))
        .unwrap_or_else(|e| panic!("nft: cannot cut {addr}: {e}"));
        Blackhole { table }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        if let Err(e) = nft(&format!("delete table ip {}", self.table)) {
            eprintln!("nft: table {} not deleted: {e}", self.table);
        }
    }
}
