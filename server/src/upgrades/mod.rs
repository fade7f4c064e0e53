//! Agent upgrades on the server: the store of signed upgrade packages and each agent's
//! upgrade state.
//!
//! A package is an agent binary uploaded under a version `MAJOR.MINOR.PATCH`. It streams to
//! `DATA/upgrades/tmp/` while it is hashed, then becomes the blob `DATA/upgrades/sha256/<hex>`
//! (rename, fsync of the directory) and the index entry `upgrade/package/<version>` → [`Package`]
//! (journal meta, JSON) is committed. The server signs the version and the sha256 with its
//! command-signing key at upload (`tether_shared::upgrade::package_signing_bytes`); the
//! signature is stored with the entry and travels in every `Upgrade` command. A version is
//! never re-bound to other content.
//!
//! A rollout queues one `Upgrade` command per target agent through its `AgentLink`, in the same
//! journal batch as the agent's state `upgrade/agent/<agent id>` → [`AgentUpgrade`]
//! (`requested`). The agent's upgrade events then move the state (`upgrading`, `done`,
//! `rolled_back`, `refused`) in the batch that journals the event ([`Upgrades::on_event`]).
//! Events about another version than the agent's current record are logged and ignored: the
//! latest rollout to an agent is the one its state describes.
//!
//! Relay packages (`component: relay`) are indexed under `upgrade/package/relay/<version>` and
//! signed over `tether-upgrade-v1\nrelay\n{version}\n{sha256}`
//! (`tether_shared::upgrade::component_signing_bytes`), so neither kind of package verifies as
//! the other. A relay has no journal: its state `upgrade/relay/<relay id>` is recorded here at
//! rollout, and its `RelaySession` sends it a signed `Upgrade` command on its own channel each
//! time it (re)connects while the state is in progress; the relay's upgrade events (not
//! journaled on its side, reported again at every connect) move the state through
//! [`Upgrades::on_relay_event`].
//!
//! - [`api`]: `PUT/GET /api/v1/upgrades`, `POST /api/v1/upgrades/{version}/rollout`, and the
//!   agents' (and relays') `GET /agent/v1/upgrades/{sha256}`.

pub mod api;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};
use tether_shared::ids::AgentId;

use serde::{Deserialize, Serialize};
use tether_shared::journal::{JournalError, JournalHandle, Op};
use tether_shared::protocol::{EventBody, UpgradeOutcome};
use tether_shared::upgrade::{Component, Version};

use crate::registry::now_unix_ms;

/// Meta key prefix of the package index (followed by the version).
pub const PACKAGE_PREFIX: &str = "upgrade/package/";
/// Meta key prefix of the agents' upgrade states (followed by the agent id).
pub const AGENT_PREFIX: &str = "upgrade/agent/";
/// Meta key prefix of the relays' upgrade states (followed by the relay id).
pub const RELAY_PREFIX: &str = "upgrade/relay/";
/// Largest package accepted by default.
pub const DEFAULT_MAX_BYTES: u64 = 1024 * 1024 * 1024;
/// Overrides [`DEFAULT_MAX_BYTES`].
pub const MAX_BYTES_ENV: &str = "TETHER_UPGRADE_MAX_BYTES";

/// A complete upload, not yet published.
#[derive(Debug)]
pub struct Upload {
    /// Where it was written.
    pub tmp: PathBuf,
    /// Its sha256 (lowercase hex) and size.
    pub sha256: String,
    pub size: u64,
    /// The architecture its ELF header names, if any.
    pub arch: Option<String>,
}

/// One stored package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    /// `MAJOR.MINOR.PATCH`.
    pub version: String,
    /// Lowercase hex sha256 of the binary: the blob's name.
    pub sha256: String,
    pub size: u64,
    /// The server's signature over the version and the sha256 (base64).
    pub signature: String,
    pub uploaded_unix_ms: u64,
    /// Which binary it replaces (absent: an agent package).
    #[serde(default, skip_serializing_if = "Component::is_agent")]
    pub component: Component,
    /// The CPU architecture of the binary (`x86_64`, `aarch64`, ...: an agent's `arch` fact)
    /// read from its ELF header at upload; absent if it is no ELF file of a known machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
}

