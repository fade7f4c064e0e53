//! The relay's configuration: `[relay]`, `[listen]` and `[log]` in `relay.toml`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::checks::Problems;
use super::{serialize_millis, ConfigError, LogConfig, RawConfig, Secret};

/// `relay.toml` as written: every key optional, defaults filled in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRelayConfig {
    /// Upstreams, timing and queues.
    pub relay: RawRelaySection,
    /// Listening addresses.
    pub listen: RawRelayListen,
    /// Log filter.
    pub log: LogConfig,
}

/// `[relay]` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRelaySection {
    /// Holds the relay's key, certificate, artifact cache and `ports.json`.
    pub data_dir: PathBuf,
    /// Servers or next relays to connect to, in order of preference; `install` may supply them.
    pub upstreams: Vec<String>,
    /// How often the relay beats its upstream link and downstream sessions.
    pub heartbeat_interval_ms: i64,
    /// Frames queued per downstream agent before the relay sheds that session.
    pub max_queue_per_agent: i64,
    /// How long a freshly upgraded relay's upstream link must have been ready before the
    /// upgrade counts as done (the new binary is kept, the old one no longer comes back).
    pub upgrade_healthy_after_ms: i64,
    /// A new relay not healthy this long after it started exits, so that the supervisor
    /// (systemd) starts the installed binary again, which rolls the upgrade back.
    pub upgrade_trial_timeout_ms: i64,
    /// Bytes the artifact and plugin cache may hold before least recently used files go.
    pub cache_max_bytes: i64,
    /// The HTTP proxy to reach the upstream through (`http://[user:password@]host:port`;
    /// empty: `HTTPS_PROXY`, else none).
    pub proxy: String,
    /// Hosts reached directly, never through the proxy.
    pub no_proxy: Vec<String>,
}

impl Default for RawRelaySection {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/tether/relay"),
            upstreams: Vec::new(),
            heartbeat_interval_ms: 5_000,
            max_queue_per_agent: 4_096,
            upgrade_healthy_after_ms: 10_000,
            upgrade_trial_timeout_ms: 120_000,
            cache_max_bytes: 10 * 1024 * 1024 * 1024,
            proxy: String::new(),
            no_proxy: Vec::new(),
        }
    }
}

/// `[listen]` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRelayListen {
    /// Agents' and child relays' WSS and HTTPS.
    pub downstream: String,
    /// Health endpoint; loopback only.
    pub admin: String,
}

impl Default for RawRelayListen {
    fn default() -> Self {
        Self {
            downstream: "0.0.0.0:20080".to_owned(),
            admin: "127.0.0.1:20081".to_owned(),
        }
    }
}

/// The relay's validated configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelayConfig {
    /// Upstreams, timing and queues.
    pub relay: RelaySection,
    /// Listening addresses.
    pub listen: RelayListen,
    /// Log filter.
    pub log: LogConfig,
}

/// `[relay]`, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelaySection {
    /// Holds the relay's key, certificate, artifact cache and `ports.json`.
    pub data_dir: PathBuf,
    /// `https://` or `wss://` URLs, in order of preference.
    pub upstreams: Vec<String>,
    /// Heartbeat period upstream and downstream.
    #[serde(rename = "heartbeat_interval_ms", serialize_with = "serialize_millis")]
    pub heartbeat_interval: Duration,
    /// Frames queued per downstream agent before shedding its session.
    pub max_queue_per_agent: usize,
    /// Ready upstream time after which an upgraded relay is kept.
    #[serde(
        rename = "upgrade_healthy_after_ms",
        serialize_with = "serialize_millis"
    )]
    pub upgrade_healthy_after: Duration,
    /// Time a new relay has to become healthy before it exits (and is rolled back).
    #[serde(
        rename = "upgrade_trial_timeout_ms",
        serialize_with = "serialize_millis"
    )]
    pub upgrade_trial_timeout: Duration,
    /// The cache's size bound.
    pub cache_max_bytes: u64,
    /// The egress proxy as written (its password masked when shown).
    #[serde(serialize_with = "super::server::serialize_masked_url")]
    pub proxy: Secret<String>,
    /// Hosts reached directly.
    pub no_proxy: Vec<String>,
}

