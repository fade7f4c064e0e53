//! [`ReloadableCert`]: a server certificate that can be replaced while the listeners run, so
//! that a renewed certificate (`tether-server cert renew`) is served to the next handshake
//! without a restart. Connections already up keep the certificate they were made with.

use std::sync::{Arc, PoisonError, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use super::{parse_certs, parse_key, provider, TlsError, ALPN_HTTP11, PROTOCOL_VERSIONS};

/// The certificate every handshake gets; [`ReloadableCert::replace`] swaps it.
#[derive(Debug)]
pub struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCert {
    /// Starts with `cert_chain_pem` (leaf first) and `key_pem`, which must belong together.
    pub fn new(cert_chain_pem: &str, key_pem: &str) -> Result<Arc<ReloadableCert>, TlsError> {
        Ok(Arc::new(ReloadableCert {
            current: RwLock::new(certified(cert_chain_pem, key_pem)?),
        }))
    }

    /// Serves `cert_chain_pem` with `key_pem` from the next handshake on; refuses (and keeps
    /// the current one) if they are unreadable or do not belong together.
    pub fn replace(&self, cert_chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let next = certified(cert_chain_pem, key_pem)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = next;
        Ok(())
    }

    /// A server configuration (the same protocol versions, ALPN and no early data as
    /// [`super::server_config`]) presenting whatever this holds at each handshake.
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.max_early_data_size = 0;
        config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

fn certified(cert_chain_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = parse_certs(cert_chain_pem, "certificate chain")?;
    let key = parse_key(key_pem)?;
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider())?))
}
