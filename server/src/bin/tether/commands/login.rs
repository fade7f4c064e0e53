//! `tether login`, `tether logout` and `tether --check-config`: the stored login and the
//! effective connection settings.

use std::io::{self, BufRead, IsTerminal, Write};
use std::process::ExitCode;

use serde_json::json;
use tether_shared::config::Secret;

use crate::client::{Client, ClientError};
use crate::config::{self, ConfigError, Connection, Overrides, StoredLogin};
use crate::error::{About, CliError};
use crate::output;
use tether_shared::server_url::ServerUrl;

/// Checks the token against the server (`GET /api/v1/agents` must answer 200), then stores
/// server, CA and token. The token: `token_flag`, else `TETHER_TOKEN`, else standard input;
/// with `user`, one the server makes for that user from the password on standard input
/// (`POST /api/v1/login`).
pub fn login(
    settings: &Overrides,
    token_flag: Option<String>,
    user: Option<String>,
    json: bool,
) -> Result<ExitCode, CliError> {
    let server = settings.server.as_deref().ok_or_else(|| {
        CliError::Usage(
            "login needs --server URL (or TETHER_SERVER), e.g. https://tether.example.com:8443"
                .to_owned(),
        )
    })?;
    let server = ServerUrl::parse(server).map_err(ConfigError::BadServer)?;
    let ca_path = settings.ca.as_deref().ok_or_else(|| {
        CliError::Usage(
            "login needs --ca FILE (or TETHER_CA): the server's CA certificate, DATA/ca.pem"
                .to_owned(),
        )
    })?;
    let ca_pem = config::read_ca(ca_path)?;
    let token = match (user, token_flag.or_else(|| settings.token.clone())) {
        (Some(user), _) => password_login(&server, &ca_pem, ca_path, &user)?,
        (None, Some(token)) => token,
        (None, None) => read_token()?,
    };
    config::check_token(&token)?;
    let connection = Connection {
        server: server.clone(),
        ca_pem: ca_pem.clone(),
        token: Secret::new(token.clone()),
    };
    let client = Client::new(&connection).map_err(|e| match e {
        ClientError::Ca(e) => CliError::Usage(format!("--ca {}: {e}", ca_path.display())),
        other => other.into(),
    })?;
    client
        .get_json("/api/v1/agents")
        .about(|| format!("logging in to {server}"))?;
    let path = config::login_path()?;
    config::save(
        &path,
        &StoredLogin {
            server: server.to_string(),
            ca_pem,
            token,
        },
    )?;
    if json {
        output::json(&json!({"server": server.to_string(), "config": path}))?;
    } else {
        output::line(&format!(
            "logged in to {server}; token stored in {}",
            path.display()
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// An API token for `user`, made by the server from the password on standard input.
fn password_login(
    server: &ServerUrl,
    ca_pem: &str,
    ca_path: &std::path::Path,
    user: &str,
) -> Result<String, CliError> {
    let password = read_line(&format!("password for {user}: "), "the password")?;
    // The login route takes no bearer token; the client sends a placeholder.
    let connection = Connection {
        server: server.clone(),
        ca_pem: ca_pem.to_owned(),
        token: Secret::new("-".to_owned()),
    };
    let client = Client::new(&connection).map_err(|e| match e {
        ClientError::Ca(e) => CliError::Usage(format!("--ca {}: {e}", ca_path.display())),
        other => other.into(),
    })?;
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    let name: String = format!("cli-{host}")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    let answer = client
        .post_json(
            "/api/v1/login",
            Some(&json!({"user": user, "password": password.expose(), "name": name})),
        )
        .about(|| format!("logging in to {server} as {user}"))?;
    answer["token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| CliError::Failed("the server's answer holds no token".to_owned()))
}

/// The first line of standard input, with `prompt` when it is a terminal.
pub(crate) fn read_line(prompt: &str, what: &str) -> Result<Secret<String>, CliError> {
    let stdin = io::stdin();
    if stdin.is_terminal() {
        eprint!("{prompt}");
        let _ = io::stderr().flush();
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .map_err(|e| CliError::Failed(format!("reading {what} from standard input: {e}")))?;
    let line = line.trim_end_matches(['\r', '\n']).to_owned();
    if line.is_empty() {
        return Err(CliError::Usage(format!("no {what} on standard input")));
    }
    Ok(Secret::new(line))
}

/// The token from standard input (first line), with a prompt when it is a terminal.
fn read_token() -> Result<String, CliError> {
    let no_token = || {
        CliError::Usage(
            "no token: give --token, set TETHER_TOKEN, or write it on standard input".to_owned(),
        )
    };
    let token = read_line("admin token: ", "the token").map_err(|e| match e {
        CliError::Usage(_) => no_token(),
        other => other,
    })?;
    let token = token.expose().trim().to_owned();
    if token.is_empty() {
        return Err(no_token());
    }
    Ok(token)
}

/// Deletes the stored login.
pub fn logout(json: bool) -> Result<ExitCode, CliError> {
    let path = config::login_path()?;
    let removed = config::remove(&path)?;
    if json {
        output::json(&json!({"removed": removed, "config": path}))?;
    } else if removed {
        output::line(&format!("logged out: removed {}", path.display()))?;
    } else {
        output::line(&format!("not logged in (no {})", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints where each connection setting comes from (token masked); exit 2 if incomplete.
pub fn check_config(settings: &Overrides, json: bool) -> Result<ExitCode, CliError> {
    let path = config::login_path().ok();
    let stored = match &path {
        Some(p) => config::load(p)?,
        None => None,
    };
    let source = |flag: bool, env: &str| {
        if flag {
            format!(
                "--{} or {env}",
                env.trim_start_matches("TETHER_").to_lowercase()
            )
        } else if stored.is_some() {
            "login file".to_owned()
        } else {
            "missing".to_owned()
        }
    };
    let login_file = match &path {
        Some(p) if stored.is_some() => p.display().to_string(),
        Some(p) => format!("{} (absent)", p.display()),
        None => "unknown (set HOME or XDG_CONFIG_HOME)".to_owned(),
    };
    let server_source = source(settings.server.is_some(), "TETHER_SERVER");
    let ca_source = match &settings.ca {
        Some(path) => path.display().to_string(),
        None => source(false, "TETHER_CA"),
    };
    let token_source = if settings.token.is_some() {
        "TETHER_TOKEN".to_owned()
    } else {
        source(false, "TETHER_TOKEN")
    };
    let resolved = config::resolve_with(settings, stored);
    let server = resolved
        .as_ref()
        .map(|c| c.server.to_string())
        .unwrap_or_else(|_| "-".to_owned());
    if json {
        output::json(&json!({
            "login_file": login_file,
            "server": server,
            "server_from": server_source,
            "ca_from": ca_source,
            "token_from": token_source,
            "complete": resolved.is_ok(),
        }))?;
    } else {
        output::fields(&[
            ("login file", login_file),
            ("server", format!("{server} ({server_source})")),
            ("ca", ca_source),
            ("token", format!("*** ({token_source})")),
        ])?;
    }
    resolved?;
    Ok(ExitCode::SUCCESS)
}
