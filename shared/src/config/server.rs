//! The server's configuration: `[server]`, `[listen]` and `[log]` in `server.toml`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::checks::Problems;
use super::{serialize_millis, ConfigError, LogConfig, RawConfig};

/// Most jobs an agent may be allowed to run at once (its commands window must hold them).
pub const MAX_RUNNING_JOBS_PER_AGENT: u64 = 256;

/// `server.toml` as written: every key optional, defaults filled in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawServerConfig {
    /// Storage, sessions and flow control.
    pub server: RawServerSection,
    /// Listening addresses.
    pub listen: RawServerListen,
    /// How long finished deployments are kept.
    pub retention: RawRetention,
    /// Where the journal lives.
    pub storage: RawStorage,
    /// The key ring sealing secrets at rest.
    pub secrets: RawSecrets,
    /// Log filter.
    pub log: LogConfig,
}

/// `[secrets]` as written: where the key ring sealing secrets at rest comes from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSecrets {
    /// The key ring file (empty: `secrets.key` in the config directory), outside the data
    /// directory; created with one key if missing.
    pub key_file: PathBuf,
    /// A shell command printing the key ring (a KMS or vault hook); replaces `key_file`.
    pub key_command: String,
}

/// `[secrets]`, validated: at most one of the two.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Secrets {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_command: Option<String>,
}

/// `[storage]` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawStorage {
    /// `sled` (embedded, in the data directory) or `postgres` (a database a cluster shares).
    pub backend: String,
    /// The database (libpq connection string or `postgres://` URL), for `postgres`.
    pub url: String,
    /// CA certificates (PEM) of the database's TLS certificate; set, TLS is required.
    pub ca_file: PathBuf,
    /// Connections for reads; the writer has one of its own.
    pub pool_size: i64,
    /// This node's name in the lease (empty: the host name).
    pub node_name: String,
    /// This node's operators' address as operators reach it (`https://host[:port]`); a
    /// standby sends operators there when this node is active. Empty: not advertised.
    pub node_url: String,
    /// How long the active node's lease lasts unrenewed; a standby takes over once it ran out.
    pub lease_ttl_ms: i64,
    /// Nodes that do not hold the lease serve agents too (as members; see `docs/cluster.md`)
    /// rather than only wait as standbys.
    pub every_node_serves_agents: bool,
}

impl Default for RawStorage {
    fn default() -> Self {
        Self {
            backend: "sled".to_owned(),
            url: String::new(),
            ca_file: PathBuf::new(),
            pool_size: 4,
            node_name: String::new(),
            node_url: String::new(),
            lease_ttl_ms: 15_000,
            every_node_serves_agents: false,
        }
    }
}

/// `[storage]`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "backend", rename_all = "snake_case")]
pub enum Storage {
    /// The embedded store in `server.data_dir`.
    Sled,
    /// A PostgreSQL database.
    Postgres {
        /// Never printed whole: `Debug` shows `***`, `--check-config` the URL without its
        /// password.
        #[serde(serialize_with = "serialize_masked_url")]
        url: super::Secret<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        ca_file: Option<PathBuf>,
        pool_size: usize,
        /// This node's name in the lease.
        node_name: String,
        /// This node's operators' address, advertised to the others (`None`: not advertised).
        #[serde(skip_serializing_if = "Option::is_none")]
        node_url: Option<String>,
        #[serde(rename = "lease_ttl_ms", serialize_with = "serialize_millis")]
        lease_ttl: Duration,
        /// Nodes without the lease serve agents as members (not only wait as standbys).
        every_node_serves_agents: bool,
    },
}

/// The connection string without its password (`--check-config` prints it).
pub fn masked_url(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    if let Some((scheme, rest)) = url.split_once("://") {
        // postgres://user:password@host/db
        // The last '@' before the query: a password may hold an unencoded '@'.
        let head = &rest[..rest.find('?').unwrap_or(rest.len())];
        let (auth, tail) = match head.rfind('@') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => ("", rest),
        };
        let auth = match auth.split_once(':') {
            Some((user, _)) => format!("{user}:***"),
            None => auth.to_owned(),
        };
        out.push_str(&format!("{scheme}://{auth}{tail}"));
        return out;
    }
    // key=value pairs
    for (i, pair) in url.split_whitespace().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        match pair.split_once('=') {
            Some((k, _)) if k.trim() == "password" => out.push_str("password=***"),
            _ => out.push_str(pair),
        }
    }
    out
}

