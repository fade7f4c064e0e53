//! Ed25519 identities: the key pair each agent and relay generates at enrollment and the
//! server's command-signing key. Private keys live on disk as PKCS#8 PEM, mode 0600, written
//! atomically; public keys and signatures travel as standard base64.
//!
//! Also home of [`write_private_file`], the one way Tether writes a secret to disk.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::RngCore;

/// Why an identity could not be saved, loaded or verified.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file does not exist.
    #[error("key file {}: not found", path.display())]
    Missing {
        /// The file looked for.
        path: PathBuf,
    },
    /// The key file is readable by group or others.
    #[error("key file {}: mode {mode:o} is too permissive, expected 600", path.display())]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file is not a PKCS#8 PEM Ed25519 private key.
    #[error("key file {}: not an Ed25519 PKCS#8 PEM private key ({message})", path.display())]
    Garbled {
        /// The file.
        path: PathBuf,
        /// The decoder's complaint.
        message: String,
    },
    /// Reading or writing the key file failed.
    #[error("key file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying failure.
        source: io::Error,
    },
    /// A public key is not base64 of 32 bytes forming a valid Ed25519 point.
    #[error("public key: {0}")]
    PublicKey(String),
    /// A signature is not base64 of 64 bytes.
    #[error("signature: {0}")]
    SignatureEncoding(String),
    /// The signature is well-formed but does not verify for this key and message.
    #[error("signature does not verify")]
    BadSignature,
}

/// An Ed25519 key pair.
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("public_key", &self.public_key_b64())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh key pair from the OS random source.
    pub fn generate() -> Self {
        Self {
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// Writes the private key as PKCS#8 PEM to `path`, mode 0600, atomically.
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let pem = self
            .key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| IdentityError::Garbled {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        write_private_file(path, pem.as_bytes()).map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a key saved by [`Identity::save`]; refuses a file others may read.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let pem = read_private_file(path)?;
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| IdentityError::Garbled {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Self { key })
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.key.verifying_key())
    }

    /// The public key as standard base64 of its 32 bytes.
    pub fn public_key_b64(&self) -> String {
        self.public_key().to_b64()
    }

    /// Signs `message`; the signature as standard base64 of its 64 bytes.
    pub fn sign(&self, message: &[u8]) -> String {
        STANDARD.encode(self.key.sign(message).to_bytes())
    }
}

/// An Ed25519 public key, for verifying signatures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses standard base64 of 32 bytes.
    pub fn from_b64(text: &str) -> Result<Self, IdentityError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|e| IdentityError::PublicKey(format!("not base64 ({e})")))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            IdentityError::PublicKey(format!("expected 32 bytes, got {}", b.len()))
        })?;
        VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| IdentityError::PublicKey("not a valid Ed25519 point".into()))
    }

    /// The 32 key bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Standard base64 of the 32 key bytes.
    pub fn to_b64(&self) -> String {
        STANDARD.encode(self.0.as_bytes())
    }

    /// Checks that `signature_b64` is this key's signature over `message`.
    pub fn verify(&self, message: &[u8], signature_b64: &str) -> Result<(), IdentityError> {
        let bytes = STANDARD
            .decode(signature_b64.trim())
            .map_err(|e| IdentityError::SignatureEncoding(format!("not base64 ({e})")))?;
        let bytes: [u8; 64] = bytes.try_into().map_err(|b: Vec<u8>| {
            IdentityError::SignatureEncoding(format!("expected 64 bytes, got {}", b.len()))
        })?;
        self.0
            .verify_strict(message, &Signature::from_bytes(&bytes))
            .map_err(|_| IdentityError::BadSignature)
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_b64())
    }
}

/// Reads a private file (text), refusing one readable by group or others.
pub fn read_private_file(path: &Path) -> Result<String, IdentityError> {
    let io_err = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound => IdentityError::Missing {
            path: path.to_path_buf(),
        },
        _ => IdentityError::Io {
            path: path.to_path_buf(),
            source,
        },
    };
    let mode = fs::metadata(path).map_err(io_err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    fs::read_to_string(path).map_err(io_err)
}

/// Writes `contents` to `path` with mode 0600, atomically (see [`write_file_atomic`]).
pub fn write_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_file_atomic(path, contents, 0o600)
}

/// Writes `contents` to `path` with permission bits `mode`, atomically: a temporary file in the
/// same directory is created with `mode`, written, synced and renamed over `path`, then the
/// directory is synced. A crash leaves the old file or the new one, never a partial one, and
/// the contents are never visible under looser permissions.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{:016x}",
        name.to_string_lossy(),
        rand::rngs::OsRng.next_u64()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have cleared bits of `mode`; set them exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        // Best effort: the temporary file may not exist if opening it failed.
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests;
