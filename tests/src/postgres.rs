//! A PostgreSQL of a test's own: Debian's `postgresql` programs (`make setup` installs them),
//! a fresh cluster in a temporary directory, listening on a Unix socket there only, run as the
//! `postgres` user when the tests run as root. It is stopped (immediately) and removed when
//! dropped. Under `CI=true` a missing PostgreSQL fails the test; elsewhere it is skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness: a failure to set up is a test failure

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The password of the `postgres` role in every test cluster.
pub const PASSWORD: &str = "tether-test-pw";

/// One running test cluster.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Extra `postgres` settings (`-c name=value`) it runs with.
    settings: Vec<String>,
    /// Its TCP port, if it listens on one.
    port: Option<u16>,
    /// Other directories it uses (TLS files), removed with it.
    keep: Vec<tempfile::TempDir>,
}

/// The newest installed `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

impl Postgres {
    /// The environment of node `name` of a cluster on this database, with a lease of
    /// `ttl_ms`.
    pub fn node_env(&self, name: &str, ttl_ms: u64) -> Vec<(String, String)> {
        [
            ("TETHER_STORAGE__BACKEND", "postgres".to_owned()),
            ("TETHER_STORAGE__URL", self.url()),
            ("TETHER_STORAGE__NODE_NAME", name.to_owned()),
            ("TETHER_STORAGE__LEASE_TTL_MS", ttl_ms.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// A new cluster, started; `None` (skip) when PostgreSQL is not installed, outside CI.
    pub fn start() -> Option<Postgres> {
        Postgres::start_with(&[])
    }

    /// A new cluster that also listens on a loopback TCP port with TLS, presenting `cert_pem`
    /// (a chain) and `key_pem` (see [`Postgres::tcp_url`]).
    pub fn start_tls(cert_pem: &Path, key_pem: &Path) -> Option<Postgres> {
        let port = crate::fleet::free_addr().port();
        let dir = tempfile::Builder::new()
            .prefix("tether-pg-tls")
            .tempdir()
            .expect("temporary directory");
        let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
        std::fs::copy(cert_pem, &cert).expect("certificate");
        std::fs::copy(key_pem, &key).expect("key");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("key mode");
        if is_root() {
            let chown = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(chown.success(), "chown of the TLS files");
        }
        let settings = [
            "listen_addresses=127.0.0.1".to_owned(),
            format!("port={port}"),
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", cert.display()),
            format!("ssl_key_file={}", key.display()),
        ];
        let refs: Vec<&str> = settings.iter().map(String::as_str).collect();
        let mut pg = Postgres::start_with(&refs)?;
        pg.port = Some(port);
        pg.keep.push(dir);
        Some(pg)
    }

    /// A new cluster that also listens, without TLS, on loopback TCP at 127.0.0.1 and
    /// 127.0.0.2 on one port (see [`Postgres::tcp_url`]): two ways to it, so that one can be cut
    /// (`blackhole`) while the other stays.
    pub fn start_tcp() -> Option<Postgres> {
        let port = crate::fleet::free_addr().port();
        let settings = [
            "listen_addresses='127.0.0.1,127.0.0.2'".to_owned(),
            format!("port={port}"),
        ];
        let refs: Vec<&str> = settings.iter().map(String::as_str).collect();
        let mut pg = Postgres::start_with(&refs)?;
        pg.port = Some(port);
        // initdb lets in 127.0.0.1 alone.
        let hba = pg.data().join("pg_hba.conf");
        let mut rules = std::fs::read_to_string(&hba).expect("pg_hba.conf");
        rules.push_str("host all all 127.0.0.0/8 scram-sha-256\n");
        std::fs::write(&hba, rules).expect("pg_hba.conf");
        pg.psql("SELECT pg_reload_conf()");
        Some(pg)
    }

    /// The address of its TCP listener at `ip` (started by [`Postgres::start_tcp`]).
    pub fn tcp_addr(&self, ip: &str) -> std::net::SocketAddr {
        let port = self.port.expect("started with start_tcp");
        std::net::SocketAddr::new(ip.parse().expect("an IP address"), port)
    }

    /// The connection string over TCP to `host` (a name the certificate covers), when started
    /// by [`Postgres::start_tls`] (or to an address, by [`Postgres::start_tcp`]).
    pub fn tcp_url(&self, host: &str) -> String {
        let port = self.port.expect("started with start_tls");
        format!("host={host} port={port} user=postgres password={PASSWORD} dbname=postgres")
    }

    /// A new cluster started with extra settings, e.g. `["fsync=off"]`.
    pub fn start_with(settings: &[&str]) -> Option<Postgres> {
        let Some(bin) = bin_dir() else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run `make setup`"
            );
            eprintln!("skipped: PostgreSQL is not installed (run `make setup`)");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("tether-pg")
            .tempdir()
            .expect("temporary directory");
        let pg = Postgres {
            dir,
            bin,
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
            port: None,
            keep: Vec::new(),
        };
        if is_root() {
            let chown = Command::new("chown")
                .arg("postgres:postgres")
                .arg(pg.dir.path())
                .status()
                .expect("chown");
            assert!(chown.success(), "chown of the test cluster's directory");
        }
        let pwfile = pg.dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).expect("password file");
        if is_root() {
            let _ = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&pwfile)
                .status();
        }
        let data = pg.data();
        let out = pg.as_postgres(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                &format!("--pwfile={}", pwfile.display()),
                "--no-sync",
            ],
        );
        assert!(out.status.success(), "initdb: {}", text(&out));
        pg.pg_ctl_start();
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory of its Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The connection string of database `postgres` as the `postgres` role.
    pub fn url(&self) -> String {
        self.url_with_password(PASSWORD)
    }

