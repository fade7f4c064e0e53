//! Prometheus families of the fleet and the work, for dashboards: agents by status, version,
//! maintenance, staleness and version skew; jobs and deployments held by state, computed at
//! each scrape from one snapshot of each (every node of a cluster answers for the whole fleet
//! it sees). Counters of what ended and latencies are this process's own, since it started
//! (see `crate::deployments::progress`).

use std::collections::BTreeMap;
use tether_shared::metrics;

use crate::deployments::model::deployment_status;
use crate::registry::{AgentView, Status};

/// Agents' figures as families.
pub fn agents(list: &[AgentView]) -> String {
    let mut by_status: BTreeMap<&str, u64> = BTreeMap::from([("online", 0), ("offline", 0)]);
    let mut by_version: BTreeMap<String, u64> = BTreeMap::new();
    let (mut maintenance, mut stale, mut behind) = (0u64, 0u64, 0u64);
    for a in list {
        let s = match a.status {
            Status::Online => "online",
            Status::Offline => "offline",
        };
        *by_status.entry(s).or_default() += 1;
        let v = a.version.clone().unwrap_or_else(|| "unknown".to_owned());
        *by_version.entry(v).or_default() += 1;
        maintenance += u64::from(a.maintenance.is_some());
        stale += u64::from(a.stale);
        behind += u64::from(a.upgrade_recommended);
    }
    let mut out = String::new();
    labelled(
        &mut out,
        "tether_agents",
        "Enrolled agents by connection status.",
        "status",
        by_status.iter().map(|(k, v)| ((*k).to_owned(), *v)),
    );
    labelled(
        &mut out,
        "tether_agents_by_version",
        "Enrolled agents by the version they reported last.",
        "version",
        by_version.into_iter(),
    );
    for (name, help, value) in [
        (
            "tether_agents_maintenance",
            "Agents in maintenance.",
            maintenance,
        ),
        (
            "tether_agents_stale",
            "Agents offline for longer than retention.mark_stale_after_s.",
            stale,
        ),
        (
            "tether_agents_upgrade_recommended",
            "Agents running an older release than the server.",
            behind,
        ),
    ] {
        metrics::single(&mut out, name, "gauge", help, value);
    }
    out
}

/// Jobs and deployments the server holds, by state; those that ended, by result; dispatch and
/// step latencies.
pub fn work(state: &crate::deployments::state::State) -> String {
    let mut jobs: BTreeMap<String, u64> = [
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "expired",
    ]
    .into_iter()
    .map(|s| (s.to_owned(), 0))
    .collect();
    for j in state.jobs.values() {
        *jobs.entry(j.status.as_str().to_owned()).or_default() += 1;
    }
    let mut deployments: BTreeMap<String, u64> = BTreeMap::new();
    for d in state.deployments.values() {
        let status = deployment_status(
            d.agents
                .iter()
                .filter_map(|a| state.jobs.get(format!("{}-{a}", d.id).as_str())),
        );
        let word = serde_json::to_value(status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        *deployments.entry(word).or_default() += 1;
    }
    let mut out = String::new();
    labelled(
        &mut out,
        "tether_jobs",
        "Jobs the server holds (within retention), by state.",
        "status",
        jobs.into_iter(),
    );
    labelled(
        &mut out,
        "tether_deployments",
        "Deployments the server holds (within retention), by status.",
        "status",
        deployments.into_iter(),
    );
    state.metrics.render(&mut out);
    out
}

fn labelled(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: impl Iterator<Item = (String, u64)>,
) {
    metrics::header(out, name, "gauge", help);
    for (k, v) in values {
        metrics::sample(out, name, &[(label, &k)], v);
    }
}
