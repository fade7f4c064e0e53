//! The built-in `artifact/fetch` step: download an artifact by sha256 from the agent's
//! upstream, verify it, and place it (copied, or unpacked safely) at `dest`.
//!
//! The server resolved the artifact's `name`/`version` to properties `sha256` and `size` at
//! deployment time. The download goes to `GET https://<upstream>/agent/v1/artifacts/<sha256>`
//! signed with the agent's key (`tether_shared::agent_auth`), trying the upstreams in order
//! (the current one first). It lands in `DATA/cache/artifacts/<sha256>.part`; after an
//! interruption the next attempt resumes it with `Range: bytes=N-`. Only once its size and
//! sha256 match does it become the cache entry `DATA/cache/artifacts/<sha256>` (rename + fsync
//! of the directory); a cache hit downloads nothing. A wrong hash, an over-size body or any
//! other failure fails the step with the reason, and a corrupt partial file is removed.
//!
//! Then `dest` (absolute, no `..`, not a symbolic link) gets either a copy of the file
//! (temp file, fsync, rename) or, with `unpack = "true"`, the archive extracted by
//! `tether_shared::unpack` (all or nothing). The step's output `sha256` names what was placed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngCore;
use sha2::{Digest, Sha256};
use tether_shared::agent_auth::sign_request;
use tether_shared::enroll::Upstream;
use tether_shared::https::{self, HttpsError, Request, StreamLimits};
use tether_shared::identity::Identity;
use tether_shared::protocol::{StepSpec, StepStatus};
use tokio::sync::oneshot;

use super::step::{StepContext, StepResult};

/// Path prefix of the download route on an agent-facing listener.
pub const ARTIFACT_PATH: &str = "/agent/v1/artifacts";
/// Where the cache lives inside the agent's data directory.
pub const CACHE_DIR: &str = "cache/artifacts";

/// What the download needs, detached from the step context for the blocking task. Also used
/// for upgrade packages (`worker::upgrade`).
pub(crate) struct Remote {
    pub(crate) agent_id: String,
    /// Signs download requests.
    pub(crate) identity: Arc<Identity>,
    /// Trusts the installed CA only.
    pub(crate) tls: Arc<rustls::ClientConfig>,
    /// The agent-facing upstreams: the one in use (or tried next) first.
    pub(crate) upstreams: Vec<Upstream>,
    /// `DATA/cache/artifacts`.
    pub(crate) cache_dir: PathBuf,
}

/// Runs `work` on the blocking pool under the step's timeout and `cancel`; `work` must stop
/// soon after the flag it gets is raised.
pub(crate) async fn run_blocking(
    spec: &StepSpec,
    cancel: oneshot::Receiver<()>,
    work: impl FnOnce(&AtomicBool, Instant) -> StepResult + Send + 'static,
) -> StepResult {
    let stop = Arc::new(AtomicBool::new(false));
    let timeout = Duration::from_millis(spec.timeout_ms.max(1));
    let deadline = Instant::now() + timeout;
    let flag = stop.clone();
    let task = tokio::task::spawn_blocking(move || work(&flag, deadline));
    let ended = |status: StepStatus, message: String| StepResult {
        status,
        exit_code: None,
        outputs: Default::default(),
        message,
    };
    tokio::select! {
        r = task => r.unwrap_or_else(|e| ended(StepStatus::Failed, format!("step crashed: {e}"))),
        _ = tokio::time::sleep(timeout) => {
            stop.store(true, Ordering::Relaxed);
            ended(StepStatus::TimedOut, format!("timed out after {} ms", spec.timeout_ms))
        }
        _ = cancel => {
            stop.store(true, Ordering::Relaxed);
            ended(StepStatus::Cancelled, "cancelled".into())
        }
    }
}

/// The step.
pub async fn run(spec: &StepSpec, ctx: &StepContext, cancel: oneshot::Receiver<()>) -> StepResult {
    let remote = Remote {
        agent_id: ctx.agent_id.clone(),
        identity: ctx.identity.clone(),
        tls: ctx.tls.clone(),
        upstreams: vec![ctx.upstream.clone()],
        cache_dir: ctx.artifact_cache.clone(),
    };
    let spec2 = spec.clone();
    run_blocking(spec, cancel, move |stop, deadline| {
        match fetch(&spec2, &remote, stop, deadline) {
            Ok(sha256) => StepResult {
                status: StepStatus::Succeeded,
                exit_code: Some(0),
                outputs: [("sha256".to_owned(), sha256)].into_iter().collect(),
                message: String::new(),
            },
            Err(message) => failed(message),
        }
    })
    .await
}

