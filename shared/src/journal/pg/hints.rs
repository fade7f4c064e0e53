//! Hints: a notification (`LISTEN`/`NOTIFY` on [`CHANNEL`]) that a batch wrote meta keys under
//! one of the prefixes the store hints for (see [`super::PgStore::hint_writes_under`]). The
//! notification is sent once the transaction that wrote the keys committed ([`send`], on a
//! connection of its own), so a listener that reads after it finds them. The payload ([`Hint`])
//! is the prefix and the names the batch wrote under it (the keys' first segment after the
//! prefix: an agent's id), so that a listener reads only theirs; a listener reads the keys
//! themselves. It is only a hint: one sent while the sender's or a listener's connection was
//! down is missed, and the keys are found at the next bounded look.
//!
//! Not sent inside the transaction: PostgreSQL serializes the commits of every transaction that
//! notifies (a lock held until its commit is durable), which would make the nodes' commits wait
//! for each other's disk writes.

use std::collections::{BTreeMap, BTreeSet};
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
/// Names a hint carries at most: past that, it names none (every key under its prefix may be
/// new).
const MAX_NAMES: usize = 1024;
/// Bytes of a notification's payload at most (PostgreSQL refuses 8,000 and more): a hint with
/// more names goes in several.
const MAX_PAYLOAD: usize = 7_000;

/// What a hint says: meta keys were written under `prefix`, under these names (each key's
/// segment after the prefix, up to its next `/`), or under any (`None`: too many to name).
/// The payload is the prefix, then each name after a space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    pub prefix: String,
    pub names: Option<BTreeSet<String>>,
}

impl Hint {
    /// The hint a notification's payload says; names that could not be a key's segment are
    /// left out.
    pub fn parse(payload: &str) -> Hint {
        let mut words = payload.split(' ');
        let prefix = words.next().unwrap_or_default().to_owned();
        let names: BTreeSet<String> = words
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .map(str::to_owned)
            .collect();
        Hint {
            prefix,
            names: (!names.is_empty()).then_some(names),
        }
    }

    /// The payloads that say this hint: one per [`MAX_PAYLOAD`] bytes of names.
    fn payloads(&self) -> Vec<String> {
        let Some(names) = &self.names else {
            return vec![self.prefix.clone()];
        };
        let mut out = vec![self.prefix.clone()];
        for name in names {
            if out
                .last()
                .is_some_and(|p| p.len() + 1 + name.len() > MAX_PAYLOAD)
            {
                out.push(self.prefix.clone());
            }
            if let Some(p) = out.last_mut() {
                p.push(' ');
                p.push_str(name);
            }
        }
        out
    }

    /// Also what `other` (a hint under the same prefix) says.
    fn merge(&mut self, other: Option<BTreeSet<String>>) {
        self.names = match (self.names.take(), other) {
            (Some(mut mine), Some(theirs)) => {
                mine.extend(theirs);
                (mine.len() <= MAX_NAMES).then_some(mine)
            }
            _ => None,
        };
    }
}

/// The hints of a batch that writes `keys`: for each of `prefixes` (meta keys, without the
/// meta byte) under which it writes at least one key, the names it writes under.
pub(super) fn of(prefixes: &[String], keys: &[Vec<u8>]) -> Vec<Hint> {
    let mut out = Vec::new();
    for prefix in prefixes {
        let mut hint: Option<Hint> = None;
        for key in keys {
            let Some(rest) = key
                .strip_prefix(&[META_PREFIX])
                .and_then(|k| k.strip_prefix(prefix.as_bytes()))
            else {
                continue;
            };
            let name = rest.split(|b| *b == b'/').next().unwrap_or_default();
            let named = std::str::from_utf8(name)
                .ok()
                .filter(|n| !n.is_empty() && !n.contains(' '))
                .map(|n| BTreeSet::from([n.to_owned()]));
            match hint.as_mut() {
                Some(h) => h.merge(named),
                None => {
                    hint = Some(Hint {
                        prefix: prefix.clone(),
                        names: named,
                    })
                }
            }
        }
        out.extend(hint);
    }
    out
}

