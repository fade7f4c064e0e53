//! [`Presence`]: who is connected right now, through which path, on which connection — the one
//! home of it. In memory only: after a restart every peer is offline until it reconnects.
//!
//! A peer's *current connection* is claimed when its handshake succeeds: the newest claim wins,
//! and the claim it replaces is handed back so that its session is told to close. A connection
//! that ends releases its claim only if it is still the current one, so a late end of a
//! replaced session never marks a reconnected peer offline. What holds a connection (`H`: an
//! agent's session, a relay's link) is the session layer's business
//! ([`crate::session::Holder`]); the registry reads only what was [`Seen`], through
//! [`Sightings`].

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tether_shared::clock::now_unix_ms;
use tether_shared::protocol::AgentStatus as ReportedStatus;
use tether_shared::stream::ConnId;

/// What is known of a peer's connection.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub online: bool,
    pub version: Option<String>,
    /// Relay ids, nearest the peer first.
    pub path: Vec<String>,
    pub last_seen_unix_ms: Option<u64>,
    /// The peer's last reported status (relays: from their heartbeats).
    pub reported: Option<ReportedStatus>,
    /// On a cluster's active node: the member node that serves it (`None`: this node).
    pub node: Option<String>,
}

/// What the registry's views read of presence.
pub trait Sightings {
    /// What is known of `id`'s connection.
    fn seen(&self, id: &str) -> Seen;
    /// Every peer's, by id.
    fn all_seen(&self) -> HashMap<String, Seen>;
}

struct Entry<H> {
    seen: Seen,
    current: Option<(ConnId, H)>,
}

impl<H> Default for Entry<H> {
    fn default() -> Self {
        Entry {
            seen: Seen::default(),
            current: None,
        }
    }
}

pub struct Presence<H> {
    peers: RwLock<HashMap<String, Entry<H>>>,
}

impl<H> Default for Presence<H> {
    fn default() -> Self {
        Presence {
            peers: RwLock::new(HashMap::new()),
        }
    }
}

