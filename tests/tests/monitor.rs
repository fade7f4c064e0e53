//! End-to-end tests of `tether-agent run`, the monitor process, with toy workers
//! (`tests/fixtures/toy-workers/toy-worker.sh`, chosen through the test-only
//! `TETHER_AGENT_WORKER` override): restarts, the restart budget, beat timeouts, SIGTERM and
//! SIGKILL of the monitor, no listening socket, and refusing an uninstalled data directory.
//!
//! Nothing sleeps for a fixed time: every wait polls an observable event (a pid or event line the
//! toy worker appends, the monitor's log, its exit) under a deadline. Each test ends by checking
//! that no toy worker (nor its stdin watcher) survives.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::collections::HashSet;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tether_tests::{command, run, stderr, workspace_root, ChildGuard};

/// Generous bound for anything that should happen within a second or so.
const DEADLINE: Duration = Duration::from_secs(20);
/// How often the helpers look again.
const POLL: Duration = Duration::from_millis(10);

/// A monitor under test with its temp directory: `data/` (installed), `config/` (empty),
/// `toy/` (the toy workers' pids, helpers, events, beats) and `monitor.log` (its stderr).
struct Setup {
    tmp: TempDir,
}

impl Setup {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        for sub in ["data", "config", "toy"] {
            fs::create_dir(tmp.path().join(sub)).unwrap();
        }
        // The monitor only checks that `install` ran; the worker is the one that reads it.
        fs::write(tmp.path().join("data/agent.json"), "{}").unwrap();
        Self { tmp }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Starts `tether-agent run` with toy worker `args` (mode and its arguments; the toy dir is
    /// inserted after the mode) and extra `TETHER_` environment.
    fn start(&self, args: &[&str], env: &[(&str, &str)]) -> ChildGuard {
        let script = workspace_root().join("tests/fixtures/toy-workers/toy-worker.sh");
        let toy = self.path("toy");
        let mut worker_args = vec![args[0].to_owned(), toy.display().to_string()];
        worker_args.extend(args[1..].iter().map(|a| (*a).to_owned()));
        let log = fs::File::create(self.path("monitor.log")).unwrap();
        let mut cmd = command("tether-agent", &self.path("config"));
        cmd.arg("run")
            .arg("--data")
            .arg(self.path("data"))
            .env("TETHER_AGENT_WORKER", script)
            .env("TETHER_AGENT_WORKER_ARGS", worker_args.join(" "))
            .env("TETHER_AGENT__HEARTBEAT_INTERVAL_MS", "100")
            .env("TETHER_LOG__LEVEL", "info,tether_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (key, value) in env {
            cmd.env(key, value);
        }
        ChildGuard::spawn("tether-agent run", &mut cmd)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.path("monitor.log")).unwrap_or_default()
    }

    /// Complete lines of toy file `name` (a line is complete once its newline is written).
    fn lines(&self, name: &str) -> Vec<String> {
        let text = fs::read_to_string(self.path("toy").join(name)).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn pids(&self) -> Vec<u32> {
        self.lines("pids")
            .iter()
            .map(|l| l.parse().unwrap())
            .collect()
    }

    /// Waits for at least `n` toy worker pids and returns them all.
    fn wait_pids(&self, monitor: &mut ChildGuard, n: usize) -> Vec<u32> {
        wait_until(&format!("{n} worker pids"), || {
            assert!(
                monitor.try_exit().is_none(),
                "monitor exited early; log:\n{}",
                self.log()
            );
            let pids = self.pids();
            (pids.len() >= n).then_some(pids)
        })
    }

    /// Asserts that every toy worker and stdin watcher is gone (after a bounded wait: orphans
    /// of a killed monitor exit on their own once they see EOF on stdin).
    fn assert_no_worker_survives(&self) {
        let mut all: Vec<u32> = self.pids();
        all.extend(
            self.lines("helpers")
                .iter()
                .map(|l| l.parse::<u32>().unwrap()),
        );
        assert!(!all.is_empty(), "no toy worker ever started");
        wait_until("every toy worker to exit", || {
            all.iter().all(|&pid| process_gone(pid)).then_some(())
        });
    }
}

/// Polls `check` until it returns `Some` or [`DEADLINE`] passes (then panics naming `what`).
fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(POLL);
    }
}

