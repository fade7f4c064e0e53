//! Health as an observation: [`JournalWatch`] asks the `Journal` actor for its snapshot under a
//! short timeout and remembers when it last answered; [`ServerHealth`] is the `/admin/health`
//! body of the operator contract, also rendered as Prometheus text for `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Handler, MailboxError};
use serde::Serialize;
use tether_shared::journal::{JournalHandle, JournalHealth, Observe};
use tether_shared::metrics::{header, sample};
use tether_shared::protocol::AgentFigures;

/// How long an actor has to answer an observation before it shows as `timeout`.
pub const OBSERVE_TIMEOUT: Duration = Duration::from_millis(1_000);

/// What an observation found an actor doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActorState {
    /// It answered in time and reports no fault.
    Running,
    /// It did not answer within [`OBSERVE_TIMEOUT`].
    Timeout,
    /// It answered, but reports a fault that stops it working (a journal after a failed sync).
    Poisoned,
    /// Its mailbox is closed: the actor has stopped.
    Stopped,
}

/// One actor's line in `/admin/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActorHealth {
    /// Which instance: `journal`, or a session's agent name.
    pub name: String,
    /// The actor type.
    pub kind: &'static str,
    /// What the latest observation found.
    pub state: ActorState,
    /// How often its supervisor restarted it.
    pub restarts: u64,
    /// Milliseconds since it last answered an observation (or since it started, if never).
    pub last_beat_ms: u64,
    /// Work waiting for it (for the journal: commits queued for the writer).
    pub backlog: u64,
}

/// One agent, seen from the server: its streams here, and its own actors as it reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentHealth {
    pub id: String,
    /// A session is attached now.
    pub connected: bool,
    /// Commands journaled for it and not yet acknowledged (the journal depth for this agent).
    pub unacked_commands: u64,
    /// Age of the oldest of them, in milliseconds.
    pub oldest_unacked_ms: Option<u64>,
    /// Events received from it (its stream position).
    pub events_received: u64,
    /// Commands resent after a silence, acks ignored as stale or bogus.
    pub retransmits: u64,
    pub ignored_acks: u64,
    /// Milliseconds since anything arrived from it.
    pub last_heard_ms: Option<u64>,
    /// Handshakes that found it had lost its state (a new journal), and the commands abandoned.
    pub peer_resets: u64,
    pub abandoned_commands: u64,
    /// Events put off (and resent by the agent) because too much of its journal work was
    /// queued: an agent sending faster than the disk takes.
    pub events_deferred: u64,
    /// Why its last handshake was refused (until one succeeds): `tether health` fails on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// The agent's actors, from its last heartbeat.
    pub actors: Vec<tether_shared::protocol::ActorHealth>,
    /// Its worker's own figures, from its last heartbeat (releases that send them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub figures: Option<tether_shared::protocol::AgentFigures>,
    /// Its one-minute load average times 1000, from its last heartbeat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_milli: Option<u32>,
}

/// This node's place in a cluster of servers on PostgreSQL. A standby answers
/// `/admin/health` with this alone (`role: "standby"` and the active node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterHealth {
    /// `active` (here: a standby's answer is built by `lease`).
    pub role: &'static str,
    /// This node's name in the lease.
    pub node: String,
    /// The lease's epoch this node holds.
    pub epoch: i64,
    /// How long the lease lasts unrenewed.
    pub lease_ttl_ms: u64,
    /// Every node as it last noted itself (role, release, how long ago), this one included.
    pub nodes: crate::lease::Nodes,
}

/// The `/admin/health` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerHealth {
    /// Every long-lived actor of this process.
    pub actors: Vec<ActorHealth>,
    /// Agent and relay sessions currently connected.
    pub sessions: u64,
    /// The journal's snapshot (from its shared counters if the actor did not answer).
    pub journal: JournalHealth,
    /// Per connected agent, its actors.
    pub agents: BTreeMap<String, AgentHealth>,
    /// Per relay connected directly, what its link carries.
    pub relay_links: BTreeMap<String, RelayLinkHealth>,
    /// When the server's certificates expire (server, CAs, command signing), soonest first.
    pub certificates: Vec<CertificateExpiry>,
    /// What agents sent that the server refused or cut, since it started.
    pub deployments: DeploymentsHealth,
    /// The data directory's disk: free space, and why writes stopped if they did.
    pub storage: StorageHealth,
    /// On PostgreSQL: this node's role, name and lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterHealth>,
    /// The trust set (signing keys and CAs) in force, the rollover's step, and how many
    /// agents and relays do not hold the set yet.
    pub trust: TrustHealth,
    /// What agents reported after this server was found behind them (restored from a
    /// backup); details at `GET /api/v1/reconciliation`.
    pub reconciliation: crate::reconcile::Summary,
    /// The audit log: its newest entry, how many it keeps, entries lost (a failed journal) and
    /// unauthenticated refusals past the recorded rate.
    pub audit: AuditHealth,
    /// Agents whose last handshake was refused.
    pub agents_refused: usize,
}

