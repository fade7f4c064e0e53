//! Fleet load: N simulated agents (`tether_tests::loadgen`) speaking the real protocol over real
//! TLS from this one process against a real `tether-server` (release build), for N = 100, 1,000
//! and 5,000, each against a fresh server:
//!
//! - connect: time from starting all N agents until all got their `Welcome` (and the server
//!   lists all N online);
//! - memory: server RSS before any session and with N idle sessions → KiB per idle session;
//! - events: every agent sends M numbered probe events; durable agent→server events per second
//!   (an event counts once the server's ack covers it: it journals before it acks), next to one
//!   agent alone; a sample of agents is checked through `GET /api/v1/agents/{id}/probes`;
//! - reconnect storm: SIGKILL the server, restart it on the same ports, time until all N are
//!   online again (then the probe check again: acknowledged events survived the kill).
//!
//! `cargo bench -p tether-tests --bench fleet` (`make bench` builds the release server first).
//! `TETHER_BENCH_AGENTS` (default `100,1000,5000`), `TETHER_BENCH_EVENTS` (events per run in
//! total, default 200000), `TETHER_BENCH_THREADS` (load generator threads, default 2),
//! `TETHER_BENCH_HEARTBEAT_MS` (agents beat at this interval instead of the server's; the real
//! agent beats every second), `TETHER_BENCH_SERVER_ENV` (server config overrides, e.g.
//! `TETHER_SERVER__MAX_HANDSHAKES_IN_FLIGHT=1024`), `TETHER_BIN_DIR` (where `tether-server`
//! is; default this profile's directory).

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench glue may unwrap

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tether_tests::fleet::{Server, TestDir};
use tether_tests::loadgen::{enroll_many, Fleet, SimConfig, Stats};
use tether_tests::measure;
use tether_tests::postgres::Postgres;

/// Every phase is bounded: a missed bound is reported, never waited out.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle time before the memory reading: one full heartbeat interval (the server's default 5 s).
const SETTLE: Duration = Duration::from_secs(5);
const EVENTS_TIMEOUT: Duration = Duration::from_secs(60);
const BASELINE_TIMEOUT: Duration = Duration::from_secs(20);
const STORM_TIMEOUT: Duration = Duration::from_secs(60);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
const SERVER_CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);
/// Probe events agent 0 sends alone (the one-agent baseline).
const BASELINE_EVENTS: u64 = 10_000;
/// Agents checked through the probes API after each phase.
const SAMPLE: usize = 10;
/// Concurrent enrollments.
const ENROLL_PARALLEL: usize = 32;
/// File descriptors per agent on each side, plus headroom for the rest of the process.
const FD_HEADROOM: u64 = 256;

/// Targets of the issue.
const TARGET_STORM: Duration = Duration::from_secs(15);
const TARGET_KIB_PER_SESSION: f64 = 64.0;
const TARGET_EVENTS_PER_S: f64 = 20_000.0;

#[derive(Default)]
struct Row {
    /// The server's store: `sled` or `postgres`.
    store: &'static str,
    agents: usize,
    enroll_s: Option<f64>,
    /// Until every agent had its Welcome / until the server listed all online.
    connect_s: Option<f64>,
    connect_server_s: Option<f64>,
    welcomes: u64,
    busy_connect: u64,
    rss_start_kib: u64,
    rss_before_kib: u64,
    rss_idle_kib: u64,
    rss_peak_kib: u64,
    events_each: u64,
    baseline_eps: Option<f64>,
    eps: Option<f64>,
    events_acked: u64,
    probes_ok: Option<bool>,
    storm_s: Option<f64>,
    storm_restart_s: f64,
    busy_storm: u64,
    probes_after_storm_ok: Option<bool>,
    /// When half, 90 % and all of the agents were online (connect, storm).
    connect_marks: Marks,
    storm_marks: Marks,
    /// CPU seconds (server, load generator) per phase: connect, events, storm.
    cpu_server: [f64; 3],
    cpu_loadgen: [f64; 3],
    /// Server CPU while the sessions idle, percent of one core.
    idle_cpu_pct: f64,
    /// On PostgreSQL, over the events phase: the server's transactions (journal syncs) and the
    /// database's WAL bytes.
    db_transactions: Option<u64>,
    db_wal_bytes: Option<u64>,
    notes: Vec<String>,
}

