//! The monitor's half of an upgrade: swapping in a staged package, its trial, and the
//! rollback (see `crate::upgrade` for the files involved).
//!
//! When the worker exits with `UPGRADE_EXIT_CODE` and `DATA/upgrade/staged.json` names a
//! package that verifies again here (server signature, place, size, sha256, mode — on the
//! blocking pool), the monitor renames it to `trial.json` and starts that program as the worker,
//! with the same arguments and `TETHER_AGENT_PACKAGE_VERSION` set. The new worker is **healthy**
//! once it has beaten, still beats (the usual beat timeout applies) and has run for
//! `agent.upgrade_healthy_after_ms`: then `active.json` records it (a restarted monitor keeps
//! running it), `result.json` says `done`, and other staged programs are removed. If it exits,
//! stops beating, or is not healthy within `agent.upgrade_trial_timeout_ms`, it is killed,
//! `result.json` says `rolled_back` with the reason, and the previous program starts again at
//! once (trials count against no restart budget). A staged package that fails verification is
//! refused the same way. The monitor binary itself is never replaced.

use actix::prelude::*;
use tether_shared::protocol::UpgradeOutcome;
use tether_shared::trust::Pinned;
use tether_shared::upgrade::Version;

use super::worker_process::Stop;
use super::{Monitor, WorkerCommand, WorkerExit};
use crate::state::AgentState;
use crate::upgrade::{
    self, Active, Installed, Staged, UpgradeResult, ACTIVE_FILE, PACKAGE_VERSION_ENV, RESULT_FILE,
    STAGED_FILE, TRIAL_FILE,
};

/// A package on trial.
#[derive(Debug)]
pub(super) struct Trial {
    /// The worker generation running it.
    pub(super) generation: u64,
    pub(super) staged: Staged,
    /// Set when the monitor killed it (the timeout): the rollback's reason.
    pub(super) failure: Option<String>,
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Monitor {
    /// At start: the program recorded by the last successful upgrade, and the rollback of a
    /// trial a previous monitor did not finish.
    pub(super) fn recover_upgrade_state(&mut self) {
        let dir = upgrade::dir(&self.opts.upgrade.data_dir);
        match upgrade::read_json::<Active>(&dir.join(ACTIVE_FILE)) {
            Ok(Some(active)) if superseded(&active.current) => {
                // The installed build (this monitor's own) is at least as new: the package
                // manager upgraded the agent since. Run it, and drop the swapped-in programs.
                tracing::info!(version = ?active.current.version, build = env!("CARGO_PKG_VERSION"), "upgrade-superseded-by-installed-build");
                let _ = upgrade::remove(&dir.join(ACTIVE_FILE));
                remove_other_programs(&dir, &[]);
            }
            Ok(Some(active)) if active.current.program.is_file() => {
                tracing::info!(program = %active.current.program.display(), version = ?active.current.version, "upgrade-active");
                self.current = command_for(&self.opts.worker, &active.current);
                self.installed = active.current;
            }
            Ok(Some(active)) => {
                tracing::error!(program = %active.current.program.display(), "upgrade-active-program-missing");
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "upgrade-active-unreadable"),
        }
        match upgrade::read_json::<Staged>(&dir.join(TRIAL_FILE)) {
            // Promoted (active.json names it) but not cleaned up: finish the promotion.
            Ok(Some(staged))
                if self.installed.program == staged.program
                    && self.installed.version.as_deref() == Some(staged.version.as_str()) =>
            {
                tracing::info!(version = %staged.version, "upgrade-promotion-completed");
                if !dir.join(RESULT_FILE).exists() {
                    let result = UpgradeResult {
                        version: staged.version.clone(),
                        outcome: UpgradeOutcome::Done,
                        reason: String::new(),
                    };
                    if let Err(e) = upgrade::write_json(&dir.join(RESULT_FILE), &result) {
                        tracing::error!(error = %e, "upgrade-result-not-written");
                    }
                }
                let _ = upgrade::remove(&dir.join(TRIAL_FILE));
            }
            Ok(Some(staged)) => {
                let reason = "the monitor restarted while the new version was on trial";
                self.record_rollback(&staged, reason);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "upgrade-trial-unreadable");
                let _ = upgrade::remove(&dir.join(TRIAL_FILE));
            }
        }
    }

