//! [`ApiError`]: every error the HTTPS surface answers with, rendered as a JSON body
//! `{"error": "..."}` with the matching status. Messages never echo credentials.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No `Authorization: Bearer` header, or a token that does not match.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// A valid credential whose role may not make this request; the message says whose.
    #[error("{0}")]
    Forbidden(String),
    /// No route matches the path.
    #[error("not found")]
    NotFound,
    /// No route matches because the client dialled the other listener; the message says which
    /// port it wants.
    #[error("{0}")]
    WrongPort(&'static str),
    /// The route exists but not for this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request body could not be read or decoded (too large, malformed JSON).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// An enrollment token that is unknown, spent, expired or for another role: one answer for
    /// all, so that nobody learns which.
    #[error("invalid or expired enrollment token")]
    InvalidEnrollmentToken,
    /// The request conflicts with what exists (a name enrolled with another key).
    #[error("{0}")]
    Conflict(String),
    /// Too many failed attempts from this source; retry after the given seconds.
    #[error("too many failed attempts, retry in {retry_after_s} s")]
    TooManyRequests {
        /// Seconds until attempts are accepted again.
        retry_after_s: u64,
    },
    /// The journal refused the change; nothing changed (details are logged, not answered).
    #[error("storage unavailable, nothing was changed; retry later")]
    Unavailable,
    /// The server's disk is full: nothing changed, and nothing will until space is freed (the
    /// server then starts over by itself).
    #[error("the server's disk is full: nothing was changed; retry once space is freed (GET /admin/health says how much is free)")]
    StorageFull,
    /// Part of the request was done and stored, the rest could not be (the message says which).
    #[error("{0}")]
    Incomplete(String),
}

impl From<crate::registry::RegistryError> for ApiError {
    fn from(e: crate::registry::RegistryError) -> Self {
        use crate::registry::RegistryError;
        match e {
            RegistryError::InvalidToken => ApiError::InvalidEnrollmentToken,
            RegistryError::Invalid(reason) => ApiError::BadRequest(reason),
            RegistryError::NameTaken
            | RegistryError::KeyTaken
            | RegistryError::CertificateChange
            | RegistryError::TagsChange => ApiError::Conflict(e.to_string()),
            RegistryError::Journal(ref j) if j.is_disk_full() => {
                tracing::error!(error = %e, "registry-change-failed-disk-full");
                ApiError::StorageFull
            }
            RegistryError::Journal(_) | RegistryError::Corrupt { .. } => {
                tracing::error!(error = %e, "registry-change-failed");
                ApiError::Unavailable
            }
        }
    }
}

/// Parses a JSON body strictly, with the decoder's reason in the 400.
pub fn parse_json<T: for<'de> serde::Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))
}

/// The JSON body of every error response.
#[derive(Debug, Serialize)]
struct ErrorBody {
    /// Human-readable reason; safe to show, never holds a secret.
    error: String,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound | ApiError::WrongPort(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidEnrollmentToken => StatusCode::UNAUTHORIZED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable | ApiError::Incomplete(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized) {
            response.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        if let ApiError::TooManyRequests { retry_after_s } = self {
            response.insert_header((header::RETRY_AFTER, retry_after_s.to_string()));
        }
        response.json(ErrorBody {
            error: self.to_string(),
        })
    }
}

/// What a client of the agent-facing surface hears on the operators' listener.
const OPERATORS_PORT: &str = "not found: this is the server's operators' port (web application, REST API, listen.https, default 8443); agents and relays use its agent-facing port (listen.wss, default 7919): --upstream wss://HOST:7919";
/// What an operator's client hears on the agent-facing listener.
const AGENTS_PORT: &str = "not found: this is the server's agent-facing port (agents and relays, listen.wss, default 7919); the REST API, the CLI and the web application use its operators' port (listen.https, default 8443): https://HOST:8443";

/// Default service of the operators' listener: unknown paths, and a hint for agents' paths.
pub async fn not_found(req: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    let path = req.path();
    if path.starts_with("/agent/") || path.starts_with("/relay/") {
        return Err(ApiError::WrongPort(OPERATORS_PORT));
    }
    Err(ApiError::NotFound)
}

/// Default service of the agent-facing listener: unknown paths, and a hint for operators'.
pub async fn not_found_for_agents(req: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    let path = req.path();
    if !path.starts_with("/agent/") && !path.starts_with("/relay/") {
        return Err(ApiError::WrongPort(AGENTS_PORT));
    }
    Err(ApiError::NotFound)
}

/// Default service of a known path for methods it does not serve.
pub async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}
