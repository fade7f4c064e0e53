//! Safe extraction of `.tar.gz` and `.zip` archives into a destination directory: the one place
//! where bytes from an artifact or a plugin bundle become files on an agent.
//!
//! Every entry is checked by us before anything is written; the `tar` and `zip` crates only
//! parse. The policy, kept deliberately small:
//!
//! - entry paths are normalized and must stay inside the destination: absolute paths, `..`,
//!   backslashes, Windows drive prefixes, NUL bytes and non-UTF-8 names are refused; `./`
//!   prefixes are fine, and a directory entry `./` (what `tar -czf a.tar.gz -C dir .` writes
//!   first) is the destination itself;
//! - symbolic links and hard links are refused (naming the entry), and so are devices, FIFOs,
//!   sockets and every other special entry;
//! - a file entry whose name was already extracted is refused (duplicates could otherwise
//!   overwrite earlier content);
//! - only the permission bits `0o777` are kept (setuid, setgid and sticky are stripped);
//! - the entry count and the total expanded size are capped ([`Limits`]), the latter also
//!   relative to the archive's size (compression bombs);
//! - extraction goes to a fresh temporary directory next to the destination, created by us,
//!   files opened with `O_CREAT|O_EXCL` (never following a link); only a complete extraction
//!   is renamed into place, and the temporary directory is removed on any failure, so the
//!   destination is either the whole archive or untouched.
//!
//! An existing destination directory is replaced: it is renamed aside, the new tree renamed in,
//! and the old one removed. A destination that is a symbolic link or a file is refused.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use rand::RngCore;

/// Default cap on entries (files and directories) of one archive.
pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;
/// Default cap on the total expanded size.
pub const DEFAULT_MAX_TOTAL_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// Default cap on expanded size per archive byte (on top of [`DEFAULT_RATIO_ALLOWANCE`]).
pub const DEFAULT_MAX_RATIO: u64 = 100;
/// Expanded bytes always allowed whatever the ratio (small archives of text compress well).
pub const DEFAULT_RATIO_ALLOWANCE: u64 = 16 * 1024 * 1024;

/// Bounds of one extraction.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most entries (files and directories).
    pub max_entries: u64,
    /// Most expanded bytes in total.
    pub max_total_bytes: u64,
    /// Most expanded bytes per byte of archive, beyond `ratio_allowance`.
    pub max_ratio: u64,
    /// Expanded bytes allowed regardless of the ratio.
    pub ratio_allowance: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_total_bytes: DEFAULT_MAX_TOTAL_BYTES,
            max_ratio: DEFAULT_MAX_RATIO,
            ratio_allowance: DEFAULT_RATIO_ALLOWANCE,
        }
    }
}

impl Limits {
    /// The expanded-size cap for an archive of `archive_len` bytes.
    fn total_cap(&self, archive_len: u64) -> u64 {
        let by_ratio = archive_len
            .saturating_mul(self.max_ratio)
            .saturating_add(self.ratio_allowance);
        self.max_total_bytes.min(by_ratio)
    }
}

/// Archive formats, told apart by their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// gzip-compressed tar.
    TarGz,
    /// zip.
    Zip,
}

/// What an extraction produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    /// Files written.
    pub files: u64,
    /// Directories created.
    pub dirs: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Why an archive was not extracted (nothing was written to the destination).
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// Neither gzip nor zip.
    #[error("not a .tar.gz or .zip archive")]
    UnknownFormat,
    /// An entry's path could escape the destination or is unusable.
    #[error("entry {entry:?}: unsafe path: {reason}")]
    UnsafePath { entry: String, reason: &'static str },
    /// A symbolic or hard link entry.
    #[error("entry {entry:?}: {kind} entries are not allowed")]
    Link { entry: String, kind: &'static str },
    /// A device, FIFO or other special entry.
    #[error("entry {entry:?}: {kind} entries are not allowed")]
    Special { entry: String, kind: String },
    /// A file entry whose path was already extracted, or a file where a directory is needed.
    #[error("entry {entry:?}: duplicate or conflicting path")]
    Duplicate { entry: String },
    /// More entries than [`Limits::max_entries`].
    #[error("more than {max} entries")]
    TooManyEntries { max: u64 },
    /// More expanded bytes than allowed.
    #[error("expands to more than {max} bytes (compression bomb?)")]
    TooLarge { max: u64 },
    /// The destination is unusable (a link, a file, no parent).
    #[error("destination {}: {reason}", path.display())]
    Destination { path: PathBuf, reason: String },
    /// The archive is malformed.
    #[error("malformed archive: {0}")]
    Malformed(String),
    /// Reading the archive or writing the files failed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The format of the archive at `path`, from its magic bytes.
pub fn detect(path: &Path) -> Result<Format, UnpackError> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path).map_err(io_at(path))?;
    let n = f.read(&mut magic).map_err(io_at(path))?;
    match magic.get(..n).unwrap_or_default() {
        [0x1f, 0x8b, ..] => Ok(Format::TarGz),
        [b'P', b'K', 3, 4] | [b'P', b'K', 5, 6] => Ok(Format::Zip),
        _ => Err(UnpackError::UnknownFormat),
    }
}

