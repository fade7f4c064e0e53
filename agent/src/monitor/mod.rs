//! `tether-agent run`: the **monitor process**. Its [`Monitor`] actor starts the worker process
//! (`tether-agent worker`), watches its beats on a pipe, restarts it with jittered exponential
//! backoff when it exits or stops beating, and gives up past the restart budget by exiting
//! non-zero so that systemd (or the operator) notices. SIGTERM/SIGINT stop the worker gracefully.
//!
//! The monitor opens no socket of any kind: its only channel to the worker is the worker's stdio.
//!
//! It also swaps in upgrades the worker staged, on trial, and rolls them back (see [`upgrade`]).
//!
//! # Layout
//! - this file: [`run`], the [`Monitor`] actor, the messages it handles and [`MonitorHealth`].
//! - [`worker_process`]: starting a worker, the beat protocol, the stdout reader and the child's
//!   owner task.
//! - [`upgrade`]: the swap, the trial of the new worker, the rollback.
//!
//! Test-only override: `TETHER_AGENT_WORKER=<program>` (plus optional whitespace-separated
//! `TETHER_AGENT_WORKER_ARGS`) replaces the worker command; see `main.rs`.

mod upgrade;
pub mod worker_process;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use actix::{Actor, ActorContext, AsyncContext, Context, Handler, Message, SpawnHandle};
use actix_rt::signal::unix::{signal, SignalKind};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::state::STATE_FILE;

pub use tether_shared::backoff::{Backoff, RestartBudget};
use worker_process::{Stop, WorkerProcess};
pub use worker_process::{WorkerCommand, WorkerExit};

use crate::upgrade::Installed;
/// Exit code by which a worker says "an upgrade is staged, swap me in".
pub use crate::upgrade::UPGRADE_EXIT_CODE;
use crate::worker::uplink::operations::RESTART_EXIT_CODE;
use upgrade::Trial;

/// First restart delay ceiling; doubles per restart (full jitter).
pub const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Ceiling of the restart delay.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A worker beating for this long after its start resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Time a worker gets after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// What to supervise and how.
#[derive(Debug, Clone)]
pub struct MonitorOptions {
    /// How to start the worker.
    pub worker: WorkerCommand,
    /// Silence after which the worker is killed and restarted.
    pub beat_timeout: Duration,
    /// Restarts allowed per window.
    pub restart_budget: u32,
    /// The window the budget applies to.
    pub restart_window: Duration,
    /// First restart delay ceiling.
    pub backoff_min: Duration,
    /// Restart delay ceiling.
    pub backoff_max: Duration,
    /// How long the worker must beat after its start before the backoff resets.
    pub stable_after: Duration,
    /// Time the worker gets after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
    /// Where upgrades are handed over, and their trial.
    pub upgrade: UpgradeOptions,
}

/// How the monitor runs an upgrade's trial.
#[derive(Debug, Clone)]
pub struct UpgradeOptions {
    /// The data directory: `DATA/upgrade/` and the pinned server key in `DATA/agent.json`.
    pub data_dir: PathBuf,
    /// How long a swapped-in worker must beat before it counts as healthy.
    pub healthy_after: Duration,
    /// How long it has to become healthy before it is rolled back.
    pub trial_timeout: Duration,
}

/// Why `run` could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The data directory was not prepared by `tether-agent install`.
    #[error("{} is not installed ({STATE_FILE} is missing): run `tether-agent install --data {} ...` first", dir.display(), dir.display())]
    NotInstalled {
        /// The data directory.
        dir: PathBuf,
    },
    /// The data directory could not be checked.
    #[error("{}: {source}", path.display())]
    DataDir {
        /// The file looked for.
        path: PathBuf,
        /// The underlying failure.
        source: io::Error,
    },
    /// The SIGINT/SIGTERM handlers could not be installed.
    #[error("cannot install the SIGINT/SIGTERM handlers: {0}")]
    Signal(io::Error),
    /// The worker kept failing: more restarts than the budget allows within the window.
    #[error("the worker was restarted more than {budget} times within {window:?}; giving up")]
    RestartBudgetExceeded {
        /// Restarts allowed per window.
        budget: u32,
        /// The window.
        window: Duration,
    },
    /// The monitor actor stopped without saying why.
    #[error("the monitor stopped unexpectedly")]
    Vanished,
}

/// How the monitor ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Stopped by a signal after the worker stopped.
    Stopped,
    /// Gave up: restart budget exceeded.
    BudgetExceeded,
}

