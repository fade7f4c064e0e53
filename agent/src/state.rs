//! What `tether-agent install` leaves in the data directory for the worker: the names of its
//! files, and [`AgentState`], the enrolled identity and upstreams kept in `DIR/agent.json`.
//! The presence of `agent.json` means "installed"; it is written last and atomically.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tether_shared::state_file::{self, Advice};

/// The enrolled identity and where to connect, `DIR/agent.json` (mode 0644, no secret).
pub const STATE_FILE: &str = "agent.json";
/// The agent's Ed25519 private key, `DIR/agent.key` (mode 0600).
pub const KEY_FILE: &str = "agent.key";
/// The CAs the agent trusts (and only them), `DIR/ca.pem`, copied from `install --ca` (the
/// server's `agent-ca.pem`: its CA and the relay CA).
pub const CA_FILE: &str = "ca.pem";

pub use tether_shared::state_file::StateError;

const ADVICE: Advice = Advice {
    missing: "run `tether-agent install` first",
    garbled: "reinstall with `tether-agent install --force`",
};

/// `DIR/agent.json`: who this agent is and where it connects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// The id the server assigned at enrollment; the handshake presents it.
    pub agent_id: String,
    /// The name it enrolled under.
    pub name: String,
    /// The tags it enrolled with.
    pub tags: Vec<String>,
    /// Agent-facing base URLs (`wss://host:port`), in order of preference.
    pub upstreams: Vec<String>,
    /// Standard base64 of the server's command-signing key, pinned at enrollment.
    pub server_signing_key: String,
}

impl AgentState {
    /// `dir/agent.json`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Reads `dir/agent.json`.
    pub fn load(dir: &Path) -> Result<AgentState, StateError> {
        state_file::load(&Self::path(dir), ADVICE)
    }

    /// Writes `dir/agent.json` atomically, mode 0644.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        state_file::save(&Self::path(dir), self)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trips_and_reports_missing_and_garbled_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            AgentState::load(dir.path()),
            Err(StateError::Missing { .. })
        ));
        let state = AgentState {
            agent_id: "a-0123456789abcdef".into(),
            name: "web-1".into(),
            tags: vec!["web".into()],
            upstreams: vec!["wss://server:7919".into()],
            server_signing_key: "key".into(),
        };
        state.save(dir.path()).unwrap();
        assert_eq!(AgentState::load(dir.path()).unwrap(), state);
        let mode = std::fs::metadata(AgentState::path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        std::fs::write(AgentState::path(dir.path()), "{").unwrap();
        let err = AgentState::load(dir.path()).unwrap_err();
        assert!(matches!(err, StateError::Garbled { .. }), "{err}");
    }
}
