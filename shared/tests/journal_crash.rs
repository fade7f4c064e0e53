//! Crash test of the journal: the test re-runs its own executable as a child process that
//! commits records as fast as it can and prints each acknowledgement, kills it with SIGKILL at
//! a random moment, then has another child read the journal back and checks that every
//! acknowledged append is there (with the right content) and every acknowledged truncation
//! took effect, and that each producer's blob (appended in the same commits) holds exactly
//! the bytes of the appends that survived. The writer compacts its store every 256 KiB of growth,
//! so kills also land while a compaction copies the store and swaps it in. `TETHER_CRASH_ITERATIONS` (default 100) kills, bounded in time (4 minutes; at least a third
//! of them must fit).
//!
//! A second check runs a child under `strace` and proves from the system-call trace that no
//! acknowledgement was printed before the `fdatasync` of sled's data file that covers its batch.
//!
//! `harness = false`: `main` dispatches on `TETHER_CRASH_CHILD` (`write`, `write-n`, `verify`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::Rng;
use tether_shared::journal::{Commit, Journal, JournalOptions, LogName, Op, SledOptions};
use tether_shared::protocol::Seq;

const PRODUCERS: u64 = 8;
/// Every producer truncates its log through `seq - KEEP` every `TRUNCATE_EVERY` appends.
const KEEP: u64 = 50;
const TRUNCATE_EVERY: u64 = 25;

fn payload(producer: u64, seq: u64) -> Vec<u8> {
    let len = 10 + ((producer * 7919 + seq * 104_729) % 3000) as usize;
    (0..len)
        .map(|i| (producer as usize * 31 + seq as usize * 17 + i) as u8)
        .collect()
}

fn log_name(producer: u64) -> Result<LogName> {
    Ok(LogName::new(format!("p{producer}"))?)
}

fn blob_name(producer: u64) -> Result<LogName> {
    Ok(LogName::new(format!("b{producer}"))?)
}

fn main() -> Result<()> {
    match std::env::var("TETHER_CRASH_CHILD").as_deref() {
        Ok("write") => child_write(None),
        Ok("write-n") => child_write(Some(40)),
        Ok("verify") => child_verify(),
        _ => {
            let started = Instant::now();
            kill_loop()?;
            fdatasync_precedes_every_ack()?;
            println!(
                "journal crash tests: 2 passed, 0 failed ({:?})",
                started.elapsed()
            );
            Ok(())
        }
    }
}

fn dir() -> Result<std::path::PathBuf> {
    Ok(std::env::var("TETHER_CRASH_DIR")
        .context("TETHER_CRASH_DIR unset")?
        .into())
}

/// Options that compact the store every few hundred KiB of growth, so that kills land in
/// and around compactions too.
fn compacting() -> JournalOptions {
    JournalOptions {
        sled: SledOptions {
            compact_after_growth_bytes: 256 * 1024,
            ..SledOptions::default()
        },
        ..JournalOptions::default()
    }
}

/// The number of the journal's live sled generation (how many compactions it went through).
fn generation(dir: &Path) -> Result<u64> {
    let current = std::fs::read_to_string(dir.join("CURRENT"))?;
    Ok(current.trim().trim_start_matches("sled.").parse()?)
}