/// The process no longer runs: no `/proc/<pid>`, or only a zombie awaiting its reaper.
fn process_gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name: "pid (comm) S ...".
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

fn toy_events(setup: &Setup) -> Vec<String> {
    setup.lines("events")
}

#[test]
fn a_worker_that_exits_is_restarted_with_a_new_pid() {
    let setup = Setup::new();
    let mut monitor = setup.start(
        &["beat-then-exit", "3"],
        &[("TETHER_AGENT__WORKER_RESTART_BUDGET", "100")],
    );
    let pids = setup.wait_pids(&mut monitor, 4);
    let distinct: HashSet<_> = pids.iter().collect();
    assert_eq!(distinct.len(), pids.len(), "pids repeat: {pids:?}");
    // Every worker but the running one has been reaped by the monitor.
    for &pid in &pids[..3] {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{pid} lingers"
        );
    }
    let hello = format!("toy worker {} says hello", pids[0]);
    let log = wait_until(
        "three restarts and the first worker's chatter logged",
        || {
            let log = setup.log();
            (log.matches("worker-exited").count() >= 3 && log.contains(&hello)).then_some(log)
        },
    );
    assert!(log.contains("code=3"), "{log}");
    assert!(log.contains("restarts=3"), "{log}");
    // Non-beat stdout lines reach the debug log (waited for above); beats do not.
    assert!(!log.contains("line=beat"), "{log}");
    assert!(!log.contains("worker-requested-upgrade"), "{log}");
    assert!(monitor.try_exit().is_none(), "{log}");
    drop(monitor);
    setup.assert_no_worker_survives();
}

#[test]
fn the_upgrade_exit_code_is_logged_and_the_worker_restarted() {
    let setup = Setup::new();
    let mut monitor = setup.start(&["beat-then-exit", "75"], &[]);
    setup.wait_pids(&mut monitor, 2);
    let log = wait_until("the upgrade request logged", || {
        let log = setup.log();
        log.contains("worker-requested-upgrade").then_some(log)
    });
    assert!(log.contains("code=75"), "{log}");
    drop(monitor);
    setup.assert_no_worker_survives();
}

#[test]
fn past_the_restart_budget_the_monitor_exits_non_zero() {
    let setup = Setup::new();
    let mut monitor = setup.start(
        &["exit-now", "7"],
        &[
            ("TETHER_AGENT__WORKER_RESTART_BUDGET", "3"),
            ("TETHER_AGENT__WORKER_RESTART_WINDOW_MS", "60000"),
        ],
    );
    let status = monitor
        .wait_exit(DEADLINE)
        .unwrap_or_else(|| panic!("monitor still running; log:\n{}", setup.log()));
    let log = setup.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("restart-budget-exceeded"), "{log}");
    // The first worker plus three restarts; the fourth restart is refused.
    assert_eq!(setup.pids().len(), 4, "{log}");
    assert_eq!(log.matches("worker-exited").count(), 3, "{log}");
    assert!(log.contains("code=7"), "{log}");
    setup.assert_no_worker_survives();
}

#[test]
fn a_worker_that_never_beats_is_killed_after_the_beat_timeout_and_restarted() {
    let setup = Setup::new();
    let mut monitor = setup.start(
        &["hang"],
        &[("TETHER_AGENT__WORKER_BEAT_TIMEOUT_MS", "500")],
    );
    let first = setup.wait_pids(&mut monitor, 1)[0];
    let seen = Instant::now();
    let pids = setup.wait_pids(&mut monitor, 2);
    // Killed for silence, not at once: the timeout runs from the worker's start.
    assert!(
        seen.elapsed() >= Duration::from_millis(300),
        "{:?}",
        seen.elapsed()
    );
    assert_ne!(pids[0], pids[1]);
    // Killed and reaped before the new one started.
    assert!(
        !Path::new(&format!("/proc/{first}")).exists(),
        "{first} lingers"
    );
    let log = setup.log();
    assert!(log.contains("worker-beat-timeout"), "{log}");
    assert!(log.contains("signal=9"), "{log}");
    // SIGKILL leaves no chance for the TERM trap.
    assert!(toy_events(&setup).is_empty(), "{:?}", toy_events(&setup));
    drop(monitor);
    setup.assert_no_worker_survives();
}

