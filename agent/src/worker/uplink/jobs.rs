//! The uplink's side of jobs: it journals what the sans-IO [`Ledger`] decides. A `RunJob`
//! becomes a durable record in the batch that accepts the command; then each transition —
//! step started, output chunk, step finished, job finished — is journaled together with the
//! event that reports it, before the next one happens. A step's process starts only once its
//! `StepStarted` is durable, so after any crash the record tells whether it may have run. Jobs
//! run whether or not the uplink is connected: their events wait in the journal for the next
//! session.
//!
//! Steps run in the [`StepRunner`](crate::worker::jobs::runner::StepRunner), supervised apart
//! from the uplink: a step outlives a crash of the uplink, whose next instance adopts the
//! runner and is told which steps still run.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tether_shared::enroll::Upstream;
use tether_shared::ids::JobId;
use tether_shared::journal::{JournalError, JournalHandle, Op};
use tether_shared::protocol::{EventBody, Seq, StepSpec};

use super::Uplink;
use crate::worker::jobs::book::{record_key, JobRecord, RECORD_PREFIX};
use crate::worker::jobs::ledger::{Allowance, Ledger, Then, Transition};
use crate::worker::jobs::runner::{Adopt, KillStep, RunStep, Settled, StepReport};
use crate::worker::jobs::step::StepContext;

/// Event slots kept free of output chunks, so that every step and job end finds room.
pub(super) const CONTROL_RESERVE: usize = 1_024;
/// A step starts only with this much room left (its end, a skip or two, the job's end).
const START_RESERVE: usize = CONTROL_RESERVE + 64;
/// How often finished jobs are looked at for pruning, and most pruned at once.
const PRUNE_EVERY: Duration = Duration::from_secs(5);
const PRUNE_BATCH: usize = 256;

/// Every job the agent holds.
pub(crate) struct Jobs {
    pub(super) ledger: Ledger,
    /// When finished jobs were last looked at for pruning.
    last_prune: Instant,
}

impl Jobs {
    /// Every job record in the journal.
    pub(crate) fn load(journal: &JournalHandle) -> Result<Jobs, JournalError> {
        let mut records = Vec::new();
        for (key, value) in journal.scan_meta(RECORD_PREFIX)? {
            match serde_json::from_slice::<JobRecord>(&value) {
                Ok(r) => records.push(r),
                Err(e) => tracing::error!(key = %key, error = %e, "job-record-unreadable"),
            }
        }
        Ok(Jobs {
            ledger: Ledger::new(records),
            last_prune: Instant::now(),
        })
    }

    /// Steps running now, or whose start is being journaled (the drain waits for them).
    pub(crate) fn steps_running(&self) -> usize {
        self.ledger.steps_running()
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
            } => {
                // Output never takes the room that step and job ends need.
                let room = self.ep.outbound.has_room(CONTROL_RESERVE + 1);
                if let Some(t) = self.jobs.ledger.chunk(&job_id, (step, attempt), data, room) {
                    self.journal_transition(ctx, t);
                }
            }
            // It comes after every chunk the step sent, so its `StepFinished` is numbered after
            // all of its output.
            StepReport::Done {
                job_id,
                step,
                attempt,
                result,
            } => match self.jobs.ledger.step_done(&job_id, (step, attempt), result) {
                Some(t) => self.journal_transition(ctx, t),
                // Journaled already (sent again to a new uplink), or the job is gone.
                None => self.settle(job_id, step, attempt),
            },
        }
    }
}

