//! The uplink carries out the upgrade's course (`worker::upgrade::driver` decides it; see
//! `worker::upgrade` for the drain policy).
//!
//! An `Upgrade` command is checked when it arrives and either refused (`UpgradeRefused` in the
//! command's batch, nothing else recorded) or accepted (the [`Pending`] record and
//! `UpgradeStarted` join the command's batch); from then on no step starts.
//! [`Uplink::drive_upgrade`] (after each step, on every tick, after acks) asks the driver what
//! to do next: download and stage the package on the blocking pool, journal `UpgradeStaged`
//! with the record's new phase, stop the worker with the reserved exit code once the server
//! has it (or after a bounded wait). A worker that starts with the record staged reads the
//! monitor's verdict (`DATA/upgrade/result.json`), reports it as `UpgradeFinished`, clears the
//! record and lets the held jobs go on.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use tether_shared::enroll::Upstream;
use tether_shared::journal::{JournalError, JournalHandle, Op};
use tether_shared::protocol::{EventBody, Seq};
use tether_shared::upgrade::verify_package;

use super::{now_ms, Uplink};
use crate::upgrade::{
    self, UpgradeResult, ACTIVE_FILE, RESULT_FILE, STAGED_FILE, UPGRADE_EXIT_CODE,
};
use crate::worker::jobs::fetch::Remote;
use crate::worker::upgrade::driver::{Arrival, Driver, Next, Offer, Settled, Verdict};
use crate::worker::upgrade::{download_and_stage, remove_partials, Pending, PENDING_KEY};

/// The driver of the record in the journal.
pub(super) fn load_driver(journal: &JournalHandle) -> Result<Driver, JournalError> {
    let pending = journal.get_meta(PENDING_KEY)?.and_then(|v| {
        serde_json::from_slice::<Pending>(&v)
            .map_err(|e| tracing::error!(error = %e, "upgrade-record-unreadable"))
            .ok()
    });
    Ok(Driver::new(pending))
}

fn pending_op(p: &Pending) -> Op {
    Op::PutMeta {
        key: PENDING_KEY.into(),
        value: serde_json::to_vec(p).unwrap_or_default(),
    }
}

impl Uplink {
    /// An `Upgrade` command: refused or accepted, with its event (and record) in `ops`.
    /// Returns the event's seq, or `None` for a repeat of the upgrade already underway.
    pub(super) fn accept_upgrade(&mut self, offer: Offer<'_>, ops: &mut Vec<Op>) -> Option<Seq> {
        let agent_id = self.cfg.agent_id.clone();
        let anchors = self.cfg.trust.current();
        let verify = || {
            anchors
                .with_any_key(|key| {
                    verify_package(key, offer.version, offer.sha256, offer.signature)
                })
                .map_err(|e| e.to_string())
        };
        match self
            .upgrade
            .offer(offer, &self.cfg.version, now_ms(), verify)
        {
            Arrival::Repeat => {
                tracing::info!(agent_id = %agent_id, version = %offer.version, "upgrade-already-underway");
                None
            }
            Arrival::Refused { version, reason } => {
                tracing::warn!(agent_id = %agent_id, version = %version, reason = %reason, "upgrade-refused");
                let (seq, op) = self.event_op(EventBody::UpgradeRefused { version, reason })?;
                ops.push(op);
                Some(seq)
            }
            Arrival::Accepted(pending) => {
                let (seq, op) = self.event_op(EventBody::UpgradeStarted {
                    version: pending.version.clone(),
                })?;
                ops.push(pending_op(&pending));
                ops.push(op);
                tracing::info!(agent_id = %agent_id, version = %pending.version, sha256 = %pending.sha256, size = pending.size, running = %self.cfg.version, "upgrade-accepted");
                Some(seq)
            }
        }
    }

    /// Whether steps may start (no upgrade underway).
    pub(super) fn steps_allowed(&self) -> bool {
        self.upgrade.steps_allowed()
    }

    /// Moves the upgrade on as far as it can go now.
    pub(super) fn drive_upgrade(&mut self, ctx: &mut Context<Self>) {
        let next = self.upgrade.next(
            self.jobs.steps_running(),
            self.ep.outbound.acked(),
            Instant::now(),
            now_ms(),
            self.cfg.upgrade_drain_timeout,
        );
        let agent_id = &self.cfg.agent_id;
        match next {
            Next::Wait => {}
            Next::Draining { running } => {
                tracing::info!(agent_id = %agent_id, version = %self.upgrade_version(), running, "upgrade-draining");
            }
            Next::End(event) => self.end_upgrade(ctx, event),
            Next::Download(p) => self.start_download(ctx, p),
            Next::Settle(p) => self.settle_staged(ctx, &p),
            Next::Exit { acked } => {
                tracing::info!(agent_id = %agent_id, version = %self.upgrade_version(), acked, "upgrade-exit-for-swap");
                System::current().stop_with_code(UPGRADE_EXIT_CODE);
            }
        }
    }

    /// The version of the upgrade underway, for the logs.
    fn upgrade_version(&self) -> &str {
        self.upgrade.pending().map_or("", |p| p.version.as_str())
    }

