//! `tether-agent`: command line entry point. Parses arguments, installs the rustls crypto
//! provider, loads and validates configuration and maps the outcome to an exit code: 0 clean,
//! 1 runtime failure, 2 bad configuration or usage.
//!
//! # Layout
//! - [`monitor`]: `tether-agent run`, the monitor process supervising the worker process.
//! - [`install`]: `tether-agent install`, enrollment and the data directory it leaves.
//! - [`state`]: `AgentState` (`DIR/agent.json`) and the data directory's file names.
//! - [`upgrade`]: the files in `DIR/upgrade/` through which worker and monitor hand over an
//!   upgrade, and the reserved exit code.
//! - [`worker`]: `tether-agent worker`, the process the monitor starts: journal, uplink, streams.

mod install;
mod monitor;
mod state;
mod upgrade;
mod worker;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use tether_shared::config::{self, AgentConfig, LoadOptions, Startup};

/// The Tether agent: runs deployment steps on this machine, connecting out to servers or relays.
#[derive(Debug, Parser)]
#[command(name = "tether-agent", version, about)]
struct Cli {
    /// Config file layered above <config dir>/agent.toml; must exist.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory holding agent.toml (a missing file there is fine).
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
    /// The monitor: start the worker process and keep it running until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Enroll this machine with a server or relay and prepare the data directory.
    Install(install::InstallArgs),
    /// The worker process (started by `run`; not for direct use).
    #[command(hide = true)]
    Worker(WorkerArgs),
}

#[derive(Debug, Args)]
struct WorkerArgs {
    /// Data directory made by `tether-agent install` [default: agent.data_dir from config].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Data directory made by `tether-agent install` [default: agent.data_dir from config].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Test only: run this program as the worker instead of `tether-agent worker`.
    #[arg(long, hide = true, env = "TETHER_AGENT_WORKER", value_name = "PROGRAM")]
    worker_program: Option<PathBuf>,
    /// Test only: the test worker's arguments, separated by whitespace.
    #[arg(
        long,
        hide = true,
        env = "TETHER_AGENT_WORKER_ARGS",
        value_name = "ARGS",
        allow_hyphen_values = true
    )]
    worker_args: Option<String>,
}

// The agent keeps the system allocator: mimalloc's eagerly committed per-thread segments cost
// the (multi-threaded) worker about 40 MiB of RSS, against a 20 MiB budget for an idle agent,
// and the agent's journal carries far less than the server's (see `make bench`).

fn main() -> ExitCode {
    let cli = Cli::parse();
    let opts = LoadOptions {
        config_dir: Some(cli.config_dir.clone()),
        file: cli.config.clone(),
        env: true,
    };
    let cfg = match config::startup("tether-agent", config::load_agent, &opts, cli.check_config) {
        Startup::Run(cfg) => cfg,
        Startup::Exit(code) => return code,
    };
    // The egress proxy (config, else HTTPS_PROXY) for every dial of this process.
    if let Err(e) =
        tether_shared::proxy::install_from(cfg.agent.proxy.expose(), &cfg.agent.no_proxy)
    {
        eprintln!("tether-agent: configuration error: {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Some(Command::Run(args)) => run_monitor(&cfg, cli.config.as_deref(), &cli.config_dir, args),
        Some(Command::Install(args)) => run_install(&cfg, &args),
        Some(Command::Worker(args)) => run_worker(&cfg, args),
        None => {
            eprintln!("{}", Cli::command().render_help());
            ExitCode::from(2)
        }
    }
}

/// `tether-agent run`: the worker is this executable's `worker` subcommand with the same data
/// and config, unless the test-only `TETHER_AGENT_WORKER` names another program.
fn run_monitor(
    cfg: &AgentConfig,
    config_file: Option<&Path>,
    config_dir: &Path,
    args: RunArgs,
) -> ExitCode {
    cfg.log.init_tracing();
    let data_dir = config::data_dir(args.data.as_deref(), &cfg.agent.data_dir);
    let config_dir = config::absolute(config_dir);
    let config_file = config_file.map(config::absolute);
    let worker = match args.worker_program {
        Some(program) => monitor::WorkerCommand {
            program,
            args: args
                .worker_args
                .unwrap_or_default()
                .split_whitespace()
                .map(Into::into)
                .collect(),
            env: Vec::new(),
        },
        None => match std::env::current_exe() {
            Ok(program) => {
                let mut worker_args = vec!["--config-dir".into(), config_dir.into()];
                if let Some(file) = &config_file {
                    worker_args.extend(["--config".into(), file.into()]);
                }
                worker_args.extend(["worker".into(), "--data".into(), data_dir.clone().into()]);
                monitor::WorkerCommand {
                    program,
                    args: worker_args,
                    env: Vec::new(),
                }
            }
            Err(e) => {
                eprintln!(
                    "tether-agent run: cannot locate this executable to start the worker: {e}"
                );
                return ExitCode::from(1);
            }
        },
    };
    let opts = monitor::MonitorOptions {
        worker,
        beat_timeout: cfg.agent.worker_beat_timeout,
        restart_budget: cfg.agent.worker_restart_budget,
        restart_window: cfg.agent.worker_restart_window,
        backoff_min: monitor::RESTART_BACKOFF_MIN,
        backoff_max: monitor::RESTART_BACKOFF_MAX,
        stable_after: monitor::STABLE_AFTER,
        stop_grace: monitor::STOP_GRACE,
        upgrade: monitor::UpgradeOptions {
            data_dir: data_dir.clone(),
            healthy_after: cfg.agent.upgrade_healthy_after,
            trial_timeout: cfg.agent.upgrade_trial_timeout,
        },
    };
    match monitor::run(&data_dir, opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-agent run: {e}");
            ExitCode::from(1)
        }
    }
}

/// `tether-agent worker`: exits with the code the worker's system stopped with.
fn run_worker(cfg: &AgentConfig, args: WorkerArgs) -> ExitCode {
    // Its recent lines are kept too, for an operator to read from afar.
    cfg.log.init_tracing_to(worker::log_ring::Tee);
    let data_dir = config::data_dir(args.data.as_deref(), &cfg.agent.data_dir);
    match worker::run(cfg, &data_dir) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("tether-agent worker: {e}");
            ExitCode::from(1)
        }
    }
}

/// `tether-agent install`: prints the agent id on success; errors name what failed.
fn run_install(cfg: &AgentConfig, args: &install::InstallArgs) -> ExitCode {
    cfg.log.init_tracing();
    let data_dir = config::data_dir(args.data.as_deref(), &cfg.agent.data_dir);
    match install::install(args, &data_dir) {
        Ok(done) => {
            println!(
                "enrolled as {} via {}; state in {}",
                done.agent_id,
                done.upstream,
                done.data_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tether-agent install: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
