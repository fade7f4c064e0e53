//! The JSON answers of the deployments API, built from a consistent snapshot of the state.
//! Secret values never leave here: `*_secret` properties and secret step properties show as
//! `***`, and any secret value found inside outputs, messages or logs is replaced by `***`.

use serde_json::{json, Value};
use tether_shared::journal::{JournalError, JournalHandle};
use tether_shared::mask::StreamMask;
use tether_shared::protocol::Seq;
use tether_shared::utf8_stream::Utf8Stream;

use std::collections::BTreeMap;

use super::model::{deployment_status, is_secret_property, mask, Job, Process, MASK};
use super::state::{step_log, Snapshot};
use crate::registry::Registry;

/// Records (chunks of at most 16 KiB) read from a step log per page.
const LOG_PAGE: usize = 16;
/// Bytes of a step's log read at once.
const LOG_PAGE_BYTES: usize = 64 * 1024;

/// A process as `GET /api/v1/processes[/{name}]` shows it; properties declared secret show
/// as `***`.
pub fn process(p: &Process) -> Value {
    json!({
        "name": p.name,
        "version": p.version,
        "updated_unix_ms": p.updated_unix_ms,
        "steps": p.steps.iter().map(|s| json!({
            "name": s.name,
            "plugin": s.plugin,
            "step": s.step,
            "properties": s.properties.iter().map(|(k, v)| {
                let shown = if s.secrets.contains(k) { MASK } else { v.as_str() };
                (k.clone(), Value::String(shown.to_owned()))
            }).collect::<serde_json::Map<_, _>>(),
            "secrets": s.secrets,
            "on_interrupt": s.on_interrupt,
            "timeout_s": s.timeout_s,
        })).collect::<Vec<_>>(),
    })
}

/// How much of a deployment an answer shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Every job with its steps.
    Jobs,
    /// The status and the count of jobs in each state (`?jobs=false`): what a poller waiting
    /// for the end needs, at a cost that does not grow with the fleet.
    Summary,
}

