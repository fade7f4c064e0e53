//! Journal throughput: durable 200-byte appends per second through the `Journal` actor with 1,
//! 16 and 256 concurrent producers, on each store, next to a raw baseline of that store measured
//! in the same run at the batch size the journal reached:
//! - sled: insert + flush + fdatasync of sled's data file;
//! - PostgreSQL (a database this bench starts, see `tether_tests::postgres`): one
//!   `INSERT … SELECT unnest(…)` of the batch and `COMMIT`, `synchronous_commit` on, of the
//!   rows the journal writes (its keys and encoded records).
//!
//! Then the PostgreSQL journal against the sled journal at 256 producers.
//!
//! `cargo bench -p tether-tests --bench journal` (`make bench`). `TETHER_BENCH_SECONDS` sets the
//! duration of each measurement (default 3); `TETHER_BENCH_PRODUCERS` one producer count;
//! `TETHER_BENCH_STORES` the stores to measure (`sled`, `postgres`, or both, the default).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tether_shared::journal::{
    record, Commit, Journal, JournalOptions, LogName, Observe, Op, PgOptions, PgStore,
};
use tether_shared::protocol::Seq;
use tether_tests::postgres::Postgres;

const VALUE_BYTES: usize = 200;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct JournalRun {
    appends_per_s: f64,
    avg_batch: f64,
    syncs: u64,
}

/// Which store a journal run uses.
#[derive(Clone, Copy)]
enum Backend<'a> {
    Sled,
    Postgres(&'a Postgres),
}

fn journal_run(backend: Backend<'_>, producers: u64, secs: f64) -> Result<JournalRun> {
    let tmp = tempfile::tempdir()?;
    let pg_url = match backend {
        Backend::Postgres(pg) => {
            // Each run starts from an empty database.
            pg.psql(
                "DROP TABLE IF EXISTS tether_journal, tether_blobs, tether_schema, tether_lease, tether_nodes",
            );
            Some(pg.url())
        }
        Backend::Sled => None,
    };
    let system = actix::System::new();
    system.block_on(async move {
        let (journal, _) = match pg_url {
            None => Journal::open(tmp.path(), &JournalOptions::default())?,
            Some(url) => {
                let store = PgStore::open(&PgOptions {
                    url,
                    ca_file: None,
                    pool_size: 2,
                })?;
                Journal::with_store(
                    Arc::new(store),
                    tmp.path(),
                    &JournalOptions::default(),
                    None,
                )?
            }
        };
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

/// Raw PostgreSQL: `batch` rows in one `INSERT … SELECT unnest(…)` and `COMMIT`; repeated for
/// `secs`, on a table like the journal's. The rows are the journal's own for the same run (its
/// keys and encoded records, `producers` logs appended in turn), so the ratio is the journal's
/// overhead over what the database costs for the same data.
fn raw_pg_run(pg: &Postgres, batch: usize, producers: u64, secs: f64) -> Result<f64> {
    pg.psql("DROP TABLE IF EXISTS raw_bench; CREATE TABLE raw_bench (key bytea PRIMARY KEY, value bytea NOT NULL)");
    let url = pg.url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let payload = vec![0xA5u8; VALUE_BYTES];
        let logs: Vec<LogName> = (0..producers.max(1))
            .map(|p| LogName::new(format!("bench/{p}")))
            .collect::<Result<_, _>>()?;
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed().as_secs_f64() < secs {
            let (mut keys, mut values) = (Vec::with_capacity(batch), Vec::with_capacity(batch));
            for _ in 0..batch {
                let log = &logs[(n % logs.len() as u64) as usize];
                let seq = Seq(n / logs.len() as u64 + 1);
                keys.push(record::record_key(log, seq));
                values.push(record::encode_record(log, seq, &payload));
                n += 1;
            }
            let tx = client.transaction().await?;
            tx.execute(
                "INSERT INTO raw_bench (key, value) SELECT * FROM unnest($1::bytea[], $2::bytea[])",
                &[&keys, &values],
            )
            .await?;
            tx.commit().await?;
        }
        Ok(n as f64 / started.elapsed().as_secs_f64())
    })
}

fn main() -> Result<()> {
    let secs: f64 = std::env::var("TETHER_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    println!("journal bench: durable {VALUE_BYTES}-byte appends, {secs} s per measurement");
    println!(
        "{:>10} {:>9} {:>14} {:>10} {:>8} {:>14} {:>7}",
        "store", "producers", "journal ops/s", "avg batch", "syncs", "raw ops/s", "ratio"
    );
    let only: Option<u64> = std::env::var("TETHER_BENCH_PRODUCERS")
        .ok()
        .and_then(|v| v.parse().ok());
    let stores = std::env::var("TETHER_BENCH_STORES").ok();
    let pg = Postgres::start();
    // (store, producers) -> (journal ops/s, raw ops/s)
    let mut results: Vec<(&str, u64, f64, f64)> = Vec::new();
    for producers in [1u64, 16, 256]
        .into_iter()
        .filter(|p| only.is_none_or(|o| o == *p))
    {
        let mut backends = vec![("sled", Backend::Sled)];
        if let Some(pg) = &pg {
            backends.push(("postgres", Backend::Postgres(pg)));
        }
        backends.retain(|(name, _)| stores.as_ref().is_none_or(|s| s.contains(name)));
        for (name, backend) in backends {
            let j = journal_run(backend, producers, secs)?;
            let batch = j.avg_batch.round().max(1.0) as usize;
            let raw = match backend {
                Backend::Sled => raw_sled_run(batch, secs)?,
                Backend::Postgres(pg) => raw_pg_run(pg, batch, producers, secs)?,
            };
            println!(
                "{name:>10} {producers:>9} {:>14.0} {:>10.1} {:>8} {:>14.0} {:>6.0}%",
                j.appends_per_s,
                j.avg_batch,
                j.syncs,
                raw,
                100.0 * j.appends_per_s / raw
            );
            results.push((name, producers, j.appends_per_s, raw));
        }
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let at = |store: &str| {
        results
            .iter()
            .find(|(s, p, _, _)| *s == store && *p == 256)
            .map(|(_, _, j, raw)| (*j, *raw))
    };
    if let Some((j, raw)) = at("sled") {
        println!(
            "target sled: >= 100000 acknowledged appends/s with 256 producers: {j:.0} ({})",
            verdict(j >= 100_000.0)
        );
        println!(
            "target sled: >= 50% of raw sled at the same batch size: {:.0}% ({})",
            100.0 * j / raw,
            verdict(j >= 0.5 * raw)
        );
    }
    if let (Some((sled, _)), Some((j, raw))) = (at("sled"), at("postgres")) {
        println!(
            "target postgres: >= 50% of the sled journal with 256 producers: {:.0}% ({})",
            100.0 * j / sled,
            verdict(j >= 0.5 * sled)
        );
        println!(
            "target postgres: >= 70% of raw batched INSERT/COMMIT at the same batch size: {:.0}% ({})",
            100.0 * j / raw,
            verdict(j >= 0.7 * raw)
        );
    }
    Ok(())
}