fn failed(message: String) -> StepResult {
    StepResult {
        status: StepStatus::Failed,
        exit_code: None,
        outputs: Default::default(),
        message,
    }
}

fn prop<'a>(spec: &'a StepSpec, name: &str) -> Result<&'a str, String> {
    spec.properties
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| format!("missing property {name:?}"))
}

/// Downloads (or finds in the cache) and places the artifact; `Ok` is its sha256.
fn fetch(
    spec: &StepSpec,
    remote: &Remote,
    stop: &AtomicBool,
    deadline: Instant,
) -> Result<String, String> {
    let sha256 = prop(spec, "sha256")?.to_owned();
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("sha256 {sha256:?} is not 64 hex digits"));
    }
    let size: u64 = prop(spec, "size")?
        .parse()
        .map_err(|_| "size is not a number".to_owned())?;
    let dest = checked_dest(prop(spec, "dest")?)?;
    let unpack = match spec.properties.get("unpack").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(format!(
                "unpack must be \"true\" or \"false\", got {other:?}"
            ))
        }
    };
    let cached = cached(remote, &sha256, size, stop, deadline)?;
    if unpack {
        let done = tether_shared::unpack::unpack(
            &cached,
            &dest,
            &tether_shared::unpack::Limits::default(),
        )
        .map_err(|e| format!("cannot unpack into {}: {e}", dest.display()))?;
        tracing::info!(sha256 = %sha256, dest = %dest.display(), files = done.files, bytes = done.bytes, "artifact-unpacked");
    } else {
        copy_atomic(&cached, &dest)
            .map_err(|e| format!("cannot copy to {}: {e}", dest.display()))?;
        tracing::info!(sha256 = %sha256, dest = %dest.display(), "artifact-copied");
    }
    Ok(sha256)
}

/// `dest` if absolute, free of `..`, and not a symbolic link itself.
fn checked_dest(raw: &str) -> Result<PathBuf, String> {
    let p = Path::new(raw);
    if !p.is_absolute() {
        return Err(format!("dest {raw:?} is not an absolute path"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("dest {raw:?} contains '..'"));
    }
    if fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(format!(
            "dest {raw:?} is a symbolic link; refusing to follow it"
        ));
    }
    Ok(p.to_owned())
}

/// The verified cache entry of `sha256`, downloading (or resuming) it if need be.
fn cached(
    remote: &Remote,
    sha256: &str,
    size: u64,
    stop: &AtomicBool,
    deadline: Instant,
) -> Result<PathBuf, String> {
    let dir = &remote.cache_dir;
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let entry = dir.join(sha256);
    if fs::metadata(&entry).is_ok_and(|m| m.is_file() && m.len() == size) {
        tracing::info!(sha256 = %sha256, "artifact-cache-hit");
        return Ok(entry);
    }
    let part = dir.join(format!("{sha256}.part"));
    let mut last = String::from("no upstream configured");
    for upstream in &remote.upstreams {
        match download(
            remote,
            upstream,
            ARTIFACT_PATH,
            sha256,
            size,
            &part,
            stop,
            deadline,
        ) {
            Ok(()) => {
                fs::rename(&part, &entry)
                    .map_err(|e| format!("cannot publish the cache entry: {e}"))?;
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
                return Ok(entry);
            }
            Err(Failure::Unreachable(e)) => {
                tracing::warn!(upstream = %upstream.authority(), error = %e, "artifact-upstream-unreachable");
                last = e;
            }
            Err(Failure::Fatal(e)) => return Err(e),
        }
    }
    Err(format!("cannot download artifact {sha256}: {last}"))
}

pub(crate) enum Failure {
    /// Another upstream may do better (the partial file is kept for a resume).
    Unreachable(String),
    Fatal(String),
}

