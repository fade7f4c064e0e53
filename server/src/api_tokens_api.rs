//! The users' API tokens over the REST API (admins):
//! - `GET /api/v1/api-tokens` → `[{"id","name","user","role","created_unix_ms",
//!   "expires_unix_ms","expired"}]`; never a token or its hash.
//! - `POST /api/v1/api-tokens` with `{"user","name","role"?,"expires_in_s"?}` → 201, the token as
//!   listed plus `"token"`, shown this once; 400 with the rule broken (an unknown user, a role
//!   above the user's, a lifetime out of range), 409 past the bounds on tokens.
//! - `DELETE /api/v1/api-tokens/{id}` → `{"id","revoked":true}`; 404 if unknown.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::api_error::{method_not_allowed, ApiError};
use crate::api_tokens::ApiTokensError;
use crate::authz::Role;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/api-tokens")
            .route(web::get().to(list))
            .route(web::post().to(create))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/v1/api-tokens/{id}")
            .route(web::delete().to(revoke))
            .default_service(web::to(method_not_allowed)),
    );
}

impl From<ApiTokensError> for ApiError {
    fn from(e: ApiTokensError) -> Self {
        match e {
            ApiTokensError::Invalid(m) => ApiError::BadRequest(m),
            ApiTokensError::Conflict(m) => ApiError::Conflict(m),
            ApiTokensError::NotFound => ApiError::NotFound,
            other => {
                tracing::error!(error = %other, "api-token-change-failed");
                ApiError::Unavailable
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    user: String,
    name: String,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    expires_in_s: Option<u64>,
}

async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    Ok(HttpResponse::Ok().json(state.api_tokens.list(None)))
}

async fn create(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let new: NewToken = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "invalid JSON: {e}; expected {{\"user\", \"name\", \"role\"?, \"expires_in_s\"?}}"
        ))
    })?;
    let role = new
        .role
        .as_deref()
        .map(Role::parse)
        .transpose()
        .map_err(ApiError::BadRequest)?;
    let (info, token) = state
        .api_tokens
        .create(&state.users, &new.user, &new.name, role, new.expires_in_s)
        .await?;
    let mut answer = serde_json::to_value(&info).map_err(|_| ApiError::Unavailable)?;
    answer["token"] = json!(token.expose());
    Ok(HttpResponse::Created().json(answer))
}

async fn revoke(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let id = path.into_inner();
    state.api_tokens.revoke(&id, None).await?;
    Ok(HttpResponse::Ok().json(json!({"id": id, "revoked": true})))
}
