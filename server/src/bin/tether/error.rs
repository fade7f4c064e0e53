//! [`CliError`]: every way a command fails, and the exit code each maps to (1 runtime
//! failure, 2 usage).

use std::io;

use crate::client::ClientError;
use crate::config::ConfigError;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments that clap could not catch (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The login file or the connection settings (exit 2, or 1 when the file cannot be
    /// written).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The server refused, or could not be reached (exit 1).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A request about `what` failed (exit 1).
    #[error("{what}: {source}")]
    About {
        /// What was asked for: "deployment d-1", "agent web-1".
        what: String,
        source: ClientError,
    },
    /// Anything else that went wrong at run time; the message says what (exit 1).
    #[error("{0}")]
    Failed(String),
    /// Writing the output failed (a closed pipe ends quietly; exit 1).
    #[error("writing the output: {0}")]
    Stdout(#[from] io::Error),
}

impl CliError {
    /// 2 for usage and settings problems, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Config(e) if e.is_usage() => 2,
            _ => 1,
        }
    }
}

/// Adds what a request was about to its error.
pub trait About<T> {
    /// `what`: the object asked for, as the message should name it.
    fn about(self, what: impl FnOnce() -> String) -> Result<T, CliError>;
}

impl<T> About<T> for Result<T, ClientError> {
    fn about(self, what: impl FnOnce() -> String) -> Result<T, CliError> {
        self.map_err(|source| CliError::About {
            what: what(),
            source,
        })
    }
}
