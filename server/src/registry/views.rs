//! What lists and pages show of the enrolled: agents with their connection state, relays
//! with the agents they carry, and where each stands in a trust rollover.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use tether_shared::ids::AgentId;

use super::{read, AgentRecord, Maintenance, Registry, ReportedStatus, Role, StalePolicy};
use crate::presence::{Seen, Sightings};
use tether_shared::facts::Facts;

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
    pub id: AgentId,
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
    /// On a cluster where every node serves agents: the member node that serves it (absent:
    /// the active node, or none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
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
    pub id: AgentId,
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
    /// On a cluster's active node: the member node that serves it now (absent: this node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

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
        node: p.node.clone().filter(|_| p.online),
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

/// Where one agent or relay stands in a trust rollover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustPosition {
    pub id: AgentId,
    pub name: String,
    pub role: Role,
    /// The last trust set it confirmed.
    pub serial: u64,
    /// Relays: the certificate it was last issued.
    pub certificate: Option<String>,
}

impl Registry {
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
                .get(id.as_str())
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
                let p = presence
                    .get(record.id.as_str())
                    .cloned()
                    .unwrap_or_default();
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
                    node: p.node.clone().filter(|_| p.online),
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
            .map(|s| (s.record.id.to_string(), s.record.name.clone()))
            .collect()
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
}
