//! Dispatch: a trivial one-step process deployed to N agents, timed from the REST call until
//! the server records every result (per agent: the job's `finished_unix_ms` minus the call's
//! start), for N = 100 and 1,000 simulated agents (`loadgen`, real protocol and TLS) and 10
//! real agent processes; one real agent's round trip (20 deployments one after another); and
//! an idle real agent's memory (monitor plus worker RSS).
//!
//! At 1,000 agents and more, the same deployment in batches of 10% (rolling) is timed too.
//!
//! With 1,000 agents it then runs deployments until the server holds `TETHER_BENCH_HISTORY`
//! (default 100,000) finished jobs, and times the same dispatch again: the ratio shows whether
//! dispatch cost grows with history.
//!
//! Each simulated size is measured `TETHER_BENCH_REPEAT` times (default 5) after a warm-up;
//! the run with the median total is shown.
//!
//! `cargo bench -p tether-tests --bench dispatch` (`make bench`). `TETHER_BENCH_DISPATCH`
//! (default `100,1000`) sets the simulated sizes. The soft open-files limit is raised to the
//! hard one first; a size that would not fit under it is skipped, saying so. One load
//! generator process holds 10,000 agents' sockets under a limit of 20,000.

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench glue may unwrap

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tether_tests::fleet::{eventually, Agent, Server, TestDir};
use tether_tests::loadgen::{enroll_many, Fleet, SimConfig};
use tether_tests::measure::{dispatch, dispatch_with, percentile, rss_kib};

const TIMEOUT: Duration = Duration::from_secs(120);

fn trivial(server: &Server) {
    let r = server.request("POST", "/api/v1/processes", Some(&json!({"name": "trivial", "steps": [{"name": "hello", "plugin": "shell", "step": "run", "properties": {"script": "echo hello"}}]})));
    assert_eq!(r.status, 201, "{}", r.body);
}

/// The measured dispatch, `repeat` times: the run with the median total (the machines are
/// shared; one run's total moves with whatever else they do).
fn median_dispatch(server: &Server, ids: &[String], repeat: usize) -> Option<(u64, Vec<u64>)> {
    let mut runs: Vec<(u64, Vec<u64>)> = (0..repeat.max(1))
        .map(|_| {
            quiet(server);
            dispatch(server, "trivial", ids)
        })
        .collect::<Option<_>>()?;
    runs.sort_by_key(|(total, _)| *total);
    let totals: Vec<u64> = runs.iter().map(|(t, _)| *t).collect();
    eprintln!(
        "{} agents, totals of {} runs: {totals:?} ms",
        ids.len(),
        runs.len()
    );
    Some(runs.swap_remove(runs.len() / 2))
}

/// Waits (at most 5 minutes) until no journal compaction is under way: each measured dispatch
/// starts on a quiet server. A compaction its own writes start is part of its cost.
fn quiet(server: &Server) {
    let start = std::time::Instant::now();
    while tether_tests::wire::health(server)["journal"]["compacting"] == true
        && start.elapsed() < Duration::from_secs(300)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    if start.elapsed() > Duration::from_millis(200) {
        eprintln!(
            "waited {:?} for a journal compaction to end",
            start.elapsed()
        );
    }
}

