//! Enrollment on the wire: the JSON bodies of `POST /agent/v1/enroll` (sent by `tether-agent
//! install` and `tether-relay install`, answered by the server), the [`Role`] an enrollment token
//! grants, the naming rules for agent names and tags, and the paths an agent derives from its
//! `wss://host:port` upstream.

use serde::{Deserialize, Serialize};

pub mod client;

/// Path of the enrollment endpoint on the agent-facing surface (server `listen.wss`, relay).
pub const ENROLL_PATH: &str = "/agent/v1/enroll";
/// Path of the agent WebSocket on the same surface.
pub const WS_PATH: &str = "/agent/v1/ws";
/// Longest agent or relay name, and longest tag.
pub const MAX_NAME_LEN: usize = 64;
/// Most tags one agent may carry.
pub const MAX_TAGS: usize = 32;

/// What an enrollment token enrolls, and what an enrolled peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A machine that runs deployment steps.
    #[default]
    Agent,
    /// A relay carrying other agents' connections upstream.
    Relay,
}

impl Role {
    /// The role's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Relay => "relay",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of `POST /agent/v1/enroll`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The enrollment token issued by `POST /api/v1/enrollment-tokens`.
    pub token: String,
    /// The name the operator gave this machine (see [`name_problem`]).
    pub name: String,
    /// Standard base64 of the peer's Ed25519 public key.
    pub public_key: String,
    /// Labels deployments target (see [`name_problem`]).
    #[serde(default)]
    pub tags: Vec<String>,
    /// What is enrolling; must be the token's role.
    #[serde(default)]
    pub role: Role,
    /// Relays only: standard base64 of the raw public half of the relay's P-256 TLS key, which
    /// the server's CA certifies for `hostnames`, so agents trust one CA only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_public_key: Option<String>,
    /// Relays only: the DNS names and IP addresses agents dial the relay at.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Proof of possession of the Ed25519 key: standard base64 of its signature over
    /// [`EnrollRequest::proof_message`]. Nobody can enroll a key they do not hold.
    pub proof: String,
    /// Relays only: proof of possession of the TLS key, standard base64 of its ECDSA P-256
    /// signature (ASN.1 DER) over the same message. The CA certifies only a key whose holder
    /// asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_proof: Option<String>,
}

/// Domain separation of the enrollment proof: no other signature of the same keys can pass.
const PROOF_CONTEXT: &[u8] = b"tether-enroll-v1\n";

/// What the proofs of an [`EnrollRequest`] sign: every field that matters, in a fixed order,
/// with the token only as its sha256 (the proof binds the request to its token).
#[derive(Serialize)]
struct ProofFields<'a> {
    token_sha256: String,
    name: &'a str,
    role: Role,
    public_key: &'a str,
    tags: &'a [String],
    tls_public_key: Option<&'a str>,
    hostnames: &'a [String],
}

/// Why an enrollment's proof of possession failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The Ed25519 signature does not verify with `public_key`.
    #[error(
        "proof does not verify with public_key: the request must be signed by the key it enrolls"
    )]
    Identity,
    /// A relay sent no `tls_proof`, or it does not verify with `tls_public_key`.
    #[error("tls_proof does not verify with tls_public_key: the request must be signed by the TLS key to certify")]
    TlsKey,
}

