//! The web application's users over the REST API (HTTPS listener, admin bearer token):
//! - `GET /api/v1/users` → `[{"name","created_unix_ms","password_changed_unix_ms",
//!   "last_login_unix_ms"}]`, sorted by name; never a password or its hash.
//! - `POST /api/v1/users` with `{"name","password","role"}` → 201 and the user as listed; 400
//!   with the rule broken (name: the agent name rules; password: at least 12 characters; role:
//!   `viewer` (the default), `deployer` or `admin`), 409 if the user exists.
//! - `PATCH /api/v1/users/{name}` with `{"role"}` → the user as listed; 404 if unknown, 409 for
//!   the last admin.
//! - `DELETE /api/v1/users/{name}` → `{"name","deleted":true}`; its web sessions end. 404 if
//!   unknown, 409 for the last user or the last admin.
//!
//! The handlers read the application state ([`crate::state::AppState`]: the users, their
//! sessions and the API token).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::api_error::{method_not_allowed, ApiError};
use crate::authz::Role;
use crate::state::AppState;
use crate::users::{hash_password, password_problem, UsersError};

/// Mounts the `/api/v1/users` routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/users")
            .route(web::get().to(list))
            .route(web::post().to(create))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/v1/users/{name}")
            .route(web::delete().to(delete))
            .route(web::patch().to(change))
            .default_service(web::to(method_not_allowed)),
    );
}

impl From<UsersError> for ApiError {
    fn from(e: UsersError) -> Self {
        match e {
            UsersError::Invalid(m) => ApiError::BadRequest(m),
            UsersError::Exists(_) | UsersError::Conflict(_) => ApiError::Conflict(e.to_string()),
            UsersError::NotFound | UsersError::BadCredentials => ApiError::NotFound,
            other => {
                tracing::error!(error = %other, "user-change-failed");
                ApiError::Unavailable
            }
        }
    }
}

/// The body of `POST /api/v1/users`. Not `Debug`: it holds the password.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    password: String,
    #[serde(default)]
    role: Option<String>,
}

/// The body of `PATCH /api/v1/users/{name}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserChange {
    role: String,
}

/// The user `name` as listed.
fn listed(state: &AppState, name: &str) -> Result<crate::users::UserInfo, ApiError> {
    state
        .users
        .list()
        .into_iter()
        .find(|u| u.name == name)
        .ok_or(ApiError::NotFound)
}

/// `GET /api/v1/users`.
async fn list(
    req: HttpRequest,
    api: web::Data<AppState>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    api.token.check(&req)?;
    Ok(HttpResponse::Ok().json(state.users.list()))
}

/// `POST /api/v1/users`.
async fn create(
    req: HttpRequest,
    body: web::Bytes,
    api: web::Data<AppState>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    api.token.check(&req)?;
    let new: NewUser = serde_json::from_slice(&body).map_err(|e| {
        // serde's message may quote the offending value, which could be the password.
        ApiError::BadRequest(format!(
            "invalid JSON (line {}, column {}): expected {{\"name\": \"...\", \"password\": \"...\", \"role\": \"viewer|deployer|admin\"}}",
            e.line(),
            e.column()
        ))
    })?;
    if let Some(problem) = tether_shared::enroll::name_problem("user name", &new.name) {
        return Err(ApiError::BadRequest(problem));
    }
    if let Some(problem) = password_problem(&new.password) {
        return Err(ApiError::BadRequest(problem));
    }
    let role = match &new.role {
        None => Role::Viewer,
        Some(name) => Role::parse(name).map_err(ApiError::BadRequest)?,
    };
    if state.users.contains(&new.name) {
        return Err(UsersError::Exists(new.name).into());
    }
    let password = new.password;
    let hash = web::block(move || hash_password(&password))
        .await
        .map_err(|_| ApiError::Unavailable)??;
    state.users.create(&new.name, hash, role).await?;
    tracing::info!(user = %new.name, role = %role, "api-user-created");
    Ok(HttpResponse::Created().json(listed(&state, &new.name)?))
}

/// `PATCH /api/v1/users/{name}`.
async fn change(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.token.check(&req)?;
    let name = path.into_inner();
    let change: UserChange = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "invalid JSON: {e}; expected {{\"role\": \"viewer|deployer|admin\"}}"
        ))
    })?;
    let role = Role::parse(&change.role).map_err(ApiError::BadRequest)?;
    state.users.set_role(&name, role, None).await?;
    tracing::info!(user = %name, role = %role, "api-user-role-changed");
    Ok(HttpResponse::Ok().json(listed(&state, &name)?))
}

/// `DELETE /api/v1/users/{name}`.
async fn delete(
    req: HttpRequest,
    path: web::Path<String>,
    api: web::Data<AppState>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    api.token.check(&req)?;
    let name = path.into_inner();
    state.users.delete(&name, None).await?;
    // A deleted user's sessions are refused anyway (`CurrentUser` checks the user exists).
    if let Err(e) = state.web_sessions.remove_user(&name).await {
        tracing::warn!(user = %name, error = %e, "web-sessions-not-removed");
    }
    if let Err(e) = state.api_tokens.remove_user(&name).await {
        tracing::warn!(user = %name, error = %e, "api-tokens-not-removed");
    }
    tracing::info!(user = %name, "api-user-deleted");
    Ok(HttpResponse::Ok().json(json!({"name": name, "deleted": true})))
}
