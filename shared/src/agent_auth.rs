//! Agent-signed HTTPS requests: how an agent proves who it is on the bulk-transfer routes
//! (artifact and plugin downloads) of the agent-facing listener, through any relay.
//!
//! The agent signs `tether-request-v1\n{METHOD}\n{path?query}\n{agent id}\n{unix ms}` with its
//! Ed25519 key and sends the id, the time and the signature in three headers. The server checks
//! the agent is enrolled, the time is within [`MAX_SKEW_MS`] of its own clock, and the
//! signature. The requests it guards only read (downloads), so a replay inside the window can
//! only fetch again what the agent was allowed to fetch anyway.

use crate::identity::{Identity, IdentityError, PublicKey};

pub const AGENT_HEADER: &str = "x-tether-agent";
pub const TIME_HEADER: &str = "x-tether-time";
pub const SIGNATURE_HEADER: &str = "x-tether-signature";
/// Largest difference between the agent's and the server's clocks that is accepted.
pub const MAX_SKEW_MS: u64 = 5 * 60 * 1000;

/// Why a signed request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestAuthError {
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error(
        "request time is {skew_ms} ms away from the server's clock (more than {MAX_SKEW_MS} ms)"
    )]
    Skew { skew_ms: u64 },
    #[error("bad request signature")]
    BadSignature,
}

fn signed_bytes(method: &str, path_and_query: &str, agent_id: &str, time_ms: u64) -> Vec<u8> {
    format!(
        "tether-request-v1\n{}\n{path_and_query}\n{agent_id}\n{time_ms}",
        method.to_ascii_uppercase()
    )
    .into_bytes()
}

/// The three headers for a request by `agent_id`.
pub fn sign_request(
    identity: &Identity,
    agent_id: &str,
    method: &str,
    path_and_query: &str,
    now_ms: u64,
) -> [(&'static str, String); 3] {
    let signature = identity.sign(&signed_bytes(method, path_and_query, agent_id, now_ms));
    [
        (AGENT_HEADER, agent_id.to_owned()),
        (TIME_HEADER, now_ms.to_string()),
        (SIGNATURE_HEADER, signature),
    ]
}

/// The claimed agent id, from the headers (look up its key with it, then [`verify_request`]).
pub fn claimed_agent(header: impl Fn(&str) -> Option<String>) -> Result<String, RequestAuthError> {
    header(AGENT_HEADER).ok_or(RequestAuthError::Missing(AGENT_HEADER))
}

/// Check the time and the signature of a request whose claimed agent has `key`.
pub fn verify_request(
    key: &PublicKey,
    method: &str,
    path_and_query: &str,
    header: impl Fn(&str) -> Option<String>,
    now_ms: u64,
) -> Result<String, RequestAuthError> {
    let agent_id = claimed_agent(&header)?;
    let time: u64 = header(TIME_HEADER)
        .and_then(|t| t.parse().ok())
        .ok_or(RequestAuthError::Missing(TIME_HEADER))?;
    let signature = header(SIGNATURE_HEADER).ok_or(RequestAuthError::Missing(SIGNATURE_HEADER))?;
    let skew_ms = now_ms.abs_diff(time);
    if skew_ms > MAX_SKEW_MS {
        return Err(RequestAuthError::Skew { skew_ms });
    }
    key.verify(
        &signed_bytes(method, path_and_query, &agent_id, time),
        &signature,
    )
    .map_err(|_: IdentityError| RequestAuthError::BadSignature)?;
    Ok(agent_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn headers(h: &[(&'static str, String); 3]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<&'static str, String> = h.iter().cloned().collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn signed_requests_verify_only_as_signed() {
        let id = Identity::generate();
        let key = id.public_key();
        let h = sign_request(&id, "a-1", "get", "/agent/v1/artifacts/web/1.0", 1_000_000);
        assert_eq!(
            verify_request(
                &key,
                "GET",
                "/agent/v1/artifacts/web/1.0",
                headers(&h),
                1_000_500
            ),
            Ok("a-1".into())
        );
        assert_eq!(
            verify_request(
                &key,
                "GET",
                "/agent/v1/artifacts/web/2.0",
                headers(&h),
                1_000_500
            ),
            Err(RequestAuthError::BadSignature)
        );
        assert_eq!(
            verify_request(
                &key,
                "POST",
                "/agent/v1/artifacts/web/1.0",
                headers(&h),
                1_000_500
            ),
            Err(RequestAuthError::BadSignature)
        );
        assert!(matches!(
            verify_request(
                &key,
                "GET",
                "/agent/v1/artifacts/web/1.0",
                headers(&h),
                1_000_000 + MAX_SKEW_MS + 1
            ),
            Err(RequestAuthError::Skew { .. })
        ));
        let other = Identity::generate().public_key();
        assert_eq!(
            verify_request(
                &other,
                "GET",
                "/agent/v1/artifacts/web/1.0",
                headers(&h),
                1_000_500
            ),
            Err(RequestAuthError::BadSignature)
        );
        let none = |_: &str| None;
        assert_eq!(
            verify_request(&key, "GET", "/", none, 0),
            Err(RequestAuthError::Missing(AGENT_HEADER))
        );
    }
}