impl Package {
    /// Why this package cannot go to a machine whose facts are `facts`: it was built for
    /// another architecture. `None` if it fits, or if either architecture is unknown.
    pub fn arch_problem(&self, facts: &tether_shared::facts::Facts) -> Option<String> {
        let (built, runs) = (
            self.arch.as_deref()?,
            facts.get(tether_shared::facts::ARCH)?,
        );
        (built != runs).then(|| {
            format!(
                "package {} is built for {built}, the machine runs on {runs}: upload one for {runs} under another version",
                self.version
            )
        })
    }
}

impl Package {
    /// Its index key.
    fn meta_key(&self) -> String {
        match self.component {
            Component::Agent => format!("{PACKAGE_PREFIX}{}", self.version),
            Component::Relay => format!("{PACKAGE_PREFIX}relay/{}", self.version),
        }
    }
}

/// Where an agent's upgrade stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeState {
    /// Queued for the agent (it may be offline); nothing reported yet.
    Requested,
    /// The agent accepted it: draining, downloading, staged or in its trial.
    Upgrading,
    /// The new version runs.
    Done,
    /// The new version failed its trial; the previous one runs again.
    RolledBack,
    /// Refused or abandoned before the swap (older version, bad package, drain timeout...).
    Refused,
}

impl UpgradeState {
    /// Still to be settled by the agent.
    pub fn in_progress(self) -> bool {
        matches!(self, UpgradeState::Requested | UpgradeState::Upgrading)
    }
}

/// One agent's latest upgrade, as `GET /api/v1/agents` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentUpgrade {
    pub state: UpgradeState,
    /// The version it is being (or was) upgraded to.
    pub version: String,
    /// Why it was refused or rolled back; the phase while upgrading; empty otherwise.
    #[serde(default)]
    pub reason: String,
    pub updated_unix_ms: u64,
    /// Relays: the rollout this state belongs to, the id of every command sent for it (so the
    /// relay tells a re-sent command from a new rollout of a version it rolled back).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rollout_id: String,
}

/// Why an upgrade operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradesError {
    #[error("{0}")]
    Conflict(String),
    #[error("cannot store the package: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("upgrade entry {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// Packages and agents' upgrade states; share as `Arc<Upgrades>`.
