//! Steps run as another user: the step property `run_as = "user[:group]"` (shell, file and
//! plugin steps). The agent decides, not the server: the user must be the agent's own or one
//! `agent.run_as_users` (agent.toml) lists, must exist here, and a group named must be the
//! user's primary group or one it is a member of. Anything else fails the step with the reason
//! before anything runs. An agent that is not root can run steps only as itself.
//!
//! Such a step runs with the user's uid and gid (and no supplementary groups: the standard
//! library drops them when it changes the uid), in its own directory
//! `agent.run_as_dir/<job>-<user>` (0700, the user's; the agent's data directory stays 0700
//! root), with `HOME`, `USER` and `LOGNAME` of that user. File steps run as `/bin/sh` with
//! fixed scripts and the paths as arguments, so the kernel checks what the user may touch.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Group, Uid, User};
use tether_shared::protocol::StepSpec;

/// The step property that names the user.
pub const PROPERTY: &str = "run_as";

/// Who the agent lets steps run as, and where their directories go.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Users besides the agent's own (`agent.run_as_users`).
    pub users: Vec<String>,
    /// Parent of the steps' directories (`agent.run_as_dir`).
    pub dir: PathBuf,
}

/// A user a step runs as, and its directory for the job.
#[derive(Debug, Clone, Default)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// `Policy::dir/<job>-<user>`, made by [`prepare`].
    pub dir: PathBuf,
}

/// Whom `spec` runs as: `None` for the agent's own user (no `run_as`, or itself), else the
/// user, checked against `policy`. `Err` says why it may not; nothing ran.
pub fn resolve(spec: &StepSpec, policy: &Policy, job_id: &str) -> Result<Option<RunAs>, String> {
    let Some(wanted) = spec.properties.get(PROPERTY).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let (name, group) = match wanted.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (wanted.as_str(), None),
    };
    let me = Uid::effective();
    let own = User::from_uid(me).ok().flatten().map(|u| u.name);
    let user = User::from_name(name)
        .map_err(|e| format!("run_as: cannot look up user {name:?}: {e}"))?
        .ok_or_else(|| format!("run_as: there is no user {name:?} on this machine"))?;
    let gid = match group {
        None => user.gid,
        Some(g) => {
            let group = Group::from_name(g)
                .map_err(|e| format!("run_as: cannot look up group {g:?}: {e}"))?
                .ok_or_else(|| format!("run_as: there is no group {g:?} on this machine"))?;
            if group.gid != user.gid && !group.mem.iter().any(|m| m == name) {
                return Err(format!(
                    "run_as: user {name:?} is not a member of group {g:?}"
                ));
            }
            group.gid
        }
    };
    let itself = user.uid == me && gid == nix::unistd::Gid::effective();
    if itself {
        return Ok(None);
    }
    let allowed = own.as_deref() == Some(name) || policy.users.iter().any(|u| u == name);
    if !allowed {
        let mut may: Vec<&str> = own.iter().map(String::as_str).collect();
        may.extend(policy.users.iter().map(String::as_str));
        return Err(format!(
            "run_as: this agent may not run steps as {name:?}: it may run them as {} \
             (agent.run_as_users in agent.toml)",
            may.join(", ")
        ));
    }
    if !me.is_root() {
        return Err(format!(
            "run_as: this agent runs as {}, not root: it can run steps only as itself",
            own.unwrap_or_else(|| me.to_string())
        ));
    }
    Ok(Some(RunAs {
        dir: policy.dir.join(format!("{job_id}-{name}")),
        user: name.to_owned(),
        uid: user.uid.as_raw(),
        gid: gid.as_raw(),
        home: user.dir,
    }))
}

