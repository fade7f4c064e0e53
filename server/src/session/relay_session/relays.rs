//! The relays a relay's link carries (itself and child relays on its channels): the commands
//! the server pushes to them (an upgrade, a certificate, the trust set) and the events they
//! answer with.

use super::*;
use tether_shared::journal::Op;

/// Ask a link to send relay `relay_id` (itself or a child on one of its channels) its
/// in-progress upgrade command.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PushRelayUpgrade {
    pub relay_id: RelayId,
}

impl Handler<PushRelayUpgrade> for RelaySession {
    type Result = ();

    fn handle(&mut self, msg: PushRelayUpgrade, ctx: &mut Self::Context) {
        if !self.closing {
            self.push_upgrade(ctx, &msg.relay_id);
        }
    }
}

/// The only events a relay sends about itself: its upgrades' and the trust set's (anything
/// else on its own channel is a protocol violation).
pub(super) fn is_relay_event(body: &EventBody) -> bool {
    matches!(
        body,
        EventBody::UpgradeStarted { .. }
            | EventBody::UpgradeStaged { .. }
            | EventBody::UpgradeRefused { .. }
            | EventBody::UpgradeFinished { .. }
            | EventBody::TrustApplied { .. }
            | EventBody::TrustRefused { .. }
    )
}

/// How long a relay's command stays valid (it is re-sent at every connect anyway).
const RELAY_COMMAND_TTL_MS: u64 = 60 * 60 * 1000;

/// The signed `Upgrade` command for `relay_id`'s in-progress rollout, if it has one.
pub(super) fn relay_upgrade_command(shared: &SessionShared, relay_id: &str) -> Option<Frame> {
    let state = shared.upgrades.relay(relay_id)?;
    if !state.state.in_progress() {
        return None;
    }
    let Some(p) = shared
        .upgrades
        .component_package(Component::Relay, &state.version)
    else {
        tracing::warn!(relay_id = %relay_id, version = %state.version, "relay-upgrade-package-missing");
        return None;
    };
    // Signed now, by the key in force (it may have changed since the upload).
    let signature = shared.trust.sign(&component_signing_bytes(
        Component::Relay,
        &p.version,
        &p.sha256,
    ));
    let body = CommandBody::Upgrade {
        version: p.version,
        sha256: p.sha256,
        size: p.size,
        signature,
    };
    // Every command of one rollout has the rollout's id: the relay re-reports a rollout it
    // rolled back instead of trying it again, but tries a new rollout of the same version.
    let id = if state.rollout_id.is_empty() {
        hex::encode(rand::random::<[u8; 12]>())
    } else {
        state.rollout_id.clone()
    };
    relay_command(shared, relay_id, id, body)
}

/// A command for relay `relay_id` on its own channel, signed, valid for an hour (relays keep
/// no journal: what they miss is sent again at their next connect).
pub(super) fn relay_command(
    shared: &SessionShared,
    relay_id: &str,
    id: String,
    body: CommandBody,
) -> Option<Frame> {
    let deadline = now_ms() + RELAY_COMMAND_TTL_MS;
    let signed = command_signing_bytes(relay_id, &id, deadline, &body).ok()?;
    let mut command = Command::new(Seq(1), id, deadline, body).ok()?;
    command.signature = shared.trust.sign(&signed);
    Some(Frame::Command(command))
}

/// Relay `relay_id`'s certificate `pem`, as a command for it.
pub(super) fn certificate_command(
    shared: &SessionShared,
    relay_id: &str,
    pem: String,
) -> Option<Frame> {
    let body = CommandBody::RelayCertificate { certificate: pem };
    relay_command(
        shared,
        relay_id,
        hex::encode(rand::random::<[u8; 12]>()),
        body,
    )
}

/// The trust set in force, as a command for relay `relay_id`.
pub(super) fn trust_command(shared: &SessionShared, relay_id: &str) -> Option<Frame> {
    let body = CommandBody::Trust {
        set: shared.trust.set(),
    };
    relay_command(
        shared,
        relay_id,
        hex::encode(rand::random::<[u8; 12]>()),
        body,
    )
}

/// What an event relay `relay_id` reported about itself changes: the trust set it holds
/// (recorded at once), or its upgrade's state (the op to commit).
pub(super) fn relay_event_effect(
    shared: &SessionShared,
    relay_id: &str,
    event: &Event,
) -> Option<Op> {
    match &event.body {
        EventBody::TrustApplied { serial } => {
            tracing::info!(relay_id = %relay_id, serial, "relay-trust-applied");
            record_trust_serial(shared, relay_id, *serial);
            return None;
        }
        EventBody::TrustRefused { serial, reason } => {
            let reason: String = reason.chars().take(200).collect();
            tracing::warn!(relay_id = %relay_id, serial, reason = %reason, "relay-trust-refused");
            return None;
        }
        _ => {}
    }
    let op = shared.upgrades.on_relay_event(relay_id, &event.body);
    if op.is_none() {
        tracing::debug!(relay_id = %relay_id, seq = event.seq.0, "relay-event-ignored");
    }
    op
}

