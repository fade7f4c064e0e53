//! `tether-server`: command line entry point. Parses arguments, installs the rustls crypto
//! provider, loads and validates configuration, runs the subcommand and maps the outcome to an
//! exit code: 0 clean, 1 runtime failure, 2 bad configuration or usage.
//!
//! # Layout
//! - [`init`]: `tether-server init`, the data directory's CA, certificate, keys and admin token.
//! - [`run`]: `tether-server run`, opening the journal and serving both listeners until a stop
//!   signal.
//! - [`registry`]: `Registry`, enrolled agents and relays, enrollment tokens, presence.
//! - [`api`]: the REST API under `/api/v1` on the HTTPS listener.
//! - [`authz`]: the users' roles and the table of what each may do.
//! - [`api_tokens`], [`api_tokens_api`]: the users' API tokens, and their REST routes.
//! - [`audit`], [`audit_api`]: the audit log of every change requested, and its REST routes.
//! - [`agents_api`]: changing and deleting agents (`/api/v1/agents/{id}`), shared with the web
//!   application.
//! - [`web`]: the web application for people at `/` on the HTTPS listener.
//! - [`users`]: the web application's users and their argon2id password hashes.
//! - [`deployments`]: processes, deployments and jobs: state machine, persistence, REST.
//! - [`plugins`]: uploaded plugin bundles and their index, `/api/v1/plugins`, agents' downloads.
//! - [`artifacts`]: the artifact store, `/api/v1/artifacts`, agents' signed downloads by sha256.
//! - [`upgrades`]: signed agent upgrade packages, rollouts, agents' upgrade states.
//! - [`agent_surface`]: the agent-facing routes under `/agent/v1` on the WSS listener.
//! - [`admin`]: the `/admin/health` and `/metrics` handlers.
//! - [`drain`]: handing an active node's agents and lease to a standby (`POST /admin/drain`).
//! - [`admin_token`]: the admin bearer token and its constant-time check.
//! - [`api_error`]: `ApiError`, the JSON error responses of the HTTPS surface.
//! - [`health`]: actor observation (`JournalWatch`) and the health report, JSON and Prometheus.
//! - [`ports`]: `DIR/ports.json`, the bound listener addresses.

mod admin;
mod admin_token;
mod agent_admin;
mod agent_filter;
mod agent_surface;
mod agents_api;
mod api;
mod api_error;
mod api_tokens;
mod api_tokens_api;
mod app;
mod artifacts;
mod audit;
mod audit_api;
mod authz;
mod background;
mod body_deadline;
mod claims;
mod deployments;
mod drain;
mod enroll_limiter;
mod fleet_metrics;
mod health;
mod init;
mod lease;
mod mail;
mod member_enroll;
mod operations;
mod plugins;
mod ports;
mod presence;
mod reconcile;
mod reconcile_api;
mod registry;
mod relay_certs;
mod run;
mod scheduler;
mod secrets;
mod server_cert;
mod session;
mod state;
mod trust;
mod upgrades;
mod users;
mod users_api;
mod web;
mod work;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use secrets::KeySource;
use tether_shared::config::{self, LoadOptions, ServerConfig, Startup, Storage};

