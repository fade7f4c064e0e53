//! The uplink's job runner: a `RunJob` becomes a durable record (in the batch that accepts
//! the command), then each transition — step started, output chunk, step finished, job
//! finished — is journaled together with the event that reports it, before the next one
//! happens. A step's process starts only once its `StepStarted` is durable, so after any crash
//! the record tells whether it may have run; `JobRecord::recover` settles it. Jobs run whether
//! or not the uplink is connected: their events wait in the journal for the next session.
//!
//! Steps run in the [`StepRunner`], supervised apart from the uplink: a step outlives a crash of
//! the uplink, whose next instance adopts the runner and is told which steps still run.

use std::collections::{BTreeMap, HashSet};

use actix::prelude::*;
use tether_shared::enroll::Upstream;
use tether_shared::journal::{JournalError, JournalHandle, Op};
use tether_shared::protocol::{EventBody, JobStatus, Seq, StepSpec, StepStatus};

use super::Uplink;
use crate::worker::jobs::book::{record_key, JobRecord, Next, INTERRUPTED, RECORD_PREFIX};
use crate::worker::jobs::outputs;
use crate::worker::jobs::runner::{Adopt, KillStep, RunStep, Settled, StepReport};
use crate::worker::jobs::step::{StepContext, StepResult};

/// Event slots kept free of output chunks, so that every step and job end finds room.
const CONTROL_RESERVE: usize = 1_024;
/// A step starts only with this much room left (its end, a skip or two, the job's end).
const START_RESERVE: usize = CONTROL_RESERVE + 64;
/// How often finished jobs are looked at for pruning, and most pruned at once.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
const PRUNE_BATCH: usize = 256;
/// The first chunk after some were dropped says so.
const GAP_MARKER: &str = "[output lost: the agent's event backlog was full]\n";

/// Every job the agent holds, and which are mid-transition.
pub(crate) struct Jobs {
    records: BTreeMap<String, JobRecord>,
    /// A commit for the job is in flight: its next transition waits.
    busy: HashSet<String>,
    /// A step waits for the event backlog to drain (acks resume it).
    held_for_backlog: bool,
    /// Output chunks were dropped for a full backlog, by (job, step): the next one says so.
    gaps: HashSet<(String, usize)>,
    /// When finished jobs were last looked at for pruning.
    last_prune: std::time::Instant,
}

impl Default for Jobs {
    fn default() -> Self {
        Jobs {
            records: BTreeMap::new(),
            busy: HashSet::new(),
            held_for_backlog: false,
            gaps: HashSet::new(),
            last_prune: std::time::Instant::now(),
        }
    }
}

impl Jobs {
    /// Every job record in the journal.
    pub(crate) fn load(journal: &JournalHandle) -> Result<Jobs, JournalError> {
        let mut records = BTreeMap::new();
        for (key, value) in journal.scan_meta(RECORD_PREFIX)? {
            match serde_json::from_slice::<JobRecord>(&value) {
                Ok(r) => {
                    records.insert(r.job_id.clone(), r);
                }
                Err(e) => tracing::error!(key = %key, error = %e, "job-record-unreadable"),
            }
        }
        Ok(Jobs {
            records,
            ..Jobs::default()
        })
    }

    /// `JobFinished` of `job_id` was numbered `seq`.
    fn mark_end(&mut self, job_id: &str, seq: Seq) {
        if let Some(r) = self.records.get_mut(job_id) {
            r.end_seq = seq.0;
            r.finished_unix_ms = crate::worker::uplink::now_ms();
        }
    }

    /// Steps running now, or whose start is being journaled (the drain waits for them).
    pub(crate) fn steps_running(&self) -> usize {
        self.records
            .values()
            .filter(|r| r.finished.is_none())
            .flat_map(|r| r.progress.iter())
            .filter(|p| p.running)
            .count()
    }
}

impl Handler<StepReport> for Uplink {
    type Result = ();

