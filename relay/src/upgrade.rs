//! Relay upgrades: the relay replaces its own binary with a server-signed relay package.
//!
//! The server sends an `Upgrade` command on the relay's own channel (channel 0 of its link)
//! each time the relay connects while a rollout to it is in progress. [`Upgrader`] checks the
//! command's signature and the package's (`tether_shared::upgrade::component_signing_bytes`
//! with `relay`: an agent package never verifies), refuses an older or equal version, then
//! downloads the package through its upstream with a request signed by the relay's own key,
//! checks its sha256, and writes (see [`UPGRADE_DIR`]):
//!
//! - `DATA/upgrade/tether-relay-<version>` (0755), then
//! - `DATA/upgrade/trial.json` `{version, path, previous}`,
//!
//! drains (the upstream link and every downstream session close; agents reconnect and resume
//! from their journals) and re-executes itself into the new binary with the same arguments
//! (same pid: systemd sees the same service). The new relay finds `trial.json` naming itself
//! ([`startup`]); once its upstream link has been ready for `relay.upgrade_healthy_after_ms` it
//! writes `active.json` `{version, path}`, removes `trial.json`, records `result.json` and
//! reports `UpgradeFinished{done}`.
//!
//! If the new relay dies first, systemd (`Restart=always`) starts the installed binary again,
//! whose [`startup`] finds a `trial.json` that does not name it: it removes it (and the trial
//! binary), records `result.json` `rolled_back` and runs. A start of the installed binary
//! with an `active.json` naming a newer version executes that one instead. `result.json` is
//! reported to the server at every connect (the relay has no journal; the server ignores a
//! state it already holds). Refusals leave nothing on disk and are reported once; the server
//! sends the command again at the next connect.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::web;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tether_shared::agent_auth::sign_request;
use tether_shared::identity::{write_file_atomic, Identity};
use tether_shared::protocol::{
    command_signing_bytes, Command, CommandBody, EventBody, UpgradeOutcome,
};
use tether_shared::trust::{Applied, Pinned, TrustSet};
use tether_shared::upgrade::{verify_component_package, verify_package, Component, Version};

use crate::bulk::{Bulk, Forward};
use crate::cache::{CacheKey, Kind};
use crate::upstream::{Drain, SendOwnEvent, Upstream};

/// The upgrade directory inside the data directory.
pub const UPGRADE_DIR: &str = "upgrade";
/// The version on trial: `{version, path, previous}`.
pub const TRIAL_FILE: &str = "trial.json";
/// The version kept after its trial: `{version, path}`.
pub const ACTIVE_FILE: &str = "active.json";
/// The last upgrade's outcome, reported at every connect.
pub const RESULT_FILE: &str = "result.json";
/// Why a trial is rolled back when the installed binary finds it at start.
pub const ROLLBACK_REASON: &str = "the new relay did not start";
/// Time the last events get to reach the wire before the re-exec.
const DRAIN_LINGER: Duration = Duration::from_millis(300);

/// `trial.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    pub version: String,
    pub path: PathBuf,
    /// The version that ran before.
    pub previous: String,
    /// The id of the command (the server's rollout) that started it.
    #[serde(default)]
    pub command_id: String,
}

/// `active.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Active {
    pub version: String,
    pub path: PathBuf,
}

/// `result.json`: the last upgrade's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub version: String,
    pub outcome: UpgradeOutcome,
    #[serde(default)]
    pub reason: String,
    /// The id of the command (the server's rollout) it answers.
    #[serde(default)]
    pub command_id: String,
}

/// What runs now, as [`startup`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// The version reported upstream: the package's when running one, else the build's.
    pub version: String,
    /// This process is a version on trial.
    pub trial: bool,
    /// The trial's command id (empty unless on trial).
    pub command_id: String,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "upgrade-file-garbled");
            None
        }
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let mut text = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    text.push(b'\n');
    write_file_atomic(path, &text, 0o644)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The build's own version.
