//! Agent upgrade packages: what the server signs and the agent (worker and monitor) checks.
//!
//! A package is an agent binary stored on the server under a version `MAJOR.MINOR.PATCH`. The
//! server signs [`package_signing_bytes`] (the version and the package's sha256) with its
//! command-signing key at upload; the `Upgrade` command carries that signature, and the agent
//! verifies it against the key it pinned at enrollment, then the downloaded bytes against the
//! sha256. So neither a relay nor anyone who can write to the server's blob directory can make
//! an agent run bytes the server did not sign for that version, and a package can never be
//! replayed under another version number.

use std::cmp::Ordering;
use std::fmt;

use crate::identity::PublicKey;

/// Longest version text accepted (three numbers and two dots fit many times over).
const MAX_VERSION_LEN: usize = 64;

/// A package version: `MAJOR.MINOR.PATCH`, decimal, no sign, no leading zeros (except `0`),
/// no pre-release or build suffix. Ordered numerically, part by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

/// Why a version text is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("version {text:?} is not MAJOR.MINOR.PATCH (decimal numbers, e.g. 1.4.2)")]
pub struct VersionError {
    /// The refused text, shortened.
    pub text: String,
}

impl Version {
    /// Parses `MAJOR.MINOR.PATCH`.
    pub fn parse(text: &str) -> Result<Version, VersionError> {
        let refuse = || VersionError {
            text: text.chars().take(MAX_VERSION_LEN).collect(),
        };
        if text.len() > MAX_VERSION_LEN {
            return Err(refuse());
        }
        let mut parts = text.split('.');
        let mut next = || -> Result<u64, VersionError> {
            let p = parts.next().ok_or_else(refuse)?;
            let digits_only = !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
            if !digits_only || (p.len() > 1 && p.starts_with('0')) {
                return Err(refuse());
            }
            p.parse().map_err(|_| refuse())
        };
        let (major, minor, patch) = (next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(refuse());
        }
        Ok(Version {
            major,
            minor,
            patch,
        })
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch).cmp(&(other.major, other.minor, other.patch))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// `true` for 64 lowercase hex digits.
pub fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The bytes the server signs for agent package `sha256` published as `version`.
pub fn package_signing_bytes(version: &str, sha256: &str) -> Vec<u8> {
    format!("tether-upgrade-v1\n{version}\n{sha256}").into_bytes()
}

/// Which binary a package replaces. The component is part of what the server signs for relay
/// packages (agent packages keep their original signed bytes), so an agent never runs a relay
/// package and a relay never runs an agent package: the signature does not verify.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    /// `tether-agent` (the worker binary the monitor swaps).
    #[default]
    Agent,
    /// `tether-relay`.
    Relay,
}

impl Component {
    /// Parses `agent` or `relay`.
    pub fn parse(text: &str) -> Option<Component> {
        match text {
            "agent" => Some(Component::Agent),
            "relay" => Some(Component::Relay),
            _ => None,
        }
    }

    /// The name on the wire and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Agent => "agent",
            Component::Relay => "relay",
        }
    }

    /// `true` for [`Component::Agent`] (serde's `skip_serializing_if`).
    pub fn is_agent(&self) -> bool {
        *self == Component::Agent
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The bytes the server signs for a package of `component`: [`package_signing_bytes`] for
/// agents, `tether-upgrade-v1\nrelay\n{version}\n{sha256}` for relays.
pub fn component_signing_bytes(component: Component, version: &str, sha256: &str) -> Vec<u8> {
    match component {
        Component::Agent => package_signing_bytes(version, sha256),
        Component::Relay => format!("tether-upgrade-v1\nrelay\n{version}\n{sha256}").into_bytes(),
    }
}

/// Why a package's metadata is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackageError {
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error("sha256 {0:?} is not 64 lowercase hex digits")]
    Sha256(String),
    #[error("the package signature does not verify against the server's key")]
    Signature,
}

/// Checks a package's metadata: a valid version, a well-formed sha256, and the server's
/// signature over both. Answers the parsed version.
pub fn verify_package(
    server_key: &PublicKey,
    version: &str,
    sha256: &str,
    signature: &str,
) -> Result<Version, PackageError> {
    verify_component_package(server_key, Component::Agent, version, sha256, signature)
}

/// [`verify_package`] for a package of `component`.
pub fn verify_component_package(
    server_key: &PublicKey,
    component: Component,
    version: &str,
    sha256: &str,
    signature: &str,
) -> Result<Version, PackageError> {
    let parsed = Version::parse(version)?;
    if !is_sha256(sha256) {
        return Err(PackageError::Sha256(sha256.chars().take(80).collect()));
    }
    server_key
        .verify(
            &component_signing_bytes(component, version, sha256),
            signature,
        )
        .map_err(|_| PackageError::Signature)?;
    Ok(parsed)
}

