//! The server's application: every area's state, built once from what `run` loaded, and the
//! two listeners' route tables, each area mounting its own routes: the operators' HTTPS
//! listener (REST, admin, web application) and the agent-facing one (enrollment, sessions,
//! bulk downloads). `run` only loads, binds and stops.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::{Actor, Addr};
use actix_web::web;
use tether_shared::journal::Journal;
use tether_shared::tls::ReloadableCert;

use crate::admin::{self, AdminState};
use crate::admin_token::AdminToken;
use crate::agent_surface::{self, AgentSurface, EnrollLimiter};
use crate::agents_api::{self, AgentAdmin, AgentsApiState};
use crate::api::{self, ApiState};
use crate::api_error::ApiError;
use crate::artifacts::ArtifactStore;
use crate::deployments::api::{self as deployments_api, DeploymentsApiState};
use crate::deployments::{Deployments, Retention};
use crate::health::JournalWatch;
use crate::init;
use crate::plugins::api::{self as plugins_api, PluginsAgentState, PluginsApiState};
use crate::plugins::Plugins;
use crate::registry::Registry;
use crate::relay_certs::RelayCerts;
use crate::scheduler::Scheduler;
use crate::session::routes::{ProbeApiState, SessionsState};
use crate::session::session_registry::SessionRegistry;
use crate::session::{self, SessionShared};
use crate::trust::Trust;
use crate::upgrades::api::{self as upgrades_api, UpgradesAgentState, UpgradesApiState};
use crate::upgrades::Upgrades;
use crate::users::{Users, UsersError};
use crate::web::WebState;
use crate::work::Work;

/// Largest JSON request body (REST); bulk transfers stream instead.
const JSON_LIMIT_BYTES: usize = 1024 * 1024;
/// Largest buffered request body of any other kind.
const PAYLOAD_LIMIT_BYTES: usize = 1024 * 1024;
/// Time an agent has to answer the challenge.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Commands held per agent before new ones are refused (the agent is not acknowledging).
const MAX_RETAINED_COMMANDS: usize = 100_000;
/// Unacknowledged commands are resent after this long without progress.
const RETRANSMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything `run` reads from the data directory before the actix system starts.
pub struct Loaded {
    /// Guards the REST API and the admin endpoints.
    pub token: AdminToken,
    /// Presented by both listeners, replaced when `DIR/server.pem` changes.
    pub tls: Arc<ReloadableCert>,
    /// Relays' certificates, from the relay CA: at enrollment and renewed over their links.
    pub relay_certs: Arc<RelayCerts>,
    /// `DIR/server.pem`: no relay is certified for a name it covers.
    pub server_cert_pem: Arc<RwLock<String>>,
    /// The command-signing key, the relay CA and what agents and relays trust (rollover).
    pub trust: Arc<Trust>,
    /// The opened journal, not yet started as an actor.
    pub journal: Journal,
    /// Agents, relays and enrollment tokens, loaded from the journal.
    pub registry: Arc<Registry>,
    /// Processes, deployments and jobs, loaded from the journal.
    pub deployments: Arc<Deployments>,
    /// Uploaded plugins: the index from the journal, bundles in `DIR/plugins`.
    pub plugins: Arc<Plugins>,
    /// The artifact store (content-addressed files and their index).
    pub artifacts: web::Data<crate::artifacts::ArtifactStore>,
    /// Upgrade packages (`DIR/upgrades`) and agents' upgrade states.
    pub upgrades: Arc<Upgrades>,
    /// The web application's users, loaded from the journal.
    pub users: Arc<Users>,
}

/// How agents' sessions behave (from the configuration).
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub max_handshakes: usize,
    pub window: u64,
    pub retention: Retention,
}

/// The operators' listener: its states and routes.
#[derive(Clone)]
pub struct Operators {
    bearer: web::Data<AdminToken>,
    admin: web::Data<AdminState>,
    api: web::Data<ApiState>,
    probe: web::Data<ProbeApiState>,
    deployments: web::Data<DeploymentsApiState>,
    plugins: web::Data<PluginsApiState>,
    upgrades: web::Data<UpgradesApiState>,
    agents: web::Data<AgentsApiState>,
    web: web::Data<WebState>,
    trust: web::Data<crate::trust::api::TrustApiState>,
    artifacts: web::Data<ArtifactStore>,
}

