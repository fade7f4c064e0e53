//! Running one step: a child process (or a built-in file operation) with its own timeout,
//! environment, working directory, captured and masked output, and cancellation.
//!
//! - Secret property values arrive sealed for this agent (`tether_shared::sealing`): they are
//!   opened in memory when the step starts and never written anywhere by the agent.
//! - `shell/run`: the script goes to a 0600 file in the job's work directory, runs as
//!   `<interpreter> <file>` and is removed when the step ends (a script may hold a secret
//!   substituted into it; [`remove_scripts`] sweeps what a killed worker left); step properties reach it as environment variables
//!   `TETHER_PROP_<NAME>` (data, never spliced into the script); outputs of earlier steps as
//!   `TETHER_OUTPUT_<NAME>`. The environment is cleared first (the agent's own variables never
//!   leak in). The child leads its own process group, and a timeout or a cancel kills the whole
//!   group. A stdout line `::output name=value` sets an output property.
//! - `file/write`, `file/delete`, `file/copy`: done by the worker itself, refusing `..` and
//!   symbolic links at the target, writing atomically (temp file, fsync, rename).
//! - `artifact/fetch` and `http/request`: see `super::fetch` and `super::http`.
//!
//! Output is handed over in chunks (see `super::capture`: at most 16 KiB, or whatever arrived
//! within [`CHUNK_WAIT`]) with every secret value replaced by `***`, and capped at 8 MiB.
//! `::output` lines are parsed past that cap too, held to the limits of `super::outputs`.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use std::sync::Arc;

use tether_shared::enroll::Upstream;
use tether_shared::identity::Identity;
use tether_shared::plugin::env_name;
use tether_shared::protocol::{StepSpec, StepStatus};
use tether_shared::sealing::{self, SealingKey};
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

use super::bundle;
use super::capture::Capture;
use super::run_as::{self, RunAs};

/// Longest a partial chunk waits before it is sent.
pub const CHUNK_WAIT: Duration = Duration::from_millis(200);
/// The only PATH a step sees.
const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepResult {
    pub status: StepStatus,
    pub exit_code: Option<i32>,
    pub outputs: BTreeMap<String, String>,
    pub message: String,
}

impl StepResult {
    pub(crate) fn failed(message: String) -> Self {
        StepResult {
            status: StepStatus::Failed,
            exit_code: None,
            outputs: BTreeMap::new(),
            message,
        }
    }
    fn ok() -> Self {
        StepResult {
            status: StepStatus::Succeeded,
            exit_code: Some(0),
            outputs: BTreeMap::new(),
            message: String::new(),
        }
    }
}

/// Where and with what a step runs.
pub struct StepContext {
    pub job_id: String,
    pub index: usize,
    /// The job's work directory (created if missing).
    pub work_dir: PathBuf,
    /// Outputs of the steps before this one.
    pub outputs: BTreeMap<String, String>,
    /// The agent's id: bulk downloads (plugin bundles) are signed in its name.
    pub agent_id: String,
    /// The agent's key, to sign those downloads.
    pub identity: Arc<Identity>,
    /// TLS trusting the server's CA (the agent pins it).
    pub tls: Arc<rustls::ClientConfig>,
    /// The upstream the uplink uses now (or will try next): bulk downloads go to
    /// `https://host:port` of it, through the same relays as the WebSocket.
    pub upstream: Upstream,
    /// Where unpacked plugin bundles are cached, one directory per sha256 (`DATA/plugins`).
    pub plugin_dir: PathBuf,
    /// Where `artifact/fetch` caches verified downloads by sha256 (`DATA/cache/artifacts`).
    pub artifact_cache: PathBuf,
    /// Opens the step's sealed secrets.
    pub sealing: Arc<SealingKey>,
    /// Whom steps may run as (`run_as`).
    pub run_as: Arc<run_as::Policy>,
}

/// The secret values of a step (what must never appear in any output).
pub fn secret_values(spec: &StepSpec) -> Vec<String> {
    spec.secrets
        .iter()
        .filter_map(|k| spec.properties.get(k).cloned())
        .filter(|v| !v.is_empty())
        .collect()
}

