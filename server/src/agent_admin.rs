//! [`AgentAdmin`]: the rules for changing and deleting agents and relays, shared by the REST
//! API (`agents_api`) and the web application.

use std::collections::BTreeMap;
use std::sync::Arc;
use tether_shared::ids::AgentId;

use actix::Addr;
use serde::Deserialize;

use crate::api_error::ApiError;
use crate::deployments::Deployments;
use crate::registry::{AgentChanges, AgentRecord, AgentView, Registry, RegistryError, Role};
use crate::session::relay_session::revoke_relay;
use crate::session::session_registry::{DisconnectAgent, SessionRegistry};
use crate::session::SessionShared;
use crate::upgrades::{UpgradeState, Upgrades};
use serde_json::Value;

/// The body of `PATCH /api/v1/agents/{id}`: what to replace.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentPatch {
    pub tags: Option<Vec<String>>,
    pub properties: Option<BTreeMap<String, String>>,
    /// `true`: no new job starts there; `false`: back to work.
    pub maintenance: Option<bool>,
    /// Why (with `maintenance: true`).
    pub maintenance_reason: Option<String>,
    /// Jobs it runs at once; 0: the server's default.
    pub max_running_jobs: Option<u32>,
}

/// `"maintenance"` and `"maintenance_reason"` of a patch (agent or relay) as a change:
/// `Some(Some(reason))` starts it, `Some(None)` ends it, `None` leaves it.
pub fn maintenance_change(
    on: Option<bool>,
    reason: Option<String>,
) -> Result<Option<Option<String>>, AgentsError> {
    match (on, reason) {
        (Some(true), reason) => Ok(Some(Some(reason.unwrap_or_default()))),
        (Some(false), None) => Ok(Some(None)),
        (_, Some(_)) => Err(AgentsError::Invalid(
            "\"maintenance_reason\" goes with \"maintenance\": true".into(),
        )),
        (None, None) => Ok(None),
    }
}

/// Why a change to an agent was refused.
#[derive(Debug, thiserror::Error)]
pub enum AgentsError {
    #[error("no such agent")]
    NotFound,
    #[error("no such relay")]
    RelayNotFound,
    /// A field breaks a rule; the message says which.
    #[error("{0}")]
    Invalid(String),
    /// The agent has unfinished jobs (delete).
    #[error("{0}")]
    Busy(String),
    /// The journal refused the change; nothing changed (logged).
    #[error("storage unavailable, nothing was changed; retry later")]
    Unavailable,
}

impl From<RegistryError> for AgentsError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(reason) => AgentsError::Invalid(reason),
            other => {
                tracing::error!(error = %other, "agent-change-failed");
                AgentsError::Unavailable
            }
        }
    }
}

impl From<AgentsError> for ApiError {
    fn from(e: AgentsError) -> Self {
        match e {
            AgentsError::NotFound | AgentsError::RelayNotFound => ApiError::NotFound,
            AgentsError::Invalid(reason) => ApiError::BadRequest(reason),
            AgentsError::Busy(reason) => ApiError::Conflict(reason),
            AgentsError::Unavailable => ApiError::Unavailable,
        }
    }
}

/// The rules for changing agents; share as `Arc<AgentAdmin>`.
pub struct AgentAdmin {
    pub registry: Arc<Registry>,
    pub deployments: Arc<Deployments>,
    pub upgrades: Arc<Upgrades>,
    /// To close a deleted agent's session.
    pub sessions: Addr<SessionRegistry>,
    /// Relays' links, to close a deleted relay's.
    pub shared: Arc<SessionShared>,
}

impl AgentAdmin {
    /// The agent (not relay) with this id or name.
    pub fn resolve(&self, id_or_name: &str) -> Option<AgentRecord> {
        self.registry.resolve_agent(id_or_name)
    }

    /// The relay with this id or name.
    pub fn resolve_relay(&self, id_or_name: &str) -> Option<AgentRecord> {
        self.registry
            .agent(id_or_name)
            .filter(|a| a.role == Role::Relay)
            .or_else(|| {
                self.registry
                    .relay_statuses(self.shared.presence.as_ref())
                    .into_iter()
                    .find(|r| r.name == id_or_name)
                    .and_then(|r| self.registry.agent(&r.id))
            })
    }

    /// Deletes the relay `id_or_name` (committed first), then closes its link and every
    /// channel that runs through it. Answers the record and how many links and channels were
    /// closed.
    pub async fn delete_relay(
        &self,
        id_or_name: &str,
    ) -> Result<(AgentRecord, usize), AgentsError> {
        let relay = self
            .resolve_relay(id_or_name)
            .ok_or(AgentsError::RelayNotFound)?;
        let deleted = self
            .registry
            .delete_relay(&relay.id)
            .await?
            .ok_or(AgentsError::RelayNotFound)?;
        let closed = revoke_relay(&self.shared, &deleted.id.as_str().into()).await;
        self.shared.presence.forget(&deleted.id);
        self.forget_claim(&deleted.id).await;
        tracing::warn!(relay_id = %deleted.id, name = %deleted.name, closed, "relay-deleted");
        Ok((deleted, closed))
    }