impl EnrollRequest {
    /// The bytes both proofs sign.
    pub fn proof_message(&self) -> Vec<u8> {
        let fields = ProofFields {
            token_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                self.token.as_bytes(),
            )),
            name: &self.name,
            role: self.role,
            public_key: &self.public_key,
            tags: &self.tags,
            tls_public_key: self.tls_public_key.as_deref(),
            hostnames: &self.hostnames,
        };
        let mut message = PROOF_CONTEXT.to_vec();
        // Serializing a struct of strings cannot fail.
        message.extend(serde_json::to_vec(&fields).unwrap_or_default());
        message
    }

    /// Fills `proof` (and, given the relay's TLS key, `tls_proof`) for the fields as they are.
    pub fn sign(
        &mut self,
        identity: &crate::identity::Identity,
        tls_key: Option<&crate::tls::TlsKey>,
    ) -> Result<(), crate::tls::TlsError> {
        use base64::Engine as _;
        let message = self.proof_message();
        self.proof = identity.sign(&message);
        self.tls_proof = match tls_key {
            Some(key) => {
                Some(base64::engine::general_purpose::STANDARD.encode(key.sign(&message)?))
            }
            None => None,
        };
        Ok(())
    }

    /// Checks the proof of the Ed25519 key, and for a relay (a `tls_public_key`) the proof of
    /// the TLS key. `public_key` and `tls_public_key` must already be well-formed.
    pub fn verify_proofs(
        &self,
        public_key: &crate::identity::PublicKey,
        tls_public_key_raw: Option<&[u8]>,
    ) -> Result<(), ProofError> {
        use base64::Engine as _;
        let message = self.proof_message();
        public_key
            .verify(&message, &self.proof)
            .map_err(|_| ProofError::Identity)?;
        if let Some(raw) = tls_public_key_raw {
            let signature = self
                .tls_proof
                .as_deref()
                .and_then(|p| base64::engine::general_purpose::STANDARD.decode(p).ok())
                .ok_or(ProofError::TlsKey)?;
            if !crate::tls::verify_p256(raw, &message, &signature) {
                return Err(ProofError::TlsKey);
            }
        }
        Ok(())
    }
}

/// The answer to a successful enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The id the server assigned (`a-...` for agents, `r-...` for relays).
    pub agent_id: String,
    /// Standard base64 of the server's command-signing public key, to pin.
    pub server_signing_key: String,
    /// Relays only: the relay's TLS certificate (PEM), signed by the server's relay CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_certificate: Option<String>,
    /// The server CA's certificate (PEM) of `server_signing_key`, for code signing only: the
    /// installer checks it against its `--ca` before pinning the key, so an answer altered on
    /// the way (by a relay it enrolls through) is refused. Required by installers; optional
    /// here only so that the refusal can say what is missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_signing_certificate: Option<String>,
}