    /// Download and stage on the blocking pool; then journal `UpgradeStaged`.
    fn start_download(&mut self, ctx: &mut Context<Self>, p: Pending) {
        let upstreams: Vec<Upstream> = self
            .dial
            .upstreams_in_use_order()
            .filter_map(|u| Upstream::parse(u).ok())
            .collect();
        let remote = Remote {
            agent_id: self.cfg.agent_id.clone(),
            identity: self.cfg.identity.clone(),
            tls: self.cfg.trust.current().tls.clone(),
            upstreams,
            cache_dir: self.cfg.data_dir.clone(),
        };
        let data_dir = self.cfg.data_dir.clone();
        let stop = Arc::clone(&self.upgrade_stop);
        tracing::info!(agent_id = %self.cfg.agent_id, version = %p.version, size = p.size, "upgrade-downloading");
        let work =
            tokio::task::spawn_blocking(move || download_and_stage(&remote, &p, &data_dir, &stop));
        ctx.spawn(work.into_actor(self).map(move |res, act, ctx| {
            let staged = res.unwrap_or_else(|e| Err(format!("the download task failed: {e}")));
            match staged {
                Ok(staged) => {
                    tracing::info!(agent_id = %act.cfg.agent_id, version = %staged.version, program = %staged.program.display(), "upgrade-staged");
                    let Some((record, event)) = act.upgrade.staged() else {
                        return;
                    };
                    let Some((seq, op)) = act.event_op(event) else {
                        tracing::error!(agent_id = %act.cfg.agent_id, "event-backlog-full");
                        act.upgrade.retry_later();
                        return;
                    };
                    let ops = vec![pending_op(&record), op];
                    act.commit_then(ctx, ops, move |act, ctx| {
                        act.ep.outbound.mark_durable(seq);
                        act.upgrade.staged_durable(record, seq, Instant::now());
                        act.pump();
                        act.drive_upgrade(ctx);
                    });
                }
                Err(reason) => {
                    tracing::warn!(agent_id = %act.cfg.agent_id, reason = %reason, "upgrade-refused");
                    if let Some(event) = act.upgrade.failed(reason) {
                        act.end_upgrade(ctx, event);
                    }
                }
            }
        }));
    }

    /// Staged, in a worker that just started: what the monitor left behind, for the driver.
    fn settle_staged(&mut self, ctx: &mut Context<Self>, p: &Pending) {
        let dir = upgrade::dir(&self.cfg.data_dir);
        let result = upgrade::read_json::<UpgradeResult>(&dir.join(RESULT_FILE))
            .unwrap_or_else(|e| {
                tracing::error!(agent_id = %self.cfg.agent_id, error = %e, "upgrade-result-unreadable");
                let _ = upgrade::remove(&dir.join(RESULT_FILE));
                None
            });
        let active = upgrade::read_json::<upgrade::Active>(&dir.join(ACTIVE_FILE))
            .ok()
            .flatten()
            .and_then(|a| a.current.version);
        let staged_there = upgrade::read_json::<upgrade::Staged>(&dir.join(STAGED_FILE))
            .ok()
            .flatten()
            .is_some_and(|s| s == p.staged(&self.cfg.data_dir));
        let verdict = Verdict {
            result: result.map(|r| (r.version, r.outcome, r.reason)),
            active,
            staged_there,
        };
        match self.upgrade.settle(verdict, &self.cfg.version) {
            Settled::End(event) => self.end_upgrade(ctx, event),
            Settled::StaleResult => {
                tracing::warn!(agent_id = %self.cfg.agent_id, pending = %p.version, "upgrade-result-stale");
                let _ = upgrade::remove(&dir.join(RESULT_FILE));
            }
            Settled::SwapAgain => {
                tracing::warn!(agent_id = %self.cfg.agent_id, version = %p.version, "upgrade-swap-requested-again");
                self.drive_upgrade(ctx);
            }
            Settled::OnTrial => {}
        }
    }

    /// Journals the upgrade's last event with the record's removal; then cleans up and lets
    /// the held jobs go on.
    fn end_upgrade(&mut self, ctx: &mut Context<Self>, event: EventBody) {
        let Some((seq, op)) = self.event_op(event) else {
            tracing::error!(agent_id = %self.cfg.agent_id, "event-backlog-full");
            self.upgrade.retry_later();
            return;
        };
        let ops = vec![
            op,
            Op::DeleteMeta {
                key: PENDING_KEY.into(),
            },
        ];
        self.commit_then(ctx, ops, move |act, ctx| {
            act.ep.outbound.mark_durable(seq);
            let dir = upgrade::dir(&act.cfg.data_dir);
            if let Some(p) = act.upgrade.ended() {
                // A package that is not running (refused, or rolled back) is not kept.
                if act.cfg.version != p.version {
                    let _ = upgrade::remove(&p.staged(&act.cfg.data_dir).program);
                }
                tracing::info!(agent_id = %act.cfg.agent_id, version = %p.version, "upgrade-settled");
            }
            remove_partials(&act.cfg.data_dir);
            let _ = upgrade::remove(&dir.join(RESULT_FILE));
            act.pump();
            act.resume_held_jobs(ctx);
        });
    }

    /// After a restart: a result left by the monitor with no upgrade underway is stale.
    pub(super) fn clear_stale_result(&self) {
        if self.upgrade.steps_allowed() {
            let path = upgrade::dir(&self.cfg.data_dir).join(RESULT_FILE);
            if path.exists() {
                tracing::info!(agent_id = %self.cfg.agent_id, "upgrade-result-stale");
                let _ = upgrade::remove(&path);
            }
        }
    }

    /// Stops a download in flight when the actor stops (its blocking thread sees the flag).
    pub(super) fn stop_upgrade_work(&self) {
        self.upgrade_stop.store(true, Ordering::Relaxed);
    }
}
