//! TLS for every Tether link: rustls server and client configurations (ring provider, TLS 1.2
//! and 1.3 only, no early data, ALPN `http/1.1` for HTTPS and WebSockets alike), the private CA
//! that signs the server's and relays' certificates, and an in-memory handshake used to check a
//! certificate against a CA without opening a socket.
//!
//! # Layout
//! - [`Ca`] (`ca.rs`): generate, save as PEM, load again, issue server certificates.
//! - `der.rs`: the few DER reads `Ca::from_pem` needs, and certificates' names.
//! - [`ReloadableCert`] (`reload.rs`): a server certificate replaced while listeners run.

mod ca;
mod der;
mod reload;

use std::io::{Cursor, Read};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::version::{TLS12, TLS13};
use rustls::{
    ClientConfig, ClientConnection, ProtocolVersion, RootCertStore, ServerConfig, ServerConnection,
    SupportedProtocolVersion,
};

pub use ca::{
    valid_hostname, verify_p256, Ca, TlsKey, SERVER_CERT_VALIDITY_DAYS, SIGNING_CERT_NAME,
};
pub use reload::ReloadableCert;

/// The only protocol versions Tether speaks, newest first.
pub static PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];

/// ALPN protocol offered and accepted: HTTPS and WebSocket upgrades are both HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why a TLS configuration, certificate or handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM input could not be read.
    #[error("{what}: not valid PEM ({message})")]
    Pem {
        /// Which input: "certificate chain", "private key", "CA certificate".
        what: &'static str,
        /// The parser's complaint.
        message: String,
    },
    /// A PEM input held no item of the expected kind.
    #[error("{what}: no {expected} found in the PEM input")]
    Empty {
        /// Which input.
        what: &'static str,
        /// What was looked for.
        expected: &'static str,
    },
    /// A hostname for a certificate is neither a DNS name nor an IP address.
    #[error("invalid hostname {0:?}: must be a DNS name or an IP address")]
    Hostname(String),
    /// A CA's certificate and key do not belong together, or its subject cannot be reproduced.
    #[error("CA: {0}")]
    Ca(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused a configuration or a handshake failed (e.g. `UnknownIssuer`, `NotValidForName`).
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The in-memory handshake stalled or its buffers failed.
    #[error("handshake: {0}")]
    Handshake(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM input; at least one is required.
pub fn parse_certs(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "private key";
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| TlsError::Pem {
            what: WHAT,
            message: e.to_string(),
        })?
        .ok_or(TlsError::Empty {
            what: WHAT,
            expected: "PRIVATE KEY",
        })
}

/// A server configuration presenting `cert_chain_pem` (leaf first) with `key_pem`.
pub fn server_config(cert_chain_pem: &str, key_pem: &str) -> Result<ServerConfig, TlsError> {
    let chain = parse_certs(cert_chain_pem, "certificate chain")?;
    let key = parse_key(key_pem)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.max_early_data_size = 0;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(config)
}

/// A client configuration trusting only the CA certificate(s) in `ca_pem`: no system roots.
pub fn client_config(ca_pem: &str) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem, "CA certificate")? {
        roots.add(cert)?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.enable_early_data = false;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(config)
}

/// The first certificate of `pem` (`what` names the input in errors).
fn first_cert(pem: &str, what: &'static str) -> Result<CertificateDer<'static>, TlsError> {
    parse_certs(pem, what)?
        .into_iter()
        .next()
        .ok_or(TlsError::Empty {
            what,
            expected: "CERTIFICATE",
        })
}

/// The DER value of id-kp-codeSigning (1.3.6.1.5.5.7.3.3).
const EKU_CODE_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x03];

/// Checks that `cert_pem` (from [`Ca::issue_signing_cert`]) certifies the Ed25519 key
/// `ed25519_public` (32 bytes) for code signing, chained to a CA in `trust_pem`, valid now.
pub fn verify_signing_cert(
    cert_pem: &str,
    trust_pem: &str,
    ed25519_public: &[u8],
) -> Result<(), TlsError> {
    let cert = first_cert(cert_pem, "signing certificate")?;
    verify_chain(
        &cert,
        trust_pem,
        webpki::KeyUsage::required(EKU_CODE_SIGNING),
        "signing certificate",
    )?;
    // SubjectPublicKeyInfo of an Ed25519 key: the algorithm 1.3.101.112, then the 32 bytes.
    let mut expected = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    expected.extend_from_slice(ed25519_public);
    let certified = der::cert_parts(&cert).map(|p| p.spki);
    if certified != Some(expected.as_slice()) {
        return Err(TlsError::Ca(
            "the signing certificate is for another key".into(),
        ));
    }
    Ok(())
}