impl Uplink {
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
                    let held: HashSet<JobId> = match held {
                        Ok(held) => held.into_iter().map(|(job, _)| job).collect(),
                        // Gone already: its steps died with it; the next tick adopts the next.
                        Err(_) => {
                            act.runner = None;
                            HashSet::new()
                        }
                    };
                    tracing::info!(generation, steps_held = held.len(), "step-runner-adopted");
                    for t in act.jobs.ledger.recover(&held) {
                        act.journal_transition(ctx, t);
                    }
                }),
        );
    }

    fn settle(&self, job_id: JobId, step: usize, attempt: u32) {
        if let Some((_, runner)) = &self.runner {
            runner.do_send(Settled {
                job_id,
                step,
                attempt,
            });
        }
    }

    /// A `RunJob` was accepted: its record and `JobAccepted` join the command's batch (for a
    /// job already known, a `JobReport`). Returns the event's seq (`None`: no room).
    pub(super) fn accept_job(
        &mut self,
        job_id: &str,
        deployment_id: &str,
        steps: Vec<StepSpec>,
        ops: &mut Vec<Op>,
    ) -> Option<Seq> {
        let event = self.jobs.ledger.accept(job_id, deployment_id, steps);
        ops.extend(self.jobs.ledger.record_op(job_id));
        let (seq, op) = self.event_op(event)?;
        ops.push(op);
        Some(seq)
    }

    /// The server lost part of its history with this agent: a report of every job held, as
    /// far as the event backlog has room, then `JobsReported`. Returns the last event's seq.
    pub(super) fn report_jobs(&mut self, ops: &mut Vec<Op>) -> Option<Seq> {
        let reports = self.jobs.ledger.reports();
        let total = reports.len();
        let mut sent: u32 = 0;
        let mut last = None;
        for report in reports {
            // Room is kept for the closing event, and for step and job ends.
            if !self.ep.outbound.has_room(CONTROL_RESERVE + 2) {
                break;
            }
            let Some((seq, op)) = self.event_op(report) else {
                break;
            };
            ops.push(op);
            last = Some(seq);
            sent += 1;
        }
        let omitted = u32::try_from(total)
            .unwrap_or(u32::MAX)
            .saturating_sub(sent);
        tracing::warn!(jobs = sent, omitted, "jobs-reported-to-a-server-behind");
        if let Some((seq, op)) = self.event_op(EventBody::JobsReported {
            jobs: sent,
            omitted,
        }) {
            ops.push(op);
            last = Some(seq);
        }
        last
    }

    /// A job that arrived after its deadline: recorded as finished, reported expired.
    pub(super) fn expire_job(
        &mut self,
        job_id: &str,
        deployment_id: &str,
        ops: &mut Vec<Op>,
    ) -> Option<Seq> {
        let event = self.jobs.ledger.expire(job_id, deployment_id)?;
        let (seq, op) = self.event_op(event)?;
        self.jobs.ledger.mark_end(job_id, seq, super::now_ms());
        ops.extend(self.jobs.ledger.record_op(job_id));
        ops.push(op);
        Some(seq)
    }

    /// A `CancelJob` was accepted: the flag joins the command's batch; the running step dies.
    pub(super) fn accept_cancel(&mut self, job_id: &str, ops: &mut Vec<Op>) {
        if !self.jobs.ledger.cancel(job_id) {
            return;
        }
        ops.extend(self.jobs.ledger.record_op(job_id));
        if let Some((_, runner)) = &self.runner {
            runner.do_send(KillStep {
                job_id: job_id.into(),
            });
        }
    }

    /// Number the transition's events and journal them with the job's record (one batch);
    /// then follow its [`Then`].
    fn journal_transition(&mut self, ctx: &mut Context<Self>, t: Transition) {
        let Transition {
            job_id,
            events,
            exclusive,
            then,
        } = t;
        let mut ops = Vec::new();
        let mut last = None;
        for e in events {
            let ends_job = matches!(e, EventBody::JobFinished { .. });
            match self.event_op(e) {
                Some((seq, op)) => {
                    ops.push(op);
                    last = Some(seq);
                    if ends_job {
                        self.jobs.ledger.mark_end(&job_id, seq, super::now_ms());
                    }
                }
                None => tracing::error!(job_id = %job_id, "event-backlog-full"),
            }
        }
        ops.extend(self.jobs.ledger.record_op(&job_id));
        self.commit_then(ctx, ops, move |act, ctx| {
            if let Some(last) = last {
                act.ep.outbound.mark_durable(last);
            }
            if exclusive {
                act.jobs.ledger.durable(&job_id);
            }
            act.pump();
            match then {
                Then::Nothing => {}
                Then::Advance => act.advance(ctx, &job_id),
                Then::Run { step, attempt } => act.run_step(&job_id, step, attempt),
                Then::Settle { step, attempt } => {
                    act.settle(job_id.clone(), step, attempt);
                    act.advance(ctx, &job_id);
                    // A drain may have been waiting for this step.
                    act.drive_upgrade(ctx);
                }
            }
        });
    }

    /// Take the job's next step: start, skip, or finish it.
    pub(super) fn advance(&mut self, ctx: &mut Context<Self>, job_id: &str) {
        let allowed = Allowance {
            // No step starts while an upgrade is underway (see `worker::upgrade`).
            steps: self.steps_allowed(),
            room: self.ep.outbound.has_room(START_RESERVE),
        };
        if let Some(t) = self.jobs.ledger.advance(job_id, allowed) {
            self.journal_transition(ctx, t);
        }
    }

    /// Deletes the records and work directories of jobs whose end the server acknowledged
    /// longer ago than the retention (checked at most every [`PRUNE_EVERY`]).
    pub(super) fn prune_jobs(&mut self, ctx: &mut Context<Self>) {
        if self.jobs.last_prune.elapsed() < PRUNE_EVERY {
            return;
        }
        self.jobs.last_prune = Instant::now();
        let (acked, now) = (self.ep.outbound.acked().0, super::now_ms());
        let retention = u64::try_from(self.cfg.job_retention.as_millis()).unwrap_or(u64::MAX);
        let gone = self.jobs.ledger.prune(acked, now, retention, PRUNE_BATCH);
        if gone.is_empty() {
            return;
        }
        let ops = gone
            .iter()
            .map(|id| Op::DeleteMeta {
                key: record_key(id),
            })
            .collect();
        let dirs: Vec<_> = gone
            .iter()
            .map(|id| self.cfg.work_dir.join(id.as_str()))
            .collect();
        let run_as_dir = self.cfg.run_as.dir.clone();
        let gone_ids: Vec<String> = gone.iter().map(|id| id.to_string()).collect();
        tracing::info!(jobs = gone.len(), "finished-jobs-pruned");
        // The directories go once the records are durably gone (a crash in between leaves a
        // directory without a record, never a record without its directory).
        self.commit_then(ctx, ops, move |_, _| {
            std::thread::spawn(move || {
                for id in &gone_ids {
                    crate::worker::jobs::run_as::remove_job_dirs(&run_as_dir, id);
                }
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
        if self.jobs.ledger.held_for_backlog()
            && self.ep.outbound.has_room(START_RESERVE)
            && self.jobs.ledger.release_backlog_hold()
        {
            self.resume_held_jobs(ctx);
        }
    }

    /// Drives every unfinished job (after an upgrade ended: their next steps may start).
    pub(super) fn resume_held_jobs(&mut self, ctx: &mut Context<Self>) {
        for id in self.jobs.ledger.unfinished() {
            self.advance(ctx, &id);
        }
    }

    fn run_step(&mut self, job_id: &str, step: usize, attempt: u32) {
        let Some((spec, outputs)) = self.jobs.ledger.step(job_id, step) else {
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
            outputs,
            agent_id: self.cfg.agent_id.clone(),
            identity: self.cfg.identity.clone(),
            tls: self.cfg.trust.current().tls.clone(),
            upstream,
            plugin_dir: self.cfg.plugin_dir.clone(),
            artifact_cache: self.cfg.artifact_cache.clone(),
            sealing: self.cfg.sealing.clone(),
            run_as: self.cfg.run_as.clone(),
        };
        let Some((_, runner)) = &self.runner else {
            // No runner adopted yet: the step stays recorded as running, and is settled when
            // one is (as after a restart).
            return tracing::error!(job_id = %job_id, step, "step-not-started-no-runner");
        };
        runner.do_send(RunStep {
            job_id: job_id.into(),
            step,
            attempt,
            spec,
            ctx: step_ctx,
        });
    }
}
