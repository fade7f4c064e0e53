//! `tether users [list]`, `tether users create NAME [--role R]`, `tether users role NAME R`,
//! `tether users delete NAME`: the web application's users and their roles, through `GET`,
//! `POST /api/v1/users`, `PATCH` and `DELETE /api/v1/users/NAME`.
//! The password of a new user is read from standard input (its first line), never from the
//! command line, where other users could see it in the process list.

use std::process::ExitCode;

use serde_json::json;
use tether_shared::config::Secret;

use super::u64_at;
use crate::client::{segment, Client};
use crate::error::{About, CliError};
use crate::output::{self, ago, cell, now_unix_ms, Table};

/// Every user.
pub fn list(client: &Client, json: bool) -> Result<ExitCode, CliError> {
    let users = client
        .get_json("/api/v1/users")
        .about(|| "users".to_owned())?;
    if json {
        output::json(&users)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_unix_ms();
    let mut table = Table::new(&["NAME", "ROLE", "CREATED", "PASSWORD CHANGED", "LAST LOGIN"]);
    for u in users.as_array().into_iter().flatten() {
        table.row(vec![
            cell(&u["name"]),
            cell(&u["role"]),
            ago(u64_at(u, "created_unix_ms"), now),
            ago(u64_at(u, "password_changed_unix_ms"), now),
            ago(u64_at(u, "last_login_unix_ms"), now),
        ]);
    }
    table.print()?;
    Ok(ExitCode::SUCCESS)
}

/// Creates user `name` with `role` and the password on standard input.
pub fn create(client: &Client, name: &str, role: &str, json: bool) -> Result<ExitCode, CliError> {
    let password = read_password(name)?;
    let body = json!({"name": name, "password": password.expose(), "role": role});
    let answer = client
        .post_json("/api/v1/users", Some(&body))
        .about(|| format!("creating user {name}"))?;
    if json {
        output::json(&answer)?;
    } else {
        output::line(&format!("user {name} created ({role})"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Gives user `name` the role `role`.
pub fn role(client: &Client, name: &str, role: &str, json: bool) -> Result<ExitCode, CliError> {
    let answer = client
        .patch_json(
            &format!("/api/v1/users/{}", segment(name)),
            &json!({ "role": role }),
        )
        .about(|| format!("user {name}"))?;
    if json {
        output::json(&answer)?;
    } else {
        output::line(&format!("user {name} is now {role}"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Deletes user `name`.
pub fn delete(client: &Client, name: &str, json: bool) -> Result<ExitCode, CliError> {
    let answer = client
        .delete_json(&format!("/api/v1/users/{}", segment(name)))
        .about(|| format!("user {name}"))?;
    if json {
        output::json(&answer)?;
    } else {
        output::line(&format!("user {name} deleted; its web sessions ended"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The password from standard input (first line), with a prompt when it is a terminal.
fn read_password(name: &str) -> Result<Secret<String>, CliError> {
    super::login::read_line(
        &format!("password for {name} (at least 12 characters): "),
        "password",
    )
}
