//! Logging in and out, and the account page.
//!
//! - `GET /login`, `POST /login` (user, password): argon2id check off the arbiter thread;
//!   success sets the session cookie and redirects to `/agents`. Failures are counted per
//!   source address and per user name ([`LoginLimiter`]); past the budget: 429 until the
//!   window ends, without checking the password at all.
//! - `POST /logout`: ends the session (CSRF-checked, so no other site can log you out).
//! - `GET /account`, `POST /account/password`: change one's own password (the current one is
//!   required); the user's other sessions end.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use maud::html;
use serde::Deserialize;

use super::layout::{self, csrf_field, resource};
use super::session::{self, CurrentUser};
use super::{csrf, WebError, WebState};
use crate::users::{hash_password, password_problem, MAX_PASSWORD_LEN, MIN_PASSWORD_LEN};

/// Failed logins one source address may make per window.
pub const FAILURES_PER_SOURCE: u32 = 10;
/// Failed logins for one user name per window (from anywhere).
pub const FAILURES_PER_USER: u32 = 30;
/// The counting window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Keys tracked at most per table; past it, expired windows are dropped, then new keys go
/// untracked rather than letting the table grow without bound.
const MAX_TRACKED: usize = 100_000;

/// Counts failures per key in fixed windows.
#[derive(Debug)]
pub struct Failures<K> {
    max: u32,
    window: Duration,
    seen: Mutex<HashMap<K, (Instant, u32)>>,
}

impl<K: Hash + Eq + Clone> Failures<K> {
    pub fn new(max: u32, window: Duration) -> Self {
        Failures {
            max,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds until `key` may try again, if it used up its failures.
    pub fn blocked(&self, key: &K, now: Instant) -> Option<u64> {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let (started, failures) = seen.get(key)?;
        let elapsed = now.saturating_duration_since(*started);
        (*failures >= self.max && elapsed < self.window)
            .then(|| self.window.saturating_sub(elapsed).as_secs().max(1))
    }

    pub fn record(&self, key: &K, now: Instant) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.len() >= MAX_TRACKED && !seen.contains_key(key) {
            let window = self.window;
            seen.retain(|_, (started, _)| now.saturating_duration_since(*started) < window);
            if seen.len() >= MAX_TRACKED {
                return;
            }
        }
        let entry = seen.entry(key.clone()).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// Failed logins per source address and per user name.
#[derive(Debug)]
pub struct LoginLimiter {
    pub sources: Failures<IpAddr>,
    pub users: Failures<String>,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        LoginLimiter {
            sources: Failures::new(FAILURES_PER_SOURCE, WINDOW),
            users: Failures::new(FAILURES_PER_USER, WINDOW),
        }
    }
}

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

async fn login_page(req: HttpRequest, state: web::Data<WebState>) -> HttpResponse {
    let logged_in = session::token_of(&req).and_then(|t| state.sessions.lookup(&t));
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

async fn login(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<WebState>,
) -> Result<HttpResponse, WebError> {
    csrf::check_origin(&req)?;
    let form: LoginForm = serde_urlencoded::from_bytes(&body)
        .map_err(|_| WebError::BadRequest("the form needs a user and a password".into()))?;
    let now = Instant::now();
    let source = req.peer_addr().map(|a| a.ip());
    let user_key = form.user.chars().take(64).collect::<String>();
    let blocked = source
        .and_then(|ip| state.login_limiter.sources.blocked(&ip, now))
        .or_else(|| state.login_limiter.users.blocked(&user_key, now));
    if let Some(retry) = blocked {
        tracing::warn!(source = ?source, "web-login-limited");
        return Err(WebError::TooManyRequests(retry));
    }
    let users = state.users.clone();
    let (name, password) = (form.user.clone(), form.password);
    let checked = web::block(move || users.verify(&name, &password)).await?;
    if checked.is_err() {
        if let Some(ip) = source {
            state.login_limiter.sources.record(&ip, now);
        }
        state.login_limiter.users.record(&user_key, now);
        tracing::warn!(source = ?source, user = %user_key.escape_debug(), "web-login-failed");
        let mut r = HttpResponse::Unauthorized();
        layout::secure_headers(&mut r);
        return Ok(r
            .content_type("text/html; charset=utf-8")
            .body(login_form(Some("Wrong user name or password.")).into_string()));
    }
    state.users.record_login(&form.user).await;
    let token = state.sessions.create(&form.user);
    tracing::info!(source = ?source, user = %form.user, "web-login");
    let mut r = layout::redirect("/agents");
    r.add_cookie(&session::cookie(&token))
        .map_err(|e| WebError::Unavailable(e.to_string()))?;
    Ok(r)
}

async fn logout(
    req: HttpRequest,
    user: CurrentUser,
    body: web::Bytes,
    state: web::Data<WebState>,
) -> Result<HttpResponse, WebError> {
    let _: layout::Empty = csrf::protected_form(&req, &user, &body)?;
    if let Some(token) = session::token_of(&req) {
        state.sessions.remove(&token);
    }
    tracing::info!(user = %user.name, "web-logout");
    let mut r = layout::redirect("/login");
    r.add_cookie(&session::removal_cookie())
        .map_err(|e| WebError::Unavailable(e.to_string()))?;
    Ok(r)
}

#[derive(Deserialize)]
struct Done {
    done: Option<String>,
}

async fn account(
    user: CurrentUser,
    query: web::Query<Done>,
    state: web::Data<WebState>,
) -> HttpResponse {
    let users = state.users.names();
    layout::page(
        "Account",
        &user,
        "/account",
        html! {
            (layout::notice(query.done.as_deref()))
            p { "Logged in as " strong { (user.name) } ". Users: " (users.join(", ")) "." }
            form.card method="post" action="/account/password" {
                (csrf_field(&user))
                h2 { "Change password" }
                label for="current" { "Current password" }
                input #current type="password" name="current" autocomplete="current-password" required;
                label for="new" { "New password (" (MIN_PASSWORD_LEN) " to " (MAX_PASSWORD_LEN) " characters)" }
                input #new type="password" name="new" autocomplete="new-password" required minlength=(MIN_PASSWORD_LEN);
                label for="confirm" { "New password again" }
                input #confirm type="password" name="confirm" autocomplete="new-password" required;
                button type="submit" { "Change password" }
            }
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
    state: web::Data<WebState>,
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
        state.sessions.remove_others(&user.name, &token);
    }
    Ok(layout::redirect("/account?done=password"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn failures_block_per_key_and_window() {
        let f = Failures::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        f.record(&"a", t0);
        assert_eq!(f.blocked(&"a", t0), None);
        f.record(&"a", t0);
        assert_eq!(f.blocked(&"a", t0 + Duration::from_secs(10)), Some(50));
        assert_eq!(f.blocked(&"b", t0), None);
        assert_eq!(f.blocked(&"a", t0 + Duration::from_secs(61)), None);
    }
}
