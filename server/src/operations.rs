//! [`Operations`]: remote operations on agents (ping, restart the worker, read its recent log,
//! a diagnostics bundle) and their answers, for the REST API, the CLI and the web application.
//!
//! An operation is a signed `Operate` command on the agent's link (so it travels through relays
//! like everything else, and reaches an agent that reconnects within its deadline), answered by
//! an `OperationResult` event. The answers are kept in memory, the newest [`KEEP`] at most and
//! each at most `MAX_OPERATION_RESULT` bytes: an operation is a question of the moment, and
//! after a restart it is asked again. Which agents take operations is learnt at their handshake.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tether_shared::ids::AgentId;

use serde::Serialize;
use tether_shared::clock::now_unix_ms;
use tether_shared::protocol::{Operation, MAX_OPERATION_RESULT};

/// Operations kept (pending and answered), the oldest forgotten first.
pub const KEEP: usize = 256;
/// How long an agent has to receive an operation (an offline one gets it if it returns by then).
pub const DEADLINE: Duration = Duration::from_secs(300);

/// One operation and, once answered, its answer.
#[derive(Debug, Clone, Serialize)]
pub struct OperationRecord {
    pub id: String,
    pub agent_id: AgentId,
    pub op: Operation,
    pub requested_unix_ms: u64,
    /// `pending` until answered, then `done` or `failed`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answered_unix_ms: Option<u64>,
    /// From the request to the answer, as the server saw it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round_trip_ms: Option<u64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub data: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// A ping's path, from the server out to the agent, hop by hop.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hops: Vec<Hop>,
}

/// One link a test connection crossed, and its round trip as the link's own WebSocket ping
/// measured it last (each relay and agent pings its parent at every heartbeat).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hop {
    /// `server`, or a relay id.
    pub from: String,
    /// A relay id, or the agent's.
    pub to: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

/// The hops from the server to `agent_id` through `path` (relay ids, nearest the agent first):
/// each relay's link is timed by that relay (`relay_rtt_us`, from its heartbeats), the last
/// one by the agent (`agent_rtt_us`, in its answer).
pub fn hops(
    agent_id: &str,
    path: &[String],
    relay_rtt_us: impl Fn(&str) -> Option<u64>,
    agent_rtt_us: Option<u64>,
) -> Vec<Hop> {
    let ms = |us: Option<u64>| us.map(|us| us as f64 / 1000.0);
    let mut out = Vec::with_capacity(path.len() + 1);
    let mut from = "server".to_owned();
    for relay in path.iter().rev() {
        out.push(Hop {
            from: std::mem::replace(&mut from, relay.clone()),
            to: relay.clone(),
            rtt_ms: ms(relay_rtt_us(relay)),
        });
    }
    out.push(Hop {
        from,
        to: agent_id.to_owned(),
        rtt_ms: ms(agent_rtt_us),
    });
    out
}

#[derive(Default)]
struct Inner {
    records: HashMap<String, OperationRecord>,
    order: VecDeque<String>,
    /// Agents whose last handshake said they take operations.
    capable: HashMap<String, bool>,
}

/// Share as `Arc<Operations>`.
#[derive(Default)]
pub struct Operations {
    inner: Mutex<Inner>,
    answered: tokio::sync::Notify,
}

impl Operations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Agent `agent_id` attached, saying whether it takes operations.
    pub fn set_capable(&self, agent_id: &AgentId, capable: bool) {
        self.lock().capable.insert(agent_id.to_string(), capable);
    }

    /// `Some(false)` for an agent whose release takes no operations, `None` if it was not
    /// seen since this server started.
    pub fn capable(&self, agent_id: &AgentId) -> Option<bool> {
        self.lock().capable.get(agent_id.as_str()).copied()
    }

    /// Records a new pending operation and answers its id.
    pub fn begin(&self, agent_id: &AgentId, op: Operation) -> String {
        let id = format!("op-{}", hex::encode(rand::random::<[u8; 8]>()));
        let mut inner = self.lock();
        while inner.order.len() >= KEEP {
            if let Some(old) = inner.order.pop_front() {
                inner.records.remove(&old);
            }
        }
        inner.order.push_back(id.clone());
        inner.records.insert(
            id.clone(),
            OperationRecord {
                id: id.clone(),
                agent_id: agent_id.to_owned(),
                op,
                requested_unix_ms: now_unix_ms(),
                state: "pending",
                answered_unix_ms: None,
                round_trip_ms: None,
                data: String::new(),
                message: String::new(),
                hops: Vec::new(),
            },
        );
        id
    }

    /// The answer `agent_id` sent for operation `op_id`; ignored unless that agent was asked
    /// it and has not answered yet (a hostile agent cannot answer for another, nor twice).
    /// `hops` tells a ping's path (asked only for an answered ping).
    pub fn complete(
        &self,
        agent_id: &str,
        op_id: &str,
        ok: bool,
        data: &str,
        message: &str,
        hops: impl FnOnce(&str) -> Vec<Hop>,
    ) {
        let mut inner = self.lock();
        let Some(r) = inner
            .records
            .get_mut(op_id)
            .filter(|r| r.agent_id == agent_id && r.state == "pending")
        else {
            tracing::warn!(agent_id = %agent_id, op_id = %op_id.chars().take(32).collect::<String>(), "operation-result-ignored");
            return;
        };
        let now = now_unix_ms();
        r.state = if ok { "done" } else { "failed" };
        r.answered_unix_ms = Some(now);
        r.round_trip_ms = Some(now.saturating_sub(r.requested_unix_ms));
        r.data = cut(data);
        r.message = cut(message);
        if ok && r.op == Operation::Ping {
            r.hops = hops(&r.data);
        }
        tracing::info!(agent_id = %agent_id, op_id = %op_id, op = ?r.op, ok, round_trip_ms = r.round_trip_ms, "operation-answered");
        drop(inner);
        self.answered.notify_waiters();
    }

    /// Operation `op_id` of `agent_id`, as it stands.
    pub fn get(&self, agent_id: &AgentId, op_id: &str) -> Option<OperationRecord> {
        self.lock()
            .records
            .get(op_id)
            .filter(|r| r.agent_id == *agent_id)
            .cloned()
    }

    /// Waits at most `wait` for operation `op_id` to be answered; answers it as it stands.
    pub async fn wait(
        &self,
        agent_id: &AgentId,
        op_id: &str,
        wait: Duration,
    ) -> Option<OperationRecord> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let answered = self.answered.notified();
            let record = self.get(agent_id, op_id)?;
            if record.state != "pending" {
                return Some(record);
            }
            if tokio::time::timeout_at(deadline, answered).await.is_err() {
                return self.get(agent_id, op_id);
            }
        }
    }

    /// The newest operations on `agent_id`, newest first, at most `n`.
    pub fn recent(&self, agent_id: &AgentId, n: usize) -> Vec<OperationRecord> {
        let inner = self.lock();
        inner
            .order
            .iter()
            .rev()
            .filter_map(|id| inner.records.get(id))
            .filter(|r| r.agent_id == *agent_id)
            .take(n)
            .cloned()
            .collect()
    }
}

