//! Layered configuration for the three binaries.
//!
//! Each role (server, agent, relay) has a raw struct that mirrors its TOML file key for key and a
//! validated struct with typed values (`Duration`, `SocketAddr`, checked URLs). Loading merges,
//! lowest to highest: built-in defaults, `<config dir>/<role>.toml` (optional), `--config FILE`
//! (must exist) and `TETHER_<SECTION>__<KEY>` environment variables. Every layer is checked on its
//! own first, so an unknown key or a type error names the file (or the environment) it came from;
//! validation then reports every problem of the merged result at once.
//!
//! # Layout
//! - [`server`], [`agent`], [`relay`]: one raw and one validated struct per role.
//! - [`secret`]: [`Secret`], a value that never prints.
//! - `checks`: the problem collector the role validators share.

mod agent;
mod checks;
mod relay;
mod secret;
mod server;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use agent::{AgentConfig, AgentSection, RawAgentConfig, RawAgentSection};
pub use relay::{
    RawRelayConfig, RawRelayListen, RawRelaySection, RelayConfig, RelayListen, RelaySection,
};
pub use secret::Secret;
pub use server::{
    masked_url, RawServerConfig, RawServerListen, RawServerSection, RawStorage, Retention,
    ServerConfig, ServerListen, ServerSection, Storage, MAX_RUNNING_JOBS_PER_AGENT,
};

/// Directory searched for `<role>.toml` when neither `--config-dir` nor `TETHER_CONFIG_DIR` is set.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/tether";

/// Prefix of the environment variables that override config keys (`TETHER_SERVER__DATA_DIR`).
pub const ENV_PREFIX: &str = "TETHER_";

/// Separator between section and key in an override variable's name.
pub const ENV_SEPARATOR: &str = "__";

/// Where to look for configuration.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Directory holding `<role>.toml`; `None` means [`DEFAULT_CONFIG_DIR`]. A missing file there is fine.
    pub config_dir: Option<PathBuf>,
    /// An explicit file layered above the directory's; it must exist.
    pub file: Option<PathBuf>,
    /// Whether `TETHER_<SECTION>__<KEY>` environment variables are applied.
    pub env: bool,
}

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An explicitly named config file does not exist.
    #[error("config file {}: not found", path.display())]
    Missing {
        /// The file that was asked for.
        path: PathBuf,
    },
    /// A config file could not be read, parsed or deserialized (syntax, unknown key, wrong type).
    #[error("config file {}: {message}", path.display())]
    File {
        /// The offending file.
        path: PathBuf,
        /// What is wrong, naming the key where known.
        message: String,
    },
    /// The `TETHER_*__*` environment overrides could not be deserialized.
    #[error("environment ({ENV_PREFIX}<SECTION>{ENV_SEPARATOR}<KEY> variables): {message}")]
    Environment {
        /// What is wrong, naming the key.
        message: String,
    },
    /// The merged configuration is well-formed but some values are unacceptable.
    #[error("{}", InvalidList(problems))]
    Invalid {
        /// One entry per problem, each starting with the key it concerns.
        problems: Vec<String>,
    },
}

/// Renders [`ConfigError::Invalid`]: a header, then one problem per line.
struct InvalidList<'a>(&'a [String]);

impl fmt::Display for InvalidList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.0.len();
        let noun = if count == 1 { "problem" } else { "problems" };
        write!(f, "invalid configuration ({count} {noun}):")?;
        for problem in self.0 {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

/// What the generic loader needs from a role's raw config struct.
trait RawConfig: DeserializeOwned + Serialize + Default {
    /// The role name: also the file stem (`server` -> `server.toml`) and the first env section.
    const ROLE: &'static str;
    /// Keys whose environment value is a comma-separated list.
    const LIST_KEYS: &'static [&'static str];
    /// The typed, validated form.
    type Valid;
    /// Checks every value and cross-field rule, reporting all problems at once.
    fn validate(self) -> Result<Self::Valid, ConfigError>;
}

/// Loads and validates the server's configuration.
/// `path` made absolute against the current directory (without touching the filesystem).
/// Every path from the command line or the config is made absolute once, at start: steps,
/// the worker and the journal may run or be opened from another directory.
pub fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The data directory: the command line's `given`, else the config's `configured`, absolute.
pub fn data_dir(
    given: Option<&std::path::Path>,
    configured: &std::path::Path,
) -> std::path::PathBuf {
    absolute(given.unwrap_or(configured))
}

pub fn load_server(opts: &LoadOptions) -> Result<ServerConfig, ConfigError> {
    load::<RawServerConfig>(opts, process_env(opts))
}

/// Loads and validates the agent's configuration.
pub fn load_agent(opts: &LoadOptions) -> Result<AgentConfig, ConfigError> {
    load::<RawAgentConfig>(opts, process_env(opts))
}

/// Loads and validates the relay's configuration.
pub fn load_relay(opts: &LoadOptions) -> Result<RelayConfig, ConfigError> {
    load::<RawRelayConfig>(opts, process_env(opts))
}

/// The override variables of this process, if `opts.env` asks for them.
fn process_env(opts: &LoadOptions) -> Option<HashMap<String, String>> {
    opts.env.then(|| std::env::vars().collect())
}

