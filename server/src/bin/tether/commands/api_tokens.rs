//! `tether api-tokens [list]`, `tether api-tokens create USER NAME [--role R] [--expires-in S]`,
//! `tether api-tokens revoke ID`: the users' API tokens, through `GET`, `POST` and `DELETE`
//! `/api/v1/api-tokens`. `create` prints the token alone to stdout (`TOKEN=$(tether api-tokens
//! create ...)`), the only time it is shown; its terms go to stderr.

use std::process::ExitCode;

use serde_json::json;

use super::{str_at, u64_at};
use crate::client::{segment, Client};
use crate::error::{About, CliError};
use crate::output::{self, ago, cell, duration, now_unix_ms, Table};

/// Every token: id, name, user, role, expiry; never the token itself.
pub fn list(client: &Client, json: bool) -> Result<ExitCode, CliError> {
    let tokens = client
        .get_json("/api/v1/api-tokens")
        .about(|| "API tokens".to_owned())?;
    if json {
        output::json(&tokens)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_unix_ms();
    let mut table = Table::new(&["ID", "NAME", "USER", "ROLE", "EXPIRES IN", "CREATED"]);
    for t in tokens.as_array().into_iter().flatten() {
        let expires = match u64_at(t, "expires_unix_ms") {
            None => "never".to_owned(),
            Some(at) if at <= now => "expired".to_owned(),
            Some(at) => duration(at - now),
        };
        table.row(vec![
            cell(&t["id"]),
            cell(&t["name"]),
            cell(&t["user"]),
            cell(&t["role"]),
            expires,
            ago(u64_at(t, "created_unix_ms"), now),
        ]);
    }
    table.print()?;
    Ok(ExitCode::SUCCESS)
}

/// Makes a token for `user` named `name`.
pub fn create(
    client: &Client,
    user: &str,
    name: &str,
    role: Option<&str>,
    expires_in_s: Option<u64>,
    json: bool,
) -> Result<ExitCode, CliError> {
    let mut body = json!({"user": user, "name": name});
    if let Some(role) = role {
        body["role"] = json!(role);
    }
    if let Some(s) = expires_in_s {
        body["expires_in_s"] = json!(s);
    }
    let answer = client
        .post_json("/api/v1/api-tokens", Some(&body))
        .about(|| format!("creating an API token for {user}"))?;
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
    let expiry = expires_in_s.map_or("never expires".to_owned(), |s| {
        format!("valid for {}", duration(s.saturating_mul(1000)))
    });
    eprintln!(
        "tether: API token {} ({}) for {user}, role {}, {expiry}; it is not shown again",
        str_at(&answer, "id"),
        str_at(&answer, "name"),
        str_at(&answer, "role"),
    );
    Ok(ExitCode::SUCCESS)
}

/// Revokes token `id`.
pub fn revoke(client: &Client, id: &str, json: bool) -> Result<ExitCode, CliError> {
    let answer = client
        .delete_json(&format!("/api/v1/api-tokens/{}", segment(id)))
        .about(|| format!("API token {id}"))?;
    if json {
        output::json(&answer)?;
    } else {
        output::line(&format!("API token {id} revoked"))?;
    }
    Ok(ExitCode::SUCCESS)
}
