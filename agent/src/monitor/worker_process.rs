//! One worker process as the `Monitor` sees it: how to start it ([`WorkerCommand`]), the beat
//! protocol on its stdout ([`parse_stdout_line`]), and two tasks per worker on the monitor's
//! arbiter that never block it: a stdout reader sending [`BeatReceived`] and an owner that awaits
//! the child's exit, sends [`WorkerExited`], and delivers the signals the monitor asks for.
//!
//! Pipes: stdout is read line by line; stderr is inherited (worker logs go where the monitor's
//! go); stdin is a pipe the monitor holds open and never writes to, so that the worker sees EOF
//! on stdin when the monitor dies, even by SIGKILL, and exits.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};

use actix::Recipient;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::mpsc;

use super::{BeatReceived, WorkerExited};

/// The first word of a beat line. A worker writes `beat` or `beat <json>` (its health, one line
/// of JSON) to stdout at least every third of `agent.worker_beat_timeout_ms`.
pub const BEAT_WORD: &str = "beat";

/// Longest stdout line the monitor reads; the rest of a longer line is skipped.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// How to start a worker: a program, its arguments and extra environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCommand {
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables (the package version of an upgraded worker). The monitor's
    /// own `TETHER_AGENT_PACKAGE_VERSION` is never inherited.
    pub env: Vec<(String, String)>,
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerExit {
    /// It exited with this code.
    Code(i32),
    /// A signal (this number) killed it.
    Signal(i32),
    /// Waiting for it failed, so how it ended is unknown.
    Unknown,
}

impl From<ExitStatus> for WorkerExit {
    fn from(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => WorkerExit::Code(code),
            (None, Some(signal)) => WorkerExit::Signal(signal),
            (None, None) => WorkerExit::Unknown,
        }
    }
}

/// What a line of the worker's stdout says.
#[derive(Debug, Clone, PartialEq)]
pub enum StdoutLine {
    /// A beat, with the worker's health if it sent valid JSON.
    Beat {
        /// The health JSON, if any.
        health: Option<serde_json::Value>,
    },
    /// A beat whose health is not valid JSON: still a beat, the health is dropped.
    BeatWithBadHealth {
        /// Why the JSON was refused.
        error: String,
    },
    /// Anything else: logged at debug.
    Other(String),
}

/// Classifies one stdout line (without its line ending).
pub fn parse_stdout_line(line: &str) -> StdoutLine {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let Some(rest) = line.strip_prefix(BEAT_WORD) else {
        return StdoutLine::Other(line.to_owned());
    };
    if rest.is_empty() {
        return StdoutLine::Beat { health: None };
    }
    let Some(json) = rest.strip_prefix(' ') else {
        return StdoutLine::Other(line.to_owned());
    };
    match serde_json::from_str(json) {
        Ok(health) => StdoutLine::Beat {
            health: Some(health),
        },
        Err(e) => StdoutLine::BeatWithBadHealth {
            error: e.to_string(),
        },
    }
}

/// A signal the monitor asks the owner task to deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: stop gracefully.
    Terminate,
    /// SIGKILL: stop now.
    Kill,
}

/// The monitor's handle on a running worker.
#[derive(Debug)]
pub struct WorkerProcess {
    /// Its process id.
    pub pid: u32,
    /// Asks the owner task to signal the child; the owner signals only a child it has not
    /// reaped yet, so a recycled pid is never hit.
    stop: mpsc::UnboundedSender<Stop>,
}

impl WorkerProcess {
    /// Starts `command` as worker `generation`; its beats go to `beats` and its exit to `exits`,
    /// both tagged with `generation` so that news from an older worker can be told apart.
    pub fn spawn(
        command: &WorkerCommand,
        generation: u64,
        beats: Recipient<BeatReceived>,
        exits: Recipient<WorkerExited>,
    ) -> io::Result<Self> {
        let mut child = tokio::process::Command::new(&command.program)
            .args(&command.args)
            .env_remove(crate::upgrade::PACKAGE_VERSION_ENV)
            .envs(command.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("the worker exited before its pid was read"))?;
        let stdin = child.stdin.take();
        if let Some(stdout) = child.stdout.take() {
            actix_rt::spawn(read_stdout(stdout, pid, generation, beats));
        }
        let (stop, stops) = mpsc::unbounded_channel();
        actix_rt::spawn(own_child(child, stdin, stops, generation, exits));
        Ok(Self { pid, stop })
    }

    /// Asks for `signal` to be delivered to the worker if it is still running.
    pub fn signal(&self, signal: Stop) {
        // Err: the owner task has finished, so the worker is gone and there is nothing to stop.
        let _ = self.stop.send(signal);
    }
}

/// Owns the child until it exits: holds its stdin open (never writing), delivers stop requests,
/// then reports the exit. Dropped with the runtime, it kills the child (`kill_on_drop`).
async fn own_child(
    mut child: Child,
    stdin: Option<ChildStdin>,
    mut stops: mpsc::UnboundedReceiver<Stop>,
    generation: u64,
    exits: Recipient<WorkerExited>,
) {
    let exit = loop {
        tokio::select! {
            status = child.wait() => {
                break match status {
                    Ok(status) => WorkerExit::from(status),
                    Err(e) => {
                        tracing::error!(error = %e, "worker-wait-failed");
                        WorkerExit::Unknown
                    }
                };
            }
            Some(stop) = stops.recv() => deliver(&mut child, stop),
        }
    };
    // The worker is reaped: closing its stdin now changes nothing for it but frees the pipe.
    drop(stdin);
    exits.do_send(WorkerExited { generation, exit });
}

