//! Job secrets sealed for one agent, so that neither end's journal ever holds them in clear.
//!
//! Each agent keeps an X25519 key of its own for this, apart from its Ed25519 signing key (the
//! dalek authors advise against using a signing key for encryption): `DIR/sealing.key`, mode
//! 0600, made at its first start. Its public half travels in the agent's `Hello`, inside the
//! end-to-end session that authenticates the agent. When the server dispatches a job, it seals
//! each step's secret property values for that key with HPKE (RFC 9180, base mode,
//! `DHKEM(X25519, HKDF-SHA256)`, `HKDF-SHA256`, `ChaCha20-Poly1305`, the `hpke` crate), the
//! job id and step index as associated data. The RunJob command is journaled on both ends in
//! that form; the agent opens a step's secrets in memory when the step starts and drops them
//! when it ends.
//!
//! Sealed text: standard base64 of the 32-byte encapsulated key followed by the ciphertext of
//! the values' JSON object.

use std::collections::BTreeMap;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};

use crate::identity::{write_private_file, IdentityError};
use crate::protocol::StepSpec;

/// The agent's sealing key file, in its state directory.
pub const SEALING_KEY_FILE: &str = "sealing.key";

/// HPKE `info`: binds every sealed value to this use.
const INFO: &[u8] = b"tether job secrets v1";
/// Bytes of an encapsulated X25519 key.
const ENCAPPED: usize = 32;
/// Largest sealed text accepted (a step's secrets travel in one frame anyway).
pub const MAX_SEALED_CHARS: usize = 1 << 20;

type KemX = X25519HkdfSha256;

/// Why secrets could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SealingError {
    /// The recipient's public key is not base64 of an X25519 point.
    #[error("sealing key: {0}")]
    PublicKey(String),
    /// The sealed text is not ours, was changed, or was sealed for another key or step.
    #[error("sealed secrets do not open: {0}")]
    Open(String),
    /// HPKE refused to seal (never with a valid key).
    #[error("sealing failed: {0}")]
    Seal(String),
    /// The key file.
    #[error(transparent)]
    KeyFile(#[from] IdentityError),
    /// The key file holds something else than a sealing key.
    #[error("sealing key file {path}: {reason}")]
    Garbled { path: String, reason: String },
}

/// An agent's X25519 key for opening job secrets.
pub struct SealingKey {
    private: <KemX as Kem>::PrivateKey,
    public: <KemX as Kem>::PublicKey,
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingKey")
            .field("public", &self.public_b64())
            .finish_non_exhaustive()
    }
}

impl SealingKey {
    /// A fresh key from the OS random source.
    pub fn generate() -> Self {
        let (private, public) = KemX::gen_keypair(&mut rand::rngs::OsRng);
        SealingKey { private, public }
    }

