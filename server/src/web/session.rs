//! Login sessions: a random 32-byte token in the cookie `tether_session` (`HttpOnly; Secure;
//! SameSite=Strict; Path=/`), stored server-side only as its sha256, with the user, a random
//! CSRF token and an expiry (idle and absolute). Kept in memory and in the journal (`websession/`
//! meta entries), so a restart, or another node of a cluster taking over, keeps everyone logged
//! in. Logout deletes the session (durably, before it answers); the idle timer is written back
//! at most every [`TOUCH_EVERY`], so a session may end up to that much sooner after a takeover.
//!
//! [`CurrentUser`] is the extractor every page takes: no valid session → redirect to `/login`.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use actix_web::cookie::{Cookie, SameSite};
use actix_web::HttpRequest;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tether_shared::clock::now_unix_ms;
use tether_shared::journal::{JournalError, JournalHandle, Op};

use crate::authz::Role;

/// The session cookie's name.
pub const COOKIE: &str = "tether_session";
/// A session ends this long after its last request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
/// ... and at the latest this long after the login.
pub const MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// How stale the journaled idle timer may get.
pub const TOUCH_EVERY: Duration = Duration::from_secs(5 * 60);
/// Sessions held at most; past it the oldest is dropped.
const MAX_SESSIONS: usize = 10_000;
/// Journal meta prefix: `websession/<sha256 hex of the cookie value>`.
const PREFIX: &str = "websession/";

/// One logged-in session, as kept (times in Unix ms).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Session {
    user: String,
    /// Rendered into every form; required on every state change.
    csrf: String,
    created_unix_ms: u64,
    last_used_unix_ms: u64,
    /// The idle timer as last journaled.
    #[serde(skip)]
    touched_unix_ms: u64,
}

impl Session {
    fn expired(&self, now: u64) -> bool {
        now.saturating_sub(self.last_used_unix_ms) >= IDLE_TIMEOUT.as_millis() as u64
            || now.saturating_sub(self.created_unix_ms) >= MAX_AGE.as_millis() as u64
    }
}

/// Every session, by the sha256 of its cookie value.
#[derive(Default)]
pub struct SessionStore {
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    /// Where sessions are kept (`None`: in memory only, for tests).
    journal: Option<JournalHandle>,
}

/// The logged-in user of a request.
#[derive(Debug, Clone)]
pub struct CurrentUser {
    pub name: String,
    /// The session's CSRF token, for the forms of the page.
    pub csrf: String,
    /// What the user may do (read from the users at each request, so a change of role
    /// applies at once).
    pub role: Role,
}

impl CurrentUser {
    /// Whether the user may post to `path` (pages show only the forms the user may use).
    pub fn may_post(&self, path: &str) -> bool {
        self.role.may(&actix_web::http::Method::POST, path)
    }
}

fn key_of(digest: &[u8; 32]) -> String {
    format!("{PREFIX}{}", hex::encode(digest))
}

fn put(digest: &[u8; 32], session: &Session) -> Op {
    Op::PutMeta {
        key: key_of(digest),
        value: serde_json::to_vec(session).unwrap_or_default(),
    }
}

fn delete(digest: &[u8; 32]) -> Op {
    Op::DeleteMeta {
        key: key_of(digest),
    }
}

impl SessionStore {
    /// The sessions the journal holds that have not expired.
    pub fn load(journal: JournalHandle) -> Result<SessionStore, JournalError> {
        let now = now_unix_ms();
        let mut sessions = HashMap::new();
        for (key, value) in journal.scan_meta(PREFIX)? {
            let digest = key
                .strip_prefix(PREFIX)
                .and_then(|h| hex::decode(h).ok())
                .and_then(|d| <[u8; 32]>::try_from(d).ok());
            let session = serde_json::from_slice::<Session>(&value).ok();
            if let (Some(digest), Some(mut session)) = (digest, session) {
                if !session.expired(now) {
                    session.touched_unix_ms = session.last_used_unix_ms;
                    sessions.insert(digest, session);
                }
            }
        }
        tracing::info!(sessions = sessions.len(), "web-sessions-loaded");
        Ok(SessionStore {
            sessions: Mutex::new(sessions),
            journal: Some(journal),
        })
    }

    async fn commit(&self, ops: Vec<Op>) -> Result<(), JournalError> {
        match &self.journal {
            Some(j) if !ops.is_empty() => j.commit(ops).await.map(|_| ()),
            _ => Ok(()),
        }
    }

    /// Journal `ops` in the background (a refreshed idle timer, an expired session's delete).
    fn commit_later(&self, ops: Vec<Op>) {
        if let Some(j) = self.journal.clone() {
            actix_rt::spawn(async move {
                if let Err(e) = j.commit(ops).await {
                    tracing::warn!(error = %e, "web-session-write-failed");
                }
            });
        }
    }

