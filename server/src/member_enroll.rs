//! Enrollments that reach a member node, taken by the active node through the database (see
//! `docs/cluster.md`, "Every node serves agents: members").
//!
//! The registry is the active node's: a member cannot enroll anyone. So that an agent or a
//! relay that dials a member (behind a load balancer, say) enrolls on its first try, the member
//! writes the request as it came ([`Forwarded`]: the body and the caller's address) to
//! `enroll/<node>/<id>`, under a claim of its own (`enroll@<node>`: a member writes only under
//! claims). The active node looks there every [`ACTIVE_LOOK`], runs each request exactly as if
//! it had come to it (the same checks, the same failure budget per caller's address), and in
//! one commit writes the answer ([`Answer`]) to `enrolled/<node>/<id>` and deletes the request.
//! The member, which looks for its answer every [`ANSWER_LOOK`], hands it to the caller and
//! deletes it.
//!
//! Bounds: a member forwards at most [`MAX_WAITING`] enrollments at a time (past that it
//! answers `503`, as it did before it forwarded any), after its own failure budget per
//! caller's address; it waits [`ANSWER_WAIT`] for an answer (then `503`: the caller tries again,
//! and the active node answers a repeated request with the same agent). The active node takes
//! at most [`PAGE`] requests per look, and removes answers nobody fetched after
//! [`ANSWER_KEPT`].

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpResponse, ResponseError};
use serde::{Deserialize, Serialize};
use tether_shared::ids::AgentId;
use tether_shared::journal::{Fence, JournalError, Op};

use crate::api_error::ApiError;
use crate::state::AppState;

/// Where members leave requests.
pub const REQUESTS: &str = "enroll/";
/// Where the active node leaves answers.
pub const ANSWERS: &str = "enrolled/";
/// Enrollments one member forwards at a time at most.
const MAX_WAITING: usize = 32;
/// How long a member waits for an answer.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// How often a member looks for its answer.
const ANSWER_LOOK: Duration = Duration::from_millis(50);
/// How often the active node looks for requests.
const ACTIVE_LOOK: Duration = Duration::from_millis(100);
/// Requests the active node takes per look at most.
const PAGE: usize = 64;
/// Bytes of requests read per look at most (a request is at most 16 KiB).
const PAGE_BYTES: usize = 1 << 20;
/// How long an answer nobody fetched is kept.
const ANSWER_KEPT: Duration = Duration::from_secs(60);

/// A request a member forwards: the body as it came, and the caller's address (for the
/// active node's failure budget).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forwarded {
    pub source: Option<IpAddr>,
    pub body: String,
}

/// The active node's answer to a forwarded request, as it would have answered it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<String>,
}

impl Answer {
    fn response(&self) -> HttpResponse {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut r = HttpResponse::build(status);
        r.content_type("application/json");
        if let Some(after) = &self.retry_after {
            r.insert_header((header::RETRY_AFTER, after.clone()));
        }
        r.body(self.body.clone())
    }

    async fn of(response: HttpResponse) -> Answer {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = actix_web::body::to_bytes(response.into_body())
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        Answer {
            status,
            body,
            retry_after,
        }
    }
}

/// The answer key of request key `key`.
fn answer_key(key: &str) -> Option<String> {
    key.strip_prefix(REQUESTS)
        .map(|rest| format!("{ANSWERS}{rest}"))
}

