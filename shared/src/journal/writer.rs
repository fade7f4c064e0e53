//! The group-commit writer: two threads per journal that own every write to the store.
//!
//! The *applier* blocks for the first queued request, takes every other request already queued
//! (up to a bound), applies them all as one atomic batch, and hands their reply channels to the
//! *flusher*. The flusher takes every applied batch waiting for it, makes them durable with one
//! flush and one `fdatasync`, and only then answers each request. While one sync waits for the
//! disk, the next batch is already being applied, so the CPU work and the disk wait overlap.
//! No answer (and so no ack on the wire) ever precedes the sync that makes it durable: a sync
//! only answers batches whose apply finished before it began.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Longest a sync waits for commits that are already being applied.
const MAX_GATHER: Duration = Duration::from_millis(2);

use tokio::sync::{mpsc, oneshot};

use crate::journal::store::{Fence, Fenced, Store};
use crate::journal::{JournalError, Op};

type Reply = oneshot::Sender<Result<Committed, JournalError>>;

/// A batch of operations waiting for its commit.
pub(crate) struct Request {
    pub ops: Vec<Op>,
    /// Written only while this claim holds (see [`Fence`]).
    pub fence: Option<Fence>,
    pub reply: Reply,
}

/// Proof that a commit is durable: the number of the sync that covered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub batch: u64,
}

/// Counters shared between the writer threads and observers.
#[derive(Debug, Default)]
pub(crate) struct WriterStats {
    pub batches: AtomicU64,
    pub requests: AtomicU64,
    pub ops: AtomicU64,
    pub queued: AtomicU64,
    pub last_batch_requests: AtomicU64,
    pub max_batch_requests: AtomicU64,
    pub last_commit_unix_ms: AtomicU64,
    pub failures: AtomicU64,
    /// Commits left out because their claim moved on.
    pub fenced: AtomicU64,
    pub poisoned: Mutex<Option<String>>,
    /// How long commits took, from the call to durable.
    pub commit_latency: crate::metrics::Histogram,
}