/// Why `what` (a name or a tag) is not acceptable, if it is not: 1 to [`MAX_NAME_LEN`]
/// characters of `[A-Za-z0-9._-]`.
pub fn name_problem(what: &str, value: &str) -> Option<String> {
    if value.is_empty() {
        return Some(format!("{what} must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Some(format!(
            "{what} must be at most {MAX_NAME_LEN} characters, got {}",
            value.len()
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Some(format!(
            "{what} {value:?} may only hold the characters A-Z a-z 0-9 . _ -"
        ));
    }
    None
}

/// Why `tags` are not acceptable, if they are not: at most [`MAX_TAGS`], each a valid name.
pub fn tags_problem(tags: &[String]) -> Option<String> {
    if tags.len() > MAX_TAGS {
        return Some(format!(
            "at most {MAX_TAGS} tags are allowed, got {}",
            tags.len()
        ));
    }
    tags.iter().find_map(|tag| name_problem("tag", tag))
}

/// An agent-facing base URL, `wss://host:port`; any path after the authority is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// The port (443 if the URL names none).
    pub port: u16,
}

impl Upstream {
    /// Parses `wss://host[:port][/path]`.
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let rest = url.strip_prefix("wss://").ok_or_else(|| {
            format!("upstream {url:?} must start with wss:// (the agent-facing address, e.g. wss://server:7919)")
        })?;
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("upstream {url:?} must not contain whitespace"));
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (host, port) = crate::authority::parse(authority, 443)
            .map_err(|e| format!("upstream {url:?}: {e}"))?;
        Ok(Upstream { host, port })
    }

    /// `host:port` (IPv6 in brackets), as in URLs.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The canonical base URL, `wss://host:port`.
    pub fn base_url(&self) -> String {
        format!("wss://{}", self.authority())
    }

    /// The enrollment URL derived from it.
    pub fn enroll_url(&self) -> String {
        format!("https://{}{ENROLL_PATH}", self.authority())
    }

    /// The WebSocket URL derived from it.
    pub fn ws_url(&self) -> String {
        format!("wss://{}{WS_PATH}", self.authority())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn names_and_tags() {
        assert_eq!(name_problem("name", "web-01.prod_a"), None);
        assert_eq!(name_problem("name", &"a".repeat(64)), None);
        assert!(name_problem("name", "").is_some());
        assert!(name_problem("name", &"a".repeat(65)).is_some());
        for bad in ["a b", "a/b", "ä", "a\n", "<script>", "a:b"] {
            assert!(name_problem("name", bad).is_some(), "{bad:?}");
        }
        assert_eq!(tags_problem(&vec!["t".to_owned(); 32]), None);
        assert!(tags_problem(&vec!["t".to_owned(); 33]).is_some());
        assert!(tags_problem(&["ok".to_owned(), "not ok".to_owned()]).is_some());
    }

    #[test]
    fn upstreams() {
        let u = Upstream::parse("wss://server.example:7919/ignored/path").unwrap();
        assert_eq!(u.host, "server.example");
        assert_eq!(u.port, 7919);
        assert_eq!(u.base_url(), "wss://server.example:7919");
        assert_eq!(
            u.enroll_url(),
            "https://server.example:7919/agent/v1/enroll"
        );
        assert_eq!(u.ws_url(), "wss://server.example:7919/agent/v1/ws");
        assert_eq!(Upstream::parse("wss://h").unwrap().port, 443);
        let v6 = Upstream::parse("wss://[::1]:20080").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 20080));
        assert_eq!(v6.base_url(), "wss://[::1]:20080");
        for bad in [
            "https://server:8443",
            "ws://server:7919",
            "wss://",
            "wss://:7919",
            "wss://h:0",
            "wss://h:99999",
            "wss://u:p@h:1",
            "wss://a b",
            "wss://[::1",
        ] {
            assert!(Upstream::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn proofs_bind_every_field_and_both_keys() {
        use base64::Engine as _;
        let identity = crate::identity::Identity::generate();
        let tls_key = crate::tls::TlsKey::generate().unwrap();
        let raw = tls_key.public_key_raw();
        let mut req = EnrollRequest {
            token: "tte_x".into(),
            name: "r1".into(),
            public_key: identity.public_key_b64(),
            tags: Vec::new(),
            role: Role::Relay,
            tls_public_key: Some(base64::engine::general_purpose::STANDARD.encode(&raw)),
            hostnames: vec!["relay.example".into()],
            proof: String::new(),
            tls_proof: None,
        };
        req.sign(&identity, Some(&tls_key)).unwrap();
        let public = identity.public_key();
        assert_eq!(req.verify_proofs(&public, Some(&raw)), Ok(()));
        // Any change of a signed field breaks both proofs.
        let mut altered = req.clone();
        altered.hostnames.push("server.example".into());
        assert_eq!(
            altered.verify_proofs(&public, Some(&raw)),
            Err(ProofError::Identity)
        );
        let mut altered = req.clone();
        altered.token = "tte_y".into();
        assert_eq!(
            altered.verify_proofs(&public, Some(&raw)),
            Err(ProofError::Identity)
        );
        // Another Ed25519 key, or another TLS key, does not verify.
        let other = crate::identity::Identity::generate().public_key();
        assert_eq!(
            req.verify_proofs(&other, Some(&raw)),
            Err(ProofError::Identity)
        );
        let other_tls = crate::tls::TlsKey::generate().unwrap().public_key_raw();
        assert_eq!(
            req.verify_proofs(&public, Some(&other_tls)),
            Err(ProofError::TlsKey)
        );
        // A relay without a TLS proof fails; an agent needs none.
        let mut unsigned = req.clone();
        unsigned.tls_proof = None;
        assert_eq!(
            unsigned.verify_proofs(&public, Some(&raw)),
            Err(ProofError::TlsKey)
        );
        let mut agent = EnrollRequest {
            role: Role::Agent,
            tls_public_key: None,
            hostnames: Vec::new(),
            ..req
        };
        agent.sign(&identity, None).unwrap();
        assert_eq!(agent.verify_proofs(&public, None), Ok(()));
    }

    #[test]
    fn request_refuses_unknown_fields_and_defaults_role() {
        let req: EnrollRequest =
            serde_json::from_str(r#"{"token":"t","name":"n","public_key":"k","proof":"p"}"#)
                .unwrap();
        assert_eq!(req.role, Role::Agent);
        assert!(req.tags.is_empty());
        assert!(serde_json::from_str::<EnrollRequest>(
            r#"{"token":"t","name":"n","public_key":"k","proof":"p","x":1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<EnrollRequest>(
            r#"{"token":"t","name":"n","public_key":"k","proof":"p","role":"boss"}"#
        )
        .is_err());
        assert!(
            serde_json::from_str::<EnrollRequest>(r#"{"token":"t","name":"n","public_key":"k"}"#)
                .is_err(),
            "the proof is required"
        );
    }
}
