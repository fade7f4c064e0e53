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
    /// No route matches the path.
    #[error("not found")]
    NotFound,
    /// The route exists but not for this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request body could not be read or decoded (too large, malformed JSON).
    #[error("bad request: {0}")]
    BadRequest(String),
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
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized) {
            response.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        response.json(ErrorBody {
            error: self.to_string(),
        })
    }
}

/// Default service for unknown paths.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

/// Default service of a known path for methods it does not serve.
pub async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}
