//! The installing side of enrollment, shared by `tether-agent install` and `tether-relay
//! install`: the request goes to `https://host:port/agent/v1/enroll` of each upstream in turn;
//! an upstream that cannot be reached (connection, TLS, timeout, 5xx) is skipped, a 4xx answer
//! stops with the server's reason. The key is made and saved before anything is sent, and a
//! retried install reuses it, so a lost answer costs nothing: the server answers an identical
//! retry with the same id.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use super::{name_problem, EnrollRequest, EnrollResponse, Upstream, ENROLL_PATH};
use crate::https::{self, Limits};
use crate::identity::{Identity, IdentityError, PublicKey};

/// Why no upstream enrolled us.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// An upstream answered with a 4xx (or an answer that makes no sense): refused.
    #[error("enrollment refused by {upstream}: HTTP {status}: {reason}")]
    Refused {
        /// The upstream that answered.
        upstream: String,
        /// The HTTP status.
        status: u16,
        /// The server's reason.
        reason: String,
    },
    /// No upstream could be used; one line per upstream.
    #[error("no upstream could enroll this machine:\n  {}{}", failures.join("\n  "), if *maybe_delivered { "\n(a request may have reached a server whose answer was lost: the key made for this machine is kept in the data directory, so that the same install run again gets the same identity; delete the directory to start over)" } else { "" })]
    Unreachable {
        /// What went wrong with each upstream.
        failures: Vec<String>,
        /// Whether a request may have reached a server (sent, then no usable answer), so
        /// that its key must be kept for a retry.
        maybe_delivered: bool,
    },
}

/// What an install checks before writing anything: the upstreams it may enroll through, the CA
/// it trusts, and the token it presents.
pub struct Plan {
    pub upstreams: Vec<Upstream>,
    pub ca_pem: String,
    pub tls: Arc<rustls::ClientConfig>,
}

impl Plan {
    /// Parses `--upstream`s (at least one) and reads `--ca`; refuses an empty `--token`. The
    /// error is a usage message naming the flag.
    pub fn check(upstreams: &[String], ca: &Path, token: &str) -> Result<Plan, String> {
        if upstreams.is_empty() {
            return Err("at least one --upstream wss://host:port is required".into());
        }
        let upstreams = upstreams
            .iter()
            .map(|u| Upstream::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        if token.trim().is_empty() {
            return Err("the enrollment token must not be empty".into());
        }
        let ca_pem = fs::read_to_string(ca).map_err(|e| format!("--ca {}: {e}", ca.display()))?;
        let tls = crate::tls::client_config(&ca_pem)
            .map_err(|e| format!("--ca {}: {e}", ca.display()))?;
        Ok(Plan {
            upstreams,
            ca_pem,
            tls: Arc::new(tls),
        })
    }
}

/// The enrollment token from `--token` or `--token-file` (exactly one; `-` reads standard
/// input), trimmed. A token in a file or on standard input stays out of `ps` and shell history.
pub fn read_token(token: Option<&str>, token_file: Option<&Path>) -> Result<String, String> {
    /// Longer than any token we issue (47 characters), short enough to refuse a wrong file.
    const MAX_TOKEN_FILE_BYTES: u64 = 4096;
    let text = match (token, token_file) {
        (Some(_), Some(_)) => return Err("give --token or --token-file, not both".into()),
        (None, None) => return Err("an enrollment token is required: --token-file FILE (or - for standard input), or --token TOKEN".into()),
        (Some(token), None) => token.to_owned(),
        (None, Some(path)) => {
            let mut text = String::new();
            let read = if path == Path::new("-") {
                io::Read::read_to_string(
                    &mut io::Read::take(io::stdin().lock(), MAX_TOKEN_FILE_BYTES),
                    &mut text,
                )
            } else {
                fs::File::open(path).and_then(|f| {
                    io::Read::read_to_string(&mut io::Read::take(f, MAX_TOKEN_FILE_BYTES), &mut text)
                })
            };
            read.map_err(|e| format!("--token-file {}: {e}", path.display()))?;
            text
        }
    };
    let token = text.trim();
    if token.is_empty() {
        return Err("the enrollment token must not be empty".into());
    }
    if token.len() >= 512 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(
            "the enrollment token must be one word (as `tether tokens create` printed it)".into(),
        );
    }
    Ok(token.to_owned())
}

