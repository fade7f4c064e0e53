//! A load generator: many simulated agents speaking the real v1 protocol over real TLS
//! WebSockets from one process, for `tests/benches/fleet.rs`.
//!
//! A [`SimAgent`] is an enrolled identity with the agent's half of the sans-IO stream core
//! ([`Endpoint`]) kept in memory instead of a journal: what it enqueues counts as durable at
//! once, everything else is as the real uplink does it: `Challenge` → signed `Hello` →
//! `Welcome`, resend from the server's watermark, cumulative acks, retransmit on silence,
//! heartbeats at the interval the `Welcome` names, `Busy` → retry after the given delay plus
//! jitter, and the agent's exponential backoff with full jitter after a failed attempt. Commands are verified
//! against the server's signing key and acked; probe commands are echoed as the real agent does.
//!
//! A [`Fleet`] runs the agents as tasks on a few threads, each with its own actix system and one
//! `awc` client built from a shared rustls config (TLS session resumption off: real agents are
//! separate processes and share no session cache). The bench steers the agents through a
//! [`Control`] value (how many probe events to send) and reads shared counters ([`Stats`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix_codec::Framed;
use awc::ws;
use awc::BoxedSocket;
use futures_util::{SinkExt, StreamExt};
use tether_shared::backoff::Backoff;
use tether_shared::e2e::{AgentGate, AgentStep, MAX_SEALED_BYTES};
use tether_shared::enroll::{EnrollRequest, EnrollResponse, Role, ENROLL_PATH, WS_PATH};
use tether_shared::identity::{Identity, PublicKey};
use tether_shared::link::{verify_command, LinkError, Received, StreamKeys, StreamReceiver};
use tether_shared::protocol::{
    self, hello_proof_bytes, ActorHealth, AgentStatus, CommandBody, Event, EventBody, Frame,
    Heartbeat, Hello, JobStatus, Sender, Seq, StepStatus, StreamId, Welcome,
};
use tether_shared::stream::{ConnId, Endpoint, Handshake, Inbound, Outbound};
use tokio::sync::watch;

use crate::https_request_with_body;

/// Time the server has to complete TCP + TLS + upgrade, and then the challenge and welcome.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an agent checks for retransmits, heartbeats and a silent server.
const TICK: Duration = Duration::from_secs(1);
/// Longest `Busy` delay honoured (as the real agent).
const MAX_BUSY_DELAY: Duration = Duration::from_secs(60);

/// Stream and reconnect tuning; the defaults are the real agent's.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The server's agent-facing listener (dialled directly, no DNS).
    pub wss: SocketAddr,
    /// Name the certificate is checked for.
    pub host: String,
    pub tls: Arc<rustls::ClientConfig>,
    /// Events in flight before an ack.
    pub window: u64,
    /// Events retained before generation pauses.
    pub max_retained: usize,
    pub rto: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Heartbeat interval until a `Welcome` names one.
    pub heartbeat: Duration,
    /// Beat at this interval instead of the `Welcome`'s (the real agent's uplink beats every
    /// `min(configured interval, 1 s)` whatever the server asks).
    pub beat_override: Option<Duration>,
    /// Agent tasks run on this many threads.
    pub threads: usize,
    /// Record each event's time from first send to its ack in [`Stats::ack_latencies_us`].
    pub record_latency: bool,
    /// Output each simulated step prints (none by default).
    pub job_output: JobOutput,
    /// Local addresses to dial from, agent `i` from `sources[i % len]` (none: the system's
    /// choice). The server bounds what one source address may hold, so a fleet of thousands
    /// spreads over several loopback addresses, as real agents come from many hosts.
    pub sources: Vec<std::net::IpAddr>,
    /// Another upstream (a node of the same cluster): after an attempt that failed, an agent
    /// tries the other one, as a real agent goes down its list of upstreams.
    pub fallback: Option<SocketAddr>,
    /// The trust set it says it holds in its handshake (a real agent holds the one it was
    /// installed with, or confirmed since; a hostile one may say anything).
    pub trust_serial: u64,
    /// Facts every heartbeat carries (a real agent's carry them every 5 minutes); none by
    /// default.
    pub heartbeat_facts: Option<tether_shared::facts::Facts>,
}

/// What a simulated agent prints for each step of a job it runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobOutput {
    /// Chunks per step, sent between its start and its end.
    pub chunks: u32,
    /// Bytes per chunk (under a frame's 256 KiB).
    pub chunk_bytes: usize,
    /// More chunks sent for the job's last step after the job's end (a hostile agent).
    pub after_finish: u32,
}

impl SimConfig {
    /// The real agent's defaults against `wss` (certificate checked for `host`), with `tls`
    /// trusting the server's CA; session resumption is switched off here.
    pub fn new(wss: SocketAddr, host: &str, tls: rustls::ClientConfig) -> Self {
        let mut tls = tls;
        tls.resumption = rustls::client::Resumption::disabled();
        SimConfig {
            wss,
            host: host.to_owned(),
            tls: Arc::new(tls),
            window: 256,
            max_retained: 16_384,
            rto: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            beat_override: None,
            threads: 2,
            record_latency: false,
            job_output: JobOutput::default(),
            sources: Vec::new(),
            fallback: None,
            trust_serial: 0,
            heartbeat_facts: None,
        }
    }