/// Signals `child`, which has not been reaped (its `wait` has not returned).
fn deliver(child: &mut Child, stop: Stop) {
    let result = match stop {
        Stop::Kill => child.start_kill(),
        Stop::Terminate => match child.id().map(i32::try_from) {
            Some(Ok(pid)) => kill(Pid::from_raw(pid), Signal::SIGTERM).map_err(io::Error::from),
            Some(Err(_)) => Err(io::Error::other("pid out of range")),
            None => Ok(()),
        },
    };
    if let Err(e) = result {
        tracing::warn!(signal = ?stop, error = %e, "worker-signal-failed");
    }
}

/// Reads the worker's stdout until EOF: beats go to the monitor, other lines to the debug log.
async fn read_stdout(
    stdout: ChildStdout,
    pid: u32,
    generation: u64,
    beats: Recipient<BeatReceived>,
) {
    let mut reader = BufReader::new(stdout);
    loop {
        match read_line(&mut reader).await {
            Ok(Line::Eof) => break,
            Ok(Line::TooLong) => {
                tracing::warn!(pid, limit = MAX_LINE_BYTES, "worker-line-too-long");
            }
            Ok(Line::Text(line)) => match parse_stdout_line(&line) {
                StdoutLine::Beat { health } => {
                    beats.do_send(BeatReceived { generation, health });
                }
                StdoutLine::BeatWithBadHealth { error } => {
                    tracing::warn!(pid, error = %error, "worker-health-unreadable");
                    beats.do_send(BeatReceived {
                        generation,
                        health: None,
                    });
                }
                StdoutLine::Other(text) => tracing::debug!(pid, line = %text, "worker-stdout"),
            },
            Err(e) => {
                tracing::warn!(pid, error = %e, "worker-stdout-failed");
                break;
            }
        }
    }
    tracing::debug!(pid, "worker-stdout-closed");
}

/// One read from a line-oriented stream.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line (lossily decoded, line ending removed).
    Text(String),
    /// A line over [`MAX_LINE_BYTES`], consumed and discarded up to its end.
    TooLong,
    /// The stream ended.
    Eof,
}

/// Reads one line of at most [`MAX_LINE_BYTES`]; a final line without a newline counts.
async fn read_line<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> io::Result<Line> {
    let mut buf = Vec::new();
    let limit = u64::try_from(MAX_LINE_BYTES).unwrap_or(u64::MAX);
    let n = (&mut *reader)
        .take(limit)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Line::Text(String::from_utf8_lossy(&buf).into_owned()));
    }
    if buf.len() < MAX_LINE_BYTES {
        // EOF in the middle of a line.
        return Ok(Line::Text(String::from_utf8_lossy(&buf).into_owned()));
    }
    // Skip the rest of the long line, a bounded chunk at a time.
    loop {
        buf.clear();
        let n = (&mut *reader)
            .take(limit)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 || buf.last() == Some(&b'\n') {
            return Ok(Line::TooLong);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn beat_lines_are_recognised() {
        assert_eq!(parse_stdout_line("beat"), StdoutLine::Beat { health: None });
        assert_eq!(
            parse_stdout_line("beat\r"),
            StdoutLine::Beat { health: None }
        );
        assert_eq!(
            parse_stdout_line(r#"beat {"actors":3}"#),
            StdoutLine::Beat {
                health: Some(serde_json::json!({"actors": 3}))
            }
        );
        assert!(matches!(
            parse_stdout_line("beat {not json"),
            StdoutLine::BeatWithBadHealth { .. }
        ));
        for other in ["beats", "heartbeat", " beat", "", "hello world"] {
            assert_eq!(
                parse_stdout_line(other),
                StdoutLine::Other(other.to_owned()),
                "{other:?}"
            );
        }
    }

    #[test]
    fn exit_statuses_are_classified() {
        assert_eq!(
            WorkerExit::from(ExitStatus::from_raw(3 << 8)),
            WorkerExit::Code(3)
        );
        assert_eq!(
            WorkerExit::from(ExitStatus::from_raw(9)),
            WorkerExit::Signal(9)
        );
    }

    #[actix::test]
    async fn long_lines_are_skipped_and_reading_goes_on() {
        let mut input = b"beat\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES * 2 + 10));
        input.extend(b"\nlast without newline");
        let mut reader = BufReader::new(&input[..]);
        assert_eq!(
            read_line(&mut reader).await.unwrap(),
            Line::Text("beat".into())
        );
        assert_eq!(read_line(&mut reader).await.unwrap(), Line::TooLong);
        assert_eq!(
            read_line(&mut reader).await.unwrap(),
            Line::Text("last without newline".into())
        );
        assert_eq!(read_line(&mut reader).await.unwrap(), Line::Eof);
    }
}
