//! `Ledger`: every job the agent holds, and what each of its transitions journals (sans IO).
//!
//! Each method takes what happened (a command accepted, a step's chunk or end, a restart) and
//! returns a [`Transition`]: the events to journal, in one batch with the job's record, and what
//! to do once that batch is durable. The uplink numbers the events, commits the batch and then
//! follows [`Then`]; nothing here touches the journal, the network or a process, so every rule
//! is tested on its own below.
//!
//! Rules: a step starts only once its `StepStarted` is durable; a job's transitions happen one
//! at a time (a job is *busy* while an exclusive batch is in flight); output never takes the
//! room step and job ends need, and the first chunk after some were dropped says so; a step
//! found running after a restart is rerun if its plugin declared that safe, else reported
//! interrupted.

use std::collections::{BTreeMap, HashSet};

use tether_shared::ids::JobId;
use tether_shared::journal::Op;
use tether_shared::protocol::{EventBody, JobStatus, Seq, StepSpec, StepStatus};

use super::book::{record_key, JobRecord, Next, INTERRUPTED};
use super::outputs;
use super::step::StepResult;

/// The first chunk after some were dropped says so.
pub const GAP_MARKER: &str = "[output lost: the agent's event backlog was full]\n";
/// A step whose last output was dropped (no later chunk carried the marker) says so in the
/// message of its end, which the operator sees with its status.
pub const OUTPUT_LOST: &str = "the end of its output was lost: the agent's event backlog was full";

/// What to do once a transition's batch is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Then {
    Nothing,
    /// Take the job's next step.
    Advance,
    /// Start the step (its start is durable now).
    Run {
        step: usize,
        attempt: u32,
    },
    /// Tell the runner the step's end is journaled, then take the job's next step.
    Settle {
        step: usize,
        attempt: u32,
    },
}

/// One batch for one job.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub job_id: JobId,
    pub events: Vec<EventBody>,
    /// The job's next transition waits until this one is durable ([`Ledger::durable`]).
    pub exclusive: bool,
    pub then: Then,
}

/// What may start now.
#[derive(Debug, Clone, Copy)]
pub struct Allowance {
    /// No upgrade is underway.
    pub steps: bool,
    /// The event backlog has room for a step's start, end and the job's end.
    pub room: bool,
}

#[derive(Default)]
pub struct Ledger {
    records: BTreeMap<JobId, JobRecord>,
    /// A commit for the job is in flight: its next transition waits.
    busy: HashSet<JobId>,
    /// A step waits for the event backlog to drain (acks resume it).
    held_for_backlog: bool,
    /// Output chunks were dropped for a full backlog, by (job, step): the next one says so.
    gaps: HashSet<(JobId, usize)>,
}

impl Ledger {
    pub fn new(records: impl IntoIterator<Item = JobRecord>) -> Self {
        Ledger {
            records: records.into_iter().map(|r| (r.job_id.clone(), r)).collect(),
            ..Ledger::default()
        }
    }

    /// The job's record as a journal op (it joins every batch of the job).
    pub fn record_op(&self, job_id: &str) -> Option<Op> {
        let record = self.records.get(job_id)?;
        let value = serde_json::to_vec(record).ok()?;
        Some(Op::PutMeta {
            key: record_key(job_id),
            value,
        })
    }

    /// `JobFinished` of `job_id` was numbered `seq` at `now_ms`.
    pub fn mark_end(&mut self, job_id: &str, seq: Seq, now_ms: u64) {
        if let Some(r) = self.records.get_mut(job_id) {
            r.end_seq = seq.0;
            r.finished_unix_ms = now_ms;
        }
    }

    /// An exclusive batch of the job is durable.
    pub fn durable(&mut self, job_id: &str) {
        self.busy.remove(job_id);
    }

    /// Steps running now, or whose start is being journaled (an upgrade's drain waits for them).
    pub fn steps_running(&self) -> usize {
        self.records
            .values()
            .filter(|r| r.finished.is_none())
            .flat_map(|r| r.progress.iter())
            .filter(|p| p.running)
            .count()
    }

    /// What step `step` of `job_id` runs, and the outputs of the steps before it.
    pub fn step(&self, job_id: &str, step: usize) -> Option<(StepSpec, BTreeMap<String, String>)> {
        let record = self.records.get(job_id)?;
        let spec = record.steps.get(step)?.clone();
        Some((spec, record.outputs_before(step)))
    }

