//! [`AdminToken`]: the bearer check of the REST API and the admin endpoints. It accepts the
//! admin token, loaded from `DIR/admin.token` (it may do everything), and once the users are
//! loaded ([`AdminToken::with_api_tokens`]) the users' API tokens, each for what its role may do
//! ([`crate::authz`]): the one place REST requests are authorized, in [`bearer_before_body`]
//! before the body is read (handlers check again). Tokens are compared in constant time and
//! never print.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix_web::http::header;
use actix_web::HttpRequest;
use tether_shared::config::Secret;

use subtle::ConstantTimeEq;

use crate::api_error::ApiError;
use crate::api_tokens::ApiTokens;
use crate::users::Users;

/// The one REST route that takes no bearer token (`POST`: a user's password for an API
/// token; see `crate::api_tokens_api`).
pub const LOGIN_PATH: &str = "/api/v1/login";

/// Why the token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The token file.
        path: PathBuf,
        /// The underlying failure.
        source: io::Error,
    },
    /// The file holds no token (only whitespace), or something that cannot be a header value.
    #[error("{}: does not hold a usable token; run `tether-server init --force` to issue a new one", path.display())]
    Unusable {
        /// The token file.
        path: PathBuf,
    },
}

/// The admin bearer token.
#[derive(Debug, Clone)]
pub struct AdminToken {
    admin: Secret<String>,
    /// When `admin.token` was last written (how the token list dates it).
    pub written_unix_ms: u64,
    /// The users' API tokens, and the users (whose role bounds their tokens').
    users: Option<(Arc<ApiTokens>, Arc<Users>)>,
}

impl AdminToken {
    /// Reads the token from `path`, ignoring surrounding whitespace (an editor's newline).
    pub fn load(path: &Path) -> Result<Self, AdminTokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| AdminTokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let written_unix_ms = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        let token = Self::new(text.trim()).ok_or_else(|| AdminTokenError::Unusable {
            path: path.to_path_buf(),
        })?;
        Ok(AdminToken {
            written_unix_ms,
            ..token
        })
    }

    /// A token from its text; `None` if empty or not printable ASCII without spaces.
    pub fn new(token: &str) -> Option<Self> {
        let usable = !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic());
        usable.then(|| AdminToken {
            admin: Secret::new(token.to_owned()),
            written_unix_ms: 0,
            users: None,
        })
    }

    /// The same check, also accepting the users' API tokens.
    pub fn with_api_tokens(self, tokens: Arc<ApiTokens>, users: Arc<Users>) -> Self {
        AdminToken {
            users: Some((tokens, users)),
            ..self
        }
    }

    /// Who presents `presented`, as the audit log names them: `admin token`, or
    /// `user NAME (API token ID)`; `None` for an unknown token.
    pub fn holder(&self, presented: &[u8]) -> Option<String> {
        if self.is_live_admin(presented) {
            return Some("admin token".into());
        }
        let (tokens, users) = self.users.as_ref()?;
        let (user, id, _) = tokens.holder_of(presented, users)?;
        Some(format!("user {user} (API token {id})"))
    }

    /// Whether `presented` is the admin token, not revoked.
    fn is_live_admin(&self, presented: &[u8]) -> bool {
        let admin = self.admin.expose().as_bytes();
        bool::from(presented.ct_eq(admin))
            && !self
                .users
                .as_ref()
                .is_some_and(|(tokens, _)| tokens.admin_token_revoked(admin))
    }

    /// Revokes the admin token (see [`ApiTokens::revoke_admin_token`]).
    pub async fn revoke(&self) -> Result<(), ApiError> {
        let (tokens, _) = self.users.as_ref().ok_or(ApiError::Unavailable)?;
        tokens
            .revoke_admin_token(self.admin.expose().as_bytes())
            .await
            .map_err(ApiError::from)
    }

    /// The admin token as the token list shows it; `None` once revoked.
    pub fn listed(&self) -> Option<crate::api_tokens::ApiTokenInfo> {
        let (tokens, _) = self.users.as_ref()?;
        (!tokens.admin_token_revoked(self.admin.expose().as_bytes()))
            .then(|| ApiTokens::admin_token_info(self.written_unix_ms))
    }

    /// Accepts `req` only if it carries `Authorization: Bearer <token>` with the admin token,
    /// or an API token whose role may make this request (403 if it may not).
    pub fn check(&self, req: &HttpRequest) -> Result<(), ApiError> {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| bearer(value.as_bytes()))
            .ok_or(ApiError::Unauthorized)?;
        if self.is_live_admin(presented) {
            return Ok(());
        }
        let (tokens, users) = self.users.as_ref().ok_or(ApiError::Unauthorized)?;
        let role = tokens
            .role_of(presented, users)
            .ok_or(ApiError::Unauthorized)?;
        if role.may(req.method(), req.path()) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this token's role ({role}) may not do this"
            )))
        }
    }
}

