//! The users' API tokens over the REST API (admins):
//! - `GET /api/v1/api-tokens` → `[{"id","name","user","role","created_unix_ms",
//!   "expires_unix_ms","expired"}]`; never a token or its hash.
//! - `POST /api/v1/api-tokens` with `{"user","name","role"?,"expires_in_s"?}` → 201, the token as
//!   listed plus `"token"`, shown this once; 400 with the rule broken (an unknown user, a role
//!   above the user's, a lifetime out of range), 409 past the bounds on tokens.
//!   The admin token of `DATA/admin.token` is listed first, as `admin-token` (user ""), until
//!   it is revoked.
//! - `DELETE /api/v1/api-tokens/{id}` → `{"id","revoked":true}`; 404 if unknown. `admin-token`
//!   revokes the admin token on every node (a new one written to `admin.token`, and a restart,
//!   is the way back).
//! - `POST /api/v1/login` with `{"user","password","name"?}`, no bearer (`tether login --user`):
//!   a token for that user with the user's role, valid [`LOGIN_TTL_S`], as `POST
//!   /api/v1/api-tokens` answers (it replaces the user's token of the same name); 401 for a
//!   wrong user or password, 429 past the same limits as the web login.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::api_error::{method_not_allowed, ApiError};
use crate::api_tokens::{ApiTokensError, ADMIN_TOKEN_ID};
use crate::authz::Role;
use crate::state::AppState;
use crate::web::login::PasswordRefusal;

/// How long a token made by a password login lasts: 30 days.
pub const LOGIN_TTL_S: u64 = 30 * 24 * 3600;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource(LOGIN_PATH)
            .route(web::post().to(login))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
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

use crate::admin_token::LOGIN_PATH;

/// The body of `POST /api/v1/login`. Not `Debug`: it holds the password.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordLogin {
    user: String,
    password: String,
    #[serde(default)]
    name: Option<String>,
}

async fn login(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let form: PasswordLogin = serde_json::from_slice(&body).map_err(|e| {
        // serde's message may quote the offending value, which could be the password.
        ApiError::BadRequest(format!(
            "invalid JSON (line {}, column {}): expected {{\"user\", \"password\", \"name\"?}}",
            e.line(),
            e.column()
        ))
    })?;
    let source = req.peer_addr().map(|a| a.ip());
    if state.users.contains(&form.user) {
        crate::audit::name_actor(&req, format!("user {} (logging in)", form.user));
    }
    match crate::web::login::check_password(&state, source, &form.user, form.password).await {
        Ok(()) => {}
        Err(PasswordRefusal::TooMany(retry_after_s)) => {
            return Err(ApiError::TooManyRequests { retry_after_s })
        }
        Err(PasswordRefusal::Wrong) => {
            tracing::warn!(source = ?source, "api-login-failed");
            return Err(ApiError::Unauthorized);
        }
        Err(PasswordRefusal::Unavailable) => return Err(ApiError::Unavailable),
    }
    let name = form.name.unwrap_or_else(|| "cli".to_owned());
    // Logging in again from the same place replaces that place's token.
    for old in state.api_tokens.list(Some(&form.user)) {
        if old.name == name {
            state.api_tokens.revoke(&old.id, Some(&form.user)).await?;
        }
    }
    let (info, token) = state
        .api_tokens
        .create(&state.users, &form.user, &name, None, Some(LOGIN_TTL_S))
        .await?;
    state.users.record_login(&form.user).await;
    crate::audit::name_actor(&req, format!("user {}", form.user));
    tracing::info!(source = ?source, user = %form.user, token = %info.id, "api-login");
    let mut answer = serde_json::to_value(&info).map_err(|_| ApiError::Unavailable)?;
    answer["token"] = json!(token.expose());
    Ok(HttpResponse::Created().json(answer))
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
    let mut tokens: Vec<_> = state.token.listed().into_iter().collect();
    tokens.extend(state.api_tokens.list(None));
    Ok(HttpResponse::Ok().json(tokens))
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
    if id == ADMIN_TOKEN_ID {
        if state.token.listed().is_none() {
            return Err(ApiError::NotFound);
        }
        state.token.revoke().await?;
    } else {
        state.api_tokens.revoke(&id, None).await?;
    }
    Ok(HttpResponse::Ok().json(json!({"id": id, "revoked": true})))
}
