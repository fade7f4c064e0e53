//! Uploading a file: its sha256 is computed first (it goes in the `X-Checksum-Sha256` header,
//! ahead of the body), then the file is streamed with `Content-Length`, a progress bar on
//! stderr when stderr is a terminal (nothing otherwise), and the server's answer checked
//! against the local sha256.

use std::fs::File;
use std::io::{self, IsTerminal, Read, Seek};
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tether_shared::https::Upload;

use crate::client::Client;
use crate::error::{About, CliError};

/// What to upload where.
pub struct Destination<'a> {
    /// `PUT` or `POST`.
    pub method: &'a str,
    /// The API path.
    pub path: &'a str,
    /// The body's media type.
    pub content_type: &'a str,
    /// What the upload is, for messages: "artifact site 1.2".
    pub what: &'a str,
}

/// The file's sha256 (lowercase hex) and length, read once.
pub fn sha256_of(file: &mut File) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let length = io::copy(file, &mut hasher)?;
    Ok((hex::encode(hasher.finalize()), length))
}

/// Uploads `path` to `to`; the server's JSON answer, once its `sha256` matches the file's.
/// Sends `path` to `to`, then prints the server's answer (`--json`) or `summary` of it.
pub fn upload_and_report(
    client: &Client,
    to: &Destination<'_>,
    path: &Path,
    json: bool,
    summary: impl Fn(&Value) -> String,
) -> Result<std::process::ExitCode, CliError> {
    let answer = send_file(client, to, path)?;
    if json {
        crate::output::json(&answer)?;
    } else {
        crate::output::line(&summary(&answer))?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

pub fn send_file(client: &Client, to: &Destination<'_>, path: &Path) -> Result<Value, CliError> {
    let failed = |e: io::Error| CliError::Failed(format!("{}: {e}", path.display()));
    let mut file = File::open(path).map_err(failed)?;
    let (sha256, length) = sha256_of(&mut file).map_err(failed)?;
    file.rewind().map_err(failed)?;
    let bar = progress_bar(length, to.what);
    let mut reader = (&file).take(length);
    let body = Upload {
        body: &mut reader,
        length,
        progress: &mut |sent| bar.set_position(sent),
    };
    let answer = client
        .upload(to.method, to.path, to.content_type, &sha256, body)
        .about(|| to.what.to_owned());
    bar.finish_and_clear();
    let answer = answer?;
    match answer.get("sha256").and_then(Value::as_str) {
        Some(stored) if stored == sha256 => Ok(answer),
        stored => Err(CliError::Failed(format!(
            "{}: the server answered sha256 {}, but the file's is {sha256}",
            to.what,
            stored.unwrap_or("(none)")
        ))),
    }
}

/// A byte progress bar on stderr if it is a terminal; a hidden one otherwise.
fn progress_bar(length: u64, what: &str) -> ProgressBar {
    if !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(length)
        .with_style(style)
        .with_message(format!("uploading {what}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn hashes_the_whole_file() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"abc").unwrap();
        file.rewind().unwrap();
        let (sha256, length) = sha256_of(&mut file).unwrap();
        assert_eq!(
            sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(length, 3);
    }
}
