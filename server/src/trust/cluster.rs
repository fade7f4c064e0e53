//! A cluster's nodes share the trust material through the database (see `docs/cluster.md`,
//! "Key rollover on a cluster").
//!
//! A rollover's steps are taken on the active node, in its data directory. So that every other
//! node signs and certifies with the same keys (a member at once, a standby once it takes
//! over), the active node writes what its directory holds for the step in force to the meta
//! key [`PUBLISHED`]: the rotation, the files at their usual names, and the other set's (`next/`
//! while overlapping, `previous/` once switched). The private keys are sealed with the secrets
//! key ring every node of a cluster shares (`crate::secrets`), so the database alone opens
//! none of them. Every other node writes a record newer than its own into its directory
//! ([`super::Trust::adopt`]), issues its server certificate again from a new server CA, and
//! serves the result.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tether_shared::identity::{write_file_atomic, write_private_file};

use super::{io_err, read, remove_dir, Phase, Rotation, TrustError, KEPT, NEXT_DIR, PREVIOUS_DIR};
use super::{ROTATED, ROTATION_FILE};
use crate::secrets::KeyRing;

/// The meta key of the active node's trust material.
pub const PUBLISHED: &str = "trust/published";

/// What the active node's directory holds for one step of a rollover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Published {
    pub rotation: Rotation,
    /// The rotated files at their usual names (secret ones sealed).
    pub files: BTreeMap<String, String>,
    /// The other set's files: `next/`'s while overlapping, `previous/`'s once switched.
    pub other: BTreeMap<String, String>,
}

/// Where `rotation` stands in a rollover's course (a later step is greater).
pub fn order(rotation: Rotation) -> (u64, u8) {
    let step = match rotation.phase {
        Phase::Overlap => 0,
        Phase::Switching | Phase::Switched => 1,
        Phase::Steady => 2,
    };
    (rotation.serial, step)
}

/// The context a secret file is sealed for (a sealed value opens for its own file only).
fn context(name: &str, other: bool) -> String {
    format!("{PUBLISHED}/{}{name}", if other { "other/" } else { "" })
}

fn secret(name: &str) -> bool {
    ROTATED.iter().any(|(n, s)| *n == name && *s)
}

/// The other set's directory for `phase`, and the files it holds.
fn other_dir(phase: Phase) -> Option<(&'static str, Vec<&'static str>)> {
    match phase {
        Phase::Overlap => Some((NEXT_DIR, ROTATED.iter().map(|(n, _)| *n).collect())),
        Phase::Switched | Phase::Switching => Some((PREVIOUS_DIR, KEPT.to_vec())),
        Phase::Steady => None,
    }
}

impl Published {
    /// What `dir` holds for `rotation`, its private keys sealed with `keys`.
    pub fn read(dir: &Path, rotation: Rotation, keys: &KeyRing) -> Result<Published, TrustError> {
        let files_of = |from: &Path, names: &[&str], other: bool| {
            names
                .iter()
                .map(|name| {
                    let text = read(&from.join(name))?;
                    let text = match secret(name) {
                        true => keys.seal(&context(name, other), &text),
                        false => text,
                    };
                    Ok(((*name).to_owned(), text))
                })
                .collect::<Result<BTreeMap<_, _>, TrustError>>()
        };
        let names: Vec<&str> = ROTATED.iter().map(|(n, _)| *n).collect();
        let other = match other_dir(rotation.phase) {
            Some((sub, names)) => files_of(&dir.join(sub), &names, true)?,
            None => BTreeMap::new(),
        };
        Ok(Published {
            rotation,
            files: files_of(dir, &names, false)?,
            other,
        })
    }

