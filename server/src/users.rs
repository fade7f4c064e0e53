//! [`Users`]: the people who may log in to the web application, with argon2id password hashes.
//!
//! Users live in the journal's meta entries as JSON, `user/<name>` → [`StoredUser`]; every
//! change is committed (flushed and fdatasync'ed) before the in-memory map changes, as the
//! registry does for agents. A password is never stored or logged: only its PHC string
//! (`$argon2id$v=19$m=...,t=...,p=...$<salt>$<hash>`, random 16-byte salt per hash).
//!
//! The first user: `tether-server init` writes a random password to `DATA/admin.password`
//! (0600) and prints it once; at `run`, if no user exists yet, [`Users::ensure_initial_admin`]
//! creates user `admin` with that password (a data directory initialized before the web
//! application existed gets a new file first). The operator should change it on the account
//! page; the file is only read while no user exists.
//!
//! Users are created and deleted on the web application's users page, over REST
//! (`/api/v1/users`) and with `tether users`. Each has a [`Role`] (see [`crate::authz`]); users
//! stored before roles existed could do everything, and are admins. The last admin cannot be
//! deleted or given a lesser role, nor may a user delete itself or change its own role; a
//! successful login stores `last_login_unix_ms`.
//!
//! Hashing costs tens of milliseconds of CPU on purpose: callers on an actix arbiter run
//! [`hash_password`] and [`Users::verify`] through `web::block`.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tether_shared::config::Secret;
use tether_shared::enroll::name_problem;
use tether_shared::identity::write_private_file;
use tether_shared::journal::{JournalError, JournalHandle, Op};

use crate::authz::Role;
use crate::registry::now_unix_ms;

/// How many of `users` are admins.
fn admins(users: &BTreeMap<String, StoredUser>) -> usize {
    users.values().filter(|u| u.role == Role::Admin).count()
}

/// Meta key prefix of users (followed by the user name).
pub const USER_PREFIX: &str = "user/";
/// The first user's name.
pub const INITIAL_ADMIN: &str = "admin";
/// Shortest password accepted when a password is set.
pub const MIN_PASSWORD_LEN: usize = 12;
/// Longest password hashed at all (a 1 MB "password" would only burn CPU).
pub const MAX_PASSWORD_LEN: usize = 1024;

/// A stored user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredUser {
    /// Login name: `[A-Za-z0-9._-]`, 1 to 64 characters.
    pub name: String,
    /// The argon2id PHC string of the password.
    pub password_hash: String,
    /// When the user was created and when its password last changed.
    pub created_unix_ms: u64,
    pub password_changed_unix_ms: u64,
    /// The last successful web login (absent until the first one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_login_unix_ms: Option<u64>,
    /// What the user may do; users stored before roles existed could do everything.
    #[serde(default = "role_before_roles")]
    pub role: Role,
}

fn role_before_roles() -> Role {
    Role::Admin
}

/// What lists of users show: never the password hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserInfo {
    pub name: String,
    pub role: Role,
    pub created_unix_ms: u64,
    pub password_changed_unix_ms: u64,
    pub last_login_unix_ms: Option<u64>,
}

impl From<&StoredUser> for UserInfo {
    fn from(u: &StoredUser) -> Self {
        UserInfo {
            name: u.name.clone(),
            role: u.role,
            created_unix_ms: u.created_unix_ms,
            password_changed_unix_ms: u.password_changed_unix_ms,
            last_login_unix_ms: u.last_login_unix_ms,
        }
    }
}

/// Why a user operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    /// A field breaks a rule; the message says which (never the password itself).
    #[error("{0}")]
    Invalid(String),
    /// The user exists already.
    #[error("user {0:?} exists already")]
    Exists(String),
    /// No such user (deleting).
    #[error("no such user")]
    NotFound,
    /// The change is refused as things stand (the last user, oneself); the message says why.
    #[error("{0}")]
    Conflict(String),
    /// No such user, or the password is wrong: one answer for both.
    #[error("wrong user name or password")]
    BadCredentials,
    /// Hashing failed (argon2 parameters; does not happen with the defaults).
    #[error("password hashing failed: {0}")]
    Hash(String),
    /// The journal refused the change; nothing changed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A stored entry could not be decoded at load.
    #[error("user entry {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// `DATA/admin.password` could not be read or written.
    #[error("{}: {source}", path.display())]
    File { path: PathBuf, source: io::Error },
}