/// Checks an entry name and returns it as a relative path of normal components.
pub fn safe_relative(raw: &[u8]) -> Result<PathBuf, UnpackError> {
    let shown = String::from_utf8_lossy(raw).into_owned();
    let bad = |reason| UnpackError::UnsafePath {
        entry: shown.clone(),
        reason,
    };
    if raw.contains(&0) {
        return Err(bad("NUL byte"));
    }
    let text = std::str::from_utf8(raw).map_err(|_| bad("not UTF-8"))?;
    if text.contains('\\') {
        return Err(bad("backslash (Windows separator)"));
    }
    if text.starts_with('/') {
        return Err(bad("absolute path"));
    }
    let bytes = text.as_bytes();
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return Err(bad("Windows drive prefix"));
    }
    let mut out = PathBuf::new();
    for comp in Path::new(text).components() {
        match comp {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err(bad("'..' component")),
            Component::RootDir | Component::Prefix(_) => return Err(bad("absolute path")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(bad("empty path"));
    }
    Ok(out)
}

/// A directory entry's path: as [`safe_relative`], except that `./` (or `.`), the archive's
/// root as GNU tar writes it, is the destination itself (an empty path).
fn safe_dir_relative(raw: &[u8]) -> Result<PathBuf, UnpackError> {
    match safe_relative(raw) {
        Err(UnpackError::UnsafePath {
            reason: "empty path",
            ..
        }) if !raw.is_empty() => Ok(PathBuf::new()),
        other => other,
    }
}

/// Extracts the archive at `archive` (format detected) into `dest`; see the module docs.
pub fn unpack(archive: &Path, dest: &Path, limits: &Limits) -> Result<Unpacked, UnpackError> {
    let format = detect(archive)?;
    let archive_len = fs::metadata(archive).map_err(io_at(archive))?.len();
    let staging = Staging::create(dest)?;
    let mut sink = Sink {
        root: staging.dir.clone(),
        limits: *limits,
        total_cap: limits.total_cap(archive_len),
        entries: 0,
        done: Unpacked {
            files: 0,
            dirs: 0,
            bytes: 0,
        },
        dir_modes: Vec::new(),
    };
    let file = File::open(archive).map_err(io_at(archive))?;
    match format {
        Format::TarGz => unpack_tar(BufReader::new(file), &mut sink)?,
        Format::Zip => unpack_zip(file, &mut sink)?,
    }
    sink.apply_dir_modes()?;
    staging.publish(dest)?;
    Ok(sink.done)
}

/// The temporary directory next to the destination; removed when dropped unless published.
struct Staging {
    dir: PathBuf,
    published: bool,
}

impl Staging {
    fn create(dest: &Path) -> Result<Staging, UnpackError> {
        let bad = |reason: &str| UnpackError::Destination {
            path: dest.to_path_buf(),
            reason: reason.to_owned(),
        };
        let name = dest
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| bad("has no usable final component"))?;
        if dest.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(bad("contains '..'"));
        }
        match fs::symlink_metadata(dest) {
            Ok(m) if m.file_type().is_symlink() => return Err(bad("is a symbolic link")),
            Ok(m) if !m.is_dir() => return Err(bad("exists and is not a directory")),
            _ => {}
        }
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(io_at(parent))?;
        let dir = parent.join(format!(".{name}.unpack-{:016x}", rand::random::<u64>()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_at(&dir))?;
        Ok(Staging {
            dir,
            published: false,
        })
    }

    /// Moves the extracted tree to `dest`, replacing an existing directory there.
    fn publish(mut self, dest: &Path) -> Result<(), UnpackError> {
        let mut old = None;
        if fs::symlink_metadata(dest).is_ok() {
            let aside = self
                .dir
                .with_extension(format!("old-{:016x}", rand::rngs::OsRng.next_u64()));
            fs::rename(dest, &aside).map_err(io_at(dest))?;
            old = Some(aside);
        }
        if let Err(e) = fs::rename(&self.dir, dest) {
            if let Some(aside) = &old {
                let _ = fs::rename(aside, dest);
            }
            return Err(io_at(dest)(e));
        }
        self.published = true;
        if let Some(parent) = dest.parent() {
            if let Ok(d) = File::open(parent) {
                let _ = d.sync_all();
            }
        }
        if let Some(aside) = old {
            if let Err(e) = fs::remove_dir_all(&aside) {
                tracing::warn!(path = %aside.display(), error = %e, "unpack-old-tree-not-removed");
            }
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Writes checked entries below `root`, counting against the limits.
struct Sink {
    root: PathBuf,
    limits: Limits,
    total_cap: u64,
    entries: u64,
    done: Unpacked,
    /// Directories and the modes to give them once everything inside is written.
    dir_modes: Vec<(PathBuf, u32)>,
}

impl Sink {
    fn count_entry(&mut self) -> Result<(), UnpackError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                max: self.limits.max_entries,
            });
        }
        Ok(())
    }

    /// Creates every directory of `rel` (relative, checked) below the root, refusing anything
    /// on the way that is not a directory we made.
    fn make_dirs(&mut self, rel: &Path, entry: &str) -> Result<PathBuf, UnpackError> {
        let mut at = self.root.clone();
        for comp in rel.components() {
            at.push(comp);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(UnpackError::Duplicate {
                        entry: entry.to_owned(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&at)
                        .map_err(io_at(&at))?;
                    self.done.dirs += 1;
                }
                Err(e) => return Err(io_at(&at)(e)),
            }
        }
        Ok(at)
    }

    fn dir(&mut self, rel: &Path, mode: Option<u32>, entry: &str) -> Result<(), UnpackError> {
        let at = self.make_dirs(rel, entry)?;
        if let Some(mode) = mode {
            self.dir_modes.push((at, (mode & 0o777) | 0o700));
        }
        Ok(())
    }

    fn file(
        &mut self,
        rel: &Path,
        mode: Option<u32>,
        entry: &str,
        mut data: impl Read,
    ) -> Result<(), UnpackError> {
        if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            self.make_dirs(parent, entry)?;
        }
        let at = self.root.join(rel);
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&at)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => UnpackError::Duplicate {
                    entry: entry.to_owned(),
                },
                _ => io_at(&at)(e),
            })?;
        let left = self.total_cap.saturating_sub(self.done.bytes);
        let copied = io::copy(&mut (&mut data).take(left.saturating_add(1)), &mut out).map_err(
            |e| match e.kind() {
                io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => {
                    UnpackError::Malformed(format!("entry {entry:?}: {e}"))
                }
                _ => io_at(&at)(e),
            },
        )?;
        if copied > left {
            return Err(UnpackError::TooLarge {
                max: self.total_cap,
            });
        }
        self.done.bytes += copied;
        out.flush().map_err(io_at(&at))?;
        let perm = mode.map_or(0o644, |m| m & 0o777);
        out.set_permissions(fs::Permissions::from_mode(perm))
            .map_err(io_at(&at))?;
        self.done.files += 1;
        Ok(())
    }

    fn apply_dir_modes(&mut self) -> Result<(), UnpackError> {
        for (dir, mode) in self.dir_modes.drain(..).rev() {
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).map_err(io_at(&dir))?;
        }
        Ok(())
    }
}