    /// The worker asked for the swap: verify what it staged, then start it on trial; or go on
    /// with the current program.
    pub(super) fn on_upgrade_requested(&mut self, ctx: &mut Context<Self>, exit: WorkerExit) {
        let dir = upgrade::dir(&self.opts.upgrade.data_dir);
        let staged = match upgrade::read_json::<Staged>(&dir.join(STAGED_FILE)) {
            Ok(Some(s)) => s,
            Ok(None) => {
                tracing::warn!("upgrade-not-staged");
                self.schedule_restart(ctx, None, exit);
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "upgrade-staged-unreadable");
                let _ = upgrade::remove(&dir.join(STAGED_FILE));
                self.schedule_restart(ctx, None, exit);
                return;
            }
        };
        let data_dir = &self.opts.upgrade.data_dir;
        let keys = AgentState::load(data_dir)
            .map_err(|e| e.to_string())
            .and_then(|s| Pinned::keys(data_dir, &s.server_signing_key).map_err(|e| e.to_string()));
        let key = match keys {
            Ok(keys) => keys,
            Err(e) => {
                let reason = format!("the pinned server keys are unusable: {e}");
                self.refuse_staged(ctx, &staged, &reason);
                return;
            }
        };
        self.verifying = true;
        let data_dir = self.opts.upgrade.data_dir.clone();
        let checked = staged.clone();
        let work = actix_rt::task::spawn_blocking(move || {
            upgrade::verify_staged(&data_dir, &checked, &key)
        });
        ctx.spawn(work.into_actor(self).map(move |res, act, ctx| {
            act.verifying = false;
            if act.stopping {
                act.finish_if_idle(ctx);
                return;
            }
            match res.unwrap_or_else(|e| Err(format!("the verification task failed: {e}"))) {
                Ok(()) => act.start_trial(ctx, staged),
                Err(reason) => act.refuse_staged(ctx, &staged, &reason),
            }
        }));
    }

    fn refuse_staged(&mut self, ctx: &mut Context<Self>, staged: &Staged, reason: &str) {
        let reason = format!("the staged package was refused by the monitor: {reason}");
        self.record_rollback(staged, &reason);
        self.start_worker(ctx);
    }

    fn start_trial(&mut self, ctx: &mut Context<Self>, staged: Staged) {
        let dir = upgrade::dir(&self.opts.upgrade.data_dir);
        if let Err(e) = std::fs::rename(dir.join(STAGED_FILE), dir.join(TRIAL_FILE)) {
            let reason = format!("cannot mark the trial: {e}");
            self.refuse_staged(ctx, &staged, &reason);
            return;
        }
        let installed = Installed {
            program: staged.program.clone(),
            version: Some(staged.version.clone()),
        };
        let command = command_for(&self.opts.worker, &installed);
        tracing::info!(version = %staged.version, program = %staged.program.display(), previous = %self.current.program.display(), "upgrade-trial-starting");
        let Some(generation) = self.spawn_worker(ctx, &command) else {
            self.record_rollback(&staged, "the new program could not be started");
            self.start_worker(ctx);
            return;
        };
        self.trial = Some(Trial {
            generation,
            staged,
            failure: None,
        });
        let (healthy_after, timeout) = (
            self.opts.upgrade.healthy_after,
            self.opts.upgrade.trial_timeout,
        );
        ctx.run_later(healthy_after, |act, _| act.check_trial());
        ctx.run_later(timeout, move |act, _| {
            let Some(trial) = act.trial.as_mut().filter(|t| t.generation == generation) else {
                return;
            };
            let reason = format!(
                "the new worker was not healthy within {} ms",
                ms(timeout)
            );
            tracing::warn!(version = %trial.staged.version, reason = %reason, "upgrade-trial-timeout");
            trial.failure = Some(reason);
            if let Some(w) = act.worker.as_ref().filter(|w| w.generation == generation) {
                w.process.signal(Stop::Kill);
            }
        });
    }

    /// Promotes the worker on trial once it has been healthy for long enough.
    pub(super) fn check_trial(&mut self) {
        let Some(trial) = &self.trial else { return };
        let Some(worker) = self
            .worker
            .as_ref()
            .filter(|w| w.generation == trial.generation)
        else {
            return;
        };
        let healthy = trial.failure.is_none()
            && worker.has_beaten
            && !worker.timed_out
            && worker.started.elapsed() >= self.opts.upgrade.healthy_after
            && worker.last_beat.elapsed() < self.opts.beat_timeout;
        if healthy {
            self.promote();
        }
    }

    fn promote(&mut self) {
        let Some(trial) = self.trial.take() else {
            return;
        };
        let staged = trial.staged.clone();
        let dir = upgrade::dir(&self.opts.upgrade.data_dir);
        let new = Installed {
            program: staged.program.clone(),
            version: Some(staged.version.clone()),
        };
        let active = Active {
            current: new.clone(),
            previous: self.installed.clone(),
        };
        if let Err(e) = upgrade::write_json(&dir.join(ACTIVE_FILE), &active) {
            // Without the record a restarted monitor would run the old program: roll back now
            // rather than run a version that is not recorded.
            let reason = format!("cannot record the new version: {e}");
            tracing::error!(version = %staged.version, reason = %reason, "upgrade-not-recorded");
            self.trial = Some(Trial {
                failure: Some(reason),
                ..trial
            });
            if let Some(w) = &self.worker {
                w.process.signal(Stop::Kill);
            }
            return;
        }
        let result = UpgradeResult {
            version: staged.version.clone(),
            outcome: UpgradeOutcome::Done,
            reason: String::new(),
        };
        if let Err(e) = upgrade::write_json(&dir.join(RESULT_FILE), &result) {
            tracing::error!(error = %e, "upgrade-result-not-written");
        }
        let _ = upgrade::remove(&dir.join(TRIAL_FILE));
        self.current = command_for(&self.opts.worker, &new);
        self.installed = new;
        self.health.upgrades_done += 1;
        self.backoff.reset();
        remove_other_programs(&dir, &[&active.current.program, &active.previous.program]);
        tracing::info!(version = %staged.version, program = %staged.program.display(), previous = %active.previous.program.display(), "upgrade-done");
    }

    /// The worker on trial ended: roll back, and start the previous program at once.
    pub(super) fn trial_ended(
        &mut self,
        ctx: &mut Context<Self>,
        trial: Trial,
        exit: WorkerExit,
        lived: std::time::Duration,
        timed_out: bool,
    ) {
        let reason = trial.failure.unwrap_or_else(|| {
            let how = match exit {
                _ if timed_out => format!(
                    "stopped beating (silent for {} ms)",
                    ms(self.opts.beat_timeout)
                ),
                WorkerExit::Code(c) => format!("exited with code {c}"),
                WorkerExit::Signal(s) => format!("was killed by signal {s}"),
                WorkerExit::Unknown => "ended in an unknown way".to_owned(),
            };
            format!(
                "the new worker {how} after {} ms, before it was healthy",
                ms(lived)
            )
        });
        self.record_rollback(&trial.staged, &reason);
        self.start_worker(ctx);
    }

    /// Writes the rollback verdict and removes the package and its trial marker.
    fn record_rollback(&mut self, staged: &Staged, reason: &str) {
        let dir = upgrade::dir(&self.opts.upgrade.data_dir);
        tracing::warn!(version = %staged.version, reason = %reason, previous = %self.current.program.display(), "upgrade-rolled-back");
        let result = UpgradeResult {
            version: staged.version.clone(),
            outcome: UpgradeOutcome::RolledBack,
            reason: reason.to_owned(),
        };
        if let Err(e) = upgrade::write_json(&dir.join(RESULT_FILE), &result) {
            tracing::error!(error = %e, "upgrade-result-not-written");
        }
        if staged.program != self.current.program
            && staged.program == dir.join(upgrade::program_name(&staged.version))
        {
            let _ = upgrade::remove(&staged.program);
        }
        let _ = upgrade::remove(&dir.join(STAGED_FILE));
        let _ = upgrade::remove(&dir.join(TRIAL_FILE));
        self.health.upgrades_rolled_back += 1;
    }
}

