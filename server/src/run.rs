//! `tether-server run`: checks the data directory that `init` made, opens the journal, loads
//! the registry, starts the `Journal` actor and serves two TLS listeners until SIGINT or
//! SIGTERM, then shuts both down gracefully: HTTPS (`listen.https`: REST under `/api/v1`,
//! admin) and the agent-facing one (`listen.wss`: `/agent/v1/...`, see `agent_surface`). Once
//! both are bound their addresses go to `DIR/ports.json`.
//!
//! Every limit a peer could otherwise push against is set here explicitly: request-head and TLS
//! handshake timeouts, concurrent handshakes and connections per worker, body sizes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use actix_rt::signal::unix::{signal, SignalKind};
use actix_web::{web, App};
use tether_shared::config::{masked_url, Storage};
use tether_shared::h1_tls::{self, Limits};
use tether_shared::identity::IdentityError;
use tether_shared::journal::{Journal, JournalError, JournalOptions, PgOptions, PgStore};
use tether_shared::tls::TlsError;

use crate::admin_token::{AdminToken, AdminTokenError};
use crate::api_error::{not_found, not_found_for_agents};
use crate::app::{self, Tuning};
use crate::background;
use crate::deployments::{Deployments, DeploymentsError, Retention};
use crate::init;
use crate::lease;
use crate::plugins::{Plugins, PluginsError};
use crate::ports::{self, Ports};
use crate::registry::{Registry, RegistryError};
use crate::relay_certs::RelayCerts;
use crate::server_cert;
use crate::session::relay_session::ServerStopping;
use crate::session::session_registry::CloseAllSessions;
use crate::trust::Trust;
use crate::upgrades::Upgrades;
use crate::users::{Users, UsersError};

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
/// Seconds in-flight requests get to finish after a stop signal.
const SHUTDOWN_TIMEOUT_S: u64 = 10;

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The data directory `tether-server init` created.
    pub data_dir: PathBuf,
    /// Where the HTTPS listener binds (port 0: any free port).
    pub listen_https: SocketAddr,
    /// Where the agent-facing listener binds (port 0: any free port).
    pub listen_wss: SocketAddr,
    /// Agent sessions: beat interval, silence before offline, handshakes at once, window.
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub max_handshakes: usize,
    pub window: u64,
    /// How long finished deployments are kept, and how often they are pruned.
    pub retention: Retention,
    pub prune_interval: Duration,
    /// Entries the audit log keeps.
    pub audit_keep: u64,
    /// Days audit entries are kept (0: whatever their age).
    pub audit_keep_days: u64,
    /// Agents offline longer than these are marked stale, removed (0: never).
    pub mark_stale_after: Duration,
    pub remove_stale_after: Duration,
    /// How long a relay's certificate is valid (renewed with a third left).
    pub relay_certificate_lifetime: Duration,
    /// The journal's page cache (sled).
    pub journal_cache_bytes: u64,
    /// Where the journal lives.
    pub storage: Storage,
    /// Where artifacts, plugin bundles and upgrade packages live (`None`: the data directory).
    pub files_dir: Option<PathBuf>,
    /// Jobs an agent runs at once unless its own setting says otherwise.
    pub max_running_jobs_per_agent: usize,
    /// The key ring sealing secrets at rest (outside the data directory).
    pub secrets: crate::secrets::KeySource,
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
    /// The server certificate or key is unusable.
    #[error(transparent)]
    Cert(#[from] crate::server_cert::CertError),
    /// The signing key, the CAs or a key rollover's files are unusable.
    #[error("trust: {0}")]
    Trust(#[from] crate::trust::TrustError),
    /// The admin token file is unusable.
    #[error("admin token: {0}")]
    AdminToken(#[from] AdminTokenError),
    /// The journal could not be opened (its message says what to do).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The command-signing key is unusable.
    #[error("signing key: {0}")]
    SigningKey(#[from] IdentityError),
    /// The registry could not be loaded from the journal.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// The key ring for secrets at rest is missing or unusable.
    #[error("secrets: {0}")]
    Secrets(#[from] crate::secrets::SecretsError),
    /// Processes, deployments and jobs could not be loaded from the journal.
    #[error("deployments: {0}")]
    Deployments(#[from] DeploymentsError),
    /// The plugin index could not be loaded from the journal.
    #[error("plugins: {0}")]
    Plugins(#[from] PluginsError),
    /// The web application's users could not be loaded or the first one created.
    #[error("users: {0}")]
    Users(#[from] UsersError),
    /// The users' API tokens could not be loaded.
    #[error("API tokens: {0}")]
    ApiTokens(#[from] crate::api_tokens::ApiTokensError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} (listen.{listener}): {source}")]
    Bind {
        /// Which listener: `https` or `wss`.
        listener: &'static str,
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
    /// After a drain, the process could not start over (as a standby).
    #[error("drained, but cannot start over as a standby: {0}")]
    Restart(io::Error),
    /// A listener stopped with an error.
    #[error("the {listener} listener failed: {source}")]
    Serve {
        /// Which listener: `https` or `wss`.
        listener: &'static str,
        /// The underlying failure.
        source: io::Error,
    },
}

/// Runs the server until a stop signal; `Ok` after a clean shutdown.
pub fn run(opts: &RunOptions) -> Result<(), RunError> {
    let dir = opts.data_dir.as_path();
    check_initialized(dir)?;
    let token = AdminToken::load(&dir.join(init::ADMIN_TOKEN))?;
    // First: a key rollover's switch cut short is completed (the server certificate with it).
    let trust = Arc::new(Trust::load(dir)?);
    let tls = server_cert::load(dir)?;
    let server_cert_pem = Arc::new(RwLock::new(server_cert::read(dir)?.0));
    let keys = Arc::new(crate::secrets::KeyRing::load(&opts.secrets)?);
    tracing::info!(keys = keys.ids().len(), sealing = %keys.ids().last().copied().unwrap_or_default(), "secrets-key-ring-loaded");
    // Blocking (sled recovery reads every entry): done before the runtime starts.
    let journal_opts = JournalOptions {
        sled: tether_shared::journal::SledOptions {
            cache_capacity_bytes: opts.journal_cache_bytes,
            ..Default::default()
        },
        ..Default::default()
    };
    // On PostgreSQL: the lease this node holds, once it is the active one, and its way out.
    let mut active = None;
    let mut drain = None;
    let mut claims = None;
    let mut serving = app::Serving::Alone;
    let mut hints = None;
    // A member: its operators' port (which sends operators to the active node), and the lease
    // once it takes it.
    let mut member: Option<Member> = None;
    let mut member_stopping: Option<Arc<std::sync::atomic::AtomicBool>> = None;
    let mut active_epochs = None;
    let (journal, recovered) = match &opts.storage {
        Storage::Sled => Journal::open(&dir.join(JOURNAL_DIR), &journal_opts)?,
        Storage::Postgres {
            url,
            ca_file,
            pool_size,
            node_name,
            node_url,
            lease_ttl,
            every_node_serves_agents,
        } => {
            let store = Arc::new(PgStore::open(&PgOptions {
                url: url.expose().clone(),
                ca_file: ca_file.clone(),
                pool_size: *pool_size,
            })?);
            tracing::info!(url = %masked_url(url.expose()), node = %node_name, "journal-on-postgres");
            // A standby waits here until the active node's lease runs out, answering on the
            // operators' port only that it is a standby; a member serves agents meanwhile.
            let lease = match store.acquire_lease(node_name, *lease_ttl)? {
                Ok(lease) => Some(lease),
                Err(_) => {
                    let server_tls = tls.server_config().map_err(|source| RunError::Tls {
                        cert: dir.join(init::SERVER_CERT),
                        key: dir.join(init::SERVER_KEY),
                        source,
                    })?;
                    let (member_drains, drains_asked) = match every_node_serves_agents {
                        true => {
                            let (ask, asked) = tokio::sync::mpsc::channel(1);
                            (Some(ask), Some(asked))
                        }
                        false => (None, None),
                    };
                    let standby = lease::Standby::serve(
                        opts.listen_https,
                        server_tls,
                        listener_limits(),
                        node_name,
                        node_url.as_deref(),
                        token.clone(),
                        member_drains,
                    )
                    .map_err(|source| RunError::Bind {
                        listener: "https",
                        addr: opts.listen_https,
                        source,
                    })?;
                    if *every_node_serves_agents {
                        store.serve_as_member();
                        let (nodes, addr) = (standby.nodes(), standby.addr);
                        let lease::MemberWait {
                            taken,
                            heard,
                            stopping,
                            epochs,
                        } = standby.wait_as_member(store.clone(), node_name, *lease_ttl);
                        active_epochs = Some(epochs);
                        member_stopping = Some(stopping);
                        let ttl = *lease_ttl;
                        // Its agents leave once it is cut off from the database (it could
                        // acknowledge nothing for them).
                        let taken: MemberLease = Box::pin(async move {
                            tokio::select! {
                                taken = taken => taken.unwrap_or(Err(JournalError::Closed)),
                                e = lease::cut_off(heard, ttl) => Err(e),
                            }
                        });
                        member = Some(Member {
                            nodes,
                            addr,
                            taken,
                            drains: drains_asked,
                        });
                        None
                    } else {
                        let lease =
                            lease::become_active(&store, node_name, *lease_ttl, Some(&standby));
                        standby.stop();
                        Some(lease?)
                    }
                }
            };
            claims = Some(crate::claims::Claims::new(store.clone(), node_name));
            if *every_node_serves_agents {
                // Each side learns at once that the other wrote for it.
                store.hint_writes_under(&[
                    crate::mail::INBOX_PREFIX,
                    crate::mail::MAILBOX_PREFIX,
                    crate::mail::BELL_PREFIX,
                ]);
                hints = Some(store.hints());
            }
            match lease {
                Some(lease) => {
                    tracing::info!(node = %node_name, epoch = lease.epoch, "lease-taken-active");
                    drain = Some(crate::drain::Drain::new(store.clone()));
                    active = Some((store.clone(), lease));
                    if *every_node_serves_agents {
                        serving = app::Serving::Active;
                    }
                }
                None => {
                    tracing::info!(node = %node_name, "serving-agents-as-a-member");
                    serving = app::Serving::Member;
                }
            }
            Journal::with_store(store, Path::new("postgres"), &journal_opts, None)?
        }
    };
    if let Storage::Postgres { .. } = &opts.storage {
        // A rollover's steps the active node took while this one was away (or waiting) are
        // taken here before anything is signed or served.
        trust.share_through(journal.handle(), keys.clone());
        match trust.adopt() {
            Ok(Some(rotation)) => {
                tracing::info!(serial = rotation.serial, "trust-caught-up-at-start");
                // Both listeners (a member's operators' port is bound already) serve it.
                let (cert_pem, key_pem) = server_cert::read(dir)?;
                tls.replace(&cert_pem, &key_pem)
                    .map_err(|source| server_cert::CertError::Tls {
                        cert: dir.join(init::SERVER_CERT),
                        key: dir.join(init::SERVER_KEY),
                        source,
                    })?;
                *server_cert_pem
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = cert_pem;
            }
            Ok(None) => {}
            // It serves with the keys it has (logged again at each look, on a member).
            Err(e) => tracing::error!(error = %e, "trust-not-taken-from-the-database"),
        }
    }
    tracing::info!(
        incarnation = %recovered.incarnation,
        created = recovered.created,
        logs = recovered.logs.len(),
        "journal-recovered"
    );
    let registry = Arc::new(Registry::load(journal.handle())?);
    let relay_certs = Arc::new(RelayCerts::new(
        trust.clone(),
        opts.relay_certificate_lifetime,
        registry.clone(),
    ));
    let users = Arc::new(Users::load(journal.handle())?);
    let api_tokens = Arc::new(crate::api_tokens::ApiTokens::load(journal.handle())?);
    let token = token.with_api_tokens(api_tokens.clone(), users.clone());
    let audit = Arc::new(crate::audit::Audit::load(
        journal.handle(),
        opts.audit_keep,
    )?);
    // Content-addressed files: on a directory the nodes of a cluster share, or in `dir`.
    let files = opts.files_dir.as_deref().unwrap_or(dir);
    let plugins = Arc::new(Plugins::load(journal.handle(), files)?);
    let artifacts = crate::artifacts::ArtifactStore::open(
        files,
        journal.handle(),
        registry.clone(),
        token.clone(),
    )?;
    let upgrades = Arc::new(Upgrades::open(journal.handle(), files)?);
    let deployments = Arc::new(
        Deployments::load(journal.handle(), keys)?
            .with_catalog(plugins.clone())
            .with_artifacts(artifacts.lookup())
            .with_max_running_per_agent(opts.max_running_jobs_per_agent),
    );
    let reconciliations = Arc::new(crate::reconcile::Reconciliations::load(journal.handle())?);
    ports::remove_stale(dir).map_err(|source| RunError::Ports {
        path: dir.join(ports::PORTS_FILE),
        source,
    })?;
    // The cluster's nodes, refreshed by the lease loop (`lease::keep`).
    let nodes = match &member {
        Some(m) => m.nodes.clone(),
        None => lease::Nodes::advertising(match &opts.storage {
            Storage::Postgres { node_url, .. } => node_url.as_deref(),
            Storage::Sled => None,
        }),
    };
    let loaded = app::Loaded {
        token,
        tls,
        relay_certs,
        server_cert_pem,
        trust,
        journal,
        registry,
        deployments,
        plugins,
        artifacts,
        upgrades,
        users,
        api_tokens,
        audit,
        reconciliations,
        cluster: active
            .as_ref()
            .map(|(_, lease)| crate::health::ClusterHealth {
                role: "active",
                node: lease.holder.clone(),
                epoch: lease.epoch,
                lease_ttl_ms: u64::try_from(lease.ttl.as_millis()).unwrap_or(u64::MAX),
                nodes: nodes.clone(),
            }),
        drain: drain.as_ref().map(|(d, _)| d.clone()),
        claims,
        serving,
        hints,
        active_epochs,
    };
    let (drain, drains) = drain.unzip();
    let kept = drain.clone();
    let took_lease = actix_rt::System::new().block_on(async move {
        if let (Some((store, lease)), Some(drain)) = (active, kept) {
            // On a thread of its own: however busy agents keep the others (handshakes read the
            // database on their actors' threads), the lease is renewed in time.
            let keeper = actix_rt::Arbiter::new();
            if !keeper.spawn(lease::keep(store, lease, nodes.clone(), drain)) {
                tracing::error!("lease-keeper-not-started");
            }
        }
        serve(dir, opts, loaded, drains, nodes, member).await
    });
    if let Some(stopping) = member_stopping {
        // Whatever ended it, a member that stopped serving takes no lease in this process.
        stopping.store(true, std::sync::atomic::Ordering::Release);
    }
    let took_lease = took_lease?;
    if took_lease {
        // This member holds the lease now: it starts over as the active node.
        tracing::info!("lease-taken-starting-over-as-the-active-node");
        return Err(RunError::Restart(tether_shared::storage::restart_in_place()));
    }
    if drain.is_some_and(|d| d.drained()) {
        // Another node took over: this one starts over, and waits as a standby.
        tracing::info!("drained-starting-over-as-a-standby");
        return Err(RunError::Restart(tether_shared::storage::restart_in_place()));
    }
    Ok(())
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

/// Applies the limits every listener shares (see the constants above); stop signals are handled
/// by [`serve`] for both listeners at once.
/// The limits of both listeners (HTTP/1.1 only: see `tether_shared::h1_tls`).
fn listener_limits() -> Limits {
    Limits {
        tls_handshake_timeout: TLS_HANDSHAKE_TIMEOUT,
        client_request_timeout: CLIENT_REQUEST_TIMEOUT,
        client_disconnect_timeout: CLIENT_DISCONNECT_TIMEOUT,
        keep_alive: KEEP_ALIVE,
        max_tls_handshakes_per_worker: MAX_TLS_HANDSHAKES_PER_WORKER,
        max_connections_per_worker: MAX_CONNECTIONS_PER_WORKER,
        backlog: LISTEN_BACKLOG,
        shutdown_timeout_s: SHUTDOWN_TIMEOUT_S,
        workers: None,
        // One worker's worth: a source (a NAT of many agents) never takes every slot.
        max_connections_per_source: MAX_CONNECTIONS_PER_WORKER,
        max_handshakes_per_source: MAX_TLS_HANDSHAKES_PER_WORKER / 2,
    }
}

/// A member's wait for the lease (see [`lease::Standby::wait_as_member`]).
/// What a member node brings to [`serve`]: its operators' port (its standby's, bound
/// already), its wait for the lease, and the drains asked of it there.
struct Member {
    nodes: lease::Nodes,
    addr: SocketAddr,
    taken: MemberLease,
    drains: Option<tokio::sync::mpsc::Receiver<crate::drain::MemberRequest>>,
}

type MemberLease = std::pin::Pin<
    Box<dyn Future<Output = Result<tether_shared::journal::Lease, JournalError>> + Send>,
>;

/// Starts the actors and both listeners inside the actix system: HTTPS (`listen.https`: REST,
/// admin) and the agent-facing one (`listen.wss`: `/agent/v1/...`). Returns once both stopped;
/// a stop signal stops both, and either one failing stops the other. A member serves only the
/// agent-facing one (its operators' port is its standby's), until a stop signal or the lease:
/// `Ok(true)` once it holds it.
async fn serve(
    dir: &Path,
    opts: &RunOptions,
    loaded: app::Loaded,
    drains: Option<tokio::sync::mpsc::Receiver<crate::drain::Request>>,
    nodes: lease::Nodes,
    member: Option<Member>,
) -> Result<bool, RunError> {
    let handle = loaded.journal.handle();
    let probe = match opts.storage {
        Storage::Sled => background::StorageProbe::Disk(dir.to_path_buf()),
        Storage::Postgres { .. } => background::StorageProbe::Database,
    };
    actix_rt::spawn(background::recover_storage(handle.clone(), probe));
    if member.is_none() {
        // The active node's chores (a member writes only for the agents it serves).
        let resealing = loaded.deployments.clone();
        actix_rt::spawn(async move {
            if let Err(e) = resealing.reseal().await {
                tracing::error!(error = %e, "secrets-reseal-failed");
            }
        });
        actix_rt::spawn(background::prune_periodically(
            loaded.deployments.clone(),
            opts.retention,
            loaded.audit.clone(),
            opts.audit_keep_days,
            opts.prune_interval,
        ));
    }
    let (tls, server_cert_pem) = (loaded.tls.clone(), loaded.server_cert_pem.clone());
    let tuning = Tuning {
        heartbeat_interval: opts.heartbeat_interval,
        heartbeat_timeout: opts.heartbeat_timeout,
        max_handshakes: opts.max_handshakes,
        window: opts.window,
        retention: opts.retention,
        mark_stale_after: opts.mark_stale_after,
        remove_stale_after: opts.remove_stale_after,
        stale_check: opts.prune_interval,
    };
    let drain = loaded.drain.clone();
    let built = app::build(dir, tuning, loaded).await?;
    let presence = built.shared.presence.clone();
    nodes.count_sessions_with(move || presence.online_count() as u64);
    if let Storage::Postgres { lease_ttl, .. } = &opts.storage {
        // Agents served by a member that stopped noting itself are offline here.
        let (presence, ttl) = (built.shared.presence.clone(), *lease_ttl);
        nodes.when_listed(move |list| {
            let live: Vec<String> = list
                .iter()
                .filter(|n| u128::try_from(n.seen_ms_ago).unwrap_or(0) < ttl.as_millis())
                .map(|n| n.node.clone())
                .collect();
            presence.keep_members(&live);
        });
    }
    let stop = stop_signal().map_err(RunError::Signal)?;
    let server_tls = tls.server_config().map_err(|source| RunError::Tls {
        cert: dir.join(init::SERVER_CERT),
        key: dir.join(init::SERVER_KEY),
        source,
    })?;
    actix_rt::spawn(server_cert::watch(dir.to_path_buf(), tls, server_cert_pem));
    let (operators, agents) = (built.operators, built.agents);
    let limits = listener_limits();
    // A member's operators' port is its standby's, bound already.
    let (member_https, took_lease, mut member_drains) = match member {
        Some(Member {
            addr,
            taken,
            drains,
            ..
        }) => (Some(addr), Some(taken), drains),
        None => (None, None, None),
    };
    let (https, https_addr) = match member_https {
        Some(addr) => (None, addr),
        None => {
            let (https, addr) =
                h1_tls::bind(opts.listen_https, server_tls.clone(), &limits, move || {
                    App::new()
                        .wrap(actix_web::middleware::from_fn(
                            crate::admin_token::bearer_before_body,
                        ))
                        .wrap(actix_web::middleware::from_fn(
                            crate::body_deadline::body_deadline,
                        ))
                        .wrap(actix_web::middleware::from_fn(
                            crate::audit::record_changes::<crate::state::AppState>,
                        ))
                        .configure(|cfg| operators.configure(cfg))
                        .default_service(web::to(not_found))
                })
                .map_err(|source| RunError::Bind {
                    listener: "https",
                    addr: opts.listen_https,
                    source,
                })?;
            (Some(https), addr)
        }
    };
    let (wss, wss_addr) = h1_tls::bind(opts.listen_wss, server_tls, &limits, move || {
        App::new()
            .wrap(actix_web::middleware::from_fn(
                crate::body_deadline::body_deadline,
            ))
            .configure(|cfg| agents.configure(cfg))
            .default_service(web::to(not_found_for_agents))
    })
    .map_err(|source| RunError::Bind {
        listener: "wss",
        addr: opts.listen_wss,
        source,
    })?;
    let ports = Ports {
        https: https_addr,
        wss: wss_addr,
    };
    let (https_handle, wss_handle) = (https.as_ref().map(|h| h.handle()), wss.handle());
    let ports_path = dir.join(ports::PORTS_FILE);
    if let Err(source) = ports.write(dir) {
        if let Some(h) = &https_handle {
            h.stop(false).await;
        }
        wss_handle.stop(false).await;
        return Err(RunError::Ports {
            path: ports_path,
            source,
        });
    }
    tracing::info!(https = %ports.https, wss = %ports.wss, ports = %ports_path.display(), "server-listening");

    let (https_stop, wss_stop) = (https_handle.clone(), wss_handle.clone());
    // How a member's wait for the lease ended: it took it, or lost the database.
    let waited: Arc<std::sync::Mutex<Option<Result<(), JournalError>>>> = Arc::default();
    let taking = waited.clone();
    actix_rt::spawn(async move {
        let mut drains = drains;
        tokio::pin!(stop);
        // A member stops serving once it holds the lease, and starts over as the active node.
        let took = async move {
            match took_lease {
                Some(taken) => {
                    let done = taken.await;
                    match &done {
                        Ok(lease) => tracing::info!(epoch = lease.epoch, "member-took-the-lease"),
                        Err(e) => tracing::error!(error = %e, "member-lost-the-database"),
                    }
                    *taking
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(done.map(|_| ()));
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(took);
        loop {
            // A stop signal, the lease (a member), or a drain (`POST /admin/drain`).
            let drain_request = tokio::select! {
                _ = &mut stop => None,
                _ = &mut took => None,
                Some(request) = async {
                    match drains.as_mut() {
                        Some(d) => d.recv().await,
                        None => std::future::pending().await,
                    }
                } => Some(request),
                Some(reply) = async {
                    match member_drains.as_mut() {
                        Some(d) => d.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    // A member drained: agents are refused from now on (at once, so they go
                    // to their next upstream), those it serves are sent there, and it stays up
                    // (it holds no lease to hand over).
                    built
                        .shared
                        .drained
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    let links = built.shared.presence.relay_links();
                    for (_, link) in &links {
                        link.do_send(ServerStopping);
                    }
                    let sessions = built.sessions.send(CloseAllSessions).await.unwrap_or(0);
                    tracing::info!(sessions, relay_links = links.len(), "member-drained");
                    let _ = reply.send(sessions + links.len());
                    continue;
                }
            };
            // No new agent comes in meanwhile (they go to their next upstream).
            wss_stop.pause().await;
            // Sessions and relay links would hold the graceful stop until its timeout: close
            // them first (the peers resume from their journals), then let requests in flight
            // finish.
            let links = built.shared.presence.relay_links();
            for (_, link) in &links {
                link.do_send(ServerStopping);
            }
            let sessions = built.sessions.send(CloseAllSessions).await.unwrap_or(0);
            tracing::info!(sessions, relay_links = links.len(), "sessions-closed");
            // On a cluster, a standby takes over at once rather than once the lease runs out.
            let handed = match &drain {
                Some(drain) => drain.hand_over(drain_request.is_some()).await,
                None => Ok(None),
            };
            let Some(reply) = drain_request else {
                break;
            };
            match handed {
                Ok(Some(heir)) => {
                    let _ = reply.send(Ok(heir));
                    break;
                }
                not => {
                    // Nobody took over: this node goes on serving.
                    wss_stop.resume().await;
                    let why = match not {
                        Err(e) => format!("the lease could not be handed over: {e}"),
                        _ => "no standby took the lease: this node stays active".to_owned(),
                    };
                    let _ = reply.send(Err(why));
                }
            }
        }
        tracing::info!(
            timeout_s = SHUTDOWN_TIMEOUT_S,
            "waiting-for-requests-in-flight"
        );
        if let Some(h) = &https_stop {
            h.stop(true).await;
        }
        wss_stop.stop(true).await;
    });
    let (https_served, wss_served) = tokio::join!(
        async {
            let Some(https) = https else {
                return Ok(());
            };
            let served = https.await;
            wss_handle.stop(true).await;
            served
        },
        async {
            let served = wss.await;
            if let Some(h) = &https_handle {
                h.stop(true).await;
            }
            served
        },
    );
    // Best effort: a stale file would point scripts at a port nobody listens on.
    if let Err(e) = ports::remove_stale(dir) {
        tracing::warn!(path = %ports_path.display(), error = %e, "ports-file-not-removed");
    }
    https_served.map_err(|e| RunError::Serve {
        listener: "https",
        source: e,
    })?;
    wss_served.map_err(|e| RunError::Serve {
        listener: "wss",
        source: e,
    })?;
    tracing::info!("server-stopped");
    let waited = waited
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    match waited {
        Some(Ok(())) => Ok(true),
        Some(Err(e)) => Err(RunError::Journal(e)),
        None => Ok(false),
    }
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

impl From<crate::artifacts::OpenError> for RunError {
    fn from(e: crate::artifacts::OpenError) -> Self {
        match e {
            crate::artifacts::OpenError::Io { path, source } => RunError::Read { path, source },
            crate::artifacts::OpenError::Index(reason) => RunError::Read {
                path: PathBuf::from("journal (artifact index)"),
                source: std::io::Error::other(reason),
            },
        }
    }
}

impl From<crate::upgrades::UpgradesError> for RunError {
    fn from(e: crate::upgrades::UpgradesError) -> Self {
        RunError::Read {
            path: PathBuf::from("upgrades"),
            source: std::io::Error::other(e.to_string()),
        }
    }
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
        server_cert::load(&dir).unwrap();

        std::fs::write(dir.join(init::SERVER_KEY), "not a key").unwrap();
        let err = server_cert::load(&dir).unwrap_err();
        assert!(err.to_string().contains("server.key"), "{err}");
    }
}
