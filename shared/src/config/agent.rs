//! The agent's configuration: `[agent]` and `[log]` in `agent.toml`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::checks::Problems;
use super::{serialize_millis, ConfigError, LogConfig, RawConfig, Secret};

/// Most users `agent.run_as_users` may list.
pub const MAX_RUN_AS_USERS: usize = 64;

/// `agent.toml` as written: every key optional, defaults filled in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAgentConfig {
    /// Upstreams, timing and the worker's restart budget.
    pub agent: RawAgentSection,
    /// Log filter.
    pub log: LogConfig,
}

/// `[agent]` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAgentSection {
    /// Holds the journal, the agent's key, the pinned server key and the installed upstreams.
    pub data_dir: PathBuf,
    /// Servers or relays to connect to, in order of preference; `install` may supply them instead.
    pub upstreams: Vec<String>,
    /// How often the agent sends a heartbeat upstream, and the worker beats the monitor.
    pub heartbeat_interval_ms: i64,
    /// First reconnect delay; doubles (with jitter) on every failure.
    pub reconnect_min_ms: i64,
    /// Ceiling of the reconnect delay.
    pub reconnect_max_ms: i64,
    /// Worker restarts allowed per window before the monitor gives up and exits non-zero.
    pub worker_restart_budget: i64,
    /// The window the restart budget applies to.
    pub worker_restart_window_ms: i64,
    /// Silence after which the monitor deems the worker hung and restarts it.
    pub worker_beat_timeout_ms: i64,
    /// How long an upgrade waits for running steps to finish before it is abandoned.
    pub upgrade_drain_timeout_ms: i64,
    /// How long a swapped-in worker must beat before the upgrade counts as done.
    pub upgrade_healthy_after_ms: i64,
    /// How long a swapped-in worker has to become healthy before it is rolled back.
    pub upgrade_trial_timeout_ms: i64,
    /// How long a finished job's record and work directory stay once the server has its end.
    pub job_retention_ms: i64,
    /// Users steps may run as (`run_as` step property) besides the agent's own.
    pub run_as_users: Vec<String>,
    /// Start where a hash of the agent's id says in the upstream list, not with the first: a
    /// fleet listing every node of a cluster spreads over them.
    pub spread_over_upstreams: bool,
    /// Where the directories of steps run as another user go (`<job>-<user>`, theirs).
    pub run_as_dir: PathBuf,
    /// The HTTP proxy to reach upstreams and downloads through
    /// (`http://[user:password@]host:port`; empty: `HTTPS_PROXY`, else none).
    pub proxy: String,
    /// Hosts reached directly, never through the proxy.
    pub no_proxy: Vec<String>,
}

impl Default for RawAgentSection {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/tether/agent"),
            upstreams: Vec::new(),
            heartbeat_interval_ms: 5_000,
            reconnect_min_ms: 200,
            reconnect_max_ms: 30_000,
            worker_restart_budget: 5,
            worker_restart_window_ms: 60_000,
            worker_beat_timeout_ms: 15_000,
            upgrade_drain_timeout_ms: 600_000,
            upgrade_healthy_after_ms: 10_000,
            upgrade_trial_timeout_ms: 60_000,
            job_retention_ms: 86_400_000,
            run_as_users: Vec::new(),
            spread_over_upstreams: false,
            run_as_dir: PathBuf::from("/var/lib/tether/agent-steps"),
            proxy: String::new(),
            no_proxy: Vec::new(),
        }
    }
}

/// The agent's validated configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentConfig {
    /// Upstreams, timing and the worker's restart budget.
    pub agent: AgentSection,
    /// Log filter.
    pub log: LogConfig,
}

/// `[agent]`, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentSection {
    /// Holds the journal, the agent's key, the pinned server key and the installed upstreams.
    pub data_dir: PathBuf,
    /// `https://` or `wss://` URLs, in order of preference.
    pub upstreams: Vec<String>,
    /// Heartbeat period upstream and worker-to-monitor.
    #[serde(rename = "heartbeat_interval_ms", serialize_with = "serialize_millis")]
    pub heartbeat_interval: Duration,
    /// First reconnect delay.
    #[serde(rename = "reconnect_min_ms", serialize_with = "serialize_millis")]
    pub reconnect_min: Duration,
    /// Ceiling of the reconnect delay; at least `reconnect_min`.
    #[serde(rename = "reconnect_max_ms", serialize_with = "serialize_millis")]
    pub reconnect_max: Duration,
    /// Worker restarts allowed per window.
    pub worker_restart_budget: u32,
    /// The window the restart budget applies to.
    #[serde(
        rename = "worker_restart_window_ms",
        serialize_with = "serialize_millis"
    )]
    pub worker_restart_window: Duration,
    /// Silence after which the worker is deemed hung; longer than the heartbeat interval.
    #[serde(rename = "worker_beat_timeout_ms", serialize_with = "serialize_millis")]
    pub worker_beat_timeout: Duration,
    /// How long an upgrade waits for running steps to finish before it is abandoned.
    #[serde(
        rename = "upgrade_drain_timeout_ms",
        serialize_with = "serialize_millis"
    )]
    pub upgrade_drain_timeout: Duration,
    /// How long a swapped-in worker must beat before the upgrade counts as done.
    #[serde(
        rename = "upgrade_healthy_after_ms",
        serialize_with = "serialize_millis"
    )]
    pub upgrade_healthy_after: Duration,
    /// How long a swapped-in worker has to become healthy; more than `upgrade_healthy_after`.
    #[serde(
        rename = "upgrade_trial_timeout_ms",
        serialize_with = "serialize_millis"
    )]
    pub upgrade_trial_timeout: Duration,
    /// How long a finished job's record and work directory stay once the server has its end.
    #[serde(rename = "job_retention_ms", serialize_with = "serialize_millis")]
    pub job_retention: Duration,
    /// Users steps may run as besides the agent's own.
    /// Start where a hash of the agent's id says in the upstream list (see
    /// `crate::dialer::placement`), not with the first.
    pub spread_over_upstreams: bool,
    pub run_as_users: Vec<String>,
    /// Parent of the directories of steps run as another user.
    pub run_as_dir: PathBuf,
    /// The egress proxy as written (its password masked when shown).
    #[serde(serialize_with = "super::server::serialize_masked_url")]
    pub proxy: Secret<String>,
    /// Hosts reached directly.
    pub no_proxy: Vec<String>,
}

