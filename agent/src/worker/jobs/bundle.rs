//! Steps of uploaded plugins: the bundle a step names (by sha256) is fetched once from the
//! agent-facing listener of the current upstream (`GET /agent/v1/plugins/{sha256}`, signed with
//! the agent's key), verified against its sha256, unpacked safely (`tether_shared::unpack`:
//! no traversal, no links, no devices, size caps, temp dir + rename) into
//! `DATA/plugins/<sha256>/`, and kept there: a later step of the same bundle fetches nothing.
//!
//! The step's command then runs exactly like `shell/run` (same child setup and runner, see
//! `step::child_command` and `step::run_child`): relative command elements that are not flags
//! are files of the unpacked bundle (see `tether_shared::plugin`), every property is a
//! `TETHER_PROP_<NAME>` variable, and `TETHER_PLUGIN_DIR` names the unpacked bundle.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rand::RngCore;
use sha2::{Digest, Sha256};
use tether_shared::agent_auth::sign_request;
use tether_shared::https;
use tether_shared::plugin::{bundle_path, command_paths, MAX_BUNDLE_BYTES};
use tether_shared::protocol::{BundleRef, StepSpec, StepStatus};
use tether_shared::unpack;
use tokio::sync::oneshot;

use super::step::{child_command, run_child, StepContext, StepResult};

/// The agents' download path prefix on the agent-facing listener.
pub const PLUGINS_PATH: &str = "/agent/v1/plugins";
/// Longest a bundle download may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);

/// One fetch-and-unpack at a time in this worker: two jobs needing the same bundle fetch it
/// once, and a bundle is never replaced under a running step.
static CACHE_LOCK: Mutex<()> = Mutex::new(());

/// What fetching a bundle needs, detached from the step context for the blocking task.
struct Fetch {
    agent_id: String,
    identity: std::sync::Arc<tether_shared::identity::Identity>,
    tls: std::sync::Arc<rustls::ClientConfig>,
    host: String,
    port: u16,
    cache: PathBuf,
}

/// Runs a step of an uploaded plugin.
pub async fn run(
    spec: &StepSpec,
    bundle: &BundleRef,
    ctx: &StepContext,
    user: Option<&super::run_as::RunAs>,
    chunk: impl Fn(String),
    mut cancel: oneshot::Receiver<()>,
) -> StepResult {
    let fetch = Fetch {
        agent_id: ctx.agent_id.clone(),
        identity: ctx.identity.clone(),
        tls: ctx.tls.clone(),
        host: ctx.upstream.host.clone(),
        port: ctx.upstream.port,
        cache: ctx.plugin_dir.clone(),
    };
    let sha256 = bundle.sha256.clone();
    let ready = tokio::task::spawn_blocking(move || ensure(&fetch, &sha256));
    let dir = tokio::select! {
        r = ready => match r {
            Ok(Ok(dir)) => dir,
            Ok(Err(message)) => return StepResult::failed(message),
            Err(e) => return StepResult::failed(format!("plugin fetch crashed: {e}")),
        },
        _ = &mut cancel => {
            return StepResult {
                status: StepStatus::Cancelled,
                exit_code: None,
                outputs: Default::default(),
                message: "cancelled".into(),
            }
        }
    };
    // A step run as another user runs its own copy: the cache is the agent's alone.
    let dir = match user {
        None => dir,
        Some(u) => match super::run_as::copy_bundle(u, &dir) {
            Ok(copy) => copy,
            Err(m) => return StepResult::failed(m),
        },
    };
    let argv = match resolve_command(&bundle.command, &dir) {
        Ok(a) => a,
        Err(m) => return StepResult::failed(m),
    };
    let Some((program, args)) = argv.split_first() else {
        return StepResult::failed("the plugin step has an empty command".into());
    };
    let mut cmd = child_command(program, spec, ctx, user, &[]);
    cmd.args(args).env("TETHER_PLUGIN_DIR", &dir);
    run_child(cmd, program, spec, chunk, cancel).await
}

/// The command with its bundle files as absolute paths inside `dir`.
fn resolve_command(command: &[String], dir: &Path) -> Result<Vec<String>, String> {
    let files: Vec<&str> = command_paths(command).collect();
    command
        .iter()
        .map(|c| {
            if !files.contains(&c.as_str()) {
                return Ok(c.clone());
            }
            let rel = bundle_path(c).map_err(|e| format!("command element {e}"))?;
            Ok(dir.join(rel).to_string_lossy().into_owned())
        })
        .collect()
}

