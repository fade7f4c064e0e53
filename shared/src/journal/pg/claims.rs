//! Claims: which node serves each agent now (`tether_claims`). A node that verifies a
//! peer's handshake claims the peer ([`PgStore::claiming`]: a new epoch unless it holds it
//! already); every commit it then
//! makes for that peer carries the epoch as its [`Fence`], and is checked in the transaction that
//! would write it ([`left_out`]). The check locks the claim's row (`FOR SHARE`) until that
//! transaction ends, so a newer claim waits for it: once a claim resolves, no commit
//! under an older epoch of the claim can land, on any node.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Statement;

use super::connection::{db_err, Shared};
use super::{Failure, PgStore};
use crate::journal::store::{Fence, Fenced};
use crate::journal::JournalError;

/// Reads (and locks against a newer claim) the epochs of the claims a batch is fenced by, with
/// the transaction's id (see [`Checked::xid`]). Rows are locked in claim order, as the claims'
/// upsert takes them, so the two never deadlock.
pub(super) const CHECK_CLAIMS: &str = "SELECT claim, epoch, pg_current_xact_id()::text
     FROM tether_claims WHERE claim = ANY($1) ORDER BY claim FOR SHARE";

/// What the check of a batch's claims found.
pub(super) struct Checked {
    /// For each fenced request, whether its claim moved on (it is left out).
    pub out: Vec<bool>,
    /// The checking transaction's id (`None` if no claim was found): should its `COMMIT` get
    /// no answer, the database is asked how it ended.
    pub xid: Option<String>,
}

/// Most claims made in one statement.
const MAX_CLAIMS_PER_STATEMENT: usize = 1024;

/// A claim asked of the [`batcher`].
pub(super) struct ClaimRequest {
    claim: String,
    node: String,
    /// The epoch the node believes it holds the claim at (0: none).
    held: u64,
    reply: oneshot::Sender<Result<Fence, JournalError>>,
}

/// Makes (or confirms) every claim asked meanwhile in one statement, so a reconnect storm of
/// thousands of handshakes costs a few transactions rather than one each. A claim already held
/// by the asking node at the epoch it names is confirmed as it is; any other is raised (or
/// created at epoch 1). A claim asked twice in one round waits for the next.
pub(super) async fn batcher(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<ClaimRequest>) {
    let mut waiting: VecDeque<ClaimRequest> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match rx.recv().await {
                Some(first) => waiting.push_back(first),
                None => return,
            }
        }
        while waiting.len() < MAX_CLAIMS_PER_STATEMENT {
            match rx.try_recv() {
                Ok(more) => waiting.push_back(more),
                Err(_) => break,
            }
        }
        let mut round: Vec<ClaimRequest> = Vec::new();
        let mut later: VecDeque<ClaimRequest> = VecDeque::new();
        let mut seen = std::collections::HashSet::new();
        while let Some(r) = waiting.pop_front() {
            if round.len() < MAX_CLAIMS_PER_STATEMENT && seen.insert(r.claim.clone()) {
                round.push(r);
            } else {
                later.push_back(r);
            }
        }
        waiting = later;
        let raised = claim_all(&shared, &round).await;
        for r in round {
            let answer = match &raised {
                Ok(raised) => Ok(Fence::of(
                    r.claim.clone(),
                    raised.get(&r.claim).copied().unwrap_or(r.held),
                )),
                Err(e) => Err(e.clone()),
            };
            let _ = r.reply.send(answer);
        }
    }
}

/// The claims of `round` that were created or raised, with their new epochs (the others are
/// held as asked).
async fn claim_all(
    shared: &Shared,
    round: &[ClaimRequest],
) -> Result<HashMap<String, u64>, JournalError> {
    let claims: Vec<&str> = round.iter().map(|r| r.claim.as_str()).collect();
    let nodes: Vec<&str> = round.iter().map(|r| r.node.as_str()).collect();
    let held: Vec<i64> = round
        .iter()
        .map(|r| i64::try_from(r.held).unwrap_or(i64::MAX - 1))
        .collect();
    let guard = shared.client(shared.reader()).await?;
    let client = guard.as_ref().ok_or(JournalError::Closed)?;
    let rows = client
        .query(
            "INSERT INTO tether_claims AS t (claim, node, epoch, claimed_at)
             SELECT claim, node, held + 1, now()
               FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(claim, node, held)
               ORDER BY claim
             ON CONFLICT (claim) DO UPDATE
               SET node = excluded.node, epoch = t.epoch + 1, claimed_at = now()
               WHERE t.node <> excluded.node OR t.epoch <> excluded.epoch - 1
             RETURNING claim, epoch",
            &[&claims, &nodes, &held],
        )
        .await
        .map_err(|e| db_err("cannot claim", &e))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let epoch = u64::try_from(r.get::<_, i64>(1)).unwrap_or(0);
            (r.get(0), epoch)
        })
        .collect())
}

