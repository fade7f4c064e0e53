//! The server's trust material and its rollover: the command-signing key, the server CA and
//! the relay CA, replaced on a running fleet with nothing reinstalled.
//!
//! Agents and relays trust what a [`TrustSet`] says (`tether_shared::trust`): the signing keys
//! and the CA bundle the server last sent them in a signed `Trust` command. A rollover has
//! three steps, each an operator's call (`POST /api/v1/trust/{begin,switch,finish}`):
//!
//! 1. **begin**: new keys are made in `DIR/next/` (server CA, relay CA, signing key and its
//!    certificate). The trust set becomes old + new (serial + 1) and goes to every agent and
//!    relay; the old key still signs. `agent-ca.pem` holds all four CAs.
//! 2. **switch** (once every agent and relay confirmed the overlap set, or forced): the old
//!    public halves move to `DIR/previous/`, the new files take the usual names, the server's
//!    certificate is issued again from the new CA (served from the watcher's next check), and
//!    the new key signs every command and handshake from then on. Relays' certificates are
//!    issued again from the new relay CA at their next beat. The set stays old + new.
//! 3. **finish** (once every relay serves a certificate from the new relay CA, and every peer
//!    confirmed, or forced): the trust set becomes the new alone (serial + 1);
//!    `DIR/previous/` is removed. A peer that applied it refuses the old key and CAs.
//!
//! `DIR/rotation.json` names the step; every file is written atomically, and a switch cut
//! short by a crash is completed at the next start.
//!
//! On a cluster, the other nodes take each step from the database ([`cluster`]).

pub mod api;
pub mod cluster;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use serde::{Deserialize, Serialize};
use tether_shared::identity::{write_file_atomic, write_private_file, Identity};
use tether_shared::tls::Ca;
use tether_shared::trust::TrustSet;

use crate::init::{self, InitError};

/// `DIR/rotation.json`: the serial of the trust set and the rollover's step.
pub const ROTATION_FILE: &str = "rotation.json";
/// How long a step waits for the database to say which step it holds, on a cluster.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The new keys while a rollover overlaps.
pub const NEXT_DIR: &str = "next";
/// The old public halves after the switch, until the finish.
pub const PREVIOUS_DIR: &str = "previous";

/// Files a rollover replaces, and whether each is secret.
const ROTATED: [(&str, bool); 7] = [
    (init::CA_CERT, false),
    (init::CA_KEY, true),
    (init::RELAY_CA_CERT, false),
    (init::RELAY_CA_KEY, true),
    (init::SIGNING_KEY, true),
    (init::SIGNING_PUB, false),
    (init::SIGNING_CERT, false),
];
/// What `previous/` keeps: the public halves the overlap still trusts.
const KEPT: [&str; 3] = [init::CA_CERT, init::RELAY_CA_CERT, init::SIGNING_PUB];

/// Where a rollover stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// One set of keys.
    Steady,
    /// New keys made and trusted alongside the old; the old sign.
    Overlap,
    /// The new files are being put in place (completed at start if cut short).
    Switching,
    /// The new keys sign; the old are still trusted.
    Switched,
}

/// `DIR/rotation.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotation {
    pub serial: u64,
    pub phase: Phase,
}

