//! Where the sled store's database lives inside the journal's directory, one generation at a
//! time, so that it can be compacted (copied whole into a fresh database) and swapped
//! atomically.
//!
//! - `DIR/CURRENT` names the live generation (`sled.N`), replaced atomically (written to a
//!   temporary file, synced, renamed, directory synced). Whatever it names is the journal.
//! - `DIR/sled.N/` holds that generation's sled files.
//! - A journal written before generations existed has its sled files at the top of `DIR` and
//!   no `CURRENT`: it is opened where it is and moves into `sled.1` at its first compaction.
//!
//! At open, every generation `CURRENT` does not name (a compaction cut short, or the one a
//! finished compaction replaced) is removed, and so are top-level sled files once `CURRENT`
//! exists.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::journal::JournalError;

/// The file naming the live generation.
pub const CURRENT_FILE: &str = "CURRENT";
const PREFIX: &str = "sled.";
/// The files sled 0.34 keeps in its directory (besides `snap.*` snapshots).
const SLED_FILES: &[&str] = &["db", "conf", "blobs"];

fn io_err(context: &str, path: &Path, e: std::io::Error) -> JournalError {
    JournalError::Io {
        context: format!("{context} {}", path.display()),
        reason: e.to_string(),
    }
}

/// Which sled database the journal in `dir` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Sled's files at the top of the journal's directory (written before generations).
    TopLevel,
    /// `sled.N`.
    Generation(u64),
}

impl Layout {
    pub(crate) fn path(self, dir: &Path) -> PathBuf {
        match self {
            Layout::TopLevel => dir.to_owned(),
            Layout::Generation(n) => dir.join(format!("{PREFIX}{n}")),
        }
    }

    /// The generation a compaction of this one writes.
    pub(crate) fn next(self) -> Layout {
        match self {
            Layout::TopLevel => Layout::Generation(1),
            Layout::Generation(n) => Layout::Generation(n.saturating_add(1)),
        }
    }
}

/// The live layout of the journal in `dir`; `None` for a journal that does not exist yet.
pub(crate) fn current(dir: &Path) -> Result<Option<Layout>, JournalError> {
    let path = dir.join(CURRENT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let name = text.trim();
            let n = name
                .strip_prefix(PREFIX)
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| {
                    JournalError::cannot_open(
                        dir,
                        format!("{CURRENT_FILE} names {name:?}, not a generation ({PREFIX}N)"),
                    )
                })?;
            let layout = Layout::Generation(n);
            if !layout.path(dir).join("db").is_file() {
                return Err(JournalError::cannot_open(
                    dir,
                    format!("{CURRENT_FILE} names {name}, which holds no database"),
                ));
            }
            Ok(Some(layout))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join("db").is_file() {
                return Ok(Some(Layout::TopLevel));
            }
            // A new journal publishes `CURRENT` before it writes its marker, and only
            // `sled.0` can precede it: anything else means `CURRENT` was lost, and starting
            // empty (removing the generations) would lose the journal.
            let marker = dir.join(super::MARKER_FILE).exists();
            let later = std::fs::read_dir(dir)
                .map_err(|e| io_err("cannot list", dir, e))?
                .filter_map(Result::ok)
                .any(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with(PREFIX) && name.as_ref() != "sled.0"
                });
            if marker || later {
                return Err(JournalError::cannot_open(
                    dir,
                    format!(
                        "{CURRENT_FILE} is missing, so which database is the journal is unknown"
                    ),
                ));
            }
            Ok(None)
        }
        Err(e) => Err(io_err("cannot read", &path, e)),
    }
}

/// The path of sled's data file of the journal in `dir` (for tools and tests that look at it).
pub fn data_file(dir: &Path) -> Result<PathBuf, JournalError> {
    let layout = current(dir)?.unwrap_or(Layout::TopLevel);
    Ok(layout.path(dir).join("db"))
}

/// Make `layout` the live one, durably: from the moment this returns, a restart opens it.
pub(crate) fn publish(dir: &Path, layout: Layout) -> Result<(), JournalError> {
    let Layout::Generation(n) = layout else {
        return Ok(());
    };
    let path = dir.join(CURRENT_FILE);
    crate::identity::write_file_atomic(&path, format!("{PREFIX}{n}\n").as_bytes(), 0o600)
        .map_err(|e| io_err("cannot write", &path, e))
}

/// Remove every generation but `live`, sled files at the top level once `live` is a
/// generation, and temporary files left by an interrupted [`publish`].
pub(crate) fn remove_stale(dir: &Path, live: Layout) -> Result<(), JournalError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_err("cannot list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err("cannot list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let generation = name
            .strip_prefix(PREFIX)
            .and_then(|n| n.parse::<u64>().ok());
        let stale = match generation {
            Some(n) => live != Layout::Generation(n),
            None => {
                name.starts_with(&format!(".{CURRENT_FILE}.tmp-"))
                    || (live != Layout::TopLevel && is_sled_file(&name))
            }
        };
        if stale {
            remove(&entry.path())?;
        }
    }
    Ok(())
}

fn is_sled_file(name: &str) -> bool {
    SLED_FILES.contains(&name) || name.starts_with("snap.")
}

fn remove(path: &Path) -> Result<(), JournalError> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| io_err("cannot remove", path, e))
}

/// `fsync` every file under `path`, then `path` itself and the directories in it.
pub(crate) fn sync_tree(path: &Path) -> Result<(), JournalError> {
    let entries = std::fs::read_dir(path).map_err(|e| io_err("cannot list", path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err("cannot list", path, e))?;
        let p = entry.path();
        if entry
            .file_type()
            .map_err(|e| io_err("cannot stat", &p, e))?
            .is_dir()
        {
            sync_tree(&p)?;
        } else {
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_err("cannot fsync", &p, e))?;
        }
    }
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("cannot fsync", path, e))
}