#[derive(Default, Clone, Copy)]
struct Marks {
    half: Option<f64>,
    p90: Option<f64>,
    all: Option<f64>,
}

impl Row {
    fn kib_per_session(&self) -> Option<f64> {
        (self.rss_idle_kib > 0 && self.agents > 0)
            .then(|| (self.rss_idle_kib as f64 - self.rss_before_kib as f64) / self.agents as f64)
    }
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .split(',')
            .filter_map(|s| s.trim().replace('_', "").parse().ok())
            .filter(|n| *n > 0)
            .collect(),
        _ => default.to_vec(),
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// The server's committed transactions (its journal's syncs: one per batch on PostgreSQL) and
/// the database's WAL position in bytes.
fn db_counters(server: &Server, pg: &Postgres) -> (u64, u64) {
    let syncs = tether_tests::wire::health(server)["journal"]["syncs"]
        .as_u64()
        .unwrap_or(0);
    let wal = pg
        .psql("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
        .parse()
        .unwrap_or(0);
    (syncs, wal)
}

fn rss_kib(pid: u32) -> (u64, u64) {
    (measure::rss_kib(pid), measure::peak_rss_kib(pid))
}

/// Stores the CPU seconds of `pid` (`None`: this process) since `since` as phase `phase`.
fn cpu(row_cpu: &mut [f64; 3], phase: usize, pid: Option<u32>, since: f64) {
    row_cpu[phase] = measure::cpu_s(pid) - since;
}

/// Waits until `n` agents are ready, at most `timeout`, noting when half and 90 % were.
fn wait_ready(stats: &Stats, n: usize, timeout: Duration, since: Instant) -> Marks {
    let mut marks = Marks::default();
    let started = Instant::now();
    loop {
        let ready = stats.ready.load(Ordering::Relaxed);
        let t = since.elapsed().as_secs_f64();
        if marks.half.is_none() && 2 * ready >= n {
            marks.half = Some(t);
        }
        if marks.p90.is_none() && 10 * ready >= 9 * n {
            marks.p90 = Some(t);
        }
        if ready >= n {
            marks.all = Some(t);
            return marks;
        }
        if started.elapsed() >= timeout {
            return marks;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `done` holds, at most `timeout`; the time it took.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if done() {
            return Some(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Polls the server until it lists `n` agents online; time from `since`.
fn confirm_online(server: &Server, n: usize, since: Instant) -> Option<f64> {
    let deadline = Instant::now() + SERVER_CONFIRM_TIMEOUT;
    loop {
        if measure::agents_online(server) == Some(n) {
            return Some(since.elapsed().as_secs_f64());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The probes API for a sample of agents: `expect(i)` events received, no duplicates, no gaps.
fn check_probes(
    server: &Server,
    ids: &[String],
    expect: impl Fn(usize) -> u64,
) -> Result<(), String> {
    let step = (ids.len() / SAMPLE).max(1);
    let mut picked: Vec<usize> = (0..ids.len()).step_by(step).take(SAMPLE).collect();
    if let Some(last) = ids.len().checked_sub(1) {
        if !picked.contains(&last) {
            picked.push(last);
        }
    }
    for i in picked {
        let path = format!("/api/v1/agents/{}/probes", ids[i]);
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| server.request("GET", &path, None)))
            .map_err(|_| format!("GET {path} failed"))?;
        if r.status != 200 {
            return Err(format!("GET {path}: HTTP {}: {}", r.status, r.body));
        }
        let v: Value = serde_json::from_str(&r.body).map_err(|e| format!("{path}: {e}"))?;
        let ev = &v["probes"]["events"];
        let (received, dup, gaps) = (
            ev["received"].as_u64().unwrap_or(u64::MAX),
            ev["duplicates"].as_u64().unwrap_or(u64::MAX),
            ev["gaps"].as_u64().unwrap_or(u64::MAX),
        );
        if received != expect(i) || dup != 0 || gaps != 0 {
            return Err(format!(
                "agent #{i} {}: received {received} (expected {}), duplicates {dup}, gaps {gaps}",
                ids[i],
                expect(i)
            ));
        }
    }
    Ok(())
}

fn reasons(stats: &Stats) -> String {
    let r = stats.reasons();
    if r.is_empty() {
        return "none".into();
    }
    r.iter()
        .take(5)
        .map(|(k, n)| format!("{n}× {k}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn run_one(
    n: usize,
    total_events: u64,
    threads: usize,
    beat: Option<Duration>,
    server_env: &[(String, String)],
    pg: Option<&Postgres>,
) -> Row {
    let mut row = Row {
        agents: n,
        ..Row::default()
    };
    let dir = TestDir::new();
    let env: Vec<(&str, &str)> = server_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut server = Server::start_with(dir.path(), &env);
    let pid = server.pid().expect("server pid");
    row.rss_start_kib = rss_kib(pid).0;

    // Enrollment: one token for all, 32 at a time.
    let ca = std::fs::read_to_string(server.ca_path()).expect("ca.pem");
    let tls = tether_shared::tls::client_config(&ca).expect("client tls");
    let token = server.token(u32::try_from(n).expect("agents fit u32"));
    let started = Instant::now();
    let agents = match enroll_many(
        server.wss,
        Arc::new(tls.clone()),
        "localhost",
        &token,
        "sim",
        n,
        ENROLL_PARALLEL,
    ) {
        Ok(a) => a,
        Err(e) => {
            row.notes.push(format!("enrollment failed: {e}"));
            return row;
        }
    };
    row.enroll_s = Some(started.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_millis(500));
    row.rss_before_kib = rss_kib(pid).0;

    // Connect: all at once.
    let mut cfg = SimConfig::new(server.wss, "localhost", tls);
    cfg.threads = threads;
    cfg.beat_override = beat;
    let (srv0, gen0) = (measure::cpu_s(Some(pid)), measure::cpu_s(None));
    let started = Instant::now();
    let fleet = Fleet::start(cfg, agents).expect("fleet");
    let stats = || fleet.stats();
    row.connect_marks = wait_ready(stats(), n, CONNECT_TIMEOUT, started);
    cpu(&mut row.cpu_server, 0, Some(pid), srv0);
    cpu(&mut row.cpu_loadgen, 0, None, gen0);
    match row.connect_marks.all {
        Some(t) => {
            row.connect_s = Some(t);
            row.connect_server_s = confirm_online(&server, n, started);
        }
        None => row.notes.push(format!(
            "connect: only {} of {n} online after {CONNECT_TIMEOUT:?}; failures: {}",
            stats().ready.load(Ordering::Relaxed),
            reasons(stats())
        )),
    }
    row.welcomes = stats().welcomes.load(Ordering::Relaxed);
    row.busy_connect = stats().busy.load(Ordering::Relaxed);
    if row.connect_s.is_some() && row.welcomes > n as u64 {
        row.notes.push(format!(
            "connect: {} welcomes for {n} agents (sessions dropped: {})",
            row.welcomes,
            stats().dropped.load(Ordering::Relaxed)
        ));
    }
    if stats().failed.load(Ordering::Relaxed) > 0 {
        row.notes.push(format!(
            "connect: {} failed attempts, {} busy: {}",
            stats().failed.load(Ordering::Relaxed),
            row.busy_connect,
            reasons(stats())
        ));
    }
    stats().clear_reasons();

    // Memory with N idle sessions (heartbeats only).
    let idle0 = measure::cpu_s(Some(pid));
    std::thread::sleep(SETTLE);
    row.idle_cpu_pct = 100.0 * (measure::cpu_s(Some(pid)) - idle0) / SETTLE.as_secs_f64();
    (row.rss_idle_kib, row.rss_peak_kib) = rss_kib(pid);

    // Events: agent 0 alone, then everyone.
    let acked = || stats().events_acked.load(Ordering::Relaxed);
    let base = acked();
    fleet.set_events(0, BASELINE_EVENTS);
    match wait_until(BASELINE_TIMEOUT, || acked() >= base + BASELINE_EVENTS) {
        Some(t) => row.baseline_eps = Some(BASELINE_EVENTS as f64 / t.as_secs_f64()),
        None => row.notes.push(format!(
            "1-agent events: {} of {BASELINE_EVENTS} acked in {BASELINE_TIMEOUT:?}",
            acked() - base
        )),
    }
    let each = (total_events / n as u64).max(1);
    row.events_each = each;
    let base = acked();
    let total = each * n as u64;
    let (srv0, gen0) = (measure::cpu_s(Some(pid)), measure::cpu_s(None));
    let db0 = pg.map(|pg| db_counters(&server, pg));
    fleet.set_events(each, BASELINE_EVENTS);
    let done = wait_until(EVENTS_TIMEOUT, || acked() >= base + total);
    if let (Some(pg), Some((tx0, wal0))) = (pg, db0) {
        let (tx1, wal1) = db_counters(&server, pg);
        row.db_transactions = Some(tx1.saturating_sub(tx0));
        row.db_wal_bytes = Some(wal1.saturating_sub(wal0));
    }
    cpu(&mut row.cpu_server, 1, Some(pid), srv0);
    cpu(&mut row.cpu_loadgen, 1, None, gen0);
    match done {
        Some(t) => row.eps = Some(total as f64 / t.as_secs_f64()),
        None => {
            let done = acked() - base;
            row.notes.push(format!(
                "events: {done} of {total} acked in {EVENTS_TIMEOUT:?} ({:.0}/s); failures: {}",
                done as f64 / EVENTS_TIMEOUT.as_secs_f64(),
                reasons(stats())
            ));
        }
    }
    row.events_acked = acked() - base;
    let expect = |i: usize| each + if i == 0 { BASELINE_EVENTS } else { 0 };
    let ids = fleet.ids().to_vec();
    match check_probes(&server, &ids, expect) {
        Ok(()) => row.probes_ok = Some(true),
        Err(e) => {
            row.probes_ok = Some(false);
            row.notes.push(format!("probe check: {e}"));
        }
    }
    stats().clear_reasons();

    // Reconnect storm: SIGKILL, restart on the same ports.
    let busy_before = stats().busy.load(Ordering::Relaxed);
    server.kill();
    if wait_until(DRAIN_TIMEOUT, || stats().ready.load(Ordering::Relaxed) == 0).is_none() {
        row.notes.push(format!(
            "storm: {} agents still think they are online {DRAIN_TIMEOUT:?} after the kill",
            stats().ready.load(Ordering::Relaxed)
        ));
    }
    let gen0 = measure::cpu_s(None);
    let restarted = Instant::now();
    let ran = std::panic::catch_unwind(AssertUnwindSafe(|| server.run()));
    row.storm_restart_s = restarted.elapsed().as_secs_f64();
    let Some(pid) = server.pid().filter(|_| ran.is_ok()) else {
        row.notes.push("storm: the server did not restart".into());
        return row;
    };
    row.storm_marks = wait_ready(stats(), n, STORM_TIMEOUT, restarted);
    cpu(&mut row.cpu_server, 2, Some(pid), 0.0);
    cpu(&mut row.cpu_loadgen, 2, None, gen0);
    match row.storm_marks.all {
        Some(t) => {
            row.storm_s = Some(t);
            if confirm_online(&server, n, restarted).is_none() {
                row.notes
                    .push("storm: the server never listed all agents online".into());
            }
        }
        None => row.notes.push(format!(
            "storm: only {} of {n} online {STORM_TIMEOUT:?} after the restart; failures: {}",
            stats().ready.load(Ordering::Relaxed),
            reasons(stats())
        )),
    }
    row.busy_storm = stats().busy.load(Ordering::Relaxed) - busy_before;
    if row.storm_s.is_some() && !stats().reasons().is_empty() {
        row.notes.push(format!("storm: {}", reasons(stats())));
    }
    match check_probes(&server, &ids, expect) {
        Ok(()) => row.probes_after_storm_ok = Some(true),
        Err(e) => {
            row.probes_after_storm_ok = Some(false);
            row.notes
                .push(format!("probe check after the restart: {e}"));
        }
    }
    fleet.stop();
    drop(server);
    row
}

fn fmt_s(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |s| format!("{s:.2}"))
}

fn fmt_rate(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |r| format!("{r:.0}"))
}

fn fmt_ok(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "ok",
        Some(false) => "FAIL",
        None => "—",
    }
}

fn main() {
    let agents = env_list("TETHER_BENCH_AGENTS", &[100, 1_000, 5_000]);
    let total_events = env_u64("TETHER_BENCH_EVENTS", 200_000);
    let threads = env_u64("TETHER_BENCH_THREADS", 2).clamp(1, 64) as usize;
    let beat = match env_u64("TETHER_BENCH_HEARTBEAT_MS", 0) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    };
    // Server config overrides to try a change without rebuilding: `TETHER_SERVER__KEY=value`,
    // separated by commas or spaces.
    let server_env: Vec<(String, String)> = std::env::var("TETHER_BENCH_SERVER_ENV")
        .unwrap_or_default()
        .split([',', ' '])
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    // The server's stores to run each size on.
    let stores: Vec<&'static str> = std::env::var("TETHER_BENCH_STORES")
        .unwrap_or_else(|_| "sled,postgres".into())
        .split(',')
        .filter_map(|s| match s.trim() {
            "sled" => Some("sled"),
            "postgres" => Some("postgres"),
            _ => None,
        })
        .collect();
    let nofile = measure::raise_nofile();
    let server_bin = tether_tests::bin_dir().join("tether-server");
    if !server_bin.is_file() {
        eprintln!(
            "fleet bench: {} not found; build it first: cargo build --release -p tether-server \
             (`make bench` does), or point TETHER_BIN_DIR at a directory holding tether-server",
            server_bin.display()
        );
        std::process::exit(1);
    }
    println!(
        "fleet bench: simulated agents over TLS from one process ({threads} threads), server {}",
        server_bin.display()
    );
    println!(
        "open files limit {nofile}; {total_events} probe events per run; one-agent baseline \
         {BASELINE_EVENTS} events; agent heartbeats every {}",
        beat.map_or_else(
            || "interval the server's Welcome names".to_owned(),
            |b| format!("{} ms", b.as_millis())
        )
    );
    if !server_env.is_empty() {
        println!("server environment: {server_env:?}");
    }
    let started = Instant::now();
    let mut rows = Vec::new();
    for n in agents {
        let need = 2 * n as u64 + FD_HEADROOM;
        if need > nofile {
            println!("N={n}: skipped, needs about {need} open files, the limit is {nofile}");
            continue;
        }
        for &store in &stores {
            // Each PostgreSQL run on a database of its own, started for it.
            let pg = match store {
                "postgres" => match Postgres::start() {
                    Some(pg) => Some(pg),
                    None => continue,
                },
                _ => None,
            };
            let mut env = server_env.clone();
            if let Some(pg) = &pg {
                env.push(("TETHER_STORAGE__BACKEND".into(), "postgres".into()));
                env.push(("TETHER_STORAGE__URL".into(), pg.url()));
            }
            let row = match std::panic::catch_unwind(AssertUnwindSafe(|| {
                run_one(n, total_events, threads, beat, &env, pg.as_ref())
            })) {
                Ok(row) => row,
                Err(e) => {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default();
                    Row {
                        agents: n,
                        notes: vec![format!("run aborted: {msg}")],
                        ..Row::default()
                    }
                }
            };
            rows.push(Row { store, ..row });
        }
    }
    println!();
    println!(
        "{:>8} {:>6} {:>8} {:>9} {:>9} {:>8} {:>6} {:>9} {:>9} {:>9} {:>8} {:>7} {:>11} {:>11} {:>6} {:>8} {:>6} {:>6}",
        "store",
        "agents",
        "enroll s",
        "connect s",
        "server s",
        "welcomes",
        "busy",
        "RSS0 KiB",
        "RSS1 KiB",
        "RSSN KiB",
        "KiB/sess",
        "ev/agt",
        "1-agent ev/s",
        "N-agent ev/s",
        "probes",
        "storm s",
        "busy",
        "probes"
    );
    for r in &rows {
        println!(
            "{:>8} {:>6} {:>8} {:>9} {:>9} {:>8} {:>6} {:>9} {:>9} {:>9} {:>8} {:>7} {:>11} {:>11} {:>6} {:>8} {:>6} {:>6}",
            r.store,
            r.agents,
            fmt_s(r.enroll_s),
            fmt_s(r.connect_s),
            fmt_s(r.connect_server_s),
            r.welcomes,
            r.busy_connect,
            r.rss_start_kib,
            r.rss_before_kib,
            r.rss_idle_kib,
            r.kib_per_session()
                .map_or_else(|| "—".into(), |k| format!("{k:.1}")),
            r.events_each,
            fmt_rate(r.baseline_eps),
            fmt_rate(r.eps),
            fmt_ok(r.probes_ok),
            fmt_s(r.storm_s),
            r.busy_storm,
            fmt_ok(r.probes_after_storm_ok),
        );
    }
    println!(
        "(connect s: until every agent had its Welcome; server s: until GET /api/v1/agents listed \
         all online; RSS0: server at start, RSS1: after enrollment, RSSN: with N idle sessions; \
         storm s: from the restart (process start) until all N online again; busy: Busy answers)"
    );
    println!();
    println!(
        "{:>8} {:>6} {:>22} {:>22} {:>24} {:>24} {:>9}",
        "store",
        "agents",
        "connect 50%/90%/all s",
        "storm 50%/90%/all s",
        "server CPU s conn/ev/storm",
        "loadgen CPU s conn/ev/storm",
        "idle CPU%"
    );
    let marks = |m: &Marks| format!("{}/{}/{}", fmt_s(m.half), fmt_s(m.p90), fmt_s(m.all));
    let cpus = |c: &[f64; 3]| format!("{:.1}/{:.1}/{:.1}", c[0], c[1], c[2]);
    for r in &rows {
        println!(
            "{:>8} {:>6} {:>22} {:>22} {:>24} {:>24} {:>9.1}",
            r.store,
            r.agents,
            marks(&r.connect_marks),
            marks(&r.storm_marks),
            cpus(&r.cpu_server),
            cpus(&r.cpu_loadgen),
            r.idle_cpu_pct
        );
    }
    println!(
        "(storm CPU: the restarted server from its start; idle CPU: the server with N idle \
         sessions over {} s, percent of one core)",
        SETTLE.as_secs()
    );
    for r in &rows {
        if r.storm_restart_s > 0.0 {
            println!(
                "{} N={}: restart to listening took {:.2} s; server peak RSS {} KiB",
                r.store, r.agents, r.storm_restart_s, r.rss_peak_kib
            );
        }
        if let (Some(tx), Some(wal)) = (r.db_transactions, r.db_wal_bytes) {
            let events = r.events_acked.max(1) as f64;
            let secs = r
                .eps
                .map_or(EVENTS_TIMEOUT.as_secs_f64(), |eps| events / eps);
            println!(
                "{} N={}: events phase: {tx} database transactions ({:.0}/s, {:.1} events each), {:.0} bytes of WAL per event ({:.1} MB/s)",
                r.store,
                r.agents,
                tx as f64 / secs,
                events / tx.max(1) as f64,
                wal as f64 / events,
                wal as f64 / secs / 1e6
            );
        }
        for note in &r.notes {
            println!("{} N={}: {note}", r.store, r.agents);
        }
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let largest = rows
        .iter()
        .filter(|r| r.store == "sled")
        .max_by_key(|r| r.agents);
    if let Some(r) = largest {
        let n = r.agents;
        match r.storm_s {
            Some(s) => println!(
                "target all {n} agents online again ≤ {} s after a SIGKILL restart: {s:.2} s ({})",
                TARGET_STORM.as_secs(),
                verdict(s <= TARGET_STORM.as_secs_f64())
            ),
            None => println!(
                "target all {n} agents online again ≤ {} s after a SIGKILL restart: not reached (MISSED)",
                TARGET_STORM.as_secs()
            ),
        }
        match r.kib_per_session() {
            Some(k) => println!(
                "target ≤ {TARGET_KIB_PER_SESSION:.0} KiB server memory per idle session ({n} sessions): {k:.1} KiB ({})",
                verdict(k <= TARGET_KIB_PER_SESSION)
            ),
            None => println!(
                "target ≤ {TARGET_KIB_PER_SESSION:.0} KiB server memory per idle session: not measured (MISSED)"
            ),
        }
        let ok = r.eps.is_some() && r.probes_ok == Some(true);
        let eps = r
            .eps
            .unwrap_or(r.events_acked as f64 / EVENTS_TIMEOUT.as_secs_f64());
        println!(
            "target ≥ {TARGET_EVENTS_PER_S:.0} durable events/s end to end ({n} agents): {eps:.0} ({})",
            verdict(ok && eps >= TARGET_EVENTS_PER_S)
        );
    }
    // The PostgreSQL store against sled, each size in this run.
    for pg in rows.iter().filter(|r| r.store == "postgres") {
        let sled = rows
            .iter()
            .find(|r| r.store == "sled" && r.agents == pg.agents);
        if let (Some(p), Some(s)) = (pg.eps, sled.and_then(|s| s.eps)) {
            println!(
                "target postgres events/s end to end ({} agents) ≥ 0.5× sled: {p:.0} / {s:.0} = {:.2}× ({})",
                pg.agents,
                p / s,
                verdict(p >= 0.5 * s)
            );
        }
    }
    println!("total {:.0} s", started.elapsed().as_secs_f64());
}