/// Hints of committed batches not sent yet: each prefix once, with every name written under
/// it meanwhile (at most [`MAX_NAMES`]), however many batches wrote.
#[derive(Default)]
pub(super) struct Outbox {
    due: std::sync::Mutex<BTreeMap<String, Hint>>,
    wake: tokio::sync::Notify,
}

impl Outbox {
    /// The hints of a batch that just committed.
    pub(super) fn post(&self, hints: Vec<Hint>) {
        if hints.is_empty() {
            return;
        }
        let mut due = self
            .due
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for hint in hints {
            match due.get_mut(&hint.prefix) {
                Some(waiting) => waiting.merge(hint.names),
                None => {
                    due.insert(hint.prefix.clone(), hint);
                }
            }
        }
        drop(due);
        self.wake.notify_one();
    }

    /// The payloads of every hint waiting, which are sent now.
    fn take(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .due
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_values()
        .flat_map(|h| h.payloads())
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
        let names = |n: &[&str]| Some(n.iter().map(|n| (*n).to_owned()).collect());
        assert_eq!(
            of(&prefixes, &keys),
            vec![Hint {
                prefix: "inbox/".to_owned(),
                names: names(&["a-1", "a-2"]),
            }]
        );
        assert!(of(&prefixes, &[meta("job/x")]).is_empty());
        assert!(of(&[], &keys).is_empty());
        // A key with no name after the prefix: any key under it may be new.
        assert_eq!(
            of(&prefixes, &[meta("mailbox/"), meta("mailbox/a-3/1")])[0].names,
            None
        );
    }

    #[test]
    fn a_hint_says_its_names_in_payloads_postgres_takes_and_reads_back_the_same() {
        let many: BTreeSet<String> = (0..600).map(|i| format!("a-{i:016x}")).collect();
        let hint = Hint {
            prefix: "inbox/".to_owned(),
            names: Some(many.clone()),
        };
        let payloads = hint.payloads();
        assert!(payloads.len() > 1, "{} bytes of names", many.len() * 19);
        let mut read = BTreeSet::new();
        for p in &payloads {
            assert!(p.len() <= MAX_PAYLOAD, "{}", p.len());
            let back = Hint::parse(p);
            assert_eq!(back.prefix, "inbox/");
            read.extend(back.names.unwrap());
        }
        assert_eq!(read, many);
        assert_eq!(Hint::parse("inbox/").names, None);
        assert_eq!(
            Hint::parse("inbox/ a-1 ../x  a-2").names,
            Some(BTreeSet::from(["a-1".to_owned(), "a-2".to_owned()])),
            "a name cannot reach past its prefix"
        );
    }

    #[test]
    fn hints_waiting_to_be_sent_name_each_prefix_once_with_every_name_up_to_a_bound() {
        let hint = |prefix: &str, names: &[&str]| Hint {
            prefix: prefix.to_owned(),
            names: Some(names.iter().map(|n| (*n).to_owned()).collect()),
        };
        let outbox = Outbox::default();
        outbox.post(vec![hint("mailbox/", &["a-2"])]);
        outbox.post(Vec::new());
        outbox.post(vec![
            hint("inbox/", &["a-1"]),
            hint("mailbox/", &["a-1", "a-2"]),
        ]);
        assert_eq!(outbox.take(), ["inbox/ a-1", "mailbox/ a-1 a-2"]);
        assert!(outbox.take().is_empty(), "each sent once");
        // Past the bound, a hint names nothing: every key under the prefix may be new.
        for i in 0..=MAX_NAMES {
            outbox.post(vec![hint("inbox/", &[&format!("a-{i}")])]);
        }
        assert_eq!(outbox.take(), ["inbox/"]);
        outbox.post(vec![hint("inbox/", &["a-1"])]);
        outbox.post(vec![Hint {
            prefix: "inbox/".to_owned(),
            names: None,
        }]);
        assert_eq!(outbox.take(), ["inbox/"]);
    }
}
