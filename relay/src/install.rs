//! `tether-relay install`: enrolls this relay with the server (directly or through a parent
//! relay) and leaves in the data directory what `run` needs: `relay.key` (its Ed25519 identity),
//! `tls.key` and `tls.pem` (its downstream certificate, signed by the server's relay CA for the
//! `--hostname`s), `ca.pem` (the `--ca` bundle: the server's CA and the relay CA), and
//! `relay.json`, written last. The request is signed by both keys (proof of possession).
//!
//! Both keys are made and saved before the request, and a retried install reuses them; the
//! server answers an identical retry with the same relay id.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use clap::Args;
use tether_shared::enroll::client::{
    keep_key_after, load_or_create_key, post_enrollment, read_token, Created, EnrollError, Plan,
};
use tether_shared::enroll::{name_problem, EnrollRequest, Role, Upstream};
use tether_shared::identity::{write_file_atomic, IdentityError};
use tether_shared::tls::{self, TlsError, TlsKey};

use crate::state::{RelayState, StateError, CA_FILE, KEY_FILE, TLS_CERT_FILE, TLS_KEY_FILE};

/// `tether-relay install` arguments.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Agent-facing address of the server or a parent relay, `wss://host:port`; repeatable, in
    /// order of preference.
    #[arg(long = "upstream", value_name = "URL", required = true)]
    pub upstreams: Vec<String>,
    /// The server's `agent-ca.pem` (its CA and the relay CA): the only CAs trusted upstream.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// Enrollment token with role "relay" (visible in `ps`: prefer --token-file).
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// File holding the enrollment token, or - for standard input.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// This relay's name: 1 to 64 characters of A-Z a-z 0-9 . _ -
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// A DNS name or IP address agents dial this relay at; repeatable [default: the name].
    #[arg(long = "hostname", value_name = "NAME")]
    pub hostnames: Vec<String>,
    /// Data directory [default: relay.data_dir from config].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Enroll again over an existing installation (the keys are kept).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0}")]
    Usage(String),
    #[error("{} exists: this relay is already installed (as {name}, id {relay_id}); nothing was changed. Use --force to enroll again", path.display())]
    AlreadyInstalled {
        path: PathBuf,
        name: String,
        relay_id: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("relay key: {0}")]
    Key(#[from] IdentityError),
    #[error("TLS key or certificate: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    #[error("the server enrolled this relay but sent no TLS certificate (is the server older than the relay?)")]
    NoCertificate,
    #[error("the relay's new certificate does not verify with {} ({reason}): give --ca the server's agent-ca.pem (its CA and the relay CA), then run the same install again; the server certifies the same keys and names again without a new token", ca.display())]
    Untrusted { ca: PathBuf, reason: String },
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

/// Runs the install into `data_dir`; returns the relay id.
pub fn install(args: &InstallArgs, data_dir: &Path) -> Result<String, InstallError> {
    if let Some(problem) = name_problem("--name", &args.name) {
        return Err(InstallError::Usage(problem));
    }
    let hostnames = if args.hostnames.is_empty() {
        vec![args.name.clone()]
    } else {
        args.hostnames.clone()
    };
    if let Some(bad) = hostnames.iter().find(|h| !tls::valid_hostname(h)) {
        return Err(InstallError::Usage(format!(
            "--hostname {bad:?}: must be a DNS name or an IP address"
        )));
    }
    let token = read_token(args.token.as_deref(), args.token_file.as_deref())
        .map_err(InstallError::Usage)?;
    let plan = Plan::check(&args.upstreams, &args.ca, &token).map_err(InstallError::Usage)?;

    let mut created = Created::data_dir(data_dir).map_err(|source| InstallError::Io {
        path: data_dir.to_path_buf(),
        source,
    })?;
    for file in [KEY_FILE, TLS_KEY_FILE, TLS_CERT_FILE, CA_FILE] {
        created.file(&data_dir.join(file));
    }
    let result = enroll_into(args, data_dir, &plan, token, hostnames);
    // Refused for good: nothing stays. No upstream answered for sure, or the certificate did
    // not verify with --ca: the keys stay, so that the same install run again is a retry.
    let keep = match &result {
        Ok(_) | Err(InstallError::Untrusted { .. }) => true,
        Err(InstallError::Enroll(e)) => keep_key_after(e),
        Err(_) => false,
    };
    if !keep {
        created.remove();
    }
    result
}

/// The install once the data directory exists.
fn enroll_into(
    args: &InstallArgs,
    data_dir: &Path,
    plan: &Plan,
    token: String,
    hostnames: Vec<String>,
) -> Result<String, InstallError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Io { path, source }
    };
    let state_path = RelayState::path(data_dir);
    if !args.force {
        match RelayState::load(data_dir) {
            Ok(state) => {
                return Err(InstallError::AlreadyInstalled {
                    path: state_path,
                    name: state.name,
                    relay_id: state.relay_id,
                })
            }
            Err(StateError::Missing { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let identity = load_or_create_key(&data_dir.join(KEY_FILE))?;
    let tls_key = load_or_create_tls_key(&data_dir.join(TLS_KEY_FILE))?;
    let mut request = EnrollRequest {
        token,
        name: args.name.clone(),
        public_key: identity.public_key_b64(),
        tags: Vec::new(),
        role: Role::Relay,
        tls_public_key: Some(
            base64::engine::general_purpose::STANDARD.encode(tls_key.public_key_raw()),
        ),
        hostnames: hostnames.clone(),
        proof: String::new(),
        tls_proof: None,
    };
    request.sign(&identity, Some(&tls_key))?;
    let (upstream, answer) = post_enrollment(plan, &request)?;
    let cert = answer.tls_certificate.ok_or(InstallError::NoCertificate)?;
    // The certificate must be for our key and chain to a trusted CA before anything relies on
    // it; with only the server's ca.pem the relay CA is missing.
    let server = tls::server_config(&cert, &tls_key.key_pem())?;
    tls::handshake_in_memory(plan.tls.clone(), Arc::new(server), &hostnames[0]).map_err(|e| {
        InstallError::Untrusted {
            ca: args.ca.clone(),
            reason: e.to_string(),
        }
    })?;
    let cert_path = data_dir.join(TLS_CERT_FILE);
    write_file_atomic(&cert_path, cert.as_bytes(), 0o644).map_err(io(&cert_path))?;
    let trust_path = data_dir.join(tether_shared::trust::TRUST_FILE);
    tether_shared::trust::forget(data_dir).map_err(io(&trust_path))?;
    let ca_path = data_dir.join(CA_FILE);
    write_file_atomic(&ca_path, plan.ca_pem.as_bytes(), 0o644).map_err(io(&ca_path))?;
    let state = RelayState {
        relay_id: answer.agent_id,
        name: args.name.clone(),
        hostnames,
        upstreams: plan.upstreams.iter().map(Upstream::base_url).collect(),
        server_signing_key: answer.server_signing_key,
    };
    state.save(data_dir)?;
    tracing::info!(relay_id = %state.relay_id, upstream = %upstream, "relay-installed");
    Ok(state.relay_id)
}

/// The TLS key from a previous attempt, or a new one saved before it is used.
fn load_or_create_tls_key(path: &Path) -> Result<TlsKey, InstallError> {
    match std::fs::read_to_string(path) {
        Ok(pem) => Ok(TlsKey::from_pem(&pem)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = TlsKey::generate()?;
            write_file_atomic(path, key.key_pem().as_bytes(), 0o600).map_err(|source| {
                InstallError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            Ok(key)
        }
        Err(source) => Err(InstallError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}
