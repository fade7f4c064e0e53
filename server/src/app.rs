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

use crate::admin;
use crate::admin_token::AdminToken;
use crate::agent_admin::AgentAdmin;
use crate::agent_surface;
use crate::agents_api;
use crate::api;
use crate::api_error::ApiError;
use crate::artifacts::ArtifactStore;
use crate::deployments::api as deployments_api;
use crate::deployments::{Deployments, Retention};
use crate::enroll_limiter::EnrollLimiter;
use crate::health::JournalWatch;
use crate::init;
use crate::plugins::api as plugins_api;
use crate::plugins::Plugins;
use crate::registry::Registry;
use crate::relay_certs::RelayCerts;
use crate::scheduler::Scheduler;
use crate::session::session_registry::SessionRegistry;
use crate::session::{self, SessionShared};
use crate::state::AppState;
use crate::trust::Trust;
use crate::upgrades::api as upgrades_api;
use crate::upgrades::Upgrades;
use crate::users::{Users, UsersError};
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
/// How often rolling deployments are swept for a batch that ended by other means than an event.
const ROLLING_SWEEP: Duration = Duration::from_secs(5);

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
    /// The users' API tokens.
    pub api_tokens: Arc<crate::api_tokens::ApiTokens>,
    /// The audit log.
    pub audit: Arc<crate::audit::Audit>,
    /// This node's place in a cluster on PostgreSQL (`None` on sled).
    pub cluster: Option<crate::health::ClusterHealth>,
    /// On PostgreSQL: this node's way out to a standby.
    pub drain: Option<crate::drain::Drain>,
    /// On PostgreSQL: this node's claims on the agents it serves.
    pub claims: Option<crate::claims::Claims>,
    /// How this node serves agents alongside the cluster's other nodes.
    pub serving: Serving,
    /// On a cluster whose nodes all serve agents: the database's hints that inbox or mailbox
    /// entries were written (see `crate::mail`).
    pub hints: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
    /// On a member: the active node's lease epoch, each time another node takes over (its
    /// agents greet the new one: see `crate::mail::greet_each_active_node`).
    pub active_epochs: Option<tokio::sync::watch::Receiver<i64>>,
    /// What agents reported after this server was restored behind them.
    pub reconciliations: Arc<crate::reconcile::Reconciliations>,
}

/// How a node serves agents alongside the cluster's other nodes (see `crate::mail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// Every agent connects here (on sled, or the active node of an active/passive cluster).
    Alone,
    /// The active node of a cluster whose other nodes serve agents too: it takes their events
    /// from the inbox.
    Active,
    /// A member: it serves agents, and leaves their work to the active node.
    Member,
}

/// How agents' sessions behave (from the configuration).
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub max_handshakes: usize,
    pub window: u64,
    pub retention: Retention,
    /// Agents offline longer than these are marked stale, removed (0: never).
    pub mark_stale_after: Duration,
    pub remove_stale_after: Duration,
    /// How often stale agents are looked for.
    pub stale_check: Duration,
}

/// The operators' listener: its routes and what they read.
#[derive(Clone)]
pub struct Operators {
    state: web::Data<AppState>,
    bearer: web::Data<AdminToken>,
    artifacts: web::Data<ArtifactStore>,
}

/// The agent-facing listener: its routes and what they read.
#[derive(Clone)]
pub struct Agents {
    state: web::Data<AppState>,
    deployments: web::Data<Deployments>,
    artifacts: web::Data<ArtifactStore>,
}

/// Everything `run` serves, and what it closes at a stop.
pub struct Built {
    pub operators: Operators,
    pub agents: Agents,
    pub shared: Arc<SessionShared>,
    pub sessions: Addr<SessionRegistry>,
}

