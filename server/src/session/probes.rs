//! Probe accounting: numbered test messages sent both ways between the server and an agent.
//!
//! The server numbers probe commands 1, 2, 3...; the agent answers each with one echo event in
//! the same journal batch that accepts the command, and emits numbered probe events of its own
//! when asked. [`ProbeStats`] counts what arrived, in order or not, and is journaled in the same
//! batch as the event it counts — so it is exactly what the journal holds, after any crash.

use serde::{Deserialize, Serialize};
use tether_shared::ids::AgentId;

/// Arrivals of one numbered series.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Series {
    /// Messages that arrived.
    pub received: u64,
    /// The next number expected (in-order delivery means every arrival is this one).
    pub next: u64,
    /// Arrivals below `next`: delivered twice.
    pub duplicates: u64,
    /// Arrivals above `next`: something before them was skipped.
    pub gaps: u64,
}

impl Series {
    pub fn record(&mut self, n: u64) {
        if self.next == 0 {
            self.next = 1;
        }
        self.received += 1;
        if n == self.next {
            self.next += 1;
        } else if n < self.next {
            self.duplicates += 1;
        } else {
            self.gaps += 1;
            self.next = n + 1;
        }
    }
}

/// Everything known about one agent's probes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeStats {
    /// Probe commands the server numbered (and journaled) so far.
    pub commands_sent: u64,
    /// Echoes of probe commands.
    pub echoes: Series,
    /// Probe events the agent emitted.
    pub events: Series,
}

impl ProbeStats {
    pub fn meta_key(agent_id: &AgentId) -> String {
        format!("probe/{agent_id}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_duplicates_and_gaps() {
        let mut s = Series::default();
        for n in [1, 2, 2, 3, 5, 6] {
            s.record(n);
        }
        assert_eq!(
            s,
            Series {
                received: 6,
                next: 7,
                duplicates: 1,
                gaps: 1
            }
        );
    }
}
