//! The problem collector the role validators share: each check records a message naming its key
//! and returns the typed value when the raw one is acceptable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ConfigError;

/// Problems found so far; [`Problems::finish`] turns them into [`ConfigError::Invalid`].
#[derive(Debug, Default)]
pub(super) struct Problems(Vec<String>);

impl Problems {
    /// Records a problem with `key`.
    pub(super) fn push(&mut self, key: &str, message: impl std::fmt::Display) {
        self.0.push(format!("{key}: {message}"));
    }

    /// An integer within `min..=max`.
    pub(super) fn count(&mut self, key: &str, value: i64, min: u64, max: u64) -> Option<u64> {
        match u64::try_from(value) {
            Ok(v) if (min..=max).contains(&v) => Some(v),
            _ => {
                self.push(key, format!("must be between {min} and {max}, got {value}"));
                None
            }
        }
    }

    /// A `*_ms` value within `min..=max` milliseconds, as a `Duration`.
    pub(super) fn millis(&mut self, key: &str, value: i64, min: u64, max: u64) -> Option<Duration> {
        self.count(key, value, min, max).map(Duration::from_millis)
    }

    /// A `host:port` socket address with a literal IP (port 0 asks the OS for a free port).
    pub(super) fn addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.push(
                    key,
                    format!("must be an IP address and port such as 0.0.0.0:8443 (all interfaces) or 127.0.0.1:8443 (this host only), not a host name; got {value:?}"),
                );
                None
            }
        }
    }

    /// A non-empty directory path.
    pub(super) fn dir(&mut self, key: &str, value: &Path) -> Option<PathBuf> {
        if value.as_os_str().is_empty() {
            self.push(key, "must not be empty");
            return None;
        }
        Some(value.to_path_buf())
    }

    /// An egress proxy URL (empty: none configured), see `crate::proxy`.
    pub(super) fn proxy(&mut self, key: &str, url: &str, no_proxy: &[String]) {
        if !url.is_empty() {
            if let Err(e) = crate::proxy::Proxy::parse(url, no_proxy) {
                self.push(key, e);
            }
        }
    }

    /// An upstream URL: `https://` or `wss://` with a host.
    pub(super) fn upstream(&mut self, key: &str, value: &str) -> Option<String> {
        match upstream_problem(value) {
            None => Some(value.to_owned()),
            Some(problem) => {
                self.push(key, format!("{problem}, got {value:?}"));
                None
            }
        }
    }

    /// A `tracing` env-filter directive.
    pub(super) fn log_level(&mut self, key: &str, value: &str) -> Option<String> {
        match tracing_subscriber::EnvFilter::builder().parse(value) {
            Ok(_) if !value.trim().is_empty() => Some(value.to_owned()),
            Ok(_) => {
                self.push(key, "must not be empty (try \"info\")");
                None
            }
            Err(e) => {
                self.push(key, format!("not a valid log filter ({e}), got {value:?}"));
                None
            }
        }
    }

    /// `Ok(build())` if no problem was recorded, else every problem at once.
    pub(super) fn finish<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, ConfigError> {
        let mut problems = self.0;
        if problems.is_empty() {
            match build() {
                Some(valid) => return Ok(valid),
                None => {
                    problems.push("configuration: a value was rejected without a reason".into())
                }
            }
        }
        Err(ConfigError::Invalid { problems })
    }
}

/// Why `value` is not an acceptable upstream URL, if it is not.
fn upstream_problem(value: &str) -> Option<&'static str> {
    let Some(rest) = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("wss://"))
    else {
        return Some("must start with https:// or wss://");
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Some("must name a host");
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) || authority.contains('@') {
        return Some("must not contain whitespace or credentials");
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        assert_eq!(upstream_problem("https://server:8443"), None);
        assert_eq!(upstream_problem("wss://relay.example/agent/v1/ws"), None);
        assert!(upstream_problem("http://server:8443").is_some());
        assert!(upstream_problem("https://").is_some());
        assert!(upstream_problem("https:///path").is_some());
        assert!(upstream_problem("https://user:pw@host").is_some());
        assert!(upstream_problem("https://a b").is_some());
    }

    #[test]
    fn negative_count_is_reported_not_wrapped() {
        let mut p = Problems::default();
        assert_eq!(p.count("x.n", -5, 1, 10), None);
        assert_eq!(
            p.0,
            vec!["x.n: must be between 1 and 10, got -5".to_owned()]
        );
    }
}
