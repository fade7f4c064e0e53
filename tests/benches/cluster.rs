//! Cluster: two server nodes on one PostgreSQL (the bench starts it) with
//! `every_node_serves_agents`: node a active, node b a member. `TETHER_BENCH_CLUSTER` (default
//! 400) simulated agents (`loadgen`, real protocol and TLS, from several loopback addresses),
//! half connected to node a, half to node b (which list node a as their next upstream).
//!
//! Measured, in one run:
//! - **Command latency**: a one-step deployment started on node a, for agents node a serves
//!   (same node: the baseline) and for agents node b serves (cross node: node a writes the
//!   commands into their streams, node b reads and sends them; the events go through the
//!   inbox). p50/p99 of each, and the cross-node
//!   p99 over the same-node p99. Target: cross-node p99 ≤ same-node p99 + 10 ms. Measured from
//!   the REST call three ways: until the agent has the job's command (delivered: the command's
//!   way only); until node a recorded the job's result (the round trip); and until node a had
//!   the result *and* it was durable (the agent's report acknowledged): on the same node, node
//!   a records the result in memory before its commit. Twice: with deployments of 100 agents
//!   each (a burst: 100 commands at once, and then their events, on two cores shared by both
//!   nodes, PostgreSQL and the load generator), and with deployments of one agent, one at a
//!   time (a command's own latency, nothing queued with it).
//! - **Events**: durable agent→server events/s with the fleet on two nodes, and then on one
//!   node (node a alone, after node b was killed), and the servers' CPU seconds per 1,000
//!   events in each case.
//! - **Resettle**: node b killed; time until every one of its agents is served by node a
//!   (claimed, and its session ready). Target < 30 s for 5,000 agents
//!   (`TETHER_BENCH_CLUSTER=5000`; the open-files limit is raised to what the system allows).
//!
//! `cargo bench -p tether-tests --bench cluster` (`make bench`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench glue may unwrap

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;
use std::sync::Mutex;
use tether_tests::fleet::{eventually, Server, TestDir};

use tether_tests::loadgen::{enroll_at, Fleet, SimConfig, Stats};
use tether_tests::measure::{cpu_s, deploy, dispatch, percentile};
use tether_tests::postgres::Postgres;

const TIMEOUT: Duration = Duration::from_secs(300);
/// Agents of each side whose command latency is measured, and the deployments timed.
const SAMPLE: usize = 100;
/// Deployments timed on each side, one side then the other (a slow moment of the machine
/// falls on both alike).
const ROUNDS: usize = 10;
/// One-agent deployments timed on each side, one side then the other: the latency of a
/// command alone, without the 99 others of a deployment queued with it.
const SINGLES: usize = 200;
/// Probe events each agent sends in an events phase.
const EVENTS_EACH: u64 = 40;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// How many agents `node` holds the claim of.
fn claimed_by(pg: &Postgres, node: &str) -> usize {
    pg.psql(&format!(
        "SELECT count(*) FROM tether_claims WHERE node = '{node}' AND claim NOT LIKE '%@%'"
    ))
    .parse()
    .unwrap_or(0)
}

/// Per-job latencies (ms from the REST call) of one deployment.
#[derive(Default)]
struct Latencies {
    /// Until the agent had the job's `RunJob` (committed to its stream first, on any node).
    delivered: Vec<u64>,
    /// Until node a recorded the job's end (in its memory; not durable yet on the same node).
    recorded: Vec<u64>,
    /// Until node a recorded it *and* it was durable (the agent's report of it acknowledged,
    /// which a node does only once it is committed): the later of the two.
    durable: Vec<u64>,
    /// Of each deployment, its slowest `delivered`: the p99 of a few deployments is that of
    /// their slowest, so this says whether one slow moment made it.
    slowest_delivered: Vec<u64>,
}

impl Latencies {
    fn sort(&mut self) {
        self.delivered.sort_unstable();
        self.recorded.sort_unstable();
        self.durable.sort_unstable();
        self.slowest_delivered.sort_unstable();
    }
}

