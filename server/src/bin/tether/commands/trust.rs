//! `tether trust [status]`: `GET /api/v1/trust`, where a key rollover stands;
//! `tether trust begin|switch|finish [--force]`: `POST /api/v1/trust/STEP`.
//!
//! The server's answer names the CA(s) operators' clients should trust; the stored login
//! (`tether login`) is updated to them, so the CLI keeps reaching the server across the
//! switch. The answer came over TLS checked against the CA stored before, from the server
//! holding the admin token, so nobody else can plant a CA this way. With `--ca` or
//! `TETHER_CA` nothing is stored: update that file yourself.

use std::process::ExitCode;

use serde_json::Value;

use super::{items, str_at};
use crate::client::Client;
use crate::config;
use crate::error::{About, CliError};
use crate::output::{self, cell};

/// Where the rollover stands.
pub fn status(client: &Client, store_ca: bool, json: bool) -> Result<ExitCode, CliError> {
    let progress = client
        .get_json("/api/v1/trust")
        .about(|| "trust".to_owned())?;
    show(&progress, store_ca, json)
}

/// Takes rollover step `step` (begin, switch or finish).
pub fn step(
    client: &Client,
    step: &str,
    force: bool,
    store_ca: bool,
    json: bool,
) -> Result<ExitCode, CliError> {
    let path = if force {
        format!("/api/v1/trust/{step}?force=true")
    } else {
        format!("/api/v1/trust/{step}")
    };
    let progress = client
        .post_json(&path, None)
        .about(|| format!("trust {step}"))?;
    show(&progress, store_ca, json)
}

fn show(progress: &Value, store_ca: bool, json: bool) -> Result<ExitCode, CliError> {
    let stored = if store_ca {
        store_operator_ca(str_at(progress, "operator_ca_pem"))?
    } else {
        false
    };
    if json {
        output::json(progress)?;
        return Ok(ExitCode::SUCCESS);
    }
    output::line(&format!(
        "trust set {} ({}): {} of {} agents and relays hold it; {} signing key(s) trusted",
        cell(&progress["serial"]),
        cell(&progress["phase"]),
        cell(&progress["confirmed"]),
        cell(&progress["peers"]),
        items(progress, "signing_keys").len(),
    ))?;
    for b in items(progress, "behind") {
        output::line(&format!(
            "  behind: {} {} (holds set {})",
            cell(&b["role"]),
            cell(&b["name"]),
            cell(&b["serial"])
        ))?;
    }
    for b in items(progress, "old_certificates") {
        output::line(&format!("  old certificate: relay {}", cell(&b["name"])))?;
    }
    match (progress["next"].as_str(), progress["waiting_for"].as_str()) {
        (Some(next), Some(waiting)) => {
            output::line(&format!("next: tether trust {next} (waiting: {waiting})"))?
        }
        (Some(next), None) => output::line(&format!("next: tether trust {next} (ready)"))?,
        _ => {}
    }
    if stored {
        output::line("the stored login now trusts the server CA(s) the server names")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Replaces the stored login's CA with `ca_pem` if it differs; whether it did.
fn store_operator_ca(ca_pem: &str) -> Result<bool, CliError> {
    if ca_pem.is_empty() || tether_shared::tls::client_config(ca_pem).is_err() {
        return Ok(false);
    }
    let path = config::login_path()?;
    let Some(mut login) = config::load(&path)? else {
        return Ok(false);
    };
    if login.ca_pem == ca_pem {
        return Ok(false);
    }
    login.ca_pem = ca_pem.to_owned();
    config::save(&path, &login)?;
    Ok(true)
}
