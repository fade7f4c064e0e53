//! Remote operations on the uplink (`CommandBody::Operate`): each is answered by one
//! `EventBody::OperationResult`, journaled with the command in one batch, so a restart never
//! repeats one and its answer is never lost. A worker restart is the monitor's to do: the
//! worker exits with [`RESTART_EXIT_CODE`] once the answer is durable.

use serde_json::json;
use tether_shared::protocol::{AgentFigures, EventBody, Operation, MAX_OPERATION_RESULT};

use super::{now_ms, Uplink};

/// The worker's exit code that asks the monitor for a new worker at once (outside the restart
/// budget: an operator asked for it).
pub const RESTART_EXIT_CODE: i32 = 77;

impl Uplink {
    /// The answer to operation `op` (`op_id`), and whether the worker restarts once it is
    /// durable.
    pub(super) fn operate(&self, op_id: &str, op: Operation) -> (EventBody, bool) {
        tracing::info!(op_id = %op_id, op = ?op, "remote-operation");
        let (data, restart) = match op {
            Operation::Ping => (
                json!({"agent_unix_ms": now_ms(), "uplink_rtt_us": self.dial.rtt_us()}).to_string(),
                false,
            ),
            Operation::RestartWorker => (
                json!({"restarting": true, "agent_unix_ms": now_ms()}).to_string(),
                true,
            ),
            Operation::Log => (
                crate::worker::log_ring::tail(MAX_OPERATION_RESULT / 2),
                false,
            ),
            Operation::Diagnostics => (self.diagnostics(), false),
        };
        let body = EventBody::OperationResult {
            op_id: op_id.to_owned(),
            ok: true,
            data: fit(data),
            message: String::new(),
        };
        (body, restart)
    }

    /// The worker's own figures for its heartbeat.
    pub(super) fn figures(&self) -> AgentFigures {
        let journal = self.cfg.journal.observe();
        AgentFigures {
            jobs_unfinished: self.jobs.ledger.unfinished().len() as u64,
            steps_running: self.jobs.ledger.steps_running() as u64,
            events_unacked: self.ep.outbound.unacked() as u64,
            journal_commits: journal.commits,
            journal_failures: journal.failures,
            uplink_rtt_us: self.dial.rtt_us(),
            ..tether_shared::metrics::process::heartbeat_figures()
        }
    }

    /// Versions, facts, the configuration (secrets masked), journal figures and the jobs held.
    fn diagnostics(&self) -> String {
        let cfg = &self.cfg;
        let bundle = json!({
            "agent_id": cfg.agent_id,
            "version": cfg.version,
            "protocol": tether_shared::protocol::PROTOCOL_VERSION,
            "facts": tether_shared::facts::collect(&cfg.data_dir),
            "config": serde_json::from_str::<serde_json::Value>(&cfg.diagnostics_config)
                .unwrap_or_default(),
            "journal": cfg.journal.observe(),
            "trust_serial": cfg.trust.current().serial,
            "upstreams": cfg.upstreams,
            "jobs_unfinished": self.jobs.ledger.unfinished().len(),
            "steps_running": self.jobs.ledger.steps_running(),
            "events_unacked": self.ep.outbound.unacked(),
            "commands_held": self.ep.inbound.durable().0,
        });
        serde_json::to_string_pretty(&bundle).unwrap_or_default()
    }
}

/// `text` cut (at a character boundary, its end kept) to [`MAX_OPERATION_RESULT`] bytes.
fn fit(text: String) -> String {
    if text.len() <= MAX_OPERATION_RESULT {
        return text;
    }
    let mut start = text.len() - MAX_OPERATION_RESULT;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}
