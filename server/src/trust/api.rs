//! The rollover's REST routes (HTTPS listener, admin bearer token):
//! - `GET /api/v1/trust` → where the rollover stands ([`Progress`]).
//! - `POST /api/v1/trust/begin`, `.../switch`, `.../finish` (`?force=true` to skip the
//!   checks) → the step taken, then the progress; 409 with the reason if the step does not
//!   follow, or if peers are not ready for it: a switch waits until every agent and relay
//!   confirmed the overlap set (else those that did not would refuse the new key's commands);
//!   a finish waits until every relay serves a certificate from the new relay CA (else agents
//!   would refuse the relays they dial) and every peer confirmed.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::{phase_name, Phase, Trust, TrustError};
use crate::api_error::{method_not_allowed, ApiError};
use crate::registry::{Registry, Role, TrustPosition};
use crate::state::AppState;

/// Peers listed by name at most in a progress report (the counts are complete).
const LISTED: usize = 50;

/// One agent or relay that is behind.
#[derive(Debug, Clone, Serialize)]
pub struct Behind {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// The trust set it holds.
    pub serial: u64,
}

impl From<&TrustPosition> for Behind {
    fn from(p: &TrustPosition) -> Self {
        Behind {
            id: p.id.to_string(),
            name: p.name.clone(),
            role: p.role,
            serial: p.serial,
        }
    }
}

/// Where a rollover stands.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub serial: u64,
    pub phase: &'static str,
    /// The signing keys (base64) agents and relays should trust now.
    pub signing_keys: Vec<String>,
    /// Agents and relays enrolled, and how many hold the set in force.
    pub peers: usize,
    pub confirmed: usize,
    /// Some of those that do not (at most 50).
    pub behind: Vec<Behind>,
    /// Relays whose certificate is not from the relay CA in force (at most 50), and how many.
    pub old_certificates: Vec<Behind>,
    pub old_certificate_count: usize,
    /// The server CA(s) operators' clients should trust now (PEM): during a rollover the old
    /// and the new, since the switch changes the certificate the server serves.
    pub operator_ca_pem: String,
    /// The next step, if one is possible, and what it waits for.
    pub next: Option<&'static str>,
    pub waiting_for: Option<String>,
}

impl Progress {
    pub fn of(trust: &Trust, registry: &Registry) -> Progress {
        let set = trust.set();
        let rotation = trust.rotation();
        let relay_ca = trust.relay_ca();
        let positions = registry.trust_positions();
        let behind_all: Vec<Behind> = positions
            .iter()
            .filter(|p| p.serial < set.serial)
            .map(Behind::from)
            .collect();
        let old: Vec<Behind> = positions
            .iter()
            .filter(|p| p.role == Role::Relay)
            .filter(|p| {
                !p.certificate
                    .as_deref()
                    .is_some_and(|pem| tether_shared::tls::issued_by(pem, relay_ca.cert_pem()))
            })
            .map(Behind::from)
            .collect();
        let (next, waiting_for) = match rotation.phase {
            Phase::Steady => (Some("begin"), None),
            Phase::Overlap => (
                Some("switch"),
                (!behind_all.is_empty()).then(|| {
                    format!(
                        "{} agent(s) and relay(s) have not confirmed trust set {}",
                        behind_all.len(),
                        set.serial
                    )
                }),
            ),
            Phase::Switched | Phase::Switching => {
                let mut waits = Vec::new();
                if !old.is_empty() {
                    waits.push(format!(
                        "{} relay(s) do not serve a certificate from the new relay CA yet",
                        old.len()
                    ));
                }
                if !behind_all.is_empty() {
                    waits.push(format!(
                        "{} agent(s) and relay(s) have not confirmed trust set {}",
                        behind_all.len(),
                        set.serial
                    ));
                }
                (
                    Some("finish"),
                    (!waits.is_empty()).then(|| waits.join("; ")),
                )
            }
        };
        let in_switch = matches!(rotation.phase, Phase::Switched | Phase::Switching);
        Progress {
            serial: set.serial,
            phase: phase_name(rotation.phase),
            signing_keys: set.signing_keys,
            peers: positions.len(),
            confirmed: positions.len() - behind_all.len(),
            behind: behind_all.into_iter().take(LISTED).collect(),
            old_certificate_count: if in_switch { old.len() } else { 0 },
            old_certificates: if in_switch {
                old.into_iter().take(LISTED).collect()
            } else {
                Vec::new()
            },
            operator_ca_pem: trust.operator_ca_pem(),
            next,
            waiting_for,
        }
    }
}

/// `?force=true`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepQuery {
    #[serde(default)]
    force: bool,
}

/// Mounts the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/trust")
            .route(web::get().to(get_progress))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/v1/trust/{step}")
            .route(web::post().to(post_step))
            .default_service(web::to(method_not_allowed)),
    );
}

async fn get_progress(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    Ok(HttpResponse::Ok().json(Progress::of(&state.trust, &state.registry)))
}

async fn post_step(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let query = web::Query::<StepQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let step = path.into_inner();
    // On a cluster, the other nodes have the step in force before the next is taken (the
    // share after the last step may have failed).
    match state.trust.publish().await {
        Ok(()) => {}
        Err(TrustError::Step(reason)) => return Err(ApiError::Conflict(reason)),
        Err(e) => {
            tracing::error!(step = %step, error = %e, "trust-step-not-shared");
            return Err(ApiError::Unavailable);
        }
    }
    let before = Progress::of(&state.trust, &state.registry);
    let ready = before.next == Some(step.as_str()) && before.waiting_for.is_none();
    let taken = match step.as_str() {
        "begin" | "switch" | "finish" if !ready && !query.force && before.next == Some(step.as_str()) => {
            return Err(ApiError::Conflict(format!(
                "not yet: {}; retry once they have, or force it (?force=true; those behind then need a reinstall)",
                before.waiting_for.unwrap_or_default()
            )))
        }
        "begin" => state.trust.begin().await,
        "switch" => state.trust.switch().await,
        "finish" => state.trust.finish().await,
        _ => return Err(ApiError::NotFound),
    };
    match taken {
        Ok(rotation) => {
            tracing::warn!(step = %step, serial = rotation.serial, forced = query.force && !ready, "trust-step-taken");
            // Agents served here have it at their next beat; those a member serves, now.
            state
                .session_registry
                .do_send(crate::session::session_registry::OfferTrustToAll);
            Ok(HttpResponse::Ok().json(Progress::of(&state.trust, &state.registry)))
        }
        Err(TrustError::Step(reason)) => Err(ApiError::Conflict(reason)),
        Err(e) => {
            tracing::error!(step = %step, error = %e, "trust-step-failed");
            Err(ApiError::Unavailable)
        }
    }
}
