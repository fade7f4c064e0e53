//! Harness for the end-to-end tests in `tests/tests/`: locating the workspace's built binaries
//! and running them with a clean, controlled environment.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Path of a workspace binary (`tether-server`, ...) in the same target profile directory as
/// the running test, i.e. `target/debug/<name>` for `cargo test`. Panics if it is missing:
/// the binaries must be built before the end-to-end tests run.
pub fn bin(name: &str) -> PathBuf {
    let profile_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().and_then(Path::parent).map(Path::to_path_buf))
        .unwrap_or_else(|| workspace_root().join("target/debug"));
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --workspace` first",
        path.display()
    );
    path
}

/// A command for binary `name` whose environment holds no `TETHER_` variables and whose config
/// dir is `config_dir`, so the host's `/etc/tether` and shell never leak into a test.
pub fn command(name: &str, config_dir: &Path) -> Command {
    let mut cmd = Command::new(bin(name));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TETHER_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("TETHER_CONFIG_DIR", config_dir);
    cmd
}

/// Runs `name` with `args` (see [`command`]) and returns its output.
pub fn run<I, S>(name: &str, config_dir: &Path, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    match command(name, config_dir).args(args).output() {
        Ok(output) => output,
        Err(e) => panic!("cannot start {name}: {e}"),
    }
}

/// Stdout of `output` as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Stderr of `output` as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
