//! `StepRunner`: the actor that owns the steps running on this agent, supervised on its own.
//!
//! The uplink decides when a step starts (once its start is durable) and journals how it
//! ended; the runner only runs it: it spawns the step, kills it on cancel, and reports its
//! output and its end to the uplink that adopted it last ([`Adopt`]). So a step outlives a
//! crash of the uplink: the uplink's next instance adopts the runner, learns which steps the
//! runner still holds (they were not interrupted), and is sent again every end it has not
//! settled ([`Settled`]) — a duplicate end is ignored by the job's record, which knows the step
//! ended. A step dies only with the runner (its process group is killed with the future) or
//! the worker process; the uplink then finds it running in the job's record and settles it as
//! after a restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use tether_shared::ids::JobId;
use tether_shared::protocol::StepSpec;
use tokio::sync::oneshot;

use super::step::{self, StepContext, StepResult};
use crate::worker::supervisor::Ping;

/// What the runner tells the uplink, in order: a step's chunks, then its end.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub enum StepReport {
    Chunk {
        job_id: JobId,
        step: usize,
        attempt: u32,
        data: String,
    },
    Done {
        job_id: JobId,
        step: usize,
        attempt: u32,
        result: StepResult,
    },
}

/// Run step `step` of job `job_id`, its start number `attempt` (at most one step of a job runs
/// at a time).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RunStep {
    pub job_id: JobId,
    pub step: usize,
    pub attempt: u32,
    pub spec: StepSpec,
    pub ctx: StepContext,
}

/// Kill the running step of `job_id` (its end is reported as usual).
#[derive(Message)]
#[rtype(result = "()")]
pub struct KillStep {
    pub job_id: JobId,
}

/// The uplink journaled the end of step `step` of `job_id`: forget it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Settled {
    pub job_id: JobId,
    pub step: usize,
    pub attempt: u32,
}

/// Send reports here from now on. Answers with every (job, step) the runner holds, running or
/// ended but not settled; the ends not settled are sent again.
#[derive(Message)]
#[rtype(result = "Vec<(JobId, usize)>")]
pub struct Adopt(pub Recipient<StepReport>);

/// Where the uplink finds the runner: set by the supervisor's factory each time it builds one,
/// with a generation that tells the uplink a new runner (holding nothing) replaced the old.
#[derive(Clone, Default)]
pub struct RunnerSlot(Arc<Mutex<Option<Generation>>>);

/// A runner and its generation (0 for the first).
pub type Generation = (u64, Addr<StepRunner>);

impl RunnerSlot {
    pub fn set(&self, addr: Addr<StepRunner>) {
        if let Ok(mut slot) = self.0.lock() {
            let generation = slot.as_ref().map_or(0, |(g, _)| g + 1);
            *slot = Some((generation, addr));
        }
    }

    pub fn get(&self) -> Option<Generation> {
        self.0.lock().ok().and_then(|slot| slot.clone())
    }
}

/// A step the runner holds.
struct Held {
    step: usize,
    attempt: u32,
    /// Fired to kill the step; `None` once it ended.
    kill: Option<oneshot::Sender<()>>,
    /// Its end, until settled.
    result: Option<StepResult>,
}

#[derive(Default)]
pub struct StepRunner {
    report_to: Option<Recipient<StepReport>>,
    /// By job.
    held: HashMap<JobId, Held>,
    /// Chunks produced while no uplink could take them.
    chunks_lost: u64,
}

/// A report from one of the runner's own step futures.
#[derive(Message)]
#[rtype(result = "()")]
struct FromStep(StepReport);

impl StepRunner {
    fn report(&mut self, report: StepReport) {
        match &self.report_to {
            Some(to) if to.connected() => to.do_send(report),
            // Kept in `held` if it is an end; output between two uplinks is lost.
            _ => {
                if matches!(report, StepReport::Chunk { .. }) {
                    self.chunks_lost += 1;
                    // Logged at 1, 2, 4, 8… lost chunks: a long gap does not flood the log.
                    if self.chunks_lost.is_power_of_two() {
                        tracing::warn!(lost = self.chunks_lost, "step-output-lost-no-uplink");
                    }
                }
            }
        }
    }
}