    fn handle(&mut self, msg: StepReport, ctx: &mut Self::Context) {
        match msg {
            StepReport::Chunk {
                job_id,
                step,
                attempt,
                data,
            } => self.step_chunk(ctx, job_id, (step, attempt), data),
            // It comes after every chunk the step sent, so its `StepFinished` is numbered after
            // all of its output.
            StepReport::Done {
                job_id,
                step,
                attempt,
                result,
            } => self.step_done(ctx, &job_id, (step, attempt), result),
        }
    }
}

impl Uplink {
    /// A chunk of a running step's output.
    fn step_chunk(
        &mut self,
        ctx: &mut Context<Self>,
        job_id: String,
        (step, attempt): (usize, u32),
        data: String,
    ) {
        // Output never takes the room that step and job ends need: past it, chunks are
        // dropped and the next one that fits says so.
        if !self.ep.outbound.has_room(CONTROL_RESERVE + 1) {
            if self.jobs.gaps.insert((job_id.clone(), step)) {
                tracing::warn!(job_id = %job_id, step, "output-dropped-backlog-full");
            }
            return;
        }
        let Some(p) = self
            .jobs
            .records
            .get_mut(&job_id)
            .and_then(|r| r.progress.get_mut(step))
            .filter(|p| p.running && p.attempt == attempt)
        else {
            return;
        };
        let chunk = p.next_chunk;
        p.next_chunk += 1;
        let data = if self.jobs.gaps.remove(&(job_id.clone(), step)) {
            format!("{GAP_MARKER}{data}")
        } else {
            data
        };
        let event = EventBody::StepOutput {
            job_id: job_id.clone(),
            step: step as u32,
            chunk,
            data,
        };
        self.emit(ctx, &job_id, vec![event], false, |_, _| {});
    }

    /// Adopt the step runner if it is new (at start, and after the supervisor rebuilt it):
    /// the steps it holds still run; every other step found running is settled as after a
    /// restart.
    pub(super) fn adopt_runner(&mut self, ctx: &mut Context<Self>) {
        let Some((generation, runner)) = self.cfg.runner.get() else {
            return;
        };
        if self.runner.as_ref().is_some_and(|(g, _)| *g == generation) {
            return;
        }
        self.runner = Some((generation, runner.clone()));
        let me = ctx.address().recipient();
        ctx.wait(
            runner
                .send(Adopt(me))
                .into_actor(self)
                .map(move |held, act, ctx| {
                    let held: HashSet<String> = match held {
                        Ok(held) => held.into_iter().map(|(job, _)| job).collect(),
                        // Gone already: its steps died with it; the next tick adopts the next.
                        Err(_) => {
                            act.runner = None;
                            HashSet::new()
                        }
                    };
                    tracing::info!(generation, steps_held = held.len(), "step-runner-adopted");
                    act.resume_jobs(ctx, &held);
                }),
        );
    }

    fn record_op(&self, job_id: &str) -> Option<Op> {
        let record = self.jobs.records.get(job_id)?;
        let value = serde_json::to_vec(record).ok()?;
        Some(Op::PutMeta {
            key: record_key(job_id),
            value,
        })
    }

    /// A `RunJob` was accepted: its record and `JobAccepted` join the command's batch.
    /// Returns the event's seq, or `None` for a job already known (a resent command).
    pub(super) fn accept_job(
        &mut self,
        job_id: String,
        deployment_id: String,
        steps: Vec<StepSpec>,
        ops: &mut Vec<Op>,
    ) -> Option<Seq> {
        if self.jobs.records.contains_key(&job_id) {
            tracing::info!(job_id = %job_id, "job-already-known");
            return None;
        }
        self.jobs.records.insert(
            job_id.clone(),
            JobRecord::new(job_id.clone(), deployment_id, steps),
        );
        ops.extend(self.record_op(&job_id));
        let (seq, op) = self.event_op(EventBody::JobAccepted {
            job_id: job_id.clone(),
        })?;
        ops.push(op);
        tracing::info!(job_id = %job_id, "job-accepted");
        Some(seq)
    }