/// Starts the journal, the session registry and the scheduler, and builds the application
/// state.
pub async fn build(dir: &Path, tuning: Tuning, loaded: Loaded) -> Result<Built, UsersError> {
    let handle = loaded.journal.handle();
    let presence: Arc<crate::session::Peers> = Default::default();
    let shared = Arc::new(SessionShared {
        journal: handle.clone(),
        registry: loaded.registry.clone(),
        work: Arc::new(Work::new(
            loaded.deployments.clone(),
            loaded.upgrades.clone(),
            loaded.reconciliations,
            presence.clone(),
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
        handshake_counts: Default::default(),
        claims: loaded.claims.clone(),
        member: loaded.serving == Serving::Member,
        has_members: loaded.serving == Serving::Active,
        mail_epoch: loaded
            .cluster
            .as_ref()
            .map_or(0, |c| u64::try_from(c.epoch).unwrap_or(0)),
        active_takes_members: crate::mail::active_takes_members(&handle).into(),
        active_takes_enrollments: crate::mail::active_takes_enrollments(
            &handle,
            loaded.active_epochs.as_ref().map_or(0, |e| *e.borrow()),
        )
        .into(),
        active_appends: crate::mail::active_appends(
            &handle,
            loaded.active_epochs.as_ref().map_or(0, |e| *e.borrow()),
        )
        .unwrap_or(false)
        .into(),
        drained: Default::default(),
        reports_pending: Default::default(),
        relay_claims: Default::default(),
    });
    let session_registry = SessionRegistry::new(shared.clone()).start();
    let scheduler = Arc::new(Scheduler {
        deployments: loaded.deployments.clone(),
        upgrades: loaded.upgrades.clone(),
        registry: loaded.registry.clone(),
        sessions: session_registry.clone(),
        trust: loaded.trust.clone(),
        presence: shared.presence.clone(),
        sessions_work: shared.work.clone(),
    });
    match loaded.serving {
        Serving::Member => {
            loaded.registry.follow_the_active_node();
            // Jobs, deployments and agents are the active node's: this one only numbers the
            // commands it leaves for the agents served here.
            let presence = shared.presence.clone();
            let mail = crate::mail::deliver_forever(
                handle.clone(),
                session_registry.clone(),
                crate::mail::MAILBOX_PREFIX,
                loaded.hints,
                // What the agents other nodes serve are mailed is not read here.
                move |agent| presence.current(agent.as_str()).is_some(),
            );
            actix_rt::spawn(mail);
            actix_rt::spawn(crate::mail::follow_registry(
                loaded.registry.clone(),
                session_registry.clone(),
                shared.clone(),
                loaded.active_epochs.clone(),
            ));
            if let Some(epochs) = loaded.active_epochs {
                actix_rt::spawn(crate::mail::greet_each_active_node(
                    epochs,
                    session_registry.clone(),
                ));
            }
        }
        serving => {
            if loaded.claims.is_some() {
                // The other nodes take this node's trust material (a rollover's step) from the
                // database.
                let trust = loaded.trust.clone();
                actix_rt::spawn(async move {
                    if let Err(e) = trust.publish().await {
                        tracing::error!(error = %e, "trust-not-published");
                    }
                });
                // Members serve agents only while the active node reads what they carry.
                let epoch = loaded
                    .cluster
                    .as_ref()
                    .map_or(0, |c| u64::try_from(c.epoch).unwrap_or(0));
                let says = crate::mail::say_whether_members_are_taken(
                    &handle,
                    serving == Serving::Active,
                    epoch,
                );
                actix_rt::spawn(async move {
                    if let Err(e) = says.await {
                        tracing::warn!(error = %e, "members-mode-not-noted");
                    }
                });
            }
            if serving == Serving::Active {
                let inbox = crate::mail::deliver_forever(
                    handle.clone(),
                    session_registry.clone(),
                    crate::mail::INBOX_PREFIX,
                    loaded.hints,
                    |_| true,
                );
                actix_rt::spawn(inbox);
            }
            // Jobs journaled as queued but not yet sent (the server stopped first) go out now.
            let waking = scheduler.clone();
            actix_rt::spawn(async move { waking.dispatch_waiting().await });
            actix_rt::spawn(scheduler.clone().roll(ROLLING_SWEEP));
        }
    }
    let agent_admin = Arc::new(AgentAdmin {
        registry: loaded.registry.clone(),
        deployments: loaded.deployments.clone(),
        upgrades: loaded.upgrades.clone(),
        sessions: session_registry.clone(),
        shared: shared.clone(),
    });
    {
        use std::sync::atomic::Ordering::Relaxed;
        let policy = &loaded.registry.stale;
        policy
            .mark_after_ms
            .store(tuning.mark_stale_after.as_millis() as u64, Relaxed);
        policy
            .remove_after_ms
            .store(tuning.remove_stale_after.as_millis() as u64, Relaxed);
    }
    if !tuning.remove_stale_after.is_zero() && loaded.serving != Serving::Member {
        actix_rt::spawn(crate::background::remove_stale_periodically(
            agent_admin.clone(),
            tuning.stale_check,
        ));
    }
    if loaded.serving != Serving::Member {
        loaded
            .users
            .ensure_initial_admin(&dir.join(init::ADMIN_PASSWORD))
            .await?;
    }
    let bearer = web::Data::new(loaded.token.clone());
    let state = web::Data::new(AppState {
        token: loaded.token,
        registry: loaded.registry,
        presence,
        deployments: loaded.deployments.clone(),
        retention: tuning.retention,
        scheduler,
        plugins: loaded.plugins,
        upgrades: loaded.upgrades,
        shared: shared.clone(),
        session_registry: session_registry.clone(),
        agent_admin,
        users: loaded.users,
        api_tokens: loaded.api_tokens,
        audit: loaded.audit,
        web_sessions: crate::web::session::SessionStore::load(handle.clone())?,
        login_limiter: Default::default(),
        enroll_limiter: EnrollLimiter::default(),
        forwarded_enrollments: Default::default(),
        trust: loaded.trust,
        relay_certs: loaded.relay_certs,
        server_cert_pem: loaded.server_cert_pem,
        journal: JournalWatch::new(loaded.journal.start(), handle),
        data_dir: dir.to_path_buf(),
        artifacts: loaded.artifacts.clone(),
        cluster: loaded.cluster,
        drain: loaded.drain,
    });
    if shared.has_members {
        // Members forward the enrollments they get, through the database.
        actix_rt::spawn(crate::member_enroll::answer_forever(state.clone()));
    }
    Ok(Built {
        operators: Operators {
            state: state.clone(),
            bearer,
            artifacts: loaded.artifacts.clone(),
        },
        agents: Agents {
            state,
            deployments: web::Data::from(loaded.deployments),
            artifacts: loaded.artifacts,
        },
        shared,
        sessions: session_registry,
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
        cfg.app_data(self.state.clone())
            .app_data(self.bearer.clone())
            .app_data(json_config())
            .app_data(web::PayloadConfig::new(PAYLOAD_LIMIT_BYTES))
            .configure(admin::configure)
            .configure(crate::drain::configure)
            .configure(api::configure)
            .configure(deployments_api::configure)
            .configure(crate::artifacts::configure_api(self.artifacts.clone()))
            .configure(plugins_api::configure_api)
            .configure(upgrades_api::configure_api)
            .configure(session::routes::configure_api)
            .configure(agents_api::configure)
            .configure(crate::reconcile_api::configure)
            .configure(crate::trust::api::configure)
            .configure(crate::users_api::configure)
            .configure(crate::api_tokens_api::configure)
            .configure(crate::audit_api::configure)
            .configure(crate::web::configure);
    }
}

impl Agents {
    /// Every route of the agent-facing listener.
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        cfg.app_data(self.state.clone())
            .app_data(json_config())
            .app_data(web::PayloadConfig::new(PAYLOAD_LIMIT_BYTES))
            .app_data(self.deployments.clone())
            .configure(agent_surface::configure)
            .configure(crate::artifacts::configure_agent(self.artifacts.clone()))
            .configure(plugins_api::configure_agent_surface)
            .configure(upgrades_api::configure_agent_surface)
            .configure(session::routes::configure_agent_surface);
    }
}
