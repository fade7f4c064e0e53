//! What the benchmarks read about processes: CPU time and memory from `/proc`, and percentiles.

/// CPU seconds (user + system) used so far by `pid` (`None`: this process).
pub fn cpu_s(pid: Option<u32>) -> f64 {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |p| format!("/proc/{p}/stat"),
    );
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // After the command name: state is field 3, utime and stime are fields 14 and 15.
    let rest: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // USER_HZ is 100 on Linux.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Resident memory of `pid` in KiB (0 if unknown).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Peak resident memory of `pid` in KiB (0 if unknown).
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The `p` quantile (0..=1) of `sorted` (nearest rank); 0 when empty.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Bytes of every file under `dir` (0 if it cannot be read).
pub fn disk_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => disk_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Agents `server` lists online (`None` while it does not answer, or answers something else).
pub fn agents_online(server: &crate::fleet::Server) -> Option<usize> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        server.request("GET", "/api/v1/agents", None)
    }))
    .ok()?;
    if r.status != 200 {
        return None;
    }
    let list: serde_json::Value = serde_json::from_str(&r.body).ok()?;
    Some(
        list.as_array()?
            .iter()
            .filter(|a| a["status"] == "online")
            .count(),
    )
}

/// Deploys `process` to `targets` and waits (at most two minutes) until every job is final:
/// the total ms from the REST call, and per job the ms until the server recorded its end
/// (sorted). `None` if the deployment was refused, failed or timed out (said on stderr).
pub fn dispatch(
    server: &crate::fleet::Server,
    process: &str,
    targets: &[String],
) -> Option<(u64, Vec<u64>)> {
    dispatch_with(server, process, targets, serde_json::json!({}))
}

/// [`dispatch`] with more fields in the request (`{"batch_percent": 10}` for a rolling one).
pub fn dispatch_with(
    server: &crate::fleet::Server,
    process: &str,
    targets: &[String],
    extra: serde_json::Value,
) -> Option<(u64, Vec<u64>)> {
    let done = deploy(server, process, targets, extra)?;
    let mut per: Vec<u64> = done
        .jobs
        .iter()
        .map(|(_, finished)| finished.saturating_sub(done.start_unix_ms))
        .collect();
    per.sort_unstable();
    Some((done.total_ms, per))
}

/// A deployment that succeeded (see [`deploy`]).
pub struct Deployed {
    /// When the REST call was made (Unix ms).
    pub start_unix_ms: u64,
    /// Ms from the REST call until the deployment was seen to have succeeded.
    pub total_ms: u64,
    /// Each job (`<agent id> <job id>`, as `loadgen::Stats::job_runs` names it) and when the
    /// server recorded its end (Unix ms, the server's clock).
    pub jobs: Vec<(String, u64)>,
}

/// Deploys `process` to `targets` and waits (at most two minutes) until it succeeded; `None`
/// if it was refused, failed or timed out (said on stderr).
pub fn deploy(
    server: &crate::fleet::Server,
    process: &str,
    targets: &[String],
    extra: serde_json::Value,
) -> Option<Deployed> {
    use serde_json::{json, Value};
    use std::time::{Duration, Instant};
    let start = now_ms();
    let t0 = Instant::now();
    let mut body = json!({"process": process, "targets": {"agents": targets}, "properties": {}});
    if let (Some(b), Some(more)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(more.clone());
    }
    let r = server.request("POST", "/api/v1/deployments", Some(&body));
    if r.status != 201 {
        eprintln!("deployment refused: {} {}", r.status, r.body);
        return None;
    }
    let id = r.json()["id"].as_str()?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // The summary (status and counts): polling it costs the server the same at any size.
        let d: Value = server
            .request("GET", &format!("/api/v1/deployments/{id}?jobs=false"), None)
            .json();
        if d["status"] == "succeeded" {
            let total_ms = t0.elapsed().as_millis() as u64;
            let d: Value = server
                .request("GET", &format!("/api/v1/deployments/{id}"), None)
                .json();
            let jobs = d["jobs"]
                .as_array()?
                .iter()
                .filter_map(|j| {
                    let key = format!("{} {}", j["agent_id"].as_str()?, j["job_id"].as_str()?);
                    Some((key, j["finished_unix_ms"].as_u64()?))
                })
                .collect();
            return Some(Deployed {
                start_unix_ms: start,
                total_ms,
                jobs,
            });
        }
        if d["status"] == "failed" || Instant::now() > deadline {
            eprintln!("deployment {id} ended {}: {d}", d["status"]);
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Raise the soft file limit to the hard one (the server inherits it); returns the new limit.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}