    /// A `RunJob` was accepted: `JobAccepted` joins the command's batch with the new record.
    /// For a job already known (sent again by a server restored behind this agent), where it
    /// stands instead: it never runs twice.
    pub fn accept(&mut self, job_id: &str, deployment_id: &str, steps: Vec<StepSpec>) -> EventBody {
        if let Some(known) = self.records.get(job_id) {
            tracing::info!(job_id = %job_id, "job-already-known");
            return EventBody::JobReport(known.report());
        }
        let record = JobRecord::new(job_id.into(), deployment_id.into(), steps);
        self.records.insert(job_id.into(), record);
        tracing::info!(job_id = %job_id, "job-accepted");
        EventBody::JobAccepted {
            job_id: job_id.to_owned(),
        }
    }

    /// Where every job held stands, oldest first (`CommandBody::Reconcile`).
    pub fn reports(&self) -> Vec<EventBody> {
        let mut records: Vec<&JobRecord> = self.records.values().collect();
        records.sort_by_key(|r| (r.finished.is_none(), r.finished_unix_ms));
        records
            .into_iter()
            .map(|r| EventBody::JobReport(r.report()))
            .collect()
    }

    /// A job that arrived after its deadline: recorded as finished, reported expired.
    pub fn expire(&mut self, job_id: &str, deployment_id: &str) -> Option<EventBody> {
        if self.records.contains_key(job_id) {
            return None;
        }
        let mut record = JobRecord::new(job_id.into(), deployment_id.into(), Vec::new());
        record.finished = Some(JobStatus::Expired);
        self.records.insert(job_id.into(), record);
        Some(EventBody::JobFinished {
            job_id: job_id.to_owned(),
            status: JobStatus::Expired,
        })
    }

    /// A `CancelJob` was accepted. Returns whether the job's record changed (it joins the
    /// command's batch, and its running step is killed).
    pub fn cancel(&mut self, job_id: &str) -> bool {
        match self.records.get_mut(job_id) {
            Some(r) if r.finished.is_none() => {
                r.cancel = true;
                true
            }
            _ => false,
        }
    }

    /// Settle the unfinished jobs whose step was running and is not among the runner's
    /// (`held`): it died with the worker or the runner. Each job's batch then drives it.
    pub fn recover(&mut self, held: &HashSet<JobId>) -> Vec<Transition> {
        let ids: Vec<JobId> = self
            .records
            .iter()
            .filter(|(id, r)| r.finished.is_none() && !held.contains(*id))
            .filter(|(id, _)| !self.busy.contains(*id))
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for id in ids {
            let Some(record) = self.records.get_mut(id.as_str()) else {
                continue;
            };
            let events = record
                .recover()
                .into_iter()
                .map(|i| {
                    tracing::warn!(job_id = %id, step = i, "step-interrupted");
                    EventBody::StepFinished {
                        job_id: id.to_string(),
                        step: i as u32,
                        status: StepStatus::Interrupted,
                        exit_code: None,
                        outputs: BTreeMap::new(),
                        message: INTERRUPTED.into(),
                    }
                })
                .collect();
            out.push(self.exclusive(&id, events, Then::Advance));
        }
        out
    }

    fn exclusive(&mut self, job_id: &str, events: Vec<EventBody>, then: Then) -> Transition {
        self.busy.insert(job_id.into());
        Transition {
            job_id: job_id.into(),
            events,
            exclusive: true,
            then,
        }
    }

