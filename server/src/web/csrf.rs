//! CSRF protection for every state change of the web application, three layers deep:
//!
//! 1. The session cookie is `SameSite=Strict`: a browser does not send it with a request that
//!    another site starts.
//! 2. [`check_origin`]: a POST must carry `Origin` (or, failing that, `Referer`) naming this
//!    server's own origin, `https://<Host>`.
//! 3. [`protected_form`]: the form body must carry the session's CSRF token in the field
//!    `csrf` (compared in constant time).
//!
//! A request failing any of them gets 403 before anything is parsed or changed. The login form
//! (no session yet) relies on the first two.

use actix_web::http::header;
use actix_web::HttpRequest;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use super::session::CurrentUser;
use super::WebError;

/// The form field holding the token.
pub const FIELD: &str = "csrf";

/// Refuses a request whose `Origin` (or `Referer`, if there is no `Origin`) is not this
/// server's origin.
pub fn check_origin(req: &HttpRequest) -> Result<(), WebError> {
    let host = req.connection_info().host().to_ascii_lowercase();
    let ours = format!("https://{host}");
    let text = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
            .map(str::to_ascii_lowercase)
    };
    let same = match (text(header::ORIGIN), text(header::REFERER)) {
        (Some(origin), _) => origin == ours,
        (None, Some(referer)) => {
            referer == ours
                || referer
                    .strip_prefix(&ours)
                    .is_some_and(|rest| rest.starts_with('/'))
        }
        (None, None) => false,
    };
    if same {
        Ok(())
    } else {
        tracing::warn!(peer = ?req.peer_addr(), path = %req.path(), "web-cross-origin-refused");
        Err(WebError::Forbidden(
            "cross-origin request refused: nothing was changed".into(),
        ))
    }
}

/// Checks `presented` against the session's token.
pub fn check_token(
    req: &HttpRequest,
    user: &CurrentUser,
    presented: Option<&str>,
) -> Result<(), WebError> {
    match presented {
        Some(token) if bool::from(token.as_bytes().ct_eq(user.csrf.as_bytes())) => Ok(()),
        _ => {
            tracing::warn!(peer = ?req.peer_addr(), path = %req.path(), user = %user.name, "web-csrf-refused");
            Err(WebError::Forbidden(
                "missing or wrong CSRF token: nothing was changed; reload the page and retry"
                    .into(),
            ))
        }
    }
}

/// The "I am sure" checkbox of a delete form (`confirm=yes`): without it, nothing is deleted
/// and the answer says what to tick. `what` is the thing, with its article ("an agent").
pub fn confirmed(confirm: Option<&str>, what: &str) -> Result<(), WebError> {
    if confirm == Some("yes") {
        Ok(())
    } else {
        Err(WebError::BadRequest(format!(
            "tick \"I am sure\" to delete {what}"
        )))
    }
}

/// The form `body` of a state change by `user`, once origin and CSRF token are checked.
pub fn protected_form<T: DeserializeOwned>(
    req: &HttpRequest,
    user: &CurrentUser,
    body: &[u8],
) -> Result<T, WebError> {
    check_origin(req)?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).unwrap_or_default();
    let presented = pairs
        .iter()
        .find(|(k, _)| k == FIELD)
        .map(|(_, v)| v.as_str());
    check_token(req, user, presented)?;
    serde_urlencoded::from_bytes(body)
        .map_err(|e| WebError::BadRequest(format!("invalid form: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn user() -> CurrentUser {
        CurrentUser {
            name: "admin".into(),
            csrf: "tok".into(),
            role: crate::authz::Role::Admin,
        }
    }

    #[derive(Debug, serde::Deserialize)]
    struct Form {
        tags: String,
    }

    fn req(headers: &[(&str, &str)]) -> HttpRequest {
        let mut r = TestRequest::post().insert_header(("Host", "tether.test:8443"));
        for h in headers {
            r = r.insert_header(*h);
        }
        r.to_http_request()
    }

    #[test]
    fn same_origin_with_the_token_passes() {
        let r = req(&[("Origin", "https://tether.test:8443")]);
        let f: Form = protected_form(&r, &user(), b"csrf=tok&tags=a").unwrap();
        assert_eq!(f.tags, "a");
        let r = req(&[("Referer", "https://tether.test:8443/agents?page=2")]);
        protected_form::<Form>(&r, &user(), b"tags=a&csrf=tok").unwrap();
    }

    #[test]
    fn anything_else_is_forbidden() {
        let ok = [("Origin", "https://tether.test:8443")];
        for (headers, body) in [
            (&ok[..], &b"tags=a"[..]),
            (&ok[..], b"csrf=&tags=a"),
            (&ok[..], b"csrf=tok2&tags=a"),
            (&ok[..], b"csrf=to&tags=a"),
            (&[][..], b"csrf=tok&tags=a"),
            (&[("Origin", "https://evil.test")][..], b"csrf=tok&tags=a"),
            (&[("Origin", "null")][..], b"csrf=tok&tags=a"),
            (
                &[("Origin", "http://tether.test:8443")][..],
                b"csrf=tok&tags=a",
            ),
            (
                &[("Referer", "https://tether.test:8443.evil.test/")][..],
                b"csrf=tok&tags=a",
            ),
        ] {
            let r = req(headers);
            let err = protected_form::<Form>(&r, &user(), body).unwrap_err();
            assert!(
                matches!(err, WebError::Forbidden(_)),
                "{headers:?} {body:?}"
            );
        }
    }
}
