//! The v1 wire protocol between agents (or relays) and the server.
//!
//! Every frame travels as one JSON text: `{"v":1,"kind":"<kind>","body":{...}}`. The envelope is
//! read first, so a wrong version or an unknown kind is reported as such before the body is
//! looked at; then the body is decoded into the kind's own struct with unknown fields refused.
//!
//! [`decode`] turns *any* byte sequence into a [`Frame`] or a typed [`DecodeError`]: the length is
//! checked before parsing, nothing is allocated from a size the peer declares (JSON declares
//! none), nesting is bounded by serde_json's recursion limit, and sequence numbers, directions
//! and payload checksums are validated here so that no layer above ever sees a frame that breaks
//! them. [`Frame::encode`] refuses to produce a frame the peer would reject for its size.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Hard limit on one encoded frame, checked before anything is parsed.
pub const MAX_FRAME_BYTES: usize = 256 * 1024;
/// Most output text kept of one step (agent and server both cap at it).
pub const MAX_STEP_OUTPUT: usize = 8 * 1024 * 1024;
/// What a step's log ends with once its output went over [`MAX_STEP_OUTPUT`].
pub const OUTPUT_TRUNCATED: &str = "\n[output truncated: over the step's limit]\n";

/// Longest command id a peer may name (the server makes 24 hex digits).
pub const MAX_COMMAND_ID: usize = 64;

/// A position in one message stream. Streams start at 1; 0 means "nothing yet".
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// "Nothing received yet": the watermark of an empty stream.
    pub const ZERO: Seq = Seq(0);
    /// The largest sequence number a message may carry; `u64::MAX` itself is refused so that
    /// `+1` can never overflow anywhere.
    pub const MAX_VALID: Seq = Seq(u64::MAX - 1);

    /// The next sequence number, or `None` past [`Seq::MAX_VALID`].
    pub fn next(self) -> Option<Seq> {
        if self.0 >= Self::MAX_VALID.0 {
            None
        } else {
            Some(Seq(self.0 + 1))
        }
    }

    pub fn is_zero(&self) -> bool {
        self.0 == 0
    }

    /// Big-endian bytes, so that sled orders keys by sequence.
    pub fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which end of a connection sent a frame (relays forward frames and keep the original sender).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sender {
    Server,
    Agent,
}

impl fmt::Display for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Sender::Server => "server",
            Sender::Agent => "agent",
        })
    }
}

/// The two message streams of one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamId {
    /// Server → agent.
    Commands,
    /// Agent → server.
    Events,
}

impl StreamId {
    /// The end that sends this stream's messages (and so receives its acks).
    pub fn producer(self) -> Sender {
        match self {
            StreamId::Commands => Sender::Server,
            StreamId::Events => Sender::Agent,
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StreamId::Commands => "commands",
            StreamId::Events => "events",
        })
    }
}

/// First frame on a connection, from the server: the agent must sign `nonce`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Challenge {
    /// Base64 of 32 random bytes, fresh for every connection (defeats replayed handshakes).
    pub nonce: String,
}

/// The agent's answer to [`Challenge`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub agent_id: String,
    /// The agent's software version, shown to operators and used for upgrades.
    pub version: String,
    /// Random id of the agent's journal: a new one means the agent lost its state.
    pub incarnation: String,
    /// The server incarnation `last_command_seq` refers to; empty before first contact.
    /// A watermark about another server incarnation counts as 0 (streams restart).
    pub server_incarnation: String,
    /// Highest command the agent holds durably: the server resends from the next one.
    pub last_command_seq: Seq,
    /// Ed25519 signature (base64) by the agent's key over the nonce and the agent id.
    pub proof: String,
    /// The serial of the trust set (signing keys and CAs, `crate::trust`) the agent holds;
    /// 0, and absent, for the one it enrolled with.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub trust_serial: u64,
    /// Highest event the server acknowledged (in `server_incarnation`): a server holding
    /// fewer lost them (it was restored from a backup taken before) and continues after it.
    #[serde(default, skip_serializing_if = "Seq::is_zero")]
    pub events_acked: Seq,
    /// The id of the command at `last_command_seq`: a server that numbered another command so
    /// was restored behind the agent (see [`CommandBody::Reconcile`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_command_id: String,
    /// The agent answers [`CommandBody::Reconcile`] (older agents are sent none).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reconciles: bool,
    /// The agent's X25519 key (standard base64) that job secrets are sealed for
    /// (`crate::sealing`); older agents send none and are sent no secret.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sealing_key: String,
    /// What the agent's machine is (`crate::facts`); older agents send none.
    #[serde(default, skip_serializing_if = "crate::facts::Facts::is_empty")]
    pub facts: crate::facts::Facts,
    /// The agent honours the `run_as` step property (older agents are sent no job whose
    /// steps name a user: they would run them as themselves).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub runs_as: bool,
    /// The agent answers [`CommandBody::Operate`] (older agents are sent none).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub operations: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The server's acceptance of a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Welcome {
    /// Highest event the server holds durably: the agent resends from the next one.
    pub last_event_seq: Seq,
    /// Random id of the server's journal.
    pub server_incarnation: String,
    /// How often the agent must beat; a silence of a few intervals marks it offline.
    pub heartbeat_interval_ms: u64,
}

