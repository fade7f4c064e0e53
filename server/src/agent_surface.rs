//! The agent-facing surface, served on the WSS listener (`listen.wss`, default 7919) and
//! mirrored by relays: everything under `/agent/v1/`. Today that is `POST /agent/v1/enroll`
//! (token + public key in, agent id + the server's signing key out); the agent WebSocket
//! (`GET /agent/v1/ws`) and the agents' bulk downloads are mounted here too by [`configure`].
//! None of these routes exist on the HTTPS listener, and `/api/...` does not exist here.
//!
//! Failed enrollments (bad token, or a proof of possession that does not verify) are counted
//! per source address by [`EnrollLimiter`]; past the budget the source gets 429 until its
//! window ends.
//!
//! A relay's enrollment is checked before anything is certified or enrolled: the request must
//! be signed by the Ed25519 key it enrolls *and* by the TLS key it wants certified (so nobody
//! gets a certificate for a key they do not hold), its hostnames must be valid and none may be
//! a name the server's own certificate covers, and the certificate comes from the relay CA,
//! which operators' clients never trust. An agent's request is signed by its key too.

use std::net::IpAddr;
use std::sync::PoisonError;
use std::time::Instant;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine as _;
use tether_shared::enroll::{EnrollRequest, EnrollResponse, Role, ENROLL_PATH};
use tether_shared::identity::PublicKey;
use tether_shared::tls;

use crate::api_error::parse_json;
use crate::api_error::{method_not_allowed, ApiError};
use crate::registry::RegistryError;
use crate::state::AppState;

/// Largest enrollment request body (a name, 32 tags, a key and a token fit many times over).
const ENROLL_BODY_LIMIT_BYTES: usize = 16 * 1024;

/// Mounts the `/agent/v1` routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource(ENROLL_PATH)
            .app_data(web::PayloadConfig::new(ENROLL_BODY_LIMIT_BYTES))
            .route(web::post().to(enroll))
            .default_service(web::to(method_not_allowed)),
    );
}

/// `POST /agent/v1/enroll`.
async fn enroll(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let source = req.peer_addr().map(|a| a.ip());
    if !state.shared.member {
        return enroll_from(&state, source, &body).await;
    }
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    if !state.shared.active_takes_enrollments.load(relaxed) || state.shared.drained.load(relaxed) {
        // The registry is the active node's: the agent enrolls there (its next upstream).
        return Err(ApiError::Incomplete(
            "this node is a member of the cluster: enroll at the active node".into(),
        ));
    }
    // What can be checked here is, before anything is written for the caller (its failures
    // count here as they would at the active node).
    check(&state, source, &body)?;
    let answered = state
        .forwarded_enrollments
        .forward(&state, source, &body)
        .await?;
    if let Some(ip) = source.filter(|_| answered.status() == StatusCode::UNAUTHORIZED) {
        state.enroll_limiter.record_failure(ip, Instant::now());
    }
    Ok(answered)
}

/// What an enrollment request says, checked (see [`check`]).
struct Checked {
    request: EnrollRequest,
    tls_key: Option<Vec<u8>>,
}

/// The checks an enrollment from `source` passes before its token is looked at: the caller's
/// failure budget, the request's shape, a relay's names and TLS key, and the proofs that it
/// holds its keys (a proof that fails counts against the caller).
fn check(state: &AppState, source: Option<IpAddr>, body: &[u8]) -> Result<Checked, ApiError> {
    if let Some(ip) = source {
        state.enroll_limiter.check(ip, Instant::now())?;
    }
    let request: EnrollRequest = parse_json(body)?;
    let public_key = PublicKey::from_b64(&request.public_key)
        .map_err(|e| ApiError::BadRequest(format!("public_key: {e}")))?;
    let server_cert_pem = state
        .server_cert_pem
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let tls_key = relay_tls_key(&request, &server_cert_pem)?;
    if let Err(e) = request.verify_proofs(&public_key, tls_key.as_deref()) {
        if let Some(ip) = source {
            state.enroll_limiter.record_failure(ip, Instant::now());
        }
        tracing::warn!(source = ?source, name = %request.name.escape_debug(), reason = %e, "enrollment-proof-refused");
        return Err(ApiError::BadRequest(e.to_string()));
    }
    Ok(Checked { request, tls_key })
}