/// Tells `relay_id`, if it is connected (directly or through other relays), about its
/// in-progress upgrade. `true` if a link was asked to.
pub fn push_relay_upgrade(shared: &SessionShared, relay_id: &RelayId) -> bool {
    if let Some(node) = shared.served_elsewhere(relay_id) {
        // A member serves it: the command goes through its mailbox.
        if let Some(frame) = relay_upgrade_command(shared, relay_id) {
            let mailed = super::remote::mail(shared, relay_id, vec![frame]);
            actix_rt::spawn(async move {
                mailed.await;
            });
        }
        tracing::debug!(relay_id = %relay_id, node = %node, "relay-upgrade-command-mailed");
        return true;
    }
    let Some(path) = shared.presence.online_path(relay_id) else {
        return false;
    };
    // The link that carries it is the one of the relay nearest the server on its path.
    let holder = path.last().map_or(relay_id.as_str(), String::as_str);
    match shared.presence.relay_link(holder) {
        Some(link) => {
            link.do_send(PushRelayUpgrade {
                relay_id: relay_id.to_owned(),
            });
            true
        }
        None => false,
    }
}

impl RelaySession {
    /// The channel `relay_id` is on: this link's own relay, or a child relay on one of its
    /// channels.
    pub(super) fn relay_channel(&self, relay_id: &str) -> Option<u32> {
        if self.relay_id.as_deref() == Some(relay_id) {
            return Some(LINK_CHANNEL);
        }
        self.channels.iter().find_map(|(ch, c)| match c.relay_id() {
            Some(r) if r == relay_id => Some(*ch),
            _ => None,
        })
    }

    /// Closes relay `relay_id`'s connection: this link if it is the link's own relay, else its
    /// channel (the link and its other channels stay).
    pub(super) fn refuse_relay(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        relay_id: &str,
        code: CloseCode,
        reason: &str,
    ) {
        match self.relay_channel(relay_id) {
            Some(LINK_CHANNEL) => self.refuse(ctx, code, ErrorCode::Overloaded, reason),
            Some(ch) => self.refuse_channel(ctx, ch, code, ErrorCode::Overloaded, reason),
            None => {}
        }
    }

    /// Sends `relay_id` (this link's relay or a child relay on one of its channels) the
    /// `Upgrade` command of its rollout, if one is in progress: relays keep no journal, so this
    /// runs at every (re)connect and at rollout.
    pub(super) fn push_upgrade(&mut self, ctx: &mut ws::WebsocketContext<Self>, relay_id: &str) {
        let Some(frame) = relay_upgrade_command(&self.shared, relay_id) else {
            return;
        };
        match self.relay_channel(relay_id) {
            Some(ch) => {
                tracing::info!(relay_id = %relay_id, ch, "relay-upgrade-command-sent");
                self.send_on(ctx, ch, &frame);
            }
            None => tracing::debug!(relay_id = %relay_id, "relay-upgrade-command-no-channel"),
        }
    }