/// Run `spec`; `chunk` receives masked output as it comes; `cancel` firing kills it.
pub async fn run(
    spec: &StepSpec,
    ctx: &StepContext,
    chunk: impl Fn(String),
    cancel: oneshot::Receiver<()>,
) -> StepResult {
    let opened = match sealing::open_step(spec, &ctx.sealing, &ctx.job_id, ctx.index) {
        Ok(s) => s,
        Err(e) => {
            return StepResult::failed(format!(
                "cannot open the step's secrets ({e}): they were sealed for another key of this \
                 agent; deploy again"
            ))
        }
    };
    let spec = &opened;
    // Whom it runs as is settled before anything runs: a refusal runs nothing.
    let user = match run_as::resolve(spec, &ctx.run_as, &ctx.job_id) {
        Ok(u) => u,
        Err(message) => return StepResult::failed(message),
    };
    if let Some(user) = &user {
        let runs_as = spec.bundle.is_some()
            || matches!(
                (spec.plugin.as_str(), spec.step.as_str()),
                ("shell", "run") | ("file", "write" | "delete" | "copy")
            );
        if !runs_as {
            return StepResult::failed(format!(
                "run_as applies to shell, file and plugin steps, not {}/{}",
                spec.plugin, spec.step
            ));
        }
        if let Err(message) = run_as::prepare(user) {
            return StepResult::failed(message);
        }
        tracing::info!(job_id = %ctx.job_id, step = ctx.index, user = %user.user, "step-runs-as");
    }
    let user = user.as_ref();
    if let Err(e) = std::fs::create_dir_all(&ctx.work_dir) {
        return StepResult::failed(format!(
            "cannot create the work directory {}: {e}",
            ctx.work_dir.display()
        ));
    }
    if let Some(b) = &spec.bundle {
        return bundle::run(spec, b, ctx, user, chunk, cancel).await;
    }
    match (spec.plugin.as_str(), spec.step.as_str()) {
        ("shell", "run") => shell(spec, ctx, user, chunk, cancel).await,
        ("artifact", "fetch") => super::fetch::run(spec, ctx, cancel).await,
        ("http", "request") => super::http::run(spec, cancel).await,
        ("file", op @ ("write" | "delete" | "copy")) if user.is_some() => {
            let user = user.cloned().unwrap_or_default();
            file_op_as(spec, op, ctx, user, chunk, cancel).await
        }
        ("file", op @ ("write" | "delete" | "copy")) => {
            let (spec, op) = (spec.clone(), op.to_owned());
            match tokio::task::spawn_blocking(move || file_op(&spec, &op)).await {
                Ok(Ok(())) => StepResult::ok(),
                Ok(Err(message)) => StepResult::failed(message),
                Err(e) => StepResult::failed(format!("file step crashed: {e}")),
            }
        }
        (plugin, step) => StepResult::failed(format!("unknown step {plugin}/{step}")),
    }
}

fn prop<'a>(spec: &'a StepSpec, name: &str) -> Result<&'a str, String> {
    spec.properties
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| format!("missing property {name:?}"))
}

async fn shell(
    spec: &StepSpec,
    ctx: &StepContext,
    user: Option<&RunAs>,
    chunk: impl Fn(String),
    cancel: oneshot::Receiver<()>,
) -> StepResult {
    let script = match prop(spec, "script") {
        Ok(s) => s,
        Err(m) => return StepResult::failed(m),
    };
    let interpreter = spec
        .properties
        .get("interpreter")
        .map_or("/bin/sh", String::as_str);
    let dir = user.map_or(&ctx.work_dir, |u| &u.dir);
    let script_path = dir.join(format!("step-{}.script", ctx.index));
    if let Err(e) = tether_shared::identity::write_private_file(&script_path, script.as_bytes()) {
        return StepResult::failed(format!("cannot write the script: {e}"));
    }
    if let Some(u) = user {
        if let Err(message) = run_as::give(u, &script_path) {
            let _ = std::fs::remove_file(&script_path);
            return StepResult::failed(message);
        }
    }
    let mut cmd = child_command(interpreter, spec, ctx, user, &["script", "interpreter"]);
    cmd.arg(&script_path);
    let result = run_child(cmd, interpreter, spec, chunk, cancel).await;
    if let Err(e) = std::fs::remove_file(&script_path) {
        tracing::warn!(job_id = %ctx.job_id, step = ctx.index, error = %e, "script-not-removed");
    }
    result
}