pub(super) fn serialize_masked_url<S: serde::Serializer>(
    url: &super::Secret<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&masked_url(url.expose()))
}

/// `[retention]` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRetention {
    /// Finished deployments (jobs and logs with them) are pruned this many days after they
    /// ended; 0 keeps them whatever their age.
    pub keep_days: i64,
    /// At most this many finished deployments are kept; the oldest are pruned first.
    pub keep_deployments: i64,
    /// How often the server prunes by itself.
    pub prune_interval_s: i64,
    /// Entries the audit log keeps; the oldest are dropped as new ones come. 0: no audit log.
    pub keep_audit_entries: i64,
    /// Audit entries older than this many days are dropped at each prune; 0: whatever their age.
    pub keep_audit_days: i64,
    /// Agents offline for longer than this (seconds) are shown stale; 0: never.
    pub mark_stale_after_s: i64,
    /// Agents offline for longer than this (seconds) are removed at a prune (their unfinished
    /// jobs failed); 0: never. At least `mark_stale_after_s` when both are set.
    pub remove_stale_after_s: i64,
}

impl Default for RawRetention {
    fn default() -> Self {
        Self {
            keep_days: 90,
            keep_deployments: 10_000,
            prune_interval_s: 3_600,
            keep_audit_entries: 100_000,
            keep_audit_days: 0,
            mark_stale_after_s: 0,
            remove_stale_after_s: 0,
        }
    }
}

/// `[retention]`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retention {
    /// 0: no age limit.
    pub keep_days: u64,
    pub keep_deployments: u64,
    #[serde(rename = "prune_interval_s", serialize_with = "super::serialize_secs")]
    pub prune_interval: Duration,
    pub keep_audit_entries: u64,
    /// 0: no age limit.
    pub keep_audit_days: u64,
    /// 0: never.
    pub mark_stale_after_s: u64,
    /// 0: never.
    pub remove_stale_after_s: u64,
}

/// `[server]` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawServerSection {
    /// Holds the journal, the CA, the keys and `ports.json`.
    pub data_dir: PathBuf,
    /// How often the server beats each session.
    pub heartbeat_interval_ms: i64,
    /// Silence after which an agent is marked offline.
    pub heartbeat_timeout_ms: i64,
    /// Handshakes in progress at once; more are answered `Busy` to spread reconnect storms.
    pub max_handshakes_in_flight: i64,
    /// Window of unacknowledged messages in flight per stream.
    pub max_unacked: i64,
    /// Jobs an agent runs at once unless its own setting says otherwise; more wait queued.
    pub max_running_jobs_per_agent: i64,
    /// How long a relay's certificate is valid; the server renews it over the relay's link
    /// once less than a third of that is left.
    pub relay_certificate_lifetime_s: i64,
    /// The journal's page cache in MiB: what of the database stays in memory.
    pub journal_cache_mib: i64,
    /// Where artifacts, plugin bundles and upgrade packages are kept (content-addressed);
    /// empty: the data directory. Servers of a cluster share one (a shared filesystem).
    pub files_dir: PathBuf,
}

impl Default for RawServerSection {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/tether/server"),
            heartbeat_interval_ms: 5_000,
            heartbeat_timeout_ms: 15_000,
            max_handshakes_in_flight: 1_024,
            max_unacked: 1_024,
            max_running_jobs_per_agent: 4,
            relay_certificate_lifetime_s: 30 * 86_400,
            journal_cache_mib: 256,
            files_dir: PathBuf::new(),
        }
    }
}

/// `[listen]` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawServerListen {
    /// Web app, REST API, admin and the agents' bulk HTTPS.
    pub https: String,
    /// Agents' and relays' WebSockets.
    pub wss: String,
}

impl Default for RawServerListen {
    fn default() -> Self {
        Self {
            https: "0.0.0.0:8443".to_owned(),
            wss: "0.0.0.0:7919".to_owned(),
        }
    }
}

/// The server's validated configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerConfig {
    /// Storage, sessions and flow control.
    pub server: ServerSection,
    /// Listening addresses.
    pub listen: ServerListen,
    /// How long finished deployments are kept.
    pub retention: Retention,
    /// Where the journal lives.
    pub storage: Storage,
    /// The key ring sealing secrets at rest.
    pub secrets: Secrets,
    /// Log filter.
    pub log: LogConfig,
}

