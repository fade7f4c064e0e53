//! Unit tests of layering, env filtering, validation and `Secret`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn opts(dir: &Path, file: Option<PathBuf>) -> LoadOptions {
    LoadOptions {
        config_dir: Some(dir.to_path_buf()),
        file,
        env: false,
    }
}

fn problems(err: ConfigError) -> Vec<String> {
    match err {
        ConfigError::Invalid { problems } => problems,
        other => panic!("expected Invalid, got {other}"),
    }
}

#[test]
fn defaults_validate_for_every_role() {
    let dir = tempfile::tempdir().unwrap();
    let server = load::<RawServerConfig>(&opts(dir.path(), None), None).unwrap();
    assert_eq!(server.listen.https, "0.0.0.0:8443".parse().unwrap());
    assert_eq!(server.listen.wss, "0.0.0.0:7919".parse().unwrap());
    assert_eq!(server.server.heartbeat_interval, Duration::from_secs(5));
    assert_eq!(server.server.heartbeat_timeout, Duration::from_secs(15));
    assert_eq!(server.server.max_handshakes_in_flight, 1_024);
    let agent = load::<RawAgentConfig>(&opts(dir.path(), None), None).unwrap();
    assert_eq!(agent.agent.reconnect_min, Duration::from_millis(200));
    assert!(agent.agent.upstreams.is_empty());
    let relay = load::<RawRelayConfig>(&opts(dir.path(), None), None).unwrap();
    assert_eq!(relay.listen.admin, "127.0.0.1:20081".parse().unwrap());
    assert_eq!(relay.listen.downstream, "0.0.0.0:20080".parse().unwrap());
}

#[test]
fn layers_apply_in_order_defaults_dir_file_env() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "server.toml",
        "[server]\nheartbeat_interval_ms = 1000\nmax_unacked = 10\nheartbeat_timeout_ms = 40000\n",
    );
    let file = write(
        dir.path(),
        "override.toml",
        "[server]\nheartbeat_interval_ms = 2000\nmax_unacked = 20\n",
    );
    let env = vars(&[
        ("TETHER_SERVER__HEARTBEAT_INTERVAL_MS", "3000"),
        ("TETHER_SERVER__DATA_DIR", "/srv/tether"),
        ("TETHER_LISTEN__WSS", "127.0.0.1:0"),
    ]);
    let cfg = load::<RawServerConfig>(&opts(dir.path(), Some(file)), Some(env)).unwrap();
    assert_eq!(
        cfg.server.heartbeat_interval,
        Duration::from_millis(3000),
        "env beats file"
    );
    assert_eq!(cfg.server.max_unacked, 20, "file beats dir");
    assert_eq!(cfg.server.data_dir, Path::new("/srv/tether"));
    assert_eq!(cfg.listen.wss, "127.0.0.1:0".parse().unwrap());
    assert_eq!(
        cfg.server.heartbeat_timeout,
        Duration::from_secs(40),
        "dir beats defaults"
    );
    assert_eq!(
        cfg.server.max_handshakes_in_flight, 1_024,
        "defaults fill the rest"
    );
}

#[test]
fn env_lists_and_nested_sections() {
    let dir = tempfile::tempdir().unwrap();
    let env = vars(&[
        ("TETHER_AGENT__UPSTREAMS", "wss://a:7919,https://b:8443"),
        ("TETHER_LOG__LEVEL", "debug"),
    ]);
    let cfg = load::<RawAgentConfig>(&opts(dir.path(), None), Some(env)).unwrap();
    assert_eq!(cfg.agent.upstreams, vec!["wss://a:7919", "https://b:8443"]);
    assert_eq!(cfg.log.level, "debug");

    let env = vars(&[
        ("TETHER_LISTEN__ADMIN", "127.0.0.1:0"),
        ("TETHER_RELAY__UPSTREAMS", "wss://server:7919"),
        ("TETHER_RELAY__DATA_DIR", "/srv/relay"),
    ]);
    let cfg = load::<RawRelayConfig>(&opts(dir.path(), None), Some(env)).unwrap();
    assert_eq!(cfg.listen.admin.port(), 0);
    assert_eq!(cfg.relay.upstreams, vec!["wss://server:7919"]);
    assert_eq!(cfg.relay.data_dir, Path::new("/srv/relay"));
}

#[test]
fn plain_tether_vars_are_not_config_keys() {
    let dir = tempfile::tempdir().unwrap();
    let env = vars(&[
        ("TETHER_CONFIG_DIR", "/somewhere"),
        ("TETHER_TOKEN", "x"),
        ("OTHER__THING", "y"),
    ]);
    load::<RawServerConfig>(&opts(dir.path(), None), Some(env)).unwrap();
}

