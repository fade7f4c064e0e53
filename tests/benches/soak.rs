//! Soak: deployments back to back to a fleet of simulated agents (real protocol and TLS), each
//! deployment printing 1 MiB of output in all, for a bounded time, against a release
//! `tether-server` with its default retention but a short prune interval and count (so that a
//! 10-minute run reaches the steady state a months-long one would). Prints the server's RSS,
//! its journal's bytes on disk and the p99 dispatch latency after warm-up and at the end, and
//! their ratios, and the highest of each seen in the first and second half of the run after
//! warm-up (the journal compacts itself in steps, so its size is a sawtooth that two samples
//! can catch at any height). Target: end ≤ 1.2× warm-up for RSS and disk; p99 unchanged
//! within noise.
//!
//! `cargo bench -p tether-tests --bench soak` (`make bench`). `TETHER_BENCH_SOAK_SECS`
//! (default 600), `TETHER_BENCH_SOAK_AGENTS` (default 200), `TETHER_BENCH_SOAK_OUTPUT_BYTES`
//! (output per deployment, default 1 MiB), `TETHER_BENCH_SOAK_KEEP` (finished deployments the
//! server keeps, default 50).

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench glue may unwrap

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tether_tests::fleet::{eventually, Server, TestDir};
use tether_tests::loadgen::{enroll_many, Fleet, JobOutput, SimConfig};
use tether_tests::measure::{disk_bytes, dispatch, percentile, rss_kib};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// What one window of the run measured.
struct Sample {
    deployments: usize,
    rss_kib: u64,
    journal_bytes: u64,
    p99_ms: u64,
}

/// The highest values seen in one part of the run.
#[derive(Default)]
struct Peak {
    rss_kib: u64,
    journal_bytes: u64,
    p99_ms: u64,
}

impl Peak {
    fn see(&mut self, journal_bytes: u64, rss_kib: u64, p99_ms: u64) {
        self.journal_bytes = self.journal_bytes.max(journal_bytes);
        self.rss_kib = self.rss_kib.max(rss_kib);
        self.p99_ms = self.p99_ms.max(p99_ms);
    }
}

fn sample(server: &Server, latencies: &mut Vec<u64>, deployments: usize) -> Sample {
    latencies.sort_unstable();
    let s = Sample {
        deployments,
        rss_kib: rss_kib(server.pid().unwrap_or(0)),
        journal_bytes: disk_bytes(&server.dir.join("journal")),
        p99_ms: percentile(latencies, 0.99),
    };
    latencies.clear();
    s
}