/// Removes the step scripts a killed worker left in the job work directories under `work`
/// (every step writes its script again when it runs).
pub fn remove_scripts(work: &Path) {
    let Ok(jobs) = std::fs::read_dir(work) else {
        return;
    };
    for job in jobs.flatten() {
        let Ok(files) = std::fs::read_dir(job.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("step-") && name.ends_with(".script") {
                if let Err(e) = std::fs::remove_file(f.path()) {
                    tracing::warn!(file = %f.path().display(), error = %e, "script-not-removed");
                }
            }
        }
    }
}

/// A step's child process, not yet started: `program` in the job's work directory with a
/// cleared environment (a fixed PATH, HOME, LANG, the job and step names), every property but
/// `skip` as `TETHER_PROP_<NAME>` and the earlier steps' outputs as `TETHER_OUTPUT_<NAME>`;
/// no stdin, piped stdout and stderr, leading its own process group. Add arguments, then
/// [`run_child`].
pub(crate) fn child_command(
    program: &str,
    spec: &StepSpec,
    ctx: &StepContext,
    user: Option<&RunAs>,
    skip: &[&str],
) -> tokio::process::Command {
    let mut cmd = bare_command(program, user, &ctx.work_dir);
    cmd.env("TETHER_JOB_ID", &ctx.job_id)
        .env("TETHER_STEP", &spec.name);
    for (k, v) in &spec.properties {
        if !skip.contains(&k.as_str()) {
            cmd.env(env_name("TETHER_PROP_", k), v);
        }
    }
    for (k, v) in &ctx.outputs {
        cmd.env(env_name("TETHER_OUTPUT_", k), v);
    }
    cmd
}

/// `program` with a cleared environment (a fixed PATH, LANG), no stdin, piped output, leading
/// its own process group: as the agent in `work_dir` (HOME too), or as `user` (its uid, gid,
/// HOME, USER and LOGNAME) in the user's step directory.
fn bare_command(program: &str, user: Option<&RunAs>, work_dir: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.env_clear()
        .env("PATH", SAFE_PATH)
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    match user {
        None => {
            cmd.current_dir(work_dir).env("HOME", work_dir);
        }
        Some(u) => {
            cmd.current_dir(&u.dir)
                .env("HOME", &u.home)
                .env("USER", &u.user)
                .env("LOGNAME", &u.user)
                .uid(u.uid)
                .gid(u.gid);
        }
    }
    cmd
}

/// A file step run as `user`: a fixed `/bin/sh` script (`run_as::file_script`) with the
/// checked paths as arguments, so the kernel decides what the user may write, delete or read.
async fn file_op_as(
    spec: &StepSpec,
    op: &str,
    ctx: &StepContext,
    user: RunAs,
    chunk: impl Fn(String),
    cancel: oneshot::Receiver<()>,
) -> StepResult {
    let Some(script) = run_as::file_script(op) else {
        return StepResult::failed(format!("unknown file step {op}"));
    };
    let args = match file_args_as(spec, op, ctx, &user) {
        Ok(a) => a,
        Err(m) => return StepResult::failed(m),
    };
    let mut cmd = bare_command("/bin/sh", Some(&user), &ctx.work_dir);
    cmd.arg("-c").arg(script).arg("sh").args(&args);
    let result = run_child(cmd, "/bin/sh", spec, chunk, cancel).await;
    if op == "write" {
        let _ = std::fs::remove_file(user.dir.join(format!("step-{}.content", ctx.index)));
    }
    result
}

/// The arguments of [`file_op_as`]'s script; a write's content goes to a file of the user's.
fn file_args_as(
    spec: &StepSpec,
    op: &str,
    ctx: &StepContext,
    user: &RunAs,
) -> Result<Vec<String>, String> {
    let path = |k: &str| -> Result<String, String> {
        Ok(checked_path(prop(spec, k)?)?.to_string_lossy().into_owned())
    };
    match op {
        "write" => {
            let mode = file_mode(spec)?;
            let content = user.dir.join(format!("step-{}.content", ctx.index));
            tether_shared::identity::write_private_file(
                &content,
                prop(spec, "content")?.as_bytes(),
            )
            .map_err(|e| format!("cannot stage the content: {e}"))?;
            run_as::give(user, &content)?;
            Ok(vec![
                path("path")?,
                format!("{mode:o}"),
                content.to_string_lossy().into_owned(),
            ])
        }
        "delete" => Ok(vec![path("path")?]),
        "copy" => Ok(vec![path("from")?, path("to")?]),
        other => Err(format!("unknown file step {other}")),
    }
}

