//! Real in-memory handshakes against generated CAs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::sync::Arc;

use rustls::{CertificateError, ProtocolVersion};

use super::*;

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

struct Pki {
    ca: Ca,
    server: Arc<ServerConfig>,
}

fn pki(hostnames: &[&str]) -> Pki {
    let ca = Ca::generate("Tether test CA").unwrap();
    let (cert, key) = ca.issue_server_cert(&names(hostnames)).unwrap();
    let server = Arc::new(server_config(&cert, &key).unwrap());
    Pki { ca, server }
}

fn client(ca_pem: &str) -> Arc<ClientConfig> {
    Arc::new(client_config(ca_pem).unwrap())
}

#[test]
fn handshake_succeeds_for_dns_and_ip_names() {
    let p = pki(&["localhost", "127.0.0.1"]);
    for name in ["localhost", "127.0.0.1"] {
        let version = handshake_in_memory(client(p.ca.cert_pem()), p.server.clone(), name).unwrap();
        assert_eq!(version, ProtocolVersion::TLSv1_3, "{name}");
    }
}

#[test]
fn tls12_is_accepted_and_nothing_older_is_configured() {
    assert_eq!(PROTOCOL_VERSIONS.len(), 2);
    assert!(PROTOCOL_VERSIONS.iter().all(|v| matches!(
        v.version,
        ProtocolVersion::TLSv1_2 | ProtocolVersion::TLSv1_3
    )));
    let p = pki(&["localhost"]);
    let roots = {
        let mut store = RootCertStore::empty();
        store
            .add(parse_certs(p.ca.cert_pem(), "ca").unwrap().remove(0))
            .unwrap();
        store
    };
    let tls12_only = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let version = handshake_in_memory(Arc::new(tls12_only), p.server, "localhost").unwrap();
    assert_eq!(version, ProtocolVersion::TLSv1_2);
}

#[test]
fn server_refuses_early_data_and_speaks_http11() {
    let p = pki(&["localhost"]);
    assert_eq!(p.server.max_early_data_size, 0);
    assert_eq!(p.server.alpn_protocols, vec![b"http/1.1".to_vec()]);
    let c = client(p.ca.cert_pem());
    assert!(!c.enable_early_data);
}

