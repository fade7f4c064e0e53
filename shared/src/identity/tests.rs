//! Key files, signatures and hostile inputs: every failure is an error, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use super::*;

#[test]
fn sign_and_verify_round_trip() {
    let id = Identity::generate();
    let sig = id.sign(b"nonce|agent-1");
    let public = PublicKey::from_b64(&id.public_key_b64()).unwrap();
    public.verify(b"nonce|agent-1", &sig).unwrap();
    assert_eq!(public, id.public_key());
    assert_eq!(public.to_string(), id.public_key_b64());
}

#[test]
fn wrong_message_key_or_signature_is_rejected() {
    let id = Identity::generate();
    let other = Identity::generate();
    let sig = id.sign(b"message");
    assert!(matches!(
        id.public_key().verify(b"massage", &sig),
        Err(IdentityError::BadSignature)
    ));
    assert!(matches!(
        other.public_key().verify(b"message", &sig),
        Err(IdentityError::BadSignature)
    ));
    let mut bytes = STANDARD.decode(&sig).unwrap();
    bytes[10] ^= 1;
    let flipped = STANDARD.encode(&bytes);
    assert!(matches!(
        id.public_key().verify(b"message", &flipped),
        Err(IdentityError::BadSignature)
    ));
}

#[test]
fn garbled_signatures_and_keys_are_errors() {
    let id = Identity::generate();
    let public = id.public_key();
    let sig = id.sign(b"m");
    for bad in [
        "",
        "!!!",
        &sig[..sig.len() - 4],
        "AAAA",
        &format!("{sig}AAAA"),
    ] {
        assert!(
            matches!(
                public.verify(b"m", bad),
                Err(IdentityError::SignatureEncoding(_))
            ),
            "{bad:?}"
        );
    }
    let key = id.public_key_b64();
    let too_long = STANDARD.encode([7u8; 33]);
    for bad in ["", "%%%", &key[..20], too_long.as_str()] {
        assert!(
            matches!(PublicKey::from_b64(bad), Err(IdentityError::PublicKey(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn save_and_load_with_private_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.key");
    let id = Identity::generate();
    id.save(&path).unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
    let loaded = Identity::load(&path).unwrap();
    assert_eq!(loaded.public_key_b64(), id.public_key_b64());
    // Saving again replaces the file atomically and leaves no temporary behind.
    Identity::generate().save(&path).unwrap();
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn load_reports_missing_garbled_and_exposed_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    assert!(matches!(
        Identity::load(&path),
        Err(IdentityError::Missing { .. })
    ));

    write_private_file(
        &path,
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = Identity::load(&path).unwrap_err();
    assert!(matches!(err, IdentityError::Garbled { .. }), "{err}");
    assert!(err.to_string().contains(&path.display().to_string()));

    Identity::generate().save(&path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = Identity::load(&path).unwrap_err();
    assert!(
        matches!(err, IdentityError::Permissions { mode: 0o644, .. }),
        "{err}"
    );
}

#[test]
fn debug_does_not_show_the_private_key() {
    let id = Identity::generate();
    let shown = format!("{id:?}");
    assert!(shown.contains(&id.public_key_b64()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k");
    id.save(&path).unwrap();
    let pem = fs::read_to_string(&path).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!shown.contains(&body));
}
