//! `tether-server run`: checks the data directory that `init` made, opens the journal, starts the
//! `Journal` actor and serves HTTPS (admin endpoints for now) until SIGINT or SIGTERM, then
//! shuts down gracefully. Once the listener is bound its address goes to `DIR/ports.json`.
//!
//! Every limit a peer could otherwise push against is set here explicitly: request-head and TLS
//! handshake timeouts, concurrent handshakes and connections per worker, body sizes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actix::Actor;
use actix_rt::signal::unix::{signal, SignalKind};
use actix_web::{web, App, HttpServer};
use tether_shared::journal::{Journal, JournalError, JournalOptions};
use tether_shared::tls::{self, TlsError};

use crate::admin::{self, AdminState};
use crate::admin_token::{AdminToken, AdminTokenError};
use crate::api_error::{not_found, ApiError};
use crate::health::JournalWatch;
use crate::init;
use crate::ports::{self, Ports};

/// The journal's directory inside the data directory.
pub const JOURNAL_DIR: &str = "journal";

/// Time a client has to send a complete request head.
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection gets to shut down cleanly before it is dropped.
const CLIENT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle time after which a keep-alive connection is closed.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// TLS handshakes in progress at once, per worker (actix's "connection rate").
const MAX_TLS_HANDSHAKES_PER_WORKER: usize = 256;
/// Open connections per worker; past it the listener stops accepting until one closes.
const MAX_CONNECTIONS_PER_WORKER: usize = 10_000;
/// Pending connections the kernel queues before accept.
const LISTEN_BACKLOG: u32 = 1_024;
/// Largest JSON request body (REST); bulk transfers stream instead.
const JSON_LIMIT_BYTES: usize = 1024 * 1024;
/// Largest buffered request body of any other kind.
const PAYLOAD_LIMIT_BYTES: usize = 1024 * 1024;
/// Seconds in-flight requests get to finish after a stop signal.
const SHUTDOWN_TIMEOUT_S: u64 = 10;

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The data directory `tether-server init` created.
    pub data_dir: PathBuf,
    /// Where the HTTPS listener binds (port 0: any free port).
    pub listen_https: SocketAddr,
}

/// Why the server could not start, or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The data directory holds none of the files `init` writes.
    #[error("{} is not initialized: run `tether-server init --data {}` first", dir.display(), dir.display())]
    NotInitialized {
        /// The data directory.
        dir: PathBuf,
    },
    /// The data directory holds some of `init`'s files but not all.
    #[error("{} is incompletely initialized ({missing} is missing): run `tether-server init --data {} --force` to recreate its CA, keys and admin token", dir.display(), dir.display())]
    Incomplete {
        /// The data directory.
        dir: PathBuf,
        /// The first missing file.
        missing: &'static str,
    },
    /// A file of the data directory could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying failure.
        source: io::Error,
    },
    /// The server certificate or key is unusable.
    #[error("{} / {}: {source}", cert.display(), key.display())]
    Tls {
        /// The certificate chain file.
        cert: PathBuf,
        /// The private key file.
        key: PathBuf,
        /// What is wrong.
        source: TlsError,
    },
    /// The admin token file is unusable.
    #[error("admin token: {0}")]
    AdminToken(#[from] AdminTokenError),
    /// The journal could not be opened (its message says what to do).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The HTTPS listener could not be bound.
    #[error("cannot listen on {addr} (listen.https): {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The underlying failure.
        source: io::Error,
    },
    /// `ports.json` could not be written or removed.
    #[error("{}: {source}", path.display())]
    Ports {
        /// The file.
        path: PathBuf,
        /// The underlying failure.
        source: io::Error,
    },
    /// The SIGINT/SIGTERM handlers could not be installed.
    #[error("cannot install the SIGINT/SIGTERM handlers: {0}")]
    Signal(io::Error),
    /// The HTTP server stopped with an error.
    #[error("the HTTPS server failed: {0}")]
    Serve(io::Error),
}

/// Runs the server until a stop signal; `Ok` after a clean shutdown.
pub fn run(opts: &RunOptions) -> Result<(), RunError> {
    let dir = opts.data_dir.as_path();
    check_initialized(dir)?;
    let token = AdminToken::load(&dir.join(init::ADMIN_TOKEN))?;
    let tls = load_tls(dir)?;
    // Blocking (sled recovery reads every entry): done before the runtime starts.
    let (journal, recovered) = Journal::open(&dir.join(JOURNAL_DIR), &JournalOptions::default())?;
    tracing::info!(
        incarnation = %recovered.incarnation,
        created = recovered.created,
        logs = recovered.logs.len(),
        "journal-recovered"
    );
    ports::remove_stale(dir).map_err(|source| RunError::Ports {
        path: dir.join(ports::PORTS_FILE),
        source,
    })?;
    actix_rt::System::new().block_on(serve(dir, opts.listen_https, token, tls, journal))
}

