//! The lease: which node is active. Its row holds the holder's name, an epoch that every
//! takeover raises, and an expiry by the database's clock; every batch of the active node
//! checks it inside its own transaction (see `apply`).

use std::time::Duration;

use tokio_postgres::Client;

use super::connection::{db_err, refuse};
use super::PgStore;
use crate::journal::JournalError;

/// The lease a node holds: while it is unexpired and its epoch current, the node is the only
/// one whose batches commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub epoch: i64,
    /// Its length, renewed by [`PgStore::renew_lease`].
    pub ttl: Duration,
    /// When the statement that took it was sent: by this node's clock, the lease runs at
    /// least until `taken + ttl` (the database set its expiry later than that).
    pub taken: std::time::Instant,
}

/// Who holds the lease now, as a node that does not sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub holder: String,
    pub epoch: i64,
    /// Milliseconds until it expires by the database's clock (negative: expired).
    pub expires_in_ms: i64,
}

pub(super) fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

/// Why a batch was not committed by a node that is no longer the active one.
pub(super) fn fenced(lease: &Lease) -> JournalError {
    JournalError::Poisoned {
        reason: format!(
            "this node ({}) no longer holds the lease at epoch {}: another node is active, so nothing more is committed here",
            lease.holder, lease.epoch
        ),
    }
}

/// The lease row as it is now.
pub(super) async fn current_holder(client: &Client) -> Result<LeaseHolder, JournalError> {
    let row = client
        .query_opt(
            "SELECT holder, epoch,
                    (extract(epoch FROM expires_at - now()) * 1000)::bigint
             FROM tether_lease WHERE id = 1",
            &[],
        )
        .await
        .map_err(|e| db_err("cannot read the lease", &e))?
        .ok_or_else(|| refuse("nobody holds the lease"))?;
    Ok(LeaseHolder {
        holder: row.get(0),
        epoch: row.get(1),
        expires_in_ms: row.get(2),
    })
}

impl PgStore {
    /// Takes the lease for `holder` if it is free, expired, or `holder`'s own (a restart):
    /// the lease, with an epoch above every earlier one; `Err(current holder)` if another node
    /// holds it. From then on every batch commits only while the lease is held.
    pub fn acquire_lease(
        &self,
        holder: &str,
        ttl: Duration,
    ) -> Result<Result<Lease, LeaseHolder>, JournalError> {
        let holder = holder.to_owned();
        let taken = std::time::Instant::now();
        let got = self.run(move |shared| async move {
            let guard = shared.client(&shared.writer).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            let row = client
                .query_opt(
                    "INSERT INTO tether_lease AS l (id, holder, epoch, expires_at)
                     VALUES (1, $1, 1, now() + $2 * interval '1 millisecond')
                     ON CONFLICT (id) DO UPDATE
                       SET holder = excluded.holder, epoch = l.epoch + 1,
                           expires_at = excluded.expires_at
                       WHERE l.expires_at <= now() OR l.holder = excluded.holder
                     RETURNING epoch",
                    &[&holder, &(ttl_ms(ttl) as f64)],
                )
                .await
                .map_err(|e| db_err("cannot take the lease", &e))?;
            if let Some(row) = row {
                let lease = Lease {
                    holder,
                    epoch: row.get(0),
                    ttl,
                    taken,
                };
                *shared
                    .lease
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(lease.clone());
                return Ok(Ok(lease));
            }
            Ok(Err(current_holder(client).await?))
        })?;
        Ok(got)
    }

    /// Extends the lease this store holds by its length; an error once it is lost (another
    /// node took it): the node must step down.
    pub fn renew_lease(&self) -> Result<(), JournalError> {
        self.run(|shared| async move {
            let lease = shared.held_lease().ok_or_else(|| JournalError::Poisoned {
                reason: "no lease to renew".into(),
            })?;
            let guard = shared.client(&shared.writer).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            let renewed = client
                .execute(
                    "UPDATE tether_lease SET expires_at = now() + $3 * interval '1 millisecond'
                     WHERE id = 1 AND holder = $1 AND epoch = $2",
                    &[&lease.holder, &lease.epoch, &(ttl_ms(lease.ttl) as f64)],
                )
                .await
                .map_err(|e| db_err("cannot renew the lease", &e))?;
            if renewed == 1 {
                Ok(())
            } else {
                Err(fenced(&lease))
            }
        })
    }

    /// Hands the lease this store holds to the standby heard from most recently (within one
    /// lease), in one statement: the row names that node, with the next epoch and a whole
    /// lease, so it takes over at its next look (it finds its own name there) instead of
    /// waiting for the lease to run out. From then on nothing more commits here (every batch
    /// checks the holder and epoch) and this node cannot take the lease back while the heir's
    /// runs. `Ok(None)`: no standby was heard from, and the lease stays here.
    pub fn hand_over_lease(&self) -> Result<Option<LeaseHolder>, JournalError> {
        self.run(|shared| async move {
            let lease = shared
                .held_lease()
                .ok_or_else(|| refuse("this node holds no lease to hand over"))?;
            let guard = shared.client(&shared.writer).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            let ttl = ttl_ms(lease.ttl) as f64;
            let row = client
                .query_opt(
                    "WITH heir AS (
                       SELECT name FROM tether_nodes
                       WHERE role = 'standby' AND name <> $1
                         AND seen_at > now() - $3 * interval '1 millisecond'
                       ORDER BY seen_at DESC LIMIT 1)
                     UPDATE tether_lease SET holder = heir.name, epoch = epoch + 1,
                       expires_at = now() + $3 * interval '1 millisecond'
                     FROM heir
                     WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > now()
                     RETURNING tether_lease.holder, tether_lease.epoch",
                    &[&lease.holder, &lease.epoch, &ttl],
                )
                .await
                .map_err(|e| db_err("cannot hand the lease over", &e))?;
            if let Some(row) = row {
                return Ok(Some(LeaseHolder {
                    holder: row.get(0),
                    epoch: row.get(1),
                    expires_in_ms: ttl_ms(lease.ttl),
                }));
            }
            // No heir, or the lease was no longer this node's to give.
            let now = current_holder(client).await?;
            if now.holder == lease.holder && now.epoch == lease.epoch && now.expires_in_ms > 0 {
                Ok(None)
            } else {
                Err(fenced(&lease))
            }
        })
    }

    /// Who holds the lease now (`None`: nobody ever did).
    pub fn lease_holder(&self) -> Result<Option<LeaseHolder>, JournalError> {
        self.run(|shared| async move {
            let guard = shared.client(shared.reader()).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            match current_holder(client).await {
                Ok(h) => Ok(Some(h)),
                Err(JournalError::Database { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }
}
