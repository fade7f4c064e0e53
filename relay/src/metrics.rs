//! The relay's `/metrics` (Prometheus text, on its loopback admin listener): its upstream
//! link (state, channels, frames, bytes, reconnects, slow agents shed), its artifact cache,
//! its certificate's expiry, and the standard `process_*` families with `tether_build_info`.
//! The figures are the ones `/admin/health` shows, named for dashboards.

use tether_shared::metrics;

use crate::upstream::UpstreamHealth;

/// Counters of the upstream link's stats, their help by field name.
const UPSTREAM_COUNTERS: [(&str, &str); 9] = [
    ("connects", "Times the upstream link was established."),
    ("disconnects", "Times the upstream link dropped."),
    (
        "frames_up",
        "Frames sent upstream (agents' and the relay's own).",
    ),
    ("frames_down", "Frames received from upstream."),
    ("bytes_up", "Bytes sent upstream."),
    ("bytes_down", "Bytes received from upstream."),
    (
        "channels_opened",
        "Downstream connections given a channel upstream.",
    ),
    (
        "shed_slow_agents",
        "Agents disconnected because they did not read what was sent to them.",
    ),
    (
        "refused_not_ready",
        "Downstream connections refused while the upstream link was not ready.",
    ),
];

/// The cache's figures: counters, then gauges (the rest).
const CACHE_COUNTERS: [(&str, &str); 7] = [
    ("hits", "Downloads answered from the cache."),
    ("misses", "Downloads fetched upstream."),
    (
        "coalesced_waits",
        "Downloads that waited for another request's download of the same object.",
    ),
    ("upstream_bytes", "Body bytes received upstream for misses."),
    ("served_bytes", "Body bytes answered from the cache."),
    (
        "sha_mismatches",
        "Downloads refused because the content's sha256 was not the one asked for.",
    ),
    (
        "upstream_errors",
        "Downloads no upstream answered properly.",
    ),
];

/// The relay's families. `upstream` is `None` when its actor did not answer.
pub fn render(
    upstream: Option<&UpstreamHealth>,
    cache: &serde_json::Value,
    certificate_not_after_unix_s: Option<i64>,
) -> String {
    let mut out = String::new();
    let state = upstream.map_or("unknown", |u| u.state);
    metrics::header(
        &mut out,
        "tether_relay_upstream_state",
        "gauge",
        "The upstream link's state (1 for the current one).",
    );
    for s in ["connected", "handshaking", "reconnecting", "unknown"] {
        metrics::sample(
            &mut out,
            "tether_relay_upstream_state",
            &[("state", s)],
            u8::from(s == state),
        );
    }
    if let Some(u) = upstream {
        metrics::single(
            &mut out,
            "tether_relay_agents",
            "gauge",
            "Agents connected through this relay (its own and its child relays').",
            u.agents,
        );
        metrics::single(
            &mut out,
            "tether_relay_child_channels",
            "gauge",
            "Channels of child relays' own links.",
            u.child_channels,
        );
        if let Some(rtt) = u.rtt_us {
            metrics::single(
                &mut out,
                "tether_relay_upstream_rtt_seconds",
                "gauge",
                "Round trip of the last WebSocket ping to the parent (the server or the next relay).",
                rtt as f64 / 1e6,
            );
        }
        let stats = serde_json::to_value(u.stats).unwrap_or_default();
        for (field, help) in UPSTREAM_COUNTERS {
            if let Some(v) = stats.get(field).and_then(serde_json::Value::as_u64) {
                let name = format!("tether_relay_upstream_{field}_total");
                metrics::single(&mut out, &name, "counter", help, v);
            }
        }
    }
    for (field, help) in CACHE_COUNTERS {
        if let Some(v) = cache.get(field).and_then(serde_json::Value::as_u64) {
            let name = format!("tether_relay_cache_{field}_total");
            metrics::single(&mut out, &name, "counter", help, v);
        }
    }
    for (field, help) in [
        ("cached_bytes", "Bytes in the artifact cache."),
        ("cached_files", "Entries in the artifact cache."),
    ] {
        if let Some(v) = cache.get(field).and_then(serde_json::Value::as_u64) {
            let name = format!("tether_relay_{field}");
            metrics::single(&mut out, &name, "gauge", help, v);
        }
    }
    if let Some(not_after) = certificate_not_after_unix_s {
        metrics::single(
            &mut out,
            "tether_relay_certificate_expiry_timestamp_seconds",
            "gauge",
            "When the relay's TLS certificate expires.",
            not_after,
        );
    }
    out.push_str(&metrics::process::families());
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::upstream::UpstreamStats;

    #[test]
    fn every_figure_of_the_health_is_a_family() {
        let u = UpstreamHealth {
            state: "connected",
            upstream: Some("server:7919".into()),
            agents: 3,
            child_channels: 1,
            rtt_us: Some(1500),
            stats: UpstreamStats {
                connects: 2,
                frames_up: 40,
                ..UpstreamStats::default()
            },
        };
        let cache = serde_json::json!({"hits": 5, "cached_bytes": 1024, "upstream": "x"});
        let text = render(Some(&u), &cache, Some(1_800_000_000));
        for line in [
            "tether_relay_upstream_state{state=\"connected\"} 1",
            "tether_relay_upstream_state{state=\"reconnecting\"} 0",
            "tether_relay_agents 3",
            "tether_relay_upstream_rtt_seconds 0.0015",
            "tether_relay_upstream_connects_total 2",
            "tether_relay_upstream_frames_up_total 40",
            "tether_relay_upstream_refused_not_ready_total 0",
            "tether_relay_cache_hits_total 5",
            "tether_relay_cached_bytes 1024",
            "tether_relay_certificate_expiry_timestamp_seconds 1800000000",
        ] {
            assert_eq!(
                text.lines().filter(|l| *l == line).count(),
                1,
                "{line}\n{text}"
            );
        }
        // Every stat the health shows is exported: a new one cannot be forgotten here.
        let fields = serde_json::to_value(u.stats).unwrap();
        for field in fields.as_object().unwrap().keys() {
            assert!(
                UPSTREAM_COUNTERS.iter().any(|(f, _)| f == field),
                "{field} is not exported"
            );
        }
        let down = render(None, &serde_json::json!({}), None);
        assert!(down.contains("tether_relay_upstream_state{state=\"unknown\"} 1"));
    }
}