/// `base` (the installed worker command) running `installed` instead: same arguments, the
/// package version in the environment.
pub(super) fn command_for(base: &WorkerCommand, installed: &Installed) -> WorkerCommand {
    let mut command = base.clone();
    command.program = installed.program.clone();
    command.env.retain(|(k, _)| k != PACKAGE_VERSION_ENV);
    if let Some(v) = &installed.version {
        command
            .env
            .push((PACKAGE_VERSION_ENV.to_owned(), v.clone()));
    }
    command
}

/// Whether this build is at least as new as the package `installed` runs.
fn superseded(installed: &Installed) -> bool {
    let build = Version::parse(env!("CARGO_PKG_VERSION"));
    let package = installed.version.as_deref().map(Version::parse);
    matches!((build, package), (Ok(b), Some(Ok(p))) if b >= p)
}

/// Removes staged programs (`tether-agent-*`) in `dir` other than `keep`.
fn remove_other_programs(dir: &std::path::Path, keep: &[&std::path::PathBuf]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        if name.to_string_lossy().starts_with("tether-agent-") && !keep.contains(&&path) {
            tracing::info!(program = %path.display(), "upgrade-old-program-removed");
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::monitor::{MonitorOptions, UpgradeOptions};

    fn monitor(data_dir: &std::path::Path) -> Monitor {
        let opts = MonitorOptions {
            worker: WorkerCommand {
                program: "/usr/bin/tether-agent".into(),
                args: vec!["worker".into()],
                env: Vec::new(),
            },
            beat_timeout: Duration::from_secs(30),
            restart_budget: 5,
            restart_window: Duration::from_secs(60),
            backoff_min: Duration::from_millis(1),
            backoff_max: Duration::from_millis(5),
            stable_after: Duration::from_secs(60),
            stop_grace: Duration::from_secs(5),
            upgrade: UpgradeOptions {
                data_dir: data_dir.to_owned(),
                healthy_after: Duration::from_secs(1),
                trial_timeout: Duration::from_secs(5),
            },
        };
        Monitor::new(opts, tokio::sync::oneshot::channel().0)
    }

    fn activate(data_dir: &std::path::Path, version: &str) -> std::path::PathBuf {
        let dir = upgrade::dir(data_dir);
        let program = dir.join(upgrade::program_name(version));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&program, "#!/bin/sh\n").unwrap();
        let active = Active {
            current: Installed {
                program: program.clone(),
                version: Some(version.into()),
            },
            previous: Installed {
                program: "/usr/bin/tether-agent".into(),
                version: None,
            },
        };
        upgrade::write_json(&dir.join(ACTIVE_FILE), &active).unwrap();
        program
    }

    #[test]
    fn a_restarted_monitor_runs_the_active_package_unless_the_build_is_newer() {
        let tmp = tempfile::tempdir().unwrap();
        let program = activate(tmp.path(), "99.0.0");
        let mut m = monitor(tmp.path());
        m.recover_upgrade_state();
        assert_eq!(m.current.program, program);
        assert_eq!(m.current.args, vec![std::ffi::OsString::from("worker")]);
        assert_eq!(
            m.current.env,
            vec![(PACKAGE_VERSION_ENV.to_owned(), "99.0.0".to_owned())]
        );

        let tmp = tempfile::tempdir().unwrap();
        let old = activate(tmp.path(), "0.0.1");
        let mut m = monitor(tmp.path());
        m.recover_upgrade_state();
        assert_eq!(
            m.current.program,
            std::path::PathBuf::from("/usr/bin/tether-agent")
        );
        assert!(m.current.env.is_empty());
        assert!(!old.exists() && !upgrade::dir(tmp.path()).join(ACTIVE_FILE).exists());
    }

    /// A data directory whose worker "staged" `package` as 2.0.0, signed by the pinned key.
    fn staged_dir(package: &str) -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let server = tether_shared::identity::Identity::generate();
        crate::state::AgentState {
            agent_id: "a-1".into(),
            name: "t".into(),
            tags: Vec::new(),
            upstreams: vec!["wss://localhost:1".into()],
            server_signing_key: server.public_key_b64(),
        }
        .save(tmp.path())
        .unwrap();
        let dir = upgrade::dir(tmp.path());
        std::fs::create_dir_all(&dir).unwrap();
        let program = dir.join(upgrade::program_name("2.0.0"));
        std::fs::write(&program, package).unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (sha256, size) = upgrade::sha256_file(&program).unwrap();
        let signature = server.sign(&tether_shared::upgrade::package_signing_bytes(
            "2.0.0", &sha256,
        ));
        let staged = Staged {
            version: "2.0.0".into(),
            sha256,
            size,
            signature,
            program,
        };
        upgrade::write_json(&dir.join(STAGED_FILE), &staged).unwrap();
        tmp
    }

    /// Runs a monitor whose worker exits 75 at once, until `result.json` appears.
    async fn swap(data: &std::path::Path) -> (UpgradeResult, crate::monitor::MonitorHealth) {
        let mut m = monitor(data);
        m.opts.worker = WorkerCommand {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "exit 75".into()],
            env: Vec::new(),
        };
        m.current = m.opts.worker.clone();
        m.installed.program = m.opts.worker.program.clone();
        m.opts.upgrade.healthy_after = Duration::from_millis(300);
        m.opts.upgrade.trial_timeout = Duration::from_secs(5);
        let (done, outcome) = tokio::sync::oneshot::channel();
        m.done = Some(done);
        let addr = m.start();
        let path = upgrade::dir(data).join(RESULT_FILE);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let result = loop {
            if let Some(r) = upgrade::read_json::<UpgradeResult>(&path).unwrap() {
                break r;
            }
            assert!(std::time::Instant::now() < deadline, "no result");
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        };
        let health = addr.send(crate::monitor::Observe).await.unwrap();
        addr.do_send(crate::monitor::Shutdown { signal: "test" });
        let _ = outcome.await;
        (result, health)
    }

    #[actix::test]
    async fn a_staged_package_that_beats_is_promoted() {
        let data = staged_dir("#!/bin/sh\nwhile echo beat; do sleep 0.05; done\n");
        let (result, health) = swap(data.path()).await;
        assert_eq!(result.outcome, UpgradeOutcome::Done, "{result:?}");
        assert_eq!(health.upgrades_done, 1);
        let dir = upgrade::dir(data.path());
        let active: Active = upgrade::read_json(&dir.join(ACTIVE_FILE)).unwrap().unwrap();
        assert_eq!(active.current.version.as_deref(), Some("2.0.0"));
        assert_eq!(active.previous.program, std::path::PathBuf::from("/bin/sh"));
        assert!(!dir.join(STAGED_FILE).exists() && !dir.join(TRIAL_FILE).exists());
    }

    #[actix::test]
    async fn a_staged_package_that_exits_is_rolled_back_and_removed() {
        let data = staged_dir("#!/bin/sh\nexit 3\n");
        let (result, health) = swap(data.path()).await;
        assert_eq!(result.outcome, UpgradeOutcome::RolledBack, "{result:?}");
        assert!(result.reason.contains("exited with code 3"), "{result:?}");
        assert_eq!(health.upgrades_rolled_back, 1);
        let dir = upgrade::dir(data.path());
        assert!(!dir.join(ACTIVE_FILE).exists());
        assert!(!dir.join(upgrade::program_name("2.0.0")).exists());
    }

    #[actix::test]
    async fn a_staged_package_that_does_not_verify_is_refused() {
        let data = staged_dir("#!/bin/sh\nexit 0\n");
        let program = upgrade::dir(data.path()).join(upgrade::program_name("2.0.0"));
        std::fs::write(&program, "#!/bin/sh\nexit 1\n").unwrap();
        let (result, _) = swap(data.path()).await;
        assert_eq!(result.outcome, UpgradeOutcome::RolledBack, "{result:?}");
        assert!(
            result.reason.contains("refused by the monitor"),
            "{result:?}"
        );
        assert!(!program.exists());
    }

    #[test]
    fn a_promotion_cut_short_by_a_monitor_restart_is_completed() {
        let tmp = tempfile::tempdir().unwrap();
        let program = activate(tmp.path(), "99.0.0");
        let dir = upgrade::dir(tmp.path());
        let staged = Staged {
            version: "99.0.0".into(),
            sha256: "ab".repeat(32),
            size: 10,
            signature: "sig".into(),
            program: program.clone(),
        };
        upgrade::write_json(&dir.join(TRIAL_FILE), &staged).unwrap();
        let mut m = monitor(tmp.path());
        m.recover_upgrade_state();
        let result: UpgradeResult = upgrade::read_json(&dir.join(RESULT_FILE)).unwrap().unwrap();
        assert_eq!(result.outcome, UpgradeOutcome::Done);
        assert!(program.exists() && !dir.join(TRIAL_FILE).exists());
        assert_eq!(m.current.program, program);
    }

    #[test]
    fn a_trial_cut_short_by_a_monitor_restart_is_rolled_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = upgrade::dir(tmp.path());
        std::fs::create_dir_all(&dir).unwrap();
        let program = dir.join(upgrade::program_name("2.0.0"));
        std::fs::write(&program, "#!/bin/sh\n").unwrap();
        let staged = Staged {
            version: "2.0.0".into(),
            sha256: "ab".repeat(32),
            size: 10,
            signature: "sig".into(),
            program: program.clone(),
        };
        upgrade::write_json(&dir.join(TRIAL_FILE), &staged).unwrap();
        let mut m = monitor(tmp.path());
        m.recover_upgrade_state();
        let result: UpgradeResult = upgrade::read_json(&dir.join(RESULT_FILE)).unwrap().unwrap();
        assert_eq!(result.outcome, UpgradeOutcome::RolledBack);
        assert!(result.reason.contains("restarted"), "{result:?}");
        assert!(!program.exists() && !dir.join(TRIAL_FILE).exists());
        assert_eq!(
            m.current.program,
            std::path::PathBuf::from("/usr/bin/tether-agent")
        );
    }
}