/// Whether the first certificate in `cert_pem`, a TLS server certificate, chains to a CA in
/// `trust_pem` and is valid now (whatever its names).
pub fn issued_by(cert_pem: &str, trust_pem: &str) -> bool {
    first_cert(cert_pem, "certificate").is_ok_and(|cert| {
        verify_chain(
            &cert,
            trust_pem,
            webpki::KeyUsage::server_auth(),
            "certificate",
        )
        .is_ok()
    })
}

/// Checks that `cert` chains to a CA in `trust_pem` for `usage`, valid now.
fn verify_chain(
    cert: &CertificateDer<'_>,
    trust_pem: &str,
    usage: webpki::KeyUsage,
    what: &str,
) -> Result<(), TlsError> {
    let roots = parse_certs(trust_pem, "CA certificate")?;
    let anchors = roots
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Ca(format!("CA certificate: {e}")))?;
    let end_entity =
        webpki::EndEntityCert::try_from(cert).map_err(|e| TlsError::Ca(format!("{what}: {e}")))?;
    end_entity
        .verify_for_usage(
            provider().signature_verification_algorithms.all,
            &anchors,
            &[],
            rustls::pki_types::UnixTime::now(),
            usage,
            None,
            None,
        )
        .map(drop)
        .map_err(|e| TlsError::Ca(format!("{what} does not verify: {e}")))
}

/// The DNS names and IP addresses the first certificate in `cert_pem` holds.
pub fn certificate_names(cert_pem: &str) -> Result<Vec<String>, TlsError> {
    let first = first_cert(cert_pem, "certificate")?;
    der::subject_alt_names(&first)
        .ok_or_else(|| TlsError::Ca("certificate names cannot be read".into()))
}

/// When the first certificate in `cert_pem` expires, in seconds since the Unix epoch.
pub fn certificate_not_after(cert_pem: &str) -> Result<i64, TlsError> {
    der::not_after_unix_s(&first_cert(cert_pem, "certificate")?)
        .ok_or_else(|| TlsError::Ca("certificate validity cannot be read".into()))
}

/// Whether the first certificate in `cert_pem` is valid for `name` (a DNS name, wildcards
/// included, or an IP address), by the rules a TLS client applies. The server refuses to have
/// a relay certified for any name its own certificate covers.
pub fn certificate_covers(cert_pem: &str, name: &str) -> Result<bool, TlsError> {
    let first = first_cert(cert_pem, "certificate")?;
    let cert = webpki::EndEntityCert::try_from(&first)
        .map_err(|e| TlsError::Ca(format!("certificate cannot be parsed: {e}")))?;
    let Ok(name) = ServerName::try_from(name.to_owned()) else {
        return Ok(false);
    };
    Ok(cert.verify_is_valid_for_subject_name(&name).is_ok())
}

/// Runs a complete TLS handshake between `client` and `server` in memory, as if the client had
/// dialled `server_name`, and returns the negotiated version. Used to check that a certificate
/// chain validates against a CA for a name before anyone relies on it.
pub fn handshake_in_memory(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: &str,
) -> Result<ProtocolVersion, TlsError> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| TlsError::Hostname(server_name.to_owned()))?;
    let mut client = ClientConnection::new(client, name)?;
    let mut server = ServerConnection::new(server)?;
    // A full handshake is at most a handful of flights; bound the loop so it cannot spin.
    for _ in 0..16 {
        if !client.is_handshaking() && !server.is_handshaking() {
            return client
                .protocol_version()
                .ok_or_else(|| TlsError::Handshake("no protocol version negotiated".into()));
        }
        let to_server = drain(|buf| client.write_tls(buf))?;
        feed(&to_server, |rd| server.read_tls(rd))?;
        let server_result = server.process_new_packets();
        let to_client = drain(|buf| server.write_tls(buf))?;
        feed(&to_client, |rd| client.read_tls(rd))?;
        // The client's verdict on the certificate is the more telling error; report it first.
        client.process_new_packets()?;
        server_result?;
    }
    Err(TlsError::Handshake("did not complete".into()))
}

fn drain(
    mut write: impl FnMut(&mut Vec<u8>) -> std::io::Result<usize>,
) -> Result<Vec<u8>, TlsError> {
    let mut out = Vec::new();
    loop {
        match write(&mut out) {
            Ok(0) => return Ok(out),
            Ok(_) => {}
            Err(e) => return Err(TlsError::Handshake(e.to_string())),
        }
    }
}

fn feed(
    bytes: &[u8],
    mut read: impl FnMut(&mut dyn Read) -> std::io::Result<usize>,
) -> Result<(), TlsError> {
    let mut cursor = Cursor::new(bytes);
    while usize::try_from(cursor.position()).unwrap_or(usize::MAX) < bytes.len() {
        let n = read(&mut cursor).map_err(|e| TlsError::Handshake(e.to_string()))?;
        if n == 0 {
            return Err(TlsError::Handshake("peer stopped reading".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
