//! The login state and the effective connection.
//!
//! `tether login` stores `{"server","ca_pem","token"}` in `$XDG_CONFIG_HOME/tether/cli.json`
//! (default `~/.config/tether/cli.json`), written atomically with mode 0600 in a 0700
//! directory. Every other command takes each setting from its flag (`--server`, `--ca`),
//! else the environment (`TETHER_SERVER`, `TETHER_CA`, `TETHER_TOKEN`), else that file.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tether_shared::config::Secret;

use tether_shared::server_url::ServerUrl;

/// The login file's name in `$XDG_CONFIG_HOME/tether/`.
pub const FILE_NAME: &str = "cli.json";

/// What `tether login` stores.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredLogin {
    /// The server's base URL as given at login.
    pub server: String,
    /// The CA certificate(s), PEM: kept in the file so that the CA file given at login may
    /// move or go.
    pub ca_pem: String,
    /// The admin token.
    pub token: String,
}

/// Settings given on the command line or in the environment; each wins over the file.
#[derive(Debug, Default)]
pub struct Overrides {
    /// `--server` or `TETHER_SERVER`.
    pub server: Option<String>,
    /// `--ca` or `TETHER_CA`: a file path.
    pub ca: Option<PathBuf>,
    /// `TETHER_TOKEN`.
    pub token: Option<String>,
}

/// Everything needed to talk to the server.
#[derive(Debug)]
pub struct Connection {
    pub server: ServerUrl,
    pub ca_pem: String,
    pub token: Secret<String>,
}

/// Why the connection settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Neither `XDG_CONFIG_HOME` nor `HOME` is set.
    #[error("cannot tell where to keep the login: set HOME or XDG_CONFIG_HOME")]
    NoConfigDir,
    /// Something needed is in neither the flags, the environment nor the login file.
    #[error("not logged in (no {missing}): run `tether login` first, or set TETHER_SERVER, TETHER_CA and TETHER_TOKEN")]
    NotLoggedIn {
        /// What is missing, in words.
        missing: String,
    },
    /// The login file exists but cannot be used.
    #[error("{}: {reason}; run `tether login` again", path.display())]
    BadFile { path: PathBuf, reason: String },
    /// The server URL is malformed.
    #[error("server URL {0}")]
    BadServer(String),
    /// The CA file cannot be read.
    #[error("--ca {}: {source}", path.display())]
    BadCa { path: PathBuf, source: io::Error },
    /// The token is empty or not printable ASCII (it goes into a header).
    #[error("the token must be printable ASCII without spaces")]
    BadToken,
    /// The login file or its directory could not be written or removed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

impl ConfigError {
    /// Whether this is the user's to fix in arguments or settings (exit 2) rather than a
    /// failure of the machine (exit 1).
    pub fn is_usage(&self) -> bool {
        !matches!(self, ConfigError::Io { .. })
    }
}

/// `$XDG_CONFIG_HOME/tether/cli.json`, or `$HOME/.config/tether/cli.json`.
pub fn login_path() -> Result<PathBuf, ConfigError> {
    let absolute = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    let base = absolute("XDG_CONFIG_HOME")
        .or_else(|| absolute("HOME").map(|home| home.join(".config")))
        .ok_or(ConfigError::NoConfigDir)?;
    Ok(base.join("tether").join(FILE_NAME))
}

/// The stored login, if there is one.
pub fn load(path: &Path) -> Result<Option<StoredLogin>, ConfigError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ConfigError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "tether: warning: {} is readable by others; it holds the admin token (chmod 600 it)",
                path.display()
            );
        }
    }
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ConfigError::BadFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// Writes `login` to `path` atomically, 0600, creating its directory 0700.
pub fn save(path: &Path, login: &StoredLogin) -> Result<(), ConfigError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ConfigError::Io { path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    let mut text = serde_json::to_vec_pretty(login).map_err(|e| ConfigError::Io {
        path: path.to_owned(),
        source: io::Error::other(e),
    })?;
    text.push(b'\n');
    tether_shared::identity::write_file_atomic(path, &text, 0o600).map_err(io_err(path))
}

/// Deletes the login file; whether there was one.
pub fn remove(path: &Path) -> Result<bool, ConfigError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(ConfigError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads the CA file given with `--ca` or `TETHER_CA`.
pub fn read_ca(path: &Path) -> Result<String, ConfigError> {
    fs::read_to_string(path).map_err(|source| ConfigError::BadCa {
        path: path.to_owned(),
        source,
    })
}

/// Checks that `token` can be sent as a bearer token.
pub fn check_token(token: &str) -> Result<(), ConfigError> {
    let printable = !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic());
    printable.then_some(()).ok_or(ConfigError::BadToken)
}

