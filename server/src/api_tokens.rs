//! [`ApiTokens`]: bearer tokens of the users, for scripts and the CLI, each with a name, a role
//! no higher than its user's, and an optional expiry.
//!
//! A token reads `tether_<id>_<secret>`: the id (8 random bytes, hex) finds it, the secret (32
//! random bytes, base64url) proves it. Only the secret's SHA-256 is kept (the secret has 256
//! bits of entropy: a slow hash would add nothing), in the journal's meta entries as JSON,
//! `apitoken/<id>` → [`StoredApiToken`]; the token is shown once, when it is made. A request
//! with a token may do what the lesser of the token's role and its user's role (now) allows:
//! lowering a user's role lowers their tokens, deleting the user ends them (they are removed,
//! and a token older than its user, left by a crash, is refused). Expired and revoked tokens
//! are refused like unknown ones.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tether_shared::config::Secret;
use tether_shared::enroll::name_problem;
use tether_shared::journal::{JournalError, JournalHandle, Op};

use crate::authz::Role;
use crate::registry::now_unix_ms;
use crate::users::Users;

/// Meta key prefix of API tokens (followed by the id).
pub const TOKEN_PREFIX: &str = "apitoken/";
/// The id the admin token (`DATA/admin.token`, made by `init`) is listed and revoked by.
pub const ADMIN_TOKEN_ID: &str = "admin-token";
/// Meta key: SHA-256 (hex) of the admin token that was revoked. Writing a new token to
/// `admin.token` (and restarting) is the way back.
const ADMIN_REVOKED_KEY: &str = "admintoken/revoked";
/// What every token starts with.
const TEXT_PREFIX: &str = "tether_";
/// Tokens per user, and in all: bounds on what the stored set (kept in memory) may grow to.
pub const MAX_PER_USER: usize = 50;
pub const MAX_TOKENS: usize = 10_000;
/// Longest lifetime a token may be given (10 years).
pub const MAX_TTL_S: u64 = 10 * 365 * 24 * 3600;

/// A stored token: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredApiToken {
    pub id: String,
    pub name: String,
    pub user: String,
    pub role: Role,
    pub created_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
}

/// What lists show: no hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiTokenInfo {
    pub id: String,
    pub name: String,
    pub user: String,
    pub role: Role,
    pub created_unix_ms: u64,
    pub expires_unix_ms: Option<u64>,
    pub expired: bool,
}

impl ApiTokenInfo {
    fn of(t: &StoredApiToken, now: u64) -> ApiTokenInfo {
        ApiTokenInfo {
            id: t.id.clone(),
            name: t.name.clone(),
            user: t.user.clone(),
            role: t.role,
            created_unix_ms: t.created_unix_ms,
            expires_unix_ms: t.expires_unix_ms,
            expired: t.expires_unix_ms.is_some_and(|e| e <= now),
        }
    }
}

/// Why a token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiTokensError {
    /// A field breaks a rule; the message says which.
    #[error("{0}")]
    Invalid(String),
    #[error("no such token")]
    NotFound,
    /// Refused as things stand (too many tokens); the message says why.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A stored entry could not be decoded at load.
    #[error("API token entry {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// The tokens; share as `Arc<ApiTokens>`.
pub struct ApiTokens {
    journal: JournalHandle,
    tokens: RwLock<BTreeMap<String, StoredApiToken>>,
    /// Serializes changes: check, commit and apply as one step.
    changes: tokio::sync::Mutex<()>,
    /// SHA-256 (hex) of the revoked admin token, if it was.
    admin_revoked: RwLock<Option<String>>,
}

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.tokens.read().map_or(0, |t| t.len());
        f.debug_struct("ApiTokens")
            .field("tokens", &n)
            .finish_non_exhaustive()
    }
}

fn sha256_hex(secret: &[u8]) -> String {
    hex::encode(Sha256::digest(secret))
}