/// What a relay's link holds now (`session::relay_session`).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RelayLinkHealth {
    pub relay_id: Option<String>,
    pub conn: u64,
    pub agents: u64,
    pub relays: u64,
    pub handshaking: u64,
    #[serde(flatten)]
    pub stats: RelayLinkStats,
}

/// What a relay's link counts, for health.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RelayLinkStats {
    pub channels_opened: u64,
    pub channels_refused: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub unknown_channel_frames: u64,
}

/// Where a key rollover stands (`GET /api/v1/trust` has the details).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TrustHealth {
    pub serial: u64,
    pub phase: &'static str,
    pub peers: usize,
    pub behind: usize,
}

/// The data directory's disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StorageHealth {
    /// Bytes free for the server on its filesystem (`None` if it could not be read).
    pub free_bytes: Option<u64>,
    /// Set once a write failed (a full disk): nothing is acknowledged until the disk takes
    /// writes again, when the server starts over by itself from what is durable.
    pub failed: Option<String>,
    /// Set while a database that went away is being waited for: the batch it did not take is
    /// tried again (nothing is acknowledged meanwhile) until it does, without a restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

/// The audit log's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuditHealth {
    pub head: u64,
    pub keep: u64,
    pub failures: u64,
    pub unrecorded: u64,
}

/// Step output the server did not keep as sent, since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeploymentsHealth {
    /// Output chunks for a step that was not running (finished, unknown, or not started).
    pub output_refused: u64,
    /// Steps whose output went over the cap and was cut with a marker.
    pub output_truncated: u64,
    /// The key ring sealing secrets at rest: its keys (the last seals), and the processes and
    /// deployments whose secrets are not sealed with that one yet (after a rotation).
    pub secrets_keys: Vec<String>,
    pub secrets_stale: u64,
}

/// One certificate of the data directory and when it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateExpiry {
    /// What it is: `server`, `ca`, `relay_ca`, `signing`, or `relay:NAME` for a relay's.
    pub name: String,
    /// Its file (in the data directory; a relay's in the relay's).
    pub file: String,
    /// Its `notAfter`, seconds since the Unix epoch.
    pub not_after_unix_s: i64,
    /// Whole days until then (negative once expired).
    pub days_left: i64,
}

impl CertificateExpiry {
    fn new(name: String, file: String, not_after_unix_s: i64, now: i64) -> CertificateExpiry {
        CertificateExpiry {
            name,
            file,
            not_after_unix_s,
            days_left: (not_after_unix_s - now).div_euclid(86_400),
        }
    }

    /// The certificates of `dir` that can be read (one that cannot is left out and logged),
    /// and the relays' (`(relay name, notAfter)`), soonest first.
    pub fn of_data_dir(
        dir: &std::path::Path,
        relays: Vec<(String, i64)>,
    ) -> Vec<CertificateExpiry> {
        use crate::init;
        let now = i64::try_from(crate::registry::now_unix_ms() / 1000).unwrap_or(i64::MAX);
        let mut list: Vec<CertificateExpiry> = [
            ("server", init::SERVER_CERT),
            ("ca", init::CA_CERT),
            ("relay_ca", init::RELAY_CA_CERT),
            ("signing", init::SIGNING_CERT),
        ]
        .into_iter()
        .filter_map(|(name, file)| {
            let read = std::fs::read_to_string(dir.join(file))
                .map_err(|e| e.to_string())
                .and_then(|pem| {
                    tether_shared::tls::certificate_not_after(&pem).map_err(|e| e.to_string())
                });
            match read {
                Ok(not_after_unix_s) => Some(CertificateExpiry::new(
                    name.to_owned(),
                    file.to_owned(),
                    not_after_unix_s,
                    now,
                )),
                Err(e) => {
                    tracing::warn!(file, error = %e, "certificate-unreadable");
                    None
                }
            }
        })
        .collect();
        list.extend(relays.into_iter().map(|(name, not_after)| {
            CertificateExpiry::new(format!("relay:{name}"), "tls.pem".into(), not_after, now)
        }));
        list.sort_by_key(|c| c.not_after_unix_s);
        list
    }
}