    /// Dial from 127.0.0.1 up to 127.0.0.`n` (the whole of 127/8 is loopback on Linux).
    pub fn spread_over_loopback(mut self, n: u8) -> Self {
        self.sources = (1..=n.max(1))
            .map(|i| std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, i)))
            .collect();
        self
    }

    fn url(&self, to: SocketAddr) -> String {
        format!("wss://{}:{}{WS_PATH}", self.host, to.port())
    }
}

/// An enrolled simulated agent: its identity and what the server told it.
pub struct Enrolled {
    pub agent_id: String,
    pub identity: Identity,
    pub server_key: PublicKey,
}

/// Enrolls one agent named `name` with `token` at the agent-facing listener `wss`.
pub fn enroll(
    wss: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    host: &str,
    token: &str,
    name: &str,
) -> Result<Enrolled, String> {
    let identity = Identity::generate();
    let mut request = EnrollRequest {
        token: token.to_owned(),
        name: name.to_owned(),
        public_key: identity.public_key_b64(),
        tags: Vec::new(),
        role: Role::Agent,
        tls_public_key: None,
        hostnames: Vec::new(),
        proof: String::new(),
        tls_proof: None,
    };
    request.sign(&identity, None).map_err(|e| e.to_string())?;
    let body = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
    let reply = https_request_with_body(
        wss,
        tls,
        host,
        "POST",
        ENROLL_PATH,
        &[("Content-Type", "application/json")],
        Some(&body),
    )
    .map_err(|e| format!("enroll {name}: {e}"))?;
    if reply.status != 200 {
        return Err(format!(
            "enroll {name}: HTTP {}: {}",
            reply.status,
            reply.body.chars().take(200).collect::<String>()
        ));
    }
    let answer: EnrollResponse =
        serde_json::from_str(&reply.body).map_err(|e| format!("enroll {name}: {e}"))?;
    let server_key = PublicKey::from_b64(&answer.server_signing_key)
        .map_err(|e| format!("enroll {name}: server key: {e}"))?;
    Ok(Enrolled {
        agent_id: answer.agent_id,
        identity,
        server_key,
    })
}

type EnrollResult = Result<Enrolled, String>;

/// Enrolls `count` simulated agents named `{prefix}-{i}` at `server` (a token of its own, 16
/// at a time): them, and a TLS configuration that trusts the server's CA, for [`SimConfig::new`].
pub fn enroll_at(
    server: &crate::fleet::Server,
    prefix: &str,
    count: usize,
) -> Result<(rustls::ClientConfig, Vec<Enrolled>), String> {
    let ca = std::fs::read_to_string(server.ca_path()).map_err(|e| e.to_string())?;
    let tls = tether_shared::tls::client_config(&ca).map_err(|e| e.to_string())?;
    let token = server.token(u32::try_from(count).map_err(|e| e.to_string())?);
    let enrolled = enroll_many(
        server.wss,
        Arc::new(tls.clone()),
        "localhost",
        &token,
        prefix,
        count,
        16,
    )?;
    Ok((tls, enrolled))
}

/// Enrolls `count` agents named `{prefix}-{i}`, `parallel` at a time. Returns them in order.
pub fn enroll_many(
    wss: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    host: &str,
    token: &str,
    prefix: &str,
    count: usize,
    parallel: usize,
) -> Result<Vec<Enrolled>, String> {
    let next = Arc::new(AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<Option<EnrollResult>>>> =
        Arc::new(Mutex::new((0..count).map(|_| None).collect()));
    let workers: Vec<JoinHandle<()>> = (0..parallel.clamp(1, count.max(1)))
        .map(|_| {
            let (next, results, tls) = (next.clone(), results.clone(), tls.clone());
            let (host, token, prefix) = (host.to_owned(), token.to_owned(), prefix.to_owned());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let r = enroll(wss, tls.clone(), &host, &token, &format!("{prefix}-{i}"));
                let failed = r.is_err();
                results.lock().unwrap_or_else(PoisonError::into_inner)[i] = Some(r);
                if failed {
                    // Stop handing out work: the caller reports the first failure.
                    next.store(count, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| "an enrollment thread panicked".to_owned())?;
    }
    let results = std::mem::take(&mut *results.lock().unwrap_or_else(PoisonError::into_inner));
    let mut out = Vec::with_capacity(count);
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Some(Ok(e)) => out.push(e),
            Some(Err(e)) => return Err(e),
            None => return Err(format!("enrollment {i} never ran (an earlier one failed)")),
        }
    }
    Ok(out)
}

/// What the bench asks of the agents. Each agent sends probe events numbered 1, 2, ... until it
/// has generated `events_each` (plus `first_extra` for agent 0, plus whatever the server asked
/// for with `EmitProbes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    pub events_each: u64,
    pub first_extra: u64,
    pub stop: bool,
}