impl Actor for StepRunner {
    type Context = Context<Self>;
}

impl Handler<RunStep> for StepRunner {
    type Result = ();

    fn handle(&mut self, msg: RunStep, ctx: &mut Self::Context) {
        let RunStep {
            job_id,
            step,
            attempt,
            spec,
            ctx: step_ctx,
        } = msg;
        if self.held.get(&job_id).is_some_and(|h| h.result.is_none()) {
            tracing::error!(job_id = %job_id, step, "step-refused-job-has-one-running");
            return;
        }
        let (kill, killed) = oneshot::channel();
        self.held.insert(
            job_id.clone(),
            Held {
                step,
                attempt,
                kill: Some(kill),
                result: None,
            },
        );
        tracing::info!(job_id = %job_id, step, name = %spec.name, "step-started");
        let addr = ctx.address();
        let for_chunks = job_id.clone();
        let run = async move {
            let chunk = move |data: String| {
                addr.do_send(FromStep(StepReport::Chunk {
                    job_id: for_chunks.clone(),
                    step,
                    attempt,
                    data,
                }))
            };
            step::run(&spec, &step_ctx, chunk, killed).await
        };
        // Tied to the runner: if it dies, the step's process group is killed with the future.
        // Its end goes through the mailbox, behind the step's last chunks.
        let done = ctx.address();
        ctx.spawn(
            async move {
                let result = run.await;
                done.do_send(FromStep(StepReport::Done {
                    job_id,
                    step,
                    attempt,
                    result,
                }));
            }
            .into_actor(self),
        );
    }
}

impl Handler<FromStep> for StepRunner {
    type Result = ();

    fn handle(&mut self, msg: FromStep, _: &mut Self::Context) {
        if let StepReport::Done {
            job_id,
            step,
            attempt,
            result,
        } = &msg.0
        {
            let this = |h: &&mut Held| h.step == *step && h.attempt == *attempt;
            if let Some(held) = self.held.get_mut(job_id).filter(this) {
                held.kill = None;
                held.result = Some(result.clone());
            }
        }
        self.report(msg.0);
    }
}

impl Handler<KillStep> for StepRunner {
    type Result = ();

    fn handle(&mut self, msg: KillStep, _: &mut Self::Context) {
        if let Some(kill) = self.held.get_mut(&msg.job_id).and_then(|h| h.kill.take()) {
            let _ = kill.send(());
        }
    }
}

impl Handler<Settled> for StepRunner {
    type Result = ();

    fn handle(&mut self, msg: Settled, _: &mut Self::Context) {
        let ended = |h: &Held| h.step == msg.step && h.attempt == msg.attempt && h.result.is_some();
        if self.held.get(&msg.job_id).is_some_and(ended) {
            self.held.remove(&msg.job_id);
        }
    }
}

impl Handler<Adopt> for StepRunner {
    type Result = MessageResult<Adopt>;

    fn handle(&mut self, msg: Adopt, _: &mut Self::Context) -> Self::Result {
        self.report_to = Some(msg.0);
        let ended: Vec<StepReport> = self
            .held
            .iter()
            .filter_map(|(job_id, h)| {
                h.result.clone().map(|result| StepReport::Done {
                    job_id: job_id.clone(),
                    step: h.step,
                    attempt: h.attempt,
                    result,
                })
            })
            .collect();
        for report in ended {
            self.report(report);
        }
        MessageResult(
            self.held
                .iter()
                .map(|(job_id, h)| (job_id.clone(), h.step))
                .collect(),
        )
    }
}

impl Handler<Ping> for StepRunner {
    type Result = String;