impl ServerHealth {
    /// A family with one sample per agent that has a value.
    fn per_agent<V: std::fmt::Display>(
        &self,
        out: &mut String,
        name: &str,
        kind: &str,
        help: &str,
        value: impl Fn(&AgentHealth) -> Option<V>,
    ) {
        tether_shared::metrics::header(out, name, kind, help);
        for (agent, health) in &self.agents {
            if let Some(v) = value(health) {
                tether_shared::metrics::sample(out, name, &[("agent", agent)], v);
            }
        }
    }

    /// Prometheus text exposition (format 0.0.4) of the counters and states.
    pub fn to_prometheus(&self) -> String {
        let j = &self.journal;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            tether_shared::metrics::single(&mut out, name, kind, help, value);
        };
        metric(
            "tether_journal_batches_total",
            "counter",
            "Group commits (flush + fdatasync) made by the journal.",
            j.batches,
        );
        metric(
            "tether_journal_commits_total",
            "counter",
            "Commit requests made durable by the journal.",
            j.commits,
        );
        metric(
            "tether_journal_ops_total",
            "counter",
            "Operations applied by journal commits.",
            j.ops,
        );
        metric(
            "tether_journal_syncs_total",
            "counter",
            "fdatasync calls on the journal's data file.",
            j.syncs,
        );
        metric(
            "tether_journal_queued",
            "gauge",
            "Commit requests waiting for the journal writer.",
            j.queued,
        );
        metric(
            "tether_journal_failures_total",
            "counter",
            "Journal batches that failed to commit.",
            j.failures,
        );
        metric(
            "tether_journal_fenced_total",
            "counter",
            "Commits refused because the agent they were for was claimed since by a newer session (on another node).",
            j.fenced,
        );
        metric(
            "tether_journal_compactions_total",
            "counter",
            "Compactions of the journal's store (live entries copied into a fresh database).",
            j.compactions,
        );
        metric(
            "tether_journal_poisoned",
            "gauge",
            "1 if the journal stopped accepting writes after a failed sync.",
            u64::from(j.poisoned.is_some()),
        );
        metric(
            "tether_audit_failures_total",
            "counter",
            "Audit entries that could not be recorded (the journal failed).",
            self.audit.failures,
        );
        metric(
            "tether_audit_unrecorded_total",
            "counter",
            "Unauthenticated refusals (401) not recorded, past 20 a second.",
            self.audit.unrecorded,
        );
        metric(
            "tether_journal_waiting",
            "gauge",
            "1 while the journal waits for a database that went away to take a batch again.",
            u64::from(j.waiting.is_some()),
        );
        metric(
            "tether_storage_free_bytes",
            "gauge",
            "Bytes free on the data directory's filesystem.",
            self.storage.free_bytes.unwrap_or(0),
        );
        metric(
            "tether_storage_failed",
            "gauge",
            "1 if a write failed (a full disk) and the server waits for space to start over.",
            u64::from(self.storage.failed.is_some()),
        );
        metric(
            "tether_step_output_refused_total",
            "counter",
            "Output chunks refused because their step was not running.",
            self.deployments.output_refused,
        );
        metric(
            "tether_step_output_truncated_total",
            "counter",
            "Steps whose output went over the cap and was cut.",
            self.deployments.output_truncated,
        );
        metric(
            "tether_sessions",
            "gauge",
            "Agent and relay sessions currently connected.",
            self.sessions,
        );
        let per_agent: [AgentGauge; 3] = [
            (
                "tether_agent_unacked_commands",
                "Commands journaled for the agent and not yet acknowledged.",
                |a| Some(a.unacked_commands),
            ),
            (
                "tether_agent_oldest_unacked_ms",
                "Age of the oldest unacknowledged command, in milliseconds.",
                |a| Some(a.oldest_unacked_ms.unwrap_or(0)),
            ),
            (
                "tether_agent_connected",
                "1 if a session of the agent is attached.",
                |a| Some(u64::from(a.connected)),
            ),
        ];
        let figure = |a: &AgentHealth, f: fn(&AgentFigures) -> u64| a.figures.as_ref().map(f);
        // What the agents say of themselves in their heartbeats (releases that send it).
        let reported: [ReportedFigure; 7] = [
            (
                "tether_agent_resident_memory_bytes",
                "gauge",
                "The agent worker's resident memory, as it reported it last.",
                |f| f.resident_bytes,
            ),
            (
                "tether_agent_cpu_milliseconds_total",
                "counter",
                "The agent worker's CPU time since it started, as it reported it last.",
                |f| f.cpu_ms,
            ),
            (
                "tether_agent_open_fds",
                "gauge",
                "The agent worker's open file descriptors, as it reported them last.",
                |f| f.open_fds,
            ),
            (
                "tether_agent_uptime_seconds",
                "gauge",
                "Seconds since the agent worker started, as it reported them last.",
                |f| f.uptime_s,
            ),
            (
                "tether_agent_steps_running",
                "gauge",
                "Steps the agent runs now, as it reported them last.",
                |f| f.steps_running,
            ),
            (
                "tether_agent_events_unacked",
                "gauge",
                "Events the agent journaled and the server had not acknowledged, as it reported them last.",
                |f| f.events_unacked,
            ),
            (
                "tether_agent_journal_failures_total",
                "counter",
                "Journal batches that failed on the agent since its worker started.",
                |f| f.journal_failures,
            ),
        ];
        for (name, help, value) in per_agent {
            self.per_agent(&mut out, name, "gauge", help, value);
        }
        for (name, kind, help, value) in reported {
            self.per_agent(&mut out, name, kind, help, |a| figure(a, value));
        }
        self.per_agent(
            &mut out,
            "tether_agent_load1",
            "gauge",
            "The agent's machine's one-minute load average, as it reported it last.",
            |a| a.load_milli.map(|l| l as f64 / 1000.0),
        );
        let name = "tether_certificate_expiry_timestamp_seconds";
        header(
            &mut out,
            name,
            "gauge",
            "When a certificate of the server's data directory expires.",
        );
        for c in &self.certificates {
            sample(
                &mut out,
                name,
                &[("certificate", &c.name)],
                c.not_after_unix_s,
            );
        }
        let _ = write!(
            out,
            "# HELP tether_trust_serial The trust set (signing keys and CAs) agents and relays should hold.\n\
             # TYPE tether_trust_serial gauge\n\
             tether_trust_serial {}\n\
             # HELP tether_trust_peers_behind Agents and relays that do not hold the trust set yet.\n\
             # TYPE tether_trust_peers_behind gauge\n\
             tether_trust_peers_behind {}\n",
            self.trust.serial, self.trust.behind
        );
        let r = &self.reconciliation;
        let _ = write!(
            out,
            "# HELP tether_agents_refused Agents whose last handshake was refused.\n\
             # TYPE tether_agents_refused gauge\n\
             tether_agents_refused {}\n\
             # HELP tether_reconciliation_agents Agents this server was found behind (restored from a backup), until dismissed.\n\
             # TYPE tether_reconciliation_agents gauge\n\
             tether_reconciliation_agents {}\n\
             # HELP tether_reconciliation_orphan_results Results agents reported for jobs this server does not know.\n\
             # TYPE tether_reconciliation_orphan_results gauge\n\
             tether_reconciliation_orphan_results {}\n",
            self.agents_refused, r.agents, r.orphan_results
        );
        tether_shared::metrics::histogram(
            &mut out,
            "tether_journal_commit_seconds",
            "Journal commits, from the call to durable.",
            &j.commit_latency,
        );
        header(
            &mut out,
            "tether_actor_up",
            "gauge",
            "1 if the actor answered its last observation without a fault.",
        );
        for actor in &self.actors {
            sample(
                &mut out,
                "tether_actor_up",
                &[("name", &actor.name), ("kind", actor.kind)],
                u8::from(actor.state == ActorState::Running),
            );
        }
        out
    }
}

