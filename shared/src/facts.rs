//! Facts: what an agent reports about the machine it runs on (OS, distribution, kernel,
//! architecture, hostname, CPUs, memory, disk free, boot time, its user), as Salt grains or
//! HCL's agent properties. The agent sends them in its `Hello` and again in a heartbeat every
//! [`REFRESH`]; the server stores them with the agent, shows them, filters on them
//! (`tether agents --where os=linux`), substitutes them into steps (`${agent.os}`) and refuses
//! an upgrade package built for another architecture before anything is sent.
//!
//! On the wire facts are a flat map of short names to short texts, bounded by [`problem`]
//! (checked when a frame is decoded), so a new fact never breaks an older server and a hostile
//! peer can store no more than a few kilobytes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Facts by name.
pub type Facts = BTreeMap<String, String>;

/// Most facts one agent may report.
pub const MAX_FACTS: usize = 32;
/// Longest fact name.
pub const MAX_FACT_NAME: usize = 32;
/// Longest fact value, in bytes.
pub const MAX_FACT_VALUE: usize = 256;
/// How often the agent reports its facts again (disk free and memory change).
pub const REFRESH: Duration = Duration::from_secs(300);

/// The operating system (`linux`).
pub const OS: &str = "os";
/// The CPU architecture the agent was built for (`x86_64`, `aarch64`).
pub const ARCH: &str = "arch";

/// What is wrong with `facts`, if anything: too many, a name that is not `[a-z0-9_]` (at most
/// [`MAX_FACT_NAME`]), or a value too long or holding control characters.
pub fn problem(facts: &Facts) -> Option<String> {
    if facts.len() > MAX_FACTS {
        return Some(format!("at most {MAX_FACTS} facts, got {}", facts.len()));
    }
    facts.iter().find_map(|(name, value)| {
        let name_ok = !name.is_empty()
            && name.len() <= MAX_FACT_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !name_ok {
            let shown: String = name.chars().take(MAX_FACT_NAME).collect();
            return Some(format!(
                "fact name {shown:?} is not 1 to {MAX_FACT_NAME} of a-z, 0-9 and _"
            ));
        }
        if value.len() > MAX_FACT_VALUE {
            return Some(format!("fact {name} is longer than {MAX_FACT_VALUE} bytes"));
        }
        value
            .chars()
            .any(char::is_control)
            .then(|| format!("fact {name} holds control characters"))
    })
}

/// The facts of this machine now; `data_dir` is where disk free is measured. A fact that
/// cannot be read is left out rather than guessed.
pub fn collect(data_dir: &Path) -> Facts {
    let mut facts = Facts::new();
    let mut put = |name: &str, value: Option<String>| {
        if let Some(v) = value.map(|v| clean(&v)).filter(|v| !v.is_empty()) {
            facts.insert(name.to_owned(), v);
        }
    };
    put(OS, Some(std::env::consts::OS.to_owned()));
    put(ARCH, Some(std::env::consts::ARCH.to_owned()));
    let release = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    let release = os_release(&release);
    put("distribution", release.get("ID").cloned());
    put("distribution_version", release.get("VERSION_ID").cloned());
    put("distribution_name", release.get("PRETTY_NAME").cloned());
    let uname = nix::sys::utsname::uname().ok();
    put(
        "kernel",
        uname
            .as_ref()
            .map(|u| u.release().to_string_lossy().into_owned()),
    );
    put(
        "hostname",
        nix::unistd::gethostname()
            .ok()
            .map(|h| h.to_string_lossy().into_owned()),
    );
    put(
        "cpus",
        std::thread::available_parallelism()
            .ok()
            .map(|n| n.to_string()),
    );
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    put(
        "memory_mb",
        meminfo_kb(&meminfo, "MemTotal").map(|kb| (kb / 1024).to_string()),
    );
    put(
        "disk_free_mb",
        nix::sys::statvfs::statvfs(data_dir).ok().map(|s| {
            (s.blocks_available().saturating_mul(s.fragment_size()) / (1 << 20)).to_string()
        }),
    );
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    put("boot_unix_s", boot_time(&stat).map(|t| t.to_string()));
    let uid = nix::unistd::Uid::effective();
    put(
        "user",
        Some(
            nix::unistd::User::from_uid(uid)
                .ok()
                .flatten()
                .map_or_else(|| uid.to_string(), |u| u.name),
        ),
    );
    facts
}

/// A value cut to [`MAX_FACT_VALUE`] (at a character boundary) without control characters.
fn clean(value: &str) -> String {
    let mut out = String::new();
    for c in value.trim().chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_FACT_VALUE {
            break;
        }
        out.push(c);
    }
    out
}

/// The `KEY=value` lines of an `os-release` file, quotes removed.
fn os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (k.trim().to_owned(), v.to_owned())
        })
        .collect()
}

/// A `/proc/meminfo` line's value in kB.
fn meminfo_kb(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// The boot time (`btime`, seconds since the Unix epoch) of `/proc/stat`: stable, unlike an
/// uptime, so facts do not change at every reading.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_has_its_facts_and_they_pass_the_rules() {
        let dir = std::env::temp_dir();
        let facts = collect(&dir);
        assert_eq!(
            facts.get(OS).map(String::as_str),
            Some(std::env::consts::OS)
        );
        assert_eq!(
            facts.get(ARCH).map(String::as_str),
            Some(std::env::consts::ARCH)
        );
        for name in [
            "kernel",
            "hostname",
            "cpus",
            "memory_mb",
            "disk_free_mb",
            "user",
        ] {
            assert!(facts.contains_key(name), "{name} missing from {facts:?}");
        }
        assert!(facts["memory_mb"].parse::<u64>().unwrap() > 0);
        assert_eq!(problem(&facts), None);
    }

    #[test]
    fn files_are_read_as_their_formats_say() {
        let release = os_release("ID=debian\nVERSION_ID=\"12\"\nPRETTY_NAME='Debian 12'\n#x\n");
        assert_eq!(release["ID"], "debian");
        assert_eq!(release["VERSION_ID"], "12");
        assert_eq!(release["PRETTY_NAME"], "Debian 12");
        assert_eq!(
            meminfo_kb("MemTotal:       24589932 kB\nMemFree: 1 kB\n", "MemTotal"),
            Some(24589932)
        );
        assert_eq!(meminfo_kb("MemFree: 1 kB\n", "MemTotal"), None);
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
        assert_eq!(clean(&"é".repeat(200)).len(), MAX_FACT_VALUE);
        assert_eq!(clean(" a\u{7}b\n"), "ab");
    }

    #[test]
    fn hostile_facts_are_named_as_such() {
        let many: Facts = (0..=MAX_FACTS)
            .map(|i| (format!("f{i}"), "x".into()))
            .collect();
        assert!(problem(&many).unwrap().contains("at most"));
        for bad in ["", "OS", "a-b", "a.b", &"x".repeat(MAX_FACT_NAME + 1)] {
            let f = Facts::from([(bad.to_owned(), "x".to_owned())]);
            assert!(problem(&f).is_some(), "{bad:?}");
        }
        let long = Facts::from([("os".to_owned(), "x".repeat(MAX_FACT_VALUE + 1))]);
        assert!(problem(&long).unwrap().contains("longer"));
        let ctl = Facts::from([("os".to_owned(), "a\nb".to_owned())]);
        assert!(problem(&ctl).unwrap().contains("control"));
    }
}
