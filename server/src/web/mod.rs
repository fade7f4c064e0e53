//! The web application for people, on the HTTPS listener beside the REST API: plain
//! server-rendered HTML (maud templates: every string is escaped unless wrapped in
//! `PreEscaped`, which this module never does with data) and one small static script that
//! polls the application's own JSON endpoints. No front-end build step.
//!
//! - [`session`]: login sessions (random cookie `tether_session`, hashed server-side, in
//!   memory) and the [`session::CurrentUser`] extractor every page takes.
//! - [`csrf`]: the per-session CSRF token every state change must carry, and the same-origin
//!   check.
//! - [`layout`]: the page frame, the security headers, the static files, formatting helpers.
//! - [`login`]: `/login`, `/logout`, `/account` (password change); failed logins rate-limited.
//! - [`api_tokens`]: the account page's API tokens (make, show once, revoke).
//! - [`audit`]: `/audit`, the audit log (admins).
//! - [`agents`]: `/agents` (paged, searchable), `/agents/{id}` (tags, properties, upgrade,
//!   delete).
//! - [`relays`]: the relays page, `/relays` (and delete: revoke a relay).
//! - [`tokens`]: `/tokens` (enrollment tokens: list, create and show once, revoke).
//! - [`bulk`]: `/plugins`, `/artifacts` (lists; uploads stay with the CLI and REST API).
//! - [`processes`]: `/processes` (list, create from JSON), `/processes/{name}`.
//! - [`deployments`]: `/deployments` (list, start), `/deployments/{id}` (live status and logs,
//!   cancel) and its JSON under `/ui/`.
//! - [`health`]: `/health`, the `/admin/health` observation as a page.
//! - [`users`]: `/users` (list, create, delete, change role; admins only, see [`crate::authz`]).
//!
//! Every response of these routes carries a strict Content-Security-Policy (`default-src
//! 'self'`: no inline script or style runs), `X-Content-Type-Options: nosniff`,
//! `X-Frame-Options: DENY` and `Referrer-Policy: same-origin`. GET handlers change nothing;
//! every POST checks the origin, the session and its CSRF token before it reads anything else.

pub mod agents;
pub mod api_tokens;
pub mod audit;
pub mod bulk;
pub mod csrf;
pub mod deployments;
pub mod health;
pub mod layout;
pub mod login;
pub mod login_limiter;
pub mod processes;
pub mod relays;
pub mod session;
pub mod tokens;
pub mod users;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse, ResponseError};

use crate::agent_admin::AgentsError;
use crate::api_error::ApiError;
use crate::users::UsersError;

/// Mounts every page, form target, JSON endpoint and static file of the web application.
pub fn configure(cfg: &mut web::ServiceConfig) {
    layout::configure(cfg);
    login::configure(cfg);
    api_tokens::configure(cfg);
    audit::configure(cfg);
    agents::configure(cfg);
    relays::configure(cfg);
    tokens::configure(cfg);
    bulk::configure(cfg);
    processes::configure(cfg);
    deployments::configure(cfg);
    health::configure(cfg);
    users::configure(cfg);
}

/// A web request that failed; rendered as a small HTML page (or a redirect to the login).
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// No valid session: go to the login page.
    #[error("log in first")]
    LoginRequired,
    /// Missing or wrong CSRF token, or a cross-origin state change: nothing was done.
    #[error("{0}")]
    Forbidden(String),
    #[error("not found")]
    NotFound,
    /// The input breaks a rule; the message says which.
    #[error("{0}")]
    BadRequest(String),
    /// Conflicts with what exists (an agent with running jobs, ...).
    #[error("{0}")]
    Conflict(String),
    #[error("too many failed attempts, retry in {0} s")]
    TooManyRequests(u64),
    /// Storage or an actor failed; nothing (or only what the message says) was changed.
    #[error("{0}")]
    Unavailable(String),
}

impl ResponseError for WebError {
    fn status_code(&self) -> StatusCode {
        match self {
            WebError::LoginRequired => StatusCode::SEE_OTHER,
            WebError::Forbidden(_) => StatusCode::FORBIDDEN,
            WebError::NotFound => StatusCode::NOT_FOUND,
            WebError::BadRequest(_) => StatusCode::BAD_REQUEST,
            WebError::Conflict(_) => StatusCode::CONFLICT,
            WebError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            WebError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let WebError::LoginRequired = self {
            return layout::redirect("/login");
        }
        let mut response = HttpResponse::build(self.status_code());
        layout::secure_headers(&mut response);
        if let WebError::TooManyRequests(s) = self {
            response.insert_header((actix_web::http::header::RETRY_AFTER, s.to_string()));
        }
        response
            .content_type("text/html; charset=utf-8")
            .body(layout::error_page(self.status_code(), &self.to_string()).into_string())
    }
}

impl From<ApiError> for WebError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::NotFound => WebError::NotFound,
            ApiError::BadRequest(m) => WebError::BadRequest(m),
            ApiError::Conflict(m) => WebError::Conflict(m),
            ApiError::TooManyRequests { retry_after_s } => WebError::TooManyRequests(retry_after_s),
            ApiError::Forbidden(m) => WebError::Forbidden(m),
            ApiError::Unauthorized | ApiError::InvalidEnrollmentToken => {
                WebError::Forbidden(e.to_string())
            }
            other => WebError::Unavailable(other.to_string()),
        }
    }
}

impl From<AgentsError> for WebError {
    fn from(e: AgentsError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<UsersError> for WebError {
    fn from(e: UsersError) -> Self {
        match e {
            UsersError::Invalid(m) => WebError::BadRequest(m),
            UsersError::Exists(_) | UsersError::Conflict(_) => WebError::Conflict(e.to_string()),
            UsersError::NotFound => WebError::NotFound,
            UsersError::BadCredentials => WebError::Forbidden(e.to_string()),
            other => {
                tracing::error!(error = %other, "user-change-failed");
                WebError::Unavailable("storage unavailable, nothing was changed".into())
            }
        }
    }
}

impl From<actix_web::error::BlockingError> for WebError {
    fn from(_: actix_web::error::BlockingError) -> Self {
        WebError::Unavailable("the server is busy; retry".into())
    }
}

/// The logged-in user of a request: no valid session → redirect to `/login`; a user whose
/// role may not make this request ([`crate::authz::required`]) → 403, before the handler runs.
/// Every page and form takes it, so this is where the web application enforces roles.
impl actix_web::FromRequest for session::CurrentUser {
    type Error = WebError;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(req: &actix_web::HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        std::future::ready(current_user(req))
    }
}

fn current_user(req: &actix_web::HttpRequest) -> Result<session::CurrentUser, WebError> {
    let state = req
        .app_data::<web::Data<crate::state::AppState>>()
        .ok_or(WebError::LoginRequired)?;
    let token = session::token_of(req).ok_or(WebError::LoginRequired)?;
    let mut user = state
        .web_sessions
        .lookup(&token)
        .ok_or(WebError::LoginRequired)?;
    // A deleted user's sessions are ended; this also covers a login racing the delete.
    user.role = state
        .users
        .role_of(&user.name)
        .ok_or(WebError::LoginRequired)?;
    if !user.role.may(req.method(), req.path()) {
        tracing::warn!(user = %user.name, role = %user.role, method = %req.method(), path = %req.path(), "web-request-refused-by-role");
        return Err(WebError::Forbidden(format!(
            "your role ({}) may not do this; an admin can change it on the users page",
            user.role
        )));
    }
    Ok(user)
}
