//! A job's durable record on the agent, and what to do next with it (sans-IO).
//!
//! The record lives in the journal (`job/<id>`) and is rewritten in the same batch as every
//! event it causes, so after any crash it says exactly which steps ended, which one was
//! running, and how far its output got. [`JobRecord::next`] decides the next action;
//! [`JobRecord::recover`] settles a step that was running when the worker died: run it again
//! only if its plugin declared that safe, otherwise report it interrupted — never twice, never
//! left hanging.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tether_shared::ids::{DeploymentId, JobId};
use tether_shared::protocol::{
    JobReport, JobStatus, OnInterrupt, StepReport, StepSpec, StepStatus,
};

/// Journal meta key of a job's record.
pub fn record_key(job_id: &str) -> String {
    format!("job/{job_id}")
}

/// Prefix of every job record.
pub const RECORD_PREFIX: &str = "job/";

/// Message of a step found running after a restart that may not run twice.
pub const INTERRUPTED: &str = "interrupted by agent restart";

/// One step's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepProgress {
    /// Set once the step ended (its `StepFinished` is journaled in the same batch).
    pub status: Option<StepStatus>,
    /// Its start is journaled and its end is not.
    pub running: bool,
    /// Starts so far (more than one after a rerun).
    pub attempt: u32,
    /// Number of the next output chunk.
    pub next_chunk: u32,
    /// Output properties it set (later steps see them).
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    /// How it ended, as its `StepFinished` said (for a report to a server that lost it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// A job as the agent keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: JobId,
    pub deployment_id: DeploymentId,
    pub steps: Vec<StepSpec>,
    pub progress: Vec<StepProgress>,
    /// A `CancelJob` arrived.
    pub cancel: bool,
    /// Set once `JobFinished` is journaled.
    pub finished: Option<JobStatus>,
    /// The seq of that `JobFinished` event, and when it was journaled (Unix ms): once the
    /// server acknowledged it and the retention passed, the record and work directory go.
    #[serde(default)]
    pub end_seq: u64,
    #[serde(default)]
    pub finished_unix_ms: u64,
}

/// What the runner does next with a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Journal `StepStarted` (and the record), then run the step.
    Start { step: usize, attempt: u32 },
    /// End a step without running it (journal its `StepFinished`).
    Skip {
        step: usize,
        status: StepStatus,
        message: &'static str,
    },
    /// Journal `JobFinished`.
    Finish { status: JobStatus },
    /// A step is running: wait for it.
    Wait,
    /// Nothing left.
    Done,
}

impl JobRecord {
    pub fn new(job_id: JobId, deployment_id: DeploymentId, steps: Vec<StepSpec>) -> Self {
        let progress = vec![StepProgress::default(); steps.len()];
        JobRecord {
            job_id,
            deployment_id,
            steps,
            progress,
            cancel: false,
            finished: None,
            end_seq: 0,
            finished_unix_ms: 0,
        }
    }

    /// Whether the record may go: finished, its end acknowledged (`acked`), and ended at least
    /// `retention_ms` before `now_ms`. (A record from before `end_seq` was kept has 0 for both,
    /// and goes.)
    pub fn prunable(&self, acked: u64, now_ms: u64, retention_ms: u64) -> bool {
        self.finished.is_some()
            && self.end_seq <= acked
            && now_ms.saturating_sub(self.finished_unix_ms) >= retention_ms
    }

    pub fn next(&self) -> Next {
        if self.finished.is_some() {
            return Next::Done;
        }
        for (i, p) in self.progress.iter().enumerate() {
            if p.running {
                return Next::Wait;
            }
            if p.status.is_some() {
                continue;
            }
            if self.cancel {
                return Next::Skip {
                    step: i,
                    status: StepStatus::Cancelled,
                    message: "job cancelled",
                };
            }
            if self.progress[..i]
                .iter()
                .any(|q| q.status != Some(StepStatus::Succeeded))
            {
                return Next::Skip {
                    step: i,
                    status: StepStatus::Skipped,
                    message: "an earlier step did not succeed",
                };
            }
            return Next::Start {
                step: i,
                attempt: p.attempt + 1,
            };
        }
        let statuses: Vec<_> = self.progress.iter().filter_map(|p| p.status).collect();
        let status = if statuses.iter().all(|s| *s == StepStatus::Succeeded) {
            JobStatus::Succeeded
        } else if self.cancel && statuses.contains(&StepStatus::Cancelled) {
            JobStatus::Cancelled
        } else {
            JobStatus::Failed
        };
        Next::Finish { status }
    }

    pub fn start(&mut self, step: usize, attempt: u32) {
        if let Some(p) = self.progress.get_mut(step) {
            p.running = true;
            p.attempt = attempt;
        }
    }

    pub fn end(&mut self, step: usize, status: StepStatus) {
        if let Some(p) = self.progress.get_mut(step) {
            p.running = false;
            p.status = Some(status);
        }
    }