/// A write's `mode` property (octal, default 0644).
fn file_mode(spec: &StepSpec) -> Result<u32, String> {
    match spec.properties.get("mode") {
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .map_err(|_| format!("mode {m:?} is not octal")),
        None => Ok(0o644),
    }
}

/// Starts `cmd` (from [`child_command`]) and runs it to its end: output captured in masked
/// chunks and capped, `::output name=value` lines collected, the whole process group killed
/// at the step's timeout, at `cancel`, and when it exits (no daemon outlives its step).
pub(crate) async fn run_child(
    mut cmd: tokio::process::Command,
    program: &str,
    spec: &StepSpec,
    chunk: impl Fn(String),
    cancel: oneshot::Receiver<()>,
) -> StepResult {
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return StepResult::failed(format!("cannot start {program}: {e}")),
    };
    let group = GroupGuard(child.id().map(|p| p as i32));
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return StepResult::failed("no output pipes".into());
    };
    let mut capture = Capture::new(&secret_values(spec));
    let (mut out_buf, mut err_buf) = ([0u8; 8192], [0u8; 8192]);
    let (mut out_open, mut err_open) = (true, true);
    let deadline = tokio::time::sleep(Duration::from_millis(spec.timeout_ms.max(1)));
    tokio::pin!(deadline);
    let mut cancel = cancel;
    let mut flush_tick = tokio::time::interval(CHUNK_WAIT);
    let ended = loop {
        let ready = tokio::select! {
            n = stdout.read(&mut out_buf), if out_open => match n {
                Ok(0) | Err(_) => {
                    out_open = false;
                    Vec::new()
                }
                Ok(n) => capture.absorb(&out_buf[..n], true),
            },
            n = stderr.read(&mut err_buf), if err_open => match n {
                Ok(0) | Err(_) => {
                    err_open = false;
                    Vec::new()
                }
                Ok(n) => capture.absorb(&err_buf[..n], false),
            },
            status = child.wait(), if !out_open && !err_open => break Ended::Exited(status),
            _ = flush_tick.tick() => capture.flush(),
            _ = &mut deadline => break Ended::TimedOut,
            _ = &mut cancel => break Ended::Cancelled,
        };
        ready.into_iter().for_each(&chunk);
    };
    let (last, outputs) = capture.finish();
    last.into_iter().for_each(&chunk);
    let mut result = match ended {
        Ended::Exited(Ok(status)) => {
            // A daemonised grandchild may still hold the group: end it with the step.
            group.kill();
            let code = status.code();
            let ok = status.success();
            StepResult {
                status: if ok {
                    StepStatus::Succeeded
                } else {
                    StepStatus::Failed
                },
                exit_code: code,
                outputs: BTreeMap::new(),
                message: if ok {
                    String::new()
                } else {
                    format!("exited with {status}")
                },
            }
        }
        Ended::Exited(Err(e)) => StepResult::failed(format!("cannot wait for the step: {e}")),
        Ended::TimedOut => {
            group.kill();
            let _ = child.wait().await;
            StepResult {
                status: StepStatus::TimedOut,
                exit_code: None,
                outputs: BTreeMap::new(),
                message: format!("timed out after {} ms", spec.timeout_ms),
            }
        }
        Ended::Cancelled => {
            group.kill();
            let _ = child.wait().await;
            StepResult {
                status: StepStatus::Cancelled,
                exit_code: None,
                outputs: BTreeMap::new(),
                message: "cancelled".into(),
            }
        }
    };
    outputs.into_result(&mut result);
    result
}

enum Ended {
    Exited(std::io::Result<std::process::ExitStatus>),
    TimedOut,
    Cancelled,
}

/// Kills the step's whole process group when told, and when dropped (the worker's actor died).
struct GroupGuard(Option<i32>);

