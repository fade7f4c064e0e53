//! End-to-end tests of the three binaries' command lines: version, help, `--check-config`
//! (defaults, overrides, every problem reported) and `tether-server init`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tether_shared::tls;
use tether_tests::{command, run, stderr, stdout};

const BINARIES: [&str; 3] = ["tether-server", "tether-agent", "tether-relay"];

#[test]
fn version_and_help_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    for name in BINARIES {
        let out = run(name, dir.path(), ["--version"]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert_eq!(
            stdout(&out).trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION"))
        );

        let out = run(name, dir.path(), ["--help"]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        for flag in ["--config <FILE>", "--config-dir <DIR>", "--check-config"] {
            assert!(stdout(&out).contains(flag), "{name} --help lacks {flag}");
        }
    }
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    for name in BINARIES {
        let out = run(name, dir.path(), ["--no-such-flag"]);
        assert_eq!(out.status.code(), Some(2), "{name}");
    }
}

#[test]
fn check_config_with_defaults_prints_a_reloadable_config() {
    let dir = tempfile::tempdir().unwrap();
    for name in BINARIES {
        let out = run(name, dir.path(), ["--check-config"]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
        let text = stdout(&out);
        let effective = text
            .strip_prefix("config ok\n")
            .unwrap_or_else(|| panic!("{name}: {text}"));
        assert!(
            effective.contains("[log]\nlevel = \"info\""),
            "{name}: {effective}"
        );
        // The printed config is itself a valid config file.
        let file = dir.path().join(format!("{name}.effective.toml"));
        fs::write(&file, effective).unwrap();
        let again = run(
            name,
            dir.path(),
            ["--check-config", "--config"]
                .into_iter()
                .map(Into::into)
                .chain([file.into_os_string()]),
        );
        assert_eq!(again.status.code(), Some(0), "{name}: {}", stderr(&again));
        assert_eq!(stdout(&again), text, "{name}");
    }
}

#[test]
fn env_overrides_file_which_overrides_config_dir() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("server.toml"),
        "[server]\nmax_unacked = 10\nheartbeat_timeout_ms = 40000\n",
    )
    .unwrap();
    let file = dir.path().join("extra.toml");
    fs::write(
        &file,
        "[server]\nmax_unacked = 20\nmax_handshakes_in_flight = 7\n",
    )
    .unwrap();
    let out = command("tether-server", dir.path())
        .arg("--check-config")
        .arg("--config")
        .arg(&file)
        .env("TETHER_SERVER__MAX_HANDSHAKES_IN_FLIGHT", "9")
        .env("TETHER_LISTEN__WSS", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for line in [
        "heartbeat_timeout_ms = 40000",
        "max_unacked = 20",
        "max_handshakes_in_flight = 9",
        "wss = \"127.0.0.1:0\"",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}

#[test]
fn bad_config_exits_2_and_names_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &[&str]); 3] = [
        (
            "tether-server",
            "[server]\nheartbeat_interval_ms = 0\nheartbeat_timeout_ms = -1\n[listen]\nhttps = \"nowhere\"\n",
            &["server.heartbeat_interval_ms", "server.heartbeat_timeout_ms", "listen.https"],
        ),
        (
            "tether-agent",
            "[agent]\nupstreams = [\"http://x\"]\nreconnect_min_ms = 9000\nreconnect_max_ms = 10\n",
            &["agent.upstreams[0]", "agent.reconnect_min_ms"],
        ),
        (
            "tether-relay",
            "[listen]\nadmin = \"10.0.0.1:20081\"\n[relay]\nmax_queue_per_agent = 0\n",
            &["listen.admin", "relay.max_queue_per_agent"],
        ),
    ];
    for (name, toml, keys) in cases {
        let file = dir.path().join(format!("{name}.bad.toml"));
        fs::write(&file, toml).unwrap();
        let out = command(name, dir.path())
            .arg("--check-config")
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        assert!(stdout(&out).is_empty(), "{name}: {}", stdout(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!("({} problems)", keys.len())),
            "{name}: {err}"
        );
        for key in keys {
            assert!(
                err.contains(&format!("- {key}: ")),
                "{name}: {key} missing from:\n{err}"
            );
        }
    }
}

#[test]
fn missing_or_malformed_config_file_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.toml");
    let out = command("tether-agent", dir.path())
        .arg("--check-config")
        .arg("--config")
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("absent.toml: not found"),
        "{}",
        stderr(&out)
    );

    fs::write(dir.path().join("relay.toml"), "[relay]\nbogus = 1\n").unwrap();
    let out = run("tether-relay", dir.path(), ["--check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("relay.toml") && err.contains("unknown field `bogus`"),
        "{err}"
    );
}

fn snapshot(dir: &Path) -> BTreeMap<String, (Vec<u8>, u32)> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, (fs::read(&path).unwrap(), mode))
        })
        .collect()
}