#[test]
fn certificate_from_another_ca_is_an_unknown_issuer() {
    let p = pki(&["localhost"]);
    let other = Ca::generate("Someone else").unwrap();
    let err = handshake_in_memory(client(other.cert_pem()), p.server, "localhost").unwrap_err();
    assert!(
        matches!(
            &err,
            TlsError::Rustls(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
}

#[test]
fn wrong_hostname_fails() {
    let p = pki(&["localhost", "127.0.0.1"]);
    for name in ["example.com", "10.0.0.1"] {
        let err = handshake_in_memory(client(p.ca.cert_pem()), p.server.clone(), name).unwrap_err();
        assert!(
            matches!(&err, TlsError::Rustls(rustls::Error::InvalidCertificate(_))),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn saved_ca_loads_and_issues_certificates_that_chain() {
    let original = Ca::generate("Tether CA").unwrap();
    let loaded = Ca::from_pem(original.cert_pem(), &original.key_pem()).unwrap();
    let (cert, key) = loaded
        .issue_server_cert(&names(&["server.internal"]))
        .unwrap();
    let server = Arc::new(server_config(&cert, &key).unwrap());
    handshake_in_memory(client(original.cert_pem()), server, "server.internal").unwrap();
}

#[test]
fn ca_key_must_match_its_certificate() {
    let a = Ca::generate("A").unwrap();
    let b = Ca::generate("B").unwrap();
    let err = Ca::from_pem(a.cert_pem(), &b.key_pem()).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}

#[test]
fn garbled_inputs_are_errors() {
    let ca = Ca::generate("A").unwrap();
    assert!(matches!(
        client_config("not pem"),
        Err(TlsError::Empty { .. })
    ));
    assert!(server_config(ca.cert_pem(), "nothing").is_err());
    assert!(Ca::from_pem("junk", &ca.key_pem()).is_err());
    assert!(Ca::from_pem(ca.cert_pem(), "junk").is_err());
    let truncated = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    assert!(Ca::from_pem(truncated, &ca.key_pem()).is_err());
}

#[test]
fn hostnames_are_checked() {
    let ca = Ca::generate("A").unwrap();
    for bad in ["", "bad name", "-x.example", "a..b", "ünï.example"] {
        assert!(
            matches!(
                ca.issue_server_cert(&names(&[bad])),
                Err(TlsError::Hostname(_))
            ),
            "{bad:?}"
        );
    }
    assert!(ca.issue_server_cert(&[]).is_err());
    ca.issue_server_cert(&names(&["::1", "my-host.example.org"]))
        .unwrap();
}

#[test]
fn certificates_for_a_remote_key_chain_and_refuse_other_keys() {
    let ca = Ca::generate("test CA").unwrap();
    let key = TlsKey::generate().unwrap();
    let cert = ca
        .issue_cert_for_key(
            &names(&["relay.internal", "10.0.0.7"]),
            &key.public_key_raw(),
            std::time::Duration::from_secs(86_400),
        )
        .unwrap();
    let server = Arc::new(server_config(&cert, &key.key_pem()).unwrap());
    for name in ["relay.internal", "10.0.0.7"] {
        handshake_in_memory(client(ca.cert_pem()), server.clone(), name).unwrap();
    }
    // The certificate is for that key only: served with another key, the handshake fails.
    let other = TlsKey::generate().unwrap();
    let mismatched = server_config(&cert, &other.key_pem())
        .map(Arc::new)
        .and_then(|s| handshake_in_memory(client(ca.cert_pem()), s, "relay.internal"));
    assert!(mismatched.is_err());
    assert!(ca
        .issue_cert_for_key(&names(&["x"]), &[4; 10], std::time::Duration::from_secs(60))
        .is_err());
}

#[test]
fn a_signing_certificate_binds_the_key_to_the_ca() {
    let ca = Ca::generate("Tether test CA").unwrap();
    let other_ca = Ca::generate("another CA").unwrap();
    let key = crate::identity::Identity::generate().public_key();
    let raw =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, key.to_b64()).unwrap();
    let cert = ca.issue_signing_cert(&raw).unwrap();
    verify_signing_cert(&cert, ca.cert_pem(), &raw).unwrap();
    // In a bundle with another CA, still fine; against the other CA alone, refused.
    let bundle = format!("{}{}", other_ca.cert_pem(), ca.cert_pem());
    verify_signing_cert(&cert, &bundle, &raw).unwrap();
    assert!(verify_signing_cert(&cert, other_ca.cert_pem(), &raw).is_err());
    // Another key in the answer than the one certified: refused.
    let mut wrong = raw.clone();
    wrong[0] ^= 1;
    let err = verify_signing_cert(&cert, ca.cert_pem(), &wrong).unwrap_err();
    assert!(err.to_string().contains("another key"), "{err}");
    // A server (TLS) certificate is not a signing certificate, even from the right CA.
    let (tls_cert, _) = ca.issue_server_cert(&names(&["localhost"])).unwrap();
    assert!(verify_signing_cert(&tls_cert, ca.cert_pem(), &raw).is_err());
    // And a signing certificate does not serve TLS.
    assert!(certificate_covers(&cert, "localhost").map_or(true, |covers| !covers));
}

#[test]
fn certificate_names_are_read_back() {
    let ca = Ca::generate("Tether test CA").unwrap();
    let (cert, _) = ca
        .issue_server_cert(&names(&["tether.example", "10.1.2.3", "::1", "localhost"]))
        .unwrap();
    assert_eq!(
        certificate_names(&cert).unwrap(),
        ["tether.example", "10.1.2.3", "::1", "localhost"]
    );
    assert!(certificate_names("junk").is_err());
    assert_eq!(
        certificate_names(ca.cert_pem()).unwrap(),
        Vec::<String>::new()
    );
}

#[test]
fn a_reloadable_certificate_serves_the_new_one_from_the_next_handshake() {
    let ca = Ca::generate("Tether test CA").unwrap();
    let (old_cert, old_key) = ca.issue_server_cert(&names(&["localhost"])).unwrap();
    let reloadable = ReloadableCert::new(&old_cert, &old_key).unwrap();
    let server = Arc::new(reloadable.server_config().unwrap());
    let client = client(ca.cert_pem());
    handshake_in_memory(client.clone(), server.clone(), "localhost").unwrap();
    assert!(handshake_in_memory(client.clone(), server.clone(), "tether.example").is_err());
    let (new_cert, new_key) = ca
        .issue_server_cert(&names(&["localhost", "tether.example"]))
        .unwrap();
    // A certificate with another key than its own is refused, and the old one stays.
    assert!(reloadable.replace(&new_cert, &old_key).is_err());
    assert!(handshake_in_memory(client.clone(), server.clone(), "tether.example").is_err());
    reloadable.replace(&new_cert, &new_key).unwrap();
    handshake_in_memory(client.clone(), server.clone(), "tether.example").unwrap();
    handshake_in_memory(client, server, "localhost").unwrap();
}

#[test]
fn expiry_is_read_from_the_certificate() {
    let ca = Ca::generate("Tether test CA").unwrap();
    let (cert, _) = ca.issue_server_cert(&names(&["localhost"])).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let days = |pem: &str| (certificate_not_after(pem).unwrap() - now) / 86_400;
    assert!((824..=825).contains(&days(&cert)), "{}", days(&cert));
    assert!(
        (3649..=3650).contains(&days(ca.cert_pem())),
        "{}",
        days(ca.cert_pem())
    );
    assert!(certificate_not_after("junk").is_err());
}