impl GroupGuard {
    fn kill(&self) {
        if let Some(pgid) = self.0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A target path a file step may touch: absolute, no `..`, and not a symbolic link itself.
fn checked_path(raw: &str) -> Result<PathBuf, String> {
    let p = Path::new(raw);
    if !p.is_absolute() {
        return Err(format!("{raw:?} is not an absolute path"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("{raw:?} contains '..'"));
    }
    if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(format!("{raw:?} is a symbolic link; refusing to follow it"));
    }
    Ok(p.to_owned())
}

fn file_op(spec: &StepSpec, op: &str) -> Result<(), String> {
    match op {
        "write" => {
            let path = checked_path(prop(spec, "path")?)?;
            let mode = file_mode(spec)?;
            tether_shared::identity::write_file_atomic(
                &path,
                prop(spec, "content")?.as_bytes(),
                mode,
            )
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
        }
        "delete" => {
            let path = checked_path(prop(spec, "path")?)?;
            match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!("cannot delete {}: {e}", path.display())),
            }
        }
        "copy" => {
            let from = checked_path(prop(spec, "from")?)?;
            let to = checked_path(prop(spec, "to")?)?;
            let bytes =
                std::fs::read(&from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
            tether_shared::identity::write_file_atomic(&to, &bytes, 0o644)
                .map_err(|e| format!("cannot write {}: {e}", to.display()))
        }
        other => Err(format!("unknown file step {other}")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;
    use tether_shared::protocol::{BundleRef, OnInterrupt};

    /// A client TLS configuration trusting nothing (the tests fetch nothing).
    pub(crate) fn client_tls() -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
    }

    /// A context in `dir`, its upstream unreachable.
    pub(crate) fn context(dir: &Path) -> StepContext {
        StepContext {
            job_id: "j1".into(),
            index: 0,
            work_dir: dir.join("work"),
            outputs: BTreeMap::new(),
            agent_id: "a-1".into(),
            identity: Arc::new(Identity::generate()),
            tls: client_tls(),
            upstream: Upstream::parse("wss://127.0.0.1:9").unwrap(),
            plugin_dir: dir.join("plugins"),
            artifact_cache: dir.join("cache/artifacts"),
            sealing: Arc::new(SealingKey::generate()),
            run_as: Arc::new(run_as::Policy {
                users: vec!["nobody".into()],
                dir: dir.join("steps"),
            }),
        }
    }

    pub(crate) fn spec(
        plugin: &str,
        step: &str,
        props: &[(&str, &str)],
        secrets: &[&str],
        timeout_ms: u64,
    ) -> StepSpec {
        StepSpec {
            name: "s".into(),
            plugin: plugin.into(),
            step: step.into(),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            on_interrupt: OnInterrupt::Fail,
            timeout_ms,
            bundle: None,
            sealed: None,
        }
    }

    async fn go(spec: &StepSpec, dir: &Path) -> (StepResult, String) {
        let ctx = context(dir);
        let log = Arc::new(Mutex::new(String::new()));
        let l = log.clone();
        let (_tx, rx) = oneshot::channel();
        let r = run(spec, &ctx, move |c| l.lock().unwrap().push_str(&c), rx).await;
        let text = log.lock().unwrap().clone();
        (r, text)
    }

    #[actix_rt::test]
    async fn steps_run_as_an_allowed_user_with_its_rights_and_a_refused_one_runs_nothing() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if !nix::unistd::Uid::effective().is_root() {
            return; // switching users takes root (the e2e tests run as root)
        }
        let dir = tempfile::tempdir().unwrap();
        // nobody must be able to reach its step directory (a tempdir is 0700).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        let canary = dir.path().join("refused-canary");
        let touch = format!("touch {}", canary.display());
        let shell = |user: &str| {
            spec(
                "shell",
                "run",
                &[("script", &touch), ("run_as", user)],
                &[],
                10_000,
            )
        };

        let (r, log) = go(
            &spec(
                "shell",
                "run",
                &[("script", "id -un; pwd; echo $HOME"), ("run_as", "nobody")],
                &[],
                10_000,
            ),
            dir.path(),
        )
        .await;
        assert_eq!(r.status, StepStatus::Succeeded, "{r:?} {log}");
        assert!(log.starts_with("nobody\n"), "{log}");
        assert!(log.contains("j1-nobody"), "its own directory: {log}");
        assert!(
            log.contains(&nobody.dir.to_string_lossy().into_owned()),
            "its HOME: {log}"
        );

        // A user not listed, and a user that does not exist: nothing runs.
        for user in ["daemon", "no-such-user-x"] {
            let (r, _) = go(&shell(user), dir.path()).await;
            assert_eq!(r.status, StepStatus::Failed, "{user}");
            assert!(r.message.starts_with("run_as:"), "{}", r.message);
            assert!(!canary.exists(), "{user} ran something");
        }

        // A file write as nobody: where nobody may write, the file is nobody's; where it may
        // not (a root directory), the kernel refuses and nothing is written.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::os::unix::fs::chown(&open, Some(nobody.uid.as_raw()), None).unwrap();
        let target = open.join("made.txt");
        let write = |path: &Path| {
            spec(
                "file",
                "write",
                &[
                    ("path", path.to_str().unwrap()),
                    ("content", "hi\n"),
                    ("mode", "0640"),
                    ("run_as", "nobody"),
                ],
                &[],
                10_000,
            )
        };
        let (r, log) = go(&write(&target), dir.path()).await;
        assert_eq!(r.status, StepStatus::Succeeded, "{r:?} {log}");
        let meta = std::fs::metadata(&target).unwrap();
        assert_eq!(meta.uid(), nobody.uid.as_raw());
        assert_eq!(meta.mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "hi\n");
        let closed = dir.path().join("closed.txt");
        let (r, _) = go(&write(&closed), dir.path()).await;
        assert_eq!(r.status, StepStatus::Failed);
        assert!(!closed.exists());
        // http steps cannot run as a user.
        let (r, _) = go(
            &spec(
                "http",
                "request",
                &[("url", "https://127.0.0.1:9/"), ("run_as", "nobody")],
                &[],
                1000,
            ),
            dir.path(),
        )
        .await;
        assert!(r.message.contains("run_as applies to"), "{}", r.message);
    }

    #[actix_rt::test]
    async fn properties_arrive_as_data_secrets_are_masked_outputs_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let canary = dir.path().join("canary");
        let evil = format!(
            "; touch {} $(touch {}) `touch {}`",
            canary.display(),
            canary.display(),
            canary.display()
        );
        let s = spec(
            "shell",
            "run",
            &[("script", "echo \"got:$TETHER_PROP_VALUE\"; echo \"pw=$TETHER_PROP_PASSWORD\" >&2; echo '::output answer=42'"), ("value", &evil), ("password", "hunter2")],
            &["password"],
            10_000,
        );
        let (r, log) = go(&s, dir.path()).await;
        assert_eq!(r.status, StepStatus::Succeeded, "{r:?} {log}");
        assert!(!canary.exists(), "a property was executed");
        assert!(log.contains(&format!("got:{evil}")), "{log}");
        assert!(!log.contains("hunter2") && log.contains("pw=***"), "{log}");
        assert_eq!(r.outputs.get("answer").map(String::as_str), Some("42"));
    }

