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
//! Bounds: one record per agent, and at most [`MAX_ORPHANS_PER_AGENT`] orphan results per
//! agent (past it they are counted, and the count is shown). Orphans keep each step's status,
//! exit code and message, not its output properties: this server cannot know which values
//! of a deployment it never saw are secret.

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
pub const MAX_ORPHANS_PER_AGENT: usize = 1000;

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

fn record_key(agent_id: &str) -> String {
    format!("{RECORD_PREFIX}{agent_id}")
}

fn orphan_key(agent_id: &str, job_id: &str) -> String {
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

    /// Change `agent_id`'s record (made if missing) and return the op that stores it.
    fn update(&self, agent_id: &AgentId, now_ms: u64, f: impl FnOnce(&mut Record)) -> Op {
        let mut inner = self.lock();
        let record = inner
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
        f(record);
        Op::PutMeta {
            key: record_key(agent_id),
            value: json(record),
        }
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
        self.update(agent_id, now_ms, |r| {
            r.detected_unix_ms = now_ms;
            r.events_lost = r.events_lost.saturating_add(events_lost);
            r.commands_lost = r.commands_lost.saturating_add(commands_lost);
            r.phase = if reports {
                Phase::Reconciling
            } else {
                Phase::Unsupported
            };
        })
    }

    /// A reported job this server knew was brought up to date.
    pub fn updated(&self, agent_id: &AgentId, now_ms: u64) -> Op {
        self.update(agent_id, now_ms, |r| r.jobs_updated += 1)
    }

    /// The agent's report is complete.
    pub fn reported(&self, agent_id: &AgentId, jobs: u32, omitted: u32, now_ms: u64) -> Op {
        self.update(agent_id, now_ms, |r| {
            r.phase = Phase::Reported;
            r.jobs_reported = r.jobs_reported.saturating_add(jobs.into());
            r.jobs_omitted = r.jobs_omitted.saturating_add(omitted.into());
        })
    }

    /// A reported job this server does not know: kept (up to the bound) and counted.
    pub fn orphan(&self, agent_id: &AgentId, report: &JobReport, now_ms: u64) -> Vec<Op> {
        let orphan = Orphan {
            agent_id: agent_id.clone(),
            job_id: report.job_id.as_str().into(),
            deployment_id: report.deployment_id.clone(),
            status: report.status,
            steps: report
                .steps
                .iter()
                .map(|s| OrphanStep {
                    name: s.name.clone(),
                    status: s.status,
                    exit_code: s.exit_code,
                    message: s.message.clone(),
                })
                .collect(),
            reported_unix_ms: now_ms,
        };
        let (kept, new) = {
            let mut inner = self.lock();
            let of_agent = inner.orphans.entry(agent_id.clone()).or_default();
            let new = !of_agent.contains_key(report.job_id.as_str());
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
                key: orphan_key(agent_id, &report.job_id),
                value: json(&orphan),
            });
        }
        if new {
            ops.push(self.update(agent_id, now_ms, |r| {
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
    pub async fn dismiss(&self, agent_id: &str) -> Result<bool, JournalError> {
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