/// Why the trust material could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(transparent)]
    Init(#[from] InitError),
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// The step asked for does not follow the current one.
    #[error("{0}")]
    Step(String),
    /// The database (where a cluster's nodes share the material) failed.
    #[error("the trust material in the database: {0}")]
    Journal(#[from] tether_shared::journal::JournalError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrustError + '_ {
    move |e| TrustError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn read(path: &Path) -> Result<String, TrustError> {
    fs::read_to_string(path).map_err(io_err(path))
}

/// Everything signing and certifying reads, for one step of a rollover.
struct Live {
    rotation: Rotation,
    signing: Arc<Identity>,
    signing_cert_pem: String,
    relay_ca: Arc<Ca>,
    set: TrustSet,
    /// The server CA(s) operators' clients should trust now: the old and the new while both
    /// may be served.
    operator_ca_pem: String,
}

/// The server's trust material; share as `Arc<Trust>`.
pub struct Trust {
    dir: PathBuf,
    live: RwLock<Arc<Live>>,
    /// One step at a time.
    stepping: tokio::sync::Mutex<()>,
    /// On a cluster: where the nodes share the material, and what seals its private keys.
    sharing: OnceLock<Sharing>,
    /// On the active node of a cluster: the record in the database was found sealed with a
    /// key of the ring other than the one that seals now, and not sealed again yet (counted
    /// with the stale secrets: the older key may not be retired while it is).
    record_stale: std::sync::atomic::AtomicBool,
}

struct Sharing {
    journal: tether_shared::journal::JournalHandle,
    keys: Arc<crate::secrets::KeyRing>,
}

impl Trust {
    /// Reads the material of `dir` (making the relay CA and the signing certificate of a
    /// directory that predates them), completes a switch cut short, and writes `agent-ca.pem`
    /// if it is not the trust set's bundle.
    pub fn load(dir: &Path) -> Result<Trust, TrustError> {
        // A cluster's step taken from the database, cut short.
        cluster::complete_adoption(dir)?;
        init::ensure_relay_ca(dir)?;
        let mut rotation = read_rotation(dir)?;
        match rotation.phase {
            Phase::Switching => {
                complete_switch(dir)?;
                rotation.phase = Phase::Switched;
                write_rotation(dir, rotation)?;
            }
            Phase::Steady => {
                // A begin or a finish cut short: what it left is not trusted.
                remove_dir(&dir.join(NEXT_DIR))?;
                remove_dir(&dir.join(PREVIOUS_DIR))?;
            }
            Phase::Overlap | Phase::Switched => {}
        }
        let live = build(dir, rotation)?;
        write_bundle(dir, &live.set.ca_pem)?;
        Ok(Trust {
            dir: dir.to_path_buf(),
            live: RwLock::new(Arc::new(live)),
            stepping: tokio::sync::Mutex::new(()),
            sharing: OnceLock::new(),
            record_stale: Default::default(),
        })
    }

    /// On a cluster: the nodes share the material through `journal`, its private keys sealed
    /// with `keys` (see [`cluster`]).
    pub fn share_through(
        &self,
        journal: tether_shared::journal::JournalHandle,
        keys: Arc<crate::secrets::KeyRing>,
    ) {
        let _ = self.sharing.set(Sharing { journal, keys });
    }

    /// Takes the step the active node published, if it is later than this node's, into this
    /// node's directory, and serves it (a node that is not the active one, or is about to be).
    /// Answers the rotation taken, if one was. Blocking: it reads the database. A step under
    /// way here makes it wait for a later call.
    pub fn adopt(&self) -> Result<Option<Rotation>, TrustError> {
        let Some(sharing) = self.sharing.get() else {
            return Ok(None);
        };
        let Some(stored) = sharing.journal.get_meta(cluster::PUBLISHED)? else {
            return Ok(None);
        };
        let published = cluster::Published::open(&stored, &sharing.keys)?;
        let Ok(_one) = self.stepping.try_lock() else {
            return Ok(None);
        };
        self.take(&published)
    }

    /// Takes `published` if it is a later step than this node's (under `stepping`).
    fn take(&self, published: &cluster::Published) -> Result<Option<Rotation>, TrustError> {
        if cluster::order(published.rotation) <= cluster::order(self.rotation()) {
            return Ok(None);
        }
        published.adopt_into(&self.dir)?;
        self.step(published.rotation)?;
        tracing::warn!(
            serial = published.rotation.serial,
            phase = phase_name(published.rotation.phase),
            "trust-step-taken-from-the-active-node"
        );
        Ok(Some(published.rotation))
    }

    /// How many secrets the cluster's trust record holds that are not sealed with the ring's
    /// newest key (0 or 1): found so by [`Trust::publish`], which seals it again.
    pub fn stale_secrets(&self) -> u64 {
        u64::from(self.record_stale.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// On the active node of a cluster: makes sure the database holds this node's step for the
    /// others (at start, and before each step: a share that failed is made again). A later
    /// step there (this node died between writing it and taking it, or missed it) is taken
    /// here first. Refused if the database does not answer within [`READ_TIMEOUT`], or holds a
    /// record this node's key ring does not open (another cluster's, or the ring differs). A
    /// record that is not a sealed one at all is replaced.
    pub async fn publish(self: &Arc<Self>) -> Result<(), TrustError> {
        let Some(sharing) = self.sharing.get() else {
            return Ok(());
        };
        let _one = self.stepping.lock().await;
        let journal = sharing.journal.clone();
        let read = actix_web::web::block(move || journal.get_meta(cluster::PUBLISHED));
        let stored = match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(Ok(stored)) => stored?,
            Ok(Err(e)) => return Err(TrustError::Step(e.to_string())),
            Err(_) => {
                return Err(TrustError::Step(format!(
                    "the database did not answer within {READ_TIMEOUT:?}; try again"
                )))
            }
        };
        if let Some(stored) = stored {
            let text = String::from_utf8_lossy(&stored);
            if crate::secrets::KeyRing::is_sealed(&text) {
                let published = cluster::Published::open(&stored, &sharing.keys)
                    .map_err(|e| TrustError::Step(e.to_string()))?;
                // (Files written and synced: not on this thread.)
                let me = self.clone();
                let published =
                    actix_web::web::block(move || me.take(&published).map(|_| published))
                        .await
                        .map_err(|e| TrustError::Step(e.to_string()))??;
                // Sealed again with the ring's newest key once it changed.
                let current = sharing.keys.is_current(&text);
                self.record_stale
                    .store(!current, std::sync::atomic::Ordering::Relaxed);
                let same = cluster::order(published.rotation) == cluster::order(self.rotation());
                if same && current {
                    return Ok(());
                }
            } else {
                tracing::warn!("trust-record-unreadable-replaced");
            }
        }
        self.share(
            sharing,
            &cluster::Published::read(&self.dir, self.rotation())?,
        )
        .await
    }

    /// Writes `record` (the step about to be taken here) for the other nodes. Waits for the
    /// database however long it takes: a commit once asked for may land later, so giving up on
    /// it would leave the database with a step this node does not know it took.
    async fn share(
        &self,
        sharing: &Sharing,
        record: &cluster::Published,
    ) -> Result<(), TrustError> {
        let value = record.seal(&sharing.keys)?;
        let commit = sharing
            .journal
            .commit(vec![tether_shared::journal::Op::PutMeta {
                key: cluster::PUBLISHED.to_owned(),
                value,
            }]);
        commit.await?;
        self.record_stale
            .store(false, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            serial = record.rotation.serial,
            phase = phase_name(record.rotation.phase),
            "trust-published-for-the-other-nodes"
        );
        Ok(())
    }

    /// On a cluster: `record` (the step about to be taken) for the other nodes, first.
    async fn share_first(
        &self,
        record: impl FnOnce() -> Result<cluster::Published, TrustError>,
    ) -> Result<(), TrustError> {
        match self.sharing.get() {
            Some(sharing) => self.share(sharing, &record()?).await,
            None => Ok(()),
        }
    }

    fn live(&self) -> Arc<Live> {
        self.live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Signs `message` with the command-signing key in force (base64).
    pub fn sign(&self, message: &[u8]) -> String {
        self.live().signing.sign(message)
    }

    /// The command-signing key in force (the end-to-end handshake signs with it).
    pub fn signer(&self) -> Arc<Identity> {
        self.live().signing.clone()
    }

    /// What enrollment hands out: the signing key (base64) and its certificate.
    pub fn enrollment_key(&self) -> (String, String) {
        let live = self.live();
        (live.signing.public_key_b64(), live.signing_cert_pem.clone())
    }

    /// The relay CA in force: it issues relays' certificates.
    pub fn relay_ca(&self) -> Arc<Ca> {
        self.live().relay_ca.clone()
    }

    /// The server CA(s) operators' clients should trust now (`ca.pem`, and during a rollover
    /// the other set's too).
    pub fn operator_ca_pem(&self) -> String {
        self.live().operator_ca_pem.clone()
    }

    /// What agents and relays should trust now.
    pub fn set(&self) -> TrustSet {
        self.live().set.clone()
    }

    pub fn rotation(&self) -> Rotation {
        self.live().rotation
    }

    /// Step 1: new keys in `next/`, trusted alongside the old (serial + 1).
    pub async fn begin(&self) -> Result<Rotation, TrustError> {
        let _one = self.stepping.lock().await;
        let current = self.rotation();
        if current.phase != Phase::Steady {
            return Err(TrustError::Step(format!(
                "a rollover is already under way ({}); finish it first",
                phase_name(current.phase)
            )));
        }
        let next = self.dir.join(NEXT_DIR);
        remove_dir(&next)?;
        fs::create_dir(&next).map_err(io_err(&next))?;
        make_keys(&next)?;
        let rotation = Rotation {
            serial: current.serial + 1,
            phase: Phase::Overlap,
        };
        if let Err(e) = self
            .share_first(|| cluster::Published::read(&self.dir, rotation))
            .await
        {
            remove_dir(&next)?;
            return Err(e);
        }
        self.step(rotation)
    }

    /// Step 2: the new keys sign and certify; the old stay trusted.
    pub async fn switch(&self) -> Result<Rotation, TrustError> {
        let _one = self.stepping.lock().await;
        let current = self.rotation();
        if current.phase != Phase::Overlap {
            return Err(TrustError::Step(format!(
                "nothing to switch to ({}); begin a rollover first",
                phase_name(current.phase)
            )));
        }
        let switched = Rotation {
            serial: current.serial,
            phase: Phase::Switched,
        };
        self.share_first(|| cluster::Published::switched(&self.dir, switched))
            .await?;
        let previous = self.dir.join(PREVIOUS_DIR);
        remove_dir(&previous)?;
        fs::create_dir(&previous).map_err(io_err(&previous))?;
        for name in KEPT {
            copy(&self.dir.join(name), &previous.join(name), false)?;
        }
        let switching = Rotation {
            serial: current.serial,
            phase: Phase::Switching,
        };
        write_rotation(&self.dir, switching)?;
        complete_switch(&self.dir)?;
        self.step(switched)
    }

    /// Step 3: the new keys alone are trusted (serial + 1).
    pub async fn finish(&self) -> Result<Rotation, TrustError> {
        let _one = self.stepping.lock().await;
        let current = self.rotation();
        if current.phase != Phase::Switched {
            return Err(TrustError::Step(format!(
                "nothing to finish ({}); switch first",
                phase_name(current.phase)
            )));
        }
        let steady = Rotation {
            serial: current.serial + 1,
            phase: Phase::Steady,
        };
        self.share_first(|| cluster::Published::read(&self.dir, steady))
            .await?;
        let rotation = self.step(steady)?;
        remove_dir(&self.dir.join(PREVIOUS_DIR))?;
        Ok(rotation)
    }

    /// Records `rotation`, then serves the material it names.
    fn step(&self, rotation: Rotation) -> Result<Rotation, TrustError> {
        let live = build(&self.dir, rotation)?;
        write_rotation(&self.dir, rotation)?;
        write_bundle(&self.dir, &live.set.ca_pem)?;
        tracing::warn!(
            serial = rotation.serial,
            phase = phase_name(rotation.phase),
            keys = live.set.signing_keys.len(),
            "trust-rollover-step"
        );
        *self.live.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(live);
        Ok(rotation)
    }
}

pub fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Steady => "steady",
        Phase::Overlap => "overlap",
        Phase::Switching => "switching",
        Phase::Switched => "switched",
    }
}

fn read_rotation(dir: &Path) -> Result<Rotation, TrustError> {
    let path = dir.join(ROTATION_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| TrustError::File {
            path,
            reason: format!("not a rotation file: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Rotation {
            serial: 0,
            phase: Phase::Steady,
        }),
        Err(e) => Err(io_err(&path)(e)),
    }
}

fn write_rotation(dir: &Path, rotation: Rotation) -> Result<(), TrustError> {
    let path = dir.join(ROTATION_FILE);
    let json = serde_json::to_vec_pretty(&rotation).map_err(|e| TrustError::File {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    write_file_atomic(&path, &json, 0o644).map_err(io_err(&path))
}

fn write_bundle(dir: &Path, bundle: &str) -> Result<(), TrustError> {
    let path = dir.join(init::AGENT_CA);
    if fs::read_to_string(&path).ok().as_deref() == Some(bundle) {
        return Ok(());
    }
    write_file_atomic(&path, bundle.as_bytes(), 0o644).map_err(io_err(&path))
}

fn remove_dir(path: &Path) -> Result<(), TrustError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

fn copy(from: &Path, to: &Path, secret: bool) -> Result<(), TrustError> {
    let bytes = fs::read(from).map_err(io_err(from))?;
    let written = if secret {
        write_private_file(to, &bytes)
    } else {
        write_file_atomic(to, &bytes, 0o644)
    };
    written.map_err(io_err(to))
}

/// A new server CA, relay CA and signing key (with its certificate) in `dir`.
fn make_keys(dir: &Path) -> Result<(), TrustError> {
    let id = hex::encode(rand::random::<[u8; 4]>());
    let ca = Ca::generate(&format!("Tether CA {id}")).map_err(InitError::from)?;
    let relay_ca = Ca::generate(&format!("Tether relay CA {id}")).map_err(InitError::from)?;
    let signing = Identity::generate();
    let signing_cert = ca
        .issue_signing_cert(&signing.public_key().to_bytes())
        .map_err(InitError::from)?;
    let files: [(&str, &str, bool); 6] = [
        (init::CA_KEY, &ca.key_pem(), true),
        (init::CA_CERT, ca.cert_pem(), false),
        (init::RELAY_CA_KEY, &relay_ca.key_pem(), true),
        (init::RELAY_CA_CERT, relay_ca.cert_pem(), false),
        (init::SIGNING_CERT, &signing_cert, false),
        (
            init::SIGNING_PUB,
            &format!("{}\n", signing.public_key_b64()),
            false,
        ),
    ];
    for (name, contents, secret) in files {
        let path = dir.join(name);
        let mode = if secret { 0o600 } else { 0o644 };
        write_file_atomic(&path, contents.as_bytes(), mode).map_err(io_err(&path))?;
    }
    signing
        .save(&dir.join(init::SIGNING_KEY))
        .map_err(InitError::from)?;
    Ok(())
}

/// The new files (`next/`) take the usual names and the server's certificate is issued again
/// from the new CA; `next/` is removed last. Repeatable: a start after a crash runs it again.
fn complete_switch(dir: &Path) -> Result<(), TrustError> {
    let next = dir.join(NEXT_DIR);
    if next.exists() {
        for (name, secret) in ROTATED {
            copy(&next.join(name), &dir.join(name), secret)?;
        }
        init::renew_server_cert(dir, &[])?;
        remove_dir(&next)?;
    }
    Ok(())
}

/// The material `rotation` names: the keys in `dir`, and the other set's public halves
/// (`next/` while overlapping, `previous/` once switched) trusted alongside.
fn build(dir: &Path, rotation: Rotation) -> Result<Live, TrustError> {
    let signing = Identity::load(&dir.join(init::SIGNING_KEY)).map_err(InitError::from)?;
    let signing_cert_pem = init::ensure_signing_cert(dir, &signing)?;
    let relay_ca = Ca::from_pem(
        &read(&dir.join(init::RELAY_CA_CERT))?,
        &read(&dir.join(init::RELAY_CA_KEY))?,
    )
    .map_err(InitError::from)?;
    let mut signing_keys = vec![signing.public_key_b64()];
    let server_ca = read(&dir.join(init::CA_CERT))?;
    let mut ca_pem = init::agent_bundle(&server_ca, relay_ca.cert_pem());
    let mut operator_ca_pem = server_ca.trim_end().to_owned() + "\n";
    let other = match rotation.phase {
        Phase::Overlap => Some(dir.join(NEXT_DIR)),
        Phase::Switched | Phase::Switching => Some(dir.join(PREVIOUS_DIR)),
        Phase::Steady => None,
    };
    if let Some(other) = other {
        signing_keys.push(read(&other.join(init::SIGNING_PUB))?.trim().to_owned());
        let other_ca = read(&other.join(init::CA_CERT))?;
        ca_pem.push_str(&init::agent_bundle(
            &other_ca,
            &read(&other.join(init::RELAY_CA_CERT))?,
        ));
        operator_ca_pem.push_str(other_ca.trim_end());
        operator_ca_pem.push('\n');
    }
    Ok(Live {
        rotation,
        signing: Arc::new(signing),
        signing_cert_pem,
        relay_ca: Arc::new(relay_ca),
        set: TrustSet {
            serial: rotation.serial,
            signing_keys,
            ca_pem,
        },
        operator_ca_pem,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use tether_shared::identity::PublicKey;
    use tether_shared::tls;

    fn initialized() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        init::initialize(&init::InitOptions {
            data_dir: dir.path().join("d"),
            hostnames: vec!["localhost".into()],
            force: false,
        })
        .unwrap();
        dir
    }

    fn verifies(set: &TrustSet, signer: &Identity) -> bool {
        let sig = signer.sign(b"m");
        set.signing_keys
            .iter()
            .any(|k| PublicKey::from_b64(k).unwrap().verify(b"m", &sig).is_ok())
    }

    #[actix_rt::test]
    async fn a_rollover_trusts_both_then_the_new_alone_and_survives_restarts() {
        let tmp = initialized();
        let dir = tmp.path().join("d");
        let trust = Trust::load(&dir).unwrap();
        let old = trust.signer();
        let old_server_cert = read(&dir.join(init::SERVER_CERT)).unwrap();
        let old_ca = read(&dir.join(init::CA_CERT)).unwrap();
        assert_eq!(trust.set().serial, 0);
        assert_eq!(trust.set().signing_keys.len(), 1);

        // Nothing to switch or finish yet.
        assert!(matches!(trust.switch().await, Err(TrustError::Step(_))));
        assert!(matches!(trust.finish().await, Err(TrustError::Step(_))));

        let begun = trust.begin().await.unwrap();
        assert_eq!((begun.serial, begun.phase), (1, Phase::Overlap));
        let overlap = trust.set();
        assert_eq!(overlap.signing_keys.len(), 2);
        // The old key still signs; both are trusted; the bundle holds four CAs.
        assert_eq!(trust.signer().public_key_b64(), old.public_key_b64());
        assert_eq!(overlap.ca_pem.matches("BEGIN CERTIFICATE").count(), 4);
        assert_eq!(read(&dir.join(init::AGENT_CA)).unwrap(), overlap.ca_pem);
        assert!(matches!(trust.begin().await, Err(TrustError::Step(_))));
        // A restart in the overlap serves the same.
        assert_eq!(Trust::load(&dir).unwrap().set(), overlap);

        let switched = trust.switch().await.unwrap();
        assert_eq!((switched.serial, switched.phase), (1, Phase::Switched));
        let new = trust.signer();
        assert_ne!(new.public_key_b64(), old.public_key_b64());
        assert!(verifies(&trust.set(), &new) && verifies(&trust.set(), &old));
        // The server's certificate now comes from the new CA, for the same names.
        let server_cert = read(&dir.join(init::SERVER_CERT)).unwrap();
        let new_ca = read(&dir.join(init::CA_CERT)).unwrap();
        assert_ne!(server_cert, old_server_cert);
        assert!(tls::issued_by(&server_cert, &new_ca));
        assert!(!tls::issued_by(&server_cert, &old_ca));
        assert_eq!(
            tls::certificate_names(&server_cert).unwrap(),
            vec!["localhost".to_owned()]
        );
        // Enrollment hands out the new key, certified by the new CA.
        let (key, cert) = trust.enrollment_key();
        assert_eq!(key, new.public_key_b64());
        tls::verify_signing_cert(&cert, &new_ca, &new.public_key().to_bytes()).unwrap();
        assert_eq!(
            Trust::load(&dir).unwrap().signer().public_key_b64(),
            new.public_key_b64()
        );

        let finished = trust.finish().await.unwrap();
        assert_eq!((finished.serial, finished.phase), (2, Phase::Steady));
        let last = trust.set();
        assert!(verifies(&last, &new) && !verifies(&last, &old));
        assert!(!last.ca_pem.contains(old_ca.trim()));
        assert!(!dir.join(PREVIOUS_DIR).exists());
        assert_eq!(Trust::load(&dir).unwrap().set(), last);
    }

    #[actix_rt::test]
    async fn a_switch_cut_short_is_completed_at_start() {
        let tmp = initialized();
        let dir = tmp.path().join("d");
        let trust = Trust::load(&dir).unwrap();
        trust.begin().await.unwrap();
        let next_key = read(&dir.join(NEXT_DIR).join(init::SIGNING_PUB)).unwrap();
        // As if the process died right after recording the switch: public halves kept,
        // nothing copied yet.
        let previous = dir.join(PREVIOUS_DIR);
        fs::create_dir(&previous).unwrap();
        for name in KEPT {
            copy(&dir.join(name), &previous.join(name), false).unwrap();
        }
        write_rotation(
            &dir,
            Rotation {
                serial: 1,
                phase: Phase::Switching,
            },
        )
        .unwrap();
        let again = Trust::load(&dir).unwrap();
        assert_eq!(again.rotation().phase, Phase::Switched);
        assert_eq!(again.signer().public_key_b64(), next_key.trim());
        assert_eq!(again.set().signing_keys.len(), 2);
        assert!(!dir.join(NEXT_DIR).exists());
    }

    #[actix_rt::test]
    async fn a_begin_cut_short_leaves_nothing_trusted() {
        let tmp = initialized();
        let dir = tmp.path().join("d");
        let trust = Trust::load(&dir).unwrap();
        let next = dir.join(NEXT_DIR);
        fs::create_dir(&next).unwrap();
        make_keys(&next).unwrap();
        // rotation.json was never written: still steady.
        let again = Trust::load(&dir).unwrap();
        assert_eq!(again.set(), trust.set());
        assert!(!next.exists());
    }
}