/// Counters shared by every agent of a fleet.
#[derive(Debug, Default)]
pub struct Stats {
    /// Agents with a session past `Welcome` now.
    pub ready: AtomicUsize,
    /// `Welcome`s received in total.
    pub welcomes: AtomicU64,
    /// Connection attempts started.
    pub attempts: AtomicU64,
    /// Attempts that failed before a `Welcome` (TCP, TLS, upgrade, timeout, refusal).
    pub failed: AtomicU64,
    /// `Busy` answers.
    pub busy: AtomicU64,
    /// Sessions that ended after their `Welcome`.
    pub dropped: AtomicU64,
    /// Events the server acknowledged (or reported as held in its `Welcome`).
    pub events_acked: AtomicU64,
    /// Event frames put on the wire, resends included.
    pub events_sent: AtomicU64,
    /// Commands accepted (and acked) from the server.
    pub commands: AtomicU64,
    /// Jobs answered (every step reported succeeded).
    pub jobs: AtomicU64,
    /// How many times each job (`<agent id> <job id>`) was run.
    pub job_runs: Mutex<BTreeMap<String, u32>>,
    /// When each job's `RunJob` first arrived (`<agent id> <job id>`, Unix ms): the command
    /// was delivered.
    pub job_received_unix_ms: Mutex<BTreeMap<String, u64>>,
    /// When the server acknowledged each job's `JobFinished` (`<agent id> <job id>`, Unix
    /// ms): from then on its result is durable (the first time, if it ran more than once).
    pub job_acked_unix_ms: Mutex<BTreeMap<String, u64>>,
    /// Handshakes where the server had lost its state (streams restarted at 1).
    pub resets: AtomicU64,
    /// Send-to-ack times of events in microseconds, when the config records them.
    pub ack_latencies_us: Mutex<Vec<u64>>,
    /// Failure reasons and how often each occurred.
    reasons: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    fn reason(&self, what: &str, detail: &str) {
        // Group reasons that differ only in numbers (ports, sizes, error codes).
        let mut grouped = String::new();
        for c in detail.chars().take(80) {
            if !(c.is_ascii_digit() && grouped.ends_with('#')) {
                grouped.push(if c.is_ascii_digit() { '#' } else { c });
            }
        }
        let key = format!("{what}: {grouped}");
        *self
            .reasons
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default() += 1;
    }

    /// Failure reasons seen so far, most frequent first.
    pub fn reasons(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .reasons
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        v.sort_by_key(|r| std::cmp::Reverse(r.1));
        v
    }