#[test]
fn sigterm_stops_the_worker_gracefully_and_the_monitor_exits_zero() {
    let setup = Setup::new();
    let mut monitor = setup.start(
        &["beat-forever"],
        &[("TETHER_AGENT__WORKER_BEAT_TIMEOUT_MS", "600")],
    );
    let pid = setup.wait_pids(&mut monitor, 1)[0];
    // 40 beats at 50 ms span several beat timeouts: a beating worker is left alone.
    wait_until("40 beats", || {
        let beats = fs::read_to_string(setup.path("toy/beats")).unwrap_or_default();
        (beats.len() >= 40).then_some(())
    });
    assert_eq!(setup.pids(), [pid], "{}", setup.log());
    assert!(
        !setup.log().contains("worker-beat-timeout"),
        "{}",
        setup.log()
    );

    monitor.signal("TERM");
    let status = monitor
        .wait_exit(DEADLINE)
        .unwrap_or_else(|| panic!("monitor still running; log:\n{}", setup.log()));
    let log = setup.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert_eq!(toy_events(&setup), [format!("term {pid}")], "{log}");
    assert!(
        log.contains("monitor-stopping") && log.contains("worker-stopped"),
        "{log}"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "{pid} lingers"
    );
    setup.assert_no_worker_survives();
}

#[test]
fn a_worker_exits_by_itself_when_the_monitor_is_killed() {
    let setup = Setup::new();
    let mut monitor = setup.start(&["beat-forever"], &[]);
    let pid = setup.wait_pids(&mut monitor, 1)[0];
    monitor.signal("KILL");
    assert!(monitor.wait_exit(DEADLINE).is_some());
    let events = wait_until("the worker to see EOF on stdin", || {
        let events = toy_events(&setup);
        (!events.is_empty()).then_some(events)
    });
    assert_eq!(events, [format!("stdin-eof {pid}")]);
    setup.assert_no_worker_survives();
}

/// Inodes of the sockets process `pid` holds open.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        // An fd may close while we look.
        let Ok(target) = fs::read_link(entry.unwrap().path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
        {
            inodes.insert(inode.parse().unwrap());
        }
    }
    inodes
}

/// Inodes of every listening TCP and Unix socket in `pid`'s network namespace.
fn listening_inodes(pid: u32) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for row in text.lines().skip(1) {
            let cols: Vec<&str> = row.split_whitespace().collect();
            // "sl local_address rem_address st ... uid timeout inode": st 0A is LISTEN.
            if cols.get(3) == Some(&"0A") {
                inodes.insert(cols[9].parse().unwrap());
            }
        }
    }
    let unix = fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    for row in unix.lines().skip(1) {
        let cols: Vec<&str> = row.split_whitespace().collect();
        // "Num RefCount Protocol Flags Type St Inode Path": flag 0x10000 is __SO_ACCEPTCON.
        let flags = u32::from_str_radix(cols[3], 16).unwrap();
        if flags & 0x10000 != 0 {
            inodes.insert(cols[6].parse().unwrap());
        }
    }
    inodes
}

fn listening_sockets_of(pid: u32) -> Vec<u64> {
    let listening = listening_inodes(pid);
    socket_inodes(pid)
        .into_iter()
        .filter(|inode| listening.contains(inode))
        .collect()
}

#[test]
fn the_monitor_opens_no_listening_socket() {
    // The check itself works: it sees this test process's own listener.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    assert_eq!(listening_sockets_of(std::process::id()).len(), 1);
    drop(listener);

    let setup = Setup::new();
    let mut monitor = setup.start(&["beat-forever"], &[]);
    setup.wait_pids(&mut monitor, 1);
    wait_until("a few beats", || {
        let beats = fs::read_to_string(setup.path("toy/beats")).unwrap_or_default();
        (beats.len() >= 5).then_some(())
    });
    assert_eq!(
        listening_sockets_of(monitor.id()),
        Vec::<u64>::new(),
        "{}",
        setup.log()
    );
    drop(monitor);
    setup.assert_no_worker_survives();
}

#[test]
fn run_refuses_a_data_dir_without_install() {
    let setup = Setup::new();
    fs::remove_file(setup.path("data/agent.json")).unwrap();
    let out = run(
        "tether-agent",
        &setup.path("config"),
        [
            "run".as_ref(),
            "--data".as_ref(),
            setup.path("data").as_os_str(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("agent.json"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("tether-agent install"),
        "{}",
        stderr(&out)
    );
}