/// `[listen]`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelayListen {
    /// Agents' and child relays' WSS and HTTPS.
    pub downstream: SocketAddr,
    /// Health endpoint; always a loopback address.
    pub admin: SocketAddr,
}

impl RawConfig for RawRelayConfig {
    const ROLE: &'static str = "relay";
    const LIST_KEYS: &'static [&'static str] = &["relay.upstreams", "relay.no_proxy"];
    type Valid = RelayConfig;

    fn validate(self) -> Result<RelayConfig, ConfigError> {
        let mut p = Problems::default();
        let r = &self.relay;
        let data_dir = p.dir("relay.data_dir", &r.data_dir);
        let upstreams: Vec<Option<String>> = r
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, url)| p.upstream(&format!("relay.upstreams[{i}]"), url))
            .collect();
        let interval = p.millis(
            "relay.heartbeat_interval_ms",
            r.heartbeat_interval_ms,
            100,
            600_000,
        );
        let queue = p.count(
            "relay.max_queue_per_agent",
            r.max_queue_per_agent,
            1,
            1_000_000,
        );
        let healthy_after = p.millis(
            "relay.upgrade_healthy_after_ms",
            r.upgrade_healthy_after_ms,
            100,
            3_600_000,
        );
        let trial_timeout = p.millis(
            "relay.upgrade_trial_timeout_ms",
            r.upgrade_trial_timeout_ms,
            1_000,
            86_400_000,
        );
        if let (Some(h), Some(t)) = (healthy_after, trial_timeout) {
            if t <= h {
                p.push(
                    "relay.upgrade_trial_timeout_ms",
                    format!(
                        "must be greater than relay.upgrade_healthy_after_ms ({}), got {}",
                        h.as_millis(),
                        t.as_millis()
                    ),
                );
            }
        }
        // At least 1 MiB; at most 16 TiB (i64 holds it; a larger number is a typo).
        let cache_max_bytes = p.count("relay.cache_max_bytes", r.cache_max_bytes, 1 << 20, 1 << 44);
        let downstream = p.addr("listen.downstream", &self.listen.downstream);
        let admin = p.addr("listen.admin", &self.listen.admin);
        if let Some(addr) = admin {
            if !addr.ip().is_loopback() {
                p.push(
                    "listen.admin",
                    format!("must be a loopback address such as 127.0.0.1:20081, got {addr}"),
                );
            }
        }
        if let (Some(d), Some(a)) = (downstream, admin) {
            if a.port() != 0
                && d.port() == a.port()
                && (d.ip().is_unspecified() || d.ip() == a.ip())
            {
                p.push(
                    "listen.admin",
                    format!("must not share a port with listen.downstream ({d})"),
                );
            }
        }
        p.proxy("relay.proxy", &self.relay.proxy, &self.relay.no_proxy);
        let level = p.log_level("log.level", &self.log.level);

        p.finish(|| {
            Some(RelayConfig {
                relay: RelaySection {
                    data_dir: data_dir?,
                    upstreams: upstreams.into_iter().collect::<Option<_>>()?,
                    heartbeat_interval: interval?,
                    max_queue_per_agent: usize::try_from(queue?).ok()?,
                    upgrade_healthy_after: healthy_after?,
                    upgrade_trial_timeout: trial_timeout?,
                    cache_max_bytes: cache_max_bytes?,
                    proxy: Secret::new(self.relay.proxy.clone()),
                    no_proxy: self.relay.no_proxy.clone(),
                },
                listen: RelayListen {
                    downstream: downstream?,
                    admin: admin?,
                },
                log: LogConfig { level: level? },
            })
        })
    }
}
