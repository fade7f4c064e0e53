//! `tether-relay`: command line entry point. Parses arguments, installs the rustls crypto
//! provider, loads and validates configuration and maps the outcome to an exit code: 0 clean,
//! 1 runtime failure, 2 bad configuration or usage.
//!
//! # Layout
//! - [`install`]: `tether-relay install`, enrollment (identity key, CA-signed TLS certificate).
//! - [`run`]: `tether-relay run`, the listeners and the actors below.
//! - [`upstream`]: `Upstream`, the one link to the parent, and the channel table.
//! - [`downstream`]: `AgentDown`, one agent's WebSocket, forwarded as a channel.
//! - [`child_relay`]: `ChildRelay`, a child relay's link, whose channels become ours.
//! - [`bulk`], [`cache`]: agents' HTTPS forwarded upstream, with a sha256-keyed disk cache.
//! - [`upgrade`]: the relay's own upgrades (staging, re-exec, trial, rollback at start).
//! - [`state`]: `RelayState` (`DIR/relay.json`) and the data directory's file names.

mod bulk;
mod cache;
mod certificate;
mod child_relay;
mod downstream;
mod install;
mod metrics;
mod run;
mod state;
mod upgrade;
mod upstream;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use tether_shared::config::{self, LoadOptions, Startup};

/// The Tether relay: carries agents' connections across network boundaries, connecting out to the next hop.
#[derive(Debug, Parser)]
#[command(name = "tether-relay", version, about)]
struct Cli {
    /// Config file layered above <config dir>/relay.toml; must exist.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory holding relay.toml (a missing file there is fine).
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
    /// Enroll this relay with the server (directly or through a parent relay).
    Install(install::InstallArgs),
    /// Carry agents' connections upstream until SIGTERM.
    Run(RunArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Data directory [default: relay.data_dir from config].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
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
    let cfg = match config::startup("tether-relay", config::load_relay, &opts, cli.check_config) {
        Startup::Run(cfg) => cfg,
        Startup::Exit(code) => return code,
    };
    // The egress proxy (config, else HTTPS_PROXY) for every dial of this process.
    if let Err(e) =
        tether_shared::proxy::install_from(cfg.relay.proxy.expose(), &cfg.relay.no_proxy)
    {
        eprintln!("tether-relay: configuration error: {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Some(Command::Install(args)) => {
            cfg.log.init_tracing();
            let data = config::data_dir(args.data.as_deref(), &cfg.relay.data_dir);
            match install::install(&args, &data) {
                Ok(relay_id) => {
                    println!(
                        "installed relay {} as {relay_id} in {}",
                        args.name,
                        data.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tether-relay install: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Some(Command::Run(args)) => {
            cfg.log.init_tracing();
            let data = config::data_dir(args.data.as_deref(), &cfg.relay.data_dir);
            match run::run(&cfg, &data) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tether-relay run: {e}");
                    ExitCode::from(1)
                }
            }
        }
        None => {
            eprintln!("{}", Cli::command().render_help());
            ExitCode::from(2)
        }
    }
}
