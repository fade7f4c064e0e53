//! A cluster's nodes share the trust material through the database (see `docs/cluster.md`,
//! "Key rollover on a cluster").
//!
//! A rollover's steps are taken on the active node. So that every other node signs and
//! certifies with the same keys (a member at once, a standby once it takes over), the active
//! node writes each step to the meta key [`PUBLISHED`] *before* it takes it in its own data
//! directory: the rotation, the files at their usual names, and the other set's (`next/` while
//! overlapping, `previous/` once switched). The whole record is sealed with the secrets key ring
//! every node of a cluster shares (`crate::secrets`): the database alone opens none of it, and
//! nobody without the ring can make a record a node takes. Every other node takes a record
//! newer than its own step into its directory ([`Published::adopt_into`]): staged whole in
//! [`STAGING`] and checked, then put in place; an adoption cut short is completed at the next
//! start ([`complete_adoption`]).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tether_shared::identity::{write_file_atomic, write_private_file};

use super::{
    build, io_err, read, remove_dir, write_rotation, Phase, Rotation, TrustError, KEPT, NEXT_DIR,
    PREVIOUS_DIR, ROTATED, ROTATION_FILE,
};
use crate::init;
use crate::secrets::KeyRing;

/// The meta key of the active node's trust material.
pub const PUBLISHED: &str = "trust/published";
/// Where a record is written before it is checked (removed at start if left there).
pub const STAGING: &str = "adopting";
/// A checked record, being put in place (completed at start if left there).
pub const STAGED: &str = "adopted";
/// A record put in place, being removed (renamed first, so that a removal cut short never
/// leaves a partial [`STAGED`]).
const DONE: &str = "adopted.done";

/// What the active node's directory holds for one step of a rollover (in the clear: stored
/// only sealed whole, [`Published::seal`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Published {
    pub rotation: Rotation,
    /// The rotated files at their usual names.
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

fn secret(name: &str) -> bool {
    ROTATED.iter().any(|(n, s)| *n == name && *s)
}

fn rotated() -> Vec<&'static str> {
    ROTATED.iter().map(|(n, _)| *n).collect()
}

/// The other set's directory for `phase`, and the files it holds.
fn other_dir(phase: Phase) -> Option<(&'static str, Vec<&'static str>)> {
    match phase {
        Phase::Overlap => Some((NEXT_DIR, rotated())),
        Phase::Switched | Phase::Switching => Some((PREVIOUS_DIR, KEPT.to_vec())),
        Phase::Steady => None,
    }
}

fn files_of(from: &Path, names: &[&str]) -> Result<BTreeMap<String, String>, TrustError> {
    names
        .iter()
        .map(|name| Ok(((*name).to_owned(), read(&from.join(name))?)))
        .collect()
}

/// Why a record from the database is not taken.
fn refused(reason: impl std::fmt::Display) -> TrustError {
    TrustError::File {
        path: Path::new(PUBLISHED).to_path_buf(),
        reason: format!("the trust material in the database: {reason}"),
    }
}

impl Published {
    /// What `dir` holds for `rotation` (its files at their usual names; the other set's in
    /// the directory the step has it in).
    pub fn read(dir: &Path, rotation: Rotation) -> Result<Published, TrustError> {
        let other = match other_dir(rotation.phase) {
            Some((sub, names)) => files_of(&dir.join(sub), &names)?,
            None => BTreeMap::new(),
        };
        Ok(Published {
            rotation,
            files: files_of(dir, &rotated())?,
            other,
        })
    }

    /// What `dir`, overlapping, will hold once switched (`rotation`): the new files (`next/`)
    /// at their usual names, the old public halves aside.
    pub fn switched(dir: &Path, rotation: Rotation) -> Result<Published, TrustError> {
        Ok(Published {
            rotation,
            files: files_of(&dir.join(NEXT_DIR), &rotated())?,
            other: files_of(dir, &KEPT)?,
        })
    }

    /// The record as stored: sealed whole with `keys`.
    pub fn seal(&self, keys: &KeyRing) -> Result<Vec<u8>, TrustError> {
        let json = serde_json::to_string(self).map_err(refused)?;
        Ok(keys.seal(PUBLISHED, &json).into_bytes())
    }

    /// The record `stored` holds. Refused unless it is sealed, opens with `keys` and reads.
    pub fn open(stored: &[u8], keys: &KeyRing) -> Result<Published, TrustError> {
        let text = std::str::from_utf8(stored).map_err(refused)?;
        if !KeyRing::is_sealed(text) {
            return Err(refused("not sealed"));
        }
        let json = keys.open(PUBLISHED, text).map_err(refused)?;
        serde_json::from_str(&json).map_err(refused)
    }