    /// Writes this record into `dir`: the files, the other set's directory (the one that does
    /// not belong to the step removed), and the rotation last. Answers whether the server CA
    /// changed (the node's server certificate is then issued again from the new one).
    ///
    /// Refused as a whole, before anything is written, unless every file the step needs is
    /// there, names a file of the rotation, and its sealed keys open with `keys`.
    pub fn write(&self, dir: &Path, keys: &KeyRing) -> Result<bool, TrustError> {
        let bad = |reason: String| TrustError::File {
            path: dir.join(ROTATION_FILE),
            reason: format!("the trust material in the database: {reason}"),
        };
        let open = |files: &BTreeMap<String, String>, names: &[&str], other: bool| {
            if files.len() != names.len() || names.iter().any(|n| !files.contains_key(*n)) {
                return Err(bad(format!(
                    "{} files, not {}",
                    files.keys().cloned().collect::<Vec<_>>().join(", "),
                    names.join(", ")
                )));
            }
            names
                .iter()
                .map(|name| {
                    let text = &files[*name];
                    let clear = match secret(name) {
                        true => keys
                            .open(&context(name, other), text)
                            .map_err(|e| bad(e.to_string()))?,
                        false => text.clone(),
                    };
                    Ok(((*name).to_owned(), clear))
                })
                .collect::<Result<Vec<_>, TrustError>>()
        };
        let names: Vec<&str> = ROTATED.iter().map(|(n, _)| *n).collect();
        let files = open(&self.files, &names, false)?;
        let other = match other_dir(self.rotation.phase) {
            Some((sub, names)) => Some((sub, open(&self.other, &names, true)?)),
            None if self.other.is_empty() => None,
            None => return Err(bad("files of another set in a steady state".into())),
        };
        let ca_before = read(&dir.join(crate::init::CA_CERT)).ok();
        remove_dir(&dir.join(NEXT_DIR))?;
        remove_dir(&dir.join(PREVIOUS_DIR))?;
        let put = |path: &Path, name: &str, text: &str| {
            let written = match secret(name) {
                true => write_private_file(path, text.as_bytes()),
                false => write_file_atomic(path, text.as_bytes(), 0o644),
            };
            written.map_err(io_err(path))
        };
        if let Some((sub, files)) = other {
            let at = dir.join(sub);
            fs::create_dir(&at).map_err(io_err(&at))?;
            for (name, text) in files {
                put(&at.join(&name), &name, &text)?;
            }
        }
        for (name, text) in &files {
            put(&dir.join(name), name, text)?;
        }
        let ca_changed = ca_before.as_deref() != Some(files_text(&files, crate::init::CA_CERT));
        if ca_changed {
            crate::init::renew_server_cert(dir, &[])?;
        }
        Ok(ca_changed)
    }
}