impl ApiTokens {
    pub fn load(journal: JournalHandle) -> Result<ApiTokens, ApiTokensError> {
        let mut tokens = BTreeMap::new();
        for (key, value) in journal.scan_meta(TOKEN_PREFIX)? {
            let token: StoredApiToken =
                serde_json::from_slice(&value).map_err(|e| ApiTokensError::Corrupt {
                    key: key.clone(),
                    reason: e.to_string(),
                })?;
            if key.strip_prefix(TOKEN_PREFIX) != Some(token.id.as_str()) {
                return Err(ApiTokensError::Corrupt {
                    key,
                    reason: format!("holds token {:?}", token.id),
                });
            }
            tokens.insert(token.id.clone(), token);
        }
        let admin_revoked = journal
            .get_meta(ADMIN_REVOKED_KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        Ok(ApiTokens {
            journal,
            tokens: RwLock::new(tokens),
            changes: tokio::sync::Mutex::new(()),
            admin_revoked: RwLock::new(admin_revoked),
        })
    }

    /// Whether `admin_token` (the text of `admin.token`) was revoked.
    pub fn admin_token_revoked(&self, admin_token: &[u8]) -> bool {
        let hash = sha256_hex(admin_token);
        self.admin_revoked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_deref()
            .is_some_and(|r| bool::from(r.as_bytes().ct_eq(hash.as_bytes())))
    }

    /// Revokes the admin token `admin_token` (durably, before it answers): refused from then
    /// on, on every node, until `admin.token` holds another one.
    pub async fn revoke_admin_token(&self, admin_token: &[u8]) -> Result<(), ApiTokensError> {
        let _change = self.changes.lock().await;
        let hash = sha256_hex(admin_token);
        self.journal
            .commit(vec![Op::PutMeta {
                key: ADMIN_REVOKED_KEY.into(),
                value: hash.clone().into_bytes(),
            }])
            .await?;
        *self
            .admin_revoked
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(hash);
        tracing::warn!("admin-token-revoked");
        Ok(())
    }

    /// How the admin token is listed among the tokens (made at `created_unix_ms`).
    pub fn admin_token_info(created_unix_ms: u64) -> ApiTokenInfo {
        ApiTokenInfo {
            id: ADMIN_TOKEN_ID.into(),
            name: "admin.token (from init)".into(),
            user: String::new(),
            role: Role::Admin,
            created_unix_ms,
            expires_unix_ms: None,
            expired: false,
        }
    }

    /// Every token (of `user`, if given), by id.
    pub fn list(&self, user: Option<&str>) -> Vec<ApiTokenInfo> {
        let now = now_unix_ms();
        self.tokens
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|t| user.is_none_or(|u| t.user == u))
            .map(|t| ApiTokenInfo::of(t, now))
            .collect()
    }