/// When the request of `key` was made (Unix ms), from its key.
fn made_unix_ms(key: &str) -> Option<u64> {
    let id = key.rsplit('/').next()?;
    id.split('-').next()?.parse().ok()
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A member's side: forwards the enrollments it gets.
pub struct Forwarder {
    waiting: Arc<tokio::sync::Semaphore>,
    /// Its claim (`enroll@<node>`), made at the first enrollment.
    fence: tokio::sync::Mutex<Option<Fence>>,
    next: AtomicU64,
}

impl Default for Forwarder {
    fn default() -> Self {
        Forwarder {
            waiting: Arc::new(tokio::sync::Semaphore::new(MAX_WAITING)),
            fence: tokio::sync::Mutex::new(None),
            next: AtomicU64::new(0),
        }
    }
}

impl Forwarder {
    /// Forwards `body` (from `source`) to the active node and answers what it answered.
    pub async fn forward(
        &self,
        state: &AppState,
        source: Option<IpAddr>,
        body: &[u8],
    ) -> Result<HttpResponse, ApiError> {
        let busy = || {
            ApiError::Incomplete(
                "this member of the cluster could not reach the active node to enroll: try again"
                    .into(),
            )
        };
        let Ok(_turn) = self.waiting.clone().try_acquire_owned() else {
            return Err(busy());
        };
        let body = std::str::from_utf8(body)
            .map_err(|_| ApiError::BadRequest("the request is not JSON".into()))?;
        let claims = state.shared.claims.as_ref().ok_or_else(busy)?;
        let node = claims.node().to_owned();
        let key = format!(
            "{REQUESTS}{node}/{:013}-{:x}-{:016x}",
            now_unix_ms(),
            self.next.fetch_add(1, Ordering::Relaxed),
            rand::random::<u64>()
        );
        let answer_key = answer_key(&key).ok_or_else(busy)?;
        let value = serde_json::to_vec(&Forwarded {
            source,
            body: body.to_owned(),
        })
        .map_err(|_| busy())?;
        let put = vec![Op::PutMeta {
            key: key.clone(),
            value,
        }];
        self.commit(state, &node, put).await.map_err(|e| {
            tracing::warn!(error = %e, "enrollment-not-forwarded");
            busy()
        })?;
        tracing::info!(key = %key, source = ?source, "enrollment-forwarded-to-the-active-node");
        let deadline = Instant::now() + ANSWER_WAIT;
        let mut look = tokio::time::interval(ANSWER_LOOK);
        loop {
            look.tick().await;
            let (j, k) = (state.shared.journal.clone(), answer_key.clone());
            if let Ok(Ok(Some(stored))) = web::block(move || j.get_meta(&k)).await {
                let gone = vec![Op::DeleteMeta {
                    key: answer_key.clone(),
                }];
                if let Err(e) = self.commit(state, &node, gone).await {
                    // Removed by the active node after a while.
                    tracing::warn!(key = %answer_key, error = %e, "enrollment-answer-not-removed");
                }
                let answer: Answer = serde_json::from_slice(&stored).map_err(|_| busy())?;
                return Ok(answer.response());
            }
            if Instant::now() >= deadline {
                tracing::warn!(key = %key, "enrollment-not-answered-in-time");
                return Err(busy());
            }
        }
    }

    /// Commits `ops` under this member's claim, made (again) if need be.
    async fn commit(&self, state: &AppState, node: &str, ops: Vec<Op>) -> Result<(), JournalError> {
        let claims = state
            .shared
            .claims
            .as_ref()
            .ok_or(JournalError::NotActive)?;
        let mut fence = self.fence.lock().await;
        for _ in 0..2 {
            let held = match fence.clone() {
                Some(f) => f,
                None => {
                    let made = claims
                        .claim(&AgentId::new(format!("enroll@{node}")), None)
                        .await?;
                    *fence = Some(made.clone());
                    made
                }
            };
            match state
                .shared
                .journal
                .commit_under(ops.clone(), Some(held))
                .await
            {
                Err(JournalError::Fenced { .. }) => *fence = None,
                done => return done.map(drop),
            }
        }
        Err(JournalError::NotActive)
    }
}

/// The active node's side: answers the requests members forward, for as long as it runs.
pub async fn answer_forever(state: web::Data<AppState>) {
    let mut look = tokio::time::interval(ACTIVE_LOOK);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        look.tick().await;
        let j = state.shared.journal.clone();
        let page = web::block(move || j.scan_meta_from(REQUESTS, REQUESTS, PAGE, PAGE_BYTES)).await;
        let rows = match page {
            Ok(Ok(page)) => page.entries,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "forwarded-enrollments-not-read");
                continue;
            }
            Err(_) => continue,
        };
        for (key, value) in rows {
            let answer = match serde_json::from_slice::<Forwarded>(&value) {
                Ok(f) => {
                    let taken =
                        crate::agent_surface::enroll_from(&state, f.source, f.body.as_bytes());
                    Answer::of(taken.await.unwrap_or_else(|e| e.error_response())).await
                }
                Err(_) => {
                    Answer::of(
                        ApiError::BadRequest("a forwarded enrollment that does not read".into())
                            .error_response(),
                    )
                    .await
                }
            };
            let mut ops = vec![Op::DeleteMeta { key: key.clone() }];
            if let (Some(to), Ok(value)) = (answer_key(&key), serde_json::to_vec(&answer)) {
                ops.push(Op::PutMeta { key: to, value });
            }
            if let Err(e) = state.shared.journal.commit(ops).await {
                tracing::warn!(key = %key, error = %e, "forwarded-enrollment-not-answered");
            }
        }
        remove_old_answers(&state).await;
    }
}

/// Answers nobody fetched within [`ANSWER_KEPT`] (their member gave up, or died).
async fn remove_old_answers(state: &AppState) {
    let j = state.shared.journal.clone();
    let Ok(Ok(page)) =
        web::block(move || j.scan_meta_from(ANSWERS, ANSWERS, PAGE, PAGE_BYTES)).await
    else {
        return;
    };
    let cutoff = now_unix_ms().saturating_sub(ANSWER_KEPT.as_millis() as u64);
    let old: Vec<Op> = page
        .entries
        .into_iter()
        .filter(|(k, _)| made_unix_ms(k).is_none_or(|ms| ms < cutoff))
        .map(|(key, _)| Op::DeleteMeta { key })
        .collect();
    if !old.is_empty() {
        if let Err(e) = state.shared.journal.commit(old).await {
            tracing::warn!(error = %e, "old-enrollment-answers-not-removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_found_beside_its_request_and_aged_by_its_key() {
        let key = "enroll/node-b/1733570000000-3-00000000000000ff";
        assert_eq!(
            answer_key(key).as_deref(),
            Some("enrolled/node-b/1733570000000-3-00000000000000ff")
        );
        assert_eq!(made_unix_ms(key), Some(1_733_570_000_000));
        assert_eq!(
            made_unix_ms("enrolled/node-b/1733570000000-3-ff"),
            Some(1_733_570_000_000)
        );
        assert_eq!(answer_key("inbox/a-1/1"), None);
        assert_eq!(made_unix_ms("enrolled/node-b/garbage"), None);
    }
}