fn main() {
    let secs: u64 = env_or("TETHER_BENCH_SOAK_SECS", 600);
    let agents: usize = env_or("TETHER_BENCH_SOAK_AGENTS", 200);
    let output: usize = env_or("TETHER_BENCH_SOAK_OUTPUT_BYTES", 1024 * 1024);
    let keep: usize = env_or("TETHER_BENCH_SOAK_KEEP", 50);
    let run = Duration::from_secs(secs);
    let dir = TestDir::new();
    let keep_text = keep.to_string();
    let server = Server::start_with(
        dir.path(),
        &[
            ("TETHER_RETENTION__KEEP_DEPLOYMENTS", keep_text.as_str()),
            ("TETHER_RETENTION__PRUNE_INTERVAL_S", "5"),
        ],
    );
    let ca = std::fs::read_to_string(server.ca_path()).unwrap();
    let tls = tether_shared::tls::client_config(&ca).unwrap();
    let token = server.token(u32::try_from(agents).unwrap());
    let enrolled = enroll_many(
        server.wss,
        Arc::new(tls.clone()),
        "localhost",
        &token,
        "soak",
        agents,
        32,
    )
    .unwrap();
    let ids: Vec<String> = enrolled.iter().map(|a| a.agent_id.clone()).collect();
    // Each job prints its share of the deployment's output, in chunks of up to 16 KiB.
    let per_job = (output / agents.max(1)).max(1);
    let chunk_bytes = per_job.min(16 * 1024);
    let mut cfg = SimConfig::new(server.wss, "localhost", tls);
    cfg.job_output = JobOutput {
        chunks: u32::try_from(per_job.div_ceil(chunk_bytes)).unwrap(),
        chunk_bytes,
        after_finish: 0,
    };
    let fleet = Fleet::start(cfg, enrolled).unwrap();
    eventually("simulated agents online", Duration::from_secs(120), || {
        (fleet.stats().ready.load(Ordering::Relaxed) == agents).then_some(())
    });
    let r = server.request(
        "POST",
        "/api/v1/processes",
        Some(&json!({"name": "soak", "steps": [
            {"name": "print", "plugin": "shell", "step": "run", "properties": {"script": "true"}}
        ]})),
    );
    assert_eq!(r.status, 201, "{}", r.body);

    println!(
        "soak bench: {agents} simulated agents, {output} bytes of output per deployment, \
         {secs} s, the server keeping {keep} finished deployments"
    );
    let started = Instant::now();
    // Warm-up: a tenth of the run (at least as many deployments as are kept, so that pruning
    // has begun and the journal has reached its working size).
    let warm_up = run / 10;
    let (mut done, mut failed) = (0usize, 0usize);
    let mut latencies = Vec::new();
    let mut after_warm_up = None;
    // The journal compacts itself in steps, so its size is a sawtooth: besides the two
    // samples, the highest disk and RSS seen in each half of the run after warm-up.
    let mut peaks = [Peak::default(), Peak::default()];
    let pid = server.pid().unwrap_or(0);
    while started.elapsed() < run {
        match dispatch(&server, "soak", &ids) {
            Some((_, per)) => {
                latencies.push(percentile(&per, 0.99));
                done += 1;
            }
            None => failed += 1,
        }
        let elapsed = started.elapsed();
        if after_warm_up.is_some() {
            let half = usize::from(elapsed >= warm_up + (run - warm_up) / 2);
            peaks[half].see(
                disk_bytes(&server.dir.join("journal")),
                rss_kib(pid),
                latencies.last().copied().unwrap_or(0),
            );
        }
        if after_warm_up.is_none() && started.elapsed() >= warm_up && done > keep {
            after_warm_up = Some(sample(&server, &mut latencies, done));
        }
    }
    // One more prune interval, so that the end is measured after the pruner's pass.
    std::thread::sleep(Duration::from_secs(6));
    let end = sample(&server, &mut latencies, done);
    let start = after_warm_up.unwrap_or(Sample {
        deployments: 0,
        rss_kib: 0,
        journal_bytes: 0,
        p99_ms: 0,
    });
    println!(
        "{:>14} {:>12} {:>10} {:>16} {:>14}",
        "", "deployments", "RSS KiB", "journal bytes", "p99 ms (job)"
    );
    for (label, s) in [("after warm-up", &start), ("end", &end)] {
        println!(
            "{label:>14} {:>12} {:>10} {:>16} {:>14}",
            s.deployments, s.rss_kib, s.journal_bytes, s.p99_ms
        );
    }
    let ratio = |a: u64, b: u64| {
        if a == 0 {
            f64::NAN
        } else {
            b as f64 / a as f64
        }
    };
    println!(
        "{:>14} {:>12} {:>10.2} {:>16.2} {:>14.2}   (end / after warm-up; target RSS and disk <= 1.2)",
        "ratio",
        "",
        ratio(start.rss_kib, end.rss_kib),
        ratio(start.journal_bytes, end.journal_bytes),
        ratio(start.p99_ms, end.p99_ms)
    );
    println!(
        "{:>14} {:>12} {:>10} {:>16} {:>14}",
        "peak", "", "RSS KiB", "journal bytes", "job p99 ms"
    );
    for (label, p) in [("first half", &peaks[0]), ("second half", &peaks[1])] {
        println!(
            "{label:>14} {:>12} {:>10} {:>16} {:>14}",
            "", p.rss_kib, p.journal_bytes, p.p99_ms
        );
    }
    println!(
        "{:>14} {:>12} {:>10.2} {:>16.2} {:>14.2}   (second half / first half after warm-up)",
        "ratio",
        "",
        ratio(peaks[0].rss_kib, peaks[1].rss_kib),
        ratio(peaks[0].journal_bytes, peaks[1].journal_bytes),
        ratio(peaks[0].p99_ms, peaks[1].p99_ms)
    );
    println!("{done} deployments succeeded, {failed} failed");
    fleet.stop();
}
