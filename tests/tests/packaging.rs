//! The shipped systemd units (`config/systemd/`): each is accepted by `systemd-analyze verify`
//! with its `ExecStart` pointed at the binary built here, and the command line it runs is one
//! the binary accepts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::process::Command;

use tether_tests::fleet::TestDir;
use tether_tests::{bin, workspace_root};

#[test]
fn systemd_units_verify_and_run_real_commands() {
    let dir = TestDir::new();
    let units = workspace_root().join("config/systemd");
    for (unit, name) in [
        ("tether-server", "tether-server"),
        ("tether-agent", "tether-agent"),
        ("tether-agent-unprivileged", "tether-agent"),
        ("tether-relay", "tether-relay"),
    ] {
        let text = std::fs::read_to_string(units.join(format!("{unit}.service"))).unwrap();
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{name}: no ExecStart"));
        let mut words = exec.split_whitespace();
        assert_eq!(
            words.next(),
            Some(format!("/usr/local/bin/{name}").as_str())
        );
        let args: Vec<&str> = words.collect();
        // The binary accepts the unit's command line (checked with --help appended).
        let out = Command::new(bin(name))
            .args(&args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{name} {args:?}: {out:?}");
        // systemd itself accepts the unit, with ExecStart at the binary built here.
        if Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipped systemd-analyze verify: not installed");
            continue;
        }
        let local = text.replace(
            &format!("/usr/local/bin/{name}"),
            bin(name).to_str().unwrap(),
        );
        let path = dir.path().join(format!("{unit}.service"));
        std::fs::write(&path, local).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .unwrap();
        let complaints = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success() && !complaints.contains(&format!("{unit}.service:")),
            "{unit}: {complaints}"
        );
    }
}