/// The server is shedding handshakes (reconnect storm): try again after the delay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Busy {
    pub retry_after_ms: u64,
}

/// What the server asks an agent to do. Self-contained: everything needed to act is inside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CommandBody {
    /// A numbered test message: the agent answers it with exactly one [`EventBody::ProbeEcho`].
    Probe { n: u64, data: String },
    /// Ask the agent to send `count` numbered [`EventBody::Probe`] events of its own.
    EmitProbes { count: u64 },
    /// Run a job: a deployment's process on this agent, every step fully resolved.
    RunJob {
        job_id: String,
        deployment_id: String,
        steps: Vec<StepSpec>,
    },
    /// Stop a job: its running step is killed (process group) and the rest skipped.
    CancelJob { job_id: String },
    /// Replace the agent's worker binary with the package `sha256` (`size` bytes), published
    /// as `version`; `signature` is the server's signature over the version and the sha256
    /// (`tether_shared::upgrade::package_signing_bytes`), checked against the pinned key.
    Upgrade {
        version: String,
        sha256: String,
        size: u64,
        signature: String,
    },
    /// For a relay: a new certificate (PEM) from the relay CA for the TLS key and hostnames it
    /// enrolled with, to serve from now on in place of one that expires sooner. Agents ignore it.
    RelayCertificate { certificate: String },
    /// The signing keys and CAs to trust from now on, in place of those in force (a key or
    /// CA rollover, `tether_shared::trust`): applied only if `set.serial` is newer, and
    /// answered with [`EventBody::TrustApplied`] or [`EventBody::TrustRefused`].
    Trust { set: crate::trust::TrustSet },
    /// The server lost part of its history with this agent (it was restored from a backup
    /// taken before their last exchanges): report every job still held, one
    /// [`EventBody::JobReport`] each, then [`EventBody::JobsReported`].
    Reconcile {},
    /// An operator's remote operation (`op_id` is the server's name for it): answered with one
    /// [`EventBody::OperationResult`]. Sent only to agents whose `Hello` says `operations`.
    Operate { op_id: String, op: Operation },
}

/// What an operator asks of an agent from afar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Answer at once (the round trip is the server's to time).
    Ping,
    /// Restart the worker process (the monitor stays and starts a new one at once).
    RestartWorker,
    /// The worker's recent log lines.
    Log,
    /// A diagnostics bundle: versions, facts, configuration (secrets masked), journal figures.
    Diagnostics,
}

/// Longest text an [`EventBody::OperationResult`] carries (the agent cuts it to fit).
pub const MAX_OPERATION_RESULT: usize = 96 * 1024;

/// How an upgrade the agent started ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeOutcome {
    /// The new version runs and beat healthily for the trial period.
    Done,
    /// The new version failed its trial; the previous one runs again.
    RolledBack,
}

/// What to do with a step whose start was journaled but whose end was not (the worker died).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnInterrupt {
    /// Report it failed, "interrupted by agent restart" (the default: never run twice).
    #[default]
    Fail,
    /// Safe to run again from the start.
    Rerun,
}

