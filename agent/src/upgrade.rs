//! What the worker and the monitor share about upgrades: the files in `DATA/upgrade/` through
//! which they hand an upgrade over, and the reserved exit code.
//!
//! - `tether-agent-<version>`: a downloaded, verified package (mode 0755).
//! - [`STAGED_FILE`] ([`Staged`]): written by the worker once the package is verified and in
//!   place, just before it exits with [`UPGRADE_EXIT_CODE`]; the monitor verifies it again and
//!   starts that program as the worker, on trial. Removed when the trial ends.
//! - [`TRIAL_FILE`] (a [`Staged`]): the monitor renames `staged.json` to it when it starts the
//!   package on trial, and removes it when the trial ends. Found at the monitor's start, it
//!   means the monitor died mid-trial: the upgrade is rolled back.
//! - [`ACTIVE_FILE`] ([`Active`]): written by the monitor when a trial succeeded: the program
//!   (and version) to run as the worker from now on, even after the monitor restarts, and the
//!   one it replaced.
//! - [`RESULT_FILE`] ([`UpgradeResult`]): written by the monitor when a trial ends (done or
//!   rolled back, with the reason) or a staged package is refused; the worker reports it
//!   upstream (`UpgradeFinished`) and removes it.
//!
//! Every file is written atomically (temp file, fsync, rename). The worker learns which
//! package version it runs from [`PACKAGE_VERSION_ENV`], set by the monitor from these
//! server-signed records; without it, it is the build's own version.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tether_shared::identity::{write_file_atomic, PublicKey};
use tether_shared::protocol::UpgradeOutcome;
use tether_shared::upgrade::verify_package;

/// Exit code by which a worker says "an upgrade is staged, swap me in".
pub const UPGRADE_EXIT_CODE: i32 = 75;
/// The directory inside the data directory.
pub const UPGRADE_DIR: &str = "upgrade";
/// The staged package, see [`Staged`].
pub const STAGED_FILE: &str = "staged.json";
/// The package on trial, see the module docs.
pub const TRIAL_FILE: &str = "trial.json";
/// The swapped-in worker program, see [`Active`].
pub const ACTIVE_FILE: &str = "active.json";
/// The outcome of the last trial, see [`UpgradeResult`].
pub const RESULT_FILE: &str = "result.json";
/// Set by the monitor for a worker started from a package: that package's version.
pub const PACKAGE_VERSION_ENV: &str = "TETHER_AGENT_PACKAGE_VERSION";

/// `DATA/upgrade`.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join(UPGRADE_DIR)
}

/// The file name a package of `version` is staged under.
pub fn program_name(version: &str) -> String {
    format!("tether-agent-{version}")
}

/// A verified package, ready for the monitor to swap in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Staged {
    pub version: String,
    pub sha256: String,
    pub size: u64,
    /// The server's signature over version and sha256.
    pub signature: String,
    /// `DATA/upgrade/tether-agent-<version>`.
    pub program: PathBuf,
}

/// A worker program and the package version it is (`None`: the installed build).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Installed {
    pub program: PathBuf,
    #[serde(default)]
    pub version: Option<String>,
}

/// The worker program the monitor runs since the last successful upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Active {
    pub current: Installed,
    /// What ran before it (kept on disk; the next upgrade may remove it).
    pub previous: Installed,
}

/// How the last trial ended, for the worker to report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeResult {
    pub version: String,
    pub outcome: UpgradeOutcome,
    #[serde(default)]
    pub reason: String,
}

/// Why an upgrade file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: not a valid record ({reason})", path.display())]
    Garbled { path: PathBuf, reason: String },
}

/// Reads JSON record `path`; `Ok(None)` if it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, FileError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FileError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| FileError::Garbled {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// Writes JSON record `path` atomically (mode 0644).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut text = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    text.push(b'\n');
    write_file_atomic(path, &text, 0o644)
}

/// Removes `path`; a missing file is fine.
pub fn remove(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The sha256 (hex) and length of the file at `path`.
pub fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let got = f.read(&mut buf)?;
        if got == 0 {
            return Ok((hex::encode(hasher.finalize()), n));
        }
        hasher.update(buf.get(..got).unwrap_or_default());
        n += got as u64;
    }
}

/// Checks a staged package as the monitor does before swapping it in: the server's signature
/// over its version and sha256, its place (`DATA/upgrade/tether-agent-<version>`), its content
/// (size and sha256) and that it is executable. Blocking (hashes the whole file).
pub fn verify_staged(
    data_dir: &Path,
    staged: &Staged,
    trusted: &[PublicKey],
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mut verdict = Err("no trusted signing key".to_owned());
    for key in trusted {
        verdict = verify_package(key, &staged.version, &staged.sha256, &staged.signature)
            .map(drop)
            .map_err(|e| e.to_string());
        if verdict.is_ok() {
            break;
        }
    }
    verdict?;
    let expected = dir(data_dir).join(program_name(&staged.version));
    if staged.program != expected {
        return Err(format!(
            "the staged program {} is not {}",
            staged.program.display(),
            expected.display()
        ));
    }
    let meta = std::fs::symlink_metadata(&staged.program)
        .map_err(|e| format!("{}: {e}", staged.program.display()))?;
    if !meta.file_type().is_file() {
        return Err(format!(
            "{} is not a regular file",
            staged.program.display()
        ));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not executable", staged.program.display()));
    }
    let (sha256, size) =
        sha256_file(&staged.program).map_err(|e| format!("{}: {e}", staged.program.display()))?;
    if sha256 != staged.sha256 || size != staged.size {
        return Err(format!(
            "{} has {size} bytes with sha256 {sha256}, expected {} bytes with sha256 {}",
            staged.program.display(),
            staged.size,
            staged.sha256
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tether_shared::identity::Identity;
    use tether_shared::upgrade::package_signing_bytes;

    #[test]
    fn a_staged_package_is_checked_for_signature_place_content_and_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path();
        let server = Identity::generate();
        let body = b"#!/bin/sh\nexit 0\n";
        let program = dir(data).join(program_name("2.0.0"));
        std::fs::create_dir_all(dir(data)).unwrap();
        std::fs::write(&program, body).unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (sha256, size) = sha256_file(&program).unwrap();
        let staged = Staged {
            version: "2.0.0".into(),
            signature: server.sign(&package_signing_bytes("2.0.0", &sha256)),
            sha256,
            size,
            program: program.clone(),
        };
        let key = server.public_key();
        verify_staged(data, &staged, &[key]).unwrap();

        let elsewhere = Staged {
            program: tmp.path().join("x"),
            ..staged.clone()
        };
        assert!(verify_staged(data, &elsewhere, &[key])
            .unwrap_err()
            .contains("is not"));
        let other_key = Identity::generate().public_key();
        assert!(verify_staged(data, &staged, &[other_key])
            .unwrap_err()
            .contains("signature"));
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(verify_staged(data, &staged, &[key])
            .unwrap_err()
            .contains("not executable"));
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(&program, b"#!/bin/sh\nexit 1\n").unwrap();
        assert!(verify_staged(data, &staged, &[key])
            .unwrap_err()
            .contains("expected"));

        write_json(&dir(data).join(STAGED_FILE), &staged).unwrap();
        let back: Staged = read_json(&dir(data).join(STAGED_FILE)).unwrap().unwrap();
        assert_eq!(back, staged);
        assert!(read_json::<Staged>(&dir(data).join("none.json"))
            .unwrap()
            .is_none());
        remove(&dir(data).join("none.json")).unwrap();
    }
}