    /// The job's next transition: start, skip or finish a step; `None` while it waits (busy, a
    /// step running, held for an upgrade or a full backlog) or is done.
    pub fn advance(&mut self, job_id: &str, allowed: Allowance) -> Option<Transition> {
        if self.busy.contains(job_id) {
            return None;
        }
        let record = self.records.get_mut(job_id)?;
        let (events, then) = match record.next() {
            Next::Wait | Next::Done => return None,
            Next::Skip {
                step,
                status,
                message,
            } => {
                record.end(step, status);
                let event = EventBody::StepFinished {
                    job_id: job_id.to_owned(),
                    step: step as u32,
                    status,
                    exit_code: None,
                    outputs: BTreeMap::new(),
                    message: message.into(),
                };
                (vec![event], Then::Advance)
            }
            Next::Finish { status } => {
                record.finished = Some(status);
                tracing::info!(job_id = %job_id, status = ?status, "job-finished");
                let event = EventBody::JobFinished {
                    job_id: job_id.to_owned(),
                    status,
                };
                (vec![event], Then::Nothing)
            }
            Next::Start { .. } if !allowed.steps => {
                tracing::info!(job_id = %job_id, "step-held-for-upgrade");
                return None;
            }
            Next::Start { .. } if !allowed.room => {
                if !self.held_for_backlog {
                    tracing::warn!(job_id = %job_id, "step-held-backlog-full");
                }
                self.held_for_backlog = true;
                return None;
            }
            Next::Start { step, attempt } => {
                record.start(step, attempt);
                let event = EventBody::StepStarted {
                    job_id: job_id.to_owned(),
                    step: step as u32,
                    attempt,
                };
                // The process starts only once its start is durable.
                (vec![event], Then::Run { step, attempt })
            }
        };
        Some(self.exclusive(job_id, events, then))
    }

    /// Acks freed room in the event backlog: whether steps held for it may start now.
    pub fn release_backlog_hold(&mut self) -> bool {
        std::mem::take(&mut self.held_for_backlog)
    }

    pub fn held_for_backlog(&self) -> bool {
        self.held_for_backlog
    }

    /// Every unfinished job (to drive them all after an upgrade or a backlog hold ended).
    pub fn unfinished(&self) -> Vec<JobId> {
        self.records
            .values()
            .filter(|r| r.finished.is_none())
            .map(|r| r.job_id.clone())
            .collect()
    }

    /// A chunk of a running step's output; `room`: the backlog has room past what step and
    /// job ends need. Chunks of a step not running (a late one of an earlier attempt) go.
    pub fn chunk(
        &mut self,
        job_id: &str,
        (step, attempt): (usize, u32),
        data: String,
        room: bool,
    ) -> Option<Transition> {
        if !room {
            if self.gaps.insert((job_id.into(), step)) {
                tracing::warn!(job_id = %job_id, step, "output-dropped-backlog-full");
            }
            return None;
        }
        let p = self
            .records
            .get_mut(job_id)
            .and_then(|r| r.progress.get_mut(step))
            .filter(|p| p.running && p.attempt == attempt)?;
        let chunk = p.next_chunk;
        p.next_chunk += 1;
        let data = if self.gaps.remove(&(job_id.into(), step)) {
            format!("{GAP_MARKER}{data}")
        } else {
            data
        };
        let event = EventBody::StepOutput {
            job_id: job_id.to_owned(),
            step: step as u32,
            chunk,
            data,
        };
        Some(Transition {
            job_id: job_id.into(),
            events: vec![event],
            exclusive: false,
            then: Then::Nothing,
        })
    }

    /// A step ended. `None` if that attempt is not running (its end is journaled already: a
    /// runner sent it again to a new uplink), and the runner is only told it is settled.
    pub fn step_done(
        &mut self,
        job_id: &str,
        (step, attempt): (usize, u32),
        mut result: StepResult,
    ) -> Option<Transition> {
        let running = |r: &&mut JobRecord| {
            r.progress
                .get(step)
                .is_some_and(|p| p.running && p.attempt == attempt)
        };
        let record = self.records.get_mut(job_id).filter(running)?;
        if self.gaps.remove(&(job_id.into(), step)) {
            result.message = if result.message.is_empty() {
                OUTPUT_LOST.to_owned()
            } else {
                format!("{}; {OUTPUT_LOST}", result.message)
            };
        }
        outputs::fit(&mut result);
        tracing::info!(job_id = %job_id, step, status = ?result.status, exit_code = ?result.exit_code, "step-finished");
        record.end(step, result.status);
        if let Some(p) = record.progress.get_mut(step) {
            p.outputs = result.outputs.clone();
            p.exit_code = result.exit_code;
            p.message = result.message.clone();
        }
        let mut events = vec![EventBody::StepFinished {
            job_id: job_id.to_owned(),
            step: step as u32,
            status: result.status,
            exit_code: result.exit_code,
            outputs: result.outputs,
            message: result.message,
        }];
        // The job's last step: its end and the job's end go in one batch (one sync, not two).
        if let Next::Finish { status } = record.next() {
            record.finished = Some(status);
            tracing::info!(job_id = %job_id, status = ?status, "job-finished");
            events.push(EventBody::JobFinished {
                job_id: job_id.to_owned(),
                status,
            });
        }
        Some(self.exclusive(job_id, events, Then::Settle { step, attempt }))
    }