/// One step of a job, resolved by the server: everything the agent needs to run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    pub name: String,
    pub plugin: String,
    pub step: String,
    /// Property values, after the deployment's properties were substituted in.
    pub properties: BTreeMap<String, String>,
    /// Names of the properties whose values are secret (masked in every log and answer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    #[serde(default)]
    pub on_interrupt: OnInterrupt,
    pub timeout_ms: u64,
    /// For a step of an uploaded plugin: the bundle to fetch (by its sha256) and the command
    /// to run from it. `None` for the built-in steps, which the agent runs itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<BundleRef>,
    /// The values of the `secrets` properties, sealed for the agent (`crate::sealing`); they
    /// are then absent from `properties`. The agent opens them in memory to run the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
}

/// Where an uploaded plugin's step comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleRef {
    /// sha256 (hex) of the bundle (a tar.gz holding `plugin.toml` and the step's files).
    pub sha256: String,
    /// The program and its arguments, relative paths resolved inside the unpacked bundle.
    pub command: Vec<String>,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    /// The worker died while it ran and the step may not run twice.
    Interrupted,
    /// Not run: an earlier step failed, or the job was cancelled first.
    Skipped,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Succeeded,
    Failed,
    Cancelled,
    /// It arrived after its deadline and was not run.
    Expired,
}

/// What an agent reports to the server. Self-contained, like [`CommandBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum EventBody {
    /// A numbered test message from the agent (see [`CommandBody::EmitProbes`]).
    Probe { n: u64, data: String },
    /// The agent received probe command `n` (journaled in the same batch as the command).
    ProbeEcho { n: u64 },
    /// A command arrived after its deadline and was not acted on.
    CommandExpired { id: String },
    /// The job is journaled on the agent and will run.
    JobAccepted { job_id: String },
    /// Step `step` (index) starts, for the `attempt`-th time (a rerun after an interruption).
    StepStarted {
        job_id: String,
        step: u32,
        attempt: u32,
    },
    /// A numbered chunk of a step's output (secrets masked), so logs arrive complete.
    StepOutput {
        job_id: String,
        step: u32,
        chunk: u32,
        data: String,
    },
    /// Step `step` ended.
    StepFinished {
        job_id: String,
        step: u32,
        status: StepStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        outputs: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        message: String,
    },
    /// The job ended.
    JobFinished { job_id: String, status: JobStatus },
    /// An `Upgrade` was accepted: no new step starts until it ends; running steps finish.
    UpgradeStarted { version: String },
    /// The package is downloaded, verified and staged; the worker exits for the swap.
    UpgradeStaged { version: String },
    /// The upgrade was refused or abandoned before the swap; nothing changed.
    UpgradeRefused { version: String, reason: String },
    /// The swapped-in version passed its trial (`done`), or failed it and the previous
    /// version runs again (`rolled_back`, with the reason).
    UpgradeFinished {
        version: String,
        outcome: UpgradeOutcome,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// The trust set `serial` is in force (applied now, or already).
    TrustApplied { serial: u64 },
    /// The trust set `serial` was refused; the trust in force is unchanged.
    TrustRefused { serial: u64, reason: String },
    /// Where a job the agent holds stands (answering [`CommandBody::Reconcile`], or a `RunJob`
    /// for a job it already holds): what a server that lost its events needs to record it.
    JobReport(JobReport),
    /// The answer to [`CommandBody::Reconcile`] is complete: `jobs` reported, `omitted` not
    /// (the event backlog had no room for them).
    JobsReported { jobs: u32, omitted: u32 },
    /// The answer to [`CommandBody::Operate`] `op_id`: `data` (text, at most
    /// [`MAX_OPERATION_RESULT`] bytes) or, when `ok` is false, why not in `message`.
    OperationResult {
        op_id: String,
        ok: bool,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        data: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        message: String,
    },
}

/// A job as the agent holds it, for [`EventBody::JobReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobReport {
    pub job_id: String,
    pub deployment_id: String,
    /// Every step, in order.
    pub steps: Vec<StepReport>,
    /// `None` while the job runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<JobStatus>,
}

/// One step of a [`JobReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepReport {
    pub name: String,
    /// `None` if it has not ended (running: `attempt` > 0; not started: 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StepStatus>,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// One message of the commands stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub seq: Seq,
    /// Stable id of the command, independent of its stream position (signed, unlike `seq`).
    pub id: String,
    /// Unix time in ms after which the agent reports the command expired instead of acting.
    pub deadline_ms: u64,
    pub body: CommandBody,
    /// CRC-32 of the body's canonical encoding: a corrupted message is refused, never acked.
    pub crc: u32,
    /// The server's Ed25519 signature (base64) over the agent id, `id`, `deadline_ms` and body.
    pub signature: String,
}

