//! `Dialer`: the one outbound WebSocket connection an agent's uplink and a relay's upstream keep
//! to their parent, with everything about it that is not their protocol.
//!
//! It tries the listed upstreams in order, one attempt at a time, with jittered exponential
//! backoff between failures (a server's `Busy` delay is a floor); after a session that worked it
//! starts again from the first, preferred, upstream. It numbers connections ([`ConnId`]) so that
//! a late frame of a dropped connection is never taken for one of the current; it answers pings,
//! gives the handshake a deadline, and on a drop lets the close frame reach the wire before the
//! socket goes.
//!
//! The actor that owns a `Dialer` implements [`Dials`]: it says whether to dial now
//! ([`Dials::plan`]), speaks its protocol on each opened connection, and forgets what belonged
//! to a connection when it closes. Its `StreamHandler<Incoming>` passes every item to
//! [`Dials::on_incoming`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::io::{SinkWrite, WriteHandler};
use actix::prelude::*;
use actix_codec::Framed;
use awc::error::WsProtocolError;
use awc::ws;
use awc::BoxedSocket;
use futures_util::stream::{SplitSink, StreamExt};

use crate::backoff::Backoff;
use crate::stream::ConnId;

/// Time to connect, and then to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a dropped connection's last frames get to reach the wire before its socket closes.
const CLOSE_LINGER: Duration = Duration::from_millis(50);

/// Longest `Busy` delay honoured.
const MAX_BUSY_DELAY: Duration = Duration::from_secs(60);

type WsSink = SplitSink<Framed<BoxedSocket, ws::Codec>, ws::Message>;

/// A frame, or the end of the stream, from connection `ConnId`.
pub enum Incoming {
    Frame(ConnId, Result<ws::Frame, WsProtocolError>),
    Ended(ConnId),
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Idle,
    Connecting,
    /// Open; the owner's handshake runs.
    Handshaking,
    /// The owner's handshake succeeded.
    Ready,
}

impl LinkState {
    /// What the admin endpoint shows.
    pub fn label(self) -> &'static str {
        match self {
            LinkState::Ready => "connected",
            LinkState::Idle | LinkState::Connecting => "reconnecting",
            LinkState::Handshaking => "handshaking",
        }
    }
}

/// Whether to dial now.
pub enum Plan {
    /// Dial, trusting this TLS configuration.
    Dial(Arc<rustls::ClientConfig>),
    /// Not now; ask again after this long.
    Later(Duration),
    /// Not until the owner dials again itself.
    Hold,
}

/// What a dialer is given at start.
pub struct DialerConfig {
    /// Base URLs, in order of preference.
    pub upstreams: Vec<String>,
    /// Spread over the list as this id (an agent's): where in the list it starts (see
    /// [`placement`]), so that a fleet spreads over the nodes it lists. `None`: the first.
    pub spread_as: Option<String>,
    /// Appended to each base URL (empty when the URLs are complete).
    pub path: &'static str,
    /// Largest WebSocket frame accepted.
    pub max_frame: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

pub struct Dialer {
    upstreams: Vec<String>,
    path: &'static str,
    max_frame: usize,
    reconnect_min: Duration,
    /// Where this dialer starts in the upstream list (see [`placement`]).
    start: usize,
    /// Attempts since the start of the list: the current or next one is
    /// `upstreams[(start + current) % len]`.
    current: usize,
    /// Delay before the next attempt; grows with consecutive failures.
    backoff: Backoff,
    state: LinkState,
    conn: ConnId,
    sink: Option<SinkWrite<ws::Message, WsSink>>,
    stream: Option<SpawnHandle>,
    last_heard: Instant,
    connected_to: Option<String>,
    /// The WebSocket ping in flight (its payload and when it went), and the round trip of the
    /// last one answered on this connection.
    ping: Option<(u64, Instant)>,
    next_ping: u64,
    rtt: Option<Duration>,
}

impl Dialer {
    pub fn new(cfg: DialerConfig) -> Self {
        Dialer {
            start: cfg
                .spread_as
                .as_deref()
                .map_or(0, |id| placement(id, cfg.upstreams.len())),
            upstreams: cfg.upstreams,
            path: cfg.path,
            max_frame: cfg.max_frame,
            reconnect_min: cfg.reconnect_min,
            current: 0,
            backoff: Backoff::new(cfg.reconnect_min, cfg.reconnect_max),
            state: LinkState::Idle,
            conn: ConnId(0),
            sink: None,
            stream: None,
            last_heard: Instant::now(),
            connected_to: None,
            ping: None,
            next_ping: 0,
            rtt: None,
        }
    }