impl WriterStats {
    pub(crate) fn poisoned(&self) -> Option<String> {
        self.poisoned
            .lock()
            .map(|p| p.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn poison(&self, reason: &str) {
        if let Ok(mut p) = self.poisoned.lock() {
            p.get_or_insert_with(|| reason.to_owned());
        }
    }

    /// A store that failed a write (a full disk, a failed `fdatasync`) is not trusted again
    /// in this process: nothing more is acknowledged until it starts over from what is durable.
    fn poison_on(&self, e: &JournalError) {
        match e {
            JournalError::Io { context, reason } => self.poison(&format!("{context}: {reason}")),
            JournalError::Poisoned { reason } => self.poison(reason),
            _ => {}
        }
    }
}

use crate::clock::now_unix_ms as unix_ms;

/// Applied batches waiting for the flusher.
#[derive(Default)]
struct Applied {
    replies: Vec<Reply>,
    ops: u64,
    /// The applier holds requests it has not handed over yet.
    applying: bool,
    /// Counts hand-overs, so the flusher can wait for exactly one more.
    generation: u64,
    /// The applier has stopped: the flusher drains what is left and stops too.
    closed: bool,
}

#[derive(Default)]
struct Handoff {
    applied: Mutex<Applied>,
    ready: Condvar,
}

/// Start the writer threads. They end when every sender is dropped.
pub(crate) fn spawn(
    store: Arc<dyn Store>,
    stats: Arc<WriterStats>,
    max_batch: usize,
) -> Result<mpsc::UnboundedSender<Request>, JournalError> {
    // Unbounded, so that queueing never waits and call order is commit order; producers are
    // bounded upstream (stream windows, mailbox capacities).
    let (tx, rx) = mpsc::unbounded_channel();
    let handoff = Arc::new(Handoff::default());
    let thread_err = |e: std::io::Error| JournalError::Io {
        context: "cannot start a journal writer thread".into(),
        reason: e.to_string(),
    };
    {
        let (store, stats, handoff) = (store.clone(), stats.clone(), handoff.clone());
        std::thread::Builder::new()
            .name("journal-flusher".into())
            .spawn(move || flusher(store.as_ref(), &stats, &handoff))
            .map_err(thread_err)?;
    }
    std::thread::Builder::new()
        .name("journal-applier".into())
        .spawn(move || applier(store.as_ref(), &stats, &handoff, rx, max_batch.max(1)))
        .map_err(thread_err)?;
    Ok(tx)
}

fn fail(stats: &WriterStats, replies: Vec<Reply>, e: JournalError) {
    stats.failures.fetch_add(1, Ordering::Relaxed);
    tracing::error!(error = %e, requests = replies.len(), "journal-commit-failed");
    for r in replies {
        let _ = r.send(Err(e.clone()));
    }
}

fn applier(
    store: &dyn Store,
    stats: &WriterStats,
    handoff: &Handoff,
    mut rx: mpsc::UnboundedReceiver<Request>,
    max_batch: usize,
) {
    let mut ops: Vec<Op> = Vec::new();
    let mut replies: Vec<Reply> = Vec::with_capacity(max_batch);
    // The fenced requests of the batch, and for each request its index among them.
    let mut fenced: Vec<Fenced> = Vec::new();
    let mut fence_of: Vec<Option<usize>> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(mut r) = next.take() {
            if r.fence.is_none() && store.fenced_only() {
                // A member node's commit outside its claims: refused, never written.
                stats.queued.fetch_sub(1, Ordering::Relaxed);
                let _ = r.reply.send(Err(JournalError::NotActive));
                next = rx.try_recv().ok();
                continue;
            }
            let start = ops.len();
            ops.append(&mut r.ops);
            fence_of.push(r.fence.map(|fence| {
                fenced.push(Fenced {
                    range: start..ops.len(),
                    fence,
                });
                fenced.len() - 1
            }));
            replies.push(r.reply);
            if replies.len() < max_batch {
                next = rx.try_recv().ok();
            }
        }
        if replies.is_empty() {
            continue;
        }
        stats
            .queued
            .fetch_sub(replies.len() as u64, Ordering::Relaxed);
        handoff
            .applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .applying = true;
        let result = match stats.poisoned() {
            Some(reason) => Err(JournalError::Poisoned { reason }),
            None if fenced.is_empty() => store.apply(&ops).map(|()| Vec::new()),
            None => store.apply_fenced(&ops, &fenced),
        };
        let mut applied = handoff.applied.lock().unwrap_or_else(|p| p.into_inner());
        applied.applying = false;
        applied.generation += 1;
        match result {
            Ok(left_out) => {
                // A request whose claim was taken wrote nothing: it is answered at once; the
                // others wait for the sync as usual.
                for (reply, fence) in replies.drain(..).zip(fence_of.iter()) {
                    // A flag the store did not give counts as left out: never a success by default.
                    let out = fence.filter(|&i| left_out.get(i).copied().unwrap_or(true));
                    match out.and_then(|i| fenced.get(i)) {
                        Some(Fenced { fence, .. }) => {
                            tracing::info!(claim = %fence.claim, epoch = fence.epoch, "journal-commit-fenced");
                            stats.fenced.fetch_add(1, Ordering::Relaxed);
                            let _ = reply.send(Err(JournalError::Fenced {
                                claim: fence.claim.clone(),
                                epoch: fence.epoch,
                            }));
                        }
                        None => applied.replies.push(reply),
                    }
                }
                applied.ops += ops.len() as u64;
            }
            Err(e) => {
                // A store that failed a write (a full disk) is not trusted again in this
                // process: sled keeps its I/O error. Nothing more is acknowledged until the
                // process starts over from what is durable.
                stats.poison_on(&e);
                fail(stats, std::mem::take(&mut replies), e)
            }
        }
        drop(applied);
        handoff.ready.notify_one();
        ops.clear();
        fenced.clear();
        fence_of.clear();
    }
    let mut applied = handoff.applied.lock().unwrap_or_else(|p| p.into_inner());
    applied.closed = true;
    handoff.ready.notify_one();
}

fn flusher(store: &dyn Store, stats: &WriterStats, handoff: &Handoff) {
    loop {
        let (replies, ops) = {
            let mut applied = handoff.applied.lock().unwrap_or_else(|p| p.into_inner());
            while applied.replies.is_empty() && !applied.closed {
                applied = handoff
                    .ready
                    .wait(applied)
                    .unwrap_or_else(|p| p.into_inner());
            }
            if applied.replies.is_empty() {
                return;
            }
            // Group commit: if more commits are already on their way through the applier,
            // let them ride this sync too (wait for one more hand-over, bounded in time). A
            // store whose apply is already durable has no sync to share: its batches are
            // answered at once.
            if !store.durable_on_apply()
                && (applied.applying || stats.queued.load(Ordering::Relaxed) > 0)
            {
                let seen = applied.generation;
                let deadline = Instant::now() + MAX_GATHER;
                while applied.generation == seen && !applied.closed {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    applied = handoff
                        .ready
                        .wait_timeout(applied, left)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            }
            (
                std::mem::take(&mut applied.replies),
                std::mem::take(&mut applied.ops),
            )
        };
        let result = match stats.poisoned() {
            Some(reason) => Err(JournalError::Poisoned { reason }),
            None => store.sync(),
        };
        match result {
            Ok(()) => {
                let n = replies.len() as u64;
                let number = stats.batches.fetch_add(1, Ordering::Relaxed) + 1;
                stats.requests.fetch_add(n, Ordering::Relaxed);
                stats.ops.fetch_add(ops, Ordering::Relaxed);
                stats.last_batch_requests.store(n, Ordering::Relaxed);
                stats.max_batch_requests.fetch_max(n, Ordering::Relaxed);
                stats
                    .last_commit_unix_ms
                    .store(unix_ms(), Ordering::Relaxed);
                for r in replies {
                    // A producer that gave up waiting is no reason to stop.
                    let _ = r.send(Ok(Committed { batch: number }));
                }
                if let Err(e) = store.maintain() {
                    stats.poison_on(&e);
                    tracing::error!(error = %e, "journal-maintenance-failed");
                }
            }
            Err(e) => {
                stats.poison_on(&e);
                fail(stats, replies, e);
            }
        }
    }
}