/// The Tether server: holds the plan of what to deploy where.
#[derive(Debug, Parser)]
#[command(name = "tether-server", version, about)]
struct Cli {
    /// Config file layered above <config dir>/server.toml; must exist.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory holding server.toml (a missing file there is fine).
    #[arg(long, global = true, value_name = "DIR", env = "TETHER_CONFIG_DIR", default_value = config::DEFAULT_CONFIG_DIR)]
    config_dir: PathBuf,
    /// Load and validate the configuration, print the effective one and exit.
    #[arg(long, global = true)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the data directory: CA, server certificate, signing key and admin token.
    Init(InitArgs),
    /// Serve: open the journal and listen until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Prepare this machine as another node of a cluster on PostgreSQL: copy the CA,
    /// certificates, keys and admin token from FROM (a node's data directory, or a copy of it
    /// made over a channel you trust), without its journal and ports.
    Join(JoinArgs),
    /// On a cluster on PostgreSQL: hand this node's agents and its lease to a standby before
    /// maintenance (the standby takes over within a second); this node then waits as a
    /// standby. Asks the node running with the data directory.
    Drain(DrainArgs),
    /// The server's TLS certificate.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// The key ring sealing secrets at rest (secrets.key_file; see docs/security.md).
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum SecretsCommand {
    /// Add a new key to the ring: it seals from the server's next start, which seals again
    /// with it every stored secret (health: deployments.secrets_stale counts what is left).
    Rotate,
    /// Remove key ID from the ring, once no stored secret is sealed with it.
    Retire {
        /// The key's id (first word of its line).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Issue a new server certificate (and key) from the same CA, for the names the current one
    /// holds plus any --hostname: nothing agents or operators trust changes, nobody re-enrolls.
    /// A running server serves it within seconds, without a restart.
    Renew(RenewArgs),
}

#[derive(Debug, Args)]
struct RenewArgs {
    /// Data directory [default: server.data_dir from config].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// A name or IP address to add to the certificate; repeatable.
    #[arg(long = "hostname", value_name = "NAME")]
    hostnames: Vec<String>,
}

#[derive(Debug, Args)]
struct DrainArgs {
    /// Data directory of the running node [default: server.data_dir from config].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Data directory made by `tether-server init` [default: server.data_dir from config].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct JoinArgs {
    /// The data directory of a node of the cluster (or a copy of it).
    #[arg(long, value_name = "FROM")]
    from: PathBuf,
    /// This node's data directory, empty or missing [default: server.data_dir from config].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// The cluster's key ring for secrets at rest (a copy of the first node's
    /// secrets.key_file), copied to this node's secrets.key_file; not needed with
    /// secrets.key_command or when that file is already in place.
    #[arg(long, value_name = "FILE")]
    secrets_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct InitArgs {
    /// Data directory [default: server.data_dir from config].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Name or IP address the server certificate is valid for; repeatable [default: localhost, 127.0.0.1].
    #[arg(long = "hostname", value_name = "NAME")]
    hostnames: Vec<String>,
    /// Replace the CA, keys and admin token of an already initialized directory.
    #[arg(long)]
    force: bool,
    /// Start a cluster on this PostgreSQL database (URL or libpq string): its settings are
    /// checked and its schema created before anything is written [default: storage.url from
    /// config, when storage.backend is "postgres"].
    #[arg(long, value_name = "URL")]
    storage: Option<String>,
}

/// mimalloc: measurably faster than glibc malloc on the journal hot path (see `make bench`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let opts = LoadOptions {
        config_dir: Some(cli.config_dir.clone()),
        file: cli.config.clone(),
        env: true,
    };
    let cfg = match config::startup(
        "tether-server",
        config::load_server,
        &opts,
        cli.check_config,
    ) {
        Startup::Run(cfg) => cfg,
        Startup::Exit(code) => return code,
    };
    cfg.log.init_tracing();

    match cli.command {
        Some(Command::Init(args)) => run_init(&cfg, args, &key_source(&cfg, &cli.config_dir)),
        Some(Command::Run(args)) => run_server(&cfg, args, key_source(&cfg, &cli.config_dir)),
        Some(Command::Join(args)) => run_join(&cfg, args, &key_source(&cfg, &cli.config_dir)),
        Some(Command::Drain(args)) => run_drain(&cfg, args),
        Some(Command::Secrets { command }) => {
            run_secrets(command, &key_source(&cfg, &cli.config_dir))
        }
        Some(Command::Cert {
            command: CertCommand::Renew(args),
        }) => run_cert_renew(&cfg, args),
        None => {
            eprintln!("{}", Cli::command().render_help());
            ExitCode::from(2)
        }
    }
}

/// Where the key ring sealing secrets at rest comes from: `[secrets]`, by default
/// `secrets.key` in the config directory (outside the data directory).
fn key_source(cfg: &ServerConfig, config_dir: &std::path::Path) -> KeySource {
    match (&cfg.secrets.key_command, &cfg.secrets.key_file) {
        (Some(command), _) => KeySource::Command(command.clone()),
        (None, Some(file)) => KeySource::File(file.clone()),
        (None, None) => KeySource::File(config_dir.join(secrets::KEY_FILE)),
    }
}

fn run_secrets(command: SecretsCommand, source: &KeySource) -> ExitCode {
    let KeySource::File(path) = source else {
        eprintln!(
            "tether-server secrets: the key ring comes from secrets.key_command: rotate it there"
        );
        return ExitCode::from(2);
    };
    let done = match command {
        SecretsCommand::Rotate => secrets::rotate(path).map(|id| {
            format!(
                "key {id} added to {}: it seals from the next start of each node (copy the file to every node first)",
                path.display()
            )
        }),
        SecretsCommand::Retire { id } => secrets::retire(path, &id)
            .map(|()| format!("key {id} removed from {}", path.display())),
    };
    match done {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tether-server secrets: {e}");
            ExitCode::from(1)
        }
    }
}