fn row(label: &str, n: usize, result: Option<(u64, Vec<u64>)>) -> Option<u64> {
    match result {
        Some((total, per)) => {
            println!(
                "{label:>22} {n:>6} {total:>10} {:>8} {:>8} {:>8}",
                percentile(&per, 0.5),
                percentile(&per, 0.99),
                per.last().copied().unwrap_or(0)
            );
            Some(total)
        }
        None => {
            println!("{label:>22} {n:>6}     failed");
            None
        }
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("TETHER_BENCH_DISPATCH")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1000]);
    println!("dispatch bench: one-step process, from the REST call until the server records every result");
    println!(
        "{:>22} {:>6} {:>10} {:>8} {:>8} {:>8}",
        "agents", "n", "total ms", "p50 ms", "p99 ms", "max ms"
    );
    let mut sim_1000 = None;
    // Finished jobs to accumulate before dispatching to 1,000 agents again (0: skip).
    let history: usize = std::env::var("TETHER_BENCH_HISTORY")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(100_000);
    // Measured dispatches per size; the median is reported.
    let repeat: usize = std::env::var("TETHER_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(5);
    let mut history_ratio = None;
    // Each simulated agent holds a socket here and one in the server (which inherits the
    // limit), both with some files besides.
    let nofile = tether_tests::measure::raise_nofile();
    let sizes: Vec<usize> = sizes
        .into_iter()
        .filter(|&n| {
            let fits = (n as u64) + 1_000 <= nofile;
            if !fits {
                println!(
                    "{n} simulated agents skipped: they need about {} open files, the limit is {nofile} (raise it: ulimit -n)",
                    n + 1_000
                );
            }
            fits
        })
        .collect();
    // Rolling deployments (10% batches) and the unbatched one, total ms, by size (1,000 and up).
    let mut rolling_ratio: Vec<(usize, u64, u64)> = Vec::new();
    // Total ms of the measured dispatch, by fleet size (for the per-agent ratio).
    let mut totals: Vec<(usize, u64)> = Vec::new();
    for &n in &sizes {
        let dir = TestDir::new();
        let server = Server::start(dir.path());
        let ca = std::fs::read_to_string(server.ca_path()).unwrap();
        let tls = tether_shared::tls::client_config(&ca).unwrap();
        let token = server.token(u32::try_from(n).unwrap());
        let agents = enroll_many(
            server.wss,
            Arc::new(tls.clone()),
            "localhost",
            &token,
            "sim",
            n,
            32,
        )
        .unwrap();
        let ids: Vec<String> = agents.iter().map(|a| a.agent_id.clone()).collect();
        // Real fleets come from many hosts; one loopback address per 500 simulated agents
        // keeps each under the server's per-source bounds.
        let spread = u8::try_from(n.div_ceil(500)).unwrap_or(u8::MAX);
        let cfg = SimConfig::new(server.wss, "localhost", tls).spread_over_loopback(spread);
        let fleet = Fleet::start(cfg, agents).unwrap();
        eventually("simulated agents online", TIMEOUT, || {
            (fleet.stats().ready.load(Ordering::Relaxed) == n).then_some(())
        });
        trivial(&server);
        // Warm-up (first contact journaling, links created), then the measured deployment.
        dispatch(&server, "trivial", &ids);
        let total = row("simulated", n, median_dispatch(&server, &ids, repeat));
        totals.extend(total.map(|t| (n, t)));
        if n == 1000 {
            sim_1000 = total;
        }
        if n >= 1000 {
            // Rolling: the same deployment in batches of 10%, each once the one before ended.
            dispatch_with(&server, "trivial", &ids, json!({"batch_percent": 10}));
            let mut rolled: Vec<(u64, Vec<u64>)> = (0..repeat.max(1))
                .filter_map(|_| {
                    quiet(&server);
                    dispatch_with(&server, "trivial", &ids, json!({"batch_percent": 10}))
                })
                .collect();
            rolled.sort_by_key(|(t, _)| *t);
            let rolling_total = (!rolled.is_empty()).then(|| rolled.swap_remove(rolled.len() / 2));
            if let (Some(unbatched), Some(batched)) =
                (total, row("rolling, 10% batches", n, rolling_total))
            {
                rolling_ratio.push((n, batched, unbatched));
            }
        }
        if n == 1000 {
            // History: the same dispatch once the server holds `history` finished jobs.
            if history > 0 {
                let rounds = history.div_ceil(n);
                for _ in 0..rounds {
                    dispatch(&server, "trivial", &ids);
                }
                // Both dispatches are measured on a quiet server: creating the history churned
                // the journal, and its compaction (paced, in the background) is not dispatch.
                quiet(&server);
                // Warmed up as the fresh measurement was (its first dispatch).
                dispatch(&server, "trivial", &ids);
                let label = format!("after {} jobs", rounds * n);
                let after = row(&label, n, median_dispatch(&server, &ids, repeat));
                if let (Some(fresh), Some(after)) = (total, after) {
                    history_ratio = Some(after as f64 / fresh.max(1) as f64);
                }
            }
        }
        eprintln!(
            "simulated agents answered {} jobs",
            fleet.stats().jobs.load(Ordering::Relaxed)
        );
        fleet.stop();
    }

    let dir = TestDir::new();
    let server = Server::start(dir.path());
    trivial(&server);
    let mut real: Vec<Agent> = (0..10)
        .map(|i| Agent::install(&server, dir.path(), &format!("real-{i}"), &["bench"]))
        .collect();
    for a in &mut real {
        a.run();
    }
    for a in &real {
        eventually("real agents online", TIMEOUT, || {
            (server.agent_status(&a.id) == "online").then_some(())
        });
    }
    let ids: Vec<String> = real.iter().map(|a| a.id.clone()).collect();
    dispatch(&server, "trivial", &ids);
    row("real agents", ids.len(), dispatch(&server, "trivial", &ids));
    let one = vec![ids[0].clone()];
    dispatch(&server, "trivial", &one);
    let mut trips: Vec<u64> = (0..20)
        .filter_map(|_| dispatch(&server, "trivial", &one).map(|(t, _)| t))
        .collect();
    trips.sort_unstable();
    println!(
        "{:>22} {:>6} {:>10} {:>8} {:>8} {:>8}",
        "one real agent x20",
        1,
        trips.iter().sum::<u64>(),
        percentile(&trips, 0.5),
        percentile(&trips, 0.99),
        trips.last().copied().unwrap_or(0)
    );

    // Idle memory of one agent: monitor plus worker, after a quiet spell.
    std::thread::sleep(Duration::from_secs(5));
    let a = &real[0];
    let (monitor, worker) = (a.monitor_pid().unwrap(), a.worker_pid().unwrap());
    let (m, w) = (rss_kib(monitor), rss_kib(worker));
    println!(
        "idle agent RSS: monitor {m} KiB + worker {w} KiB = {} KiB",
        m + w
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    for (n, batched, unbatched) in rolling_ratio {
        println!(
            "rolling deployment to {n} simulated agents in 10 batches of 10%: {batched} ms, {:.2}x the unbatched {unbatched} ms (report)",
            batched as f64 / unbatched.max(1) as f64
        );
    }
    if let Some(t) = sim_1000 {
        println!(
            "target 1000 simulated agents all done < 2000 ms: {t} ms ({})",
            verdict(t < 2000)
        );
    }
    // Linear dispatch: the largest fleet's cost per agent against 1,000 agents', in this run.
    let per_agent = |n: usize| {
        totals
            .iter()
            .find(|(m, _)| *m == n)
            .map(|(_, t)| *t as f64 / n as f64)
    };
    if let Some(&(largest, t)) = totals.iter().max_by_key(|(n, _)| *n) {
        if largest >= 10_000 {
            println!(
                "target {largest} simulated agents all done < 5000 ms: {t} ms ({})",
                verdict(t < 5000)
            );
        }
        if let (true, Some(small), Some(big)) =
            (largest > 1000, per_agent(1000), per_agent(largest))
        {
            let r = big / small.max(f64::MIN_POSITIVE);
            println!(
                "target per-agent cost at {largest} <= 1.3x the cost at 1000: {big:.3} / {small:.3} ms = {r:.2}x ({})",
                verdict(r <= 1.3)
            );
        }
    }
    if let Some(r) = history_ratio {
        println!(
            "target 1000 agents after {history} finished jobs <= 1.2x a fresh server: {r:.2}x ({})",
            verdict(r <= 1.2)
        );
    }
    let p50 = percentile(&trips, 0.5);
    println!(
        "target one real agent round trip < 50 ms (p50 of 20): {p50} ms ({})",
        verdict(p50 < 50)
    );
    println!(
        "target idle agent (monitor + worker) < 20 MiB: {:.1} MiB ({})",
        (m + w) as f64 / 1024.0,
        verdict(m + w < 20 * 1024)
    );
}