/// Refuses a data directory that `tether-agent install` has not prepared.
pub fn check_installed(dir: &Path) -> Result<(), MonitorError> {
    let path = dir.join(STATE_FILE);
    match path.try_exists() {
        Ok(true) => Ok(()),
        Ok(false) => Err(MonitorError::NotInstalled {
            dir: dir.to_path_buf(),
        }),
        Err(source) => Err(MonitorError::DataDir { path, source }),
    }
}

/// Runs the monitor on its own actor system until a stop signal (`Ok`) or until it gives up.
pub fn run(data_dir: &Path, opts: MonitorOptions) -> Result<(), MonitorError> {
    check_installed(data_dir)?;
    let system = actix_rt::System::new();
    let outcome = system.block_on(async move {
        // Handlers first, so that a signal during startup is never fatal by default action.
        let mut terminate = signal(SignalKind::terminate()).map_err(MonitorError::Signal)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(MonitorError::Signal)?;
        let (done, mut outcome) = oneshot::channel();
        let budget = (opts.restart_budget, opts.restart_window);
        let monitor = Monitor::new(opts, done).start();
        loop {
            let name = tokio::select! {
                result = &mut outcome => {
                    return match result {
                        Ok(Outcome::Stopped) => Ok(()),
                        Ok(Outcome::BudgetExceeded) => Err(MonitorError::RestartBudgetExceeded {
                            budget: budget.0,
                            window: budget.1,
                        }),
                        Err(_) => Err(MonitorError::Vanished),
                    };
                }
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            };
            monitor.do_send(Shutdown { signal: name });
        }
    });
    outcome
}

/// Health snapshot of the monitor and its worker: restart counts and the last exit. The worker
/// will receive it to report upstream in its heartbeats.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MonitorHealth {
    /// The running worker's pid, if one runs.
    pub pid: Option<u32>,
    /// Workers started after the first one.
    pub restarts: u64,
    /// Worker exits with a code, by code.
    pub exits_by_code: BTreeMap<i32, u64>,
    /// Workers killed by a signal the monitor did not send for a beat timeout, by signal.
    pub crashes_by_signal: BTreeMap<i32, u64>,
    /// Workers killed because they stopped beating.
    pub beat_timeouts: u64,
    /// How the last worker ended.
    pub last_exit: Option<WorkerExit>,
    /// Wall-clock time of the last beat, in ms since the Unix epoch.
    pub last_beat_unix_ms: Option<u64>,
    /// Time since the last beat, in ms, when the snapshot was taken.
    pub last_beat_age_ms: Option<u64>,
    /// The health JSON of the worker's last `beat <json>` line.
    pub worker_health: Option<serde_json::Value>,
    /// Upgrades swapped in and kept since the monitor started.
    pub upgrades_done: u64,
    /// Upgrades rolled back (or staged packages refused) since the monitor started.
    pub upgrades_rolled_back: u64,
}

/// The worker sent a beat line.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct BeatReceived {
    /// Which worker (the monitor numbers them).
    pub generation: u64,
    /// Its health JSON, if the line carried valid JSON.
    pub health: Option<serde_json::Value>,
}

/// A worker process ended (and was reaped).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct WorkerExited {
    /// Which worker.
    pub generation: u64,
    /// How it ended.
    pub exit: WorkerExit,
}

/// Stop the worker gracefully, then stop the monitor.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown {
    /// The signal that asked for it, for the log.
    pub signal: &'static str,
}

/// A health snapshot.
#[derive(Debug, Message)]
#[rtype(result = "MonitorHealth")]
pub struct Observe;

/// The running worker, as the monitor tracks it.
#[derive(Debug)]
struct RunningWorker {
    /// Which worker this is.
    generation: u64,
    /// Handle to signal it.
    process: WorkerProcess,
    /// When it was started.
    started: Instant,
    /// When it last beat (its start until the first beat).
    last_beat: Instant,
    /// Whether it beat at least once.
    has_beaten: bool,
    /// Set once the monitor killed it for silence: its exit then counts as a timeout.
    timed_out: bool,
}

