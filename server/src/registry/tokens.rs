//! Enrollment tokens: created with a number of uses and a lifetime, listed by id (never by
//! their text, which is stored only as its sha256), spent by enrollments and revoked.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tether_shared::config::Secret;
use tether_shared::journal::Op;

use super::*;

/// A token just created: the only time its text exists outside the caller's hands.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The token's id (see [`TokenInfo::id`]): what lists show and revocation takes.
    pub id: String,
    /// The token to give to `install`; never stored, never logged.
    pub token: Secret<String>,
    /// When it stops being accepted.
    pub expires_unix_ms: u64,
    /// How many enrollments it allows.
    pub uses: u32,
    /// What it enrolls.
    pub role: Role,
}

/// A live enrollment token as lists show it: never its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    /// The first 16 hex digits of the token's sha256: names it without revealing it.
    pub id: String,
    /// What it enrolls.
    pub role: Role,
    /// Enrollments it still allows.
    pub uses_left: u32,
    /// When it stops being accepted.
    pub expires_unix_ms: u64,
    /// When it was created (absent for tokens from before this was recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_unix_ms: Option<u64>,
}

/// A stored enrollment token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StoredToken {
    /// Enrollments it still allows (at least 1; the last use deletes the token).
    pub(super) uses_left: u32,
    /// When it stops being accepted.
    pub(super) expires_unix_ms: u64,
    /// What it enrolls.
    pub(super) role: Role,
    /// When it was created (0 for tokens stored before this was recorded).
    #[serde(default)]
    pub(super) created_unix_ms: u64,
}

impl StoredToken {
    pub(super) fn accepts(&self, role: Role, now_ms: u64) -> bool {
        self.role == role && self.uses_left > 0 && now_ms < self.expires_unix_ms
    }
}

/// `tte_` and 32 random bytes, base64url without padding. The prefix makes a leaked token easy
/// to recognise (secret scanners), and keeps a token from starting with `-`, which a command
/// line would take for an option.
pub(super) fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("tte_{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Hex digits of a token's sha256 that make its id.
const TOKEN_ID_LEN: usize = 16;

/// A token's id: the first [`TOKEN_ID_LEN`] hex digits of its sha256. 64 bits name it among
/// the live tokens; they say nothing of the token's 256 random bits.
pub(super) fn token_id(hash: &str) -> String {
    hash.get(..TOKEN_ID_LEN).unwrap_or(hash).to_owned()
}

/// The key a token is stored and looked up under.
pub(super) fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Registry {
    /// Creates a token allowing `uses` enrollments of `role` for `ttl`.
    pub async fn create_token(
        &self,
        uses: u32,
        ttl: Duration,
        role: Role,
    ) -> Result<IssuedToken, RegistryError> {
        self.create_token_at(uses, ttl, role, now_unix_ms()).await
    }

    pub(super) async fn create_token_at(
        &self,
        uses: u32,
        ttl: Duration,
        role: Role,
        now_ms: u64,
    ) -> Result<IssuedToken, RegistryError> {
        if !(1..=MAX_TOKEN_USES).contains(&uses) {
            return Err(RegistryError::Invalid(format!(
                "uses must be between 1 and {MAX_TOKEN_USES}, got {uses}"
            )));
        }
        if ttl < Duration::from_secs(1) || ttl > MAX_TOKEN_TTL {
            return Err(RegistryError::Invalid(format!(
                "ttl_s must be between 1 and {} (30 days), got {}",
                MAX_TOKEN_TTL.as_secs(),
                ttl.as_secs()
            )));
        }
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let token = new_token();
        let hash = token_sha256(&token);
        let id = token_id(&hash);
        let stored = StoredToken {
            uses_left: uses,
            expires_unix_ms: now_ms.saturating_add(ttl_ms),
            role,
            created_unix_ms: now_ms,
        };

        let _change = self.changes.lock().await;
        // Expired tokens go in the same batch: they could never be used again.
        let expired: Vec<String> = read(&self.tokens)
            .iter()
            .filter(|(_, t)| t.expires_unix_ms <= now_ms)
            .map(|(h, _)| h.clone())
            .collect();
        let mut ops: Vec<Op> = expired
            .iter()
            .map(|h| Op::DeleteMeta {
                key: format!("{TOKEN_PREFIX}{h}"),
            })
            .collect();
        ops.push(Op::PutMeta {
            key: format!("{TOKEN_PREFIX}{hash}"),
            value: encode(&stored),
        });
        self.journal.commit(ops).await?;
        {
            let mut tokens = write(&self.tokens);
            for h in &expired {
                tokens.remove(h);
            }
            tokens.insert(hash, stored);
        }
        tracing::info!(
            token_id = %id,
            uses,
            ttl_s = ttl.as_secs(),
            role = %role,
            purged = expired.len(),
            "enrollment-token-created"
        );
        Ok(IssuedToken {
            id,
            token: Secret::new(token),
            expires_unix_ms: stored.expires_unix_ms,
            uses,
            role,
        })
    }

    /// The enrollment tokens that can still enroll, newest first.
    pub fn tokens(&self) -> Vec<TokenInfo> {
        let now_ms = now_unix_ms();
        let mut list: Vec<TokenInfo> = read(&self.tokens)
            .iter()
            .filter(|(_, t)| t.expires_unix_ms > now_ms && t.uses_left > 0)
            .map(|(hash, t)| TokenInfo {
                id: token_id(hash),
                role: t.role,
                uses_left: t.uses_left,
                expires_unix_ms: t.expires_unix_ms,
                created_unix_ms: (t.created_unix_ms > 0).then_some(t.created_unix_ms),
            })
            .collect();
        list.sort_by(|a, b| {
            b.created_unix_ms
                .cmp(&a.created_unix_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        list
    }

    /// Revokes the token whose id is `id` (committed before it answers): it enrolls nobody
    /// from then on. Peers it already enrolled keep their identities. `None` if no token has
    /// that id.
    pub async fn revoke_token(&self, id: &str) -> Result<Option<TokenInfo>, RegistryError> {
        if id.len() != TOKEN_ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let _change = self.changes.lock().await;
        let Some((hash, token)) = read(&self.tokens)
            .iter()
            .find(|(hash, _)| token_id(hash).eq_ignore_ascii_case(id))
            .map(|(h, t)| (h.clone(), *t))
        else {
            return Ok(None);
        };
        self.journal
            .commit(vec![Op::DeleteMeta {
                key: format!("{TOKEN_PREFIX}{hash}"),
            }])
            .await?;
        write(&self.tokens).remove(&hash);
        let id = token_id(&hash);
        tracing::info!(token_id = %id, role = %token.role, uses_left = token.uses_left, "enrollment-token-revoked");
        Ok(Some(TokenInfo {
            id,
            role: token.role,
            uses_left: token.uses_left,
            expires_unix_ms: token.expires_unix_ms,
            created_unix_ms: (token.created_unix_ms > 0).then_some(token.created_unix_ms),
        }))
    }
}
