//! `tether-agent worker`: the process that does the agent's work, started and watched by the
//! monitor (`tether-agent run`).
//!
//! It opens the journal, builds the [`jobs::runner::StepRunner`] and the [`uplink::Uplink`]
//! under a [`supervisor::Supervisor`] (each rebuilt on its own), and
//! tells the monitor it is alive by writing `beat <health json>` lines to stdout. It reads
//! nothing from stdin, but when stdin (a pipe held by the monitor) reaches EOF the monitor is
//! gone, and the worker exits rather than run unsupervised. It opens no listening socket.
//!
//! - [`jobs`]: job records and step execution.
//! - [`supervisor`]: restarts crashed actors, reports their health.
//! - [`uplink`]: the connection upstream and both message streams.
//! - [`upgrade`]: the upgrade record and the package download (drain policy documented there).

pub mod jobs;
pub mod log_ring;
pub mod supervisor;
pub mod upgrade;
pub mod uplink;

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use tether_shared::config::AgentConfig;
use tether_shared::identity::Identity;
use tether_shared::journal::{Journal, JournalOptions, SledOptions};
use tether_shared::protocol::AgentStatus;
use tether_shared::sealing::SealingKey;
use tether_shared::trust::Pinned;

use crate::state::{AgentState, CA_FILE, KEY_FILE};
use supervisor::{ObserveChildren, Supervisor, WorkerHealth};
use uplink::{Uplink, UplinkConfig};

/// Where jobs get their working directories, inside the data directory.
pub const WORK_DIR: &str = "work";
/// The journal's directory inside the data directory.
pub const JOURNAL_DIR: &str = "journal";
/// Where unpacked plugin bundles are cached, inside the data directory.
pub const PLUGINS_DIR: &str = "plugins";
/// The agent's page cache: small, the agent must stay light.
const AGENT_CACHE_BYTES: u64 = 4 * 1024 * 1024;
/// The WebSocket path on an agent-facing listener.
pub const WS_PATH: &str = "/agent/v1/ws";

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{0}")]
    State(#[from] crate::state::StateError),
    #[error("agent key {}: {source}", path.display())]
    Identity {
        path: PathBuf,
        source: tether_shared::identity::IdentityError,
    },
    /// `ca.pem`, the pinned signing key or `trust.json` is unusable.
    #[error("trust: {0}")]
    Trust(#[from] tether_shared::trust::TrustError),
    #[error(transparent)]
    Journal(#[from] tether_shared::journal::JournalError),
    #[error("agent sealing key {}: {source}", path.display())]
    Sealing {
        path: PathBuf,
        source: tether_shared::sealing::SealingError,
    },
    #[error("agent.json lists no upstream")]
    NoUpstream,
}

/// The WebSocket URL of an agent-facing base URL (`wss://host:port` → `wss://host:port/agent/v1/ws`).
pub fn ws_url(base: &str) -> String {
    let trimmed = base.trim_end_matches('/');
    match trimmed
        .find("://")
        .and_then(|i| trimmed[i + 3..].find('/').map(|j| i + 3 + j))
    {
        Some(path_start) => format!("{}{WS_PATH}", &trimmed[..path_start]),
        None => format!("{trimmed}{WS_PATH}"),
    }
}

/// The one-minute load average times 1000, if the kernel tells.
fn load_milli() -> u32 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0, |l| (l * 1000.0) as u32)
}