    /// Takes this record into `dir`: written whole to [`STAGING`] and checked (every file the
    /// step needs, and what serving it reads), then marked [`STAGED`] and put in place
    /// ([`complete_adoption`]). A record that does not check out changes nothing.
    pub fn adopt_into(&self, dir: &Path) -> Result<(), TrustError> {
        let stage = dir.join(STAGING);
        remove_dir(&stage)?;
        let checked = self.stage(&stage);
        if let Err(e) = checked {
            remove_dir(&stage)?;
            return Err(e);
        }
        let staged = dir.join(STAGED);
        remove_dir(&staged)?;
        fs::rename(&stage, &staged).map_err(io_err(&staged))?;
        complete_adoption(dir)
    }

    fn stage(&self, stage: &Path) -> Result<(), TrustError> {
        let names = rotated();
        let complete = |files: &BTreeMap<String, String>, names: &[&str]| {
            files.len() == names.len() && names.iter().all(|n| files.contains_key(*n))
        };
        if !complete(&self.files, &names) {
            return Err(refused("not every file of the step"));
        }
        let other = match other_dir(self.rotation.phase) {
            Some((sub, names)) if complete(&self.other, &names) => Some(sub),
            None if self.other.is_empty() => None,
            _ => return Err(refused("not the other set's files the step needs")),
        };
        fs::create_dir(stage).map_err(io_err(stage))?;
        for (name, text) in &self.files {
            put(&stage.join(name), name, text)?;
        }
        if let Some(sub) = other {
            let at = stage.join(sub);
            fs::create_dir(&at).map_err(io_err(&at))?;
            for (name, text) in &self.other {
                put(&at.join(name), name, text)?;
            }
        }
        // What serving the step reads loads.
        build(stage, self.rotation)?;
        write_rotation(stage, self.rotation)
    }
}

fn put(path: &Path, name: &str, text: &str) -> Result<(), TrustError> {
    let written = match secret(name) {
        true => write_private_file(path, text.as_bytes()),
        false => write_file_atomic(path, text.as_bytes(), 0o644),
    };
    written.map_err(io_err(path))
}

fn copy_into(from: &Path, to: &Path) -> Result<(), TrustError> {
    for entry in fs::read_dir(from).map_err(io_err(from))? {
        let entry = entry.map_err(io_err(from))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if entry.path().is_file() && name != ROTATION_FILE {
            put(&to.join(name), name, &read(&entry.path())?)?;
        }
    }
    Ok(())
}