    /// A job that arrived after its deadline: recorded as finished, reported expired.
    pub(super) fn expire_job(
        &mut self,
        job_id: String,
        deployment_id: String,
        ops: &mut Vec<Op>,
    ) -> Option<Seq> {
        if self.jobs.records.contains_key(&job_id) {
            return None;
        }
        let mut record = JobRecord::new(job_id.clone(), deployment_id, Vec::new());
        record.finished = Some(JobStatus::Expired);
        self.jobs.records.insert(job_id.clone(), record);
        let (seq, op) = self.event_op(EventBody::JobFinished {
            job_id: job_id.clone(),
            status: JobStatus::Expired,
        })?;
        self.jobs.mark_end(&job_id, seq);
        ops.extend(self.record_op(&job_id));
        ops.push(op);
        Some(seq)
    }

    /// A `CancelJob` was accepted: the flag joins the command's batch; the running step dies.
    pub(super) fn accept_cancel(&mut self, job_id: &str, ops: &mut Vec<Op>) {
        let Some(record) = self.jobs.records.get_mut(job_id) else {
            return;
        };
        if record.finished.is_some() {
            return;
        }
        record.cancel = true;
        ops.extend(self.record_op(job_id));
        if let Some((_, runner)) = &self.runner {
            runner.do_send(KillStep {
                job_id: job_id.to_owned(),
            });
        }
    }

    /// Settle the jobs whose step was running and is not among the runner's (`held`): it died
    /// with the worker or the runner. Then drive every unfinished job.
    fn resume_jobs(&mut self, ctx: &mut Context<Self>, held: &HashSet<String>) {
        let ids: Vec<String> = self
            .jobs
            .records
            .keys()
            .filter(|id| !held.contains(*id) && !self.jobs.busy.contains(*id))
            .cloned()
            .collect();
        for id in ids {
            let interrupted = match self.jobs.records.get_mut(&id) {
                Some(r) if r.finished.is_none() => r.recover(),
                _ => continue,
            };
            let events: Vec<EventBody> = interrupted
                .into_iter()
                .map(|i| {
                    tracing::warn!(job_id = %id, step = i, "step-interrupted");
                    EventBody::StepFinished {
                        job_id: id.clone(),
                        step: i as u32,
                        status: StepStatus::Interrupted,
                        exit_code: None,
                        outputs: BTreeMap::new(),
                        message: INTERRUPTED.into(),
                    }
                })
                .collect();
            let job = id.clone();
            self.emit(ctx, &id, events, true, move |act, ctx| {
                act.advance(ctx, &job)
            });
        }
    }

    /// Journal `events` with the job's record (one batch); then `then`. With `exclusive`, the
    /// job is busy until the commit is durable.
    fn emit(
        &mut self,
        ctx: &mut Context<Self>,
        job_id: &str,
        events: Vec<EventBody>,
        exclusive: bool,
        then: impl FnOnce(&mut Self, &mut Context<Self>) + 'static,
    ) {
        let mut ops = Vec::new();
        let mut last = None;
        for e in events {
            let ends_job = matches!(e, EventBody::JobFinished { .. });
            match self.event_op(e) {
                Some((seq, op)) => {
                    ops.push(op);
                    last = Some(seq);
                    if ends_job {
                        self.jobs.mark_end(job_id, seq);
                    }
                }
                None => tracing::error!(job_id = %job_id, "event-backlog-full"),
            }
        }
        ops.extend(self.record_op(job_id));
        if exclusive {
            self.jobs.busy.insert(job_id.to_owned());
        }
        let job = job_id.to_owned();
        self.commit_then(ctx, ops, move |act, ctx| {
            if let Some(last) = last {
                act.ep.outbound.mark_durable(last);
            }
            if exclusive {
                act.jobs.busy.remove(&job);
            }
            act.pump();
            then(act, ctx);
        });
    }

