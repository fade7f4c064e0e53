//! Connections to the database: how one is made (TLS or not), kept and made again, and the
//! errors the client's failures become.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Statement};

use super::lease::Lease;
use super::PgOptions;
use crate::journal::JournalError;

/// Longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a transaction of ours may sit idle (between its statements) before the database
/// ends its session and releases its locks. Ours send each statement as the last one returns,
/// so only a node gone silent mid-transaction reaches it; its batch is then tried again on a
/// new connection, fenced as ever.
pub(super) const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(5);

/// Why the database cannot serve as a journal, in words an operator can act on.
pub(super) fn refuse(reason: impl Into<String>) -> JournalError {
    JournalError::Database {
        reason: reason.into(),
    }
}

/// A client error with its causes ("error connecting to server: No such file or directory").
pub(super) fn described(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_owned();
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

pub(super) fn db_err(context: &str, e: &tokio_postgres::Error) -> JournalError {
    // The server's own words (e.g. "password authentication failed"), not only "db error".
    JournalError::Io {
        context: format!("postgres: {context}"),
        reason: described(e),
    }
}

/// A connection recipe: the parsed configuration and the TLS connector, if any.
#[derive(Clone)]
pub(super) struct Connector {
    pub(super) config: tokio_postgres::Config,
    pub(super) tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl Connector {
    pub(super) fn new(opts: &PgOptions) -> Result<Connector, JournalError> {
        let mut config: tokio_postgres::Config = opts
            .url
            .parse()
            .map_err(|e| refuse(format!("invalid storage.url: {e}")))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("tether-server");
        // A node that vanishes mid-transaction (a network that drops everything, a frozen
        // process) would otherwise hold its row locks, the lease's among them, until the
        // database noticed the dead peer (hours): the takeover would wait on it.
        let idle = format!(
            "-c idle_in_transaction_session_timeout={}",
            IDLE_IN_TRANSACTION.as_millis()
        );
        let options = match config.get_options() {
            Some(given) => format!("{given} {idle}"),
            None => idle,
        };
        config.options(&options);
        let tls = match &opts.ca_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read_to_string(path).map_err(|e| {
                    refuse(format!(
                        "cannot read storage.ca_file {}: {e}",
                        path.display()
                    ))
                })?;
                let client = crate::tls::client_config(&pem)
                    .map_err(|e| refuse(format!("storage.ca_file {}: {e}", path.display())))?;
                config.ssl_mode(SslMode::Require);
                Some(tokio_postgres_rustls::MakeRustlsConnect::new(client))
            }
        };
        Ok(Connector { config, tls })
    }

    pub(super) async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        match &self.tls {
            Some(tls) => {
                let (client, conn) = self.config.connect(tls.clone()).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::warn!(error = %e, "postgres-connection-lost");
                    }
                });
                Ok(client)
            }
            None => {
                let (client, conn) = self.config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::warn!(error = %e, "postgres-connection-lost");
                    }
                });
                Ok(client)
            }
        }
    }
}

/// A connection and the statements prepared on it (each once: a prepared statement is parsed
/// and planned once per connection, not once per batch).
pub(super) struct Conn {
    client: Client,
    prepared: HashMap<&'static str, Statement>,
}

impl Conn {
    pub(super) fn new(client: Client) -> Conn {
        Conn {
            client,
            prepared: HashMap::new(),
        }
    }

    /// `sql`, prepared on this connection the first time it is asked for.
    pub(super) async fn prepared(
        &mut self,
        sql: &'static str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.prepared.insert(sql, s.clone());
        Ok(s)
    }

    /// The rows `sql` (prepared as by [`Conn::prepared`]) reads with `params`.
    pub(super) async fn read(
        &mut self,
        sql: &'static str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let statement = self.prepared(sql).await?;
        self.client.query(&statement, params).await
    }
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// A connection, made again once it is lost.
pub(super) struct Slot {
    conn: Mutex<Option<Conn>>,
}

impl Slot {
    pub(super) fn new(client: Client) -> Slot {
        Slot {
            conn: Mutex::new(Some(Conn::new(client))),
        }
    }
}

/// The state the runtime's tasks share.
pub(super) struct Shared {
    pub(super) connector: Connector,
    pub(super) writer: Slot,
    pub(super) readers: Vec<Slot>,
    pub(super) next_reader: AtomicUsize,
    /// The lease this store holds, once [`super::PgStore::acquire_lease`] got it: every batch checks
    /// it inside its transaction.
    pub(super) lease: std::sync::Mutex<Option<Lease>>,
    /// Why the writer is waiting for the database to take a batch again, while it is.
    pub(super) waiting: std::sync::Mutex<Option<String>>,
    /// Meta key prefixes whose writes are hinted (see `super::hints`).
    pub(super) hinted: std::sync::RwLock<Vec<String>>,
    /// Hints of committed batches, for `super::hints::send`.
    pub(super) outbox: std::sync::Arc<super::hints::Outbox>,
}

impl Shared {
    /// The lease this store holds, if it took one.
    pub(super) fn held_lease(&self) -> Option<Lease> {
        self.lease
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The slot's client, connected again if it was lost.
    pub(super) async fn client<'a>(
        &self,
        slot: &'a Slot,
    ) -> Result<tokio::sync::MutexGuard<'a, Option<Conn>>, JournalError> {
        let mut guard = slot.conn.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = None;
            let client = self
                .connector
                .connect()
                .await
                .map_err(|e| db_err("cannot connect", &e))?;
            tracing::info!("postgres-reconnected");
            *guard = Some(Conn::new(client));
        }
        Ok(guard)
    }

    pub(super) fn reader(&self) -> &Slot {
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed);
        &self.readers[i % self.readers.len()]
    }
}

/// Runs `fut` on `runtime` and blocks the calling thread (any thread, an async one included:
/// the work runs on the runtime's own threads) until it is done.
pub(super) fn wait_on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    fut: impl Future<Output = Result<T, JournalError>> + Send + 'static,
) -> Result<T, JournalError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| JournalError::Closed)?
}