impl RawConfig for RawAgentConfig {
    const ROLE: &'static str = "agent";
    const LIST_KEYS: &'static [&'static str] =
        &["agent.upstreams", "agent.run_as_users", "agent.no_proxy"];
    type Valid = AgentConfig;

    fn validate(self) -> Result<AgentConfig, ConfigError> {
        let mut p = Problems::default();
        let a = &self.agent;
        let data_dir = p.dir("agent.data_dir", &a.data_dir);
        let upstreams: Vec<Option<String>> = a
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, url)| p.upstream(&format!("agent.upstreams[{i}]"), url))
            .collect();
        let interval = p.millis(
            "agent.heartbeat_interval_ms",
            a.heartbeat_interval_ms,
            100,
            600_000,
        );
        let min = p.millis("agent.reconnect_min_ms", a.reconnect_min_ms, 1, 3_600_000);
        let max = p.millis("agent.reconnect_max_ms", a.reconnect_max_ms, 1, 3_600_000);
        if let (Some(min), Some(max)) = (min, max) {
            if min > max {
                p.push(
                    "agent.reconnect_min_ms",
                    format!(
                        "must not exceed agent.reconnect_max_ms ({}), got {}",
                        max.as_millis(),
                        min.as_millis()
                    ),
                );
            }
        }
        let budget = p.count(
            "agent.worker_restart_budget",
            a.worker_restart_budget,
            1,
            1_000,
        );
        let window = p.millis(
            "agent.worker_restart_window_ms",
            a.worker_restart_window_ms,
            1_000,
            86_400_000,
        );
        let beat = p.millis(
            "agent.worker_beat_timeout_ms",
            a.worker_beat_timeout_ms,
            100,
            3_600_000,
        );
        if let (Some(i), Some(t)) = (interval, beat) {
            if t <= i {
                p.push(
                    "agent.worker_beat_timeout_ms",
                    format!(
                        "must be greater than agent.heartbeat_interval_ms ({}), got {}",
                        i.as_millis(),
                        t.as_millis()
                    ),
                );
            }
        }
        let drain = p.millis(
            "agent.upgrade_drain_timeout_ms",
            a.upgrade_drain_timeout_ms,
            1_000,
            86_400_000,
        );
        let healthy = p.millis(
            "agent.upgrade_healthy_after_ms",
            a.upgrade_healthy_after_ms,
            100,
            3_600_000,
        );
        let trial = p.millis(
            "agent.upgrade_trial_timeout_ms",
            a.upgrade_trial_timeout_ms,
            1_000,
            3_600_000,
        );
        if let (Some(h), Some(t)) = (healthy, trial) {
            if t <= h {
                p.push(
                    "agent.upgrade_trial_timeout_ms",
                    format!(
                        "must be greater than agent.upgrade_healthy_after_ms ({}), got {}",
                        h.as_millis(),
                        t.as_millis()
                    ),
                );
            }
        }
        let retention = p.millis(
            "agent.job_retention_ms",
            a.job_retention_ms,
            0,
            30 * 86_400_000,
        );
        let run_as_dir = p.dir("agent.run_as_dir", &a.run_as_dir);
        if !a.run_as_dir.as_os_str().is_empty() && !a.run_as_dir.is_absolute() {
            p.push("agent.run_as_dir", "must be an absolute path");
        }
        if a.run_as_users.len() > MAX_RUN_AS_USERS {
            p.push(
                "agent.run_as_users",
                format!(
                    "at most {MAX_RUN_AS_USERS} users, got {}",
                    a.run_as_users.len()
                ),
            );
        }
        for (i, u) in a.run_as_users.iter().enumerate() {
            let ok = !u.is_empty()
                && u.len() <= 32
                && u.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
                });
            if !ok {
                p.push(
                    &format!("agent.run_as_users[{i}]"),
                    format!("{u:?} is not a user name (1 to 32 of a-z, 0-9, _, - and .)"),
                );
            }
        }
        p.proxy("agent.proxy", &a.proxy, &a.no_proxy);
        let level = p.log_level("log.level", &self.log.level);

        p.finish(|| {
            Some(AgentConfig {
                agent: AgentSection {
                    data_dir: data_dir?,
                    upstreams: upstreams.into_iter().collect::<Option<_>>()?,
                    heartbeat_interval: interval?,
                    reconnect_min: min?,
                    reconnect_max: max?,
                    worker_restart_budget: u32::try_from(budget?).ok()?,
                    worker_restart_window: window?,
                    worker_beat_timeout: beat?,
                    upgrade_drain_timeout: drain?,
                    upgrade_healthy_after: healthy?,
                    upgrade_trial_timeout: trial?,
                    job_retention: retention?,
                    run_as_users: a.run_as_users.clone(),
                    spread_over_upstreams: a.spread_over_upstreams,
                    run_as_dir: run_as_dir?,
                    proxy: Secret::new(a.proxy.clone()),
                    no_proxy: a.no_proxy.clone(),
                },
                log: LogConfig { level: level? },
            })
        })
    }
}
