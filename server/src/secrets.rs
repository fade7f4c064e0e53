//! The server's secrets at rest: every secret property value the server stores (in a process
//! or a deployment) is sealed with a key kept apart from the data.
//!
//! The key ring is a text file, mode 0600, outside the data directory (`secrets.key_file`,
//! by default `secrets.key` in the config directory), or the standard output of an operator's
//! command (`secrets.key_command`, for a KMS or a vault). One key per line, `<id> <base64 of
//! 32 bytes>`; `#` starts a comment. The last key seals; every key opens.
//!
//! A value is sealed with XChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`, a random
//! 192-bit nonce per value), its place in the store (`deployment/<id>/…`) as associated data,
//! so a sealed value moved elsewhere does not open. Stored text:
//! `tether-sealed:v1:<key id>:<base64 of nonce ‖ ciphertext>`.
//!
//! Rotation: `tether-server secrets rotate` appends a new key; at its next start the server
//! seals again, with it, every value sealed with an older key (or stored in clear by a release
//! before this one), and `/admin/health` shows how many remain (`secrets.stale`). Once none
//! do, `tether-server secrets retire <id>` drops the old key.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use tether_shared::identity::{read_private_file, write_private_file, IdentityError};

/// The key ring's file name in the config directory, unless `secrets.key_file` says otherwise.
pub const KEY_FILE: &str = "secrets.key";
/// What every sealed value starts with.
const PREFIX: &str = "tether-sealed:v1:";
/// XChaCha20 nonce bytes.
const NONCE: usize = 24;

/// Why the key ring could not be read, or a value not opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secrets key file: {0}")]
    KeyFile(#[from] IdentityError),
    #[error("secrets key file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secrets key command {command:?}: {reason}")]
    Command { command: String, reason: String },
    #[error("{what}, line {line}: {reason}")]
    Garbled {
        what: String,
        line: usize,
        reason: String,
    },
    #[error("{what} holds no key")]
    Empty { what: String },
    #[error("a stored secret ({context}) is sealed with key {id}, which the key ring lacks")]
    UnknownKey { context: String, id: String },
    #[error("a stored secret ({context}) does not open: it was changed or moved")]
    Open { context: String },
    #[error("{0}")]
    Refused(String),
}

/// Where the key ring comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file, created (one fresh key) if missing.
    File(PathBuf),
    /// A shell command whose standard output is the key ring.
    Command(String),
}

/// The keys that seal and open stored secrets.
pub struct KeyRing {
    /// In file order; the last one seals.
    keys: Vec<(String, XChaCha20Poly1305)>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("ids", &self.ids())
            .finish_non_exhaustive()
    }
}

/// A fresh key line: a random id and key.
pub fn new_key_line() -> String {
    let mut id = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut id);
    let key = XChaCha20Poly1305::generate_key(&mut rand::rngs::OsRng);
    format!("{} {}", hex::encode(id), STANDARD.encode(key))
}