/// The agent-facing listener: its states and routes.
#[derive(Clone)]
pub struct Agents {
    surface: web::Data<AgentSurface>,
    sessions: web::Data<SessionsState>,
    plugins: web::Data<PluginsAgentState>,
    deployments: web::Data<Deployments>,
    upgrades: web::Data<UpgradesAgentState>,
    artifacts: web::Data<ArtifactStore>,
}

/// Everything `run` serves, and what it closes at a stop.
pub struct Built {
    pub operators: Operators,
    pub agents: Agents,
    pub shared: Arc<SessionShared>,
    pub sessions: Addr<SessionRegistry>,
}

/// Starts the journal, the session registry and the scheduler, and builds every area's state.
pub async fn build(dir: &Path, tuning: Tuning, loaded: Loaded) -> Result<Built, UsersError> {
    let handle = loaded.journal.handle();
    let presence: Arc<crate::session::Peers> = Default::default();
    let shared = Arc::new(SessionShared {
        journal: handle.clone(),
        registry: loaded.registry.clone(),
        work: Arc::new(Work::new(
            loaded.deployments.clone(),
            loaded.upgrades.clone(),
        )),
        upgrades: loaded.upgrades.clone(),
        trust: loaded.trust.clone(),
        incarnation: handle.incarnation().to_owned(),
        heartbeat_interval: tuning.heartbeat_interval,
        heartbeat_timeout: tuning.heartbeat_timeout,
        handshake_timeout: HANDSHAKE_TIMEOUT,
        handshakes: AtomicUsize::new(0),
        max_handshakes: tuning.max_handshakes,
        sources: session::source_slots::SourceSlots::new(tuning.max_handshakes),
        presence: presence.clone(),
        relay_certs: loaded.relay_certs.clone(),
        next_conn: AtomicU64::new(0),
        window: tuning.window,
        max_retained: MAX_RETAINED_COMMANDS,
        rto: RETRANSMIT_TIMEOUT,
    });
    let session_registry = SessionRegistry::new(shared.clone()).start();
    let scheduler = Arc::new(Scheduler {
        deployments: loaded.deployments.clone(),
        upgrades: loaded.upgrades.clone(),
        registry: loaded.registry.clone(),
        sessions: session_registry.clone(),
        trust: loaded.trust.clone(),
    });
    // Jobs journaled as queued but not yet sent (the server stopped first) go out now.
    let waking = scheduler.clone();
    actix_rt::spawn(async move { waking.dispatch_waiting().await });
    let deployments_state = web::Data::new(DeploymentsApiState {
        token: loaded.token.clone(),
        deployments: loaded.deployments.clone(),
        registry: loaded.registry.clone(),
        scheduler: scheduler.clone(),
        retention: tuning.retention,
    });
    let upgrades_state = web::Data::new(UpgradesApiState {
        token: loaded.token.clone(),
        upgrades: loaded.upgrades.clone(),
        registry: loaded.registry.clone(),
        scheduler: scheduler.clone(),
        shared: shared.clone(),
    });
    let upgrades_agent_state = web::Data::new(UpgradesAgentState {
        upgrades: loaded.upgrades.clone(),
        registry: loaded.registry.clone(),
    });
    let (closing_shared, closing_sessions) = (shared.clone(), session_registry.clone());
    let sessions = web::Data::new(SessionsState {
        shared,
        registry: session_registry,
    });
    let probe_state = web::Data::new(ProbeApiState {
        token: loaded.token.clone(),
        sessions: sessions.clone(),
    });
    let admin_state = web::Data::new(AdminState {
        token: loaded.token.clone(),
        journal: JournalWatch::new(loaded.journal.start(), handle),
        sessions: sessions.registry.clone(),
        shared: sessions.shared.clone(),
        deployments: loaded.deployments.clone(),
        data_dir: dir.to_path_buf(),
    });
    // The web application, and the agent changes it shares with the REST API.
    let agent_admin = Arc::new(AgentAdmin {
        registry: loaded.registry.clone(),
        deployments: loaded.deployments.clone(),
        upgrades: loaded.upgrades.clone(),
        sessions: sessions.registry.clone(),
        shared: sessions.shared.clone(),
    });
    let agents_api_state = web::Data::new(AgentsApiState {
        token: loaded.token.clone(),
        admin: agent_admin.clone(),
    });
    loaded
        .users
        .ensure_initial_admin(&dir.join(init::ADMIN_PASSWORD))
        .await?;
    let web_state = web::Data::new(WebState {
        users: loaded.users.clone(),
        sessions: Default::default(),
        login_limiter: Default::default(),
        registry: loaded.registry.clone(),
        deployments: loaded.deployments.clone(),
        scheduler,
        agents: agent_admin,
        upgrades: loaded.upgrades.clone(),
        plugins: loaded.plugins.clone(),
        artifacts: loaded.artifacts.clone(),
        admin: admin_state.clone(),
    });
    let plugins_state = web::Data::new(PluginsApiState {
        token: loaded.token.clone(),
        plugins: loaded.plugins.clone(),
    });
    let plugins_agent_state = web::Data::new(PluginsAgentState {
        plugins: loaded.plugins.clone(),
        registry: loaded.registry.clone(),
        deployments: loaded.deployments.clone(),
    });
    let deployments_wss = web::Data::from(loaded.deployments.clone());
    let api_state = web::Data::new(ApiState {
        token: loaded.token,
        registry: loaded.registry.clone(),
        upgrades: loaded.upgrades,
        presence,
    });
    let trust_state = web::Data::new(crate::trust::api::TrustApiState {
        token: api_state.token.clone(),
        trust: loaded.trust.clone(),
        registry: loaded.registry.clone(),
    });
    let surface_state = web::Data::new(AgentSurface {
        registry: loaded.registry,
        trust: loaded.trust.clone(),
        limiter: EnrollLimiter::default(),
        relay_certs: loaded.relay_certs.clone(),
        server_cert_pem: loaded.server_cert_pem.clone(),
    });
    Ok(Built {
        operators: Operators {
            bearer: web::Data::new(api_state.token.clone()),
            admin: admin_state,
            api: api_state,
            probe: probe_state,
            deployments: deployments_state,
            plugins: plugins_state,
            upgrades: upgrades_state,
            agents: agents_api_state,
            web: web_state,
            trust: trust_state,
            artifacts: loaded.artifacts.clone(),
        },
        agents: Agents {
            surface: surface_state,
            sessions,
            plugins: plugins_agent_state,
            deployments: deployments_wss,
            upgrades: upgrades_agent_state,
            artifacts: loaded.artifacts,
        },
        shared: closing_shared,
        sessions: closing_sessions,
    })
}

fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(JSON_LIMIT_BYTES)
        .error_handler(|err, _| ApiError::BadRequest(err.to_string()).into())
}

impl Operators {
    /// Every route of the operators' listener, each area's from its own module.
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        cfg.app_data(self.bearer.clone())
            .app_data(self.admin.clone())
            .app_data(self.api.clone())
            .app_data(json_config())
            .app_data(web::PayloadConfig::new(PAYLOAD_LIMIT_BYTES))
            .app_data(self.probe.clone())
            .app_data(self.deployments.clone())
            .app_data(self.plugins.clone())
            .app_data(self.upgrades.clone())
            .app_data(self.agents.clone())
            .app_data(self.web.clone())
            .app_data(self.trust.clone())
            .configure(admin::configure)
            .configure(api::configure)
            .configure(deployments_api::configure)
            .configure(crate::artifacts::configure_api(self.artifacts.clone()))
            .configure(plugins_api::configure_api)
            .configure(upgrades_api::configure_api)
            .configure(session::routes::configure_api)
            .configure(agents_api::configure)
            .configure(crate::trust::api::configure)
            .configure(crate::users_api::configure)
            .configure(crate::web::configure);
    }
}

impl Agents {
    /// Every route of the agent-facing listener.
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        cfg.app_data(self.surface.clone())
            .app_data(json_config())
            .app_data(web::PayloadConfig::new(PAYLOAD_LIMIT_BYTES))
            .app_data(self.sessions.clone())
            .app_data(self.plugins.clone())
            .app_data(self.deployments.clone())
            .app_data(self.upgrades.clone())
            .configure(agent_surface::configure)
            .configure(crate::artifacts::configure_agent(self.artifacts.clone()))
            .configure(plugins_api::configure_agent_surface)
            .configure(upgrades_api::configure_agent_surface)
            .configure(session::routes::configure_agent_surface);
    }
}
