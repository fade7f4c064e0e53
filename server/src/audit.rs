//! The audit log: every request that changes (or tries to change) something on the operators'
//! listener, recorded durably with who, when, from where, what, and the result.
//!
//! [`record_changes`] wraps the whole HTTPS application, so no route can be left out: every
//! request but `GET`/`HEAD`/`OPTIONS` (a login and a logout included, and requests refused by
//! the bearer check or a role) becomes an [`AuditEntry`]. A request with valid credentials is
//! queued as `pending` before it runs, so the changes it commits (queued after it, in the same
//! or a later batch) are never durable before its entry, at no sync of its own; its answer
//! waits for the entry, and its outcome overwrites it with the next commit (a crash in between
//! leaves it `pending`). Any other request (a login, an enrollment, a refusal) is recorded
//! with its outcome, durably, before its answer goes out. What it holds never includes a secret: the method and the path (never the
//! query string or the body), the actor as the server knows it (`admin token`, `user NAME`,
//! `user NAME (API token ID)`), the source address and the status. A handler may name the actor
//! where the request alone does not ([`name_actor`]: a login names the user it logged in, a
//! failed one an existing user it tried, or nobody).
//!
//! Requests without valid credentials that did not succeed (a 401, a wrong password, a 429)
//! are recorded up to 20 a second; the rest are only counted (`audit.unrecorded` in `/admin/health`), so that nobody can make the server
//! write at will.
//!
//! Entries are records of the journal log `audit`, numbered from 1; the newest number is kept
//! in meta `audit/head`. The oldest are dropped past [`Audit::keep`] entries (the retention
//! policy, `retention.keep_audit_entries`; 0 switches the log off). Numbers are taken and commits queued under one lock, so
//! entries commit in their order and a reader paging by number never skips one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage};
use serde::{Deserialize, Serialize};
use tether_shared::journal::{JournalError, JournalHandle, LogName, Op};
use tether_shared::protocol::Seq;

use crate::registry::now_unix_ms;

/// The journal log of the entries.
const LOG: &str = "audit";
/// Meta key of the newest entry's number.
const HEAD: &str = "audit/head";
/// Longest path kept in an entry.
const MAX_PATH: usize = 256;
/// The outcome of an entry whose request has not answered yet (or whose server stopped
/// before its outcome was committed).
const PENDING: &str = "pending";
/// Requests without valid credentials that did not succeed (a 401, a wrong password, a
/// 429) recorded per second at most: anyone can send them, and each entry is a durable write.
/// The others are counted ([`Audit::unrecorded`]).
const MAX_UNAUTHENTICATED_PER_S: u32 = 20;

/// One recorded request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at_unix_ms: u64,
    /// Who: `admin token`, `user NAME`, `user NAME (API token ID)`, `anonymous`.
    pub actor: String,
    /// The peer's address.
    pub source: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    /// `ok` (2xx, 3xx), `refused` (401, 403), `failed` (anything else).
    pub outcome: String,
}

/// The actor a handler names for its request (see [`name_actor`]).
#[derive(Debug, Clone)]
struct NamedActor(String);

/// Names the actor of `req` in its audit entry (a login, which has no session yet).
pub fn name_actor(req: &actix_web::HttpRequest, actor: String) {
    req.extensions_mut().insert(NamedActor(actor));
}

/// The audit log; share as `Arc<Audit>`.
pub struct Audit {
    journal: JournalHandle,
    log: LogName,
    /// The newest entry's number, taken and queued under this lock.
    head: Mutex<u64>,
    keep: u64,
    /// Entries that could not be committed (the journal failed).
    pub failures: AtomicU64,
    /// 401 answers not recorded, past [`MAX_UNAUTHENTICATED_PER_S`].
    pub unrecorded: AtomicU64,
    /// The second (Unix) and how many 401 answers were recorded in it.
    unauthenticated: Mutex<(u64, u32)>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

impl Audit {
    /// The log as the journal holds it; the oldest entries past `keep` are dropped as new
    /// ones come.
    pub fn load(journal: JournalHandle, keep: u64) -> Result<Audit, JournalError> {
        let head = journal
            .get_meta(HEAD)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        Ok(Audit {
            journal,
            log: LogName::new(LOG).map_err(|e| JournalError::Io {
                context: "audit log name".into(),
                reason: e.to_string(),
            })?,
            head: Mutex::new(head),
            keep,
            failures: AtomicU64::new(0),
            unrecorded: AtomicU64::new(0),
            unauthenticated: Mutex::new((0, 0)),
        })
    }

    /// How many entries are kept.
    pub fn keep(&self) -> u64 {
        self.keep
    }

