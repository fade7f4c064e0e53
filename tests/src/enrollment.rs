//! Enrollment requests made by hand, for tests that speak `POST /agent/v1/enroll` directly:
//! [`signed`] adds the proofs of possession a real install computes, so a test can send exactly
//! the fields it wants and still get past the proof check (or alter a signed body afterwards to
//! show that the check holds).

use base64::Engine as _;
use serde_json::Value;
use tether_shared::enroll::EnrollRequest;
use tether_shared::identity::Identity;
use tether_shared::tls::TlsKey;

/// `body` (a JSON enrollment request without proofs) signed by `identity` and, for a relay,
/// by `tls_key`. Panics if `body` is not an enrollment request.
pub fn signed(body: Value, identity: &Identity, tls_key: Option<&TlsKey>) -> Value {
    let mut body = body;
    body["proof"] = Value::String(String::new());
    let mut request: EnrollRequest =
        serde_json::from_value(body).unwrap_or_else(|e| panic!("not an enroll request: {e}"));
    request
        .sign(identity, tls_key)
        .unwrap_or_else(|e| panic!("sign: {e}"));
    serde_json::to_value(&request).unwrap_or_else(|e| panic!("{e}"))
}

/// The standard base64 of `key`'s raw public half, as `tls_public_key` carries it.
pub fn tls_public_key(key: &TlsKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(key.public_key_raw())
}
