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

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine as _;
use tether_shared::enroll::{EnrollRequest, EnrollResponse, Role, ENROLL_PATH};
use tether_shared::identity::PublicKey;
use tether_shared::tls;

use crate::api_error::parse_json;
use crate::api_error::{method_not_allowed, ApiError};
use crate::registry::{Registry, RegistryError};

/// Largest enrollment request body (a name, 32 tags, a key and a token fit many times over).
const ENROLL_BODY_LIMIT_BYTES: usize = 16 * 1024;
/// Failed enrollments one source may make per window before it gets 429.
pub const ENROLL_FAILURES_PER_WINDOW: u32 = 20;
/// The failure-counting window.
pub const ENROLL_WINDOW: Duration = Duration::from_secs(60);
/// Sources tracked at most; past it, expired windows are dropped and new sources go untracked
/// rather than letting the table grow without bound.
const MAX_TRACKED_SOURCES: usize = 100_000;

/// Shared by every worker of the agent-facing listener.
pub struct AgentSurface {
    /// Agents, relays and enrollment tokens.
    pub registry: Arc<Registry>,
    /// The server's command-signing public key in force and its certificate (`signing.pem`),
    /// handed out at enrollment.
    pub trust: Arc<crate::trust::Trust>,
    /// Failed enrollment attempts per source.
    pub limiter: EnrollLimiter,
    /// Relays' TLS certificates, from the relay CA (which signs nothing else).
    pub relay_certs: Arc<crate::relay_certs::RelayCerts>,
    /// The server's own certificate (PEM) as served now: no relay is certified for a name it
    /// covers.
    pub server_cert_pem: Arc<std::sync::RwLock<String>>,
}

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
    state: web::Data<AgentSurface>,
) -> Result<HttpResponse, ApiError> {
    let source = req.peer_addr().map(|a| a.ip());
    if let Some(ip) = source {
        state.limiter.check(ip, Instant::now())?;
    }
    let request: EnrollRequest = parse_json(&body)?;
    let name = request.name.clone();
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
            state.limiter.record_failure(ip, Instant::now());
        }
        tracing::warn!(source = ?source, name = %name.escape_debug(), reason = %e, "enrollment-proof-refused");
        return Err(ApiError::BadRequest(e.to_string()));
    }
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
                agent_id: record.id,
                server_signing_key,
                tls_certificate: tls_certificate.map(|i| i.pem),
                server_signing_certificate: Some(certificate),
            }))
        }
        Err(RegistryError::InvalidToken) => {
            if let Some(ip) = source {
                state.limiter.record_failure(ip, Instant::now());
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

/// Counts failed enrollments per source address in fixed windows.
#[derive(Debug)]
pub struct EnrollLimiter {
    /// Failures allowed per window.
    max_failures: u32,
    /// Window length.
    window: Duration,
    /// Per source: when its window started and its failures since.
    sources: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Default for EnrollLimiter {
    fn default() -> Self {
        EnrollLimiter::new(ENROLL_FAILURES_PER_WINDOW, ENROLL_WINDOW)
    }
}

impl EnrollLimiter {
    /// A limiter allowing `max_failures` per `window` and source.
    pub fn new(max_failures: u32, window: Duration) -> Self {
        EnrollLimiter {
            max_failures,
            window,
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(429)` if `ip` used up its failures in the current window.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), ApiError> {
        let sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        match sources.get(&ip) {
            Some((started, failures))
                if *failures >= self.max_failures
                    && now.saturating_duration_since(*started) < self.window =>
            {
                let left = self
                    .window
                    .saturating_sub(now.saturating_duration_since(*started));
                Err(ApiError::TooManyRequests {
                    retry_after_s: left.as_secs().max(1),
                })
            }
            _ => Ok(()),
        }
    }

    /// Counts one failure of `ip`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if sources.len() >= MAX_TRACKED_SOURCES && !sources.contains_key(&ip) {
            let window = self.window;
            sources.retain(|_, (started, _)| now.saturating_duration_since(*started) < window);
            if sources.len() >= MAX_TRACKED_SOURCES {
                return;
            }
        }
        let entry = sources.entry(ip).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        if entry.1 == self.max_failures {
            tracing::warn!(source = %ip, failures = entry.1, "enrollment-source-limited");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn limits_failures_per_source_and_window() {
        let limiter = EnrollLimiter::new(3, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.check(a, t0).unwrap();
            limiter.record_failure(a, t0);
        }
        let err = limiter.check(a, t0 + Duration::from_secs(10)).unwrap_err();
        assert!(
            matches!(err, ApiError::TooManyRequests { retry_after_s: 50 }),
            "{err:?}"
        );
        limiter.check(b, t0).unwrap();
        // A new window starts the count afresh.
        let later = t0 + Duration::from_secs(61);
        limiter.check(a, later).unwrap();
        limiter.record_failure(a, later);
        limiter.check(a, later).unwrap();
    }
}
