//! `tether-agent install`: enrolls this machine with a server (directly or through a relay) and
//! leaves in the data directory everything the worker needs: `agent.key` (the Ed25519 identity,
//! 0600), `ca.pem` (the only CA trusted) and `agent.json` (id, name, tags, upstreams, the
//! pinned server signing key; see [`crate::state`]).
//!
//! Crash safety: the key is generated and saved *before* the enrollment request and reused by a
//! retried install as long as `agent.json` does not exist, and the server answers an identical
//! retry with the same agent id; `agent.json` is written last, so its presence means "done".
//! An install the server refused (or whose answer cannot be used) removes what it created;
//! one that reached no upstream for sure keeps the key, in case an answer was lost.
//!
//! The request goes to `https://host:port/agent/v1/enroll` of each `--upstream wss://host:port`
//! in turn: an upstream that cannot be reached (connection, TLS, timeout, 5xx) is skipped, a
//! 4xx answer stops with the server's reason.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::Args;
use tether_shared::enroll::client::{
    keep_key_after, load_or_create_key, post_enrollment, read_token, Created, EnrollError, Plan,
};
use tether_shared::enroll::{name_problem, tags_problem, EnrollRequest, Role, Upstream};
use tether_shared::identity::{write_file_atomic, IdentityError};

use crate::state::{AgentState, StateError, CA_FILE, KEY_FILE};

/// `tether-agent install` arguments.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Agent-facing address of a server or relay, `wss://host:port`; repeatable, in order of
    /// preference.
    #[arg(long = "upstream", value_name = "URL", required = true)]
    pub upstreams: Vec<String>,
    /// PEM file of the CA that signed the upstreams' certificates; the only one trusted.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// Enrollment token from `POST /api/v1/enrollment-tokens` (visible in `ps`: prefer
    /// --token-file).
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// File holding the enrollment token, or - for standard input.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// This machine's name: 1 to 64 characters of A-Z a-z 0-9 . _ -
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// A tag deployments can target (same characters as the name); repeatable.
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Data directory [default: agent.data_dir from config].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Enroll again over an existing installation (the key is kept).
    #[arg(long)]
    pub force: bool,
}