/// Puts a checked record ([`STAGED`]) in place, if one is there: its files at their usual
/// names, the other set's directory (the other removed), this node's server certificate
/// issued again if it does not come from the server CA in force, and the rotation last.
/// Repeatable: a start after a crash runs it again. A record left unchecked ([`STAGING`]) is
/// removed.
pub fn complete_adoption(dir: &Path) -> Result<(), TrustError> {
    remove_dir(&dir.join(STAGING))?;
    remove_dir(&dir.join(DONE))?;
    let staged = dir.join(STAGED);
    if !staged.exists() {
        return Ok(());
    }
    if !staged.join(ROTATION_FILE).exists() {
        // Never made by `adopt_into` (its rotation is written before the rename): not ours.
        tracing::warn!(dir = %staged.display(), "trust-staged-record-incomplete-dropped");
        return remove_dir(&staged);
    }
    let rotation = super::read_rotation(&staged)?;
    for sub in [NEXT_DIR, PREVIOUS_DIR] {
        let at = dir.join(sub);
        remove_dir(&at)?;
        if staged.join(sub).exists() {
            fs::create_dir(&at).map_err(io_err(&at))?;
            copy_into(&staged.join(sub), &at)?;
        }
    }
    copy_into(&staged, dir)?;
    let (cert, ca) = (
        read(&dir.join(init::SERVER_CERT))?,
        read(&dir.join(init::CA_CERT))?,
    );
    if !tether_shared::tls::issued_by(&cert, &ca) {
        init::renew_server_cert(dir, &[])?;
    }
    write_rotation(dir, rotation)?;
    let done = dir.join(DONE);
    fs::rename(&staged, &done).map_err(io_err(&done))?;
    remove_dir(&done)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::super::Trust;
    use super::*;

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

    /// Every file a node's trust material is made of, by path under `dir`.
    fn material(dir: &Path) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for sub in ["", NEXT_DIR, PREVIOUS_DIR] {
            for name in rotated()
                .into_iter()
                .chain([ROTATION_FILE, init::SERVER_CERT])
            {
                if let Ok(t) = read(&dir.join(sub).join(name)) {
                    out.insert(format!("{sub}/{name}"), t);
                }
            }
        }
        out
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
            let stored = Published::read(&a, rotation).unwrap().seal(&keys).unwrap();
            // What travels through the database is sealed whole: no key, public or private.
            let sealed = String::from_utf8(stored.clone()).unwrap();
            for name in [init::CA_KEY, init::SIGNING_KEY, init::SIGNING_PUB] {
                let body = text(&a, name).lines().nth(1).unwrap_or_default().to_owned();
                let body = if body.is_empty() {
                    text(&a, name)
                } else {
                    body
                };
                assert!(!sealed.contains(body.trim()), "{step}: {name} in the clear");
            }
            let published = Published::open(&stored, &keys).unwrap();
            assert_eq!(published.rotation, rotation);
            published.adopt_into(&b).unwrap();
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
            for sub in [NEXT_DIR, PREVIOUS_DIR, STAGING, STAGED] {
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
        }
        assert_ne!(text(&b, init::CA_CERT), old_ca);
        assert_eq!(other.set().signing_keys.len(), 1);
    }

    #[actix_rt::test]
    async fn a_record_not_sealed_with_the_ring_or_not_whole_changes_nothing() {
        let (_tmp, a, b) = two_nodes();
        let keys = KeyRing::generate();
        let active = Trust::load(&a).unwrap();
        let rotation = active.begin().await.unwrap();
        let published = Published::read(&a, rotation).unwrap();
        let before = material(&b);
        // In the clear (written by whoever can write to the database): refused.
        let clear = serde_json::to_vec(&published).unwrap();
        let err = Published::open(&clear, &keys).unwrap_err();
        assert!(err.to_string().contains("not sealed"), "{err}");
        // Another cluster's ring (or a node that was not given this one's).
        let err =
            Published::open(&published.seal(&KeyRing::generate()).unwrap(), &keys).unwrap_err();
        assert!(err.to_string().contains("database"), "{err}");
        // Changed after sealing.
        let mut stored = published.seal(&keys).unwrap();
        let at = stored.len() - 10;
        stored[at] = if stored[at] == b'A' { b'B' } else { b'A' };
        assert!(Published::open(&stored, &keys).is_err());
        // Whole, but not what the step needs: nothing taken, nothing left behind.
        let mut lacking = published.clone();
        lacking.other.remove(init::SIGNING_PUB);
        assert!(lacking.adopt_into(&b).is_err());
        let mut steady = published.clone();
        steady.rotation.phase = Phase::Steady;
        assert!(steady.adopt_into(&b).is_err());
        let mut garbled = published;
        garbled
            .files
            .insert(init::SIGNING_KEY.to_owned(), "not a key".to_owned());
        assert!(garbled.adopt_into(&b).is_err());
        assert_eq!(material(&b), before);
        assert!(!b.join(STAGING).exists() && !b.join(STAGED).exists());
    }

    #[actix_rt::test]
    async fn an_adoption_cut_short_is_completed_or_dropped_at_the_next_start() {
        let (_tmp, a, b) = two_nodes();
        let active = Trust::load(&a).unwrap();
        active.begin().await.unwrap();
        let old_cert = (text(&b, init::SERVER_CERT), text(&b, init::SERVER_KEY));
        let switched = active.switch().await.unwrap();
        let published = Published::read(&a, switched).unwrap();
        // Staged, not checked yet: dropped; the node starts on what it had.
        let before = material(&b);
        published.stage(&b.join(STAGING)).unwrap();
        let other = Trust::load(&b).unwrap();
        assert_eq!(material(&b), before);
        assert!(!b.join(STAGING).exists());
        assert_eq!(other.rotation().serial, 0);
        // Checked and marked, then the process died: completed at start, and the server
        // certificate issued from the new CA even though the files were already in place
        // (a first try that died before it renewed the certificate).
        published.stage(&b.join(STAGED)).unwrap();
        complete_adoption(&b).unwrap();
        fs::write(b.join(init::SERVER_CERT), &old_cert.0).unwrap();
        fs::write(b.join(init::SERVER_KEY), &old_cert.1).unwrap();
        published.stage(&b.join(STAGED)).unwrap();
        let other = Trust::load(&b).unwrap();
        assert_eq!(other.set(), active.set());
        assert_eq!(other.rotation(), switched);
        assert!(tether_shared::tls::issued_by(
            &text(&b, init::SERVER_CERT),
            &text(&a, init::CA_CERT)
        ));
        assert!(!b.join(STAGED).exists());
        // A removal cut short leaves only what is already put in place; a staged record
        // without its rotation was not written by an adoption.
        let before = material(&b);
        published.stage(&b.join(DONE)).unwrap();
        published.stage(&b.join(STAGED)).unwrap();
        fs::remove_file(b.join(STAGED).join(ROTATION_FILE)).unwrap();
        fs::remove_dir_all(b.join(STAGED).join(PREVIOUS_DIR)).unwrap();
        assert_eq!(Trust::load(&b).unwrap().set(), active.set());
        assert_eq!(material(&b), before);
        assert!(!b.join(DONE).exists() && !b.join(STAGED).exists());
    }

    #[test]
    fn steps_are_ordered_as_a_rollover_takes_them() {
        let r = |serial, phase| order(Rotation { serial, phase });
        assert!(r(0, Phase::Steady) < r(1, Phase::Overlap));
        assert!(r(1, Phase::Overlap) < r(1, Phase::Switched));
        assert!(r(1, Phase::Switched) < r(2, Phase::Steady));
        assert_eq!(r(1, Phase::Switching), r(1, Phase::Switched));
    }

    use std::sync::Arc;
    use tether_shared::journal::store::Rows;
    use tether_shared::journal::JournalError;

    /// A store over sled whose writes can be made to fail (the database refusing them).
    struct Refusing {
        sled: tether_shared::journal::SledStore,
        refuse: std::sync::atomic::AtomicBool,
    }

    impl tether_shared::journal::Store for Refusing {
        fn apply(&self, ops: &[tether_shared::journal::Op]) -> Result<(), JournalError> {
            if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(JournalError::Database {
                    reason: "refused by the test".into(),
                });
            }
            self.sled.apply(ops)
        }
        fn sync(&self) -> Result<(), JournalError> {
            self.sled.sync()
        }
        fn scan(&self, prefix: &[u8]) -> Result<Rows, JournalError> {
            self.sled.scan(prefix)
        }
        fn scan_from(
            &self,
            from: &[u8],
            prefix: &[u8],
            limit: usize,
            max_bytes: usize,
        ) -> Result<Rows, JournalError> {
            self.sled.scan_from(from, prefix, limit, max_bytes)
        }
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, JournalError> {
            self.sled.get(key)
        }
        fn read_blob(
            &self,
            name: &tether_shared::journal::LogName,
            offset: u64,
            max: usize,
        ) -> Result<Vec<u8>, JournalError> {
            self.sled.read_blob(name, offset, max)
        }
        fn syncs(&self) -> u64 {
            self.sled.syncs()
        }
    }

    #[actix_rt::test]
    async fn a_record_sealed_with_an_older_key_counts_as_a_stale_secret_until_sealed_again() {
        use tether_shared::journal::{Journal, JournalOptions, SledOptions, SledStore};
        let (tmp, a, _) = two_nodes();
        let store = Arc::new(Refusing {
            sled: SledStore::open(&tmp.path().join("j"), &SledOptions::default()).unwrap(),
            refuse: Default::default(),
        });
        let (journal, _) = Journal::with_store(
            store.clone(),
            &tmp.path().join("j"),
            &JournalOptions::default(),
            None,
        )
        .unwrap();
        let old = crate::secrets::new_key_line();
        let ring = |lines: &[&str]| Arc::new(KeyRing::parse(&lines.join("\n"), "test").unwrap());
        let first = Arc::new(Trust::load(&a).unwrap());
        first.share_through(journal.handle(), ring(&[&old]));
        first.publish().await.unwrap();
        assert_eq!(first.stale_secrets(), 0);
        // A rotation: the ring seals with a new key. The record cannot be sealed again yet.
        let rotated = Arc::new(Trust::load(&a).unwrap());
        rotated.share_through(
            journal.handle(),
            ring(&[&old, &crate::secrets::new_key_line()]),
        );
        store
            .refuse
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(rotated.publish().await.is_err());
        assert_eq!(rotated.stale_secrets(), 1, "the old key still opens it");
        store
            .refuse
            .store(false, std::sync::atomic::Ordering::Relaxed);
        rotated.publish().await.unwrap();
        assert_eq!(rotated.stale_secrets(), 0, "sealed again with the new key");
    }
}