/// A figure agents report of themselves: name, kind, help text, and how to read it.
type ReportedFigure = (
    &'static str,
    &'static str,
    &'static str,
    fn(&AgentFigures) -> u64,
);

/// A per-agent gauge: name, help text, and how to read it.
type AgentGauge = (&'static str, &'static str, fn(&AgentHealth) -> Option<u64>);

/// Watches one journal: its actor's address for liveness, its handle for the counters.
pub struct JournalWatch<A: Actor = tether_shared::journal::Journal> {
    /// The actor that must answer [`Observe`].
    addr: Addr<A>,
    /// Lock-free counters shared with the writer thread, readable even if the actor is stuck.
    handle: JournalHandle,
    /// The origin of `last_answer_ms`.
    started: Instant,
    /// When the actor last answered, in ms since `started`.
    last_answer_ms: AtomicU64,
}

impl<A> JournalWatch<A>
where
    A: Actor + Handler<Observe>,
    A::Context: actix::dev::ToEnvelope<A, Observe>,
{
    /// Starts watching; the actor counts as having beaten now.
    pub fn new(addr: Addr<A>, handle: JournalHandle) -> Self {
        JournalWatch {
            addr,
            handle,
            started: Instant::now(),
            last_answer_ms: AtomicU64::new(0),
        }
    }

    /// Asks the actor for its snapshot, waiting at most `timeout`.
    pub async fn observe(&self, timeout: Duration) -> (ActorHealth, JournalHealth) {
        let answer = self.addr.send(Observe).timeout(timeout).await;
        let now_ms = self.elapsed_ms();
        let (state, journal) = match answer {
            Ok(health) => {
                self.last_answer_ms.store(now_ms, Ordering::Relaxed);
                let state = if health.poisoned.is_some() {
                    ActorState::Poisoned
                } else {
                    ActorState::Running
                };
                (state, health)
            }
            Err(MailboxError::Timeout) => (ActorState::Timeout, self.handle.observe()),
            Err(MailboxError::Closed) => (ActorState::Stopped, self.handle.observe()),
        };
        if state != ActorState::Running {
            tracing::warn!(actor = "journal", state = ?state, "actor-unhealthy");
        }
        let actor = ActorHealth {
            name: "journal".to_owned(),
            kind: "Journal",
            state,
            restarts: 0,
            last_beat_ms: now_ms.saturating_sub(self.last_answer_ms.load(Ordering::Relaxed)),
            backlog: journal.queued,
        };
        (actor, journal)
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use actix::{Context, ResponseFuture};
    use tether_shared::journal::{Journal, JournalOptions};

    /// A toy actor that takes far longer than any timeout to answer.
    struct Stuck(JournalHandle);

    impl Actor for Stuck {
        type Context = Context<Self>;
    }

    impl Handler<Observe> for Stuck {
        type Result = ResponseFuture<JournalHealth>;

        fn handle(&mut self, _: Observe, _: &mut Self::Context) -> Self::Result {
            let handle = self.0.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                handle.observe()
            })
        }
    }

    fn open(dir: &std::path::Path) -> Journal {
        Journal::open(dir, &JournalOptions::default()).unwrap().0
    }

    #[actix::test]
    async fn a_live_journal_is_running() {
        let dir = tempfile::tempdir().unwrap();
        let journal = open(dir.path());
        let handle = journal.handle();
        let watch = JournalWatch::new(journal.start(), handle.clone());
        let (actor, health) = watch.observe(OBSERVE_TIMEOUT).await;
        assert_eq!(actor.state, ActorState::Running);
        assert_eq!(actor.kind, "Journal");
        assert_eq!(health.incarnation, handle.incarnation());
    }

    #[actix::test]
    async fn a_silent_actor_shows_timeout_with_the_shared_counters() {
        let dir = tempfile::tempdir().unwrap();
        let handle = open(dir.path()).handle();
        let watch = JournalWatch::new(Stuck(handle.clone()).start(), handle.clone());
        let (actor, health) = watch.observe(Duration::from_millis(50)).await;
        assert_eq!(actor.state, ActorState::Timeout);
        assert!(actor.last_beat_ms >= 50, "{actor:?}");
        assert_eq!(health.incarnation, handle.incarnation());
    }

    /// An agent's health with 2 unacked commands if `connected`, else none.
    fn agent_health(
        id: &str,
        connected: bool,
        figures: Option<AgentFigures>,
        load_milli: Option<u32>,
    ) -> (String, AgentHealth) {
        let health = AgentHealth {
            id: id.into(),
            connected,
            unacked_commands: if connected { 2 } else { 0 },
            oldest_unacked_ms: None,
            events_received: 0,
            retransmits: 0,
            ignored_acks: 0,
            last_heard_ms: None,
            peer_resets: 0,
            abandoned_commands: 0,
            events_deferred: 0,
            refused: None,
            actors: Vec::new(),
            figures,
            load_milli,
        };
        (id.to_owned(), health)
    }

    #[test]
    fn prometheus_text_has_every_counter_once() {
        let health = ServerHealth {
            audit: AuditHealth::default(),
            actors: vec![ActorHealth {
                name: "journal".into(),
                kind: "Journal",
                state: ActorState::Timeout,
                restarts: 0,
                last_beat_ms: 7,
                backlog: 3,
            }],
            relay_links: BTreeMap::new(),
            deployments: DeploymentsHealth::default(),
            storage: StorageHealth::default(),
            trust: TrustHealth {
                serial: 2,
                phase: "steady",
                peers: 3,
                behind: 1,
            },
            certificates: vec![CertificateExpiry {
                name: "server".into(),
                file: "server.pem".into(),
                not_after_unix_s: 1_900_000_000,
                days_left: 700,
            }],
            sessions: 2,
            journal: JournalHealth {
                incarnation: "i".into(),
                batches: 11,
                commits: 12,
                ops: 13,
                syncs: 14,
                queued: 3,
                last_batch_commits: 1,
                max_batch_commits: 2,
                last_commit_unix_ms: 0,
                failures: 5,
                fenced: 7,
                poisoned: None,
                waiting: None,
                compactions: 6,
                compacting: false,
                commit_latency: tether_shared::metrics::HistogramSnapshot {
                    bounds_us: tether_shared::metrics::FAST_BUCKETS_US.to_vec(),
                    cumulative: vec![1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4],
                    sum_us: 2_000_000,
                },
            },
            agents: BTreeMap::from([
                agent_health(
                    "a-1",
                    true,
                    Some(AgentFigures {
                        resident_bytes: 4096,
                        cpu_ms: 1500,
                        ..AgentFigures::default()
                    }),
                    Some(1250),
                ),
                agent_health("a-\"old\"", false, None, None),
            ]),
            cluster: None,
            reconciliation: crate::reconcile::Summary {
                agents: 2,
                orphan_results: 4,
                ..Default::default()
            },
            agents_refused: 1,
        };
        let text = health.to_prometheus();
        for line in [
            "tether_agents_refused 1",
            "tether_reconciliation_agents 2",
            "tether_reconciliation_orphan_results 4",
            "tether_trust_serial 2",
            "tether_trust_peers_behind 1",
            "tether_journal_batches_total 11",
            "tether_journal_commits_total 12",
            "tether_journal_syncs_total 14",
            "tether_journal_queued 3",
            "tether_journal_failures_total 5",
            "tether_journal_fenced_total 7",
            "tether_journal_compactions_total 6",
            "tether_journal_poisoned 0",
            "tether_sessions 2",
            "tether_actor_up{name=\"journal\",kind=\"Journal\"} 0",
            "tether_journal_commit_seconds_bucket{le=\"0.0005\"} 1",
            "tether_journal_commit_seconds_bucket{le=\"1\"} 3",
            "tether_journal_commit_seconds_bucket{le=\"+Inf\"} 4",
            "tether_journal_commit_seconds_sum 2",
            "tether_journal_commit_seconds_count 4",
            "tether_agent_unacked_commands{agent=\"a-1\"} 2",
            "tether_agent_connected{agent=\"a-\\\"old\\\"\"} 0",
            "tether_agent_resident_memory_bytes{agent=\"a-1\"} 4096",
            "tether_agent_cpu_milliseconds_total{agent=\"a-1\"} 1500",
            "tether_agent_load1{agent=\"a-1\"} 1.25",
        ] {
            assert_eq!(
                text.lines().filter(|l| *l == line).count(),
                1,
                "{line}\n{text}"
            );
        }
        assert!(text.ends_with('\n'));
        // An agent that reports no figures (an older release) has no such series.
        assert!(!text.contains("tether_agent_resident_memory_bytes{agent=\"a-\\\"old"));
    }
}
