//! The `tether` CLI for end-to-end tests: a runner with its own config home (so nothing of the
//! host's leaks in), and the server URL operators log in to.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::fleet::Server;
use crate::{stderr, stdout};

/// The server's operators' URL on loopback, as `tether login --server` takes it.
pub fn server_url(server: &Server) -> String {
    format!("https://localhost:{}", server.https.port())
}

/// The `tether` binary with its own config home, so that nothing of the host's leaks in.
pub struct Tether {
    root: PathBuf,
}

impl Tether {
    pub fn new(root: &Path) -> Tether {
        for dir in ["etc", "home", "xdg"] {
            fs::create_dir_all(root.join(dir)).unwrap_or_else(|e| panic!("{e}"));
        }
        Tether {
            root: root.to_owned(),
        }
    }

    pub fn login_file(&self) -> PathBuf {
        self.root.join("xdg/tether/cli.json")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = crate::command("tether", &self.root.join("etc"));
        cmd.env("XDG_CONFIG_HOME", self.root.join("xdg"))
            .env("HOME", self.root.join("home"))
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `tether args` with extra environment and standard input.
    pub fn run_with(&self, env: &[(&str, &str)], input: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = self.command(args);
        cmd.envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if input.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("tether: {e}"));
        if let Some(text) = input {
            child
                .stdin
                .take()
                .unwrap_or_else(|| panic!("tether: no stdin"))
                .write_all(text.as_bytes())
                .unwrap_or_else(|e| panic!("tether stdin: {e}"));
        }
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("tether: {e}"))
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(&[], None, args)
    }

    /// `tether args --json`, which must exit 0; its stdout parsed.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.run(&all);
        assert_eq!(
            out.status.code(),
            Some(0),
            "tether {all:?}: {}",
            stderr(&out)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("tether {all:?}: not JSON ({e}): {}", stdout(&out)))
    }

    pub fn login(&self, server: &Server) {
        let out = self.run(&[
            "login",
            "--server",
            &server_url(server),
            "--ca",
            server.operator_ca_path().to_str().unwrap_or_default(),
            "--token",
            &server.admin_token,
        ]);
        assert_eq!(out.status.code(), Some(0), "login: {}", stderr(&out));
    }
}
