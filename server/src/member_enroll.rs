//! Enrollments that reach a member node, taken by the active node through the database (see
//! `docs/cluster.md`, "Enrollment at a member").
//!
//! The registry is the active node's: a member cannot enroll anyone. So that an agent or a
//! relay that dials a member (behind a load balancer, say) enrolls on its first try, the member
//! checks what it can (the caller's failure budget, the request's shape, the proofs that the
//! caller holds its keys), then writes the request as it came ([`Forwarded`]: the body and the
//! caller's address), **sealed with the secrets key ring** (it holds the enrollment token), to
//! `enroll/<node>/<id>`, under a claim of its own (`enroll@<node>`: a member writes only under
//! claims). The active node looks there every [`ACTIVE_LOOK`], runs each request exactly as if
//! it had come to it (the same checks, the same failure budget per caller's address), and in
//! one commit per look writes the answers ([`Answer`]) to `enrolled/<node>/<id>` and deletes
//! the requests. The member, which looks for its answer every [`ANSWER_LOOK`], hands it to the
//! caller and deletes it.
//!
//! Bounds: a member forwards at most [`MAX_WAITING`] enrollments at a time (past that it
//! answers `503`), and gives up on one after [`ANSWER_WAIT`] (`503`; it deletes its request:
//! the caller tries again, and the active node answers a repeated request with the same
//! agent). The active node takes at most [`PAGE`] requests per look, going round all of them
//! (a busy member's do not hold another's up), drops without running them (nobody waits for
//! their answer) the requests of a member not heard from for [`KEPT`] or a lease, whichever is
//! longer (by the database's clock, in `tether_nodes`: the nodes' clocks may differ by up to
//! [`ORPHANED`]) and those stamped more than [`ORPHANED`] before by their member's clock,
//! removes answers nobody fetched [`KEPT`] after it wrote them, and after a failure waits up
//! to [`BACKOFF_MAX`] before it looks again.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
/// How long a member waits for an answer (forwarding included).
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// How often a member looks for its answer.
const ANSWER_LOOK: Duration = Duration::from_millis(100);
/// How often the active node looks for requests.
const ACTIVE_LOOK: Duration = Duration::from_millis(100);
/// The longest the active node waits after a failure before it looks again.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Requests the active node takes per look at most.
const PAGE: usize = 64;
/// Bytes of requests read per look at most (a request is at most 16 KiB, sealed).
const PAGE_BYTES: usize = 2 << 20;
/// How long an answer is kept (by the active node's clock), and the requests of a member not
/// heard from (by the database's).
const KEPT: Duration = Duration::from_secs(60);
/// Requests stamped longer ago than this by their member's clock are dropped whatever the
/// member's state: far more than any member waits, and than the clocks of a cluster differ.
const ORPHANED: Duration = Duration::from_secs(3600);
/// How long the active node spends on one page before it commits what it answered.
const PAGE_BUDGET: Duration = Duration::from_secs(2);

/// What a request's seal is bound to: its place (a sealed request copied elsewhere does not
/// open).
fn context(key: &str) -> String {
    format!("enroll/forwarded:{key}")
}

/// A request a member forwards: the body as it came (the token in it), and the caller's
/// address (for the active node's failure budget). Stored sealed; never printed.
#[derive(Clone, Serialize, Deserialize)]
pub struct Forwarded {
    pub source: Option<IpAddr>,
    pub body: String,
}

/// The active node's answer to a forwarded request, as it would have answered it, and when
/// (Unix ms, its clock).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<String>,
    #[serde(default)]
    pub answered_unix_ms: u64,
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
        // Every answer of an enrollment is small and sized.
        let body = actix_web::body::to_bytes_limited(response.into_body(), 64 * 1024)
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        Answer {
            status,
            body,
            retry_after,
            answered_unix_ms: now_unix_ms(),
        }
    }
}

/// Whether `e` refused a commit under `fence`.
fn fenced_by(e: &JournalError, fence: &Fence) -> bool {
    matches!(e, JournalError::Fenced { claim, epoch } if *claim == fence.claim && *epoch == fence.epoch)
}

/// The answer key of request key `key`.
fn answer_key(key: &str) -> Option<String> {
    key.strip_prefix(REQUESTS)
        .map(|rest| format!("{ANSWERS}{rest}"))
}

