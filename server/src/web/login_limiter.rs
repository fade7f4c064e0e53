//! [`LoginLimiter`]: login attempts counted per source address and per user name in fixed
//! windows, and the slots for password checks.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Failed logins one source address may make per window.
pub const FAILURES_PER_SOURCE: u32 = 10;
/// Failed logins for one user name per window (from anywhere).
pub const FAILURES_PER_USER: u32 = 30;
/// The counting window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Password checks running at once, server-wide.
pub const CONCURRENT_CHECKS: usize = 2;
/// How long a login waits for a check slot before it is told to retry (429).
pub const CHECK_WAIT: Duration = Duration::from_secs(2);
/// Keys tracked at most per table; past it, expired windows are dropped, then new keys go
/// untracked rather than letting the table grow without bound.
const MAX_TRACKED: usize = 100_000;

/// Counts failures per key in fixed windows.
#[derive(Debug)]
pub struct Failures<K> {
    max: u32,
    window: Duration,
    seen: Mutex<HashMap<K, (Instant, u32)>>,
}

impl<K: Hash + Eq + Clone> Failures<K> {
    pub fn new(max: u32, window: Duration) -> Self {
        Failures {
            max,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an attempt of `key` now, unless it used up its budget: then the seconds until
    /// it may try again. Check and count are one step, so parallel attempts cannot overrun.
    pub fn attempt(&self, key: &K, now: Instant) -> Result<(), u64> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((started, failures)) = seen.get(key) {
            let elapsed = now.saturating_duration_since(*started);
            if *failures >= self.max && elapsed < self.window {
                return Err(self.window.saturating_sub(elapsed).as_secs().max(1));
            }
        }
        Self::count(&mut seen, key, now, self.window);
        Ok(())
    }

    /// Takes back one attempt of `key` (it succeeded, or was never checked).
    pub fn forgive(&self, key: &K) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, failures)) = seen.get_mut(key) {
            *failures = failures.saturating_sub(1);
        }
    }

    /// One more for `key` in its window (a new window if the last one ended); the table stays
    /// within [`MAX_TRACKED`] keys.
    fn count(seen: &mut HashMap<K, (Instant, u32)>, key: &K, now: Instant, window: Duration) {
        if seen.len() >= MAX_TRACKED && !seen.contains_key(key) {
            seen.retain(|_, (started, _)| now.saturating_duration_since(*started) < window);
            if seen.len() >= MAX_TRACKED {
                return;
            }
        }
        let entry = seen.entry(key.clone()).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// Login attempts per source address and per user name, and the password checks running.
#[derive(Debug)]
pub struct LoginLimiter {
    pub sources: Failures<IpAddr>,
    pub users: Failures<String>,
    /// Slots for argon2id checks ([`CONCURRENT_CHECKS`]).
    pub checks: tokio::sync::Semaphore,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        LoginLimiter {
            sources: Failures::new(FAILURES_PER_SOURCE, WINDOW),
            users: Failures::new(FAILURES_PER_USER, WINDOW),
            checks: tokio::sync::Semaphore::new(CONCURRENT_CHECKS),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn attempts_are_counted_before_and_forgiven_after() {
        let f = Failures::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(f.attempt(&"a", t0), Ok(()));
        assert_eq!(f.attempt(&"a", t0), Ok(()));
        // The budget is spent by attempts, before any of them is known to fail.
        assert_eq!(f.attempt(&"a", t0 + Duration::from_secs(10)), Err(50));
        assert_eq!(f.attempt(&"b", t0), Ok(()));
        // A success takes its count back.
        f.forgive(&"a");
        assert_eq!(f.attempt(&"a", t0 + Duration::from_secs(10)), Ok(()));
        assert!(f.attempt(&"a", t0 + Duration::from_secs(10)).is_err());
        // A new window starts afresh.
        assert_eq!(f.attempt(&"a", t0 + Duration::from_secs(61)), Ok(()));
    }
}
