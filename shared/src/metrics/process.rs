//! The standard `process_*` metrics Prometheus clients export (memory, CPU, file descriptors,
//! start time), read from `/proc/self` on Linux, and `tether_build_info`. Parsing is separate
//! from reading, so it is tested on fixed text.

/// What `/proc/self` says of this process.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProcessFigures {
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Since boot, in clock ticks.
    pub start_ticks: u64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
}

/// Reads this process's figures; a file that cannot be read leaves its figures at 0.
pub fn read() -> ProcessFigures {
    let text = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let mut f = parse_stat(&text("/proc/self/stat"));
    let (rss, vsz) = parse_status(&text("/proc/self/status"));
    f.resident_bytes = rss;
    f.virtual_bytes = vsz;
    f.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    f.max_fds = parse_limits(&text("/proc/self/limits"));
    f
}

/// utime, stime (fields 14, 15) and starttime (22) of `/proc/self/stat`; the command name
/// (field 2, in parentheses) may hold spaces, so fields are counted after its `)`.
fn parse_stat(stat: &str) -> ProcessFigures {
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    // `after` starts at field 3 (state).
    let field = |n: usize| -> u64 {
        after
            .split_whitespace()
            .nth(n - 3)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    ProcessFigures {
        cpu_ticks: field(14).saturating_add(field(15)),
        start_ticks: field(22),
        ..ProcessFigures::default()
    }
}

/// VmRSS and VmSize of `/proc/self/status`, in bytes.
fn parse_status(status: &str) -> (u64, u64) {
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            .saturating_mul(1024)
    };
    (kb("VmRSS:"), kb("VmSize:"))
}

/// The soft limit of open files in `/proc/self/limits`.
fn parse_limits(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// Seconds since this process started, by `f` (read now).
pub fn uptime_s(f: &ProcessFigures) -> u64 {
    let started = boot_unix_s() + f.start_ticks / ticks_per_second();
    u64::try_from(crate::clock::now_unix_s())
        .unwrap_or(0)
        .saturating_sub(started)
}

/// This process's figures as a heartbeat carries them (the rest left at 0 for the caller).
pub fn heartbeat_figures() -> crate::protocol::AgentFigures {
    let p = read();
    crate::protocol::AgentFigures {
        resident_bytes: p.resident_bytes,
        cpu_ms: p.cpu_ticks.saturating_mul(1000) / ticks_per_second(),
        open_fds: p.open_fds,
        uptime_s: uptime_s(&p),
        ..Default::default()
    }
}

/// This process's families, read now.
pub fn families() -> String {
    render(&read(), ticks_per_second(), boot_unix_s())
}

/// The Prometheus text of `f`, with `ticks_per_s` clock ticks a second and the system booted
/// at `boot_unix_s`.
pub fn render(f: &ProcessFigures, ticks_per_s: u64, boot_unix_s: u64) -> String {
    let ticks = ticks_per_s.max(1);
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, value: String| {
        super::single(&mut out, name, kind, help, value);
    };
    family(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        format!("{:.2}", f.cpu_ticks as f64 / ticks as f64),
    );
    family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        f.resident_bytes.to_string(),
    );
    family(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        f.virtual_bytes.to_string(),
    );
    family(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        f.open_fds.to_string(),
    );
    if let Some(max) = f.max_fds {
        family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max.to_string(),
        );
    }
    family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        (boot_unix_s + f.start_ticks / ticks).to_string(),
    );
    super::header(
        &mut out,
        "tether_build_info",
        "gauge",
        "This program's release (always 1; the version is the label).",
    );
    super::sample(
        &mut out,
        "tether_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    out
}

/// Clock ticks a second in `/proc` figures: Linux reports them in USER_HZ, 100 on every
/// architecture it runs on (whatever the kernel's own HZ).
pub fn ticks_per_second() -> u64 {
    100
}

/// When the system booted (`btime` of `/proc/stat`), seconds since the Unix epoch.
pub fn boot_unix_s() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read_as_their_formats_say() {
        let stat = "4242 (tether server) S 1 4242 4242 0 -1 4194560 100 0 0 0 150 50 0 0 20 0 3 0 7000 1000 200";
        let f = parse_stat(stat);
        assert_eq!((f.cpu_ticks, f.start_ticks), (200, 7000));
        assert_eq!(
            parse_status("Name:\tx\nVmSize:\t  2048 kB\nVmRSS:\t  1024 kB\n"),
            (1024 * 1024, 2048 * 1024)
        );
        assert_eq!(
            parse_limits("Limit Soft Hard Units\nMax open files            1024                 524288               files\n"),
            Some(1024)
        );
        let text = render(&f, 100, 1_700_000_000);
        assert!(text.contains("process_cpu_seconds_total 2.00\n"), "{text}");
        assert!(
            text.contains("process_start_time_seconds 1700000070\n"),
            "{text}"
        );
        assert!(text.contains("tether_build_info{version=\""), "{text}");
        let live = read();
        assert!(live.resident_bytes > 0 && live.open_fds > 0, "{live:?}");
    }
}