/// `[server]`, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerSection {
    /// Holds the journal, the CA, the keys and `ports.json`.
    pub data_dir: PathBuf,
    /// How often the server beats each session.
    #[serde(rename = "heartbeat_interval_ms", serialize_with = "serialize_millis")]
    pub heartbeat_interval: Duration,
    /// Silence after which an agent is marked offline; longer than the interval.
    #[serde(rename = "heartbeat_timeout_ms", serialize_with = "serialize_millis")]
    pub heartbeat_timeout: Duration,
    /// Handshakes in progress at once before answering `Busy`.
    pub max_handshakes_in_flight: usize,
    /// Window of unacknowledged messages in flight per stream.
    pub max_unacked: u64,
    /// Jobs an agent runs at once by default.
    pub max_running_jobs_per_agent: usize,
    /// How long a relay's certificate is valid (renewed with a third of it left).
    #[serde(
        rename = "relay_certificate_lifetime_s",
        serialize_with = "serialize_secs"
    )]
    pub relay_certificate_lifetime: Duration,
    /// The journal's page cache, in MiB.
    pub journal_cache_mib: u64,
    /// Artifacts, plugin bundles and upgrade packages (`None`: in the data directory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files_dir: Option<PathBuf>,
}

fn serialize_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

/// `[listen]`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerListen {
    /// Web app, REST API, admin and bulk HTTPS.
    pub https: SocketAddr,
    /// Agents' and relays' WebSockets.
    pub wss: SocketAddr,
}

impl RawConfig for RawServerConfig {
    const ROLE: &'static str = "server";
    const LIST_KEYS: &'static [&'static str] = &[];
    type Valid = ServerConfig;

    fn validate(self) -> Result<ServerConfig, ConfigError> {
        let mut p = Problems::default();
        let s = &self.server;
        let data_dir = p.dir("server.data_dir", &s.data_dir);
        let interval = p.millis(
            "server.heartbeat_interval_ms",
            s.heartbeat_interval_ms,
            100,
            600_000,
        );
        let timeout = p.millis(
            "server.heartbeat_timeout_ms",
            s.heartbeat_timeout_ms,
            100,
            3_600_000,
        );
        if let (Some(i), Some(t)) = (interval, timeout) {
            if t <= i {
                p.push(
                    "server.heartbeat_timeout_ms",
                    format!(
                        "must be greater than server.heartbeat_interval_ms ({}), got {}",
                        i.as_millis(),
                        t.as_millis()
                    ),
                );
            }
        }
        let handshakes = p.count(
            "server.max_handshakes_in_flight",
            s.max_handshakes_in_flight,
            1,
            65_536,
        );
        let unacked = p.count("server.max_unacked", s.max_unacked, 1, 1_000_000);
        let running = p.count(
            "server.max_running_jobs_per_agent",
            s.max_running_jobs_per_agent,
            1,
            MAX_RUNNING_JOBS_PER_AGENT,
        );
        // At most 825 days, what TLS clients accept; at least long enough to be renewed.
        let relay_lifetime = p.count(
            "server.relay_certificate_lifetime_s",
            s.relay_certificate_lifetime_s,
            30,
            825 * 86_400,
        );
        let cache = p.count(
            "server.journal_cache_mib",
            s.journal_cache_mib,
            8,
            1_048_576,
        );
        let https = p.addr("listen.https", &self.listen.https);
        let wss = p.addr("listen.wss", &self.listen.wss);
        if let (Some(h), Some(w)) = (https, wss) {
            if h.port() != 0 && h == w {
                p.push(
                    "listen.wss",
                    format!("must differ from listen.https, both are {h}"),
                );
            }
        }
        let r = &self.retention;
        let keep_days = p.count("retention.keep_days", r.keep_days, 0, 36_500);
        let keep_deployments = p.count(
            "retention.keep_deployments",
            r.keep_deployments,
            0,
            10_000_000,
        );
        let prune_interval = p.count("retention.prune_interval_s", r.prune_interval_s, 1, 86_400);
        let keep_audit_entries = p.count(
            "retention.keep_audit_entries",
            r.keep_audit_entries,
            0,
            100_000_000,
        );
        let keep_audit_days = p.count("retention.keep_audit_days", r.keep_audit_days, 0, 36_500);
        const TEN_YEARS_S: u64 = 10 * 365 * 86_400;
        let mark_stale = p.count(
            "retention.mark_stale_after_s",
            r.mark_stale_after_s,
            0,
            TEN_YEARS_S,
        );
        let remove_stale = p.count(
            "retention.remove_stale_after_s",
            r.remove_stale_after_s,
            0,
            TEN_YEARS_S,
        );
        if let (Some(m), Some(r)) = (mark_stale, remove_stale) {
            if m > 0 && r > 0 && r < m {
                p.push(
                    "retention.remove_stale_after_s",
                    format!("must be at least retention.mark_stale_after_s ({m}), got {r}"),
                );
            }
        }
        let storage = storage(&mut p, &self.storage);
        let key_file =
            (!self.secrets.key_file.as_os_str().is_empty()).then(|| self.secrets.key_file.clone());
        let key_command =
            (!self.secrets.key_command.trim().is_empty()).then(|| self.secrets.key_command.clone());
        if key_file.is_some() && key_command.is_some() {
            p.push(
                "secrets.key_command",
                "set secrets.key_file or secrets.key_command, not both",
            );
        }
        let level = p.log_level("log.level", &self.log.level);

        p.finish(|| {
            Some(ServerConfig {
                server: ServerSection {
                    data_dir: data_dir?,
                    heartbeat_interval: interval?,
                    heartbeat_timeout: timeout?,
                    max_handshakes_in_flight: usize::try_from(handshakes?).ok()?,
                    max_unacked: unacked?,
                    max_running_jobs_per_agent: usize::try_from(running?).ok()?,
                    relay_certificate_lifetime: Duration::from_secs(relay_lifetime?),
                    journal_cache_mib: cache?,
                    files_dir: (!s.files_dir.as_os_str().is_empty()).then(|| s.files_dir.clone()),
                },
                listen: ServerListen {
                    https: https?,
                    wss: wss?,
                },
                retention: Retention {
                    keep_days: keep_days?,
                    keep_deployments: keep_deployments?,
                    prune_interval: Duration::from_secs(prune_interval?),
                    keep_audit_entries: keep_audit_entries?,
                    keep_audit_days: keep_audit_days?,
                    mark_stale_after_s: mark_stale?,
                    remove_stale_after_s: remove_stale?,
                },
                storage: storage?,
                secrets: Secrets {
                    key_file,
                    key_command,
                },
                log: LogConfig { level: level? },
            })
        })
    }
}

