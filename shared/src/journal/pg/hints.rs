//! Hints: a notification (`LISTEN`/`NOTIFY` on [`CHANNEL`]) that a batch wrote meta keys under
//! one of the prefixes the store hints for (see [`super::PgStore::hint_writes_under`]). The
//! notification is sent once the transaction that wrote the keys committed ([`send`], on a
//! connection of its own), so a listener that reads after it finds them; the payload is only
//! the prefix: a listener reads the keys themselves. It is only a hint: one sent while the
//! sender's or a listener's connection was down is missed, and the keys are found at the next
//! bounded look.
//!
//! Not sent inside the transaction: PostgreSQL serializes the commits of every transaction that
//! notifies (a lock held until its commit is durable), which would make the nodes' commits wait
//! for each other's disk writes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc::UnboundedSender;

use super::connection::{described, Connector};
use crate::journal::record::META_PREFIX;

/// The channel every hint goes on.
pub const CHANNEL: &str = "tether_journal";
/// Sends hints; none while the database's queue of notifications is half full (a listener that
/// stopped reading fills it): hints are only hints.
const NOTIFY: &str = "SELECT pg_notify('tether_journal', h) FROM unnest($1::text[]) AS h
     WHERE pg_notification_queue_usage() < 0.5";
/// How long a listener waits before it connects again.
const RECONNECT: Duration = Duration::from_secs(1);

/// The hints of a batch that writes `keys`: each of `prefixes` (meta keys, without the meta
/// byte) under which it writes at least one key.
pub(super) fn of(prefixes: &[String], keys: &[Vec<u8>]) -> Vec<String> {
    prefixes
        .iter()
        .filter(|p| {
            keys.iter().any(|k| {
                k.first() == Some(&META_PREFIX)
                    && k.get(1..).is_some_and(|k| k.starts_with(p.as_bytes()))
            })
        })
        .cloned()
        .collect()
}

/// Hints of committed batches not sent yet: each prefix once, however many batches wrote
/// under it meanwhile.
#[derive(Default)]
pub(super) struct Outbox {
    due: std::sync::Mutex<BTreeSet<String>>,
    wake: tokio::sync::Notify,
}

impl Outbox {
    /// The hints of a batch that just committed.
    pub(super) fn post(&self, hints: Vec<String>) {
        if hints.is_empty() {
            return;
        }
        self.due
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(hints);
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .due
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_iter()
        .collect()
    }
}

/// Sends the hints posted to `outbox` as they come, on a connection of its own (made again
/// when lost, at most every [`RECONNECT`]; hints posted meanwhile are dropped).
pub(super) async fn send(connector: Connector, outbox: Arc<Outbox>) {
    let mut conn: Option<(tokio_postgres::Client, tokio_postgres::Statement)> = None;
    let mut tried: Option<tokio::time::Instant> = None;
    loop {
        outbox.wake.notified().await;
        let due = outbox.take();
        if due.is_empty() {
            continue;
        }
        if conn.as_ref().is_none_or(|(c, _)| c.is_closed())
            && tried.is_none_or(|t| t.elapsed() >= RECONNECT)
        {
            tried = Some(tokio::time::Instant::now());
            conn = match connector.connect().await {
                Ok(client) => match client.prepare(NOTIFY).await {
                    Ok(statement) => Some((client, statement)),
                    Err(e) => {
                        tracing::warn!(error = %described(&e), "postgres-hints-not-sent");
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %described(&e), "postgres-hints-not-sent");
                    None
                }
            };
        }
        let Some((client, statement)) = &conn else {
            continue;
        };
        if let Err(e) = client.execute(statement, &[&due]).await {
            tracing::warn!(error = %described(&e), "postgres-hints-not-sent");
            conn = None;
        }
    }
}

/// Forwards the payloads of the notifications `conn` receives to `to`, until it ends.
async fn forward<S, T>(mut conn: tokio_postgres::Connection<S, T>, to: UnboundedSender<String>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message {
            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                if to.send(n.payload().to_owned()).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %described(&e), "postgres-hints-connection-lost");
                return;
            }
        }
    }
}

/// Listens for hints on a connection of its own, made again whenever it is lost, until `to`
/// is dropped.
pub(super) async fn listen(connector: Connector, to: UnboundedSender<String>) {
    while !to.is_closed() {
        let client = match &connector.tls {
            Some(tls) => connector
                .config
                .connect(tls.clone())
                .await
                .map(|(client, conn)| {
                    tokio::spawn(forward(conn, to.clone()));
                    client
                }),
            None => connector
                .config
                .connect(tokio_postgres::NoTls)
                .await
                .map(|(client, conn)| {
                    tokio::spawn(forward(conn, to.clone()));
                    client
                }),
        };
        match client {
            Ok(client) => match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                Ok(()) => {
                    // Held until the connection ends (or nobody listens any more).
                    while !client.is_closed() && !to.is_closed() {
                        tokio::time::sleep(RECONNECT).await;
                    }
                }
                Err(e) => tracing::warn!(error = %described(&e), "postgres-hints-not-listened"),
            },
            Err(e) => tracing::warn!(error = %described(&e), "postgres-hints-not-connected"),
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_hints_each_prefix_it_writes_under_once() {
        let prefixes = vec!["inbox/".to_owned(), "mailbox/".to_owned()];
        let meta = |k: &str| [&[META_PREFIX], k.as_bytes()].concat();
        let keys = vec![
            meta("inbox/a-1/1.e"),
            meta("inbox/a-2/7.e"),
            meta("job/x"),
            // A record's key (not meta) is never hinted.
            b"Rmailbox/a-1/1".to_vec(),
        ];
        assert_eq!(of(&prefixes, &keys), vec!["inbox/".to_owned()]);
        assert!(of(&prefixes, &[meta("job/x")]).is_empty());
        assert!(of(&[], &keys).is_empty());
    }

    #[test]
    fn hints_waiting_to_be_sent_name_each_prefix_once() {
        let outbox = Outbox::default();
        outbox.post(vec!["mailbox/".to_owned()]);
        outbox.post(Vec::new());
        outbox.post(vec!["inbox/".to_owned(), "mailbox/".to_owned()]);
        assert_eq!(outbox.take(), ["inbox/", "mailbox/"]);
        assert!(outbox.take().is_empty(), "each sent once");
    }
}