/// When the request of `key` was made (Unix ms, by its member's clock), from its key.
fn made_unix_ms(key: &str) -> Option<u64> {
    let id = key.rsplit('/').next()?;
    id.split('-').next()?.parse().ok()
}

/// Whether the request of `key` is left unanswered (see the module's doc): its member (named in
/// the key) is listed in `nodes` as not heard from for `silent` (a member notes itself every
/// third of a lease, and the list is read as often: `silent` is at least a lease), or its stamp
/// is older than [`ORPHANED`] at `now_unix_ms` (a stamp ahead of that clock is not: the
/// member's clock is). A member not listed may have started since the list was read: its
/// requests are answered.
fn orphaned(
    key: &str,
    nodes: &[tether_shared::journal::pg::NodeSeen],
    silent: Duration,
    now_unix_ms: u64,
) -> bool {
    let Some(made) = made_unix_ms(key) else {
        return true;
    };
    if now_unix_ms.saturating_sub(made) > ORPHANED.as_millis() as u64 {
        return true;
    }
    // A node's name may hold a `/`; the request's id after it does not.
    let node = key
        .strip_prefix(REQUESTS)
        .and_then(|rest| rest.rsplit_once('/'))
        .map(|(node, _)| node);
    nodes.iter().any(|n| {
        Some(n.node.as_str()) == node
            && u128::try_from(n.seen_ms_ago).unwrap_or(0) >= silent.as_millis()
    })
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

fn busy() -> ApiError {
    ApiError::Incomplete(
        "this member of the cluster could not have the active node enroll you: try again".into(),
    )
}

impl Forwarder {
    /// Forwards `body` (from `source`, checked already) to the active node and answers what
    /// it answered, within [`ANSWER_WAIT`].
    pub async fn forward(
        &self,
        state: &AppState,
        source: Option<IpAddr>,
        body: &[u8],
    ) -> Result<HttpResponse, ApiError> {
        let Ok(_turn) = self.waiting.clone().try_acquire_owned() else {
            return Err(busy());
        };
        let body = std::str::from_utf8(body)
            .map_err(|_| ApiError::BadRequest("the request is not JSON".into()))?;
        let node = state
            .shared
            .claims
            .as_ref()
            .ok_or_else(busy)?
            .node()
            .to_owned();
        let key = format!(
            "{REQUESTS}{node}/{:013}-{:x}-{:016x}",
            now_unix_ms(),
            self.next.fetch_add(1, Ordering::Relaxed),
            rand::random::<u64>()
        );
        let json = serde_json::to_string(&Forwarded {
            source,
            body: body.to_owned(),
        })
        .map_err(|_| busy())?;
        let sealed = state.deployments.secrets().seal(&context(&key), &json);
        let waited = tokio::time::timeout(
            ANSWER_WAIT,
            self.wait_for_answer(state, &node, &key, sealed.into_bytes()),
        )
        .await;
        match waited {
            Ok(answered) => answered,
            Err(_) => {
                tracing::warn!(key = %key, "enrollment-not-answered-in-time");
                // Nobody waits for it any more (the active node drops it in time too).
                self.spawn_commit(state, node, vec![Op::DeleteMeta { key }]);
                Err(busy())
            }
        }
    }

    async fn wait_for_answer(
        &self,
        state: &AppState,
        node: &str,
        key: &str,
        sealed: Vec<u8>,
    ) -> Result<HttpResponse, ApiError> {
        let put = vec![Op::PutMeta {
            key: key.to_owned(),
            value: sealed,
        }];
        self.commit(state, node, put).await.map_err(|e| {
            tracing::warn!(error = %e, "enrollment-not-forwarded");
            busy()
        })?;
        tracing::info!(key = %key, "enrollment-forwarded-to-the-active-node");
        let answer_key = answer_key(key).ok_or_else(busy)?;
        let mut look = tokio::time::interval(ANSWER_LOOK);
        loop {
            look.tick().await;
            let (j, k) = (state.shared.journal.clone(), answer_key.clone());
            if let Ok(Ok(Some(stored))) = web::block(move || j.get_meta(&k)).await {
                self.spawn_commit(
                    state,
                    node.to_owned(),
                    vec![Op::DeleteMeta { key: answer_key }],
                );
                let answer: Answer = serde_json::from_slice(&stored).map_err(|_| busy())?;
                return Ok(answer.response());
            }
        }
    }

    /// Commits `ops` under this member's claim in the background (a failure leaves rows the
    /// active node removes in time).
    fn spawn_commit(&self, state: &AppState, node: String, ops: Vec<Op>) {
        let journal = state.shared.journal.clone();
        let Some(fence) = self.fence.try_lock().ok().and_then(|f| f.clone()) else {
            return;
        };
        actix_rt::spawn(async move {
            if let Err(e) = journal.commit_under(ops, Some(fence)).await {
                tracing::warn!(node = %node, error = %e, "enrollment-rows-not-removed");
            }
        });
    }

    /// Commits `ops` under this member's claim, made (again) if need be.
    async fn commit(&self, state: &AppState, node: &str, ops: Vec<Op>) -> Result<(), JournalError> {
        let claims = state
            .shared
            .claims
            .as_ref()
            .ok_or(JournalError::NotActive)?;
        let mut last = JournalError::NotActive;
        for _ in 0..2 {
            let held = {
                let mut fence = self.fence.lock().await;
                match fence.clone() {
                    Some(f) => f,
                    None => {
                        let made = claims
                            .claim(&AgentId::new(format!("enroll@{node}")), None)
                            .await?;
                        *fence = Some(made.clone());
                        made
                    }
                }
            };
            match state
                .shared
                .journal
                .commit_under(ops.clone(), Some(held))
                .await
            {
                Err(e @ JournalError::Fenced { .. }) => {
                    // Claimed again at the next try (unless another try did already).
                    let mut fence = self.fence.lock().await;
                    if fence.as_ref().is_some_and(|f| fenced_by(&e, f)) {
                        *fence = None;
                    }
                    last = e;
                }
                done => return done.map(drop),
            }
        }
        Err(last)
    }
}

/// The active node's side: answers the requests members forward, for as long as it runs.
pub async fn answer_forever(state: web::Data<AppState>) {
    let mut from = REQUESTS.to_owned();
    let mut pause = ACTIVE_LOOK;
    loop {
        tokio::time::sleep(pause).await;
        pause = match answer_page(&state, &mut from).await {
            Ok(()) => ACTIVE_LOOK,
            Err(e) => {
                tracing::warn!(error = %e, "forwarded-enrollments-not-answered");
                (pause * 2).min(BACKOFF_MAX)
            }
        };
    }
}

/// Answers one page of requests from `from` on (where the next page starts is left there),
/// and removes old answers.
async fn answer_page(state: &AppState, from: &mut String) -> Result<(), JournalError> {
    let (j, start) = (state.shared.journal.clone(), from.clone());
    let page = web::block(move || j.scan_meta_from(&start, REQUESTS, PAGE, PAGE_BYTES))
        .await
        .map_err(|_| JournalError::Closed)??;
    *from = match page.entries.last() {
        // Right after the last key read (the key with a NUL added is the next one).
        Some((last, _)) if page.full => format!("{last}\0"),
        _ => REQUESTS.to_owned(),
    };
    let now = now_unix_ms();
    let cutoff = now.saturating_sub(KEPT.as_millis() as u64);
    let (nodes, lease) = state
        .cluster
        .as_ref()
        .map_or((Vec::new(), 0), |c| (c.nodes.list(), c.lease_ttl_ms));
    let silent = KEPT.max(Duration::from_millis(lease));
    let keys = state.deployments.secrets();
    let mut ops = Vec::new();
    let started = std::time::Instant::now();
    for (key, value) in page.entries {
        if started.elapsed() >= PAGE_BUDGET {
            // What is answered goes now; the next look starts here (its callers still wait).
            *from = key;
            break;
        }
        ops.push(Op::DeleteMeta { key: key.clone() });
        if orphaned(&key, &nodes, silent, now) {
            // Nobody waits for its answer any more.
            tracing::info!(key = %key, "forwarded-enrollment-orphaned-dropped");
            continue;
        }
        let refused = match std::str::from_utf8(&value) {
            Ok(t) if crate::secrets::KeyRing::is_sealed(t) => {
                match keys
                    .open(&context(&key), t)
                    .map_err(|e| e.to_string())
                    .and_then(|json| {
                        serde_json::from_str::<Forwarded>(&json).map_err(|e| e.to_string())
                    }) {
                    Ok(f) => {
                        let taken =
                            crate::agent_surface::enroll_from(state, f.source, f.body.as_bytes());
                        Ok(taken.await.unwrap_or_else(|e| e.error_response()))
                    }
                    // Sealed by a member, but not with a key this node has (the rings differ):
                    // the caller may try again elsewhere.
                    Err(reason) => {
                        tracing::warn!(key = %key, reason = %reason, "forwarded-enrollment-does-not-open");
                        Err(ApiError::Incomplete(
                            "the active node could not open a forwarded enrollment: try again"
                                .into(),
                        ))
                    }
                }
            }
            // Not written by a member.
            _ => {
                tracing::warn!(key = %key, "forwarded-enrollment-not-sealed-refused");
                Err(ApiError::BadRequest(
                    "a forwarded enrollment that is not sealed".into(),
                ))
            }
        };
        let answer = Answer::of(refused.unwrap_or_else(|e| e.error_response())).await;
        if let (Some(to), Ok(value)) = (answer_key(&key), serde_json::to_vec(&answer)) {
            ops.push(Op::PutMeta { key: to, value });
        }
    }
    if !ops.is_empty() {
        state.shared.journal.commit(ops).await?;
    }
    remove_old_answers(state, cutoff).await
}

/// Answers nobody fetched (their member gave up, or died) answered before `cutoff`.
async fn remove_old_answers(state: &AppState, cutoff: u64) -> Result<(), JournalError> {
    let j = state.shared.journal.clone();
    let page = web::block(move || j.scan_meta_from(ANSWERS, ANSWERS, PAGE, PAGE_BYTES))
        .await
        .map_err(|_| JournalError::Closed)??;
    let old: Vec<Op> = page
        .entries
        .into_iter()
        .filter(|(_, v)| {
            serde_json::from_slice::<Answer>(v).map_or(true, |a| a.answered_unix_ms < cutoff)
        })
        .map(|(key, _)| Op::DeleteMeta { key })
        .collect();
    if !old.is_empty() {
        state.shared.journal.commit(old).await?;
    }
    Ok(())
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

    fn seen(node: &str, seen_ms_ago: i64) -> tether_shared::journal::pg::NodeSeen {
        tether_shared::journal::pg::NodeSeen {
            node: node.into(),
            role: "member".into(),
            version: String::new(),
            sessions: 0,
            url: String::new(),
            seen_ms_ago,
        }
    }

    #[test]
    fn a_request_is_dropped_when_its_member_went_silent_not_by_the_clocks_of_the_nodes() {
        let made = 1_733_570_000_000;
        let key = format!("enroll/node-b/{made}-3-00000000000000ff");
        let nodes = [seen("node-a", 0), seen("node-b", 400)];
        // Its member is alive: answered, however far behind the active node its clock runs
        // (five minutes here) or ahead of it.
        assert!(!orphaned(&key, &nodes, KEPT, made + 5 * 60_000));
        assert!(!orphaned(&key, &nodes, KEPT, made - 5 * 60_000));
        // Its member was not heard from for a minute (by the database's clock): dropped.
        let silent = [seen("node-a", 0), seen("node-b", 61_000)];
        assert!(orphaned(&key, &silent, KEPT, made + 1_000));
        // Another node's silence is not its member's.
        assert!(!orphaned(
            &key,
            &[seen("node-c", 61_000)],
            KEPT,
            made + 1_000
        ));
        // A member not listed yet (started since the list was read): answered.
        assert!(!orphaned(&key, &[], KEPT, made + 1_000));
        // Stamped more than an hour before, by any clock: dropped.
        assert!(orphaned(&key, &nodes, KEPT, made + 3_600_001));
        assert!(orphaned("enroll/node-b/garbage", &nodes, KEPT, made));
        // With a lease of ten minutes, a member notes itself every 200 s: not silent at 61 s.
        let ten_minutes = Duration::from_secs(600);
        assert!(!orphaned(&key, &silent, ten_minutes, made + 1_000));
        assert!(orphaned(
            &key,
            &[seen("node-b", 600_000)],
            ten_minutes,
            made
        ));
        // A node named with a `/`.
        let slashed = format!("enroll/dc1/node-b/{made}-3-00000000000000ff");
        assert!(orphaned(
            &slashed,
            &[seen("dc1/node-b", 61_000)],
            KEPT,
            made
        ));
        assert!(!orphaned(&slashed, &[seen("dc1", 61_000)], KEPT, made));
    }
}
