//! The group-commit writer: one thread per journal that owns every write to the store.
//!
//! It blocks for the first queued request, takes every other request already queued (up to a
//! bound), commits them all as one atomic, synced batch, and only then answers each of them. So
//! one flush and one `fdatasync` cover every append that arrived while the previous one ran,
//! and no answer (and so no ack on the wire) ever precedes the sync that makes it durable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

use crate::journal::store::Store;
use crate::journal::{JournalError, Op};

/// A batch of operations waiting for its commit.
pub(crate) struct Request {
    pub ops: Vec<Op>,
    pub reply: oneshot::Sender<Result<Committed, JournalError>>,
}

/// Proof that a commit is durable: the number of the synced batch that carried it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub batch: u64,
}

/// Counters shared between the writer thread and observers.
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
    pub poisoned: Mutex<Option<String>>,
}

impl WriterStats {
    pub(crate) fn poisoned(&self) -> Option<String> {
        self.poisoned
            .lock()
            .map(|p| p.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Start the writer thread. It ends when every sender is dropped.
pub(crate) fn spawn(
    store: Arc<dyn Store>,
    stats: Arc<WriterStats>,
    queue: usize,
    max_batch: usize,
) -> Result<mpsc::Sender<Request>, JournalError> {
    let (tx, rx) = mpsc::channel(queue.max(1));
    std::thread::Builder::new()
        .name("journal-writer".into())
        .spawn(move || run(store, stats, rx, max_batch.max(1)))
        .map_err(|e| JournalError::Io {
            context: "cannot start the journal writer thread".into(),
            reason: e.to_string(),
        })?;
    Ok(tx)
}

fn run(
    store: Arc<dyn Store>,
    stats: Arc<WriterStats>,
    mut rx: mpsc::Receiver<Request>,
    max_batch: usize,
) {
    let mut batch: Vec<Request> = Vec::with_capacity(max_batch);
    let mut ops: Vec<Op> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        stats.queued.fetch_sub(n, Ordering::Relaxed);
        let result = match stats.poisoned() {
            Some(reason) => Err(JournalError::Poisoned { reason }),
            None => {
                ops.clear();
                for r in &mut batch {
                    ops.append(&mut r.ops);
                }
                store.commit(&ops)
            }
        };
        let reply = match result {
            Ok(()) => {
                let number = stats.batches.fetch_add(1, Ordering::Relaxed) + 1;
                stats.requests.fetch_add(n, Ordering::Relaxed);
                stats.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
                stats.last_batch_requests.store(n, Ordering::Relaxed);
                stats.max_batch_requests.fetch_max(n, Ordering::Relaxed);
                stats
                    .last_commit_unix_ms
                    .store(unix_ms(), Ordering::Relaxed);
                Ok(Committed { batch: number })
            }
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, requests = n, "journal-commit-failed");
                if let JournalError::Poisoned { reason } = &e {
                    if let Ok(mut p) = stats.poisoned.lock() {
                        p.get_or_insert_with(|| reason.clone());
                    }
                }
                Err(e)
            }
        };
        for r in batch.drain(..) {
            // A producer that gave up waiting is no reason to stop.
            let _ = r.reply.send(reply.clone());
        }
    }
}