/// The credentials of an `Authorization: Bearer <token>` value (scheme case-insensitive).
pub(crate) fn bearer(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    let (scheme, rest) = value.split_at_checked(SCHEME.len())?;
    scheme
        .eq_ignore_ascii_case(SCHEME)
        .then(|| rest.trim_ascii())
}

/// Middleware of the operators' listener: a request for `/api/...`, `/admin/...` or `/metrics`
/// without the right bearer token is answered 401 at once, before its body is read, so an
/// unauthenticated peer cannot make the server buffer (or wait for) a body. The handlers still
/// check the token themselves.
pub async fn bearer_before_body(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<
    actix_web::dev::ServiceResponse<actix_web::body::EitherBody<impl actix_web::body::MessageBody>>,
    actix_web::Error,
> {
    let path = req.path();
    let guarded = (path.starts_with("/api/") && path != LOGIN_PATH)
        || path.starts_with("/admin/")
        || path == "/metrics";
    if guarded {
        if let Some(token) = req.app_data::<actix_web::web::Data<AdminToken>>() {
            if let Err(e) = token.check(req.request()) {
                tracing::warn!(peer = ?req.peer_addr(), path = %path, "request-unauthorized");
                return Ok(req.error_response(e).map_into_right_body());
            }
        }
    }
    next.call(req).await.map(|r| r.map_into_left_body())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    const TOKEN: &str = "s3cr3t-token_value";

    fn check(authorization: Option<&str>) -> Result<(), ApiError> {
        let mut req = TestRequest::default();
        if let Some(value) = authorization {
            req = req.insert_header((header::AUTHORIZATION, value));
        }
        AdminToken::new(TOKEN)
            .unwrap()
            .check(&req.to_http_request())
    }

    #[test]
    fn accepts_only_the_exact_bearer_token() {
        assert!(check(Some(&format!("Bearer {TOKEN}"))).is_ok());
        assert!(check(Some(&format!("bearer  {TOKEN} "))).is_ok());
        for bad in [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer "),
            Some(TOKEN),
            Some(&format!("Basic {TOKEN}")),
            Some(&format!("Bearer {TOKEN}x")),
            Some(&format!("Bearer {}", &TOKEN[1..])),
            Some("Bearer s3cr3t-token_valuf"),
        ] {
            assert!(matches!(check(bad), Err(ApiError::Unauthorized)), "{bad:?}");
        }
    }

    #[test]
    fn loads_trimmed_and_refuses_empty_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
        let token = AdminToken::load(&path).unwrap();
        assert_eq!(token.admin.expose(), TOKEN);
        assert!(!format!("{token:?}").contains(TOKEN));

        std::fs::write(&path, " \n").unwrap();
        assert!(matches!(
            AdminToken::load(&path),
            Err(AdminTokenError::Unusable { .. })
        ));
        assert!(matches!(
            AdminToken::load(&dir.path().join("absent")),
            Err(AdminTokenError::Read { .. })
        ));
    }
}
