//! `tether artifacts upload NAME VERSION FILE` (`PUT /api/v1/artifacts/{name}/{version}`
//! with `X-Checksum-Sha256`, which the server verifies) and `tether artifacts list`.

use std::path::Path;
use std::process::ExitCode;

use super::{str_at, u64_at};
use crate::client::{segment, Client};
use crate::error::{About, CliError};
use crate::output::{self, ago, bytes, cell, now_unix_ms, Table};
use crate::upload::{upload_and_report, Destination};

/// Uploads `file` as artifact `name` `version`.
pub fn upload(
    client: &Client,
    name: &str,
    version: &str,
    file: &Path,
    json: bool,
) -> Result<ExitCode, CliError> {
    let path = format!("/api/v1/artifacts/{}/{}", segment(name), segment(version));
    let what = format!("artifact {name} {version}");
    upload_and_report(
        client,
        &Destination {
            method: "PUT",
            path: &path,
            content_type: "application/octet-stream",
            what: &what,
        },
        file,
        json,
        |answer| {
            format!(
                "{what} uploaded: {}, sha256 {}",
                u64_at(answer, "size").map_or_else(|| "-".to_owned(), bytes),
                str_at(answer, "sha256")
            )
        },
    )
}

/// Every artifact version.
pub fn list(client: &Client, json: bool) -> Result<ExitCode, CliError> {
    let artifacts = client
        .get_json("/api/v1/artifacts")
        .about(|| "artifacts".to_owned())?;
    if json {
        output::json(&artifacts)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_unix_ms();
    let mut table = Table::new(&["NAME", "VERSION", "SIZE", "UPLOADED", "SHA256"]);
    for a in artifacts.as_array().into_iter().flatten() {
        table.row(vec![
            cell(&a["name"]),
            cell(&a["version"]),
            u64_at(a, "size").map_or_else(|| "-".to_owned(), bytes),
            ago(u64_at(a, "uploaded_unix_ms"), now),
            cell(&a["sha256"]),
        ]);
    }
    table.print()?;
    Ok(ExitCode::SUCCESS)
}
