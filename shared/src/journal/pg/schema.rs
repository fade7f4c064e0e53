//! The schema: created and migrated at open, under an advisory lock; a database migrated by a
//! newer server is refused, as one that could lose acknowledged commits is.

use tokio_postgres::Client;

use super::connection::{db_err, refuse};
use crate::journal::JournalError;

/// The schema, one step per version: version N is the first N steps applied.
pub const MIGRATIONS: &[&str] = &[
    "CREATE TABLE tether_journal (
        key bytea PRIMARY KEY,
        value bytea NOT NULL
     );
     CREATE TABLE tether_blobs (
        name text NOT NULL,
        at bigint NOT NULL,
        bytes bytea NOT NULL,
        PRIMARY KEY (name, at)
     );",
    // The lease: which node is active, with an epoch that every takeover raises.
    "CREATE TABLE tether_lease (
        id smallint PRIMARY KEY CHECK (id = 1),
        holder text NOT NULL,
        epoch bigint NOT NULL,
        expires_at timestamptz NOT NULL
     );",
    // The nodes as each last noted itself (see `nodes`).
    "CREATE TABLE IF NOT EXISTS tether_nodes (
        name text PRIMARY KEY,
        role text NOT NULL,
        version text NOT NULL,
        seen_at timestamptz NOT NULL
     );",
    // How many agents and relays each node serves, and its operators' address, as it last
    // noted them.
    "ALTER TABLE tether_nodes ADD COLUMN IF NOT EXISTS sessions bigint NOT NULL DEFAULT 0;
     ALTER TABLE tether_nodes ADD COLUMN IF NOT EXISTS url text NOT NULL DEFAULT '';",
    // Which node serves each agent and relay, at which epoch (see `claims`).
    "CREATE TABLE IF NOT EXISTS tether_claims (
        claim text PRIMARY KEY,
        node text NOT NULL,
        epoch bigint NOT NULL,
        claimed_at timestamptz NOT NULL
     );",
];

/// Taken (per transaction) while the schema is checked and migrated.
const MIGRATION_LOCK: i64 = 0x7465_7468_6572; // "tether"
/// `fsync` and `synchronous_commit` must be on, or a commit the database acknowledged can be
/// lost in a crash.
pub(super) async fn check_settings(client: &Client) -> Result<(), JournalError> {
    for (setting, refused) in [("fsync", "off"), ("synchronous_commit", "off")] {
        let row = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .map_err(|e| db_err("cannot read the settings", &e))?;
        let value: String = row.get(0);
        if value == refused {
            return Err(refuse(format!(
                "the database runs with {setting} = {value}: it may lose commits it acknowledged, so tether refuses it (set {setting} = on)"
            )));
        }
    }
    Ok(())
}

/// Creates or migrates the schema; refuses a database migrated by a newer version.
pub(super) async fn migrate(client: &mut Client) -> Result<(), JournalError> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| db_err("cannot begin", &e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| db_err("cannot lock the schema", &e))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS tether_schema (version integer NOT NULL)")
        .await
        .map_err(|e| db_err("cannot create tether_schema", &e))?;
    let found: Option<i32> = tx
        .query_opt("SELECT max(version) FROM tether_schema", &[])
        .await
        .map_err(|e| db_err("cannot read the schema version", &e))?
        .and_then(|row| row.get(0));
    let found = usize::try_from(found.unwrap_or(0)).unwrap_or(0);
    let known = MIGRATIONS.len();
    if found > known {
        return Err(refuse(format!(
            "the database schema is version {found}, newer than this server's ({known}): a newer tether-server migrated it; run that version"
        )));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(found) {
        tx.batch_execute(step)
            .await
            .map_err(|e| db_err(&format!("migration {}", i + 1), &e))?;
        tracing::info!(version = i + 1, "postgres-schema-migrated");
    }
    if found < known {
        let version = i32::try_from(known).unwrap_or(i32::MAX);
        tx.execute("DELETE FROM tether_schema", &[])
            .await
            .map_err(|e| db_err("cannot record the schema version", &e))?;
        tx.execute(
            "INSERT INTO tether_schema (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(|e| db_err("cannot record the schema version", &e))?;
    }
    tx.commit()
        .await
        .map_err(|e| db_err("cannot commit the schema", &e))
}