    /// Sends a WebSocket ping to measure the link's round trip (see [`Dialer::rtt`]); a ping
    /// still unanswered is replaced. The parent's WebSocket layer answers it, so this times
    /// this hop alone.
    pub fn ping(&mut self) {
        self.next_ping = self.next_ping.wrapping_add(1);
        let payload = self.next_ping;
        if self.write(ws::Message::Ping(payload.to_be_bytes().to_vec().into())) {
            self.ping = Some((payload, Instant::now()));
        }
    }

    /// The round trip of the last ping answered on the current connection, in µs.
    pub fn rtt_us(&self) -> Option<u64> {
        self.rtt
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    /// A pong arrived: the round trip, if it answers the ping in flight.
    fn pong(&mut self, payload: &[u8]) {
        let sent = self
            .ping
            .filter(|(n, _)| n.to_be_bytes().as_slice() == payload);
        if let Some((_, at)) = sent {
            self.rtt = Some(at.elapsed());
            self.ping = None;
        }
    }

    pub fn state(&self) -> LinkState {
        self.state
    }

    pub fn is_ready(&self) -> bool {
        self.state == LinkState::Ready
    }

    /// The current (or last) connection's number.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// The upstream of the open connection.
    pub fn connected_to(&self) -> Option<&str> {
        self.connected_to.as_deref()
    }

    /// The upstreams, starting with the one in use (or tried next).
    pub fn upstreams_in_use_order(&self) -> impl Iterator<Item = &str> {
        let n = self.upstreams.len();
        (0..n).map(move |i| self.upstreams[(self.start + self.current + i) % n].as_str())
    }

    /// How long since anything arrived on the connection.
    pub fn silent_for(&self) -> Duration {
        self.last_heard.elapsed()
    }

    /// The owner's handshake succeeded: the next failure starts the backoff afresh.
    pub fn set_ready(&mut self) {
        self.state = LinkState::Ready;
        self.backoff.reset();
    }

    /// Put a binary message on the wire (dropped when there is no connection).
    pub fn send(&mut self, bytes: Vec<u8>) -> bool {
        self.write(ws::Message::Binary(bytes.into()))
    }

    fn write(&mut self, msg: ws::Message) -> bool {
        match &mut self.sink {
            Some(sink) => sink.write(msg).is_ok(),
            None => false,
        }
    }

    fn url(&self, index: usize) -> String {
        let base = &self.upstreams[index];
        if self.path.is_empty() {
            base.clone()
        } else {
            format!("{}{}", base.trim_end_matches('/'), self.path)
        }
    }
}

/// An actor that keeps one [`Dialer`].
pub trait Dials:
    Actor<Context = Context<Self>> + StreamHandler<Incoming> + WriteHandler<WsProtocolError>
{
    fn dialer(&mut self) -> &mut Dialer;

    /// Whether to dial now (asked before each attempt, and again when it connects).
    fn plan(&self) -> Plan;

    /// A connection opened: begin the handshake (it has [`HANDSHAKE_TIMEOUT`] to succeed).
    fn on_open(&mut self, ctx: &mut Context<Self>);

    /// A whole message of the current connection.
    fn on_message(&mut self, ctx: &mut Context<Self>, bytes: &[u8]);

    /// The current connection is gone: forget what belonged to it.
    fn on_close(&mut self, ctx: &mut Context<Self>);

    /// Start an attempt, unless one is underway or a connection is open.
    fn dial(&mut self, ctx: &mut Context<Self>) {
        let d = self.dialer();
        if d.state != LinkState::Idle {
            return;
        }
        if d.upstreams.is_empty() {
            tracing::error!("no-upstream-configured");
            return;
        }
        let tls = match self.plan() {
            Plan::Dial(tls) => tls,
            Plan::Later(delay) => {
                ctx.run_later(delay, |act, ctx| act.dial(ctx));
                return;
            }
            Plan::Hold => return,
        };
        let d = self.dialer();
        let index = (d.start + d.current) % d.upstreams.len();
        let url = d.url(index);
        let max_frame = d.max_frame;
        d.state = LinkState::Connecting;
        let client = crate::ws_dial::client(tls, HANDSHAKE_TIMEOUT);
        let attempt = async move {
            let connecting = client.ws(url.as_str()).max_frame_size(max_frame).connect();
            let res = connecting.await.map(|(_, framed)| framed);
            (url, res.map_err(|e| e.to_string()))
        };
        ctx.spawn(
            attempt
                .into_actor(self)
                .map(move |(url, res), act, ctx| match res {
                    Ok(framed) => opened(act, ctx, index, framed),
                    Err(reason) => {
                        tracing::warn!(upstream = %url, reason = %reason, "upstream-connect-failed");
                        act.dialer().state = LinkState::Idle;
                        retry_later(act, ctx, None, false);
                    }
                }),
        );
    }

    /// Forget the connection and dial again later (`busy`: the peer's Busy delay, a floor).
    fn hang_up(&mut self, ctx: &mut Context<Self>, busy: Option<Duration>) {
        let d = self.dialer();
        // Once per connection: a broken stream reports many errors, and each must not start
        // its own reconnect (two live connections of one peer would race).
        if d.sink.is_none() && matches!(d.state, LinkState::Idle | LinkState::Connecting) {
            return;
        }
        let was_ready = d.state == LinkState::Ready;
        if let Some(mut sink) = d.sink.take() {
            let _ = sink.write(ws::Message::Close(None));
            // actix-codec's close shuts the socket without writing what is still buffered, so
            // the close (and any error frame before it) gets a moment to be flushed first.
            ctx.run_later(CLOSE_LINGER, move |_, _| sink.close());
        }
        if let Some(h) = d.stream.take() {
            ctx.cancel_future(h);
        }
        d.state = LinkState::Idle;
        d.connected_to = None;
        d.ping = None;
        d.rtt = None;
        self.on_close(ctx);
        retry_later(self, ctx, busy, was_ready);
    }

    /// The peer broke the protocol: drop the connection.
    fn violation(&mut self, ctx: &mut Context<Self>, reason: &str) {
        tracing::warn!(reason, "upstream-protocol-violation");
        self.hang_up(ctx, None);
    }

    /// Hand one item of a connection's stream here.
    fn on_incoming(&mut self, msg: Incoming, ctx: &mut Context<Self>) {
        let d = self.dialer();
        match msg {
            Incoming::Frame(conn, _) | Incoming::Ended(conn)
                if conn != d.conn || d.sink.is_none() => {}
            Incoming::Ended(conn) => {
                tracing::info!(conn = conn.0, "upstream-closed");
                self.hang_up(ctx, None);
            }
            Incoming::Frame(_, Ok(frame)) => {
                d.last_heard = Instant::now();
                match frame {
                    ws::Frame::Binary(b) => self.on_message(ctx, &b),
                    ws::Frame::Text(t) => self.on_message(ctx, &t),
                    ws::Frame::Ping(p) => {
                        d.write(ws::Message::Pong(p));
                    }
                    ws::Frame::Pong(p) => d.pong(&p),
                    ws::Frame::Close(reason) => {
                        tracing::info!(reason = ?reason, "upstream-closed-link");
                        self.hang_up(ctx, None);
                    }
                    ws::Frame::Continuation(_) => self.violation(ctx, "fragmented message"),
                }
            }
            Incoming::Frame(_, Err(e)) => self.violation(ctx, &e.to_string()),
        }
    }
}

/// The Busy delay a `retry_after_ms` asks for, capped.
pub fn busy_delay(retry_after_ms: u64) -> Duration {
    Duration::from_millis(retry_after_ms).min(MAX_BUSY_DELAY)
}

fn opened<A: Dials>(
    act: &mut A,
    ctx: &mut Context<A>,
    index: usize,
    framed: Framed<BoxedSocket, ws::Codec>,
) {
    // Told to hold while the attempt ran (a relay draining for a re-exec): let it go.
    if matches!(act.plan(), Plan::Hold) {
        act.dialer().state = LinkState::Idle;
        return;
    }
    let d = act.dialer();
    d.conn = ConnId(d.conn.0 + 1);
    let conn = d.conn;
    let (sink, stream) = framed.split();
    d.sink = Some(SinkWrite::new(sink, ctx));
    let frames =
        stream
            .map(move |item| Incoming::Frame(conn, item))
            .chain(futures_util::stream::once(
                async move { Incoming::Ended(conn) },
            ));
    d.stream = Some(ctx.add_stream(frames));
    d.state = LinkState::Handshaking;
    d.last_heard = Instant::now();
    let upstream = d.upstreams[index].clone();
    tracing::info!(upstream = %upstream, conn = conn.0, "upstream-connected");
    d.connected_to = Some(upstream);
    ctx.run_later(HANDSHAKE_TIMEOUT, move |act, ctx| {
        let d = act.dialer();
        if d.conn == conn && d.state == LinkState::Handshaking {
            tracing::warn!(conn = conn.0, "upstream-handshake-timeout");
            act.hang_up(ctx, None);
        }
    });
    act.on_open(ctx);
}

/// Where in a list of `upstreams` the dialer of `owner` starts (and starts again after a
/// session that worked): a stable hash of its id, so that agents and relays listing the same
/// nodes spread over them rather than all choosing the first, and each keeps to the same one.
pub fn placement(owner: &str, upstreams: usize) -> usize {
    // FNV-1a: stable across releases and platforms (unlike the standard library's hasher).
    let hash = owner.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    usize::try_from(hash % u64::try_from(upstreams.max(1)).unwrap_or(1)).unwrap_or(0)
}

/// Where and when the next attempt goes (sans-IO): the first upstream again after a session that
/// worked, the next one after a failure. Within a round over the list the next upstream is
/// tried after at most the first delay (a standby node or a relay that is down should not make
/// the others wait); the backoff grows once per round in which every upstream failed, so a
/// fleet whose every upstream is away still backs off, and a one-upstream list behaves as a
/// plain backoff.
fn next_attempt<R: rand::Rng + ?Sized>(
    current: &mut usize,
    upstreams: usize,
    backoff: &mut Backoff,
    was_ready: bool,
    rng: &mut R,
) -> Duration {
    if was_ready {
        *current = 0;
        backoff.reset();
        return backoff.next_delay(rng);
    }
    *current = current.wrapping_add(1);
    if current.is_multiple_of(upstreams.max(1)) {
        return backoff.next_delay(rng);
    }
    let first = u64::try_from(backoff.min().as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rng.gen_range(0..=first))
}

/// Schedule the next attempt (see [`next_attempt`]).
fn retry_later<A: Dials>(
    act: &mut A,
    ctx: &mut Context<A>,
    busy: Option<Duration>,
    was_ready: bool,
) {
    let d = act.dialer();
    let drawn = next_attempt(
        &mut d.current,
        d.upstreams.len(),
        &mut d.backoff,
        was_ready,
        &mut rand::thread_rng(),
    );
    // A Busy delay is a floor: it spreads a reconnect storm.
    let delay = busy.map_or(drawn, |b| b + drawn.min(d.reconnect_min));
    tracing::debug!(
        delay_ms = delay.as_millis() as u64,
        attempt = d.backoff.attempt(),
        "reconnect-scheduled"
    );
    ctx.run_later(delay, |act, ctx| act.dial(ctx));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_spreads_over_the_upstreams_it_lists_and_each_keeps_to_its_own() {
        let mut per_node = [0usize; 3];
        for i in 0..3000 {
            let owner = format!("a-{i:016x}");
            let at = placement(&owner, 3);
            assert_eq!(at, placement(&owner, 3), "stable");
            per_node[at] += 1;
        }
        assert!(
            per_node.iter().all(|n| (800..=1200).contains(n)),
            "{per_node:?}"
        );
        assert_eq!(placement("a-1", 1), 0);
        assert_eq!(placement("a-1", 0), 0, "no upstream: no division by zero");
        // Known values: the placement of an id never changes between releases.
        assert_eq!(placement("", 7), (0xcbf2_9ce4_8422_2325_u64 % 7) as usize);
    }

    #[test]
    fn the_backoff_grows_once_per_round_in_which_every_upstream_failed() {
        let (min, max) = (Duration::from_millis(200), Duration::from_secs(30));
        let mut backoff = Backoff::new(min, max);
        let mut rng = rand::thread_rng();
        let mut current = 0;
        for round in 0..4u32 {
            // Two more upstreams to try in this round: each after at most the first delay.
            for next in 1..3 {
                assert!(next_attempt(&mut current, 3, &mut backoff, false, &mut rng) <= min);
                assert_eq!(current % 3, next);
            }
            // The round is over: back to the first, after the round's backoff.
            let ceiling = backoff.ceiling();
            assert_eq!(ceiling, min * 2u32.pow(round));
            assert!(next_attempt(&mut current, 3, &mut backoff, false, &mut rng) <= ceiling);
            assert_eq!(current % 3, 0);
        }
        // A session that worked starts over from the first upstream and the first delay.
        current = 2;
        assert!(next_attempt(&mut current, 3, &mut backoff, true, &mut rng) <= min);
        assert_eq!((current, backoff.ceiling()), (0, min * 2));
    }

    #[test]
    fn one_upstream_backs_off_on_every_failure() {
        let (min, max) = (Duration::from_millis(200), Duration::from_secs(30));
        let mut backoff = Backoff::new(min, max);
        let mut current = 0;
        for failure in 0..5u32 {
            assert_eq!(backoff.ceiling(), (min * 2u32.pow(failure)).min(max));
            next_attempt(
                &mut current,
                1,
                &mut backoff,
                false,
                &mut rand::thread_rng(),
            );
        }
    }
}
