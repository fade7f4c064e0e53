//! `DIR/ports.json`: the addresses the server's listeners are bound to, written atomically once
//! they listen, so that tests and scripts poll for it instead of sleeping (and learn the port
//! when the configuration asked for port 0).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tether_shared::identity::write_file_atomic;

/// File name inside the data directory.
pub const PORTS_FILE: &str = "ports.json";

/// What is listening, by listener name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ports {
    /// The HTTPS listener (web app, REST, admin).
    pub https: SocketAddr,
    /// The agent-facing listener (agent WebSocket, enrollment, agents' bulk downloads).
    pub wss: SocketAddr,
}

impl Ports {
    /// Writes `dir/ports.json` atomically (mode 0644) and returns its path.
    pub fn write(&self, dir: &Path) -> io::Result<PathBuf> {
        let path = dir.join(PORTS_FILE);
        let mut text = serde_json::to_vec(self).map_err(io::Error::other)?;
        text.push(b'\n');
        write_file_atomic(&path, &text, 0o644)?;
        Ok(path)
    }
}

/// Removes a `ports.json` left by an earlier run, so nobody mistakes it for this run's.
pub fn remove_stale(dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(dir.join(PORTS_FILE)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn writes_the_bound_address_and_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let ports = Ports {
            https: "127.0.0.1:4321".parse().unwrap(),
            wss: "127.0.0.1:4322".parse().unwrap(),
        };
        let path = ports.write(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"https\":\"127.0.0.1:4321\",\"wss\":\"127.0.0.1:4322\"}\n"
        );
        remove_stale(dir.path()).unwrap();
        assert!(!path.exists());
        remove_stale(dir.path()).unwrap();
    }
}