/// Refuses a directory `init` has not (completely) filled.
fn check_initialized(dir: &Path) -> Result<(), RunError> {
    let missing: Vec<&'static str> = init::FILES
        .into_iter()
        .filter(|f| !dir.join(f).exists())
        .collect();
    match missing.first() {
        None => Ok(()),
        Some(_) if missing.len() == init::FILES.len() => Err(RunError::NotInitialized {
            dir: dir.to_path_buf(),
        }),
        Some(&first) => Err(RunError::Incomplete {
            dir: dir.to_path_buf(),
            missing: first,
        }),
    }
}

/// The rustls configuration presenting `DIR/server.pem` with `DIR/server.key`.
fn load_tls(dir: &Path) -> Result<rustls::ServerConfig, RunError> {
    let cert = dir.join(init::SERVER_CERT);
    let key = dir.join(init::SERVER_KEY);
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| RunError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let (cert_pem, key_pem) = (read(&cert)?, read(&key)?);
    tls::server_config(&cert_pem, &key_pem).map_err(|source| RunError::Tls { cert, key, source })
}

/// Starts the actors and the HTTPS server inside the actix system; returns once it stopped.
async fn serve(
    dir: &Path,
    listen: SocketAddr,
    token: AdminToken,
    tls: rustls::ServerConfig,
    journal: Journal,
) -> Result<(), RunError> {
    let handle = journal.handle();
    let state = web::Data::new(AdminState {
        token,
        journal: JournalWatch::new(journal.start(), handle),
    });
    let stop = stop_signal().map_err(RunError::Signal)?;
    let json = web::JsonConfig::default()
        .limit(JSON_LIMIT_BYTES)
        .error_handler(|err, _| ApiError::BadRequest(err.to_string()).into());
    let payload = web::PayloadConfig::new(PAYLOAD_LIMIT_BYTES);

    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(json.clone())
            .app_data(payload.clone())
            .configure(admin::configure)
            .default_service(web::to(not_found))
    })
    .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
    .tls_handshake_timeout(TLS_HANDSHAKE_TIMEOUT)
    .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
    .keep_alive(KEEP_ALIVE)
    .max_connection_rate(MAX_TLS_HANDSHAKES_PER_WORKER)
    .max_connections(MAX_CONNECTIONS_PER_WORKER)
    .backlog(LISTEN_BACKLOG)
    .shutdown_timeout(SHUTDOWN_TIMEOUT_S)
    .shutdown_signal(stop)
    .bind_rustls_0_23(listen, tls)
    .map_err(|source| RunError::Bind {
        addr: listen,
        source,
    })?;
    let https = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| RunError::Bind {
            addr: listen,
            source: io::Error::new(io::ErrorKind::AddrNotAvailable, "no address was bound"),
        })?;

    let running = server.run();
    let ports_path = dir.join(ports::PORTS_FILE);
    if let Err(source) = (Ports { https }).write(dir) {
        running.handle().stop(false).await;
        return Err(RunError::Ports {
            path: ports_path,
            source,
        });
    }
    tracing::info!(https = %https, ports = %ports_path.display(), "server-listening");

    let served = running.await;
    // Best effort: a stale file would point scripts at a port nobody listens on.
    if let Err(e) = ports::remove_stale(dir) {
        tracing::warn!(path = %ports_path.display(), error = %e, "ports-file-not-removed");
    }
    served.map_err(RunError::Serve)?;
    tracing::info!("server-stopped");
    Ok(())
}

/// Installs the SIGINT and SIGTERM handlers now; the future resolves at the first of them,
/// which starts a graceful shutdown.
fn stop_signal() -> io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "server-stopping");
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn refuses_empty_and_partial_data_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let err = check_initialized(&dir).unwrap_err();
        assert!(matches!(err, RunError::NotInitialized { .. }), "{err}");
        assert!(err.to_string().contains("tether-server init"), "{err}");

        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(init::ADMIN_TOKEN), "t").unwrap();
        let err = check_initialized(&dir).unwrap_err();
        assert!(
            matches!(err, RunError::Incomplete { missing, .. } if missing == init::CA_CERT),
            "{err}"
        );
        assert!(err.to_string().contains("--force"), "{err}");
    }

    #[test]
    fn an_initialized_dir_loads_its_tls_config() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        init::initialize(&init::InitOptions {
            data_dir: dir.clone(),
            hostnames: vec!["localhost".into()],
            force: false,
        })
        .unwrap();
        check_initialized(&dir).unwrap();
        load_tls(&dir).unwrap();

        std::fs::write(dir.join(init::SERVER_KEY), "not a key").unwrap();
        let err = load_tls(&dir).unwrap_err();
        assert!(err.to_string().contains("server.key"), "{err}");
    }
}
