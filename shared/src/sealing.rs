//! Job secrets sealed for one agent, so that neither end's journal ever holds them in clear.
//!
//! Each agent keeps an X25519 key of its own for this, apart from its Ed25519 signing key (the
//! dalek authors advise against using a signing key for encryption): `DIR/sealing.key`, mode
//! 0600, made at its first start. Its public half travels in the agent's `Hello`, inside the
//! end-to-end session that authenticates the agent. For each agent session the server sets up
//! an HPKE context for that key (RFC 9180, base mode, `DHKEM(X25519, HKDF-SHA256)`,
//! `HKDF-SHA256`, the export-only AEAD, the `hpke` crate) and exports from it a 256-bit key
//! ([`Sealer`]); each step's secret property values are sealed with that key by
//! XChaCha20-Poly1305 (a random 192-bit nonce each), the job id and step index as associated
//! data. So the X25519 work is done once per agent session, not once per job. The RunJob
//! command is journaled on both ends in that form; the agent opens a step's secrets in memory
//! when the step starts and drops them when it ends.
//!
//! Sealed text: standard base64 of the 32-byte encapsulated key, the 24-byte nonce and the
//! ciphertext of the values' JSON object.

use std::collections::BTreeMap;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hpke::aead::ExportOnlyAead;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};

use crate::identity::{write_private_file, IdentityError};
use crate::protocol::StepSpec;

/// The agent's sealing key file, in its state directory.
pub const SEALING_KEY_FILE: &str = "sealing.key";

/// HPKE `info`: binds every sealed value to this use.
const INFO: &[u8] = b"tether job secrets v1";
/// What the exported key is for (HPKE exporter context).
const EXPORT_CONTEXT: &[u8] = b"step secrets key";
/// Bytes of an encapsulated X25519 key.
const ENCAPPED: usize = 32;
/// Bytes of an XChaCha20 nonce.
const NONCE: usize = 24;
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
        if bytes.len() < ENCAPPED + NONCE {
            return Err(open("too short".into()));
        }
        let (encapped, rest) = bytes.split_at(ENCAPPED);
        let (nonce, ciphertext) = rest.split_at(NONCE);
        let encapped = <KemX as Kem>::EncappedKey::from_bytes(encapped)
            .map_err(|e| open(format!("encapsulated key ({e})")))?;
        let context = hpke::setup_receiver::<ExportOnlyAead, HkdfSha256, KemX>(
            &OpModeR::Base,
            &self.private,
            &encapped,
            INFO,
        )
        .map_err(|e| open(e.to_string()))?;
        let cipher = exported_cipher(|out| context.export(EXPORT_CONTEXT, out))
            .map_err(|e| open(e.to_string()))?;
        let payload = Payload {
            msg: ciphertext,
            aad,
        };
        let plain = cipher
            .decrypt(XNonce::from_slice(nonce), payload)
            .map_err(|_| open("changed, or sealed for another key or step".into()))?;
        serde_json::from_slice(&plain).map_err(|e| open(format!("not a property map ({e})")))
    }
}

/// The cipher of the key an HPKE context exports.
fn exported_cipher(
    export: impl FnOnce(&mut [u8]) -> Result<(), hpke::HpkeError>,
) -> Result<XChaCha20Poly1305, hpke::HpkeError> {
    let mut key = [0u8; 32];
    export(&mut key)?;
    let cipher = XChaCha20Poly1305::new(&key.into());
    key.iter_mut().for_each(|b| *b = 0);
    Ok(cipher)
}

/// Seals values for one agent: an HPKE context set up once for its key (keep one per agent
/// session), each value sealed with the key exported from it.
pub struct Sealer {
    encapped: Vec<u8>,
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer for the agent whose sealing key is `public_b64`.
    pub fn new(public_b64: &str) -> Result<Sealer, SealingError> {
        let bytes = STANDARD
            .decode(public_b64.trim())
            .map_err(|e| SealingError::PublicKey(format!("not base64 ({e})")))?;
        let public = <KemX as Kem>::PublicKey::from_bytes(&bytes)
            .map_err(|e| SealingError::PublicKey(e.to_string()))?;
        let (encapped, context) = hpke::setup_sender::<ExportOnlyAead, HkdfSha256, KemX, _>(
            &OpModeS::Base,
            &public,
            INFO,
            &mut rand::rngs::OsRng,
        )
        .map_err(|e| SealingError::Seal(e.to_string()))?;
        let cipher = exported_cipher(|out| context.export(EXPORT_CONTEXT, out))
            .map_err(|e| SealingError::Seal(e.to_string()))?;
        Ok(Sealer {
            encapped: encapped.to_bytes().to_vec(),
            cipher,
        })
    }

    /// `values` sealed; only the agent's key opens them, and only with the same `aad`.
    pub fn seal(
        &self,
        values: &BTreeMap<String, String>,
        aad: &[u8],
    ) -> Result<String, SealingError> {
        let plain = serde_json::to_vec(values).map_err(|e| SealingError::Seal(e.to_string()))?;
        let nonce = XChaCha20Poly1305::generate_nonce(&mut rand::rngs::OsRng);
        let payload = Payload { msg: &plain, aad };
        let ciphertext = self
            .cipher
            .encrypt(&nonce, payload)
            .map_err(|e| SealingError::Seal(e.to_string()))?;
        let mut out = self.encapped.clone();
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        Ok(STANDARD.encode(out))
    }
}

/// Seals `values` for the agent whose sealing key is `public_b64` (a [`Sealer`] of its own).
pub fn seal(
    public_b64: &str,
    values: &BTreeMap<String, String>,
    aad: &[u8],
) -> Result<String, SealingError> {
    Sealer::new(public_b64)?.seal(values, aad)
}

/// Moves the secret property values of step `index` of job `job_id` out of its `properties`
/// into `sealed`, with the agent's `sealer`. A step without secret values is left as it is.
pub fn seal_step(
    spec: &mut StepSpec,
    sealer: &Sealer,
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
    spec.sealed = Some(sealer.seal(&values, &step_aad(job_id, index))?);
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
        for i in [0, ENCAPPED, ENCAPPED + NONCE, bytes.len() - 1] {
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
        // One sealer, many values: each opens alone, none repeats a nonce.
        let sealer = Sealer::new(&key.public_b64()).unwrap();
        let (a, b) = (
            sealer.seal(&values(), b"a").unwrap(),
            sealer.seal(&values(), b"a").unwrap(),
        );
        assert_ne!(a, b);
        assert_eq!(key.open(&a, b"a").unwrap(), values());
        assert_eq!(key.open(&b, b"a").unwrap(), values());
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
