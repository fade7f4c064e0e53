//! A `Trust` command on the uplink: the server's new signing keys and CAs
//! ([`tether_shared::trust`]) put in force, answered with the event that says so.
//!
//! The files are written before the command is journaled (the caller commits it with the
//! event), so a crash in between only means the resent command finds its serial in force.

use tether_shared::protocol::EventBody;
use tether_shared::trust::{Applied, TrustSet};

use super::Uplink;

impl Uplink {
    /// Applies `set`; the event to report.
    pub(super) fn apply_trust(&self, set: &TrustSet) -> EventBody {
        let agent_id = &self.cfg.agent_id;
        match self.cfg.trust.apply(set) {
            Ok(applied) => {
                if applied == Applied::Changed {
                    tracing::info!(agent_id = %agent_id, serial = set.serial, keys = set.signing_keys.len(), "trust-applied");
                }
                EventBody::TrustApplied { serial: set.serial }
            }
            Err(e) => {
                tracing::warn!(agent_id = %agent_id, serial = set.serial, error = %e, "trust-refused");
                EventBody::TrustRefused {
                    serial: set.serial,
                    reason: e.to_string(),
                }
            }
        }
    }
}