impl PgStore {
    /// Claims `claim` (an agent's id) for `node`, and returns the epoch it is held
    /// at: commits under an older epoch of it, from any node, write nothing from now on. If
    /// `node` holds it at `held` already, that is confirmed and kept; otherwise the epoch is
    /// raised (a claim never made starts at 1). Durable when it resolves
    /// (`synchronous_commit` is on); a claim whose outcome is unknown (the database went
    /// away) is an error, and the next one raises the epoch again. Claims asked at once share
    /// a statement.
    pub fn claiming(
        &self,
        claim: &str,
        node: &str,
        held: Option<u64>,
    ) -> impl Future<Output = Result<Fence, JournalError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let sent = self.claims.send(ClaimRequest {
            claim: claim.to_owned(),
            node: node.to_owned(),
            held: held.unwrap_or(0),
            reply,
        });
        async move {
            sent.map_err(|_| JournalError::Closed)?;
            answer.await.map_err(|_| JournalError::Closed)?
        }
    }

    /// [`PgStore::claiming`], waited for (from any thread), raising any claim held before.
    pub fn claim(&self, claim: &str, node: &str) -> Result<Fence, JournalError> {
        let claiming = self.claiming(claim, node, None);
        self.run(move |_| claiming)
    }

    /// Forgets `claim` (a deleted agent's, which no handshake will claim again): commits under
    /// any epoch of it write nothing from now on.
    pub fn forget_claim(
        &self,
        claim: &str,
    ) -> impl Future<Output = Result<(), JournalError>> + Send + 'static {
        let claim = claim.to_owned();
        let (tx, rx) = oneshot::channel();
        let shared = self.shared.clone();
        let spawned = self.runtime.as_ref().map(|rt| {
            rt.spawn(async move {
                let done = async {
                    let guard = shared.client(shared.reader()).await?;
                    let client = guard.as_ref().ok_or(JournalError::Closed)?;
                    client
                        .execute("DELETE FROM tether_claims WHERE claim = $1", &[&claim])
                        .await
                        .map_err(|e| db_err("cannot forget a claim", &e))?;
                    Ok(())
                };
                let _ = tx.send(done.await);
            })
        });
        async move {
            spawned.ok_or(JournalError::Closed)?;
            rx.await.map_err(|_| JournalError::Closed)?
        }
    }

    /// The node that holds `claim` now, and the epoch it holds it at.
    pub fn claim_holder(&self, claim: &str) -> Result<Option<(String, u64)>, JournalError> {
        let claim = claim.to_owned();
        self.run(move |shared| async move {
            let guard = shared.client(shared.reader()).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            let row = client
                .query_opt(
                    "SELECT node, epoch FROM tether_claims WHERE claim = $1",
                    &[&claim],
                )
                .await
                .map_err(|e| db_err("cannot read a claim", &e))?;
            Ok(row.map(|r| {
                let epoch = u64::try_from(r.get::<_, i64>(1)).unwrap_or(0);
                (r.get(0), epoch)
            }))
        })
    }
}

/// For each of `fenced`, whether its claim has moved past its epoch (or was never made), read
/// in `tx` with `check` ([`CHECK_CLAIMS`]) and locked until `tx` ends.
pub(super) async fn left_out(
    tx: &tokio_postgres::Client,
    check: &Statement,
    fenced: &[Fenced],
) -> Result<Checked, Failure> {
    let mut claims: Vec<&str> = fenced
        .iter()
        .flat_map(|f| f.fence.claims().map(|(c, _)| c))
        .collect();
    claims.sort_unstable();
    claims.dedup();
    let rows = tx
        .query(check, &[&claims])
        .await
        .map_err(|e| Failure::of("cannot check the claims", &e))?;
    let xid = rows.first().map(|r| r.get(2));
    let held: HashMap<String, i64> = rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
    let out = fenced
        .iter()
        .map(|f| {
            f.fence.claims().any(|(claim, epoch)| {
                let now = held.get(claim).copied();
                now.and_then(|e| u64::try_from(e).ok()) != Some(epoch)
            })
        })
        .collect();
    Ok(Checked { out, xid })
}

/// The ops of the batch that are written: those of no fenced request left out.
pub(super) fn kept<'a>(
    ops: &'a [crate::journal::Op],
    fenced: &[Fenced],
    out: &[bool],
) -> Vec<&'a crate::journal::Op> {
    let mut skip = vec![false; ops.len()];
    for (f, _) in fenced.iter().zip(out).filter(|(_, out)| **out) {
        for i in f.range.clone() {
            if let Some(s) = skip.get_mut(i) {
                *s = true;
            }
        }
    }
    ops.iter()
        .zip(skip)
        .filter(|(_, skip)| !skip)
        .map(|(op, _)| op)
        .collect()
}