/// Runs the worker until the monitor goes away or the supervisor gives up; returns the exit code.
pub fn run(cfg: &AgentConfig, dir: &Path) -> Result<i32, WorkerError> {
    let state = AgentState::load(dir)?;
    let key_path = dir.join(KEY_FILE);
    let identity = Identity::load(&key_path).map_err(|source| WorkerError::Identity {
        path: key_path,
        source,
    })?;
    let sealing_path = dir.join(tether_shared::sealing::SEALING_KEY_FILE);
    let sealing =
        SealingKey::load_or_create(&sealing_path).map_err(|source| WorkerError::Sealing {
            path: sealing_path,
            source,
        })?;
    jobs::step::remove_scripts(&dir.join(WORK_DIR));
    let trust = Pinned::load(dir, CA_FILE, &state.server_signing_key)?;
    if state.upstreams.is_empty() {
        return Err(WorkerError::NoUpstream);
    }
    let opts = JournalOptions {
        sled: SledOptions {
            cache_capacity_bytes: AGENT_CACHE_BYTES,
            ..SledOptions::default()
        },
        ..JournalOptions::default()
    };
    let (journal, recovered) = Journal::open(&dir.join(JOURNAL_DIR), &opts)?;
    let journal = journal.handle();
    let (watched_journal, data_dir) = (journal.clone(), dir.to_owned());
    tracing::info!(agent_id = %state.agent_id, incarnation = %recovered.incarnation, created = recovered.created, "worker-starting");

    let version = running_version();
    tracing::info!(agent_id = %state.agent_id, version = %version, "worker-version");
    let status = Arc::new(Mutex::new(None::<AgentStatus>));
    let runner = jobs::runner::RunnerSlot::default();
    let run_as = Arc::new(jobs::run_as::Policy {
        users: cfg.agent.run_as_users.clone(),
        dir: cfg.agent.run_as_dir.join(&state.agent_id),
    });
    jobs::step::remove_scripts(&run_as.dir);
    let uplink_cfg = Arc::new(UplinkConfig {
        agent_id: state.agent_id.clone(),
        diagnostics_config: serde_json::to_string(cfg).unwrap_or_default(),
        run_as,
        version: version.clone(),
        identity: Arc::new(identity),
        sealing_key: sealing.public_b64(),
        sealing: Arc::new(sealing),
        trust: Arc::new(trust),
        upstreams: state.upstreams.iter().map(|u| ws_url(u)).collect(),
        journal,
        window: 256,
        max_retained: 16_384,
        rto: Duration::from_secs(10),
        reconnect_min: cfg.agent.reconnect_min,
        reconnect_max: cfg.agent.reconnect_max,
        spread: cfg.agent.spread_over_upstreams,
        heartbeat_interval: cfg.agent.heartbeat_interval,
        status: status.clone(),
        work_dir: dir.join(WORK_DIR),
        plugin_dir: dir.join(PLUGINS_DIR),
        artifact_cache: dir.join(jobs::fetch::CACHE_DIR),
        data_dir: dir.to_owned(),
        upgrade_drain_timeout: cfg.agent.upgrade_drain_timeout,
        job_retention: cfg.agent.job_retention,
        runner: runner.clone(),
    });
    let beat_every = (cfg.agent.worker_beat_timeout / 3).max(Duration::from_millis(50));
    let budget = cfg.agent.worker_restart_budget;
    let window = cfg.agent.worker_restart_window;

    let system = System::new();
    system.block_on(async move {
        // The runner first: the uplink adopts it as it starts.
        let steps: supervisor::Factory = Box::new(move || {
            let addr = jobs::runner::StepRunner::default().start();
            runner.set(addr.clone());
            Some(addr.recipient())
        });
        let factory: supervisor::Factory =
            Box::new(move || match Uplink::recover(uplink_cfg.clone()) {
                Ok(u) => Some(u.start().recipient()),
                Err(e) => {
                    tracing::error!(error = %e, "uplink-recover-failed");
                    None
                }
            });
        let sup = Supervisor::new(Duration::from_millis(500), budget, window)
            .child("steps", "StepRunner", steps)
            .child("uplink", "Uplink", factory)
            .start();
        watch_stdin();
        actix_rt::spawn(async move {
            let mut tick = actix_rt::time::interval(beat_every);
            loop {
                tick.tick().await;
                if storage_recovered(&watched_journal, &data_dir).await {
                    tracing::warn!("storage-recovered-restarting");
                    System::current().stop_with_code(STORAGE_RECOVERED_EXIT_CODE);
                    break;
                }
                let Ok(actors) = sup.send(ObserveChildren).await else {
                    break;
                };
                if let Ok(mut s) = status.lock() {
                    *s = Some(AgentStatus {
                        version: version.clone(),
                        // Filled by the uplink as each heartbeat goes out, with its figures.
                        running_jobs: 0,
                        load_milli: load_milli(),
                        actors: actors.clone(),
                        facts: None,
                        figures: None,
                    });
                }
                let line = serde_json::to_string(&WorkerHealth { actors }).unwrap_or_default();
                let mut out = std::io::stdout().lock();
                if writeln!(out, "beat {line}")
                    .and_then(|_| out.flush())
                    .is_err()
                {
                    // The monitor's end of the pipe is gone: so is the monitor.
                    System::current().stop_with_code(0);
                    break;
                }
            }
        });
    });
    Ok(system.run_with_code().unwrap_or(1))
}

/// The version this worker reports (Hello, heartbeats) and compares upgrades against: the
/// package version the monitor started it as (`TETHER_AGENT_PACKAGE_VERSION`, from the
/// server-signed upgrade records), else this build's own.
fn running_version() -> String {
    std::env::var(crate::upgrade::PACKAGE_VERSION_ENV)
        .ok()
        .filter(|v| tether_shared::upgrade::Version::parse(v).is_ok())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
}

/// The worker's exit code when its journal failed a write (a full disk) and the disk takes
/// writes again: the monitor starts it over from what is durable.
pub const STORAGE_RECOVERED_EXIT_CODE: i32 = 76;

/// Whether the journal failed a write and the disk under `dir` takes writes again.
async fn storage_recovered(journal: &tether_shared::journal::JournalHandle, dir: &Path) -> bool {
    if journal.observe().poisoned.is_none() {
        return false;
    }
    let dir = dir.to_owned();
    matches!(
        tokio::task::spawn_blocking(move || tether_shared::storage::takes_writes(&dir)).await,
        Ok(Ok(()))
    )
}

/// Stop the worker when stdin (the monitor's pipe) reaches EOF. Not when stdin is a terminal:
/// a person running the worker by hand stops it with Ctrl-C.
fn watch_stdin() {
    if std::io::stdin().is_terminal() {
        return;
    }
    let system = System::current();
    let spawned = std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
            tracing::warn!("monitor-gone");
            system.stop_with_code(0);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "stdin-watch-failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_urls_are_derived_from_bases() {
        assert_eq!(ws_url("wss://h:7919"), "wss://h:7919/agent/v1/ws");
        assert_eq!(ws_url("wss://h:7919/"), "wss://h:7919/agent/v1/ws");
        assert_eq!(
            ws_url("wss://h:7919/agent/v1/ws"),
            "wss://h:7919/agent/v1/ws"
        );
        assert_eq!(
            ws_url("wss://[::1]:20080/x"),
            "wss://[::1]:20080/agent/v1/ws"
        );
    }
}
