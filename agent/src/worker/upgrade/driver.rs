//! The upgrade's course, sans-IO: what an `Upgrade` command, a drain, a download and a settle
//! each decide, without the journal, the files or the network. The uplink
//! (`worker/uplink/upgrade.rs`) gathers what a decision needs (the signature check, the
//! steps running, the monitor's files), journals the events and records the [`Driver`]
//! returns, and does the work it asks for (a download, an exit).

use std::time::{Duration, Instant};

use tether_shared::protocol::{EventBody, Seq, UpgradeOutcome};
use tether_shared::upgrade::Version;

use super::{Pending, Phase};

/// Longest the worker waits for the server's ack of `UpgradeStaged` before it exits anyway
/// (the event is journaled: the next worker delivers it).
pub const STAGED_ACK_WAIT: Duration = Duration::from_secs(30);

/// An `Upgrade` command, as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Offer<'a> {
    pub version: &'a str,
    pub sha256: &'a str,
    pub size: u64,
    pub signature: &'a str,
    /// It arrived after its deadline.
    pub expired: bool,
}

/// What an `Upgrade` command comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// A repeat of the upgrade underway: nothing to record.
    Repeat,
    /// Journal `UpgradeRefused` with the command; nothing else changes.
    Refused { version: String, reason: String },
    /// Journal the record and `UpgradeStarted` with the command: from now on no step starts.
    Accepted(Pending),
}

/// What the uplink does next for the upgrade underway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing now (no upgrade, work in flight, or waiting for steps or an ack).
    Wait,
    /// Steps still run: log once that the upgrade waits for them.
    Draining { running: usize },
    /// The drain took too long: end the upgrade with this event.
    End(EventBody),
    /// Download and stage the package on the blocking pool, then call
    /// [`Driver::staged`] or [`Driver::failed`].
    Download(Pending),
    /// A worker that starts with the record staged: read the monitor's verdict and call
    /// [`Driver::settle`].
    Settle(Pending),
    /// Stop the worker with the reserved exit code (`acked`: the server has `UpgradeStaged`).
    Exit { acked: bool },
}

/// What the monitor left behind, as a starting worker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `DATA/upgrade/result.json`: (version, outcome, reason).
    pub result: Option<(String, UpgradeOutcome, String)>,
    /// The version `DATA/upgrade/active.json` names as current.
    pub active: Option<String>,
    /// `DATA/upgrade/staged.json` still names this upgrade's package.
    pub staged_there: bool,
}

/// What a starting worker makes of the monitor's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// End the upgrade with this event.
    End(EventBody),
    /// The result file is another upgrade's: remove it and wait.
    StaleResult,
    /// The old worker, restarted with the package still staged: ask for the swap again.
    SwapAgain,
    /// The new worker on trial: the monitor writes its verdict later.
    OnTrial,
}

/// The upgrade underway, beside its journaled record.
#[derive(Debug, Default)]
pub struct Driver {
    /// The journaled record, if an upgrade is underway.
    pending: Option<Pending>,
    /// A download, or a commit of a transition, is in flight.
    busy: bool,
    /// Staged: exit once this event is acked, or at the instant.
    exit_after: Option<(Seq, Instant)>,
    /// Whether the current drain was logged.
    logged_wait: bool,
    /// The worker is stopping with the reserved exit code.
    exiting: bool,
}

impl Driver {
    /// The driver of the record read from the journal at start.
    pub fn new(pending: Option<Pending>) -> Driver {
        Driver {
            pending,
            ..Driver::default()
        }
    }

    /// Whether steps may start (no upgrade underway).
    pub fn steps_allowed(&self) -> bool {
        self.pending.is_none()
    }

    pub fn pending(&self) -> Option<&Pending> {
        self.pending.as_ref()
    }

    /// An `Upgrade` command. `verify` checks the server's signature and returns the offered
    /// version (called only when nothing else refuses it); `running` is this worker's version.
    pub fn offer(
        &mut self,
        offer: Offer<'_>,
        running: &str,
        now_ms: u64,
        verify: impl FnOnce() -> Result<Version, String>,
    ) -> Arrival {
        let refusal = if offer.expired {
            Some("the command arrived after its deadline".to_owned())
        } else if let Some(p) = &self.pending {
            if p.version == offer.version && p.sha256 == offer.sha256 {
                return Arrival::Repeat;
            }
            Some(format!("an upgrade to {} is already underway", p.version))
        } else {
            match verify() {
                Err(e) => Some(e),
                Ok(v) => match Version::parse(running) {
                    Ok(running) if v > running => None,
                    Ok(running) => Some(format!(
                        "version {v} is not newer than the running version {running}"
                    )),
                    Err(e) => Some(format!("the running version is unknown: {e}")),
                },
            }
        };
        if let Some(reason) = refusal {
            return Arrival::Refused {
                version: offer.version.to_owned(),
                reason,
            };
        }
        let pending = Pending {
            version: offer.version.to_owned(),
            sha256: offer.sha256.to_owned(),
            size: offer.size,
            signature: offer.signature.to_owned(),
            phase: Phase::Draining,
            accepted_unix_ms: now_ms,
        };
        *self = Driver::new(Some(pending.clone()));
        Arrival::Accepted(pending)
    }

