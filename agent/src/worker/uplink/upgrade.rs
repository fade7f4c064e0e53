//! The uplink's upgrade driver (see `worker::upgrade` for the drain policy).
//!
//! An `Upgrade` command is checked when it arrives — the server's signature over the package's
//! version and sha256, a version newer than the running one, no other upgrade underway — and
//! either refused (`UpgradeRefused` in the command's batch, nothing else recorded) or accepted:
//! the [`Pending`] record and `UpgradeStarted` join the command's batch. From then on no step
//! starts. [`Uplink::drive_upgrade`] (after each step, on every tick) waits for running steps,
//! downloads and stages the package on the blocking pool, journals `UpgradeStaged` with the
//! record's new phase, waits (boundedly) for the server's ack of it, and stops the worker with
//! the reserved exit code. A worker that starts with the record staged reports the monitor's
//! verdict (`DATA/upgrade/result.json`) as `UpgradeFinished`, clears the record and lets the
//! held jobs go on.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tether_shared::enroll::Upstream;
use tether_shared::journal::Op;
use tether_shared::protocol::{EventBody, Seq, UpgradeOutcome};
use tether_shared::upgrade::{verify_package, Version};

use super::{now_ms, Uplink};
use crate::upgrade::{
    self, UpgradeResult, ACTIVE_FILE, RESULT_FILE, STAGED_FILE, UPGRADE_EXIT_CODE,
};
use crate::worker::jobs::fetch::Remote;
use crate::worker::upgrade::{download_and_stage, remove_partials, Pending, Phase, PENDING_KEY};

/// Longest the worker waits for the server's ack of `UpgradeStaged` before it exits anyway
/// (the event is journaled: the next worker delivers it).
const STAGED_ACK_WAIT: Duration = Duration::from_secs(30);

/// The upgrade's state in the uplink, beside the journaled record.
#[derive(Default)]
pub(crate) struct UpgradeDriver {
    /// The journaled record, if an upgrade is underway.
    pub(crate) pending: Option<Pending>,
    /// A download, or a commit of a transition, is in flight.
    busy: bool,
    /// Staged: exit once this event is acked, or at the instant.
    exit_after: Option<(Seq, Instant)>,
    /// Whether "draining" was logged for the current wait.
    logged_wait: bool,
    /// The worker is stopping with the reserved exit code.
    exiting: bool,
}