    /// Puts relay `id_or_name` in maintenance (`Some(reason)`) or ends it (`None`).
    pub async fn set_relay_maintenance(
        &self,
        id_or_name: &str,
        maintenance: Option<String>,
    ) -> Result<AgentRecord, AgentsError> {
        let relay = self
            .resolve_relay(id_or_name)
            .ok_or(AgentsError::RelayNotFound)?;
        self.registry
            .set_relay_maintenance(&relay.id, maintenance)
            .await?
            .ok_or(AgentsError::RelayNotFound)
    }

    /// One agent's line as `GET /api/v1/agents` shows it, with its latest upgrade.
    pub fn status(&self, id: &str) -> Option<AgentView> {
        self.registry
            .agent_status(id, self.shared.presence.as_ref())
    }

    /// The JSON of `status` with the agent's upgrade (as `GET /api/v1/agents` shows it).
    pub fn status_json(&self, status: &AgentView) -> Value {
        let upgrade = self.upgrades.agent(&status.id);
        let mut v = serde_json::to_value(status).unwrap_or_default();
        if upgrade
            .as_ref()
            .is_some_and(|u| u.state == UpgradeState::Upgrading)
        {
            v["status"] = "upgrading".into();
        }
        v["upgrade"] = serde_json::to_value(&upgrade).unwrap_or_default();
        v
    }

    /// Applies `patch` to the agent `id_or_name`.
    pub async fn update(
        &self,
        id_or_name: &str,
        patch: AgentPatch,
    ) -> Result<AgentRecord, AgentsError> {
        if patch.tags.is_none()
            && patch.properties.is_none()
            && patch.maintenance.is_none()
            && patch.max_running_jobs.is_none()
        {
            return Err(AgentsError::Invalid(
                "nothing to change: give \"tags\", \"properties\", \"maintenance\" and/or \"max_running_jobs\"".into(),
            ));
        }
        let maintenance = maintenance_change(patch.maintenance, patch.maintenance_reason)?;
        let agent = self.resolve(id_or_name).ok_or(AgentsError::NotFound)?;
        let changes = AgentChanges {
            tags: patch.tags,
            properties: patch.properties,
            maintenance,
            max_running_jobs: patch.max_running_jobs,
        };
        self.registry
            .update_agent(&agent.id, changes)
            .await?
            .ok_or(AgentsError::NotFound)
    }

    /// Unfinished jobs of agent `id` (queued or running).
    pub fn unfinished_jobs(&self, id: &AgentId) -> usize {
        self.deployments.with_state(|s| s.unfinished(id).count())
    }

    /// Deletes the agent `id_or_name`; while it has unfinished jobs, refuses, or with `force`
    /// fails them first. Answers the record and how many jobs were failed.
    pub async fn delete(
        &self,
        id_or_name: &str,
        force: bool,
    ) -> Result<(AgentRecord, usize), AgentsError> {
        let agent = self.resolve(id_or_name).ok_or(AgentsError::NotFound)?;
        let unfinished = self.unfinished_jobs(&agent.id);
        if unfinished > 0 && !force {
            return Err(AgentsError::Busy(format!(
                "agent {} has {unfinished} unfinished job(s); cancel its deployments first, or force the delete to fail them",
                agent.name
            )));
        }
        let failed = self
            .deployments
            .fail_agent_jobs(&agent.id, "agent deleted")
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "agent-jobs-fail-failed");
                AgentsError::Unavailable
            })?;
        let deleted = self
            .registry
            .delete_agent(&agent.id)
            .await?
            .ok_or(AgentsError::NotFound)?;
        // Best effort: the identity check refuses its next handshake anyway.
        let _ = self
            .sessions
            .send(DisconnectAgent {
                agent_id: deleted.id.as_str().into(),
                reason: "agent deleted".into(),
            })
            .await;
        self.shared.presence.forget(&deleted.id);
        self.forget_claim(&deleted.id).await;
        Ok((deleted, failed))
    }

    /// On a cluster: the claim on deleted agent or relay `id`, and what waited for it in its
    /// inbox and mailbox, go with it.
    async fn forget_claim(&self, id: &str) {
        let Some(claims) = &self.shared.claims else {
            return;
        };
        let id: tether_shared::ids::AgentId = id.into();
        if let Err(e) = claims.forget(&id).await {
            // Left behind: a row, and no way back in for the deleted one anyway.
            tracing::warn!(agent_id = %id, error = %e, "agent-claim-not-forgotten");
        }
        crate::mail::purge(&self.shared.journal, &id).await;
    }
}