pub fn build_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Run first by `tether-relay run`, before anything else: settles `DATA/upgrade` (rolls back a
/// trial that is not this process, executes a newer active version) and says what runs.
pub fn startup(dir: &Path, relay_id: &str) -> Running {
    let up = dir.join(UPGRADE_DIR);
    let build = Running {
        version: build_version().to_owned(),
        trial: false,
        command_id: String::new(),
    };
    if !up.is_dir() {
        return build;
    }
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(relay_id = %relay_id, error = %e, "relay-exe-unknown");
            return build;
        }
    };
    if let Some(trial) = read_json::<Trial>(&up.join(TRIAL_FILE)) {
        if same_file(&trial.path, &me) {
            tracing::info!(relay_id = %relay_id, version = %trial.version, previous = %trial.previous, "relay-upgrade-trial");
            return Running {
                version: trial.version,
                trial: true,
                command_id: trial.command_id,
            };
        }
        tracing::warn!(relay_id = %relay_id, version = %trial.version, previous = %trial.previous, "relay-upgrade-rolled-back");
        let _ = std::fs::remove_file(up.join(TRIAL_FILE));
        if trial.path.starts_with(&up) {
            let _ = std::fs::remove_file(&trial.path);
        }
        let outcome = Outcome {
            version: trial.version,
            outcome: UpgradeOutcome::RolledBack,
            reason: ROLLBACK_REASON.to_owned(),
            command_id: trial.command_id,
        };
        if let Err(e) = write_json(&up.join(RESULT_FILE), &outcome) {
            tracing::error!(relay_id = %relay_id, error = %e, "relay-upgrade-result-unwritable");
        }
    } else if up.join(TRIAL_FILE).exists() {
        let _ = std::fs::remove_file(up.join(TRIAL_FILE));
    }
    let Some(active) = read_json::<Active>(&up.join(ACTIVE_FILE)) else {
        return build;
    };
    if same_file(&active.path, &me) {
        return Running {
            version: active.version,
            trial: false,
            command_id: String::new(),
        };
    }
    let newer = match (
        Version::parse(&active.version),
        Version::parse(build_version()),
    ) {
        (Ok(a), Ok(b)) => a > b,
        _ => false,
    };
    if newer && active.path.is_file() {
        tracing::info!(relay_id = %relay_id, version = %active.version, path = %active.path.display(), "relay-exec-active");
        let e = exec(&active.path);
        tracing::error!(relay_id = %relay_id, version = %active.version, error = %e, "relay-exec-active-failed");
    }
    build
}

/// Replaces this process with `path`, same arguments; returns only on failure.
fn exec(path: &Path) -> io::Error {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(path)
        .args(std::env::args_os().skip(1))
        .exec()
}

/// What the upstream link tells the upgrader.
#[derive(Message)]
#[rtype(result = "()")]
pub enum LinkNews {
    /// The link is ready (handshake done); `conn` numbers the connection.
    Ready { conn: u64 },
    /// The link dropped.
    Down,
    /// A frame on the relay's own channel: a command for the relay itself.
    Command(Command),
}

/// Everything the upgrader needs.
pub struct UpgraderConfig {
    pub dir: PathBuf,
    pub relay_id: String,
    pub identity: Arc<Identity>,
    /// The server's signing keys and the CAs trusted upstream (replaced by `Trust` commands).
    pub trust: Arc<Pinned>,
    pub running: Running,
    /// The served TLS certificate, which the server renews with a signed command.
    pub certificate: Arc<crate::certificate::Certificate>,
    pub healthy_after: Duration,
    pub trial_timeout: Duration,
}

/// The relay's upgrade actor.
pub struct Upgrader {
    cfg: UpgraderConfig,
    upstream: Addr<Upstream>,
    bulk: web::Data<Bulk>,
    /// The link connection now ready, if any.
    ready: Option<u64>,
    /// An upgrade is being downloaded or applied.
    busy: bool,
}