/// The users; share as `Arc<Users>`.
pub struct Users {
    journal: JournalHandle,
    users: RwLock<BTreeMap<String, StoredUser>>,
    /// Serializes changes: check, commit and apply as one step.
    changes: tokio::sync::Mutex<()>,
    /// Hashed against when the user does not exist, so that the answer takes as long.
    dummy_hash: String,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("users", &read(&self.users).len())
            .finish_non_exhaustive()
    }
}

impl Users {
    /// Reads every user from the journal's meta entries.
    pub fn load(journal: JournalHandle) -> Result<Users, UsersError> {
        let mut users = BTreeMap::new();
        for (key, value) in journal.scan_meta(USER_PREFIX)? {
            let user: StoredUser =
                serde_json::from_slice(&value).map_err(|e| UsersError::Corrupt {
                    key: key.clone(),
                    reason: e.to_string(),
                })?;
            if key.strip_prefix(USER_PREFIX) != Some(user.name.as_str()) {
                return Err(UsersError::Corrupt {
                    key,
                    reason: format!("holds user {:?}", user.name),
                });
            }
            users.insert(user.name.clone(), user);
        }
        tracing::info!(users = users.len(), "users-loaded");
        Ok(Users {
            journal,
            users: RwLock::new(users),
            changes: tokio::sync::Mutex::new(()),
            dummy_hash: hash_password(&random_password())?,
        })
    }

    /// Whether any user exists.
    pub fn is_empty(&self) -> bool {
        read(&self.users).is_empty()
    }

    /// User names, sorted.
    pub fn names(&self) -> Vec<String> {
        read(&self.users).keys().cloned().collect()
    }

