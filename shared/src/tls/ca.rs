//! [`Ca`]: the private certificate authority created by `tether-server init`. It signs the
//! server's certificate and, at enrollment, relays' certificates, so agents trust one CA only.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use super::{der, parse_certs, TlsError};

/// Lifetime of an issued server certificate: the CA/Browser Forum's historical ceiling.
pub const SERVER_CERT_VALIDITY_DAYS: u64 = 825;

/// Lifetime of a CA certificate.
const CA_VALIDITY_DAYS: u64 = 3_650;

/// Backdating of `not_before`, to tolerate clocks that run slightly behind.
const CLOCK_SKEW: Duration = Duration::from_secs(3_600);

const DAY: Duration = Duration::from_secs(86_400);

/// A CA certificate with its signing key.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("key", &"***")
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA named `common_name`, valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        let mut params = ca_params(dn);
        set_validity(&mut params, CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Self {
            cert,
            key,
            cert_pem,
        })
    }

    /// Loads a CA saved with [`Ca::cert_pem`] and [`Ca::key_pem`]; refuses a key that does not
    /// belong to the certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::Pem {
            what: "CA private key",
            message: e.to_string(),
        })?;
        let first = parse_certs(cert_pem, "CA certificate")?
            .into_iter()
            .next()
            .ok_or(TlsError::Empty {
                what: "CA certificate",
                expected: "CERTIFICATE",
            })?;
        let parts = der::cert_parts(&first).ok_or_else(|| {
            TlsError::Ca("certificate is not a well-formed X.509 certificate".into())
        })?;
        if parts.spki != key.public_key_der().as_slice() {
            return Err(TlsError::Ca(
                "private key does not match the certificate".into(),
            ));
        }
        let dn = der::distinguished_name(parts.subject).ok_or_else(|| {
            TlsError::Ca("certificate subject uses an unsupported encoding".into())
        })?;
        // Re-sign the parameters to obtain an issuer for rcgen; its subject must encode exactly
        // as the original, or issued certificates would not chain.
        let issuer = ca_params(dn).self_signed(&key)?;
        let same_subject =
            der::cert_parts(issuer.der()).is_some_and(|p| p.subject == parts.subject);
        if !same_subject {
            return Err(TlsError::Ca(
                "certificate subject cannot be reproduced for signing".into(),
            ));
        }
        Ok(Self {
            cert: issuer,
            key,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// The CA certificate as PEM, as loaded or generated: what clients trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key as PKCS#8 PEM; store it with mode 0600.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a server certificate for `hostnames` (DNS names or IP literals, first one also
    /// the common name) with the serverAuth usage, valid for [`SERVER_CERT_VALIDITY_DAYS`].
    /// Returns `(cert_pem, key_pem)` with a fresh key.
    pub fn issue_server_cert(&self, hostnames: &[String]) -> Result<(String, String), TlsError> {
        let key = KeyPair::generate()?;
        let cert = server_params(hostnames)?.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Certifies the server's command-signing key (the raw 32 bytes of an Ed25519 public key):
    /// a certificate with only the code-signing usage, valid as long as a CA. Agents and relays
    /// check it at enrollment, so an answer altered on the way (a relay's) cannot make them pin
    /// another key.
    pub fn issue_signing_cert(&self, ed25519_public: &[u8]) -> Result<String, TlsError> {
        if ed25519_public.len() != 32 {
            return Err(TlsError::Ca(
                "the command-signing key must be a 32-byte Ed25519 public key".into(),
            ));
        }
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, SIGNING_CERT_NAME);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, CA_VALIDITY_DAYS);
        let key = RemoteEd25519Key(ed25519_public.to_vec());
        Ok(params.signed_by(&key, &self.cert, &self.key)?.pem())
    }

    /// Issues a server certificate for `hostnames` and a key the CA never sees: a relay sends
    /// the raw public half of its P-256 key (see [`TlsKey`]) at enrollment.
    /// The certificate is valid for `lifetime` from now (relays': 30 days by default).
    pub fn issue_cert_for_key(
        &self,
        hostnames: &[String],
        public_key_raw: &[u8],
        lifetime: std::time::Duration,
    ) -> Result<String, TlsError> {
        // An uncompressed P-256 point: 0x04 followed by two 32-byte coordinates.
        if public_key_raw.len() != 65 || public_key_raw[0] != 4 {
            return Err(TlsError::Ca(
                "the public key must be an uncompressed P-256 point (65 bytes)".into(),
            ));
        }
        let key = RemotePublicKey(public_key_raw.to_vec());
        let mut params = server_params(hostnames)?;
        params.not_after = params.not_before + CLOCK_SKEW + lifetime;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(cert.pem())
    }
}