impl Upgrader {
    pub fn new(cfg: UpgraderConfig, upstream: Addr<Upstream>, bulk: web::Data<Bulk>) -> Self {
        Upgrader {
            cfg,
            upstream,
            bulk,
            ready: None,
            busy: false,
        }
    }

    fn up_dir(&self) -> PathBuf {
        self.cfg.dir.join(UPGRADE_DIR)
    }

    fn report(&self, body: EventBody) {
        self.upstream.do_send(SendOwnEvent(body));
    }

    fn refuse(&self, version: &str, reason: String) {
        tracing::warn!(relay_id = %self.cfg.relay_id, version = %version, reason = %reason, "relay-upgrade-refused");
        self.report(EventBody::UpgradeRefused {
            version: version.to_owned(),
            reason,
        });
    }

    fn report_result(&self) {
        if let Some(r) = read_json::<Outcome>(&self.up_dir().join(RESULT_FILE)) {
            self.report(EventBody::UpgradeFinished {
                version: r.version,
                outcome: r.outcome,
                reason: r.reason,
            });
        }
    }

    fn on_ready(&mut self, ctx: &mut Context<Self>, conn: u64) {
        self.ready = Some(conn);
        self.report_result();
        if self.cfg.running.trial {
            ctx.run_later(self.cfg.healthy_after, move |act, _| {
                if act.ready == Some(conn) && act.cfg.running.trial {
                    act.promote();
                }
            });
        }
    }