/// The per-agent latencies of a one-step deployment to `ids` (agents of `fleets`) started on
/// `node`, added to `all`.
fn latencies(node: &Server, ids: &[String], fleets: &[&Fleet], all: &mut Latencies) {
    let done = deploy(node, "trivial", ids, serde_json::json!({})).expect("a timed deployment");
    let before = all.delivered.len();
    for (job, finished) in done.jobs {
        // Acknowledged once committed: on the node that serves the agent, maybe a moment
        // after node a recorded the end.
        let at = |what, times: fn(&Stats) -> &Mutex<BTreeMap<String, u64>>| {
            eventually(what, TIMEOUT, || {
                fleets
                    .iter()
                    .find_map(|f| times(f.stats()).lock().unwrap().get(&job).copied())
            })
        };
        let received = at("the job's command received", |s| &s.job_received_unix_ms);
        let acked = at("the job's end acknowledged", |s| &s.job_acked_unix_ms);
        all.delivered
            .push(received.saturating_sub(done.start_unix_ms));
        all.recorded
            .push(finished.saturating_sub(done.start_unix_ms));
        all.durable
            .push(finished.max(acked).saturating_sub(done.start_unix_ms));
    }
    let slowest = all.delivered[before..].iter().copied().max().unwrap_or(0);
    all.slowest_delivered.push(slowest);
}

/// The three latencies of `same_ms` and `cross_ms` (sorted), and whether the target is met.
fn report(same_ms: &Latencies, cross_ms: &Latencies) {
    let p = |v: &[u64], q: f64| percentile(v, q);
    for (what, same_ms, cross_ms) in [
        (
            "until the agent had the job's command (delivered)",
            &same_ms.delivered,
            &cross_ms.delivered,
        ),
        (
            "until node a recorded the result and it was durable (the agent's report acknowledged)",
            &same_ms.durable,
            &cross_ms.durable,
        ),
        (
            "until node a recorded the result (on the same node, before it is durable)",
            &same_ms.recorded,
            &cross_ms.recorded,
        ),
    ] {
        println!("  {what}:");
        println!(
            "    same node (served by a):   p50 {:>5} ms  p99 {:>5} ms",
            p(same_ms, 0.5),
            p(same_ms, 0.99)
        );
        println!(
            "    cross node (served by b):  p50 {:>5} ms  p99 {:>5} ms",
            p(cross_ms, 0.5),
            p(cross_ms, 0.99)
        );
        let (s99, c99) = (p(same_ms, 0.99), p(cross_ms, 0.99));
        println!(
            "    cross/same: p50 {:.2}x, p99 {:.2}x; target p99 ≤ same p99 + 10 ms = {} ms: {}",
            p(cross_ms, 0.5) as f64 / p(same_ms, 0.5).max(1) as f64,
            c99 as f64 / s99.max(1) as f64,
            s99 + 10,
            if c99 <= s99 + 10 { "met" } else { "MISSED" }
        );
    }
}

/// Events/s for `fleets` sending [`EVENTS_EACH`] each (the `round`th time: the load generator
/// counts in totals), and the CPU seconds `pids` spent.
fn events(fleets: &[&Fleet], pids: &[u32], round: u64) -> (f64, f64, u64) {
    let acked = || -> u64 {
        fleets
            .iter()
            .map(|f| f.stats().events_acked.load(Ordering::Relaxed))
            .sum()
    };
    let total: u64 = fleets.iter().map(|f| f.ids().len() as u64).sum::<u64>() * EVENTS_EACH;
    let base = acked();
    let cpu0: f64 = pids.iter().map(|p| cpu_s(Some(*p))).sum();
    let started = Instant::now();
    for f in fleets {
        f.set_events(EVENTS_EACH * round, 0);
    }
    eventually("every event acknowledged", TIMEOUT, || {
        (acked() >= base + total).then_some(())
    });
    let elapsed = started.elapsed().as_secs_f64();
    let cpu: f64 = pids.iter().map(|p| cpu_s(Some(*p))).sum::<f64>() - cpu0;
    (total as f64 / elapsed, cpu, total)
}