    /// What to do now: `running` steps run, the server acknowledged our events up to `acked`,
    /// a drain may last `drain_limit`.
    pub fn next(
        &mut self,
        running: usize,
        acked: Seq,
        now: Instant,
        now_ms: u64,
        drain_limit: Duration,
    ) -> Next {
        let Some(p) = &self.pending else {
            return Next::Wait;
        };
        if self.busy || self.exiting {
            return Next::Wait;
        }
        match p.phase {
            Phase::Draining if running > 0 => {
                let waited = now_ms.saturating_sub(p.accepted_unix_ms);
                let limit = u64::try_from(drain_limit.as_millis()).unwrap_or(u64::MAX);
                if waited > limit {
                    self.busy = true;
                    Next::End(EventBody::UpgradeRefused {
                        version: p.version.clone(),
                        reason: format!(
                            "{running} step(s) still running after the drain timeout of {} s; upgrade abandoned, nothing changed",
                            limit / 1000
                        ),
                    })
                } else if self.logged_wait {
                    Next::Wait
                } else {
                    self.logged_wait = true;
                    Next::Draining { running }
                }
            }
            Phase::Draining => {
                self.busy = true;
                Next::Download(p.clone())
            }
            Phase::Staged => match self.exit_after {
                Some((seq, at)) if acked >= seq || now >= at => {
                    self.exiting = true;
                    Next::Exit {
                        acked: acked >= seq,
                    }
                }
                Some(_) => Next::Wait,
                None => Next::Settle(p.clone()),
            },
        }
    }

    /// The package is staged: journal the returned record with the returned event, then
    /// call [`Driver::staged_durable`] with both.
    pub fn staged(&self) -> Option<(Pending, EventBody)> {
        let p = self.pending.as_ref()?;
        let record = Pending {
            phase: Phase::Staged,
            ..p.clone()
        };
        let event = EventBody::UpgradeStaged {
            version: p.version.clone(),
        };
        Some((record, event))
    }

    /// The staged `record` and its `UpgradeStaged` (event `seq`) are durable: exit once the
    /// server has the event, or at the latest after [`STAGED_ACK_WAIT`].
    pub fn staged_durable(&mut self, record: Pending, seq: Seq, now: Instant) {
        self.pending = Some(record);
        self.busy = false;
        self.exit_after = Some((seq, now + STAGED_ACK_WAIT));
    }

    /// The download or staging failed: end the upgrade with the returned event.
    pub fn failed(&mut self, reason: String) -> Option<EventBody> {
        let p = self.pending.as_ref()?;
        Some(EventBody::UpgradeRefused {
            version: p.version.clone(),
            reason,
        })
    }

    /// A worker that started with the record staged, given the monitor's verdict and its own
    /// version.
    pub fn settle(&mut self, verdict: Verdict, running: &str) -> Settled {
        let Some(p) = &self.pending else {
            return Settled::OnTrial;
        };
        let end = |outcome, reason: &str| {
            Settled::End(EventBody::UpgradeFinished {
                version: p.version.clone(),
                outcome,
                reason: reason.to_owned(),
            })
        };
        let settled = match verdict.result {
            Some((version, outcome, reason)) if version == p.version => end(outcome, &reason),
            Some(_) => Settled::StaleResult,
            // The new version: on trial (the monitor will write its verdict), or recorded as
            // active by a monitor that could not write the verdict.
            None if running == p.version => {
                if verdict.active.as_deref() == Some(p.version.as_str()) {
                    end(UpgradeOutcome::Done, "")
                } else {
                    Settled::OnTrial
                }
            }
            None if verdict.staged_there => {
                self.exit_after = Some((Seq::ZERO, Instant::now()));
                Settled::SwapAgain
            }
            None => end(
                UpgradeOutcome::RolledBack,
                "the staged package is gone and the monitor reported nothing; the previous version runs",
            ),
        };
        if matches!(settled, Settled::End(_)) {
            self.busy = true;
        }
        settled
    }