/// Supervises the worker process: starts it, restarts it with backoff, kills it when it stops
/// beating and stops it on shutdown. Handles [`BeatReceived`], [`WorkerExited`], [`Shutdown`]
/// and [`Observe`].
pub struct Monitor {
    /// What to supervise and how.
    opts: MonitorOptions,
    /// Delay before the next restart.
    backoff: Backoff,
    /// Restarts allowed per window.
    budget: RestartBudget,
    /// Counters reported in health snapshots.
    health: MonitorHealth,
    /// When the last beat arrived, for the snapshot's age.
    last_beat: Option<Instant>,
    /// The worker, while one runs.
    worker: Option<RunningWorker>,
    /// Number of the most recently started worker.
    generation: u64,
    /// The scheduled restart, cancelled on shutdown.
    pending_restart: Option<SpawnHandle>,
    /// Set by [`Shutdown`]: no more restarts.
    stopping: bool,
    /// Tells `run` how the monitor ended.
    done: Option<oneshot::Sender<Outcome>>,
    /// How to start the worker now: `opts.worker`, or an upgraded program.
    current: WorkerCommand,
    /// What `current` runs (for `active.json`).
    installed: Installed,
    /// A package on trial.
    trial: Option<Trial>,
    /// A staged package is being verified (no worker runs meanwhile).
    verifying: bool,
}

impl Monitor {
    fn new(opts: MonitorOptions, done: oneshot::Sender<Outcome>) -> Self {
        Self {
            current: opts.worker.clone(),
            installed: Installed {
                program: opts.worker.program.clone(),
                version: None,
            },
            trial: None,
            verifying: false,
            backoff: Backoff::new(opts.backoff_min, opts.backoff_max),
            budget: RestartBudget::new(opts.restart_budget, opts.restart_window),
            opts,
            health: MonitorHealth::default(),
            last_beat: None,
            worker: None,
            generation: 0,
            pending_restart: None,
            stopping: false,
            done: Some(done),
        }
    }

    fn start_worker(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.pending_restart.take() {
            ctx.cancel_future(handle);
        }
        if self.stopping {
            return;
        }
        let command = self.current.clone();
        if self.spawn_worker(ctx, &command).is_none() {
            self.health.last_exit = Some(WorkerExit::Unknown);
            self.schedule_restart(ctx, None, WorkerExit::Unknown);
        }
    }

    /// Starts `command` as the next worker generation; `None` if it could not be spawned.
    fn spawn_worker(&mut self, ctx: &mut Context<Self>, command: &WorkerCommand) -> Option<u64> {
        self.generation += 1;
        let generation = self.generation;
        let me = ctx.address();
        match WorkerProcess::spawn(command, generation, me.clone().recipient(), me.recipient()) {
            Ok(process) => {
                let now = Instant::now();
                tracing::info!(pid = process.pid, generation, program = %command.program.display(), "worker-started");
                self.health.pid = Some(process.pid);
                self.worker = Some(RunningWorker {
                    generation,
                    process,
                    started: now,
                    last_beat: now,
                    has_beaten: false,
                    timed_out: false,
                });
                Some(generation)
            }
            Err(e) => {
                tracing::error!(program = %command.program.display(), error = %e, "worker-spawn-failed");
                None
            }
        }
    }

    /// Stops the monitor if it is stopping and nothing runs any more.
    fn finish_if_idle(&mut self, ctx: &mut Context<Self>) {
        if self.stopping && self.worker.is_none() && !self.verifying {
            self.finish(ctx, Outcome::Stopped);
        }
    }

    /// Restarts after a delay, or gives up past the budget.
    fn schedule_restart(&mut self, ctx: &mut Context<Self>, pid: Option<u32>, exit: WorkerExit) {
        let (code, signal) = match exit {
            WorkerExit::Code(c) => (Some(c), None),
            WorkerExit::Signal(s) => (None, Some(s)),
            WorkerExit::Unknown => (None, None),
        };
        if !self.budget.try_restart(Instant::now()) {
            tracing::error!(
                pid,
                code,
                signal,
                restarts = self.health.restarts,
                in_window = self.budget.in_window(),
                budget = self.opts.restart_budget,
                window_ms = u64::try_from(self.opts.restart_window.as_millis()).unwrap_or(u64::MAX),
                health = %self.snapshot_json(),
                "restart-budget-exceeded"
            );
            self.finish(ctx, Outcome::BudgetExceeded);
            return;
        }
        self.health.restarts += 1;
        let delay = self.backoff.next_delay(&mut rand::thread_rng());
        tracing::warn!(
            pid,
            code,
            signal,
            restarts = self.health.restarts,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            health = %self.snapshot_json(),
            "worker-exited"
        );
        self.pending_restart = Some(ctx.run_later(delay, |act, ctx| act.start_worker(ctx)));
    }

