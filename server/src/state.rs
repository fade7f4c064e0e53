//! [`AppState`]: the one application state every route of both listeners reads, built once at
//! start by [`crate::app::build`]. Each area mounts its own routes (`configure` in its module);
//! what they share is here, and nothing here knows a route.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use actix::Addr;

use crate::admin_token::AdminToken;
use crate::agent_admin::AgentAdmin;
use crate::artifacts::ArtifactStore;
use crate::deployments::{Deployments, Retention};
use crate::enroll_limiter::EnrollLimiter;
use crate::health::JournalWatch;
use crate::plugins::Plugins;
use crate::registry::Registry;
use crate::relay_certs::RelayCerts;
use crate::scheduler::Scheduler;
use crate::session::session_registry::SessionRegistry;
use crate::session::{Peers, SessionShared};
use crate::trust::Trust;
use crate::upgrades::Upgrades;
use crate::users::Users;
use crate::web::login_limiter::LoginLimiter;
use crate::web::session::SessionStore;

pub struct AppState {
    /// Required on every REST and admin request.
    pub token: AdminToken,
    /// Enrolled agents and relays, enrollment tokens.
    pub registry: Arc<Registry>,
    /// Who is connected now.
    pub presence: Arc<Peers>,
    /// Processes, deployments and jobs.
    pub deployments: Arc<Deployments>,
    /// How long finished deployments are kept.
    pub retention: Retention,
    /// Starts and cancels deployments, queues upgrades.
    pub scheduler: Arc<Scheduler>,
    /// Uploaded plugins.
    pub plugins: Arc<Plugins>,
    /// Upgrade packages and upgrade states.
    pub upgrades: Arc<Upgrades>,
    /// What sessions and links share.
    pub shared: Arc<SessionShared>,
    /// Agents' links.
    pub session_registry: Addr<SessionRegistry>,
    /// Agent changes (tags, properties, delete), for the REST API and the web application.
    pub agent_admin: Arc<AgentAdmin>,
    /// The web application's users, their login sessions, and failed logins.
    pub users: Arc<Users>,
    /// Every change requested on the operators' listener.
    pub audit: Arc<crate::audit::Audit>,
    /// The users' API tokens (also checked by `token`).
    pub api_tokens: Arc<crate::api_tokens::ApiTokens>,
    pub web_sessions: SessionStore,
    pub login_limiter: LoginLimiter,
    /// Failed enrollments per source.
    pub enroll_limiter: EnrollLimiter,
    /// On a member: the enrollments it forwards to the active node.
    pub forwarded_enrollments: crate::member_enroll::Forwarder,
    /// The signing key and the CAs in force, and a rollover's progress.
    pub trust: Arc<Trust>,
    /// Relays' certificates, from the relay CA.
    pub relay_certs: Arc<RelayCerts>,
    /// `DIR/server.pem` as served now: no relay is certified for a name it covers.
    pub server_cert_pem: Arc<RwLock<String>>,
    /// The journal's liveness and counters, for health.
    pub journal: JournalWatch,
    /// The data directory (its certificates' expiry is reported).
    pub data_dir: PathBuf,
    /// The artifact store (content-addressed files and their index).
    pub artifacts: actix_web::web::Data<ArtifactStore>,
    /// This node's place in a cluster on PostgreSQL (`None` on sled).
    pub cluster: Option<crate::health::ClusterHealth>,
    /// On PostgreSQL: this node's way out to a standby (`POST /admin/drain`).
    pub drain: Option<crate::drain::Drain>,
}

impl crate::audit::Recorder for AppState {
    fn bearer_holder(&self, presented: &[u8]) -> Option<String> {
        self.token.holder(presented)
    }

    fn session_user(&self, token: &str) -> Option<String> {
        self.web_sessions.lookup(token).map(|u| u.name)
    }

    fn audit(&self) -> &crate::audit::Audit {
        &self.audit
    }
}

impl AppState {
    /// Remote operations on agents and their answers (`crate::operations`).
    pub fn operations(&self) -> &Arc<crate::operations::Operations> {
        self.shared.work.operations()
    }
}
