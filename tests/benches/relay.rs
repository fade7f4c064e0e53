//! Relays: what a hop costs, measured against a direct connection in the same run.
//!
//! - Latency: one simulated agent (real protocol and TLS, `loadgen`) sends events one at a time
//!   (window 1); each sample is the time from sending an event until its ack, which the server
//!   sends after the journal's fdatasync. Direct, through one relay, through two.
//! - Throughput: 100 simulated agents send 200,000 durable events; events/s, direct and through
//!   one and two relays.
//! - Bulk: an artifact downloaded (signed by an agent) from the server directly, and from a relay
//!   whose cache is warm.
//! - Scale: 5,000 simulated agents connect through one relay; time until all are online, the
//!   relay's memory, and a round of events from all of them.
//!
//! `cargo bench -p tether-tests --bench relay` (`make bench`). `TETHER_BENCH_RELAY_AGENTS`
//! (default 5000) sets the scale stage.

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench glue may unwrap

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use tether_shared::agent_auth::sign_request;
use tether_shared::https::{request_streaming, Request, StreamLimits};
use tether_tests::fleet::{eventually, Server, TestDir};
use tether_tests::loadgen::{enroll_many, Enrolled, Fleet, SimConfig};
use tether_tests::measure::{cpu_s, percentile, rss_kib};
use tether_tests::relays::Relay;

const TIMEOUT: Duration = Duration::from_secs(180);
const LATENCY_EVENTS: u64 = 2_000;
const THROUGHPUT_AGENTS: usize = 100;
const THROUGHPUT_EVENTS: u64 = 200_000;
const ARTIFACT_BYTES: usize = 32 * 1024 * 1024;

/// A server and `hops` relays chained in front of it; `entry` is where agents connect.
struct Chain {
    _dir: TestDir,
    server: Server,
    relays: Vec<Relay>,
}

impl Chain {
    fn new(hops: usize) -> Chain {
        let dir = TestDir::new();
        let server = Server::start(dir.path());
        let mut relays: Vec<Relay> = Vec::new();
        for i in 0..hops {
            let upstream = relays
                .last()
                .map_or_else(|| server.upstream(), Relay::upstream);
            relays.push(Relay::start(
                &server,
                &[upstream],
                dir.path(),
                &format!("relay-{i}"),
            ));
        }
        Chain {
            _dir: dir,
            server,
            relays,
        }
    }

    fn entry(&self) -> SocketAddr {
        self.relays.last().map_or(self.server.wss, |r| r.downstream)
    }

    /// The name the entry's certificate holds.
    fn entry_host(&self) -> &'static str {
        if self.relays.is_empty() {
            "localhost"
        } else {
            tether_tests::relays::RELAY_HOST
        }
    }

    fn tls(&self) -> rustls::ClientConfig {
        let ca = std::fs::read_to_string(self.server.ca_path()).unwrap();
        tether_shared::tls::client_config(&ca).unwrap()
    }

    fn agents(&self, n: usize, prefix: &str) -> Vec<Enrolled> {
        let token = self.server.token(u32::try_from(n).unwrap());
        enroll_many(
            self.entry(),
            Arc::new(self.tls()),
            self.entry_host(),
            &token,
            prefix,
            n,
            32,
        )
        .unwrap()
    }

    fn fleet(&self, agents: Vec<Enrolled>, window: Option<u64>) -> Fleet {
        let n = agents.len();
        let mut cfg = SimConfig::new(self.entry(), self.entry_host(), self.tls());
        if let Some(w) = window {
            cfg.window = w;
            cfg.record_latency = true;
        }
        let fleet = Fleet::start(cfg, agents).unwrap();
        eventually("simulated agents online", TIMEOUT, || {
            (fleet.stats().ready.load(Ordering::Relaxed) == n).then_some(())
        });
        fleet
    }
}