    /// Take the job's next step: start, skip, or finish it.
    pub(super) fn advance(&mut self, ctx: &mut Context<Self>, job_id: &str) {
        if self.jobs.busy.contains(job_id) {
            return;
        }
        // No step starts while an upgrade is underway (see `worker::upgrade`).
        let steps_allowed = self.steps_allowed();
        let Some(record) = self.jobs.records.get_mut(job_id) else {
            return;
        };
        let job = job_id.to_owned();
        match record.next() {
            Next::Wait | Next::Done => {}
            Next::Skip {
                step,
                status,
                message,
            } => {
                record.end(step, status);
                let event = EventBody::StepFinished {
                    job_id: job.clone(),
                    step: step as u32,
                    status,
                    exit_code: None,
                    outputs: BTreeMap::new(),
                    message: message.into(),
                };
                let j = job.clone();
                self.emit(ctx, &job, vec![event], true, move |act, ctx| {
                    act.advance(ctx, &j)
                });
            }
            Next::Finish { status } => {
                record.finished = Some(status);
                tracing::info!(job_id = %job, status = ?status, "job-finished");
                self.emit(
                    ctx,
                    &job,
                    vec![EventBody::JobFinished {
                        job_id: job.clone(),
                        status,
                    }],
                    true,
                    |_, _| {},
                );
            }
            Next::Start { .. } if !steps_allowed => {
                tracing::info!(job_id = %job, "step-held-for-upgrade");
            }
            Next::Start { .. } if !self.ep.outbound.has_room(START_RESERVE) => {
                if !self.jobs.held_for_backlog {
                    tracing::warn!(job_id = %job, "step-held-backlog-full");
                }
                self.jobs.held_for_backlog = true;
            }
            Next::Start { step, attempt } => {
                record.start(step, attempt);
                let event = EventBody::StepStarted {
                    job_id: job.clone(),
                    step: step as u32,
                    attempt,
                };
                let j = job.clone();
                // The process starts only once its start is durable.
                self.emit(ctx, &job, vec![event], true, move |act, _| {
                    act.run_step(&j, step, attempt)
                });
            }
        }
    }