    /// Whether user `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        read(&self.users).contains_key(name)
    }

    /// The role of user `name`, if it exists.
    pub fn role_of(&self, name: &str) -> Option<Role> {
        read(&self.users).get(name).map(|u| u.role)
    }

    /// The role of user `name` and when it was created, if it exists.
    pub fn role_since(&self, name: &str) -> Option<(Role, u64)> {
        read(&self.users)
            .get(name)
            .map(|u| (u.role, u.created_unix_ms))
    }

    /// Gives user `name` the role `role`. Refused for `acting` itself (a person cannot raise
    /// or drop their own role) and for the last admin.
    pub async fn set_role(
        &self,
        name: &str,
        role: Role,
        acting: Option<&str>,
    ) -> Result<(), UsersError> {
        let _change = self.changes.lock().await;
        let mut user = {
            let users = read(&self.users);
            let user = users.get(name).cloned().ok_or(UsersError::NotFound)?;
            if acting == Some(name) {
                return Err(UsersError::Conflict(
                    "you cannot change your own role; another admin can".into(),
                ));
            }
            if user.role == Role::Admin && role != Role::Admin && admins(&users) <= 1 {
                return Err(UsersError::Conflict(
                    "the last admin keeps the admin role".into(),
                ));
            }
            user
        };
        user.role = role;
        self.store(user).await?;
        tracing::info!(user = %name, role = %role, "user-role-changed");
        Ok(())
    }

    /// Every user (no password hashes), sorted by name.
    pub fn list(&self) -> Vec<UserInfo> {
        read(&self.users).values().map(UserInfo::from).collect()
    }

    /// Deletes user `name`. Refused for the last user, and for `acting` itself (the user who
    /// asks, when a person asks through the web application). The caller ends its sessions.
    pub async fn delete(&self, name: &str, acting: Option<&str>) -> Result<(), UsersError> {
        let _change = self.changes.lock().await;
        {
            let users = read(&self.users);
            if !users.contains_key(name) {
                return Err(UsersError::NotFound);
            }
            if acting == Some(name) {
                return Err(UsersError::Conflict(
                    "you cannot delete yourself; another user can".into(),
                ));
            }
            if users.len() <= 1 {
                return Err(UsersError::Conflict(
                    "the last user cannot be deleted".into(),
                ));
            }
            if users.get(name).is_some_and(|u| u.role == Role::Admin) && admins(&users) <= 1 {
                return Err(UsersError::Conflict(
                    "the last admin cannot be deleted".into(),
                ));
            }
        }
        self.journal
            .commit(vec![Op::DeleteMeta {
                key: format!("{USER_PREFIX}{name}"),
            }])
            .await?;
        write(&self.users).remove(name);
        tracing::info!(user = %name, "user-deleted");
        Ok(())
    }

    /// Notes a successful login of `name` (best effort: a failed commit is only logged).
    pub async fn record_login(&self, name: &str) {
        let _change = self.changes.lock().await;
        let Some(mut user) = read(&self.users).get(name).cloned() else {
            return;
        };
        user.last_login_unix_ms = Some(now_unix_ms());
        if let Err(e) = self.store(user).await {
            tracing::warn!(user = %name, error = %e, "user-last-login-not-stored");
        }
    }

    /// Checks `password` for `name`; blocking (argon2). Unknown users cost the same time as
    /// known ones and get the same answer.
    pub fn verify(&self, name: &str, password: &str) -> Result<(), UsersError> {
        let stored = read(&self.users).get(name).map(|u| u.password_hash.clone());
        let known = stored.is_some();
        let hash = stored.unwrap_or_else(|| self.dummy_hash.clone());
        let ok = password.len() <= MAX_PASSWORD_LEN && verify_password(password, &hash);
        if ok && known {
            Ok(())
        } else {
            Err(UsersError::BadCredentials)
        }
    }

    /// Creates user `name` with the PHC string `password_hash` (from [`hash_password`]).
    pub async fn create(
        &self,
        name: &str,
        password_hash: String,
        role: Role,
    ) -> Result<(), UsersError> {
        if let Some(problem) = name_problem("user name", name) {
            return Err(UsersError::Invalid(problem));
        }
        let _change = self.changes.lock().await;
        if read(&self.users).contains_key(name) {
            return Err(UsersError::Exists(name.to_owned()));
        }
        let now = now_unix_ms();
        let user = StoredUser {
            name: name.to_owned(),
            password_hash,
            created_unix_ms: now,
            password_changed_unix_ms: now,
            last_login_unix_ms: None,
            role,
        };
        self.store(user).await?;
        tracing::info!(user = %name, role = %role, "user-created");
        Ok(())
    }

    /// Replaces the password of `name` with the PHC string `password_hash`.
    pub async fn set_password(&self, name: &str, password_hash: String) -> Result<(), UsersError> {
        let _change = self.changes.lock().await;
        let Some(mut user) = read(&self.users).get(name).cloned() else {
            return Err(UsersError::BadCredentials);
        };
        user.password_hash = password_hash;
        user.password_changed_unix_ms = now_unix_ms();
        self.store(user).await?;
        tracing::info!(user = %name, "user-password-changed");
        Ok(())
    }

    async fn store(&self, user: StoredUser) -> Result<(), UsersError> {
        let value = serde_json::to_vec(&user).map_err(|e| UsersError::Hash(e.to_string()))?;
        self.journal
            .commit(vec![Op::PutMeta {
                key: format!("{USER_PREFIX}{}", user.name),
                value,
            }])
            .await?;
        write(&self.users).insert(user.name.clone(), user);
        Ok(())
    }

    /// At start: if no user exists, creates `admin` with the password in `password_file`
    /// (writing a new random one there first if the file is missing, as for a data directory
    /// initialized before the web application existed). Returns whether it created the user.
    pub async fn ensure_initial_admin(&self, password_file: &Path) -> Result<bool, UsersError> {
        if !self.is_empty() {
            return Ok(false);
        }
        let file_err = |source| UsersError::File {
            path: password_file.to_path_buf(),
            source,
        };
        let password = match std::fs::read_to_string(password_file) {
            Ok(text) => text.trim().to_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let password = random_password();
                write_private_file(password_file, password.as_bytes()).map_err(file_err)?;
                tracing::warn!(path = %password_file.display(), "admin-password-generated");
                password
            }
            Err(e) => return Err(file_err(e)),
        };
        if password.is_empty() || password.len() > MAX_PASSWORD_LEN {
            return Err(UsersError::Invalid(format!(
                "{} must hold a password of 1 to {MAX_PASSWORD_LEN} bytes",
                password_file.display()
            )));
        }
        let hash = hash_password(&password)?;
        self.create(INITIAL_ADMIN, hash, Role::Admin).await?;
        tracing::info!(user = INITIAL_ADMIN, path = %password_file.display(), "initial-admin-created");
        Ok(true)
    }
}