#[test]
fn bad_env_override_names_the_environment_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let env = vars(&[("TETHER_SERVER__HEARTBEAT_INTERVAL_MS", "soon")]);
    let err = load::<RawServerConfig>(&opts(dir.path(), None), Some(env)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ConfigError::Environment { .. }), "{text}");
    assert!(text.contains("heartbeat_interval_ms"), "{text}");

    let env = vars(&[("TETHER_SERVER__NO_SUCH_KEY", "1")]);
    let text = load::<RawServerConfig>(&opts(dir.path(), None), Some(env))
        .unwrap_err()
        .to_string();
    assert!(text.contains("no_such_key"), "{text}");
}

#[test]
fn explicit_file_must_exist_but_dir_file_may_not() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let err = load::<RawServerConfig>(&opts(dir.path(), Some(missing.clone())), None).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Missing { path } if *path == missing),
        "{err}"
    );
    assert!(err.to_string().contains("nope.toml"));
}

#[test]
fn unknown_key_and_type_errors_name_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "server.toml",
        "[server]\nheartbeat_intervall_ms = 5\n",
    );
    let text = load::<RawServerConfig>(&opts(dir.path(), None), None)
        .unwrap_err()
        .to_string();
    assert!(text.contains("server.toml"), "{text}");
    assert!(text.contains("heartbeat_intervall_ms"), "{text}");

    write(
        dir.path(),
        "server.toml",
        "[server]\nmax_unacked = \"many\"\n",
    );
    let text = load::<RawServerConfig>(&opts(dir.path(), None), None)
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("server.toml") && text.contains("server.max_unacked"),
        "{text}"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let raw = RawServerConfig {
        server: RawServerSection {
            heartbeat_interval_ms: 0,
            max_unacked: -1,
            journal_cache_mib: 1,
            ..RawServerSection::default()
        },
        listen: RawServerListen {
            https: "nowhere".into(),
            ..RawServerListen::default()
        },
        log: LogConfig {
            level: "info,=[".into(),
        },
        ..RawServerConfig::default()
    };
    let found = problems(raw.validate().unwrap_err());
    assert_eq!(found.len(), 5, "{found:#?}");
    assert_eq!(
        found[0],
        "server.heartbeat_interval_ms: must be between 100 and 600000, got 0"
    );
    for key in [
        "server.max_unacked",
        "server.journal_cache_mib",
        "listen.https",
        "log.level",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(key)),
            "{key} in {found:#?}"
        );
    }
    let shown = ConfigError::Invalid { problems: found }.to_string();
    assert_eq!(shown.lines().count(), 6, "{shown}");
}

#[test]
fn cross_field_rules() {
    let mut raw = RawAgentConfig::default();
    raw.agent.reconnect_min_ms = 5_000;
    raw.agent.reconnect_max_ms = 1_000;
    raw.agent.worker_beat_timeout_ms = raw.agent.heartbeat_interval_ms;
    let found = problems(raw.validate().unwrap_err());
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found[0].starts_with("agent.reconnect_min_ms: must not exceed"));
    assert!(found[1].starts_with("agent.worker_beat_timeout_ms: must be greater than"));

    let mut raw = RawServerConfig::default();
    raw.listen.wss = raw.listen.https.clone();
    let found = problems(raw.clone().validate().unwrap_err());
    assert!(
        found[0].starts_with("listen.wss: must differ"),
        "{found:#?}"
    );
    raw.listen.https = "127.0.0.1:0".into();
    raw.listen.wss = "127.0.0.1:0".into();
    raw.validate().unwrap();
}

#[test]
fn relay_admin_must_be_loopback() {
    let mut raw = RawRelayConfig::default();
    raw.listen.admin = "0.0.0.0:20081".into();
    let found = problems(raw.clone().validate().unwrap_err());
    assert!(
        found[0].starts_with("listen.admin: must be a loopback address"),
        "{found:#?}"
    );
    raw.listen.admin = "[::1]:20081".into();
    raw.validate().unwrap();
}

#[test]
fn upstreams_must_be_https_or_wss() {
    let mut raw = RawRelayConfig::default();
    raw.relay.upstreams = vec!["wss://ok:7919".into(), "http://server:8443".into()];
    let found = problems(raw.validate().unwrap_err());
    assert_eq!(
        found,
        vec!["relay.upstreams[1]: must start with https:// or wss://, got \"http://server:8443\""]
    );
}

#[test]
fn check_config_output_is_a_valid_config() {
    let cfg = RawAgentConfig::default().validate().unwrap();
    let json = serde_json::to_value(&cfg).unwrap();
    assert_eq!(json["agent"]["reconnect_max_ms"], 30_000);
    let back: RawAgentConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back, RawAgentConfig::default());
}