/// Why the install failed; [`InstallError::exit_code`] maps it to 1 or 2.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Bad arguments: nothing was changed.
    #[error("{0}")]
    Usage(String),
    /// `agent.json` exists and `--force` was not given.
    #[error("{} exists: this machine is already installed (as {name}, id {agent_id}); nothing was changed. Use --force to enroll again", path.display())]
    AlreadyInstalled {
        /// The state file.
        path: PathBuf,
        /// The installed agent's name.
        name: String,
        /// The installed agent's id.
        agent_id: String,
    },
    /// The existing state file is unreadable (also refused without `--force`).
    #[error("{0}; nothing was changed. Use --force to enroll again")]
    BadState(StateError),
    /// The data directory or a file in it could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// The underlying failure.
        source: io::Error,
    },
    /// The agent key could not be saved or loaded.
    #[error("agent key: {0}")]
    Key(#[from] IdentityError),
    /// No upstream enrolled this agent (refused, or none reachable).
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    /// The state file could not be written.
    #[error(transparent)]
    State(#[from] StateError),
}

impl InstallError {
    /// 2 for bad usage, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            InstallError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// What a successful install did.
#[derive(Debug, Clone)]
pub struct Installed {
    /// The agent id the server assigned.
    pub agent_id: String,
    /// The upstream that enrolled it.
    pub upstream: String,
    /// The data directory written.
    pub data_dir: PathBuf,
}

/// Runs the install into `data_dir`. A refused install leaves nothing behind (the directory
/// if it made it, else the files it made); one that reached no upstream for sure keeps the key
/// for the retry (see [`keep_key_after`]).
pub fn install(args: &InstallArgs, data_dir: &Path) -> Result<Installed, InstallError> {
    let (plan, token) = check(args)?;
    let mut created = Created::data_dir(data_dir).map_err(|source| InstallError::Io {
        path: data_dir.to_path_buf(),
        source,
    })?;
    created.file(&data_dir.join(KEY_FILE));
    created.file(&data_dir.join(CA_FILE));
    let result = enroll_into(args, data_dir, &plan, token);
    if let Err(e) = &result {
        if !matches!(e, InstallError::Enroll(e) if keep_key_after(e)) {
            created.remove();
        }
    }
    result
}

/// The install once the data directory exists.
fn enroll_into(
    args: &InstallArgs,
    data_dir: &Path,
    plan: &Plan,
    token: String,
) -> Result<Installed, InstallError> {
    let state_path = AgentState::path(data_dir);
    if !args.force {
        match AgentState::load(data_dir) {
            Ok(state) => {
                return Err(InstallError::AlreadyInstalled {
                    path: state_path,
                    name: state.name,
                    agent_id: state.agent_id,
                })
            }
            Err(StateError::Missing { .. }) => {}
            Err(e) => return Err(InstallError::BadState(e)),
        }
    } else {
        match fs::remove_file(&state_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(InstallError::Io {
                    path: state_path,
                    source: e,
                })
            }
            _ => {}
        }
    }
    let identity = load_or_create_key(&data_dir.join(KEY_FILE))?;

    let mut request = EnrollRequest {
        token,
        name: args.name.clone(),
        public_key: identity.public_key_b64(),
        tags: args.tags.clone(),
        role: Role::Agent,
        tls_public_key: None,
        hostnames: Vec::new(),
        proof: String::new(),
        tls_proof: None,
    };
    // An agent has no TLS key, so signing cannot fail; the error type is shared with relays.
    request
        .sign(&identity, None)
        .map_err(|e| InstallError::Usage(e.to_string()))?;
    let (upstream, answer) = post_enrollment(plan, &request)?;

    tether_shared::trust::forget(data_dir).map_err(|source| InstallError::Io {
        path: data_dir.join(tether_shared::trust::TRUST_FILE),
        source,
    })?;
    let ca_path = data_dir.join(CA_FILE);
    write_file_atomic(&ca_path, plan.ca_pem.as_bytes(), 0o644).map_err(|source| {
        InstallError::Io {
            path: ca_path,
            source,
        }
    })?;
    let state = AgentState {
        agent_id: answer.agent_id.clone(),
        name: args.name.clone(),
        tags: args.tags.clone(),
        upstreams: plan.upstreams.iter().map(Upstream::base_url).collect(),
        server_signing_key: answer.server_signing_key,
    };
    state.save(data_dir)?;
    tracing::info!(agent_id = %state.agent_id, upstream = %upstream, "agent-installed");
    Ok(Installed {
        agent_id: answer.agent_id,
        upstream,
        data_dir: data_dir.to_path_buf(),
    })
}

/// Validates the arguments, reads the token and the CA: usage errors, with nothing written yet.
fn check(args: &InstallArgs) -> Result<(Plan, String), InstallError> {
    if let Some(problem) = name_problem("--name", &args.name).or_else(|| tags_problem(&args.tags)) {
        return Err(InstallError::Usage(problem));
    }
    let token = read_token(args.token.as_deref(), args.token_file.as_deref())
        .map_err(InstallError::Usage)?;
    let plan = Plan::check(&args.upstreams, &args.ca, &token).map_err(InstallError::Usage)?;
    Ok((plan, token))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    fn args(dir: &Path) -> InstallArgs {
        let ca = tether_shared::tls::Ca::generate("test").unwrap();
        let ca_path = dir.join("ca-in.pem");
        fs::write(&ca_path, ca.cert_pem()).unwrap();
        InstallArgs {
            upstreams: vec!["wss://127.0.0.1:1".into()],
            ca: ca_path,
            token: Some("t".into()),
            token_file: None,
            name: "web-1".into(),
            tags: vec![],
            data: None,
            force: false,
        }
    }

    #[test]
    fn usage_errors_write_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let mut cases = Vec::new();
        let mut a = args(tmp.path());
        a.upstreams = vec!["https://127.0.0.1:1".into()];
        cases.push(a);
        let mut a = args(tmp.path());
        a.name = "bad name".into();
        cases.push(a);
        let mut a = args(tmp.path());
        a.tags = vec!["x/y".into()];
        cases.push(a);
        let mut a = args(tmp.path());
        a.ca = tmp.path().join("absent.pem");
        cases.push(a);
        let mut a = args(tmp.path());
        a.token = None;
        cases.push(a);
        let mut a = args(tmp.path());
        a.token_file = Some(tmp.path().join("absent-token"));
        a.token = None;
        cases.push(a);
        let mut a = args(tmp.path());
        fs::write(tmp.path().join("junk.pem"), "junk").unwrap();
        a.ca = tmp.path().join("junk.pem");
        cases.push(a);
        for a in cases {
            let err = install(&a, &data).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{err}");
            assert!(!data.exists());
        }
    }

    #[test]
    fn an_upstream_that_nothing_reached_leaves_nothing_behind() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let a = args(tmp.path());
        let err = install(&a, &data).unwrap_err();
        assert!(
            matches!(
                err,
                InstallError::Enroll(EnrollError::Unreachable {
                    maybe_delivered: false,
                    ..
                })
            ),
            "{err}"
        );
        assert_eq!(err.exit_code(), 1);
        // Nothing was sent (connection refused), so no identity can exist anywhere: the
        // directory this install made is gone.
        assert!(!data.exists());
        // In a directory that existed, only what the install made goes.
        fs::create_dir_all(&data).unwrap();
        fs::write(data.join("keep.txt"), "x").unwrap();
        install(&a, &data).unwrap_err();
        assert!(data.join("keep.txt").exists());
        assert!(!data.join(KEY_FILE).exists());
    }
}