    /// The trial passed: keep this version.
    fn promote(&mut self) {
        let up = self.up_dir();
        let version = self.cfg.running.version.clone();
        let path = match std::env::current_exe().and_then(|p| p.canonicalize()) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(relay_id = %self.cfg.relay_id, error = %e, "relay-exe-unknown");
                return;
            }
        };
        let active = Active {
            version: version.clone(),
            path,
        };
        let outcome = Outcome {
            version: version.clone(),
            outcome: UpgradeOutcome::Done,
            reason: String::new(),
            command_id: self.cfg.running.command_id.clone(),
        };
        let written = write_json(&up.join(ACTIVE_FILE), &active)
            .and_then(|()| write_json(&up.join(RESULT_FILE), &outcome))
            .and_then(|()| std::fs::remove_file(up.join(TRIAL_FILE)));
        match written {
            Ok(()) => {
                self.cfg.running.trial = false;
                remove_other_packages(&up, &active.path);
                tracing::info!(relay_id = %self.cfg.relay_id, version = %version, "relay-upgrade-done");
                self.report_result();
            }
            Err(e) => {
                tracing::error!(relay_id = %self.cfg.relay_id, version = %version, error = %e, "relay-upgrade-promote-failed")
            }
        }
    }

    /// A certificate the server renewed (or re-sent at connect).
    fn install_certificate(&self, pem: &str) {
        use crate::certificate::Installed;
        match self.cfg.certificate.install(pem) {
            Ok(Installed::Renewed { not_after_unix_s }) => {
                tracing::info!(relay_id = %self.cfg.relay_id, not_after_unix_s, "relay-certificate-renewed")
            }
            Ok(Installed::Same) => {
                tracing::debug!(relay_id = %self.cfg.relay_id, "relay-certificate-current")
            }
            Err(e) => {
                tracing::warn!(relay_id = %self.cfg.relay_id, error = %e, "relay-certificate-refused")
            }
        }
    }

    /// New signing keys and CAs from the server (a rollover): in force for every later
    /// command, dial and certificate check; reported either way.
    fn apply_trust(&self, set: &TrustSet) {
        let relay_id = &self.cfg.relay_id;
        let event = match self.cfg.trust.apply(set) {
            Ok(applied) => {
                if applied == Applied::Changed {
                    tracing::info!(relay_id = %relay_id, serial = set.serial, keys = set.signing_keys.len(), "trust-applied");
                }
                EventBody::TrustApplied { serial: set.serial }
            }
            Err(e) => {
                tracing::warn!(relay_id = %relay_id, serial = set.serial, error = %e, "trust-refused");
                EventBody::TrustRefused {
                    serial: set.serial,
                    reason: e.to_string(),
                }
            }
        };
        self.report(event);
    }

    fn on_command(&mut self, ctx: &mut Context<Self>, command: Command) {
        let signed = command_signing_bytes(
            &self.cfg.relay_id,
            &command.id,
            command.deadline_ms,
            &command.body,
        );
        let verified = signed
            .ok()
            .is_some_and(|b| self.cfg.trust.current().verify(&b, &command.signature));
        if !verified {
            tracing::warn!(relay_id = %self.cfg.relay_id, id = %command.id, "relay-command-bad-signature");
            return;
        }
        if command.deadline_ms < now_ms() {
            tracing::warn!(relay_id = %self.cfg.relay_id, id = %command.id, "relay-command-expired");
            return;
        }
        let (version, sha256, size, signature) = match command.body {
            CommandBody::Upgrade {
                version,
                sha256,
                size,
                signature,
            } => (version, sha256, size, signature),
            CommandBody::RelayCertificate { certificate } => {
                return self.install_certificate(&certificate)
            }
            CommandBody::Trust { set } => return self.apply_trust(&set),
            _ => {
                tracing::warn!(relay_id = %self.cfg.relay_id, id = %command.id, "relay-command-unsupported");
                return;
            }
        };
        if self.busy {
            tracing::info!(relay_id = %self.cfg.relay_id, version = %version, "relay-upgrade-busy");
            return;
        }
        let trusted = self.cfg.trust.current();
        let parsed = match trusted.with_any_key(|key| {
            verify_component_package(key, Component::Relay, &version, &sha256, &signature)
        }) {
            Ok(v) => v,
            Err(e) => {
                let agent_package =
                    trusted.with_any_key(|key| verify_package(key, &version, &sha256, &signature));
                let reason = if agent_package.is_ok() {
                    "an agent package, not a relay package".to_owned()
                } else {
                    e.to_string()
                };
                return self.refuse(&version, reason);
            }
        };
        let running = &self.cfg.running;
        if version == running.version {
            if !running.trial {
                let done = read_json::<Outcome>(&self.up_dir().join(RESULT_FILE))
                    .is_some_and(|r| r.version == version && r.outcome == UpgradeOutcome::Done);
                if done {
                    self.report_result();
                } else {
                    self.refuse(
                        &version,
                        format!("the relay already runs version {version}"),
                    );
                }
            }
            return;
        }
        if running.trial {
            return self.refuse(
                &version,
                format!(
                    "version {} is still on trial; roll out again once it is done",
                    running.version
                ),
            );
        }
        // The same rollout again (re-sent at a reconnect, maybe before our report arrived):
        // report it again rather than trying a version that failed. A new rollout of that
        // version (another command id) tries again.
        if let Some(r) = read_json::<Outcome>(&self.up_dir().join(RESULT_FILE)).filter(|r| {
            r.version == version
                && r.outcome == UpgradeOutcome::RolledBack
                && r.command_id == command.id
        }) {
            tracing::info!(relay_id = %self.cfg.relay_id, version = %version, "relay-upgrade-already-rolled-back");
            return self.report(EventBody::UpgradeFinished {
                version: r.version,
                outcome: r.outcome,
                reason: r.reason,
            });
        }
        let older = Version::parse(&running.version).is_ok_and(|cur| parsed <= cur);
        if older {
            return self.refuse(
                &version,
                format!(
                    "version {version} is not newer than the running version {}",
                    running.version
                ),
            );
        }
        self.busy = true;
        tracing::info!(relay_id = %self.cfg.relay_id, version = %version, sha256 = %sha256, size, "relay-upgrade-started");
        self.report(EventBody::UpgradeStarted {
            version: version.clone(),
        });
        let job = Stage {
            bulk: self.bulk.clone(),
            up: self.up_dir(),
            relay_id: self.cfg.relay_id.clone(),
            identity: self.cfg.identity.clone(),
            version: version.clone(),
            sha256,
            previous: running.version.clone(),
            command_id: command.id.clone(),
        };
        let command_id = command.id;
        let staging = web::block(move || job.run());
        ctx.spawn(staging.into_actor(self).map(move |res, act, ctx| {
            let res = res.map_err(|e| e.to_string()).and_then(|r| r);
            match res {
                Ok(path) => act.switch(ctx, version, path, command_id),
                Err(reason) => {
                    act.busy = false;
                    act.refuse(&version, reason);
                }
            }
        }));
    }

    /// The package is staged and `trial.json` written: drain, then become the new binary.
    fn switch(
        &mut self,
        ctx: &mut Context<Self>,
        version: String,
        path: PathBuf,
        command_id: String,
    ) {
        tracing::info!(relay_id = %self.cfg.relay_id, version = %version, path = %path.display(), "relay-upgrade-staged");
        self.report(EventBody::UpgradeStaged {
            version: version.clone(),
        });
        self.upstream.do_send(Drain { on: true });
        ctx.run_later(DRAIN_LINGER, move |act, _| {
            tracing::info!(relay_id = %act.cfg.relay_id, version = %version, "relay-upgrade-exec");
            let e = exec(&path);
            // Still here: the new binary could not even start. Undo, and carry on.
            tracing::error!(relay_id = %act.cfg.relay_id, version = %version, error = %e, "relay-upgrade-exec-failed");
            let up = act.up_dir();
            let _ = std::fs::remove_file(up.join(TRIAL_FILE));
            let _ = std::fs::remove_file(&path);
            let outcome = Outcome {
                version,
                outcome: UpgradeOutcome::RolledBack,
                reason: format!("{ROLLBACK_REASON}: {e}"),
                command_id,
            };
            if let Err(e) = write_json(&up.join(RESULT_FILE), &outcome) {
                tracing::error!(relay_id = %act.cfg.relay_id, error = %e, "relay-upgrade-result-unwritable");
            }
            act.busy = false;
            act.upstream.do_send(Drain { on: false });
        });
    }
}