/// Bytes of a package's head that [`elf_arch`] reads.
pub const ELF_HEADER_BYTES: usize = 20;

/// The CPU architecture an ELF binary is built for, named as Rust's `std::env::consts::ARCH`
/// (what agents report as their `arch` fact), from the first [`ELF_HEADER_BYTES`] bytes;
/// `None` for anything that is not an ELF file of a known machine.
pub fn elf_arch(head: &[u8]) -> Option<&'static str> {
    let head = head.get(..ELF_HEADER_BYTES)?;
    if head[..4] != *b"\x7fELF" {
        return None;
    }
    // e_machine, in the byte order EI_DATA names (1: little-endian, 2: big-endian).
    let machine = match head[5] {
        1 => u16::from_le_bytes([head[18], head[19]]),
        2 => u16::from_be_bytes([head[18], head[19]]),
        _ => return None,
    };
    let is_64 = head[4] == 2;
    Some(match (machine, is_64) {
        (0x3E, _) => "x86_64",
        (0x03, _) => "x86",
        (0xB7, _) => "aarch64",
        (0x28, _) => "arm",
        (0xF3, true) => "riscv64",
        (0x15, true) => "powerpc64",
        (0x16, true) => "s390x",
        _ => return None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn elf_heads_name_their_architecture() {
        let mut head = [0u8; ELF_HEADER_BYTES];
        head[..4].copy_from_slice(b"\x7fELF");
        head[4] = 2;
        head[5] = 1;
        head[18] = 0xB7;
        assert_eq!(elf_arch(&head), Some("aarch64"));
        head[18] = 0x3E;
        assert_eq!(elf_arch(&head), Some("x86_64"));
        assert_eq!(elf_arch(&head[..10]), None, "too short");
        assert_eq!(elf_arch(b"#!/bin/sh\necho hello there\n"), None);
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_arch(&me), Some(std::env::consts::ARCH));
    }
    use crate::identity::Identity;

    #[test]
    fn versions_parse_strictly_and_order_numerically() {
        let v = |s: &str| Version::parse(s).unwrap();
        assert!(v("0.1.0") < v("0.1.1"));
        assert!(v("0.9.0") < v("0.10.0"));
        assert!(v("1.0.0") > v("0.99.99"));
        assert_eq!(v("99.0.0").to_string(), "99.0.0");
        for bad in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "1.2.x",
            "01.2.3",
            "1.2.3-rc1",
            "+1.2.3",
            "1..3",
            " 1.2.3",
            "1.2.99999999999999999999",
        ] {
            assert!(Version::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Version::parse(&"1".repeat(100)).is_err());
    }

    #[test]
    fn a_relay_package_never_verifies_as_an_agent_package_and_back() {
        let server = Identity::generate();
        let key = server.public_key();
        let sha = "ab".repeat(32);
        let relay_sig = server.sign(&component_signing_bytes(Component::Relay, "2.0.0", &sha));
        let agent_sig = server.sign(&component_signing_bytes(Component::Agent, "2.0.0", &sha));
        assert_eq!(
            agent_sig,
            server.sign(&package_signing_bytes("2.0.0", &sha))
        );
        assert!(
            verify_component_package(&key, Component::Relay, "2.0.0", &sha, &relay_sig).is_ok()
        );
        assert_eq!(
            verify_package(&key, "2.0.0", &sha, &relay_sig),
            Err(PackageError::Signature)
        );
        assert_eq!(
            verify_component_package(&key, Component::Relay, "2.0.0", &sha, &agent_sig),
            Err(PackageError::Signature)
        );
        assert_eq!(Component::parse("relay"), Some(Component::Relay));
        assert_eq!(Component::parse("Relay"), None);
    }

    #[test]
    fn a_package_verifies_only_for_its_version_and_content() {
        let server = Identity::generate();
        let sha = "ab".repeat(32);
        let sig = server.sign(&package_signing_bytes("1.2.3", &sha));
        let key = server.public_key();
        assert_eq!(
            verify_package(&key, "1.2.3", &sha, &sig).unwrap(),
            Version::parse("1.2.3").unwrap()
        );
        assert_eq!(
            verify_package(&key, "1.2.4", &sha, &sig),
            Err(PackageError::Signature)
        );
        assert_eq!(
            verify_package(&key, "1.2.3", &"cd".repeat(32), &sig),
            Err(PackageError::Signature)
        );
        let other = Identity::generate().public_key();
        assert_eq!(
            verify_package(&other, "1.2.3", &sha, &sig),
            Err(PackageError::Signature)
        );
        assert!(matches!(
            verify_package(&key, "1.2.3", "../../etc", &sig),
            Err(PackageError::Sha256(_))
        ));
        assert!(matches!(
            verify_package(&key, "latest", &sha, &sig),
            Err(PackageError::Version(_))
        ));
    }
}