    #[actix_rt::test]
    async fn sealed_secrets_are_opened_in_memory_masked_and_the_script_removed() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let mut s = spec(
            "shell",
            "run",
            &[
                (
                    "script",
                    "echo \"pw=$TETHER_PROP_PASSWORD\"; echo 'inline=hunter2'",
                ),
                ("password", "hunter2"),
            ],
            &["password", "script"],
            10_000,
        );
        let sealer = sealing::Sealer::new(&ctx.sealing.public_b64()).unwrap();
        sealing::seal_step(&mut s, &sealer, &ctx.job_id, ctx.index).unwrap();
        assert!(s.properties.is_empty() && s.sealed.is_some());
        let log = Arc::new(Mutex::new(String::new()));
        let l = log.clone();
        let (_tx, rx) = oneshot::channel();
        let r = run(&s, &ctx, move |c| l.lock().unwrap().push_str(&c), rx).await;
        let log = log.lock().unwrap().clone();
        assert_eq!(r.status, StepStatus::Succeeded, "{r:?} {log}");
        assert!(
            log.contains("pw=***") && log.contains("inline=***"),
            "{log}"
        );
        assert!(!log.contains("hunter2"), "{log}");
        let left: Vec<_> = std::fs::read_dir(&ctx.work_dir)
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "the script stayed: {left:?}");

        // Sealed for another key (the agent lost its own): the step fails, saying why.
        let other = context(dir.path());
        let (_tx, rx) = oneshot::channel();
        let r = run(&s, &other, |_| {}, rx).await;
        assert_eq!(r.status, StepStatus::Failed);
        assert!(
            r.message.contains("cannot open the step's secrets"),
            "{}",
            r.message
        );
    }

    #[test]
    fn scripts_a_killed_worker_left_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("d-1-a1");
        std::fs::create_dir_all(&job).unwrap();
        std::fs::write(job.join("step-0.script"), "echo hunter2").unwrap();
        std::fs::write(job.join("kept.txt"), "mine").unwrap();
        remove_scripts(dir.path());
        assert!(!job.join("step-0.script").exists());
        assert!(job.join("kept.txt").exists());
    }

    #[actix_rt::test]
    async fn a_cached_bundle_step_runs_like_a_shell_step() {
        let dir = tempfile::tempdir().unwrap();
        let sha = "ef".repeat(32);
        let bundle_dir = dir.path().join("plugins").join(&sha);
        std::fs::create_dir_all(bundle_dir.join("bin")).unwrap();
        std::fs::write(
            bundle_dir.join("bin/go.sh"),
            "echo \"conf=$TETHER_PROP_CONFIG key=$TETHER_PROP_KEY dir=$TETHER_PLUGIN_DIR\"\necho '::output pid=7'\n",
        )
        .unwrap();
        let mut s = spec(
            "nginx",
            "reload",
            &[("config", "/etc/x; $(id)"), ("key", "sekrit")],
            &["key"],
            10_000,
        );
        s.bundle = Some(BundleRef {
            sha256: sha.clone(),
            command: vec!["/bin/sh".into(), "./bin/go.sh".into()],
        });
        let (r, log) = go(&s, dir.path()).await;
        assert_eq!(r.status, StepStatus::Succeeded, "{r:?} {log}");
        assert!(log.contains("conf=/etc/x; $(id) key=*** dir="), "{log}");
        assert!(log.contains(&sha) && !log.contains("sekrit"), "{log}");
        assert_eq!(r.outputs.get("pid").map(String::as_str), Some("7"));
        // A bundle that is not cached and cannot be fetched fails the step, naming why.
        s.bundle = Some(BundleRef {
            sha256: "01".repeat(32),
            command: vec!["/bin/sh".into(), "x.sh".into()],
        });
        let (r, _) = go(&s, dir.path()).await;
        assert_eq!(r.status, StepStatus::Failed);
        assert!(r.message.contains("fetching plugin bundle"), "{r:?}");
    }

    #[actix_rt::test]
    async fn a_timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("grandchild-survived");
        let script = format!("(sleep 1; touch {}) & sleep 30", marker.display());
        let s = spec("shell", "run", &[("script", &script)], &[], 300);
        let (r, _) = go(&s, dir.path()).await;
        assert_eq!(r.status, StepStatus::TimedOut);
        // The grandchild was in the group: it must not get to write its marker.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!marker.exists(), "a grandchild outlived the timeout");
    }

    #[actix_rt::test]
    async fn file_steps_refuse_links_and_dot_dot_and_write_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.txt");
        let s = spec(
            "file",
            "write",
            &[
                ("path", target.to_str().unwrap()),
                ("content", "hello"),
                ("mode", "600"),
            ],
            &[],
            1000,
        );
        assert_eq!(go(&s, dir.path()).await.0.status, StepStatus::Succeeded);
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "hello");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let s = spec(
            "file",
            "write",
            &[("path", link.to_str().unwrap()), ("content", "pwned")],
            &[],
            1000,
        );
        assert_eq!(go(&s, dir.path()).await.0.status, StepStatus::Failed);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        let dotdot = format!("{}/../x", dir.path().display());
        let s = spec(
            "file",
            "write",
            &[("path", &dotdot), ("content", "x")],
            &[],
            1000,
        );
        assert_eq!(go(&s, dir.path()).await.0.status, StepStatus::Failed);
    }
}