    /// Numbers `entry` and queues its commit (in number order); the commit's future. `None`
    /// with the log switched off (`keep` 0).
    fn queue(
        &self,
        entry: &mut AuditEntry,
    ) -> Result<Option<impl std::future::Future<Output = Result<(), JournalError>>>, JournalError>
    {
        if self.keep == 0 {
            return Ok(None);
        }
        let mut head = self.head.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = *head + 1;
        entry.seq = seq;
        let mut ops = vec![
            self.append(entry)?,
            Op::PutMeta {
                key: HEAD.into(),
                value: seq.to_be_bytes().to_vec(),
            },
        ];
        if seq > self.keep {
            ops.push(Op::TruncateThrough {
                log: self.log.clone(),
                upto: Seq(seq - self.keep),
            });
        }
        // Queued now, under the lock: commit order is number order.
        let committed = self.journal.commit(ops);
        *head = seq;
        Ok(Some(async move { committed.await.map(|_| ()) }))
    }

    fn append(&self, entry: &AuditEntry) -> Result<Op, JournalError> {
        let payload = serde_json::to_vec(entry).map_err(|e| JournalError::Io {
            context: "audit entry".into(),
            reason: e.to_string(),
        })?;
        Ok(Op::Append {
            log: self.log.clone(),
            seq: Seq(entry.seq),
            payload,
        })
    }

    /// Records `entry` (its number is set here); returns once it is durable.
    pub async fn record(&self, mut entry: AuditEntry) -> Result<(), JournalError> {
        match self.queue(&mut entry)? {
            Some(committed) => committed.await,
            None => Ok(()),
        }
    }

    /// Writes the outcome of an entry [`Self::queue`]d as pending over it: queued now (so any
    /// later commit makes it durable too), not waited for.
    fn finish(&self, entry: &AuditEntry) -> Result<(), JournalError> {
        if self.keep == 0 || entry.seq == 0 {
            return Ok(());
        }
        let committed = self.journal.commit(vec![self.append(entry)?]);
        drop(committed);
        Ok(())
    }

    /// Waits until every entry queued so far is committed (readers call it first, so that an
    /// outcome written just before is read).
    pub async fn settle(&self) -> Result<(), JournalError> {
        self.journal.commit(Vec::new()).await.map(|_| ())
    }

    /// Up to `limit` entries after number `after`, oldest first, that `keep` accepts; scans at
    /// most `scan` entries. Returns them and the number to continue after.
    pub fn read(
        &self,
        after: u64,
        limit: usize,
        scan: usize,
        keep: impl Fn(&AuditEntry) -> bool,
    ) -> Result<(Vec<AuditEntry>, u64), JournalError> {
        let records = self.journal.read_log(&self.log, Seq(after), scan)?;
        let mut next = after;
        let mut out = Vec::new();
        for r in records {
            if out.len() >= limit {
                break;
            }
            next = r.seq.0;
            match serde_json::from_slice::<AuditEntry>(&r.payload) {
                Ok(e) if keep(&e) => out.push(e),
                Ok(_) => {}
                Err(e) => tracing::warn!(seq = r.seq.0, error = %e, "audit-entry-unreadable"),
            }
        }
        Ok((out, next))
    }

    fn failed(&self, e: &JournalError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(error = %e, "audit-entry-not-recorded");
    }

