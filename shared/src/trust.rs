//! What an agent or a relay trusts of its server, and how the server changes it (rollover).
//!
//! At enrollment an agent or relay pins the server's command-signing key (in its state file)
//! and keeps the CAs it was given in `DIR/ca.pem`. The server can replace both, without a
//! reinstall, with a signed `Trust` command carrying a [`TrustSet`]: the full list of signing
//! keys and the CA bundle to trust from now on, numbered by `serial`. A rollover sends two:
//! one that adds the new keys and CAs to the old (the overlap: both are trusted while the
//! server switches over), then one with the new alone.
//!
//! [`Pinned`] holds the trust in force. [`Pinned::apply`] takes only a newer serial, checks
//! the set (keys parse, the bundle parses, sizes bounded), writes `ca.pem` and then
//! `DIR/trust.json` atomically, and serves the new anchors from then on: every later dial,
//! command check, end-to-end handshake and package check uses them. A crash between the two
//! writes leaves the old serial, so the command is applied again when it is resent.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::ClientConfig;
use serde::{Deserialize, Serialize};

use crate::identity::{write_file_atomic, PublicKey};
use crate::tls;

/// `DIR/trust.json`: the serial and signing keys of the last [`TrustSet`] applied.
pub const TRUST_FILE: &str = "trust.json";
/// Signing keys in one set at most (an overlap holds two).
pub const MAX_SIGNING_KEYS: usize = 4;
/// Bytes of a set's CA bundle at most (an overlap holds four certificates of about 700 bytes).
pub const MAX_CA_BYTES: usize = 64 * 1024;

/// The first release that understands `Trust` commands. An older agent cannot decode one
/// (and would stop taking commands behind it), so the server sends it none: it stays behind
/// in the rollover until it is upgraded. Older relays ignore them.
pub const SINCE_VERSION: &str = "0.2.0";

/// Whether an agent reporting `version` understands `Trust` commands.
pub fn understood_by(version: &str) -> bool {
    match (
        crate::upgrade::Version::parse(version),
        crate::upgrade::Version::parse(SINCE_VERSION),
    ) {
        (Ok(running), Ok(since)) => running >= since,
        _ => false,
    }
}

/// Why a trust set or the stored trust was refused.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("trust set {got} is older than the one in force ({current})")]
    Stale { got: u64, current: u64 },
    #[error("trust set {serial} is unusable: {reason}")]
    Invalid { serial: u64, reason: String },
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
}

/// The keys and CAs to trust from now on: the payload of a `Trust` command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSet {
    /// Grows with every set the server sends; an older one is refused.
    pub serial: u64,
    /// Standard base64 Ed25519 keys: a command, a package or an end-to-end handshake signed
    /// by any of them is the server's.
    pub signing_keys: Vec<String>,
    /// The CA certificates (PEM) trusted for TLS upstream: the server CAs and relay CAs.
    pub ca_pem: String,
}

/// `DIR/trust.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    serial: u64,
    signing_keys: Vec<String>,
}

/// The trust in force: what every check reads.
#[derive(Debug)]
pub struct Anchors {
    /// Serial of the set these come from; 0 for the enrollment's.
    pub serial: u64,
    /// Every trusted signing key, `first` among them.
    pub keys: Vec<PublicKey>,
    first: PublicKey,
    /// `DIR/ca.pem` as applied.
    pub ca_pem: String,
    /// A client configuration trusting exactly `ca_pem`.
    pub tls: Arc<ClientConfig>,
}