impl KeyRing {
    /// Reads the ring from `source`; a missing key file is created with one fresh key.
    pub fn load(source: &KeySource) -> Result<KeyRing, SecretsError> {
        match source {
            KeySource::File(path) => match read_private_file(path) {
                Ok(text) => KeyRing::parse(&text, &path.display().to_string()),
                Err(IdentityError::Missing { .. }) => {
                    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir).map_err(|source| SecretsError::Write {
                            path: dir.to_owned(),
                            source,
                        })?;
                    }
                    let text = format!(
                        "# Tether's key ring for secrets at rest: keep it apart from the data \
                         directory and its backups.\n{}\n",
                        new_key_line()
                    );
                    write_private_file(path, text.as_bytes()).map_err(|source| {
                        SecretsError::Write {
                            path: path.clone(),
                            source,
                        }
                    })?;
                    tracing::warn!(path = %path.display(), "secrets-key-created");
                    KeyRing::parse(&text, &path.display().to_string())
                }
                Err(e) => Err(e.into()),
            },
            KeySource::Command(command) => {
                let failed = |reason: String| SecretsError::Command {
                    command: command.clone(),
                    reason,
                };
                let out = std::process::Command::new("/bin/sh")
                    .arg("-c")
                    .arg(command)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .map_err(|e| failed(e.to_string()))?;
                if !out.status.success() {
                    return Err(failed(format!(
                        "{}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                let text = String::from_utf8(out.stdout)
                    .map_err(|_| failed("its output is not UTF-8".into()))?;
                KeyRing::parse(&text, "the secrets key command's output")
            }
        }
    }

    /// Parses key lines (`what` names the text in errors).
    pub fn parse(text: &str, what: &str) -> Result<KeyRing, SecretsError> {
        let mut keys: Vec<(String, XChaCha20Poly1305)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let garbled = |reason: &str| SecretsError::Garbled {
                what: what.to_owned(),
                line: n + 1,
                reason: reason.to_owned(),
            };
            let (id, key) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| garbled("expected `<id> <base64 key>`"))?;
            let id_ok = !id.is_empty()
                && id.len() <= 32
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !id_ok {
                return Err(garbled("a key id is 1 to 32 letters, digits or '-'"));
            }
            if keys.iter().any(|(k, _)| k == id) {
                return Err(garbled("this key id is already in the ring"));
            }
            let bytes = STANDARD
                .decode(key.trim())
                .map_err(|_| garbled("the key is not base64"))?;
            let cipher = XChaCha20Poly1305::new_from_slice(&bytes)
                .map_err(|_| garbled("a key is 32 bytes"))?;
            keys.push((id.to_owned(), cipher));
        }
        if keys.is_empty() {
            return Err(SecretsError::Empty {
                what: what.to_owned(),
            });
        }
        Ok(KeyRing { keys })
    }

    /// A ring of one fresh key (tests).
    #[cfg(test)]
    pub fn generate() -> KeyRing {
        KeyRing::parse(&new_key_line(), "generated").unwrap_or_else(|e| unreachable!("{e}"))
    }

    /// Key ids, oldest first; the last seals.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|(id, _)| id.as_str()).collect()
    }

    fn active(&self) -> &(String, XChaCha20Poly1305) {
        // `parse` refuses an empty ring.
        &self.keys[self.keys.len() - 1]
    }

    /// `value` sealed with the active key, bound to `context`.
    pub fn seal(&self, context: &str, value: &str) -> String {
        let (id, cipher) = self.active();
        let nonce = XChaCha20Poly1305::generate_nonce(&mut rand::rngs::OsRng);
        let payload = Payload {
            msg: value.as_bytes(),
            aad: context.as_bytes(),
        };
        // Encryption fails only past the cipher's length limit (256 GiB).
        let sealed = cipher.encrypt(&nonce, payload).unwrap_or_default();
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        format!("{PREFIX}{id}:{}", STANDARD.encode(bytes))
    }

    /// The clear value of what [`KeyRing::seal`] made for `context`. Text that is not sealed
    /// (stored by a release before secrets were sealed) is answered as it is.
    pub fn open(&self, context: &str, stored: &str) -> Result<String, SecretsError> {
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_owned());
        };
        let bad = || SecretsError::Open {
            context: context.to_owned(),
        };
        let (id, body) = rest.split_once(':').ok_or_else(bad)?;
        let (_, cipher) =
            self.keys
                .iter()
                .find(|(k, _)| k == id)
                .ok_or_else(|| SecretsError::UnknownKey {
                    context: context.to_owned(),
                    id: id.to_owned(),
                })?;
        let bytes = STANDARD.decode(body).map_err(|_| bad())?;
        if bytes.len() < NONCE {
            return Err(bad());
        }
        let (nonce, sealed) = bytes.split_at(NONCE);
        let payload = Payload {
            msg: sealed,
            aad: context.as_bytes(),
        };
        let clear = cipher
            .decrypt(XNonce::from_slice(nonce), payload)
            .map_err(|_| bad())?;
        String::from_utf8(clear).map_err(|_| bad())
    }

    /// Whether `stored` is a sealed value at all (not text stored before sealing).
    pub fn is_sealed(stored: &str) -> bool {
        stored.starts_with(PREFIX)
    }

    /// Whether `stored` is sealed with the key that seals now (else it is sealed again).
    pub fn is_current(&self, stored: &str) -> bool {
        stored
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(id, _)| id == self.active().0)
    }
}