impl Actor for Upgrader {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if !self.cfg.running.trial {
            return;
        }
        ctx.run_later(self.cfg.trial_timeout, |act, _| {
            if act.cfg.running.trial {
                // Not healthy in time: exit, so that the supervisor starts the installed
                // binary, which finds this trial and rolls it back.
                tracing::error!(relay_id = %act.cfg.relay_id, version = %act.cfg.running.version, "relay-upgrade-trial-timeout");
                std::process::exit(1);
            }
        });
    }
}

impl Handler<LinkNews> for Upgrader {
    type Result = ();

    fn handle(&mut self, msg: LinkNews, ctx: &mut Self::Context) {
        match msg {
            LinkNews::Ready { conn } => self.on_ready(ctx, conn),
            LinkNews::Down => self.ready = None,
            LinkNews::Command(c) => self.on_command(ctx, c),
        }
    }
}

/// The blocking part: download, verify, store, write `trial.json`.
struct Stage {
    bulk: web::Data<Bulk>,
    up: PathBuf,
    relay_id: String,
    identity: Arc<Identity>,
    version: String,
    sha256: String,
    previous: String,
    command_id: String,
}

impl Stage {
    fn run(self) -> Result<PathBuf, String> {
        let path_and_query = format!("/agent/v1/upgrades/{}", self.sha256);
        let headers = sign_request(
            &self.identity,
            &self.relay_id,
            "GET",
            &path_and_query,
            now_ms(),
        );
        let fwd = Forward {
            path_and_query,
            headers: headers.into_iter().collect(),
        };
        let key = CacheKey {
            kind: Kind::Upgrades,
            sha256: self.sha256.clone(),
        };
        let cached = self
            .bulk
            .fetch_own(&key, &fwd)
            .map_err(|e| format!("download failed: {e}"))?;
        std::fs::create_dir_all(&self.up).map_err(|e| format!("cannot store the package: {e}"))?;
        let target = self.up.join(format!("tether-relay-{}", self.version));
        copy_verified(&cached, &target, &self.sha256)
            .map_err(|e| format!("cannot store the package: {e}"))?;
        let trial = Trial {
            version: self.version,
            path: target.clone(),
            previous: self.previous,
            command_id: self.command_id,
        };
        if let Err(e) = write_json(&self.up.join(TRIAL_FILE), &trial) {
            let _ = std::fs::remove_file(&target);
            return Err(format!("cannot record the trial: {e}"));
        }
        Ok(target)
    }
}

