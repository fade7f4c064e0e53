//! What a server restored behind its agents learned from them, kept for the operators.
//!
//! A server restored from a backup (or a database failed over to a replica that was behind)
//! no longer holds the last exchanges with its agents. Each agent proves it at its next
//! handshake (`tether_shared::stream::Endpoint::rejoin`): its link takes the streams up
//! again after what the agent holds and asks it for a report of its jobs
//! (`CommandBody::Reconcile`). This module records, per agent, what was lost and how the
//! report went; a reported job this server knows is brought up to date by the deployments
//! (`crate::deployments`), and one it does not know (its deployment was created after the
//! backup) is kept here as an *orphan result*, shown until an operator dismisses it.
//!
//! Bounds: one record per agent, made only when its link found this server behind it (reports
//! and orphans from an agent without one are ignored), and at most [`MAX_ORPHANS_PER_AGENT`]
//! orphan results per agent (past it they are counted, and the count is shown), each cut to
//! 64 steps and 256 characters of text. Orphans keep each step's status, exit code and
//! message, not its output properties: this server cannot know which values of a deployment
//! it never saw are secret.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tether_shared::ids::{AgentId, JobId};
use tether_shared::journal::{JournalError, JournalHandle, Op};
use tether_shared::protocol::{JobReport, JobStatus, StepStatus};

/// Meta key prefixes: one record per agent, one entry per orphan result.
const RECORD_PREFIX: &str = "reconcile/agent/";
const ORPHAN_PREFIX: &str = "reconcile/orphan/";
/// Orphan results kept per agent; more are counted.
pub const MAX_ORPHANS_PER_AGENT: usize = 200;
/// Of each orphan result: steps kept, and characters kept of a step's name and message.
const MAX_ORPHAN_STEPS: usize = 64;
const MAX_ORPHAN_TEXT: usize = 256;

/// Where an agent's reconciliation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Asked for its report; not complete yet.
    Reconciling,
    /// Its report is in.
    Reported,
    /// Its release cannot report its jobs: the lost events are lost.
    Unsupported,
}

/// One agent's reconciliation (the counts add up if it happens again before a dismissal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub agent_id: AgentId,
    /// When this server last found itself behind the agent (Unix ms).
    pub detected_unix_ms: u64,
    /// The agent's events this server had acknowledged and no longer held.
    pub events_lost: u64,
    /// Commands the agent held that this server no longer remembered sending.
    pub commands_lost: u64,
    pub phase: Phase,
    /// Jobs the agent reported, and those its report had no room for.
    pub jobs_reported: u64,
    pub jobs_omitted: u64,
    /// Reported jobs this server knew, brought up to date.
    pub jobs_updated: u64,
    /// Reported jobs this server does not know (kept below, up to the bound), and how many
    /// were only counted.
    pub orphan_results: u64,
    pub orphans_not_kept: u64,
}

/// A result an agent reported for a job this server does not know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orphan {
    pub agent_id: AgentId,
    pub job_id: JobId,
    pub deployment_id: String,
    /// `None`: the job was still running when reported.
    pub status: Option<JobStatus>,
    pub steps: Vec<OrphanStep>,
    pub reported_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrphanStep {
    pub name: String,
    pub status: Option<StepStatus>,
    pub exit_code: Option<i32>,
    pub message: String,
}

/// Totals for `/admin/health`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Agents with a reconciliation on record, and those whose report is not in yet.
    pub agents: usize,
    pub reconciling: usize,
    pub events_lost: u64,
    pub commands_lost: u64,
    pub jobs_updated: u64,
    pub orphan_results: u64,
}

#[derive(Default)]
struct Inner {
    records: BTreeMap<AgentId, Record>,
    orphans: BTreeMap<AgentId, BTreeMap<JobId, Orphan>>,
}