/// One message of the events stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub seq: Seq,
    pub body: EventBody,
    /// CRC-32 of the body's canonical encoding.
    pub crc: u32,
}

/// Cumulative acknowledgement: every message of `stream` up to `upto` is durably held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub stream: StreamId,
    pub upto: Seq,
}

/// A gap was seen: resend `stream` from `from` (the first missing sequence number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nack {
    pub stream: StreamId,
    pub from: Seq,
}

/// One actor's health as the agent reports it in its heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorHealth {
    pub name: String,
    pub kind: String,
    pub state: String,
    pub restarts: u32,
    pub last_beat_ms: u64,
}

/// What an agent's heartbeat says about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentStatus {
    pub version: String,
    pub running_jobs: u32,
    /// One-minute load average times 1000 (integers keep the encoding exact).
    pub load_milli: u32,
    pub actors: Vec<ActorHealth>,
    /// The agent's facts again (`crate::facts`), every [`crate::facts::REFRESH`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<crate::facts::Facts>,
    /// The worker's own figures, in every heartbeat (for the server's `/metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub figures: Option<AgentFigures>,
}

/// What an agent's worker says of itself: its process, its jobs, its journal. Numbers only,
/// so a heartbeat stays small whatever the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFigures {
    pub resident_bytes: u64,
    /// User plus system CPU time of the worker, in milliseconds.
    pub cpu_ms: u64,
    pub open_fds: u64,
    pub uptime_s: u64,
    /// Jobs held and not finished, steps running now.
    pub jobs_unfinished: u64,
    pub steps_running: u64,
    /// Events journaled and not yet acknowledged by the server.
    pub events_unacked: u64,
    /// The journal's commits and failed batches since the worker started.
    pub journal_commits: u64,
    pub journal_failures: u64,
    /// Round trip of the last WebSocket ping to its parent (the next relay, or the server), µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_rtt_us: Option<u64>,
}

/// Liveness, both ways; the agent's carries its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub sent_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AgentStatus>,
}

/// Why a peer is about to close the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Malformed,
    UnsupportedVersion,
    Unauthorized,
    ProtocolViolation,
    Overloaded,
    Internal,
}

/// A fatal error report, sent just before closing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
    /// Free-form context (e.g. the supported version range); ordered for stable encoding.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

/// Every v1 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Challenge(Challenge),
    Hello(Hello),
    Welcome(Welcome),
    Busy(Busy),
    Command(Command),
    Event(Event),
    Ack(Ack),
    Nack(Nack),
    Heartbeat(Heartbeat),
    Error(ErrorFrame),
}

/// Why bytes from a peer are not a valid frame. Each maps to a WebSocket close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unsupported protocol version {got}, supported {min}..={max}")]
    UnsupportedVersion { got: u64, min: u16, max: u16 },
    #[error("unknown frame kind {0:?}")]
    UnknownKind(String),
    #[error("a {kind} frame may not be sent by the {sender}")]
    WrongDirection { kind: &'static str, sender: Sender },
    #[error("malformed {kind} body: {reason}")]
    BadBody { kind: &'static str, reason: String },
    #[error("sequence number {seq} out of range 1..={max}", max = Seq::MAX_VALID.0)]
    BadSeq { seq: u64 },
    #[error("checksum mismatch on {kind} seq {seq}: frame says {claimed:#010x}, body hashes to {actual:#010x}")]
    Checksum {
        kind: &'static str,
        seq: u64,
        claimed: u32,
        actual: u32,
    },
}

impl DecodeError {
    /// The error frame to send before closing.
    pub fn to_error_frame(&self) -> ErrorFrame {
        let code = match self {
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            DecodeError::WrongDirection { .. } => ErrorCode::ProtocolViolation,
            _ => ErrorCode::Malformed,
        };
        ErrorFrame {
            code,
            message: self.to_string(),
            details: BTreeMap::new(),
        }
    }
}

/// Why a frame could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("encoded {kind} frame is {len} bytes, over the {max}-byte limit")]
    TooLarge {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("cannot encode {kind} frame: {source}")]
    Json {
        kind: &'static str,
        source: serde_json::Error,
    },
}