fn unpack_tar(reader: impl Read, sink: &mut Sink) -> Result<(), UnpackError> {
    use tar::EntryType;
    let gz = flate2::read::GzDecoder::new(reader);
    let mut archive = tar::Archive::new(gz);
    let malformed = |e: io::Error| UnpackError::Malformed(e.to_string());
    for entry in archive.entries().map_err(malformed)? {
        let entry = entry.map_err(malformed)?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().ok();
        match kind {
            EntryType::XGlobalHeader | EntryType::XHeader => continue,
            EntryType::Symlink => {
                return Err(UnpackError::Link {
                    entry: shown,
                    kind: "symbolic link",
                })
            }
            EntryType::Link => {
                return Err(UnpackError::Link {
                    entry: shown,
                    kind: "hard link",
                })
            }
            EntryType::Regular | EntryType::Continuous | EntryType::Directory => {}
            other => {
                let kind = match other {
                    EntryType::Char => "character device".to_owned(),
                    EntryType::Block => "block device".to_owned(),
                    EntryType::Fifo => "FIFO".to_owned(),
                    o => format!("{o:?}"),
                };
                return Err(UnpackError::Special { entry: shown, kind });
            }
        }
        sink.count_entry()?;
        if kind == EntryType::Directory {
            sink.dir(&safe_dir_relative(&raw)?, mode, &shown)?;
        } else {
            sink.file(&safe_relative(&raw)?, mode, &shown, entry)?;
        }
    }
    Ok(())
}

/// `S_IFMT` and the file types a zip entry's Unix mode may claim.
const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;

fn unpack_zip(file: File, sink: &mut Sink) -> Result<(), UnpackError> {
    let malformed = |e: zip::result::ZipError| UnpackError::Malformed(e.to_string());
    let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(malformed)?;
    if archive.len() as u64 > sink.limits.max_entries {
        return Err(UnpackError::TooManyEntries {
            max: sink.limits.max_entries,
        });
    }
    for i in 0..archive.len() {
        let entry = archive.by_index(i).map_err(malformed)?;
        let raw = entry.name_raw().to_vec();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let unix = entry.unix_mode();
        let file_type = unix.map(|m| m & S_IFMT).filter(|t| *t != 0);
        if entry.is_symlink() || file_type == Some(S_IFLNK) {
            return Err(UnpackError::Link {
                entry: shown,
                kind: "symbolic link",
            });
        }
        if let Some(t) = file_type.filter(|t| *t != S_IFREG && *t != S_IFDIR) {
            return Err(UnpackError::Special {
                entry: shown,
                kind: format!("special file (mode {t:o})"),
            });
        }
        sink.count_entry()?;
        if entry.is_dir() || file_type == Some(S_IFDIR) {
            sink.dir(&safe_dir_relative(&raw)?, unix, &shown)?;
        } else {
            sink.file(&safe_relative(&raw)?, unix, &shown, entry)?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
