//! `tether tokens create`: `POST /api/v1/enrollment-tokens`. The token alone goes to stdout
//! (`TOKEN=$(tether tokens create)`), its terms and id to stderr. `tether tokens [list]`:
//! `GET /api/v1/enrollment-tokens` (never the tokens themselves); `tether tokens revoke ID`:
//! `DELETE /api/v1/enrollment-tokens/ID`.

use std::process::ExitCode;

use serde_json::json;

use super::{str_at, u64_at};
use crate::client::{segment, Client};
use crate::error::{About, CliError};
use crate::output::{self, ago, cell, duration, now_unix_ms, Table};

/// The live tokens.
pub fn list(client: &Client, json: bool) -> Result<ExitCode, CliError> {
    let tokens = client
        .get_json("/api/v1/enrollment-tokens")
        .about(|| "enrollment tokens".to_owned())?;
    if json {
        output::json(&tokens)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_unix_ms();
    let mut table = Table::new(&["ID", "ROLE", "USES LEFT", "EXPIRES IN", "CREATED"]);
    for t in tokens.as_array().into_iter().flatten() {
        table.row(vec![
            cell(&t["id"]),
            cell(&t["role"]),
            cell(&t["uses_left"]),
            u64_at(t, "expires_unix_ms")
                .map(|at| duration(at.saturating_sub(now)))
                .unwrap_or_else(|| "-".to_owned()),
            ago(u64_at(t, "created_unix_ms"), now),
        ]);
    }
    table.print()?;
    Ok(ExitCode::SUCCESS)
}

/// Revokes the token `id`.
pub fn revoke(client: &Client, id: &str, json: bool) -> Result<ExitCode, CliError> {
    let answer = client
        .delete_json(&format!("/api/v1/enrollment-tokens/{}", segment(id)))
        .about(|| format!("enrollment token {id}"))?;
    if json {
        output::json(&answer)?;
    } else {
        output::line(&format!("enrollment token {id} revoked"))?;
    }
    Ok(ExitCode::SUCCESS)
}

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
    // The lifetime asked for: the time left is a few milliseconds less already, which would
    // print 86400 s as "23h".
    let left = duration(ttl_s.saturating_mul(1000));
    eprintln!(
        "tether: {role} enrollment token {} for {uses} use(s), valid for {left}",
        str_at(&answer, "id")
    );
    Ok(ExitCode::SUCCESS)
}