    /// Sends `relay_id` its certificate: at connect (`always`) the current one, so a renewal
    /// it missed reaches it; at each beat only one renewed just now.
    pub(super) fn push_certificate(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        relay_id: &str,
        always: bool,
    ) {
        let certs = self.shared.relay_certs.clone();
        let relay = relay_id.to_owned();
        ctx.spawn(
            async move { certs.current(&relay).await.map(|c| (relay, c)) }
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok((relay_id, Some(current))) if always || current.renewed => {
                        let Some(frame) =
                            certificate_command(&act.shared, &relay_id, current.pem)
                        else {
                            return;
                        };
                        if let Some(ch) = act.relay_channel(&relay_id) {
                            tracing::info!(relay_id = %relay_id, ch, renewed = current.renewed, "relay-certificate-sent");
                            act.send_on(ctx, ch, &frame);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "relay-certificate-renewal-failed"),
                }),
        );
    }

    /// Sends `relay_id` the trust set in force if it holds an older one: `held` is what its
    /// Hello said at connect (recorded), else what it last confirmed. At each beat until it
    /// confirms, as relays keep no journal.
    pub(super) fn push_trust(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        relay_id: &str,
        held: Option<u64>,
    ) {
        if let Some(serial) = held {
            record_trust_serial(&self.shared, relay_id, serial);
        }
        let held = held.unwrap_or_else(|| self.shared.registry.trust_serial(relay_id));
        if held >= self.shared.trust.rotation().serial {
            return;
        }
        let Some(frame) = trust_command(&self.shared, relay_id) else {
            return;
        };
        if let Some(ch) = self.relay_channel(relay_id) {
            tracing::info!(relay_id = %relay_id, ch, held, "relay-trust-sent");
            self.send_on(ctx, ch, &frame);
        }
    }

    /// An event a relay reports about itself (its upgrades, its trust): its state changes in
    /// the journal.
    pub(super) fn on_relay_event(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        relay_id: &str,
        event: &Event,
        frame: &[u8],
    ) {
        if self.shared.member {
            // The active node keeps the relays' state.
            return self.member_event(ctx, relay_id, frame);
        }
        let Some(op) = relay_event_effect(&self.shared, relay_id, event) else {
            return;
        };
        let journal = self.shared.journal.clone();
        let relay_id = relay_id.to_owned();
        ctx.spawn(
            async move {
                if let Err(e) = journal.commit(vec![op]).await {
                    tracing::error!(relay_id = %relay_id, error = %e, "relay-upgrade-state-commit-failed");
                }
            }
            .into_actor(self),
        );
    }

    /// A child relay's own channel, after its welcome: heartbeats only.
    pub(super) fn on_relay_frame(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        ch: u32,
        relay_id: &str,
        frame: &[u8],
    ) {
        match protocol::decode(frame, Sender::Agent) {
            Ok(Frame::Heartbeat(hb)) => self.on_relay_heartbeat(ctx, relay_id, hb),
            Ok(Frame::Event(event)) if is_relay_event(&event.body) => {
                self.on_relay_event(ctx, relay_id, &event, frame)
            }
            Ok(Frame::Error(_)) => {}
            Ok(other) => {
                let reason = format!("unexpected {} frame on a relay channel", other.kind());
                self.refuse_channel(
                    ctx,
                    ch,
                    CloseCode::Refused,
                    ErrorCode::ProtocolViolation,
                    &reason,
                );
            }
            Err(e) => self.refuse_channel(
                ctx,
                ch,
                e.close_code(),
                e.to_error_frame().code,
                &e.to_string(),
            ),
        }
    }

    /// A relay's heartbeat (this link's, or a child's): it was heard from, with its status.
    pub(super) fn on_relay_heartbeat(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        relay_id: &str,
        hb: Heartbeat,
    ) {
        if self.shared.member {
            if let Some(status) = &hb.status {
                self.member_status(ctx, relay_id, status);
            }
        }
        self.shared.presence.touch(relay_id, hb.status);
    }

    pub(super) fn child_relay_ready(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        ch: u32,
        hello: Hello,
        version: &str,
    ) {
        let (relay_id, trust_serial) = (hello.agent_id.clone(), hello.trust_serial);
        let Some(channel) = self.channels.get_mut(&ch) else {
            return;
        };
        if channel.path.contains(&relay_id) {
            // Never online through this channel: closing it must not mark the relay offline.
            channel.greeting.close();
            return self.refuse_channel(
                ctx,
                ch,
                CloseCode::Refused,
                ErrorCode::ProtocolViolation,
                "relay loop",
            );
        }
        uncount(&self.shared, &mut self.handshaking, channel);
        let path = channel.path.clone();
        if let Some(older) = self.relay_channel(&relay_id).filter(|c| *c != ch) {
            // Ready on another channel of this link already: the newest wins.
            self.refuse_channel(
                ctx,
                older,
                CloseCode::Replaced,
                ErrorCode::Overloaded,
                "replaced by a newer channel",
            );
        }
        self.shared
            .presence
            .set_online(&relay_id, version, path.clone());
        tracing::info!(relay_id = %relay_id, ch, path = ?path, "relay-online");
        let welcome = self.welcome();
        self.send_on(ctx, ch, &welcome);
        self.tend_on_connect(ctx, &hello, version, &path, trust_serial);
    }

    /// Relay `hello.agent_id` (this link's, or a child's) just connected: it gets its upgrade,
    /// its certificate and the trust set from here, or on a member from the active node
    /// (through its mailbox).
    pub(super) fn tend_on_connect(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        hello: &Hello,
        version: &str,
        path: &[String],
        trust_serial: u64,
    ) {
        let relay_id = &hello.agent_id;
        if self.shared.member {
            if self.shared.drained.load(Ordering::Relaxed) {
                // Drained while its handshake was under way: it goes to its next upstream.
                let reason = "this node was drained: connect to another node";
                return self.refuse_relay(ctx, relay_id, CloseCode::GoingAway, reason);
            }
            return self.member_greet(ctx, hello, version, path);
        }
        let claiming = self.shared.has_members
            && self
                .shared
                .relay_claims
                .row_allowed(relay_id, crate::mail::Kind::Greeting);
        if let (true, Some(claims)) = (claiming, self.shared.claims.clone()) {
            // Claimed here too, so that what a member that served it before still writes for
            // it is refused, and so that its handshakes there are told apart in time.
            let (shared, relay) = (self.shared.clone(), relay_id.clone());
            let claim = claims.claim(&tether_shared::ids::AgentId::new(relay_id.as_str()), None);
            actix_rt::spawn(async move {
                match claim.await {
                    Ok(fence) => shared.relay_claims.claimed_here(&relay, fence.epoch),
                    Err(e) => tracing::warn!(relay_id = %relay, error = %e, "relay-not-claimed"),
                }
            });
        }
        self.push_upgrade(ctx, relay_id);
        self.push_certificate(ctx, relay_id, true);
        self.push_trust(ctx, relay_id, Some(trust_serial));
    }
}
