//! What `tether-relay install` leaves in the data directory for `run`: the names of its files
//! and [`RelayState`] (`DIR/relay.json`). `relay.json` is written last: its presence means
//! "installed".

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tether_shared::state_file::{self, Advice};

/// The enrolled identity and where to connect (mode 0644, no secret).
pub const STATE_FILE: &str = "relay.json";
/// The relay's Ed25519 key, which proves its identity upstream (mode 0600).
pub const KEY_FILE: &str = "relay.key";
/// The CAs trusted upstream (the server's `agent-ca.pem`: its CA and the relay CA, which also
/// signed this relay's certificate).
pub const CA_FILE: &str = "ca.pem";
/// This relay's TLS certificate for its downstream listener, signed by the server's relay CA.
pub const TLS_CERT_FILE: &str = "tls.pem";
/// Its TLS private key (mode 0600); never leaves this machine.
pub const TLS_KEY_FILE: &str = "tls.key";
/// The artifact and plugin cache.
pub const CACHE_DIR: &str = "cache";

pub use tether_shared::state_file::StateError;

const ADVICE: Advice = Advice {
    missing: "run `tether-relay install` first",
    garbled: "reinstall with `tether-relay install --force`",
};

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
        state_file::load(&Self::path(dir), ADVICE)
    }

    /// Writes `dir/relay.json` atomically, mode 0644.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        state_file::save(&Self::path(dir), self)
    }
}