/// Why `password` may not become a password, if it may not.
pub fn password_problem(password: &str) -> Option<String> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_LEN {
        return Some(format!(
            "the password must be at least {MIN_PASSWORD_LEN} characters long"
        ));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Some(format!(
            "the password must be at most {MAX_PASSWORD_LEN} bytes long"
        ));
    }
    None
}

/// The argon2id PHC string of `password`, with a fresh random salt. Blocking.
pub fn hash_password(password: &str) -> Result<String, UsersError> {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| UsersError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UsersError::Hash(e.to_string()))
}

/// Whether `password` matches the PHC string `hash` (argon2 compares in constant time).
fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// 18 random bytes, base64url: 24 characters, 144 bits.
pub fn random_password() -> String {
    let mut bytes = [0u8; 18];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The initial admin password, as `init` hands it out.
pub fn new_initial_password() -> Secret<String> {
    Secret::new(random_password())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use tether_shared::journal::{Journal, JournalOptions};

    /// Opens the journal in `dir`, polling while a previous instance's writer thread (which
    /// ends shortly after its last handle is dropped) still holds the lock.
    fn open(dir: &Path) -> Users {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Journal::open(dir, &JournalOptions::default()) {
                Ok((journal, _)) => return Users::load(journal.handle()).unwrap(),
                Err(JournalError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn hashes_are_salted_argon2id_and_verify() {
        let a = hash_password("correct horse battery").unwrap();
        let b = hash_password("correct horse battery").unwrap();
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "salts differ");
        assert!(verify_password("correct horse battery", &a));
        assert!(!verify_password("correct horse batterx", &a));
        assert!(!verify_password("x", "not a phc string"));
    }

    #[test]
    fn password_rules() {
        assert!(password_problem("short").is_some());
        assert!(password_problem(&"x".repeat(MAX_PASSWORD_LEN + 1)).is_some());
        assert!(password_problem("twelve chars").is_none());
    }

    #[actix_rt::test]
    async fn initial_admin_from_file_then_persisted() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("admin.password");
        std::fs::write(&file, "first-password-123\n").unwrap();
        {
            let users = open(&tmp.path().join("j"));
            assert!(users.ensure_initial_admin(&file).await.unwrap());
            assert!(!users.ensure_initial_admin(&file).await.unwrap());
            users.verify(INITIAL_ADMIN, "first-password-123").unwrap();
            assert!(matches!(
                users.verify(INITIAL_ADMIN, "wrong"),
                Err(UsersError::BadCredentials)
            ));
            assert!(matches!(
                users.verify("nobody", "first-password-123"),
                Err(UsersError::BadCredentials)
            ));
            let hash = hash_password("second-password-456").unwrap();
            users.set_password(INITIAL_ADMIN, hash).await.unwrap();
        }
        let users = open(&tmp.path().join("j"));
        assert_eq!(users.names(), vec![INITIAL_ADMIN.to_owned()]);
        users.verify(INITIAL_ADMIN, "second-password-456").unwrap();
        assert!(users.verify(INITIAL_ADMIN, "first-password-123").is_err());
    }

    #[actix_rt::test]
    async fn users_are_created_listed_and_deleted_but_not_the_last() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("admin.password");
        std::fs::write(&file, "first-password-123\n").unwrap();
        {
            let users = open(&tmp.path().join("j"));
            users.ensure_initial_admin(&file).await.unwrap();
            let hash = hash_password("ops-password-1234").unwrap();
            assert!(matches!(
                users.create("bad name", hash.clone(), Role::Admin).await,
                Err(UsersError::Invalid(_))
            ));
            users
                .create("ops-1", hash.clone(), Role::Admin)
                .await
                .unwrap();
            assert!(matches!(
                users.create("ops-1", hash, Role::Viewer).await,
                Err(UsersError::Exists(_))
            ));
            users.record_login("ops-1").await;
            let list = users.list();
            assert_eq!(list.len(), 2);
            assert!(list[1].last_login_unix_ms.is_some());
            assert!(matches!(
                users.delete("ops-1", Some("ops-1")).await,
                Err(UsersError::Conflict(_))
            ));
            assert!(matches!(
                users.delete("nobody", None).await,
                Err(UsersError::NotFound)
            ));
            users.delete(INITIAL_ADMIN, Some("ops-1")).await.unwrap();
            assert!(matches!(
                users.delete("ops-1", None).await,
                Err(UsersError::Conflict(_))
            ));
        }
        let users = open(&tmp.path().join("j"));
        assert_eq!(users.names(), vec!["ops-1".to_owned()]);
        assert!(users.list()[0].last_login_unix_ms.is_some());
        users.verify("ops-1", "ops-password-1234").unwrap();
        assert!(!users.ensure_initial_admin(&file).await.unwrap());
    }

    #[actix_rt::test]
    async fn roles_are_kept_and_the_last_admin_stays_one() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("admin.password");
        std::fs::write(&file, "first-password-123\n").unwrap();
        {
            let users = open(&tmp.path().join("j"));
            users.ensure_initial_admin(&file).await.unwrap();
            assert_eq!(users.role_of(INITIAL_ADMIN), Some(Role::Admin));
            let hash = hash_password("ops-password-1234").unwrap();
            users.create("viewer-1", hash, Role::Viewer).await.unwrap();
            // The only admin can be neither demoted nor deleted; nobody changes their own role.
            for (acting, role) in [(None, Role::Deployer), (Some("viewer-1"), Role::Viewer)] {
                assert!(matches!(
                    users.set_role(INITIAL_ADMIN, role, acting).await,
                    Err(UsersError::Conflict(_))
                ));
            }
            assert!(matches!(
                users.delete(INITIAL_ADMIN, Some("viewer-1")).await,
                Err(UsersError::Conflict(_))
            ));
            assert!(matches!(
                users
                    .set_role("viewer-1", Role::Admin, Some("viewer-1"))
                    .await,
                Err(UsersError::Conflict(_))
            ));
            users
                .set_role("viewer-1", Role::Deployer, Some(INITIAL_ADMIN))
                .await
                .unwrap();
            assert!(matches!(
                users.set_role("nobody", Role::Admin, None).await,
                Err(UsersError::NotFound)
            ));
            // A user stored before roles existed could do everything: it is an admin.
            let old = serde_json::json!({"name": "old-timer", "password_hash": "x",
                "created_unix_ms": 1, "password_changed_unix_ms": 1});
            users
                .journal
                .commit(vec![Op::PutMeta {
                    key: format!("{USER_PREFIX}old-timer"),
                    value: old.to_string().into_bytes(),
                }])
                .await
                .unwrap();
        }
        let users = open(&tmp.path().join("j"));
        assert_eq!(users.role_of("viewer-1"), Some(Role::Deployer));
        assert_eq!(users.role_of("old-timer"), Some(Role::Admin));
        assert_eq!(users.role_of(INITIAL_ADMIN), Some(Role::Admin));
    }

    #[actix_rt::test]
    async fn a_missing_password_file_is_generated() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("admin.password");
        let users = open(&tmp.path().join("j"));
        assert!(users.ensure_initial_admin(&file).await.unwrap());
        let password = std::fs::read_to_string(&file).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        users.verify(INITIAL_ADMIN, password.trim()).unwrap();
    }
}