    /// Up to `limit` finished jobs whose end the server acknowledged (`acked`) at least
    /// `retention_ms` before `now_ms`: removed here; their records' deletes are returned.
    pub fn prune(
        &mut self,
        acked: u64,
        now_ms: u64,
        retention_ms: u64,
        limit: usize,
    ) -> Vec<JobId> {
        let gone: Vec<JobId> = self
            .records
            .values()
            .filter(|r| !self.busy.contains(&r.job_id))
            .filter(|r| r.prunable(acked, now_ms, retention_ms))
            .map(|r| r.job_id.clone())
            .take(limit)
            .collect();
        for id in &gone {
            self.records.remove(id.as_str());
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_shared::protocol::OnInterrupt;

    const ALL: Allowance = Allowance {
        steps: true,
        room: true,
    };

    fn spec(on_interrupt: OnInterrupt) -> StepSpec {
        let mut spec = super::super::step::tests::spec("shell", "run", &[], &[], 1000);
        spec.on_interrupt = on_interrupt;
        spec
    }

    fn ok() -> StepResult {
        StepResult {
            status: StepStatus::Succeeded,
            exit_code: Some(0),
            outputs: BTreeMap::new(),
            message: String::new(),
        }
    }

    fn kind(e: &EventBody) -> &'static str {
        match e {
            EventBody::JobAccepted { .. } => "job_accepted",
            EventBody::StepStarted { .. } => "step_started",
            EventBody::StepOutput { .. } => "step_output",
            EventBody::StepFinished { .. } => "step_finished",
            EventBody::JobFinished { .. } => "job_finished",
            _ => "other",
        }
    }

    fn kinds(t: &Transition) -> Vec<&'static str> {
        t.events.iter().map(kind).collect()
    }

    #[test]
    fn a_job_runs_step_by_step_one_batch_at_a_time() {
        let mut l = Ledger::default();
        let steps = vec![spec(OnInterrupt::Fail), spec(OnInterrupt::Fail)];
        assert!(matches!(
            l.accept("j", "d", steps.clone()),
            EventBody::JobAccepted { .. }
        ));
        match l.accept("j", "d", steps.clone()) {
            EventBody::JobReport(r) => {
                assert_eq!((r.job_id.as_str(), r.status), ("j", None));
                assert_eq!(r.steps.len(), 2);
                assert!(r.steps.iter().all(|s| s.status.is_none() && s.attempt == 0));
            }
            other => panic!("a resent RunJob is reported, not run again: {other:?}"),
        }
        let start = l.advance("j", ALL).expect("start");
        assert_eq!(
            start.then,
            Then::Run {
                step: 0,
                attempt: 1
            }
        );
        assert!(start.exclusive);
        // Busy until its start is durable: nothing else happens to the job.
        assert!(l.advance("j", ALL).is_none());
        l.durable("j");
        assert!(l.advance("j", ALL).is_none(), "step 0 runs: wait");
        assert_eq!(l.steps_running(), 1);
        let chunk = l.chunk("j", (0, 1), "out".into(), true).expect("chunk");
        assert!(!chunk.exclusive);
        let end = l.step_done("j", (0, 1), ok()).expect("end");
        assert_eq!(kinds(&end), vec!["step_finished"]);
        assert_eq!(
            end.then,
            Then::Settle {
                step: 0,
                attempt: 1
            }
        );
        assert!(
            l.step_done("j", (0, 1), ok()).is_none(),
            "an end sent again"
        );
        l.durable("j");
        let start = l.advance("j", ALL).expect("start 1");
        assert_eq!(
            start.then,
            Then::Run {
                step: 1,
                attempt: 1
            }
        );
        l.durable("j");
        let end = l.step_done("j", (1, 1), ok()).expect("end 1");
        assert_eq!(
            kinds(&end),
            vec!["step_finished", "job_finished"],
            "one batch"
        );
        l.durable("j");
        assert!(l.advance("j", ALL).is_none(), "done");
        assert!(l.unfinished().is_empty());
        // What a server that lost these events is told, as a reconcile and for a resent RunJob.
        let reports = l.reports();
        assert_eq!(reports, vec![l.accept("j", "d", steps)]);
        let EventBody::JobReport(r) = &reports[0] else {
            panic!("{reports:?}")
        };
        assert_eq!(r.status, Some(JobStatus::Succeeded));
        assert!(r
            .steps
            .iter()
            .all(|s| s.status == Some(StepStatus::Succeeded) && s.exit_code == Some(0)));
    }

