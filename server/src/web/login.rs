//! Logging in and out, and the account page.
//!
//! - `GET /login`, `POST /login` (user, password): argon2id check off the arbiter thread;
//!   success sets the session cookie and redirects to `/agents`. Attempts are counted per
//!   source address and per user name ([`super::login_limiter::LoginLimiter`]) *before* the password is checked (a
//!   success takes its count back), so a burst of parallel attempts cannot run more checks
//!   than the budget; past it: 429 until the window ends. At most [`super::login_limiter::CONCURRENT_CHECKS`]
//!   argon2id checks run at once (each holds about 19 MiB and a core); a login that waits
//!   [`super::login_limiter::CHECK_WAIT`] for one gets 429 and retries, so memory stays flat under a burst.
//! - `POST /logout`: ends the session (CSRF-checked, so no other site can log you out).
//! - `GET /account`, `POST /account/password`: change one's own password (the current one is
//!   required); the user's other sessions end. The page also holds the user's API tokens
//!   ([`super::api_tokens`]).

use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use maud::html;
use serde::Deserialize;

use super::layout::{self, csrf_field, resource};
use super::login_limiter::CHECK_WAIT;
use super::session::{self, CurrentUser};
use super::{csrf, WebError};
use crate::state::AppState;
use crate::users::{hash_password, password_problem, MAX_PASSWORD_LEN, MIN_PASSWORD_LEN};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/login")
            .route(web::get().to(login_page))
            .route(web::post().to(login)),
    )
    .service(resource("/logout").route(web::post().to(logout)))
    .service(resource("/account").route(web::get().to(account)))
    .service(resource("/account/password").route(web::post().to(change_password)));
}

fn login_form(error: Option<&str>) -> maud::Markup {
    layout::bare_page(
        "Log in",
        html! {
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form method="post" action="/login" {
                label for="user" { "User" }
                input #user type="text" name="user" autocomplete="username" required autofocus;
                label for="password" { "Password" }
                input #password type="password" name="password" autocomplete="current-password" required;
                button #login type="submit" { "Log in" }
            }
        },
    )
}

async fn login_page(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let logged_in = session::token_of(&req).and_then(|t| state.web_sessions.lookup(&t));
    if logged_in.is_some() {
        return layout::redirect("/agents");
    }
    layout::html(login_form(None))
}

#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
}

/// Why a password was not accepted.
pub enum PasswordRefusal {
    /// Too many failures from this source or for this user: retry after so many seconds.
    TooMany(u64),
    /// Wrong user name or password (one answer for both).
    Wrong,
    /// The check could not run.
    Unavailable,
}

/// Checks `password` for `user`, counted against the limits of the source and the user
/// *before* the check (a burst of parallel attempts gets no more checks than the budget; a
/// success takes its count back), with at most [`super::login_limiter::CONCURRENT_CHECKS`]
/// argon2id checks at once (waiting [`CHECK_WAIT`] at most). The web login and the CLI's
/// password login (`POST /api/v1/login`) both go through it.
pub async fn check_password(
    state: &AppState,
    source: Option<std::net::IpAddr>,
    user: &str,
    password: String,
) -> Result<(), PasswordRefusal> {
    let now = Instant::now();
    let user_key = user.chars().take(64).collect::<String>();
    let limiter = &state.login_limiter;
    let forgive = |source_counted: bool, user_counted: bool| {
        if let (true, Some(ip)) = (source_counted, source) {
            limiter.sources.forgive(&ip);
        }
        if user_counted {
            limiter.users.forgive(&user_key);
        }
    };
    if let Some(Err(retry)) = source.map(|ip| limiter.sources.attempt(&ip, now)) {
        tracing::warn!(source = ?source, "login-limited");
        return Err(PasswordRefusal::TooMany(retry));
    }
    if let Err(retry) = limiter.users.attempt(&user_key, now) {
        forgive(true, false);
        tracing::warn!(source = ?source, user = %user_key.escape_debug(), "login-limited");
        return Err(PasswordRefusal::TooMany(retry));
    }
    let Ok(Ok(permit)) = tokio::time::timeout(CHECK_WAIT, limiter.checks.acquire()).await else {
        forgive(true, true);
        tracing::warn!(source = ?source, "login-busy");
        return Err(PasswordRefusal::TooMany(1));
    };
    let users = state.users.clone();
    let name = user.to_owned();
    let checked = web::block(move || users.verify(&name, &password)).await;
    drop(permit);
    match checked {
        Ok(Ok(())) => {
            forgive(true, true);
            Ok(())
        }
        Ok(Err(_)) => Err(PasswordRefusal::Wrong),
        Err(_) => {
            forgive(true, true);
            Err(PasswordRefusal::Unavailable)
        }
    }
}

