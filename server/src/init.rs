//! `tether-server init`: creates a data directory holding everything a server needs before its
//! first start: a private CA, a server certificate it signed, a second CA that signs only
//! relays' certificates, the Ed25519 key that signs commands, and the admin token.
//!
//! Two CAs keep the roles apart: operators (the CLI, browsers, `curl`) trust `ca.pem` alone, so
//! no relay certificate can ever pose as the server to them; agents and relays trust
//! `agent-ca.pem`, both CAs, because they dial relays as well as the server. Everything is generated and checked in memory first (the new
//! certificate must pass a TLS handshake against the new CA for every hostname), then written
//! atomically file by file; secrets get mode 0600 and the directory 0700.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use tether_shared::config::Secret;
use tether_shared::identity::{write_file_atomic, write_private_file, Identity, IdentityError};
use tether_shared::tls::{self, Ca, TlsError};

/// The server's CA certificate, public: what operators' clients trust. It signs only the
/// server's certificate.
pub const CA_CERT: &str = "ca.pem";
/// CA private key.
pub const CA_KEY: &str = "ca.key";
/// The server's TLS certificate, signed by the CA.
pub const SERVER_CERT: &str = "server.pem";
/// The server's TLS private key.
pub const SERVER_KEY: &str = "server.key";
/// Ed25519 key signing every command sent to agents.
pub const SIGNING_KEY: &str = "signing.key";
/// Its public half, base64: agents pin it at enrollment.
pub const SIGNING_PUB: &str = "signing.pub";
/// The server CA's certificate of the command-signing key (code signing only): handed out at
/// enrollment, so that an agent enrolling through a relay can check the key it pins. Not in
/// [`FILES`]: `run` creates it in a directory initialized before it existed.
pub const SIGNING_CERT: &str = "signing.pem";
/// Bearer token for the REST API and admin endpoints.
pub const ADMIN_TOKEN: &str = "admin.token";
/// The web application's initial `admin` password: read at `run` while no user exists yet.
/// Not in [`FILES`]: a directory initialized before the web application existed is complete
/// without it (`run` then writes a new one).
pub const ADMIN_PASSWORD: &str = "admin.password";

/// Every file `init` writes; the presence of any of them means "already initialized".
pub const FILES: [&str; 7] = [
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    SIGNING_KEY,
    SIGNING_PUB,
    ADMIN_TOKEN,
];

/// The relay CA's certificate: it signs relays' certificates at enrollment, nothing else.
/// Operators never trust it. Not in [`FILES`]: `run` creates it in a directory initialized
/// before it existed.
pub const RELAY_CA_CERT: &str = "relay-ca.pem";
/// The relay CA's private key.
pub const RELAY_CA_KEY: &str = "relay-ca.key";
/// `ca.pem` followed by `relay-ca.pem`: the `--ca` of `tether-agent install` and
/// `tether-relay install`, which may dial relays as well as the server. Rewritten at each start.
pub const AGENT_CA: &str = "agent-ca.pem";

/// Hostnames the server certificate covers when none are given.
pub const DEFAULT_HOSTNAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// What to initialize.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The data directory to create or fill.
    pub data_dir: PathBuf,
    /// DNS names and IP addresses the server certificate is valid for.
    pub hostnames: Vec<String>,
    /// Replace the files of an already initialized directory.
    pub force: bool,
}

/// Why `init` failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The directory already holds a server's files and `--force` was not given.
    #[error("{} is already initialized (found {found}); nothing was changed. Use --force to replace its CA, keys and admin token", dir.display())]
    AlreadyInitialized {
        /// The data directory.
        dir: PathBuf,
        /// The first existing file found.
        found: &'static str,
    },
    /// Generating or checking the CA or certificate failed.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// Writing the signing key failed.
    #[error("signing key: {0}")]
    Identity(#[from] IdentityError),
    /// Creating the directory or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The directory or file concerned.
        path: PathBuf,
        /// The underlying failure.
        source: io::Error,
    },
}

/// What `init` produced that the caller must show the operator.
#[derive(Debug)]
pub struct Initialized {
    /// The admin token; shown once, stored in `ADMIN_TOKEN`.
    pub admin_token: Secret<String>,
    /// The web application's initial `admin` password; shown once, stored in `ADMIN_PASSWORD`.
    pub admin_password: Secret<String>,
}