    /// Kills a worker that has been silent for longer than the beat timeout.
    fn check_beats(&mut self) {
        if self.stopping {
            return;
        }
        let timeout = self.opts.beat_timeout;
        let Some(worker) = self.worker.as_mut().filter(|w| !w.timed_out) else {
            return;
        };
        let silent = worker.last_beat.elapsed();
        if silent < timeout {
            return;
        }
        worker.timed_out = true;
        self.health.beat_timeouts += 1;
        tracing::warn!(
            pid = worker.process.pid,
            silent_ms = u64::try_from(silent.as_millis()).unwrap_or(u64::MAX),
            beat_timeouts = self.health.beat_timeouts,
            "worker-beat-timeout"
        );
        worker.process.signal(Stop::Kill);
    }

    /// Reports `outcome` to `run` and stops; a worker still running is killed.
    fn finish(&mut self, ctx: &mut Context<Self>, outcome: Outcome) {
        if let Some(worker) = self.worker.take() {
            worker.process.signal(Stop::Kill);
        }
        if let Some(done) = self.done.take() {
            // Err: `run` is gone already; nobody is left to tell.
            let _ = done.send(outcome);
        }
        ctx.stop();
    }

    fn snapshot(&self) -> MonitorHealth {
        let mut health = self.health.clone();
        health.last_beat_age_ms = self
            .last_beat
            .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX));
        health
    }

    fn snapshot_json(&self) -> String {
        serde_json::to_string(&self.snapshot()).unwrap_or_default()
    }
}

impl Actor for Monitor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let period = (self.opts.beat_timeout / 4).max(Duration::from_millis(10));
        ctx.run_interval(period, |act, _| act.check_beats());
        self.recover_upgrade_state();
        self.start_worker(ctx);
    }
}

impl Handler<BeatReceived> for Monitor {
    type Result = ();

    fn handle(&mut self, msg: BeatReceived, _: &mut Self::Context) {
        let Some(worker) = self
            .worker
            .as_mut()
            .filter(|w| w.generation == msg.generation)
        else {
            return;
        };
        let now = Instant::now();
        worker.last_beat = now;
        if !worker.has_beaten {
            worker.has_beaten = true;
            tracing::info!(pid = worker.process.pid, "worker-beating");
        }
        if self.backoff.attempt() > 0
            && now.duration_since(worker.started) >= self.opts.stable_after
        {
            tracing::info!(pid = worker.process.pid, "worker-stable");
            self.backoff.reset();
        }
        self.last_beat = Some(now);
        self.health.last_beat_unix_ms = Some(tether_shared::clock::now_unix_ms());
        if msg.health.is_some() {
            self.health.worker_health = msg.health;
        }
        if self.trial.is_some() {
            self.check_trial();
        }
    }
}

impl Handler<WorkerExited> for Monitor {
    type Result = ();

    fn handle(&mut self, msg: WorkerExited, ctx: &mut Self::Context) {
        let Some(worker) = self.worker.take_if(|w| w.generation == msg.generation) else {
            return;
        };
        let pid = worker.process.pid;
        self.health.pid = None;
        self.health.last_exit = Some(msg.exit);
        let mut upgrade_requested = false;
        match msg.exit {
            _ if worker.timed_out => {}
            WorkerExit::Code(code) => {
                *self.health.exits_by_code.entry(code).or_default() += 1;
                if code == UPGRADE_EXIT_CODE {
                    tracing::info!(pid, code, "worker-requested-upgrade");
                    upgrade_requested = true;
                }
                if code == RESTART_EXIT_CODE && !self.stopping && self.trial.is_none() {
                    // An operator asked for it: a new worker now, outside the restart budget.
                    tracing::info!(pid, code, "worker-restart-requested");
                    self.health.restarts += 1;
                    self.start_worker(ctx);
                    return;
                }
            }
            WorkerExit::Signal(signal) => {
                *self.health.crashes_by_signal.entry(signal).or_default() += 1;
            }
            WorkerExit::Unknown => {}
        }
        if self.stopping {
            tracing::info!(pid, exit = ?msg.exit, "worker-stopped");
            self.finish(ctx, Outcome::Stopped);
            return;
        }
        if let Some(trial) = self.trial.take_if(|t| t.generation == msg.generation) {
            let lived = worker.started.elapsed();
            self.trial_ended(ctx, trial, msg.exit, lived, worker.timed_out);
            return;
        }
        if upgrade_requested {
            self.on_upgrade_requested(ctx, msg.exit);
            return;
        }
        self.schedule_restart(ctx, Some(pid), msg.exit);
    }
}