    /// Deletes the records and work directories of jobs whose end the server acknowledged
    /// longer ago than the retention (checked at most every [`PRUNE_EVERY`]).
    pub(super) fn prune_jobs(&mut self, ctx: &mut Context<Self>) {
        if self.jobs.last_prune.elapsed() < PRUNE_EVERY {
            return;
        }
        self.jobs.last_prune = std::time::Instant::now();
        let (acked, now) = (self.ep.outbound.acked().0, super::now_ms());
        let retention = u64::try_from(self.cfg.job_retention.as_millis()).unwrap_or(u64::MAX);
        let gone: Vec<String> = self
            .jobs
            .records
            .values()
            .filter(|r| !self.jobs.busy.contains(&r.job_id))
            .filter(|r| r.prunable(acked, now, retention))
            .map(|r| r.job_id.clone())
            .take(PRUNE_BATCH)
            .collect();
        if gone.is_empty() {
            return;
        }
        let ops = gone
            .iter()
            .map(|id| Op::DeleteMeta {
                key: record_key(id),
            })
            .collect();
        let dirs: Vec<_> = gone.iter().map(|id| self.cfg.work_dir.join(id)).collect();
        for id in &gone {
            self.jobs.records.remove(id);
        }
        tracing::info!(jobs = gone.len(), "finished-jobs-pruned");
        // The directories go once the records are durably gone (a crash in between leaves a
        // directory without a record, never a record without its directory).
        self.commit_then(ctx, ops, move |_, _| {
            std::thread::spawn(move || {
                for dir in dirs {
                    if let Err(e) = std::fs::remove_dir_all(&dir) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            tracing::warn!(dir = %dir.display(), error = %e, "work-dir-not-removed");
                        }
                    }
                }
            });
        });
    }

    /// Acks freed room in the event backlog: steps held for it may start.
    pub(super) fn resume_after_acks(&mut self, ctx: &mut Context<Self>) {
        if self.jobs.held_for_backlog && self.ep.outbound.has_room(START_RESERVE) {
            self.jobs.held_for_backlog = false;
            self.resume_held_jobs(ctx);
        }
    }

    /// Drives every unfinished job (after an upgrade ended: their next steps may start).
    pub(super) fn resume_held_jobs(&mut self, ctx: &mut Context<Self>) {
        let ids: Vec<String> = self
            .jobs
            .records
            .values()
            .filter(|r| r.finished.is_none())
            .map(|r| r.job_id.clone())
            .collect();
        for id in ids {
            self.advance(ctx, &id);
        }
    }

    fn run_step(&mut self, job_id: &str, step: usize, attempt: u32) {
        let Some(record) = self.jobs.records.get(job_id) else {
            return;
        };
        let Some(spec) = record.steps.get(step).cloned() else {
            return;
        };
        // Bulk downloads go to the upstream in use (or tried next), by its https base.
        // (Upstreams are validated at install: an unparsable one only fails bundle fetches.)
        let upstream = self
            .dial
            .upstreams_in_use_order()
            .next()
            .and_then(|u| Upstream::parse(u).ok())
            .unwrap_or(Upstream {
                host: String::new(),
                port: 0,
            });
        let step_ctx = StepContext {
            job_id: job_id.to_owned(),
            index: step,
            work_dir: self.cfg.work_dir.join(job_id),
            outputs: record.outputs_before(step),
            agent_id: self.cfg.agent_id.clone(),
            identity: self.cfg.identity.clone(),
            tls: self.cfg.trust.current().tls.clone(),
            upstream,
            plugin_dir: self.cfg.plugin_dir.clone(),
            artifact_cache: self.cfg.artifact_cache.clone(),
        };
        let Some((_, runner)) = &self.runner else {
            // No runner adopted yet: the step stays recorded as running, and is settled when
            // one is (as after a restart).
            return tracing::error!(job_id = %job_id, step, "step-not-started-no-runner");
        };
        runner.do_send(RunStep {
            job_id: job_id.to_owned(),
            step,
            attempt,
            spec,
            ctx: step_ctx,
        });
    }

    fn step_done(
        &mut self,
        ctx: &mut Context<Self>,
        job_id: &str,
        (step, attempt): (usize, u32),
        result: StepResult,
    ) {
        let settled = Settled {
            job_id: job_id.to_owned(),
            step,
            attempt,
        };
        let running = |r: &&mut JobRecord| {
            r.progress
                .get(step)
                .is_some_and(|p| p.running && p.attempt == attempt)
        };
        let Some(record) = self.jobs.records.get_mut(job_id).filter(running) else {
            // Its end is journaled already (sent again to a new uplink), or the job is gone.
            if let Some((_, runner)) = &self.runner {
                runner.do_send(settled);
            }
            return;
        };
        self.jobs.gaps.remove(&(job_id.to_owned(), step));
        let mut result = result;
        outputs::fit(&mut result);
        tracing::info!(job_id = %job_id, step, status = ?result.status, exit_code = ?result.exit_code, "step-finished");
        record.end(step, result.status);
        if let Some(p) = record.progress.get_mut(step) {
            p.outputs = result.outputs.clone();
        }
        let event = EventBody::StepFinished {
            job_id: job_id.to_owned(),
            step: step as u32,
            status: result.status,
            exit_code: result.exit_code,
            outputs: result.outputs,
            message: result.message,
        };
        let mut events = vec![event];
        // The job's last step: its end and the job's end go in one batch (one sync, not two).
        if let Next::Finish { status } = record.next() {
            record.finished = Some(status);
            tracing::info!(job_id = %job_id, status = ?status, "job-finished");
            events.push(EventBody::JobFinished {
                job_id: job_id.to_owned(),
                status,
            });
        }
        let job = job_id.to_owned();
        self.emit(ctx, job_id, events, true, move |act, ctx| {
            if let Some((_, runner)) = &act.runner {
                runner.do_send(settled);
            }
            act.advance(ctx, &job);
            // A drain may have been waiting for this step.
            act.drive_upgrade(ctx);
        });
    }
}