/// An enrollment from `source` (the caller's address, as the active node or a member saw
/// it): checked, and the agent or relay enrolled.
pub async fn enroll_from(
    state: &AppState,
    source: Option<IpAddr>,
    body: &[u8],
) -> Result<HttpResponse, ApiError> {
    let Checked { request, tls_key } = check(state, source, body)?;
    let name = request.name.clone();
    // A relay's certificate is made before anything is enrolled or any token spent, so a bad
    // key or hostname changes nothing; it is handed out only if the enrollment succeeds.
    let tls_certificate = match tls_key {
        Some(key) => Some(
            state
                .relay_certs
                .issue(&request.hostnames, &key)
                .map_err(|e| ApiError::BadRequest(format!("relay certificate: {e}")))?,
        ),
        None => None,
    };
    let hostnames = request.hostnames.clone();
    match state.registry.enroll(request).await {
        Ok(record) => {
            if let Some(issued) = &tls_certificate {
                // Recorded so that it is renewed in time; a failure here only means the
                // relay gets a new one at its first connect.
                if let Err(e) = state
                    .registry
                    .set_relay_certificate(&record.id, issued.clone())
                    .await
                {
                    tracing::warn!(relay_id = %record.id, error = %e, "relay-certificate-not-recorded");
                }
                tracing::info!(relay_id = %record.id, hostnames = ?hostnames, not_after_unix_s = issued.not_after_unix_s, "relay-certificate-issued");
            }
            let (server_signing_key, certificate) = state.trust.enrollment_key();
            Ok(HttpResponse::Ok().json(EnrollResponse {
                agent_id: record.id.to_string(),
                server_signing_key,
                tls_certificate: tls_certificate.map(|i| i.pem),
                server_signing_certificate: Some(certificate),
            }))
        }
        Err(RegistryError::InvalidToken) => {
            if let Some(ip) = source {
                state.enroll_limiter.record_failure(ip, Instant::now());
            }
            tracing::warn!(source = ?source, name = %name.escape_debug(), "enrollment-refused");
            Err(ApiError::InvalidEnrollmentToken)
        }
        Err(e) => {
            tracing::info!(source = ?source, name = %name.escape_debug(), reason = %e, "enrollment-rejected");
            Err(e.into())
        }
    }
}

/// A relay must send a TLS public key and the names it is reached at; an agent sends neither.
/// No name the server's certificate (`server_cert_pem`) covers may be asked for.
fn relay_tls_key(
    request: &EnrollRequest,
    server_cert_pem: &str,
) -> Result<Option<Vec<u8>>, ApiError> {
    match (request.role, &request.tls_public_key) {
        (Role::Agent, None) if request.hostnames.is_empty() => Ok(None),
        (Role::Agent, _) => Err(ApiError::BadRequest(
            "agents do not get TLS certificates: tls_public_key and hostnames are for relays"
                .into(),
        )),
        (Role::Relay, None) => Err(ApiError::BadRequest(
            "a relay must send tls_public_key (its TLS key for the certificate)".into(),
        )),
        (Role::Relay, Some(key)) => {
            if request.hostnames.is_empty() || request.hostnames.len() > 16 {
                return Err(ApiError::BadRequest(
                    "a relay must name 1 to 16 hostnames for its certificate".into(),
                ));
            }
            if let Some(bad) = request.hostnames.iter().find(|h| !tls::valid_hostname(h)) {
                return Err(ApiError::BadRequest(format!(
                    "invalid hostname {bad:?}: must be a DNS name or an IP address"
                )));
            }
            for name in &request.hostnames {
                // An unreadable server certificate refuses every name: never certify blindly.
                if tls::certificate_covers(server_cert_pem, name).unwrap_or(true) {
                    return Err(ApiError::BadRequest(format!(
                        "hostname {name:?} is one of the server's own names; a relay must be reached at names of its own"
                    )));
                }
            }
            let raw = base64::engine::general_purpose::STANDARD
                .decode(key)
                .map_err(|_| ApiError::BadRequest("tls_public_key is not base64".into()))?;
            // An uncompressed P-256 point: 0x04 and two 32-byte coordinates.
            if raw.len() != 65 || raw[0] != 4 {
                return Err(ApiError::BadRequest(
                    "tls_public_key must be an uncompressed P-256 point (65 bytes)".into(),
                ));
            }
            Ok(Some(raw))
        }
    }
}