/// Send-to-ack latency of one agent's events, one at a time: (p50 µs, p99 µs).
fn latency(path: &Chain) -> (u64, u64) {
    let fleet = path.fleet(path.agents(1, "lat"), Some(1));
    let acked = || fleet.stats().events_acked.load(Ordering::Relaxed);
    // Warm-up, then the measured run.
    fleet.set_events(200, 0);
    eventually("warm-up events acked", TIMEOUT, || {
        (acked() >= 200).then_some(())
    });
    fleet
        .stats()
        .ack_latencies_us
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
    fleet.set_events(200 + LATENCY_EVENTS, 0);
    eventually("latency events acked", TIMEOUT, || {
        (acked() >= 200 + LATENCY_EVENTS).then_some(())
    });
    let mut samples = fleet
        .stats()
        .ack_latencies_us
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    fleet.stop();
    samples.sort_unstable();
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

/// Durable events per second from [`THROUGHPUT_AGENTS`] agents, and the CPU milliseconds per
/// 1,000 events of the server, of all relays together, and of the load generator.
fn throughput(path: &Chain) -> (f64, [f64; 3]) {
    let fleet = path.fleet(path.agents(THROUGHPUT_AGENTS, "tp"), None);
    let acked = || fleet.stats().events_acked.load(Ordering::Relaxed);
    let each = THROUGHPUT_EVENTS / THROUGHPUT_AGENTS as u64;
    let server_pid = path.server.pid();
    let relay_pids: Vec<u32> = path
        .relays
        .iter()
        .filter_map(|r| r.child.as_ref().map(|c| c.id()))
        .collect();
    let cpu = || {
        [
            cpu_s(server_pid),
            relay_pids.iter().map(|p| cpu_s(Some(*p))).sum(),
            cpu_s(None),
        ]
    };
    let before = cpu();
    let started = Instant::now();
    fleet.set_events(each, 0);
    eventually("throughput events acked", TIMEOUT, || {
        (acked() >= each * THROUGHPUT_AGENTS as u64).then_some(())
    });
    let total = each * THROUGHPUT_AGENTS as u64;
    let eps = total as f64 / started.elapsed().as_secs_f64();
    let after = cpu();
    fleet.stop();
    let per_k = |i: usize| (after[i] - before[i]) * 1000.0 / (total as f64 / 1000.0);
    (eps, [per_k(0), per_k(1), per_k(2)])
}

/// Milliseconds to download `sha` from `addr` as `agent` (best of 3).
fn download_ms(
    addr: SocketAddr,
    host: &str,
    tls: &rustls::ClientConfig,
    agent: &Enrolled,
    sha: &str,
) -> f64 {
    let path = format!("/agent/v1/artifacts/{sha}");
    let mut best = f64::MAX;
    for _ in 0..3 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let signed = sign_request(&agent.identity, &agent.agent_id, "GET", &path, now);
        let headers: Vec<(&str, &str)> = signed.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut got = 0usize;
        let started = Instant::now();
        let head = request_streaming(
            Some(Arc::new(tls.clone())),
            &Request {
                method: "GET",
                host,
                addr: Some(addr),
                port: addr.port(),
                path: &path,
                headers: &headers,
                body: None,
            },
            &StreamLimits::default(),
            &mut |chunk: &[u8]| {
                got += chunk.len();
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(got, ARTIFACT_BYTES);
        best = best.min(started.elapsed().as_secs_f64() * 1000.0);
    }
    best
}

fn bulk() -> (f64, f64, u64) {
    let path = Chain::new(1);
    let content: Vec<u8> = (0..ARTIFACT_BYTES as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let r = path
        .server
        .request_raw("PUT", "/api/v1/artifacts/big/1", &[], &content);
    assert_eq!(r.status, 201, "{}", r.body);
    let sha = r.json()["sha256"].as_str().unwrap().to_owned();
    let agent = path.agents(1, "dl").pop().unwrap();
    // An agent downloads only what its own jobs fetch: give it one that does.
    path.server
        .put_process(&serde_json::json!({"name": "get-big", "steps": [
        {"name": "get", "plugin": "artifact", "step": "fetch",
         "properties": {"name": "big", "version": "1", "dest": "/nonexistent/big"}}]}));
    path.server.deploy(
        "get-big",
        serde_json::json!({"agents": [agent.agent_id]}),
        serde_json::json!({}),
    );
    let tls = path.tls();
    let direct = download_ms(path.server.wss, "localhost", &tls, &agent, &sha);
    // The first download through the relay fills its cache; the measured ones are warm.
    let relay = &path.relays[0];
    let host = tether_tests::relays::RELAY_HOST;
    let _cold = download_ms(relay.downstream, host, &tls, &agent, &sha);
    let warm = download_ms(relay.downstream, host, &tls, &agent, &sha);
    let upstream_bytes = relay.health()["cache"]["upstream_bytes"]
        .as_u64()
        .unwrap_or(0);
    (direct, warm, upstream_bytes)
}

/// `n` agents through one relay: (seconds until all online, relay RSS KiB before and after,
/// events/s of a round of 10 events each).
fn scale(n: usize) -> (f64, u64, u64, f64) {
    let path = Chain::new(1);
    let relay_pid = path.relays[0].child.as_ref().unwrap().id();
    let before = rss_kib(relay_pid);
    let agents = path.agents(n, "many");
    let started = Instant::now();
    let fleet = path.fleet(agents, None);
    let online = started.elapsed().as_secs_f64();
    let acked = || fleet.stats().events_acked.load(Ordering::Relaxed);
    let t = Instant::now();
    fleet.set_events(10, 0);
    eventually("scale events acked", TIMEOUT, || {
        (acked() >= 10 * n as u64).then_some(())
    });
    let eps = (10 * n) as f64 / t.elapsed().as_secs_f64();
    let after = rss_kib(relay_pid);
    fleet.stop();
    (online, before, after, eps)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let scale_n: usize = std::env::var("TETHER_BENCH_RELAY_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    println!("relay bench: loopback, release binaries; every event is durable (server fdatasync) before its ack");
    println!(
        "{:>10} {:>12} {:>12} {:>18} {:>12} {:>10}   CPU ms per 1000 events: server / relays / load generator",
        "path", "ack p50 µs", "ack p99 µs", "added/hop p50 µs", "events/s", "vs direct",
    );
    let mut lat = Vec::new();
    let mut eps = Vec::new();
    for hops in 0..=2 {
        let path = Chain::new(hops);
        let (p50, p99) = latency(&path);
        let (tp, cpu) = throughput(&path);
        lat.push(p50);
        eps.push(tp);
        let added = if hops == 0 {
            "-".to_owned()
        } else {
            format!("{}", (p50 as i64 - lat[0] as i64) / hops as i64)
        };
        let label = match hops {
            0 => "direct".to_owned(),
            1 => "1 relay".to_owned(),
            _ => format!("{hops} relays"),
        };
        println!(
            "{label:>10} {p50:>12} {p99:>12} {added:>18} {tp:>12.0} {:>9.0}%   {:.1} / {:.1} / {:.1}",
            tp / eps[0] * 100.0,
            cpu[0],
            cpu[1],
            cpu[2]
        );
    }
    let (direct_ms, warm_ms, upstream_bytes) = bulk();
    println!(
        "artifact {} MiB: direct from the server {direct_ms:.1} ms, from a warm relay cache {warm_ms:.1} ms ({:.0}% of direct); bytes fetched upstream by the relay: {upstream_bytes}",
        ARTIFACT_BYTES / (1024 * 1024),
        warm_ms / direct_ms * 100.0
    );
    let (online_s, rss0, rss1, scale_eps) = scale(scale_n);
    println!(
        "{scale_n} agents through one relay: all online in {online_s:.2} s; relay RSS {rss0} KiB idle, {rss1} KiB with them ({:.1} KiB/agent); {scale_eps:.0} events/s",
        (rss1.saturating_sub(rss0)) as f64 / scale_n as f64
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let added = lat[1] as i64 - lat[0] as i64;
    println!(
        "target < 1000 µs added per hop at p50 (one relay): {added} µs ({})",
        verdict(added < 1000)
    );
    let two = eps[2] / eps[0] * 100.0;
    println!(
        "target ≥ 80% of direct throughput through two hops: {two:.0}% ({})",
        verdict(two >= 80.0)
    );
    println!(
        "target one relay carrying {scale_n} simulated agents: all online in {online_s:.2} s ({})",
        verdict(online_s < TIMEOUT.as_secs_f64())
    );
}
