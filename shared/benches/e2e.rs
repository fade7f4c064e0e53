//! Cost of end-to-end protection per frame: seal + open of frames of the sizes agents send
//! (a 300-byte event, a 16 KiB output chunk, a full 256 KiB frame), next to a plain copy of the
//! same bytes measured in the same run, and the cost of one handshake (both sides).
//!
//! `cargo bench -p tether-shared --bench e2e` (`make bench`). `TETHER_BENCH_SECONDS` sets the
//! duration of each measurement (default 1).

#![allow(clippy::unwrap_used, clippy::expect_used)] // benches may unwrap

use std::time::{Duration, Instant};

use tether_shared::e2e::{Initiator, Responder, Transport};
use tether_shared::identity::Identity;

fn connect(agent: &Identity, server: &Identity) -> (Transport, Transport) {
    let (initiator, m1) = Initiator::start().unwrap();
    let (responder, m2) = Responder::answer(&m1, server).unwrap();
    let (a, m3) = initiator
        .finish(&m2, &[server.public_key()], "a1", agent)
        .unwrap();
    let (s, _) = responder.finish(&m3, |_| Some(agent.public_key())).unwrap();
    (a, s)
}

/// Runs `f` repeatedly for `budget`; returns the mean time per call.
fn per_call(budget: Duration, mut f: impl FnMut()) -> Duration {
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < budget {
        f();
        n += 1;
    }
    started.elapsed() / n.max(1)
}

fn main() {
    let secs: f64 = std::env::var("TETHER_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let budget = Duration::from_secs_f64(secs);
    let (agent, server) = (Identity::generate(), Identity::generate());
    let handshake = per_call(budget, || drop(connect(&agent, &server)));
    println!("e2e bench: one handshake (both sides, 3 messages): {handshake:?}");
    println!(
        "{:>12} {:>14} {:>14} {:>12} {:>10}",
        "frame bytes", "copy µs", "seal+open µs", "MB/s", "overhead"
    );
    let (mut a, mut s) = connect(&agent, &server);
    for size in [300usize, 16 * 1024, 256 * 1024] {
        let frame = vec![0x5au8; size];
        let copy = per_call(budget, || {
            std::hint::black_box(frame.clone());
        });
        let sealed = per_call(budget, || {
            let sealed = a.seal(&frame).unwrap();
            std::hint::black_box(s.open(&sealed).unwrap());
        });
        let sealed_frame = a.seal(&frame).unwrap();
        assert_eq!(s.open(&sealed_frame).unwrap(), frame);
        let overhead = sealed_frame.len() - size;
        println!(
            "{size:>12} {:>14.2} {:>14.2} {:>12.0} {:>8} B",
            copy.as_secs_f64() * 1e6,
            sealed.as_secs_f64() * 1e6,
            size as f64 / sealed.as_secs_f64() / 1e6,
            overhead
        );
    }
}
