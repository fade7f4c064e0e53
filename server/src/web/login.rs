//! Logging in and out, and the account page.
//!
//! - `GET /login`, `POST /login` (user, password): argon2id check off the arbiter thread;
//!   success sets the session cookie and redirects to `/agents`. Attempts are counted per
//!   source address and per user name ([`LoginLimiter`]) *before* the password is checked (a
//!   success takes its count back), so a burst of parallel attempts cannot run more checks
//!   than the budget; past it: 429 until the window ends. At most [`CONCURRENT_CHECKS`]
//!   argon2id checks run at once (each holds about 19 MiB and a core); a login that waits
//!   [`CHECK_WAIT`] for one gets 429 and retries, so memory stays flat under a burst.
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
/// Password checks running at once, server-wide.
pub const CONCURRENT_CHECKS: usize = 2;
/// How long a login waits for a check slot before it is told to retry (429).
pub const CHECK_WAIT: Duration = Duration::from_secs(2);
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

    /// Counts an attempt of `key` now, unless it used up its budget: then the seconds until
    /// it may try again. Check and count are one step, so parallel attempts cannot overrun.
    pub fn attempt(&self, key: &K, now: Instant) -> Result<(), u64> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((started, failures)) = seen.get(key) {
            let elapsed = now.saturating_duration_since(*started);
            if *failures >= self.max && elapsed < self.window {
                return Err(self.window.saturating_sub(elapsed).as_secs().max(1));
            }
        }
        Self::count(&mut seen, key, now, self.window);
        Ok(())
    }

    /// Takes back one attempt of `key` (it succeeded, or was never checked).
    pub fn forgive(&self, key: &K) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, failures)) = seen.get_mut(key) {
            *failures = failures.saturating_sub(1);
        }
    }

    /// One more for `key` in its window (a new window if the last one ended); the table stays
    /// within [`MAX_TRACKED`] keys.
    fn count(seen: &mut HashMap<K, (Instant, u32)>, key: &K, now: Instant, window: Duration) {
        if seen.len() >= MAX_TRACKED && !seen.contains_key(key) {
            seen.retain(|_, (started, _)| now.saturating_duration_since(*started) < window);
            if seen.len() >= MAX_TRACKED {
                return;
            }
        }
        let entry = seen.entry(key.clone()).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// Login attempts per source address and per user name, and the password checks running.
#[derive(Debug)]
pub struct LoginLimiter {
    pub sources: Failures<IpAddr>,
    pub users: Failures<String>,
    /// Slots for argon2id checks ([`CONCURRENT_CHECKS`]).
    pub checks: tokio::sync::Semaphore,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        LoginLimiter {
            sources: Failures::new(FAILURES_PER_SOURCE, WINDOW),
            users: Failures::new(FAILURES_PER_USER, WINDOW),
            checks: tokio::sync::Semaphore::new(CONCURRENT_CHECKS),
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
    let limiter = &state.login_limiter;
    // Counted before the check: a burst of parallel attempts gets no more checks than the
    // budget. What turns out not to be a failure is taken back below.
    let forgive = |source_counted: bool, user_counted: bool| {
        if let (true, Some(ip)) = (source_counted, source) {
            limiter.sources.forgive(&ip);
        }
        if user_counted {
            limiter.users.forgive(&user_key);
        }
    };
    if let Some(Err(retry)) = source.map(|ip| limiter.sources.attempt(&ip, now)) {
        tracing::warn!(source = ?source, "web-login-limited");
        return Err(WebError::TooManyRequests(retry));
    }
    if let Err(retry) = limiter.users.attempt(&user_key, now) {
        forgive(true, false);
        tracing::warn!(source = ?source, user = %user_key.escape_debug(), "web-login-limited");
        return Err(WebError::TooManyRequests(retry));
    }
    let Ok(Ok(permit)) = tokio::time::timeout(CHECK_WAIT, limiter.checks.acquire()).await else {
        forgive(true, true);
        tracing::warn!(source = ?source, "web-login-busy");
        return Err(WebError::TooManyRequests(1));
    };
    let users = state.users.clone();
    let (name, password) = (form.user.clone(), form.password);
    let checked = web::block(move || users.verify(&name, &password)).await;
    drop(permit);
    if checked?.is_err() {
        tracing::warn!(source = ?source, user = %user_key.escape_debug(), "web-login-failed");
        let mut r = HttpResponse::Unauthorized();
        layout::secure_headers(&mut r);
        return Ok(r
            .content_type("text/html; charset=utf-8")
            .body(login_form(Some("Wrong user name or password.")).into_string()));
    }
    forgive(true, true);
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

async fn account(
    user: CurrentUser,
    query: web::Query<layout::Done>,
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
    fn attempts_are_counted_before_and_forgiven_after() {
        let f = Failures::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(f.attempt(&"a", t0), Ok(()));
        assert_eq!(f.attempt(&"a", t0), Ok(()));
        // The budget is spent by attempts, before any of them is known to fail.
        assert_eq!(f.attempt(&"a", t0 + Duration::from_secs(10)), Err(50));
        assert_eq!(f.attempt(&"b", t0), Ok(()));
        // A success takes its count back.
        f.forgive(&"a");
        assert_eq!(f.attempt(&"a", t0 + Duration::from_secs(10)), Ok(()));
        assert!(f.attempt(&"a", t0 + Duration::from_secs(10)).is_err());
        // A new window starts afresh.
        assert_eq!(f.attempt(&"a", t0 + Duration::from_secs(61)), Ok(()));
    }
}