    fn handle(&mut self, _: Ping, _: &mut Self::Context) -> String {
        let running = self.held.values().filter(|h| h.result.is_none()).count();
        if running == 0 { "idle" } else { "running" }.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tether_shared::protocol::StepStatus;

    /// Collects reports; `Stop` ends it (like an uplink that crashed).
    #[derive(Default)]
    struct Uplink {
        reports: Arc<Mutex<Vec<String>>>,
    }

    impl Actor for Uplink {
        type Context = Context<Self>;
    }

    impl Handler<StepReport> for Uplink {
        type Result = ();

        fn handle(&mut self, msg: StepReport, _: &mut Self::Context) {
            let line = match msg {
                StepReport::Chunk { data, .. } => format!("chunk {}", data.trim()),
                StepReport::Done { result, .. } => format!("done {:?}", result.status),
            };
            if let Ok(mut r) = self.reports.lock() {
                r.push(line);
            }
        }
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct Stop;

    impl Handler<Stop> for Uplink {
        type Result = ();

        fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
            ctx.stop();
        }
    }

    fn shell(script: &str, dir: &std::path::Path) -> RunStep {
        RunStep {
            job_id: "j1".into(),
            step: 0,
            attempt: 1,
            spec: step::tests::spec("shell", "run", &[("script", script)], &[], 30_000),
            ctx: step::tests::context(dir),
        }
    }

    async fn wait_for(reports: &Arc<Mutex<Vec<String>>>, what: &str) -> Vec<String> {
        for _ in 0..400 {
            let now = reports.lock().map(|r| r.clone()).unwrap_or_default();
            if now.iter().any(|l| l == what) {
                return now;
            }
            actix_rt::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no {what:?} in {:?}", reports.lock().map(|r| r.clone()));
    }

    #[actix_rt::test]
    async fn a_step_outlives_its_uplink_and_its_end_reaches_the_next_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runner = StepRunner::default().start();
        let first = Uplink::default();
        let first_reports = first.reports.clone();
        let first = first.start();
        assert!(runner
            .send(Adopt(first.clone().recipient()))
            .await
            .expect("adopt")
            .is_empty());
        let gate = dir.path().join("go");
        let script = format!(
            "echo started; while [ ! -e {} ]; do sleep 0.05; done; echo finished",
            gate.display()
        );
        runner.do_send(shell(&script, dir.path()));
        wait_for(&first_reports, "chunk started").await;
        // The uplink dies while the step runs; the step goes on.
        first.send(Stop).await.expect("stop");
        std::fs::write(&gate, b"").expect("gate");
        let second = Uplink::default();
        let second_reports = second.reports.clone();
        let second = second.start();
        // Until the step ends, adopting says it is running; after, its end is sent again.
        let mut held = Vec::new();
        for _ in 0..400 {
            held = runner
                .send(Adopt(second.clone().recipient()))
                .await
                .expect("adopt");
            if second_reports
                .lock()
                .map(|r| !r.is_empty())
                .unwrap_or(false)
            {
                break;
            }
            actix_rt::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(
            held,
            vec![("j1".into(), 0)],
            "the runner still holds the step"
        );
        let seen = wait_for(
            &second_reports,
            &format!("done {:?}", StepStatus::Succeeded),
        )
        .await;
        assert!(
            !seen.iter().any(|l| l == "chunk started"),
            "output already delivered is not sent again: {seen:?}"
        );
        // Once settled, nothing is held or sent again.
        runner.do_send(Settled {
            job_id: "j1".into(),
            step: 0,
            attempt: 1,
        });
        let third = Uplink::default().start();
        assert!(runner
            .send(Adopt(third.recipient()))
            .await
            .expect("adopt")
            .is_empty());
        assert_eq!(runner.send(Ping).await.expect("ping"), "idle");
    }

    #[actix_rt::test]
    async fn a_killed_step_reports_its_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runner = StepRunner::default().start();
        let uplink = Uplink::default();
        let reports = uplink.reports.clone();
        runner
            .send(Adopt(uplink.start().recipient()))
            .await
            .expect("adopt");
        runner.do_send(shell("echo up; sleep 30", dir.path()));
        wait_for(&reports, "chunk up").await;
        assert_eq!(runner.send(Ping).await.expect("ping"), "running");
        runner.do_send(KillStep {
            job_id: "j1".into(),
        });
        wait_for(&reports, &format!("done {:?}", StepStatus::Cancelled)).await;
    }
}