#[test]
fn secret_never_prints() {
    let secret = Secret::new("hunter2".to_owned());
    assert_eq!(format!("{secret}"), "***");
    assert_eq!(format!("{secret:?}"), "***");
    assert_eq!(format!("{:?}", Some(&secret)), "Some(***)");
    assert_eq!(serde_json::to_string(&secret).unwrap(), "\"***\"");
    assert_eq!(secret.expose(), "hunter2");
    let parsed: Secret<String> = serde_json::from_str("\"s3cr3t\"").unwrap();
    assert_eq!(parsed.expose(), "s3cr3t");
}

#[test]
fn storage_is_sled_unless_postgres_is_named_with_its_database() {
    let with = |storage: RawStorage| {
        RawServerConfig {
            storage,
            ..RawServerConfig::default()
        }
        .validate()
    };
    assert_eq!(with(RawStorage::default()).unwrap().storage, Storage::Sled);
    let pg = with(RawStorage {
        backend: "postgres".into(),
        url: "postgres://tether:hunter2@db.example/tether".into(),
        ..RawStorage::default()
    })
    .unwrap();
    let Storage::Postgres {
        url,
        ca_file,
        pool_size,
        node_name,
        node_url,
        lease_ttl,
        every_node_serves_agents,
    } = &pg.storage
    else {
        panic!("{:?}", pg.storage);
    };
    assert_eq!(
        (url.expose().as_str(), ca_file, *pool_size, *lease_ttl),
        (
            "postgres://tether:hunter2@db.example/tether",
            &None,
            4,
            Duration::from_secs(15)
        )
    );
    assert!(!node_name.is_empty(), "the host name by default");
    assert!(!every_node_serves_agents, "standbys only wait, by default");
    assert_eq!(node_url, &None, "not advertised by default");
    let advertised = with(RawStorage {
        backend: "postgres".into(),
        url: "postgres://db.example/tether".into(),
        node_url: "https://server-a.example:9443/".into(),
        ..RawStorage::default()
    })
    .unwrap();
    assert!(
        matches!(&advertised.storage, Storage::Postgres { node_url: Some(u), .. } if u == "https://server-a.example:9443"),
        "{:?}",
        advertised.storage
    );
    let refused = with(RawStorage {
        backend: "postgres".into(),
        url: "postgres://db.example/tether".into(),
        node_url: "http://server-a/api".into(),
        ..RawStorage::default()
    })
    .unwrap_err()
    .to_string();
    assert!(refused.contains("storage.node_url"), "{refused}");
    let long = with(RawStorage {
        backend: "postgres".into(),
        url: "postgres://db.example/tether".into(),
        node_url: format!("https://{}.example", "a".repeat(300)),
        ..RawStorage::default()
    })
    .unwrap_err()
    .to_string();
    assert!(long.contains("at most 255"), "{long}");
    // The password never prints: not in Debug, not in --check-config's output.
    assert!(!format!("{pg:?}").contains("hunter2"));
    let shown = toml::to_string(&pg).unwrap();
    assert!(
        shown.contains("postgres://tether:***@db.example/tether") && !shown.contains("hunter2"),
        "{shown}"
    );
    for (bad, key) in [
        (
            RawStorage {
                backend: "postgres".into(),
                ..RawStorage::default()
            },
            "storage.url",
        ),
        (
            RawStorage {
                backend: "mysql".into(),
                ..RawStorage::default()
            },
            "storage.backend",
        ),
        (
            RawStorage {
                pool_size: 0,
                ..RawStorage::default()
            },
            "storage.pool_size",
        ),
        (
            RawStorage {
                lease_ttl_ms: 10,
                ..RawStorage::default()
            },
            "storage.lease_ttl_ms",
        ),
    ] {
        let found = problems(with(bad).unwrap_err());
        assert!(found.iter().any(|p| p.starts_with(key)), "{key}: {found:?}");
    }
}

#[test]
fn a_database_url_prints_without_its_password() {
    assert_eq!(
        masked_url("host=/run/pg user=tether password=s3cret dbname=t"),
        "host=/run/pg user=tether password=*** dbname=t"
    );
    assert_eq!(
        masked_url("postgresql://u:p%40ss@h:5432/d?sslmode=require"),
        "postgresql://u:***@h:5432/d?sslmode=require"
    );
    assert_eq!(masked_url("postgres://u:p@ss@h/d"), "postgres://u:***@h/d");
    assert_eq!(masked_url("postgres://h/d"), "postgres://h/d");
    assert_eq!(masked_url("postgres://u@h/d"), "postgres://u@h/d");
}