fn run_join(cfg: &ServerConfig, args: JoinArgs, keys: &KeySource) -> ExitCode {
    let dir = config::data_dir(args.data.as_deref(), &cfg.server.data_dir);
    if let KeySource::File(path) = keys {
        let copied = match &args.secrets_key {
            Some(from) => std::fs::read(from)
                .and_then(|bytes| tether_shared::identity::write_private_file(path, &bytes)),
            None if path.is_file() => Ok(()),
            None => {
                eprintln!(
                    "tether-server join: {} is missing: give the cluster's key ring for secrets with --secrets-key FILE (a copy of the first node's)",
                    path.display()
                );
                return ExitCode::from(1);
            }
        };
        if let Err(e) = copied.map_err(|e| e.to_string()).and_then(|()| {
            secrets::KeyRing::load(keys)
                .map(drop)
                .map_err(|e| e.to_string())
        }) {
            eprintln!("tether-server join: secrets key ring: {e}");
            return ExitCode::from(1);
        }
    }
    match init::join(&args.from, &dir) {
        Ok(files) => {
            println!(
                "{} joined: {files} files copied from {}. Configure [storage] (the cluster's database, this node's node_name) and server.files_dir, then start it: it waits as a standby.",
                dir.display(),
                args.from.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tether-server join: {e}");
            ExitCode::from(1)
        }
    }
}

fn run_init(cfg: &ServerConfig, args: InitArgs, keys: &KeySource) -> ExitCode {
    let hostnames = if args.hostnames.is_empty() {
        init::DEFAULT_HOSTNAMES.map(String::from).to_vec()
    } else {
        args.hostnames
    };
    let opts = init::InitOptions {
        data_dir: config::data_dir(args.data.as_deref(), &cfg.server.data_dir),
        hostnames,
        force: args.force,
    };
    // The database first: a refused one leaves the data directory untouched.
    let database = match (&args.storage, &cfg.storage) {
        (Some(url), Storage::Postgres { ca_file, .. }) => Some((url.clone(), ca_file.clone())),
        (Some(url), Storage::Sled) => Some((url.clone(), None)),
        (None, Storage::Postgres { url, ca_file, .. }) => {
            Some((url.expose().clone(), ca_file.clone()))
        }
        (None, Storage::Sled) => None,
    };
    if let Some((url, ca_file)) = &database {
        let opened = tether_shared::journal::PgStore::open(&tether_shared::journal::PgOptions {
            url: url.clone(),
            ca_file: ca_file.clone(),
            pool_size: 1,
        });
        if let Err(e) = opened {
            eprintln!(
                "tether-server init: the database {}: {e}",
                config::masked_url(url)
            );
            return ExitCode::from(1);
        }
        println!(
            "database {}: settings checked, schema ready",
            config::masked_url(url)
        );
    }
    match init::initialize(&opts) {
        Ok(done) => {
            match secrets::KeyRing::load(keys) {
                Ok(_) => {
                    if let KeySource::File(path) = keys {
                        eprintln!(
                            "secrets key ring: {} (back it up apart from the data directory)",
                            path.display()
                        );
                    }
                }
                Err(e) => {
                    eprintln!("tether-server init: {e}");
                    return ExitCode::from(1);
                }
            }
            println!("admin token: {}", done.admin_token.expose());
            // The web application's first user; change the password after the first login.
            println!("admin password: {}", done.admin_password.expose());
            if let (Some((url, _)), Some(_)) = (&database, &args.storage) {
                println!(
                    "add to server.toml (with the password), then start it; other nodes: tether-server join\n[storage]\nbackend = \"postgres\"\nurl = \"{}\"",
                    config::masked_url(url)
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tether-server init: {e}");
            ExitCode::from(1)
        }
    }
}

fn run_cert_renew(cfg: &ServerConfig, args: RenewArgs) -> ExitCode {
    let dir = config::data_dir(args.data.as_deref(), &cfg.server.data_dir);
    match init::renew_server_cert(&dir, &args.hostnames) {
        Ok(done) => {
            println!(
                "server certificate renewed for {} (valid {} days); a running server serves it within {} s",
                done.hostnames.join(", "),
                tether_shared::tls::SERVER_CERT_VALIDITY_DAYS,
                server_cert::CERT_CHECK_INTERVAL.as_secs()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tether-server cert renew: {e}");
            ExitCode::from(1)
        }
    }
}

fn run_drain(cfg: &ServerConfig, args: DrainArgs) -> ExitCode {
    let dir = config::data_dir(args.data.as_deref(), &cfg.server.data_dir);
    match drain::request_drain(&dir) {
        Ok(drain::Drained::Active { heir, epoch }) => {
            println!("drained: {heir} is active (epoch {epoch}); this node waits as a standby");
            ExitCode::SUCCESS
        }
        Ok(drain::Drained::Member { sessions }) => {
            println!("drained: {sessions} sessions closed (their agents went to their next upstream); this member takes no more agents until it is restarted");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tether-server drain: {e}");
            ExitCode::from(1)
        }
    }
}

fn run_server(cfg: &ServerConfig, args: RunArgs, secrets: KeySource) -> ExitCode {
    let opts = run::RunOptions {
        data_dir: config::data_dir(args.data.as_deref(), &cfg.server.data_dir),
        listen_https: cfg.listen.https,
        listen_wss: cfg.listen.wss,
        heartbeat_interval: cfg.server.heartbeat_interval,
        heartbeat_timeout: cfg.server.heartbeat_timeout,
        max_handshakes: cfg.server.max_handshakes_in_flight,
        window: cfg.server.max_unacked,
        retention: deployments::Retention::from_config(&cfg.retention),
        prune_interval: cfg.retention.prune_interval,
        audit_keep: cfg.retention.keep_audit_entries,
        audit_keep_days: cfg.retention.keep_audit_days,
        mark_stale_after: std::time::Duration::from_secs(cfg.retention.mark_stale_after_s),
        remove_stale_after: std::time::Duration::from_secs(cfg.retention.remove_stale_after_s),
        relay_certificate_lifetime: cfg.server.relay_certificate_lifetime,
        journal_cache_bytes: cfg.server.journal_cache_mib.saturating_mul(1024 * 1024),
        storage: cfg.storage.clone(),
        files_dir: cfg.server.files_dir.clone(),
        max_running_jobs_per_agent: cfg.server.max_running_jobs_per_agent,
        secrets,
    };
    match run::run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-server run: {e}");
            ExitCode::from(1)
        }
    }
}