pub struct Upgrades {
    journal: JournalHandle,
    /// `DATA/upgrades/sha256`.
    blobs: PathBuf,
    /// `DATA/upgrades/tmp`: uploads in progress.
    tmp: PathBuf,
    /// Largest package.
    max_bytes: u64,
    /// (Component, version) → package; mirrors the journal.
    packages: RwLock<BTreeMap<(Component, Version), Package>>,
    /// Agent id → its latest upgrade; mirrors the journal.
    agents: RwLock<HashMap<String, AgentUpgrade>>,
    /// Relay id → its latest upgrade; mirrors the journal.
    relays: RwLock<HashMap<String, AgentUpgrade>>,
    /// Serializes publications (check, rename, commit as one step).
    publish: tokio::sync::Mutex<()>,
    /// When the packages were last read again for an unknown download (see
    /// [`Upgrades::reload_packages_for_unknown`]).
    reloaded: std::sync::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for Upgrades {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrades")
            .field("blobs", &self.blobs)
            .field("packages", &read(&self.packages).len())
            .finish_non_exhaustive()
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T, UpgradesError> {
    serde_json::from_slice(value).map_err(|e| UpgradesError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

impl Upgrades {
    /// Opens (creating) `DATA/upgrades`, sweeps abandoned uploads and loads the index and the
    /// agents' states. Blocking: call before the system starts serving.
    pub fn open(journal: JournalHandle, data_dir: &Path) -> Result<Upgrades, UpgradesError> {
        let root = data_dir.join("upgrades");
        let blobs = root.join("sha256");
        let tmp = root.join("tmp");
        for dir in [&blobs, &tmp] {
            std::fs::create_dir_all(dir)?;
        }
        for entry in std::fs::read_dir(&tmp)?.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        let packages = read_packages(&journal)?;
        let mut agents = HashMap::new();
        for (key, value) in journal.scan_meta(AGENT_PREFIX)? {
            let u: AgentUpgrade = decode(&key, &value)?;
            let id = key.get(AGENT_PREFIX.len()..).unwrap_or_default().to_owned();
            agents.insert(id, u);
        }
        let mut relays = HashMap::new();
        for (key, value) in journal.scan_meta(RELAY_PREFIX)? {
            let u: AgentUpgrade = decode(&key, &value)?;
            let id = key.get(RELAY_PREFIX.len()..).unwrap_or_default().to_owned();
            relays.insert(id, u);
        }
        let max_bytes = std::env::var(MAX_BYTES_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(DEFAULT_MAX_BYTES);
        tracing::info!(
            packages = packages.len(),
            agents = agents.len(),
            max_bytes,
            "upgrades-loaded"
        );
        Ok(Upgrades {
            journal,
            blobs,
            tmp,
            max_bytes,
            packages: RwLock::new(packages),
            reloaded: std::sync::Mutex::new(None),
            agents: RwLock::new(agents),
            relays: RwLock::new(relays),
            publish: tokio::sync::Mutex::new(()),
        })
    }

    /// Every agent package, oldest version first.
    pub fn packages(&self) -> Vec<Package> {
        self.all_packages()
            .into_iter()
            .filter(|p| p.component == Component::Agent)
            .collect()
    }

    /// Every package of both components: agent packages first, oldest version first.
    pub fn all_packages(&self) -> Vec<Package> {
        read(&self.packages).values().cloned().collect()
    }

    /// The agent package published as `version`.
    pub fn package(&self, version: &str) -> Option<Package> {
        self.component_package(Component::Agent, version)
    }

    /// The `component` package published as `version`.
    pub fn component_package(&self, component: Component, version: &str) -> Option<Package> {
        let v = Version::parse(version).ok()?;
        read(&self.packages).get(&(component, v)).cloned()
    }

    /// Whether a published package has this content (only those are served to agents).
    /// Reads the packages again (on a member node: the active node uploads them); blocking.
    pub fn reload_packages(&self) -> Result<(), UpgradesError> {
        let packages = read_packages(&self.journal)?;
        *write(&self.packages) = packages;
        Ok(())
    }

    /// [`Self::reload_packages`] for a download of a package not known here, unless one such
    /// read was done less than a second ago (peers cannot make this node read more often);
    /// blocking.
    pub fn reload_packages_for_unknown(&self) -> Result<(), UpgradesError> {
        {
            let mut last = self
                .reloaded
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(1)) {
                return Ok(());
            }
            *last = Some(std::time::Instant::now());
        }
        self.reload_packages()
    }

    pub fn has_blob(&self, sha256: &str) -> bool {
        read(&self.packages).values().any(|p| p.sha256 == sha256)
    }

    /// Where blob `sha256` is (whether or not it exists).
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.blobs.join(sha256)
    }

    /// `agent_id`'s latest upgrade.
    pub fn agent(&self, agent_id: &AgentId) -> Option<AgentUpgrade> {
        read(&self.agents).get(agent_id.as_str()).cloned()
    }

    /// The op recording `upgrade` as `agent_id`'s state (commit it, then [`Self::set_agent`]).
    pub fn agent_op(agent_id: &AgentId, upgrade: &AgentUpgrade) -> Op {
        Op::PutMeta {
            key: format!("{AGENT_PREFIX}{agent_id}"),
            value: serde_json::to_vec(upgrade).unwrap_or_default(),
        }
    }

    /// Records `upgrade` in memory (once its op is durable).
    pub fn set_agent(&self, agent_id: &AgentId, upgrade: AgentUpgrade) {
        write(&self.agents).insert(agent_id.to_string(), upgrade);
    }

    /// `relay_id`'s latest upgrade.
    pub fn relay(&self, relay_id: &str) -> Option<AgentUpgrade> {
        read(&self.relays).get(relay_id).cloned()
    }

    /// The op recording `upgrade` as `relay_id`'s state (commit it, then [`Self::set_relay`]).
    pub fn relay_op(relay_id: &str, upgrade: &AgentUpgrade) -> Op {
        Op::PutMeta {
            key: format!("{RELAY_PREFIX}{relay_id}"),
            value: serde_json::to_vec(upgrade).unwrap_or_default(),
        }
    }

    /// Records `upgrade` as `relay_id`'s state in memory (once its op is durable).
    pub fn set_relay(&self, relay_id: &str, upgrade: AgentUpgrade) {
        write(&self.relays).insert(relay_id.to_owned(), upgrade);
    }

    /// An upgrade event from relay `relay_id`: the op to commit (memory changes now). `None`
    /// for other events, for another version than the relay's current record, and for a
    /// report of the state already recorded (relays report their outcome at every connect).
    pub fn on_relay_event(&self, relay_id: &str, body: &EventBody) -> Option<Op> {
        let (version, state, reason) = transition(body)?;
        let mut relays = write(&self.relays);
        let Some(current) = relays.get(relay_id) else {
            tracing::warn!(relay_id = %relay_id, version = %version, "relay-upgrade-event-without-rollout");
            return None;
        };
        if current.version != version {
            // Relays report their last outcome at every connect: an older one is expected.
            tracing::debug!(relay_id = %relay_id, version = %version, current = %current.version, "upgrade-event-for-another-version");
            return None;
        }
        if current.state == state && current.reason == reason {
            return None;
        }
        if !current.state.in_progress() && state == UpgradeState::Upgrading {
            // A late or repeated progress report never reopens a settled upgrade.
            return None;
        }
        match state {
            UpgradeState::Refused | UpgradeState::RolledBack => {
                tracing::warn!(relay_id = %relay_id, version = %version, state = ?state, reason = %reason, "relay-upgrade-failed")
            }
            _ => {
                tracing::info!(relay_id = %relay_id, version = %version, state = ?state, reason = %reason, "relay-upgrade-progress")
            }
        }
        let upgrade = AgentUpgrade {
            state,
            version: version.to_owned(),
            reason: reason.to_owned(),
            updated_unix_ms: now_unix_ms(),
            rollout_id: current.rollout_id.clone(),
        };
        let op = Self::relay_op(relay_id, &upgrade);
        relays.insert(relay_id.to_owned(), upgrade);
        Some(op)
    }

    /// An upgrade event from `agent_id`: the state change, as the op to commit in the event's
    /// batch (memory changes now, as for job events). `None` for other events, and for events
    /// about another version than the agent's current record.
    pub fn on_event(&self, agent_id: &AgentId, body: &EventBody) -> Option<Op> {
        let (version, state, reason) = match body {
            EventBody::UpgradeStarted { version } => {
                (version, UpgradeState::Upgrading, "draining running steps")
            }
            EventBody::UpgradeStaged { version } => (
                version,
                UpgradeState::Upgrading,
                "staged; the monitor swaps the binary",
            ),
            EventBody::UpgradeRefused { version, reason } => {
                (version, UpgradeState::Refused, reason.as_str())
            }
            EventBody::UpgradeFinished {
                version,
                outcome,
                reason,
            } => match outcome {
                UpgradeOutcome::Done => (version, UpgradeState::Done, reason.as_str()),
                UpgradeOutcome::RolledBack => (version, UpgradeState::RolledBack, reason.as_str()),
            },
            _ => return None,
        };
        let mut agents = write(&self.agents);
        if let Some(current) = agents
            .get(agent_id.as_str())
            .filter(|c| &c.version != version)
        {
            tracing::warn!(agent_id = %agent_id, version = %version, current = %current.version, "upgrade-event-for-another-version");
            return None;
        }
        match state {
            UpgradeState::Refused | UpgradeState::RolledBack => {
                tracing::warn!(agent_id = %agent_id, version = %version, state = ?state, reason = %reason, "agent-upgrade-failed")
            }
            _ => {
                tracing::info!(agent_id = %agent_id, version = %version, state = ?state, reason = %reason, "agent-upgrade-progress")
            }
        }
        let upgrade = AgentUpgrade {
            state,
            version: version.clone(),
            reason: reason.to_owned(),
            updated_unix_ms: now_unix_ms(),
            rollout_id: String::new(),
        };
        let op = Self::agent_op(agent_id, &upgrade);
        agents.insert(agent_id.to_string(), upgrade);
        Some(op)
    }

    /// Publishes the complete `upload` as `version`, signed with `sign`. `Ok((package,
    /// true))`: newly published; `Ok((package, false))`: the same content was there already
    /// under this version.
    pub async fn publish(
        &self,
        component: Component,
        version: Version,
        upload: Upload,
        sign: impl FnOnce(&[u8]) -> String,
    ) -> Result<(Package, bool), UpgradesError> {
        let Upload {
            tmp,
            sha256,
            size,
            arch,
        } = upload;
        let _guard = self.publish.lock().await;
        if let Some(existing) = read(&self.packages).get(&(component, version)).cloned() {
            let _ = std::fs::remove_file(&tmp);
            return if existing.sha256 == sha256 {
                Ok((existing, false))
            } else {
                Err(UpgradesError::Conflict(format!(
                    "{component} upgrade {version} exists with other content (sha256 {}); publish it under a new version",
                    existing.sha256
                )))
            };
        }
        let target = self.blob_path(&sha256);
        let blobs = self.blobs.clone();
        let placed = actix_web::web::block(move || -> std::io::Result<()> {
            if target.is_file() {
                std::fs::remove_file(&tmp)
            } else {
                std::fs::rename(&tmp, &target)?;
                std::fs::File::open(&blobs)?.sync_all()
            }
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        placed?;
        let text = version.to_string();
        let signature = sign(&tether_shared::upgrade::component_signing_bytes(
            component, &text, &sha256,
        ));
        let package = Package {
            version: text,
            sha256,
            size,
            signature,
            uploaded_unix_ms: now_unix_ms(),
            component,
            arch,
        };
        let value = serde_json::to_vec(&package).map_err(std::io::Error::other)?;
        self.journal
            .commit(vec![Op::PutMeta {
                key: package.meta_key(),
                value,
            }])
            .await?;
        write(&self.packages).insert((component, version), package.clone());
        Ok((package, true))
    }

    /// Where uploads stream to.
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Largest package accepted.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }
}

/// The (version, state, reason) an upgrade event moves to; `None` for other events.
fn transition(body: &EventBody) -> Option<(&str, UpgradeState, &str)> {
    Some(match body {
        EventBody::UpgradeStarted { version } => (
            version,
            UpgradeState::Upgrading,
            "downloading and verifying",
        ),
        EventBody::UpgradeStaged { version } => (version, UpgradeState::Upgrading, "staged"),
        EventBody::UpgradeRefused { version, reason } => (version, UpgradeState::Refused, reason),
        EventBody::UpgradeFinished {
            version,
            outcome,
            reason,
        } => match outcome {
            UpgradeOutcome::Done => (version, UpgradeState::Done, reason),
            UpgradeOutcome::RolledBack => (version, UpgradeState::RolledBack, reason),
        },
        _ => return None,
    })
}

/// Every package the journal records, by component and version.
fn read_packages(
    journal: &JournalHandle,
) -> Result<BTreeMap<(Component, Version), Package>, UpgradesError> {
    let mut packages = BTreeMap::new();
    for (key, value) in journal.scan_meta(PACKAGE_PREFIX)? {
        let p: Package = decode(&key, &value)?;
        let v = Version::parse(&p.version).map_err(|e| UpgradesError::Corrupt {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        packages.insert((p.component, v), p);
    }
    Ok(packages)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use tether_shared::journal::{Journal, JournalOptions};

    #[actix::test]
    async fn events_move_the_state_of_the_latest_version_only_and_survive_a_reload() {
        let tmp = tempfile::tempdir().unwrap();
        let (journal, _) =
            Journal::open(&tmp.path().join("j"), &JournalOptions::default()).unwrap();
        let handle = journal.handle();
        let up = Upgrades::open(handle.clone(), tmp.path()).unwrap();
        let requested = AgentUpgrade {
            state: UpgradeState::Requested,
            version: "2.0.0".into(),
            reason: String::new(),
            updated_unix_ms: 1,
            rollout_id: String::new(),
        };
        handle
            .commit(vec![Upgrades::agent_op(&AgentId::from("a-1"), &requested)])
            .await
            .unwrap();
        up.set_agent(&AgentId::from("a-1"), requested);
        let started = EventBody::UpgradeStarted {
            version: "2.0.0".into(),
        };
        let op = up.on_event(&AgentId::from("a-1"), &started).unwrap();
        assert_eq!(
            up.agent(&AgentId::from("a-1")).unwrap().state,
            UpgradeState::Upgrading
        );
        let stale = EventBody::UpgradeRefused {
            version: "1.9.0".into(),
            reason: "x".into(),
        };
        assert!(up.on_event(&AgentId::from("a-1"), &stale).is_none());
        let finished = EventBody::UpgradeFinished {
            version: "2.0.0".into(),
            outcome: UpgradeOutcome::RolledBack,
            reason: "exited with code 3".into(),
        };
        let op2 = up.on_event(&AgentId::from("a-1"), &finished).unwrap();
        handle.commit(vec![op, op2]).await.unwrap();
        let again = Upgrades::open(handle, tmp.path()).unwrap();
        drop(journal);
        let u = again.agent(&AgentId::from("a-1")).unwrap();
        assert_eq!(u.state, UpgradeState::RolledBack);
        assert_eq!(u.reason, "exited with code 3");
        assert!(up
            .on_event(
                &AgentId::from("a-1"),
                &EventBody::JobAccepted { job_id: "j".into() }
            )
            .is_none());
    }

    #[actix::test]
    async fn relay_packages_are_their_own_and_relay_reports_move_only_their_rollout() {
        let tmp = tempfile::tempdir().unwrap();
        let (journal, _) =
            Journal::open(&tmp.path().join("j"), &JournalOptions::default()).unwrap();
        let handle = journal.handle();
        let up = Upgrades::open(handle.clone(), tmp.path()).unwrap();
        let server = tether_shared::identity::Identity::generate();
        let sha = "ab".repeat(32);
        for component in [Component::Agent, Component::Relay] {
            let file = up.tmp_dir().join(format!("upload-{component}"));
            std::fs::write(&file, b"bin").unwrap();
            let (p, created) = up
                .publish(
                    component,
                    Version::parse("2.0.0").unwrap(),
                    Upload {
                        tmp: file,
                        sha256: sha.clone(),
                        size: 3,
                        arch: None,
                    },
                    |b| server.sign(b),
                )
                .await
                .unwrap();
            assert!(created);
            assert_eq!(p.component, component);
        }
        assert_eq!(up.packages().len(), 1, "agent packages only");
        assert_eq!(up.all_packages().len(), 2);
        let relay = up.component_package(Component::Relay, "2.0.0").unwrap();
        let key = server.public_key();
        assert!(tether_shared::upgrade::verify_component_package(
            &key,
            Component::Relay,
            "2.0.0",
            &sha,
            &relay.signature
        )
        .is_ok());
        assert!(
            tether_shared::upgrade::verify_package(&key, "2.0.0", &sha, &relay.signature).is_err()
        );

        let started = EventBody::UpgradeStarted {
            version: "2.0.0".into(),
        };
        assert!(up.on_relay_event("r-1", &started).is_none(), "no rollout");
        let requested = AgentUpgrade {
            state: UpgradeState::Requested,
            version: "2.0.0".into(),
            reason: String::new(),
            updated_unix_ms: 1,
            rollout_id: "rollout-1".into(),
        };
        handle
            .commit(vec![Upgrades::relay_op("r-1", &requested)])
            .await
            .unwrap();
        up.set_relay("r-1", requested);
        let op = up.on_relay_event("r-1", &started).unwrap();
        assert!(up.on_relay_event("r-1", &started).is_none(), "a repeat");
        let done = EventBody::UpgradeFinished {
            version: "2.0.0".into(),
            outcome: UpgradeOutcome::Done,
            reason: String::new(),
        };
        let op2 = up.on_relay_event("r-1", &done).unwrap();
        assert!(up.on_relay_event("r-1", &started).is_none(), "settled");
        assert!(up.on_relay_event("r-1", &done).is_none(), "reported again");
        let other = EventBody::UpgradeFinished {
            version: "1.0.0".into(),
            outcome: UpgradeOutcome::RolledBack,
            reason: "x".into(),
        };
        assert!(up.on_relay_event("r-1", &other).is_none());
        handle.commit(vec![op, op2]).await.unwrap();
        let again = Upgrades::open(handle, tmp.path()).unwrap();
        drop(journal);
        let r = again.relay("r-1").unwrap();
        assert_eq!(r.state, UpgradeState::Done);
        assert_eq!(r.rollout_id, "rollout-1");
        assert_eq!(again.all_packages().len(), 2);
        assert!(again.agent(&AgentId::from("r-1")).is_none());
    }
}