/// Every agent's reconciliation; share as `Arc<Reconciliations>`.
pub struct Reconciliations {
    journal: JournalHandle,
    inner: Mutex<Inner>,
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// At most [`MAX_ORPHAN_TEXT`] characters of a peer's text.
fn cut(text: &str) -> String {
    text.chars().take(MAX_ORPHAN_TEXT).collect()
}

fn record_key(agent_id: &AgentId) -> String {
    format!("{RECORD_PREFIX}{agent_id}")
}

fn orphan_key(agent_id: &AgentId, job_id: &str) -> String {
    format!("{ORPHAN_PREFIX}{agent_id}/{job_id}")
}

impl Reconciliations {
    pub fn load(journal: JournalHandle) -> Result<Reconciliations, JournalError> {
        let mut inner = Inner::default();
        for (key, value) in journal.scan_meta(RECORD_PREFIX)? {
            match serde_json::from_slice::<Record>(&value) {
                Ok(r) => {
                    inner.records.insert(r.agent_id.clone(), r);
                }
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "reconciliation-record-unreadable")
                }
            }
        }
        for (key, value) in journal.scan_meta(ORPHAN_PREFIX)? {
            match serde_json::from_slice::<Orphan>(&value) {
                Ok(o) => {
                    let of_agent = inner.orphans.entry(o.agent_id.clone()).or_default();
                    of_agent.insert(o.job_id.clone(), o);
                }
                Err(e) => tracing::warn!(key = %key, error = %e, "orphan-result-unreadable"),
            }
        }
        Ok(Reconciliations {
            journal,
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change `agent_id`'s record and return the op that stores it; `None` (nothing changed)
    /// for an agent without one.
    fn update(&self, agent_id: &AgentId, f: impl FnOnce(&mut Record)) -> Option<Op> {
        let mut inner = self.lock();
        let record = inner.records.get_mut(agent_id.as_str())?;
        f(record);
        Some(Op::PutMeta {
            key: record_key(agent_id),
            value: json(record),
        })
    }

    /// The link of `agent_id` found this server behind the agent (joins the handshake's batch).
    pub fn detected(
        &self,
        agent_id: &AgentId,
        events_lost: u64,
        commands_lost: u64,
        reports: bool,
        now_ms: u64,
    ) -> Op {
        let mut inner = self.lock();
        let r = inner
            .records
            .entry(agent_id.clone())
            .or_insert_with(|| Record {
                agent_id: agent_id.clone(),
                detected_unix_ms: now_ms,
                events_lost: 0,
                commands_lost: 0,
                phase: Phase::Reconciling,
                jobs_reported: 0,
                jobs_omitted: 0,
                jobs_updated: 0,
                orphan_results: 0,
                orphans_not_kept: 0,
            });
        {
            r.detected_unix_ms = now_ms;
            r.events_lost = r.events_lost.saturating_add(events_lost);
            r.commands_lost = r.commands_lost.saturating_add(commands_lost);
            r.phase = if reports {
                Phase::Reconciling
            } else {
                Phase::Unsupported
            };
        }
        Op::PutMeta {
            key: record_key(agent_id),
            value: json(r),
        }
    }

    /// A reported job this server knew was brought up to date.
    pub fn updated(&self, agent_id: &AgentId) -> Option<Op> {
        self.update(agent_id, |r| r.jobs_updated += 1)
    }

    /// The agent's report is complete.
    pub fn reported(&self, agent_id: &AgentId, jobs: u32, omitted: u32) -> Option<Op> {
        self.update(agent_id, |r| {
            r.phase = Phase::Reported;
            r.jobs_reported = r.jobs_reported.saturating_add(jobs.into());
            r.jobs_omitted = r.jobs_omitted.saturating_add(omitted.into());
        })
    }

    /// A reported job this server does not know: kept (up to the bound) and counted. Nothing
    /// from an agent this server was not found behind.
    pub fn orphan(&self, agent_id: &AgentId, report: &JobReport, now_ms: u64) -> Vec<Op> {
        let orphan = Orphan {
            agent_id: agent_id.clone(),
            job_id: cut(&report.job_id).into(),
            deployment_id: cut(&report.deployment_id),
            status: report.status,
            steps: report
                .steps
                .iter()
                .take(MAX_ORPHAN_STEPS)
                .map(|s| OrphanStep {
                    name: cut(&s.name),
                    status: s.status,
                    exit_code: s.exit_code,
                    message: cut(&s.message),
                })
                .collect(),
            reported_unix_ms: now_ms,
        };
        let (kept, new) = {
            let mut inner = self.lock();
            if !inner.records.contains_key(agent_id.as_str()) {
                tracing::warn!(agent_id = %agent_id, job_id = %orphan.job_id, "job-report-ignored-not-reconciling");
                return Vec::new();
            }
            let of_agent = inner.orphans.entry(agent_id.clone()).or_default();
            let new = !of_agent.contains_key(orphan.job_id.as_str());
            let kept = !new || of_agent.len() < MAX_ORPHANS_PER_AGENT;
            if kept {
                of_agent.insert(orphan.job_id.clone(), orphan.clone());
            }
            (kept, new)
        };
        tracing::warn!(agent_id = %agent_id, job_id = %report.job_id, deployment_id = %report.deployment_id, kept, "orphan-result");
        let mut ops = Vec::new();
        if kept {
            ops.push(Op::PutMeta {
                key: orphan_key(agent_id, &orphan.job_id),
                value: json(&orphan),
            });
        }
        if new {
            ops.extend(self.update(agent_id, |r| {
                if kept {
                    r.orphan_results += 1;
                } else {
                    r.orphans_not_kept += 1;
                }
            }));
        }
        ops
    }

    /// Every agent's record with its orphan results, by agent id.
    pub fn list(&self) -> Vec<(Record, Vec<Orphan>)> {
        let inner = self.lock();
        inner
            .records
            .values()
            .map(|r| {
                let orphans = inner
                    .orphans
                    .get(&r.agent_id)
                    .map(|o| o.values().cloned().collect())
                    .unwrap_or_default();
                (r.clone(), orphans)
            })
            .collect()
    }

    pub fn summary(&self) -> Summary {
        let inner = self.lock();
        let mut s = Summary {
            agents: inner.records.len(),
            ..Summary::default()
        };
        for r in inner.records.values() {
            s.reconciling += usize::from(r.phase == Phase::Reconciling);
            s.events_lost += r.events_lost;
            s.commands_lost += r.commands_lost;
            s.jobs_updated += r.jobs_updated;
            s.orphan_results += r.orphan_results + r.orphans_not_kept;
        }
        s
    }

    /// An operator reviewed `agent_id`'s reconciliation: its record and orphans are deleted.
    /// `false` if there was none.
    pub async fn dismiss(&self, agent_id: &AgentId) -> Result<bool, JournalError> {
        let ops: Vec<Op> = {
            let inner = self.lock();
            if !inner.records.contains_key(agent_id) {
                return Ok(false);
            }
            std::iter::once(Op::DeleteMeta {
                key: record_key(agent_id),
            })
            .chain(
                inner
                    .orphans
                    .get(agent_id)
                    .into_iter()
                    .flat_map(|o| o.keys())
                    .map(|job_id| Op::DeleteMeta {
                        key: orphan_key(agent_id, job_id),
                    }),
            )
            .collect()
        };
        self.journal.commit(ops).await?;
        let mut inner = self.lock();
        inner.records.remove(agent_id);
        inner.orphans.remove(agent_id);
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use tether_shared::journal::{Journal, JournalOptions};
    use tether_shared::protocol::StepReport;

    fn report(job: &str, steps: usize, message: &str) -> JobReport {
        JobReport {
            job_id: job.into(),
            deployment_id: "d-1".into(),
            steps: (0..steps)
                .map(|i| StepReport {
                    name: format!("s{i}"),
                    status: Some(StepStatus::Succeeded),
                    attempt: 1,
                    exit_code: Some(0),
                    outputs: [("secret".to_owned(), "value".to_owned())].into(),
                    message: message.into(),
                })
                .collect(),
            status: Some(JobStatus::Succeeded),
        }
    }

    #[actix::test]
    async fn orphans_are_kept_only_while_reconciling_bounded_and_survive_a_reload() {
        let tmp = tempfile::tempdir().unwrap();
        let (journal, _) =
            Journal::open(&tmp.path().join("j"), &JournalOptions::default()).unwrap();
        let handle = journal.handle();
        let r = Reconciliations::load(handle.clone()).unwrap();
        let agent = AgentId::from("a-1");

        // Nothing from an agent this server was not found behind.
        assert!(r.orphan(&agent, &report("j-0", 1, ""), 1).is_empty());
        assert!(r.reported(&agent, 3, 0).is_none());
        assert!(r.list().is_empty());

        let mut ops = vec![r.detected(&agent, 8, 1, true, 5)];
        for i in 0..MAX_ORPHANS_PER_AGENT + 3 {
            ops.extend(r.orphan(
                &agent,
                &report(&format!("j-{i}"), 100, &"x".repeat(1000)),
                6,
            ));
        }
        // The same job reported again is not counted twice.
        ops.extend(r.orphan(&agent, &report("j-0", 1, ""), 7));
        ops.extend(r.reported(&agent, 203, 2));
        handle.commit(ops).await.unwrap();
        let check = |r: &Reconciliations| {
            let list = r.list();
            let (record, orphans) = &list[0];
            assert_eq!((record.events_lost, record.commands_lost), (8, 1));
            assert_eq!(record.phase, Phase::Reported);
            assert_eq!((record.jobs_reported, record.jobs_omitted), (203, 2));
            assert_eq!(record.orphan_results, MAX_ORPHANS_PER_AGENT as u64);
            assert_eq!(record.orphans_not_kept, 3);
            assert_eq!(orphans.len(), MAX_ORPHANS_PER_AGENT);
            let big = orphans.iter().find(|o| o.job_id.as_str() == "j-1").unwrap();
            assert_eq!(big.steps.len(), MAX_ORPHAN_STEPS);
            assert_eq!(big.steps[0].message.chars().count(), MAX_ORPHAN_TEXT);
            let summary = r.summary();
            assert_eq!(summary.orphan_results, MAX_ORPHANS_PER_AGENT as u64 + 3);
            assert_eq!((summary.agents, summary.reconciling), (1, 0));
        };
        check(&r);
        check(&Reconciliations::load(handle.clone()).unwrap());

        assert!(r.dismiss(&AgentId::from("a-1")).await.unwrap());
        assert!(!r.dismiss(&AgentId::from("a-1")).await.unwrap());
        assert!(r.list().is_empty());
        assert!(Reconciliations::load(handle).unwrap().list().is_empty());
    }
}
