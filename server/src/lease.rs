//! One active server among the nodes of a cluster on PostgreSQL (see `docs/cluster.md`).
//!
//! Before it loads any state or binds any port, a node takes the lease ([`become_active`]): a
//! standby waits, binding nothing (agents and operators reach the active node), until the
//! active node's lease runs out by the database's clock. The active node renews it every third
//! of its length ([`keep`]); every batch it commits checks the lease inside its transaction,
//! so once another node took over, this one can commit (and so acknowledge) nothing more. A
//! node that finds its lease gone steps down: it starts over in place, as a standby.

use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use tether_shared::journal::{JournalError, Lease, PgStore};

/// Waits (blocking) until this node holds the lease; logs who holds it meanwhile.
pub fn become_active(store: &PgStore, node: &str, ttl: Duration) -> Result<Lease, JournalError> {
    let mut seen: Option<(String, i64)> = None;
    loop {
        match store.acquire_lease(node, ttl)? {
            Ok(lease) => {
                tracing::info!(node = %node, epoch = lease.epoch, ttl_ms = ttl.as_millis() as u64, "lease-taken-active");
                return Ok(lease);
            }
            Err(holder) => {
                let now = (holder.holder.clone(), holder.epoch);
                if seen.as_ref() != Some(&now) {
                    tracing::info!(node = %node, active = %holder.holder, epoch = holder.epoch, expires_in_ms = holder.expires_in_ms, "standby-waiting-for-the-lease");
                    seen = Some(now);
                }
                // Look again when it would run out, and at least every third of a lease.
                let until = u64::try_from(holder.expires_in_ms).unwrap_or(0);
                let wait = Duration::from_millis(until.clamp(100, 1_000)).min(ttl / 3);
                std::thread::sleep(wait.max(Duration::from_millis(50)));
            }
        }
    }
}

/// Renews the lease every third of its length, for as long as the server runs; once it is
/// lost, steps down (starts over in place, as a standby). A database that does not answer is
/// tried again at the next turn: meanwhile the batches' own check keeps this node from
/// committing past the lease's end.
pub async fn keep(store: Arc<PgStore>, lease: Lease) {
    let mut tick = tokio::time::interval(lease.ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = store.clone();
        match web::block(move || s.renew_lease()).await {
            Ok(Ok(())) => {}
            Ok(Err(JournalError::Poisoned { reason })) => {
                tracing::error!(node = %lease.holder, epoch = lease.epoch, reason = %reason, "lease-lost-stepping-down");
                let e = tether_shared::storage::restart_in_place();
                tracing::error!(error = %e, "restart-failed");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(node = %lease.holder, epoch = lease.epoch, error = %e, "lease-renewal-failed")
            }
            Err(_) => {}
        }
    }
}
