//! Failover: two server nodes on one PostgreSQL (the test starts it), `TETHER_BENCH_FAILOVER`
//! (default 1,000) simulated agents (`loadgen`, real protocol and TLS) reaching them through a
//! TCP forwarder that sends each connection to the first node that accepts it (a load
//! balancer). Measured, from the SIGKILL of the active node: until the standby is active, until
//! every agent is online on it, and until a deployment to all of them has succeeded. Target:
//! the whole under the lease TTL (`TETHER_BENCH_LEASE_TTL_MS`, default 5,000) + 10 s.
//!
//! Baseline, in the same run and with the same fleet: the active node killed and started again
//! in place (it takes its own lease back at once), timed the same way. The failover's time
//! after the takeover, over the baseline's, shows what moving to another node costs beyond the
//! lease wait.
//!
//! Then a planned handover, timed the same way from the request: the first node started again
//! as a standby, the active one drained (`POST /admin/drain`, what `tether-server drain`
//! sends). Its times over the failover's show what the hand-over saves (the lease wait).
//!
//! `cargo bench -p tether-tests --bench failover` (`make bench`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench glue may unwrap

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_tests::fleet::{eventually, Forwarder, Server, TestDir};
use tether_tests::loadgen::{enroll_many, Fleet, SimConfig};
use tether_tests::measure::{agents_online, dispatch};
use tether_tests::postgres::Postgres;

const TIMEOUT: Duration = Duration::from_secs(180);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Seconds since `since` at which: `node` is active, it lists all `n` agents online, and a
/// deployment to all of them succeeded.
struct Recovery {
    active_s: f64,
    online_s: f64,
    deployed_s: f64,
}

fn recover(node: &mut Server, ids: &[String], since: Instant, restart: bool) -> Recovery {
    if restart {
        node.run();
    } else {
        node.wait_active(TIMEOUT);
    }
    let active_s = since.elapsed().as_secs_f64();
    let n = ids.len();
    eventually("every agent online on the active node", TIMEOUT, || {
        (agents_online(node) == Some(n)).then_some(())
    });
    let online_s = since.elapsed().as_secs_f64();
    assert!(
        dispatch(node, "trivial", ids).is_some(),
        "the deployment after the recovery"
    );
    Recovery {
        active_s,
        online_s,
        deployed_s: since.elapsed().as_secs_f64(),
    }
}

fn main() {
    let n = usize::try_from(env_u64("TETHER_BENCH_FAILOVER", 1_000)).unwrap();
    let ttl_ms = env_u64("TETHER_BENCH_LEASE_TTL_MS", 5_000);
    let Some(pg) = Postgres::start() else {
        eprintln!("failover bench: PostgreSQL is not installed (make setup)");
        std::process::exit(1);
    };
    let dir = TestDir::new();
    let mut env = pg.node_env("node-a", ttl_ms);
    env.push(("TETHER_LOG__LEVEL".into(), "warn".into()));
    let mut a = Server::start_with(&dir.path().join("a"), &tether_tests::borrowed(&env));
    // In place once, so that its restarts keep the ports the forwarder targets.
    a.kill();
    a.run();
    let mut b = a.another_node(
        &dir.path().join("b"),
        &[("TETHER_STORAGE__NODE_NAME", "node-b")],
    );
    let balancer = Forwarder::start_to(vec![a.wss, b.wss], true);

    let ca = std::fs::read_to_string(a.ca_path()).unwrap();
    let tls = tether_shared::tls::client_config(&ca).unwrap();
    let token = a.token(u32::try_from(n).unwrap());
    let agents = enroll_many(
        a.wss,
        Arc::new(tls.clone()),
        "localhost",
        &token,
        "sim",
        n,
        32,
    )
    .unwrap();
    let ids: Vec<String> = agents.iter().map(|e| e.agent_id.clone()).collect();
    let cfg = SimConfig::new(balancer.addr, "localhost", tls);
    let fleet = Fleet::start(cfg, agents).unwrap();
    eventually("simulated agents online", TIMEOUT, || {
        (fleet.stats().ready.load(Ordering::Relaxed) == n).then_some(())
    });
    a.shell_process("trivial", "echo hello");
    assert!(dispatch(&a, "trivial", &ids).is_some(), "warm-up");

    // Baseline: the active node killed and started again in place.
    let killed = Instant::now();
    a.kill();
    let restart = recover(&mut a, &ids, killed, true);

    // Failover: the active node killed for good; the standby takes over.
    let killed = Instant::now();
    a.kill();
    let failover = recover(&mut b, &ids, killed, false);

    // Planned: node a back as a standby, node b drained to it.
    a.spawn();
    eventually("node a listed as a standby", TIMEOUT, || {
        let h = tether_tests::wire::health(&b);
        h["cluster"]["nodes"]
            .as_array()?
            .iter()
            .any(|n| {
                n["node"] == "node-a"
                    && n["role"] == "standby"
                    && n["seen_ms_ago"].as_i64() < Some(ttl_ms as i64)
            })
            .then_some(())
    });
    let drained = Instant::now();
    let r = b.request("POST", "/admin/drain", None);
    assert_eq!(r.status, 200, "drain: {}", r.body);
    let handover = recover(&mut a, &ids, drained, false);

    let ttl_s = ttl_ms as f64 / 1000.0;
    println!("\nfailover with {n} simulated agents, lease TTL {ttl_s:.1} s (seconds from SIGKILL of the active node)");
    println!(
        "{:<34} {:>8} {:>12} {:>14}",
        "", "active", "all online", "deployment ok"
    );
    for (label, r) in [
        ("restart in place (baseline)", &restart),
        ("failover to the standby", &failover),
        ("drain to the standby", &handover),
    ] {
        println!(
            "{label:<34} {:>8.2} {:>12.2} {:>14.2}",
            r.active_s, r.online_s, r.deployed_s
        );
    }
    let after_takeover = failover.deployed_s - failover.active_s;
    let baseline_after = restart.deployed_s - restart.active_s;
    println!(
        "after the takeover: {after_takeover:.2} s, {:.2}x the restart's {baseline_after:.2} s",
        after_takeover / baseline_after.max(0.001)
    );
    println!(
        "drain over failover: active {:.2}x, all online {:.2}x, deployment ok {:.2}x",
        handover.active_s / failover.active_s.max(0.001),
        handover.online_s / failover.online_s.max(0.001),
        handover.deployed_s / failover.deployed_s.max(0.001)
    );
    let target = ttl_s + 10.0;
    println!(
        "target: deployment ok < TTL + 10 s = {target:.1} s: {:.2} s, {}",
        failover.deployed_s,
        if failover.deployed_s < target {
            "met"
        } else {
            "MISSED"
        }
    );
    drop(fleet);
}
