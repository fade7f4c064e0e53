//! Commands the active node writes straight into the stream of an agent a member serves (see
//! `docs/cluster.md`, "Every node serves agents"), instead of the mailbox: the member then
//! only reads them and sends them, with no commit of its own on a command's way.
//!
//! - At each handshake on a member whose active node says it writes them
//!   (`crate::mail::ACTIVE_APPENDS`), the member raises the claim on the session's stream
//!   ([`crate::mail::out_claim`]), reads what the active node wrote before, and greets the
//!   active node with that claim's epoch ([`Greeting::appends`]). From the greeting's commit
//!   on, it takes no more mail for the session.
//! - The active node, having taken the greeting, reads where the stream ends (once every commit
//!   of its own before has landed), numbers the mail still waiting into it, and from then on
//!   appends every command itself ([`Direct`]), under both claims of the member (on the agent,
//!   and on the session's stream), with the agent's bell (`crate::mail::bell_key`) in the same
//!   commit. A newer session anywhere raises one of the two: the active node's writes for the
//!   older one write nothing, its link is rebuilt, and it waits for the next greeting (the
//!   mailbox meanwhile).
//! - The member hears the bell (a hint, with the stream's records read in the same look; or
//!   the bounded look at every mailbox row), reads the records after the last it holds, and
//!   sends them. It still trims the stream as the agent acknowledges.
//! - Mail that stays in the mailbox of an agent whose stream the active node writes (it went
//!   there before the active node took the greeting, and the active node is slow or stopped;
//!   its link was read again; another node took over) makes the member take the stream back,
//!   as at a handshake: it raises the claim on the stream again, numbers the mail, and greets
//!   the active node again (`AgentLink::retake`).

use std::time::{Duration, Instant};

use actix::prelude::*;
use tether_shared::journal::{Fence, JournalError, JournalHandle, LogName, Op, Record};
use tether_shared::protocol::{Command, Seq};

use super::{AgentLink, AgentLinkError};
use crate::mail::{self, Greeting};
use crate::session::now_ms;

/// Records read at most per read of a stream's tail.
const TAIL_PAGE: usize = 1024;
/// How long mail may wait in the mailbox of an agent whose stream the active node writes
/// before the member greets the active node again.
const STRAY_MAIL_GRACE: Duration = Duration::from_secs(1);

/// On the active node: the stream of an agent a member serves, which this node writes into.
#[derive(Debug, Clone)]
pub(super) struct Direct {
    /// The member's claims: on the session's stream, and on the agent.
    pub fence: Fence,
    /// The seq of the next command.
    next: Seq,
    /// The agent's acknowledgement as last read (the stream holds at most the stream's bound
    /// of commands past it).
    acked: Seq,
}

/// The fence of the active node's writes into the stream a member's `greeting` (of `agent`)
/// stands for, if the member takes them.
pub(super) fn fence_of(agent: &tether_shared::ids::AgentId, greeting: &Greeting) -> Option<Fence> {
    let epoch = greeting.appends?;
    Some(Fence {
        claim: mail::out_claim(agent),
        epoch,
        also: Some((agent.to_string(), greeting.claim_epoch)),
    })
}