#[derive(Serialize)]
struct OutEnvelope<'a, B: Serialize> {
    v: u16,
    kind: &'static str,
    body: &'a B,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InEnvelope<'a> {
    v: u64,
    kind: String,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// CRC-32 of a body's canonical (serde_json) encoding.
pub fn body_crc<B: Serialize>(body: &B) -> Result<u32, serde_json::Error> {
    let bytes = serde_json::to_vec(body)?;
    Ok(crc32fast::hash(&bytes))
}

impl Frame {
    /// The kind name on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Challenge(_) => "challenge",
            Frame::Hello(_) => "hello",
            Frame::Welcome(_) => "welcome",
            Frame::Busy(_) => "busy",
            Frame::Command(_) => "command",
            Frame::Event(_) => "event",
            Frame::Ack(_) => "ack",
            Frame::Nack(_) => "nack",
            Frame::Heartbeat(_) => "heartbeat",
            Frame::Error(_) => "error",
        }
    }

    /// Whether `sender` may send this frame.
    pub fn allowed_from(&self, sender: Sender) -> bool {
        match self {
            Frame::Challenge(_) | Frame::Welcome(_) | Frame::Busy(_) | Frame::Command(_) => {
                sender == Sender::Server
            }
            Frame::Hello(_) | Frame::Event(_) => sender == Sender::Agent,
            // An ack or nack goes to the producer of its stream, so it comes from the other end.
            Frame::Ack(Ack { stream, .. }) | Frame::Nack(Nack { stream, .. }) => {
                stream.producer() != sender
            }
            Frame::Heartbeat(_) | Frame::Error(_) => true,
        }
    }

    /// Encode as one JSON text, refusing anything over [`MAX_FRAME_BYTES`].
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let kind = self.kind();
        let bytes = match self {
            Frame::Challenge(b) => envelope(kind, b),
            Frame::Hello(b) => envelope(kind, b),
            Frame::Welcome(b) => envelope(kind, b),
            Frame::Busy(b) => envelope(kind, b),
            Frame::Command(b) => envelope(kind, b),
            Frame::Event(b) => envelope(kind, b),
            Frame::Ack(b) => envelope(kind, b),
            Frame::Nack(b) => envelope(kind, b),
            Frame::Heartbeat(b) => envelope(kind, b),
            Frame::Error(b) => envelope(kind, b),
        }
        .map_err(|source| EncodeError::Json { kind, source })?;
        if bytes.len() > MAX_FRAME_BYTES {
            return Err(EncodeError::TooLarge {
                kind,
                len: bytes.len(),
                max: MAX_FRAME_BYTES,
            });
        }
        Ok(bytes)
    }
}

fn envelope<B: Serialize>(kind: &'static str, body: &B) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&OutEnvelope {
        v: PROTOCOL_VERSION,
        kind,
        body,
    })
}

fn body<B: DeserializeOwned>(kind: &'static str, raw: &RawValue) -> Result<B, DecodeError> {
    serde_json::from_str(raw.get()).map_err(|e| DecodeError::BadBody {
        kind,
        reason: e.to_string(),
    })
}

fn check_seq(seq: Seq) -> Result<(), DecodeError> {
    if seq == Seq::ZERO || seq > Seq::MAX_VALID {
        return Err(DecodeError::BadSeq { seq: seq.0 });
    }
    Ok(())
}

fn check_watermark(seq: Seq) -> Result<(), DecodeError> {
    if seq > Seq::MAX_VALID {
        return Err(DecodeError::BadSeq { seq: seq.0 });
    }
    Ok(())
}

fn check_crc<B: Serialize>(
    kind: &'static str,
    seq: Seq,
    body: &B,
    claimed: u32,
) -> Result<(), DecodeError> {
    let actual = body_crc(body).map_err(|e| DecodeError::BadBody {
        kind,
        reason: e.to_string(),
    })?;
    if actual != claimed {
        return Err(DecodeError::Checksum {
            kind,
            seq: seq.0,
            claimed,
            actual,
        });
    }
    Ok(())
}

/// Facts that break the rules of `crate::facts::problem` make the frame malformed.
fn check_facts(kind: &'static str, facts: &crate::facts::Facts) -> Result<(), DecodeError> {
    match crate::facts::problem(facts) {
        Some(reason) => Err(DecodeError::BadBody { kind, reason }),
        None => Ok(()),
    }
}

