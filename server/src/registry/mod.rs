//! [`Registry`]: the enrolled agents and relays and the enrollment tokens. Who is connected
//! right now is [`crate::presence`]; the views that join both take what was seen.
//!
//! Persistent state lives in the journal's meta entries as JSON: `agent/<id>` per enrolled
//! agent or relay, `token/<sha256 hex of the token>` per enrollment token with its remaining
//! uses, expiry and role. The plain token is shown once to whoever created it and never stored
//! or logged. Every change is committed to the journal (and so flushed and fdatasync'ed) before
//! the in-memory maps change and before anyone is answered; changes are serialized by one async
//! lock, so a token's use count is decremented atomically even under concurrent enrollments.

use std::collections::{BTreeMap, HashMap};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use tether_shared::enroll::{name_problem, tags_problem};
use tether_shared::facts::Facts;
use tether_shared::identity::PublicKey;
use tether_shared::ids::AgentId;
use tether_shared::journal::{JournalError, JournalHandle, Op};

use crate::presence::{Seen, Sightings};

mod enrollment;
mod index;
mod tokens;
mod views;
use enrollment::Certified;
pub use index::AgentIndex;
use index::Enrolled;
pub use tokens::TokenInfo;
use tokens::{token_sha256, StoredToken};
pub use views::{AgentView, Status, TrustPosition};

pub use tether_shared::enroll::{EnrollRequest, Role};

/// Meta key prefix of enrolled agents and relays.
pub const AGENT_PREFIX: &str = "agent/";
/// Meta key prefix of enrollment tokens (followed by the token's sha256, hex).
pub const TOKEN_PREFIX: &str = "token/";
/// Most enrollments one token may allow.
pub const MAX_TOKEN_USES: u32 = 10_000;
/// Longest lifetime of an enrollment token.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest token text looked up at all (ours are 47 characters); longer ones are simply invalid.
const MAX_TOKEN_LEN: usize = 512;

/// An enrolled agent or relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRecord {
    /// Server-assigned id: `a-` (agents) or `r-` (relays) and 16 hex digits.
    pub id: AgentId,
    /// The operator's name for the machine; unique among all enrolled peers.
    pub name: String,
    /// Standard base64 of its Ed25519 public key: the handshake proof is checked against it.
    pub public_key: String,
    /// Labels deployments target.
    pub tags: Vec<String>,
    /// The operator's key/value notes on the machine (rack, owner, ...); set through the REST
    /// API or the web application, never by the agent. Absent in records stored before they
    /// existed.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Agent or relay.
    pub role: Role,
    /// When it enrolled.
    pub enrolled_unix_ms: u64,
    /// Set by an operator: no new job starts there (see [`Maintenance`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<Maintenance>,
    /// Jobs it runs at once, set by an operator; `None`: the server's
    /// `server.max_running_jobs_per_agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running_jobs: Option<u32>,
    /// What the agent last reported of its machine (`tether_shared::facts`); empty until it
    /// connects with a release that reports them.
    #[serde(default, skip_serializing_if = "Facts::is_empty")]
    pub facts: Facts,
    /// When `facts` were last stored (0: never).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub facts_unix_ms: u64,
}

/// Meta key prefix of agents' last connection (Unix ms, big-endian), stored apart from their
/// record so that storing it never races an operator's change of the record.
pub const SEEN_PREFIX: &str = "seen/";

/// Least time between two stores of an agent's last connection.
pub const SEEN_EVERY_MS: u64 = 10 * 60 * 1000;

/// When agents offline for long are marked stale and removed (`retention.*_stale_after_s`).
#[derive(Debug, Default)]
pub struct StalePolicy {
    /// Offline longer than this: shown stale (0: never).
    pub mark_after_ms: std::sync::atomic::AtomicU64,
    /// Offline longer than this: removed (0: never).
    pub remove_after_ms: std::sync::atomic::AtomicU64,
    /// When this server started: no agent counts as offline for longer than it has run.
    pub started_unix_ms: std::sync::atomic::AtomicU64,
}