impl Anchors {
    fn build(serial: u64, keys: &[String], ca_pem: String) -> Result<Anchors, String> {
        if keys.is_empty() || keys.len() > MAX_SIGNING_KEYS {
            return Err(format!(
                "{} signing keys (1 to {MAX_SIGNING_KEYS} expected)",
                keys.len()
            ));
        }
        if ca_pem.len() > MAX_CA_BYTES {
            return Err(format!(
                "a CA bundle of {} bytes (at most {MAX_CA_BYTES})",
                ca_pem.len()
            ));
        }
        let keys = keys
            .iter()
            .map(|k| PublicKey::from_b64(k).map_err(|e| format!("signing key: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let first = keys.first().copied().ok_or("no signing key")?;
        let tls = tls::client_config(&ca_pem).map_err(|e| format!("CA bundle: {e}"))?;
        Ok(Anchors {
            serial,
            keys,
            first,
            ca_pem,
            tls: Arc::new(tls),
        })
    }

    /// `check` with each trusted key in turn: the first success, or the last failure.
    pub fn with_any_key<T, E>(
        &self,
        mut check: impl FnMut(&PublicKey) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut result = check(&self.first);
        for key in self.keys.iter().skip(1) {
            if result.is_ok() {
                break;
            }
            result = check(key);
        }
        result
    }

    /// `signature` is some trusted key's over `message`.
    pub fn verify(&self, message: &[u8], signature: &str) -> bool {
        self.keys
            .iter()
            .any(|k| k.verify(message, signature).is_ok())
    }
}

/// Where a client configuration comes from at each dial: the trust in force then.
#[derive(Clone)]
pub struct TlsSource(Arc<dyn Fn() -> Arc<ClientConfig> + Send + Sync>);

impl TlsSource {
    /// One that never changes (tests, tools).
    pub fn fixed(tls: Arc<ClientConfig>) -> TlsSource {
        TlsSource(Arc::new(move || tls.clone()))
    }

    /// The configuration to dial with now.
    pub fn get(&self) -> Arc<ClientConfig> {
        (self.0)()
    }
}

impl std::fmt::Debug for TlsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsSource")
    }
}

/// Removes `dir/trust.json`: a new install starts from the key its enrollment pins, not from a
/// set an earlier enrollment (perhaps with another server) left behind.
pub fn forget(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(TRUST_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `dir/trust.json`, or the enrollment's key alone (serial 0) without it.
fn read_stored(dir: &Path, enrolled_key: &str) -> Result<Stored, TrustError> {
    let path = dir.join(TRUST_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<Stored>(&bytes).map_err(|e| TrustError::File {
            path,
            reason: format!("not a valid trust file ({e}); reinstall"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Stored {
            serial: 0,
            signing_keys: vec![enrolled_key.trim().to_owned()],
        }),
        Err(e) => Err(TrustError::File {
            path,
            reason: e.to_string(),
        }),
    }
}

/// What [`Pinned::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The set is now in force.
    Changed,
    /// This serial was already in force (a resend): nothing changed.
    Same,
}

/// The trust of an agent or relay: read at start, replaced by [`Pinned::apply`].
#[derive(Debug)]
pub struct Pinned {
    dir: PathBuf,
    ca_file: &'static str,
    current: RwLock<Arc<Anchors>>,
}

impl Pinned {
    /// Reads `dir/ca_file` and `dir/trust.json`; without the latter (no set applied yet) the
    /// key pinned at enrollment (`enrolled_key`, base64) is the only one trusted.
    pub fn load(
        dir: &Path,
        ca_file: &'static str,
        enrolled_key: &str,
    ) -> Result<Pinned, TrustError> {
        let file_err = |path: PathBuf| move |reason: String| TrustError::File { path, reason };
        let ca_path = dir.join(ca_file);
        let ca_pem = std::fs::read_to_string(&ca_path)
            .map_err(|e| e.to_string())
            .map_err(file_err(ca_path.clone()))?;
        let stored = read_stored(dir, enrolled_key)?;
        let anchors = Anchors::build(stored.serial, &stored.signing_keys, ca_pem)
            .map_err(file_err(dir.to_path_buf()))?;
        Ok(Pinned {
            dir: dir.to_path_buf(),
            ca_file,
            current: RwLock::new(Arc::new(anchors)),
        })
    }

    /// The signing keys trusted now, read from `dir` (the monitor's check of a staged package:
    /// it needs no CA).
    pub fn keys(dir: &Path, enrolled_key: &str) -> Result<Vec<PublicKey>, TrustError> {
        let path = dir.join(TRUST_FILE);
        read_stored(dir, enrolled_key)?
            .signing_keys
            .iter()
            .map(|k| {
                PublicKey::from_b64(k).map_err(|e| TrustError::File {
                    path: path.clone(),
                    reason: format!("signing key: {e}"),
                })
            })
            .collect()
    }

    /// The trust in force now.
    pub fn current(&self) -> Arc<Anchors> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The client configuration of the trust in force at each call.
    pub fn tls_source(self: &Arc<Self>) -> TlsSource {
        let pinned = self.clone();
        TlsSource(Arc::new(move || pinned.current().tls.clone()))
    }

    /// Puts `set` in force if it is newer than the one in force (see the module docs).
    pub fn apply(&self, set: &TrustSet) -> Result<Applied, TrustError> {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if set.serial < current.serial {
            return Err(TrustError::Stale {
                got: set.serial,
                current: current.serial,
            });
        }
        if set.serial == current.serial {
            return Ok(Applied::Same);
        }
        let anchors = Anchors::build(set.serial, &set.signing_keys, set.ca_pem.clone()).map_err(
            |reason| TrustError::Invalid {
                serial: set.serial,
                reason,
            },
        )?;
        let write = |name: &str, bytes: &[u8]| {
            let path = self.dir.join(name);
            write_file_atomic(&path, bytes, 0o644).map_err(|e| TrustError::File {
                path,
                reason: e.to_string(),
            })
        };
        write(self.ca_file, set.ca_pem.as_bytes())?;
        let stored = Stored {
            serial: set.serial,
            signing_keys: set.signing_keys.clone(),
        };
        let json = serde_json::to_vec_pretty(&stored).map_err(|e| TrustError::Invalid {
            serial: set.serial,
            reason: e.to_string(),
        })?;
        write(TRUST_FILE, &json)?;
        *current = Arc::new(anchors);
        Ok(Applied::Changed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::tls::Ca;

    fn installed(dir: &Path, key: &Identity, ca: &Ca) -> Pinned {
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        Pinned::load(dir, "ca.pem", &key.public_key_b64()).unwrap()
    }

    #[test]
    fn a_newer_set_is_applied_on_disk_and_in_memory_and_survives_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let (old, new) = (Identity::generate(), Identity::generate());
        let (old_ca, new_ca) = (Ca::generate("old").unwrap(), Ca::generate("new").unwrap());
        let pinned = installed(tmp.path(), &old, &old_ca);
        assert_eq!(pinned.current().serial, 0);
        assert!(pinned.current().verify(b"m", &old.sign(b"m")));
        assert!(!pinned.current().verify(b"m", &new.sign(b"m")));

        let overlap = TrustSet {
            serial: 1,
            signing_keys: vec![old.public_key_b64(), new.public_key_b64()],
            ca_pem: format!("{}{}", old_ca.cert_pem(), new_ca.cert_pem()),
        };
        assert_eq!(pinned.apply(&overlap).unwrap(), Applied::Changed);
        assert_eq!(pinned.apply(&overlap).unwrap(), Applied::Same);
        assert!(pinned.current().verify(b"m", &new.sign(b"m")));
        assert!(pinned.current().verify(b"m", &old.sign(b"m")));

        let finish = TrustSet {
            serial: 2,
            signing_keys: vec![new.public_key_b64()],
            ca_pem: new_ca.cert_pem().to_owned(),
        };
        pinned.apply(&finish).unwrap();
        assert!(!pinned.current().verify(b"m", &old.sign(b"m")));
        // An older set (a replayed overlap) cannot bring the old key back.
        assert!(matches!(
            pinned.apply(&overlap),
            Err(TrustError::Stale { got: 1, current: 2 })
        ));
        let again = Pinned::load(tmp.path(), "ca.pem", &old.public_key_b64()).unwrap();
        assert_eq!(again.current().serial, 2);
        assert!(!again.current().verify(b"m", &old.sign(b"m")));
        assert!(again.current().verify(b"m", &new.sign(b"m")));
        assert_eq!(again.current().ca_pem, new_ca.cert_pem());
    }

    #[test]
    fn only_agents_of_this_release_or_later_are_sent_trust_sets() {
        assert!(understood_by(SINCE_VERSION));
        assert!(understood_by(env!("CARGO_PKG_VERSION")));
        assert!(understood_by("99.0.0"));
        assert!(!understood_by("0.1.0"));
        assert!(!understood_by("loadgen-0.2.0"));
    }

    #[test]
    fn an_unusable_set_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let key = Identity::generate();
        let ca = Ca::generate("ca").unwrap();
        let pinned = installed(tmp.path(), &key, &ca);
        let good = || TrustSet {
            serial: 5,
            signing_keys: vec![key.public_key_b64()],
            ca_pem: ca.cert_pem().to_owned(),
        };
        let bad = [
            TrustSet {
                signing_keys: vec![],
                ..good()
            },
            TrustSet {
                signing_keys: vec!["AAAA".into()],
                ..good()
            },
            TrustSet {
                signing_keys: vec![key.public_key_b64(); MAX_SIGNING_KEYS + 1],
                ..good()
            },
            TrustSet {
                ca_pem: "garbage".into(),
                ..good()
            },
            TrustSet {
                ca_pem: "x".repeat(MAX_CA_BYTES + 1),
                ..good()
            },
        ];
        for set in bad {
            assert!(matches!(
                pinned.apply(&set),
                Err(TrustError::Invalid { serial: 5, .. })
            ));
            assert_eq!(pinned.current().serial, 0);
            assert!(!tmp.path().join(TRUST_FILE).exists());
            assert_eq!(
                std::fs::read_to_string(tmp.path().join("ca.pem")).unwrap(),
                ca.cert_pem()
            );
        }
        assert_eq!(pinned.apply(&good()).unwrap(), Applied::Changed);
    }
}
