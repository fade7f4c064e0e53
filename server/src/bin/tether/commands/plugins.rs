//! `tether plugins upload FILE` (`POST /api/v1/plugins`) and `tether plugins list`.

use std::path::Path;
use std::process::ExitCode;

use serde_json::Value;

use super::{items, str_at, u64_at};
use crate::client::Client;
use crate::error::{About, CliError};
use crate::output::{self, ago, bytes, cell, now_unix_ms, Table};
use crate::upload::{upload_and_report, Destination};

/// Uploads a plugin bundle.
pub fn upload(client: &Client, file: &Path, json: bool) -> Result<ExitCode, CliError> {
    let what = format!("plugin bundle {}", file.display());
    upload_and_report(
        client,
        &Destination {
            method: "POST",
            path: "/api/v1/plugins",
            content_type: "application/gzip",
            what: &what,
        },
        file,
        json,
        |answer| {
            format!(
                "plugin {} {} uploaded, sha256 {}",
                str_at(answer, "name"),
                str_at(answer, "version"),
                str_at(answer, "sha256")
            )
        },
    )
}

/// Every plugin version.
pub fn list(client: &Client, json: bool) -> Result<ExitCode, CliError> {
    let plugins = client
        .get_json("/api/v1/plugins")
        .about(|| "plugins".to_owned())?;
    if json {
        output::json(&plugins)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_unix_ms();
    let mut table = Table::new(&[
        "NAME",
        "VERSION",
        "STEPS",
        "SIZE",
        "DOWNLOADS",
        "UPLOADED",
        "SHA256",
    ]);
    for p in plugins.as_array().into_iter().flatten() {
        let steps: Vec<&str> = items(p, "steps")
            .iter()
            .map(|s| str_at(s, "name"))
            .collect();
        table.row(vec![
            cell(&p["name"]),
            cell(&p["version"]),
            steps.join(","),
            u64_at(p, "size").map_or_else(|| "-".to_owned(), bytes),
            cell(&p["downloads"]),
            ago(u64_at(p, "uploaded_unix_ms"), now),
            cell(p.get("sha256").unwrap_or(&Value::Null)),
        ]);
    }
    table.print()?;
    Ok(ExitCode::SUCCESS)
}
