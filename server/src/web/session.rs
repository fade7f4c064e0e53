//! Login sessions: a random 32-byte token in the cookie `tether_session` (`HttpOnly; Secure;
//! SameSite=Strict; Path=/`), stored server-side only as its sha256, with the user, a random
//! CSRF token and an expiry (idle and absolute). Held in memory: a server restart logs everyone
//! out. Logout deletes the session.
//!
//! [`CurrentUser`] is the extractor every page takes: no valid session → redirect to `/login`.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix_web::cookie::{Cookie, SameSite};
use actix_web::HttpRequest;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The session cookie's name.
pub const COOKIE: &str = "tether_session";
/// A session ends this long after its last request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
/// ... and at the latest this long after the login.
pub const MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// Sessions held at most; past it the oldest is dropped.
const MAX_SESSIONS: usize = 10_000;

/// One logged-in session.
#[derive(Debug, Clone)]
struct Session {
    user: String,
    /// Rendered into every form; required on every state change.
    csrf: String,
    created: Instant,
    last_used: Instant,
}

impl Session {
    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_used) >= IDLE_TIMEOUT
            || now.saturating_duration_since(self.created) >= MAX_AGE
    }
}

/// Every session, by the sha256 of its cookie value.
#[derive(Debug, Default)]
pub struct SessionStore {
    sessions: Mutex<HashMap<[u8; 32], Session>>,
}

/// The logged-in user of a request.
#[derive(Debug, Clone)]
pub struct CurrentUser {
    pub name: String,
    /// The session's CSRF token, for the forms of the page.
    pub csrf: String,
}

impl SessionStore {
    /// Starts a session for `user`; answers the cookie value to set.
    pub fn create(&self, user: &str) -> String {
        let token = random_token();
        let now = Instant::now();
        let session = Session {
            user: user.to_owned(),
            csrf: random_token(),
            created: now,
            last_used: now,
        };
        let mut sessions = self.lock();
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, s| !s.expired(now));
            if sessions.len() >= MAX_SESSIONS {
                let oldest = sessions
                    .iter()
                    .min_by_key(|(_, s)| s.last_used)
                    .map(|(k, _)| *k);
                if let Some(k) = oldest {
                    sessions.remove(&k);
                }
            }
        }
        sessions.insert(digest(&token), session);
        token
    }

    /// The user of the session with cookie value `token`, refreshing its idle timer.
    pub fn lookup(&self, token: &str) -> Option<CurrentUser> {
        let now = Instant::now();
        let key = digest(token);
        let mut sessions = self.lock();
        let session = sessions.get_mut(&key)?;
        if session.expired(now) {
            sessions.remove(&key);
            return None;
        }
        session.last_used = now;
        Some(CurrentUser {
            name: session.user.clone(),
            csrf: session.csrf.clone(),
        })
    }

    /// Ends the session with cookie value `token`.
    pub fn remove(&self, token: &str) {
        self.lock().remove(&digest(token));
    }

    /// Ends every session of `user` but the one with cookie value `keep` (a password change).
    pub fn remove_others(&self, user: &str, keep: &str) {
        let keep = digest(keep);
        self.lock().retain(|k, s| s.user != user || *k == keep);
    }

    /// Ends every session of `user` (the user was deleted).
    pub fn remove_user(&self, user: &str) {
        self.lock().retain(|_, s| s.user != user);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The session cookie for `token`.
pub fn cookie(token: &str) -> Cookie<'static> {
    Cookie::build(COOKIE, token.to_owned())
        .http_only(true)
        .secure(true)
        .same_site(SameSite::Strict)
        .path("/")
        .finish()
}

/// A cookie that deletes the session cookie in the browser.
pub fn removal_cookie() -> Cookie<'static> {
    let mut c = cookie("");
    c.make_removal();
    c
}

/// The session cookie's value in `req`, if any.
pub fn token_of(req: &HttpRequest) -> Option<String> {
    req.cookie(COOKIE).map(|c| c.value().to_owned())
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// 32 random bytes, base64url without padding.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn sessions_resolve_until_removed() {
        let store = SessionStore::default();
        let a = store.create("alice");
        let b = store.create("alice");
        assert_ne!(a, b);
        let user = store.lookup(&a).unwrap();
        assert_eq!(user.name, "alice");
        assert_ne!(user.csrf, store.lookup(&b).unwrap().csrf);
        assert!(store.lookup("forged").is_none());
        store.remove_others("alice", &a);
        assert!(store.lookup(&b).is_none());
        store.remove(&a);
        assert!(store.lookup(&a).is_none());
        let c = store.create("bob");
        let d = store.create("carol");
        store.remove_user("bob");
        assert!(store.lookup(&c).is_none());
        assert!(store.lookup(&d).is_some());
    }

    #[test]
    fn the_cookie_is_locked_down() {
        let c = cookie("t").to_string();
        for part in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
            assert!(c.contains(part), "{c}");
        }
    }
}
