//! What each deployment has left to do, counted as jobs are added and end (so that a rolling
//! deployment's gate and "has it ended" cost nothing per event), and the work's figures for
//! `/metrics`: jobs and deployments ended by result, dispatch to first event, step durations.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tether_shared::ids::{DeploymentId, JobId};
use tether_shared::metrics::{self, CounterVec, Histogram};

use super::model::{DeploymentStatus, Job, JobState};

/// One deployment's unfinished jobs.
#[derive(Debug, Default)]
pub struct Progress {
    pub unfinished: usize,
    /// Unfinished jobs by batch (rolling deployments; every job of others is in batch 0).
    by_batch: BTreeMap<u32, usize>,
    /// The first batch with a job that failed or expired.
    pub failed: Option<u32>,
}

/// What a job's end changed of its deployment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Its deployment has no unfinished job left.
    pub deployment: bool,
    /// The first open batch moved, or the first failed batch appeared: queued jobs of the
    /// deployment may now start, or stop.
    pub gate: bool,
}

impl Progress {
    /// The first batch with an unfinished job (`u32::MAX` once every job ended).
    pub fn open(&self) -> u32 {
        self.by_batch.keys().next().copied().unwrap_or(u32::MAX)
    }

    /// Counts `job` (new, or loaded at start).
    pub fn add(&mut self, job: &Job) {
        if job.status.is_final() {
            self.note_failure(job);
        } else {
            self.unfinished += 1;
            *self.by_batch.entry(job.batch).or_default() += 1;
        }
    }

    /// `job` became final (it was counted unfinished).
    pub fn end(&mut self, job: &Job) -> Ended {
        let open = self.open();
        self.unfinished = self.unfinished.saturating_sub(1);
        if let Some(n) = self.by_batch.get_mut(&job.batch) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_batch.remove(&job.batch);
            }
        }
        let failed = self.note_failure(job);
        Ended {
            deployment: self.unfinished == 0,
            gate: failed || self.open() != open,
        }
    }

    /// Answers whether `job` is the first failure of an earlier batch than known.
    fn note_failure(&mut self, job: &Job) -> bool {
        let failed = matches!(job.status, JobState::Failed | JobState::Expired)
            && self.failed.is_none_or(|f| job.batch < f);
        if failed {
            self.failed = Some(job.batch);
        }
        failed
    }
}

/// Deployments' progress by id.
pub type ProgressBook = HashMap<DeploymentId, Progress>;

/// The work's counters and latencies since the server started.
#[derive(Debug)]
pub struct WorkMetrics {
    jobs_ended: CounterVec,
    deployments_ended: CounterVec,
    first_event: Histogram,
    step_duration: Histogram,
    /// When jobs were handed to their agent's link, until their first event (or their end).
    dispatched_at: std::sync::Mutex<HashMap<JobId, Instant>>,
}

impl Default for WorkMetrics {
    fn default() -> Self {
        WorkMetrics {
            jobs_ended: CounterVec::default(),
            deployments_ended: CounterVec::default(),
            first_event: Histogram::new(metrics::ROUND_TRIP_BUCKETS_US),
            step_duration: Histogram::new(metrics::STEP_BUCKETS_US),
            dispatched_at: Default::default(),
        }
    }
}

const JOB_RESULTS: [&str; 4] = ["succeeded", "failed", "cancelled", "expired"];
const DEPLOYMENT_RESULTS: [&str; 3] = ["succeeded", "failed", "cancelled"];

impl WorkMetrics {
    fn dispatched(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Instant>> {
        self.dispatched_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Job `id` was handed to its agent's link now.
    pub fn job_dispatched(&self, id: &JobId) {
        self.dispatched().insert(id.clone(), Instant::now());
    }

    /// Job `id`'s dispatch was undone: it waits again.
    pub fn job_undispatched(&self, id: &str) {
        self.dispatched().remove(id);
    }

    /// The agent said job `id` started (its first event since dispatch).
    pub fn job_accepted(&self, id: &str) {
        if let Some(at) = self.dispatched().remove(id) {
            self.first_event.record(at.elapsed());
        }
    }

    /// A step ran from `started` to `finished` (Unix ms, as the server heard them).
    pub fn step_ended(&self, started_unix_ms: u64, finished_unix_ms: u64) {
        self.step_duration.record(Duration::from_millis(
            finished_unix_ms.saturating_sub(started_unix_ms),
        ));
    }

    pub fn job_ended(&self, job: &Job) {
        self.dispatched().remove(job.job_id.as_str());
        if let Some(result) = JOB_RESULTS.into_iter().find(|r| *r == job.status.as_str()) {
            self.jobs_ended.inc(&[result]);
        }
    }

    pub fn deployment_ended(&self, status: DeploymentStatus) {
        let word = match status {
            DeploymentStatus::Succeeded => "succeeded",
            DeploymentStatus::Failed => "failed",
            DeploymentStatus::Cancelled => "cancelled",
            DeploymentStatus::Queued | DeploymentStatus::Running => return,
        };
        self.deployments_ended.inc(&[word]);
    }

    /// Jobs ended with `result` since start.
    #[cfg(test)]
    pub fn jobs_ended(&self, result: &'static str) -> u64 {
        self.jobs_ended.get(&[result])
    }

    /// Deployments ended with `result` since start.
    #[cfg(test)]
    pub fn deployments_ended(&self, result: &'static str) -> u64 {
        self.deployments_ended.get(&[result])
    }

    /// Observations of the dispatch-to-first-event histogram.
    #[cfg(test)]
    pub fn first_events(&self) -> u64 {
        self.first_event.snapshot().count()
    }

    /// The families, as Prometheus text.
    pub fn render(&self, out: &mut String) {
        fn zeros(all: &'static [&'static str]) -> Vec<&'static [&'static str]> {
            all.iter().map(std::slice::from_ref).collect()
        }
        self.jobs_ended.write(
            out,
            "tether_jobs_ended_total",
            "Jobs that ended since the server started, by result.",
            &["result"],
            &zeros(&JOB_RESULTS),
        );
        self.deployments_ended.write(
            out,
            "tether_deployments_ended_total",
            "Deployments whose last job ended since the server started, by result.",
            &["result"],
            &zeros(&DEPLOYMENT_RESULTS),
        );
        metrics::histogram(
            out,
            "tether_dispatch_first_event_seconds",
            "From a job's dispatch to its agent's first event of it (the job accepted).",
            &self.first_event.snapshot(),
        );
        metrics::histogram(
            out,
            "tether_step_duration_seconds",
            "Steps that ended, from their start to their end as the server heard them.",
            &self.step_duration.snapshot(),
        );
    }
}