/// Makes the step's directory: `Policy::dir` (0711, the agent's, refused if it is a link, is
/// someone else's or others may write it) and in it `<job>-<user>` (0700, the user's).
pub fn prepare(run_as: &RunAs) -> Result<(), String> {
    let fail = |what: &Path, e: &dyn std::fmt::Display| {
        format!("run_as: cannot prepare {}: {e}", what.display())
    };
    let parent = run_as.dir.parent().unwrap_or(Path::new("/"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(parent)
        .map_err(|e| fail(parent, &e))?;
    let meta = std::fs::symlink_metadata(parent).map_err(|e| fail(parent, &e))?;
    if !meta.is_dir() || meta.uid() != Uid::effective().as_raw() || meta.mode() & 0o022 != 0 {
        return Err(fail(
            parent,
            &"it must be a directory of the agent's user that no one else may write",
        ));
    }
    match std::fs::DirBuilder::new().mode(0o700).create(&run_as.dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(fail(&run_as.dir, &e)),
    }
    let meta = std::fs::symlink_metadata(&run_as.dir).map_err(|e| fail(&run_as.dir, &e))?;
    if !meta.is_dir() {
        return Err(fail(&run_as.dir, &"it is not a directory"));
    }
    std::os::unix::fs::lchown(&run_as.dir, Some(run_as.uid), Some(run_as.gid))
        .map_err(|e| fail(&run_as.dir, &e))?;
    std::fs::set_permissions(&run_as.dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| fail(&run_as.dir, &e))
}

/// Hands `path` (a file the agent wrote into the step's directory) to the user.
pub fn give(run_as: &RunAs, path: &Path) -> Result<(), String> {
    std::os::unix::fs::lchown(path, Some(run_as.uid), Some(run_as.gid))
        .map_err(|e| format!("run_as: cannot hand {} to the user: {e}", path.display()))
}

/// Copies the unpacked plugin bundle `from` into the step's directory, the user's, so that a
/// step run as that user can read and run it (the cache in the data directory is the agent's
/// alone). Bundles hold only directories and regular files (`tether_shared::unpack`).
pub fn copy_bundle(run_as: &RunAs, from: &Path) -> Result<PathBuf, String> {
    let to = run_as.dir.join("plugin");
    if to.exists() {
        std::fs::remove_dir_all(&to).map_err(|e| format!("run_as: {}: {e}", to.display()))?;
    }
    copy_tree(run_as, from, &to)?;
    Ok(to)
}

fn copy_tree(run_as: &RunAs, from: &Path, to: &Path) -> Result<(), String> {
    let fail =
        |p: &Path, e: std::io::Error| format!("run_as: copying the plugin, {}: {e}", p.display());
    std::fs::create_dir(to).map_err(|e| fail(to, e))?;
    give(run_as, to)?;
    for entry in std::fs::read_dir(from).map_err(|e| fail(from, e))? {
        let entry = entry.map_err(|e| fail(from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().map_err(|e| fail(&src, e))?;
        if kind.is_dir() {
            copy_tree(run_as, &src, &dst)?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst).map_err(|e| fail(&src, e))?;
            give(run_as, &dst)?;
        }
    }
    Ok(())
}

/// Removes the step directories of job `job_id` under `dir` (when the job's record goes).
pub fn remove_job_dirs(dir: &Path, job_id: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{job_id}-");
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(job_id = %job_id, dir = %e.path().display(), error = %err, "run-as-dir-not-removed");
            }
        }
    }
}

/// The fixed script of file step `op` run as a user, its arguments after it: the paths (and
/// mode), never spliced into the script. A write goes to a temporary file beside the target,
/// synced, then renamed over it.
pub fn file_script(op: &str) -> Option<&'static str> {
    Some(match op {
        // $1 target, $2 mode, $3 the content (a file of the step's directory).
        "write" => {
            "set -e; t=\"$(dirname -- \"$1\")/.$(basename -- \"$1\").tether-$$\"; \
             trap 'rm -f -- \"$t\"' EXIT; cat -- \"$3\" > \"$t\"; chmod -- \"$2\" \"$t\"; \
             sync -- \"$t\"; mv -f -- \"$t\" \"$1\"; trap - EXIT"
        }
        // $1 target.
        "delete" => "set -e; rm -f -- \"$1\"",
        // $1 from, $2 to.
        "copy" => {
            "set -e; t=\"$(dirname -- \"$2\")/.$(basename -- \"$2\").tether-$$\"; \
             trap 'rm -f -- \"$t\"' EXIT; cat -- \"$1\" > \"$t\"; chmod 0644 \"$t\"; \
             sync -- \"$t\"; mv -f -- \"$t\" \"$2\"; trap - EXIT"
        }
        _ => return None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tether_shared::protocol::OnInterrupt;

    fn spec(run_as: &str) -> StepSpec {
        StepSpec {
            name: "s".into(),
            plugin: "shell".into(),
            step: "run".into(),
            properties: BTreeMap::from([(PROPERTY.to_owned(), run_as.to_owned())]),
            secrets: vec![],
            on_interrupt: OnInterrupt::Fail,
            timeout_ms: 1000,
            bundle: None,
            sealed: None,
        }
    }

    #[test]
    fn users_are_checked_before_anything_runs() {
        let policy = Policy {
            users: vec!["nobody".into()],
            dir: std::env::temp_dir().join("tether-run-as-unit"),
        };
        let own = User::from_uid(Uid::effective()).unwrap().unwrap().name;
        assert!(resolve(&spec(""), &policy, "j").unwrap().is_none());
        assert!(
            resolve(&spec(&own), &policy, "j").unwrap().is_none(),
            "itself"
        );
        let e = resolve(&spec("no-such-user-here"), &policy, "j").unwrap_err();
        assert!(e.contains("no user"), "{e}");
        let e = resolve(&spec("nobody:no-such-group"), &policy, "j").unwrap_err();
        assert!(e.contains("no group"), "{e}");
        if Uid::effective().is_root() {
            let ra = resolve(&spec("nobody"), &policy, "j1").unwrap().unwrap();
            assert_eq!(ra.user, "nobody");
            assert!(ra.dir.ends_with("j1-nobody"));
            // root is not listed: refused (the agent runs as root here, so "root" is itself).
            let e = resolve(&spec("daemon"), &policy, "j").unwrap_err();
            assert!(e.contains("may not run steps as \"daemon\""), "{e}");
            // A group the user is not in.
            let e = resolve(&spec("nobody:root"), &policy, "j").unwrap_err();
            assert!(e.contains("not a member"), "{e}");
        }
    }
}