impl UpgradeDriver {
    /// The record from the journal.
    pub(crate) fn load(
        journal: &tether_shared::journal::JournalHandle,
    ) -> Result<Self, tether_shared::journal::JournalError> {
        let pending = journal.get_meta(PENDING_KEY)?.and_then(|v| {
            match serde_json::from_slice::<Pending>(&v) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::error!(error = %e, "upgrade-record-unreadable");
                    None
                }
            }
        });
        Ok(UpgradeDriver {
            pending,
            ..UpgradeDriver::default()
        })
    }
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
    pub(super) fn accept_upgrade(
        &mut self,
        package: (&str, &str, u64, &str),
        expired: bool,
        ops: &mut Vec<Op>,
    ) -> Option<Seq> {
        let (version, sha256, size, signature) = package;
        let agent_id = self.cfg.agent_id.clone();
        let refusal = if expired {
            Some("the command arrived after its deadline".to_owned())
        } else if let Some(p) = &self.upgrade.pending {
            if p.version == version && p.sha256 == sha256 {
                tracing::info!(agent_id = %agent_id, version = %version, "upgrade-already-underway");
                return None;
            }
            Some(format!("an upgrade to {} is already underway", p.version))
        } else {
            let anchors = self.cfg.trust.current();
            match anchors.with_any_key(|key| verify_package(key, version, sha256, signature)) {
                Err(e) => Some(e.to_string()),
                Ok(v) => match Version::parse(&self.cfg.version) {
                    Ok(running) if v > running => None,
                    Ok(running) => Some(format!(
                        "version {v} is not newer than the running version {running}"
                    )),
                    Err(e) => Some(format!("the running version is unknown: {e}")),
                },
            }
        };
        if let Some(reason) = refusal {
            tracing::warn!(agent_id = %agent_id, version = %version, reason = %reason, "upgrade-refused");
            let (seq, op) = self.event_op(EventBody::UpgradeRefused {
                version: version.to_owned(),
                reason,
            })?;
            ops.push(op);
            return Some(seq);
        }
        let pending = Pending {
            version: version.to_owned(),
            sha256: sha256.to_owned(),
            size,
            signature: signature.to_owned(),
            phase: Phase::Draining,
            accepted_unix_ms: now_ms(),
        };
        let (seq, op) = self.event_op(EventBody::UpgradeStarted {
            version: version.to_owned(),
        })?;
        ops.push(pending_op(&pending));
        ops.push(op);
        tracing::info!(agent_id = %agent_id, version = %version, sha256 = %sha256, size, running = %self.cfg.version, "upgrade-accepted");
        self.upgrade = UpgradeDriver {
            pending: Some(pending),
            ..Default::default()
        };
        Some(seq)
    }

    /// Whether steps may start (no upgrade underway).
    pub(super) fn steps_allowed(&self) -> bool {
        self.upgrade.pending.is_none()
    }

    /// Moves the upgrade on as far as it can go now.
    pub(super) fn drive_upgrade(&mut self, ctx: &mut Context<Self>) {
        let Some(p) = self.upgrade.pending.clone() else {
            return;
        };
        if self.upgrade.busy || self.upgrade.exiting {
            return;
        }
        let agent_id = self.cfg.agent_id.clone();
        match p.phase {
            Phase::Draining => {
                let running = self.jobs.steps_running();
                if running > 0 {
                    let waited = now_ms().saturating_sub(p.accepted_unix_ms);
                    let limit = u64::try_from(self.cfg.upgrade_drain_timeout.as_millis())
                        .unwrap_or(u64::MAX);
                    if waited > limit {
                        let reason = format!(
                            "{running} step(s) still running after the drain timeout of {} s; upgrade abandoned, nothing changed",
                            limit / 1000
                        );
                        self.end_upgrade(
                            ctx,
                            EventBody::UpgradeRefused {
                                version: p.version.clone(),
                                reason,
                            },
                        );
                    } else if !self.upgrade.logged_wait {
                        self.upgrade.logged_wait = true;
                        tracing::info!(agent_id = %agent_id, version = %p.version, running, "upgrade-draining");
                    }
                    return;
                }
                self.start_download(ctx, p);
            }
            Phase::Staged => {
                if let Some((seq, at)) = self.upgrade.exit_after {
                    if self.ep.outbound.acked() >= seq || Instant::now() >= at {
                        tracing::info!(agent_id = %agent_id, version = %p.version, acked = self.ep.outbound.acked() >= seq, "upgrade-exit-for-swap");
                        self.upgrade.exiting = true;
                        System::current().stop_with_code(UPGRADE_EXIT_CODE);
                    }
                    return;
                }
                self.settle_staged(ctx, &p);
            }
        }
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
        let pending = p.clone();
        self.upgrade.busy = true;
        tracing::info!(agent_id = %self.cfg.agent_id, version = %p.version, size = p.size, "upgrade-downloading");
        let work = tokio::task::spawn_blocking(move || {
            download_and_stage(&remote, &pending, &data_dir, &stop)
        });
        ctx.spawn(work.into_actor(self).map(move |res, act, ctx| {
            act.upgrade.busy = false;
            let staged = match res {
                Ok(r) => r,
                Err(e) => Err(format!("the download task failed: {e}")),
            };
            match staged {
                Ok(staged) => {
                    tracing::info!(agent_id = %act.cfg.agent_id, version = %staged.version, program = %staged.program.display(), "upgrade-staged");
                    let mut staged_rec = p.clone();
                    staged_rec.phase = Phase::Staged;
                    let mut ops = vec![pending_op(&staged_rec)];
                    let Some((seq, op)) = act.event_op(EventBody::UpgradeStaged {
                        version: p.version.clone(),
                    }) else {
                        tracing::error!(agent_id = %act.cfg.agent_id, "event-backlog-full");
                        return;
                    };
                    ops.push(op);
                    act.upgrade.pending = Some(staged_rec);
                    act.upgrade.busy = true;
                    act.commit_then(ctx, ops, move |act, ctx| {
                        act.upgrade.busy = false;
                        act.ep.outbound.mark_durable(seq);
                        act.upgrade.exit_after = Some((seq, Instant::now() + STAGED_ACK_WAIT));
                        act.pump();
                        act.drive_upgrade(ctx);
                    });
                }
                Err(reason) => {
                    tracing::warn!(agent_id = %act.cfg.agent_id, version = %p.version, reason = %reason, "upgrade-refused");
                    act.end_upgrade(
                        ctx,
                        EventBody::UpgradeRefused {
                            version: p.version.clone(),
                            reason,
                        },
                    );
                }
            }
        }));
    }

    /// Staged, in a worker that just started: report the monitor's verdict, or wait for it
    /// (the new worker on trial), or ask for the swap again (the old worker, restarted by
    /// something else than the monitor's swap, with the staged package still in place).
    fn settle_staged(&mut self, ctx: &mut Context<Self>, p: &Pending) {
        let dir = upgrade::dir(&self.cfg.data_dir);
        let result = match upgrade::read_json::<UpgradeResult>(&dir.join(RESULT_FILE)) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(agent_id = %self.cfg.agent_id, error = %e, "upgrade-result-unreadable");
                let _ = upgrade::remove(&dir.join(RESULT_FILE));
                None
            }
        };
        match result {
            Some(r) if r.version == p.version => {
                self.end_upgrade(
                    ctx,
                    EventBody::UpgradeFinished {
                        version: r.version,
                        outcome: r.outcome,
                        reason: r.reason,
                    },
                );
            }
            Some(r) => {
                tracing::warn!(agent_id = %self.cfg.agent_id, version = %r.version, pending = %p.version, "upgrade-result-stale");
                let _ = upgrade::remove(&dir.join(RESULT_FILE));
            }
            // The new version: on trial (the monitor will write its verdict), or recorded as
            // active by a monitor that could not write the verdict.
            None if self.cfg.version == p.version => {
                let active = upgrade::read_json::<upgrade::Active>(&dir.join(ACTIVE_FILE));
                if let Ok(Some(a)) = active {
                    if a.current.version.as_deref() == Some(p.version.as_str()) {
                        self.end_upgrade(
                            ctx,
                            EventBody::UpgradeFinished {
                                version: p.version.clone(),
                                outcome: UpgradeOutcome::Done,
                                reason: String::new(),
                            },
                        );
                    }
                }
            }
            None => {
                let staged_there = upgrade::read_json::<upgrade::Staged>(&dir.join(STAGED_FILE))
                    .ok()
                    .flatten()
                    .is_some_and(|s| s == p.staged(&self.cfg.data_dir));
                if staged_there {
                    tracing::warn!(agent_id = %self.cfg.agent_id, version = %p.version, "upgrade-swap-requested-again");
                    self.upgrade.exit_after = Some((Seq::ZERO, Instant::now()));
                    self.drive_upgrade(ctx);
                } else {
                    self.end_upgrade(
                        ctx,
                        EventBody::UpgradeFinished {
                            version: p.version.clone(),
                            outcome: UpgradeOutcome::RolledBack,
                            reason: "the staged package is gone and the monitor reported nothing; the previous version runs".into(),
                        },
                    );
                }
            }
        }
    }

    /// Journals the upgrade's last event with the record's removal; then cleans up and lets
    /// the held jobs go on.
    fn end_upgrade(&mut self, ctx: &mut Context<Self>, event: EventBody) {
        let Some((seq, op)) = self.event_op(event) else {
            tracing::error!(agent_id = %self.cfg.agent_id, "event-backlog-full");
            return;
        };
        let ops = vec![
            op,
            Op::DeleteMeta {
                key: PENDING_KEY.into(),
            },
        ];
        self.upgrade.busy = true;
        self.commit_then(ctx, ops, move |act, ctx| {
            act.ep.outbound.mark_durable(seq);
            let dir = upgrade::dir(&act.cfg.data_dir);
            if let Some(p) = act.upgrade.pending.take() {
                // A package that is not running (refused, or rolled back) is not kept.
                if act.cfg.version != p.version {
                    let _ = upgrade::remove(&p.staged(&act.cfg.data_dir).program);
                }
                tracing::info!(agent_id = %act.cfg.agent_id, version = %p.version, "upgrade-settled");
            }
            remove_partials(&act.cfg.data_dir);
            let _ = upgrade::remove(&dir.join(RESULT_FILE));
            act.upgrade = UpgradeDriver::default();
            act.pump();
            act.resume_held_jobs(ctx);
        });
    }

    /// After a restart: a result left by the monitor with no upgrade underway is stale.
    pub(super) fn clear_stale_result(&self) {
        if self.upgrade.pending.is_none() {
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
