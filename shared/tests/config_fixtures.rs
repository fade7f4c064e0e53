//! Config fixtures: every file in `tests/fixtures/config/` is an invalid config named
//! `<role>_<case>.toml` that must fail to load, with each line of its sibling `.expected` file
//! appearing in the error; and every file in the repository's `config/` must load for its role.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::fs;
use std::path::{Path, PathBuf};

use tether_shared::config::{self, ConfigError, LoadOptions};

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config")
}

fn repo_config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
}

/// Loads `file` for `role` with an empty config dir and no environment, so only `file` counts.
fn load(role: &str, file: &Path) -> Result<(), ConfigError> {
    let empty = tempfile::tempdir().unwrap();
    let opts = LoadOptions {
        config_dir: Some(empty.path().to_path_buf()),
        file: Some(file.to_path_buf()),
        env: false,
    };
    match role {
        "server" => config::load_server(&opts).map(drop),
        "agent" => config::load_agent(&opts).map(drop),
        "relay" => config::load_relay(&opts).map(drop),
        other => panic!("{}: unknown role {other:?}", file.display()),
    }
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn stem(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}

#[test]
fn every_invalid_fixture_fails_with_its_expected_messages() {
    let files = toml_files(&fixtures_dir());
    assert!(
        files.len() >= 10,
        "fixture folder is (nearly) empty: {files:?}"
    );
    for file in files {
        let name = stem(&file);
        let role = name.split('_').next().unwrap();
        let expected = fs::read_to_string(file.with_extension("expected"))
            .unwrap_or_else(|e| panic!("{name}.expected: {e}"));
        let fragments: Vec<&str> = expected.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!fragments.is_empty(), "{name}.expected lists no message");
        let err = match load(role, &file) {
            Ok(()) => panic!("{name}: loaded, but must be rejected"),
            Err(e) => e.to_string(),
        };
        for fragment in fragments {
            assert!(
                err.contains(fragment),
                "{name}: {fragment:?} missing from:\n{err}"
            );
        }
    }
}

#[test]
fn every_expected_file_has_a_fixture() {
    for entry in fs::read_dir(fixtures_dir()).unwrap() {
        let path = entry.unwrap().path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => {}
            Some("expected") => assert!(
                path.with_extension("toml").exists(),
                "orphan {}",
                path.display()
            ),
            _ => panic!("unexpected file {}", path.display()),
        }
    }
}

#[test]
fn several_problems_are_all_reported_one_per_line() {
    let err = load("server", &fixtures_dir().join("server_many_problems.toml")).unwrap_err();
    let ConfigError::Invalid { problems } = &err else {
        panic!("expected Invalid, got {err}");
    };
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert_eq!(err.to_string().lines().count(), 1 + problems.len());
}

#[test]
fn shipped_config_files_are_valid_and_spell_out_the_defaults() {
    let files = toml_files(&repo_config_dir());
    let roles: Vec<String> = files.iter().map(|f| stem(f)).collect();
    assert_eq!(
        roles,
        ["agent", "relay", "server"],
        "config/ must hold one file per role"
    );
    for file in &files {
        load(&stem(file), file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
    // Loaded through the config dir, the shipped files equal the built-in defaults.
    let opts = |dir: &Path| LoadOptions {
        config_dir: Some(dir.to_path_buf()),
        file: None,
        env: false,
    };
    let empty = tempfile::tempdir().unwrap();
    let shipped = repo_config_dir();
    assert_eq!(
        config::load_server(&opts(&shipped)).unwrap(),
        config::load_server(&opts(empty.path())).unwrap()
    );
    assert_eq!(
        config::load_agent(&opts(&shipped)).unwrap(),
        config::load_agent(&opts(empty.path())).unwrap()
    );
    assert_eq!(
        config::load_relay(&opts(&shipped)).unwrap(),
        config::load_relay(&opts(empty.path())).unwrap()
    );

    // Every key is spelled out, under its section, right after a one-line comment.
    let defaults = [
        (
            "server",
            serde_json::to_value(config::load_server(&opts(empty.path())).unwrap()).unwrap(),
        ),
        (
            "agent",
            serde_json::to_value(config::load_agent(&opts(empty.path())).unwrap()).unwrap(),
        ),
        (
            "relay",
            serde_json::to_value(config::load_relay(&opts(empty.path())).unwrap()).unwrap(),
        ),
    ];
    for (role, value) in defaults {
        let text = fs::read_to_string(shipped.join(format!("{role}.toml"))).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (section, keys) in value.as_object().unwrap() {
            let header = lines.iter().position(|l| *l == format!("[{section}]"));
            let header = header.unwrap_or_else(|| panic!("{role}.toml: no [{section}]"));
            for key in keys.as_object().unwrap().keys() {
                let at = lines[header..]
                    .iter()
                    .position(|l| l.starts_with(&format!("{key} = ")))
                    .unwrap_or_else(|| panic!("{role}.toml: [{section}] {key} missing"));
                assert!(
                    lines[header + at - 1].starts_with("# "),
                    "{role}.toml: {key} has no comment"
                );
            }
        }
    }
}
