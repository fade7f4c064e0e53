//! `tether`: the operators' command-line client for the server's REST API. Parses arguments,
//! installs the rustls crypto provider, resolves the connection (login file < environment <
//! flags), runs one command over the blocking HTTPS client of `tether-shared` (no actix
//! runtime) and maps the outcome to an exit code: 0 ok, 1 runtime failure, 2 usage (bad
//! arguments, not logged in), 3 a deployment that ended cancelled.
//!
//! # Layout
//! - [`commands`]: one module per command group, each turning server answers into output.
//! - [`config`]: the login file (`$XDG_CONFIG_HOME/tether/cli.json`, 0600) and the effective
//!   connection.
//! - [`client`]: `Client`, authenticated JSON and text requests, and streamed uploads.
//! - [`upload`]: hashing a file and uploading it with a progress bar.
//! - [`follow`]: waiting for a deployment while streaming its step logs.
//! - [`output`]: tables, JSON and the formatting of times and sizes.
//! - [`error`]: `CliError` and its exit codes.
//!
//! Printing is this binary's job: commands write their results to stdout (tables, or JSON with
//! `--json`), and notes, progress and errors to stderr.

mod client;
mod commands;
mod config;
mod error;
mod follow;
mod output;
mod upload;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::error::CliError;

const EXIT_CODES: &str = "Exit codes: 0 success; 1 failure (refused by the server, unreachable, \
a deployment that failed); 2 usage (bad arguments, not logged in); 3 a deployment that ended \
cancelled.";

const DEPLOY_EXIT_CODES: &str = "While waiting, each step's log is printed as it grows, each \
line prefixed [agent/step]. Ctrl-C stops waiting, not the deployment (`tether deployments wait \
ID` follows it again).\n\nExit codes: 0 the deployment succeeded (or, with --no-wait, was \
created); 1 it failed, or it could not be created (unknown agent, no such process); 2 usage; \
3 it was cancelled.";

