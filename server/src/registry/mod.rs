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

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tether_shared::config::Secret;
use tether_shared::enroll::{name_problem, tags_problem};
use tether_shared::facts::Facts;
use tether_shared::identity::PublicKey;
use tether_shared::journal::{JournalError, JournalHandle, Op};

use crate::presence::{Seen, Sightings};

mod index;
pub use index::AgentIndex;
use index::Enrolled;

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
    pub id: String,
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

/// A token just created: the only time its text exists outside the caller's hands.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The token's id (see [`TokenInfo::id`]): what lists show and revocation takes.
    pub id: String,
    /// The token to give to `install`; never stored, never logged.
    pub token: Secret<String>,
    /// When it stops being accepted.
    pub expires_unix_ms: u64,
    /// How many enrollments it allows.
    pub uses: u32,
    /// What it enrolls.
    pub role: Role,
}

/// A live enrollment token as lists show it: never its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    /// The first 16 hex digits of the token's sha256: names it without revealing it.
    pub id: String,
    /// What it enrolls.
    pub role: Role,
    /// Enrollments it still allows.
    pub uses_left: u32,
    /// When it stops being accepted.
    pub expires_unix_ms: u64,
    /// When it was created (absent for tokens from before this was recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_unix_ms: Option<u64>,
}

/// Whether an agent is connected now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// A session is open.
    Online,
    /// No session (never connected, disconnected, or the server restarted since).
    Offline,
}

/// One line of `GET /api/v1/agents`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentView {
    /// The agent id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Connected or not.
    pub status: Status,
    /// The version it reported at its last connect; `None` until it first connects.
    pub version: Option<String>,
    /// Its tags.
    pub tags: Vec<String>,
    /// Its properties (operator-set key/value notes).
    pub properties: BTreeMap<String, String>,
    /// Relays its session runs through, nearest the agent first; empty when direct.
    pub path: Vec<String>,
    /// When it was last heard from (since this server started), Unix ms; `None` if not yet.
    /// Named `last_seen` as in the operator contract.
    #[serde(rename = "last_seen")]
    pub last_seen_unix_ms: Option<u64>,
    /// Set while it is in maintenance.
    pub maintenance: Option<Maintenance>,
    /// Its own limit of jobs at once, if an operator set one.
    pub max_running_jobs: Option<u32>,
    /// What it reported of its machine (`tether_shared::facts`).
    pub facts: Facts,
    /// When those facts were reported (absent: never).
    pub facts_unix_ms: Option<u64>,
    /// It runs an older release than this server's: upgrade it (`tether upgrades`).
    pub upgrade_recommended: bool,
    /// Offline for longer than `retention.mark_stale_after_s`.
    pub stale: bool,
}

/// Whether an agent reporting `version` runs an older release than this server. Versions
/// that are not `MAJOR.MINOR.PATCH` (a development build) are never called older.
pub fn older_than_server(version: &str) -> bool {
    use tether_shared::upgrade::Version;
    match (
        Version::parse(version),
        Version::parse(env!("CARGO_PKG_VERSION")),
    ) {
        (Ok(agent), Ok(server)) => agent < server,
        _ => false,
    }
}

/// One line of `GET /api/v1/relays`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelayStatus {
    pub id: String,
    pub name: String,
    pub status: Status,
    /// The version it reported at its last connect.
    pub version: Option<String>,
    /// Relays between it and the server, nearest it first; empty when it connects directly.
    pub path: Vec<String>,
    #[serde(rename = "last_seen")]
    pub last_seen_unix_ms: Option<u64>,
    /// Agents online through it now (directly or through its child relays).
    pub agents: u64,
    /// Its last heartbeat's status: version, load, and its actors' health.
    #[serde(rename = "health")]
    pub reported: Option<ReportedStatus>,
    /// Set while it is in maintenance: no new job starts on an agent behind it.
    pub maintenance: Option<Maintenance>,
}

/// A peer's self-reported status, as heartbeats carry it.
pub type ReportedStatus = tether_shared::protocol::AgentStatus;