    /// Starts a session for `user` (durable before it answers); answers the cookie value.
    pub async fn create(&self, user: &str) -> Result<String, JournalError> {
        let token = random_token();
        let now = now_unix_ms();
        let session = Session {
            user: user.to_owned(),
            csrf: random_token(),
            created_unix_ms: now,
            last_used_unix_ms: now,
            touched_unix_ms: now,
        };
        let digest = digest(&token);
        let mut ops = vec![put(&digest, &session)];
        {
            let mut sessions = self.lock();
            if sessions.len() >= MAX_SESSIONS {
                let before: Vec<[u8; 32]> = sessions.keys().copied().collect();
                sessions.retain(|_, s| !s.expired(now));
                if sessions.len() >= MAX_SESSIONS {
                    let oldest = sessions
                        .iter()
                        .min_by_key(|(_, s)| s.last_used_unix_ms)
                        .map(|(k, _)| *k);
                    if let Some(k) = oldest {
                        sessions.remove(&k);
                    }
                }
                ops.extend(
                    before
                        .iter()
                        .filter(|k| !sessions.contains_key(*k))
                        .map(delete),
                );
            }
        }
        self.commit(ops).await?;
        self.lock().insert(digest, session);
        Ok(token)
    }

    /// The user of the session with cookie value `token`, refreshing its idle timer.
    pub fn lookup(&self, token: &str) -> Option<CurrentUser> {
        let now = now_unix_ms();
        let key = digest(token);
        let mut sessions = self.lock();
        let session = sessions.get_mut(&key)?;
        if session.expired(now) {
            sessions.remove(&key);
            drop(sessions);
            self.commit_later(vec![delete(&key)]);
            return None;
        }
        session.last_used_unix_ms = now;
        let user = CurrentUser {
            name: session.user.clone(),
            csrf: session.csrf.clone(),
            // Set from the users by the extractor.
            role: Role::Viewer,
        };
        if now.saturating_sub(session.touched_unix_ms) >= TOUCH_EVERY.as_millis() as u64 {
            session.touched_unix_ms = now;
            let op = put(&key, session);
            drop(sessions);
            self.commit_later(vec![op]);
        }
        Some(user)
    }

    /// Ends the sessions `gone` picks (at once here, then durably).
    async fn end(&self, gone: impl Fn(&[u8; 32], &Session) -> bool) -> Result<(), JournalError> {
        let ops: Vec<Op> = {
            let mut sessions = self.lock();
            let keys: Vec<[u8; 32]> = sessions
                .iter()
                .filter(|(k, s)| gone(k, s))
                .map(|(k, _)| *k)
                .collect();
            for k in &keys {
                sessions.remove(k);
            }
            keys.iter().map(delete).collect()
        };
        self.commit(ops).await
    }

    /// Ends the session with cookie value `token`.
    pub async fn remove(&self, token: &str) -> Result<(), JournalError> {
        let key = digest(token);
        self.end(|k, _| *k == key).await
    }

    /// Ends every session of `user` but the one with cookie value `keep` (a password change).
    pub async fn remove_others(&self, user: &str, keep: &str) -> Result<(), JournalError> {
        let keep = digest(keep);
        self.end(|k, s| s.user == user && *k != keep).await
    }

    /// Ends every session of `user` (the user was deleted).
    pub async fn remove_user(&self, user: &str) -> Result<(), JournalError> {
        self.end(|_, s| s.user == user).await
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

    #[actix::test]
    async fn sessions_resolve_until_removed_and_survive_a_reload() {
        let tmp = tempfile::tempdir().unwrap();
        let (journal, _) = tether_shared::journal::Journal::open(
            &tmp.path().join("j"),
            &tether_shared::journal::JournalOptions::default(),
        )
        .unwrap();
        let store = SessionStore::load(journal.handle()).unwrap();
        let a = store.create("alice").await.unwrap();
        let b = store.create("alice").await.unwrap();
        assert_ne!(a, b);
        let user = store.lookup(&a).unwrap();
        assert_eq!(user.name, "alice");
        assert_ne!(user.csrf, store.lookup(&b).unwrap().csrf);
        assert!(store.lookup("forged").is_none());
        // Another node (or a restart) sees the same sessions, CSRF tokens included.
        let again = SessionStore::load(journal.handle()).unwrap();
        assert_eq!(again.lookup(&a).unwrap().csrf, user.csrf);
        store.remove_others("alice", &a).await.unwrap();
        assert!(store.lookup(&b).is_none());
        store.remove(&a).await.unwrap();
        assert!(store.lookup(&a).is_none());
        let c = store.create("bob").await.unwrap();
        let d = store.create("carol").await.unwrap();
        store.remove_user("bob").await.unwrap();
        assert!(store.lookup(&c).is_none());
        assert!(store.lookup(&d).is_some());
        let again = SessionStore::load(journal.handle()).unwrap();
        for gone in [&a, &b, &c] {
            assert!(again.lookup(gone).is_none(), "an ended session came back");
        }
        assert_eq!(again.lookup(&d).unwrap().name, "carol");
    }

    #[test]
    fn the_cookie_is_locked_down() {
        let c = cookie("t").to_string();
        for part in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
            assert!(c.contains(part), "{c}");
        }
    }
}
