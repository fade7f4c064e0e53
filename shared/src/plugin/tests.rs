//! Manifest and bundle validation: every problem is reported at once.

use super::*;

const GOOD: &str = r#"
name = "nginx"
version = "1.2.0"
description = "reloads nginx"
[[steps]]
name = "reload"
command = ["/bin/sh", "./bin/reload.sh", "-x"]
on_interrupt = "rerun"
timeout_s = 60
  [[steps.properties]]
  name = "config"
  required = true
  [[steps.properties]]
  name = "password"
  secret = true
  default = "none"
  [[steps.outputs]]
  name = "pid"
"#;

/// A tar.gz of `files` (path, contents), with `extra` raw entries appended by the callback.
pub(crate) fn targz(
    files: &[(&str, &[u8])],
    extra: impl FnOnce(&mut tar::Builder<Vec<u8>>),
) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).unwrap();
    }
    extra(&mut b);
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    gz.finish().unwrap()
}

#[test]
fn a_good_manifest_parses_with_defaults() {
    let m = Manifest::parse_valid(GOOD, Origin::Uploaded).unwrap();
    let s = m.step("reload").unwrap();
    assert_eq!(s.on_interrupt, OnInterrupt::Rerun);
    assert!(s.properties[0].required && !s.properties[0].secret);
    assert!(s.properties[1].secret);
    assert_eq!(
        command_paths(s.command.as_ref().unwrap()).collect::<Vec<_>>(),
        ["./bin/reload.sh"]
    );
    assert_eq!(m.semver().unwrap(), semver::Version::new(1, 2, 0));
    // A built-in may not carry a command.
    assert!(m
        .validate(Origin::BuiltIn)
        .iter()
        .any(|p| p.contains("built-in step has no command")));
}

#[test]
fn every_manifest_problem_is_reported_at_once() {
    let bad = r#"
name = "bad name"
version = "one"
[[steps]]
name = "a"
command = []
timeout_s = 0
  [[steps.properties]]
  name = "x"
  required = true
  default = "d"
  [[steps.properties]]
  name = "x"
  [[steps.properties]]
  name = "a-b"
  [[steps.properties]]
  name = "a_b"
  [[steps.outputs]]
  name = "o o"
[[steps]]
name = "a"
command = ["../escape.sh", "/bin/ok", "sub/../../x"]
[[steps]]
name = "nocmd"
"#;
    let problems = Manifest::parse(bad).unwrap().validate(Origin::Uploaded);
    let all = problems.join("\n");
    for needle in [
        "plugin name",
        "version \"one\"",
        "command must not be empty",
        "timeout_s must be 1",
        "required property has no default",
        "property names must be unique",
        "same environment variable as property \"a-b\"",
        "output name",
        "step names must be unique",
        "command element 0: bundle path \"../escape.sh\" contains '..'",
        "command element 2",
        "step 2 (\"nocmd\"): command is required",
    ] {
        assert!(all.contains(needle), "{needle:?} not in:\n{all}");
    }
    assert!(
        !all.contains("/bin/ok"),
        "absolute interpreters are allowed:\n{all}"
    );

    let unknown = Manifest::parse("name = \"x\"\nversion = \"1.0.0\"\ncolour = 1\n").unwrap_err();
    assert!(unknown.contains("colour"), "{unknown}");
    let none = Manifest::parse("name = \"x\"\nversion = \"1.0.0\"\n").unwrap();
    assert!(none.validate(Origin::Uploaded)[0].contains("1 to 100 steps"));
}

#[test]
fn bundles_are_checked_whole() {
    let good = targz(
        &[
            ("plugin.toml", GOOD.as_bytes()),
            ("bin/reload.sh", b"echo hi\n"),
        ],
        |_| {},
    );
    let m = inspect_bundle(&good[..]).unwrap();
    assert_eq!(m.name, "nginx");

    let missing = targz(&[("./plugin.toml", GOOD.as_bytes())], |_| {});
    let err = inspect_bundle(&missing[..]).unwrap_err().join("\n");
    assert!(
        err.contains("command file \"./bin/reload.sh\" is not in the bundle"),
        "{err}"
    );

    let no_manifest = targz(&[("bin/reload.sh", b"x")], |_| {});
    let err = inspect_bundle(&no_manifest[..]).unwrap_err().join("\n");
    assert!(err.contains("no plugin.toml"), "{err}");

    let err = inspect_bundle(&b"definitely not gzip"[..])
        .unwrap_err()
        .join("\n");
    assert!(err.contains("not a") && err.contains("tar.gz"), "{err}");

    let hostile = targz(
        &[("plugin.toml", GOOD.as_bytes()), ("bin/reload.sh", b"x")],
        |b| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, "evil", "/etc").unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_entry_type(tar::EntryType::Regular);
            // Written by hand: the builder refuses '..' in paths.
            h.as_old_mut().name[..9].copy_from_slice(b"../escape");
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, "bin/reload.sh", &b"y"[..]).unwrap();
        },
    );
    let err = inspect_bundle(&hostile[..]).unwrap_err().join("\n");
    for needle in ["\"evil\" is a Symlink", "contains '..'", "appears twice"] {
        assert!(err.contains(needle), "{needle:?} not in:\n{err}");
    }
}

#[test]
fn bundle_paths_are_normalized_and_contained() {
    assert_eq!(bundle_path("./a//b").unwrap(), "a/b");
    assert!(bundle_path("a/../b").is_err());
    assert!(bundle_path("/etc/passwd").is_err());
    assert!(bundle_path(".").is_err());
    assert_eq!(env_name("TETHER_PROP_", "a-b.c"), "TETHER_PROP_A_B_C");
}
