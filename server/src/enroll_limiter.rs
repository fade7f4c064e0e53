//! [`EnrollLimiter`]: failed enrollments counted per source address in fixed windows; past
//! the budget a source gets 429 until its window ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::api_error::ApiError;

/// Failed enrollments one source may make per window before it gets 429.
pub const ENROLL_FAILURES_PER_WINDOW: u32 = 20;
/// The failure-counting window.
pub const ENROLL_WINDOW: Duration = Duration::from_secs(60);
/// Sources tracked at most; past it, expired windows are dropped and new sources go untracked
/// rather than letting the table grow without bound.
const MAX_TRACKED_SOURCES: usize = 100_000;

/// Counts failed enrollments per source address in fixed windows.
#[derive(Debug)]
pub struct EnrollLimiter {
    /// Failures allowed per window.
    max_failures: u32,
    /// Window length.
    window: Duration,
    /// Per source: when its window started and its failures since.
    sources: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Default for EnrollLimiter {
    fn default() -> Self {
        EnrollLimiter::new(ENROLL_FAILURES_PER_WINDOW, ENROLL_WINDOW)
    }
}

impl EnrollLimiter {
    /// A limiter allowing `max_failures` per `window` and source.
    pub fn new(max_failures: u32, window: Duration) -> Self {
        EnrollLimiter {
            max_failures,
            window,
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(429)` if `ip` used up its failures in the current window.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), ApiError> {
        let sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        match sources.get(&ip) {
            Some((started, failures))
                if *failures >= self.max_failures
                    && now.saturating_duration_since(*started) < self.window =>
            {
                let left = self
                    .window
                    .saturating_sub(now.saturating_duration_since(*started));
                Err(ApiError::TooManyRequests {
                    retry_after_s: left.as_secs().max(1),
                })
            }
            _ => Ok(()),
        }
    }

    /// Counts one failure of `ip`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if sources.len() >= MAX_TRACKED_SOURCES && !sources.contains_key(&ip) {
            let window = self.window;
            sources.retain(|_, (started, _)| now.saturating_duration_since(*started) < window);
            if sources.len() >= MAX_TRACKED_SOURCES {
                return;
            }
        }
        let entry = sources.entry(ip).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        if entry.1 == self.max_failures {
            tracing::warn!(source = %ip, failures = entry.1, "enrollment-source-limited");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn limits_failures_per_source_and_window() {
        let limiter = EnrollLimiter::new(3, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.check(a, t0).unwrap();
            limiter.record_failure(a, t0);
        }
        let err = limiter.check(a, t0 + Duration::from_secs(10)).unwrap_err();
        assert!(
            matches!(err, ApiError::TooManyRequests { retry_after_s: 50 }),
            "{err:?}"
        );
        limiter.check(b, t0).unwrap();
        // A new window starts the count afresh.
        let later = t0 + Duration::from_secs(61);
        limiter.check(a, later).unwrap();
        limiter.record_failure(a, later);
        limiter.check(a, later).unwrap();
    }
}