fn agent_status_of(
    record: AgentRecord,
    p: Seen,
    names: &HashMap<String, String>,
    stale: &StalePolicy,
    stored_seen: u64,
) -> AgentView {
    let now = tether_shared::clock::now_unix_ms();
    let mark = StalePolicy::get(&stale.mark_after_ms);
    AgentView {
        stale: stale.past(&record, stored_seen, &p, now, mark),
        upgrade_recommended: p.version.as_deref().is_some_and(older_than_server),
        status: if p.online {
            Status::Online
        } else {
            Status::Offline
        },
        version: p.version,
        path: p.path.iter().map(|id| name_of(names, id)).collect(),
        last_seen_unix_ms: p.last_seen_unix_ms,
        id: record.id,
        name: record.name,
        tags: record.tags,
        properties: record.properties,
        maintenance: record.maintenance,
        max_running_jobs: record.max_running_jobs,
        facts: record.facts,
        facts_unix_ms: (record.facts_unix_ms > 0).then_some(record.facts_unix_ms),
    }
}

fn name_of(names: &HashMap<String, String>, id: &str) -> String {
    names.get(id).cloned().unwrap_or_else(|| id.to_owned())
}

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

/// Where one agent or relay stands in a trust rollover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustPosition {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// The last trust set it confirmed.
    pub serial: u64,
    /// Relays: the certificate it was last issued.
    pub certificate: Option<String>,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayCertificate {
    /// The raw P-256 public key it certifies.
    pub tls_public_key: Vec<u8>,
    pub hostnames: Vec<String>,
    pub issued: Option<IssuedCertificate>,
}

/// What a relay's certificate is issued for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Certified {
    /// Standard base64 of the raw P-256 public key.
    tls_public_key: String,
    /// The certificate's names, in the order asked.
    hostnames: Vec<String>,
}

impl Certified {
    fn of(req: &EnrollRequest) -> Option<Certified> {
        req.tls_public_key.as_ref().map(|key| Certified {
            tls_public_key: key.clone(),
            hostnames: req.hostnames.clone(),
        })
    }
}

/// A stored enrollment token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredToken {
    /// Enrollments it still allows (at least 1; the last use deletes the token).
    uses_left: u32,
    /// When it stops being accepted.
    expires_unix_ms: u64,
    /// What it enrolls.
    role: Role,
    /// When it was created (0 for tokens stored before this was recorded).
    #[serde(default)]
    created_unix_ms: u64,
}