/// The agent's acknowledgement of its stream, as stored (see `StreamKeys::acked_ops`).
fn acked_in(journal: &JournalHandle, key: &str) -> Result<Seq, JournalError> {
    Ok(journal
        .get_meta(key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(Seq::ZERO, |b| Seq(u64::from_be_bytes(b))))
}

/// The records of `log` after `after`, in pages, up to `most`.
pub(super) async fn read_tail(
    journal: JournalHandle,
    log: LogName,
    mut after: Seq,
    most: usize,
) -> Result<Vec<Record>, JournalError> {
    let mut out: Vec<Record> = Vec::new();
    loop {
        let page = journal
            .read_meta_and_logs_async(&[], &[(log.clone(), after)], TAIL_PAGE, usize::MAX)
            .await?;
        let n = page.records.len();
        out.extend(page.records.into_iter().map(|(_, r)| r));
        match out.last() {
            Some(last) if n >= TAIL_PAGE && out.len() < most => after = last.seq,
            _ => return Ok(out),
        }
    }
}

impl AgentLink {
    /// On the active node: appends `command` to the stream of the agent a member serves
    /// (see [`Direct`]), with the agent's bell; refused while the stream holds as many
    /// commands past the agent's acknowledgement as it may.
    pub(super) fn append_direct(
        &mut self,
        mut command: Command,
        ops: &mut Vec<Op>,
    ) -> Result<Seq, AgentLinkError> {
        self.direct_room(1)?;
        let Some(direct) = self.direct.as_mut() else {
            return Err(AgentLinkError::Internal("no stream to write".into()));
        };
        command.seq = direct.next;
        direct.next = direct
            .next
            .next()
            .ok_or(tether_shared::stream::StreamError::SeqExhausted)?;
        let epoch = direct.fence.epoch;
        self.append_op(&command, ops)?;
        ops.push(Op::PutMeta {
            key: mail::bell_key(&self.agent_id),
            value: mail::bell_value(epoch, command.seq),
        });
        self.remote_writes = true;
        Ok(Seq::ZERO)
    }

    /// On the active node: whether `n` more commands fit in the stream it writes (see
    /// [`Direct`]), past the agent's acknowledgement (read again when they seem not to).
    pub(super) fn direct_room(&mut self, n: usize) -> Result<(), AgentLinkError> {
        let limit = self.shared.max_retained as u64;
        let Some(direct) = self.direct.as_mut() else {
            return Ok(());
        };
        let past = |d: &Direct| (d.next.0 + n as u64).saturating_sub(d.acked.0 + 1);
        if past(direct) > limit {
            // Read again now and then: what the agent acknowledged since is gone.
            direct.acked = acked_in(&self.shared.journal, &self.keys.out_acked)?;
            if past(direct) > limit {
                return Err(tether_shared::stream::StreamError::Backlog {
                    in_flight: usize::try_from(past(direct)).unwrap_or(usize::MAX),
                    limit: self.shared.max_retained,
                }
                .into());
            }
        }
        Ok(())
    }

    /// The next seq of the stream this node writes, to go back to if the commands numbered
    /// after it are not committed (see [`Self::rewind_direct`]).
    pub(super) fn direct_next(&self) -> Option<Seq> {
        self.direct.as_ref().map(|d| d.next)
    }

    /// Numbers handed out since `next` (see [`Self::direct_next`]) are free again: their
    /// commands were dropped before any commit.
    pub(super) fn rewind_direct(&mut self, next: Option<Seq>) {
        if let (Some(direct), Some(next)) = (self.direct.as_mut(), next) {
            direct.next = next;
        }
    }

    /// On the active node, after it took a member's greeting that says the member takes no
    /// more mail for the session (`fence`): once every commit of this link before has landed,
    /// with nothing else of the link running meanwhile, reads where the stream ends and the
    /// mail still waiting, numbers that mail into the stream, and writes every later command
    /// there. If the read fails, commands keep going to the mailbox (the member greets again
    /// when it finds them there).
    pub(super) fn go_direct(&mut self, ctx: &mut Context<Self>, fence: Fence) {
        let landed = self.shared.journal.commit(Vec::new());
        let journal = self.shared.journal.clone();
        let (log, acked_key) = (self.keys.out_log.clone(), self.keys.out_acked.clone());
        let prefix = mail::agent_prefix(mail::MAILBOX_PREFIX, &self.agent_id);
        let read = async move {
            let _ = landed.await;
            actix_web::web::block(move || -> Result<_, JournalError> {
                // The last record first: the member's acks remove records from the front and
                // raise the mark after them, so the mark read second covers any record gone
                // meanwhile (and nothing is appended meanwhile: this node alone appends, and
                // waits for this).
                let last = journal.last_seq(&log)?;
                let acked = acked_in(&journal, &acked_key)?;
                let mail = journal.scan_meta(&prefix)?;
                Ok((acked, last, mail))
            })
            .await
        };
        ctx.wait(read.into_actor(self).map(move |read, act, ctx| {
            let (acked, last, waiting) = match read {
                Ok(Ok(read)) => read,
                Ok(Err(e)) => {
                    tracing::warn!(agent_id = %act.agent_id, error = %e, "agent-stream-not-read");
                    return;
                }
                Err(_) => return,
            };
            if !act.remote() {
                // The agent came here meanwhile.
                return;
            }
            let Some(next) = last.unwrap_or(acked).max(acked).next() else {
                return;
            };
            tracing::info!(agent_id = %act.agent_id, epoch = fence.epoch, seq = next.0, "agent-stream-written-here");
            act.direct = Some(Direct {
                fence,
                next,
                acked,
            });
            let mut ops = Vec::new();
            let mut converted = true;
            for (key, bytes) in waiting {
                match serde_json::from_slice::<mail::Mail>(&bytes) {
                    Ok(m)
                        if !m.incarnation.is_empty()
                            && act.remote_incarnation.as_deref() != Some(m.incarnation.as_str()) =>
                    {
                        tracing::warn!(agent_id = %act.agent_id, key = %key, incarnation = %m.incarnation, "mail-for-a-lost-incarnation-dropped");
                    }
                    Ok(mail::Mail { command, .. }) => {
                        if let Err(e) = act.append_direct(command, &mut ops) {
                            // Left in the mailbox, and so is every later command, in order:
                            // the member greets again when it finds them.
                            tracing::error!(agent_id = %act.agent_id, key = %key, error = %e, "mail-not-numbered");
                            converted = false;
                            break;
                        }
                    }
                    Err(_) => {
                        tracing::error!(agent_id = %act.agent_id, key = %key, "mail-unreadable-dropped")
                    }
                }
                ops.push(Op::DeleteMeta { key });
            }
            if !ops.is_empty() {
                act.commit_then(ctx, ops, |_, _| {});
            }
            if !converted {
                act.direct = None;
            }
        }));
    }

    /// Whether commits this node made into the stream of an agent a member serves are still
    /// unanswered (one may yet be refused: see [`Direct`]).
    pub(super) fn direct_commits_pending(&self) -> bool {
        self.direct_in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    }

    /// On a member: takes the records the active node wrote into the agent's stream that follow
    /// the last one held (those held already are skipped), and sends them. One that does not
    /// fit yet is read again once the agent acknowledged more.
    pub(super) fn adopt(&mut self, records: Vec<Record>) {
        self.take_records(records);
        self.pump();
    }

    /// [`Self::adopt`], without sending (at a handshake, before the stream's is done).
    pub(super) fn take_records(&mut self, records: Vec<Record>) {
        let now = now_ms();
        for r in records {
            if r.seq <= self.ep.outbound.assigned() {
                continue;
            }
            if !self.ep.outbound.adopt(r.seq, r.payload, now) {
                self.tail_behind = true;
                break;
            }
        }
    }

    /// On a member: reads the records of the agent's stream after the last one held, and takes
    /// them ([`Self::adopt`]); one read at a time (a read asked meanwhile follows it).
    pub(super) fn follow(&mut self, ctx: &mut Context<Self>) {
        if self.following {
            self.follow_again = true;
            return;
        }
        self.following = true;
        self.tail_behind = false;
        let read = read_tail(
            self.shared.journal.clone(),
            self.keys.out_log.clone(),
            self.ep.outbound.assigned(),
            self.shared.max_retained,
        );
        let (session, started) = (self.handshakes, Instant::now());
        ctx.spawn(read.into_actor(self).map(move |read, act, ctx| {
            act.following = false;
            match read {
                // Read before a handshake since (which may have started the stream over).
                Ok(_)
                    if act.handshakes != session
                        || act.handshake_done.is_some_and(|at| started < at) =>
                {
                    act.follow_again = true
                }
                Ok(records) => act.adopt(records),
                Err(e) => {
                    tracing::warn!(agent_id = %act.agent_id, error = %e, "agent-stream-not-read");
                    act.tail_behind = true;
                }
            }
            if std::mem::take(&mut act.follow_again) {
                act.follow(ctx);
            }
        }));
    }

    /// On a member whose active node writes the agent's stream: what a look at the mailbox
    /// found (`entries`, and the stream's `records` read with them).
    pub(super) fn followed(
        &mut self,
        ctx: &mut Context<Self>,
        entries: Vec<(String, Vec<u8>)>,
        records: Vec<Record>,
        read_at: Instant,
    ) {
        let mut rung = None;
        let mut stray = false;
        for (key, value) in &entries {
            match mail::is_bell(key) {
                true => rung = rung.max(mail::bell_seq(value)),
                false => stray = true,
            }
        }
        match self.handshake_done.is_some_and(|at| read_at < at) {
            // Read before this session's handshake (which may have started the stream over):
            // read again.
            true => self.tail_behind = true,
            false => self.adopt(records),
        }
        if self.tail_behind || rung.is_some_and(|seq| seq > self.ep.outbound.assigned()) {
            self.follow(ctx);
        }
        self.stray_mail(ctx, stray);
    }

    /// On a member whose active node writes the agent's stream, each look at the mailbox: mail
    /// that waits there past [`STRAY_MAIL_GRACE`] went there after the session's note (the
    /// active node had not taken the note yet, and is slow or stopped; its link was read again;
    /// or another node took over). The member takes the stream back ([`Self::retake`]).
    fn stray_mail(&mut self, ctx: &mut Context<Self>, stray: bool) {
        if !stray {
            self.stray_since = None;
            return;
        }
        let since = *self.stray_since.get_or_insert_with(Instant::now);
        if since.elapsed() < STRAY_MAIL_GRACE || self.inbox_full() {
            return;
        }
        self.stray_since = None;
        tracing::warn!(agent_id = %self.agent_id, "mail-waits-stream-taken-back");
        self.retake(ctx);
    }

    /// On a member: as at a handshake, without one. The claim on the session's stream is raised
    /// (what the active node would write for it from then on writes nothing), what it wrote
    /// before is read, the mail waiting is numbered into the stream, and the active node is
    /// greeted again, in that commit, with the new claim (if it writes streams: it then takes
    /// the stream from there; if not, this member numbers the mail from now on). Nothing else
    /// of the link runs meanwhile.
    pub(super) fn retake(&mut self, ctx: &mut Context<Self>) {
        let Some(claims) = self.shared.claims.clone() else {
            return;
        };
        if self.session.is_none() || self.fence.is_none() {
            return;
        }
        let raising = claims.raise(&mail::out_claim(&self.agent_id));
        let (journal, log) = (self.shared.journal.clone(), self.keys.out_log.clone());
        let (after, most) = (self.ep.outbound.assigned(), self.shared.max_retained);
        let read = async move {
            let out = raising.await?;
            let records = read_tail(journal, log, after, most).await?;
            Ok::<_, JournalError>((out, records))
        };
        ctx.wait(read.into_actor(self).map(|read, act, ctx| {
            let (out, records) = match read {
                Ok(read) => read,
                Err(e) => {
                    tracing::warn!(agent_id = %act.agent_id, error = %e, "stream-not-taken-back");
                    return;
                }
            };
            if act.session.is_none() {
                return;
            }
            act.take_records(records);
            if act.tail_behind {
                // Not all of what the active node wrote is held yet: no mail is numbered
                // after it (taken back again at the next look that finds mail waiting).
                return;
            }
            act.out_fence = Some(out).filter(|_| act.appends());
            let Some(mut greeting) = act.greeting.clone() else {
                return;
            };
            greeting.appends = act.out_fence.as_ref().map(|f| f.epoch);
            let Ok(value) = serde_json::to_vec(&greeting) else {
                return;
            };
            act.greeting = Some(greeting);
            let (mut ops, last) = act.take_mail(act.mail_now());
            ops.push(Op::PutMeta {
                key: act.inbox_key(mail::Kind::Greeting),
                value,
            });
            // From this commit on, mail is the active node's to take (if it writes streams).
            act.direct_out = act.out_fence.is_some();
            act.commit_then(ctx, ops, move |act, _| {
                if let Some(last) = last {
                    act.ep.outbound.mark_durable(last);
                }
                act.pump();
            });
        }));
    }

    /// On a member: the agent's last greeting, in the inbox again.
    pub(super) fn greet_again(&mut self, ctx: &mut Context<Self>) {
        let Some(greeting) = self.greeting.clone() else {
            return;
        };
        if !self.shared.member || self.session.is_none() || self.fence.is_none() {
            return;
        }
        let Ok(value) = serde_json::to_vec(&greeting) else {
            return;
        };
        let key = self.inbox_key(mail::Kind::Greeting);
        self.commit_then(ctx, vec![Op::PutMeta { key, value }], |_, _| {});
    }
}