/// Keeps only `TETHER_<SECTION>__<KEY>` variables, so that `TETHER_CONFIG_DIR` and other plain
/// `TETHER_` variables the command lines read are never mistaken for config keys.
fn override_vars(vars: HashMap<String, String>) -> HashMap<String, String> {
    vars.into_iter()
        .filter(|(name, _)| {
            name.strip_prefix(ENV_PREFIX)
                .is_some_and(|rest| rest.contains(ENV_SEPARATOR))
        })
        .collect()
}

fn load<R: RawConfig>(
    opts: &LoadOptions,
    env: Option<HashMap<String, String>>,
) -> Result<R::Valid, ConfigError> {
    let mut builder = Config::builder();

    let dir = opts
        .config_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_DIR));
    let dir_file = dir.join(format!("{}.toml", R::ROLE));
    if let Some(text) = read_optional(&dir_file)? {
        check_layer::<R>(&dir_file, &text)?;
        builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
    }

    if let Some(path) = &opts.file {
        let text =
            read_optional(path)?.ok_or_else(|| ConfigError::Missing { path: path.clone() })?;
        check_layer::<R>(path, &text)?;
        builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
    }

    if let Some(vars) = env {
        let vars = override_vars(vars);
        if !vars.is_empty() {
            let source = env_source::<R>(vars);
            Config::builder()
                .add_source(source.clone())
                .build()
                .and_then(|c| c.try_deserialize::<R>())
                .map_err(|e| ConfigError::Environment {
                    message: e.to_string(),
                })?;
            builder = builder.add_source(source);
        }
    }

    // Every layer deserialized on its own above, so a failure here is a merge problem.
    let raw: R = builder
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| ConfigError::Invalid {
            problems: vec![e.to_string()],
        })?;
    raw.validate()
}

/// Reads a file; `Ok(None)` if it does not exist, an error naming it if it cannot be read.
fn read_optional(path: &Path) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConfigError::File {
            path: path.to_path_buf(),
            message: format!("cannot read: {e}"),
        }),
    }
}

/// Deserializes one file on its own so that syntax errors, unknown keys and type errors name it.
fn check_layer<R: RawConfig>(path: &Path, text: &str) -> Result<(), ConfigError> {
    Config::builder()
        .add_source(File::from_str(text, FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<R>())
        .map(drop)
        .map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

fn env_source<R: RawConfig>(vars: HashMap<String, String>) -> Environment {
    let mut env = Environment::with_prefix(ENV_PREFIX.trim_end_matches('_'))
        .prefix_separator("_")
        .separator(ENV_SEPARATOR)
        .try_parsing(true);
    // Without list keys, a list separator would turn every value into a list.
    if !R::LIST_KEYS.is_empty() {
        env = env.list_separator(",");
        for key in R::LIST_KEYS {
            env = env.with_list_parse_key(key);
        }
    }
    env.source(Some(vars.into_iter().collect()))
}

/// The `[log]` section every role shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` env-filter directive: `info`, or `warn,tether_server=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
        }
    }
}

impl LogConfig {
    /// Installs the process's `tracing` subscriber: to stderr, filtered by `level`. A second
    /// call (a subscriber is already installed) is a no-op.
    pub fn init_tracing(&self) {
        self.init_tracing_to(std::io::stderr);
    }

    /// [`LogConfig::init_tracing`] with log lines written by `writer` (which should write to
    /// stderr too: `tether-agent worker` also keeps its recent lines for remote reading).
    pub fn init_tracing_to<W>(&self, writer: W)
    where
        W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
    {
        let filter = tracing_subscriber::EnvFilter::builder().parse_lossy(&self.level);
        // Err only means a subscriber is already installed, which is what we want anyway.
        use std::io::IsTerminal;
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init();
    }
}

#[cfg(test)]
mod tests;

/// Serializes a validated `Duration` back under its `*_ms` key, so `--check-config` output is a
/// valid config file.
fn serialize_millis<S: serde::Serializer>(
    d: &std::time::Duration,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn serialize_secs<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

/// What a binary does with its configuration before anything else.
pub enum Startup<T> {
    /// Valid: go on with it.
    Run(T),
    /// Done already (`--check-config` answered, or the configuration is invalid): exit so.
    Exit(std::process::ExitCode),
}

/// Installs the rustls crypto provider, loads and validates the configuration (printing every
/// problem and exiting 2 when invalid) and answers `--check-config` (the effective
/// configuration as TOML, secrets masked, exit 0). `binary` names the program in messages.
pub fn startup<T: serde::Serialize>(
    binary: &str,
    load: impl FnOnce(&LoadOptions) -> Result<T, ConfigError>,
    opts: &LoadOptions,
    check_config: bool,
) -> Startup<T> {
    use std::process::ExitCode;
    // Err means a provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = match load(opts) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("{binary}: {e}");
            return Startup::Exit(ExitCode::from(2));
        }
    };
    if !check_config {
        return Startup::Run(cfg);
    }
    Startup::Exit(match toml::to_string(&cfg) {
        Ok(text) => {
            println!("config ok\n{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{binary}: cannot print the effective config: {e}");
            ExitCode::from(1)
        }
    })
}