fn storage(p: &mut Problems, raw: &RawStorage) -> Option<Storage> {
    let pool = p.count("storage.pool_size", raw.pool_size, 1, 64);
    let lease_ttl = p.millis("storage.lease_ttl_ms", raw.lease_ttl_ms, 1_000, 600_000);
    let node_name = if raw.node_name.trim().is_empty() {
        host_name()
    } else {
        raw.node_name.trim().to_owned()
    };
    if node_name.len() > 255 || node_name.chars().any(char::is_control) {
        p.push(
            "storage.node_name",
            "must be at most 255 characters, none of them control characters",
        );
    }
    let node_url = match raw.node_url.trim() {
        "" => None,
        long if long.len() > 255 => {
            p.push("storage.node_url", "must be at most 255 characters");
            None
        }
        given => match crate::server_url::ServerUrl::parse(given) {
            Ok(url) => Some(url.to_string()),
            Err(e) => {
                p.push(
                    "storage.node_url",
                    format!("must be this node's operators' address, https://host[:port]: {e}"),
                );
                None
            }
        },
    };
    match raw.backend.as_str() {
        "sled" => Some(Storage::Sled),
        "postgres" => {
            if raw.url.trim().is_empty() {
                p.push(
                    "storage.url",
                    "must name the database when storage.backend is \"postgres\" (e.g. \"postgres://tether@db.example/tether\")",
                );
                return None;
            }
            let ca_file = (!raw.ca_file.as_os_str().is_empty()).then(|| raw.ca_file.clone());
            Some(Storage::Postgres {
                url: super::Secret::new(raw.url.clone()),
                ca_file,
                pool_size: usize::try_from(pool?).ok()?,
                node_name,
                node_url,
                lease_ttl: lease_ttl?,
                every_node_serves_agents: raw.every_node_serves_agents,
            })
        }
        other => {
            p.push(
                "storage.backend",
                format!("must be \"sled\" or \"postgres\", got {other:?}"),
            );
            None
        }
    }
}

/// This machine's host name (`localhost` if it cannot be read).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
