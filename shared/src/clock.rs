//! The one wall clock every crate reads: time since the Unix epoch (0 for a clock set before
//! it). Sans-IO code takes the time as an input; this is where the edges get it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Seconds since the Unix epoch (certificates count in seconds).
pub fn now_unix_s() -> i64 {
    i64::try_from(now_unix_ms() / 1000).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_units_read_the_same_clock() {
        let (ms, s) = (now_unix_ms(), now_unix_s());
        assert!(ms > 1_700_000_000_000, "{ms}");
        assert!((s - i64::try_from(ms / 1000).unwrap_or(0)).abs() <= 1);
    }
}
