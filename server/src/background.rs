//! The server's own background tasks: recovering from a full disk, and pruning finished
//! deployments.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;

use crate::deployments::{Deployments, Retention};

/// How often a poisoned journal's disk is checked for space.
const STORAGE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Where the journal keeps its data, for [`recover_storage`]'s check.
pub enum StorageProbe {
    /// A disk: it takes writes again once there is space.
    Disk(PathBuf),
    /// A database: it answers again once it is back.
    Database,
}

/// Once a write failed (a full disk, a database gone; the journal is poisoned, and a batch
/// whose commit got no answer may or may not be durable), waits for the storage to take writes
/// again, then starts the server over in place from what is durable: agents reconnect and
/// resend what was not acknowledged.
pub async fn recover_storage(journal: tether_shared::journal::JournalHandle, probe: StorageProbe) {
    let mut tick = tokio::time::interval(STORAGE_CHECK_INTERVAL);
    let mut told = false;
    loop {
        tick.tick().await;
        let Some(reason) = journal.observe().poisoned else {
            continue;
        };
        if !told {
            tracing::error!(reason = %reason, "storage-failed-waiting-for-it");
            told = true;
        }
        let check = match &probe {
            StorageProbe::Disk(dir) => {
                let dir = dir.clone();
                web::block(move || tether_shared::storage::takes_writes(&dir)).await
            }
            StorageProbe::Database => {
                let journal = journal.clone();
                web::block(move || journal.probe_store().map_err(|e| e.to_string())).await
            }
        };
        match check {
            Ok(Ok(())) => {
                tracing::warn!("storage-recovered-restarting");
                let e = tether_shared::storage::restart_in_place();
                tracing::error!(error = %e, "restart-failed");
                return;
            }
            Ok(Err(why)) => tracing::debug!(why = %why, "storage-still-failed"),
            Err(_) => {}
        }
    }
}

/// Prunes finished deployments under `policy`, and audit entries older than
/// `audit_keep_days` (0: none), every `interval` (the first time at start).
pub async fn prune_periodically(
    deployments: Arc<Deployments>,
    policy: Retention,
    audit: Arc<crate::audit::Audit>,
    audit_keep_days: u64,
    interval: Duration,
) {
    const DAY_MS: u64 = 86_400_000;
    /// Audit entries looked at per round (a backlog goes over several rounds).
    const AUDIT_SCAN: usize = 10_000;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = deployments.prune(&policy).await {
            tracing::warn!(error = %e, "deployments-prune-failed");
        }
        if audit_keep_days > 0 {
            let cutoff = crate::registry::now_unix_ms()
                .saturating_sub(audit_keep_days.saturating_mul(DAY_MS));
            if let Err(e) = audit.prune_before(cutoff, AUDIT_SCAN).await {
                tracing::warn!(error = %e, "audit-prune-failed");
            }
        }
    }
}

/// Removes the agents offline for longer than `retention.remove_stale_after_s`, every
/// `interval`: as `DELETE /api/v1/agents/{id}?force=true` does (their unfinished jobs fail,
/// their key stops authenticating).
pub async fn remove_stale_periodically(
    admin: Arc<crate::agent_admin::AgentAdmin>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let stale = admin
            .registry
            .stale_to_remove(admin.shared.presence.as_ref());
        for id in stale {
            match admin.delete(&id, true).await {
                Ok((agent, failed_jobs)) => {
                    tracing::warn!(agent_id = %agent.id, name = %agent.name, failed_jobs, "stale-agent-removed");
                }
                Err(e) => tracing::error!(agent_id = %id, error = %e, "stale-agent-remove-failed"),
            }
        }
    }
}