/// Creates and fills `opts.data_dir`.
pub fn initialize(opts: &InitOptions) -> Result<Initialized, InitError> {
    let dir = &opts.data_dir;
    if !opts.force {
        if let Some(found) = FILES.into_iter().find(|f| dir.join(f).exists()) {
            return Err(InitError::AlreadyInitialized {
                dir: dir.clone(),
                found,
            });
        }
    }

    let ca = Ca::generate(&format!("Tether CA {}", hex_id()))?;
    let (server_cert, server_key) = ca.issue_server_cert(&opts.hostnames)?;
    check_certificate(&ca, &server_cert, &server_key, &opts.hostnames)?;
    let signing = Identity::generate();
    let admin_token = Secret::new(new_token());
    let admin_password = crate::users::new_initial_password();

    create_private_dir(dir)?;
    let io_err = |name: &str| {
        let path = dir.join(name);
        move |source| InitError::Io { path, source }
    };
    write_private_file(&dir.join(CA_KEY), ca.key_pem().as_bytes()).map_err(io_err(CA_KEY))?;
    write_file_atomic(&dir.join(CA_CERT), ca.cert_pem().as_bytes(), 0o644)
        .map_err(io_err(CA_CERT))?;
    write_relay_ca(
        dir,
        &Ca::generate(&format!("Tether relay CA {}", hex_id()))?,
    )?;
    write_private_file(&dir.join(SERVER_KEY), server_key.as_bytes()).map_err(io_err(SERVER_KEY))?;
    write_file_atomic(&dir.join(SERVER_CERT), server_cert.as_bytes(), 0o644)
        .map_err(io_err(SERVER_CERT))?;
    signing.save(&dir.join(SIGNING_KEY))?;
    let public = format!("{}\n", signing.public_key_b64());
    write_file_atomic(&dir.join(SIGNING_PUB), public.as_bytes(), 0o644)
        .map_err(io_err(SIGNING_PUB))?;
    let signing_cert = ca.issue_signing_cert(&signing.public_key().to_bytes())?;
    write_file_atomic(&dir.join(SIGNING_CERT), signing_cert.as_bytes(), 0o644)
        .map_err(io_err(SIGNING_CERT))?;
    write_private_file(&dir.join(ADMIN_TOKEN), admin_token.expose().as_bytes())
        .map_err(io_err(ADMIN_TOKEN))?;
    write_private_file(
        &dir.join(ADMIN_PASSWORD),
        admin_password.expose().as_bytes(),
    )
    .map_err(io_err(ADMIN_PASSWORD))?;

    tracing::info!(data_dir = %dir.display(), hostnames = ?opts.hostnames, "server-initialized");
    Ok(Initialized {
        admin_token,
        admin_password,
    })
}

