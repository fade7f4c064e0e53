//! A small JSON state file written last and atomically by an install (`agent.json`,
//! `relay.json`): its presence means "installed". Reading tells apart a missing file (not
//! installed yet), an unreadable one and one that is not the JSON this version writes, each with
//! the binary's own advice.

use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::identity::write_file_atomic;

/// What to tell the operator when the file is missing or garbled.
#[derive(Debug, Clone, Copy)]
pub struct Advice {
    /// E.g. "run `tether-agent install` first".
    pub missing: &'static str,
    /// E.g. "reinstall with `tether-agent install --force`".
    pub garbled: &'static str,
}

/// Why a state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file does not exist: not installed.
    #[error("{}: not found; {advice}", path.display())]
    Missing { path: PathBuf, advice: &'static str },
    /// Reading or writing failed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The file is not the JSON this version writes.
    #[error("{}: not a valid state file ({reason}); {advice}", path.display())]
    Garbled {
        path: PathBuf,
        reason: String,
        advice: &'static str,
    },
}

/// Reads and decodes `path`.
pub fn load<T: DeserializeOwned>(path: &Path, advice: Advice) -> Result<T, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StateError::Missing {
                path: path.to_path_buf(),
                advice: advice.missing,
            })
        }
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| StateError::Garbled {
        path: path.to_path_buf(),
        reason: e.to_string(),
        advice: advice.garbled,
    })
}

/// Writes `value` to `path` as pretty JSON, atomically, mode 0644 (state files hold no secret).
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let io_err = |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| io_err(io::Error::other(e)))?;
    text.push(b'\n');
    write_file_atomic(path, &text, 0o644).map_err(io_err)
}
