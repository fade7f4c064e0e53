//! The relay's TLS certificate, renewed by the server over the relay's own link.
//!
//! Relay certificates are short-lived (30 days by default, `[relays] certificate_lifetime_s`
//! on the server). The server sends a signed `RelayCertificate` command at every connect and
//! whenever it renews one; [`Certificate::install`] takes it only if it is for this relay's own
//! TLS key and every name the current one holds, chains to a CA the relay trusts, is valid now
//! and lasts longer than the one served now. It is written atomically to `tls.pem` and served
//! from the next handshake on; connections already up keep theirs.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use tether_shared::tls::{self, ReloadableCert, TlsError};
use tether_shared::trust::TlsSource;

/// Why a certificate the server sent was not installed.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("the certificate cannot be read: {0}")]
    Unreadable(TlsError),
    #[error("the certificate does not verify for {name}: {source}")]
    Verify { name: String, source: TlsError },
    #[error("the certificate names {got:?}, not {want:?}")]
    Names { got: Vec<String>, want: Vec<String> },
    #[error("the certificate expires no later than the one served now")]
    NotNewer,
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the relay serves, and what a replacement is checked against.
pub struct Certificate {
    served: Arc<ReloadableCert>,
    /// `tls.pem`, `tls.key`.
    cert_path: PathBuf,
    key_pem: String,
    /// The relay's trust in force (`ca.pem`: the server CA and the relay CA).
    trust: TlsSource,
    /// The certificate served now.
    current: Mutex<String>,
}

/// How an offered certificate was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// Served from now on; expires then (seconds since the Unix epoch).
    Renewed { not_after_unix_s: i64 },
    /// The very certificate served now (the server re-sends it at every connect).
    Same,
}

impl Certificate {
    pub fn new(
        cert_path: PathBuf,
        cert_pem: String,
        key_pem: String,
        trust: TlsSource,
    ) -> Result<Certificate, TlsError> {
        Ok(Certificate {
            served: ReloadableCert::new(&cert_pem, &key_pem)?,
            cert_path,
            key_pem,
            trust,
            current: Mutex::new(cert_pem),
        })
    }

    /// The resolver the downstream listener serves from.
    pub fn served(&self) -> &Arc<ReloadableCert> {
        &self.served
    }

    /// When the certificate served now expires (seconds since the Unix epoch).
    pub fn not_after_unix_s(&self) -> Option<i64> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        tls::certificate_not_after(&current).ok()
    }

    /// Checks `pem` and, if it is a renewal of the current certificate, serves and stores it.
    pub fn install(&self, pem: &str) -> Result<Installed, CertificateError> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if pem.trim() == current.trim() {
            return Ok(Installed::Same);
        }
        let want = tls::certificate_names(&current).map_err(CertificateError::Unreadable)?;
        let got = tls::certificate_names(pem).map_err(CertificateError::Unreadable)?;
        if got != want {
            return Err(CertificateError::Names { got, want });
        }
        // A whole handshake against the relay's own trust, as an agent dialling each name
        // would make it: the chain, the names, the validity period and that it is for
        // this relay's key (the server side signs with it).
        let server =
            Arc::new(tls::server_config(pem, &self.key_pem).map_err(CertificateError::Unreadable)?);
        let client = self.trust.get();
        for name in &want {
            tls::handshake_in_memory(client.clone(), server.clone(), name).map_err(|source| {
                CertificateError::Verify {
                    name: name.clone(),
                    source,
                }
            })?;
        }
        let not_after = tls::certificate_not_after(pem).map_err(CertificateError::Unreadable)?;
        let before = tls::certificate_not_after(&current).unwrap_or(i64::MIN);
        if not_after <= before {
            return Err(CertificateError::NotNewer);
        }
        tether_shared::identity::write_file_atomic(&self.cert_path, pem.as_bytes(), 0o644)
            .map_err(|source| CertificateError::Write {
                path: self.cert_path.clone(),
                source,
            })?;
        self.served
            .replace(pem, &self.key_pem)
            .map_err(CertificateError::Unreadable)?;
        *current = pem.to_owned();
        Ok(Installed::Renewed {
            not_after_unix_s: not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tether_shared::tls::{Ca, TlsKey};

    const NAMES: &[&str] = &["relay.internal", "10.0.0.7"];

    fn names() -> Vec<String> {
        NAMES.iter().map(|n| (*n).to_owned()).collect()
    }

    struct Setup {
        _dir: tempfile::TempDir,
        path: PathBuf,
        relay_ca: Ca,
        key: TlsKey,
        cert: Certificate,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tls.pem");
        let server_ca = Ca::generate("server CA").unwrap();
        let relay_ca = Ca::generate("relay CA").unwrap();
        let key = TlsKey::generate().unwrap();
        let first = relay_ca
            .issue_cert_for_key(&names(), &key.public_key_raw(), Duration::from_secs(600))
            .unwrap();
        std::fs::write(&path, &first).unwrap();
        let trust = format!("{}{}", server_ca.cert_pem(), relay_ca.cert_pem());
        let trust = TlsSource::fixed(Arc::new(tls::client_config(&trust).unwrap()));
        let cert = Certificate::new(path.clone(), first, key.key_pem(), trust).unwrap();
        Setup {
            _dir: dir,
            path,
            relay_ca,
            key,
            cert,
        }
    }

    #[test]
    fn a_longer_certificate_for_the_same_key_and_names_is_served_and_stored() {
        let s = setup();
        let before = s.cert.not_after_unix_s().unwrap();
        let next = s
            .relay_ca
            .issue_cert_for_key(
                &names(),
                &s.key.public_key_raw(),
                Duration::from_secs(3_600),
            )
            .unwrap();
        let Installed::Renewed { not_after_unix_s } = s.cert.install(&next).unwrap() else {
            panic!("not installed");
        };
        assert!(not_after_unix_s > before);
        assert_eq!(s.cert.not_after_unix_s(), Some(not_after_unix_s));
        assert_eq!(std::fs::read_to_string(&s.path).unwrap(), next);
        assert_eq!(s.cert.install(&next).unwrap(), Installed::Same);
    }

    #[test]
    fn a_certificate_for_another_key_names_or_ca_or_an_older_one_changes_nothing() {
        let s = setup();
        let stored = std::fs::read_to_string(&s.path).unwrap();
        let before = s.cert.not_after_unix_s();
        let hour = Duration::from_secs(3_600);
        let other_key = TlsKey::generate().unwrap();
        let other_ca = Ca::generate("someone's CA").unwrap();
        let cases = [
            (
                "another key",
                s.relay_ca
                    .issue_cert_for_key(&names(), &other_key.public_key_raw(), hour)
                    .unwrap(),
            ),
            (
                "other names",
                s.relay_ca
                    .issue_cert_for_key(
                        &["server.internal".to_owned()],
                        &s.key.public_key_raw(),
                        hour,
                    )
                    .unwrap(),
            ),
            (
                "an untrusted CA",
                other_ca
                    .issue_cert_for_key(&names(), &s.key.public_key_raw(), hour)
                    .unwrap(),
            ),
            (
                "an older one",
                s.relay_ca
                    .issue_cert_for_key(&names(), &s.key.public_key_raw(), Duration::from_secs(60))
                    .unwrap(),
            ),
            (
                "garbage",
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_owned(),
            ),
        ];
        for (what, pem) in cases {
            assert!(s.cert.install(&pem).is_err(), "{what} was installed");
            assert_eq!(std::fs::read_to_string(&s.path).unwrap(), stored, "{what}");
            assert_eq!(s.cert.not_after_unix_s(), before, "{what}");
        }
    }
}