/// The relay CA of `dir`, created (with a new `agent-ca.pem`) if the directory predates it.
/// `crate::trust` keeps `agent-ca.pem` the trust set's bundle from then on.
pub fn ensure_relay_ca(dir: &Path) -> Result<Ca, InitError> {
    let (cert, key) = (dir.join(RELAY_CA_CERT), dir.join(RELAY_CA_KEY));
    let read = |path: &Path| {
        fs::read_to_string(path).map_err(|source| InitError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let relay_ca = if cert.exists() || key.exists() {
        Ca::from_pem(&read(&cert)?, &read(&key)?)?
    } else {
        let ca = Ca::generate(&format!("Tether relay CA {}", hex_id()))?;
        tracing::warn!(data_dir = %dir.display(), "relay-ca-created");
        write_relay_ca(dir, &ca)?;
        ca
    };
    Ok(relay_ca)
}

/// `DIR/signing.pem`, the server CA's certificate of the command-signing key `signing`: read,
/// or made (with `ca.key`) in a directory that predates it. A certificate for another key (a
/// signing key replaced by hand) is made again.
pub fn ensure_signing_cert(dir: &Path, signing: &Identity) -> Result<String, InitError> {
    let path = dir.join(SIGNING_CERT);
    let read = |path: &Path| {
        fs::read_to_string(path).map_err(|source| InitError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let raw = signing.public_key().to_bytes();
    let ca_pem = read(&dir.join(CA_CERT))?;
    if let Ok(pem) = fs::read_to_string(&path) {
        if tls::verify_signing_cert(&pem, &ca_pem, &raw).is_ok() {
            return Ok(pem);
        }
    }
    let ca = Ca::from_pem(&ca_pem, &read(&dir.join(CA_KEY))?)?;
    let pem = ca.issue_signing_cert(&raw)?;
    write_file_atomic(&path, pem.as_bytes(), 0o644).map_err(|source| InitError::Io {
        path: path.clone(),
        source,
    })?;
    tracing::warn!(path = %path.display(), "signing-certificate-created");
    Ok(pem)
}

/// Writes the relay CA's key and certificate, and the agents' bundle.
fn write_relay_ca(dir: &Path, relay_ca: &Ca) -> Result<(), InitError> {
    let io_err = |name: &str| {
        let path = dir.join(name);
        move |source| InitError::Io { path, source }
    };
    write_private_file(&dir.join(RELAY_CA_KEY), relay_ca.key_pem().as_bytes())
        .map_err(io_err(RELAY_CA_KEY))?;
    write_file_atomic(
        &dir.join(RELAY_CA_CERT),
        relay_ca.cert_pem().as_bytes(),
        0o644,
    )
    .map_err(io_err(RELAY_CA_CERT))?;
    let server_ca = fs::read_to_string(dir.join(CA_CERT)).map_err(io_err(CA_CERT))?;
    let bundle = agent_bundle(&server_ca, relay_ca.cert_pem());
    write_file_atomic(&dir.join(AGENT_CA), bundle.as_bytes(), 0o644).map_err(io_err(AGENT_CA))
}

/// The agents' trust: the server's CA, then the relay CA.
pub fn agent_bundle(server_ca_pem: &str, relay_ca_pem: &str) -> String {
    let mut bundle = server_ca_pem.trim_end().to_owned();
    bundle.push('\n');
    bundle.push_str(relay_ca_pem.trim_end());
    bundle.push('\n');
    bundle
}

/// What `tether-server cert renew` did.
#[derive(Debug)]
pub struct Renewed {
    /// The names the new certificate holds.
    pub hostnames: Vec<String>,
}

/// `tether-server cert renew`: a new server certificate and key from the same CA, for the
/// names the current one holds plus `add`, so nothing agents or operators trust changes. The
/// new certificate is checked (a handshake per name against `ca.pem`) before it replaces the
/// old one; a running server serves it from its next check of `server.pem` on.
pub fn renew_server_cert(dir: &Path, add: &[String]) -> Result<Renewed, InitError> {
    let read = |name: &str| {
        fs::read_to_string(dir.join(name)).map_err(|source| InitError::Io {
            path: dir.join(name),
            source,
        })
    };
    let ca = Ca::from_pem(&read(CA_CERT)?, &read(CA_KEY)?)?;
    let mut hostnames = tls::certificate_names(&read(SERVER_CERT)?)?;
    for name in add {
        if !hostnames.contains(name) {
            hostnames.push(name.clone());
        }
    }
    let (cert, key) = ca.issue_server_cert(&hostnames)?;
    check_certificate(&ca, &cert, &key, &hostnames)?;
    // The key first: a server that reloads in between finds a pair that does not match, keeps
    // what it serves, and takes the new pair at its next check.
    write_private_file(&dir.join(SERVER_KEY), key.as_bytes()).map_err(|source| InitError::Io {
        path: dir.join(SERVER_KEY),
        source,
    })?;
    write_file_atomic(&dir.join(SERVER_CERT), cert.as_bytes(), 0o644).map_err(|source| {
        InitError::Io {
            path: dir.join(SERVER_CERT),
            source,
        }
    })?;
    tracing::info!(data_dir = %dir.display(), hostnames = ?hostnames, "server-certificate-renewed");
    Ok(Renewed { hostnames })
}

/// Proves the new certificate works: a full TLS handshake against the new CA per hostname.
fn check_certificate(ca: &Ca, cert: &str, key: &str, hostnames: &[String]) -> Result<(), TlsError> {
    let client = Arc::new(tls::client_config(ca.cert_pem())?);
    let server = Arc::new(tls::server_config(cert, key)?);
    for name in hostnames {
        tls::handshake_in_memory(client.clone(), server.clone(), name)?;
    }
    Ok(())
}

/// What a joining node does not take from the node it copies: its own journal (on PostgreSQL
/// every node shares the database), the ports it listened on, and uploads in progress.
const NOT_JOINED: [&str; 2] = ["journal", "ports.json"];

/// Why `join` refused.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{} is not a server data directory: {} is missing", dir.display(), missing)]
    NotAServer { dir: PathBuf, missing: &'static str },
    #[error("{} already holds a server's files (found {found}); nothing was changed", dir.display())]
    NotEmpty { dir: PathBuf, found: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Prepares `dir` as another node of the cluster `from` (a node's data directory, or a copy of
/// it) belongs to: the same CA, certificates, keys and admin token, copied with their modes
/// (secrets stay 0600, `dir` is made 0700), without `from`'s journal and ports. `dir` must be
/// empty or missing. Returns how many files were copied.
pub fn join(from: &Path, dir: &Path) -> Result<usize, JoinError> {
    if let Some(missing) = FILES.into_iter().find(|f| !from.join(f).is_file()) {
        return Err(JoinError::NotAServer {
            dir: from.to_path_buf(),
            missing,
        });
    }
    if let Ok(mut entries) = fs::read_dir(dir) {
        if let Some(found) = entries.next().and_then(Result::ok) {
            return Err(JoinError::NotEmpty {
                dir: dir.to_path_buf(),
                found: found.file_name().to_string_lossy().into_owned(),
            });
        }
    }
    create_private_dir(dir).map_err(|e| match e {
        InitError::Io { path, source } => JoinError::Io { path, source },
        other => JoinError::Io {
            path: dir.to_path_buf(),
            source: io::Error::other(other.to_string()),
        },
    })?;
    copy_tree(from, dir, true)
}

/// Copies `from` into `to` (which exists), files with their permissions; at the top level
/// leaves out [`NOT_JOINED`]. Symbolic links and other special files are not followed.
fn copy_tree(from: &Path, to: &Path, top: bool) -> Result<usize, JoinError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JoinError::Io { path, source }
    };
    let mut copied = 0;
    for entry in fs::read_dir(from).map_err(io_err(from))? {
        let entry = entry.map_err(io_err(from))?;
        let name = entry.file_name();
        if top && NOT_JOINED.iter().any(|n| name == *n) {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        let meta = fs::symlink_metadata(&src).map_err(io_err(&src))?;
        if meta.is_dir() {
            DirBuilder::new()
                .mode(meta.permissions().mode() & 0o700)
                .create(&dst)
                .map_err(io_err(&dst))?;
            copied += copy_tree(&src, &dst, false)?;
        } else if meta.is_file() {
            fs::copy(&src, &dst).map_err(io_err(&dst))?;
            // Never wider than the owner's: secrets keep 0600, nothing becomes readable to others.
            fs::set_permissions(
                &dst,
                fs::Permissions::from_mode(meta.permissions().mode() & 0o700),
            )
            .map_err(io_err(&dst))?;
            copied += 1;
        }
    }
    Ok(copied)
}

/// Creates `dir` (and parents) and makes it 0700, also if it already existed.
fn create_private_dir(dir: &Path) -> Result<(), InitError> {
    let io_err = |source| InitError::Io {
        path: dir.to_path_buf(),
        source,
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err)
}

/// 32 random bytes, base64url without padding.
/// Never starting with `-`, which a command line (`tether login --token ...`) would take for
/// an option: one token in 64 would otherwise.
fn new_token() -> String {
    loop {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let token = URL_SAFE_NO_PAD.encode(bytes);
        if !token.starts_with('-') {
            return token;
        }
    }
}

/// A short random id that tells one installation's CA from another's.
fn hex_id() -> String {
    format!("{:08x}", rand::rngs::OsRng.next_u32())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    fn opts(dir: &Path) -> InitOptions {
        InitOptions {
            data_dir: dir.join("data"),
            hostnames: DEFAULT_HOSTNAMES.map(String::from).to_vec(),
            force: false,
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_every_file_with_the_right_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = opts(tmp.path());
        let done = initialize(&opts).unwrap();
        let dir = &opts.data_dir;
        assert_eq!(mode(dir), 0o700);
        for secret in [
            CA_KEY,
            RELAY_CA_KEY,
            SERVER_KEY,
            SIGNING_KEY,
            ADMIN_TOKEN,
            ADMIN_PASSWORD,
        ] {
            assert_eq!(mode(&dir.join(secret)), 0o600, "{secret}");
        }
        for public in [
            CA_CERT,
            RELAY_CA_CERT,
            AGENT_CA,
            SERVER_CERT,
            SIGNING_PUB,
            SIGNING_CERT,
        ] {
            assert_eq!(mode(&dir.join(public)), 0o644, "{public}");
        }
        let token = fs::read_to_string(dir.join(ADMIN_TOKEN)).unwrap();
        assert_eq!(&token, done.admin_token.expose());
        assert_eq!(URL_SAFE_NO_PAD.decode(&token).unwrap().len(), 32);
        let password = fs::read_to_string(dir.join(ADMIN_PASSWORD)).unwrap();
        assert_eq!(&password, done.admin_password.expose());
        assert!(password.len() >= crate::users::MIN_PASSWORD_LEN);
        let signing = Identity::load(&dir.join(SIGNING_KEY)).unwrap();
        let signing_cert = fs::read_to_string(dir.join(SIGNING_CERT)).unwrap();
        tls::verify_signing_cert(
            &signing_cert,
            &fs::read_to_string(dir.join(CA_CERT)).unwrap(),
            &signing.public_key().to_bytes(),
        )
        .unwrap();
        assert_eq!(ensure_signing_cert(dir, &signing).unwrap(), signing_cert);
        fs::remove_file(dir.join(SIGNING_CERT)).unwrap();
        let again = ensure_signing_cert(dir, &signing).unwrap();
        assert_eq!(fs::read_to_string(dir.join(SIGNING_CERT)).unwrap(), again);
        let ca = Ca::from_pem(
            &fs::read_to_string(dir.join(CA_CERT)).unwrap(),
            &fs::read_to_string(dir.join(CA_KEY)).unwrap(),
        )
        .unwrap();
        let cert = fs::read_to_string(dir.join(SERVER_CERT)).unwrap();
        let key = fs::read_to_string(dir.join(SERVER_KEY)).unwrap();
        check_certificate(&ca, &cert, &key, &opts.hostnames).unwrap();

        // Operators' CA and the relay CA are different CAs; agents trust both.
        let relay_ca = ensure_relay_ca(dir).unwrap();
        assert_ne!(relay_ca.cert_pem(), ca.cert_pem());
        let bundle = fs::read_to_string(dir.join(AGENT_CA)).unwrap();
        assert!(
            bundle.contains(ca.cert_pem().trim()) && bundle.contains(relay_ca.cert_pem().trim())
        );
        // The server's certificate does not chain to the relay CA.
        let relay_only = Arc::new(tls::client_config(relay_ca.cert_pem()).unwrap());
        let server = Arc::new(tls::server_config(&cert, &key).unwrap());
        assert!(tls::handshake_in_memory(relay_only, server, "localhost").is_err());
    }

    #[test]
    fn a_directory_from_before_the_relay_ca_gets_one_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = opts(tmp.path());
        initialize(&opts).unwrap();
        let dir = &opts.data_dir;
        for f in [RELAY_CA_CERT, RELAY_CA_KEY, AGENT_CA] {
            fs::remove_file(dir.join(f)).unwrap();
        }
        let created = ensure_relay_ca(dir).unwrap();
        assert_eq!(mode(&dir.join(RELAY_CA_KEY)), 0o600);
        // Loaded again, not replaced.
        let again = ensure_relay_ca(dir).unwrap();
        assert_eq!(created.cert_pem(), again.cert_pem());
        let bundle = fs::read_to_string(dir.join(AGENT_CA)).unwrap();
        assert!(bundle.contains(again.cert_pem().trim()));
    }

    #[test]
    fn refuses_an_initialized_dir_unless_forced() {
        let tmp = tempfile::tempdir().unwrap();
        let mut opts = opts(tmp.path());
        let first = initialize(&opts).unwrap();
        let err = initialize(&opts).unwrap_err();
        assert!(matches!(err, InitError::AlreadyInitialized { .. }), "{err}");
        let token_path = opts.data_dir.join(ADMIN_TOKEN);
        assert_eq!(
            &fs::read_to_string(&token_path).unwrap(),
            first.admin_token.expose()
        );
        opts.force = true;
        let second = initialize(&opts).unwrap();
        assert_ne!(second.admin_token.expose(), first.admin_token.expose());
        assert_eq!(
            &fs::read_to_string(&token_path).unwrap(),
            second.admin_token.expose()
        );
    }

    #[test]
    fn renewal_keeps_the_ca_and_the_names_and_adds_new_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = opts(tmp.path());
        initialize(&opts).unwrap();
        let dir = &opts.data_dir;
        let ca_before = fs::read_to_string(dir.join(CA_CERT)).unwrap();
        let cert_before = fs::read_to_string(dir.join(SERVER_CERT)).unwrap();
        let renewed = renew_server_cert(dir, &["tether.example".to_owned()]).unwrap();
        assert_eq!(
            renewed.hostnames,
            ["localhost", "127.0.0.1", "tether.example"]
        );
        assert_eq!(fs::read_to_string(dir.join(CA_CERT)).unwrap(), ca_before);
        let cert = fs::read_to_string(dir.join(SERVER_CERT)).unwrap();
        assert_ne!(cert, cert_before);
        assert_eq!(mode(&dir.join(SERVER_KEY)), 0o600);
        let ca = Ca::from_pem(&ca_before, &fs::read_to_string(dir.join(CA_KEY)).unwrap()).unwrap();
        let key = fs::read_to_string(dir.join(SERVER_KEY)).unwrap();
        check_certificate(&ca, &cert, &key, &renewed.hostnames).unwrap();
        // A bad name changes nothing.
        assert!(renew_server_cert(dir, &["not a name".to_owned()]).is_err());
        assert_eq!(fs::read_to_string(dir.join(SERVER_CERT)).unwrap(), cert);
    }

    #[test]
    fn admin_tokens_never_look_like_an_option() {
        for _ in 0..2_000 {
            let token = new_token();
            assert!(!token.starts_with('-') && token.len() == 43, "{token}");
        }
    }

    #[test]
    fn bad_hostname_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let mut opts = opts(tmp.path());
        opts.hostnames = vec!["not a host".into()];
        assert!(matches!(
            initialize(&opts),
            Err(InitError::Tls(TlsError::Hostname(_)))
        ));
        assert!(!opts.data_dir.exists());
    }

    #[test]
    fn join_copies_the_keys_with_their_modes_but_not_the_journal_or_ports() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = opts(tmp.path());
        initialize(&opts).unwrap();
        let from = &opts.data_dir;
        fs::create_dir_all(from.join("journal/db")).unwrap();
        fs::write(from.join("journal/db/conf"), "x").unwrap();
        fs::write(from.join("ports.json"), "{}").unwrap();
        fs::create_dir_all(from.join("artifacts/sha256")).unwrap();
        fs::write(from.join("artifacts/sha256/ab"), "blob").unwrap();

        let node = tmp.path().join("node-b");
        let copied = join(from, &node).unwrap();
        assert!(copied >= FILES.len(), "{copied}");
        assert_eq!(mode(&node), 0o700);
        for f in FILES {
            assert_eq!(
                fs::read(node.join(f)).unwrap(),
                fs::read(from.join(f)).unwrap(),
                "{f}"
            );
        }
        for secret in [CA_KEY, SERVER_KEY, SIGNING_KEY, ADMIN_TOKEN] {
            assert_eq!(mode(&node.join(secret)), 0o600, "{secret}");
        }
        assert!(!node.join("journal").exists());
        assert!(!node.join("ports.json").exists());
        assert_eq!(fs::read(node.join("artifacts/sha256/ab")).unwrap(), b"blob");

        // Never over a directory that holds anything, never from one that is not a server's.
        assert!(matches!(join(from, &node), Err(JoinError::NotEmpty { .. })));
        let empty = tmp.path().join("empty");
        fs::create_dir_all(&empty).unwrap();
        assert!(matches!(
            join(&empty, &tmp.path().join("node-c")),
            Err(JoinError::NotAServer { .. })
        ));
        assert!(!tmp.path().join("node-c").exists());
    }
}
