//! The certificate both listeners present: `DIR/server.pem` with `DIR/server.key`, loaded at
//! start and reloaded while they run when `tether-server cert renew` (or a trust switch)
//! replaces it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tether_shared::tls::{self, ReloadableCert};

use crate::init;

/// Why the server certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The certificate or key is unusable.
    #[error("{} / {}: {source}", cert.display(), key.display())]
    Tls {
        cert: PathBuf,
        key: PathBuf,
        source: tls::TlsError,
    },
}

/// How often a running server looks at `DIR/server.pem` for a renewed certificate.
pub const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// The certificate both listeners present: `DIR/server.pem` with `DIR/server.key`, replaced
/// while they run when the files change ([`watch`]).
pub fn load(dir: &Path) -> Result<Arc<ReloadableCert>, CertError> {
    let (cert_pem, key_pem) = read(dir)?;
    let (cert, key) = (dir.join(init::SERVER_CERT), dir.join(init::SERVER_KEY));
    ReloadableCert::new(&cert_pem, &key_pem).map_err(|source| CertError::Tls { cert, key, source })
}

/// `DIR/server.pem` and `DIR/server.key`.
pub fn read(dir: &Path) -> Result<(String, String), CertError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| CertError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    Ok((
        read(&dir.join(init::SERVER_CERT))?,
        read(&dir.join(init::SERVER_KEY))?,
    ))
}

/// Every [`CERT_CHECK_INTERVAL`], reloads the certificate if `DIR/server.pem` changed (as
/// `tether-server cert renew` leaves it): new handshakes get it, and the relay enrollment's
/// check of the server's names follows. A pair that does not load is logged and the current
/// one kept.
pub async fn watch(dir: PathBuf, cert: Arc<ReloadableCert>, pem: Arc<RwLock<String>>) {
    let stamp = |dir: &Path| {
        std::fs::metadata(dir.join(init::SERVER_CERT))
            .and_then(|m| m.modified())
            .ok()
    };
    let mut seen = stamp(&dir);
    let mut tick = tokio::time::interval(CERT_CHECK_INTERVAL);
    loop {
        tick.tick().await;
        let now = stamp(&dir);
        if now == seen {
            continue;
        }
        let loaded = read(&dir).and_then(|(cert_pem, key_pem)| {
            cert.replace(&cert_pem, &key_pem)
                .map(|()| cert_pem)
                .map_err(|source| CertError::Tls {
                    cert: dir.join(init::SERVER_CERT),
                    key: dir.join(init::SERVER_KEY),
                    source,
                })
        });
        match loaded {
            Ok(cert_pem) => {
                let names = tls::certificate_names(&cert_pem).unwrap_or_default();
                tracing::info!(hostnames = ?names, "server-certificate-reloaded");
                *pem.write().unwrap_or_else(PoisonError::into_inner) = cert_pem;
                seen = now;
            }
            // Retried at the next tick (a renewal may be half written).
            Err(e) => tracing::warn!(error = %e, "server-certificate-not-reloaded"),
        }
    }
}