/// `tether-server secrets rotate`: appends a fresh key to the ring at `path` (which then seals);
/// answers its id.
pub fn rotate(path: &Path) -> Result<String, SecretsError> {
    let text = read_private_file(path)?;
    KeyRing::parse(&text, &path.display().to_string())?;
    let line = new_key_line();
    let id = line.split(' ').next().unwrap_or_default().to_owned();
    let mut new = text;
    if !new.ends_with('\n') && !new.is_empty() {
        new.push('\n');
    }
    new.push_str(&line);
    new.push('\n');
    write_private_file(path, new.as_bytes()).map_err(|source| SecretsError::Write {
        path: path.to_owned(),
        source,
    })?;
    Ok(id)
}

/// `tether-server secrets retire <id>`: removes a key that no longer seals from the ring.
pub fn retire(path: &Path, id: &str) -> Result<(), SecretsError> {
    let text = read_private_file(path)?;
    let ring = KeyRing::parse(&text, &path.display().to_string())?;
    if !ring.ids().contains(&id) {
        return Err(SecretsError::Refused(format!("no key {id:?} in the ring")));
    }
    if ring.active().0 == id {
        return Err(SecretsError::Refused(format!(
            "key {id:?} is the one that seals: rotate first"
        )));
    }
    let kept: String = text
        .lines()
        .filter(|l| l.split_whitespace().next() != Some(id))
        .map(|l| format!("{l}\n"))
        .collect();
    write_private_file(path, kept.as_bytes()).map_err(|source| SecretsError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_in_its_place() {
        let ring = KeyRing::generate();
        let sealed = ring.seal("deployment/d-1/properties/db_secret", "hunter2");
        assert!(sealed.starts_with(PREFIX) && !sealed.contains("hunter2"));
        assert!(ring.is_current(&sealed));
        assert_eq!(
            ring.open("deployment/d-1/properties/db_secret", &sealed)
                .unwrap(),
            "hunter2"
        );
        assert!(matches!(
            ring.open("deployment/d-2/properties/db_secret", &sealed),
            Err(SecretsError::Open { .. })
        ));
        assert!(matches!(
            KeyRing::generate().open("deployment/d-1/properties/db_secret", &sealed),
            Err(SecretsError::UnknownKey { .. })
        ));
        let mut flipped = sealed.clone().into_bytes();
        let last = flipped.len() - 2;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert!(ring
            .open("deployment/d-1/properties/db_secret", &flipped)
            .is_err());
        // Stored before sealing existed: as it is, and not current.
        assert_eq!(ring.open("c", "plain").unwrap(), "plain");
        assert!(!ring.is_current("plain"));
    }

    #[test]
    fn rotation_seals_with_the_new_key_and_opens_with_both_until_the_old_is_retired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let first = KeyRing::load(&KeySource::File(path.clone())).unwrap();
        let old = first.seal("c", "v");
        let id = rotate(&path).unwrap();
        let ring = KeyRing::load(&KeySource::File(path.clone())).unwrap();
        assert_eq!(ring.ids().len(), 2);
        assert_eq!(ring.ids()[1], id);
        assert!(!ring.is_current(&old));
        assert_eq!(ring.open("c", &old).unwrap(), "v");
        assert!(retire(&path, &id).is_err(), "the sealing key cannot go");
        retire(&path, first.ids()[0]).unwrap();
        let ring = KeyRing::load(&KeySource::File(path)).unwrap();
        assert_eq!(ring.ids(), vec![id.as_str()]);
        assert!(matches!(
            ring.open("c", &old),
            Err(SecretsError::UnknownKey { .. })
        ));
    }

    #[test]
    fn bad_rings_are_refused_with_the_line() {
        for (text, want) in [
            ("", "holds no key"),
            ("# only a comment\n", "holds no key"),
            ("abc", "line 1"),
            ("k1 notbase64!", "not base64"),
            ("k1 AAAA", "32 bytes"),
            ("bad/id AAAA", "key id"),
        ] {
            let e = KeyRing::parse(text, "ring").unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let line = new_key_line();
        let dup = format!("{line}\n{line}\n");
        assert!(KeyRing::parse(&dup, "ring")
            .unwrap_err()
            .to_string()
            .contains("already"));
        let ring = KeyRing::load(&KeySource::Command(format!("echo '{line}'"))).unwrap();
        assert_eq!(ring.ids().len(), 1);
        assert!(KeyRing::load(&KeySource::Command("exit 3".into())).is_err());
    }
}