/// Operate a Tether server: agents, relays, enrollment tokens, plugins, artifacts, processes,
/// deployments and health, through its REST API.
#[derive(Debug, Parser)]
#[command(name = "tether", version, about, after_help = EXIT_CODES)]
struct Cli {
    /// The server's HTTPS base URL, e.g. https://tether.example.com:8443 [default: the one
    /// `tether login` stored].
    #[arg(long, global = true, env = "TETHER_SERVER", value_name = "URL")]
    server: Option<String>,
    /// The CA certificate (PEM) the server's certificate must be signed by [default: the one
    /// `tether login` stored].
    #[arg(long, global = true, env = "TETHER_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Print JSON (the server's answer) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Print the effective connection settings (token masked) and exit: 0 if complete, 2 if
    /// not logged in.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check an admin token against the server and store server, CA and token (0600) for the
    /// other commands. The token comes from --token, else TETHER_TOKEN, else standard input.
    Login(LoginArgs),
    /// Forget the stored login.
    Logout,
    /// Enrolled agents.
    Agents {
        #[command(subcommand)]
        command: Option<AgentsCommand>,
        /// Only agents meeting FIELD=VALUE (repeatable, all must hold): a fact (os, arch,
        /// cpus, memory_mb, ...), name, status, version, tag, maintenance or property.KEY;
        /// also !=, <, <=, >, >= and * wildcards.
        #[arg(long = "where", value_name = "CONDITION", global = true)]
        conditions: Vec<String>,
    },
    /// Enrolled relays.
    Relays {
        #[command(subcommand)]
        command: Option<RelaysCommand>,
    },
    /// Users of the web application (one role: every user may do everything).
    Users {
        #[command(subcommand)]
        command: Option<UsersCommand>,
    },
    /// Enrollment tokens.
    Tokens {
        #[command(subcommand)]
        command: Option<TokensCommand>,
    },
    /// The users' API tokens (for scripts and `tether login`), each with a role no higher than
    /// its user's.
    ApiTokens {
        #[command(subcommand)]
        command: Option<ApiTokensCommand>,
    },
    /// The server's signing key and CAs: where a rollover stands, and its steps (begin,
    /// switch, finish). The stored login follows the server's CA.
    Trust {
        #[command(subcommand)]
        command: Option<TrustCommand>,
    },
    /// Plugin bundles.
    Plugins {
        #[command(subcommand)]
        command: Option<PluginsCommand>,
    },
    /// Artifacts.
    Artifacts {
        #[command(subcommand)]
        command: Option<ArtifactsCommand>,
    },
    /// Agent and relay upgrade packages and rollouts.
    Upgrades {
        #[command(subcommand)]
        command: Option<UpgradesCommand>,
    },
    /// Processes (ordered steps to deploy).
    Processes {
        #[command(subcommand)]
        command: Option<ProcessesCommand>,
    },
    /// Run a process on agents and, unless --no-wait, wait for it, streaming its logs.
    #[command(after_help = DEPLOY_EXIT_CODES)]
    Deploy(DeployArgs),
    /// Deployments: list, show, cancel, retry, wait.
    Deployments {
        #[command(subcommand)]
        command: Option<DeploymentsCommand>,
    },
    /// The log of one step of one agent's job in a deployment.
    Logs {
        /// The deployment id.
        id: String,
        /// The agent (name or id).
        agent: String,
        /// The step (name or index).
        step: String,
    },
    /// The server's health: actors, sessions, journal, agents. Exits 1 when a server actor
    /// is not running, the journal is poisoned or an agent's handshake is refused.
    Health,
    /// What agents reported after the server was found behind them (restored from a backup):
    /// what was lost, and results for jobs the server does not know.
    Reconciliation {
        #[command(subcommand)]
        command: Option<ReconciliationCommand>,
    },
    /// The audit log: every change requested of the server (who, from where, what, result),
    /// oldest first.
    Audit {
        /// Entries numbered after this one.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many (1..1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only entries whose actor contains this text (`user ops-1`, `admin token`).
        #[arg(long)]
        actor: Option<String>,
        /// Only entries whose path contains this text.
        #[arg(long)]
        path: Option<String>,
        /// JSON lines, up to 10,000 entries (for a SIEM).
        #[arg(long)]
        export: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ReconciliationCommand {
    /// Every agent's reconciliation, and the orphan results (the default).
    List,
    /// Forget an agent's reconciliation and its orphan results, once reviewed.
    Dismiss {
        /// Name or id.
        agent: String,
    },
}

#[derive(Debug, Args)]
struct LoginArgs {
    /// The admin token (DATA/admin.token on the server); prefer TETHER_TOKEN or standard
    /// input, which other users cannot see in the process list.
    #[arg(long, value_name = "TOKEN", conflicts_with = "user")]
    token: Option<String>,
    /// Log in as this web user instead (the password on standard input): the server makes an
    /// API token for you, with your role, valid 30 days, and it is stored.
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
}

#[derive(Debug, Subcommand)]
enum AgentsCommand {
    /// Every agent (or those meeting --where): name, status, version, system, tags, relay
    /// path, last seen (the default).
    List,
    /// One agent, by name or id.
    Show {
        /// Name or id.
        agent: String,
    },
    /// Delete an agent: its session is closed and its key refused from then on. Refused while
    /// it has unfinished jobs unless --force, which fails them first.
    Delete {
        /// Name or id.
        agent: String,
        /// Fail its unfinished jobs ("agent deleted") and delete it anyway.
        #[arg(long)]
        force: bool,
    },
    /// Put an agent in maintenance (`on`): no new job starts there, its queued jobs wait (or
    /// are skipped, for deployments made with --skip-maintenance); `off` ends it.
    Maintenance {
        /// Name or id.
        agent: String,
        #[arg(value_enum)]
        state: OnOff,
        /// Why (shown with it), with `on`.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// How many jobs an agent runs at once (1..256); 0 goes back to the server's
    /// `server.max_running_jobs_per_agent`.
    Concurrency {
        /// Name or id.
        agent: String,
        jobs: u32,
    },
    /// Test the connection: a round trip to the agent through its relays.
    Ping {
        /// Name or id.
        agent: String,
    },
    /// Restart the agent's worker (its monitor stays and starts a new one at once).
    Restart {
        /// Name or id.
        agent: String,
    },
    /// The agent's recent log lines (its worker's, kept in memory).
    Log {
        /// Name or id.
        agent: String,
    },
    /// A diagnostics bundle: versions, facts, configuration (secrets masked), journal.
    Diagnostics {
        /// Name or id.
        agent: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
enum RelaysCommand {
    /// Every relay: name, status, version, path, agents carried (the default).
    List,
    /// Revoke a relay: its key stops authenticating, its link and every connection it carries
    /// close at once (its agents fail over to their next upstream).
    Delete {
        /// Name or id.
        relay: String,
    },
    /// Put a relay in maintenance (`on`): no new job starts on the agents behind it; `off`
    /// ends it.
    Maintenance {
        /// Name or id.
        relay: String,
        #[arg(value_enum)]
        state: OnOff,
        /// Why (shown with it), with `on`.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TrustCommand {
    /// The trust set in force, its phase, who holds it and what the next step waits for (the
    /// default).
    Status,
    /// Make a new signing key, server CA and relay CA, trusted alongside the old ones; every
    /// agent and relay is sent both.
    Begin,
    /// Sign and certify with the new keys (the old stay trusted). Waits until every agent and
    /// relay holds both, unless --force (those behind then need a reinstall).
    Switch {
        #[arg(long)]
        force: bool,
    },
    /// Trust the new keys alone. Waits until every relay serves a certificate from the new
    /// relay CA and every peer holds the set, unless --force.
    Finish {
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Every user: name, created, last login (the default).
    List,
    /// Create a user; the password (at least 12 characters) is read from standard input.
    Create {
        /// The user name (A-Z a-z 0-9 . _ -).
        name: String,
        /// What the user may do: viewer (reads), deployer (also processes, deployments,
        /// artifacts, plugins) or admin (everything).
        #[arg(long, default_value = "viewer")]
        role: String,
    },
    /// Give a user another role (viewer, deployer or admin; the last admin stays one).
    Role {
        /// The user name.
        name: String,
        /// viewer, deployer or admin.
        role: String,
    },
    /// Delete a user and end its web sessions (not the last user).
    Delete {
        /// The user name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// The tokens that can still enroll: id, role, uses left, expiry; never the token itself
    /// (the default).
    List,
    /// Revoke a token by its id: it enrolls nobody from then on (peers it enrolled stay).
    Revoke {
        /// The id `tether tokens list` shows.
        id: String,
    },
    /// Create an enrollment token and print it (the only time it is shown).
    Create {
        /// How many enrollments it allows.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
        /// Seconds it stays valid (at most 2592000, 30 days).
        #[arg(long = "ttl", value_name = "SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
        ttl_s: u64,
        /// What it enrolls.
        #[arg(long, value_enum, default_value_t = Role::Agent)]
        role: Role,
    },
}

#[derive(Debug, Subcommand)]
enum ApiTokensCommand {
    /// Every API token: id, name, user, role, expiry; never the token itself (the default).
    List,
    /// Make a token for a user and print it (the only time it is shown).
    Create {
        /// The user it acts for.
        user: String,
        /// A name to know it by (A-Z a-z 0-9 . _ -).
        name: String,
        /// viewer, deployer or admin; no higher than the user's (default: the user's).
        #[arg(long)]
        role: Option<String>,
        /// Seconds it stays valid (default: until revoked).
        #[arg(long = "expires-in", value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        expires_in_s: Option<u64>,
    },
    /// Revoke a token by its id.
    Revoke {
        /// The id `tether api-tokens list` shows.
        id: String,
    },
}

/// What an enrollment token enrolls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    Agent,
    Relay,
}

#[derive(Debug, Subcommand)]
enum PluginsCommand {
    /// Upload a plugin bundle (tar.gz with plugin.toml at its root).
    Upload {
        /// The bundle.
        file: PathBuf,
    },
    /// Every uploaded plugin version (the default).
    List,
}

#[derive(Debug, Subcommand)]
enum UpgradesCommand {
    /// Upload FILE (an agent or relay binary) as upgrade package VERSION (MAJOR.MINOR.PATCH);
    /// the server signs it.
    Upload {
        /// Package version, newer than the agents' (or relays') to be accepted by them.
        version: String,
        /// The agent (or relay) binary.
        file: PathBuf,
        /// What the binary is: `agent` or `relay`.
        #[arg(long, value_name = "COMPONENT", default_value = "agent", value_parser = ["agent", "relay"])]
        component: String,
    },
    /// Every upgrade package (the default).
    List,
    /// Upgrade agents (by name or tag) or relays (by name) to VERSION; exit 1 if any rolled
    /// back or refused.
    Rollout {
        /// Package version.
        version: String,
        /// An agent name; repeatable.
        #[arg(long = "agent", value_name = "NAME", required_unless_present_any = ["tags", "relays"])]
        agents: Vec<String>,
        /// A tag: every agent carrying it; repeatable.
        #[arg(long = "tag", value_name = "TAG", conflicts_with = "agents")]
        tags: Vec<String>,
        /// A relay name (a relay package's rollout); repeatable.
        #[arg(long = "relay", value_name = "NAME", conflicts_with_all = ["agents", "tags"])]
        relays: Vec<String>,
        /// Wait until every target is upgraded, rolled back or refused.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ArtifactsCommand {
    /// Upload FILE as artifact NAME VERSION; its sha256 is sent and checked by the server.
    Upload {
        /// Artifact name.
        name: String,
        /// Artifact version.
        version: String,
        /// The content.
        file: PathBuf,
    },
    /// Every artifact version with its sha256 and size (the default).
    List,
}

#[derive(Debug, Subcommand)]
enum ProcessesCommand {
    /// Every process (the default).
    List,
    /// One process and its steps.
    Show {
        /// The process name.
        name: String,
    },
    /// Create a process, or a new version of it, from a JSON file
    /// ({"name","steps":[{"name","plugin","step","properties":{}}]}).
    Create {
        /// The JSON file; `-` reads standard input.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("targets").required(true).args(["agents", "tags"]))]
struct DeployArgs {
    /// The process to run.
    process: String,
    /// Run on this agent (name or id); repeatable.
    #[arg(long = "agent", value_name = "NAME")]
    agents: Vec<String>,
    /// Run on every agent having all of these tags; repeatable.
    #[arg(long = "tag", value_name = "TAG", conflicts_with = "agents")]
    tags: Vec<String>,
    /// A deployment property (`${KEY}` in step properties); repeatable. Names ending in
    /// `_secret` are masked everywhere.
    #[arg(long = "prop", value_name = "KEY=VALUE", value_parser = parse_property)]
    properties: Vec<(String, String)>,
    /// Print the deployment id and return at once.
    #[arg(long)]
    no_wait: bool,
    /// Skip agents in maintenance (their jobs end cancelled) instead of waiting for them.
    #[arg(long)]
    skip_maintenance: bool,
    /// With --tag: any N of those agents (a pool), connected ones not in maintenance first.
    #[arg(long, value_name = "N", requires = "tags")]
    count: Option<u32>,
    /// Rolling: N agents at a time, each batch once the one before it ended.
    #[arg(long, value_name = "N", conflicts_with = "batch_percent")]
    batch_size: Option<u32>,
    /// Rolling: this share (1 to 100) of the agents at a time, rounded up.
    #[arg(long, value_name = "PERCENT")]
    batch_percent: Option<u32>,
    /// Rolling: go on with later batches after a failed job (they are cancelled otherwise).
    #[arg(long)]
    keep_going: bool,
    /// Seconds from now by which each job must have started, or it expires (10 to 2592000;
    /// default 24 h after it is sent).
    #[arg(long, value_name = "SECONDS")]
    deadline: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum DeploymentsCommand {
    /// Every deployment (the default).
    List,
    /// One deployment: status, jobs, steps.
    Show {
        /// The deployment id.
        id: String,
    },
    /// Cancel a deployment: running steps are killed, the rest end cancelled.
    Cancel {
        /// The deployment id.
        id: String,
    },
    /// Run a finished deployment again on the agents whose jobs did not succeed (the same
    /// steps, as they ran): prints the new deployment's id.
    Retry {
        /// The deployment id.
        id: String,
        /// Follow the new deployment to its end; exit codes as for `tether deploy`.
        #[arg(long)]
        wait: bool,
    },
    /// Wait for a deployment, streaming its logs; exit codes as for `tether deploy`.
    Wait {
        /// The deployment id.
        id: String,
    },
    /// Delete finished deployments now (their jobs and logs with them); without options, by
    /// the server's `[retention]` policy. Deployments still running are never pruned.
    Prune {
        /// Those that ended more than DAYS days ago (0: any age).
        #[arg(long, value_name = "DAYS")]
        older_than: Option<u64>,
        /// Keep at most N finished deployments, the newest.
        #[arg(long, value_name = "N")]
        keep: Option<usize>,
    },
}

/// `KEY=VALUE`, with a non-empty key.
fn parse_property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(cli) {
        Ok(code) => code,
        Err(CliError::Stdout(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(1),
        Err(e) => {
            eprintln!("tether: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs the command `cli` names.
fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let settings = config::Overrides {
        server: cli.server,
        ca: cli.ca,
        token: std::env::var("TETHER_TOKEN").ok().filter(|t| !t.is_empty()),
    };
    let json = cli.json;
    if cli.check_config {
        return commands::login::check_config(&settings, json);
    }
    let Some(command) = cli.command else {
        return Err(CliError::Usage(
            "a command is needed; see `tether --help`".to_owned(),
        ));
    };
    let connect = || -> Result<client::Client, CliError> {
        let connection = config::resolve(&settings)?;
        Ok(client::Client::new(&connection)?)
    };
    use commands::*;
    match command {
        Command::Login(args) => login::login(&settings, args.token, args.user, json),
        Command::Logout => login::logout(json),
        Command::Agents {
            command,
            conditions,
        } => match command {
            None | Some(AgentsCommand::List) => agents::list(&connect()?, &conditions, json),
            Some(AgentsCommand::Show { agent }) => agents::show(&connect()?, &agent, json),
            Some(AgentsCommand::Delete { agent, force }) => {
                agents::delete(&connect()?, &agent, force, json)
            }
            Some(AgentsCommand::Maintenance {
                agent,
                state,
                reason,
            }) => agents::maintenance_of(
                &connect()?,
                agents::Peer::Agent,
                &agent,
                state == OnOff::On,
                reason,
                json,
            ),
            Some(AgentsCommand::Concurrency { agent, jobs }) => {
                agents::concurrency(&connect()?, &agent, jobs, json)
            }
            Some(AgentsCommand::Ping { agent }) => {
                agents::operate(&connect()?, &agent, "ping", json)
            }
            Some(AgentsCommand::Restart { agent }) => {
                agents::operate(&connect()?, &agent, "restart", json)
            }
            Some(AgentsCommand::Log { agent }) => agents::operate(&connect()?, &agent, "log", json),
            Some(AgentsCommand::Diagnostics { agent }) => {
                agents::operate(&connect()?, &agent, "diagnostics", json)
            }
        },
        Command::Relays { command } => match command {
            None | Some(RelaysCommand::List) => relays::list(&connect()?, json),
            Some(RelaysCommand::Delete { relay }) => relays::delete(&connect()?, &relay, json),
            Some(RelaysCommand::Maintenance {
                relay,
                state,
                reason,
            }) => agents::maintenance_of(
                &connect()?,
                agents::Peer::Relay,
                &relay,
                state == OnOff::On,
                reason,
                json,
            ),
        },
        Command::Trust { command } => {
            let store_ca = settings.ca.is_none();
            match command {
                None | Some(TrustCommand::Status) => trust::status(&connect()?, store_ca, json),
                Some(TrustCommand::Begin) => {
                    trust::step(&connect()?, "begin", false, store_ca, json)
                }
                Some(TrustCommand::Switch { force }) => {
                    trust::step(&connect()?, "switch", force, store_ca, json)
                }
                Some(TrustCommand::Finish { force }) => {
                    trust::step(&connect()?, "finish", force, store_ca, json)
                }
            }
        }
        Command::Users { command } => match command {
            None | Some(UsersCommand::List) => users::list(&connect()?, json),
            Some(UsersCommand::Create { name, role }) => {
                users::create(&connect()?, &name, &role, json)
            }
            Some(UsersCommand::Role { name, role }) => users::role(&connect()?, &name, &role, json),
            Some(UsersCommand::Delete { name }) => users::delete(&connect()?, &name, json),
        },
        Command::Tokens { command } => match command {
            None | Some(TokensCommand::List) => tokens::list(&connect()?, json),
            Some(TokensCommand::Revoke { id }) => tokens::revoke(&connect()?, &id, json),
            Some(TokensCommand::Create { uses, ttl_s, role }) => {
                let role = match role {
                    Role::Agent => "agent",
                    Role::Relay => "relay",
                };
                tokens::create(&connect()?, uses, ttl_s, role, json)
            }
        },
        Command::ApiTokens { command } => match command {
            None | Some(ApiTokensCommand::List) => api_tokens::list(&connect()?, json),
            Some(ApiTokensCommand::Create {
                user,
                name,
                role,
                expires_in_s,
            }) => api_tokens::create(
                &connect()?,
                &user,
                &name,
                role.as_deref(),
                expires_in_s,
                json,
            ),
            Some(ApiTokensCommand::Revoke { id }) => api_tokens::revoke(&connect()?, &id, json),
        },
        Command::Plugins { command } => match command {
            Some(PluginsCommand::Upload { file }) => plugins::upload(&connect()?, &file, json),
            None | Some(PluginsCommand::List) => plugins::list(&connect()?, json),
        },
        Command::Artifacts { command } => match command {
            Some(ArtifactsCommand::Upload {
                name,
                version,
                file,
            }) => artifacts::upload(&connect()?, &name, &version, &file, json),
            None | Some(ArtifactsCommand::List) => artifacts::list(&connect()?, json),
        },
        Command::Upgrades { command } => match command {
            Some(UpgradesCommand::Upload {
                version,
                file,
                component,
            }) => upgrades::upload(&connect()?, &version, &file, &component, json),
            None | Some(UpgradesCommand::List) => upgrades::list(&connect()?, json),
            Some(UpgradesCommand::Rollout {
                version,
                agents,
                tags,
                relays,
                wait,
            }) => {
                let targets = upgrades::Targets {
                    agents: &agents,
                    tags: &tags,
                    relays: &relays,
                };
                upgrades::rollout(&connect()?, &version, &targets, wait, json)
            }
        },
        Command::Processes { command } => match command {
            None | Some(ProcessesCommand::List) => processes::list(&connect()?, json),
            Some(ProcessesCommand::Show { name }) => processes::show(&connect()?, &name, json),
            Some(ProcessesCommand::Create { file }) => processes::create(&connect()?, &file, json),
        },
        Command::Deploy(args) => {
            let request = deploy::Request {
                process: args.process,
                agents: args.agents,
                tags: args.tags,
                properties: args.properties.into_iter().collect(),
                skip_maintenance: args.skip_maintenance,
                count: args.count,
                batch_size: args.batch_size,
                batch_percent: args.batch_percent,
                keep_going: args.keep_going,
                deadline_s: args.deadline,
            };
            deploy::deploy(&connect()?, &request, !args.no_wait, json)
        }
        Command::Deployments { command } => match command {
            None | Some(DeploymentsCommand::List) => deployments::list(&connect()?, json),
            Some(DeploymentsCommand::Show { id }) => deployments::show(&connect()?, &id, json),
            Some(DeploymentsCommand::Cancel { id }) => deployments::cancel(&connect()?, &id, json),
            Some(DeploymentsCommand::Retry { id, wait }) => {
                deploy::retry(&connect()?, &id, wait, json)
            }
            Some(DeploymentsCommand::Wait { id }) => deploy::wait(&connect()?, &id, json),
            Some(DeploymentsCommand::Prune { older_than, keep }) => {
                deployments::prune(&connect()?, older_than, keep, json)
            }
        },
        Command::Logs { id, agent, step } => {
            deployments::logs(&connect()?, &id, &agent, &step, json)
        }
        Command::Health => health::show(&connect()?, json),
        Command::Audit {
            after,
            limit,
            actor,
            path,
            export,
        } => audit::show(
            &connect()?,
            &audit::AuditFilter {
                after,
                limit,
                actor: actor.as_deref(),
                path: path.as_deref(),
            },
            export,
            json,
        ),
        Command::Reconciliation { command } => match command {
            None | Some(ReconciliationCommand::List) => reconciliation::list(&connect()?, json),
            Some(ReconciliationCommand::Dismiss { agent }) => {
                reconciliation::dismiss(&connect()?, &agent, json)
            }
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn properties_need_a_key() {
        assert_eq!(
            parse_property("a=b=c").unwrap(),
            ("a".to_owned(), "b=c".to_owned())
        );
        assert_eq!(
            parse_property("a=").unwrap(),
            ("a".to_owned(), String::new())
        );
        assert!(parse_property("=b").is_err());
        assert!(parse_property("ab").is_err());
    }

    #[test]
    fn deploy_needs_exactly_one_kind_of_target() {
        let parse = |args: &[&str]| Cli::try_parse_from(args.iter().copied());
        assert!(parse(&["tether", "deploy", "p", "--agent", "a", "--agent", "b"]).is_ok());
        assert!(parse(&["tether", "deploy", "p", "--tag", "web", "--no-wait"]).is_ok());
        assert!(parse(&["tether", "deploy", "p"]).is_err());
        assert!(parse(&["tether", "deploy", "p", "--agent", "a", "--tag", "t"]).is_err());
        assert!(parse(&["tether", "deploy", "p", "--agent", "a", "--prop", "x"]).is_err());
    }
}
