//! Whether the disk under a data directory takes writes, and starting the process over once it
//! does again.
//!
//! A journal that failed a write (a full disk) is poisoned: sled keeps its I/O error, and
//! nothing more is acknowledged. The process keeps serving what it can; a watcher calls
//! [`takes_writes`] now and then and, once space is back, the process starts over from what
//! is durable ([`restart_in_place`] for the server, a worker exit for the agent's monitor).

use std::io::Write;
use std::path::Path;

/// Free space a disk must have again before the process starts over.
pub const MIN_FREE_BYTES: u64 = 16 * 1024 * 1024;
/// Bytes written (and synced, then removed) to prove the disk takes writes.
const PROBE_BYTES: usize = 1024 * 1024;
const PROBE_FILE: &str = ".storage-probe";

/// Bytes available to this process on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(s.blocks_available().saturating_mul(s.fragment_size()))
}

/// `Ok` if `dir`'s filesystem has [`MIN_FREE_BYTES`] free and a probe file can be written,
/// synced and removed there; else why not.
pub fn takes_writes(dir: &Path) -> Result<(), String> {
    let free = free_bytes(dir).map_err(|e| format!("cannot read free space: {e}"))?;
    if free < MIN_FREE_BYTES {
        return Err(format!("{free} bytes free, waiting for {MIN_FREE_BYTES}"));
    }
    let path = dir.join(PROBE_FILE);
    let probe = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&vec![0u8; PROBE_BYTES])?;
        f.sync_all()
    };
    let written = probe();
    let _ = std::fs::remove_file(&path);
    written.map_err(|e| format!("a probe write failed: {e}"))
}

/// Replaces this process with a fresh run of the same binary, arguments and environment (the
/// PID stays; listeners and files close on exec). Returns only if that failed.
pub fn restart_in_place() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return e,
    };
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    std::process::Command::new(exe).args(args).exec()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_roomy_directory_takes_writes_and_keeps_no_probe() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert_eq!(takes_writes(dir.path()), Ok(()));
        assert!(!dir.path().join(PROBE_FILE).exists());
        assert!(takes_writes(&dir.path().join("missing")).is_err());
    }
}