async fn login(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    csrf::check_origin(&req)?;
    let form: LoginForm = serde_urlencoded::from_bytes(&body)
        .map_err(|_| WebError::BadRequest("the form needs a user and a password".into()))?;
    // The audit log names an existing user tried; anything else typed there (a password typed
    // into the wrong field) stays out of it.
    let tried = if state.users.contains(&form.user) {
        format!("user {} (logging in)", form.user)
    } else {
        "anonymous (logging in as an unknown user)".to_owned()
    };
    crate::audit::name_actor(&req, tried);
    let source = req.peer_addr().map(|a| a.ip());
    let user_key = form.user.chars().take(64).collect::<String>();
    match check_password(&state, source, &form.user, form.password).await {
        Ok(()) => {}
        Err(PasswordRefusal::TooMany(retry)) => return Err(WebError::TooManyRequests(retry)),
        Err(PasswordRefusal::Unavailable) => {
            return Err(WebError::Unavailable("the server is busy; retry".into()))
        }
        Err(PasswordRefusal::Wrong) => {
            tracing::warn!(source = ?source, user = %user_key.escape_debug(), "web-login-failed");
            let mut r = HttpResponse::Unauthorized();
            layout::secure_headers(&mut r);
            return Ok(r
                .content_type("text/html; charset=utf-8")
                .body(login_form(Some("Wrong user name or password.")).into_string()));
        }
    }
    state.users.record_login(&form.user).await;
    let token = state
        .web_sessions
        .create(&form.user)
        .await
        .map_err(|e| WebError::Unavailable(e.to_string()))?;
    tracing::info!(source = ?source, user = %form.user, "web-login");
    crate::audit::name_actor(&req, format!("user {}", form.user));
    let mut r = layout::redirect("/agents");
    r.add_cookie(&session::cookie(&token))
        .map_err(|e| WebError::Unavailable(e.to_string()))?;
    Ok(r)
}

async fn logout(
    req: HttpRequest,
    user: CurrentUser,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let _: layout::Empty = csrf::protected_form(&req, &user, &body)?;
    if let Some(token) = session::token_of(&req) {
        state
            .web_sessions
            .remove(&token)
            .await
            .map_err(|e| WebError::Unavailable(e.to_string()))?;
    }
    tracing::info!(user = %user.name, "web-logout");
    let mut r = layout::redirect("/login");
    r.add_cookie(&session::removal_cookie())
        .map_err(|e| WebError::Unavailable(e.to_string()))?;
    Ok(r)
}

async fn account(
    user: CurrentUser,
    query: web::Query<layout::Done>,
    state: web::Data<AppState>,
) -> HttpResponse {
    account_page(&user, &state, query.done.as_deref(), None)
}

/// The account page; `made`: an API token just made, shown this once.
pub fn account_page(
    user: &CurrentUser,
    state: &AppState,
    done: Option<&str>,
    made: Option<&str>,
) -> HttpResponse {
    let users = state.users.names();
    layout::page(
        "Account",
        user,
        "/account",
        html! {
            (layout::notice(done))
            p { "Logged in as " strong { (user.name) } ". Users: " (users.join(", ")) "." }
            form.card method="post" action="/account/password" {
                (csrf_field(user))
                h2 { "Change password" }
                label for="current" { "Current password" }
                input #current type="password" name="current" autocomplete="current-password" required;
                label for="new" { "New password (" (MIN_PASSWORD_LEN) " to " (MAX_PASSWORD_LEN) " characters)" }
                input #new type="password" name="new" autocomplete="new-password" required minlength=(MIN_PASSWORD_LEN);
                label for="confirm" { "New password again" }
                input #confirm type="password" name="confirm" autocomplete="new-password" required;
                button type="submit" { "Change password" }
            }
            (super::api_tokens::section(user, state, made))
        },
    )
}

#[derive(Deserialize)]
struct PasswordForm {
    current: String,
    new: String,
    confirm: String,
}

async fn change_password(
    req: HttpRequest,
    user: CurrentUser,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebError> {
    let form: PasswordForm = csrf::protected_form(&req, &user, &body)?;
    if form.new != form.confirm {
        return Err(WebError::BadRequest("the new passwords differ".into()));
    }
    if let Some(problem) = password_problem(&form.new) {
        return Err(WebError::BadRequest(problem));
    }
    let users = state.users.clone();
    let name = user.name.clone();
    let hash = web::block(move || {
        users.verify(&name, &form.current)?;
        hash_password(&form.new)
    })
    .await??;
    state.users.set_password(&user.name, hash).await?;
    if let Some(token) = session::token_of(&req) {
        state
            .web_sessions
            .remove_others(&user.name, &token)
            .await
            .map_err(|e| WebError::Unavailable(e.to_string()))?;
    }
    Ok(layout::redirect("/account?done=password"))
}