    #[test]
    fn steps_wait_for_an_upgrade_and_for_room_and_output_gaps_are_marked() {
        let mut l = Ledger::default();
        l.accept("j", "d", vec![spec(OnInterrupt::Fail)]);
        let no_steps = Allowance {
            steps: false,
            room: true,
        };
        assert!(l.advance("j", no_steps).is_none());
        let no_room = Allowance {
            steps: true,
            room: false,
        };
        assert!(l.advance("j", no_room).is_none());
        assert!(l.held_for_backlog());
        assert!(l.release_backlog_hold());
        assert!(!l.held_for_backlog());
        l.advance("j", ALL).expect("start");
        l.durable("j");
        assert!(l.chunk("j", (0, 1), "lost".into(), false).is_none());
        let next = l.chunk("j", (0, 1), "kept".into(), true).expect("chunk");
        match &next.events[0] {
            EventBody::StepOutput { data, chunk, .. } => {
                assert_eq!(*chunk, 0);
                assert_eq!(data, &format!("{GAP_MARKER}kept"));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            l.chunk("j", (0, 2), "stale".into(), true).is_none(),
            "a chunk of another attempt"
        );
        // Output dropped with no later chunk to say so: the step's end says it.
        assert!(l.chunk("j", (0, 1), "lost too".into(), false).is_none());
        let end = l.step_done("j", (0, 1), ok()).expect("end");
        match &end.events[0] {
            EventBody::StepFinished { message, .. } => assert_eq!(message, OUTPUT_LOST),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn after_a_restart_a_step_the_runner_lost_is_settled_and_one_it_holds_is_not() {
        let mut l = Ledger::default();
        l.accept("fail", "d", vec![spec(OnInterrupt::Fail)]);
        l.accept("rerun", "d", vec![spec(OnInterrupt::Rerun)]);
        l.accept("held", "d", vec![spec(OnInterrupt::Fail)]);
        for j in ["fail", "rerun", "held"] {
            l.advance(j, ALL).expect("start");
            l.durable(j);
        }
        let held: HashSet<JobId> = ["held".into()].into();
        let settled = l.recover(&held);
        let by_job = |id: &str| settled.iter().find(|t| t.job_id == id).cloned();
        assert_eq!(kinds(&by_job("fail").expect("fail")), vec!["step_finished"]);
        assert!(by_job("rerun").expect("rerun").events.is_empty());
        assert!(by_job("held").is_none(), "the runner still runs it");
        for j in ["fail", "rerun"] {
            l.durable(j);
        }
        let rerun = l.advance("rerun", ALL).expect("rerun");
        assert_eq!(
            rerun.then,
            Then::Run {
                step: 0,
                attempt: 2
            }
        );
        assert!(
            l.step_done("rerun", (0, 1), ok()).is_none(),
            "the lost attempt's end is not taken for the new one's"
        );
    }

    #[test]
    fn cancel_and_expiry_and_pruning() {
        let mut l = Ledger::default();
        let e = l.expire("late", "d").expect("expired");
        assert_eq!(kind(&e), "job_finished");
        assert!(l.expire("late", "d").is_none());
        l.accept("j", "d", vec![spec(OnInterrupt::Fail)]);
        assert!(l.cancel("j"));
        let skip = l.advance("j", ALL).expect("skip");
        assert_eq!(kinds(&skip), vec!["step_finished"]);
        l.durable("j");
        let fin = l.advance("j", ALL).expect("finish");
        assert_eq!(kinds(&fin), vec!["job_finished"]);
        l.mark_end("j", Seq(7), 1_000);
        l.durable("j");
        assert!(!l.cancel("j"), "a finished job is not cancelled");
        assert!(
            l.prune(6, 10_000, 0, 10).iter().all(|id| id != "j"),
            "end not acked"
        );
        assert!(
            l.prune(7, 1_500, 1_000, 10).iter().all(|id| id != "j"),
            "retention"
        );
        assert!(l.prune(7, 2_000, 1_000, 10).contains(&"j".into()));
        assert!(l.record_op("j").is_none(), "gone");
    }
}