/// A TLS key pair made where it is used (a relay), whose public half the CA certifies.
pub struct TlsKey {
    key: KeyPair,
}

impl TlsKey {
    /// A fresh P-256 key.
    pub fn generate() -> Result<TlsKey, TlsError> {
        Ok(TlsKey {
            key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// A key saved earlier with [`TlsKey::key_pem`].
    pub fn from_pem(pem: &str) -> Result<TlsKey, TlsError> {
        Ok(TlsKey {
            key: KeyPair::from_pem(pem)?,
        })
    }

    /// The raw public key to send for certification.
    pub fn public_key_raw(&self) -> Vec<u8> {
        self.key.public_key_raw().to_vec()
    }

    /// The private key as PKCS#8 PEM; store it with mode 0600.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// An ECDSA P-256 / SHA-256 signature (ASN.1 DER) over `message`: the relay's proof, at
    /// enrollment, that it holds the key it asks the CA to certify. Checked with
    /// [`verify_p256`].
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, TlsError> {
        let rng = ring::rand::SystemRandom::new();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &self.key.serialize_der(),
            &rng,
        )
        .map_err(|e| TlsError::Ca(format!("TLS key cannot sign: {e}")))?;
        pair.sign(&rng, message)
            .map(|sig| sig.as_ref().to_vec())
            .map_err(|_| TlsError::Ca("TLS key signature failed".into()))
    }
}

/// Whether `signature` (ASN.1 DER) is an ECDSA P-256 / SHA-256 signature over `message` by the
/// key whose raw public half (an uncompressed point, as [`TlsKey::public_key_raw`]) is
/// `public_key_raw`.
pub fn verify_p256(public_key_raw: &[u8], message: &[u8], signature: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        public_key_raw,
    )
    .verify(message, signature)
    .is_ok()
}

/// The common name of the command-signing certificate.
pub const SIGNING_CERT_NAME: &str = "Tether command signing";

/// The public half of the server's Ed25519 command-signing key, for its certificate.
struct RemoteEd25519Key(Vec<u8>);

impl rcgen::PublicKeyData for RemoteEd25519Key {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

/// The public half of someone else's P-256 key.
struct RemotePublicKey(Vec<u8>);

impl rcgen::PublicKeyData for RemotePublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

fn server_params(hostnames: &[String]) -> Result<CertificateParams, TlsError> {
    let first = hostnames
        .first()
        .ok_or_else(|| TlsError::Hostname(String::new()))?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = hostnames
        .iter()
        .map(|name| san(name))
        .collect::<Result<_, _>>()?;
    params
        .distinguished_name
        .push(DnType::CommonName, first.as_str());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, SERVER_CERT_VALIDITY_DAYS);
    Ok(params)
}

fn ca_params(dn: DistinguishedName) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Whether `name` can go in a certificate: an IP address or a DNS name.
pub fn valid_hostname(name: &str) -> bool {
    san(name).is_ok()
}

fn san(name: &str) -> Result<SanType, TlsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid {
        return Err(TlsError::Hostname(name.to_owned()));
    }
    name.try_into()
        .map(SanType::DnsName)
        .map_err(|_| TlsError::Hostname(name.to_owned()))
}

/// Sets `params` valid from a little before now (clock skew) until `days` from now.
fn set_validity(params: &mut CertificateParams, days: u64) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + DAY * u32::try_from(days).unwrap_or(u32::MAX);
}