/// `GET /api/v1/deployments/{id}`: always the status and the job counts; the jobs too unless
/// `detail` is [`Detail::Summary`].
pub fn deployment(snapshot: &Snapshot, registry: &Registry, detail: Detail) -> Value {
    let (d, jobs) = (&snapshot.deployment, &snapshot.jobs);
    let secrets = d.secret_values();
    let properties: serde_json::Map<String, Value> = d
        .properties
        .iter()
        .map(|(k, v)| {
            let shown = if is_secret_property(k) {
                MASK.to_owned()
            } else {
                mask(v, &secrets)
            };
            (k.clone(), Value::String(shown))
        })
        .collect();
    let mut counts = serde_json::Map::new();
    for j in jobs {
        let n = counts.entry(j.status.as_str()).or_insert(Value::from(0u64));
        *n = Value::from(n.as_u64().unwrap_or(0) + 1);
    }
    let mut answer = json!({
        "id": d.id,
        "status": deployment_status(jobs),
        "process": d.process,
        "process_version": d.process_version,
        "properties": properties,
        "created_unix_ms": d.created_unix_ms,
        "deadline_unix_ms": d.deadline_unix_ms,
        "counts": counts,
    });
    if let Some(original) = &d.retry_of {
        answer["retry_of"] = json!(original);
    }
    if let Some(size) = d.batch_size {
        answer["rolling"] = rolling(jobs, size, d.stop_on_failure);
    }
    if detail == Detail::Summary {
        return answer;
    }
    let jobs: Vec<Value> = jobs
        .iter()
        .map(|j| {
            let name = registry.agent_name(&j.agent_id);
            json!({
                "agent": name.unwrap_or_else(|| j.agent_id.to_string()),
                "agent_id": j.agent_id,
                "job_id": j.job_id,
                "status": j.status,
                "message": mask(&j.message, &secrets),
                "finished_unix_ms": j.finished_unix_ms,
                "batch": j.batch,
                "steps": j.steps.iter().enumerate().map(|(i, s)| {
                    let declared = d.steps.get(i).map(|spec| spec.secrets.as_slice()).unwrap_or_default();
                    let outputs: serde_json::Map<String, Value> = s.outputs.iter().map(|(k, v)| {
                        let shown = if is_secret_property(k) || declared.contains(k) {
                            MASK.to_owned()
                        } else {
                            mask(v, &secrets)
                        };
                        (k.clone(), Value::String(shown))
                    }).collect();
                    json!({
                        "name": s.name,
                        "status": s.status,
                        "exit_code": s.exit_code,
                        "outputs": outputs,
                        "message": mask(&s.message, &secrets),
                        "attempt": s.attempt,
                        "started_unix_ms": s.started_unix_ms,
                        "finished_unix_ms": s.finished_unix_ms,
                    })
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    answer["jobs"] = Value::Array(jobs);
    answer
}

/// A rolling deployment's batches: size, whether a failure stops it, and each batch with its
/// status (derived from its jobs, as a deployment's) and job counts.
fn rolling(jobs: &[Job], size: u32, stop_on_failure: bool) -> Value {
    let mut batches: BTreeMap<u32, Vec<&Job>> = BTreeMap::new();
    for j in jobs {
        batches.entry(j.batch).or_default().push(j);
    }
    let list: Vec<Value> = batches
        .iter()
        .map(|(b, jobs)| {
            let done = jobs.iter().filter(|j| j.status.is_final()).count();
            json!({
                "batch": b,
                "status": deployment_status(jobs.iter().copied()),
                "jobs": jobs.len(),
                "ended": done,
            })
        })
        .collect();
    json!({"batch_size": size, "stop_on_failure": stop_on_failure, "batches": list})
}

/// A step's log read from storage a page at a time, secrets masked across pages: memory
/// stays at one page whatever the log's size. Blocking (the journal reads from disk).
pub struct LogReader {
    journal: JournalHandle,
    log: Option<tether_shared::journal::LogName>,
    /// The last record read of a log written before logs moved to blobs.
    after: Seq,
    /// Where the blob is read next, once the records (if any) are read.
    blob_at: Option<u64>,
    text: Utf8Stream,
    mask: StreamMask,
    /// The step ended: the held-back tail is let out at the end. While it runs, a tail that
    /// may be the start of a secret waits, so what was read is a prefix of what comes later.
    complete: bool,
    done: bool,
}

impl LogReader {
    pub fn new(
        journal: JournalHandle,
        job_id: &str,
        step: u32,
        secrets: &[String],
        complete: bool,
    ) -> Self {
        LogReader {
            journal,
            log: step_log(job_id, step),
            after: Seq::ZERO,
            blob_at: None,
            text: Utf8Stream::default(),
            mask: StreamMask::new(secrets),
            complete,
            done: false,
        }
    }

    /// The next page of raw bytes: the records of an older log first, then the blob.
    fn next_bytes(&mut self) -> Result<Vec<u8>, JournalError> {
        let Some(log) = &self.log else {
            return Ok(Vec::new());
        };
        if self.blob_at.is_none() {
            let page = self.journal.read_log(log, self.after, LOG_PAGE)?;
            if let Some(last) = page.last() {
                self.after = last.seq;
                return Ok(page.into_iter().flat_map(|r| r.payload).collect());
            }
            self.blob_at = Some(0);
        }
        let at = self.blob_at.unwrap_or(0);
        let bytes = self.journal.read_blob(log, at, LOG_PAGE_BYTES)?;
        self.blob_at = Some(at + bytes.len() as u64);
        Ok(bytes)
    }

    /// The next piece of the log (masked), or `None` at its end.
    pub fn next_page(&mut self) -> Result<Option<String>, JournalError> {
        if self.done {
            return Ok(None);
        }
        let bytes = self.next_bytes()?;
        if bytes.is_empty() {
            self.done = true;
            let tail = if self.complete {
                let rest = self.text.finish();
                let mut tail = self.mask.push(&rest);
                tail.push_str(&self.mask.finish());
                tail
            } else {
                String::new()
            };
            return Ok(Some(tail).filter(|t| !t.is_empty()));
        }
        let text = self.text.decode(&bytes);
        Ok(Some(self.mask.push(&text)))
    }

    /// Reads the log from byte `offset` (moved to the next character boundary if it cuts one;
    /// past the end, to the end): answers where the text starts and the text. Only the text
    /// from `offset` on is held in memory.
    pub fn read_from(mut self, offset: usize) -> Result<(usize, String), JournalError> {
        let (mut at, mut tail, mut start) = (0usize, String::new(), None);
        while let Some(piece) = self.next_page()? {
            if start.is_none() {
                if at + piece.len() <= offset {
                    at += piece.len();
                    continue;
                }
                let mut cut = offset - at;
                while !piece.is_char_boundary(cut) {
                    cut += 1;
                }
                start = Some(at + cut);
                tail.push_str(&piece[cut..]);
            } else {
                tail.push_str(&piece);
            }
        }
        Ok((start.unwrap_or(at), tail))
    }
}