    /// The upgrade's last event is durable with the record's removal: the record that ended.
    pub fn ended(&mut self) -> Option<Pending> {
        std::mem::take(self).pending
    }

    /// The event a decision asked for could not be numbered (the backlog is full): the same
    /// decision is taken again later (a staged package is downloaded again).
    pub fn retry_later(&mut self) {
        self.busy = false;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    const DRAIN: Duration = Duration::from_secs(60);

    fn offer(version: &str) -> Offer<'_> {
        Offer {
            version,
            sha256: "ab",
            size: 10,
            signature: "sig",
            expired: false,
        }
    }

    fn ok(v: &str) -> impl FnOnce() -> Result<Version, String> + '_ {
        move || Version::parse(v).map_err(|e| e.to_string())
    }

    fn refused(a: &Arrival) -> &str {
        match a {
            Arrival::Refused { reason, .. } => reason,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn an_offer_is_refused_unless_signed_newer_timely_and_alone() {
        let mut d = Driver::default();
        let late = Offer {
            expired: true,
            ..offer("2.0.0")
        };
        assert!(refused(&d.offer(late, "1.0.0", 5, ok("2.0.0"))).contains("deadline"));
        let bad = d.offer(offer("2.0.0"), "1.0.0", 5, || Err("bad signature".into()));
        assert_eq!(refused(&bad), "bad signature");
        assert!(refused(&d.offer(offer("1.0.0"), "1.0.0", 5, ok("1.0.0"))).contains("not newer"));
        assert!(d.steps_allowed(), "refusals record nothing");

        let Arrival::Accepted(p) = d.offer(offer("2.0.0"), "1.0.0", 5, ok("2.0.0")) else {
            panic!("not accepted");
        };
        assert_eq!((p.phase, p.accepted_unix_ms), (Phase::Draining, 5));
        assert!(!d.steps_allowed());
        // The same again is a repeat; another is refused; neither checks the signature.
        let never = || -> Result<Version, String> { panic!("verified") };
        assert_eq!(d.offer(offer("2.0.0"), "1.0.0", 6, never), Arrival::Repeat);
        assert!(refused(&d.offer(offer("3.0.0"), "1.0.0", 6, never)).contains("already underway"));
    }

    #[test]
    fn a_drain_waits_for_steps_then_downloads_once_or_gives_up_at_its_limit() {
        let now = Instant::now();
        let mut d = Driver::default();
        d.offer(offer("2.0.0"), "1.0.0", 1_000, ok("2.0.0"));
        assert_eq!(
            d.next(2, Seq::ZERO, now, 2_000, DRAIN),
            Next::Draining { running: 2 }
        );
        assert_eq!(
            d.next(2, Seq::ZERO, now, 3_000, DRAIN),
            Next::Wait,
            "logged once"
        );
        let Next::Download(p) = d.next(0, Seq::ZERO, now, 4_000, DRAIN) else {
            panic!("no download");
        };
        assert_eq!(p.version, "2.0.0");
        assert_eq!(
            d.next(0, Seq::ZERO, now, 4_000, DRAIN),
            Next::Wait,
            "one at a time"
        );

        let mut d = Driver::default();
        d.offer(offer("2.0.0"), "1.0.0", 1_000, ok("2.0.0"));
        match d.next(1, Seq::ZERO, now, 1_000 + 60_001, DRAIN) {
            Next::End(EventBody::UpgradeRefused { reason, .. }) => {
                assert!(reason.contains("drain timeout of 60 s"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(d.next(1, Seq::ZERO, now, 70_000, DRAIN), Next::Wait);
        assert_eq!(d.ended().map(|p| p.version), Some("2.0.0".into()));
        assert!(d.steps_allowed());
    }

    /// An upgrade to 2.0.0 accepted by a 1.0.0 worker, its download under way.
    fn downloading(now: Instant) -> Driver {
        let mut d = Driver::default();
        d.offer(offer("2.0.0"), "1.0.0", 0, ok("2.0.0"));
        assert!(matches!(
            d.next(0, Seq::ZERO, now, 0, DRAIN),
            Next::Download(_)
        ));
        d
    }

    #[test]
    fn a_staged_upgrade_exits_once_acked_or_after_the_wait() {
        let now = Instant::now();
        let mut d = downloading(now);
        let (rec, event) = d.staged().unwrap();
        assert_eq!(rec.phase, Phase::Staged);
        assert!(matches!(event, EventBody::UpgradeStaged { .. }));
        assert_eq!(
            d.next(0, Seq::ZERO, now, 0, DRAIN),
            Next::Wait,
            "commit in flight"
        );
        d.staged_durable(rec, Seq(7), now);
        assert_eq!(d.pending().map(|p| p.phase), Some(Phase::Staged));
        assert_eq!(d.next(0, Seq(6), now, 0, DRAIN), Next::Wait);
        assert_eq!(d.next(0, Seq(7), now, 0, DRAIN), Next::Exit { acked: true });
        assert_eq!(d.next(0, Seq(7), now, 0, DRAIN), Next::Wait, "exits once");

        let mut d = downloading(now);
        let (rec, _) = d.staged().unwrap();
        d.staged_durable(rec, Seq(7), now);
        let later = now + STAGED_ACK_WAIT;
        assert_eq!(
            d.next(0, Seq(3), later, 0, DRAIN),
            Next::Exit { acked: false }
        );
    }

    #[test]
    fn a_decision_whose_event_found_no_room_is_taken_again() {
        let now = Instant::now();
        let mut d = downloading(now);
        // Staged, but UpgradeStaged could not be numbered: the record stays draining.
        assert!(d.staged().is_some());
        d.retry_later();
        assert_eq!(d.pending().map(|p| p.phase), Some(Phase::Draining));
        assert!(matches!(
            d.next(0, Seq::ZERO, now, 0, DRAIN),
            Next::Download(_)
        ));
        // A failure's refusal likewise.
        assert!(matches!(
            d.failed("gone".into()),
            Some(EventBody::UpgradeRefused { .. })
        ));
        d.retry_later();
        assert!(matches!(
            d.next(0, Seq::ZERO, now, 0, DRAIN),
            Next::Download(_)
        ));
    }

    fn staged(version: &str) -> Driver {
        Driver::new(Some(Pending {
            version: version.into(),
            sha256: "ab".into(),
            size: 1,
            signature: "s".into(),
            phase: Phase::Staged,
            accepted_unix_ms: 0,
        }))
    }

    #[test]
    fn a_starting_worker_settles_by_the_monitors_verdict() {
        let none = Verdict {
            result: None,
            active: None,
            staged_there: false,
        };
        let now = Instant::now();
        let mut d = staged("2.0.0");
        assert_eq!(
            d.next(0, Seq::ZERO, now, 0, DRAIN),
            Next::Settle(d.pending().unwrap().clone())
        );
        let verdict = Verdict {
            result: Some((
                "2.0.0".into(),
                UpgradeOutcome::RolledBack,
                "trial failed".into(),
            )),
            ..none.clone()
        };
        match d.settle(verdict, "1.0.0") {
            Settled::End(EventBody::UpgradeFinished {
                outcome, reason, ..
            }) => {
                assert_eq!(
                    (outcome, reason.as_str()),
                    (UpgradeOutcome::RolledBack, "trial failed")
                )
            }
            other => panic!("{other:?}"),
        }
        let stale = Verdict {
            result: Some(("1.5.0".into(), UpgradeOutcome::Done, String::new())),
            ..none.clone()
        };
        assert_eq!(staged("2.0.0").settle(stale, "1.0.0"), Settled::StaleResult);
        // The new worker: on trial until the monitor writes, done if it recorded it active.
        assert_eq!(
            staged("2.0.0").settle(none.clone(), "2.0.0"),
            Settled::OnTrial
        );
        let active = Verdict {
            active: Some("2.0.0".into()),
            ..none.clone()
        };
        assert!(matches!(
            staged("2.0.0").settle(active, "2.0.0"),
            Settled::End(EventBody::UpgradeFinished {
                outcome: UpgradeOutcome::Done,
                ..
            })
        ));
        // The old worker: the swap again if the package is still staged, else rolled back.
        let mut d = staged("2.0.0");
        let there = Verdict {
            staged_there: true,
            ..none.clone()
        };
        assert_eq!(d.settle(there, "1.0.0"), Settled::SwapAgain);
        assert_eq!(
            d.next(0, Seq::ZERO, now, 0, DRAIN),
            Next::Exit { acked: true }
        );
        assert!(matches!(
            staged("2.0.0").settle(none, "1.0.0"),
            Settled::End(EventBody::UpgradeFinished {
                outcome: UpgradeOutcome::RolledBack,
                ..
            })
        ));
    }
}