/// Decode one frame sent by `sender`. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8], sender: Sender) -> Result<Frame, DecodeError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    let env: InEnvelope<'_> =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if env.v < u64::from(MIN_PROTOCOL_VERSION) || env.v > u64::from(PROTOCOL_VERSION) {
        return Err(DecodeError::UnsupportedVersion {
            got: env.v,
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        });
    }
    let raw = env.body;
    let frame = match env.kind.as_str() {
        "challenge" => Frame::Challenge(body("challenge", raw)?),
        "hello" => {
            let h: Hello = body("hello", raw)?;
            check_watermark(h.last_command_seq)?;
            check_watermark(h.events_acked)?;
            if h.last_command_id.len() > MAX_COMMAND_ID {
                return Err(DecodeError::Malformed(format!(
                    "hello: last_command_id is longer than {MAX_COMMAND_ID} bytes"
                )));
            }
            check_facts("hello", &h.facts)?;
            Frame::Hello(h)
        }
        "welcome" => {
            let w: Welcome = body("welcome", raw)?;
            check_watermark(w.last_event_seq)?;
            Frame::Welcome(w)
        }
        "busy" => Frame::Busy(body("busy", raw)?),
        "command" => {
            let c: Command = body("command", raw)?;
            check_seq(c.seq)?;
            check_crc("command", c.seq, &c.body, c.crc)?;
            Frame::Command(c)
        }
        "event" => {
            let e: Event = body("event", raw)?;
            check_seq(e.seq)?;
            check_crc("event", e.seq, &e.body, e.crc)?;
            Frame::Event(e)
        }
        "ack" => {
            let a: Ack = body("ack", raw)?;
            check_watermark(a.upto)?;
            Frame::Ack(a)
        }
        "nack" => {
            let n: Nack = body("nack", raw)?;
            check_seq(n.from)?;
            Frame::Nack(n)
        }
        "heartbeat" => {
            let h: Heartbeat = body("heartbeat", raw)?;
            if let Some(facts) = h.status.as_ref().and_then(|s| s.facts.as_ref()) {
                check_facts("heartbeat", facts)?;
            }
            Frame::Heartbeat(h)
        }
        "error" => Frame::Error(body("error", raw)?),
        other => return Err(DecodeError::UnknownKind(truncate(other, 64))),
    };
    if !frame.allowed_from(sender) {
        return Err(DecodeError::WrongDirection {
            kind: frame.kind(),
            sender,
        });
    }
    Ok(frame)
}

/// A peer-chosen string shortened for an error message (never echo megabytes into a log).
fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((idx, _)) => format!("{}…", &s[..idx]),
        None => s.to_owned(),
    }
}

/// The bytes the server signs for a command to `agent_id`: everything but the stream position,
/// so a command can be renumbered on resend but never moved to another agent or altered.
pub fn command_signing_bytes(
    agent_id: &str,
    id: &str,
    deadline_ms: u64,
    body: &CommandBody,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = format!("tether-command-v1\n{agent_id}\n{id}\n{deadline_ms}\n").into_bytes();
    out.extend_from_slice(&serde_json::to_vec(body)?);
    Ok(out)
}

/// The bytes an agent signs to prove its identity in [`Hello::proof`]: bound to this
/// connection's nonce, so a captured handshake cannot be replayed.
pub fn hello_proof_bytes(nonce: &str, agent_id: &str) -> Vec<u8> {
    format!("tether-hello-v1\n{nonce}\n{agent_id}").into_bytes()
}

impl Command {
    /// Build a command with its checksum filled in (the signature is added by the signer).
    pub fn new(
        seq: Seq,
        id: String,
        deadline_ms: u64,
        body: CommandBody,
    ) -> Result<Self, serde_json::Error> {
        let crc = body_crc(&body)?;
        Ok(Command {
            seq,
            id,
            deadline_ms,
            body,
            crc,
            signature: String::new(),
        })
    }
}

impl Event {
    /// Build an event with its checksum filled in.
    pub fn new(seq: Seq, body: EventBody) -> Result<Self, serde_json::Error> {
        let crc = body_crc(&body)?;
        Ok(Event { seq, body, crc })
    }
}

#[cfg(test)]
mod tests;