    /// Makes a token for `user` named `name` with `role` (its user's role if `None`; never
    /// higher), valid for `ttl_s` seconds (`None`: until revoked). Returns it and the token
    /// text, which is not kept.
    pub async fn create(
        &self,
        users: &Users,
        user: &str,
        name: &str,
        role: Option<Role>,
        ttl_s: Option<u64>,
    ) -> Result<(ApiTokenInfo, Secret<String>), ApiTokensError> {
        if let Some(problem) = name_problem("token name", name) {
            return Err(ApiTokensError::Invalid(problem));
        }
        let Some(user_role) = users.role_of(user) else {
            return Err(ApiTokensError::Invalid(format!(
                "no user {:?}",
                user.chars().take(64).collect::<String>()
            )));
        };
        let role = role.unwrap_or(user_role);
        if role > user_role {
            return Err(ApiTokensError::Invalid(format!(
                "a token's role cannot be above its user's ({user_role})"
            )));
        }
        if let Some(ttl) = ttl_s {
            if ttl == 0 || ttl > MAX_TTL_S {
                return Err(ApiTokensError::Invalid(format!(
                    "expires_in_s must be 1 to {MAX_TTL_S}"
                )));
            }
        }
        let _change = self.changes.lock().await;
        {
            let tokens = self.tokens.read().unwrap_or_else(PoisonError::into_inner);
            if tokens.len() >= MAX_TOKENS {
                return Err(ApiTokensError::Conflict(format!(
                    "the server holds {MAX_TOKENS} API tokens already: revoke some first"
                )));
            }
            if tokens.values().filter(|t| t.user == user).count() >= MAX_PER_USER {
                return Err(ApiTokensError::Conflict(format!(
                    "user {user} has {MAX_PER_USER} API tokens already: revoke some first"
                )));
            }
        }
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut id);
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let id = hex::encode(id);
        let secret = URL_SAFE_NO_PAD.encode(secret);
        let now = now_unix_ms();
        let stored = StoredApiToken {
            id: id.clone(),
            name: name.to_owned(),
            user: user.to_owned(),
            role,
            created_unix_ms: now,
            expires_unix_ms: ttl_s.map(|s| now.saturating_add(s.saturating_mul(1000))),
            secret_sha256: sha256_hex(secret.as_bytes()),
        };
        let value = serde_json::to_vec(&stored).map_err(|e| ApiTokensError::Corrupt {
            key: id.clone(),
            reason: e.to_string(),
        })?;
        self.journal
            .commit(vec![Op::PutMeta {
                key: format!("{TOKEN_PREFIX}{id}"),
                value,
            }])
            .await?;
        let info = ApiTokenInfo::of(&stored, now);
        self.tokens
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), stored);
        tracing::info!(token = %id, user = %user, role = %role, "api-token-created");
        Ok((info, Secret::new(format!("{TEXT_PREFIX}{id}_{secret}"))))
    }

    /// Revokes token `id` (of `user` only, if given: people revoke their own).
    pub async fn revoke(&self, id: &str, user: Option<&str>) -> Result<(), ApiTokensError> {
        let _change = self.changes.lock().await;
        let owned = {
            let tokens = self.tokens.read().unwrap_or_else(PoisonError::into_inner);
            tokens
                .get(id)
                .is_some_and(|t| user.is_none_or(|u| t.user == u))
        };
        if !owned {
            return Err(ApiTokensError::NotFound);
        }
        self.journal
            .commit(vec![Op::DeleteMeta {
                key: format!("{TOKEN_PREFIX}{id}"),
            }])
            .await?;
        self.tokens
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        tracing::info!(token = %id, "api-token-revoked");
        Ok(())
    }

    /// Removes every token of `user` (deleted).
    pub async fn remove_user(&self, user: &str) -> Result<(), ApiTokensError> {
        let ids: Vec<String> = self.list(Some(user)).into_iter().map(|t| t.id).collect();
        for id in ids {
            match self.revoke(&id, Some(user)).await {
                Ok(()) | Err(ApiTokensError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The role a request presenting `presented` acts with: the lesser of the token's and its
    /// user's; `None` for anything but a live token of an existing user.
    pub fn role_of(&self, presented: &[u8], users: &Users) -> Option<Role> {
        self.holder_of(presented, users).map(|(_, _, role)| role)
    }

    /// The user, token id and role of a live token `presented`.
    pub fn holder_of(&self, presented: &[u8], users: &Users) -> Option<(String, String, Role)> {
        let text = std::str::from_utf8(presented).ok()?;
        let (id, secret) = text.strip_prefix(TEXT_PREFIX)?.split_once('_')?;
        let token = self
            .tokens
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()?;
        let presented_hash = sha256_hex(secret.as_bytes());
        if !bool::from(
            presented_hash
                .as_bytes()
                .ct_eq(token.secret_sha256.as_bytes()),
        ) {
            return None;
        }
        if token.expires_unix_ms.is_some_and(|e| e <= now_unix_ms()) {
            return None;
        }
        // A token older than its user belonged to an earlier user of that name.
        let (user_role, since) = users.role_since(&token.user)?;
        (token.created_unix_ms >= since).then(|| (token.user, token.id, token.role.min(user_role)))
    }
}
