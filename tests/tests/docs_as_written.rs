//! The operators' documents run as written, so that they cannot drift from the binaries: every
//! `sh` block of `docs/install.md` sections 1 to 3 (server, agents, relays) and of
//! `docs/deployments.md`, in order, in bash with `set -e`, against the real binaries.
//!
//! What a test harness must change, and nothing else, is done by substitution and stubs:
//! - paths under `/var/lib/tether`, `/etc/systemd/system`, `/srv`, `/etc/site.conf` move into a
//!   temporary root, one "machine" directory per section (server, agent, relay hosts);
//! - host names (`tether.example.com`, `server`, `relay.dmz.example.com`) become loopback
//!   addresses, and the ports 8443, 7919, 20080 free ports;
//! - `useradd`, `chown` and `install` are no-ops (the binaries are on `PATH`), and
//!   `systemctl enable --now UNIT` starts the `ExecStart` of the unit file the block copied,
//!   with the same substitutions, and waits for it to listen;
//! - the files a section says to copy from the server (`agent-ca.pem`, `ca.pem`,
//!   `admin.token`) are copied into the working directory after section 1.
//!
//! Then it checks what the documents promise: both agents online (one through the relay), the
//! deployments succeeded with their logs and files, the artifact made with `tar -C dir .`
//! unpacked.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tether_tests::fleet::{eventually, TestDir};

const WAIT: Duration = Duration::from_secs(90);

/// The `sh` code blocks of `markdown`, each with the `## ` heading it sits under.
fn sh_blocks(markdown: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut heading = String::new();
    let mut code: Option<String> = None;
    for line in markdown.lines() {
        match &mut code {
            Some(body) if line.trim_start() == "```" => {
                blocks.push((heading.clone(), std::mem::take(body)));
                code = None;
            }
            Some(body) => {
                body.push_str(line);
                body.push('\n');
            }
            None if line.trim_start() == "```sh" => code = Some(String::new()),
            None => {
                if let Some(h) = line.strip_prefix("## ") {
                    heading = h.to_owned();
                }
            }
        }
    }
    blocks
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills every process `systemctl` started (their process groups) when dropped.
struct Started(PathBuf);

impl Drop for Started {
    fn drop(&mut self) {
        let pids = std::fs::read_to_string(&self.0).unwrap_or_default();
        for pid in pids.lines().filter(|p| !p.trim().is_empty()) {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", pid.trim())])
                .status();
        }
    }
}

/// The harness's substitutions, applied to a block's text and to the unit files.
const SUBSTITUTE: &str = r#"
subst() {
  sed -e "s|/var/lib/tether/server|$R/server-host/var/lib/tether/server|g" \
      -e "s|/var/lib/tether/relay|$R/relay-host/var/lib/tether/relay|g" \
      -e "s|/var/lib/tether/agent|$R/$HOST/var/lib/tether/agent|g" \
      -e "s|/etc/systemd/system/|$R/$HOST/etc/systemd/system/|g" \
      -e "s|/usr/local/bin/||g" \
      -e "s|/etc/site.conf|$R/site.conf|g" \
      -e "s|/srv/site|$R/srv/site|g" \
      -e "s|tether\.example\.com|localhost|g" \
      -e "s|relay\.dmz\.example\.com|127.0.0.2|g" \
      -e "s|https://server:|https://localhost:|g" \
      -e "s|wss://server:|wss://localhost:|g" \
      -e "s|:8443|:$HTTPS_PORT|g" \
      -e "s|:7919|:$WSS_PORT|g" \
      -e "s|:20080|:$RELAY_PORT|g"
}
"#;

/// `systemctl enable --now UNIT`: runs the unit file's `ExecStart` (substituted) in its own
/// process group, logs to `$R/UNIT-$HOST.log`, and waits for a server or relay to listen.
const SYSTEMCTL: &str = r#"#!/bin/bash
set -eu
. "$R/stubs/subst.sh"
unit="${@: -1}"
file="$R/$HOST/etc/systemd/system/$unit.service"
[ -f "$file" ] || { echo "systemctl: $file missing (the docs did not copy the unit)" >&2; exit 1; }
cmd=$(sed -n 's/^ExecStart=//p' "$file" | subst)
case "$unit" in
  tether-server) export TETHER_LISTEN__HTTPS=127.0.0.1:$HTTPS_PORT TETHER_LISTEN__WSS=127.0.0.1:$WSS_PORT ;;
  tether-relay) export TETHER_LISTEN__DOWNSTREAM=127.0.0.2:$RELAY_PORT TETHER_LISTEN__ADMIN=127.0.0.1:0 \
                       TETHER_RELAY__HEARTBEAT_INTERVAL_MS=1000 ;;