/// Sends `request` to each upstream of `plan` in order; returns the base URL that answered and
/// its answer. An answer whose signing key the server's CA (in `plan`'s `--ca`) does not
/// certify was altered on the way: that upstream is skipped like an unreachable one. While an
/// upstream answers `503` (a cluster's node that leaves enrollment to the active one), the
/// round is made again after its `Retry-After` (at most 5 s), up to [`ENROLL_ROUNDS`] times: the
/// server answers the same request again with the same agent.
pub fn post_enrollment(
    plan: &Plan,
    request: &EnrollRequest,
) -> Result<(String, EnrollResponse), EnrollError> {
    // Serializing a struct of strings cannot fail.
    let body = serde_json::to_vec(request).unwrap_or_default();
    let mut maybe_delivered = false;
    let mut round = 1;
    loop {
        let (outcome, unavailable) = post_round(plan, &body, &mut maybe_delivered);
        let failures = match outcome {
            Round::Done(done) => return done,
            Round::Failed(failures) => failures,
        };
        match unavailable {
            // A node of a cluster that leaves enrollment to another (a member or a standby,
            // maybe behind a load balancer that sends the next try elsewhere): once more.
            Some(pause) if round < ENROLL_ROUNDS => {
                tracing::info!(
                    round,
                    pause_ms = pause.as_millis() as u64,
                    "enroll-upstreams-unavailable-trying-again"
                );
                std::thread::sleep(pause);
                round += 1;
            }
            _ => {
                return Err(EnrollError::Unreachable {
                    failures,
                    maybe_delivered,
                })
            }
        }
    }
}

/// Rounds over the upstreams at most, while one of them answers `503` (see
/// [`post_enrollment`]).
const ENROLL_ROUNDS: u32 = 10;
/// Longest pause between two rounds, whatever a `Retry-After` says.
const MAX_ROUND_PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

/// How one round over the upstreams ended.
enum Round {
    /// Enrolled, or refused for good.
    Done(Result<(String, EnrollResponse), EnrollError>),
    /// No upstream enrolled it: why, each.
    Failed(Vec<String>),
}

/// One try at each upstream in turn; with the pause a `503` asked for, if one answered so.
fn post_round(
    plan: &Plan,
    body: &[u8],
    maybe_delivered: &mut bool,
) -> (Round, Option<std::time::Duration>) {
    let (upstreams, tls) = (&plan.upstreams, &plan.tls);
    let mut failures = Vec::new();
    let mut unavailable = None;
    for upstream in upstreams {
        let base = upstream.base_url();
        let reply = https::request(
            Arc::clone(tls),
            &https::Request {
                method: "POST",
                host: &upstream.host,
                addr: None,
                port: upstream.port,
                path: ENROLL_PATH,
                headers: &[("Content-Type", "application/json")],
                body: Some(body),
            },
            &Limits::default(),
        );
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!(upstream = %base, error = %e, "enroll-upstream-failed");
                // Refused before anything was sent: no name, no connection, no TLS.
                let unsent = matches!(
                    e,
                    https::HttpsError::Host { .. }
                        | https::HttpsError::Connect { .. }
                        | https::HttpsError::Tls { .. }
                );
                *maybe_delivered |= !unsent;
                failures.push(format!("{base}: {e}"));
                continue;
            }
        };
        match reply.status {
            200 => {
                let answer = match parse_answer(&reply.body) {
                    Ok(answer) => answer,
                    Err(reason) => {
                        return (
                            Round::Done(Err(EnrollError::Refused {
                                upstream: base.clone(),
                                status: reply.status,
                                reason,
                            })),
                            None,
                        )
                    }
                };
                match check_signing_key(&answer, &plan.ca_pem) {
                    Ok(()) => return (Round::Done(Ok((base, answer))), None),
                    Err(reason) => {
                        tracing::error!(upstream = %base, reason = %reason, "enroll-answer-refused");
                        *maybe_delivered = true;
                        failures.push(format!("{base}: {reason}"));
                    }
                }
            }
            400..=499 => {
                return (
                    Round::Done(Err(EnrollError::Refused {
                        upstream: base,
                        status: reply.status,
                        reason: reply.reason(),
                    })),
                    None,
                )
            }
            status => {
                tracing::warn!(upstream = %base, status, "enroll-upstream-failed");
                if status == 503 {
                    let asked = reply
                        .header("retry-after")
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .map_or(
                            std::time::Duration::from_secs(1),
                            std::time::Duration::from_secs,
                        );
                    unavailable = Some(asked.min(MAX_ROUND_PAUSE));
                }
                *maybe_delivered = true;
                failures.push(format!("{base}: HTTP {status}: {}", reply.reason()));
            }
        }
    }
    (Round::Failed(failures), unavailable)
}