impl StalePolicy {
    fn get(v: &std::sync::atomic::AtomicU64) -> u64 {
        v.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How long an agent with `record` and what was `seen` of it has been offline (`None`:
    /// online now). Counted from the latest of its last connection (stored), its last
    /// disconnection (seen by this server), its enrollment and this server's start.
    pub fn offline_for(
        &self,
        record: &AgentRecord,
        stored_seen: u64,
        seen: &Seen,
        now: u64,
    ) -> Option<u64> {
        if seen.online {
            return None;
        }
        let since = [
            stored_seen,
            seen.last_seen_unix_ms.unwrap_or(0),
            Self::get(&self.started_unix_ms),
            record.enrolled_unix_ms,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        Some(now.saturating_sub(since))
    }

    /// Whether it is past `threshold_ms` (0: never).
    fn past(
        &self,
        record: &AgentRecord,
        stored_seen: u64,
        seen: &Seen,
        now: u64,
        threshold_ms: u64,
    ) -> bool {
        threshold_ms > 0
            && self
                .offline_for(record, stored_seen, seen, now)
                .is_some_and(|d| d > threshold_ms)
    }
}

/// What an operator changes of an agent; `None` leaves a field as it is.
#[derive(Debug, Default)]
pub struct AgentChanges {
    pub tags: Option<Vec<String>>,
    pub properties: Option<BTreeMap<String, String>>,
    /// `Some(Some(reason))` starts (or re-words) maintenance, `Some(None)` ends it.
    pub maintenance: Option<Option<String>>,
    /// `Some(0)` goes back to the server's default.
    pub max_running_jobs: Option<u32>,
}

/// An agent in maintenance: its queued jobs wait (or, for deployments made with
/// `skip_maintenance`, are skipped); running ones go on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Maintenance {
    pub since_unix_ms: u64,
    /// The operator's words (may be empty).
    pub reason: String,
}

/// Longest maintenance reason.
pub const MAX_MAINTENANCE_REASON: usize = 200;

/// A peer's self-reported status, as heartbeats carry it.
pub type ReportedStatus = tether_shared::protocol::AgentStatus;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Unknown, spent, expired or wrong-role token: deliberately one answer for all.
    #[error("invalid or expired enrollment token")]
    InvalidToken,
    /// A field of the request breaks a rule; the message says which.
    #[error("{0}")]
    Invalid(String),
    /// The name is enrolled with another key (or as another role).
    #[error("name already enrolled with another key: choose another --name, or delete the enrolled one first (tether agents delete NAME, tether relays delete NAME, or the web application)")]
    NameTaken,
    /// The key is enrolled under another name.
    #[error("public key already enrolled under another name")]
    KeyTaken,
    /// An enrolled relay asked for a certificate for another TLS key or other hostnames with
    /// a token that is spent: a new certificate needs a token with a use left.
    #[error("this relay is already enrolled, and its certificate was issued for another TLS key or other hostnames; a new certificate needs a relay enrollment token with a use left")]
    CertificateChange,
    /// An enrolled agent asked for other tags with a token that is spent.
    #[error("this agent is already enrolled with other tags; new tags need an enrollment token with a use left (or set them with PATCH /api/v1/agents/{{id}} or the web application)")]
    TagsChange,
    /// The journal refused the change; nothing changed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A stored entry could not be decoded at load.
    #[error("registry entry {key}: {reason}")]
    Corrupt {
        /// The meta key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A stored agent: the record and the token that enrolled it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredAgent {
    /// The public record.
    record: AgentRecord,
    /// sha256 (hex) of the token it enrolled with: a retried install presenting the same
    /// (possibly spent) token gets its record back.
    token_sha256: String,
    /// Relays: the TLS key and hostnames their certificate was issued for. A retry with the
    /// spent token is certified again only for exactly these; anything else takes a new use
    /// of a token. Absent for agents and for relays enrolled before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    certified: Option<Certified>,
    /// Relays: the certificate last issued, re-sent at every connect and renewed before it
    /// expires. Absent for agents and for relays enrolled before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    certificate: Option<IssuedCertificate>,
    /// The serial of the last trust set (signing keys and CAs, `crate::trust`) it confirmed
    /// holding; 0 for the one it enrolled with.
    #[serde(default, skip_serializing_if = "is_zero")]
    trust_serial: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A relay's certificate as issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedCertificate {
    pub pem: String,
    /// Its `notAfter`, seconds since the Unix epoch.
    pub not_after_unix_s: i64,
}

/// What a relay's certificate is for, and the one it holds.
/// What an agent or relay reported of itself, to be stored (see [`Registry::set_reported`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reported {
    /// Its machine's facts (agents only).
    pub facts: Option<Facts>,
    /// The trust set it holds.
    pub trust_serial: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayCertificate {
    /// The raw P-256 public key it certifies.
    pub tls_public_key: Vec<u8>,
    pub hostnames: Vec<String>,
    pub issued: Option<IssuedCertificate>,
}

/// The registry; share it as `Arc<Registry>`.
pub struct Registry {
    /// Where every change is committed first.
    journal: JournalHandle,
    /// Enrolled agents and relays by id.
    agents: RwLock<Enrolled>,
    /// Live tokens by the sha256 (hex) of their text.
    tokens: RwLock<HashMap<String, StoredToken>>,
    /// Serializes changes: check, commit and apply happen as one step.
    changes: tokio::sync::Mutex<()>,
    /// When agents offline for long are marked stale and removed.
    pub stale: StalePolicy,
    /// Agents' last connection as stored (`SEEN_PREFIX`), by id.
    seen: RwLock<HashMap<String, u64>>,
    /// On a member node: another node enrolls agents, so one not known here is looked for in
    /// the journal (see [`Registry::enrolled_since`]).
    follows: std::sync::atomic::AtomicBool,
    /// Lookups of unknown agents in the current second (see [`MAX_LOOKUPS_PER_S`]).
    lookups: std::sync::Mutex<(Option<std::time::Instant>, u32)>,
}

/// On a member: unknown agents looked up in the journal per second at most (their handshakes
/// are not verified yet, so anyone may send them); the others wait for the next reading of
/// the whole registry (every 2 s).
const MAX_LOOKUPS_PER_S: u32 = 500;

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("agents", &read(&self.agents).len())
            .field("tokens", &read(&self.tokens).len())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Reads every agent and token from the journal's meta entries.
    pub fn load(journal: JournalHandle) -> Result<Registry, RegistryError> {
        let mut agents = Enrolled::default();
        for (key, value) in journal.scan_meta(AGENT_PREFIX)? {
            let stored: StoredAgent = decode(&key, &value)?;
            if key.strip_prefix(AGENT_PREFIX) != Some(stored.record.id.as_str()) {
                return Err(RegistryError::Corrupt {
                    key,
                    reason: format!("holds agent id {:?}", stored.record.id),
                });
            }
            agents.insert(stored);
        }
        let mut seen = HashMap::new();
        for (key, value) in journal.scan_meta(SEEN_PREFIX)? {
            if let (Some(id), Ok(bytes)) = (
                key.strip_prefix(SEEN_PREFIX),
                <[u8; 8]>::try_from(value.as_slice()),
            ) {
                seen.insert(id.to_owned(), u64::from_be_bytes(bytes));
            }
        }
        let mut tokens = HashMap::new();
        for (key, value) in journal.scan_meta(TOKEN_PREFIX)? {
            let token: StoredToken = decode(&key, &value)?;
            let hash = key.get(TOKEN_PREFIX.len()..).unwrap_or_default().to_owned();
            tokens.insert(hash, token);
        }
        tracing::info!(
            agents = agents.len(),
            tokens = tokens.len(),
            "registry-loaded"
        );
        Ok(Registry {
            journal,
            agents: RwLock::new(agents),
            tokens: RwLock::new(tokens),
            changes: tokio::sync::Mutex::new(()),
            stale: StalePolicy {
                started_unix_ms: tether_shared::clock::now_unix_ms().into(),
                ..StalePolicy::default()
            },
            seen: RwLock::new(seen),
            follows: Default::default(),
            lookups: Default::default(),
        })
    }

    /// From now on agents are enrolled by another node (this one is a member): one not known
    /// here is looked for in the journal before it is refused.
    pub fn follow_the_active_node(&self) {
        self.follows
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// On a member: agent `id`, enrolled by the active node since this node last read the
    /// registry, read now (and kept); `None` elsewhere, or if it is not in the journal either.
    pub fn enrolled_since(&self, id: &str) -> Option<AgentRecord> {
        if !self.follows.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        {
            let mut lookups = self.lookups.lock().unwrap_or_else(PoisonError::into_inner);
            let now = std::time::Instant::now();
            if lookups
                .0
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
            {
                *lookups = (Some(now), 0);
            }
            if lookups.1 >= MAX_LOOKUPS_PER_S {
                return None;
            }
            lookups.1 += 1;
        }
        let key = format!("{AGENT_PREFIX}{id}");
        let value = self.journal.get_meta(&key).ok()??;
        let stored: StoredAgent = decode(&key, &value).ok()?;
        if stored.record.id.as_str() != id {
            return None;
        }
        let record = stored.record.clone();
        write(&self.agents).insert(stored);
        Some(record)
    }

    /// Reads every agent and relay again (on a member node: the active node enrolls, changes
    /// and deletes them); answers the ids that are gone since.
    pub fn reload_agents(&self) -> Result<Vec<AgentId>, RegistryError> {
        // Those known before the read: one looked up meanwhile (`enrolled_since`) is kept.
        let before: std::collections::HashSet<AgentId> =
            read(&self.agents).keys().cloned().collect();
        let mut agents = Enrolled::default();
        for (key, value) in self.journal.scan_meta(AGENT_PREFIX)? {
            let stored: StoredAgent = decode(&key, &value)?;
            if key.strip_prefix(AGENT_PREFIX) == Some(stored.record.id.as_str()) {
                agents.insert(stored);
            }
        }
        let mut held = write(&self.agents);
        let gone = held
            .keys()
            .filter(|id| before.contains(*id) && !agents.contains_key(id.as_str()))
            .cloned()
            .collect();
        let since: Vec<AgentId> = held
            .keys()
            .filter(|id| !before.contains(*id) && !agents.contains_key(id.as_str()))
            .cloned()
            .collect();
        for id in since {
            if let Some(stored) = held.remove(&id) {
                agents.insert(stored);
            }
        }
        *held = agents;
        Ok(gone)
    }

    /// The enrolled agent or relay with this id.
    pub fn agent(&self, id: &str) -> Option<AgentRecord> {
        read(&self.agents).get(id).map(|s| s.record.clone())
    }

    /// Whether agent `id`, or a relay of `path` (its session's), is in maintenance (no new job
    /// starts there), and its own limit of jobs at once, if set.
    pub fn dispatch_terms(&self, id: &str, path: &[String]) -> (bool, Option<usize>) {
        let agents = read(&self.agents);
        let relay_held = path.iter().any(|r| {
            agents
                .get(r.as_str())
                .is_some_and(|s| s.record.maintenance.is_some())
        });
        agents.get(id).map_or((relay_held, None), |s| {
            (
                relay_held || s.record.maintenance.is_some(),
                s.record.max_running_jobs.map(|n| n as usize),
            )
        })
    }

    /// Agent `id`'s values for `${agent.NAME}` in steps: its facts, `name` and `id`.
    pub fn placeholder_values(&self, id: &str) -> BTreeMap<String, String> {
        read(&self.agents).get(id).map_or_else(BTreeMap::new, |s| {
            let mut values = s.record.facts.clone();
            values.insert("name".to_owned(), s.record.name.clone());
            values.insert("id".to_owned(), s.record.id.to_string());
            values
        })
    }

    /// Puts relay `id` in maintenance (`Some(reason)`) or ends it (`None`): no new job starts
    /// on the agents behind it. `None` if no relay has that id.
    pub async fn set_relay_maintenance(
        &self,
        id: &str,
        maintenance: Option<String>,
    ) -> Result<Option<AgentRecord>, RegistryError> {
        if let Some(problem) = maintenance.as_deref().and_then(reason_problem) {
            return Err(RegistryError::Invalid(problem));
        }
        let on = maintenance.is_some();
        let modified = self
            .modify(id, Some(Role::Relay), |stored| {
                set_maintenance(&mut stored.record, maintenance)
            })
            .await?;
        if modified.is_some() {
            tracing::info!(relay_id = %id, maintenance = on, "relay-maintenance-set");
        }
        Ok(modified)
    }

    /// The name of agent `id`, without copying the rest of its record.
    pub fn agent_name(&self, id: &str) -> Option<String> {
        read(&self.agents).get(id).map(|s| s.record.name.clone())
    }

    /// The agent (not relay) whose id or name is `id_or_name`: every route that names an agent
    /// takes either.
    pub fn resolve_agent(&self, id_or_name: &str) -> Option<AgentRecord> {
        let agents = read(&self.agents);
        let id = agents.index.id_of(id_or_name)?;
        agents.get(id).map(|s| s.record.clone())
    }

    /// Reads the agents' index (names, tags) with `f`; `f` must not call the registry.
    pub fn with_index<T>(&self, f: impl FnOnce(&AgentIndex) -> T) -> T {
        f(&read(&self.agents).index)
    }

    /// Every enrolled agent (not relays), by id.
    pub fn agents(&self) -> Vec<AgentRecord> {
        self.records(Role::Agent)
    }

    /// Every enrolled relay, by name.
    pub fn relays(&self) -> Vec<AgentRecord> {
        let mut list = self.records(Role::Relay);
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    fn records(&self, role: Role) -> Vec<AgentRecord> {
        read(&self.agents)
            .values()
            .filter(|s| s.record.role == role)
            .map(|s| s.record.clone())
            .collect()
    }

    /// Replaces the tags and/or the properties of agent `id` (validated; committed before it
    /// answers). `None` if no agent (not relay) has that id.
    pub async fn update_agent(
        &self,
        id: &str,
        changes: AgentChanges,
    ) -> Result<Option<AgentRecord>, RegistryError> {
        let AgentChanges {
            tags,
            properties,
            maintenance,
            max_running_jobs,
        } = changes;
        let problem = tags
            .as_deref()
            .and_then(tags_problem)
            .or_else(|| properties.as_ref().and_then(properties_problem))
            .or_else(|| maintenance.as_ref()?.as_deref().and_then(reason_problem))
            .or_else(|| {
                max_running_jobs
                    .filter(|n| u64::from(*n) > tether_shared::config::MAX_RUNNING_JOBS_PER_AGENT)
                    .map(|n| {
                        format!(
                            "max_running_jobs is 0 (the server's default) to {}, got {n}",
                            tether_shared::config::MAX_RUNNING_JOBS_PER_AGENT
                        )
                    })
            });
        if let Some(problem) = problem {
            return Err(RegistryError::Invalid(problem));
        }
        let modified = self
            .modify(id, Some(Role::Agent), |stored| {
                if let Some(tags) = tags {
                    stored.record.tags = tags;
                }
                if let Some(properties) = properties {
                    stored.record.properties = properties;
                }
                if let Some(maintenance) = maintenance {
                    set_maintenance(&mut stored.record, maintenance);
                }
                if let Some(n) = max_running_jobs {
                    stored.record.max_running_jobs = (n > 0).then_some(n);
                }
            })
            .await?;
        let Some(record) = modified else {
            return Ok(None);
        };
        tracing::info!(agent_id = %id, tags = record.tags.len(), properties = record.properties.len(), maintenance = record.maintenance.is_some(), "agent-updated");
        Ok(Some(record))
    }

    /// Forgets agent `id` (committed before it answers): its key no longer authenticates, so
    /// its next handshake is refused. `None` if no agent (not relay) has that id.
    pub async fn delete_agent(&self, id: &str) -> Result<Option<AgentRecord>, RegistryError> {
        self.delete(id, Role::Agent).await
    }

    /// Forgets relay `id`, as [`Registry::delete_agent`] an agent: its key no longer
    /// authenticates, so neither its link nor a channel naming it in a path gets through.
    pub async fn delete_relay(&self, id: &str) -> Result<Option<AgentRecord>, RegistryError> {
        self.delete(id, Role::Relay).await
    }

    async fn delete(&self, id: &str, role: Role) -> Result<Option<AgentRecord>, RegistryError> {
        let _change = self.changes.lock().await;
        let Some(stored) = read(&self.agents)
            .get(id)
            .filter(|s| s.record.role == role)
            .cloned()
        else {
            return Ok(None);
        };
        self.journal
            .commit(vec![
                Op::DeleteMeta {
                    key: format!("{AGENT_PREFIX}{id}"),
                },
                Op::DeleteMeta {
                    key: format!("{SEEN_PREFIX}{id}"),
                },
            ])
            .await?;
        write(&self.agents).remove(id);
        write(&self.seen).remove(id);
        tracing::info!(agent_id = %id, name = %stored.record.name, role = %role, "agent-deleted");
        Ok(Some(stored.record))
    }

    /// Relay `id`'s certified key and names and its last certificate; `None` for an unknown
    /// relay or one enrolled before they were recorded.
    pub fn relay_certificate(&self, id: &str) -> Option<RelayCertificate> {
        let agents = read(&self.agents);
        let stored = agents.get(id).filter(|s| s.record.role == Role::Relay)?;
        let certified = stored.certified.as_ref()?;
        Some(RelayCertificate {
            tls_public_key: base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                &certified.tls_public_key,
            )
            .ok()?,
            hostnames: certified.hostnames.clone(),
            issued: stored.certificate.clone(),
        })
    }

    /// Records `issued` as relay `id`'s certificate (committed before it answers). `false` if
    /// the relay is gone.
    pub async fn set_relay_certificate(
        &self,
        id: &str,
        issued: IssuedCertificate,
    ) -> Result<bool, RegistryError> {
        let modified = self
            .modify(id, Some(Role::Relay), |stored| {
                stored.certificate = Some(issued)
            })
            .await?;
        Ok(modified.is_some())
    }

    /// The op storing that agent `id` connects at `now`, unless that was stored less than
    /// [`SEEN_EVERY_MS`] ago: it joins the handshake's commit; [`Registry::note_seen`] once
    /// it is durable.
    pub fn seen_op(&self, id: &str, now: u64) -> Option<Op> {
        let due = now.saturating_sub(self.stored_seen(id)) >= SEEN_EVERY_MS;
        due.then(|| Op::PutMeta {
            key: format!("{SEEN_PREFIX}{id}"),
            value: now.to_be_bytes().to_vec(),
        })
    }

    /// The op of [`Registry::seen_op`] is durable.
    pub fn note_seen(&self, id: &str, now: u64) {
        write(&self.seen).insert(id.to_owned(), now);
    }

    /// When agent `id`'s last connection was stored (0: never).
    fn stored_seen(&self, id: &str) -> u64 {
        read(&self.seen).get(id).copied().unwrap_or(0)
    }

    /// Agents offline for longer than `retention.remove_stale_after_s`, by id.
    pub fn stale_to_remove(&self, seen: &dyn Sightings) -> Vec<AgentId> {
        let threshold = StalePolicy::get(&self.stale.remove_after_ms);
        if threshold == 0 {
            return Vec::new();
        }
        let now = tether_shared::clock::now_unix_ms();
        read(&self.agents)
            .values()
            .filter(|s| s.record.role == Role::Agent)
            .filter(|s| {
                let id = &s.record.id;
                self.stale.past(
                    &s.record,
                    self.stored_seen(id),
                    &seen.seen(id),
                    now,
                    threshold,
                )
            })
            .map(|s| s.record.id.clone())
            .collect()
    }

    /// Stores what several agents and relays reported of themselves (their machine's facts,
    /// the trust set they hold), in one commit (what is unchanged, or of no one enrolled, is
    /// left out); answers how many records changed. The caller bounds how often (see
    /// `session::record_reports`). A fleet connecting at once costs a few commits rather than
    /// one per agent, each waiting for the last.
    pub async fn set_reported(
        &self,
        reported: Vec<(String, Reported)>,
    ) -> Result<usize, RegistryError> {
        let _change = self.changes.lock().await;
        let now = tether_shared::clock::now_unix_ms();
        let changed: Vec<StoredAgent> = {
            let agents = read(&self.agents);
            reported
                .into_iter()
                .filter_map(|(id, reported)| {
                    let mut stored = agents.get(id.as_str())?.clone();
                    let mut changed = false;
                    if let Some(facts) = reported.facts {
                        if stored.record.role == Role::Agent && stored.record.facts != facts {
                            stored.record.facts = facts;
                            stored.record.facts_unix_ms = now;
                            changed = true;
                        }
                    }
                    if let Some(serial) = reported.trust_serial {
                        // A reinstalled one may hold an older set than before.
                        changed |= stored.trust_serial != serial;
                        stored.trust_serial = serial;
                    }
                    changed.then_some(stored)
                })
                .collect()
        };
        if changed.is_empty() {
            return Ok(0);
        }
        let ops = changed
            .iter()
            .map(|stored| Op::PutMeta {
                key: format!("{AGENT_PREFIX}{}", stored.record.id),
                value: encode(stored),
            })
            .collect();
        self.journal.commit(ops).await?;
        let n = changed.len();
        let mut agents = write(&self.agents);
        for stored in changed {
            agents.insert(stored);
        }
        Ok(n)
    }

    /// The trust set agent or relay `id` confirmed last (0 if unknown).
    pub fn trust_serial(&self, id: &str) -> u64 {
        read(&self.agents).get(id).map_or(0, |s| s.trust_serial)
    }

    /// How many agents and relays there are, and how many hold a trust set older than
    /// `serial`.
    pub fn trust_behind(&self, serial: u64) -> (usize, usize) {
        let agents = read(&self.agents);
        let behind = agents.values().filter(|s| s.trust_serial < serial).count();
        (agents.len(), behind)
    }

    /// Changes the stored record of `id` (of `role`, if given) with `change`, commits it and
    /// then serves it; answers the new record, or `None` if there is no such one.
    async fn modify(
        &self,
        id: &str,
        role: Option<Role>,
        change: impl FnOnce(&mut StoredAgent),
    ) -> Result<Option<AgentRecord>, RegistryError> {
        let _change = self.changes.lock().await;
        let Some(mut stored) = read(&self.agents)
            .get(id)
            .filter(|s| role.is_none_or(|r| s.record.role == r))
            .cloned()
        else {
            return Ok(None);
        };
        change(&mut stored);
        self.journal
            .commit(vec![Op::PutMeta {
                key: format!("{AGENT_PREFIX}{id}"),
                value: encode(&stored),
            }])
            .await?;
        let record = stored.record.clone();
        write(&self.agents).insert(stored);
        Ok(Some(record))
    }

    /// A fresh id for `role`, unused so far.
    fn new_id(&self, role: Role) -> String {
        let prefix = match role {
            Role::Agent => "a-",
            Role::Relay => "r-",
        };
        let agents = read(&self.agents);
        loop {
            let id = format!("{prefix}{:016x}", rand::rngs::OsRng.next_u64());
            if !agents.contains_key(id.as_str()) {
                return id;
            }
        }
    }
}

/// Most properties one agent may carry.
pub const MAX_PROPERTIES: usize = 64;
/// Longest property value, in bytes.
pub const MAX_PROPERTY_VALUE_LEN: usize = 1024;

/// Why `properties` are not acceptable, if they are not: at most [`MAX_PROPERTIES`], each key a
/// valid name, each value at most [`MAX_PROPERTY_VALUE_LEN`] bytes without control characters
/// (no CR/LF to forge log lines or headers; the web application escapes everything else).
/// Starts (`Some(reason)`) or ends maintenance of an agent or relay. Already in maintenance:
/// the reason changes, not the time it began.
fn set_maintenance(record: &mut AgentRecord, maintenance: Option<String>) {
    let since = record
        .maintenance
        .as_ref()
        .map_or_else(now_unix_ms, |m| m.since_unix_ms);
    record.maintenance = maintenance.map(|reason| Maintenance {
        since_unix_ms: since,
        reason,
    });
}

/// What is wrong with a maintenance reason, if anything.
fn reason_problem(reason: &str) -> Option<String> {
    if reason.chars().count() > MAX_MAINTENANCE_REASON {
        return Some(format!(
            "a maintenance reason is at most {MAX_MAINTENANCE_REASON} characters"
        ));
    }
    reason
        .chars()
        .any(char::is_control)
        .then(|| "a maintenance reason holds no control characters".to_owned())
}

pub fn properties_problem(properties: &BTreeMap<String, String>) -> Option<String> {
    if properties.len() > MAX_PROPERTIES {
        return Some(format!(
            "at most {MAX_PROPERTIES} properties are allowed, got {}",
            properties.len()
        ));
    }
    properties.iter().find_map(|(key, value)| {
        name_problem("property name", key).or_else(|| {
            if value.len() > MAX_PROPERTY_VALUE_LEN {
                Some(format!(
                    "property {key}: the value must be at most {MAX_PROPERTY_VALUE_LEN} bytes, got {}",
                    value.len()
                ))
            } else if value.chars().any(char::is_control) {
                Some(format!(
                    "property {key}: the value must not hold control characters"
                ))
            } else {
                None
            }
        })
    })
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub use tether_shared::clock::now_unix_ms;

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail; an empty value would fail at load, loudly.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(value).map_err(|e| RegistryError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// Readers never panic on a poisoned lock: no code path panics while holding one, and the maps
/// are only ever replaced entry by entry.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
