//! The admin HTTP surface: `GET /admin/health` (JSON, the operator contract's shape) and
//! `GET /metrics` (Prometheus text: the health's figures, `process_*` and `tether_build_info`
//! (`tether_shared::metrics::process`), the fleet and the work (`crate::fleet_metrics`)), both behind
//! the admin bearer token. [`configure`] mounts
//! them; [`crate::state::AppState`] is what they read.

use std::collections::BTreeMap;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use crate::api_error::{method_not_allowed, ApiError};
use crate::health::{
    ActorHealth, ActorState, AgentHealth, CertificateExpiry, ServerHealth, OBSERVE_TIMEOUT,
};
use crate::session::agent_link::{LinkHealth, ObserveLink};
use crate::session::relay_session::ObserveRelayLink;
use crate::session::session_registry::{ListLinks, SessionRegistry};
use crate::state::AppState;

/// Prometheus text exposition format 0.0.4.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl AppState {
    /// Observes every actor now.
    pub async fn observe(&self) -> ServerHealth {
        let (journal_actor, journal) = self.journal.observe(OBSERVE_TIMEOUT).await;
        let (registry_actor, links) = observe_links(&self.session_registry).await;
        let mut actors = vec![journal_actor, registry_actor];
        let mut relays = BTreeMap::new();
        for (id, link) in self.shared.presence.relay_links() {
            let answer = tokio::time::timeout(OBSERVE_TIMEOUT, link.send(ObserveRelayLink)).await;
            let (state, health) = match answer {
                Ok(Ok(h)) => (ActorState::Running, Some(h)),
                Ok(Err(_)) => (ActorState::Stopped, None),
                Err(_) => (ActorState::Timeout, None),
            };
            actors.push(ActorHealth {
                name: id.clone(),
                kind: "RelaySession",
                state,
                restarts: 0,
                last_beat_ms: 0,
                backlog: health.as_ref().map_or(0, |h| h.handshaking),
            });
            if let Some(h) = health {
                relays.insert(id, h);
            }
        }
        let mut sessions = relays.len() as u64;
        let mut agents = BTreeMap::new();
        for (id, restarts, link) in links {
            match link {
                Ok(l) => {
                    sessions += u64::from(l.connected);
                    actors.push(ActorHealth {
                        name: id.clone(),
                        kind: "AgentLink",
                        state: ActorState::Running,
                        restarts,
                        last_beat_ms: 0,
                        backlog: l.unacked_commands as u64,
                    });
                    agents.insert(
                        id.clone(),
                        AgentHealth {
                            id,
                            connected: l.connected,
                            unacked_commands: l.unacked_commands as u64,
                            oldest_unacked_ms: l.oldest_unacked_ms,
                            events_received: l.events_received,
                            retransmits: l.retransmits,
                            ignored_acks: l.stale_acks + l.bogus_acks,
                            last_heard_ms: l.last_heard_ms,
                            peer_resets: l.peer_resets,
                            abandoned_commands: l.abandoned_commands,
                            events_deferred: l.events_deferred,
                            refused: l.refused,
                            load_milli: l.status.as_ref().map(|s| s.load_milli),
                            figures: l.status.as_ref().and_then(|s| s.figures.clone()),
                            actors: l.status.map(|s| s.actors).unwrap_or_default(),
                        },
                    );
                }
                Err(state) => actors.push(ActorHealth {
                    name: id,
                    kind: "AgentLink",
                    state,
                    restarts,
                    last_beat_ms: OBSERVE_TIMEOUT.as_millis() as u64,
                    backlog: 0,
                }),
            }
        }
        let agents_refused = agents.values().filter(|a| a.refused.is_some()).count();
        let journal_now = self.shared.journal.observe();
        ServerHealth {
            agents_refused,
            reconciliation: self.shared.work.reconciliations().summary(),
            audit: crate::health::AuditHealth {
                head: self.audit.head(),
                keep: self.audit.keep(),
                failures: self
                    .audit
                    .failures
                    .load(std::sync::atomic::Ordering::Relaxed),
                unrecorded: self
                    .audit
                    .unrecorded
                    .load(std::sync::atomic::Ordering::Relaxed),
            },
            actors,
            sessions,
            journal,
            agents,
            relay_links: relays,
            certificates: CertificateExpiry::of_data_dir(
                &self.data_dir,
                self.shared.relay_certs.expiries(),
            ),
            deployments: {
                // The cluster's trust record holds sealed secrets too.
                let mut h = self.deployments.health();
                h.secrets_stale += self.shared.trust.stale_secrets();
                h
            },
            storage: crate::health::StorageHealth {
                free_bytes: tether_shared::storage::free_bytes(&self.data_dir).ok(),
                failed: journal_now.poisoned,
                waiting: journal_now.waiting,
            },
            trust: self.trust_health(),
            cluster: self.cluster.clone(),
        }
    }

    fn trust_health(&self) -> crate::health::TrustHealth {
        let rotation = self.shared.trust.rotation();
        let (peers, behind) = self.shared.registry.trust_behind(rotation.serial);
        crate::health::TrustHealth {
            serial: rotation.serial,
            phase: crate::trust::phase_name(rotation.phase),
            peers,
            behind,
        }
    }
}

/// An agent id, how often its link was rebuilt, and what it answered.
type LinkObservation = (String, u64, Result<LinkHealth, ActorState>);

/// The session registry's own health, and every agent link's (concurrently, each bounded).
async fn observe_links(
    registry: &actix::Addr<SessionRegistry>,
) -> (ActorHealth, Vec<LinkObservation>) {
    let started = std::time::Instant::now();
    let listed = tokio::time::timeout(OBSERVE_TIMEOUT, registry.send(ListLinks)).await;
    let state = match &listed {
        Ok(Ok(_)) => ActorState::Running,
        Ok(Err(_)) => ActorState::Stopped,
        Err(_) => ActorState::Timeout,
    };
    let actor = ActorHealth {
        name: "sessions".into(),
        kind: "SessionRegistry",
        state,
        restarts: 0,
        last_beat_ms: started.elapsed().as_millis() as u64,
        backlog: 0,
    };
    let Ok(Ok(listed)) = listed else {
        return (actor, Vec::new());
    };
    let observations = listed
        .links
        .into_iter()
        .map(|(id, link, restarts)| async move {
            let state = match tokio::time::timeout(OBSERVE_TIMEOUT, link.send(ObserveLink)).await {
                Ok(Ok(health)) => Ok(health),
                Ok(Err(_)) => Err(ActorState::Stopped),
                Err(_) => Err(ActorState::Timeout),
            };
            (id.into_string(), restarts, state)
        });
    (actor, futures_util::future::join_all(observations).await)
}

/// Mounts the admin routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/admin/health")
            .route(web::get().to(health))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/metrics")
            .route(web::get().to(metrics))
            .default_service(web::to(method_not_allowed)),
    );
}

/// `GET /admin/health`.
async fn health(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    Ok(HttpResponse::Ok().json(state.observe().await))
}

/// `GET /metrics`.
async fn metrics(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let mut text = state.observe().await.to_prometheus();
    text.push_str(&tether_shared::metrics::process::families());
    let agents = state
        .registry
        .agent_statuses(state.shared.presence.as_ref());
    text.push_str(&crate::fleet_metrics::agents(&agents));
    text.push_str(&state.deployments.with_state(crate::fleet_metrics::work));
    state.shared.handshake_counts.render(&mut text);
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE))
        .body(text))
}