impl<H: Clone> Presence<H> {
    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Entry<H>>> {
        self.peers.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Entry<H>>> {
        self.peers.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connection `conn` of `id` is now the current one; returns the holder it replaces.
    pub fn claim(&self, id: &str, conn: ConnId, holder: H) -> Option<H> {
        let mut peers = self.write();
        let entry = peers.entry(id.to_owned()).or_default();
        entry
            .current
            .replace((conn, holder))
            .filter(|(old, _)| *old != conn)
            .map(|(_, h)| h)
    }

    /// Connection `conn` of `id` ended. If it was the current one, the peer is offline now and
    /// this returns true.
    pub fn release(&self, id: &str, conn: ConnId) -> bool {
        let mut peers = self.write();
        let Some(entry) = peers
            .get_mut(id)
            .filter(|e| e.current.as_ref().is_some_and(|(c, _)| *c == conn))
        else {
            return false;
        };
        entry.current = None;
        entry.seen.online = false;
        entry.seen.last_seen_unix_ms = Some(now_unix_ms());
        true
    }

    /// `id`'s current connection and its holder.
    pub fn current(&self, id: &str) -> Option<(ConnId, H)> {
        self.read().get(id)?.current.clone()
    }

    /// Every current connection's holder, by peer id.
    pub fn holders(&self) -> Vec<(String, H)> {
        self.read()
            .iter()
            .filter_map(|(id, e)| Some((id.clone(), e.current.as_ref()?.1.clone())))
            .collect()
    }

    /// How many peers are connected to this node now (directly or through relays).
    pub fn online_count(&self) -> usize {
        self.read()
            .values()
            .filter(|e| e.seen.online && e.seen.node.is_none())
            .count()
    }

    /// `id` connected, running `version`, through `path` (relays, nearest first).
    pub fn set_online(&self, id: &str, version: &str, path: Vec<String>) {
        let mut peers = self.write();
        let seen = &mut peers.entry(id.to_owned()).or_default().seen;
        seen.online = true;
        seen.version = Some(version.to_owned());
        seen.path = path;
        seen.last_seen_unix_ms = Some(now_unix_ms());
        seen.node = None;
    }

    /// `id` connected to member node `node`, running `version`, through `path` (relays,
    /// nearest it first), unless it is connected here.
    pub fn set_elsewhere(&self, id: &str, version: &str, node: &str, path: &[String]) {
        let mut peers = self.write();
        let entry = peers.entry(id.to_owned()).or_default();
        if entry.current.is_some() {
            return;
        }
        let seen = &mut entry.seen;
        seen.online = true;
        seen.version = Some(version.to_owned());
        seen.path = path.to_vec();
        seen.last_seen_unix_ms = Some(now_unix_ms());
        seen.node = Some(node.to_owned());
    }

    /// `id` connected to member node `node` after its connection here (which is stale: its
    /// end changes nothing from now on).
    pub fn moved_elsewhere(&self, id: &str, version: &str, node: &str, path: &[String]) {
        if let Some(e) = self.write().get_mut(id) {
            e.current = None;
        }
        self.set_elsewhere(id, version, node, path);
    }

    /// `id`'s session on member node `node` ended (a later one, elsewhere, changes nothing).
    pub fn left_elsewhere(&self, id: &str, node: &str) {
        if let Some(e) = self.write().get_mut(id) {
            if e.current.is_none() && e.seen.node.as_deref() == Some(node) {
                e.seen.online = false;
                e.seen.last_seen_unix_ms = Some(now_unix_ms());
            }
        }
    }

    /// The peers served by a member node that is not in `live` are offline (it died, or lost
    /// the database: they reconnect elsewhere).
    pub fn keep_members(&self, live: &[String]) {
        for e in self.write().values_mut() {
            let gone = e.seen.node.as_ref().is_some_and(|n| !live.contains(n));
            if gone && e.current.is_none() && e.seen.online {
                e.seen.online = false;
            }
        }
    }

    /// `id` is offline (a child relay's channel closed: it has no claim of its own here),
    /// unless a member node serves it now.
    pub fn set_offline(&self, id: &str) {
        let mut peers = self.write();
        let seen = &mut peers.entry(id.to_owned()).or_default().seen;
        if seen.node.is_none() {
            seen.online = false;
            seen.last_seen_unix_ms = Some(now_unix_ms());
        }
    }

    /// `id` was heard from now, with the status it reported (if any).
    pub fn touch(&self, id: &str, status: Option<ReportedStatus>) {
        if let Some(e) = self.write().get_mut(id) {
            e.seen.last_seen_unix_ms = Some(now_unix_ms());
            if status.is_some() {
                e.seen.reported = status;
            }
        }
    }

    /// The path of `id` if it is connected now (relay ids, nearest it first).
    pub fn online_path(&self, id: &str) -> Option<Vec<String>> {
        self.read()
            .get(id)
            .filter(|e| e.seen.online)
            .map(|e| e.seen.path.clone())
    }

    /// `id` was deleted: forget what was seen of it. Its current connection stays claimed until
    /// it ends, so that it can still be found and closed.
    pub fn forget(&self, id: &str) {
        let mut peers = self.write();
        match peers.get_mut(id) {
            Some(e) if e.current.is_some() => e.seen = Seen::default(),
            Some(_) => {
                peers.remove(id);
            }
            None => {}
        }
    }
}

impl<H: Clone> Sightings for Presence<H> {
    fn seen(&self, id: &str) -> Seen {
        self.read()
            .get(id)
            .map(|e| e.seen.clone())
            .unwrap_or_default()
    }

    fn all_seen(&self) -> HashMap<String, Seen> {
        self.read()
            .iter()
            .map(|(id, e)| (id.clone(), e.seen.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_connection_wins_and_a_late_end_of_an_old_one_changes_nothing() {
        let p = Presence::<&str>::default();
        assert!(p.claim("a", ConnId(1), "one").is_none());
        p.set_online("a", "1.0", vec!["r".into()]);
        assert!(p.claim("a", ConnId(1), "one").is_none(), "same connection");
        assert_eq!(p.claim("a", ConnId(2), "two"), Some("one"), "replaces 1");
        assert!(!p.release("a", ConnId(1)), "the old one's end");
        assert!(p.seen("a").online);
        assert_eq!(p.online_path("a"), Some(vec!["r".to_string()]));
        assert_eq!(p.holders(), vec![("a".to_string(), "two")]);
        assert!(p.release("a", ConnId(2)));
        assert!(!p.seen("a").online);
        assert!(p.current("a").is_none());
        assert!(p.online_path("a").is_none());
    }

    #[test]
    fn a_peer_served_by_a_member_is_online_until_it_leaves_it_or_the_member_goes() {
        let p = Presence::<&str>::default();
        p.set_elsewhere("a", "1.0", "node-b", &[]);
        assert!(p.seen("a").online);
        assert_eq!(p.seen("a").node.as_deref(), Some("node-b"));
        // It moved to node c before node b's note that it left arrived: still online.
        p.set_elsewhere("a", "1.0", "node-c", &[]);
        p.left_elsewhere("a", "node-b");
        assert!(p.seen("a").online);
        p.keep_members(&["node-c".into()]);
        assert!(p.seen("a").online);
        p.keep_members(&["node-b".into()]);
        assert!(!p.seen("a").online, "node c is gone");
        // Connected here, it is this node's, whatever a member says.
        p.claim("a", ConnId(1), "one");
        p.set_online("a", "1.0", Vec::new());
        p.set_elsewhere("a", "1.0", "node-b", &[]);
        p.left_elsewhere("a", "node-b");
        p.keep_members(&[]);
        assert!(p.seen("a").online);
        assert_eq!(p.seen("a").node, None);
    }

    #[test]
    fn a_deleted_peer_is_forgotten_but_its_session_can_still_be_closed() {
        let p = Presence::<&str>::default();
        p.claim("a", ConnId(1), "one");
        p.set_online("a", "1.0", Vec::new());
        p.forget("a");
        assert!(!p.seen("a").online);
        assert_eq!(p.current("a"), Some((ConnId(1), "one")));
        assert!(p.release("a", ConnId(1)));
        p.forget("a");
        assert!(p.all_seen().is_empty());
    }
}