/// The effective connection: each setting from `overrides`, else the login file.
pub fn resolve(overrides: &Overrides) -> Result<Connection, ConfigError> {
    let complete =
        overrides.server.is_some() && overrides.ca.is_some() && overrides.token.is_some();
    let stored = if complete {
        None
    } else {
        load(&login_path()?)?
    };
    resolve_with(overrides, stored)
}

/// [`resolve`] with the login file's content given.
pub fn resolve_with(
    overrides: &Overrides,
    stored: Option<StoredLogin>,
) -> Result<Connection, ConfigError> {
    let server = overrides
        .server
        .clone()
        .or_else(|| stored.as_ref().map(|s| s.server.clone()));
    let ca_pem = match &overrides.ca {
        Some(path) => Some(read_ca(path)?),
        None => stored.as_ref().map(|s| s.ca_pem.clone()),
    };
    let token = overrides
        .token
        .clone()
        .or_else(|| stored.as_ref().map(|s| s.token.clone()));
    let missing: Vec<&str> = [
        (server.is_none(), "server"),
        (ca_pem.is_none(), "CA"),
        (token.is_none(), "token"),
    ]
    .into_iter()
    .filter_map(|(absent, what)| absent.then_some(what))
    .collect();
    match (server, ca_pem, token) {
        (Some(server), Some(ca_pem), Some(token)) => {
            check_token(&token)?;
            Ok(Connection {
                server: ServerUrl::parse(&server).map_err(ConfigError::BadServer)?,
                ca_pem,
                token: Secret::new(token),
            })
        }
        _ => Err(ConfigError::NotLoggedIn {
            missing: missing.join(", "),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    fn stored() -> StoredLogin {
        StoredLogin {
            server: "https://stored:8443".into(),
            ca_pem: "stored CA".into(),
            token: "stored-token".into(),
        }
    }

    #[test]
    fn overrides_win_over_the_file_one_by_one() {
        let c = resolve_with(&Overrides::default(), Some(stored())).unwrap();
        assert_eq!(c.server.host, "stored");
        assert_eq!(c.ca_pem, "stored CA");
        assert_eq!(c.token.expose(), "stored-token");

        let overrides = Overrides {
            server: Some("https://other:1".into()),
            ca: None,
            token: Some("env-token".into()),
        };
        let c = resolve_with(&overrides, Some(stored())).unwrap();
        assert_eq!((c.server.host.as_str(), c.server.port), ("other", 1));
        assert_eq!(c.ca_pem, "stored CA");
        assert_eq!(c.token.expose(), "env-token");
        assert_eq!(format!("{:?}", c.token), "***");
    }

    #[test]
    fn says_what_is_missing_and_what_is_wrong() {
        let err = resolve_with(&Overrides::default(), None).unwrap_err();
        assert!(err.is_usage());
        assert!(err.to_string().contains("no server, CA, token"), "{err}");
        assert!(err.to_string().contains("tether login"), "{err}");

        let overrides = Overrides {
            server: Some("http://x".into()),
            ..Overrides::default()
        };
        let err = resolve_with(&overrides, Some(stored())).unwrap_err();
        assert!(matches!(err, ConfigError::BadServer(_)), "{err}");

        let overrides = Overrides {
            token: Some("two words".into()),
            ..Overrides::default()
        };
        let err = resolve_with(&overrides, Some(stored())).unwrap_err();
        assert!(matches!(err, ConfigError::BadToken), "{err}");

        let overrides = Overrides {
            ca: Some("/nonexistent/ca.pem".into()),
            ..Overrides::default()
        };
        let err = resolve_with(&overrides, Some(stored())).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn saves_privately_loads_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conf").join("tether").join(FILE_NAME);
        assert!(load(&path).unwrap().is_none());
        save(&path, &stored()).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(load(&path).unwrap().unwrap().token, "stored-token");
        assert!(remove(&path).unwrap());
        assert!(!remove(&path).unwrap());

        fs::write(&path, "{not json").unwrap();
        let err = load(&path).unwrap_err();
        assert!(
            err.is_usage() && err.to_string().contains("tether login"),
            "{err}"
        );
    }
}