/// Child: append (and truncate) through the `Journal` actor, printing each acknowledgement.
fn child_write(appends_each: Option<u64>) -> Result<()> {
    let dir = dir()?;
    let system = actix::System::new();
    system.block_on(async move {
        let (journal, recovered) = Journal::open(&dir, &compacting())?;
        let addr = actix::Actor::start(journal);
        let mut tasks = Vec::new();
        for p in 0..PRODUCERS {
            let start = recovered.logs.get(&format!("p{p}")).map_or(0, |l| l.last.0);
            let addr = addr.clone();
            let log = log_name(p)?;
            let blob = blob_name(p)?;
            tasks.push(actix::spawn(async move {
                let mut seq = start;
                loop {
                    seq += 1;
                    if appends_each.is_some_and(|n| seq > start + n) {
                        return Ok::<(), anyhow::Error>(());
                    }
                    // The same bytes go to the producer's blob in the same commit.
                    let ops = vec![
                        Op::Append {
                            log: log.clone(),
                            seq: Seq(seq),
                            payload: payload(p, seq),
                        },
                        Op::AppendBlob {
                            name: blob.clone(),
                            bytes: payload(p, seq),
                        },
                    ];
                    let done = addr.send(Commit { ops }).await??;
                    println!("A {p} {seq} batch={}", done.batch);
                    if seq % TRUNCATE_EVERY == 0 && seq > KEEP {
                        let upto = Seq(seq - KEEP);
                        let done = addr
                            .send(Commit {
                                ops: vec![Op::TruncateThrough {
                                    log: log.clone(),
                                    upto,
                                }],
                            })
                            .await??;
                        println!("T {p} {} batch={}", upto.0, done.batch);
                    }
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(())
    })
}

/// Child: open the journal (which validates every record) and list what it holds.
fn child_verify() -> Result<()> {
    let dir = dir()?;
    let (journal, recovered) = Journal::open(&dir, &JournalOptions::default())?;
    let handle = journal.handle();
    let mut out = std::io::stdout().lock();
    for p in 0..PRODUCERS {
        let Some(summary) = recovered.logs.get(&format!("p{p}")) else {
            continue;
        };
        let records = handle.read_log(&log_name(p)?, Seq::ZERO, usize::MAX)?;
        if records.len() as u64 != summary.records {
            bail!(
                "p{p}: read {} records, recovery counted {}",
                records.len(),
                summary.records
            );
        }
        for r in records {
            let ok = r.payload == payload(p, r.seq.0);
            writeln!(out, "{} {p} {}", if ok { "R" } else { "BAD" }, r.seq.0)?;
        }
        // The blob holds exactly the payloads of every append committed with it.
        let expected: Vec<u8> = (1..=summary.last.0).flat_map(|s| payload(p, s)).collect();
        let blob = handle.read_blob(&blob_name(p)?, 0, usize::MAX)?;
        if blob != expected {
            writeln!(
                out,
                "BADBLOB {p} {} (expected {} bytes, through seq {})",
                blob.len(),
                expected.len(),
                summary.last.0
            )?;
        }
    }
    Ok(())
}

fn child(mode: &str, dir: &Path) -> Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env("TETHER_CRASH_CHILD", mode)
        .env("TETHER_CRASH_DIR", dir)
        .env("RUST_LOG", "off");
    Ok(cmd)
}

/// What the children acknowledged, per producer.
#[derive(Default)]
struct Acked {
    appends: BTreeMap<u64, BTreeSet<u64>>,
    truncated: BTreeMap<u64, u64>,
}

impl Acked {
    fn absorb(&mut self, line: &str) -> Result<()> {
        let mut it = line.split_whitespace();
        let (kind, p, s) = (it.next(), it.next(), it.next());
        let (Some(kind), Some(p), Some(s)) = (kind, p, s) else {
            bail!("bad line {line:?}")
        };
        let (p, s): (u64, u64) = (p.parse()?, s.parse()?);
        match kind {
            "A" => {
                self.appends.entry(p).or_default().insert(s);
            }
            "T" => {
                let t = self.truncated.entry(p).or_default();
                *t = (*t).max(s);
            }
            _ => bail!("bad line {line:?}"),
        }
        Ok(())
    }
}

fn verify(dir: &Path, acked: &Acked) -> Result<usize> {
    let out = child("verify", dir)?.stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!(
            "verify child failed ({}); the journal did not reopen",
            out.status
        );
    }
    let mut held: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for line in String::from_utf8(out.stdout)?.lines() {
        let mut it = line.split_whitespace();
        let (kind, p, s) = (
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
            it.next().unwrap_or(""),
        );
        if kind != "R" {
            bail!("record with wrong content: {line}");
        }
        held.entry(p.parse()?).or_default().insert(s.parse()?);
    }
    let mut checked = 0;
    for (p, seqs) in &acked.appends {
        // A truncation may be durable without its ack having been printed: it is issued right
        // after the acked append of every TRUNCATE_EVERY-th seq.
        let issued = seqs
            .iter()
            .filter(|s| **s % TRUNCATE_EVERY == 0 && **s > KEEP)
            .map(|s| s - KEEP)
            .max();
        let floor = acked
            .truncated
            .get(p)
            .copied()
            .unwrap_or(0)
            .max(issued.unwrap_or(0));
        for s in seqs.iter().filter(|s| **s > floor) {
            if !held.get(p).is_some_and(|h| h.contains(s)) {
                bail!("acknowledged append p{p}#{s} is missing after the crash");
            }
            checked += 1;
        }
    }
    for (p, floor) in &acked.truncated {
        if let Some(s) = held
            .get(p)
            .and_then(|h| h.iter().next())
            .filter(|s| **s <= *floor)
        {
            bail!("p{p}#{s} survived an acknowledged truncation through {floor}");
        }
    }
    Ok(checked)
}

fn kill_loop() -> Result<()> {
    let iterations: u32 = std::env::var("TETHER_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let budget = Duration::from_secs(240);
    let tmp = tempfile::tempdir()?;
    let mut acked = Acked::default();
    let mut rng = rand::thread_rng();
    let started = Instant::now();
    let mut total_checked = 0;
    let mut kills = 0;
    for i in 0..iterations {
        if started.elapsed() > budget {
            // Bounded by time on a slow machine, but never to the point of meaning nothing.
            if i < iterations / 3 {
                bail!("only {i} of {iterations} kills fitted in {budget:?}");
            }
            eprintln!("journal crash: {i} of {iterations} kills fitted in {budget:?}");
            break;
        }
        kills = i + 1;
        let mut proc = child("write", tmp.path())?
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = proc.stdout.take().context("no stdout")?;
        let reader = std::thread::spawn(move || -> Result<Vec<String>> {
            BufReader::new(stdout)
                .lines()
                .map(|l| l.map_err(anyhow::Error::from))
                .collect()
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..400)));
        proc.kill()?; // SIGKILL
        proc.wait()?;
        let lines = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
        for line in &lines {
            acked.absorb(line)?;
        }
        total_checked = verify(tmp.path(), &acked).with_context(|| format!("after kill {i}"))?;
    }
    let appends: usize = acked.appends.values().map(|s| s.len()).sum();
    let compactions = generation(tmp.path())?;
    eprintln!(
        "journal crash: {kills} SIGKILLs in {:?}, {appends} acknowledged appends, {total_checked} checked present at the end, {compactions} compactions",
        started.elapsed()
    );
    if compactions < u64::from(kills / 10) {
        bail!("only {compactions} compactions in {kills} runs: kills did not meet compactions");
    }
    if appends < kills as usize {
        bail!("too few acknowledged appends ({appends}) for the test to mean anything");
    }
    Ok(())
}

/// Every printed acknowledgement of batch N follows the N-th completed fdatasync of sled's
/// data file in the system-call trace.
fn fdatasync_precedes_every_ack() -> Result<()> {
    if Command::new("strace").arg("-V").output().is_err() {
        if std::env::var("CI").as_deref() == Ok("true") {
            bail!("strace is not installed (make test installs it)");
        }
        eprintln!("SKIPPED fdatasync trace check: strace is not installed");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let trace = tmp.path().join("trace.txt");
    let data = tmp.path().join("journal");
    let exe = std::env::current_exe()?;
    let out = Command::new("strace")
        .args(["-f", "-y", "-s", "200", "-e", "trace=fdatasync,write", "-o"])
        .arg(&trace)
        .arg(&exe)
        .env("TETHER_CRASH_CHILD", "write-n")
        .env("TETHER_CRASH_DIR", &data)
        .env("RUST_LOG", "off")
        .output()?;
    if !out.status.success() {
        bail!(
            "traced child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&trace)?;
    let mut syncs = 0u64;
    let mut pending: BTreeSet<String> = BTreeSet::new();
    let mut acks = 0u64;
    for line in text.lines() {
        let pid = line.split_whitespace().next().unwrap_or("").to_owned();
        if line.contains("fdatasync(") && line.contains("/db>") {
            if line.contains("<unfinished") {
                pending.insert(pid);
            } else if line.ends_with("= 0") {
                syncs += 1;
            }
        } else if line.contains("<... fdatasync resumed>")
            && pending.remove(&pid)
            && line.ends_with("= 0")
        {
            syncs += 1;
        } else if line.contains("write(1<") {
            for part in line.split("batch=").skip(1) {
                let n: u64 = part
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect::<String>()
                    .parse()?;
                acks += 1;
                // +1: the journal's first sync writes its incarnation, before any batch.
                if syncs < n + 1 {
                    bail!("ack of batch {n} printed after only {syncs} fdatasyncs: {line}");
                }
            }
        }
    }
    if acks < PRODUCERS * 40 {
        bail!(
            "only {acks} acknowledgements found in the trace (expected {})",
            PRODUCERS * 40
        );
    }
    eprintln!("fdatasync trace: {acks} acknowledgements, each after the sync of its batch ({syncs} syncs)");
    Ok(())
}