/// The unpacked bundle `sha256`: from the cache, else fetched, verified and unpacked.
fn ensure(fetch: &Fetch, sha256: &str) -> Result<PathBuf, String> {
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{sha256:?} is not a sha256"));
    }
    let dest = fetch.cache.join(sha256);
    let _guard = CACHE_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    if dest.is_dir() {
        tracing::debug!(sha256 = %sha256, "plugin-cache-hit");
        return Ok(dest);
    }
    std::fs::create_dir_all(&fetch.cache)
        .map_err(|e| format!("cannot create {}: {e}", fetch.cache.display()))?;
    let body = download(fetch, sha256)?;
    let got = hex::encode(Sha256::digest(&body));
    if got != sha256 {
        return Err(format!(
            "plugin bundle {sha256}: the download has sha256 {got}; refusing it"
        ));
    }
    let tmp = fetch.cache.join(format!(
        ".fetch-{sha256}-{:016x}.tar.gz",
        rand::rngs::OsRng.next_u64()
    ));
    let unpacked = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&body).and_then(|()| f.sync_all()))
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))
        .and_then(|()| {
            unpack::unpack(&tmp, &dest, &unpack::Limits::default())
                .map_err(|e| format!("plugin bundle {sha256}: {e}"))
        });
    let _ = std::fs::remove_file(&tmp);
    let unpacked = unpacked?;
    tracing::info!(sha256 = %sha256, files = unpacked.files, bytes = unpacked.bytes, "plugin-bundle-unpacked");
    Ok(dest)
}

/// `GET /agent/v1/plugins/{sha256}`, signed; the body of a 200.
fn download(fetch: &Fetch, sha256: &str) -> Result<Vec<u8>, String> {
    let path = format!("{PLUGINS_PATH}/{sha256}");
    let now_ms = tether_shared::clock::now_unix_ms();
    let signed = sign_request(&fetch.identity, &fetch.agent_id, "GET", &path, now_ms);
    let headers: Vec<(&str, &str)> = signed.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let request = https::Request {
        method: "GET",
        host: &fetch.host,
        addr: None,
        port: fetch.port,
        path: &path,
        headers: &headers,
        body: None,
    };
    let limits = https::Limits {
        connect_timeout: Duration::from_secs(10),
        total_timeout: FETCH_TIMEOUT,
        max_response_bytes: MAX_BUNDLE_BYTES as usize + 64 * 1024,
    };
    let reply = https::request(fetch.tls.clone(), &request, &limits)
        .map_err(|e| format!("fetching plugin bundle {sha256}: {e}"))?;
    if reply.status != 200 {
        return Err(format!(
            "fetching plugin bundle {sha256}: HTTP {}: {}",
            reply.status,
            reply.reason()
        ));
    }
    tracing::info!(sha256 = %sha256, bytes = reply.body.len(), "plugin-bundle-fetched");
    Ok(reply.body)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn command_files_resolve_inside_the_bundle() {
        let dir = Path::new("/data/plugins/abc");
        let cmd: Vec<String> = ["/bin/sh", "./bin/run.sh", "-x", "conf/a.conf"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            resolve_command(&cmd, dir).unwrap(),
            [
                "/bin/sh",
                "/data/plugins/abc/bin/run.sh",
                "-x",
                "/data/plugins/abc/conf/a.conf"
            ]
        );
        let bad = vec!["/bin/sh".to_owned(), "../x".to_owned()];
        assert!(resolve_command(&bad, dir).is_err());
    }

    #[test]
    fn a_cached_bundle_is_used_without_fetching() {
        let tmp = tempfile::tempdir().unwrap();
        let sha = "ab".repeat(32);
        std::fs::create_dir_all(tmp.path().join(&sha)).unwrap();
        let fetch = Fetch {
            agent_id: "a-1".into(),
            identity: std::sync::Arc::new(tether_shared::identity::Identity::generate()),
            tls: super::super::step::tests::client_tls(),
            // Nothing listens here: a fetch would fail.
            host: "127.0.0.1".into(),
            port: 9,
            cache: tmp.path().to_owned(),
        };
        assert_eq!(ensure(&fetch, &sha).unwrap(), tmp.path().join(&sha));
        let other = "cd".repeat(32);
        let err = ensure(&fetch, &other).unwrap_err();
        assert!(err.contains("fetching plugin bundle"), "{err}");
        assert!(!tmp.path().join(&other).exists());
        assert!(ensure(&fetch, "../etc")
            .unwrap_err()
            .contains("not a sha256"));
    }
}