    /// Reads `path` (base64 of the 32-byte private key, mode 0600), or makes it.
    pub fn load_or_create(path: &Path) -> Result<Self, SealingError> {
        let garbled = |reason: String| SealingError::Garbled {
            path: path.display().to_string(),
            reason,
        };
        match crate::identity::read_private_file(path) {
            Ok(text) => {
                let bytes = STANDARD
                    .decode(text.trim())
                    .map_err(|e| garbled(format!("not base64 ({e})")))?;
                let private = <KemX as Kem>::PrivateKey::from_bytes(&bytes)
                    .map_err(|e| garbled(format!("not an X25519 key ({e})")))?;
                let public = KemX::sk_to_pk(&private);
                Ok(SealingKey { private, public })
            }
            Err(IdentityError::Missing { .. }) => {
                let key = SealingKey::generate();
                let text = STANDARD.encode(key.private.to_bytes());
                write_private_file(path, text.as_bytes()).map_err(|source| {
                    SealingError::KeyFile(IdentityError::Io {
                        path: path.to_owned(),
                        source,
                    })
                })?;
                Ok(key)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The public half, standard base64 (what `Hello::sealing_key` carries).
    pub fn public_b64(&self) -> String {
        STANDARD.encode(self.public.to_bytes())
    }

    /// Opens what [`seal`] made for this key with the same `aad`.
    pub fn open(&self, sealed: &str, aad: &[u8]) -> Result<BTreeMap<String, String>, SealingError> {
        let open = |m: String| SealingError::Open(m);
        if sealed.len() > MAX_SEALED_CHARS {
            return Err(open(format!("{} characters, over the limit", sealed.len())));
        }
        let bytes = STANDARD
            .decode(sealed)
            .map_err(|e| open(format!("not base64 ({e})")))?;
        if bytes.len() < ENCAPPED {
            return Err(open("too short".into()));
        }
        let (encapped, ciphertext) = bytes.split_at(ENCAPPED);
        let encapped = <KemX as Kem>::EncappedKey::from_bytes(encapped)
            .map_err(|e| open(format!("encapsulated key ({e})")))?;
        let plain = hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, KemX>(
            &OpModeR::Base,
            &self.private,
            &encapped,
            INFO,
            ciphertext,
            aad,
        )
        .map_err(|e| open(e.to_string()))?;
        serde_json::from_slice(&plain).map_err(|e| open(format!("not a property map ({e})")))
    }
}

/// Seals `values` for the agent whose sealing key is `public_b64`; only that key opens it, and
/// only with the same `aad`.
pub fn seal(
    public_b64: &str,
    values: &BTreeMap<String, String>,
    aad: &[u8],
) -> Result<String, SealingError> {
    let bytes = STANDARD
        .decode(public_b64.trim())
        .map_err(|e| SealingError::PublicKey(format!("not base64 ({e})")))?;
    let public = <KemX as Kem>::PublicKey::from_bytes(&bytes)
        .map_err(|e| SealingError::PublicKey(e.to_string()))?;
    let plain = serde_json::to_vec(values).map_err(|e| SealingError::Seal(e.to_string()))?;
    let (encapped, ciphertext) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, KemX, _>(
        &OpModeS::Base,
        &public,
        INFO,
        &plain,
        aad,
        &mut rand::rngs::OsRng,
    )
    .map_err(|e| SealingError::Seal(e.to_string()))?;
    let mut out = encapped.to_bytes().to_vec();
    out.extend_from_slice(&ciphertext);
    Ok(STANDARD.encode(out))
}

/// Moves the secret property values of step `index` of job `job_id` out of its `properties`
/// into `sealed`, for the agent whose sealing key is `public_b64`. A step without secret
/// values is left as it is.
pub fn seal_step(
    spec: &mut StepSpec,
    public_b64: &str,
    job_id: &str,
    index: usize,
) -> Result<(), SealingError> {
    let values: BTreeMap<String, String> = spec
        .secrets
        .iter()
        .filter_map(|name| spec.properties.get(name).map(|v| (name.clone(), v.clone())))
        .collect();
    if values.is_empty() {
        return Ok(());
    }
    spec.sealed = Some(seal(public_b64, &values, &step_aad(job_id, index))?);
    spec.properties.retain(|name, _| !values.contains_key(name));
    Ok(())
}

/// The reverse of [`seal_step`], in memory: the step with its secret values back in place.
/// Only the names the step declares secret are taken from the sealed text.
pub fn open_step(
    spec: &StepSpec,
    key: &SealingKey,
    job_id: &str,
    index: usize,
) -> Result<StepSpec, SealingError> {
    let mut open = spec.clone();
    if let Some(sealed) = open.sealed.take() {
        for (name, value) in key.open(&sealed, &step_aad(job_id, index))? {
            if spec.secrets.contains(&name) {
                open.properties.insert(name, value);
            }
        }
    }
    Ok(open)
}

/// What a step's sealed secrets are bound to: its job and its place in it.
pub fn step_aad(job_id: &str, step: usize) -> Vec<u8> {
    format!("{job_id}/{step}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> BTreeMap<String, String> {
        BTreeMap::from([("password".to_owned(), "hunter2".to_owned())])
    }

    #[test]
    fn only_the_key_and_the_step_it_was_sealed_for_open_it() {
        let key = SealingKey::generate();
        let other = SealingKey::generate();
        let sealed = seal(&key.public_b64(), &values(), &step_aad("j", 0)).unwrap();
        assert!(!sealed.contains("hunter2"));
        assert_eq!(key.open(&sealed, &step_aad("j", 0)).unwrap(), values());
        assert!(key.open(&sealed, &step_aad("j", 1)).is_err());
        assert!(key.open(&sealed, &step_aad("k", 0)).is_err());
        assert!(other.open(&sealed, &step_aad("j", 0)).is_err());
        // A flipped bit anywhere.
        let mut bytes = STANDARD.decode(&sealed).unwrap();
        for i in [0, ENCAPPED, bytes.len() - 1] {
            bytes[i] ^= 1;
            assert!(key
                .open(&STANDARD.encode(&bytes), &step_aad("j", 0))
                .is_err());
            bytes[i] ^= 1;
        }
        for bad in ["", "!!", "AAAA", &"A".repeat(MAX_SEALED_CHARS + 4)] {
            assert!(key.open(bad, &step_aad("j", 0)).is_err(), "{bad:.10}");
        }
        assert!(seal("not base64!", &values(), b"").is_err());
    }

    #[test]
    fn the_key_file_is_made_once_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SEALING_KEY_FILE);
        let made = SealingKey::load_or_create(&path).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let read = SealingKey::load_or_create(&path).unwrap();
        assert_eq!(made.public_b64(), read.public_b64());
        std::fs::write(&path, "garbage").unwrap();
        assert!(SealingKey::load_or_create(&path).is_err());
    }
}