    /// The same with another password (for refusals).
    pub fn url_with_password(&self, password: &str) -> String {
        // Its Unix socket is named after its port.
        let port = self.port.map(|p| format!(" port={p}")).unwrap_or_default();
        format!(
            "host={}{port} user=postgres password={password} dbname=postgres",
            self.socket_dir().display()
        )
    }

    /// Runs `program` (from PostgreSQL's bin directory) as the `postgres` user.
    fn as_postgres(&self, program: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(program);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
    }

    fn pg_ctl_start(&self) {
        let mut options = format!("-c listen_addresses='' -k {}", self.socket_dir().display());
        for s in &self.settings {
            options.push_str(&format!(" -c {s}"));
        }
        let data = self.data();
        let log = self.dir.path().join("postgres.log");
        let out = self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-l",
                path_str(&log),
                "-w",
                "-o",
                &options,
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            text(&out),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops it at once (`-m immediate`: no checkpoint, as a crash would).
    pub fn stop_immediately(&self) {
        let data = self.data();
        let out = self.as_postgres(
            "pg_ctl",
            &["-D", path_str(&data), "-m", "immediate", "stop"],
        );
        assert!(out.status.success(), "pg_ctl stop: {}", text(&out));
    }

    /// Starts it again after [`Postgres::stop_immediately`].
    pub fn restart(&self) {
        self.pg_ctl_start();
    }

    /// `pg_dump` of the database, as an operator's backup would be (plain SQL).
    pub fn dump(&self) -> Vec<u8> {
        let out = Command::new(self.bin.join("pg_dump"))
            .arg(self.url())
            .output()
            .expect("pg_dump");
        assert!(out.status.success(), "pg_dump: {}", text(&out));
        out.stdout
    }

    /// Runs SQL with `psql` as the superuser; its output.
    pub fn psql(&self, sql: &str) -> String {
        let exe = self.bin.join("psql");
        let out = Command::new(exe)
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .arg(self.url())
            .output()
            .expect("psql");
        assert!(out.status.success(), "psql {sql}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.as_postgres(
            "pg_ctl",
            &["-D", path_str(&data), "-m", "immediate", "stop"],
        );
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
