//! The nodes of a cluster as each last said it was running (`tether_nodes`): its role, its
//! release and the sessions (agents and relays) it serves, and how long ago by the database's
//! clock. Every node notes itself at each turn of
//! its lease loop (renewing, or waiting as a standby); every node reads the list for its
//! `/admin/health`. Nodes not heard from for a day are forgotten, so renamed nodes do not pile
//! up.

use super::connection::db_err;
use super::PgStore;
use crate::journal::JournalError;

/// One node as it last noted itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeSeen {
    pub node: String,
    /// `active` or `standby`.
    pub role: String,
    /// The release it runs.
    pub version: String,
    /// Agents and relays connected to it.
    pub sessions: i64,
    /// Its operators' address (`storage.node_url`), if it advertises one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// Milliseconds since it last noted itself, by the database's clock.
    pub seen_ms_ago: i64,
}

/// How long a node not heard from stays listed.
const FORGET_AFTER: &str = "1 day";
/// Most nodes listed: the newest heard from (the table is the database's, so its size is not
/// this node's to trust).
const MAX_NODES: i64 = 64;

impl PgStore {
    /// Notes that `seen.node` runs now, as `seen.role`, release `seen.version`, serving
    /// `seen.sessions` agents and relays, at `seen.url`; forgets nodes not heard from for a
    /// day (`seen.seen_ms_ago` is not read).
    pub fn note_node(&self, seen: &NodeSeen) -> Result<(), JournalError> {
        let NodeSeen {
            node,
            role,
            version,
            sessions,
            url,
            ..
        } = seen.clone();
        self.run(move |shared| async move {
            let guard = shared.client(shared.reader()).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            client
                .execute(
                    "INSERT INTO tether_nodes (name, role, version, sessions, url, seen_at)
                     VALUES ($1, $2, $3, $4, $5, now())
                     ON CONFLICT (name) DO UPDATE
                       SET role = excluded.role, version = excluded.version,
                           sessions = excluded.sessions, url = excluded.url, seen_at = now()",
                    &[&node, &role, &version, &sessions, &url],
                )
                .await
                .map_err(|e| db_err("cannot note this node", &e))?;
            client
                .execute(
                    &format!(
                        "DELETE FROM tether_nodes WHERE seen_at < now() - interval '{FORGET_AFTER}'"
                    ),
                    &[],
                )
                .await
                .map_err(|e| db_err("cannot forget old nodes", &e))?;
            Ok(())
        })
    }

    /// The nodes heard from in the last day (at most [`MAX_NODES`], the newest), by name.
    pub fn nodes(&self) -> Result<Vec<NodeSeen>, JournalError> {
        self.run(|shared| async move {
            let guard = shared.client(shared.reader()).await?;
            let client = guard.as_ref().ok_or(JournalError::Closed)?;
            let rows = client
                .query(
                    "SELECT name, role, version, sessions, url, ago FROM (
                       SELECT name, role, version, sessions, url,
                              (extract(epoch FROM now() - seen_at) * 1000)::bigint AS ago
                       FROM tether_nodes ORDER BY seen_at DESC LIMIT $1
                     ) newest ORDER BY name",
                    &[&MAX_NODES],
                )
                .await
                .map_err(|e| db_err("cannot list the nodes", &e))?;
            Ok(rows
                .iter()
                .map(|row| NodeSeen {
                    node: row.get(0),
                    role: row.get(1),
                    version: row.get(2),
                    sessions: row.get(3),
                    url: row.get(4),
                    seen_ms_ago: row.get(5),
                })
                .collect())
        })
    }
}