/// Removes every relay package in `up` but `keep` (older versions, abandoned downloads).
fn remove_other_packages(up: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(up) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_package = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with("tether-relay-"));
        if is_package && !same_file(&path, keep) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Copies `from` to `to` (mode 0755, synced, renamed into place) if its sha256 is `sha256`.
fn copy_verified(from: &Path, to: &Path, sha256: &str) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = to.with_extension("tmp");
    let mut input = std::fs::File::open(from)?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o755)
        .open(&tmp)?;
    let mut hashing = HashingWriter {
        inner: &mut out,
        hasher: Sha256::new(),
    };
    io::copy(&mut input, &mut hashing)?;
    let got = hex::encode(hashing.hasher.finalize());
    if got != sha256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(io::Error::other(format!(
            "the package's sha256 is {got}, not {sha256}"
        )));
    }
    out.sync_all()?;
    drop(out);
    std::fs::rename(&tmp, to)?;
    if let Some(parent) = to.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

struct HashingWriter<'a> {
    inner: &'a mut std::fs::File,
    hasher: Sha256,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

use tether_shared::clock::now_unix_ms as now_ms;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn a_package_is_stored_only_with_its_sha256_and_executable() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let from = tmp.path().join("cached");
        std::fs::write(&from, b"#!/bin/sh\nexit 0\n").unwrap();
        let sha = hex::encode(Sha256::digest(b"#!/bin/sh\nexit 0\n"));
        let to = tmp.path().join("tether-relay-2.0.0");
        let wrong = "00".repeat(32);
        assert!(copy_verified(&from, &to, &wrong).is_err());
        assert!(!to.exists());
        assert!(!to.with_extension("tmp").exists());
        copy_verified(&from, &to, &sha).unwrap();
        let mode = std::fs::metadata(&to).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        std::fs::write(tmp.path().join("tether-relay-1.0.0"), b"old").unwrap();
        remove_other_packages(tmp.path(), &to);
        assert!(to.exists());
        assert!(!tmp.path().join("tether-relay-1.0.0").exists());
        assert!(from.exists(), "only packages are removed");
    }

    #[test]
    fn a_trial_that_is_not_this_process_is_rolled_back_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let built = startup(tmp.path(), "r-1");
        assert_eq!(built.version, build_version());
        assert!(!built.trial);
        let up = tmp.path().join(UPGRADE_DIR);
        std::fs::create_dir_all(&up).unwrap();
        let package = up.join("tether-relay-99.0.0");
        std::fs::write(&package, b"#!/bin/sh\nexit 3\n").unwrap();
        let trial = Trial {
            version: "99.0.0".into(),
            path: package.clone(),
            previous: build_version().into(),
            command_id: "c-1".into(),
        };
        write_json(&up.join(TRIAL_FILE), &trial).unwrap();
        // An older active record is not executed.
        let active = Active {
            version: "0.0.1".into(),
            path: package.clone(),
        };
        write_json(&up.join(ACTIVE_FILE), &active).unwrap();
        let running = startup(tmp.path(), "r-1");
        assert_eq!(running.version, build_version());
        assert!(!running.trial);
        assert!(!up.join(TRIAL_FILE).exists());
        assert!(!package.exists());
        let result: Outcome = read_json(&up.join(RESULT_FILE)).unwrap();
        assert_eq!(result.version, "99.0.0");
        assert_eq!(result.outcome, UpgradeOutcome::RolledBack);
        assert_eq!(result.reason, ROLLBACK_REASON);
        assert_eq!(result.command_id, "c-1");
    }
}