fn files_text<'a>(files: &'a [(String, String)], name: &str) -> &'a str {
    files
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("", |(_, t)| t.as_str())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::super::Trust;
    use super::*;
    use crate::init;

    /// An initialized directory, and a copy of it as `join` makes one (another node).
    fn two_nodes() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        init::initialize(&init::InitOptions {
            data_dir: a.clone(),
            hostnames: vec!["localhost".into()],
            force: false,
        })
        .unwrap();
        let b = tmp.path().join("b");
        fs::create_dir(&b).unwrap();
        for entry in fs::read_dir(&a).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                fs::copy(entry.path(), b.join(entry.file_name())).unwrap();
            }
        }
        (tmp, a, b)
    }

    fn text(dir: &Path, name: &str) -> String {
        read(&dir.join(name)).unwrap()
    }

    #[actix_rt::test]
    async fn another_node_takes_each_step_of_a_rollover_from_what_the_active_node_published() {
        let (_tmp, a, b) = two_nodes();
        let keys = KeyRing::generate();
        let active = Trust::load(&a).unwrap();
        let other = Trust::load(&b).unwrap();
        let old_ca = text(&b, init::CA_CERT);

        for step in ["begin", "switch", "finish"] {
            let rotation = match step {
                "begin" => active.begin().await,
                "switch" => active.switch().await,
                _ => active.finish().await,
            }
            .unwrap();
            let published = Published::read(&a, rotation, &keys).unwrap();
            // What travels through the database opens no private key without the ring.
            let json = serde_json::to_string(&published).unwrap();
            for secret in [init::CA_KEY, init::RELAY_CA_KEY, init::SIGNING_KEY] {
                let pem = text(&a, secret);
                let body = pem.lines().nth(1).unwrap();
                assert!(!json.contains(body), "{step}: {secret} in the clear");
            }
            let ca_changed = published.write(&b, &keys).unwrap();
            assert_eq!(ca_changed, step == "switch", "{step}");
            other.step(rotation).unwrap();
            // The same trust set, the same key signing, the same files.
            assert_eq!(other.set(), active.set(), "{step}");
            assert_eq!(
                other.signer().public_key_b64(),
                active.signer().public_key_b64(),
                "{step}"
            );
            assert_eq!(
                Trust::load(&b).unwrap().set(),
                active.set(),
                "{step}: at a restart"
            );
            for sub in [NEXT_DIR, PREVIOUS_DIR] {
                assert_eq!(a.join(sub).exists(), b.join(sub).exists(), "{step}: {sub}");
            }
            // The other node's own certificate, for its own names, from the CA in force.
            let server_cert = text(&b, init::SERVER_CERT);
            assert!(
                tether_shared::tls::issued_by(&server_cert, &text(&b, init::CA_CERT)),
                "{step}"
            );
            assert_eq!(
                tether_shared::tls::certificate_names(&server_cert).unwrap(),
                ["localhost"]
            );
            // Written again: nothing changes.
            assert!(!published.write(&b, &keys).unwrap(), "{step}");
        }
        assert_ne!(text(&b, init::CA_CERT), old_ca);
        assert_eq!(other.set().signing_keys.len(), 1);
    }

    #[actix_rt::test]
    async fn a_record_that_does_not_open_or_lacks_a_file_changes_nothing() {
        let (_tmp, a, b) = two_nodes();
        let keys = KeyRing::generate();
        let active = Trust::load(&a).unwrap();
        let rotation = active.begin().await.unwrap();
        let published = Published::read(&a, rotation, &keys).unwrap();
        let before: Vec<String> = ROTATED.iter().map(|(n, _)| text(&b, n)).collect();
        let unchanged = |what: &str| {
            let now: Vec<String> = ROTATED.iter().map(|(n, _)| text(&b, n)).collect();
            assert_eq!(now, before, "{what}");
            assert!(!b.join(NEXT_DIR).exists(), "{what}");
        };
        // Another cluster's ring (or a node that was not given this one's).
        let err = published.write(&b, &KeyRing::generate()).unwrap_err();
        assert!(err.to_string().contains("database"), "{err}");
        unchanged("another ring");
        // A sealed key moved to another file's place does not open there.
        let mut moved = published.clone();
        let signing = moved.files[init::SIGNING_KEY].clone();
        moved.files.insert(init::CA_KEY.to_owned(), signing);
        assert!(moved.write(&b, &keys).is_err());
        unchanged("a key in another's place");
        let mut lacking = published.clone();
        lacking.other.remove(init::SIGNING_PUB);
        assert!(lacking.write(&b, &keys).is_err());
        unchanged("a file missing");
        let mut steady = published;
        steady.rotation.phase = Phase::Steady;
        assert!(steady.write(&b, &keys).is_err());
        unchanged("another set's files in a steady state");
    }

    #[test]
    fn steps_are_ordered_as_a_rollover_takes_them() {
        let r = |serial, phase| order(Rotation { serial, phase });
        assert!(r(0, Phase::Steady) < r(1, Phase::Overlap));
        assert!(r(1, Phase::Overlap) < r(1, Phase::Switched));
        assert!(r(1, Phase::Switched) < r(2, Phase::Steady));
        assert_eq!(r(1, Phase::Switching), r(1, Phase::Switched));
    }
}