fn main() {
    let n = usize::try_from(env_u64("TETHER_BENCH_CLUSTER", 400)).unwrap();
    if n < 4 {
        eprintln!("cluster bench: TETHER_BENCH_CLUSTER={n}: at least 4 agents (two on each node)");
        std::process::exit(1);
    }
    let nofile = tether_tests::measure::raise_nofile();
    // Each agent: its socket here, and one in a server (and the servers' own, here too).
    if 2 * n as u64 + 1_000 > nofile {
        eprintln!("cluster bench: {n} agents need about {} open files, the limit is {nofile} (raise it: ulimit -n)", 2 * n + 1_000);
        std::process::exit(1);
    }
    let Some(pg) = Postgres::start() else {
        eprintln!("cluster bench: PostgreSQL is not installed (make setup)");
        std::process::exit(1);
    };
    let dir = TestDir::new();
    let mut env = pg.node_env("node-a", 5000);
    env.push((
        "TETHER_STORAGE__EVERY_NODE_SERVES_AGENTS".into(),
        "true".into(),
    ));
    env.push(("TETHER_LOG__LEVEL".into(), "warn".into()));
    let a = Server::start_with(&dir.path().join("a"), &tether_tests::borrowed(&env));
    let mut b = a.another_node(
        &dir.path().join("b"),
        &[("TETHER_STORAGE__NODE_NAME", "node-b")],
    );
    b.wait_active(TIMEOUT);

    let (tls, mut agents) = enroll_at(&a, "sim", n).unwrap();
    let on_b_agents = agents.split_off(n / 2);
    let same: Vec<String> = agents
        .iter()
        .take(SAMPLE)
        .map(|e| e.agent_id.clone())
        .collect();
    let meant_for_b: Vec<String> = on_b_agents.iter().map(|e| e.agent_id.clone()).collect();
    let half_b = on_b_agents.len();
    // From many addresses, as agents on many hosts: a node bounds the handshakes of each.
    let sim = |to| SimConfig::new(to, "localhost", tls.clone()).spread_over_loopback(32);
    let fleet_a = Fleet::start(sim(a.wss), agents).unwrap();
    let mut on_b = sim(b.wss);
    on_b.fallback = Some(a.wss);
    let fleet_b = Fleet::start(on_b, on_b_agents).unwrap();
    let mut said = Instant::now();
    eventually("every agent served by its node", TIMEOUT, || {
        let (ready_a, ready_b, on_b) = (
            fleet_a.stats().ready.load(Ordering::Relaxed),
            fleet_b.stats().ready.load(Ordering::Relaxed),
            claimed_by(&pg, "node-b"),
        );
        if said.elapsed() >= Duration::from_secs(10) {
            said = Instant::now();
            eprintln!(
                "ready on a {ready_a}/{}, on b {ready_b}/{half_b}, claimed by b {on_b}",
                n - half_b
            );
        }
        // (An agent whose first try at node b failed went on to node a, its next upstream,
        // and stays there: the split is what the fleet made of it.)
        (ready_a == n - half_b && ready_b == half_b && on_b * 2 >= half_b).then_some(())
    });
    // The cross-node sample: agents node b serves.
    let served_by_b: std::collections::HashSet<String> = pg
        .psql("SELECT claim FROM tether_claims WHERE node = 'node-b' AND claim NOT LIKE '%@%'")
        .lines()
        .map(str::to_owned)
        .collect();
    let cross: Vec<String> = meant_for_b
        .iter()
        .filter(|id| served_by_b.contains(*id))
        .take(SAMPLE)
        .cloned()
        .collect();
    a.shell_process("trivial", "echo hello");
    assert!(dispatch(&a, "trivial", &same).is_some(), "warm-up");
    assert!(dispatch(&a, "trivial", &cross).is_some(), "warm-up");

    // Command latency: same node, cross node, alternately.
    let (mut same_ms, mut cross_ms) = (Latencies::default(), Latencies::default());
    for _ in 0..ROUNDS {
        let fleets = [&fleet_a, &fleet_b];
        latencies(&a, &same, &fleets, &mut same_ms);
        latencies(&a, &cross, &fleets, &mut cross_ms);
    }
    same_ms.sort();
    cross_ms.sort();
    let (mut same_one, mut cross_one) = (Latencies::default(), Latencies::default());
    for i in 0..SINGLES {
        let fleets = [&fleet_a, &fleet_b];
        latencies(&a, &same[i % same.len()..][..1], &fleets, &mut same_one);
        latencies(&a, &cross[i % cross.len()..][..1], &fleets, &mut cross_one);
    }
    same_one.sort();
    cross_one.sort();

    eprintln!("latency measured");
    // Events with the fleet on two nodes.
    let (pid_a, pid_b) = (a.pid().unwrap(), b.pid().unwrap());
    let (two_eps, two_cpu, two_total) = events(&[&fleet_a, &fleet_b], &[pid_a, pid_b], 1);
    let cpu_a0 = cpu_s(Some(pid_a));

    // Resettle: node b killed; its agents go to node a.
    let on_b_at_kill = claimed_by(&pg, "node-b");
    let killed = Instant::now();
    b.kill();
    eprintln!("node b killed");
    let mut said = Instant::now();
    eventually("node b's agents served by node a", TIMEOUT, || {
        let (on_a, ready_b) = (
            claimed_by(&pg, "node-a"),
            fleet_b.stats().ready.load(Ordering::Relaxed),
        );
        if said.elapsed() >= Duration::from_secs(10) {
            said = Instant::now();
            eprintln!(
                "claimed by a {on_a}/{n}, node b's ready {ready_b}/{half_b}: {:?}",
                fleet_b.stats().reasons()
            );
        }
        (on_a == n && ready_b == half_b).then_some(())
    });
    let resettle_s = killed.elapsed().as_secs_f64();
    let resettle_cpu = cpu_s(Some(pid_a)) - cpu_a0;

    // Events with the fleet on one node.
    let (one_eps, one_cpu, one_total) = events(&[&fleet_a, &fleet_b], &[pid_a], 2);

    let p = |v: &[u64], q: f64| percentile(v, q);
    println!("\ncluster: {n} simulated agents, node a active, node b a member (2 cores, shared with PostgreSQL and the load generator)");
    println!(
        "command latency, one-step deployment of {} agents from node a ({} jobs each):",
        same.len(),
        same_ms.recorded.len()
    );
    report(&same_ms, &cross_ms);
    println!(
        "  the slowest command of each deployment (delivered), median / worst of {ROUNDS}: same node {} / {} ms, cross node {} / {} ms",
        p(&same_ms.slowest_delivered, 0.5),
        same_ms.slowest_delivered.last().copied().unwrap_or(0),
        p(&cross_ms.slowest_delivered, 0.5),
        cross_ms.slowest_delivered.last().copied().unwrap_or(0),
    );
    println!(
        "command latency, one-step deployment of one agent from node a, one at a time ({SINGLES} each):"
    );
    report(&same_one, &cross_one);
    println!("events ({EVENTS_EACH} per agent):");
    println!(
        "  two nodes: {two_eps:>8.0} events/s, {:.1} CPU ms per 1,000 events (both servers)",
        1e6 * two_cpu / two_total as f64
    );
    println!(
        "  one node:  {one_eps:>8.0} events/s, {:.1} CPU ms per 1,000 events",
        1e6 * one_cpu / one_total as f64
    );
    // CPU is counted in clock ticks (10 ms): a phase shorter than a few has no ratio.
    let cpu_ratio = match one_cpu.min(two_cpu) >= 0.05 {
        true => format!(
            "{:.2}x CPU per event",
            (two_cpu / two_total as f64) / (one_cpu / one_total as f64)
        ),
        false => "too little CPU to compare (counted in 10 ms ticks)".to_owned(),
    };
    println!(
        "  two/one: {:.2}x events/s, {cpu_ratio}",
        two_eps / one_eps.max(1.0),
    );
    println!(
        "resettle: {on_b_at_kill} agents of node b served by node a {resettle_s:.1} s after its SIGKILL ({resettle_cpu:.1} CPU s on node a); target < 30 s: {}",
        if resettle_s < 30.0 { "met" } else { "MISSED" }
    );
    drop(fleet_a);
    drop(fleet_b);
}