esac
data=$(echo "$cmd" | sed -n 's/.*--data \([^ ]*\).*/\1/p')
rm -f "$data/ports.json"
setsid $cmd >> "$R/$unit-$HOST.log" 2>&1 < /dev/null &
echo $! >> "$R/pids"
case "$unit" in
  tether-server|tether-relay)
    for _ in $(seq 1 300); do [ -f "$data/ports.json" ] && exit 0; sleep 0.1; done
    echo "systemctl: $unit did not listen; its log:" >&2; cat "$R/$unit-$HOST.log" >&2; exit 1 ;;
esac
"#;

#[test]
fn install_and_deployments_guides_run_as_written() {
    let dir = TestDir::new();
    let root = dir.path();
    let docs = tether_tests::workspace_root().join("docs");
    let install = std::fs::read_to_string(docs.join("install.md")).unwrap();
    let deployments = std::fs::read_to_string(docs.join("deployments.md")).unwrap();
    let mut blocks: Vec<(String, String)> = sh_blocks(&install)
        .into_iter()
        .filter(|(h, _)| h.starts_with("1.") || h.starts_with("2.") || h.starts_with("3."))
        .collect();
    assert!(blocks.len() >= 4, "install.md lost its blocks: {blocks:?}");
    let deploy_blocks = sh_blocks(&deployments);
    assert!(deploy_blocks.len() >= 2, "deployments.md lost its blocks");
    // One shell session for the whole page, as a reader types it: `$T` and `$ID` carry over.
    let session: String = deploy_blocks.into_iter().map(|(_, code)| code).collect();
    blocks.push(("deployments.md".to_owned(), session));

    // The stubs, the working directory, the "machines".
    let stubs = root.join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let write_exec = |name: &str, text: &str| {
        let path = stubs.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    std::fs::write(stubs.join("subst.sh"), SUBSTITUTE).unwrap();
    write_exec("systemctl", SYSTEMCTL);
    for noop in ["useradd", "chown", "install"] {
        write_exec(noop, "#!/bin/sh\nexit 0\n");
    }
    let work = root.join("work");
    std::fs::create_dir_all(work.join("site")).unwrap();
    std::fs::write(
        work.join("site/index.html"),
        "<h1>hello from the docs</h1>\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(
        tether_tests::workspace_root().join("config"),
        work.join("config"),
    )
    .unwrap();
    for host in ["server-host", "agent-host", "relay-host", "operator"] {
        std::fs::create_dir_all(root.join(host).join("etc/systemd/system")).unwrap();
    }
    let started = Started(root.join("pids"));
    let (https, wss, relay) = (free_port(), free_port(), free_port());
    let path = format!(
        "{}:{}:{}",
        stubs.display(),
        tether_tests::bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    for (i, (heading, code)) in blocks.iter().enumerate() {
        let host = match heading.get(..2) {
            Some("1.") => "server-host",
            Some("2.") => "agent-host",
            Some("3.") => "relay-host",
            _ => "operator",
        };
        let script = format!(
            "set -euo pipefail\n. \"$R/stubs/subst.sh\"\neval \"$(subst <<'TETHER_DOC_BLOCK'\n{code}TETHER_DOC_BLOCK\n)\"\n"
        );
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(&work)
            .env_clear()
            .env("PATH", &path)
            .env("HOME", root.join("home"))
            .env("XDG_CONFIG_HOME", root.join("xdg"))
            .env("TETHER_CONFIG_DIR", root.join("etc-tether"))
            .env("R", root)
            .env("HOST", host)
            .env("HTTPS_PORT", https.to_string())
            .env("WSS_PORT", wss.to_string())
            .env("RELAY_PORT", relay.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "block {i} of \"{heading}\" failed ({:?}):\n{code}\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            tether_tests::stdout(&out),
            tether_tests::stderr(&out)
        );
        eprintln!("ran block {i} of \"{heading}\"");
        if heading.starts_with("1.") {
            // "Give agent-ca.pem to every agent and relay"; operators have ca.pem and the token.
            let data = root.join("server-host/var/lib/tether/server");
            for f in ["agent-ca.pem", "ca.pem", "admin.token"] {
                std::fs::copy(data.join(f), work.join(f)).unwrap();
            }
        }
    }

    // What the documents promise.
    let data = root.join("server-host/var/lib/tether/server");
    let ca = std::fs::read_to_string(data.join("ca.pem")).unwrap();
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let tls = Arc::new(tether_shared::tls::client_config(&ca).unwrap());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{https}").parse().unwrap();
    let bearer = format!("Bearer {}", token.trim());
    let get = |path: &str| -> Value {
        let r = tether_tests::https_request(
            addr,
            tls.clone(),
            "localhost",
            "GET",
            path,
            &[("Authorization", bearer.as_str())],
        )
        .unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        r.json()
    };
    let agents = eventually("web-1 and web-7 online", WAIT, || {
        let agents = get("/api/v1/agents");
        let list = agents.as_array()?;
        (list.len() == 2 && list.iter().all(|a| a["status"] == "online")).then_some(agents)
    });
    let web7 = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "web-7")
        .unwrap();
    assert_eq!(web7["path"], serde_json::json!(["dmz-1"]), "{web7}");
    let finished = |process: &str, jobs: usize| -> String {
        let (id, d) = eventually(&format!("the {process} deployment done"), WAIT, || {
            let list = get("/api/v1/deployments");
            let id = list.as_array()?.iter().find(|d| d["process"] == process)?["id"]
                .as_str()?
                .to_owned();
            let d = get(&format!("/api/v1/deployments/{id}"));
            matches!(
                d["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
            .then_some((id, d))
        });
        assert_eq!(d["status"], "succeeded", "{d}");
        assert_eq!(d["jobs"].as_array().unwrap().len(), jobs, "{d}");
        id
    };
    let site = finished("site", 2);
    let r = tether_tests::https_request(
        addr,
        tls.clone(),
        "localhost",
        "GET",
        &format!("/api/v1/deployments/{site}/jobs/web-7/steps/build/log"),
        &[("Authorization", bearer.as_str())],
    )
    .unwrap();
    assert!(r.body.contains("building hi"), "{}", r.body);
    assert_eq!(
        std::fs::read_to_string(root.join("site.conf")).unwrap(),
        "greeting=hi\n"
    );
    finished("site-files", 1);
    assert_eq!(
        std::fs::read_to_string(root.join("srv/site/index.html")).unwrap(),
        "<h1>hello from the docs</h1>\n",
        "the artifact made with `tar -czf ... -C site .` unpacked"
    );
    drop(started);
}

#[test]
fn blocks_are_found_under_their_headings() {
    let md = "# T\n## 1. A\ntext\n```sh\necho a\n```\n## 2. B\n```toml\nx = 1\n```\n```sh\necho b\necho c\n```\n";
    assert_eq!(
        sh_blocks(md),
        [
            ("1. A".to_owned(), "echo a\n".to_owned()),
            ("2. B".to_owned(), "echo b\necho c\n".to_owned())
        ]
    );
}