/// Checks that the server's CA, among the CAs in `ca_pem`, certifies the signing key of
/// `answer` for code signing.
pub fn check_signing_key(answer: &EnrollResponse, ca_pem: &str) -> Result<(), String> {
    let cert = answer.server_signing_certificate.as_deref().ok_or(
        "the answer holds no certificate of the server's signing key (is the server older than this installer, or was the answer altered on the way?); nothing was pinned",
    )?;
    let key = PublicKey::from_b64(&answer.server_signing_key)
        .map_err(|e| format!("server signing key: {e}"))?;
    crate::tls::verify_signing_cert(cert, ca_pem, &key.to_bytes()).map_err(|e| {
        format!("the server's signing key is not certified by --ca ({e}): the answer was altered on the way; nothing was pinned")
    })
}

/// Checks the server's answer: an id of the expected shape and a valid signing key.
pub fn parse_answer(body: &[u8]) -> Result<EnrollResponse, String> {
    let answer: EnrollResponse = serde_json::from_slice(body)
        .map_err(|e| format!("unexpected answer from the server ({e})"))?;
    if let Some(problem) = name_problem("agent id", &answer.agent_id) {
        return Err(format!("unexpected answer from the server: {problem}"));
    }
    PublicKey::from_b64(&answer.server_signing_key)
        .map_err(|e| format!("unexpected answer from the server: server signing key: {e}"))?;
    Ok(answer)
}

/// Reuses `path` if a previous install saved it (an enrollment that may have succeeded), else
/// generates a key and saves it before anything is sent.
pub fn load_or_create_key(path: &Path) -> Result<Identity, IdentityError> {
    if path.exists() {
        let identity = Identity::load(path)?;
        tracing::info!(path = %path.display(), "key-reused");
        return Ok(identity);
    }
    let identity = Identity::generate();
    identity.save(path)?;
    tracing::info!(path = %path.display(), "key-created");
    Ok(identity)
}

/// What an install created, so that an install refused for good leaves nothing behind: the
/// data directory if it did not exist, and the files it made in one that did.
#[derive(Debug, Default)]
pub struct Created {
    dir: Option<std::path::PathBuf>,
    files: Vec<std::path::PathBuf>,
}

impl Created {
    /// Creates the data directory `dir` (see [`create_private_dir`]), remembering whether it
    /// is new.
    pub fn data_dir(dir: &Path) -> io::Result<Created> {
        let existed = dir.exists();
        create_private_dir(dir)?;
        Ok(Created {
            dir: (!existed).then(|| dir.to_path_buf()),
            files: Vec::new(),
        })
    }

    /// Notes that `path` is about to be made, unless it exists already.
    pub fn file(&mut self, path: &Path) {
        if !path.exists() {
            self.files.push(path.to_path_buf());
        }
    }

    /// Removes what was created (best effort: a failed install is already being reported).
    pub fn remove(self) {
        match self.dir {
            Some(dir) => {
                if let Err(e) = fs::remove_dir_all(&dir) {
                    tracing::warn!(path = %dir.display(), error = %e, "install-cleanup-failed");
                }
            }
            None => {
                for file in self.files {
                    let _ = fs::remove_file(file);
                }
            }
        }
    }
}

/// Whether a failed enrollment must keep the key: a request may have reached a server whose
/// answer was lost, and a retry must present the same key to get the same identity. A
/// refusal, or failures before anything was sent, keep nothing.
pub fn keep_key_after(e: &EnrollError) -> bool {
    matches!(
        e,
        EnrollError::Unreachable {
            maybe_delivered: true,
            ..
        }
    )
}

/// Creates `dir` (and parents) with mode 0700; an existing directory keeps its mode.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_one_place_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "tte_abc\n").unwrap();
        assert_eq!(read_token(None, Some(&file)).unwrap(), "tte_abc");
        assert_eq!(read_token(Some(" tte_x "), None).unwrap(), "tte_x");
        assert!(read_token(Some("a"), Some(&file)).is_err());
        assert!(read_token(None, None).is_err());
        assert!(read_token(None, Some(&dir.path().join("missing"))).is_err());
        std::fs::write(&file, "\n").unwrap();
        assert!(read_token(None, Some(&file)).is_err());
        std::fs::write(&file, "two words").unwrap();
        assert!(read_token(None, Some(&file)).is_err());
    }

    #[test]
    fn answers_are_checked() {
        let key = Identity::generate().public_key_b64();
        let ok = format!(r#"{{"agent_id":"a-0011223344556677","server_signing_key":"{key}"}}"#);
        assert!(parse_answer(ok.as_bytes()).is_ok());
        assert!(parse_answer(b"{}").is_err());
        assert!(parse_answer(
            format!(r#"{{"agent_id":"../x","server_signing_key":"{key}"}}"#).as_bytes()
        )
        .is_err());
        assert!(parse_answer(br#"{"agent_id":"a-1","server_signing_key":"AAAA"}"#).is_err());
    }
}