impl Handler<Shutdown> for Monitor {
    type Result = ();

    fn handle(&mut self, msg: Shutdown, ctx: &mut Self::Context) {
        if self.stopping {
            tracing::info!(signal = msg.signal, "monitor-already-stopping");
            return;
        }
        self.stopping = true;
        if let Some(handle) = self.pending_restart.take() {
            ctx.cancel_future(handle);
        }
        let Some(worker) = &self.worker else {
            tracing::info!(signal = msg.signal, "monitor-stopping");
            // A staged package being verified: its callback finishes.
            self.finish_if_idle(ctx);
            return;
        };
        let generation = worker.generation;
        tracing::info!(
            signal = msg.signal,
            pid = worker.process.pid,
            grace_ms = u64::try_from(self.opts.stop_grace.as_millis()).unwrap_or(u64::MAX),
            "monitor-stopping"
        );
        worker.process.signal(Stop::Terminate);
        ctx.run_later(self.opts.stop_grace, move |act, _| {
            if let Some(worker) = act.worker.as_ref().filter(|w| w.generation == generation) {
                tracing::warn!(pid = worker.process.pid, "worker-stop-timeout");
                worker.process.signal(Stop::Kill);
            }
        });
    }
}

impl Handler<Observe> for Monitor {
    type Result = actix::MessageResult<Observe>;

    fn handle(&mut self, _: Observe, _: &mut Self::Context) -> Self::Result {
        actix::MessageResult(self.snapshot())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    fn options(script: &str) -> MonitorOptions {
        MonitorOptions {
            worker: WorkerCommand {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), script.into()],
                env: Vec::new(),
            },
            beat_timeout: Duration::from_secs(30),
            restart_budget: 100,
            restart_window: Duration::from_secs(60),
            backoff_min: Duration::from_millis(1),
            backoff_max: Duration::from_millis(5),
            stable_after: Duration::from_secs(60),
            stop_grace: Duration::from_secs(5),
            upgrade: UpgradeOptions {
                data_dir: "/nonexistent/tether-agent-test".into(),
                healthy_after: Duration::from_secs(1),
                trial_timeout: Duration::from_secs(5),
            },
        }
    }

    /// Asks `monitor` for snapshots until `done` accepts one (at most 10 s).
    async fn observe_until(
        monitor: &actix::Addr<Monitor>,
        done: impl Fn(&MonitorHealth) -> bool,
    ) -> MonitorHealth {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let health = monitor.send(Observe).await.unwrap();
            if done(&health) {
                return health;
            }
            assert!(Instant::now() < deadline, "gave up at {health:?}");
            actix_rt::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[actix::test]
    async fn observe_counts_exits_and_keeps_the_last_health() {
        let (done, outcome) = oneshot::channel();
        let script = r#"echo 'beat {"n":1}'; echo chatter; exit 3"#;
        let monitor = Monitor::new(options(script), done).start();
        let health = observe_until(&monitor, |h| {
            h.exits_by_code.get(&3).is_some_and(|&n| n >= 2) && h.worker_health.is_some()
        })
        .await;
        assert!(health.restarts >= 2, "{health:?}");
        assert_eq!(health.last_exit, Some(WorkerExit::Code(3)));
        assert_eq!(health.worker_health, Some(serde_json::json!({"n": 1})));
        assert!(health.crashes_by_signal.is_empty() && health.beat_timeouts == 0);

        monitor.do_send(Shutdown { signal: "test" });
        assert_eq!(outcome.await.unwrap(), Outcome::Stopped);
    }

    #[actix::test]
    async fn shutdown_terminates_a_running_worker_and_reports_stopped() {
        let (done, outcome) = oneshot::channel();
        // Beats once, then waits on its stdin, which the monitor holds open.
        let monitor = Monitor::new(options("echo beat; read -r _"), done).start();
        let health = observe_until(&monitor, |h| h.last_beat_unix_ms.is_some()).await;
        let pid = health.pid.unwrap();
        assert!(Path::new(&format!("/proc/{pid}")).exists());

        monitor.do_send(Shutdown { signal: "test" });
        assert_eq!(outcome.await.unwrap(), Outcome::Stopped);
        // Reaped by the owner task before the outcome was sent.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
