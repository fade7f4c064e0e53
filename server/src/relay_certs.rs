//! Relays' certificates: issued by the relay CA for the TLS key and hostnames a relay proved at
//! enrollment, short-lived (`server.relay_certificate_lifetime_s`, 30 days by default), and
//! renewed on the server's side once a third of their life is left. The relay gets the current
//! one as a signed `RelayCertificate` command on its own link at every connect and at each
//! renewal (see `session::relay_session`), and serves it without a restart.

use std::sync::Arc;
use std::time::Duration;

use tether_shared::tls::{self, TlsError};

use crate::registry::{IssuedCertificate, Registry, RegistryError};
use crate::trust::Trust;

#[derive(Debug, thiserror::Error)]
pub enum RelayCertError {
    #[error("relay certificate: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Issues and renews relays' certificates.
pub struct RelayCerts {
    /// Holds the relay CA in force (a rollover replaces it).
    trust: Arc<Trust>,
    lifetime: Duration,
    registry: Arc<Registry>,
    /// One renewal at a time, so a relay is never issued two certificates for one due date.
    renewing: tokio::sync::Mutex<()>,
}

/// The certificate a relay should hold now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub pem: String,
    /// Issued by this call (send it now) rather than already stored (sent at connect).
    pub renewed: bool,
}

use tether_shared::clock::now_unix_s as now_s;

impl RelayCerts {
    pub fn new(trust: Arc<Trust>, lifetime: Duration, registry: Arc<Registry>) -> RelayCerts {
        RelayCerts {
            trust,
            lifetime,
            registry,
            renewing: tokio::sync::Mutex::new(()),
        }
    }

    /// A certificate for `hostnames` and the raw P-256 key `key`, valid for the lifetime.
    pub fn issue(&self, hostnames: &[String], key: &[u8]) -> Result<IssuedCertificate, TlsError> {
        let pem = self
            .trust
            .relay_ca()
            .issue_cert_for_key(hostnames, key, self.lifetime)?;
        let not_after_unix_s = tls::certificate_not_after(&pem)?;
        Ok(IssuedCertificate {
            pem,
            not_after_unix_s,
        })
    }

    /// Whether `issued` must be replaced at `now_s`: a third of the lifetime or less is left,
    /// it lasts longer than the lifetime now configured (which was shortened since), or it is
    /// not from the relay CA in force (a rollover switched CAs).
    fn due(&self, issued: &IssuedCertificate, now_s: i64) -> bool {
        self.due_by_time(issued, now_s)
            || !tls::issued_by(&issued.pem, self.trust.relay_ca().cert_pem())
    }

    fn due_by_time(&self, issued: &IssuedCertificate, now_s: i64) -> bool {
        let lifetime = i64::try_from(self.lifetime.as_secs()).unwrap_or(i64::MAX);
        let left = issued.not_after_unix_s.saturating_sub(now_s);
        left <= lifetime / 3 || left > lifetime.saturating_add(3_600)
    }

    /// The certificate relay `relay_id` should serve: the stored one, or a new one (stored
    /// before it is returned) when it is due. `None` for a relay enrolled before its key and
    /// names were recorded (it keeps the certificate it has).
    pub async fn current(&self, relay_id: &str) -> Result<Option<Current>, RelayCertError> {
        let _one = self.renewing.lock().await;
        let Some(relay) = self.registry.relay_certificate(relay_id) else {
            return Ok(None);
        };
        if let Some(issued) = relay.issued.filter(|i| !self.due(i, now_s())) {
            return Ok(Some(Current {
                pem: issued.pem,
                renewed: false,
            }));
        }
        let issued = self.issue(&relay.hostnames, &relay.tls_public_key)?;
        let (pem, not_after_unix_s) = (issued.pem.clone(), issued.not_after_unix_s);
        if !self
            .registry
            .set_relay_certificate(relay_id, issued)
            .await?
        {
            return Ok(None);
        }
        tracing::info!(relay_id = %relay_id, not_after_unix_s, "relay-certificate-renewed");
        Ok(Some(Current { pem, renewed: true }))
    }

    /// Every relay's certificate expiry, for health: `(relay id, notAfter)`.
    pub fn expiries(&self) -> Vec<(String, i64)> {
        self.registry
            .relays()
            .into_iter()
            .filter_map(|r| {
                let issued = self.registry.relay_certificate(&r.id)?.issued?;
                Some((r.name, issued.not_after_unix_s))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs(lifetime_s: u64) -> (RelayCerts, Arc<Trust>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = tether_shared::journal::Journal::open(
            &dir.path().join("journal"),
            &tether_shared::journal::JournalOptions::default(),
        )
        .unwrap();
        let data_dir = dir.path().join("server");
        crate::init::initialize(&crate::init::InitOptions {
            data_dir: data_dir.clone(),
            hostnames: vec!["localhost".into()],
            force: false,
        })
        .unwrap();
        let trust = Arc::new(Trust::load(&data_dir).unwrap());
        let registry = Arc::new(Registry::load(journal.handle()).unwrap());
        let certs = RelayCerts::new(trust.clone(), Duration::from_secs(lifetime_s), registry);
        (certs, trust, dir)
    }

    #[test]
    fn a_certificate_is_due_with_a_third_of_its_life_left_or_when_it_outlives_the_policy() {
        let (c, _, _dir) = certs(30 * 86_400);
        let at = |not_after_unix_s| IssuedCertificate {
            pem: String::new(),
            not_after_unix_s,
        };
        let now = 1_000_000_000;
        assert!(!c.due_by_time(&at(now + 30 * 86_400), now));
        assert!(!c.due_by_time(&at(now + 10 * 86_400 + 1), now));
        assert!(c.due_by_time(&at(now + 10 * 86_400), now));
        assert!(c.due_by_time(&at(now - 1), now), "expired");
        assert!(
            c.due_by_time(&at(now + 825 * 86_400), now),
            "longer than the policy"
        );
    }

    #[test]
    fn issued_certificates_last_the_configured_lifetime() {
        let (c, _, _dir) = certs(600);
        let key = tls::TlsKey::generate().unwrap();
        let issued = c
            .issue(&["relay.internal".to_owned()], &key.public_key_raw())
            .unwrap();
        let left = issued.not_after_unix_s - now_s();
        assert!((590..=601).contains(&left), "{left} s left");
        assert!(!c.due(&issued, now_s()));
        assert!(c.due(&issued, now_s() + 401));
    }

    #[actix_rt::test]
    async fn a_certificate_from_the_relay_ca_a_rollover_replaced_is_due() {
        let (c, trust, _dir) = certs(30 * 86_400);
        let key = tls::TlsKey::generate().unwrap();
        let issued = c
            .issue(&["relay.internal".to_owned()], &key.public_key_raw())
            .unwrap();
        assert!(!c.due(&issued, now_s()));
        trust.begin().await.unwrap();
        // Still the relay CA in force while both are trusted.
        assert!(!c.due(&issued, now_s()));
        trust.switch().await.unwrap();
        assert!(c.due(&issued, now_s()));
        let again = c
            .issue(&["relay.internal".to_owned()], &key.public_key_raw())
            .unwrap();
        assert!(!c.due(&again, now_s()));
    }
}
