//! The enrolled agents' indexes that deployments and upgrades resolve their targets by: ids by
//! name, ids by tag. Kept up to date with every change the registry applies, so resolving N
//! names or a tag costs what it returns, never a pass over the whole fleet.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Deref;

use super::{AgentRecord, StoredAgent};
use tether_shared::enroll::Role;
use tether_shared::ids::AgentId;

/// Enrolled agents and relays by id, and the agents' index: every change goes through
/// [`Enrolled::insert`] and [`Enrolled::remove`], which keep both together.
#[derive(Debug, Default)]
pub(super) struct Enrolled {
    by_id: BTreeMap<AgentId, StoredAgent>,
    pub(super) index: AgentIndex,
}

impl Deref for Enrolled {
    type Target = BTreeMap<AgentId, StoredAgent>;

    fn deref(&self) -> &Self::Target {
        &self.by_id
    }
}

impl Enrolled {
    /// Keeps `stored` (in place of the record with its id).
    pub(super) fn insert(&mut self, stored: StoredAgent) {
        if let Some(old) = self.by_id.get(stored.record.id.as_str()) {
            self.index.remove(&old.record);
        }
        self.index.add(&stored.record);
        self.by_id.insert(stored.record.id.clone(), stored);
    }

    /// Forgets the agent or relay `id`.
    pub(super) fn remove(&mut self, id: &str) -> Option<StoredAgent> {
        let old = self.by_id.remove(id)?;
        self.index.remove(&old.record);
        Some(old)
    }
}

/// Agents (not relays) by name and by tag.
#[derive(Debug, Default)]
pub struct AgentIndex {
    /// Name by id: every indexed agent is here.
    names: HashMap<AgentId, String>,
    /// Id by name.
    ids: HashMap<String, AgentId>,
    /// Ids by tag, in id order.
    tagged: HashMap<String, BTreeSet<AgentId>>,
}

impl AgentIndex {
    /// The index of `records` (relays left out).
    #[cfg(test)]
    pub fn of(records: &[AgentRecord]) -> AgentIndex {
        let mut index = AgentIndex::default();
        for r in records {
            index.add(r);
        }
        index
    }

    /// Indexes `record` (relays are not).
    pub fn add(&mut self, record: &AgentRecord) {
        if record.role != Role::Agent {
            return;
        }
        self.names.insert(record.id.clone(), record.name.clone());
        self.ids.insert(record.name.clone(), record.id.clone());
        for tag in &record.tags {
            self.tagged
                .entry(tag.clone())
                .or_default()
                .insert(record.id.clone());
        }
    }

    /// Forgets `record`, as it was indexed.
    pub fn remove(&mut self, record: &AgentRecord) {
        if self.names.remove(record.id.as_str()).is_none() {
            return;
        }
        if self.ids.get(&record.name) == Some(&record.id) {
            self.ids.remove(&record.name);
        }
        for tag in &record.tags {
            if let Some(set) = self.tagged.get_mut(tag) {
                set.remove(record.id.as_str());
                if set.is_empty() {
                    self.tagged.remove(tag);
                }
            }
        }
    }

    /// The id of the agent whose id or name is `key` (an id first).
    pub fn id_of(&self, key: &str) -> Option<&AgentId> {
        match self.names.get_key_value(key) {
            Some((id, _)) => Some(id),
            None => self.ids.get(key),
        }
    }

    /// The name of agent `id`.
    #[cfg(test)]
    pub fn name_of(&self, id: &str) -> Option<&str> {
        self.names.get(id).map(String::as_str)
    }

    /// The ids of the agents having every tag of `tags`, in id order (none for no tags): the
    /// smallest tag's agents, each checked against the others.
    pub fn tagged(&self, tags: &[String]) -> Vec<AgentId> {
        let mut sets = Vec::with_capacity(tags.len());
        for tag in tags {
            match self.tagged.get(tag) {
                Some(set) => sets.push(set),
                None => return Vec::new(),
            }
        }
        sets.sort_by_key(|s| s.len());
        let Some((smallest, rest)) = sets.split_first() else {
            return Vec::new();
        };
        smallest
            .iter()
            .filter(|id| rest.iter().all(|s| s.contains(*id)))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, name: &str, tags: &[&str], role: Role) -> AgentRecord {
        AgentRecord {
            id: AgentId::from(id),
            name: name.into(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            role,
            public_key: String::new(),
            properties: BTreeMap::new(),
            enrolled_unix_ms: 0,
            maintenance: None,
            max_running_jobs: None,
            facts: BTreeMap::new(),
            facts_unix_ms: 0,
        }
    }

    #[test]
    fn names_and_tags_follow_every_change_and_relays_stay_out() {
        let web1 = record("a-1", "web-1", &["web", "eu"], Role::Agent);
        let web2 = record("a-2", "web-2", &["web"], Role::Agent);
        let relay = record("r-1", "relay-1", &["web"], Role::Relay);
        let mut index = AgentIndex::of(&[web1.clone(), web2.clone(), relay]);
        assert_eq!(index.id_of("web-1").map(AgentId::as_str), Some("a-1"));
        assert_eq!(index.id_of("a-2").map(AgentId::as_str), Some("a-2"));
        assert_eq!(index.id_of("relay-1"), None);
        assert_eq!(index.name_of("a-2"), Some("web-2"));
        let tags = |t: &[&str]| t.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            index.tagged(&tags(&["web"])),
            [AgentId::from("a-1"), AgentId::from("a-2")]
        );
        assert_eq!(index.tagged(&tags(&["eu", "web"])), [AgentId::from("a-1")]);
        assert!(index.tagged(&tags(&["web", "db"])).is_empty());
        assert!(index.tagged(&[]).is_empty());
        // Renamed and retagged: the old entries go.
        let moved = record("a-1", "web-9", &["db"], Role::Agent);
        index.remove(&web1);
        index.add(&moved);
        assert_eq!(index.id_of("web-1"), None);
        assert_eq!(index.id_of("web-9").map(AgentId::as_str), Some("a-1"));
        assert_eq!(index.tagged(&tags(&["web"])), [AgentId::from("a-2")]);
        assert_eq!(index.tagged(&tags(&["db"])), [AgentId::from("a-1")]);
        index.remove(&web2);
        assert!(index.tagged(&tags(&["web"])).is_empty());
        assert_eq!(index.id_of("a-2"), None);
    }
}