    /// Where the job stands, for a server that lost its events (`EventBody::JobReport`).
    pub fn report(&self) -> JobReport {
        JobReport {
            job_id: self.job_id.to_string(),
            deployment_id: self.deployment_id.to_string(),
            steps: self
                .steps
                .iter()
                .zip(&self.progress)
                .map(|(spec, p)| StepReport {
                    name: spec.name.clone(),
                    status: p.status,
                    attempt: p.attempt,
                    exit_code: p.exit_code,
                    outputs: p.outputs.clone(),
                    message: p.message.clone(),
                })
                .collect(),
            status: self.finished,
        }
    }

    /// Outputs of every step before `step`, for its environment.
    pub fn outputs_before(&self, step: usize) -> BTreeMap<String, String> {
        self.progress[..step.min(self.progress.len())]
            .iter()
            .flat_map(|p| p.outputs.clone())
            .collect()
    }

    /// After a restart: a step found running is rerun if safe, else reported interrupted.
    /// Returns the steps to report as interrupted (their `StepFinished` must be journaled).
    pub fn recover(&mut self) -> Vec<usize> {
        let mut interrupted = Vec::new();
        for i in 0..self.progress.len() {
            if !self.progress[i].running {
                continue;
            }
            match self.steps[i].on_interrupt {
                OnInterrupt::Rerun => self.progress[i].running = false,
                OnInterrupt::Fail => {
                    self.end(i, StepStatus::Interrupted);
                    interrupted.push(i);
                }
            }
        }
        interrupted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, on_interrupt: OnInterrupt) -> StepSpec {
        StepSpec {
            name: name.into(),
            plugin: "shell".into(),
            step: "run".into(),
            properties: BTreeMap::new(),
            secrets: Vec::new(),
            on_interrupt,
            timeout_ms: 1000,
            bundle: None,
            sealed: None,
        }
    }

    #[test]
    fn runs_steps_in_order_and_skips_after_a_failure() {
        let mut j = JobRecord::new(
            "j".into(),
            "d".into(),
            vec![
                step("a", OnInterrupt::Fail),
                step("b", OnInterrupt::Fail),
                step("c", OnInterrupt::Fail),
            ],
        );
        assert_eq!(
            j.next(),
            Next::Start {
                step: 0,
                attempt: 1
            }
        );
        j.start(0, 1);
        assert_eq!(j.next(), Next::Wait);
        j.end(0, StepStatus::Succeeded);
        assert_eq!(
            j.next(),
            Next::Start {
                step: 1,
                attempt: 1
            }
        );
        j.start(1, 1);
        j.end(1, StepStatus::Failed);
        assert!(matches!(
            j.next(),
            Next::Skip {
                step: 2,
                status: StepStatus::Skipped,
                ..
            }
        ));
        j.end(2, StepStatus::Skipped);
        assert_eq!(
            j.next(),
            Next::Finish {
                status: JobStatus::Failed
            }
        );
        j.finished = Some(JobStatus::Failed);
        assert_eq!(j.next(), Next::Done);
    }

    #[test]
    fn a_step_running_at_a_crash_is_rerun_only_if_safe() {
        let mut j = JobRecord::new(
            "j".into(),
            "d".into(),
            vec![
                step("safe", OnInterrupt::Rerun),
                step("once", OnInterrupt::Fail),
            ],
        );
        j.start(0, 1);
        assert_eq!(j.recover(), Vec::<usize>::new());
        assert_eq!(
            j.next(),
            Next::Start {
                step: 0,
                attempt: 2
            },
            "rerun as a second attempt"
        );
        j.start(0, 2);
        j.end(0, StepStatus::Succeeded);
        j.start(1, 1);
        assert_eq!(j.recover(), vec![1]);
        assert_eq!(j.progress[1].status, Some(StepStatus::Interrupted));
        assert_eq!(
            j.next(),
            Next::Finish {
                status: JobStatus::Failed
            }
        );
    }

    #[test]
    fn a_record_goes_once_finished_acknowledged_and_old_enough() {
        let mut j = JobRecord::new("j".into(), "d".into(), vec![step("a", OnInterrupt::Fail)]);
        assert!(!j.prunable(u64::MAX, u64::MAX, 0), "not finished");
        j.finished = Some(JobStatus::Succeeded);
        j.end_seq = 10;
        j.finished_unix_ms = 1_000;
        assert!(!j.prunable(9, 5_000, 1_000), "its end not acknowledged");
        assert!(!j.prunable(10, 1_500, 1_000), "too recent");
        assert!(j.prunable(10, 2_000, 1_000));
    }

    #[test]
    fn cancel_ends_the_remaining_steps() {
        let mut j = JobRecord::new(
            "j".into(),
            "d".into(),
            vec![step("a", OnInterrupt::Fail), step("b", OnInterrupt::Fail)],
        );
        j.start(0, 1);
        j.cancel = true;
        j.end(0, StepStatus::Cancelled);
        assert!(matches!(
            j.next(),
            Next::Skip {
                step: 1,
                status: StepStatus::Cancelled,
                ..
            }
        ));
        j.end(1, StepStatus::Cancelled);
        assert_eq!(
            j.next(),
            Next::Finish {
                status: JobStatus::Cancelled
            }
        );
    }
}
