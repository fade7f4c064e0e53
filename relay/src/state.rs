//! What `tether-relay install` leaves in the data directory for `run`: the names of its files
//! and [`RelayState`] (`DIR/relay.json`). `relay.json` is written last: its presence means
//! "installed".

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tether_shared::identity::write_file_atomic;

/// The enrolled identity and where to connect (mode 0644, no secret).
pub const STATE_FILE: &str = "relay.json";
/// The relay's Ed25519 key, which proves its identity upstream (mode 0600).
pub const KEY_FILE: &str = "relay.key";
/// The only CA trusted upstream; it also signed this relay's certificate.
pub const CA_FILE: &str = "ca.pem";
/// This relay's TLS certificate for its downstream listener, signed by the server's CA.
pub const TLS_CERT_FILE: &str = "tls.pem";
/// Its TLS private key (mode 0600); never leaves this machine.
pub const TLS_KEY_FILE: &str = "tls.key";
/// The artifact and plugin cache.
pub const CACHE_DIR: &str = "cache";

/// Why `relay.json` could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: not found; run `tether-relay install` first", path.display())]
    Missing { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: not a valid relay state file ({reason}); reinstall with `tether-relay install --force`", path.display())]
    Garbled { path: PathBuf, reason: String },
}

/// `DIR/relay.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayState {
    /// The id the server assigned (`r-...`).
    pub relay_id: String,
    /// The name it enrolled under.
    pub name: String,
    /// The names its certificate holds.
    pub hostnames: Vec<String>,
    /// Upstream base URLs (`wss://host:port`): servers or parent relays, in order of preference.
    pub upstreams: Vec<String>,
    /// Standard base64 of the server's command-signing key.
    pub server_signing_key: String,
}

impl RelayState {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    pub fn load(dir: &Path) -> Result<RelayState, StateError> {
        let path = Self::path(dir);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::Missing { path })
            }
            Err(source) => return Err(StateError::Io { path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|e| StateError::Garbled {
            path,
            reason: e.to_string(),
        })
    }

    /// Writes `dir/relay.json` atomically, mode 0644.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = Self::path(dir);
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| StateError::Io {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        text.push(b'\n');
        write_file_atomic(&path, &text, 0o644).map_err(|source| StateError::Io { path, source })
    }
}