#[test]
fn server_init_creates_a_working_data_dir_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let args = [
        "init",
        "--data",
        data.to_str().unwrap(),
        "--hostname",
        "tether.test",
        "--hostname",
        "10.1.2.3",
    ];
    let out = run("tether-server", tmp.path(), args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // The token and the web admin password are printed exactly once, and nowhere else.
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 2, "{text}");
    let token = text
        .lines()
        .next()
        .unwrap()
        .strip_prefix("admin token: ")
        .unwrap();
    let password = text
        .lines()
        .nth(1)
        .unwrap()
        .strip_prefix("admin password: ")
        .unwrap();
    assert_eq!(
        fs::read_to_string(data.join("admin.password")).unwrap(),
        password
    );
    assert_eq!(token.len(), 43, "32 bytes in unpadded base64url: {token}");
    assert!(token
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    assert!(!stderr(&out).contains(token), "token leaked to the log");
    assert!(
        !stderr(&out).contains(password),
        "password leaked to the log"
    );
    assert_eq!(fs::read_to_string(data.join("admin.token")).unwrap(), token);

    let files = snapshot(&data);
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "admin.password",
            "admin.token",
            "agent-ca.pem",
            "ca.key",
            "ca.pem",
            "relay-ca.key",
            "relay-ca.pem",
            "server.key",
            "server.pem",
            "signing.key",
            "signing.pem",
            "signing.pub"
        ]
    );
    for secret in [
        "admin.password",
        "admin.token",
        "ca.key",
        "relay-ca.key",
        "server.key",
        "signing.key",
    ] {
        assert_eq!(files[secret].1, 0o600, "{secret}");
    }
    assert_eq!(
        fs::metadata(&data).unwrap().permissions().mode() & 0o777,
        0o700
    );

    // The certificate chains to the CA for every requested name, and for no other.
    let pem = |name: &str| String::from_utf8(files[name].0.clone()).unwrap();
    let client = Arc::new(tls::client_config(&pem("ca.pem")).unwrap());
    let server = Arc::new(tls::server_config(&pem("server.pem"), &pem("server.key")).unwrap());
    for name in ["tether.test", "10.1.2.3"] {
        tls::handshake_in_memory(client.clone(), server.clone(), name).unwrap();
    }
    assert!(tls::handshake_in_memory(client, server, "localhost").is_err());
    tls::Ca::from_pem(&pem("ca.pem"), &pem("ca.key")).unwrap();
    // The relay CA is another CA; agents trust both, operators only ca.pem.
    tls::Ca::from_pem(&pem("relay-ca.pem"), &pem("relay-ca.key")).unwrap();
    assert_ne!(pem("relay-ca.pem"), pem("ca.pem"));
    assert_eq!(
        pem("agent-ca.pem"),
        format!(
            "{}\n{}\n",
            pem("ca.pem").trim_end(),
            pem("relay-ca.pem").trim_end()
        )
    );
    tether_shared::identity::Identity::load(&data.join("signing.key")).unwrap();
    let public = pem("signing.pub");
    tether_shared::identity::PublicKey::from_b64(public.trim()).unwrap();

    // A second init refuses and changes nothing.
    let again = run("tether-server", tmp.path(), args);
    assert_eq!(again.status.code(), Some(1));
    assert!(stdout(&again).is_empty(), "{}", stdout(&again));
    assert!(
        stderr(&again).contains("already initialized"),
        "{}",
        stderr(&again)
    );
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    assert_eq!(snapshot(&data), files);

    // --force replaces everything, including the token.
    let forced = run(
        "tether-server",
        tmp.path(),
        args.iter().copied().chain(["--force"]),
    );
    assert_eq!(forced.status.code(), Some(0), "{}", stderr(&forced));
    let new_token = stdout(&forced)
        .lines()
        .next()
        .unwrap_or_default()
        .strip_prefix("admin token: ")
        .unwrap()
        .to_owned();
    assert_ne!(new_token, token);
    assert_eq!(
        fs::read_to_string(data.join("admin.token")).unwrap(),
        new_token
    );
}

#[test]
fn server_init_uses_config_data_dir_and_default_hostnames() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("from-env");
    let out = command("tether-server", tmp.path())
        .arg("init")
        .env("TETHER_SERVER__DATA_DIR", &data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let read = |name: &str| fs::read_to_string(data.join(name)).unwrap();
    let client = Arc::new(tls::client_config(&read("ca.pem")).unwrap());
    let server = Arc::new(tls::server_config(&read("server.pem"), &read("server.key")).unwrap());
    for name in ["localhost", "127.0.0.1"] {
        tls::handshake_in_memory(client.clone(), server.clone(), name).unwrap();
    }
}

#[test]
fn server_init_with_bad_hostname_fails_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = run(
        "tether-server",
        tmp.path(),
        [
            "init",
            "--data",
            data.to_str().unwrap(),
            "--hostname",
            "bad name",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("invalid hostname \"bad name\""),
        "{}",
        stderr(&out)
    );
    assert!(!data.exists());
}
