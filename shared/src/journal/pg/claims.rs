//! Claims: which node serves each agent and relay now (`tether_claims`). A node that verifies a
//! peer's handshake claims the peer with a new epoch ([`PgStore::claim`]); every commit it then
//! makes for that peer carries the epoch as its [`Fence`], and is checked in the transaction that
//! would write it ([`left_out`]). The check locks the claim's row (`FOR SHARE`) until that
//! transaction ends, so a newer claim waits for it: once [`PgStore::claim`] returns, no commit
//! under an older epoch of the claim can land, on any node.

use std::collections::HashMap;

use tokio_postgres::{Statement, Transaction};

use super::connection::db_err;
use super::{Failure, PgStore};
use crate::journal::store::{Fence, Fenced};
use crate::journal::JournalError;

/// Reads (and locks against a newer claim) the epochs of the claims a batch is fenced by.
pub(super) const CHECK_CLAIMS: &str =
    "SELECT claim, epoch FROM tether_claims WHERE claim = ANY($1) FOR SHARE";

impl PgStore {
    /// Claims `claim` (an agent's or a relay's id) for `node` with a new epoch, and returns it:
    /// commits under an older epoch of it, from any node, write nothing from now on. Durable
    /// when it returns (`synchronous_commit` is on); a claim whose outcome is unknown (the
    /// database went away) is an error, and the next one raises the epoch again.
    pub fn claim(&self, claim: &str, node: &str) -> Result<Fence, JournalError> {
        let (claim, node) = (claim.to_owned(), node.to_owned());
        self.run(move |shared| async move {
            let guard = shared.client(shared.reader()).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            let row = client
                .query_one(
                    "INSERT INTO tether_claims (claim, node, epoch, claimed_at)
                     VALUES ($1, $2, 1, now())
                     ON CONFLICT (claim) DO UPDATE
                       SET node = excluded.node, epoch = tether_claims.epoch + 1,
                           claimed_at = now()
                     RETURNING epoch",
                    &[&claim, &node],
                )
                .await
                .map_err(|e| db_err("cannot claim", &e))?;
            let epoch = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
            Ok(Fence { claim, epoch })
        })
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
    tx: &Transaction<'_>,
    check: &Statement,
    fenced: &[Fenced],
) -> Result<Vec<bool>, Failure> {
    let mut claims: Vec<&str> = fenced.iter().map(|f| f.fence.claim.as_str()).collect();
    claims.sort_unstable();
    claims.dedup();
    let rows = tx
        .query(check, &[&claims])
        .await
        .map_err(|e| Failure::of("cannot check the claims", &e))?;
    let held: HashMap<String, i64> = rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(fenced
        .iter()
        .map(|f| {
            let now = held.get(&f.fence.claim).copied();
            now.and_then(|e| u64::try_from(e).ok()) != Some(f.fence.epoch)
        })
        .collect())
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