fn cut(text: &str) -> String {
    let mut end = text.len().min(MAX_OPERATION_RESULT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// `ping`, `restart`, `log`, `diagnostics`: the operation an operator names.
pub fn parse_op(name: &str) -> Result<Operation, String> {
    match name {
        "ping" => Ok(Operation::Ping),
        "restart" => Ok(Operation::RestartWorker),
        "log" => Ok(Operation::Log),
        "diagnostics" => Ok(Operation::Diagnostics),
        other => Err(format!(
            "unknown operation {:?}: ping, restart, log or diagnostics",
            other.chars().take(32).collect::<String>()
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    fn no_hops(_: &str) -> Vec<Hop> {
        Vec::new()
    }

    fn hop() -> Hop {
        Hop {
            from: "server".into(),
            to: "a1".into(),
            rtt_ms: None,
        }
    }

    #[test]
    fn hops_run_from_the_server_out_each_timed_by_its_far_end() {
        let path = vec!["r-near".to_owned(), "r-far".to_owned()];
        let rtt = |r: &str| (r == "r-far").then_some(1_234);
        let hops = hops(&AgentId::from("a1"), &path, rtt, Some(20_500));
        let view: Vec<(&str, &str, Option<f64>)> = hops
            .iter()
            .map(|h| (h.from.as_str(), h.to.as_str(), h.rtt_ms))
            .collect();
        assert_eq!(
            view,
            vec![
                ("server", "r-far", Some(1.234)),
                ("r-far", "r-near", None),
                ("r-near", "a1", Some(20.5)),
            ]
        );
        assert_eq!(
            super::hops(&AgentId::from("a1"), &[], |_| None, Some(800))[0],
            Hop {
                from: "server".into(),
                to: "a1".into(),
                rtt_ms: Some(0.8)
            }
        );
    }

    #[actix_rt::test]
    async fn answers_are_taken_from_the_agent_asked_once_and_kept_bounded() {
        let ops = Operations::default();
        let id = ops.begin(&AgentId::from("a1"), Operation::Ping);
        ops.complete("a2", &id, true, "forged", "", no_hops);
        assert_eq!(
            ops.get(&AgentId::from("a1"), &id).unwrap().state,
            "pending",
            "another agent"
        );
        assert!(ops.get(&AgentId::from("a2"), &id).is_none());
        let a1 = AgentId::from("a1");
        let waiting = ops.wait(&a1, &id, Duration::from_secs(5));
        ops.complete("a1", &id, true, "pong", "", |_| vec![hop()]);
        let r = waiting.await.unwrap();
        assert_eq!((r.state, r.data.as_str()), ("done", "pong"));
        assert_eq!(r.hops, vec![hop()]);
        ops.complete("a1", &id, false, "again", "", no_hops);
        assert_eq!(
            ops.get(&AgentId::from("a1"), &id).unwrap().data,
            "pong",
            "once"
        );
        let slow = ops.begin(&AgentId::from("a1"), Operation::Log);
        let r = ops
            .wait(&AgentId::from("a1"), &slow, Duration::from_millis(20))
            .await
            .unwrap();
        assert_eq!(r.state, "pending");
        for _ in 0..KEEP {
            ops.begin(&AgentId::from("a1"), Operation::Ping);
        }
        assert!(
            ops.get(&AgentId::from("a1"), &id).is_none(),
            "the oldest forgotten"
        );
        assert_eq!(ops.recent(&AgentId::from("a1"), 5).len(), 5);
        assert!(parse_op("rm -rf").is_err());
    }
}