impl StoredToken {
    fn accepts(&self, role: Role, now_ms: u64) -> bool {
        self.role == role && self.uses_left > 0 && now_ms < self.expires_unix_ms
    }
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
}

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
        })
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
                .get(r)
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
            values.insert("id".to_owned(), s.record.id.clone());
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

    /// The agents (not relays) with their connection state, by name.
    pub fn agent_statuses(&self, seen: &dyn Sightings) -> Vec<AgentView> {
        let names = self.relay_names();
        let mut list: Vec<AgentView> = self
            .agents()
            .into_iter()
            .map(|record| {
                let p = seen.seen(&record.id);
                let stored_seen = self.stored_seen(&record.id);
                agent_status_of(record, p, &names, &self.stale, stored_seen)
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// One agent (not relay) with its connection state.
    pub fn agent_status(&self, id: &str, seen: &dyn Sightings) -> Option<AgentView> {
        let record = self.agent(id).filter(|r| r.role == Role::Agent)?;
        let stored_seen = self.stored_seen(id);
        Some(agent_status_of(
            record,
            seen.seen(id),
            &self.relay_names(),
            &self.stale,
            stored_seen,
        ))
    }

    /// The relays with their connection state, by name.
    pub fn relay_statuses(&self, seen: &dyn Sightings) -> Vec<RelayStatus> {
        let presence = seen.all_seen();
        let names = self.relay_names();
        let mut carried: HashMap<&str, u64> = HashMap::new();
        for (id, p) in presence.iter() {
            let is_agent = read(&self.agents)
                .get(id)
                .is_some_and(|s| s.record.role == Role::Agent);
            if p.online && is_agent {
                for relay in &p.path {
                    *carried.entry(relay.as_str()).or_default() += 1;
                }
            }
        }
        let mut list: Vec<RelayStatus> = self
            .records(Role::Relay)
            .into_iter()
            .map(|record| {
                let p = presence.get(&record.id).cloned().unwrap_or_default();
                RelayStatus {
                    status: if p.online {
                        Status::Online
                    } else {
                        Status::Offline
                    },
                    version: p.version,
                    path: p.path.iter().map(|id| name_of(&names, id)).collect(),
                    last_seen_unix_ms: p.last_seen_unix_ms,
                    agents: carried.get(record.id.as_str()).copied().unwrap_or(0),
                    // A relay's last heartbeat says nothing once it is gone.
                    reported: if p.online { p.reported } else { None },
                    maintenance: record.maintenance,
                    id: record.id,
                    name: record.name,
                }
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    fn relay_names(&self) -> HashMap<String, String> {
        read(&self.agents)
            .values()
            .filter(|s| s.record.role == Role::Relay)
            .map(|s| (s.record.id.clone(), s.record.name.clone()))
            .collect()
    }

    /// Creates a token allowing `uses` enrollments of `role` for `ttl`.
    pub async fn create_token(
        &self,
        uses: u32,
        ttl: Duration,
        role: Role,
    ) -> Result<IssuedToken, RegistryError> {
        self.create_token_at(uses, ttl, role, now_unix_ms()).await
    }

    async fn create_token_at(
        &self,
        uses: u32,
        ttl: Duration,
        role: Role,
        now_ms: u64,
    ) -> Result<IssuedToken, RegistryError> {
        if !(1..=MAX_TOKEN_USES).contains(&uses) {
            return Err(RegistryError::Invalid(format!(
                "uses must be between 1 and {MAX_TOKEN_USES}, got {uses}"
            )));
        }
        if ttl < Duration::from_secs(1) || ttl > MAX_TOKEN_TTL {
            return Err(RegistryError::Invalid(format!(
                "ttl_s must be between 1 and {} (30 days), got {}",
                MAX_TOKEN_TTL.as_secs(),
                ttl.as_secs()
            )));
        }
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let token = new_token();
        let hash = token_sha256(&token);
        let id = token_id(&hash);
        let stored = StoredToken {
            uses_left: uses,
            expires_unix_ms: now_ms.saturating_add(ttl_ms),
            role,
            created_unix_ms: now_ms,
        };

        let _change = self.changes.lock().await;
        // Expired tokens go in the same batch: they could never be used again.
        let expired: Vec<String> = read(&self.tokens)
            .iter()
            .filter(|(_, t)| t.expires_unix_ms <= now_ms)
            .map(|(h, _)| h.clone())
            .collect();
        let mut ops: Vec<Op> = expired
            .iter()
            .map(|h| Op::DeleteMeta {
                key: format!("{TOKEN_PREFIX}{h}"),
            })
            .collect();
        ops.push(Op::PutMeta {
            key: format!("{TOKEN_PREFIX}{hash}"),
            value: encode(&stored),
        });
        self.journal.commit(ops).await?;
        {
            let mut tokens = write(&self.tokens);
            for h in &expired {
                tokens.remove(h);
            }
            tokens.insert(hash, stored);
        }
        tracing::info!(
            token_id = %id,
            uses,
            ttl_s = ttl.as_secs(),
            role = %role,
            purged = expired.len(),
            "enrollment-token-created"
        );
        Ok(IssuedToken {
            id,
            token: Secret::new(token),
            expires_unix_ms: stored.expires_unix_ms,
            uses,
            role,
        })
    }

    /// Enrolls the peer `req` describes, consuming one use of its token; an identical retry
    /// (same name, key and role, with a valid token or the token it enrolled with) returns the
    /// existing record and consumes nothing.
    pub async fn enroll(&self, req: EnrollRequest) -> Result<AgentRecord, RegistryError> {
        self.enroll_at(req, now_unix_ms()).await
    }

    async fn enroll_at(
        &self,
        req: EnrollRequest,
        now_ms: u64,
    ) -> Result<AgentRecord, RegistryError> {
        if let Some(problem) = name_problem("name", &req.name).or_else(|| tags_problem(&req.tags)) {
            return Err(RegistryError::Invalid(problem));
        }
        let public_key = PublicKey::from_b64(&req.public_key)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?
            .to_b64();
        // Hashing first means the lookup never compares the secret itself.
        let hash = if req.token.len() <= MAX_TOKEN_LEN {
            Some(token_sha256(&req.token))
        } else {
            None
        };

        let _change = self.changes.lock().await;
        let token = hash
            .as_ref()
            .and_then(|h| read(&self.tokens).get(h).copied())
            .filter(|t| t.accepts(req.role, now_ms));
        let (same_name, same_key) = {
            let agents = read(&self.agents);
            let same_name = agents.values().find(|s| s.record.name == req.name).cloned();
            let same_key = agents
                .values()
                .any(|s| s.record.public_key == public_key && s.record.name != req.name);
            (same_name, same_key)
        };
        let certified = Certified::of(&req);
        if let Some(existing) = &same_name {
            let identical =
                existing.record.public_key == public_key && existing.record.role == req.role;
            let entitled =
                token.is_some() || hash.as_deref() == Some(existing.token_sha256.as_str());
            if identical && entitled {
                if existing.certified == certified && existing.record.tags == req.tags {
                    // A retry: nothing new is asked, so nothing is spent. A relay is certified
                    // again only for the key and names it already holds a certificate for.
                    tracing::info!(agent_id = %existing.record.id, name = %req.name, "agent-re-enrolled");
                    return Ok(existing.record.clone());
                }
                // Other tags (which choose the work an agent gets), or for a relay another key
                // or other names: the operator's say-so, a live token, is needed, and one use
                // of it is spent. The key holder alone cannot change them.
                let (Some(token), Some(hash)) = (token, hash) else {
                    return Err(if existing.certified != certified {
                        RegistryError::CertificateChange
                    } else {
                        RegistryError::TagsChange
                    });
                };
                // A new key or new names: the old certificate is not theirs.
                let certificate = existing
                    .certificate
                    .clone()
                    .filter(|_| existing.certified == certified);
                let mut stored = StoredAgent {
                    certified,
                    certificate,
                    ..existing.clone()
                };
                stored.record.tags = req.tags;
                let left = self.commit_enrollment(&stored, token, &hash).await?;
                tracing::info!(agent_id = %stored.record.id, name = %req.name, tags = ?stored.record.tags, uses_left = left, "agent-re-enrolled-changed");
                return Ok(stored.record);
            }
        }
        let (Some(token), Some(hash)) = (token, hash) else {
            return Err(RegistryError::InvalidToken);
        };
        if same_name.is_some() {
            return Err(RegistryError::NameTaken);
        }
        if same_key {
            return Err(RegistryError::KeyTaken);
        }

        let id = self.new_id(req.role);
        let stored = StoredAgent {
            record: AgentRecord {
                id: id.clone(),
                name: req.name,
                public_key,
                tags: req.tags,
                properties: BTreeMap::new(),
                role: req.role,
                enrolled_unix_ms: now_ms,
                maintenance: None,
                max_running_jobs: None,
                facts: Facts::new(),
                facts_unix_ms: 0,
            },
            token_sha256: hash.clone(),
            certified,
            certificate: None,
            trust_serial: 0,
        };
        let left = self.commit_enrollment(&stored, token, &hash).await?;
        let record = stored.record;
        tracing::info!(agent_id = %id, name = %record.name, role = %record.role, uses_left = left, "agent-enrolled");
        Ok(record)
    }

    /// Commits `stored` with one use less of the token `hash`, then applies both; returns the
    /// uses left. The caller holds the change lock.
    async fn commit_enrollment(
        &self,
        stored: &StoredAgent,
        token: StoredToken,
        hash: &str,
    ) -> Result<u32, RegistryError> {
        let token_key = format!("{TOKEN_PREFIX}{hash}");
        let left = token.uses_left.saturating_sub(1);
        let token_op = if left == 0 {
            Op::DeleteMeta { key: token_key }
        } else {
            Op::PutMeta {
                key: token_key,
                value: encode(&StoredToken {
                    uses_left: left,
                    ..token
                }),
            }
        };
        let id = &stored.record.id;
        self.journal
            .commit(vec![
                Op::PutMeta {
                    key: format!("{AGENT_PREFIX}{id}"),
                    value: encode(stored),
                },
                token_op,
            ])
            .await?;
        {
            let mut tokens = write(&self.tokens);
            if left == 0 {
                tokens.remove(hash);
            } else if let Some(t) = tokens.get_mut(hash) {
                t.uses_left = left;
            }
        }
        write(&self.agents).insert(stored.clone());
        Ok(left)
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

    /// Records that agent or relay `id` holds trust set `serial`, as it said (its handshake or
    /// its answer to a `Trust` command; a reinstalled one may hold an older set than before).
    /// Committed before it answers; `false` if it is gone.
    pub async fn set_trust_serial(&self, id: &str, serial: u64) -> Result<bool, RegistryError> {
        match read(&self.agents).get(id).map(|s| s.trust_serial) {
            None => return Ok(false),
            Some(held) if held == serial => return Ok(true),
            Some(_) => {}
        }
        let modified = self
            .modify(id, None, |stored| stored.trust_serial = serial)
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
    pub fn stale_to_remove(&self, seen: &dyn Sightings) -> Vec<String> {
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

    /// Stores the facts agent `id` reported, unless they are those stored; `false` if no
    /// agent has that id. The caller bounds how often (see `session::record_facts`).
    pub async fn set_facts(&self, id: &str, facts: Facts) -> Result<bool, RegistryError> {
        match read(&self.agents).get(id) {
            None => return Ok(false),
            Some(s) if s.record.facts == facts => return Ok(true),
            Some(_) => {}
        }
        let modified = self
            .modify(id, Some(Role::Agent), |stored| {
                stored.record.facts = facts;
                stored.record.facts_unix_ms = tether_shared::clock::now_unix_ms();
            })
            .await?;
        Ok(modified.is_some())
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

    /// Every agent and relay, with the trust set it holds.
    pub fn trust_positions(&self) -> Vec<TrustPosition> {
        let mut list: Vec<TrustPosition> = read(&self.agents)
            .values()
            .map(|s| TrustPosition {
                id: s.record.id.clone(),
                name: s.record.name.clone(),
                role: s.record.role,
                serial: s.trust_serial,
                certificate: s.certificate.as_ref().map(|c| c.pem.clone()),
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        list
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

    /// The enrollment tokens that can still enroll, newest first.
    pub fn tokens(&self) -> Vec<TokenInfo> {
        let now_ms = now_unix_ms();
        let mut list: Vec<TokenInfo> = read(&self.tokens)
            .iter()
            .filter(|(_, t)| t.expires_unix_ms > now_ms && t.uses_left > 0)
            .map(|(hash, t)| TokenInfo {
                id: token_id(hash),
                role: t.role,
                uses_left: t.uses_left,
                expires_unix_ms: t.expires_unix_ms,
                created_unix_ms: (t.created_unix_ms > 0).then_some(t.created_unix_ms),
            })
            .collect();
        list.sort_by(|a, b| {
            b.created_unix_ms
                .cmp(&a.created_unix_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        list
    }

    /// Revokes the token whose id is `id` (committed before it answers): it enrolls nobody
    /// from then on. Peers it already enrolled keep their identities. `None` if no token has
    /// that id.
    pub async fn revoke_token(&self, id: &str) -> Result<Option<TokenInfo>, RegistryError> {
        if id.len() != TOKEN_ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let _change = self.changes.lock().await;
        let Some((hash, token)) = read(&self.tokens)
            .iter()
            .find(|(hash, _)| token_id(hash).eq_ignore_ascii_case(id))
            .map(|(h, t)| (h.clone(), *t))
        else {
            return Ok(None);
        };
        self.journal
            .commit(vec![Op::DeleteMeta {
                key: format!("{TOKEN_PREFIX}{hash}"),
            }])
            .await?;
        write(&self.tokens).remove(&hash);
        let id = token_id(&hash);
        tracing::info!(token_id = %id, role = %token.role, uses_left = token.uses_left, "enrollment-token-revoked");
        Ok(Some(TokenInfo {
            id,
            role: token.role,
            uses_left: token.uses_left,
            expires_unix_ms: token.expires_unix_ms,
            created_unix_ms: (token.created_unix_ms > 0).then_some(token.created_unix_ms),
        }))
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
            if !agents.contains_key(&id) {
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

/// `tte_` and 32 random bytes, base64url without padding. The prefix makes a leaked token easy
/// to recognise (secret scanners), and keeps a token from starting with `-`, which a command
/// line would take for an option.
fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("tte_{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Hex digits of a token's sha256 that make its id.
const TOKEN_ID_LEN: usize = 16;

/// A token's id: the first [`TOKEN_ID_LEN`] hex digits of its sha256. 64 bits name it among
/// the live tokens; they say nothing of the token's 256 random bits.
fn token_id(hash: &str) -> String {
    hash.get(..TOKEN_ID_LEN).unwrap_or(hash).to_owned()
}

/// The key a token is stored and looked up under.
fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

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
