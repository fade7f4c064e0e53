//! `tether tokens create`: `POST /api/v1/enrollment-tokens`. The token alone goes to stdout
//! (`TOKEN=$(tether tokens create)`), its terms to stderr.

use std::process::ExitCode;

use serde_json::json;

use super::{str_at, u64_at};
use crate::client::Client;
use crate::error::{About, CliError};
use crate::output::{self, duration, now_unix_ms};

/// Creates a token for `uses` enrollments of `role` ("agent" or "relay"), valid `ttl_s`.
pub fn create(
    client: &Client,
    uses: u32,
    ttl_s: u64,
    role: &str,
    json: bool,
) -> Result<ExitCode, CliError> {
    let body = json!({"uses": uses, "ttl_s": ttl_s, "role": role});
    let answer = client
        .post_json("/api/v1/enrollment-tokens", Some(&body))
        .about(|| "creating an enrollment token".to_owned())?;
    if json {
        output::json(&answer)?;
        return Ok(ExitCode::SUCCESS);
    }
    let token = str_at(&answer, "token");
    if token.is_empty() {
        return Err(CliError::Failed(format!(
            "the server's answer holds no token: {answer}"
        )));
    }
    output::line(token)?;
    let left = u64_at(&answer, "expires_unix_ms")
        .map(|at| duration(at.saturating_sub(now_unix_ms())))
        .unwrap_or_else(|| "?".to_owned());
    eprintln!("tether: {role} enrollment token for {uses} use(s), valid for {left}");
    Ok(ExitCode::SUCCESS)
}