    /// Whether a 401 answer may be recorded now (see [`MAX_UNAUTHENTICATED_PER_S`]).
    fn admit_unauthenticated(&self) -> bool {
        let second = now_unix_ms() / 1000;
        let mut seen = self
            .unauthenticated
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if seen.0 != second {
            *seen = (second, 0);
        }
        seen.1 += 1;
        let admitted = seen.1 <= MAX_UNAUTHENTICATED_PER_S;
        if !admitted {
            self.unrecorded.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    /// Drops the entries made before `cutoff_unix_ms` (the age policy,
    /// `retention.keep_audit_days`), reading at most `scan` entries from the oldest; answers
    /// how many went. Entries are numbered in time order, so they go from the oldest up.
    pub async fn prune_before(
        &self,
        cutoff_unix_ms: u64,
        scan: usize,
    ) -> Result<u64, JournalError> {
        let records = self.journal.read_log(&self.log, Seq::ZERO, scan)?;
        let (first, mut last_old) = (records.first().map(|r| r.seq.0), None);
        for r in &records {
            match serde_json::from_slice::<AuditEntry>(&r.payload) {
                Ok(e) if e.at_unix_ms < cutoff_unix_ms => last_old = Some(r.seq),
                Ok(_) => break,
                // Unreadable: goes with its older neighbours.
                Err(_) => last_old = Some(r.seq),
            }
        }
        let (Some(first), Some(upto)) = (first, last_old) else {
            return Ok(0);
        };
        self.journal
            .commit(vec![Op::TruncateThrough {
                log: self.log.clone(),
                upto,
            }])
            .await?;
        let dropped = upto.0 + 1 - first;
        tracing::info!(dropped, upto = upto.0, "audit-entries-pruned");
        Ok(dropped)
    }

    /// The newest entry's number.
    pub fn head(&self) -> u64 {
        *self.head.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the middleware needs of the application (its state, found in the request's app data):
/// who credentials name, and the log.
pub trait Recorder: 'static {
    /// Who holds bearer token `presented` (`None`: no live token).
    fn bearer_holder(&self, presented: &[u8]) -> Option<String>;
    /// The user of web session token `token` (`None`: no live session).
    fn session_user(&self, token: &str) -> Option<String>;
    fn audit(&self) -> &Audit;
}

/// Who makes `req`, as far as its credentials say (before any handler runs), and whether they
/// are valid ones.
fn actor_of(req: &ServiceRequest, state: &impl Recorder) -> (String, bool) {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| crate::admin_token::bearer(v.as_bytes()));
    if let Some(presented) = bearer {
        return match state.bearer_holder(presented) {
            Some(holder) => (holder, true),
            None => ("unknown bearer token".into(), false),
        };
    }
    let session_user = crate::web::session::token_of(req.request())
        .and_then(|t| state.session_user(&t))
        .map(|name| format!("user {name}"));
    match session_user {
        Some(user) => (user, true),
        None => ("anonymous".into(), false),
    }
}

fn outcome(status: u16) -> &'static str {
    match status {
        200..=399 => "ok",
        401 | 403 => "refused",
        _ => "failed",
    }
}

/// Middleware of the operators' listener: records every request that may change something
/// (see the module's documentation) before its answer goes out.
pub async fn record_changes<R: Recorder>(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let reads = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let state = req.app_data::<web::Data<R>>().cloned();
    let (Some(state), false) = (state, reads) else {
        return next.call(req).await;
    };
    let (actor, identified) = actor_of(&req, state.as_ref());
    let audit = state.audit();
    let mut entry = AuditEntry {
        seq: 0,
        at_unix_ms: now_unix_ms(),
        actor,
        source: req
            .peer_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default(),
        method: req.method().to_string(),
        path: req.path().chars().take(MAX_PATH).collect(),
        status: 0,
        outcome: PENDING.into(),
    };
    // A request with valid credentials is recorded as pending before it runs: the changes it
    // commits are queued after its entry, so they cannot be durable before it is, and waiting
    // for it costs no sync of its own.
    let pending = if identified {
        match audit.queue(&mut entry) {
            Ok(p) => p,
            Err(e) => {
                audit.failed(&e);
                None
            }
        }
    } else {
        None
    };
    let result = next.call(req).await;
    let (status, named) = match &result {
        Ok(res) => (
            res.status().as_u16(),
            res.request()
                .extensions()
                .get::<NamedActor>()
                .map(|n| n.0.clone()),
        ),
        Err(e) => (e.as_response_error().status_code().as_u16(), None),
    };
    entry.status = status;
    entry.outcome = outcome(status).into();
    if let Some(pending) = pending {
        // Its outcome rides the next commit: a crash before it leaves the entry pending.
        match pending.await.and_then(|()| audit.finish(&entry)) {
            Ok(()) => {}
            Err(e) => audit.failed(&e),
        }
        return result;
    }
    // Without valid credentials, only what succeeded (a login, an enrollment: each limited
    // by its own rules) is always recorded; refusals and failures anyone can cause, at most
    // so many a second.
    if outcome(status) != "ok" && !audit.admit_unauthenticated() {
        return result;
    }
    if let Some(actor) = named {
        entry.actor = actor;
    }
    if let Err(e) = audit.record(entry).await {
        audit.failed(&e);
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    fn entry(at_unix_ms: u64) -> AuditEntry {
        AuditEntry {
            seq: 0,
            at_unix_ms,
            actor: "admin token".into(),
            source: "127.0.0.1".into(),
            method: "POST".into(),
            path: "/api/v1/processes".into(),
            status: 201,
            outcome: "ok".into(),
        }
    }

    #[actix_rt::test]
    async fn entries_older_than_the_cutoff_go_from_the_oldest_up_and_no_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = tether_shared::journal::Journal::open(
            dir.path(),
            &tether_shared::journal::JournalOptions::default(),
        )
        .unwrap();
        let audit = Audit::load(journal.handle(), 1_000).unwrap();
        for at in [10, 20, 30, 40, 50] {
            audit.record(entry(at)).await.unwrap();
        }
        assert_eq!(
            audit.prune_before(5, 100).await.unwrap(),
            0,
            "none that old"
        );
        assert_eq!(audit.prune_before(35, 100).await.unwrap(), 3);
        let (kept, _) = audit.read(0, 100, 100, |_| true).unwrap();
        assert_eq!(kept.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
        // A bounded scan drops what it saw, the rest at the next round.
        for at in [60, 70, 80] {
            audit.record(entry(at)).await.unwrap();
        }
        assert_eq!(audit.prune_before(75, 2).await.unwrap(), 2);
        assert_eq!(audit.prune_before(75, 2).await.unwrap(), 2);
        let (kept, _) = audit.read(0, 100, 100, |_| true).unwrap();
        assert_eq!(kept.iter().map(|e| e.seq).collect::<Vec<_>>(), [8]);
        assert_eq!(audit.head(), 8, "numbering goes on");
    }
}
