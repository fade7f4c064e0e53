//! The worker's half of an upgrade: the durable record of the upgrade in progress
//! ([`Pending`], journal meta [`PENDING_KEY`]) and the blocking work of getting a package in
//! place ([`download_and_stage`]). Its course is decided by the sans-IO [`driver::Driver`]; the
//! uplink carries the decisions out (`worker/uplink/upgrade.rs`), because every transition is
//! journaled together with the event that reports it.
//!
//! Drain policy: from the moment an `Upgrade` is accepted, no step *starts* (jobs accepted
//! meanwhile are journaled and acknowledged as usual, and wait); steps already running are let
//! finish, bounded by `agent.upgrade_drain_timeout_ms` — past it the upgrade is abandoned and
//! reported refused, and the held steps go on. A step is never killed for an upgrade. Once no
//! step runs, the package is downloaded, verified and staged, and the worker exits with the
//! reserved code. Jobs resume, at their next step, in whichever worker settles the upgrade
//! (the new one once its trial passed, or the old one after a rollback).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rand::RngCore;
use serde::{Deserialize, Serialize};

pub mod driver;

use crate::upgrade::{self, Staged, STAGED_FILE};
use crate::worker::jobs::fetch::{self, Failure, Remote};

/// Journal meta key of the upgrade in progress.
pub const PENDING_KEY: &str = "upgrade/pending";
/// Path prefix of the package download route on an agent-facing listener.
pub const UPGRADES_PATH: &str = "/agent/v1/upgrades";
/// Longest a package download may take.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How far an upgrade got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Accepted: no step starts; waiting for running steps, then downloading.
    Draining,
    /// `DATA/upgrade/staged.json` is written and `UpgradeStaged` journaled: the monitor swaps.
    Staged,
}

/// The upgrade in progress, as journaled (in the batch of each event that changes it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub signature: String,
    pub phase: Phase,
    /// When it was accepted (the drain timeout counts from here, across restarts).
    pub accepted_unix_ms: u64,
}

impl Pending {
    /// Its record in `DATA/upgrade/staged.json`.
    pub fn staged(&self, data_dir: &Path) -> Staged {
        Staged {
            version: self.version.clone(),
            sha256: self.sha256.clone(),
            size: self.size,
            signature: self.signature.clone(),
            program: upgrade::dir(data_dir).join(upgrade::program_name(&self.version)),
        }
    }
}

/// Removes partial downloads left in `DATA/upgrade`.
pub fn remove_partials(data_dir: &Path) {
    let Ok(entries) = fs::read_dir(upgrade::dir(data_dir)) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().ends_with(".part") {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Downloads the package of `pending` from the upstreams (in order), verifies its size and
/// sha256, makes it executable and writes `staged.json`. Nothing is left but partial-free
/// files on success; on failure nothing is left at all. Blocking.
pub fn download_and_stage(
    remote: &Remote,
    pending: &Pending,
    data_dir: &Path,
    stop: &AtomicBool,
) -> Result<Staged, String> {
    let dir = upgrade::dir(data_dir);
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // A download left by a worker that died is not resumed: another thread of a dead uplink
    // might still append to it.
    remove_partials(data_dir);
    let part = dir.join(format!(
        "{}.{:016x}.part",
        pending.sha256,
        rand::rngs::OsRng.next_u64()
    ));
    let deadline = Instant::now() + DOWNLOAD_TIMEOUT;
    let mut last = String::from("no upstream configured");
    let mut done = false;
    for upstream in &remote.upstreams {
        match fetch::download(
            remote,
            upstream,
            UPGRADES_PATH,
            &pending.sha256,
            pending.size,
            &part,
            stop,
            deadline,
        ) {
            Ok(()) => {
                done = true;
                break;
            }
            Err(Failure::Unreachable(e)) => {
                tracing::warn!(agent_id = %remote.agent_id, upstream = %upstream.authority(), error = %e, "upgrade-upstream-unreachable");
                let _ = fs::remove_file(&part);
                last = e;
            }
            Err(Failure::Fatal(e)) => {
                let _ = fs::remove_file(&part);
                return Err(e);
            }
        }
    }
    if !done {
        return Err(format!("cannot download the package: {last}"));
    }
    let staged = pending.staged(data_dir);
    let placed = (|| -> std::io::Result<()> {
        fs::set_permissions(&part, fs::Permissions::from_mode(0o755))?;
        fs::rename(&part, &staged.program)?;
        fs::File::open(&dir)?.sync_all()?;
        upgrade::write_json(&dir.join(STAGED_FILE), &staged)
    })();
    if let Err(e) = placed {
        let _ = fs::remove_file(&part);
        let _ = fs::remove_file(&staged.program);
        return Err(format!(
            "cannot stage the package in {}: {e}",
            dir.display()
        ));
    }
    Ok(staged)
}