    /// Forget the failure reasons (between phases).
    pub fn clear_reasons(&self) {
        self.reasons
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A random delay in `0..=span`.
fn jitter(span: Duration) -> Duration {
    let span = span.as_millis() as u64;
    if span == 0 {
        Duration::ZERO
    } else {
        Duration::from_millis(rand::random::<u64>() % (span + 1))
    }
}

type Socket = Framed<BoxedSocket, ws::Codec>;

/// How one connection attempt ended.
enum Ended {
    /// The bench is over.
    Stop,
    /// It never got to `Welcome`.
    Failed,
    /// The server said `Busy`: retry after this long.
    Busy(Duration),
    /// A session that worked ended.
    WasReady,
}

/// One simulated agent.
pub struct SimAgent {
    index: usize,
    agent_id: String,
    identity: Identity,
    server_key: PublicKey,
    incarnation: String,
    cfg: Arc<SimConfig>,
    stats: Arc<Stats>,
    ep: Endpoint<Vec<u8>>,
    receiver: StreamReceiver,
    conn: u64,
    heartbeat: Duration,
    /// Probe events generated so far (the last `n`), and extra ones the server asked for.
    generated: u64,
    requested: u64,
    /// First-send times of unacknowledged events (only when recording latency).
    sent_at: std::collections::VecDeque<(u64, Instant)>,
    /// The seqs of `JobFinished` events not acknowledged yet, and their jobs.
    finishing: std::collections::VecDeque<(Seq, String)>,
    /// The current connection's end-to-end protection, once its handshake is done.
    gate: Option<AgentGate>,
    /// Whether it dials [`SimConfig::fallback`] now.
    on_fallback: bool,
}

impl SimAgent {
    pub fn new(
        index: usize,
        enrolled: Enrolled,
        cfg: Arc<SimConfig>,
        stats: Arc<Stats>,
    ) -> Result<Self, String> {
        let outbound = Outbound::new(cfg.window, cfg.max_retained, cfg.rto.as_millis() as u64);
        let inbound = Inbound::new(cfg.window);
        // In memory: the journal names only serve to build the receiver; nothing is written.
        let receiver = StreamKeys::agent_side()
            .map_err(|e| e.to_string())?
            .receiver();
        Ok(SimAgent {
            index,
            agent_id: enrolled.agent_id,
            identity: enrolled.identity,
            server_key: enrolled.server_key,
            incarnation: hex::encode(rand::random::<[u8; 16]>()),
            heartbeat: cfg.heartbeat,
            cfg,
            stats,
            ep: Endpoint::new(outbound, inbound, None),
            receiver,
            conn: 0,
            generated: 0,
            requested: 0,
            sent_at: std::collections::VecDeque::new(),
            finishing: std::collections::VecDeque::new(),
            gate: None,
            on_fallback: false,
        })
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// Connect, run sessions and reconnect until the control says stop.
    pub async fn run(mut self, client: awc::Client, mut control: watch::Receiver<Control>) {
        let mut backoff = Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max);
        loop {
            if control.borrow().stop {
                return;
            }
            let delay = match self.session(&client, &mut control).await {
                Ended::Stop => return,
                Ended::WasReady => {
                    backoff.reset();
                    backoff.next_delay(&mut rand::thread_rng())
                }
                // As the agent: the server's delay is a floor, plus a little jitter.
                Ended::Busy(d) => {
                    d.min(MAX_BUSY_DELAY)
                        + backoff
                            .next_delay(&mut rand::thread_rng())
                            .min(self.cfg.reconnect_min)
                }
                Ended::Failed => {
                    self.on_fallback = self.cfg.fallback.is_some() && !self.on_fallback;
                    backoff.next_delay(&mut rand::thread_rng())
                }
            };
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    changed = control.changed() => {
                        if changed.is_err() || control.borrow().stop {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// One connection attempt and, if it gets there, one session.
    async fn session(
        &mut self,
        client: &awc::Client,
        control: &mut watch::Receiver<Control>,
    ) -> Ended {
        self.stats.attempts.fetch_add(1, Ordering::Relaxed);
        let to = match (self.on_fallback, self.cfg.fallback) {
            (true, Some(fallback)) => fallback,
            _ => self.cfg.wss,
        };
        let connect = client
            .ws(self.cfg.url(to))
            .address(to)
            .max_frame_size(MAX_SEALED_BYTES)
            .connect();
        let mut socket = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect).await {
            Ok(Ok((_, socket))) => socket,
            Ok(Err(e)) => return self.failed("connect", &e.to_string()),
            Err(_) => return self.failed("connect", "timed out"),
        };
        self.conn += 1;
        let conn = ConnId(self.conn);
        self.gate = None;
        let secured = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.secure(&mut socket)).await
        {
            Ok(r) => r,
            Err(_) => Err(self.failed("e2e", "timed out")),
        };
        let ended = match secured {
            Err(ended) => Err(ended),
            Ok(()) => self.handshake(&mut socket, conn, control).await,
        };
        let ended = match ended {
            Ok(true) => self.serve(&mut socket, conn, control).await,
            Ok(false) => Ended::Stop,
            Err(ended) => ended,
        };
        self.ep.disconnect();
        // Best effort: the server may be gone already.
        let _ = tokio::time::timeout(Duration::from_secs(1), socket.close()).await;
        ended
    }

    fn failed(&self, what: &str, detail: &str) -> Ended {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        self.stats.reason(what, detail);
        Ended::Failed
    }

    /// The end-to-end handshake, as the agent's uplink runs it (a `Busy` or a refusal may come
    /// in clear instead of the server's answer).
    async fn secure(&mut self, socket: &mut Socket) -> Result<(), Ended> {
        let (mut gate, first) =
            AgentGate::start().map_err(|e| self.failed("e2e", &e.to_string()))?;
        send_bytes(socket, &mut None, vec![first])
            .await
            .map_err(|e| self.failed("e2e", &e))?;
        let answer = loop {
            match socket.next().await {
                Some(Ok(ws::Frame::Binary(b) | ws::Frame::Text(b))) => break b,
                Some(Ok(ws::Frame::Ping(p))) => {
                    let _ = socket.send(ws::Message::Pong(p)).await;
                }
                Some(Ok(ws::Frame::Pong(_))) => {}
                other => return Err(self.failed("e2e", &format!("{other:?}"))),
            }
        };
        if answer.first() == Some(&b'{') && protocol::decode(&answer, Sender::Server).is_ok() {
            return Err(match protocol::decode(&answer, Sender::Server) {
                Ok(Frame::Busy(b)) => {
                    self.stats.busy.fetch_add(1, Ordering::Relaxed);
                    Ended::Busy(Duration::from_millis(b.retry_after_ms))
                }
                Ok(Frame::Error(e)) => {
                    self.failed("refused", &format!("{:?}: {}", e.code, e.message))
                }
                other => self.failed("e2e", &format!("{other:?}")),
            });
        }
        let step = gate.on_message(
            &answer,
            std::slice::from_ref(&self.server_key),
            &self.agent_id,
            &self.identity,
        );
        match step {
            Ok(AgentStep::Send(last)) => {
                send_bytes(socket, &mut None, vec![last])
                    .await
                    .map_err(|e| self.failed("e2e", &e))?;
                self.gate = Some(gate);
                Ok(())
            }
            other => Err(self.failed("e2e", &format!("{other:?}"))),
        }
    }

    /// A sealed frame from the server, opened.
    fn open(&mut self, bytes: &[u8]) -> Result<Vec<u8>, String> {
        match self.gate.as_mut() {
            Some(gate) => gate.open_frame(bytes).map_err(|e| e.to_string()),
            None => Err("no end-to-end session".into()),
        }
    }

    /// Challenge → Hello → Welcome. `Ok(false)`: stop asked meanwhile.
    async fn handshake(
        &mut self,
        socket: &mut Socket,
        conn: ConnId,
        control: &mut watch::Receiver<Control>,
    ) -> Result<bool, Ended> {
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        let mut challenged = false;
        loop {
            let frame = tokio::select! {
                f = socket.next() => f,
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(self.failed("handshake", "timed out"));
                }
                changed = control.changed() => {
                    if changed.is_err() || control.borrow().stop {
                        return Ok(false);
                    }
                    continue;
                }
            };
            let bytes = match frame {
                Some(Ok(ws::Frame::Binary(b) | ws::Frame::Text(b))) => b,
                Some(Ok(ws::Frame::Ping(p))) => {
                    let _ = socket.send(ws::Message::Pong(p)).await;
                    continue;
                }
                Some(Ok(ws::Frame::Pong(_))) => continue,
                Some(Ok(ws::Frame::Close(reason))) => {
                    return Err(self.failed("handshake", &format!("closed: {reason:?}")))
                }
                Some(Ok(ws::Frame::Continuation(_))) => {
                    return Err(self.failed("handshake", "fragmented frame"))
                }
                Some(Err(e)) => return Err(self.failed("handshake", &e.to_string())),
                None => return Err(self.failed("handshake", "connection ended")),
            };
            let bytes = self
                .open(&bytes)
                .map_err(|e| self.failed("handshake", &e))?;
            match (challenged, protocol::decode(&bytes, Sender::Server)) {
                (false, Ok(Frame::Challenge(c))) => {
                    let last_command_seq = self.ep.begin(conn);
                    let hello = Hello {
                        agent_id: self.agent_id.clone(),
                        version: concat!("loadgen-", env!("CARGO_PKG_VERSION")).into(),
                        incarnation: self.incarnation.clone(),
                        server_incarnation: self.ep.peer_incarnation.clone().unwrap_or_default(),
                        last_command_seq,
                        proof: self
                            .identity
                            .sign(&hello_proof_bytes(&c.nonce, &self.agent_id)),
                        trust_serial: self.cfg.trust_serial,
                        sealing_key: sim_sealing_key(),
                        facts: sim_facts(&self.agent_id),
                        ..Default::default()
                    };
                    if let Err(e) =
                        send_frames(socket, &mut self.gate, &[Frame::Hello(hello)]).await
                    {
                        return Err(self.failed("hello", &e));
                    }
                    challenged = true;
                }
                (false, Ok(Frame::Busy(b))) => {
                    self.stats.busy.fetch_add(1, Ordering::Relaxed);
                    return Err(Ended::Busy(Duration::from_millis(b.retry_after_ms)));
                }
                (true, Ok(Frame::Welcome(w))) => {
                    return self.on_welcome(conn, &w).map(|()| true);
                }
                (_, Ok(Frame::Error(e))) => {
                    return Err(self.failed("refused", &format!("{:?}: {}", e.code, e.message)))
                }
                (_, Ok(other)) => {
                    return Err(self.failed("handshake", &format!("unexpected {}", other.kind())))
                }
                (_, Err(e)) => return Err(self.failed("handshake", &e.to_string())),
            }
        }
    }

    fn on_welcome(&mut self, conn: ConnId, w: &Welcome) -> Result<(), Ended> {
        let before = self.ep.outbound.acked();
        match self.ep.complete(
            conn,
            &w.server_incarnation,
            true,
            w.last_event_seq,
            now_ms(),
        ) {
            Ok(Handshake::PeerReset { .. }) => {
                self.stats.resets.fetch_add(1, Ordering::Relaxed);
                // Numbered in a stream the server no longer has.
                self.finishing.clear();
            }
            Ok(Handshake::FirstContact | Handshake::Resumed) => {}
            Err(e) => return Err(self.failed("resync", &e.to_string())),
        }
        self.count_acked(before);
        self.heartbeat = Duration::from_millis(w.heartbeat_interval_ms.clamp(100, 600_000));
        self.stats.welcomes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn record_latency(&mut self, upto: u64) {
        if !self.cfg.record_latency {
            return;
        }
        let mut samples = Vec::new();
        while let Some((seq, at)) = self.sent_at.front().copied() {
            if seq > upto {
                break;
            }
            self.sent_at.pop_front();
            samples.push(at.elapsed().as_micros() as u64);
        }
        self.stats
            .ack_latencies_us
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(samples);
    }

    fn count_acked(&mut self, before: Seq) {
        let after = self.ep.outbound.acked();
        if after > before {
            self.stats
                .events_acked
                .fetch_add(after.0 - before.0, Ordering::Relaxed);
        }
        while self.finishing.front().is_some_and(|(seq, _)| *seq <= after) {
            if let Some((_, job)) = self.finishing.pop_front() {
                self.stats
                    .job_acked_unix_ms
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(job)
                    .or_insert_with(now_ms);
            }
        }
    }

    /// The session after `Welcome`, until it ends.
    async fn serve(
        &mut self,
        socket: &mut Socket,
        conn: ConnId,
        control: &mut watch::Receiver<Control>,
    ) -> Ended {
        self.stats.ready.fetch_add(1, Ordering::Relaxed);
        let ended = self.serve_ready(socket, conn, control).await;
        self.stats.ready.fetch_sub(1, Ordering::Relaxed);
        if !matches!(ended, Ended::Stop) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        ended
    }

    async fn serve_ready(
        &mut self,
        socket: &mut Socket,
        conn: ConnId,
        control: &mut watch::Receiver<Control>,
    ) -> Ended {
        let mut last_heard = Instant::now();
        let mut last_beat = Instant::now();
        // Spread the agents' ticks over the period.
        let first = tokio::time::Instant::now() + jitter(TICK);
        let mut tick = tokio::time::interval_at(first, TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let target = *control.borrow_and_update();
        self.generate(target);
        if let Err(e) = self.pump(socket).await {
            self.stats.reason("send", &e);
            return Ended::WasReady;
        }
        loop {
            let frame = tokio::select! {
                f = socket.next() => f,
                _ = tick.tick() => {
                    if last_heard.elapsed() > self.heartbeat * 3 {
                        self.stats.reason("session", "server silent");
                        return Ended::WasReady;
                    }
                    self.ep.outbound.on_tick(now_ms());
                    let mut extra = Vec::new();
                    let every = self.cfg.beat_override.unwrap_or(self.heartbeat);
                    // Ticks are a second apart: beat at the tick closest to the interval.
                    if last_beat.elapsed() + TICK / 2 >= every {
                        last_beat = Instant::now();
                        extra.push(self.heartbeat_frame());
                    }
                    if let Err(e) = self.pump_with(socket, &extra).await {
                        self.stats.reason("send", &e);
                        return Ended::WasReady;
                    }
                    continue;
                }
                changed = control.changed() => {
                    let target = *control.borrow_and_update();
                    if changed.is_err() || target.stop {
                        return Ended::Stop;
                    }
                    self.generate(target);
                    if let Err(e) = self.pump(socket).await {
                        self.stats.reason("send", &e);
                        return Ended::WasReady;
                    }
                    continue;
                }
            };
            last_heard = Instant::now();
            let bytes = match frame {
                Some(Ok(ws::Frame::Binary(b) | ws::Frame::Text(b))) => b,
                Some(Ok(ws::Frame::Ping(p))) => {
                    let _ = socket.send(ws::Message::Pong(p)).await;
                    continue;
                }
                Some(Ok(ws::Frame::Pong(_))) => continue,
                Some(Ok(ws::Frame::Close(reason))) => {
                    self.stats
                        .reason("session", &format!("server closed: {reason:?}"));
                    return Ended::WasReady;
                }
                Some(Ok(ws::Frame::Continuation(_))) => {
                    self.stats.reason("session", "fragmented frame");
                    return Ended::WasReady;
                }
                Some(Err(e)) => {
                    self.stats.reason("session", &e.to_string());
                    return Ended::WasReady;
                }
                None => {
                    self.stats.reason("session", "connection ended");
                    return Ended::WasReady;
                }
            };
            let opened = self.open(&bytes);
            if let Err(e) = opened.and_then(|bytes| self.on_stream_bytes(&bytes, conn, control)) {
                self.stats.reason("session", &e);
                let _ = send_frames(
                    socket,
                    &mut self.gate,
                    &[Frame::Error(protocol::ErrorFrame {
                        code: protocol::ErrorCode::ProtocolViolation,
                        message: e,
                        details: Default::default(),
                    })],
                )
                .await;
                return Ended::WasReady;
            }
            if let Err(e) = self.pump(socket).await {
                self.stats.reason("send", &e);
                return Ended::WasReady;
            }
        }
    }

    /// A frame after `Welcome`: commands (verified, accepted at once: memory is our journal),
    /// acks and nacks of our events, heartbeats.
    fn on_stream_bytes(
        &mut self,
        bytes: &[u8],
        conn: ConnId,
        control: &watch::Receiver<Control>,
    ) -> Result<(), String> {
        let (server_key, agent_id) = (&self.server_key, &self.agent_id);
        let room = self.ep.outbound.has_room(1);
        let check = |frame: &Frame| -> Result<(), LinkError> {
            verify_command(frame, agent_id, std::slice::from_ref(server_key))?;
            if !room {
                // The event backlog is full.
                return Err(LinkError::Deferred);
            }
            Ok(())
        };
        match self.receiver.on_bytes(&mut self.ep.inbound, bytes, check) {
            Ok(Received::Journal { seq, frame, .. }) => {
                self.ep.inbound.mark_durable(seq);
                self.stats.commands.fetch_add(1, Ordering::Relaxed);
                if let Frame::Command(c) = frame {
                    match c.body {
                        CommandBody::Probe { n, .. } => {
                            self.enqueue(EventBody::ProbeEcho { n })?;
                        }
                        // Holds no job records: it has nothing to report.
                        CommandBody::Reconcile {} => {
                            self.enqueue(EventBody::JobsReported {
                                jobs: 0,
                                omitted: 0,
                            })?;
                        }
                        CommandBody::EmitProbes { count } => {
                            self.requested = self.requested.saturating_add(count);
                            self.generate(*control.borrow());
                        }
                        // A simulated agent "runs" every step at once, successfully: the
                        // dispatch benchmark measures the server and the streams, not sh.
                        CommandBody::RunJob { job_id, steps, .. } => {
                            self.stats
                                .job_received_unix_ms
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .entry(format!("{} {job_id}", self.agent_id))
                                .or_insert_with(now_ms);
                            self.enqueue(EventBody::JobAccepted {
                                job_id: job_id.clone(),
                            })?;
                            let out = self.cfg.job_output;
                            let output = |step: u32, chunk: u32| EventBody::StepOutput {
                                job_id: job_id.clone(),
                                step,
                                chunk,
                                data: format!("{chunk:>8} ")
                                    .repeat(out.chunk_bytes / 9 + 1)
                                    .chars()
                                    .take(out.chunk_bytes)
                                    .collect(),
                            };
                            for step in 0..steps.len() as u32 {
                                self.enqueue(EventBody::StepStarted {
                                    job_id: job_id.clone(),
                                    step,
                                    attempt: 1,
                                })?;
                                for chunk in 0..out.chunks {
                                    self.enqueue(output(step, chunk))?;
                                }
                                self.enqueue(EventBody::StepFinished {
                                    job_id: job_id.clone(),
                                    step,
                                    status: StepStatus::Succeeded,
                                    exit_code: Some(0),
                                    outputs: Default::default(),
                                    message: String::new(),
                                })?;
                            }
                            let finished = self.enqueue(EventBody::JobFinished {
                                job_id: job_id.clone(),
                                status: JobStatus::Succeeded,
                            })?;
                            self.finishing
                                .push_back((finished, format!("{} {job_id}", self.agent_id)));
                            let last = (steps.len() as u32).saturating_sub(1);
                            for chunk in out.chunks..out.chunks + out.after_finish {
                                self.enqueue(output(last, chunk))?;
                            }
                            self.stats.jobs.fetch_add(1, Ordering::Relaxed);
                            *self
                                .stats
                                .job_runs
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .entry(format!("{} {job_id}", self.agent_id))
                                .or_default() += 1;
                        }
                        CommandBody::CancelJob { .. }
                        | CommandBody::RelayCertificate { .. }
                        | CommandBody::Operate { .. } => {}
                        // A simulated agent keeps the key it was made with.
                        CommandBody::Trust { set } => {
                            self.enqueue(EventBody::TrustRefused {
                                serial: set.serial,
                                reason: "a simulated agent keeps its keys".into(),
                            })?;
                        }
                        // A simulated agent has no binary to swap.
                        CommandBody::Upgrade { version, .. } => {
                            self.enqueue(EventBody::UpgradeRefused {
                                version,
                                reason: "a simulated agent is not upgraded".into(),
                            })?;
                        }
                    }
                }
                Ok(())
            }
            Ok(Received::Nothing) => Ok(()),
            Ok(Received::Other(frame)) => match frame {
                Frame::Ack(a) if a.stream == StreamId::Events => {
                    let before = self.ep.outbound.acked();
                    self.ep.outbound.on_ack(conn, a.upto, now_ms());
                    self.count_acked(before);
                    self.record_latency(a.upto.0);
                    self.generate(*control.borrow());
                    Ok(())
                }
                Frame::Nack(n) if n.stream == StreamId::Events => {
                    self.ep.outbound.on_nack(conn, n.from);
                    Ok(())
                }
                Frame::Heartbeat(_) => Ok(()),
                Frame::Error(e) => {
                    self.stats.reason(
                        "server error frame",
                        &format!("{:?}: {}", e.code, e.message),
                    );
                    Ok(())
                }
                other => Err(format!("unexpected {} frame", other.kind())),
            },
            Err(LinkError::Deferred) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Number an event and hold it (durable at once: there is no journal); its seq.
    fn enqueue(&mut self, body: EventBody) -> Result<Seq, String> {
        let seq = self
            .ep
            .outbound
            .next_seq()
            .ok_or("event sequence numbers exhausted")?;
        let event = Event::new(seq, body).map_err(|e| e.to_string())?;
        let bytes = Frame::Event(event).encode().map_err(|e| e.to_string())?;
        self.ep
            .outbound
            .enqueue(bytes, now_ms())
            .map_err(|e| e.to_string())?;
        self.ep.outbound.mark_durable(seq);
        Ok(seq)
    }

    /// Generate probe events up to what the control (and the server) asked for, as far as the
    /// retention limit allows.
    fn generate(&mut self, control: Control) {
        let mut target = control.events_each.saturating_add(self.requested);
        if self.index == 0 {
            target = target.saturating_add(control.first_extra);
        }
        while self.generated < target && self.ep.outbound.has_room(1) {
            let n = self.generated + 1;
            let body = EventBody::Probe {
                n,
                data: format!("event {n}"),
            };
            if let Err(e) = self.enqueue(body) {
                self.stats.reason("generate", &e);
                return;
            }
            self.generated = n;
        }
    }

    fn heartbeat_frame(&self) -> Frame {
        Frame::Heartbeat(Heartbeat {
            sent_ms: now_ms(),
            status: Some(AgentStatus {
                version: concat!("loadgen-", env!("CARGO_PKG_VERSION")).into(),
                running_jobs: 0,
                load_milli: 0,
                actors: vec![ActorHealth {
                    name: "uplink".into(),
                    kind: "Uplink".into(),
                    state: "running".into(),
                    restarts: 0,
                    last_beat_ms: 0,
                }],
                facts: self.cfg.heartbeat_facts.clone(),
                figures: None,
            }),
        })
    }

    async fn pump(&mut self, socket: &mut Socket) -> Result<(), String> {
        self.pump_with(socket, &[]).await
    }

    /// Put on the wire what the streams allow now, after `extra`.
    async fn pump_with(&mut self, socket: &mut Socket, extra: &[Frame]) -> Result<(), String> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        for f in extra {
            out.push(f.encode().map_err(|e| e.to_string())?);
        }
        let events = self.ep.outbound.poll_transmit(now_ms());
        self.stats
            .events_sent
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        if self.cfg.record_latency {
            let now = Instant::now();
            for (seq, _) in &events {
                // Resends keep their first time: the latency is what the agent waited.
                if self.sent_at.back().is_none_or(|(last, _)| seq.0 > *last) {
                    self.sent_at.push_back((seq.0, now));
                }
            }
        }
        out.extend(events.into_iter().map(|(_, bytes)| bytes));
        for f in [
            self.receiver.poll_ack(&mut self.ep.inbound),
            self.receiver.poll_nack(&mut self.ep.inbound),
        ]
        .into_iter()
        .flatten()
        {
            out.push(f.encode().map_err(|e| e.to_string())?);
        }
        send_bytes(socket, &mut self.gate, out).await
    }
}

async fn send_frames(
    socket: &mut Socket,
    gate: &mut Option<AgentGate>,
    frames: &[Frame],
) -> Result<(), String> {
    let mut out = Vec::with_capacity(frames.len());
    for f in frames {
        out.push(f.encode().map_err(|e| e.to_string())?);
    }
    send_bytes(socket, gate, out).await
}

/// Encoded frames on the socket, sealed by `gate` (the handshake's own messages go without).
async fn send_bytes(
    socket: &mut Socket,
    gate: &mut Option<AgentGate>,
    frames: Vec<Vec<u8>>,
) -> Result<(), String> {
    if frames.is_empty() {
        return Ok(());
    }
    for bytes in frames {
        let bytes = match gate.as_mut() {
            Some(g) => g.seal(&bytes).map_err(|e| e.to_string())?,
            None => bytes,
        };
        socket
            .feed(ws::Message::Binary(bytes.into()))
            .await
            .map_err(|e| e.to_string())?;
    }
    socket.flush().await.map_err(|e| e.to_string())
}

/// Many simulated agents running on a few threads.
pub struct Fleet {
    control: watch::Sender<Control>,
    stats: Arc<Stats>,
    threads: Vec<JoinHandle<()>>,
    ids: Vec<String>,
}

impl Fleet {
    /// Start every agent at once (each connects immediately).
    pub fn start(cfg: SimConfig, agents: Vec<Enrolled>) -> Result<Fleet, String> {
        let cfg = Arc::new(cfg);
        let stats = Arc::new(Stats::default());
        let (control, rx) = watch::channel(Control::default());
        let ids = agents.iter().map(|a| a.agent_id.clone()).collect();
        let threads = cfg.threads.max(1);
        let mut shares: Vec<Vec<SimAgent>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, a) in agents.into_iter().enumerate() {
            shares[i % threads].push(SimAgent::new(i, a, cfg.clone(), stats.clone())?);
        }
        let handles = shares
            .into_iter()
            .enumerate()
            .map(|(t, share)| {
                let (cfg, rx) = (cfg.clone(), rx.clone());
                std::thread::Builder::new()
                    .name(format!("loadgen-{t}"))
                    .spawn(move || run_thread(&cfg, share, rx))
                    .map_err(|e| format!("cannot start a load generator thread: {e}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Fleet {
            control,
            stats,
            threads: handles,
            ids,
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Agent ids, in enrollment order (index 0 is the one `first_extra` applies to).
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Ask every agent for `events_each` probe events in total, agent 0 for `first_extra` more.
    pub fn set_events(&self, events_each: u64, first_extra: u64) {
        self.control.send_modify(|c| {
            c.events_each = events_each;
            c.first_extra = first_extra;
        });
    }

    /// Stop every agent (closing its connection) and wait for the threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.control.send_modify(|c| c.stop = true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run_thread(cfg: &SimConfig, agents: Vec<SimAgent>, mut control: watch::Receiver<Control>) {
    let system = actix_rt::System::new();
    system.block_on(async move {
        let client = |source: Option<std::net::IpAddr>| {
            let mut connector = awc::Connector::new()
                .rustls_0_23(cfg.tls.clone())
                .timeout(HANDSHAKE_TIMEOUT)
                .limit(0);
            if let Some(ip) = source {
                connector = connector.local_address(ip);
            }
            awc::Client::builder()
                .connector(connector)
                .timeout(HANDSHAKE_TIMEOUT)
                .finish()
        };
        let clients: Vec<awc::Client> = if cfg.sources.is_empty() {
            vec![client(None)]
        } else {
            cfg.sources.iter().map(|ip| client(Some(*ip))).collect()
        };
        let tasks: Vec<_> = agents
            .into_iter()
            .map(|a| {
                let client = clients[a.index % clients.len()].clone();
                actix_rt::spawn(a.run(client, control.clone()))
            })
            .collect();
        while !control.borrow_and_update().stop {
            if control.changed().await.is_err() {
                break;
            }
        }
        // Agents close their sessions; give them a moment, then drop the rest.
        let all = futures_util::future::join_all(tasks);
        let _ = tokio::time::timeout(Duration::from_secs(5), all).await;
    });
}

/// The sealing key every simulated agent announces (they run nothing, so none opens a secret;
/// jobs with secrets are sealed for it as for a real agent).
/// Facts as a real agent reports them; half the simulated fleet is `aarch64`, a third
/// `rocky`, so that filters on them select part of it.
fn sim_facts(agent_id: &str) -> tether_shared::facts::Facts {
    let n = agent_id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
    let pick = |options: &[&str], k: u32| options[(k as usize) % options.len()].to_owned();
    tether_shared::facts::Facts::from([
        ("os".to_owned(), "linux".to_owned()),
        ("arch".to_owned(), pick(&["x86_64", "aarch64"], n)),
        (
            "distribution".to_owned(),
            pick(&["debian", "ubuntu", "rocky"], n / 2),
        ),
        ("distribution_version".to_owned(), "12".to_owned()),
        ("kernel".to_owned(), "6.1.0-28-amd64".to_owned()),
        ("hostname".to_owned(), format!("sim-{agent_id}")),
        ("cpus".to_owned(), (1 << (n % 5)).to_string()),
        ("memory_mb".to_owned(), "16000".to_owned()),
        ("disk_free_mb".to_owned(), "120000".to_owned()),
        ("boot_unix_s".to_owned(), "1700000000".to_owned()),
        ("user".to_owned(), "tether".to_owned()),
    ])
}

fn sim_sealing_key() -> String {
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEY.get_or_init(|| tether_shared::sealing::SealingKey::generate().public_b64())
        .clone()
}
