//! Prometheus text exposition for the three binaries: lock-free histograms and counters by a
//! bounded set of labels, the text writers, and the standard `process_*` families.
//!
//! Label values a peer controls (agent ids, versions) are escaped by [`escape`]; label sets of
//! counters are `&'static str`, so what a peer sends can never add a series.

pub mod process;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Bucket bounds (µs) for latencies of a millisecond to a second (journal commits).
pub const FAST_BUCKETS_US: &[u64] = &[
    500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
];

/// Bucket bounds (µs) for latencies of a few milliseconds to minutes (dispatch to first event).
pub const ROUND_TRIP_BUCKETS_US: &[u64] = &[
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
];

/// Bucket bounds (µs) for step durations: a tenth of a second to an hour.
pub const STEP_BUCKETS_US: &[u64] = &[
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
    900_000_000,
    3_600_000_000,
];

/// A Prometheus histogram, lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds_us: &'static [u64],
    /// Per bucket (not cumulative), the last one for +Inf.
    counts: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

/// What a histogram held when read: cumulative counts per bound (then every observation) and
/// the sum in µs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistogramSnapshot {
    pub bounds_us: Vec<u64>,
    pub cumulative: Vec<u64>,
    pub sum_us: u64,
}

/// Over [`FAST_BUCKETS_US`].
impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(FAST_BUCKETS_US)
    }
}

impl Histogram {
    pub fn new(bounds_us: &'static [u64]) -> Self {
        Histogram {
            bounds_us,
            counts: (0..=bounds_us.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn record(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let i = self
            .bounds_us
            .iter()
            .position(|le| us <= *le)
            .unwrap_or(self.bounds_us.len());
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let cumulative = self
            .counts
            .iter()
            .map(|c| {
                total += c.load(Ordering::Relaxed);
                total
            })
            .collect();
        HistogramSnapshot {
            bounds_us: self.bounds_us.to_vec(),
            cumulative,
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

impl HistogramSnapshot {
    /// Every observation.
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

/// Counters by label values from a fixed set (`&'static str`), so their number is bounded by
/// the code, never by what a peer sends.
#[derive(Debug, Default)]
pub struct CounterVec {
    counts: Mutex<BTreeMap<Vec<&'static str>, u64>>,
}

impl CounterVec {
    pub fn inc(&self, labels: &[&'static str]) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *counts.entry(labels.to_vec()).or_default() += 1;
    }

    /// The count of one label set (0 if never counted).
    pub fn get(&self, labels: &[&'static str]) -> u64 {
        self.snapshot()
            .into_iter()
            .find(|(l, _)| l == labels)
            .map_or(0, |(_, v)| v)
    }

    pub fn snapshot(&self) -> Vec<(Vec<&'static str>, u64)> {
        let counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Writes the family: `names` are the label names, in the order of the values given to
    /// [`CounterVec::inc`]; `zeros` are label sets shown at 0 before they are first counted.
    pub fn write(
        &self,
        out: &mut String,
        name: &str,
        help: &str,
        names: &[&str],
        zeros: &[&[&'static str]],
    ) {
        let mut all: BTreeMap<Vec<&'static str>, u64> =
            zeros.iter().map(|z| (z.to_vec(), 0)).collect();
        all.extend(self.snapshot());
        header(out, name, "counter", help);
        for (values, count) in all {
            let labels: Vec<(&str, &str)> = names.iter().copied().zip(values).collect();
            sample(out, name, &labels, count);
        }
    }
}

/// `# HELP` and `# TYPE` of a family.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

/// One sample, label values escaped.
pub fn sample(
    out: &mut String,
    name: &str,
    labels: &[(&str, &str)],
    value: impl std::fmt::Display,
) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// A family of one unlabelled sample.
pub fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, kind, help);
    sample(out, name, &[], value);
}

/// A histogram family (seconds).
pub fn histogram(out: &mut String, name: &str, help: &str, h: &HistogramSnapshot) {
    header(out, name, "histogram", help);
    let bucket = format!("{name}_bucket");
    for (le, count) in h.bounds_us.iter().zip(&h.cumulative) {
        let le = (*le as f64 / 1e6).to_string();
        sample(out, &bucket, &[("le", &le)], count);
    }
    sample(out, &bucket, &[("le", "+Inf")], h.count());
    sample(out, &format!("{name}_sum"), &[], h.sum_us as f64 / 1e6);
    sample(out, &format!("{name}_count"), &[], h.count());
}

/// Escapes a Prometheus label value.
pub fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_written_in_seconds() {
        let h = Histogram::new(&[1_000, 10_000]);
        h.record(Duration::from_micros(500));
        h.record(Duration::from_micros(5_000));
        h.record(Duration::from_secs(2));
        let snap = h.snapshot();
        assert_eq!(snap.cumulative, vec![1, 2, 3]);
        let mut out = String::new();
        histogram(&mut out, "t_seconds", "Test.", &snap);
        assert_eq!(
            out,
            "# HELP t_seconds Test.\n# TYPE t_seconds histogram\n\
             t_seconds_bucket{le=\"0.001\"} 1\n\
             t_seconds_bucket{le=\"0.01\"} 2\n\
             t_seconds_bucket{le=\"+Inf\"} 3\n\
             t_seconds_sum 2.0055\n\
             t_seconds_count 3\n"
        );
    }

    #[test]
    fn counters_show_their_zeros_and_escape_nothing_they_do_not_need_to() {
        let c = CounterVec::default();
        c.inc(&["agent", "refused"]);
        c.inc(&["agent", "refused"]);
        let mut out = String::new();
        c.write(
            &mut out,
            "t_total",
            "Test.",
            &["peer", "outcome"],
            &[&["agent", "accepted"]],
        );
        assert!(
            out.contains("t_total{peer=\"agent\",outcome=\"accepted\"} 0\n"),
            "{out}"
        );
        assert!(
            out.contains("t_total{peer=\"agent\",outcome=\"refused\"} 2\n"),
            "{out}"
        );
        assert_eq!(c.get(&["agent", "refused"]), 2);
        let mut out = String::new();
        sample(&mut out, "x", &[("v", "a\"b\\c\nd")], 1);
        assert_eq!(out, "x{v=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}