/// One download attempt of `{route}/{sha256}` from `upstream` into `part`, resuming what is
/// there; verified against `size` and `sha256` (a mismatch removes `part`).
#[allow(clippy::too_many_arguments)] // one call per object kind; a struct would only rename them
pub(crate) fn download(
    remote: &Remote,
    upstream: &Upstream,
    route: &str,
    sha256: &str,
    size: u64,
    part: &Path,
    stop: &AtomicBool,
    deadline: Instant,
) -> Result<(), Failure> {
    let fatal = |e: String| Failure::Fatal(e);
    let mut hasher = Sha256::new();
    let mut have = resume_state(part, size, &mut hasher)
        .map_err(|e| fatal(format!("{}: {e}", part.display())))?;
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(part)
        .map_err(|e| fatal(format!("{}: {e}", part.display())))?;
    let path = format!("{route}/{sha256}");
    let now_ms = tether_shared::clock::now_unix_ms();
    let signed = sign_request(&remote.identity, &remote.agent_id, "GET", &path, now_ms);
    let range = format!("bytes={have}-");
    let mut headers: Vec<(&str, &str)> = signed.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if have > 0 {
        headers.push(("Range", &range));
    }
    let limits = StreamLimits {
        total_timeout: deadline.saturating_duration_since(Instant::now()),
        ..StreamLimits::default()
    };
    let resumed = have;
    let mut sink = |bytes: &[u8]| -> io::Result<()> {
        if stop.load(Ordering::Relaxed) {
            return Err(io::Error::other("stopped (timeout or cancel)"));
        }
        if have.saturating_add(bytes.len() as u64) > size {
            return Err(io::Error::other(format!(
                "the server sent more than the expected {size} bytes"
            )));
        }
        file.write_all(bytes)?;
        hasher.update(bytes);
        have += bytes.len() as u64;
        Ok(())
    };
    let req = Request {
        method: "GET",
        host: &upstream.host,
        addr: None,
        port: upstream.port,
        path: &path,
        headers: &headers,
        body: None,
    };
    let status = match https::request_streaming(Some(remote.tls.clone()), &req, &limits, &mut sink)
    {
        Ok(head) => head.status,
        Err(e @ HttpsError::Sink(_)) => {
            let _ = fs::remove_file(part);
            return Err(fatal(format!("download of {sha256} failed: {e}")));
        }
        // Kept for a resume from this or another upstream.
        Err(e) => return Err(Failure::Unreachable(e.to_string())),
    };
    // Whatever a refusal's body appended, or a 200 to a ranged request (the content started
    // over after the resumed prefix), the partial file is unusable now.
    if status == 200 && resumed > 0 {
        let _ = fs::remove_file(part);
        return Err(fatal(
            "the server ignored the resume range; the partial download was discarded, retry".into(),
        ));
    }
    if status != 200 && status != 206 {
        let _ = fs::remove_file(part);
        return Err(fatal(format!(
            "download of {sha256} answered HTTP {status}"
        )));
    }
    file.sync_all()
        .map_err(|e| fatal(format!("{}: {e}", part.display())))?;
    let got = hex::encode(hasher.finalize());
    if have != size || got != sha256 {
        let _ = fs::remove_file(part);
        return Err(fatal(format!(
            "download verification failed: got {have} bytes with sha256 {got}, expected {size} bytes with sha256 {sha256}"
        )));
    }
    Ok(())
}

/// Bytes of `part` already downloaded (hashed into `hasher`); a part too large is dropped.
fn resume_state(part: &Path, size: u64, hasher: &mut Sha256) -> io::Result<u64> {
    let mut f = match File::open(part) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if f.metadata()?.len() >= size {
        drop(f);
        fs::remove_file(part)?;
        return Ok(0);
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let got = f.read(&mut buf)?;
        if got == 0 {
            return Ok(n);
        }
        hasher.update(buf.get(..got).unwrap_or_default());
        n += got as u64;
    }
}

/// Copies `from` to `to` through a temp file next to it (fsync, rename, fsync of the dir).
fn copy_atomic(from: &Path, to: &Path) -> io::Result<()> {
    let parent = to.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(
        ".{}.tmp-{:016x}",
        to.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("artifact"),
        rand::rngs::OsRng.next_u64()
    ));
    let result = (|| {
        let mut out = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        io::copy(&mut File::open(from)?, &mut out)?;
        out.sync_all()?;
        fs::rename(&tmp, to)?;
        File::open(parent)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
