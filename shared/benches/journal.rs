//! Journal throughput: durable 200-byte appends per second through the `Journal` actor with 1,
//! 16 and 256 concurrent producers, next to a raw sled baseline measured in the same run
//! (insert + flush + fdatasync of sled's data file, in batches of the size the journal reached).
//!
//! `cargo bench -p tether-shared --bench journal` (`make bench`). `TETHER_BENCH_SECONDS` sets the
//! duration of each measurement (default 3).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tether_shared::journal::{Commit, Journal, JournalOptions, LogName, Observe, Op};
use tether_shared::protocol::Seq;

const VALUE_BYTES: usize = 200;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct JournalRun {
    appends_per_s: f64,
    avg_batch: f64,
    syncs: u64,
}

fn journal_run(producers: u64, secs: f64) -> Result<JournalRun> {
    let tmp = tempfile::tempdir()?;
    let system = actix::System::new();
    system.block_on(async move {
        let (journal, _) = Journal::open(tmp.path(), &JournalOptions::default())?;
        let addr = actix::Actor::start(journal);
        let done = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let before = addr.send(Observe).await?;
        let started = Instant::now();
        let mut tasks = Vec::new();
        let direct = std::env::var("TETHER_BENCH_DIRECT").is_ok();
        let handle = addr.send(tether_shared::journal::GetHandle).await?;
        for p in 0..producers {
            let addr = addr.clone();
            let handle = handle.clone();
            let done = done.clone();
            let log = LogName::new(format!("bench/{p}"))?;
            tasks.push(actix::spawn(async move {
                let mut seq = 0u64;
                while Instant::now() < deadline {
                    seq += 1;
                    let op = Op::Append {
                        log: log.clone(),
                        seq: Seq(seq),
                        payload: vec![0xA5; VALUE_BYTES],
                    };
                    if direct {
                        handle.commit(vec![op]).await?;
                    } else {
                        addr.send(Commit { ops: vec![op] }).await??;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), anyhow::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let after = addr.send(Observe).await?;
        let commits = after.commits - before.commits;
        let batches = (after.batches - before.batches).max(1);
        Ok(JournalRun {
            appends_per_s: done.load(Ordering::Relaxed) as f64 / elapsed,
            avg_batch: commits as f64 / batches as f64,
            syncs: after.syncs - before.syncs,
        })
    })
}

/// Raw sled: `batch` inserts, one flush, one fdatasync; repeated for `secs`.
fn raw_sled_run(batch: usize, secs: f64) -> Result<f64> {
    let tmp = tempfile::tempdir()?;
    let db = sled::Config::new()
        .path(tmp.path())
        .flush_every_ms(None)
        .mode(sled::Mode::HighThroughput)
        .open()?;
    let data = File::open(tmp.path().join("db")).context("sled data file")?;
    let value = vec![0xA5u8; VALUE_BYTES];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < secs {
        for _ in 0..batch {
            n += 1;
            db.insert(n.to_be_bytes(), value.as_slice())?;
        }
        db.flush()?;
        data.sync_data()?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let secs: f64 = std::env::var("TETHER_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    println!("journal bench: durable {VALUE_BYTES}-byte appends, {secs} s per measurement");
    println!(
        "{:>9} {:>14} {:>10} {:>8} {:>16} {:>7}",
        "producers", "journal ops/s", "avg batch", "syncs", "raw sled ops/s", "ratio"
    );
    let mut at_256 = None;
    let only: Option<u64> = std::env::var("TETHER_BENCH_PRODUCERS")
        .ok()
        .and_then(|v| v.parse().ok());
    for producers in [1u64, 16, 256]
        .into_iter()
        .filter(|p| only.is_none_or(|o| o == *p))
    {
        let j = journal_run(producers, secs)?;
        let batch = j.avg_batch.round().max(1.0) as usize;
        let raw = raw_sled_run(batch, secs)?;
        println!(
            "{producers:>9} {:>14.0} {:>10.1} {:>8} {:>16.0} {:>6.0}%",
            j.appends_per_s,
            j.avg_batch,
            j.syncs,
            raw,
            100.0 * j.appends_per_s / raw
        );
        if producers == 256 {
            at_256 = Some((j.appends_per_s, raw));
        }
    }
    if let Some((j, raw)) = at_256 {
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        println!(
            "target ≥ 100000 acknowledged appends/s with 256 producers: {:.0} ({})",
            j,
            verdict(j >= 100_000.0)
        );
        println!(
            "target ≥ 50% of raw sled at the same batch size: {:.0}% ({})",
            100.0 * j / raw,
            verdict(j >= 0.5 * raw)
        );
    }
    Ok(())
}
